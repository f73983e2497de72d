//! An autocommit INSERT whose only `db_default` work is its unique-lookup
//! entries commits with one `db_default` round trip: the shards run the
//! INSERT and prepare (one round trip, [`super::exec`]), then one pipeline on
//! `db_default` writes the entries as plain INSERTs, the decision row and
//! COMMIT ([`super::twopc::commit_with_entries`]), and COMMIT PREPARED
//! follows. The usual way ([`super::lookup::record`] before the row) takes
//! two more.
//!
//! A value already taken fails that pipeline with `23505`; one another
//! transaction is writing fails it with `55P03` after a short lock wait
//! (which also ends a wait across databases: that transaction may hold the
//! entry and wait for this INSERT's row on the month table's unique index).
//! A `23505` on the shard (the month table's own unique index) is the same
//! case seen from the other side. Then everything is rolled back, nothing
//! having been decided, and the INSERT runs the usual way, which tells a
//! live holder from a deleted row, waits as one table would and answers with
//! one table's error.

use super::exec::{run, ExecError, Out, Request, Slots};
use super::slots::hold;
use super::Engine;
use crate::protocol::sqlstate;

/// Whether `req` (committed under two-phase commit) can take this way: an
/// INSERT of at most [`MAX_ROWS`] rows, all on one shard (no fallback rows on
/// `db_default`, no targets that must run one after another). Rows on
/// several shards could wait on each other across shards, where no server
/// sees the deadlock (two such INSERTs with the same values in another
/// order): taking the entries first, the usual way, orders them.
pub fn applies(engine: &Engine, req: &Request<'_>) -> bool {
    let r = req.routed;
    let Some(first) = r.targets.first() else { return false };
    r.kind == shardgate_router::RoutedKind::Insert
        && !r.lookup_rows.is_empty()
        && r.lookup_rows.len() <= MAX_ROWS
        && req.tx.is_none()
        && !req.serial
        && req.down_targets.is_empty()
        && (first.shard.0 as usize) < engine.shards.len()
        && r.targets.iter().all(|t| t.shard == first.shard)
}

/// Rows an INSERT may have to take this way: its RETURNING rows stay in the
/// proxy's buffer (64 KiB) until it commits, so that a retry the usual way
/// sends nothing twice.
const MAX_ROWS: usize = 64;

/// Runs and commits the INSERT. `None`: nothing was decided and everything
/// is rolled back; the caller runs it the usual way (and drops what this
/// attempt put in `out`).
pub async fn insert(engine: &Engine, slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>, shards: &[usize], gid: &str) -> Option<Result<(), ExecError>> {
    let local = engine.shards.len();
    let remote: Vec<usize> = shards.iter().copied().filter(|&s| s != local).collect();
    let entries = match super::lookup::entry_statements(engine, &req.routed.lookup_rows, &req.routed.table).await {
        Ok(e) => e,
        Err(e) => return Some(Err(e)),
    };
    // db_default's connection first, as every other path takes them (recovery, filling
    // the lookup, sync-back): taken in the other order, small pools could wait on each
    // other. Its BEGIN is deferred, so this costs no round trip.
    if let Err(e) = hold(engine, slots, local, Some("BEGIN"), req.param_sets, req.local_sets).await {
        return Some(Err(e));
    }
    match run(engine, slots, req, out, &remote, Some("BEGIN"), Some(gid)).await {
        Ok(()) => {}
        Err(ExecError::Server(e)) if e.code == sqlstate::UNIQUE_VIOLATION && !out.flushed => {
            super::twopc::rollback(slots, shards).await;
            return None;
        }
        Err(e) => {
            if matches!(e, ExecError::ClientIo(_)) {
                // the client is gone: the servers roll back when their connections close
                for slot in slots.iter_mut().flatten() {
                    slot.conn.discard();
                }
            }
            super::twopc::rollback(slots, shards).await;
            return Some(Err(e));
        }
    }
    match super::twopc::commit_with_entries(engine, slots, &remote, gid, &entries).await {
        Ok(true) => {
            super::lookup::remember_all(engine, &req.routed.lookup_rows, &req.routed.table);
            Some(Ok(()))
        }
        Ok(false) if !out.flushed => None,
        Ok(false) => Some(Err(ExecError::Proxy(
            sqlstate::SERIALIZATION_FAILURE,
            "could not serialize access: a unique value of this INSERT was being written concurrently; nothing was applied, retry it".into(),
        ))),
        Err(e) => Some(Err(e)),
    }
}
