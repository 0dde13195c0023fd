//! Discovery on etcd: what pods use.
//!
//! Each [`Registration`] owns one lease, kept alive every TTL/3 by its own OS
//! thread running its own single-threaded tokio runtime and etcd client, so
//! model compute that hogs the main runtime cannot let the lease expire. A
//! lost lease (expired, revoked, record deleted, or etcd unreachable for a
//! TTL) is reported as `Lost` and repaired with a new lease; `Registered`
//! is only reported after the record was written.
//!
//! The instance set and the settings are mirrored by tasks on the caller's
//! runtime: a get, then a watch from the next revision; after any watch
//! failure they get everything again and replace what they had, so a delete
//! missed while disconnected cannot leave a ghost. The tasks stop when the
//! last `Arc<EtcdDiscovery>` is dropped or on [`EtcdDiscovery::shutdown`].
//! Not here: the operator's side of the keys.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::{
    Discovery, DiscoveryError, InstanceRecord, InstanceSet, Registration, RegistrationState,
    RegistrationStop, RouterSettings, Scope,
};
use crate::sync::lock;

/// Lease and deadline settings of an [`EtcdDiscovery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdOptions {
    /// How long a record outlives its process's last keep-alive. etcd
    /// counts in whole seconds (at least 2 with its default election timeout).
    pub lease_ttl: Duration,
    /// Deadline of each call to etcd.
    pub call_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            lease_ttl: Duration::from_secs(10),
            call_timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdOptions {
    fn ttl_secs(&self) -> i64 {
        // Round up: a shorter lease than asked for would expire early.
        let secs = self.lease_ttl.as_secs() + u64::from(self.lease_ttl.subsec_nanos() > 0);
        i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
    }
}

/// Discovery on an etcd cluster; share it as `Arc<dyn Discovery>`.
pub struct EtcdDiscovery {
    scope: Scope,
    endpoints: Vec<String>,
    options: EtcdOptions,
    client: Client,
    instances: watch::Receiver<InstanceSet>,
    settings: watch::Receiver<Option<RouterSettings>>,
    /// Command channels of this discovery's registrations, by instance id,
    /// for `ack_settings`. Weak, so only the `Registration` keeps its
    /// keep-alive thread running.
    registrations: Mutex<HashMap<String, mpsc::WeakUnboundedSender<Command>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("scope", &self.scope)
            .field("endpoints", &self.endpoints)
            .field("options", &self.options)
            .finish()
    }
}

impl EtcdDiscovery {
    /// Connects, reads the instances and settings once (so the receivers
    /// hold real values from the start), and starts watching them on the
    /// current runtime. Fails when etcd does not answer within the call
    /// deadline; callers decide whether to retry.
    pub async fn connect(
        endpoints: &[String],
        scope: Scope,
        options: EtcdOptions,
    ) -> Result<Arc<EtcdDiscovery>, DiscoveryError> {
        let client = new_client(endpoints, &options).await?;

        let instances_mirror = Mirror {
            client: client.clone(),
            key: scope.instances_prefix(),
            prefix: true,
            call_timeout: options.call_timeout,
        };
        let settings_mirror = Mirror {
            client: client.clone(),
            key: scope.settings_key(),
            prefix: false,
            call_timeout: options.call_timeout,
        };

        let (instances_tx, instances_rx) = watch::channel(InstanceSet::default());
        let mut instances = InstancesView {
            by_key: BTreeMap::new(),
            tx: instances_tx,
        };
        let instances_rev = instances_mirror.resync(&mut |c| instances.apply(c)).await?;

        let (settings_tx, settings_rx) = watch::channel(None);
        let mut settings = SettingsView { tx: settings_tx };
        let settings_rev = settings_mirror.resync(&mut |c| settings.apply(c)).await?;

        let tasks = vec![
            tokio::spawn(instances_mirror.run(instances_rev, move |c| instances.apply(c))),
            tokio::spawn(settings_mirror.run(settings_rev, move |c| settings.apply(c))),
        ];
        Ok(Arc::new(EtcdDiscovery {
            scope,
            endpoints: endpoints.to_vec(),
            options,
            client,
            instances: instances_rx,
            settings: settings_rx,
            registrations: Mutex::new(HashMap::new()),
            tasks: Mutex::new(tasks),
        }))
    }

    /// Stops watching. The receivers keep their last values; registrations
    /// are not affected (they stop with their `Registration`).
    pub fn shutdown(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }

    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn new_client(endpoints: &[String], options: &EtcdOptions) -> Result<Client, DiscoveryError> {
    // No per-request timeout here: it would also cut long-lived watch
    // streams. Calls get their deadline from `call` instead. HTTP/2 pings
    // find a dead connection under a watch; etcd refuses pings more often
    // than every 5 s by default.
    // Requiring a leader makes a member cut off from its cluster fail our
    // calls and end our watches instead of serving stale data quietly.
    let connect = ConnectOptions::new()
        .with_require_leader(true)
        .with_connect_timeout(options.call_timeout)
        .with_keep_alive(Duration::from_secs(10), options.call_timeout);
    call(
        options.call_timeout,
        Client::connect(endpoints, Some(connect)),
    )
    .await
}

/// One etcd call under a deadline.
async fn call<T>(
    deadline: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(DiscoveryError::Unavailable(e.to_string())),
        Err(_) => Err(DiscoveryError::Timeout(deadline)),
    }
}

/// Exponential retry delay, so an etcd outage is not hammered.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Self::FIRST,
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// One key and its value, as read or watched.
struct Entry<'a> {
    key: String,
    value: &'a [u8],
}

impl<'a> From<&'a KeyValue> for Entry<'a> {
    fn from(kv: &'a KeyValue) -> Self {
        Entry {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value(),
        }
    }
}

/// A change to mirrored keys.
enum Change<'a> {
    /// Everything under the key now (after a full read).
    Reset(Vec<Entry<'a>>),
    Put(Entry<'a>),
    Delete(String),
}

/// Keeps a local copy of one key or prefix in step with etcd.
struct Mirror {
    client: Client,
    key: String,
    prefix: bool,
    call_timeout: Duration,
}

impl Mirror {
    /// Reads everything and hands it over as a reset; returns the revision
    /// read at, from which the watch continues.
    async fn resync(&self, apply: &mut impl FnMut(Change<'_>)) -> Result<i64, DiscoveryError> {
        let options = self.prefix.then(|| GetOptions::new().with_prefix());
        let mut kv = self.client.kv_client();
        let resp = call(self.call_timeout, kv.get(self.key.as_str(), options)).await?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| DiscoveryError::Other("etcd get answered without a header".into()))?;
        apply(Change::Reset(resp.kvs().iter().map(Entry::from).collect()));
        Ok(revision)
    }

    /// Watches from `revision + 1`; on any failure, backs off, resyncs in
    /// full and watches again. Runs until aborted.
    async fn run(self, revision: i64, mut apply: impl FnMut(Change<'_>)) {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let mut synced = Some(revision);
        loop {
            let revision = match synced.take() {
                Some(r) => r,
                None => match self.resync(&mut apply).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(key = %self.key, error = %e, "etcd resync failed; retrying");
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                },
            };
            let opened = Instant::now();
            if let Err(e) = self.watch_from(revision + 1, &mut apply).await {
                tracing::warn!(key = %self.key, error = %e, "etcd watch ended; resyncing");
            }
            // A watch that held for a while was a healthy one: start the
            // backoff afresh rather than where the last outage left it.
            if opened.elapsed() > Duration::from_secs(10) {
                backoff.reset();
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// Applies watch events until the watch fails; always returns an error
    /// (a watch has no normal end).
    async fn watch_from(
        &self,
        start: i64,
        apply: &mut impl FnMut(Change<'_>),
    ) -> Result<(), DiscoveryError> {
        let mut options = WatchOptions::new().with_start_revision(start);
        if self.prefix {
            options = options.with_prefix();
        }
        let mut watch_client = self.client.watch_client();
        let mut stream = call(
            self.call_timeout,
            watch_client.watch(self.key.as_str(), Some(options)),
        )
        .await?;
        loop {
            let resp = stream
                .message()
                .await
                .map_err(|e| DiscoveryError::Unavailable(e.to_string()))?
                .ok_or_else(|| DiscoveryError::Unavailable("watch stream closed".into()))?;
            if resp.canceled() {
                return Err(DiscoveryError::Unavailable(format!(
                    "watch canceled (compacted at {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => apply(Change::Put(kv.into())),
                    EventType::Delete => apply(Change::Delete(Entry::from(kv).key)),
                }
            }
        }
    }
}

/// The instance set, built from the records under the instances prefix.
struct InstancesView {
    by_key: BTreeMap<String, InstanceRecord>,
    tx: watch::Sender<InstanceSet>,
}

impl InstancesView {
    fn apply(&mut self, change: Change<'_>) {
        match change {
            Change::Reset(entries) => {
                self.by_key = entries
                    .into_iter()
                    .filter_map(|e| Some((e.key.clone(), parse_record(&e)?)))
                    .collect();
            }
            Change::Put(entry) => match parse_record(&entry) {
                Some(record) => {
                    self.by_key.insert(entry.key, record);
                }
                // The key no longer holds a usable record: drop the old one.
                None => {
                    self.by_key.remove(&entry.key);
                }
            },
            Change::Delete(key) => {
                self.by_key.remove(&key);
            }
        }
        let set: BTreeMap<String, InstanceRecord> = self
            .by_key
            .values()
            .map(|r| (r.instance_id.clone(), r.clone()))
            .collect();
        self.tx.send_if_modified(|current| {
            if **current == set {
                return false;
            }
            *current = Arc::new(set);
            true
        });
    }
}

fn parse_record(entry: &Entry<'_>) -> Option<InstanceRecord> {
    match serde_json::from_slice(entry.value) {
        Ok(record) => Some(record),
        Err(e) => {
            tracing::warn!(key = %entry.key, error = %e, "skipping unreadable instance record");
            None
        }
    }
}

/// The router settings from the settings key.
struct SettingsView {
    tx: watch::Sender<Option<RouterSettings>>,
}

impl SettingsView {
    fn apply(&mut self, change: Change<'_>) {
        let entry = match change {
            Change::Reset(entries) => entries.into_iter().next(),
            Change::Put(entry) => Some(entry),
            Change::Delete(_) => None,
        };
        let next = match entry {
            None => None,
            Some(entry) => match serde_json::from_slice(entry.value) {
                Ok(settings) => Some(settings),
                Err(e) => {
                    // Keep routing by the last good settings rather than
                    // fall back to defaults the operator never asked for.
                    tracing::warn!(key = %entry.key, error = %e, "ignoring unreadable router settings");
                    return;
                }
            },
        };
        self.tx.send_if_modified(|current| {
            if *current == next {
                return false;
            }
            *current = next;
            true
        });
    }
}

/// Requests from the process side to a registration's keep-alive thread.
enum Command {
    Ack {
        generation: i64,
        reply: oneshot::Sender<Result<(), DiscoveryError>>,
    },
    Deregister {
        reply: oneshot::Sender<Result<(), DiscoveryError>>,
    },
}

impl Discovery for EtcdDiscovery {
    fn scope(&self) -> &Scope {
        &self.scope
    }

    fn register(
        &self,
        record: InstanceRecord,
    ) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        Box::pin(async move {
            let instance_id = record.instance_id.clone();
            let value = serde_json::to_string(&record)
                .map_err(|e| DiscoveryError::Other(format!("encode record: {e}")))?;
            let (commands_tx, commands_rx) = mpsc::unbounded_channel();
            let (state_tx, state_rx) =
                watch::channel(RegistrationState::Lost("registering".to_string()));
            let (ready_tx, ready_rx) = oneshot::channel();
            let keeper = LeaseKeeper {
                endpoints: self.endpoints.clone(),
                options: self.options,
                record_key: self.scope.instance_key(record.role, &instance_id),
                record_value: value,
                ack_key: self.scope.ack_key(&instance_id),
                ack: None,
                lease: None,
                client: None,
                state: state_tx,
            };
            std::thread::Builder::new()
                .name(format!("xpyd-lease-{instance_id}"))
                .spawn(move || keeper.run_on_own_runtime(commands_rx, ready_tx))
                .map_err(|e| DiscoveryError::Other(format!("start keep-alive thread: {e}")))?;

            // Connect, grant and put: three calls.
            let deadline = self.options.call_timeout * 3;
            match tokio::time::timeout(deadline, ready_rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) => {
                    return Err(DiscoveryError::Other(
                        "keep-alive thread ended before registering".into(),
                    ));
                }
                // Dropping `commands_tx` on return ends the thread.
                Err(_) => return Err(DiscoveryError::Timeout(deadline)),
            }

            {
                let mut registrations = lock(&self.registrations);
                registrations.retain(|_, tx| tx.strong_count() > 0);
                registrations.insert(instance_id.clone(), commands_tx.downgrade());
            }
            // A delete and a revoke (the command interrupts other work).
            let stop_deadline = self.options.call_timeout * 3;
            let stop: RegistrationStop = Box::new(move || {
                Box::pin(async move {
                    let (reply, answer) = oneshot::channel();
                    if commands_tx.send(Command::Deregister { reply }).is_err() {
                        return Ok(());
                    }
                    match tokio::time::timeout(stop_deadline, answer).await {
                        Ok(Ok(result)) => result,
                        Ok(Err(_)) => Err(DiscoveryError::Other(
                            "keep-alive thread ended while deregistering".into(),
                        )),
                        Err(_) => Err(DiscoveryError::Timeout(stop_deadline)),
                    }
                })
            });
            Ok(Registration::new(instance_id, state_rx, stop))
        })
    }

    fn instances(&self) -> watch::Receiver<InstanceSet> {
        self.instances.clone()
    }

    fn settings(&self) -> watch::Receiver<Option<RouterSettings>> {
        self.settings.clone()
    }

    fn put_settings(&self, settings: RouterSettings) -> BoxFuture<'_, Result<(), DiscoveryError>> {
        Box::pin(async move {
            let value = serde_json::to_string(&settings)
                .map_err(|e| DiscoveryError::Other(format!("encode settings: {e}")))?;
            let mut kv = self.client.kv_client();
            call(
                self.options.call_timeout,
                kv.put(self.scope.settings_key(), value, None),
            )
            .await?;
            Ok(())
        })
    }

    fn ack_settings<'a>(
        &'a self,
        registration: &'a Registration,
        generation: i64,
    ) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        let id = registration.instance_id().to_string();
        Box::pin(async move {
            let id = id.as_str();
            let commands = lock(&self.registrations)
                .get(id)
                .and_then(|tx| tx.upgrade())
                .ok_or_else(|| {
                    DiscoveryError::Other(format!("instance {id} is not registered here"))
                })?;
            let (reply, answer) = oneshot::channel();
            commands
                .send(Command::Ack { generation, reply })
                .map_err(|_| DiscoveryError::Other(format!("instance {id} was deregistered")))?;
            let deadline = self.options.call_timeout * 3;
            match tokio::time::timeout(deadline, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(DiscoveryError::Other(format!(
                    "instance {id} was deregistered"
                ))),
                Err(_) => Err(DiscoveryError::Timeout(deadline)),
            }
        })
    }
}

/// Why a keep-alive check failed.
enum CheckFailure {
    /// The lease or the record is gone from etcd: re-register now.
    Gone(String),
    /// etcd did not answer: the lease may still be alive.
    Unreachable(DiscoveryError),
}

/// What interrupted or finished the keep-alive thread's work.
enum Work {
    Checked(Result<(), CheckFailure>),
    Established(Result<(), DiscoveryError>),
    Interrupted(Option<Command>),
}

/// The keep-alive thread's state: one lease, the record and the ack under it.
struct LeaseKeeper {
    endpoints: Vec<String>,
    options: EtcdOptions,
    record_key: String,
    record_value: String,
    ack_key: String,
    /// The last generation acknowledged, re-written with each new lease.
    ack: Option<i64>,
    lease: Option<i64>,
    /// Created on this thread's runtime: a client's connection tasks run on
    /// the runtime that made it, and the main one may be busy.
    client: Option<Client>,
    state: watch::Sender<RegistrationState>,
}

impl LeaseKeeper {
    fn run_on_own_runtime(
        self,
        commands: mpsc::UnboundedReceiver<Command>,
        ready: oneshot::Sender<Result<(), DiscoveryError>>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(DiscoveryError::Other(format!(
                    "keep-alive runtime: {e}"
                ))));
                return;
            }
        };
        runtime.block_on(self.run(commands, ready));
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        ready: oneshot::Sender<Result<(), DiscoveryError>>,
    ) {
        let first = self.establish().await;
        let failed = first.is_err();
        if ready.send(first).is_err() {
            // `register` gave up waiting: take back what it no longer owns.
            let _ = self.remove().await;
            return;
        }
        if failed {
            return;
        }

        let ttl = self.options.lease_ttl;
        let interval = ttl / 3;
        let mut backoff = Backoff::new(interval.max(Duration::from_millis(200)));
        let mut last_ok = Instant::now();
        let mut next_at = tokio::time::Instant::now() + interval;
        loop {
            // Wait for the next check, or a command.
            let mut command = tokio::select! {
                command = commands.recv() => Some(command),
                _ = tokio::time::sleep_until(next_at) => None,
            };

            if command.is_none() {
                // A check or re-registration may take a few call deadlines
                // against a dead etcd; a command cuts it short (cancelling
                // either is safe: see `remove`).
                let work = if self.is_registered() {
                    tokio::select! {
                        r = self.check() => Work::Checked(r),
                        c = commands.recv() => Work::Interrupted(c),
                    }
                } else {
                    tokio::select! {
                        r = self.establish() => Work::Established(r),
                        c = commands.recv() => Work::Interrupted(c),
                    }
                };
                match work {
                    Work::Interrupted(c) => command = Some(c),
                    Work::Checked(Ok(())) => {
                        last_ok = Instant::now();
                        backoff.reset();
                        next_at = tokio::time::Instant::now() + interval;
                    }
                    Work::Checked(Err(failure)) => {
                        match failure {
                            CheckFailure::Gone(reason) => self.lose(reason),
                            CheckFailure::Unreachable(e) if last_ok.elapsed() >= ttl => {
                                self.lose(format!("etcd unreachable for {ttl:?}: {e}"));
                            }
                            CheckFailure::Unreachable(e) => {
                                tracing::debug!(key = %self.record_key, error = %e, "keep-alive failed; retrying");
                            }
                        }
                        // After a loss, wait the backoff before
                        // re-registering: something that keeps deleting the
                        // record (an operator's cleanup) must not meet a hot
                        // loop. Only a healthy check resets the backoff.
                        next_at = tokio::time::Instant::now()
                            + if self.is_registered() {
                                interval
                            } else {
                                backoff.next()
                            };
                    }
                    Work::Established(Ok(())) => {
                        tracing::info!(key = %self.record_key, "registered again");
                        last_ok = Instant::now();
                        next_at = tokio::time::Instant::now() + interval;
                    }
                    Work::Established(Err(e)) => {
                        tracing::debug!(key = %self.record_key, error = %e, "re-registering failed; retrying");
                        next_at = tokio::time::Instant::now() + backoff.next();
                    }
                }
            }

            match command {
                None => {}
                // The Registration was dropped without a runtime to
                // deregister on: stop keeping alive, the lease expires.
                Some(None) => return,
                Some(Some(Command::Deregister { reply })) => {
                    let result = self.remove().await;
                    self.state.send_replace(RegistrationState::Deregistered);
                    let _ = reply.send(result);
                    return;
                }
                Some(Some(Command::Ack { generation, reply })) => {
                    self.ack = Some(generation);
                    let _ = reply.send(self.put_ack().await);
                }
            }
        }
    }

    fn is_registered(&self) -> bool {
        *self.state.borrow() == RegistrationState::Registered
    }

    fn lose(&mut self, reason: String) {
        tracing::warn!(key = %self.record_key, %reason, "registration lost; re-registering");
        self.state.send_replace(RegistrationState::Lost(reason));
    }

    async fn client(&mut self) -> Result<Client, DiscoveryError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let client = new_client(&self.endpoints, &self.options).await?;
        self.client = Some(client.clone());
        Ok(client)
    }

    /// A new lease with the record (and the last ack) under it; the old
    /// lease, if any, is revoked once nothing of ours is attached to it.
    async fn establish(&mut self) -> Result<(), DiscoveryError> {
        let deadline = self.options.call_timeout;
        let client = self.client().await?;
        let lease = call(
            deadline,
            client.lease_client().grant(self.options.ttl_secs(), None),
        )
        .await?
        .id();
        let mut ops = vec![TxnOp::put(
            self.record_key.as_str(),
            self.record_value.as_str(),
            Some(PutOptions::new().with_lease(lease)),
        )];
        if let Some(generation) = self.ack {
            ops.push(TxnOp::put(
                self.ack_key.as_str(),
                ack_value(generation),
                Some(PutOptions::new().with_lease(lease)),
            ));
        }
        if let Err(e) = call(deadline, client.kv_client().txn(Txn::new().and_then(ops))).await {
            let _ = call(deadline, client.lease_client().revoke(lease)).await;
            return Err(e);
        }
        if let Some(old) = self.lease.replace(lease) {
            // Usually already gone with the loss; best effort.
            let _ = call(deadline, client.lease_client().revoke(old)).await;
        }
        self.state.send_replace(RegistrationState::Registered);
        Ok(())
    }

    /// One keep-alive, then a look at the record itself: a record deleted
    /// behind our back leaves the lease alive, and must still count as lost.
    async fn check(&mut self) -> Result<(), CheckFailure> {
        // A keep-alive slower than its interval is as good as none: the
        // next one is due.
        let deadline = self
            .options
            .call_timeout
            .min(self.options.lease_ttl / 3)
            .max(Duration::from_millis(200));
        let Some(lease) = self.lease else {
            return Err(CheckFailure::Gone("no lease".into()));
        };
        let client = self.client().await.map_err(CheckFailure::Unreachable)?;
        match tokio::time::timeout(deadline, client.lease_client().keep_alive(lease)).await {
            Ok(Ok(_)) => {}
            // etcd-client's word for a keep-alive answered with TTL 0.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                return Err(CheckFailure::Gone("lease expired or revoked".into()));
            }
            Ok(Err(e)) => {
                return Err(CheckFailure::Unreachable(DiscoveryError::Unavailable(
                    e.to_string(),
                )));
            }
            Err(_) => return Err(CheckFailure::Unreachable(DiscoveryError::Timeout(deadline))),
        }
        let resp = call(
            deadline,
            client.kv_client().get(self.record_key.as_str(), None),
        )
        .await
        .map_err(CheckFailure::Unreachable)?;
        match resp.kvs().first() {
            Some(kv) if kv.lease() == lease => Ok(()),
            Some(_) => Err(CheckFailure::Gone(
                "record rewritten under another lease".into(),
            )),
            None => Err(CheckFailure::Gone("record deleted from etcd".into())),
        }
    }

    async fn put_ack(&mut self) -> Result<(), DiscoveryError> {
        let (Some(lease), Some(generation)) = (self.lease, self.ack) else {
            return Ok(());
        };
        if !self.is_registered() {
            return Err(DiscoveryError::Unavailable(
                "registration lost; the ack is written when it is back".into(),
            ));
        }
        let client = self.client().await?;
        call(
            self.options.call_timeout,
            client.kv_client().put(
                self.ack_key.as_str(),
                ack_value(generation),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    /// Deletes the record and the ack, then revokes the lease. The keys are
    /// deleted by name, so this is right even after an `establish` cut
    /// short between its put and taking the new lease (that lease then
    /// expires with nothing under it).
    async fn remove(&mut self) -> Result<(), DiscoveryError> {
        let deadline = self.options.call_timeout;
        let client = self.client().await?;
        let ops = vec![
            TxnOp::delete(self.record_key.as_str(), None::<DeleteOptions>),
            TxnOp::delete(self.ack_key.as_str(), None::<DeleteOptions>),
        ];
        let deleted = call(deadline, client.kv_client().txn(Txn::new().and_then(ops))).await;
        if let Some(lease) = self.lease.take() {
            // Not found is fine: a lost lease is already gone.
            let _ = call(deadline, client.lease_client().revoke(lease)).await;
        }
        deleted.map(|_| ())
    }
}

fn ack_value(generation: i64) -> String {
    xpyd_api::RouterAck { generation }.encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Role, RouterStrategy};

    fn entry<'a>(key: &str, value: &'a [u8]) -> Entry<'a> {
        Entry {
            key: key.to_string(),
            value,
        }
    }

    fn record_json(id: &str) -> Vec<u8> {
        serde_json::to_vec(&InstanceRecord {
            instance_id: id.to_string(),
            role: Role::Decode,
            model: "smol".to_string(),
            http_address: "127.0.0.1:1".to_string(),
            transfer: None,
            capacity: None,
            devices: vec![],
            kv_layout: None,
        })
        .unwrap()
    }

    #[test]
    fn a_reset_replaces_every_instance_and_skips_unreadable_records() {
        let (tx, rx) = watch::channel(InstanceSet::default());
        let mut view = InstancesView {
            by_key: BTreeMap::new(),
            tx,
        };
        let (a, b, c) = (record_json("a"), record_json("b"), record_json("c"));
        view.apply(Change::Reset(vec![entry("/i/a", &a), entry("/i/b", &b)]));
        assert_eq!(rx.borrow().keys().collect::<Vec<_>>(), ["a", "b"]);
        // A full read after an outage: b's delete was missed, c is new.
        view.apply(Change::Reset(vec![
            entry("/i/a", &a),
            entry("/i/c", &c),
            entry("/i/bad", b"{not json"),
        ]));
        assert_eq!(rx.borrow().keys().collect::<Vec<_>>(), ["a", "c"]);
        view.apply(Change::Put(entry("/i/a", b"[]")));
        view.apply(Change::Delete("/i/c".to_string()));
        assert!(rx.borrow().is_empty());
    }

    #[test]
    fn unreadable_settings_keep_the_last_good_ones() {
        let (tx, rx) = watch::channel(None);
        let mut view = SettingsView { tx };
        view.apply(Change::Reset(vec![]));
        assert_eq!(*rx.borrow(), None);
        view.apply(Change::Put(entry(
            "/router",
            br#"{"generation":3,"strategy":"round_robin","unknown":1}"#,
        )));
        let good = RouterSettings {
            generation: 3,
            strategy: RouterStrategy::RoundRobin,
            ..RouterSettings::default()
        };
        assert_eq!(*rx.borrow(), Some(good.clone()));
        view.apply(Change::Put(entry("/router", b"{\"generation\":")));
        assert_eq!(*rx.borrow(), Some(good));
        view.apply(Change::Delete("/router".to_string()));
        assert_eq!(*rx.borrow(), None);
    }

    #[test]
    fn lease_ttls_round_up_to_whole_seconds() {
        let ttl = |ms| {
            EtcdOptions {
                lease_ttl: Duration::from_millis(ms),
                ..EtcdOptions::default()
            }
            .ttl_secs()
        };
        assert_eq!((ttl(0), ttl(1500), ttl(2000), ttl(10_000)), (1, 2, 2, 10));
    }

    #[test]
    fn acks_are_the_json_the_operator_reads() {
        assert_eq!(ack_value(7), r#"{"generation":7}"#);
    }
}
