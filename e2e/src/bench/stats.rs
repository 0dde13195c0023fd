//! The benchmark's figures, defined as `vllm bench serve` defines them
//! (`calculate_metrics` in vLLM's `benchmarks/serve.py`), computed from the
//! per-request timings in [`RequestRecord`].
//!
//! - TTFT: from sending the request to the first streamed chunk that carries
//!   text.
//! - E2E latency: from sending the request to the last such chunk.
//! - TPOT: per successful request with more than one output token,
//!   `(e2e - ttft) / (output_tokens - 1)`; requests of one token have none.
//! - ITL: every gap between consecutive text chunks of every request, pooled.
//! - Percentiles: numpy's default (linear interpolation between closest
//!   ranks); the median is the 50th percentile. An empty set reads as 0, as
//!   `np.mean(x or 0)` does in vLLM.
//! - Throughputs: completed requests, output tokens, and input plus output
//!   tokens, each divided by the benchmark's duration.
//!
//! Failed requests are counted and listed by error, never folded into the
//! latency figures. Nothing here does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a request's output tokens were counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCountSource {
    /// `usage.completion_tokens` of the final streamed chunk
    /// (`stream_options.include_usage`).
    Usage,
    /// The server sent no usage: the number of text chunks.
    Chunks,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// No connection, or the connection broke.
    Connection,
    /// The server answered with a non-success HTTP status.
    Http,
    /// The stream carried an error object, ended early, or could not be read.
    Stream,
    /// The request did not finish within the request timeout.
    Timeout,
}

/// One request as the client saw it. Times are seconds; `start_s` counts
/// from the start of the benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: usize,
    /// For the shared-prefix workload: which session and which turn.
    pub session: Option<usize>,
    pub turn: Option<usize>,
    /// Prompt tokens as the client's tokenizer counts them.
    pub prompt_len: usize,
    /// The output length asked for (`max_tokens`).
    pub max_tokens: usize,
    pub start_s: f64,
    pub success: bool,
    pub failure: Option<FailureKind>,
    pub error: Option<String>,
    /// 0 when no text chunk arrived.
    pub ttft_s: f64,
    pub e2e_s: f64,
    /// Gaps between consecutive text chunks.
    pub itl_s: Vec<f64>,
    pub output_tokens: usize,
    pub output_tokens_source: TokenCountSource,
    /// `usage.prompt_tokens` as the server reported it.
    pub server_prompt_tokens: Option<usize>,
    /// `usage.prompt_tokens_details.cached_tokens`: prompt tokens the server
    /// found in its prefix cache.
    pub cached_tokens: Option<usize>,
}

impl RequestRecord {
    /// A record with no timings yet, for a request about to be sent.
    pub fn new(index: usize, prompt_len: usize, max_tokens: usize) -> Self {
        RequestRecord {
            index,
            session: None,
            turn: None,
            prompt_len,
            max_tokens,
            start_s: 0.0,
            success: false,
            failure: None,
            error: None,
            ttft_s: 0.0,
            e2e_s: 0.0,
            itl_s: Vec::new(),
            output_tokens: 0,
            output_tokens_source: TokenCountSource::Chunks,
            server_prompt_tokens: None,
            cached_tokens: None,
        }
    }
}

/// Mean, median, standard deviation and the chosen percentiles of one
/// latency, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub std_ms: f64,
    /// `(p, value)` for each percentile asked for, e.g. `(99.0, 123.4)`.
    pub percentiles_ms: Vec<(f64, f64)>,
}

impl Summary {
    /// Summarises `values` given in seconds.
    pub fn of_seconds(values: &[f64], percentiles: &[f64]) -> Self {
        let ms: Vec<f64> = values.iter().map(|v| v * 1000.0).collect();
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        Summary {
            mean_ms: mean(&ms),
            median_ms: percentile(&sorted, 50.0),
            std_ms: std_dev(&ms),
            percentiles_ms: percentiles
                .iter()
                .map(|&p| (p, percentile(&sorted, p)))
                .collect(),
        }
    }
}

/// The result table's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub completed: usize,
    pub failed: usize,
    /// Failures by kind and message, e.g. `("timeout", "no answer in 600 s") -> 2`.
    pub failures: BTreeMap<String, usize>,
    pub duration_s: f64,
    pub total_input: usize,
    pub total_output: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Summary,
    pub tpot: Summary,
    pub itl: Summary,
    pub e2el: Summary,
    /// Successful requests whose output length came from `usage` (the rest
    /// were counted in chunks).
    pub output_counted_by_usage: usize,
    /// Sum of `cached_tokens` over sum of server prompt tokens, over the
    /// successful requests that reported both; `None` when none did.
    pub prefix_cache_hit_ratio: Option<f64>,
}

impl Metrics {
    /// The figures of `records` over a benchmark that lasted `duration_s`.
    pub fn compute(records: &[RequestRecord], duration_s: f64, percentiles: &[f64]) -> Self {
        let mut completed = 0;
        let mut total_input = 0;
        let mut total_output = 0;
        let mut by_usage = 0;
        let (mut ttfts, mut tpots, mut itls, mut e2els) = (vec![], vec![], vec![], vec![]);
        let mut failures = BTreeMap::new();
        let (mut cached, mut prompted, mut reported) = (0usize, 0usize, false);
        for r in records {
            if !r.success {
                let kind = r.failure.map_or("unknown".to_string(), |k| {
                    serde_json::to_value(k)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                });
                let message = r.error.as_deref().unwrap_or("no message");
                *failures.entry(format!("{kind}: {message}")).or_insert(0) += 1;
                continue;
            }
            completed += 1;
            total_input += r.prompt_len;
            total_output += r.output_tokens;
            if r.output_tokens_source == TokenCountSource::Usage {
                by_usage += 1;
            }
            if r.output_tokens > 1 {
                tpots.push((r.e2e_s - r.ttft_s) / (r.output_tokens - 1) as f64);
            }
            itls.extend_from_slice(&r.itl_s);
            ttfts.push(r.ttft_s);
            e2els.push(r.e2e_s);
            if let (Some(c), Some(p)) = (r.cached_tokens, r.server_prompt_tokens) {
                cached += c;
                prompted += p;
                reported = true;
            }
        }
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        Metrics {
            completed,
            failed: records.len() - completed,
            failures,
            duration_s,
            total_input,
            total_output,
            request_throughput: per_s(completed as f64),
            output_throughput: per_s(total_output as f64),
            total_token_throughput: per_s((total_input + total_output) as f64),
            ttft: Summary::of_seconds(&ttfts, percentiles),
            tpot: Summary::of_seconds(&tpots, percentiles),
            itl: Summary::of_seconds(&itls, percentiles),
            e2el: Summary::of_seconds(&e2els, percentiles),
            output_counted_by_usage: by_usage,
            prefix_cache_hit_ratio: (reported && prompted > 0)
                .then(|| cached as f64 / prompted as f64),
        }
    }
}

/// numpy's default percentile (`method="linear"`) of ascending `sorted`
/// values; 0 for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// Arithmetic mean; 0 for an empty slice.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Population standard deviation (numpy's `np.std`); 0 for an empty slice.
pub fn std_dev(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let m = mean(values);
    (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / values.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn ok(index: usize, prompt: usize, ttft: f64, chunks: &[f64], tokens: usize) -> RequestRecord {
        // `chunks`: arrival times of the text chunks after the first.
        let mut r = RequestRecord::new(index, prompt, tokens);
        r.success = true;
        r.ttft_s = ttft;
        let mut last = ttft;
        for &t in chunks {
            r.itl_s.push(t - last);
            last = t;
        }
        r.e2e_s = last;
        r.output_tokens = tokens;
        r.output_tokens_source = TokenCountSource::Usage;
        r
    }

    #[test]
    fn percentiles_interpolate_linearly_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        // np.percentile(range(1, 11), [50, 99, 90, 0, 100])
        assert!(close(percentile(&v, 50.0), 5.5));
        assert!(close(percentile(&v, 99.0), 9.91));
        assert!(close(percentile(&v, 90.0), 9.1));
        assert!(close(percentile(&v, 0.0), 1.0));
        assert!(close(percentile(&v, 100.0), 10.0));
        assert!(close(percentile(&[3.0], 99.0), 3.0));
        assert_eq!(percentile(&[], 99.0), 0.0);
        // np.percentile([10, 20, 40], 75) = 20 + 0.5 * 20
        assert!(close(percentile(&[10.0, 20.0, 40.0], 75.0), 30.0));
        // np.std([2, 4, 4, 4, 5, 5, 7, 9]) = 2
        assert!(close(
            std_dev(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]),
            2.0
        ));
    }

    #[test]
    fn metrics_follow_vllm_definitions_on_fixed_timings() {
        let records = vec![
            // 4 tokens in 4 chunks: TTFT 0.1, e2e 0.4, TPOT (0.4-0.1)/3 = 0.1,
            // ITLs 0.1, 0.1, 0.1.
            ok(0, 100, 0.1, &[0.2, 0.3, 0.4], 4),
            // 3 tokens in 2 chunks (two tokens bundled): TTFT 0.2, e2e 0.8,
            // TPOT (0.8-0.2)/2 = 0.3, one ITL of 0.6.
            ok(1, 50, 0.2, &[0.8], 3),
            // 1 token: TTFT = e2e = 0.5, no TPOT, no ITL.
            ok(2, 10, 0.5, &[], 1),
            {
                let mut r = RequestRecord::new(3, 1000, 4);
                r.failure = Some(FailureKind::Timeout);
                r.error = Some("no answer within 1 s".into());
                r
            },
        ];
        let m = Metrics::compute(&records, 2.0, &[99.0]);
        assert_eq!(m.completed, 3);
        assert_eq!(m.failed, 1);
        assert_eq!(
            m.failures.get("timeout: no answer within 1 s").copied(),
            Some(1)
        );
        // The failed request's prompt is not counted as served input.
        assert_eq!(m.total_input, 160);
        assert_eq!(m.total_output, 8);
        assert!(close(m.request_throughput, 1.5));
        assert!(close(m.output_throughput, 4.0));
        assert!(close(m.total_token_throughput, 84.0));

        // TTFT over [0.1, 0.2, 0.5] s.
        assert!(close(m.ttft.mean_ms, 800.0 / 3.0));
        assert!(close(m.ttft.median_ms, 200.0));
        // p99: 200 + 0.98 * (500 - 200)
        assert!(close(m.ttft.percentiles_ms[0].1, 494.0));
        // TPOT over [0.1, 0.3] s: the 1-token request has none.
        assert!(close(m.tpot.mean_ms, 200.0));
        assert!(close(m.tpot.median_ms, 200.0));
        assert!(close(m.tpot.percentiles_ms[0].1, 298.0));
        // ITL pooled over [0.1, 0.1, 0.1, 0.6] s.
        assert!(close(m.itl.mean_ms, 225.0));
        assert!(close(m.itl.median_ms, 100.0));
        // p99: rank 2.97 between 100 and 600.
        assert!(close(m.itl.percentiles_ms[0].1, 585.0));
        // E2E over [0.4, 0.8, 0.5] s.
        assert!(close(m.e2el.median_ms, 500.0));
        assert_eq!(m.output_counted_by_usage, 3);
        assert_eq!(m.prefix_cache_hit_ratio, None);
    }

    #[test]
    fn prefix_hit_ratio_is_cached_over_prompt_tokens() {
        let mut a = ok(0, 100, 0.1, &[0.2], 2);
        a.server_prompt_tokens = Some(100);
        a.cached_tokens = Some(0);
        let mut b = ok(1, 100, 0.1, &[0.2], 2);
        b.server_prompt_tokens = Some(100);
        b.cached_tokens = Some(64);
        let m = Metrics::compute(&[a, b], 1.0, &[99.0]);
        assert!(close(m.prefix_cache_hit_ratio.unwrap(), 0.32));
    }

    #[test]
    fn no_successes_read_as_zero_not_nan() {
        let mut r = RequestRecord::new(0, 10, 4);
        r.failure = Some(FailureKind::Http);
        r.error = Some("HTTP 404".into());
        let m = Metrics::compute(&[r], 1.0, &[99.0]);
        assert_eq!(m.completed, 0);
        assert_eq!(m.ttft.mean_ms, 0.0);
        assert_eq!(m.tpot.percentiles_ms[0].1, 0.0);
        assert_eq!(m.request_throughput, 0.0);
    }
}
