//! Wire types the workers speak over the bus: what a frontend sends a decode
//! worker, what streams back, and the remote-prefill job a decode worker puts
//! on the prefill queue (`docs/architecture.md`, "The remote-prefill
//! protocol"; the decode side is [`super::decode`]).
//!
//! JSON, versioned by adding fields (unknown fields are ignored).

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::engine::runner::{Output, Usage};
use crate::engine::sampling::{FinishReason, SamplingParams};
use crate::transfer::PeerInfo;

/// Messages addressed to a decode instance on the request plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DecodeMessage {
    /// Generate for a tokenized prompt; answered by a stream of
    /// [`GenerateEvent`]s.
    Generate(GenerateWork),
    /// A prefill worker asks before computing and writing `request_id`'s KV
    /// whether the decode worker still waits for it; answered by one
    /// [`ClaimReply`]. Only the claimant may write into the blocks.
    Claim {
        request_id: String,
        prefill_instance: String,
    },
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateWork {
    pub request_id: String,
    pub model: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
}

/// The answer to [`DecodeMessage::Claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimReply {
    /// Compute and write; the blocks wait until the request's deadline.
    Proceed,
    /// Do not write: the request is gone, done elsewhere or past its deadline.
    Refuse,
}

/// Token counts as OpenAI's `usage` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// Kinds of failure a frontend maps to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireErrorKind {
    InvalidRequest,
    ModelNotFound,
    Unavailable,
    Internal,
}

/// What streams back for a [`GenerateWork`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GenerateEvent {
    Token {
        token_id: u32,
        text: String,
        #[serde(default)]
        finish: Option<FinishReason>,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    Error {
        kind: WireErrorKind,
        message: String,
        #[serde(default)]
        param: Option<String>,
    },
}

impl From<Output> for GenerateEvent {
    fn from(o: Output) -> Self {
        GenerateEvent::Token {
            token_id: o.token_id,
            text: o.text,
            finish: o.finish,
            usage: o.usage.map(|u| WireUsage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                cached_tokens: u.cached_tokens,
            }),
        }
    }
}

impl GenerateEvent {
    /// The engine output a `Token` event carries (`None` for errors).
    pub fn into_output(self) -> Option<Output> {
        match self {
            GenerateEvent::Token {
                token_id,
                text,
                finish,
                usage,
            } => Some(Output {
                token_id,
                text,
                finish,
                usage: usage.map(|u| Usage {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    cached_tokens: u.cached_tokens,
                }),
            }),
            GenerateEvent::Error { .. } => None,
        }
    }
}

/// A job on the prefill queue: compute the KV of `token_ids` and write
/// blocks `first_block..` of it into `dst_blocks` of `decode_instance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemotePrefillRequest {
    pub request_id: String,
    pub model: String,
    pub token_ids: Vec<u32>,
    /// For the first token (the prefill side samples it).
    pub sampling: SamplingParams,
    pub decode_instance: String,
    /// Blocks the decode worker reserved, in token order.
    pub dst_blocks: Vec<u32>,
    /// Leading blocks the decode worker already has (its prefix-cache hit):
    /// `dst_blocks[0]` receives prompt block `first_block`.
    pub first_block: u32,
    /// Milliseconds since the Unix epoch after which the decode worker no
    /// longer waits: nothing may be written after it.
    pub deadline_unix_ms: u64,
    /// The decode worker's NIXL metadata (as in its discovery record). A
    /// draining decode worker has removed its record but still takes the
    /// writes it waits for. `None` from decode workers that predate it.
    #[serde(default)]
    pub decode_transfer: Option<PeerInfo>,
}

/// Why a wire message could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what}: {source}")]
pub struct WireError {
    what: &'static str,
    source: serde_json::Error,
}

/// Serialize a wire message.
pub fn encode<T: Serialize>(message: &T) -> Bytes {
    // Plain data structs (strings, numbers, vectors) always serialize.
    Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}

/// Parse a wire message; `what` names it in the error.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(bytes).map_err(|source| WireError { what, source })
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_names_the_message() {
        let m = DecodeMessage::Claim {
            request_id: "r".into(),
            prefill_instance: "p".into(),
        };
        assert_eq!(decode::<DecodeMessage>("m", &encode(&m)).unwrap(), m);
        let e = GenerateEvent::Token {
            token_id: 5,
            text: "x".into(),
            finish: Some(FinishReason::Length),
            usage: Some(WireUsage {
                prompt_tokens: 3,
                completion_tokens: 1,
                cached_tokens: 0,
            }),
        };
        let back: GenerateEvent = decode("event", &encode(&e)).unwrap();
        let out = back.into_output().unwrap();
        assert_eq!(out.usage.unwrap().prompt_tokens, 3);
        let err = decode::<RemotePrefillRequest>("prefill job", b"{}").unwrap_err();
        assert!(err.to_string().contains("malformed prefill job"), "{err}");
    }
}
