//! The engine serving requests on the bundled SmolLM2-135M-Instruct: greedy
//! answers, batching, prefix caching, preemption, cancellation, bad input
//! and remote-prefill admission, as a caller of [`EngineHandle`] sees them.
//!
//! Greedy outputs are compared with a single-sequence reference run of the
//! model token for token; they may part only at a step whose top-1/top-2
//! probability ratio is below 1.25 (and nothing after it is compared): this
//! small quantized model is sensitive to arithmetic order, and batching or
//! chunking may legitimately change that order.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Collected, collect, gguf, greedy};
use xpyd_runtime::engine::block_pool::KvEventData;
use xpyd_runtime::engine::chat_template::{ChatMessage, ChatTemplate};
use xpyd_runtime::engine::kv_storage::KvStorage;
use xpyd_runtime::engine::model::{LogitsFor, Model, SequenceInput, argmax};
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineError, EngineHandle, Request};
use xpyd_runtime::engine::sampling::{FinishReason, SamplingParamsError, TokenLogprobs};
use xpyd_runtime::engine::tokenizer::Tokenizer;

const BLOCK_SIZE: usize = 16;
const CLOSE_CALL: f32 = 1.25;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(gguf()).expect("tokenizer loads")
}

fn model() -> Model {
    Model::from_gguf(gguf()).expect("model loads")
}

/// The model used for single-sequence references.
fn reference_model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(model)
}

fn config(num_blocks: u32) -> EngineConfig {
    EngineConfig {
        num_blocks,
        block_size: BLOCK_SIZE,
        max_batch_tokens: 256,
        max_seqs: 16,
        max_model_len: 1024.min(num_blocks as usize * BLOCK_SIZE),
    }
}

fn start(config: EngineConfig) -> EngineHandle {
    Engine::start(model(), Some(tokenizer()), config, None).expect("engine starts")
}

fn encode(text: &str) -> Vec<u32> {
    tokenizer().encode(text).expect("encodes")
}

/// Waits until `cond` holds for the engine's stats.
fn wait_for(engine: &EngineHandle, what: &str, cond: impl Fn(&EngineHandle) -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !cond(engine) {
        assert!(
            Instant::now() < until,
            "{what}: not reached; stats {:?}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pool_is_whole(engine: &EngineHandle) -> bool {
    let s = engine.stats();
    s.free_blocks + s.cached_free_blocks == s.total_blocks && s.running == 0 && s.waiting == 0
}

/// Greedy tokens of `prompt` run alone, straight through the model, and
/// for each step whether it was a close call (its top-1/top-2 probability
/// ratio below [`CLOSE_CALL`]).
fn reference(prompt: &[u32], max_new: usize) -> (Vec<u32>, Vec<bool>) {
    let model = reference_model();
    let blocks = (prompt.len() + max_new).div_ceil(BLOCK_SIZE);
    let mut kv = KvStorage::new(model.kv_shape(blocks, BLOCK_SIZE)).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let (mut tokens, mut close) = (Vec::new(), Vec::new());
    let mut pending = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..max_new {
        let input = SequenceInput {
            tokens: &pending,
            start_pos: pos,
            block_table: &table,
        };
        let logits = model
            .forward(&mut kv, &[input], LogitsFor::LastToken)
            .unwrap();
        let mut top = [f32::NEG_INFINITY; 2];
        for &v in &logits[0] {
            if v > top[0] {
                top = [v, top[0]];
            } else if v > top[1] {
                top[1] = v;
            }
        }
        close.push((top[0] - top[1]).exp() < CLOSE_CALL);
        let token = argmax(&logits[0]).unwrap() as u32;
        tokens.push(token);
        pos += pending.len();
        pending = vec![token];
    }
    (tokens, close)
}

/// `got` follows the reference token for token until the two part, which
/// they may only at one of the reference's close calls (after it the
/// contexts differ, so nothing more is compared); returns how many tokens
/// were compared.
fn assert_follows(what: &str, got: &[u32], reference: &(Vec<u32>, Vec<bool>)) -> usize {
    let (want, close) = reference;
    let n = got.iter().zip(want).take_while(|(g, w)| g == w).count();
    eprintln!(
        "{what}: the first {n} of {} tokens as the reference",
        got.len()
    );
    if n < got.len().min(want.len()) {
        assert!(
            close[n],
            "{what}: token {n} is {} where the reference clearly chose {} (tokens {got:?}, reference {want:?})",
            got[n], want[n]
        );
    }
    n
}

#[test]
fn the_capital_of_france_is_paris() {
    let engine = start(config(64));
    let prompt = [504, 3575, 282, 4649, 314];
    let mut request = greedy("paris", &prompt, 3);
    request.sampling.ignore_eos = false;
    let out = collect(engine.submit(request).unwrap());
    assert!(out.error.is_none(), "{:?}", out.error);
    assert!(out.text.starts_with(" Paris"), "{:?}", out.text);
    assert_eq!(out.finish, Some(FinishReason::Length));
    let usage = out.usage.expect("usage on the last output");
    assert_eq!(usage.prompt_tokens, 5);
    assert_eq!(usage.completion_tokens, 3);
    engine.shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(
        engine.submit(greedy("late", &prompt, 1)).unwrap_err(),
        EngineError::ShutDown
    );
}

#[test]
fn batched_requests_match_each_run_alone() {
    // Prompts whose greedy continuations are mostly clear choices.
    let texts = [
        "1, 2, 3, 4, 5,",
        "10, 20, 30, 40,",
        "A, B, C, D,",
        "The capital of Germany is",
        "The capital of France is",
        "Monday, Tuesday, Wednesday,",
        "January, February, March,",
        "Water boils at a temperature of",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| encode(t)).collect();
    let max_new = 12;
    // A small token budget makes steps mix decodes with prefill chunks.
    let engine = start(EngineConfig {
        max_batch_tokens: 24,
        ..config(128)
    });
    let receivers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            engine
                .submit(greedy(&format!("batch-{i}"), p, max_new))
                .unwrap()
        })
        .collect();
    let outs: Vec<Collected> = receivers.into_iter().map(collect).collect();
    let mut compared = 0;
    for ((text, prompt), out) in texts.iter().zip(&prompts).zip(&outs) {
        assert!(out.error.is_none(), "{text}: {:?}", out.error);
        assert_eq!(out.tokens.len(), max_new as usize, "{text}");
        compared += assert_follows(text, &out.tokens, &reference(prompt, max_new as usize));
    }
    assert!(
        compared >= 60,
        "only {compared} tokens followed the reference"
    );
    assert!(
        engine.stats().steps < 8 * max_new as u64,
        "requests shared steps"
    );
    wait_for(&engine, "all blocks back", pool_is_whole);
}

#[test]
fn a_shared_prefix_is_reused_and_changes_nothing() {
    let story = "Alice was beginning to get very tired of sitting by her sister on the \
        bank, and of having nothing to do: once or twice she had peeped into the book her \
        sister was reading, but it had no pictures or conversations in it, and what is the \
        use of a book, thought Alice, without pictures or conversations? So she was \
        considering in her own mind (as well as she could, for the hot day made her feel \
        very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth \
        the trouble of getting up and picking the daisies, when suddenly a White Rabbit with \
        pink eyes ran close by her. There was nothing so very remarkable in that; nor did \
        Alice think it so very much out of the way to hear the Rabbit say to itself, Oh dear! \
        Oh dear! I shall be late! (when she thought it over afterwards, it occurred to her \
        that she ought to have wondered at this, but at the time it all seemed quite natural); \
        but when the Rabbit actually took a watch out of its waistcoat-pocket, and looked at \
        it, and then hurried on, Alice started to her feet.";
    let tokens = encode(story);
    assert!(tokens.len() >= 200, "story has {} tokens", tokens.len());
    let prefix = &tokens[..200];
    let first: Vec<u32> = [prefix, &encode(" Let us count: 1, 2, 3, 4, 5,")[..]].concat();
    let second: Vec<u32> = [
        prefix,
        &encode(" Days of the week: Monday, Tuesday, Wednesday,")[..],
    ]
    .concat();
    let max_new = 10;

    let engine = start(config(128));
    let out1 = collect(engine.submit(greedy("first", &first, max_new)).unwrap());
    assert_eq!(out1.usage.unwrap().cached_tokens, 0);
    let hits_before = engine.stats().prefix_hit_blocks;
    let out2 = collect(engine.submit(greedy("second", &second, max_new)).unwrap());
    let usage = out2.usage.expect("usage");
    // 200 shared tokens fill 12 blocks of 16.
    assert_eq!(usage.cached_tokens, 12 * BLOCK_SIZE, "{usage:?}");
    assert_eq!(usage.prompt_tokens, second.len());
    assert!(engine.stats().prefix_hit_blocks >= hits_before + 12);

    let fresh = start(config(128));
    let cold = collect(fresh.submit(greedy("second", &second, max_new)).unwrap());
    assert_eq!(cold.usage.unwrap().cached_tokens, 0);
    let want = reference(&second, max_new as usize);
    let n = assert_follows("with cache", &out2.tokens, &want);
    assert_follows("without cache", &cold.tokens, &want);
    assert!(n >= 8, "only {n} tokens followed the reference");
    assert_eq!(out2.tokens[..n], cold.tokens[..n]);

    // Every block is back, the shared ones still cached for the next hit.
    wait_for(&engine, "all blocks back", pool_is_whole);
    assert!(engine.stats().cached_free_blocks >= 12);
    wait_for(&fresh, "all blocks back", pool_is_whole);
}

#[test]
fn bad_requests_get_clear_errors() {
    let engine = start(config(64));
    let ok = encode("Hello there");
    let cases: Vec<(Request, &str)> = vec![
        (greedy("empty", &[], 4), "prompt is empty"),
        (
            greedy("vocab", &[504, 49152, 3], 4),
            "prompt token 1 has id 49152, which is not in the model's vocabulary (size 49152)",
        ),
        (
            greedy("long", &vec![504; 1024], 4),
            "the prompt has 1024 tokens, but this model's context length is 1024 tokens",
        ),
        (
            greedy("context", &ok, 1023),
            "plus max_tokens (1023) exceeds this model's context length of 1024 tokens",
        ),
        (
            greedy("zero", &ok, 0),
            "max_tokens must be at least 1, got 0",
        ),
    ];
    for (request, message) in cases {
        let id = request.id.clone();
        let err = engine.submit(request).unwrap_err();
        assert!(err.is_invalid_request(), "{id}: {err:?}");
        assert!(err.to_string().contains(message), "{id}: {err}");
    }
    let mut hot = greedy("hot", &ok, 4);
    hot.sampling.temperature = 3.0;
    assert!(matches!(
        engine.submit(hot).unwrap_err(),
        EngineError::Sampling(SamplingParamsError::Temperature(_))
    ));

    // An engine whose cache cannot hold one full-length request is refused.
    let err = Engine::start(
        model(),
        None,
        EngineConfig {
            max_model_len: 128,
            ..config(4)
        },
        None,
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::Config(_)), "{err:?}");
    assert!(
        err.to_string().contains("does not fit the KV cache"),
        "{err}"
    );

    // A second live request with the same id is refused on its stream.
    let _first = engine.submit(greedy("twin", &ok, 200)).unwrap();
    let second = collect(engine.submit(greedy("twin", &ok, 4)).unwrap());
    assert_eq!(second.error, Some(EngineError::DuplicateId("twin".into())));
    assert!(second.tokens.is_empty());
}

#[test]
fn few_blocks_force_preemption_and_every_request_still_completes() {
    // 20 blocks of 16 = 320 tokens; four requests that end at 90 to 115
    // tokens each need about 28 blocks together.
    let engine = start(EngineConfig {
        num_blocks: 20,
        block_size: BLOCK_SIZE,
        max_batch_tokens: 128,
        max_seqs: 8,
        max_model_len: 320,
    });
    let texts = [
        "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize foods from carbon dioxide and water. It generally involves",
        "Counting to one hundred: 1, 2, 3, 4, 5, 6, 7, 8,",
        "The alphabet is A, B, C, D, E, F,",
        "10, 20, 30, 40,",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| encode(t)).collect();
    let max_new = 80u32;
    let receivers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            engine
                .submit(greedy(&format!("long-{i}"), p, max_new))
                .unwrap()
        })
        .collect();
    let outs: Vec<Collected> = receivers.into_iter().map(collect).collect();
    assert!(
        engine.stats().preemptions > 0,
        "the pool was meant to run out"
    );
    let mut compared = 0;
    for ((text, prompt), out) in texts.iter().zip(&prompts).zip(&outs) {
        assert!(out.error.is_none(), "{text}: {:?}", out.error);
        assert_eq!(out.tokens.len(), max_new as usize);
        assert_eq!(out.finish, Some(FinishReason::Length));
        compared += assert_follows(text, &out.tokens, &reference(prompt, max_new as usize));
    }
    assert!(
        compared >= 100,
        "only {compared} tokens followed the reference"
    );
    wait_for(&engine, "all blocks back", pool_is_whole);
}

#[test]
fn a_dropped_receiver_or_a_cancel_frees_the_blocks() {
    let engine = start(config(64));
    let prompt = encode("Write a very long story about a dragon who learns to fly.");
    let mut rx = engine.submit(greedy("dropped", &prompt, 500)).unwrap();
    let first = rx.blocking_recv().expect("a first token");
    assert!(first.is_ok());
    wait_for(&engine, "running", |e| e.stats().running == 1);
    drop(rx);
    wait_for(&engine, "blocks back after the drop", pool_is_whole);

    let mut rx = engine.submit(greedy("cancelled", &prompt, 500)).unwrap();
    assert!(rx.blocking_recv().expect("a first token").is_ok());
    engine.cancel("cancelled").unwrap();
    wait_for(&engine, "blocks back after the cancel", pool_is_whole);
    // The stream ends (perhaps after tokens already in flight).
    let out = collect(rx);
    assert!(out.finish.is_none() && out.error.is_none());
    assert!(out.tokens.len() < 499);
}

#[test]
fn a_remotely_prefilled_prompt_decodes_like_a_local_one() {
    let prompt = encode(
        "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize foods from carbon dioxide and water. It generally involves",
    );
    let max_new = 12u32;
    // Engine A plays the prefill worker: it computes the prompt, samples
    // the first token and keeps the blocks for the transfer to read.
    let prefill = start(config(64));
    let first = collect(prefill.submit_prefill(greedy("p", &prompt, 1)).unwrap());
    let first_token = first.tokens[0];
    let table = prefill.block_table("p").wait().unwrap();
    wait_for(&prefill, "the prompt's KV held", |e| e.stats().held == 1);
    assert_eq!(table.len(), prompt.len().div_ceil(BLOCK_SIZE));
    let bytes: Vec<Vec<u8>> = prefill
        .with_kv_storage(move |kv| table.iter().map(|&b| kv.read_block(b).unwrap()).collect())
        .wait()
        .unwrap();
    prefill.cancel("p").unwrap();
    wait_for(&prefill, "prefill blocks released", pool_is_whole);

    // Engine B reserves blocks, receives the bytes, and decodes.
    let decode = start(config(64));
    let (rx, reservation) = decode
        .begin_remote_prefill(greedy("d", &prompt, max_new))
        .wait()
        .unwrap();
    assert_eq!(reservation.cached_tokens, 0);
    assert_eq!(reservation.block_ids.len(), bytes.len());
    wait_for(&decode, "a transfer in flight", |e| {
        e.stats().transferring == 1
    });
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
        .complete_remote_prefill("d", first_token, None)
        .wait()
        .unwrap();
    let remote = collect(rx);
    assert!(remote.error.is_none(), "{:?}", remote.error);
    assert_eq!(remote.tokens.len(), max_new as usize);
    assert_eq!(remote.tokens[0], first_token);
    let usage = remote.usage.unwrap();
    assert_eq!(usage.prompt_tokens, prompt.len());
    assert_eq!(usage.completion_tokens, max_new as usize);

    // A cancelled transfer falls back to local prefill on the same engine
    // (here through the async calls a decode agent would use).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let rx = runtime.block_on(async {
        let (rx, reservation) = decode
            .begin_remote_prefill(greedy("fallback", &prompt, max_new))
            .await
            .unwrap();
        // The first engine's request left the prompt's full blocks cached.
        assert_eq!(
            reservation.cached_tokens,
            prompt.len() / BLOCK_SIZE * BLOCK_SIZE
        );
        decode.cancel_remote_prefill("fallback").await.unwrap();
        rx
    });
    let local = collect(rx);
    assert_eq!(local.tokens.len(), max_new as usize);

    // A request cancelled mid-transfer keeps its blocks pinned until the
    // transfer ends, so a late write cannot land in someone else's KV.
    let (rx, _) = decode
        .begin_remote_prefill(greedy("abandoned", &prompt, max_new))
        .wait()
        .unwrap();
    decode.cancel("abandoned").unwrap();
    let abandoned = collect(rx);
    assert!(abandoned.tokens.is_empty());
    // Commands are handled in order, so this answer comes after the cancel.
    let pinned = decode.block_table("abandoned").wait().unwrap();
    assert_eq!(pinned.len(), prompt.len().div_ceil(BLOCK_SIZE));
    decode.cancel_remote_prefill("abandoned").wait().unwrap();

    let want = reference(&prompt, max_new as usize);
    let n = assert_follows("remote prefill", &remote.tokens, &want);
    assert!(n >= 10, "only {n} tokens followed the reference");
    assert_follows("local fallback", &local.tokens, &want);
    wait_for(&decode, "all blocks back", pool_is_whole);
}

#[test]
fn kv_events_pass_through() {
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::start(model(), Some(tokenizer()), config(64), Some(tx)).unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| 500 + i).collect();
    collect(engine.submit(greedy("events", &prompt, 2)).unwrap());
    assert_eq!(events.try_recv().unwrap().data, KvEventData::Cleared);
    let stored = events.try_recv().unwrap();
    match stored.data {
        KvEventData::Stored { block_hashes, .. } => assert_eq!(block_hashes.len(), 2),
        other => panic!("expected a Stored event, got {other:?}"),
    }
}

#[test]
fn generation_without_max_tokens_stops_at_the_context_window() {
    let engine = start(EngineConfig {
        max_model_len: 24,
        ..config(8)
    });
    let mut request = greedy("window", &encode("1, 2, 3, 4, 5,"), 1);
    request.sampling.max_tokens = None;
    let out = collect(engine.submit(request).unwrap());
    assert!(out.error.is_none(), "{:?}", out.error);
    let usage = out.usage.expect("usage");
    assert_eq!(usage.prompt_tokens + usage.completion_tokens, 24);
    assert_eq!(out.finish, Some(FinishReason::Length));
    assert!(out.text.starts_with(" 6, 7, 8"), "{:?}", out.text);
}

#[test]
fn shutdown_ends_live_streams_with_an_error() {
    let engine = start(config(64));
    let mut rx = engine
        .submit(greedy("live", &encode("1, 2, 3, 4, 5,"), 500))
        .unwrap();
    assert!(rx.blocking_recv().expect("a first token").is_ok());
    engine.shutdown(Duration::from_secs(30)).unwrap();
    let out = collect(rx);
    assert_eq!(out.error, Some(EngineError::ShutDown));
    assert!(out.finish.is_none());
}

#[test]
fn a_chat_answer_streams_its_text_and_stops_at_eos() {
    let tok = tokenizer();
    let template =
        ChatTemplate::new(tok.chat_template().unwrap(), "<|im_start|>", "<|im_end|>").unwrap();
    let prompt = template
        .render(
            &[ChatMessage::new("user", "Name the capital of France.")],
            true,
        )
        .unwrap();
    let engine = start(config(64));
    let mut request = greedy("chat", &tok.encode(&prompt).unwrap(), 32);
    request.sampling.ignore_eos = false;
    let out = collect(engine.submit(request).unwrap());
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.text, "The capital of France is Paris.");
    assert_eq!(out.finish, Some(FinishReason::Stop));
    assert_eq!(out.tokens.last().copied(), tok.eos_token_id());
}

/// A prompt longer than the step budget is prefilled over several steps,
/// some of which need no logits at all; it gives the same tokens as when
/// one step holds it whole.
#[test]
fn a_prompt_longer_than_the_step_budget_is_prefilled_in_chunks() {
    let prompt = encode(&"The quick brown fox jumps over the lazy dog. ".repeat(60));
    assert!(prompt.len() > 600, "{}", prompt.len());
    let chunked = start(config(128));
    let got = collect(chunked.submit(greedy("chunked", &prompt, 4)).unwrap());
    assert!(got.error.is_none(), "{:?}", got.error);
    let whole = start(EngineConfig {
        max_batch_tokens: 1024,
        ..config(128)
    });
    let want = collect(whole.submit(greedy("whole", &prompt, 4)).unwrap());
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.tokens.len(), 4);
    // The engine still serves afterwards.
    assert!(chunked.stats().total_blocks > 0);
    let again = collect(
        chunked
            .submit(greedy("again", &encode("Hello"), 2))
            .unwrap(),
    );
    assert!(again.error.is_none(), "{:?}", again.error);
}

#[test]
fn logprobs_come_from_the_model_and_only_when_asked() {
    let engine = start(config(64));
    let prompt = [504, 3575, 282, 4649, 314];
    let mut asked = greedy("lp", &prompt, 2);
    asked.sampling.logprobs = Some(5);
    let out = collect(engine.submit(asked).unwrap()).ok();
    let first = out.logprobs[0].clone().expect("logprobs when asked");
    assert_eq!(out.logprobs.len(), 2);
    assert!(out.logprobs.iter().all(Option::is_some));

    // The log-softmax of the model's own logits for the prompt.
    let model = reference_model();
    let mut kv = KvStorage::new(model.kv_shape(1, BLOCK_SIZE)).unwrap();
    let input = SequenceInput {
        tokens: &prompt,
        start_pos: 0,
        block_table: &[0],
    };
    let logits = &model
        .forward(&mut kv, &[input], LogitsFor::LastToken)
        .unwrap()[0];
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_total = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let expected = |t: u32| (logits[t as usize] as f64 - log_total) as f32;
    assert_eq!(first.token, out.tokens[0]);
    assert!(
        (first.logprob - expected(first.token)).abs() < 1e-3,
        "{first:?}"
    );
    assert_eq!(first.top.len(), 5);
    assert_eq!(
        first.top[0],
        (first.token, first.logprob),
        "greedy is the top"
    );
    assert!(first.top.windows(2).all(|w| w[0].1 >= w[1].1), "{first:?}");
    for &(t, l) in &first.top {
        assert!((l - expected(t)).abs() < 1e-3, "{t}: {l}");
    }
    // " Paris" at about 0.77 (FACTS.md).
    let p = first.logprob.exp();
    assert!((0.6..0.9).contains(&p), "{p}");

    // Not asked: nothing computed, same tokens.
    let plain = collect(engine.submit(greedy("plain", &prompt, 2)).unwrap()).ok();
    assert_eq!(plain.tokens, out.tokens);
    assert!(plain.logprobs.iter().all(Option::is_none));

    // A remote prefill's first token streams with the logprobs the prefill
    // side sent; the tokens after it get theirs computed here.
    let mut remote = greedy("remote", &prompt, 3);
    remote.sampling.logprobs = Some(2);
    let (rx, _reservation) = engine.begin_remote_prefill(remote).wait().unwrap();
    let sent = TokenLogprobs {
        token: first.token,
        logprob: -0.125,
        top: vec![(first.token, -0.125), (7, -3.0)],
    };
    engine
        .complete_remote_prefill("remote", first.token, Some(sent.clone()))
        .wait()
        .unwrap();
    let remote = collect(rx).ok();
    assert_eq!(remote.logprobs[0], Some(sent));
    assert_eq!(remote.logprobs.len(), 3);
    assert!(
        remote.logprobs[1..]
            .iter()
            .all(|l| l.as_ref().is_some_and(|l| l.top.len() == 2))
    );
}
