//! The OpenAI-compatible HTTP API as a client sees it: the real axum server
//! on 127.0.0.1:0 over a real SmolLM2-135M-Instruct engine, spoken to with
//! reqwest. Greedy chat, streaming equal to non-streaming, text completions,
//! a table of bad requests, client disconnects freeing KV blocks, metrics,
//! and a property test of request parsing.
//!
//! One server serves every test; tests take a lock so that block counts
//! observed by one are not disturbed by another.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::local_backend::LocalBackend;
use futures::StreamExt;
use futures::future::BoxFuture;
use proptest::prelude::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use xpyd_runtime::assets::bundled_model;
use xpyd_runtime::engine::chat_template::ChatMessage;
use xpyd_runtime::engine::gguf::GgufFile;
use xpyd_runtime::engine::model::Model;
use xpyd_runtime::engine::runner::{Engine, EngineConfig, EngineHandle, Output};
use xpyd_runtime::engine::tokenizer::Tokenizer;
use xpyd_runtime::frontend::extract::parse_request;
use xpyd_runtime::frontend::protocol::{ChatCompletionRequest, CompletionRequest, ModelCard};
use xpyd_runtime::frontend::{
    BODY_LIMIT, BackendError, CLOSE_WINDOW, CompletionBackend, GenerateRequest, OutputStream,
    router, serve,
};

const MODEL: &str = "SmolLM2-135M-Instruct";
const MAX_MODEL_LEN: usize = 1024;
const DEADLINE: Duration = Duration::from_secs(120);

struct Server {
    base: String,
    engine: EngineHandle,
}

/// The shared server, on a runtime of its own that outlives each test's.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let path = bundled_model().expect("the bundled model (run scripts/setup)");
        let gguf = GgufFile::open(&path).expect("GGUF parses");
        let model = Model::from_gguf(&gguf).expect("model loads");
        let config = EngineConfig {
            num_blocks: 128,
            block_size: 16,
            max_batch_tokens: 256,
            max_seqs: 8,
            max_model_len: MAX_MODEL_LEN,
        };
        let engine_tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer loads");
        let engine =
            Engine::start(model, Some(engine_tokenizer), config, None).expect("engine starts");
        let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer loads");
        let backend = LocalBackend::new(MODEL, engine.clone(), tokenizer).expect("backend");
        let app = router(std::sync::Arc::new(backend), prometheus::Registry::new())
            .expect("metrics register");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("address"))
                    .expect("send address");
                serve(listener, app, std::future::pending(), CLOSE_WINDOW)
                    .await
                    .expect("serve");
            });
        });
        let addr = addr_rx.recv().expect("server address");
        Server {
            base: format!("http://{addr}"),
            engine,
        }
    })
}

/// Serializes the tests of this file (see the module doc).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Usage without `cached_tokens`, which differs between identical requests
/// (the second finds the first's prefix in the cache).
fn counts(usage: &Value) -> [&Value; 3] {
    [
        &usage["prompt_tokens"],
        &usage["completion_tokens"],
        &usage["total_tokens"],
    ]
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("client")
}

fn url(path: &str) -> String {
    format!("{}{path}", server().base)
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name the capital of France."}],
        "temperature": 0,
        "max_tokens": 32,
    });
    merge(&mut body, extra);
    body
}

fn merge(body: &mut Value, extra: Value) {
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
}

async fn post_json(path: &str, body: &Value) -> (StatusCode, Value) {
    let response = client()
        .post(url(path))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    let json = response.json().await.expect("JSON body");
    (status, json)
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
async fn sse_payloads(path: &str, body: &Value) -> Vec<String> {
    let response = client()
        .post(url(path))
        .json(body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = response.text().await.expect("body");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn assert_usage(usage: &Value) {
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(prompt > 0 && completion > 0, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
}

#[tokio::test]
async fn chat_greedy_answer_and_stream_agree() {
    let _serial = serial().await;
    let (status, body) = post_json("/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        "The capital of France is Paris."
    );
    assert_eq!(choice["finish_reason"], "stop");
    assert_usage(&body["usage"]);

    let stream_body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let payloads = sse_payloads("/v1/chat/completions", &stream_body).await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk is JSON"))
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, choice["message"]["content"].as_str().unwrap());
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("stop")]);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(counts(&usage_chunk["usage"]), counts(&body["usage"]));

    // Without include_usage no chunk carries usage.
    let payloads = sse_payloads("/v1/chat/completions", &chat_body(json!({"stream": true}))).await;
    assert!(payloads.iter().all(|p| !p.contains("\"usage\"")));
}

#[tokio::test]
async fn completions_text_and_token_prompts() {
    let _serial = serial().await;
    let body = json!({
        "model": MODEL, "prompt": "The capital of France is",
        "temperature": 0, "max_tokens": 5,
    });
    let (status, response) = post_json("/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["object"], "text_completion");
    let choice = &response["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(response["usage"]["prompt_tokens"], 5);
    assert_eq!(response["usage"]["completion_tokens"], 5);
    assert_eq!(response["usage"]["total_tokens"], 10);

    // The same prompt as token ids gives the same text.
    let ids = json!({
        "model": MODEL, "prompt": [504, 3575, 282, 4649, 314],
        "temperature": 0, "max_tokens": 5,
    });
    let (status, by_ids) = post_json("/v1/completions", &ids).await;
    assert_eq!(status, StatusCode::OK, "{by_ids}");
    assert_eq!(by_ids["choices"][0]["text"], choice["text"]);

    // Streamed, the pieces add up to the same text.
    let mut streamed = body.clone();
    merge(
        &mut streamed,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let payloads = sse_payloads("/v1/completions", &streamed).await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk is JSON"))
        .collect();
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(joined, text);
    assert_eq!(
        counts(&chunks.last().unwrap()["usage"]),
        counts(&response["usage"])
    );
}

#[tokio::test]
async fn models_health_and_metrics() {
    let _serial = serial().await;
    let models: Value = client()
        .get(url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");

    let health = client().get(url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let response = client()
        .post(url("/v1/chat/completions"))
        .json(&chat_body(json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], id);
    let metrics = client()
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "xpyd_frontend_time_to_first_token_seconds_bucket",
        "xpyd_frontend_inter_token_latency_seconds_bucket",
        "xpyd_frontend_request_duration_seconds_bucket",
        "xpyd_frontend_requests_total",
        "xpyd_frontend_input_tokens_total",
        "xpyd_frontend_output_tokens_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    assert!(
        metrics.contains(&format!(
            "xpyd_frontend_requests_total{{endpoint=\"chat_completions\",model=\"{MODEL}\",status=\"200\"}}"
        )),
        "{metrics}"
    );
}

/// A bad request: what is sent, and the status and `param` expected.
struct Bad {
    name: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    param: Option<&'static str>,
}

fn bad(name: &'static str, body: Value, status: u16, param: Option<&'static str>) -> Bad {
    Bad {
        name,
        path: "/v1/chat/completions",
        content_type: "application/json",
        body: body.to_string().into_bytes(),
        status,
        param,
    }
}

fn bad_requests() -> Vec<Bad> {
    let long_prompt = "Paris ".repeat(MAX_MODEL_LEN + 10);
    let mut table = vec![
        bad(
            "wrong type of temperature",
            chat_body(json!({"temperature": "hot"})),
            400,
            Some("temperature"),
        ),
        bad(
            "unknown model",
            chat_body(json!({"model": "gpt-5"})),
            404,
            Some("model"),
        ),
        bad(
            "empty messages",
            chat_body(json!({"messages": []})),
            400,
            Some("messages"),
        ),
        bad(
            "missing messages",
            json!({"model": MODEL}),
            400,
            Some("messages"),
        ),
        bad(
            "missing model",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            Some("model"),
        ),
        bad(
            "prompt over the context length",
            chat_body(json!({"messages": [{"role": "user", "content": long_prompt}]})),
            400,
            Some("messages"),
        ),
        bad(
            "negative max_tokens",
            chat_body(json!({"max_tokens": -1})),
            400,
            Some("max_tokens"),
        ),
        bad(
            "max_tokens 0",
            chat_body(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
        ),
        bad(
            "max_tokens beyond context",
            chat_body(json!({"max_tokens": 100000})),
            400,
            Some("max_tokens"),
        ),
        bad(
            "temperature out of range",
            chat_body(json!({"temperature": 2.5})),
            400,
            Some("temperature"),
        ),
        bad(
            "top_p out of range",
            chat_body(json!({"top_p": 1.5})),
            400,
            Some("top_p"),
        ),
        bad(
            "top_k below -1",
            chat_body(json!({"top_k": -5})),
            400,
            Some("top_k"),
        ),
        bad(
            "stream_options without stream",
            chat_body(json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
        ),
        bad("n=17", chat_body(json!({"n": 17})), 400, Some("n")),
        bad("n=0", chat_body(json!({"n": 0})), 400, Some("n")),
        bad(
            "top_logprobs above 20",
            chat_body(json!({"logprobs": true, "top_logprobs": 21})),
            400,
            Some("top_logprobs"),
        ),
        bad(
            "top_logprobs without logprobs",
            chat_body(json!({"top_logprobs": 2})),
            400,
            Some("top_logprobs"),
        ),
        bad(
            "logprobs not a boolean",
            chat_body(json!({"logprobs": "yes"})),
            400,
            Some("logprobs"),
        ),
        Bad {
            name: "completions logprobs above 5",
            path: "/v1/completions",
            content_type: "application/json",
            body: json!({"model": MODEL, "prompt": "a", "logprobs": 6})
                .to_string()
                .into_bytes(),
            status: 400,
            param: Some("logprobs"),
        },
        bad(
            "unknown role",
            chat_body(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            Some("messages[0].role"),
        ),
        bad(
            "stop with too many entries",
            chat_body(json!({"stop": ["a", "b", "c", "d", "e"]})),
            400,
            Some("stop"),
        ),
        bad(
            "empty stop string",
            chat_body(json!({"stop": [""]})),
            400,
            Some("stop"),
        ),
        bad(
            "min_tokens above max_tokens",
            chat_body(json!({"min_tokens": 50, "max_tokens": 5})),
            400,
            Some("min_tokens"),
        ),
        bad("body is an array", json!([1, 2]), 400, None),
        bad(
            "presence_penalty",
            chat_body(json!({"presence_penalty": 1.0})),
            400,
            Some("presence_penalty"),
        ),
        Bad {
            name: "completion prompt token out of vocabulary",
            path: "/v1/completions",
            content_type: "application/json",
            body: json!({"model": MODEL, "prompt": [1, 999999]})
                .to_string()
                .into_bytes(),
            status: 400,
            param: Some("prompt"),
        },
        Bad {
            name: "completion batch of prompts",
            path: "/v1/completions",
            content_type: "application/json",
            body: json!({"model": MODEL, "prompt": ["a", "b"]})
                .to_string()
                .into_bytes(),
            status: 400,
            param: Some("prompt"),
        },
    ];
    let raw = |name, content_type, body: &[u8], status| Bad {
        name,
        path: "/v1/chat/completions",
        content_type,
        body: body.to_vec(),
        status,
        param: None,
    };
    table.push(raw(
        "malformed JSON",
        "application/json",
        b"{\"model\": ",
        400,
    ));
    table.push(raw(
        "bad UTF-8 bytes",
        "application/json",
        b"{\"model\": \"\xff\xfe\"}",
        400,
    ));
    table.push(raw("wrong content type", "text/plain", b"{}", 415));
    let huge = format!(
        "{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(BODY_LIMIT + 1)
    );
    table.push(raw(
        "huge body over the limit",
        "application/json",
        huge.as_bytes(),
        413,
    ));
    table
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_server_stays_healthy() {
    let _serial = serial().await;
    let table = bad_requests();
    assert!(table.len() >= 15);
    for case in table {
        let response = client()
            .post(url(case.path))
            .header("content-type", case.content_type)
            .body(case.body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let status = response.status().as_u16();
        let body: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{}: body is not JSON: {e}", case.name));
        assert_eq!(status, case.status, "{}: {body}", case.name);
        let error = &body["error"];
        let message = error["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{}: {body}", case.name);
        assert!(error["type"].is_string(), "{}: {body}", case.name);
        assert!(error.get("code").is_some(), "{}: {body}", case.name);
        assert_eq!(error["param"].as_str(), case.param, "{}: {body}", case.name);
    }
    // Unknown routes and methods answer in JSON too.
    let response = client().get(url("/v1/nothing")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.json::<Value>().await.unwrap()["error"].is_object());
    let response = client().get(url("/v1/completions")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(response.json::<Value>().await.unwrap()["error"].is_object());

    let (status, body) = post_json("/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
}

#[tokio::test]
async fn client_disconnect_mid_stream_frees_the_blocks() {
    let _serial = serial().await;
    let engine = &server().engine;
    let total = engine.stats().total_blocks;
    let body = json!({
        "model": MODEL, "prompt": "Once upon a time",
        "max_tokens": 900, "ignore_eos": true, "stream": true, "temperature": 0,
    });
    let response = client()
        .post(url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let piece = stream.next().await.expect("chunks arrive").expect("chunk");
        seen += piece.windows(6).filter(|w| w == b"data: ").count();
    }
    let busy = engine.stats();
    assert!(
        busy.running == 1 && busy.free_blocks + busy.cached_free_blocks < total,
        "{busy:?}"
    );
    drop(stream);

    let start = Instant::now();
    loop {
        let stats = engine.stats();
        if stats.running == 0
            && stats.waiting == 0
            && stats.free_blocks + stats.cached_free_blocks == total
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "blocks still held: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request stopped early, not after 900 tokens.
    assert!(engine.stats().steps < busy.steps + 300);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parsing_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        for e in [
            parse_request::<ChatCompletionRequest>(&bytes).err(),
            parse_request::<CompletionRequest>(&bytes).err(),
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!(e.status.is_client_error());
        }
    }

    #[test]
    fn parsing_json_values_never_panics(value in json_value()) {
        let mut object = json!({"model": MODEL, "messages": [], "prompt": "x"});
        if let (Some(map), Value::Object(extra)) = (object.as_object_mut(), value.clone()) {
            map.extend(extra);
        }
        for body in [value.to_string(), object.to_string()] {
            for e in [
                parse_request::<ChatCompletionRequest>(body.as_bytes()).err(),
                parse_request::<CompletionRequest>(body.as_bytes()).err(),
            ]
            .into_iter()
            .flatten()
            {
                prop_assert!(e.status.is_client_error());
                prop_assert!(!e.message.is_empty());
            }
            if let Ok(request) = parse_request::<ChatCompletionRequest>(body.as_bytes())
                && let Err(fault) = request.sampling()
            {
                prop_assert!(fault.param.is_some());
            }
        }
    }
}

/// JSON values biased towards request field names.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("model".to_string()),
        Just("messages".to_string()),
        Just("prompt".to_string()),
        Just("max_tokens".to_string()),
        Just("temperature".to_string()),
        Just("top_p".to_string()),
        Just("top_k".to_string()),
        Just("stop".to_string()),
        Just("n".to_string()),
        Just("seed".to_string()),
        Just("stream".to_string()),
        Just("stream_options".to_string()),
        Just("role".to_string()),
        Just("content".to_string()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A backend that fails on purpose: model "down" is unavailable, model
/// "broken" fails after one token, model "second-fails" fails only the
/// choice of index 1 (after one token) and answers the others, and health
/// is down.
struct FailingBackend;

impl CompletionBackend for FailingBackend {
    fn models(&self) -> Vec<ModelCard> {
        vec![
            ModelCard::new("down", None),
            ModelCard::new("broken", None),
            ModelCard::new("second-fails", None),
        ]
    }

    fn render_chat(&self, _: &str, _: &[ChatMessage]) -> Result<String, BackendError> {
        Ok("chat".into())
    }

    fn tokenize(&self, _: &str, _: &str, _: bool) -> Result<Vec<u32>, BackendError> {
        Ok(vec![1, 2, 3])
    }

    fn token_bytes(&self, _: &str, _: u32) -> Vec<u8> {
        b"Hi".to_vec()
    }

    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'_, Result<OutputStream, BackendError>> {
        Box::pin(async move {
            if request.model == "down" {
                return Err(BackendError::Unavailable("all workers are busy".into()));
            }
            let token = Output {
                token_id: 7,
                text: "Hi".into(),
                finish: None,
                usage: None,
                logprobs: None,
            };
            let fails = request.model == "broken" || request.request_id.ends_with("-1");
            let last = if fails {
                Err(BackendError::Internal("worker lost".into()))
            } else {
                Ok(Output {
                    finish: Some(xpyd_runtime::engine::sampling::FinishReason::Stop),
                    ..token.clone()
                })
            };
            let items = vec![Ok(token), last];
            Ok(futures::stream::iter(items).boxed())
        })
    }

    fn health(&self) -> Result<(), BackendError> {
        Err(BackendError::Unavailable("no workers".into()))
    }
}

#[tokio::test]
async fn backend_failures_become_503_and_500() {
    let app = router(
        std::sync::Arc::new(FailingBackend),
        prometheus::Registry::new(),
    )
    .expect("metrics register");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        app,
        async move {
            let _ = stopped.await;
        },
        Duration::ZERO,
    ));
    let post = |model: &str, stream: bool| {
        client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": model, "prompt": "x", "stream": stream}))
            .send()
    };

    let response = post("down", false).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(body["error"]["message"], "all workers are busy");

    let response = post("broken", false).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "worker lost");

    // With n > 1, one failing choice fails the request: no partial 200.
    let n = |model: &str, n: u32| {
        client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": model, "prompt": "x", "n": n}))
            .send()
    };
    let response = n("second-fails", 1).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "choice 0 alone succeeds");
    let response = n("second-fails", 3).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "worker lost");

    // Once streaming has begun the error arrives as a chunk, then [DONE].
    let text = post("broken", true).await.unwrap().text().await.unwrap();
    let payloads: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(payloads.len(), 3, "{text}");
    assert!(payloads[0].contains("\"Hi\""));
    let error: Value = serde_json::from_str(payloads[1]).unwrap();
    assert_eq!(error["error"]["message"], "worker lost");
    assert_eq!(payloads[2], "[DONE]");

    let health = client().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(health.json::<Value>().await.unwrap()["error"].is_object());

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// One HTTP/1.1 exchange on a held connection: the response head
/// (lower-cased) and body.
async fn exchange(conn: &mut tokio::net::TcpStream, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(request.as_bytes())
        .await
        .expect("request written");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("a content-length");
                if buf.len() >= end + 4 + length {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                    return (head, body.into_owned());
                }
            }
            let n = conn.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the connection closed before an answer came");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("an answer in time")
}

/// A frontend told to stop keeps answering on the connections clients
/// hold, for a short window, each answer saying `Connection: close`; then
/// it closes them and stops. A client that keeps its pooled connection
/// busy (a rolling update under load) loses no request to a socket closed
/// under it.
#[tokio::test]
async fn a_stopping_frontend_answers_held_connections_and_asks_them_to_close() {
    use tokio::io::AsyncReadExt;
    let _serial = serial().await;
    let gguf = GgufFile::open(&bundled_model().unwrap()).unwrap();
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let backend = LocalBackend::new(MODEL, server().engine.clone(), tokenizer).unwrap();
    let app = router(std::sync::Arc::new(backend), prometheus::Registry::new()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let window = Duration::from_secs(2);
    let serving = tokio::spawn(serve(
        listener,
        app,
        async move {
            let _ = stopped.await;
        },
        window,
    ));
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 4,
        "temperature": 0,
    })
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: xpyd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(address).await.unwrap();
    let (head, first) = exchange(&mut conn, &request).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "kept alive: {head}");

    let _ = stop.send(());
    tokio::time::sleep(window / 4).await;
    let (head, second) = exchange(&mut conn, &request).await;
    assert!(
        head.starts_with("http/1.1 200"),
        "answered while draining: {head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    let answer = |b: &str| {
        serde_json::from_str::<Value>(b).unwrap()["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(answer(&second), answer(&first), "the same greedy answer");
    let mut byte = [0u8; 1];
    let eof = tokio::time::timeout(DEADLINE, conn.read(&mut byte)).await;
    assert!(
        matches!(eof, Ok(Ok(0))),
        "the server closes the connection after it: {eof:?}"
    );

    tokio::time::timeout(DEADLINE, serving)
        .await
        .expect("the server stops after the window")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn sampling_parameters_reach_the_engine() {
    let _serial = serial().await;
    // A stop string ends the answer just before it.
    let (status, body) = post_json(
        "/v1/chat/completions",
        &chat_body(json!({"stop": " Paris"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The capital of France is"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    // max_completion_tokens wins over max_tokens.
    let (_, body) = post_json(
        "/v1/chat/completions",
        &chat_body(json!({"max_tokens": 20, "max_completion_tokens": 2})),
    )
    .await;
    assert_eq!(body["usage"]["completion_tokens"], 2);
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    // ignore_eos runs past the answer's end.
    let (_, body) = post_json(
        "/v1/chat/completions",
        &chat_body(json!({"ignore_eos": true, "max_tokens": 12})),
    )
    .await;
    assert_eq!(body["usage"]["completion_tokens"], 12);

    // The same seed draws the same tokens.
    let seeded = json!({
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 12,
        "temperature": 1.0, "top_p": 0.9, "top_k": 40, "seed": 42,
    });
    let (_, first) = post_json("/v1/completions", &seeded).await;
    let (_, second) = post_json("/v1/completions", &seeded).await;
    assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"]);
}

/// A chat answer's `logprobs.content`, checked against what OpenAI
/// promises: top alternatives sorted, as many as asked, and at temperature 0
/// the chosen token first among them.
fn check_chat_logprobs(content: &[Value], top: usize) {
    for entry in content {
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0, "{entry}");
        let token = entry["token"].as_str().unwrap();
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(String::from_utf8_lossy(&bytes), token);
        let alternatives = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(alternatives.len(), top, "{entry}");
        let values: Vec<f64> = alternatives
            .iter()
            .map(|a| a["logprob"].as_f64().unwrap())
            .collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{values:?}");
        if top > 0 {
            assert_eq!(
                alternatives[0]["token"], entry["token"],
                "greedy picks the top"
            );
            assert_eq!(values[0], logprob);
        }
    }
}

#[tokio::test]
async fn logprobs_chat_and_completions_streamed_and_whole() {
    let _serial = serial().await;
    let body = chat_body(json!({"logprobs": true, "top_logprobs": 5}));
    let (status, whole) = post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(
        choice["message"]["content"],
        "The capital of France is Paris."
    );
    let content = choice["logprobs"]["content"].as_array().unwrap();
    check_chat_logprobs(content, 5);
    // One entry per generated token (the EOS that ended it included).
    assert_eq!(
        content.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let text: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert!(
        text.starts_with("The capital of France is Paris."),
        "{text}"
    );
    // " Paris" is likely but not certain (FACTS.md: top-1 about 0.77).
    let paris = content
        .iter()
        .find(|e| e["token"] == " Paris")
        .expect("a Paris token");
    let p = paris["logprob"].as_f64().unwrap().exp();
    assert!(p > 0.3 && p < 1.0, "{p}");

    // Streamed: the same tokens and values, spread over the chunks.
    let mut stream_body = body.clone();
    merge(&mut stream_body, json!({"stream": true}));
    let payloads = sse_payloads("/v1/chat/completions", &stream_body).await;
    let streamed: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    check_chat_logprobs(&streamed, 5);
    let tokens = |v: &[Value]| -> Vec<Value> { v.iter().map(|e| e["token"].clone()).collect() };
    assert_eq!(tokens(&streamed), tokens(content));

    // Without logprobs: none, in either shape.
    let (_, plain) = post_json("/v1/chat/completions", &chat_body(json!({}))).await;
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");
    let (_, zero) = post_json(
        "/v1/chat/completions",
        &chat_body(json!({"logprobs": true, "max_tokens": 3})),
    )
    .await;
    check_chat_logprobs(
        zero["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap(),
        0,
    );

    // Legacy completions: parallel lists and text offsets.
    let body = json!({
        "model": MODEL, "prompt": "The capital of France is",
        "temperature": 0, "max_tokens": 3, "logprobs": 3,
    });
    let (status, whole) = post_json("/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let choice = &whole["choices"][0];
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{lp}");
    assert_eq!(lp["tokens"][0], " Paris", "{lp}");
    let text = choice["text"].as_str().unwrap();
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    for (i, &o) in offsets.iter().enumerate() {
        assert!(text[o as usize..].starts_with(lp["tokens"][i].as_str().unwrap()));
    }
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 3, "{top:?}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(best, lp["token_logprobs"][i].as_f64().unwrap());
    }
    let mut stream_body = body.clone();
    merge(&mut stream_body, json!({"stream": true}));
    let payloads = sse_payloads("/v1/completions", &stream_body).await;
    let streamed: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(Value::Array(streamed), lp["tokens"]);
}

#[tokio::test]
async fn n_choices_are_seeded_reproducible_and_share_the_prompt() {
    let _serial = serial().await;
    let body = chat_body(json!({
        "n": 3, "seed": 7, "temperature": 1.0, "max_tokens": 12, "logprobs": true,
    }));
    let (status, first) = post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let choices = first["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{first}");
    let texts: Vec<&str> = choices
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64);
        assert!(c["finish_reason"].is_string(), "{c}");
    }
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "each choice samples its own stream: {texts:?}"
    );
    // The prompt counted once, the completions of all three.
    let (_, single) = post_json("/v1/chat/completions", &chat_body(json!({"max_tokens": 1}))).await;
    let usage = &first["usage"];
    assert_eq!(usage["prompt_tokens"], single["usage"]["prompt_tokens"]);
    let per_choice: u64 = choices
        .iter()
        .map(|c| c["logprobs"]["content"].as_array().unwrap().len() as u64)
        .sum();
    assert_eq!(usage["completion_tokens"].as_u64().unwrap(), per_choice);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + per_choice
    );

    // Same seed, same three answers; the later choices found the prompt in
    // the prefix cache.
    let hits_before = server().engine.stats().prefix_hit_blocks;
    let (_, again) = post_json("/v1/chat/completions", &body).await;
    let again_texts: Vec<&str> = again["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(again_texts, texts);
    let prompt_blocks = usage["prompt_tokens"].as_u64().unwrap() / 16;
    assert!(prompt_blocks > 0);
    assert!(
        server().engine.stats().prefix_hit_blocks - hits_before >= 3 * prompt_blocks,
        "every choice reuses the cached prompt"
    );

    // Streamed: chunks of the three choices interleave, tagged by index,
    // and each adds up to the whole answer's text.
    let mut stream_body = body.clone();
    merge(
        &mut stream_body,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let payloads = sse_payloads("/v1/chat/completions", &stream_body).await;
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let mut streamed = vec![String::new(); 3];
    let mut finishes = 0;
    for chunk in &chunks {
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            streamed[i].push_str(c["delta"]["content"].as_str().unwrap_or_default());
            finishes += usize::from(c["finish_reason"].is_string());
        }
    }
    assert_eq!(streamed, texts);
    assert_eq!(finishes, 3);
    assert_eq!(
        counts(&chunks.last().unwrap()["usage"]),
        counts(&first["usage"])
    );

    // Completions take n too.
    let (status, text) = post_json(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The capital of France is",
                "n": 2, "temperature": 0, "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(text["choices"][1]["index"], 1);
    assert_eq!(
        text["choices"][0]["text"], text["choices"][1]["text"],
        "greedy choices agree"
    );
    assert_eq!(text["usage"]["completion_tokens"], 8);
}
