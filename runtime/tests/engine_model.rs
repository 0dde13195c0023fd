//! The engine on the bundled SmolLM2-135M-Instruct (Q4_1 GGUF): tokenizer,
//! chat template, greedy generation, batching and input errors, as a user of
//! the model would notice them.
//!
//! Greedy outputs are compared only up to the first step whose top-1/top-2
//! probability ratio is below 1.25: this small quantized model is sensitive
//! to arithmetic order, and two correct engines may part ways at near-ties.
//! (This engine does each token's arithmetic in the same order whatever the
//! batch, so its batched logits are in fact bit-identical; see
//! `prefill_in_chunks_equals_prefill_at_once`.)

use std::sync::OnceLock;

use xpyd_runtime::assets::bundled_model;
use xpyd_runtime::engine::chat_template::{ChatMessage, ChatTemplate};
use xpyd_runtime::engine::gguf::GgufFile;
use xpyd_runtime::engine::kv_storage::KvStorage;
use xpyd_runtime::engine::model::{LogitsFor, Model, ModelError, SequenceInput, argmax};
use xpyd_runtime::engine::tokenizer::{StreamDecoder, Tokenizer};

const BLOCK_SIZE: usize = 16;

struct Loaded {
    model: Model,
    tok: Tokenizer,
}

fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let path = bundled_model().expect("the bundled model (run scripts/setup)");
        let file = GgufFile::open(&path).expect("GGUF parses");
        Loaded {
            model: Model::from_gguf(&file).expect("model loads"),
            tok: Tokenizer::from_gguf(&file).expect("tokenizer loads"),
        }
    })
}

/// Top-1 / top-2 probability ratio of a logits vector.
fn margin(logits: &[f32]) -> f32 {
    let mut top = [f32::NEG_INFINITY; 2];
    for &v in logits {
        if v > top[0] {
            top = [v, top[0]];
        } else if v > top[1] {
            top[1] = v;
        }
    }
    (top[0] - top[1]).exp()
}

/// One generated token with how clear the choice was.
#[derive(Debug, Clone, Copy)]
struct Step {
    token: u32,
    margin: f32,
}

/// Greedy decoding of several prompts, batched in one forward per step.
/// Sequence `i` owns blocks `[i * per_seq, (i + 1) * per_seq)`.
fn greedy_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: Option<u32>,
) -> Vec<Vec<Step>> {
    let per_seq = 512 / BLOCK_SIZE;
    let mut kv = KvStorage::new(model.kv_shape(per_seq * prompts.len(), BLOCK_SIZE)).unwrap();
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    let mut outs: Vec<Vec<Step>> = vec![Vec::new(); prompts.len()];
    let mut pending: Vec<Vec<u32>> = prompts.to_vec();
    let mut pos = vec![0usize; prompts.len()];
    let mut done = vec![false; prompts.len()];
    for _ in 0..max_new {
        let live: Vec<usize> = (0..prompts.len()).filter(|&i| !done[i]).collect();
        if live.is_empty() {
            break;
        }
        let batch: Vec<SequenceInput> = live
            .iter()
            .map(|&i| SequenceInput {
                tokens: &pending[i],
                start_pos: pos[i],
                block_table: &tables[i],
            })
            .collect();
        let logits = model
            .forward(&mut kv, &batch, LogitsFor::LastToken)
            .unwrap();
        for (&i, l) in live.iter().zip(&logits) {
            let token = argmax(l).unwrap() as u32;
            outs[i].push(Step {
                token,
                margin: margin(l),
            });
            pos[i] += pending[i].len();
            pending[i] = vec![token];
            done[i] = Some(token) == eos;
        }
    }
    outs
}

fn tokens(steps: &[Step]) -> Vec<u32> {
    steps.iter().map(|s| s.token).collect()
}

#[test]
fn the_tokenizer_matches_smollm2() {
    let tok = &loaded().tok;
    let ids = tok.encode("The capital of France is").unwrap();
    assert_eq!(ids, [504, 3575, 282, 4649, 314]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "The capital of France is");
    // Digits are split one by one before byte-level BPE.
    let digits = tok.encode("2024").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    // Control tokens written in the text are matched, and skipped on request.
    let chat = tok.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(chat.first(), Some(&1));
    assert_eq!(chat.last(), Some(&2));
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nHi");
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    assert!(!tok.add_bos_token());
    assert!(tok.is_special(2) && !tok.is_special(504));
    let text = "Ünïcödé, 世界 and emoji 🎉🚀 — ok";
    assert_eq!(tok.decode(&tok.encode(text).unwrap(), false).unwrap(), text);
    assert!(tok.decode(&[60_000], false).is_err());
    // Each token's bytes (logprobs' `bytes`) concatenate to the text's.
    let bytes: Vec<u8> = tok
        .encode(text)
        .unwrap()
        .iter()
        .flat_map(|&id| tok.token_bytes(id).unwrap())
        .collect();
    assert_eq!(bytes, text.as_bytes());
    assert_eq!(tok.token_bytes(3575).unwrap(), b" capital");
    assert_eq!(tok.token_bytes(2).unwrap(), b"<|im_end|>");
    assert_eq!(tok.token_bytes(60_000), None);
}

#[test]
fn streaming_detokenization_never_breaks_characters() {
    let tok = &loaded().tok;
    let text = "Paris, café: 世界 🎉🚀 naïve 123 done";
    let ids = tok.encode(text).unwrap();
    let mut stream = StreamDecoder::new(false);
    let mut pieces = Vec::new();
    for &id in &ids {
        if let Some(piece) = stream.push(tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
            pieces.push(piece);
        }
    }
    if let Some(rest) = stream.finish(tok).unwrap() {
        pieces.push(rest);
    }
    assert_eq!(pieces.concat(), text);
    // Multi-byte characters span several byte-level tokens: some pushes
    // had to hold text back.
    assert!(pieces.len() < ids.len(), "{pieces:?}");
}

#[test]
fn greedy_completion_says_paris() {
    let Loaded { model, tok } = loaded();
    let prompt = tok.encode("The capital of France is").unwrap();
    let out = greedy_batch(model, std::slice::from_ref(&prompt), 2, None).remove(0);
    let text = tok.decode(&tokens(&out), false).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");

    // And it is sure of it: llama.cpp gives " Paris" about 0.77.
    let mut kv = KvStorage::new(model.kv_shape(1, BLOCK_SIZE)).unwrap();
    let logits = model
        .forward(
            &mut kv,
            &[SequenceInput {
                tokens: &prompt,
                start_pos: 0,
                block_table: &[0],
            }],
            LogitsFor::LastToken,
        )
        .unwrap()
        .remove(0);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let p_paris = (logits[out[0].token as usize] - max).exp() / total;
    assert!((0.6..0.9).contains(&p_paris), "P(\" Paris\") = {p_paris}");
}

#[test]
fn a_truncated_model_file_is_a_clear_error() {
    let path = bundled_model().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = GgufFile::open(&cut).unwrap_err().to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("truncated") && err.contains("tensor"),
        "{err}"
    );
    let err = Model::load_gguf(&dir.path().join("absent.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.gguf"), "{err}");
}

#[test]
fn chat_answers_the_capital_then_stops() {
    let Loaded { model, tok } = loaded();
    let template =
        ChatTemplate::new(tok.chat_template().unwrap(), "<|im_start|>", "<|im_end|>").unwrap();
    let prompt = template
        .render(
            &[ChatMessage::new("user", "Name the capital of France.")],
            true,
        )
        .unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{prompt:?}"
    );
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    let ids = tok.encode(&prompt).unwrap();
    let out = greedy_batch(model, &[ids], 16, tok.eos_token_id()).remove(0);
    let toks = tokens(&out);
    assert_eq!(toks.last(), tok.eos_token_id().as_ref(), "no EOS: {out:?}");
    let answer = tok.decode(&toks, true).unwrap();
    assert_eq!(answer, "The capital of France is Paris.");
}

#[test]
fn a_batch_gives_the_same_greedy_outputs_as_each_prompt_alone() {
    let Loaded { model, tok } = loaded();
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The largest planet in the solar system is",
        "1, 2, 3, 4,",
        "Water boils at",
        "My favourite colour is",
        "The quick brown fox",
    ];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p).unwrap()).collect();
    let max_new = 8;
    let batched = greedy_batch(model, &ids, max_new, None);
    for (i, p) in ids.iter().enumerate() {
        let alone = greedy_batch(model, std::slice::from_ref(p), max_new, None).remove(0);
        for (step, (a, b)) in alone.iter().zip(&batched[i]).enumerate() {
            assert_eq!(
                a.token,
                b.token,
                "prompt {:?} step {step}: alone {:?} batched {:?}",
                prompts[i],
                tok.decode(&tokens(&alone), false),
                tok.decode(&tokens(&batched[i]), false)
            );
            if a.margin < 1.25 {
                break; // near-tie: later steps may legitimately differ
            }
        }
    }
}

#[test]
fn prefill_in_chunks_equals_prefill_at_once() {
    let Loaded { model, tok } = loaded();
    let ids = tok
        .encode("The capital of France is Paris, and the capital of Italy is")
        .unwrap();
    let table: Vec<u32> = (0..4).collect();
    let mut kv = KvStorage::new(model.kv_shape(4, BLOCK_SIZE)).unwrap();
    let whole = |kv: &mut KvStorage, toks: &[u32], start| {
        model
            .forward(
                kv,
                &[SequenceInput {
                    tokens: toks,
                    start_pos: start,
                    block_table: &table,
                }],
                LogitsFor::AllTokens,
            )
            .unwrap()
            .remove(0)
    };
    let at_once = whole(&mut kv, &ids, 0);
    let mut kv2 = KvStorage::new(model.kv_shape(4, BLOCK_SIZE)).unwrap();
    let split = 5;
    let mut chunked = whole(&mut kv2, &ids[..split], 0);
    chunked.extend(whole(&mut kv2, &ids[split..], split));
    let worst = at_once
        .iter()
        .zip(&chunked)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(worst, 0.0, "chunked prefill differs by {worst}");
    let vocab = model.config().vocab;
    assert_eq!(at_once.len(), ids.len() * vocab);

    // A mixed step: a prefill chunk that needs no logits next to a decode.
    let mut kv3 = KvStorage::new(model.kv_shape(8, BLOCK_SIZE)).unwrap();
    let other: Vec<u32> = (4..8).collect();
    let out = model
        .forward(
            &mut kv3,
            &[
                SequenceInput {
                    tokens: &ids[..split],
                    start_pos: 0,
                    block_table: &table,
                },
                SequenceInput {
                    tokens: &ids[..1],
                    start_pos: 0,
                    block_table: &other,
                },
            ],
            LogitsFor::LastTokenOf(&[false, true]),
        )
        .unwrap();
    assert!(out[0].is_empty());
    assert_eq!(out[1].len(), vocab);
    // Each token's arithmetic is the same whatever else is in the batch, so
    // the scheduler's batching never changes a sequence's output.
    assert_eq!(out[1], at_once[..vocab], "logits depend on the batch");
}

#[test]
fn bad_input_gets_clear_errors() {
    let Loaded { model, .. } = loaded();
    let mut kv = KvStorage::new(model.kv_shape(4, BLOCK_SIZE)).unwrap();
    let table = [0u32, 1, 2, 3];
    let run = |kv: &mut KvStorage, tokens: &[u32], start_pos: usize, block_table: &[u32]| {
        model
            .forward(
                kv,
                &[SequenceInput {
                    tokens,
                    start_pos,
                    block_table,
                }],
                LogitsFor::LastToken,
            )
            .unwrap_err()
    };
    let ctx = model.config().context_length;
    let err = run(&mut kv, &[504, 3575], ctx - 1, &table);
    assert!(matches!(err, ModelError::ContextOverflow { .. }), "{err}");
    assert!(err.to_string().contains("context length 8192"), "{err}");
    let err = run(&mut kv, &[504, 49_152], 0, &table);
    assert!(err.to_string().contains("token id 49152"), "{err}");
    let long = vec![504u32; 4 * BLOCK_SIZE + 1];
    let err = run(&mut kv, &long, 0, &table);
    assert!(
        matches!(err, ModelError::BlockTableTooShort { .. }),
        "{err}"
    );
    let err = run(&mut kv, &[504], 0, &[7]);
    assert!(err.to_string().contains("block id 7"), "{err}");
    let err = run(&mut kv, &[], 0, &table);
    assert!(matches!(err, ModelError::EmptySequence { .. }), "{err}");
}
