//! The `DisaggDeployment` custom resource (`xpyd.dev/v1alpha1`): its spec,
//! status and the schema the API server validates it with.
//!
//! Validation lives in the generated schema (OpenAPI bounds plus CEL
//! `x-kubernetes-validations`), so a bad spec is rejected by the API server
//! with a message before the operator ever sees it. This module is types only:
//! what the operator builds from them lives in [`crate::resources`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
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
        .field_path(".router.sessionHeader")
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
    /// Decode workers (the scale subresource's replicas).
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
}

/// What to serve.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The model's name, e.g. `SmolLM2-135M-Instruct`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Where the agent loads the weights from: a path inside the pod or an
    /// `http(s)://` URL.
    #[schemars(length(min = 1, max = 2048))]
    pub source: String,
    /// The name clients pass as `model`; defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub served_model_name: Option<String>,
}

impl ModelSpec {
    /// The name the frontend answers to.
    pub fn served_name(&self) -> &str {
        self.served_model_name.as_deref().unwrap_or(&self.name)
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
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Container resources, e.g. `limits: {nvidia.com/gpu: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// KV cache size in blocks per worker; unset lets the engine size it from
    /// free memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_cache_blocks: Option<i64>,
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

impl Default for EngineSpec {
    fn default() -> Self {
        EngineSpec {
            block_size: default_block_size(),
            max_batch_tokens: default_max_batch_tokens(),
            max_model_len: default_max_model_len(),
            kv_cache_blocks: None,
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
    /// `strategy: kv`: weight of the prefix overlap (the fraction of the
    /// prompt's blocks a worker already caches) in a worker's cost.
    #[serde(default = "default_kv_weight")]
    #[schemars(range(min = 0.0))]
    pub kv_overlap_weight: f64,
    /// `strategy: kv`: weight of the load (the fraction of a worker's KV
    /// cache in use, counting this request's new blocks) in a worker's cost.
    #[serde(default = "default_kv_weight")]
    #[schemars(range(min = 0.0))]
    pub kv_load_weight: f64,
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
    /// Routers that acknowledged running that generation (or a later one).
    #[serde(default)]
    pub acknowledged: i32,
}

/// The CRD as YAML, the form checked in under `crds/`.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(&DisaggDeployment::crd())
}
