//! Runs one planned statement on its targets and writes the answer to the
//! client as one table would give it.
//!
//! - One target: rows stream through undecoded.
//! - Several, no ordering/grouping: targets are read one after another (all
//!   were sent at once, so the shards work in parallel); rows stream.
//! - Several, ORDER BY only, one target per shard: k-way merge, streaming.
//! - GROUP BY / DISTINCT (or ORDER BY with several targets on one shard):
//!   rows are combined in memory, bounded by `server.max_merge_rows`.
//! - Writes touching several shards outside a transaction commit with
//!   two-phase commit ([`super::twopc`]).

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use shardgate_router::{Agg, MergeSpec, RoutedKind};
use crate::protocol::sqlstate;

pub use super::request::{Bound, ExecError, Out, Request};
pub use super::slots::{hold, release, ShardSlot, Slots};
use super::slots::{canceled, fail, lost};
use super::merge::{self, Collector, Column, Row};
use super::value::{Key, ValueError};
use crate::backend::query::{self as wire, Event, Head};
use super::Engine;
use crate::protocol::codec::put_message;

/// Label value for a shard in metrics.
pub fn shard_label(shard: usize) -> &'static str {
    const L: [&str; 8] = ["db_0", "db_1", "db_2", "db_3", "db_4", "db_5", "db_6", "db_7"];
    L.get(shard).copied().unwrap_or("db_other")
}

/// Result formats to ask the targets for: the client's for passed-through
/// columns, text for computed aggregates and helper columns.
fn target_formats(req: &Request<'_>, spec: Option<&MergeSpec>) -> Vec<i16> {
    let Some(spec) = spec else { return req.bound.result_formats.clone() };
    let Some(visible) = req.visible else {
        // without a Describe the column count is unknown: the client asked for text (simple
        // protocol, or no codes), or we ask everything in text and fail clearly below
        return Vec::new();
    };
    let computed: Vec<usize> = spec
        .grouping
        .iter()
        .flat_map(|g| g.aggregates.iter())
        .filter(|(_, a)| !matches!(a, Agg::Min | Agg::Max))
        .filter_map(|(c, _)| match c {
            shardgate_router::ColRef::Visible(i) => Some(*i),
            shardgate_router::ColRef::Hidden(_) => None,
        })
        .collect();
    if req.bound.result_formats.iter().all(|f| *f == 0) {
        return Vec::new();
    }
    (0..visible + spec.hidden).map(|i| if i < visible && !computed.contains(&i) && req.bound.binary(i) { 1 } else { 0 }).collect()
}

/// The client's error for [`ExecError::DownMissed`].
pub(crate) fn down_missed(shard: usize) -> ExecError {
    ExecError::Proxy(
        sqlstate::CANNOT_CONNECT_NOW,
        format!("shard db_{shard} is unavailable: no order written for it while it is down matched, so the rows may be on db_{shard}; retry when it is back"),
    )
}

/// Runs `req` and writes rows and the command tag (not ReadyForQuery),
/// redirecting targets of down shards to the fallback table.
pub async fn execute(engine: &Engine, slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>) -> Result<(), ExecError> {
    let mut attempt = 0;
    let mut caught_up = false;
    let mut missed_again = false;
    // nothing of a statement that only matched nothing on fallback rows reached the client
    let mark = out.buf.len();
    // a shard still missing a committed two-phase transaction would answer without
    // acknowledged rows (and a write would wait on its locks): apply it first
    // (an INSERT touches none of those rows; a down shard is answered from its fallback rows)
    let waits = |s: usize| engine.unfinished.waits_on(s) && !engine.is_down(s);
    if req.routed.kind != RoutedKind::Insert && engine.unfinished.any() && req.routed.targets.iter().any(|t| waits(t.shard.0 as usize)) {
        super::twopc::apply_unfinished(engine).await;
        if let Some(t) = req.routed.targets.iter().find(|t| waits(t.shard.0 as usize)) {
            return Err(ExecError::Proxy(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("shard db_{} has not yet applied a committed transaction (it was unreachable); retry shortly", t.shard.0),
            ));
        }
    }
    loop {
        let adjusted = match super::fallback::adjust(engine, req.routed, engine.policy_fail).await {
            Ok(a) => a,
            // a read of a shard whose orders from its outage are not all home yet: move them
            // now (bounded), so the read sees them — the fallback version wins, nothing twice
            Err(ExecError::CatchUp(shard)) if !caught_up => {
                caught_up = true;
                if !super::fallback::catch_up(engine, shard, engine.sync_batch, std::time::Duration::from_secs(2)).await {
                    let left = engine.fallback.pending(shard);
                    return Err(ExecError::Proxy(
                        sqlstate::CANNOT_CONNECT_NOW,
                        format!("shard db_{shard} is catching up: {left} order(s) written while it was down are not back yet; retry shortly"),
                    ));
                }
                continue;
            }
            Err(ExecError::CatchUp(shard)) => {
                return Err(ExecError::Proxy(sqlstate::CANNOT_CONNECT_NOW, format!("shard db_{shard} is catching up on orders written while it was down; retry shortly")));
            }
            Err(e) => return Err(e),
        };
        let r = match &adjusted {
            None => execute_plan(engine, slots, req, out).await,
            Some(a) => {
                for n in &a.notices {
                    crate::protocol::backend::notice_response(out.buf, sqlstate::WARNING, n);
                }
                let sub = Request { routed: &a.routed, down_targets: &a.down_targets, serial: a.serial, ..*req };
                let r = execute_plan(engine, slots, &sub, out).await;
                // counted by what was planned, not by the shard's state now (a probe may have
                // marked it recovering meanwhile), and also after an error: a commit whose
                // answer was lost may have written the rows, and a count too high only costs a
                // recount, one too low hides acknowledged orders from a read after the outage
                if !matches!(r, Err(ExecError::Unreachable(_))) {
                    for &s in &a.inserted_down {
                        super::fallback::note_written(engine, s, 1);
                    }
                }
                r
            }
        };
        match r {
            // the connect failed before anything of this statement was sent: the shard is
            // now down, so plan again around it (an INSERT goes to the fallback table, a
            // read answers per policy, an UPDATE/DELETE applies to its fallback rows)
            Err(ExecError::Unreachable(_)) if attempt == 0 => {
                attempt += 1;
                continue;
            }
            Err(ExecError::Unreachable(s)) => return Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, format!("shard db_{s} is unavailable"))),
            // Planned while the shard was down, but it came back before the write ran and
            // sync-back moved the row home (a moved row no longer matches on the fallback
            // side): run it again against the shard as it is now. Nothing was changed.
            Err(ExecError::DownMissed(s)) if !missed_again && !engine.is_down(s) => {
                tracing::info!(shard = s, "a write planned while the shard was down matched none of its fallback rows; the shard is back, so it runs again");
                missed_again = true;
                out.buf.truncate(mark);
                continue;
            }
            Err(ExecError::DownMissed(s)) => return Err(down_missed(s)),
            other => return other,
        }
    }
}

/// Runs `req` on exactly the targets it names — no redirection to the
/// fallback table (the legacy store, and secondary writes during a migration,
/// whose failures go to the outbox instead).
pub async fn execute_direct(engine: &Engine, slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>) -> Result<(), ExecError> {
    match execute_plan(engine, slots, req, out).await {
        Err(ExecError::Unreachable(s)) => Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, format!("shard db_{s} is unavailable"))),
        other => other,
    }
}

async fn execute_plan(engine: &Engine, slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>) -> Result<(), ExecError> {
    let routed = req.routed;
    // the shards (and fallback slot) the targets use, in ascending order
    let mut shard_list: Vec<usize> = routed.targets.iter().map(|t| t.shard.0 as usize).collect();
    // unique-lookup entries are written on the db_default slot, in the same transaction
    let lookups = !routed.lookup_rows.is_empty();
    if lookups {
        shard_list.push(engine.shards.len());
    }
    shard_list.sort_unstable();
    shard_list.dedup();
    let write = routed.kind != RoutedKind::Select;
    // several shards written outside a transaction block: one atomic two-phase commit
    let implicit_2pc = write && req.tx.is_none() && shard_list.len() > 1;
    // several month tables written on one shard must be one transaction there, so a
    // statement that fails in a later month leaves the earlier ones unchanged: the targets
    // on one connection go as one pipeline, whose implicit transaction is that transaction.
    // A block of its own only for rows committing with their lookup entries, or targets
    // on a down shard's fallback rows (their answer is checked before it may commit: a
    // write that matched nothing for one of two down shards must leave the other unchanged)
    let several = routed.targets.len() > shard_list.len();
    let implicit_tx = write && req.tx.is_none() && !implicit_2pc && (lookups || (several && !req.down_targets.is_empty()));
    let tx = if implicit_2pc || implicit_tx { Some("BEGIN") } else { req.tx };
    // the shards' PREPARE TRANSACTIONs go right behind the statement, in its round trip
    let gid = implicit_2pc.then(|| super::twopc::new_gid(engine.worker()));
    engine.fanout.record(routed.targets.len() as f64);
    let t0 = Instant::now();
    if gid.is_some() && super::entries::applies(engine, req) {
        // an autocommit INSERT on one shard with unique-lookup entries: the entries
        // commit first, then the row behind its fence, no two-phase commit
        let mark = out.buf.len();
        match super::entries::insert(engine, slots, req, out, routed.targets[0].shard.0 as usize).await {
            Some(result) => {
                engine.account(&shard_list, t0, &result);
                release(slots);
                return result;
            }
            None => {
                out.buf.truncate(mark);
                // fresh connections for the second way (the first may have lost one)
                release(slots);
            }
        }
    }
    let result = if lookups {
        match record_lookups(engine, slots, req, tx.unwrap_or("BEGIN")).await {
            Ok(()) => run(engine, slots, req, out, &shard_list, tx, gid.as_deref()).await,
            Err(e) => Err(e),
        }
    } else {
        run(engine, slots, req, out, &shard_list, tx, gid.as_deref()).await
    };
    engine.account(&shard_list, t0, &result);
    if matches!(result, Err(ExecError::ClientIo(_))) {
        // the client went away mid-answer: close the shard connections (and db_default's,
        // which may hold this statement's lookup entries) rather than read the rest of the
        // answer; each server then stops its statement and rolls back its transaction (an
        // autocommit statement the server already finished has committed at its Sync, as on
        // one table whose client leaves while the rows are on their way)
        for slot in slots.iter_mut().flatten() {
            slot.conn.discard();
        }
    }
    if req.tx.is_some() {
        if write {
            for &s in &shard_list {
                if let Some(slot) = slots.get_mut(s).and_then(Option::as_mut) {
                    slot.wrote = true;
                }
            }
        }
        return result;
    }
    if matches!(result, Err(ExecError::Unreachable(_))) {
        // nothing was sent: give back what was taken
        super::twopc::rollback(slots, &shard_list).await;
        release(slots);
        return result;
    }
    let result = if let Some(gid) = gid {
        match result {
            Ok(()) => super::twopc::commit_as(engine, slots, &shard_list, gid).await,
            Err(e) => {
                super::twopc::rollback(slots, &shard_list).await;
                Err(e)
            }
        }
    } else if implicit_tx {
        match result {
            Ok(()) => super::twopc::commit_each(slots, &shard_list).await,
            Err(e) => {
                super::twopc::rollback(slots, &shard_list).await;
                Err(e)
            }
        }
    } else {
        result
    };
    release(slots);
    result
}

/// Writes an INSERT's unique-lookup entries in the `db_default` slot's transaction.
async fn record_lookups(engine: &Engine, slots: &mut Slots, req: &Request<'_>, tx: &str) -> Result<(), ExecError> {
    // the tables first: preparing them takes a db_default connection of its own
    engine.lookups.meta(engine).await?;
    hold(engine, slots, engine.shards.len(), Some(tx), req.param_sets, req.local_sets).await?;
    super::lookup::record(engine, slots, &req.routed.lookup_rows, &req.routed.table).await
}

/// Runs the statement on `shards` inside `tx` (when given); with `prepare_as`,
/// each shard's block is prepared for two-phase commit under that gid right
/// behind its statement.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(engine: &Engine, slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>, shards: &[usize], tx: Option<&str>, prepare_as: Option<&str>) -> Result<(), ExecError> {
    let r = run_registered(engine, slots, req, out, shards, tx, prepare_as).await;
    if let Some(c) = req.cancel {
        c.set_shards(Vec::new());
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn run_registered(engine: &Engine, slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>, shards: &[usize], tx: Option<&str>, prepare_as: Option<&str>) -> Result<(), ExecError> {
    let routed = req.routed;
    // a cancel while the statement waits for a pool connection (a busy pool, a slow
    // connect) stops it there: no server runs it yet that could be told
    let cancel = req.cancel.map(|c| (c, req.cancel_epoch));
    for &s in shards {
        super::slots::hold_unless_canceled(engine, slots, s, tx, req.param_sets, req.local_sets, cancel).await?;
    }
    if let Some(c) = req.cancel {
        c.set_shards(shards.iter().filter_map(|&s| slots.get(s).and_then(Option::as_ref).map(|x| x.conn.cancel_key.clone())).collect());
        // one that came just before the servers were registered was not forwarded to them
        // (answered once its forwards are done, like one that ends the wait above)
        if c.epoch() != req.cancel_epoch {
            c.requested_since(req.cancel_epoch).await;
            return Err(canceled());
        }
    }
    let spec = if routed.targets.len() > 1 { routed.merge.as_ref() } else { None };
    let formats = target_formats(req, spec);
    if spec.is_some() && req.visible.is_none() && req.bound.result_formats.iter().any(|f| *f != 0) {
        return Err(ExecError::Proxy(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "binary results of a statement spanning shards need a Describe first; prepare the statement (most drivers do)".into(),
        ));
    }
    // send every target's statement, grouped per connection, before reading anything —
    // unless the targets must run one after another (`serial`: a write that touches a
    // recovering shard's fallback rows first, then the shard)
    let mut bufs: Vec<(usize, BytesMut)> = Vec::new();
    // Closes of statements evicted from a connection's cache go in front of its pipeline:
    // behind a target that fails, the server would skip them and the statement would stay
    let mut closes: Vec<(usize, BytesMut)> = Vec::new();
    // the statement names this request's targets use, per connection
    let mut used: Vec<(usize, String)> = Vec::new();
    let mut serial_bufs: Vec<BytesMut> = Vec::new();
    let mut parsed: Vec<(usize, String)> = Vec::new();
    // a simple-protocol client's statement whose targets have no values to bind: one
    // simple Query per connection, as the client's own protocol has it (not Parse, Bind,
    // Describe, Execute per target and a Sync; the shard also plans each as the simple
    // query it is). A connection's targets go as one multi-statement Query, which the
    // server runs as one implicit transaction outside a block, skipping the rest after
    // a failure, like the one-Sync pipeline. Each target text must be one statement (a
    // Parse would refuse several). Not with a PREPARE riding behind, nor with a deferred
    // BEGIN (ahead of a Query it takes a round trip of its own)
    let simple_query = req.simple
        && !req.serial
        && prepare_as.is_none()
        && routed.targets.iter().all(|t| {
            t.extra.is_empty()
                && t.params.as_ref().map_or(req.bound.values.is_empty(), Vec::is_empty)
                // (no backslash: however the server's standard_conforming_strings is set,
                // it reads every literal where the lexer does; no CR, which ends a -- comment
                // for the server but not for the lexer)
                && !t.sql.contains(['\\', '\r'])
                && shardgate_router::is_one_statement(&t.sql)
                && slots.get(t.shard.0 as usize).and_then(Option::as_ref).is_some_and(|s| !s.conn.has_deferred())
        });
    // (the texts of each connection's Query, in `bufs` order)
    let mut query_texts: Vec<String> = Vec::new();
    for t in &routed.targets {
        let shard = t.shard.0 as usize;
        let idx: Vec<usize> = match &t.params {
            Some(p) => p.clone(),
            None => (0..req.bound.values.len()).collect(),
        };
        // the client's values, then the ones the router generated (text, type left to the server)
        let values: Vec<Option<&[u8]>> =
            idx.iter().map(|&i| req.bound.values.get(i).and_then(|v| v.as_deref())).chain(t.extra.iter().map(|e| Some(e.as_bytes()))).collect();
        let types: Vec<u32> = idx.iter().map(|&i| req.bound.types.get(i).copied().unwrap_or(0)).chain(t.extra.iter().map(|_| 0)).collect();
        let fmts: Vec<i16> = idx.iter().map(|&i| req.bound.formats.get(i).copied().unwrap_or(0)).chain(t.extra.iter().map(|_| 0)).collect();
        let buf = if req.serial {
            serial_bufs.push(BytesMut::new());
            serial_bufs.last_mut().expect("pushed")
        } else {
            match bufs.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, b)) => b,
                None => {
                    // (room for a statement's messages: grown from empty, it was reallocated
                    // a few times per statement)
                    bufs.push((shard, BytesMut::with_capacity(512)));
                    &mut bufs.last_mut().expect("pushed").1
                }
            }
        };
        if simple_query {
            let i = bufs.iter().position(|(s, _)| *s == shard).expect("a buffer per connection");
            query_texts.resize(bufs.len(), String::new());
            let text = &mut query_texts[i];
            if !text.is_empty() {
                // (a newline first: a text may end in a -- comment)
                text.push_str("\n;\n");
            }
            text.push_str(&t.sql);
            continue;
        }
        // extended-protocol clients repeat their statements: keep them prepared on the shard
        // connection (named by text and types), so the shard parses and plans once
        // (at most pool.max_prepared_statements, the least recently used closed to make room)
        let conn = &mut slots[shard].as_mut().expect("held").conn;
        let name = (!req.simple).then(|| conn.statement_names.name(&t.sql, &types));
        let parse = match &name {
            Some(n) if conn.prepared.contains(n) => {
                conn.prepared.touch(n);
                used.push((shard, n.clone()));
                false
            }
            Some(n) => {
                if let Some(old) = conn.prepared.evict_for_one_more(engine.max_prepared) {
                    // answered by CloseComplete, before the first target's ParseComplete
                    let this_request = used.iter().any(|(s, n)| *s == shard && *n == old);
                    if this_request && !parsed.iter().any(|(s, n)| *s == shard && *n == old) {
                        // if the pipeline fails before its Close, forget_parsed closes it
                        parsed.push((shard, old.clone()));
                    }
                    let close = match closes.iter_mut().find(|(s, _)| *s == shard) {
                        // a serial target is a pipeline of its own: the Close leads it. A
                        // statement parsed earlier in this pipeline is closed in place (if
                        // the pipeline fails, forget_parsed closes it)
                        _ if req.serial || this_request => &mut *buf,
                        Some((_, b)) => b,
                        None => {
                            closes.push((shard, BytesMut::new()));
                            &mut closes.last_mut().expect("pushed").1
                        }
                    };
                    crate::protocol::frontend::close_statement(close, old.as_bytes());
                }
                conn.prepared.insert(n);
                parsed.push((shard, n.clone()));
                used.push((shard, n.clone()));
                true
            }
            None => true,
        };
        wire::put_statement(buf, name.as_deref().unwrap_or("").as_bytes(), parse, &t.sql, &types, &values, &fmts, &formats);
        if req.serial {
            wire::put_sync(buf);
        }
    }
    // one Sync per connection: its targets run as one pipeline, in one implicit
    // transaction outside a block (a failure in a later month table undoes the earlier
    // ones, and the server skips the rest), and a deferred BEGIN can ride in front
    if simple_query {
        for ((_, buf), text) in bufs.iter_mut().zip(&query_texts) {
            buf.extend_from_slice(&crate::protocol::frontend::query(text));
        }
    }
    for (shard, buf) in bufs.iter_mut().filter(|_| !simple_query) {
        wire::put_sync(buf);
        if let Some((_, mut close)) = closes.iter().position(|(s, _)| s == shard).map(|i| closes.swap_remove(i)) {
            close.extend_from_slice(buf);
            *buf = close;
        }
    }
    // an INSERT on one shard (with db_default's unique-lookup entries): its PREPARE rides
    // behind it. Not for several shards: one would be prepared while another still runs,
    // and recovery counts a prepared transaction's age from its PREPARE
    let prepare_behind = prepare_as.filter(|_| bufs.len() == 1 && routed.kind == RoutedKind::Insert);
    for (shard, buf) in bufs.iter_mut() {
        let slot = slots[*shard].as_mut().expect("held");
        // a shard's own block (not db_default's, which carries the decision): if the
        // statement fails there, the PREPARE finds the block aborted and rolls it back
        if let (Some(gid), true) = (prepare_behind, *shard < engine.shards.len() && slot.in_tx) {
            let name = super::twopc::shard_gid(gid, *shard);
            buf.extend_from_slice(&crate::protocol::frontend::query(&format!("PREPARE TRANSACTION '{name}'")));
            slot.preparing = Some(name);
        }
        if let Err(e) = slot.conn.send(buf).await {
            // the others may have been sent (answers unread) or not (their statement caches
            // already name what they were to parse): none of them is reused
            for t in &routed.targets {
                if let Some(other) = slots.get_mut(t.shard.0 as usize).and_then(Option::as_mut) {
                    other.conn.broken = true;
                }
            }
            return Err(lost(*shard, &e.into()));
        }
    }
    let ordered_stream = !req.serial && spec.is_some_and(|s| s.grouping.is_none() && !s.distinct && !s.order_by.is_empty()) && bufs.len() == routed.targets.len();
    let result = if ordered_stream {
        let r = super::kway::kway(slots, req, out, spec.expect("checked")).await;
        if r.is_err() {
            // it may have stopped before the end of an answer: these connections are not reused
            for t in &routed.targets {
                if let Some(slot) = slots.get_mut(t.shard.0 as usize).and_then(Option::as_mut) {
                    slot.conn.broken = true;
                }
            }
        }
        r
    } else {
        sequential(engine, slots, req, out, spec, serial_bufs).await
    };
    if result.is_err() {
        // a PREPARE behind a statement that failed: read and undo it first (its answer
        // comes before anything sent later)
        for &(shard, _) in &bufs {
            if let Some(slot) = slots[shard].as_mut().filter(|s| s.preparing.is_some()) {
                super::twopc::undo_prepare(slot, shard).await;
            }
        }
        if !parsed.is_empty() {
            // a Parse in a failed pipeline may not have created its statement: forget and close them
            forget_parsed(slots, &parsed).await;
        }
    }
    result
}

async fn forget_parsed(slots: &mut Slots, parsed: &[(usize, String)]) {
    for (shard, name) in parsed {
        let Some(slot) = slots.get_mut(*shard).and_then(Option::as_mut) else { continue };
        slot.conn.prepared.remove(name);
        if slot.conn.broken {
            continue;
        }
        let mut b = BytesMut::new();
        crate::protocol::frontend::close_statement(&mut b, name.as_bytes());
        put_message(&mut b, b'S', |_| {});
        let ok = slot.conn.send(&b).await.is_ok() && wire::read_ready(&mut slot.conn).await.is_ok();
        if !ok {
            slot.conn.broken = true;
        }
    }
}

/// What the targets said about their columns.
pub(super) struct Shape {
    /// RowDescription frame body of the first target (all columns).
    pub(super) desc: Option<Bytes>,
    pub(super) cols: Vec<Column>,
    pub(super) visible: usize,
}

impl Shape {
    pub(super) fn learn(&mut self, t: &Bytes, hidden: usize) -> Result<(), ExecError> {
        if self.desc.is_some() {
            return Ok(());
        }
        let fields = wire::row_fields(&t[5..]).ok_or(ExecError::Proxy(sqlstate::PROTOCOL_VIOLATION, "bad RowDescription from shard".into()))?;
        self.cols = fields.iter().map(|(o, f)| Column { type_oid: *o, binary: *f == 1 }).collect();
        self.visible = self.cols.len().saturating_sub(hidden);
        self.desc = Some(t.clone());
        Ok(())
    }

    /// The client's RowDescription (visible columns; computed ones in the client's format).
    pub(super) fn client_description(&self, bound: &Bound) -> Option<Bytes> {
        let d = self.desc.as_ref()?;
        let binary: Vec<bool> = (0..self.visible).map(|i| bound.binary(i)).collect();
        wire::row_description(&d[5..], self.visible, Some(&binary)).map(|(t, _)| t)
    }
}

/// Reads targets in order; streams or collects.
async fn sequential(engine: &Engine, slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>, spec: Option<&MergeSpec>, mut serial: Vec<BytesMut>) -> Result<(), ExecError> {
    let routed = req.routed;
    let hidden = spec.map_or(0, |s| s.hidden);
    let collect = spec.is_some_and(|s| s.grouping.is_some() || s.distinct || !s.order_by.is_empty());
    let mut shape = Shape { desc: None, cols: Vec::new(), visible: 0 };
    let mut collector: Option<Collector<'_>> = None;
    let mut buffered: Vec<Row> = Vec::new();
    let mut buffered_bytes = 0usize;
    let mut first_err: Option<ExecError> = None;
    let mut sent_desc = false;
    let mut affected: u64 = 0;
    let mut emitted: u64 = 0;
    let (offset, limit) = spec.map_or((0, None), |s| (s.offset, s.limit));
    let mut seen: u64 = 0;
    let single_tag = routed.targets.len() == 1;
    let mut last_tag = String::new();
    let mut notices = BytesMut::new();
    // RETURNING rows of a split multi-row INSERT go back into VALUES order
    let reorder = !routed.row_targets.is_empty() && routed.targets.len() > 1;
    let mut returned: Vec<std::collections::VecDeque<crate::protocol::codec::Frame>> = vec![Default::default(); routed.targets.len()];
    let folds = spec.is_some_and(|s| s.grouping.is_some() || s.distinct);
    let mut per_target = vec![0u64; routed.targets.len()];
    // a connection's targets end with one Sync (serial ones each with their own): its
    // ReadyForQuery follows its last target, and after a failure the server skipped
    // the connection's later targets
    let last_on_conn: Vec<bool> =
        (0..routed.targets.len()).map(|ti| serial.get(ti).is_some() || !routed.targets[ti + 1..].iter().any(|t| t.shard == routed.targets[ti].shard)).collect();
    let mut skipped: Vec<usize> = Vec::new();
    // an early return below leaves answers unread on the connections: they cannot be reused
    let read: Result<(), ExecError> = async {
        for (ti, t) in routed.targets.iter().enumerate() {
            let shard = t.shard.0 as usize;
            if skipped.contains(&shard) {
                continue;
            }
            let conn = &mut slots[shard].as_mut().expect("held").conn;
            if let Some(buf) = serial.get_mut(ti) {
                // serial: this target starts only now that the ones before it have finished
                if let Err(e) = conn.send(buf).await {
                    return Err(fail(slots, shard, e.into()));
                }
            }
            let conn = &mut slots[shard].as_mut().expect("held").conn;
            let head = match wire::read_head(conn, &mut notices).await {
                Ok(h) => h,
                Err(e) => return Err(fail(slots, shard, e)),
            };
            out.buf.extend_from_slice(&notices.split());
            let head_failed = matches!(head, Head::Failed(_));
            let mut failed = head_failed;
            match head {
                Head::Failed(e) => {
                    first_err.get_or_insert(ExecError::Server(e));
                }
                Head::NoRows => {}
                Head::Rows(desc) => {
                    shape.learn(&desc, hidden)?;
                    if req.simple && !sent_desc && first_err.is_none() {
                        if let Some(d) = shape.client_description(req.bound) {
                            out.buf.extend_from_slice(&d);
                        }
                        sent_desc = true;
                    }
                }
            }
            let conn = &mut slots[shard].as_mut().expect("held").conn;
            // after a failed head the server skipped to Sync: only ReadyForQuery is left
            if !head_failed {
                loop {
                    let ev = match wire::next_event(conn, &mut notices).await {
                        Ok(ev) => ev,
                        Err(e) => return Err(fail(slots, shard, e)),
                    };
                    out.buf.extend_from_slice(&notices.split());
                    match ev {
                        Event::Row(f) => {
                            if first_err.is_some() {
                                continue;
                            }
                            if folds {
                                // groups are folded as rows arrive: memory follows the number of groups
                                let row = merge::parse_data_row(f.body())?;
                                let c = collector.get_or_insert_with(|| Collector::new(spec.expect("collect"), shape.cols.clone(), engine.merge_caps()));
                                if let Err(e) = c.push(row) {
                                    first_err = Some(e.into());
                                }
                            } else if collect {
                                let row = merge::parse_data_row(f.body())?;
                                buffered_bytes += merge::row_bytes(&row);
                                buffered.push(row);
                                if buffered_bytes > engine.max_merge_bytes {
                                    first_err = Some(engine.merge_caps().over_bytes().into());
                                } else if buffered.len() > engine.max_merge_rows {
                                    first_err = Some(
                                        ValueError::Limit(format!(
                                            "ORDER BY across shards holds more than {} rows (server.max_merge_rows); add a LIMIT or narrow the query",
                                            engine.max_merge_rows
                                        ))
                                        .into(),
                                    );
                                }
                            } else if reorder {
                                returned[ti].push_back(f);
                            } else {
                                seen += 1;
                                if seen <= offset || limit.is_some_and(|l| emitted >= l) {
                                    continue;
                                }
                                if hidden > 0 {
                                    merge::trim_data_row(out.buf, f.body(), shape.visible)?;
                                } else {
                                    out.buf.extend_from_slice(&f.raw);
                                }
                                emitted += 1;
                                out.maybe_flush().await?;
                            }
                        }
                        Event::Done(tag) => {
                            affected += wire::tag_count(&tag);
                            per_target[ti] = wire::tag_count(&tag);
                            last_tag = tag;
                            break;
                        }
                        Event::Failed(e) => {
                            first_err.get_or_insert(ExecError::Server(e));
                            failed = true;
                            break;
                        }
                    }
                }
            }
            let last = last_on_conn[ti];
            if failed && !last {
                skipped.push(shard);
            }
            if failed || last {
                let conn = &mut slots[shard].as_mut().expect("held").conn;
                match wire::read_ready_checked(conn).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        first_err.get_or_insert(ExecError::Server(e));
                    }
                    Err(e) => return Err(fail(slots, shard, e)),
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = read {
        for t in &routed.targets {
            if let Some(slot) = slots.get_mut(t.shard.0 as usize).and_then(Option::as_mut) {
                slot.conn.broken = true;
            }
        }
        return Err(e);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    // an UPDATE/DELETE of a down shard that matched none of its fallback rows may be
    // aimed at a row on the shard itself: never report a silent 0
    for &(_, shard) in req.down_targets {
        let matched: u64 = req.down_targets.iter().filter(|(_, s)| *s == shard).map(|(ti, _)| per_target.get(*ti).copied().unwrap_or(0)).sum();
        if matched == 0 {
            if req.down_targets.len() == routed.targets.len() && affected == 0 {
                return Err(ExecError::DownMissed(shard));
            }
            return Err(down_missed(shard));
        }
    }
    if reorder {
        for &ti in &routed.row_targets {
            if let Some(f) = returned.get_mut(ti).and_then(|q| q.pop_front()) {
                out.buf.extend_from_slice(&f.raw);
                out.maybe_flush().await?;
            }
        }
        // anything not matched (a target returned more rows than it got): keep it, in target order
        for q in returned.iter_mut() {
            for f in q.drain(..) {
                out.buf.extend_from_slice(&f.raw);
            }
        }
    }
    if collect {
        let spec = spec.expect("collect");
        let client_binary: Vec<bool> = (0..shape.visible).map(|i| req.bound.binary(i)).collect();
        let rows = match collector {
            Some(c) => c.finish(&client_binary)?,
            // no row at all reached the collector
            None if folds => Collector::new(spec, shape.cols.clone(), engine.merge_caps()).finish(&client_binary)?,
            // ORDER BY with several targets on one shard: sort what was buffered
            None => sort_rows(buffered, spec, &shape.cols, shape.visible)?,
        };
        for row in &rows {
            merge::put_data_row(out.buf, row, shape.visible);
            emitted += 1;
            out.maybe_flush().await?;
        }
    }
    let tag = match routed.kind {
        RoutedKind::Select if single_tag => last_tag,
        RoutedKind::Select => format!("SELECT {emitted}"),
        _ if single_tag => last_tag,
        RoutedKind::Insert => format!("INSERT 0 {affected}"),
        RoutedKind::Update => format!("UPDATE {affected}"),
        RoutedKind::Delete => format!("DELETE {affected}"),
    };
    put_message(out.buf, b'C', |o| crate::protocol::codec::put_cstr(o, tag.as_bytes()));
    Ok(())
}

fn sort_rows(rows: Vec<Row>, spec: &MergeSpec, cols: &[Column], visible: usize) -> Result<Vec<Row>, ExecError> {
    merge::check_orderable(&spec.order_by, cols, visible)?;
    let mut keyed: Vec<(Vec<Option<Key>>, Row)> =
        rows.into_iter().map(|r| Ok((merge::sort_keys(&r, &spec.order_by, cols, visible)?, r))).collect::<Result<_, ValueError>>()?;
    keyed.sort_by(|a, b| merge::compare_rows(&a.0, &b.0, &spec.order_by));
    let rows: Vec<Row> = keyed.into_iter().map(|(_, r)| r).skip(spec.offset as usize).collect();
    Ok(match spec.limit {
        Some(l) => rows.into_iter().take(l as usize).collect(),
        None => rows,
    })
}
