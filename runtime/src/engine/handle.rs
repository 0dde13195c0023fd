//! The way into a running engine: [`EngineHandle`], one API for async and
//! blocking callers.
//!
//! Calls that only queue work ([`EngineHandle::submit`],
//! [`EngineHandle::cancel`]) return at once. Calls that need the engine
//! thread's answer return an [`EngineCall`]: async code awaits it, a thread
//! that may block calls [`EngineCall::wait`]; either way the thread answers
//! between steps, within a deadline. Requests are validated here, before
//! they reach the thread, so bad input becomes a typed error. The step loop
//! itself is [`super::runner`].

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::block_pool::{BlockId, FenceId, TokenId};
use super::grammar::{GrammarCompiler, GrammarError};
use super::kv_storage::KvStorage;
use super::runner::{Command, EngineConfig, EngineError, EngineStats, OutputItem, Request};
use super::sampling::{Sampler, TokenLogprobs};
use super::scheduler::{RemoteReservation, SchedulerConfig, admission_check};
use crate::sync::lock;

/// How long a handle call that needs the engine thread's answer waits for
/// it (the thread answers between steps).
const REPLY_DEADLINE: Duration = Duration::from_secs(30);

/// Where the engine thread sends an answer: to a blocking caller or to an
/// async one.
pub(super) enum Reply<T> {
    Blocking(std_mpsc::Sender<Result<T, EngineError>>),
    Async(oneshot::Sender<Result<T, EngineError>>),
}

impl<T> Reply<T> {
    /// A caller that gave up waiting is not an error here.
    pub(super) fn send(self, result: Result<T, EngineError>) {
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

/// What the handles of one engine share.
pub(super) struct Inner {
    pub(super) commands: std_mpsc::Sender<Command>,
    pub(super) thread: Mutex<Option<JoinHandle<()>>>,
    pub(super) stats: Arc<Mutex<EngineStats>>,
    pub(super) config: EngineConfig,
    pub(super) sched_config: SchedulerConfig,
    pub(super) vocab: usize,
    pub(super) eos_ids: Vec<TokenId>,
    /// Compiles the JSON schemas of constrained requests (or why this
    /// engine cannot).
    pub(super) grammars: Result<Arc<GrammarCompiler>, GrammarError>,
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
    pub(super) fn new(inner: Inner) -> EngineHandle {
        EngineHandle {
            inner: Arc::new(inner),
        }
    }

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
        let mut sampler = Sampler::new(request.sampling.clone(), &self.inner.eos_ids)?;
        if let Some(schema) = &request.sampling.json_schema {
            let compiler = self.inner.grammars.as_ref().map_err(Clone::clone)?;
            sampler = sampler.with_grammar(compiler.compile(schema)?);
        }
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
    /// [`super::scheduler::SchedulerError::Busy`] admission error when the blocks are not free
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
    /// `first_token` (with its log-probabilities, when the request asked
    /// for them): it is streamed as the first output and decoding goes on
    /// from there.
    pub fn complete_remote_prefill(
        &self,
        id: &str,
        first_token: TokenId,
        first_logprobs: Option<TokenLogprobs>,
    ) -> EngineCall<()> {
        if let Err(e) = self.check_first_token(first_token) {
            return EngineCall::failed(self, e);
        }
        let id = id.to_string();
        self.call_with(move |reply| Command::CompleteRemote {
            id,
            first_token,
            first_logprobs,
            reply,
        })
    }

    /// The remote prefill of `id` failed and nothing more will be written:
    /// its blocks are released and it is prefilled locally instead.
    pub fn cancel_remote_prefill(&self, id: &str) -> EngineCall<()> {
        let id = id.to_string();
        self.call_with(move |reply| Command::CancelRemote { id, reply })
    }

    /// The remote prefill of `id` is given up but its writer may still be
    /// writing: its blocks stay out of use under the returned fence until
    /// [`EngineHandle::release_fence`], and it is prefilled locally in other
    /// blocks.
    pub fn fence_remote_prefill(&self, id: &str) -> EngineCall<FenceId> {
        let id = id.to_string();
        self.call_with(move |reply| Command::FenceRemote { id, reply })
    }

    /// Nothing more can be written into the blocks of `fence`: they go back
    /// to the pool.
    pub fn release_fence(&self, fence: FenceId) -> Result<(), EngineError> {
        self.send(Command::ReleaseFence { fence })
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

    /// A reader of [`EngineHandle::stats`] that does not keep the engine
    /// (its command channel, its thread) alive, for a metrics registry that
    /// may outlive it.
    pub fn stats_reader(&self) -> impl Fn() -> EngineStats + Send + Sync + 'static {
        let stats = self.inner.stats.clone();
        move || *lock(&stats)
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
