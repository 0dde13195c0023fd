//! Wire types of the router: the KV event batch a decode worker publishes
//! on the bus and the load report it carries.
//!
//! Encoding is JSON (serde), like every other xpyd wire type: readable in
//! `nats sub`, versioned by adding fields, and fast enough — the `router`
//! bench measures encode/decode throughput next to ingestion (see
//! `docs/benchmarks.md`, "Router"). Not here: what the router does with a
//! batch (`indexer`, `scheduler`).

use serde::{Deserialize, Serialize};

use crate::engine::block_pool::KvEvent;
use crate::engine::runner::EngineStats;

/// A worker's load as it reports it with each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerLoad {
    /// KV blocks held by live sequences (not counting cached blocks nobody
    /// holds: those are free to reuse).
    pub active_blocks: u64,
    /// KV blocks of the worker's cache.
    pub total_blocks: u64,
    /// Requests being computed.
    pub running: u64,
    /// Requests queued for admission.
    pub waiting: u64,
}

impl From<&EngineStats> for WorkerLoad {
    fn from(stats: &EngineStats) -> WorkerLoad {
        let idle = stats.free_blocks + stats.cached_free_blocks;
        WorkerLoad {
            active_blocks: stats.total_blocks.saturating_sub(idle) as u64,
            total_blocks: stats.total_blocks as u64,
            running: stats.running as u64,
            waiting: stats.waiting as u64,
        }
    }
}

/// What a decode worker publishes: the KV events since its last batch and
/// its load now. `seq` counts this publisher's batches (0, 1, 2, …): a gap
/// tells the router that events were lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventBatch {
    pub instance_id: String,
    pub seq: u64,
    #[serde(default)]
    pub events: Vec<KvEvent>,
    #[serde(default)]
    pub load: WorkerLoad,
}

/// A payload that is not a [`KvEventBatch`].
#[derive(Debug, thiserror::Error)]
#[error("bad KV event batch: {0}")]
pub struct DecodeError(#[from] serde_json::Error);

impl KvEventBatch {
    /// The bytes to publish.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain structs, strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse a payload received from the bus.
    pub fn decode(payload: &[u8]) -> Result<KvEventBatch, DecodeError> {
        Ok(serde_json::from_slice(payload)?)
    }
}

/// The publisher side of the numbering: one per worker process, it stamps
/// each batch with the instance id and the next `seq`.
#[derive(Debug, Clone)]
pub struct KvEventPublisher {
    instance_id: String,
    next_seq: u64,
}

impl KvEventPublisher {
    pub fn new(instance_id: impl Into<String>) -> KvEventPublisher {
        KvEventPublisher {
            instance_id: instance_id.into(),
            next_seq: 0,
        }
    }

    /// The next batch to publish (may carry no events: a load report).
    pub fn batch(&mut self, events: Vec<KvEvent>, load: WorkerLoad) -> KvEventBatch {
        let seq = self.next_seq;
        self.next_seq += 1;
        KvEventBatch {
            instance_id: self.instance_id.clone(),
            seq,
            events,
            load,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::block_pool::{KvEventData, PrefixHash};

    #[test]
    fn batch_round_trips_and_numbers_increase() {
        let mut publisher = KvEventPublisher::new("decode-1");
        let load = WorkerLoad {
            active_blocks: 3,
            total_blocks: 64,
            running: 1,
            waiting: 2,
        };
        let first = publisher.batch(
            vec![
                KvEvent {
                    event_id: 0,
                    data: KvEventData::Cleared,
                },
                KvEvent {
                    event_id: 1,
                    data: KvEventData::Stored {
                        parent_hash: None,
                        block_hashes: vec![PrefixHash(7), PrefixHash(u64::MAX)],
                        block_size: 2,
                        token_ids: vec![1, 2, 3, 4],
                    },
                },
            ],
            load,
        );
        let second = publisher.batch(Vec::new(), load);
        assert_eq!((first.seq, second.seq), (0, 1));
        let decoded = KvEventBatch::decode(&first.encode()).expect("decodes");
        assert_eq!(decoded, first);
    }

    #[test]
    fn missing_fields_take_defaults_and_garbage_is_an_error() {
        let batch = KvEventBatch::decode(br#"{"instance_id":"a","seq":4}"#).expect("decodes");
        assert_eq!(batch.events, Vec::new());
        assert_eq!(batch.load, WorkerLoad::default());
        let err = KvEventBatch::decode(b"{\"seq\":\"x\"}").unwrap_err();
        assert!(err.to_string().starts_with("bad KV event batch"), "{err}");
    }

    #[test]
    fn load_from_engine_stats_counts_held_blocks_only() {
        let stats = EngineStats {
            total_blocks: 100,
            free_blocks: 60,
            cached_free_blocks: 30,
            running: 2,
            waiting: 1,
            ..EngineStats::default()
        };
        assert_eq!(
            WorkerLoad::from(&stats),
            WorkerLoad {
                active_blocks: 10,
                total_blocks: 100,
                running: 2,
                waiting: 1
            }
        );
    }
}
