//! The Helm chart (`charts/xpyd/`) as a user meets it, through the real
//! `helm` binary: lint, what `helm template` renders with the default values
//! and with each optional switch, values the schema refuses (with the
//! message the user sees), RBAC limited to what the operator calls, and the
//! chart's copies of the CRD, dashboards and rules being the ones in
//! `crds/` and `config/`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use xpyd_e2e::Tools;
use xpyd_operator::crd::DisaggDeployment;
use xpyd_operator::resources;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/xpyd")
}

fn helm(args: &[&str]) -> Output {
    let tools = Tools::locate().expect("scripts/setup installed helm");
    std::process::Command::new(&tools.helm)
        .args(args)
        // No user configuration or repositories leak into the test.
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("xpyd-helm-config"),
        )
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("xpyd-helm-cache"),
        )
        .output()
        .expect("helm runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template xpyd charts/xpyd -n xpyd-system <extra>` as objects.
fn template(extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "xpyd",
        chart.to_str().unwrap(),
        "--namespace",
        "xpyd-system",
    ];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(out.status.success(), "helm template failed: {}", text(&out));
    let rendered = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Option<Value>> = serde_saphyr::from_multiple(&rendered)
        .unwrap_or_else(|e| panic!("helm template rendered invalid YAML: {e}\n{rendered}"));
    docs.into_iter()
        .flatten()
        .filter(|d| !d.is_null())
        .collect()
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), name(o)))
        .collect()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name_: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && name(o) == name_)
        .unwrap_or_else(|| panic!("no {kind}/{name_} in {:?}", kinds(objects)))
}

/// (apiGroup, resource, verb, resourceName) of every rule in a Role or ClusterRole.
fn grants(role: &Value) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let names = list("resourceNames");
        let names = if names.is_empty() {
            vec!["*".to_string()]
        } else {
            names
        };
        for g in list("apiGroups") {
            for r in list("resources") {
                for v in list("verbs") {
                    for n in &names {
                        out.insert((g.clone(), r.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

fn set(items: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String, String)> {
    items
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string(), "*".to_string()))
        })
        .collect()
}

/// What the operator does with the API, call by call (operator/src):
/// the controller lists and watches DisaggDeployments and their children;
/// the finalizer patches the CR; status is server-side applied; children are
/// server-side applied (a create when new, so `create` too) and the ones a
/// spec no longer wants deleted; pods are listed (never watched) to report
/// why they do not start, and (the SLO planner) to scrape them, and
/// patched for their `pod-deletion-cost`; HorizontalPodAutoscalers are
/// listed to find one that targets an autoscaled CR; the event recorder
/// creates and patches events.k8s.io Events.
fn operator_grants() -> BTreeSet<(String, String, String, String)> {
    set(&[
        ("xpyd.dev", "disaggdeployments", &["list", "watch", "patch"]),
        ("xpyd.dev", "disaggdeployments/status", &["patch"]),
        (
            "apps",
            "deployments",
            &["list", "watch", "create", "patch", "delete"],
        ),
        (
            "",
            "services",
            &["list", "watch", "create", "patch", "delete"],
        ),
        ("", "pods", &["list", "patch"]),
        ("autoscaling", "horizontalpodautoscalers", &["list"]),
        (
            "networking.k8s.io",
            "ingresses",
            &["list", "watch", "create", "patch", "delete"],
        ),
        ("events.k8s.io", "events", &["create", "patch"]),
    ])
}

/// Leader election (operator/src/leader.rs): creates the Lease, then gets
/// and replaces that one Lease, and deletes it on shutdown.
fn leader_grants() -> BTreeSet<(String, String, String, String)> {
    let mut g = set(&[("coordination.k8s.io", "leases", &["create"])]);
    for verb in ["get", "update", "delete"] {
        g.insert((
            "coordination.k8s.io".into(),
            "leases".into(),
            verb.into(),
            "xpyd-operator-leader".into(),
        ));
    }
    g
}

#[test]
fn helm_lint_is_clean() {
    let chart = chart();
    let out = helm(&["lint", "--strict", chart.to_str().unwrap()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{said}"
    );
    assert!(
        !said.contains("[WARNING]") && !said.contains("[ERROR]"),
        "{said}"
    );
    // Lint with every switch on, too.
    let out = helm(&[
        "lint",
        "--strict",
        chart.to_str().unwrap(),
        "--set",
        "etcd.enabled=true,nats.enabled=true,monitoring.serviceMonitor.enabled=true,monitoring.prometheusRule.enabled=true",
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn default_values_install_the_operator_its_rbac_service_and_dashboards() {
    let objects = template(&[]);
    let want: BTreeSet<String> = [
        "ServiceAccount/xpyd",
        "ClusterRole/xpyd-operator",
        "ClusterRoleBinding/xpyd-operator",
        "Role/xpyd-leader-election",
        "RoleBinding/xpyd-leader-election",
        "Service/xpyd-operator-metrics",
        "Deployment/xpyd-operator",
        "ConfigMap/xpyd-dashboard-serving",
        "ConfigMap/xpyd-dashboard-disaggregation",
        "ConfigMap/xpyd-dashboard-router",
        "ConfigMap/xpyd-dashboard-operator",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(kinds(&objects), want);

    let deployment = find(&objects, "Deployment", "xpyd-operator");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "xpyd");
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "ghcr.io/xpyd/operator:0.1.0");
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    assert!(
        !args.contains(&"--no-leader-election"),
        "leader election on by default: {args:?}"
    );
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"POD_NAMESPACE") && env.contains(&"POD_NAME") && env.contains(&"POD_UID"),
        "{env:?}"
    );
    // No hub mirror unless one is set.
    assert!(!env.contains(&"XPYD_HF_ENDPOINT"), "{env:?}");
    let objects_with_mirror = template(&["--set", "agents.hfEndpoint=http://hf-mirror.local:8080"]);
    let mirrored = find(&objects_with_mirror, "Deployment", "xpyd-operator");
    let mirror_env = &mirrored["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        mirror_env.as_array().unwrap().iter().any(|e| e["name"] == "XPYD_HF_ENDPOINT"
            && e["value"] == "http://hf-mirror.local:8080"),
        "{mirror_env}"
    );

    // The metrics Service selects the operator pod and targets its port.
    let service = find(&objects, "Service", "xpyd-operator-metrics");
    let selector = service["spec"]["selector"].as_object().unwrap();
    let labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(labels.get(k), Some(v), "selector {k}");
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(container["ports"][0]["containerPort"], 8080);

    // Dashboards: labelled for the Grafana sidecar, each the JSON in config/.
    for board in ["serving", "disaggregation", "router", "operator"] {
        let cm = find(&objects, "ConfigMap", &format!("xpyd-dashboard-{board}"));
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
        let key = format!("xpyd-{board}.json");
        let shipped: Value = serde_json::from_str(cm["data"][&key].as_str().unwrap()).unwrap();
        let source: Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join(format!("config/dashboards/{board}.json")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(shipped, source, "{board}");
    }
}

#[test]
fn optional_switches_add_etcd_nats_monitors_and_alerts() {
    let all_on = "etcd.enabled=true,nats.enabled=true,monitoring.serviceMonitor.enabled=true,monitoring.prometheusRule.enabled=true";
    let objects = template(&[
        "--set",
        all_on,
        "--api-versions",
        "monitoring.coreos.com/v1",
    ]);
    let got = kinds(&objects);
    for want in [
        "Service/xpyd-etcd",
        "StatefulSet/xpyd-etcd",
        "Service/xpyd-nats",
        "Deployment/xpyd-nats",
        "ServiceMonitor/xpyd-operator",
        "PodMonitor/xpyd-agents",
        "PrometheusRule/xpyd",
    ] {
        assert!(got.contains(want), "{want} missing from {got:?}");
    }
    // The endpoints the samples in config/samples point at.
    let etcd = find(&objects, "StatefulSet", "xpyd-etcd");
    let cmd = etcd["spec"]["template"]["spec"]["containers"][0]["command"].to_string();
    assert!(
        cmd.contains("--advertise-client-urls=http://xpyd-etcd.xpyd-system:2379"),
        "{cmd}"
    );
    let sample = std::fs::read_to_string(repo().join("config/samples/1p1d.yaml")).unwrap();
    assert!(
        sample.contains("http://xpyd-etcd.xpyd-system:2379")
            && sample.contains("nats://xpyd-nats.xpyd-system:4222"),
        "the sample points at the chart's etcd and NATS"
    );
    let nats = find(&objects, "Deployment", "xpyd-nats");
    let args = nats["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("\"-js\""), "NATS runs JetStream: {args}");

    // The PodMonitor selects every agent pod the operator builds, and
    // scrapes the port those pods name `metrics` (9090).
    let pm = find(&objects, "PodMonitor", "xpyd-agents");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    let selector = pm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let mut dd: DisaggDeployment = serde_saphyr::from_str(&sample).unwrap();
    dd.metadata.namespace = Some("demo".into());
    dd.metadata.uid = Some("0000-test".into());
    let owner = resources::Owner::of(&dd).unwrap();
    for role in resources::Role::ALL {
        let deployment = serde_json::to_value(resources::deployment(
            &owner,
            &dd.spec,
            role,
            &resources::ClusterSettings::default(),
        ))
        .unwrap();
        let template = &deployment["spec"]["template"];
        for (k, v) in selector {
            assert_eq!(
                &template["metadata"]["labels"][k], v,
                "{role:?} pods lack the PodMonitor's label {k}"
            );
        }
        let ports = template["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap();
        assert!(
            ports
                .iter()
                .any(|p| p["name"] == "metrics" && p["containerPort"] == resources::METRICS_PORT),
            "{role:?}: {ports:?}"
        );
    }

    // The PrometheusRule carries exactly the rule groups of config/rules.
    let rule = find(&objects, "PrometheusRule", "xpyd");
    let source: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("config/rules/xpyd.rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], source["groups"]);

    // Without the Prometheus Operator's CRDs, the monitors are skipped
    // rather than failing the install.
    let objects = template(&["--set", all_on]);
    let got = kinds(&objects);
    assert!(
        !got.iter().any(|k| k.starts_with("ServiceMonitor/")
            || k.starts_with("PodMonitor/")
            || k.starts_with("PrometheusRule/")),
        "{got:?}"
    );
}

#[test]
fn bad_values_fail_at_install_time_naming_the_value() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for (flag, set, message) in [
        (
            "--set-string",
            "operator.replicas=two",
            "at '/operator/replicas': got string, want integer",
        ),
        (
            "--set",
            "operator.replica=2",
            "at '/operator': additional properties 'replica' not allowed",
        ),
        (
            "--set",
            "operator.replicas=2,operator.leaderElection=false",
            "at '/operator/leaderElection': value must be true",
        ),
        (
            "--set",
            "operator.image.pullPolicy=Sometimes",
            "at '/operator/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
        ),
        (
            "--set",
            "monitoring.serviceMonitor.interval=soon",
            "at '/monitoring/serviceMonitor/interval': 'soon' does not match pattern",
        ),
        (
            "--set-string",
            "etcd.enabled=yes",
            "at '/etcd/enabled': got string, want boolean",
        ),
        (
            "--set",
            "agents.hfEndpoint=huggingface.co",
            "at '/agents/hfEndpoint': 'huggingface.co' does not match pattern",
        ),
    ] {
        let out = helm(&["template", "xpyd", chart, flag, set]);
        let said = text(&out);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(
            said.contains("values don't meet the specifications of the schema"),
            "{set}: {said}"
        );
        assert!(said.contains(message), "{set}: {said}");
    }
    // Two replicas with leader election are fine.
    let out = helm(&["template", "xpyd", chart, "--set", "operator.replicas=2"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn rbac_grants_only_what_the_operator_calls() {
    let objects = template(&[]);
    let cluster_role = find(&objects, "ClusterRole", "xpyd-operator");
    assert_eq!(grants(cluster_role), operator_grants());
    let leader = find(&objects, "Role", "xpyd-leader-election");
    assert_eq!(leader["metadata"]["namespace"], "xpyd-system");
    assert_eq!(grants(leader), leader_grants());
    for binding in [
        find(&objects, "ClusterRoleBinding", "xpyd-operator"),
        find(&objects, "RoleBinding", "xpyd-leader-election"),
    ] {
        assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
        assert_eq!(binding["subjects"][0]["name"], "xpyd");
        assert_eq!(binding["subjects"][0]["namespace"], "xpyd-system");
    }
    // Nothing else grants anything: no wildcard, no secrets, no other role.
    let roles: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
        .collect();
    assert_eq!(roles.len(), 2);

    // One watched namespace: a Role there instead of a ClusterRole.
    let objects = template(&[
        "--set",
        "operator.watchNamespace=serving,operator.leaderElection=false",
    ]);
    assert!(
        !objects
            .iter()
            .any(|o| o["kind"] == "ClusterRole" || o["kind"] == "ClusterRoleBinding"),
        "{:?}",
        kinds(&objects)
    );
    let role = find(&objects, "Role", "xpyd-operator");
    assert_eq!(role["metadata"]["namespace"], "serving");
    assert_eq!(grants(role), operator_grants());
    let binding = find(&objects, "RoleBinding", "xpyd-operator");
    assert_eq!(binding["metadata"]["namespace"], "serving");
    assert_eq!(binding["subjects"][0]["namespace"], "xpyd-system");
    let deployment = find(&objects, "Deployment", "xpyd-operator");
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--watch-namespace=serving") && args.contains("--no-leader-election"),
        "{args}"
    );
}

/// The chart cannot reach outside its folder, so it carries copies; each
/// must be byte-identical to its source of truth.
#[test]
fn the_charts_copies_of_crd_dashboards_and_rules_match_their_sources() {
    let root = repo();
    let mut pairs = vec![
        (
            "crds/disaggdeployments.xpyd.dev.yaml".to_string(),
            "charts/xpyd/crds/disaggdeployments.xpyd.dev.yaml".to_string(),
        ),
        (
            "config/rules/xpyd.rules.yaml".to_string(),
            "charts/xpyd/files/rules/xpyd.rules.yaml".to_string(),
        ),
    ];
    let mut boards: Vec<String> = std::fs::read_dir(root.join("config/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    boards.sort();
    assert_eq!(
        boards,
        [
            "disaggregation.json",
            "operator.json",
            "router.json",
            "serving.json"
        ]
    );
    let mut shipped: Vec<String> = std::fs::read_dir(root.join("charts/xpyd/files/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    shipped.sort();
    assert_eq!(
        shipped, boards,
        "charts/xpyd/files/dashboards/ has other files"
    );
    for b in &boards {
        pairs.push((
            format!("config/dashboards/{b}"),
            format!("charts/xpyd/files/dashboards/{b}"),
        ));
    }
    for (source, copy) in pairs {
        let a = std::fs::read(root.join(&source)).unwrap();
        let b = std::fs::read(root.join(&copy)).unwrap();
        assert!(
            a == b,
            "{copy} differs from {source}; refresh it with: cp {source} {copy}"
        );
    }
}
