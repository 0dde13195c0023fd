//! Structured output in the engine on the bundled SmolLM2-135M-Instruct: a
//! request with a JSON schema gets JSON that matches it and ends when the
//! JSON does, greedy or sampled; a schema llguidance cannot compile is the
//! caller's fault; compiled grammars are reused.
//!
//! The 20-prompt validation against a nested schema runs through the
//! official `openai` client (`agent/tests/openai_structured.py`), where
//! pydantic validates each answer.

mod common;

use common::{collect, gguf};
use xpyd_runtime::engine::chat_template::{ChatMessage, ChatTemplate};
use xpyd_runtime::engine::grammar::{GRAMMAR_CACHE_ENTRIES, GrammarCompiler, GrammarError};
use xpyd_runtime::engine::model::Model;
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineError, EngineHandle, Request};
use xpyd_runtime::engine::sampling::{FinishReason, SamplingParams};
use xpyd_runtime::engine::tokenizer::Tokenizer;

const PERSON: &str = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":20},"age":{"type":"integer","minimum":0,"maximum":120},"role":{"enum":["admin","user","guest"]}},"required":["name","age","role"],"additionalProperties":false}"#;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(gguf()).expect("tokenizer loads")
}

fn start() -> EngineHandle {
    let config = EngineConfig {
        num_blocks: 128,
        block_size: 16,
        max_batch_tokens: 256,
        max_seqs: 8,
        max_model_len: 1024,
    };
    Engine::start(
        Model::from_gguf(gguf()).expect("model loads"),
        Some(tokenizer()),
        config,
        None,
    )
    .expect("engine starts")
}

fn chat_prompt(user: &str) -> Vec<u32> {
    let tok = tokenizer();
    let template = ChatTemplate::new(
        tok.chat_template().expect("template"),
        "<|im_start|>",
        "<|im_end|>",
    )
    .expect("template compiles");
    let text = template
        .render(
            &[ChatMessage {
                role: "user".into(),
                content: user.into(),
            }],
            true,
        )
        .expect("renders");
    tok.encode(&text).expect("encodes")
}

fn request(id: &str, user: &str, temperature: f32, seed: u64) -> Request {
    Request {
        id: id.into(),
        prompt_token_ids: chat_prompt(user),
        sampling: SamplingParams {
            temperature,
            seed: Some(seed),
            max_tokens: Some(200),
            json_schema: Some(PERSON.into()),
            ..SamplingParams::default()
        },
    }
}

/// Whether `text` is a person as [`PERSON`] describes one.
fn is_person(text: &str) -> bool {
    let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys == ["age", "name", "role"]
        && o["name"].as_str().is_some_and(|n| n.chars().count() <= 20)
        && o["age"].as_u64().is_some_and(|a| a <= 120)
        && ["admin", "user", "guest"].contains(&o["role"].as_str().unwrap_or(""))
}

#[test]
fn constrained_output_matches_the_schema_and_stops_there() {
    let engine = start();
    let prompts = [
        "Describe Alice, a 30 year old administrator, as JSON.",
        "Write a haiku about the sea.",
        "Name the capital of France.",
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        for (temperature, seed) in [(0.0, 0), (1.0, i as u64 + 7)] {
            let out = collect(
                engine
                    .submit(request(
                        &format!("p{i}-{temperature}"),
                        prompt,
                        temperature,
                        seed,
                    ))
                    .expect("submits"),
            )
            .ok();
            println!("{prompt:?} at {temperature}: {}", out.text);
            assert!(
                is_person(&out.text),
                "{prompt:?} at temperature {temperature}: {:?}",
                out.text
            );
            assert_eq!(
                out.finish,
                Some(FinishReason::Stop),
                "the output ends with the JSON: {:?}",
                out.text
            );
        }
    }
    // Without a schema the same prompt answers in prose.
    let mut free = request("free", prompts[2], 0.0, 0);
    free.sampling.json_schema = None;
    let out = collect(engine.submit(free).expect("submits")).ok();
    assert!(out.text.contains("Paris"), "{:?}", out.text);
}

#[test]
fn a_schema_that_cannot_compile_is_the_callers_fault() {
    let engine = start();
    for bad in [
        r##"{"type":"object","properties":{"x":{"$ref":"#/$defs/missing"}}}"##,
        r#"{"type":"strange"}"#,
        "not json",
    ] {
        let mut r = request("bad", "hi", 0.0, 0);
        r.sampling.json_schema = Some(bad.into());
        let error = engine.submit(r).expect_err(bad);
        assert!(
            matches!(error, EngineError::Grammar(GrammarError::Schema(_))),
            "{bad}: {error:?}"
        );
        assert!(error.is_invalid_request(), "{bad}: {error}");
        assert!(error.to_string().contains("JSON schema"), "{error}");
    }
}

#[test]
fn grammars_compile_once_per_schema_in_a_bounded_cache() {
    let compiler = GrammarCompiler::new(&tokenizer(), 49152).expect("compiler");
    for _ in 0..3 {
        compiler.compile(PERSON).expect("compiles");
    }
    assert_eq!(
        compiler.compilations(),
        1,
        "later requests reuse the grammar"
    );
    for n in 0..GRAMMAR_CACHE_ENTRIES + 5 {
        let schema = format!(r#"{{"type":"object","properties":{{"k{n}":{{"type":"integer"}}}}}}"#);
        compiler.compile(&schema).expect("compiles");
    }
    assert_eq!(compiler.cached(), GRAMMAR_CACHE_ENTRIES);
    compiler.compile(PERSON).expect("compiles");
    assert_eq!(
        compiler.compilations(),
        GRAMMAR_CACHE_ENTRIES as u64 + 7,
        "the oldest was evicted"
    );
}
