//! Turning a request body into a typed API request: the content type, the
//! body limit, JSON syntax and field types, each fault becoming an
//! [`ApiError`] that names the field.
//!
//! Parsing never panics on any input (a property test holds it to that).
//! Checks of values (ranges, supported options) are not made here.
//!
//! A body over [`BODY_LIMIT`] gets 413, but only after the rest of it has
//! been read and thrown away (up to [`DRAIN_LIMIT`] bytes, within
//! [`DRAIN_DEADLINE`]): a client still sending when the connection closed
//! would see "broken pipe" or a reset instead of the status. nginx's
//! lingering close does the same. A client that sent `Expect:
//! 100-continue` gets the 413 before it sends the body at all.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use bytes::BytesMut;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::protocol::{ChatCompletionRequest, CommonParams, CompletionRequest};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;
/// Most bytes of an oversized body read (and discarded) before the 413.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
/// Longest time spent draining an oversized body before the 413.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A request type whose sampling fields are parsed separately, so that
/// errors in them name their field.
pub trait ApiRequest: DeserializeOwned {
    fn set_common(&mut self, common: CommonParams);
}

impl ApiRequest for ChatCompletionRequest {
    fn set_common(&mut self, common: CommonParams) {
        self.common = common;
    }
}

impl ApiRequest for CompletionRequest {
    fn set_common(&mut self, common: CommonParams) {
        self.common = common;
    }
}

/// A JSON body parsed into `T`, or an OpenAI-shaped error.
#[derive(Debug, Clone)]
pub struct OpenAiJson<T>(pub T);

impl<S: Send + Sync, T: ApiRequest> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("(not text)").to_string());
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::unsupported_media_type(content_type.as_deref()));
        }
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let expects_continue = req
            .headers()
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if declared.is_some_and(|n| n > BODY_LIMIT)
            && (expects_continue || declared.is_some_and(|n| n > DRAIN_LIMIT))
        {
            // The client waits for us, or the body is past what we drain:
            // answer now, unread.
            return Err(ApiError::payload_too_large(BODY_LIMIT));
        }
        let bytes = read_body(req.into_body()).await?;
        parse_request(&bytes).map(OpenAiJson)
    }
}

/// The body, or 413 once it passes [`BODY_LIMIT`] (after draining the rest;
/// see the module doc).
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::invalid_request(format!("cannot read the request body: {e}"), None)
        })?;
        if buf.len() + chunk.len() > BODY_LIMIT {
            let mut seen = buf.len() + chunk.len();
            drop(buf);
            let drain = async {
                while seen <= DRAIN_LIMIT {
                    match stream.next().await {
                        Some(Ok(chunk)) => seen += chunk.len(),
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_DEADLINE, drain).await;
            return Err(ApiError::payload_too_large(BODY_LIMIT));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// Parse a request body.
pub fn parse_request<T: ApiRequest>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(format!("the request body is not valid JSON: {e}"), None)
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid_request(
            "the request body must be a JSON object",
            None,
        ));
    }
    let mut request: T = typed(&value)?;
    request.set_common(typed(&value)?);
    Ok(request)
}

fn typed<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let param = if path == "." || path.is_empty() {
            missing_field(&inner)
        } else {
            Some(path)
        };
        let message = match &param {
            Some(param) => format!("invalid request field {param}: {inner}"),
            None => format!("invalid request: {inner}"),
        };
        ApiError::invalid_request(message, param)
    })
}

/// The field of serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real HTTP server whose one route takes a chat request.
    async fn server() -> std::net::SocketAddr {
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(|OpenAiJson(_): OpenAiJson<ChatCompletionRequest>| async { "ok" }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// Sends `len` bytes of body after the headers (all of them, as
    /// Python's `requests` does), then reads the whole answer.
    async fn post_oversized(addr: std::net::SocketAddr, len: usize, extra: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\n{extra}Connection: close\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        if extra.is_empty() {
            let chunk = vec![b' '; 1 << 20];
            let mut sent = 0;
            while sent < len {
                let n = chunk.len().min(len - sent);
                conn.write_all(&chunk[..n]).await.unwrap_or_else(|e| {
                    panic!("the server stopped reading at {sent} of {len} bytes: {e}")
                });
                sent += n;
            }
        }
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn an_oversized_body_is_read_to_its_end_and_answered_413() {
        let addr = server().await;
        let answer = post_oversized(addr, 20 * 1024 * 1024, "").await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(
            answer.contains("\"type\":\"invalid_request_error\""),
            "{answer}"
        );
        assert!(answer.contains("4194304"), "names the limit: {answer}");
    }

    #[tokio::test]
    async fn a_client_expecting_100_continue_gets_413_before_sending() {
        let addr = server().await;
        let answer = post_oversized(addr, 20 * 1024 * 1024, "Expect: 100-continue\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_request::<ChatCompletionRequest>(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse_request::<ChatCompletionRequest>(
            br#"{"model":"m","messages":[],"temperature":"hot"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse_request::<ChatCompletionRequest>(
            br#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("text/plain"));
    }
}
