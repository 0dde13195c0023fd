//! Frontend overhead per request at high concurrency.
//!
//! The OpenAI frontend (parsing, validation, tokenization call, metrics,
//! response shaping) serves `/v1/completions` from a trivial in-process
//! backend that answers 16 tokens at once, under `CONCURRENCY` clients on
//! loopback HTTP. The baseline, in the same process and run, is a bare axum
//! handler returning a response of the same size: what HTTP alone costs.
//! The figure is the difference per request, and the ratio of throughputs.
//! Both servers run on the agent's global allocator (mimalloc).
//!
//! Then both routers are called in process, one request at a time, with
//! no HTTP and no client (`tower::ServiceExt::oneshot`): the wall time per
//! request there is the frontend's own work, and the difference to the
//! bare handler what the frontend adds to HTTP's cost. That loop is what
//! to profile (`XPYD_BENCH_IN_PROCESS_ONLY=1` runs only it, longer).
//!
//! `cargo bench -p xpyd-runtime --bench frontend` (`XPYD_BENCH_REQUESTS`,
//! default 20000; `XPYD_BENCH_CONCURRENCY`, default 64).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream;
use xpyd_runtime::engine::chat_template::ChatMessage;
use xpyd_runtime::engine::runner::{Output, Usage};
use xpyd_runtime::engine::sampling::FinishReason;
use xpyd_runtime::frontend::protocol::ModelCard;
use xpyd_runtime::frontend::{
    BackendError, CompletionBackend, GenerateRequest, OutputStream, router, serve,
};

/// The agent's allocator (`agent/src/main.rs`), so that the figures are
/// the product's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKENS: usize = 16;

/// Answers every request with `TOKENS` tokens, at once.
struct Trivial;

impl CompletionBackend for Trivial {
    fn models(&self) -> Vec<ModelCard> {
        vec![ModelCard::new("trivial", Some(4096))]
    }
    fn render_chat(&self, _: &str, messages: &[ChatMessage]) -> Result<String, BackendError> {
        Ok(messages.iter().map(|m| m.content.as_str()).collect())
    }
    fn tokenize(&self, _: &str, text: &str, _: bool) -> Result<Vec<u32>, BackendError> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn token_bytes(&self, _: &str, token: u32) -> Vec<u8> {
        u8::try_from(token).map(|b| vec![b]).unwrap_or_default()
    }
    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'_, Result<OutputStream, BackendError>> {
        let prompt = request.prompt_token_ids.len();
        Box::pin(async move {
            let outputs = (0..TOKENS).map(move |i| {
                let last = i + 1 == TOKENS;
                Ok(Output {
                    token_id: 42,
                    text: " tok".to_string(),
                    finish: last.then_some(FinishReason::Length),
                    usage: last.then_some(Usage {
                        prompt_tokens: prompt,
                        completion_tokens: TOKENS,
                        cached_tokens: 0,
                    }),
                    logprobs: None,
                })
            });
            Ok(Box::pin(stream::iter(outputs)) as OutputStream)
        })
    }
    fn health(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Requests/s and per-request latency percentiles (µs) of `requests` POSTs
/// of `body` to `url` from `concurrency` clients.
async fn load(url: &str, body: &str, requests: usize, concurrency: usize) -> (f64, Vec<f64>) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, next, url, body) = (
            http.clone(),
            next.clone(),
            url.to_string(),
            body.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < requests {
                let t = Instant::now();
                let resp = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("request");
                assert!(resp.status().is_success(), "{}", resp.status());
                resp.bytes().await.expect("body");
                latencies.push(t.elapsed().as_secs_f64() * 1e6);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    (requests as f64 / elapsed, latencies)
}

/// Mean wall µs per request of `requests` POSTs of `body` to `app`, called
/// in process one at a time (no HTTP, no client).
async fn in_process(app: &axum::Router, body: &str, requests: usize) -> f64 {
    use tower::ServiceExt;
    let start = Instant::now();
    for _ in 0..requests {
        let request = axum::http::Request::post("/v1/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / requests as f64
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let requests = env("XPYD_BENCH_REQUESTS", 20_000);
    let concurrency = env("XPYD_BENCH_CONCURRENCY", 64);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let app = router(Arc::new(Trivial), prometheus::Registry::new()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let xpyd = format!("http://{}/v1/completions", listener.local_addr().unwrap());
        tokio::spawn(serve(
            listener,
            app.clone(),
            std::future::pending(),
            Duration::ZERO,
        ));

        // The baseline answers what xpyd answers, without any of its work.
        let canned = {
            let resp = reqwest::Client::new()
                .post(&xpyd)
                .json(&serde_json::json!({"model": "trivial", "prompt": "x", "max_tokens": TOKENS}))
                .send()
                .await
                .unwrap();
            resp.text().await.unwrap()
        };
        let bare = axum::Router::new().route(
            "/v1/completions",
            axum::routing::post(move || {
                let canned = canned.clone();
                async move { ([("content-type", "application/json")], canned) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1/completions", listener.local_addr().unwrap());
        let served = bare.clone();
        tokio::spawn(async move { axum::serve(listener, served).await });

        let body = serde_json::json!({
            "model": "trivial",
            "prompt": "The quick brown fox jumps over the lazy dog.",
            "max_tokens": TOKENS,
            "temperature": 0.7,
        })
        .to_string();
        if std::env::var_os("XPYD_BENCH_IN_PROCESS_ONLY").is_some() {
            for round in 0..10 {
                let x = in_process(&app, &body, requests).await;
                let b = in_process(&bare, &body, requests).await;
                println!("in process, round {round}: xpyd {x:.2} µs, bare {b:.2} µs per request");
            }
            return;
        }
        // Warm both up, then measure each twice, interleaved.
        load(&base, &body, 500, concurrency).await;
        load(&xpyd, &body, 500, concurrency).await;
        let mut rows = Vec::new();
        for round in 0..2 {
            for (name, url) in [("bare axum (baseline)", &base), ("xpyd frontend", &xpyd)] {
                let (rps, lat) = load(url, &body, requests, concurrency).await;
                rows.push((round, name, rps, pct(&lat, 0.5), pct(&lat, 0.99)));
            }
        }
        println!(
            "{requests} requests, {concurrency} concurrent clients, {TOKENS} tokens each, loopback HTTP/1.1"
        );
        println!("| round | server | req/s | p50 µs | p99 µs |");
        println!("|---|---|---|---|---|");
        for (round, name, rps, p50, p99) in &rows {
            println!("| {round} | {name} | {rps:.0} | {p50:.0} | {p99:.0} |");
        }
        // In process: the frontend's own work per request, without HTTP.
        let mut own = Vec::new();
        for _ in 0..2 {
            own.push((
                in_process(&app, &body, requests).await,
                in_process(&bare, &body, requests).await,
            ));
        }
        for (round, (x, b)) in own.iter().enumerate() {
            println!(
                "in process (no HTTP), round {round}: xpyd frontend {x:.2} µs, bare handler {b:.2} µs per request; the frontend's own work {:.2} µs",
                x - b
            );
        }
        for round in 0..2 {
            let b = rows.iter().find(|r| r.0 == round && r.1.starts_with("bare")).unwrap();
            let x = rows.iter().find(|r| r.0 == round && r.1.starts_with("xpyd")).unwrap();
            println!(
                "round {round}: xpyd/baseline throughput {:.2}; overhead per request {:.0} µs of CPU time ({} cores)",
                x.2 / b.2,
                (1.0 / x.2 - 1.0 / b.2) * 1e6 * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
        }
    });
}
