//! Which transport UCX moves KV over between two agents — shared memory,
//! RDMA or TCP — *inferred*, not read from UCX.
//!
//! NIXL does not expose the lanes UCX picked for an endpoint, and UCX
//! names them only in debug logs. What decides UCX's choice is known to
//! both ends, though: the transports `UCX_TLS` allows in each process, and
//! whether shared memory or RDMA can reach the peer at all. Each agent
//! publishes that as an [`Endpoint`] inside its [`super::PeerInfo`], and
//! [`infer`] applies UCX's preference (shared memory, then RDMA, then
//! TCP) to the two. Every place that shows the result says "inferred".
//!
//! Shared memory needs the same kernel (UCX compares the boot id, its
//! "system id") and the same IPC and PID namespaces (its posix/sysv
//! segments and CMA's `process_vm_readv` work only there): processes of
//! one `xpyd-agent up` share all three, two pods never do. RDMA needs an
//! RDMA device (`/sys/class/infiniband`) on both ends.

use serde::{Deserialize, Serialize};

/// What UCX's choice of transport depends on, for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Endpoint {
    /// The kernel's boot id and this process's IPC and PID namespaces:
    /// two agents with equal values can reach each other by shared memory.
    pub system: String,
    /// `UCX_TLS` as the agent's UCX read it; empty when unset (every
    /// transport allowed).
    #[serde(default)]
    pub ucx_tls: String,
    /// RDMA devices this process sees.
    #[serde(default)]
    pub rdma_devices: Vec<String>,
}

impl Endpoint {
    /// This process, now: read when an agent's UCX backend is created,
    /// which is when UCX reads `UCX_TLS`.
    pub fn local() -> Endpoint {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let link = |path: &str| {
            std::fs::read_link(path)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut rdma_devices: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        rdma_devices.sort();
        Endpoint {
            system: format!(
                "{} {} {}",
                read("/proc/sys/kernel/random/boot_id").trim(),
                link("/proc/self/ns/ipc"),
                link("/proc/self/ns/pid"),
            ),
            ucx_tls: std::env::var("UCX_TLS").unwrap_or_default(),
            rdma_devices,
        }
    }
}

/// A transport class UCX may use between two agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    SharedMemory,
    Rdma,
    Tcp,
    /// No transport both ends allow reaches the peer: every write fails.
    None,
}

impl Transport {
    /// Every value, for metric labels.
    pub const ALL: [Transport; 4] = [
        Transport::SharedMemory,
        Transport::Rdma,
        Transport::Tcp,
        Transport::None,
    ];

    /// The metric label and status key: `shared_memory`, `rdma`, `tcp`,
    /// `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::SharedMemory => "shared_memory",
            Transport::Rdma => "rdma",
            Transport::Tcp => "tcp",
            Transport::None => "none",
        }
    }
}

/// `UCX_TLS` names (and aliases) per class; `cuda_*`, `rocm_*` and
/// `self` move no bytes between two processes' host memory.
const SHM_NAMES: &[&str] = &["sm", "shm", "posix", "sysv", "cma", "knem", "xpmem", "mm"];
const RDMA_NAMES: &[&str] = &[
    "ib", "rc", "rc_v", "rc_x", "rc_verbs", "rc_mlx5", "ud", "ud_v", "ud_x", "ud_verbs", "ud_mlx5",
    "dc", "dc_x", "dc_mlx5", "gga", "srd",
];
const TCP_NAMES: &[&str] = &["tcp"];

/// Whether `ucx_tls` lets UCX use a transport called one of `names`:
/// empty or `all` allows everything; a leading `^` makes the list an
/// exclusion list. A trailing `:aux` qualifier is ignored.
fn allows(ucx_tls: &str, names: &[&str]) -> bool {
    let tls = ucx_tls.trim();
    let (exclude, list) = match tls.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, tls),
    };
    let listed: Vec<&str> = list
        .split(',')
        .map(|t| t.trim().split(':').next().unwrap_or("").trim())
        .filter(|t| !t.is_empty())
        .collect();
    if listed.is_empty() {
        return true;
    }
    if !exclude && listed.iter().any(|t| t.eq_ignore_ascii_case("all")) {
        return true;
    }
    let named = listed
        .iter()
        .any(|t| names.iter().any(|n| t.eq_ignore_ascii_case(n)));
    named != exclude
}

/// The transport UCX is expected to use when `local` writes to `peer`
/// (or the reverse: the choice is symmetric): the first of shared memory,
/// RDMA and TCP that both ends allow and that can reach the peer.
pub fn infer(local: &Endpoint, peer: &Endpoint) -> Transport {
    let both = |names: &[&str]| allows(&local.ucx_tls, names) && allows(&peer.ucx_tls, names);
    if both(SHM_NAMES) && !local.system.is_empty() && local.system == peer.system {
        Transport::SharedMemory
    } else if both(RDMA_NAMES) && !local.rdma_devices.is_empty() && !peer.rdma_devices.is_empty() {
        Transport::Rdma
    } else if both(TCP_NAMES) {
        Transport::Tcp
    } else {
        Transport::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(system: &str, tls: &str, rdma: &[&str]) -> Endpoint {
        Endpoint {
            system: system.into(),
            ucx_tls: tls.into(),
            rdma_devices: rdma.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_transport_is_inferred_from_both_ends() {
        use Transport::*;
        let cases = [
            // (local, peer, expected, why)
            (
                ep("a", "", &[]),
                ep("a", "", &[]),
                SharedMemory,
                "one up: same kernel and namespaces",
            ),
            (ep("a", "", &[]), ep("b", "", &[]), Tcp, "two pods, no RDMA"),
            (
                ep("a", "tcp", &[]),
                ep("a", "", &[]),
                Tcp,
                "UCX_TLS=tcp on one end",
            ),
            (
                ep("a", "all", &[]),
                ep("a", "ALL", &[]),
                SharedMemory,
                "all",
            ),
            (
                ep("a", "^sm", &[]),
                ep("a", "", &[]),
                Tcp,
                "shared memory excluded",
            ),
            (
                ep("a", "^tcp", &[]),
                ep("b", "", &[]),
                None,
                "only TCP reaches, and it is excluded",
            ),
            (
                ep("a", "", &["mlx5_0"]),
                ep("b", "", &["mlx5_1"]),
                Rdma,
                "RDMA on both hosts",
            ),
            (
                ep("a", "", &["mlx5_0"]),
                ep("b", "", &[]),
                Tcp,
                "RDMA on one end only",
            ),
            (
                ep("a", "rc,tcp", &["mlx5_0"]),
                ep("b", "rc_x,sm", &["mlx5_0"]),
                Rdma,
                "rc both",
            ),
            (
                ep("a", "rc,tcp", &["mlx5_0"]),
                ep("a", "", &["mlx5_0"]),
                Rdma,
                "no sm on one end",
            ),
            (
                ep("a", "sm,self", &[]),
                ep("b", "sm,self", &[]),
                None,
                "shm only, two hosts",
            ),
            (
                ep("a", "posix,cma", &[]),
                ep("a", "sysv", &[]),
                SharedMemory,
                "any shm name",
            ),
            (
                ep("a", "tcp:aux,sm", &[]),
                ep("b", "", &[]),
                Tcp,
                "a qualifier is ignored",
            ),
            (
                ep("", "", &[]),
                ep("", "", &[]),
                Tcp,
                "unknown systems are not assumed equal",
            ),
            (
                ep("a", "cuda_copy,tcp", &[]),
                ep("a", "", &[]),
                Tcp,
                "GPU copies move no host bytes",
            ),
        ];
        for (local, peer, want, why) in cases {
            assert_eq!(infer(&local, &peer), want, "{why}: {local:?} -> {peer:?}");
            assert_eq!(infer(&peer, &local), want, "{why}, reversed");
        }
    }

    #[test]
    fn this_process_is_an_endpoint_with_a_system_id() {
        let here = Endpoint::local();
        let boot_id = here.system.split(' ').next().unwrap_or("");
        assert_eq!(boot_id.len(), 36, "a boot id: {here:?}");
        assert!(
            here.system.contains("ipc:[") && here.system.contains("pid:["),
            "{here:?}"
        );
        assert_eq!(Endpoint::local(), here, "stable within a process");
    }

    #[test]
    fn old_peers_without_the_new_fields_still_parse() {
        let old: Endpoint = serde_json::from_str(r#"{"system":"x"}"#).unwrap();
        assert_eq!(old.ucx_tls, "");
        assert!(old.rdma_devices.is_empty());
    }
}
