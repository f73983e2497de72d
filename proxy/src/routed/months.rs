//! Month tables: found on the shards, created ahead of need by a background
//! maintainer (`sharding.months_ahead`), and created on demand when a write
//! names a month no shard has yet.

use std::time::Duration;

use shardgate_router::month::MonthKey;

use crate::backend::query as wire;
use super::Engine;
use crate::protocol::sqlstate;

/// How often the maintainer runs.
pub const INTERVAL: Duration = Duration::from_secs(600);

/// The month of now and the `ahead` months after it.
pub fn wanted(now: jiff::Timestamp, tz: &jiff::tz::TimeZone, ahead: u32) -> Vec<MonthKey> {
    let first = MonthKey::of(now, tz).ordinal();
    (first..=first + ahead as i32).filter_map(MonthKey::from_ordinal).collect()
}

/// Refuses months an INSERT would have to create outside
/// `sharding.create_months_back` / `create_months_ahead` of now (months that
/// exist already are always fine).
pub fn within_window(engine: &Engine, cfg: &shardgate_config::ShardingConfig, months: &[MonthKey]) -> Result<(), String> {
    let existing = engine.months();
    let now = MonthKey::of(jiff::Timestamp::now(), &engine.topology().tz).ordinal();
    let (lo, hi) = (now - cfg.create_months_back as i32, now + cfg.create_months_ahead as i32);
    match months.iter().find(|m| !existing.contains(m) && !(lo..=hi).contains(&m.ordinal())) {
        None => Ok(()),
        Some(m) => Err(format!(
            "create_time in {} would need a new month table outside the months an INSERT may create \
             (sharding.create_months_back = {}, create_months_ahead = {}); check the value, or create the month table on every shard first",
            m.suffix(),
            cfg.create_months_back,
            cfg.create_months_ahead
        )),
    }
}

/// Month suffixes of the physical tables of every sharded table on one shard.
async fn existing_on(engine: &Engine, shard: usize) -> anyhow::Result<Vec<MonthKey>> {
    let mut conn = tokio::time::timeout(Duration::from_secs(5), engine.shards[shard].get())
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    list(engine, &mut conn).await
}

/// Month suffixes of the physical tables of every sharded table, read on `conn`.
pub async fn list(engine: &Engine, conn: &mut crate::backend::ServerConn) -> anyhow::Result<Vec<MonthKey>> {
    let mut found = Vec::new();
    for rule in &engine.topology().tables {
        let (prefix, suffix) = rule.pattern.split_once("{yyyyMM}").unwrap_or((&rule.pattern, ""));
        let q = format!(
            "SELECT c.relname FROM pg_class c WHERE c.relkind IN ('r','p') AND c.relnamespace = 'public'::regnamespace AND c.relname LIKE '{}%{}'",
            prefix.replace('_', "\\_"),
            suffix.replace('_', "\\_")
        );
        let rows = wire::control(conn, &q).await?.map_err(|e| anyhow::anyhow!("SQLSTATE {}", e.code))?;
        for name in rows.into_iter().flatten() {
            let mid = &name[prefix.len().min(name.len())..name.len().saturating_sub(suffix.len())];
            if let Some(m) = MonthKey::parse_suffix(mid) {
                found.push(m);
            }
        }
    }
    Ok(found)
}

/// Creates every known month on one shard (it was down while some were made).
pub async fn fill_in(engine: &Engine, shard: usize) -> bool {
    let months = engine.months();
    let ok = create_on(engine, shard, &months).await;
    if ok {
        filled(engine, shard, &months);
    }
    ok
}

/// `shard` now has `months`: they are no longer gaps there.
fn filled(engine: &Engine, shard: usize, months: &[MonthKey]) {
    if let Ok(mut g) = engine.month_gaps.lock() {
        g.retain(|(s, m, _)| *s != shard || !months.contains(m));
    }
}

/// Records that `shard` lacks `m` (once), not yet tried.
fn add_gap(gaps: &mut Vec<(usize, MonthKey, Option<std::time::Instant>)>, shard: usize, m: MonthKey) {
    if !gaps.iter().any(|(s, gm, _)| *s == shard && *gm == m) {
        gaps.push((shard, m, None));
    }
}

/// Creates `months` on every shard (idempotent); returns the shards that failed.
/// A month made on some shards is known from then on; the shards that failed
/// are remembered as gaps, filled by [`fill_gaps`] before a statement into that month
/// once they answer again (a shard that returns from down before the month
/// was known would otherwise never get it).
pub async fn create(engine: &Engine, months: &[MonthKey]) -> Vec<usize> {
    let mut failed = Vec::new();
    for shard in 0..engine.shards.len() {
        if !create_on(engine, shard, months).await {
            failed.push(shard);
        }
    }
    if let Ok(mut gaps) = engine.month_gaps.lock() {
        gaps.retain(|(s, m, _)| failed.contains(s) || !months.contains(m));
        // not yet tried by fill_gaps: the shard may answer again before this month is
        // known (its return fills only the months known then), so the first statement
        // into the month there makes it
        for &s in &failed {
            for &m in months {
                add_gap(&mut gaps, s, m);
            }
        }
    }
    if failed.len() < engine.shards.len() {
        engine.add_months(months);
    }
    failed
}

/// Learns the gaps from one listing of every shard's month tables (`None`:
/// that shard's listing failed): a month of `found` a listed shard lacks is a
/// gap, one it has is not.
pub fn note_listed(engine: &Engine, lists: &[Option<Vec<MonthKey>>], found: &[MonthKey]) {
    let Ok(mut gaps) = engine.month_gaps.lock() else { return };
    for (shard, list) in lists.iter().enumerate() {
        let Some(list) = list else { continue };
        gaps.retain(|(s, m, _)| *s != shard || !list.contains(m));
        for m in found.iter().filter(|m| !list.contains(m)) {
            add_gap(&mut gaps, shard, *m);
        }
    }
}

/// Whether some shard missed a month when it was made.
pub fn has_gaps(engine: &Engine) -> bool {
    engine.month_gaps.lock().is_ok_and(|g| !g.is_empty())
}

/// A gap is tried again at most this often (a shard that cannot be reached
/// yet, or whose CREATE fails, must not slow every statement into the month).
const GAP_RETRY: Duration = Duration::from_secs(1);

/// Makes the months among `months` that a shard missed while it was away,
/// on that shard, now that it answers (before a statement reads or writes
/// them there).
pub async fn fill_gaps(engine: &Engine, months: &[MonthKey]) {
    let relevant = |engine: &Engine| engine.month_gaps.lock().is_ok_and(|g| g.iter().any(|(s, m, _)| months.contains(m) && !engine.is_down(*s)));
    if !relevant(engine) {
        return;
    }
    // one session fills; the others wait for it rather than run into a month it has
    // not made yet on their shard
    let _filling = engine.gap_fill.lock().await;
    let due: Vec<(usize, MonthKey)> = match engine.month_gaps.lock() {
        Ok(mut g) => {
            let now = std::time::Instant::now();
            g.iter_mut()
                .filter(|(s, m, tried)| months.contains(m) && !engine.is_down(*s) && tried.is_none_or(|t| now.duration_since(t) >= GAP_RETRY))
                .map(|g| {
                    g.2 = Some(now);
                    (g.0, g.1)
                })
                .collect()
        }
        Err(_) => return,
    };
    let mut shards: Vec<usize> = due.iter().map(|(s, _)| *s).collect();
    shards.sort_unstable();
    shards.dedup();
    for shard in shards {
        let ms: Vec<MonthKey> = due.iter().filter(|(s, _)| *s == shard).map(|(_, m)| *m).collect();
        tracing::info!(shard, months = ?ms.iter().map(|m| m.suffix()).collect::<Vec<_>>(), "creating month tables a shard lacks");
        if create_on(engine, shard, &ms).await {
            filled(engine, shard, &ms);
        }
    }
}

async fn create_on(engine: &Engine, shard: usize, months: &[MonthKey]) -> bool {
    let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(5), engine.shards[shard].get()).await else { return false };
    for rule in &engine.topology().tables {
        for m in months {
            match wire::control(&mut conn, &rule.create_month_table_sql(*m)).await {
                Ok(Ok(_)) => {}
                // two creators of the same table at once (proxies, shardgate-migrate): the loser
                // sees a unique violation on pg_type, or "type … already exists" (42710) when the
                // other committed between its existence check and its create
                Ok(Err(e)) if [sqlstate::UNIQUE_VIOLATION, sqlstate::DUPLICATE_TABLE, sqlstate::DUPLICATE_OBJECT].contains(&e.code.as_str()) => {}
                Ok(Err(e)) => {
                    tracing::warn!(shard, month = %m.suffix(), sqlstate = %e.code, "creating a month table failed");
                    return false;
                }
                Err(_) => {
                    conn.broken = true;
                    return false;
                }
            }
        }
    }
    true
}

/// One maintainer pass: learn existing months, create the wanted ones.
pub async fn maintain(engine: &Engine, ahead: u32) {
    let mut found = Vec::new();
    for shard in 0..engine.shards.len() {
        match existing_on(engine, shard).await {
            Ok(m) => found.extend(m),
            Err(e) => tracing::warn!(shard, error = %e, "listing month tables failed"),
        }
    }
    found.sort();
    found.dedup();
    engine.add_months(&found);
    let tz = engine.topology().tz.clone();
    let mut want = wanted(jiff::Timestamp::now(), &tz, ahead);
    // months some shard has but another may lack (created while it was down)
    want.extend(found.iter().copied());
    want.sort();
    want.dedup();
    let failed = create(engine, &want).await;
    if !failed.is_empty() {
        tracing::warn!(?failed, "month tables could not be created on some shards; will retry");
    }
}

/// Makes sure the months a write names exist (created from the template if not).
///
/// Other proxies learn of a new month table at their next health probe (each
/// probe lists the month tables of its shard); until then their reads would
/// not look in it. So when this creates a table and another proxy may be
/// running (a live worker-id lease other than ours in `db_default`, or no way
/// to tell), the write waits [`settle`] before its rows go in.
pub async fn ensure(engine: &Engine, months: &[MonthKey]) {
    let known = engine.months();
    let missing: Vec<MonthKey> = months.iter().copied().filter(|m| !known.contains(m)).collect();
    if !missing.is_empty() {
        tracing::info!(months = ?missing.iter().map(|m| m.suffix()).collect::<Vec<_>>(), "creating month tables on demand");
        // asked once, at creation: later writes into the month only read the note
        if create(engine, &missing).await.len() < engine.shards.len() && super::lease::others_live(engine).await != Some(0) {
            // settling until every proxy has listed them (the maintainer's months ahead are
            // made months before any order is dated in them, and at startup no one waits)
            let until = std::time::Instant::now() + settle(&engine.health_cfg);
            if let Ok(mut s) = engine.settling.lock() {
                s.retain(|(_, t)| *t > std::time::Instant::now());
                s.extend(missing.iter().map(|m| (*m, until)));
            }
        }
    }
    // (a month this call just made was just tried on every shard)
    let known_before: Vec<MonthKey> = months.iter().copied().filter(|m| !missing.contains(m)).collect();
    if !known_before.is_empty() {
        fill_gaps(engine, &known_before).await;
    }
    // a month made moments ago on demand (by this write or another session) waits
    // until every proxy has listed it, when another proxy may be reading
    let now = std::time::Instant::now();
    let until = engine.settling.lock().ok().and_then(|s| s.iter().filter(|(m, t)| months.contains(m) && *t > now).map(|(_, t)| *t).max());
    if let Some(until) = until {
        tracing::info!(wait_ms = until.saturating_duration_since(now).as_millis() as u64, "waiting for other proxies to see new month tables");
        tokio::time::sleep_until(until.into()).await;
    }
}

/// How long after a month table is created every running proxy has listed
/// it: two probe rounds (each the interval, then a probe and a listing of at
/// most a timeout each).
pub fn settle(h: &shardgate_config::HealthConfig) -> Duration {
    Duration::from_millis(2 * (h.probe_interval_ms.max(50) + 2 * h.probe_timeout_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_months_cross_the_year() {
        let now: jiff::Timestamp = "2026-11-22T10:00:00Z".parse().expect("ts");
        let w: Vec<String> = wanted(now, &jiff::tz::TimeZone::UTC, 3).iter().map(|m| m.suffix()).collect();
        assert_eq!(w, ["202611", "202612", "202701", "202702"]);
    }
}
