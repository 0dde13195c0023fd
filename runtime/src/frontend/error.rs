//! The one error type of the HTTP API and its response: an HTTP status plus
//! OpenAI's `{"error": {"message", "type", "param", "code"}}` body.
//!
//! Every failure a handler or extractor meets ends here, so every error body
//! is JSON. It is not where faults are detected: the request parser, the
//! backend and the engine say what is wrong; this module says how it looks.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::backend::BackendError;
use super::protocol::{ErrorBody, ErrorDetail, RequestFault};

/// An error to send to an API client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

const INVALID_REQUEST: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";

impl ApiError {
    /// 400: the request is at fault; `param` names the field.
    pub fn invalid_request(message: impl Into<String>, param: Option<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: INVALID_REQUEST,
            param,
            code: None,
        }
    }

    /// 404 for a model this server does not serve, as OpenAI words it.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or is not served here."),
            kind: INVALID_REQUEST,
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 404 for a path with no route.
    pub fn route_not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no route for {path}"),
            kind: INVALID_REQUEST,
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn method_not_allowed() -> Self {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: "this method is not allowed on this path".into(),
            kind: INVALID_REQUEST,
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body exceeds the limit of {limit} bytes"),
            kind: INVALID_REQUEST,
            param: None,
            code: Some("request_too_large"),
        }
    }

    pub fn unsupported_media_type(got: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!(
                "the request body must be JSON with Content-Type: application/json, got {}",
                got.unwrap_or("no Content-Type")
            ),
            kind: INVALID_REQUEST,
            param: None,
            code: Some("unsupported_media_type"),
        }
    }

    /// 503: the backend cannot take the request now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: SERVER_ERROR,
            param: None,
            code: Some("service_unavailable"),
        }
    }

    /// 500: our fault. The message is logged; the client gets it too, as
    /// the engine's messages carry nothing secret.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: SERVER_ERROR,
            param: None,
            code: Some("internal_error"),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }
}

impl From<RequestFault> for ApiError {
    fn from(f: RequestFault) -> Self {
        ApiError::invalid_request(f.message, f.param)
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::InvalidRequest { message, param } => {
                ApiError::invalid_request(message, param)
            }
            BackendError::ModelNotFound(model) => ApiError::model_not_found(&model),
            BackendError::Unavailable(message) => ApiError::unavailable(message),
            BackendError::Internal(message) => ApiError::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "request rejected");
        }
        (self.status, Json(self.body())).into_response()
    }
}
