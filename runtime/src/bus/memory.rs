//! `MemoryBus`: the [`Bus`] inside one process, for `xpyd-agent up` and
//! unit tests of the workers.
//!
//! Same contract as `NatsBus`, on tokio channels. Differences that follow
//! from living in one process: a responder cannot die without dropping its
//! [`Responder`], so there are no heartbeats and no idle timeout (a dropped
//! responder is reported as `Abandoned` at once); a [`PrefillJob`] dropped
//! without `ack`/`nak` is redelivered at once instead of after the ack wait
//! (a job held without `ack` or `progress` for the ack wait is still
//! redelivered, as with NATS).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;

use super::{
    Bus, BusError, IncomingRequest, JobControl, KvEventStream, PrefillJob, PrefillJobs,
    RequestStream, Responder, ResponderSink, ResponseStream,
};
use crate::sync::lock;

/// How many KV event batches a slow subscriber may fall behind before it
/// misses some (KV events are at-most-once on NATS too).
const KV_EVENT_BUFFER: usize = 4096;

/// Settings of a [`MemoryBus`].
#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// A taken job with no `ack`/`nak`/`progress` for this long goes back on
    /// the queue.
    pub prefill_ack_wait: Duration,
    /// Deliveries of one job before it is dropped (as NATS `max_deliver`).
    pub prefill_max_deliver: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            prefill_ack_wait: Duration::from_secs(10),
            prefill_max_deliver: 5,
        }
    }
}

/// The in-process bus.
pub struct MemoryBus {
    servers: Mutex<HashMap<String, mpsc::UnboundedSender<IncomingRequest>>>,
    /// Prefill queues by name, made on first use.
    queues: Mutex<HashMap<String, Arc<JobQueue>>>,
    options: MemoryOptions,
    kv: broadcast::Sender<(String, Bytes)>,
}

impl MemoryBus {
    pub fn new() -> Arc<MemoryBus> {
        MemoryBus::with_options(MemoryOptions::default())
    }

    pub fn with_options(options: MemoryOptions) -> Arc<MemoryBus> {
        let (kv, _) = broadcast::channel(KV_EVENT_BUFFER);
        Arc::new(MemoryBus {
            servers: Mutex::new(HashMap::new()),
            queues: Mutex::default(),
            options,
            kv,
        })
    }

    /// Prefill queue `name`.
    fn queue(&self, name: &str) -> Arc<JobQueue> {
        lock(&self.queues)
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(JobQueue {
                    state: Mutex::new(QueueState::default()),
                    changed: Notify::new(),
                    options: self.options.clone(),
                })
            })
            .clone()
    }
}

// ------------------------------------------------------------ request plane

enum Frame {
    Data(Bytes),
    End,
    Abandoned,
}

struct MemoryResponder {
    tx: mpsc::UnboundedSender<Frame>,
    /// The requester holds the sender: dropping its stream drops it.
    cancel: watch::Receiver<()>,
    ended: bool,
}

impl MemoryResponder {
    fn is_cancelled(&self) -> bool {
        self.tx.is_closed() || self.cancel.has_changed().is_err()
    }
}

impl ResponderSink for MemoryResponder {
    fn send(&mut self, payload: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        let result = if self.is_cancelled() {
            Err(BusError::Cancelled)
        } else {
            self.tx
                .send(Frame::Data(payload))
                .map_err(|_| BusError::Cancelled)
        };
        futures::future::ready(result).boxed()
    }

    fn end(mut self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        self.ended = true;
        let result = self.tx.send(Frame::End).map_err(|_| BusError::Cancelled);
        futures::future::ready(result).boxed()
    }

    fn cancelled(&self) -> BoxFuture<'static, ()> {
        let mut cancel = self.cancel.clone();
        async move {
            // Only the sender's drop is ever signalled: `changed` errors then.
            while cancel.changed().await.is_ok() {}
        }
        .boxed()
    }
}

impl Drop for MemoryResponder {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.tx.send(Frame::Abandoned);
        }
    }
}

// ------------------------------------------------------------ prefill queue

#[derive(Default)]
struct QueueState {
    next_id: u64,
    /// Jobs not taken: (id, payload, deliveries so far).
    waiting: VecDeque<(u64, Bytes, u64)>,
    /// Jobs taken and not yet acked, by id.
    taken: HashMap<u64, Taken>,
}

struct Taken {
    payload: Bytes,
    delivered: u64,
    ack_deadline: Instant,
}

struct JobQueue {
    state: Mutex<QueueState>,
    /// Woken when a job becomes available.
    changed: Notify,
    options: MemoryOptions,
}

impl JobQueue {
    fn push(&self, payload: Bytes) {
        let mut s = lock(&self.state);
        let id = s.next_id;
        s.next_id += 1;
        s.waiting.push_back((id, payload, 0));
        drop(s);
        self.changed.notify_waiters();
    }

    /// Puts a taken job back at the front (it has waited longest), unless
    /// `delivery` is stale (the job already went to another consumer).
    fn give_back(&self, id: u64, delivery: Option<u64>) {
        let mut s = lock(&self.state);
        let current = s
            .taken
            .get(&id)
            .is_some_and(|t| delivery.is_none_or(|d| d == t.delivered));
        if !current {
            return;
        }
        if let Some(t) = s.taken.remove(&id) {
            if t.delivered < self.options.prefill_max_deliver {
                s.waiting.push_front((id, t.payload, t.delivered));
            } else {
                tracing::warn!(
                    job = id,
                    delivered = t.delivered,
                    "prefill job dropped after max deliveries"
                );
            }
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Requeues taken jobs whose ack wait ran out; returns the earliest
    /// deadline still pending.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let expired: Vec<u64> = {
            let s = lock(&self.state);
            s.taken
                .iter()
                .filter(|(_, t)| t.ack_deadline <= now)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in expired {
            self.give_back(id, None);
        }
        lock(&self.state)
            .taken
            .values()
            .map(|t| t.ack_deadline)
            .min()
    }

    fn try_take(self: &Arc<Self>) -> Option<PrefillJob> {
        let mut s = lock(&self.state);
        let (id, payload, delivered) = s.waiting.pop_front()?;
        let delivered = delivered + 1;
        s.taken.insert(
            id,
            Taken {
                payload: payload.clone(),
                delivered,
                ack_deadline: Instant::now() + self.options.prefill_ack_wait,
            },
        );
        Some(PrefillJob::new(
            payload,
            delivered,
            Box::new(MemoryJob {
                queue: self.clone(),
                id,
                delivery: delivered,
                settled: false,
            }),
        ))
    }

    async fn take(self: Arc<Self>) -> PrefillJob {
        loop {
            let notified = self.changed.notified();
            futures::pin_mut!(notified);
            // Register before checking so a push in between is not missed.
            notified.as_mut().enable();
            let next_deadline = self.expire(Instant::now());
            if let Some(job) = self.try_take() {
                return job;
            }
            match next_deadline {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
                None => notified.await,
            }
        }
    }
}

struct MemoryJob {
    queue: Arc<JobQueue>,
    id: u64,
    /// Which delivery of the job this is (its `delivered`).
    delivery: u64,
    settled: bool,
}

impl JobControl for MemoryJob {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        self.settled = true;
        let mut s = lock(&self.queue.state);
        // Even an ack after the ack wait ran out (the job may be waiting for,
        // or held by, another consumer) means the work is done: as with
        // NATS, the job leaves the queue.
        s.taken.remove(&self.id);
        s.waiting.retain(|(id, _, _)| *id != self.id);
        drop(s);
        futures::future::ready(Ok(())).boxed()
    }

    fn nak(mut self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        self.settled = true;
        self.queue.give_back(self.id, Some(self.delivery));
        futures::future::ready(Ok(())).boxed()
    }

    fn progress(&self) -> BoxFuture<'_, Result<(), BusError>> {
        let mut s = lock(&self.queue.state);
        if let Some(t) = s.taken.get_mut(&self.id)
            && t.delivered == self.delivery
        {
            t.ack_deadline = Instant::now() + self.queue.options.prefill_ack_wait;
        }
        futures::future::ready(Ok(())).boxed()
    }
}

impl Drop for MemoryJob {
    fn drop(&mut self) {
        if !self.settled {
            self.queue.give_back(self.id, Some(self.delivery));
        }
    }
}

// ------------------------------------------------------------ Bus

impl Bus for MemoryBus {
    fn serve(&self, instance_id: &str) -> BoxFuture<'_, Result<RequestStream, BusError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.servers).insert(instance_id.to_string(), tx);
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        futures::future::ready(Ok(stream.boxed())).boxed()
    }

    fn request(
        &self,
        instance_id: &str,
        payload: Bytes,
        _idle_timeout: Duration,
    ) -> BoxFuture<'_, Result<ResponseStream, BusError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (cancel_tx, cancel_rx) = watch::channel(());
        let incoming = IncomingRequest {
            payload,
            responder: Responder::new(MemoryResponder {
                tx,
                cancel: cancel_rx,
                ended: false,
            }),
        };
        let mut servers = lock(&self.servers);
        let result = match servers.get(instance_id) {
            Some(server) => match server.send(incoming) {
                Ok(()) => Ok(response_stream(rx, cancel_tx)),
                Err(_) => {
                    // Its RequestStream was dropped: nobody serves it now.
                    servers.remove(instance_id);
                    Err(BusError::NoResponders(instance_id.to_string()))
                }
            },
            None => Err(BusError::NoResponders(instance_id.to_string())),
        };
        futures::future::ready(result).boxed()
    }

    fn enqueue_prefill(&self, queue: &str, payload: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        self.queue(queue).push(payload);
        futures::future::ready(Ok(())).boxed()
    }

    fn prefill_queue_depth(&self, queue: &str) -> BoxFuture<'_, Result<u64, BusError>> {
        let queue = self.queue(queue);
        queue.expire(Instant::now());
        let depth = lock(&queue.state).waiting.len() as u64;
        futures::future::ready(Ok(depth)).boxed()
    }

    fn prefill_jobs(&self, queue: &str) -> BoxFuture<'_, Result<PrefillJobs, BusError>> {
        let queue = self.queue(queue);
        // Pull: a job is taken only when the consumer polls for the next.
        let jobs = futures::stream::unfold(queue, |queue| async move {
            let job = queue.clone().take().await;
            Some((job, queue))
        });
        futures::future::ready(Ok(jobs.boxed())).boxed()
    }

    fn publish_kv_events(
        &self,
        instance_id: &str,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        // No subscriber is not an error: events are at-most-once.
        let _ = self.kv.send((instance_id.to_string(), payload));
        futures::future::ready(Ok(())).boxed()
    }

    fn kv_events(&self) -> BoxFuture<'_, Result<KvEventStream, BusError>> {
        let rx = self.kv.subscribe();
        let events = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "KV event subscriber fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        futures::future::ready(Ok(events.boxed())).boxed()
    }
}

fn response_stream(
    rx: mpsc::UnboundedReceiver<Frame>,
    cancel: watch::Sender<()>,
) -> ResponseStream {
    // `cancel` rides in the state: dropping the stream drops it, which is
    // what the responder's `cancelled` waits for.
    futures::stream::unfold(Some((rx, cancel)), |state| async move {
        let (mut rx, cancel) = state?;
        match rx.recv().await {
            Some(Frame::Data(b)) => Some((Ok(b), Some((rx, cancel)))),
            Some(Frame::End) => None,
            Some(Frame::Abandoned) | None => Some((Err(BusError::Abandoned), None)),
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    const DEADLINE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn responses_arrive_in_order_then_end() {
        let bus = MemoryBus::new();
        let mut requests = bus.serve("d1").await.unwrap();
        let server = tokio::spawn(async move {
            let mut req = requests.next().await.unwrap();
            assert_eq!(req.payload, Bytes::from_static(b"hi"));
            for i in 0..10u8 {
                req.responder.send(Bytes::from(vec![i])).await.unwrap();
            }
            req.responder.end().await.unwrap();
        });
        let stream = bus
            .request("d1", Bytes::from_static(b"hi"), DEADLINE)
            .await
            .unwrap();
        let got: Vec<_> = timeout(DEADLINE, stream.collect::<Vec<_>>()).await.unwrap();
        let want: Vec<_> = (0..10u8).map(|i| Ok(Bytes::from(vec![i]))).collect();
        assert_eq!(got, want);
        timeout(DEADLINE, server).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn unknown_or_stopped_instance_has_no_responders() {
        let bus = MemoryBus::new();
        let err = bus.request("nope", Bytes::new(), DEADLINE).await.err();
        assert_eq!(err, Some(BusError::NoResponders("nope".into())));
        let requests = bus.serve("d1").await.unwrap();
        drop(requests);
        let err = bus.request("d1", Bytes::new(), DEADLINE).await.err();
        assert_eq!(err, Some(BusError::NoResponders("d1".into())));
    }

    #[tokio::test]
    async fn dropped_responder_is_abandoned() {
        let bus = MemoryBus::new();
        let mut requests = bus.serve("d1").await.unwrap();
        let mut stream = bus.request("d1", Bytes::new(), DEADLINE).await.unwrap();
        let mut req = requests.next().await.unwrap();
        req.responder.send(Bytes::from_static(b"a")).await.unwrap();
        drop(req);
        let first = timeout(DEADLINE, stream.next()).await.unwrap();
        assert_eq!(first, Some(Ok(Bytes::from_static(b"a"))));
        let second = timeout(DEADLINE, stream.next()).await.unwrap();
        assert_eq!(second, Some(Err(BusError::Abandoned)));
        assert_eq!(timeout(DEADLINE, stream.next()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn dropped_stream_cancels_the_responder() {
        let bus = MemoryBus::new();
        let mut requests = bus.serve("d1").await.unwrap();
        let stream = bus.request("d1", Bytes::new(), DEADLINE).await.unwrap();
        let mut req = requests.next().await.unwrap();
        let cancelled = req.responder.cancelled();
        drop(stream);
        timeout(DEADLINE, cancelled).await.unwrap();
        assert_eq!(
            req.responder.send(Bytes::new()).await,
            Err(BusError::Cancelled)
        );
    }

    #[tokio::test]
    async fn prefill_jobs_are_redelivered_on_drop_and_nak_and_counted() {
        let bus = MemoryBus::new();
        bus.enqueue_prefill("", Bytes::from_static(b"j1"))
            .await
            .unwrap();
        bus.enqueue_prefill("", Bytes::from_static(b"j2"))
            .await
            .unwrap();
        assert_eq!(bus.prefill_queue_depth("").await.unwrap(), 2);
        let mut jobs = bus.prefill_jobs("").await.unwrap();
        let j = timeout(DEADLINE, jobs.next()).await.unwrap().unwrap();
        assert_eq!(
            (j.payload.clone(), j.delivered),
            (Bytes::from_static(b"j1"), 1)
        );
        assert_eq!(bus.prefill_queue_depth("").await.unwrap(), 1);
        drop(j);
        let j = timeout(DEADLINE, jobs.next()).await.unwrap().unwrap();
        assert_eq!(
            (j.payload.clone(), j.delivered),
            (Bytes::from_static(b"j1"), 2)
        );
        j.nak().await.unwrap();
        let j = timeout(DEADLINE, jobs.next()).await.unwrap().unwrap();
        assert_eq!(
            (j.payload.clone(), j.delivered),
            (Bytes::from_static(b"j1"), 3)
        );
        j.ack().await.unwrap();
        let j = timeout(DEADLINE, jobs.next()).await.unwrap().unwrap();
        assert_eq!(
            (j.payload.clone(), j.delivered),
            (Bytes::from_static(b"j2"), 1)
        );
        j.ack().await.unwrap();
        assert_eq!(bus.prefill_queue_depth("").await.unwrap(), 0);
        // Nothing left: the next pull waits.
        assert!(
            timeout(Duration::from_millis(50), jobs.next())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_job_held_past_the_ack_wait_goes_to_another_consumer() {
        let bus = MemoryBus::with_options(MemoryOptions {
            prefill_ack_wait: Duration::from_millis(200),
            prefill_max_deliver: 5,
        });
        let mut a = bus.prefill_jobs("").await.unwrap();
        let mut b = bus.prefill_jobs("").await.unwrap();
        bus.enqueue_prefill("", Bytes::from_static(b"j"))
            .await
            .unwrap();
        let held = timeout(DEADLINE, a.next()).await.unwrap().unwrap();
        let again = timeout(DEADLINE, b.next()).await.unwrap().unwrap();
        assert_eq!(again.delivered, 2);
        again.ack().await.unwrap();
        drop(held);
        assert_eq!(bus.prefill_queue_depth("").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn kv_events_reach_every_subscriber_with_the_publisher() {
        let bus = MemoryBus::new();
        let mut sub = bus.kv_events().await.unwrap();
        bus.publish_kv_events("p1", Bytes::from_static(b"x"))
            .await
            .unwrap();
        bus.publish_kv_events("d1", Bytes::from_static(b"y"))
            .await
            .unwrap();
        let got = timeout(DEADLINE, (&mut sub).take(2).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![
                ("p1".to_string(), Bytes::from_static(b"x")),
                ("d1".to_string(), Bytes::from_static(b"y")),
            ]
        );
    }
}
