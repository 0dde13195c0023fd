//! `xpyd-bench`: load generator for OpenAI-compatible servers that prints
//! `vllm bench serve`'s result table. See `xpyd_e2e::bench` and
//! `docs/benchmarks.md`.

use clap::Parser;
use xpyd_e2e::bench::cli::{BenchArgs, main_with};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = BenchArgs::parse();
    let outcome = main_with(args).await?;
    if outcome.metrics.completed == 0 {
        anyhow::bail!("no request succeeded");
    }
    Ok(())
}
