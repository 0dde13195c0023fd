//! `xpyd-agent up` started as a user starts it, for the tests that talk to
//! it over HTTP: the real binary, a free port, its URL read from stdout, and
//! the process killed when the guard drops.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `xpyd-agent up`; killed on drop.
pub struct Up {
    child: Child,
    pub url: String,
}

impl Up {
    /// Starts `xpyd-agent up --addr 127.0.0.1:0 <extra>` and waits (at most
    /// 120 s) for the URL it prints.
    #[allow(dead_code)] // not every test binary starts it without extra env
    pub fn start(extra: &[&str]) -> Up {
        Up::start_with_env(extra, &[])
    }

    /// [`Up::start`] with extra environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, String)]) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xpyd-agent"))
            .args(["up", "--addr", "127.0.0.1:0"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("xpyd-agent starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut up = Up {
            child,
            url: String::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        up.url = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("xpyd-agent up prints its URL within 120 s");
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                break url.to_string();
            }
        };
        up
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
