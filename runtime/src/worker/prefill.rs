//! The prefill worker: takes remote-prefill jobs from the queue, computes
//! each prompt's KV (reusing its own prefix cache), and NIXL-writes it into
//! the blocks the decode worker reserved, with the first sampled token in
//! the completion notification.
//!
//! A job is acknowledged once its outcome is final (written, expired,
//! refused, failed: a failed job is not retried, and the decode worker is
//! told at once ([`DecodeMessage::Abandon`]) so it prefills locally without
//! waiting out its deadline); a worker that dies mid-job leaves it
//! unacknowledged and the queue redelivers it to another worker. Before
//! computing, the worker claims the request from its decode worker, so a
//! job that was already answered (or given up) is never computed or
//! written twice. The claim's reply says how long the worker may take,
//! counted from when it sent the claim, so no deadline is compared across
//! two hosts' clocks.
//!
//! The worker answers [`PrefillMessage::Status`] on its own subject for as
//! long as it runs: a decode worker waiting for a claimed job asks it, and
//! when the bus finds nobody serving the subject (the process is gone) the
//! decode worker prefills locally at once.
//!
//! Drain (after `shutdown`, which deregisters the worker first): no new
//! job is taken; the jobs in progress get the grace period less
//! [`HANDBACK_MARGIN`] to finish. Those still computing then are handed
//! back (`nak`: redelivered at once to another worker, and at most the
//! queue's `max_deliver` times in all), as are jobs whose engine shut down
//! under them. A job whose write is posted is never handed back: the write
//! ends by its deadline, and a second writer could race it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::{InFlight, WorkerParts};
use crate::bus::{IncomingRequest, PrefillJob};
use crate::engine::runner::{EngineError, Request};
use crate::engine::sampling::{SamplingParams, TokenLogprobs};
use crate::transfer::{PeerInfo, TransferNotification};
use xpyd_api::WireLogprobs;
use xpyd_api::messages::{
    self as protocol, ClaimReply, DecodeMessage, JobStatus, PrefillMessage, RemotePrefillRequest,
};

/// Settings of a prefill worker.
#[derive(Debug, Clone)]
pub struct PrefillConfig {
    /// Jobs this worker computes at once (the engine batches them). One
    /// by default: the queue is shared, so a job taken while another is
    /// computing waits here behind it even when another worker is idle, or
    /// one just started by the planner could take it; a CPU engine
    /// computes two prompts no faster together than one after the other.
    /// A job's slot is freed once its KV is computed and its NIXL write
    /// posted, so the transfer overlaps the next job's compute. Raise it
    /// where one prompt leaves the device's step underused (a GPU).
    pub max_concurrent: usize,
    /// Deadline of the claim round trip to the decode worker.
    pub claim_timeout: Duration,
    /// How often a job in progress tells the queue it is alive.
    pub progress_interval: Duration,
    /// A fault to inject, for tests only ([`PrefillFault::from_env`]).
    pub fault: Option<PrefillFault>,
}

/// A fault a test injects into a prefill worker, at an instant no signal
/// from outside can hit reliably. Set with `XPYD_TEST_FAULT`; never in
/// production (the worker logs a warning at startup when one is set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefillFault {
    /// `stop-before-write`: the first job that passed its deadline check
    /// stops the whole process (SIGSTOP) just before it posts its write,
    /// as a stall (a pause, a swapped-out page, a descheduled VM) there
    /// would; whoever sends SIGCONT makes it a late writer.
    StopBeforeWrite,
    /// `stop-after-post`: the first job stops the process right after it
    /// posted its write, with the write in flight: a test then kills this
    /// worker, or its decode worker, mid-write.
    StopAfterPost,
    /// `stop-mid-write`: the first job writes the first half of its blocks
    /// (a complete NIXL write of their bytes, without a notification),
    /// then stops the process before the second half: a test that then
    /// kills this worker leaves the decode worker's blocks half written,
    /// with certainty, whatever the transport's speed.
    StopMidWrite,
    /// `cut-writes-while:<file>`: while `<file>` exists, every NIXL write
    /// fails as a cut data path would (a firewalled transfer port, a
    /// broken link), with the bus still healthy. On one host UCX moves the
    /// bytes through shared memory, which no firewall rule can cut, so the
    /// cut is made at the write call; everything around it is real.
    CutWrites(std::path::PathBuf),
}

impl PrefillFault {
    /// The fault named by `XPYD_TEST_FAULT`, if any; an unknown name is an
    /// error naming the ones there are.
    pub fn from_env() -> Result<Option<PrefillFault>, String> {
        match std::env::var("XPYD_TEST_FAULT").as_deref() {
            Err(_) | Ok("") => Ok(None),
            Ok("stop-before-write") => Ok(Some(PrefillFault::StopBeforeWrite)),
            Ok("stop-after-post") => Ok(Some(PrefillFault::StopAfterPost)),
            Ok("stop-mid-write") => Ok(Some(PrefillFault::StopMidWrite)),
            Ok(other) => match other.strip_prefix("cut-writes-while:") {
                Some(file) if !file.is_empty() => Ok(Some(PrefillFault::CutWrites(file.into()))),
                _ => Err(format!(
                    "XPYD_TEST_FAULT={other:?} is not a fault this worker knows \
                     (stop-before-write, stop-after-post, stop-mid-write, \
                     cut-writes-while:<file>)"
                )),
            },
        }
    }
}

impl Default for PrefillConfig {
    fn default() -> Self {
        PrefillConfig {
            max_concurrent: 1,
            claim_timeout: Duration::from_secs(5),
            progress_interval: Duration::from_secs(2),
            fault: None,
        }
    }
}

/// Before the grace period ends, how long a draining worker keeps to hand
/// back the jobs it could not finish (at most half the grace period).
pub const HANDBACK_MARGIN: Duration = Duration::from_secs(1);

/// How long a finished job is still reported as [`JobStatus::Finished`]
/// (its notification or abandonment is then long delivered).
const FINISHED_MEMORY: Duration = Duration::from_secs(120);

/// The jobs this worker holds, and those it finished lately, by request id.
#[derive(Default)]
struct JobBook {
    working: HashMap<String, usize>,
    /// Jobs whose write is posted.
    writing: std::collections::HashSet<String>,
    finished: HashMap<String, Instant>,
    /// Jobs computing now, and since when at least one has been (the part
    /// of that time not yet counted in `xpyd_prefill_busy_seconds_total`).
    computing: usize,
    busy_since: Option<Instant>,
}

impl JobBook {
    fn start(&mut self, id: &str) {
        *self.working.entry(id.to_string()).or_default() += 1;
    }

    fn finish(&mut self, id: &str) {
        self.writing.remove(id);
        if let Some(n) = self.working.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                self.working.remove(id);
            }
        }
        let now = Instant::now();
        self.finished
            .retain(|_, at| now.duration_since(*at) < FINISHED_MEMORY);
        self.finished.insert(id.to_string(), now);
    }

    /// A job starts computing.
    fn compute_started(&mut self) {
        self.computing += 1;
        self.busy_since.get_or_insert_with(Instant::now);
    }

    /// A job stops computing; returns busy time not yet counted.
    fn compute_ended(&mut self) -> Duration {
        self.computing = self.computing.saturating_sub(1);
        let busy = self.busy_time();
        if self.computing == 0 {
            self.busy_since = None;
        }
        busy
    }

    /// Busy time since it was last counted (and restart counting from now).
    fn busy_time(&mut self) -> Duration {
        match &mut self.busy_since {
            Some(since) => {
                let now = Instant::now();
                let busy = now.duration_since(*since);
                *since = now;
                busy
            }
            None => Duration::ZERO,
        }
    }

    fn status(&self, id: &str) -> JobStatus {
        if self.writing.contains(id) {
            JobStatus::Writing
        } else if self.working.contains_key(id) {
            JobStatus::Working
        } else if self.finished.contains_key(id) {
            JobStatus::Finished
        } else {
            JobStatus::Unknown
        }
    }
}

/// The token the prefill samples, which rides with the KV to the decode
/// worker.
#[derive(Debug)]
struct FirstToken {
    token: u32,
    logprobs: Option<TokenLogprobs>,
}

/// How a job ended (the `result` label of `xpyd_prefill_jobs_total`).
#[derive(Debug)]
enum JobEnd {
    Written,
    /// Past its deadline before we could write.
    Expired,
    /// The decode worker no longer wants it (or another worker has it).
    Refused,
    Failed(String),
    /// Not finished because this worker is shutting down: redeliver it.
    HandedBack(String),
    /// The decode worker declined our claim (our path to it is
    /// quarantined): redeliver it, to another worker.
    Declined,
}

/// A prefill worker. Cheap to clone.
#[derive(Clone)]
pub struct PrefillWorker {
    parts: WorkerParts,
    config: PrefillConfig,
    /// Turns true when jobs still computing must be handed back.
    handback: Arc<watch::Sender<bool>>,
    jobs: Arc<Mutex<JobBook>>,
    /// Set once the injected fault fired (it fires once).
    fault_fired: Arc<std::sync::atomic::AtomicBool>,
}

impl PrefillWorker {
    pub fn new(parts: WorkerParts, config: PrefillConfig) -> PrefillWorker {
        if let Some(fault) = &config.fault {
            tracing::warn!(?fault, "a test fault is injected into this prefill worker");
        }
        let worker = PrefillWorker {
            fault_fired: Arc::default(),
            parts,
            config,
            handback: Arc::new(watch::Sender::new(false)),
            jobs: Arc::default(),
        };
        worker.refresh_at_scrape();
        worker
    }

    fn book(&self) -> std::sync::MutexGuard<'_, JobBook> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set the live gauges at every scrape: the engine's and the jobs in
    /// progress, and count busy time so far.
    fn refresh_at_scrape(&self) {
        let parts = self.parts.live_gauges();
        let jobs = self.jobs.clone();
        self.parts.metrics.refresh_at_scrape(move |metrics| {
            parts(metrics);
            let (working, busy) = {
                let mut book = jobs.lock().unwrap_or_else(|p| p.into_inner());
                (book.working.len(), book.busy_time())
            };
            metrics.prefill_jobs_in_progress.set(working as i64);
            metrics.prefill_busy_seconds.inc_by(busy.as_secs_f64());
        });
    }

    /// Answer status queries on this worker's subject until dropped.
    async fn answer_status(self) {
        loop {
            let parts = &self.parts;
            let mut requests = match parts.bus.serve(&parts.instance_id).await {
                Ok(requests) => requests,
                Err(e) => {
                    tracing::warn!("cannot serve status queries: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(IncomingRequest {
                payload,
                mut responder,
            }) = requests.next().await
            {
                let status = match protocol::decode::<PrefillMessage>("prefill request", &payload) {
                    Ok(PrefillMessage::Status { request_id }) => self.book().status(&request_id),
                    Ok(PrefillMessage::Probe(job)) => {
                        // A one-block job sent to us alone: served as a
                        // queue job, with nothing to ack.
                        tracing::info!(request_id = %job.request_id, decode = %job.decode_instance, "probed by a decode worker");
                        let direct =
                            PrefillJob::new(protocol::encode(&job).into(), 1, Box::new(DirectJob));
                        let worker = self.clone();
                        tokio::spawn(async move { worker.process(direct, None).await });
                        let _ = responder.end().await;
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!("{e}");
                        JobStatus::Unknown
                    }
                };
                if responder
                    .send(protocol::encode(&status).into())
                    .await
                    .is_ok()
                {
                    let _ = responder.end().await;
                }
            }
            tracing::warn!("status subscription ended; re-subscribing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Take jobs until `shutdown` resolves, then drain (see the module doc)
    /// for at most `grace`.
    pub async fn run(&self, shutdown: impl Future<Output = ()>, grace: Duration) {
        // Only jobs of decode workers whose blocks our KV fits.
        let kv_layout = self.parts.kv_layout();
        tracing::info!(%kv_layout, "taking prefill jobs of this KV layout");
        let slots = Arc::new(Semaphore::new(self.config.max_concurrent.max(1)));
        let in_flight = InFlight::default();
        let mut registered = self.parts.registered.clone();
        // Answered until this function returns, drain included.
        let status = tokio::spawn(self.clone().answer_status());
        let _stop_status = AbortOnDrop(status);
        tokio::pin!(shutdown);
        'outer: loop {
            let mut jobs = tokio::select! {
                _ = &mut shutdown => break,
                jobs = self.parts.bus.prefill_jobs(&kv_layout) => match jobs {
                    Ok(jobs) => jobs,
                    Err(e) => {
                        tracing::warn!("cannot consume the prefill queue: {e}; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            loop {
                // A free slot first: a busy worker leaves jobs to the others.
                let slot = tokio::select! {
                    _ = &mut shutdown => break 'outer,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break 'outer,
                    },
                };
                // Not registered: nobody may count on us; take nothing.
                if !*registered.borrow() {
                    tokio::select! {
                        _ = &mut shutdown => break 'outer,
                        _ = registered.wait_for(|r| *r) => {}
                    }
                }
                let job = tokio::select! {
                    _ = &mut shutdown => break 'outer,
                    job = jobs.next() => job,
                };
                let Some(job) = job else {
                    tracing::warn!("prefill queue subscription ended; re-subscribing");
                    break;
                };
                let worker = self.clone();
                let busy = in_flight.enter();
                tokio::spawn(async move {
                    worker.process(job, Some(slot)).await;
                    drop(busy);
                });
            }
        }
        let margin = HANDBACK_MARGIN.min(grace / 2);
        tracing::info!(jobs = in_flight.count(), "draining");
        let finished = tokio::time::timeout(grace - margin, in_flight.idle())
            .await
            .is_ok();
        if !finished {
            tracing::warn!(
                jobs = in_flight.count(),
                "grace period nearly over; handing back the jobs still computing"
            );
            self.handback.send_replace(true);
            in_flight.wait_idle(margin).await;
        }
    }

    /// One job to its end; `slot` (the worker's compute slot, `None` for a
    /// probe) is freed once the job's KV is computed and its write posted.
    async fn process(&self, mut job: PrefillJob, slot: Option<OwnedSemaphorePermit>) {
        let mut decoded = None;
        let end = match protocol::decode::<RemotePrefillRequest>("prefill job", &job.payload) {
            Err(e) => JobEnd::Failed(e.to_string()),
            Ok(request) => {
                self.book().start(&request.request_id);
                decoded = Some(request.clone());
                let work = self.serve(&request, slot);
                tokio::pin!(work);
                let mut tick = tokio::time::interval(self.config.progress_interval);
                tick.tick().await;
                loop {
                    tokio::select! {
                        end = &mut work => break end,
                        _ = tick.tick() => {
                            if let Err(e) = job.progress().await {
                                tracing::debug!("progress report failed: {e}");
                            }
                        }
                    }
                }
            }
        };
        if let Some(request) = &decoded {
            // Tell the decode worker before it can ask (or wait): a failed
            // job falls back at once, a handed-back one frees its claim.
            match &end {
                JobEnd::Failed(reason) => self.abandon(request, reason, false).await,
                JobEnd::HandedBack(reason) => self.abandon(request, reason, true).await,
                JobEnd::Written | JobEnd::Expired | JobEnd::Refused | JobEnd::Declined => {}
            }
            self.book().finish(&request.request_id);
        }
        let result = match &end {
            JobEnd::Written => "ok",
            JobEnd::Expired => "expired",
            JobEnd::Refused => "refused",
            JobEnd::Declined => "declined",
            JobEnd::Failed(reason) => {
                tracing::warn!(delivered = job.delivered, "prefill job failed: {reason}");
                "failed"
            }
            JobEnd::HandedBack(reason) => {
                tracing::info!(
                    delivered = job.delivered,
                    "handing a prefill job back: {reason}"
                );
                "handed_back"
            }
        };
        self.parts
            .metrics
            .prefill_jobs
            .with_label_values(&[result])
            .inc();
        if let JobEnd::HandedBack(_) | JobEnd::Declined = end {
            // Another worker can still make the deadline; the queue's
            // `max_deliver` bounds how often this happens to one job.
            if let Err(e) = job.nak().await {
                tracing::warn!("handing back a prefill job failed: {e}");
            }
            return;
        }
        // A failed job is not retried here: the decode worker, told above,
        // prefills locally, which is faster than a second try.
        if let Err(e) = job.ack().await {
            tracing::warn!("acknowledging a prefill job failed: {e}");
        }
    }

    /// Claim, compute and write one job; `slot` is dropped once the write
    /// is posted (the transfer does not hold it).
    async fn serve(
        &self,
        request: &RemotePrefillRequest,
        slot: Option<OwnedSemaphorePermit>,
    ) -> JobEnd {
        let parts = &self.parts;
        let id = &request.request_id;
        if request.model != parts.model {
            return JobEnd::Failed(format!(
                "job {id} is for model {:?}, this worker serves {:?}",
                request.model, parts.model
            ));
        }
        let claim = tokio::select! {
            claim = self.claim(request) => claim,
            reason = self.handed_back() => return JobEnd::HandedBack(reason),
        };
        let deadline = match claim {
            Ok((ClaimReply::Proceed { remaining_ms }, sent)) => {
                tracing::debug!(request_id = %id, remaining_ms, "claimed; computing");
                sent + Duration::from_millis(remaining_ms)
            }
            Ok((ClaimReply::Refuse, _)) => return JobEnd::Refused,
            Ok((ClaimReply::Decline, _)) => return JobEnd::Declined,
            Err(reason) => return JobEnd::Failed(format!("claiming {id}: {reason}")),
        };
        // A job that cannot reach its decode worker's memory fails, counted
        // as a `peer` transfer failure.
        let peer_failed = |reason: String| {
            parts
                .metrics
                .transfer_failures
                .with_label_values(&["peer"])
                .inc();
            JobEnd::Failed(reason)
        };
        // The job's copy first: a draining decode worker has deregistered
        // (and the claim just proved it alive and waiting).
        let peer = request.decode_transfer.clone().or_else(|| {
            parts
                .discovery
                .instances()
                .borrow()
                .get(&request.decode_instance)
                .and_then(|r| r.transfer.clone())
        });
        let Some(peer) = peer else {
            return peer_failed(format!(
                "decode instance {} sent no NIXL metadata and has no transfer record",
                request.decode_instance
            ));
        };
        let peer = match PeerInfo::from_metadata(&peer) {
            Ok(peer) => peer,
            Err(e) => {
                return peer_failed(format!(
                    "decode instance {}: unreadable NIXL metadata: {e}",
                    request.decode_instance
                ));
            }
        };
        let peer_name = peer.agent_name.clone();
        if let Err(e) = parts.agent.load_peer(peer) {
            return peer_failed(e.to_string());
        }

        // Our engine ids must not clash with a decode worker's in `up`,
        // where engines share nothing but a process.
        let engine_id = format!("{id}@prefill");
        // Computing is what a draining worker may give up (nothing is
        // written yet); once the write is posted, it runs to its end.
        let first = tokio::select! {
            first = self.first_token(&engine_id, request, deadline) => first,
            reason = self.handed_back() => Err(JobEnd::HandedBack(reason)),
        };
        let first = match first {
            Ok(first) => first,
            Err(end) => {
                let _ = parts.engine.cancel(&engine_id);
                return end;
            }
        };
        let end = self
            .write(&engine_id, request, first, &peer_name, deadline, slot)
            .await;
        // Release the held KV (its blocks stay in our prefix cache).
        let _ = parts.engine.cancel(&engine_id);
        end
    }

    /// Resolves when the drain hands back the jobs still computing.
    async fn handed_back(&self) -> String {
        let mut handback = self.handback.subscribe();
        if handback.wait_for(|h| *h).await.is_err() {
            return std::future::pending().await;
        }
        "the worker is shutting down and the grace period is nearly over".to_string()
    }

    /// Send `message` to `request`'s decode worker and take its first reply
    /// (`None`: it ended the answer without one), within the claim deadline.
    async fn ask_decode(
        &self,
        request: &RemotePrefillRequest,
        message: &DecodeMessage,
    ) -> Result<Option<bytes::Bytes>, String> {
        let ask = async {
            let mut replies = self
                .parts
                .bus
                .request(
                    &request.decode_instance,
                    protocol::encode(message).into(),
                    self.config.claim_timeout,
                )
                .await
                .map_err(|e| e.to_string())?;
            replies.next().await.transpose().map_err(|e| e.to_string())
        };
        tokio::time::timeout(self.config.claim_timeout, ask)
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()))
    }

    /// Claim the job from its decode worker; the reply, and when the claim
    /// was sent (the reply's time counts from then).
    async fn claim(&self, request: &RemotePrefillRequest) -> Result<(ClaimReply, Instant), String> {
        let sent = Instant::now();
        let message = DecodeMessage::Claim {
            request_id: request.request_id.clone(),
            prefill_instance: self.parts.instance_id.clone(),
        };
        let bytes = self
            .ask_decode(request, &message)
            .await?
            .ok_or_else(|| "no claim reply".to_string())?;
        let reply =
            protocol::decode::<ClaimReply>("claim reply", &bytes).map_err(|e| e.to_string())?;
        Ok((reply, sent))
    }

    /// Tell the decode worker that this worker gives `request` up (see
    /// [`DecodeMessage::Abandon`]); best effort, within the claim deadline.
    async fn abandon(&self, request: &RemotePrefillRequest, reason: &str, handed_back: bool) {
        let message = DecodeMessage::Abandon {
            request_id: request.request_id.clone(),
            prefill_instance: self.parts.instance_id.clone(),
            reason: reason.to_string(),
            handed_back,
        };
        // One (empty) reply, or the end: either way it arrived.
        if let Err(e) = self.ask_decode(request, &message).await {
            tracing::debug!(request_id = %request.request_id, "telling the decode worker failed: {e}");
        }
    }

    /// Stop this process (SIGSTOP) if `fault` is the injected test fault
    /// and it has not fired yet (see [`PrefillFault`]).
    fn inject(&self, fault: PrefillFault, request_id: &str) {
        if self.config.fault.as_ref() != Some(&fault)
            || self
                .fault_fired
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        tracing::warn!(%request_id, ?fault, "test fault: stopping this process");
        // SAFETY: raising a signal in our own process; SIGSTOP stops every
        // thread until a SIGCONT, and touches no memory.
        unsafe { libc::raise(libc::SIGSTOP) };
        tracing::warn!(%request_id, ?fault, "test fault: continued");
    }

    /// With the `stop-mid-write` test fault, on the first job: write the
    /// first half of the blocks unannounced, wait until those bytes are
    /// written, then stop the process. Returns the blocks still to write
    /// (all of them without the fault).
    async fn write_half_then_stop<'a>(
        &self,
        src: &'a [u32],
        peer: &str,
        request: &'a RemotePrefillRequest,
        deadline: Instant,
    ) -> Result<(&'a [u32], &'a [u32]), String> {
        let dst = &request.dst_blocks[..];
        let armed = self.config.fault == Some(PrefillFault::StopMidWrite)
            && !self.fault_fired.load(std::sync::atomic::Ordering::SeqCst);
        if !armed || src.len() < 2 {
            return Ok((src, dst));
        }
        let half = src.len() / 2;
        let id = &request.request_id;
        let report = self
            .parts
            .agent
            .write_blocks_unannounced(&src[..half], peer, &dst[..half], id, deadline)
            .map_err(|e| e.to_string())?
            .wait_async()
            .await
            .map_err(|e| e.to_string())?;
        tracing::warn!(request_id = %id, blocks = half, of = src.len(), bytes = report.bytes,
            "test fault: the first half of the write landed, unannounced");
        self.book().writing.insert(id.clone());
        self.inject(PrefillFault::StopMidWrite, id);
        Ok((&src[half..], &dst[half..]))
    }

    /// Prefill the prompt and sample its first token (with its logprobs,
    /// when the request asked); the KV stays held.
    async fn first_token(
        &self,
        engine_id: &str,
        request: &RemotePrefillRequest,
        deadline: Instant,
    ) -> Result<FirstToken, JobEnd> {
        // The engine going away is this worker's shutdown, not the job's
        // fault: another worker may still do it.
        let engine_failed = |e: EngineError| match e {
            EngineError::ShutDown => JobEnd::HandedBack(e.to_string()),
            e => JobEnd::Failed(e.to_string()),
        };
        let sampling = SamplingParams {
            max_tokens: Some(1),
            min_tokens: request.sampling.min_tokens.min(1),
            stop: Vec::new(),
            ..SamplingParams::from(request.sampling.clone())
        };
        let mut outputs = self
            .parts
            .engine
            .submit_prefill(Request {
                id: engine_id.to_string(),
                prompt_token_ids: request.token_ids.clone(),
                sampling,
            })
            .map_err(engine_failed)?;
        let limit = deadline.saturating_duration_since(Instant::now());
        let mut first = None;
        let mut computed = 0;
        let collect = async {
            while let Some(item) = outputs.recv().await {
                match item {
                    Ok(o) => {
                        if first.is_none() {
                            first = Some(FirstToken {
                                token: o.token_id,
                                logprobs: o.logprobs.clone(),
                            });
                        }
                        if let Some(usage) = o.usage {
                            computed = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
                        }
                    }
                    Err(e) => return Err(engine_failed(e)),
                }
            }
            Ok(())
        };
        let outcome = {
            // Counted even when the job is dropped mid-compute (handed back).
            let _computing = Computing::start(self);
            tokio::time::timeout(limit, collect).await
        };
        self.parts.metrics.prefill_tokens.inc_by(computed as u64);
        match outcome {
            Err(_) => Err(JobEnd::Expired),
            Ok(Err(end)) => Err(end),
            Ok(Ok(())) => {
                first.ok_or_else(|| JobEnd::Failed("the prefill produced no token".to_string()))
            }
        }
    }

    async fn write(
        &self,
        engine_id: &str,
        request: &RemotePrefillRequest,
        first: FirstToken,
        peer: &str,
        deadline: Instant,
        slot: Option<OwnedSemaphorePermit>,
    ) -> JobEnd {
        let metrics = &self.parts.metrics;
        let table = match self.parts.engine.block_table(engine_id).await {
            Ok(table) => table,
            Err(e) => return JobEnd::Failed(e.to_string()),
        };
        let from = request.first_block as usize;
        let Some(src) = table.get(from..from + request.dst_blocks.len()) else {
            return JobEnd::Failed(format!(
                "job {} wants blocks {from}..{} of a {}-block prompt",
                request.request_id,
                from + request.dst_blocks.len(),
                table.len()
            ));
        };
        if Instant::now() >= deadline {
            return JobEnd::Expired;
        }
        self.inject(PrefillFault::StopBeforeWrite, &request.request_id);
        let (src, dst) = match self
            .write_half_then_stop(src, peer, request, deadline)
            .await
        {
            Ok(rest) => rest,
            Err(e) => return JobEnd::Failed(e),
        };
        let notification = TransferNotification {
            request_id: request.request_id.clone(),
            first_token: first.token,
            first_logprobs: first.logprobs.map(WireLogprobs::from),
            num_blocks: request.dst_blocks.len() as u32,
        };
        // The injected cut fails the post as NIXL's own error would.
        let posted = match &self.config.fault {
            Some(PrefillFault::CutWrites(file)) if file.exists() => Err(format!(
                "NIXL write to {peer} failed: the data path is cut (test fault, while {} exists)",
                file.display()
            )),
            _ => self
                .parts
                .agent
                .write_blocks(src, peer, dst, &notification, deadline)
                .map_err(|e| e.to_string()),
        };
        let handle = match posted {
            Ok(handle) => handle,
            Err(e) => {
                metrics
                    .transfer_failures
                    .with_label_values(&["write"])
                    .inc();
                return JobEnd::Failed(e);
            }
        };
        self.book().writing.insert(request.request_id.clone());
        // Posted: the next job may compute while these bytes move.
        drop(slot);
        self.inject(PrefillFault::StopAfterPost, &request.request_id);
        match handle.wait_async().await {
            Ok(report) => {
                metrics
                    .transfer_bytes
                    .with_label_values(&["sent"])
                    .inc_by(report.bytes);
                metrics
                    .transfer_seconds
                    .observe(report.elapsed.as_secs_f64());
                JobEnd::Written
            }
            Err(e) => {
                let reason = if Instant::now() >= deadline {
                    "deadline"
                } else {
                    "write"
                };
                metrics.transfer_failures.with_label_values(&[reason]).inc();
                JobEnd::Failed(e.to_string())
            }
        }
    }
}

/// The ack and nak of a job that did not come from the queue (a probe):
/// there is nothing to tell the queue.
struct DirectJob;

impl crate::bus::JobControl for DirectJob {
    fn ack(
        self: Box<Self>,
    ) -> futures::future::BoxFuture<'static, Result<(), crate::bus::BusError>> {
        Box::pin(async { Ok(()) })
    }
    fn nak(
        self: Box<Self>,
    ) -> futures::future::BoxFuture<'static, Result<(), crate::bus::BusError>> {
        Box::pin(async { Ok(()) })
    }
    fn progress(&self) -> futures::future::BoxFuture<'_, Result<(), crate::bus::BusError>> {
        Box::pin(async { Ok(()) })
    }
}

/// One job computing, for `xpyd_prefill_busy_seconds_total`; ends on drop.
struct Computing<'a>(&'a PrefillWorker);

impl<'a> Computing<'a> {
    fn start(worker: &'a PrefillWorker) -> Self {
        worker.book().compute_started();
        Computing(worker)
    }
}

impl Drop for Computing<'_> {
    fn drop(&mut self) {
        let busy = self.0.book().compute_ended();
        self.0
            .parts
            .metrics
            .prefill_busy_seconds
            .inc_by(busy.as_secs_f64());
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
