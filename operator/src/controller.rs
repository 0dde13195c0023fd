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
//! no owner watch sees them). With `spec.autoscaling.enabled` it runs the
//! SLO planner once per interval ([`crate::autoscaler`]), writes its part
//! of the status with the rest, and then its counts into the spec. Not here: what the status, conditions, events
//! and requeue should be ([`crate::status`], pure functions this file calls
//! with what it observed; events go out only once the status is written),
//! leader election and the HTTP server (see [`crate::leader`],
//! [`crate::metrics`]), object builders ([`crate::resources`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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

use crate::autoscaler::{self, Autoscaler, Target};
use crate::crd::{DisaggDeployment, DisaggDeploymentStatus, RoleAcks, RoleStatus};
use crate::effectiveness::{self, Effectiveness};
use crate::metrics::Metrics;
use crate::pod_status::{self, PodProblem};
use crate::resources::{
    self, BuildError, ClusterSettings, DEPLOYMENT_LABEL, MANAGED_BY, Owner, Role,
};
use crate::router_settings::{EtcdClients, EtcdError, router_settings};
use crate::status::{self, Observed, PlannedEvent, SettingsSeen};

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "xpyd-operator";
/// Finalizer guarding the operator's etcd keys.
pub const FINALIZER: &str = "xpyd.dev/etcd-cleanup";
/// Annotation that lets a CR be deleted without cleaning etcd (for an etcd
/// that is gone for good).
pub const SKIP_CLEANUP_ANNOTATION: &str = "xpyd.dev/skip-etcd-cleanup";

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
    /// How often the decode workers are read to judge whether long prompts
    /// really go remote (the `DisaggregationEffective` condition's window).
    pub disaggregation_check_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: None,
            concurrency: 16,
            instance: "xpyd-operator".to_string(),
            metrics: Metrics::new(),
            cluster: ClusterSettings::default(),
            disaggregation_check_interval: effectiveness::CHECK_INTERVAL,
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
    autoscaler: Autoscaler,
    effectiveness: Effectiveness,
}

impl Context {
    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<DisaggDeployment>, u32>> {
        crate::sync::lock(&self.failures)
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

    /// Sends planned events in order.
    async fn publish_all(
        &self,
        dd: &DisaggDeployment,
        events: impl IntoIterator<Item = PlannedEvent>,
    ) {
        for e in events {
            self.publish(dd, e.type_, e.reason, e.note).await;
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
        autoscaler: Autoscaler::default(),
        effectiveness: Effectiveness::new(config.disaggregation_check_interval),
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
            roles.insert(role, status::role_status(0, None));
            continue;
        }
        let svc = resources::service(owner, spec, role);
        apply_child(&services, &name, &svc).await?;
        let want = resources::deployment(owner, spec, role, &ctx.cluster);
        let got = apply_child(&deployments, &name, &want).await?;
        roles.insert(role, status::role_status(desired, Some(&got)));
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
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let (status, event) =
        status::apply_failed(old, dd.metadata.generation, &error.to_string(), &now);
    match patch_status(ctx, owner, &status).await {
        Ok(()) => ctx.publish_all(dd, event).await,
        Err(e) => {
            tracing::warn!(error = %e, name = %owner.name, "could not report the failure in status");
        }
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
    // Why pods are not coming up, when a user must act; only looked for
    // while they are not all ready.
    let pod_problem = if status::all_converged([&frontend, &prefill, &decode]) {
        None
    } else {
        observe_pods(ctx, &owner).await
    };
    let observed = Observed {
        generation: dd.metadata.generation,
        old: dd.status.as_ref(),
        num_prefill: spec.num_prefill,
        num_decode: spec.num_decode,
        frontend,
        prefill,
        decode,
        decode_selector: owner.selector_string(Role::Decode),
        settings_key: key,
        settings: match &etcd {
            Ok((stored, written, acks)) => Ok(SettingsSeen {
                generation: stored.generation,
                written: *written,
                acks: RoleAcks {
                    frontend: acks.frontend,
                    prefill: acks.prefill,
                    decode: acks.decode,
                },
            }),
            Err(e) => Err(e.to_string()),
        },
        pod_problem,
    };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut decision = status::decide(&observed, &now);

    // The SLO planner, once per interval while enabled.
    let (planned, next_plan) = ctx
        .autoscaler
        .step(
            &ctx.client,
            &ctx.metrics,
            Target {
                dd,
                owner: &owner,
                prefill: &decision.status.prefill,
                decode: &decision.status.decode,
                now: &now,
            },
        )
        .await;
    if spec.autoscaling.as_ref().is_none_or(|a| !a.enabled) {
        decision.status.autoscaling = None;
        forget_planner(dd, &owner, ctx);
    }
    let mut planned_patch = None;
    if let Some(outcome) = planned {
        decision.status.autoscaling = Some(outcome.status);
        planned_patch = outcome.patch;
        decision.events.extend(outcome.event);
    }

    // Whether long prompts really go to the prefill workers.
    let check = ctx
        .effectiveness
        .check(&ctx.client, &ctx.metrics, dd, &owner, &now)
        .await;
    decision
        .status
        .conditions
        .retain(|c| c.type_ != effectiveness::CONDITION);
    decision.status.conditions.extend(check.condition);
    if check.kv_paths.is_some() || dd.spec.num_prefill <= 0 {
        decision.status.kv_paths = check.kv_paths;
    }
    decision.events.extend(check.event);
    decision.events.extend(check.path_event);

    // Events only once the status says the same: a failed write is retried,
    // and the retry announces it then.
    if Some(&decision.status) != dd.status.as_ref() {
        patch_status(ctx, &owner, &decision.status).await?;
    }
    // The planner's counts reach the children through the next reconcile
    // (the spec change triggers it), the threshold through etcd as any
    // router setting does.
    if let Some(counts) = &planned_patch {
        autoscaler::patch_spec(&ctx.client, &owner, counts).await?;
    }
    ctx.publish_all(dd, decision.events).await;

    match etcd {
        Err(e) => Err(e.into()),
        Ok(_) => Ok(Action::requeue(
            decision.requeue.min(next_plan).min(check.next),
        )),
    }
}

/// Drops the planner's memory and series of a deployment that does not
/// autoscale (any more).
fn forget_planner(dd: &DisaggDeployment, owner: &Owner, ctx: &Context) {
    if ctx.autoscaler.forget(&ObjectRef::from_obj(dd)) {
        ctx.metrics.forget_planner(&owner.namespace, &owner.name);
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

async fn cleanup(dd: &DisaggDeployment, ctx: &Context) -> Result<Action, Error> {
    let owner = Owner::of(dd)?;
    forget_planner(dd, &owner, ctx);
    ctx.effectiveness.forget(&ObjectRef::from_obj(dd));
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
