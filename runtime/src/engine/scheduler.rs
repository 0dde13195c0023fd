//! The continuous-batching policy: which sequences run in the next forward
//! step and how many of their tokens, over one [`BlockPool`].
//!
//! Each step first continues the running sequences in admission order (a
//! decode token, or the next chunk of a long prompt), then admits waiting
//! sequences first-come first-served, all under a per-step token budget
//! (`max_batch_tokens`, so long prompts are prefilled in chunks) and a cap on
//! sequences per step (`max_seqs`). When a running sequence needs a block and
//! none is free, the most recently admitted running sequence is preempted by
//! recompute: its blocks go back to the pool (its full blocks stay in the
//! prefix cache) and it returns to the front of the waiting queue. A sequence
//! whose KV is being written by a remote prefill is never preempted.
//!
//! This is pure bookkeeping over token ids: it never runs the model, samples,
//! or talks to callers (the runner does). A request that can never fit is
//! refused at admission ([`admission_check`]), so no sequence can wait
//! forever for blocks the pool does not have.

use std::collections::{HashMap, VecDeque};

use super::block_pool::{BlockId, BlockPool, BlockPoolError, FenceId, SequenceId, TokenId};

/// Limits of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most new tokens (prefill chunks plus decodes) in one forward step.
    pub max_batch_tokens: usize,
    /// Most sequences in one forward step, and in the running set.
    pub max_seqs: usize,
    /// Most tokens (prompt plus generated) of one sequence.
    pub max_model_len: usize,
}

/// Why the scheduler refused a request or an operation. Admission errors
/// describe the request, in words meant to reach the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error(
        "scheduler needs max_batch_tokens, max_seqs and max_model_len of at least 1, got {0:?}"
    )]
    InvalidConfig(SchedulerConfig),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_tokens} tokens, but this model's context length is {max_model_len} tokens and at least one token must be generated"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        max_model_len: usize,
    },
    #[error(
        "the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds this model's context length of {max_model_len} tokens"
    )]
    BeyondContext {
        prompt_tokens: usize,
        max_tokens: u32,
        max_model_len: usize,
    },
    #[error(
        "the request needs up to {needed} KV cache blocks but this engine has only {total}; it can never fit"
    )]
    NeverFits { needed: usize, total: usize },
    #[error("{0} is already known to the scheduler")]
    Duplicate(SequenceId),
    #[error("{0} is not known to the scheduler")]
    Unknown(SequenceId),
    #[error("{seq} is {state}, expected {expected}")]
    WrongState {
        seq: SequenceId,
        state: &'static str,
        expected: &'static str,
    },
    #[error("not enough free KV blocks now: {needed} needed, {available} available")]
    Busy { needed: usize, available: usize },
    #[error(transparent)]
    Pool(#[from] BlockPoolError),
}

/// Checks that a request of `prompt_tokens` tokens generating at most
/// `max_tokens` (`None`: up to the context) can ever run on a pool of
/// `total_blocks` blocks of `block_size`. Returns the most tokens the
/// sequence may reach (prompt plus generated).
pub fn admission_check(
    config: &SchedulerConfig,
    block_size: usize,
    total_blocks: usize,
    prompt_tokens: usize,
    max_tokens: Option<u32>,
) -> Result<usize, SchedulerError> {
    if prompt_tokens == 0 {
        return Err(SchedulerError::EmptyPrompt);
    }
    let max_model_len = config.max_model_len;
    if prompt_tokens >= max_model_len {
        return Err(SchedulerError::PromptTooLong {
            prompt_tokens,
            max_model_len,
        });
    }
    let max_len = match max_tokens {
        Some(max_tokens) => {
            let total = prompt_tokens.saturating_add(max_tokens as usize);
            if total > max_model_len {
                return Err(SchedulerError::BeyondContext {
                    prompt_tokens,
                    max_tokens,
                    max_model_len,
                });
            }
            total
        }
        None => max_model_len,
    };
    // The last generated token is never fed back, so its K/V is never stored.
    let needed = (max_len - 1).max(prompt_tokens).div_ceil(block_size.max(1));
    if needed > total_blocks {
        return Err(SchedulerError::NeverFits {
            needed,
            total: total_blocks,
        });
    }
    Ok(max_len)
}

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqState {
    /// Queued for (re)prefill; holds no blocks.
    Waiting,
    /// Holds blocks and is computed step by step.
    Running,
    /// Holds blocks a remote prefill is writing; never scheduled or
    /// preempted until completed or cancelled.
    Transferring,
    /// Finished, but its blocks are kept for the caller to read (the
    /// prefill side of a disaggregated request) until removed.
    Held,
}

impl SeqState {
    fn as_str(self) -> &'static str {
        match self {
            SeqState::Waiting => "waiting",
            SeqState::Running => "running",
            SeqState::Transferring => "in a KV transfer",
            SeqState::Held => "held",
        }
    }
}

/// One sequence's share of a step: run `tokens[start_pos..start_pos +
/// num_tokens]` of the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledChunk {
    pub seq: SequenceId,
    pub start_pos: usize,
    pub num_tokens: usize,
    /// The chunk reaches the sequence's last token, so its logits give the
    /// next token; `false` for a prefill chunk that is not the last.
    pub samples: bool,
}

/// What to run in one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub chunks: Vec<ScheduledChunk>,
    /// Sequences preempted (blocks freed, back to waiting) while planning.
    pub preempted: Vec<SequenceId>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.num_tokens).sum()
    }
}

/// Blocks reserved for a remote prefill to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteReservation {
    /// Blocks to write, in order; the first holds token
    /// `cached_tokens` (always a block boundary).
    pub block_ids: Vec<BlockId>,
    /// Leading prompt tokens already in this engine's prefix cache: the
    /// remote side need not send them.
    pub cached_tokens: usize,
}

#[derive(Debug)]
struct Seq {
    /// Prompt, then generated tokens.
    tokens: Vec<TokenId>,
    prompt_len: usize,
    /// Most tokens this sequence may reach.
    max_len: usize,
    state: SeqState,
    /// Tokens whose K/V is in memory (mirrors the pool).
    num_computed: usize,
    /// Tokens the pool knows (a sampled token waits here until the step
    /// that computes it, so that running out of blocks can preempt).
    in_pool: usize,
    /// Prompt tokens found in the prefix cache at first admission.
    cached_tokens: Option<usize>,
    preemptions: u32,
}

/// Waiting and running queues over a block pool. See the module doc.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    waiting: VecDeque<SequenceId>,
    /// In admission order: the last one is preempted first.
    running: Vec<SequenceId>,
    seqs: HashMap<SequenceId, Seq>,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, pool: BlockPool) -> Result<Self, SchedulerError> {
        if config.max_batch_tokens == 0 || config.max_seqs == 0 || config.max_model_len == 0 {
            return Err(SchedulerError::InvalidConfig(config));
        }
        Ok(Scheduler {
            config,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            seqs: HashMap::new(),
            preemptions: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences whose KV a remote prefill is writing.
    pub fn num_transferring(&self) -> usize {
        self.count(SeqState::Transferring)
    }

    pub fn num_held(&self) -> usize {
        self.count(SeqState::Held)
    }

    fn count(&self, state: SeqState) -> usize {
        self.seqs.values().filter(|s| s.state == state).count()
    }

    /// Preemptions since the start.
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Whether a step could have something to run.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn contains(&self, seq: SequenceId) -> bool {
        self.seqs.contains_key(&seq)
    }

    pub fn state(&self, seq: SequenceId) -> Option<SeqState> {
        self.seqs.get(&seq).map(|s| s.state)
    }

    /// Prompt and generated tokens of `seq`.
    pub fn tokens(&self, seq: SequenceId) -> Option<&[TokenId]> {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice())
    }

    /// Prompt tokens that came from the prefix cache at first admission.
    pub fn cached_tokens(&self, seq: SequenceId) -> Option<usize> {
        self.seqs.get(&seq).and_then(|s| s.cached_tokens)
    }

    /// How often `seq` was preempted.
    pub fn preemptions_of(&self, seq: SequenceId) -> Option<u32> {
        self.seqs.get(&seq).map(|s| s.preemptions)
    }

    pub fn block_table(&self, seq: SequenceId) -> Option<&[BlockId]> {
        self.pool.block_table(seq)
    }

    /// Whether one more token would make `seq` reach its length limit (the
    /// context window or prompt + max_tokens).
    pub fn next_token_is_last(&self, seq: SequenceId) -> bool {
        self.seqs
            .get(&seq)
            .is_some_and(|s| s.tokens.len() + 1 >= s.max_len)
    }

    fn check_new(
        &self,
        seq: SequenceId,
        prompt: &[TokenId],
        max_tokens: Option<u32>,
    ) -> Result<usize, SchedulerError> {
        if self.seqs.contains_key(&seq) {
            return Err(SchedulerError::Duplicate(seq));
        }
        admission_check(
            &self.config,
            self.pool.block_size(),
            self.pool.total_blocks(),
            prompt.len(),
            max_tokens,
        )
    }

    /// Queue a request for local prefill.
    pub fn add(
        &mut self,
        seq: SequenceId,
        prompt: Vec<TokenId>,
        max_tokens: Option<u32>,
    ) -> Result<(), SchedulerError> {
        let max_len = self.check_new(seq, &prompt, max_tokens)?;
        self.seqs.insert(
            seq,
            Seq {
                prompt_len: prompt.len(),
                tokens: prompt,
                max_len,
                state: SeqState::Waiting,
                num_computed: 0,
                in_pool: 0,
                cached_tokens: None,
                preemptions: 0,
            },
        );
        self.waiting.push_back(seq);
        Ok(())
    }

    /// Reserve blocks for a prompt whose K/V a remote prefill will write.
    /// Fails with [`SchedulerError::Busy`] when the blocks are not free now
    /// (the caller may prefill locally instead, with [`Scheduler::add`]).
    pub fn add_remote(
        &mut self,
        seq: SequenceId,
        prompt: Vec<TokenId>,
        max_tokens: Option<u32>,
    ) -> Result<RemoteReservation, SchedulerError> {
        let max_len = self.check_new(seq, &prompt, max_tokens)?;
        let hit = match self.pool.allocate_prompt(seq, &prompt) {
            Ok(hit) => hit,
            Err(BlockPoolError::OutOfBlocks { needed, available }) => {
                return Err(SchedulerError::Busy { needed, available });
            }
            Err(e) => return Err(e.into()),
        };
        let block_ids = match self.pool.begin_transfer(seq) {
            Ok(blocks) => blocks,
            Err(e) => {
                let _ = self.pool.free_sequence(seq);
                return Err(e.into());
            }
        };
        self.seqs.insert(
            seq,
            Seq {
                prompt_len: prompt.len(),
                in_pool: prompt.len(),
                tokens: prompt,
                max_len,
                state: SeqState::Transferring,
                num_computed: hit.tokens,
                cached_tokens: Some(hit.tokens),
                preemptions: 0,
            },
        );
        Ok(RemoteReservation {
            block_ids,
            cached_tokens: hit.tokens,
        })
    }

    /// The remote prefill of `seq` wrote the whole prompt: `seq` runs from
    /// here. The first token, sampled on the prefill side, is added with
    /// [`Scheduler::append_token`] like any sampled token.
    pub fn complete_remote(&mut self, seq: SequenceId) -> Result<(), SchedulerError> {
        self.expect_state(seq, SeqState::Transferring)?;
        self.pool.complete_transfer(seq)?;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(SchedulerError::Unknown(seq))?;
        s.num_computed = s.prompt_len;
        s.state = SeqState::Running;
        self.running.push(seq);
        Ok(())
    }

    /// The remote prefill of `seq` failed or was abandoned (nothing more
    /// will be written): release its blocks and queue it for local prefill.
    pub fn cancel_remote(&mut self, seq: SequenceId) -> Result<(), SchedulerError> {
        self.expect_state(seq, SeqState::Transferring)?;
        self.pool.cancel_transfer(seq)?;
        self.requeue_local(seq)
    }

    /// The remote prefill of `seq` is given up, but its writer may still be
    /// writing: its blocks stay out of the pool under the returned fence
    /// (until [`Scheduler::release_fence`]) and `seq` is queued for local
    /// prefill into other blocks.
    pub fn fence_remote(&mut self, seq: SequenceId) -> Result<FenceId, SchedulerError> {
        self.expect_state(seq, SeqState::Transferring)?;
        let fence = self.pool.fence_transfer(seq)?;
        self.requeue_local(seq)?;
        Ok(fence)
    }

    /// Nothing more can be written into the blocks of `fence`: free them.
    pub fn release_fence(&mut self, fence: FenceId) -> Result<usize, SchedulerError> {
        Ok(self.pool.release_fence(fence)?)
    }

    /// `seq`, whose blocks the pool no longer holds, waits for a local prefill.
    fn requeue_local(&mut self, seq: SequenceId) -> Result<(), SchedulerError> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(SchedulerError::Unknown(seq))?;
        s.num_computed = 0;
        s.in_pool = 0;
        s.state = SeqState::Waiting;
        self.waiting.push_back(seq);
        Ok(())
    }

    fn expect_state(&self, seq: SequenceId, expected: SeqState) -> Result<(), SchedulerError> {
        let s = self.seqs.get(&seq).ok_or(SchedulerError::Unknown(seq))?;
        if s.state != expected {
            return Err(SchedulerError::WrongState {
                seq,
                state: s.state.as_str(),
                expected: expected.as_str(),
            });
        }
        Ok(())
    }

    /// Plan the next step. Blocks for every planned token are in the pool
    /// when this returns; report the step with [`Scheduler::commit`].
    #[allow(
        clippy::expect_used,
        reason = "every id in `waiting` and `running` has an entry in `seqs`"
    )]
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_batch_tokens;

        // Running sequences first, oldest first; victims come from the back.
        let mut i = 0;
        while i < self.running.len() && budget > 0 && plan.chunks.len() < self.config.max_seqs {
            let id = self.running[i];
            if !self.make_room(id, &mut plan.preempted) {
                // `id` preempted itself: it was the last running sequence.
                break;
            }
            let s = &self.seqs[&id];
            let remaining = s.tokens.len() - s.num_computed;
            if remaining > 0 {
                let n = remaining.min(budget);
                plan.chunks.push(ScheduledChunk {
                    seq: id,
                    start_pos: s.num_computed,
                    num_tokens: n,
                    samples: s.num_computed + n == s.tokens.len(),
                });
                budget -= n;
            }
            i += 1;
        }

        // Admitting while preempting would only thrash.
        if plan.preempted.is_empty() {
            while budget > 0 && self.running.len() < self.config.max_seqs {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                let s = &self.seqs[&id];
                let hit = match self.pool.allocate_prompt(id, &s.tokens) {
                    Ok(hit) => hit,
                    // First come, first served: nobody overtakes the head.
                    Err(BlockPoolError::OutOfBlocks { .. }) => break,
                    Err(e) => {
                        // Admission checks make this unreachable; keep the
                        // queue moving rather than spin on the head.
                        tracing::error!(%id, error = %e, "cannot allocate a waiting sequence; dropping it");
                        self.waiting.pop_front();
                        self.seqs.remove(&id);
                        continue;
                    }
                };
                self.waiting.pop_front();
                self.running.push(id);
                let s = self.seqs.get_mut(&id).expect("waiting sequence is known");
                s.state = SeqState::Running;
                s.num_computed = hit.tokens;
                s.in_pool = s.tokens.len();
                s.cached_tokens.get_or_insert(hit.tokens);
                let n = (s.tokens.len() - hit.tokens).min(budget);
                plan.chunks.push(ScheduledChunk {
                    seq: id,
                    start_pos: hit.tokens,
                    num_tokens: n,
                    samples: hit.tokens + n == s.tokens.len(),
                });
                budget -= n;
            }
        }
        plan
    }

    /// Give the pool the tokens of running `id` it does not know yet,
    /// preempting from the back of `running` while blocks are short.
    /// Returns `false` if `id` itself was preempted.
    #[allow(
        clippy::expect_used,
        reason = "every id in `waiting` and `running` has an entry in `seqs`"
    )]
    fn make_room(&mut self, id: SequenceId, preempted: &mut Vec<SequenceId>) -> bool {
        loop {
            let s = &self.seqs[&id];
            if s.in_pool == s.tokens.len() {
                return true;
            }
            match self.pool.append_tokens(id, &s.tokens[s.in_pool..]) {
                Ok(()) => {
                    let s = self.seqs.get_mut(&id).expect("running sequence is known");
                    s.in_pool = s.tokens.len();
                    return true;
                }
                Err(e) => {
                    if !matches!(e, BlockPoolError::OutOfBlocks { .. }) {
                        tracing::error!(%id, error = %e, "cannot extend a running sequence; recomputing it");
                    }
                    let victim = self.running.pop().expect("`id` is running");
                    self.preempt(victim);
                    preempted.push(victim);
                    if victim == id {
                        return false;
                    }
                }
            }
        }
    }

    #[allow(
        clippy::expect_used,
        reason = "every id in `waiting` and `running` has an entry in `seqs`"
    )]
    fn preempt(&mut self, id: SequenceId) {
        if let Err(e) = self.pool.free_sequence(id) {
            tracing::error!(%id, error = %e, "preempted sequence was not in the pool");
        }
        let s = self.seqs.get_mut(&id).expect("preempted sequence is known");
        s.state = SeqState::Waiting;
        s.num_computed = 0;
        s.in_pool = 0;
        s.preemptions += 1;
        self.preemptions += 1;
        self.waiting.push_front(id);
        tracing::debug!(%id, tokens = s.tokens.len(), "preempted by recompute");
    }

    /// The forward pass of `plan` succeeded: its tokens' K/V is in memory.
    pub fn commit(&mut self, plan: &StepPlan) -> Result<(), SchedulerError> {
        for chunk in &plan.chunks {
            let Some(s) = self.seqs.get_mut(&chunk.seq) else {
                continue; // removed since planning
            };
            if s.state != SeqState::Running {
                continue;
            }
            s.num_computed = chunk.start_pos + chunk.num_tokens;
            self.pool.mark_computed(chunk.seq, s.num_computed)?;
        }
        Ok(())
    }

    /// Add the token sampled for running `seq`; it is computed in a later
    /// step.
    pub fn append_token(&mut self, seq: SequenceId, token: TokenId) -> Result<(), SchedulerError> {
        self.expect_state(seq, SeqState::Running)?;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(SchedulerError::Unknown(seq))?;
        s.tokens.push(token);
        Ok(())
    }

    /// `seq` finished but its blocks stay allocated (and out of the way of
    /// preemption) until [`Scheduler::remove`].
    pub fn hold(&mut self, seq: SequenceId) -> Result<(), SchedulerError> {
        self.expect_state(seq, SeqState::Running)?;
        self.running.retain(|&r| r != seq);
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.state = SeqState::Held;
        }
        Ok(())
    }

    /// Forget `seq` in whatever state, giving back its blocks (a transfer in
    /// flight is cancelled: the caller guarantees nothing more is written).
    pub fn remove(&mut self, seq: SequenceId) -> Result<(), SchedulerError> {
        let s = self.seqs.remove(&seq).ok_or(SchedulerError::Unknown(seq))?;
        match s.state {
            SeqState::Waiting => self.waiting.retain(|&w| w != seq),
            SeqState::Running => {
                self.running.retain(|&r| r != seq);
                self.pool.free_sequence(seq)?;
            }
            SeqState::Transferring => self.pool.cancel_transfer(seq)?,
            SeqState::Held => self.pool.free_sequence(seq)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    fn sched(num_blocks: u32, max_batch_tokens: usize, max_seqs: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_batch_tokens,
                max_seqs,
                max_model_len: 64,
            },
            BlockPool::new(num_blocks, BS).unwrap(),
        )
        .unwrap()
    }

    fn prompt(seed: u32, len: usize) -> Vec<TokenId> {
        (0..len as u32).map(|i| seed * 1000 + i).collect()
    }

    /// Plays the runner: commit the plan and append a token to every
    /// sequence that sampled. Returns the sequences that sampled.
    fn run_step(s: &mut Scheduler) -> (StepPlan, Vec<SequenceId>) {
        let plan = s.schedule();
        s.commit(&plan).unwrap();
        let mut sampled = Vec::new();
        for c in &plan.chunks {
            if c.samples {
                s.append_token(c.seq, 7).unwrap();
                sampled.push(c.seq);
            }
        }
        (plan, sampled)
    }

    fn check_full_pool(s: &Scheduler) {
        let p = s.pool();
        assert_eq!(
            p.free_blocks() + p.cached_free_blocks(),
            p.total_blocks(),
            "all blocks back"
        );
    }

    #[test]
    fn decodes_go_first_then_prefills_under_the_budget() {
        let mut s = sched(32, 8, 8);
        s.add(SequenceId(1), prompt(1, 5), Some(10)).unwrap();
        let (plan, sampled) = run_step(&mut s);
        assert_eq!(plan.num_tokens(), 5);
        assert_eq!(sampled, [SequenceId(1)]);

        s.add(SequenceId(2), prompt(2, 20), Some(10)).unwrap();
        let plan = s.schedule();
        assert_eq!(
            plan.chunks,
            [
                ScheduledChunk {
                    seq: SequenceId(1),
                    start_pos: 5,
                    num_tokens: 1,
                    samples: true
                },
                ScheduledChunk {
                    seq: SequenceId(2),
                    start_pos: 0,
                    num_tokens: 7,
                    samples: false
                },
            ]
        );
        s.commit(&plan).unwrap();
        s.append_token(SequenceId(1), 9).unwrap();
        // Chunked prefill continues: 1 decode + 7 more prompt tokens.
        let plan = s.schedule();
        assert_eq!(plan.chunks[1].start_pos, 7);
        assert_eq!(plan.chunks[1].num_tokens, 7);
        assert!(!plan.chunks[1].samples);
        s.commit(&plan).unwrap();
        s.append_token(SequenceId(1), 9).unwrap();
        let plan = s.schedule();
        assert_eq!(plan.chunks[1].start_pos, 14);
        assert_eq!(plan.chunks[1].num_tokens, 6);
        assert!(plan.chunks[1].samples, "last chunk samples");
    }

    #[test]
    fn max_seqs_caps_a_step() {
        let mut s = sched(64, 100, 2);
        for i in 0..4 {
            s.add(SequenceId(i), prompt(i as u32, 3), Some(5)).unwrap();
        }
        let plan = s.schedule();
        assert_eq!(plan.chunks.len(), 2);
        assert_eq!(s.num_running(), 2);
        assert_eq!(s.num_waiting(), 2);
    }

    #[test]
    fn admission_refuses_what_can_never_fit() {
        let mut s = sched(4, 16, 4);
        assert_eq!(
            s.add(SequenceId(1), vec![], Some(1)),
            Err(SchedulerError::EmptyPrompt)
        );
        assert!(matches!(
            s.add(SequenceId(1), prompt(1, 64), Some(1)),
            Err(SchedulerError::PromptTooLong { .. })
        ));
        assert!(matches!(
            s.add(SequenceId(1), prompt(1, 60), Some(5)),
            Err(SchedulerError::BeyondContext { .. })
        ));
        // 4 blocks of 4 hold 16 tokens: 10 + 7 - 1 = 16 fits, 10 + 8 does not.
        s.add(SequenceId(1), prompt(1, 10), Some(7)).unwrap();
        let err = s.add(SequenceId(2), prompt(1, 10), Some(8)).unwrap_err();
        assert_eq!(
            err,
            SchedulerError::NeverFits {
                needed: 5,
                total: 4
            }
        );
        assert!(err.to_string().contains("can never fit"), "{err}");
        assert_eq!(
            s.add(SequenceId(1), prompt(1, 3), Some(1)),
            Err(SchedulerError::Duplicate(SequenceId(1)))
        );
    }

    #[test]
    fn running_out_preempts_the_newest_and_everyone_finishes() {
        // 6 blocks of 4 = 24 tokens; three sequences of 8 + 8 need 45.
        let mut s = sched(6, 64, 8);
        let max_new = 8u32;
        for i in 1..=3 {
            s.add(SequenceId(i), prompt(i as u32, 8), Some(max_new))
                .unwrap();
        }
        let mut generated: HashMap<SequenceId, u32> = HashMap::new();
        let mut saw_preemption = false;
        for _ in 0..200 {
            if !s.has_work() {
                break;
            }
            let plan = s.schedule();
            if let Some(&victim) = plan.preempted.first() {
                saw_preemption = true;
                // The newest running sequence goes, to the front of the queue.
                assert_eq!(s.state(victim), Some(SeqState::Waiting));
                assert_eq!(s.waiting.front(), Some(plan.preempted.last().unwrap()));
            }
            assert!(plan.num_tokens() <= 64);
            s.commit(&plan).unwrap();
            for c in &plan.chunks {
                if c.samples {
                    let n = generated.entry(c.seq).or_default();
                    *n += 1;
                    if *n == max_new {
                        s.remove(c.seq).unwrap();
                    } else {
                        s.append_token(c.seq, 7).unwrap();
                    }
                }
            }
        }
        assert!(saw_preemption);
        assert!(!s.has_work());
        assert_eq!(generated.len(), 3);
        assert!(generated.values().all(|&n| n == max_new));
        assert!(s.num_preemptions() > 0);
        check_full_pool(&s);
    }

    #[test]
    fn the_oldest_sequence_is_not_preempted_for_a_newer_one() {
        // 4 blocks of 4. Seq 1 (8 tokens, 2 blocks) then seq 2 (8 tokens).
        let mut s = sched(4, 64, 8);
        s.add(SequenceId(1), prompt(1, 8), Some(8)).unwrap();
        s.add(SequenceId(2), prompt(2, 8), Some(8)).unwrap();
        run_step(&mut s);
        assert_eq!(s.pool().available_blocks(), 0);
        // Both need a third block for their 9th token: seq 2 goes.
        let plan = s.schedule();
        assert_eq!(plan.preempted, [SequenceId(2)]);
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.chunks[0].seq, SequenceId(1));
        // It recomputes its prompt plus the token it had generated.
        s.commit(&plan).unwrap();
        s.remove(SequenceId(1)).unwrap();
        let plan = s.schedule();
        assert_eq!(plan.chunks[0].seq, SequenceId(2));
        assert_eq!(s.tokens(SequenceId(2)).unwrap().len(), 9);
        // Its first block stayed cached when it was preempted (the tail is
        // evicted first, here for seq 1's third block).
        assert_eq!(plan.chunks[0].start_pos, 4);
        assert_eq!(s.preemptions_of(SequenceId(2)), Some(1));
    }

    #[test]
    fn a_sequence_in_transfer_is_never_preempted() {
        let mut s = sched(4, 64, 8);
        s.add(SequenceId(1), prompt(1, 8), Some(8)).unwrap();
        run_step(&mut s);
        let r = s.add_remote(SequenceId(2), prompt(2, 8), Some(8)).unwrap();
        assert_eq!(r.block_ids.len(), 2);
        assert_eq!(s.num_transferring(), 1);
        // Seq 1 needs a block; the only other holder is in transfer, so seq 1
        // preempts itself and waits.
        let plan = s.schedule();
        assert_eq!(plan.preempted, [SequenceId(1)]);
        assert!(plan.chunks.is_empty());
        assert_eq!(s.state(SequenceId(2)), Some(SeqState::Transferring));
        // The transfer completes: seq 2 decodes from its first token.
        s.complete_remote(SequenceId(2)).unwrap();
        s.append_token(SequenceId(2), 42).unwrap();
        let plan = s.schedule();
        assert_eq!(
            plan.chunks,
            [ScheduledChunk {
                seq: SequenceId(2),
                start_pos: 8,
                num_tokens: 1,
                samples: true
            }]
        );
        assert_eq!(s.tokens(SequenceId(2)).unwrap()[8], 42);
    }

    #[test]
    fn a_cancelled_transfer_falls_back_to_local_prefill() {
        let mut s = sched(8, 64, 8);
        s.add_remote(SequenceId(1), prompt(1, 6), Some(4)).unwrap();
        assert!(
            s.schedule().chunks.is_empty(),
            "transfers are not scheduled"
        );
        s.cancel_remote(SequenceId(1)).unwrap();
        assert_eq!(s.pool().in_transfer_blocks(), 0);
        let plan = s.schedule();
        assert_eq!(plan.chunks[0].num_tokens, 6);
        assert!(plan.chunks[0].samples);
        assert!(matches!(
            s.complete_remote(SequenceId(1)),
            Err(SchedulerError::WrongState { .. })
        ));
    }

    #[test]
    fn a_fenced_transfer_falls_back_to_local_prefill_in_other_blocks() {
        let mut s = sched(8, 64, 8);
        let r = s.add_remote(SequenceId(1), prompt(1, 6), Some(4)).unwrap();
        let fence = s.fence_remote(SequenceId(1)).unwrap();
        assert_eq!(s.pool().fenced_blocks(), r.block_ids.len());
        let plan = s.schedule();
        assert_eq!(plan.chunks[0].num_tokens, 6);
        let table = s.block_table(SequenceId(1)).unwrap().to_vec();
        assert!(table.iter().all(|b| !r.block_ids.contains(b)), "{table:?}");
        run_step(&mut s);
        s.remove(SequenceId(1)).unwrap();
        assert_eq!(s.pool().fenced_blocks(), r.block_ids.len());
        assert_eq!(s.release_fence(fence), Ok(r.block_ids.len()));
        assert_eq!(s.pool().available_blocks(), 8);
    }

    #[test]
    fn a_remote_reservation_skips_the_cached_prefix() {
        let mut s = sched(16, 64, 8);
        s.add(SequenceId(1), prompt(1, 9), Some(4)).unwrap();
        run_step(&mut s);
        s.remove(SequenceId(1)).unwrap();
        let r = s.add_remote(SequenceId(2), prompt(1, 10), Some(4)).unwrap();
        assert_eq!(r.cached_tokens, 8);
        assert_eq!(r.block_ids.len(), 1);
        assert_eq!(s.cached_tokens(SequenceId(2)), Some(8));
    }

    #[test]
    fn a_busy_pool_refuses_a_remote_reservation() {
        let mut s = sched(4, 64, 8);
        s.add(SequenceId(1), prompt(1, 12), Some(4)).unwrap();
        run_step(&mut s);
        assert!(matches!(
            s.add_remote(SequenceId(2), prompt(2, 8), Some(4)),
            Err(SchedulerError::Busy { .. })
        ));
        assert!(!s.contains(SequenceId(2)));
    }

    #[test]
    fn removal_in_any_state_gives_every_block_back() {
        let mut s = sched(16, 6, 8);
        s.add(SequenceId(1), prompt(1, 10), Some(4)).unwrap(); // running, mid-prefill
        s.add(SequenceId(2), prompt(2, 5), Some(4)).unwrap(); // waiting
        run_step(&mut s);
        s.add_remote(SequenceId(3), prompt(3, 5), Some(4)).unwrap();
        s.add(SequenceId(4), prompt(4, 3), Some(4)).unwrap();
        assert_eq!(s.state(SequenceId(1)), Some(SeqState::Running));
        assert_eq!(s.state(SequenceId(2)), Some(SeqState::Waiting));
        for i in 1..=4 {
            s.remove(SequenceId(i)).unwrap();
        }
        assert!(!s.has_work());
        check_full_pool(&s);
        assert_eq!(
            s.remove(SequenceId(1)),
            Err(SchedulerError::Unknown(SequenceId(1)))
        );
    }

    #[test]
    fn a_held_sequence_keeps_its_blocks_until_removed() {
        let mut s = sched(8, 64, 8);
        s.add(SequenceId(1), prompt(1, 6), Some(1)).unwrap();
        run_step(&mut s);
        s.hold(SequenceId(1)).unwrap();
        assert_eq!(s.num_running(), 0);
        assert_eq!(s.block_table(SequenceId(1)).unwrap().len(), 2);
        assert!(!s.has_work());
        s.remove(SequenceId(1)).unwrap();
        check_full_pool(&s);
    }

    #[test]
    fn the_length_limit_is_reported_one_token_ahead() {
        let mut s = sched(16, 64, 8);
        s.add(SequenceId(1), prompt(1, 4), Some(2)).unwrap();
        run_step(&mut s);
        // 4 prompt + 1 generated; the next token is the 2nd and last.
        assert!(s.next_token_is_last(SequenceId(1)));
    }

    /// One simulated request: prompt length, tokens to generate, prefix
    /// family (shared first two blocks), and how it arrives.
    #[derive(Debug, Clone, Copy)]
    enum Arrival {
        Local,
        /// Remote prefill completing this many steps after admission.
        Remote(u8),
        /// Cancelled this many steps after admission.
        Cancelled(u8),
    }

    fn arrival() -> impl proptest::strategy::Strategy<Value = Arrival> {
        use proptest::prelude::*;
        prop_oneof![
            3 => Just(Arrival::Local),
            1 => (0u8..4).prop_map(Arrival::Remote),
            1 => (0u8..6).prop_map(Arrival::Cancelled),
        ]
    }

    proptest::proptest! {
        #[test]
        fn random_workloads_respect_limits_and_all_finish(
            num_blocks in 3u32..20,
            max_batch_tokens in 1usize..24,
            max_seqs in 1usize..5,
            requests in proptest::collection::vec(
                (1usize..24, 1u32..10, 0u32..3, arrival()),
                1..8,
            ),
        ) {
            let config = SchedulerConfig { max_batch_tokens, max_seqs, max_model_len: 48 };
            let mut s = Scheduler::new(config, BlockPool::new(num_blocks, BS).unwrap()).unwrap();
            // seq -> (tokens still to generate, arrival, steps since admission)
            let mut live: HashMap<SequenceId, (u32, Arrival, u8)> = HashMap::new();
            for (i, &(len, max_new, family, how)) in requests.iter().enumerate() {
                let id = SequenceId(i as u64);
                let prompt: Vec<TokenId> = (0..len as u32)
                    .map(|t| if t < 8 { family * 1000 + t } else { (i as u32 + 10) * 1000 + t })
                    .collect();
                let added = match how {
                    Arrival::Remote(_) => match s.add_remote(id, prompt.clone(), Some(max_new)) {
                        Ok(_) => Ok(()),
                        Err(SchedulerError::Busy { .. }) => s.add(id, prompt, Some(max_new)),
                        Err(e) => Err(e),
                    },
                    _ => s.add(id, prompt, Some(max_new)),
                };
                match added {
                    Ok(()) => { live.insert(id, (max_new, how, 0)); }
                    Err(SchedulerError::NeverFits { needed, total }) => {
                        proptest::prop_assert!(needed > total);
                    }
                    Err(e) => proptest::prop_assert!(false, "unexpected refusal: {e}"),
                }
            }
            let mut steps = 0;
            while !live.is_empty() {
                steps += 1;
                proptest::prop_assert!(steps < 2000, "no progress: {:?}", s);
                // Arrivals that act after a delay.
                for (&id, (left, how, age)) in live.iter_mut() {
                    *age = age.saturating_add(1);
                    if let Arrival::Remote(after) = *how
                        && *age > after
                        && s.state(id) == Some(SeqState::Transferring)
                    {
                        s.complete_remote(id).unwrap();
                        s.append_token(id, 5).unwrap();
                        *left -= 1;
                    }
                }
                let done: Vec<SequenceId> = live
                    .iter()
                    .filter(|(_, (left, how, age))| {
                        *left == 0 || matches!(how, Arrival::Cancelled(after) if age > after)
                    })
                    .map(|(&id, _)| id)
                    .collect();
                for id in done {
                    s.remove(id).unwrap();
                    live.remove(&id);
                }

                let plan = s.schedule();
                proptest::prop_assert!(plan.num_tokens() <= max_batch_tokens);
                proptest::prop_assert!(plan.chunks.len() <= max_seqs);
                let mut seen = std::collections::HashSet::new();
                for c in &plan.chunks {
                    proptest::prop_assert!(seen.insert(c.seq), "{} twice in a step", c.seq);
                    proptest::prop_assert!(c.num_tokens > 0);
                    let seq = &s.seqs[&c.seq];
                    proptest::prop_assert_eq!(seq.state, SeqState::Running);
                    proptest::prop_assert_eq!(c.start_pos, seq.num_computed);
                    proptest::prop_assert!(c.start_pos + c.num_tokens <= seq.tokens.len());
                    proptest::prop_assert!(c.start_pos + c.num_tokens <= config.max_model_len);
                    let table = s.pool.block_table(c.seq).unwrap();
                    proptest::prop_assert!(table.len() * BS >= c.start_pos + c.num_tokens);
                }
                for id in &plan.preempted {
                    proptest::prop_assert_eq!(s.state(*id), Some(SeqState::Waiting));
                    proptest::prop_assert!(!s.pool.contains(*id));
                }
                s.commit(&plan).unwrap();
                for c in &plan.chunks {
                    if !c.samples {
                        continue;
                    }
                    let Some((left, _, _)) = live.get_mut(&c.seq) else { continue };
                    *left -= 1;
                    if *left > 0 {
                        proptest::prop_assert!(!s.next_token_is_last(c.seq) || *left == 1);
                        s.append_token(c.seq, 7).unwrap();
                    }
                }
                for (&id, seq) in &s.seqs {
                    if seq.state == SeqState::Running {
                        proptest::prop_assert_eq!(s.pool.num_computed_tokens(id), Some(seq.num_computed));
                    }
                }
            }
            proptest::prop_assert!(!s.has_work());
            proptest::prop_assert_eq!(
                s.pool.free_blocks() + s.pool.cached_free_blocks(),
                s.pool.total_blocks()
            );
        }
    }
}
