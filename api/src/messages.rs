//! The messages workers speak over the bus: what a frontend sends a decode
//! worker, what streams back, and the remote-prefill job a decode worker puts
//! on the prefill queue (`docs/architecture.md`, "the remote-prefill
//! protocol").
//!
//! JSON, versioned by adding fields (unknown fields are ignored). The
//! sampling parameters and usage here are wire-only mirrors of the engine's:
//! the runtime converts at the edge, so an engine refactor cannot change
//! the wire format. Not here: the bus transport, the engine.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::instance::TransferMetadata;
use crate::kv::TokenId;

/// What the user asked for, as it travels on the bus (the engine's
/// `SamplingParams` field by field; same JSON names, same defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WireSamplingParams {
    pub temperature: f32,
    pub top_k: Option<u32>,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub max_tokens: Option<u32>,
    pub min_tokens: u32,
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    /// Return log-probabilities, with this many alternatives per token.
    /// Absent (not null) when not asked, so older readers see no change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// The output must be JSON matching this JSON schema (its text): the
    /// prefill worker's first token obeys it too. Absent when not asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<String>,
}

impl Default for WireSamplingParams {
    /// OpenAI's defaults: temperature 1, no top-k, top-p 1, no limits.
    fn default() -> Self {
        WireSamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            seed: None,
            max_tokens: None,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            stop: Vec::new(),
            logprobs: None,
            json_schema: None,
        }
    }
}

/// Why generation ended, as OpenAI's `finish_reason` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` (or the context window) was reached.
    Length,
    /// The answer is a tool call. Only the frontend reports this, when it
    /// reads a call out of an answer that ended with `Stop`; workers never
    /// send it.
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

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
    /// A prefill worker gives up `request_id`'s job and will write nothing
    /// (more) into its blocks: it failed (`handed_back` false: the decode
    /// worker prefills locally at once), or it is shutting down and handed
    /// the job back to the queue (`handed_back` true: its claim is released
    /// so that the worker the job goes to next may claim it). Answered by
    /// one empty message.
    Abandon {
        request_id: String,
        prefill_instance: String,
        reason: String,
        handed_back: bool,
    },
}

/// Messages addressed to a prefill instance on the request plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PrefillMessage {
    /// A decode worker waiting for `request_id`'s KV asks whether its
    /// claimant still works on it; answered by one [`JobStatus`]. A worker
    /// that is gone does not answer at all (the bus says "no responders").
    Status { request_id: String },
    /// A decode worker probes the path from this worker back to it, after
    /// a quarantine: compute and write this one-block job as if it came
    /// from the queue (claim included). Answered by one empty message once
    /// the job is taken; its outcome travels as a job's does (the
    /// notification, or [`DecodeMessage::Abandon`]). Its
    /// `decode_transfer` is `None`: this enum is internally tagged, which
    /// cannot carry the raw JSON of [`TransferMetadata`]; the prober is
    /// registered (it probes only while serving), so its record has it.
    Probe(Box<RemotePrefillRequest>),
}

/// The answer to [`PrefillMessage::Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Claimed and not finished: computing (or writing, from workers that
    /// predate [`JobStatus::Writing`]).
    Working,
    /// Computed, and its write is posted: if it does not land, the data
    /// path is at fault, not the compute.
    Writing,
    /// Finished lately (written, or abandoned): its notification or its
    /// [`DecodeMessage::Abandon`] is on the way.
    Finished,
    /// Not a job this worker holds or held lately.
    Unknown,
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateWork {
    pub request_id: String,
    pub model: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: WireSamplingParams,
}

/// The answer to [`DecodeMessage::Claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ClaimReply {
    /// Compute and write within `remaining_ms`, counted by the claimant
    /// from when it sent the claim: the time is measured on one clock (each
    /// side's own monotonic clock), so no clock skew between hosts matters.
    Proceed { remaining_ms: u64 },
    /// Do not write: the request is gone, done elsewhere or past its deadline.
    Refuse,
    /// Not you: the path from this prefill worker to the decode worker is
    /// quarantined (its recent transfers failed). Hand the job back to the
    /// queue for another worker; write nothing.
    Decline,
}

/// Token counts as OpenAI's `usage` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// The log-probabilities of one generated token (the model's distribution
/// before temperature and truncation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    /// Most likely first; as many as the request asked.
    #[serde(default)]
    pub top: Vec<WireTopLogprob>,
}

/// One alternative of [`WireLogprobs::top`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WireTopLogprob {
    pub token_id: u32,
    pub logprob: f32,
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
        /// Only for requests that asked (`WireSamplingParams::logprobs`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprobs: Option<WireLogprobs>,
    },
    Error {
        kind: WireErrorKind,
        message: String,
        #[serde(default)]
        param: Option<String>,
    },
}

/// A job on the prefill queue: compute the KV of `token_ids` and write
/// blocks `first_block..` of it into `dst_blocks` of `decode_instance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemotePrefillRequest {
    pub request_id: String,
    pub model: String,
    pub token_ids: Vec<u32>,
    /// For the first token (the prefill side samples it).
    pub sampling: WireSamplingParams,
    pub decode_instance: String,
    /// Blocks the decode worker reserved, in token order.
    pub dst_blocks: Vec<u32>,
    /// Leading blocks the decode worker already has (its prefix-cache hit):
    /// `dst_blocks[0]` receives prompt block `first_block`.
    pub first_block: u32,
    /// How long the decode worker waits for the KV, from when it enqueued
    /// the job (for information: the claim reply gives the time that binds).
    pub timeout_ms: u64,
    /// The decode worker's NIXL metadata (as in its discovery record). A
    /// draining decode worker has removed its record but still takes the
    /// writes it waits for. `None` from decode workers that predate it.
    #[serde(default)]
    pub decode_transfer: Option<TransferMetadata>,
}

/// Why a wire message could not be read.
#[derive(Debug)]
pub struct WireError {
    what: &'static str,
    source: serde_json::Error,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed {}: {}", self.what, self.source)
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Serialize a wire message.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Plain data structs (strings, numbers, vectors) always serialize.
    serde_json::to_vec(message).unwrap_or_default()
}

/// Parse a wire message; `what` names it in the error.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(bytes).map_err(|source| WireError { what, source })
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
        let reply = ClaimReply::Proceed { remaining_ms: 1500 };
        assert_eq!(
            String::from_utf8_lossy(&encode(&reply)),
            r#"{"reply":"proceed","remaining_ms":1500}"#
        );
        let abandon = DecodeMessage::Abandon {
            request_id: "r".into(),
            prefill_instance: "p".into(),
            reason: "engine error".into(),
            handed_back: false,
        };
        assert_eq!(
            decode::<DecodeMessage>("m", &encode(&abandon)).unwrap(),
            abandon
        );
        let status = PrefillMessage::Status {
            request_id: "r".into(),
        };
        assert_eq!(
            decode::<PrefillMessage>("m", &encode(&status)).unwrap(),
            status
        );
        let probe = PrefillMessage::Probe(Box::new(RemotePrefillRequest {
            request_id: "probe-d-0".into(),
            model: "m".into(),
            token_ids: vec![1, 2, 3],
            sampling: WireSamplingParams::default(),
            decode_instance: "d".into(),
            dst_blocks: vec![7],
            first_block: 0,
            timeout_ms: 10_000,
            decode_transfer: None,
        }));
        assert_eq!(
            decode::<PrefillMessage>("m", &encode(&probe)).unwrap(),
            probe
        );
        assert_eq!(
            String::from_utf8_lossy(&encode(&ClaimReply::Decline)),
            r#"{"reply":"decline"}"#
        );
        let e = GenerateEvent::Token {
            token_id: 5,
            text: "x".into(),
            finish: Some(FinishReason::Length),
            usage: Some(WireUsage {
                prompt_tokens: 3,
                completion_tokens: 1,
                cached_tokens: 0,
            }),
            logprobs: None,
        };
        let back: GenerateEvent = decode("event", &encode(&e)).unwrap();
        assert_eq!(back, e);
        // Events of workers that predate logprobs still read.
        let old: GenerateEvent =
            decode("event", br#"{"type":"token","token_id":5,"text":"x"}"#).unwrap();
        assert!(matches!(old, GenerateEvent::Token { logprobs: None, .. }));
        let err = decode::<RemotePrefillRequest>("prefill job", b"{}").unwrap_err();
        assert!(err.to_string().contains("malformed prefill job"), "{err}");
    }

    #[test]
    fn sampling_params_keep_their_field_names_and_defaults() {
        let json = serde_json::to_value(WireSamplingParams {
            top_k: Some(5),
            max_tokens: Some(8),
            stop: vec!["x".into()],
            ..WireSamplingParams::default()
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "temperature": 1.0, "top_k": 5, "top_p": 1.0, "seed": null,
                "max_tokens": 8, "min_tokens": 0, "stop_token_ids": [],
                "ignore_eos": false, "stop": ["x"],
            })
        );
        let sparse: WireSamplingParams = serde_json::from_str(r#"{"temperature":0.0}"#).unwrap();
        assert_eq!(
            sparse,
            WireSamplingParams {
                temperature: 0.0,
                ..WireSamplingParams::default()
            }
        );
    }
}
