//! What the HTTP frontend needs from the workers behind it:
//! [`CompletionBackend`] (served models, prompt rendering and tokenization,
//! generation as a stream of tokens). Its implementation over the bus is
//! [`super::ClusterBackend`]; the tests' over an engine in the test process
//! lives with them (`runtime/tests/common/local_backend.rs`).
//!
//! The frontend tokenizes and workers take token ids, so the trait carries
//! both. It is not the router or the bus: a distributed backend implements
//! the same trait elsewhere. Dropping a generation stream cancels the
//! request down to the engine.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::engine::chat_template::{ChatMessage, ChatTemplate};
use crate::engine::runner::{EngineError, EngineErrorKind, Output};
use crate::engine::sampling::SamplingParams;
use crate::engine::tokenizer::Tokenizer;

use super::protocol::ModelCard;

/// One tokenized generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub request_id: String,
    pub model: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Session affinity key (the value of the session header), if any.
    pub session: Option<String>,
}

/// Tokens of one request as they are generated; the last item has `finish`
/// and `usage` set, or is an error. Dropping it cancels the request.
pub type OutputStream = BoxStream<'static, Result<Output, BackendError>>;

/// Why a backend refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The caller's fault; `param` names the request field.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("model {0:?} is not served")]
    ModelNotFound(String),
    /// Overloaded or shutting down: try again later (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl BackendError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        BackendError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }
}

impl From<EngineError> for BackendError {
    fn from(e: EngineError) -> Self {
        let param = e.param();
        match e.kind() {
            EngineErrorKind::InvalidRequest => BackendError::invalid(e.to_string(), param),
            EngineErrorKind::Unavailable => BackendError::Unavailable(e.to_string()),
            EngineErrorKind::Internal => BackendError::Internal(e.to_string()),
        }
    }
}

/// The workers behind the HTTP API, as the frontend sees them. Object safe:
/// the server holds an `Arc<dyn CompletionBackend>`.
pub trait CompletionBackend: Send + Sync + 'static {
    /// Models served, for `GET /v1/models` and the `model` check.
    fn models(&self) -> Vec<ModelCard>;

    /// The prompt text of a chat conversation for `model`, ready to tokenize.
    fn render_chat(&self, model: &str, messages: &[ChatMessage]) -> Result<String, BackendError>;

    /// Token ids of prompt `text` for `model`; `raw_prompt` says it is a text
    /// completion prompt (which gets BOS if the model wants one), not a
    /// rendered chat.
    fn tokenize(&self, model: &str, text: &str, raw_prompt: bool)
    -> Result<Vec<u32>, BackendError>;

    /// The bytes token `token` of `model` stands for, for logprobs'
    /// `token` and `bytes` (empty for an id the model does not have).
    fn token_bytes(&self, model: &str, token: u32) -> Vec<u8>;

    /// Start generating.
    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'_, Result<OutputStream, BackendError>>;

    /// Whether requests can be served now.
    fn health(&self) -> Result<(), BackendError>;

    /// The HTTP header whose value is a request's session key, for backends
    /// that route by session.
    fn session_header(&self) -> Option<String> {
        None
    }

    /// Whether the engines behind this backend are simulated (`--device
    /// sim`): every response then says so (the `x-xpyd-simulated` header,
    /// the model card's `owned_by`).
    fn simulated(&self) -> bool {
        false
    }
}

/// How prompts of one model become token ids: its tokenizer and chat
/// template. Every backend that tokenizes holds one.
pub struct Prompts {
    model: String,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Prompts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompts")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Prompts {
    /// Prompts of model `model` with its `tokenizer`, whose chat template
    /// (if the file has one) renders chats.
    pub fn new(model: impl Into<String>, tokenizer: Tokenizer) -> Result<Self, BackendError> {
        let special = |id: Option<u32>| {
            id.and_then(|id| tokenizer.decode(&[id], false).ok())
                .unwrap_or_default()
        };
        let template = match tokenizer.chat_template() {
            Some(source) => Some(
                ChatTemplate::new(
                    source,
                    &special(tokenizer.bos_token_id()),
                    &special(tokenizer.eos_token_id()),
                )
                .map_err(|e| BackendError::Internal(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Prompts {
            model: model.into(),
            tokenizer,
            template,
        })
    }

    /// The served model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// `ModelNotFound` unless `model` is ours.
    pub fn check_model(&self, model: &str) -> Result<(), BackendError> {
        if model == self.model {
            Ok(())
        } else {
            Err(BackendError::ModelNotFound(model.to_string()))
        }
    }

    /// See [`CompletionBackend::render_chat`].
    pub fn render_chat(
        &self,
        model: &str,
        messages: &[ChatMessage],
    ) -> Result<String, BackendError> {
        self.check_model(model)?;
        let template = self.template.as_ref().ok_or_else(|| {
            BackendError::invalid(
                format!("model {model:?} has no chat template; use /v1/completions"),
                None,
            )
        })?;
        // A template that raises rejects the conversation (e.g. roles out of
        // order): the caller's fault.
        template
            .render(messages, true)
            .map_err(|e| BackendError::invalid(e.to_string(), Some("messages")))
    }

    /// See [`CompletionBackend::token_bytes`].
    pub fn token_bytes(&self, token: u32) -> Vec<u8> {
        self.tokenizer.token_bytes(token).unwrap_or_default()
    }

    /// See [`CompletionBackend::tokenize`].
    pub fn tokenize(
        &self,
        model: &str,
        text: &str,
        raw_prompt: bool,
    ) -> Result<Vec<u32>, BackendError> {
        self.check_model(model)?;
        let mut ids = Vec::new();
        if raw_prompt
            && self.tokenizer.add_bos_token()
            && let Some(bos) = self.tokenizer.bos_token_id()
        {
            ids.push(bos);
        }
        ids.extend(
            self.tokenizer
                .encode(text)
                .map_err(|e| BackendError::invalid(e.to_string(), Some("prompt")))?,
        );
        Ok(ids)
    }
}

/// Shared handle for the server state.
pub type SharedBackend = Arc<dyn CompletionBackend>;
