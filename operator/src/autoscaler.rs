//! The SLO planner's I/O, run by the reconciler for each `DisaggDeployment`
//! with `spec.autoscaling.enabled`, once per interval: make sure no
//! HorizontalPodAutoscaler targets the object, scrape every Ready pod's
//! `/metrics` (each scrape with a deadline), keep the workers'
//! `controller.kubernetes.io/pod-deletion-cost` current, ask the
//! [`Planner`] and say what to write: `status.autoscaling`, the new
//! counts for the spec, an event.
//!
//! The decision ([`crate::planner`]) and the signal math
//! ([`crate::signals`]) are pure; this is the thin I/O around them. The
//! controller writes what [`Autoscaler::step`] returns.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::crd::{
    AutoscalingSpec, AutoscalingStatus, DisaggDeployment, PlannedCounts, PlannerSignals, RoleStatus,
};
use crate::metrics::Metrics;
use crate::planner::{Bounds, Planner, PlannerSpec, Replicas};
use crate::resources::{Owner, Role};
use crate::scrape::{DELETION_COST_ANNOTATION, PodsScrape, Scraper};
use crate::signals::{self, PodScrape, WindowFigures};
use crate::status::PlannedEvent;

/// Field manager of the planner's spec patches.
pub const PLANNER_MANAGER: &str = "xpyd-operator-planner";

/// `status.autoscaling.reason` while the first window is being collected.
pub const COLLECTING: &str = "CollectingSignals";
/// `status.autoscaling.reason` when no frontend could be scraped over the
/// window: the planner does not decide on missing data.
pub const NO_SIGNALS: &str = "NoSignals";
/// `status.autoscaling.reason` while an HPA also targets the object.
pub const CONFLICT: &str = "AutoscalingConflict";

/// What the controller writes after one planner step.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: AutoscalingStatus,
    /// The spec's new counts, when the planner changed them.
    pub patch: Option<PlannedCounts>,
    /// To send once the status is written.
    pub event: Option<PlannedEvent>,
}

/// What a reconcile observed that a planner step needs.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub dd: &'a DisaggDeployment,
    pub owner: &'a Owner,
    /// The roles' counts from their Deployments (ready ones, for Pending).
    pub prefill: &'a RoleStatus,
    pub decode: &'a RoleStatus,
    pub now: &'a Time,
}

/// One deployment's planner and its last scrape.
struct State {
    planner: Planner,
    started: Instant,
    last_run: Instant,
    last_scrape: Option<(Instant, Vec<PodScrape>)>,
}

/// The planners of every autoscaled deployment this operator reconciles.
#[derive(Default)]
pub struct Autoscaler {
    scraper: Scraper,
    states: Mutex<HashMap<ObjectRef<DisaggDeployment>, State>>,
}

/// The planner's settings from the spec.
pub fn planner_spec(dd: &DisaggDeployment, a: &AutoscalingSpec) -> PlannerSpec {
    let bounds = |b: crate::crd::ReplicaBounds| Bounds {
        min: b.min.max(0).unsigned_abs(),
        max: b.max.max(0).unsigned_abs(),
    };
    PlannerSpec {
        ttft_p90_ms: a.ttft_p90_ms,
        itl_p90_ms: a.itl_p90_ms,
        prefill: bounds(a.prefill),
        decode: bounds(a.decode),
        scale_down_window: Duration::from_secs(
            a.scale_down_stabilization_seconds
                .max(0)
                .unsigned_abs()
                .into(),
        ),
        move_threshold: a.move_threshold,
        threshold_min: dd.spec.engine.block_size.max(0).unsigned_abs(),
        threshold_max: dd.spec.engine.max_model_len.max(0).unsigned_abs(),
    }
}

/// The counts the planner owns, as the spec has them.
pub fn current_counts(dd: &DisaggDeployment) -> PlannedCounts {
    PlannedCounts {
        num_prefill: dd.spec.num_prefill,
        num_decode: dd.spec.num_decode,
        max_local_prefill_length: dd.spec.router.max_local_prefill_length,
    }
}

fn spec_of(dd: &DisaggDeployment) -> Option<&AutoscalingSpec> {
    dd.spec.autoscaling.as_ref()
}

fn replicas(desired: i32, s: &RoleStatus) -> Replicas {
    Replicas {
        desired: desired.max(0).unsigned_abs(),
        ready: s.ready.max(0).unsigned_abs(),
    }
}

fn u32_of(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl Autoscaler {
    /// Drops the memory of a deployment that stopped autoscaling or is gone.
    pub fn forget(&self, dd: &ObjectRef<DisaggDeployment>) -> bool {
        crate::sync::lock(&self.states).remove(dd).is_some()
    }

    /// Runs one planner step for `target.dd` when its interval has passed
    /// since the last one; otherwise `None`. Returns as well when to look
    /// again.
    pub async fn step(
        &self,
        client: &Client,
        metrics: &Metrics,
        target: Target<'_>,
    ) -> (Option<Outcome>, Duration) {
        let Target { dd, owner, .. } = target;
        let Some(spec) = dd.spec.autoscaling.as_ref().filter(|a| a.enabled) else {
            return (None, Duration::MAX);
        };
        let interval = spec.interval();
        let key = ObjectRef::from_obj(dd);
        let want = planner_spec(dd, spec);
        // Taken out while it runs (one reconcile per object at a time);
        // put back at the end.
        let taken = crate::sync::lock(&self.states).remove(&key);
        let mut state = match taken {
            Some(s) if s.planner.spec() == &want => {
                let since = s.last_run.elapsed();
                if since < interval {
                    crate::sync::lock(&self.states).insert(key, s);
                    return (None, interval - since);
                }
                s
            }
            // New, or the spec changed: a fresh planner, the last scrape kept.
            other => State {
                planner: Planner::new(want),
                started: Instant::now(),
                last_run: Instant::now(),
                last_scrape: other.and_then(|s| s.last_scrape),
            },
        };
        state.last_run = Instant::now();
        let outcome = self.run(client, metrics, target, &mut state).await;
        crate::sync::lock(&self.states).insert(key, state);
        metrics.observe_planner(&owner.namespace, &owner.name, &outcome.status);
        (Some(outcome), interval)
    }

    async fn run(
        &self,
        client: &Client,
        metrics: &Metrics,
        target: Target<'_>,
        state: &mut State,
    ) -> Outcome {
        let Target {
            dd,
            owner,
            prefill,
            decode,
            now,
        } = target;
        let current = current_counts(dd);
        let old = dd.status.as_ref().and_then(|s| s.autoscaling.as_ref());
        let quiet = |reason: &str, message: String, signals: PlannerSignals| AutoscalingStatus {
            desired: current.clone(),
            current: current.clone(),
            reason: reason.to_string(),
            message,
            signals,
            last_decision_time: Some(now.clone()),
        };

        if let Some(hpa) = hpa_targeting(client, owner).await {
            let message = format!(
                "HorizontalPodAutoscaler {hpa} targets this DisaggDeployment while spec.autoscaling is enabled; the planner leaves numPrefill and numDecode alone until one of the two is removed"
            );
            let event = (old.map(|o| o.reason.as_str()) != Some(CONFLICT)).then(|| PlannedEvent {
                type_: EventType::Warning,
                reason: CONFLICT,
                note: message.clone(),
            });
            return Outcome {
                status: quiet(CONFLICT, message, PlannerSignals::default()),
                patch: None,
                event,
            };
        }

        let PodsScrape {
            scrapes,
            costs,
            failed,
        } = self
            .scraper
            .pods(
                client,
                metrics,
                owner,
                &[Role::Frontend, Role::Prefill, Role::Decode],
            )
            .await;
        update_deletion_costs(client, owner, &scrapes, &costs).await;
        let scraped: i32 = scrapes.len().try_into().unwrap_or(i32::MAX);
        let taken_at = Instant::now();
        let previous = state.last_scrape.replace((taken_at, scrapes));
        let capacity = spec_of(dd).and_then(|a| a.capacity.clone());
        let context = signals::Context {
            at: taken_at - state.started,
            prefill: replicas(dd.spec.num_prefill, prefill),
            decode: replicas(dd.spec.num_decode, decode),
            threshold: dd
                .spec
                .router
                .max_local_prefill_length
                .max(0)
                .unsigned_abs(),
            prefill_capacity_per_worker: capacity
                .as_ref()
                .and_then(|c| c.prefill_tokens_per_second)
                .unwrap_or(0.0),
            decode_capacity_per_worker: capacity
                .as_ref()
                .and_then(|c| c.decode_tokens_per_second)
                .unwrap_or(0.0),
        };
        let Some((then, before)) = previous else {
            let interval = spec_of(dd).map_or(0, |a| a.interval().as_secs());
            return Outcome {
                status: quiet(
                    COLLECTING,
                    format!(
                        "first scrape taken; the planner decides once a window of {interval}s has passed"
                    ),
                    status_signals(
                        &WindowFigures::default(),
                        &context,
                        scraped,
                        failed,
                        state.planner.prefill_lead(),
                    ),
                ),
                patch: None,
                event: None,
            };
        };
        let now_scrapes = state.last_scrape.as_ref().map_or(&[][..], |s| &s.1[..]);
        let figures = signals::figures(&before, now_scrapes, taken_at - then);
        if figures.frontends == 0 {
            // Silence is not idleness: deciding on it would scale in.
            return Outcome {
                status: quiet(
                    NO_SIGNALS,
                    format!(
                        "no frontend pod answered on /metrics at both ends of the window ({failed} scrapes failed); nothing changed"
                    ),
                    status_signals(
                        &figures,
                        &context,
                        scraped,
                        failed,
                        state.planner.prefill_lead(),
                    ),
                ),
                patch: None,
                event: None,
            };
        }
        let planner_input = signals::planner_signals(&figures, &context);
        let decision = state.planner.decide(&planner_input);
        let desired = PlannedCounts {
            num_prefill: u32_of(decision.num_prefill),
            num_decode: u32_of(decision.num_decode),
            max_local_prefill_length: u32_of(decision.threshold),
        };
        let status = AutoscalingStatus {
            desired: desired.clone(),
            current: current.clone(),
            reason: decision.reason.as_str().to_string(),
            message: decision.message.clone(),
            signals: status_signals(
                &figures,
                &context,
                scraped,
                failed,
                state.planner.prefill_lead(),
            ),
            last_decision_time: Some(now.clone()),
        };
        let changed = desired != current;
        let event = changed.then(|| PlannedEvent {
            type_: EventType::Normal,
            reason: decision.reason.as_str(),
            note: format!(
                "numPrefill {} -> {}, numDecode {} -> {}, maxLocalPrefillLength {} -> {}: {}",
                current.num_prefill,
                desired.num_prefill,
                current.num_decode,
                desired.num_decode,
                current.max_local_prefill_length,
                desired.max_local_prefill_length,
                decision.message
            ),
        });
        Outcome {
            status,
            patch: changed.then_some(desired),
            event,
        }
    }
}

fn status_signals(
    f: &WindowFigures,
    c: &signals::Context,
    scraped: i32,
    failed: i32,
    prefill_lead: Option<Duration>,
) -> PlannerSignals {
    // Rounded so a status write is not made of float noise.
    let r = |v: f64| (v * 1000.0).round() / 1000.0;
    PlannerSignals {
        requests_per_second: r(f.requests_per_s),
        prefill_tokens_per_second: r(f.prefill_tokens_per_s),
        output_tokens_per_request: r(f.output_tokens_per_request),
        kv_use: r(f.kv_use),
        prefill_queue_depth: r(f.prefill_queue_depth),
        ttft_p90_ms: f.ttft_p90_ms.map(r),
        itl_p90_ms: f.itl_p90_ms.map(r),
        prefill_capacity_measured: f.prefill_capacity_measured.map(r),
        prefill_pending: u32_of(c.prefill.pending()),
        decode_pending: u32_of(c.decode.pending()),
        prefill_lead_seconds: prefill_lead.map(|l| r(l.as_secs_f64())),
        scraped_pods: scraped,
        failed_scrapes: failed,
    }
}

/// The name of an HPA in the deployment's namespace whose scale target is
/// this `DisaggDeployment`; none when there is none or they cannot be
/// listed (logged: the chart grants the right).
async fn hpa_targeting(client: &Client, owner: &Owner) -> Option<String> {
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &owner.namespace);
    match hpas.list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .find(|h| {
                let target = &h.spec.scale_target_ref;
                target.kind == "DisaggDeployment" && target.name == owner.name
            })
            .map(|h| h.name_any()),
        Err(e) => {
            tracing::warn!(error = %e, name = %owner.name, "listing HorizontalPodAutoscalers");
            None
        }
    }
}

/// Sets each scraped worker's deletion cost to the work it holds, where
/// it changed (`costs`: what the pods carry now). A pod not scraped keeps
/// what it had.
async fn update_deletion_costs(
    client: &Client,
    owner: &Owner,
    scrapes: &[PodScrape],
    costs: &HashMap<String, String>,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &owner.namespace);
    let patches = scrapes
        .iter()
        .filter(|s| s.role != Role::Frontend)
        .filter_map(|s| {
            let cost = signals::deletion_cost(signals::in_flight(&s.metrics)?).to_string();
            (costs.get(&s.pod) != Some(&cost)).then(|| (s.pod.clone(), cost))
        })
        .map(|(pod, cost)| {
            let pods = pods.clone();
            async move {
                let patch = json!({"metadata": {"annotations": {DELETION_COST_ANNOTATION: cost}}});
                if let Err(e) = pods
                    .patch(&pod, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::warn!(%pod, error = %e, "could not set the pod-deletion cost");
                }
            }
        });
    join_all(patches).await;
}

/// Writes the planner's counts into the spec (a merge patch: the planner
/// owns these fields while autoscaling is enabled).
pub async fn patch_spec(
    client: &Client,
    owner: &Owner,
    counts: &PlannedCounts,
) -> Result<(), kube::Error> {
    let api: Api<DisaggDeployment> = Api::namespaced(client.clone(), &owner.namespace);
    let patch = json!({"spec": {
        "numPrefill": counts.num_prefill,
        "numDecode": counts.num_decode,
        "router": {"maxLocalPrefillLength": counts.max_local_prefill_length},
    }});
    let params = PatchParams {
        field_manager: Some(PLANNER_MANAGER.to_string()),
        ..PatchParams::default()
    };
    api.patch(&owner.name, &params, &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
