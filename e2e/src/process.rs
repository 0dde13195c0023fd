//! Server processes that never outlive the test that started them.
//!
//! Three layers make sure of it:
//! - [`ServerProcess`] kills its process group when dropped;
//! - every live process group and temporary folder is also recorded in a
//!   registry that an `atexit` handler empties, because a shared server lives
//!   in a `static` that Rust never drops (libtest exits through `exit`, which
//!   runs `atexit` handlers, also after a test panicked);
//! - each child gets `PR_SET_PDEATHSIG = SIGKILL`, so it dies even when the
//!   test process is killed outright. The signal fires when the *thread* that
//!   forked the child exits, and libtest runs each test on a thread of its own,
//!   so children are forked from one long-lived spawner thread instead.
//!
//! Output goes to a log file per server; [`ServerProcess::log_tail`] is what
//! errors show.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// How to start a server again (for restarts in fault tests).
#[derive(Debug, Clone)]
struct Spec {
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

/// A server started by the harness. Dropping it kills it.
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    spec: Spec,
    log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `program args…` with output appended to `log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        envs: impl IntoIterator<Item = (impl Into<OsString>, impl Into<OsString>)>,
        log: PathBuf,
    ) -> Result<Self> {
        if !program.is_file() {
            return Err(HarnessError::Tool(format!(
                "{name}: {} not found; run scripts/setup",
                program.display()
            )));
        }
        let spec = Spec {
            program: program.to_path_buf(),
            args: args.into_iter().map(Into::into).collect(),
            envs: envs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        };
        let mut server = ServerProcess {
            name: name.to_string(),
            spec,
            log,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(HarnessError::io(format!("open {}", self.log.display())))?;
        let err = out
            .try_clone()
            .map_err(HarnessError::io("clone log handle"))?;
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .envs(self.spec.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = spawn_from_spawner_thread(cmd).map_err(HarnessError::io(format!(
            "start {}",
            self.spec.program.display()
        )))?;
        registry().lock().unwrap().groups.push(child.id() as i32);
        self.child = Some(child);
        Ok(())
    }

    /// The server's name, as used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The file its output goes to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its log, backtrace frames left out: an
    /// error's backtrace would otherwise hide the error itself.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().filter(|l| !is_backtrace_frame(l)).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// An error about this server, with the tail of its log.
    pub fn error(&self, reason: impl Into<String>) -> HarnessError {
        HarnessError::Server {
            server: self.name.clone(),
            reason: reason.into(),
            log: self.log.clone(),
            tail: self.log_tail(40),
        }
    }

    /// `Err` (with the log tail) if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let status = match self.child.as_mut() {
            None => return Err(self.error("not running (stopped)")),
            Some(child) => child.try_wait().map_err(HarnessError::io("wait"))?,
        };
        match status {
            None => Ok(()),
            Some(status) => {
                self.forget_child();
                Err(self.error(format!("exited early with {status}")))
            }
        }
    }

    /// Polls `probe` until it says ready, failing early (with the log tail)
    /// if the process exits and after `timeout` otherwise.
    pub async fn wait_ready<F, Fut>(&mut self, timeout: Duration, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if probe().await {
                tracing::debug!(server = %self.name, secs = start.elapsed().as_secs_f64(), "ready");
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(self.error(format!(
                    "not ready after {:.0}s",
                    start.elapsed().as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `GET url` answers 2xx with a body `body_ok` accepts.
    /// `self_signed` accepts any server certificate (components generate a
    /// throwaway one).
    pub async fn wait_http_ready(
        &mut self,
        url: &str,
        timeout: Duration,
        self_signed: bool,
        body_ok: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(self_signed)
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(HarnessError::other)?;
        let body_ok = &body_ok;
        self.wait_ready(timeout, || {
            let req = http.get(url).send();
            async move {
                match req.await {
                    Ok(resp) if resp.status().is_success() => {
                        resp.text().await.is_ok_and(|body| body_ok(&body))
                    }
                    _ => false,
                }
            }
        })
        .await
    }

    /// Kills the process group at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as i32;
            // SAFETY: signalling a process group we created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            registry().lock().unwrap().groups.retain(|g| *g != pgid);
        }
    }

    /// Asks the process group to stop (SIGTERM), waits up to `grace`, then
    /// kills it.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(child) = self.child.as_mut() {
            let pgid = child.id() as i32;
            // SAFETY: signalling a process group we created.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// Starts the same command again (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop)); the log continues in the same file.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    fn forget_child(&mut self) {
        if let Some(child) = self.child.take() {
            let pgid = child.id() as i32;
            // The leader exited; its group may still have members.
            // SAFETY: signalling a process group we created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            registry().lock().unwrap().groups.retain(|g| *g != pgid);
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Process groups and folders to remove when the process exits.
#[derive(Default)]
struct Registry {
    groups: Vec<i32>,
    dirs: Vec<PathBuf>,
    hooks: Vec<(&'static str, fn())>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(cleanup_at_exit) };
        Mutex::new(Registry::default())
    })
}

/// Records a folder to delete at process exit (if its owner never drops).
pub(crate) fn remove_at_exit(dir: &Path) {
    registry().lock().unwrap().dirs.push(dir.to_path_buf());
}

/// Runs `hook` at process exit, after the process groups are killed and
/// before the folders are removed (a real node's mounts must go first).
/// A hook registered twice under one name runs once.
pub(crate) fn run_at_exit(name: &'static str, hook: fn()) {
    let mut reg = registry().lock().unwrap();
    if !reg.hooks.iter().any(|(n, _)| *n == name) {
        reg.hooks.push((name, hook));
    }
}

/// Forgets a folder its owner already removed.
pub(crate) fn forget_dir(dir: &Path) {
    registry().lock().unwrap().dirs.retain(|d| d != dir);
}

extern "C" fn cleanup_at_exit() {
    // try_lock: a thread that died holding the lock must not hang the exit.
    let Ok(reg) = registry().try_lock() else {
        return;
    };
    for pgid in &reg.groups {
        // SAFETY: signalling process groups we created.
        unsafe { libc::kill(-*pgid, libc::SIGKILL) };
    }
    for (_, hook) in &reg.hooks {
        hook();
    }
    for dir in &reg.dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Forks `cmd` from a thread that lives as long as the process, so that
/// `PR_SET_PDEATHSIG` fires only when the whole test process dies.
fn spawn_from_spawner_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("xpyd-e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the harness' spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?
}

/// Runs `start` up to three times while it fails because a port it picked
/// with [`free_port`] was taken by someone else before the server bound it
/// (test binaries run side by side, so this race is real if rare).
pub async fn retry_on_port_clash<T, F, Fut>(mut start: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match start().await {
            Err(e) if attempt < 3 && e.to_string().contains("address already in use") => {
                tracing::warn!("port clash, retrying with new ports: {e}");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A free TCP port on 127.0.0.1 for a server a test starts, from below
/// the kernel's ephemeral range and Kubernetes' NodePort range. A port from inside that range (what
/// binding port 0 gives) can be taken, between this check and the
/// server's own bind, by any outgoing connection on the host (a worker's
/// etcd or NATS client), and the server then fails to start with "address
/// already in use". A port is not handed out twice by one process; other
/// processes start their search elsewhere (by process id and time).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Below Kubernetes' NodePort range (30000-32767) too: kube-proxy
    // rewrites traffic to a NodePort on the real node's addresses.
    let ceiling = low.min(30000);
    let floor = ceiling.saturating_sub(14000).max(10000);
    if floor >= ceiling {
        return kernel_port();
    }
    let span = u32::from(ceiling - floor);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..span {
        let port = floor + ((seed.wrapping_add(i)) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    kernel_port()
}

/// A frame of a Rust backtrace: `  12: tokio::…` or `      at src/…`.
fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    let indented = t.len() < line.len();
    let numbered = t
        .split_once(": ")
        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    indented && (numbered || t.starts_with("at "))
}

/// A port the kernel picks (from its ephemeral range), then released.
fn kernel_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_tail_leaves_backtrace_frames_out() {
        let log = "Error: binding 127.0.0.1:8000\n\nCaused by:\n    Address already in use (os error 98)\n\
                   \nStack backtrace:\n   0: anyhow::error::new\n             at /src/error.rs:5:9\n  12: main\n";
        let kept: Vec<&str> = log.lines().filter(|l| !is_backtrace_frame(l)).collect();
        assert_eq!(
            kept,
            [
                "Error: binding 127.0.0.1:8000",
                "",
                "Caused by:",
                "    Address already in use (os error 98)",
                "",
                "Stack backtrace:"
            ]
        );
    }

    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let ports: std::collections::BTreeSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50, "{ports:?}");
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        assert!(
            ports.iter().all(|p| *p < low.min(30000)),
            "{ports:?} (ephemeral from {low}, NodePorts from 30000)"
        );
    }

    fn sleeper(dir: &Path) -> ServerProcess {
        ServerProcess::start(
            "sleeper",
            Path::new("/bin/sh"),
            ["-c", "echo started; sleep 600"],
            std::iter::empty::<(&str, &str)>(),
            dir.join("sleeper.log"),
        )
        .unwrap()
    }

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::kill(pid as i32, 0) == 0 }
    }

    #[tokio::test]
    async fn dropping_a_server_kills_its_whole_group() {
        let dir = crate::Workdir::new("process-drop").unwrap();
        let mut server = sleeper(dir.path());
        server
            .wait_ready(Duration::from_secs(5), || {
                let log = server_log(dir.path());
                async move { log.contains("started") }
            })
            .await
            .unwrap();
        let pid = server.pid().unwrap();
        assert!(alive(pid));
        drop(server);
        assert!(!alive(pid), "process {pid} survived its owner");
    }

    fn server_log(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("sleeper.log")).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_server_that_exits_early_is_reported_with_its_log() {
        let dir = crate::Workdir::new("process-exit").unwrap();
        let mut server = ServerProcess::start(
            "quitter",
            Path::new("/bin/sh"),
            ["-c", "echo 'bad flag --frobnicate'; exit 3"],
            std::iter::empty::<(&str, &str)>(),
            dir.path().join("quitter.log"),
        )
        .unwrap();
        let err = server
            .wait_ready(Duration::from_secs(10), || async { false })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("quitter"), "{err}");
        assert!(err.contains("exited early"), "{err}");
        assert!(err.contains("bad flag --frobnicate"), "{err}");
    }

    #[test]
    fn a_missing_binary_names_setup() {
        let err = ServerProcess::start(
            "ghost",
            Path::new("/nonexistent/ghost"),
            Vec::<String>::new(),
            std::iter::empty::<(&str, &str)>(),
            PathBuf::from("/tmp/ghost.log"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/ghost"), "{err}");
        assert!(err.contains("scripts/setup"), "{err}");
    }

    #[tokio::test]
    async fn a_port_clash_is_retried_with_new_ports_but_other_errors_are_not() {
        let dir = crate::Workdir::new("process-clash").unwrap();
        let mut tries = 0;
        let started = retry_on_port_clash(|| {
            tries += 1;
            let clash = tries == 1;
            let dir = dir.path().to_path_buf();
            async move {
                let script = if clash {
                    "echo 'listen tcp 127.0.0.1:1: bind: address already in use'; exit 1"
                } else {
                    "echo started; sleep 600"
                };
                let mut server = ServerProcess::start(
                    "clasher",
                    Path::new("/bin/sh"),
                    ["-c", script],
                    std::iter::empty::<(&str, &str)>(),
                    dir.join(format!("clash-{clash}.log")),
                )?;
                let log = dir.join(format!("clash-{clash}.log"));
                server
                    .wait_ready(Duration::from_secs(10), || {
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        async move { text.contains("started") }
                    })
                    .await?;
                Ok(server)
            }
        })
        .await
        .unwrap();
        assert_eq!(tries, 2);
        drop(started);

        let mut tries = 0;
        let err = retry_on_port_clash(|| {
            tries += 1;
            async { Err::<(), _>(HarnessError::Other("some other failure".into())) }
        })
        .await
        .unwrap_err();
        assert_eq!(tries, 1, "{err}");
    }

    #[tokio::test]
    async fn restart_runs_the_same_command_again() {
        let dir = crate::Workdir::new("process-restart").unwrap();
        let mut server = sleeper(dir.path());
        let first = server.pid().unwrap();
        server.restart().unwrap();
        let second = server.pid().unwrap();
        assert_ne!(first, second);
        assert!(!alive(first));
        assert!(alive(second));
        server.check_running().unwrap();
    }
}
