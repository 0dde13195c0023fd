//! The KV-aware router: which decode worker serves a request.
//!
//! Decode workers publish their KV events ([`KvEventBatch`]) on
//! the bus; the frontend feeds them to one shared [`Router`], keeps its
//! worker set in sync with discovery, asks [`Router::select`] for each
//! request and calls [`Router::finish`] when it ends. After NVIDIA Dynamo's
//! `kv_router`: the wire types (KV events, prefix hashes, settings) live in
//! `xpyd-api` and are re-exported here; [`indexer`] (which worker caches
//! which prefix) and [`scheduler`] (strategies and the cost function), plus
//! [`metrics`].
//!
//! Not here: the disaggregation decision (the decode worker makes it with
//! the settings it watches) and the bus transport.

pub mod indexer;
pub mod metrics;
pub mod scheduler;

pub use indexer::{BatchOutcome, KvIndexer, OverlapScores, WorkerId};
pub use metrics::RouterMetrics;
pub use scheduler::{Decision, RouteRequest, Router, RouterError, SharedRouter};
pub use xpyd_api::kv_events::{DecodeError, KvEventBatch, KvEventPublisher, WorkerLoad};
