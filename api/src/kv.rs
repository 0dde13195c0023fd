//! The router's vocabulary for KV cache contents: [`PrefixHash`], its
//! stable definition, and the [`KvEvent`]s a worker's block pool emits when
//! its prefix cache gains or loses blocks.
//!
//! # Prefix hash (stable wire definition, version 1)
//!
//! Routers in other processes recompute these hashes from token ids and
//! compare them with the ones in KV events, so the definition is fixed:
//!
//! ```text
//! hash(block i) = u64::from_le_bytes(first 8 bytes of SHA-256(
//!       b"xpyd-kv-block-v1"                  // PREFIX_HASH_DOMAIN, 16 bytes
//!    ++ parent.to_le_bytes()                 // u64; ROOT_PARENT_HASH (0) for block 0
//!    ++ (tokens.len() as u32).to_le_bytes()  // = block_size
//!    ++ tokens[0].to_le_bytes() ++ …         // each token id as u32 LE
//! ))
//! ```
//!
//! where `parent` is the hash of block `i - 1` of the same sequence. Only
//! full blocks are hashed. [`prefix_hashes`] computes the chain for a prompt.
//!
//! Not here: the block pool that emits the events (the runtime's engine) and
//! the index that applies them (the router).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A token id as the tokenizer and the model see it.
pub type TokenId = u32;

/// Domain tag that starts every hashed message, so a prefix hash can never
/// equal some other SHA-256-derived id in the system.
pub const PREFIX_HASH_DOMAIN: &[u8; 16] = b"xpyd-kv-block-v1";

/// The value hashed in place of a parent hash for the first block.
pub const ROOT_PARENT_HASH: u64 = 0;

/// Hash of one full block, chained from the hashes of all blocks before it:
/// equal hashes mean equal token prefixes, so equal K/V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PrefixHash(pub u64);

impl PrefixHash {
    /// The hash of a full block of `tokens` whose preceding block hashed to
    /// `parent` (`None` for the first block of a sequence). See the module
    /// doc for the exact definition.
    pub fn of_block(parent: Option<PrefixHash>, tokens: &[TokenId]) -> PrefixHash {
        let mut message = Vec::with_capacity(PREFIX_HASH_DOMAIN.len() + 12 + 4 * tokens.len());
        message.extend_from_slice(PREFIX_HASH_DOMAIN);
        message.extend_from_slice(&parent.map_or(ROOT_PARENT_HASH, |p| p.0).to_le_bytes());
        // Block sizes fit in u32 by construction (the block pool checks).
        message.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
        for token in tokens {
            message.extend_from_slice(&token.to_le_bytes());
        }
        let digest = Sha256::digest(&message);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        PrefixHash(u64::from_le_bytes(first))
    }
}

impl fmt::Display for PrefixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The hash chain of every full block of `tokens` (a trailing partial block
/// has no hash). This is what a router computes for an incoming prompt.
pub fn prefix_hashes(tokens: &[TokenId], block_size: usize) -> Vec<PrefixHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let hash = PrefixHash::of_block(parent, block);
            parent = Some(hash);
            hash
        })
        .collect()
}

/// One change to a worker's prefix-cache index, numbered so that a router
/// can notice a lost event (`event_id` increases by one per event, from 0 when
/// the pool is given its channel). The publisher adds the worker identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    pub event_id: u64,
    pub data: KvEventData,
}

/// What the index gained or lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventData {
    /// Consecutive blocks of one chain became cached: `block_hashes[0]`'s
    /// parent is `parent_hash` (`None`: it is the first block of a sequence),
    /// and each later hash's parent is the one before it. `token_ids` holds
    /// `block_size` tokens per block, in order.
    Stored {
        parent_hash: Option<PrefixHash>,
        block_hashes: Vec<PrefixHash>,
        block_size: u32,
        token_ids: Vec<TokenId>,
    },
    /// These hashes left the index (their blocks were evicted for reuse).
    /// Descendants of a removed hash may remain indexed but can no longer be
    /// reached by a prefix lookup here.
    Removed { block_hashes: Vec<PrefixHash> },
    /// The index is empty: sent when the pool is given its channel (a new or
    /// restarted worker holds nothing) and when the prefix cache is reset.
    Cleared,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_definition_is_stable() {
        // Pinned values: a change here breaks every router comparing hashes
        // with older workers, so it needs a new domain tag, not an edit.
        let first = PrefixHash::of_block(None, &[1, 2, 3, 4]);
        let second = PrefixHash::of_block(Some(first), &[5, 6, 7, 8]);
        // Values computed independently (Python hashlib) from the module-doc
        // definition.
        assert_eq!(first, PrefixHash(0x1e7c_8453_09c7_86ac));
        assert_eq!(second, PrefixHash(0x0af8_d5c2_db5d_d76d));
        assert_eq!(
            prefix_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4),
            vec![first, second]
        );
        assert_ne!(
            PrefixHash::of_block(None, &[5, 6, 7, 8]),
            second,
            "hash depends on parent"
        );
    }
}
