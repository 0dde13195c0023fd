//! Discovery: who is alive in a deployment, what they offer, and the
//! deployment's router settings.
//!
//! Every xpyd process registers one [`InstanceRecord`] under a lease it keeps
//! alive in the background; everyone watches the live [`InstanceSet`] of its
//! deployment. Two implementations of [`Discovery`]: [`EtcdDiscovery`] (etcd,
//! what pods use) and [`MemoryDiscovery`] (in-process, for `xpyd-agent up`).
//!
//! Key layout in etcd, per deployment `<dep>` in namespace `<ns>` (the
//! operator writes the settings key; see `operator/src/router_settings.rs`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `/xpyd/<ns>/<dep>/instances/<role>/<instance_id>` | JSON [`InstanceRecord`] | the instance's |
//! | `/xpyd/<ns>/<dep>/router` | JSON [`RouterSettings`] | none (operator) |
//! | `/xpyd/<ns>/<dep>/router-acks/<instance_id>` | JSON `{"generation":N}` | the instance's |
//!
//! Not here: what the records are used for (router, workers).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::transfer::PeerInfo;

mod etcd;
pub mod lifecycle;
mod memory;

pub use etcd::{EtcdDiscovery, EtcdOptions};
pub use lifecycle::Lifecycle;
pub use memory::MemoryDiscovery;

/// Which deployment a process belongs to: the key and subject prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope {
    pub namespace: String,
    pub deployment: String,
}

impl Scope {
    pub fn new(namespace: impl Into<String>, deployment: impl Into<String>) -> Scope {
        Scope {
            namespace: namespace.into(),
            deployment: deployment.into(),
        }
    }

    /// `/xpyd/<ns>/<dep>/`: everything of this deployment.
    pub fn prefix(&self) -> String {
        format!("/xpyd/{}/{}/", self.namespace, self.deployment)
    }

    /// `/xpyd/<ns>/<dep>/instances/`.
    pub fn instances_prefix(&self) -> String {
        format!("{}instances/", self.prefix())
    }

    /// The key of one instance's record.
    pub fn instance_key(&self, role: Role, instance_id: &str) -> String {
        format!(
            "{}{}/{}",
            self.instances_prefix(),
            role.as_str(),
            instance_id
        )
    }

    /// The router settings the operator writes.
    pub fn settings_key(&self) -> String {
        format!("{}router", self.prefix())
    }

    /// Where an instance acknowledges the settings generation it runs.
    pub fn ack_key(&self, instance_id: &str) -> String {
        format!("{}router-acks/{}", self.prefix(), instance_id)
    }
}

/// What a process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Frontend,
    Prefill,
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// KV capacity of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub num_blocks: u32,
    pub block_size: u32,
    pub max_model_len: u32,
    pub max_seqs: u32,
}

/// One live process, as published under its lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Unique per process incarnation (a restarted process gets a new one).
    pub instance_id: String,
    pub role: Role,
    /// Served model name (workers); empty for frontends.
    pub model: String,
    /// `host:port` of the process's HTTP server (health, metrics; the API
    /// for frontends).
    pub http_address: String,
    /// Where peers write KV (decode workers) and who writes (prefill).
    #[serde(default)]
    pub transfer: Option<PeerInfo>,
    #[serde(default)]
    pub capacity: Option<Capacity>,
    /// Compute devices in use, e.g. `"cpu"` or `"cuda:0 NVIDIA H100 80GB HBM3"`.
    #[serde(default)]
    pub devices: Vec<String>,
}

/// All live instances of a deployment, by instance id.
pub type InstanceSet = Arc<BTreeMap<String, InstanceRecord>>;

/// Decode-worker selection strategy (the CRD's `spec.router.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterStrategy {
    #[default]
    Kv,
    RoundRobin,
    Random,
    Session,
}

/// The deployment's router and disaggregation settings, as the operator
/// writes them (camelCase JSON). Unknown fields are ignored and missing ones
/// take their defaults, so operator and agents can be upgraded separately.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouterSettings {
    pub generation: i64,
    pub strategy: RouterStrategy,
    /// Remote prefill when the uncached prompt is longer than this.
    pub max_local_prefill_length: u32,
    pub session_header: String,
    /// Prefill locally when the prefill queue holds more than this.
    pub max_prefill_queue_depth: u32,
    pub disaggregated: bool,
    /// KV strategy: weight of prefix overlap (in blocks) in a worker's score.
    pub kv_overlap_weight: f64,
    /// KV strategy: weight of load (active blocks plus queued prompt blocks).
    pub kv_load_weight: f64,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            generation: 0,
            strategy: RouterStrategy::Kv,
            max_local_prefill_length: 512,
            session_header: "session-id".to_string(),
            max_prefill_queue_depth: 64,
            disaggregated: true,
            kv_overlap_weight: 1.0,
            kv_load_weight: 1.0,
        }
    }
}

/// Whether this process is registered right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    Registered,
    /// The lease was lost (store unreachable past the TTL, or revoked): the
    /// process must not take new work until `Registered` again. The
    /// implementation keeps trying to re-register.
    Lost(String),
    /// `deregister` ran.
    Deregistered,
}

/// Why a discovery call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("discovery store unreachable: {0}")]
    Unavailable(String),
    #[error("discovery call timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("bad record at {key}: {message}")]
    BadRecord { key: String, message: String },
    #[error("{0}")]
    Other(String),
}

/// How an implementation ends a registration: deletes the record and stops
/// the keep-alive (see [`Registration::new`]).
pub type RegistrationStop =
    Box<dyn FnOnce() -> BoxFuture<'static, Result<(), DiscoveryError>> + Send>;

/// The process side of a registration. Dropping it stops the keep-alive
/// (the record then expires with its lease); [`Registration::deregister`]
/// removes it at once.
pub struct Registration {
    instance_id: String,
    state: watch::Receiver<RegistrationState>,
    /// In a mutex only so that a `Registration` can be shared (`Sync`).
    stop: std::sync::Mutex<Option<RegistrationStop>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("instance_id", &self.instance_id)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Registration {
    /// For implementations: `stop` deletes the record and ends the
    /// keep-alive; it runs on `deregister`, or (without waiting) on drop.
    pub fn new(
        instance_id: String,
        state: watch::Receiver<RegistrationState>,
        stop: RegistrationStop,
    ) -> Registration {
        Registration {
            instance_id,
            state,
            stop: std::sync::Mutex::new(Some(stop)),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Registered / lost / deregistered, live.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    pub fn is_registered(&self) -> bool {
        *self.state.borrow() == RegistrationState::Registered
    }

    /// Remove the record now and stop the keep-alive. Once is enough: a
    /// second call does nothing.
    pub async fn deregister(&self) -> Result<(), DiscoveryError> {
        let stop = self.take_stop();
        match stop {
            Some(stop) => stop().await,
            None => Ok(()),
        }
    }
}

impl Registration {
    fn take_stop(&self) -> Option<RegistrationStop> {
        crate::sync::lock(&self.stop).take()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(stop) = self.take_stop()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(stop());
        }
    }
}

/// What every process needs from discovery. Object safe; shared as
/// `Arc<dyn Discovery>`. Every call has a deadline.
pub trait Discovery: Send + Sync + 'static {
    fn scope(&self) -> &Scope;

    /// Publish `record` under a new lease kept alive in the background, by a
    /// task busy work cannot starve; re-registers by itself after a loss.
    fn register(
        &self,
        record: InstanceRecord,
    ) -> BoxFuture<'_, Result<Registration, DiscoveryError>>;

    /// The deployment's live instances; resynced in full after a
    /// disconnection, so a missed delete cannot leave a ghost.
    fn instances(&self) -> watch::Receiver<InstanceSet>;

    /// The deployment's router settings (`None` while the key is absent).
    fn settings(&self) -> watch::Receiver<Option<RouterSettings>>;

    /// Write the settings key (what the operator does; `up` and tests).
    fn put_settings(&self, settings: RouterSettings) -> BoxFuture<'_, Result<(), DiscoveryError>>;

    /// Acknowledge that `registration`'s process runs settings `generation`
    /// (under its lease, so the ack disappears with the process).
    fn ack_settings<'a>(
        &'a self,
        registration: &'a Registration,
        generation: i64,
    ) -> BoxFuture<'a, Result<(), DiscoveryError>>;
}
