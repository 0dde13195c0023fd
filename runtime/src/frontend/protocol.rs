//! OpenAI wire types for the HTTP frontend: chat and text completion
//! requests, their responses and streaming chunks, usage, the model list and
//! the error body.
//!
//! Only shapes live here, plus the checks that need nothing but the request
//! itself (`n`, `stop`, `logprobs`, unsupported options). Turning a request into token
//! ids and sampling parameters is the handlers' job; which fields a served
//! model accepts is the engine's.

use serde::{Deserialize, Serialize};

use super::tools::ToolMode;
use crate::engine::sampling::{FinishReason, MAX_TOP_LOGPROBS, SamplingParams};

/// Most stop strings one request may carry (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Most choices (`n`) one request may ask for.
pub const MAX_CHOICES: u32 = 16;
/// Most alternatives per token a legacy completion may ask log-probabilities
/// for (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// A fault found in a request before it reaches a backend: what to tell the
/// user and which field is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFault {
    pub message: String,
    pub param: Option<String>,
}

impl RequestFault {
    fn new(message: impl Into<String>, param: &str) -> Self {
        Self {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

impl StopSequences {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopSequences::One(s) => vec![s],
            StopSequences::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields chat and text completions share (OpenAI's plus
/// vLLM's `top_k`, `min_tokens`, `ignore_eos`, `stop_token_ids`).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct CommonParams {
    pub max_tokens: Option<u32>,
    pub min_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// -1 (vLLM's spelling) means no limit.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<StopSequences>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub user: Option<String>,
}

impl CommonParams {
    /// The engine's sampling parameters; `max_tokens` is passed separately
    /// because chat spells it two ways. The engine validates value ranges.
    pub fn sampling(&self, max_tokens: Option<u32>) -> Result<SamplingParams, RequestFault> {
        self.choices()?;
        if self.stream_options.is_some() && !self.stream() {
            return Err(RequestFault::new(
                "stream_options is only allowed when stream is true",
                "stream_options",
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(RequestFault::new(
                    format!("{name} is not supported yet; omit it or set it to 0"),
                    name,
                ));
            }
        }
        if self.repetition_penalty.is_some_and(|v| v != 1.0) {
            return Err(RequestFault::new(
                "repetition_penalty is not supported yet; omit it or set it to 1",
                "repetition_penalty",
            ));
        }
        let stop = self.stop.clone().map(StopSequences::into_vec);
        if let Some(stop) = &stop
            && stop.len() > MAX_STOP_SEQUENCES
        {
            return Err(RequestFault::new(
                format!(
                    "stop may hold at most {MAX_STOP_SEQUENCES} sequences, got {}",
                    stop.len()
                ),
                "stop",
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) => None,
            Some(k) => Some(u32::try_from(k).map_err(|_| {
                RequestFault::new(
                    format!("top_k must be -1 (no limit) or at least 1, got {k}"),
                    "top_k",
                )
            })?),
        };
        let defaults = SamplingParams::default();
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k,
            top_p: self.top_p.unwrap_or(defaults.top_p),
            // A negative seed is as good a seed as any: keep its bits.
            seed: self.seed.map(|s| s as u64),
            max_tokens,
            min_tokens: self.min_tokens.unwrap_or(0),
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stop: stop.unwrap_or_default(),
            // Each endpoint spells it its own way (see theirs).
            logprobs: None,
            // Chat's `response_format` (see there).
            json_schema: None,
        })
    }

    /// How many choices to generate (`n`, 1 to [`MAX_CHOICES`]).
    pub fn choices(&self) -> Result<u32, RequestFault> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n),
            Some(n) => Err(RequestFault::new(
                format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
                "n",
            )),
        }
    }

    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }
}

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One part of a message's content; only text is served.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
}

/// A message's content: a string or a list of parts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(s) => s.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .map(|ContentPart::Text { text }| text.as_str())
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessageIn {
    pub role: Role,
    /// May be null for an assistant turn that only called tools.
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    /// The calls an earlier assistant turn made.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// A tool call, in a response or in an earlier assistant turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function a [`ToolCall`] calls; `arguments` is JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A streamed tool call: the whole call in one chunk, at `index` of the
/// message's calls (how the `openai` client assembles them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(flatten)]
    pub call: ToolCall,
}

/// `POST /v1/chat/completions`.
///
/// Every field of OpenAI's chat request is either honoured or refused with
/// a 400 naming it (see [`ChatCompletionRequest::refused_field`] and the
/// table in `docs/api.md`); fields OpenAI does not know are ignored, as
/// OpenAI does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// Takes precedence over `max_tokens`, as in OpenAI's API.
    pub max_completion_tokens: Option<u32>,
    /// `true` returns each token's log-probability. Kept as written so
    /// that a wrong type gets a 400 naming it.
    pub logprobs: Option<serde_json::Value>,
    /// Alternatives per token, 0 to [`MAX_TOP_LOGPROBS`]; needs `logprobs`.
    pub top_logprobs: Option<serde_json::Value>,
    /// `text`, `json_object` or `json_schema`; kept as written so that a
    /// malformed one gets a 400 naming it.
    pub response_format: Option<serde_json::Value>,
    /// Functions the model may call (see `tools`), kept as written so that
    /// a malformed one gets a 400 naming it.
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    /// Parsed separately (see `extract`), so that its errors name the field.
    #[serde(skip)]
    pub common: CommonParams,
    /// Fields not served yet: present only to be refused by name.
    #[serde(flatten)]
    pub unserved: UnservedChatFields,
}

/// OpenAI chat fields xpyd does not serve yet, kept as written so that a
/// request using them is refused rather than silently answered without
/// them (a client asking for JSON must not get prose under HTTP 200).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct UnservedChatFields {
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    pub logit_bias: Option<serde_json::Value>,
    pub modalities: Option<serde_json::Value>,
    pub audio: Option<serde_json::Value>,
    pub prediction: Option<serde_json::Value>,
    pub web_search_options: Option<serde_json::Value>,
    pub store: Option<serde_json::Value>,
}

impl UnservedChatFields {
    /// The first field whose value asks for something not served, with why.
    /// Values that ask for nothing (`logprobs: false`, `tools: []`,
    /// `response_format: {"type": "text"}`, `store: false`, ...) pass.
    fn refused(&self) -> Option<RequestFault> {
        use serde_json::Value;
        let is_null_or = |v: &Option<Value>, ok: &dyn Fn(&Value) -> bool| {
            v.as_ref().is_none_or(|v| v.is_null() || ok(v))
        };
        let empty = |v: &Value| {
            v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(|o| o.is_empty())
        };
        let not_yet = |field: &str, what: &str| {
            Some(RequestFault::new(
                format!("{field} is not supported yet ({what}); omit it"),
                field,
            ))
        };
        let u = self;
        if !is_null_or(&u.functions, &empty) {
            return not_yet("functions", "the deprecated form; use tools");
        }
        if !is_null_or(&u.function_call, &|v| v == "none" || v == "auto") {
            return not_yet("function_call", "the deprecated form; use tool_choice");
        }
        if !is_null_or(&u.logit_bias, &empty) {
            return not_yet("logit_bias", "the sampler takes no token biases");
        }
        if !is_null_or(&u.modalities, &|v| {
            v.as_array().is_some_and(|m| m.iter().all(|x| x == "text"))
        }) {
            return not_yet("modalities", "only text is served");
        }
        if !is_null_or(&u.audio, &|_| false) {
            return not_yet("audio", "only text is served");
        }
        if !is_null_or(&u.prediction, &|_| false) {
            return not_yet("prediction", "predicted outputs are not served");
        }
        if !is_null_or(&u.web_search_options, &|_| false) {
            return not_yet("web_search_options", "there is no web search");
        }
        if !is_null_or(&u.store, &|v| v == false) {
            return not_yet("store", "completions are not stored");
        }
        None
    }
}

impl ChatCompletionRequest {
    pub fn sampling(&self) -> Result<SamplingParams, RequestFault> {
        if self.messages.is_empty() {
            return Err(RequestFault::new(
                "messages must hold at least one message",
                "messages",
            ));
        }
        if let Some(fault) = self.refused_field() {
            return Err(fault);
        }
        let logprobs = self.logprobs()?;
        let mut json_schema = response_format_schema(self.response_format.as_ref())?;
        if let Some(forced) = self.tool_mode()?.and_then(|m| m.forced_schema()) {
            if json_schema.is_some() {
                return Err(RequestFault::new(
                    "a forced tool_choice and a JSON response_format cannot both shape the answer",
                    "tool_choice",
                ));
            }
            json_schema = Some(forced);
        }
        Ok(SamplingParams {
            logprobs,
            json_schema,
            ..self
                .common
                .sampling(self.max_completion_tokens.or(self.common.max_tokens))?
        })
    }

    /// How many alternatives to return log-probabilities for, if any
    /// (`logprobs: true`, `top_logprobs`).
    fn logprobs(&self) -> Result<Option<u32>, RequestFault> {
        let wanted = match &self.logprobs {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(v) => {
                return Err(RequestFault::new(
                    format!("logprobs must be true or false, got {v}"),
                    "logprobs",
                ));
            }
        };
        let top = match &self.top_logprobs {
            None | Some(serde_json::Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n <= MAX_TOP_LOGPROBS)
                .ok_or_else(|| {
                    RequestFault::new(
                        format!(
                            "top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {v}"
                        ),
                        "top_logprobs",
                    )
                })?,
        };
        if top > 0 && !wanted {
            return Err(RequestFault::new(
                "top_logprobs needs logprobs set to true",
                "top_logprobs",
            ));
        }
        Ok(wanted.then_some(top))
    }

    /// The request's tools and `tool_choice`, if it has tools.
    pub fn tool_mode(&self) -> Result<Option<ToolMode>, RequestFault> {
        ToolMode::from_request(self.tools.as_ref(), self.tool_choice.as_ref())
    }

    /// A field of OpenAI's request this server does not serve yet, set to
    /// a value that asks for it.
    pub fn refused_field(&self) -> Option<RequestFault> {
        self.unserved.refused()
    }
}

/// The JSON schema `response_format` asks the output to match, as text:
/// none for `text`, any JSON object for `json_object`, the given schema for
/// `json_schema` (enforced whether `strict` is set or not).
fn response_format_schema(
    format: Option<&serde_json::Value>,
) -> Result<Option<String>, RequestFault> {
    let fault =
        |why: String| RequestFault::new(format!("response_format {why}"), "response_format");
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let any_object = || Some(r#"{"type":"object"}"#.to_string());
    match format.get("type").and_then(serde_json::Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(any_object()),
        Some("json_schema") => {
            let Some(spec) = format.get("json_schema").filter(|s| s.is_object()) else {
                return Err(fault(
                    "of type json_schema needs a json_schema object ({\"name\": ..., \"schema\": {...}})".into(),
                ));
            };
            match spec.get("schema") {
                None | Some(serde_json::Value::Null) => Ok(any_object()),
                Some(schema) if schema.is_object() => Ok(Some(schema.to_string())),
                Some(other) => Err(fault(format!(
                    "json_schema.schema must be a JSON object, got {other}"
                ))),
            }
        }
        Some(other) => Err(fault(format!(
            "type must be text, json_object or json_schema, got {other:?}"
        ))),
        None => Err(fault(format!(
            "must be an object with a type, got {format}"
        ))),
    }
}

/// `prompt` of a text completion: text or token ids (a batch of one is
/// accepted; larger batches are not served).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenBatches(Vec<Vec<u32>>),
}

/// A prompt ready for a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl PromptInput {
    pub fn into_prompt(self) -> Result<Prompt, RequestFault> {
        let batch = |n: usize| {
            RequestFault::new(
                format!("prompt batches are not supported: send one prompt per request, got {n}"),
                "prompt",
            )
        };
        match self {
            PromptInput::Text(s) => Ok(Prompt::Text(s)),
            PromptInput::Tokens(t) => Ok(Prompt::Tokens(t)),
            PromptInput::Texts(mut v) if v.len() == 1 => Ok(Prompt::Text(v.remove(0))),
            PromptInput::TokenBatches(mut v) if v.len() == 1 => Ok(Prompt::Tokens(v.remove(0))),
            PromptInput::Texts(v) => Err(batch(v.len())),
            PromptInput::TokenBatches(v) => Err(batch(v.len())),
        }
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub logprobs: Option<u32>,
    /// Parsed separately (see `extract`), so that its errors name the field.
    #[serde(skip)]
    pub common: CommonParams,
}

impl CompletionRequest {
    /// Whether the prompt is to be repeated before the completion.
    pub fn echo(&self) -> bool {
        self.echo == Some(true)
    }

    pub fn sampling(&self) -> Result<SamplingParams, RequestFault> {
        if self.echo() && self.logprobs.is_some() {
            return Err(RequestFault::new(
                "echo together with logprobs is not supported (the prompt's logprobs would need a \
                 pass over every prompt position); drop one of them",
                "echo",
            ));
        }
        if self.suffix.is_some() {
            return Err(RequestFault::new("suffix is not supported", "suffix"));
        }
        if let Some(n) = self.logprobs
            && n > MAX_COMPLETION_LOGPROBS
        {
            return Err(RequestFault::new(
                format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {n}"),
                "logprobs",
            ));
        }
        Ok(SamplingParams {
            logprobs: self.logprobs,
            // OpenAI's legacy completions default to 16 tokens.
            ..self
                .common
                .sampling(Some(self.common.max_tokens.unwrap_or(16)))?
        })
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl From<crate::engine::runner::Usage> for Usage {
    fn from(u: crate::engine::runner::Usage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: Role,
    /// Null when the answer is a tool call.
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One alternative of a chat token's `top_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One generated token of a chat answer with its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// A chat choice's (or chunk's) `logprobs`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// A legacy completion choice's (or chunk's) `logprobs`: parallel lists,
/// one entry per generated token.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Token text to log-probability of the most likely tokens (a JSON
    /// object, so unordered; tokens with the same text share an entry).
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Where each token's text starts in the choice's text (characters).
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// What a streamed chat chunk adds to the message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A text completion choice; also the shape of its streamed chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// A text completion response, or (with `usage` absent) one streamed chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The `owned_by` of a model served by simulated engines (`--device sim`).
pub const SIMULATED_OWNER: &str = "xpyd-simulated";

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// vLLM's extension: the most tokens (prompt plus output) of a request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

impl ModelCard {
    pub fn new(id: impl Into<String>, max_model_len: Option<usize>) -> Self {
        ModelCard {
            id: id.into(),
            object: "model".into(),
            created: unix_now(),
            owned_by: "xpyd".into(),
            max_model_len,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// `{"error": {...}}`, OpenAI's error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Seconds since the Unix epoch, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_accepts_string_or_list_and_limits_its_length() {
        let one: CommonParams = serde_json::from_str(r#"{"stop":"x"}"#).unwrap();
        assert_eq!(one.sampling(None).unwrap().stop, vec!["x".to_string()]);
        let five: CommonParams = serde_json::from_str(r#"{"stop":["a","b","c","d","e"]}"#).unwrap();
        assert_eq!(
            five.sampling(None).unwrap_err().param.as_deref(),
            Some("stop")
        );
    }

    #[test]
    fn unserved_fields_are_refused_by_name_and_harmless_values_pass() {
        let base = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
        let refused = [
            (r#""response_format":{"type":"xml"}"#, "response_format"),
            (
                r#""response_format":{"type":"json_schema"}"#,
                "response_format",
            ),
            (
                r#""response_format":{"type":"json_schema","json_schema":{"schema":[1]}}"#,
                "response_format",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"a b"}}]"#,
                "tools",
            ),
            (r#""tool_choice":"required""#, "tool_choice"),
            (r#""functions":[{"name":"f"}]"#, "functions"),
            (r#""logit_bias":{"50256":-100}"#, "logit_bias"),
            (r#""modalities":["text","audio"]"#, "modalities"),
            (r#""audio":{"voice":"alloy","format":"wav"}"#, "audio"),
            (
                r#""prediction":{"type":"content","content":"x"}"#,
                "prediction",
            ),
            (r#""web_search_options":{}"#, "web_search_options"),
            (r#""store":true"#, "store"),
        ];
        for (field, name) in refused {
            let r: ChatCompletionRequest =
                serde_json::from_str(&format!("{{{base},{field}}}")).unwrap();
            let fault = r.sampling().unwrap_err();
            assert_eq!(fault.param.as_deref(), Some(name), "{field}");
            assert!(fault.message.contains(name), "{}", fault.message);
        }
        let harmless = [
            r#""response_format":{"type":"text"}"#,
            r#""tools":[]"#,
            r#""tool_choice":"none""#,
            r#""logprobs":false"#,
            r#""top_logprobs":0"#,
            r#""logit_bias":{}"#,
            r#""modalities":["text"]"#,
            r#""store":false"#,
            r#""metadata":{"k":"v"}"#,
            r#""service_tier":"auto""#,
            r#""parallel_tool_calls":true"#,
            r#""response_format":null"#,
            r#""made_up_field":{"x":1}"#,
        ];
        for field in harmless {
            let r: ChatCompletionRequest =
                serde_json::from_str(&format!("{{{base},{field}}}")).unwrap();
            assert!(r.sampling().is_ok(), "{field}");
        }
    }

    #[test]
    fn response_format_becomes_the_schema_to_enforce() {
        let schema = |format: &str| {
            let r: ChatCompletionRequest = serde_json::from_str(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"response_format":{format}}}"#
            ))
            .unwrap();
            r.sampling().map(|s| s.json_schema).map_err(|f| f.param)
        };
        assert_eq!(schema(r#"{"type":"text"}"#), Ok(None));
        assert_eq!(
            schema(r#"{"type":"json_object"}"#),
            Ok(Some(r#"{"type":"object"}"#.into()))
        );
        // Property order is the user's: it decides the order of the keys.
        assert_eq!(
            schema(
                r#"{"type":"json_schema","json_schema":{"name":"p","strict":true,"schema":{"type":"object","properties":{"z":{"type":"string"},"a":{"type":"integer"}}}}}"#
            ),
            Ok(Some(
                r#"{"type":"object","properties":{"z":{"type":"string"},"a":{"type":"integer"}}}"#
                    .into()
            ))
        );
    }

    #[test]
    fn logprobs_fields_are_checked_by_name() {
        let chat = |fields: &str| {
            let r: ChatCompletionRequest = serde_json::from_str(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],{fields}}}"#
            ))
            .unwrap();
            r.sampling().map(|s| s.logprobs).map_err(|f| f.param)
        };
        assert_eq!(chat(r#""logprobs":true"#), Ok(Some(0)));
        assert_eq!(chat(r#""logprobs":true,"top_logprobs":20"#), Ok(Some(20)));
        assert_eq!(chat(r#""logprobs":false,"top_logprobs":0"#), Ok(None));
        assert_eq!(chat(r#""logprobs":null"#), Ok(None));
        for (fields, param) in [
            (r#""logprobs":true,"top_logprobs":21"#, "top_logprobs"),
            (r#""logprobs":true,"top_logprobs":-1"#, "top_logprobs"),
            (r#""logprobs":true,"top_logprobs":"5""#, "top_logprobs"),
            (r#""top_logprobs":3"#, "top_logprobs"),
            (r#""logprobs":1"#, "logprobs"),
        ] {
            assert_eq!(chat(fields), Err(Some(param.to_string())), "{fields}");
        }
        let text = |fields: &str| {
            let r: CompletionRequest =
                serde_json::from_str(&format!(r#"{{"model":"m","prompt":"x",{fields}}}"#)).unwrap();
            r.sampling().map(|s| s.logprobs).map_err(|f| f.param)
        };
        assert_eq!(text(r#""logprobs":0"#), Ok(Some(0)));
        assert_eq!(text(r#""logprobs":5"#), Ok(Some(5)));
        assert_eq!(text(r#""logprobs":null"#), Ok(None));
        assert_eq!(text(r#""logprobs":6"#), Err(Some("logprobs".to_string())));
        assert_eq!(text(r#""echo":true"#), Ok(None));
        assert_eq!(
            text(r#""echo":true,"logprobs":1"#),
            Err(Some("echo".to_string()))
        );
    }

    #[test]
    fn n_is_between_1_and_16() {
        let n = |v: &str| {
            serde_json::from_str::<CommonParams>(&format!(r#"{{"n":{v}}}"#))
                .unwrap()
                .choices()
                .map_err(|f| f.param)
        };
        assert_eq!(n("1"), Ok(1));
        assert_eq!(n("16"), Ok(16));
        assert_eq!(n("null"), Ok(1));
        assert_eq!(n("0"), Err(Some("n".to_string())));
        assert_eq!(n("17"), Err(Some("n".to_string())));
    }

    #[test]
    fn chat_prefers_max_completion_tokens() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":9,"max_completion_tokens":3,"top_k":-1}"#,
        )
        .unwrap();
        let s = r.sampling().unwrap();
        assert_eq!(s.max_tokens, Some(3));
        assert_eq!(s.top_k, None);
    }
}
