//! The decode worker: serves generation requests addressed to it on the bus
//! and makes the disaggregation decision for each prompt.
//!
//! A prompt whose uncached part is longer than the threshold in force
//! (`maxLocalPrefillLength` from the deployment's settings, watched live)
//! gets its blocks reserved and a [`RemotePrefillRequest`] on the prefill
//! queue; when the NIXL notification arrives, decoding starts from the
//! first token it carries. Everything else, and every remote prefill that
//! cannot happen (no prefill worker alive, queue too deep, deadline missed,
//! transfer failed) is prefilled locally: a request never waits forever.
//!
//! Block safety: only the prefill worker that claimed a request
//! ([`DecodeMessage::Claim`]) may write into its blocks, and claims are
//! refused once the deadline is near. The request stops waiting (and is
//! prefilled locally at once) when its KV arrived (the notification), the
//! claimant said it gives the job up ([`DecodeMessage::Abandon`]: it
//! failed, and wrote nothing more), the claimant is gone (the bus finds
//! nobody serving its subject when asked for [`PrefillMessage::Status`],
//! every [`DecodeConfig::claimant_check_interval`]), the claimant answered
//! none of those questions for [`DecodeConfig::claimant_silence_limit`]
//! (stopped, cut off), or the deadline passed. In the last two cases (and
//! when the client left or the worker drains) the claimant may still be
//! writing: a stopped process resumed, a write posted just before the
//! deadline. Those blocks are then *fenced*:
//! held by no request and out of the pool, while the local prefill takes
//! other blocks, until the claimant provably stopped (its late
//! notification arrived, it reports the job over, or it is gone). So a late
//! write lands only in memory no request reads, whatever the clocks say;
//! the claimant's time is counted from its claim on its own clock anyway,
//! so it does not post after our deadline unless it is stalled.
//!
//! A job the queue lost (a NATS restart before the server synced it, its
//! deliveries used up) is put on it again: one unclaimed for
//! 5 s while the queue is empty cannot be waiting behind
//! others. The paths from each prefill worker are judged by their
//! outcomes and quarantined when they keep failing ([`super::paths`]).
//!
//! Drain (after `shutdown`, which deregisters the worker first): new
//! generate requests are turned away as unavailable (the frontend tries
//! another worker), but the request subscription stays open, since it also
//! carries the claims of the prefill workers computing our pending remote
//! prefills, and NIXL notifications keep arriving. A remote prefill no
//! prefill worker has claimed by [`DecodeConfig::drain_claim_wait`] into
//! the drain is withdrawn and prefilled locally, so every request can end
//! within the grace period; then the worker returns.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::notifications::NotificationHub;
use super::paths::{PathChange, PathConfig, Paths};
use super::plan::{Fallback, PrefillFacts, PrefillStep, prefill_step};
use super::{InFlight, WorkerParts};
use crate::bus::{BusError, IncomingRequest, RequestStream, Responder};
use crate::discovery::{Role, RouterSettings};
use crate::engine::block_pool::FenceId;
use crate::engine::runner::{EngineError, EngineErrorKind, OutputItem, Request};
use crate::engine::sampling::{SamplingParams, TokenLogprobs};
use crate::sync::lock;
use crate::transfer::{ReceivedNotification, Transport};
use xpyd_api::PrefillUnavailable;
use xpyd_api::TransferMetadata;
use xpyd_api::messages::{
    self as protocol, ClaimReply, DecodeMessage, GenerateEvent, GenerateWork, JobStatus,
    PrefillMessage, RemotePrefillRequest, WireErrorKind,
};

/// Settings of a decode worker that are not the deployment's.
#[derive(Debug, Clone)]
pub struct DecodeConfig {
    /// How long to wait for a remote prefill's KV before prefilling locally.
    pub remote_prefill_timeout: Duration,
    /// Claims arriving closer than this to the deadline are refused.
    pub claim_margin: Duration,
    /// Deadline of a prefill-queue depth query.
    pub queue_query_timeout: Duration,
    /// Overrides the settings' threshold when set (flag of `xpyd-agent`).
    pub max_local_prefill_length: Option<u32>,
    /// While draining, a remote prefill still unclaimed this long into the
    /// drain (at most half the grace period) is prefilled locally instead.
    pub drain_claim_wait: Duration,
    /// How often the claimant of a remote prefill we wait for is asked
    /// whether it still works on it (a gone one is noticed within this).
    pub claimant_check_interval: Duration,
    /// A claimant that answers none of those questions for this long
    /// (stopped, cut off) is given up: the request is prefilled locally
    /// and the blocks it may still write stay fenced.
    pub claimant_silence_limit: Duration,
    /// When a prefill worker's path to us is quarantined and probed.
    pub paths: PathConfig,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            remote_prefill_timeout: Duration::from_secs(30),
            claim_margin: Duration::from_millis(500),
            queue_query_timeout: Duration::from_secs(1),
            max_local_prefill_length: None,
            drain_claim_wait: Duration::from_secs(5),
            claimant_check_interval: Duration::from_secs(1),
            claimant_silence_limit: Duration::from_secs(5),
            paths: PathConfig::default(),
        }
    }
}

/// An unclaimed job this long on an empty queue was lost (a NATS restart
/// before the server synced it, `max_deliver` used up by declines): it is
/// put on the queue again. A second copy is harmless: only one claimant
/// may write.
const REQUEUE_AFTER: Duration = Duration::from_secs(5);
/// Most times one job is put on the queue again.
const MAX_REQUEUES: u32 = 3;

/// The longest a probe waits for its KV.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Claims a remote prefill may have declined (its claimants' paths
/// quarantined) before it is prefilled locally instead.
const MAX_DECLINES: u32 = 3;

/// A remote prefill the worker waits for.
struct Pending {
    deadline: Instant,
    enqueued: Instant,
    /// The job as it went on the queue (`None` for a probe), and when it
    /// last did: a job lost by the queue is put on it again.
    job: Option<bytes::Bytes>,
    last_enqueued: Instant,
    requeues: u32,
    claimed_by: Option<String>,
    /// When the current claimant claimed it.
    claimed_at: Option<Instant>,
    /// The claimant's last answer was [`JobStatus::Writing`]: its KV is
    /// computed and on the wire.
    claimant_writing: bool,
    /// Claims declined because the claimant's path is quarantined.
    declines: u32,
    /// For a probe: the one prefill worker whose path it probes (and who
    /// alone may claim it).
    probe_of: Option<String>,
    /// Told the fallback and why, when the job is given up before its KV
    /// came: the prefill worker failed it, or its claims kept being declined.
    abandoned: Option<oneshot::Sender<(&'static str, String)>>,
}

impl Pending {
    fn new(deadline: Instant, probe_of: Option<String>) -> (Pending, AbandonedRx) {
        let (tell, told) = oneshot::channel();
        let pending = Pending {
            deadline,
            enqueued: Instant::now(),
            job: None,
            last_enqueued: Instant::now(),
            requeues: 0,
            claimed_by: None,
            claimed_at: None,
            claimant_writing: false,
            declines: 0,
            probe_of,
            abandoned: Some(tell),
        };
        (pending, told)
    }

    /// Whether the queue seems to have lost the job: nobody holds a claim
    /// on it, and it went on the queue (or back to it) [`REQUEUE_AFTER`]
    /// ago or more; at most [`MAX_REQUEUES`] times.
    fn looks_lost(&self) -> bool {
        self.job.is_some()
            && self.claimed_by.is_none()
            && self.requeues < MAX_REQUEUES
            && self.last_enqueued.elapsed() >= REQUEUE_AFTER
    }

    /// The claimant handed the job back (a `nak`): the queue redelivers it
    /// at once, so the next worker may claim it, and it is on the queue
    /// from now. Counting from the first enqueue instead would take a job
    /// handed back after [`REQUEUE_AFTER`], whose redelivery is in another
    /// worker's hands and so off the queue, for lost, and put a second
    /// copy on the queue: the same prompt prefilled twice.
    fn handed_back(&mut self) {
        self.claimed_by = None;
        self.last_enqueued = Instant::now();
    }
}

type AbandonedRx = oneshot::Receiver<(&'static str, String)>;

struct Inner {
    parts: WorkerParts,
    config: DecodeConfig,
    hub: NotificationHub,
    pending: Mutex<HashMap<String, Pending>>,
    /// `None` while serving; once draining, when unclaimed remote prefills
    /// are withdrawn.
    drain: watch::Sender<Option<tokio::time::Instant>>,
    /// Bytes of one block of KV (all layers, K and V).
    block_bytes: u64,
    /// What a prefill worker needs to write into our KV memory.
    transfer: TransferMetadata,
    /// Our KV-layout fingerprint: the prefill queue our jobs go to, read
    /// only by prefill workers whose KV fits our blocks.
    kv_layout: String,
    /// The health of each prefill worker's path to us. Locked after
    /// `pending` when both are.
    paths: Mutex<Paths>,
    /// The transport UCX is inferred to use from each prefill worker that
    /// has a path here: worked out once, since both records are fixed for
    /// the two processes' lifetimes. Locked after `paths` when both are.
    transports: Mutex<HashMap<String, Transport>>,
    /// Probes sent, for their request ids.
    probes: std::sync::atomic::AtomicU64,
    /// Whether a look for lost jobs is under way.
    requeueing: std::sync::atomic::AtomicBool,
}

/// A decode worker. Cheap to clone.
#[derive(Clone)]
pub struct DecodeWorker {
    inner: Arc<Inner>,
}

impl DecodeWorker {
    pub fn new(parts: WorkerParts, config: DecodeConfig) -> std::io::Result<DecodeWorker> {
        let hub = NotificationHub::start(parts.agent.clone())?;
        let layout = *parts.agent.layout();
        let block_bytes = layout.block_region_bytes * 2 * u64::from(layout.n_layers);
        let transfer = parts.agent.metadata().to_metadata();
        let kv_layout = parts.kv_layout();
        parts.metrics.refresh_at_scrape(parts.live_gauges());
        let paths = Mutex::new(Paths::new(config.paths.clone()));
        Ok(DecodeWorker {
            inner: Arc::new(Inner {
                parts,
                config,
                paths,
                transports: Mutex::default(),
                probes: Default::default(),
                requeueing: Default::default(),
                hub,
                pending: Mutex::default(),
                drain: watch::Sender::new(None),
                block_bytes,
                transfer,
                kv_layout,
            }),
        })
    }

    /// Serve requests until `shutdown` resolves, then drain (see the module
    /// doc) for at most `grace`.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> Result<(), BusError> {
        let parts = &self.inner.parts;
        let mut requests = parts.bus.serve(&parts.instance_id).await?;
        let in_flight = InFlight::default();
        let mut observe = tokio::time::interval(Duration::from_secs(1));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = observe.tick() => self.observe(),
                next = requests.next() => match next {
                    Some(request) => self.spawn_handle(request, &in_flight),
                    None => requests = self.resubscribe().await?,
                },
            }
        }
        let started = Instant::now();
        let claim_wait = self.inner.config.drain_claim_wait.min(grace / 2);
        self.inner
            .drain
            .send_replace(Some(tokio::time::Instant::now() + claim_wait));
        tracing::info!(in_flight = in_flight.count(), "draining");
        let idle = in_flight.wait_idle(grace);
        tokio::pin!(idle);
        let drained = loop {
            tokio::select! {
                idle = &mut idle => break idle,
                // Claims for our pending remote prefills (and requests to
                // turn away).
                next = requests.next() => match next {
                    Some(request) => self.spawn_handle(request, &in_flight),
                    None => requests = self.resubscribe().await?,
                },
            }
        };
        if drained {
            tracing::info!(elapsed = ?started.elapsed(), "drained");
        }
        Ok(())
    }

    fn spawn_handle(&self, request: IncomingRequest, in_flight: &InFlight) {
        let worker = self.clone();
        let busy = in_flight.enter();
        tokio::spawn(async move {
            worker.handle(request).await;
            drop(busy);
        });
    }

    async fn resubscribe(&self) -> Result<RequestStream, BusError> {
        tracing::warn!("request subscription ended; re-subscribing");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let parts = &self.inner.parts;
        parts.bus.serve(&parts.instance_id).await
    }

    fn draining(&self) -> bool {
        self.inner.drain.borrow().is_some()
    }

    /// Once a second: show the threshold, judge the paths, look for lost
    /// jobs. (The engine's gauges are read at each scrape.)
    fn observe(&self) {
        let parts = &self.inner.parts;
        parts
            .metrics
            .max_local_prefill_length
            .set(i64::from(self.threshold(&self.settings())));
        self.watch_paths();
        self.spawn_requeue_lost();
    }

    /// Look for lost jobs ([`Self::requeue_lost`]) in the background,
    /// unless a look is still under way.
    fn spawn_requeue_lost(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.inner.requeueing.swap(true, SeqCst) {
            return;
        }
        let worker = self.clone();
        tokio::spawn(async move {
            worker.requeue_lost().await;
            worker.inner.requeueing.store(false, SeqCst);
        });
    }

    /// Forget the paths of prefill workers that left, show the others in
    /// the metrics, and probe those whose quarantine is over.
    fn watch_paths(&self) {
        let parts = &self.inner.parts;
        let metrics = &parts.metrics;
        let (due, report) = {
            let mut paths = lock(&self.inner.paths);
            for gone in paths.retain(|id| parts.is_alive(id)) {
                metrics.forget_path(&gone);
                lock(&self.inner.transports).remove(&gone);
            }
            (paths.due_probes(Instant::now()), paths.report())
        };
        for path in report {
            metrics.show_path(&path, self.transport_from(&path.prefill));
        }
        if self.draining() {
            return;
        }
        for prefill in due {
            let worker = self.clone();
            tokio::spawn(async move { worker.probe(prefill).await });
        }
    }

    /// The transport UCX is inferred to use from `prefill` (its record is
    /// read and parsed the first time only).
    fn transport_from(&self, prefill: &str) -> Option<Transport> {
        let mut known = lock(&self.inner.transports);
        if let Some(transport) = known.get(prefill) {
            return Some(*transport);
        }
        let transport = self.inner.parts.transport_to(prefill)?;
        known.insert(prefill.to_string(), transport);
        Some(transport)
    }

    /// Put the jobs the queue lost on it again: unclaimed for
    /// [`REQUEUE_AFTER`] while the queue is empty (so they are not waiting
    /// behind others), at most [`MAX_REQUEUES`] times each.
    async fn requeue_lost(&self) {
        let parts = &self.inner.parts;
        let stale: Vec<(String, bytes::Bytes)> = lock(&self.inner.pending)
            .iter()
            .filter(|(_, p)| p.looks_lost())
            .filter_map(|(id, p)| Some((id.clone(), p.job.clone()?)))
            .collect();
        if stale.is_empty() {
            return;
        }
        let limit = self.inner.config.queue_query_timeout;
        let depth =
            tokio::time::timeout(limit, parts.bus.prefill_queue_depth(&self.inner.kv_layout));
        if !matches!(depth.await, Ok(Ok(0))) {
            return;
        }
        for (id, job) in stale {
            let put = tokio::time::timeout(
                limit * 5,
                parts.bus.enqueue_prefill(&self.inner.kv_layout, job),
            )
            .await;
            if !matches!(put, Ok(Ok(()))) {
                return;
            }
            let mut pending = lock(&self.inner.pending);
            let Some(p) = pending.get_mut(&id) else {
                continue;
            };
            p.requeues += 1;
            p.last_enqueued = Instant::now();
            parts.metrics.prefill_requeues.inc();
            tracing::warn!(request_id = %id, requeues = p.requeues, "an unclaimed job was not on the queue any more: put on it again");
        }
    }

    /// Note the verdict of one remote prefill on its path, and say so when
    /// the path changes.
    fn judge_path(&self, prefill: &str, verdict: Result<Duration, &str>) {
        let metrics = &self.inner.parts.metrics;
        let change = {
            let mut paths = lock(&self.inner.paths);
            match verdict {
                Ok(latency) => paths.succeeded(prefill, latency),
                Err(reason) => {
                    metrics.path_failures.with_label_values(&[prefill]).inc();
                    paths.failed(prefill, reason, Instant::now())
                }
            }
        };
        match change {
            Some(PathChange::Quarantined { length, reason }) => {
                metrics.path_quarantines.inc();
                tracing::warn!(%prefill, ?length, %reason, "the path from this prefill worker is quarantined: its claims are declined until a probe lands");
            }
            Some(PathChange::Restored) => {
                tracing::info!(%prefill, "a probe landed: the path from this prefill worker is used again");
            }
            None => {}
        }
    }

    /// Probe the quarantined path from `prefill` (see [`super::paths`]): a
    /// one-block remote prefill of a prompt no cache holds, sent to that
    /// worker alone; [`Self::await_remote`] judges the path by its outcome.
    async fn probe(&self, prefill: String) {
        let parts = &self.inner.parts;
        let n = self
            .inner
            .probes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("probe-{}-{n}", parts.instance_id);
        let block_size = parts.engine.config().block_size;
        let nonce = rand::random::<u32>() as usize;
        // Token ids every model's vocabulary has; the nonce keeps it out of
        // both prefix caches.
        let prompt_token_ids = (0..=block_size)
            .map(|i| (100 + (nonce + i * 7919) % 1000) as u32)
            .collect();
        let request = Request {
            id: id.clone(),
            prompt_token_ids,
            sampling: SamplingParams {
                temperature: 0.0,
                max_tokens: Some(1),
                ..SamplingParams::default()
            },
        };
        let timeout = self.inner.config.remote_prefill_timeout.min(PROBE_TIMEOUT);
        let sent = async {
            let (outputs, reservation) = parts
                .engine
                .begin_remote_prefill(request.clone())
                .await
                .map_err(|e| e.to_string())?;
            let job = RemotePrefillRequest {
                // Read from our discovery record (see `PrefillMessage::Probe`).
                decode_transfer: None,
                ..self.remote_job(&request, &reservation, timeout)
            };
            let deadline = Instant::now() + timeout;
            let notified = self.inner.hub.expect(&id);
            let (pending, abandoned) = Pending::new(deadline, Some(prefill.clone()));
            lock(&self.inner.pending).insert(id.clone(), pending);
            let message = PrefillMessage::Probe(Box::new(job));
            let asked = async {
                let mut replies = parts
                    .bus
                    .request(&prefill, protocol::encode(&message).into(), timeout)
                    .await?;
                replies.next().await.transpose()
            };
            match tokio::time::timeout(timeout, asked).await {
                Ok(Ok(_)) => Ok((outputs, notified, abandoned, deadline)),
                failed => {
                    lock(&self.inner.pending).remove(&id);
                    self.inner.hub.forget(&id);
                    let _ = parts.engine.cancel_remote_prefill(&id).await;
                    let _ = parts.engine.cancel(&id);
                    Err(format!("{failed:?}"))
                }
            }
        };
        match sent.await {
            Ok((outputs, notified, abandoned, deadline)) => {
                tracing::info!(%prefill, request_id = %id, "probing a quarantined path");
                let (_keep, cancelled) = oneshot::channel();
                self.await_remote(
                    id.clone(),
                    notified,
                    abandoned,
                    cancelled,
                    deadline,
                    Instant::now(),
                    Some(&prefill),
                )
                .await;
                // Nobody reads a probe's tokens. Its reservation is
                // released (or fenced) by now, which queued it for a local
                // prefill: end it before that runs.
                drop(outputs);
                let _ = parts.engine.cancel(&id);
            }
            Err(e) => {
                tracing::warn!(%prefill, "a probe could not be sent: {e}");
                parts
                    .metrics
                    .path_probes
                    .with_label_values(&["not_sent"])
                    .inc();
                lock(&self.inner.paths).probe_not_sent(&prefill, Instant::now());
            }
        }
    }

    /// The queue job (or probe) asking a prefill worker for `request`'s KV
    /// into the blocks of `reservation`.
    fn remote_job(
        &self,
        request: &Request,
        reservation: &crate::engine::scheduler::RemoteReservation,
        timeout: Duration,
    ) -> RemotePrefillRequest {
        let parts = &self.inner.parts;
        let block_size = parts.engine.config().block_size;
        RemotePrefillRequest {
            request_id: request.id.clone(),
            model: parts.model.clone(),
            token_ids: request.prompt_token_ids.clone(),
            sampling: request.sampling.clone().into(),
            decode_instance: parts.instance_id.clone(),
            dst_blocks: reservation.block_ids.clone(),
            first_block: (reservation.cached_tokens / block_size) as u32,
            timeout_ms: timeout.as_millis() as u64,
            decode_transfer: Some(self.inner.transfer.clone()),
        }
    }

    fn settings(&self) -> RouterSettings {
        self.inner
            .parts
            .discovery
            .settings()
            .borrow()
            .clone()
            .unwrap_or_default()
    }

    fn threshold(&self, settings: &RouterSettings) -> u32 {
        self.inner
            .config
            .max_local_prefill_length
            .unwrap_or(settings.max_local_prefill_length)
    }

    async fn handle(&self, request: IncomingRequest) {
        let IncomingRequest { payload, responder } = request;
        match protocol::decode::<DecodeMessage>("decode request", &payload) {
            Ok(DecodeMessage::Generate(work)) => self.generate(work, responder).await,
            Ok(DecodeMessage::Claim {
                request_id,
                prefill_instance,
            }) => {
                let reply = self.claim(&request_id, &prefill_instance);
                let mut responder = responder;
                if responder
                    .send(protocol::encode(&reply).into())
                    .await
                    .is_ok()
                {
                    let _ = responder.end().await;
                }
            }
            Ok(DecodeMessage::Abandon {
                request_id,
                prefill_instance,
                reason,
                handed_back,
            }) => {
                self.abandon(&request_id, &prefill_instance, reason, handed_back);
                let _ = responder.end().await;
            }
            Err(e) => {
                tracing::warn!("{e}");
                fail(
                    responder,
                    WireErrorKind::InvalidRequest,
                    e.to_string(),
                    None,
                )
                .await;
            }
        }
    }

    /// Decide whether prefill worker `prefill_instance` may write the KV of
    /// `request_id` now.
    fn claim(&self, request_id: &str, prefill_instance: &str) -> ClaimReply {
        let mut pending = lock(&self.inner.pending);
        let Some(p) = pending.get_mut(request_id) else {
            return ClaimReply::Refuse;
        };
        let remaining = p.deadline.saturating_duration_since(Instant::now());
        if remaining <= self.inner.config.claim_margin {
            return ClaimReply::Refuse;
        }
        let may = match &p.claimed_by {
            None => true,
            Some(owner) if owner == prefill_instance => true,
            // The claimant died (its job was redelivered): it writes nothing more.
            Some(owner) => !self.inner.parts.is_alive(owner),
        };
        let path_open = match &p.probe_of {
            Some(probed) => probed == prefill_instance,
            None => {
                p.claimed_by.as_deref() == Some(prefill_instance)
                    || lock(&self.inner.paths).open(prefill_instance)
            }
        };
        if may && !path_open {
            // Back to the queue for another worker; after a few declines
            // the request is prefilled here instead of bouncing on.
            p.declines += 1;
            if p.declines >= MAX_DECLINES
                && p.claimed_by.is_none()
                && let Some(tell) = p.abandoned.take()
            {
                let _ = tell.send((
                    "path_quarantined",
                    format!("{} claims declined: quarantined paths", p.declines),
                ));
            }
            return ClaimReply::Decline;
        }
        if may {
            if p.claimed_by.is_none() {
                self.inner
                    .parts
                    .metrics
                    .prefill_queue_wait_seconds
                    .observe(p.enqueued.elapsed().as_secs_f64());
            }
            if p.claimed_by.as_deref() != Some(prefill_instance) {
                p.claimed_at = Some(Instant::now());
            }
            p.claimed_by = Some(prefill_instance.to_string());
            ClaimReply::Proceed {
                remaining_ms: remaining.as_millis() as u64,
            }
        } else {
            ClaimReply::Refuse
        }
    }

    /// Prefill worker `prefill_instance` gives up `request_id` (see
    /// [`DecodeMessage::Abandon`]). Only its claimant, or any worker while
    /// nobody has claimed it, may.
    fn abandon(&self, request_id: &str, prefill_instance: &str, reason: String, handed_back: bool) {
        let mut pending = lock(&self.inner.pending);
        let Some(p) = pending.get_mut(request_id) else {
            return;
        };
        match p.claimed_by.as_deref() {
            Some(owner) if owner != prefill_instance => return,
            Some(_) if handed_back => {
                p.handed_back();
                return;
            }
            None if handed_back => return,
            _ => {}
        }
        if let Some(tell) = p.abandoned.take() {
            let _ = tell.send(("prefill_failed", reason));
        }
    }

    async fn generate(&self, work: GenerateWork, responder: Responder) {
        let parts = &self.inner.parts;
        if work.model != parts.model {
            let message = format!("model {:?} is not served by this worker", work.model);
            return fail(responder, WireErrorKind::ModelNotFound, message, None).await;
        }
        if !*parts.registered.borrow() {
            let message = "this worker is not registered; try another".to_string();
            return fail(responder, WireErrorKind::Unavailable, message, None).await;
        }
        if self.draining() {
            let message = "this worker is shutting down; try another".to_string();
            return fail(responder, WireErrorKind::Unavailable, message, None).await;
        }
        let id = work.request_id.clone();
        let request = Request {
            id: id.clone(),
            prompt_token_ids: work.prompt_token_ids,
            sampling: work.sampling.into(),
        };
        let (outputs, cancel_remote) = match self.admit(request).await {
            Ok(admitted) => admitted,
            Err(AdmitError::Engine(e)) => {
                let param = e.param().map(str::to_string);
                return fail(responder, wire_kind(&e), e.to_string(), param).await;
            }
            Err(AdmitError::PrefillUnavailable(fallback)) => {
                let message = format!(
                    "no prefill worker can take this prompt ({}), and the deployment's \
                     router.onPrefillUnavailable is fail",
                    fallback.label()
                );
                return fail(responder, WireErrorKind::Unavailable, message, None).await;
            }
        };
        stream_outputs(&self.inner.parts, &id, outputs, responder, cancel_remote).await;
    }

    /// Admit `request` to the engine, prefilled locally or remotely. Returns
    /// its outputs and, for a remote prefill, the switch that withdraws it.
    async fn admit(
        &self,
        request: Request,
    ) -> Result<(mpsc::Receiver<OutputItem>, Option<oneshot::Sender<()>>), AdmitError> {
        let parts = &self.inner.parts;
        let metrics = &parts.metrics;
        let settings = self.settings();
        let threshold = self.threshold(&settings);
        metrics.max_local_prefill_length.set(i64::from(threshold));
        let local = |fallback: Option<Fallback>| {
            metrics.prefills.with_label_values(&["local"]).inc();
            if let Some(fallback) = fallback {
                metrics
                    .fallbacks
                    .with_label_values(&[fallback.label()])
                    .inc();
            }
        };
        let alive_prefill = parts.alive(Role::Prefill, &self.inner.kv_layout);
        let mut facts = PrefillFacts {
            prompt_len: request.prompt_token_ids.len(),
            threshold,
            disaggregated: settings.disaggregated,
            prefill_alive: !alive_prefill.is_empty(),
            paths_open: {
                let paths = lock(&self.inner.paths);
                alive_prefill.iter().any(|id| paths.open(id))
            },
            max_queue_depth: settings.max_prefill_queue_depth,
            refuse_fallbacks: settings.on_prefill_unavailable == PrefillUnavailable::Fail,
            ..PrefillFacts::default()
        };
        let refused = |fallback: Fallback| {
            metrics.prefills.with_label_values(&["refused"]).inc();
            AdmitError::PrefillUnavailable(fallback)
        };
        if prefill_step(&facts) == PrefillStep::QueryQueueDepth {
            let depth = tokio::time::timeout(
                self.inner.config.queue_query_timeout,
                parts.bus.prefill_queue_depth(&self.inner.kv_layout),
            )
            .await;
            facts.queue_depth = Some(match depth {
                Ok(Ok(depth)) => {
                    metrics.prefill_queue_depth.set(depth as i64);
                    Some(depth)
                }
                _ => None,
            });
        }
        match prefill_step(&facts) {
            PrefillStep::Local(fallback) => {
                local(fallback);
                return Ok((parts.engine.submit(request)?, None));
            }
            PrefillStep::Refuse(fallback) => return Err(refused(fallback)),
            _ => {}
        }

        let id = request.id.clone();
        let (outputs, reservation) = parts.engine.begin_remote_prefill(request.clone()).await?;
        facts.cached_tokens = Some(reservation.cached_tokens);
        if let PrefillStep::Local(fallback) = prefill_step(&facts) {
            parts.engine.cancel_remote_prefill(&id).await?;
            local(fallback);
            return Ok((outputs, None));
        }
        let timeout = self.inner.config.remote_prefill_timeout;
        let deadline = Instant::now() + timeout;
        let job = self.remote_job(&request, &reservation, timeout);
        let notified = self.inner.hub.expect(&id);
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let (mut pending, abandoned_rx) = Pending::new(deadline, None);
        let payload = bytes::Bytes::from(protocol::encode(&job));
        pending.job = Some(payload.clone());
        lock(&self.inner.pending).insert(id.clone(), pending);
        let enqueued = tokio::time::timeout(
            self.inner.config.queue_query_timeout * 5,
            parts.bus.enqueue_prefill(&self.inner.kv_layout, payload),
        )
        .await;
        facts.enqueued = Some(matches!(enqueued, Ok(Ok(()))));
        let step = prefill_step(&facts);
        if let PrefillStep::Local(_) | PrefillStep::Refuse(_) = step {
            tracing::warn!(request_id = %id, ?enqueued, "enqueue failed");
            lock(&self.inner.pending).remove(&id);
            self.inner.hub.forget(&id);
            parts.engine.cancel_remote_prefill(&id).await?;
            match step {
                PrefillStep::Refuse(fallback) => {
                    let _ = parts.engine.cancel(&id);
                    return Err(refused(fallback));
                }
                PrefillStep::Local(fallback) => {
                    local(fallback);
                    return Ok((outputs, None));
                }
                _ => {}
            }
        }
        let worker = self.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            worker
                .await_remote(
                    id,
                    notified,
                    abandoned_rx,
                    cancel_rx,
                    deadline,
                    started,
                    None,
                )
                .await
        });
        Ok((outputs, Some(cancel_tx)))
    }

    /// Wait for the KV of remote prefill `id`, then start decoding, or fall
    /// back to a local prefill when it does not come. Its outcome is a
    /// verdict on its claimant's path. A probe (`probe_of`: the prefill
    /// worker whose path it probes) is not decoded, whatever comes, and
    /// counts in no request's metrics.
    #[allow(clippy::too_many_arguments)]
    async fn await_remote(
        &self,
        id: String,
        notified: oneshot::Receiver<ReceivedNotification>,
        abandoned: AbandonedRx,
        cancelled: oneshot::Receiver<()>,
        deadline: Instant,
        started: Instant,
        probe_of: Option<&str>,
    ) {
        let parts = &self.inner.parts;
        let metrics = &parts.metrics;
        let deadline = tokio::time::Instant::from_std(deadline);
        let by_time = || {
            if tokio::time::Instant::now() >= deadline {
                "timeout"
            } else {
                "cancelled"
            }
        };
        let mut notified = notified;
        let withdrawn = self.withdraw_when_draining(&id);
        tokio::pin!(withdrawn);
        // `prefill_gone`: it is dead and writes nothing more;
        // `prefill_unresponsive`: it answers nothing (stopped, cut off) and
        // may still write, so its blocks get fenced.
        let claimant_gone = self.claimant_gone(&id);
        tokio::pin!(claimant_gone);
        let abandoned = async {
            match abandoned.await {
                Ok(reason) => reason,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::pin!(abandoned);
        let outcome = tokio::select! {
            n = &mut notified => n.map_err(|_| by_time()),
            _ = tokio::time::sleep_until(deadline) => Err("timeout"),
            () = &mut withdrawn => Err("draining"),
            (fallback, reason) = &mut abandoned => {
                tracing::info!(request_id = %id, %reason, "the remote prefill was given up");
                Err(fallback)
            }
            gone = &mut claimant_gone => Err(gone),
            Ok(()) = cancelled => {
                // The client left. An unclaimed request can go at once; a
                // claimed one may be receiving bytes: wait for them, the
                // claimant's word, or the deadline.
                if self.withdraw_unclaimed(&id) {
                    Err("cancelled")
                } else {
                    tokio::select! {
                        n = &mut notified => n.map_err(|_| by_time()),
                        _ = tokio::time::sleep_until(deadline) => Err("timeout"),
                        (fallback, _) = &mut abandoned => Err(fallback),
                        gone = &mut claimant_gone => Err(gone),
                    }
                }
            }
        };
        let pending = lock(&self.inner.pending).remove(&id);
        let claimant = pending.as_ref().and_then(|p| p.claimed_by.clone());
        let claimed_at = pending.as_ref().and_then(|p| p.claimed_at);
        let writing = pending.as_ref().is_some_and(|p| p.claimant_writing);
        // The verdict on the path: a landed KV, or a failure of the path's
        // claimant (or of a probe that nobody took). A deadline missed
        // while computing says the prefill worker is busy, not that the
        // path is broken; one missed with the write posted does.
        match (&outcome, claimant.as_deref().or(probe_of)) {
            (Ok(_), Some(prefill)) => {
                let latency = claimed_at.unwrap_or(started).elapsed();
                self.judge_path(prefill, Ok(latency));
            }
            (Err(reason @ ("prefill_failed" | "prefill_unresponsive")), Some(prefill)) => {
                self.judge_path(prefill, Err(reason))
            }
            (Err("timeout"), Some(prefill)) if writing => {
                self.judge_path(prefill, Err("write_timeout"))
            }
            (Err(_), Some(prefill)) if probe_of.is_some() => {
                self.judge_path(prefill, Err("probe_failed"))
            }
            _ => {}
        }
        if let Some(prefill) = probe_of {
            // Its blocks go back (or stay fenced) as a request's would
            // (below); the prober ends the request after.
            let result = if outcome.is_ok() { "ok" } else { "failed" };
            metrics.path_probes.with_label_values(&[result]).inc();
            tracing::info!(%prefill, request_id = %id, result, "probe over");
        }
        // Who may still write into the blocks: the claimant, unless it gave
        // the job up or is gone.
        let writer = match outcome {
            Err("prefill_failed" | "prefill_gone") | Ok(_) => None,
            Err(_) => claimant,
        };
        if writer.is_none() {
            self.inner.hub.forget(&id);
        }
        match outcome {
            Ok(n) => {
                metrics
                    .transfer_bytes
                    .with_label_values(&["received"])
                    .inc_by(u64::from(n.notification.num_blocks) * self.inner.block_bytes);
                if probe_of.is_some() {
                    let _ = parts.engine.cancel_remote_prefill(&id).await;
                    return;
                }
                metrics
                    .remote_prefill_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.prefills.with_label_values(&["remote"]).inc();
                if let Err(e) = parts
                    .engine
                    .complete_remote_prefill(
                        &id,
                        n.notification.first_token,
                        n.notification.first_logprobs.map(TokenLogprobs::from),
                    )
                    .await
                {
                    tracing::warn!(request_id = %id, "completing the remote prefill failed: {e}");
                    let _ = parts.engine.cancel_remote_prefill(&id).await;
                }
            }
            Err(reason) => {
                if probe_of.is_none() {
                    tracing::info!(request_id = %id, reason, "no remote KV; prefilling locally");
                    metrics.fallbacks.with_label_values(&[reason]).inc();
                    metrics.prefills.with_label_values(&["local"]).inc();
                }
                let Some(writer) = writer else {
                    if let Err(e) = parts.engine.cancel_remote_prefill(&id).await {
                        tracing::warn!(request_id = %id, "releasing the remote reservation failed: {e}");
                    }
                    return;
                };
                // The claimant may still be writing (late, stopped, slow):
                // its blocks stay fenced until it provably stopped, and the
                // local prefill takes other blocks, now.
                match parts.engine.fence_remote_prefill(&id).await {
                    Ok(fence) => {
                        tracing::info!(request_id = %id, %writer, ?fence, "the claimant may still write: its blocks are fenced");
                        let (worker, id) = (self.clone(), id.clone());
                        tokio::spawn(async move {
                            worker
                                .release_when_stopped(id, writer, fence, notified)
                                .await
                        });
                    }
                    Err(e) => {
                        self.inner.hub.forget(&id);
                        tracing::warn!(request_id = %id, "fencing the remote reservation failed: {e}");
                    }
                }
            }
        }
    }

    /// Give back the blocks of `fence` (remote prefill `id`, claimed by
    /// `writer`) once nothing more can be written into them: the write's
    /// notification arrived (it ended), or `writer` says the job is over
    /// (finished, or unknown twice in a row), or nobody serves its subject
    /// any more (the process is gone). A writer that answers nothing (for
    /// example stopped) keeps the blocks fenced until one of these holds;
    /// the bus drops a stopped client's subscriptions after its ping
    /// timeout, so the hold is bounded by that.
    async fn release_when_stopped(
        &self,
        id: String,
        writer: String,
        fence: FenceId,
        notified: oneshot::Receiver<ReceivedNotification>,
    ) {
        let interval = self.inner.config.claimant_check_interval;
        let held = Instant::now();
        let poll_writer = async {
            let mut watch = ClaimantWatch::default();
            loop {
                tokio::time::sleep(interval).await;
                let answer = self.job_status(&writer, &id, interval).await;
                match watch.observe(&answer) {
                    Some(Verdict::Gone) => return "the writer is gone or does not know the job",
                    Some(Verdict::Finished) => return "the writer finished the job",
                    Some(Verdict::Silent(_)) | None => {}
                }
            }
        };
        let why = tokio::select! {
            Ok(_) = notified => "the late write landed",
            why = poll_writer => why,
        };
        self.inner.hub.forget(&id);
        tracing::info!(request_id = %id, %writer, held = ?held.elapsed(), why, "fenced KV blocks released");
        if let Err(e) = self.inner.parts.engine.release_fence(fence) {
            tracing::warn!(request_id = %id, "releasing fenced blocks failed: {e}");
        }
    }

    /// Resolves once the claimant of remote prefill `id` is gone (the bus
    /// finds nobody serving its subject, or it twice in a row does not know
    /// the job): `"prefill_gone"`; or has answered nothing for
    /// [`DecodeConfig::claimant_silence_limit`] (a stopped or cut-off
    /// process, which may still write later): `"prefill_unresponsive"`.
    /// Asked every [`DecodeConfig::claimant_check_interval`] while the job
    /// is claimed.
    async fn claimant_gone(&self, id: &str) -> &'static str {
        let interval = self.inner.config.claimant_check_interval;
        let mut watch = ClaimantWatch::default();
        loop {
            tokio::time::sleep(interval).await;
            let owner = lock(&self.inner.pending)
                .get(id)
                .and_then(|p| p.claimed_by.clone());
            let Some(owner) = owner else {
                watch = ClaimantWatch::default();
                continue;
            };
            let answer = self.job_status(&owner, id, interval).await;
            if let Ok(Some(status)) = &answer
                && let Some(p) = lock(&self.inner.pending).get_mut(id)
            {
                p.claimant_writing = *status == JobStatus::Writing;
            }
            match watch.observe(&answer) {
                Some(Verdict::Gone) => {
                    tracing::info!(request_id = %id, prefill = %owner, ?answer, "the claimant is gone");
                    return "prefill_gone";
                }
                Some(Verdict::Silent(silent))
                    if silent >= self.inner.config.claimant_silence_limit =>
                {
                    tracing::info!(request_id = %id, prefill = %owner, ?silent, "the claimant answers nothing");
                    return "prefill_unresponsive";
                }
                // Its notification is on its way.
                Some(Verdict::Finished | Verdict::Silent(_)) | None => {}
            }
        }
    }

    /// Ask prefill worker `owner` about job `id`, within `limit`; `None`
    /// when no answer came in time.
    async fn job_status(
        &self,
        owner: &str,
        id: &str,
        limit: Duration,
    ) -> Result<Option<JobStatus>, BusError> {
        let message = PrefillMessage::Status {
            request_id: id.to_string(),
        };
        let ask = async {
            let mut replies = self
                .inner
                .parts
                .bus
                .request(owner, protocol::encode(&message).into(), limit)
                .await?;
            match replies.next().await {
                Some(Ok(bytes)) => Ok(Some(
                    protocol::decode::<JobStatus>("job status", &bytes)
                        .unwrap_or(JobStatus::Working),
                )),
                Some(Err(BusError::Timeout(_))) => Ok(None),
                Some(Err(e)) => Err(e),
                None => Ok(Some(JobStatus::Working)),
            }
        };
        match tokio::time::timeout(limit, ask).await {
            Ok(Err(BusError::Timeout(_))) | Err(_) => Ok(None),
            Ok(answer) => answer,
        }
    }

    /// Resolves once the worker is draining and, at the drain's withdrawal
    /// time, remote prefill `id` is still unclaimed: it is then withdrawn.
    /// Never resolves for a claimed request (its claimant may be writing).
    async fn withdraw_when_draining(&self, id: &str) {
        let mut drain = self.inner.drain.subscribe();
        let at = match drain.wait_for(Option::is_some).await {
            Ok(at) => *at,
            Err(_) => None,
        };
        let Some(at) = at else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(at).await;
        if !self.withdraw_unclaimed(id) {
            std::future::pending::<()>().await;
        }
    }

    /// Take remote prefill `id` out of the pending ones if no prefill
    /// worker has claimed it; from then on every claim of it is refused, so
    /// nobody writes into its blocks. Says whether it did.
    fn withdraw_unclaimed(&self, id: &str) -> bool {
        let mut pending = lock(&self.inner.pending);
        let unclaimed = pending.get(id).is_some_and(|p| p.claimed_by.is_none());
        if unclaimed {
            pending.remove(id);
        }
        unclaimed
    }
}

/// What the answers of a claimant to [`PrefillMessage::Status`] add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Nobody serves its subject, or it did not know the job twice in a
    /// row: it writes nothing more.
    Gone,
    /// It ended the job (written, failed or expired).
    Finished,
    /// It has answered nothing for this long.
    Silent(Duration),
}

/// Reads a claimant's successive status answers (see [`Verdict`]).
#[derive(Debug, Default)]
struct ClaimantWatch {
    unknown: u32,
    silent_since: Option<Instant>,
}

impl ClaimantWatch {
    /// Takes one answer of `DecodeWorker::job_status`.
    fn observe(&mut self, answer: &Result<Option<JobStatus>, BusError>) -> Option<Verdict> {
        if !matches!(answer, Ok(None)) {
            self.silent_since = None;
        }
        // Silence neither confirms nor refutes an earlier "unknown".
        if !matches!(answer, Ok(Some(JobStatus::Unknown) | None)) {
            self.unknown = 0;
        }
        match answer {
            Err(BusError::NoResponders(_)) => Some(Verdict::Gone),
            Ok(Some(JobStatus::Unknown)) => {
                self.unknown += 1;
                (self.unknown >= 2).then_some(Verdict::Gone)
            }
            Ok(Some(JobStatus::Finished)) => Some(Verdict::Finished),
            Ok(None) => Some(Verdict::Silent(
                self.silent_since.get_or_insert_with(Instant::now).elapsed(),
            )),
            Ok(Some(JobStatus::Working | JobStatus::Writing)) | Err(_) => None,
        }
    }
}

/// Stream a request's outputs to the requester; stop the request when the
/// requester goes away.
async fn stream_outputs(
    parts: &WorkerParts,
    id: &str,
    mut outputs: mpsc::Receiver<OutputItem>,
    mut responder: Responder,
    cancel_remote: Option<oneshot::Sender<()>>,
) {
    let cancelled = responder.cancelled();
    tokio::pin!(cancelled);
    let mut cancel_remote = cancel_remote;
    loop {
        let item = tokio::select! {
            item = outputs.recv() => item,
            _ = &mut cancelled => {
                tracing::debug!(request_id = %id, "requester left; cancelling");
                if let Some(tx) = cancel_remote.take() {
                    let _ = tx.send(());
                }
                let _ = parts.engine.cancel(id);
                return;
            }
        };
        let event = match item {
            None => break,
            Some(Ok(output)) => {
                // The first token is out: a remote prefill is over.
                cancel_remote = None;
                GenerateEvent::from(output)
            }
            Some(Err(e)) => GenerateEvent::Error {
                kind: wire_kind(&e),
                message: e.to_string(),
                param: e.param().map(str::to_string),
            },
        };
        if responder
            .send(protocol::encode(&event).into())
            .await
            .is_err()
        {
            if let Some(tx) = cancel_remote.take() {
                let _ = tx.send(());
            }
            let _ = parts.engine.cancel(id);
            return;
        }
    }
    let _ = responder.end().await;
}

/// How an engine failure travels back to the frontend.
/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
enum AdmitError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A remote prefill could not happen and the deployment refuses to
    /// fall back (`router.onPrefillUnavailable: fail`).
    #[error("no prefill worker can take the prompt ({})", .0.label())]
    PrefillUnavailable(Fallback),
}

fn wire_kind(e: &EngineError) -> WireErrorKind {
    match e.kind() {
        EngineErrorKind::InvalidRequest => WireErrorKind::InvalidRequest,
        EngineErrorKind::Unavailable => WireErrorKind::Unavailable,
        EngineErrorKind::Internal => WireErrorKind::Internal,
    }
}

async fn fail(
    mut responder: Responder,
    kind: WireErrorKind,
    message: String,
    param: Option<String>,
) {
    let event = GenerateEvent::Error {
        kind,
        message,
        param,
    };
    if responder
        .send(protocol::encode(&event).into())
        .await
        .is_ok()
    {
        let _ = responder.end().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job handed back by its claimant is back on the queue, not lost,
    /// however long ago it was first enqueued; unclaimed and long off the
    /// queue it is.
    #[test]
    fn a_job_handed_back_late_is_not_taken_for_lost() {
        let (mut p, _told) = Pending::new(Instant::now() + Duration::from_secs(60), None);
        p.job = Some(bytes::Bytes::from_static(b"job"));
        p.last_enqueued = Instant::now() - 2 * REQUEUE_AFTER;
        assert!(p.looks_lost(), "unclaimed since long ago");
        p.claimed_by = Some("prefill-0".into());
        assert!(!p.looks_lost(), "claimed");
        p.handed_back();
        assert_eq!(p.claimed_by, None, "free to claim again");
        assert!(!p.looks_lost(), "just handed back to the queue");
        p.last_enqueued = Instant::now() - 2 * REQUEUE_AFTER;
        p.requeues = MAX_REQUEUES;
        assert!(!p.looks_lost(), "put back as often as it may be");
    }

    #[test]
    fn a_claimants_answers_add_up_to_gone_finished_or_silent() {
        let unknown = Ok(Some(JobStatus::Unknown));
        let working = Ok(Some(JobStatus::Working));
        let mut w = ClaimantWatch::default();
        assert_eq!(w.observe(&unknown), None);
        assert_eq!(
            w.observe(&working),
            None,
            "a working answer resets the count"
        );
        assert_eq!(w.observe(&unknown), None);
        assert!(matches!(w.observe(&Ok(None)), Some(Verdict::Silent(_))));
        assert_eq!(
            w.observe(&unknown),
            Some(Verdict::Gone),
            "silence does not reset it"
        );
        let mut w = ClaimantWatch::default();
        assert_eq!(
            w.observe(&Err(BusError::NoResponders("p".into()))),
            Some(Verdict::Gone)
        );
        assert_eq!(
            w.observe(&Ok(Some(JobStatus::Finished))),
            Some(Verdict::Finished)
        );
        let Some(Verdict::Silent(first)) = w.observe(&Ok(None)) else {
            panic!("silent")
        };
        std::thread::sleep(Duration::from_millis(20));
        let Some(Verdict::Silent(later)) = w.observe(&Ok(None)) else {
            panic!("silent")
        };
        assert!(later > first, "silence is counted from its first answer");
        assert_eq!(w.observe(&working), None);
        let Some(Verdict::Silent(fresh)) = w.observe(&Ok(None)) else {
            panic!("silent")
        };
        assert!(fresh < later, "an answer ends the silence");
    }
}
