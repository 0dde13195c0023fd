//! Turning a request body into a typed API request: the content type, the
//! body limit, JSON syntax and field types, each fault becoming an
//! [`ApiError`] that names the field.
//!
//! Parsing never panics on any input (a property test holds it to that).
//! Checks of values (ranges, supported options) are not made here.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::protocol::{ChatCompletionRequest, CommonParams, CompletionRequest};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;

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

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("(not text)").to_string());
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::unsupported_media_type(content_type.as_deref()));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(BODY_LIMIT)
            } else {
                ApiError::invalid_request(
                    format!("cannot read the request body: {}", rejection.body_text()),
                    None,
                )
            }
        })?;
        parse_request(&bytes).map(OpenAiJson)
    }
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
