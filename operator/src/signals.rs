//! The SLO planner's signals from the agents' own `/metrics`: a parser of
//! the Prometheus text exposition, and the window math that turns two
//! scrapes of a deployment's pods into [`planner::Signals`] (counter rates,
//! histogram quantiles as Prometheus' `histogram_quantile` computes them,
//! KV use, queue depth) and each worker's in-flight work for the
//! pod-deletion cost.
//!
//! Pure: no I/O and no clock. The scraping itself (HTTP with a deadline)
//! lives in [`crate::autoscaler`]. Where each signal comes from is listed
//! on [`WindowFigures`].

use std::collections::BTreeMap;
use std::time::Duration;

use crate::planner::{self, Replicas};
use crate::resources::Role;

/// Why an exposition could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// A sample line that is not `name{labels} value [timestamp]`.
    #[error("line {line}: {what}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        what: &'static str,
    },
}

/// One sample: a series and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    samples: Vec<Sample>,
}

/// Parses the Prometheus text format (version 0.0.4): comments and blank
/// lines are skipped, label values may hold escaped quotes, backslashes and
/// newlines, a trailing timestamp is ignored.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |what| ParseError::Line { line: i + 1, what };
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or(err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() {
            return Err(err("no metric name"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(after) = rest.strip_prefix('{') {
            let (parsed, tail) = parse_labels(after).ok_or(err("bad labels"))?;
            labels = parsed;
            rest = tail;
        }
        let value = rest.split_whitespace().next().ok_or(err("no value"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|_| err("value is not a number"))?,
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(Exposition { samples })
}

/// Labels up to and including the closing `}`; the rest of the line.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        let mut chars = s[eq + 1..].trim_start().char_indices();
        if chars.next()?.1 != '"' {
            return None;
        }
        let body = s[eq + 1..].trim_start();
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (at, c) in body.char_indices().skip(1) {
            match (escaped, c) {
                (true, 'n') => {
                    value.push('\n');
                    escaped = false;
                }
                (true, c) => {
                    value.push(c);
                    escaped = false;
                }
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(at);
                    break;
                }
                (false, c) => value.push(c),
            }
        }
        let end = end?;
        labels.insert(key, value);
        s = body[end + 1..].trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

impl Exposition {
    /// The sum of every series of `name` whose labels include `label`
    /// (all of them when `None`); `None` when there is no such series.
    pub fn sum(&self, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            if label.is_some_and(|(k, v)| s.labels.get(k).map(String::as_str) != Some(v)) {
                continue;
            }
            *found.get_or_insert(0.0) += s.value;
        }
        found
    }

    /// The values label `label` takes in the series of `name`.
    pub fn label_values(&self, name: &str, label: &str) -> std::collections::BTreeSet<String> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }

    /// Cumulative bucket counts of histogram `name`, summed by `le`.
    fn buckets(&self, name: &str) -> BTreeMap<Le, f64> {
        let bucket = format!("{name}_bucket");
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == bucket) {
            if let Some(le) = s.labels.get("le").and_then(|l| Le::parse(l)) {
                *out.entry(le).or_insert(0.0) += s.value;
            }
        }
        out
    }
}

/// A bucket's upper bound, ordered (`+Inf` last).
#[derive(Debug, Clone, Copy)]
struct Le(f64);

impl PartialEq for Le {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Le {}

impl PartialOrd for Le {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Le {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Le {
    fn parse(s: &str) -> Option<Le> {
        match s {
            "+Inf" => Some(Le(f64::INFINITY)),
            s => s.parse().ok().map(Le),
        }
    }
}

/// The `q` quantile of a cumulative histogram (bounds ascending, `+Inf`
/// last), interpolated linearly inside the bucket it falls in, as
/// Prometheus' `histogram_quantile` does. `None` when it holds nothing.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // In the open bucket: the largest finite bound.
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(lower.0 + (le - lower.0) * (rank - lower.1) / in_bucket);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// One pod's scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct PodScrape {
    pub pod: String,
    pub role: Role,
    pub metrics: Exposition,
}

/// The agents' metric names the planner reads (the runtime's contract).
pub mod names {
    pub const REQUESTS_RECEIVED: &str = "xpyd_frontend_requests_received_total";
    pub const PROMPT_TOKENS_RECEIVED: &str = "xpyd_frontend_prompt_tokens_received_total";
    pub const REQUESTS_FINISHED: &str = "xpyd_frontend_requests_total";
    pub const OUTPUT_TOKENS: &str = "xpyd_frontend_output_tokens_total";
    pub const TTFT: &str = "xpyd_frontend_time_to_first_token_seconds";
    pub const ITL: &str = "xpyd_frontend_inter_token_latency_seconds";
    pub const PREFILLS: &str = "xpyd_decode_prefills_total";
    pub const FALLBACKS: &str = "xpyd_decode_remote_prefill_fallbacks_total";
    pub const PATH_QUARANTINED: &str = "xpyd_decode_path_quarantined";
    pub const PATH_QUARANTINES: &str = "xpyd_decode_path_quarantines_total";
    pub const PATH_TRANSPORT: &str = "xpyd_decode_path_transport";
    pub const QUEUE_DEPTH: &str = "xpyd_decode_prefill_queue_depth";
    pub const KV_BLOCKS: &str = "xpyd_engine_kv_blocks";
    pub const KV_BLOCKS_FREE: &str = "xpyd_engine_kv_blocks_free";
    pub const PREFILL_TOKENS: &str = "xpyd_prefill_tokens_total";
    pub const PREFILL_BUSY: &str = "xpyd_prefill_busy_seconds_total";
    pub const PREFILL_JOBS_IN_PROGRESS: &str = "xpyd_prefill_jobs_in_progress";
    pub const RUNNING: &str = "xpyd_engine_running_requests";
    pub const WAITING: &str = "xpyd_engine_waiting_requests";
}

/// What one window of scrapes says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowFigures {
    /// Rate of the frontends' `xpyd_frontend_requests_received_total`
    /// (counted as requests arrive).
    pub requests_per_s: f64,
    /// Rate of `xpyd_frontend_prompt_tokens_received_total` times
    /// [`Self::remote_share`]: prompt tokens meant for the prefill workers.
    pub prefill_tokens_per_s: f64,
    /// Share of the decode workers' admitted prompts that went, or wanted
    /// to go, to a prefill worker: (`remote` + fallbacks) over all of
    /// `xpyd_decode_prefills_total`. A fallback (queue full, no prefill
    /// worker…) is demand on prefill that was not met, so it counts.
    /// 1 when the decode workers admitted nothing in the window.
    pub remote_share: f64,
    /// Rate of `xpyd_frontend_output_tokens_total` over that of
    /// `xpyd_frontend_requests_total` (both counted at the end).
    pub output_tokens_per_request: f64,
    /// 1 - free / total of the decode workers' `xpyd_engine_kv_blocks*`.
    pub kv_use: f64,
    /// The largest `xpyd_decode_prefill_queue_depth` a decode worker saw.
    pub prefill_queue_depth: f64,
    /// Prompt tokens over requests received (0: none received).
    pub prompt_tokens_per_request: f64,
    /// p90 of the frontends' TTFT and ITL histograms over the window, ms.
    pub ttft_p90_ms: Option<f64>,
    pub itl_p90_ms: Option<f64>,
    /// Frontend pods scraped at both ends of the window. With none, the
    /// window says nothing about demand (not that there is none).
    pub frontends: usize,
    /// One prefill worker's measured capacity, in prompt tokens per second:
    /// the prefill workers' `xpyd_prefill_tokens_total` over their
    /// `xpyd_prefill_busy_seconds_total` in the window (tokens computed per
    /// second of being busy). `None` with less than [`MIN_BUSY_SECONDS`]
    /// of busy time to measure it by.
    pub prefill_capacity_measured: Option<f64>,
}

/// Busy seconds of the prefill workers in a window below which their
/// throughput says too little to measure their capacity by.
pub const MIN_BUSY_SECONDS: f64 = 1.0;

/// The increase of a counter over the window, summed over the pods of
/// `role` scraped both times (a pod seen only now has no start to count
/// from). A counter that went down restarted: its whole value is new.
pub fn increase(
    previous: &[PodScrape],
    current: &[PodScrape],
    role: Role,
    name: &str,
    label: Option<(&str, &str)>,
) -> f64 {
    let mut total = 0.0;
    for now in current.iter().filter(|p| p.role == role) {
        let Some(before) = previous.iter().find(|p| p.pod == now.pod) else {
            continue;
        };
        let (Some(b), Some(n)) = (
            before.metrics.sum(name, label),
            now.metrics.sum(name, label),
        ) else {
            continue;
        };
        total += if n >= b { n - b } else { n };
    }
    total
}

/// The histogram's increase over the window, summed over the pods of
/// `role` by bucket; then its `q` quantile.
fn windowed_quantile(
    previous: &[PodScrape],
    current: &[PodScrape],
    role: Role,
    name: &str,
    q: f64,
) -> Option<f64> {
    let mut sum: BTreeMap<Le, f64> = BTreeMap::new();
    for now in current.iter().filter(|p| p.role == role) {
        let Some(before) = previous.iter().find(|p| p.pod == now.pod) else {
            continue;
        };
        let (b, n) = (before.metrics.buckets(name), now.metrics.buckets(name));
        let reset = n.iter().any(|(le, c)| b.get(le).is_some_and(|bc| c < bc));
        for (le, c) in n {
            let base = if reset {
                0.0
            } else {
                b.get(&le).copied().unwrap_or(0.0)
            };
            *sum.entry(le).or_insert(0.0) += c - base;
        }
    }
    let buckets: Vec<(f64, f64)> = sum.into_iter().map(|(le, c)| (le.0, c)).collect();
    quantile(q, &buckets)
}

/// The window's figures from the scrapes at its start and end, `window`
/// apart.
pub fn figures(previous: &[PodScrape], current: &[PodScrape], window: Duration) -> WindowFigures {
    let secs = window.as_secs_f64().max(f64::EPSILON);
    let inc = |role, name, label| increase(previous, current, role, name, label);
    let requests = inc(Role::Frontend, names::REQUESTS_RECEIVED, None);
    let prompt_tokens = inc(Role::Frontend, names::PROMPT_TOKENS_RECEIVED, None);
    let finished = inc(Role::Frontend, names::REQUESTS_FINISHED, None);
    let output_tokens = inc(Role::Frontend, names::OUTPUT_TOKENS, None);
    let admitted = inc(Role::Decode, names::PREFILLS, None);
    let remote = inc(Role::Decode, names::PREFILLS, Some(("location", "remote")))
        + inc(Role::Decode, names::FALLBACKS, None);
    let remote_share = if admitted > 0.0 {
        (remote / admitted).min(1.0)
    } else {
        1.0
    };
    let decode_now = || current.iter().filter(|p| p.role == Role::Decode);
    let blocks: f64 = decode_now()
        .filter_map(|p| p.metrics.sum(names::KV_BLOCKS, None))
        .sum();
    let free: f64 = decode_now()
        .filter_map(|p| p.metrics.sum(names::KV_BLOCKS_FREE, None))
        .sum();
    let kv_use = if blocks > 0.0 {
        (1.0 - free / blocks).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let prefill_queue_depth = decode_now()
        .filter_map(|p| p.metrics.sum(names::QUEUE_DEPTH, None))
        .fold(0.0, f64::max);
    let p90_ms =
        |name| windowed_quantile(previous, current, Role::Frontend, name, 0.9).map(|s| s * 1000.0);
    let busy = inc(Role::Prefill, names::PREFILL_BUSY, None);
    let computed = inc(Role::Prefill, names::PREFILL_TOKENS, None);
    let prefill_capacity_measured =
        (busy >= MIN_BUSY_SECONDS && computed > 0.0).then(|| computed / busy);
    WindowFigures {
        prefill_capacity_measured,
        requests_per_s: requests / secs,
        prefill_tokens_per_s: prompt_tokens / secs * remote_share,
        remote_share,
        output_tokens_per_request: if finished > 0.0 {
            output_tokens / finished
        } else {
            0.0
        },
        kv_use,
        prefill_queue_depth,
        prompt_tokens_per_request: if requests > 0.0 {
            prompt_tokens / requests
        } else {
            0.0
        },
        ttft_p90_ms: p90_ms(names::TTFT),
        itl_p90_ms: p90_ms(names::ITL),
        frontends: current
            .iter()
            .filter(|p| p.role == Role::Frontend)
            .filter(|p| previous.iter().any(|b| b.pod == p.pod))
            .count(),
    }
}

/// What the planner is given besides the window: the spec's counts and
/// profile, the Deployments' ready counts, the time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Context {
    pub at: Duration,
    pub prefill: Replicas,
    pub decode: Replicas,
    pub threshold: u32,
    pub prefill_capacity_per_worker: f64,
    pub decode_capacity_per_worker: f64,
}

/// The planner's input for one window.
pub fn planner_signals(f: &WindowFigures, c: &Context) -> planner::Signals {
    planner::Signals {
        at: c.at,
        requests_per_s: f.requests_per_s,
        prefill_tokens_per_s: f.prefill_tokens_per_s,
        output_tokens_per_request: f.output_tokens_per_request,
        // The spec's profile when given, else what the window measured.
        prefill_capacity_per_worker: if c.prefill_capacity_per_worker > 0.0 {
            c.prefill_capacity_per_worker
        } else {
            f.prefill_capacity_measured.unwrap_or(0.0)
        },
        decode_capacity_per_worker: c.decode_capacity_per_worker,
        kv_use: f.kv_use,
        prefill_queue_depth: f.prefill_queue_depth,
        prompt_tokens_per_request: f.prompt_tokens_per_request,
        ttft_p90_ms: f.ttft_p90_ms,
        itl_p90_ms: f.itl_p90_ms,
        prefill: c.prefill,
        decode: c.decode,
        threshold: c.threshold,
    }
}

/// Work a worker holds now: requests running and waiting in its engine,
/// and (a prefill worker) remote-prefill jobs claimed, computing or
/// writing; `None` when it exports none of these.
pub fn in_flight(metrics: &Exposition) -> Option<f64> {
    let held = [
        names::RUNNING,
        names::WAITING,
        names::PREFILL_JOBS_IN_PROGRESS,
    ]
    .map(|name| metrics.sum(name, None));
    if held.iter().all(Option::is_none) {
        return None;
    }
    Some(held.iter().flatten().sum())
}

/// The `controller.kubernetes.io/pod-deletion-cost` of a worker holding
/// `in_flight` requests: the ReplicaSet removes the lowest first, so an
/// idle worker (0) goes before a busy one.
pub fn deletion_cost(in_flight: f64) -> i32 {
    if in_flight.is_finite() && in_flight > 0.0 {
        in_flight.ceil().min(f64::from(i32::MAX)) as i32
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRONTEND_T0: &str = r#"# HELP xpyd_frontend_requests_received_total Requests.
# TYPE xpyd_frontend_requests_received_total counter
xpyd_frontend_requests_received_total{model="m"} 100
xpyd_frontend_prompt_tokens_received_total{model="m"} 50000
xpyd_frontend_requests_total{model="m",endpoint="chat",status="200"} 90
xpyd_frontend_requests_total{model="m",endpoint="chat",status="500"} 5
xpyd_frontend_output_tokens_total{model="m"} 9000
xpyd_frontend_time_to_first_token_seconds_bucket{model="m",le="0.1"} 10
xpyd_frontend_time_to_first_token_seconds_bucket{model="m",le="0.5"} 50
xpyd_frontend_time_to_first_token_seconds_bucket{model="m",le="1"} 90
xpyd_frontend_time_to_first_token_seconds_bucket{model="m",le="+Inf"} 100
xpyd_frontend_time_to_first_token_seconds_sum{model="m"} 40
xpyd_frontend_time_to_first_token_seconds_count{model="m"} 100
"#;

    /// 30 s later: 60 more requests, 30000 more prompt tokens, 50 more
    /// finished with 5000 more tokens; TTFTs of the window: 10 under
    /// 0.1 s, 10 in 0.1..0.5, 40 in 0.5..1.
    const FRONTEND_T1: &str = r#"xpyd_frontend_requests_received_total{model="m"} 160
xpyd_frontend_prompt_tokens_received_total{model="m"} 80000 1700000000000
xpyd_frontend_requests_total{model="m",endpoint="chat",status="200"} 135
xpyd_frontend_requests_total{model="m",endpoint="chat",status="500"} 10
xpyd_frontend_output_tokens_total{model="m"} 14000
xpyd_frontend_time_to_first_token_seconds_bucket{model="m",le="0.1"} 20
xpyd_frontend_time_to_first_token_seconds_bucket{model="m",le="0.5"} 70
xpyd_frontend_time_to_first_token_seconds_bucket{model="m",le="1"} 150
xpyd_frontend_time_to_first_token_seconds_bucket{model="m",le="+Inf"} 160
"#;

    fn decode(prefills: (u64, u64), fallbacks: u64, free: u64, depth: u64) -> String {
        format!(
            "xpyd_decode_prefills_total{{location=\"local\"}} {}\n\
             xpyd_decode_prefills_total{{location=\"remote\"}} {}\n\
             xpyd_decode_prefills_total{{location=\"refused\"}} 0\n\
             xpyd_decode_remote_prefill_fallbacks_total{{reason=\"queue_full\"}} {fallbacks}\n\
             xpyd_decode_remote_prefill_fallbacks_total{{reason=\"timeout\"}} 0\n\
             xpyd_decode_prefill_queue_depth {depth}\n\
             xpyd_engine_kv_blocks 1000\n\
             xpyd_engine_kv_blocks_free {free}\n\
             xpyd_engine_running_requests 3\n\
             xpyd_engine_waiting_requests 1\n",
            prefills.0, prefills.1
        )
    }

    fn scrape(pod: &str, role: Role, text: &str) -> PodScrape {
        PodScrape {
            pod: pod.to_string(),
            role,
            metrics: parse(text).unwrap(),
        }
    }

    #[test]
    fn the_text_format_is_parsed_with_labels_escapes_and_timestamps() {
        let e = parse(
            "# HELP x y\n\n\
             a_total 3\n\
             b{k=\"v\",q=\"say \\\"hi\\\"\\\\ \\n\"} 1.5e3 1700000000\n\
             c{le=\"+Inf\",} +Inf\n",
        )
        .unwrap();
        assert_eq!(e.sum("a_total", None), Some(3.0));
        assert_eq!(e.sum("b", Some(("k", "v"))), Some(1500.0));
        assert_eq!(e.samples[1].labels["q"], "say \"hi\"\\ \n");
        assert_eq!(e.sum("b", Some(("k", "w"))), None);
        assert_eq!(e.sum("c", None), Some(f64::INFINITY));
        assert_eq!(e.sum("missing", None), None);
    }

    #[test]
    fn a_malformed_line_is_an_error_naming_it() {
        assert_eq!(
            parse("ok 1\nbad{k=\"v\" 2\n"),
            Err(ParseError::Line {
                line: 2,
                what: "bad labels"
            })
        );
        assert_eq!(
            parse("x one\n"),
            Err(ParseError::Line {
                line: 1,
                what: "value is not a number"
            })
        );
        assert!(matches!(
            parse("lonely\n"),
            Err(ParseError::Line { line: 1, .. })
        ));
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_prometheus() {
        let h = [(0.1, 10.0), (0.5, 20.0), (1.0, 60.0), (f64::INFINITY, 60.0)];
        // rank 54 of 60: in (0.5, 1], 34 of its 40 => 0.5 + 0.5 * 34/40.
        let p90 = quantile(0.9, &h).unwrap();
        assert!((p90 - 0.925).abs() < 1e-9, "{p90}");
        // rank 5: in the first bucket, from 0.
        assert!((quantile(0.5 / 6.0, &h).unwrap() - 0.05).abs() < 1e-9);
        // Past the last finite bound: that bound.
        let open = [(0.1, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.9, &open), Some(0.1));
        assert_eq!(quantile(0.9, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.9, &[]), None);
    }

    #[test]
    fn a_window_gives_rates_of_demand_latency_quantiles_and_decode_load() {
        let before = vec![
            scrape("fe-0", Role::Frontend, FRONTEND_T0),
            scrape("d-0", Role::Decode, &decode((40, 50), 10, 600, 0)),
            scrape("d-1", Role::Decode, &decode((100, 100), 5, 600, 0)),
        ];
        let after = vec![
            scrape("fe-0", Role::Frontend, FRONTEND_T1),
            // 20 local, 30 remote, 10 fallbacks in the window: 40 of the
            // 50 admitted wanted a prefill worker.
            scrape("d-0", Role::Decode, &decode((60, 80), 20, 200, 3)),
            // A restarted worker: its counters start again from 0.
            scrape("d-1", Role::Decode, &decode((0, 0), 0, 400, 7)),
        ];
        let f = figures(&before, &after, Duration::from_secs(30));
        assert!((f.requests_per_s - 2.0).abs() < 1e-9, "{f:?}");
        assert!((f.remote_share - 40.0 / 50.0).abs() < 1e-9, "{f:?}");
        assert!(
            (f.prefill_tokens_per_s - 1000.0 * 0.8).abs() < 1e-9,
            "{f:?}"
        );
        assert!((f.output_tokens_per_request - 100.0).abs() < 1e-9, "{f:?}");
        // 30,000 prompt tokens in 60 requests.
        assert!((f.prompt_tokens_per_request - 500.0).abs() < 1e-9, "{f:?}");
        // (1000 - 200) + (1000 - 400) of 2000 blocks in use.
        assert!((f.kv_use - 0.7).abs() < 1e-9, "{f:?}");
        assert_eq!(f.prefill_queue_depth, 7.0);
        let ttft = f.ttft_p90_ms.unwrap();
        assert!((ttft - 925.0).abs() < 1e-6, "{f:?}");
        assert_eq!(f.itl_p90_ms, None, "no ITL observed: no figure");
        assert_eq!(f.frontends, 1);
    }

    #[test]
    fn pods_seen_once_and_counter_resets_do_not_invent_demand() {
        let before = vec![scrape(
            "fe-0",
            Role::Frontend,
            "xpyd_frontend_requests_received_total 1000\n",
        )];
        let after = vec![
            // Restarted: 30 since then, not -970.
            scrape(
                "fe-0",
                Role::Frontend,
                "xpyd_frontend_requests_received_total 30\n",
            ),
            // New: no start to count from.
            scrape(
                "fe-1",
                Role::Frontend,
                "xpyd_frontend_requests_received_total 500\n",
            ),
        ];
        let f = figures(&before, &after, Duration::from_secs(10));
        assert!((f.requests_per_s - 3.0).abs() < 1e-9, "{f:?}");
        // No decode workers scraped: all prompt demand is prefill's.
        assert_eq!(f.remote_share, 1.0);
        assert_eq!(f.frontends, 1, "fe-1 has no start yet");
        let none = figures(&before, &after[1..], Duration::from_secs(10));
        assert_eq!(none.frontends, 0);
    }

    #[test]
    fn the_planner_gets_the_window_and_the_context() {
        let f = WindowFigures {
            requests_per_s: 2.0,
            prefill_tokens_per_s: 800.0,
            ttft_p90_ms: Some(925.0),
            ..WindowFigures::default()
        };
        let c = Context {
            at: Duration::from_secs(60),
            prefill: Replicas {
                desired: 2,
                ready: 1,
            },
            threshold: 512,
            prefill_capacity_per_worker: 1000.0,
            ..Context::default()
        };
        let s = planner_signals(&f, &c);
        assert_eq!(s.prefill.pending(), 1);
        assert_eq!((s.prefill_tokens_per_s, s.threshold), (800.0, 512));
        assert_eq!(s.ttft_p90_ms, Some(925.0));
        assert_eq!(s.prefill_capacity_per_worker, 1000.0);
    }

    #[test]
    fn idle_workers_cost_least_to_delete() {
        let busy = parse(&decode((0, 0), 0, 0, 0)).unwrap();
        assert_eq!(in_flight(&busy), Some(4.0));
        assert_eq!(deletion_cost(4.0), 4);
        assert_eq!(deletion_cost(0.0), 0);
        assert_eq!(deletion_cost(f64::NAN), 0);
        assert_eq!(in_flight(&parse("other 1\n").unwrap()), None);
        // A prefill worker holding a claimed job is busy too.
        let claimed = parse("xpyd_prefill_jobs_in_progress 1\nxpyd_engine_running_requests 0\n");
        assert_eq!(in_flight(&claimed.unwrap()), Some(1.0));
    }

    #[test]
    fn prefill_capacity_is_measured_from_tokens_over_busy_seconds() {
        let prefill = |pod: &str, tokens: u64, busy: f64| {
            scrape(
                pod,
                Role::Prefill,
                &format!(
                    "xpyd_prefill_tokens_total {tokens}\nxpyd_prefill_busy_seconds_total {busy}\n"
                ),
            )
        };
        let before = vec![prefill("p-0", 1000, 10.0), prefill("p-1", 0, 0.0)];
        // p-0 computed 6000 tokens in 3 busy seconds, p-1 2000 in 1.
        let after = vec![prefill("p-0", 7000, 13.0), prefill("p-1", 2000, 1.0)];
        let f = figures(&before, &after, Duration::from_secs(30));
        assert_eq!(f.prefill_capacity_measured, Some(2000.0));
        // Used when the spec gives no profile; the spec's wins otherwise.
        let measured = planner_signals(&f, &Context::default());
        assert_eq!(measured.prefill_capacity_per_worker, 2000.0);
        let given = Context {
            prefill_capacity_per_worker: 500.0,
            ..Context::default()
        };
        assert_eq!(
            planner_signals(&f, &given).prefill_capacity_per_worker,
            500.0
        );
        // Too little busy time measures nothing.
        let idle = vec![prefill("p-0", 1100, 10.5), prefill("p-1", 0, 0.0)];
        assert_eq!(
            figures(&before, &idle, Duration::from_secs(30)).prefill_capacity_measured,
            None
        );
    }
}
