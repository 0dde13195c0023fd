//! The frontend's Prometheus metrics (`xpyd_frontend_*`): latency histograms
//! (time to first token, inter-token, end to end), requests by model,
//! endpoint and status, and token counters.
//!
//! Two counters are taken as requests arrive rather than as they finish
//! (`xpyd_frontend_requests_received_total`,
//! `xpyd_frontend_prompt_tokens_received_total`): they measure demand, which
//! the operator's SLO planner sizes for; under backpressure the finished
//! counts lag behind it.
//!
//! They are registered in a registry the caller owns (never the global one)
//! and exposed by `GET /metrics`. Engine-side metrics live with the engine.

use std::time::Instant;

use crate::metrics::LATENCY_BUCKETS;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct FrontendMetrics {
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    requests: IntCounterVec,
    input_tokens: IntCounterVec,
    output_tokens: IntCounterVec,
    received: IntCounterVec,
    prompt_tokens_received: IntCounterVec,
}

impl FrontendMetrics {
    /// Create the metrics and register them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &["model"],
            )
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let metrics = FrontendMetrics {
            ttft: histogram(
                "xpyd_frontend_time_to_first_token_seconds",
                "Time from receiving a request to its first generated token.",
            )?,
            itl: histogram(
                "xpyd_frontend_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request.",
            )?,
            e2e: histogram(
                "xpyd_frontend_request_duration_seconds",
                "Time from receiving a request to its last token or error.",
            )?,
            requests: counter(
                "xpyd_frontend_requests_total",
                "Requests by model, endpoint and HTTP status.",
                &["model", "endpoint", "status"],
            )?,
            input_tokens: counter(
                "xpyd_frontend_input_tokens_total",
                "Prompt tokens of finished requests.",
                &["model"],
            )?,
            output_tokens: counter(
                "xpyd_frontend_output_tokens_total",
                "Generated tokens of finished requests.",
                &["model"],
            )?,
            received: counter(
                "xpyd_frontend_requests_received_total",
                "Requests for a served model, counted as they arrive (demand).",
                &["model"],
            )?,
            prompt_tokens_received: counter(
                "xpyd_frontend_prompt_tokens_received_total",
                "Prompt tokens of requests as they arrive, before any is served (demand).",
                &["model"],
            )?,
        };
        registry.register(Box::new(metrics.ttft.clone()))?;
        registry.register(Box::new(metrics.itl.clone()))?;
        registry.register(Box::new(metrics.e2e.clone()))?;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.input_tokens.clone()))?;
        registry.register(Box::new(metrics.output_tokens.clone()))?;
        registry.register(Box::new(metrics.received.clone()))?;
        registry.register(Box::new(metrics.prompt_tokens_received.clone()))?;
        Ok(metrics)
    }

    /// Count a request that ended before generation started. `model` is
    /// empty when the request named no served model (keeps labels bounded).
    pub fn rejected(&self, model: &str, endpoint: &str, status: u16) {
        self.requests
            .with_label_values(&[model, endpoint, &status.to_string()])
            .inc();
    }

    /// Count one arriving request of `prompt_tokens` and start timing it.
    pub fn timer(&self, model: &str, endpoint: &'static str, prompt_tokens: usize) -> RequestTimer {
        self.received.with_label_values(&[model]).inc();
        self.prompt_tokens_received
            .with_label_values(&[model])
            .inc_by(prompt_tokens as u64);
        RequestTimer {
            metrics: self.clone(),
            model: model.to_string(),
            endpoint,
            start: Instant::now(),
            last_token: None,
            itl: None,
            finished: false,
        }
    }
}

/// Latency bookkeeping of one request in flight.
#[derive(Debug)]
pub struct RequestTimer {
    metrics: FrontendMetrics,
    model: String,
    endpoint: &'static str,
    start: Instant,
    last_token: Option<Instant>,
    /// This request's model's inter-token histogram, looked up at its
    /// second token (a label lookup per token showed in the profile).
    itl: Option<prometheus::Histogram>,
    finished: bool,
}

impl RequestTimer {
    /// A token arrived.
    pub fn token(&mut self) {
        let now = Instant::now();
        let model = [self.model.as_str()];
        match self.last_token {
            None => self
                .metrics
                .ttft
                .with_label_values(&model)
                .observe((now - self.start).as_secs_f64()),
            Some(last) => self
                .itl
                .get_or_insert_with(|| self.metrics.itl.with_label_values(&model))
                .observe((now - last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    /// The request ended with HTTP `status` (for a stream: 200, or the
    /// status of the error sent in it) after these token counts.
    pub fn finish(&mut self, status: u16, prompt_tokens: usize, completion_tokens: usize) {
        if self.finished {
            return;
        }
        self.record_end(status);
        let model = [self.model.as_str()];
        self.metrics
            .input_tokens
            .with_label_values(&model)
            .inc_by(prompt_tokens as u64);
        self.metrics
            .output_tokens
            .with_label_values(&model)
            .inc_by(completion_tokens as u64);
    }

    fn record_end(&mut self, status: u16) {
        self.finished = true;
        self.metrics
            .e2e
            .with_label_values(&[self.model.as_str()])
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics
            .requests
            .with_label_values(&[&self.model, self.endpoint, &status.to_string()])
            .inc();
    }
}

impl Drop for RequestTimer {
    /// A request dropped unfinished is a client that went away: counted
    /// with status 499, as nginx spells it.
    fn drop(&mut self) {
        if !self.finished {
            self.record_end(CLIENT_CLOSED);
        }
    }
}

/// The status recorded for a request whose client disconnected.
pub const CLIENT_CLOSED: u16 = 499;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_is_counted_as_requests_arrive_before_they_finish() {
        let registry = Registry::new();
        let m = FrontendMetrics::register(&registry).unwrap();
        let _in_flight = m.timer("m", "chat", 120);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains("xpyd_frontend_requests_received_total{model=\"m\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("xpyd_frontend_prompt_tokens_received_total{model=\"m\"} 120"),
            "{text}"
        );
        // Nothing finished yet: the finish-side counters have no series.
        assert!(
            !text.contains("xpyd_frontend_input_tokens_total{"),
            "{text}"
        );
    }
}
