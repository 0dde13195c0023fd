//! The reconciler's decisions: a `DisaggDeployment`'s status, conditions,
//! events and next requeue, computed from what one reconcile observed.
//!
//! Pure functions, no I/O and no clock (the caller passes `now`), so every
//! case is a table test: [`crate::controller`] observes (applies the
//! children, reads etcd, lists pods), calls [`decide`], writes the status,
//! and sends the events only once the status is written, so that a failed
//! write does not announce twice what the next reconcile announces again.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;

use crate::crd::{DisaggDeploymentStatus, RoleAcks, RoleStatus, RouterStatus};
use crate::pod_status::PodProblem;

/// Requeue while routers have not all acknowledged the settings.
pub const ACK_POLL: Duration = Duration::from_secs(5);
/// Requeue while pods are not ready, to notice why (no watch sees pods).
pub const POD_POLL: Duration = Duration::from_secs(10);
/// Requeue of a settled CR, to notice drift the watches cannot see (etcd).
pub const RESYNC: Duration = Duration::from_secs(300);

/// The router settings as found in etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingsSeen {
    /// The CR generation of the settings now in etcd.
    pub generation: i64,
    /// Whether this reconcile wrote them.
    pub written: bool,
    /// Instances that acknowledged that generation, by role.
    pub acks: RoleAcks,
}

/// What one reconcile observed after applying the child objects.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// The CR's `metadata.generation`.
    pub generation: Option<i64>,
    /// Its status as last written; `None` before the first reconcile.
    pub old: Option<&'a DisaggDeploymentStatus>,
    /// `spec.numPrefill` and `spec.numDecode`, for the creation event.
    pub num_prefill: i32,
    pub num_decode: i32,
    pub frontend: RoleStatus,
    pub prefill: RoleStatus,
    pub decode: RoleStatus,
    /// The decode workers' label selector (the scale subresource's).
    pub decode_selector: String,
    /// The etcd key of the router settings.
    pub settings_key: String,
    /// The router settings in etcd, or why etcd could not be used.
    pub settings: Result<SettingsSeen, String>,
    /// Why pods are not coming up, looked for only while some role is not
    /// converged ([`all_converged`]).
    pub pod_problem: Option<PodProblem>,
}

/// An event to send once the status is written.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEvent {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

impl PlannedEvent {
    fn normal(reason: &'static str, note: String) -> PlannedEvent {
        PlannedEvent {
            type_: EventType::Normal,
            reason,
            note,
        }
    }

    fn warning(reason: &'static str, note: String) -> PlannedEvent {
        PlannedEvent {
            type_: EventType::Warning,
            reason,
            note,
        }
    }
}

/// What to write and say after one reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: DisaggDeploymentStatus,
    /// In the order to send them.
    pub events: Vec<PlannedEvent>,
    /// When to look again if etcd answered (an etcd error is retried with
    /// the error policy's backoff instead).
    pub requeue: Duration,
}

/// A role's counts from its Deployment as the API server returned it.
pub fn role_status(desired: i32, deployment: Option<&Deployment>) -> RoleStatus {
    let mut status = RoleStatus {
        desired,
        ..RoleStatus::default()
    };
    let Some(d) = deployment else {
        return status;
    };
    let fresh = d
        .status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .is_some_and(|g| Some(g) >= d.metadata.generation);
    if let Some(s) = d.status.as_ref() {
        status.replicas = s.replicas.unwrap_or(0);
        status.ready = s.ready_replicas.unwrap_or(0);
        // Counts of an older template say nothing about this one.
        status.updated = if fresh {
            s.updated_replicas.unwrap_or(0)
        } else {
            0
        };
    }
    status
}

pub fn converged(s: &RoleStatus) -> bool {
    s.ready >= s.desired && s.updated >= s.desired && s.replicas == s.desired
}

/// Whether every role runs its desired replicas of the current spec.
pub fn all_converged(roles: [&RoleStatus; 3]) -> bool {
    roles.into_iter().all(converged)
}

/// Builds a condition, keeping the old transition time when the status did
/// not change (`now` otherwise).
pub fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    condition_with_status(old, type_, status, reason, message, generation, now)
}

/// [`condition`] with any status (`True`, `False` or `Unknown`).
pub fn condition_with_status(
    old: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = status.to_string();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// `Degraded` from what is wrong: etcd (the operator's own path) first,
/// then the pods; every problem's message is kept.
pub fn degraded_condition(
    etcd_error: Option<String>,
    pods: Option<&PodProblem>,
) -> (bool, &'static str, String) {
    match (etcd_error, pods) {
        (None, None) => (
            false,
            "AsExpected",
            "etcd reachable, router settings applied".to_string(),
        ),
        (Some(e), None) => (true, "EtcdUnavailable", e),
        (None, Some(p)) => (true, p.reason, p.message.clone()),
        (Some(e), Some(p)) => (true, "EtcdUnavailable", format!("{e}; {}", p.message)),
    }
}

fn is_reason(conditions: &[Condition], type_: &str, reason: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True" && c.reason == reason)
}

/// The status, events and requeue after a reconcile that applied every
/// child object.
pub fn decide(o: &Observed<'_>, now: &Time) -> Decision {
    let default = DisaggDeploymentStatus::default();
    let old = o.old.unwrap_or(&default);
    let (frontend, prefill, decode) = (&o.frontend, &o.prefill, &o.decode);
    let pods_ready = all_converged([frontend, prefill, decode]);
    let router = match &o.settings {
        Ok(seen) => RouterStatus {
            key: o.settings_key.clone(),
            settings_generation: seen.generation,
            acknowledged: seen.acks.frontend,
            acknowledged_by_role: seen.acks.clone(),
        },
        // Unknown while etcd is away: keep what was last seen.
        Err(_) => old.router.clone(),
    };

    let (degraded, degraded_reason, degraded_message) =
        degraded_condition(o.settings.clone().err(), o.pod_problem.as_ref());
    let lagging: Vec<String> = [
        ("frontend", frontend),
        ("prefill", prefill),
        ("decode", decode),
    ]
    .into_iter()
    .filter(|(_, s)| !converged(s))
    .map(|(n, s)| format!("{n} {}/{} ready, {} updated", s.ready, s.desired, s.updated))
    .collect();
    let (ready, ready_reason, ready_message) = if !pods_ready {
        let mut message = lagging.join("; ");
        if let Some(problem) = &o.pod_problem {
            message = format!("{message}; {}", problem.message);
        }
        (false, "ReplicasNotReady", message)
    } else if degraded {
        (
            false,
            "EtcdUnavailable",
            "router settings cannot be applied while etcd is unreachable".to_string(),
        )
    } else {
        (
            true,
            "AllReplicasReady",
            "all roles ready with the current spec".to_string(),
        )
    };
    let (progressing, progressing_reason, progressing_message) = if pods_ready {
        (
            false,
            "RolloutComplete",
            "every role runs the current spec".to_string(),
        )
    } else {
        (true, "RollingOut", lagging.join("; "))
    };
    let condition = |type_, status, reason, message| {
        condition(
            &old.conditions,
            type_,
            status,
            reason,
            message,
            o.generation,
            now,
        )
    };
    let conditions = vec![
        condition("Ready", ready, ready_reason, ready_message),
        condition(
            "Progressing",
            progressing,
            progressing_reason,
            progressing_message,
        ),
        condition("Degraded", degraded, degraded_reason, degraded_message),
    ];
    let status = DisaggDeploymentStatus {
        observed_generation: o.generation,
        conditions,
        prefill_ready: format!("{}/{}", prefill.ready, prefill.desired),
        decode_ready: format!("{}/{}", decode.ready, decode.desired),
        decode_selector: o.decode_selector.clone(),
        prefill: prefill.clone(),
        decode: decode.clone(),
        frontend: frontend.clone(),
        router,
        // The planner's own part, written by the controller after it.
        autoscaling: old.autoscaling.clone(),
        // The decode workers' report, read by the effectiveness check.
        kv_paths: old.kv_paths.clone(),
    };

    let requeue = if status.router.acknowledged < status.frontend.ready {
        ACK_POLL
    } else if !pods_ready {
        POD_POLL
    } else {
        RESYNC
    };
    Decision {
        events: events(o, old, &status),
        status,
        requeue,
    }
}

/// Events for what a user would want to see in `kubectl describe`: the
/// creation, scaling, and transitions of a problem's reason (not every
/// reconcile that still sees it).
fn events(
    o: &Observed<'_>,
    old: &DisaggDeploymentStatus,
    status: &DisaggDeploymentStatus,
) -> Vec<PlannedEvent> {
    let mut events = Vec::new();
    if o.old.is_none() {
        events.push(PlannedEvent::normal(
            "Created",
            format!(
                "created frontend, {} prefill and {} decode workers",
                o.num_prefill, o.num_decode
            ),
        ));
    } else {
        for (role, before, after) in [
            ("prefill", old.prefill.desired, status.prefill.desired),
            ("decode", old.decode.desired, status.decode.desired),
            ("frontend", old.frontend.desired, status.frontend.desired),
        ] {
            if before != after {
                events.push(PlannedEvent::normal(
                    "Scaled",
                    format!("{role} scaled from {before} to {after}"),
                ));
            }
        }
    }
    let etcd_was_down = is_reason(&old.conditions, "Degraded", "EtcdUnavailable");
    if let Some(problem) = &o.pod_problem
        && !is_reason(&old.conditions, "Degraded", problem.reason)
    {
        events.push(PlannedEvent::warning(
            problem.reason,
            problem.message.clone(),
        ));
    }
    match &o.settings {
        Ok(seen) if seen.written => events.push(PlannedEvent::normal(
            "RouterSettingsApplied",
            format!(
                "router settings of generation {} written to etcd key {}",
                seen.generation, o.settings_key
            ),
        )),
        Ok(_) if etcd_was_down => events.push(PlannedEvent::normal(
            "EtcdRecovered",
            "etcd is reachable again".to_string(),
        )),
        Err(e) if !etcd_was_down => {
            events.push(PlannedEvent::warning("EtcdUnavailable", e.clone()));
        }
        _ => {}
    }
    events
}

/// The status after a failed apply of the child objects (quota, admission
/// webhook…): `Degraded` with reason `ApplyFailed`, everything else as it
/// was; and the event to send once it is written, unless the last status
/// already said so.
pub fn apply_failed(
    old: &DisaggDeploymentStatus,
    generation: Option<i64>,
    error: &str,
    now: &Time,
) -> (DisaggDeploymentStatus, Option<PlannedEvent>) {
    let message = format!("applying child objects failed: {error}");
    let mut status = old.clone();
    let degraded = condition(
        &old.conditions,
        "Degraded",
        true,
        "ApplyFailed",
        message.clone(),
        generation,
        now,
    );
    status.conditions.retain(|c| c.type_ != "Degraded");
    status.conditions.push(degraded);
    let already = is_reason(&old.conditions, "Degraded", "ApplyFailed");
    let event = (!already).then(|| PlannedEvent::warning("ApplyFailed", message));
    (status, event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod_status;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::now())
    }

    #[test]
    fn a_role_is_converged_only_with_all_replicas_ready_and_updated() {
        let done = RoleStatus {
            desired: 2,
            replicas: 2,
            ready: 2,
            updated: 2,
        };
        assert!(converged(&done));
        assert!(!converged(&RoleStatus {
            ready: 1,
            ..done.clone()
        }));
        assert!(!converged(&RoleStatus {
            updated: 1,
            ..done.clone()
        }));
        // An old pod still terminating after a scale-down.
        assert!(!converged(&RoleStatus {
            replicas: 3,
            ..done
        }));
    }

    #[test]
    fn degraded_names_every_problem_etcd_first() {
        let pull = PodProblem {
            reason: pod_status::IMAGE_PULL_FAILED,
            message: "pod a: image x cannot be pulled".into(),
        };
        assert!(!degraded_condition(None, None).0);
        assert_eq!(
            degraded_condition(None, Some(&pull)),
            (
                true,
                "ImagePullFailed",
                "pod a: image x cannot be pulled".into()
            )
        );
        assert_eq!(
            degraded_condition(Some("etcd down".into()), Some(&pull)),
            (
                true,
                "EtcdUnavailable",
                "etcd down; pod a: image x cannot be pulled".into()
            )
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let first = condition(&[], "Ready", false, "R", "m".into(), Some(1), &now());
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(4_000_000_000).unwrap());
        let again = condition(
            std::slice::from_ref(&first),
            "Ready",
            false,
            "R2",
            "m2".into(),
            Some(2),
            &later,
        );
        assert_eq!(first.last_transition_time, again.last_transition_time);
        let flipped = condition(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "R",
            "m".into(),
            Some(2),
            &later,
        );
        assert_eq!(flipped.status, "True");
        assert_eq!(flipped.last_transition_time, later);
    }

    fn role(desired: i32, ready: i32) -> RoleStatus {
        RoleStatus {
            desired,
            replicas: desired,
            ready,
            updated: ready,
        }
    }

    fn seen(generation: i64, written: bool, frontends: i32) -> Result<SettingsSeen, String> {
        Ok(SettingsSeen {
            generation,
            written,
            acks: RoleAcks {
                frontend: frontends,
                prefill: 0,
                decode: 0,
            },
        })
    }

    fn observed(old: Option<&DisaggDeploymentStatus>) -> Observed<'_> {
        Observed {
            generation: Some(2),
            old,
            num_prefill: 1,
            num_decode: 2,
            frontend: role(1, 1),
            prefill: role(1, 1),
            decode: role(2, 2),
            decode_selector: "xpyd.dev/role=decode".into(),
            settings_key: "/xpyd/ns/dd/router-settings".into(),
            settings: seen(2, false, 1),
            pod_problem: None,
        }
    }

    fn reason_of(status: &DisaggDeploymentStatus, type_: &str) -> (String, String) {
        let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    fn settled() -> DisaggDeploymentStatus {
        decide(&observed(None), &now()).status
    }

    #[test]
    fn the_status_conditions_events_and_requeue_follow_what_was_observed() {
        let settled = settled();
        let mut etcd_down = settled.clone();
        etcd_down.conditions = decide(
            &Observed {
                settings: Err("etcd down".into()),
                ..observed(Some(&settled))
            },
            &now(),
        )
        .status
        .conditions;
        let pull = PodProblem {
            reason: pod_status::IMAGE_PULL_FAILED,
            message: "pod a: image x cannot be pulled".into(),
        };
        type Case<'a> = (
            &'a str,
            Observed<'a>,
            [(&'a str, &'a str); 3],
            &'a [&'a str],
            Duration,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "first reconcile, all ready, settings written",
                Observed {
                    settings: seen(2, true, 1),
                    ..observed(None)
                },
                [
                    ("True", "AllReplicasReady"),
                    ("False", "RolloutComplete"),
                    ("False", "AsExpected"),
                ],
                &["Created", "RouterSettingsApplied"],
                RESYNC,
            ),
            (
                "nothing changed",
                observed(Some(&settled)),
                [
                    ("True", "AllReplicasReady"),
                    ("False", "RolloutComplete"),
                    ("False", "AsExpected"),
                ],
                &[],
                RESYNC,
            ),
            (
                "scaled up, new pods not ready",
                Observed {
                    decode: role(3, 2),
                    ..observed(Some(&settled))
                },
                [
                    ("False", "ReplicasNotReady"),
                    ("True", "RollingOut"),
                    ("False", "AsExpected"),
                ],
                &["Scaled"],
                POD_POLL,
            ),
            (
                "an image cannot be pulled",
                Observed {
                    decode: role(2, 1),
                    pod_problem: Some(pull.clone()),
                    ..observed(Some(&settled))
                },
                [
                    ("False", "ReplicasNotReady"),
                    ("True", "RollingOut"),
                    ("True", "ImagePullFailed"),
                ],
                &["ImagePullFailed"],
                POD_POLL,
            ),
            (
                "etcd goes away",
                Observed {
                    settings: Err("etcd down".into()),
                    ..observed(Some(&settled))
                },
                [
                    ("False", "EtcdUnavailable"),
                    ("False", "RolloutComplete"),
                    ("True", "EtcdUnavailable"),
                ],
                &["EtcdUnavailable"],
                RESYNC,
            ),
            (
                "etcd still away: no second event",
                Observed {
                    settings: Err("etcd down".into()),
                    ..observed(Some(&etcd_down))
                },
                [
                    ("False", "EtcdUnavailable"),
                    ("False", "RolloutComplete"),
                    ("True", "EtcdUnavailable"),
                ],
                &[],
                RESYNC,
            ),
            (
                "etcd is back",
                observed(Some(&etcd_down)),
                [
                    ("True", "AllReplicasReady"),
                    ("False", "RolloutComplete"),
                    ("False", "AsExpected"),
                ],
                &["EtcdRecovered"],
                RESYNC,
            ),
            (
                "a router has not acknowledged yet",
                Observed {
                    settings: seen(2, false, 0),
                    ..observed(Some(&settled))
                },
                [
                    ("True", "AllReplicasReady"),
                    ("False", "RolloutComplete"),
                    ("False", "AsExpected"),
                ],
                &[],
                ACK_POLL,
            ),
        ];
        for (name, o, conditions, events, requeue) in cases {
            let d = decide(&o, &now());
            let got: Vec<(String, String)> = ["Ready", "Progressing", "Degraded"]
                .iter()
                .map(|t| reason_of(&d.status, t))
                .collect();
            let want: Vec<(String, String)> = conditions
                .iter()
                .map(|(s, r)| (s.to_string(), r.to_string()))
                .collect();
            assert_eq!(got, want, "{name}: conditions");
            let reasons: Vec<&str> = d.events.iter().map(|e| e.reason).collect();
            assert_eq!(reasons, events, "{name}: events");
            assert_eq!(d.requeue, requeue, "{name}: requeue");
        }
    }

    #[test]
    fn the_status_counts_and_router_come_from_the_observation() {
        let d = decide(
            &Observed {
                decode: role(3, 2),
                settings: seen(7, true, 1),
                ..observed(None)
            },
            &now(),
        );
        assert_eq!(d.status.observed_generation, Some(2));
        assert_eq!(d.status.decode_ready, "2/3");
        assert_eq!(d.status.prefill_ready, "1/1");
        assert_eq!(d.status.decode_selector, "xpyd.dev/role=decode");
        assert_eq!(d.status.router.settings_generation, 7);
        assert_eq!(d.status.router.key, "/xpyd/ns/dd/router-settings");
        assert_eq!(
            d.events[0].note,
            "created frontend, 1 prefill and 2 decode workers"
        );
        // etcd away: the router part is what was last seen.
        let d2 = decide(
            &Observed {
                settings: Err("down".into()),
                ..observed(Some(&d.status))
            },
            &now(),
        );
        assert_eq!(d2.status.router, d.status.router);
    }

    #[test]
    fn a_failed_apply_is_degraded_and_announced_once() {
        let settled = settled();
        let (status, event) = apply_failed(&settled, Some(3), "quota", &now());
        assert_eq!(
            reason_of(&status, "Degraded"),
            ("True".into(), "ApplyFailed".into())
        );
        assert_eq!(
            reason_of(&status, "Ready"),
            reason_of(&settled, "Ready"),
            "the rest is kept"
        );
        let event = event.expect("an event the first time");
        assert_eq!(event.type_, EventType::Warning);
        assert_eq!(event.note, "applying child objects failed: quota");
        let (_, again) = apply_failed(&status, Some(3), "quota", &now());
        assert_eq!(again, None);
    }
}
