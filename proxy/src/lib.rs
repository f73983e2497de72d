//! shardgate, the proxy server.
//!
//! # Layout
//! Dependencies point one way, down these layers (a module uses only modules
//! of lower layers; `tests/layout.rs` checks it on the source, so the module
//! graph has no cycle). `docs/architecture.md` draws it and follows one
//! statement through it.
//!
//! 1. [`server`] (accept loop, connection limit, graceful shutdown) and
//!    [`admin`] (HTTP `/livez`, `/readyz`, `/status`, `/metrics`).
//! 2. [`session`]: one client: startup and authentication, the loop, each
//!    message decided and then acted on; its parts are the db_default link,
//!    transaction end (both protocols), the extended protocol on t_order,
//!    cached reads, migration-aware routing, streaming portals.
//! 3. [`state`]: what every session shares (config, pools, engine, cache);
//!    [`error`]: the one client-facing error type, [`error::ClientError`]:
//!    every error shardgate sends is made, scrubbed and encoded there, and
//!    the executor's and the db_default link's failures map to it there.
//! 4. [`routed`] (the executor: plans run on shards, answers merged,
//!    fallback, two-phase commit, months, lookups) and [`cache`] (the
//!    merchant-info cache: moka L1, Redis L2, invalidation). Neither names the
//!    other or anything above.
//! 5. [`cancel`]: routing CancelRequests to the right server.
//! 6. [`backend`]: server connections, their pools, and [`backend::query`],
//!    the one way the proxy sends its own statements and reads their answers.
//! 7. Leaves: [`protocol`] (frames and the messages we look inside, no I/O;
//!    [`protocol::sqlstate`] names every SQLSTATE the proxy uses),
//!    [`stream`] (TCP or TLS, writes), [`auth`] (SCRAM-SHA-256, md5),
//!    [`metrics`] (every metric name). The router, config and metrics crates
//!    are leaves too.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod cancel;
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod routed;
pub mod server;
pub mod session;
pub mod state;
pub mod stream;

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
        .set_buckets_for_metric(Matcher::Full(metrics::SHARD_POOL_WAIT_SECONDS.into()), metrics::POOL_WAIT_BUCKETS)
        .context("metric buckets")?
        .set_buckets_for_metric(Matcher::Full(metrics::SHARD_QUERY_SECONDS.into()), metrics::QUERY_BUCKETS)
        .context("metric buckets")?
        .set_buckets_for_metric(Matcher::Full(metrics::CACHE_LOOKUP_SECONDS.into()), metrics::CACHE_BUCKETS)
        .context("metric buckets")?
        .set_buckets_for_metric(Matcher::Full(metrics::FANOUT.into()), metrics::FANOUT_BUCKETS)
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = TcpListener::bind(&config.server.listen).await.with_context(|| format!("binding server.listen {}", config.server.listen))?;
    let admin_listener =
        TcpListener::bind(&config.server.admin_listen).await.with_context(|| format!("binding server.admin_listen {}", config.server.admin_listen))?;
    tracing::info!(listen = %config.server.listen, admin = %config.server.admin_listen, "shardgate listening");
    let shared = Arc::new(state::Shared::new(config, shutdown.clone())?);
    shared.engine.start_id_lease(&shared.config, shutdown.clone());
    // start serving with the lease in hand when db_default answers (the task keeps trying after)
    let t0 = std::time::Instant::now();
    while shared.engine.ids.get().is_none() && t0.elapsed() < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    start_background(&shared).await;
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

/// Decision log, first month-table pass (bounded), then the periodic maintainer
/// and two-phase-commit recovery.
async fn start_background(shared: &Arc<state::Shared>) {
    let engine = shared.engine.clone();
    let ahead = shared.config.sharding.months_ahead;
    if let Ok(Ok(mut conn)) = tokio::time::timeout(std::time::Duration::from_secs(5), engine.default.get()).await {
        if let Ok(Err(e)) = crate::backend::query::control(&mut conn, routed::twopc::DECISIONS_DDL).await {
            tracing::warn!(sqlstate = %e.code, "creating the two-phase commit decision table failed");
        }
        // the aggregates the databases have (user-defined ones too, from db_default and the
        // first shard): refused across shards rather than answered once per shard
        const AGGREGATES: &str = "SELECT DISTINCT proname::text FROM pg_catalog.pg_proc WHERE prokind = 'a'";
        let mut names: Vec<String> = match crate::backend::query::control(&mut conn, AGGREGATES).await {
            Ok(Ok(rows)) => rows.into_iter().flatten().collect(),
            _ => Vec::new(),
        };
        if let Ok(mut shard) = backend::pool::checkout(engine.pool(0), None).await {
            if let Ok(Ok(rows)) = crate::backend::query::control(&mut shard, AGGREGATES).await {
                names.extend(rows.into_iter().flatten());
            }
        }
        if names.is_empty() {
            tracing::warn!("could not read the aggregate functions; user-defined aggregates are not recognised");
        }
        engine.router.learn_aggregates(names);
        // the template's columns: GROUP BY a column name means the column, as one table reads it
        let mut columns = Vec::new();
        for rule in &engine.topology().tables {
            const COLUMNS: &str = "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped";
            if let Ok(Ok(rows)) = crate::backend::query::query(&mut conn, COLUMNS, &[Some(rule.name.as_str())]).await {
                columns.extend(rows.into_iter().filter_map(|r| r.into_iter().next().flatten()));
            }
        }
        if columns.is_empty() {
            tracing::warn!("could not read the sharded tables' columns; GROUP BY names are matched to output aliases except the routing columns");
        }
        engine.router.learn_columns(columns);
    } else {
        tracing::warn!("db_default unreachable at startup; two-phase commit needs it");
    }
    if tokio::time::timeout(std::time::Duration::from_secs(15), routed::months::maintain(&engine, ahead)).await.is_err() {
        tracing::warn!("month table maintenance did not finish at startup; continuing in the background");
    }
    let mut shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = 0u64;
        // every 5 s: a decided commit another proxy could not finish on a shard is
        // applied here within that time (recovery is a read of pg_prepared_xacts per shard)
        const EVERY: u64 = 5;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(EVERY)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            tick += 1;
            if let Err(e) = routed::twopc::recover(&engine).await {
                tracing::warn!(error = %e, "two-phase commit recovery failed");
            }
            routed::lookup::fill(&engine).await;
            if tick.is_multiple_of(routed::months::INTERVAL.as_secs() / EVERY) {
                routed::months::maintain(&engine, ahead).await;
            }
            if tick.is_multiple_of(60 / EVERY) {
                routed::fence::sweep(&engine).await;
            }
        }
    });
    // fallback table and the sync-back worker
    let engine = shared.engine.clone();
    if let Err(e) = routed::fallback::prepare(&engine).await {
        tracing::warn!(error = %e, "fallback table not ready; writes to a down shard will fail until it is");
    }
    tokio::spawn(routed::fallback::run(engine.clone(), shared.config.fallback.clone(), shared.shutdown.clone()));
    tokio::spawn(routed::twopc::sweep_forgotten(engine.clone(), shared.shutdown.clone()));
    shared.cache.start(shared.shutdown.clone());
    // the migration phase (only while legacy_db is configured) and the outbox retrier
    if shared.engine.migration.enabled {
        let config = Arc::new(shared.config.clone());
        tokio::spawn(routed::migration::watch(shared.engine.clone(), config.clone(), shared.shutdown.clone()));
        tokio::spawn(routed::migration::retry_outbox(shared.engine.clone(), config, shared.shutdown.clone()));
    }
    // health probes
    let engine = shared.engine.clone();
    let mut stop = shared.shutdown.clone();
    tokio::spawn(async move {
        let every = std::time::Duration::from_millis(engine.health_cfg.probe_interval_ms.max(50));
        loop {
            engine.probe_all().await;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
    let engine = shared.engine.clone();
    tokio::spawn(async move {
        // unique lookups: tables made, and filled from existing rows if they are new
        routed::lookup::fill(&engine).await;
    });
    let engine = shared.engine.clone();
    tokio::spawn(async move {
        match routed::twopc::recover(&engine).await {
            Ok(n) if n > 0 => tracing::info!(resolved = n, "two-phase commit recovery at startup"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "two-phase commit recovery at startup failed"),
        }
        // the INSERT fence on every shard (made where missing)
        routed::fence::sweep(&engine).await;
    });
}
