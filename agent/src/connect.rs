//! Connecting a process to its deployment: etcd and NATS for pods,
//! in-process discovery and bus for `up` (or real servers when named).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use xpyd_runtime::bus::{Bus, MemoryBus, NatsBus, NatsOptions};
use xpyd_runtime::discovery::{Discovery, EtcdDiscovery, EtcdOptions, MemoryDiscovery, Scope};

use crate::roles::Cluster;

async fn etcd(endpoints: &[String], scope: Scope) -> anyhow::Result<Arc<dyn Discovery>> {
    let discovery = EtcdDiscovery::connect(endpoints, scope, EtcdOptions::default())
        .await
        .with_context(|| {
            format!(
                "cannot reach etcd at {} (--etcd-endpoints)",
                endpoints.join(",")
            )
        })?;
    Ok(discovery)
}

async fn nats(url: &str, scope: Scope) -> anyhow::Result<Arc<dyn Bus>> {
    let bus = NatsBus::connect(url, scope, NatsOptions::default())
        .await
        .with_context(|| format!("cannot reach NATS at {url} (--nats-url)"))?;
    Ok(bus)
}

/// How long a pod keeps trying to reach etcd and NATS at startup. A pod
/// often starts before cluster DNS or the servers answer it (a rollout on a
/// busy node, etcd restarting); exiting at the first timeout turns that
/// into a CrashLoopBackOff whose back-off outlasts the outage.
const STARTUP_CONNECT_DEADLINE: Duration = Duration::from_secs(90);

/// Retries `connect` with backoff (1 s doubling to 8 s) until it succeeds
/// or [`STARTUP_CONNECT_DEADLINE`] passes; the last error is returned.
async fn with_retries<T, F, Fut>(what: &str, mut connect: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + STARTUP_CONNECT_DEADLINE;
    let mut backoff = Duration::from_secs(1);
    loop {
        match connect().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() + backoff < deadline => {
                tracing::warn!("{what}: {e:#}; retrying in {}s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
            Err(e) => {
                return Err(e.context(format!(
                    "gave up after {}s",
                    STARTUP_CONNECT_DEADLINE.as_secs()
                )));
            }
        }
    }
}

/// etcd discovery and the NATS bus, retried within a startup deadline.
pub async fn pod_cluster(
    etcd_endpoints: &[String],
    nats_url: &str,
    scope: Scope,
) -> anyhow::Result<Cluster> {
    let discovery = with_retries("etcd", || etcd(etcd_endpoints, scope.clone())).await?;
    let bus = with_retries("NATS", || nats(nats_url, scope.clone())).await?;
    Ok(Cluster { discovery, bus })
}

/// In-process discovery and bus, each replaced by the real server when named.
pub async fn local_cluster(
    etcd_endpoints: &[String],
    nats_url: Option<&str>,
    scope: Scope,
) -> anyhow::Result<Cluster> {
    let discovery: Arc<dyn Discovery> = if etcd_endpoints.is_empty() {
        MemoryDiscovery::new(scope.clone())
    } else {
        etcd(etcd_endpoints, scope.clone()).await?
    };
    let bus: Arc<dyn Bus> = match nats_url {
        None => MemoryBus::new(),
        Some(url) => nats(url, scope).await?,
    };
    Ok(Cluster { discovery, bus })
}
