//! A real NATS server with JetStream on loopback, restartable for fault tests.

use std::path::Path;
use std::time::Duration;

use crate::error::{HarnessError, Result};
use crate::process::{ServerProcess, free_port, retry_on_port_clash};
use crate::tools::Tools;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One nats-server with JetStream storage in a folder of the caller's.
#[derive(Debug)]
pub struct Nats {
    process: ServerProcess,
    port: u16,
    monitor_port: u16,
}

impl Nats {
    /// Starts nats-server (`-js`) with its store and log under `dir` and waits
    /// until its health endpoint reports JetStream ready.
    pub async fn start(tools: &Tools, dir: &Path) -> Result<Nats> {
        retry_on_port_clash(|| Self::start_once(tools, dir)).await
    }

    async fn start_once(tools: &Tools, dir: &Path) -> Result<Nats> {
        let port = free_port();
        let monitor_port = free_port();
        let store = dir.join("jetstream");
        let args = [
            "-a".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            port.to_string(),
            "-m".to_string(),
            monitor_port.to_string(),
            "-js".to_string(),
            "-sd".to_string(),
            store.display().to_string(),
            "-n".to_string(),
            "xpyd-e2e".to_string(),
        ];
        let process = ServerProcess::start(
            "nats-server",
            &tools.nats,
            args,
            std::iter::empty::<(&str, &str)>(),
            dir.join("nats.log"),
        )?;
        let mut nats = Nats {
            process,
            port,
            monitor_port,
        };
        nats.wait_ready().await?;
        Ok(nats)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let url = format!(
            "http://127.0.0.1:{}/healthz?js-enabled-only=true",
            self.monitor_port
        );
        self.process
            .wait_http_ready(&url, READY_TIMEOUT, false, |_| true)
            .await
    }

    /// The client URL, e.g. `nats://127.0.0.1:4222`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A connected client.
    pub async fn client(&self) -> Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(self.url())
            .await
            .map_err(HarnessError::other)
    }

    /// Kills the server as a crash would; JetStream data stays on disk.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same ports and store, and waits until ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.restart()?;
        self.wait_ready().await
    }

    /// The server process (for its log).
    pub fn process(&self) -> &ServerProcess {
        &self.process
    }
}
