//! The engine's step loop, and the types its handle
//! ([`super::handle`]) speaks.
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
use std::time::Duration;

use tokio::sync::mpsc::{self, UnboundedSender};
use tracing::Span;

use super::block_pool::{BlockId, BlockPool, FenceId, KvEvent, SequenceId, TokenId};
use super::forward::ForwardModel;
use super::grammar::{GrammarCompiler, GrammarError};
use super::kv_storage::KvStorage;
use super::model::{LogitsFor, SequenceInput};
use super::sampling::{
    FinishReason, Sampler, SamplingParams, SamplingParamsError, TokenLogprobs, token_logprobs,
};
use super::scheduler::{RemoteReservation, Scheduler, SchedulerConfig, SchedulerError, SeqState};
use super::tokenizer::{StreamDecoder, Tokenizer};
use crate::sync::lock;

pub use super::handle::{EngineCall, EngineHandle};
use super::handle::{Inner, Reply};

/// How long an idle engine thread sleeps between looks at its commands.
const IDLE_WAIT: Duration = Duration::from_millis(50);

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
#[derive(Debug, Clone, PartialEq)]
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
    /// Only for requests whose sampling asked (`SamplingParams::logprobs`).
    pub logprobs: Option<TokenLogprobs>,
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
    /// Blocks held out of the pool because a given-up remote prefill's
    /// writer may still write into them.
    pub fenced_blocks: usize,
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
    #[error(transparent)]
    Grammar(#[from] GrammarError),
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
            | EngineError::DuplicateId(_)
            | EngineError::Grammar(GrammarError::Schema(_) | GrammarError::Unsupported(_)) => true,
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

    /// The request field at fault, for the `param` of an HTTP 400 (the
    /// frontend's and the decode worker's, which sends it on the bus).
    pub fn param(&self) -> Option<&'static str> {
        match self {
            EngineError::Sampling(s) => Some(s.param()),
            EngineError::EmptyPrompt | EngineError::TokenOutOfVocab { .. } => Some("prompt"),
            EngineError::Admission(SchedulerError::BeyondContext { .. }) => Some("max_tokens"),
            EngineError::Admission(_) => Some("prompt"),
            EngineError::Grammar(_) => Some("response_format"),
            _ => None,
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

pub(super) enum Command {
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
        first_logprobs: Option<TokenLogprobs>,
        reply: Reply<()>,
    },
    CancelRemote {
        id: String,
        reply: Reply<()>,
    },
    FenceRemote {
        id: String,
        reply: Reply<FenceId>,
    },
    ReleaseFence {
        fence: FenceId,
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
    /// block pool go to `kv_events`. `model` is any [`ForwardModel`] (the
    /// CPU model, the simulated one, or a `Box<dyn ForwardModel>` chosen at
    /// run time).
    pub fn start<M: ForwardModel>(
        model: M,
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
        // A model without a tokenizer (or EOS) serves no schema; requests
        // with one are refused by name.
        let grammars = match tokenizer.as_ref().map(|t| GrammarCompiler::new(t, vocab)) {
            Some(Ok(compiler)) => Ok(Arc::new(compiler)),
            Some(Err(e)) => Err(e),
            None => Err(GrammarError::Unsupported(
                "the model has no tokenizer".into(),
            )),
        };
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
        Ok(EngineHandle::new(Inner {
            commands,
            thread: Mutex::new(Some(thread)),
            stats,
            config,
            sched_config,
            vocab,
            eos_ids,
            grammars,
        }))
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
struct Worker<M> {
    model: M,
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

impl<M: ForwardModel> Worker<M> {
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
            fenced_blocks: pool.fenced_blocks(),
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
                first_logprobs,
                reply,
            } => {
                reply.send(self.complete_remote(&id, first_token, first_logprobs));
            }
            Command::CancelRemote { id, reply } => {
                let result = match self.ids.get(&id) {
                    Some(&seq) => self.scheduler.cancel_remote(seq).map_err(EngineError::from),
                    None => Err(EngineError::UnknownRequest(id)),
                };
                reply.send(result);
            }
            Command::FenceRemote { id, reply } => {
                let result = match self.ids.get(&id) {
                    Some(&seq) => self.scheduler.fence_remote(seq).map_err(EngineError::from),
                    None => Err(EngineError::UnknownRequest(id)),
                };
                reply.send(result);
            }
            Command::ReleaseFence { fence } => match self.scheduler.release_fence(fence) {
                Ok(blocks) => tracing::debug!(?fence, blocks, "fence released"),
                Err(e) => tracing::warn!(?fence, "releasing a fence failed: {e}"),
            },
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

    fn complete_remote(
        &mut self,
        id: &str,
        first_token: TokenId,
        first_logprobs: Option<TokenLogprobs>,
    ) -> Result<(), EngineError> {
        let &seq = self
            .ids
            .get(id)
            .ok_or_else(|| EngineError::UnknownRequest(id.to_string()))?;
        self.scheduler.complete_remote(seq)?;
        // The prefill side sampled this token (and computed its logprobs
        // from its logits): stream it like a local one.
        self.emit(seq, first_token, first_logprobs);
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
            // Only requests that ask pay for the log-softmax.
            let logprobs = active
                .sampler
                .params()
                .logprobs
                .map(|top| token_logprobs(logits, token, top as usize));
            self.emit(c.seq, token, logprobs);
        }
        true
    }

    /// Stream `token` for `seq`, then end it or append it for the next step.
    fn emit(&mut self, seq: SequenceId, token: TokenId, logprobs: Option<TokenLogprobs>) {
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
        if step.finish.is_some()
            && let Some(grammar) = active.sampler.grammar()
        {
            tracing::debug!(
                parent: &active.span,
                mean_mask_us = grammar.mean_mask_time().as_micros() as u64,
                "constrained output finished"
            );
        }
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
            logprobs,
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
