//! [`LocalBackend`]: the frontend's backend over an engine in the test
//! process, for the API tests (the product serves through the bus, with
//! `ClusterBackend`). Dropping a generation stream cancels the request down
//! to the engine.

use futures::future::BoxFuture;
use futures::stream;
use tokio::sync::mpsc;
use xpyd_runtime::engine::chat_template::ChatMessage;
use xpyd_runtime::engine::runner::{EngineHandle, OutputItem, Request};
use xpyd_runtime::engine::tokenizer::Tokenizer;
use xpyd_runtime::frontend::protocol::ModelCard;
use xpyd_runtime::frontend::{
    BackendError, CompletionBackend, GenerateRequest, OutputStream, Prompts,
};

/// One model served by an engine in this process.
#[derive(Debug)]
pub struct LocalBackend {
    prompts: Prompts,
    engine: EngineHandle,
}

impl LocalBackend {
    /// Serve `engine` as model `model`. `tokenizer` must be the engine's
    /// model's.
    pub fn new(
        model: impl Into<String>,
        engine: EngineHandle,
        tokenizer: Tokenizer,
    ) -> Result<Self, BackendError> {
        Ok(LocalBackend {
            prompts: Prompts::new(model, tokenizer)?,
            engine,
        })
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }
}

/// Cancels its request in the engine when the stream is dropped before the
/// last token (the engine also notices the closed channel, one step later).
struct CancelOnDrop {
    engine: EngineHandle,
    id: String,
    finished: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            tracing::debug!(request_id = %self.id, "stream dropped; cancelling");
            let _ = self.engine.cancel(&self.id);
        }
    }
}

impl CompletionBackend for LocalBackend {
    fn models(&self) -> Vec<ModelCard> {
        vec![ModelCard::new(
            self.prompts.model().to_string(),
            Some(self.engine.config().max_model_len),
        )]
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
            let rx = self.engine.submit(Request {
                id: request.request_id.clone(),
                prompt_token_ids: request.prompt_token_ids,
                sampling: request.sampling,
            })?;
            let guard = CancelOnDrop {
                engine: self.engine.clone(),
                id: request.request_id,
                finished: false,
            };
            Ok(output_stream(rx, guard))
        })
    }

    fn health(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

fn output_stream(rx: mpsc::Receiver<OutputItem>, guard: CancelOnDrop) -> OutputStream {
    Box::pin(stream::unfold(
        (rx, guard),
        |(mut rx, mut guard)| async move {
            if guard.finished {
                return None;
            }
            let item = match rx.recv().await {
                Some(Ok(output)) => {
                    guard.finished = output.finish.is_some();
                    Ok(output)
                }
                Some(Err(e)) => {
                    guard.finished = true;
                    Err(BackendError::from(e))
                }
                None => {
                    guard.finished = true;
                    Err(BackendError::Internal(
                        "the engine ended the request without a finish".into(),
                    ))
                }
            };
            Some((item, (rx, guard)))
        },
    ))
}
