//! KV cache memory: `num_blocks` blocks of `block_size` tokens for every
//! layer, K and V, as IEEE f16 ([`KvElem`]) in one allocation laid out
//! `[layer][K|V][block][block_size][n_kv_heads][head_dim]`.
//!
//! f16, as llama.cpp keeps its cache by default: half the bytes of f32, so a
//! long context's attention moves half as much from memory per decode step
//! and a worker holds twice the tokens. Keys and values are rounded to
//! nearest f16 when written ([`KvStorage::write_slot`]); reading one back
//! into f32 is exact, so every kernel sees the same numbers.
//!
//! So "layer `l`, K or V, block `b`" is one contiguous region
//! ([`KvStorage::region`]) and so is "layer `l`, K or V, all blocks"
//! ([`KvStorage::layer_region`]): what a transfer engine (NIXL) registers and
//! moves. The memory never moves or grows after [`KvStorage::new`], and is
//! backed by huge pages where Linux grants them ([`advise_huge_pages`]). This type
//! does not decide which sequence owns which block (that is the block pool's
//! job); it only stores bytes by block id.

/// Which half of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    K = 0,
    V = 1,
}

/// The cache cannot be built or a block id is out of range.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("block {block} is out of range: the cache has {num_blocks} blocks")]
    BlockOutOfRange { block: u32, num_blocks: usize },
    #[error("layer {layer} is out of range: the model has {n_layers} layers")]
    LayerOutOfRange { layer: usize, n_layers: usize },
    #[error("block data is {got} bytes, a block holds {want}")]
    WrongLength { got: usize, want: usize },
    #[error("a KV cache of {what} is too large or empty")]
    BadSize { what: String },
}

use super::config::ModelConfig;

/// One element of the cache: an IEEE binary16 value.
pub type KvElem = half::f16;

/// The shape of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// The cache shape for a model of `config`.
    pub fn for_model(config: &ModelConfig, num_blocks: usize, block_size: usize) -> KvShape {
        KvShape {
            n_layers: config.n_layers,
            num_blocks,
            block_size,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
        }
    }

    /// Elements per token per layer per K or V.
    pub fn token_elems(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Elements in one (layer, K|V, block) region.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.token_elems()
    }

    /// Bytes in one (layer, K|V, block) region.
    pub fn block_region_bytes(&self) -> usize {
        self.block_elems() * size_of::<KvElem>()
    }
}

/// The KV cache memory.
pub struct KvStorage {
    shape: KvShape,
    data: Vec<KvElem>,
}

impl std::fmt::Debug for KvStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStorage")
            .field("shape", &self.shape)
            .finish()
    }
}

/// Ask Linux to back `data` with 2 MiB transparent huge pages where the
/// kernel leaves that to the program (`madvise`, Debian's default). The
/// attention reads a long context's keys and values from blocks all over
/// the cache, and with 4 KiB pages nearly every block is a TLB miss. A
/// hint: where the kernel says no, nothing changes. Call it before the
/// memory is first touched (a fresh zeroed allocation is not yet).
pub fn advise_huge_pages<T>(data: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = data.as_ptr() as usize;
        let end = start + std::mem::size_of_val(data);
        let first = start.next_multiple_of(HUGE);
        let len = end.saturating_sub(first) / HUGE * HUGE;
        if len > 0 {
            // SAFETY: `first..first + len` lies inside `data`'s allocation,
            // which we own; MADV_HUGEPAGE changes how pages are backed, not
            // what they hold.
            let _ = unsafe { libc::madvise(first as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

impl KvStorage {
    /// Allocates a zeroed cache.
    pub fn new(shape: KvShape) -> Result<Self, KvError> {
        let total = [
            shape.n_layers,
            2,
            shape.num_blocks,
            shape.block_size,
            shape.n_kv_heads,
            shape.head_dim,
        ]
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n > 0 && n <= isize::MAX as usize / size_of::<KvElem>());
        let Some(total) = total else {
            return Err(KvError::BadSize {
                what: format!("{shape:?}"),
            });
        };
        let data = vec![KvElem::ZERO; total];
        advise_huge_pages(&data);
        Ok(Self { shape, data })
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn num_blocks(&self) -> usize {
        self.shape.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.shape.block_size
    }

    /// Element offset of (layer, kind, block).
    fn offset(&self, layer: usize, kind: KvKind, block: usize) -> usize {
        ((layer * 2 + kind as usize) * self.shape.num_blocks + block) * self.shape.block_elems()
    }

    fn check(&self, layer: usize, block: u32) -> Result<usize, KvError> {
        if layer >= self.shape.n_layers {
            return Err(KvError::LayerOutOfRange {
                layer,
                n_layers: self.shape.n_layers,
            });
        }
        let b = block as usize;
        if b >= self.shape.num_blocks {
            return Err(KvError::BlockOutOfRange {
                block,
                num_blocks: self.shape.num_blocks,
            });
        }
        Ok(b)
    }

    /// The whole allocation as (pointer, bytes), for registering with a
    /// transfer engine. The pointer stays valid while `self` lives.
    pub fn base_region(&mut self) -> (*mut u8, usize) {
        (
            self.data.as_mut_ptr().cast(),
            self.data.len() * size_of::<KvElem>(),
        )
    }

    /// (pointer, bytes) of one (layer, K|V, block) region.
    pub fn region(
        &mut self,
        layer: usize,
        kind: KvKind,
        block: u32,
    ) -> Result<(*mut u8, usize), KvError> {
        let b = self.check(layer, block)?;
        let at = self.offset(layer, kind, b);
        // `at` is in bounds: `check` bounded layer and block.
        let ptr = self.data[at..].as_mut_ptr().cast();
        Ok((ptr, self.shape.block_region_bytes()))
    }

    /// (pointer, bytes) of all blocks of one layer's K or V.
    pub fn layer_region(
        &mut self,
        layer: usize,
        kind: KvKind,
    ) -> Result<(*mut u8, usize), KvError> {
        self.check(layer, 0)?;
        let at = self.offset(layer, kind, 0);
        let ptr = self.data[at..].as_mut_ptr().cast();
        Ok((ptr, self.shape.block_region_bytes() * self.shape.num_blocks))
    }

    /// The values of one (layer, K|V, block): `[block_size][n_kv_heads][head_dim]`.
    pub fn block(&self, layer: usize, kind: KvKind, block: u32) -> Result<&[KvElem], KvError> {
        let b = self.check(layer, block)?;
        let at = self.offset(layer, kind, b);
        Ok(&self.data[at..at + self.shape.block_elems()])
    }

    /// Mutable view of one (layer, K|V, block).
    pub fn block_mut(
        &mut self,
        layer: usize,
        kind: KvKind,
        block: u32,
    ) -> Result<&mut [KvElem], KvError> {
        let b = self.check(layer, block)?;
        let at = self.offset(layer, kind, b);
        let n = self.shape.block_elems();
        Ok(&mut self.data[at..at + n])
    }

    /// Bytes of one block across all layers, K then V per layer: what moves
    /// when a block moves. Length `n_layers * 2 * block_region_bytes`.
    pub fn read_block(&self, block: u32) -> Result<Vec<u8>, KvError> {
        let mut out = Vec::with_capacity(self.shape.n_layers * 2 * self.shape.block_region_bytes());
        for layer in 0..self.shape.n_layers {
            for kind in [KvKind::K, KvKind::V] {
                for v in self.block(layer, kind, block)? {
                    out.extend_from_slice(&v.to_ne_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Writes what [`KvStorage::read_block`] returned into `block`.
    pub fn write_block(&mut self, block: u32, bytes: &[u8]) -> Result<(), KvError> {
        let want = self.shape.n_layers * 2 * self.shape.block_region_bytes();
        if bytes.len() != want {
            return Err(KvError::WrongLength {
                got: bytes.len(),
                want,
            });
        }
        let mut chunks = bytes.chunks_exact(size_of::<KvElem>());
        for layer in 0..self.shape.n_layers {
            for kind in [KvKind::K, KvKind::V] {
                for (v, c) in self
                    .block_mut(layer, kind, block)?
                    .iter_mut()
                    .zip(&mut chunks)
                {
                    *v = KvElem::from_ne_bytes([c[0], c[1]]);
                }
            }
        }
        Ok(())
    }

    /// Every block's K or V of one layer, block after block (a slot's
    /// vector at `block * block_elems + slot * token_elems`).
    pub(crate) fn layer(&self, layer: usize, kind: KvKind) -> &[KvElem] {
        let at = self.offset(layer, kind, 0);
        &self.data[at..at + self.shape.num_blocks * self.shape.block_elems()]
    }

    /// The K or V vector of one token slot: `[n_kv_heads * head_dim]`.
    /// Unchecked beyond slice bounds; the forward pass validates block tables.
    pub(crate) fn slot(&self, layer: usize, kind: KvKind, block: usize, slot: usize) -> &[KvElem] {
        let n = self.shape.token_elems();
        let at = self.offset(layer, kind, block) + slot * n;
        &self.data[at..at + n]
    }

    pub(crate) fn slot_mut(
        &mut self,
        layer: usize,
        kind: KvKind,
        block: usize,
        slot: usize,
    ) -> &mut [KvElem] {
        let n = self.shape.token_elems();
        let at = self.offset(layer, kind, block) + slot * n;
        &mut self.data[at..at + n]
    }

    /// Stores a token's K or V vector (`[n_kv_heads * head_dim]` f32) in
    /// its slot, each value rounded to the nearest f16 (ties to even;
    /// beyond f16's range, infinity).
    pub(crate) fn write_slot(
        &mut self,
        layer: usize,
        kind: KvKind,
        block: usize,
        slot: usize,
        values: &[f32],
    ) {
        to_kv(values, self.slot_mut(layer, kind, block, slot));
    }
}

/// `values` rounded to f16 into `out` (the same length): what the cache
/// holds for them. On F16C hardware a vector instruction rounds each, as
/// the scalar conversion does.
pub fn to_kv(values: &[f32], out: &mut [KvElem]) {
    use half::slice::HalfFloatSliceExt;
    out.convert_from_f32_slice(values);
}

/// f16 copies of `values` (test and reference data for the kernels).
pub fn to_kv_vec(values: &[f32]) -> Vec<KvElem> {
    let mut out = vec![KvElem::ZERO; values.len()];
    to_kv(values, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            n_layers: 2,
            num_blocks: 3,
            block_size: 4,
            n_kv_heads: 2,
            head_dim: 8,
        }
    }

    #[test]
    fn regions_are_contiguous_and_disjoint() {
        let mut kv = KvStorage::new(shape()).unwrap();
        let (base, total) = kv.base_region();
        assert_eq!(total, 2 * 2 * 3 * 4 * 2 * 8 * 2);
        let mut seen = Vec::new();
        for layer in 0..2 {
            for kind in [KvKind::K, KvKind::V] {
                let (lp, ll) = kv.layer_region(layer, kind).unwrap();
                assert_eq!(ll, 3 * 128);
                for b in 0..3 {
                    let (p, len) = kv.region(layer, kind, b).unwrap();
                    assert_eq!(len, 128);
                    let off = p as usize - base as usize;
                    assert_eq!(p as usize, lp as usize + b as usize * 128);
                    seen.push(off);
                }
            }
        }
        seen.sort();
        assert_eq!(seen, (0..12).map(|i| i * 128).collect::<Vec<_>>());
        assert!(kv.region(0, KvKind::K, 3).is_err());
        assert!(kv.region(2, KvKind::K, 0).is_err());
    }

    #[test]
    fn a_block_copies_out_and_in() {
        let mut a = KvStorage::new(shape()).unwrap();
        for (i, v) in a.block_mut(1, KvKind::V, 2).unwrap().iter_mut().enumerate() {
            *v = KvElem::from_f32(i as f32);
        }
        a.block_mut(0, KvKind::K, 2).unwrap()[5] = KvElem::from_f32(-1.5);
        let bytes = a.read_block(2).unwrap();
        let mut b = KvStorage::new(shape()).unwrap();
        b.write_block(0, &bytes).unwrap();
        assert_eq!(
            b.block(1, KvKind::V, 0).unwrap(),
            a.block(1, KvKind::V, 2).unwrap()
        );
        assert_eq!(b.block(0, KvKind::K, 0).unwrap()[5].to_f32(), -1.5);
        assert!(b.write_block(0, &bytes[1..]).is_err());
    }
}
