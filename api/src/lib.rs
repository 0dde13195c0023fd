//! The contracts between xpyd processes, in one place: what the operator
//! writes and the agents read, and what agents say to each other over etcd
//! and the bus.
//!
//! - [`keys`]: the deployment [`Scope`], the etcd key layout and [`Role`];
//! - [`settings`]: [`RouterSettings`] (the operator writes them) and the
//!   [`RouterAck`] every agent writes back;
//! - [`instance`]: the [`InstanceRecord`] each process publishes, with its
//!   transfer metadata as an opaque [`TransferMetadata`] blob;
//! - [`kv`]: [`PrefixHash`] and its stable definition, and [`KvEvent`];
//! - [`kv_events`]: the [`KvEventBatch`] decode workers publish for routers;
//! - [`messages`]: the generate and remote-prefill messages on the bus, with
//!   wire-only [`WireSamplingParams`].
//!
//! Only data types, their encodings and pure helpers live here: no I/O, no
//! async runtime, no Kubernetes. Wire types change by adding fields (with
//! defaults), never by reinterpreting one, so that old and new processes
//! read each other's records.

pub mod instance;
pub mod keys;
pub mod kv;
pub mod kv_events;
pub mod messages;
pub mod settings;

pub use instance::{Capacity, InstanceRecord, InstanceSet, SIM_DEVICE, TransferMetadata};
pub use keys::{Role, Scope};
pub use kv::{KvEvent, KvEventData, PrefixHash, TokenId, prefix_hashes};
pub use kv_events::{DecodeError, KvEventBatch, KvEventPublisher, WorkerLoad};
pub use messages::{
    ClaimReply, DecodeMessage, FinishReason, GenerateEvent, GenerateWork, RemotePrefillRequest,
    WireError, WireErrorKind, WireLogprobs, WireSamplingParams, WireTopLogprob, WireUsage,
};
pub use settings::{PrefillUnavailable, RouterAck, RouterSettings, RouterStrategy};
