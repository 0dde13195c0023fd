//! A real etcd server on loopback, restartable for fault tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{HarnessError, Result};
use crate::process::{ServerProcess, free_port, retry_on_port_clash};
use crate::tools::Tools;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One etcd member with its data in a folder of the caller's.
#[derive(Debug)]
pub struct Etcd {
    process: ServerProcess,
    client_port: u16,
    data_dir: PathBuf,
}

impl Etcd {
    /// Starts etcd with its data and log under `dir` and waits until it
    /// answers `/health`.
    pub async fn start(tools: &Tools, dir: &Path) -> Result<Etcd> {
        retry_on_port_clash(|| Self::start_once(tools, dir)).await
    }

    async fn start_once(tools: &Tools, dir: &Path) -> Result<Etcd> {
        let client_port = free_port();
        let peer_port = free_port();
        let data_dir = dir.join("etcd-data");
        // A new member: its data must not name the peer URL of an earlier try.
        let _ = std::fs::remove_dir_all(&data_dir);
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let args = [
            "--name=xpyd-e2e".to_string(),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=xpyd-e2e={peer}"),
            // Test data need not survive a power cut; fsync dominates otherwise.
            "--unsafe-no-fsync".to_string(),
            "--log-level=warn".to_string(),
        ];
        let process = ServerProcess::start(
            "etcd",
            &tools.etcd,
            args,
            std::iter::empty::<(&str, &str)>(),
            dir.join("etcd.log"),
        )?;
        let mut etcd = Etcd {
            process,
            client_port,
            data_dir,
        };
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/health", self.endpoint());
        self.process
            .wait_http_ready(&url, READY_TIMEOUT, false, |body| {
                body.contains("\"health\":\"true\"")
            })
            .await
    }

    /// The client URL, e.g. `http://127.0.0.1:2379`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A connected client.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        etcd_client::Client::connect([self.endpoint()], Some(opts))
            .await
            .map_err(HarnessError::other)
    }

    /// Kills etcd as a crash would; its data stays for [`restart`](Self::restart).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts etcd again on the same port and data, and waits until ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.restart()?;
        self.wait_ready().await
    }

    /// Where etcd keeps its data.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server process (for its log).
    pub fn process(&self) -> &ServerProcess {
        &self.process
    }
}
