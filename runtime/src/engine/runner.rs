//! The engine's step loop and the handle callers talk to.
//!
//! [`Engine::start`] moves the model, the KV memory, the block pool and the
//! [`Scheduler`] onto one dedicated OS thread (the forward pass is CPU-heavy
//! and must never block an async runtime). Each step the thread takes
//! commands, drops requests whose receiver is gone, asks the scheduler for a
//! plan, runs one batched forward pass, samples, and streams an [`Output`]
//! per token to each request's channel. [`EngineHandle`] validates requests
//! before they reach the thread, so bad input becomes a typed error that can
//! be shown to the user.
//!
//! It is not the HTTP layer, the tokenizer front end (requests carry token
//! ids) or the KV transport: a remote prefill only reserves blocks here
//! ([`EngineHandle::begin_remote_prefill`]) and someone else writes them
//! ([`EngineHandle::with_kv_storage`] is the in-process stand-in).

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::sync::oneshot;
use tracing::Span;

use super::block_pool::{BlockId, BlockPool, KvEvent, SequenceId, TokenId};
use super::kv_storage::KvStorage;
use super::model::{LogitsFor, Model, SequenceInput};
use super::sampling::{FinishReason, Sampler, SamplingParams, SamplingParamsError};
use super::scheduler::{
    RemoteReservation, Scheduler, SchedulerConfig, SchedulerError, SeqState, admission_check,
};
use super::tokenizer::{StreamDecoder, Tokenizer};
use crate::sync::lock;

/// How long an idle engine thread sleeps between looks at its commands.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// How long a handle call that needs the engine thread's answer waits for
/// it (the thread answers between steps).
const REPLY_DEADLINE: Duration = Duration::from_secs(30);

/// Sizes of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// KV cache blocks.
    pub num_blocks: u32,
    /// Tokens per block.
    pub block_size: usize,
    /// Most new tokens in one forward step (the chunked-prefill budget).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Most tokens (prompt plus generated) of one request; at most the
    /// model's context, and the cache must hold one such request.
    pub max_model_len: usize,
}

/// One generation request, already tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The caller's id, unique among live requests; used in logs and
    /// [`EngineHandle::cancel`].
    pub id: String,
    pub prompt_token_ids: Vec<TokenId>,
    pub sampling: SamplingParams,
}

/// Token counts of a finished request, as OpenAI's `usage` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub token_id: TokenId,
    /// Text that became final with this token (may be empty while UTF-8
    /// bytes or a possible stop string are held back; always empty without
    /// a tokenizer).
    pub text: String,
    /// Set on the last output of a request.
    pub finish: Option<FinishReason>,
    /// Set on the last output of a request.
    pub usage: Option<Usage>,
}

/// What a request's stream carries.
pub type OutputItem = Result<Output, EngineError>;

/// Engine counters, refreshed after every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    pub total_blocks: usize,
    /// Blocks holding nothing worth keeping.
    pub free_blocks: usize,
    /// Blocks nobody holds that still serve prefix-cache hits.
    pub cached_free_blocks: usize,
    /// Prefix-cache hits since start, in blocks.
    pub prefix_hit_blocks: u64,
    pub running: usize,
    pub waiting: usize,
    /// Sequences whose KV a remote prefill is writing.
    pub transferring: usize,
    /// Finished prefill-side requests whose KV is kept for a transfer.
    pub held: usize,
    pub preemptions: u64,
    /// Forward steps run since start.
    pub steps: u64,
}

/// Why a request or an engine call failed. [`EngineError::is_invalid_request`]
/// says which ones are the caller's fault (HTTP 400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "prompt token {index} has id {token}, which is not in the model's vocabulary (size {vocab})"
    )]
    TokenOutOfVocab {
        index: usize,
        token: TokenId,
        vocab: usize,
    },
    #[error(transparent)]
    Sampling(#[from] SamplingParamsError),
    #[error(transparent)]
    Admission(SchedulerError),
    #[error("a request with id {0:?} is already running")]
    DuplicateId(String),
    #[error("no request with id {0:?}")]
    UnknownRequest(String),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("the engine failed: {0}")]
    Internal(String),
    #[error("the forward pass failed: {0}")]
    Model(String),
    #[error("the engine is shut down")]
    ShutDown,
    #[error("the engine thread did not answer within {0:?}")]
    Timeout(Duration),
}

impl EngineError {
    /// The request itself is at fault (an HTTP 400), as opposed to the
    /// engine or its state.
    pub fn is_invalid_request(&self) -> bool {
        match self {
            EngineError::EmptyPrompt
            | EngineError::TokenOutOfVocab { .. }
            | EngineError::Sampling(_)
            | EngineError::DuplicateId(_) => true,
            EngineError::Admission(e) => matches!(
                e,
                SchedulerError::EmptyPrompt
                    | SchedulerError::PromptTooLong { .. }
                    | SchedulerError::BeyondContext { .. }
                    | SchedulerError::NeverFits { .. }
            ),
            _ => false,
        }
    }

    /// How an API reports this error: the one mapping the frontend and the
    /// decode worker share.
    pub fn kind(&self) -> EngineErrorKind {
        if self.is_invalid_request() {
            EngineErrorKind::InvalidRequest
        } else if matches!(self, EngineError::ShutDown | EngineError::Timeout(_)) {
            EngineErrorKind::Unavailable
        } else {
            EngineErrorKind::Internal
        }
    }
}

/// The HTTP-facing class of an [`EngineError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// The caller's fault: HTTP 400.
    InvalidRequest,
    /// This engine cannot serve now (stopping, stalled); another may: HTTP 503.
    Unavailable,
    /// The engine failed: HTTP 500.
    Internal,
}

impl From<SchedulerError> for EngineError {
    fn from(e: SchedulerError) -> Self {
        match e {
            SchedulerError::EmptyPrompt => EngineError::EmptyPrompt,
            e => EngineError::Admission(e),
        }
    }
}

type KvJob = Box<dyn FnOnce(&mut KvStorage) + Send>;

/// Where the engine thread sends an answer: to a blocking caller or to an
/// async one.
enum Reply<T> {
    Blocking(std_mpsc::Sender<Result<T, EngineError>>),
    Async(oneshot::Sender<Result<T, EngineError>>),
}

impl<T> Reply<T> {
    /// A caller that gave up waiting is not an error here.
    fn send(self, result: Result<T, EngineError>) {
        match self {
            Reply::Blocking(sender) => {
                let _ = sender.send(result);
            }
            Reply::Async(sender) => {
                let _ = sender.send(result);
            }
        }
    }
}

/// Builds the command of an [`EngineCall`] around the reply channel.
type MakeCommand<R> = Box<dyn FnOnce(Reply<R>) -> Command + Send>;

/// A call the engine thread answers within a step: `.await` it from async
/// code, or [`EngineCall::wait`] for it on a thread that may block. The
/// command is sent then, so a call neither awaited nor waited for does
/// nothing. `R` is the engine thread's answer, `T` what the caller gets.
#[must_use = "nothing reaches the engine until the call is awaited or waited for"]
pub struct EngineCall<T, R = T> {
    handle: EngineHandle,
    /// The command, and what turns its answer into the caller's; or why
    /// the call failed before reaching the engine.
    call: Result<(MakeCommand<R>, Then<R, T>), EngineError>,
}

type Then<R, T> = Box<dyn FnOnce(R) -> T + Send>;

impl<T: Send + 'static, R: Send + 'static> EngineCall<T, R> {
    fn failed(handle: &EngineHandle, error: EngineError) -> EngineCall<T, R> {
        EngineCall {
            handle: handle.clone(),
            call: Err(error),
        }
    }

    fn then<U>(self, f: impl FnOnce(T) -> U + Send + 'static) -> EngineCall<U, R> {
        EngineCall {
            handle: self.handle,
            call: self.call.map(|(make, then)| {
                let then: Then<R, U> = Box::new(move |r| f(then(r)));
                (make, then)
            }),
        }
    }

    /// Sends the command and blocks this thread for the answer (at most
    /// 30 s). Not from async code: `.await` the call there.
    pub fn wait(self) -> Result<T, EngineError> {
        let (make, then) = self.call?;
        Ok(then(self.handle.call(make)?))
    }
}

impl<T: Send + 'static, R: Send + 'static> std::future::IntoFuture for EngineCall<T, R> {
    type Output = Result<T, EngineError>;
    type IntoFuture = futures::future::BoxFuture<'static, Result<T, EngineError>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let (make, then) = self.call?;
            Ok(then(self.handle.call_async(make).await?))
        })
    }
}

enum Command {
    Submit {
        request: Request,
        sampler: Sampler,
        tx: mpsc::Sender<OutputItem>,
        hold_kv: bool,
    },
    BeginRemote {
        request: Request,
        sampler: Sampler,
        tx: mpsc::Sender<OutputItem>,
        reply: Reply<RemoteReservation>,
    },
    CompleteRemote {
        id: String,
        first_token: TokenId,
        reply: Reply<()>,
    },
    CancelRemote {
        id: String,
        reply: Reply<()>,
    },
    Cancel {
        id: String,
    },
    BlockTable {
        id: String,
        reply: Reply<Vec<BlockId>>,
    },
    WithKv(KvJob),
    Shutdown,
}

/// Starts engines; see [`Engine::start`].
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Start the step loop on its own thread. `tokenizer` gives text deltas,
    /// stop strings and the EOS token; without it outputs carry token ids
    /// only and only `stop_token_ids` end generation early. KV events of the
    /// block pool go to `kv_events`.
    pub fn start(
        model: Model,
        tokenizer: Option<Tokenizer>,
        config: EngineConfig,
        kv_events: Option<UnboundedSender<KvEvent>>,
    ) -> Result<EngineHandle, EngineError> {
        let context = model.config().context_length;
        if config.max_model_len > context {
            return Err(EngineError::Config(format!(
                "max_model_len {} exceeds the model's context length {context}",
                config.max_model_len
            )));
        }
        let cache_tokens = config.num_blocks as usize * config.block_size;
        if config.max_model_len > cache_tokens {
            return Err(EngineError::Config(format!(
                "max_model_len {} does not fit the KV cache of {} blocks of {} tokens",
                config.max_model_len, config.num_blocks, config.block_size
            )));
        }
        let mut pool = BlockPool::new(config.num_blocks, config.block_size)
            .map_err(|e| EngineError::Config(e.to_string()))?;
        if let Some(sender) = kv_events {
            pool = pool.with_kv_events(sender);
        }
        let sched_config = SchedulerConfig {
            max_batch_tokens: config.max_batch_tokens,
            max_seqs: config.max_seqs,
            max_model_len: config.max_model_len,
        };
        let scheduler =
            Scheduler::new(sched_config, pool).map_err(|e| EngineError::Config(e.to_string()))?;
        let kv = KvStorage::new(model.kv_shape(config.num_blocks as usize, config.block_size))
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let vocab = model.config().vocab;
        let eos_ids: Vec<TokenId> = tokenizer
            .as_ref()
            .and_then(Tokenizer::eos_token_id)
            .into_iter()
            .collect();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let (commands, rx) = std_mpsc::channel();
        let mut worker = Worker {
            model,
            tokenizer,
            kv,
            scheduler,
            commands: rx,
            requests: HashMap::new(),
            ids: HashMap::new(),
            next_seq: 0,
            stats: stats.clone(),
            steps: 0,
        };
        worker.publish_stats();
        let thread = std::thread::Builder::new()
            .name("xpyd-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| EngineError::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            inner: Arc::new(Inner {
                commands,
                thread: Mutex::new(Some(thread)),
                stats,
                config,
                sched_config,
                vocab,
                eos_ids,
            }),
        })
    }
}

struct Inner {
    commands: std_mpsc::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<EngineStats>>,
    config: EngineConfig,
    sched_config: SchedulerConfig,
    vocab: usize,
    eos_ids: Vec<TokenId>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The thread also stops when the channel closes; say so explicitly.
        let _ = self.commands.send(Command::Shutdown);
    }
}

/// The way into a running engine; cheap to clone. The engine thread stops
/// on [`EngineHandle::shutdown`] or when the last handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl EngineHandle {
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Check `request` as the engine would at admission.
    pub fn validate(&self, request: &Request) -> Result<(), EngineError> {
        let prompt = &request.prompt_token_ids;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some((index, &token)) = prompt
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= self.inner.vocab)
        {
            return Err(EngineError::TokenOutOfVocab {
                index,
                token,
                vocab: self.inner.vocab,
            });
        }
        request.sampling.validate()?;
        admission_check(
            &self.inner.sched_config,
            self.inner.config.block_size,
            self.inner.config.num_blocks as usize,
            prompt.len(),
            request.sampling.max_tokens,
        )?;
        Ok(())
    }

    fn prepare(
        &self,
        request: &Request,
    ) -> Result<
        (
            Sampler,
            mpsc::Sender<OutputItem>,
            mpsc::Receiver<OutputItem>,
        ),
        EngineError,
    > {
        self.validate(request)?;
        let sampler = Sampler::new(request.sampling.clone(), &self.inner.eos_ids)?;
        // One slot per token that can ever be sent, plus an error: the engine
        // thread never waits on a slow reader.
        let max_new = request
            .sampling
            .max_tokens
            .map_or(self.inner.config.max_model_len, |m| m as usize);
        let (tx, rx) = mpsc::channel(max_new + 2);
        Ok((sampler, tx, rx))
    }

    fn send(&self, command: Command) -> Result<(), EngineError> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| EngineError::ShutDown)
    }

    /// Sends a command and blocks until the engine thread answers.
    fn call<T>(&self, make: MakeCommand<T>) -> Result<T, EngineError> {
        let (reply, answer) = std_mpsc::channel();
        self.send(make(Reply::Blocking(reply)))?;
        match answer.recv_timeout(REPLY_DEADLINE) {
            Ok(result) => result,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(EngineError::Timeout(REPLY_DEADLINE)),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(EngineError::ShutDown),
        }
    }

    /// Sends a command and awaits the engine thread's answer.
    async fn call_async<T>(&self, make: MakeCommand<T>) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(Reply::Async(reply)))?;
        match tokio::time::timeout(REPLY_DEADLINE, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(EngineError::ShutDown),
            Err(_) => Err(EngineError::Timeout(REPLY_DEADLINE)),
        }
    }

    /// Queue `request`; its tokens arrive on the returned receiver, the last
    /// one with `finish` and `usage` set (or an error). Dropping the
    /// receiver cancels the request.
    pub fn submit(&self, request: Request) -> Result<mpsc::Receiver<OutputItem>, EngineError> {
        self.submit_inner(request, false)
    }

    /// Like [`EngineHandle::submit`], but when the request finishes its KV
    /// blocks are kept (for a KV transfer to read, through
    /// [`EngineHandle::block_table`] and [`EngineHandle::with_kv_storage`])
    /// until [`EngineHandle::cancel`] releases them: the prefill side of a
    /// disaggregated request.
    pub fn submit_prefill(
        &self,
        request: Request,
    ) -> Result<mpsc::Receiver<OutputItem>, EngineError> {
        self.submit_inner(request, true)
    }

    fn submit_inner(
        &self,
        request: Request,
        hold_kv: bool,
    ) -> Result<mpsc::Receiver<OutputItem>, EngineError> {
        let (sampler, tx, rx) = self.prepare(&request)?;
        self.send(Command::Submit {
            request,
            sampler,
            tx,
            hold_kv,
        })?;
        Ok(rx)
    }

    /// Stop request `id` and free its blocks (also releases what
    /// [`EngineHandle::submit_prefill`] held). The stream of a request whose
    /// KV a remote prefill is writing ends now, but its blocks are freed only
    /// when the transfer completes or is cancelled. Unknown ids are ignored.
    pub fn cancel(&self, id: &str) -> Result<(), EngineError> {
        self.send(Command::Cancel { id: id.to_string() })
    }

    /// Admit `request` with its prompt KV to be written from outside:
    /// reserves (and pins) blocks and returns them. Then either
    /// [`EngineHandle::complete_remote_prefill`] or
    /// [`EngineHandle::cancel_remote_prefill`]. Fails with a
    /// [`SchedulerError::Busy`] admission error when the blocks are not free
    /// now. The engine thread answers within a step.
    pub fn begin_remote_prefill(
        &self,
        request: Request,
    ) -> EngineCall<(mpsc::Receiver<OutputItem>, RemoteReservation), RemoteReservation> {
        match self.prepare(&request) {
            Ok((sampler, tx, rx)) => self
                .call_with(move |reply| Command::BeginRemote {
                    request,
                    sampler,
                    tx,
                    reply,
                })
                .then(move |reservation| (rx, reservation)),
            Err(e) => EngineCall::failed(self, e),
        }
    }

    /// A remote prefill's first token must be in the model's vocabulary.
    fn check_first_token(&self, first_token: TokenId) -> Result<(), EngineError> {
        if first_token as usize >= self.inner.vocab {
            return Err(EngineError::TokenOutOfVocab {
                index: 0,
                token: first_token,
                vocab: self.inner.vocab,
            });
        }
        Ok(())
    }

    /// The prompt KV of `id` is written and the prefill side sampled
    /// `first_token`: it is streamed as the first output and decoding goes
    /// on from there.
    pub fn complete_remote_prefill(&self, id: &str, first_token: TokenId) -> EngineCall<()> {
        if let Err(e) = self.check_first_token(first_token) {
            return EngineCall::failed(self, e);
        }
        let id = id.to_string();
        self.call_with(move |reply| Command::CompleteRemote {
            id,
            first_token,
            reply,
        })
    }

    /// The remote prefill of `id` failed and nothing more will be written:
    /// its blocks are released and it is prefilled locally instead.
    pub fn cancel_remote_prefill(&self, id: &str) -> EngineCall<()> {
        let id = id.to_string();
        self.call_with(move |reply| Command::CancelRemote { id, reply })
    }

    /// The block ids of live or held request `id`, in token order.
    pub fn block_table(&self, id: &str) -> EngineCall<Vec<BlockId>> {
        let id = id.to_string();
        self.call_with(move |reply| Command::BlockTable { id, reply })
    }

    /// Run `f` on the engine thread with the KV memory, between steps (for a
    /// KV transfer: register, read or write blocks).
    pub fn with_kv_storage<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KvStorage) -> T + Send + 'static,
    ) -> EngineCall<T> {
        self.call_with(move |reply| {
            Command::WithKv(Box::new(move |kv| {
                reply.send(Ok(f(kv)));
            }))
        })
    }

    fn call_with<R: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<R>) -> Command + Send + 'static,
    ) -> EngineCall<R> {
        EngineCall {
            handle: self.clone(),
            call: Ok((Box::new(make), Box::new(|r| r))),
        }
    }

    /// Counters as of the last step.
    pub fn stats(&self) -> EngineStats {
        *lock(&self.inner.stats)
    }

    /// Stop the engine: live requests get [`EngineError::ShutDown`], and the
    /// thread is joined if it ends within `deadline` (it finishes the step
    /// in progress first).
    pub fn shutdown(&self, deadline: Duration) -> Result<(), EngineError> {
        let _ = self.inner.commands.send(Command::Shutdown);
        let thread = lock(&self.inner.thread).take();
        let Some(thread) = thread else {
            return Ok(());
        };
        let until = Instant::now() + deadline;
        while !thread.is_finished() {
            if Instant::now() >= until {
                // Put it back so a later call can wait again.
                *lock(&self.inner.thread) = Some(thread);
                return Err(EngineError::Timeout(deadline));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        thread
            .join()
            .map_err(|_| EngineError::Internal("the engine thread panicked".into()))
    }
}

/// A sender whose receiver is gone: the stream of a cancelled request.
fn closed_sender() -> mpsc::Sender<OutputItem> {
    mpsc::channel(1).0
}

/// Per-request state on the engine thread.
struct Active {
    id: String,
    tx: mpsc::Sender<OutputItem>,
    sampler: Sampler,
    decoder: StreamDecoder,
    prompt_tokens: usize,
    completion_tokens: usize,
    hold_kv: bool,
    span: Span,
}

/// Everything the engine thread owns.
struct Worker {
    model: Model,
    tokenizer: Option<Tokenizer>,
    kv: KvStorage,
    scheduler: Scheduler,
    commands: std_mpsc::Receiver<Command>,
    requests: HashMap<SequenceId, Active>,
    ids: HashMap<String, SequenceId>,
    next_seq: u64,
    stats: Arc<Mutex<EngineStats>>,
    steps: u64,
}

impl Worker {
    fn run(&mut self) {
        tracing::debug!("engine thread started");
        'outer: loop {
            // Wait for work when idle; otherwise take what is queued.
            if !self.scheduler.has_work() {
                match self.commands.recv_timeout(IDLE_WAIT) {
                    Ok(command) => {
                        if !self.handle(command) {
                            break 'outer;
                        }
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break 'outer,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(command) => {
                        if !self.handle(command) {
                            break 'outer;
                        }
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => break 'outer,
                }
            }
            self.drop_abandoned();
            if self.scheduler.has_work() && !self.step() {
                // Nothing could be scheduled (blocks pinned by transfers or
                // held): wait for a command that changes that.
                match self.commands.recv_timeout(IDLE_WAIT) {
                    Ok(command) => {
                        if !self.handle(command) {
                            break 'outer;
                        }
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break 'outer,
                }
            }
            self.publish_stats();
        }
        for (_, active) in self.requests.drain() {
            let _ = active.tx.try_send(Err(EngineError::ShutDown));
        }
        self.publish_stats();
        tracing::debug!("engine thread stopped");
    }

    fn publish_stats(&self) {
        let pool = self.scheduler.pool();
        let stats = EngineStats {
            total_blocks: pool.total_blocks(),
            free_blocks: pool.free_blocks(),
            cached_free_blocks: pool.cached_free_blocks(),
            prefix_hit_blocks: pool.counters().prefix_hit_blocks,
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
            transferring: self.scheduler.num_transferring(),
            held: self.scheduler.num_held(),
            preemptions: self.scheduler.num_preemptions(),
            steps: self.steps,
        };
        *lock(&self.stats) = stats;
    }

    /// Registers a new request; on failure its error is returned and
    /// nothing is kept.
    fn register(
        &mut self,
        request: &Request,
        sampler: Sampler,
        tx: mpsc::Sender<OutputItem>,
        hold_kv: bool,
    ) -> Result<SequenceId, EngineError> {
        if self.ids.contains_key(&request.id) {
            return Err(EngineError::DuplicateId(request.id.clone()));
        }
        let seq = SequenceId(self.next_seq);
        self.next_seq += 1;
        let span = tracing::info_span!("request", request_id = %request.id, %seq);
        self.ids.insert(request.id.clone(), seq);
        self.requests.insert(
            seq,
            Active {
                id: request.id.clone(),
                tx,
                sampler,
                decoder: StreamDecoder::new(true),
                prompt_tokens: request.prompt_token_ids.len(),
                completion_tokens: 0,
                hold_kv,
                span,
            },
        );
        Ok(seq)
    }

    fn unregister(&mut self, seq: SequenceId) -> Option<Active> {
        let active = self.requests.remove(&seq)?;
        self.ids.remove(&active.id);
        Some(active)
    }

    /// Returns `false` on shutdown.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Submit {
                request,
                sampler,
                tx,
                hold_kv,
            } => {
                let result = self.register(&request, sampler, tx.clone(), hold_kv);
                let result = result.and_then(|seq| {
                    let max_tokens = request.sampling.max_tokens;
                    self.scheduler
                        .add(seq, request.prompt_token_ids, max_tokens)
                        .map_err(|e| {
                            self.unregister(seq);
                            EngineError::from(e)
                        })
                        .map(|()| seq)
                });
                match result {
                    Ok(seq) => {
                        let _g = self.requests[&seq].span.enter();
                        tracing::debug!("queued");
                    }
                    Err(e) => {
                        let _ = tx.try_send(Err(e));
                    }
                }
            }
            Command::BeginRemote {
                request,
                sampler,
                tx,
                reply,
            } => {
                let result = self.register(&request, sampler, tx, false).and_then(|seq| {
                    let max_tokens = request.sampling.max_tokens;
                    self.scheduler
                        .add_remote(seq, request.prompt_token_ids, max_tokens)
                        .map_err(|e| {
                            self.unregister(seq);
                            EngineError::from(e)
                        })
                });
                reply.send(result);
            }
            Command::CompleteRemote {
                id,
                first_token,
                reply,
            } => {
                reply.send(self.complete_remote(&id, first_token));
            }
            Command::CancelRemote { id, reply } => {
                let result = match self.ids.get(&id) {
                    Some(&seq) => self.scheduler.cancel_remote(seq).map_err(EngineError::from),
                    None => Err(EngineError::UnknownRequest(id)),
                };
                reply.send(result);
            }
            Command::Cancel { id } => {
                let Some(&seq) = self.ids.get(&id) else {
                    return true;
                };
                if self.scheduler.state(seq) == Some(SeqState::Transferring) {
                    // The remote side may still be writing these blocks:
                    // end the stream now, free them when the transfer ends.
                    if let Some(active) = self.requests.get_mut(&seq) {
                        active.tx = closed_sender();
                    }
                } else {
                    self.finish_seq(seq, "cancelled");
                }
            }
            Command::BlockTable { id, reply } => {
                let result = match self.ids.get(&id) {
                    Some(&seq) => Ok(self
                        .scheduler
                        .block_table(seq)
                        .map(<[BlockId]>::to_vec)
                        .unwrap_or_default()),
                    None => Err(EngineError::UnknownRequest(id)),
                };
                reply.send(result);
            }
            Command::WithKv(job) => job(&mut self.kv),
            Command::Shutdown => return false,
        }
        true
    }

    fn complete_remote(&mut self, id: &str, first_token: TokenId) -> Result<(), EngineError> {
        let &seq = self
            .ids
            .get(id)
            .ok_or_else(|| EngineError::UnknownRequest(id.to_string()))?;
        self.scheduler.complete_remote(seq)?;
        // The prefill side sampled this token: stream it like a local one.
        self.emit(seq, first_token);
        Ok(())
    }

    /// Forget `seq` and give back its blocks.
    fn finish_seq(&mut self, seq: SequenceId, why: &str) {
        match self.unregister(seq) {
            Some(active) => {
                let _g = active.span.enter();
                tracing::debug!(why, "request ended");
            }
            // A held sequence has no stream left, only its id.
            None => self.ids.retain(|_, s| *s != seq),
        }
        if let Err(e) = self.scheduler.remove(seq) {
            tracing::error!(%seq, error = %e, "cannot release a sequence");
        }
    }

    /// Free the sequences whose receiver is gone. Blocks a remote prefill
    /// is writing wait for the transfer to complete or be cancelled, since
    /// freeing them now would let the write land in someone else's KV.
    fn drop_abandoned(&mut self) {
        let gone: Vec<SequenceId> = self
            .requests
            .iter()
            .filter(|(seq, a)| {
                a.tx.is_closed() && self.scheduler.state(**seq) != Some(SeqState::Transferring)
            })
            .map(|(&seq, _)| seq)
            .collect();
        for seq in gone {
            self.finish_seq(seq, "receiver dropped");
        }
    }

    /// One forward step. Returns `false` when nothing could be scheduled.
    fn step(&mut self) -> bool {
        let plan = self.scheduler.schedule();
        if plan.chunks.is_empty() {
            return false;
        }
        // Owned copies: the forward pass borrows them while the scheduler
        // stays free to change afterwards.
        let inputs: Vec<(Vec<TokenId>, Vec<BlockId>)> = plan
            .chunks
            .iter()
            .map(|c| {
                let tokens = self.scheduler.tokens(c.seq).unwrap_or_default();
                (
                    tokens[c.start_pos..c.start_pos + c.num_tokens].to_vec(),
                    self.scheduler
                        .block_table(c.seq)
                        .unwrap_or_default()
                        .to_vec(),
                )
            })
            .collect();
        let batch: Vec<SequenceInput> = plan
            .chunks
            .iter()
            .zip(&inputs)
            .map(|(c, (tokens, table))| SequenceInput {
                tokens,
                start_pos: c.start_pos,
                block_table: table,
            })
            .collect();
        // Prefill chunks that do not end their prompt need no logits.
        let wanted: Vec<bool> = plan.chunks.iter().map(|c| c.samples).collect();
        let logits = self
            .model
            .forward(&mut self.kv, &batch, LogitsFor::LastTokenOf(&wanted));
        self.steps += 1;
        let logits = match logits {
            Ok(logits) => logits,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing its requests");
                let error = EngineError::Model(e.to_string());
                for c in &plan.chunks {
                    if let Some(active) = self.requests.get(&c.seq) {
                        let _ = active.tx.try_send(Err(error.clone()));
                    }
                    self.finish_seq(c.seq, "forward pass failed");
                }
                return true;
            }
        };
        if let Err(e) = self.scheduler.commit(&plan) {
            tracing::error!(error = %e, "cannot commit a step");
        }
        for (c, logits) in plan.chunks.iter().zip(&logits) {
            if !c.samples {
                continue;
            }
            let Some(active) = self.requests.get_mut(&c.seq) else {
                continue;
            };
            let token = active.sampler.sample(logits);
            self.emit(c.seq, token);
        }
        true
    }

    /// Stream `token` for `seq`, then end it or append it for the next step.
    fn emit(&mut self, seq: SequenceId, token: TokenId) {
        let last_by_length = self.scheduler.next_token_is_last(seq);
        let Some(active) = self.requests.get_mut(&seq) else {
            return;
        };
        let text = match &self.tokenizer {
            Some(tok) => match active.decoder.push(tok, token) {
                Ok(text) => text.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(parent: &active.span, error = %e, token, "cannot detokenize");
                    String::new()
                }
            },
            None => String::new(),
        };
        let mut step = active.sampler.accept(token, &text);
        if step.finish.is_none() && last_by_length {
            step.text.push_str(&active.sampler.finish_for_length().text);
            step.finish = Some(FinishReason::Length);
        }
        if step.finish == Some(FinishReason::Length)
            && let Some(tok) = &self.tokenizer
        {
            // Bytes of an unfinished character would otherwise be lost.
            if let Ok(Some(rest)) = active.decoder.finish(tok) {
                step.text.push_str(&rest);
            }
        }
        active.completion_tokens += 1;
        let usage = step.finish.map(|_| Usage {
            prompt_tokens: active.prompt_tokens,
            completion_tokens: active.completion_tokens,
            cached_tokens: self.scheduler.cached_tokens(seq).unwrap_or(0),
        });
        let output = Output {
            token_id: token,
            text: step.text,
            finish: step.finish,
            usage,
        };
        let delivered = active.tx.try_send(Ok(output)).is_ok();
        match step.finish {
            Some(reason) if active.hold_kv && delivered => {
                tracing::debug!(parent: &active.span, reason = reason.as_str(), "finished; KV held");
                // The stream ends here; the id stays taken until `cancel`.
                self.requests.remove(&seq);
                if let Err(e) = self.scheduler.hold(seq) {
                    tracing::error!(%seq, error = %e, "cannot hold a finished sequence");
                }
            }
            Some(reason) => self.finish_seq(seq, reason.as_str()),
            None if !delivered => self.finish_seq(seq, "receiver dropped"),
            None => {
                if let Err(e) = self.scheduler.append_token(seq, token) {
                    tracing::error!(%seq, error = %e, "cannot append a token");
                    self.finish_seq(seq, "internal error");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_can_be_shared_across_tasks() {
        fn shared<T: Send + Sync + Clone + 'static>() {}
        shared::<EngineHandle>();
    }

    #[test]
    fn request_faults_are_told_apart_from_engine_faults() {
        let invalid = [
            EngineError::EmptyPrompt,
            EngineError::from(SchedulerError::EmptyPrompt),
            EngineError::from(SchedulerError::PromptTooLong {
                prompt_tokens: 9,
                max_model_len: 8,
            }),
            EngineError::Sampling(SamplingParamsError::MaxTokensZero),
            EngineError::DuplicateId("a".into()),
        ];
        for e in invalid {
            assert!(e.is_invalid_request(), "{e:?}");
        }
        let engine_side = [
            EngineError::ShutDown,
            EngineError::from(SchedulerError::Busy {
                needed: 2,
                available: 1,
            }),
            EngineError::Model("boom".into()),
        ];
        for e in engine_side {
            assert!(!e.is_invalid_request(), "{e:?}");
        }
        assert_eq!(
            EngineError::from(SchedulerError::EmptyPrompt),
            EngineError::EmptyPrompt
        );
    }

    #[test]
    fn each_error_has_one_api_kind() {
        use EngineErrorKind::*;
        let table = [
            (EngineError::EmptyPrompt, InvalidRequest),
            (EngineError::DuplicateId("a".into()), InvalidRequest),
            (
                EngineError::Sampling(SamplingParamsError::MaxTokensZero),
                InvalidRequest,
            ),
            (
                EngineError::from(SchedulerError::PromptTooLong {
                    prompt_tokens: 9,
                    max_model_len: 8,
                }),
                InvalidRequest,
            ),
            (EngineError::ShutDown, Unavailable),
            (EngineError::Timeout(Duration::from_secs(1)), Unavailable),
            (
                EngineError::from(SchedulerError::Busy {
                    needed: 2,
                    available: 1,
                }),
                Internal,
            ),
            (EngineError::UnknownRequest("a".into()), Internal),
            (EngineError::Config("x".into()), Internal),
            (EngineError::Internal("x".into()), Internal),
            (EngineError::Model("boom".into()), Internal),
        ];
        for (e, kind) in table {
            assert_eq!(e.kind(), kind, "{e:?}");
        }
    }
}
