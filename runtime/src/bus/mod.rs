//! The bus: how processes of a deployment send each other work.
//!
//! Three planes, all carrying opaque bytes (the typed messages live with
//! the workers that speak them):
//! - **request plane**: a frontend sends one request to one decode instance
//!   and gets a stream of responses back; the bus sends heartbeats under the
//!   stream so a dead responder is noticed within the idle timeout, and a
//!   dropped [`ResponseStream`] tells the responder ([`Responder::cancelled`]).
//! - **prefill queue**: a work queue; a job is delivered to one consumer,
//!   acknowledged when done, and redelivered when its consumer dies (or does
//!   not ack or report progress within the ack wait).
//! - **KV events**: workers publish, routers subscribe (at most once).
//!
//! Two implementations of [`Bus`]: `NatsBus` (NATS + JetStream, what pods
//! use) and `MemoryBus` (in-process, for `xpyd-agent up`).

mod memory;
mod nats;

/// The payload type of every plane, re-exported so callers need no direct
/// `bytes` dependency.
pub use bytes::Bytes;
pub use memory::{MemoryBus, MemoryOptions};
pub use nats::{NatsBus, NatsOptions, subject_token};

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// Why a bus call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// Nobody serves the addressed instance (it is dead or not yet up).
    #[error("no responder for instance {0}")]
    NoResponders(String),
    /// Nothing (not even a heartbeat) arrived within the idle timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The requester went away; stop working on the request.
    #[error("request cancelled by the requester")]
    Cancelled,
    /// The responder dropped its [`Responder`] without calling `end`.
    #[error("responder went away before the end of the stream")]
    Abandoned,
    #[error("bus unreachable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

/// One request as the serving side sees it.
pub struct IncomingRequest {
    pub payload: Bytes,
    pub responder: Responder,
}

/// Implementation side of a [`Responder`].
pub trait ResponderSink: Send + 'static {
    fn send(&mut self, payload: Bytes) -> BoxFuture<'_, Result<(), BusError>>;
    /// Send the end-of-stream marker.
    fn end(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>>;
    /// Resolves when the requester dropped its stream (or died, as far as
    /// the bus can tell).
    fn cancelled(&self) -> BoxFuture<'static, ()>;
}

/// Sends one request's responses back to the requester, in order.
pub struct Responder(Box<dyn ResponderSink>);

impl Responder {
    pub fn new(sink: impl ResponderSink) -> Responder {
        Responder(Box::new(sink))
    }

    pub async fn send(&mut self, payload: Bytes) -> Result<(), BusError> {
        self.0.send(payload).await
    }

    /// The last call: the requester's stream ends cleanly after what was sent.
    pub async fn end(self) -> Result<(), BusError> {
        self.0.end().await
    }

    /// Resolves when the requester has gone away.
    pub fn cancelled(&self) -> BoxFuture<'static, ()> {
        self.0.cancelled()
    }
}

/// Requests addressed to one instance.
pub type RequestStream = BoxStream<'static, IncomingRequest>;

/// Responses to one request; ends after the responder's `end`. An error
/// item is the last one. Dropping it cancels the request.
pub type ResponseStream = BoxStream<'static, Result<Bytes, BusError>>;

/// Implementation side of a [`PrefillJob`].
pub trait JobControl: Send + 'static {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>>;
    /// Give the job back for redelivery (to any consumer) now.
    fn nak(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>>;
    /// Still working: extend the ack wait.
    fn progress(&self) -> BoxFuture<'_, Result<(), BusError>>;
}

/// One remote prefill taken from the queue. Dropping it without `ack` or
/// `nak` leaves it to be redelivered after the ack wait.
pub struct PrefillJob {
    pub payload: Bytes,
    /// 1 on first delivery, more on redeliveries.
    pub delivered: u64,
    control: Box<dyn JobControl>,
}

impl PrefillJob {
    pub fn new(payload: Bytes, delivered: u64, control: Box<dyn JobControl>) -> PrefillJob {
        PrefillJob {
            payload,
            delivered,
            control,
        }
    }

    pub async fn ack(self) -> Result<(), BusError> {
        self.control.ack().await
    }

    pub async fn nak(self) -> Result<(), BusError> {
        self.control.nak().await
    }

    pub async fn progress(&mut self) -> Result<(), BusError> {
        self.control.progress().await
    }
}

/// Jobs for one consumer, one at a time as it asks (pull): a busy worker
/// does not hoard jobs. Survives server restarts (errors are retried inside).
pub type PrefillJobs = BoxStream<'static, PrefillJob>;

/// KV event batches as `(publishing instance id, payload)`.
pub type KvEventStream = BoxStream<'static, (String, Bytes)>;

/// What every process needs from the bus. Object safe; shared as
/// `Arc<dyn Bus>`. Every call has a deadline.
pub trait Bus: Send + Sync + 'static {
    /// Start serving requests addressed to `instance_id`.
    fn serve(&self, instance_id: &str) -> BoxFuture<'_, Result<RequestStream, BusError>>;

    /// Send `payload` to `instance_id` and stream the responses back. Fails
    /// fast with `NoResponders` when nobody serves it; a stream that gets
    /// nothing (heartbeats included) for `idle_timeout` ends with `Timeout`.
    fn request(
        &self,
        instance_id: &str,
        payload: Bytes,
        idle_timeout: Duration,
    ) -> BoxFuture<'_, Result<ResponseStream, BusError>>;

    /// Put a job on prefill queue `queue` (returns once the queue holds it).
    /// A deployment has one queue per KV layout (the workers' layout
    /// fingerprint), so a job only reaches prefill workers that can write
    /// into its decode worker's blocks; `""` is the unnamed queue.
    fn enqueue_prefill(&self, queue: &str, payload: Bytes) -> BoxFuture<'_, Result<(), BusError>>;

    /// Jobs waiting on prefill queue `queue` (not yet taken).
    fn prefill_queue_depth(&self, queue: &str) -> BoxFuture<'_, Result<u64, BusError>>;

    /// Become a consumer of prefill queue `queue`.
    fn prefill_jobs(&self, queue: &str) -> BoxFuture<'_, Result<PrefillJobs, BusError>>;

    fn publish_kv_events(
        &self,
        instance_id: &str,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>>;

    fn kv_events(&self) -> BoxFuture<'_, Result<KvEventStream, BusError>>;
}
