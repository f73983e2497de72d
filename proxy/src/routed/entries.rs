//! An autocommit INSERT on one shard whose only `db_default` work is its
//! unique-lookup entries commits in two round trips, without two-phase
//! commit: one pipeline on `db_default` commits the entries, each carrying
//! the INSERT's token; then the shard runs the INSERT in one implicit
//! transaction behind a fence insert of that token ([`super::fence`]).
//!
//! An entry whose row never commits (the proxy died between the two, or the
//! row failed and the entry could not be deleted) is an orphan: the value
//! has no row, and reads routed by the entry find none, as on one table.
//! The next INSERT of the value finds the entry taken and goes the usual way
//! ([`super::lookup::record`]), which fences the orphan's token on its shard
//! before it looks for the row: an owner still in flight is waited for, one
//! that has not reached the shard yet can never commit after the look.
//!
//! A value already taken fails the entries with `23505`; one another
//! transaction is writing fails them with `55P03` after a short lock wait.
//! Then nothing was written and the INSERT runs the usual way, which tells a
//! live holder from a deleted row, waits as one table would and answers with
//! one table's error. So does a `23505` on the shard (the month table's own
//! unique index, or a taker that fenced this INSERT's token first), after
//! the entries are deleted.

use super::exec::{run, ExecError, Out, Request, Slots};
use super::slots::{hold, hold_unless_canceled, release};
use super::Engine;
use crate::backend::query as wire;
use crate::protocol::sqlstate;

/// Whether `req` can take this way: an autocommit INSERT of at most
/// [`MAX_ROWS`] rows, all on one shard (no fallback rows on `db_default`, no
/// targets that must run one after another). Rows on several shards commit
/// with two-phase commit, the usual way, which takes the entries first.
pub fn applies(engine: &Engine, req: &Request<'_>) -> bool {
    let r = req.routed;
    let Some(first) = r.targets.first() else { return false };
    engine.fenced_inserts
        && r.kind == shardgate_router::RoutedKind::Insert
        && !r.lookup_rows.is_empty()
        && r.lookup_rows.len() <= MAX_ROWS
        && req.tx.is_none()
        && !req.serial
        && req.down_targets.is_empty()
        && (first.shard.0 as usize) < engine.shards.len()
        && super::fence::ready(engine, first.shard.0 as usize)
        && r.targets.iter().all(|t| t.shard == first.shard)
}

/// Rows an INSERT may have to take this way: its RETURNING rows stay in the
/// proxy's buffer (64 KiB) until it commits, so that a retry the usual way
/// sends nothing twice.
const MAX_ROWS: usize = 64;

/// One entry, in the pipeline's implicit transaction (no BEGIN / COMMIT of its
/// own). Its gate sets `lock_timeout` for the rest of that transaction, before
/// the row goes into the unique index: an entry waits at most 100 ms for
/// another transaction writing the same value, then the INSERT goes the usual
/// way (which waits as one table would).
fn entry_sql(table: &str) -> String {
    format!("INSERT INTO {table} (value, shard_key, month, token) SELECT $1, $2, $3, $4 WHERE set_config('lock_timeout', '100ms', true) IS NOT NULL")
}

/// Runs and commits the INSERT. `None`: nothing of it is committed (no row;
/// its entries deleted or left as orphans); the caller runs it the usual way
/// (and drops what this attempt put in `out`).
pub async fn insert(engine: &Engine, slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>, shard: usize) -> Option<Result<(), ExecError>> {
    let (token, made_ms) = super::fence::new_token(engine);
    let entries = match super::lookup::entry_rows(engine, &req.routed.lookup_rows, &req.routed.table).await {
        Ok(e) => e,
        Err(e) => return Some(Err(e)),
    };
    match write_entries(engine, slots, req, &entries, &token).await {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => return Some(Err(e)),
    }
    super::twopc::crash_point("after_entries");
    super::twopc::pause_point("after_entries").await;
    let cancel = req.cancel.map(|c| (c, req.cancel_epoch));
    let r = match hold_unless_canceled(engine, slots, shard, None, req.param_sets, req.local_sets, cancel).await {
        Ok(()) => {
            super::fence::defer_owner(&mut slots[shard].as_mut().expect("held").conn, &token, made_ms);
            run(engine, slots, req, out, &[shard], None, None).await
        }
        Err(e) => Err(e),
    };
    let e = match r {
        Ok(()) => {
            super::lookup::remember_all(engine, &req.routed.lookup_rows, &req.routed.table);
            return Some(Ok(()));
        }
        Err(e) => e,
    };
    if matches!(e, ExecError::ClientIo(_)) {
        // the client is gone: the shard stops and rolls back when its connection
        // closes, unless it committed already (the entries stay: right either way)
        for slot in slots.iter_mut().flatten() {
            slot.conn.discard();
        }
    }
    release(slots);
    if rolled_back(&e) {
        drop_entries(engine, &entries, &token).await;
    }
    match e {
        ExecError::Server(s) if !out.flushed && (s.code == sqlstate::UNIQUE_VIOLATION || super::fence::is_fence_error(&s)) => {
            if s.code == sqlstate::UNDEFINED_TABLE {
                // dropped behind the proxy's back: INSERTs there go the usual way until it is made
                super::fence::set_ready(engine, shard, false);
                super::fence::create_on(engine, shard).await;
            } else if s.code == sqlstate::NOT_NULL_VIOLATION && super::fence::is_fence_error(&s) {
                // refused as stale: this proxy stalled that long, or the clocks disagree
                tracing::warn!(
                    shard,
                    "shard db_{shard} refused an INSERT fence as older than {} s: this proxy was paused that long, or the shard's clock is ahead of this proxy's (then INSERTs there go the slower two-phase way until the clocks agree)",
                    super::fence::FRESH_SECS
                );
            }
            None
        }
        e => Some(Err(e)),
    }
}

/// Whether the row's transaction is known not to have committed: the shard
/// answered with an ERROR (not a FATAL, which may come after a commit), or
/// nothing was sent. Otherwise (a lost connection) the entries stay: if the
/// row committed they are its entries, if not they are orphans.
fn rolled_back(e: &ExecError) -> bool {
    match e {
        ExecError::Server(s) => s.raw.get(5..).is_some_and(|b| {
            // V, not the S field, which lc_messages translates
            let f = crate::protocol::backend::parse_error_fields(b);
            if f.severity_v.is_empty() { f.severity == "ERROR" } else { f.severity_v == "ERROR" }
        }),
        ExecError::Unreachable(_) => true,
        ExecError::Proxy(code, _) => *code == sqlstate::QUERY_CANCELED || *code == sqlstate::TOO_MANY_CONNECTIONS,
        _ => false,
    }
}

/// Commits the entries in one `db_default` pipeline (the entries, each with
/// its short lock wait, then Sync). `Ok(false)`: a value is taken (`23505`) or being
/// written (`55P03`); nothing was written.
async fn write_entries(engine: &Engine, slots: &mut Slots, req: &Request<'_>, entries: &[(String, [String; 3])], token: &str) -> Result<bool, ExecError> {
    let local = engine.shards.len();
    hold(engine, slots, local, None, req.param_sets, req.local_sets).await?;
    let slot = slots[local].as_mut().expect("held");
    let mut msgs = bytes::BytesMut::with_capacity(256 + entries.iter().map(|(t, v)| 2 * t.len() + v.iter().map(String::len).sum::<usize>() + 256).sum::<usize>());
    // statements db_default keeps prepared on this connection: parsed and planned once
    let mut parsed = Vec::new();
    // the statements up to Sync are one implicit transaction, committed at the Sync
    for (table, [value, key, month]) in entries {
        let vals = [Some(value.as_bytes()), Some(key.as_bytes()), Some(month.as_bytes()), Some(token.as_bytes())];
        parsed.extend(wire::put_named_step(&mut msgs, &mut slot.conn, &entry_sql(table), &vals));
    }
    wire::put_sync(&mut msgs);
    // (a transaction is open on it until the answer: a panic meanwhile must not pool it)
    slot.in_tx = true;
    let r = wire::exchange_status(&mut slot.conn, &msgs).await;
    if !matches!(r, Ok((None, _))) {
        wire::forget_named(&mut slot.conn, &parsed);
    }
    let r = match r {
        Ok((_, status)) if status != b'I' => {
            // the connection was inside a transaction block it should never have been
            // pooled with: the entries are in that block, not committed. Closing the
            // connection rolls it back; the INSERT goes the usual way on another one.
            tracing::warn!(status = %(status as char), "a db_default connection was handed out inside a transaction; closed");
            slot.conn.discard();
            slot.in_tx = false;
            Ok(false)
        }
        Ok((None, _)) => {
            slot.in_tx = false;
            Ok(true)
        }
        Ok((Some(e), _)) => {
            // a step failed: its Sync rolled the implicit transaction back
            slot.in_tx = false;
            if e.code == sqlstate::UNIQUE_VIOLATION || e.code == sqlstate::LOCK_NOT_AVAILABLE {
                Ok(false)
            } else {
                Err(ExecError::Server(e))
            }
        }
        Err(e) => {
            // the entries may have committed: orphans at worst, the row was never sent
            slot.conn.broken = true;
            tracing::warn!(error = %e, "db_default lost while writing unique-lookup entries");
            Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "lost the connection to db_default while recording unique values; the statement was not applied".into()))
        }
    };
    release(slots);
    r
}

/// Deletes this INSERT's entries (its row did not commit), unless another
/// INSERT took them over meanwhile. Best effort: one left behind is an
/// orphan, which the next INSERT of its value settles.
async fn drop_entries(engine: &Engine, entries: &[(String, [String; 3])], token: &str) {
    let Ok(Ok(mut conn)) = tokio::time::timeout(std::time::Duration::from_secs(2), engine.default.get()).await else { return };
    let mut msgs = bytes::BytesMut::new();
    wire::put_step(&mut msgs, "BEGIN", &[]);
    wire::put_step(&mut msgs, "SET LOCAL lock_timeout = 1000", &[]);
    for (table, [value, _, _]) in entries {
        wire::put_step(&mut msgs, &format!("DELETE FROM {table} WHERE value = $1 AND token = $2"), &[Some(value.as_bytes()), Some(token.as_bytes())]);
    }
    wire::put_step(&mut msgs, "COMMIT", &[]);
    wire::put_sync(&mut msgs);
    match wire::pipeline(&mut conn, &msgs).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(code = %e.code, "could not delete the entries of an INSERT that failed; the next INSERT of the value settles them");
            wire::rollback(&mut conn).await;
        }
        Err(_) => conn.broken = true,
    }
}
