//! The worker roles: a decode worker ([`DecodeWorker`]) serves generation
//! requests from the bus and decides, per prompt, whether to prefill it
//! locally or hand it to the prefill queue; a prefill worker
//! ([`PrefillWorker`]) takes jobs from that queue, computes the KV and
//! NIXL-writes it into the decode worker's blocks. The protocol is in
//! `docs/architecture.md` and [`decode`]'s module doc; the wire types are in
//! `xpyd-api` ([`xpyd_api::messages`]).
//!
//! A worker composes the rooms below it (engine, transfer, discovery, bus);
//! process wiring (flags, HTTP probes, signals) is the agent's.

pub mod decode;
mod kv_publisher;

mod notifications;
pub mod paths;
pub mod plan;
pub mod prefill;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::bus::Bus;
use crate::discovery::{Discovery, Role};
use crate::engine::runner::EngineHandle;
use crate::metrics::WorkerMetrics;
use crate::transfer::{PeerInfo, TransferAgent, Transport, infer_transport};

pub use decode::{DecodeConfig, DecodeWorker};
pub use kv_publisher::publish_kv_events;
pub use paths::{PathConfig, PathReport};

pub use prefill::{PrefillConfig, PrefillFault, PrefillWorker};

/// What both worker roles are built from.
#[derive(Clone)]
pub struct WorkerParts {
    /// This process's instance id (also its NIXL agent name).
    pub instance_id: String,
    /// The served model name.
    pub model: String,
    pub engine: EngineHandle,
    /// NIXL agent over `engine`'s KV memory. Drop every clone before the
    /// engine shuts down.
    pub agent: TransferAgent,
    pub bus: Arc<dyn Bus>,
    pub discovery: Arc<dyn Discovery>,
    pub metrics: WorkerMetrics,
    /// Whether this process is registered in discovery: while it is not, it
    /// takes no new work (it would be a ghost nobody can find or trust).
    pub registered: watch::Receiver<bool>,
}

impl WorkerParts {
    /// This worker's KV-layout fingerprint (see
    /// [`crate::transfer::PeerInfo::kv_fingerprint`]): the name of the
    /// prefill queue it takes from or feeds.
    pub fn kv_layout(&self) -> String {
        self.agent.metadata().kv_fingerprint(&self.model)
    }

    /// The transport UCX is inferred to use between this worker and
    /// instance `peer` ([`crate::transfer::infer_transport`]); `None` while
    /// its record does not say (an older worker, or one that left).
    fn transport_to(&self, peer: &str) -> Option<Transport> {
        let metadata = self
            .discovery
            .instances()
            .borrow()
            .get(peer)?
            .transfer
            .clone()?;
        let info = PeerInfo::from_metadata(&metadata).ok()?;
        Some(infer_transport(
            self.agent.endpoint(),
            info.endpoint.as_ref()?,
        ))
    }

    /// The live instances of `role` serving our model with KV layout
    /// `kv_layout`.
    fn alive(&self, role: Role, kv_layout: &str) -> Vec<String> {
        self.discovery
            .instances()
            .borrow()
            .iter()
            .filter(|(_, r)| {
                r.role == role && r.model == self.model && r.kv_layout.as_deref() == Some(kv_layout)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether instance `id` is alive.
    fn is_alive(&self, id: &str) -> bool {
        self.discovery.instances().borrow().contains_key(id)
    }

    /// What sets the live gauges both roles show (engine load, instances
    /// by role) at a scrape; it holds neither the engine nor the metrics.
    fn live_gauges(&self) -> impl Fn(&WorkerMetrics) + Send + Sync + 'static {
        let stats = self.engine.stats_reader();
        let instances = self.discovery.instances();
        move |metrics| {
            metrics.observe_engine(&stats());
            let instances = instances.borrow();
            for role in [Role::Frontend, Role::Prefill, Role::Decode] {
                let n = instances.values().filter(|r| r.role == role).count();
                metrics
                    .instances
                    .with_label_values(&[role.as_str()])
                    .set(n as i64);
            }
        }
    }
}

/// Work in flight, so a draining worker can wait for it.
#[derive(Clone, Default)]
pub(crate) struct InFlight(Arc<(AtomicUsize, Notify)>);

/// One unit of work in flight; dropping it ends it.
pub(crate) struct InFlightGuard(InFlight);

impl InFlight {
    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub(crate) fn count(&self) -> usize {
        self.0.0.load(Ordering::SeqCst)
    }

    /// Resolves once nothing is in flight.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.0.1.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Wait until nothing is in flight, or `grace` passed; says which.
    pub(crate) async fn wait_idle(&self, grace: Duration) -> bool {
        let idle = tokio::time::timeout(grace, self.idle()).await.is_ok();
        if !idle {
            tracing::warn!(
                in_flight = self.count(),
                "grace period over with work in flight"
            );
        }
        idle
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.0.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.0.1.notify_waiters();
        }
    }
}
