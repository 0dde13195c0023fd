//! `xpyd-agent up` as a user runs it: the real binary serves the bundled
//! model over HTTP with one prefill and one decode worker, answers the
//! France question (a short prompt, prefilled by the decode worker), hands a
//! long prompt's KV from the prefill worker to the decode worker over NIXL,
//! and stops cleanly on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn up_answers_the_france_question_and_stops_on_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xpyd-agent"))
        .args([
            "up",
            "--addr",
            "127.0.0.1:0",
            "--num-blocks",
            "128",
            "--max-local-prefill-length",
            "64",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("xpyd-agent starts");
    // Kill it whatever happens below.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = Reap(child);

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let url = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("xpyd-agent up prints its URL within 120 s");
        if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            break url.to_string();
        }
    };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let resp: serde_json::Value = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "SmolLM2-135M-Instruct",
            "temperature": 0,
            "messages": [{"role": "user", "content": "Name the capital of France."}],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        resp["choices"][0]["message"]["content"], "The capital of France is Paris.",
        "{resp}"
    );
    assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");

    // A prompt over the threshold is prefilled by the prefill worker and its
    // KV written into the decode worker's blocks: same answer.
    let long_system = "You are a helpful assistant. ".repeat(16);
    let resp: serde_json::Value = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "SmolLM2-135M-Instruct",
            "temperature": 0,
            "max_tokens": 12,
            "messages": [
                {"role": "system", "content": long_system},
                {"role": "user", "content": "Name the capital of France."},
            ],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = resp["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("Paris"), "{resp}");
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let remote: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("xpyd_decode_prefills_total{location=\"remote\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(remote, 1.0, "{metrics}");

    // Ctrl-C: the server stops and the process exits successfully.
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "xpyd-agent did not stop within 30 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l == "xpyd stopped"), "{rest:?}");
}
