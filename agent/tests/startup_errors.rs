//! Startup errors a user sees from the real binary: a bad or unusable
//! `--device`, a missing model file. Each exits non-zero at once with a
//! message naming the flag or the missing piece.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xpyd-agent"))
        .args(args)
        .env("XPYD_LOG", "warn")
        .output()
        .expect("xpyd-agent runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_device_string_names_the_accepted_values() {
    let (ok, err) = run(&["up", "--device", "gpu7"]);
    assert!(!ok);
    assert!(err.contains("auto, cpu, cuda or cuda:N"), "{err}");
}

#[test]
fn cuda_without_a_usable_gpu_fails_at_startup_naming_what_is_missing() {
    let (ok, err) = run(&["up", "--device", "cuda", "--addr", "127.0.0.1:0"]);
    assert!(!ok, "{err}");
    // No driver here (libcuda); on a GPU machine the CUDA engine is refused
    // with its reason instead. Either way the message says why.
    assert!(
        err.contains("libcuda") || err.contains("CUDA engine is not enabled"),
        "{err}"
    );
}

#[test]
fn a_bad_sim_profile_names_the_file_and_the_field() {
    let dir = std::env::temp_dir().join(format!("xpyd-sim-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.json");
    std::fs::write(
        &path,
        r#"{"name": "bad", "step_ms": 1, "prefill_token_ms": -2,
            "prefill_attention_ns_per_pair": 0, "decode_seq_ms": 1,
            "decode_context_ns_per_token": 0}"#,
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let (ok, err) = run(&[
        "up",
        "--device",
        "sim",
        "--sim-profile",
        path,
        "--addr",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert!(
        err.contains(path) && err.contains("prefill_token_ms"),
        "{err}"
    );
    // A profile is for the simulated engine only.
    let (ok, err) = run(&[
        "up",
        "--device",
        "cpu",
        "--sim-profile",
        path,
        "--addr",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--sim-profile") && err.contains("--device sim"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_model_file_is_named() {
    let (ok, err) = run(&[
        "decode",
        "--etcd-endpoints",
        "http://127.0.0.1:1",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--deployment",
        "d",
        "--model",
        "/nonexistent/model.gguf",
        "--device",
        "cpu",
    ]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

/// What `kubectl logs` shows: plain text without terminal colour codes when
/// stderr is not a terminal, and one JSON object a line on request.
#[test]
fn logs_are_plain_off_a_terminal_and_json_on_request() {
    let model = xpyd_runtime::assets::bundled_model().expect("scripts/setup installed the model");
    let run = |format: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xpyd-agent"));
        cmd.args(["fetch-model", "--model"])
            .arg(&model)
            .env("XPYD_LOG", "info")
            .env_remove("XPYD_MODEL_SHA256");
        match format {
            Some(f) => cmd.env("XPYD_LOG_FORMAT", f),
            None => cmd.env_remove("XPYD_LOG_FORMAT"),
        };
        let out = cmd.output().expect("xpyd-agent runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, text) = run(None);
    assert!(ok, "{text}");
    assert!(text.contains("model ready"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escape codes in a pipe: {text:?}"
    );

    let (ok, json) = run(Some("json"));
    assert!(ok, "{json}");
    let lines: Vec<serde_json::Value> = json
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "model ready" && l["level"] == "INFO"),
        "{json}"
    );

    let (ok, err) = run(Some("yaml"));
    assert!(!ok);
    assert!(
        err.contains("XPYD_LOG_FORMAT") && err.contains("text or json"),
        "{err}"
    );
}
