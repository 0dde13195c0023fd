//! The Llama forward pass on CPU: embeddings, `n_layers` pre-norm blocks
//! (RMSNorm → GQA attention with RoPE → residual, RMSNorm → SwiGLU →
//! residual), final norm and the output projection (the embedding matrix when
//! the checkpoint has no `output.weight`).
//!
//! One call runs a batch of sequences, each a [`SequenceInput`]: new tokens,
//! the position of the first one, and the block table through which its K/V
//! are read from and written to [`KvStorage`]. A sequence may bring a whole
//! prompt, a prefill chunk or one decode token, so a scheduler can mix them
//! in one step. The model decides nothing about blocks, sampling or stopping.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

use super::config::{ConfigError, ModelConfig};
pub use super::cpu::Activations;
use super::cpu::matmul::simd_available;
use super::cpu::ops::{KvSource, Run};
use super::cpu::{KernelError, QMatrix, WeightBytes, ops};
use super::gguf::{GgmlType, GgufError, GgufFile};
use super::kv_storage::{KvElem, KvError, KvKind, KvShape, KvStorage};

/// The model cannot be loaded or a batch cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("{source_name}: tensor {tensor} is missing")]
    MissingTensor { source_name: String, tensor: String },
    #[error("{source_name}: tensor {tensor} has dims {got:?}, expected {want:?}")]
    TensorShape {
        source_name: String,
        tensor: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("the batch is empty")]
    EmptyBatch,
    #[error("sequence {seq}: no new tokens")]
    EmptySequence { seq: usize },
    #[error(
        "sequence {seq}: token id {token} at index {index} is not in the vocabulary (size {vocab})"
    )]
    UnknownToken {
        seq: usize,
        index: usize,
        token: u32,
        vocab: usize,
    },
    #[error(
        "sequence {seq}: positions {start}..{end} exceed the model's context length {context_length}"
    )]
    ContextOverflow {
        seq: usize,
        start: usize,
        end: usize,
        context_length: usize,
    },
    #[error(
        "sequence {seq}: block table of {blocks} blocks of {block_size} covers {covered} positions, {needed} needed"
    )]
    BlockTableTooShort {
        seq: usize,
        blocks: usize,
        block_size: usize,
        covered: usize,
        needed: usize,
    },
    #[error(
        "sequence {seq}: block id {block} is out of range: the KV cache has {num_blocks} blocks"
    )]
    BlockOutOfRange {
        seq: usize,
        block: u32,
        num_blocks: usize,
    },
    #[error("{flags} logits flags for {sequences} sequences")]
    LogitsFlags { flags: usize, sequences: usize },
    #[error("the KV cache shape {got:?} does not fit the model ({want})")]
    KvShapeMismatch { got: KvShape, want: String },
}

/// A tensor as stored: type, ggml dims (`dims[0]` contiguous) and bytes.
#[derive(Clone)]
pub struct RawTensor {
    pub ty: GgmlType,
    pub dims: Vec<usize>,
    pub bytes: WeightBytes,
}

/// Every tensor of a GGUF file by name; the bytes stay in the file's map.
pub fn gguf_tensors(file: &GgufFile) -> HashMap<String, RawTensor> {
    file.tensors()
        .iter()
        .map(|info| {
            let tensor = RawTensor {
                ty: info.ty,
                dims: info.dims.iter().map(|&d| d as usize).collect(),
                bytes: WeightBytes::Mapped {
                    file: file.bytes().clone(),
                    start: info.offset as usize,
                    len: info.n_bytes as usize,
                },
            };
            (info.name.clone(), tensor)
        })
        .collect()
}

/// A checkpoint's tensors by GGUF name, looked up with the shape the model
/// expects: the one weight-table loader of the CPU and CUDA models.
pub struct WeightTable<'a> {
    /// The checkpoint, for errors.
    pub source_name: &'a str,
    pub tensors: &'a HashMap<String, RawTensor>,
}

impl WeightTable<'_> {
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor `name`, which must have ggml dims `want`.
    fn get(&self, name: &str, want: Vec<usize>) -> Result<&RawTensor, ModelError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                source_name: self.source_name.to_string(),
                tensor: name.to_string(),
            })?;
        if t.dims != want {
            return Err(ModelError::TensorShape {
                source_name: self.source_name.to_string(),
                tensor: name.to_string(),
                got: t.dims.clone(),
                want,
            });
        }
        Ok(t)
    }

    /// Matrix `name` of `rows` × `cols` (ggml dims `[cols, rows]`), as stored.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, ModelError> {
        let t = self.get(name, vec![cols, rows])?;
        Ok(QMatrix::new(name, t.ty, rows, cols, t.bytes.clone())?)
    }

    /// Vector `name` of `n` values, dequantized.
    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.get(name, vec![n])?;
        let m = QMatrix::new(name, t.ty, 1, n, t.bytes.clone())?;
        let mut out = vec![0f32; n];
        m.dequantize_row(0, &mut out);
        Ok(out)
    }

    /// Matrix `name` of `rows` × `cols`, dequantized row-major.
    pub fn matrix_f32(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>, ModelError> {
        let m = self.matrix(name, rows, cols)?;
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            m.dequantize_row(r, row);
        }
        Ok(out)
    }
}

/// One sequence's part of a forward batch.
#[derive(Debug, Clone, Copy)]
pub struct SequenceInput<'a> {
    /// Tokens to run now (a prompt, a prefill chunk or one decode token).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions before it must already be in the
    /// cache through `block_table`.
    pub start_pos: usize,
    /// Block ids holding positions `[i * block_size, (i+1) * block_size)`;
    /// must cover `start_pos + tokens.len()` positions.
    pub block_table: &'a [u32],
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor<'a> {
    /// The last new token of each sequence: `vocab` values per sequence.
    LastToken,
    /// Every new token: `tokens.len() * vocab` values per sequence.
    AllTokens,
    /// The last new token of sequence `i` when `wanted[i]`, nothing (an
    /// empty vector) otherwise: a prefill chunk that does not end its prompt
    /// needs no logits, and the output projection is the largest matmul.
    LastTokenOf(&'a [bool]),
}

impl LogitsFor<'_> {
    /// How many logit rows sequence `s` of `n_tokens` new tokens gets.
    pub(crate) fn rows(&self, s: usize, n_tokens: usize) -> usize {
        match self {
            Self::LastToken => 1,
            Self::AllTokens => n_tokens,
            Self::LastTokenOf(wanted) => usize::from(wanted[s]),
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>, // [hidden]
    wq: QMatrix,         // [q_dim, hidden]
    wk: QMatrix,         // [kv_dim, hidden]
    wv: QMatrix,         // [kv_dim, hidden]
    wo: QMatrix,         // [hidden, q_dim]
    ffn_norm: Vec<f32>,  // [hidden]
    w_gate: QMatrix,     // [ffn, hidden]
    w_up: QMatrix,       // [ffn, hidden]
    w_down: QMatrix,     // [hidden, ffn]
}

/// A loaded Llama model, ready to run batches.
pub struct Model {
    config: ModelConfig,
    embed: QMatrix, // [vocab, hidden]
    layers: Vec<Layer>,
    norm: Vec<f32>,  // [hidden]
    output: QMatrix, // [vocab, hidden]
    rope_freqs: Vec<f32>,
    activations: Activations,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

impl Model {
    /// Opens a GGUF file and loads the model from it (weights stay mapped).
    pub fn load_gguf(path: &Path) -> Result<Self, ModelError> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// Loads the model from a parsed GGUF file; the weights keep the file's
    /// map alive.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(file)?;
        Self::from_tensors(config, file.path(), &gguf_tensors(file))
    }

    /// Builds the model from tensors named as in GGUF (`token_embd.weight`,
    /// `blk.{i}.attn_q.weight`, …); `source_name` is used in errors.
    pub fn from_tensors(
        config: ModelConfig,
        source_name: &str,
        tensors: &HashMap<String, RawTensor>,
    ) -> Result<Self, ModelError> {
        let table = WeightTable {
            source_name,
            tensors,
        };
        let matrix = |name: &str, rows: usize, cols: usize| table.matrix(name, rows, cols);
        let vector = |name: &str, n: usize| table.vector(name, n);
        let c = &config;
        let (h, q, kv) = (c.hidden, c.q_dim(), c.kv_dim());
        let embed = matrix("token_embd.weight", c.vocab, h)?;
        let output = if table.contains("output.weight") {
            matrix("output.weight", c.vocab, h)?
        } else {
            embed.clone()
        };
        let layers = (0..c.n_layers)
            .map(|i| {
                let n = |s: &str| format!("blk.{i}.{s}.weight");
                Ok(Layer {
                    attn_norm: vector(&n("attn_norm"), h)?,
                    wq: matrix(&n("attn_q"), q, h)?,
                    wk: matrix(&n("attn_k"), kv, h)?,
                    wv: matrix(&n("attn_v"), kv, h)?,
                    wo: matrix(&n("attn_output"), h, q)?,
                    ffn_norm: vector(&n("ffn_norm"), h)?,
                    w_gate: matrix(&n("ffn_gate"), c.ffn, h)?,
                    w_up: matrix(&n("ffn_up"), c.ffn, h)?,
                    w_down: matrix(&n("ffn_down"), h, c.ffn)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        layers
            .par_iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
            .chain([&output].into_par_iter())
            .for_each(QMatrix::prepare);
        Ok(Self {
            norm: vector("output_norm.weight", h)?,
            rope_freqs: ops::rope_freqs(c.head_dim, c.rope_base),
            config,
            embed,
            layers,
            output,
            activations: Activations::Q8,
        })
    }

    /// Chooses how activations meet quantized weights (default
    /// [`Activations::Q8`]; [`Activations::F32`] for reference checks).
    pub fn set_activations(&mut self, activations: Activations) {
        self.activations = activations;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The shape of a KV cache for this model.
    pub fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        KvShape::for_model(&self.config, num_blocks, block_size)
    }

    /// Runs one step for a batch of sequences: writes the new tokens' K/V
    /// into their blocks and returns logits per sequence (see [`LogitsFor`]).
    pub fn forward(
        &self,
        kv: &mut KvStorage,
        batch: &[SequenceInput<'_>],
        logits_for: LogitsFor<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        validate_batch(&self.config, kv.shape(), batch, logits_for)?;
        // The whole step on a worker of the thread pool: its products and
        // attention then fan out to the other workers directly, where from
        // any other thread each of the step's ~250 parallel parts would be
        // queued into the pool and the caller put to sleep until it ends.
        Ok(rayon::scope(|_| {
            self.forward_in_pool(kv, batch, logits_for)
        }))
    }

    /// [`Model::forward`] on a pool worker, once the batch is validated.
    fn forward_in_pool(
        &self,
        kv: &mut KvStorage,
        batch: &[SequenceInput<'_>],
        logits_for: LogitsFor<'_>,
    ) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (h, vocab) = (c.hidden, c.vocab);
        // One entry per new token of the batch: (sequence, position).
        let tokens: Vec<(usize, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(s, seq)| (0..seq.tokens.len()).map(move |i| (s, seq.start_pos + i)))
            .collect();
        let n = tokens.len();

        let mut x = vec![0f32; n * h]; // [n, hidden]
        for (row, id) in x
            .chunks_exact_mut(h)
            .zip(batch.iter().flat_map(|s| s.tokens))
        {
            self.embed.dequantize_row(*id as usize, row);
        }
        let mut scratch = Scratch::new(c, n);
        for (l, layer) in self.layers.iter().enumerate() {
            self.layer(l, layer, &mut x, &tokens, batch, kv, &mut scratch);
        }

        // Rows that get logits, then final norm and output projection.
        let mut picked: Vec<usize> = Vec::new();
        let mut first = 0;
        for (s, seq) in batch.iter().enumerate() {
            let n_tokens = seq.tokens.len();
            picked.extend(first + n_tokens - logits_for.rows(s, n_tokens)..first + n_tokens);
            first += n_tokens;
        }
        let mut xn = vec![0f32; picked.len() * h]; // [picked, hidden]
        for (out, &t) in xn.chunks_exact_mut(h).zip(&picked) {
            ops::rms_norm(&x[t * h..(t + 1) * h], &self.norm, c.rms_eps, out);
        }
        let mut logits = vec![0f32; picked.len() * vocab]; // [picked, vocab]
        self.output
            .matmul_with(&xn, picked.len(), &mut logits, self.activations);

        let mut out = Vec::with_capacity(batch.len());
        let mut rest = logits.as_slice();
        for (s, seq) in batch.iter().enumerate() {
            let rows = logits_for.rows(s, seq.tokens.len());
            let (mine, tail) = rest.split_at(rows * vocab);
            out.push(mine.to_vec());
            rest = tail;
        }
        out
    }

    /// One transformer block over all `n` tokens of the batch, in place on
    /// the residual stream `x` (`[n, hidden]`).
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        l: usize,
        w: &Layer,
        x: &mut [f32],
        tokens: &[(usize, usize)],
        batch: &[SequenceInput<'_>],
        kv: &mut KvStorage,
        scratch: &mut Scratch,
    ) {
        let c = &self.config;
        let (h, n) = (c.hidden, tokens.len());
        let (qd, kvd, bs) = (c.q_dim(), c.kv_dim(), kv.block_size());
        let mm =
            |m: &QMatrix, x: &[f32], out: &mut [f32]| m.matmul_with(x, n, out, self.activations);
        let rope =
            |x: &mut [f32], pos| ops::rope(x, c.head_dim, pos, &self.rope_freqs, c.rope_style);
        let Scratch {
            xn,
            q,
            k,
            v,
            attn,
            o,
            gate,
            up,
        } = scratch;

        // Attention: project, rotate, append K/V to the cache, attend.
        rms_norm_rows(x, &w.attn_norm, c.rms_eps, xn, h);
        let each = |mats: &[&QMatrix], x: &[f32], outs: &mut [&mut [f32]]| {
            QMatrix::matmul_each(mats, x, n, outs, self.activations)
        };
        each(
            &[&w.wq, &w.wk, &w.wv],
            xn,
            &mut [&mut q[..], &mut k[..], &mut v[..]],
        );
        for (t, &(s, pos)) in tokens.iter().enumerate() {
            rope(&mut q[t * qd..(t + 1) * qd], pos);
            rope(&mut k[t * kvd..(t + 1) * kvd], pos);
            let block = batch[s].block_table[pos / bs] as usize;
            kv.write_slot(l, KvKind::K, block, pos % bs, &k[t * kvd..(t + 1) * kvd]);
            kv.write_slot(l, KvKind::V, block, pos % bs, &v[t * kvd..(t + 1) * kvd]);
        }
        self.attention(l, q, tokens, batch, kv, attn);
        mm(&w.wo, attn, o);
        add(x, o);

        // Feed-forward (SwiGLU).
        rms_norm_rows(x, &w.ffn_norm, c.rms_eps, xn, h);
        each(&[&w.w_gate, &w.w_up], xn, &mut [&mut gate[..], &mut up[..]]);
        ops::swiglu(gate, up);
        mm(&w.w_down, gate, o);
        add(x, o);
    }

    /// Causal attention of every new token over its sequence's cached K/V
    /// (which already holds the new tokens): a prefill chunk in tiles, a
    /// decode token's heads by KV group (or by parts of a group, when the
    /// groups are too few for the threads), elsewhere one task per (token,
    /// head); all give the same bits.
    fn attention(
        &self,
        l: usize,
        q: &[f32],
        tokens: &[(usize, usize)],
        batch: &[SequenceInput<'_>],
        kv: &KvStorage,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let simd = simd_available();
        // On AVX-512: a sequence with many new tokens (a prefill chunk) on
        // the tiled kernel, the rest by KV group; elsewhere one head at a
        // time (all three give the same bits).
        let mut tiled = vec![false; tokens.len()];
        #[cfg(target_arch = "x86_64")]
        let avx512 = super::cpu::kernels() == super::cpu::Kernels::Avx512 && hd.is_multiple_of(16);
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            let mut t = 0;
            while t < tokens.len() {
                let s = tokens[t].0;
                let e = t + tokens[t..].iter().take_while(|x| x.0 == s).count();
                if e - t >= TILED_ATTENTION_MIN {
                    self.prefill_attention(l, q, &tokens[t..e], t, batch[s].block_table, kv, out);
                    tiled[t..e].fill(true);
                }
                t = e;
            }
        }
        // The rest (decode steps): on AVX-512, the query heads that share a
        // KV head attend together, each key and value read once for them.
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            let untiled = tiled.iter().filter(|t| !**t).count();
            let small = self.small_attention(tokens, &tiled);
            if !small && untiled * c.n_kv_heads < 2 * rayon::current_num_threads() {
                // Too few groups to keep every thread busy (a step of one
                // or two sequences): split each group's work instead.
                self.split_attention(l, q, tokens, batch, kv, &tiled, out);
                return;
            }
            let one_task = |scores: &mut Vec<f32>, (i, o): (usize, &mut [f32])| {
                let first = i * group;
                let (t, head) = (first / c.n_heads, first % c.n_heads);
                if tiled[t] {
                    return;
                }
                let (s, pos) = tokens[t];
                let table = batch[s].block_table;
                let g = head / group;
                let key_value = kv_reader(kv, l, table, g * hd..(g + 1) * hd);
                // SAFETY: `kernels()` said Avx512.
                unsafe {
                    super::cpu::avx512::attend_group(
                        &q[first * hd..(first + group) * hd],
                        hd,
                        pos + 1,
                        scale,
                        key_value,
                        scores,
                        o,
                    )
                };
            };
            if small {
                let mut scores = Vec::new();
                out.chunks_mut(group * hd)
                    .enumerate()
                    .for_each(|item| one_task(&mut scores, item));
            } else {
                out.par_chunks_mut(group * hd)
                    .enumerate()
                    .for_each_init(Vec::new, one_task);
            }
            return;
        }
        let one_head = |scores: &mut Vec<f32>, (i, o): (usize, &mut [f32])| {
            let (t, head) = (i / c.n_heads, i % c.n_heads);
            let (s, pos) = tokens[t];
            let table = batch[s].block_table;
            let key_value = kv_reader(kv, l, table, (head / group) * hd..(head / group + 1) * hd);
            let qh = &q[i * hd..(i + 1) * hd];
            ops::attend(qh, pos + 1, scale, key_value, scores, o, simd);
        };
        if self.small_attention(tokens, &tiled) {
            let mut scores = Vec::new();
            out.chunks_mut(hd)
                .enumerate()
                .for_each(|item| one_head(&mut scores, item));
        } else {
            out.par_chunks_mut(hd)
                .enumerate()
                .for_each_init(Vec::new, one_head);
        }
    }

    /// The decode attention (the `tokens` not `tiled`) when its KV groups
    /// are too few to keep every thread busy: each group's positions are
    /// split between tasks for the scores, then its columns for the
    /// values, so every thread has work and each key and value is read
    /// once for the group's heads. The same bits as one task per group
    /// (`avx512::score_keys` and `weigh_columns` say why), at two fork-joins
    /// instead of one.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn split_attention(
        &self,
        l: usize,
        q: &[f32],
        tokens: &[(usize, usize)],
        batch: &[SequenceInput<'_>],
        kv: &KvStorage,
        tiled: &[bool],
        out: &mut [f32],
    ) {
        use super::cpu::avx512::{score_keys_group, weigh_columns_group};
        let c = &self.config;
        let (hd, nh) = (c.head_dim, c.n_heads);
        let group = nh / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // (token, KV group) pairs, and how many parts each is split into.
        let units: Vec<(usize, usize)> = (0..tokens.len())
            .filter(|&t| !tiled[t])
            .flat_map(|t| (0..c.n_kv_heads).map(move |g| (t, g)))
            .collect();
        let parts = (2 * rayon::current_num_threads()).div_ceil(units.len().max(1));
        let len = |t: usize| tokens[t].1 + 1;
        let part = |n: usize, p: usize, of: usize| n * p / of..n * (p + 1) / of;
        let reader = |t: usize, g: usize| {
            kv_reader(kv, l, batch[tokens[t].0].block_table, g * hd..(g + 1) * hd)
        };
        let heads = |t: usize, g: usize| (t * nh + g * group) * hd..(t * nh + (g + 1) * group) * hd;
        // The scores: for each unit and part, a row of the part's positions
        // per head, one after the other.
        let mut total = 0;
        let offsets: Vec<usize> = units
            .iter()
            .map(|&(t, _)| {
                let start = total;
                total += group * len(t);
                start
            })
            .collect();
        let mut scores = vec![0f32; total];
        let mut tasks = Vec::with_capacity(units.len() * parts);
        let mut rest = &mut scores[..];
        for &(t, g) in &units {
            for p in 0..parts {
                let keys = part(len(t), p, parts);
                let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(group * keys.len());
                rest = tail;
                tasks.push((t, g, keys, chunk));
            }
        }
        tasks.into_par_iter().for_each(|(t, g, keys, chunk)| {
            // SAFETY: the caller checked `kernels()` said Avx512.
            unsafe {
                score_keys_group(
                    &q[heads(t, g)],
                    hd,
                    len(t),
                    scale,
                    reader(t, g),
                    keys,
                    chunk,
                )
            }
        });
        // The values: each unit's rows put together and softmaxed, then a
        // share of its columns weighed (whole 16-lane chunks). Every column
        // task softmaxes its own copy of the unit's rows (a few thousand
        // exponentials), which costs less than a third fork-join would.
        let chunks = hd / 16;
        let col_parts = parts.min(chunks).max(1);
        let weighed: Vec<(usize, std::ops::Range<usize>, Vec<f32>)> = (0..units.len())
            .flat_map(|u| (0..col_parts).map(move |cp| (u, cp)))
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(u, cp)| {
                let (t, g) = units[u];
                let n = len(t);
                let unit = &scores[offsets[u]..offsets[u] + group * n];
                let mut probs = vec![0f32; group * n];
                for p in 0..parts {
                    let keys = part(n, p, parts);
                    let chunk = &unit[group * keys.start..group * keys.end];
                    for (i, row) in chunk.chunks_exact(keys.len().max(1)).enumerate() {
                        probs[i * n + keys.start..i * n + keys.end].copy_from_slice(row);
                    }
                }
                for row in probs.chunks_mut(n) {
                    ops::softmax(row, true);
                }
                let c = part(chunks, cp, col_parts);
                let cols = 16 * c.start..16 * c.end;
                let mut o = vec![0f32; group * hd];
                // SAFETY: as above.
                unsafe { weigh_columns_group(reader(t, g), hd, n, cols.clone(), &probs, &mut o) };
                (u, cols, o)
            })
            .collect();
        for (u, cols, o) in weighed {
            let (t, g) = units[u];
            let first = heads(t, g).start;
            for i in 0..group {
                out[first + i * hd + cols.start..first + i * hd + cols.end]
                    .copy_from_slice(&o[i * hd + cols.start..i * hd + cols.end]);
            }
        }
    }

    /// Whether the attention of the `tokens` not `tiled` is too little
    /// work to fan out: below a few thousand (query head, key) pairs,
    /// threads cost more than they save.
    fn small_attention(&self, tokens: &[(usize, usize)], tiled: &[bool]) -> bool {
        let work: usize = tokens
            .iter()
            .zip(tiled)
            .filter(|(_, tiled)| !**tiled)
            .map(|(&(_, pos), _)| pos + 1)
            .sum::<usize>()
            * self.config.n_heads;
        work < 4096
    }

    /// Attention of one sequence's new tokens `toks` (rows `first..` of
    /// `q` and `out`) on the tiled AVX-512 kernel: tiles of 4 tokens per
    /// head, in parallel, each key and value read once per tile.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn prefill_attention(
        &self,
        l: usize,
        q: &[f32],
        toks: &[(usize, usize)],
        first: usize,
        table: &[u32],
        kv: &KvStorage,
        out: &mut [f32],
    ) {
        use super::cpu::avx512::attend;
        let c = &self.config;
        let (hd, nh) = (c.head_dim, c.n_heads);
        let (group, qd) = (nh / c.n_kv_heads, nh * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let rows = first * qd..(first + toks.len()) * qd;
        out[rows.clone()]
            .par_chunks_mut(4 * qd)
            .zip(q[rows].par_chunks(4 * qd))
            .zip(toks.par_chunks(4))
            .for_each_init(Vec::new, |scores, ((o, qt), tt)| {
                for h in 0..nh {
                    let dims = h * hd..(h + 1) * hd;
                    let key_value = kv_reader(kv, l, table, (h / group) * hd..(h / group + 1) * hd);
                    let mut qs = qt.chunks(qd).map(|r| &r[dims.clone()]);
                    let mut os = o.chunks_mut(qd).map(|r| &mut r[dims.clone()]);
                    if let [t0, t1, t2, t3] = tt {
                        let lens = [t0.1 + 1, t1.1 + 1, t2.1 + 1, t3.1 + 1];
                        // 4 tokens: 4 rows of each (the defaults are never taken).
                        let qs = std::array::from_fn(|_| qs.next().unwrap_or_default());
                        let os = std::array::from_fn(|_| os.next().unwrap_or_default());
                        // SAFETY: `kernels()` said Avx512 (the caller).
                        unsafe { attend(qs, lens, scale, key_value, scores, os) };
                    } else {
                        for ((qk, ok), t) in qs.zip(os).zip(tt) {
                            // SAFETY: as above.
                            unsafe { attend([qk], [t.1 + 1], scale, key_value, scores, [ok]) };
                        }
                    }
                }
            });
    }
}

/// A step's activations between the layers' operations, allocated once per
/// step for its `n` tokens and reused by every layer (each operation
/// overwrites its output whole).
struct Scratch {
    xn: Vec<f32>,   // [n, hidden]
    q: Vec<f32>,    // [n, n_heads * head_dim]
    k: Vec<f32>,    // [n, n_kv_heads * head_dim]
    v: Vec<f32>,    // [n, n_kv_heads * head_dim]
    attn: Vec<f32>, // [n, n_heads * head_dim]
    o: Vec<f32>,    // [n, hidden]
    gate: Vec<f32>, // [n, ffn]
    up: Vec<f32>,   // [n, ffn]
}

impl Scratch {
    fn new(c: &ModelConfig, n: usize) -> Scratch {
        let (h, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        Scratch {
            xn: vec![0f32; n * h],
            q: vec![0f32; n * qd],
            k: vec![0f32; n * kvd],
            v: vec![0f32; n * kvd],
            attn: vec![0f32; n * qd],
            o: vec![0f32; n * h],
            gate: vec![0f32; n * c.ffn],
            up: vec![0f32; n * c.ffn],
        }
    }
}

/// New tokens of one sequence in a step from which its attention runs on
/// the tiled AVX-512 kernel (the same results as one query at a time).
#[cfg(target_arch = "x86_64")]
const TILED_ATTENTION_MIN: usize = 8;

/// The keys and values of one KV head (`dims`) in layer `l`, read in place
/// from the paged cache through the sequence's block `table`.
fn kv_reader<'a>(
    kv: &'a KvStorage,
    l: usize,
    table: &'a [u32],
    dims: std::ops::Range<usize>,
) -> PagedKv<'a> {
    let shape = kv.shape();
    PagedKv {
        keys: kv.layer(l, KvKind::K),
        values: kv.layer(l, KvKind::V),
        table,
        block_size: kv.block_size(),
        block_elems: shape.block_elems(),
        token_elems: shape.token_elems(),
        dims: (dims.start, dims.end),
    }
}

/// A [`KvSource`] over the paged cache: a block's positions lie at one
/// stride (a token's row), so the kernels look a block up once and walk
/// its positions.
#[derive(Clone, Copy)]
struct PagedKv<'a> {
    keys: &'a [KvElem],
    values: &'a [KvElem],
    table: &'a [u32],
    block_size: usize,
    block_elems: usize,
    token_elems: usize,
    /// The head's elements of a token's row.
    dims: (usize, usize),
}

impl<'a> KvSource<'a> for PagedKv<'a> {
    #[inline]
    fn run(self, j: usize) -> Run<'a> {
        let (block, slot) = (j / self.block_size, j % self.block_size);
        let n = self.block_size - slot;
        let first = self.table[block] as usize * self.block_elems + slot * self.token_elems;
        let span = first + self.dims.0..first + (n - 1) * self.token_elems + self.dims.1;
        Run {
            keys: &self.keys[span.clone()],
            values: &self.values[span],
            stride: self.token_elems,
            n,
        }
    }
}

fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], width: usize) {
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        ops::rms_norm(xr, weight, eps, or);
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Index of the largest value (first on ties); `None` for an empty slice.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    logits
        .iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// The checks of a step's inputs every backend runs before trusting them:
/// KV shape, token ids, context length, block tables and logits flags.
pub(crate) fn validate_batch(
    c: &ModelConfig,
    shape: KvShape,
    batch: &[SequenceInput<'_>],
    logits_for: LogitsFor<'_>,
) -> Result<(), ModelError> {
    if shape.n_layers != c.n_layers
        || shape.n_kv_heads != c.n_kv_heads
        || shape.head_dim != c.head_dim
    {
        return Err(ModelError::KvShapeMismatch {
            got: shape,
            want: format!(
                "{} layers, {} KV heads of dim {}",
                c.n_layers, c.n_kv_heads, c.head_dim
            ),
        });
    }
    validate_sequences(c, shape, batch, logits_for)
}

/// The checks of [`validate_batch`] that do not tie the KV cache to the
/// model's layers and heads (the simulated model keeps a smaller cache):
/// token ids, context length, block tables against `shape`'s blocks, and
/// logits flags.
pub(crate) fn validate_sequences(
    c: &ModelConfig,
    shape: KvShape,
    batch: &[SequenceInput<'_>],
    logits_for: LogitsFor<'_>,
) -> Result<(), ModelError> {
    if batch.is_empty() {
        return Err(ModelError::EmptyBatch);
    }
    if let LogitsFor::LastTokenOf(w) = logits_for
        && w.len() != batch.len()
    {
        return Err(ModelError::LogitsFlags {
            flags: w.len(),
            sequences: batch.len(),
        });
    }
    for (s, seq) in batch.iter().enumerate() {
        if seq.tokens.is_empty() {
            return Err(ModelError::EmptySequence { seq: s });
        }
        if let Some((index, &token)) = seq
            .tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= c.vocab)
        {
            return Err(ModelError::UnknownToken {
                seq: s,
                index,
                token,
                vocab: c.vocab,
            });
        }
        let end = seq.start_pos.saturating_add(seq.tokens.len());
        if end > c.context_length {
            return Err(ModelError::ContextOverflow {
                seq: s,
                start: seq.start_pos,
                end,
                context_length: c.context_length,
            });
        }
        let bs = shape.block_size;
        let needed = end.div_ceil(bs);
        if seq.block_table.len() < needed {
            return Err(ModelError::BlockTableTooShort {
                seq: s,
                blocks: seq.block_table.len(),
                block_size: bs,
                covered: seq.block_table.len() * bs,
                needed: end,
            });
        }
        if let Some(&block) = seq.block_table[..needed]
            .iter()
            .find(|&&b| b as usize >= shape.num_blocks)
        {
            return Err(ModelError::BlockOutOfRange {
                seq: s,
                block,
                num_blocks: shape.num_blocks,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_data;

    /// The paged reader walks a sequence's positions a block at a time;
    /// attention through it equals attention that looks every position up
    /// on its own, bit for bit, on every kernel: blocks of a size that is
    /// no power of two, scattered, the last one partly used, the second
    /// KV head of two.
    #[test]
    fn attention_over_block_runs_equals_one_position_at_a_time() {
        let shape = KvShape {
            n_layers: 2,
            num_blocks: 6,
            block_size: 3,
            n_kv_heads: 2,
            head_dim: 32,
        };
        let mut kv = KvStorage::new(shape).unwrap();
        for block in 0..shape.num_blocks {
            for slot in 0..shape.block_size {
                for kind in [KvKind::K, KvKind::V] {
                    let seed = (block * 10 + slot) as u32 * 2 + kind as u32;
                    kv.write_slot(1, kind, block, slot, &test_data(shape.token_elems(), seed));
                }
            }
        }
        let table = [4u32, 1, 5, 0];
        let (hd, len) = (shape.head_dim, 11);
        let dims = hd..2 * hd;
        let one_at_a_time = |j: usize| {
            let block = table[j / 3] as usize;
            (
                &kv.slot(1, KvKind::K, block, j % 3)[dims.clone()],
                &kv.slot(1, KvKind::V, block, j % 3)[dims.clone()],
            )
        };
        let paged = kv_reader(&kv, 1, &table, dims.clone());
        let q = test_data(hd, 99);
        let mut scores = Vec::new();
        for simd in [false, simd_available()] {
            let (mut by_run, mut by_position) = (vec![0f32; hd], vec![0f32; hd]);
            ops::attend(&q, len, 0.17, paged, &mut scores, &mut by_run, simd);
            ops::attend(
                &q,
                len,
                0.17,
                one_at_a_time,
                &mut scores,
                &mut by_position,
                simd,
            );
            assert_eq!(by_run, by_position, "simd {simd}");
        }
        #[cfg(target_arch = "x86_64")]
        if super::super::cpu::avx512::available() {
            let (mut by_run, mut by_position) = (vec![0f32; hd], vec![0f32; hd]);
            // SAFETY: `available()` said the CPU has the features.
            unsafe {
                super::super::cpu::avx512::attend(
                    [&q],
                    [len],
                    0.17,
                    paged,
                    &mut scores,
                    [&mut by_run],
                );
                super::super::cpu::avx512::attend(
                    [&q],
                    [len],
                    0.17,
                    one_at_a_time,
                    &mut scores,
                    [&mut by_position],
                );
            }
            assert_eq!(by_run, by_position);
        }
    }
}
