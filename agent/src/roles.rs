//! The three roles of a pod, each as one async function that runs until its
//! shutdown signal: start, register, serve, then drain (deregister, let
//! work in flight finish within the grace period) and stop. `up` runs the
//! same functions side by side in one process.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use xpyd_runtime::bus::Bus;
use xpyd_runtime::discovery::{Discovery, InstanceRecord, Lifecycle, Role};
use xpyd_runtime::engine::runner::EngineConfig;
use xpyd_runtime::engine::sim::{SIM_DEVICE, SimProfile};
use xpyd_runtime::frontend::{self, ClusterBackend, ClusterOptions, Prompts};
use xpyd_runtime::metrics::{WorkerMetrics, register_engine_info};
use xpyd_runtime::worker::{DecodeConfig, DecodeWorker, PrefillConfig, PrefillWorker, WorkerParts};

use crate::node::{self, Node};

/// Where a process finds the rest of its deployment.
#[derive(Clone)]
pub struct Cluster {
    pub discovery: Arc<dyn Discovery>,
    pub bus: Arc<dyn Bus>,
}

pub use xpyd_runtime::discovery::lifecycle::stopped;

/// Register `record` (retrying until `stop`) and follow the registration:
/// `ready` is "registered", and each settings generation is acknowledged.
async fn register(
    cluster: &Cluster,
    record: InstanceRecord,
    ready: watch::Sender<bool>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Lifecycle> {
    Lifecycle::register(cluster.discovery.clone(), record, ready, stop.clone())
        .await
        .context("registering")
}

/// What a prefill or decode worker needs to start.
#[derive(Clone)]
pub struct WorkerSpec {
    pub role: Role,
    pub instance_id: String,
    pub model_path: PathBuf,
    pub model_name: String,
    pub engine: EngineConfig,
    /// `host:port` of this process's probe server, for the record.
    pub http_address: String,
    pub devices: Vec<String>,
    /// Label series with the instance (several workers share a registry).
    pub label_metrics: bool,
    pub decode: DecodeConfig,
    pub prefill: PrefillConfig,
    pub grace: Duration,
    /// `--device sim`: the simulated engine's profile.
    pub sim: Option<SimProfile>,
}

/// Run a prefill or decode worker until `stop`.
pub async fn run_worker(
    spec: WorkerSpec,
    cluster: Cluster,
    registry: Registry,
    ready: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let id = spec.instance_id.clone();
    // Decode workers tell the routers what their caches hold.
    let (events_tx, events) = match spec.role {
        Role::Decode => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        }
        _ => (None, None),
    };
    let node = tokio::task::spawn_blocking({
        let spec = spec.clone();
        move || {
            Node::start(
                &spec.model_path,
                spec.engine,
                &spec.instance_id,
                events_tx,
                spec.sim.as_ref(),
            )
        }
    })
    .await??;
    if let Some(events) = events {
        tokio::spawn(xpyd_runtime::worker::publish_kv_events(
            id.clone(),
            node.engine.clone(),
            cluster.bus.clone(),
            events,
            stop.clone(),
        ));
    }
    let label = spec.label_metrics.then_some(id.as_str());
    let metrics = WorkerMetrics::register(&registry, label)?;
    let device = if spec.sim.is_some() {
        SIM_DEVICE
    } else {
        "cpu"
    };
    register_engine_info(&registry, label, device)?;
    let record = node.record(
        &id,
        spec.role,
        &spec.model_name,
        spec.http_address.clone(),
        spec.devices.clone(),
    );
    let (registered_tx, registered) = watch::channel(false);
    let lifecycle = register(&cluster, record, registered_tx, &stop).await?;
    // `/ready` follows the registration.
    let readiness = tokio::spawn({
        let mut registered = registered.clone();
        async move {
            loop {
                ready.send_replace(*registered.borrow_and_update());
                if registered.changed().await.is_err() {
                    ready.send_replace(false);
                    return;
                }
            }
        }
    });
    tracing::info!(instance = %id, role = %spec.role, "serving");
    let parts = WorkerParts {
        instance_id: id.clone(),
        model: spec.model_name.clone(),
        engine: node.engine.clone(),
        agent: node.agent.clone(),
        bus: cluster.bus.clone(),
        discovery: cluster.discovery.clone(),
        metrics,
        registered,
    };
    // Drain: on stop, deregister first so nobody routes here any more,
    // then let the worker finish what it has.
    let draining = lifecycle.drain_on(stop.clone());
    match spec.role {
        Role::Decode => {
            let worker = DecodeWorker::new(parts, spec.decode.clone())?;
            worker.run(draining, spec.grace).await?;
        }
        Role::Prefill => {
            PrefillWorker::new(parts, spec.prefill.clone())
                .run(draining, spec.grace)
                .await;
        }
        Role::Frontend => anyhow::bail!("run_worker runs prefill and decode workers"),
    }
    readiness.abort();
    let Node { engine, agent, .. } = node;
    drop(agent);
    tokio::task::spawn_blocking(move || engine.shutdown(Duration::from_secs(10))).await??;
    tracing::info!(instance = %id, "stopped");
    Ok(())
}

/// What the frontend needs to start.
#[derive(Clone)]
pub struct FrontendSpec {
    pub instance_id: String,
    pub model_path: PathBuf,
    pub model_name: String,
    /// Tokens per KV block of the decode workers.
    pub block_size: usize,
    /// Host peers reach this frontend at (the pod IP, `--advertise-host`);
    /// the record pairs it with the API listener's port. `None`: the
    /// listener's own address (right when it binds one address, as `up`).
    pub advertise_host: Option<String>,
    pub grace: Duration,
}

/// The API address to register: `advertise_host` (or the bound IP) with
/// the bound port. A wildcard bind (`0.0.0.0`) is never an address anyone
/// can reach us at.
fn advertised_address(bound: SocketAddr, advertise_host: Option<&str>) -> String {
    match advertise_host {
        None => bound.to_string(),
        Some(host) => match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, bound.port()).to_string(),
            Err(_) => format!("{host}:{}", bound.port()),
        },
    }
}

/// Run the frontend (HTTP API, router) on `listener` until `stop`.
pub async fn run_frontend(
    spec: FrontendSpec,
    cluster: Cluster,
    registry: Registry,
    listener: TcpListener,
    ready: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tokenizer = node::load_tokenizer(&spec.model_path)?;
    let prompts = Prompts::new(spec.model_name.clone(), tokenizer)?;
    let (router, _feeds) = frontend::start_router(
        cluster.discovery.clone(),
        cluster.bus.clone(),
        &spec.model_name,
        spec.block_size,
        &registry,
    )?;
    let backend = ClusterBackend::new(
        prompts,
        cluster.discovery.clone(),
        cluster.bus.clone(),
        router,
        ClusterOptions::default(),
    );
    let app = frontend::router(Arc::new(backend), registry.clone())?;
    let address = advertised_address(listener.local_addr()?, spec.advertise_host.as_deref());
    let record = InstanceRecord {
        instance_id: spec.instance_id.clone(),
        role: Role::Frontend,
        model: spec.model_name.clone(),
        http_address: address,
        transfer: None,
        capacity: None,
        devices: Vec::new(),
        kv_layout: None,
    };
    let lifecycle = register(&cluster, record, ready, &stop).await?;
    // The server's shutdown future must own what it uses.
    let draining = async move { lifecycle.drain_on(stop).await };
    // Streams in flight get the grace period, then the server stops anyway.
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    // Connections held open by clients are told to close first: a short
    // part of the grace period, so that streams keep most of it.
    let window = frontend::CLOSE_WINDOW.min(spec.grace / 4);
    let serving = frontend::serve(
        listener,
        app,
        async move {
            draining.await;
            let _ = drained_tx.send(());
        },
        window,
    );
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => r?,
        _ = async {
            let _ = drained_rx.await;
            tokio::time::sleep(spec.grace).await;
        } => tracing::warn!("grace period over; closing streams still open"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontend_registers_its_pod_address_not_its_bind_address() {
        let bound: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        assert_eq!(
            advertised_address(bound, Some("10.244.0.7")),
            "10.244.0.7:8000"
        );
        assert_eq!(advertised_address(bound, Some("fd00::7")), "[fd00::7]:8000");
        assert_eq!(
            advertised_address(bound, Some("frontend.example")),
            "frontend.example:8000"
        );
        let local: SocketAddr = "127.0.0.1:41234".parse().unwrap();
        assert_eq!(advertised_address(local, None), "127.0.0.1:41234");
    }
}
