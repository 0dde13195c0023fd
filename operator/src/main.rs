//! The `xpyd-operator` binary: `run` reconciles `DisaggDeployment`s (with
//! leader election, `/metrics`, `/healthz`, `/readyz` and graceful shutdown);
//! `crd` prints the CustomResourceDefinition YAML.

#![warn(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use xpyd_operator::controller::{self, Config};
use xpyd_operator::leader::LeaderElection;
use xpyd_operator::metrics::{self, Health, Metrics};
use xpyd_operator::resources::ClusterSettings;

#[derive(Parser, Debug)]
#[command(name = "xpyd-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the DisaggDeployment CRD as YAML.
    Crd,
    /// Run the controller.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Watch only this namespace (default: all).
    #[arg(long, env = "XPYD_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "XPYD_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Reconciles at once.
    #[arg(long, env = "XPYD_OPERATOR_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Skip leader election (only one replica may run).
    #[arg(long, env = "XPYD_OPERATOR_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "xpyd-system")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "xpyd-operator-leader")]
    lease_name: String,
    /// This replica's identity in the Lease and in events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// UID of the operator's own pod: while it leads, the Lease names the
    /// pod as its owner, so the Lease goes with the pod.
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// Hugging Face hub (or mirror) URL given to every pod as `HF_ENDPOINT`
    /// for `hf://` model sources; unset, the agent uses huggingface.co.
    #[arg(long, env = "XPYD_HF_ENDPOINT", value_parser = parse_endpoint)]
    hf_endpoint: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "XPYD_LOG_JSON")]
    log_json: bool,
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    if (s.starts_with("https://") || s.starts_with("http://")) && s.len() > "https://".len() {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not an http(s):// URL"))
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("XPYD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("xpyd-operator-{}", std::process::id()));

    // One signal fans out to the HTTP server, the controller and the lease.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    // Resolves once the flag is set; never, if its sender is gone unset
    // (without leader election nobody can report a lost lease).
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        if rx.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    };

    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let http = tokio::spawn(metrics::serve(
        args.http_addr,
        health,
        stopped(stop_rx.clone()),
    ));
    ready.store(true, Ordering::Relaxed);

    // The pod owns the Lease only where both live in one namespace (an
    // owner in another namespace would make the garbage collector delete it).
    let pod_namespace = std::env::var("POD_NAMESPACE").ok();
    let election = (!args.no_leader_election).then(|| {
        let election = LeaderElection::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
        );
        match (&args.identity, &args.pod_uid) {
            (Some(pod), Some(uid)) if pod_namespace.as_deref() == Some(&args.lease_namespace) => {
                election.owned_by_pod(pod, uid)
            }
            _ => election,
        }
    });
    if let Some(election) = &election {
        tracing::info!(lease = %args.lease_name, %identity, "waiting for leadership");
        tokio::select! {
            _ = election.acquire() => {}
            _ = stopped(stop_rx.clone()) => { return Ok(()); }
        }
        tracing::info!(%identity, "leading");
    }

    let config = Config {
        namespace: args.watch_namespace.clone(),
        concurrency: args.concurrency,
        instance: identity,
        metrics,
        cluster: ClusterSettings {
            hf_endpoint: args.hf_endpoint.clone(),
        },
        ..Config::default()
    };
    let (lost_tx, lost_rx) = watch::channel(false);
    let controller_stop = {
        let stop = stopped(stop_rx.clone());
        let lost = stopped(lost_rx);
        async move {
            tokio::select! { _ = stop => {} _ = lost => {} }
        }
    };
    let keeper = election.clone().map(|e| {
        tokio::spawn(async move {
            e.keep().await;
            tracing::error!("lost leadership");
            let _ = lost_tx.send(true);
        })
    });
    controller::run(client, config, controller_stop).await;
    if let Some(keeper) = keeper {
        let lost = keeper.is_finished();
        keeper.abort();
        if lost {
            anyhow::bail!("lost the leader lease; exiting so a standby takes over");
        }
    }
    if let Some(election) = &election
        && let Err(e) = election.release().await
    {
        tracing::warn!(error = %e, "releasing the leader lease");
    }
    let _ = http.await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", xpyd_operator::crd::crd_yaml()?);
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}
