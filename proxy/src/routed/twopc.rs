//! Transactions that write on several shards commit atomically with
//! two-phase commit:
//!
//! 1. `PREPARE TRANSACTION '<gid>_s<n>'` on every written shard (any failure:
//!    roll everything back, the client gets the error);
//! 2. the decision — a row in `shardgate_2pc_decisions` in `db_default` —
//!    is committed (inside the client's own `db_default` transaction when
//!    there is one, so the decision and that work commit together);
//! 3. `COMMIT PREPARED` on every shard, then the decision row is deleted.
//!
//! [`recover`] runs at startup and periodically: a prepared transaction left
//! by a crash is committed if its decision row exists and rolled back if not.

use std::time::Duration;

use super::exec::{ExecError, Slots};
use super::wire;
use super::Engine;

/// The decision log, created in `db_default` at startup. `outcome` is
/// `commit` for a proxy's decision and `abort` for recovery's marker: both
/// insert the gid, so whichever commits first wins and the other fails on
/// the primary key (a late decision can never commit after recovery rolled
/// its shards back).
pub const DECISIONS_DDL: &str =
    "CREATE TABLE IF NOT EXISTS shardgate_2pc_decisions (gid text PRIMARY KEY, shards int[] NOT NULL, decided_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
     ALTER TABLE shardgate_2pc_decisions ADD COLUMN IF NOT EXISTS outcome text NOT NULL DEFAULT 'commit'; \
     ALTER TABLE shardgate_2pc_decisions ALTER COLUMN decided_at SET DEFAULT clock_timestamp()";

/// A new global transaction id: worker, time, randomness.
pub fn new_gid(worker: u16) -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    format!("sg_{worker}_{ms}_{:08x}", rand::random::<u32>())
}

fn shard_gid(gid: &str, shard: usize) -> String {
    format!("{gid}_s{shard}")
}

/// Statement that records the commit decision.
pub fn decision_sql(gid: &str, shards: &[usize]) -> String {
    let list: Vec<String> = shards.iter().map(|s| s.to_string()).collect();
    // clock_timestamp(), not now(): inside a long client transaction now() is its start, and the
    // cleanup of old rows must never take a decision whose shards may still be committing
    format!("INSERT INTO shardgate_2pc_decisions (gid, shards, decided_at) VALUES ('{gid}', '{{{}}}', clock_timestamp())", list.join(","))
}

/// Phase one on every shard in `shards`; on failure everything is rolled back.
pub async fn prepare(slots: &mut Slots, shards: &[usize], gid: &str) -> Result<(), ExecError> {
    let mut prepared = Vec::new();
    for &s in shards {
        let Some(slot) = slots.get_mut(s).and_then(Option::as_mut) else { continue };
        let r = wire::control_tag(&mut slot.conn, &format!("PREPARE TRANSACTION '{}'", shard_gid(gid, s))).await;
        slot.in_tx = false;
        match r {
            Ok(Ok(tag)) if tag == "PREPARE TRANSACTION" => prepared.push(s),
            // PREPARE of a transaction that had failed rolls it back and says ROLLBACK, no error
            Ok(Ok(tag)) => {
                tracing::warn!(shard = s, tag, "PREPARE TRANSACTION did not prepare; rolling the transaction back");
                finish(slots, &prepared, gid, false).await;
                rollback(slots, shards).await;
                return Err(ExecError::Proxy("40000", format!("the transaction on shard db_{s} had failed and was rolled back; nothing was committed")));
            }
            Ok(Err(e)) => {
                finish(slots, &prepared, gid, false).await;
                rollback(slots, shards).await;
                return Err(ExecError::Server(e));
            }
            Err(e) => {
                slot.conn.broken = true;
                tracing::warn!(shard = s, error = %e, "shard lost during PREPARE TRANSACTION");
                finish(slots, &prepared, gid, false).await;
                rollback(slots, shards).await;
                return Err(ExecError::Proxy("08006", format!("lost the connection to shard db_{s} while committing; the transaction was rolled back")));
            }
        }
    }
    Ok(())
}

/// Phase two: COMMIT or ROLLBACK PREPARED on each shard. Failures are left
/// to [`recover`] (the decision row says what to do); true when every shard
/// is resolved.
pub async fn finish(slots: &mut Slots, shards: &[usize], gid: &str, commit: bool) -> bool {
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    let mut all = true;
    for &s in shards {
        let Some(slot) = slots.get_mut(s).and_then(Option::as_mut) else {
            all = false;
            continue;
        };
        match wire::control(&mut slot.conn, &format!("{verb} PREPARED '{}'", shard_gid(gid, s))).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                all = false;
                tracing::warn!(shard = s, sqlstate = %e.code, gid, "{verb} PREPARED failed; recovery will retry");
            }
            Err(e) => {
                all = false;
                slot.conn.broken = true;
                tracing::warn!(shard = s, error = %e, gid, "{verb} PREPARED failed; recovery will retry");
            }
        }
    }
    all
}

/// Rolls back the open transaction block on each shard (best effort).
pub async fn rollback(slots: &mut Slots, shards: &[usize]) {
    for &s in shards {
        let Some(slot) = slots.get_mut(s).and_then(Option::as_mut) else { continue };
        if !slot.in_tx {
            continue;
        }
        match wire::control(&mut slot.conn, "ROLLBACK").await {
            Ok(_) => {}
            Err(_) => slot.conn.broken = true,
        }
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
                    "08006",
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
    let gid = new_gid(engine.worker());
    prepare(slots, shards, &gid).await?;
    let decided = match engine.default.get().await {
        Ok(mut conn) => match wire::control(&mut conn, &decision_sql(&gid, shards)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ExecError::Server(e)),
            Err(e) => {
                conn.broken = true;
                Err(ExecError::Proxy("08006", format!("lost db_default while recording the commit decision: {e}")))
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "db_default unavailable for the commit decision");
            Err(ExecError::Proxy("08006", "db_default is unavailable to record the commit decision; the transaction was rolled back".into()))
        }
    };
    match decided {
        Ok(()) => {
            // the decision row stays until every participant has committed (recovery finishes the rest)
            if finish(slots, shards, &gid, true).await {
                forget(engine, &gid).await;
            }
            Ok(())
        }
        Err(e) => {
            finish(slots, shards, &gid, false).await;
            Err(e)
        }
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
            Ok(mut conn) => matches!(wire::control(&mut conn, &format!("{verb} PREPARED '{}'", shard_gid(gid, s))).await, Ok(Ok(_))),
            Err(_) => false,
        };
        if !ok {
            all = false;
            tracing::warn!(shard = s, gid, "{verb} PREPARED failed; recovery will retry");
        }
    }
    if commit && all {
        metrics::counter!(crate::metrics::TWO_PHASE_COMMITS).increment(1);
        forget(engine, gid).await;
    }
}

/// Deletes a decision once every shard committed (recovery deletes leftovers).
pub async fn forget(engine: &Engine, gid: &str) {
    if let Ok(mut conn) = engine.default.get().await {
        let _ = wire::control(&mut conn, &format!("DELETE FROM shardgate_2pc_decisions WHERE gid = '{gid}'")).await;
    }
}

/// Resolves orphaned prepared transactions on every reachable shard.
pub async fn recover(engine: &Engine) -> anyhow::Result<usize> {
    let mut def = engine.default.get().await.map_err(|e| anyhow::anyhow!("db_default: {e}"))?;
    let mut resolved = 0;
    let mut all_reachable = true;
    // shards, then db_default (fallback rows take part in two-phase commits as slot `shards.len()`)
    for (s, pool) in engine.shards.iter().chain(std::iter::once(&engine.default)).enumerate() {
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(3), pool.get()).await else {
            all_reachable = false;
            continue;
        };
        let q = format!(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE 'sg\\_%' AND prepared < now() - interval '{} milliseconds'",
            engine.orphan_age_ms
        );
        let Ok(Ok(gids)) = wire::control(&mut conn, &q).await else {
            // unread: the cleanup below must not run on a partial picture
            all_reachable = false;
            continue;
        };
        for g in gids.into_iter().flatten() {
            let Some((base, _)) = g.rsplit_once("_s") else { continue };
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
        let _ = wire::control(&mut def, "DELETE FROM shardgate_2pc_decisions WHERE decided_at < now() - interval '1 hour'").await;
    }
    Ok(resolved)
}
