//! The health of each prefill → decode path, as one decode worker sees it:
//! a circuit breaker per prefill worker.
//!
//! Every remote prefill a prefill worker claimed ends in a verdict for its
//! path: the KV landed (a success, with the time from the claim to the
//! notification), or the job failed, went silent, or missed the deadline
//! with its write posted (a failure). A deadline missed while computing
//! says the prefill worker is busy, not that the path is broken: no
//! verdict. [`PathConfig::failures_to_quarantine`] failures in a row
//! quarantine the path: the decode worker declines that worker's claims
//! ([`xpyd_api::messages::ClaimReply::Decline`]), so its jobs go to
//! another prefill worker or, when every path is quarantined, stay local
//! without a round trip. When the quarantine ends the path is *probed*: a
//! one-block remote prefill sent to that worker alone (not through the
//! queue), through the whole path (claim, compute, NIXL write,
//! notification). A probe that lands restores the path; one that fails
//! quarantines it again for twice as long, up to
//! [`PathConfig::max_quarantine`].
//!
//! A dead prefill worker is not a failing path: its path is forgotten when
//! it leaves discovery. This module is the pure state machine; the I/O
//! (claims, probes, metrics) is the decode worker's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// When paths are quarantined and probed.
#[derive(Debug, Clone)]
pub struct PathConfig {
    /// Failures in a row that quarantine a path.
    pub failures_to_quarantine: u32,
    /// The first quarantine's length; each failed probe doubles it.
    pub quarantine: Duration,
    /// The longest quarantine.
    pub max_quarantine: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            failures_to_quarantine: 3,
            quarantine: Duration::from_secs(10),
            max_quarantine: Duration::from_secs(300),
        }
    }
}

/// Where a path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// Jobs may use it.
    Healthy,
    /// Its claims are declined until `until`; then it is probed.
    Quarantined { until: Instant, length: Duration },
    /// A probe is on its way; claims (but the probe's) are still declined.
    Probing { length: Duration },
}

/// A change worth an event or a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathChange {
    /// The path was quarantined (again) for this long.
    Quarantined { length: Duration, reason: String },
    /// A probe landed: the path is used again.
    Restored,
}

#[derive(Debug, Clone)]
struct Path {
    state: PathState,
    failures_in_a_row: u32,
    /// Claim to notification of its last landed remote prefill.
    last_latency: Option<Duration>,
}

/// The paths from every prefill worker to this decode worker, by prefill
/// instance id.
#[derive(Debug, Default)]
pub struct Paths {
    config: PathConfig,
    paths: HashMap<String, Path>,
}

/// One path as reported in metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PathReport {
    pub prefill: String,
    pub quarantined: bool,
    pub last_latency: Option<Duration>,
}

impl Paths {
    pub fn new(config: PathConfig) -> Paths {
        Paths {
            config,
            paths: HashMap::new(),
        }
    }

    fn path(&mut self, prefill: &str) -> &mut Path {
        self.paths.entry(prefill.to_string()).or_insert(Path {
            state: PathState::Healthy,
            failures_in_a_row: 0,
            last_latency: None,
        })
    }

    /// The state of the path from `prefill`.
    pub fn state(&self, prefill: &str) -> PathState {
        self.paths
            .get(prefill)
            .map_or(PathState::Healthy, |p| p.state)
    }

    /// Whether `prefill`'s claims of ordinary jobs are accepted.
    pub fn open(&self, prefill: &str) -> bool {
        self.state(prefill) == PathState::Healthy
    }

    /// A remote prefill from `prefill` landed, `latency` after its claim.
    pub fn succeeded(&mut self, prefill: &str, latency: Duration) -> Option<PathChange> {
        let path = self.path(prefill);
        path.failures_in_a_row = 0;
        path.last_latency = Some(latency);
        match path.state {
            PathState::Healthy => None,
            // A success while quarantined (a job claimed before) is not a
            // probe: the probe decides.
            PathState::Quarantined { .. } => None,
            PathState::Probing { .. } => {
                path.state = PathState::Healthy;
                Some(PathChange::Restored)
            }
        }
    }

    /// A remote prefill from `prefill` failed (`reason`: the fallback).
    pub fn failed(&mut self, prefill: &str, reason: &str, now: Instant) -> Option<PathChange> {
        let config = self.config.clone();
        let path = self.path(prefill);
        path.failures_in_a_row += 1;
        let length = match path.state {
            PathState::Healthy if path.failures_in_a_row >= config.failures_to_quarantine => {
                config.quarantine
            }
            PathState::Probing { length } => (length * 2).min(config.max_quarantine),
            PathState::Healthy | PathState::Quarantined { .. } => return None,
        };
        path.state = PathState::Quarantined {
            until: now + length,
            length,
        };
        Some(PathChange::Quarantined {
            length,
            reason: reason.to_string(),
        })
    }

    /// The paths whose quarantine is over at `now`: they turn to probing,
    /// and the caller probes each.
    pub fn due_probes(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        for (prefill, path) in &mut self.paths {
            if let PathState::Quarantined { until, length } = path.state
                && until <= now
            {
                path.state = PathState::Probing { length };
                due.push(prefill.clone());
            }
        }
        due.sort();
        due
    }

    /// A probe of `prefill` could not even be sent: try again after
    /// another quarantine of the same length.
    pub fn probe_not_sent(&mut self, prefill: &str, now: Instant) {
        let path = self.path(prefill);
        if let PathState::Probing { length } = path.state {
            path.state = PathState::Quarantined {
                until: now + length,
                length,
            };
        }
    }

    /// Keep only the paths of prefill workers for which `alive` holds.
    pub fn retain(&mut self, alive: impl Fn(&str) -> bool) -> Vec<String> {
        let gone: Vec<String> = self.paths.keys().filter(|p| !alive(p)).cloned().collect();
        for prefill in &gone {
            self.paths.remove(prefill);
        }
        gone
    }

    /// Every known path, sorted by prefill instance.
    pub fn report(&self) -> Vec<PathReport> {
        let mut report: Vec<PathReport> = self
            .paths
            .iter()
            .map(|(prefill, path)| PathReport {
                prefill: prefill.clone(),
                quarantined: path.state != PathState::Healthy,
                last_latency: path.last_latency,
            })
            .collect();
        report.sort_by(|a, b| a.prefill.cmp(&b.prefill));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths::new(PathConfig {
            failures_to_quarantine: 3,
            quarantine: Duration::from_secs(10),
            max_quarantine: Duration::from_secs(30),
        })
    }

    /// Quarantines `prefill`'s path with three failures at `now`.
    fn quarantine(p: &mut Paths, prefill: &str, now: Instant) {
        for _ in 0..3 {
            p.failed(prefill, "prefill_failed", now);
        }
        assert!(!p.open(prefill));
    }

    #[test]
    fn three_failures_in_a_row_quarantine_a_path_and_a_success_resets_the_count() {
        let mut p = paths();
        let now = Instant::now();
        assert_eq!(p.failed("a", "prefill_failed", now), None);
        assert_eq!(p.failed("a", "prefill_failed", now), None);
        assert_eq!(p.succeeded("a", Duration::from_millis(5)), None);
        assert_eq!(p.failed("a", "timeout", now), None);
        assert_eq!(p.failed("a", "timeout", now), None);
        assert!(p.open("a"));
        assert_eq!(
            p.failed("a", "timeout", now),
            Some(PathChange::Quarantined {
                length: Duration::from_secs(10),
                reason: "timeout".into()
            })
        );
        assert!(!p.open("a"));
        assert!(p.open("b"), "other paths are not touched");
        assert_eq!(p.failed("a", "timeout", now), None, "already quarantined");
    }

    #[test]
    fn a_quarantined_path_is_probed_when_its_time_is_up_and_restored_by_a_landed_probe() {
        let mut p = paths();
        let now = Instant::now();
        quarantine(&mut p, "a", now);
        assert!(p.due_probes(now + Duration::from_secs(9)).is_empty());
        assert_eq!(p.due_probes(now + Duration::from_secs(10)), vec!["a"]);
        assert!(
            p.due_probes(now + Duration::from_secs(11)).is_empty(),
            "probed once"
        );
        assert!(!p.open("a"), "ordinary claims wait for the probe");
        assert_eq!(
            p.succeeded("a", Duration::from_millis(3)),
            Some(PathChange::Restored)
        );
        assert!(p.open("a"));
        assert_eq!(p.report()[0].last_latency, Some(Duration::from_millis(3)));
    }

    #[test]
    fn a_failed_probe_doubles_the_quarantine_up_to_the_bound() {
        let mut p = paths();
        let mut now = Instant::now();
        quarantine(&mut p, "a", now);
        let mut lengths = Vec::new();
        for _ in 0..4 {
            now += Duration::from_secs(60);
            assert_eq!(p.due_probes(now), vec!["a"]);
            match p.failed("a", "probe_failed", now) {
                Some(PathChange::Quarantined { length, .. }) => lengths.push(length.as_secs()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(lengths, vec![20, 30, 30, 30]);
    }

    #[test]
    fn a_probe_that_was_not_sent_is_retried_after_the_same_length() {
        let mut p = paths();
        let now = Instant::now();
        quarantine(&mut p, "a", now);
        let later = now + Duration::from_secs(10);
        assert_eq!(p.due_probes(later), vec!["a"]);
        p.probe_not_sent("a", later);
        assert!(p.due_probes(later + Duration::from_secs(9)).is_empty());
        assert_eq!(p.due_probes(later + Duration::from_secs(10)), vec!["a"]);
    }

    #[test]
    fn the_paths_of_gone_prefill_workers_are_forgotten() {
        let mut p = paths();
        let now = Instant::now();
        quarantine(&mut p, "a", now);
        p.succeeded("b", Duration::from_millis(1));
        assert_eq!(p.retain(|id| id == "b"), vec!["a"]);
        assert!(p.open("a"), "a worker that comes back starts healthy");
        assert_eq!(p.report().len(), 1);
    }
}
