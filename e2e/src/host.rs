//! The host a real node changes, claimed by one cluster at a time and put
//! back as it was.
//!
//! A real node is not a loopback server: kubelet, containerd and kube-proxy
//! change state that is global to the machine (nft tables, cgroups at the
//! controller roots, a bridge link, mounts, `/var/lib/kubelet`, a sysctl).
//! So only one real node runs on a host at a time: [`HostClaim`] takes an
//! exclusive lock on [`LOCK_FILE`], records what the host looked like before
//! (in [`STATE_FILE`], so that a run killed outright is cleaned up by the
//! next one or by `scripts/cluster down`), and [`sweep`] puts it back.
//!
//! The node's address is [`NODE_IP`], added to `lo` as a /32, so that nothing
//! the cluster serves is bound to a real interface and every cluster address
//! is on this machine. Not for: anything on the node itself (see
//! [`crate::RealNode`]).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{HarnessError, Result};

/// The node's address (on `lo`). The API server of a real-node control plane
/// binds it too, so pods reach it through the `kubernetes` Service.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 254, 254, 1);
/// Pod addresses; the node gets a /24 of it from the controller-manager.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// ClusterIP addresses.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's ClusterIP (the first of [`SERVICE_CIDR`]).
pub const API_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// CoreDNS' ClusterIP.
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The CNI bridge.
pub const BRIDGE: &str = "xpyd-cni0";

/// Held (flock) while a real-node cluster runs; holds the holder's pid.
pub const LOCK_FILE: &str = "/run/xpyd-e2e/real-node.lock";
/// What the host looked like before the claim, and the node folders to clean.
pub const STATE_FILE: &str = "/run/xpyd-e2e/real-node.json";

/// Folders a node may create outside its own, removed when they were absent
/// (containerd's shims put their sockets under /run/containerd/s whatever
/// its state dir).
const HOST_DIRS: [&str; 5] = [
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
];
/// cgroups kubelet and containerd make at each controller's root.
const CGROUPS: [&str; 2] = ["kubepods", "k8s.io"];
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Longer than the longest real-node test holds the host (the journey, about
/// 7 minutes on 2 loaded cores), so a second one waits its turn.
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const KILL_TIMEOUT: Duration = Duration::from_secs(15);

/// The host as it was before a claim; written to [`STATE_FILE`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct HostState {
    ip_forward: String,
    /// `family name` of each nft table that existed.
    nft_tables: BTreeSet<String>,
    /// Which of [`HOST_DIRS`] existed.
    dirs: BTreeSet<String>,
    /// Whether [`NODE_IP`] was on `lo` already.
    had_node_ip: bool,
    /// Folders of nodes started under this claim (mounts under them are
    /// undone, then they are removed).
    node_dirs: Vec<PathBuf>,
}

/// The exclusive right to run a real node on this host. Dropping it sweeps
/// the host back to the state it recorded and releases the lock.
#[derive(Debug)]
pub struct HostClaim {
    _lock: File,
    state: Mutex<HostState>,
}

impl HostClaim {
    /// Takes the lock (waiting up to [`LOCK_TIMEOUT`] for another holder), cleans
    /// up after a previous holder that died, records the host and prepares
    /// it: [`NODE_IP`] on `lo`, IPv4 forwarding on.
    pub fn acquire() -> Result<HostClaim> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(HarnessError::Tool(
                "a real node needs root (it runs kubelet, containerd and kube-proxy)".into(),
            ));
        }
        let lock = lock()?;
        // A previous holder that was killed left its state file: undo it first.
        if let Some(old) = read_state() {
            tracing::warn!("cleaning up after a real node that did not stop: {STATE_FILE}");
            sweep_state(&old);
        }
        let state = HostState {
            ip_forward: read_trimmed(IP_FORWARD),
            nft_tables: nft_tables(),
            dirs: HOST_DIRS
                .iter()
                .filter(|d| Path::new(d).exists())
                .map(|d| d.to_string())
                .collect(),
            had_node_ip: lo_has_node_ip(),
            node_dirs: Vec::new(),
        };
        write_state(&state)?;
        crate::process::run_at_exit("real-node-host", sweep_at_exit);
        let claim = HostClaim {
            _lock: lock,
            state: Mutex::new(state),
        };
        if !claim.state.lock().unwrap().had_node_ip {
            run(
                "ip",
                &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"],
            )?;
        }
        std::fs::write(IP_FORWARD, "1").map_err(HarnessError::io(format!("write {IP_FORWARD}")))?;
        Ok(claim)
    }

    /// Records a node's folder, so that a sweep undoes mounts under it.
    pub fn add_node_dir(&self, dir: &Path) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        state.node_dirs.push(dir.to_path_buf());
        write_state(&state)
    }

    /// Stops every pod and undoes what a node changed, leaving the claim (the
    /// lock, [`NODE_IP`]) in place. The node's own processes must be stopped
    /// already.
    pub fn clean_nodes(&self) {
        let state = self.state.lock().unwrap().clone();
        clean_node_state(&state);
    }
}

impl Drop for HostClaim {
    fn drop(&mut self) {
        let state = self.state.lock().unwrap().clone();
        sweep_state(&state);
        let _ = std::fs::remove_file(STATE_FILE);
    }
}

/// Undoes whatever a real node left on this host, as recorded in
/// [`STATE_FILE`], when no cluster holds the lock (`scripts/cluster down`
/// after a crash). Returns whether there was anything to undo.
pub fn sweep() -> Result<bool> {
    let _lock = lock()?;
    let Some(state) = read_state() else {
        return Ok(false);
    };
    sweep_state(&state);
    let _ = std::fs::remove_file(STATE_FILE);
    Ok(true)
}

fn sweep_at_exit() {
    // Runs at process exit when a claim was never dropped (a shared cluster
    // in a static): the lock goes with the process.
    if let Some(state) = read_state()
        && std::fs::read_to_string(LOCK_FILE)
            .is_ok_and(|pid| pid.trim() == std::process::id().to_string())
    {
        sweep_state(&state);
        let _ = std::fs::remove_file(STATE_FILE);
    }
}

fn sweep_state(state: &HostState) {
    clean_node_state(state);
    for table in nft_tables() {
        if !state.nft_tables.contains(&table) {
            let _ = run("nft", &["delete", "table", &table]);
        }
    }
    if !state.had_node_ip && lo_has_node_ip() {
        let _ = run(
            "ip",
            &["addr", "del", &format!("{NODE_IP}/32"), "dev", "lo"],
        );
    }
    if !state.ip_forward.is_empty() {
        let _ = std::fs::write(IP_FORWARD, &state.ip_forward);
    }
}

/// Kills the pods (their processes and shims), undoes mounts, and removes
/// the bridge, kube-proxy's nft tables, the cgroups and the folders.
fn clean_node_state(state: &HostState) {
    kill_pods();
    for dir in &state.node_dirs {
        unmount_under(dir);
    }
    unmount_netns();
    if link_exists(BRIDGE) {
        let _ = run("ip", &["link", "del", BRIDGE]);
    }
    for table in ["ip kube-proxy", "ip6 kube-proxy"] {
        if nft_tables().contains(table) && !state.nft_tables.contains(table) {
            let _ = run("nft", &["delete", "table", table]);
        }
    }
    remove_cgroups();
    for dir in HOST_DIRS {
        if !state.dirs.contains(dir) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    for dir in &state.node_dirs {
        // Only once nothing is mounted under it: never delete through a mount.
        if mounts_under(dir).is_empty() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// SIGKILLs every process in the pods' cgroups and every containerd shim a
/// harness node started (a shim leaves containerd's process group, so
/// killing the group does not reach it), until none is left or time runs out.
fn kill_pods() {
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let mut pids = cgroup_pids();
        pids.extend(harness_shims());
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|p| *p != std::process::id() as i32);
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                tracing::warn!(?pids, "pod processes survived SIGKILL");
            }
            return;
        }
        for pid in pids {
            // SAFETY: killing the pod processes and shims the node started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cgroup_roots() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut roots: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    // cgroup v2 has one root; v1 one per controller.
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    roots
}

fn cgroup_pids() -> Vec<i32> {
    let mut pids = Vec::new();
    for root in cgroup_roots() {
        for name in CGROUPS {
            walk_dirs(&root.join(name), &mut |dir| {
                if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            });
        }
    }
    pids
}

/// Removes the pods' cgroups, deepest first (a cgroup is removed with rmdir
/// once it has no processes and no children).
fn remove_cgroups() {
    for root in cgroup_roots() {
        for name in CGROUPS {
            let top = root.join(name);
            if !top.is_dir() {
                continue;
            }
            let mut dirs = Vec::new();
            walk_dirs(&top, &mut |d| dirs.push(d.to_path_buf()));
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

fn walk_dirs(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    visit(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&entry.path(), visit);
            }
        }
    }
}

/// Shims whose containerd socket is a harness one (its path has `xpyd` in it).
fn harness_shims() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with("containerd-shim-runc-v2"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == "-address" && w[1].contains("xpyd"));
        if is_shim && ours {
            pids.push(pid);
        }
    }
    pids
}

/// Mount points at or under `dir`, deepest first.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(n) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(n);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

fn unmount_under(dir: &Path) {
    // A lazy unmount of a parent can leave children visible for a moment:
    // go round until nothing is left or time runs out.
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let mounts = mounts_under(dir);
        if mounts.is_empty() || Instant::now() >= deadline {
            return;
        }
        for mount in mounts {
            umount(&mount);
        }
    }
}

fn umount(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path; MNT_DETACH never blocks.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Network namespaces CNI plugins or containerd mounted under /run/netns
/// (`cni-…`), in case a node ran without `netns_mounts_under_state_dir`.
fn unmount_netns() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("cni-") {
            umount(&entry.path());
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn lo_has_node_ip() -> bool {
    run("ip", &["-4", "-o", "addr", "show", "dev", "lo"])
        .is_ok_and(|out| out.contains(&format!(" {NODE_IP}/32 ")))
}

/// `family name` of every nft table (empty when nft is missing).
fn nft_tables() -> BTreeSet<String> {
    run("nft", &["list", "tables"])
        .map(|out| {
            out.lines()
                .filter_map(|l| l.strip_prefix("table "))
                .map(|t| t.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn read_state() -> Option<HostState> {
    let text = std::fs::read_to_string(STATE_FILE).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_state(state: &HostState) -> Result<()> {
    let tmp = format!("{STATE_FILE}.partial");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(state).map_err(HarnessError::other)?,
    )
    .map_err(HarnessError::io(format!("write {tmp}")))?;
    std::fs::rename(&tmp, STATE_FILE).map_err(HarnessError::io(format!("rename {tmp}")))
}

/// Opens and flocks [`LOCK_FILE`], waiting up to [`LOCK_TIMEOUT`].
fn lock() -> Result<File> {
    let dir = Path::new(LOCK_FILE)
        .parent()
        .expect("the lock file has a folder");
    std::fs::create_dir_all(dir).map_err(HarnessError::io(format!("create {}", dir.display())))?;
    let mut file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(LOCK_FILE)
        .map_err(HarnessError::io(format!("open {LOCK_FILE}")))?;
    let start = Instant::now();
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        if start.elapsed() >= LOCK_TIMEOUT {
            let holder = std::fs::read_to_string(LOCK_FILE).unwrap_or_default();
            return Err(HarnessError::Other(format!(
                "another real node holds {LOCK_FILE} (pid {}) after {}s: only one runs on a \
                 host at a time; see `scripts/cluster status`",
                holder.trim(),
                LOCK_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    file.set_len(0)
        .and_then(|_| write!(file, "{}", std::process::id()))
        .map_err(HarnessError::io(format!("write {LOCK_FILE}")))?;
    Ok(file)
}

/// Runs a short host command (`ip`, `nft`) and returns its stdout; fails
/// with its stderr, or after [`COMMAND_TIMEOUT`].
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    run_with_timeout(program, args, None, COMMAND_TIMEOUT)
}

/// Runs `program args` with `stdin` fed to it, killing it after `timeout`.
pub(crate) fn run_with_timeout(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<String> {
    run_with_env(program, args, &[], stdin, timeout)
}

/// [`run_with_timeout`] with extra environment variables.
pub(crate) fn run_with_env(
    program: &str,
    args: &[&str],
    env: &[(&str, &Path)],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<String> {
    let what = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(HarnessError::io(format!("run {what}")))?;
    // Read both pipes on threads, so a chatty command never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .map_err(HarnessError::io(format!("write to {what}")))?;
    }
    let start = Instant::now();
    let status = loop {
        match child
            .try_wait()
            .map_err(HarnessError::io(format!("wait {what}")))?
        {
            Some(status) => break status,
            None if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::Timeout {
                    what,
                    secs: start.elapsed().as_secs_f64(),
                    detail: String::new(),
                });
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(HarnessError::Other(format!(
            "{what}: {status}: {}",
            String::from_utf8_lossy(&stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// What a real node changes on the host, as text to compare before and
/// after: nft tables, links, addresses on `lo`, the pods' cgroups, mounts
/// under the harness' folders, kubelet's and containerd's folders, IPv4
/// forwarding. [`sh_line`] adds a line of one's own.
pub fn snapshot() -> Vec<String> {
    vec![
        sh_line("nft list tables"),
        sh_line("ip -o link show | cut -d: -f2"),
        sh_line("ip -o addr show dev lo"),
        sh_line("ls -d /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io 2>/dev/null"),
        sh_line("grep -c xpyd-e2e /proc/self/mountinfo"),
        sh_line(
            "ls -d /var/lib/kubelet /var/lib/cni /var/log/pods /var/log/containers /run/containerd 2>/dev/null",
        ),
        sh_line("cat /proc/sys/net/ipv4/ip_forward"),
    ]
}

/// `cmd` run by `sh`, and its stdout, as one line of a [`snapshot`].
pub fn sh_line(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("sh runs");
    format!("{cmd}: {}", String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/tmp/a\040b/c"),
            PathBuf::from("/tmp/a b/c")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn a_command_that_fails_reports_its_stderr() {
        let err = run("sh", &["-c", "echo broken >&2; exit 2"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken"), "{err}");
    }

    #[test]
    fn a_command_past_its_deadline_is_killed() {
        let err = run_with_timeout("sleep", &["30"], None, Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("timed out"), "{err}");
    }
}
