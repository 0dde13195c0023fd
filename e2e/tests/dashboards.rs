//! The Grafana dashboards (`config/dashboards/`) and Prometheus rules
//! (`config/rules/`): every metric they query is one the code exports, the
//! dashboards are well-formed Grafana JSON, and the rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus::{Encoder, Registry, TextEncoder};
use serde_json::Value;
use xpyd_e2e::Tools;
use xpyd_runtime::discovery::RouterSettings;
use xpyd_runtime::frontend::metrics::FrontendMetrics;
use xpyd_runtime::metrics::WorkerMetrics;
use xpyd_runtime::router::{KvEventPublisher, Router, RouterMetrics, WorkerLoad};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("config/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        out.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            json,
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every `xpyd_…` name in `text`, with the histogram series suffixes
/// (`_bucket`, `_sum`, `_count`) folded into the family name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("xpyd_") {
        let start = i + at;
        // Part of a longer identifier (e.g. `my_xpyd_x`): not ours.
        let inside = start > 0 && {
            let c = bytes[start - 1];
            c.is_ascii_alphanumeric() || c == b'_' || c == b':'
        };
        let mut end = start + "xpyd_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if !inside {
            let name = &text[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(family.to_string());
        }
        i = end;
    }
    names
}

/// Family names in a text exposition (`# TYPE <name> <type>` lines).
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// The names the code exports. A label-vector family appears in an
/// exposition only once it has a child, so each registry is driven through
/// the code paths that record into every family (one streamed request, one
/// failed reconcile), and what the real encoder writes is read back.
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();

    let registry = Registry::new();
    let frontend = FrontendMetrics::register(&registry).expect("frontend metrics register");
    let mut timer = frontend.timer("smollm2", "chat", 5);
    timer.token();
    timer.token();
    timer.finish(200, 5, 2);
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .unwrap();
    names.extend(exposed(&String::from_utf8(buf).unwrap()));

    // The workers' and the router's metrics, driven through the code paths
    // that give every label-vector family a series.
    let registry = Registry::new();
    let worker = WorkerMetrics::register(&registry, None).expect("worker metrics register");
    worker.show_path(
        &xpyd_runtime::worker::PathReport {
            prefill: "prefill-0".into(),
            quarantined: true,
            last_latency: Some(Duration::from_millis(40)),
        },
        Some(xpyd_runtime::transfer::Transport::Tcp),
    );
    worker.path_failures.with_label_values(&["prefill-0"]).inc();
    let router = Router::new(16, &RouterSettings::default())
        .with_metrics(RouterMetrics::register(&registry).expect("router metrics register"));
    router.set_workers(["decode-0"]);
    let mut publisher = KvEventPublisher::new("decode-0");
    router
        .apply_batch(&publisher.batch(Vec::new(), WorkerLoad::default()))
        .expect("a batch of a known worker applies");
    let decision = router
        .select_tokens("r1", &(0..64).collect::<Vec<u32>>(), None)
        .expect("one worker to route to");
    router.finish("r1");
    assert_eq!(decision.instance_id, "decode-0");
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .unwrap();
    names.extend(exposed(&String::from_utf8(buf).unwrap()));

    let operator = xpyd_operator::metrics::Metrics::new();
    operator.observe(Duration::from_millis(3), Some("kube"));
    operator.observe_planner(
        "ns",
        "dd",
        &xpyd_operator::crd::AutoscalingStatus {
            reason: "Steady".into(),
            ..Default::default()
        },
    );
    operator
        .planner_scrape_failures
        .with_label_values(&["decode"])
        .inc();
    names.extend(exposed(&operator.render()));

    names
}

#[test]
fn every_metric_in_the_dashboards_and_rules_is_exported_by_the_code() {
    let exported = exported();
    // The exposition check itself sees what it should.
    for sure in [
        "xpyd_frontend_time_to_first_token_seconds",
        "xpyd_frontend_requests_total",
        "xpyd_operator_reconcile_errors_total",
        "xpyd_operator_reconcile_duration_seconds",
    ] {
        assert!(exported.contains(sure), "{sure} not in {exported:?}");
    }

    let mut used: Vec<(String, BTreeSet<String>)> = dashboards()
        .into_iter()
        .map(|(file, json)| {
            (
                format!("config/dashboards/{file}"),
                metric_names(&json.to_string()),
            )
        })
        .collect();
    for file in ["xpyd.rules.yaml", "xpyd.rules.test.yaml"] {
        let text = std::fs::read_to_string(repo().join("config/rules").join(file)).unwrap();
        used.push((format!("config/rules/{file}"), metric_names(&text)));
    }

    let mut unknown = Vec::new();
    for (file, names) in &used {
        assert!(!names.is_empty(), "{file} queries no xpyd metric");
        for name in names {
            if !exported.contains(name) {
                unknown.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queried but exported by no code (typo, or a metric that was renamed):\n{}",
        unknown.join("\n")
    );
    // Every operator metric is on the operator dashboard.
    let operator_board = &used
        .iter()
        .find(|(f, _)| f.ends_with("operator.json"))
        .unwrap()
        .1;
    for name in exported.iter().filter(|n| n.starts_with("xpyd_operator_")) {
        assert!(
            operator_board.contains(name),
            "{name} not on the operator dashboard"
        );
    }
}

#[test]
fn metric_names_are_extracted_from_queries() {
    let names = metric_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(xpyd_transfer_seconds_bucket[5m]))) / xpyd_a_total{x="xpyd_not_a_name_inside"} + my_xpyd_other"#,
    );
    let want: BTreeSet<String> = [
        "xpyd_transfer_seconds",
        "xpyd_a_total",
        "xpyd_not_a_name_inside",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
}

#[test]
fn dashboards_are_grafana_json_with_a_query_in_every_panel() {
    let boards = dashboards();
    let files: Vec<&str> = boards.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        files,
        [
            "disaggregation.json",
            "operator.json",
            "router.json",
            "serving.json"
        ]
    );
    let mut uids = BTreeSet::new();
    for (file, board) in &boards {
        let uid = board["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no uid"));
        assert!(uids.insert(uid.to_string()), "{file}: duplicate uid {uid}");
        assert!(
            board["title"]
                .as_str()
                .is_some_and(|t| t.starts_with("xpyd / ")),
            "{file}"
        );
        // A data source variable, so the dashboard works with any Prometheus.
        let vars = board["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
            "{file}: no Prometheus data source variable"
        );
        let panels = board["panels"].as_array().unwrap();
        let mut ids = BTreeSet::new();
        let mut queries = 0;
        for panel in panels {
            let id = panel["id"].as_i64().unwrap();
            assert!(ids.insert(id), "{file}: duplicate panel id {id}");
            let title = panel["title"].as_str().unwrap();
            let pos = &panel["gridPos"];
            let (x, w) = (pos["x"].as_i64().unwrap(), pos["w"].as_i64().unwrap());
            assert!(x + w <= 24, "{file}: {title} is wider than the grid");
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: {title}"
            );
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: {title} has no query");
            for t in targets {
                let expr = t["expr"].as_str().unwrap();
                assert!(
                    !metric_names(expr).is_empty(),
                    "{file}: {title}: {expr} queries no xpyd metric"
                );
                // Balanced brackets: a cheap guard against a mangled edit.
                for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
                    assert_eq!(
                        expr.matches(open).count(),
                        expr.matches(close).count(),
                        "{file}: {title}: {expr}"
                    );
                }
                queries += 1;
            }
        }
        assert!(queries >= 4, "{file}: only {queries} queries");
    }
}

fn promtool(args: &[&str]) -> std::process::Output {
    let tools = Tools::locate().expect("scripts/setup installed the test tools");
    let promtool = tools.promtool().expect("scripts/setup built promtool");
    std::process::Command::new(promtool)
        .args(args)
        .current_dir(repo().join("config/rules"))
        .output()
        .expect("promtool runs")
}

#[test]
fn promtool_accepts_the_rules() {
    let out = promtool(&["check", "rules", "xpyd.rules.yaml"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let out = promtool(&["test", "rules", "xpyd.rules.test.yaml"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SUCCESS"), "{said}");
    // Each alert is exercised by the unit tests.
    let rules = std::fs::read_to_string(repo().join("config/rules/xpyd.rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(repo().join("config/rules/xpyd.rules.test.yaml")).unwrap();
    for line in rules.lines() {
        if let Some(alert) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {alert}\n")),
                "{alert} has no promtool unit test"
            );
        }
    }
}
