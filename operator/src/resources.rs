//! Pure builders of the objects a `DisaggDeployment` owns: one Deployment
//! and one Service per role, the agent ConfigMap and an optional Ingress.
//!
//! Nothing here talks to the API server; the controller applies what these
//! return with server-side apply. The agent contract lives here too: every
//! pod runs `xpyd-agent <role>`, reads its settings from `XPYD_*` variables
//! and the mounted ConfigMap, and serves `/health` (liveness), `/ready`
//! (readiness) and `/metrics` on [`METRICS_PORT`]; the frontend also serves
//! the OpenAI API on `spec.frontend.port`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, LocalObjectReference, ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::crd::{DisaggDeployment, DisaggDeploymentSpec, WorkerSpec};
use crate::router_settings::settings_key;

/// Label naming the `DisaggDeployment` an object belongs to.
pub const DEPLOYMENT_LABEL: &str = "xpyd.dev/deployment";
/// Label naming the role (`frontend`, `prefill`, `decode`).
pub const ROLE_LABEL: &str = "xpyd.dev/role";
/// `app.kubernetes.io/managed-by` value on everything the operator owns.
pub const MANAGED_BY: &str = "xpyd-operator";
/// Pod annotation with the hash of the agent configuration, so a change to
/// it rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "xpyd.dev/config-hash";
/// Port of `/health`, `/ready` and `/metrics` in every agent.
pub const METRICS_PORT: i32 = 9090;
/// Key of the agent configuration in the ConfigMap.
pub const CONFIG_FILE: &str = "agent.json";
/// Where the ConfigMap is mounted in the pods.
pub const CONFIG_DIR: &str = "/etc/xpyd";

/// The three kinds of pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// HTTP API, tokenizer and router.
    Frontend,
    /// Computes KV caches of long prompts.
    Prefill,
    /// Decodes, prefilling short prompts locally.
    Decode,
}

impl Role {
    /// All roles.
    pub const ALL: [Role; 3] = [Role::Frontend, Role::Prefill, Role::Decode];

    /// The name used in labels, object names and the agent's argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

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

    /// Name of the agent ConfigMap.
    pub fn config_map_name(&self) -> String {
        format!("{}-agent", self.name)
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

/// The agent configuration file's contents (model and engine; router
/// settings are not here, they live in etcd and change without a restart).
pub fn agent_config(spec: &DisaggDeploymentSpec) -> String {
    let config = json!({
        "model": {
            "name": spec.model.name,
            "source": spec.model.source,
            "servedModelName": spec.model.served_name(),
        },
        "engine": spec.engine,
        "frontend": { "port": spec.frontend.port },
    });
    // A `Value` always serializes.
    serde_json::to_string_pretty(&config).unwrap_or_default()
}

/// The ConfigMap holding [`agent_config`].
pub fn config_map(owner: &Owner, spec: &DisaggDeploymentSpec) -> ConfigMap {
    ConfigMap {
        metadata: owner.meta(owner.config_map_name(), None),
        data: Some(BTreeMap::from([(
            CONFIG_FILE.to_string(),
            agent_config(spec),
        )])),
        ..ConfigMap::default()
    }
}

fn config_hash(spec: &DisaggDeploymentSpec) -> String {
    let digest = Sha256::digest(agent_config(spec).as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
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

/// The Deployment of one role.
pub fn deployment(owner: &Owner, spec: &DisaggDeploymentSpec, role: Role) -> Deployment {
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
            settings_key(&owner.namespace, &owner.name),
        ),
        env("XPYD_CONFIG", format!("{CONFIG_DIR}/{CONFIG_FILE}")),
        env("XPYD_MODEL", spec.model.source.clone()),
        env("XPYD_SERVED_MODEL_NAME", spec.model.served_name()),
        env("XPYD_METRICS_PORT", METRICS_PORT.to_string()),
        // The engine settings as the agent's flags' variables (the
        // frontend needs the block size for prefix hashes).
        env("XPYD_BLOCK_SIZE", spec.engine.block_size.to_string()),
        env(
            "XPYD_MAX_BATCH_TOKENS",
            spec.engine.max_batch_tokens.to_string(),
        ),
        env("XPYD_MAX_MODEL_LEN", spec.engine.max_model_len.to_string()),
    ];
    if let Some(blocks) = spec.engine.kv_cache_blocks {
        env.push(self::env("XPYD_NUM_BLOCKS", blocks.to_string()));
    }
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
    let container = Container {
        name: "agent".to_string(),
        image: Some(spec.image.name.clone()),
        image_pull_policy: Some(spec.image.pull_policy.as_str().to_string()),
        command: Some(vec!["xpyd-agent".to_string()]),
        args: Some(vec![role.as_str().to_string()]),
        env: Some(env),
        ports: Some(ports),
        resources: worker.resources.clone(),
        // Loading a model can take minutes; liveness starts after this.
        startup_probe: Some(http_probe("/health", 10, 60)),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        readiness_probe: Some(http_probe("/ready", 5, 2)),
        volume_mounts: Some(vec![VolumeMount {
            name: "agent-config".to_string(),
            mount_path: CONFIG_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
        (CONFIG_HASH_ANNOTATION.to_string(), config_hash(spec)),
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
                    containers: vec![container],
                    node_selector: worker.node_selector.clone(),
                    tolerations: worker.tolerations.clone(),
                    affinity: worker.affinity.clone(),
                    image_pull_secrets: pull_secrets,
                    // Time to drain in-flight requests on shutdown.
                    termination_grace_period_seconds: Some(60),
                    volumes: Some(vec![Volume {
                        name: "agent-config".to_string(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: owner.config_map_name(),
                            ..ConfigMapVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
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
    Some(Ingress {
        metadata: owner.meta(owner.name.clone(), Some(Role::Frontend)),
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
        let c = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    }

    #[test]
    fn each_role_gets_a_deployment_with_its_replicas_labels_and_owner() {
        let dd = sample();
        let owner = Owner::of(&dd).unwrap();
        for (role, replicas) in [(Role::Frontend, 1), (Role::Prefill, 2), (Role::Decode, 3)] {
            let d = deployment(&owner, &dd.spec, role);
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
        let decode = deployment(&owner, &dd.spec, Role::Decode);
        let c = &decode.spec.unwrap().template.spec.unwrap().containers[0];
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
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
        let before = deployment(&owner, &dd.spec, Role::Decode);
        let mut spec = dd.spec.clone();
        spec.router.max_local_prefill_length = 1;
        assert_eq!(before, deployment(&owner, &spec, Role::Decode));
        spec.engine.max_batch_tokens = 1024;
        assert_ne!(before, deployment(&owner, &spec, Role::Decode));
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
