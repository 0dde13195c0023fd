//! The user's path on a real control plane, with the real `helm` and
//! `kubectl`: `helm install` the chart, `kubectl apply` a sample, watch
//! `kubectl get dd` report the workers Ready, `kubectl scale`, change the
//! remote-prefill threshold and see it in etcd, then uninstall and see the
//! children and etcd keys go.
//!
//! kwok nodes have no kubelet, so the operator pod the chart creates never
//! runs a container (kwok only marks it Running). The operator therefore runs
//! here as a process outside the cluster, authenticated with a token of the
//! chart's ServiceAccount (`kubectl create token`), so it has exactly the
//! chart's RBAC: a missing grant fails this test. What is not exercised:
//! the container image, and the chart's optional etcd/NATS pods (kwok runs
//! nothing); the CR's etcd endpoint is rewritten to the harness's etcd.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, ListParams};
use serde_json::Value;
use xpyd_api::Scope;
use xpyd_e2e::{ControlPlane, Etcd, Workdir, shared_control_plane, wait_until};

use common::TIMEOUT;

const RELEASE_NS: &str = "xpyd-system";
const NS: &str = "demo";
const DD: &str = "smollm-1p1d";
/// The chart's ServiceAccount for release `xpyd`.
const SERVICE_ACCOUNT: &str = "xpyd";
/// Longest a single kubectl or helm command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Cli<'a> {
    plane: &'a ControlPlane,
    helm_home: PathBuf,
}

impl Cli<'_> {
    async fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["--request-timeout=30s"];
        all.extend_from_slice(args);
        self.plane
            .kubectl(&all, COMMAND_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    async fn helm(&self, args: &[&str]) -> String {
        self.plane
            .helm(&self.helm_home, args, COMMAND_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("helm {args:?}: {e}"))
    }

    /// `kubectl get dd` as the user reads it: column name to value.
    async fn get_dd(&self) -> Vec<(String, String)> {
        let table = self.kubectl(&["get", "dd", DD, "-n", NS]).await;
        let mut lines = table.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let row: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        header
            .iter()
            .zip(row)
            .map(|(h, v)| (h.to_string(), v.to_string()))
            .collect()
    }

    /// Waits for `kubectl get dd` to show `want`; on timeout, fails with the
    /// operator's log, which says what it could not do.
    async fn wait_dd(&self, operator: &Operator, what: &str, want: &[(&str, &str)]) {
        let waited = wait_until(what, TIMEOUT, || async {
            let got = self.get_dd().await;
            let ok = want
                .iter()
                .all(|(k, v)| got.iter().any(|(gk, gv)| gk == k && gv == v));
            if ok {
                Ok(true)
            } else {
                Err(format!("kubectl get dd: {got:?}"))
            }
        })
        .await;
        if let Err(e) = waited {
            let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!("{e}\noperator log (last 30 lines):\n{}", tail.join("\n"));
        }
    }
}

/// A kubeconfig that authenticates as the chart's ServiceAccount, the way
/// the operator pod would: a bound token, the cluster's CA.
async fn service_account_kubeconfig(cli: &Cli<'_>, dir: &Path) -> PathBuf {
    let token = cli
        .kubectl(&[
            "create",
            "token",
            SERVICE_ACCOUNT,
            "-n",
            RELEASE_NS,
            "--duration=1h",
        ])
        .await;
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(cli.plane.kubeconfig()).unwrap()).unwrap();
    config["users"][0]["user"] = serde_json::json!({ "token": token.trim() });
    let path = dir.join("operator.kubeconfig");
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    path
}

/// The operator binary, killed when dropped.
struct Operator {
    child: tokio::process::Child,
    http: String,
    log: PathBuf,
}

impl Operator {
    fn start(kubeconfig: &Path, dir: &Path) -> Operator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let log = dir.join("operator.log");
        let out = std::fs::File::create(&log).unwrap();
        // The flags and environment the chart's Deployment gives the pod.
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_xpyd-operator"))
            .args([
                "run",
                "--log-json",
                &format!("--http-addr=127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", RELEASE_NS)
            .env("POD_NAME", "xpyd-operator-e2e")
            .env("XPYD_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Operator {
            child,
            http: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

async fn etcd_json(etcd: &Etcd, key: &str) -> Option<Value> {
    let mut client = etcd.client().await.ok()?;
    let resp = client.get(key, None).await.ok()?;
    let kv = resp.kvs().first()?;
    serde_json::from_slice(kv.value()).ok()
}

async fn etcd_keys(etcd: &Etcd, prefix: &str) -> usize {
    let mut client = etcd.client().await.unwrap();
    let resp = client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    resp.kvs().len()
}

async fn owned_children(client: &kube::Client) -> usize {
    let lp = ListParams::default().labels(&format!("xpyd.dev/deployment={DD}"));
    let d = Api::<Deployment>::namespaced(client.clone(), NS)
        .list(&lp)
        .await
        .unwrap();
    let s = Api::<Service>::namespaced(client.clone(), NS)
        .list(&lp)
        .await
        .unwrap();
    let c = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .list(&lp)
        .await
        .unwrap();
    d.items.len() + s.items.len() + c.items.len()
}

#[tokio::test]
async fn helm_install_serve_scale_retune_and_uninstall() {
    let plane = shared_control_plane().await.expect("control plane starts");
    let client = plane.client().await.unwrap();
    let dir = Workdir::new("helm-install").unwrap();
    let etcd = Etcd::start(plane.tools(), &dir.subdir("etcd").unwrap())
        .await
        .unwrap();
    let cli = Cli {
        plane,
        helm_home: dir.subdir("helm").unwrap(),
    };
    let chart = repo().join("charts/xpyd");

    // helm install: CRD, operator Deployment, RBAC, dashboards. --wait sees
    // the (kwok-faked) operator pod Ready.
    let notes = cli
        .helm(&[
            "install",
            "xpyd",
            chart.to_str().unwrap(),
            "-n",
            RELEASE_NS,
            "--create-namespace",
            "--wait",
            "--timeout=120s",
        ])
        .await;
    assert!(notes.contains("STATUS: deployed"), "{notes}");
    assert!(
        notes.contains("kubectl delete dd --all"),
        "NOTES explain uninstall: {notes}"
    );
    let crds = cli.kubectl(&["get", "crd", "-o", "name"]).await;
    assert!(crds.contains("disaggdeployments.xpyd.dev"), "{crds}");
    let dashboards = cli
        .kubectl(&[
            "get",
            "configmap",
            "-n",
            RELEASE_NS,
            "-l",
            "grafana_dashboard=1",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(dashboards.lines().count(), 4, "{dashboards}");

    // The ServiceAccount can do what the operator does, and nothing like
    // reading Secrets.
    let sa = format!("--as=system:serviceaccount:{RELEASE_NS}:{SERVICE_ACCOUNT}");
    for (verb, resource, allowed) in [
        ("patch", "deployments.apps", "yes"),
        ("watch", "disaggdeployments.xpyd.dev", "yes"),
        ("get", "secrets", "no"),
        ("delete", "disaggdeployments.xpyd.dev", "no"),
        ("create", "pods", "no"),
        ("patch", "pods", "yes"),
        ("list", "horizontalpodautoscalers.autoscaling", "yes"),
    ] {
        let kubectl = plane.tools().kubectl();
        let kubeconfig = plane.kubeconfig().display().to_string();
        // `can-i` exits 1 for "no", so its status is not checked here.
        let out = tokio::time::timeout(
            COMMAND_TIMEOUT,
            tokio::process::Command::new(&kubectl)
                .args([
                    "--kubeconfig",
                    &kubeconfig,
                    "auth",
                    "can-i",
                    verb,
                    resource,
                    "-n",
                    NS,
                    &sa,
                ])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("kubectl auth can-i answers")
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            allowed,
            "can the operator {verb} {resource}?"
        );
    }

    // The operator, as the chart's ServiceAccount.
    let kubeconfig = service_account_kubeconfig(&cli, dir.path()).await;
    let mut operator = Operator::start(&kubeconfig, dir.path());

    // kubectl apply the sample, its etcd pointed at the harness's etcd (the
    // chart's optional etcd would be a kwok pod that runs nothing).
    cli.kubectl(&["create", "namespace", NS]).await;
    let sample = std::fs::read_to_string(repo().join("config/samples/1p1d.yaml")).unwrap();
    let sample = sample.replace("http://xpyd-etcd.xpyd-system:2379", &etcd.endpoint());
    assert!(sample.contains(&etcd.endpoint()));
    let sample_path = dir.path().join("1p1d.yaml");
    std::fs::write(&sample_path, sample).unwrap();
    cli.kubectl(&["apply", "-n", NS, "-f", sample_path.to_str().unwrap()])
        .await;
    cli.wait_dd(
        &operator,
        "kubectl get dd to show 1/1 prefill, 1/1 decode, Ready",
        &[
            ("PREFILL", "1/1"),
            ("DECODE", "1/1"),
            ("READY", "True"),
            ("THRESHOLD", "512"),
        ],
    )
    .await;
    let pods = cli
        .kubectl(&["get", "pods", "-n", NS, "--no-headers"])
        .await;
    assert_eq!(pods.lines().count(), 3, "frontend, prefill, decode: {pods}");
    assert!(pods.lines().all(|l| l.contains("Running")), "{pods}");

    // kubectl scale: the decode workers (the scale subresource).
    cli.kubectl(&["scale", "dd", DD, "-n", NS, "--replicas=3"])
        .await;
    cli.wait_dd(
        &operator,
        "kubectl get dd to show 3/3 decode workers",
        &[("DECODE", "3/3"), ("READY", "True")],
    )
    .await;
    let decode = cli
        .kubectl(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "xpyd.dev/role=decode",
            "--no-headers",
        ])
        .await;
    assert_eq!(decode.lines().count(), 3, "{decode}");

    // A new threshold reaches etcd, where the routers watch it.
    let key = Scope::new(NS, DD).settings_key();
    assert_eq!(
        etcd_json(&etcd, &key).await.unwrap()["maxLocalPrefillLength"],
        512
    );
    cli.kubectl(&[
        "patch",
        "dd",
        DD,
        "-n",
        NS,
        "--type=merge",
        "-p",
        r#"{"spec":{"router":{"maxLocalPrefillLength":2048}}}"#,
    ])
    .await;
    wait_until("the new threshold in etcd", TIMEOUT, || async {
        let v = etcd_json(&etcd, &key).await;
        Ok::<_, String>(v.is_some_and(|v| v["maxLocalPrefillLength"] == 2048))
    })
    .await
    .unwrap();
    cli.wait_dd(
        &operator,
        "kubectl get dd to show threshold 2048",
        &[("THRESHOLD", "2048")],
    )
    .await;

    // The chart's RBAC sufficed: reconciles succeed and none was refused.
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains("xpyd_operator_reconciles_total{result=\"ok\"}"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(&operator.log).unwrap();
    assert!(
        !log.contains("forbidden"),
        "the operator was refused something:\n{log}"
    );

    // Uninstall, as NOTES.txt and the README say: the CRs first, while the
    // operator runs (its finalizer clears etcd; owner references take the
    // children), then the release.
    assert!(owned_children(&client).await > 0);
    cli.kubectl(&["delete", "dd", "--all", "-n", NS, "--wait", "--timeout=90s"])
        .await;
    wait_until("the children to be garbage-collected", TIMEOUT, || async {
        Ok::<_, String>(owned_children(&client).await == 0)
    })
    .await
    .unwrap();
    assert_eq!(etcd_keys(&etcd, &format!("/xpyd/{NS}/")).await, 0);
    cli.helm(&[
        "uninstall",
        "xpyd",
        "-n",
        RELEASE_NS,
        "--wait",
        "--timeout=120s",
    ])
    .await;
    // The operator pod would now be gone; stop the process that stood in for it.
    let _ = operator.child.kill().await;
    let left = cli
        .kubectl(&[
            "get",
            "deployment,serviceaccount,service,configmap,role,rolebinding",
            "-n",
            RELEASE_NS,
            "-l",
            "app.kubernetes.io/instance=xpyd",
            "-o",
            "name",
        ])
        .await;
    assert!(left.trim().is_empty(), "left behind: {left}");
    let cluster = cli
        .kubectl(&["get", "clusterrole,clusterrolebinding", "-o", "name"])
        .await;
    assert!(!cluster.contains("xpyd-operator"), "{cluster}");
    // helm never deletes CRDs from crds/ (documented): the CRD stays, empty.
    let crds = cli.kubectl(&["get", "crd", "-o", "name"]).await;
    assert!(crds.contains("disaggdeployments.xpyd.dev"), "{crds}");
    let dds = cli.kubectl(&["get", "dd", "-A", "-o", "name"]).await;
    assert!(dds.trim().is_empty(), "{dds}");
}
