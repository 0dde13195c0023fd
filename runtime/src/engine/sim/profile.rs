//! The timing model of the simulated engine: how long one engine step takes,
//! as a linear function of what the step computes, with coefficients from a
//! [`SimProfile`] (JSON).
//!
//! A step's time is
//!
//! ```text
//! step_ms
//!   + prefill_token_ms               × new prefill tokens
//!   + prefill_attention_ns_per_pair  × (new prefill token, earlier position) pairs / 1e6
//!   + decode_seq_ms                  × decoding sequences
//!   + decode_context_ns_per_token    × context tokens those sequences read / 1e6
//! ```
//!
//! which is the usual roofline picture: a fixed cost per step (weights read
//! once per step, launch overheads), matmul work per new token, and
//! attention work per (query, key) pair, quadratic in a prefill chunk and
//! linear in the context for a decode. A sequence with one new token is a
//! decode. [`measure`] times a real [`ForwardModel`] over a grid of batches
//! and [`fit`] turns the times into a profile (least squares, coefficients
//! kept non-negative). It is not the simulated model itself
//! ([`super::SimModel`]).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::forward::ForwardModel;
use crate::engine::kv_storage::KvStorage;
use crate::engine::model::{LogitsFor, ModelError, SequenceInput};

/// The default profile: the CPU engine on the bundled SmolLM2-135M (Q4_1),
/// measured on the 2-core development machine (see `docs/sim.md`).
pub const DEFAULT_PROFILE_JSON: &str = include_str!("default_profile.json");

/// Coefficients of the step-time model (see the module doc). Every field
/// is a finite, non-negative number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimProfile {
    /// What was measured (model, device, machine).
    pub name: String,
    /// Where the figures come from: the command that measured them, or the
    /// publication they are derived from.
    #[serde(default)]
    pub source: String,
    /// Milliseconds every step costs.
    pub step_ms: f64,
    /// Milliseconds per new prefill token.
    pub prefill_token_ms: f64,
    /// Nanoseconds per (new prefill token, position it attends to) pair.
    pub prefill_attention_ns_per_pair: f64,
    /// Milliseconds per decoding sequence in the step.
    pub decode_seq_ms: f64,
    /// Nanoseconds per context token a decoding sequence attends to.
    pub decode_context_ns_per_token: f64,
}

/// A profile cannot be read or makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum SimProfileError {
    #[error("cannot read the sim profile {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the sim profile {path} is not a valid profile: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("the sim profile {path}: {field} is {value}; it must be a finite number >= 0")]
    Invalid {
        path: String,
        field: &'static str,
        value: f64,
    },
}

/// What one step computes, as the timing model counts it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepWork {
    /// New tokens of prefill chunks (sequences with more than one new token).
    pub prefill_tokens: f64,
    /// (new prefill token, position it attends to) pairs.
    pub prefill_pairs: f64,
    /// Sequences with one new token.
    pub decode_seqs: f64,
    /// Positions those sequences attend to, summed.
    pub decode_context: f64,
}

impl StepWork {
    /// The work of one forward batch.
    pub fn of_batch(batch: &[SequenceInput<'_>]) -> StepWork {
        let mut w = StepWork::default();
        for seq in batch {
            let (n, start) = (seq.tokens.len() as f64, seq.start_pos as f64);
            if seq.tokens.len() == 1 {
                w.decode_seqs += 1.0;
                w.decode_context += start + 1.0;
            } else {
                w.prefill_tokens += n;
                // Token i (0-based) attends to start + i + 1 positions.
                w.prefill_pairs += n * start + n * (n + 1.0) / 2.0;
            }
        }
        w
    }

    /// The regressors of the linear model, in [`SimProfile::coefficients`] order.
    fn features(&self) -> [f64; 5] {
        [
            1.0,
            self.prefill_tokens,
            self.prefill_pairs * 1e-6,
            self.decode_seqs,
            self.decode_context * 1e-6,
        ]
    }
}

impl SimProfile {
    /// The built-in profile ([`DEFAULT_PROFILE_JSON`]).
    pub fn default_cpu() -> SimProfile {
        // A test (`the_default_profile_parses`) holds the embedded file valid.
        Self::parse(DEFAULT_PROFILE_JSON, "built-in").unwrap_or_else(|e| {
            unreachable!("the built-in sim profile is checked by a unit test: {e}")
        })
    }

    /// Reads a profile file.
    pub fn load(path: &Path) -> Result<SimProfile, SimProfileError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SimProfileError::Io {
            path: name.clone(),
            source,
        })?;
        Self::parse(&text, &name)
    }

    /// Parses and checks a profile; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<SimProfile, SimProfileError> {
        let profile: SimProfile =
            serde_json::from_str(text).map_err(|source| SimProfileError::Json {
                path: path.to_string(),
                source,
            })?;
        profile.check(path)?;
        Ok(profile)
    }

    fn check(&self, path: &str) -> Result<(), SimProfileError> {
        let fields = [
            ("step_ms", self.step_ms),
            ("prefill_token_ms", self.prefill_token_ms),
            (
                "prefill_attention_ns_per_pair",
                self.prefill_attention_ns_per_pair,
            ),
            ("decode_seq_ms", self.decode_seq_ms),
            (
                "decode_context_ns_per_token",
                self.decode_context_ns_per_token,
            ),
        ];
        for (field, value) in fields {
            if !value.is_finite() || value < 0.0 {
                return Err(SimProfileError::Invalid {
                    path: path.to_string(),
                    field,
                    value,
                });
            }
        }
        Ok(())
    }

    /// The coefficients in [`StepWork::features`] order (ms per unit).
    fn coefficients(&self) -> [f64; 5] {
        [
            self.step_ms,
            self.prefill_token_ms,
            self.prefill_attention_ns_per_pair,
            self.decode_seq_ms,
            self.decode_context_ns_per_token,
        ]
    }

    /// Milliseconds a step doing `work` takes.
    pub fn step_ms(&self, work: &StepWork) -> f64 {
        self.coefficients()
            .iter()
            .zip(work.features())
            .map(|(c, x)| c * x)
            .sum()
    }

    /// How long a step over `batch` takes.
    pub fn step_time(&self, batch: &[SequenceInput<'_>]) -> Duration {
        Duration::from_secs_f64(self.step_ms(&StepWork::of_batch(batch)).max(0.0) / 1e3)
    }
}

/// One timed step: what it computed and how long it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub work: StepWork,
    pub ms: f64,
}

/// The batches [`measure`] times: decode batches of 1 to 16 sequences at
/// short and long contexts, and prefill chunks of 32 to 512 tokens from
/// the start and after a cached prefix.
pub fn measurement_grid() -> Vec<Vec<(usize, usize)>> {
    let mut grid = Vec::new();
    for context in [16, 512, 1536] {
        for seqs in [1, 2, 4, 8, 16] {
            grid.push(vec![(1, context); seqs]);
        }
    }
    for (tokens, start) in [(32, 0), (128, 0), (256, 0), (512, 0), (256, 1024)] {
        grid.push(vec![(tokens, start)]);
    }
    grid
}

/// Times `model` on every batch of [`measurement_grid`] (each
/// `(new tokens, start position)` per sequence): the median of `repeats`
/// runs after one warm-up. Block tables point at arbitrary blocks: the
/// cost does not depend on what the cache holds.
pub fn measure<M: ForwardModel + ?Sized>(
    model: &mut M,
    repeats: usize,
) -> Result<Vec<Sample>, ModelError> {
    const BLOCK_SIZE: usize = 16;
    let grid = measurement_grid();
    let longest = grid
        .iter()
        .flatten()
        .map(|&(n, start)| n + start)
        .max()
        .unwrap_or(1);
    let blocks = longest.div_ceil(BLOCK_SIZE);
    let mut kv = KvStorage::new(model.kv_shape(blocks, BLOCK_SIZE))?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let vocab = model.config().vocab as u32;
    let mut samples = Vec::new();
    for shape in grid {
        let tokens: Vec<Vec<u32>> = shape
            .iter()
            .map(|&(n, start)| {
                (0..n as u32)
                    .map(|i| (100 + i + start as u32) % vocab)
                    .collect()
            })
            .collect();
        let batch: Vec<SequenceInput> = shape
            .iter()
            .zip(&tokens)
            .map(|(&(_, start), tokens)| SequenceInput {
                tokens,
                start_pos: start,
                block_table: &table,
            })
            .collect();
        let mut times = Vec::with_capacity(repeats);
        for round in 0..=repeats {
            let t = Instant::now();
            model.forward(&mut kv, &batch, LogitsFor::LastToken)?;
            if round > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        samples.push(Sample {
            work: StepWork::of_batch(&batch),
            ms: times[times.len() / 2],
        });
    }
    Ok(samples)
}

/// The non-negative least-squares profile of `samples`: coefficients that
/// come out negative are fixed at zero and the rest refitted.
pub fn fit(samples: &[Sample], name: &str, source: &str) -> SimProfile {
    let mut active = [true; 5];
    let mut coef = [0f64; 5];
    for _ in 0..5 {
        coef = least_squares(samples, &active);
        let mut changed = false;
        for (a, c) in active.iter_mut().zip(&mut coef) {
            if *a && *c < 0.0 {
                *a = false;
                *c = 0.0;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    SimProfile {
        name: name.to_string(),
        source: source.to_string(),
        step_ms: coef[0],
        prefill_token_ms: coef[1],
        prefill_attention_ns_per_pair: coef[2],
        decode_seq_ms: coef[3],
        decode_context_ns_per_token: coef[4],
    }
}

/// Ordinary least squares over the `active` regressors (normal equations,
/// Gaussian elimination with partial pivoting); inactive ones are zero, and
/// so is any the samples cannot determine.
fn least_squares(samples: &[Sample], active: &[bool; 5]) -> [f64; 5] {
    let idx: Vec<usize> = (0..5).filter(|&i| active[i]).collect();
    let k = idx.len();
    // Augmented matrix [XᵀX | Xᵀy], k × (k + 1).
    let mut a = vec![vec![0f64; k + 1]; k];
    for s in samples {
        let x = s.work.features();
        for (r, &i) in idx.iter().enumerate() {
            for (c, &j) in idx.iter().enumerate() {
                a[r][c] += x[i] * x[j];
            }
            a[r][k] += x[i] * s.ms;
        }
    }
    for col in 0..k {
        let Some(pivot) = (col..k).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
        else {
            continue;
        };
        a.swap(col, pivot);
        if a[col][col].abs() < 1e-12 {
            continue;
        }
        let pivot_row = a[col].clone();
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (x, p) in r.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut out = [0f64; 5];
    for (r, &i) in idx.iter().enumerate() {
        if a[r][r].abs() >= 1e-12 {
            out[i] = a[r][k] / a[r][r];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> SimProfile {
        SimProfile {
            name: "test".into(),
            source: String::new(),
            step_ms: 2.0,
            prefill_token_ms: 0.1,
            prefill_attention_ns_per_pair: 10.0,
            decode_seq_ms: 0.5,
            decode_context_ns_per_token: 1000.0,
        }
    }

    fn seq<'a>(tokens: &'a [u32], start_pos: usize) -> SequenceInput<'a> {
        SequenceInput {
            tokens,
            start_pos,
            block_table: &[],
        }
    }

    #[test]
    fn the_default_profile_parses() {
        let p = SimProfile::parse(DEFAULT_PROFILE_JSON, "built-in").unwrap();
        assert!(p.prefill_token_ms > 0.0, "{p:?}");
        assert!(p.step_ms + p.decode_seq_ms > 0.0, "{p:?}");
        assert_eq!(SimProfile::default_cpu(), p);
    }

    /// The shipped GPU profile parses and reproduces the published figures
    /// it was derived from (docs/sim.md): about 313 ms to prefill 7,500
    /// tokens and 8.84 ms per decode step at two sequences of ~7,600.
    #[test]
    fn the_h100_profile_matches_its_published_figures() {
        let p = SimProfile::parse(
            include_str!("../../../../config/sim-profiles/llama-3.1-8b-h100.json"),
            "llama-3.1-8b-h100.json",
        )
        .unwrap();
        let prompt = vec![1u32; 7500];
        let ttft = p.step_ms(&StepWork::of_batch(&[seq(&prompt, 0)]));
        assert!((280.0..340.0).contains(&ttft), "{ttft}");
        let one = [1u32];
        let tpot = p.step_ms(&StepWork::of_batch(&[seq(&one, 7600), seq(&one, 7600)]));
        assert!((tpot - 8.84).abs() < 0.2, "{tpot}");
    }

    #[test]
    fn prefill_time_is_the_profiles_linear_and_quadratic_terms() {
        let p = profile();
        let tokens = vec![7u32; 1000];
        // 1000 tokens from position 0: 1000 × 0.1 ms, 500,500 pairs × 10 ns.
        let want = 2.0 + 100.0 + 500_500.0 * 10.0 / 1e6;
        let got = p.step_ms(&StepWork::of_batch(&[seq(&tokens, 0)]));
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        // The same chunk after a cached prefix attends to more positions.
        let later = p.step_ms(&StepWork::of_batch(&[seq(&tokens, 1000)]));
        assert!((later - got - 1000.0 * 1000.0 * 10.0 / 1e6).abs() < 1e-9);
        // Twice the tokens, more than twice the attention.
        let tokens2 = vec![7u32; 2000];
        let twice = p.step_ms(&StepWork::of_batch(&[seq(&tokens2, 0)]));
        assert!(twice - 2.0 > 2.0 * (got - 2.0), "{twice} {got}");
    }

    #[test]
    fn decode_time_grows_with_batch_and_context() {
        let p = profile();
        let one = [1u32];
        let step = |n: usize, ctx: usize| {
            let batch: Vec<_> = (0..n).map(|_| seq(&one, ctx)).collect();
            p.step_time(&batch).as_secs_f64() * 1e3
        };
        // 1 sequence at position 99 reads 100 positions.
        assert!((step(1, 99) - (2.0 + 0.5 + 0.1)).abs() < 1e-6);
        // Each sequence adds decode_seq_ms and its context.
        assert!((step(8, 99) - step(1, 99) - 7.0 * 0.6).abs() < 1e-6);
        assert!(step(1, 9999) > step(1, 99) + 9.8);
        // A mixed step costs the sum of its parts beyond one step_ms.
        let prompt = vec![3u32; 64];
        let mixed = p.step_time(&[seq(&prompt, 0), seq(&one, 99)]).as_secs_f64() * 1e3;
        let alone = p.step_time(&[seq(&prompt, 0)]).as_secs_f64() * 1e3;
        assert!((mixed - alone - (step(1, 99) - 2.0)).abs() < 1e-6);
    }

    #[test]
    fn bad_profiles_are_errors_naming_the_field() {
        let mut v = serde_json::to_value(profile()).unwrap();
        v["decode_seq_ms"] = serde_json::json!(-1.0);
        let e = SimProfile::parse(&v.to_string(), "p.json").unwrap_err();
        assert!(e.to_string().contains("decode_seq_ms"), "{e}");
        assert!(e.to_string().contains("p.json"), "{e}");
        let e = SimProfile::parse(r#"{"name":"x"}"#, "p.json").unwrap_err();
        assert!(matches!(e, SimProfileError::Json { .. }), "{e}");
        let mut v = serde_json::to_value(profile()).unwrap();
        v["typo_ms"] = serde_json::json!(1.0);
        assert!(SimProfile::parse(&v.to_string(), "p.json").is_err());
        let e = SimProfile::load(Path::new("/nonexistent/p.json")).unwrap_err();
        assert!(matches!(e, SimProfileError::Io { .. }), "{e}");
    }

    #[test]
    fn fit_recovers_the_coefficients_of_exact_samples() {
        let truth = profile();
        let samples: Vec<Sample> = measurement_grid()
            .iter()
            .map(|shape| {
                let work = StepWork {
                    prefill_tokens: shape.iter().filter(|s| s.0 > 1).map(|s| s.0 as f64).sum(),
                    prefill_pairs: shape
                        .iter()
                        .filter(|s| s.0 > 1)
                        .map(|&(n, st)| (n * st + n * (n + 1) / 2) as f64)
                        .sum(),
                    decode_seqs: shape.iter().filter(|s| s.0 == 1).count() as f64,
                    decode_context: shape
                        .iter()
                        .filter(|s| s.0 == 1)
                        .map(|s| (s.1 + 1) as f64)
                        .sum(),
                };
                Sample {
                    work,
                    ms: truth.step_ms(&work),
                }
            })
            .collect();
        let got = fit(&samples, "test", "");
        for (g, w) in got.coefficients().iter().zip(truth.coefficients()) {
            assert!((g - w).abs() < 1e-6 * w.max(1.0), "{got:?}");
        }
        // A coefficient the data pushes below zero is held at zero.
        let noisy: Vec<Sample> = samples
            .iter()
            .map(|s| Sample {
                work: s.work,
                ms: s.ms - truth.decode_context_ns_per_token * s.work.decode_context * 2e-6,
            })
            .collect();
        let got = fit(&noisy, "test", "");
        assert_eq!(got.decode_context_ns_per_token, 0.0, "{got:?}");
        assert!(got.prefill_token_ms > 0.0);
    }
}
