//! The `xpyd-operator` binary as deployed: health and metrics endpoints,
//! JSON logs, leader election between two replicas, graceful shutdown.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use xpyd_e2e::{ControlPlane, Etcd, Tools, Workdir, wait_until};
use xpyd_operator::crd::DisaggDeployment;

use common::{TIMEOUT, namespace, object, plane_with_crd, spec};

/// An operator process, killed if the test ends without stopping it.
struct Operator {
    child: Child,
    http: String,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(plane: &ControlPlane, ns: &str, identity: &str, log_dir: &Path) -> Operator {
    start_with(plane, ns, identity, log_dir, &[])
}

fn start_with(
    plane: &ControlPlane,
    ns: &str,
    identity: &str,
    log_dir: &Path,
    extra: &[&str],
) -> Operator {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let log = std::fs::File::create(log_dir.join(format!("{identity}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_xpyd-operator"))
        .args([
            "run",
            "--log-json",
            "--watch-namespace",
            ns,
            "--lease-namespace",
            ns,
        ])
        .args([
            "--identity",
            identity,
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .args(extra)
        .env("KUBECONFIG", plane.kubeconfig())
        .env("XPYD_LOG", "info")
        // As in the chart's pod: the Lease lives in the pod's namespace.
        .env("POD_NAMESPACE", ns)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    Operator {
        child,
        http: format!("http://127.0.0.1:{port}"),
    }
}

async fn get(url: String) -> Result<(u16, String), reqwest::Error> {
    let resp = reqwest::get(url).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// Sends SIGTERM and waits for a clean exit.
async fn terminate(operator: &mut Operator) {
    let status = Command::new("kill")
        .args(["-TERM", &operator.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(status) = operator.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the operator exits within 20 s of SIGTERM");
    assert!(exited.success(), "the operator exited with {exited}");
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("xpyd-operator-leader")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

#[tokio::test]
async fn two_replicas_elect_one_leader_which_hands_over_on_sigterm() {
    let (plane, client) = plane_with_crd().await;
    let ns = "operator-binary";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-binary").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();

    let mut a = start(plane, ns, "replica-a", dir.path());
    for path in ["/healthz", "/readyz"] {
        let url = format!("{}{path}", a.http);
        wait_until(path, TIMEOUT, || {
            let url = url.clone();
            async move { Ok::<_, reqwest::Error>(get(url).await?.0 == 200) }
        })
        .await
        .unwrap();
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    wait_until("replica-a to lead", TIMEOUT, || async {
        Ok::<_, String>(holder(&leases).await.as_deref() == Some("replica-a"))
    })
    .await
    .unwrap();
    let mut b = start(plane, ns, "replica-b", dir.path());

    let dds: Api<DisaggDeployment> = Api::namespaced(client.clone(), ns);
    let obj = object("bin", spec(&etcd.endpoint(), 1, 1));
    dds.patch(
        "bin",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
    let ready = |want_decode: i32| {
        let dds = dds.clone();
        move || {
            let dds = dds.clone();
            async move {
                let dd = dds.get("bin").await?;
                let s = dd.status.unwrap_or_default();
                Ok::<_, kube::Error>(
                    s.decode.ready == want_decode
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True"),
                )
            }
        }
    };
    wait_until("bin Ready under replica-a", TIMEOUT, ready(1))
        .await
        .unwrap();

    let (_, metrics) = get(format!("{}/metrics", a.http)).await.unwrap();
    assert!(
        metrics.contains("xpyd_operator_reconciles_total{result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("xpyd_operator_reconcile_duration_seconds_bucket"),
        "{metrics}"
    );
    // The standby has not reconciled anything.
    let (_, standby) = get(format!("{}/metrics", b.http)).await.unwrap();
    assert!(!standby.contains("result=\"ok\""), "{standby}");
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-a"));

    // SIGTERM: a exits cleanly and releases the Lease; b takes over.
    terminate(&mut a).await;
    wait_until("replica-b to lead", TIMEOUT, || async {
        Ok::<_, String>(holder(&leases).await.as_deref() == Some("replica-b"))
    })
    .await
    .unwrap();
    dds.patch(
        "bin",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"numDecode": 2}})),
    )
    .await
    .unwrap();
    wait_until("bin scaled under replica-b", TIMEOUT, ready(2))
        .await
        .unwrap();

    // Logs are JSON lines.
    let log = std::fs::read_to_string(dir.path().join("replica-a.log")).unwrap();
    let first = log.lines().next().expect("replica-a logged something");
    let line: serde_json::Value = serde_json::from_str(first).expect("a JSON log line");
    assert!(line.get("level").is_some(), "{first}");

    // The last replica leaves no Lease behind.
    terminate(&mut b).await;
    assert!(
        leases
            .get_opt("xpyd-operator-leader")
            .await
            .unwrap()
            .is_none(),
        "the Lease outlived the operator"
    );
}

#[tokio::test]
async fn the_lease_goes_with_the_leading_pod_even_when_the_operator_cannot_release_it() {
    let (plane, client) = plane_with_crd().await;
    let ns = "operator-binary-lease-owner";
    namespace(&client, ns).await;
    let dir = Workdir::new("operator-binary-lease-owner").unwrap();
    // The pod the operator would run in (never scheduled: nothing runs it).
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "operator-pod"},
        "spec": {
            "nodeSelector": {"xpyd.test/nowhere": "true"},
            "containers": [{"name": "operator", "image": "xpyd/operator:test"}],
        },
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let mut op = start_with(plane, ns, "operator-pod", dir.path(), &["--pod-uid", &uid]);
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    wait_until("a Lease owned by the pod", TIMEOUT, || async {
        let lease = leases.get_opt("xpyd-operator-leader").await?;
        Ok::<_, kube::Error>(lease.is_some_and(|l| {
            l.metadata
                .owner_references
                .unwrap_or_default()
                .iter()
                .any(|o| o.kind == "Pod" && o.uid == uid)
        }))
    })
    .await
    .unwrap();
    // Killed without a chance to release (as when helm uninstall removed
    // the RBAC first), then the pod goes: the garbage collector takes the
    // Lease.
    op.child.kill().unwrap();
    op.child.wait().unwrap();
    assert!(
        leases
            .get_opt("xpyd-operator-leader")
            .await
            .unwrap()
            .is_some()
    );
    pods.delete("operator-pod", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_until("the Lease to be garbage-collected", TIMEOUT, || async {
        Ok::<_, kube::Error>(leases.get_opt("xpyd-operator-leader").await?.is_none())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn without_leader_election_a_single_replica_reconciles_at_once() {
    let (plane, client) = plane_with_crd().await;
    let ns = "operator-binary-single";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-binary-single").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let mut op = start_with(plane, ns, "single", dir.path(), &["--no-leader-election"]);

    let dds: Api<DisaggDeployment> = Api::namespaced(client.clone(), ns);
    let obj = object("single", spec(&etcd.endpoint(), 0, 1));
    dds.patch(
        "single",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
    wait_until("single Ready", TIMEOUT, || {
        let dds = dds.clone();
        async move {
            let s = dds.get("single").await?.status.unwrap_or_default();
            Ok::<_, kube::Error>(
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True"),
            )
        }
    })
    .await
    .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    assert_eq!(
        holder(&leases).await,
        None,
        "no Lease without leader election"
    );
    terminate(&mut op).await;
}
