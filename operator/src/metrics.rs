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
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Reconcile counters and durations.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles, by result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Failed reconciles, by error kind.
    pub errors: IntCounterVec,
    /// Reconcile duration in seconds.
    pub duration: HistogramVec,
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
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
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
}
