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

/// A component's say in readiness: `Ok(status line)` when it is fine, `Err(reason)` when the
/// daemon should not count as ready (it may still serve what it can).
pub type ReadinessCheck = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Set once the daemon serves; cleared when it shuts down. Components add checks that can
/// hold readiness back (a pod source that is unreachable, for example).
#[derive(Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    checks: Arc<std::sync::Mutex<Vec<ReadinessCheck>>>,
}

impl Readiness {
    /// Marks the daemon serving (or not).
    pub fn set(&self, ready: bool) {
        self.serving.store(ready, Ordering::SeqCst);
    }

    /// Adds a check consulted by every `/readyz`.
    pub fn add_check(&self, check: ReadinessCheck) {
        self.checks.lock().expect("readiness checks").push(check);
    }

    /// Ready or not, with one line per check.
    fn evaluate(&self) -> (bool, String) {
        let mut ready = self.serving.load(Ordering::SeqCst);
        let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
        let checks = self.checks.lock().expect("readiness checks").clone();
        for check in checks {
            match check() {
                Ok(line) => body += &format!("{line}\n"),
                Err(line) => {
                    ready = false;
                    body += &format!("{line}\n");
                }
            }
        }
        if !ready && body.starts_with("ready") {
            body.replace_range(.."ready".len(), "not ready");
        }
        (ready, body)
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
    match s.ready.evaluate() {
        (true, body) => (StatusCode::OK, body),
        (false, body) => (StatusCode::SERVICE_UNAVAILABLE, body),
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

#[cfg(test)]
mod readiness_tests {
    use super::*;

    #[test]
    fn a_failing_check_holds_readiness_back_and_says_why() {
        let r = Readiness::default();
        assert_eq!(r.evaluate(), (false, "not ready\n".into()));
        r.set(true);
        let up = Arc::new(AtomicBool::new(true));
        let u = up.clone();
        r.add_check(Arc::new(move || {
            if u.load(Ordering::SeqCst) {
                Ok("pods: api source up, 3 known pods".into())
            } else {
                Err("pods: api source unreachable; serving 3 known pods".into())
            }
        }));
        assert_eq!(
            r.evaluate(),
            (true, "ready\npods: api source up, 3 known pods\n".into())
        );
        up.store(false, Ordering::SeqCst);
        let (ready, body) = r.evaluate();
        assert!(!ready);
        assert_eq!(
            body,
            "not ready\npods: api source unreachable; serving 3 known pods\n"
        );
    }
}
