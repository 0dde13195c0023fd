//! The cost of structured output on the bundled SmolLM2-135M (Q4_1): decode
//! tokens per second with a JSON schema against without, on the same
//! prompts and the same number of tokens; grammar compile time (the
//! vocabulary index built once per engine, a schema cold, a schema cached);
//! and the token mask's time per step.
//!
//! Run with `cargo bench -p xpyd-runtime --bench structured`; it prints
//! figures and asserts nothing. Requests run one at a time (batch 1), where
//! the mask is the largest share of a step.

use std::time::{Duration, Instant};

use xpyd_runtime::assets::bundled_model;
use xpyd_runtime::engine::chat_template::{ChatMessage, ChatTemplate};
use xpyd_runtime::engine::gguf::GgufFile;
use xpyd_runtime::engine::grammar::GrammarCompiler;
use xpyd_runtime::engine::model::Model;
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineHandle, Request};
use xpyd_runtime::engine::sampling::SamplingParams;
use xpyd_runtime::engine::tokenizer::Tokenizer;

/// A typical schema: nested object, enum, bounded strings and array.
const SCHEMA: &str = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":24},"age":{"type":"integer","minimum":0,"maximum":120},"favourite_colour":{"enum":["red","green","blue"]},"address":{"type":"object","properties":{"city":{"type":"string","maxLength":24},"country":{"type":"string","maxLength":24}},"required":["city","country"],"additionalProperties":false},"hobbies":{"type":"array","items":{"type":"string","maxLength":16},"maxItems":3}},"required":["name","age","favourite_colour","address","hobbies"],"additionalProperties":false}"#;

const PROMPTS: [&str; 8] = [
    "Describe Marie, a 34 year old painter from Lyon, France.",
    "Tell me about a chef from Rome.",
    "Invent a pirate.",
    "Describe a Japanese engineer.",
    "Give me a profile of a retired teacher.",
    "Describe a musician from Brazil.",
    "Describe a baker in Berlin.",
    "Tell me about an astronaut.",
];

/// Decode time (first token to last) and tokens of one request.
fn run(engine: &EngineHandle, request: Request) -> (Duration, usize, String) {
    let mut rx = engine.submit(request).expect("submits");
    let mut first = None;
    let mut tokens = 0;
    let mut text = String::new();
    while let Some(item) = rx.blocking_recv() {
        let out = item.expect("no engine error");
        first.get_or_insert_with(Instant::now);
        tokens += 1;
        text.push_str(&out.text);
        if out.finish.is_some() {
            break;
        }
    }
    let first = first.expect("a token");
    (first.elapsed(), tokens, text)
}

fn main() {
    let file = GgufFile::open(&bundled_model().expect("bundled model")).expect("GGUF parses");
    let tokenizer = || Tokenizer::from_gguf(&file).expect("tokenizer");
    let tok = tokenizer();
    let template = ChatTemplate::new(tok.chat_template().expect("template"), "", "<|im_end|>")
        .expect("template");
    let prompt = |user: &str| {
        let text = template
            .render(&[ChatMessage::new("user", user)], true)
            .expect("renders");
        tok.encode(&text).expect("encodes")
    };

    // Compile times on a compiler of its own, so that nothing is warm.
    let compiler = GrammarCompiler::new(&tok, 49152).expect("compiler");
    let started = Instant::now();
    compiler.compile(r#"{"type":"object"}"#).expect("compiles");
    let index = started.elapsed();
    let started = Instant::now();
    compiler.compile(SCHEMA).expect("compiles");
    let cold = started.elapsed();
    let started = Instant::now();
    for _ in 0..100 {
        compiler.compile(SCHEMA).expect("compiles");
    }
    let cached = started.elapsed() / 100;
    println!(
        "grammar: vocabulary index + first schema {index:.1?} (once per engine); \
         typical schema cold {cold:.2?}, cached {cached:.2?}"
    );

    let config = EngineConfig {
        num_blocks: 128,
        block_size: 16,
        max_batch_tokens: 256,
        max_seqs: 8,
        max_model_len: 1024,
    };
    let model = Model::from_gguf(&file).expect("model loads");
    let engine = Engine::start(model, Some(tokenizer()), config, None).expect("engine starts");
    let (mut with, mut without) = ((Duration::ZERO, 0usize), (Duration::ZERO, 0usize));
    let mut mask_time = Duration::ZERO;
    let mut masks = 0u32;
    for (i, user) in PROMPTS.iter().enumerate() {
        let ids = prompt(user);
        let constrained = Request {
            id: format!("json-{i}"),
            prompt_token_ids: ids.clone(),
            sampling: SamplingParams {
                temperature: 0.0,
                max_tokens: Some(300),
                json_schema: Some(SCHEMA.into()),
                ..SamplingParams::default()
            },
        };
        let (secs, tokens, text) = run(&engine, constrained);
        with.0 += secs;
        with.1 += tokens;
        // The same number of tokens without a schema.
        let free = Request {
            id: format!("free-{i}"),
            prompt_token_ids: ids,
            sampling: SamplingParams {
                temperature: 0.0,
                max_tokens: Some(tokens as u32),
                min_tokens: tokens as u32,
                ignore_eos: true,
                ..SamplingParams::default()
            },
        };
        let (secs, free_tokens, _) = run(&engine, free);
        without.0 += secs;
        without.1 += free_tokens;
        // The mask alone, replayed over the constrained answer's tokens.
        let mut grammar = compiler.compile(SCHEMA).expect("compiles");
        let mut logits = vec![0.0f32; 49152];
        for token in tok.encode(&text).expect("encodes") {
            let started = Instant::now();
            grammar.mask(&mut logits).expect("mask");
            mask_time += started.elapsed();
            masks += 1;
            if grammar.accept(token).is_err() {
                break;
            }
        }
        println!("  {user:?} -> {text}");
    }
    // Decode steps: the first token of each request comes from prefill.
    let rate =
        |(secs, tokens): (Duration, usize)| (tokens - PROMPTS.len()) as f64 / secs.as_secs_f64();
    let (w, wo) = (rate(with), rate(without));
    println!(
        "decode, batch 1, {} prompts: with json_schema {w:.1} tok/s, without {wo:.1} tok/s \
         ({:+.1}%); {} tokens each way",
        PROMPTS.len(),
        (w / wo - 1.0) * 100.0,
        with.1
    );
    println!(
        "mask per token: {:.1?} mean over {masks} steps",
        mask_time / masks.max(1)
    );
}
