//! Metrics shared by all roles: the latency buckets every histogram uses and
//! the workers' metrics ([`WorkerMetrics`]: `xpyd_decode_*`, `xpyd_prefill_*`,
//! `xpyd_transfer_*`, `xpyd_engine_*`, `xpyd_discovery_*`).
//!
//! Everything is registered in a registry the process owns (never the global
//! one) and served at `/metrics`. Label values that are known up front are
//! created at registration, so a dashboard's `rate()` sees a zero series
//! rather than none. The frontend's and the router's own metrics live in
//! their rooms and register into the same registry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use crate::engine::runner::EngineStats;

/// Latency buckets in seconds, from 1 ms to 2 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Where a decode worker's prompt was prefilled (`refused`: nowhere, under
/// `router.onPrefillUnavailable: fail`).
pub const PREFILL_LOCATIONS: &[&str] = &["local", "remote", "refused"];
/// Why a decode worker prefilled locally although the prompt was long.
pub const FALLBACK_REASONS: &[&str] = &[
    "no_prefill_worker",
    "queue_full",
    "enqueue_failed",
    "timeout",
    "transfer_failed",
    "cancelled",
    "draining",
    // The claimant said it gave the job up (an engine or transfer error).
    "prefill_failed",
    // The claimant is gone (nobody serves its subject on the bus).
    "prefill_gone",
    // The claimant answered nothing for a while (stopped, cut off); the
    // blocks it may still write are fenced.
    "prefill_unresponsive",
    // Every prefill worker's path here is quarantined, or the job's claims
    // kept coming from quarantined ones.
    "path_quarantined",
];
/// Outcomes of a prefill worker's job.
pub const PREFILL_JOB_RESULTS: &[&str] = &[
    "ok",
    "expired",
    "refused",
    "failed",
    "handed_back",
    // The decode worker declined the claim (our path to it is
    // quarantined); the job went back to the queue.
    "declined",
];
/// Outcomes of a decode worker's probes of quarantined paths.
pub const PATH_PROBE_RESULTS: &[&str] = &["ok", "failed", "not_sent"];
/// Why a KV transfer failed.
pub const TRANSFER_FAILURE_REASONS: &[&str] = &["peer", "write", "deadline", "notification"];

/// The metrics of a prefill or decode worker.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    pub prefills: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub remote_prefill_seconds: Histogram,
    pub max_local_prefill_length: IntGauge,
    pub prefill_queue_depth: IntGauge,
    pub transfer_bytes: IntCounterVec,
    pub transfer_seconds: Histogram,
    pub transfer_failures: IntCounterVec,
    pub prefill_jobs: IntCounterVec,
    pub prefill_tokens: IntCounter,
    pub prefill_busy_seconds: Counter,
    pub prefill_jobs_in_progress: IntGauge,
    pub prefill_queue_wait_seconds: Histogram,
    pub kv_blocks: IntGauge,
    pub kv_blocks_free: IntGauge,
    pub kv_blocks_fenced: IntGauge,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub instances: IntGaugeVec,
    pub path_quarantined: IntGaugeVec,
    pub path_latency_seconds: GaugeVec,
    pub path_failures: IntCounterVec,
    pub path_quarantines: IntCounter,
    pub path_transport: IntGaugeVec,
    pub path_probes: IntCounterVec,
    pub prefill_requeues: IntCounter,
    /// Sets the gauges that show live state (engine, instances, jobs in
    /// progress) at every scrape; see [`WorkerMetrics::refresh_at_scrape`].
    refresh: RefreshSlot,
}

/// What a worker runs at every scrape to set its live gauges.
type Refresh = Box<dyn Fn(&WorkerMetrics) + Send + Sync>;

/// The worker's [`Refresh`], once it set one.
#[derive(Clone, Default)]
struct RefreshSlot(Arc<Mutex<Option<Refresh>>>);

impl std::fmt::Debug for RefreshSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshSlot")
    }
}

/// The live gauges of a [`WorkerMetrics`], registered as one collector
/// that runs the worker's [`Refresh`] before it reports them: a scrape
/// shows the engine's blocks and requests as they are at that moment, not
/// as a periodic refresh last saw them (a reservation made a few hundred
/// milliseconds before the scrape is in it).
struct LiveGauges(WorkerMetrics);

impl LiveGauges {
    fn members(&self) -> [&dyn Collector; 8] {
        let m = &self.0;
        [
            &m.kv_blocks,
            &m.kv_blocks_free,
            &m.kv_blocks_fenced,
            &m.running,
            &m.waiting,
            &m.instances,
            &m.prefill_jobs_in_progress,
            &m.prefill_busy_seconds,
        ]
    }
}

impl Collector for LiveGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.members().into_iter().flat_map(|m| m.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(refresh) = self
            .0
            .refresh
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            refresh(&self.0);
        }
        self.members()
            .into_iter()
            .flat_map(|m| m.collect())
            .collect()
    }
}

impl WorkerMetrics {
    /// Create the metrics and register them in `registry`. `worker` (a
    /// `worker` label on every series) tells apart several workers sharing
    /// one process and registry, as in `xpyd-agent up`.
    pub fn register(registry: &Registry, worker: Option<&str>) -> Result<Self, prometheus::Error> {
        let labels: HashMap<String, String> = worker
            .map(|w| HashMap::from([("worker".to_string(), w.to_string())]))
            .unwrap_or_default();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_labels(labels.clone());
        let counter = |name: &str, help: &str, label: &str, values: &[&str]| {
            let c = IntCounterVec::new(opts(name, help), &[label])?;
            for v in values {
                c.with_label_values(&[v]);
            }
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(opts(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        // Registered below, with the others [`LiveGauges`] refreshes.
        let live_gauge = |name: &str, help: &str| IntGauge::with_opts(opts(name, help));
        let histogram = |name: &str, help: &str| {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .const_labels(labels.clone())
                    .buckets(LATENCY_BUCKETS.to_vec()),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let instances = IntGaugeVec::new(
            opts(
                "xpyd_discovery_instances",
                "Live instances of the deployment by role, as this process sees them.",
            ),
            &["role"],
        )?;
        for role in ["frontend", "prefill", "decode"] {
            instances.with_label_values(&[role]);
        }
        let by_prefill = |name: &str, help: &str| {
            let g = IntGaugeVec::new(opts(name, help), &["prefill"])?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let path_latency_seconds = GaugeVec::new(
            opts(
                "xpyd_decode_path_latency_seconds",
                "Per prefill worker: time from its claim to the KV having landed, of its last \
                 remote prefill into this decode worker.",
            ),
            &["prefill"],
        )?;
        registry.register(Box::new(path_latency_seconds.clone()))?;
        let path_failures = IntCounterVec::new(
            opts(
                "xpyd_decode_path_failures_total",
                "Per prefill worker: its remote prefills into this decode worker that failed \
                 (given up, silent, or past the deadline), probes included.",
            ),
            &["prefill"],
        )?;
        registry.register(Box::new(path_failures.clone()))?;
        let metrics = WorkerMetrics {
            refresh: RefreshSlot::default(),
            path_quarantined: by_prefill(
                "xpyd_decode_path_quarantined",
                "Per prefill worker: 1 while its path to this decode worker is quarantined \
                 (its claims declined until a probe lands), else 0.",
            )?,
            path_latency_seconds,
            path_failures,
            path_transport: {
                let g = IntGaugeVec::new(
                    opts(
                        "xpyd_decode_path_transport",
                        "Per prefill worker: 1 for the transport UCX is inferred to move its KV \
                         into this decode worker over (shared_memory, rdma, tcp; none: no \
                         transport both allow reaches). Inferred from both agents' UCX_TLS, \
                         RDMA devices, kernel and namespaces, not read from UCX.",
                    ),
                    &["prefill", "transport"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            path_quarantines: {
                let c = IntCounter::with_opts(opts(
                    "xpyd_decode_path_quarantines_total",
                    "Times a prefill worker's path to this decode worker was quarantined \
                     (again, after a failed probe, included).",
                ))?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            prefill_requeues: {
                let c = IntCounter::with_opts(opts(
                    "xpyd_decode_prefill_requeues_total",
                    "Remote-prefill jobs a decode worker put on the queue again: unclaimed for 5 s \
                     while the queue was empty, so lost (a NATS restart, deliveries used up).",
                ))?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            path_probes: counter(
                "xpyd_decode_path_probes_total",
                "Probes of quarantined paths, by result.",
                "result",
                PATH_PROBE_RESULTS,
            )?,
            prefills: counter(
                "xpyd_decode_prefills_total",
                "Prompts a decode worker admitted, by where their KV was computed.",
                "location",
                PREFILL_LOCATIONS,
            )?,
            fallbacks: counter(
                "xpyd_decode_remote_prefill_fallbacks_total",
                "Long prompts prefilled locally instead of remotely, by reason.",
                "reason",
                FALLBACK_REASONS,
            )?,
            remote_prefill_seconds: histogram(
                "xpyd_decode_remote_prefill_seconds",
                "Time from enqueuing a remote prefill to its KV having landed.",
            )?,
            max_local_prefill_length: gauge(
                "xpyd_decode_max_local_prefill_length",
                "The remote-prefill threshold in force, in uncached prompt tokens.",
            )?,
            prefill_queue_depth: gauge(
                "xpyd_decode_prefill_queue_depth",
                "Jobs waiting on the prefill queue, as last seen by this decode worker.",
            )?,
            transfer_bytes: counter(
                "xpyd_transfer_bytes_total",
                "KV bytes moved by NIXL, by direction.",
                "direction",
                &["sent", "received"],
            )?,
            transfer_seconds: histogram(
                "xpyd_transfer_seconds",
                "Time of one KV write, from posting it to its completion.",
            )?,
            transfer_failures: counter(
                "xpyd_transfer_failures_total",
                "KV transfers that failed, by reason.",
                "reason",
                TRANSFER_FAILURE_REASONS,
            )?,
            prefill_jobs: counter(
                "xpyd_prefill_jobs_total",
                "Remote prefill jobs a prefill worker finished, by result.",
                "result",
                PREFILL_JOB_RESULTS,
            )?,
            prefill_tokens: {
                let c = IntCounter::with_opts(opts(
                    "xpyd_prefill_tokens_total",
                    "Prompt tokens a prefill worker computed for remote-prefill jobs (its own \
                     prefix-cache hits excluded).",
                ))?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            prefill_busy_seconds: Counter::with_opts(opts(
                "xpyd_prefill_busy_seconds_total",
                "Seconds a prefill worker had at least one job computing (tokens over busy \
                 seconds is its measured capacity).",
            ))?,
            prefill_jobs_in_progress: live_gauge(
                "xpyd_prefill_jobs_in_progress",
                "Remote-prefill jobs a prefill worker holds now (claimed, computing or writing).",
            )?,
            prefill_queue_wait_seconds: histogram(
                "xpyd_decode_prefill_queue_wait_seconds",
                "Time from enqueuing a remote prefill to its first claim by a prefill worker, \
                 on the decode worker's clock.",
            )?,
            kv_blocks: live_gauge("xpyd_engine_kv_blocks", "KV cache blocks of the engine.")?,
            kv_blocks_free: live_gauge(
                "xpyd_engine_kv_blocks_free",
                "KV cache blocks free for new work (including reusable cached ones).",
            )?,
            kv_blocks_fenced: live_gauge(
                "xpyd_engine_kv_blocks_fenced",
                "KV blocks held out of use because the writer of a given-up remote prefill \
                 may still write into them (released once it provably stopped).",
            )?,
            running: live_gauge(
                "xpyd_engine_running_requests",
                "Requests the engine is running.",
            )?,
            waiting: live_gauge(
                "xpyd_engine_waiting_requests",
                "Requests waiting for admission to the engine.",
            )?,
            instances,
        };
        registry.register(Box::new(LiveGauges(metrics.clone())))?;
        Ok(metrics)
    }

    /// Run `refresh` at every scrape, before the live gauges (engine blocks
    /// and requests, instances by role, prefill jobs in progress and busy
    /// seconds) are reported; it replaces the one set before. `refresh` is
    /// handed the metrics rather than holding them, so the registry does
    /// not keep the worker alive through a cycle.
    pub fn refresh_at_scrape(&self, refresh: impl Fn(&WorkerMetrics) + Send + Sync + 'static) {
        *self.refresh.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(refresh));
    }

    /// Show one path's health (see `worker::paths`).
    pub fn show_path(
        &self,
        path: &crate::worker::PathReport,
        transport: Option<crate::transfer::Transport>,
    ) {
        if let Some(transport) = transport {
            self.path_transport
                .with_label_values(&[path.prefill.as_str(), transport.as_str()])
                .set(1);
        }
        let prefill = [path.prefill.as_str()];
        self.path_quarantined
            .with_label_values(&prefill)
            .set(i64::from(path.quarantined));
        if let Some(latency) = path.last_latency {
            self.path_latency_seconds
                .with_label_values(&prefill)
                .set(latency.as_secs_f64());
        }
    }

    /// Drop the series of a prefill worker that left.
    pub fn forget_path(&self, prefill: &str) {
        let _ = self.path_quarantined.remove_label_values(&[prefill]);
        let _ = self.path_latency_seconds.remove_label_values(&[prefill]);
        let _ = self.path_failures.remove_label_values(&[prefill]);
        for transport in crate::transfer::Transport::ALL {
            let _ = self
                .path_transport
                .remove_label_values(&[prefill, transport.as_str()]);
        }
    }

    /// Refresh the engine gauges.
    pub fn observe_engine(&self, stats: &EngineStats) {
        self.kv_blocks.set(stats.total_blocks as i64);
        self.kv_blocks_free
            .set((stats.free_blocks + stats.cached_free_blocks) as i64);
        self.kv_blocks_fenced.set(stats.fenced_blocks as i64);
        self.running.set(stats.running as i64);
        self.waiting.set(stats.waiting as i64);
    }
}

/// Register `xpyd_engine_info{device=…}` (value 1): which engine a worker
/// runs, `cpu` or `sim` (simulated: its outputs are not model answers),
/// labelled with `worker` like [`WorkerMetrics`].
pub fn register_engine_info(
    registry: &Registry,
    worker: Option<&str>,
    device: &str,
) -> Result<IntGauge, prometheus::Error> {
    let mut labels = HashMap::from([("device".to_string(), device.to_string())]);
    if let Some(w) = worker {
        labels.insert("worker".to_string(), w.to_string());
    }
    let info = IntGauge::with_opts(
        Opts::new(
            "xpyd_engine_info",
            "Which engine this worker runs (device: cpu, or sim for a simulated engine); always 1.",
        )
        .const_labels(labels),
    )?;
    info.set(1);
    registry.register(Box::new(info.clone()))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn worker_metrics_are_exposed_with_their_label_values_before_any_use() {
        let registry = Registry::new();
        let m = WorkerMetrics::register(&registry, None).unwrap();
        m.prefills.with_label_values(&["remote"]).inc();
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("xpyd_decode_prefills_total{location=\"remote\"} 1"));
        assert!(text.contains("xpyd_decode_remote_prefill_fallbacks_total{reason=\"timeout\"} 0"));
        assert!(text.contains("xpyd_discovery_instances{role=\"prefill\"} 0"));
        // A second registration in the same registry is refused, not doubled,
        // unless it names another worker.
        assert!(WorkerMetrics::register(&registry, None).is_err());
        let shared = Registry::new();
        WorkerMetrics::register(&shared, Some("decode-0")).unwrap();
        let other = WorkerMetrics::register(&shared, Some("decode-1")).unwrap();
        other.prefills.with_label_values(&["remote"]).inc_by(2);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&shared.gather())
            .unwrap();
        assert!(
            text.contains("xpyd_decode_prefills_total{location=\"remote\",worker=\"decode-1\"} 2"),
            "{text}"
        );
        // Both workers' live gauges are there, each under its label.
        for worker in ["decode-0", "decode-1"] {
            assert!(
                text.contains(&format!(
                    "xpyd_engine_kv_blocks_free{{worker=\"{worker}\"}} 0"
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn a_scrape_shows_the_engine_as_it_is_at_that_moment() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let registry = Registry::new();
        let m = WorkerMetrics::register(&registry, None).unwrap();
        let free = Arc::new(AtomicUsize::new(160));
        m.refresh_at_scrape({
            let free = free.clone();
            move |metrics| {
                metrics.observe_engine(&EngineStats {
                    total_blocks: 160,
                    free_blocks: free.load(Ordering::SeqCst),
                    ..EngineStats::default()
                })
            }
        });
        let scrape = || {
            prometheus::TextEncoder::new()
                .encode_to_string(&registry.gather())
                .unwrap()
        };
        assert!(scrape().contains("xpyd_engine_kv_blocks_free 160"));
        // Blocks reserved since: the very next scrape shows them, with no
        // refresh in between.
        free.store(137, Ordering::SeqCst);
        let text = scrape();
        assert!(text.contains("xpyd_engine_kv_blocks_free 137"), "{text}");
        assert!(text.contains("xpyd_engine_kv_blocks 160"), "{text}");
    }
}
