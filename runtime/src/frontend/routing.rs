//! The KV-aware router as the frontend runs it: [`RouterFeeds`] keep a
//! [`Router`] in step with the deployment (decode workers from discovery,
//! strategy and weights from the settings, KV events and load from the
//! bus), and the router picks workers for [`ClusterBackend`] through
//! [`WorkerPicker`].
//!
//! [`ClusterBackend`]: super::ClusterBackend

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prometheus::Registry;
use tokio::task::JoinHandle;

use super::backend::GenerateRequest;
use super::cluster::WorkerPicker;
use crate::bus::Bus;
use crate::discovery::Discovery;
use crate::router::{RouteRequest, Router, RouterError, RouterMetrics};
use xpyd_api::kv::prefix_hashes;

impl WorkerPicker for Router {
    fn pick(&self, request: &GenerateRequest, candidates: &[String]) -> Option<String> {
        let hashes = prefix_hashes(&request.prompt_token_ids, self.block_size());
        let decision = self.select(&RouteRequest {
            request_id: &request.request_id,
            block_hashes: &hashes,
            session: request.session.as_deref(),
        });
        match decision {
            Ok(d) if candidates.contains(&d.instance_id) => Some(d.instance_id),
            // The router's choice already failed this request (or it does
            // not know the candidates yet): take the next candidate.
            Ok(_) | Err(RouterError::NoWorkers) => {
                self.finish(&request.request_id);
                candidates.first().cloned()
            }
            Err(e) => {
                tracing::warn!("routing failed: {e}");
                candidates.first().cloned()
            }
        }
    }

    fn finished(&self, request_id: &str) {
        self.finish(request_id);
    }
}

/// The tasks feeding a router; they stop when this is dropped.
pub struct RouterFeeds {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RouterFeeds {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A router for `model`'s decode workers (KV blocks of `block_size`
/// tokens), with its metrics in `registry`, and the tasks that feed it.
pub fn start_router(
    discovery: Arc<dyn Discovery>,
    bus: Arc<dyn Bus>,
    model: &str,
    block_size: usize,
    registry: &Registry,
) -> Result<(Arc<Router>, RouterFeeds), prometheus::Error> {
    let settings = discovery.settings().borrow().clone().unwrap_or_default();
    let router = Arc::new(
        Router::new(block_size, &settings).with_metrics(RouterMetrics::register(registry)?),
    );
    let mut tasks = Vec::new();

    let (r, mut instances, model) = (router.clone(), discovery.instances(), model.to_string());
    tasks.push(tokio::spawn(async move {
        loop {
            let snapshot = instances.borrow_and_update().clone();
            for record in snapshot.values() {
                if let Some(c) = record.capacity
                    && c.block_size as usize != r.block_size()
                {
                    tracing::warn!(
                        instance = %record.instance_id,
                        "decode worker has {}-token blocks, the router {}: prefix hits will not match",
                        c.block_size,
                        r.block_size()
                    );
                }
            }
            r.set_decode_instances(&snapshot, &model);
            if instances.changed().await.is_err() {
                return;
            }
        }
    }));

    let (r, mut settings) = (router.clone(), discovery.settings());
    tasks.push(tokio::spawn(async move {
        loop {
            if let Some(s) = settings.borrow_and_update().clone() {
                r.apply_settings(&s);
            }
            if settings.changed().await.is_err() {
                return;
            }
        }
    }));

    let r = router.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let mut events = match bus.kv_events().await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!("cannot subscribe to KV events: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some((instance, payload)) = events.next().await {
                if let Err(e) = r.ingest(&payload) {
                    // Usually a worker whose record we have not seen yet.
                    tracing::debug!(%instance, "KV event batch not applied: {e}");
                }
            }
            tracing::warn!("KV event subscription ended; re-subscribing");
        }
    }));
    Ok((router, RouterFeeds { tasks }))
}
