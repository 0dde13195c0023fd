//! `xpyd-agent`: the process in every xpyd pod.
//!
//! - `xpyd-agent frontend|prefill|decode`: one role of a deployment, found
//!   through etcd (discovery, router settings) and NATS (requests, prefill
//!   queue, KV events); flags fall back to the `XPYD_*` variables the
//!   operator sets. Every role serves `/health`, `/ready` and `/metrics` on
//!   its metrics port; SIGTERM drains it (deregister, finish work in flight
//!   within the grace period, exit).
//! - `xpyd-agent up`: a whole deployment on this machine (frontend, prefill
//!   and decode workers in one process, with in-process discovery and bus
//!   unless `--etcd`/`--nats` name real servers), serving the bundled model.
//! - `xpyd-agent sim-profile`: times the CPU engine on this machine and
//!   prints a profile for `--device sim` (docs/sim.md).

#![warn(clippy::unwrap_used, clippy::expect_used)]

mod connect;
mod gpu;
mod node;
mod probes;
mod roles;
mod up;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;
use xpyd_runtime::discovery::{Role, Scope};
use xpyd_runtime::transfer;
use xpyd_runtime::worker::{DecodeConfig, PrefillConfig, PrefillFault};

use node::{EngineArgs, ModelArgs};
use roles::{FrontendSpec, WorkerSpec};

#[derive(Parser)]
#[command(name = "xpyd-agent", version, about = "xpyd node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI API on this machine: frontend, prefill and decode
    /// workers in one process, with the bundled model.
    Up(up::UpArgs),
    /// The HTTP API and router of a deployment.
    Frontend(FrontendArgs),
    /// A prefill worker: computes prompts' KV for decode workers.
    Prefill(WorkerArgs),
    /// A decode worker: generates, prefilling short prompts itself.
    Decode(WorkerArgs),
    /// Download the model (`--model` URL or `hf://` source) into the model
    /// cache, or check a path or claim file, and print where it is. The
    /// operator runs it as each pod's init container.
    FetchModel(FetchModelArgs),
    /// Time the CPU engine's forward pass on this machine and print the
    /// `--device sim` timing profile it fits (JSON, for `--sim-profile`).
    SimProfile(SimProfileArgs),
}

#[derive(Args, Debug, Clone)]
struct SimProfileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Timed runs per batch shape (the median is kept).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

#[derive(Args, Debug, Clone)]
struct FetchModelArgs {
    #[command(flatten)]
    model: ModelArgs,
}

/// Where a pod's deployment lives.
#[derive(Args, Debug, Clone)]
struct PodArgs {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "XPYD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    etcd_endpoints: Vec<String>,
    /// NATS server URL.
    #[arg(long, env = "XPYD_NATS_URL")]
    nats_url: String,
    /// Namespace of the DisaggDeployment.
    #[arg(long, env = "XPYD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Name of the DisaggDeployment.
    #[arg(long, env = "XPYD_DEPLOYMENT")]
    deployment: String,
    /// Instance name prefix (the pod name); a random suffix is added.
    #[arg(long, env = "XPYD_INSTANCE")]
    instance: Option<String>,
    /// Address peers reach this pod at.
    #[arg(long, env = "XPYD_POD_IP", default_value = "127.0.0.1")]
    advertise_host: String,
    /// Address the servers bind.
    #[arg(long, env = "XPYD_BIND_HOST", default_value = "0.0.0.0")]
    bind_host: String,
    /// Port of `/health`, `/ready` and `/metrics` (0 picks a free one).
    #[arg(long, env = "XPYD_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// Seconds in-flight work may take to finish after SIGTERM.
    #[arg(long, env = "XPYD_GRACE_SECONDS", default_value_t = 20)]
    grace_seconds: u64,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args, Debug, Clone)]
struct FrontendArgs {
    #[command(flatten)]
    pod: PodArgs,
    /// Port of the OpenAI-compatible API.
    #[arg(long, env = "XPYD_HTTP_PORT", default_value_t = 8000)]
    http_port: u16,
    /// Tokens per KV block of the decode workers (prefix hashes use it).
    #[arg(long, env = "XPYD_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
}

#[derive(Args, Debug, Clone)]
struct WorkerArgs {
    #[command(flatten)]
    pod: PodArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    disagg: DisaggArgs,
}

/// Disaggregation knobs of a decode worker.
#[derive(Args, Debug, Clone)]
struct DisaggArgs {
    /// Prefill remotely when more than this many prompt tokens are
    /// uncached; overrides the deployment's `maxLocalPrefillLength`.
    #[arg(long, env = "XPYD_MAX_LOCAL_PREFILL_LENGTH")]
    max_local_prefill_length: Option<u32>,
    /// Milliseconds a decode worker waits for a remote prefill's KV before
    /// prefilling locally.
    #[arg(long, env = "XPYD_REMOTE_PREFILL_TIMEOUT_MS", default_value_t = 30_000)]
    remote_prefill_timeout_ms: u64,
    /// Prefill jobs a prefill worker computes at once. Raise it only where
    /// one prompt leaves the device's step underused: a job taken while
    /// another computes waits behind it, even when another worker is idle.
    #[arg(long, env = "XPYD_PREFILL_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    prefill_concurrency: u32,
}

impl DisaggArgs {
    fn decode_config(&self) -> DecodeConfig {
        DecodeConfig {
            remote_prefill_timeout: Duration::from_millis(self.remote_prefill_timeout_ms),
            max_local_prefill_length: self.max_local_prefill_length,
            ..DecodeConfig::default()
        }
    }
}

/// Logs go to stderr: colored on a terminal, plain text otherwise (so
/// `kubectl logs` shows no escape codes), JSON lines with
/// `XPYD_LOG_FORMAT=json`.
fn init_logging() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("XPYD_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("XPYD_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().init(),
        Ok("text") | Ok("") | Err(_) => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        Ok(other) => anyhow::bail!("XPYD_LOG_FORMAT={other:?}: use text or json"),
    }
    Ok(())
}

/// mimalloc, not glibc's malloc: the frontend's request path allocates
/// per request and per token, and malloc and free were 15% of its CPU
/// profile; with mimalloc the frontend benchmark serves 1.9x the
/// requests/s (`docs/benchmarks.md`, "Frontend overhead per request").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    init_logging()?;
    let cli = Cli::parse();
    if let Command::FetchModel(args) = &cli.command {
        return fetch_model(args);
    }
    if let Command::SimProfile(args) = &cli.command {
        return sim_profile(args);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Frontend(args) => frontend(args).await,
            Command::Prefill(args) => worker(Role::Prefill, args).await,
            Command::Decode(args) => worker(Role::Decode, args).await,
            Command::FetchModel(_) | Command::SimProfile(_) => {
                unreachable!("handled before the runtime starts")
            }
        }
    });
    // Tasks still blocked on a dead peer must not hold the exit hostage.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// `fetch-model`: resolve the model and print its path. A failure's message
/// also goes to the container's termination log, where Kubernetes (and the
/// operator's status) shows it.
fn fetch_model(args: &FetchModelArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(args.model.resolve());
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(resolved) => {
            println!("{}", resolved.path.display());
            Ok(())
        }
        Err(e) => {
            let termination_log = std::path::Path::new("/dev/termination-log");
            if termination_log.exists() {
                let _ = std::fs::write(termination_log, format!("fetch-model: {e:#}"));
            }
            Err(e)
        }
    }
}

/// `sim-profile`: measure the CPU model at `--model` and print the fitted
/// profile on stdout, the timed batches on stderr.
fn sim_profile(args: &SimProfileArgs) -> anyhow::Result<()> {
    use xpyd_runtime::engine::model::Model;
    use xpyd_runtime::engine::sim::profile::{fit, measure};
    let runtime = tokio::runtime::Runtime::new()?;
    let path = runtime.block_on(args.model.path());
    runtime.shutdown_timeout(Duration::from_secs(2));
    let path = path?;
    let mut model = Model::load_gguf(&path)?;
    let samples = measure(&mut model, args.repeats.max(1))?;
    let name = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let profile = fit(
        &samples,
        &format!("cpu {name}, {threads} threads"),
        &format!(
            "xpyd-agent sim-profile --repeats {} (median of each batch, least squares)",
            args.repeats
        ),
    );
    eprintln!("prefill_tokens prefill_pairs decode_seqs decode_context measured_ms model_ms");
    for s in &samples {
        eprintln!(
            "{:>14} {:>13} {:>11} {:>14} {:>11.2} {:>8.2}",
            s.work.prefill_tokens,
            s.work.prefill_pairs,
            s.work.decode_seqs,
            s.work.decode_context,
            s.ms,
            profile.step_ms(&s.work)
        );
    }
    println!("{}", serde_json::to_string_pretty(&profile)?);
    Ok(())
}

/// NIXL is the transport between prefill and decode workers; a machine
/// without it cannot run xpyd, so say so at startup, not mid-request.
fn require_nixl() -> anyhow::Result<()> {
    let nixl = transfer::load_nixl()?;
    tracing::info!(lib = %nixl.lib_dir.display(), "NIXL loaded");
    Ok(())
}

/// A watch that turns true on Ctrl-C or SIGTERM, and the switch that turns
/// it true from inside.
fn stop_on_signal() -> (std::sync::Arc<watch::Sender<bool>>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let tx = std::sync::Arc::new(tx);
    tokio::spawn({
        let tx = tx.clone();
        async move {
            shutdown_signal().await;
            tx.send_replace(true);
        }
    });
    (tx, rx)
}

/// Serve the probes of a pod on its metrics port.
async fn start_probes(
    pod: &PodArgs,
    ready: watch::Receiver<bool>,
    registry: prometheus::Registry,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<String> {
    let bind = format!("{}:{}", pod.bind_host, pod.metrics_port);
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .with_context(|| format!("cannot listen on {bind} (--metrics-port)"))?;
    let port = listener.local_addr()?.port();
    tokio::spawn(probes::serve(
        listener,
        ready,
        registry,
        roles::stopped(stop),
    ));
    Ok(format!("{}:{port}", pod.advertise_host))
}

async fn worker(role: Role, args: WorkerArgs) -> anyhow::Result<()> {
    let pod = &args.pod;
    node::check_device(args.engine.device)?;
    let sim = args.engine.sim_profile()?;
    let model_path = pod.model.path().await?;
    let engine = args.engine.config(&model_path, 1)?;
    require_nixl()?;
    let devices = node::devices(sim.as_ref());
    let scope = Scope::new(&pod.namespace, &pod.deployment);
    let cluster = connect::pod_cluster(&pod.etcd_endpoints, &pod.nats_url, scope).await?;
    let (_stop_tx, stop) = stop_on_signal();
    let registry = prometheus::Registry::new();
    let (ready_tx, ready) = watch::channel(false);
    let http_address = start_probes(pod, ready, registry.clone(), stop.clone()).await?;
    let prefix = pod
        .instance
        .clone()
        .unwrap_or_else(|| role.as_str().to_string());
    let spec = WorkerSpec {
        role,
        instance_id: node::instance_id(&prefix),
        model_path,
        model_name: pod.model.served_model_name.clone(),
        engine,
        http_address,
        devices,
        label_metrics: false,
        decode: args.disagg.decode_config(),
        prefill: PrefillConfig {
            max_concurrent: args.disagg.prefill_concurrency as usize,
            fault: PrefillFault::from_env().map_err(anyhow::Error::msg)?,
            ..PrefillConfig::default()
        },
        grace: Duration::from_secs(pod.grace_seconds),
        sim,
    };
    roles::run_worker(spec, cluster, registry, ready_tx, stop).await
}

async fn frontend(args: FrontendArgs) -> anyhow::Result<()> {
    let pod = &args.pod;
    // The frontend needs only the tokenizer and chat template, but it
    // fetches the whole file: one code path, and pods sharing a cache claim
    // download it once anyway (see docs/models.md).
    let model_path = pod.model.path().await?;
    let scope = Scope::new(&pod.namespace, &pod.deployment);
    let cluster = connect::pod_cluster(&pod.etcd_endpoints, &pod.nats_url, scope).await?;
    let (_stop_tx, stop) = stop_on_signal();
    let registry = prometheus::Registry::new();
    let (ready_tx, ready) = watch::channel(false);
    start_probes(pod, ready, registry.clone(), stop.clone()).await?;
    let api: SocketAddr = format!("{}:{}", pod.bind_host, args.http_port)
        .parse()
        .with_context(|| format!("bad --bind-host {}", pod.bind_host))?;
    let listener = tokio::net::TcpListener::bind(api)
        .await
        .with_context(|| format!("cannot listen on {api} (--http-port)"))?;
    let prefix = pod
        .instance
        .clone()
        .unwrap_or_else(|| "frontend".to_string());
    let spec = FrontendSpec {
        instance_id: node::instance_id(&prefix),
        model_path,
        model_name: pod.model.served_model_name.clone(),
        block_size: args.block_size,
        advertise_host: Some(pod.advertise_host.clone()),
        grace: Duration::from_secs(pod.grace_seconds),
    };
    roles::run_frontend(spec, cluster, registry, listener, ready_tx, stop).await
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
