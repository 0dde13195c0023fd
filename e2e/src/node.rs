//! A real node: kubelet, containerd, runc, a CNI bridge, kube-proxy and
//! CoreDNS, so pods really run (where kwok only says they do).
//!
//! [`RealNode::start`] joins a control plane started with
//! [`ControlPlane::start_for_real_node`]. Its images come from a local
//! registry ([`crate::ImageRegistry`]) that containerd pulls from over plain
//! HTTP, as a user's cluster pulls from theirs; nothing is pulled from the
//! internet, and CoreDNS answers only for `cluster.local` (no upstream), so
//! no query leaves the machine.
//!
//! Every address is on this host: the node's ([`crate::host::NODE_IP`], on
//! `lo`), the pods' (a /24 of [`crate::host::CLUSTER_CIDR`] behind the bridge)
//! and the Services' ClusterIPs (kube-proxy's nft rules), so a test reaches
//! any of them directly. State lives in the node's [`Workdir`] where the
//! component allows it; what it cannot (cgroups, nft tables, the bridge,
//! `/var/lib/kubelet`, `/run/containerd`) is undone on drop and, after a
//! crash, by the next claim of the host ([`crate::host`]). One real node per
//! host.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::control_plane::{ControlPlane, node_schedulable};
use crate::error::{HarnessError, Result};
use crate::host::{self, HostClaim, run_with_timeout};
use crate::images::{ImageRef, ImageRegistry, ImageSpec, RegistryClient, system, workload};
use crate::process::{ServerProcess, free_port};
use crate::tools::NodeTools;
use crate::wait::wait_until;
use crate::workdir::Workdir;

/// The node's name (and hostname label).
pub const NODE_NAME: &str = "xpyd-node";
/// A label the node carries, for pods that must land on it.
pub const NODE_LABEL: (&str, &str) = ("xpyd.dev/real-node", "true");

const CONTAINERD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const KUBELET_READY_TIMEOUT: Duration = Duration::from_secs(60);
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);
const PROXY_READY_TIMEOUT: Duration = Duration::from_secs(60);
const DNS_READY_TIMEOUT: Duration = Duration::from_secs(180);
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(120);

/// A running real node. Dropping it stops every pod and process and puts
/// the host back (see the module doc).
#[derive(Debug)]
pub struct RealNode {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    pod_cidr: String,
    started_in: Duration,
    toolbox: ImageRef,
    registry_client: RegistryClient,
    kube_proxy: ServerProcess,
    kubelet: ServerProcess,
    containerd: ServerProcess,
    registry: ImageRegistry,
    host: Arc<HostClaim>,
    dir: Workdir,
}

impl RealNode {
    /// Starts the node and returns once it is Ready, kube-proxy has synced
    /// and CoreDNS answers. `plane` must come from
    /// [`ControlPlane::start_for_real_node`].
    pub async fn start(plane: &ControlPlane) -> Result<RealNode> {
        let started = Instant::now();
        let host = plane.host().cloned().ok_or_else(|| {
            HarnessError::Other(
                "RealNode::start needs a control plane from ControlPlane::start_for_real_node"
                    .into(),
            )
        })?;
        let tools = NodeTools::locate()?;
        let dir = Workdir::new("real-node")?;
        host.add_node_dir(dir.path())?;
        let root = dir.path().to_path_buf();

        let registry = ImageRegistry::start(&tools.crane, &root).await?;
        let client = registry.client();
        let (pause, coredns, toolbox) = {
            let (client, tools) = (client.clone(), tools.clone());
            tokio::task::spawn_blocking(move || -> Result<_> {
                Ok((
                    client.push(&system::pause(&tools))?,
                    client.push(&system::coredns(&tools))?,
                    client.push(&system::toolbox(&tools))?,
                ))
            })
            .await
            .map_err(HarnessError::other)??
        };

        let mut containerd = start_containerd(&tools, &root, client.address(), &pause)?;
        let socket = root.join("containerd/containerd.sock");
        containerd
            .wait_ready(CONTAINERD_READY_TIMEOUT, || {
                let ok = std::os::unix::net::UnixStream::connect(&socket).is_ok();
                async move { ok }
            })
            .await?;

        let pki = plane.pki();
        let server = plane.server_url();
        let kubelet_kubeconfig = write_client_kubeconfig(
            &root.join("kubelet.kubeconfig"),
            &server,
            &pki.ca_pem,
            &pki.client(&format!("system:node:{NODE_NAME}"), Some("system:nodes"))?,
        )?;
        let proxy_kubeconfig = write_client_kubeconfig(
            &root.join("kube-proxy.kubeconfig"),
            &server,
            &pki.ca_pem,
            &pki.client("system:kube-proxy", None)?,
        )?;

        let healthz_port = free_port();
        let mut kubelet = start_kubelet(
            &tools,
            &root,
            &kubelet_kubeconfig,
            &pki.ca_cert,
            &socket,
            healthz_port,
        )?;
        kubelet
            .wait_http_ready(
                &format!("http://127.0.0.1:{healthz_port}/healthz"),
                KUBELET_READY_TIMEOUT,
                false,
                |body| body.trim() == "ok",
            )
            .await?;

        // The controller-manager gives the node its pod CIDR once it has
        // registered; the CNI config follows it (containerd watches the folder).
        let nodes: Api<Node> = Api::all(plane.client().await?);
        let pod_cidr = wait_pod_cidr(&nodes)
            .await
            .map_err(|e| kubelet.error(e.to_string()))?;
        write_cni_config(&root, &pod_cidr)?;

        let proxy_port = free_port();
        let mut kube_proxy = start_kube_proxy(&tools, &root, &proxy_kubeconfig, proxy_port)?;

        wait_until(
            "the real node to be Ready and untainted",
            NODE_READY_TIMEOUT,
            || {
                let nodes = nodes.clone();
                async move { Ok::<_, kube::Error>(node_schedulable(&nodes.get(NODE_NAME).await?)) }
            },
        )
        .await
        .map_err(|e| {
            kubelet.error(format!(
                "{e}\n(containerd log: {})",
                root.join("containerd.log").display()
            ))
        })?;
        kube_proxy
            .wait_http_ready(
                &format!("http://127.0.0.1:{proxy_port}/healthz"),
                PROXY_READY_TIMEOUT,
                false,
                |_| true,
            )
            .await?;

        let mut node = RealNode {
            kubeconfig: plane.kubeconfig().to_path_buf(),
            kubectl: plane.tools().kubectl(),
            pod_cidr,
            started_in: Duration::ZERO,
            toolbox,
            registry_client: client,
            kube_proxy,
            kubelet,
            containerd,
            registry,
            host,
            dir,
        };
        node.start_dns(plane, &coredns).await?;
        node.started_in = started.elapsed();
        tracing::info!(secs = node.started_in.as_secs_f64(), "real node up");
        Ok(node)
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        NODE_NAME
    }

    /// The node's address (its InternalIP; NodePorts answer on it).
    pub fn ip(&self) -> Ipv4Addr {
        host::NODE_IP
    }

    /// The node's pod CIDR (pod IPs are reachable from the host).
    pub fn pod_cidr(&self) -> &str {
        &self.pod_cidr
    }

    /// How long [`start`](Self::start) took, images and DNS included.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The registry the node pulls from: push images there, and use
    /// [`RegistryClient::address`] as the registry part of image references.
    pub fn registry(&self) -> &RegistryClient {
        &self.registry_client
    }

    /// Builds (or takes from the cache) and pushes an image to the node's
    /// registry, off the async runtime.
    pub async fn push_image(&self, spec: ImageSpec) -> Result<ImageRef> {
        let client = self.registry_client.clone();
        tokio::task::spawn_blocking(move || client.push(&spec))
            .await
            .map_err(HarnessError::other)?
    }

    /// Pushes the images of xpyd's chart and workloads: the agent and
    /// operator from the release binaries in `release_dir` (`cargo build
    /// --release -p xpyd-agent -p xpyd-operator`), with the NIXL libraries
    /// setup unpacked, and the optional etcd and NATS. Tag
    /// [`XpydImages::TAG`] for the agent and operator.
    pub async fn push_xpyd_images(&self, release_dir: &Path) -> Result<XpydImages> {
        let tools = crate::Tools::locate()?;
        let (agent_bin, operator_bin) = (
            release_dir.join("xpyd-agent"),
            release_dir.join("xpyd-operator"),
        );
        for bin in [&agent_bin, &operator_bin] {
            if !bin.is_file() {
                return Err(HarnessError::Tool(format!(
                    "{} not found: cargo build --release -p xpyd-agent -p xpyd-operator",
                    bin.display()
                )));
            }
        }
        let nixl =
            xpyd_runtime::assets::nixl_lib_dir().map_err(|e| HarnessError::Tool(e.to_string()))?;
        Ok(XpydImages {
            agent: self
                .push_image(workload::agent(&agent_bin, &nixl, XpydImages::TAG))
                .await?,
            operator: self
                .push_image(workload::operator(&operator_bin, XpydImages::TAG))
                .await?,
            etcd: self
                .push_image(workload::etcd(&tools.etcd, XpydImages::ETCD_TAG))
                .await?,
            nats: self
                .push_image(workload::nats(&tools.nats, XpydImages::NATS_TAG))
                .await?,
        })
    }

    /// busybox (sh, wget, nslookup, nc, httpd), for pods that poke at things.
    pub fn toolbox_image(&self) -> &ImageRef {
        &self.toolbox
    }

    /// A folder on the node for hostPath or local PersistentVolumes, created
    /// (world-writable, as a provisioner's would be) and removed with the node.
    pub fn host_path(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.subdir("volumes")?.join(name);
        std::fs::create_dir_all(&path)
            .map_err(HarnessError::io(format!("create {}", path.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
            .map_err(HarnessError::io(format!("chmod {}", path.display())))?;
        Ok(path)
    }

    /// Asks the cluster DNS for `name`'s A record (e.g.
    /// `xpyd-etcd.xpyd-system.svc.cluster.local`); `None` when it has none.
    pub async fn resolve(&self, name: &str) -> Result<Option<Ipv4Addr>> {
        let name = name.to_string();
        tokio::task::spawn_blocking(move || dns_query(host::DNS_SERVICE_IP, &name))
            .await
            .map_err(HarnessError::other)?
    }

    /// Runs `kubectl` with the admin kubeconfig (stdin optional), with a
    /// deadline; returns its stdout. Blocking.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        kubectl(
            &self.kubectl,
            &self.kubeconfig,
            args,
            stdin,
            KUBECTL_TIMEOUT,
        )
    }

    /// The logs kubelet keeps of a pod's containers (all of them, oldest
    /// first), read from disk: works when the API cannot help.
    pub fn pod_logs(&self, namespace: &str, pod: &str) -> String {
        self.logs_of_pods(&format!("{namespace}_{pod}_"))
    }

    /// The logs of a Deployment's pods (names `<deployment>-<hash>-<id>`),
    /// as [`pod_logs`](Self::pod_logs) reads them.
    pub fn deployment_logs(&self, namespace: &str, deployment: &str) -> String {
        self.logs_of_pods(&format!("{namespace}_{deployment}-"))
    }

    /// The logs of every pod whose kubelet log folder (`<ns>_<pod>_<uid>`)
    /// starts with `prefix`.
    fn logs_of_pods(&self, prefix: &str) -> String {
        let dir = self.dir.path().join("pod-logs");
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return out;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(prefix) {
                continue;
            }
            let mut files: Vec<PathBuf> = walk_files(&entry.path());
            files.sort();
            for file in files {
                out.push_str(&format!("--- {}\n", file.display()));
                out.push_str(&String::from_utf8_lossy(
                    &std::fs::read(&file).unwrap_or_default(),
                ));
            }
        }
        out
    }

    /// The node's folder (logs of every component, containerd's state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fails, with the log tail, if any of the node's processes has died.
    pub fn check_running(&mut self) -> Result<()> {
        self.registry.check_running()?;
        self.containerd.check_running()?;
        self.kubelet.check_running()?;
        self.kube_proxy.check_running()
    }

    async fn start_dns(&mut self, plane: &ControlPlane, image: &ImageRef) -> Result<()> {
        self.kubectl(&["apply", "-f", "-"], Some(&coredns_manifest(image)))?;
        self.wait_deployment_ready(plane, "kube-system", "coredns", DNS_READY_TIMEOUT)
            .await?;
        let resolved = wait_until(
            "CoreDNS to answer for kubernetes.default",
            DNS_READY_TIMEOUT,
            || async {
                self.resolve("kubernetes.default.svc.cluster.local")
                    .await
                    .map(|ip| ip == Some(host::API_SERVICE_IP))
            },
        )
        .await;
        resolved.map_err(|e| self.kube_proxy.error(e.to_string()))
    }
}

impl RealNode {
    /// Waits for a Deployment of the node's add-ons to have a Ready pod;
    /// on timeout the error carries the pods and the Deployment's logs.
    pub(crate) async fn wait_deployment_ready(
        &self,
        plane: &ControlPlane,
        namespace: &str,
        name: &str,
        within: Duration,
    ) -> Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(plane.client().await?, namespace);
        let waited = wait_until(&format!("{namespace}/{name} to be ready"), within, || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get(name).await?;
                Ok::<_, kube::Error>(
                    d.status
                        .and_then(|s| s.ready_replicas)
                        .is_some_and(|n| n >= 1),
                )
            }
        })
        .await;
        waited.map_err(|e| {
            let pods = self
                .kubectl(&["get", "pods", "-A", "-o", "wide"], None)
                .unwrap_or_default();
            self.kubelet.error(format!(
                "{e}\npods:\n{pods}\n{name} logs:\n{}",
                self.deployment_logs(namespace, name)
            ))
        })
    }
}

/// The images of xpyd's chart and workloads in a node's registry.
#[derive(Debug, Clone)]
pub struct XpydImages {
    /// For a DisaggDeployment's `spec.image.name`.
    pub agent: ImageRef,
    pub operator: ImageRef,
    pub etcd: ImageRef,
    pub nats: ImageRef,
}

impl XpydImages {
    /// The tag of the agent and operator images built from a workspace.
    pub const TAG: &str = "dev";
    const ETCD_TAG: &str = "v3.6.16";
    const NATS_TAG: &str = "debian";

    /// `helm --set` values (`key=value`) that install the chart with these
    /// images, its etcd and its NATS.
    pub fn helm_values(&self) -> Vec<String> {
        vec![
            format!("operator.image.repository={}", self.operator.repository),
            format!("operator.image.tag={}", self.operator.tag),
            "etcd.enabled=true".to_string(),
            format!("etcd.image.repository={}", self.etcd.repository),
            format!("etcd.image.tag={}", self.etcd.tag),
            "nats.enabled=true".to_string(),
            format!("nats.image.repository={}", self.nats.repository),
            format!("nats.image.tag={}", self.nats.tag),
        ]
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // kubelet first, so it restarts nothing; then the pods, containerd,
        // and whatever they left (mounts, bridge, nft tables, cgroups).
        self.kubelet.kill();
        self.kube_proxy.kill();
        self.host.clean_nodes();
        self.containerd.stop(Duration::from_secs(5));
        self.host.clean_nodes();
    }
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk_files(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

pub(crate) fn kubectl(
    kubectl: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    let kc = format!("--kubeconfig={}", kubeconfig.display());
    let mut all = vec![kc.as_str()];
    all.extend_from_slice(args);
    run_with_timeout(
        &kubectl.to_string_lossy(),
        &all,
        stdin.map(str::as_bytes),
        timeout,
    )
}

async fn wait_pod_cidr(nodes: &Api<Node>) -> Result<String> {
    let cidr = |node: Option<Node>| node.and_then(|n| n.spec).and_then(|s| s.pod_cidr);
    wait_until(
        "the node to register and get its pod CIDR",
        NODE_READY_TIMEOUT,
        || {
            let nodes = nodes.clone();
            async move { Ok::<_, kube::Error>(cidr(nodes.get_opt(NODE_NAME).await?).is_some()) }
        },
    )
    .await?;
    let node = nodes
        .get_opt(NODE_NAME)
        .await
        .map_err(HarnessError::other)?;
    cidr(node).ok_or_else(|| HarnessError::Other("the node lost its pod CIDR".into()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(HarnessError::io(format!("create {}", parent.display())))?;
    }
    std::fs::write(path, text).map_err(HarnessError::io(format!("write {}", path.display())))
}

fn write_client_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    cert: &crate::certs::ClientCert,
) -> Result<PathBuf> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "xpyd-e2e", "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": "node", "user": {
            "client-certificate-data": b64(&cert.cert_pem),
            "client-key-data": b64(&cert.key_pem),
        }}],
        "contexts": [{"name": "xpyd-e2e", "context": {"cluster": "xpyd-e2e", "user": "node"}}],
        "current-context": "xpyd-e2e",
    });
    write(path, &config.to_string())?;
    Ok(path.to_path_buf())
}

fn start_containerd(
    tools: &NodeTools,
    root: &Path,
    registry: &str,
    pause: &ImageRef,
) -> Result<ServerProcess> {
    let d = |p: &str| root.join(p).display().to_string();
    let shim = tools.containerd_bin.join("containerd-shim-runc-v2");
    // The CRI settings FACTS.md lists: restrict_oom_score_adj (the VM
    // withholds CAP_SYS_RESOURCE), network namespaces under the state dir,
    // the pause image pinned (no registry.k8s.io here), cgroupfs.
    let config = format!(
        r#"version = 3
root = "{root_dir}"
state = "{state_dir}"
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      runtime_path = "{shim}"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{certs_d}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        root_dir = d("containerd/root"),
        state_dir = d("containerd/state"),
        socket = d("containerd/containerd.sock"),
        shim = shim.display(),
        runc = tools.runc.display(),
        runc_root = d("containerd/runc"),
        cni_bin = tools.cni_bin.display(),
        cni_conf = d("cni/net.d"),
        pause = pause.reference(),
        certs_d = d("containerd/certs.d"),
    );
    write(&root.join("containerd/config.toml"), &config)?;
    std::fs::create_dir_all(root.join("cni/net.d"))
        .map_err(HarnessError::io("create the CNI config folder"))?;
    // Plain HTTP to the local registry.
    write(
        &root.join(format!("containerd/certs.d/{registry}/hosts.toml")),
        &format!(
            "server = \"http://{registry}\"\n\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )?;
    ServerProcess::start(
        "containerd",
        &tools.containerd_bin.join("containerd"),
        [format!("--config={}", d("containerd/config.toml"))],
        [("PATH", path_with(&tools.containerd_bin))],
        root.join("containerd.log"),
    )
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    )
}

fn start_kubelet(
    tools: &NodeTools,
    root: &Path,
    kubeconfig: &Path,
    ca: &Path,
    socket: &Path,
    healthz_port: u16,
) -> Result<ServerProcess> {
    let endpoint = format!("unix://{}", socket.display());
    let config = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // 1.35+ refuses cgroup v1 unless told; these machines have v1.
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": endpoint,
        "imageServiceEndpoint": endpoint,
        "address": host::NODE_IP.to_string(),
        "port": free_port(),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": ca.display().to_string()},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [host::DNS_SERVICE_IP.to_string()],
        // No host resolver for pods: names outside the cluster do not resolve.
        "resolvConf": "",
        "failSwapOn": false,
        "podLogsDir": root.join("pod-logs").display().to_string(),
        // Small CI disks: evict only when nearly full.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "serializeImagePulls": false,
        "rotateCertificates": false,
        "nodeStatusUpdateFrequency": "4s",
        "enforceNodeAllocatable": ["pods"],
    });
    let path = root.join("kubelet-config.json");
    write(&path, &config.to_string())?;
    ServerProcess::start(
        "kubelet",
        &tools.kubenode_bin.join("kubelet"),
        [
            format!("--config={}", path.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--root-dir={}", root.join("kubelet").display()),
            format!("--cert-dir={}", root.join("kubelet-certs").display()),
            format!("--node-ip={}", host::NODE_IP),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-labels={}={}", NODE_LABEL.0, NODE_LABEL.1),
            "--v=1".to_string(),
        ],
        [("PATH", path_with(&tools.containerd_bin))],
        root.join("kubelet.log"),
    )
}

fn start_kube_proxy(
    tools: &NodeTools,
    root: &Path,
    kubeconfig: &Path,
    healthz_port: u16,
) -> Result<ServerProcess> {
    let config = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": kubeconfig.display().to_string()},
        "hostnameOverride": NODE_NAME,
        "bindAddress": host::NODE_IP.to_string(),
        "clusterCIDR": host::CLUSTER_CIDR,
        "healthzBindAddress": format!("127.0.0.1:{healthz_port}"),
        "metricsBindAddress": format!("127.0.0.1:{}", free_port()),
        // Leave the host's conntrack sysctls as they are (0: do not set).
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
            "udpTimeout": "0s",
            "udpStreamTimeout": "0s",
        },
    });
    let path = root.join("kube-proxy-config.json");
    write(&path, &config.to_string())?;
    ServerProcess::start(
        "kube-proxy",
        &tools.kubenode_bin.join("kube-proxy"),
        [format!("--config={}", path.display()), "--v=1".to_string()],
        std::iter::empty::<(&str, &str)>(),
        root.join("kube-proxy.log"),
    )
}

/// The bridge with host-local IPAM over the node's pod CIDR; hairpin so a
/// pod reaches itself through a Service; no masquerade (no traffic is meant
/// to leave the host); portmap for hostPorts, through nftables.
fn write_cni_config(root: &Path, pod_cidr: &str) -> Result<()> {
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "xpyd",
        "plugins": [
            {
                "type": "bridge",
                "bridge": host::BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": root.join("cni/ipam").display().to_string(),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "backend": "nftables"},
        ],
    });
    write(
        &root.join("cni/net.d/10-xpyd.conflist"),
        &serde_json::to_string_pretty(&config).map_err(HarnessError::other)?,
    )
}

/// CoreDNS as the cluster DNS: RBAC, its Corefile (cluster.local only),
/// a Deployment on the node and the `kube-dns` Service at the address
/// kubelet gives pods.
fn coredns_manifest(image: &ImageRef) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: coredns, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects: [{{kind: ServiceAccount, name: coredns, namespace: kube-system}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
    .:53 {{
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 5
        }}
        cache 5
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata: {{labels: {{k8s-app: kube-dns}}}}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      containers:
        - name: coredns
          image: {image}
          args: ["-conf", "/etc/coredns/Corefile"]
          ports:
            - {{name: dns, containerPort: 53, protocol: UDP}}
            - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
          # As upstream's manifest: a CPU share of its own and a patient
          # liveness probe. On a 2-core node busy loading models, a 1 s
          # probe timeout restarted CoreDNS over and over, and pods then
          # failed to resolve Service names for minutes.
          resources:
            requests: {{cpu: 100m, memory: 70Mi}}
          readinessProbe:
            httpGet: {{path: /ready, port: 8181}}
            periodSeconds: 1
          livenessProbe:
            httpGet: {{path: /health, port: 8080}}
            initialDelaySeconds: 60
            timeoutSeconds: 5
            failureThreshold: 5
          volumeMounts: [{{name: config, mountPath: /etc/coredns}}]
      volumes: [{{name: config, configMap: {{name: coredns}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  clusterIP: {dns_ip}
  selector: {{k8s-app: kube-dns}}
  ports:
    - {{name: dns, port: 53, protocol: UDP}}
    - {{name: dns-tcp, port: 53, protocol: TCP}}
"#,
        image = image.reference(),
        dns_ip = host::DNS_SERVICE_IP,
    )
}

/// One A query over UDP; `None` on NXDOMAIN or an empty answer.
fn dns_query(server: Ipv4Addr, name: &str) -> Result<Option<Ipv4Addr>> {
    let id: u16 = rand::random();
    let mut query = Vec::with_capacity(64);
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root; type A; class IN
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(HarnessError::io("bind a UDP socket"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(HarnessError::io("set a UDP timeout"))?;
    socket
        .send_to(&query, (server, 53))
        .map_err(HarnessError::io(format!("send a DNS query to {server}")))?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).map_err(HarnessError::io(format!(
        "DNS answer from {server} for {name}"
    )))?;
    parse_a_answer(&buf[..n], id, query.len())
        .map_err(|e| HarnessError::Other(format!("DNS answer for {name}: {e}")))
}

fn parse_a_answer(msg: &[u8], id: u16, question_end: usize) -> Result<Option<Ipv4Addr>, String> {
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id {
        return Err("short answer or wrong id".into());
    }
    let rcode = msg[3] & 0x0f;
    if rcode == 3 {
        return Ok(None);
    }
    if rcode != 0 {
        return Err(format!("rcode {rcode}"));
    }
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    let mut i = question_end;
    for _ in 0..answers {
        // Name: a pointer (2 bytes) or labels.
        while i < msg.len() {
            let len = msg[i];
            if len & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            i += 1 + len as usize;
            if len == 0 {
                break;
            }
        }
        if i + 10 > msg.len() {
            return Err("truncated record".into());
        }
        let rtype = u16::from_be_bytes([msg[i], msg[i + 1]]);
        let rdlen = u16::from_be_bytes([msg[i + 8], msg[i + 9]]) as usize;
        i += 10;
        if rtype == 1 && rdlen == 4 && i + 4 <= msg.len() {
            return Ok(Some(Ipv4Addr::new(
                msg[i],
                msg[i + 1],
                msg[i + 2],
                msg[i + 3],
            )));
        }
        i += rdlen;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_a_record_is_read_from_a_dns_answer() {
        // Header (id 7, QR, 1 question, 1 answer), question kubernetes.default,
        // answer with a name pointer, type A, class IN, TTL 5, 10.96.0.1.
        let mut msg = vec![0, 7, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        msg.extend_from_slice(b"\x0akubernetes\x07default\x00\x00\x01\x00\x01");
        let question_end = msg.len();
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 1]);
        assert_eq!(
            parse_a_answer(&msg, 7, question_end),
            Ok(Some(Ipv4Addr::new(10, 96, 0, 1)))
        );
        let mut nx = msg[..question_end].to_vec();
        nx[3] = 0x83;
        assert_eq!(parse_a_answer(&nx, 7, question_end), Ok(None));
        assert!(parse_a_answer(&msg, 8, question_end).is_err());
    }

    #[test]
    fn the_coredns_manifest_names_the_image_and_the_dns_address() {
        let image = ImageRef {
            repository: "127.0.0.1:5000/xpyd-e2e/coredns".into(),
            tag: "v1".into(),
        };
        let m = coredns_manifest(&image);
        assert!(
            m.contains("image: 127.0.0.1:5000/xpyd-e2e/coredns:v1"),
            "{m}"
        );
        assert!(m.contains("clusterIP: 10.96.0.10"), "{m}");
    }
}
