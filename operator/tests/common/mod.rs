//! Helpers shared by the operator's integration tests: installing the CRD on
//! the shared control plane, per-test namespaces, an in-process controller
//! and kubectl.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::{Value, json};
use xpyd_e2e::{ControlPlane, shared_control_plane, wait_until};
use xpyd_operator::controller::{self, Config};
use xpyd_operator::crd::DisaggDeployment;
use xpyd_operator::resources::ClusterSettings;

pub const TIMEOUT: Duration = Duration::from_secs(90);

/// The shared control plane with the CRD installed and Established, and a
/// client for this test's runtime.
pub async fn plane_with_crd() -> (&'static ControlPlane, Client) {
    let plane = shared_control_plane().await.expect("control plane starts");
    let client = plane.client().await.expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DisaggDeployment::crd();
    let name = crd.metadata.name.clone().expect("crd name");
    crds.patch(
        &name,
        &PatchParams::apply("xpyd-operator-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applies");
    wait_until("the CRD to be Established", TIMEOUT, || {
        let crds = crds.clone();
        let name = name.clone();
        async move {
            let crd = crds.get(&name).await?;
            Ok::<_, kube::Error>(crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            }))
        }
    })
    .await
    .expect("CRD Established");
    (plane, client)
}

/// Creates a namespace for one test.
pub async fn namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace object");
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// A controller scoped to one namespace, running on the test's runtime,
/// stopped when dropped.
pub struct RunningController(tokio::task::JoinHandle<()>);

impl Drop for RunningController {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn spawn_controller(client: &Client, ns: &str) -> RunningController {
    spawn_controller_with(client, ns, ClusterSettings::default())
}

/// [`spawn_controller`] with the installation's pod settings (the chart's
/// `agents.*` values).
pub fn spawn_controller_with(
    client: &Client,
    ns: &str,
    cluster: ClusterSettings,
) -> RunningController {
    spawn_controller_config(
        client,
        Config {
            namespace: Some(ns.to_string()),
            instance: format!("test-{ns}"),
            cluster,
            ..Config::default()
        },
    )
}

/// Runs the controller with `config`.
pub fn spawn_controller_config(client: &Client, config: Config) -> RunningController {
    RunningController(tokio::spawn(controller::run(
        client.clone(),
        config,
        std::future::pending(),
    )))
}

/// A valid spec (as JSON) with every worker asking for one GPU.
pub fn spec(etcd: &str, num_prefill: i32, num_decode: i32) -> Value {
    json!({
        "model": {"name": "SmolLM2-135M-Instruct", "source": "/models/smollm2.gguf"},
        "image": {"name": "xpyd/agent:test"},
        "numPrefill": num_prefill,
        "numDecode": num_decode,
        "prefill": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "decode": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "etcd": {"endpoints": [etcd]},
        "nats": {"url": "nats://127.0.0.1:4222"},
    })
}

/// A whole DisaggDeployment object.
/// Server-side applies `obj` (a `DisaggDeployment` as `kubectl apply`
/// would send it) in `ns`; the namespaced API, for reading it back.
pub async fn apply(client: &Client, ns: &str, obj: Value) -> Api<DisaggDeployment> {
    let api: Api<DisaggDeployment> = Api::namespaced(client.clone(), ns);
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    api.patch(
        &name,
        &PatchParams::apply("kubectl-test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
    api
}

pub fn object(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "xpyd.dev/v1alpha1",
        "kind": "DisaggDeployment",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// Runs kubectl against the plane and returns its output.
pub fn kubectl(plane: &ControlPlane, args: &[&str]) -> Output {
    std::process::Command::new(plane.tools().kubectl())
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .args(args)
        .output()
        .expect("kubectl runs")
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent")
        .to_path_buf()
}

/// Waits until `check` holds for the CR `name` and returns it.
pub async fn wait_for_dd(
    api: &Api<DisaggDeployment>,
    name: &str,
    what: &str,
    check: impl Fn(&DisaggDeployment) -> bool,
) -> DisaggDeployment {
    wait_until(what, TIMEOUT, || {
        let api = api.clone();
        let check = &check;
        async move { Ok::<_, kube::Error>(check(&api.get(name).await?)) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    api.get(name).await.unwrap()
}
