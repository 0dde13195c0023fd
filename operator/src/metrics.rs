//! The operator's Prometheus metrics and its small HTTP server
//! (`/metrics`, `/healthz`, `/readyz`).
//!
//! Not for the agents' metrics: those are the runtime's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::crd::AutoscalingStatus;

/// The `signal` label values of `xpyd_operator_planner_signal`.
pub const PLANNER_SIGNALS: &[&str] = &[
    "requests_per_second",
    "prefill_tokens_per_second",
    "output_tokens_per_request",
    "kv_use",
    "prefill_queue_depth",
    "ttft_p90_ms",
    "itl_p90_ms",
    "prefill_pending",
    "decode_pending",
    "prefill_lead_seconds",
];

/// Reconcile counters and durations, and the SLO planner's inputs and
/// outputs per `DisaggDeployment`.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles, by result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Failed reconciles, by error kind.
    pub errors: IntCounterVec,
    /// Reconcile duration in seconds.
    pub duration: HistogramVec,
    /// The planner's replica counts, by deployment, role and `kind`
    /// (`desired`: what it decided, `current`: the spec when it decided).
    pub planner_replicas: GaugeVec,
    /// The planner's `maxLocalPrefillLength`, by deployment and `kind`.
    pub planner_threshold: GaugeVec,
    /// The signals of the planner's last window, by deployment and name.
    pub planner_signals: GaugeVec,
    /// The planner's decisions, by reason.
    pub planner_decisions: IntCounterVec,
    /// Failed scrapes of the agents' `/metrics`, by role.
    pub planner_scrape_failures: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in their own registry.
    #[allow(
        clippy::expect_used,
        reason = "constant, distinct metric definitions in a fresh registry"
    )]
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("xpyd_operator_reconciles_total", "Reconciles by result"),
            &["result"],
        )
        .expect("valid metric definition");
        let errors = IntCounterVec::new(
            Opts::new(
                "xpyd_operator_reconcile_errors_total",
                "Failed reconciles by error kind",
            ),
            &["kind"],
        )
        .expect("valid metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "xpyd_operator_reconcile_duration_seconds",
                "Time one reconcile took",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &[],
        )
        .expect("valid metric definition");
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
        };
        let planner_replicas = gauge(
            "xpyd_operator_planner_replicas",
            "SLO planner replica counts: desired (decided) and current (spec when deciding)",
            &["namespace", "name", "role", "kind"],
        );
        let planner_threshold = gauge(
            "xpyd_operator_planner_max_local_prefill_length",
            "SLO planner maxLocalPrefillLength: desired and current",
            &["namespace", "name", "kind"],
        );
        let planner_signals = gauge(
            "xpyd_operator_planner_signal",
            "Signals of the SLO planner's last window (rates per second, latencies in ms)",
            &["namespace", "name", "signal"],
        );
        let planner_decisions = IntCounterVec::new(
            Opts::new(
                "xpyd_operator_planner_decisions_total",
                "SLO planner decisions by reason",
            ),
            &["reason"],
        )
        .expect("valid metric definition");
        let planner_scrape_failures = IntCounterVec::new(
            Opts::new(
                "xpyd_operator_planner_scrape_failures_total",
                "Scrapes of the agents' /metrics that failed or timed out, by role",
            ),
            &["role"],
        )
        .expect("valid metric definition");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(planner_replicas.clone()),
            Box::new(planner_threshold.clone()),
            Box::new(planner_signals.clone()),
            Box::new(planner_decisions.clone()),
            Box::new(planner_scrape_failures.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            planner_replicas,
            planner_threshold,
            planner_signals,
            planner_decisions,
            planner_scrape_failures,
        }
    }

    /// Records one planner decision of the deployment `namespace/name`.
    pub fn observe_planner(&self, namespace: &str, name: &str, status: &AutoscalingStatus) {
        for (kind, counts) in [("desired", &status.desired), ("current", &status.current)] {
            for (role, n) in [
                ("prefill", counts.num_prefill),
                ("decode", counts.num_decode),
            ] {
                self.planner_replicas
                    .with_label_values(&[namespace, name, role, kind])
                    .set(f64::from(n));
            }
            self.planner_threshold
                .with_label_values(&[namespace, name, kind])
                .set(f64::from(counts.max_local_prefill_length));
        }
        let s = &status.signals;
        let values = [
            ("requests_per_second", Some(s.requests_per_second)),
            (
                "prefill_tokens_per_second",
                Some(s.prefill_tokens_per_second),
            ),
            (
                "output_tokens_per_request",
                Some(s.output_tokens_per_request),
            ),
            ("kv_use", Some(s.kv_use)),
            ("prefill_queue_depth", Some(s.prefill_queue_depth)),
            ("ttft_p90_ms", s.ttft_p90_ms),
            ("itl_p90_ms", s.itl_p90_ms),
            ("prefill_pending", Some(f64::from(s.prefill_pending))),
            ("decode_pending", Some(f64::from(s.decode_pending))),
            ("prefill_lead_seconds", s.prefill_lead_seconds),
        ];
        debug_assert!(
            values
                .iter()
                .map(|v| v.0)
                .eq(PLANNER_SIGNALS.iter().copied())
        );
        for (signal, value) in values {
            let gauge = self
                .planner_signals
                .with_label_values(&[namespace, name, signal]);
            // No latency observed in the window: NaN, which graphs show as
            // a gap rather than a fake 0 ms.
            gauge.set(value.unwrap_or(f64::NAN));
        }
        self.planner_decisions
            .with_label_values(&[status.reason.as_str()])
            .inc();
    }

    /// Forgets the planner series of a deployment that stopped autoscaling
    /// or is gone.
    pub fn forget_planner(&self, namespace: &str, name: &str) {
        // Absent series are fine to remove: the errors say only that.
        for kind in ["desired", "current"] {
            for role in ["prefill", "decode"] {
                let _ = self
                    .planner_replicas
                    .remove_label_values(&[namespace, name, role, kind]);
            }
            let _ = self
                .planner_threshold
                .remove_label_values(&[namespace, name, kind]);
        }
        for signal in PLANNER_SIGNALS {
            let _ = self
                .planner_signals
                .remove_label_values(&[namespace, name, signal]);
        }
    }

    /// Records one reconcile.
    pub fn observe(&self, elapsed: Duration, error_kind: Option<&str>) {
        self.duration
            .with_label_values::<&str>(&[])
            .observe(elapsed.as_secs_f64());
        match error_kind {
            None => self.reconciles.with_label_values(&["ok"]).inc(),
            Some(kind) => {
                self.reconciles.with_label_values(&["error"]).inc();
                self.errors.with_label_values(&[kind]).inc();
            }
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which
        // the constructors above rule out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Shared state of the HTTP server.
#[derive(Clone, Debug)]
pub struct Health {
    /// Metrics to expose.
    pub metrics: Metrics,
    /// Set once the controller is running (leader or not, the process is
    /// ready to take over).
    pub ready: Arc<AtomicBool>,
}

async fn metrics_handler(State(h): State<Health>) -> String {
    h.metrics.render()
}

async fn readyz(State(h): State<Health>) -> (StatusCode, &'static str) {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// The router of `/metrics`, `/healthz` and `/readyz`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// Serves [`router`] on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_reconciles_show_in_the_exposition() {
        let m = Metrics::new();
        m.observe(Duration::from_millis(3), None);
        m.observe(Duration::from_millis(3), Some("etcd"));
        let text = m.render();
        assert!(
            text.contains("xpyd_operator_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("xpyd_operator_reconcile_errors_total{kind=\"etcd\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("xpyd_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
    }

    #[test]
    fn a_planner_decision_shows_its_inputs_and_outputs_until_forgotten() {
        use crate::crd::{PlannedCounts, PlannerSignals};
        let m = Metrics::new();
        let status = AutoscalingStatus {
            desired: PlannedCounts {
                num_prefill: 3,
                num_decode: 2,
                max_local_prefill_length: 512,
            },
            current: PlannedCounts {
                num_prefill: 1,
                num_decode: 2,
                max_local_prefill_length: 512,
            },
            reason: "ScaleUp".into(),
            signals: PlannerSignals {
                prefill_tokens_per_second: 2500.0,
                ttft_p90_ms: Some(900.0),
                ..PlannerSignals::default()
            },
            ..AutoscalingStatus::default()
        };
        m.observe_planner("ns", "llama", &status);
        let text = m.render();
        for want in [
            r#"xpyd_operator_planner_replicas{kind="desired",name="llama",namespace="ns",role="prefill"} 3"#,
            r#"xpyd_operator_planner_replicas{kind="current",name="llama",namespace="ns",role="prefill"} 1"#,
            r#"xpyd_operator_planner_signal{name="llama",namespace="ns",signal="prefill_tokens_per_second"} 2500"#,
            r#"xpyd_operator_planner_signal{name="llama",namespace="ns",signal="itl_p90_ms"} NaN"#,
            r#"xpyd_operator_planner_decisions_total{reason="ScaleUp"} 1"#,
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        m.forget_planner("ns", "llama");
        assert!(!m.render().contains("name=\"llama\""));
    }
}
