//! The SLO planner on real pods: the operator, installed by the chart on a
//! real node, autoscales a `DisaggDeployment` whose workers run the
//! SIMULATED engine (`engine.device: sim`, docs/sim.md: real tokenizer,
//! block pool, prefill queue and NIXL handoff; a timing model instead of
//! the forward pass), so a CPU-only node runs several workers.
//!
//! Under a load step of long prompts (all prefilled remotely) the operator
//! scrapes the pods, scales prefill up, and the new pods really start and
//! serve. When the load drops to a trickle it scales them back in once the
//! (short) stabilization window has passed, and no request of the trickle
//! fails while pods go: the ones removed hold no claimed work (their
//! deletion cost), and what they hold they drain. `status.autoscaling`
//! shows the reason each time. Every answer here is labelled simulated.
//!
//! An ignored test replays a bursty trace against a fixed 1P1D, a fixed
//! deployment at the planner's peak and the planner, for the figures in
//! docs/benchmarks.md.
//!
//! A second test runs the real CPU engine in the pods: under a real load
//! step the planner adds a prefill worker, whose pod loads the model and
//! serves, and status says why.
//!
//! Needs root and `scripts/setup` (part `node`); waits for the host's
//! real-node lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use serde_json::{Value, json};
use xpyd_e2e::release::{HF_FILE, HF_REPO, RELEASE_NS, Release, STEP};

/// Held by each test of this binary while it runs: both use the real node
/// (and the namespace), which one process cannot run twice at once.
static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NS: &str = "planner";
const DD: &str = "sim-planned";
const SERVED: &str = "smollm2";
/// Prefill workers the planner may run.
const MAX_PREFILL: i64 = 3;
/// Concurrent clients of the load step.
const STEP_CLIENTS: usize = 6;
/// The trickle after it: one request, then this pause.
const TRICKLE_PAUSE: Duration = Duration::from_secs(2);

/// The DisaggDeployment `name`: simulated workers (the default profile,
/// the CPU engine's measured timings), prompts over 64 tokens prefilled
/// remotely, `num_prefill` prefill workers to start with, and
/// `autoscaling` (a YAML flow mapping) when given. Small CPU requests: the
/// node has 2 CPUs.
fn manifest(image: &str, name: &str, num_prefill: i64, autoscaling: Option<&str>) -> String {
    manifest_on("sim", image, name, num_prefill, autoscaling)
}

/// [`manifest`] with the engine on `device` (`sim` or `cpu`).
fn manifest_on(
    device: &str,
    image: &str,
    name: &str,
    num_prefill: i64,
    autoscaling: Option<&str>,
) -> String {
    let resources = "{requests: {cpu: 10m, memory: 64Mi}, limits: {memory: 2Gi}}";
    let autoscaling = autoscaling
        .map(|a| format!("  autoscaling: {a}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: xpyd.dev/v1alpha1
kind: DisaggDeployment
metadata: {{name: {name}}}
spec:
  model:
    name: SmolLM2-135M-Instruct
    source: hf://{HF_REPO}/{HF_FILE}
    servedModelName: {SERVED}
  image: {{name: {image}, pullPolicy: IfNotPresent}}
  numPrefill: {num_prefill}
  numDecode: 1
{autoscaling}  prefill: {{resources: {resources}}}
  decode: {{resources: {resources}}}
  frontend: {{resources: {resources}}}
  engine: {{device: {device}, maxModelLen: 2048, maxBatchTokens: 512}}
  router: {{strategy: kv, maxLocalPrefillLength: 64}}
  etcd: {{endpoints: ["http://xpyd-etcd.{RELEASE_NS}:2379"]}}
  nats: {{url: "nats://xpyd-nats.{RELEASE_NS}:4222"}}
"#
    )
}

/// The planner of the load-step test: every 5 s, a 15 s scale-down window,
/// prefill `min_prefill..=max_prefill`. The capacity says one prefill
/// worker carries 100 prompt tokens/s, so a handful of concurrent long
/// prompts needs more than one, and a trickle needs one. Decode is sized generously (one is enough) and
/// the latency targets are loose: the test is about the planner's loop on
/// real pods, not the sim's latencies.
fn planner_spec(ttft_ms: u32, itl_ms: u32, min_prefill: i64, max_prefill: i64) -> String {
    format!(
        "{{enabled: true, ttftP90Ms: {ttft_ms}, itlP90Ms: {itl_ms}, \
         prefill: {{min: {min_prefill}, max: {max_prefill}}}, decode: {{min: 1, max: 2}}, \
         scaleDownStabilizationSeconds: 15, moveThreshold: false, intervalSeconds: 5, \
         capacity: {{prefillTokensPerSecond: 100, decodeTokensPerSecond: 100000}}}}"
    )
}

/// One chat whose prompt (about 150 tokens, distinct per `tag`) is over
/// the threshold; the answer must be labelled simulated exactly when
/// `simulated`.
async fn long_chat(
    http: &reqwest::Client,
    base: &str,
    tag: &str,
    simulated: bool,
) -> Result<(), String> {
    let system = format!("{tag}. {}", "Answer briefly and kindly. ".repeat(30));
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": SERVED,
            "max_tokens": 8,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        }))
        .send()
        .await
        .map_err(|e| format!("{tag}: request failed: {e}"))?;
    let status = resp.status();
    let simulated_header = resp.headers().get("x-xpyd-simulated").cloned();
    let body: Value = resp.json().await.map_err(|e| format!("{tag}: body: {e}"))?;
    if !status.is_success() {
        return Err(format!("{tag}: HTTP {status}: {body}"));
    }
    let labelled = simulated_header.as_ref().and_then(|v| v.to_str().ok()) == Some("true");
    if labelled != simulated {
        return Err(format!("{tag}: labelled simulated: {labelled}: {body}"));
    }
    Ok(())
}

/// Clients sending [`long_chat`]s until `stop`, each pausing `pause`
/// between requests; returns how many answered and the failures.
fn load(
    http: &reqwest::Client,
    base: &str,
    clients: usize,
    pause: Duration,
    label: &'static str,
    simulated: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    let (http, base) = (http.clone(), base.to_string());
    tokio::spawn(async move {
        let results = futures::future::join_all((0..clients).map(|c| {
            let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
            async move {
                let (mut ok, mut failed, mut n) = (0u32, Vec::new(), 0u32);
                while !stop.load(Ordering::Relaxed) {
                    let tag = format!("{label} {c}-{n}");
                    match long_chat(&http, &base, &tag, simulated).await {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                    n += 1;
                    tokio::time::sleep(pause).await;
                }
                (ok, failed)
            }
        }))
        .await;
        results
            .into_iter()
            .fold((0, Vec::new()), |(ok, mut failed), (o, f)| {
                failed.extend(f);
                (ok + o, failed)
            })
    })
}

/// Applies `manifest` (deployment `name`), waits for it to be Ready and
/// for its frontend Service to answer a long chat (labelled simulated or
/// not, as `simulated`); returns the Service's URL and a client.
async fn serve(
    c: &Release,
    name: &str,
    manifest: &str,
    simulated: bool,
) -> (String, reqwest::Client) {
    c.kubectl_stdin(&["apply", "-n", NS, "-f", "-"], manifest);
    c.wait_dd_ready(NS, name, num_prefill_of(manifest), 1).await;
    let fe: Service = Api::namespaced(c.client.clone(), NS)
        .get(&format!("{name}-frontend"))
        .await
        .unwrap();
    let base = format!("http://{}:8000", fe.spec.unwrap().cluster_ip.unwrap());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    // A new Service is routed by kube-proxy within seconds.
    c.wait(
        &[NS],
        &format!("{name}'s Service to answer"),
        Duration::from_secs(60),
        || {
            let (http, base) = (http.clone(), base.clone());
            async move {
                long_chat(&http, &base, "first", simulated)
                    .await
                    .map(|()| true)
            }
        },
    )
    .await;
    (base, http)
}

/// Where a pod's start went, from its own status: seconds from creation to
/// scheduled, to the agent container running, to Ready (the API server's
/// timestamps have whole seconds).
fn start_timeline(pod: &k8s_openapi::api::core::v1::Pod) -> String {
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let status = pod.status.as_ref();
    let condition = |kind: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind))
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0)
    };
    let started = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.as_ref())
        .map(|t| t.0);
    let since = |t: Option<k8s_openapi::jiff::Timestamp>| match (created, t) {
        (Some(c), Some(t)) => format!("{}s", t.as_second() - c.as_second()),
        _ => "?".to_string(),
    };
    format!(
        "pod {} started: scheduled +{}, container running +{}, Ready +{}",
        pod.metadata.name.as_deref().unwrap_or("?"),
        since(condition("PodScheduled")),
        since(started),
        since(condition("Ready")),
    )
}

/// `status.autoscaling` and the counts in the spec.
#[derive(Debug, Clone)]
struct Seen {
    num_prefill: i64,
    prefill_ready: i64,
    reason: String,
    message: String,
}

async fn seen(c: &Release, name: &str) -> Result<Seen, String> {
    let dd = c.dd_json(NS, name).await.map_err(|e| e.to_string())?;
    let a = &dd["status"]["autoscaling"];
    Ok(Seen {
        num_prefill: dd["spec"]["numPrefill"].as_i64().unwrap_or(0),
        prefill_ready: dd["status"]["prefill"]["ready"].as_i64().unwrap_or(0),
        reason: a["reason"].as_str().unwrap_or_default().to_string(),
        message: a["message"].as_str().unwrap_or_default().to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_planner_scales_simulated_pods_up_under_load_and_back_without_failing_requests() {
    let _node = NODE.lock().await;
    let t0 = Instant::now();
    let c = Release::install("planner").await;
    c.kubectl(&["create", "namespace", NS]);
    let manifest = manifest(
        &c.images.agent.reference(),
        DD,
        1,
        Some(&planner_spec(60_000, 10_000, 1, MAX_PREFILL)),
    );
    let (base, http) = serve(&c, DD, &manifest, true).await;
    eprintln!(
        "planner: installed and serving (SIMULATED engines) after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // The load step: the planner scales prefill up, and the new pods run.
    let t_step = Instant::now();
    let stop_step = Arc::new(AtomicBool::new(false));
    let step = load(
        &http,
        &base,
        STEP_CLIENTS,
        Duration::ZERO,
        "step",
        true,
        stop_step.clone(),
    );
    // The decision that scaled up, as status showed it (by the time the
    // new pods are Ready a later interval may say Steady).
    let up = std::sync::Mutex::new(None);
    c.wait(
        &[NS],
        "the planner to scale prefill up, its pods Ready",
        STEP,
        || async {
            let s = seen(&c, DD).await?;
            if ["ScaleUp", "AtMax"].contains(&s.reason.as_str()) {
                *up.lock().unwrap() = Some(s.clone());
            }
            let scaled = up.lock().unwrap().is_some();
            if scaled && s.num_prefill >= 2 && s.prefill_ready == s.num_prefill {
                Ok(true)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    let up = up
        .into_inner()
        .unwrap()
        .expect("a ScaleUp or AtMax decision");
    let now = seen(&c, DD).await.unwrap();
    eprintln!(
        "planner: load step ({STEP_CLIENTS} clients): numPrefill 1 -> {} with its pods Ready after {:.1}s ({}: {})",
        now.num_prefill,
        t_step.elapsed().as_secs_f64(),
        up.reason,
        up.message
    );
    assert!(
        up.message.contains("prefill: need"),
        "status says why it scaled: {up:?}"
    );
    assert!(now.num_prefill <= MAX_PREFILL, "bounded: {now:?}");
    let prefill_pods = c.role_pods(NS, DD, "prefill").await;
    assert_eq!(
        prefill_pods.len() as i64,
        now.num_prefill,
        "the new pods really run"
    );
    for pod in &prefill_pods {
        eprintln!("planner: {}", start_timeline(pod));
    }

    // The load drops to a trickle: after the window, back to one prefill
    // worker, and no request of the trickle fails while pods go.
    let stop_trickle = Arc::new(AtomicBool::new(false));
    let trickle = load(
        &http,
        &base,
        1,
        TRICKLE_PAUSE,
        "trickle",
        true,
        stop_trickle.clone(),
    );
    stop_step.store(true, Ordering::Relaxed);
    let (step_ok, step_failed) = step.await.unwrap();
    assert!(
        step_failed.is_empty(),
        "requests failed during the load step: {step_failed:?}"
    );
    let t_down = Instant::now();
    let down = std::sync::Mutex::new(None);
    c.wait(
        &[NS],
        "the planner to scale prefill back to 1, its pods gone",
        STEP,
        || async {
            let s = seen(&c, DD).await?;
            if s.reason == "ScaleDown" {
                *down.lock().unwrap() = Some(s.clone());
            }
            let pods = c.role_pods(NS, DD, "prefill").await.len();
            if s.num_prefill == 1 && s.prefill_ready == 1 && pods == 1 {
                Ok(true)
            } else {
                Err(format!("{s:?}, {pods} prefill pods"))
            }
        },
    )
    .await;
    // A few more trickle requests on the one worker left.
    tokio::time::sleep(TRICKLE_PAUSE * 2).await;
    stop_trickle.store(true, Ordering::Relaxed);
    let (trickle_ok, trickle_failed) = trickle.await.unwrap();
    let down = down
        .into_inner()
        .unwrap()
        .expect("status.autoscaling.reason ScaleDown was seen");
    eprintln!(
        "planner: {step_ok} answered in the load step; after it, back to 1 prefill worker in {:.1}s \
         ({}: {}); trickle: {trickle_ok} answered, {} failed; {:.1}s in all",
        t_down.elapsed().as_secs_f64(),
        down.reason,
        down.message,
        trickle_failed.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        trickle_failed.is_empty(),
        "requests failed during scale-in: {trickle_failed:?}"
    );
    assert!(trickle_ok > 0, "the trickle sent nothing");
    assert!(down.message.contains("prefill: need"), "{down:?}");
}

/// The planner reacts to a real load step on pods running the real CPU
/// engine (SmolLM2-135M on the node's 2 CPUs), and status says why: long
/// prompts arrive faster than the one prefill worker's stated capacity,
/// the planner asks for a second prefill worker, and its pod loads the
/// model, registers and is Ready. Every answer of the step is a model's
/// (not labelled simulated). Scale-in is tested with simulated pods above.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_planner_scales_cpu_engine_pods_up_under_a_real_load_step() {
    const CPU_DD: &str = "cpu-planned";
    const CLIENTS: usize = 3;
    let _node = NODE.lock().await;
    let t0 = Instant::now();
    let c = Release::install("planner-cpu").await;
    c.kubectl(&["create", "namespace", NS]);
    // Two prefill workers at most: the node has 2 CPUs.
    let planner = planner_spec(60_000, 10_000, 1, 2);
    let manifest = manifest_on(
        "cpu",
        &c.images.agent.reference(),
        CPU_DD,
        1,
        Some(&planner),
    );
    let (base, http) = serve(&c, CPU_DD, &manifest, false).await;
    eprintln!(
        "planner-cpu: installed and serving (CPU engine) after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let t_step = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let step = load(
        &http,
        &base,
        CLIENTS,
        Duration::ZERO,
        "cpu-step",
        false,
        stop.clone(),
    );
    let up = std::sync::Mutex::new(None);
    c.wait(
        &[NS],
        "the planner to scale the CPU engine's prefill up, its new pod Ready",
        STEP,
        || async {
            let s = seen(&c, CPU_DD).await?;
            if ["ScaleUp", "AtMax"].contains(&s.reason.as_str()) {
                *up.lock().unwrap() = Some(s.clone());
            }
            let scaled = up.lock().unwrap().is_some();
            if scaled && s.num_prefill == 2 && s.prefill_ready == 2 {
                Ok(true)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = step.await.unwrap();
    let up = up
        .into_inner()
        .unwrap()
        .expect("a ScaleUp or AtMax decision");
    eprintln!(
        "planner-cpu: load step ({CLIENTS} clients, CPU engine): numPrefill 1 -> 2, its pod Ready after {:.1}s ({}: {}); {ok} answered, {} failed",
        t_step.elapsed().as_secs_f64(),
        up.reason,
        up.message,
        failed.len()
    );
    assert!(
        up.message.contains("prefill: need"),
        "status says why it scaled: {up:?}"
    );
    assert_eq!(c.role_pods(NS, CPU_DD, "prefill").await.len(), 2);
    assert!(
        failed.is_empty(),
        "requests failed during the step: {failed:?}"
    );
    assert!(ok > 0, "the step sent nothing");
}

/// One phase of the bursty trace: how long, requests per second, and the
/// prompts' mean length and spread (tokens).
struct Phase {
    secs: f64,
    rate: f64,
    input_len: usize,
    input_stddev: f64,
}

/// A trace: its phases and the planner's prefill bound for it.
struct Trace {
    name: &'static str,
    phases: &'static [Phase],
    max_prefill: i64,
}

const fn phase(secs: f64, rate: f64, input_len: usize, input_stddev: f64) -> Phase {
    Phase {
        secs,
        rate,
        input_len,
        input_stddev,
    }
}

/// Quiet, a burst of longer prompts, quiet again; gamma arrivals of shape
/// [`BURSTINESS`] (burstier than Poisson).
///
/// 1. A short burst (40 s) above what the planner may run: it asks for 6
///    prefill workers and gets its `max` of 3, so (b) and (c) are both
///    overloaded through the burst, and (c) pays its reaction time as
///    backlog on top.
/// 2. A longer burst (90 s) the planner's `max` of 4 can carry (about 250
///    prompt tokens/s against 4 workers' 600), between longer quiet
///    phases: what a planner is for.
const TRACES: [Trace; 2] = [
    Trace {
        name: "short burst over the bound",
        phases: &[
            phase(30.0, 0.3, 150, 40.0),
            phase(40.0, 1.2, 300, 120.0),
            phase(30.0, 0.3, 150, 40.0),
        ],
        max_prefill: 3,
    },
    Trace {
        name: "long burst within the bound",
        phases: &[
            phase(60.0, 0.3, 150, 40.0),
            phase(90.0, 0.8, 300, 120.0),
            phase(60.0, 0.3, 150, 40.0),
        ],
        max_prefill: 4,
    },
];
const BURSTINESS: f64 = 0.5;
const OUTPUT_LEN: usize = 16;
/// The SLO of the bursty-trace figures.
const TTFT_TARGET_MS: u32 = 4000;
const ITL_TARGET_MS: u32 = 200;

/// What one configuration did over the trace.
struct TraceOutcome {
    requests: usize,
    within_slo: usize,
    failed: usize,
    /// Answered, but the TTFT (or the request's ITL p90) over its target.
    ttft_missed: usize,
    itl_missed: usize,
    /// Over the answered requests.
    ttft_p50_s: f64,
    ttft_p90_s: f64,
    worker_seconds: f64,
    peak_prefill: i64,
    /// The latest any request was sent after its drawn arrival time.
    max_late_s: f64,
    /// Each change of the prefill count: `<s> <ready>/<spec> <reason>`.
    timeline: Vec<String>,
}

/// Applies `manifest`, replays `trace` against it while counting its
/// worker pods each second, then deletes it.
async fn replay(c: &Release, name: &str, manifest: &str, trace: &Trace) -> TraceOutcome {
    use xpyd_e2e::bench::client::Endpoint;
    use xpyd_e2e::bench::load::{self, LoadShape, Target};
    use xpyd_e2e::bench::workload::Workload;
    use xpyd_runtime::engine::gguf::GgufFile;
    use xpyd_runtime::engine::tokenizer::Tokenizer;

    let (base, _) = serve(c, name, manifest, true).await;

    // Worker pods (prefill and decode, Ready or not) each second.
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (client, name, stop) = (c.client.clone(), name.to_string(), stop.clone());
        tokio::spawn(async move {
            let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), NS);
            let (mut worker_seconds, mut peak_prefill) = (0.0, 0);
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                // (all pods, and those not being deleted)
                let count = |role: &str| {
                    let lp = kube::api::ListParams::default()
                        .labels(&format!("xpyd.dev/deployment={name},xpyd.dev/role={role}"));
                    let pods = pods.clone();
                    async move {
                        let items = pods.list(&lp).await.map(|l| l.items).unwrap_or_default();
                        let staying = items
                            .iter()
                            .filter(|p| p.metadata.deletion_timestamp.is_none())
                            .count();
                        (items.len(), staying)
                    }
                };
                let (prefill, prefill_staying) = count("prefill").await;
                let (decode, _) = count("decode").await;
                // A terminating pod still holds its share of the node.
                worker_seconds += (prefill + decode) as f64 * last.elapsed().as_secs_f64();
                last = Instant::now();
                peak_prefill = peak_prefill.max(prefill_staying as i64);
            }
            (worker_seconds, peak_prefill)
        })
    };

    let tokenizer = {
        let gguf = GgufFile::open(&c.model).expect("the model's GGUF");
        Arc::new(Tokenizer::from_gguf(&gguf).expect("its tokenizer"))
    };
    let target = Target {
        base_url: base.clone(),
        endpoint: Endpoint::Chat,
        model: SERVED.to_string(),
        request_timeout: Duration::from_secs(120),
        exact_output: true,
    };
    // The trace, and beside it each change of the prefill count (spec
    // and Ready) with the planner's reason, seconds from the start.
    // The phases run on one clock: each starts at its offset in the
    // trace, whether or not the requests of the one before have ended (a
    // burst's backlog does not delay the quiet phase after it).
    let replayed = async {
        let mut offset = Duration::ZERO;
        let mut phases = Vec::new();
        for (i, phase) in trace.phases.iter().enumerate() {
            let workload = Workload::Random {
                input_len: phase.input_len,
                input_stddev: phase.input_stddev,
                output_len: OUTPUT_LEN,
            };
            let shape = LoadShape {
                request_rate: phase.rate,
                burstiness: BURSTINESS,
                max_concurrency: None,
                num_requests: None,
                duration: Some(Duration::from_secs_f64(phase.secs)),
                warmup: 0,
                seed: i as u64,
            };
            let (start, target, tokenizer) = (offset, target.clone(), tokenizer.clone());
            offset += Duration::from_secs_f64(phase.secs);
            // Each phase on its own task: one phase's start (it draws its
            // prompt words from the tokenizer, synchronously) never holds
            // up another's arrivals.
            phases.push(tokio::spawn(async move {
                tokio::time::sleep(start).await;
                load::run(&workload, &shape, &target, tokenizer, false)
                    .await
                    .expect("the trace's phase runs")
            }));
        }
        let mut runs = Vec::new();
        for phase in phases {
            runs.push(phase.await.expect("a phase's task"));
        }
        stop.store(true, Ordering::Relaxed);
        let late_s = runs.iter().map(|r| r.max_late_s).fold(0.0, f64::max);
        (
            runs.into_iter().flat_map(|r| r.records).collect::<Vec<_>>(),
            late_s,
        )
    };
    let timeline = async {
        let (t0, mut last, mut changes) = (Instant::now(), None, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            if let Ok(s) = seen(c, name).await
                && last != Some((s.num_prefill, s.prefill_ready))
            {
                last = Some((s.num_prefill, s.prefill_ready));
                changes.push(format!(
                    "{:.0}s {}/{} {}",
                    t0.elapsed().as_secs_f64(),
                    s.prefill_ready,
                    s.num_prefill,
                    s.reason
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        changes
    };
    let ((records, max_late_s), timeline) = tokio::join!(replayed, timeline);
    let (worker_seconds, peak_prefill) = counter.await.unwrap();
    c.kubectl(&[
        "delete",
        "dd",
        name,
        "-n",
        NS,
        "--wait=true",
        "--timeout=120s",
    ]);
    c.wait(&[NS], &format!("{name}'s pods to go"), STEP, || async {
        let n = c.role_pods(NS, name, "prefill").await.len()
            + c.role_pods(NS, name, "decode").await.len()
            + c.role_pods(NS, name, "frontend").await.len();
        Ok::<_, String>(n == 0)
    })
    .await;

    // Within the SLO: answered, its TTFT and its own ITL p90 within the
    // targets (the planner's targets are p90s).
    let p90 = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get((v.len() * 9).div_ceil(10).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    let ttft_ok =
        |r: &xpyd_e2e::bench::stats::RequestRecord| r.ttft_s * 1000.0 <= f64::from(TTFT_TARGET_MS);
    let itl_ok = |r: &xpyd_e2e::bench::stats::RequestRecord| {
        p90(&r.itl_s) * 1000.0 <= f64::from(ITL_TARGET_MS)
    };
    let answered: Vec<_> = records.iter().filter(|r| r.success).collect();
    let mut ttfts: Vec<f64> = answered.iter().map(|r| r.ttft_s).collect();
    ttfts.sort_by(f64::total_cmp);
    TraceOutcome {
        requests: records.len(),
        within_slo: answered.iter().filter(|r| ttft_ok(r) && itl_ok(r)).count(),
        failed: records.len() - answered.len(),
        ttft_missed: answered.iter().filter(|r| !ttft_ok(r)).count(),
        itl_missed: answered.iter().filter(|r| !itl_ok(r)).count(),
        ttft_p50_s: ttfts.get(ttfts.len() / 2).copied().unwrap_or(0.0),
        ttft_p90_s: p90(&ttfts),
        worker_seconds,
        peak_prefill,
        max_late_s,
        timeline,
    }
}

/// `numPrefill` as a manifest of [`manifest`] writes it.
fn num_prefill_of(manifest: &str) -> i64 {
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("numPrefill: "))
        .and_then(|n| n.parse().ok())
        .expect("numPrefill in the manifest")
}

/// Figures for docs/benchmarks.md, not a test: each bursty trace of
/// [`TRACES`] replayed, with SIMULATED engines, against (c) the planner
/// (with a floor of one prefill worker, then of two), (a) a fixed 1P1D
/// and (b) a fixed deployment at the planners' peak prefill count; SLO
/// attainment (TTFT and the request's ITL p90 within the targets) and the
/// worker pods' seconds. About 32 minutes:
/// `cargo test -p xpyd-e2e --test planner -- --ignored --nocapture`
/// (`XPYD_TRACES=2` replays only the second trace).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark (docs/benchmarks.md), about 32 minutes"]
async fn bursty_trace_against_fixed_and_planned_simulated_deployments() {
    let _node = NODE.lock().await;
    let c = Release::install("planner-trace").await;
    c.kubectl(&["create", "namespace", NS]);
    let image = c.images.agent.reference();
    let chosen = std::env::var("XPYD_TRACES").unwrap_or_else(|_| "1,2".to_string());
    for (k, trace) in TRACES.iter().enumerate() {
        if !chosen.split(',').any(|t| t.trim() == (k + 1).to_string()) {
            continue;
        }
        let name = |what: &str| format!("trace{k}-{what}");
        // The planner as is (a floor of one prefill worker), and with a
        // floor of two: standing capacity for a burst's first seconds,
        // before new pods serve.
        let mut planned = Vec::new();
        for floor in [1, 2] {
            let planner = planner_spec(TTFT_TARGET_MS, ITL_TARGET_MS, floor, trace.max_prefill);
            let what = format!("planner-min{floor}");
            let outcome = replay(
                &c,
                &name(&what),
                &manifest(&image, &name(&what), floor, Some(&planner)),
                trace,
            )
            .await;
            planned.push((floor, outcome));
        }
        let fixed = replay(
            &c,
            &name("1p1d"),
            &manifest(&image, &name("1p1d"), 1, None),
            trace,
        )
        .await;
        let peak = planned
            .iter()
            .map(|(_, o)| o.peak_prefill)
            .max()
            .unwrap_or(1)
            .max(1);
        let at_peak = replay(
            &c,
            &name("peak"),
            &manifest(&image, &name("peak"), peak, None),
            trace,
        )
        .await;
        eprintln!(
            "bursty trace {} \"{}\" (SIMULATED engines; gamma arrivals, shape {BURSTINESS}; phases {}; \
             output {OUTPUT_LEN}; SLO TTFT <= {TTFT_TARGET_MS} ms and the request's ITL p90 <= {ITL_TARGET_MS} ms; \
             planner prefill min..={})",
            k + 1,
            trace.name,
            trace
                .phases
                .iter()
                .map(|p| format!(
                    "{}s at {}/s of {}±{} tokens",
                    p.secs, p.rate, p.input_len, p.input_stddev
                ))
                .collect::<Vec<_>>()
                .join(", "),
            trace.max_prefill
        );
        eprintln!(
            "| deployment (SIMULATED) | requests | within SLO | failed | TTFT missed | ITL missed | TTFT p50 / p90 | worker-seconds | peak prefill | sent late, at most |"
        );
        let mut rows = vec![
            ("(a) fixed 1P1D".to_string(), &fixed),
            ("(b) fixed at the planner's peak".to_string(), &at_peak),
        ];
        for (floor, o) in &planned {
            let label = if *floor == 1 {
                "(c) the planner".to_string()
            } else {
                format!("(c) the planner, prefill min {floor}")
            };
            rows.push((label, o));
        }
        for (label, o) in rows {
            eprintln!(
                "| {label} | {} | {:.1} % | {} | {} | {} | {:.1} s / {:.1} s | {:.0} | {} | {:.0} ms |",
                o.requests,
                100.0 * o.within_slo as f64 / o.requests.max(1) as f64,
                o.failed,
                o.ttft_missed,
                o.itl_missed,
                o.ttft_p50_s,
                o.ttft_p90_s,
                o.worker_seconds,
                o.peak_prefill,
                o.max_late_s * 1000.0
            );
        }
        for (floor, o) in &planned {
            eprintln!(
                "prefill Ready/spec over the trace, planner min {floor}: {}",
                o.timeline.join(", ")
            );
        }
    }
}
