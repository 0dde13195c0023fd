//! The engine's logits against golden values from an independent numpy
//! float64 forward pass (`scripts/reference/llama_ref.py`, which dequantizes
//! the same GGUF itself; the command is in the script doc and the JSON).
//! The reference rounds keys and values to float16 once, as the engine's KV
//! cache holds them.
//!
//! Tolerances, on the reference's top-20 logits at every position and on
//! every 8th logit of the last position:
//! - with f32 activations ([`Activations::F32`]), max abs diff < 0.02
//!   (0.005 measured, mean 0.002). Only f32-vs-f64 rounding separates the
//!   two passes, but a key or value element that lies within that rounding
//!   of an f16 rounding boundary is rounded up in one and down in the
//!   other: one f16 step (1/2048 of the value) in a few percent of the
//!   elements. With an f32 cache the same comparison gave 7e-5;
//! - with Q8 activations (the default, as llama.cpp), max abs diff < 1.5
//!   and mean abs diff on the strided last-position logits < 0.3 (about 0.95
//!   and 0.09 measured). Q8 rounding is discontinuous: a last-bit difference
//!   flips some activation's rounding and 30 layers amplify it, so the
//!   scalar and AVX2 kernels, which agree to 1e-6 on a single matmul, end up
//!   about as far from each other as from the reference.
//!
//! In both modes the argmax must match wherever the reference's top-1/top-2
//! logit gap exceeds `ARGMAX_GAP`, and after "The capital of France is"
//! " Paris" must come first and the top-5 set must match: exactly with f32
//! activations; with Q8 up to near-ties, since the reference's ranks 3 to 8
//! there lie within 0.55 of each other, below the Q8 noise (a token of the
//! engine's top 5 must be within `NEAR_TIE` of the reference's 5th logit,
//! and a reference top-5 token more than `NEAR_TIE` above the 6th must be
//! in the engine's top 5).

use serde_json::Value;
use xpyd_runtime::assets::bundled_model;
use xpyd_runtime::engine::kv_storage::KvStorage;
use xpyd_runtime::engine::model::{Activations, LogitsFor, Model, SequenceInput, argmax};

const F32_TOL: f32 = 0.02;
const Q8_TOL: f32 = 1.5;
const Q8_MEAN_TOL: f32 = 0.3;
const ARGMAX_GAP: f32 = 1.0;
const PARIS: u32 = 7042;
/// Reference logits closer than this are a near-tie under Q8 activations.
const NEAR_TIE: f32 = 0.5;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx.truncate(k);
    idx
}

/// Checks one activation mode against the golden file; returns the largest
/// and the mean difference on the strided last-position logits.
fn check(model: &Model, golden: &Value, tol: f32, near_tie: f32, mode: &str) -> (f32, f32) {
    let tokens = ids(&golden["tokens"]);
    let vocab = model.config().vocab;
    let mut kv = KvStorage::new(model.kv_shape(1, 16)).unwrap();
    let all = model
        .forward(
            &mut kv,
            &[SequenceInput {
                tokens: &tokens,
                start_pos: 0,
                block_table: &[0],
            }],
            LogitsFor::AllTokens,
        )
        .unwrap()
        .remove(0);

    let mut worst = 0f32;
    for (t, pos) in golden["positions"].as_array().unwrap().iter().enumerate() {
        let got = &all[t * vocab..(t + 1) * vocab];
        let ref_ids = ids(&pos["top20_ids"]);
        let ref_vals = floats(&pos["top20_logits"]);
        for (&id, &want) in ref_ids.iter().zip(&ref_vals) {
            let diff = (got[id as usize] - want).abs();
            worst = worst.max(diff);
            assert!(
                diff < tol,
                "{mode}: position {t}, token {id}: engine {} reference {want}",
                got[id as usize]
            );
        }
        if ref_vals[0] - ref_vals[1] > ARGMAX_GAP {
            assert_eq!(
                argmax(got),
                Some(ref_ids[0] as usize),
                "{mode}: position {t}"
            );
        }
    }

    let prompt_end = &all[4 * vocab..5 * vocab];
    let got5 = top_k(prompt_end, 5);
    let (ref_ids, ref_vals) = (
        ids(&golden["positions"][4]["top20_ids"]),
        floats(&golden["positions"][4]["top20_logits"]),
    );
    assert_eq!(got5[0], PARIS, "{mode}");
    for id in &got5 {
        let at = ref_ids.iter().position(|r| r == id);
        assert!(
            at.is_some_and(|i| ref_vals[i] >= ref_vals[4] - near_tie),
            "{mode}: {id} in the engine's top 5 ({got5:?}) is not near the reference's ({:?})",
            &ref_ids[..5]
        );
    }
    for (id, &v) in ref_ids.iter().zip(&ref_vals).take(5) {
        assert!(
            v < ref_vals[5] + near_tie || got5.contains(id),
            "{mode}: the reference's {id} is missing from the engine's top 5 {got5:?}"
        );
    }

    let last = &all[(tokens.len() - 1) * vocab..];
    let stride = golden["last_stride"].as_u64().unwrap() as usize;
    let strided = floats(&golden["last_strided_logits"]);
    assert_eq!(strided.len(), vocab.div_ceil(stride));
    let mut sum = 0f32;
    for (i, &want) in strided.iter().enumerate() {
        let diff = (last[i * stride] - want).abs();
        worst = worst.max(diff);
        sum += diff;
        assert!(
            diff < tol,
            "{mode}: last position, token {}: engine {} reference {want}",
            i * stride,
            last[i * stride]
        );
    }
    (worst, sum / strided.len() as f32)
}

#[test]
fn logits_match_the_numpy_reference() {
    let golden: Value = serde_json::from_str(include_str!("data/golden_logits.json")).unwrap();
    let mut model = Model::load_gguf(&bundled_model().unwrap()).unwrap();
    model.set_activations(Activations::F32);
    // Exactly the reference's top 5 (a near-tie of 0 is none).
    let (f32_worst, f32_mean) = check(&model, &golden, F32_TOL, 0.0, "f32 activations");
    model.set_activations(Activations::Q8);
    let (q8_worst, q8_mean) = check(&model, &golden, Q8_TOL, NEAR_TIE, "Q8 activations");
    assert!(
        q8_mean < Q8_MEAN_TOL,
        "Q8 activations: mean abs diff {q8_mean}"
    );
    eprintln!(
        "logit difference to the reference (max, mean): f32 {f32_worst} {f32_mean}, Q8 {q8_worst} {q8_mean}"
    );
}
