//! Transactions that write on several shards commit atomically with
//! two-phase commit:
//!
//! 1. `PREPARE TRANSACTION '<gid>_s<n>'` on every written shard (any failure:
//!    roll everything back, the client gets the error);
//! 2. the decision — a row in `shardgate_2pc_decisions` in `db_default` —
//!    is committed (inside the client's own `db_default` transaction when
//!    there is one, so the decision and that work commit together);
//! 3. `COMMIT PREPARED` on every shard; the decision row is then deleted
//!    in a batch, off the client's path ([`sweep_forgotten`]).
//!
//! [`recover`] runs at startup and periodically: a prepared transaction left
//! by a crash is committed if its decision row exists and rolled back if not.

use std::time::Duration;

use super::exec::{ExecError, Slots};
use crate::backend::query as wire;
use super::Engine;
use crate::protocol::sqlstate;

/// The decision log, created in `db_default` at startup. `outcome` is
/// `commit` for a proxy's decision and `abort` for recovery's marker: both
/// insert the gid, so whichever commits first wins and the other fails on
/// the primary key (a late decision can never commit after recovery rolled
/// its shards back).
pub const DECISIONS_DDL: &str =
    "CREATE TABLE IF NOT EXISTS shardgate_2pc_decisions (gid text PRIMARY KEY, shards int[] NOT NULL, decided_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
     ALTER TABLE shardgate_2pc_decisions ADD COLUMN IF NOT EXISTS outcome text NOT NULL DEFAULT 'commit'; \
     ALTER TABLE shardgate_2pc_decisions ALTER COLUMN decided_at SET DEFAULT clock_timestamp()";

/// Fault injection for the crash tests: with `SHARDGATE_CRASH_AT` set to a
/// step's name (`after_prepare`, `after_decision`, `during_commit_prepared`,
/// `after_entries` of [`super::entries`])
/// the process aborts there, as a SIGKILL would stop it (nothing finished,
/// nothing cleaned up). Unset, this is one cached comparison.
pub fn crash_point(step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var("SHARDGATE_CRASH_AT").ok()).as_deref() == Some(step) {
        eprintln!("SHARDGATE_CRASH_AT={step}: aborting");
        std::process::abort();
    }
}

/// Like [`crash_point`], a pause for the fault tests: `SHARDGATE_PAUSE_AT=<step>=<ms>`
/// holds the commit at that step (a test stops a shard meanwhile).
pub async fn pause_point(step: &str) {
    static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var("SHARDGATE_PAUSE_AT").ok()?;
        let (s, ms) = v.split_once('=')?;
        Some((s.to_string(), ms.parse().ok()?))
    });
    if let Some((s, ms)) = at {
        if s == step {
            tokio::time::sleep(Duration::from_millis(*ms)).await;
        }
    }
}

/// A new global transaction id: worker, time, randomness.
pub fn new_gid(worker: u16) -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    format!("sg_{worker}_{ms}_{:08x}", rand::random::<u32>())
}

/// The name of `gid`'s prepared transaction on `shard`.
pub fn shard_gid(gid: &str, shard: usize) -> String {
    format!("{gid}_s{shard}")
}

/// Statement that records the commit decision.
pub fn decision_sql(gid: &str, shards: &[usize]) -> String {
    // clock_timestamp(), not now(): inside a long client transaction now() is its start, and the
    // cleanup of old rows must never take a decision whose shards may still be committing
    format!("INSERT INTO shardgate_2pc_decisions (gid, shards, decided_at) VALUES ('{gid}', '{}', clock_timestamp())", shard_array(shards))
}

/// The shards of a decision as an `int[]` literal: `{0,3}`.
fn shard_array(shards: &[usize]) -> String {
    let list: Vec<String> = shards.iter().map(|s| s.to_string()).collect();
    format!("{{{}}}", list.join(","))
}

/// Phase one on every shard in `shards`; on failure everything is rolled back.
pub async fn prepare(engine: &Engine, slots: &mut Slots, shards: &[usize], gid: &str) -> Result<(), ExecError> {
    let mut prepared = Vec::new();
    for &s in shards {
        let Some(slot) = slots.get_mut(s).and_then(Option::as_mut) else { continue };
        let r = if slot.preparing.take().is_some() {
            // sent behind the statement, in its round trip: only the answer is left to read
            wire::read_tag(&mut slot.conn).await
        } else {
            wire::control_tag(&mut slot.conn, &format!("PREPARE TRANSACTION '{}'", shard_gid(gid, s))).await
        };
        slot.in_tx = false;
        match r {
            Ok(Ok(tag)) if tag == "PREPARE TRANSACTION" => prepared.push(s),
            // PREPARE of a transaction that had failed rolls it back and says ROLLBACK, no error
            Ok(Ok(tag)) => {
                tracing::warn!(shard = s, tag, "PREPARE TRANSACTION did not prepare; rolling the transaction back");
                finish(engine, slots, &prepared, gid, false).await;
                rollback(slots, shards).await;
                return Err(ExecError::Proxy(sqlstate::TRANSACTION_ROLLBACK, format!("the transaction on shard db_{s} had failed and was rolled back; nothing was committed")));
            }
            Ok(Err(e)) => {
                finish(engine, slots, &prepared, gid, false).await;
                rollback(slots, shards).await;
                return Err(ExecError::Server(e));
            }
            Err(e) => {
                slot.conn.broken = true;
                tracing::warn!(shard = s, error = %e, "shard lost during PREPARE TRANSACTION");
                finish(engine, slots, &prepared, gid, false).await;
                rollback(slots, shards).await;
                return Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, format!("lost the connection to shard db_{s} while committing; the transaction was rolled back")));
            }
        }
    }
    crash_point("after_prepare");
    Ok(())
}

/// Phase two: COMMIT or ROLLBACK PREPARED on each shard. Failures are left
/// to [`recover`] (the decision row says what to do); true when every shard
/// is resolved.
pub async fn finish(engine: &Engine, slots: &mut Slots, shards: &[usize], gid: &str, commit: bool) -> bool {
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    let mut missed = Vec::new();
    for &s in shards {
        let Some(slot) = slots.get_mut(s).and_then(Option::as_mut) else {
            missed.push(s);
            continue;
        };
        match wire::control(&mut slot.conn, &format!("{verb} PREPARED '{}'", shard_gid(gid, s))).await {
            Ok(Ok(_)) if commit => crash_point("during_commit_prepared"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                missed.push(s);
                tracing::warn!(shard = s, sqlstate = %e.code, gid, "{verb} PREPARED failed; recovery will retry");
            }
            Err(e) => {
                missed.push(s);
                slot.conn.broken = true;
                tracing::warn!(shard = s, error = %e, gid, "{verb} PREPARED failed; recovery will retry");
            }
        }
    }
    if commit && !missed.is_empty() {
        engine.unfinished.add(gid, &missed);
    }
    missed.is_empty()
}

/// Committed two-phase transactions this proxy could not yet apply on some
/// shards (the shard went away between the decision and `COMMIT PREPARED`).
/// They are retried as soon as the shard answers again, and a statement on
/// such a shard first finishes them: until then the shard would answer
/// without rows that were acknowledged.
#[derive(Default)]
pub struct Unfinished {
    list: std::sync::Mutex<Vec<(String, Vec<usize>)>>,
}

impl Unfinished {
    fn add(&self, gid: &str, shards: &[usize]) {
        if let Ok(mut l) = self.list.lock() {
            match l.iter_mut().find(|(g, _)| g == gid) {
                Some((_, s)) => s.extend_from_slice(shards),
                None => l.push((gid.to_string(), shards.to_vec())),
            }
        }
    }

    /// Whether a decided transaction still waits on `shard`.
    pub fn waits_on(&self, shard: usize) -> bool {
        self.list.lock().map(|l| l.iter().any(|(_, s)| s.contains(&shard))).unwrap_or(false)
    }

    /// Whether any decided transaction is unfinished.
    pub fn any(&self) -> bool {
        self.list.lock().map(|l| !l.is_empty()).unwrap_or(false)
    }
}

/// Applies the unfinished commits on every shard that answers; a shard
/// that no longer has the prepared transaction (recovery, another proxy)
/// counts as done.
pub async fn apply_unfinished(engine: &Engine) {
    let work: Vec<(String, Vec<usize>)> = engine.unfinished.list.lock().map(|l| l.clone()).unwrap_or_default();
    for (gid, shards) in work {
        let mut left = Vec::new();
        for s in shards {
            let done = match tokio::time::timeout(Duration::from_secs(2), engine.pool(s).get()).await {
                Ok(Ok(mut conn)) => match wire::control(&mut conn, &format!("COMMIT PREPARED '{}'", shard_gid(&gid, s))).await {
                    Ok(Ok(_)) => true,
                    // undefined_object: nothing prepared under that name any more
                    Ok(Err(e)) => e.code == sqlstate::UNDEFINED_OBJECT,
                    Err(_) => {
                        conn.broken = true;
                        false
                    }
                },
                _ => false,
            };
            if done {
                tracing::info!(shard = s, gid, "applied a committed two-phase transaction the shard had missed");
            } else {
                left.push(s);
            }
        }
        if let Ok(mut l) = engine.unfinished.list.lock() {
            match l.iter().position(|(g, _)| *g == gid) {
                Some(i) if left.is_empty() => {
                    l.remove(i);
                }
                Some(i) => l[i].1.retain(|s| left.contains(s)),
                None => {}
            }
        }
        if left.is_empty() {
            forget(engine, &gid);
        }
    }
}

/// Ends the block of a slot whose `PREPARE TRANSACTION` went behind its
/// statement and whose statement's answer has been read: reads that
/// PREPARE's answer and undoes a prepared transaction by name. Anything but
/// the two answers a PREPARE gives (prepared, or ROLLBACK for a failed
/// block) means the connection is out of step: it is closed (an undecided
/// prepared transaction is rolled back by [`recover`]).
pub async fn undo_prepare(slot: &mut super::slots::ShardSlot, shard: usize) {
    let Some(name) = slot.preparing.take() else { return };
    slot.in_tx = false;
    slot.wrote = false;
    if slot.conn.broken {
        return;
    }
    let prepared = match wire::read_tag(&mut slot.conn).await {
        Ok(Ok(tag)) if tag == "PREPARE TRANSACTION" => true,
        Ok(Ok(tag)) if tag == "ROLLBACK" => false,
        _ => {
            slot.conn.broken = true;
            return;
        }
    };
    if prepared && !matches!(wire::control(&mut slot.conn, &format!("ROLLBACK PREPARED '{name}'")).await, Ok(Ok(_))) {
        slot.conn.broken = true;
        tracing::warn!(shard, gid = name, "ROLLBACK PREPARED failed; recovery will roll it back");
    }
}

/// Rolls back the open transaction block on each shard (best effort).
pub async fn rollback(slots: &mut Slots, shards: &[usize]) {
    for &s in shards {
        let Some(slot) = slots.get_mut(s).and_then(Option::as_mut) else { continue };
        if !slot.in_tx {
            continue;
        }
        if slot.conn.has_deferred() {
            // its BEGIN was never sent: there is no block on the server to end
            slot.conn.drop_deferred();
            slot.in_tx = false;
            slot.wrote = false;
            continue;
        }
        if slot.preparing.is_some() {
            undo_prepare(slot, s).await;
            continue;
        }
        if slot.conn.broken {
            // closing the connection rolls it back; its pending answer is not read
            slot.in_tx = false;
            slot.wrote = false;
            continue;
        }
        wire::rollback(&mut slot.conn).await;
        slot.in_tx = false;
        slot.wrote = false;
    }
}

/// Commits each shard's block alone (at most one shard wrote).
pub async fn commit_each(slots: &mut Slots, shards: &[usize]) -> Result<(), ExecError> {
    let mut err = None;
    for &s in shards {
        let Some(slot) = slots.get_mut(s).and_then(Option::as_mut) else { continue };
        if !slot.in_tx {
            continue;
        }
        if slot.conn.has_deferred() {
            slot.conn.drop_deferred();
            slot.in_tx = false;
            slot.wrote = false;
            continue;
        }
        let verb = if err.is_some() { "ROLLBACK" } else { "COMMIT" };
        match wire::control(&mut slot.conn, verb).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                err.get_or_insert(ExecError::Server(e));
            }
            Err(e) => {
                slot.conn.broken = true;
                tracing::warn!(shard = s, error = %e, "shard lost during COMMIT");
                err.get_or_insert(ExecError::Proxy(
                    sqlstate::CONNECTION_FAILURE,
                    format!("lost the connection to shard db_{s} during COMMIT; the outcome on that shard is unknown"),
                ));
            }
        }
        slot.in_tx = false;
        slot.wrote = false;
    }
    err.map_or(Ok(()), Err)
}

/// A whole two-phase commit with the decision written on its own `db_default`
/// connection (statements outside a transaction block).
pub async fn commit(engine: &Engine, slots: &mut Slots, shards: &[usize]) -> Result<(), ExecError> {
    commit_as(engine, slots, shards, new_gid(engine.worker())).await
}

/// [`commit`] under `gid`, whose PREPAREs may already be on their way
/// ([`super::slots::ShardSlot::preparing`]).
pub async fn commit_as(engine: &Engine, slots: &mut Slots, shards: &[usize], gid: String) -> Result<(), ExecError> {
    let local = engine.shards.len();
    if shards.contains(&local) && slots.get(local).and_then(Option::as_ref).is_some_and(|s| s.in_tx) {
        return commit_carried(engine, slots, shards, local, &gid).await;
    }
    prepare(engine, slots, shards, &gid).await?;
    let decided = match engine.default.get().await {
        Ok(mut conn) => match wire::control(&mut conn, &decision_sql(&gid, shards)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(decision_failed(e)),
            Err(e) => {
                conn.broken = true;
                Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, format!("lost db_default while recording the commit decision: {e}")))
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "db_default unavailable for the commit decision");
            Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "db_default is unavailable to record the commit decision; the transaction was rolled back".into()))
        }
    };
    match decided {
        Ok(()) => {
            crash_point("after_decision");
            // the decision row stays until every participant has committed (recovery finishes the rest)
            if finish(engine, slots, shards, &gid, true).await {
                forget(engine, &gid);
            }
            Ok(())
        }
        Err(e) => {
            finish(engine, slots, shards, &gid, false).await;
            Err(e)
        }
    }
}

/// [`commit`] when `db_default` takes part (unique-lookup entries, fallback
/// rows): its transaction is not prepared but carries the decision row and
/// commits with it, one step fewer. If that COMMIT's answer is lost, the
/// outcome is whatever `db_default` did; recovery reads it from the decision
/// log and the shards follow (never rolled back here on a guess).
async fn commit_carried(engine: &Engine, slots: &mut Slots, shards: &[usize], local: usize, gid: &str) -> Result<(), ExecError> {
    let remote: Vec<usize> = shards.iter().copied().filter(|&s| s != local).collect();
    if let Err(e) = prepare(engine, slots, &remote, gid).await {
        rollback(slots, &[local]).await;
        return Err(e);
    }
    let slot = slots[local].as_mut().expect("checked by the caller");
    let r = wire::control(&mut slot.conn, &format!("{}; COMMIT", decision_sql(gid, &remote))).await;
    slot.in_tx = false;
    slot.wrote = false;
    match r {
        Ok(Ok(_)) => {
            apply_decision(engine, slots, &remote, gid).await;
            Ok(())
        }
        Ok(Err(e)) => {
            // the decision did not commit (COMMIT of a failed block rolls it back)
            wire::rollback(&mut slots[local].as_mut().expect("held").conn).await;
            finish(engine, slots, &remote, gid, false).await;
            Err(decision_failed(e))
        }
        Err(e) => Err(lost_at_commit(slots, local, gid, &e)),
    }
}

/// After `db_default` committed the decision of a carried commit: COMMIT
/// PREPARED on the shards (what fails is left to recovery), and the decision
/// row forgotten once all did.
async fn apply_decision(engine: &Engine, slots: &mut Slots, shards: &[usize], gid: &str) {
    crash_point("after_decision");
    pause_point("after_decision").await;
    if finish(engine, slots, shards, gid, true).await {
        forget(engine, gid);
    }
}

/// `db_default`'s connection was lost while it committed the decision: the
/// outcome is whatever it did, read back by recovery (never guessed here).
fn lost_at_commit(slots: &mut Slots, local: usize, gid: &str, e: &crate::backend::BackendError) -> ExecError {
    if let Some(slot) = slots.get_mut(local).and_then(Option::as_mut) {
        slot.conn.broken = true;
    }
    tracing::warn!(error = %e, gid, "db_default lost during the commit; recovery settles the shards from the decision log");
    ExecError::Proxy(
        sqlstate::CONNECTION_FAILURE,
        "lost the connection to db_default during COMMIT; the outcome is unknown (recovery applies it to every shard)".into(),
    )
}

/// Whether a server error is about the decision log itself.
fn on_decision_log(e: &wire::ServerError) -> bool {
    e.raw.get(5..).is_some_and(|body| crate::protocol::backend::parse_error_fields(body).table == "shardgate_2pc_decisions")
}

/// The error for a decision that could not be written. A unique violation on
/// the decision log means recovery's abort marker came first (the proxy was
/// too slow): the transaction was rolled back, which the client must not read
/// as a taken key.
pub fn decision_failed(e: wire::ServerError) -> ExecError {
    // a conflict on the decision log itself (recovery's abort marker), not on the
    // client's own tables (a deferred constraint checked by the same commit)
    if e.code == sqlstate::UNIQUE_VIOLATION && on_decision_log(&e) {
        ExecError::Proxy(sqlstate::SERIALIZATION_FAILURE, "could not serialize access: recovery rolled the transaction back while it was committing; retry it".into())
    } else {
        ExecError::Server(e)
    }
}

/// Whether the decision row for `gid` exists (`None`: db_default unreachable).
pub async fn decided(engine: &Engine, gid: &str) -> Option<bool> {
    let mut conn = engine.default.get().await.ok()?;
    match wire::control(&mut conn, &format!("SELECT 1 FROM shardgate_2pc_decisions WHERE gid = '{gid}' AND outcome = 'commit'")).await {
        Ok(Ok(rows)) => Some(!rows.is_empty()),
        _ => None,
    }
}

/// Phase two on fresh pool connections (the prepared transactions no longer
/// belong to any session); what fails is left to [`recover`].
pub async fn resolve(engine: &Engine, gid: &str, shards: &[usize], commit: bool) {
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    let mut all = true;
    for &s in shards {
        let ok = match engine.pool(s).get().await {
            Ok(mut conn) => {
                let ok = matches!(wire::control(&mut conn, &format!("{verb} PREPARED '{}'", shard_gid(gid, s))).await, Ok(Ok(_)));
                if ok && commit {
                    crash_point("during_commit_prepared");
                }
                ok
            }
            Err(_) => false,
        };
        if !ok {
            all = false;
            tracing::warn!(shard = s, gid, "{verb} PREPARED failed; recovery will retry");
            if commit {
                engine.unfinished.add(gid, &[s]);
            }
        }
    }
    if commit && all {
        metrics::counter!(crate::metrics::TWO_PHASE_COMMITS).increment(1);
        forget(engine, gid);
    }
}

/// Decision rows whose transactions every shard has committed: deleted in
/// batches by [`sweep_forgotten`], off the client's path. A row is only read
/// while its gid is still prepared somewhere, so one left behind changes no
/// outcome; [`recover`] deletes any a crash leaves after an hour.
#[derive(Default)]
pub struct Forgotten {
    list: std::sync::Mutex<Vec<String>>,
    wake: tokio::sync::Notify,
}

/// At most this many decision rows wait for deletion (db_default down for
/// long): beyond it the oldest are left to [`recover`]'s hourly cleanup.
const FORGOTTEN_MAX: usize = 100_000;

/// Deletes a decision once every shard committed, soon and in a batch.
pub fn forget(engine: &Engine, gid: &str) {
    if let Ok(mut l) = engine.forgotten.list.lock() {
        if l.len() >= FORGOTTEN_MAX {
            l.remove(0);
        }
        l.push(gid.to_string());
    }
    engine.forgotten.wake.notify_one();
}

/// Deletes the forgotten decision rows, up to 1,000 in one statement, until
/// shutdown.
pub async fn sweep_forgotten(engine: std::sync::Arc<Engine>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = engine.forgotten.wake.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // let the commits of the next few milliseconds join this batch
        tokio::time::sleep(Duration::from_millis(20)).await;
        let batch: Vec<String> = match engine.forgotten.list.lock() {
            Ok(mut l) => {
                let n = l.len().min(1000);
                l.drain(..n).collect()
            }
            Err(_) => return,
        };
        if batch.is_empty() {
            continue;
        }
        let list = format!("{{{}}}", batch.join(","));
        let done = match engine.default.get().await {
            Ok(mut conn) => matches!(wire::query(&mut conn, "DELETE FROM shardgate_2pc_decisions WHERE gid = ANY($1::text[])", &[Some(&list)]).await, Ok(Ok(_))),
            Err(_) => false,
        };
        if let Ok(mut l) = engine.forgotten.list.lock() {
            if !done {
                // db_default unreachable: kept for the next try (bounded)
                let room = FORGOTTEN_MAX.saturating_sub(l.len());
                l.splice(0..0, batch.into_iter().take(room));
            }
            if !l.is_empty() {
                engine.forgotten.wake.notify_one();
            }
        }
        if !done {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Resolves orphaned prepared transactions on every reachable shard.
pub async fn recover(engine: &Engine) -> anyhow::Result<usize> {
    let mut def = engine.default.get().await.map_err(|e| anyhow::anyhow!("db_default: {e}"))?;
    let mut resolved = 0;
    let mut all_reachable = true;
    // decisions whose transactions are still prepared somewhere: never cleaned up
    let mut seen: Vec<String> = Vec::new();
    // shards, then db_default (fallback rows take part in two-phase commits as slot `shards.len()`)
    for (s, pool) in engine.shards.iter().chain(std::iter::once(&engine.default)).enumerate() {
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(3), pool.get()).await else {
            all_reachable = false;
            continue;
        };
        // every prepared transaction: a decided one is committed whatever its age (its proxy
        // may have lost the shard before COMMIT PREPARED); an undecided one is left to its
        // proxy until it is older than prepared_orphan_age_ms
        let q = format!(
            "SELECT gid, (prepared < now() - interval '{} milliseconds')::text FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE 'sg\\_%'",
            engine.orphan_age_ms
        );
        let Ok(Ok(gids)) = wire::query(&mut conn, &q, &[]).await else {
            // unread: the cleanup below must not run on a partial picture
            all_reachable = false;
            continue;
        };
        for row in gids {
            let (Some(Some(g)), Some(Some(old))) = (row.first().cloned(), row.get(1).cloned()) else { continue };
            let Some((base, _)) = g.rsplit_once("_s") else { continue };
            seen.push(base.to_string());
            if old != "true" {
                let decided = wire::query(&mut def, "SELECT 1 FROM shardgate_2pc_decisions WHERE gid = $1 AND outcome = 'commit'", &[Some(base)]).await;
                if matches!(decided, Ok(Ok(ref r)) if !r.is_empty()) {
                    match wire::control(&mut conn, &format!("COMMIT PREPARED {}", shardgate_router::quote::literal(&g))).await {
                        Ok(Ok(_)) => {
                            tracing::info!(shard = s, gid = %g, "committed a decided prepared transaction");
                            resolved += 1;
                        }
                        // its own proxy committed it meanwhile
                        other => tracing::debug!(shard = s, gid = %g, ok = other.is_ok(), "a decided prepared transaction was not committed here"),
                    }
                }
                continue;
            }
            // win the race against a decision that may still commit: an abort marker under the
            // same gid; a decision that commits first makes the marker a no-op, one that comes
            // later fails on the primary key, so the outcome read back is final
            let base = base.replace('\'', "''");
            let q = format!(
                "INSERT INTO shardgate_2pc_decisions (gid, shards, outcome) VALUES ('{base}', '{{}}', 'abort') ON CONFLICT (gid) DO NOTHING; \
                 SELECT outcome FROM shardgate_2pc_decisions WHERE gid = '{base}'"
            );
            let decided = match wire::control(&mut def, &q).await {
                Ok(Ok(rows)) => rows.into_iter().flatten().next(),
                _ => None,
            };
            let Some(outcome) = decided else {
                tracing::warn!(shard = s, gid = %g, "could not read or mark the decision; left for the next round");
                continue;
            };
            let verb = if outcome == "commit" { "COMMIT" } else { "ROLLBACK" };
            match wire::control(&mut conn, &format!("{verb} PREPARED '{}'", g.replace('\'', "''"))).await {
                Ok(Ok(_)) => {
                    tracing::info!(shard = s, gid = %g, verb, "resolved an orphaned prepared transaction");
                    resolved += 1;
                }
                other => tracing::warn!(shard = s, gid = %g, ok = other.is_ok(), "could not resolve a prepared transaction"),
            }
        }
    }
    if all_reachable {
        let list = format!("{{{}}}", seen.iter().map(|g| format!("\"{g}\"")).collect::<Vec<_>>().join(","));
        let _ = wire::query(&mut def, "DELETE FROM shardgate_2pc_decisions WHERE decided_at < now() - interval '1 hour' AND gid <> ALL($1::text[])", &[Some(&list)]).await;
    }
    Ok(resolved)
}
