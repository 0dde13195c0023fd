//! The `DisaggDeployment` custom resource (`xpyd.dev/v1alpha1`): its spec,
//! status and the schema the API server validates it with.
//!
//! Validation lives in the generated schema (OpenAPI bounds plus CEL
//! `x-kubernetes-validations`), so a bad spec is rejected by the API server
//! with a message before the operator ever sees it. This module is types only:
//! what the operator builds from them lives in [`crate::resources`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, ResourceRequirements, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The CRD's API group.
pub const GROUP: &str = "xpyd.dev";

/// Desired state of an xPyD deployment: `numPrefill` prefill workers,
/// `numDecode` decode workers and a frontend, all running the agent image.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "xpyd.dev",
    version = "v1alpha1",
    kind = "DisaggDeployment",
    plural = "disaggdeployments",
    singular = "disaggdeployment",
    shortname = "dd",
    category = "xpyd",
    namespaced,
    status = "DisaggDeploymentStatus",
    doc = "A disaggregated (xPyD) LLM serving deployment: prefill workers, decode workers and an OpenAI-compatible frontend.",
    scale(
        spec_replicas_path = ".spec.numDecode",
        status_replicas_path = ".status.decode.replicas",
        label_selector_path = ".status.decodeSelector"
    ),
    printcolumn(
        name = "Prefill",
        type_ = "string",
        description = "Prefill workers ready/desired",
        json_path = ".status.prefillReady"
    ),
    printcolumn(
        name = "Decode",
        type_ = "string",
        description = "Decode workers ready/desired",
        json_path = ".status.decodeReady"
    ),
    printcolumn(
        name = "Strategy",
        type_ = "string",
        description = "Routing strategy",
        json_path = ".spec.router.strategy"
    ),
    printcolumn(
        name = "Threshold",
        type_ = "integer",
        description = "Prompts with more uncached tokens than this are prefilled remotely",
        json_path = ".spec.router.maxLocalPrefillLength"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Disagg",
        type_ = "string",
        description = "Whether long prompts really are prefilled remotely (DisaggregationEffective)",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"DisaggregationEffective\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40").message(
        "metadata.name must be at most 40 characters (child objects append a role suffix)"
    )
)]
#[x_kube(
    validation = Rule::new("self.engine.maxModelLen >= self.engine.blockSize")
        .message("engine.maxModelLen must be at least engine.blockSize")
        .field_path(".engine.maxModelLen"),
    validation = Rule::new("self.engine.maxBatchTokens >= self.engine.blockSize")
        .message("engine.maxBatchTokens must be at least engine.blockSize")
        .field_path(".engine.maxBatchTokens"),
    validation = Rule::new("self.router.maxLocalPrefillLength <= self.engine.maxModelLen")
        .message("router.maxLocalPrefillLength must not exceed engine.maxModelLen")
        .field_path(".router.maxLocalPrefillLength"),
    validation = Rule::new("!self.frontend.ingress.enabled || (has(self.frontend.ingress.host) && self.frontend.ingress.host != '')")
        .message("frontend.ingress.host is required when frontend.ingress.enabled is true")
        .field_path(".frontend.ingress.host"),
    validation = Rule::new("self.router.strategy != 'session' || self.router.sessionHeader != ''")
        .message("router.sessionHeader must be set when router.strategy is session")
        .field_path(".router.sessionHeader"),
    validation = Rule::new("!has(self.engine.kvCacheBlocks) || self.engine.kvCacheBlocks * self.engine.blockSize >= self.engine.maxModelLen")
        .message("engine.kvCacheBlocks x engine.blockSize must hold one engine.maxModelLen sequence: raise engine.kvCacheBlocks or lower engine.maxModelLen")
        .field_path(".engine.kvCacheBlocks"),
    validation = Rule::new("self.frontend.port != 9090")
        .message("frontend.port must not be 9090: every agent serves /health, /ready and /metrics on that port")
        .field_path(".frontend.port")
)]
#[serde(rename_all = "camelCase")]
pub struct DisaggDeploymentSpec {
    /// The model every worker loads and the name the frontend serves it as.
    pub model: ModelSpec,
    /// The agent image all roles run.
    pub image: ImageSpec,
    /// Prefill workers. 0 means aggregated serving: decode workers prefill
    /// every prompt locally. Scale it by patch.
    #[schemars(range(min = 0, max = 1024))]
    pub num_prefill: i32,
    /// Decode workers (the scale subresource's replicas). With
    /// `autoscaling.enabled` the SLO planner owns this field and
    /// `numPrefill`: it patches both, and an HorizontalPodAutoscaler on the
    /// scale subresource must not be combined with it (the operator then
    /// leaves the counts alone and reports `AutoscalingConflict`).
    #[schemars(range(min = 1, max = 1024))]
    pub num_decode: i32,
    /// Scheduling and resources of the prefill workers.
    #[serde(default)]
    pub prefill: WorkerSpec,
    /// Scheduling and resources of the decode workers.
    #[serde(default)]
    pub decode: WorkerSpec,
    /// Engine settings shared by prefill and decode workers.
    #[serde(default)]
    pub engine: EngineSpec,
    /// Routing and disaggregation settings, mirrored into etcd and applied by
    /// running routers without restarting anything.
    #[serde(default)]
    pub router: RouterSpec,
    /// The OpenAI-compatible frontend (and its router).
    #[serde(default)]
    pub frontend: FrontendSpec,
    /// The etcd that holds discovery records and router settings.
    pub etcd: EtcdSpec,
    /// The NATS server that carries requests, the prefill queue and KV events.
    pub nats: NatsSpec,
    /// Seconds a pod has to shut down after SIGTERM. The agent drains
    /// in-flight work for 10 s less than this (at least 1 s; its
    /// `XPYD_GRACE_SECONDS`), so it exits before the kubelet kills it.
    #[serde(default = "default_termination_grace_period_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub termination_grace_period_seconds: i32,
    /// The SLO planner: scales prefill and decode workers and moves
    /// `router.maxLocalPrefillLength` to meet TTFT and ITL targets. Off
    /// unless `enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// `spec.autoscaling`: the SLO planner's targets and bounds.
///
/// While `enabled`, the planner owns `numPrefill`, `numDecode` and (with
/// `moveThreshold`) `router.maxLocalPrefillLength`: each interval it
/// scrapes the deployment's pods' `/metrics`, decides, and patches those
/// fields. Do not point an HorizontalPodAutoscaler at this object's scale
/// subresource at the same time: the operator sees it, stops planning and
/// reports `AutoscalingConflict` until one of the two goes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.prefill.min <= self.prefill.max")
        .message("autoscaling.prefill.min must not exceed autoscaling.prefill.max")
        .field_path(".prefill.min"),
    validation = Rule::new("self.decode.min <= self.decode.max")
        .message("autoscaling.decode.min must not exceed autoscaling.decode.max")
        .field_path(".decode.min"),
    validation = Rule::new("self.ttftP90Ms > 0.0")
        .message("autoscaling.ttftP90Ms must be a positive number of milliseconds")
        .field_path(".ttftP90Ms"),
    validation = Rule::new("self.itlP90Ms > 0.0")
        .message("autoscaling.itlP90Ms must be a positive number of milliseconds")
        .field_path(".itlP90Ms"),
    validation = Rule::new("self.decode.min >= 1")
        .message("autoscaling.decode.min must be at least 1 (numDecode cannot be 0)")
        .field_path(".decode.min")
)]
pub struct AutoscalingSpec {
    /// Run the planner. Off by default: the counts stay as written.
    #[serde(default)]
    pub enabled: bool,
    /// Target 90th percentile of the time to first token, in ms, as the
    /// frontends measure it.
    #[serde(default = "default_ttft_p90_ms")]
    pub ttft_p90_ms: f64,
    /// Target 90th percentile of the inter-token latency, in ms.
    #[serde(default = "default_itl_p90_ms")]
    pub itl_p90_ms: f64,
    /// Bounds of `numPrefill` (`min` 0 allows aggregated serving).
    #[serde(default = "default_prefill_bounds")]
    pub prefill: ReplicaBounds,
    /// Bounds of `numDecode`.
    #[serde(default = "default_decode_bounds")]
    pub decode: ReplicaBounds,
    /// A role is scaled in only below every need seen over this many
    /// seconds, one pod per interval.
    #[serde(default = "default_scale_down_stabilization_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_stabilization_seconds: i32,
    /// Whether the planner may move `router.maxLocalPrefillLength` (before
    /// replicas, when only one side is saturated).
    #[serde(default)]
    pub move_threshold: bool,
    /// Seconds between two decisions (and the window the rates are taken
    /// over). Unset: 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 3600))]
    pub interval_seconds: Option<i32>,
    /// What one worker sustains, from a measured profile. Unset: the
    /// planner sizes by the latency targets and KV use alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<WorkerCapacity>,
}

/// Default seconds between two planner decisions.
pub const DEFAULT_AUTOSCALING_INTERVAL_SECONDS: i32 = 30;

impl AutoscalingSpec {
    /// Seconds between two decisions.
    pub fn interval(&self) -> std::time::Duration {
        let s = self
            .interval_seconds
            .unwrap_or(DEFAULT_AUTOSCALING_INTERVAL_SECONDS)
            .max(1);
        std::time::Duration::from_secs(u64::from(s.unsigned_abs()))
    }
}

fn default_ttft_p90_ms() -> f64 {
    1000.0
}
fn default_itl_p90_ms() -> f64 {
    50.0
}
fn default_prefill_bounds() -> ReplicaBounds {
    ReplicaBounds { min: 1, max: 8 }
}
fn default_decode_bounds() -> ReplicaBounds {
    ReplicaBounds { min: 1, max: 8 }
}
fn default_scale_down_stabilization_seconds() -> i32 {
    300
}

/// Lower and upper bound of one role's replicas.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaBounds {
    /// Fewest replicas.
    #[schemars(range(min = 0, max = 1024))]
    pub min: i32,
    /// Most replicas.
    #[schemars(range(min = 0, max = 1024))]
    pub max: i32,
}

/// Throughput of one worker, from a measured profile.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.prefillTokensPerSecond) || self.prefillTokensPerSecond > 0.0")
        .message("autoscaling.capacity.prefillTokensPerSecond must be positive")
        .field_path(".prefillTokensPerSecond"),
    validation = Rule::new("!has(self.decodeTokensPerSecond) || self.decodeTokensPerSecond > 0.0")
        .message("autoscaling.capacity.decodeTokensPerSecond must be positive")
        .field_path(".decodeTokensPerSecond")
)]
pub struct WorkerCapacity {
    /// Prompt tokens one prefill worker computes per second while busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_tokens_per_second: Option<f64>,
    /// Tokens one decode worker generates per second at its usual batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_second: Option<f64>,
}

/// Seconds between the end of the agent's drain and the pod's grace period.
pub const DRAIN_MARGIN_SECONDS: i32 = 10;

fn default_termination_grace_period_seconds() -> i32 {
    60
}

/// Seconds a terminating pod keeps serving before it gets SIGTERM (a
/// `preStop` sleep), so that Services and kube-proxy stop sending it new
/// connections first; inside [`DRAIN_MARGIN_SECONDS`].
pub const PRE_STOP_SECONDS: i32 = 5;

impl DisaggDeploymentSpec {
    /// The `preStop` sleep: [`PRE_STOP_SECONDS`] when the grace period
    /// leaves room for it and the drain, else none.
    pub fn pre_stop_seconds(&self) -> i32 {
        if self.termination_grace_period_seconds > DRAIN_MARGIN_SECONDS {
            PRE_STOP_SECONDS
        } else {
            0
        }
    }

    /// The agent's drain grace (`XPYD_GRACE_SECONDS`): the pod's grace
    /// period less [`DRAIN_MARGIN_SECONDS`], at least 1 s.
    pub fn drain_grace_seconds(&self) -> i32 {
        (self.termination_grace_period_seconds - DRAIN_MARGIN_SECONDS).max(1)
    }
}

/// What to serve, and where the pods get it from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.hfTokenSecret) || self.source.startsWith('hf://')")
        .message("model.hfTokenSecret is only used with an hf:// model.source")
        .field_path(".hfTokenSecret")
)]
pub struct ModelSpec {
    /// The model's name, e.g. `SmolLM2-135M-Instruct`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Where the weights (one GGUF file) come from:
    /// `https://host/path/file.gguf` or `http://…` (downloaded by an init
    /// container into the model cache);
    /// `hf://<org>/<repo>[@<revision>]/<file>` (the Hugging Face hub, or the
    /// mirror the operator is configured with; downloaded likewise);
    /// `pvc://<claim>/<path>` (a file on an existing PersistentVolumeClaim,
    /// mounted read-only); or an absolute path inside the pod (in the image,
    /// or in a volume added through the roles' `volumes`/`volumeMounts`).
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(
        validation = Rule::new("self.startsWith('/') || self.startsWith('https://') || self.startsWith('http://') || self.startsWith('hf://') || self.startsWith('pvc://')")
            .message("model.source must be an absolute path or start with https://, http://, hf:// or pvc://"),
        validation = Rule::new("!(self.startsWith('https://') || self.startsWith('http://')) || self.matches('^https?://[^/?#]+/([^?#]*/)?[^/?#]+([?#].*)?$')")
            .message("model.source: an http(s):// URL must name a host and a file"),
        validation = Rule::new("!self.startsWith('hf://') || self.matches('^hf://[^/@]+/[^/@]+(@[^/@]+)?/([^/]+/)*[^/]+$')")
            .message("model.source: an hf:// source must be hf://<org>/<repo>[@<revision>]/<file>"),
        validation = Rule::new("!self.startsWith('pvc://') || self.matches('^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?/([^/]+/)*[^/]+$')")
            .message("model.source: a pvc:// source must be pvc://<claim>/<path>, naming both the claim and a file in it"),
        validation = Rule::new("!(self.startsWith('hf://') || self.startsWith('pvc://')) || !self.matches('/[.][.](/|$)')")
            .message("model.source: the file's path may not contain '..'")
    )]
    pub source: String,
    /// SHA-256 of the file, 64 lowercase hex digits. A download that does
    /// not match is refused (and not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// Secret holding a Hugging Face token for an `hf://` source; it reaches
    /// the pods as `HF_TOKEN` and nothing else (never status or logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_token_secret: Option<SecretKeySpec>,
    /// Where downloads are kept. Unset: an `emptyDir` per pod (each pod
    /// downloads once per start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ModelCacheSpec>,
    /// Overall deadline of a download in seconds, waiting for another
    /// pod's download on a shared cache included. Unset: the agent's
    /// default (3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub fetch_timeout_seconds: Option<i32>,
    /// The name clients pass as `model`; defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub served_model_name: Option<String>,
}

/// A key of a Secret in the deployment's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySpec {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within it.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_token_key() -> String {
    "token".to_string()
}

/// The model cache volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.claimName) && has(self.sizeLimit))")
        .message("model.cache: sizeLimit applies to the default emptyDir, not to a claimName")
        .field_path(".sizeLimit")
)]
pub struct ModelCacheSpec {
    /// A PersistentVolumeClaim (ReadWriteMany) shared by every pod of the
    /// deployment: one download serves scale-ups and restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
    /// Size limit of the default `emptyDir`, e.g. `20Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Quantity>,
}

/// What kind of place `spec.model.source` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource<'a> {
    /// `http(s)://` or `hf://`: fetched into the model cache by an init
    /// container.
    Download,
    /// `pvc://<claim>/<path>`: read from a read-only mount of `claim`.
    Pvc {
        /// The claim's name.
        claim: &'a str,
    },
    /// Anything else (an absolute path; the schema admits nothing more).
    Path,
}

impl ModelSpec {
    /// The name the frontend answers to.
    pub fn served_name(&self) -> &str {
        self.served_model_name.as_deref().unwrap_or(&self.name)
    }

    /// Which kind of source this is (the schema has checked its shape).
    pub fn source_kind(&self) -> ModelSource<'_> {
        let s = self.source.as_str();
        if s.starts_with("https://") || s.starts_with("http://") || s.starts_with("hf://") {
            ModelSource::Download
        } else if let Some(rest) = s.strip_prefix("pvc://") {
            ModelSource::Pvc {
                claim: rest.split('/').next().unwrap_or_default(),
            }
        } else {
            ModelSource::Path
        }
    }
}

/// The agent image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Image reference, e.g. `ghcr.io/xpyd/agent:0.1.0`.
    #[schemars(length(min = 1, max = 512))]
    pub name: String,
    /// Kubernetes image pull policy.
    #[serde(default)]
    pub pull_policy: PullPolicy,
    /// Secrets for pulling from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<String>,
}

/// Kubernetes `imagePullPolicy`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when the node lacks the image.
    #[default]
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The string Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Resources and placement of one role's pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Container resources, e.g. `limits: {nvidia.com/gpu: 1}`. Every
    /// quantity must be a non-negative Kubernetes quantity (checked by the
    /// API server, so a typo fails at `kubectl apply` rather than when the
    /// operator writes the Deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("!has(self.limits) || self.limits.all(k, isQuantity(string(self.limits[k])) && quantity(string(self.limits[k])).compareTo(quantity('0')) >= 0)")
            .message("resources.limits must be non-negative quantities, e.g. nvidia.com/gpu: 1")
            .field_path(".limits"),
        validation = Rule::new("!has(self.requests) || self.requests.all(k, isQuantity(string(self.requests[k])) && quantity(string(self.requests[k])).compareTo(quantity('0')) >= 0)")
            .message("resources.requests must be non-negative quantities, e.g. cpu: 500m")
            .field_path(".requests")
    )]
    #[schemars(schema_with = "bounded_resources")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Pod affinity and anti-affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Environment variables added to the agent container, after the ones
    /// the operator sets (a later entry wins for the same name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Volumes added to the pods (Kubernetes `Volume` objects; checked by
    /// the API server when the operator writes the Deployment). Names
    /// `model-cache` and `model-pvc` are the operator's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "preserved_objects")]
    pub volumes: Vec<Volume>,
    /// Mounts added to the agent container, e.g. a `/dev/shm` for UCX.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

/// Most resource names a role's `limits` or `requests` may list, and the
/// longest quantity: bounds that let the API server afford the CEL rules
/// checking each quantity.
const MAX_RESOURCE_NAMES: u32 = 16;
const MAX_QUANTITY_LEN: u32 = 64;

/// Kubernetes' `ResourceRequirements` schema, with `limits` and `requests`
/// bounded (see [`MAX_RESOURCE_NAMES`]).
fn bounded_resources(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Option<ResourceRequirements>>();
    if let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
        for name in ["limits", "requests"] {
            if let Some(map) = props.get_mut(name).and_then(|m| m.as_object_mut()) {
                map.insert("maxProperties".into(), MAX_RESOURCE_NAMES.into());
                if let Some(value) = map
                    .get_mut("additionalProperties")
                    .and_then(|v| v.as_object_mut())
                {
                    value.insert("maxLength".into(), MAX_QUANTITY_LEN.into());
                }
            }
        }
    }
    schema
}

/// A list of objects the API server keeps as written: the full `Volume`
/// schema would add hundreds of kilobytes to the CRD per role; the
/// Deployment the operator writes is validated in full.
fn preserved_objects(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}

/// Engine settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Tokens per KV cache block; a power of two.
    #[serde(default = "default_block_size")]
    #[schemars(range(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self in [1, 2, 4, 8, 16, 32, 64, 128, 256]").message("engine.blockSize must be a power of two between 1 and 256"))]
    pub block_size: i32,
    /// Most tokens one engine step processes (prefill chunks and decodes).
    #[serde(default = "default_max_batch_tokens")]
    #[schemars(range(min = 1))]
    pub max_batch_tokens: i32,
    /// Longest sequence (prompt plus completion) accepted.
    #[serde(default = "default_max_model_len")]
    #[schemars(range(min = 1))]
    pub max_model_len: i32,
    /// KV cache size in blocks per worker. Unset: the agent sizes it from
    /// the memory left after the weights, within the container's memory
    /// limit. Set, it must hold one `maxModelLen` sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub kv_cache_blocks: Option<i32>,
    /// Where the engine computes: `auto` (a GPU when the engine can use it,
    /// else the CPU), `cpu`, `cuda` or `cuda:<N>`. The CUDA engine is not
    /// enabled in this release: `cuda` makes the workers refuse to start.
    /// `sim` runs a simulated engine (real tokenizer, KV blocks and
    /// transfers, a timing model instead of the model's forward pass) for
    /// scale and planner tests: its answers are placeholders, labelled as
    /// simulated in every response (`docs/sim.md`).
    #[serde(default = "default_device")]
    #[schemars(
        length(max = 16),
        regex(pattern = r"^(auto|cpu|sim|cuda(:[0-9]{1,3})?)$")
    )]
    pub device: String,
    /// Most sequences in one engine step.
    #[serde(default = "default_max_seqs")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_seqs: i32,
    /// Seconds a decode worker waits for a remote prefill's KV before it
    /// prefills the prompt itself.
    #[serde(default = "default_remote_prefill_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub remote_prefill_timeout_seconds: i32,
}

fn default_block_size() -> i32 {
    16
}
fn default_max_batch_tokens() -> i32 {
    8192
}
fn default_max_model_len() -> i32 {
    8192
}
fn default_device() -> String {
    "auto".to_string()
}
fn default_max_seqs() -> i32 {
    16
}
fn default_remote_prefill_timeout_seconds() -> i32 {
    30
}

impl Default for EngineSpec {
    fn default() -> Self {
        EngineSpec {
            block_size: default_block_size(),
            max_batch_tokens: default_max_batch_tokens(),
            max_model_len: default_max_model_len(),
            kv_cache_blocks: None,
            device: default_device(),
            max_seqs: default_max_seqs(),
            remote_prefill_timeout_seconds: default_remote_prefill_timeout_seconds(),
        }
    }
}

/// How the frontend picks a decode worker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouterStrategy {
    /// Best KV prefix overlap and load.
    #[default]
    Kv,
    /// In turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Sticky by the session header, falling back to KV routing.
    Session,
}

/// Routing and disaggregation settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Decode-worker selection.
    #[serde(default)]
    pub strategy: RouterStrategy,
    /// A prompt whose uncached part is longer than this many tokens is
    /// prefilled on a prefill worker; shorter ones locally.
    #[serde(default = "default_max_local_prefill_length")]
    #[schemars(range(min = 0))]
    pub max_local_prefill_length: i32,
    /// HTTP header carrying the session id for `strategy: session`.
    #[serde(default = "default_session_header")]
    #[schemars(length(max = 128), regex(pattern = r"^[A-Za-z0-9-]*$"))]
    pub session_header: String,
    /// A decode worker prefills locally rather than enqueue when the prefill
    /// queue holds more than this many requests.
    #[serde(default = "default_max_prefill_queue_depth")]
    #[schemars(range(min = 1))]
    pub max_prefill_queue_depth: i32,
    /// `strategy: kv`: weight of the prefix overlap (the prompt's blocks a
    /// worker already caches, in blocks) in a worker's cost
    /// `loadWeight * (activeBlocks + newBlocks) - overlapWeight * overlap`.
    #[serde(default = "default_kv_weight")]
    #[schemars(range(min = 0.0))]
    pub kv_overlap_weight: f64,
    /// `strategy: kv`: weight of the load (the KV blocks a worker's requests
    /// hold, plus the blocks this request would add) in a worker's cost.
    #[serde(default = "default_kv_weight")]
    #[schemars(range(min = 0.0))]
    pub kv_load_weight: f64,
    /// A prompt over `maxLocalPrefillLength` that no prefill worker can
    /// take (none alive, the queue full, the one that took it failed or
    /// died): `fallback` prefills it on the decode worker (slower, but
    /// answered); `fail` answers 503 at once with the reason, for
    /// deployments whose decode latency must not pay for local prefills.
    #[serde(default)]
    pub on_prefill_unavailable: PrefillUnavailable,
}

/// `spec.router.onPrefillUnavailable`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PrefillUnavailable {
    #[default]
    Fallback,
    Fail,
}

fn default_max_local_prefill_length() -> i32 {
    512
}
fn default_session_header() -> String {
    "session-id".to_string()
}
fn default_max_prefill_queue_depth() -> i32 {
    64
}
fn default_kv_weight() -> f64 {
    1.0
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            strategy: RouterStrategy::default(),
            max_local_prefill_length: default_max_local_prefill_length(),
            session_header: default_session_header(),
            max_prefill_queue_depth: default_max_prefill_queue_depth(),
            on_prefill_unavailable: PrefillUnavailable::default(),
            kv_overlap_weight: default_kv_weight(),
            kv_load_weight: default_kv_weight(),
        }
    }
}

/// The frontend: HTTP API, tokenizer and router.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontendSpec {
    /// Frontend pods.
    #[serde(default = "default_frontend_replicas")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: i32,
    /// Port of the OpenAI-compatible API.
    #[serde(default = "default_frontend_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Resources and placement of the frontend pods.
    #[serde(default, flatten)]
    pub worker: WorkerSpec,
    /// Optional Ingress in front of the frontend Service.
    #[serde(default)]
    pub ingress: IngressSpec,
}

fn default_frontend_replicas() -> i32 {
    1
}
fn default_frontend_port() -> i32 {
    8000
}

impl Default for FrontendSpec {
    fn default() -> Self {
        FrontendSpec {
            replicas: default_frontend_replicas(),
            port: default_frontend_port(),
            worker: WorkerSpec::default(),
            ingress: IngressSpec::default(),
        }
    }
}

/// Ingress settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// Create an Ingress.
    #[serde(default)]
    pub enabled: bool,
    /// IngressClass name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Host name the Ingress answers for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub host: Option<String>,
    /// Path prefix.
    #[serde(default = "default_ingress_path")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("frontend.ingress.path must start with /"))]
    pub path: String,
    /// Secret with the TLS certificate for `host`; unset means plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// Annotations of the Ingress, for the controller's settings. Streamed
    /// answers (SSE) must not be buffered: with ingress-nginx set
    /// `nginx.ingress.kubernetes.io/proxy-buffering: "off"` and raise
    /// `nginx.ingress.kubernetes.io/proxy-read-timeout` (seconds) above the
    /// longest generation (see docs/ingress.md).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_ingress_path() -> String {
    "/".to_string()
}

impl Default for IngressSpec {
    fn default() -> Self {
        IngressSpec {
            enabled: false,
            class_name: None,
            host: None,
            path: default_ingress_path(),
            tls_secret_name: None,
            annotations: BTreeMap::new(),
        }
    }
}

/// Where etcd is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EtcdSpec {
    /// Client URLs, e.g. `http://etcd.xpyd:2379`.
    #[schemars(
        length(min = 1, max = 16),
        inner(length(max = 512), regex(pattern = r"^https?://.+"))
    )]
    pub endpoints: Vec<String>,
}

/// Where NATS is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// Server URL, e.g. `nats://nats.xpyd:4222`.
    #[schemars(
        length(min = 1, max = 512),
        regex(pattern = r"^(nats|tls|ws|wss)://.+")
    )]
    pub url: String,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisaggDeploymentStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Prefill workers.
    #[serde(default)]
    pub prefill: RoleStatus,
    /// Decode workers.
    #[serde(default)]
    pub decode: RoleStatus,
    /// Frontend pods.
    #[serde(default)]
    pub frontend: RoleStatus,
    /// `ready/desired` of the prefill workers, for `kubectl get`.
    #[serde(default)]
    pub prefill_ready: String,
    /// `ready/desired` of the decode workers, for `kubectl get`.
    #[serde(default)]
    pub decode_ready: String,
    /// Label selector of the decode pods (for the scale subresource and HPA).
    #[serde(default)]
    pub decode_selector: String,
    /// The router settings in etcd and how many routers run them.
    #[serde(default)]
    pub router: RouterStatus,
    /// The SLO planner's last decision, while `spec.autoscaling.enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// The KV paths from prefill to decode workers, as the decode workers
    /// last reported them (read with the `DisaggregationEffective` check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_paths: Option<KvPathsStatus>,
}

/// The health of the prefill → decode KV paths. A decode worker
/// quarantines the path from a prefill worker whose transfers into it
/// keep failing (its jobs go to other prefill workers, or stay local) and
/// probes it back with a one-block transfer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvPathsStatus {
    /// Paths that carried KV and are not quarantined.
    pub healthy: i32,
    /// Paths quarantined now.
    #[serde(default)]
    pub quarantined: Vec<KvPath>,
    /// Quarantines (new, or renewed by a failed probe) in the last window.
    pub quarantines_last_window: i64,
    /// Paths by the transport UCX is *inferred* to move their KV over:
    /// `shared_memory`, `rdma`, `tcp`, or `none` (no transport both
    /// workers allow reaches the other). Inferred from both workers'
    /// `UCX_TLS`, RDMA devices, kernel and namespaces, not read from UCX.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub transports: BTreeMap<String, i32>,
}

/// One prefill → decode path.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvPath {
    /// The decode pod.
    pub decode: String,
    /// The prefill worker's instance id (its pod name and a suffix).
    pub prefill: String,
}

/// What the SLO planner last saw and decided.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// What the planner asks for.
    pub desired: PlannedCounts,
    /// What the spec held when it decided.
    pub current: PlannedCounts,
    /// `Steady`, `ScaleUp`, `ScaleDown`, `ThresholdRaised`,
    /// `ThresholdLowered`, `Pending`, `AtMax`; or why it did not decide:
    /// `CollectingSignals`, `AutoscalingConflict`, `NoSignals`.
    pub reason: String,
    /// The figures behind the reason.
    #[serde(default)]
    pub message: String,
    /// The signals of the last window.
    #[serde(default)]
    pub signals: PlannerSignals,
    /// When it last decided (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// The counts the planner owns.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedCounts {
    pub num_prefill: i32,
    pub num_decode: i32,
    pub max_local_prefill_length: i32,
}

/// One window of the signals the planner decided on (see
/// `docs/autoscaling.md` for where each comes from).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannerSignals {
    /// Requests entering the frontends, per second.
    pub requests_per_second: f64,
    /// Prompt tokens meant for the prefill workers, per second.
    pub prefill_tokens_per_second: f64,
    /// Generated tokens per finished request.
    pub output_tokens_per_request: f64,
    /// Share of decode KV blocks in use.
    pub kv_use: f64,
    /// Jobs waiting on the prefill queue.
    pub prefill_queue_depth: f64,
    /// Frontend TTFT p90 over the window, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p90_ms: Option<f64>,
    /// Frontend ITL p90 over the window, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itl_p90_ms: Option<f64>,
    /// Prefill pods asked for and not Ready.
    pub prefill_pending: i32,
    /// Decode pods asked for and not Ready.
    pub decode_pending: i32,
    /// How long the planner's prefill scale-ups took to become Ready, on
    /// average, in seconds: the backlog is sized for what enters until
    /// then (absent until one has been seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_lead_seconds: Option<f64>,
    /// One prefill worker's capacity in prompt tokens per second, measured
    /// over the window from the workers' own counters (absent when they
    /// were not busy enough to tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_capacity_measured: Option<f64>,
    /// Pods scraped, and pods whose scrape failed.
    pub scraped_pods: i32,
    pub failed_scrapes: i32,
}

/// Replica counts of one role, from its Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    /// Replicas the spec asks for.
    pub desired: i32,
    /// Pods that exist.
    pub replicas: i32,
    /// Pods that are Ready.
    pub ready: i32,
    /// Pods running the current pod template.
    pub updated: i32,
}

/// Router settings as mirrored into etcd.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterStatus {
    /// The etcd key holding the settings.
    #[serde(default)]
    pub key: String,
    /// The CR generation of the settings now in etcd (0: not written yet).
    #[serde(default)]
    pub settings_generation: i64,
    /// Routers (frontend instances) that acknowledged running that
    /// generation or a later one.
    #[serde(default)]
    pub acknowledged: i32,
    /// Acknowledgements of that generation by role. Workers acknowledge too
    /// (they read the threshold); an ack whose instance has no record in
    /// etcd is counted nowhere.
    #[serde(default)]
    pub acknowledged_by_role: RoleAcks,
}

/// Instances of each role that acknowledged the router settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleAcks {
    /// Frontends (routers).
    #[serde(default)]
    pub frontend: i32,
    /// Prefill workers.
    #[serde(default)]
    pub prefill: i32,
    /// Decode workers.
    #[serde(default)]
    pub decode: i32,
}

/// The CRD as YAML, the form checked in under `crds/`.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut crd = DisaggDeployment::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            sort_defaults(schema);
        }
    }
    serde_saphyr::to_string(&crd)
}

/// Sorts the keys of every `default` object in `schema`. Whether
/// serde_json keeps insertion order depends on which other crates share
/// the build (llguidance turns `preserve_order` on), and the checked-in
/// CRD must not.
fn sort_defaults(schema: &mut apiext::JSONSchemaProps) {
    if let Some(default) = &mut schema.default {
        default.0.sort_all_objects();
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        sort_defaults(child);
    }
    match &mut schema.items {
        Some(apiext::JSONSchemaPropsOrArray::Schema(item)) => sort_defaults(item),
        Some(apiext::JSONSchemaPropsOrArray::Schemas(items)) => {
            items.iter_mut().for_each(sort_defaults)
        }
        None => {}
    }
    if let Some(apiext::JSONSchemaPropsOrBool::Schema(extra)) = &mut schema.additional_properties {
        sort_defaults(extra);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of] {
        list.iter_mut().flatten().for_each(sort_defaults);
    }
}
