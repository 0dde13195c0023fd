//! Hugging Face checkpoints (config.json + safetensors): a tiny random Llama
//! written by the test must give the same logits as the same weights written
//! as a GGUF file the way llama.cpp converts them (Q and K rows permuted for
//! adjacent-pair RoPE), in F32, F16 and BF16; broken checkpoints give errors
//! that name the file and the tensor.

use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, tensor::TensorView};
use xpyd_runtime::engine::gguf::{GgmlType, GgufFile, MetaValue, TensorToWrite, write_gguf};
use xpyd_runtime::engine::kv_storage::KvStorage;
use xpyd_runtime::engine::model::{LogitsFor, Model, SequenceInput};
use xpyd_runtime::engine::safetensors::load_hf_model;

const HIDDEN: usize = 64;
const FFN: usize = 96;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const LAYERS: usize = 2;
const VOCAB: usize = 80;
const CONTEXT: usize = 64;

/// HF-named tensors, row-major shapes.
type Weights = Vec<(String, Vec<usize>, Vec<f32>)>;

fn random_weights(tied: bool) -> Weights {
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = move |scale: f32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    };
    let mut w: Weights = Vec::new();
    let mut mat = |name: String, rows: usize, cols: usize, w: &mut Weights| {
        let data = (0..rows * cols).map(|_| next(0.25)).collect();
        w.push((name, vec![rows, cols], data));
    };
    mat("model.embed_tokens.weight".into(), VOCAB, HIDDEN, &mut w);
    if !tied {
        mat("lm_head.weight".into(), VOCAB, HIDDEN, &mut w);
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.");
        mat(
            format!("{p}self_attn.q_proj.weight"),
            HIDDEN,
            HIDDEN,
            &mut w,
        );
        mat(
            format!("{p}self_attn.k_proj.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
            &mut w,
        );
        mat(
            format!("{p}self_attn.v_proj.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
            &mut w,
        );
        mat(
            format!("{p}self_attn.o_proj.weight"),
            HIDDEN,
            HIDDEN,
            &mut w,
        );
        mat(format!("{p}mlp.gate_proj.weight"), FFN, HIDDEN, &mut w);
        mat(format!("{p}mlp.up_proj.weight"), FFN, HIDDEN, &mut w);
        mat(format!("{p}mlp.down_proj.weight"), HIDDEN, FFN, &mut w);
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let data = (0..HIDDEN).map(|i| 1.0 + 0.01 * (i % 7) as f32).collect();
            w.push((format!("{p}{norm}.weight"), vec![HIDDEN], data));
        }
    }
    let data = (0..HIDDEN).map(|i| 0.9 + 0.02 * (i % 5) as f32).collect();
    w.push(("model.norm.weight".into(), vec![HIDDEN], data));
    w
}

fn config_json() -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
        "max_position_embeddings": CONTEXT, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
    })
    .to_string()
}

/// Writes `weights` in `dtype` (values are rounded to it first by the caller).
fn write_checkpoint(dir: &Path, weights: &Weights, dtype: Dtype) {
    let bytes: Vec<Vec<u8>> = weights
        .iter()
        .map(|(_, _, data)| match dtype {
            Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => data
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => data
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        })
        .collect();
    let views: Vec<(String, TensorView)> = weights
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                name.clone(),
                TensorView::new(dtype, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), config_json()).unwrap();
}

/// llama.cpp's conversion permutation: within each head, rows
/// `[first half | second half]` become interleaved pairs.
fn permute(data: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let rows = data.len() / cols;
    let hd = rows / n_heads;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + half * hd / 2 + i;
                let dst = h * hd + 2 * i + half;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn gguf_model(weights: &Weights) -> Model {
    let mut named: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
    for (name, shape, data) in weights {
        let gguf = xpyd_runtime::engine::safetensors::gguf_name(name).unwrap();
        let data = if name.ends_with("q_proj.weight") {
            permute(data, HEADS, shape[1])
        } else if name.ends_with("k_proj.weight") {
            permute(data, KV_HEADS, shape[1])
        } else {
            data.clone()
        };
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        named.push((
            gguf,
            dims,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let u = |v: usize| MetaValue::U32(v as u32);
    let meta = [
        ("general.architecture", MetaValue::String("llama".into())),
        ("llama.block_count", u(LAYERS)),
        ("llama.context_length", u(CONTEXT)),
        ("llama.embedding_length", u(HIDDEN)),
        ("llama.feed_forward_length", u(FFN)),
        ("llama.attention.head_count", u(HEADS)),
        ("llama.attention.head_count_kv", u(KV_HEADS)),
        ("llama.rope.freq_base", MetaValue::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        ),
        ("llama.vocab_size", u(VOCAB)),
    ];
    let tensors: Vec<TensorToWrite> = named
        .iter()
        .map(|(name, dims, data)| TensorToWrite {
            name,
            dims,
            ty: GgmlType::F32,
            data,
        })
        .collect();
    let file = GgufFile::from_bytes("tiny.gguf", write_gguf(&meta, &tensors)).unwrap();
    Model::from_gguf(&file).unwrap()
}

/// Logits of a 6-token prefill at every position, then of one decode step.
fn run(model: &Model) -> Vec<f32> {
    let mut kv = KvStorage::new(model.kv_shape(2, 4)).unwrap();
    let table = [1u32, 0];
    let prompt = [3u32, 17, 42, 5, 79, 0];
    let mut out = model
        .forward(
            &mut kv,
            &[SequenceInput {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
            }],
            LogitsFor::AllTokens,
        )
        .unwrap()
        .remove(0);
    out.extend(
        model
            .forward(
                &mut kv,
                &[SequenceInput {
                    tokens: &[11],
                    start_pos: prompt.len(),
                    block_table: &table,
                }],
                LogitsFor::LastToken,
            )
            .unwrap()
            .remove(0),
    );
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn a_safetensors_checkpoint_matches_its_gguf_conversion() {
    for tied in [true, false] {
        let weights = random_weights(tied);
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &weights, Dtype::F32);
        let hf = run(&load_hf_model(dir.path()).unwrap());
        let gguf = run(&gguf_model(&weights));
        assert_eq!(hf.len(), 7 * VOCAB);
        let spread = hf.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 0.1, "logits are degenerate: {spread}");
        let diff = max_diff(&hf, &gguf);
        assert!(
            diff < 1e-4,
            "tied {tied}: safetensors vs GGUF logits differ by {diff}"
        );
    }
}

#[test]
fn f16_and_bf16_checkpoints_load_exactly() {
    let weights = random_weights(false);
    for (dtype, round) in [
        (
            Dtype::F16,
            (|v: f32| f16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::BF16, |v: f32| bf16::from_f32(v).to_f32()),
    ] {
        let rounded: Weights = weights
            .iter()
            .map(|(n, s, d)| (n.clone(), s.clone(), d.iter().map(|&v| round(v)).collect()))
            .collect();
        let half_dir = tempfile::tempdir().unwrap();
        write_checkpoint(half_dir.path(), &rounded, dtype);
        let f32_dir = tempfile::tempdir().unwrap();
        write_checkpoint(f32_dir.path(), &rounded, Dtype::F32);
        let a = run(&load_hf_model(half_dir.path()).unwrap());
        let b = run(&load_hf_model(f32_dir.path()).unwrap());
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-5, "{dtype:?}: differs from f32 by {diff}");
    }
}

#[test]
fn broken_checkpoints_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_hf_model(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");

    let mut weights = random_weights(true);
    weights.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight");
    write_checkpoint(dir.path(), &weights, Dtype::F32);
    let err = load_hf_model(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("blk.1.ffn_up.weight") && err.contains("missing"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{bad json",
    )
    .unwrap();
    let err = load_hf_model(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid"),
        "{err}"
    );

    let ids: Vec<u8> = (0..4i64).flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::I64, vec![4], &ids).unwrap();
    let bytes = safetensors::serialize([("model.norm.weight", view)], None).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let err = load_hf_model(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.norm.weight") && err.contains("I64"),
        "{err}"
    );
}
