//! The engine with the simulated model (`--device sim`) as a caller of
//! [`EngineHandle`] sees it: the real tokenizer, scheduler and block pool
//! around a timed, computation-free forward pass. A long prompt takes at
//! least its profiled prefill time, answers are placeholders that say
//! "sim", never real text, the prefix cache and KV events are real, and a
//! prompt's KV copied from one simulated engine to another (a remote
//! prefill) decodes exactly as a local prefill does.
//!
//! Timing is asserted only as lower bounds the profile guarantees (the
//! engine sleeps at least the modelled step time), never as upper bounds.

mod common;

use std::time::{Duration, Instant};

use common::{collect, gguf, greedy};
use xpyd_runtime::engine::block_pool::KvEventData;
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineHandle};
use xpyd_runtime::engine::sampling::FinishReason;
use xpyd_runtime::engine::sim::{SIM_OUTPUT_TEXT, SimModel, SimProfile};
use xpyd_runtime::engine::tokenizer::Tokenizer;

const BLOCK_SIZE: usize = 16;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(gguf()).expect("tokenizer loads")
}

/// A profile slow enough that its lower bounds are well above scheduling
/// noise: 0.4 ms per prefill token, 5 ms per decode step.
fn profile() -> SimProfile {
    SimProfile {
        name: "engine_sim test".into(),
        source: String::new(),
        step_ms: 1.0,
        prefill_token_ms: 0.4,
        prefill_attention_ns_per_pair: 0.0,
        decode_seq_ms: 4.0,
        decode_context_ns_per_token: 0.0,
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        num_blocks: 256,
        block_size: BLOCK_SIZE,
        max_batch_tokens: 256,
        max_seqs: 16,
        max_model_len: 2048,
    }
}

fn start_with(
    profile: SimProfile,
    events: Option<tokio::sync::mpsc::UnboundedSender<xpyd_runtime::engine::block_pool::KvEvent>>,
) -> EngineHandle {
    let sim = SimModel::from_gguf(gguf(), profile).expect("the sim model builds");
    Engine::start(sim, Some(tokenizer()), config(), events).expect("engine starts")
}

/// A prompt of `n` real tokens.
fn prompt(n: usize) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(n / 5 + 1);
    let mut ids = tokenizer().encode(&text).unwrap();
    ids.truncate(n);
    assert_eq!(ids.len(), n);
    ids
}

#[test]
fn a_long_prompt_takes_at_least_its_profiled_prefill_time() {
    let p = profile();
    let engine = start_with(p.clone(), None);
    let prompt = prompt(1000);
    let t = Instant::now();
    let mut rx = engine.submit(greedy("long", &prompt, 8)).unwrap();
    let first = rx.blocking_recv().expect("a first token").unwrap();
    let ttft = t.elapsed();
    // 1000 tokens at 0.4 ms, in 4 chunks of the 256-token budget.
    let floor = Duration::from_secs_f64((1000.0 * p.prefill_token_ms + 4.0 * p.step_ms) / 1e3);
    assert!(
        ttft >= floor,
        "first token after {ttft:?}, profile says {floor:?}"
    );
    let rest = collect(rx).ok();
    let total = t.elapsed();
    // 7 more decode steps of 5 ms each.
    let decode_floor = floor + Duration::from_secs_f64(7.0 * (p.step_ms + p.decode_seq_ms) / 1e3);
    assert!(total >= decode_floor, "{total:?} < {decode_floor:?}");
    assert_eq!(rest.tokens.len() + 1, 8);
    assert_eq!(rest.finish, Some(FinishReason::Length));
    let _ = first;
}

#[test]
fn answers_are_deterministic_placeholders_and_the_prefix_cache_is_real() {
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let engine = start_with(profile(), Some(tx));
    let tok = tokenizer();
    let question = tok
        .encode(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nName the capital of France.<|im_end|>\n\
             <|im_start|>assistant\n",
        )
        .unwrap();
    assert!(question.len() > 2 * BLOCK_SIZE, "{}", question.len());
    let a = collect(engine.submit(greedy("a", &question, 12)).unwrap()).ok();
    let b = collect(engine.submit(greedy("b", &question, 12)).unwrap()).ok();
    assert_eq!(a.tokens, b.tokens, "same prompt, same placeholder answer");
    assert!(!a.text.contains("Paris"), "{:?}", a.text);
    // Every token is one of the label's, so every answer reads "sim…".
    let palette = tok.encode(SIM_OUTPUT_TEXT).unwrap();
    assert!(
        a.tokens.iter().all(|t| palette.contains(t)),
        "{:?}",
        a.tokens
    );
    assert!(a.text.contains("sim"), "{:?}", a.text);
    // The second run found the first's full blocks in the prefix cache.
    let cached = b.usage.unwrap().cached_tokens;
    assert!(
        cached >= BLOCK_SIZE && cached.is_multiple_of(BLOCK_SIZE),
        "{:?}",
        b.usage
    );
    assert_eq!(a.usage.unwrap().cached_tokens, 0);
    // And the block pool told the router about them.
    let mut stored = 0;
    while let Ok(e) = events.try_recv() {
        if let KvEventData::Stored { block_hashes, .. } = e.data {
            stored += block_hashes.len();
        }
    }
    assert!(
        stored >= question.len() / BLOCK_SIZE,
        "{stored} blocks stored"
    );
    // Another prompt, another answer.
    let mut other = question.clone();
    other[3] = tok.encode(" Spain").unwrap()[0];
    let c = collect(engine.submit(greedy("c", &other, 12)).unwrap()).ok();
    assert_ne!(a.tokens, c.tokens);
}

#[test]
fn a_remote_prefill_between_simulated_engines_decodes_like_a_local_one() {
    let prompt = prompt(100);
    let max_new = 10u32;
    let local = collect(
        start_with(profile(), None)
            .submit(greedy("l", &prompt, max_new))
            .unwrap(),
    )
    .ok();

    // The prefill side computes the prompt and keeps its (tiny) KV.
    let prefill = start_with(profile(), None);
    let first = collect(prefill.submit_prefill(greedy("p", &prompt, 1)).unwrap()).ok();
    let table = prefill.block_table("p").wait().unwrap();
    let bytes: Vec<Vec<u8>> = prefill
        .with_kv_storage(move |kv| table.iter().map(|&b| kv.read_block(b).unwrap()).collect())
        .wait()
        .unwrap();
    // A block is 16 tokens × (K + V) × 4 bytes, whatever the model.
    assert!(bytes.iter().all(|b| b.len() == BLOCK_SIZE * 8));
    prefill.cancel("p").unwrap();

    // The decode side takes the bytes into other block ids and decodes.
    let decode = start_with(profile(), None);
    // Occupy a few blocks first so the reserved ids differ from the prefill's.
    let _busy = decode.submit(greedy("busy", &[1, 2, 3], 400)).unwrap();
    let (rx, reservation) = decode
        .begin_remote_prefill(greedy("d", &prompt, max_new))
        .wait()
        .unwrap();
    assert_eq!(reservation.block_ids.len(), bytes.len());
    let targets = reservation.block_ids.clone();
    decode
        .with_kv_storage(move |kv| {
            for (block, data) in targets.iter().zip(&bytes) {
                kv.write_block(*block, data).unwrap();
            }
        })
        .wait()
        .unwrap();
    decode
        .complete_remote_prefill("d", first.tokens[0], None)
        .wait()
        .unwrap();
    let remote = collect(rx).ok();
    assert_eq!(remote.tokens, local.tokens);
    assert_eq!(remote.text, local.text);
}
