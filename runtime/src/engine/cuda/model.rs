//! The Llama forward pass on a CUDA device (feature `cuda`), the same
//! contract as [`crate::engine::model::Model::forward`]: a batch of
//! [`SequenceInput`]s, K/V written through block tables into a paged
//! [`CudaKvCache`], logits per sequence per [`LogitsFor`].
//!
//! Weights are dequantized on the host at load time and kept as bf16 (norms
//! f32); activations meet them in cuBLAS GEMMs (bf16 in, f32 out); the
//! residual stream is f32. One layer:
//! `x += Wo·attn(rope(Wq·n(x)), cache ← (rope(Wk·n(x)), Wv·n(x)))`,
//! `x += Wdown·swiglu(Wgate|up·n(x))`.
//!
//! NOT YET RUN ON A GPU: this compiles, and each kernel it launches is
//! checked on the CPU model, but the wiring has never executed;
//! `tests/cuda_gpu.rs` compares it with the CPU model on a GPU machine.
//! It does not implement [`crate::engine::forward::ForwardModel`] yet: its
//! KV lives in device memory, and that trait's doc says how it would.

use std::path::Path;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::backend::{AttentionShape, AttentionTables, Bf16, CudaBackend, CudaError};
use crate::engine::config::{ModelConfig, RopeStyle};
use crate::engine::cpu::ops;
use crate::engine::gguf::GgufFile;
use crate::engine::kv_storage::KvShape;
use crate::engine::model::{
    LogitsFor, ModelError, SequenceInput, WeightTable, gguf_tensors, validate_batch,
};

/// The CUDA model cannot load or run.
#[derive(Debug, thiserror::Error)]
pub enum CudaModelError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("CUDA driver: {0:?}")]
    Driver(#[from] cudarc::driver::DriverError),
}

/// KV cache memory on the device: bf16, laid out like [`KvStorage`]
/// (`[layer][K|V][block][block_size][n_kv_heads][head_dim]`).
///
/// [`KvStorage`]: crate::engine::kv_storage::KvStorage
pub struct CudaKvCache {
    shape: KvShape,
    data: CudaSlice<Bf16>,
}

impl CudaKvCache {
    pub fn new(backend: &CudaBackend, shape: KvShape) -> Result<Self, CudaModelError> {
        let len = shape.n_layers * 2 * shape.num_blocks * shape.block_elems();
        Ok(Self {
            shape,
            data: backend.stream.alloc_zeros(len)?,
        })
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    fn layer_len(&self) -> usize {
        self.shape.num_blocks * self.shape.block_elems()
    }

    fn layer(&self, l: usize) -> (CudaView<'_, Bf16>, CudaView<'_, Bf16>) {
        let n = self.layer_len();
        let base = 2 * l * n;
        (
            self.data.slice(base..base + n),
            self.data.slice(base + n..base + 2 * n),
        )
    }

    /// Runs `f` on one layer's K and V regions, mutably.
    fn with_layer_mut<R>(
        &mut self,
        l: usize,
        f: impl FnOnce(&mut CudaViewMut<'_, Bf16>, &mut CudaViewMut<'_, Bf16>) -> R,
    ) -> R {
        let n = self.layer_len();
        let mut layer = self.data.slice_mut(2 * l * n..2 * (l + 1) * n);
        let (mut k, mut v) = layer.split_at_mut(n);
        f(&mut k, &mut v)
    }
}

struct Layer {
    attn_norm: CudaSlice<f32>,  // [hidden]
    wq: CudaSlice<Bf16>,        // [q_dim, hidden]
    wk: CudaSlice<Bf16>,        // [kv_dim, hidden]
    wv: CudaSlice<Bf16>,        // [kv_dim, hidden]
    wo: CudaSlice<Bf16>,        // [hidden, q_dim]
    ffn_norm: CudaSlice<f32>,   // [hidden]
    w_gate_up: CudaSlice<Bf16>, // [2 * ffn, hidden]: gate rows, then up rows
    w_down: CudaSlice<Bf16>,    // [hidden, ffn]
}

/// A Llama model resident on one CUDA device.
pub struct CudaModel {
    backend: CudaBackend,
    config: ModelConfig,
    embed: CudaSlice<Bf16>,          // [vocab, hidden]
    output: Option<CudaSlice<Bf16>>, // [vocab, hidden]; None: tied to embed
    norm: CudaSlice<f32>,            // [hidden]
    layers: Vec<Layer>,
    rope_freqs: CudaSlice<f32>, // [head_dim / 2]
}

fn to_bf16(values: &[f32]) -> Vec<Bf16> {
    values
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect()
}

impl CudaModel {
    /// Loads a GGUF checkpoint onto `backend`'s device.
    pub fn load_gguf(backend: CudaBackend, path: &Path) -> Result<Self, CudaModelError> {
        let file = GgufFile::open(path).map_err(ModelError::from)?;
        let config = ModelConfig::from_gguf(&file).map_err(ModelError::from)?;
        let stream = backend.stream.clone();
        let tensors = gguf_tensors(&file);
        let table = WeightTable {
            source_name: file.path(),
            tensors: &tensors,
        };
        // Tensors dequantized to f32 on the host.
        let rows = |name: &str, rows: usize, cols: usize| table.matrix_f32(name, rows, cols);
        let c = &config;
        let (h, q, kv) = (c.hidden, c.q_dim(), c.kv_dim());
        let mat = |name: &str, r: usize, k: usize| -> Result<CudaSlice<Bf16>, CudaModelError> {
            Ok(stream.clone_htod(&to_bf16(&rows(name, r, k)?))?)
        };
        let vec32 = |name: &str, n: usize| -> Result<CudaSlice<f32>, CudaModelError> {
            Ok(stream.clone_htod(&table.vector(name, n)?)?)
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let mut gate_up = rows(&n("ffn_gate"), c.ffn, h)?;
            gate_up.extend(rows(&n("ffn_up"), c.ffn, h)?);
            layers.push(Layer {
                attn_norm: vec32(&n("attn_norm"), h)?,
                wq: mat(&n("attn_q"), q, h)?,
                wk: mat(&n("attn_k"), kv, h)?,
                wv: mat(&n("attn_v"), kv, h)?,
                wo: mat(&n("attn_output"), h, q)?,
                ffn_norm: vec32(&n("ffn_norm"), h)?,
                w_gate_up: stream.clone_htod(&to_bf16(&gate_up))?,
                w_down: mat(&n("ffn_down"), h, c.ffn)?,
            });
        }
        let output = if table.contains("output.weight") {
            Some(mat("output.weight", c.vocab, h)?)
        } else {
            None
        };
        Ok(Self {
            embed: mat("token_embd.weight", c.vocab, h)?,
            output,
            norm: vec32("output_norm.weight", h)?,
            rope_freqs: stream.clone_htod(&ops::rope_freqs(c.head_dim, c.rope_base))?,
            layers,
            config,
            backend,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }

    /// The shape of a KV cache for this model.
    pub fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        KvShape::for_model(&self.config, num_blocks, block_size)
    }

    /// Runs one step (see [`crate::engine::model::Model::forward`]).
    pub fn forward(
        &self,
        kv: &mut CudaKvCache,
        batch: &[SequenceInput<'_>],
        logits_for: LogitsFor<'_>,
    ) -> Result<Vec<Vec<f32>>, CudaModelError> {
        let c = &self.config;
        let be = &self.backend;
        let st = &be.stream;
        let shape = kv.shape();
        // An out-of-range id or block would read or write outside device memory.
        validate_batch(c, shape, batch, logits_for)?;
        let (h, qd, kvd, vocab) = (c.hidden, c.q_dim(), c.kv_dim(), c.vocab);
        let bs = shape.block_size;

        // Host-side index arrays for the batch.
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut query_start = vec![0u32];
        let mut start_pos = Vec::new();
        let mut context_lens = Vec::new();
        let max_blocks = batch
            .iter()
            .map(|s| (s.start_pos + s.tokens.len()).div_ceil(bs))
            .max()
            .unwrap_or(1);
        let mut tables = vec![0u32; batch.len() * max_blocks];
        for (s, seq) in batch.iter().enumerate() {
            let end = seq.start_pos + seq.tokens.len();
            let used = end.div_ceil(bs);
            tables[s * max_blocks..s * max_blocks + used].copy_from_slice(&seq.block_table[..used]);
            for (i, &t) in seq.tokens.iter().enumerate() {
                let pos = seq.start_pos + i;
                ids.push(t);
                positions.push(pos as u32);
                slots.push(seq.block_table[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            query_start.push(ids.len() as u32);
            start_pos.push(seq.start_pos as u32);
            context_lens.push(end as u32);
        }
        let n = ids.len();
        let max_new = batch.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        let att_tables = AttentionTables {
            decode: max_new == 1,
            n_seqs: batch.len(),
            max_blocks,
            max_new_tokens: max_new,
            block_tables: st.clone_htod(&tables)?,
            context_lens: st.clone_htod(&context_lens)?,
            query_start: st.clone_htod(&query_start)?,
            start_pos: st.clone_htod(&start_pos)?,
        };
        let att_shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            block_size: bs,
        };
        let ids_d = st.clone_htod(&ids)?;
        let pos_d = st.clone_htod(&positions)?;
        let slots_d = st.clone_htod(&slots)?;
        let halves = c.rope_style == RopeStyle::Halves;

        // Activations.
        let mut x = st.alloc_zeros::<f32>(n * h)?; // [n, hidden] residual
        let mut xn = st.alloc_zeros::<Bf16>(n * h)?; // [n, hidden]
        let mut q = st.alloc_zeros::<f32>(n * qd)?; // [n, q_dim]
        let mut k = st.alloc_zeros::<f32>(n * kvd)?; // [n, kv_dim]
        let mut v = st.alloc_zeros::<f32>(n * kvd)?; // [n, kv_dim]
        let mut attn = st.alloc_zeros::<Bf16>(n * qd)?; // [n, q_dim]
        let mut gu = st.alloc_zeros::<f32>(n * 2 * c.ffn)?; // [n, 2 * ffn]
        let mut act = st.alloc_zeros::<Bf16>(n * c.ffn)?; // [n, ffn]

        be.embedding(&self.embed, &ids_d, &mut x, n, h)?;
        for (l, w) in self.layers.iter().enumerate() {
            be.rms_norm(&x, &w.attn_norm, &mut xn, n, h, c.rms_eps)?;
            let xv = xn.slice(..);
            be.gemm(&w.wq.slice(..), &xv, &mut q.slice_mut(..), n, qd, h, 0.0)?;
            be.gemm(&w.wk.slice(..), &xv, &mut k.slice_mut(..), n, kvd, h, 0.0)?;
            be.gemm(&w.wv.slice(..), &xv, &mut v.slice_mut(..), n, kvd, h, 0.0)?;
            be.rope(
                &mut q.slice_mut(..),
                &pos_d,
                &self.rope_freqs,
                n,
                c.n_heads,
                c.head_dim,
                halves,
            )?;
            be.rope(
                &mut k.slice_mut(..),
                &pos_d,
                &self.rope_freqs,
                n,
                c.n_kv_heads,
                c.head_dim,
                halves,
            )?;
            kv.with_layer_mut(l, |kc, vc| {
                be.kv_write(&k.slice(..), &v.slice(..), kc, vc, &slots_d, n, kvd)
            })?;
            {
                let (kc, vc) = kv.layer(l);
                be.attention(&att_shape, &att_tables, &q.slice(..), &kc, &vc, &mut attn)?;
            }
            be.gemm(
                &w.wo.slice(..),
                &attn.slice(..),
                &mut x.slice_mut(..),
                n,
                h,
                qd,
                1.0,
            )?;

            be.rms_norm(&x, &w.ffn_norm, &mut xn, n, h, c.rms_eps)?;
            be.gemm(
                &w.w_gate_up.slice(..),
                &xn.slice(..),
                &mut gu.slice_mut(..),
                n,
                2 * c.ffn,
                h,
                0.0,
            )?;
            be.swiglu(&gu, &mut act, n, c.ffn)?;
            be.gemm(
                &w.w_down.slice(..),
                &act.slice(..),
                &mut x.slice_mut(..),
                n,
                h,
                c.ffn,
                1.0,
            )?;
        }

        // Rows that get logits, gathered, then final norm and projection.
        let mut picked = Vec::new();
        let mut rows_per_seq = Vec::new();
        for (s, seq) in batch.iter().enumerate() {
            let first = query_start[s] as usize;
            let nt = seq.tokens.len();
            let r = match logits_for {
                LogitsFor::LastToken => 1,
                LogitsFor::AllTokens => nt,
                LogitsFor::LastTokenOf(wanted) => usize::from(wanted[s]),
            };
            picked.extend(first + nt - r..first + nt);
            rows_per_seq.push(r);
        }
        let mut out = Vec::with_capacity(batch.len());
        if picked.is_empty() {
            out.resize(batch.len(), Vec::new());
            return Ok(out);
        }
        let np = picked.len();
        let mut xp = st.alloc_zeros::<f32>(np * h)?; // [picked, hidden]
        for (i, &t) in picked.iter().enumerate() {
            st.memcpy_dtod(
                &x.slice(t * h..(t + 1) * h),
                &mut xp.slice_mut(i * h..(i + 1) * h),
            )?;
        }
        let mut xpn = st.alloc_zeros::<Bf16>(np * h)?;
        be.rms_norm(&xp, &self.norm, &mut xpn, np, h, c.rms_eps)?;
        let mut logits = st.alloc_zeros::<f32>(np * vocab)?; // [picked, vocab]
        let w_out = self.output.as_ref().unwrap_or(&self.embed);
        be.gemm(
            &w_out.slice(..),
            &xpn.slice(..),
            &mut logits.slice_mut(..),
            np,
            vocab,
            h,
            0.0,
        )?;
        let host = st.clone_dtoh(&logits)?;
        let mut rest = host.as_slice();
        for r in rows_per_seq {
            let (mine, tail) = rest.split_at(r * vocab);
            out.push(mine.to_vec());
            rest = tail;
        }
        Ok(out)
    }
}
