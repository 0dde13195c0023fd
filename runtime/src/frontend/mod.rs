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
//! let window = xpyd_runtime::frontend::CLOSE_WINDOW;
//! xpyd_runtime::frontend::serve(listener, app, std::future::pending(), window).await
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderValue;
use axum::http::header::CONNECTION;
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

/// How long a draining frontend keeps serving the connections it has, each
/// answer saying `Connection: close`, before it stops (see [`serve`]).
pub const CLOSE_WINDOW: Duration = Duration::from_secs(2);

/// Serve `app` on `listener` until `shutdown` resolves, then drain: for
/// `close_window` every answer carries `Connection: close` (clients with
/// a pooled keep-alive connection reconnect, through their Service, to
/// another replica); then idle connections are closed and requests in
/// flight finish first.
///
/// Closing an idle keep-alive connection at once races a client that is
/// sending on it just then: that request fails with a connection error
/// and was never seen. A client that keeps its connection busy is always
/// in that race, so a rolling update of the frontend lost requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    close_window: Duration,
) -> std::io::Result<()> {
    let closing = Arc::new(AtomicBool::new(false));
    let flag = closing.clone();
    let app = app.layer(axum::middleware::map_response(
        move |mut response: axum::response::Response| {
            let closing = flag.load(Ordering::Relaxed);
            async move {
                if closing {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        },
    ));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            closing.store(true, Ordering::Relaxed);
            tokio::time::sleep(close_window).await;
        })
        .await
}
