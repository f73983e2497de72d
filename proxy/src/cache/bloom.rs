//! Each cached table's bloom filter of existing keys: loaded from
//! `db_default` at start and every `bloom_refresh_ms`, and again at once
//! when a table-wide write or a change of the pub/sub subscription made the
//! loaded one unusable (see `TableState::bloom`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fastbloom::AtomicBloomFilter;

use super::{jittered, Cache, KeyType};
use crate::metrics as m;

impl Cache {
    /// Loads the key type and every key of a table into a new bloom filter.
    async fn reload_bloom(&self, table: usize) -> Result<usize, String> {
        let t = &self.tables[table];
        let pool = &self.default;
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        let ty_sql = format!(
            "SELECT a.atttypid::int4::text FROM pg_attribute a WHERE a.attrelid = to_regclass('{}') AND a.attname = '{}' AND NOT a.attisdropped",
            t.spec.name, t.spec.key
        );
        let ty = match crate::backend::query::control(&mut conn, &ty_sql).await {
            Ok(Ok(rows)) => rows.into_iter().next().flatten(),
            Ok(Err(e)) => return Err(format!("{}: {}", e.code, t.spec.name)),
            Err(e) => {
                conn.broken = true;
                return Err(e.to_string());
            }
        };
        let kt = match ty.as_deref() {
            Some("20" | "23" | "21") => KeyType::Int,
            Some("25" | "1043") => KeyType::Text,
            Some(other) => return Err(format!("{}.{} has type oid {other}; only integer and text keys are cached", t.spec.name, t.spec.key)),
            None => return Err(format!("table {} with column {} not found on db_default", t.spec.name, t.spec.key)),
        };
        *t.key_type.write().unwrap_or_else(|e| e.into_inner()) = Some(kt);
        // before the keys are read: a subscription lost or remade, or a table-wide write,
        // from here on makes this filter unused; so does loading it while not subscribed
        // (keys other proxies wrote are not heard of)
        let tag = match (self.global.load(Ordering::Acquire), t.epoch.load(Ordering::Acquire)) {
            (g, e) if self.local_trusted() => [g, e],
            _ => [u64::MAX; 2],
        };
        *t.recent.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        let keys_sql = format!("SELECT {}::text FROM {}", t.spec.key, t.spec.name);
        let keys = match crate::backend::query::control(&mut conn, &keys_sql).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return Err(format!("{}: reading keys of {}", e.code, t.spec.name)),
            Err(e) => {
                conn.broken = true;
                return Err(e.to_string());
            }
        };
        drop(conn);
        let bloom = AtomicBloomFilter::with_false_pos(self.cfg.bloom_false_positive_rate).expected_items((keys.len() * 2).max(1024));
        for k in keys.iter().flatten() {
            bloom.insert(k.as_str());
        }
        // keys written while loading, then swap in
        let mut recent = t.recent.lock().unwrap_or_else(|e| e.into_inner());
        for k in recent.take().unwrap_or_default() {
            bloom.insert(k.as_str());
        }
        *t.bloom.write().unwrap_or_else(|e| e.into_inner()) = Some((tag, Arc::new(bloom)));
        drop(recent);
        metrics::gauge!(m::CACHE_BLOOM_KEYS, "table" => t.spec.name.clone()).set(keys.len() as f64);
        Ok(keys.len())
    }
}

pub(super) async fn bloom_loop(cache: Arc<Cache>, table: usize, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_millis(cache.cfg.bloom_refresh_ms);
    loop {
        let wait = match cache.reload_bloom(table).await {
            Ok(n) => {
                tracing::debug!(table = %cache.tables[table].spec.name, keys = n, "bloom filter loaded");
                every
            }
            Err(e) => {
                tracing::warn!(table = %cache.tables[table].spec.name, error = %e, "cache: bloom filter not loaded; retrying");
                // no filter: every key goes on to the cache levels and the database
                every.min(Duration::from_secs(2))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(jittered(wait, cache.cfg.ttl_jitter_percent)) => {}
            _ = cache.tables[table].reload.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
