//! The HTTP handlers: chat and text completions (whole or streamed as
//! server-sent events), the model list, health and metrics.
//!
//! Each handler checks the model, turns the request into token ids and
//! sampling parameters through the backend, starts one generation per
//! choice (`n`), and shapes the backend's tokens (and their logprobs) into
//! OpenAI's responses. Wire shapes are in `protocol`, error bodies in
//! `error`; no handler knows whether the engine is local.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::{self, BoxStream, Stream};
use prometheus::{Registry, TextEncoder};
use serde::Serialize;
use tracing::Instrument;

use crate::engine::chat_template::ChatMessage;
use crate::engine::runner::Output;
use crate::engine::sampling::{FinishReason, SamplingParams, TokenLogprobs};

use super::backend::{BackendError, GenerateRequest, SharedBackend};
use super::error::ApiError;
use super::extract::OpenAiJson;
use super::metrics::{FrontendMetrics, RequestTimer};
use super::protocol::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessageIn, ChatTokenLogprob,
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ModelList, Prompt,
    Role, ToolCall, ToolCallDelta, TopLogprob, Usage, unix_now,
};
use super::tools::{ToolChoice, ToolMode};

/// What every handler shares.
pub struct AppState {
    pub backend: SharedBackend,
    pub metrics: FrontendMetrics,
    pub registry: Registry,
}

pub type SharedState = Arc<AppState>;

/// Which completion API a request came through; it decides the shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
        }
    }

    fn new_id(self) -> String {
        let prefix = match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        format!("{prefix}-{:032x}", rand::random::<u128>())
    }
}

/// A request ready for the backend.
struct Prepared {
    endpoint: Endpoint,
    id: String,
    model: String,
    prompt_token_ids: Vec<u32>,
    sampling: SamplingParams,
    /// The session header's value, when the backend routes by one.
    session: Option<String>,
    stream: bool,
    include_usage: bool,
    /// Choices to generate (`n`).
    n: u32,
    /// The tools the model may or must call (chat; not under `none`).
    tools: Option<Arc<ToolMode>>,
    /// The prompt text each choice starts with (completions' `echo`).
    echo: Option<String>,
}

impl Endpoint {
    /// The request field that holds the prompt, for errors about it.
    fn prompt_param(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        }
    }
}

/// The span every log line of one request carries (`model` is filled in
/// once the body is parsed).
fn request_span(endpoint: Endpoint, id: &str) -> tracing::Span {
    tracing::info_span!(
        "request",
        request_id = %id,
        endpoint = endpoint.name(),
        model = tracing::field::Empty
    )
}

pub async fn chat_completions(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<OpenAiJson<ChatCompletionRequest>, ApiError>,
) -> Response {
    let endpoint = Endpoint::Chat;
    let id = endpoint.new_id();
    let span = request_span(endpoint, &id);
    async move {
        let prepared = body.and_then(|OpenAiJson(request)| {
            check_model(&state, &request.model)?;
            let sampling = request.sampling()?;
            let tools = request
                .tool_mode()?
                .filter(|m| m.choice != ToolChoice::None)
                .map(Arc::new);
            let mut messages: Vec<ChatMessage> =
                request.messages.iter().map(chat_message).collect();
            if let Some(prompt) = tools.as_ref().and_then(|t| t.system_prompt()) {
                match messages.first_mut() {
                    Some(first) if first.role == "system" || first.role == "developer" => {
                        first.content = format!("{}\n\n{prompt}", first.content);
                    }
                    _ => messages.insert(0, ChatMessage::new("system", &prompt)),
                }
            }
            let text = state.backend.render_chat(&request.model, &messages)?;
            let prompt_token_ids = state.backend.tokenize(&request.model, &text, false)?;
            Ok(Prepared {
                endpoint,
                id,
                stream: request.common.stream(),
                include_usage: request.common.include_usage(),
                n: request.common.choices()?,
                model: request.model,
                prompt_token_ids,
                sampling,
                session: session_of(&state, &headers),
                tools,
                echo: None,
            })
        });
        respond(&state, endpoint, prepared).await
    }
    .instrument(span)
    .await
}

/// A request message as the chat template sees it. An assistant turn's
/// tool calls are written as the model was asked to write them (one JSON
/// object each); a `tool` message's content is the tool's answer.
fn chat_message(m: &ChatMessageIn) -> ChatMessage {
    let mut content = m.content.as_ref().map(|c| c.text()).unwrap_or_default();
    for call in m.tool_calls.iter().flatten() {
        let arguments: serde_json::Value = serde_json::from_str(&call.function.arguments)
            .unwrap_or_else(|_| serde_json::Value::String(call.function.arguments.clone()));
        let written = serde_json::json!({"name": call.function.name, "arguments": arguments});
        if !content.is_empty() {
            content.push('\n');
        }
        content.push_str(&written.to_string());
    }
    ChatMessage {
        role: m.role.as_str().to_string(),
        content,
    }
}

pub async fn completions(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<OpenAiJson<CompletionRequest>, ApiError>,
) -> Response {
    let endpoint = Endpoint::Completions;
    let id = endpoint.new_id();
    let span = request_span(endpoint, &id);
    async move {
        let prepared = body.and_then(|OpenAiJson(request)| {
            check_model(&state, &request.model)?;
            let sampling = request.sampling()?;
            let prompt = request.prompt.clone().into_prompt()?;
            let echo = request.echo().then(|| match &prompt {
                Prompt::Text(text) => text.clone(),
                Prompt::Tokens(ids) => {
                    let bytes: Vec<u8> = ids
                        .iter()
                        .flat_map(|&id| state.backend.token_bytes(&request.model, id))
                        .collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                }
            });
            let prompt_token_ids = match prompt {
                Prompt::Text(text) => state.backend.tokenize(&request.model, &text, true)?,
                Prompt::Tokens(ids) => ids,
            };
            Ok(Prepared {
                endpoint,
                id,
                stream: request.common.stream(),
                include_usage: request.common.include_usage(),
                n: request.common.choices()?,
                model: request.model,
                prompt_token_ids,
                sampling,
                session: session_of(&state, &headers),
                tools: None,
                echo,
            })
        });
        respond(&state, endpoint, prepared).await
    }
    .instrument(span)
    .await
}

/// The value of the backend's session header, if it has one and the
/// request carries it.
fn session_of(state: &AppState, headers: &HeaderMap) -> Option<String> {
    let name = state.backend.session_header()?;
    let value = headers.get(name.as_str())?.to_str().ok()?;
    (!value.is_empty()).then(|| value.to_string())
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if state.backend.models().iter().any(|card| card.id == model) {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

/// Run a prepared request (or count and return its error).
async fn respond(
    state: &AppState,
    endpoint: Endpoint,
    prepared: Result<Prepared, ApiError>,
) -> Response {
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            // Only served models become label values.
            let model = "";
            state
                .metrics
                .rejected(model, endpoint.name(), e.status.as_u16());
            return e.into_response();
        }
    };
    tracing::Span::current().record("model", prepared.model.as_str());
    let mut timer = state.metrics.timer(
        &prepared.model,
        endpoint.name(),
        prepared.prompt_token_ids.len(),
    );
    let upstream = open_choices(state, &prepared).await;
    let upstream = match upstream {
        Ok(s) => s,
        Err(e) => {
            let mut e = ApiError::from(e);
            if e.param.as_deref() == Some("prompt") {
                e.param = Some(endpoint.prompt_param().to_string());
            }
            // The engine knows a schema, not where it came from: a forced
            // tool call's schema is made of the tools' parameters.
            if e.param.as_deref() == Some("response_format")
                && prepared
                    .tools
                    .as_ref()
                    .is_some_and(|t| t.forced_schema().is_some())
            {
                e.param = Some("tools".to_string());
            }
            timer.finish(e.status.as_u16(), 0, 0);
            return e.into_response();
        }
    };
    let shaper = prepared
        .sampling
        .logprobs
        .is_some()
        .then(|| LogprobsShaper {
            backend: state.backend.clone(),
            model: prepared.model.clone(),
            endpoint,
        });
    let choices = (0..prepared.n)
        .map(|_| {
            let mut choice = ChoiceText::new(shaper.clone(), prepared.tools.clone());
            // Sent with the first token (echo and logprobs do not mix).
            choice.text = prepared.echo.clone().unwrap_or_default();
            choice
        })
        .collect();
    let mut response = if prepared.stream {
        let shape = Shape::of(&prepared);
        let events = sse_events(
            upstream,
            timer,
            shape,
            prepared.prompt_token_ids.len(),
            choices,
        );
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        match collect(
            upstream,
            &mut timer,
            prepared.prompt_token_ids.len(),
            choices,
        )
        .await
        {
            Ok(done) => {
                let usage = done.usage();
                timer.finish(200, usage.prompt_tokens, usage.completion_tokens);
                Shape::of(&prepared).whole(done).into_response()
            }
            Err(e) => {
                timer.finish(e.status.as_u16(), 0, 0);
                e.into_response()
            }
        }
    };
    // Lets a client quote the id that logs carry.
    if let Ok(id) = HeaderValue::from_str(&prepared.id) {
        response.headers_mut().insert(REQUEST_ID, id);
    }
    // A simulated engine's tokens are no answer: say so on every response.
    if state.backend.simulated() {
        response
            .headers_mut()
            .insert(SIMULATED, HeaderValue::from_static("true"));
    }
    response
}

/// The outputs of all choices of a request, each tagged with its index.
type ChoiceStream = BoxStream<'static, (u32, Result<Output, BackendError>)>;

/// Start the `n` choices of a request: one generation each, sharing the
/// prompt. The first runs alone until its first token, so that its prompt
/// KV is in the prefix cache when the others start and they reuse it
/// instead of computing it again. Dropping the stream cancels them all.
async fn open_choices(state: &AppState, prepared: &Prepared) -> Result<ChoiceStream, BackendError> {
    let request = |index: u32| GenerateRequest {
        request_id: if prepared.n == 1 {
            prepared.id.clone()
        } else {
            format!("{}-{index}", prepared.id)
        },
        model: prepared.model.clone(),
        prompt_token_ids: prepared.prompt_token_ids.clone(),
        sampling: prepared.sampling.for_choice(index),
        session: prepared.session.clone(),
    };
    let mut first = state.backend.generate(request(0)).await?;
    if prepared.n == 1 {
        // One choice needs no merging (`select_all` showed in the profile).
        return Ok(first.map(|item| (0, item)).boxed());
    }
    // The backend's stream ends every wait: its last item is an output
    // with `finish`, or an error.
    let head = first.next().await;
    let mut streams: Vec<ChoiceStream> = Vec::with_capacity(prepared.n as usize);
    streams.push(
        stream::iter(head)
            .chain(first)
            .map(|item| (0, item))
            .boxed(),
    );
    for index in 1..prepared.n {
        let more = state.backend.generate(request(index)).await?;
        streams.push(more.map(move |item| (index, item)).boxed());
    }
    Ok(stream::select_all(streams).boxed())
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Set (`true`) on responses generated by simulated engines (`--device sim`).
pub const SIMULATED: HeaderName = HeaderName::from_static("x-xpyd-simulated");

/// A finished generation: its choices in index order, each finished.
struct Finished {
    choices: Vec<ChoiceText>,
}

impl Finished {
    fn usage(&self) -> Usage {
        combined_usage(&self.choices)
    }
}

/// The usage of a request's choices: the prompt once (as the first choice,
/// which computed it, saw it), the completions of all.
fn combined_usage(choices: &[ChoiceText]) -> Usage {
    let mut usage = choices.first().and_then(|c| c.usage).unwrap_or(Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
        prompt_tokens_details: super::protocol::PromptTokensDetails { cached_tokens: 0 },
    });
    usage.completion_tokens = choices
        .iter()
        .map(|c| c.usage.map_or(c.generated, |u| u.completion_tokens))
        .sum();
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    usage
}

/// The log-probabilities of (part of) one choice, in its endpoint's shape.
#[derive(Debug, Clone, PartialEq)]
enum ChoiceLogprobs {
    Chat(ChatLogprobs),
    Completions(CompletionLogprobs),
}

/// What OpenAI clients get for a logprob that is `-inf` (JSON has no
/// infinity); vLLM's choice too.
const LOGPROB_FLOOR: f32 = -9999.0;

/// Turns engine logprobs into their wire shape: token ids become the text
/// and bytes they stand for.
#[derive(Clone)]
struct LogprobsShaper {
    backend: SharedBackend,
    model: String,
    endpoint: Endpoint,
}

impl ChoiceLogprobs {
    fn chat(self) -> Option<ChatLogprobs> {
        match self {
            ChoiceLogprobs::Chat(c) => Some(c),
            ChoiceLogprobs::Completions(_) => None,
        }
    }

    fn completions(self) -> Option<CompletionLogprobs> {
        match self {
            ChoiceLogprobs::Completions(c) => Some(c),
            ChoiceLogprobs::Chat(_) => None,
        }
    }
}

impl LogprobsShaper {
    /// An empty set for this endpoint.
    fn empty(&self) -> ChoiceLogprobs {
        match self.endpoint {
            Endpoint::Chat => ChoiceLogprobs::Chat(ChatLogprobs::default()),
            Endpoint::Completions => ChoiceLogprobs::Completions(CompletionLogprobs::default()),
        }
    }

    fn token(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.backend.token_bytes(&self.model, id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// Add one token's logprobs; `text_offset` is where its text starts in
    /// the choice's text, in characters.
    fn push(&self, into: &mut ChoiceLogprobs, lp: &TokenLogprobs, text_offset: usize) {
        let shown = |l: f32| if l.is_finite() { l } else { LOGPROB_FLOOR };
        match into {
            ChoiceLogprobs::Chat(chat) => {
                let (token, bytes) = self.token(lp.token);
                let top_logprobs = lp
                    .top
                    .iter()
                    .map(|&(id, logprob)| {
                        let (token, bytes) = self.token(id);
                        TopLogprob {
                            token,
                            logprob: shown(logprob),
                            bytes,
                        }
                    })
                    .collect();
                chat.content.push(ChatTokenLogprob {
                    token,
                    logprob: shown(lp.logprob),
                    bytes,
                    top_logprobs,
                });
            }
            ChoiceLogprobs::Completions(text) => {
                text.tokens.push(self.token(lp.token).0);
                text.token_logprobs.push(shown(lp.logprob));
                let mut top = std::collections::BTreeMap::new();
                for &(id, logprob) in &lp.top {
                    // Most likely first: a later token of the same text
                    // does not overwrite the likelier one.
                    top.entry(self.token(id).0).or_insert(shown(logprob));
                }
                text.top_logprobs.push(top);
                text.text_offset.push(text_offset);
            }
        }
    }
}

/// One choice as its tokens arrive: the text and logprobs not yet sent.
struct ChoiceText {
    shaper: Option<LogprobsShaper>,
    text: String,
    logprobs: Option<ChoiceLogprobs>,
    /// Characters of text before `text` (already sent, when streaming).
    sent_chars: usize,
    generated: usize,
    /// Set by the choice's last output.
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    /// The request's tools: the answer may be a call.
    tools: Option<Arc<ToolMode>>,
}

impl ChoiceText {
    /// `shaper` is set when the request asked for logprobs, `tools` when
    /// the model may call one.
    fn new(shaper: Option<LogprobsShaper>, tools: Option<Arc<ToolMode>>) -> Self {
        ChoiceText {
            tools,
            logprobs: shaper.as_ref().map(LogprobsShaper::empty),
            shaper,
            text: String::new(),
            sent_chars: 0,
            generated: 0,
            finish: None,
            usage: None,
        }
    }

    fn push(&mut self, output: &Output, prompt_tokens: usize) {
        self.generated += 1;
        if output.finish.is_some() {
            self.finish = output.finish;
            self.usage = Some(usage_of(output, prompt_tokens, self.generated));
        }
        if let (Some(shaper), Some(into), Some(lp)) =
            (&self.shaper, &mut self.logprobs, &output.logprobs)
        {
            let offset = self.sent_chars + self.text.chars().count();
            shaper.push(into, lp, offset);
        }
        self.text.push_str(&output.text);
    }

    /// Whether to keep the text back while streaming: it is, or may yet
    /// turn out to be, a tool call (a forced one always; under `auto`, while
    /// everything so far is a JSON object's beginning).
    fn holding(&self) -> bool {
        let Some(tools) = &self.tools else {
            return false;
        };
        self.finish.is_none()
            && (tools.forced_schema().is_some()
                || self.sent_chars == 0
                    && matches!(self.text.trim_start().chars().next(), None | Some('{')))
    }

    /// The tool call a finished answer `text` makes, if any (an answer cut
    /// by `length` makes none).
    fn call_in(&self, text: &str) -> Option<ToolCall> {
        let tools = self.tools.as_ref()?;
        (self.finish == Some(FinishReason::Stop))
            .then(|| tools.parse_call(text))
            .flatten()
    }

    /// The text and logprobs gathered since the last take.
    fn take(&mut self) -> (String, Option<ChoiceLogprobs>) {
        let text = std::mem::take(&mut self.text);
        self.sent_chars += text.chars().count();
        let fresh = self.shaper.as_ref().map(LogprobsShaper::empty);
        let logprobs = std::mem::replace(&mut self.logprobs, fresh);
        (text, logprobs)
    }
}

fn usage_of(output: &Output, prompt_tokens: usize, generated: usize) -> Usage {
    output.usage.map(Usage::from).unwrap_or(Usage {
        prompt_tokens,
        completion_tokens: generated,
        total_tokens: prompt_tokens + generated,
        prompt_tokens_details: super::protocol::PromptTokensDetails { cached_tokens: 0 },
    })
}

/// Gather every choice to its end. One failing choice fails the request
/// (the others are cancelled as the stream drops): no partial answer.
async fn collect(
    mut upstream: ChoiceStream,
    timer: &mut RequestTimer,
    prompt_tokens: usize,
    mut choices: Vec<ChoiceText>,
) -> Result<Finished, ApiError> {
    while let Some((index, item)) = upstream.next().await {
        let output = item?;
        timer.token();
        let Some(choice) = choices.get_mut(index as usize) else {
            continue;
        };
        choice.push(&output, prompt_tokens);
        if choices.iter().all(|c| c.finish.is_some()) {
            return Ok(Finished { choices });
        }
    }
    Err(ApiError::internal("the backend ended the stream early"))
}

/// The fixed parts of a response and how to shape one for its endpoint.
struct Shape {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl Shape {
    fn of(p: &Prepared) -> Self {
        Shape {
            endpoint: p.endpoint,
            id: p.id.clone(),
            model: p.model.clone(),
            created: unix_now(),
            include_usage: p.include_usage,
        }
    }

    fn whole(&self, done: Finished) -> Response {
        let usage = done.usage();
        let choices = (0..).zip(done.choices).map(|(index, mut choice)| {
            let (text, logprobs) = choice.take();
            let call = choice.call_in(&text);
            (index, text, logprobs, choice.finish, call)
        });
        match self.endpoint {
            Endpoint::Chat => Json(ChatCompletionResponse {
                id: self.id.clone(),
                object: "chat.completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: choices
                    .map(|(index, content, logprobs, finish, call)| {
                        let (message, finish) = match call {
                            Some(call) => (
                                AssistantMessage {
                                    role: Role::Assistant,
                                    content: None,
                                    tool_calls: Some(vec![call]),
                                },
                                Some(FinishReason::ToolCalls),
                            ),
                            None => (
                                AssistantMessage {
                                    role: Role::Assistant,
                                    content: Some(content),
                                    tool_calls: None,
                                },
                                finish,
                            ),
                        };
                        ChatChoice {
                            index,
                            message,
                            logprobs: logprobs.and_then(ChoiceLogprobs::chat),
                            finish_reason: finish,
                        }
                    })
                    .collect(),
                usage,
            })
            .into_response(),
            Endpoint::Completions => Json(CompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: choices
                    .map(|(index, text, logprobs, finish, _)| CompletionChoice {
                        index,
                        text,
                        logprobs: logprobs.and_then(ChoiceLogprobs::completions),
                        finish_reason: finish,
                    })
                    .collect(),
                usage: Some(usage),
            })
            .into_response(),
        }
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> Event {
        event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn text_chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Event {
        event(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    /// The chunk before any token of choice `index`: chat announces the
    /// assistant's role.
    fn opening(&self, index: u32) -> Option<Event> {
        match self.endpoint {
            Endpoint::Chat => Some(self.chat_chunk(
                vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some(Role::Assistant),
                        content: Some(String::new()),
                        tool_calls: None,
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            )),
            Endpoint::Completions => None,
        }
    }

    fn delta(
        &self,
        index: u32,
        text: String,
        logprobs: Option<ChoiceLogprobs>,
        finish: Option<FinishReason>,
    ) -> Event {
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(
                vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: None,
                        content: (!text.is_empty()).then_some(text),
                        tool_calls: None,
                    },
                    logprobs: logprobs.and_then(ChoiceLogprobs::chat),
                    finish_reason: finish,
                }],
                None,
            ),
            Endpoint::Completions => self.text_chunk(
                vec![CompletionChoice {
                    index,
                    text,
                    logprobs: logprobs.and_then(ChoiceLogprobs::completions),
                    finish_reason: finish,
                }],
                None,
            ),
        }
    }

    /// The chunk that streams a finished answer's tool call, whole.
    fn tool_call(&self, index: u32, call: ToolCall, logprobs: Option<ChoiceLogprobs>) -> Event {
        self.chat_chunk(
            vec![ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: None,
                    content: None,
                    tool_calls: Some(vec![ToolCallDelta { index: 0, call }]),
                },
                logprobs: logprobs.and_then(ChoiceLogprobs::chat),
                finish_reason: Some(FinishReason::ToolCalls),
            }],
            None,
        )
    }

    fn usage(&self, usage: Usage) -> Event {
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(Vec::new(), Some(usage)),
            Endpoint::Completions => self.text_chunk(Vec::new(), Some(usage)),
        }
    }
}

fn event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(e) => error_event(&ApiError::internal(format!("cannot encode a chunk: {e}"))),
    }
}

fn error_event(e: &ApiError) -> Event {
    let json = serde_json::to_string(&e.body()).unwrap_or_else(|_| {
        r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
            .to_string()
    });
    Event::default().data(json)
}

/// State of one event stream. Dropping it (the client went away) drops the
/// upstream, which cancels the request in the engine.
struct Streaming {
    upstream: Option<ChoiceStream>,
    timer: RequestTimer,
    shape: Shape,
    pending: VecDeque<Event>,
    prompt_tokens: usize,
    choices: Vec<ChoiceText>,
    /// The request's span: the body is polled outside the handler.
    span: tracing::Span,
}

fn sse_events(
    upstream: ChoiceStream,
    timer: RequestTimer,
    shape: Shape,
    prompt_tokens: usize,
    choices: Vec<ChoiceText>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let pending = (0..choices.len() as u32)
        .filter_map(|index| shape.opening(index))
        .collect();
    let state = Streaming {
        upstream: Some(upstream),
        timer,
        shape,
        pending,
        prompt_tokens,
        choices,
        span: tracing::Span::current(),
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok(event), s));
            }
            let upstream = s.upstream.as_mut()?;
            match upstream.next().await {
                Some((index, Ok(output))) => {
                    s.timer.token();
                    let Some(choice) = s.choices.get_mut(index as usize) else {
                        continue;
                    };
                    choice.push(&output, s.prompt_tokens);
                    let finish = output.finish;
                    // A token whose text is held back (part of a character,
                    // a possible stop string) sends its logprobs with the
                    // next chunk that has text.
                    if (!output.text.is_empty() || finish.is_some()) && !choice.holding() {
                        let (text, logprobs) = choice.take();
                        let chunk = match choice.call_in(&text) {
                            Some(call) => s.shape.tool_call(index, call, logprobs),
                            None => s.shape.delta(index, text, logprobs, finish),
                        };
                        s.pending.push_back(chunk);
                    }
                    if s.choices.iter().all(|c| c.finish.is_some()) {
                        let usage = combined_usage(&s.choices);
                        if s.shape.include_usage {
                            let chunk = s.shape.usage(usage);
                            s.pending.push_back(chunk);
                        }
                        s.pending.push_back(Event::default().data("[DONE]"));
                        s.timer
                            .finish(200, usage.prompt_tokens, usage.completion_tokens);
                        s.upstream = None;
                    }
                }
                Some((_, Err(e))) => end_with_error(&mut s, ApiError::from(e)),
                None => end_with_error(
                    &mut s,
                    ApiError::internal("the backend ended the stream early"),
                ),
            }
        }
    })
}

/// The status line is gone: the error travels as a chunk, as vLLM does.
fn end_with_error(s: &mut Streaming, e: ApiError) {
    let _entered = s.span.clone().entered();
    tracing::warn!(message = %e.message, "stream failed");
    s.pending.push_back(error_event(&e));
    s.pending.push_back(Event::default().data("[DONE]"));
    s.timer.finish(
        e.status.as_u16(),
        s.prompt_tokens,
        s.choices.iter().map(|c| c.generated).sum(),
    );
    s.upstream = None;
}

pub async fn list_models(State(state): State<SharedState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: state.backend.models(),
    })
}

pub async fn health(State(state): State<SharedState>) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .backend
        .health()
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(serde_json::json!({ "status": "ok" })))
}

pub async fn metrics(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let text = TextEncoder::new()
        .encode_to_string(&state.registry.gather())
        .map_err(|e| ApiError::internal(format!("cannot encode metrics: {e}")))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response())
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
