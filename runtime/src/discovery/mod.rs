//! Discovery: who is alive in a deployment, what they offer, and the
//! deployment's router settings.
//!
//! Every xpyd process registers one [`InstanceRecord`] under a lease it keeps
//! alive in the background; everyone watches the live [`InstanceSet`] of its
//! deployment. Two implementations of [`Discovery`]: [`EtcdDiscovery`] (etcd,
//! what pods use) and [`MemoryDiscovery`] (in-process, for `xpyd-agent up`).
//!
//! The key layout and the records themselves are contracts shared with the
//! operator: they live in `xpyd-api` ([`xpyd_api::keys`]) and are
//! re-exported here.
//!
//! Not here: what the records are used for (router, workers).

use futures::future::BoxFuture;
use tokio::sync::watch;

mod etcd;
pub mod lifecycle;
mod memory;

pub use etcd::{EtcdDiscovery, EtcdOptions};
pub use lifecycle::Lifecycle;
pub use memory::MemoryDiscovery;
pub use xpyd_api::{
    Capacity, InstanceRecord, InstanceSet, Role, RouterSettings, RouterStrategy, Scope,
    TransferMetadata,
};

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
