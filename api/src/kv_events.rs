//! What a decode worker publishes for routers on the bus: a batch of
//! [`KvEvent`]s and the load report it carries.
//!
//! Two encodings, both accepted by [`KvEventBatch::decode`] (it tells them
//! apart by the first byte):
//!
//! - binary ([`KvEventBatch::encode`], what workers publish): JSON of this
//!   volume (token ids included) decodes about 6 times slower than this
//!   and slower than the index applies events (see `docs/benchmarks.md`,
//!   "Router"). Layout, little endian: magic `XKB1`; `instance_id` (u16
//!   length, UTF-8); `seq` u64; `load` as four u64 (`active_blocks`,
//!   `total_blocks`, `running`, `waiting`); u32 event count; per event
//!   `event_id` u64, a tag byte and the payload. Tag `0` Stored: parent
//!   flag u8 (then the parent u64 if 1), `block_size` u32, hashes (u32
//!   count, u64 each), token ids (u32 count, u32 each); tag `1` Removed:
//!   hashes as for Stored; tag `2` Cleared: nothing. New fields go after
//!   the events and older readers ignore trailing bytes; a new layout gets
//!   a new magic.
//! - JSON (serde, [`KvEventBatch::encode_json`]): readable, for tools and
//!   tests.
//!
//! Not here: what the router does with a batch (the runtime's `router`).

use serde::{Deserialize, Serialize};

use crate::kv::{KvEvent, KvEventData, PrefixHash};

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
#[derive(Debug)]
pub enum DecodeError {
    Json(serde_json::Error),
    Binary(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Json(e) => write!(f, "bad KV event batch (JSON): {e}"),
            DecodeError::Binary(e) => write!(f, "bad KV event batch (binary): {e}"),
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Json(e) => Some(e),
            DecodeError::Binary(_) => None,
        }
    }
}

impl From<serde_json::Error> for DecodeError {
    fn from(e: serde_json::Error) -> Self {
        DecodeError::Json(e)
    }
}

/// First bytes of the binary layout, version 1.
const MAGIC: &[u8; 4] = b"XKB1";
const TAG_STORED: u8 = 0;
const TAG_REMOVED: u8 = 1;
const TAG_CLEARED: u8 = 2;

impl KvEventBatch {
    /// The bytes to publish (binary layout; see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.events.len() * 32);
        out.extend_from_slice(MAGIC);
        let id = self.instance_id.as_bytes();
        let id = &id[..id.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id);
        for v in [
            self.seq,
            self.load.active_blocks,
            self.load.total_blocks,
            self.load.running,
            self.load.waiting,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.events.len() as u32).to_le_bytes());
        let hashes = |out: &mut Vec<u8>, hashes: &[PrefixHash]| {
            out.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
            for h in hashes {
                out.extend_from_slice(&h.0.to_le_bytes());
            }
        };
        for event in &self.events {
            out.extend_from_slice(&event.event_id.to_le_bytes());
            match &event.data {
                KvEventData::Stored {
                    parent_hash,
                    block_hashes,
                    block_size,
                    token_ids,
                } => {
                    out.push(TAG_STORED);
                    match parent_hash {
                        Some(p) => {
                            out.push(1);
                            out.extend_from_slice(&p.0.to_le_bytes());
                        }
                        None => out.push(0),
                    }
                    out.extend_from_slice(&block_size.to_le_bytes());
                    hashes(&mut out, block_hashes);
                    out.extend_from_slice(&(token_ids.len() as u32).to_le_bytes());
                    for t in token_ids {
                        out.extend_from_slice(&t.to_le_bytes());
                    }
                }
                KvEventData::Removed { block_hashes } => {
                    out.push(TAG_REMOVED);
                    hashes(&mut out, block_hashes);
                }
                KvEventData::Cleared => out.push(TAG_CLEARED),
            }
        }
        out
    }

    /// The JSON form (field names as in this struct).
    pub fn encode_json(&self) -> Vec<u8> {
        // Serializing plain structs, strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse a payload received from the bus, binary or JSON.
    pub fn decode(payload: &[u8]) -> Result<KvEventBatch, DecodeError> {
        if payload.starts_with(MAGIC) {
            Reader {
                buf: payload,
                pos: MAGIC.len(),
            }
            .batch()
        } else {
            Ok(serde_json::from_slice(payload)?)
        }
    }
}

/// Bounds-checked reading of the binary layout: a short or inconsistent
/// payload is an error, never a panic or a huge allocation.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(DecodeError::Binary("truncated payload"))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let mut b = [0; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    /// `count` items of `size` bytes, checked against what is left.
    fn items(&mut self, size: usize) -> Result<&'a [u8], DecodeError> {
        let count = self.u32()? as usize;
        let len = count
            .checked_mul(size)
            .ok_or(DecodeError::Binary("count overflows"))?;
        self.take(len)
    }

    fn hashes(&mut self) -> Result<Vec<PrefixHash>, DecodeError> {
        Ok(self
            .items(8)?
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0; 8];
                b.copy_from_slice(c);
                PrefixHash(u64::from_le_bytes(b))
            })
            .collect())
    }

    fn batch(mut self) -> Result<KvEventBatch, DecodeError> {
        let id_len = self.u16()? as usize;
        let instance_id = std::str::from_utf8(self.take(id_len)?)
            .map_err(|_| DecodeError::Binary("instance id is not UTF-8"))?
            .to_string();
        let seq = self.u64()?;
        let load = WorkerLoad {
            active_blocks: self.u64()?,
            total_blocks: self.u64()?,
            running: self.u64()?,
            waiting: self.u64()?,
        };
        let count = self.u32()? as usize;
        // Every event takes at least 9 bytes: bound the allocation.
        let mut events = Vec::with_capacity(count.min(self.buf.len() / 9));
        for _ in 0..count {
            let event_id = self.u64()?;
            let data = match self.u8()? {
                TAG_STORED => {
                    let parent_hash = match self.u8()? {
                        0 => None,
                        1 => Some(PrefixHash(self.u64()?)),
                        _ => return Err(DecodeError::Binary("bad parent flag")),
                    };
                    let block_size = self.u32()?;
                    let block_hashes = self.hashes()?;
                    let token_ids = self
                        .items(4)?
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    KvEventData::Stored {
                        parent_hash,
                        block_hashes,
                        block_size,
                        token_ids,
                    }
                }
                TAG_REMOVED => KvEventData::Removed {
                    block_hashes: self.hashes()?,
                },
                TAG_CLEARED => KvEventData::Cleared,
                _ => return Err(DecodeError::Binary("unknown event tag")),
            };
            events.push(KvEvent { event_id, data });
        }
        Ok(KvEventBatch {
            instance_id,
            seq,
            events,
            load,
        })
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
        for payload in [first.encode(), first.encode_json()] {
            assert_eq!(KvEventBatch::decode(&payload).expect("decodes"), first);
        }
        let removed = publisher.batch(
            vec![KvEvent {
                event_id: 2,
                data: KvEventData::Removed {
                    block_hashes: vec![PrefixHash(1), PrefixHash(2)],
                },
            }],
            load,
        );
        assert_eq!(
            KvEventBatch::decode(&removed.encode()).expect("decodes"),
            removed
        );
    }

    #[test]
    fn damaged_binary_payloads_are_errors() {
        let batch = KvEventPublisher::new("w").batch(
            vec![KvEvent {
                event_id: 0,
                data: KvEventData::Stored {
                    parent_hash: Some(PrefixHash(3)),
                    block_hashes: vec![PrefixHash(4)],
                    block_size: 1,
                    token_ids: vec![9],
                },
            }],
            WorkerLoad::default(),
        );
        let bytes = batch.encode();
        for cut in 4..bytes.len() {
            assert!(KvEventBatch::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A huge count in a short payload is refused, not allocated.
        let mut huge = bytes.clone();
        let count_at = MAGIC.len() + 2 + 1 + 8 + 32; // magic, id, seq, load
        huge[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(KvEventBatch::decode(&huge).is_err());
        // Trailing bytes (fields a newer writer added) are ignored.
        let mut longer = bytes;
        longer.extend_from_slice(b"future");
        assert_eq!(KvEventBatch::decode(&longer).expect("decodes"), batch);
    }

    #[test]
    fn missing_fields_take_defaults_and_garbage_is_an_error() {
        let batch = KvEventBatch::decode(br#"{"instance_id":"a","seq":4}"#).expect("decodes");
        assert_eq!(batch.events, Vec::new());
        assert_eq!(batch.load, WorkerLoad::default());
        let err = KvEventBatch::decode(b"{\"seq\":\"x\"}").unwrap_err();
        assert!(err.to_string().starts_with("bad KV event batch"), "{err}");
    }
}
