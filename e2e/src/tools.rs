//! The upstream binaries the harness runs, as installed by `scripts/setup`.

use std::path::PathBuf;

use xpyd_runtime::assets;

use crate::error::{HarnessError, Result};

/// Paths of the test tools. Each comes from its `XPYD_*` variable, else from
/// the env file setup writes (see [`xpyd_runtime::assets::setting`]).
#[derive(Debug, Clone)]
pub struct Tools {
    /// Folder with kube-apiserver, kube-controller-manager, kube-scheduler, kubectl.
    pub kube_bin: PathBuf,
    pub etcd: PathBuf,
    pub kwok: PathBuf,
    /// kwok's Stage objects (node initialise/heartbeat, pod ready/complete/delete).
    pub kwok_stages: PathBuf,
    pub helm: PathBuf,
    pub nats: PathBuf,
}

fn tool(var: &'static str) -> Result<PathBuf> {
    assets::existing_path("a test tool", var).map_err(|e| HarnessError::Tool(e.to_string()))
}

impl Tools {
    /// Finds every tool, or says which one is missing and how to install it.
    pub fn locate() -> Result<Tools> {
        Ok(Tools {
            kube_bin: tool("XPYD_KUBE_BIN")?,
            etcd: tool("XPYD_ETCD_BIN")?,
            kwok: tool("XPYD_KWOK_BIN")?,
            kwok_stages: tool("XPYD_KWOK_STAGES")?,
            helm: tool("XPYD_HELM_BIN")?,
            nats: tool("XPYD_NATS_BIN")?,
        })
    }

    /// `kubectl`, built at the same version as the control plane.
    pub fn kubectl(&self) -> PathBuf {
        self.kube_bin.join("kubectl")
    }

    /// `promtool` (`XPYD_PROMTOOL_BIN`), for checking and unit-testing the
    /// Prometheus rules. Looked up on demand, since only those tests need it.
    pub fn promtool(&self) -> Result<PathBuf> {
        tool("XPYD_PROMTOOL_BIN")
    }
}

/// The real node's tools (`scripts/setup node`), looked up apart from
/// [`Tools`] so that the kwok-only tests do not need them.
#[derive(Debug, Clone)]
pub struct NodeTools {
    /// Folder with kubelet and kube-proxy.
    pub kubenode_bin: PathBuf,
    /// Folder with containerd, ctr and containerd-shim-runc-v2.
    pub containerd_bin: PathBuf,
    pub runc: PathBuf,
    /// Folder with the CNI plugins (bridge, loopback, host-local, portmap).
    pub cni_bin: PathBuf,
    pub coredns: PathBuf,
    /// Traefik, the ingress controller ([`crate::RealNode::start_traefik`]).
    pub traefik: PathBuf,
    /// go-containerregistry's crane (also the local registry: `crane registry serve`).
    pub crane: PathBuf,
    /// The pod sandboxes' pause program.
    pub pause: PathBuf,
    /// A static busybox, the toolbox image's shell, wget and nslookup.
    pub busybox: PathBuf,
}

impl NodeTools {
    /// Finds every tool, or says which one is missing and how to install it.
    pub fn locate() -> Result<NodeTools> {
        let node_tool = |var: &'static str| {
            tool(var).map_err(|e| HarnessError::Tool(format!("{e} (scripts/setup node)")))
        };
        Ok(NodeTools {
            kubenode_bin: node_tool("XPYD_KUBENODE_BIN")?,
            containerd_bin: node_tool("XPYD_CONTAINERD_BIN")?,
            runc: node_tool("XPYD_RUNC_BIN")?,
            cni_bin: node_tool("XPYD_CNI_BIN")?,
            coredns: node_tool("XPYD_COREDNS_BIN")?,
            traefik: node_tool("XPYD_TRAEFIK_BIN")?,
            crane: node_tool("XPYD_CRANE_BIN")?,
            pause: node_tool("XPYD_PAUSE_BIN")?,
            busybox: node_tool("XPYD_BUSYBOX_BIN")?,
        })
    }
}
