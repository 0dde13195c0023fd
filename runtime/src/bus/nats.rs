//! `NatsBus`: the [`Bus`] over NATS (core NATS for requests and KV events,
//! JetStream for the prefill queue). What pods use.
//!
//! Names, all under one deployment's [`Scope`] (tokens sanitized, see
//! [`subject_token`]):
//! - requests to an instance: `xpyd.<ns>.<dep>.req.<instance>`, with a fresh
//!   reply inbox per request; cancels: `xpyd.<ns>.<dep>.cancel.<instance>`
//!   carrying the inbox;
//! - prefill queues, one per KV layout: stream
//!   `XPYD_PREFILL_<ns>_<dep>_<queue>` (WorkQueue, file storage) on subject
//!   `xpyd.<ns>.<dep>.prefill.<queue>` (the unnamed queue `""`: stream
//!   `XPYD_PREFILL_<ns>_<dep>` on `xpyd.<ns>.<dep>.prefill`), one durable
//!   pull consumer `prefill` shared by the prefill workers of that layout;
//! - KV events: `xpyd.<ns>.<dep>.kv.<instance>` (the exact instance id also
//!   rides in the `Xpyd-Instance` header).
//!
//! Response framing on the inbox (first byte a tag): `H` heartbeat, then
//! `D`ata, `E`nd, `A`bandoned, each followed by a big-endian u64 sequence
//! number so a frame lost in a reconnection becomes an error instead of a
//! silently shorter answer. The serving side heartbeats at once on receipt
//! (so `request` knows the request was taken) and every heartbeat interval
//! while the [`Responder`] lives, independently of the worker's progress;
//! keep the requester's idle timeout at 3 or more heartbeat intervals.
//! Heartbeats carry a reply subject of the serving side's, so when the
//! requester dies (or drops its stream and the explicit cancel is lost),
//! NATS answers its heartbeats with no-responders and
//! [`Responder::cancelled`] resolves after two of them (about two heartbeat
//! intervals: one alone may be the requester still reconnecting).
//!
//! A NATS server restart pauses streams instead of failing them: a
//! requester whose own connection is down, or changed less than an idle
//! timeout ago, keeps waiting past the idle timeout (at most
//! [`OUTAGE_ALLOWANCE`] in all), and a frame lost meanwhile still shows as
//! a sequence gap.
//!
//! Reply inboxes were chosen over a JetStream stream per request: no
//! per-request server state, one hop, no disk. Measured with
//! `e2e/tests/bus.rs::request_round_trip_and_token_latency` (debug build,
//! nats-server 2.9 on loopback, a shared 2-core machine): a request with one
//! response and its end round-trips in about 0.25 ms (p99 0.45 ms); a token
//! sent every 5 ms reaches the requester in about 0.4 ms (p99 1.6-3 ms);
//! 2000 tokens sent back to back arrive within about 20 ms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, ConnectOptions, HeaderMap, StatusCode, Subscriber};
use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::timeout;

use super::{
    Bus, BusError, IncomingRequest, JobControl, KvEventStream, PrefillJob, PrefillJobs,
    RequestStream, Responder, ResponderSink, ResponseStream,
};
use crate::sync::lock;
use xpyd_api::Scope;

/// Settings of a [`NatsBus`]; `Default` holds the production values.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Deadline of one call to the server (publish ack, consumer info, ack).
    pub call_deadline: Duration,
    /// How often a serving side tells the requester it is alive.
    pub heartbeat_interval: Duration,
    /// A taken prefill job with no ack or progress for this long is
    /// redelivered.
    pub prefill_ack_wait: Duration,
    /// Deliveries of one prefill job before JetStream gives up on it.
    pub prefill_max_deliver: i64,
    /// Deadline of the first connection.
    pub connect_deadline: Duration,
    /// How long one pull for the next prefill job waits at the server before
    /// it is renewed (bounds how long a dropped [`PrefillJobs`] may hold a
    /// job that was on its way).
    pub prefill_pull_expiry: Duration,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            call_deadline: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            prefill_ack_wait: Duration::from_secs(10),
            prefill_max_deliver: 5,
            connect_deadline: Duration::from_secs(5),
            // Not a divisor of the ack wait: see `Puller`.
            prefill_pull_expiry: Duration::from_secs(3),
        }
    }
}

/// The header carrying a KV event publisher's exact instance id.
const INSTANCE_HEADER: &str = "Xpyd-Instance";
/// Queue group of the request subscriptions.
const SERVE_GROUP: &str = "serve";
/// The durable consumer every prefill worker shares.
const PREFILL_CONSUMER: &str = "prefill";
/// Bounds of the prefill consumer's retry backoff after errors.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

const TAG_HEARTBEAT: u8 = b'H';
const TAG_DATA: u8 = b'D';
const TAG_END: u8 = b'E';
const TAG_ABANDONED: u8 = b'A';

/// Makes `s` one valid NATS subject token: `.`, `*`, `>`, whitespace and
/// control characters become `_`; also `/` and `\` so the same token is a
/// valid JetStream stream name. Kubernetes names never contain `_`, so
/// distinct names stay distinct.
pub fn subject_token(s: &str) -> String {
    if s.is_empty() {
        return "_".to_string();
    }
    s.chars()
        .map(|c| match c {
            '.' | '*' | '>' | '/' | '\\' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}

/// How long a stream keeps waiting, in all, past its idle timeout while
/// this process's NATS connection is down or was just re-established (the
/// other side may still be reconnecting): a server restart should cost the
/// requests in flight a pause, not an error.
pub const OUTAGE_ALLOWANCE: Duration = Duration::from_secs(60);

/// This process's NATS connection: whether it is up, and when it last went
/// down or came back (set from the client's connection events).
#[derive(Debug)]
struct Link {
    client: Client,
    last_change: Arc<Mutex<std::time::Instant>>,
}

impl Link {
    /// Whether silence of `within` may be the connection's fault rather
    /// than the peer's: the connection is down, or it changed (went down
    /// or came back) less than `within` ago.
    fn excuses(&self, within: Duration) -> bool {
        self.client.connection_state() != async_nats::connection::State::Connected
            || lock(&self.last_change).elapsed() < within
    }
}

/// Subject and stream names of one deployment.
#[derive(Debug, Clone)]
struct Names {
    /// `xpyd.<ns>.<dep>`
    base: String,
    stream: String,
}

impl Names {
    fn new(scope: &Scope) -> Names {
        let ns = subject_token(&scope.namespace);
        let dep = subject_token(&scope.deployment);
        Names {
            base: format!("xpyd.{ns}.{dep}"),
            stream: format!("XPYD_PREFILL_{ns}_{dep}"),
        }
    }
    fn request(&self, instance: &str) -> String {
        format!("{}.req.{}", self.base, subject_token(instance))
    }
    fn cancel(&self, instance: &str) -> String {
        format!("{}.cancel.{}", self.base, subject_token(instance))
    }
    /// Subject and stream of prefill queue `queue` (`""`: the unnamed one).
    fn prefill(&self, queue: &str) -> (String, String) {
        if queue.is_empty() {
            (format!("{}.prefill", self.base), self.stream.clone())
        } else {
            let q = subject_token(queue);
            (
                format!("{}.prefill.{q}", self.base),
                format!("{}_{q}", self.stream),
            )
        }
    }
    fn kv(&self, instance: &str) -> String {
        format!("{}.kv.{}", self.base, subject_token(instance))
    }
    fn kv_all(&self) -> String {
        format!("{}.kv.*", self.base)
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("{what}: {e}"))
}

/// The NATS bus of one deployment.
pub struct NatsBus {
    client: Client,
    last_change: Arc<Mutex<std::time::Instant>>,
    names: Names,
    options: NatsOptions,
    js: jetstream::Context,
    /// Prefill queues by name, made on first use.
    queues: Mutex<HashMap<String, Arc<PrefillQueue>>>,
}

impl NatsBus {
    /// Connects to `url`; the client reconnects by itself afterwards, and
    /// every subscription and consumer of this bus resumes after a server
    /// restart. JetStream objects are created on first use.
    pub async fn connect(
        url: &str,
        scope: Scope,
        options: NatsOptions,
    ) -> Result<Arc<NatsBus>, BusError> {
        let last_change = Arc::new(Mutex::new(std::time::Instant::now()));
        let connect = ConnectOptions::new()
            .name("xpyd")
            .connection_timeout(options.connect_deadline)
            // A restarted server is back within a second or two; the
            // default backoff (up to 4 s+) would stretch every outage.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1000))
            })
            .event_callback({
                let last_change = last_change.clone();
                move |event| {
                    let last_change = last_change.clone();
                    async move {
                        if matches!(
                            event,
                            async_nats::Event::Connected | async_nats::Event::Disconnected
                        ) {
                            *lock(&last_change) = std::time::Instant::now();
                        }
                        tracing::info!(%event, "NATS connection event");
                    }
                }
            });
        let client = timeout(options.connect_deadline, connect.connect(url))
            .await
            .map_err(|_| BusError::Unavailable(format!("connect to {url}: timed out")))?
            .map_err(|e| unavailable(&format!("connect to {url}"), e))?;
        let names = Names::new(&scope);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(options.call_deadline);
        Ok(Arc::new(NatsBus {
            client,
            last_change,
            names,
            options,
            js,
            queues: Mutex::default(),
        }))
    }

    /// Prefill queue `name`.
    fn queue(&self, name: &str) -> Arc<PrefillQueue> {
        lock(&self.queues)
            .entry(name.to_string())
            .or_insert_with(|| {
                let (subject, stream) = self.names.prefill(name);
                Arc::new(PrefillQueue {
                    js: self.js.clone(),
                    subject,
                    stream,
                    options: self.options.clone(),
                    consumer: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    /// Returns once the server has processed everything this connection
    /// sent before (subscriptions included): a message to ourselves comes
    /// back only after them, since a server handles one connection in order.
    /// (`Client::flush` only writes the socket.)
    async fn sync_with_server(&self) -> Result<(), BusError> {
        let inbox = self.client.new_inbox();
        let round_trip = async {
            let mut sub = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| unavailable("subscribe", e))?;
            self.client
                .publish(inbox, Bytes::new())
                .await
                .map_err(|e| unavailable("publish", e))?;
            sub.next()
                .await
                .map(|_| ())
                .ok_or_else(|| BusError::Unavailable("sync subscription closed".into()))
        };
        timeout(self.options.call_deadline, round_trip)
            .await
            .map_err(|_| BusError::Unavailable("server round trip: timed out".into()))?
    }

    /// The underlying client (for metrics or a health check).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

// ------------------------------------------------------------ framing

fn frame(tag: u8, seq: u64, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(9 + payload.len());
    b.put_u8(tag);
    b.put_u64(seq);
    b.put_slice(payload);
    b.freeze()
}

enum Frame {
    Heartbeat,
    Data(u64, Bytes),
    End(u64),
    Abandoned(u64),
}

fn parse_frame(b: &Bytes) -> Option<Frame> {
    let (&tag, rest) = b.split_first()?;
    if tag == TAG_HEARTBEAT {
        return Some(Frame::Heartbeat);
    }
    let seq = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    match tag {
        TAG_DATA => Some(Frame::Data(seq, b.slice(9..))),
        TAG_END => Some(Frame::End(seq)),
        TAG_ABANDONED => Some(Frame::Abandoned(seq)),
        _ => None,
    }
}

// ------------------------------------------------------------ serving side

/// Aborts a task when the last owner goes away.
struct TaskGuard(Mutex<Option<AbortHandle>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.0).take() {
            h.abort();
        }
    }
}

/// Open requests of one `serve`: how a cancel (by requester inbox) or a
/// heartbeat that found nobody (by heartbeat id) finds its request.
#[derive(Default)]
struct Open {
    by_inbox: HashMap<String, watch::Sender<bool>>,
    by_beat: HashMap<u64, String>,
    /// Heartbeats that found nobody, by heartbeat id: since when, how many.
    missed: HashMap<u64, (std::time::Instant, u32)>,
}

/// Heartbeats in a row that must find nobody before the requester counts
/// as gone (see `serve_loop`).
const MISSED_BEATS: u32 = 2;

type OpenRequests = Arc<Mutex<Open>>;

impl Open {
    fn cancel(&self, inbox: &str) {
        if let Some(cancel) = self.by_inbox.get(inbox) {
            let _ = cancel.send(true);
        }
    }
}

struct NatsResponder {
    client: Client,
    inbox: String,
    next_seq: u64,
    cancel: watch::Receiver<bool>,
    ended: bool,
    heartbeat: AbortHandle,
    open: OpenRequests,
    beat_id: u64,
    /// Keeps the serve task (and so cancel delivery) alive while this
    /// request is open, even if the `RequestStream` was dropped.
    _serve: Arc<TaskGuard>,
}

impl NatsResponder {
    async fn publish(&mut self, tag: u8, payload: &[u8]) -> Result<(), BusError> {
        if *self.cancel.borrow() {
            return Err(BusError::Cancelled);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.client
            .publish(self.inbox.clone(), frame(tag, seq, payload))
            .await
            .map_err(|e| unavailable("publish response", e))
    }
}

impl ResponderSink for NatsResponder {
    fn send(&mut self, payload: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        async move { self.publish(TAG_DATA, &payload).await }.boxed()
    }

    fn end(mut self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        async move {
            let result = self.publish(TAG_END, &[]).await;
            self.ended = true;
            result
        }
        .boxed()
    }

    fn cancelled(&self) -> BoxFuture<'static, ()> {
        let mut cancel = self.cancel.clone();
        async move {
            // Also resolves if the sender is gone (the request was closed).
            let _ = cancel.wait_for(|c| *c).await;
        }
        .boxed()
    }
}

impl Drop for NatsResponder {
    fn drop(&mut self) {
        self.heartbeat.abort();
        {
            let mut open = lock(&self.open);
            open.by_inbox.remove(&self.inbox);
            open.by_beat.remove(&self.beat_id);
            open.missed.remove(&self.beat_id);
        }
        if self.ended || *self.cancel.borrow() {
            return;
        }
        // Drop cannot await: hand the last frame to a task. Earlier frames
        // were already queued on the same connection, so order holds.
        let frame = frame(TAG_ABANDONED, self.next_seq, &[]);
        let client = self.client.clone();
        let inbox = std::mem::take(&mut self.inbox);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.publish(inbox, frame).await;
            });
        }
    }
}

/// Reads requests and cancels of one instance, in arrival order.
async fn serve_loop(
    client: Client,
    mut requests: Subscriber,
    mut cancels: Subscriber,
    (beat_prefix, mut gone): (String, Subscriber),
    tx: mpsc::UnboundedSender<IncomingRequest>,
    guard: Weak<TaskGuard>,
    heartbeat_interval: Duration,
) {
    let open: OpenRequests = Arc::new(Mutex::new(Open::default()));
    let mut serving = true;
    let mut next_beat: u64 = 0;
    loop {
        tokio::select! {
            // Requests first: a cancel published right after its request
            // must find the request registered.
            biased;
            msg = requests.next(), if serving => {
                let Some(msg) = msg else {
                    serving = false;
                    continue;
                };
                let Some(inbox) = msg.reply.map(|r| r.to_string()) else {
                    tracing::warn!(subject = %msg.subject, "request without reply subject ignored");
                    continue;
                };
                let Some(guard) = guard.upgrade() else { return };
                let (cancel_tx, cancel_rx) = watch::channel(false);
                let beat_id = next_beat;
                next_beat += 1;
                {
                    let mut open = lock(&open);
                    open.by_inbox.insert(inbox.clone(), cancel_tx);
                    open.by_beat.insert(beat_id, inbox.clone());
                }
                let heartbeat = tokio::spawn(heartbeat(
                    client.clone(),
                    inbox.clone(),
                    format!("{beat_prefix}.{beat_id}"),
                    cancel_rx.clone(),
                    heartbeat_interval,
                ))
                .abort_handle();
                let responder = Responder::new(NatsResponder {
                    client: client.clone(),
                    inbox,
                    next_seq: 0,
                    cancel: cancel_rx,
                    ended: false,
                    heartbeat,
                    open: open.clone(),
                    beat_id,
                    _serve: guard,
                });
                // A send error drops the responder, which answers Abandoned.
                let _ = tx.send(IncomingRequest { payload: msg.payload, responder });
            }
            msg = cancels.next() => {
                let Some(msg) = msg else { return };
                lock(&open).cancel(&String::from_utf8_lossy(&msg.payload));
            }
            msg = gone.next() => {
                let Some(msg) = msg else { return };
                // NATS answers a heartbeat's reply subject with 503 when the
                // requester's inbox has no subscriber: it died or dropped
                // its stream without a word.
                if msg.status != Some(StatusCode::NO_RESPONDERS) {
                    continue;
                }
                let subject = msg.subject.to_string();
                let Some(id) = subject.rsplit('.').next().and_then(|t| t.parse::<u64>().ok()) else {
                    continue;
                };
                // One unanswered beat may be the requester reconnecting
                // after a server restart (its inbox is subscribed again
                // once it is back): only silence across
                // `MISSED_BEATS` heartbeats counts as gone.
                let mut open = lock(&open);
                let Some(inbox) = open.by_beat.get(&id).cloned() else {
                    continue;
                };
                let now = std::time::Instant::now();
                let missed = open.missed.entry(id).or_insert((now, 0));
                if now.duration_since(missed.0) > heartbeat_interval * (MISSED_BEATS + 1) {
                    *missed = (now, 0);
                }
                missed.1 += 1;
                if missed.1 >= MISSED_BEATS {
                    tracing::debug!(%inbox, "requester gone; cancelling its request");
                    open.cancel(&inbox);
                }
            }
            _ = tx.closed(), if serving => {
                // The RequestStream is gone: stop taking requests so callers
                // get NoResponders; open ones keep their cancel path.
                serving = false;
                let _ = requests.unsubscribe().await;
            }
        }
    }
}

/// Tells the requester we are alive: at once, then every `interval`. Each
/// beat carries `reply` so that NATS tells us (503) when the requester's
/// inbox is gone.
async fn heartbeat(
    client: Client,
    inbox: String,
    reply: String,
    mut cancel: watch::Receiver<bool>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat = Bytes::from_static(&[TAG_HEARTBEAT]);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if client
                    .publish_with_reply(inbox.clone(), reply.clone(), beat.clone())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            _ = async { drop(cancel.wait_for(|c| *c).await) } => return,
        }
    }
}

// ------------------------------------------------------------ requesting side

/// Tells the serving side to stop unless the stream ended normally.
struct CancelOnDrop {
    client: Client,
    subject: String,
    inbox: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let client = self.client.clone();
        let subject = std::mem::take(&mut self.subject);
        let inbox = Bytes::from(std::mem::take(&mut self.inbox));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.publish(subject, inbox).await;
            });
        }
    }
}

struct Receiving {
    sub: Subscriber,
    idle: Duration,
    next_seq: u64,
    cancel: CancelOnDrop,
    link: Link,
    /// Silence excused so far by the connection (see [`OUTAGE_ALLOWANCE`]).
    excused: Duration,
}

enum Step {
    Item(Result<Bytes, BusError>),
    /// Final item, then the stream ends.
    Last(BusError),
    End,
    /// A heartbeat (only reported while waiting for the first frame).
    Alive,
}

impl Receiving {
    /// The next frame that means something; with `first`, a heartbeat
    /// counts (it says the request was taken).
    async fn next_step(&mut self, first: bool) -> Step {
        loop {
            let msg = match timeout(self.idle, self.sub.next()).await {
                Err(_) if self.excused < OUTAGE_ALLOWANCE && self.link.excuses(self.idle) => {
                    // Our connection is (or just was) down: frames sent
                    // meanwhile are held by the peer's client or lost, and
                    // a lost one shows as a sequence gap.
                    self.excused += self.idle;
                    tracing::debug!(excused = ?self.excused, "response stream silent during a NATS outage; waiting on");
                    continue;
                }
                Err(_) => return Step::Last(BusError::Timeout(self.idle)),
                Ok(None) => {
                    return Step::Last(BusError::Unavailable(
                        "response subscription closed".into(),
                    ));
                }
                Ok(Some(msg)) => msg,
            };
            match self.step(msg) {
                Some(step) => return step,
                None if first => return Step::Alive,
                None => {}
            }
        }
    }

    /// What one inbox message means; `None` for a heartbeat.
    fn step(&mut self, msg: async_nats::Message) -> Option<Step> {
        if let Some(status) = msg.status {
            if status == StatusCode::NO_RESPONDERS {
                self.cancel.armed = false;
                return Some(Step::Last(BusError::NoResponders(
                    self.cancel.subject.clone(),
                )));
            }
            tracing::debug!(%status, "status message on a response inbox ignored");
            return None;
        }
        let Some(frame) = parse_frame(&msg.payload) else {
            return Some(Step::Last(BusError::Other(
                "malformed response frame".into(),
            )));
        };
        let seq = match &frame {
            Frame::Heartbeat => return None,
            Frame::Data(seq, _) | Frame::End(seq) | Frame::Abandoned(seq) => *seq,
        };
        if seq != self.next_seq {
            return Some(Step::Last(BusError::Unavailable(format!(
                "responses lost in transit (expected #{}, got #{seq})",
                self.next_seq
            ))));
        }
        self.next_seq += 1;
        Some(match frame {
            Frame::Data(_, b) => Step::Item(Ok(b)),
            Frame::End(_) => {
                self.cancel.armed = false;
                Step::End
            }
            Frame::Abandoned(_) => {
                self.cancel.armed = false;
                Step::Last(BusError::Abandoned)
            }
            Frame::Heartbeat => return None,
        })
    }
}

fn response_stream(first: Option<Step>, receiving: Receiving) -> ResponseStream {
    futures::stream::unfold(
        (first, Some(receiving)),
        |(pending, receiving)| async move {
            let mut receiving = receiving?;
            let step = match pending {
                Some(step) => step,
                None => receiving.next_step(false).await,
            };
            match step {
                Step::Item(item) => Some((item, (None, Some(receiving)))),
                Step::Last(e) => Some((Err(e), (None, None))),
                Step::End | Step::Alive => None,
            }
        },
    )
    .boxed()
}

// ------------------------------------------------------------ prefill queue

struct PrefillQueue {
    js: jetstream::Context,
    /// The queue's subject and stream (see [`Names::prefill`]).
    subject: String,
    stream: String,
    options: NatsOptions,
    /// Cached handle; cleared after an error so the next use re-creates the
    /// stream and consumer if the server lost them.
    consumer: tokio::sync::Mutex<Option<PullConsumer>>,
}

impl PrefillQueue {
    async fn consumer(&self) -> Result<PullConsumer, BusError> {
        let mut cached = self.consumer.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let deadline = self.options.call_deadline;
        let stream = timeout(
            deadline,
            self.js.get_or_create_stream(jetstream::stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject.clone()],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            }),
        )
        .await
        .map_err(|_| BusError::Unavailable("create prefill stream: timed out".into()))?
        .map_err(|e| unavailable("create prefill stream", e))?;
        let consumer: PullConsumer = timeout(
            deadline,
            stream.get_or_create_consumer(
                PREFILL_CONSUMER,
                pull::Config {
                    durable_name: Some(PREFILL_CONSUMER.to_string()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.options.prefill_ack_wait,
                    max_deliver: self.options.prefill_max_deliver,
                    ..Default::default()
                },
            ),
        )
        .await
        .map_err(|_| BusError::Unavailable("create prefill consumer: timed out".into()))?
        .map_err(|e| unavailable("create prefill consumer", e))?;
        *cached = Some(consumer.clone());
        Ok(consumer)
    }

    async fn forget_consumer(&self) {
        *self.consumer.lock().await = None;
    }

    async fn enqueue_once(&self, payload: Bytes) -> Result<(), BusError> {
        let ack = self
            .js
            .publish(self.subject.clone(), payload)
            .await
            .map_err(|e| unavailable("enqueue prefill", e))?;
        ack.await
            .map(|_| ())
            .map_err(|e| unavailable("enqueue prefill", e))
    }

    async fn enqueue(&self, payload: Bytes) -> Result<(), BusError> {
        let attempt = async {
            // The stream must exist before publishing, or nobody stores it.
            self.consumer().await?;
            match self.enqueue_once(payload.clone()).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // The server may have lost the stream: re-create, retry once.
                    tracing::debug!(error = %e, "enqueue failed; re-creating the prefill stream");
                    self.forget_consumer().await;
                    self.consumer().await?;
                    self.enqueue_once(payload).await
                }
            }
        };
        timeout(self.options.call_deadline, attempt)
            .await
            .map_err(|_| BusError::Unavailable("enqueue prefill: timed out".into()))?
    }

    async fn depth(&self) -> Result<u64, BusError> {
        let attempt = async {
            let consumer = self.consumer().await?;
            match consumer.get_info().await {
                Ok(info) => Ok(info.num_pending),
                Err(e) => {
                    self.forget_consumer().await;
                    Err(unavailable("prefill consumer info", e))
                }
            }
        };
        timeout(self.options.call_deadline, attempt)
            .await
            .map_err(|_| BusError::Unavailable("prefill queue depth: timed out".into()))?
    }
}

/// One consumer's side of the pull protocol, on one long-lived inbox.
///
/// Why not `PullConsumer::batch`: its inbox dies with each pull, and a job
/// the server hands out just as a pull expires (nats-server 2.9 does that
/// when the expiry and a redelivery coincide) lands in a dead inbox and
/// waits a whole ack wait for its next delivery. Here a late job is simply
/// the next one taken. Why not `PullConsumer::stream`: it asks for the next
/// job before the worker does, so a busy worker would hold one.
///
/// nats-server 2.9 can also hand a redelivered job to a pull in the very
/// instant that pull expires; then the job never arrives and comes back one
/// ack wait later (its `delivered` counts the lost delivery). A pull expiry
/// that does not divide the ack wait keeps a worker that re-pulls right
/// after dropping a job from hitting that instant every time.
struct Puller {
    queue: Arc<PrefillQueue>,
    client: Client,
    sub: Option<(String, Subscriber)>,
    /// When the pull in flight must have been answered (with a job or an
    /// expiry status); `None` when no pull is in flight.
    pull_deadline: Option<tokio::time::Instant>,
}

impl Puller {
    /// The next job, or the error that made this attempt fail.
    async fn try_next(&mut self) -> Result<Option<PrefillJob>, BusError> {
        // Re-creates stream and consumer when the server lost them.
        self.queue.consumer().await?;
        if self.sub.is_none() {
            let inbox = self.client.new_inbox();
            let sub = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| unavailable("subscribe prefill inbox", e))?;
            self.sub = Some((inbox, sub));
        }
        let Some((inbox, sub)) = self.sub.as_mut() else {
            return Ok(None);
        };
        let options = &self.queue.options;
        if self.pull_deadline.is_none() {
            let request = serde_json::json!({
                "batch": 1,
                "expires": options.prefill_pull_expiry.as_nanos() as u64,
            });
            let subject = format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                self.queue.stream, PREFILL_CONSUMER
            );
            self.client
                .publish_with_reply(subject, inbox.clone(), Bytes::from(request.to_string()))
                .await
                .map_err(|e| unavailable("pull prefill job", e))?;
            // A restarted server forgets pulls: past this, ask again.
            self.pull_deadline = Some(
                tokio::time::Instant::now() + options.prefill_pull_expiry + options.call_deadline,
            );
        }
        let deadline = self.pull_deadline.unwrap_or_else(tokio::time::Instant::now);
        let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => {
                self.pull_deadline = None;
                return Ok(None);
            }
            Ok(None) => {
                self.sub = None;
                self.pull_deadline = None;
                return Err(BusError::Unavailable("prefill inbox closed".into()));
            }
            Ok(Some(msg)) => msg,
        };
        match msg.status {
            None | Some(StatusCode::OK) => {}
            // Pull expired empty (408), or no job now (404).
            Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => {
                self.pull_deadline = None;
                return Ok(None);
            }
            Some(StatusCode::IDLE_HEARTBEAT) => return Ok(None),
            // 503 (stream or consumer missing, JetStream not ready), 409
            // (consumer deleted, limits) and the like.
            Some(status) => {
                self.pull_deadline = None;
                return Err(BusError::Unavailable(format!(
                    "pull prefill job: status {status} {}",
                    msg.description.as_deref().unwrap_or_default()
                )));
            }
        }
        // A job answers the pull in flight. (If it was a late answer to an
        // expired pull, the pull in flight may still bring one more job that
        // waits in the inbox for the next poll: a rare race that holds at
        // most one job, which the ack wait bounds.)
        self.pull_deadline = None;
        let msg = jetstream::Message {
            message: msg,
            context: self.queue.js.clone(),
        };
        let delivered = match msg.info() {
            Ok(info) => u64::try_from(info.delivered).unwrap_or(1).max(1),
            Err(e) => {
                tracing::warn!(error = %e, "prefill job without delivery info; assuming first");
                1
            }
        };
        let payload = msg.payload.clone();
        Ok(Some(PrefillJob::new(
            payload,
            delivered,
            Box::new(NatsJob {
                msg,
                deadline: options.call_deadline,
            }),
        )))
    }

    /// The next job; retries errors (server restarts) with backoff.
    async fn next_job(&mut self) -> PrefillJob {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.try_next().await {
                Ok(Some(job)) => return job,
                Ok(None) => backoff = BACKOFF_MIN,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "prefill queue pull failed");
                    self.queue.forget_consumer().await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

struct NatsJob {
    msg: jetstream::Message,
    deadline: Duration,
}

impl NatsJob {
    async fn reply(&self, kind: AckKind, what: &str) -> Result<(), BusError> {
        let result = match kind {
            // Wait for the server to confirm: an ack lost in a reconnection
            // would otherwise redo the whole prefill silently.
            AckKind::Ack => timeout(self.deadline, self.msg.double_ack()).await,
            kind => timeout(self.deadline, self.msg.ack_with(kind)).await,
        };
        result
            .map_err(|_| BusError::Unavailable(format!("{what}: timed out")))?
            .map_err(|e| unavailable(what, e))
    }
}

impl JobControl for NatsJob {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        async move { self.reply(AckKind::Ack, "ack prefill job").await }.boxed()
    }

    fn nak(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        async move { self.reply(AckKind::Nak(None), "nak prefill job").await }.boxed()
    }

    fn progress(&self) -> BoxFuture<'_, Result<(), BusError>> {
        self.reply(AckKind::Progress, "prefill job progress")
            .boxed()
    }
}

// ------------------------------------------------------------ Bus

impl Bus for NatsBus {
    fn serve(&self, instance_id: &str) -> BoxFuture<'_, Result<RequestStream, BusError>> {
        let instance_id = instance_id.to_string();
        async move {
            // A queue group: if two processes ever serve the same id (a
            // restarted pod overlapping its old self), each request still
            // gets exactly one responder instead of two interleaved streams.
            let requests = self
                .client
                .queue_subscribe(self.names.request(&instance_id), SERVE_GROUP.to_string())
                .await
                .map_err(|e| unavailable("subscribe requests", e))?;
            let cancels = self
                .client
                .subscribe(self.names.cancel(&instance_id))
                .await
                .map_err(|e| unavailable("subscribe cancels", e))?;
            // Make sure the server has the subscriptions before anyone is
            // told this instance is up.
            self.sync_with_server().await?;
            let beat_prefix = self.client.new_inbox();
            let gone = self
                .client
                .subscribe(format!("{beat_prefix}.*"))
                .await
                .map_err(|e| unavailable("subscribe heartbeat replies", e))?;
            let (tx, rx) = mpsc::unbounded_channel();
            let guard = Arc::new(TaskGuard(Mutex::new(None)));
            let task = tokio::spawn(serve_loop(
                self.client.clone(),
                requests,
                cancels,
                (beat_prefix, gone),
                tx,
                Arc::downgrade(&guard),
                self.options.heartbeat_interval,
            ));
            *lock(&guard.0) = Some(task.abort_handle());
            let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
                rx.recv().await.map(|r| (r, (rx, guard)))
            });
            Ok(stream.boxed())
        }
        .boxed()
    }

    fn request(
        &self,
        instance_id: &str,
        payload: Bytes,
        idle_timeout: Duration,
    ) -> BoxFuture<'_, Result<ResponseStream, BusError>> {
        let instance_id = instance_id.to_string();
        async move {
            let inbox = self.client.new_inbox();
            // Subscribe before publishing: the first frame may come back
            // before a later subscription would reach the server.
            let sub = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| unavailable("subscribe response inbox", e))?;
            self.client
                .publish_with_reply(self.names.request(&instance_id), inbox.clone(), payload)
                .await
                .map_err(|e| unavailable("publish request", e))?;
            let mut receiving = Receiving {
                sub,
                idle: idle_timeout,
                link: Link {
                    client: self.client.clone(),
                    last_change: self.last_change.clone(),
                },
                excused: Duration::ZERO,
                next_seq: 0,
                cancel: CancelOnDrop {
                    client: self.client.clone(),
                    subject: self.names.cancel(&instance_id),
                    inbox,
                    armed: true,
                },
            };
            // Wait for the first frame (the serving side heartbeats at once)
            // so a dead instance is reported here, where the caller can pick
            // another one.
            match receiving.next_step(true).await {
                Step::Last(BusError::NoResponders(_)) => Err(BusError::NoResponders(instance_id)),
                Step::Last(e) => Err(e),
                Step::Alive => Ok(response_stream(None, receiving)),
                first => Ok(response_stream(Some(first), receiving)),
            }
        }
        .boxed()
    }

    fn enqueue_prefill(&self, queue: &str, payload: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        let queue = self.queue(queue);
        async move { queue.enqueue(payload).await }.boxed()
    }

    /// Jobs not yet taken by any worker (the consumer's `num_pending`); jobs
    /// taken and not yet acked are not counted.
    fn prefill_queue_depth(&self, queue: &str) -> BoxFuture<'_, Result<u64, BusError>> {
        let queue = self.queue(queue);
        async move { queue.depth().await }.boxed()
    }

    fn prefill_jobs(&self, queue: &str) -> BoxFuture<'_, Result<PrefillJobs, BusError>> {
        let queue = self.queue(queue);
        async move {
            // Fail fast on a bad setup (JetStream off); later errors are
            // retried inside the stream.
            queue.consumer().await?;
            let puller = Puller {
                queue,
                client: self.client.clone(),
                sub: None,
                pull_deadline: None,
            };
            // Pull: the next job is asked for only when the worker polls.
            let jobs = futures::stream::unfold(puller, |mut puller| async move {
                let job = puller.next_job().await;
                Some((job, puller))
            });
            Ok(jobs.boxed())
        }
        .boxed()
    }

    fn publish_kv_events(
        &self,
        instance_id: &str,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        let subject = self.names.kv(instance_id);
        let mut headers = HeaderMap::new();
        headers.insert(INSTANCE_HEADER, instance_id);
        async move {
            self.client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| unavailable("publish KV events", e))
        }
        .boxed()
    }

    fn kv_events(&self) -> BoxFuture<'_, Result<KvEventStream, BusError>> {
        async move {
            let sub = self
                .client
                .subscribe(self.names.kv_all())
                .await
                .map_err(|e| unavailable("subscribe KV events", e))?;
            self.sync_with_server().await?;
            let events = sub.map(|msg| {
                let instance = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(INSTANCE_HEADER))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_else(|| {
                        // A publisher without the header: the subject's last
                        // token is the (sanitized) id.
                        msg.subject
                            .rsplit('.')
                            .next()
                            .unwrap_or_default()
                            .to_string()
                    });
                (instance, msg.payload)
            });
            Ok(events.boxed())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_valid_subject_tokens_and_stream_names() {
        assert_eq!(subject_token("a.b *>c/d\\e\tf"), "a_b___c_d_e_f");
        assert_eq!(subject_token(""), "_");
        let names = Names::new(&Scope::new("team.a", "llama 8b"));
        assert_eq!(names.base, "xpyd.team_a.llama_8b");
        assert_eq!(names.stream, "XPYD_PREFILL_team_a_llama_8b");
        assert_eq!(names.request("d-1.x"), "xpyd.team_a.llama_8b.req.d-1_x");
    }

    #[test]
    fn frames_round_trip_and_garbage_is_rejected() {
        let f = frame(TAG_DATA, 7, b"tok");
        assert!(
            matches!(parse_frame(&f), Some(Frame::Data(7, b)) if b == Bytes::from_static(b"tok"))
        );
        assert!(matches!(
            parse_frame(&frame(TAG_END, 3, &[])),
            Some(Frame::End(3))
        ));
        assert!(matches!(
            parse_frame(&Bytes::from_static(b"H")),
            Some(Frame::Heartbeat)
        ));
        assert!(parse_frame(&Bytes::from_static(b"D12")).is_none());
        assert!(parse_frame(&Bytes::new()).is_none());
        assert!(parse_frame(&frame(b'Z', 0, &[])).is_none());
    }
}
