//! Which worker holds which cached prefix: the router's index of KV blocks,
//! fed by the workers' KV events, answering "how many leading blocks of this
//! prompt does each worker already have?".
//!
//! # Why a map and not a pointer tree
//!
//! A [`PrefixHash`] is chained: block `i`'s hash covers every token of
//! blocks `0..=i` (see [`xpyd_api::kv`]). One hash therefore names one
//! node of the radix tree of all cached prefixes, and the tree needs no
//! pointers: the index is a map *block hash → workers holding it* plus, per
//! worker, the set of hashes it holds (to apply `Removed`/`Cleared` and to
//! drop a worker). Walking the tree from the root along a prompt is looking
//! up the prompt's hashes in order; a worker's overlap is the number of
//! leading hashes it holds. The holders of a block are a bitset over dense
//! worker slots (one `u64` for up to 64 workers), so following all
//! candidates down one block is one AND. Lookups stop at the first block no
//! candidate holds, so a cold prompt costs one probe.
//!
//! # Imperfect event streams
//!
//! - A `Stored` whose parent this worker does not hold (the parent was
//!   evicted, or its event was lost) is indexed anyway: the hashes still
//!   identify their full prefixes. Such blocks are unreachable from the
//!   root until the parent is stored again, so they never inflate an
//!   overlap; [`IndexerCounters::orphan_stores`] counts them.
//! - A `Removed` of a hash the worker does not hold is ignored.
//! - Lost events, seen as a gap in a worker's batch `seq` or in the
//!   engine's `event_id`s, make the index forget everything it knew about
//!   that worker (it cannot know what was removed meanwhile, and a phantom
//!   block would attract requests that then miss). The events after the gap
//!   are applied, and the worker is flagged [`KvIndexer::needs_resync`]
//!   until it sends `Cleared` (what a worker sends when it starts or resets
//!   its prefix cache): until then the index under-reports, never over.
//! - A batch whose `seq` is not above the last one applied is a duplicate
//!   and is skipped, unless it starts with `Cleared` (the publisher began
//!   numbering again).
//! - The first batch seen from a worker is taken as is, whatever its `seq`:
//!   a router that starts after a worker knows only what later events tell
//!   it (it under-reports that worker's cache until blocks are re-stored).
//!
//! Not here: worker identities, loads and the choice of a worker (the
//! `scheduler`), and the wire encoding (`xpyd-api`).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use xpyd_api::kv::{KvEvent, KvEventData, PrefixHash};

/// The router's short name for a worker. The router never reuses one, so a
/// stale id can only miss, never point at a different worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// Hasher for keys that are already uniformly distributed (prefix hashes are
/// SHA-256 bits) or small integers (spread by one multiplication). Events
/// come from the deployment's own workers, not from users, so there is no
/// adversary to defend against with a keyed hash.
#[derive(Default, Clone, Copy)]
pub struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by the keys of this module; FNV-1a keeps it correct.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }

    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// `HashMap`/`HashSet` builder using [`PrehashedHasher`].
pub type Prehashed = BuildHasherDefault<PrehashedHasher>;

/// Index of a worker in the holder bitsets: dense, reused after the
/// worker is removed (all its bits are cleared first).
type Slot = u32;

/// The slots of the workers holding one block, as a bitset: inline for the
/// first 64 slots (any deployment of up to 64 decode workers), boxed words
/// beyond. Intersecting candidates with holders is then one AND per word.
#[derive(Debug, Clone)]
enum Holders {
    Small(u64),
    Large(Box<[u64]>),
}

impl Holders {
    fn of(slot: Slot) -> Holders {
        let mut h = Holders::Small(0);
        h.insert(slot);
        h
    }

    fn word(&self, i: usize) -> u64 {
        match self {
            Holders::Small(bits) if i == 0 => *bits,
            Holders::Small(_) => 0,
            Holders::Large(words) => words.get(i).copied().unwrap_or(0),
        }
    }

    fn insert(&mut self, slot: Slot) {
        let (i, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        match self {
            Holders::Small(bits) if i == 0 => *bits |= bit,
            Holders::Small(bits) => {
                let mut words = vec![0u64; i + 1];
                words[0] = *bits;
                words[i] = bit;
                *self = Holders::Large(words.into_boxed_slice());
            }
            Holders::Large(words) => {
                if i >= words.len() {
                    let mut grown = words.to_vec();
                    grown.resize(i + 1, 0);
                    *words = grown.into_boxed_slice();
                }
                words[i] |= bit;
            }
        }
    }

    /// Remove `slot`; true when nobody is left.
    fn remove(&mut self, slot: Slot) -> bool {
        let (i, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        match self {
            Holders::Small(bits) => {
                if i == 0 {
                    *bits &= !bit;
                }
                *bits == 0
            }
            Holders::Large(words) => {
                if let Some(w) = words.get_mut(i) {
                    *w &= !bit;
                }
                if words[1..].iter().all(|&w| w == 0) {
                    *self = Holders::Small(words[0]);
                    return self.word(0) == 0;
                }
                false
            }
        }
    }
}

/// What the index knows about one worker.
#[derive(Debug)]
struct WorkerIndex {
    slot: Slot,
    blocks: HashSet<PrefixHash, Prehashed>,
    last_seq: Option<u64>,
    next_event_id: Option<u64>,
    needs_resync: bool,
}

/// Counters since the indexer was created, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexerCounters {
    /// Events applied.
    pub events: u64,
    /// `Stored` events whose parent the worker did not hold.
    pub orphan_stores: u64,
    /// Times a worker's entries were dropped because events were lost.
    pub gaps: u64,
    /// Batches skipped as duplicates.
    pub duplicate_batches: u64,
}

/// What [`KvIndexer::apply_batch`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// In order; every event applied.
    Applied,
    /// `seq` not above the last applied one: skipped.
    Duplicate { last_seq: u64 },
    /// Events were lost before this batch: the worker's entries were
    /// dropped, this batch's events applied, and the worker needs a resync.
    Gap,
}

/// Each worker's overlap with a prompt, in blocks: the number of leading
/// blocks (from block 0, consecutive) it holds. Workers with no overlap are
/// absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlapScores {
    pub scores: Vec<(WorkerId, u32)>,
}

impl OverlapScores {
    /// `worker`'s overlap (0 when it holds no leading block).
    pub fn get(&self, worker: WorkerId) -> u32 {
        self.scores
            .iter()
            .find(|(w, _)| *w == worker)
            .map_or(0, |(_, n)| *n)
    }
}

/// The index of cached blocks across workers; see the module doc.
#[derive(Debug, Default)]
pub struct KvIndexer {
    blocks: HashMap<PrefixHash, Holders, Prehashed>,
    workers: HashMap<WorkerId, WorkerIndex, Prehashed>,
    /// The worker in each slot.
    slots: Vec<Option<WorkerId>>,
    free_slots: Vec<Slot>,
    counters: IndexerCounters,
}

impl KvIndexer {
    pub fn new() -> KvIndexer {
        KvIndexer::default()
    }

    /// Distinct block hashes indexed (a block held by two workers counts once).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks `worker` holds, as far as the index knows.
    pub fn worker_blocks(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |w| w.blocks.len())
    }

    pub fn counters(&self) -> IndexerCounters {
        self.counters
    }

    /// Whether events of `worker` were lost and no `Cleared` has come since.
    pub fn needs_resync(&self, worker: WorkerId) -> bool {
        self.workers.get(&worker).is_some_and(|w| w.needs_resync)
    }

    /// Apply one batch of `worker`'s events, checking `seq` and event ids
    /// for lost events (see the module doc).
    pub fn apply_batch(&mut self, worker: WorkerId, seq: u64, events: &[KvEvent]) -> BatchOutcome {
        let restarts = matches!(
            events.first(),
            Some(KvEvent {
                data: KvEventData::Cleared,
                ..
            })
        );
        self.ensure_worker(worker);
        let Some(state) = self.workers.get_mut(&worker) else {
            return BatchOutcome::Applied;
        };
        let mut outcome = BatchOutcome::Applied;
        match state.last_seq {
            Some(last) if seq <= last && !restarts => {
                self.counters.duplicate_batches += 1;
                return BatchOutcome::Duplicate { last_seq: last };
            }
            Some(last) if seq > last + 1 && !restarts => outcome = BatchOutcome::Gap,
            _ => {}
        }
        state.last_seq = Some(seq);
        if outcome == BatchOutcome::Gap {
            self.lost_events(worker);
        }
        for event in events {
            let expected = self.workers.get(&worker).and_then(|w| w.next_event_id);
            if let Some(expected) = expected
                && event.event_id != expected
                && event.data != KvEventData::Cleared
                && outcome != BatchOutcome::Gap
            {
                outcome = BatchOutcome::Gap;
                self.lost_events(worker);
            }
            if let Some(state) = self.workers.get_mut(&worker) {
                state.next_event_id = Some(event.event_id.wrapping_add(1));
            }
            self.apply(worker, &event.data);
        }
        outcome
    }

    /// Apply one event of `worker` (no ordering checks).
    pub fn apply(&mut self, worker: WorkerId, event: &KvEventData) {
        self.counters.events += 1;
        match event {
            KvEventData::Stored {
                parent_hash,
                block_hashes,
                ..
            } => self.store(worker, *parent_hash, block_hashes),
            KvEventData::Removed { block_hashes } => self.remove(worker, block_hashes),
            KvEventData::Cleared => {
                self.ensure_worker(worker);
                self.clear(worker);
                if let Some(state) = self.workers.get_mut(&worker) {
                    state.needs_resync = false;
                }
            }
        }
    }

    /// Forget `worker` entirely (it left the deployment).
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.clear(worker);
        if let Some(state) = self.workers.remove(&worker) {
            self.slots[state.slot as usize] = None;
            self.free_slots.push(state.slot);
        }
    }

    /// Each worker's overlap with the prompt whose block hashes are `hashes`.
    pub fn find_matches(&self, hashes: &[PrefixHash]) -> OverlapScores {
        let mut scores = Vec::new();
        let Some(first) = hashes.first().and_then(|h| self.blocks.get(h)) else {
            return OverlapScores { scores };
        };
        // Slots still matching, as a bitset; each one's overlap is `depth`.
        let words = self.slots.len().div_ceil(64).max(1);
        let mut active: Vec<u64> = (0..words).map(|i| first.word(i)).collect();
        let mut depth = 1u32;
        for hash in &hashes[1..] {
            let Some(holders) = self.blocks.get(hash) else {
                break;
            };
            let mut any = 0;
            for (i, word) in active.iter_mut().enumerate() {
                let keep = *word & holders.word(i);
                self.push_slots(&mut scores, i, *word & !keep, depth);
                *word = keep;
                any |= keep;
            }
            if any == 0 {
                break;
            }
            depth += 1;
        }
        for (i, word) in active.into_iter().enumerate() {
            self.push_slots(&mut scores, i, word, depth);
        }
        OverlapScores { scores }
    }

    /// Score `depth` for each slot set in `bits`, word `word` of a bitset.
    fn push_slots(
        &self,
        scores: &mut Vec<(WorkerId, u32)>,
        word: usize,
        mut bits: u64,
        depth: u32,
    ) {
        while bits != 0 {
            let slot = word * 64 + bits.trailing_zeros() as usize;
            if let Some(Some(worker)) = self.slots.get(slot) {
                scores.push((*worker, depth));
            }
            bits &= bits - 1;
        }
    }

    /// Give `worker` a slot and an empty entry if it has none.
    fn ensure_worker(&mut self, worker: WorkerId) {
        if self.workers.contains_key(&worker) {
            return;
        }
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(worker);
                slot
            }
            None => {
                self.slots.push(Some(worker));
                (self.slots.len() - 1) as Slot
            }
        };
        self.workers.insert(
            worker,
            WorkerIndex {
                slot,
                blocks: HashSet::default(),
                last_seq: None,
                next_event_id: None,
                needs_resync: false,
            },
        );
    }

    fn store(&mut self, worker: WorkerId, parent: Option<PrefixHash>, hashes: &[PrefixHash]) {
        self.ensure_worker(worker);
        let Some(state) = self.workers.get_mut(&worker) else {
            return;
        };
        if let Some(parent) = parent
            && !state.blocks.contains(&parent)
        {
            self.counters.orphan_stores += 1;
            tracing::debug!(
                worker = worker.0,
                %parent,
                blocks = hashes.len(),
                "KV event stores blocks under a parent this worker does not hold; indexed anyway"
            );
        }
        for &hash in hashes {
            if state.blocks.insert(hash) {
                self.blocks
                    .entry(hash)
                    .and_modify(|h| h.insert(state.slot))
                    .or_insert_with(|| Holders::of(state.slot));
            }
        }
    }

    fn remove(&mut self, worker: WorkerId, hashes: &[PrefixHash]) {
        let Some(state) = self.workers.get_mut(&worker) else {
            return;
        };
        for hash in hashes {
            if state.blocks.remove(hash) {
                Self::unhold(&mut self.blocks, *hash, state.slot);
            }
        }
    }

    fn clear(&mut self, worker: WorkerId) {
        let Some(state) = self.workers.get_mut(&worker) else {
            return;
        };
        let slot = state.slot;
        for hash in state.blocks.drain() {
            Self::unhold(&mut self.blocks, hash, slot);
        }
    }

    fn lost_events(&mut self, worker: WorkerId) {
        self.counters.gaps += 1;
        tracing::warn!(
            worker = worker.0,
            "KV events of a worker were lost; forgetting its cached blocks until it resyncs"
        );
        self.ensure_worker(worker);
        self.clear(worker);
        if let Some(state) = self.workers.get_mut(&worker) {
            state.needs_resync = true;
        }
    }

    fn unhold(blocks: &mut HashMap<PrefixHash, Holders, Prehashed>, hash: PrefixHash, slot: Slot) {
        if let Some(holders) = blocks.get_mut(&hash)
            && holders.remove(slot)
        {
            blocks.remove(&hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xpyd_api::kv::prefix_hashes;

    const A: WorkerId = WorkerId(1);
    const B: WorkerId = WorkerId(2);

    fn chain(tokens: std::ops::Range<u32>) -> Vec<PrefixHash> {
        prefix_hashes(&tokens.collect::<Vec<_>>(), 4)
    }

    fn stored(parent: Option<PrefixHash>, hashes: &[PrefixHash]) -> KvEventData {
        KvEventData::Stored {
            parent_hash: parent,
            block_hashes: hashes.to_vec(),
            block_size: 4,
            token_ids: Vec::new(),
        }
    }

    fn events(first_id: u64, data: Vec<KvEventData>) -> Vec<KvEvent> {
        data.into_iter()
            .enumerate()
            .map(|(i, data)| KvEvent {
                event_id: first_id + i as u64,
                data,
            })
            .collect()
    }

    #[test]
    fn overlap_is_the_leading_run_each_worker_holds() {
        let h = chain(0..32); // 8 blocks
        let mut index = KvIndexer::new();
        index.apply(A, &stored(None, &h[..6]));
        index.apply(B, &stored(None, &h[..2]));
        let matches = index.find_matches(&h);
        assert_eq!(matches.get(A), 6);
        assert_eq!(matches.get(B), 2);
        assert_eq!(index.num_blocks(), 6);

        // Another prompt that diverges after block 1 shares only those.
        let other = prefix_hashes(&(0..8).chain(100..124).collect::<Vec<_>>(), 4);
        let matches = index.find_matches(&other);
        assert_eq!((matches.get(A), matches.get(B)), (2, 2));
        assert_eq!(index.find_matches(&chain(50..90)), OverlapScores::default());
        assert_eq!(index.find_matches(&[]), OverlapScores::default());
    }

    #[test]
    fn removed_block_cuts_the_run_and_cleared_empties_the_worker() {
        let h = chain(0..32);
        let mut index = KvIndexer::new();
        index.apply(A, &stored(None, &h[..4]));
        index.apply(A, &stored(Some(h[3]), &h[4..8]));
        index.apply(B, &stored(None, &h[..4]));
        assert_eq!(index.find_matches(&h).get(A), 8);

        index.apply(
            A,
            &KvEventData::Removed {
                block_hashes: vec![h[2], PrefixHash(12345)],
            },
        );
        let matches = index.find_matches(&h);
        assert_eq!((matches.get(A), matches.get(B)), (2, 4));
        assert_eq!(index.worker_blocks(A), 7);

        index.apply(A, &KvEventData::Cleared);
        assert_eq!(index.worker_blocks(A), 0);
        assert_eq!(index.find_matches(&h).get(B), 4);
        assert_eq!(index.num_blocks(), 4, "B's blocks stay");

        index.remove_worker(B);
        assert_eq!(index.num_blocks(), 0);
        assert_eq!(index.find_matches(&h), OverlapScores::default());
    }

    #[test]
    fn stored_under_an_unknown_parent_is_kept_but_unreachable_until_the_parent_comes() {
        let h = chain(0..24);
        let mut index = KvIndexer::new();
        index.apply(A, &stored(Some(h[2]), &h[3..6]));
        assert_eq!(index.counters().orphan_stores, 1);
        assert_eq!(index.worker_blocks(A), 3);
        assert_eq!(index.find_matches(&h).get(A), 0);

        index.apply(A, &stored(None, &h[..3]));
        assert_eq!(index.find_matches(&h).get(A), 6);
        assert_eq!(index.counters().orphan_stores, 1);
    }

    #[test]
    fn duplicate_stores_and_removes_keep_counts_right() {
        let h = chain(0..16);
        let mut index = KvIndexer::new();
        index.apply(A, &stored(None, &h));
        index.apply(A, &stored(None, &h));
        index.apply(B, &stored(None, &h));
        assert_eq!(index.worker_blocks(A), 4);
        assert_eq!(index.num_blocks(), 4);
        let removed = KvEventData::Removed {
            block_hashes: h.clone(),
        };
        index.apply(A, &removed);
        index.apply(A, &removed);
        assert_eq!(index.num_blocks(), 4);
        assert_eq!(index.find_matches(&h).scores, vec![(B, 4)]);
    }

    #[test]
    fn seq_gap_forgets_the_worker_until_it_clears() {
        let h = chain(0..32);
        let mut index = KvIndexer::new();
        let first = events(0, vec![KvEventData::Cleared, stored(None, &h[..4])]);
        assert_eq!(index.apply_batch(A, 0, &first), BatchOutcome::Applied);
        assert_eq!(index.find_matches(&h).get(A), 4);

        // Batch 1 is lost; batch 2 stores the next blocks.
        let third = events(5, vec![stored(Some(h[3]), &h[4..8])]);
        assert_eq!(index.apply_batch(A, 2, &third), BatchOutcome::Gap);
        assert!(index.needs_resync(A));
        assert_eq!(
            index.find_matches(&h).get(A),
            0,
            "what A held before the gap is forgotten"
        );
        assert_eq!(index.worker_blocks(A), 4, "the batch after the gap applies");

        // A replay of an old batch is skipped.
        assert_eq!(
            index.apply_batch(A, 2, &third),
            BatchOutcome::Duplicate { last_seq: 2 }
        );

        let resync = events(6, vec![KvEventData::Cleared, stored(None, &h)]);
        assert_eq!(index.apply_batch(A, 3, &resync), BatchOutcome::Applied);
        assert!(!index.needs_resync(A));
        assert_eq!(index.find_matches(&h).get(A), 8);
        assert_eq!(index.counters().gaps, 1);
        assert_eq!(index.counters().duplicate_batches, 1);
    }

    #[test]
    fn event_id_gap_inside_consecutive_batches_is_a_gap_too() {
        let h = chain(0..16);
        let mut index = KvIndexer::new();
        index.apply_batch(A, 0, &events(0, vec![stored(None, &h[..2])]));
        let skipped = events(3, vec![stored(Some(h[1]), &h[2..4])]);
        assert_eq!(index.apply_batch(A, 1, &skipped), BatchOutcome::Gap);
        assert!(index.needs_resync(A));
        assert_eq!(index.find_matches(&h).get(A), 0);
        // The publisher restarting its numbering with a Cleared is accepted.
        let restart = events(0, vec![KvEventData::Cleared, stored(None, &h)]);
        assert_eq!(index.apply_batch(A, 0, &restart), BatchOutcome::Applied);
        assert_eq!(index.find_matches(&h).get(A), 4);
    }

    #[test]
    fn a_reused_slot_inherits_nothing() {
        let h = chain(0..8);
        let mut index = KvIndexer::new();
        index.apply(A, &stored(None, &h));
        index.apply(B, &stored(None, &h[..1]));
        index.remove_worker(A);
        let c = WorkerId(3);
        index.apply(c, &stored(None, &chain(100..108)));
        assert_eq!(index.find_matches(&h).scores, vec![(B, 1)]);
        assert_eq!(index.find_matches(&chain(100..108)).scores, vec![(c, 2)]);
    }

    #[test]
    fn many_holders_collapse_back_when_they_leave() {
        let h = chain(0..8);
        let mut index = KvIndexer::new();
        for w in 0..70 {
            index.apply(WorkerId(w), &stored(None, &h));
        }
        assert_eq!(index.find_matches(&h).scores.len(), 70);
        for w in 0..69 {
            index.remove_worker(WorkerId(w));
        }
        assert_eq!(index.find_matches(&h).scores, vec![(WorkerId(69), 2)]);
        index.remove_worker(WorkerId(69));
        assert_eq!(index.num_blocks(), 0);
    }
}
