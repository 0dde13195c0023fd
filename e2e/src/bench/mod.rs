//! The load generator behind `xpyd-bench`: `vllm bench serve`'s figures for
//! any OpenAI-compatible server, with exact-length prompts made with the
//! served model's tokenizer.
//!
//! - [`workload`]: the prompts (random lengths, or shared-prefix sessions).
//! - [`load`]: arrivals (Poisson with burstiness, or all at once),
//!   concurrency, warm-up, request count or duration, progress.
//! - [`client`]: one streamed request and its timings.
//! - [`stats`]: TTFT, TPOT, ITL, E2E and throughputs as vLLM defines them.
//! - [`report`]: the table, failures, JSON export; [`plot`]: the PNG.
//! - [`cli`]: the command line.
//!
//! It measures; it asserts nothing about speed (tests only check that runs
//! complete and that the arithmetic is right).

pub mod cli;
pub mod client;
pub mod load;
pub mod plot;
pub mod report;
pub mod stats;
pub mod workload;
