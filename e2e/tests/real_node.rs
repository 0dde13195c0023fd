//! The real node as a user's cluster would behave: a pod from an image built
//! here runs, its ClusterIP Service (and NodePort) answers from the host and
//! from another pod, and the Service's name resolves through CoreDNS. Once
//! it is dropped, the host is as it was.
//!
//! Needs root and `scripts/setup node`. One real node runs per host; a
//! second test binary that wants one waits for the first (see
//! `xpyd_e2e::host`).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use xpyd_e2e::{ControlPlane, ControlPlaneOptions, RealNode, images, wait_until};

const NS: &str = "smoke";

/// The chart's etcd, as its StatefulSet runs it (command `etcd`), behind a
/// Service with a NodePort.
fn etcd_manifest(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: etcd, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: etcd}}}}
  template:
    metadata: {{labels: {{app: etcd}}}}
    spec:
      containers:
        - name: etcd
          image: {image}
          command: [etcd, --data-dir=/var/lib/etcd, --listen-client-urls=http://0.0.0.0:2379,
                    --advertise-client-urls=http://etcd.{NS}:2379]
          ports: [{{name: client, containerPort: 2379}}]
          readinessProbe:
            httpGet: {{path: /health, port: client}}
            periodSeconds: 1
          volumeMounts: [{{name: data, mountPath: /var/lib/etcd}}]
      volumes: [{{name: data, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: etcd, namespace: {NS}}}
spec:
  type: NodePort
  selector: {{app: etcd}}
  ports: [{{name: client, port: 2379, targetPort: client}}]
"#
    )
}

/// A toolbox pod that resolves the Service by name and asks it for /health,
/// by ClusterIP and by name.
fn client_pod(image: &str, ip: Ipv4Addr) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}}}
spec:
  restartPolicy: Never
  containers:
    - name: client
      image: {image}
      # (no `wget -T`: Debian's static busybox 1.35 segfaults with it)
      command: [sh, -c, "nslookup etcd.{NS}.svc.cluster.local && wget -O - http://{ip}:2379/health && wget -O - http://etcd.{NS}:2379/health"]
"#
    )
}

async fn http_get(url: &str) -> Result<String, reqwest::Error> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    client
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_and_its_service_answers_by_ip_and_by_name() {
    let before = xpyd_e2e::host::snapshot();
    let t0 = Instant::now();
    let plane = ControlPlane::start_for_real_node(ControlPlaneOptions {
        nodes: 0,
        gpus_per_node: 0,
    })
    .await
    .expect("control plane for a real node");
    let plane_up = t0.elapsed();
    let node = RealNode::start(&plane).await.expect("real node");
    eprintln!(
        "control plane up in {:.1}s; real node (registry, system images, containerd, kubelet, \
         kube-proxy, CoreDNS) up in {:.1}s",
        plane_up.as_secs_f64(),
        node.started_in().as_secs_f64()
    );

    let t1 = Instant::now();
    let etcd = node
        .push_image(images::workload::etcd(&plane.tools().etcd, "v3.6.16"))
        .await
        .expect("etcd image");
    eprintln!(
        "etcd image built and pushed in {:.1}s",
        t1.elapsed().as_secs_f64()
    );
    node.kubectl(
        &["apply", "-f", "-"],
        Some(&etcd_manifest(&etcd.reference())),
    )
    .expect("apply etcd");
    let t2 = Instant::now();
    let waited = node.kubectl(
        &[
            "-n",
            NS,
            "wait",
            "--for=condition=Available",
            "deployment/etcd",
            "--timeout=90s",
        ],
        None,
    );
    if let Err(e) = waited {
        let pods = node.kubectl(&["get", "pods", "-A", "-o", "wide"], None);
        let events = node.kubectl(&["-n", NS, "get", "events"], None);
        panic!("etcd never became available: {e}\n{pods:?}\n{events:?}");
    }
    eprintln!(
        "etcd pod (pull, start, ready) in {:.1}s",
        t2.elapsed().as_secs_f64()
    );

    let client = plane.client().await.unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let svc = services.get("etcd").await.unwrap();
    let spec = svc.spec.unwrap();
    let cluster_ip: Ipv4Addr = spec.cluster_ip.unwrap().parse().unwrap();
    let node_port = spec.ports.unwrap()[0].node_port.unwrap();

    // From the host, through kube-proxy's rules: ClusterIP and NodePort.
    for url in [
        format!("http://{cluster_ip}:2379/health"),
        format!("http://{}:{node_port}/health", node.ip()),
    ] {
        wait_until(&format!("GET {url}"), Duration::from_secs(30), || async {
            let body = http_get(&url).await?;
            assert!(body.contains("\"health\":\"true\""), "{url}: {body}");
            Ok::<_, reqwest::Error>(true)
        })
        .await
        .expect("the Service answers from the host");
    }

    // CoreDNS knows the Service.
    assert_eq!(
        node.resolve(&format!("etcd.{NS}.svc.cluster.local"))
            .await
            .unwrap(),
        Some(cluster_ip)
    );
    assert_eq!(
        node.resolve(&format!("no-such-service.{NS}.svc.cluster.local"))
            .await
            .unwrap(),
        None
    );

    // From a pod, by name.
    node.kubectl(
        &["apply", "-f", "-"],
        Some(&client_pod(&node.toolbox_image().reference(), cluster_ip)),
    )
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let phase = |pod: Pod| pod.status.and_then(|s| s.phase).unwrap_or_default();
    let done = wait_until(
        "the client pod to finish",
        Duration::from_secs(90),
        || async {
            let phase = phase(pods.get("client").await?);
            Ok::<_, kube::Error>(phase == "Succeeded" || phase == "Failed")
        },
    )
    .await;
    let phase = phase(pods.get("client").await.unwrap());
    let logs = node.pod_logs(NS, "client");
    assert!(
        done.is_ok() && phase == "Succeeded",
        "client pod {phase}: {done:?}\n{logs}"
    );
    assert!(logs.contains("\"health\":\"true\""), "{logs}");
    assert!(
        logs.contains(&cluster_ip.to_string()),
        "nslookup's answer: {logs}"
    );

    // Teardown leaves nothing behind.
    let node_dir = node.dir().to_path_buf();
    let t3 = Instant::now();
    drop(node);
    eprintln!("real node stopped in {:.1}s", t3.elapsed().as_secs_f64());
    drop(plane);
    let after = xpyd_e2e::host::snapshot();
    assert_eq!(after, before, "the host after the node is not as before");
    assert!(!node_dir.exists(), "{} left behind", node_dir.display());
    eprintln!(
        "real-node smoke test done in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
