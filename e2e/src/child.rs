//! The running test binary started again as a child process, for tests
//! whose other side must be a real, separate process (one that is killed,
//! restarted, or owns its own NIXL agent).
//!
//! The child runs only the test named as its entry (a test that does
//! nothing unless its role variable is set) and talks back through stdout
//! lines tagged `XPYD:`; everything else it prints passes through. Not a
//! server harness: servers are [`crate::process::ServerProcess`].

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, UnboundedReceiver, error::TryRecvError};

/// The tag that marks a line meant for the parent.
pub const TAG: &str = "XPYD:";

/// Why no tagged line came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoLine {
    #[error("no line within {0:?}")]
    Timeout(Duration),
    #[error("the child closed its stdout")]
    Ended,
}

/// A child copy of this test binary. Killed (SIGKILL) when dropped, so a
/// failing test leaves nothing behind.
pub struct ChildProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: UnboundedReceiver<String>,
}

impl ChildProcess {
    /// Runs this test binary again with only test `entry`, and `envs` set.
    /// Its stdin is a pipe ([`ChildProcess::stdin`]); its stderr is ours.
    pub fn spawn<'a>(
        entry: &str,
        envs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> ChildProcess {
        let mut child = Command::new(std::env::current_exe().expect("the test binary's path"))
            .args(["--exact", entry, "--nocapture", "--test-threads=1"])
            .envs(envs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the test binary starts again");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test <entry> ... " before the first
                // line of output, so the tag need not start the line.
                if let Some(at) = line.find(TAG)
                    && tx.send(line[at + TAG.len()..].to_string()).is_err()
                {
                    break;
                }
            }
        });
        ChildProcess {
            child,
            stdin,
            lines,
        }
    }

    /// The next tagged line (without the tag), waiting at most `within`.
    pub async fn line(&mut self, within: Duration) -> Result<String, NoLine> {
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(NoLine::Ended),
            Err(_) => Err(NoLine::Timeout(within)),
        }
    }

    /// [`ChildProcess::line`] for callers outside an async runtime.
    pub fn line_blocking(&mut self, within: Duration) -> Result<String, NoLine> {
        let until = Instant::now() + within;
        loop {
            match self.lines.try_recv() {
                Ok(line) => return Ok(line),
                Err(TryRecvError::Disconnected) => return Err(NoLine::Ended),
                Err(TryRecvError::Empty) if Instant::now() >= until => {
                    return Err(NoLine::Timeout(within));
                }
                Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// The child's stdin.
    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.stdin.as_mut().expect("stdin is open until `wait`")
    }

    /// SIGKILL: no destructor, no goodbye on the wire.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Closes its stdin and waits for it to exit.
    pub fn wait(&mut self) -> ExitStatus {
        drop(self.stdin.take());
        self.child.wait().expect("waiting for the child")
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
