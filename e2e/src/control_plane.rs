//! A real Kubernetes control plane on loopback: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok with fake GPU nodes.
//!
//! The API server's etcd is its own, apart from the etcd xpyd stores its
//! settings in, so a test can stop xpyd's etcd without taking Kubernetes down.
//! kwok plays the kubelets: it marks the nodes Ready and drives bound pods to
//! Running, so Deployments get Running pods without containers or GPUs.
//!
//! [`ControlPlane::start_for_real_node`] starts one that a [`crate::RealNode`]
//! can join: it claims the host (see [`crate::host`]), binds the API server to
//! the node address rather than loopback (pods reach it through the
//! `kubernetes` Service), authorizes kubelets with the Node authorizer, and
//! lets the controller-manager give nodes their pod CIDR.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::OnceCell;

use std::sync::Arc;

use crate::certs::Pki;
use crate::error::{HarnessError, Result};
use crate::etcd::Etcd;
use crate::host::{self, HostClaim};
use crate::process::{ServerProcess, free_port, retry_on_port_clash};
use crate::tools::Tools;
use crate::wait::wait_until;
use crate::workdir::Workdir;

/// The extended resource the fake nodes advertise.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Annotation kwok selects the nodes it manages by.
const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

const API_READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPONENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
const NODES_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Shape of the fake cluster.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// How many kwok nodes.
    pub nodes: usize,
    /// `nvidia.com/gpu` capacity of each node.
    pub gpus_per_node: u32,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            nodes: 3,
            gpus_per_node: 8,
        }
    }
}

/// A running control plane. Dropping it stops every process and removes its
/// folder.
#[derive(Debug)]
pub struct ControlPlane {
    tools: Tools,
    kubeconfig: PathBuf,
    api_host: String,
    api_port: u16,
    node_names: Vec<String>,
    pki: Pki,
    // Field order is drop order: kwok and the controllers before the API
    // server, the API server before its etcd, the folder last.
    kwok: ServerProcess,
    scheduler: ServerProcess,
    controller_manager: ServerProcess,
    apiserver: ServerProcess,
    etcd: Etcd,
    dir: Workdir,
    // Last: the host is put back once every process is gone.
    host: Option<Arc<HostClaim>>,
}

impl ControlPlane {
    /// Starts everything and returns once the nodes are Ready and the
    /// `default` ServiceAccount exists (pods can be created and scheduled).
    pub async fn start(options: ControlPlaneOptions) -> Result<ControlPlane> {
        retry_on_port_clash(|| Self::start_once(&options, None)).await
    }

    /// Like [`start`](Self::start), ready for a [`crate::RealNode`] to join
    /// (`options.nodes` kwok nodes may run beside it). Claims the host: only
    /// one such control plane runs on a machine at a time, and a second one
    /// waits for the first (up to 15 minutes) and then fails naming it.
    pub async fn start_for_real_node(options: ControlPlaneOptions) -> Result<ControlPlane> {
        // Before any Workdir: the claim cleans up after a killed run's node,
        // whose folder the Workdir sweep would otherwise delete with its
        // mounts still in place.
        let claim = tokio::task::spawn_blocking(HostClaim::acquire)
            .await
            .map_err(HarnessError::other)??;
        let claim = Arc::new(claim);
        retry_on_port_clash(|| Self::start_once(&options, Some(claim.clone()))).await
    }

    async fn start_once(
        options: &ControlPlaneOptions,
        host: Option<Arc<HostClaim>>,
    ) -> Result<ControlPlane> {
        let tools = Tools::locate()?;
        let dir = Workdir::new("control-plane")?;
        let root = dir.path().to_path_buf();
        let real = host.is_some();
        let extra_sans = if real {
            vec![host::NODE_IP.to_string(), host::API_SERVICE_IP.to_string()]
        } else {
            Vec::new()
        };
        let pki = Pki::generate(&root, &extra_sans)?;
        let etcd = Etcd::start(&tools, &dir.subdir("etcd")?).await?;

        let api_host = if real {
            host::NODE_IP.to_string()
        } else {
            "127.0.0.1".to_string()
        };
        let api_port = free_port();
        let mut apiserver = start_apiserver(&tools, &root, &pki, &etcd, &api_host, api_port, real)?;
        let kubeconfig = write_kubeconfig(&root, &pki, &api_host, api_port)?;
        wait_api_ready(&mut apiserver, &kubeconfig).await?;

        let mut cm_args = vec![
            format!(
                "--service-account-private-key-file={}",
                pki.sa_key.display()
            ),
            format!("--root-ca-file={}", pki.ca_cert.display()),
            "--use-service-account-credentials=false".to_string(),
            "--cluster-name=xpyd-e2e".to_string(),
            // Fake nodes never fail; quick node-lifecycle turns keep tests short.
            "--node-monitor-period=2s".to_string(),
        ];
        if real {
            // nodeipam on: a real node gets its pod CIDR from here.
            cm_args.extend([
                "--controllers=*".to_string(),
                "--allocate-node-cidrs=true".to_string(),
                format!("--cluster-cidr={}", host::CLUSTER_CIDR),
                format!("--service-cluster-ip-range={}", host::SERVICE_CIDR),
                "--node-cidr-mask-size=24".to_string(),
            ]);
        } else {
            cm_args.push("--controllers=*,-nodeipam".to_string());
        }
        let (mut controller_manager, cm_port) = start_component(
            &tools,
            &root,
            "kube-controller-manager",
            &kubeconfig,
            &cm_args,
        )?;
        let (mut scheduler, scheduler_port) =
            start_component(&tools, &root, "kube-scheduler", &kubeconfig, &[])?;
        let kwok = ServerProcess::start(
            "kwok",
            &tools.kwok,
            [
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--config={}", tools.kwok_stages.display()),
                "--manage-all-nodes=false".to_string(),
                format!(
                    "--manage-nodes-with-annotation-selector={}={}",
                    KWOK_NODE_ANNOTATION.0, KWOK_NODE_ANNOTATION.1
                ),
                "--cidr=10.0.0.1/24".to_string(),
                "--node-ip=10.0.0.1".to_string(),
            ],
            std::iter::empty::<(&str, &str)>(),
            root.join("kwok.log"),
        )?;
        wait_healthz(&mut controller_manager, cm_port).await?;
        wait_healthz(&mut scheduler, scheduler_port).await?;

        // From here on, dropping `plane` stops everything.
        let mut plane = ControlPlane {
            tools,
            kubeconfig,
            api_host,
            api_port,
            node_names: Vec::new(),
            pki,
            kwok,
            scheduler,
            controller_manager,
            apiserver,
            etcd,
            dir,
            host,
        };
        plane.wait_default_service_account().await?;
        plane.add_nodes(options).await?;
        Ok(plane)
    }

    /// A new client for the calling test's runtime (a client must not
    /// outlive the Tokio runtime it was made in, and each test has its own).
    pub async fn client(&self) -> Result<kube::Client> {
        client_from(&self.kubeconfig).await
    }

    /// The admin kubeconfig, for `kubectl --kubeconfig` and `helm --kubeconfig`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL (on loopback, or on the node address when
    /// started for a real node).
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.api_host, self.api_port)
    }

    /// The host claim, when started for a real node.
    pub(crate) fn host(&self) -> Option<&Arc<HostClaim>> {
        self.host.as_ref()
    }

    /// The CA and certificates, for a real node's clients.
    pub(crate) fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The kube-apiserver's process id (for benchmarks that compare CPU use).
    pub fn apiserver_pid(&self) -> Option<u32> {
        self.apiserver.pid()
    }

    /// Names of the kwok nodes.
    pub fn node_names(&self) -> &[String] {
        &self.node_names
    }

    /// The tools it was started with.
    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// `kubectl --kubeconfig <admin kubeconfig> <args>`, killed after
    /// `timeout`; its stdout, or an error with its output. Runs off the
    /// async runtime.
    pub async fn kubectl(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let (kubectl, kubeconfig) = (self.tools.kubectl(), self.kubeconfig.clone());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::node::kubectl(&kubectl, &kubeconfig, &args, None, timeout)
        })
        .await
        .map_err(HarnessError::other)?
    }

    /// `helm --kubeconfig <admin kubeconfig> <args>`, with helm's config and
    /// cache under `home` (never the user's), killed after `timeout`;
    /// its stdout, or an error with its output. Runs off the async runtime.
    pub async fn helm(&self, home: &Path, args: &[&str], timeout: Duration) -> Result<String> {
        let helm = self.tools.helm.to_string_lossy().into_owned();
        let mut all = vec![
            "--kubeconfig".to_string(),
            self.kubeconfig.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let (config, cache) = (home.join("config"), home.join("cache"));
        tokio::task::spawn_blocking(move || {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            crate::host::run_with_env(
                &helm,
                &all,
                &[("HELM_CONFIG_HOME", &config), ("HELM_CACHE_HOME", &cache)],
                None,
                timeout,
            )
        })
        .await
        .map_err(HarnessError::other)?
    }

    /// The folder holding its certificates, logs and data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fails, with the log tail, if any of its processes has died.
    pub fn check_running(&mut self) -> Result<()> {
        self.etcd_process_check()?;
        self.apiserver.check_running()?;
        self.controller_manager.check_running()?;
        self.scheduler.check_running()?;
        self.kwok.check_running()
    }

    fn etcd_process_check(&self) -> Result<()> {
        if self.etcd.process().pid().is_none() {
            return Err(self.etcd.process().error("not running"));
        }
        Ok(())
    }

    async fn wait_default_service_account(&self) -> Result<()> {
        let client = self.client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        wait_until(
            "the controller-manager to create the default ServiceAccount",
            COMPONENT_READY_TIMEOUT,
            || {
                let accounts = accounts.clone();
                async move { accounts.get_opt("default").await.map(|sa| sa.is_some()) }
            },
        )
        .await
        .map_err(|e| self.controller_manager.error(e.to_string()))
    }

    async fn add_nodes(&mut self, options: &ControlPlaneOptions) -> Result<()> {
        let client = self.client().await?;
        let nodes: Api<Node> = Api::all(client);
        for i in 0..options.nodes {
            let name = format!("kwok-node-{i}");
            let node = fake_node(&name, options.gpus_per_node)?;
            nodes
                .create(&PostParams::default(), &node)
                .await
                .map_err(|e| HarnessError::Other(format!("create node {name}: {e}")))?;
            self.node_names.push(name);
        }
        let names = self.node_names.clone();
        wait_until(
            "kwok to make the fake nodes Ready and untainted",
            NODES_READY_TIMEOUT,
            || {
                let nodes = nodes.clone();
                let names = names.clone();
                async move {
                    for name in &names {
                        if !node_schedulable(&nodes.get(name).await?) {
                            return Ok(false);
                        }
                    }
                    Ok::<_, kube::Error>(true)
                }
            },
        )
        .await
        .map_err(|e| self.kwok.error(e.to_string()))
    }
}

/// Ready, and without the `node.kubernetes.io/not-ready` taint that the node
/// lifecycle controller removes once it has seen the node Ready.
pub(crate) fn node_schedulable(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.key.starts_with("node.kubernetes.io/")));
    ready && !tainted
}

fn fake_node(name: &str, gpus: u32) -> Result<Node> {
    let capacity = serde_json::json!({
        "cpu": "32",
        "memory": "256Gi",
        "pods": "110",
        GPU_RESOURCE: gpus.to_string(),
    });
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                KWOK_NODE_ANNOTATION.0: KWOK_NODE_ANNOTATION.1,
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
        },
    }))
    .map_err(HarnessError::other)
}

fn start_apiserver(
    tools: &Tools,
    root: &Path,
    pki: &Pki,
    etcd: &Etcd,
    host: &str,
    port: u16,
    real_node: bool,
) -> Result<ServerProcess> {
    let mut args = vec![
        format!("--etcd-servers={}", etcd.endpoint()),
        format!("--cert-dir={}", root.join("apiserver-certs").display()),
        format!("--tls-cert-file={}", pki.serving_cert.display()),
        format!("--tls-private-key-file={}", pki.serving_key.display()),
        format!("--client-ca-file={}", pki.ca_cert.display()),
        format!("--secure-port={port}"),
        format!("--bind-address={host}"),
        format!("--advertise-address={host}"),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
        format!("--service-account-key-file={}", pki.sa_pub.display()),
        format!(
            "--service-account-signing-key-file={}",
            pki.sa_key.display()
        ),
        format!("--service-cluster-ip-range={}", host::SERVICE_CIDR),
        "--allow-privileged=true".to_string(),
    ];
    if real_node {
        args.extend([
            // Kubelets authenticate as system:node:<name>.
            "--authorization-mode=Node,RBAC".to_string(),
            // For `kubectl logs` and `exec`: the API server's client
            // certificate towards the kubelet.
            format!("--kubelet-client-certificate={}", pki.admin_cert.display()),
            format!("--kubelet-client-key={}", pki.admin_key.display()),
            "--kubelet-preferred-address-types=InternalIP".to_string(),
        ]);
    } else {
        args.extend([
            "--authorization-mode=RBAC".to_string(),
            // The "kubernetes" Service endpoint would be a loopback address,
            // which the reconciler rejects every 10 s; nothing needs it.
            "--endpoint-reconciler-type=none".to_string(),
        ]);
    }
    ServerProcess::start(
        "kube-apiserver",
        &tools.kube_bin.join("kube-apiserver"),
        args,
        std::iter::empty::<(&str, &str)>(),
        root.join("kube-apiserver.log"),
    )
}

async fn wait_api_ready(apiserver: &mut ServerProcess, kubeconfig: &Path) -> Result<()> {
    let client = client_from(kubeconfig).await?;
    apiserver
        .wait_ready(API_READY_TIMEOUT, || {
            let client = client.clone();
            async move {
                let req = http_get("/readyz");
                matches!(client.request_text(req).await, Ok(body) if body.trim() == "ok")
            }
        })
        .await
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .body(Vec::new())
        .expect("a GET request with a static path is valid")
}

/// kube-controller-manager and kube-scheduler share their flags for the
/// admin kubeconfig and a health port on loopback.
fn start_component(
    tools: &Tools,
    root: &Path,
    name: &str,
    kubeconfig: &Path,
    extra: &[String],
) -> Result<(ServerProcess, u16)> {
    let k = kubeconfig.display();
    let port = free_port();
    let mut args = vec![
        format!("--kubeconfig={k}"),
        format!("--authentication-kubeconfig={k}"),
        format!("--authorization-kubeconfig={k}"),
        "--leader-elect=false".to_string(),
        format!("--secure-port={port}"),
        "--bind-address=127.0.0.1".to_string(),
        format!(
            "--cert-dir={}",
            root.join(format!("{name}-certs")).display()
        ),
    ];
    args.extend_from_slice(extra);
    let process = ServerProcess::start(
        name,
        &tools.kube_bin.join(name),
        args,
        std::iter::empty::<(&str, &str)>(),
        root.join(format!("{name}.log")),
    )?;
    Ok((process, port))
}

/// Waits for a component's `/healthz` on the secure port it was given.
async fn wait_healthz(component: &mut ServerProcess, port: u16) -> Result<()> {
    let url = format!("https://127.0.0.1:{port}/healthz");
    component
        .wait_http_ready(&url, COMPONENT_READY_TIMEOUT, true, |_| true)
        .await
}

fn write_kubeconfig(root: &Path, pki: &Pki, host: &str, port: u16) -> Result<PathBuf> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // JSON is YAML, and kubectl, helm and kube-rs all read it.
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "xpyd-e2e",
            "cluster": {
                "server": format!("https://{host}:{port}"),
                "certificate-authority-data": b64(&pki.ca_pem),
            },
        }],
        "users": [{
            "name": "admin",
            "user": {
                "client-certificate-data": b64(&pki.admin_cert_pem),
                "client-key-data": b64(&pki.admin_key_pem),
            },
        }],
        "contexts": [{
            "name": "xpyd-e2e",
            "context": {"cluster": "xpyd-e2e", "user": "admin", "namespace": "default"},
        }],
        "current-context": "xpyd-e2e",
    });
    let path = root.join("admin.kubeconfig");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&config).map_err(HarnessError::other)?,
    )
    .map_err(HarnessError::io(format!("write {}", path.display())))?;
    Ok(path)
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(HarnessError::other)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(HarnessError::other)?;
    kube::Client::try_from(config).map_err(HarnessError::other)
}

/// The control plane this test binary shares, started by the first test that
/// asks. Its processes are stopped when the binary exits (see
/// [`crate::process`]). A failed start is reported to every test that asks.
pub async fn shared_control_plane() -> Result<&'static ControlPlane> {
    static SHARED: OnceCell<std::result::Result<ControlPlane, String>> = OnceCell::const_new();
    SHARED
        .get_or_init(|| async {
            ControlPlane::start(ControlPlaneOptions::default())
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .as_ref()
        .map_err(|e| HarnessError::Other(format!("shared control plane failed to start: {e}")))
}
