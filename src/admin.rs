//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics` (Prometheus) and `/config`.
//!
//! It binds loopback by default; the handlers expose no secrets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding admin address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin address {0} is not a loopback address; pass --admin-allow-remote to expose it")]
    NotLoopback(SocketAddr),
}

/// Set once the daemon serves; cleared when it shuts down.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the daemon ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    ready: Readiness,
    config: Arc<serde_json::Value>,
}

/// Binds `addr` and serves the admin endpoints in a background task; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    allow_remote: bool,
    registry: Registry,
    ready: Readiness,
    config: serde_json::Value,
) -> Result<SocketAddr, AdminError> {
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(AdminError::NotLoopback(addr));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    let state = AppState {
        registry: Arc::new(registry),
        ready,
        config: Arc::new(config),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/config", get(config_dump))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    Ok(bound)
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

async fn config_dump(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json((*s.config).clone())
}
