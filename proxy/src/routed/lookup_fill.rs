//! Filling a unique lookup from the rows already on the shards (see
//! [`super::lookup`]).

use std::time::Duration;

use shardgate_router::TableRule;

use super::lookup::{Meta, AMBIGUOUS};
use super::Engine;
use crate::backend::query as wire;
use crate::protocol::sqlstate;

/// A PostgreSQL text-array literal of `values` (every element quoted).
fn text_array<S: AsRef<str>>(values: &[S]) -> String {
    let mut out = String::from("{");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for ch in v.as_ref().chars() {
            if ch == '"' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Rows read per query while filling.
const FILL_BATCH: i64 = 5000;

/// Fills every incomplete lookup table from the rows on the shards (each month
/// table, by the unique column's index) and the fallback rows not yet home,
/// then marks it complete. Entries already there stay; a value found in
/// another place than its entry says is marked ambiguous (taken; reads by it
/// go everywhere). One proxy fills at a time (an advisory lock in
/// `db_default`); a round that cannot reach a shard is retried later.
pub async fn fill(engine: &Engine) {
    let Ok(meta) = engine.lookups.meta(engine).await else { return };
    for m in meta.iter().filter(|m| !m.complete.load(std::sync::atomic::Ordering::Relaxed)) {
        match fill_one(engine, m).await {
            Ok(Some((rows, ambiguous))) => {
                m.complete.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(table = %m.lookup_table, rows, ambiguous, "unique lookup filled from the shards; reads by it are routed now");
                if ambiguous > 0 {
                    tracing::warn!(table = %m.lookup_table, ambiguous, "values held by more than one existing row: they stay taken, reads by them go to every shard");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(table = %m.lookup_table, error = %e, "filling the unique lookup failed; will retry"),
        }
    }
}

async fn fill_one(engine: &Engine, m: &Meta) -> anyhow::Result<Option<(u64, u64)>> {
    let topo = engine.topology();
    let Some(rule) = topo.tables.iter().find(|r| r.name == m.table) else { return Ok(None) };
    let mut def = engine.default.get().await.map_err(|e| anyhow::anyhow!("db_default: {e}"))?;
    let lock = wire::query(&mut def, "SELECT pg_try_advisory_lock(hashtext($1))::text", &[Some(&m.lookup_table)]).await?.map_err(|e| anyhow::anyhow!("SQLSTATE {}", e.code))?;
    if lock.first().and_then(|r| r.first().cloned().flatten()).as_deref() != Some("true") {
        return Ok(None);
    }
    // the lock is the session's, not a transaction's: until it is given back, any way out
    // (an error, this task dropped at shutdown) closes the connection, which releases it,
    // rather than pooling a connection that holds it (every proxy's fill would skip forever)
    def.broken = true;
    let r = fill_locked(engine, rule, m, &mut def).await;
    if let Ok(Ok(rows)) = wire::query(&mut def, "SELECT pg_advisory_unlock(hashtext($1))::text", &[Some(&m.lookup_table)]).await {
        def.broken = rows.first().and_then(|r| r.first().cloned().flatten()).as_deref() != Some("true");
    }
    r.map(Some)
}

async fn fill_locked(engine: &Engine, rule: &TableRule, m: &Meta, def: &mut crate::backend::ServerConn) -> anyhow::Result<(u64, u64)> {
    // another proxy may have finished meanwhile
    let done = wire::query(def, "SELECT complete::text FROM shardgate_lookup_state WHERE lookup_table = $1", &[Some(&m.lookup_table)]).await?.map_err(|e| anyhow::anyhow!("SQLSTATE {}", e.code))?;
    if done.first().and_then(|r| r.first().cloned().flatten()).as_deref() == Some("true") {
        return Ok((0, 0));
    }
    let upsert = format!(
        "WITH e AS (INSERT INTO {t} (value, shard_key, month) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[]) \
         ON CONFLICT (value) DO UPDATE SET month = '{AMBIGUOUS}' \
         WHERE ({t}.shard_key, {t}.month) IS DISTINCT FROM (EXCLUDED.shard_key, EXCLUDED.month) RETURNING month) \
         SELECT count(*) FILTER (WHERE month = '{AMBIGUOUS}')::text FROM e",
        t = m.lookup_table
    );
    let (mut rows, mut ambiguous) = (0u64, 0u64);
    let mut record = async |def: &mut crate::backend::ServerConn, batch: &[(String, i64, String)]| -> anyhow::Result<()> {
        let values: Vec<&str> = batch.iter().map(|b| b.0.as_str()).collect();
        let keys: Vec<String> = batch.iter().map(|b| b.1.to_string()).collect();
        let months: Vec<&str> = batch.iter().map(|b| b.2.as_str()).collect();
        let r = wire::query(def, &upsert, &[Some(&text_array(&values)), Some(&text_array(&keys)), Some(&text_array(&months))])
            .await?
            .map_err(|e| anyhow::anyhow!("recording entries: SQLSTATE {}", e.code))?;
        rows += batch.len() as u64;
        ambiguous += r.first().and_then(|r| r.first().cloned().flatten()).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        Ok(())
    };
    let months = engine.months();
    for shard in 0..engine.shards.len() {
        let mut conn = tokio::time::timeout(Duration::from_secs(5), engine.shards[shard].get())
            .await
            .map_err(|_| anyhow::anyhow!("db_{shard}: timed out"))?
            .map_err(|e| anyhow::anyhow!("db_{shard}: {e}"))?;
        for month in months.iter() {
            let q = format!(
                "SELECT {c}::text, {k}::text FROM {t} WHERE {c} IS NOT NULL AND ($1::text IS NULL OR {c} > $1::text) ORDER BY {c} LIMIT {FILL_BATCH}",
                c = m.column,
                k = rule.shard_key,
                t = rule.physical(*month)
            );
            let mut after: Option<String> = None;
            loop {
                let batch = match wire::query(&mut conn, &q, &[after.as_deref()]).await? {
                    Ok(r) => r,
                    // a month this shard does not have
                    Err(e) if e.code == sqlstate::UNDEFINED_TABLE => break,
                    Err(e) => anyhow::bail!("reading db_{shard}.{}: SQLSTATE {}", rule.physical(*month), e.code),
                };
                let entries: Vec<(String, i64, String)> = batch
                    .iter()
                    .filter_map(|r| Some((r.first()?.clone()?, r.get(1)?.as_deref()?.parse().ok()?, month.suffix())))
                    .collect();
                if entries.is_empty() {
                    break;
                }
                after = entries.last().map(|e| e.0.clone());
                record(def, &entries).await?;
                if (entries.len() as i64) < FILL_BATCH {
                    break;
                }
            }
        }
    }
    // orders written while their shard was down, not yet home
    let q = format!(
        "SELECT {c}::text, {k}::text, target_table FROM {t} WHERE sync_status <> 'SYNCED' AND {c} IS NOT NULL",
        c = m.column,
        k = rule.shard_key,
        t = rule.fallback_table()
    );
    if let Ok(rows_fb) = wire::query(def, &q, &[]).await? {
        let prefix = rule.pattern.split("{yyyyMM}").next().unwrap_or_default().to_string();
        let entries: Vec<(String, i64, String)> = rows_fb
            .iter()
            .filter_map(|r| Some((r.first()?.clone()?, r.get(1)?.as_deref()?.parse().ok()?, r.get(2)?.as_deref()?.strip_prefix(prefix.as_str())?.to_string())))
            .collect();
        for chunk in entries.chunks(FILL_BATCH as usize) {
            record(def, chunk).await?;
        }
    }
    wire::query(def, "UPDATE shardgate_lookup_state SET complete = true, filled_at = now() WHERE lookup_table = $1", &[Some(&m.lookup_table)])
        .await?
        .map_err(|e| anyhow::anyhow!("SQLSTATE {}", e.code))?;
    Ok((rows, ambiguous))
}
