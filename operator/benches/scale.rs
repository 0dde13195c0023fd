//! Scale benchmark of the operator binary against the kwok cluster.
//!
//! Creates `XPYD_BENCH_READY` (default 100) `DisaggDeployment`s at once and
//! reports the time until all are Ready, the operator's reconcile p50/p99
//! (from its own histogram) and its RSS; then grows to `XPYD_BENCH_RSS`
//! (default 1000) CRs and reports the RSS again once each has a status.
//! Run with `cargo bench -p xpyd-operator --bench scale`; to drive a release
//! operator from a dev-profile harness, set `XPYD_BENCH_OPERATOR` to its
//! path. It prints numbers and asserts nothing: timings depend on the machine.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::json;
use xpyd_e2e::{ControlPlane, ControlPlaneOptions, Etcd, Tools, Workdir, wait_until};
use xpyd_operator::crd::DisaggDeployment;

const NS: &str = "bench";

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name start at field 3 (state),
    // so utime (field 14) and stime (field 15) are the 12th and 13th here.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf only reads a constant.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    fields.iter().sum::<f64>() / ticks_per_sec
}

/// CPU seconds of the operator and of the API server since `since`.
fn cpu_line(operator: u32, apiserver: u32, since: (f64, f64)) -> String {
    let op = cpu_secs(operator) - since.0;
    let api = cpu_secs(apiserver) - since.1;
    format!(
        "CPU: operator {op:.1} s, kube-apiserver {api:.1} s (operator/apiserver {:.2})",
        op / api.max(1e-9)
    )
}

/// (VmRSS, VmHWM) in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Quantile `q` of the reconcile duration histogram in a metrics text.
fn quantile(metrics: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("xpyd_operator_reconcile_duration_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower;
            }
            let within = if count > below {
                (rank - below) / (count - below)
            } else {
                1.0
            };
            return lower + (le - lower) * within;
        }
        (lower, below) = (le, count);
    }
    lower
}

async fn create_many(client: &Client, etcd: &str, from: usize, to: usize) {
    let api: Api<DisaggDeployment> = Api::namespaced(client.clone(), NS);
    stream::iter(from..to)
        .for_each_concurrent(32, |i| {
            let api = api.clone();
            let obj = json!({
                "apiVersion": "xpyd.dev/v1alpha1",
                "kind": "DisaggDeployment",
                "metadata": {"name": format!("bench-{i:04}")},
                "spec": {
                    "model": {"name": "m", "source": "/models/m.gguf"},
                    "image": {"name": "xpyd/agent:bench"},
                    "numPrefill": 1,
                    "numDecode": 1,
                    "etcd": {"endpoints": [etcd]},
                    "nats": {"url": "nats://127.0.0.1:4222"},
                },
            });
            async move {
                let name = format!("bench-{i:04}");
                if let Err(e) = api
                    .patch(
                        &name,
                        &PatchParams::apply("bench").force(),
                        &Patch::Apply(&obj),
                    )
                    .await
                {
                    eprintln!("creating {name}: {e}");
                }
            }
        })
        .await;
}

async fn count(client: &Client, ready: bool) -> Result<usize, kube::Error> {
    let api: Api<DisaggDeployment> = Api::namespaced(client.clone(), NS);
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|dd| match &dd.status {
            None => false,
            Some(_) if !ready => true,
            Some(s) => s
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
        })
        .count())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let n_ready = env_usize("XPYD_BENCH_READY", 100);
    let n_rss = env_usize("XPYD_BENCH_RSS", 1000);
    // 110 pods per node; three pods per CR in the Ready phase.
    let nodes = (n_ready * 3).div_ceil(90).max(3);
    let plane = ControlPlane::start(ControlPlaneOptions {
        nodes,
        gpus_per_node: 8,
    })
    .await?;
    let client = plane.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DisaggDeployment::crd();
    crds.patch(
        "disaggdeployments.xpyd.dev",
        &PatchParams::apply("bench").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;
    let tools = Tools::locate()?;
    let dir = Workdir::new("operator-bench")?;
    let etcd = Etcd::start(&tools, dir.path()).await?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::fs::File::create(dir.path().join("operator.log"))?;
    let operator = Operator(
        Command::new(
            std::env::var_os("XPYD_BENCH_OPERATOR")
                .unwrap_or_else(|| env!("CARGO_BIN_EXE_xpyd-operator").into()),
        )
        .args(["run", "--no-leader-election", "--watch-namespace", NS])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", plane.kubeconfig())
        .env("XPYD_LOG", "warn")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?,
    );
    let pid = operator.0.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_mib(pid);
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let api_pid = plane
        .apiserver_pid()
        .ok_or("the API server is not running")?;
    let cpu_at = || (cpu_secs(pid), cpu_secs(api_pid));

    let cpu_start = cpu_at();
    let start = Instant::now();
    create_many(&client, &etcd.endpoint(), 0, n_ready).await;
    let created = start.elapsed();
    wait_until(
        &format!("{n_ready} Ready"),
        Duration::from_secs(600),
        || count(&client, true).map_ok_eq(n_ready),
    )
    .await?;
    let all_ready = start.elapsed();
    let metrics = reqwest::get(&metrics_url).await?.text().await?;
    let ready_rss = rss_mib(pid);
    println!("operator idle RSS: {:.1} MiB", idle.0);
    println!(
        "{n_ready} DisaggDeployments: created in {:.1} s, all Ready after {:.1} s",
        created.as_secs_f64(),
        all_ready.as_secs_f64()
    );
    println!(
        "reconcile p50 {:.1} ms, p99 {:.1} ms",
        quantile(&metrics, 0.5) * 1e3,
        quantile(&metrics, 0.99) * 1e3
    );
    println!(
        "operator RSS at {n_ready} CRs: {:.1} MiB (peak {:.1} MiB)",
        ready_rss.0, ready_rss.1
    );
    println!("{}", cpu_line(pid, api_pid, cpu_start));

    if n_rss > n_ready {
        let cpu_start = cpu_at();
        let start = Instant::now();
        create_many(&client, &etcd.endpoint(), n_ready, n_rss).await;
        // Pods of these no longer fit the nodes; a status means reconciled.
        let outcome = wait_until(
            &format!("{n_rss} with a status"),
            Duration::from_secs(900),
            || count(&client, false).map_ok_eq(n_rss),
        )
        .await;
        if let Err(e) = outcome {
            println!("not all reconciled: {e}");
        }
        let rss = rss_mib(pid);
        let metrics = reqwest::get(&metrics_url).await?.text().await?;
        println!(
            "operator RSS at {n_rss} CRs: {:.1} MiB (peak {:.1} MiB), {:.1} s to reconcile all; reconcile p50 {:.1} ms, p99 {:.1} ms",
            rss.0,
            rss.1,
            start.elapsed().as_secs_f64(),
            quantile(&metrics, 0.5) * 1e3,
            quantile(&metrics, 0.99) * 1e3
        );
        println!("{}", cpu_line(pid, api_pid, cpu_start));
    }
    drop(operator);
    Ok(())
}

/// `future.map_ok_eq(n)`: resolves to whether the count equals `n`.
trait MapOkEq {
    fn map_ok_eq(self, n: usize) -> impl Future<Output = Result<bool, kube::Error>>;
}

impl<F: Future<Output = Result<usize, kube::Error>>> MapOkEq for F {
    async fn map_ok_eq(self, n: usize) -> Result<bool, kube::Error> {
        Ok(self.await? >= n)
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}
