//! Where a model comes from: one resolver for every role, `fetch-model` and
//! `up --model`.
//!
//! A source string names the weights a user wants served:
//!
//! | source | resolves to |
//! |---|---|
//! | `/abs/path.gguf` | that file (inside the image, or a volume the user mounts) |
//! | `https://…`, `http://…` | a download into the model cache ([`fetch`]) |
//! | `hf://<org>/<repo>[@<rev>]/<file>` | `$HF_ENDPOINT/<org>/<repo>/resolve/<rev or main>/<file>`, downloaded likewise |
//! | `pvc://<claim>/<path>` | `<pvc root>/<claim>/<path>` (the operator mounts the claim there read-only) |
//!
//! The operator writes pods to the same contract (the env variables are
//! listed on [`ResolveOptions`]). Not here: reading the file (see
//! [`crate::engine::gguf`]).

pub mod fetch;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use fetch::{FetchError, FetchOptions, FetchReport, Fetched};

/// The Hugging Face hub, unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";
/// Where `pvc://` claims are mounted, unless `XPYD_PVC_ROOT` says otherwise.
pub const DEFAULT_PVC_ROOT: &str = "/var/lib/xpyd/pvc";
/// Where pods keep downloads (the operator mounts the `model-cache` volume here).
pub const POD_MODEL_CACHE: &str = "/var/cache/xpyd/models";

/// A parsed model source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A file on this machine (or in the pod).
    Path(PathBuf),
    /// An `http(s)://` URL.
    Url(String),
    /// A file in a Hugging Face hub repository.
    Hf {
        /// `<org>/<repo>`.
        repo: String,
        /// Branch, tag or commit; `main` when not given.
        revision: String,
        /// Path of the file inside the repository.
        file: String,
    },
    /// A file in a PersistentVolumeClaim.
    Pvc {
        /// The claim's name.
        claim: String,
        /// Path of the file inside the claim.
        path: String,
    },
}

/// A source string that names nothing the resolver knows.
#[derive(Debug, thiserror::Error)]
#[error("model source {source_text:?}: {reason}")]
pub struct SourceError {
    source_text: String,
    reason: String,
}

fn bad(source: &str, reason: impl Into<String>) -> SourceError {
    SourceError {
        source_text: source.to_string(),
        reason: reason.into(),
    }
}

impl ModelSource {
    /// Parses a source string (see the module doc for the forms).
    pub fn parse(text: &str) -> Result<ModelSource, SourceError> {
        if let Some(rest) = text.strip_prefix("hf://") {
            let mut parts = rest.splitn(3, '/');
            let (org, repo_rev, file) = match (parts.next(), parts.next(), parts.next()) {
                (Some(o), Some(r), Some(f)) if !o.is_empty() && !r.is_empty() && !f.is_empty() => {
                    (o, r, f)
                }
                _ => return Err(bad(text, "expected hf://<org>/<repo>[@<revision>]/<file>")),
            };
            let (repo, revision) = match repo_rev.split_once('@') {
                Some((r, rev)) if !r.is_empty() && !rev.is_empty() => (r, rev),
                Some(_) => return Err(bad(text, "empty repository or revision around '@'")),
                None => (repo_rev, "main"),
            };
            check_segments(text, file)?;
            return Ok(ModelSource::Hf {
                repo: format!("{org}/{repo}"),
                revision: revision.to_string(),
                file: file.to_string(),
            });
        }
        if let Some(rest) = text.strip_prefix("pvc://") {
            let Some((claim, path)) = rest.split_once('/') else {
                return Err(bad(text, "expected pvc://<claim>/<path in the claim>"));
            };
            if claim.is_empty() || path.is_empty() {
                return Err(bad(text, "expected pvc://<claim>/<path in the claim>"));
            }
            check_segments(text, path)?;
            return Ok(ModelSource::Pvc {
                claim: claim.to_string(),
                path: path.to_string(),
            });
        }
        if text.starts_with("https://") || text.starts_with("http://") {
            let file = url_file_name(text);
            if file.is_empty() {
                return Err(bad(text, "the URL does not end in a file name"));
            }
            return Ok(ModelSource::Url(text.to_string()));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(bad(
                text,
                format!(
                    "unknown scheme {scheme:?}: use https://, http://, hf://, pvc:// or a path"
                ),
            ));
        }
        if text.is_empty() {
            return Err(bad(text, "empty"));
        }
        Ok(ModelSource::Path(PathBuf::from(text)))
    }

    /// The URL to download, for sources that are downloaded.
    pub fn url(&self, hf_endpoint: &str) -> Option<String> {
        match self {
            ModelSource::Url(url) => Some(url.clone()),
            ModelSource::Hf {
                repo,
                revision,
                file,
            } => Some(format!(
                "{}/{repo}/resolve/{revision}/{file}",
                hf_endpoint.trim_end_matches('/')
            )),
            ModelSource::Path(_) | ModelSource::Pvc { .. } => None,
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Path(p) => write!(f, "{}", p.display()),
            ModelSource::Url(u) => f.write_str(&redact(u)),
            ModelSource::Hf {
                repo,
                revision,
                file,
            } => write!(f, "hf://{repo}@{revision}/{file}"),
            ModelSource::Pvc { claim, path } => write!(f, "pvc://{claim}/{path}"),
        }
    }
}

/// No `..` or empty segment may climb out of a claim or the cache.
fn check_segments(text: &str, path: &str) -> Result<(), SourceError> {
    if path.split('/').any(|s| s == ".." || s.is_empty()) {
        return Err(bad(text, "the path may not contain '..' or empty segments"));
    }
    Ok(())
}

/// The last path segment of a URL, without query or fragment.
pub(crate) fn url_file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let after_scheme = path.split_once("://").map_or(path, |(_, rest)| rest);
    match after_scheme.split_once('/') {
        Some((_, p)) => p.rsplit('/').next().unwrap_or(""),
        None => "",
    }
}

/// A URL fit for logs and error messages: no query string (presigned URLs
/// carry credentials there) and no user info.
pub fn redact(url: &str) -> String {
    let base = url.split(['?', '#']).next().unwrap_or(url);
    let redacted = match base.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((authority, path)) => {
                let host = authority.rsplit('@').next().unwrap_or(authority);
                format!("{scheme}://{host}/{path}")
            }
            None => format!("{scheme}://{}", rest.rsplit('@').next().unwrap_or(rest)),
        },
        None => base.to_string(),
    };
    if base.len() < url.len() {
        format!("{redacted}?…")
    } else {
        redacted
    }
}

/// How sources resolve on this machine. Each field has the environment
/// variable the agent reads it from (the operator's pods set them).
#[derive(Clone, Debug)]
pub struct ResolveOptions {
    /// `XPYD_MODEL_CACHE`: where downloads go.
    pub cache_dir: PathBuf,
    /// `XPYD_PVC_ROOT`: where `pvc://` claims are mounted.
    pub pvc_root: PathBuf,
    /// `HF_ENDPOINT`: the hub (or a mirror).
    pub hf_endpoint: String,
    /// `HF_TOKEN`: bearer token for the hub; never logged.
    pub hf_token: Option<String>,
    /// `XPYD_MODEL_SHA256`: the expected digest, lowercase hex.
    pub sha256: Option<String>,
    /// `XPYD_MODEL_FETCH_TIMEOUT_SECONDS`: the whole fetch, waiting on
    /// another fetcher's lock included.
    pub deadline: Duration,
    /// `XPYD_MODEL_FETCH_READ_TIMEOUT_SECONDS`: a server that sends nothing
    /// for this long is stalled (the request is retried).
    pub read_timeout: Duration,
}

/// Why a model could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The source string itself is wrong.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// `--model-sha256` is not 64 hex digits.
    #[error("model sha256 {0:?} (--model-sha256 / XPYD_MODEL_SHA256) is not 64 hex digits")]
    BadDigest(String),
    /// A local or PVC file is missing.
    #[error("model file {path} ({what}) does not exist")]
    Missing { path: PathBuf, what: String },
    /// A local or PVC file has the wrong digest.
    #[error("model file {path}: sha256 is {got}, expected {want}")]
    Checksum {
        path: PathBuf,
        got: String,
        want: String,
    },
    /// Reading a local file failed.
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The download failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// A model made available on this machine.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The file to load.
    pub path: PathBuf,
    /// What the download did, for downloaded sources.
    pub fetch: Option<FetchReport>,
}

/// Makes `source` available as a local file: checks a path or claim file,
/// or downloads a URL into the cache (once, shared with concurrent fetchers
/// through a lock file; a file already in the cache is reused).
pub async fn resolve(
    source: &ModelSource,
    options: &ResolveOptions,
) -> Result<Resolved, ResolveError> {
    if let Some(want) = &options.sha256
        && !(want.len() == 64 && want.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ResolveError::BadDigest(want.clone()));
    }
    let sha256 = options.sha256.as_ref().map(|s| s.to_ascii_lowercase());
    match source {
        ModelSource::Path(path) => {
            check_local(
                path.clone(),
                "--model / XPYD_MODEL".into(),
                sha256.as_deref(),
            )
            .await
        }
        ModelSource::Pvc { claim, path } => {
            let file = options.pvc_root.join(claim).join(path);
            let what = format!(
                "{source} under the claim mount {}",
                options.pvc_root.join(claim).display()
            );
            check_local(file, what, sha256.as_deref()).await
        }
        ModelSource::Url(_) | ModelSource::Hf { .. } => {
            let url = source
                .url(&options.hf_endpoint)
                .unwrap_or_else(|| unreachable!("downloaded sources have a URL"));
            let token = match source {
                ModelSource::Hf { .. } => options.hf_token.clone(),
                _ => None,
            };
            let fetch_options = FetchOptions {
                cache_dir: options.cache_dir.clone(),
                sha256,
                bearer_token: token,
                deadline: options.deadline,
                read_timeout: options.read_timeout,
                ..FetchOptions::default()
            };
            let fetched = fetch::fetch(&url, &fetch_options).await?;
            Ok(Resolved {
                path: fetched.path,
                fetch: Some(fetched.report),
            })
        }
    }
}

/// A local (or claim) file: there, and with the expected digest.
async fn check_local(
    path: PathBuf,
    what: String,
    sha256: Option<&str>,
) -> Result<Resolved, ResolveError> {
    if !path.is_file() {
        return Err(ResolveError::Missing { path, what });
    }
    if let Some(want) = sha256 {
        // Reading the file also warms the page cache the engine's mmap
        // then uses, so the check costs little more than the load.
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || crate::assets::sha256_hex(&p))
            .await
            .map_err(|e| ResolveError::Io {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| ResolveError::Io {
                path: path.clone(),
                source,
            })?;
        if got != want {
            return Err(ResolveError::Checksum {
                path,
                got,
                want: want.to_string(),
            });
        }
    }
    Ok(Resolved { path, fetch: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_into_their_kinds() {
        let cases = [
            (
                "/models/m.gguf",
                ModelSource::Path(PathBuf::from("/models/m.gguf")),
            ),
            (
                "https://example.com/a/m.gguf",
                ModelSource::Url("https://example.com/a/m.gguf".into()),
            ),
            (
                "hf://Org/Repo/m.gguf",
                ModelSource::Hf {
                    repo: "Org/Repo".into(),
                    revision: "main".into(),
                    file: "m.gguf".into(),
                },
            ),
            (
                "hf://Org/Repo@v1.0/sub/m.gguf",
                ModelSource::Hf {
                    repo: "Org/Repo".into(),
                    revision: "v1.0".into(),
                    file: "sub/m.gguf".into(),
                },
            ),
            (
                "pvc://models/llm/m.gguf",
                ModelSource::Pvc {
                    claim: "models".into(),
                    path: "llm/m.gguf".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(ModelSource::parse(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn bad_sources_say_what_is_wrong() {
        let cases = [
            ("s3://bucket/m.gguf", "unknown scheme \"s3\""),
            ("pvc://models", "pvc://<claim>/<path"),
            ("pvc://models/", "pvc://<claim>/<path"),
            ("pvc://models/../etc/passwd", "'..'"),
            ("hf://Org/m.gguf", "hf://<org>/<repo>"),
            ("hf://Org/Repo@/m.gguf", "'@'"),
            ("https://example.com/", "file name"),
            ("", "empty"),
        ];
        for (text, want) in cases {
            let err = ModelSource::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn hf_sources_use_the_hub_resolve_layout_and_the_endpoint_override() {
        let s = ModelSource::parse("hf://Org/Repo@abc123/dir/m.gguf").unwrap();
        assert_eq!(
            s.url("http://127.0.0.1:9/").as_deref(),
            Some("http://127.0.0.1:9/Org/Repo/resolve/abc123/dir/m.gguf")
        );
        let s = ModelSource::parse("hf://Org/Repo/m.gguf").unwrap();
        assert_eq!(
            s.url(DEFAULT_HF_ENDPOINT).as_deref(),
            Some("https://huggingface.co/Org/Repo/resolve/main/m.gguf")
        );
    }

    #[test]
    fn urls_in_messages_lose_credentials() {
        assert_eq!(
            redact("https://user:pw@host/a/m.gguf?X-Amz-Signature=secret"),
            "https://host/a/m.gguf?…"
        );
        assert_eq!(redact("http://host:8/m.gguf"), "http://host:8/m.gguf");
        assert_eq!(url_file_name("https://h/a/b/m.gguf?x=1"), "m.gguf");
    }
}
