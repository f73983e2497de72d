//! Admin HTTP: `/livez` (process up), `/readyz` (accepting and the default
//! database reachable), `/health` (every shard's state, JSON; 200 when all
//! shards are up, 503 otherwise), `/metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::state::Shared;

#[derive(Clone)]
struct AdminState {
    shared: Arc<Shared>,
    prometheus: PrometheusHandle,
}

/// The admin router.
pub fn router(shared: Arc<Shared>, prometheus: PrometheusHandle) -> Router {
    let state = AdminState { shared, prometheus };
    let guarded = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new().route("/livez", get(|| async { "ok\n" })).merge(guarded).with_state(state)
}

/// With `server.admin_token` set, everything but `/livez` wants
/// `Authorization: Bearer <token>` (compared in constant time).
async fn require_token(State(s): State<AdminState>, req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    if let Some(token) = &s.shared.config.server.admin_token {
        let given = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| {
            let (a, b) = (g.as_bytes(), token.0.as_bytes());
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        });
        if !ok {
            return (StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], "admin token required\n").into_response();
        }
    }
    next.run(req).await
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if *s.shared.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if s.shared.engine.ids.get().is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no worker-id lease yet: INSERTs without an id are refused\n");
    }
    match tokio::time::timeout(Duration::from_secs(2), s.shared.pool.get()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "default database unreachable\n"),
    }
}

async fn health(State(s): State<AdminState>) -> impl IntoResponse {
    let e = &s.shared.engine;
    let record = |name: String, t: &crate::routed::health::Tracker| {
        serde_json::json!({
            "database": name,
            "state": t.state().name(),
            "last_probe_latency_ms": t.latency().as_secs_f64() * 1000.0,
            "consecutive_failures": t.failures(),
            "last_error": t.last_error(),
        })
    };
    let shards: Vec<serde_json::Value> = e
        .health
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut r = record(format!("db_{i}"), t);
            r["fallback_pending_rows"] = (e.fallback.pending(i) - e.fallback.failed(i)).into();
            r["fallback_failed_rows"] = e.fallback.failed(i).into();
            let last = e.fallback.last_sync_ms(i);
            r["last_sync"] = if last > 0 { jiff::Timestamp::from_millisecond(last).map(|t| t.to_string()).unwrap_or_default().into() } else { serde_json::Value::Null };
            r
        })
        .collect();
    let all_up = e.health.iter().all(|t| t.state() == crate::routed::health::State::Up);
    let body = serde_json::json!({
        "status": if all_up { "ok" } else { "degraded" },
        "shards": shards,
        "default": record(s.shared.config.default_dsn().dbname, &e.default_health),
        "cache": s.shared.cache.status(),
        "migration": e.migration.status_json(),
    });
    let code = if all_up { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [("content-type", "application/json")], body.to_string())
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    let status = s.shared.pool.status();
    metrics::gauge!(crate::metrics::POOL_CONNECTIONS, "state" => "size").set(status.size as f64);
    metrics::gauge!(crate::metrics::POOL_CONNECTIONS, "state" => "available").set(status.available as f64);
    ([("content-type", "text/plain; version=0.0.4")], s.prometheus.render())
}
