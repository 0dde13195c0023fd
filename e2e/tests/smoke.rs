//! Smoke tests of the harness itself: each real server does what the rest of
//! the test suite relies on.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use xpyd_e2e::{Etcd, GPU_RESOURCE, Nats, Tools, Workdir, shared_control_plane, wait_until};

#[tokio::test]
async fn kwok_nodes_advertise_gpus_to_kube_rs_and_kubectl() {
    let plane = shared_control_plane().await.unwrap();
    let nodes: Api<Node> = Api::all(plane.client().await.unwrap());
    let list = nodes.list(&ListParams::default()).await.unwrap();
    let mut names: Vec<String> = list
        .items
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, plane.node_names());
    for node in &list.items {
        let status = node.status.as_ref().unwrap();
        for quantities in [&status.capacity, &status.allocatable] {
            let gpus = quantities.as_ref().and_then(|q| q.get(GPU_RESOURCE));
            assert_eq!(
                gpus.map(|q| q.0.as_str()),
                Some("8"),
                "{:?}",
                node.metadata.name
            );
        }
    }

    let out = std::process::Command::new(plane.tools().kubectl())
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .args(["get", "nodes", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim_start_matches("node/").to_string())
        .collect();
    assert_eq!(listed, plane.node_names());
}

#[tokio::test]
async fn a_three_replica_gpu_deployment_gets_three_running_pods() {
    let plane = shared_control_plane().await.unwrap();
    let client = plane.client().await.unwrap();
    let ns = "smoke-deploy";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "gpu-workers"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "gpu-workers"}},
            "template": {
                "metadata": {"labels": {"app": "gpu-workers"}},
                "spec": {"containers": [{
                    "name": "worker",
                    "image": "xpyd/agent:test",
                    "resources": {"limits": {GPU_RESOURCE: "1"}},
                }]},
            },
        },
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();

    let pods: Api<Pod> = Api::namespaced(client, ns);
    let selector = ListParams::default().labels("app=gpu-workers");
    wait_until("3 Running pods", Duration::from_secs(90), || {
        let pods = pods.clone();
        let selector = selector.clone();
        async move {
            let list = pods.list(&selector).await?;
            let running = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            Ok::<_, kube::Error>(running == 3)
        }
    })
    .await
    .unwrap();

    let list = pods.list(&selector).await.unwrap();
    assert_eq!(list.items.len(), 3);
    for pod in &list.items {
        let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
        assert!(
            plane.node_names().contains(&node),
            "pod on unknown node {node}"
        );
    }
}

#[tokio::test]
async fn etcd_put_get_watch_and_an_expiring_lease() {
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("smoke-etcd").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let mut client = etcd.client().await.unwrap();

    client.put("xpyd/smoke/a", "1", None).await.unwrap();
    let got = client.get("xpyd/smoke/a", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"1");

    let mut watch = client
        .watch(
            "xpyd/smoke/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    client.put("xpyd/smoke/b", "2", None).await.unwrap();
    // The first response may only confirm the watch was created.
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let resp = watch.message().await.unwrap().expect("watch stream open");
            if let Some(event) = resp.events().first() {
                break event.clone();
            }
        }
    })
    .await
    .expect("a watch event within 10 s");
    let kv = event.kv().unwrap();
    assert_eq!((kv.key(), kv.value()), (&b"xpyd/smoke/b"[..], &b"2"[..]));

    let lease = client.lease_grant(1, None).await.unwrap();
    client
        .put(
            "xpyd/smoke/leased",
            "x",
            Some(etcd_client::PutOptions::new().with_lease(lease.id())),
        )
        .await
        .unwrap();
    assert_eq!(
        client.get("xpyd/smoke/leased", None).await.unwrap().count(),
        1
    );
    // Not kept alive: etcd removes the key once the 1 s lease expires.
    let kv = client.kv_client();
    wait_until("the leased key to expire", Duration::from_secs(15), || {
        let mut kv = kv.clone();
        async move { Ok::<_, etcd_client::Error>(kv.get("xpyd/smoke/leased", None).await?.count() == 0) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn nats_jetstream_publish_and_consume() {
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("smoke-nats").unwrap();
    let nats = Nats::start(&tools, dir.path()).await.unwrap();
    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SMOKE".into(),
        subjects: vec!["smoke.>".into()],
        retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..10 {
        js.publish(format!("smoke.{i}"), i.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let stream = js.get_stream("SMOKE").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("smoke".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let mut got = BTreeMap::new();
    while let Some(msg) = messages.next().await {
        let msg = msg.unwrap();
        got.insert(
            msg.subject.to_string(),
            String::from_utf8(msg.payload.to_vec()).unwrap(),
        );
        msg.ack().await.unwrap();
    }
    let want: BTreeMap<String, String> = (0..10)
        .map(|i| (format!("smoke.{i}"), i.to_string()))
        .collect();
    assert_eq!(got, want);
    // Work-queue retention: acked messages are gone.
    wait_until(
        "acked messages to leave the work queue",
        Duration::from_secs(5),
        || {
            let js = js.clone();
            async move {
                let mut stream = js.get_stream("SMOKE").await.map_err(|e| e.to_string())?;
                let info = stream.info().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(info.state.messages == 0)
            }
        },
    )
    .await
    .unwrap();
}

#[test]
fn nixl_loads_with_the_ucx_plugin_and_the_model_is_the_pinned_file() {
    let lib = xpyd_runtime::transfer::load_nixl().unwrap();
    assert!(
        !nixl_sys::is_stub(),
        "nixl-sys still uses its stub after loading {lib:?}"
    );
    let agent = nixl_sys::Agent::new("smoke").unwrap();
    let plugins = agent.get_available_plugins().unwrap();
    let names: Vec<String> = (0..plugins.len().unwrap())
        .map(|i| plugins.get(i).unwrap().to_string())
        .collect();
    assert!(names.iter().any(|n| n == "UCX"), "plugins found: {names:?}");
    let (_mems, params) = agent.get_plugin_params("UCX").unwrap();
    agent.create_backend("UCX", &params).unwrap();
    assert!(!agent.get_local_md().unwrap().is_empty());

    let model = xpyd_runtime::assets::bundled_model().unwrap();
    xpyd_runtime::assets::verify_sha256(&model, xpyd_runtime::assets::BUNDLED_MODEL_SHA256)
        .unwrap();
}
