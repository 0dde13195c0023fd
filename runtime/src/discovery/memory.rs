//! In-process discovery for `xpyd-agent up`, where every role runs in one
//! process: the same [`Discovery`] semantics as etcd, kept in watch channels.
//!
//! A registration here cannot be lost (there is no store to lose it to), so
//! its state only goes `Registered` → `Deregistered`. Deregistering or
//! dropping it removes the record (and its ack) at once, runtime or not.
//! Not for anything that spans processes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{
    Discovery, DiscoveryError, InstanceRecord, InstanceSet, Registration, RegistrationState,
    RegistrationStop, RouterSettings, Scope,
};

/// Discovery held in memory; share it as `Arc<dyn Discovery>`.
pub struct MemoryDiscovery {
    scope: Scope,
    shared: Arc<Shared>,
}

/// What registrations reach after the discovery itself may be gone.
struct Shared {
    /// Record owners by instance id: a registration removes the record only
    /// while it still owns it, so a re-registration under the same id is not
    /// removed by the old registration's drop.
    owners: Mutex<BTreeMap<String, u64>>,
    next_token: AtomicU64,
    instances: watch::Sender<InstanceSet>,
    settings: watch::Sender<Option<RouterSettings>>,
    /// Acknowledged settings generation by instance id.
    acks: watch::Sender<BTreeMap<String, i64>>,
}

impl Shared {
    fn owners(&self) -> MutexGuard<'_, BTreeMap<String, u64>> {
        crate::sync::lock(&self.owners)
    }

    fn remove(&self, instance_id: &str, token: u64) {
        let mut owners = self.owners();
        if owners.get(instance_id) != Some(&token) {
            return;
        }
        owners.remove(instance_id);
        self.instances.send_modify(|set| {
            Arc::make_mut(set).remove(instance_id);
        });
        self.acks
            .send_if_modified(|acks| acks.remove(instance_id).is_some());
    }
}

/// Removes its record when dropped, whether the stop closure ran or not.
struct RecordGuard {
    shared: Arc<Shared>,
    instance_id: String,
    token: u64,
    state: watch::Sender<RegistrationState>,
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        self.shared.remove(&self.instance_id, self.token);
        self.state.send_replace(RegistrationState::Deregistered);
    }
}

impl MemoryDiscovery {
    pub fn new(scope: Scope) -> Arc<MemoryDiscovery> {
        Arc::new(MemoryDiscovery {
            scope,
            shared: Arc::new(Shared {
                owners: Mutex::new(BTreeMap::new()),
                next_token: AtomicU64::new(0),
                instances: watch::channel(InstanceSet::default()).0,
                settings: watch::channel(None).0,
                acks: watch::channel(BTreeMap::new()).0,
            }),
        })
    }

    /// Acknowledged settings generations by instance id (what the operator
    /// would read from the ack keys), live.
    pub fn acks(&self) -> watch::Receiver<BTreeMap<String, i64>> {
        self.shared.acks.subscribe()
    }
}

impl Discovery for MemoryDiscovery {
    fn scope(&self) -> &Scope {
        &self.scope
    }

    fn register(
        &self,
        record: InstanceRecord,
    ) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        Box::pin(async move {
            let instance_id = record.instance_id.clone();
            let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
            {
                let mut owners = self.shared.owners();
                owners.insert(instance_id.clone(), token);
                self.shared.instances.send_modify(|set| {
                    Arc::make_mut(set).insert(instance_id.clone(), record);
                });
            }
            let (state_tx, state_rx) = watch::channel(RegistrationState::Registered);
            let guard = RecordGuard {
                shared: self.shared.clone(),
                instance_id: instance_id.clone(),
                token,
                state: state_tx,
            };
            // The guard is dropped inside the closure body, not in the
            // future, so `Registration`'s drop removes the record at once.
            let stop: RegistrationStop = Box::new(move || {
                drop(guard);
                Box::pin(async { Ok(()) })
            });
            Ok(Registration::new(instance_id, state_rx, stop))
        })
    }

    fn instances(&self) -> watch::Receiver<InstanceSet> {
        self.shared.instances.subscribe()
    }

    fn settings(&self) -> watch::Receiver<Option<RouterSettings>> {
        self.shared.settings.subscribe()
    }

    fn put_settings(&self, settings: RouterSettings) -> BoxFuture<'_, Result<(), DiscoveryError>> {
        Box::pin(async move {
            self.shared.settings.send_replace(Some(settings));
            Ok(())
        })
    }

    fn ack_settings<'a>(
        &'a self,
        registration: &'a Registration,
        generation: i64,
    ) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        // The registration as of the call, not as of the first poll.
        let id = registration.instance_id().to_string();
        let registered = registration.is_registered();
        Box::pin(async move {
            let id = id.as_str();
            // Holding the owners lock keeps a concurrent deregister from
            // slipping between the check and the write (no orphan ack).
            let owners = self.shared.owners();
            if !registered || !owners.contains_key(id) {
                return Err(DiscoveryError::Other(format!(
                    "instance {id} is not registered here"
                )));
            }
            self.shared.acks.send_modify(|acks| {
                acks.insert(id.to_string(), generation);
            });
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::discovery::Role;

    const DEADLINE: Duration = Duration::from_secs(5);

    fn record(id: &str, role: Role) -> InstanceRecord {
        InstanceRecord {
            instance_id: id.to_string(),
            role,
            model: "smol".to_string(),
            http_address: "127.0.0.1:8000".to_string(),
            transfer: None,
            capacity: None,
            devices: vec!["cpu".to_string()],
            kv_layout: None,
        }
    }

    fn discovery() -> Arc<MemoryDiscovery> {
        MemoryDiscovery::new(Scope::new("ns", "dep"))
    }

    #[tokio::test]
    async fn a_watcher_sees_registrations_and_their_records() {
        let d = discovery();
        let mut watcher = d.instances();
        let a = d.register(record("a", Role::Prefill)).await.unwrap();
        let _b = d.register(record("b", Role::Decode)).await.unwrap();
        assert!(a.is_registered());
        let set = tokio::time::timeout(DEADLINE, watcher.wait_for(|s| s.len() == 2))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(set["a"], record("a", Role::Prefill));
        assert_eq!(set["b"].role, Role::Decode);
    }

    #[tokio::test]
    async fn deregister_removes_the_record_and_its_ack() {
        let d = discovery();
        let a = d.register(record("a", Role::Decode)).await.unwrap();
        d.ack_settings(&a, 7).await.unwrap();
        assert_eq!(d.acks().borrow().get("a"), Some(&7));
        let state = a.state();
        a.deregister().await.unwrap();
        assert!(d.instances().borrow().is_empty());
        assert!(d.acks().borrow().is_empty());
        assert_eq!(*state.borrow(), RegistrationState::Deregistered);
    }

    #[tokio::test]
    async fn dropping_a_registration_removes_its_record_at_once() {
        let d = discovery();
        let a = d.register(record("a", Role::Frontend)).await.unwrap();
        d.ack_settings(&a, 1).await.unwrap();
        drop(a);
        assert!(d.instances().borrow().is_empty());
        assert!(d.acks().borrow().is_empty());
    }

    #[test]
    fn dropping_a_registration_outside_a_runtime_removes_its_record() {
        let d = discovery();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let a = rt.block_on(d.register(record("a", Role::Prefill))).unwrap();
        drop(rt);
        drop(a);
        assert!(d.instances().borrow().is_empty());
    }

    #[tokio::test]
    async fn an_old_registration_does_not_remove_a_newer_one_of_the_same_id() {
        let d = discovery();
        let old = d.register(record("a", Role::Decode)).await.unwrap();
        let _new = d.register(record("a", Role::Decode)).await.unwrap();
        drop(old);
        assert!(d.instances().borrow().contains_key("a"));
    }

    #[tokio::test]
    async fn settings_are_none_until_put_then_watched() {
        let d = discovery();
        let mut settings = d.settings();
        assert_eq!(*settings.borrow(), None);
        let s = RouterSettings {
            generation: 3,
            max_local_prefill_length: 100,
            ..RouterSettings::default()
        };
        d.put_settings(s.clone()).await.unwrap();
        let seen = tokio::time::timeout(DEADLINE, settings.wait_for(|s| s.is_some()))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(seen, Some(s));
    }

    #[tokio::test]
    async fn acks_keep_the_latest_generation_and_another_discovery_refuses_them() {
        let d = discovery();
        let a = d.register(record("a", Role::Decode)).await.unwrap();
        let b = d.register(record("b", Role::Decode)).await.unwrap();
        d.ack_settings(&a, 2).await.unwrap();
        d.ack_settings(&b, 2).await.unwrap();
        d.ack_settings(&a, 3).await.unwrap();
        assert_eq!(
            *d.acks().borrow(),
            BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 2)])
        );
        let other = MemoryDiscovery::new(Scope::new("ns", "other"));
        assert!(other.ack_settings(&a, 3).await.is_err());
    }
}
