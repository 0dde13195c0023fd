//! [`ClusterBackend`]: the frontend's backend when workers run elsewhere.
//!
//! It tokenizes here, asks a [`WorkerPicker`] (the router) for a decode
//! worker among those discovery lists for the model, and streams the
//! request over the bus. A worker that turns out dead or not registered
//! before the first token is skipped for the next best one; after the
//! first token a failure ends the stream with an error. `GET /v1/models`
//! lists a model while at least one decode worker serves it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};

use super::backend::{BackendError, CompletionBackend, GenerateRequest, OutputStream, Prompts};
use super::protocol::{ModelCard, SIMULATED_OWNER};
use crate::bus::{Bus, BusError, ResponseStream};
use crate::discovery::{Discovery, InstanceRecord, Role};
use crate::engine::chat_template::ChatMessage;
use crate::engine::runner::Output;
use crate::engine::wire::output_of;
use xpyd_api::messages::{
    self as protocol, DecodeMessage, GenerateEvent, GenerateWork, WireErrorKind,
};

/// Chooses the decode worker of each request (the router implements it).
pub trait WorkerPicker: Send + Sync + 'static {
    /// One of `candidates` (never empty) for `request`.
    fn pick(&self, request: &GenerateRequest, candidates: &[String]) -> Option<String>;

    /// `request_id` ended (finished, failed or was dropped).
    fn finished(&self, _request_id: &str) {}
}

/// Settings of a [`ClusterBackend`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// A stream that gets nothing, not even the bus's heartbeats, for this
    /// long has lost its worker.
    pub idle_timeout: Duration,
    /// Workers tried for one request before giving up.
    pub max_attempts: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            idle_timeout: Duration::from_secs(10),
            max_attempts: 3,
        }
    }
}

/// Serves one model through the decode workers of a deployment.
pub struct ClusterBackend {
    prompts: Prompts,
    discovery: Arc<dyn Discovery>,
    bus: Arc<dyn Bus>,
    picker: Arc<dyn WorkerPicker>,
    options: ClusterOptions,
}

impl ClusterBackend {
    pub fn new(
        prompts: Prompts,
        discovery: Arc<dyn Discovery>,
        bus: Arc<dyn Bus>,
        picker: Arc<dyn WorkerPicker>,
        options: ClusterOptions,
    ) -> ClusterBackend {
        ClusterBackend {
            prompts,
            discovery,
            bus,
            picker,
            options,
        }
    }

    /// Decode workers serving our model, by instance id.
    fn decode_workers(&self) -> Vec<InstanceRecord> {
        self.discovery
            .instances()
            .borrow()
            .values()
            .filter(|r| r.role == Role::Decode && r.model == self.prompts.model())
            .cloned()
            .collect()
    }

    /// Send `request` to one worker; on failure, whether another attempt
    /// may take it (nothing was generated yet).
    async fn attempt(
        &self,
        worker: &str,
        request: &GenerateRequest,
    ) -> Result<(Output, ResponseStream), (BackendError, Retry)> {
        let message = DecodeMessage::Generate(GenerateWork {
            request_id: request.request_id.clone(),
            model: request.model.clone(),
            prompt_token_ids: request.prompt_token_ids.clone(),
            sampling: request.sampling.clone().into(),
        });
        let mut responses = self
            .bus
            .request(
                worker,
                protocol::encode(&message).into(),
                self.options.idle_timeout,
            )
            .await
            .map_err(|e| {
                let retry = match e {
                    BusError::NoResponders(_) => Retry::Unserved,
                    _ => Retry::Another,
                };
                (bus_error(worker, e), retry)
            })?;
        match responses.next().await {
            Some(Ok(bytes)) => match event(&bytes) {
                Ok(first) => Ok((first, responses)),
                Err(e @ BackendError::Unavailable(_)) => Err((e, Retry::Another)),
                Err(e) => Err((e, Retry::No)),
            },
            Some(Err(e)) => Err((bus_error(worker, e), Retry::Another)),
            None => Err((
                BackendError::Unavailable(format!("decode worker {worker} ended the stream")),
                Retry::Another,
            )),
        }
    }
}

/// Whether a failed attempt may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// The error is the request's own: no other worker would do better.
    No,
    /// Another worker may take it.
    Another,
    /// The bus found nobody serving the worker's subject: another worker,
    /// or the same one once the bus has reconnected.
    Unserved,
}

/// Pause before trying the workers again when the bus found none of them
/// served (times the attempt number).
const RETRY_PAUSE: Duration = Duration::from_millis(500);

fn bus_error(worker: &str, e: BusError) -> BackendError {
    BackendError::Unavailable(format!("decode worker {worker}: {e}"))
}

/// One streamed event as an output or the error it reports.
fn event(bytes: &[u8]) -> Result<Output, BackendError> {
    let event: GenerateEvent = protocol::decode("generate event", bytes)
        .map_err(|e| BackendError::Internal(e.to_string()))?;
    match event {
        GenerateEvent::Error {
            kind,
            message,
            param,
        } => Err(match kind {
            WireErrorKind::InvalidRequest => BackendError::InvalidRequest { message, param },
            WireErrorKind::ModelNotFound => BackendError::Unavailable(message),
            WireErrorKind::Unavailable => BackendError::Unavailable(message),
            WireErrorKind::Internal => BackendError::Internal(message),
        }),
        token => output_of(token).ok_or_else(|| BackendError::Internal("unexpected event".into())),
    }
}

/// Tells the picker when a request's stream ends, however it ends.
struct Finished {
    picker: Arc<dyn WorkerPicker>,
    request_id: String,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.picker.finished(&self.request_id);
    }
}

impl CompletionBackend for ClusterBackend {
    fn models(&self) -> Vec<ModelCard> {
        let workers = self.decode_workers();
        if workers.is_empty() {
            return Vec::new();
        }
        let max_len = workers
            .iter()
            .filter_map(|r| r.capacity.map(|c| c.max_model_len as usize))
            .min();
        let mut card = ModelCard::new(self.prompts.model().to_string(), max_len);
        if workers.iter().any(InstanceRecord::is_simulated) {
            card.owned_by = SIMULATED_OWNER.to_string();
        }
        vec![card]
    }

    fn simulated(&self) -> bool {
        self.decode_workers()
            .iter()
            .any(InstanceRecord::is_simulated)
    }

    fn render_chat(&self, model: &str, messages: &[ChatMessage]) -> Result<String, BackendError> {
        self.prompts.render_chat(model, messages)
    }

    fn tokenize(
        &self,
        model: &str,
        text: &str,
        raw_prompt: bool,
    ) -> Result<Vec<u32>, BackendError> {
        self.prompts.tokenize(model, text, raw_prompt)
    }

    fn token_bytes(&self, _model: &str, token: u32) -> Vec<u8> {
        self.prompts.token_bytes(token)
    }

    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'_, Result<OutputStream, BackendError>> {
        Box::pin(async move {
            self.prompts.check_model(&request.model)?;
            let finished = Finished {
                picker: self.picker.clone(),
                request_id: request.request_id.clone(),
            };
            let mut candidates: Vec<String> = self
                .decode_workers()
                .into_iter()
                .map(|r| r.instance_id)
                .collect();
            let mut last = BackendError::Unavailable(format!(
                "no decode worker is serving model {:?}",
                request.model
            ));
            // Whether every worker tried was answered for by the bus with
            // "nobody serves it" while still registered: the bus itself is
            // reconnecting (a NATS restart), so the same workers are worth
            // another try after a pause.
            let mut all_unserved = true;
            for attempt in 0..self.options.max_attempts {
                if candidates.is_empty() && all_unserved && attempt > 0 {
                    tokio::time::sleep(RETRY_PAUSE * attempt as u32).await;
                    candidates = self
                        .decode_workers()
                        .into_iter()
                        .map(|r| r.instance_id)
                        .collect();
                }
                if candidates.is_empty() {
                    break;
                }
                let Some(worker) = self.picker.pick(&request, &candidates) else {
                    break;
                };
                candidates.retain(|c| *c != worker);
                match self.attempt(&worker, &request).await {
                    Ok((first, rest)) => return Ok(output_stream(worker, first, rest, finished)),
                    Err((e, Retry::No)) => return Err(e),
                    Err((e, retry)) => {
                        tracing::warn!(request_id = %request.request_id, %worker, "{e}; trying another worker");
                        all_unserved &= retry == Retry::Unserved;
                        last = e;
                    }
                }
            }
            Err(last)
        })
    }

    fn health(&self) -> Result<(), BackendError> {
        if self.decode_workers().is_empty() {
            return Err(BackendError::Unavailable(format!(
                "no decode worker is serving model {:?}",
                self.prompts.model()
            )));
        }
        Ok(())
    }

    fn session_header(&self) -> Option<String> {
        let settings = self.discovery.settings();
        let header = settings
            .borrow()
            .as_ref()
            .map(|s| s.session_header.clone())
            .unwrap_or_else(|| crate::discovery::RouterSettings::default().session_header);
        Some(header)
    }
}

/// The client's stream: the first output, then the rest as they come; ends
/// after the output with a finish reason.
fn output_stream(
    worker: String,
    first: Output,
    rest: ResponseStream,
    finished: Finished,
) -> OutputStream {
    let done = first.finish.is_some();
    let head = stream::iter([Ok(first)]);
    let tail = stream::unfold(
        (rest, finished, done, worker),
        |(mut rest, finished, done, worker)| async move {
            if done {
                return None;
            }
            let item = match rest.next().await {
                Some(Ok(bytes)) => event(&bytes),
                Some(Err(e)) => Err(bus_error(&worker, e)),
                None => Err(BackendError::Internal(format!(
                    "decode worker {worker} ended the request without a finish"
                ))),
            };
            let done = match &item {
                Ok(o) => o.finish.is_some(),
                Err(_) => true,
            };
            Some((item, (rest, finished, done, worker)))
        },
    );
    Box::pin(head.chain(tail))
}
