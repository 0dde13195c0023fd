//! Block accounting for the paged KV cache: which block ids each sequence
//! holds, reference counts, the prefix-cache index of full blocks, LRU
//! eviction of cached blocks nobody holds, pinning of blocks whose KV is
//! being written by a remote prefill, and the KV events that tell the router
//! what this worker's cache contains.
//!
//! It is not the KV memory (`kv_storage` owns that and is addressed by the
//! ids handed out here), it does not decide which sequences run (the
//! scheduler does), and it never blocks: events go out on an unbounded
//! channel whose receiver forwards them to the bus.
//!
//! # Life of a sequence
//!
//! 1. [`BlockPool::allocate_prompt`] reuses the longest cached prefix of full
//!    blocks and takes fresh blocks for the rest of the prompt.
//! 2. After the forward pass has written K/V for tokens `..n`, the caller
//!    reports it with [`BlockPool::mark_computed`]; every block that is now
//!    full and computed is hashed, indexed and announced in a
//!    [`KvEventData::Stored`] event. A block that is only partly filled is
//!    never indexed, so never shared.
//! 3. Each sampled token is added with [`BlockPool::append_tokens`] before the
//!    step that computes its K/V (it may need a new block).
//! 4. [`BlockPool::free_sequence`] drops the sequence's references. Indexed
//!    blocks nobody holds stay cached until fresh blocks are needed, and are
//!    then evicted least recently released first ([`KvEventData::Removed`]).
//!
//! For a remote prefill, [`BlockPool::begin_transfer`] pins the blocks the
//! prefill worker will write; [`BlockPool::complete_transfer`] commits them as
//! if computed here and [`BlockPool::cancel_transfer`] gives them all back.
//! When the writer may still be writing (its deadline passed, but nothing
//! proves it stopped), [`BlockPool::fence_transfer`] ends the sequence but
//! keeps its pinned blocks out of the pool, owned by a [`FenceId`] and by
//! no sequence, until [`BlockPool::release_fence`]: a late write then lands
//! in memory no other request reads.
//!
//! # Prefix hash
//!
//! Routers in other processes recompute the hashes of full blocks from
//! token ids, so their definition is a contract: it lives in `xpyd-api`
//! ([`xpyd_api::kv`]), with [`KvEvent`], and is re-exported here.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;
pub use xpyd_api::kv::{KvEvent, KvEventData, PrefixHash, TokenId, prefix_hashes};

/// Index of one KV block in the memory `kv_storage` owns.
pub type BlockId = u32;

/// Blocks a late remote write may still land in, held by no sequence
/// ([`BlockPool::fence_transfer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FenceId(pub u64);

/// The caller's name for a sequence (one per request, or per choice when a
/// request asks for several).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SequenceId(pub u64);

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sequence {}", self.0)
    }
}

/// How much of a prompt was found in the prefix cache. `tokens` is always
/// `blocks * block_size`: the model starts computing at token `tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixHit {
    pub blocks: usize,
    pub tokens: usize,
}

/// Monotonic counters for metrics; read them with [`BlockPool::counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockPoolCounters {
    /// Successful prompt allocations, each one prefix lookup.
    pub prefix_lookups: u64,
    /// Prompt tokens looked up.
    pub prefix_queried_tokens: u64,
    /// Prompt tokens found cached (hit rate = hit / queried tokens).
    pub prefix_hit_tokens: u64,
    /// Blocks reused from the cache.
    pub prefix_hit_blocks: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
    /// Blocks added to the index.
    pub blocks_stored: u64,
}

/// Why the pool refused. Every variant says whether retrying later can help:
/// only [`BlockPoolError::OutOfBlocks`] can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockPoolError {
    #[error(
        "block pool needs at least one block and a block size of 1..=65536 tokens, got {num_blocks} blocks of {block_size} tokens"
    )]
    InvalidConfig { num_blocks: u32, block_size: usize },
    #[error("request needs {needed} KV blocks but the pool only has {total}; it can never fit")]
    NeverFits { needed: usize, total: usize },
    #[error("request needs {needed} free KV blocks, {available} are available now")]
    OutOfBlocks { needed: usize, available: usize },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("{0} is not known to the block pool")]
    UnknownSequence(SequenceId),
    #[error("{0} already holds blocks")]
    SequenceExists(SequenceId),
    #[error("{0} has a KV transfer in flight; complete or cancel it first")]
    TransferInFlight(SequenceId),
    #[error("{0} has no KV transfer in flight")]
    NoTransferInFlight(SequenceId),
    #[error(
        "{seq}: cannot mark {requested} tokens computed (it has {num_tokens} tokens, {num_computed} already computed)"
    )]
    ComputedOutOfRange {
        seq: SequenceId,
        requested: usize,
        num_tokens: usize,
        num_computed: usize,
    },
    #[error("{0} sequences still hold blocks; the prefix cache can only be reset when none do")]
    SequencesActive(usize),
    #[error("no fence {0:?}")]
    UnknownFence(FenceId),
}

/// Largest block size accepted; keeps `block_size` representable in events
/// and hashes with room to spare.
const MAX_BLOCK_SIZE: usize = 1 << 16;

#[derive(Debug, Clone, Default)]
struct BlockState {
    /// Sequences holding this block.
    ref_count: u32,
    /// Set while this block is the index entry for the hash.
    indexed_hash: Option<PrefixHash>,
    /// Set while the block is cached and unreferenced: its key in `evictable`.
    evict_tick: Option<u64>,
    /// A remote prefill is writing this block.
    in_transfer: bool,
}

#[derive(Debug, Clone)]
struct SequenceBlocks {
    block_table: Vec<BlockId>,
    tokens: Vec<TokenId>,
    /// Tokens whose K/V is in memory.
    num_computed: usize,
    /// Hashes of the full computed blocks, in order (indexed or not: a block
    /// whose hash another block already owned stays private, but its hash is
    /// still the parent of the next one).
    chain: Vec<PrefixHash>,
    transfer_in_flight: bool,
}

/// The set of KV block ids of one engine and who holds them. See the module
/// doc for the life of a sequence.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<BlockState>,
    /// Blocks with no content worth keeping; popped from the back.
    free: Vec<BlockId>,
    /// Cached blocks nobody holds, oldest release first: eviction pops the
    /// first entry in O(log n).
    evictable: BTreeMap<u64, BlockId>,
    next_tick: u64,
    index: HashMap<PrefixHash, BlockId>,
    sequences: HashMap<SequenceId, SequenceBlocks>,
    /// Blocks with `in_transfer` set, kept as a count for cheap metrics.
    in_transfer: usize,
    /// Pinned blocks of ended sequences a late write may still reach.
    fences: HashMap<FenceId, Vec<BlockId>>,
    next_fence: u64,
    events: Option<UnboundedSender<KvEvent>>,
    next_event_id: u64,
    counters: BlockPoolCounters,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks (ids `0..num_blocks`) of `block_size`
    /// tokens each, all free, emitting no events.
    pub fn new(num_blocks: u32, block_size: usize) -> Result<Self, BlockPoolError> {
        if num_blocks == 0 || block_size == 0 || block_size > MAX_BLOCK_SIZE {
            return Err(BlockPoolError::InvalidConfig {
                num_blocks,
                block_size,
            });
        }
        Ok(BlockPool {
            block_size,
            blocks: vec![BlockState::default(); num_blocks as usize],
            // Reversed so that fresh pools hand out 0, 1, 2, … (easier logs).
            free: (0..num_blocks).rev().collect(),
            evictable: BTreeMap::new(),
            next_tick: 0,
            index: HashMap::new(),
            sequences: HashMap::new(),
            in_transfer: 0,
            fences: HashMap::new(),
            next_fence: 0,
            events: None,
            next_event_id: 0,
            counters: BlockPoolCounters::default(),
        })
    }

    /// Send KV events to `sender` from now on, starting with
    /// [`KvEventData::Cleared`] so a router drops what it knew about an
    /// earlier incarnation of this worker. Call it on a fresh pool: what was
    /// indexed before is not re-announced. Sending never blocks; if the
    /// receiver is gone, events stop (routing degrades, serving does not).
    pub fn with_kv_events(mut self, sender: UnboundedSender<KvEvent>) -> Self {
        self.events = Some(sender);
        self.emit(KvEventData::Cleared);
        self
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// All blocks, whatever their state.
    pub fn total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks holding nothing worth keeping.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks nobody holds that are still in the prefix index (reusable by a
    /// prefix hit, evictable for a fresh allocation).
    pub fn cached_free_blocks(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks held by at least one sequence (including those in transfer).
    pub fn used_blocks(&self) -> usize {
        self.blocks.len() - self.free.len() - self.evictable.len()
    }

    /// Blocks a new allocation could take now: free plus cached-free.
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks pinned by a remote prefill in flight.
    pub fn in_transfer_blocks(&self) -> usize {
        self.in_transfer
    }

    /// Blocks held by fences ([`BlockPool::fence_transfer`]).
    pub fn fenced_blocks(&self) -> usize {
        self.fences.values().map(Vec::len).sum()
    }

    /// Whether `n` fresh blocks could be taken now.
    pub fn can_allocate(&self, n: usize) -> bool {
        n <= self.available_blocks()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for_tokens(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    pub fn counters(&self) -> BlockPoolCounters {
        self.counters
    }

    pub fn contains(&self, seq: SequenceId) -> bool {
        self.sequences.contains_key(&seq)
    }

    /// The block ids of `seq`, in token order: what the forward pass reads and
    /// writes K/V through, and what a remote prefill request carries.
    pub fn block_table(&self, seq: SequenceId) -> Option<&[BlockId]> {
        self.sequences.get(&seq).map(|s| s.block_table.as_slice())
    }

    /// Tokens of `seq` (prompt and appended).
    pub fn num_tokens(&self, seq: SequenceId) -> Option<usize> {
        self.sequences.get(&seq).map(|s| s.tokens.len())
    }

    /// Tokens of `seq` whose K/V is in memory (after a prefix hit, the hit).
    pub fn num_computed_tokens(&self, seq: SequenceId) -> Option<usize> {
        self.sequences.get(&seq).map(|s| s.num_computed)
    }

    /// Whether `seq` has a remote prefill in flight.
    pub fn transfer_in_flight(&self, seq: SequenceId) -> Option<bool> {
        self.sequences.get(&seq).map(|s| s.transfer_in_flight)
    }

    /// How many blocks of `prompt` a call to [`BlockPool::allocate_prompt`]
    /// would reuse now, without taking them or counting a lookup.
    pub fn cached_prefix(&self, prompt: &[TokenId]) -> PrefixHit {
        let blocks = self.lookup_prefix(prompt).len();
        PrefixHit {
            blocks,
            tokens: blocks * self.block_size,
        }
    }

    /// Give `seq` blocks for `prompt`: the longest cached prefix of full
    /// blocks is shared, the rest is fresh (evicting cached blocks if the
    /// free list runs out). At least the last prompt token is left to
    /// compute, because the model needs its logits. On error nothing changes.
    pub fn allocate_prompt(
        &mut self,
        seq: SequenceId,
        prompt: &[TokenId],
    ) -> Result<PrefixHit, BlockPoolError> {
        if prompt.is_empty() {
            return Err(BlockPoolError::EmptyPrompt);
        }
        if self.sequences.contains_key(&seq) {
            return Err(BlockPoolError::SequenceExists(seq));
        }
        let needed_total = self.blocks_for_tokens(prompt.len());
        if needed_total > self.blocks.len() {
            return Err(BlockPoolError::NeverFits {
                needed: needed_total,
                total: self.blocks.len(),
            });
        }
        let hit = self.lookup_prefix(prompt);
        // Hit blocks that nobody holds are counted as available; reusing them
        // takes them out of that count, so they cannot also serve as fresh.
        let hit_unreferenced = hit
            .iter()
            .filter(|(block, _)| self.blocks[*block as usize].ref_count == 0)
            .count();
        let fresh_needed = needed_total - hit.len();
        let available = self.available_blocks() - hit_unreferenced;
        if fresh_needed > available {
            return Err(BlockPoolError::OutOfBlocks {
                needed: fresh_needed,
                available,
            });
        }

        let mut block_table = Vec::with_capacity(needed_total);
        let mut chain = Vec::with_capacity(needed_total);
        for &(block, hash) in &hit {
            self.acquire(block);
            block_table.push(block);
            chain.push(hash);
        }
        block_table.extend(self.take_fresh(fresh_needed));

        let hit_tokens = hit.len() * self.block_size;
        self.counters.prefix_lookups += 1;
        self.counters.prefix_queried_tokens += prompt.len() as u64;
        self.counters.prefix_hit_tokens += hit_tokens as u64;
        self.counters.prefix_hit_blocks += hit.len() as u64;
        self.sequences.insert(
            seq,
            SequenceBlocks {
                block_table,
                tokens: prompt.to_vec(),
                num_computed: hit_tokens,
                chain,
                transfer_in_flight: false,
            },
        );
        Ok(PrefixHit {
            blocks: hit.len(),
            tokens: hit_tokens,
        })
    }

    /// Add `tokens` to `seq` (normally the one just sampled), taking a fresh
    /// block when the last one is full. Their K/V is not computed yet. On
    /// error nothing changes; `OutOfBlocks` is the cue to preempt someone.
    pub fn append_tokens(
        &mut self,
        seq: SequenceId,
        tokens: &[TokenId],
    ) -> Result<(), BlockPoolError> {
        let state = self.sequence_not_in_transfer(seq)?;
        let needed_total = self.blocks_for_tokens(state.tokens.len() + tokens.len());
        if needed_total > self.blocks.len() {
            return Err(BlockPoolError::NeverFits {
                needed: needed_total,
                total: self.blocks.len(),
            });
        }
        let fresh_needed = needed_total.saturating_sub(state.block_table.len());
        if fresh_needed > self.available_blocks() {
            return Err(BlockPoolError::OutOfBlocks {
                needed: fresh_needed,
                available: self.available_blocks(),
            });
        }
        let fresh = self.take_fresh(fresh_needed);
        let state = self
            .sequences
            .get_mut(&seq)
            .ok_or(BlockPoolError::UnknownSequence(seq))?;
        state.block_table.extend(fresh);
        state.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Record that K/V for the first `num_computed` tokens of `seq` is in
    /// memory. Blocks that became full are hashed and indexed (one
    /// [`KvEventData::Stored`] per run of newly indexed blocks). A block whose
    /// hash is already indexed by another block stays private to `seq`.
    pub fn mark_computed(
        &mut self,
        seq: SequenceId,
        num_computed: usize,
    ) -> Result<(), BlockPoolError> {
        self.sequence_not_in_transfer(seq)?;
        self.commit_computed(seq, num_computed)
    }

    /// `seq`'s state, unless it is unknown or its blocks are being written
    /// by a remote prefill (then it may not change).
    fn sequence_not_in_transfer(&self, seq: SequenceId) -> Result<&SequenceBlocks, BlockPoolError> {
        let state = self
            .sequences
            .get(&seq)
            .ok_or(BlockPoolError::UnknownSequence(seq))?;
        if state.transfer_in_flight {
            return Err(BlockPoolError::TransferInFlight(seq));
        }
        Ok(state)
    }

    /// Drop `seq`'s references. Its indexed blocks stay cached until evicted;
    /// the tail of the sequence is released first, so it is evicted first
    /// and the more shareable head survives longer.
    pub fn free_sequence(&mut self, seq: SequenceId) -> Result<(), BlockPoolError> {
        self.sequence_not_in_transfer(seq)?;
        self.remove_sequence(seq);
        Ok(())
    }

    /// Pin the blocks of `seq` that a remote prefill will write (every block
    /// from the first uncomputed token on) and return them in order. Until
    /// [`BlockPool::complete_transfer`] or [`BlockPool::cancel_transfer`],
    /// they are never evicted, shared, freed or reused, and `seq` cannot be
    /// appended to, marked computed or freed.
    pub fn begin_transfer(&mut self, seq: SequenceId) -> Result<Vec<BlockId>, BlockPoolError> {
        let block_size = self.block_size;
        let state = self
            .sequences
            .get_mut(&seq)
            .ok_or(BlockPoolError::UnknownSequence(seq))?;
        if state.transfer_in_flight {
            return Err(BlockPoolError::TransferInFlight(seq));
        }
        state.transfer_in_flight = true;
        let first = state.num_computed / block_size;
        let pinned = state.block_table[first..].to_vec();
        for &block in &pinned {
            self.blocks[block as usize].in_transfer = true;
        }
        self.in_transfer += pinned.len();
        Ok(pinned)
    }

    /// The remote prefill of `seq` has written all its tokens: unpin, and
    /// commit the blocks exactly as [`BlockPool::mark_computed`] would.
    pub fn complete_transfer(&mut self, seq: SequenceId) -> Result<(), BlockPoolError> {
        self.unpin(seq)?;
        let num_tokens = self.sequences.get(&seq).map_or(0, |s| s.tokens.len());
        self.commit_computed(seq, num_tokens)
    }

    /// The remote prefill of `seq` failed, timed out or was abandoned, and
    /// the transport guarantees nothing more will be written: release all of
    /// `seq`'s blocks (as [`BlockPool::free_sequence`]) and forget it. A
    /// fallback to local prefill allocates again.
    pub fn cancel_transfer(&mut self, seq: SequenceId) -> Result<(), BlockPoolError> {
        self.unpin(seq)?;
        self.remove_sequence(seq);
        Ok(())
    }

    /// The remote prefill of `seq` is given up, but its writer may still
    /// be writing (nothing proves it stopped): forget `seq` as
    /// [`BlockPool::cancel_transfer`] does, except that its pinned blocks
    /// stay pinned, held by the returned fence and by nobody else, until
    /// [`BlockPool::release_fence`]. A fallback to local prefill allocates
    /// other blocks.
    pub fn fence_transfer(&mut self, seq: SequenceId) -> Result<FenceId, BlockPoolError> {
        let state = self
            .sequences
            .get(&seq)
            .ok_or(BlockPoolError::UnknownSequence(seq))?;
        if !state.transfer_in_flight {
            return Err(BlockPoolError::NoTransferInFlight(seq));
        }
        let Some(state) = self.sequences.remove(&seq) else {
            return Err(BlockPoolError::UnknownSequence(seq));
        };
        let mut fenced = Vec::new();
        for &block in state.block_table.iter().rev() {
            if self.blocks[block as usize].in_transfer {
                // Keeps its one reference: owned by the fence now.
                fenced.push(block);
            } else {
                self.release(block);
            }
        }
        fenced.reverse();
        let fence = FenceId(self.next_fence);
        self.next_fence += 1;
        self.fences.insert(fence, fenced);
        Ok(fence)
    }

    /// Nothing more can be written into the blocks of `fence`: they are
    /// free again. Returns how many.
    pub fn release_fence(&mut self, fence: FenceId) -> Result<usize, BlockPoolError> {
        let blocks = self
            .fences
            .remove(&fence)
            .ok_or(BlockPoolError::UnknownFence(fence))?;
        for &block in blocks.iter().rev() {
            let state = &mut self.blocks[block as usize];
            state.in_transfer = false;
            self.in_transfer -= 1;
            self.release(block);
        }
        Ok(blocks.len())
    }

    /// Empty the prefix index (for example after loading new weights). Only
    /// allowed while no sequence holds blocks, so no shared block can lose
    /// its hash under a reader.
    pub fn reset_prefix_cache(&mut self) -> Result<(), BlockPoolError> {
        if !self.sequences.is_empty() {
            return Err(BlockPoolError::SequencesActive(self.sequences.len()));
        }
        for (_, block) in std::mem::take(&mut self.evictable) {
            let state = &mut self.blocks[block as usize];
            state.indexed_hash = None;
            state.evict_tick = None;
            self.free.push(block);
        }
        self.index.clear();
        self.emit(KvEventData::Cleared);
        Ok(())
    }

    /// Longest run of leading full blocks of `prompt` found in the index,
    /// leaving at least one token uncached.
    fn lookup_prefix(&self, prompt: &[TokenId]) -> Vec<(BlockId, PrefixHash)> {
        let max_blocks = prompt.len().saturating_sub(1) / self.block_size;
        let mut found = Vec::new();
        let mut parent = None;
        for block_tokens in prompt.chunks_exact(self.block_size).take(max_blocks) {
            let hash = PrefixHash::of_block(parent, block_tokens);
            match self.index.get(&hash) {
                Some(&block) => found.push((block, hash)),
                None => break,
            }
            parent = Some(hash);
        }
        found
    }

    /// Take a reference to an indexed block found by a prefix lookup.
    fn acquire(&mut self, block: BlockId) {
        let state = &mut self.blocks[block as usize];
        if let Some(tick) = state.evict_tick.take() {
            self.evictable.remove(&tick);
        }
        state.ref_count += 1;
    }

    /// Take `n` blocks, from the free list first, then by evicting the least
    /// recently released cached blocks. Callers check availability first.
    fn take_fresh(&mut self, n: usize) -> Vec<BlockId> {
        let mut taken = Vec::with_capacity(n);
        let mut removed = Vec::new();
        for _ in 0..n {
            let block = match self.free.pop() {
                Some(block) => block,
                None => {
                    let Some((_, block)) = self.evictable.pop_first() else {
                        // Unreachable when callers checked availability;
                        // handing out fewer blocks would corrupt K/V silently,
                        // so stop loudly instead.
                        panic!("block pool: took more blocks than available");
                    };
                    let state = &mut self.blocks[block as usize];
                    state.evict_tick = None;
                    if let Some(hash) = state.indexed_hash.take() {
                        self.index.remove(&hash);
                        removed.push(hash);
                    }
                    self.counters.evictions += 1;
                    block
                }
            };
            self.blocks[block as usize].ref_count = 1;
            taken.push(block);
        }
        if !removed.is_empty() {
            self.emit(KvEventData::Removed {
                block_hashes: removed,
            });
        }
        taken
    }

    fn release(&mut self, block: BlockId) {
        let state = &mut self.blocks[block as usize];
        debug_assert!(
            state.ref_count > 0,
            "block {block} released more than taken"
        );
        state.ref_count = state.ref_count.saturating_sub(1);
        if state.ref_count > 0 {
            return;
        }
        if state.indexed_hash.is_some() {
            let tick = self.next_tick;
            self.next_tick += 1;
            state.evict_tick = Some(tick);
            self.evictable.insert(tick, block);
        } else {
            self.free.push(block);
        }
    }

    fn remove_sequence(&mut self, seq: SequenceId) {
        if let Some(state) = self.sequences.remove(&seq) {
            for &block in state.block_table.iter().rev() {
                self.release(block);
            }
        }
    }

    fn unpin(&mut self, seq: SequenceId) -> Result<(), BlockPoolError> {
        let state = self
            .sequences
            .get_mut(&seq)
            .ok_or(BlockPoolError::UnknownSequence(seq))?;
        if !state.transfer_in_flight {
            return Err(BlockPoolError::NoTransferInFlight(seq));
        }
        state.transfer_in_flight = false;
        for &block in &state.block_table {
            let block = &mut self.blocks[block as usize];
            if block.in_transfer {
                block.in_transfer = false;
                self.in_transfer -= 1;
            }
        }
        Ok(())
    }

    fn commit_computed(
        &mut self,
        seq: SequenceId,
        num_computed: usize,
    ) -> Result<(), BlockPoolError> {
        let block_size = self.block_size;
        let state = self
            .sequences
            .get_mut(&seq)
            .ok_or(BlockPoolError::UnknownSequence(seq))?;
        if num_computed > state.tokens.len() || num_computed < state.num_computed {
            return Err(BlockPoolError::ComputedOutOfRange {
                seq,
                requested: num_computed,
                num_tokens: state.tokens.len(),
                num_computed: state.num_computed,
            });
        }
        state.num_computed = num_computed;

        let mut runs: Vec<KvEventData> = Vec::new();
        let mut run_open = false;
        for i in state.chain.len()..num_computed / block_size {
            let parent = i.checked_sub(1).map(|p| state.chain[p]);
            let tokens = &state.tokens[i * block_size..(i + 1) * block_size];
            let hash = PrefixHash::of_block(parent, tokens);
            state.chain.push(hash);
            if self.index.contains_key(&hash) {
                // Another sequence computed the same block first; the index
                // keeps that one, ours stays private and the run breaks.
                run_open = false;
                continue;
            }
            let block = state.block_table[i];
            self.index.insert(hash, block);
            self.blocks[block as usize].indexed_hash = Some(hash);
            self.counters.blocks_stored += 1;
            match runs.last_mut() {
                Some(KvEventData::Stored {
                    block_hashes,
                    token_ids,
                    ..
                }) if run_open => {
                    block_hashes.push(hash);
                    token_ids.extend_from_slice(tokens);
                }
                _ => {
                    runs.push(KvEventData::Stored {
                        parent_hash: parent,
                        block_hashes: vec![hash],
                        block_size: block_size as u32,
                        token_ids: tokens.to_vec(),
                    });
                    run_open = true;
                }
            }
        }
        for event in runs {
            self.emit(event);
        }
        Ok(())
    }

    fn emit(&mut self, data: KvEventData) {
        let Some(sender) = &self.events else {
            return;
        };
        let event = KvEvent {
            event_id: self.next_event_id,
            data,
        };
        self.next_event_id += 1;
        if sender.send(event).is_err() {
            tracing::warn!(
                "KV event receiver is gone; this worker stops reporting its prefix cache"
            );
            self.events = None;
        }
    }

    /// Panics with a description of the first broken invariant.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut refs = vec![0u32; self.blocks.len()];
        for (seq, state) in &self.sequences {
            assert_eq!(
                state.block_table.len(),
                self.blocks_for_tokens(state.tokens.len()),
                "{seq}: block table size"
            );
            assert!(state.num_computed <= state.tokens.len());
            assert_eq!(state.chain.len(), state.num_computed / self.block_size);
            for &block in &state.block_table {
                refs[block as usize] += 1;
            }
        }
        for blocks in self.fences.values() {
            for &block in blocks {
                refs[block as usize] += 1;
                assert!(
                    self.blocks[block as usize].in_transfer,
                    "fenced block {block} unpinned"
                );
            }
        }
        let mut in_free = vec![false; self.blocks.len()];
        for &block in &self.free {
            assert!(!in_free[block as usize], "block {block} twice in free list");
            in_free[block as usize] = true;
        }
        for (id, state) in self.blocks.iter().enumerate() {
            let block = id as BlockId;
            assert_eq!(state.ref_count, refs[id], "block {block} ref count");
            let in_evictable = state
                .evict_tick
                .is_some_and(|t| self.evictable.get(&t) == Some(&block));
            if state.ref_count > 0 {
                assert!(
                    !in_free[id] && state.evict_tick.is_none(),
                    "used block {block} is free"
                );
            } else if state.indexed_hash.is_some() {
                assert!(
                    in_evictable && !in_free[id],
                    "cached block {block} not evictable"
                );
            } else {
                assert!(
                    in_free[id] && state.evict_tick.is_none(),
                    "empty block {block} not free"
                );
            }
            if let Some(hash) = state.indexed_hash {
                assert_eq!(
                    self.index.get(&hash),
                    Some(&block),
                    "index entry of {block}"
                );
            }
            if state.in_transfer {
                assert_eq!(state.ref_count, 1, "pinned block {block} shared");
                assert!(state.indexed_hash.is_none(), "pinned block {block} indexed");
            }
        }
        assert_eq!(
            self.in_transfer,
            self.blocks.iter().filter(|b| b.in_transfer).count(),
            "in-transfer count"
        );
        for (hash, &block) in &self.index {
            assert_eq!(self.blocks[block as usize].indexed_hash, Some(*hash));
        }
        assert_eq!(
            self.free.len() + self.evictable.len() + refs.iter().filter(|&&r| r > 0).count(),
            self.blocks.len(),
            "total = free + cached + used"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    use super::*;

    const S1: SequenceId = SequenceId(1);
    const S2: SequenceId = SequenceId(2);
    const S3: SequenceId = SequenceId(3);

    fn pool_with_events(
        num_blocks: u32,
        block_size: usize,
    ) -> (BlockPool, UnboundedReceiver<KvEvent>) {
        let (tx, mut rx) = unbounded_channel();
        let pool = BlockPool::new(num_blocks, block_size)
            .expect("valid config")
            .with_kv_events(tx);
        assert_eq!(
            rx.try_recv().expect("cleared event").data,
            KvEventData::Cleared
        );
        (pool, rx)
    }

    fn drain(rx: &mut UnboundedReceiver<KvEvent>) -> Vec<KvEventData> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.data)
            .collect()
    }

    fn tokens(range: std::ops::Range<u32>) -> Vec<TokenId> {
        range.collect()
    }

    #[test]
    fn invalid_config_is_rejected() {
        assert!(matches!(
            BlockPool::new(0, 16),
            Err(BlockPoolError::InvalidConfig { .. })
        ));
        assert!(matches!(
            BlockPool::new(8, 0),
            Err(BlockPoolError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn allocate_and_free_returns_every_block() {
        let mut pool = BlockPool::new(10, 16).expect("pool");
        let hit = pool.allocate_prompt(S1, &tokens(0..40)).expect("fits");
        assert_eq!(hit, PrefixHit::default());
        assert_eq!(pool.block_table(S1).map(<[_]>::len), Some(3));
        assert_eq!(pool.used_blocks(), 3);
        assert_eq!(pool.free_blocks(), 7);
        pool.mark_computed(S1, 40).expect("computed");
        pool.append_tokens(S1, &tokens(40..60)).expect("append");
        assert_eq!(pool.block_table(S1).map(<[_]>::len), Some(4));
        pool.check_invariants();
        pool.free_sequence(S1).expect("free");
        assert_eq!(pool.used_blocks(), 0);
        assert_eq!(pool.free_blocks() + pool.cached_free_blocks(), 10);
        assert_eq!(
            pool.cached_free_blocks(),
            2,
            "the two full computed blocks stay cached"
        );
        pool.check_invariants();
    }

    #[test]
    fn shared_200_token_prefix_reuses_12_blocks() {
        let mut pool = BlockPool::new(64, 16).expect("pool");
        let prefix = tokens(1000..1200);
        let mut first = prefix.clone();
        first.extend(tokens(1..30));
        let mut second = prefix.clone();
        second.extend(tokens(500..540));

        assert_eq!(pool.allocate_prompt(S1, &first).expect("fits").blocks, 0);
        pool.mark_computed(S1, first.len()).expect("computed");
        let hit = pool.allocate_prompt(S2, &second).expect("fits");
        assert_eq!(
            hit,
            PrefixHit {
                blocks: 12,
                tokens: 192
            }
        );
        assert_eq!(pool.num_computed_tokens(S2), Some(192));

        let t1 = pool.block_table(S1).expect("s1");
        let t2 = pool.block_table(S2).expect("s2");
        assert_eq!(t1[..12], t2[..12]);
        assert!(
            t2[12..].iter().all(|b| !t1.contains(b)),
            "partial block 12 is not shared"
        );
        assert_eq!(pool.used_blocks(), 15 + 15 - 12);
        let counters = pool.counters();
        assert_eq!(counters.prefix_lookups, 2);
        assert_eq!(counters.prefix_hit_blocks, 12);
        assert_eq!(counters.prefix_hit_tokens, 192);
        pool.check_invariants();

        // A fully cached prompt still leaves its last block to compute.
        pool.free_sequence(S2).expect("free");
        assert_eq!(
            pool.allocate_prompt(S3, &prefix[..192])
                .expect("fits")
                .blocks,
            11
        );
    }

    #[test]
    fn free_cached_blocks_are_evicted_least_recently_released_first() {
        let (mut pool, mut rx) = pool_with_events(4, 2);
        // Two sequences of two full blocks each fill the pool.
        pool.allocate_prompt(S1, &[1, 2, 3, 4]).expect("fits");
        pool.mark_computed(S1, 4).expect("computed");
        pool.allocate_prompt(S2, &[5, 6, 7, 8]).expect("fits");
        pool.mark_computed(S2, 4).expect("computed");
        let s1 = pool.block_table(S1).expect("s1").to_vec();
        let s2 = pool.block_table(S2).expect("s2").to_vec();
        let s1_hashes = prefix_hashes(&[1, 2, 3, 4], 2);
        let s2_hashes = prefix_hashes(&[5, 6, 7, 8], 2);
        drain(&mut rx);

        pool.free_sequence(S1).expect("free");
        pool.free_sequence(S2).expect("free");
        assert_eq!(pool.cached_free_blocks(), 4);
        assert_eq!(pool.free_blocks(), 0);

        // S1 was released first, its tail before its head.
        pool.allocate_prompt(S3, &[9, 9, 9]).expect("fits");
        assert_eq!(pool.block_table(S3), Some(&[s1[1], s1[0]][..]));
        assert_eq!(
            drain(&mut rx),
            vec![KvEventData::Removed {
                block_hashes: vec![s1_hashes[1], s1_hashes[0]]
            }]
        );
        assert_eq!(pool.counters().evictions, 2);
        // S2's prefix is still cached.
        assert_eq!(pool.cached_prefix(&[5, 6, 7, 8, 0]).blocks, 2);
        pool.append_tokens(S3, &[9]).expect("fits");
        assert_eq!(pool.block_table(S3).map(<[_]>::len), Some(2));
        pool.append_tokens(S3, &[9]).expect("fits");
        assert_eq!(
            pool.block_table(S3).expect("s3")[2],
            s2[1],
            "tail of S2 goes next"
        );
        assert_eq!(
            drain(&mut rx),
            vec![KvEventData::Removed {
                block_hashes: vec![s2_hashes[1]]
            }]
        );
        pool.check_invariants();
    }

    #[test]
    fn reused_cached_block_is_not_evicted() {
        let mut pool = BlockPool::new(3, 2).expect("pool");
        pool.allocate_prompt(S1, &[1, 2, 3, 4]).expect("fits");
        pool.mark_computed(S1, 4).expect("computed");
        pool.free_sequence(S1).expect("free");
        // Reuses block of [1, 2] (hit) and needs 1 fresh: the free one.
        let hit = pool.allocate_prompt(S2, &[1, 2, 7]).expect("fits");
        assert_eq!(hit.blocks, 1);
        // Needs 2 fresh with 1 cached-free left: does not fit, and the held
        // hit block is not counted as available.
        assert_eq!(
            pool.allocate_prompt(S3, &[8, 8, 8]),
            Err(BlockPoolError::OutOfBlocks {
                needed: 2,
                available: 1
            })
        );
        pool.check_invariants();
    }

    #[test]
    fn never_fits_is_distinct_from_out_of_blocks() {
        let mut pool = BlockPool::new(4, 4).expect("pool");
        assert_eq!(
            pool.allocate_prompt(S1, &tokens(0..17)),
            Err(BlockPoolError::NeverFits {
                needed: 5,
                total: 4
            })
        );
        pool.allocate_prompt(S1, &tokens(0..8)).expect("fits");
        pool.allocate_prompt(S2, &tokens(50..54)).expect("fits");
        assert!(pool.can_allocate(1) && !pool.can_allocate(2));
        assert_eq!(
            pool.allocate_prompt(S3, &tokens(0..8)),
            Err(BlockPoolError::OutOfBlocks {
                needed: 2,
                available: 1
            })
        );
        assert_eq!(
            pool.append_tokens(S1, &tokens(0..8)),
            Err(BlockPoolError::OutOfBlocks {
                needed: 2,
                available: 1
            })
        );
        assert_eq!(
            pool.append_tokens(S1, &tokens(0..9)),
            Err(BlockPoolError::NeverFits {
                needed: 5,
                total: 4
            })
        );
        assert_eq!(
            pool.num_tokens(S1),
            Some(8),
            "failed append changed nothing"
        );
        assert_eq!(
            pool.allocate_prompt(S3, &[]),
            Err(BlockPoolError::EmptyPrompt)
        );
        assert_eq!(
            pool.allocate_prompt(S1, &[1]),
            Err(BlockPoolError::SequenceExists(S1))
        );
        pool.check_invariants();
    }

    #[test]
    fn events_describe_index_changes_in_order() {
        let (mut pool, mut rx) = pool_with_events(3, 2);
        let prompt = [1, 2, 3, 4, 5];
        let h = prefix_hashes(&prompt, 2);
        pool.allocate_prompt(S1, &prompt).expect("fits");
        assert!(
            drain(&mut rx).is_empty(),
            "nothing is stored before it is computed"
        );
        pool.mark_computed(S1, 3).expect("computed");
        assert_eq!(
            drain(&mut rx),
            vec![KvEventData::Stored {
                parent_hash: None,
                block_hashes: vec![h[0]],
                block_size: 2,
                token_ids: vec![1, 2],
            }]
        );
        pool.mark_computed(S1, 5).expect("computed");
        assert_eq!(
            drain(&mut rx),
            vec![KvEventData::Stored {
                parent_hash: Some(h[0]),
                block_hashes: vec![h[1]],
                block_size: 2,
                token_ids: vec![3, 4],
            }]
        );
        pool.free_sequence(S1).expect("free");

        // Fill the pool with other content: both cached blocks are evicted,
        // the tail first.
        pool.allocate_prompt(S2, &[7, 7, 7, 7, 7]).expect("fits");
        assert_eq!(
            drain(&mut rx),
            vec![KvEventData::Removed {
                block_hashes: vec![h[1], h[0]]
            }]
        );
        pool.free_sequence(S2).expect("free");

        // Computing the same prompt again re-stores the same chain, with the
        // same parents, as one run.
        assert_eq!(pool.allocate_prompt(S3, &prompt).expect("fits").blocks, 0);
        pool.mark_computed(S3, 5).expect("computed");
        assert_eq!(
            drain(&mut rx),
            vec![KvEventData::Stored {
                parent_hash: None,
                block_hashes: vec![h[0], h[1]],
                block_size: 2,
                token_ids: vec![1, 2, 3, 4],
            }]
        );
        pool.free_sequence(S3).expect("free");
        pool.reset_prefix_cache().expect("no sequences");
        assert_eq!(drain(&mut rx), vec![KvEventData::Cleared]);
        assert_eq!(pool.free_blocks(), 3);
        pool.check_invariants();
    }

    #[test]
    fn duplicate_block_stays_private_and_is_not_announced() {
        let (mut pool, mut rx) = pool_with_events(8, 2);
        // Both allocate before either computes: no hit, two copies.
        pool.allocate_prompt(S1, &[1, 2, 3, 4, 5]).expect("fits");
        pool.allocate_prompt(S2, &[1, 2, 3, 4, 6]).expect("fits");
        pool.mark_computed(S1, 5).expect("computed");
        drain(&mut rx);
        pool.mark_computed(S2, 5).expect("computed");
        assert!(drain(&mut rx).is_empty());
        pool.free_sequence(S2).expect("free");
        assert_eq!(
            pool.cached_free_blocks(),
            0,
            "S2's copies go back to the free list"
        );
        pool.check_invariants();
    }

    #[test]
    fn event_wire_format_is_tagged_json() {
        let event = KvEvent {
            event_id: 7,
            data: KvEventData::Removed {
                block_hashes: vec![PrefixHash(42)],
            },
        };
        let json = serde_json::to_string(&event).expect("serialize");
        assert_eq!(
            json,
            r#"{"event_id":7,"data":{"type":"removed","block_hashes":[42]}}"#
        );
        let back: KvEvent = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, event);
    }

    #[test]
    fn blocks_in_transfer_survive_pressure_and_are_released_on_cancel() {
        let (mut pool, mut rx) = pool_with_events(6, 4);
        let prompt = tokens(0..14);
        pool.allocate_prompt(S1, &prompt).expect("fits");
        let pinned = pool.begin_transfer(S1).expect("begin");
        assert_eq!(pinned, pool.block_table(S1).expect("s1"));
        assert_eq!(pool.in_transfer_blocks(), 4);

        // Pressure: the other two blocks are all anyone else can get.
        assert!(matches!(
            pool.allocate_prompt(S2, &tokens(100..112)),
            Err(BlockPoolError::OutOfBlocks { .. })
        ));
        pool.allocate_prompt(S2, &tokens(100..108)).expect("fits");
        assert!(
            pool.block_table(S2)
                .expect("s2")
                .iter()
                .all(|b| !pinned.contains(b))
        );
        assert_eq!(
            pool.free_sequence(S1),
            Err(BlockPoolError::TransferInFlight(S1))
        );
        assert_eq!(
            pool.mark_computed(S1, 14),
            Err(BlockPoolError::TransferInFlight(S1))
        );
        assert_eq!(
            pool.append_tokens(S1, &[1]),
            Err(BlockPoolError::TransferInFlight(S1))
        );
        pool.check_invariants();

        pool.cancel_transfer(S1).expect("cancel");
        assert!(!pool.contains(S1));
        assert_eq!(pool.in_transfer_blocks(), 0);
        pool.free_sequence(S2).expect("free");
        assert_eq!(
            pool.free_blocks(),
            6,
            "nothing was computed, nothing is cached"
        );
        assert!(
            drain(&mut rx).is_empty(),
            "cancelled blocks were never announced"
        );
        assert_eq!(
            pool.cancel_transfer(S1),
            Err(BlockPoolError::UnknownSequence(S1))
        );
        pool.check_invariants();
    }

    #[test]
    fn fenced_blocks_stay_out_of_the_pool_until_released() {
        let (mut pool, mut rx) = pool_with_events(8, 4);
        // A cached 4-token head, then a remote prefill of the rest.
        let head = tokens(0..4);
        pool.allocate_prompt(S1, &head).expect("fits");
        pool.mark_computed(S1, 4).expect("computed");
        pool.free_sequence(S1).expect("free");
        let prompt = tokens(0..14);
        let hit = pool.allocate_prompt(S2, &prompt).expect("fits");
        assert_eq!(hit.tokens, 4);
        let pinned = pool.begin_transfer(S2).expect("begin");
        assert_eq!(pinned.len(), 3);
        let fence = pool.fence_transfer(S2).expect("fence");
        assert!(!pool.contains(S2));
        assert_eq!(pool.fenced_blocks(), 3);
        assert_eq!(pool.in_transfer_blocks(), 3);
        // The cached head went back to the cache; the fenced ones did not.
        assert_eq!(pool.available_blocks(), 5);
        pool.check_invariants();
        // The same request again (a local fallback) gets other blocks.
        pool.allocate_prompt(S2, &prompt).expect("fits");
        assert!(
            pool.block_table(S2)
                .expect("s2")
                .iter()
                .all(|b| !pinned.contains(b))
        );
        // Under pressure nobody can take them either.
        assert!(matches!(
            pool.allocate_prompt(S3, &tokens(50..62)),
            Err(BlockPoolError::OutOfBlocks { .. })
        ));
        pool.check_invariants();
        assert_eq!(pool.release_fence(fence), Ok(3));
        assert_eq!(
            pool.release_fence(fence),
            Err(BlockPoolError::UnknownFence(fence))
        );
        assert_eq!(pool.fenced_blocks(), 0);
        assert_eq!(pool.in_transfer_blocks(), 0);
        pool.allocate_prompt(S3, &tokens(50..62)).expect("fits now");
        pool.check_invariants();
        let stored = drain(&mut rx)
            .into_iter()
            .filter(|e| matches!(e, KvEventData::Stored { .. }))
            .count();
        assert_eq!(
            stored, 1,
            "only the head was announced, never a fenced block"
        );
    }

    #[test]
    fn completed_transfer_commits_like_local_compute() {
        let (mut pool, mut rx) = pool_with_events(8, 4);
        let mut prompt = tokens(0..8);
        pool.allocate_prompt(S1, &prompt).expect("fits");
        pool.mark_computed(S1, 8).expect("computed");
        pool.free_sequence(S1).expect("free");
        drain(&mut rx);

        prompt.extend(tokens(50..60));
        let hit = pool.allocate_prompt(S2, &prompt).expect("fits");
        assert_eq!(hit.blocks, 2);
        let pinned = pool.begin_transfer(S2).expect("begin");
        assert_eq!(pinned, pool.block_table(S2).expect("s2")[2..]);
        assert_eq!(
            pool.begin_transfer(S2),
            Err(BlockPoolError::TransferInFlight(S2))
        );
        pool.complete_transfer(S2).expect("complete");
        assert_eq!(
            pool.complete_transfer(S2),
            Err(BlockPoolError::NoTransferInFlight(S2))
        );
        assert_eq!(pool.num_computed_tokens(S2), Some(18));
        let h = prefix_hashes(&prompt, 4);
        assert_eq!(
            drain(&mut rx),
            vec![KvEventData::Stored {
                parent_hash: Some(h[1]),
                block_hashes: vec![h[2], h[3]],
                block_size: 4,
                token_ids: prompt[8..16].to_vec(),
            }]
        );
        pool.append_tokens(S2, &[99]).expect("decode continues");
        pool.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate {
            seq: u64,
            prefix: usize,
            len: usize,
            salt: u32,
        },
        Append {
            seq: u64,
            n: usize,
        },
        Compute {
            seq: u64,
        },
        Free {
            seq: u64,
        },
        BeginTransfer {
            seq: u64,
        },
        CompleteTransfer {
            seq: u64,
        },
        CancelTransfer {
            seq: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let seq = 0u64..6;
        prop_oneof![
            (seq.clone(), 0usize..3, 1usize..30, 0u32..3).prop_map(|(seq, prefix, len, salt)| {
                Op::Allocate {
                    seq,
                    prefix,
                    len,
                    salt,
                }
            }),
            (seq.clone(), 1usize..6).prop_map(|(seq, n)| Op::Append { seq, n }),
            seq.clone().prop_map(|seq| Op::Compute { seq }),
            seq.clone().prop_map(|seq| Op::Free { seq }),
            seq.clone().prop_map(|seq| Op::BeginTransfer { seq }),
            seq.clone().prop_map(|seq| Op::CompleteTransfer { seq }),
            seq.prop_map(|seq| Op::CancelTransfer { seq }),
        ]
    }

    /// The router's view, rebuilt from events only.
    fn apply(view: &mut HashSet<PrefixHash>, event: KvEventData) {
        match event {
            KvEventData::Stored {
                block_hashes,
                token_ids,
                block_size,
                ..
            } => {
                assert_eq!(token_ids.len(), block_hashes.len() * block_size as usize);
                for hash in block_hashes {
                    assert!(view.insert(hash), "stored {hash} twice");
                }
            }
            KvEventData::Removed { block_hashes } => {
                for hash in block_hashes {
                    assert!(view.remove(&hash), "removed unknown {hash}");
                }
            }
            KvEventData::Cleared => view.clear(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn random_workloads_keep_accounting_consistent(ops in proptest::collection::vec(op(), 1..80)) {
            const TOTAL: u32 = 12;
            let (mut pool, mut rx) = pool_with_events(TOTAL, 4);
            let mut view = HashSet::new();
            // A few shared prefixes so that lookups hit.
            let prefixes: [Vec<u32>; 3] = [tokens(0..12), tokens(0..8), tokens(100..116)];
            for op in ops {
                let _ = match op {
                    Op::Allocate { seq, prefix, len, salt } => {
                        let mut prompt = prefixes[prefix].clone();
                        prompt.extend((0..len as u32).map(|t| 1000 + t * 3 + salt));
                        pool.allocate_prompt(SequenceId(seq), &prompt).map(|_| ())
                    }
                    Op::Append { seq, n } => {
                        pool.append_tokens(SequenceId(seq), &vec![7; n])
                    }
                    Op::Compute { seq } => {
                        let n = pool.num_tokens(SequenceId(seq)).unwrap_or(0);
                        pool.mark_computed(SequenceId(seq), n)
                    }
                    Op::Free { seq } => pool.free_sequence(SequenceId(seq)),
                    Op::BeginTransfer { seq } => pool.begin_transfer(SequenceId(seq)).map(|_| ()),
                    Op::CompleteTransfer { seq } => pool.complete_transfer(SequenceId(seq)),
                    Op::CancelTransfer { seq } => pool.cancel_transfer(SequenceId(seq)),
                };
                pool.check_invariants();
                for event in drain(&mut rx) {
                    apply(&mut view, event);
                }
                let indexed: HashSet<PrefixHash> = pool.index.keys().copied().collect();
                prop_assert_eq!(&view, &indexed, "router view matches the index");
                prop_assert_eq!(
                    pool.free_blocks() + pool.cached_free_blocks() + pool.used_blocks(),
                    TOTAL as usize
                );
            }
            for seq in 0..6 {
                let seq = SequenceId(seq);
                if pool.transfer_in_flight(seq) == Some(true) {
                    pool.cancel_transfer(seq).expect("cancel");
                } else if pool.contains(seq) {
                    pool.free_sequence(seq).expect("free");
                }
            }
            pool.check_invariants();
            prop_assert_eq!(pool.used_blocks(), 0);
            prop_assert_eq!(pool.free_blocks() + pool.cached_free_blocks(), TOTAL as usize);
        }
    }
}
