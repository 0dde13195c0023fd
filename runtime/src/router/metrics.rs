//! The router's Prometheus metrics (`xpyd_router_*`): decisions by
//! strategy and how long each took, prefix-hit and request blocks (hit
//! rate = hit / request), KV events ingested and lost, and each worker's
//! load as the router sees it.
//!
//! Registered in a registry the caller owns (never the global one). Series
//! labelled by `instance` are removed when the worker leaves, so a churning
//! deployment does not grow the exposition forever.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use xpyd_api::RouterStrategy;

/// Label value of a strategy in `xpyd_router_decisions_total`.
pub fn strategy_label(strategy: RouterStrategy) -> &'static str {
    match strategy {
        RouterStrategy::Kv => "kv",
        RouterStrategy::RoundRobin => "round_robin",
        RouterStrategy::Random => "random",
        RouterStrategy::Session => "session",
    }
}

#[derive(Debug, Clone)]
pub struct RouterMetrics {
    decisions: IntCounterVec,
    /// Resolved once: the select path does no label lookups.
    decisions_by_strategy: [IntCounter; 4],
    select_seconds: Histogram,
    prefix_hit_blocks: IntCounter,
    request_blocks: IntCounter,
    kv_events: IntCounter,
    kv_event_gaps: IntCounter,
    worker_active_blocks: IntGaugeVec,
    worker_waiting_requests: IntGaugeVec,
}

/// Buckets of `xpyd_router_select_seconds`: a decision takes microseconds
/// (`cargo bench --bench router`), far below the request latency buckets.
const SELECT_BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
];

/// The per-worker series of one worker.
#[derive(Debug, Clone)]
pub(crate) struct WorkerGauges {
    pub active_blocks: IntGauge,
    pub waiting_requests: IntGauge,
}

impl RouterMetrics {
    /// Create the metrics and register them in `registry`.
    pub fn register(registry: &Registry) -> Result<RouterMetrics, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "xpyd_router_decisions_total",
                "Routing decisions, by the strategy that made them.",
            ),
            &["strategy"],
        )?;
        let by = |s| decisions.with_label_values(&[strategy_label(s)]);
        let metrics = RouterMetrics {
            decisions_by_strategy: [
                by(RouterStrategy::Kv),
                by(RouterStrategy::RoundRobin),
                by(RouterStrategy::Random),
                by(RouterStrategy::Session),
            ],
            decisions: decisions.clone(),
            select_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "xpyd_router_select_seconds",
                    "Time one routing decision took (index lookup, worker scoring, load update).",
                )
                .buckets(SELECT_BUCKETS.to_vec()),
            )?,
            prefix_hit_blocks: IntCounter::new(
                "xpyd_router_prefix_hit_blocks_total",
                "Prompt blocks the chosen worker already held, as the router's index saw it.",
            )?,
            request_blocks: IntCounter::new(
                "xpyd_router_request_blocks_total",
                "Full prompt blocks of routed requests (prefix hit rate = hit blocks / request blocks).",
            )?,
            kv_events: IntCounter::new(
                "xpyd_router_kv_events_total",
                "KV events applied to the router's index.",
            )?,
            kv_event_gaps: IntCounter::new(
                "xpyd_router_kv_event_gaps_total",
                "Times a worker's KV events were lost and its index entries dropped.",
            )?,
            worker_active_blocks: IntGaugeVec::new(
                Opts::new(
                    "xpyd_router_worker_active_blocks",
                    "KV blocks in use on a worker: last reported plus routed since, minus finished since.",
                ),
                &["instance"],
            )?,
            worker_waiting_requests: IntGaugeVec::new(
                Opts::new(
                    "xpyd_router_worker_waiting_requests",
                    "Requests waiting on a worker: last reported plus routed since the report.",
                ),
                &["instance"],
            )?,
        };
        registry.register(Box::new(metrics.decisions.clone()))?;
        registry.register(Box::new(metrics.select_seconds.clone()))?;
        registry.register(Box::new(metrics.prefix_hit_blocks.clone()))?;
        registry.register(Box::new(metrics.request_blocks.clone()))?;
        registry.register(Box::new(metrics.kv_events.clone()))?;
        registry.register(Box::new(metrics.kv_event_gaps.clone()))?;
        registry.register(Box::new(metrics.worker_active_blocks.clone()))?;
        registry.register(Box::new(metrics.worker_waiting_requests.clone()))?;
        Ok(metrics)
    }

    pub(crate) fn decided(
        &self,
        strategy: RouterStrategy,
        request_blocks: u32,
        hit_blocks: u32,
        took: Duration,
    ) {
        self.select_seconds.observe(took.as_secs_f64());
        let i = match strategy {
            RouterStrategy::Kv => 0,
            RouterStrategy::RoundRobin => 1,
            RouterStrategy::Random => 2,
            RouterStrategy::Session => 3,
        };
        self.decisions_by_strategy[i].inc();
        self.request_blocks.inc_by(u64::from(request_blocks));
        self.prefix_hit_blocks.inc_by(u64::from(hit_blocks));
    }

    pub(crate) fn ingested(&self, events: usize, gap: bool) {
        self.kv_events.inc_by(events as u64);
        if gap {
            self.kv_event_gaps.inc();
        }
    }

    pub(crate) fn worker(&self, instance: &str) -> WorkerGauges {
        WorkerGauges {
            active_blocks: self.worker_active_blocks.with_label_values(&[instance]),
            waiting_requests: self.worker_waiting_requests.with_label_values(&[instance]),
        }
    }

    pub(crate) fn worker_left(&self, instance: &str) {
        let _ = self.worker_active_blocks.remove_label_values(&[instance]);
        let _ = self
            .worker_waiting_requests
            .remove_label_values(&[instance]);
    }
}
