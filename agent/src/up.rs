//! `xpyd-agent up`: a whole xPyD deployment on this machine.
//!
//! One process runs the frontend, `--decode` decode workers and `--prefill`
//! prefill workers, each with its own engine and NIXL agent (prefill
//! workers NIXL-write KV into decode workers' blocks exactly as across
//! pods). Discovery and the bus are in-process unless `--etcd` / `--nats`
//! name real servers. Ctrl-C drains and stops everything.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;
use xpyd_runtime::discovery::{Role, RouterSettings, RouterStrategy, Scope};
use xpyd_runtime::worker::{DecodeConfig, PrefillConfig};

use crate::node::{self, EngineArgs, ModelArgs};
use crate::roles::{self, FrontendSpec, WorkerSpec};
use crate::{connect, require_nixl, stop_on_signal};

/// How long workers may take to load the model and register.
const START_DEADLINE: Duration = Duration::from_secs(180);
/// How long in-flight work may take to finish after Ctrl-C or SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Address the OpenAI-compatible API listens on (port 0 picks a free one).
    #[arg(long, env = "XPYD_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Prefill workers (0: every prompt is prefilled by its decode worker).
    #[arg(long, default_value_t = 1)]
    prefill: usize,
    /// Decode workers.
    #[arg(long, default_value_t = 1)]
    decode: usize,
    /// Decode-worker selection: kv, round_robin, random or session.
    #[arg(long, default_value = "kv", value_parser = parse_strategy)]
    router: RouterStrategy,
    /// Use this etcd (comma-separated endpoints) instead of in-process discovery.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Use this NATS server instead of the in-process bus.
    #[arg(long)]
    nats: Option<String>,
    /// Namespace and deployment name of the keys and subjects.
    #[arg(long, default_value = "local/up")]
    scope: String,
    /// Prefill remotely when more than this many prompt tokens are
    /// uncached (written as the deployment's `maxLocalPrefillLength`; with
    /// `--etcd` it can be changed live there).
    #[arg(long, default_value_t = 256)]
    max_local_prefill_length: u32,
    /// Milliseconds a decode worker waits for a remote prefill's KV before
    /// prefilling locally.
    #[arg(long, default_value_t = 30_000)]
    remote_prefill_timeout_ms: u64,
}

fn parse_strategy(s: &str) -> Result<RouterStrategy, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
        format!("unknown router strategy {s:?}: use kv, round_robin, random or session")
    })
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.decode > 0, "--decode must be at least 1");
    node::check_device(args.engine.device)?;
    let sim = args.engine.sim_profile()?;
    let model_path = args.model.path().await?;
    let engine = args
        .engine
        .config(&model_path, args.prefill + args.decode)?;
    require_nixl()?;
    let devices = node::devices(sim.as_ref());
    let (namespace, deployment) = args
        .scope
        .split_once('/')
        .context("--scope must be <namespace>/<deployment>")?;
    let scope = Scope::new(namespace, deployment);
    let cluster = connect::local_cluster(&args.etcd, args.nats.as_deref(), scope).await?;
    let settings = RouterSettings {
        strategy: args.router,
        max_local_prefill_length: args.max_local_prefill_length,
        disaggregated: args.prefill > 0,
        ..RouterSettings::default()
    };
    cluster
        .discovery
        .put_settings(settings)
        .await
        .context("writing the router settings")?;

    let (stop_tx, stop) = stop_on_signal();
    let registry = prometheus::Registry::new();
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let url = format!("http://{}", listener.local_addr()?);

    let mut tasks = Vec::new();
    let mut readies = Vec::new();
    let roles = std::iter::repeat_n(Role::Decode, args.decode)
        .chain(std::iter::repeat_n(Role::Prefill, args.prefill));
    for (i, role) in roles.enumerate() {
        let (ready_tx, ready) = watch::channel(false);
        readies.push(ready);
        let spec = WorkerSpec {
            role,
            instance_id: node::instance_id(&format!("up-{}-{i}", role.as_str())),
            model_path: model_path.clone(),
            model_name: args.model.served_model_name.clone(),
            engine,
            http_address: listener.local_addr()?.to_string(),
            devices: devices.clone(),
            label_metrics: true,
            // The threshold comes from the settings, so it can change live.
            decode: DecodeConfig {
                remote_prefill_timeout: Duration::from_millis(args.remote_prefill_timeout_ms),
                ..DecodeConfig::default()
            },
            prefill: PrefillConfig::default(),
            grace: SHUTDOWN_GRACE,
            sim: sim.clone(),
        };
        tasks.push(tokio::spawn(roles::run_worker(
            spec,
            cluster.clone(),
            registry.clone(),
            ready_tx,
            stop.clone(),
        )));
    }
    // The frontend starts answering once every worker has registered.
    let all_ready = async {
        for ready in &mut readies {
            ready.wait_for(|r| *r).await?;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = tokio::time::timeout(START_DEADLINE, all_ready) => match r {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                stop_tx.send_replace(true);
                for task in tasks {
                    if let Ok(Err(e)) = task.await {
                        return Err(e.context("a worker failed to start"));
                    }
                }
                anyhow::bail!("workers did not start within {START_DEADLINE:?}");
            }
        },
        _ = roles::stopped(stop.clone()) => {}
    }
    let (front_ready, _) = watch::channel(false);
    let frontend = tokio::spawn(roles::run_frontend(
        FrontendSpec {
            instance_id: node::instance_id("up-frontend"),
            model_path,
            model_name: args.model.served_model_name.clone(),
            block_size: args.engine.block_size,
            advertise_host: None,
            grace: SHUTDOWN_GRACE,
        },
        cluster.clone(),
        registry,
        listener,
        front_ready,
        stop.clone(),
    ));
    if !*stop.borrow() {
        println!(
            "xpyd is serving {} at {url} ({} prefill, {} decode; remote prefill above {} tokens)",
            args.model.served_model_name, args.prefill, args.decode, args.max_local_prefill_length
        );
        // A simulated engine never ends an answer by itself (no EOS).
        let max_tokens = if sim.is_some() {
            "\"max_tokens\": 16, "
        } else {
            ""
        };
        println!(
            "try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' \
             -d '{{\"model\": \"{}\", {max_tokens}\"temperature\": 0, \"messages\": [{{\"role\": \"user\", \"content\": \"Name the capital of France.\"}}]}}'",
            args.model.served_model_name
        );
        println!(
            "(temperature 0 picks the likeliest token each step; this 135M model rambles when it samples at the default 1.0)"
        );
        if let Some(profile) = &sim {
            println!(
                "SIMULATED engines (--device sim, profile {:?}): responses are placeholders, \
                 not model answers, and carry x-xpyd-simulated: true; they end only at \
                 max_tokens, a stop string or the context window",
                profile.name
            );
        }
        println!("Ctrl-C stops it.");
    }
    let mut first_error = None;
    match frontend.await {
        Ok(Err(e)) => first_error = Some(e.context("the frontend failed")),
        Err(e) => first_error = Some(anyhow::anyhow!("the frontend panicked: {e}")),
        Ok(Ok(())) => {}
    }
    stop_tx.send_replace(true);
    for task in tasks {
        match task.await {
            Ok(Err(e)) if first_error.is_none() => first_error = Some(e.context("a worker failed")),
            Err(e) if first_error.is_none() => {
                first_error = Some(anyhow::anyhow!("a worker panicked: {e}"))
            }
            _ => {}
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    println!("xpyd stopped");
    Ok(())
}
