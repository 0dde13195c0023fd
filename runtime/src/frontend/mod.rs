//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions`,
//! `POST /v1/completions` (whole or streamed), `GET /v1/models`,
//! `GET /health` and `GET /metrics`.
//!
//! The frontend parses and checks requests, tokenizes through a
//! [`CompletionBackend`] and shapes the tokens it streams back. It does not
//! pick workers (a backend does) nor run models. Start it with [`router`] and
//! [`serve`]:
//!
//! ```no_run
//! # async fn run(backend: xpyd_runtime::frontend::SharedBackend) -> std::io::Result<()> {
//! let app = xpyd_runtime::frontend::router(backend, prometheus::Registry::new())
//!     .expect("metrics register");
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8000").await?;
//! xpyd_runtime::frontend::serve(listener, app, std::future::pending()).await
//! # }
//! ```

pub mod backend;
pub mod cluster;
pub mod error;
pub mod extract;
pub mod handlers;
pub mod metrics;
pub mod protocol;
pub mod routing;
pub mod tools;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use prometheus::Registry;
use tokio::net::TcpListener;

pub use backend::{
    BackendError, CompletionBackend, GenerateRequest, OutputStream, Prompts, SharedBackend,
};
pub use cluster::{ClusterBackend, ClusterOptions, WorkerPicker};
pub use error::ApiError;
pub use extract::BODY_LIMIT;
pub use routing::{RouterFeeds, start_router};

use handlers::AppState;
use metrics::FrontendMetrics;

/// The API's routes over `backend`; its metrics are registered in
/// `registry`, which `GET /metrics` also exposes (register other metrics
/// there to serve them on the same page).
pub fn router(backend: SharedBackend, registry: Registry) -> Result<Router, prometheus::Error> {
    let metrics = FrontendMetrics::register(&registry)?;
    let state = Arc::new(AppState {
        backend,
        metrics,
        registry,
    });
    Ok(Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::list_models))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state))
}

/// Serve `app` on `listener` until `shutdown` resolves; requests in flight
/// then finish first.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
