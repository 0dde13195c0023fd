//! The SLO planner's decision: from one window of observed signals to the
//! desired `numPrefill`, `numDecode` and `maxLocalPrefillLength`, with the
//! reason. A pure function ([`Planner::decide`]) over the signals and the
//! planner's own memory of earlier recommendations, so it is tested on
//! recorded and synthetic traces without a cluster.
//!
//! How it decides, each interval:
//! 1. **Demand, not throughput.** What each side must carry is computed
//!    from what enters: prompt tokens per second going to the prefill
//!    queue, and requests per second times their output length on the
//!    decode side. Under backpressure served throughput stays flat while
//!    demand grows; sizing by it would never catch up.
//! 2. **Needed workers** per role: demand over one worker's measured
//!    capacity at [`TARGET_UTILISATION`]; for decode also the KV blocks in
//!    use over [`TARGET_KV_USE`]. A latency target missed (TTFT p90 for
//!    prefill, ITL p90 for decode) asks for at least one more. Prompts
//!    already waiting in the prefill queue are demand too: their tokens
//!    must be computed within the TTFT target, on top of what enters. A
//!    burst's backlog shows in the queue before a window's average rate
//!    shows the burst, so this is what makes a scale-up one step, at the
//!    burst's start. And since the TTFT target is a p90, prefill is also
//!    sized as a queue: at least the workers for which no more than one
//!    prompt in ten waits longer than the target leaves after its own
//!    compute (M/M/c, [`workers_for_wait`]). A fixed utilisation target
//!    is too high when prompts take seconds and arrive in bunches, and
//!    too low when they take milliseconds. New pods serve only once they
//!    are Ready: while they start, a backlog keeps growing by what enters
//!    beyond what the Ready workers compute. The planner measures how
//!    long its own scale-ups took to become Ready (the lead time) and
//!    sizes for the backlog as it will be then, so the first scale-up of
//!    a burst asks for enough, not for the need of the moment plus a
//!    second request once those pods are Ready.
//! 3. **The threshold first.** When only one side is saturated and the
//!    other has headroom, the planner moves `maxLocalPrefillLength`
//!    (cheap, takes effect in seconds through etcd) instead of replicas:
//!    raised when prefill is saturated (more prompts prefilled on decode),
//!    lowered when decode is saturated (more go remote).
//! 4. **Replicas** within `min..=max`. Up at once to what is needed, but
//!    never for a role whose earlier pods are still Pending (the reason
//!    then says so). Down only to the largest need seen over the
//!    scale-down window, and by one pod per interval, so a burst shorter
//!    than the window, or noise, never scales in. Needs within
//!    [`TOLERANCE`] of the current count change nothing (hysteresis).

use std::collections::VecDeque;
use std::time::Duration;

/// Utilisation a role is sized for: the rest is headroom for bursts.
pub const TARGET_UTILISATION: f64 = 0.7;
/// Share of decode KV blocks in use a decode worker is sized for.
pub const TARGET_KV_USE: f64 = 0.8;
/// A need within this fraction of the current count is no change.
pub const TOLERANCE: f64 = 0.1;
/// Below this utilisation (and with no latency target missed) a side has
/// headroom to take work from the other through the threshold.
pub const HEADROOM: f64 = 0.5;
/// The TTFT target is a p90: the share of prompts that must start within
/// it.
pub const TTFT_QUANTILE: f64 = 0.9;
/// The most workers the queueing estimate ever asks for (the bounds cut
/// it further).
const MAX_QUEUEING_WORKERS: u32 = 1024;
/// Factor the threshold moves by in one step.
pub const THRESHOLD_STEP: f64 = 1.5;
/// Weight of the newest measured lead time in its running average.
const LEAD_WEIGHT: f64 = 0.5;

/// Lower and upper bound of one role's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

impl Bounds {
    fn clamp(self, n: u32) -> u32 {
        n.clamp(self.min, self.max.max(self.min))
    }
}

/// What the user asked of the planner (`spec.autoscaling`).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerSpec {
    pub ttft_p90_ms: f64,
    pub itl_p90_ms: f64,
    pub prefill: Bounds,
    pub decode: Bounds,
    pub scale_down_window: Duration,
    /// Whether the planner may move `maxLocalPrefillLength`.
    pub move_threshold: bool,
    /// The range the threshold may move in (block size to maxModelLen).
    pub threshold_min: u32,
    pub threshold_max: u32,
}

/// One role's replicas: what the spec asks and how many pods are Ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Replicas {
    pub desired: u32,
    pub ready: u32,
}

impl Replicas {
    /// Pods asked for and not Ready yet (Pending, pulling, loading).
    pub fn pending(self) -> u32 {
        self.desired.saturating_sub(self.ready)
    }
}

/// One window of what the agents report, summed or averaged over the
/// deployment's pods.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signals {
    /// Time since the planner started (orders the windows).
    pub at: Duration,
    /// Requests entering the frontends, per second.
    pub requests_per_s: f64,
    /// Prompt tokens entering the prefill queue, per second (demand on the
    /// prefill workers).
    pub prefill_tokens_per_s: f64,
    /// Output tokens per request, on average.
    pub output_tokens_per_request: f64,
    /// Prompt tokens one prefill worker computes per second while busy.
    pub prefill_capacity_per_worker: f64,
    /// Tokens one decode worker generates per second at its usual batch.
    pub decode_capacity_per_worker: f64,
    /// Share of decode KV blocks in use (0..1), over all decode workers.
    pub kv_use: f64,
    /// Jobs waiting in the prefill queue.
    pub prefill_queue_depth: f64,
    /// Prompt tokens per request entering, on average over the window (0:
    /// no request entered).
    pub prompt_tokens_per_request: f64,
    /// Frontend TTFT and ITL p90 over the window, in ms (`None`: no data).
    pub ttft_p90_ms: Option<f64>,
    pub itl_p90_ms: Option<f64>,
    pub prefill: Replicas,
    pub decode: Replicas,
    pub threshold: u32,
}

/// Why the planner decided what it did (the `reason` in status and events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Nothing to change.
    Steady,
    ScaleUp,
    ScaleDown,
    /// Prefill saturated, decode with headroom: more prompts prefilled on
    /// decode.
    ThresholdRaised,
    /// Decode saturated, prefill with headroom: more prompts go remote.
    ThresholdLowered,
    /// A role needs more pods but its earlier ones are not Ready yet.
    Pending,
    /// A role needs more than its `max`.
    AtMax,
}

impl Reason {
    /// The CamelCase word for status and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Steady => "Steady",
            Reason::ScaleUp => "ScaleUp",
            Reason::ScaleDown => "ScaleDown",
            Reason::ThresholdRaised => "ThresholdRaised",
            Reason::ThresholdLowered => "ThresholdLowered",
            Reason::Pending => "Pending",
            Reason::AtMax => "AtMax",
        }
    }
}

/// The planner's answer for one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub num_prefill: u32,
    pub num_decode: u32,
    pub threshold: u32,
    pub reason: Reason,
    /// For people: the figures behind the reason.
    pub message: String,
}

/// What one side needs and how loaded it is.
#[derive(Debug, Clone, Copy)]
struct Side {
    needed: u32,
    utilisation: f64,
    slo_missed: bool,
}

impl Side {
    fn saturated(self, current: u32) -> bool {
        self.slo_missed || self.utilisation > TARGET_UTILISATION || self.needed > current
    }

    fn headroom(self) -> bool {
        !self.slo_missed && self.utilisation < HEADROOM
    }
}

/// The planner with its memory: the needs of the recent windows, for the
/// scale-down window, and how long its prefill scale-ups took to become
/// Ready.
#[derive(Debug, Clone)]
pub struct Planner {
    spec: PlannerSpec,
    needs: VecDeque<(Duration, u32, u32)>,
    /// The last window's prompt tokens per request that saw any request:
    /// what a queued job is taken to hold when a window saw none.
    prompt_len: f64,
    /// When the last prefill scale-up was asked for and to how many pods,
    /// until they are Ready.
    prefill_asked: Option<(Duration, u32)>,
    /// The running average of the prefill scale-ups' time to Ready, in
    /// seconds (`None` until one has been seen).
    prefill_lead_s: Option<f64>,
}

impl Planner {
    pub fn new(spec: PlannerSpec) -> Planner {
        Planner {
            spec,
            needs: VecDeque::new(),
            prompt_len: 0.0,
            prefill_asked: None,
            prefill_lead_s: None,
        }
    }

    pub fn spec(&self) -> &PlannerSpec {
        &self.spec
    }

    /// How long the prefill scale-ups seen so far took to become Ready, on
    /// average (`None` before the first).
    pub fn prefill_lead(&self) -> Option<Duration> {
        self.prefill_lead_s.map(Duration::from_secs_f64)
    }

    /// Decide for one window (see the module doc).
    pub fn decide(&mut self, s: &Signals) -> Decision {
        if s.prompt_tokens_per_request > 0.0 {
            self.prompt_len = s.prompt_tokens_per_request;
        }
        if let Some((asked, to)) = self.prefill_asked {
            if s.prefill.desired < to {
                // Not applied, or scaled down before all were Ready: no
                // start time to learn from.
                self.prefill_asked = None;
            } else if s.prefill.ready >= to {
                let took = s.at.saturating_sub(asked).as_secs_f64();
                self.prefill_lead_s = Some(match self.prefill_lead_s {
                    Some(lead) => lead + LEAD_WEIGHT * (took - lead),
                    None => took,
                });
                self.prefill_asked = None;
            }
        }
        let decision = self.decide_window(s);
        if decision.num_prefill > s.prefill.desired {
            self.prefill_asked = Some((s.at, decision.num_prefill));
        }
        decision
    }

    fn decide_window(&mut self, s: &Signals) -> Decision {
        let spec = &self.spec;
        let lead_s = self.prefill_lead_s.unwrap_or(0.0);
        let prefill = prefill_side(spec, s, self.prompt_len, lead_s);
        let decode = decode_side(spec, s);
        let (cur_p, cur_d) = (s.prefill.desired, s.decode.desired);

        self.needs.push_back((s.at, prefill.needed, decode.needed));
        while self
            .needs
            .front()
            .is_some_and(|(at, _, _)| s.at.saturating_sub(*at) > spec.scale_down_window)
        {
            self.needs.pop_front();
        }
        let lead = self
            .prefill_lead_s
            .map_or_else(|| "not seen yet".to_string(), |l| format!("{l:.0} s"));
        let figures = format!(
            "prefill: need {} of {cur_p} (utilisation {:.2}, {:.0} jobs queued, TTFT p90 {}, pods Ready after {lead}), decode: need {} of {cur_d} (utilisation {:.2}, KV {:.2}, ITL p90 {})",
            prefill.needed,
            prefill.utilisation,
            s.prefill_queue_depth,
            ms(s.ttft_p90_ms),
            decode.needed,
            decode.utilisation,
            s.kv_use,
            ms(s.itl_p90_ms),
        );

        // The threshold first, when one side can take the other's work.
        if spec.move_threshold {
            let p_sat = prefill.saturated(cur_p);
            let d_sat = decode.saturated(cur_d);
            let step = if p_sat && !d_sat && decode.headroom() && s.threshold < spec.threshold_max {
                Some((THRESHOLD_STEP, Reason::ThresholdRaised))
            } else if d_sat && !p_sat && prefill.headroom() && s.threshold > spec.threshold_min {
                Some((1.0 / THRESHOLD_STEP, Reason::ThresholdLowered))
            } else {
                None
            };
            if let Some((factor, reason)) = step {
                let t = step_threshold(s.threshold, factor, spec);
                return Decision {
                    num_prefill: cur_p,
                    num_decode: cur_d,
                    threshold: t,
                    reason,
                    message: format!("{figures}; maxLocalPrefillLength {} -> {t}", s.threshold),
                };
            }
        }

        let window_p = self.needs.iter().map(|n| n.1).max().unwrap_or(0);
        let window_d = self.needs.iter().map(|n| n.2).max().unwrap_or(0);
        let p = role_target(spec.prefill, s.prefill, prefill.needed, window_p);
        let d = role_target(spec.decode, s.decode, decode.needed, window_d);
        let reason = [p.1, d.1]
            .into_iter()
            .max_by_key(|r| reason_rank(*r))
            .unwrap_or(Reason::Steady);
        Decision {
            num_prefill: p.0,
            num_decode: d.0,
            threshold: s.threshold,
            reason,
            message: figures,
        }
    }
}

/// Which reason a decision over two roles reports: the one a user most
/// needs to see.
fn reason_rank(r: Reason) -> u8 {
    match r {
        Reason::Steady => 0,
        Reason::ScaleDown => 1,
        Reason::ScaleUp => 2,
        Reason::AtMax => 3,
        Reason::Pending => 4,
        Reason::ThresholdRaised | Reason::ThresholdLowered => 5,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0} ms"))
}

fn needed_for(demand: f64, capacity: f64) -> u32 {
    if demand <= 0.0 || capacity <= 0.0 {
        return 0;
    }
    (demand / (capacity * TARGET_UTILISATION)).ceil() as u32
}

/// The prefill side, with prompts of `prompt_len` tokens on average (the
/// queued ones included), when new pods take `lead_s` seconds to become
/// Ready.
fn prefill_side(spec: &PlannerSpec, s: &Signals, prompt_len: f64, lead_s: f64) -> Side {
    let current = s.prefill.ready.max(1);
    let capacity = s.prefill_capacity_per_worker;
    // The backlog when pods asked for now can serve: what waits, plus what
    // enters beyond the Ready workers' compute until then.
    let growth_tokens_per_s =
        (s.prefill_tokens_per_s - capacity * f64::from(s.prefill.ready)).max(0.0);
    let backlog_tokens = s.prefill_queue_depth * prompt_len + growth_tokens_per_s * lead_s;
    let utilisation = if capacity > 0.0 {
        s.prefill_tokens_per_s / (capacity * f64::from(current))
    } else {
        0.0
    };
    let slo_missed = s.ttft_p90_ms.is_some_and(|t| t > spec.ttft_p90_ms);
    // What enters, at TARGET_UTILISATION, plus the backlog drained within
    // the TTFT target at full speed (the headroom is for what keeps
    // entering).
    let drain_s = (spec.ttft_p90_ms / 1000.0).max(0.001);
    let mut needed = if capacity > 0.0 {
        (s.prefill_tokens_per_s / (capacity * TARGET_UTILISATION)
            + backlog_tokens / drain_s / capacity)
            .ceil() as u32
    } else {
        0
    };
    // Bursty arrivals queue long before the average load reaches
    // TARGET_UTILISATION; the TTFT target says how long a prompt may wait.
    if capacity > 0.0 && prompt_len > 0.0 {
        let service_s = prompt_len / capacity;
        let allowed_wait_s = spec.ttft_p90_ms / 1000.0 - service_s;
        if let Some(n) = workers_for_wait(
            s.prefill_tokens_per_s / prompt_len,
            service_s,
            allowed_wait_s,
            1.0 - TTFT_QUANTILE,
        ) {
            needed = needed.max(n);
        }
    }
    if slo_missed && s.prefill_queue_depth > 0.0 {
        // Queueing is what misses TTFT: one more than today at least.
        needed = needed.max(s.prefill.desired + 1);
    }
    Side {
        needed,
        utilisation,
        slo_missed,
    }
}

/// The fewest workers for which jobs arriving at `arrivals` per second,
/// each served in `service_s`, wait longer than `allowed_wait_s` with a
/// probability of at most `tail` (M/M/c: Erlang C times the exponential
/// tail of the wait). `None` when nothing arrives, or when a job alone
/// takes the whole allowance: then no number of workers meets it, and
/// sizing stays with utilisation.
fn workers_for_wait(arrivals: f64, service_s: f64, allowed_wait_s: f64, tail: f64) -> Option<u32> {
    if arrivals <= 0.0 || service_s <= 0.0 || allowed_wait_s <= 0.0 {
        return None;
    }
    let offered = arrivals * service_s;
    // Erlang B by its recursion, then C for each c above the load.
    let mut erlang_b = 1.0;
    for c in 1..=MAX_QUEUEING_WORKERS {
        erlang_b = offered * erlang_b / (f64::from(c) + offered * erlang_b);
        if f64::from(c) <= offered {
            continue;
        }
        let erlang_c = f64::from(c) * erlang_b / (f64::from(c) - offered * (1.0 - erlang_b));
        let p_late = erlang_c * (-(f64::from(c) / service_s - arrivals) * allowed_wait_s).exp();
        if p_late <= tail {
            return Some(c);
        }
    }
    Some(MAX_QUEUEING_WORKERS)
}

fn decode_side(spec: &PlannerSpec, s: &Signals) -> Side {
    let current = s.decode.ready.max(1);
    let demand = s.requests_per_s * s.output_tokens_per_request;
    let capacity = s.decode_capacity_per_worker;
    let utilisation = if capacity > 0.0 {
        demand / (capacity * f64::from(current))
    } else {
        0.0
    }
    .max(s.kv_use / TARGET_KV_USE * TARGET_UTILISATION);
    let slo_missed = s.itl_p90_ms.is_some_and(|t| t > spec.itl_p90_ms);
    let by_kv = (s.kv_use * f64::from(current) / TARGET_KV_USE).ceil() as u32;
    let mut needed = needed_for(demand, capacity).max(by_kv);
    if slo_missed {
        needed = needed.max(s.decode.desired + 1);
    }
    Side {
        needed,
        utilisation,
        slo_missed,
    }
}

/// One role's next replica count and why.
fn role_target(bounds: Bounds, current: Replicas, needed: u32, window_max: u32) -> (u32, Reason) {
    let cur = current.desired;
    let tolerance = f64::from(cur) * TOLERANCE;
    if f64::from(needed) > f64::from(cur) + tolerance {
        if current.pending() > 0 {
            return (cur, Reason::Pending);
        }
        let to = bounds.clamp(needed);
        if to <= cur {
            return (
                bounds.clamp(cur),
                if cur >= bounds.max {
                    Reason::AtMax
                } else {
                    Reason::Steady
                },
            );
        }
        return (
            to,
            if needed > bounds.max {
                Reason::AtMax
            } else {
                Reason::ScaleUp
            },
        );
    }
    // Down only below every need in the window, one pod at a time.
    if window_max < cur && f64::from(window_max) < f64::from(cur) - tolerance {
        let to = bounds.clamp(cur - 1);
        if to < cur {
            return (to, Reason::ScaleDown);
        }
    }
    (bounds.clamp(cur), Reason::Steady)
}

fn step_threshold(t: u32, factor: f64, spec: &PlannerSpec) -> u32 {
    let moved = (f64::from(t.max(1)) * factor).round() as u32;
    moved.clamp(
        spec.threshold_min,
        spec.threshold_max.max(spec.threshold_min),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PlannerSpec {
        PlannerSpec {
            ttft_p90_ms: 1000.0,
            itl_p90_ms: 50.0,
            prefill: Bounds { min: 1, max: 8 },
            decode: Bounds { min: 1, max: 8 },
            scale_down_window: Duration::from_secs(300),
            move_threshold: false,
            threshold_min: 16,
            threshold_max: 2048,
        }
    }

    /// A steady deployment: 1P1D, each at `load` of its capacity.
    fn signals(at_s: u64, prefill_load: f64, decode_load: f64) -> Signals {
        Signals {
            at: Duration::from_secs(at_s),
            requests_per_s: decode_load * 10.0,
            prefill_tokens_per_s: prefill_load * 1000.0,
            output_tokens_per_request: 100.0,
            prefill_capacity_per_worker: 1000.0,
            decode_capacity_per_worker: 1000.0,
            kv_use: 0.3,
            prefill_queue_depth: 0.0,
            prompt_tokens_per_request: 100.0,
            ttft_p90_ms: Some(300.0),
            itl_p90_ms: Some(20.0),
            prefill: Replicas {
                desired: 1,
                ready: 1,
            },
            decode: Replicas {
                desired: 1,
                ready: 1,
            },
            threshold: 512,
        }
    }

    /// Replays `trace` (each window's loads) through the planner, applying
    /// its decisions as the operator would (pods Ready `ready_after`
    /// windows later); returns the replica counts after each window.
    fn replay(
        spec: PlannerSpec,
        trace: &[(f64, f64)],
        ready_after: usize,
    ) -> Vec<(u32, u32, Reason)> {
        let mut planner = Planner::new(spec);
        let (mut p, mut d) = (
            Replicas {
                desired: 1,
                ready: 1,
            },
            Replicas {
                desired: 1,
                ready: 1,
            },
        );
        let mut became: Vec<(usize, u32, u32)> = Vec::new();
        let mut out = Vec::new();
        for (i, (pl, dl)) in trace.iter().enumerate() {
            for (at, rp, rd) in &became {
                if *at == i {
                    p.ready = p.ready.max(*rp);
                    d.ready = d.ready.max(*rd);
                }
            }
            // Scale-in is immediate in ready pods.
            p.ready = p.ready.min(p.desired);
            d.ready = d.ready.min(d.desired);
            let mut s = signals(i as u64 * 30, *pl, *dl);
            // Load is spread over the Ready pods: demand is what enters.
            s.prefill = p;
            s.decode = d;
            s.kv_use = (0.3 * dl / f64::from(d.ready.max(1))).min(1.0);
            let dec = planner.decide(&s);
            if dec.num_prefill != p.desired || dec.num_decode != d.desired {
                became.push((i + ready_after, dec.num_prefill, dec.num_decode));
            }
            p.desired = dec.num_prefill;
            d.desired = dec.num_decode;
            if ready_after == 0 {
                p.ready = p.desired;
                d.ready = d.desired;
            }
            out.push((p.desired, d.desired, dec.reason));
        }
        out
    }

    #[test]
    fn a_step_up_is_met_within_one_interval() {
        // Prefill demand jumps from 0.5 to 3 workers' worth at window 3.
        let trace: Vec<(f64, f64)> = (0..8)
            .map(|i| if i < 3 { (0.5, 0.5) } else { (3.0, 0.5) })
            .collect();
        let out = replay(spec(), &trace, 0);
        assert_eq!(out[2].0, 1, "{out:?}");
        assert_eq!(
            out[3].0, 5,
            "ceil(3 / 0.7) prefill workers at once: {out:?}"
        );
        assert_eq!(out[3].2, Reason::ScaleUp);
        assert!(out.iter().all(|o| o.1 == 1), "decode untouched: {out:?}");
    }

    #[test]
    fn a_noisy_flat_load_never_oscillates() {
        // 2 workers' worth of prefill demand, +-15 % noise, for 200 windows.
        let mut x: u64 = 7;
        let trace: Vec<(f64, f64)> = (0..200)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = ((x >> 33) as f64 / f64::from(u32::MAX >> 1) - 1.0) * 0.15;
                (2.0 * (1.0 + noise), 0.5)
            })
            .collect();
        let out = replay(spec(), &trace, 0);
        let changes = out.windows(2).filter(|w| w[0].0 != w[1].0).count();
        // Up once to the level the noise peaks need; never down again.
        assert!(changes <= 2, "{changes} changes: {:?}", &out[..20]);
        assert!(out[20..].iter().all(|o| o.0 == out[20].0), "{out:?}");
    }

    #[test]
    fn a_burst_shorter_than_the_window_causes_no_scale_down() {
        // 10 windows of 300 s = 5 min: a burst at window 2..4, then quiet
        // for 8 windows (4 min) < the 5 min window... then long quiet.
        let mut trace = vec![(0.5, 0.5); 2];
        trace.extend(vec![(3.0, 0.5); 3]);
        trace.extend(vec![(0.5, 0.5); 20]);
        let out = replay(spec(), &trace, 0);
        assert_eq!(out[2].0, 5, "{out:?}");
        // 300 s / 30 s windows: the burst's need holds for 10 windows after it.
        for (i, o) in out.iter().enumerate().take(14).skip(4) {
            assert_eq!(o.0, 5, "window {i}: {out:?}");
        }
        // Then down, one pod per window, to 1.
        let after: Vec<u32> = out[14..].iter().map(|o| o.0).collect();
        assert!(
            after.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1),
            "{after:?}"
        );
        assert_eq!(*after.last().unwrap(), 1, "{out:?}");
    }

    #[test]
    fn nothing_is_added_while_pods_are_pending() {
        let trace = vec![(3.0, 0.5); 6];
        // Pods become Ready 3 windows after being asked for.
        let out = replay(spec(), &trace, 3);
        assert_eq!(out[0].0, 5, "{out:?}");
        assert_eq!(out[1].2, Reason::Steady, "need met by desired: {out:?}");
        // A higher need while the 4 new pods are Pending adds none.
        let mut planner = Planner::new(spec());
        let mut s = signals(0, 8.0, 0.5);
        s.prefill = Replicas {
            desired: 5,
            ready: 1,
        };
        let d = planner.decide(&s);
        assert_eq!((d.num_prefill, d.reason), (5, Reason::Pending), "{d:?}");
    }

    #[test]
    fn the_bounds_hold() {
        let mut bounded = spec();
        bounded.prefill = Bounds { min: 2, max: 3 };
        bounded.decode = Bounds { min: 1, max: 2 };
        let trace = vec![(10.0, 10.0); 5];
        let out = replay(bounded.clone(), &trace, 0);
        assert!(out.iter().all(|o| o.0 <= 3 && o.1 <= 2), "{out:?}");
        assert_eq!(out[0].2, Reason::AtMax, "{out:?}");
        let quiet = vec![(0.0, 0.0); 40];
        let out = replay(bounded, &quiet, 0);
        assert!(out.iter().all(|o| o.0 >= 2 && o.1 >= 1), "{out:?}");
    }

    #[test]
    fn the_threshold_moves_before_replicas_when_one_side_is_saturated() {
        let mut s = spec();
        s.move_threshold = true;
        let mut planner = Planner::new(s.clone());
        // Prefill saturated (TTFT missed, queue), decode idle.
        let mut sig = signals(0, 1.2, 0.2);
        sig.ttft_p90_ms = Some(2500.0);
        sig.prefill_queue_depth = 4.0;
        sig.kv_use = 0.1;
        let d = planner.decide(&sig);
        assert_eq!(d.reason, Reason::ThresholdRaised, "{d:?}");
        assert_eq!((d.num_prefill, d.num_decode, d.threshold), (1, 1, 768));
        // Decode saturated (ITL missed), prefill idle: more go remote.
        let mut sig = signals(30, 0.1, 0.6);
        sig.itl_p90_ms = Some(90.0);
        let d = planner.decide(&sig);
        assert_eq!(
            (d.reason, d.threshold),
            (Reason::ThresholdLowered, 341),
            "{d:?}"
        );
        // Both saturated: replicas.
        let mut sig = signals(60, 2.0, 2.0);
        sig.ttft_p90_ms = Some(2500.0);
        sig.itl_p90_ms = Some(90.0);
        let d = planner.decide(&sig);
        assert_eq!(d.reason, Reason::ScaleUp, "{d:?}");
        assert!(d.num_prefill > 1 && d.num_decode > 1, "{d:?}");
        assert_eq!(d.threshold, 512);
        // The threshold stays within its range.
        let mut planner = Planner::new(s);
        let mut sig = signals(0, 1.2, 0.2);
        sig.ttft_p90_ms = Some(2500.0);
        sig.threshold = 2000;
        assert_eq!(planner.decide(&sig).threshold, 2048);
    }

    #[test]
    fn the_queueing_estimate_matches_erlang_c() {
        // One job per second of one second each: Erlang C is 1/3 with two
        // workers, 1/11 with three (a wait of ~0 s leaves the tail at C).
        assert_eq!(workers_for_wait(1.0, 1.0, 1e-9, 0.34), Some(2));
        assert_eq!(workers_for_wait(1.0, 1.0, 1e-9, 0.33), Some(3));
        assert_eq!(workers_for_wait(1.0, 1.0, 1e-9, 0.0909), Some(4));
        // A longer allowance needs fewer: e^-(2-1)*3 of 1/3 is 0.017.
        assert_eq!(workers_for_wait(1.0, 1.0, 3.0, 0.05), Some(2));
        // Nothing entering, or a job that alone takes the whole target.
        assert_eq!(workers_for_wait(0.0, 1.0, 1.0, 0.1), None);
        assert_eq!(workers_for_wait(1.0, 1.0, 0.0, 0.1), None);
    }

    #[test]
    fn slow_prompts_arriving_in_bunches_are_sized_for_the_ttft_target() {
        // 0.3 prompts/s of 150 tokens on workers of 100 tokens/s: one
        // worker at 0.45 is within TARGET_UTILISATION, but one prompt in
        // five would wait more than the 2.5 s the 4 s target leaves.
        let slow = PlannerSpec {
            ttft_p90_ms: 4000.0,
            ..spec()
        };
        let mut s = signals(0, 0.045, 0.5);
        s.prefill_capacity_per_worker = 100.0;
        s.prompt_tokens_per_request = 150.0;
        let d = Planner::new(slow.clone()).decide(&s);
        assert_eq!((d.num_prefill, d.reason), (2, Reason::ScaleUp), "{d:?}");
        // Prompts of 500 tokens take 5 s alone: no worker count meets the
        // target, so the side is sized by utilisation (ceil(0.45 / 0.7)).
        s.prompt_tokens_per_request = 500.0;
        s.prefill_tokens_per_s = 45.0;
        let d = Planner::new(slow).decide(&s);
        assert_eq!((d.num_prefill, d.reason), (1, Reason::Steady), "{d:?}");
    }

    #[test]
    fn demand_entering_counts_not_throughput_served() {
        // Under backpressure prefill serves 1 worker's worth while 4
        // workers' worth enters: the planner sizes for what enters.
        let mut planner = Planner::new(PlannerSpec {
            prefill: Bounds { min: 1, max: 16 },
            ..spec()
        });
        let mut s = signals(0, 4.0, 0.5);
        s.ttft_p90_ms = Some(5000.0);
        s.prefill_queue_depth = 40.0;
        let d = planner.decide(&s);
        assert_eq!(
            d.num_prefill, 10,
            "ceil(4 / 0.7 + 40 queued jobs of 100 tokens drained in the 1 s TTFT target by 1000 tokens/s each): {d:?}"
        );
    }

    #[test]
    fn a_backlog_is_drained_within_the_ttft_target_before_the_rate_shows_the_burst() {
        // A burst began just before the window closed: its average rate
        // is still one worker's 0.4, but 12 prompts of 250 tokens wait.
        let mut planner = Planner::new(spec());
        let mut s = signals(0, 0.4, 0.5);
        s.prompt_tokens_per_request = 250.0;
        s.prefill_queue_depth = 12.0;
        let d = planner.decide(&s);
        assert_eq!(
            (d.num_prefill, d.reason),
            (4, Reason::ScaleUp),
            "ceil(0.4 / 0.7 + 3000 tokens / 1 s / 1000): {d:?}"
        );
        // A window in which no request entered keeps the last prompt
        // length for the jobs still queued: the need does not vanish.
        let mut s = signals(30, 0.0, 0.0);
        s.prompt_tokens_per_request = 0.0;
        s.prefill_queue_depth = 12.0;
        s.prefill = Replicas {
            desired: 4,
            ready: 4,
        };
        let d = planner.decide(&s);
        assert_eq!((d.num_prefill, d.reason), (4, Reason::Steady), "{d:?}");
        // The queue empty and the window quiet: the backlog asks nothing.
        let mut planner = Planner::new(spec());
        let mut s = signals(0, 0.4, 0.5);
        s.prompt_tokens_per_request = 250.0;
        assert_eq!(planner.decide(&s).num_prefill, 1);
    }

    #[test]
    fn a_burst_is_sized_for_the_backlog_at_the_time_new_pods_are_ready() {
        let wide = PlannerSpec {
            prefill: Bounds { min: 1, max: 16 },
            ..spec()
        };
        // A backlog asks for 4 at 0 s; they are Pending at 10 s and Ready
        // at 20 s: the planner has seen a lead time of 20 s.
        let mut planner = Planner::new(wide.clone());
        let mut s = signals(0, 0.4, 0.5);
        s.prompt_tokens_per_request = 250.0;
        s.prefill_queue_depth = 12.0;
        assert_eq!(planner.decide(&s).num_prefill, 4);
        assert_eq!(planner.prefill_lead(), None);
        let mut s = signals(10, 0.4, 0.5);
        s.prefill = Replicas {
            desired: 4,
            ready: 2,
        };
        planner.decide(&s);
        assert_eq!(planner.prefill_lead(), None, "not Ready yet");
        let mut s = signals(20, 0.4, 0.5);
        s.prefill = Replicas {
            desired: 4,
            ready: 4,
        };
        let d = planner.decide(&s);
        assert_eq!(planner.prefill_lead(), Some(Duration::from_secs(20)));
        assert!(d.message.contains("pods Ready after 20 s"), "{}", d.message);

        // A burst: 4,400 prompt tokens/s enter, the 4 Ready workers compute
        // 4,000. Pods asked for now serve in 20 s; by then 8,000 more
        // tokens wait, to be computed within the 1 s target.
        let mut burst = signals(30, 4.4, 0.5);
        burst.prefill = Replicas {
            desired: 4,
            ready: 4,
        };
        // What the Ready workers keep up with grows no backlog: the lead
        // time changes nothing.
        let mut kept_up = burst.clone();
        kept_up.prefill_tokens_per_s = 3500.0;
        let with_lead = planner.clone().decide(&kept_up);
        let without = Planner::new(wide.clone()).decide(&kept_up);
        assert_eq!(
            (with_lead.num_prefill, with_lead.reason),
            (without.num_prefill, without.reason)
        );
        assert_eq!(with_lead.num_prefill, 5, "ceil(3.5 / 0.7)");
        let d = planner.decide(&burst);
        assert_eq!(
            (d.num_prefill, d.reason),
            (15, Reason::ScaleUp),
            "ceil(4.4 / 0.7 + 400 tokens/s * 20 s / 1 s / 1000): {d:?}"
        );
        // A planner that has not seen its pods start asks for the need of
        // the moment only.
        let d = Planner::new(wide).decide(&burst);
        assert_eq!((d.num_prefill, d.reason), (7, Reason::ScaleUp), "{d:?}");

        // An ask the operator did not apply (the spec still says 4) is no
        // start time.
        let mut s = signals(35, 4.4, 0.5);
        s.prefill = Replicas {
            desired: 4,
            ready: 4,
        };
        let mut not_applied = planner.clone();
        not_applied.decide(&s);
        assert_eq!(not_applied.prefill_lead(), Some(Duration::from_secs(20)));

        // The 15 take 10 s: the lead is a running average, 15 s.
        let mut s = signals(40, 4.4, 0.5);
        s.prefill = Replicas {
            desired: 15,
            ready: 15,
        };
        planner.decide(&s);
        assert_eq!(planner.prefill_lead(), Some(Duration::from_secs(15)));
    }
}
