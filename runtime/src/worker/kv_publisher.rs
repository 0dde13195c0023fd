//! Publishes a decode worker's KV events, with its load, on the bus for the
//! routers: events are batched as they come (one batch per wake-up, so a
//! burst costs one message) and a load-only batch goes out every second so
//! a router's view of an idle worker stays fresh.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

use crate::bus::Bus;
use crate::engine::runner::EngineHandle;
use xpyd_api::kv::KvEvent;
use xpyd_api::kv_events::{KvEventPublisher, WorkerLoad};

/// Most events in one batch.
const MAX_BATCH: usize = 1024;
/// Load reports of an idle worker.
const LOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of one publish.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Publish `events` of `engine` as `instance_id` until `stop` turns true or
/// the engine closes the channel.
pub async fn publish_kv_events(
    instance_id: String,
    engine: EngineHandle,
    bus: Arc<dyn Bus>,
    mut events: UnboundedReceiver<KvEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut publisher = KvEventPublisher::new(instance_id.clone());
    let mut tick = tokio::time::interval(LOAD_INTERVAL);
    let mut buffer = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            n = events.recv_many(&mut buffer, MAX_BATCH) => if n == 0 { return },
            _ = tick.tick() => {}
        }
        let batch = publisher.batch(
            std::mem::take(&mut buffer),
            WorkerLoad::from(&engine.stats()),
        );
        let sent = tokio::time::timeout(
            PUBLISH_TIMEOUT,
            bus.publish_kv_events(&instance_id, batch.encode().into()),
        )
        .await;
        // A lost batch shows as a sequence gap to the routers, which then
        // stop trusting this worker's index until it is cleared.
        if !matches!(sent, Ok(Ok(()))) {
            tracing::warn!(seq = batch.seq, ?sent, "publishing KV events failed");
        }
    }
}
