//! The probe server every agent runs on its metrics port: `/health`
//! (liveness: the process answers), `/ready` (the model is loaded and the
//! instance is registered, so work may be sent) and `/metrics`.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone)]
struct Probes {
    ready: watch::Receiver<bool>,
    registry: Registry,
}

/// The probe routes; `ready` says whether `/ready` answers 200.
pub fn routes(ready: watch::Receiver<bool>, registry: Registry) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready_probe))
        .route("/metrics", get(metrics))
        .with_state(Probes { ready, registry })
}

async fn ready_probe(State(p): State<Probes>) -> Response {
    if *p.ready.borrow() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(p): State<Probes>) -> Response {
    match TextEncoder::new().encode_to_string(&p.registry.gather()) {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serve the probes on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ready: watch::Receiver<bool>,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, routes(ready, registry))
        .with_graceful_shutdown(shutdown)
        .await
}
