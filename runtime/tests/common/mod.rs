//! Helpers shared by the runtime's integration tests: the bundled model,
//! greedy requests, reading a request's output stream to its end, and the
//! frontend's backend over an in-process engine ([`local_backend`]).

#![allow(dead_code)] // each test binary uses a different part

pub mod local_backend;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::Receiver;
use tokio::sync::mpsc::error::TryRecvError;
use xpyd_runtime::assets::bundled_model;
use xpyd_runtime::engine::gguf::GgufFile;
use xpyd_runtime::engine::runner::{EngineError, OutputItem, Request, Usage};
use xpyd_runtime::engine::sampling::{FinishReason, SamplingParams, TokenLogprobs};

/// How long a request's stream may take to end on a loaded machine.
pub const STREAM_DEADLINE: Duration = Duration::from_secs(300);

/// The bundled SmolLM2 GGUF, opened once per test binary.
pub fn gguf() -> &'static GgufFile {
    static FILE: OnceLock<GgufFile> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = bundled_model().expect("the bundled model (run scripts/setup)");
        GgufFile::open(&path).expect("GGUF parses")
    })
}

/// A greedy request for `max_tokens` tokens that ignores EOS.
pub fn greedy(id: &str, prompt: &[u32], max_tokens: u32) -> Request {
    Request {
        id: id.to_string(),
        prompt_token_ids: prompt.to_vec(),
        sampling: SamplingParams {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..SamplingParams::default()
        },
    }
}

/// Everything a request streamed.
#[derive(Debug, Default)]
pub struct Collected {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Option<FinishReason>,
    pub usage: Option<Usage>,
    pub error: Option<EngineError>,
    /// Each output's logprobs, in order.
    pub logprobs: Vec<Option<TokenLogprobs>>,
}

impl Collected {
    /// The stream, failing the test if it carried an error.
    pub fn ok(self) -> Collected {
        if let Some(e) = &self.error {
            panic!("engine error: {e}");
        }
        self
    }
}

/// Reads `rx` until the stream ends, failing the test after
/// [`STREAM_DEADLINE`].
pub fn collect(mut rx: Receiver<OutputItem>) -> Collected {
    let until = Instant::now() + STREAM_DEADLINE;
    let mut out = Collected::default();
    loop {
        match rx.try_recv() {
            Ok(Ok(o)) => {
                out.tokens.push(o.token_id);
                out.text.push_str(&o.text);
                out.logprobs.push(o.logprobs);
                if o.finish.is_some() {
                    assert!(out.finish.is_none(), "nothing follows the finish");
                    out.finish = o.finish;
                    out.usage = o.usage;
                }
            }
            Ok(Err(e)) => out.error = Some(e),
            Err(TryRecvError::Disconnected) => return out,
            Err(TryRecvError::Empty) => {
                assert!(Instant::now() < until, "no end of stream by the deadline");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}
