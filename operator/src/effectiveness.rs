//! Is disaggregation happening? The `DisaggregationEffective` condition of
//! a `DisaggDeployment` with prefill workers: of the prompts over the
//! threshold that reached its decode workers in the last window, how many
//! were prefilled remotely, and why the others were not. A deployment that
//! pays for prefill workers and silently prefills everything locally shows
//! `False` at a glance (`kubectl get dd -o wide`, `kubectl describe`), with
//! the leading local-fallback reason, and gets one Warning event when it
//! turns so. The same share drives the `XpydDisaggregationIneffective`
//! alert in `config/rules`; both use [`EFFECTIVE_SHARE`].
//!
//! The decode workers' own counters are read ([`crate::scrape`]) once per
//! [`CHECK_INTERVAL`], for every deployment, whether it autoscales or
//! not; [`window`] and [`verdict`] are pure and table-tested. The
//! transport UCX is inferred to use ([`kv_paths`]'s `transports`) is
//! named in the condition's message.
//!
//! The same scrape gives `status.kvPaths` ([`kv_paths`]): the paths from
//! prefill to decode workers that the decode workers hold healthy or
//! quarantined, and a `KvPathQuarantined` Warning event for a window in
//! which paths were quarantined.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Client;
use kube::runtime::reflector::ObjectRef;

use crate::crd::{DisaggDeployment, KvPath, KvPathsStatus};
use crate::metrics::Metrics;
use crate::resources::{Owner, Role};
use crate::scrape::Scraper;
use crate::signals::{PodScrape, increase, names};
use crate::status::{self, PlannedEvent};

/// The condition's type.
pub const CONDITION: &str = "DisaggregationEffective";
/// How often the decode workers are read, and the window judged (the
/// default of [`crate::controller::Config::disaggregation_check_interval`]).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// Below this share of eligible prompts prefilled remotely, disaggregation
/// is not effective (the alert's threshold too).
pub const EFFECTIVE_SHARE: f64 = 0.5;

/// The decode workers' counters over one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DisaggWindow {
    pub seconds: f64,
    /// Prompts prefilled remotely.
    pub remote: f64,
    /// Prompts refused for want of a prefill worker
    /// (`router.onPrefillUnavailable: fail`).
    pub refused: f64,
    /// Prompts over the threshold prefilled locally, by reason.
    pub fallbacks: BTreeMap<String, f64>,
}

impl DisaggWindow {
    /// Prompts that should have gone to a prefill worker.
    pub fn eligible(&self) -> f64 {
        self.remote + self.refused + self.fallbacks.values().sum::<f64>()
    }
}

/// The window between two scrapes of the decode workers, `seconds` apart.
pub fn window(previous: &[PodScrape], current: &[PodScrape], seconds: f64) -> DisaggWindow {
    let inc = |name: &str, label: Option<(&str, &str)>| {
        increase(previous, current, Role::Decode, name, label)
    };
    let reasons: std::collections::BTreeSet<String> = current
        .iter()
        .filter(|p| p.role == Role::Decode)
        .flat_map(|p| p.metrics.label_values(names::FALLBACKS, "reason"))
        .collect();
    DisaggWindow {
        seconds,
        remote: inc(names::PREFILLS, Some(("location", "remote"))),
        refused: inc(names::PREFILLS, Some(("location", "refused"))),
        fallbacks: reasons
            .into_iter()
            .map(|r| {
                let n = inc(names::FALLBACKS, Some(("reason", r.as_str())));
                (r, n)
            })
            .filter(|(_, n)| *n > 0.0)
            .collect(),
    }
}

/// The condition's status (`None`: `Unknown`), reason and message.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub effective: Option<bool>,
    pub reason: String,
    pub message: String,
}

/// `snake_case` to `CamelCase`, for a condition reason.
fn camel(s: &str) -> String {
    s.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// What the window says about disaggregation.
pub fn verdict(w: &DisaggWindow) -> Verdict {
    let eligible = w.eligible();
    let secs = w.seconds.round();
    if eligible <= 0.0 {
        return Verdict {
            effective: None,
            reason: "NoLongPrompts".to_string(),
            message: format!(
                "no prompt over the threshold reached a decode worker in the last {secs}s"
            ),
        };
    }
    let share = w.remote / eligible;
    let mut misses: Vec<(String, f64)> = w
        .fallbacks
        .iter()
        .map(|(r, n)| (r.clone(), *n))
        .chain((w.refused > 0.0).then(|| ("refused".to_string(), w.refused)))
        .collect();
    misses.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let listed = misses
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let summary = format!(
        "{} of {} prompts over the threshold were prefilled remotely in the last {secs}s",
        w.remote, eligible
    );
    if share >= EFFECTIVE_SHARE {
        Verdict {
            effective: Some(true),
            reason: "RemotePrefill".to_string(),
            message: if listed.is_empty() {
                summary
            } else {
                format!("{summary}; not remote: {listed}")
            },
        }
    } else {
        Verdict {
            effective: Some(false),
            reason: misses
                .first()
                .map_or_else(|| "LocalPrefill".to_string(), |(r, _)| camel(r)),
            message: format!(
                "only {summary}; not remote: {listed} (see xpyd_decode_remote_prefill_fallbacks_total)"
            ),
        }
    }
}

/// The paths the decode workers of `current` report (their
/// `xpyd_decode_path_quarantined` series), and how many quarantines the
/// window since `previous` saw.
pub fn kv_paths(previous: &[PodScrape], current: &[PodScrape]) -> KvPathsStatus {
    let mut status = KvPathsStatus {
        quarantines_last_window: increase(
            previous,
            current,
            Role::Decode,
            names::PATH_QUARANTINES,
            None,
        ) as i64,
        ..KvPathsStatus::default()
    };
    for pod in current.iter().filter(|p| p.role == Role::Decode) {
        for prefill in pod.metrics.label_values(names::PATH_QUARANTINED, "prefill") {
            let value = pod
                .metrics
                .sum(names::PATH_QUARANTINED, Some(("prefill", &prefill)));
            if value.is_some_and(|v| v > 0.0) {
                status.quarantined.push(KvPath {
                    decode: pod.pod.clone(),
                    prefill,
                });
            } else {
                status.healthy += 1;
            }
        }
        for transport in pod.metrics.label_values(names::PATH_TRANSPORT, "transport") {
            let paths = pod
                .metrics
                .sum(names::PATH_TRANSPORT, Some(("transport", &transport)))
                .unwrap_or(0.0);
            if paths > 0.0 {
                *status.transports.entry(transport).or_default() += paths as i32;
            }
        }
    }
    status
}

/// What the condition's message says of the transports, e.g. "KV moves
/// over tcp (2 paths; inferred from UCX_TLS and where the workers run)".
fn transport_note(paths: &KvPathsStatus) -> Option<String> {
    if paths.transports.is_empty() {
        return None;
    }
    let listed: Vec<String> = paths
        .transports
        .iter()
        .map(|(t, n)| format!("{t} ({n} path{})", if *n == 1 { "" } else { "s" }))
        .collect();
    Some(format!(
        "KV moves over {}, inferred from UCX_TLS and where the workers run",
        listed.join(", ")
    ))
}

/// The Warning event for a window with quarantines, naming the paths
/// quarantined now.
fn path_event(paths: &KvPathsStatus) -> Option<PlannedEvent> {
    if paths.quarantines_last_window <= 0 {
        return None;
    }
    let now = if paths.quarantined.is_empty() {
        "none is quarantined now (probed back)".to_string()
    } else {
        let listed: Vec<String> = paths
            .quarantined
            .iter()
            .map(|p| format!("{} -> {}", p.prefill, p.decode))
            .collect();
        format!("quarantined now: {}", listed.join(", "))
    };
    Some(PlannedEvent {
        type_: kube::runtime::events::EventType::Warning,
        reason: "KvPathQuarantined",
        note: format!(
            "{} prefill -> decode KV path quarantine(s) in the last window (transfers kept \
             failing; its jobs go to other prefill workers or stay local); {now}",
            paths.quarantines_last_window
        ),
    })
}

/// The last scrape of one deployment's decode workers.
struct Memory {
    at: Instant,
    scrapes: Vec<PodScrape>,
}

/// Keeps the `DisaggregationEffective` condition of every deployment.
pub struct Effectiveness {
    scraper: Scraper,
    interval: Duration,
    memory: Mutex<HashMap<ObjectRef<DisaggDeployment>, Memory>>,
}

impl Default for Effectiveness {
    fn default() -> Self {
        Effectiveness::new(CHECK_INTERVAL)
    }
}

/// What a check says to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// The condition to show (`None`: no condition, for a deployment
    /// without prefill workers).
    pub condition: Option<Condition>,
    pub event: Option<PlannedEvent>,
    /// The paths' health, when judged afresh (`None`: keep the old).
    pub kv_paths: Option<KvPathsStatus>,
    /// A `KvPathQuarantined` event, for a window with quarantines.
    pub path_event: Option<PlannedEvent>,
    /// When to look again.
    pub next: Duration,
}

impl Effectiveness {
    /// Judges each deployment once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Effectiveness {
            scraper: Scraper::default(),
            interval,
            memory: Mutex::default(),
        }
    }

    /// Forgets a deployment that is gone.
    pub fn forget(&self, dd: &ObjectRef<DisaggDeployment>) {
        crate::sync::lock(&self.memory).remove(dd);
    }

    /// The condition for `dd`: judged afresh once per interval
    /// (the old one is kept between), absent without prefill workers.
    pub async fn check(
        &self,
        client: &Client,
        metrics: &Metrics,
        dd: &DisaggDeployment,
        owner: &Owner,
        now: &Time,
    ) -> Check {
        let key = ObjectRef::from_obj(dd);
        let old: &[Condition] = dd.status.as_ref().map_or(&[], |s| &s.conditions[..]);
        let kept = old.iter().find(|c| c.type_ == CONDITION).cloned();
        if dd.spec.num_prefill <= 0 {
            self.forget(&key);
            return Check {
                condition: None,
                event: None,
                kv_paths: None,
                path_event: None,
                next: Duration::MAX,
            };
        }
        let since = crate::sync::lock(&self.memory)
            .get(&key)
            .map(|m| m.at.elapsed());
        if let Some(since) = since.filter(|s| *s < self.interval) {
            return Check {
                condition: kept,
                event: None,
                kv_paths: None,
                path_event: None,
                next: self.interval - since,
            };
        }
        let scraped = self
            .scraper
            .pods(client, metrics, owner, &[Role::Decode])
            .await;
        let at = Instant::now();
        let previous = crate::sync::lock(&self.memory).insert(
            key,
            Memory {
                at,
                scrapes: scraped.scrapes.clone(),
            },
        );
        let paths = kv_paths(
            previous.as_ref().map_or(&[], |b| &b.scrapes[..]),
            &scraped.scrapes,
        );
        let verdict = match previous {
            Some(before) => verdict(&window(
                &before.scrapes,
                &scraped.scrapes,
                at.duration_since(before.at).as_secs_f64(),
            )),
            None => Verdict {
                effective: None,
                reason: "Measuring".to_string(),
                message: format!(
                    "the decode workers' counters are read every {}s; judged after the first window",
                    self.interval.as_secs()
                ),
            },
        };
        let mut verdict = verdict;
        if let Some(note) = transport_note(&paths) {
            verdict.message = format!("{}; {note}", verdict.message);
        }
        let status = match verdict.effective {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        };
        let turned_false = status == "False" && kept.as_ref().is_none_or(|c| c.status != "False");
        let event = turned_false.then(|| PlannedEvent {
            type_: kube::runtime::events::EventType::Warning,
            reason: "DisaggregationIneffective",
            note: verdict.message.clone(),
        });
        Check {
            condition: Some(status::condition_with_status(
                old,
                CONDITION,
                status,
                &verdict.reason,
                verdict.message,
                dd.metadata.generation,
                now,
            )),
            event,
            path_event: path_event(&paths),
            kv_paths: Some(paths),
            next: self.interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::parse;

    fn decode(pod: &str, remote: u64, refused: u64, fallbacks: &[(&str, u64)]) -> PodScrape {
        let mut text = format!(
            "xpyd_decode_prefills_total{{location=\"local\"}} 1000\n\
             xpyd_decode_prefills_total{{location=\"remote\"}} {remote}\n\
             xpyd_decode_prefills_total{{location=\"refused\"}} {refused}\n"
        );
        for (reason, n) in fallbacks {
            text +=
                &format!("xpyd_decode_remote_prefill_fallbacks_total{{reason=\"{reason}\"}} {n}\n");
        }
        PodScrape {
            pod: pod.to_string(),
            role: Role::Decode,
            metrics: parse(&text).expect("valid"),
        }
    }

    /// A decode worker's path series only; every path over TCP.
    fn with_paths(pod: &str, quarantines: u64, paths: &[(&str, u8)]) -> PodScrape {
        let mut text = format!("xpyd_decode_path_quarantines_total {quarantines}\n");
        for (prefill, q) in paths {
            text += &format!("xpyd_decode_path_quarantined{{prefill=\"{prefill}\"}} {q}\n");
            text += &format!(
                "xpyd_decode_path_transport{{prefill=\"{prefill}\",transport=\"tcp\"}} 1\n"
            );
        }
        PodScrape {
            pod: pod.to_string(),
            role: Role::Decode,
            metrics: parse(&text).expect("valid"),
        }
    }

    #[test]
    fn kv_paths_lists_quarantined_paths_and_the_windows_quarantines() {
        let before = [
            with_paths("d-0", 1, &[("p-0-a", 0), ("p-1-b", 0)]),
            with_paths("d-1", 0, &[("p-0-a", 0)]),
        ];
        let after = [
            with_paths("d-0", 2, &[("p-0-a", 1), ("p-1-b", 0)]),
            with_paths("d-1", 0, &[("p-0-a", 0)]),
        ];
        let paths = kv_paths(&before, &after);
        assert_eq!(paths.healthy, 2);
        assert_eq!(
            paths.quarantined,
            vec![KvPath {
                decode: "d-0".into(),
                prefill: "p-0-a".into()
            }]
        );
        assert_eq!(paths.quarantines_last_window, 1);
        assert_eq!(paths.transports, BTreeMap::from([("tcp".to_string(), 3)]));
        assert_eq!(
            transport_note(&paths).as_deref(),
            Some("KV moves over tcp (3 paths), inferred from UCX_TLS and where the workers run")
        );
        let event = path_event(&paths).expect("an event");
        assert_eq!(event.reason, "KvPathQuarantined");
        assert!(event.note.contains("p-0-a -> d-0"), "{}", event.note);
        // Restored within the window: still told, as over.
        let restored = [
            with_paths("d-0", 2, &[("p-0-a", 0), ("p-1-b", 0)]),
            with_paths("d-1", 0, &[("p-0-a", 0)]),
        ];
        let paths = kv_paths(&before, &restored);
        assert!(paths.quarantined.is_empty());
        assert!(
            path_event(&paths)
                .unwrap()
                .note
                .contains("none is quarantined now")
        );
        // A quiet window: no event.
        assert_eq!(path_event(&kv_paths(&after, &after)), None);
    }

    #[test]
    fn the_window_counts_remote_refused_and_each_fallback_reason() {
        let before = [decode("d-0", 10, 0, &[("timeout", 1), ("queue_full", 0)])];
        let after = [decode("d-0", 14, 2, &[("timeout", 4), ("queue_full", 0)])];
        let w = window(&before, &after, 60.0);
        assert_eq!((w.remote, w.refused), (4.0, 2.0));
        assert_eq!(w.fallbacks, BTreeMap::from([("timeout".to_string(), 3.0)]));
        assert_eq!(w.eligible(), 9.0);
    }

    #[test]
    fn the_verdict_names_what_keeps_prompts_local() {
        let w = |remote: f64, fallbacks: &[(&str, f64)]| DisaggWindow {
            seconds: 60.0,
            remote,
            refused: 0.0,
            fallbacks: fallbacks.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
        };
        let cases = [
            ("idle", w(0.0, &[]), None, "NoLongPrompts"),
            ("all remote", w(30.0, &[]), Some(true), "RemotePrefill"),
            (
                "mostly remote",
                w(29.0, &[("timeout", 1.0)]),
                Some(true),
                "RemotePrefill",
            ),
            (
                "half is enough",
                w(5.0, &[("queue_full", 5.0)]),
                Some(true),
                "RemotePrefill",
            ),
            (
                "no prefill worker",
                w(2.0, &[("no_prefill_worker", 8.0), ("timeout", 1.0)]),
                Some(false),
                "NoPrefillWorker",
            ),
            (
                "all local",
                w(0.0, &[("prefill_gone", 3.0)]),
                Some(false),
                "PrefillGone",
            ),
        ];
        for (name, window, effective, reason) in cases {
            let v = verdict(&window);
            assert_eq!(
                (v.effective, v.reason.as_str()),
                (effective, reason),
                "{name}: {v:?}"
            );
        }
        let v = verdict(&w(2.0, &[("no_prefill_worker", 8.0), ("timeout", 1.0)]));
        assert_eq!(
            v.message,
            "only 2 of 11 prompts over the threshold were prefilled remotely in the last 60s; \
             not remote: no_prefill_worker 8, timeout 1 (see xpyd_decode_remote_prefill_fallbacks_total)"
        );
    }
}
