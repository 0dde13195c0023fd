//! Downloading a model file into the model cache, once and safely.
//!
//! - The file lands at `<cache>/<16 hex of sha256(url)>/<name>` and is
//!   written as `<name>.partial`, renamed only after its size and sha256
//!   check out (`<name>.sha256` records the digest, so a later start trusts
//!   the file without hashing it again).
//! - A partial file is resumed with an HTTP `Range` request; a server that
//!   ignores ranges gets the file from the start.
//! - Fetchers sharing a cache (pods on one `ReadWriteMany` claim, or three
//!   processes on one host) serialize on `<name>.lock` (`flock`): one
//!   downloads, the others wait (within the deadline) and then find the file.
//! - Transient failures (connect errors, 5xx, a cut connection, a stalled
//!   server) are retried with exponential backoff; 401/403/404, a checksum
//!   mismatch and a full disk are not. Every wait has a deadline: a read
//!   deadline per chunk and one for the whole fetch.
//! - Progress (bytes, total, rate, ETA) is logged every few seconds. Tokens
//!   and query strings never reach a log line or an error message.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, RANGE};
use sha2::{Digest, Sha256};

use super::{redact, url_file_name};
use crate::assets::sha256_hex;

/// How one fetch behaves.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// The model cache folder.
    pub cache_dir: PathBuf,
    /// Expected sha256 (lowercase hex); `None` trusts the size alone.
    pub sha256: Option<String>,
    /// Sent as `Authorization: Bearer …` (only to the first host: redirects
    /// to another host drop it).
    pub bearer_token: Option<String>,
    /// The whole fetch, waiting on another fetcher included.
    pub deadline: Duration,
    /// A server that sends nothing for this long is stalled.
    pub read_timeout: Duration,
    /// Connecting to the server.
    pub connect_timeout: Duration,
    /// Attempts before a transient failure is final.
    pub max_attempts: u32,
    /// First backoff; doubles per attempt up to 30 s.
    pub initial_backoff: Duration,
    /// How often progress is logged.
    pub progress_every: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            cache_dir: PathBuf::from(super::POD_MODEL_CACHE),
            sha256: None,
            bearer_token: None,
            deadline: Duration::from_secs(3600),
            read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_attempts: 8,
            initial_backoff: Duration::from_secs(1),
            progress_every: Duration::from_secs(5),
        }
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);
const LOCK_POLL: Duration = Duration::from_millis(250);

/// What a fetch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// The file was already in the cache: nothing was downloaded.
    pub cached: bool,
    /// Another fetcher held the lock first and this one waited for it.
    pub waited_for_lock: bool,
    /// Bytes received over the network by this fetch.
    pub bytes_downloaded: u64,
    /// Size of the partial file the first request resumed from (0: fresh).
    pub resumed_from: u64,
    /// HTTP requests made.
    pub attempts: u32,
    /// The file's size.
    pub size: u64,
    /// The file's sha256.
    pub sha256: String,
}

/// A file in the cache.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// Where it is.
    pub path: PathBuf,
    /// How it got there.
    pub report: FetchReport,
}

/// Why a download failed. Each names the URL (redacted) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// 401 or 403.
    #[error(
        "{url}: HTTP {status}: access denied; the token (HF_TOKEN, from spec.model.hfTokenSecret) is missing, wrong, or cannot read this file"
    )]
    Unauthorized { url: String, status: u16 },
    /// 404.
    #[error(
        "{url}: HTTP 404 Not Found: no such file (check the repository, revision and file name)"
    )]
    NotFound { url: String },
    /// Another status, after retries when it was transient.
    #[error("{url}: HTTP {status} after {attempts} attempt(s)")]
    Status {
        url: String,
        status: u16,
        attempts: u32,
    },
    /// The digest is not the expected one; the file was deleted.
    #[error("{url}: sha256 mismatch: expected {want}, got {got}; the downloaded file was deleted")]
    Checksum {
        url: String,
        want: String,
        got: String,
    },
    /// No space left on the cache's filesystem.
    #[error("{url}: disk full writing {path}: make the model cache larger (spec.model.cache)")]
    DiskFull { url: String, path: PathBuf },
    /// The server stopped sending.
    #[error(
        "{url}: the server sent nothing for {secs} s (read deadline), after {attempts} attempt(s)"
    )]
    Stalled {
        url: String,
        secs: u64,
        attempts: u32,
    },
    /// Connecting or the transfer failed, after retries.
    #[error("{url}: {cause} (after {attempts} attempt(s))")]
    Transport {
        url: String,
        cause: String,
        attempts: u32,
    },
    /// The whole fetch took longer than its deadline.
    #[error(
        "{url}: not done within the {secs} s fetch deadline (XPYD_MODEL_FETCH_TIMEOUT_SECONDS){detail}"
    )]
    Deadline {
        url: String,
        secs: u64,
        detail: String,
    },
    /// A file in the cache could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One attempt's failure: final, or worth another try.
enum Attempt {
    Final(FetchError),
    Retry(Retryable),
}

enum Retryable {
    Status(u16),
    Stalled,
    Transport(String),
}

/// The cache file of `url`.
pub fn cache_path(cache_dir: &Path, url: &str) -> PathBuf {
    let digest = Sha256::digest(url.as_bytes());
    let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    cache_dir.join(key).join(url_file_name(url))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Downloads `url` into the cache (or finds it there) and returns the file.
pub async fn fetch(url: &str, options: &FetchOptions) -> Result<Fetched, FetchError> {
    let shown = redact(url);
    let started = Instant::now();
    let deadline = started + options.deadline;
    match tokio::time::timeout(
        options.deadline,
        fetch_locked(url, &shown, options, deadline),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(FetchError::Deadline {
            url: shown,
            secs: options.deadline.as_secs(),
            detail: String::new(),
        }),
    }
}

async fn fetch_locked(
    url: &str,
    shown: &str,
    options: &FetchOptions,
    deadline: Instant,
) -> Result<Fetched, FetchError> {
    let dest = cache_path(&options.cache_dir, url);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    let dir = dest.parent().unwrap_or(&options.cache_dir).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let mut report = FetchReport::default();

    // Fast path: a file a finished fetch left, with its digest recorded.
    if let Some(found) = cached(&dest, options)? {
        report.cached = true;
        report.size = found.1;
        report.sha256 = found.0;
        return Ok(Fetched { path: dest, report });
    }

    let lock_path = sibling(&dest, ".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    let mut announced = false;
    loop {
        // SAFETY: flock on a file descriptor we own; released when `lock`
        // is dropped (or the process dies).
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(FetchError::Io {
                path: lock_path,
                source: err,
            });
        }
        if !announced {
            tracing::info!(url = %shown, lock = %lock_path.display(), "another fetcher is downloading this model; waiting for it");
            announced = true;
            report.waited_for_lock = true;
        }
        if Instant::now() + LOCK_POLL > deadline {
            return Err(FetchError::Deadline {
                url: shown.to_string(),
                secs: options.deadline.as_secs(),
                detail: format!(
                    " while waiting for another fetcher's lock {}",
                    lock_path.display()
                ),
            });
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
    // The holder before us may have finished the job.
    if let Some(found) = cached(&dest, options)? {
        report.cached = true;
        report.size = found.1;
        report.sha256 = found.0;
        return Ok(Fetched { path: dest, report });
    }

    let partial = sibling(&dest, ".partial");
    let client = reqwest::Client::builder()
        .connect_timeout(options.connect_timeout)
        .user_agent(concat!("xpyd-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| FetchError::Transport {
            url: shown.to_string(),
            cause: format!("cannot build the HTTP client: {e}"),
            attempts: 0,
        })?;
    let mut backoff = options.initial_backoff;
    loop {
        report.attempts += 1;
        match attempt(&client, url, shown, options, &partial, &mut report).await {
            Ok(()) => break,
            Err(Attempt::Final(e)) => return Err(e),
            Err(Attempt::Retry(why)) => {
                let attempts = report.attempts;
                let final_error = || match &why {
                    Retryable::Status(status) => FetchError::Status {
                        url: shown.to_string(),
                        status: *status,
                        attempts,
                    },
                    Retryable::Stalled => FetchError::Stalled {
                        url: shown.to_string(),
                        secs: options.read_timeout.as_secs(),
                        attempts,
                    },
                    Retryable::Transport(cause) => FetchError::Transport {
                        url: shown.to_string(),
                        cause: cause.clone(),
                        attempts,
                    },
                };
                if attempts >= options.max_attempts || Instant::now() + backoff > deadline {
                    return Err(final_error());
                }
                tracing::warn!(url = %shown, attempt = attempts, retry_in_ms = backoff.as_millis() as u64, "model download failed: {}; retrying", final_error());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    let size = std::fs::metadata(&partial).map_err(io(&partial))?.len();
    let hashed = partial.clone();
    let got = tokio::task::spawn_blocking(move || sha256_hex(&hashed))
        .await
        .map_err(|e| FetchError::Io {
            path: partial.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(io(&partial))?;
    if let Some(want) = &options.sha256
        && &got != want
    {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Checksum {
            url: shown.to_string(),
            want: want.clone(),
            got,
        });
    }
    let marker = sibling(&dest, ".sha256");
    std::fs::write(&marker, &got).map_err(io(&marker))?;
    std::fs::rename(&partial, &dest).map_err(io(&dest))?;
    tracing::info!(url = %shown, path = %dest.display(), bytes = size, sha256 = %got, "model downloaded");
    report.size = size;
    report.sha256 = got;
    drop(lock);
    Ok(Fetched { path: dest, report })
}

/// `(sha256, size)` of `dest` when it is complete and, if a digest is
/// expected, the right one.
fn cached(dest: &Path, options: &FetchOptions) -> Result<Option<(String, u64)>, FetchError> {
    let Ok(meta) = std::fs::metadata(dest) else {
        return Ok(None);
    };
    let marker = sibling(dest, ".sha256");
    let recorded = match std::fs::read_to_string(&marker) {
        Ok(s) => s.trim().to_string(),
        // A file someone put there by hand: hash it once.
        Err(_) => {
            let got = sha256_hex(dest).map_err(|source| FetchError::Io {
                path: dest.to_path_buf(),
                source,
            })?;
            std::fs::write(&marker, &got).map_err(|source| FetchError::Io {
                path: marker.clone(),
                source,
            })?;
            got
        }
    };
    match &options.sha256 {
        Some(want) if *want != recorded => {
            // The cache holds another version of this URL: download again.
            tracing::warn!(path = %dest.display(), cached = %recorded, want = %want, "cached model has another sha256; downloading it again");
            let _ = std::fs::remove_file(dest);
            let _ = std::fs::remove_file(&marker);
            Ok(None)
        }
        _ => Ok(Some((recorded, meta.len()))),
    }
}

/// One HTTP request, resuming `partial`.
async fn attempt(
    client: &reqwest::Client,
    url: &str,
    shown: &str,
    options: &FetchOptions,
    partial: &Path,
    report: &mut FetchReport,
) -> Result<(), Attempt> {
    let io = |source: std::io::Error| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            Attempt::Final(FetchError::DiskFull {
                url: shown.to_string(),
                path: partial.to_path_buf(),
            })
        } else {
            Attempt::Final(FetchError::Io {
                path: partial.to_path_buf(),
                source,
            })
        }
    };
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    if report.attempts == 1 {
        report.resumed_from = have;
    }
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(RANGE, format!("bytes={have}-"));
    }
    if let Some(token) = &options.bearer_token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let mut response = match tokio::time::timeout(options.read_timeout, request.send()).await {
        Err(_) => return Err(Attempt::Retry(Retryable::Stalled)),
        Ok(Err(e)) => return Err(Attempt::Retry(Retryable::Transport(transport_cause(&e)))),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let (start, total) = match status {
        StatusCode::PARTIAL_CONTENT => {
            let (start, total) = content_range(&response).unwrap_or((have, None));
            if start != have {
                // Not the range we asked for: start over.
                std::fs::remove_file(partial).map_err(io)?;
                return Err(Attempt::Retry(Retryable::Transport(format!(
                    "the server answered range {start}- to a request for {have}-"
                ))));
            }
            (start, total)
        }
        StatusCode::OK => {
            if have > 0 {
                tracing::info!(url = %shown, "the server ignores Range requests; downloading from the start");
            }
            (0, response.content_length())
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // Asked past the end: the partial file is complete, or stale.
            let total = content_range(&response).and_then(|(_, t)| t);
            if total == Some(have) {
                return Ok(());
            }
            std::fs::remove_file(partial).map_err(io)?;
            return Err(Attempt::Retry(Retryable::Status(416)));
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(Attempt::Final(FetchError::Unauthorized {
                url: shown.to_string(),
                status: status.as_u16(),
            }));
        }
        StatusCode::NOT_FOUND => {
            return Err(Attempt::Final(FetchError::NotFound {
                url: shown.to_string(),
            }));
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            return Err(Attempt::Retry(Retryable::Status(s.as_u16())));
        }
        s => {
            return Err(Attempt::Final(FetchError::Status {
                url: shown.to_string(),
                status: s.as_u16(),
                attempts: report.attempts,
            }));
        }
    };

    let mut file = File::options()
        .create(true)
        .append(true)
        .open(partial)
        .map_err(io)?;
    if start == 0 {
        file.set_len(0).map_err(io)?;
    }
    let mut written = start;
    let began = Instant::now();
    let mut last_log = began;
    let mut this_attempt = 0u64;
    loop {
        let chunk = match tokio::time::timeout(options.read_timeout, response.chunk()).await {
            Err(_) => return Err(Attempt::Retry(Retryable::Stalled)),
            Ok(Err(e)) => {
                return Err(Attempt::Retry(Retryable::Transport(format!(
                    "connection lost at byte {written}{}: {}",
                    total.map(|t| format!(" of {t}")).unwrap_or_default(),
                    transport_cause(&e)
                ))));
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        file.write_all(&chunk).map_err(io)?;
        written += chunk.len() as u64;
        this_attempt += chunk.len() as u64;
        report.bytes_downloaded += chunk.len() as u64;
        if last_log.elapsed() >= options.progress_every {
            last_log = Instant::now();
            let rate = this_attempt as f64 / began.elapsed().as_secs_f64().max(1e-3);
            let eta = total.map(|t| (t.saturating_sub(written)) as f64 / rate.max(1.0));
            tracing::info!(
                url = %shown,
                bytes = written,
                total = total.unwrap_or(0),
                rate_mb_s = format!("{:.1}", rate / 1e6),
                eta_s = eta.map(|e| format!("{e:.0}")).unwrap_or_else(|| "?".into()),
                "downloading model"
            );
        }
    }
    file.sync_all().map_err(io)?;
    if let Some(total) = total
        && written != total
    {
        return Err(Attempt::Retry(Retryable::Transport(format!(
            "connection closed at byte {written} of {total}"
        ))));
    }
    Ok(())
}

/// `(start, total)` from `Content-Range: bytes a-b/total` (or `*/total`).
fn content_range(response: &reqwest::Response) -> Option<(u64, Option<u64>)> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = value.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    let total = total.trim().parse().ok();
    let start = match range.trim() {
        "*" => 0,
        r => r.split_once('-')?.0.trim().parse().ok()?,
    };
    Some((start, total))
}

/// The innermost cause of a reqwest error, without the URL it carries.
fn transport_cause(e: &reqwest::Error) -> String {
    let mut cause = if e.is_connect() {
        "cannot connect".to_string()
    } else if e.is_timeout() {
        "timed out".to_string()
    } else {
        "transfer failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(last) = last {
        cause.push_str(": ");
        cause.push_str(&last);
    }
    cause
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_keep_the_file_name_and_differ_by_url() {
        let a = cache_path(Path::new("/c"), "https://a/x/m.gguf");
        let b = cache_path(Path::new("/c"), "https://b/x/m.gguf");
        assert_eq!(a.file_name().unwrap(), "m.gguf");
        assert_ne!(a, b);
        assert_eq!(
            sibling(&a, ".partial").file_name().unwrap(),
            "m.gguf.partial"
        );
    }
}
