//! One process's life in discovery, as every role lives it: register
//! (retrying until stopped, since discovery may come up after us), follow
//! the registration (readiness is "registered"; each settings generation is
//! acknowledged under the lease), then drain: stop acknowledging and remove
//! the record at once, so nobody routes here while work in flight finishes.
//!
//! Whether to acknowledge is [`generation_to_ack`], a pure function; the
//! rest is the I/O around it. Not here: what a role serves (workers,
//! frontend) or when it stops (the agent's signals).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Discovery, DiscoveryError, InstanceRecord, Registration, RegistrationState};
use crate::sync::lock;

/// Pause between registration attempts.
const REGISTER_RETRY: Duration = Duration::from_secs(1);
/// Pause before retrying a failed acknowledgement.
const ACK_RETRY: Duration = Duration::from_secs(5);

/// Resolves when `stop` turns true (or its sender goes).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The settings generation to acknowledge now, if any: the current one,
/// while registered, unless it is acknowledged already.
pub fn generation_to_ack(
    registered: bool,
    current: Option<i64>,
    acked: Option<i64>,
) -> Option<i64> {
    (registered && current != acked)
        .then_some(current)
        .flatten()
}

/// A registered process. Dropping it stops following and lets the record
/// expire with its lease; [`Lifecycle::deregister`] removes it at once.
pub struct Lifecycle {
    registration: Arc<Registration>,
    follower: Mutex<Option<JoinHandle<()>>>,
}

impl Lifecycle {
    /// Registers `record`, retrying until `stop`, then keeps `ready` equal
    /// to "registered" and acknowledges each settings generation.
    pub async fn register(
        discovery: Arc<dyn Discovery>,
        record: InstanceRecord,
        ready: watch::Sender<bool>,
        stop: watch::Receiver<bool>,
    ) -> Result<Lifecycle, DiscoveryError> {
        let registration = loop {
            match discovery.register(record.clone()).await {
                Ok(r) => break Arc::new(r),
                Err(e) if !*stop.borrow() => {
                    tracing::warn!("registering {} failed: {e}; retrying", record.instance_id);
                    tokio::time::sleep(REGISTER_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        };
        let follower = tokio::spawn(follow(discovery, registration.clone(), ready, stop));
        Ok(Lifecycle {
            registration,
            follower: Mutex::new(Some(follower)),
        })
    }

    pub fn instance_id(&self) -> &str {
        self.registration.instance_id()
    }

    /// Registered / lost / deregistered, live.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.registration.state()
    }

    /// Waits for `stop`, then deregisters: the start of a drain.
    pub async fn drain_on(&self, stop: watch::Receiver<bool>) {
        stopped(stop).await;
        self.deregister().await;
    }

    /// Stops acknowledging and removes the record now. Failures are logged:
    /// the record then expires with its lease.
    pub async fn deregister(&self) {
        let follower = lock(&self.follower).take();
        if let Some(follower) = follower {
            follower.abort();
            let _ = follower.await;
        }
        let id = self.instance_id();
        match self.registration.deregister().await {
            Ok(()) => tracing::info!(instance = %id, "deregistered; draining"),
            Err(e) => tracing::warn!(instance = %id, "deregistering failed: {e}"),
        }
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        if let Some(follower) = lock(&self.follower).take() {
            follower.abort();
        }
    }
}

/// Keeps `ready` equal to "registered" and acknowledges each settings
/// generation this process applies. Ends with `stop`.
async fn follow(
    discovery: Arc<dyn Discovery>,
    registration: Arc<Registration>,
    ready: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
) {
    let mut state = registration.state();
    let mut settings = discovery.settings();
    let mut acked = None;
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        let registered = *state.borrow_and_update() == RegistrationState::Registered;
        ready.send_replace(registered);
        let generation = settings.borrow_and_update().as_ref().map(|s| s.generation);
        if let Some(g) = generation_to_ack(registered, generation, acked) {
            match discovery.ack_settings(&registration, g).await {
                Ok(()) => acked = Some(g),
                Err(e) => tracing::warn!("acknowledging settings generation {g} failed: {e}"),
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            r = state.changed() => if r.is_err() { return },
            r = settings.changed() => if r.is_err() { return },
            // Retry a failed ack.
            _ = tokio::time::sleep(ACK_RETRY), if generation != acked => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{MemoryDiscovery, Role, RouterSettings, Scope};

    const DEADLINE: Duration = Duration::from_secs(10);

    #[test]
    fn only_a_new_generation_is_acknowledged_and_only_while_registered() {
        let table = [
            (true, Some(3), None, Some(3)),
            (true, Some(3), Some(2), Some(3)),
            (true, Some(3), Some(3), None),
            (true, None, None, None),
            (true, None, Some(3), None),
            (false, Some(3), None, None),
            (false, Some(3), Some(2), None),
        ];
        for (registered, current, acked, want) in table {
            assert_eq!(
                generation_to_ack(registered, current, acked),
                want,
                "registered {registered}, current {current:?}, acked {acked:?}"
            );
        }
    }

    fn record(id: &str) -> InstanceRecord {
        InstanceRecord {
            instance_id: id.to_string(),
            role: Role::Decode,
            model: "m".to_string(),
            http_address: "127.0.0.1:1".to_string(),
            transfer: None,
            capacity: None,
            devices: Vec::new(),
            kv_layout: None,
        }
    }

    #[tokio::test]
    async fn registered_ready_acknowledged_then_deregistered_by_reference() {
        let memory = MemoryDiscovery::new(Scope::new("ns", "dep"));
        let discovery: Arc<dyn Discovery> = memory.clone();
        let (ready_tx, mut ready) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let life = Lifecycle::register(discovery.clone(), record("a"), ready_tx, stop.clone())
            .await
            .unwrap();
        tokio::time::timeout(DEADLINE, ready.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
        discovery
            .put_settings(RouterSettings {
                generation: 4,
                ..RouterSettings::default()
            })
            .await
            .unwrap();
        let mut acks = memory.acks();
        tokio::time::timeout(DEADLINE, acks.wait_for(|a| a.get("a") == Some(&4)))
            .await
            .unwrap()
            .unwrap();

        // Shared by reference (as a drain future and its owner share it).
        let drain = life.drain_on(stop);
        stop_tx.send_replace(true);
        drain.await;
        assert_eq!(*life.state().borrow(), RegistrationState::Deregistered);
        assert!(memory.instances().borrow().is_empty());
        assert!(memory.acks().borrow().is_empty());
        // Twice is harmless.
        life.deregister().await;
    }
}
