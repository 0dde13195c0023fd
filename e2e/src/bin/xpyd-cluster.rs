//! `xpyd-cluster`: the tests' real-node cluster, held up by hand so a
//! contributor can poke at it with kubectl. `scripts/cluster` drives it.
//!
//! `up` starts a control plane and a real node, pushes the images (etcd,
//! NATS, and the agent and operator when their release binaries exist) to
//! the node's registry, optionally installs the chart with its etcd and
//! NATS (`--chart`) and Traefik as the ingress controller (`--ingress`),
//! writes `<state-dir>/env` (KUBECONFIG and the image references) and then
//! holds everything until SIGINT or SIGTERM, when it stops it all and
//! puts the host back. `sweep` puts the host back after an `up` that was
//! killed outright.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use xpyd_e2e::{ControlPlane, ControlPlaneOptions, RealNode, host};

const RELEASE: &str = "xpyd";
const NAMESPACE: &str = "xpyd-system";

#[derive(Parser)]
#[command(about = "The real-node test cluster, by hand (see scripts/cluster)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the cluster and hold it until SIGINT/SIGTERM.
    Up {
        /// Where `env` and `kubeconfig` are written.
        #[arg(long)]
        state_dir: PathBuf,
        /// Folder with release builds of xpyd-agent and xpyd-operator.
        #[arg(long)]
        release_dir: Option<PathBuf>,
        /// Also `helm install` the chart (operator, etcd and NATS) into xpyd-system.
        #[arg(long)]
        chart: bool,
        /// Also run Traefik as the ingress controller (IngressClass `traefik`,
        /// plain HTTP on the node's NodePort 30080).
        #[arg(long)]
        ingress: bool,
    },
    /// Put the host back after a cluster that did not stop cleanly.
    Sweep,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up {
            state_dir,
            release_dir,
            chart,
            ingress,
        } => up(&state_dir, release_dir.as_deref(), chart, ingress).await,
        Command::Sweep => {
            let swept = tokio::task::spawn_blocking(host::sweep).await??;
            println!(
                "{}",
                if swept {
                    "put the host back after a real node that had not stopped"
                } else {
                    "nothing to clean up"
                }
            );
            Ok(())
        }
    }
}

async fn up(
    state_dir: &Path,
    release_dir: Option<&Path>,
    chart: bool,
    ingress: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let plane = ControlPlane::start_for_real_node(ControlPlaneOptions {
        nodes: 0,
        gpus_per_node: 0,
    })
    .await
    .context("start the control plane")?;
    let mut node = RealNode::start(&plane)
        .await
        .context("start the real node")?;
    println!("real node up in {:.1}s", node.started_in().as_secs_f64());

    let mut images = vec![("XPYD_TOOLBOX_IMAGE", node.toolbox_image().clone())];
    let mut helm_values = None;
    match release_dir {
        Some(release) if release.join("xpyd-operator").is_file() => {
            let xpyd = node.push_xpyd_images(release).await?;
            images.extend([
                ("XPYD_AGENT_IMAGE", xpyd.agent.clone()),
                ("XPYD_OPERATOR_IMAGE", xpyd.operator.clone()),
                ("XPYD_ETCD_IMAGE", xpyd.etcd.clone()),
                ("XPYD_NATS_IMAGE", xpyd.nats.clone()),
            ]);
            helm_values = Some(xpyd.helm_values());
        }
        _ => println!("no release binaries (--release-dir): xpyd images skipped"),
    }

    let kubeconfig = state_dir.join("kubeconfig");
    std::fs::copy(plane.kubeconfig(), &kubeconfig)?;
    if chart {
        let Some(values) = &helm_values else {
            bail!("--chart needs the xpyd images: pass --release-dir with release builds");
        };
        install_chart(&plane.tools().helm, &kubeconfig, state_dir, values)?;
    }

    let mut env = format!(
        "# Written by xpyd-cluster up; source it.\nexport KUBECONFIG={}\nexport XPYD_REGISTRY={}\n",
        kubeconfig.display(),
        node.registry().address()
    );
    for (var, image) in &images {
        env.push_str(&format!("export {var}={}\n", image.reference()));
    }
    env.push_str(&format!("export XPYD_NODE_DIR={}\n", node.dir().display()));
    if ingress {
        let traefik = node.start_traefik(&plane).await.context("start Traefik")?;
        env.push_str(&format!(
            "# Ingresses of class {} answer here, for their host (curl -H 'Host: ...').\nexport XPYD_INGRESS=http://{}\n",
            traefik.class(),
            traefik.http()
        ));
    }
    let env_file = state_dir.join("env");
    std::fs::write(state_dir.join("env.partial"), &env)?;
    std::fs::rename(state_dir.join("env.partial"), &env_file)?;
    println!("{env}ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut check = tokio::time::interval(Duration::from_secs(10));
    let mut reported = false;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = check.tick() => {
                if let Err(e) = node.check_running()
                    && !reported
                {
                    eprintln!("a node process died; the cluster is broken:\n{e}");
                    reported = true;
                }
            }
        }
    }
    println!("stopping");
    let _ = std::fs::remove_file(&env_file);
    drop(node);
    drop(plane);
    println!("stopped");
    Ok(())
}

fn install_chart(
    helm: &Path,
    kubeconfig: &Path,
    state_dir: &Path,
    values: &[String],
) -> anyhow::Result<()> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/xpyd");
    let out = std::process::Command::new(helm)
        .args(["upgrade", "--install", RELEASE])
        .arg(&chart)
        .args([
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout=5m",
        ])
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(values.iter().map(|v| format!("--set={v}")))
        .env("HELM_CONFIG_HOME", state_dir.join("helm/config"))
        .env("HELM_CACHE_HOME", state_dir.join("helm/cache"))
        .env("HELM_DATA_HOME", state_dir.join("helm/data"))
        .output()
        .context("run helm")?;
    if !out.status.success() {
        bail!(
            "helm install failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("chart installed: release {RELEASE} in {NAMESPACE}");
    Ok(())
}
