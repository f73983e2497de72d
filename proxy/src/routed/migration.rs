//! Following a migration from `legacy_db` (README, "Migrating from a legacy single table"): the phase comes from
//! the control table on `db_default`, polled every `migration.poll_interval_ms`
//! (at most 1 s). A phase change waits for the statements that started under
//! the old phase ([`Migration::gate`]), then this proxy acknowledges the new
//! epoch so `shardgate-migrate` knows every proxy follows it.
//!
//! Writes that the secondary store missed go to the outbox; a retrier makes
//! the secondary equal to the primary for each entry's shards and months.

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardgate_config::Config;
use shardgate_migrate::state::{self, State};
use shardgate_migrate::{Phase, Store};
use tokio::sync::watch;

use super::Engine;

const UNKNOWN: u8 = 255;
const PHASES: [Phase; 7] = [Phase::Legacy, Phase::Prepared, Phase::DualWrite, Phase::ShardReads, Phase::ShardWrites, Phase::Finalized, Phase::RolledBack];

/// This proxy's view of the migration.
pub struct Migration {
    /// `legacy_db` is configured.
    pub enabled: bool,
    phase: AtomicU8,
    epoch: AtomicI64,
    /// Held (shared) by every statement on a sharded table; a phase change takes it
    /// exclusively so no statement runs across the change.
    pub gate: tokio::sync::RwLock<()>,
    /// Last control row read (for `/health` and `SHOW MIGRATION`).
    status: Mutex<Option<State>>,
    /// Name in `shardgate_migration_proxies`.
    pub proxy_id: String,
    ctl: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    default_dsn: shardgate_config::Dsn,
}

impl Migration {
    /// From the config; without `legacy_db` the phase is always `finalized` (shards alone).
    pub fn new(config: &Config) -> Migration {
        let enabled = config.legacy_db.is_some();
        Migration {
            enabled,
            phase: AtomicU8::new(if enabled { UNKNOWN } else { index(Phase::Finalized) }),
            epoch: AtomicI64::new(-1),
            gate: tokio::sync::RwLock::new(()),
            status: Mutex::new(None),
            proxy_id: format!("{}/{}", config.server.listen, std::process::id()),
            ctl: tokio::sync::Mutex::new(None),
            default_dsn: config.default_dsn(),
        }
    }

    /// The phase to route by; `None` while it is not known yet.
    pub fn phase(&self) -> Option<Phase> {
        PHASES.get(self.phase.load(Ordering::Acquire) as usize).copied()
    }

    /// The last control row read.
    pub fn status(&self) -> Option<State> {
        self.status.lock().ok().and_then(|s| s.clone())
    }

    /// JSON for `/health`.
    pub fn status_json(&self) -> serde_json::Value {
        if !self.enabled {
            return serde_json::Value::Null;
        }
        let st = self.status();
        serde_json::json!({
            "phase": self.phase().map(Phase::name),
            "epoch": self.epoch.load(Ordering::Acquire),
            "backfill_rows": st.as_ref().map(|s| s.backfill_rows),
            "backfill_total": st.as_ref().and_then(|s| s.backfill_total),
            "backfill_done": st.as_ref().map(|s| s.backfill_done),
            "outbox_pending": st.as_ref().map(|s| s.outbox_pending),
            "last_verify_at": st.as_ref().and_then(|s| s.verify_at.clone()),
            "last_verify_differences": st.as_ref().and_then(|s| s.verify_differences),
        })
    }

    /// Runs `f` on the control connection (opened on demand, dropped on error).
    async fn with_ctl<T>(&self, f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>) -> anyhow::Result<T> {
        let mut g = self.ctl.lock().await;
        if g.as_ref().is_none_or(|c| c.is_closed()) {
            *g = Some(shardgate_migrate::db::connect(&self.default_dsn, "default_db").await?);
        }
        let c = g.as_ref().expect("just set");
        match f(c).await {
            Ok(v) => Ok(v),
            Err(e) => {
                *g = None;
                Err(e.into())
            }
        }
    }

    /// Records a write the secondary store missed (never fails the client's write).
    pub async fn record_outbox(&self, target: Store, statement: &str, shards: &[i32], months: &[String], error: &str) {
        metrics::counter!(crate::metrics::MIGRATION_OUTBOX_TOTAL, "target" => target.name()).increment(1);
        let stmt: String = statement.chars().take(4000).collect();
        let r = self.with_ctl(async |c| state::record_outbox(c, target, &stmt, shards, months, error).await).await;
        match r {
            Ok(()) => tracing::warn!(target = target.name(), ?shards, error, "a secondary write failed; recorded in the migration outbox"),
            Err(e) => tracing::error!(target = target.name(), ?shards, error = %e, "a secondary write failed and the outbox is unreachable; `shardgate-migrate verify --repair` will find it"),
        }
    }

    /// One poll: reads the control row; on a new epoch waits for the statements
    /// of the old phase, switches, and acknowledges.
    async fn poll(&self, engine: &Engine, ahead: u32, ack_due: bool) -> anyhow::Result<()> {
        let st = self.with_ctl(async |c| state::load(c).await).await?;
        let phase = st.effective_phase();
        let changed = self.epoch.load(Ordering::Acquire) != st.epoch || self.phase() != Some(phase);
        if changed {
            let old = self.phase();
            {
                let _all = self.gate.write().await;
                self.phase.store(index(phase), Ordering::Release);
                self.epoch.store(st.epoch, Ordering::Release);
            }
            tracing::warn!(from = old.map(Phase::name), to = phase.name(), epoch = st.epoch, "migration phase");
            metrics::gauge!(crate::metrics::MIGRATION_PHASE).set(f64::from(index(phase)));
            // prepare made month tables for the legacy months: learn them
            super::months::maintain(engine, ahead).await;
        }
        metrics::gauge!(crate::metrics::MIGRATION_OUTBOX_PENDING).set(st.outbox_pending as f64);
        if let Ok(mut s) = self.status.lock() {
            *s = Some(st.clone());
        }
        if (changed || ack_due) && st.phase.is_some() {
            let id = self.proxy_id.clone();
            self.with_ctl(async |c| state::acknowledge(c, &id, st.epoch, phase).await).await?;
        }
        Ok(())
    }
}

fn index(p: Phase) -> u8 {
    PHASES.iter().position(|x| *x == p).unwrap_or(0) as u8
}

/// Follows the phase until shutdown.
pub async fn watch(engine: Arc<Engine>, config: Arc<Config>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_millis(config.migration.poll_interval_ms.max(1));
    let ahead = config.sharding.months_ahead;
    let mut n: u64 = 0;
    let mut failing = false;
    loop {
        let ack_due = n.is_multiple_of((1000 / every.as_millis().max(1) as u64).max(1));
        match engine.migration.poll(&engine, ahead, ack_due).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "reading the migration phase failed; keeping the last known phase");
            }
            Err(_) => {}
        }
        n += 1;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Retries the outbox while a phase writes both stores.
pub async fn retry_outbox(engine: Arc<Engine>, config: Arc<Config>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_millis(config.migration.outbox_retry_interval_ms);
    if every.is_zero() {
        return;
    }
    let mut stores: Option<shardgate_migrate::db::Stores> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Some(phase) = engine.migration.phase() else { continue };
        let pending = engine.migration.status().map_or(0, |s| s.outbox_pending);
        if pending == 0 || !matches!(phase, Phase::DualWrite | Phase::ShardReads | Phase::ShardWrites) {
            continue;
        }
        if stores.is_none() {
            match shardgate_migrate::db::Stores::open(&config).await {
                Ok(s) => stores = Some(s),
                Err(e) => {
                    tracing::debug!(error = %e, "outbox retry: a store is unreachable");
                    continue;
                }
            }
        }
        let Some(s) = stores.as_ref() else { continue };
        let target = phase.primary().other();
        match shardgate_migrate::sync::drain_outbox(s, target, false, false).await {
            Ok(left) => tracing::info!(target = target.name(), left, "outbox retry round"),
            Err(e) => {
                tracing::warn!(error = %e, "outbox retry failed");
                stores = None;
            }
        }
    }
}
