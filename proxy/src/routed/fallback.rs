//! Shard down: writes go to `db_default.t_order_fallback`; when the shard is
//! back, the sync-back worker moves them home (README, "When a shard is down").
//!
//! The fallback table has `t_order`'s columns plus `target_db`,
//! `target_table`, `sync_status` (PENDING/SYNCED/FAILED), `sync_attempts`,
//! `last_error`, `next_attempt_at`, `created_at`, `synced_at`. For every
//! (shard, month) two auto-updatable views over it let the router's SQL run
//! unchanged with only the table name swapped:
//! - `t_order_fb_db3_202611`: `t_order`'s columns of that shard-month's rows
//!   not yet synced — reads, UPDATE and DELETE go here;
//! - `t_order_fbw_db3_202611`: the same plus `target_db`/`target_table` with
//!   view defaults — INSERTs go here, so each row names its home.
//!
//! Sync-back, per shard that is reachable, one batch per transaction pair:
//! lock a batch in `db_default` (`FOR UPDATE SKIP LOCKED`), upsert it into the
//! month tables on the shard (`ON CONFLICT (id) DO UPDATE`, the fallback
//! version wins) and commit there, then mark the rows SYNCED and commit in
//! `db_default`. A crash between the two commits leaves the rows PENDING; the
//! next round upserts them again with the same values — nothing lost, nothing
//! doubled. Several proxies can run it at once (SKIP LOCKED). A batch that
//! fails is retried row by row; rows that still fail become FAILED with the
//! error and are retried with exponential backoff and jitter.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use shardgate_router::month::MonthKey;
use shardgate_router::keys::ShardId;
use shardgate_router::{Routed, RoutedKind, TableRule, Target};

use super::exec::ExecError;
use crate::backend::query as wire;
use super::Engine;
use crate::protocol::sqlstate;

/// State the engine keeps about fallback.
#[derive(Default)]
pub struct Fallback {
    /// `t_order`'s column names in order, quoted, comma-separated (from db_default's template).
    columns: OnceLock<Vec<String>>,
    /// (shard, month) pairs whose views exist.
    views: Mutex<HashSet<(usize, MonthKey)>>,
    /// Held while views are made: one session makes them, the others wait for it.
    making: tokio::sync::Mutex<()>,
    /// Rows of each shard not yet synced (PENDING + FAILED), as last counted.
    pending: Vec<AtomicI64>,
    /// Of those, FAILED.
    failed: Vec<AtomicI64>,
    /// Unix ms of each shard's last completed sync round.
    last_sync_ms: Vec<AtomicI64>,
    /// Rows synced since start.
    pub synced_total: AtomicI64,
    /// Bumped by every fallback write: a recount that raced one must not lower the count.
    writes: Vec<AtomicI64>,
}

impl Fallback {
    /// Counters for `shards` shards.
    pub fn new(shards: usize) -> Fallback {
        let v = || (0..shards).map(|_| AtomicI64::new(0)).collect();
        Fallback { columns: OnceLock::new(), views: Mutex::default(), making: tokio::sync::Mutex::new(()), pending: v(), failed: v(), last_sync_ms: v(), synced_total: AtomicI64::new(0), writes: v() }
    }

    /// Unsynced rows of a shard.
    pub fn pending(&self, shard: usize) -> i64 {
        self.pending.get(shard).map_or(0, |p| p.load(Ordering::Acquire))
    }

    /// FAILED rows of a shard.
    pub fn failed(&self, shard: usize) -> i64 {
        self.failed.get(shard).map_or(0, |p| p.load(Ordering::Acquire))
    }

    /// Unix ms of the last completed sync round of a shard (0 = never).
    pub fn last_sync_ms(&self, shard: usize) -> i64 {
        self.last_sync_ms.get(shard).map_or(0, |p| p.load(Ordering::Relaxed))
    }

    /// True once the fallback table is ready.
    pub fn ready(&self) -> bool {
        self.columns.get().is_some()
    }
}

fn table(rule: &TableRule) -> String {
    rule.fallback_table()
}

/// Read/update view of one shard-month's unsynced rows.
pub fn read_view(rule: &TableRule, shard: usize, m: MonthKey) -> String {
    format!("{}_fb_db{shard}_{}", rule.name, m.suffix())
}

/// Insert view of one shard-month.
pub fn write_view(rule: &TableRule, shard: usize, m: MonthKey) -> String {
    format!("{}_fbw_db{shard}_{}", rule.name, m.suffix())
}

/// Creates the fallback table (idempotent) and learns the column list.
pub async fn prepare(engine: &Engine) -> anyhow::Result<()> {
    let mut conn = engine.default.get().await.map_err(|e| anyhow::anyhow!("db_default: {e}"))?;
    for rule in &engine.topology().tables {
        let t = table(rule);
        let ddl = rule.create_fallback_table_sql();
        wire::control(&mut conn, &ddl).await?.map_err(|e| anyhow::anyhow!("creating {t}: SQLSTATE {} (does {} exist in db_default?)", e.code, rule.name))?;
        let cols = wire::control(
            &mut conn,
            &format!("SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = '{}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum", rule.name),
        )
        .await?
        .map_err(|e| anyhow::anyhow!("columns of {}: SQLSTATE {}", rule.name, e.code))?;
        let cols: Vec<String> = cols.into_iter().flatten().collect();
        let _ = engine.fallback.columns.set(cols);
    }
    recount(engine).await;
    Ok(())
}

/// Creates the views a plan needs.
async fn ensure_views(engine: &Engine, rule: &TableRule, needed: &[(usize, MonthKey)]) -> Result<(), ExecError> {
    let cols = engine.fallback.columns.get().ok_or_else(|| ExecError::Proxy(sqlstate::CANNOT_CONNECT_NOW, "the fallback table in db_default is not ready; shard writes cannot be redirected".into()))?;
    let missing: Vec<(usize, MonthKey)> = {
        let have = engine.fallback.views.lock().map(|v| v.clone()).unwrap_or_default();
        needed.iter().copied().filter(|k| !have.contains(k)).collect()
    };
    if missing.is_empty() {
        return Ok(());
    }
    // one session of this proxy makes them; the others wait and then find them made
    let _making = engine.fallback.making.lock().await;
    let missing: Vec<(usize, MonthKey)> = {
        let have = engine.fallback.views.lock().map(|v| v.clone()).unwrap_or_default();
        missing.into_iter().filter(|k| !have.contains(k)).collect()
    };
    if missing.is_empty() {
        return Ok(());
    }
    let mut conn = engine.default.get().await.map_err(|_| ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "db_default is unavailable: orders for an unavailable shard cannot be stored".into()))?;
    let list = cols.join(", ");
    let t = table(rule);
    for (shard, m) in missing {
        let filter = format!("target_db = 'db_{shard}' AND target_table = '{}' AND sync_status <> 'SYNCED'", rule.physical(m));
        let r = read_view(rule, shard, m);
        let w = write_view(rule, shard, m);
        let ddl = format!(
            "CREATE OR REPLACE VIEW {r} AS SELECT {list} FROM {t} WHERE {filter}; \
             CREATE OR REPLACE VIEW {w} AS SELECT {list}, target_db, target_table FROM {t} WHERE {filter}; \
             ALTER VIEW {w} ALTER COLUMN target_db SET DEFAULT 'db_{shard}'; \
             ALTER VIEW {w} ALTER COLUMN target_table SET DEFAULT '{}'",
            rule.physical(m)
        );
        let mut tries = 0;
        loop {
            match wire::control(&mut conn, &ddl).await {
                Ok(Ok(_)) => break,
                // another proxy making the same view at this moment: once its transaction has
                // committed, CREATE OR REPLACE goes through (the view must exist before use)
                Ok(Err(e))
                    if tries < 5
                        && [sqlstate::INTERNAL_ERROR, sqlstate::UNIQUE_VIOLATION, sqlstate::DUPLICATE_TABLE, sqlstate::DUPLICATE_OBJECT].contains(&e.code.as_str()) =>
                {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20 * tries)).await;
                }
                Ok(Err(e)) => return Err(ExecError::Server(e)),
                Err(_) => {
                    conn.broken = true;
                    return Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "db_default is unavailable: orders for an unavailable shard cannot be stored".into()));
                }
            }
        }
        if let Ok(mut v) = engine.fallback.views.lock() {
            v.insert((shard, m));
        }
    }
    Ok(())
}

/// A plan adjusted for shard health.
pub struct Adjusted {
    /// The plan to run (fallback targets use the slot after the last shard).
    pub routed: Routed,
    /// Targets standing in for a down shard (UPDATE/DELETE must match something there).
    pub down_targets: Vec<(usize, usize)>,
    /// NOTICEs to send before the answer.
    pub notices: Vec<String>,
    /// Shards whose INSERT targets were sent to the fallback table: their count
    /// of unsynced rows goes up whatever the shard's state when the INSERT ends.
    pub inserted_down: Vec<usize>,
    /// Targets must run one after another: a write on a shard that still has
    /// unsynced rows runs on those rows first (waiting for a sync batch that holds
    /// them, re-checking their status under the row lock), then on the shard.
    pub serial: bool,
}

fn swap_tables(sql: &str, rule: &TableRule, shard: usize, months: &[MonthKey], write: bool) -> String {
    let mut out = sql.to_string();
    for m in months {
        let view = if write { write_view(rule, shard, *m) } else { read_view(rule, shard, *m) };
        out = out.replace(&rule.physical(*m), &view);
    }
    out
}

/// Redirects targets of down shards to the fallback views, adds fallback
/// targets where a shard still has unsynced rows, or refuses per policy.
/// `None` when every shard is healthy and caught up.
pub async fn adjust(engine: &Engine, routed: &Routed, policy_fail: bool) -> Result<Option<Adjusted>, ExecError> {
    let affected = routed.targets.iter().any(|t| {
        let s = t.shard.0 as usize;
        engine.is_down(s) || engine.fallback.pending(s) > 0
    });
    if !affected {
        return Ok(None);
    }
    let rule = engine.topology().tables.iter().find(|r| r.name == routed.table).ok_or_else(|| ExecError::Proxy(sqlstate::INTERNAL_ERROR, "unknown sharded table".into()))?;
    let slot = ShardId(engine.shards.len() as u8);
    let mut out = routed.clone();
    out.targets.clear();
    let mut down_targets = Vec::new();
    let mut notices = Vec::new();
    let mut views = Vec::new();
    let mut serial = false;
    let mut inserted_down = Vec::new();
    for t in &routed.targets {
        let s = t.shard.0 as usize;
        let down = engine.is_down(s);
        let pending = engine.fallback.pending(s);
        let fb = |write: bool| Target { shard: slot, months: t.months.clone(), sql: swap_tables(&t.sql, rule, s, &t.months, write).into(), params: t.params.clone(), extra: t.extra.clone() };
        match (routed.kind, down) {
            (RoutedKind::Select, true) => {
                if policy_fail {
                    return Err(ExecError::Proxy(sqlstate::CANNOT_CONNECT_NOW, format!("shard db_{s} is unavailable (fallback.policy = \"fail\"); retry when it is back")));
                }
                notices.push(format!("shard db_{s} is unavailable: the answer holds only the orders written for it while it is down"));
                views.extend(t.months.iter().map(|m| (s, *m)));
                out.targets.push(fb(false));
            }
            (RoutedKind::Select, false) => {
                if pending > 0 {
                    // the caller brings the rows home first (the fallback version wins), then reads
                    return Err(ExecError::CatchUp(s));
                }
                out.targets.push(t.clone());
            }
            (RoutedKind::Insert, true) => {
                views.extend(t.months.iter().map(|m| (s, *m)));
                out.targets.push(fb(true));
                if !inserted_down.contains(&s) {
                    inserted_down.push(s);
                }
            }
            (RoutedKind::Insert, false) => out.targets.push(t.clone()),
            (_, true) => {
                views.extend(t.months.iter().map(|m| (s, *m)));
                down_targets.push((out.targets.len(), s));
                out.targets.push(fb(false));
            }
            (_, false) => {
                // unsynced rows first (re-checked under the row lock), then the shard
                if pending > 0 {
                    views.extend(t.months.iter().map(|m| (s, *m)));
                    out.targets.push(fb(false));
                    serial = true;
                }
                out.targets.push(t.clone());
            }
        }
    }
    // a SELECT keeps its targets one for one (only their tables change), so its merge spec still applies
    ensure_views(engine, rule, &views).await?;
    Ok(Some(Adjusted { routed: out, down_targets, notices, inserted_down, serial }))
}

/// Records rows written to the fallback table for a shard.
pub fn note_written(engine: &Engine, shard: usize, rows: u64) {
    if let Some(w) = engine.fallback.writes.get(shard) {
        w.fetch_add(1, Ordering::AcqRel);
    }
    if let Some(p) = engine.fallback.pending.get(shard) {
        p.fetch_add(rows as i64, Ordering::AcqRel);
    }
}

/// Recounts unsynced rows per shard.
pub async fn recount(engine: &Engine) {
    let Ok(mut conn) = engine.default.get().await else { return };
    let epochs: Vec<i64> = engine.fallback.writes.iter().map(|w| w.load(Ordering::Acquire)).collect();
    let mut fresh = vec![(0i64, 0i64); engine.shards.len()];
    let mut lag = vec![0i64; engine.shards.len()];
    for rule in &engine.topology().tables {
        let q = format!(
            "SELECT target_db || ':' || count(*) || ':' || count(*) FILTER (WHERE sync_status = 'FAILED') || ':' || extract(epoch FROM now() - min(created_at))::bigint FROM {} WHERE sync_status <> 'SYNCED' GROUP BY target_db",
            table(rule)
        );
        let Ok(Ok(rows)) = wire::control(&mut conn, &q).await else { return };
        for r in rows.into_iter().flatten() {
            let mut parts = r.split(':');
            let (Some(db), Some(n), Some(f)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let Some(shard) = db.strip_prefix("db_").and_then(|s| s.parse::<usize>().ok()) else { continue };
            if let Some(l) = lag.get_mut(shard) {
                *l = (*l).max(parts.next().and_then(|x| x.parse().ok()).unwrap_or(0));
            }
            if let Some(slot) = fresh.get_mut(shard) {
                slot.0 += n.parse::<i64>().unwrap_or(0);
                slot.1 += f.parse::<i64>().unwrap_or(0);
            }
        }
    }
    for (i, (p, f)) in fresh.into_iter().enumerate() {
        if engine.fallback.writes[i].load(Ordering::Acquire) == epochs[i] {
            engine.fallback.pending[i].store(p, Ordering::Release);
        } else {
            // a fallback write committed while we counted: never lower the count on a stale snapshot
            engine.fallback.pending[i].fetch_max(p, Ordering::AcqRel);
        }
        engine.fallback.failed[i].store(f, Ordering::Release);
        let label = super::exec::shard_label(i);
        metrics::gauge!(crate::metrics::FALLBACK_ROWS, "shard" => label, "status" => "pending").set((p - f) as f64);
        metrics::gauge!(crate::metrics::FALLBACK_ROWS, "shard" => label, "status" => "failed").set(f as f64);
        metrics::gauge!(crate::metrics::FALLBACK_LAG_SECONDS, "shard" => label).set(lag[i] as f64);
    }
}

/// The month of `name` if it is exactly a month table of `rule` as shardgate
/// prints it (`t_order_202611`); anything else is refused.
fn month_table_of(rule: &TableRule, name: &str) -> Option<MonthKey> {
    let m = name.strip_prefix(rule.name.as_str())?.strip_prefix('_').and_then(MonthKey::parse_suffix)?;
    (rule.physical(m) == name).then_some(m)
}

/// One sync-back batch for one shard, of rows with ids above `*after` (moved
/// past the batch, so a round walks the index forward instead of re-skipping
/// the entries of rows it already synced); returns rows handled (0 = done).
///
/// The batch travels as JSON: `db_default` aggregates the locked rows per
/// month table (`json_agg`), the shard turns them back into rows with
/// `json_populate_recordset` — values keep their exact text form, and neither
/// side parses thousands of literals.
pub async fn sync_batch(engine: &Engine, shard: usize, batch: u32, after: &mut i64) -> anyhow::Result<usize> {
    let Some(cols) = engine.fallback.columns.get() else { return Ok(0) };
    let mut total = 0;
    for rule in &engine.topology().tables {
        let t = table(rule);
        let id = &rule.id_column;
        let list = cols.join(", ");
        let mut def = engine.default.get().await.map_err(|e| anyhow::anyhow!("db_default: {e}"))?;
        // the batch must come from an ordered walk of the to-do index: during an outage the
        // table grows faster than its statistics, and a bitmap scan + sort of every pending
        // row per batch makes sync-back quadratic
        let from = if *after == i64::MIN { String::new() } else { format!("AND {id} > {}", *after) };
        let q = format!(
            "BEGIN; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off; \
             SELECT json_build_array(target_table, max({id}), array_agg({id}), json_agg(json_build_object({obj})))::text FROM ( \
               SELECT * FROM {t} WHERE target_db = 'db_{shard}' AND sync_status <> 'SYNCED' {from} \
               AND (next_attempt_at IS NULL OR next_attempt_at <= now()) ORDER BY {id} LIMIT {batch} FOR UPDATE SKIP LOCKED) b \
             GROUP BY target_table",
            obj = cols.iter().map(|c| format!("'{}', {c}", c.trim_matches('"').replace('\'', "''"))).collect::<Vec<_>>().join(", ")
        );
        // until its COMMIT succeeds, a return (`?`, a lost shard, a failed mark) drops the
        // connection, so the server rolls the block back: it must never go back to the
        // pool inside a transaction (the next user's statements would run in it)
        def.broken = true;
        let groups = match wire::control(&mut def, &q).await? {
            Ok(r) => r,
            Err(e) => {
                let _ = wire::control(&mut def, "ROLLBACK").await;
                anyhow::bail!("selecting a batch: SQLSTATE {}", e.code);
            }
        };
        if groups.is_empty() {
            if wire::control(&mut def, "COMMIT").await?.is_ok() {
                def.broken = false;
            }
            continue;
        }
        let mut shard_conn = match engine.shards[shard].get().await {
            Ok(c) => c,
            Err(e) => {
                let _ = wire::control(&mut def, "ROLLBACK").await;
                anyhow::bail!("db_{shard}: {e}");
            }
        };
        let update_set: Vec<String> = cols.iter().filter(|c| c.trim_matches('"') != id.as_str()).map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        let upsert = |target: &str, json: &str| {
            format!(
                "INSERT INTO {target} ({list}) SELECT {list} FROM json_populate_recordset(NULL::{target}, '{}') ON CONFLICT ({id}) DO UPDATE SET {}",
                json.replace('\'', "''"),
                update_set.join(", ")
            )
        };
        let mut synced: Vec<i64> = Vec::new();
        let mut failed: Vec<(i64, String)> = Vec::new();
        for g in groups.into_iter().flatten() {
            let v: serde_json::Value = serde_json::from_str(&g)?;
            let claimed = v[0].as_str().unwrap_or_default().to_string();
            if let Some(max) = v[1].as_i64() {
                *after = (*after).max(max);
            }
            let ids: Vec<i64> = v[2].as_array().map(|a| a.iter().filter_map(|x| x.as_i64()).collect()).unwrap_or_default();
            let rows = v[3].as_array().cloned().unwrap_or_default();
            // the fallback table is data: its target_table is only ever used as the name of
            // a month table shardgate itself prints, and each row must belong to this shard
            let Some(month) = month_table_of(rule, &claimed) else {
                for rid in &ids {
                    failed.push((*rid, format!("target_table {claimed:?} is not a month table of {}; the row was not synced", rule.name)));
                }
                continue;
            };
            let target = rule.physical(month);
            let (rows, misplaced): (Vec<serde_json::Value>, Vec<serde_json::Value>) = rows.into_iter().partition(|row| {
                row.get(rule.shard_key.as_str()).and_then(serde_json::Value::as_i64).is_some_and(|k| {
                    shardgate_router::keys::shard_of(shardgate_router::keys::MerchantId(k), engine.shards.len() as u8).0 as usize == shard
                })
            });
            for row in &misplaced {
                let rid = row.get(id.as_str()).and_then(serde_json::Value::as_i64).unwrap_or_default();
                failed.push((rid, format!("{} of the row does not belong to db_{shard}; the row was not synced", rule.shard_key)));
            }
            let ids: Vec<i64> = rows.iter().filter_map(|row| row.get(id.as_str()).and_then(serde_json::Value::as_i64)).collect();
            if rows.is_empty() {
                continue;
            }
            let json = serde_json::Value::Array(rows.clone()).to_string();
            let mut first = wire::control(&mut shard_conn, &upsert(&target, &json)).await?;
            if matches!(&first, Err(e) if e.code == sqlstate::UNDEFINED_TABLE) {
                // the month table is missing on this shard (it was down when the month was made)
                super::months::create(engine, &[month]).await;
                let _ = wire::control(&mut shard_conn, &rule.create_month_table_sql(month)).await;
                first = wire::control(&mut shard_conn, &upsert(&target, &json)).await?;
            }
            match first {
                Ok(_) => {
                    // the shard is serving: a recovering shard's slow probes are not an outage
                    engine.shard_answered(shard);
                    synced.extend(&ids);
                }
                Err(_) => {
                    // isolate the rows that cannot go home
                    for row in &rows {
                        let rid = row.get(id.as_str()).and_then(|x| x.as_i64()).unwrap_or_default();
                        match wire::control(&mut shard_conn, &upsert(&target, &format!("[{row}]"))).await? {
                            Ok(_) => synced.push(rid),
                            Err(e) => failed.push((rid, format!("SQLSTATE {}: {}", e.code, crate::protocol::backend::parse_error_fields(&e.raw[5..]).message))),
                        }
                    }
                }
            }
        }
        // the shard has committed (autocommit statements): now mark them in db_default
        let mut mark = String::new();
        if !synced.is_empty() {
            let ids: Vec<String> = synced.iter().map(i64::to_string).collect();
            mark.push_str(&format!("UPDATE {t} SET sync_status = 'SYNCED', synced_at = now(), last_error = NULL WHERE {id} = ANY('{{{}}}'::bigint[]); ", ids.join(",")));
        }
        for (rid, err) in &failed {
            // exponential backoff with jitter: 2^attempts seconds (at most 5 minutes) × 0.5..1.5
            let jitter = 0.5 + rand::random::<f64>();
            mark.push_str(&format!(
                "UPDATE {t} SET sync_status = 'FAILED', sync_attempts = sync_attempts + 1, last_error = {}, \
                 next_attempt_at = now() + least(power(2, sync_attempts + 1), 300) * {jitter:.3} * interval '1 second' WHERE {id} = {rid}; ",
                shardgate_router::quote::literal(err)
            ));
            tracing::warn!(shard, id = rid, error = %err, "a fallback row could not be synced back; will retry");
        }
        mark.push_str("COMMIT");
        wire::control(&mut def, &mark).await?.map_err(|e| anyhow::anyhow!("marking the batch: SQLSTATE {}", e.code))?;
        def.broken = false;
        engine.fallback.synced_total.fetch_add(synced.len() as i64, Ordering::Relaxed);
        metrics::counter!(crate::metrics::FALLBACK_SYNCED_TOTAL).increment(synced.len() as u64);
        total += synced.len() + failed.len();
    }
    Ok(total)
}

/// Brings one shard's unsynced rows home now (a read is waiting for them),
/// within `budget`; true when none are left.
pub async fn catch_up(engine: &Engine, shard: usize, batch: u32, budget: Duration) -> bool {
    let t0 = std::time::Instant::now();
    let mut after = i64::MIN;
    while t0.elapsed() < budget {
        match sync_batch(engine, shard, batch, &mut after).await {
            Ok(n) if n >= batch as usize => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(shard, error = %e, "catch-up before a read failed");
                return false;
            }
        }
    }
    // recount only this shard's rows, exactly. An INSERT planned while the shard was
    // down may still commit on the fallback table and be counted meanwhile: its count
    // stays (the count is cleared only if nothing was counted since it was read)
    let counted = engine.fallback.pending[shard].load(Ordering::Acquire);
    let Ok(mut conn) = engine.default.get().await else { return false };
    let mut left = 0i64;
    for rule in &engine.topology().tables {
        let q = format!("SELECT count(*) FROM {} WHERE target_db = 'db_{shard}' AND sync_status <> 'SYNCED'", table(rule));
        match wire::control(&mut conn, &q).await {
            Ok(Ok(rows)) => left += rows.into_iter().flatten().next().and_then(|n| n.parse::<i64>().ok()).unwrap_or(0),
            _ => return false,
        }
    }
    if left == 0 {
        engine.fallback.failed[shard].store(0, Ordering::Release);
        return engine.fallback.pending[shard].compare_exchange(counted, 0, Ordering::AcqRel, Ordering::Acquire).is_ok();
    }
    false
}

/// One sync-back round: every reachable shard with unsynced rows, batch after batch.
pub async fn sync_round(engine: &Engine, batch: u32) {
    for shard in 0..engine.shards.len() {
        // the cached count may lag a write that just committed: ask the table (an index probe)
        if engine.is_down(shard) {
            continue;
        }
        let mut after = i64::MIN;
        loop {
            match sync_batch(engine, shard, batch, &mut after).await {
                Ok(n) if n >= batch as usize => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(shard, error = %e, "sync-back round failed; will retry");
                    break;
                }
            }
        }
        let now_ms = jiff::Timestamp::now().as_millisecond();
        engine.fallback.last_sync_ms[shard].store(now_ms, Ordering::Relaxed);
    }
    recount(engine).await;
}

/// Deletes SYNCED rows older than the retention.
pub async fn purge(engine: &Engine, retention_hours: u64) {
    let Ok(mut conn) = engine.default.get().await else { return };
    for rule in &engine.topology().tables {
        let _ = wire::control(&mut conn, &format!("DELETE FROM {} WHERE sync_status = 'SYNCED' AND synced_at < now() - interval '{retention_hours} hours'", table(rule))).await;
    }
}

/// Background loop: sync-back every `sync_interval_ms`, purge hourly.
pub async fn run(engine: std::sync::Arc<Engine>, cfg: shardgate_config::FallbackConfig, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_millis(cfg.sync_interval_ms.max(100));
    let mut rounds: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !engine.fallback.ready() {
            if let Err(e) = prepare(&engine).await {
                tracing::warn!(error = %e, "fallback table not ready");
                continue;
            }
        }
        if engine.unfinished.any() {
            super::twopc::apply_unfinished(&engine).await;
        }
        recount(&engine).await;
        sync_round(&engine, cfg.batch_size.max(1)).await;
        rounds += 1;
        if rounds.is_multiple_of((3_600_000 / every.as_millis().max(1) as u64).max(1)) {
            purge(&engine, cfg.retention_hours).await;
        }
    }
}
