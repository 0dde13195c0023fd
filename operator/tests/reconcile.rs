//! The operator against a real control plane and a real etcd: children,
//! status, scaling, router settings, outages and deletion, as a user of
//! `kubectl` would see them.

mod common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::Ingress;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use xpyd_e2e::{Etcd, Tools, Workdir, wait_until};
use xpyd_operator::crd::DisaggDeployment;

use common::{
    TIMEOUT, apply, kubectl, namespace, object, plane_with_crd, spawn_controller, spec, wait_for_dd,
};

fn condition(dd: &DisaggDeployment, type_: &str) -> Option<(String, String)> {
    dd.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn is_ready(dd: &DisaggDeployment) -> bool {
    condition(dd, "Ready").is_some_and(|(s, _)| s == "True")
        && dd.status.as_ref().and_then(|s| s.observed_generation) == dd.metadata.generation
}

async fn etcd_value(etcd: &Etcd, key: &str) -> Option<Value> {
    let mut client = etcd.client().await.ok()?;
    let got = client.get(key, None).await.ok()?;
    got.kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok())
}

async fn replicas(api: &Api<Deployment>, name: &str) -> Option<i32> {
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|d| d.spec?.replicas)
}

#[tokio::test]
async fn a_deployment_becomes_ready_scales_follows_settings_and_is_cleaned_up() {
    let (plane, client) = plane_with_crd().await;
    let ns = "reconcile-lifecycle";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-lifecycle").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let _controller = spawn_controller(&client, ns);

    let api = apply(&client, ns, object("llama", spec(&etcd.endpoint(), 2, 2))).await;
    let dd = wait_for_dd(&api, "llama", "llama Ready", is_ready).await;
    let uid = dd.uid().unwrap();
    let status = dd.status.clone().unwrap();
    assert_eq!((status.prefill.desired, status.prefill.ready), (2, 2));
    assert_eq!((status.decode.desired, status.decode.ready), (2, 2));
    assert_eq!((status.frontend.desired, status.frontend.ready), (1, 1));
    assert_eq!(status.prefill_ready, "2/2");
    assert!(dd.finalizers().iter().any(|f| f == "xpyd.dev/etcd-cleanup"));

    // Children, each owned by the CR.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for role in ["frontend", "prefill", "decode"] {
        let name = format!("llama-{role}");
        let d = deployments.get(&name).await.unwrap();
        let s = services.get(&name).await.unwrap();
        for owners in [d.owner_references(), s.owner_references()] {
            assert!(
                owners
                    .iter()
                    .any(|o| o.uid == uid && o.controller == Some(true)),
                "{name}"
            );
        }
        let headless = s.spec.unwrap().cluster_ip.as_deref() == Some("None");
        assert_eq!(headless, role != "frontend", "{name} headless");
    }
    // The agent reads env only: no configuration file is written or mounted.
    assert!(config_maps.get_opt("llama-agent").await.unwrap().is_none());

    // kwok runs the pods, labelled by deployment and role.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let decode_pods = pods
        .list(&ListParams::default().labels("xpyd.dev/deployment=llama,xpyd.dev/role=decode"))
        .await
        .unwrap();
    assert_eq!(decode_pods.items.len(), 2);
    for pod in &decode_pods.items {
        assert_eq!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running")
        );
        let c = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.args.as_deref(), Some(&["decode".to_string()][..]));
    }

    // Router settings in etcd at the documented key.
    let key = format!("/xpyd/{ns}/llama/router");
    let settings = etcd_value(&etcd, &key)
        .await
        .expect("router settings in etcd");
    assert_eq!(settings["maxLocalPrefillLength"], 512);
    assert_eq!(settings["generation"], 1);

    // kubectl get shows the columns.
    let out = kubectl(plane, &["get", "dd", "-n", ns]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("PREFILL") && table.contains("THRESHOLD"),
        "{table}"
    );
    assert!(
        table.contains("2/2") && table.contains("kv") && table.contains("True"),
        "{table}"
    );

    // kubectl scale moves numDecode; the Deployment and the status follow.
    let out = kubectl(plane, &["scale", "-n", ns, "dd/llama", "--replicas=3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dd = wait_for_dd(&api, "llama", "3 decode workers ready", |dd| {
        is_ready(dd)
            && dd
                .status
                .as_ref()
                .is_some_and(|s| s.decode.ready == 3 && s.decode.desired == 3)
    })
    .await;
    assert_eq!(dd.spec.num_decode, 3);
    assert_eq!(replicas(&deployments, "llama-decode").await, Some(3));
    // The scale subresource reports the decode pods' selector (for an HPA).
    let out = kubectl(
        plane,
        &[
            "get",
            "dd/llama",
            "-n",
            ns,
            "--subresource=scale",
            "-o",
            "jsonpath={.spec.replicas} {.status.replicas} {.status.selector}",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "3 3 xpyd.dev/deployment=llama,xpyd.dev/role=decode",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(
        plane,
        &[
            "get",
            "dd/llama",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.decodeReady}",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3/3");

    // numPrefill by patch.
    let decode_before = deployments.get("llama-decode").await.unwrap();
    api.patch(
        "llama",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"numPrefill": 1}})),
    )
    .await
    .unwrap();
    wait_for_dd(&api, "llama", "1 prefill worker", |dd| {
        is_ready(dd)
            && dd
                .status
                .as_ref()
                .is_some_and(|s| s.prefill.desired == 1 && s.prefill.ready == 1)
    })
    .await;
    assert_eq!(replicas(&deployments, "llama-prefill").await, Some(1));

    // A new threshold reaches etcd without touching the workers.
    api.patch(
        "llama",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"router": {"maxLocalPrefillLength": 2048}}})),
    )
    .await
    .unwrap();
    let generation = api.get("llama").await.unwrap().metadata.generation.unwrap();
    wait_until("the new threshold in etcd", TIMEOUT, || async {
        Ok::<_, String>(
            etcd_value(&etcd, &key).await.is_some_and(|v| {
                v["maxLocalPrefillLength"] == 2048 && v["generation"] == generation
            }),
        )
    })
    .await
    .unwrap();
    let dd = wait_for_dd(
        &api,
        "llama",
        "status with the new settings generation",
        |dd| {
            is_ready(dd)
                && dd
                    .status
                    .as_ref()
                    .is_some_and(|s| s.router.settings_generation == generation)
        },
    )
    .await;
    assert_eq!(dd.status.unwrap().router.key, key);
    let decode_after = deployments.get("llama-decode").await.unwrap();
    assert_eq!(
        decode_before.metadata.generation, decode_after.metadata.generation,
        "decode Deployment was changed"
    );

    // A router and a decode worker acknowledge; the status counts the
    // router as a router and says which roles acked. (Agents publish their
    // instance record and their ack under their lease; plain puts here.)
    let mut etcd_client = etcd.client().await.unwrap();
    for (role, id) in [("frontend", "frontend-0"), ("decode", "decode-0")] {
        etcd_client
            .put(
                format!("/xpyd/{ns}/llama/instances/{role}/{id}"),
                json!({"instance_id": id, "role": role}).to_string(),
                None,
            )
            .await
            .unwrap();
        etcd_client
            .put(
                format!("/xpyd/{ns}/llama/router-acks/{id}"),
                json!({"generation": generation}).to_string(),
                None,
            )
            .await
            .unwrap();
    }
    let dd = wait_for_dd(&api, "llama", "one router ack", |dd| {
        dd.status
            .as_ref()
            .is_some_and(|s| s.router.acknowledged_by_role.decode == 1)
    })
    .await;
    let router = dd.status.unwrap().router;
    assert_eq!(router.acknowledged, 1, "only the frontend is a router");
    assert_eq!(
        (
            router.acknowledged_by_role.frontend,
            router.acknowledged_by_role.prefill,
            router.acknowledged_by_role.decode
        ),
        (1, 0, 1)
    );

    // A new image rolls the workers.
    api.patch(
        "llama",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"image": {"name": "xpyd/agent:v2"}}})),
    )
    .await
    .unwrap();
    wait_for_dd(&api, "llama", "ready on the new image", is_ready).await;
    let decode = deployments.get("llama-decode").await.unwrap();
    let image = decode.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("xpyd/agent:v2"));

    // Events on the CR.
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_until("Scaled and RouterSettingsApplied events", TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            let reasons: Vec<_> = list
                .items
                .iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("llama"))
                .filter_map(|e| e.reason.clone())
                .collect();
            Ok::<_, kube::Error>(
                ["Created", "Scaled", "RouterSettingsApplied"]
                    .iter()
                    .all(|r| reasons.iter().any(|x| x == r)),
            )
        }
    })
    .await
    .unwrap();

    // Delete: the finalizer removes the etcd keys, GC removes the children.
    api.delete("llama", &DeleteParams::default()).await.unwrap();
    wait_until("the CR to go", TIMEOUT, || async {
        Ok::<_, kube::Error>(api.get_opt("llama").await?.is_none())
    })
    .await
    .unwrap();
    assert_eq!(etcd_value(&etcd, &key).await, None);
    let mut etcd_client = etcd.client().await.unwrap();
    let acks = etcd_client
        .get(
            format!("/xpyd/{ns}/llama/router-acks/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(acks.count(), 0);
    wait_until("children garbage-collected", TIMEOUT, || async {
        let d = deployments.list(&ListParams::default()).await?.items.len();
        let s = services
            .list(&ListParams::default().labels("xpyd.dev/deployment=llama"))
            .await?
            .items
            .len();
        Ok::<_, kube::Error>(d == 0 && s == 0)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_etcd_outage_degrades_the_deployment_until_etcd_returns() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "reconcile-etcd-outage";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-outage").unwrap();
    let mut etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let _controller = spawn_controller(&client, ns);

    let api = apply(&client, ns, object("outage", spec(&etcd.endpoint(), 1, 1))).await;
    wait_for_dd(&api, "outage", "outage Ready", is_ready).await;

    etcd.kill();
    // A change made while etcd is down must not be lost.
    api.patch(
        "outage",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"router": {"maxLocalPrefillLength": 64}}})),
    )
    .await
    .unwrap();
    let dd = wait_for_dd(&api, "outage", "Degraded with EtcdUnavailable", |dd| {
        condition(dd, "Degraded") == Some(("True".into(), "EtcdUnavailable".into()))
    })
    .await;
    assert_eq!(
        condition(&dd, "Ready").map(|c| c.0).as_deref(),
        Some("False")
    );
    assert_eq!(dd.spec.router.max_local_prefill_length, 64);

    etcd.restart().await.unwrap();
    let dd = wait_for_dd(&api, "outage", "recovered", |dd| {
        is_ready(dd) && condition(dd, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    let key = format!("/xpyd/{ns}/outage/router");
    let settings = etcd_value(&etcd, &key)
        .await
        .expect("settings after recovery");
    assert_eq!(settings["maxLocalPrefillLength"], 64);
    assert_eq!(
        Some(settings["generation"].as_i64().unwrap()),
        dd.metadata.generation
    );
}

#[tokio::test]
async fn aggregated_serving_runs_no_prefill_workers_and_ingress_follows_the_spec() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "reconcile-aggregated";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-aggregated").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let _controller = spawn_controller(&client, ns);

    let mut s = spec(&etcd.endpoint(), 0, 1);
    s["frontend"] =
        json!({"ingress": {"enabled": true, "host": "llm.example.com", "tlsSecretName": "tls"}});
    let api = apply(&client, ns, object("agg", s)).await;
    let dd = wait_for_dd(&api, "agg", "agg Ready", is_ready).await;
    assert_eq!(dd.status.unwrap().prefill_ready, "0/0");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    assert!(deployments.get_opt("agg-prefill").await.unwrap().is_none());
    let settings = etcd_value(&etcd, &format!("/xpyd/{ns}/agg/router"))
        .await
        .unwrap();
    assert_eq!(settings["disaggregated"], false);
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), ns);
    let ing = ingresses.get("agg").await.unwrap();
    assert_eq!(
        ing.spec.unwrap().rules.unwrap()[0].host.as_deref(),
        Some("llm.example.com")
    );

    // Going disaggregated adds prefill workers; disabling the ingress removes it.
    api.patch(
        "agg",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"numPrefill": 1, "frontend": {"ingress": {"enabled": false}}}}),
        ),
    )
    .await
    .unwrap();
    wait_for_dd(&api, "agg", "1 prefill worker", |dd| {
        is_ready(dd) && dd.status.as_ref().is_some_and(|s| s.prefill.ready == 1)
    })
    .await;
    assert!(ingresses.get_opt("agg").await.unwrap().is_none());
    wait_until(
        "disaggregated settings",
        Duration::from_secs(30),
        || async {
            Ok::<_, String>(
                etcd_value(&etcd, &format!("/xpyd/{ns}/agg/router"))
                    .await
                    .is_some_and(|v| v["disaggregated"] == true),
            )
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_refused_child_object_degrades_the_deployment_until_the_cause_is_gone() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "reconcile-quota";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-quota").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    // Room for two of the three Deployments.
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), ns);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "two-deployments"},
        "spec": {"hard": {"count/deployments.apps": "2"}},
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    let _controller = spawn_controller(&client, ns);

    let api = apply(&client, ns, object("quota", spec(&etcd.endpoint(), 1, 1))).await;
    let dd = wait_for_dd(&api, "quota", "Degraded with ApplyFailed", |dd| {
        condition(dd, "Degraded") == Some(("True".into(), "ApplyFailed".into()))
    })
    .await;
    let message = dd
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(message.contains("exceeded quota"), "{message}");

    quotas
        .delete("two-deployments", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_dd(&api, "quota", "Ready once the quota is gone", |dd| {
        is_ready(dd) && condition(dd, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
}
