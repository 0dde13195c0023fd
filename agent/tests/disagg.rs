//! Disaggregated serving across OS processes, as pods run it: real etcd and
//! NATS (the harness's), the real `xpyd-agent frontend|prefill|decode`
//! binaries with the flags the operator gives them, NIXL (UCX) moving KV
//! between the prefill and decode processes, and the bundled SmolLM2.
//!
//! What a user would notice is asserted: answers, HTTP statuses, and the
//! agents' own `/metrics` (remote prefills, bytes moved, free KV blocks).

mod common;

use std::time::{Duration, Instant};

use common::{FRANCE, MODEL, answer, sum_samples};
use futures::future::join_all;
use serde_json::{Value, json};
use xpyd_e2e::process::{ServerProcess, free_port};
use xpyd_e2e::{Etcd, Nats, Tools, Workdir, wait_until};

const NAMESPACE: &str = "test";
/// A prompt far above the threshold the tests set (32 tokens).
const LONG_SYSTEM: &str = "You are a careful geography tutor. You answer questions about \
    countries, capitals, rivers and mountains of Europe with one short sentence. You never \
    invent facts, you never answer with more than one sentence, and you always name the city \
    that is the capital when asked about a capital. Keep the answer brief and accurate.";

struct Agent {
    name: String,
    process: ServerProcess,
    metrics_port: u16,
}

/// etcd, NATS and agents of one deployment.
struct Deployment {
    name: String,
    dir: Workdir,
    etcd: Etcd,
    nats: Nats,
    agents: Vec<Agent>,
    api: String,
    http: reqwest::Client,
}

fn agent_binary() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_xpyd-agent").into()
}

impl Deployment {
    /// Start etcd, NATS, `prefill` prefill workers, `decode` decode workers
    /// (with `decode_args`) and a frontend; settings with `threshold`.
    async fn start(
        name: &str,
        prefill: usize,
        decode: usize,
        threshold: u32,
        decode_args: &[&str],
    ) -> Deployment {
        let tools = Tools::locate().expect("tools (run scripts/setup)");
        let dir = Workdir::new(name).unwrap();
        let etcd = Etcd::start(&tools, &dir.subdir("etcd").unwrap())
            .await
            .unwrap();
        let nats = Nats::start(&tools, &dir.subdir("nats").unwrap())
            .await
            .unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let mut d = Deployment {
            name: name.to_string(),
            dir,
            etcd,
            nats,
            agents: Vec::new(),
            api: String::new(),
            http,
        };
        d.set_threshold(threshold, 1).await;
        for i in 0..decode {
            d.spawn("decode", &format!("decode-{i}"), decode_args).await;
        }
        for i in 0..prefill {
            d.spawn("prefill", &format!("prefill-{i}"), &[]).await;
        }
        // Bound to every interface, as in a pod: it must still register
        // an address others can reach.
        d.spawn("frontend", "frontend-0", &["--bind-host", "0.0.0.0"])
            .await;
        let api = d.api.clone();
        let http = d.http.clone();
        wait_until(
            "the frontend lists the model",
            Duration::from_secs(60),
            || {
                let req = http.get(format!("{api}/v1/models")).send();
                async move {
                    let body: Value = req.await?.json().await?;
                    Ok::<_, reqwest::Error>(body["data"].as_array().is_some_and(|m| !m.is_empty()))
                }
            },
        )
        .await
        .unwrap();
        d
    }

    /// Write the deployment's router settings as the operator does.
    async fn set_threshold(&self, threshold: u32, generation: i64) {
        self.set_settings("round_robin", threshold, generation)
            .await;
    }

    async fn set_settings(&self, strategy: &str, threshold: u32, generation: i64) {
        self.put_settings(json!({
            "generation": generation,
            "strategy": strategy,
            "maxLocalPrefillLength": threshold,
            "sessionHeader": "session-id",
            "maxPrefillQueueDepth": 64,
            "disaggregated": true,
        }))
        .await;
    }

    async fn put_settings(&self, settings: Value) {
        let mut etcd = self.etcd.client().await.unwrap();
        etcd.put(
            format!("/xpyd/{NAMESPACE}/{}/router", self.name),
            settings.to_string(),
            None,
        )
        .await
        .unwrap();
    }

    /// Start one agent and wait until it is ready; `extra` flags replace
    /// the defaults of the same name (`--bind-host`, `--grace-seconds`).
    async fn spawn(&mut self, role: &str, name: &str, extra: &[&str]) {
        self.spawn_with_env(role, name, extra, &[]).await;
    }

    /// Starts prefill worker `prefill-0` (with `extra` flags) with the test
    /// fault `fault` injected (`XPYD_TEST_FAULT`, see `PrefillFault`).
    async fn spawn_faulty_prefill(&mut self, fault: &str, extra: &[&str]) {
        self.spawn_with_env("prefill", "prefill-0", extra, &[("XPYD_TEST_FAULT", fault)])
            .await;
    }

    /// [`Deployment::spawn`] with `env` added to the agent's environment.
    async fn spawn_with_env(
        &mut self,
        role: &str,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) {
        let metrics_port = free_port();
        let mut args: Vec<String> = [
            role,
            "--etcd-endpoints",
            &self.etcd.endpoint(),
            "--nats-url",
            &self.nats.url(),
            "--namespace",
            NAMESPACE,
            "--deployment",
            &self.name,
            "--instance",
            name,
            "--metrics-port",
            &metrics_port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut defaults = vec![("--bind-host", "127.0.0.1"), ("--grace-seconds", "5")];
        if role == "frontend" {
            let port = free_port();
            args.extend(["--http-port".to_string(), port.to_string()]);
            self.api = format!("http://127.0.0.1:{port}");
        } else {
            defaults.extend([
                ("--num-blocks", "160"),
                ("--max-model-len", "1024"),
                ("--max-seqs", "16"),
            ]);
        }
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = self.dir.path().join(format!("{name}.log"));
        let mut process = ServerProcess::start(
            name,
            &agent_binary(),
            args,
            // Debug for the workers: a prefill worker logs each claim.
            [("XPYD_LOG", "info,xpyd_runtime::worker=debug")]
                .into_iter()
                .chain(env.iter().copied()),
            log,
        )
        .unwrap();
        process
            .wait_http_ready(
                &format!("http://127.0.0.1:{metrics_port}/ready"),
                Duration::from_secs(120),
                false,
                |_| true,
            )
            .await
            .unwrap_or_else(|e| panic!("{name} did not become ready: {e}"));
        self.agents.push(Agent {
            name: name.to_string(),
            process,
            metrics_port,
        });
    }

    /// Send `signal` to agent `name`'s process.
    fn signal(&self, name: &str, signal: i32) {
        let pid = self
            .agents
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.process.pid())
            .unwrap_or_else(|| panic!("{name} is not running"));
        // SAFETY: signalling a process this test started.
        unsafe { libc::kill(pid as i32, signal) };
    }

    /// The state letter of agent `name`'s process (`R`, `S`, `T` for
    /// stopped, `Z` for exited and not yet reaped), `None` once reaped.
    fn process_state(&self, name: &str) -> Option<char> {
        let pid = self
            .agents
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.process.pid())
            .unwrap_or_else(|| panic!("{name} was not started"));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The state follows the command name in parentheses.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
    }

    /// Waits (60 s at most) until agent `name`'s process is stopped: an
    /// injected `XPYD_TEST_FAULT` fired.
    async fn await_stopped(&self, name: &str) {
        wait_until(
            &format!("{name} stops itself"),
            Duration::from_secs(60),
            || {
                let state = self.process_state(name);
                async move { Ok::<_, String>(state == Some('T')) }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", self.log_tails()));
    }

    /// Whether agent `name`'s process has ended (exited, not yet reaped:
    /// the harness reaps it).
    fn exited(&self, name: &str) -> bool {
        matches!(self.process_state(name), None | Some('Z'))
    }

    /// How long after `since` agent `name` ends; fails after `limit`.
    async fn time_exit(&self, name: &str, since: Instant, limit: Duration) -> Duration {
        while !self.exited(name) {
            assert!(
                since.elapsed() < limit,
                "{name} still running {limit:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        since.elapsed()
    }

    /// Wait until agent `name` has exited, at the latest `by`; its exit
    /// status as the harness words it.
    async fn wait_exit(&mut self, name: &str, by: Instant) -> String {
        loop {
            if let Err(e) = self.agent(name).process.check_running() {
                return e.to_string();
            }
            assert!(Instant::now() < by, "{name} did not exit in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (30 s at most) until agent `name` holds KV blocks: a request
    /// it admitted, e.g. one awaiting a remote prefill.
    async fn await_reserved_blocks(&self, name: &str) {
        wait_until(
            &format!("{name} reserves blocks for the remote prefill"),
            Duration::from_secs(30),
            || async {
                let (total, free) = self.blocks(name).await?;
                Ok::<_, reqwest::Error>(total > 0.0 && free < total)
            },
        )
        .await
        .unwrap();
    }

    /// What agent `name` serves on `/metrics`.
    async fn metrics_text(&self, name: &str) -> Result<String, reqwest::Error> {
        let port = self.agent_ref(name).metrics_port;
        self.http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await?
            .text()
            .await
    }

    /// Sum of agent `name`'s samples of `metric` whose labels include
    /// `labels`.
    async fn try_metric(
        &self,
        name: &str,
        metric: &str,
        labels: &str,
    ) -> Result<f64, reqwest::Error> {
        Ok(sum_samples(&self.metrics_text(name).await?, metric, labels))
    }

    /// The KV blocks of agent `name`'s engine, and how many are free.
    async fn blocks(&self, name: &str) -> Result<(f64, f64), reqwest::Error> {
        let text = self.metrics_text(name).await?;
        Ok((
            sum_samples(&text, "xpyd_engine_kv_blocks", ""),
            sum_samples(&text, "xpyd_engine_kv_blocks_free", ""),
        ))
    }

    /// The last lines of every agent's log, for a failure message.
    fn log_tails(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- {}\n{}", a.name, a.process.log_tail(15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn agent_ref(&self, name: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    fn agent(&mut self, name: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    /// [`Deployment::try_metric`], which must answer.
    async fn metric(&self, agent: &str, metric: &str, labels: &str) -> f64 {
        self.try_metric(agent, metric, labels).await.unwrap()
    }

    /// Wait until the frontend acknowledged settings `generation`.
    async fn wait_frontend_ack(&self, generation: i64) {
        self.wait_ack("frontend", generation).await;
    }

    /// Wait until an agent whose name starts with `agent` acknowledged
    /// settings `generation`.
    async fn wait_ack(&self, agent: &str, generation: i64) {
        let mut etcd = self.etcd.client().await.unwrap();
        let prefix = format!("/xpyd/{NAMESPACE}/{}/router-acks/{agent}", self.name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let acks = etcd
                .get(
                    prefix.as_str(),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            let acked = acks.kvs().iter().any(|kv| {
                serde_json::from_slice::<Value>(kv.value())
                    .ok()
                    .and_then(|v| v["generation"].as_i64())
                    .is_some_and(|g| g >= generation)
            });
            if acked {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {agent} ack of generation {generation}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A greedy chat completion; the status and the body.
    async fn chat(&self, system: &str, question: &str, max_tokens: u32) -> (u16, Value) {
        self.chat_in_session(None, system, question, max_tokens)
            .await
    }

    /// [`Deployment::chat`] with a `session-id` header.
    async fn chat_in_session(
        &self,
        session: Option<&str>,
        system: &str,
        question: &str,
        max_tokens: u32,
    ) -> (u16, Value) {
        post_chat(&self.http, &self.api, session, system, question, max_tokens).await
    }
}

/// A greedy chat completion sent to the frontend at `api`; the status and
/// the body.
async fn post_chat(
    http: &reqwest::Client,
    api: &str,
    session: Option<&str>,
    system: &str,
    question: &str,
    max_tokens: u32,
) -> (u16, Value) {
    let mut request = http.post(format!("{api}/v1/chat/completions"));
    if let Some(session) = session {
        request = request.header("session-id", session);
    }
    let resp = request
        .json(&json!({
            "model": MODEL,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
        }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn one_prefill_one_decode_long_prompts_go_remote_short_ones_stay_local() {
    let mut d = Deployment::start("disagg-1p1d", 1, 1, 32, &[]).await;

    let (status, body) = d
        .chat(LONG_SYSTEM, "What is the capital of France?", 12)
        .await;
    assert_eq!(status, 200, "{body}");
    let remote_text = answer(&body);
    assert!(remote_text.contains("Paris"), "{remote_text:?}");
    // The frontend binds 0.0.0.0 but registers the address peers reach it
    // at (its advertise host, here the default 127.0.0.1).
    let mut etcd = d.etcd.client().await.unwrap();
    let records = etcd
        .get(
            format!("/xpyd/{NAMESPACE}/disagg-1p1d/instances/frontend/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let addresses: Vec<String> = records
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Value>(kv.value()).ok())
        .filter_map(|r| r["http_address"].as_str().map(String::from))
        .collect();
    assert_eq!(
        addresses,
        [d.api.trim_start_matches("http://").to_string()],
        "the frontend's registered address"
    );
    assert_eq!(remote_prefills(&d, "decode-0").await, 1.0);
    assert!(
        d.metric(
            "decode-0",
            "xpyd_transfer_bytes_total",
            "direction=\"received\""
        )
        .await
            > 0.0
    );
    assert!(
        d.metric(
            "prefill-0",
            "xpyd_transfer_bytes_total",
            "direction=\"sent\""
        )
        .await
            > 0.0
    );
    assert_eq!(
        d.metric("prefill-0", "xpyd_prefill_jobs_total", "result=\"ok\"")
            .await,
        1.0
    );

    // A short prompt is prefilled by the decode worker itself.
    let (status, body) = d.chat("Be brief.", "Hi", 4).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        d.metric(
            "decode-0",
            "xpyd_decode_prefills_total",
            "location=\"local\""
        )
        .await,
        1.0
    );
    assert_eq!(remote_prefills(&d, "decode-0").await, 1.0);

    // The operator raises the threshold in etcd: without a restart, the
    // same long prompt is now prefilled locally, to the same text.
    d.set_threshold(100_000, 2).await;
    let (etcd_http, port) = (d.http.clone(), d.agent("decode-0").metrics_port);
    wait_until(
        "the decode worker applies the new threshold",
        Duration::from_secs(30),
        || {
            let req = etcd_http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send();
            async move {
                let text = req.await?.text().await?;
                Ok::<_, reqwest::Error>(
                    sum_samples(&text, "xpyd_decode_max_local_prefill_length", "") == 100_000.0,
                )
            }
        },
    )
    .await
    .unwrap();
    let (status, body) = d
        .chat(LONG_SYSTEM, "What is the capital of France?", 12)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(answer(&body), remote_text);
    assert_eq!(
        d.metric(
            "decode-0",
            "xpyd_decode_prefills_total",
            "location=\"local\""
        )
        .await,
        2.0
    );
    assert_eq!(remote_prefills(&d, "decode-0").await, 1.0);
    // The settings generation was acknowledged for the operator.
    let mut etcd = d.etcd.client().await.unwrap();
    let acks = etcd
        .get(
            format!("/xpyd/{NAMESPACE}/disagg-1p1d/router-acks/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(
        acks.kvs()
            .iter()
            .any(|kv| kv.value_str().unwrap_or("").contains("\"generation\":2")),
        "no ack of generation 2"
    );
}

#[tokio::test]
async fn two_prefill_two_decode_serve_twenty_concurrent_requests() {
    let d = Deployment::start("disagg-2p2d", 2, 2, 32, &[]).await;
    let capitals = ["France", "Germany", "Italy", "Spain", "Portugal"];
    let requests = (0..20).map(|i| {
        let country = capitals[i % capitals.len()];
        // Distinct prompts: no prefix-cache shortcut.
        let system = format!("Request {i}. {LONG_SYSTEM}");
        let d = &d;
        async move {
            let question = format!("What is the capital of {country}?");
            (country, d.chat(&system, &question, 8).await)
        }
    });
    let results = join_all(requests).await;
    for (country, (status, body)) in &results {
        assert_eq!(*status, 200, "{country}: {body}");
        let reason = body["choices"][0]["finish_reason"].as_str().unwrap_or("");
        assert!(reason == "stop" || reason == "length", "{body}");
    }
    let france = results
        .iter()
        .filter(|(c, _)| *c == "France")
        .map(|(_, (_, b))| answer(b))
        .collect::<Vec<_>>();
    assert!(france.iter().all(|a| a.contains("Paris")), "{france:?}");
    let mut remote = 0.0;
    for decode in ["decode-0", "decode-1"] {
        remote += remote_prefills(&d, decode).await;
    }
    assert!(
        remote >= 10.0,
        "only {remote} of 20 requests were prefilled remotely"
    );
    for prefill in ["prefill-0", "prefill-1"] {
        let ok = d
            .metric(prefill, "xpyd_prefill_jobs_total", "result=\"ok\"")
            .await;
        assert!(ok > 0.0, "{prefill} took no work");
    }
}

#[tokio::test]
async fn a_prefill_worker_killed_mid_run_loses_no_request_and_leaks_no_block() {
    let mut d = Deployment::start(
        "disagg-kill",
        2,
        1,
        32,
        &["--remote-prefill-timeout-ms", "8000"],
    )
    .await;
    let started = Instant::now();
    let requests = join_all((0..8).map(|i| {
        let d = &d;
        async move {
            let system = format!("Student {i}. {LONG_SYSTEM}");
            d.chat(&system, "What is the capital of France?", 24).await
        }
    }));
    let kill = async {
        // Once prefill-0 has taken work, SIGKILL it (its process group, as
        // the harness's own kill does; the handle reaps it below).
        let log_path = d.agent_ref("prefill-0").process.log_path().to_path_buf();
        wait_until("prefill-0 takes a job", Duration::from_secs(60), || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            async move { Ok::<_, String>(log.contains("claimed; computing")) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", d.log_tails()));
        let pid = d
            .agents
            .iter()
            .find(|a| a.name == "prefill-0")
            .unwrap()
            .process
            .pid();
        if let Some(pid) = pid {
            // SAFETY: signalling a process group we started.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    };
    let (results, ()) = tokio::join!(requests, kill);
    // Every request is answered, and rightly: those prefill-0 held fall
    // back to a local prefill (or go to prefill-1), none fails.
    for (status, body) in &results {
        assert_eq!(*status, 200, "{body}");
        assert!(answer(body).contains("Paris"), "{body}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(110),
        "requests hung"
    );
    d.agent("prefill-0").process.kill();
    // Every KV block of the decode worker is free again (cached blocks
    // count as free: nothing holds them).
    assert_pool_full(&d, "decode-0").await;
    // And it still serves, through the surviving prefill worker.
    let (status, body) = d
        .chat(LONG_SYSTEM, "What is the capital of France?", 8)
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The prefill worker that claims the (only) long prompt is hit by
/// `fault` once it computes (or, with `stops_at` a test fault such as
/// `stop-after-post`, once that fault stopped it: see `XPYD_TEST_FAULT`);
/// the decode worker's remote-prefill deadline is 60 s. Returns the
/// answer and how long it took.
async fn claimant_fault(
    name: &str,
    prefill_args: &[&str],
    stops_at: Option<&str>,
    fault: impl FnOnce(&Deployment),
) -> (Deployment, (u16, Value), Duration) {
    let mut d = Deployment::start(name, 0, 1, 32, &["--remote-prefill-timeout-ms", "60000"]).await;
    if let Some(stop) = stops_at {
        d.spawn_faulty_prefill(stop, prefill_args).await;
    } else {
        d.spawn("prefill", "prefill-0", prefill_args).await;
    }
    let started = Instant::now();
    let system = long_prompt("Fault");
    let request = async {
        let result = d.chat(&system, "Name the capital of France.", 8).await;
        (result, started.elapsed())
    };
    let drive = async {
        if stops_at.is_some() {
            d.await_stopped("prefill-0").await;
        } else {
            let log_path = d.agent_ref("prefill-0").process.log_path().to_path_buf();
            wait_until("prefill-0 claims the job", Duration::from_secs(30), || {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                async move {
                    Ok::<_, String>(
                        log.contains("claimed; computing") || log.contains("prefill job failed"),
                    )
                }
            })
            .await
            .expect("prefill-0 claimed the job");
        }
        fault(&d);
    };
    let ((result, took), ()) = tokio::join!(request, drive);
    (d, result, took)
}

async fn fallbacks(d: &Deployment, reason: &str) -> f64 {
    d.metric(
        "decode-0",
        "xpyd_decode_remote_prefill_fallbacks_total",
        &format!("reason=\"{reason}\""),
    )
    .await
}

/// Prompts decode worker `decode` had prefilled remotely.
async fn remote_prefills(d: &Deployment, decode: &str) -> f64 {
    d.metric(decode, "xpyd_decode_prefills_total", "location=\"remote\"")
        .await
}

/// Sends fresh long prompts (each its own, so no prefix-cache hit makes it
/// local) until one is answered rightly by a remote prefill beyond the
/// `before` decode-0 had; fails after 90 s.
async fn await_disaggregation(d: &Deployment, before: f64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for attempt in 0.. {
        let (status, body) = d
            .chat(&long_prompt(&format!("Attempt {attempt}")), FRANCE, 8)
            .await;
        if status == 200 && remote_prefills(d, "decode-0").await > before {
            assert!(answer(&body).contains("Paris"), "{body}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no remote prefill after the fault: {status} {body}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until every KV block of `decode` is free again.
async fn assert_pool_full(d: &Deployment, decode: &str) {
    wait_until(
        &format!("{decode}'s blocks are all free"),
        Duration::from_secs(30),
        || async {
            let (total, free) = d.blocks(decode).await?;
            Ok::<_, reqwest::Error>(total > 0.0 && free == total)
        },
    )
    .await
    .unwrap();
}

/// The request was answered rightly by a local prefill that followed the
/// fault's detection (fallback `reason`), not the 60 s deadline, and the
/// decode worker's blocks are all free again.
async fn assert_fell_back_at_once(
    d: &Deployment,
    (status, body): &(u16, Value),
    took: Duration,
    reason: &str,
) {
    assert_eq!(*status, 200, "{body}");
    assert!(answer(body).contains("Paris"), "{body}");
    assert_eq!(fallbacks(d, reason).await, 1.0, "{}", d.log_tails());
    assert_eq!(fallbacks(d, "timeout").await, 0.0);
    assert!(
        took < Duration::from_secs(60),
        "ran to the deadline: {took:?}"
    );
    assert_pool_full(d, "decode-0").await;
}

#[tokio::test]
async fn a_prefill_worker_killed_after_claiming_costs_detection_time_not_the_deadline() {
    let (d, result, took) = claimant_fault("fault-kill", &[], None, |d| {
        d.signal("prefill-0", libc::SIGKILL);
    })
    .await;
    eprintln!("answered {took:?} after the request; prefill-0 SIGKILLed mid-job");
    // Noticed through the bus (nobody serves the claimant's subject).
    assert_fell_back_at_once(&d, &result, took, "prefill_gone").await;
}

/// Fault 1 of the KV handoff: the prefill worker dies with its write
/// posted (it stopped itself right after posting it, then is SIGKILLed).
/// On one host UCX may move all the bytes within the post (shared memory),
/// so the write has either landed whole, notification included, or been
/// cut; either way the answer is right, nobody waits for the deadline, and
/// every block comes back.
#[tokio::test]
async fn a_prefill_worker_killed_during_its_write_costs_detection_time_and_leaks_no_block() {
    let (d, (status, body), took) =
        claimant_fault("kill-mid-write", &[], Some("stop-after-post"), |d| {
            d.signal("prefill-0", libc::SIGKILL);
        })
        .await;
    let landed = remote_prefills(&d, "decode-0").await;
    let gone = fallbacks(&d, "prefill_gone").await;
    eprintln!(
        "answered {took:?} after the request; prefill-0 SIGKILLed after posting its write \
         (write landed: {landed}, fell back: {gone})"
    );
    assert_eq!(status, 200, "{body}");
    assert!(answer(&body).contains("Paris"), "{body}");
    assert_eq!(landed + gone, 1.0, "{}", d.log_tails());
    assert_eq!(fallbacks(&d, "timeout").await, 0.0);
    assert!(
        took < Duration::from_secs(60),
        "ran to the deadline: {took:?}"
    );
    assert_pool_full(&d, "decode-0").await;
}

/// Fault 1, with the window made certain: the prefill worker dies in the
/// middle of its write. It writes the first half of the blocks (a NIXL
/// write of its own, complete: those bytes are in the decode worker's
/// blocks), stops itself before the second half
/// (`XPYD_TEST_FAULT=stop-mid-write`), and is SIGKILLed. No notification
/// ever comes; the decode worker falls back as soon as it finds the
/// claimant gone, never uses the half-written KV, answers rightly, and
/// every block comes back.
#[tokio::test]
async fn a_prefill_worker_killed_with_half_its_kv_written_costs_detection_time_and_no_wrong_answer()
{
    let (d, (status, body), took) =
        claimant_fault("kill-half-written", &[], Some("stop-mid-write"), |d| {
            d.signal("prefill-0", libc::SIGKILL);
        })
        .await;
    let log = std::fs::read_to_string(d.agent_ref("prefill-0").process.log_path()).unwrap();
    eprintln!("answered {took:?} after the request; prefill-0 SIGKILLed with half its KV written");
    assert!(
        log.contains("test fault: the first half of the write landed"),
        "the write was cut in the middle: {}",
        d.log_tails()
    );
    assert_eq!(
        remote_prefills(&d, "decode-0").await,
        0.0,
        "no notification came"
    );
    assert_fell_back_at_once(&d, &(status, body), took, "prefill_gone").await;
}

/// Fault 2 of the KV handoff: the decode worker dies while the prefill
/// worker is about to write into it (stopped just before the write, then
/// continued once the decode worker is SIGKILLed). The write to the dead
/// peer fails, the job ends once (it is not redelivered and retried in a
/// loop), the prefill worker serves on, and the client's request, which
/// had no token yet, is retried on the other decode worker.
#[tokio::test]
async fn a_decode_worker_killed_before_the_write_ends_the_job_once_and_the_request_moves() {
    let mut d = Deployment::start(
        "kill-decode-mid-write",
        0,
        2,
        32,
        &["--remote-prefill-timeout-ms", "20000"],
    )
    .await;
    d.spawn_faulty_prefill("stop-before-write", &[]).await;
    let started = Instant::now();
    let request = async {
        let result = d.chat(&long_prompt("Victim"), FRANCE, 8).await;
        (result, started.elapsed())
    };
    let drive = async {
        d.await_stopped("prefill-0").await;
        let mut victim = None;
        for name in ["decode-0", "decode-1"] {
            let (total, free) = d.blocks(name).await.unwrap();
            if free < total {
                victim = Some(name);
            }
        }
        let victim = victim.unwrap_or_else(|| {
            panic!(
                "no decode worker holds the prompt's blocks; logs:\n{}",
                d.log_tails()
            )
        });
        d.signal(victim, libc::SIGKILL);
        d.signal("prefill-0", libc::SIGCONT);
        victim
    };
    let (((status, body), took), victim) = tokio::join!(request, drive);
    eprintln!("answered {took:?} after the request; {victim} SIGKILLed before the write");
    assert_eq!(status, 200, "{body}");
    assert!(answer(&body).contains("Paris"), "{body}");
    // The job ended once, within its deadline, whatever the write did.
    let jobs = || d.metric("prefill-0", "xpyd_prefill_jobs_total", "");
    wait_until(
        "prefill-0 ends the job",
        Duration::from_secs(30),
        || async { Ok::<_, String>(jobs().await >= 1.0) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", d.log_tails()));
    let survivor = if victim == "decode-0" {
        "decode-1"
    } else {
        "decode-0"
    };
    // Not retried in a loop: the count holds while the queue would have
    // redelivered an unacknowledged job.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let failed = d
        .metric("prefill-0", "xpyd_prefill_jobs_total", "result=\"failed\"")
        .await;
    assert_eq!(
        failed,
        1.0,
        "the write to the dead peer failed: {}",
        d.log_tails()
    );
    let survivor_remote = remote_prefills(&d, survivor).await;
    assert_eq!(
        jobs().await,
        1.0 + survivor_remote,
        "each job ended once: {}",
        d.log_tails()
    );
    // The prefill worker serves on.
    let (status, body) = d.chat(&long_prompt("After"), FRANCE, 8).await;
    assert_eq!(status, 200, "{body}");
    assert!(answer(&body).contains("Paris"), "{body}");
    assert_pool_full(&d, survivor).await;
}

#[tokio::test]
async fn a_prefill_job_that_fails_is_reported_and_decode_falls_back_at_once() {
    // A prefill worker whose engine takes no prompt this long fails the
    // job after claiming it (a real engine error, as a misconfigured
    // worker would give), and says so.
    let (d, result, took) = claimant_fault(
        "fault-fail",
        &["--max-model-len", "256", "--num-blocks", "64"],
        None,
        |_| {},
    )
    .await;
    eprintln!("answered {took:?} after the request; the prefill job failed");
    assert_fell_back_at_once(&d, &result, took, "prefill_failed").await;
}

#[tokio::test]
async fn with_on_prefill_unavailable_fail_a_long_prompt_gets_503_at_once_and_a_short_one_its_answer()
 {
    // No prefill worker at all, and the deployment refuses local prefills
    // of long prompts.
    let d = Deployment::start("policy-fail", 0, 1, 32, &[]).await;
    d.put_settings(json!({
        "generation": 2,
        "maxLocalPrefillLength": 32,
        "disaggregated": true,
        "onPrefillUnavailable": "fail",
    }))
    .await;
    d.wait_frontend_ack(2).await;
    let started = Instant::now();
    let (status, body) = d
        .chat(&long_prompt("Policy"), "Name the capital of France.", 8)
        .await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no_prefill_worker") && message.contains("onPrefillUnavailable"),
        "{body}"
    );
    // Refused before any prefill, not after a local one.
    assert_eq!(
        d.metric(
            "decode-0",
            "xpyd_decode_prefills_total",
            "location=\"refused\""
        )
        .await,
        1.0
    );
    assert_eq!(
        d.metric(
            "decode-0",
            "xpyd_decode_prefills_total",
            "location=\"local\""
        )
        .await,
        0.0,
        "answered in {took:?}"
    );
    let (status, body) = d.chat("Be brief.", "Name the capital of France.", 8).await;
    assert_eq!(status, 200, "{body}");
    assert!(answer(&body).contains("Paris"), "{body}");
}

#[tokio::test]
async fn agents_survive_etcd_and_nats_restarts_without_restarting() {
    let mut d = Deployment::start("disagg-restart", 1, 1, 32, &[]).await;
    let (status, body) = d
        .chat(LONG_SYSTEM, "What is the capital of France?", 8)
        .await;
    assert_eq!(status, 200, "{body}");

    d.etcd.kill();
    d.etcd.restart().await.unwrap();
    d.nats.kill();
    d.nats.restart().await.unwrap();

    // Serving resumes, still disaggregated, within a deadline.
    let before = remote_prefills(&d, "decode-0").await;
    await_disaggregation(&d, before).await;
    let names: Vec<String> = d.agents.iter().map(|a| a.name.clone()).collect();
    for name in names {
        d.agent(&name)
            .process
            .check_running()
            .unwrap_or_else(|e| panic!("{name} restarted or died: {e}"));
    }
}

/// Prompt tokens served from the prefix cache over all prompt tokens, for
/// `rounds` rounds of three fresh system prompts with four questions each.
async fn prefix_hit_rate(d: &Deployment, tag: &str) -> f64 {
    let (mut cached, mut total) = (0.0, 0.0);
    for topic in ["rivers", "mountains", "capitals"] {
        let system = format!("Topic {tag} {topic}. {LONG_SYSTEM} {LONG_SYSTEM}");
        for q in ["France", "Italy", "Spain", "Austria"] {
            let (status, body) = d.chat(&system, &format!("Tell me about {q}."), 2).await;
            assert_eq!(status, 200, "{body}");
            total += body["usage"]["prompt_tokens"].as_f64().unwrap();
            cached += body["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_f64()
                .unwrap_or(0.0);
        }
    }
    cached / total
}

#[tokio::test]
async fn kv_routing_sends_shared_prefixes_to_the_worker_that_holds_them() {
    let d = Deployment::start("route-kv", 0, 2, 100_000, &[]).await;
    d.set_settings("kv", 100_000, 2).await;
    d.wait_frontend_ack(2).await;
    let kv = prefix_hit_rate(&d, "kv").await;
    d.set_settings("round_robin", 100_000, 3).await;
    d.wait_frontend_ack(3).await;
    let rr = prefix_hit_rate(&d, "rr").await;
    // Four questions per prompt on two workers: kv misses once per prompt,
    // round robin twice.
    assert!(kv > rr + 0.1, "kv hit rate {kv:.2}, round robin {rr:.2}");
    assert!(kv > 0.55, "kv hit rate {kv:.2}");
}

#[tokio::test]
async fn sessions_stick_to_one_worker_and_move_when_it_dies() {
    let mut d = Deployment::start("route-session", 0, 2, 100_000, &[]).await;
    d.set_settings("session", 100_000, 2).await;
    d.wait_frontend_ack(2).await;
    let before = served(&d).await;
    for i in 0..10 {
        let (status, body) = d
            .chat_in_session(Some("alice"), "Be brief.", &format!("Question {i}?"), 2)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let after = served(&d).await;
    let gained: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(
        gained.contains(&10.0) && gained.contains(&0.0),
        "the session's 10 requests were spread: {gained:?}"
    );
    let (home, other) = if gained[0] == 10.0 {
        ("decode-0", "decode-1")
    } else {
        ("decode-1", "decode-0")
    };
    d.agent(home).process.kill();
    // The session moves to the surviving worker and stays there.
    let start = d.metric(other, "xpyd_decode_prefills_total", "").await;
    for i in 0..4 {
        let (status, body) = d
            .chat_in_session(Some("alice"), "Be brief.", &format!("After {i}?"), 2)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        d.metric(other, "xpyd_decode_prefills_total", "").await - start,
        4.0
    );
}

/// Prefills each decode worker did, in order.
async fn served(d: &Deployment) -> Vec<f64> {
    let mut counts = Vec::new();
    for w in ["decode-0", "decode-1"] {
        counts.push(d.metric(w, "xpyd_decode_prefills_total", "").await);
    }
    counts
}

/// A system prompt of about 400 tokens: about half a second of prefill on
/// these CPUs with AVX-512 (seconds on AVX2), long enough to signal a
/// worker in the middle of it.
fn long_prompt(tag: &str) -> String {
    long_prompt_of(tag, 5)
}

/// `repeats` copies of [`LONG_SYSTEM`] (about 70 tokens each) after `tag`.
fn long_prompt_of(tag: &str, repeats: usize) -> String {
    format!("{tag}.{}", format!(" {LONG_SYSTEM}").repeat(repeats))
}

/// Grace period of the draining decode worker in the two drain tests.
/// Decode flags of the fault tests: long prompts (about 400 tokens) go
/// remote, short ones stay local, and the deadline leaves room for seconds
/// of prefill on busy CPUs (a fault must end the wait, not the deadline).
const LONG_WAIT_400_REMOTE: &[&str] = &[
    "--remote-prefill-timeout-ms",
    "60000",
    "--max-local-prefill-length",
    "200",
];

const DECODE_GRACE: Duration = Duration::from_secs(15);

/// A 1P1D deployment whose prefill worker is stopped (SIGSTOP), so a long
/// prompt's job waits unclaimed; once the decode worker holds the prompt's
/// blocks it is SIGTERMed, and `resume_prefill_after` later (if any) the
/// prefill worker continues. Returns the deployment, the answer, and how
/// long after SIGTERM the decode worker answered and exited. The prefill
/// worker is continued (SIGCONT) before returning.
async fn sigterm_decode_awaiting_a_stopped_prefill(
    name: &str,
    resume_prefill_after: Option<Duration>,
) -> (Deployment, (u16, Value), Duration, Duration) {
    let grace = DECODE_GRACE;
    let d = Deployment::start(
        name,
        1,
        1,
        32,
        &["--grace-seconds", &grace.as_secs().to_string()],
    )
    .await;
    d.signal("prefill-0", libc::SIGSTOP);
    let request = async {
        let result = d.chat(LONG_SYSTEM, FRANCE, 12).await;
        (result, Instant::now())
    };
    let drive = async {
        d.await_reserved_blocks("decode-0").await;
        d.signal("decode-0", libc::SIGTERM);
        let sigterm = Instant::now();
        if let Some(after) = resume_prefill_after {
            tokio::time::sleep(after).await;
            d.signal("prefill-0", libc::SIGCONT);
        }
        let exit_after = d.time_exit("decode-0", sigterm, grace * 2).await;
        (sigterm, exit_after)
    };
    let ((result, answered), (sigterm, exit_after)) = tokio::join!(request, drive);
    d.signal("prefill-0", libc::SIGCONT);
    (d, result, answered.duration_since(sigterm), exit_after)
}

/// The draining decode worker answered rightly and exited cleanly, both
/// within its grace period.
async fn assert_drained_within_grace(
    d: &mut Deployment,
    (status, body): &(u16, Value),
    answered_after: Duration,
    exit_after: Duration,
) {
    eprintln!("decode-0 answered {answered_after:?} and exited {exit_after:?} after SIGTERM");
    assert_eq!(*status, 200, "{body}");
    assert!(answer(body).contains("Paris"), "{body}");
    assert!(
        answered_after < DECODE_GRACE,
        "answered {answered_after:?} after SIGTERM"
    );
    assert!(
        exit_after < DECODE_GRACE,
        "decode-0 exited {exit_after:?} after SIGTERM"
    );
    let exit = d
        .wait_exit("decode-0", Instant::now() + Duration::from_secs(5))
        .await;
    assert!(exit.contains("exit status: 0"), "{exit}");
}

#[tokio::test]
async fn a_decode_worker_sigtermed_during_a_remote_prefill_answers_it_within_its_grace() {
    // The prefill worker claims the job once the decode worker drains.
    let (mut d, result, answered_after, exit_after) =
        sigterm_decode_awaiting_a_stopped_prefill("drain-decode", Some(Duration::from_millis(500)))
            .await;
    // The KV was computed remotely: the draining decode worker still took
    // the prefill worker's claim and its write.
    assert_eq!(
        d.metric("prefill-0", "xpyd_prefill_jobs_total", "result=\"ok\"")
            .await,
        1.0
    );
    assert!(
        d.metric(
            "prefill-0",
            "xpyd_transfer_bytes_total",
            "direction=\"sent\""
        )
        .await
            > 0.0
    );
    assert_drained_within_grace(&mut d, &result, answered_after, exit_after).await;
}

/// Copies of [`LONG_SYSTEM`] in the prompt of the hand-back test.
const HANDBACK_REPEATS: usize = 14;

/// What [`sigterm_the_prefill_worker_mid_job`] saw.
struct MidJob {
    result: (u16, Value),
    /// From the request to its answer.
    took: Duration,
    /// The prefill worker signalled, and when.
    busy: String,
    /// From SIGTERM to the worker's exit.
    exit_after: Duration,
}

/// Run one long-prompt request and SIGTERM the prefill worker computing it.
async fn sigterm_the_prefill_worker_mid_job(d: &Deployment, system: &str) -> MidJob {
    let started = Instant::now();
    let request = async {
        let result = d.chat(system, FRANCE, 8).await;
        eprintln!(
            "the request ended after {:?}: {} {}",
            started.elapsed(),
            result.0,
            result.1
        );
        (result, started.elapsed())
    };
    let drive = async {
        // A prefill worker logs the claim, then computes for seconds.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut busy = None;
        while busy.is_none() {
            assert!(
                Instant::now() < deadline,
                "no prefill worker took the job; logs:\n{}",
                d.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            for a in d.agents.iter().filter(|a| a.name.starts_with("prefill")) {
                let log = std::fs::read_to_string(a.process.log_path()).unwrap_or_default();
                if log.contains("claimed; computing") {
                    busy = Some(a.name.clone());
                }
            }
        }
        let busy = busy.expect("a busy worker");
        d.signal(&busy, libc::SIGTERM);
        let exit_after = d
            .time_exit(&busy, Instant::now(), Duration::from_secs(60))
            .await;
        (busy, exit_after)
    };
    let ((result, took), (busy, exit_after)) = tokio::join!(request, drive);
    MidJob {
        result,
        took,
        busy,
        exit_after,
    }
}

/// The decode worker got the KV remotely, without waiting out its 30 s
/// remote-prefill deadline (no fallback), and the answer is right.
async fn assert_answered_remotely(d: &Deployment, result: &(u16, Value), took: Duration) {
    let (status, body) = result;
    assert_eq!(*status, 200, "{body}");
    assert!(answer(body).contains("Paris"), "{body}");
    assert!(took < Duration::from_secs(30), "the request took {took:?}");
    assert_eq!(remote_prefills(d, "decode-0").await, 1.0);
    assert_eq!(
        d.metric("decode-0", "xpyd_decode_remote_prefill_fallbacks_total", "")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_prefill_worker_sigtermed_mid_job_finishes_it_within_its_grace() {
    let mut d = Deployment::start("drain-prefill-finish", 0, 1, 32, &[]).await;
    for name in ["prefill-0", "prefill-1"] {
        d.spawn("prefill", name, &["--grace-seconds", "30"]).await;
    }
    let job = sigterm_the_prefill_worker_mid_job(&d, &long_prompt("Drain")).await;
    let busy = job.busy.as_str();
    eprintln!(
        "request answered in {:?}; {busy} SIGTERMed mid-job",
        job.took
    );
    assert_answered_remotely(&d, &job.result, job.took).await;
    let other = if busy == "prefill-0" {
        "prefill-1"
    } else {
        "prefill-0"
    };
    assert_eq!(
        d.metric(other, "xpyd_prefill_jobs_total", "").await,
        0.0,
        "the SIGTERMed worker finished its job itself"
    );
    eprintln!("{busy} exited {:?} after SIGTERM", job.exit_after);
    assert!(
        job.exit_after < Duration::from_secs(30),
        "{busy} overran its grace"
    );
    let exit = d
        .wait_exit(busy, Instant::now() + Duration::from_secs(5))
        .await;
    assert!(exit.contains("exit status: 0"), "{exit}");
}

#[tokio::test]
async fn a_prefill_worker_that_cannot_finish_within_its_grace_hands_the_job_back() {
    let grace = Duration::from_secs(1);
    let mut d = Deployment::start("drain-prefill-handback", 0, 1, 32, &[]).await;
    // A grace far shorter than the prompt's prefill (about 900 tokens, the
    // most the tests' 1,024-token context takes, in 16-token steps: seconds
    // even on AVX-512, where the 400 tokens of `long_prompt` in 64-token
    // steps take half a second): a CPU engine gives up a request only
    // between two steps.
    for name in ["prefill-0", "prefill-1"] {
        let grace = grace.as_secs().to_string();
        let flags = ["--grace-seconds", &grace, "--max-batch-tokens", "16"];
        d.spawn("prefill", name, &flags).await;
    }
    let job =
        sigterm_the_prefill_worker_mid_job(&d, &long_prompt_of("Drain", HANDBACK_REPEATS)).await;
    let busy = job.busy.as_str();
    eprintln!(
        "request answered in {:?}; {busy} SIGTERMed mid-job",
        job.took
    );
    assert_answered_remotely(&d, &job.result, job.took).await;
    let other = if busy == "prefill-0" {
        "prefill-1"
    } else {
        "prefill-0"
    };
    assert_eq!(
        d.metric(other, "xpyd_prefill_jobs_total", "result=\"ok\"")
            .await,
        1.0,
        "the job was redelivered to {other}, and computed once"
    );
    // The redelivery is the only copy: the decode worker did not take the
    // handed-back job for one the queue lost and put a second on it.
    assert_eq!(
        d.metric("decode-0", "xpyd_decode_prefill_requeues_total", "")
            .await,
        0.0
    );
    // Out within its grace, plus one engine step to stop computing.
    eprintln!("{busy} exited {:?} after SIGTERM", job.exit_after);
    assert!(
        job.exit_after < grace + Duration::from_secs(3),
        "{busy} exited {:?} after SIGTERM",
        job.exit_after
    );
    let exit = d
        .wait_exit(busy, Instant::now() + Duration::from_secs(5))
        .await;
    assert!(exit.contains("exit status: 0"), "{exit}");
}

#[tokio::test]
async fn a_decode_worker_added_under_kv_routing_gets_a_share_of_short_chats() {
    const TEMPLATE: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    let mut d = Deployment::start("route-scale-out", 0, 1, 100_000, &[]).await;
    d.set_settings("kv", 100_000, 2).await;
    d.wait_frontend_ack(2).await;
    // decode-0 serves a chat, so it caches the chat template's first block.
    let (status, body) = d.chat(TEMPLATE, "Hello!", 2).await;
    assert_eq!(status, 200, "{body}");

    // Scale out: the frontend's router must know decode-1 before the burst.
    d.spawn("decode", "decode-1", &[]).await;
    wait_until(
        "the frontend routes to decode-1",
        Duration::from_secs(30),
        || async {
            let text = d.metrics_text("frontend-0").await?;
            Ok::<_, reqwest::Error>(text.lines().any(|l| {
                l.starts_with("xpyd_router_worker_waiting_requests") && l.contains("decode-1")
            }))
        },
    )
    .await
    .unwrap();

    // Six short chats at once, each sharing only the template's first
    // block with what decode-0 caches.
    let before = served(&d).await;
    let chats = join_all((0..6).map(|i| {
        let d = &d;
        async move {
            d.chat(
                TEMPLATE,
                &format!("Tell me a fact about the number {i}."),
                24,
            )
            .await
        }
    }))
    .await;
    for (status, body) in &chats {
        assert_eq!(*status, 200, "{body}");
    }
    let after = served(&d).await;
    let gained: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!(
        "six short chats after scale-out: decode-0 {}, decode-1 {}",
        gained[0], gained[1]
    );
    assert!(
        gained[1] >= 2.0,
        "the new decode worker got {} of 6 short chats",
        gained[1]
    );
}

#[tokio::test]
async fn a_draining_decode_worker_whose_remote_prefill_nobody_claims_prefills_it_locally_in_time() {
    // The prefill worker hangs for good: nobody will claim the job. It is
    // withdrawn 5 s into the drain and prefilled locally, well before the
    // 30 s remote-prefill deadline and within the grace period.
    let (mut d, result, answered_after, exit_after) =
        sigterm_decode_awaiting_a_stopped_prefill("drain-decode-unclaimed", None).await;
    assert_drained_within_grace(&mut d, &result, answered_after, exit_after).await;
}

/// Fault 3 of the KV handoff, the late writer. The prefill worker claims a
/// long prompt, computes it, passes its deadline check and stops (SIGSTOP,
/// injected at exactly that instant with `XPYD_TEST_FAULT`) just before it
/// posts its write; it stays stopped until the decode worker gives it up
/// as silent (5 s without an answer) and prefills the request locally, and
/// short requests run meanwhile.
/// Then it continues and writes, late. Its blocks must have been held out
/// of use (fenced) the whole time, so every answer is right, and they come
/// back once the write ended.
#[tokio::test]
async fn a_late_writer_resumed_after_the_deadline_writes_only_into_fenced_blocks() {
    // Long prompts (about 400 tokens) go remote, short ones stay local.
    let mut d = Deployment::start(
        "late-writer",
        0,
        1,
        32,
        // The silence of the stopped claimant must end the wait, not this.
        LONG_WAIT_400_REMOTE,
    )
    .await;
    d.spawn_faulty_prefill("stop-before-write", &[]).await;
    // A short question whose first token is no near-tie (a 1.3 logit
    // margin; "Name the capital of Italy." opens on "The" against "Il",
    // 0.1-0.2 apart, which the kernels' summation order decides).
    let short = "Name the capital of France.";
    let (status, reference) = d.chat("You are brief.", short, 24).await;
    assert_eq!(status, 200, "{reference}");
    let reference = answer(&reference);
    assert!(reference.contains("Paris"), "{reference}");

    let started = Instant::now();
    let system = long_prompt("Late");
    let late = async {
        let result = d.chat(&system, FRANCE, 12).await;
        (result, started.elapsed())
    };
    let stopped = d.await_stopped("prefill-0");
    let (((status, body), took), ()) = tokio::join!(late, stopped);
    eprintln!("answered {took:?} after the request, the claimant stopped before its write");
    assert_eq!(status, 200, "{body}");
    assert!(answer(&body).contains("Paris"), "{body}");
    assert_eq!(
        fallbacks(&d, "prefill_unresponsive").await,
        1.0,
        "{}",
        d.log_tails()
    );
    assert!(
        took < Duration::from_secs(60),
        "waited for the deadline: {took:?}"
    );
    assert_eq!(d.process_state("prefill-0"), Some('T'), "still stopped");
    // The claimant may still write: its blocks are out of use (the gauge
    // is refreshed every second).
    let fenced = || d.try_metric("decode-0", "xpyd_engine_kv_blocks_fenced", "");
    wait_until(
        "the claimant's blocks are fenced",
        Duration::from_secs(5),
        || async { Ok::<_, reqwest::Error>(fenced().await? >= 20.0) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", d.log_tails()));
    // Requests served while the writer is stopped, and while it writes.
    let meanwhile = join_all((0..4).map(|_| d.chat("You are brief.", short, 24))).await;
    d.signal("prefill-0", libc::SIGCONT);
    let after = join_all((0..4).map(|_| d.chat("You are brief.", short, 24))).await;
    for (status, body) in meanwhile.iter().chain(&after) {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(answer(body), reference, "{body}");
    }
    // The late write ended (landed or was cut at its deadline): the
    // fenced blocks come back and the pool is whole again.
    wait_until("the fence is released", Duration::from_secs(30), || async {
        Ok::<_, reqwest::Error>(fenced().await? == 0.0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", d.log_tails()));
    assert_pool_full(&d, "decode-0").await;
    let log = std::fs::read_to_string(d.agent_ref("decode-0").process.log_path()).unwrap();
    assert!(
        log.contains("fenced KV blocks released"),
        "{}",
        d.log_tails()
    );
    // The writer is healthy again and serves the next long prompt remotely.
    let (status, body) = d.chat(&long_prompt("Again"), FRANCE, 12).await;
    assert_eq!(status, 200, "{body}");
    assert!(answer(&body).contains("Paris"), "{body}");
    assert_eq!(
        remote_prefills(&d, "decode-0").await,
        1.0,
        "{}",
        d.log_tails()
    );
}

/// A prefill worker holds one job at a time; the others wait in the shared
/// queue for whichever worker is free first, including one started after
/// they were queued. Here the only worker stalls (stopped just before its
/// write) with three long prompts queued: its own job falls back to a local
/// prefill once the decode worker finds it unresponsive, and the other two
/// wait in the queue, not behind the stalled job, until a second worker
/// starts and computes both.
#[tokio::test]
async fn queued_prefill_jobs_wait_for_any_free_worker_not_behind_a_busy_one() {
    let mut d = Deployment::start("queue-shared", 0, 1, 32, LONG_WAIT_400_REMOTE).await;
    d.spawn_faulty_prefill("stop-before-write", &[]).await;
    let chats: Vec<_> = ["Alpha", "Bravo", "Charlie"]
        .into_iter()
        .map(|tag| {
            let (http, api) = (d.http.clone(), d.api.clone());
            tokio::spawn(async move {
                post_chat(&http, &api, None, &long_prompt(tag), FRANCE, 12).await
            })
        })
        .collect();
    d.await_stopped("prefill-0").await;
    d.spawn("prefill", "prefill-1", &[]).await;
    for chat in chats {
        let (status, body) = chat.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(answer(&body).contains("Paris"), "{body}");
    }
    assert_eq!(
        d.metric("prefill-1", "xpyd_prefill_jobs_total", "result=\"ok\"")
            .await,
        2.0,
        "the two jobs queued behind the stalled one went to the new worker; logs:\n{}",
        d.log_tails()
    );
    assert_eq!(
        fallbacks(&d, "prefill_unresponsive").await,
        1.0,
        "{}",
        d.log_tails()
    );
    assert_eq!(remote_prefills(&d, "decode-0").await, 2.0);
    d.signal("prefill-0", libc::SIGCONT);
}

/// Fault 5 of the KV handoff: the data path from the prefill worker to the
/// decode worker is cut while NATS stays healthy. On one host UCX moves the
/// bytes through shared memory, which no firewall rule cuts, so the cut is
/// made at the write call (`XPYD_TEST_FAULT=cut-writes-while:<file>`); the
/// claim, the compute, the bus and the NIXL agents around it are real.
/// Each failed write is reported at once and its request answered by a
/// local prefill; three in a row quarantine the path, after which long
/// prompts are prefilled locally without a round trip, or, once a healthy
/// prefill worker joins, go to it: the quarantined worker's claims are
/// declined and it writes nothing. Once the path is back, the probe that
/// ends the quarantine lands and the path is used again.
#[tokio::test]
async fn a_cut_data_path_is_quarantined_and_used_again_once_a_probe_lands() {
    let mut d = Deployment::start("cut-path", 0, 1, 32, LONG_WAIT_400_REMOTE).await;
    let cut = d.dir.path().join("data-path-cut");
    std::fs::write(&cut, "").unwrap();
    d.spawn_faulty_prefill(&format!("cut-writes-while:{}", cut.display()), &[])
        .await;
    async fn quarantined(d: &Deployment) -> Result<f64, reqwest::Error> {
        d.try_metric(
            "decode-0",
            "xpyd_decode_path_quarantined",
            "prefill=\"prefill-0-",
        )
        .await
    }
    async fn failed_jobs(d: &Deployment) -> f64 {
        d.metric("prefill-0", "xpyd_prefill_jobs_total", "result=\"failed\"")
            .await
    }
    // Once quarantined, the only writes prefill-0 tries are the probes
    // (which fail while the path is cut, every 10 s, then 20 s...).
    async fn only_probes_tried(d: &Deployment, failed_before: f64, what: &str) {
        wait_until(what, Duration::from_secs(10), || async {
            let probes = d
                .try_metric(
                    "decode-0",
                    "xpyd_decode_path_probes_total",
                    "result=\"failed\"",
                )
                .await?;
            Ok::<_, reqwest::Error>(failed_jobs(d).await - failed_before == probes)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", d.log_tails()));
    }
    for i in 0..3 {
        let started = Instant::now();
        let (status, body) = d.chat(&long_prompt(&format!("Cut {i}")), FRANCE, 8).await;
        let took = started.elapsed();
        assert_eq!(status, 200, "{body}");
        assert!(answer(&body).contains("Paris"), "{body}");
        assert!(
            took < Duration::from_secs(60),
            "waited for the deadline: {took:?}"
        );
    }
    assert_eq!(
        fallbacks(&d, "prefill_failed").await,
        3.0,
        "{}",
        d.log_tails()
    );
    wait_until(
        "the path is quarantined",
        Duration::from_secs(5),
        || async { Ok::<_, reqwest::Error>(quarantined(&d).await? == 1.0) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", d.log_tails()));
    // Quarantined: the next long prompt stays here, and the prefill worker
    // never sees it.
    // prefill-0 counts a failure once the decode worker has taken it.
    wait_until(
        "prefill-0 counts its 3 failures",
        Duration::from_secs(5),
        || async { Ok::<_, String>(failed_jobs(&d).await >= 3.0) },
    )
    .await
    .unwrap();
    let failed = 3.0;
    let (status, body) = d.chat(&long_prompt("Quarantined"), FRANCE, 8).await;
    assert_eq!(status, 200, "{body}");
    assert!(answer(&body).contains("Paris"), "{body}");
    assert_eq!(fallbacks(&d, "path_quarantined").await, 1.0);
    only_probes_tried(&d, failed, "no job but probes reached the quarantined path").await;
    assert_eq!(remote_prefills(&d, "decode-0").await, 0.0);

    // A healthy prefill worker joins: long prompts go to it. Those the
    // quarantined worker takes from the queue are declined and handed back
    // (after three declines a prompt is prefilled here); it writes nothing.
    d.spawn("prefill", "prefill-1", &[]).await;
    for i in 0..3 {
        let (status, body) = d.chat(&long_prompt(&format!("Other {i}")), FRANCE, 8).await;
        assert_eq!(status, 200, "{body}");
        assert!(answer(&body).contains("Paris"), "{body}");
    }
    let remote = remote_prefills(&d, "decode-0").await;
    assert!(remote >= 1.0, "none went to prefill-1: {}", d.log_tails());
    assert_eq!(
        remote + fallbacks(&d, "path_quarantined").await,
        4.0,
        "each went to prefill-1 or stayed here for the quarantine: {}",
        d.log_tails()
    );
    only_probes_tried(&d, failed, "the quarantined path wrote nothing but probes").await;
    let declined = d
        .metric(
            "prefill-0",
            "xpyd_prefill_jobs_total",
            "result=\"declined\"",
        )
        .await;
    eprintln!("{remote} of 3 went to prefill-1; prefill-0 had {declined} claims declined");

    // The path comes back: the probe at the end of the quarantine lands
    // (a probe while it was still cut would double the quarantine).
    std::fs::remove_file(&cut).unwrap();
    let probes_ok = || d.try_metric("decode-0", "xpyd_decode_path_probes_total", "result=\"ok\"");
    wait_until("a probe lands", Duration::from_secs(60), || async {
        Ok::<_, reqwest::Error>(probes_ok().await? >= 1.0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; logs:\n{}", d.log_tails()));
    wait_until("the path is healthy", Duration::from_secs(5), || async {
        Ok::<_, reqwest::Error>(quarantined(&d).await? == 0.0)
    })
    .await
    .unwrap();
    assert!(
        d.metric("prefill-0", "xpyd_prefill_jobs_total", "result=\"ok\"")
            .await
            >= 1.0,
        "the probe was written by prefill-0"
    );
    assert!(
        d.metric(
            "decode-0",
            "xpyd_decode_path_latency_seconds",
            "prefill=\"prefill-0-"
        )
        .await
            > 0.0,
        "the path's latency is shown"
    );
    // Every process here shares this host's kernel and namespaces, and
    // UCX_TLS is unset: UCX is inferred to move the KV by shared memory.
    let on_shm = d
        .metric(
            "decode-0",
            "xpyd_decode_path_transport",
            "transport=\"shared_memory\"",
        )
        .await;
    let on_any = d.metric("decode-0", "xpyd_decode_path_transport", "").await;
    assert!(
        on_shm >= 1.0 && on_any == on_shm,
        "{on_shm} of {on_any} paths on shared memory"
    );
    assert_pool_full(&d, "decode-0").await;
}

/// Fault 4 of the KV handoff: NATS and etcd restart in the middle of a
/// handoff. The claimant stops itself just before its write; meanwhile
/// both servers are killed and restarted; then it continues. The request
/// is answered rightly, its stream to the frontend paused by the outage
/// (the bus waits past its idle timeout while its connection is or just
/// was down), or, when a frame was published while neither side was
/// subscribed, fails with a clear 503 (the sequence gap); never a wrong or
/// shorter answer, never past its deadline plus a margin. Every block
/// comes back, and the next long prompt goes remote again.
#[tokio::test]
async fn nats_and_etcd_restarting_mid_handoff_give_a_right_answer_or_a_clear_error() {
    let mut d = Deployment::start(
        "restart-mid-handoff",
        0,
        1,
        32,
        &["--remote-prefill-timeout-ms", "30000"],
    )
    .await;
    d.spawn_faulty_prefill("stop-before-write", &[]).await;
    let started = Instant::now();
    let request = tokio::spawn({
        let (http, api) = (d.http.clone(), d.api.clone());
        async move {
            let result = post_chat(&http, &api, None, &long_prompt("Restart"), FRANCE, 8).await;
            (result, started.elapsed())
        }
    });
    d.await_stopped("prefill-0").await;
    d.etcd.kill();
    d.nats.kill();
    d.etcd.restart().await.unwrap();
    d.nats.restart().await.unwrap();
    d.signal("prefill-0", libc::SIGCONT);
    let ((status, body), took) = request.await.unwrap();
    let landed = remote_prefills(&d, "decode-0").await;
    let fell_back = d
        .metric("decode-0", "xpyd_decode_remote_prefill_fallbacks_total", "")
        .await;
    eprintln!(
        "answered {status} {took:?} after the request across NATS and etcd restarts \
         (write landed: {landed}, fell back: {fell_back})"
    );
    if status == 200 {
        assert!(answer(&body).contains("Paris"), "{body}");
    } else {
        // Frames sent while neither side was subscribed are lost; the
        // sequence gap makes that a clear error, never a shorter answer.
        assert_eq!(status, 503, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("decode worker"), "{body}");
    }
    assert_eq!(landed + fell_back, 1.0, "{}", d.log_tails());
    assert!(took < Duration::from_secs(30 + 15), "{took:?}");
    assert_pool_full(&d, "decode-0").await;
    // Disaggregation resumes.
    await_disaggregation(&d, landed).await;
}

/// Pods with `--device sim` (what the planner's tests run): a separate
/// frontend process learns from the decode worker's record that its engine
/// is simulated and labels every answer; the simulated prefill worker's KV
/// still reaches the decode worker over NIXL, and decodes as a local
/// prefill of the same prompt does.
#[tokio::test]
async fn simulated_workers_serve_labelled_answers_across_processes() {
    let mut d = Deployment::start("disagg-sim", 0, 1, 32, &["--device", "sim"]).await;
    d.spawn("prefill", "prefill-0", &["--device", "sim"]).await;
    // Each attempt its own prompt, so none is a prefix-cache hit of another.
    let ask = |attempt: u32| {
        d.http
            .post(format!("{}/v1/chat/completions", d.api))
            .json(&json!({
                "model": MODEL,
                "max_tokens": 10,
                "messages": [
                    {"role": "system", "content": format!("Attempt {attempt}. {LONG_SYSTEM}")},
                    {"role": "user", "content": FRANCE},
                ],
            }))
            .send()
    };
    // The prefill worker registered after the frontend started: wait until
    // a long prompt goes remote.
    let mut remote = None;
    let mut attempt = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while remote.is_none() && Instant::now() < deadline {
        attempt += 1;
        let resp = ask(attempt).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("x-xpyd-simulated").map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        let body: Value = resp.json().await.unwrap();
        if remote_prefills(&d, "decode-0").await > 0.0 {
            remote = Some(body);
        }
    }
    let remote = remote.expect("a long prompt prefilled remotely within 60 s");
    let text = answer(&remote);
    assert!(text.contains("sim") && !text.contains("Paris"), "{remote}");
    // Once more: now a prefix-cache hit on the decode worker, prefilled
    // there. The same placeholder answer means the NIXL-written blocks
    // held the prompt.
    let again: Value = ask(attempt).await.unwrap().json().await.unwrap();
    assert_eq!(answer(&again), text);
    let models: Value = d
        .http
        .get(format!("{}/v1/models", d.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["owned_by"], "xpyd-simulated", "{models}");
    for agent in ["decode-0", "prefill-0"] {
        assert_eq!(
            d.metric(agent, "xpyd_engine_info", "device=\"sim\"").await,
            1.0,
            "{agent}"
        );
    }
    assert!(
        d.metric(
            "decode-0",
            "xpyd_transfer_bytes_total",
            "direction=\"received\""
        )
        .await
            > 0.0
    );
}

/// Pairs that fit: two KV layouts in one deployment (block sizes 16 and
/// 32, as during a rolling update that changes it), each with a decode and
/// a prefill worker. Every long prompt is prefilled remotely by a prefill
/// worker of its decode worker's layout: none is given to a worker that
/// cannot write into those blocks, so no job fails and nothing falls back.
#[tokio::test]
async fn workers_of_two_kv_layouts_pair_only_among_themselves() {
    let mut d = Deployment::start("two-layouts", 0, 1, 32, &["--block-size", "16"]).await;
    d.spawn("decode", "decode-1", &["--block-size", "32"]).await;
    d.spawn("prefill", "prefill-0", &["--block-size", "16"])
        .await;
    d.spawn("prefill", "prefill-1", &["--block-size", "32"])
        .await;
    for i in 0..6 {
        let (status, body) = d
            .chat(&long_prompt(&format!("Layout {i}")), FRANCE, 8)
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(answer(&body).contains("Paris"), "{body}");
    }
    for (decode, prefill) in [("decode-0", "prefill-0"), ("decode-1", "prefill-1")] {
        let remote = remote_prefills(&d, decode).await;
        assert!(
            remote >= 1.0,
            "{decode} got no remote prefill: {}",
            d.log_tails()
        );
        assert_eq!(
            d.metric(decode, "xpyd_decode_remote_prefill_fallbacks_total", "")
                .await,
            0.0,
            "{decode} fell back: {}",
            d.log_tails()
        );
        // Its pair did exactly its jobs, and none failed.
        let ok = d
            .metric(prefill, "xpyd_prefill_jobs_total", "result=\"ok\"")
            .await;
        assert_eq!(
            ok,
            remote,
            "{prefill} wrote {decode}'s jobs: {}",
            d.log_tails()
        );
        assert_eq!(
            d.metric(prefill, "xpyd_prefill_jobs_total", "result=\"failed\"")
                .await,
            0.0
        );
    }
}

/// What a fault does to TTFT under load, for `docs/benchmarks.md` (a
/// benchmark, not a test: it asserts nothing; run it by hand, see there).
/// Per fault, a fresh 1P1D deployment (decode deadline 30 s) serves 24
/// 400-token prompts, 3 at a time, from `xpyd-bench`; 3 s into the load
/// the fault strikes. Prints TTFT p50/p99, failures, the decode worker's
/// fallbacks by reason and, for a killed prefill worker, how long the
/// decode worker took to notice it.
#[tokio::test]
#[ignore = "a benchmark; run with --ignored --nocapture (docs/benchmarks.md)"]
async fn handoff_fault_figures() {
    use clap::Parser;
    use xpyd_e2e::bench::cli::{BenchArgs, main_with};
    let faults = [
        "none",
        "prefill SIGKILL",
        "prefill SIGSTOP 10 s",
        "NATS restart",
        "etcd restart",
        "data path cut 15 s",
    ];
    let mut rows = Vec::new();
    for (i, fault) in faults.into_iter().enumerate() {
        let cut = fault.starts_with("data path cut");
        let mut d = Deployment::start(
            &format!("fault-bench-{i}"),
            usize::from(!cut),
            1,
            32,
            &["--remote-prefill-timeout-ms", "30000"],
        )
        .await;
        // The cut is made at the write call while this file exists (see
        // the quarantine test).
        let cut_file = d.dir.path().join("data-path-cut");
        if cut {
            d.spawn_faulty_prefill(&format!("cut-writes-while:{}", cut_file.display()), &[])
                .await;
        }
        let args = BenchArgs::parse_from([
            "xpyd-bench",
            "--base-url",
            &d.api,
            "--input-len",
            "400",
            "--output-len",
            "16",
            "--num-prompts",
            "24",
            "--max-concurrency",
            "3",
            "--request-timeout",
            "120",
            "--seed",
            &i.to_string(),
            "--percentile-metrics",
            "ttft",
            "--metric-percentiles",
            "50,99",
            "--no-progress",
        ]);
        let load = main_with(args);
        let inject = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let struck = Instant::now();
            match fault {
                "prefill SIGKILL" => d.signal("prefill-0", libc::SIGKILL),
                "prefill SIGSTOP 10 s" => {
                    d.signal("prefill-0", libc::SIGSTOP);
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    d.signal("prefill-0", libc::SIGCONT);
                }
                "NATS restart" => {
                    d.nats.kill();
                    d.nats.restart().await.unwrap();
                }
                "etcd restart" => {
                    d.etcd.kill();
                    d.etcd.restart().await.unwrap();
                }
                "data path cut 15 s" => {
                    std::fs::write(&cut_file, "").unwrap();
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    std::fs::remove_file(&cut_file).unwrap();
                }
                _ => {}
            }
            let mut detected = None;
            if fault == "prefill SIGKILL" {
                let by = struck + Duration::from_secs(30);
                while Instant::now() < by {
                    if fallbacks(&d, "prefill_gone").await > 0.0 {
                        detected = Some(struck.elapsed());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            detected
        };
        let (outcome, detected) = tokio::join!(load, inject);
        let m = outcome.expect("the load ran").metrics;
        let p = |s: &xpyd_e2e::bench::stats::Summary, q: f64| {
            s.percentiles_ms
                .iter()
                .find(|(pp, _)| *pp == q)
                .map_or(f64::NAN, |(_, v)| *v)
        };
        let mut reasons = Vec::new();
        for reason in xpyd_runtime::metrics::FALLBACK_REASONS {
            let n = fallbacks(&d, reason).await;
            if n > 0.0 {
                reasons.push(format!("{reason} {n}"));
            }
        }
        let remote = remote_prefills(&d, "decode-0").await;
        rows.push(format!(
            "| {fault} | {}/{} | {:.0} | {:.0} | {remote} | {} | {} |",
            m.completed,
            m.completed + m.failed,
            p(&m.ttft, 50.0),
            p(&m.ttft, 99.0),
            if reasons.is_empty() {
                "-".to_string()
            } else {
                reasons.join(", ")
            },
            detected.map_or("-".to_string(), |t| format!("{:.1} s", t.as_secs_f64())),
        ));
        d.signal("prefill-0", libc::SIGCONT);
    }
    println!(
        "\n| fault (3 s into the load) | answered | TTFT p50 ms | TTFT p99 ms | remote prefills | local fallbacks | dead prefill noticed after |\n|---|---|---|---|---|---|---|"
    );
    for row in rows {
        println!("{row}");
    }
    println!(
        "load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
