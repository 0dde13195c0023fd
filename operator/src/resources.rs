//! Pure builders of the objects a `DisaggDeployment` owns: one Deployment
//! and one Service per role, and an optional Ingress.
//!
//! Nothing here talks to the API server; the controller applies what these
//! return with server-side apply. The operator's half of the agent contract
//! lives here too (the agent's half is its flags and their `XPYD_*`
//! variables): every pod runs `xpyd-agent <role>` and reads its settings
//! from the environment only; it serves `/health` (liveness), `/ready`
//! (readiness) and `/metrics` on [`METRICS_PORT`], the frontend also the
//! OpenAI API on `spec.frontend.port`. The model reaches the pod by
//! [`ModelSource`]: a download source gets a [`FETCH_CONTAINER`] init
//! container filling the [`MODEL_CACHE_VOLUME`]; a `pvc://` source a
//! read-only mount of its claim under [`PVC_ROOT`]; a path nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle,
    LifecycleHandler, LocalObjectReference, ObjectFieldSelector, PersistentVolumeClaimVolumeSource,
    PodSpec, PodTemplateSpec, Probe, SecretKeySelector, Service, ServicePort, ServiceSpec,
    SleepAction, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use xpyd_api::Scope;

use crate::crd::{DisaggDeployment, DisaggDeploymentSpec, ModelSource, WorkerSpec};

/// Label naming the `DisaggDeployment` an object belongs to.
pub const DEPLOYMENT_LABEL: &str = "xpyd.dev/deployment";
/// Label naming the role (`frontend`, `prefill`, `decode`).
pub const ROLE_LABEL: &str = "xpyd.dev/role";
/// `app.kubernetes.io/managed-by` value on everything the operator owns.
pub const MANAGED_BY: &str = "xpyd-operator";
/// Pod annotation with a hash of the model, engine and installation
/// settings the pods get, so a change to any of them visibly rolls the pods
/// (the template changes anyway; the hash makes it one field to compare).
pub const CONFIG_HASH_ANNOTATION: &str = "xpyd.dev/config-hash";
/// Port of `/health`, `/ready` and `/metrics` in every agent.
pub const METRICS_PORT: i32 = 9090;
/// Name of the main container.
pub const AGENT_CONTAINER: &str = "agent";
/// Name of the init container that downloads the model.
pub const FETCH_CONTAINER: &str = "fetch-model";
/// Volume the model is downloaded into.
pub const MODEL_CACHE_VOLUME: &str = "model-cache";
/// Where [`MODEL_CACHE_VOLUME`] is mounted (`XPYD_MODEL_CACHE`).
pub const MODEL_CACHE_DIR: &str = "/var/cache/xpyd/models";
/// Volume of a `pvc://` source's claim.
pub const MODEL_PVC_VOLUME: &str = "model-pvc";
/// Where claims of `pvc://` sources are mounted: `<PVC_ROOT>/<claim>`
/// (the agent's default `XPYD_PVC_ROOT`).
pub const PVC_ROOT: &str = "/var/lib/xpyd/pvc";

/// What the operator's installation adds to every pod it writes (from its
/// flags, set by the chart's values).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `HF_ENDPOINT` for `hf://` sources: a hub mirror; unset, the agent
    /// uses `https://huggingface.co`.
    pub hf_endpoint: Option<String>,
}

/// The three kinds of pod: a contract with the agent (its argument, its
/// instance keys), so it lives in `xpyd-api`.
pub use xpyd_api::Role;

/// Why an object cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The CR lacks a field the API server always sets.
    #[error("DisaggDeployment has no {0}")]
    MissingMetadata(&'static str),
}

/// Identity of the owning CR, computed once per reconcile.
#[derive(Clone, Debug)]
pub struct Owner {
    /// CR name.
    pub name: String,
    /// CR namespace.
    pub namespace: String,
    /// Controller owner reference to the CR.
    pub reference: OwnerReference,
}

impl Owner {
    /// The owner identity of `dd`.
    pub fn of(dd: &DisaggDeployment) -> Result<Owner, BuildError> {
        let namespace = dd
            .namespace()
            .ok_or(BuildError::MissingMetadata("namespace"))?;
        let reference = dd
            .controller_owner_ref(&())
            .ok_or(BuildError::MissingMetadata("uid"))?;
        Ok(Owner {
            name: dd.name_any(),
            namespace,
            reference,
        })
    }

    /// Name of a role's Deployment and Service.
    pub fn child_name(&self, role: Role) -> String {
        format!("{}-{}", self.name, role.as_str())
    }

    /// Labels selecting a role's pods.
    pub fn selector_labels(&self, role: Role) -> BTreeMap<String, String> {
        BTreeMap::from([
            (DEPLOYMENT_LABEL.to_string(), self.name.clone()),
            (ROLE_LABEL.to_string(), role.as_str().to_string()),
        ])
    }

    /// The selector as a string, as the scale subresource wants it.
    pub fn selector_string(&self, role: Role) -> String {
        self.selector_labels(role)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn labels(&self, role: Option<Role>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            (DEPLOYMENT_LABEL.to_string(), self.name.clone()),
            (
                "app.kubernetes.io/name".to_string(),
                "xpyd-agent".to_string(),
            ),
            ("app.kubernetes.io/instance".to_string(), self.name.clone()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                MANAGED_BY.to_string(),
            ),
        ]);
        if let Some(role) = role {
            labels.insert(ROLE_LABEL.to_string(), role.as_str().to_string());
            labels.insert(
                "app.kubernetes.io/component".to_string(),
                role.as_str().to_string(),
            );
        }
        labels
    }

    fn meta(&self, name: String, role: Option<Role>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(role)),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Replicas a role should run.
pub fn desired_replicas(spec: &DisaggDeploymentSpec, role: Role) -> i32 {
    match role {
        Role::Frontend => spec.frontend.replicas,
        Role::Prefill => spec.num_prefill,
        Role::Decode => spec.num_decode,
    }
}

/// A short hash of everything a pod template is built from except the
/// replica count and the router settings (which reach running routers
/// through etcd without a restart).
fn config_hash(spec: &DisaggDeploymentSpec, cluster: &ClusterSettings) -> String {
    let mut hasher = Sha256::new();
    // Serializing these types cannot fail (no maps with non-string keys).
    for part in [
        serde_json::to_vec(&spec.model).unwrap_or_default(),
        serde_json::to_vec(&spec.engine).unwrap_or_default(),
        serde_json::to_vec(&spec.image).unwrap_or_default(),
        spec.frontend.port.to_be_bytes().to_vec(),
        spec.termination_grace_period_seconds.to_be_bytes().to_vec(),
        cluster.hf_endpoint.clone().unwrap_or_default().into_bytes(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(&part);
    }
    hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Seconds between startup probes: at most this long after its agent
/// answers, a pod counts as started.
pub const STARTUP_PROBE_PERIOD: i32 = 1;
/// Seconds between readiness probes: at most this long after starting (or
/// registering), a pod is Ready and in its Services' endpoints.
pub const READINESS_PROBE_PERIOD: i32 = 2;

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("metrics".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn worker_spec(spec: &DisaggDeploymentSpec, role: Role) -> &WorkerSpec {
    match role {
        Role::Frontend => &spec.frontend.worker,
        Role::Prefill => &spec.prefill,
        Role::Decode => &spec.decode,
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The model variables every container that touches the model gets (the
/// agent and `fetch-model` alike).
fn model_env(spec: &DisaggDeploymentSpec, cluster: &ClusterSettings) -> Vec<EnvVar> {
    let model = &spec.model;
    let mut vars = vec![env("XPYD_MODEL", model.source.clone())];
    if let Some(sha) = &model.sha256 {
        vars.push(env("XPYD_MODEL_SHA256", sha.clone()));
    }
    match model.source_kind() {
        ModelSource::Download => {
            vars.push(env("XPYD_MODEL_CACHE", MODEL_CACHE_DIR));
            if let Some(secs) = model.fetch_timeout_seconds {
                vars.push(env("XPYD_MODEL_FETCH_TIMEOUT_SECONDS", secs.to_string()));
            }
        }
        ModelSource::Pvc { .. } => vars.push(env("XPYD_PVC_ROOT", PVC_ROOT)),
        ModelSource::Path => {}
    }
    if let Some(endpoint) = &cluster.hf_endpoint {
        vars.push(env("HF_ENDPOINT", endpoint.clone()));
    }
    if let Some(secret) = &model.hf_token_secret {
        vars.push(secret_env("HF_TOKEN", &secret.name, &secret.key));
    }
    vars
}

/// The volumes the model needs, and where the agent mounts them.
fn model_volumes(spec: &DisaggDeploymentSpec) -> (Vec<Volume>, Vec<VolumeMount>) {
    match spec.model.source_kind() {
        ModelSource::Download => {
            let cache = spec.model.cache.clone().unwrap_or_default();
            let volume = match cache.claim_name {
                Some(claim) => Volume {
                    name: MODEL_CACHE_VOLUME.to_string(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim,
                        read_only: None,
                    }),
                    ..Volume::default()
                },
                None => Volume {
                    name: MODEL_CACHE_VOLUME.to_string(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: cache.size_limit,
                        ..EmptyDirVolumeSource::default()
                    }),
                    ..Volume::default()
                },
            };
            let mount = VolumeMount {
                name: MODEL_CACHE_VOLUME.to_string(),
                mount_path: MODEL_CACHE_DIR.to_string(),
                ..VolumeMount::default()
            };
            (vec![volume], vec![mount])
        }
        ModelSource::Pvc { claim } => {
            let volume = Volume {
                name: MODEL_PVC_VOLUME.to_string(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_string(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            };
            let mount = VolumeMount {
                name: MODEL_PVC_VOLUME.to_string(),
                mount_path: format!("{PVC_ROOT}/{claim}"),
                read_only: Some(true),
                ..VolumeMount::default()
            };
            (vec![volume], vec![mount])
        }
        ModelSource::Path => (Vec::new(), Vec::new()),
    }
}

/// The Deployment of one role.
pub fn deployment(
    owner: &Owner,
    spec: &DisaggDeploymentSpec,
    role: Role,
    cluster: &ClusterSettings,
) -> Deployment {
    let worker = worker_spec(spec, role);
    let mut ports = vec![ContainerPort {
        name: Some("metrics".to_string()),
        container_port: METRICS_PORT,
        ..ContainerPort::default()
    }];
    let mut env = vec![
        env("XPYD_ROLE", role.as_str()),
        env("XPYD_DEPLOYMENT", owner.name.clone()),
        env("XPYD_NAMESPACE", owner.namespace.clone()),
        field_env("XPYD_INSTANCE", "metadata.name"),
        field_env("XPYD_POD_IP", "status.podIP"),
        env("XPYD_ETCD_ENDPOINTS", spec.etcd.endpoints.join(",")),
        env("XPYD_NATS_URL", spec.nats.url.clone()),
        env(
            "XPYD_ROUTER_SETTINGS_KEY",
            Scope::new(&owner.namespace, &owner.name).settings_key(),
        ),
        env("XPYD_SERVED_MODEL_NAME", spec.model.served_name()),
        env("XPYD_METRICS_PORT", METRICS_PORT.to_string()),
        env("XPYD_GRACE_SECONDS", spec.drain_grace_seconds().to_string()),
        // The engine settings as the agent's flags' variables (the
        // frontend needs the block size for prefix hashes).
        env("XPYD_BLOCK_SIZE", spec.engine.block_size.to_string()),
        env(
            "XPYD_MAX_BATCH_TOKENS",
            spec.engine.max_batch_tokens.to_string(),
        ),
        env("XPYD_MAX_MODEL_LEN", spec.engine.max_model_len.to_string()),
        env("XPYD_MAX_SEQS", spec.engine.max_seqs.to_string()),
        env("XPYD_DEVICE", spec.engine.device.clone()),
        env(
            "XPYD_REMOTE_PREFILL_TIMEOUT_MS",
            (i64::from(spec.engine.remote_prefill_timeout_seconds) * 1000).to_string(),
        ),
    ];
    // Unset: the agent sizes the cache from the memory the container has
    // left after the weights (`--num-blocks auto`).
    env.push(self::env(
        "XPYD_NUM_BLOCKS",
        spec.engine
            .kv_cache_blocks
            .map_or_else(|| "auto".to_string(), |blocks| blocks.to_string()),
    ));
    env.extend(model_env(spec, cluster));
    if role == Role::Frontend {
        ports.insert(
            0,
            ContainerPort {
                name: Some("http".to_string()),
                container_port: spec.frontend.port,
                ..ContainerPort::default()
            },
        );
        env.push(self::env("XPYD_HTTP_PORT", spec.frontend.port.to_string()));
    }
    // The user's additions come last: for a repeated name the later entry
    // wins, as in any pod spec.
    env.extend(worker.env.iter().cloned());
    let (mut volumes, model_mounts) = model_volumes(spec);
    let mut mounts = model_mounts.clone();
    mounts.extend(worker.volume_mounts.iter().cloned());
    volumes.extend(worker.volumes.iter().cloned());
    let image = Some(spec.image.name.clone());
    let pull_policy = Some(spec.image.pull_policy.as_str().to_string());
    let init_containers = (spec.model.source_kind() == ModelSource::Download).then(|| {
        vec![Container {
            name: FETCH_CONTAINER.to_string(),
            image: image.clone(),
            image_pull_policy: pull_policy.clone(),
            command: Some(vec!["xpyd-agent".to_string(), "fetch-model".to_string()]),
            env: Some(model_env(spec, cluster)),
            volume_mounts: Some(model_mounts),
            // The role's own: a namespace whose quota wants limits accepts
            // the pod, and the pod's request (the larger of init and main)
            // does not grow.
            resources: worker.resources.clone(),
            // The agent writes its last error to /dev/termination-log; the
            // log's tail stands in when it could not.
            termination_message_policy: Some("FallbackToLogsOnError".to_string()),
            ..Container::default()
        }]
    });
    let container = Container {
        name: AGENT_CONTAINER.to_string(),
        image,
        image_pull_policy: pull_policy,
        command: Some(vec!["xpyd-agent".to_string()]),
        args: Some(vec![role.as_str().to_string()]),
        env: Some(env),
        ports: Some(ports),
        resources: worker.resources.clone(),
        // Loading a model can take minutes (up to 10 here); liveness starts
        // after this. Probed each second, so a pod the planner adds is
        // found started, and then Ready, within a second or two of its
        // agent (a 10 s period made every new pod wait up to 15 s more).
        startup_probe: Some(http_probe("/health", STARTUP_PROBE_PERIOD, 600)),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        // Unready after 10 s of failed probes, as before.
        readiness_probe: Some(http_probe("/ready", READINESS_PROBE_PERIOD, 5)),
        // Keep serving while the pod leaves the Services' endpoints, then
        // drain on SIGTERM: a rolling update loses no new connection.
        lifecycle: (spec.pre_stop_seconds() > 0).then(|| Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: i64::from(spec.pre_stop_seconds()),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Container::default()
    };
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
        (
            CONFIG_HASH_ANNOTATION.to_string(),
            config_hash(spec, cluster),
        ),
    ]);
    let pull_secrets = (!spec.image.pull_secrets.is_empty()).then(|| {
        spec.image
            .pull_secrets
            .iter()
            .map(|name| LocalObjectReference { name: name.clone() })
            .collect()
    });
    Deployment {
        metadata: owner.meta(owner.child_name(role), Some(role)),
        spec: Some(DeploymentSpec {
            replicas: Some(desired_replicas(spec, role)),
            selector: LabelSelector {
                match_labels: Some(owner.selector_labels(role)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(owner.labels(Some(role))),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    init_containers,
                    containers: vec![container],
                    node_selector: worker.node_selector.clone(),
                    tolerations: worker.tolerations.clone(),
                    affinity: worker.affinity.clone(),
                    image_pull_secrets: pull_secrets,
                    // Time to drain in-flight requests on shutdown; the
                    // agent's own grace (XPYD_GRACE_SECONDS) ends earlier.
                    termination_grace_period_seconds: Some(i64::from(
                        spec.termination_grace_period_seconds,
                    )),
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The Service of one role: a ClusterIP Service on the API port for the
/// frontend, headless Services (per-pod DNS, metrics) for the workers.
pub fn service(owner: &Owner, spec: &DisaggDeploymentSpec, role: Role) -> Service {
    let metrics = ServicePort {
        name: Some("metrics".to_string()),
        port: METRICS_PORT,
        target_port: Some(IntOrString::String("metrics".to_string())),
        ..ServicePort::default()
    };
    let (cluster_ip, ports) = match role {
        Role::Frontend => (
            None,
            vec![
                ServicePort {
                    name: Some("http".to_string()),
                    port: spec.frontend.port,
                    target_port: Some(IntOrString::String("http".to_string())),
                    ..ServicePort::default()
                },
                metrics,
            ],
        ),
        Role::Prefill | Role::Decode => (Some("None".to_string()), vec![metrics]),
    };
    Service {
        metadata: owner.meta(owner.child_name(role), Some(role)),
        spec: Some(ServiceSpec {
            selector: Some(owner.selector_labels(role)),
            cluster_ip,
            // Workers find each other through etcd; DNS is for scraping.
            publish_not_ready_addresses: (role != Role::Frontend).then_some(true),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The Ingress in front of the frontend Service, when enabled.
pub fn ingress(owner: &Owner, spec: &DisaggDeploymentSpec) -> Option<Ingress> {
    let settings = &spec.frontend.ingress;
    if !settings.enabled {
        return None;
    }
    let backend = IngressBackend {
        service: Some(IngressServiceBackend {
            name: owner.child_name(Role::Frontend),
            port: Some(ServiceBackendPort {
                name: Some("http".to_string()),
                ..ServiceBackendPort::default()
            }),
        }),
        ..IngressBackend::default()
    };
    let tls = settings.tls_secret_name.as_ref().map(|secret| {
        vec![IngressTLS {
            hosts: settings.host.clone().map(|h| vec![h]),
            secret_name: Some(secret.clone()),
        }]
    });
    let mut metadata = owner.meta(owner.name.clone(), Some(Role::Frontend));
    metadata.annotations = (!settings.annotations.is_empty()).then(|| settings.annotations.clone());
    Some(Ingress {
        metadata,
        spec: Some(K8sIngressSpec {
            ingress_class_name: settings.class_name.clone(),
            rules: Some(vec![IngressRule {
                host: settings.host.clone(),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some(settings.path.clone()),
                        path_type: "Prefix".to_string(),
                        backend,
                    }],
                }),
            }]),
            tls,
            ..K8sIngressSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DisaggDeployment;
    use serde_json::json;
    use xpyd_e2e::pod_spec::{assert_fetch_container, env_value, env_values, env_var, pod_spec};

    fn sample() -> DisaggDeployment {
        let mut dd: DisaggDeployment = serde_json::from_value(json!({
            "apiVersion": "xpyd.dev/v1alpha1",
            "kind": "DisaggDeployment",
            "metadata": {"name": "llama", "namespace": "ml", "uid": "1234"},
            "spec": {
                "model": {"name": "m", "source": "/models/m.gguf"},
                "image": {"name": "xpyd/agent:1"},
                "numPrefill": 2,
                "numDecode": 3,
                "decode": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
                "frontend": {"ingress": {"enabled": true, "host": "llm.example.com", "tlsSecretName": "tls"}},
                "etcd": {"endpoints": ["http://etcd:2379", "http://etcd2:2379"]},
                "nats": {"url": "nats://nats:4222"},
            }
        }))
        .unwrap();
        dd.metadata.generation = Some(1);
        dd
    }

    fn env_of(d: &Deployment) -> BTreeMap<String, String> {
        env_values(&pod_spec(d).containers[0])
    }

    #[test]
    fn each_role_gets_a_deployment_with_its_replicas_labels_and_owner() {
        let dd = sample();
        let owner = Owner::of(&dd).unwrap();
        for (role, replicas) in [(Role::Frontend, 1), (Role::Prefill, 2), (Role::Decode, 3)] {
            let d = deployment(&owner, &dd.spec, role, &ClusterSettings::default());
            assert_eq!(
                d.metadata.name.as_deref(),
                Some(&*format!("llama-{}", role.as_str()))
            );
            let refs = d.metadata.owner_references.as_ref().unwrap();
            assert_eq!(refs[0].uid, "1234");
            assert_eq!(refs[0].controller, Some(true));
            let spec = d.spec.as_ref().unwrap();
            assert_eq!(spec.replicas, Some(replicas));
            let labels = spec
                .template
                .metadata
                .as_ref()
                .unwrap()
                .labels
                .as_ref()
                .unwrap();
            assert_eq!(labels[DEPLOYMENT_LABEL], "llama");
            assert_eq!(labels[ROLE_LABEL], role.as_str());
            let c = &spec.template.spec.as_ref().unwrap().containers[0];
            assert_eq!(c.args.as_deref(), Some(&[role.as_str().to_string()][..]));
            assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
            let env = env_of(&d);
            assert_eq!(
                env["XPYD_ETCD_ENDPOINTS"],
                "http://etcd:2379,http://etcd2:2379"
            );
            assert_eq!(env["XPYD_NATS_URL"], "nats://nats:4222");
            assert_eq!(
                env["XPYD_BLOCK_SIZE"],
                dd.spec.engine.block_size.to_string()
            );
            assert_eq!(
                env["XPYD_MAX_MODEL_LEN"],
                dd.spec.engine.max_model_len.to_string()
            );
            assert_eq!(env["XPYD_DEPLOYMENT"], "llama");
            assert_eq!(env["XPYD_NAMESPACE"], "ml");
            // No kvCacheBlocks: the agent sizes the KV cache from free memory.
            assert_eq!(env["XPYD_NUM_BLOCKS"], "auto");
            let annotations = spec
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap();
            assert_eq!(annotations["prometheus.io/scrape"], "true");
        }
        let decode = deployment(&owner, &dd.spec, Role::Decode, &ClusterSettings::default());
        let c = &decode.spec.unwrap().template.spec.unwrap().containers[0];
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
    }

    fn with_model(model: serde_json::Value) -> DisaggDeployment {
        let mut dd = sample();
        dd.spec.model = serde_json::from_value(model).unwrap();
        dd
    }

    fn build(dd: &DisaggDeployment, role: Role, cluster: &ClusterSettings) -> Deployment {
        deployment(&Owner::of(dd).unwrap(), &dd.spec, role, cluster)
    }

    #[test]
    fn a_download_source_gets_an_init_container_filling_the_cache() {
        let dd = with_model(json!({
            "name": "m",
            "source": "hf://org/repo@v1/m.gguf",
            "sha256": "ab".repeat(32),
            "hfTokenSecret": {"name": "hf", "key": "token"},
            "fetchTimeoutSeconds": 7200,
        }));
        let mirror = ClusterSettings {
            hf_endpoint: Some("http://mirror:8080".into()),
        };
        for role in Role::ALL {
            let d = build(&dd, role, &mirror);
            let pod = pod_spec(&d);
            let init = pod.init_containers.as_ref().expect("init container");
            assert_eq!(init.len(), 1);
            let fetch = &init[0];
            assert_eq!(fetch.name, FETCH_CONTAINER);
            assert_fetch_container(fetch, "xpyd/agent:1");
            let agent = &pod.containers[0];
            assert_eq!(fetch.resources, agent.resources, "{role:?}");
            for c in [fetch, agent] {
                let value = |n: &str| env_value(c, n);
                assert_eq!(
                    value("XPYD_MODEL").as_deref(),
                    Some("hf://org/repo@v1/m.gguf")
                );
                assert_eq!(value("XPYD_MODEL_SHA256"), Some("ab".repeat(32)));
                assert_eq!(value("XPYD_MODEL_CACHE").as_deref(), Some(MODEL_CACHE_DIR));
                assert_eq!(
                    value("XPYD_MODEL_FETCH_TIMEOUT_SECONDS").as_deref(),
                    Some("7200")
                );
                assert_eq!(value("HF_ENDPOINT").as_deref(), Some("http://mirror:8080"));
                let token = env_var(c, "HF_TOKEN").unwrap();
                assert_eq!(token.value, None, "the token is never inlined");
                let secret = token
                    .value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                    .unwrap();
                assert_eq!((secret.name.as_str(), secret.key.as_str()), ("hf", "token"));
                let mount = &c.volume_mounts.as_ref().unwrap()[0];
                assert_eq!(
                    (mount.name.as_str(), mount.mount_path.as_str()),
                    (MODEL_CACHE_VOLUME, MODEL_CACHE_DIR)
                );
            }
            let volumes = pod.volumes.as_ref().unwrap();
            assert_eq!(volumes.len(), 1);
            assert_eq!(volumes[0].name, MODEL_CACHE_VOLUME);
            assert!(volumes[0].empty_dir.is_some());
        }
    }

    #[test]
    fn a_cache_claim_replaces_the_empty_dir() {
        let dd = with_model(json!({
            "name": "m",
            "source": "https://models.example.com/m.gguf",
            "cache": {"claimName": "shared-models"},
        }));
        let d = build(&dd, Role::Decode, &ClusterSettings::default());
        let volume = &pod_spec(&d).volumes.as_ref().unwrap()[0];
        assert_eq!(volume.name, MODEL_CACHE_VOLUME);
        assert_eq!(
            volume.persistent_volume_claim.as_ref().unwrap().claim_name,
            "shared-models"
        );
        assert!(volume.empty_dir.is_none());
        // No mirror configured: no HF_ENDPOINT, the agent's default applies.
        let agent = &pod_spec(&d).containers[0];
        assert!(
            !agent
                .env
                .as_ref()
                .unwrap()
                .iter()
                .any(|e| e.name == "HF_ENDPOINT")
        );
    }

    #[test]
    fn a_pvc_source_mounts_its_claim_read_only_without_an_init_container() {
        let dd = with_model(json!({"name": "m", "source": "pvc://weights/smol/m.gguf"}));
        let d = build(&dd, Role::Prefill, &ClusterSettings::default());
        let pod = pod_spec(&d);
        assert!(pod.init_containers.is_none());
        let volume = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(volume.name, MODEL_PVC_VOLUME);
        let claim = volume.persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("weights", Some(true))
        );
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.mount_path, format!("{PVC_ROOT}/weights"));
        assert_eq!(mount.read_only, Some(true));
    }

    #[test]
    fn a_path_source_adds_nothing_but_the_users_volumes_come_after_the_operators() {
        let mut dd = sample();
        dd.spec.decode = serde_json::from_value(json!({
            "env": [{"name": "UCX_TLS", "value": "tcp"}],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
        }))
        .unwrap();
        let d = build(&dd, Role::Decode, &ClusterSettings::default());
        let pod = pod_spec(&d);
        assert!(pod.init_containers.is_none());
        let names: Vec<_> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(names, ["shm"]);
        let agent = &pod.containers[0];
        assert_eq!(
            agent.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/dev/shm"
        );
        assert_eq!(agent.env.as_ref().unwrap().last().unwrap().name, "UCX_TLS");
        // Other roles do not get the decode workers' additions.
        let p = build(&dd, Role::Prefill, &ClusterSettings::default());
        assert!(pod_spec(&p).volumes.is_none());
    }

    #[test]
    fn engine_and_grace_settings_reach_the_agent() {
        let mut dd = sample();
        dd.spec.engine.device = "cpu".into();
        dd.spec.engine.max_seqs = 8;
        dd.spec.engine.remote_prefill_timeout_seconds = 12;
        dd.spec.termination_grace_period_seconds = 45;
        let d = build(&dd, Role::Decode, &ClusterSettings::default());
        let env = env_of(&d);
        assert_eq!(env["XPYD_DEVICE"], "cpu");
        assert_eq!(env["XPYD_MAX_SEQS"], "8");
        assert_eq!(env["XPYD_REMOTE_PREFILL_TIMEOUT_MS"], "12000");
        assert_eq!(env["XPYD_GRACE_SECONDS"], "35");
        assert!(!env.contains_key("XPYD_CONFIG"));
        assert_eq!(pod_spec(&d).termination_grace_period_seconds, Some(45));
        let pre_stop = pod_spec(&d).containers[0]
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map(|s| s.seconds);
        assert_eq!(pre_stop, Some(5), "a preStop sleep before SIGTERM");
        // A grace shorter than the margin still leaves the agent a second.
        dd.spec.termination_grace_period_seconds = 5;
        let d = build(&dd, Role::Decode, &ClusterSettings::default());
        assert_eq!(env_of(&d)["XPYD_GRACE_SECONDS"], "1");
    }

    #[test]
    fn a_new_mirror_rolls_the_pods() {
        let dd = sample();
        let a = build(&dd, Role::Decode, &ClusterSettings::default());
        let b = build(
            &dd,
            Role::Decode,
            &ClusterSettings {
                hf_endpoint: Some("http://mirror".into()),
            },
        );
        let hash = |d: &Deployment| {
            d.spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()[CONFIG_HASH_ANNOTATION]
                .clone()
        };
        assert_ne!(hash(&a), hash(&b));
    }

    #[test]
    fn worker_services_are_headless_and_the_frontend_one_is_not() {
        let dd = sample();
        let owner = Owner::of(&dd).unwrap();
        let fe = service(&owner, &dd.spec, Role::Frontend).spec.unwrap();
        assert_eq!(fe.cluster_ip, None);
        assert_eq!(fe.ports.unwrap()[0].port, 8000);
        let dec = service(&owner, &dd.spec, Role::Decode).spec.unwrap();
        assert_eq!(dec.cluster_ip.as_deref(), Some("None"));
    }

    #[test]
    fn router_settings_do_not_change_the_pod_template_but_engine_settings_do() {
        let dd = sample();
        let owner = Owner::of(&dd).unwrap();
        let before = deployment(&owner, &dd.spec, Role::Decode, &ClusterSettings::default());
        let mut spec = dd.spec.clone();
        spec.router.max_local_prefill_length = 1;
        assert_eq!(
            before,
            deployment(&owner, &spec, Role::Decode, &ClusterSettings::default())
        );
        spec.engine.max_batch_tokens = 1024;
        assert_ne!(
            before,
            deployment(&owner, &spec, Role::Decode, &ClusterSettings::default())
        );
    }

    #[test]
    fn ingress_only_when_enabled_with_tls() {
        let mut dd = sample();
        let owner = Owner::of(&dd).unwrap();
        let ing = ingress(&owner, &dd.spec).unwrap().spec.unwrap();
        assert_eq!(
            ing.rules.unwrap()[0].host.as_deref(),
            Some("llm.example.com")
        );
        assert_eq!(ing.tls.unwrap()[0].secret_name.as_deref(), Some("tls"));
        // The controller's settings pass through, e.g. unbuffered SSE.
        let mut with = dd.spec.clone();
        with.frontend.ingress.annotations.insert(
            "nginx.ingress.kubernetes.io/proxy-buffering".to_string(),
            "off".to_string(),
        );
        let annotations = ingress(&owner, &with)
            .unwrap()
            .metadata
            .annotations
            .unwrap();
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/proxy-buffering"],
            "off"
        );
        assert!(
            ingress(&owner, &dd.spec)
                .unwrap()
                .metadata
                .annotations
                .is_none()
        );
        dd.spec.frontend.ingress.enabled = false;
        assert!(ingress(&owner, &dd.spec).is_none());
    }

    #[test]
    fn a_cr_without_uid_is_an_error_not_a_panic() {
        let mut dd = sample();
        dd.metadata.uid = None;
        assert!(Owner::of(&dd).is_err());
    }
}
