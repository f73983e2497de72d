//! shardgate, the proxy server.
//!
//! # Layout
//! - [`server`]: accept loop, connection limit, graceful shutdown.
//! - [`session`]: one client: startup, auth, transaction pooling, forwarding.
//! - [`protocol`]: frame splitting and the few messages we look inside.
//! - [`auth`]: client authentication (SCRAM-SHA-256, md5).
//! - [`backend`]: raw server connections and their deadpool pools.
//! - [`cancel`]: routing CancelRequests to the right server.
//! - [`admin`]: admin HTTP (`/livez`, `/readyz`, `/metrics`).
//! - [`metrics`]: every metric name.
//! - [`error`]: client-facing errors and their SQLSTATEs.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod session;

use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use shardgate_config::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Runs the proxy until `shutdown` flips to true; returns when drained.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(metrics::POOL_WAIT_SECONDS.into()), metrics::POOL_WAIT_BUCKETS)
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = TcpListener::bind(&config.server.listen).await.with_context(|| format!("binding server.listen {}", config.server.listen))?;
    let admin_listener = TcpListener::bind(&config.server.admin_listen).await.with_context(|| format!("binding server.admin_listen {}", config.server.admin_listen))?;
    tracing::info!(listen = %config.server.listen, admin = %config.server.admin_listen, "shardgate listening");
    let shared = Arc::new(server::Shared::new(config, shutdown.clone()));
    let admin = admin::router(shared.clone(), prometheus);
    let mut admin_shutdown = shutdown.clone();
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(admin_listener, admin)
            .with_graceful_shutdown(async move {
                let _ = admin_shutdown.wait_for(|s| *s).await;
            })
            .await;
    });
    server::serve(listener, shared).await;
    let _ = admin_task.await;
    Ok(())
}
