//! The frontend's choice of decode worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::Registry;
use xpyd_runtime::frontend::{GenerateRequest, WorkerPicker};

use crate::roles::Cluster;

struct RoundRobin(AtomicUsize);

impl WorkerPicker for RoundRobin {
    fn pick(&self, _request: &GenerateRequest, candidates: &[String]) -> Option<String> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        candidates.get(n % candidates.len().max(1)).cloned()
    }
}

/// The picker of a frontend serving `model`.
pub async fn start(
    _cluster: &Cluster,
    _model: &str,
    _registry: &Registry,
) -> anyhow::Result<Arc<dyn WorkerPicker>> {
    Ok(Arc::new(RoundRobin(AtomicUsize::new(0))))
}
