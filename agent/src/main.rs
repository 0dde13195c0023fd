//! `xpyd-agent`: the process in every xpyd pod.
//!
//! Today it has one command, `up`, which serves the OpenAI-compatible API on
//! this machine with one engine (by default the bundled SmolLM2 model). That
//! engine prefills every prompt itself (aggregated serving); the prefill and
//! decode roles, NIXL handoff between them, and the pod roles (`frontend`,
//! `prefill`, `decode`) arrive with the disaggregated-serving work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use xpyd_runtime::engine::gguf::GgufFile;
use xpyd_runtime::engine::model::Model;
use xpyd_runtime::engine::runner::{Engine, EngineConfig};
use xpyd_runtime::engine::tokenizer::Tokenizer;
use xpyd_runtime::frontend::{LocalBackend, router, serve};
use xpyd_runtime::{assets, transfer};

/// How long in-flight work may take to finish after Ctrl-C or SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "xpyd-agent", version, about = "xpyd node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI API on this machine with the bundled model.
    Up(UpArgs),
}

#[derive(Args)]
struct UpArgs {
    /// Address the OpenAI-compatible API listens on (port 0 picks a free one).
    #[arg(long, env = "XPYD_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// GGUF model file; default: the bundled SmolLM2-135M-Instruct.
    #[arg(long, env = "XPYD_MODEL_PATH")]
    model: Option<PathBuf>,
    /// The model name clients send in `model`.
    #[arg(
        long,
        env = "XPYD_SERVED_MODEL_NAME",
        default_value = "SmolLM2-135M-Instruct"
    )]
    served_model_name: String,
    /// KV cache blocks.
    #[arg(long, env = "XPYD_NUM_BLOCKS", default_value_t = 512)]
    num_blocks: u32,
    /// Tokens per KV block.
    #[arg(long, env = "XPYD_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
    /// Most new tokens in one engine step (chunked-prefill budget).
    #[arg(long, env = "XPYD_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Most sequences in one engine step.
    #[arg(long, env = "XPYD_MAX_SEQS", default_value_t = 16)]
    max_seqs: usize,
    /// Most tokens (prompt plus output) of one request.
    #[arg(long, env = "XPYD_MAX_MODEL_LEN", default_value_t = 2048)]
    max_model_len: usize,
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
        Command::Up(args) => up(args),
    }
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    let model_path = match args.model {
        Some(path) => path,
        None => {
            let path = assets::bundled_model()?;
            assets::verify_sha256(&path, assets::BUNDLED_MODEL_SHA256)
                .context("the bundled model is not the pinned SmolLM2-135M-Instruct file")?;
            path
        }
    };
    // NIXL is the transport between prefill and decode workers; a machine
    // without it cannot run xpyd, so say so now rather than mid-request.
    let nixl = transfer::load_nixl()?;
    tracing::info!(lib = %nixl.lib_dir.display(), "NIXL loaded");

    let gguf = GgufFile::open(&model_path)?;
    let model = Model::from_gguf(&gguf)?;
    let config = EngineConfig {
        num_blocks: args.num_blocks,
        block_size: args.block_size,
        max_batch_tokens: args.max_batch_tokens,
        max_seqs: args.max_seqs,
        max_model_len: args.max_model_len,
    };
    let engine = Engine::start(model, Some(Tokenizer::from_gguf(&gguf)?), config, None)?;
    let backend = LocalBackend::new(
        args.served_model_name.clone(),
        engine.clone(),
        Tokenizer::from_gguf(&gguf)?,
    )?;
    let app = router(Arc::new(backend), prometheus::Registry::new())?;

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        let url = format!("http://{}", listener.local_addr()?);
        println!("xpyd is serving {} at {url}", args.served_model_name);
        println!(
            "try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' \
             -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Name the capital of France.\"}}]}}'",
            args.served_model_name
        );
        println!("Ctrl-C stops it.");
        serve(listener, app, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    engine
        .shutdown(SHUTDOWN_GRACE)
        .context("the engine did not stop in time")?;
    println!("xpyd stopped");
    Ok(())
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: finishing requests in flight");
}
