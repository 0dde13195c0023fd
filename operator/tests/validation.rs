//! The API server itself rejects bad `DisaggDeployment` specs, with messages
//! that name the field; the sample CRs under `config/samples/` are accepted.

mod common;

use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use xpyd_operator::crd::DisaggDeployment;

use common::{kubectl, namespace, object, plane_with_crd, repo_root, spec};

/// An edit that makes a valid object invalid.
type Change = Box<dyn FnOnce(&mut Value)>;

/// Applies `change` to a valid spec and returns the API server's refusal.
async fn rejection(
    api: &Api<DisaggDeployment>,
    name: &str,
    change: impl FnOnce(&mut Value),
) -> String {
    let mut obj = object(name, spec("http://127.0.0.1:2379", 1, 1));
    change(&mut obj);
    let dd: DisaggDeployment = match serde_json::from_value(obj.clone()) {
        Ok(dd) => dd,
        // Some bad values do not fit the Rust types: send them raw.
        Err(_) => {
            let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
                api.clone().into_client(),
                api.namespace().unwrap_or("default"),
                &kube::api::ApiResource::erase::<DisaggDeployment>(&()),
            );
            let dynamic: kube::api::DynamicObject = serde_json::from_value(obj).unwrap();
            return match raw.create(&PostParams::default(), &dynamic).await {
                Ok(_) => panic!("{name}: accepted"),
                Err(kube::Error::Api(s)) => s.message,
                Err(e) => panic!("{name}: {e}"),
            };
        }
    };
    match api.create(&PostParams::default(), &dd).await {
        Ok(_) => panic!("{name}: the API server accepted an invalid spec"),
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{name}: {}", s.message);
            s.message
        }
        Err(e) => panic!("{name}: {e}"),
    }
}

#[tokio::test]
async fn invalid_specs_are_rejected_with_a_message_naming_the_problem() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "validation";
    namespace(&client, ns).await;
    let api: Api<DisaggDeployment> = Api::namespaced(client, ns);

    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "no-decode",
            Box::new(|o| o["spec"]["numDecode"] = json!(0)),
            "spec.numDecode",
        ),
        (
            "negative-prefill",
            Box::new(|o| o["spec"]["numPrefill"] = json!(-1)),
            "spec.numPrefill",
        ),
        (
            "bad-strategy",
            Box::new(|o| o["spec"]["router"] = json!({"strategy": "fastest"})),
            "Unsupported value: \"fastest\"",
        ),
        (
            "odd-block",
            Box::new(|o| o["spec"]["engine"] = json!({"blockSize": 12})),
            "engine.blockSize must be a power of two",
        ),
        (
            "ingress-no-host",
            Box::new(|o| o["spec"]["frontend"] = json!({"ingress": {"enabled": true}})),
            "frontend.ingress.host is required when frontend.ingress.enabled is true",
        ),
        (
            "threshold-too-big",
            Box::new(|o| {
                o["spec"]["engine"] = json!({"maxModelLen": 1024});
                o["spec"]["router"] = json!({"maxLocalPrefillLength": 4096});
            }),
            "router.maxLocalPrefillLength must not exceed engine.maxModelLen",
        ),
        (
            "negative-gpu",
            Box::new(|o| {
                o["spec"]["prefill"] = json!({"resources": {"limits": {"nvidia.com/gpu": -1}}})
            }),
            "spec.prefill.resources.limits: Invalid value: resources.limits must be non-negative quantities",
        ),
        (
            "negative-memory-request",
            Box::new(|o| {
                o["spec"]["decode"] = json!({"resources": {"requests": {"memory": "-2Gi"}}})
            }),
            "spec.decode.resources.requests",
        ),
        (
            "not-a-quantity",
            Box::new(|o| o["spec"]["decode"] = json!({"resources": {"limits": {"cpu": "two"}}})),
            "resources.limits must be non-negative quantities",
        ),
        (
            "no-etcd",
            Box::new(|o| o["spec"]["etcd"] = json!({"endpoints": []})),
            "spec.etcd.endpoints",
        ),
        (
            "etcd-not-a-url",
            Box::new(|o| o["spec"]["etcd"] = json!({"endpoints": ["etcd:2379"]})),
            "spec.etcd.endpoints[0]",
        ),
        (
            "nats-not-a-url",
            Box::new(|o| o["spec"]["nats"] = json!({"url": "localhost:4222"})),
            "spec.nats.url",
        ),
        (
            "ingress-path",
            Box::new(|o| {
                o["spec"]["frontend"] =
                    json!({"ingress": {"enabled": true, "host": "a.b", "path": "v1"}})
            }),
            "frontend.ingress.path must start with /",
        ),
        (
            "a-name-much-too-long-for-the-children-of-it",
            Box::new(|_| {}),
            "metadata.name must be at most 40 characters",
        ),
        (
            "session-no-header",
            Box::new(|o| o["spec"]["router"] = json!({"strategy": "session", "sessionHeader": ""})),
            "router.sessionHeader must be set when router.strategy is session",
        ),
        (
            "no-model",
            Box::new(|o| o["spec"]["model"]["source"] = json!("")),
            "spec.model.source",
        ),
        (
            "unknown-scheme",
            Box::new(|o| o["spec"]["model"]["source"] = json!("s3://bucket/m.gguf")),
            "spec.model.source: Invalid value: \"s3://bucket/m.gguf\": model.source must be an absolute path or start with https://, http://, hf:// or pvc://",
        ),
        (
            "relative-path",
            Box::new(|o| o["spec"]["model"]["source"] = json!("models/m.gguf")),
            "model.source must be an absolute path or start with",
        ),
        (
            "pvc-no-path",
            Box::new(|o| o["spec"]["model"]["source"] = json!("pvc://weights")),
            "spec.model.source: Invalid value: \"pvc://weights\": model.source: a pvc:// source must be pvc://<claim>/<path>",
        ),
        (
            "pvc-no-claim",
            Box::new(|o| o["spec"]["model"]["source"] = json!("pvc:///m.gguf")),
            "a pvc:// source must be pvc://<claim>/<path>",
        ),
        (
            "hf-no-file",
            Box::new(|o| o["spec"]["model"]["source"] = json!("hf://org/repo")),
            "spec.model.source: Invalid value: \"hf://org/repo\": model.source: an hf:// source must be hf://<org>/<repo>[@<revision>]/<file>",
        ),
        (
            "https-no-file",
            Box::new(|o| o["spec"]["model"]["source"] = json!("https://models.example.com/")),
            "an http(s):// URL must name a host and a file",
        ),
        (
            "https-trailing-slash",
            Box::new(|o| o["spec"]["model"]["source"] = json!("https://models.example.com/a/?x=1")),
            "an http(s):// URL must name a host and a file",
        ),
        (
            "pvc-dot-dot",
            Box::new(|o| o["spec"]["model"]["source"] = json!("pvc://weights/../etc/m.gguf")),
            "spec.model.source: Invalid value: \"pvc://weights/../etc/m.gguf\": model.source: the file's path may not contain '..'",
        ),
        (
            "hf-dot-dot",
            Box::new(|o| o["spec"]["model"]["source"] = json!("hf://org/repo/a/../m.gguf")),
            "model.source: the file's path may not contain '..'",
        ),
        (
            "sha-short",
            Box::new(|o| o["spec"]["model"]["sha256"] = json!("abc123")),
            "spec.model.sha256",
        ),
        (
            "sha-uppercase",
            Box::new(|o| o["spec"]["model"]["sha256"] = json!("B".repeat(64))),
            "spec.model.sha256",
        ),
        (
            "token-without-hf",
            Box::new(|o| o["spec"]["model"]["hfTokenSecret"] = json!({"name": "hf"})),
            "model.hfTokenSecret is only used with an hf:// model.source",
        ),
        (
            "cache-claim-and-size",
            Box::new(|o| {
                o["spec"]["model"]["source"] = json!("https://h/m.gguf");
                o["spec"]["model"]["cache"] = json!({"claimName": "c", "sizeLimit": "1Gi"});
            }),
            "model.cache: sizeLimit applies to the default emptyDir",
        ),
        (
            "kv-too-small",
            Box::new(|o| {
                o["spec"]["engine"] =
                    json!({"kvCacheBlocks": 10, "blockSize": 16, "maxModelLen": 2048})
            }),
            "spec.engine.kvCacheBlocks: Invalid value: engine.kvCacheBlocks x engine.blockSize must hold one engine.maxModelLen sequence",
        ),
        (
            "kv-too-big",
            Box::new(|o| o["spec"]["engine"] = json!({"kvCacheBlocks": 5_000_000_000_i64})),
            "spec.engine.kvCacheBlocks",
        ),
        (
            "frontend-on-metrics-port",
            Box::new(|o| o["spec"]["frontend"] = json!({"port": 9090})),
            "spec.frontend.port: Invalid value: frontend.port must not be 9090",
        ),
        (
            "bad-device",
            Box::new(|o| o["spec"]["engine"] = json!({"device": "gpu"})),
            "spec.engine.device",
        ),
        (
            "zero-max-seqs",
            Box::new(|o| o["spec"]["engine"] = json!({"maxSeqs": 0})),
            "spec.engine.maxSeqs",
        ),
        (
            "zero-grace",
            Box::new(|o| o["spec"]["terminationGracePeriodSeconds"] = json!(0)),
            "spec.terminationGracePeriodSeconds",
        ),
    ];
    let mut failures = Vec::new();
    for (name, change, want) in cases {
        let message = rejection(&api, name, change).await;
        if !message.contains(want) {
            failures.push(format!("{name}: wanted {want:?} in {message:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn defaults_are_filled_in_by_the_api_server() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "validation-defaults";
    namespace(&client, ns).await;
    let api: Api<DisaggDeployment> = Api::namespaced(client, ns);
    let dd: DisaggDeployment =
        serde_json::from_value(object("defaults", spec("http://127.0.0.1:2379", 1, 1))).unwrap();
    let created = api.create(&PostParams::default(), &dd).await.unwrap();
    assert_eq!(created.spec.engine.block_size, 16);
    assert_eq!(created.spec.router.max_local_prefill_length, 512);
    assert_eq!(created.spec.frontend.port, 8000);
    assert_eq!(created.spec.router.session_header, "session-id");
    assert_eq!(created.spec.engine.device, "auto");
    assert_eq!(created.spec.engine.max_seqs, 16);
    assert_eq!(created.spec.engine.remote_prefill_timeout_seconds, 30);
    assert_eq!(created.spec.termination_grace_period_seconds, 60);
}

#[tokio::test]
async fn every_source_kind_and_the_pass_through_fields_are_accepted() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "validation-sources";
    namespace(&client, ns).await;
    let api: Api<DisaggDeployment> = Api::namespaced(client, ns);
    let sha = "0123456789abcdef".repeat(4);
    for (name, model) in [
        ("path", json!({"name": "m", "source": "/models/m.gguf"})),
        (
            "https",
            json!({"name": "m", "source": "https://h.example/a/m.gguf?sig=1", "sha256": sha}),
        ),
        (
            "http",
            json!({"name": "m", "source": "http://10.0.0.1:8080/m.gguf", "cache": {"sizeLimit": "2Gi"}}),
        ),
        (
            "hf",
            json!({"name": "m", "source": "hf://org/repo/m.gguf", "hfTokenSecret": {"name": "hf"}}),
        ),
        (
            "hf-rev",
            json!({"name": "m", "source": "hf://org/repo@v1.0/sub/m.gguf", "cache": {"claimName": "models"}}),
        ),
        (
            "pvc",
            json!({"name": "m", "source": "pvc://weights/smol/m.gguf"}),
        ),
    ] {
        let mut obj = object(name, spec("http://127.0.0.1:2379", 1, 1));
        obj["spec"]["model"] = model;
        obj["spec"]["decode"] = json!({
            "env": [{"name": "UCX_TLS", "value": "tcp"}],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
        });
        let dd: DisaggDeployment = serde_json::from_value(obj).unwrap();
        let created = api
            .create(&PostParams::default(), &dd)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if name == "hf" {
            let token = created.spec.model.hf_token_secret.unwrap();
            assert_eq!(token.key, "token", "the key defaults to token");
        }
        // Volumes are kept as written, not pruned.
        let volume = serde_json::to_value(&created.spec.decode.volumes[0]).unwrap();
        assert_eq!(volume["emptyDir"]["medium"], "Memory", "{name}");
    }
}

#[tokio::test]
async fn the_sample_crs_apply_with_kubectl() {
    let (plane, client) = plane_with_crd().await;
    let ns = "validation-samples";
    namespace(&client, ns).await;
    let samples = repo_root().join("config/samples");
    // Every sample, the GPU ones in config/samples/gpu/ included.
    let mut names = Vec::new();
    let mut dirs = vec![samples.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                names.push(path);
            }
        }
    }
    names.sort();
    assert!(names.len() >= 4, "samples: {names:?}");
    for path in &names {
        // Each sample is also a valid Rust object that names a real model
        // location, checksummed.
        let text = std::fs::read_to_string(path).unwrap();
        let dd: DisaggDeployment =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let source = &dd.spec.model.source;
        // A pvc:// sample reads a claim the user filled (its comment says
        // with what); every other sample names a public download.
        assert!(
            source.starts_with("hf://")
                || source.starts_with("https://")
                || source.starts_with("pvc://"),
            "{}: {source} is not a public location or a claim",
            path.display()
        );
        assert!(
            dd.spec.model.sha256.is_some(),
            "{}: no sha256",
            path.display()
        );
        // Outside gpu/, a sample runs on CPU nodes as written.
        let gpu = path.parent().is_some_and(|p| p.ends_with("gpu"));
        let asks_gpu = text.contains("nvidia.com/gpu") || dd.spec.engine.device.starts_with("cuda");
        assert_eq!(
            gpu,
            asks_gpu,
            "{}: GPU samples live in gpu/, and only they",
            path.display()
        );
    }
    let out = kubectl(
        plane,
        &[
            "apply",
            "--server-side",
            "--recursive",
            "-n",
            ns,
            "-f",
            samples.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in [
        "smollm-1p1d",
        "smollm-2p2d",
        "smollm-aggregated",
        "smollm-1p1d-gpu",
        "smollm-autoscaled",
    ] {
        assert!(stdout.contains(name), "{stdout}");
    }
    let out = kubectl(plane, &["get", "dd", "-n", ns, "-o", "name"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        names.len()
    );
}

#[tokio::test]
async fn every_device_the_api_server_accepts_is_one_the_agent_parses() {
    use xpyd_runtime::engine::device::DeviceChoice;
    let (_plane, client) = plane_with_crd().await;
    let ns = "validation-devices";
    namespace(&client, ns).await;
    let api: Api<DisaggDeployment> = Api::namespaced(client, ns);
    let mut accepted = Vec::new();
    for (i, device) in [
        "auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:123", "gpu", "cuda:", "cuda:x", "CUDA",
        "cuda:1:2", "cuda:-1",
    ]
    .into_iter()
    .enumerate()
    {
        let mut obj = object(&format!("device-{i}"), spec("http://127.0.0.1:2379", 1, 1));
        obj["spec"]["engine"] = json!({"device": device});
        let dd: DisaggDeployment = serde_json::from_value(obj).unwrap();
        if api.create(&PostParams::default(), &dd).await.is_ok() {
            // The operator passes it verbatim as XPYD_DEVICE.
            assert!(
                device.parse::<DeviceChoice>().is_ok(),
                "the API server accepts device {device:?}, the agent refuses it"
            );
            accepted.push(device);
        }
    }
    assert_eq!(
        accepted,
        ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:123"]
    );
}

#[tokio::test]
async fn autoscaling_bounds_and_targets_are_checked_by_the_api_server() {
    let (_plane, client) = plane_with_crd().await;
    let ns = "validation-autoscaling";
    namespace(&client, ns).await;
    let api: Api<DisaggDeployment> = Api::namespaced(client, ns);

    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "prefill-min-over-max",
            Box::new(|o| {
                o["spec"]["autoscaling"] = json!({"enabled": true, "prefill": {"min": 4, "max": 2}})
            }),
            "spec.autoscaling.prefill.min: Invalid value: autoscaling.prefill.min must not exceed autoscaling.prefill.max",
        ),
        (
            "decode-min-over-max",
            Box::new(|o| {
                o["spec"]["autoscaling"] = json!({"enabled": true, "decode": {"min": 3, "max": 1}})
            }),
            "autoscaling.decode.min must not exceed autoscaling.decode.max",
        ),
        (
            "zero-ttft",
            Box::new(|o| o["spec"]["autoscaling"] = json!({"enabled": true, "ttftP90Ms": 0})),
            "spec.autoscaling.ttftP90Ms: Invalid value: autoscaling.ttftP90Ms must be a positive number of milliseconds",
        ),
        (
            "negative-itl",
            Box::new(|o| o["spec"]["autoscaling"] = json!({"enabled": true, "itlP90Ms": -5.5})),
            "autoscaling.itlP90Ms must be a positive number of milliseconds",
        ),
        (
            "decode-min-zero",
            Box::new(|o| {
                o["spec"]["autoscaling"] = json!({"enabled": true, "decode": {"min": 0, "max": 2}})
            }),
            "autoscaling.decode.min must be at least 1",
        ),
        (
            "short-interval",
            Box::new(|o| o["spec"]["autoscaling"] = json!({"intervalSeconds": 1})),
            "spec.autoscaling.intervalSeconds",
        ),
        (
            "zero-capacity",
            Box::new(|o| {
                o["spec"]["autoscaling"] = json!({"capacity": {"prefillTokensPerSecond": 0}})
            }),
            "autoscaling.capacity.prefillTokensPerSecond must be positive",
        ),
    ];
    let mut failures = Vec::new();
    for (name, change, want) in cases {
        let message = rejection(&api, name, change).await;
        if !message.contains(want) {
            failures.push(format!("{name}: wanted {want:?} in {message:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A valid spec is accepted, and what it leaves out is defaulted.
    let mut obj = object("autoscaled", spec("http://127.0.0.1:2379", 1, 1));
    obj["spec"]["autoscaling"] = json!({
        "enabled": true,
        "ttftP90Ms": 800,
        "itlP90Ms": 40.5,
        "prefill": {"min": 0, "max": 4},
        "decode": {"min": 1, "max": 1},
        "moveThreshold": true,
        "intervalSeconds": 10,
    });
    let dd: DisaggDeployment = serde_json::from_value(obj).unwrap();
    let created = api.create(&PostParams::default(), &dd).await.unwrap();
    let a = created.spec.autoscaling.expect("autoscaling kept");
    assert!(a.enabled && a.move_threshold);
    assert_eq!((a.ttft_p90_ms, a.itl_p90_ms), (800.0, 40.5));
    assert_eq!((a.prefill.min, a.prefill.max), (0, 4));
    assert_eq!(a.scale_down_stabilization_seconds, 300);
    assert_eq!(a.interval_seconds, Some(10));
    // Without the block autoscaling is off: nothing is added to the spec.
    let plain: DisaggDeployment =
        serde_json::from_value(object("fixed", spec("http://127.0.0.1:2379", 1, 1))).unwrap();
    let created = api.create(&PostParams::default(), &plain).await.unwrap();
    assert!(created.spec.autoscaling.is_none());
}
