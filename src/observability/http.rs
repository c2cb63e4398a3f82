//! The operators' HTTP endpoint (`http.bind`, default `0.0.0.0:9464`):
//!
//! - `GET /metrics`: every metric, Prometheus text format ([`crate::metrics`]).
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness).
//! - `GET /readyz`: 200 when [`Health::report`] passes, else 503; both with the report as JSON
//!   (`{"ready": false, "failing": ["broker"], "checks": {...}}`).
//!
//! The socket is bound in [`bind`] when the application is built (so a taken port fails at startup
//! and tests can bind port 0 and ask which port they got), and served by [`serve`] from
//! `Application::run_until_stopped` for the life of the worker.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::health::Health;

/// Bind the endpoint's socket (not yet serving).
pub fn bind(address: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("cannot listen on http.bind = {address:?} for /metrics, /healthz and /readyz"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The routes.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// Serve on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: std::net::TcpListener,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let address: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(address = ?address, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(health): State<Arc<Health>>) -> Response {
    // Evaluated per scrape, so `kiln_ready` is as fresh as `/readyz`.
    let _ = health.report();
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(),
    )
        .into_response()
}

async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({"alive": true}))
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    let report = health.report();
    let status = match report.ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    json(status, &report)
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let body = serde_json::to_string(body).expect("health reports serialise");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
