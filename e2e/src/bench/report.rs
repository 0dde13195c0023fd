//! What a run shows and saves: the result table in `vllm bench serve`'s
//! layout (same labels, same `=`/`-` banners, same number formats), the
//! failures by kind and message beneath it, and the JSON export that keeps
//! every request's timings for later plots.

use std::fmt::Write as _;

use serde::Serialize;

use super::stats::{Metrics, RequestRecord, Summary};

/// Which latencies the table shows (vLLM's `--percentile-metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyMetric {
    Ttft,
    Tpot,
    Itl,
    E2el,
}

/// Labels of the table header.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableContext {
    pub max_concurrency: Option<usize>,
    pub request_rate: f64,
    pub warmup_requests: usize,
    pub warmup_failed: usize,
}

/// The result table, as `vllm bench serve` prints it, plus its failure list.
pub fn table(metrics: &Metrics, context: &TableContext, shown: &[LatencyMetric]) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: String| {
        let _ = writeln!(out, "{label:<40} {value:<10}");
    };
    let _ = writeln!(out, "{:=^50}", " Serving Benchmark Result ");
    line(
        &mut out,
        "Successful requests:",
        metrics.completed.to_string(),
    );
    line(&mut out, "Failed requests:", metrics.failed.to_string());
    if let Some(c) = context.max_concurrency {
        line(&mut out, "Maximum request concurrency:", c.to_string());
    }
    if context.request_rate.is_finite() {
        line(
            &mut out,
            "Request rate configured (RPS):",
            format!("{:.2}", context.request_rate),
        );
    }
    line(
        &mut out,
        "Benchmark duration (s):",
        format!("{:.2}", metrics.duration_s),
    );
    line(
        &mut out,
        "Total input tokens:",
        metrics.total_input.to_string(),
    );
    line(
        &mut out,
        "Total generated tokens:",
        metrics.total_output.to_string(),
    );
    line(
        &mut out,
        "Request throughput (req/s):",
        format!("{:.2}", metrics.request_throughput),
    );
    line(
        &mut out,
        "Output token throughput (tok/s):",
        format!("{:.2}", metrics.output_throughput),
    );
    line(
        &mut out,
        "Total Token throughput (tok/s):",
        format!("{:.2}", metrics.total_token_throughput),
    );
    if let Some(ratio) = metrics.prefix_cache_hit_ratio {
        line(
            &mut out,
            "Prefix cache hit rate (%):",
            format!("{:.2}", ratio * 100.0),
        );
    }
    for metric in shown {
        let (title, name, summary) = match metric {
            LatencyMetric::Ttft => ("Time to First Token", "TTFT", &metrics.ttft),
            LatencyMetric::Tpot => (
                "Time per Output Token (excl. 1st token)",
                "TPOT",
                &metrics.tpot,
            ),
            LatencyMetric::Itl => ("Inter-token Latency", "ITL", &metrics.itl),
            LatencyMetric::E2el => ("End-to-end Latency", "E2EL", &metrics.e2el),
        };
        section(&mut out, title, name, summary);
    }
    let _ = writeln!(out, "{}", "=".repeat(50));
    if context.warmup_requests > 0 {
        let _ = writeln!(
            out,
            "Warm-up (not counted above): {} requests, {} failed",
            context.warmup_requests, context.warmup_failed
        );
    }
    if !metrics.failures.is_empty() {
        let _ = writeln!(out, "Failures:");
        for (what, count) in &metrics.failures {
            let _ = writeln!(out, "  {count:>6} x {what}");
        }
    }
    if metrics.completed > metrics.output_counted_by_usage {
        let _ = writeln!(
            out,
            "Output tokens of {} requests were counted in stream chunks (the server sent no usage).",
            metrics.completed - metrics.output_counted_by_usage
        );
    }
    out
}

fn section(out: &mut String, title: &str, name: &str, s: &Summary) {
    let _ = writeln!(out, "{title:-^50}");
    let _ = writeln!(
        out,
        "{:<40} {:<10.2}",
        format!("Mean {name} (ms):"),
        s.mean_ms
    );
    let _ = writeln!(
        out,
        "{:<40} {:<10.2}",
        format!("Median {name} (ms):"),
        s.median_ms
    );
    for (p, value) in &s.percentiles_ms {
        let word = if p.fract() == 0.0 {
            format!("{p:.0}")
        } else {
            format!("{p}")
        };
        let _ = writeln!(
            out,
            "{:<40} {:<10.2}",
            format!("P{word} {name} (ms):"),
            value
        );
    }
}

/// The JSON export: what was run, the figures, and every request.
#[derive(Debug, Serialize)]
pub struct Export<'a, C: Serialize> {
    /// The run's settings (the command line, parsed).
    pub config: &'a C,
    /// The model the requests named (asked from the server if not given).
    pub model: &'a str,
    pub date: String,
    pub metrics: &'a Metrics,
    pub warmup: &'a [RequestRecord],
    pub requests: &'a [RequestRecord],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{RequestRecord, TokenCountSource};

    #[test]
    fn table_has_vllm_labels_and_banners() {
        let mut r = RequestRecord::new(0, 1000, 3);
        r.success = true;
        r.ttft_s = 0.25;
        r.itl_s = vec![0.05, 0.05];
        r.e2e_s = 0.35;
        r.output_tokens = 3;
        r.output_tokens_source = TokenCountSource::Usage;
        let m = Metrics::compute(&[r], 0.5, &[99.0]);
        let t = table(
            &m,
            &TableContext {
                max_concurrency: Some(4),
                request_rate: f64::INFINITY,
                ..Default::default()
            },
            &[LatencyMetric::Ttft, LatencyMetric::Tpot, LatencyMetric::Itl],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "============ Serving Benchmark Result ============"
        );
        assert_eq!(
            lines[1],
            format!("{:<40} {:<10}", "Successful requests:", 1)
        );
        assert!(t.contains(&format!("{:<40} {:<10}", "Benchmark duration (s):", "0.50")));
        assert!(t.contains(&format!(
            "{:<40} {:<10}",
            "Request throughput (req/s):", "2.00"
        )));
        assert!(t.contains("---------------Time to First Token----------------\n"));
        assert!(t.contains("-----Time per Output Token (excl. 1st token)------\n"));
        assert!(t.contains("---------------Inter-token Latency----------------\n"));
        assert!(t.contains(&format!("{:<40} {:<10}", "Mean TTFT (ms):", "250.00")));
        assert!(t.contains(&format!("{:<40} {:<10}", "P99 TPOT (ms):", "50.00")));
        assert!(t.contains(&"=".repeat(50)));
        assert!(!t.contains("Failures:"));
    }
}
