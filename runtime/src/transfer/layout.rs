//! The shape of a KV cache as two engines must agree on it before one writes
//! blocks into the other.
//!
//! For: describing block-addressed KV memory (`[layer][K|V][block]`, each
//! (layer, K|V, block) one contiguous region of `block_region_bytes`) and
//! checking a peer's description against ours. Not for: which blocks belong to
//! which request (the block pool) or how memory is registered (the agent).

use serde::{Deserialize, Serialize};

use crate::engine::kv_storage::KvShape;

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    fn code(self) -> u64 {
        match self {
            KvDtype::F32 => 0,
            KvDtype::F16 => 1,
            KvDtype::Bf16 => 2,
        }
    }
}

/// What a transfer needs to know about one side's KV memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub n_layers: u32,
    /// Tokens per block.
    pub block_size: u32,
    /// Bytes of one (layer, K|V, block) region.
    pub block_region_bytes: u64,
    pub dtype: KvDtype,
    /// Blocks this side holds; may differ between peers.
    pub num_blocks: u32,
}

/// Two layouts cannot exchange blocks. Names the first field that differs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV layouts differ in {field}: ours is {local}, the peer's is {peer}")]
pub struct LayoutMismatch {
    pub field: &'static str,
    pub local: String,
    pub peer: String,
}

impl KvLayout {
    /// The layout of an engine's host cache ([`KvStorage`]: f16).
    ///
    /// [`KvStorage`]: crate::engine::kv_storage::KvStorage
    pub fn of_shape(shape: &KvShape) -> KvLayout {
        KvLayout {
            n_layers: shape.n_layers as u32,
            block_size: shape.block_size as u32,
            block_region_bytes: shape.block_region_bytes() as u64,
            dtype: KvDtype::F16,
            num_blocks: shape.num_blocks as u32,
        }
    }

    /// (layer, K|V) regions: `2 * n_layers`, K before V within a layer.
    pub fn region_count(&self) -> usize {
        self.n_layers as usize * 2
    }

    /// Bytes of one (layer, K|V) region holding all blocks.
    pub fn region_bytes(&self) -> u64 {
        self.block_region_bytes * u64::from(self.num_blocks)
    }

    /// Blocks written by one side can be read by the other: everything but
    /// the number of blocks must match.
    pub fn check_compatible(&self, peer: &KvLayout) -> Result<(), LayoutMismatch> {
        let fields: [(&'static str, u64, u64); 4] = [
            ("n_layers", self.n_layers.into(), peer.n_layers.into()),
            ("block_size", self.block_size.into(), peer.block_size.into()),
            (
                "block_region_bytes",
                self.block_region_bytes,
                peer.block_region_bytes,
            ),
            ("dtype", self.dtype.code(), peer.dtype.code()),
        ];
        for (field, local, theirs) in fields {
            if local != theirs {
                let (local, peer) = if field == "dtype" {
                    (format!("{:?}", self.dtype), format!("{:?}", peer.dtype))
                } else {
                    (local.to_string(), theirs.to_string())
                };
                return Err(LayoutMismatch { field, local, peer });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 30,
            block_size: 16,
            block_region_bytes: 16 * 3 * 64 * 2,
            dtype: KvDtype::F16,
            num_blocks: 100,
        }
    }

    #[test]
    fn layouts_differing_only_in_block_count_are_compatible() {
        let peer = KvLayout {
            num_blocks: 7,
            ..layout()
        };
        assert_eq!(layout().check_compatible(&peer), Ok(()));
    }

    #[test]
    fn a_mismatch_names_the_field() {
        let peer = KvLayout {
            block_size: 32,
            ..layout()
        };
        let err = layout().check_compatible(&peer).unwrap_err();
        assert_eq!(err.field, "block_size");
        assert_eq!(
            err.to_string(),
            "KV layouts differ in block_size: ours is 16, the peer's is 32"
        );
        let peer = KvLayout {
            dtype: KvDtype::Bf16,
            ..layout()
        };
        let err = layout().check_compatible(&peer).unwrap_err();
        assert_eq!(err.field, "dtype");
        assert!(err.to_string().contains("Bf16"), "{err}");
    }

    #[test]
    fn the_layout_round_trips_through_json() {
        let json = serde_json::to_string(&layout()).unwrap();
        assert!(json.contains("\"dtype\":\"f16\""), "{json}");
        let back: KvLayout = serde_json::from_str(&json).unwrap();
        assert_eq!(back, layout());
    }

    #[test]
    fn an_engine_cache_shape_maps_to_its_layout() {
        let shape = KvShape {
            n_layers: 30,
            num_blocks: 100,
            block_size: 16,
            n_kv_heads: 3,
            head_dim: 64,
        };
        assert_eq!(KvLayout::of_shape(&shape), layout());
    }
}
