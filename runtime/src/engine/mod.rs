//! The model engine: loading Llama-family checkpoints, the forward pass on
//! CPU, the paged KV cache and sampling.
//!
//! Two boundaries keep its parts apart:
//! - KV memory ([`kv_storage`]) is addressed by block id: `num_blocks` blocks
//!   of `block_size` tokens, for every layer, K and V. The forward pass reads
//!   and writes K/V only through a sequence's block table (`&[u32]` of block
//!   ids); it never decides which blocks a sequence gets.
//! - Block accounting ([`block_pool`]) hands out those ids, counts
//!   references, hashes full blocks for prefix caching, evicts the least
//!   recently used free cached block, and emits KV events. It never touches
//!   the memory itself.
//!
//! Above both, [`scheduler`] decides what runs in each step (continuous
//! batching under a token budget, chunked prefill, preemption) and [`runner`]
//! owns the step loop and the handle callers submit requests to. The step
//! loop runs any [`forward::ForwardModel`]: the CPU [`model::Model`], or the
//! simulated [`sim::SimModel`] (`--device sim`), which keeps everything
//! above but replaces the forward pass with a timing model.

pub mod block_pool;
pub mod chat_template;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod forward;
pub mod gguf;
pub mod grammar;
pub mod handle;
pub mod kv_storage;
pub mod model;
pub mod runner;
pub mod safetensors;
pub mod sampling;
pub mod scheduler;
pub mod sim;
pub mod tokenizer;
pub mod wire;
