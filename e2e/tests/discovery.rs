//! `EtcdDiscovery` against a real etcd: registrations, leases, watches,
//! settings and acks, through losses and an etcd restart.
//!
//! Leases are 2 s here (etcd's shortest with its default election timeout)
//! so expiry is quick; every wait has a deadline far above that, for a
//! loaded machine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tokio::sync::watch;
use xpyd_e2e::{Etcd, Tools, Workdir, wait_until};
use xpyd_runtime::discovery::{
    Discovery, EtcdDiscovery, EtcdOptions, InstanceRecord, InstanceSet, Registration,
    RegistrationState, Role, RouterSettings, RouterStrategy, Scope,
};

const DEADLINE: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(2);

struct Fixture {
    etcd: Etcd,
    scope: Scope,
    // Last: etcd must stop before its folder goes.
    _dir: Workdir,
}

impl Fixture {
    async fn start(name: &str) -> Fixture {
        let tools = Tools::locate().unwrap();
        let dir = Workdir::new(name).unwrap();
        let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
        Fixture {
            etcd,
            scope: Scope::new("ns", name),
            _dir: dir,
        }
    }

    async fn discovery(&self) -> Arc<EtcdDiscovery> {
        let options = EtcdOptions {
            lease_ttl: TTL,
            call_timeout: Duration::from_secs(2),
        };
        EtcdDiscovery::connect(&[self.etcd.endpoint()], self.scope.clone(), options)
            .await
            .unwrap()
    }

    async fn client(&self) -> Client {
        self.etcd.client().await.unwrap()
    }
}

fn record(id: &str, role: Role) -> InstanceRecord {
    InstanceRecord {
        instance_id: id.to_string(),
        role,
        model: "SmolLM2-135M-Instruct".to_string(),
        http_address: format!("127.0.0.1:{}", 8000 + id.len()),
        transfer: None,
        capacity: None,
        devices: vec!["cpu".to_string()],
        kv_layout: None,
    }
}

async fn wait_instances(
    rx: &mut watch::Receiver<InstanceSet>,
    what: &str,
    pred: impl FnMut(&InstanceSet) -> bool,
) -> InstanceSet {
    let got = tokio::time::timeout(DEADLINE, rx.wait_for(pred))
        .await
        .map(|r| r.map(|set| set.clone()));
    match got {
        Ok(set) => set.expect("discovery dropped its instance watch"),
        Err(_) => panic!(
            "timed out waiting for {what}; have {:?}",
            rx.borrow().keys()
        ),
    }
}

async fn wait_state(
    registration: &Registration,
    what: &str,
    pred: impl FnMut(&RegistrationState) -> bool,
) -> RegistrationState {
    let mut rx = registration.state();
    let got = tokio::time::timeout(DEADLINE, rx.wait_for(pred))
        .await
        .map(|r| r.map(|state| state.clone()));
    match got {
        Ok(state) => state.expect("registration dropped its state"),
        Err(_) => panic!("timed out waiting for {what}; state {:?}", rx.borrow()),
    }
}

fn ids(set: &InstanceSet) -> Vec<&str> {
    set.keys().map(String::as_str).collect()
}

/// The lease of `key` in etcd, or `None` when the key is absent.
async fn lease_of(client: &Client, key: &str) -> Option<i64> {
    let resp = client.kv_client().get(key, None).await.unwrap();
    resp.kvs().first().map(|kv| kv.lease())
}

async fn wait_key(client: &Client, key: &str, present: bool) {
    let kv = client.kv_client();
    wait_until(
        &format!("{key} to be {}", if present { "present" } else { "absent" }),
        DEADLINE,
        || {
            let mut kv = kv.clone();
            async move {
                Ok::<_, etcd_client::Error>((kv.get(key, None).await?.count() == 1) == present)
            }
        },
    )
    .await
    .unwrap();
}

/// Every state a registration passes through, as seen by a watcher task.
fn record_states(registration: &Registration) -> Arc<Mutex<Vec<RegistrationState>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut rx = registration.state();
    let log = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let state = rx.borrow_and_update().clone();
            log.lock().unwrap().push(state);
        }
    });
    seen
}

async fn wait_lost_then_registered(
    registration: &Registration,
    seen: &Mutex<Vec<RegistrationState>>,
) {
    wait_until("Lost, then Registered again", DEADLINE, || async {
        let seen = seen.lock().unwrap();
        let lost = seen
            .iter()
            .position(|s| matches!(s, RegistrationState::Lost(_)));
        Ok::<_, String>(lost.is_some_and(|i| seen[i..].contains(&RegistrationState::Registered)))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; saw {:?}", seen.lock().unwrap()));
    assert!(registration.is_registered());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registrations_are_seen_by_a_third_watcher_with_their_records() {
    let f = Fixture::start("disc-two").await;
    let (pa, pb, watcher) = (
        f.discovery().await,
        f.discovery().await,
        f.discovery().await,
    );
    let mut instances = watcher.instances();
    assert!(instances.borrow().is_empty());

    let a = pa
        .register(record("prefill-a", Role::Prefill))
        .await
        .unwrap();
    let b = pb.register(record("decode-b", Role::Decode)).await.unwrap();
    assert!(a.is_registered() && b.is_registered());

    let set = wait_instances(&mut instances, "both records", |s| s.len() == 2).await;
    assert_eq!(set["prefill-a"], record("prefill-a", Role::Prefill));
    assert_eq!(set["decode-b"], record("decode-b", Role::Decode));
    // Each under its own lease, at the documented key.
    let client = f.client().await;
    let la = lease_of(&client, &f.scope.instance_key(Role::Prefill, "prefill-a")).await;
    let lb = lease_of(&client, &f.scope.instance_key(Role::Decode, "decode-b")).await;
    assert!(la.is_some_and(|l| l != 0) && lb.is_some_and(|l| l != 0) && la != lb);

    // A discovery connected later starts from the full set.
    assert_eq!(
        ids(&f.discovery().await.instances().borrow()),
        ["decode-b", "prefill-a"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_removes_the_record_and_its_ack_at_once() {
    let f = Fixture::start("disc-dereg").await;
    let d = f.discovery().await;
    let client = f.client().await;
    let mut instances = d.instances();
    let a = d.register(record("decode-a", Role::Decode)).await.unwrap();
    let _b = d.register(record("decode-b", Role::Decode)).await.unwrap();
    wait_instances(&mut instances, "both records", |s| s.len() == 2).await;

    d.ack_settings(&a, 3).await.unwrap();
    let ack_key = f.scope.ack_key("decode-a");
    let ack = client
        .kv_client()
        .get(ack_key.as_str(), None)
        .await
        .unwrap();
    let ack = ack.kvs().first().expect("the ack is written");
    assert_eq!(ack.value(), br#"{"generation":3}"#);
    let record_key = f.scope.instance_key(Role::Decode, "decode-a");
    assert_eq!(Some(ack.lease()), lease_of(&client, &record_key).await);

    let state = a.state();
    a.deregister().await.unwrap();
    assert_eq!(*state.borrow(), RegistrationState::Deregistered);
    // At once: gone from etcd when deregister returns, not after the TTL.
    assert_eq!(lease_of(&client, &record_key).await, None);
    assert_eq!(lease_of(&client, &ack_key).await, None);
    let set = wait_instances(&mut instances, "decode-a to go", |s| s.len() == 1).await;
    assert_eq!(ids(&set), ["decode-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_registration_expires_with_its_lease() {
    let f = Fixture::start("disc-drop").await;
    let d = f.discovery().await;
    let mut instances = d.instances();
    let a = d.register(record("decode-a", Role::Decode)).await.unwrap();
    wait_instances(&mut instances, "decode-a", |s| s.contains_key("decode-a")).await;
    let client = f.client().await;
    let key = f.scope.instance_key(Role::Decode, "decode-a");
    let lease = lease_of(&client, &key).await.expect("record present");

    // Dropped where no runtime can run a deregister, as when a process
    // stops without one: only the keep-alive stops.
    std::thread::spawn(move || drop(a)).join().unwrap();
    wait_instances(&mut instances, "decode-a to expire", |s| s.is_empty()).await;
    // Expired, not deleted: etcd no longer knows the lease.
    let ttl = client
        .lease_client()
        .time_to_live(lease, None)
        .await
        .unwrap();
    assert_eq!(ttl.ttl(), -1, "lease {lease} still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_is_lost_then_registered_again_with_record_and_ack() {
    let f = Fixture::start("disc-revoke").await;
    let d = f.discovery().await;
    let client = f.client().await;
    let a = d.register(record("decode-a", Role::Decode)).await.unwrap();
    d.ack_settings(&a, 5).await.unwrap();
    let key = f.scope.instance_key(Role::Decode, "decode-a");
    let ack_key = f.scope.ack_key("decode-a");
    let old = lease_of(&client, &key).await.expect("record present");

    let seen = record_states(&a);
    client.lease_client().revoke(old).await.unwrap();
    wait_lost_then_registered(&a, &seen).await;

    let new = lease_of(&client, &key).await.expect("record put back");
    assert_ne!(new, old);
    assert_eq!(lease_of(&client, &ack_key).await, Some(new), "ack put back");
    let mut instances = d.instances();
    let set = wait_instances(&mut instances, "decode-a back", |s| {
        s.contains_key("decode-a")
    })
    .await;
    assert_eq!(set["decode-a"], record("decode-a", Role::Decode));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_deleted_behind_its_back_is_lost_then_put_back() {
    let f = Fixture::start("disc-delete").await;
    let d = f.discovery().await;
    let client = f.client().await;
    let a = d
        .register(record("prefill-a", Role::Prefill))
        .await
        .unwrap();
    let key = f.scope.instance_key(Role::Prefill, "prefill-a");

    let seen = record_states(&a);
    client.kv_client().delete(key.as_str(), None).await.unwrap();
    wait_lost_then_registered(&a, &seen).await;
    assert!(lease_of(&client, &key).await.is_some(), "record put back");
    let mut instances = d.instances();
    wait_instances(&mut instances, "prefill-a back", |s| {
        s.contains_key("prefill-a")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_is_survived_by_watches_and_registrations() {
    let mut f = Fixture::start("disc-restart").await;
    let (d, watcher) = (f.discovery().await, f.discovery().await);
    let client = f.client().await;
    let a = d.register(record("decode-a", Role::Decode)).await.unwrap();
    let b = d
        .register(record("prefill-b", Role::Prefill))
        .await
        .unwrap();
    // A record with no lease, deleted later while the watcher is cut off.
    let ghost_key = f.scope.instance_key(Role::Decode, "ghost");
    let ghost = serde_json::to_string(&record("ghost", Role::Decode)).unwrap();
    client
        .kv_client()
        .put(ghost_key.as_str(), ghost, None)
        .await
        .unwrap();
    let mut instances = watcher.instances();
    wait_instances(&mut instances, "three records", |s| s.len() == 3).await;

    f.etcd.kill();
    // Unreachable for longer than the TTL: both registrations say so.
    wait_state(&a, "decode-a Lost", |s| {
        matches!(s, RegistrationState::Lost(_))
    })
    .await;
    wait_state(&b, "prefill-b Lost", |s| {
        matches!(s, RegistrationState::Lost(_))
    })
    .await;
    f.etcd.restart().await.unwrap();

    // Delete the ghost and compact past it, so a watcher that only resumed
    // its watch would be refused and must read everything again.
    let client = f.client().await;
    let del = client
        .kv_client()
        .delete(ghost_key.as_str(), None)
        .await
        .unwrap();
    let late = serde_json::to_string(&record("late", Role::Frontend)).unwrap();
    let late_key = f.scope.instance_key(Role::Frontend, "late");
    client
        .kv_client()
        .put(late_key.as_str(), late, None)
        .await
        .unwrap();
    let rev = del.header().unwrap().revision();
    client.kv_client().compact(rev, None).await.unwrap();

    wait_state(&a, "decode-a back", |s| *s == RegistrationState::Registered).await;
    wait_state(&b, "prefill-b back", |s| {
        *s == RegistrationState::Registered
    })
    .await;
    let set = wait_instances(&mut instances, "decode-a, late, prefill-b", |s| {
        ids(s) == ["decode-a", "late", "prefill-b"]
    })
    .await;
    assert_eq!(set["decode-a"], record("decode-a", Role::Decode));

    // After the restart the watches still follow changes.
    b.deregister().await.unwrap();
    wait_instances(&mut instances, "prefill-b to go", |s| {
        ids(s) == ["decode-a", "late"]
    })
    .await;
    let all = client
        .kv_client()
        .get(
            f.scope.instances_prefix(),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(all.count(), 2);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_written_by_the_operator_are_watched() {
    let f = Fixture::start("disc-settings").await;
    let d = f.discovery().await;
    let client = f.client().await;
    let mut settings = d.settings();
    assert_eq!(*settings.borrow(), None);

    let operator_json = r#"{"generation":3,"strategy":"round_robin","maxLocalPrefillLength":100,"sessionHeader":"x","maxPrefillQueueDepth":8,"disaggregated":true}"#;
    client
        .kv_client()
        .put(f.scope.settings_key(), operator_json, None)
        .await
        .unwrap();
    let got = tokio::time::timeout(DEADLINE, settings.wait_for(|s| s.is_some()))
        .await
        .expect("settings within the deadline")
        .unwrap()
        .clone();
    assert_eq!(
        got,
        Some(RouterSettings {
            generation: 3,
            strategy: RouterStrategy::RoundRobin,
            max_local_prefill_length: 100,
            session_header: "x".to_string(),
            max_prefill_queue_depth: 8,
            disaggregated: true,
            ..RouterSettings::default()
        })
    );

    // Unreadable JSON is skipped: the next good write still arrives.
    let mut kv = client.kv_client();
    kv.put(f.scope.settings_key(), "{\"generation\":", None)
        .await
        .unwrap();
    let next = RouterSettings {
        generation: 4,
        kv_load_weight: 0.5,
        ..RouterSettings::default()
    };
    d.put_settings(next.clone()).await.unwrap();
    tokio::time::timeout(DEADLINE, settings.wait_for(|s| s.as_ref() == Some(&next)))
        .await
        .expect("generation 4 within the deadline")
        .unwrap();
    // What put_settings wrote is the operator's camelCase shape.
    let stored = kv.get(f.scope.settings_key(), None).await.unwrap();
    let value: serde_json::Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    assert_eq!(value["maxLocalPrefillLength"], 512);
    assert_eq!(value["generation"], 4);

    kv.delete(f.scope.settings_key(), None).await.unwrap();
    tokio::time::timeout(DEADLINE, settings.wait_for(|s| s.is_none()))
        .await
        .expect("settings gone within the deadline")
        .unwrap();
}

/// The runtime that registered is blocked for longer than the TTL (model
/// compute on it): the lease must live on, kept by its own thread.
#[tokio::test(flavor = "current_thread")]
async fn a_blocked_runtime_does_not_starve_the_keep_alive() {
    let f = Fixture::start("disc-starve").await;
    let d = f.discovery().await;
    let a = d.register(record("decode-a", Role::Decode)).await.unwrap();
    let client = f.client().await;
    let key = f.scope.instance_key(Role::Decode, "decode-a");
    let lease = lease_of(&client, &key).await.expect("record present");

    std::thread::sleep(TTL * 2);

    assert!(a.is_registered(), "{:?}", a.state().borrow());
    assert_eq!(
        lease_of(&client, &key).await,
        Some(lease),
        "same lease, still there"
    );
    a.deregister().await.unwrap();
    wait_key(&client, &key, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_stop_with_the_last_discovery_or_shutdown() {
    let f = Fixture::start("disc-owned").await;
    let d = f.discovery().await;
    let (mut instances, mut settings) = (d.instances(), d.settings());
    drop(d);
    // The watch tasks held the senders: their end closes the channels.
    let closed = tokio::time::timeout(DEADLINE, instances.changed()).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "instances watch still running"
    );
    let closed = tokio::time::timeout(DEADLINE, settings.changed()).await;
    assert!(matches!(closed, Ok(Err(_))), "settings watch still running");

    let d = f.discovery().await;
    let mut instances = d.instances();
    d.shutdown();
    let closed = tokio::time::timeout(DEADLINE, instances.changed()).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "instances watch still running"
    );
    // Registrations are the Registration's, not the discovery's.
    let a = d.register(record("decode-a", Role::Decode)).await.unwrap();
    drop(d);
    let client = f.client().await;
    let key = f.scope.instance_key(Role::Decode, "decode-a");
    assert!(lease_of(&client, &key).await.is_some());
    assert!(a.is_registered());
    a.deregister().await.unwrap();
    wait_key(&client, &key, false).await;
}
