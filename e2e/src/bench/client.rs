//! One streamed request to an OpenAI-compatible server, timed as vLLM's
//! benchmark client times it: the clock starts just before the request is
//! sent; the first chunk that carries text sets TTFT; each later text chunk
//! adds one inter-token gap; the last one ends the request's latency.
//!
//! The output length is `usage.completion_tokens` of the final chunk (the
//! request asks for it with `stream_options.include_usage`), else the number
//! of text chunks. A request succeeds only if the stream ends with `[DONE]`
//! after text and no error object; everything else becomes a
//! [`FailureKind`] with a message, never a silent drop.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use super::stats::{FailureKind, RequestRecord, TokenCountSource};

/// Which API the prompts go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/completions` with `prompt` (as `vllm bench serve --backend openai`).
    Completions,
    /// `POST /v1/chat/completions` with one user message (`--backend openai-chat`).
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// What one request sends.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub endpoint: Endpoint,
    pub model: String,
    pub prompt: String,
    pub output_len: usize,
    /// Ask for exactly `output_len` tokens (`min_tokens`, `ignore_eos`).
    pub exact_output: bool,
}

impl RequestSpec {
    pub fn body(&self) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": self.output_len,
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match self.endpoint {
            Endpoint::Completions => body["prompt"] = json!(self.prompt),
            Endpoint::Chat => {
                body["messages"] = json!([{"role": "user", "content": self.prompt}]);
            }
        }
        if self.exact_output {
            body["min_tokens"] = json!(self.output_len);
            body["ignore_eos"] = json!(true);
        }
        body
    }
}

/// What a finished request returns besides its record: the generated text
/// (the shared-prefix workload feeds it into the next turn).
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub text: String,
}

/// Sends `spec` to `base_url` and fills `record`'s timings and outcome.
/// Never fails: a failure is written into the record.
pub async fn send(
    http: &reqwest::Client,
    base_url: &str,
    spec: &RequestSpec,
    timeout: Duration,
    record: &mut RequestRecord,
) -> Generated {
    let start = Instant::now();
    let mut timing = Timing::default();
    let outcome = tokio::time::timeout(timeout, stream(http, base_url, spec, start, &mut timing))
        .await
        .unwrap_or_else(|_| {
            Err((
                FailureKind::Timeout,
                format!("no complete answer within {} s", timeout.as_secs_f64()),
            ))
        });
    record.ttft_s = timing.ttft_s;
    record.e2e_s = timing.last_s;
    record.itl_s = std::mem::take(&mut timing.itl_s);
    record.server_prompt_tokens = timing.prompt_tokens;
    record.cached_tokens = timing.cached_tokens;
    match timing.usage_tokens {
        Some(n) => {
            record.output_tokens = n;
            record.output_tokens_source = TokenCountSource::Usage;
        }
        None => {
            record.output_tokens = timing.chunks;
            record.output_tokens_source = TokenCountSource::Chunks;
        }
    }
    match outcome {
        Ok(()) => record.success = true,
        Err((kind, message)) => {
            record.success = false;
            record.failure = Some(kind);
            record.error = Some(message);
        }
    }
    Generated { text: timing.text }
}

#[derive(Default)]
struct Timing {
    ttft_s: f64,
    last_s: f64,
    itl_s: Vec<f64>,
    chunks: usize,
    text: String,
    usage_tokens: Option<usize>,
    prompt_tokens: Option<usize>,
    cached_tokens: Option<usize>,
}

type Failure = (FailureKind, String);

async fn stream(
    http: &reqwest::Client,
    base_url: &str,
    spec: &RequestSpec,
    start: Instant,
    timing: &mut Timing,
) -> Result<(), Failure> {
    let url = format!("{}{}", base_url.trim_end_matches('/'), spec.endpoint.path());
    let response = http
        .post(&url)
        .json(&spec.body())
        .send()
        .await
        .map_err(|e| (FailureKind::Connection, format!("POST {url}: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        return Err((FailureKind::Http, format!("HTTP {status}: {message}")));
    }
    let mut bytes = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        // Complete events first; read more only when none is buffered.
        if let Some(event) = take_event(&mut buffer) {
            if on_event(&event, start, timing)? {
                return Ok(());
            }
            continue;
        }
        match bytes.next().await {
            Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
            Some(Err(e)) => return Err((FailureKind::Stream, format!("reading the stream: {e}"))),
            None => {
                return Err((
                    FailureKind::Stream,
                    "the stream ended without [DONE]".to_string(),
                ));
            }
        }
    }
}

/// Removes and returns the first complete server-sent event (its `data:`
/// lines joined), if the buffer holds one.
fn take_event(buffer: &mut Vec<u8>) -> Option<String> {
    let (end, sep) = [b"\r\n\r\n".as_slice(), b"\n\n".as_slice()]
        .iter()
        .filter_map(|sep| {
            buffer
                .windows(sep.len())
                .position(|w| w == *sep)
                .map(|p| (p, sep.len()))
        })
        .min()?;
    let raw: Vec<u8> = buffer.drain(..end + sep).collect();
    let text = String::from_utf8_lossy(&raw[..end]);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    Some(data.join("\n"))
}

/// Applies one event; `Ok(true)` at `[DONE]`.
fn on_event(data: &str, start: Instant, timing: &mut Timing) -> Result<bool, Failure> {
    if data.is_empty() {
        // A comment or keep-alive.
        return Ok(false);
    }
    if data.trim() == "[DONE]" {
        if timing.chunks == 0 {
            return Err((
                FailureKind::Stream,
                "the stream ended without any text".to_string(),
            ));
        }
        return Ok(true);
    }
    let value: Value = serde_json::from_str(data).map_err(|e| {
        (
            FailureKind::Stream,
            format!("a chunk is not JSON ({e}): {data}"),
        )
    })?;
    if let Some(error) = value.get("error") {
        let message = error["message"].as_str().unwrap_or("no message");
        return Err((
            FailureKind::Stream,
            format!("error in the stream: {message}"),
        ));
    }
    if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
        let count = |v: &Value| v.as_u64().map(|n| n as usize);
        timing.usage_tokens = count(&usage["completion_tokens"]);
        timing.prompt_tokens = count(&usage["prompt_tokens"]);
        timing.cached_tokens = count(&usage["prompt_tokens_details"]["cached_tokens"]);
    }
    let choice = &value["choices"][0];
    let text = choice["text"]
        .as_str()
        .or_else(|| choice["delta"]["content"].as_str())
        .unwrap_or("");
    if !text.is_empty() {
        let now = start.elapsed().as_secs_f64();
        if timing.chunks == 0 {
            timing.ttft_s = now;
        } else {
            timing.itl_s.push(now - timing.last_s);
        }
        timing.last_s = now;
        timing.chunks += 1;
        timing.text.push_str(text);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines_and_join_data_lines() {
        let mut buf = b"data: {\"a\":1}\n\ndata: [DONE]\r\n\r\n: keep\n".to_vec();
        assert_eq!(take_event(&mut buf).as_deref(), Some("{\"a\":1}"));
        assert_eq!(take_event(&mut buf).as_deref(), Some("[DONE]"));
        assert_eq!(take_event(&mut buf), None);
        assert_eq!(buf, b": keep\n");
    }

    #[test]
    fn text_chunks_time_the_request_and_usage_counts_tokens() {
        let start = Instant::now();
        let mut t = Timing::default();
        assert!(
            !on_event(
                r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
                start,
                &mut t
            )
            .unwrap()
        );
        assert_eq!(t.chunks, 0, "a role-only chunk is not a token");
        on_event(r#"{"choices":[{"text":"Hello"}]}"#, start, &mut t).unwrap();
        on_event(
            r#"{"choices":[{"text":" world","finish_reason":"length"}]}"#,
            start,
            &mut t,
        )
        .unwrap();
        on_event(
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}"#,
            start,
            &mut t,
        )
        .unwrap();
        assert!(on_event("[DONE]", start, &mut t).unwrap());
        assert_eq!(t.chunks, 2);
        assert_eq!(t.itl_s.len(), 1);
        assert!(t.ttft_s > 0.0 && t.ttft_s <= t.last_s);
        assert_eq!(t.text, "Hello world");
        assert_eq!(t.usage_tokens, Some(3));
        assert_eq!(t.cached_tokens, Some(4));
        let err = on_event(r#"{"error":{"message":"boom"}}"#, start, &mut t).unwrap_err();
        assert_eq!(err.0, FailureKind::Stream);
        assert!(err.1.contains("boom"));
    }
}
