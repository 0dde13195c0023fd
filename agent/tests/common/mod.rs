//! Helpers shared by the agent's integration tests: `xpyd-agent up` started
//! as a user starts it (the real binary, a free port, its URL read from
//! stdout, the process killed when the guard drops), the chat request the
//! tests ask, and reading `/metrics`.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The model every agent test serves.
pub const MODEL: &str = "SmolLM2-135M-Instruct";
/// The question greedy decoding answers with "The capital of France is
/// Paris." and then stops.
pub const FRANCE: &str = "Name the capital of France.";

/// A running `xpyd-agent up`; killed on drop.
pub struct Up {
    child: Child,
    pub url: String,
    /// Its stdout lines after the URL.
    lines: mpsc::Receiver<String>,
}

impl Up {
    /// Starts `xpyd-agent up --addr 127.0.0.1:0 <extra>` and waits (at most
    /// 120 s) for the URL it prints.
    pub fn start(extra: &[&str]) -> Up {
        Up::start_with_env(extra, &[])
    }

    /// [`Up::start`] with extra environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, String)]) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xpyd-agent"))
            .args(["up", "--addr", "127.0.0.1:0"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("xpyd-agent starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Killed on drop from here on, whatever happens below.
        let mut up = Up {
            child,
            url: String::new(),
            lines: rx,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        up.url = loop {
            let line = up
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("xpyd-agent up prints its URL within 120 s");
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                break url.to_string();
            }
        };
        up
    }

    /// The next line it prints (at most `within` from now).
    pub fn next_line(&self, within: Duration) -> String {
        self.lines.recv_timeout(within).unwrap_or_else(|e| {
            panic!("xpyd-agent up printed no further line within {within:?}: {e}")
        })
    }

    /// Ctrl-C (SIGINT), then waits at most 30 s for the exit. Returns the
    /// exit status and what it printed after its URL.
    pub fn interrupt(&mut self) -> (ExitStatus, Vec<String>) {
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "xpyd-agent did not stop within 30 s of Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, self.lines.try_iter().collect())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A greedy chat request for [`MODEL`]: `messages` as `(role, content)`.
pub fn chat_request(messages: &[(&str, &str)]) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    json!({"model": MODEL, "temperature": 0, "messages": messages})
}

/// POSTs `body` to `{url}/v1/chat/completions` (120 s timeout) and returns
/// the JSON answer.
pub async fn chat(url: &str, body: &Value) -> Value {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .timeout(Duration::from_secs(120))
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The text of the first choice of a chat answer.
pub fn answer(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no answer in {body}"))
        .to_string()
}

/// What the server at `url` serves on `/metrics`.
pub async fn metrics(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sum of the samples of `metric` (exact name) whose label set contains
/// `labels` (e.g. `location="remote"`; empty: all).
pub fn sum_samples(text: &str, metric: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, ""));
            (name == metric && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
