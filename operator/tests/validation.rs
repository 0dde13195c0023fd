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
}

#[tokio::test]
async fn the_sample_crs_apply_with_kubectl() {
    let (plane, client) = plane_with_crd().await;
    let ns = "validation-samples";
    namespace(&client, ns).await;
    let samples = repo_root().join("config/samples");
    let mut names: Vec<_> = std::fs::read_dir(&samples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 3, "samples: {names:?}");
    for path in &names {
        // Each sample is also a valid Rust object.
        let text = std::fs::read_to_string(path).unwrap();
        let _: DisaggDeployment =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let out = kubectl(
        plane,
        &[
            "apply",
            "--server-side",
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
    for name in ["smollm-1p1d", "smollm-2p2d", "smollm-aggregated"] {
        assert!(stdout.contains(name), "{stdout}");
    }
    let out = kubectl(plane, &["get", "dd", "-n", ns, "-o", "name"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}
