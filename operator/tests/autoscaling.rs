//! The SLO planner on the real control plane: the operator scrapes the
//! pods' `/metrics`, decides, and its decision reaches `status.autoscaling`,
//! the spec, an event and the pods' deletion cost.
//!
//! kwok's pods run nothing, so nothing answers on their IPs. The "pods'"
//! metrics are served from this test process instead: a fault-free
//! stand-in for the agents, exposing the agents' metric names with chosen
//! rates. Each kwok pod is pointed at it through its status `podIP`
//! (127.0.0.1) and the `prometheus.io/port` annotation the operator
//! scrapes by. What is under test is the operator: scraping, signal math,
//! the planner, and the writes. An HPA targeting the same object makes the
//! planner stand back and say so; a role whose pod cannot be scheduled
//! (Pending) gets no more pods, and the status says Pending.

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use xpyd_e2e::{Etcd, Tools, Workdir, wait_until};
use xpyd_operator::scrape::DELETION_COST_ANNOTATION;

use common::{
    TIMEOUT, apply, namespace, object, plane_with_crd, spawn_controller, spawn_controller_config,
    spec, wait_for_dd,
};

/// What a stand-in serves: the agents' series for one role, growing at
/// fixed rates since `start`.
fn exposition(role: &str, start: Instant) -> String {
    let t = start.elapsed().as_secs_f64();
    let n = |per_s: f64| (per_s * t).floor();
    match role {
        // 10 requests/s of 300 prompt tokens (3000 tokens/s entering), 100
        // output tokens each; every TTFT under 0.5 s, every ITL under 25 ms.
        "frontend" => format!(
            "# TYPE xpyd_frontend_requests_received_total counter\n\
             xpyd_frontend_requests_received_total{{model=\"m\"}} {r}\n\
             xpyd_frontend_prompt_tokens_received_total{{model=\"m\"}} {p}\n\
             xpyd_frontend_requests_total{{model=\"m\",endpoint=\"chat\",status=\"200\"}} {r}\n\
             xpyd_frontend_output_tokens_total{{model=\"m\"}} {o}\n\
             xpyd_frontend_time_to_first_token_seconds_bucket{{model=\"m\",le=\"0.25\"}} 0\n\
             xpyd_frontend_time_to_first_token_seconds_bucket{{model=\"m\",le=\"0.5\"}} {r}\n\
             xpyd_frontend_time_to_first_token_seconds_bucket{{model=\"m\",le=\"+Inf\"}} {r}\n\
             xpyd_frontend_inter_token_latency_seconds_bucket{{model=\"m\",le=\"0.025\"}} {o}\n\
             xpyd_frontend_inter_token_latency_seconds_bucket{{model=\"m\",le=\"+Inf\"}} {o}\n",
            r = n(10.0),
            p = n(3000.0),
            o = n(1000.0),
        ),
        // Every prompt goes remote; a fifth of the KV cache in use; two
        // requests running.
        "decode" => format!(
            "xpyd_decode_prefills_total{{location=\"local\"}} 0\n\
             xpyd_decode_prefills_total{{location=\"remote\"}} {r}\n\
             xpyd_decode_prefill_queue_depth 0\n\
             xpyd_engine_kv_blocks 1000\n\
             xpyd_engine_kv_blocks_free 800\n\
             xpyd_engine_running_requests 2\n\
             xpyd_engine_waiting_requests 0\n",
            r = n(10.0),
        ),
        // Long prompts keep arriving, and most stay local: 2 per second go
        // remote, 8 find no prefill worker, 1 times out. The path from
        // prefill worker `local-prefill-0-a` is quarantined (again and
        // again), the one from `local-prefill-1-b` healthy.
        "decode-local" => format!(
            "xpyd_decode_prefills_total{{location=\"local\"}} {l}\n\
             xpyd_decode_prefills_total{{location=\"remote\"}} {r}\n\
             xpyd_decode_prefills_total{{location=\"refused\"}} 0\n\
             xpyd_decode_remote_prefill_fallbacks_total{{reason=\"no_prefill_worker\"}} {n}\n\
             xpyd_decode_remote_prefill_fallbacks_total{{reason=\"timeout\"}} {t}\n\
             xpyd_decode_remote_prefill_fallbacks_total{{reason=\"queue_full\"}} 0\n\
             xpyd_decode_path_quarantined{{prefill=\"local-prefill-0-a\"}} 1\n\
             xpyd_decode_path_quarantined{{prefill=\"local-prefill-1-b\"}} 0\n\
             xpyd_decode_path_transport{{prefill=\"local-prefill-0-a\",transport=\"tcp\"}} 1\n\
             xpyd_decode_path_transport{{prefill=\"local-prefill-1-b\",transport=\"shared_memory\"}} 1\n\
             xpyd_decode_path_quarantines_total {q}\n",
            l = n(9.0),
            r = n(2.0),
            n = n(8.0),
            t = n(1.0),
            q = n(1.0),
        ),
        // Idle between jobs.
        _ => "xpyd_engine_running_requests 0\nxpyd_engine_waiting_requests 0\n".to_string(),
    }
}

/// Serves [`exposition`] for `role` on a free loopback port; returns it.
async fn serve_metrics(role: &'static str, start: Instant) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move { exposition(role, start) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// Waits for a Running pod of `role` of the deployment `dd` and points it at
/// the stand-in on `port` (its `podIP` and `prometheus.io/port`); returns
/// its name.
async fn point_at_stand_in(pods: &Api<Pod>, dd: &str, role: &str, port: u16) -> String {
    let selector = format!("xpyd.dev/deployment={dd},xpyd.dev/role={role}");
    let found = std::sync::Mutex::new(String::new());
    wait_until(&format!("a Running {role} pod"), TIMEOUT, || {
        let pods = pods.clone();
        let selector = selector.clone();
        let found = &found;
        async move {
            let list = pods.list(&ListParams::default().labels(&selector)).await?;
            let running = list.items.into_iter().find(|p| {
                p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            });
            let Some(p) = running else {
                return Ok::<_, kube::Error>(false);
            };
            *found.lock().unwrap() = p.name_any();
            Ok(true)
        }
    })
    .await
    .unwrap();
    let name = found.into_inner().unwrap();
    pods.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"prometheus.io/port": port.to_string()}}}),
        ),
    )
    .await
    .unwrap();
    pods.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}})),
    )
    .await
    .unwrap_or_else(|e| panic!("pointing {name} at 127.0.0.1: {e}"));
    name
}

#[tokio::test]
async fn the_planner_scales_prefill_to_its_bound_and_says_why() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "autoscaling-planner";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-autoscaling").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let _controller = spawn_controller(&client, ns);

    let start = Instant::now();
    let ports = [
        ("frontend", serve_metrics("frontend", start).await),
        ("prefill", serve_metrics("prefill", start).await),
        ("decode", serve_metrics("decode", start).await),
    ];

    // 3000 prompt tokens/s entering against 1000 per prefill worker: 5
    // needed at 70 % utilisation, 3 allowed. Decode: 1000 tokens/s against
    // 5000 per worker and 20 % KV use: 1 is enough.
    let mut obj = object("planned", spec(&etcd.endpoint(), 1, 1));
    obj["spec"]["autoscaling"] = json!({
        "enabled": true,
        "ttftP90Ms": 1000,
        "itlP90Ms": 50,
        "prefill": {"min": 1, "max": 3},
        "decode": {"min": 1, "max": 2},
        "intervalSeconds": 5,
        "capacity": {"prefillTokensPerSecond": 1000, "decodeTokensPerSecond": 5000},
    });
    let api = apply(&client, ns, obj).await;

    // Point each role's first Running pod at its stand-in.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut pointed = Vec::new();
    for (role, port) in ports.iter() {
        pointed.push((
            *role,
            point_at_stand_in(&pods, "planned", role, *port).await,
        ));
    }

    // The decision reaches status and the spec.
    let dd = wait_for_dd(&api, "planned", "the planner to scale prefill to 3", |dd| {
        dd.spec.num_prefill == 3
            && dd
                .status
                .as_ref()
                .and_then(|s| s.autoscaling.as_ref())
                .is_some_and(|a| a.desired.num_prefill == 3)
    })
    .await;
    let a = dd.status.unwrap().autoscaling.unwrap();
    assert_eq!(a.reason, "AtMax", "{a:?}");
    assert_eq!(a.current.num_prefill, 1, "{a:?}");
    assert_eq!(a.desired.num_decode, 1, "decode needs no more: {a:?}");
    assert_eq!(dd.spec.num_decode, 1);
    assert!(
        (a.signals.prefill_tokens_per_second - 3000.0).abs() < 400.0,
        "about 3000 prompt tokens/s entering: {a:?}"
    );
    assert!((a.signals.requests_per_second - 10.0).abs() < 2.0, "{a:?}");
    assert!((a.signals.kv_use - 0.2).abs() < 1e-9, "{a:?}");
    let ttft = a.signals.ttft_p90_ms.expect("a TTFT p90");
    assert!(
        ttft > 250.0 && ttft <= 500.0,
        "in the (0.25, 0.5] s bucket: {ttft}"
    );
    assert!(a.message.contains("prefill: need 5 of 1"), "{}", a.message);
    assert!(a.last_decision_time.is_some());

    // An event says what changed and why.
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_until("the planner's event", TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            Ok::<_, kube::Error>(list.items.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("planned")
                    && e.reason.as_deref() == Some("AtMax")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("numPrefill 1 -> 3"))
            }))
        }
    })
    .await
    .unwrap();

    // The workers' deletion costs follow the work they hold: the busy
    // decode worker costs 2, the idle prefill worker 0.
    for (role, want) in [("decode", "2"), ("prefill", "0")] {
        let name = &pointed.iter().find(|p| p.0 == role).unwrap().1;
        wait_until(&format!("{role} pod deletion cost {want}"), TIMEOUT, || {
            let pods = pods.clone();
            async move {
                let pod = pods.get(name).await?;
                Ok::<_, kube::Error>(
                    pod.annotations()
                        .get(DELETION_COST_ANNOTATION)
                        .map(String::as_str)
                        == Some(want),
                )
            }
        })
        .await
        .unwrap();
    }

    // The new prefill pods come up (kwok), and nothing goes past the bound.
    let dd = wait_for_dd(&api, "planned", "3 prefill workers ready", |dd| {
        dd.status.as_ref().is_some_and(|s| s.prefill.ready == 3)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let later = api.get("planned").await.unwrap();
    assert_eq!(later.spec.num_prefill, 3, "held at max");
    assert_eq!(dd.spec.num_decode, later.spec.num_decode);

    // An HPA on the scale subresource as well: the planner stands back
    // and says why.
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "planned-decode"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "xpyd.dev/v1alpha1", "kind": "DisaggDeployment", "name": "planned"},
            "minReplicas": 1,
            "maxReplicas": 2,
        },
    }))
    .unwrap();
    hpas.create(&PostParams::default(), &hpa).await.unwrap();
    let dd = wait_for_dd(&api, "planned", "the planner to report the HPA", |dd| {
        dd.status
            .as_ref()
            .and_then(|s| s.autoscaling.as_ref())
            .is_some_and(|a| a.reason == "AutoscalingConflict")
    })
    .await;
    let a = dd.status.unwrap().autoscaling.unwrap();
    assert!(a.message.contains("planned-decode"), "{}", a.message);
    assert_eq!(a.desired, a.current, "no change while conflicting");
    hpas.delete("planned-decode", &Default::default())
        .await
        .unwrap();

    // Autoscaling off: the planner's status goes, the counts stay.
    let mut off = object("planned", spec(&etcd.endpoint(), 3, 1));
    off["spec"]["autoscaling"] = json!({"enabled": false});
    apply(&client, ns, off).await;
    wait_for_dd(&api, "planned", "status.autoscaling cleared", |dd| {
        dd.status.as_ref().is_some_and(|s| s.autoscaling.is_none())
    })
    .await;
}

#[tokio::test]
async fn nothing_is_added_while_a_roles_pods_are_pending_and_status_says_so() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "autoscaling-pending";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-autoscaling-pending").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let _controller = spawn_controller(&client, ns);

    // The same demand as above (5 prefill workers' worth), but no node has
    // the 64 GPUs a prefill worker asks for: its one pod stays Pending.
    let start = Instant::now();
    let mut obj = object("starved", spec(&etcd.endpoint(), 1, 1));
    obj["spec"]["prefill"] = json!({"resources": {"limits": {"nvidia.com/gpu": "64"}}});
    obj["spec"]["autoscaling"] = json!({
        "enabled": true,
        "prefill": {"min": 1, "max": 8},
        "decode": {"min": 1, "max": 2},
        "intervalSeconds": 5,
        "capacity": {"prefillTokensPerSecond": 1000, "decodeTokensPerSecond": 5000},
    });
    let api = apply(&client, ns, obj).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for role in ["frontend", "decode"] {
        point_at_stand_in(&pods, "starved", role, serve_metrics(role, start).await).await;
    }

    let dd = wait_for_dd(
        &api,
        "starved",
        "the planner to decide on a full window",
        |dd| {
            dd.status
                .as_ref()
                .and_then(|s| s.autoscaling.as_ref())
                .is_some_and(|a| a.signals.requests_per_second > 0.0)
        },
    )
    .await;
    let a = dd.status.unwrap().autoscaling.unwrap();
    assert_eq!(a.reason, "Pending", "{a:?}");
    assert_eq!(a.signals.prefill_pending, 1, "{a:?}");
    assert_eq!(a.desired.num_prefill, 1, "{a:?}");
    assert!(a.message.contains("prefill: need 5 of 1"), "{}", a.message);
    // Several more windows: still nothing added.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let later = api.get("starved").await.unwrap();
    assert_eq!(later.spec.num_prefill, 1);
    let a = later.status.unwrap().autoscaling.unwrap();
    assert_eq!(
        (a.reason.as_str(), a.desired.num_prefill),
        ("Pending", 1),
        "{a:?}"
    );
}

/// `DisaggregationEffective`, on every deployment with prefill workers
/// (autoscaled or not): its decode workers' counters say most long prompts
/// are prefilled locally, mostly for want of a prefill worker; the
/// condition turns False naming that, with the figures, and one Warning
/// event says so. (Metrics from the stand-in, as above.)
#[tokio::test]
async fn a_deployment_whose_long_prompts_stay_local_shows_disaggregation_ineffective() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "disagg-effective";
    namespace(&client, ns).await;
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new("operator-effectiveness").unwrap();
    let etcd = Etcd::start(&tools, dir.path()).await.unwrap();
    let _controller = spawn_controller_config(
        &client,
        xpyd_operator::controller::Config {
            namespace: Some(ns.to_string()),
            instance: format!("test-{ns}"),
            disaggregation_check_interval: Duration::from_secs(3),
            ..Default::default()
        },
    );
    let port = serve_metrics("decode-local", Instant::now()).await;
    let api = apply(&client, ns, object("local", spec(&etcd.endpoint(), 1, 1))).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let decode_pod = point_at_stand_in(&pods, "local", "decode", port).await;

    let effective = |dd: &xpyd_operator::crd::DisaggDeployment| {
        dd.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "DisaggregationEffective")
                .cloned()
        })
    };
    let dd = wait_for_dd(&api, "local", "DisaggregationEffective False", |dd| {
        effective(dd).is_some_and(|c| c.status == "False")
    })
    .await;
    let c = effective(&dd).unwrap();
    assert_eq!(c.reason, "NoPrefillWorker", "{c:?}");
    assert!(
        c.message
            .contains("prompts over the threshold were prefilled remotely")
            && c.message.contains("not remote: no_prefill_worker")
            && c.message.contains("timeout"),
        "{}",
        c.message
    );
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_until("the DisaggregationIneffective event", TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            Ok::<_, kube::Error>(list.items.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("local")
                    && e.reason.as_deref() == Some("DisaggregationIneffective")
                    && e.type_.as_deref() == Some("Warning")
            }))
        }
    })
    .await
    .unwrap();
    // The paths as the decode worker reports them, and an event saying so.
    let dd = wait_for_dd(&api, "local", "status.kvPaths with a quarantine", |dd| {
        dd.status
            .as_ref()
            .and_then(|s| s.kv_paths.as_ref())
            .is_some_and(|p| p.quarantines_last_window > 0)
    })
    .await;
    let condition = dd
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "DisaggregationEffective")
        })
        .cloned()
        .expect("the condition");
    assert!(
        condition
            .message
            .contains("KV moves over shared_memory (1 path), tcp (1 path), inferred"),
        "{}",
        condition.message
    );
    let paths = dd.status.unwrap().kv_paths.unwrap();
    assert_eq!(paths.healthy, 1, "{paths:?}");
    assert_eq!(
        paths.transports,
        std::collections::BTreeMap::from([("shared_memory".into(), 1), ("tcp".into(), 1)]),
        "the transports UCX is inferred to use"
    );
    assert_eq!(
        paths.quarantined,
        vec![xpyd_operator::crd::KvPath {
            decode: decode_pod.clone(),
            prefill: "local-prefill-0-a".into()
        }]
    );
    wait_until("the KvPathQuarantined event", TIMEOUT, || {
        let events = events.clone();
        let decode_pod = decode_pod.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            Ok::<_, kube::Error>(list.items.iter().any(|e| {
                e.reason.as_deref() == Some("KvPathQuarantined")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains(&format!("local-prefill-0-a -> {decode_pod}")))
            }))
        }
    })
    .await
    .unwrap();
    // Without prefill workers there is nothing to judge: no condition.
    api.patch(
        "local",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"numPrefill": 0}})),
    )
    .await
    .unwrap();
    wait_for_dd(
        &api,
        "local",
        "no DisaggregationEffective condition",
        |dd| effective(dd).is_none() && dd.status.as_ref().is_some_and(|s| s.kv_paths.is_none()),
    )
    .await;
}
