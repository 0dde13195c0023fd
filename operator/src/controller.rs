//! The reconciler: turns each `DisaggDeployment` into its child objects,
//! mirrors its router settings into etcd, and reports what it sees in the
//! CR's status.
//!
//! Level-triggered and idempotent: every reconcile server-side-applies the
//! whole desired state with one field manager, whatever triggered it. A
//! finalizer removes the operator's etcd keys before the CR goes; the
//! children go by owner-reference garbage collection. An etcd outage marks
//! the CR `Degraded` and retries with backoff; the Kubernetes side keeps
//! being reconciled meanwhile. While a role is not ready the reconciler
//! lists the deployment's pods and reports an image that cannot be pulled or
//! a model that cannot be fetched in `Degraded` ([`crate::pod_status`]),
//! polling until the pods come up (pods are owned through ReplicaSets, so
//! no owner watch sees them). Not here: leader election and the HTTP server
//! (see [`crate::leader`], [`crate::metrics`]), object builders
//! ([`crate::resources`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use xpyd_api::Scope;

use crate::crd::{DisaggDeployment, DisaggDeploymentStatus, RoleAcks, RoleStatus, RouterStatus};
use crate::metrics::Metrics;
use crate::pod_status::{self, PodProblem};
use crate::resources::{
    self, BuildError, ClusterSettings, DEPLOYMENT_LABEL, MANAGED_BY, Owner, Role,
};
use crate::router_settings::{EtcdClients, EtcdError, router_settings};

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "xpyd-operator";
/// Finalizer guarding the operator's etcd keys.
pub const FINALIZER: &str = "xpyd.dev/etcd-cleanup";
/// Annotation that lets a CR be deleted without cleaning etcd (for an etcd
/// that is gone for good).
pub const SKIP_CLEANUP_ANNOTATION: &str = "xpyd.dev/skip-etcd-cleanup";

/// Requeue while routers have not all acknowledged the settings.
const ACK_POLL: Duration = Duration::from_secs(5);
/// Requeue while pods are not ready, to notice why (no watch sees pods).
const POD_POLL: Duration = Duration::from_secs(10);
/// Requeue of a settled CR, to notice drift the watches cannot see (etcd).
const RESYNC: Duration = Duration::from_secs(300);
/// Quiet time before a triggered reconcile runs.
const DEBOUNCE: Duration = Duration::from_millis(500);
/// Longest backoff after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CR lacks metadata the API server always sets.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// etcd could not be reached or refused a call.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Build(_) => "build",
            Error::Kube(_) => "kube",
            Error::Etcd(_) => "etcd",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

fn from_finalizer(e: kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as F;
    match e {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    }
}

/// What the controller runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    /// Reconciles running at once (0: unbounded).
    pub concurrency: u16,
    /// Name of this process in events (`reportingInstance`).
    pub instance: String,
    /// Where reconciles are counted.
    pub metrics: Metrics,
    /// What every pod gets from the installation (the chart's values).
    pub cluster: ClusterSettings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: None,
            concurrency: 16,
            instance: "xpyd-operator".to_string(),
            metrics: Metrics::new(),
            cluster: ClusterSettings::default(),
        }
    }
}

/// State shared by all reconciles.
pub struct Context {
    client: Client,
    etcd: EtcdClients,
    metrics: Metrics,
    recorder: Recorder,
    cluster: ClusterSettings,
    failures: Mutex<HashMap<ObjectRef<DisaggDeployment>, u32>>,
}

impl Context {
    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<DisaggDeployment>, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn publish(&self, dd: &DisaggDeployment, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &dd.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not record event");
        }
    }
}

/// Runs the controller until `shutdown` completes, then lets in-flight
/// reconciles finish.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (dds, deployments, services, ingresses) = match &config.namespace {
        Some(ns) => (
            Api::<DisaggDeployment>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<Ingress>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_string(),
        instance: Some(config.instance.clone()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        etcd: EtcdClients::default(),
        metrics: config.metrics.clone(),
        cluster: config.cluster.clone(),
        failures: Mutex::default(),
    });
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    Controller::new(dds, watcher::Config::default().any_semantic())
        .owns(deployments, owned.clone())
        .owns(services, owned.clone())
        .owns(ingresses, owned)
        .with_config(
            ControllerConfig::default()
                .concurrency(config.concurrency)
                // A rollout sends a burst of Deployment status updates;
                // one reconcile per burst is enough.
                .debounce(DEBOUNCE),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// Reconciles one CR: cleanup when it is being deleted, apply otherwise.
pub async fn reconcile(dd: Arc<DisaggDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let namespace = dd
        .namespace()
        .ok_or(BuildError::MissingMetadata("namespace"))?;
    let api: Api<DisaggDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let object = ObjectRef::from_obj(&*dd);
    let result = finalizer(&api, FINALIZER, dd, |event| async {
        match event {
            FinalizerEvent::Apply(dd) => apply(&dd, &ctx).await,
            FinalizerEvent::Cleanup(dd) => cleanup(&dd, &ctx).await,
        }
    })
    .await
    .map_err(from_finalizer);
    ctx.metrics
        .observe(start.elapsed(), result.as_ref().err().map(Error::kind));
    if result.is_ok() {
        ctx.failures().remove(&object);
    }
    result
}

/// Backs off exponentially per object: 1 s, 2 s, 4 s … up to 30 s.
pub fn error_policy(dd: Arc<DisaggDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let object = ObjectRef::from_obj(&*dd);
    let mut failures = ctx.failures();
    let n = failures.entry(object.clone()).or_insert(0);
    *n = n.saturating_add(1);
    let delay = Duration::from_secs(1u64 << (*n - 1).min(5)).min(MAX_BACKOFF);
    tracing::warn!(object = %object, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn apply_child<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(obj)).await
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource + DeserializeOwned + Clone + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

fn role_status(desired: i32, deployment: Option<&Deployment>) -> RoleStatus {
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

fn converged(s: &RoleStatus) -> bool {
    s.ready >= s.desired && s.updated >= s.desired && s.replicas == s.desired
}

/// Builds a condition, keeping the old transition time when the status did
/// not change.
fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Server-side-applies every child object (and removes those the spec no
/// longer asks for); returns each role's replica counts.
async fn apply_children(
    dd: &DisaggDeployment,
    owner: &Owner,
    ctx: &Context,
    spec_changed: bool,
) -> Result<HashMap<Role, RoleStatus>, kube::Error> {
    let spec = &dd.spec;
    let ns = &owner.namespace;
    let client = &ctx.client;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut roles = HashMap::new();
    for role in Role::ALL {
        let name = owner.child_name(role);
        let desired = resources::desired_replicas(spec, role);
        if role == Role::Prefill && desired == 0 {
            // Aggregated serving: no prefill workers at all.
            let removed = spec_changed && delete_if_present(&deployments, &name).await?;
            if spec_changed {
                delete_if_present(&services, &name).await?;
            }
            if removed {
                ctx.publish(dd, EventType::Normal, "Aggregated", "numPrefill is 0: removed the prefill Deployment; decode workers prefill locally".to_string()).await;
            }
            roles.insert(role, role_status(0, None));
            continue;
        }
        let svc = resources::service(owner, spec, role);
        apply_child(&services, &name, &svc).await?;
        let want = resources::deployment(owner, spec, role, &ctx.cluster);
        let got = apply_child(&deployments, &name, &want).await?;
        roles.insert(role, role_status(desired, Some(&got)));
    }

    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), ns);
    match resources::ingress(owner, spec) {
        Some(ing) => {
            apply_child(&ingresses, &owner.name, &ing).await?;
        }
        None if spec_changed => {
            delete_if_present(&ingresses, &owner.name).await?;
        }
        None => {}
    }
    Ok(roles)
}

/// Marks the CR Degraded after a failed apply (quota, admission webhook…),
/// keeping everything else in its status as it was.
async fn report_apply_failure(
    dd: &DisaggDeployment,
    owner: &Owner,
    ctx: &Context,
    old: &DisaggDeploymentStatus,
    error: &kube::Error,
) {
    let message = format!("applying child objects failed: {error}");
    let mut status = old.clone();
    let degraded = condition(
        &old.conditions,
        "Degraded",
        true,
        "ApplyFailed",
        message.clone(),
        dd.metadata.generation,
    );
    status.conditions.retain(|c| c.type_ != "Degraded");
    status.conditions.push(degraded);
    let already = old
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "ApplyFailed");
    if !already {
        ctx.publish(dd, EventType::Warning, "ApplyFailed", message)
            .await;
    }
    if let Err(e) = patch_status(ctx, owner, &status).await {
        tracing::warn!(error = %e, name = %owner.name, "could not report the failure in status");
    }
}

async fn patch_status(
    ctx: &Context,
    owner: &Owner,
    status: &DisaggDeploymentStatus,
) -> Result<(), kube::Error> {
    let api: Api<DisaggDeployment> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let patch = json!({
        "apiVersion": "xpyd.dev/v1alpha1",
        "kind": "DisaggDeployment",
        "status": status,
    });
    api.patch_status(
        &owner.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

async fn apply(dd: &DisaggDeployment, ctx: &Context) -> Result<Action, Error> {
    let owner = Owner::of(dd)?;
    let spec = &dd.spec;
    let ns = &owner.namespace;
    let old = dd.status.clone().unwrap_or_default();
    let first = dd.status.is_none();
    // Objects are only removed by a spec change (numPrefill to 0, ingress
    // off), so the deletes run once per generation rather than on every
    // resync; a failed delete leaves observedGeneration behind and retries.
    let spec_changed = old.observed_generation != dd.metadata.generation;

    let mut roles = match apply_children(dd, &owner, ctx, spec_changed).await {
        Ok(roles) => roles,
        Err(e) => {
            report_apply_failure(dd, &owner, ctx, &old, &e).await;
            return Err(e.into());
        }
    };

    // Router settings into etcd.
    let generation = dd.metadata.generation.unwrap_or(0);
    let key = Scope::new(ns, &owner.name).settings_key();
    let endpoints = &spec.etcd.endpoints;
    let etcd = async {
        let want = router_settings(&spec.router, spec.num_prefill, generation)?;
        let (stored, wrote) = ctx.etcd.ensure_settings(endpoints, &key, &want).await?;
        let acks = ctx
            .etcd
            .count_acks(endpoints, ns, &owner.name, stored.generation)
            .await?;
        Ok::<_, EtcdError>((stored, wrote, acks))
    }
    .await;

    let frontend = roles.remove(&Role::Frontend).unwrap_or_default();
    let prefill = roles.remove(&Role::Prefill).unwrap_or_default();
    let decode = roles.remove(&Role::Decode).unwrap_or_default();
    let pods_ready = [&frontend, &prefill, &decode].into_iter().all(converged);
    // Why pods are not coming up, when a user must act; only looked for
    // while they are not all ready.
    let pod_problem = if pods_ready {
        None
    } else {
        observe_pods(ctx, &owner).await
    };
    let router = match &etcd {
        Ok((stored, _, acks)) => RouterStatus {
            key: key.clone(),
            settings_generation: stored.generation,
            acknowledged: acks.frontend,
            acknowledged_by_role: RoleAcks {
                frontend: acks.frontend,
                prefill: acks.prefill,
                decode: acks.decode,
            },
        },
        // Unknown while etcd is away: keep what was last seen.
        Err(_) => old.router.clone(),
    };

    let (degraded, degraded_reason, degraded_message) = degraded_condition(
        etcd.as_ref().err().map(ToString::to_string),
        pod_problem.as_ref(),
    );
    let lagging: Vec<String> = [
        ("frontend", &frontend),
        ("prefill", &prefill),
        ("decode", &decode),
    ]
    .into_iter()
    .filter(|(_, s)| !converged(s))
    .map(|(n, s)| format!("{n} {}/{} ready, {} updated", s.ready, s.desired, s.updated))
    .collect();
    let (ready, ready_reason, ready_message) = if !pods_ready {
        let mut message = lagging.join("; ");
        if let Some(problem) = &pod_problem {
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
    let gen_opt = dd.metadata.generation;
    let conditions = vec![
        condition(
            &old.conditions,
            "Ready",
            ready,
            ready_reason,
            ready_message,
            gen_opt,
        ),
        condition(
            &old.conditions,
            "Progressing",
            progressing,
            progressing_reason,
            progressing_message,
            gen_opt,
        ),
        condition(
            &old.conditions,
            "Degraded",
            degraded,
            degraded_reason,
            degraded_message,
            gen_opt,
        ),
    ];
    let status = DisaggDeploymentStatus {
        observed_generation: gen_opt,
        conditions,
        prefill_ready: format!("{}/{}", prefill.ready, prefill.desired),
        decode_ready: format!("{}/{}", decode.ready, decode.desired),
        decode_selector: owner.selector_string(Role::Decode),
        prefill,
        decode,
        frontend,
        router,
    };

    // Events for what a user would want to see in `kubectl describe`.
    if first {
        ctx.publish(
            dd,
            EventType::Normal,
            "Created",
            format!(
                "created frontend, {} prefill and {} decode workers",
                spec.num_prefill, spec.num_decode
            ),
        )
        .await;
    } else {
        for (role, before, after) in [
            ("prefill", old.prefill.desired, status.prefill.desired),
            ("decode", old.decode.desired, status.decode.desired),
            ("frontend", old.frontend.desired, status.frontend.desired),
        ] {
            if before != after {
                ctx.publish(
                    dd,
                    EventType::Normal,
                    "Scaled",
                    format!("{role} scaled from {before} to {after}"),
                )
                .await;
            }
        }
    }
    // Events on transitions of the reason, not on every reconcile.
    let etcd_was_down = is_reason(&old.conditions, "Degraded", "EtcdUnavailable");
    if let Some(problem) = &pod_problem
        && !is_reason(&old.conditions, "Degraded", problem.reason)
    {
        ctx.publish(
            dd,
            EventType::Warning,
            problem.reason,
            problem.message.clone(),
        )
        .await;
    }
    match &etcd {
        Ok((stored, true, _)) => {
            ctx.publish(
                dd,
                EventType::Normal,
                "RouterSettingsApplied",
                format!(
                    "router settings of generation {} written to etcd key {key}",
                    stored.generation
                ),
            )
            .await;
        }
        Ok(_) if etcd_was_down => {
            ctx.publish(
                dd,
                EventType::Normal,
                "EtcdRecovered",
                "etcd is reachable again".to_string(),
            )
            .await;
        }
        Err(e) if !etcd_was_down => {
            ctx.publish(dd, EventType::Warning, "EtcdUnavailable", e.to_string())
                .await;
        }
        _ => {}
    }

    if Some(&status) != dd.status.as_ref() {
        patch_status(ctx, &owner, &status).await?;
    }

    match etcd {
        Err(e) => Err(e.into()),
        Ok(_) if status.router.acknowledged < status.frontend.ready => {
            Ok(Action::requeue(ACK_POLL))
        }
        Ok(_) if !pods_ready => Ok(Action::requeue(POD_POLL)),
        Ok(_) => Ok(Action::requeue(RESYNC)),
    }
}

/// The deployment's pods' most pressing problem; a failed list is logged
/// and reported as none (status then shows what it can).
async fn observe_pods(ctx: &Context, owner: &Owner) -> Option<PodProblem> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let selector = format!("{DEPLOYMENT_LABEL}={}", owner.name);
    match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => pod_status::pod_problem(&list.items),
        Err(e) => {
            tracing::warn!(error = %e, name = %owner.name, "listing pods");
            None
        }
    }
}

/// `Degraded` from what is wrong: etcd (the operator's own path) first,
/// then the pods; every problem's message is kept.
fn degraded_condition(
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

async fn cleanup(dd: &DisaggDeployment, ctx: &Context) -> Result<Action, Error> {
    let owner = Owner::of(dd)?;
    if dd
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true")
    {
        tracing::info!(name = %owner.name, namespace = %owner.namespace, "skipping etcd cleanup as annotated");
        return Ok(Action::await_change());
    }
    match ctx
        .etcd
        .delete_deployment_keys(&dd.spec.etcd.endpoints, &owner.namespace, &owner.name)
        .await
    {
        Ok(()) => {
            tracing::info!(name = %owner.name, namespace = %owner.namespace, "removed etcd keys");
            Ok(Action::await_change())
        }
        Err(e) => {
            ctx.publish(
                dd,
                EventType::Warning,
                "CleanupFailed",
                format!("{e}; retrying (annotate {SKIP_CLEANUP_ANNOTATION}=true to skip)"),
            )
            .await;
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let first = condition(&[], "Ready", false, "R", "m".into(), Some(1));
        let again = condition(
            std::slice::from_ref(&first),
            "Ready",
            false,
            "R2",
            "m2".into(),
            Some(2),
        );
        assert_eq!(first.last_transition_time, again.last_transition_time);
        let flipped = condition(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "R",
            "m".into(),
            Some(2),
        );
        assert_eq!(flipped.status, "True");
    }
}
