//! Connecting a process to its deployment: etcd and NATS for pods,
//! in-process discovery and bus for `up` (or real servers when named).

use std::sync::Arc;

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

/// etcd discovery and the NATS bus.
pub async fn pod_cluster(
    etcd_endpoints: &[String],
    nats_url: &str,
    scope: Scope,
) -> anyhow::Result<Cluster> {
    Ok(Cluster {
        discovery: etcd(etcd_endpoints, scope.clone()).await?,
        bus: nats(nats_url, scope).await?,
    })
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
