//! `--device sim`: a simulated model for running many workers on one
//! machine (the planner, the router and the bus at scale). [`SimModel`]
//! implements [`ForwardModel`], so the engine around it is the real one —
//! tokenizer, scheduler, block pool, prefix caching, KV events, remote
//! prefill — and only the forward pass is replaced:
//!
//! - **Time**: each step sleeps for what the [`SimProfile`] says a real
//!   step of that batch takes (see [`profile`]); no CPU is spent.
//! - **KV**: the cache has one layer of one head of dimension two, so a
//!   block is `block_size` × 8 bytes whatever the model; a prefill writes
//!   each position's token id (K) and position (V) into it, as the raw bits
//!   of two f16 elements (low and high 16 bits). A NIXL transfer
//!   therefore moves real (tiny) block bytes between simulated workers.
//! - **Tokens**: the next token is a hash of the context as read back from
//!   the KV cache, mapped onto the tokens of [`SIM_OUTPUT_TEXT`]. Output is
//!   deterministic, reads as "simulated … sim … output", never as an answer,
//!   and depends on the transferred KV: a remote prefill that wrote the
//!   wrong blocks decodes differently from a local one.
//!
//! It is never the only test of a path: it says nothing about numerics,
//! real memory use or real kernels. Every output of a simulated worker is
//! labelled (see `docs/sim.md`).

pub mod profile;

use super::config::{ConfigError, ModelConfig};
use super::forward::ForwardModel;
use super::gguf::GgufFile;
use super::kv_storage::{KvElem, KvKind, KvShape, KvStorage};
use super::model::{LogitsFor, ModelError, SequenceInput, validate_sequences};
use super::tokenizer::{Tokenizer, TokenizerError};

pub use profile::{SimProfile, SimProfileError};

/// How a simulated worker names its device: `--device sim`, the `device`
/// label of `xpyd_engine_info`, and the instance record's `devices`.
pub use xpyd_api::SIM_DEVICE;

/// The text whose tokens a simulated model generates, in an order the
/// context decides.
pub const SIM_OUTPUT_TEXT: &str = " simulated sim output";

/// The logit of every token but the chosen one: far enough below that any
/// sampler (temperature, top-p, penalties) picks the chosen token.
const FLOOR_LOGIT: f32 = -1e9;

/// The simulated model cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("the sim output text {0:?} has no token the model can emit")]
    EmptyPalette(String),
}

/// A model whose forward pass is a timing model; see the module doc.
#[derive(Debug, Clone)]
pub struct SimModel {
    config: ModelConfig,
    profile: SimProfile,
    /// The tokens it generates.
    palette: Vec<u32>,
}

impl SimModel {
    /// A simulated model of shape `config` that times steps by `profile`
    /// and generates tokens of `palette` (ids in the vocabulary; empty:
    /// any id).
    pub fn new(config: ModelConfig, profile: SimProfile, palette: Vec<u32>) -> SimModel {
        let palette = palette
            .into_iter()
            .filter(|&t| (t as usize) < config.vocab)
            .collect();
        SimModel {
            config,
            profile,
            palette,
        }
    }

    /// The simulated model of a GGUF checkpoint: its shape and tokenizer
    /// are read, its weights never are.
    pub fn from_gguf(file: &GgufFile, profile: SimProfile) -> Result<SimModel, SimError> {
        let config = ModelConfig::from_gguf(file)?;
        let palette = palette(&Tokenizer::from_gguf(file)?)?;
        Ok(SimModel::new(config, profile, palette))
    }

    pub fn profile(&self) -> &SimProfile {
        &self.profile
    }

    /// The KV cache of a simulated model, whatever the model: one layer,
    /// one KV head of dimension two (a token's placeholder, see
    /// [`put_u32`]).
    pub fn kv_shape_for(num_blocks: usize, block_size: usize) -> KvShape {
        KvShape {
            n_layers: 1,
            num_blocks,
            block_size,
            n_kv_heads: 1,
            head_dim: 2,
        }
    }

    /// The token after a context whose KV hashes to `hash`.
    fn token_for(&self, hash: u64) -> u32 {
        if self.palette.is_empty() {
            (hash % self.config.vocab as u64) as u32
        } else {
            self.palette[(hash % self.palette.len() as u64) as usize]
        }
    }
}

/// The distinct tokens of [`SIM_OUTPUT_TEXT`] under `tokenizer`, without
/// EOS (a simulated request ends by length or stop strings, never by EOS).
pub fn palette(tokenizer: &Tokenizer) -> Result<Vec<u32>, SimError> {
    let mut ids = tokenizer.encode(SIM_OUTPUT_TEXT)?;
    ids.retain(|&t| Some(t) != tokenizer.eos_token_id());
    let mut seen = std::collections::HashSet::new();
    ids.retain(|t| seen.insert(*t));
    if ids.is_empty() {
        return Err(SimError::EmptyPalette(SIM_OUTPUT_TEXT.to_string()));
    }
    Ok(ids)
}

/// `v` as the bits of a slot's two elements, low 16 bits first (not f16
/// numbers: an f16 holds integers exactly only up to 2,048).
fn put_u32(slot: &mut [KvElem], v: u32) {
    slot[0] = KvElem::from_bits(v as u16);
    slot[1] = KvElem::from_bits((v >> 16) as u16);
}

/// FNV-1a over the (K, V) placeholders of positions `0..end` of a sequence.
fn context_hash(kv: &KvStorage, table: &[u32], end: usize) -> u64 {
    let bs = kv.block_size();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for pos in 0..end {
        let block = table[pos / bs] as usize;
        for kind in [KvKind::K, KvKind::V] {
            for elem in kv.slot(0, kind, block, pos % bs) {
                for byte in elem.to_bits().to_le_bytes() {
                    h ^= u64::from(byte);
                    h = h.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
    }
    h
}

impl ForwardModel for SimModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        SimModel::kv_shape_for(num_blocks, block_size)
    }

    fn forward(
        &mut self,
        kv: &mut KvStorage,
        batch: &[SequenceInput<'_>],
        logits_for: LogitsFor<'_>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let started = std::time::Instant::now();
        validate_sequences(&self.config, kv.shape(), batch, logits_for)?;
        let bs = kv.block_size();
        let mut out = Vec::with_capacity(batch.len());
        for (s, seq) in batch.iter().enumerate() {
            for (i, &token) in seq.tokens.iter().enumerate() {
                let pos = seq.start_pos + i;
                let block = seq.block_table[pos / bs] as usize;
                put_u32(kv.slot_mut(0, KvKind::K, block, pos % bs), token);
                put_u32(kv.slot_mut(0, KvKind::V, block, pos % bs), pos as u32);
            }
            let n = seq.tokens.len();
            let rows = logits_for.rows(s, n);
            let vocab = self.config.vocab;
            let mut logits = vec![FLOOR_LOGIT; rows * vocab];
            for (r, row) in logits.chunks_exact_mut(vocab).enumerate() {
                let end = seq.start_pos + n - rows + r + 1;
                let token = self.token_for(context_hash(kv, seq.block_table, end));
                row[token as usize] = 0.0;
            }
            out.push(logits);
        }
        let step = self.profile.step_time(batch);
        if let Some(rest) = step.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::RopeStyle;
    use crate::engine::model::argmax;
    use std::time::{Duration, Instant};

    fn config() -> ModelConfig {
        ModelConfig {
            n_layers: 30,
            hidden: 576,
            ffn: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab: 1000,
            context_length: 4096,
            rope_base: 1e5,
            rms_eps: 1e-5,
            rope_style: RopeStyle::Adjacent,
        }
    }

    fn profile(prefill_token_ms: f64) -> SimProfile {
        SimProfile {
            name: "test".into(),
            source: String::new(),
            step_ms: 1.0,
            prefill_token_ms,
            prefill_attention_ns_per_pair: 0.0,
            decode_seq_ms: 0.0,
            decode_context_ns_per_token: 0.0,
        }
    }

    #[test]
    fn the_cache_is_tiny_whatever_the_model() {
        let sim = SimModel::new(config(), profile(0.0), vec![]);
        let shape = sim.kv_shape(1024, 16);
        // 1024 blocks of 16 tokens: 128 KiB, where the real model's KV
        // would be 30 layers × 3 heads × 64 dims of K and V per token.
        let kv = KvStorage::new(shape).unwrap();
        assert_eq!(shape.block_region_bytes() * 2 * shape.n_layers, 16 * 8);
        assert_eq!(kv.num_blocks(), 1024);
    }

    #[test]
    fn a_step_takes_at_least_the_profiled_time() {
        let mut sim = SimModel::new(config(), profile(0.2), vec![5, 6, 7]);
        let mut kv = KvStorage::new(sim.kv_shape(64, 16)).unwrap();
        let table: Vec<u32> = (0..64).collect();
        let tokens = vec![9u32; 250];
        let batch = [SequenceInput {
            tokens: &tokens,
            start_pos: 0,
            block_table: &table,
        }];
        let t = Instant::now();
        let logits = sim.forward(&mut kv, &batch, LogitsFor::LastToken).unwrap();
        // 1 ms + 250 × 0.2 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(51),
            "{:?}",
            t.elapsed()
        );
        let token = argmax(&logits[0]).unwrap() as u32;
        assert!([5, 6, 7].contains(&token), "{token}");
        // Bad input is still an error.
        let bad = vec![5000u32];
        let err = sim
            .forward(
                &mut kv,
                &[SequenceInput {
                    tokens: &bad,
                    start_pos: 0,
                    block_table: &table,
                }],
                LogitsFor::LastToken,
            )
            .unwrap_err();
        assert!(matches!(err, ModelError::UnknownToken { .. }), "{err}");
    }

    /// Greedy generation of `n` tokens after `prompt`, the cache laid out
    /// by `table`.
    fn generate(sim: &mut SimModel, kv: &mut KvStorage, table: &[u32], prompt: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut next = prompt.to_vec();
        let mut pos = 0;
        for _ in 0..8 {
            let batch = [SequenceInput {
                tokens: &next,
                start_pos: pos,
                block_table: table,
            }];
            let logits = sim.forward(kv, &batch, LogitsFor::LastToken).unwrap();
            pos += next.len();
            let t = argmax(&logits[0]).unwrap() as u32;
            out.push(t);
            next = vec![t];
        }
        out
    }

    #[test]
    fn tokens_follow_the_context_in_the_cache_not_the_block_ids() {
        let mut sim = SimModel::new(config(), profile(0.0), (100..110).collect());
        let mut kv = KvStorage::new(sim.kv_shape(64, 4)).unwrap();
        let prompt: Vec<u32> = (1..30).collect();
        let a = generate(&mut sim, &mut kv, &(0..16).collect::<Vec<_>>(), &prompt);
        let b = generate(&mut sim, &mut kv, &(40..56).collect::<Vec<_>>(), &prompt);
        assert_eq!(a, b, "same context, other blocks");
        assert!(a.iter().all(|t| (100..110).contains(t)), "{a:?}");
        let mut other = prompt.clone();
        other[3] = 999;
        let c = generate(&mut sim, &mut kv, &(16..32).collect::<Vec<_>>(), &other);
        assert_ne!(a, c, "one prompt token changed");
        // The decode after a copied prompt KV (a remote prefill) follows the
        // copied bytes: corrupt one position and the first token changes.
        let table: Vec<u32> = (0..16).collect();
        let first = |kv: &mut KvStorage, sim: &mut SimModel| {
            let last = [prompt[prompt.len() - 1]];
            let batch = [SequenceInput {
                tokens: &last,
                start_pos: prompt.len() - 1,
                block_table: &table,
            }];
            argmax(&sim.forward(kv, &batch, LogitsFor::LastToken).unwrap()[0])
        };
        let mut fresh = KvStorage::new(sim.kv_shape(64, 4)).unwrap();
        for b in 0..8u32 {
            let bytes = kv.read_block(b).unwrap();
            fresh.write_block(b, &bytes).unwrap();
        }
        let want = first(&mut kv, &mut sim);
        assert_eq!(first(&mut fresh, &mut sim), want);
        let mut bytes = kv.read_block(2).unwrap();
        bytes[0] ^= 0x40;
        fresh.write_block(2, &bytes).unwrap();
        // Hash collisions onto ten tokens aside, the corrupted cache differs;
        // this prompt is fixed, so the assertion is deterministic.
        assert_ne!(first(&mut fresh, &mut sim), want);
    }
}
