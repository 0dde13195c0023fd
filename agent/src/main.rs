//! `xpyd-agent`: the process in every xpyd pod.
//!
//! Today it has one command, `up`, which checks that this machine has what a
//! local xPyD deployment needs (the bundled model and the NIXL libraries).
//! The serving roles (`frontend`, `prefill`, `decode`) and the local
//! deployment itself arrive with the disaggregated-serving work; until then
//! `up` says so plainly rather than pretending to serve.

use anyhow::Context;
use clap::{Parser, Subcommand};
use xpyd_runtime::{assets, transfer};

#[derive(Parser)]
#[command(name = "xpyd-agent", version, about = "xpyd node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole xPyD deployment on this machine with the bundled model.
    Up,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XPYD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Up => up(),
    }
}

fn up() -> anyhow::Result<()> {
    let model = assets::bundled_model()?;
    assets::verify_sha256(&model, assets::BUNDLED_MODEL_SHA256)
        .context("the bundled model is not the pinned SmolLM2-135M-Instruct file")?;
    println!("model:  {} (sha256 verified)", model.display());
    let nixl = transfer::load_nixl()?;
    println!("NIXL:   {}", nixl.lib_dir.display());
    println!(
        "xpyd-agent up: this machine is ready, but serving is not built yet \
         (the engine, transfer and serving roles are open issues); nothing is listening."
    );
    Ok(())
}
