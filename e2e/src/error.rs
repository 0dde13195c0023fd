//! The harness' error type: what failed to start, why, and the server's log.

use std::path::PathBuf;

/// A harness step failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A tool that `scripts/setup` installs is missing.
    #[error("{0}")]
    Tool(String),
    /// A server exited or did not become ready in time.
    #[error("{server}: {reason}\n--- last lines of {log} ---\n{tail}")]
    Server {
        server: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    /// A wait ran past its deadline.
    #[error("timed out after {secs:.1}s waiting for {what}{detail}")]
    Timeout {
        what: String,
        secs: f64,
        detail: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| HarnessError::Io { context, source }
    }

    pub(crate) fn other(e: impl std::fmt::Display) -> Self {
        HarnessError::Other(e.to_string())
    }
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
