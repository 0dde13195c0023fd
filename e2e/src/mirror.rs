//! A model mirror: a small HTTP/1.1 file server that stands in for a model
//! host or the Hugging Face hub in tests, serving real files from disk.
//!
//! It honours `Range` (206 with `Content-Range`, 416 past the end), can
//! demand a bearer token (401 without it), answers 404 for unknown paths,
//! and injects the faults a download must survive: a connection cut after
//! some bytes, or a server that stops sending (a stall). It counts the
//! requests and body bytes it sent, so a test can show that a download
//! resumed rather than restarted. Bind it to a host address a pod can reach
//! to serve a real node. Not a general web server: one request per
//! connection (`Connection: close`), GET and HEAD only.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use xpyd_runtime::sync::lock;

use crate::error::{HarnessError, Result};

/// A fault the mirror injects into the body of the next requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection after this many body bytes.
    CutAfter(u64),
    /// Send this many body bytes, then nothing more (the connection stays open).
    StallAfter(u64),
}

/// The path the hub's resolve layout gives `hf://<repo>@<revision>/<file>`.
pub fn hf_path(repo: &str, revision: &str, file: &str) -> String {
    format!("/{repo}/resolve/{revision}/{file}")
}

#[derive(Default)]
struct State {
    files: Mutex<HashMap<String, PathBuf>>,
    token: Mutex<Option<String>>,
    /// (fault, how many more requests get it)
    fault: Mutex<Option<(Fault, u32)>>,
    requests: AtomicU32,
    range_requests: AtomicU32,
    bytes_sent: AtomicU64,
    /// Delay before each request's headers are answered.
    delay_ms: AtomicU64,
}

/// A running mirror; stops when dropped.
pub struct ModelMirror {
    addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

impl ModelMirror {
    /// Starts a mirror on `bind` (port 0 picks a free one).
    pub async fn start(bind: SocketAddr) -> Result<ModelMirror> {
        let listener = TcpListener::bind(bind)
            .await
            .map_err(HarnessError::io(format!(
                "binding the model mirror on {bind}"
            )))?;
        let addr = listener
            .local_addr()
            .map_err(HarnessError::io("model mirror address"))?;
        let state = Arc::new(State::default());
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, state.clone(), stopped));
        Ok(ModelMirror { addr, state, stop })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// Serves `file` at `path`.
    pub fn serve_file(&self, path: &str, file: impl Into<PathBuf>) {
        lock(&self.state.files).insert(path.to_string(), file.into());
    }

    /// Demands `Authorization: Bearer <token>` from now on (`None`: no longer).
    pub fn require_token(&self, token: Option<&str>) {
        *lock(&self.state.token) = token.map(str::to_string);
    }

    /// Injects `fault` into the next `requests` requests.
    pub fn inject(&self, fault: Fault, requests: u32) {
        *lock(&self.state.fault) = Some((fault, requests));
    }

    /// Waits this long before answering each request (to line fetchers up).
    pub fn delay_responses(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Requests answered so far (any status).
    pub fn requests(&self) -> u32 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Requests that carried a `Range` header.
    pub fn range_requests(&self) -> u32 {
        self.state.range_requests.load(Ordering::Relaxed)
    }

    /// Body bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.state.bytes_sent.load(Ordering::Relaxed)
    }
}

impl Drop for ModelMirror {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, stop: watch::Receiver<bool>) {
    let mut stopped = stop.clone();
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => {}
                        _ = answer(stream, &state) => {}
                    }
                });
            }
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

async fn read_request(stream: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.split('?').next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_line(&mut h))
            .await
            .ok()?
            .ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some(Request {
        method,
        path,
        headers,
    })
}

async fn respond(stream: &mut BufReader<TcpStream>, status: &str, headers: &[(String, String)]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.get_mut().write_all(head.as_bytes()).await;
}

async fn answer(stream: TcpStream, state: &State) {
    let mut stream = BufReader::new(stream);
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    state.requests.fetch_add(1, Ordering::Relaxed);
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let text = |s: &str| {
        vec![
            ("Content-Type".to_string(), "text/plain".to_string()),
            ("Content-Length".to_string(), s.len().to_string()),
        ]
    };
    let token = lock(&state.token).clone();
    if let Some(token) = token {
        let sent = request.headers.get("authorization");
        if sent.map(String::as_str) != Some(&format!("Bearer {token}")) {
            let body = "401: a valid bearer token is required\n";
            respond(&mut stream, "401 Unauthorized", &text(body)).await;
            let _ = stream.get_mut().write_all(body.as_bytes()).await;
            return;
        }
    }
    let file = lock(&state.files).get(&request.path).cloned();
    let Some(file) = file else {
        let body = "404: no such file\n";
        respond(&mut stream, "404 Not Found", &text(body)).await;
        let _ = stream.get_mut().write_all(body.as_bytes()).await;
        return;
    };
    let Ok(mut f) = tokio::fs::File::open(&file).await else {
        respond(&mut stream, "500 Internal Server Error", &text("")).await;
        return;
    };
    let size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let range = request.headers.get("range").and_then(|r| {
        let spec = r.strip_prefix("bytes=")?;
        let (a, b) = spec.split_once('-')?;
        let start: u64 = a.parse().ok()?;
        let end: u64 = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse().ok()?
        };
        Some((start, end.min(size.saturating_sub(1))))
    });
    let mut headers = vec![
        (
            "Content-Type".to_string(),
            "application/octet-stream".to_string(),
        ),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    let (status, start, len) = match range {
        Some((start, _)) if start >= size => {
            state.range_requests.fetch_add(1, Ordering::Relaxed);
            headers.push(("Content-Range".to_string(), format!("bytes */{size}")));
            headers.push(("Content-Length".to_string(), "0".to_string()));
            respond(&mut stream, "416 Range Not Satisfiable", &headers).await;
            return;
        }
        Some((start, end)) => {
            state.range_requests.fetch_add(1, Ordering::Relaxed);
            headers.push((
                "Content-Range".to_string(),
                format!("bytes {start}-{end}/{size}"),
            ));
            ("206 Partial Content", start, end + 1 - start)
        }
        None => ("200 OK", 0, size),
    };
    headers.push(("Content-Length".to_string(), len.to_string()));
    respond(&mut stream, status, &headers).await;
    if request.method == "HEAD" {
        return;
    }
    let fault = {
        let mut slot = lock(&state.fault);
        match slot.as_mut() {
            Some((fault, left)) if *left > 0 => {
                *left -= 1;
                Some(*fault)
            }
            _ => None,
        }
    };
    let limit = match fault {
        Some(Fault::CutAfter(n)) | Some(Fault::StallAfter(n)) => n.min(len),
        None => len,
    };
    if f.seek(SeekFrom::Start(start)).await.is_err() {
        return;
    }
    let mut left = limit;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let Ok(n) = f.read(&mut buf[..want]).await else {
            return;
        };
        if n == 0 {
            break;
        }
        if stream.get_mut().write_all(&buf[..n]).await.is_err() {
            return;
        }
        state.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    let _ = stream.get_mut().flush().await;
    if let Some(Fault::StallAfter(_)) = fault {
        // Hold the connection open, sending nothing, until the client
        // gives up or the mirror stops.
        std::future::pending::<()>().await;
    }
}
