//! The session's side of sharded execution: statements on sharded tables are
//! answered by the proxy (from the shards), everything else keeps flowing to
//! `db_default` byte for byte.
//!
//! Ordering: before the proxy answers anything itself, [`Session::barrier`]
//! waits until `db_default` has answered everything sent to it, so replies
//! reach the client in request order.
//!
//! Errors inside a transaction block: the proxy makes `db_default` fail a
//! statement in the same position (and shows the shard's error instead), so
//! the transaction is aborted there too and PostgreSQL itself answers 25P02
//! until ROLLBACK — the client sees exactly one aborted transaction.

use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use shardgate_router::{Analysis, Plan, StatementClass};

use super::{End, Expect, Flow, Session};
use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::codec::{put_cstr, put_message};
use crate::protocol::frontend::{Reader, Target};
use crate::routed::exec::{self, Bound, ExecError, Out, Request};
use crate::routed::wire::{self, ServerError};
use crate::routed::{months, twopc};

/// A prepared statement on a sharded table, kept by the proxy.
pub(super) struct RoutedStmt {
    pub(super) sql: String,
    pub(super) types: Vec<u32>,
    analysis: Arc<Analysis>,
    /// ParameterDescription and RowDescription/NoData, learned once from a shard
    /// (from `db_default` for a cached point read).
    pub(super) describe: OnceLock<(Bytes, Bytes)>,
    /// A point read of a cached table: answered by the cache, not the shards.
    pub(super) cached: Option<shardgate_router::cache::PointRead>,
    /// Parameter type oids from the description (cached point reads).
    pub(super) param_oids: Vec<u32>,
}

impl RoutedStmt {
    /// A prepared point read of a cached table.
    pub(super) fn cached(sql: String, types: Vec<u32>, read: shardgate_router::cache::PointRead, describe: Option<(Bytes, Bytes)>) -> RoutedStmt {
        let d = OnceLock::new();
        let mut param_oids = Vec::new();
        if let Some(describe) = describe {
            param_oids = type_oids(describe.0.get(5..).unwrap_or_default());
            let _ = d.set(describe);
        }
        RoutedStmt { sql, types, analysis: Arc::new(Analysis::Passthrough(StatementClass::Read)), describe: d, cached: Some(read), param_oids }
    }
}

/// A routed portal read in parts: its answer was read whole (bounded by
/// `server.max_portal_bytes`) and is handed out `max_rows` at a time.
pub(super) struct Suspended {
    /// DataRow frames not yet sent.
    pub(super) rows: std::collections::VecDeque<Bytes>,
    /// The command tag without its row count (`SELECT`, `INSERT 0`, `UPDATE`): each
    /// part's tag counts that part's rows, as PostgreSQL's does.
    pub(super) tag: String,
    /// The error the portal ends with once its rows are out.
    pub(super) error: Option<(&'static str, String)>,
}

/// A bound portal of a [`RoutedStmt`].
pub(super) struct RoutedPortal {
    pub(super) stmt: Arc<RoutedStmt>,
    pub(super) bound: Arc<Bound>,
}

/// What the client's transaction-control statement does to held shards.
enum TxVerb {
    Commit,
    Rollback,
    /// SAVEPOINT / ROLLBACK TO / RELEASE / PREPARE TRANSACTION / COMMIT PREPARED: refused while shards take part.
    Unsupported,
    /// Several statements in one string, one of them transaction control: refused
    /// while shards take part (the shards could not end in step with `db_default`).
    Mixed,
    Other,
}

fn tx_verb(sql: &str) -> TxVerb {
    use shardgate_router::TxControl as T;
    match shardgate_router::transaction_control(sql) {
        T::Commit => TxVerb::Commit,
        T::Rollback => TxVerb::Rollback,
        T::Unsupported(_) => TxVerb::Unsupported,
        T::Mixed => TxVerb::Mixed,
        T::None | T::Begin => TxVerb::Other,
    }
}

const NO_SAVEPOINTS: &str = "savepoints, PREPARE TRANSACTION and COMMIT/ROLLBACK PREPARED are not supported in a transaction that touched t_order; use a plain BEGIN … COMMIT";
const NO_MIXED: &str = "COMMIT/ROLLBACK inside a string of several statements is not supported in a transaction that touched t_order; send COMMIT or ROLLBACK as a statement of its own";

/// A statement that fails on `db_default` with no side effects: used to put
/// its transaction into the aborted state when a shard statement failed.
const FAIL_SQL: &str = "SELECT 'shardgate: a statement on a shard failed'::int";

/// The refusal of a statement on a sharded table whose text is not UTF-8.
const NOT_UTF8: &str = "a statement on a sharded table must be valid UTF-8 text: shardgate reads it to route it; use client_encoding UTF8 for non-ASCII text";

impl Session {
    pub(super) fn shards_in_tx(&self) -> bool {
        self.slots.iter().flatten().any(|s| s.in_tx)
    }

    /// True when the statement text must be looked at by the router.
    fn wants_router(&self, sql: &[u8]) -> bool {
        self.shared.engine.may_route(sql) || self.shards_in_tx()
    }

    /// Waits until `db_default` has answered everything sent so far.
    pub(super) async fn barrier(&mut self) -> Result<(), End> {
        if self.server.is_none() {
            return Ok(());
        }
        if self.sent_since_sync && !self.server_skipping && !self.expect.is_empty() {
            // have the server send what it buffered for this unfinished batch
            put_message(&mut self.sout, b'H', |_| {});
        }
        while !self.expect.is_empty() {
            let server = self.server.as_mut().expect("held");
            if !self.sout.is_empty() {
                if super::write_all(&server.stream, &self.sout).await.is_err() {
                    return self.server_lost();
                }
                self.sout.clear();
            }
            self.drain_server(|s| s.expect.is_empty())?;
            if self.cout.len() >= 64 * 1024 {
                super::write_all(&self.client, &self.cout).await?;
                self.cout.clear();
            }
            if self.expect.is_empty() {
                break;
            }
            let server = self.server.as_mut().expect("held");
            let crate::backend::ServerConn { stream, rbuf, .. } = &mut **server;
            if super::read_more(stream, rbuf).await.is_err() {
                return self.server_lost();
            }
        }
        if !self.sout.is_empty() {
            let server = self.server.as_mut().expect("held");
            if super::write_all(&server.stream, &self.sout).await.is_err() {
                return self.server_lost();
            }
            self.sout.clear();
        }
        Ok(())
    }

    /// Tries a simple Query on the routed path; `None` = not ours, pass it on.
    pub(super) async fn routed_query(&mut self, sql: &[u8]) -> Result<Option<Flow>, End> {
        if !self.suspended.is_empty() {
            // MOVE on a t_order portal read in parts (asyncpg's cursor.forward) moves over its kept rows
            if let Some((count, name)) = std::str::from_utf8(sql).ok().and_then(parse_move) {
                if self.suspended.contains_key(name.as_bytes()) {
                    self.barrier().await?;
                    if self.server.is_some() && self.tx_status == b'E' {
                        self.fail_simple(ExecError::Proxy("25P02", "current transaction is aborted, commands ignored until end of transaction block".into())).await?;
                        return Ok(Some(Flow::Continue));
                    }
                    let s = self.suspended.get_mut(name.as_bytes()).expect("checked");
                    let n = count.unwrap_or(usize::MAX).min(s.rows.len());
                    s.rows.drain(..n);
                    put_message(&mut self.cout, b'C', |o| put_cstr(o, format!("MOVE {n}").as_bytes()));
                    let status = self.logical_status();
                    msg::ready_for_query(&mut self.cout, status);
                    return Ok(Some(Flow::Continue));
                }
            }
        }
        if !self.wants_router(sql) {
            return Ok(None);
        }
        let Ok(text) = std::str::from_utf8(sql) else {
            if !self.shared.engine.may_route(sql) {
                return Ok(None);
            }
            // not UTF-8 (a client_encoding other than UTF8 with non-ASCII text): shardgate
            // cannot read it, and db_default's empty t_order must not answer it
            self.barrier().await?;
            self.fail_simple(ExecError::Proxy("0A000", NOT_UTF8.into())).await?;
            return Ok(Some(Flow::Continue));
        };
        if self.shards_in_tx() && !matches!(tx_verb(text), TxVerb::Other) {
            // read by the lexer, whatever sqlparser makes of it: the shards' part ends here too
            // (or the statement is refused before anything of it runs)
            self.barrier().await?;
            return self.end_transaction(text).await;
        }
        // simple-protocol texts carry their values as literals: analysed each time, not cached
        let analysis = self.shared.engine.router.analysis_uncached(text);
        match &*analysis {
            Analysis::Passthrough(StatementClass::Transaction) if self.shards_in_tx() => {
                self.barrier().await?;
                self.end_transaction(text).await
            }
            Analysis::Passthrough(_) => Ok(None),
            Analysis::Refused(e) => {
                self.barrier().await?;
                metrics::counter!(crate::metrics::ROUTE_REFUSED_TOTAL, "sqlstate" => e.sqlstate()).increment(1);
                self.fail_simple(ExecError::Proxy(e.sqlstate(), e.to_string())).await?;
                Ok(Some(Flow::Continue))
            }
            _ => {
                self.barrier().await?;
                let bound = Bound::default();
                match self.run_routed(&analysis, text, &bound, true, None).await? {
                    Ok(()) => {
                        let status = self.logical_status();
                        msg::ready_for_query(&mut self.cout, status);
                    }
                    Err(e) => self.fail_simple(e).await?,
                }
                Ok(Some(Flow::Continue))
            }
        }
    }

    /// Ends the shards' part of an extended batch's implicit transaction at
    /// its Sync: committed (two-phase across several written shards) when the
    /// batch ran without error, else rolled back. A failed commit is reported
    /// before the Sync's ReadyForQuery, with `db_default`'s part failed too.
    pub(super) async fn end_batch_tx(&mut self) -> Result<(), End> {
        self.barrier().await?;
        self.batch_tx = false;
        if self.in_tx_block() {
            // a BEGIN later in the batch made the whole block explicit (as in PostgreSQL): the
            // shards' part now ends with the client's COMMIT or ROLLBACK, not at this Sync
            return Ok(());
        }
        if self.discard_until_sync || self.server_skipping || (self.server.is_some() && self.tx_status == b'E') {
            self.rollback_shard_part().await;
            return Ok(());
        }
        self.suspended.clear();
        let in_tx = self.shards_in_block();
        let written: Vec<usize> = in_tx.iter().copied().filter(|&i| self.slots[i].as_ref().is_some_and(|s| s.wrote)).collect();
        if !written.is_empty() && self.server.is_some() && self.sent_since_sync {
            // the batch also ran statements on db_default (an outbox row, say), whose implicit
            // transaction commits at this Sync: it carries the decision of a two-phase commit
            // of the written shards, so the shards and db_default end the same way
            return self.commit_batch_carried(&in_tx, &written).await;
        }
        let r = if written.len() <= 1 {
            twopc::commit_each(&mut self.slots, &in_tx).await
        } else {
            let readers: Vec<usize> = in_tx.iter().copied().filter(|i| !written.contains(i)).collect();
            let _ = twopc::commit_each(&mut self.slots, &readers).await;
            twopc::commit(&self.shared.engine, &mut self.slots, &written).await
        };
        exec::release(&mut self.slots);
        if let Err(e) = r {
            self.fail_extended(e).await?;
        }
        Ok(())
    }

    /// Ends an extended batch's implicit transaction that wrote shards and used
    /// `db_default`: the written shards are prepared, then the decision row is
    /// written by a simple Query in `db_default`'s implicit transaction, which
    /// PostgreSQL commits at the end of that Query together with everything the
    /// batch did there. A failure there (a deferred constraint, say) rolls all
    /// of it back and the prepared shards with it.
    async fn commit_batch_carried(&mut self, in_tx: &[usize], written: &[usize]) -> Result<(), End> {
        let readers: Vec<usize> = in_tx.iter().copied().filter(|i| !written.contains(i)).collect();
        let _ = twopc::commit_each(&mut self.slots, &readers).await;
        let engine = self.shared.engine.clone();
        let gid = twopc::new_gid(engine.worker());
        let prepared = twopc::prepare(&engine, &mut self.slots, written, &gid).await;
        exec::release(&mut self.slots);
        if let Err(e) = prepared {
            return self.fail_extended(e).await;
        }
        let server = self.server.as_mut().expect("checked by the caller");
        match wire::control(server, &twopc::decision_sql(&gid, written)).await {
            Ok(Ok(_)) => {
                twopc::crash_point("after_decision");
                twopc::resolve(&engine, &gid, written, true).await;
                Ok(())
            }
            Ok(Err(e)) => {
                twopc::resolve(&engine, &gid, written, false).await;
                self.fail_extended(twopc::decision_failed(e)).await
            }
            Err(_) => {
                // the decision's fate is unknown: recovery resolves it from the log
                self.server_lost().map(|_| ())
            }
        }
    }

    /// A COMMIT or ROLLBACK ends the block's SET LOCALs (also with AND CHAIN,
    /// where db_default stays in a block).
    fn end_local_sets(&mut self, verb: &TxVerb) {
        if matches!(verb, TxVerb::Commit | TxVerb::Rollback) {
            self.local_sets.clear();
        }
    }

    /// Transaction status as the client must see it.
    pub(super) fn logical_status(&self) -> u8 {
        if self.server.is_some() {
            self.tx_status
        } else {
            b'I'
        }
    }

    pub(super) fn in_tx_block(&self) -> bool {
        self.server.is_some() && self.tx_status != b'I'
    }

    /// Plans and runs a routed statement; rows and tag go to the client buffer.
    async fn run_routed(&mut self, analysis: &Analysis, sql: &str, bound: &Bound, simple: bool, visible: Option<usize>) -> Result<Result<(), ExecError>, End> {
        if self.server.is_some() && self.tx_status == b'E' {
            return Ok(Err(ExecError::Proxy("25P02", "current transaction is aborted, commands ignored until end of transaction block".into())));
        }
        let engine = self.shared.engine.clone();
        let params = bound.params();
        // the session's TimeZone, if the client set one: offset-free times are read in it
        // (a SET LOCAL TimeZone of the block wins: the shards read times in it too)
        let session_tz = match self.local_sets.iter().rev().find(|(k, _)| k == "timezone") {
            Some((_, Some(v))) => Some(jiff::tz::TimeZone::get(v).ok()),
            Some((_, None)) => Some(None),
            None => self.desired.iter().find(|(k, _)| k == "timezone").map(|(_, v)| jiff::tz::TimeZone::get(v).ok()),
        };
        let zone = match &session_tz {
            None => shardgate_router::SessionZone::Sharding,
            Some(Some(z)) => shardgate_router::SessionZone::Zone(z),
            Some(None) => shardgate_router::SessionZone::Unknown,
        };
        // `order_no = …`: a place this proxy read before, proved by a row of the answer; only
        // outside transactions (a block's snapshot per shard, locks and errors would stay)
        let hint = if engine.migration.enabled || self.in_tx_block() || self.batch_tx {
            None
        } else {
            analysis.lookup_hint(&params).filter(|p| p.param.is_none_or(|i| text_like(bound, i)))
        };
        if let Some(probe) = &hint {
            if let Some(found) = engine.lookups.hint(probe) {
                if let Ok(Plan::Routed(plan)) = engine.plan_with(analysis, &params, zone, std::slice::from_ref(&found)) {
                    let mark = self.cout.len();
                    let (r, rows) = self.execute_routed(&plan, sql, bound, simple, visible).await?;
                    // a cancel or timeout stands; another error may belong to the place: ask the lookup
                    let canceled = match &r {
                        Err(ExecError::Server(e)) => e.code == "57014",
                        Err(ExecError::Proxy(code, _)) => *code == "57014",
                        _ => false,
                    };
                    if rows || canceled {
                        metrics::counter!(crate::metrics::LOOKUP_HINTS_TOTAL, "result" => "confirmed").increment(1);
                        return Ok(r);
                    }
                    // no row there: the entry may have moved (a deleted row's value taken elsewhere)
                    metrics::counter!(crate::metrics::LOOKUP_HINTS_TOTAL, "result" => "unconfirmed").increment(1);
                    self.cout.truncate(mark);
                    engine.lookups.forget(probe);
                }
            }
        }
        let mut planned = engine.plan_analysis(analysis, &params, zone);
        if let Ok(Plan::Routed(r)) = &planned {
            // `order_no = …` and other unique-lookup values: their entries say where the rows are
            if r.kind != shardgate_router::RoutedKind::Insert && r.targets.len() > 1 {
                let mut probes = analysis.lookup_probes(&params);
                // a value bound with another declared type (int4, bpchar) may compare changed
                probes.retain(|p| p.param.is_none_or(|i| text_like(bound, i)));
                if !probes.is_empty() {
                    let found = crate::routed::lookup::resolve(&engine, &mut self.slots, &probes).await;
                    if found.iter().any(|f| f.at.is_some()) {
                        planned = engine.plan_with(analysis, &params, zone, &found);
                    }
                }
            }
        }
        let plan = match planned {
            Ok(Plan::Routed(r)) => r,
            Ok(Plan::Passthrough(_)) => return Ok(Err(ExecError::Proxy("XX000", "statement unexpectedly not routed".into()))),
            Err(e) => {
                metrics::counter!(crate::metrics::ROUTE_REFUSED_TOTAL, "sqlstate" => e.sqlstate()).increment(1);
                return Ok(Err(ExecError::Proxy(e.sqlstate(), e.to_string())));
            }
        };
        if let Some(l) = plan.lookup_rows.iter().find(|l| l.param.is_some_and(|i| !text_like(bound, i))) {
            return Ok(Err(ExecError::Proxy(
                "0A000",
                format!("{} must be bound as text or varchar (or left to the server to type): it is kept unique across shards (unique_lookups), and a value of another type is stored changed", l.column),
            )));
        }
        if plan.kind == shardgate_router::RoutedKind::Insert {
            let ms: Vec<_> = plan.targets.iter().flat_map(|t| t.months.iter().copied()).collect();
            if let Err(m) = months::within_window(&engine, &self.shared.config.sharding, &ms) {
                return Ok(Err(ExecError::Proxy("0A000", m)));
            }
            months::ensure(&engine, &ms).await;
        }
        Ok(self.execute_routed(&plan, sql, bound, simple, visible).await?.0)
    }

    /// Runs a planned routed statement; rows and tag go to the client buffer.
    /// Also tells whether the answer had a row.
    async fn execute_routed(&mut self, plan: &shardgate_router::Routed, sql: &str, bound: &Bound, simple: bool, visible: Option<usize>) -> Result<(Result<(), ExecError>, bool), End> {
        let engine = self.shared.engine.clone();
        if engine.migration.enabled {
            return Ok((self.run_migrating(plan, sql, bound, simple, visible).await?, true));
        }
        let mark = self.cout.len();
        let mut begin = self.begin_sql.clone().unwrap_or_else(|| "BEGIN".into());
        let mut in_tx = self.in_tx_block();
        // (or one whose batch already ran statements on db_default, whose implicit transaction
        // ends at the Sync: the write commits with it)
        if !simple && !in_tx && (self.batch_tx || (plan.kind != shardgate_router::RoutedKind::Select && (self.cin.first() != Some(&b'S') || self.sent_since_sync))) {
            // a write in an extended batch that goes on after it: the batch is one implicit
            // transaction in PostgreSQL, so the shards hold theirs until its Sync
            self.batch_tx = true;
            in_tx = true;
            begin = "BEGIN".into();
        }
        let desired = self.desired.clone();
        let sets = move |c: &mut crate::backend::ServerConn| super::param_sets(&desired, c);
        let cancel = self.registration.slot.clone();
        let locals = self.local_sets.clone();
        let req = Request {
            routed: plan,
            bound,
            simple,
            visible,
            tx: in_tx.then_some(begin.as_str()),
            param_sets: &sets,
            local_sets: &locals,
            down_targets: &[],
            serial: false,
            cancel: Some(&cancel),
        };
        if self.stream_next && plan.kind == shardgate_router::RoutedKind::Select {
            self.start_stream(Vec::new(), super::streaming::StreamJob { plan: plan.clone(), bound: bound.clone(), visible, begin });
            return Ok((Ok(()), true));
        }
        let keep = self.capture_limit;
        let mut out = Out { buf: &mut self.cout, client: if keep.is_some() { None } else { Some(&self.client) }, keep, overflow: false, flushed: false, sink: None };
        let timeout = self.shared.config.server.query_timeout_ms;
        let r = with_query_timeout(timeout, &cancel, exec::execute(&engine, &mut self.slots, &req, &mut out)).await;
        let (flushed, overflow) = (out.flushed, out.overflow);
        let rows = flushed || has_data_row(self.cout.get(mark..).unwrap_or_default());
        let r = match r {
            Ok(()) if overflow => Err(portal_too_large(keep.unwrap_or_default())),
            other => other,
        };
        match r {
            Err(ExecError::ClientIo(e)) => Err(End::ClientIo(e)),
            other => Ok((other, rows)),
        }
    }

    /// Refuses a simple Query with `code` and `m`, in order, before anything of it runs.
    pub(super) async fn refuse_simple(&mut self, code: &'static str, m: String) -> Result<(), End> {
        self.barrier().await?;
        self.fail_simple(ExecError::Proxy(code, m)).await
    }

    /// Refuses an extended-protocol message with `code` and `m` (the batch skips to Sync).
    pub(super) async fn refuse_extended(&mut self, code: &'static str, m: String) -> Result<(), End> {
        self.barrier().await?;
        if self.server_skipping {
            self.discard_until_sync = true;
            return Ok(());
        }
        self.fail_extended(ExecError::Proxy(code, m)).await
    }

    /// Writes the error of a simple Query and its ReadyForQuery; inside a
    /// transaction block `db_default` is made to fail too.
    pub(super) async fn fail_simple(&mut self, e: ExecError) -> Result<(), End> {
        let frame = error_frame(&e);
        if self.in_tx_block() && self.tx_status != b'E' {
            self.abort_default().await?;
        }
        self.cout.extend_from_slice(&frame);
        let status = self.logical_status();
        msg::ready_for_query(&mut self.cout, status);
        Ok(())
    }

    /// Aborts the open `db_default` transaction with a failing statement.
    async fn abort_default(&mut self) -> Result<(), End> {
        let server = self.server.as_mut().expect("in a transaction block");
        match wire::control(server, FAIL_SQL).await {
            Ok(_) => self.tx_status = b'E',
            Err(_) => return self.server_lost(),
        }
        Ok(())
    }

    /// PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK.
    fn effective_verb(&self, v: TxVerb) -> TxVerb {
        match v {
            TxVerb::Commit if self.tx_status == b'E' => TxVerb::Rollback,
            v => v,
        }
    }

    /// Shards inside the client's transaction block.
    fn shards_in_block(&self) -> Vec<usize> {
        self.slots.iter().enumerate().filter(|(_, s)| s.as_ref().is_some_and(|s| s.in_tx)).map(|(i, _)| i).collect()
    }

    /// ROLLBACK (or COMMIT of an aborted block) on every shard of the block.
    async fn rollback_shard_part(&mut self) {
        self.suspended.clear();
        self.secondaries.clear();
        let in_tx = self.shards_in_block();
        twopc::rollback(&mut self.slots, &in_tx).await;
        exec::release(&mut self.slots);
    }

    /// The shards' part of a COMMIT, before `db_default` commits: read-only shards
    /// and a single written shard commit; several written shards are prepared
    /// (two-phase commit) and `Some((gid, written))` says the decision is still to
    /// be made. On an error every shard is rolled back and released.
    async fn commit_shard_part(&mut self) -> Result<Option<(String, Vec<usize>)>, ExecError> {
        self.suspended.clear();
        // a migration's queued secondary writes go first, while the primary's locks are held
        self.flush_secondaries().await;
        let in_tx = self.shards_in_block();
        let written: Vec<usize> = in_tx.iter().copied().filter(|&i| self.slots[i].as_ref().is_some_and(|s| s.wrote)).collect();
        // one written shard commits alone, unless the client's own db_default transaction
        // wrote too (an order update plus an outbox row): then both take part in two-phase
        // commit, the decision riding on the client's COMMIT
        if written.is_empty() || (written.len() == 1 && !self.default_wrote().await) {
            let r = twopc::commit_each(&mut self.slots, &in_tx).await;
            exec::release(&mut self.slots);
            return r.map(|()| None);
        }
        let readers: Vec<usize> = in_tx.iter().copied().filter(|i| !written.contains(i)).collect();
        let _ = twopc::commit_each(&mut self.slots, &readers).await;
        let gid = twopc::new_gid(self.shared.engine.worker());
        let r = twopc::prepare(&self.shared.engine, &mut self.slots, &written, &gid).await;
        exec::release(&mut self.slots);
        r.map(|()| Some((gid, written)))
    }

    /// Whether the client's `db_default` transaction has written anything (it has
    /// a transaction id). Unknown counts as written: two-phase commit is never wrong.
    async fn default_wrote(&mut self) -> bool {
        let Some(server) = self.server.as_mut() else { return false };
        match wire::control(server, "SELECT (pg_current_xact_id_if_assigned() IS NOT NULL)::text").await {
            Ok(Ok(rows)) => rows.first().cloned().flatten().as_deref() != Some("false"),
            _ => true,
        }
    }

    /// COMMIT / ROLLBACK / savepoints while shards take part (simple protocol).
    async fn end_transaction(&mut self, sql: &str) -> Result<Option<Flow>, End> {
        let verb = self.effective_verb(tx_verb(sql));
        self.end_local_sets(&verb);
        match verb {
            TxVerb::Other => Ok(None),
            TxVerb::Unsupported => {
                self.fail_simple(ExecError::Proxy("0A000", NO_SAVEPOINTS.into())).await?;
                Ok(Some(Flow::Continue))
            }
            TxVerb::Mixed => {
                self.fail_simple(ExecError::Proxy("0A000", NO_MIXED.into())).await?;
                Ok(Some(Flow::Continue))
            }
            TxVerb::Rollback => {
                self.rollback_shard_part().await;
                Ok(None)
            }
            TxVerb::Commit => {
                // the shards first, then db_default
                let (gid, written) = match self.commit_shard_part().await {
                    Ok(None) => return Ok(None),
                    Ok(Some(p)) => p,
                    Err(e) => {
                        self.rollback_default().await?;
                        self.cout.extend_from_slice(&error_frame(&e));
                        msg::ready_for_query(&mut self.cout, b'I');
                        return Ok(Some(Flow::Continue));
                    }
                };
                // the decision commits with the client's own db_default transaction; the
                // prepared shard transactions are then resolved on fresh connections
                let engine = self.shared.engine.clone();
                let server = self.server.as_mut().expect("in a transaction block");
                let decided = match wire::control(server, &twopc::decision_sql(&gid, &written)).await {
                    Ok(Ok(_)) => match wire::control(server, "COMMIT").await {
                        // an error of the COMMIT itself (a deferred constraint) is the client's own
                        Ok(r) => r.map_err(ExecError::Server),
                        // the decision's fate is unknown: recovery resolves it from the log
                        Err(_) => return self.server_lost().map(|_| None),
                    },
                    Ok(Err(e)) => {
                        let _ = wire::control(server, "ROLLBACK").await;
                        Err(twopc::decision_failed(e))
                    }
                    Err(_) => {
                        // the decision may have committed before the connection broke (or may
                        // still): never roll back here; recovery resolves it from the log,
                        // racing the decision with its abort marker
                        return self.server_lost().map(|_| None);
                    }
                };
                self.set_tx_status(b'I');
                match decided {
                    Ok(_) => {
                        twopc::crash_point("after_decision");
                        twopc::resolve(&engine, &gid, &written, true).await;
                        put_message(&mut self.cout, b'C', |o| put_cstr(o, b"COMMIT"));
                    }
                    Err(e) => {
                        twopc::resolve(&engine, &gid, &written, false).await;
                        self.cout.extend_from_slice(&error_frame(&e));
                    }
                }
                msg::ready_for_query(&mut self.cout, b'I');
                Ok(Some(Flow::Continue))
            }
        }
    }

    /// COMMIT / ROLLBACK sent with the extended protocol while shards take
    /// part: the shards' part is done when the Parse arrives (drivers send
    /// Parse/Bind/Execute/Sync together); the statement then runs on
    /// `db_default` as sent. With several written shards the decision row is
    /// written inside the client's transaction, and the prepared shard
    /// transactions are resolved as soon as `db_default` reports the end of it.
    /// `Some` when the Parse was answered here (an error).
    pub(super) async fn extended_tx_end(&mut self, query: &[u8]) -> Result<Option<Flow>, End> {
        let Ok(text) = std::str::from_utf8(query) else {
            self.refuse_extended("0A000", NOT_UTF8.into()).await?;
            return Ok(Some(Flow::Continue));
        };
        let verb = self.effective_verb(tx_verb(text));
        if matches!(verb, TxVerb::Other) {
            return Ok(None);
        }
        self.barrier().await?;
        if self.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        self.end_local_sets(&verb);
        match verb {
            TxVerb::Other => Ok(None),
            TxVerb::Unsupported => {
                self.fail_extended(ExecError::Proxy("0A000", NO_SAVEPOINTS.into())).await?;
                Ok(Some(Flow::Continue))
            }
            TxVerb::Mixed => {
                self.fail_extended(ExecError::Proxy("0A000", NO_MIXED.into())).await?;
                Ok(Some(Flow::Continue))
            }
            TxVerb::Rollback => {
                self.rollback_shard_part().await;
                Ok(None)
            }
            TxVerb::Commit => {
                let (gid, written) = match self.commit_shard_part().await {
                    Ok(None) => return Ok(None),
                    Ok(Some(p)) => p,
                    Err(e) => {
                        self.rollback_default().await?;
                        self.fail_extended(e).await?;
                        return Ok(Some(Flow::Continue));
                    }
                };
                let server = self.server.as_mut().expect("in a transaction block");
                match wire::control(server, &twopc::decision_sql(&gid, &written)).await {
                    Ok(Ok(_)) => {
                        // the client's COMMIT makes the decision durable; resolved at its ReadyForQuery
                        self.pending_2pc = Some((gid, written));
                        Ok(None)
                    }
                    Ok(Err(e)) => {
                        twopc::resolve(&self.shared.engine, &gid, &written, false).await;
                        self.abort_default().await?;
                        self.fail_extended(twopc::decision_failed(e)).await?;
                        Ok(Some(Flow::Continue))
                    }
                    Err(_) => {
                        twopc::resolve(&self.shared.engine, &gid, &written, false).await;
                        self.server_lost().map(|_| None)
                    }
                }
            }
        }
    }

    /// Resolves a two-phase commit whose decision rode on the client's own
    /// COMMIT: committed if the decision row exists now, rolled back if not.
    pub(super) async fn resolve_pending_2pc(&mut self) {
        if let Some((gid, shards)) = self.resolve_2pc.take() {
            let engine = self.shared.engine.clone();
            match twopc::decided(&engine, &gid).await {
                Some(commit) => twopc::resolve(&engine, &gid, &shards, commit).await,
                // unknown is not "no": a decision that committed must never be rolled back
                None => tracing::warn!(gid, "could not read the commit decision; recovery will resolve the prepared transactions"),
            }
        }
    }

    async fn rollback_default(&mut self) -> Result<(), End> {
        if let Some(server) = self.server.as_mut() {
            if wire::control(server, "ROLLBACK").await.is_err() {
                return self.server_lost();
            }
            self.set_tx_status(b'I');
        }
        Ok(())
    }

    // ------------------------------------------------------------ extended protocol

    /// An extended-protocol error: in order, and skipping to Sync like PostgreSQL.
    pub(super) async fn fail_extended(&mut self, e: ExecError) -> Result<(), End> {
        let frame = error_frame(&e);
        if self.server.is_some() {
            // have db_default fail a Parse at this point: it then skips to Sync (and
            // aborts an open transaction) exactly as the client expects
            put_message(&mut self.sout, b'P', |b| b.extend_from_slice(b"\0!\0\0\0"));
            self.expect.push_back(Expect::ReplaceError(frame));
            self.sent_since_sync = true;
        } else {
            self.cout.extend_from_slice(&frame);
        }
        self.discard_until_sync = true;
        Ok(())
    }

    /// Parse: `Some` when the statement is routed (handled here).
    pub(super) async fn routed_parse(&mut self, name: &[u8], query: &[u8], param_types: &[u8]) -> Result<Option<Flow>, End> {
        if self.shards_in_tx() {
            if let Some(flow) = self.extended_tx_end(query).await? {
                return Ok(Some(flow));
            }
        }
        if !self.shared.engine.may_route(query) {
            if name.is_empty() {
                self.routed_stmts.remove(name);
            }
            return Ok(None);
        }
        let Ok(text) = std::str::from_utf8(query) else { return Ok(None) };
        let analysis = self.shared.engine.router.analysis(text);
        if matches!(&*analysis, Analysis::Passthrough(_)) {
            if name.is_empty() {
                self.routed_stmts.remove(name);
            }
            return Ok(None);
        }
        self.barrier().await?;
        if self.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        if !name.is_empty() && (self.routed_stmts.contains_key(name) || self.statements.contains_key(name)) {
            let m = format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(name));
            self.fail_extended(ExecError::Proxy("42P05", m)).await?;
            return Ok(Some(Flow::Continue));
        }
        if let Analysis::Refused(e) = &*analysis {
            metrics::counter!(crate::metrics::ROUTE_REFUSED_TOTAL, "sqlstate" => e.sqlstate()).increment(1);
            self.fail_extended(ExecError::Proxy(e.sqlstate(), e.to_string())).await?;
            return Ok(Some(Flow::Continue));
        }
        let types = type_oids(param_types);
        self.routed_stmts.insert(name.to_vec(), Arc::new(RoutedStmt { sql: text.to_string(), types, analysis, describe: OnceLock::new(), cached: None, param_oids: Vec::new() }));
        put_message(&mut self.cout, b'1', |_| {});
        Ok(Some(Flow::Continue))
    }

    /// Bind: `Some` when it binds a routed statement.
    pub(super) async fn routed_bind(&mut self, body: &[u8]) -> Result<Option<Flow>, End> {
        let mut r = Reader::new(body);
        let (Ok(portal), Ok(statement)) = (r.cstr(), r.cstr()) else { return Ok(None) };
        let Some(stmt) = self.routed_stmts.get(statement).cloned() else {
            if !self.routed_portals.is_empty() {
                self.routed_portals.remove(portal);
                self.suspended.remove(portal);
            }
            return Ok(None);
        };
        let portal = portal.to_vec();
        self.barrier().await?;
        if self.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        let bound = match parse_bind(&mut r, &stmt.types) {
            Ok(b) => b,
            Err(m) => return Err(End::Fatal("08P01", m.to_string())),
        };
        if bound.values.len() != count_params(&stmt) {
            let m = format!("bind message supplies {} parameters, but prepared statement requires {}", bound.values.len(), count_params(&stmt));
            self.fail_extended(ExecError::Proxy("08P01", m)).await?;
            return Ok(Some(Flow::Continue));
        }
        let cap = self.shared.config.server.max_client_portals;
        if !portal.is_empty() && !self.routed_portals.contains_key(&portal) && self.routed_portals.len() >= cap {
            let m = format!("too many open portals on this connection (server.max_client_portals = {cap}); close some with Close or end the transaction");
            self.fail_extended(ExecError::Proxy("53400", m)).await?;
            return Ok(Some(Flow::Continue));
        }
        self.suspended.remove(&portal);
        self.routed_portals.insert(portal, RoutedPortal { stmt, bound: Arc::new(bound) });
        put_message(&mut self.cout, b'2', |_| {});
        Ok(Some(Flow::Continue))
    }

    /// Describe: `Some` when it describes a routed statement or portal.
    pub(super) async fn routed_describe(&mut self, t: &Target<'_>) -> Result<Option<Flow>, End> {
        let (stmt, portal_bound) = match t.kind {
            b'S' => match self.routed_stmts.get(t.name) {
                Some(s) => (s.clone(), None),
                None => return Ok(None),
            },
            _ => match self.routed_portals.get(t.name) {
                Some(p) => (p.stmt.clone(), Some(p.bound.clone())),
                None => return Ok(None),
            },
        };
        self.barrier().await?;
        if self.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        let (params, rows) = match self.describe(&stmt).await {
            Ok(d) => d,
            Err(e) => {
                self.fail_extended(e).await?;
                return Ok(Some(Flow::Continue));
            }
        };
        match portal_bound {
            None => {
                self.cout.extend_from_slice(&params);
                self.cout.extend_from_slice(&rows);
            }
            // text results: the statement's description is the portal's
            Some(b) if rows[0] == b'T' && b.result_formats.iter().all(|f| *f == 0) => self.cout.extend_from_slice(&rows),
            Some(b) if rows[0] == b'T' => {
                let n = wire::row_description(&rows[5..], usize::MAX, None).map_or(0, |(_, f)| f.len());
                let binary: Vec<bool> = (0..n).map(|i| b.binary(i)).collect();
                match wire::row_description(&rows[5..], n, Some(&binary)) {
                    Some((t, _)) => self.cout.extend_from_slice(&t),
                    None => self.cout.extend_from_slice(&rows),
                }
            }
            Some(_) => self.cout.extend_from_slice(&rows),
        }
        Ok(Some(Flow::Continue))
    }

    /// ParameterDescription and RowDescription/NoData of a routed statement,
    /// from a shard (the template table has the logical table's columns).
    pub(super) async fn describe(&mut self, stmt: &RoutedStmt) -> Result<(Bytes, Bytes), ExecError> {
        if let Some(d) = stmt.describe.get() {
            return Ok(d.clone());
        }
        let engine = self.shared.engine.clone();
        let mut last = ExecError::Proxy("08006", "no shard is available to describe the statement".into());
        // a cached point read is described by db_default, where its table lives
        let legacy_first = engine.migration.phase().is_some_and(|p| p.reads_legacy()) && engine.legacy.is_some();
        let pools: Vec<&crate::backend::Pool> = if stmt.cached.is_some() {
            vec![engine.pool(engine.shards.len())]
        } else if legacy_first {
            std::iter::once(engine.pool(engine.legacy_slot())).chain(engine.shards.iter()).collect()
        } else {
            engine.shards.iter().collect()
        };
        for pool in pools {
            let Ok(mut conn) = pool.get().await else { continue };
            let mut buf = BytesMut::new();
            wire::put_describe(&mut buf, &stmt.sql, &stmt.types);
            use tokio::io::AsyncWriteExt;
            if conn.stream.write_all(&buf).await.is_err() {
                conn.broken = true;
                continue;
            }
            let mut params = None;
            let mut rows = None;
            let mut err = None;
            loop {
                let f = match conn.read_frame().await {
                    Ok(f) => f,
                    Err(_) => {
                        conn.broken = true;
                        break;
                    }
                };
                match f.tag {
                    b't' => params = Some(f.raw),
                    b'T' | b'n' => rows = Some(f.raw),
                    b'E' => err = Some(ServerError { code: crate::protocol::backend::parse_error_fields(f.body()).code, raw: f.raw }),
                    b'Z' => break,
                    _ => {}
                }
            }
            if let Some(e) = err {
                return Err(ExecError::Server(e));
            }
            if let (Some(p), Some(r)) = (params, rows) {
                let _ = stmt.describe.set((p, r));
                return Ok(stmt.describe.get().expect("set").clone());
            }
            last = ExecError::Proxy("08006", "lost a shard connection while describing the statement".into());
        }
        Err(last)
    }

    /// Execute: `Some` when it runs a routed portal.
    pub(super) async fn routed_execute(&mut self, body: &[u8]) -> Result<Option<Flow>, End> {
        let mut r = Reader::new(body);
        let Ok(portal) = r.cstr() else { return Ok(None) };
        let max_rows = r.i32().unwrap_or(0);
        let Some(p) = self.routed_portals.get(portal) else { return Ok(None) };
        let (stmt, bound) = (p.stmt.clone(), p.bound.clone());
        self.barrier().await?;
        if self.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        if stmt.cached.is_some() {
            self.cached_execute(&stmt, &bound, max_rows).await?;
            return Ok(Some(Flow::Continue));
        }
        let n = if max_rows > 0 { max_rows as usize } else { usize::MAX };
        if self.stream.as_ref().is_some_and(|s| s.portal == portal) {
            // the next part of a portal streaming from its own task
            self.stream_part(n).await?;
            return Ok(Some(Flow::Continue));
        }
        if let Some(s) = self.suspended.get_mut(portal) {
            if s.rows.is_empty() {
                if let Some((code, m)) = s.error.take() {
                    self.fail_extended(ExecError::Proxy(code, m)).await?;
                    return Ok(Some(Flow::Continue));
                }
            }
            // the next part of a portal read in parts
            self.send_part(portal, n);
            return Ok(Some(Flow::Continue));
        }
        if max_rows > 0 {
            // a row limit on a statement that returns no rows is ignored, as PostgreSQL does
            let returns_rows = match self.describe(&stmt).await {
                Ok((_, rows)) => rows.first() == Some(&b'T'),
                Err(e) => {
                    self.fail_extended(e).await?;
                    return Ok(Some(Flow::Continue));
                }
            };
            if returns_rows {
                return self.execute_in_parts(portal.to_vec(), &stmt, &bound, max_rows as usize).await.map(Some);
            }
        }
        let visible = if bound.result_formats.iter().any(|f| *f != 0) {
            match self.describe(&stmt).await {
                Ok((_, rows)) if rows[0] == b'T' => wire::row_description(&rows[5..], usize::MAX, None).map(|(_, f)| f.len()),
                Ok(_) => Some(0),
                Err(e) => {
                    self.fail_extended(e).await?;
                    return Ok(Some(Flow::Continue));
                }
            }
        } else {
            None
        };
        match self.run_routed(&stmt.analysis, &stmt.sql, &bound, false, visible).await? {
            Ok(()) => {}
            Err(e) => self.fail_extended(e).await?,
        }
        Ok(Some(Flow::Continue))
    }

    /// The first Execute with a row limit of a routed portal: runs the
    /// statement, keeps its rows (at most `server.max_portal_bytes`), sends the
    /// first `max_rows` and PortalSuspended, or all of them and the tag.
    async fn execute_in_parts(&mut self, portal: Vec<u8>, stmt: &RoutedStmt, bound: &Bound, max_rows: usize) -> Result<Flow, End> {
        let visible = if bound.result_formats.iter().any(|f| *f != 0) {
            match self.describe(stmt).await {
                Ok((_, rows)) if rows[0] == b'T' => wire::row_description(&rows[5..], usize::MAX, None).map(|(_, f)| f.len()),
                Ok(_) => Some(0),
                Err(e) => {
                    self.fail_extended(e).await?;
                    return Ok(Flow::Continue);
                }
            }
        } else {
            None
        };
        if self.in_tx_block() && !self.shared.engine.migration.enabled && matches!(*stmt.analysis, Analysis::Select(_)) {
            // inside a block the portal lives until the block ends: stream it
            self.stream_next = true;
            let r = self.run_routed(&stmt.analysis, &stmt.sql, bound, false, visible).await;
            self.stream_next = false;
            match r? {
                Ok(()) => {
                    if let Some(st) = self.stream.as_mut() {
                        st.portal = portal;
                        self.stream_part(max_rows).await?;
                    }
                }
                Err(e) => self.fail_extended(e).await?,
            }
            return Ok(Flow::Continue);
        }
        let limit = self.shared.config.server.max_portal_bytes;
        let before = std::mem::take(&mut self.cout);
        self.capture_limit = Some(limit);
        let r = self.run_routed(&stmt.analysis, &stmt.sql, bound, false, visible).await;
        self.capture_limit = None;
        let mut captured = std::mem::replace(&mut self.cout, before);
        let r = match r? {
            Ok(()) if captured.len() > limit => Err(portal_too_large(limit)),
            other => other,
        };
        if let Err(e) = r {
            self.fail_extended(e).await?;
            return Ok(Flow::Continue);
        }
        let mut rows = std::collections::VecDeque::new();
        let mut tag = String::from("SELECT");
        while let Ok(Some(f)) = crate::protocol::codec::split_frame(&mut captured, usize::MAX) {
            match f.tag {
                b'D' => rows.push_back(f.raw),
                // the tag is made per part; notices go out with the first part
                b'C' => {
                    let t = String::from_utf8_lossy(f.body().strip_suffix(&[0]).unwrap_or(f.body())).into_owned();
                    tag = t.rsplit_once(' ').map_or(t.clone(), |(verb, _)| verb.to_string());
                }
                _ => self.cout.extend_from_slice(&f.raw),
            }
        }
        self.suspended.insert(portal.clone(), Suspended { rows, tag, error: None });
        self.send_part(&portal, max_rows);
        Ok(Flow::Continue)
    }

    /// Sends up to `n` kept rows of a portal read in parts, then
    /// PortalSuspended, or the tag (`SELECT` and the rows of this part, as
    /// PostgreSQL counts them) once a part comes up short. Like PostgreSQL, a
    /// part that takes exactly the last rows is still suspended: the next
    /// Execute answers `SELECT 0`.
    fn send_part(&mut self, portal: &[u8], n: usize) {
        let Some(s) = self.suspended.get_mut(portal) else { return };
        let mut sent = 0usize;
        while sent < n {
            let Some(row) = s.rows.pop_front() else { break };
            self.cout.extend_from_slice(&row);
            sent += 1;
        }
        if sent < n {
            // the portal stays, at its end: a later Execute answers 0 rows, as in PostgreSQL
            let tag = s.tag.clone();
            put_message(&mut self.cout, b'C', |o| put_cstr(o, format!("{tag} {sent}").as_bytes()));
        } else {
            put_message(&mut self.cout, b's', |_| {});
        }
    }

    /// Close: `Some` when it closes a routed statement or portal.
    pub(super) async fn routed_close(&mut self, t: &Target<'_>) -> Result<Option<Flow>, End> {
        let found = match t.kind {
            b'S' => self.routed_stmts.remove(t.name).is_some(),
            _ => {
                self.suspended.remove(t.name);
                self.routed_portals.remove(t.name).is_some()
            }
        };
        if !found {
            return Ok(None);
        }
        self.barrier().await?;
        if self.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        put_message(&mut self.cout, b'3', |_| {});
        Ok(Some(Flow::Continue))
    }

    /// After db_default reported the end of a transaction the proxy did not
    /// see (COMMIT inside a multi-statement string, a FATAL): shard blocks
    /// cannot be committed safely, so their connections are closed (the
    /// server rolls back).
    pub(super) fn drop_orphaned_shard_tx(&mut self) {
        // (an extended batch's implicit transaction is ended at its Sync, not here)
        if self.tx_status == b'I' && !self.batch_tx && self.shards_in_tx() {
            self.secondaries.clear();
            tracing::warn!("transaction ended on db_default without COMMIT/ROLLBACK through shardgate; rolling back shard work");
            for slot in self.slots.iter_mut() {
                if let Some(mut s) = slot.take() {
                    s.conn.broken = true;
                }
            }
        }
    }
}

/// Runs a routed statement; past `server.query_timeout_ms` (0 = never) the
/// shard connections running it get a CancelRequest, and the statement ends
/// with the shards' 57014 as a statement on one server would.
/// Whether bind parameter `i` is declared text-like (or left to the server).
fn text_like(bound: &Bound, i: usize) -> bool {
    matches!(bound.types.get(i).copied().unwrap_or(0), 0 | 25 | 1043)
}

pub(super) async fn with_query_timeout<T>(timeout_ms: u64, cancel: &crate::cancel::CancelSlot, run: impl std::future::Future<Output = T>) -> T {
    if timeout_ms == 0 {
        return run.await;
    }
    let fire = async {
        tokio::time::sleep(std::time::Duration::from_millis(timeout_ms)).await;
        metrics::counter!(crate::metrics::QUERY_TIMEOUTS_TOTAL).increment(1);
        tracing::warn!(timeout_ms, "routed statement timed out, cancelling it on its shards");
        // again every 100 ms while the statement runs: a shard statement that had not
        // started when a cancel came (PostgreSQL drops it) or that starts later is
        // stopped too
        loop {
            for key in cancel.shards() {
                let _ = key.cancel().await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    tokio::pin!(run);
    tokio::select! {
        biased;
        r = &mut run => r,
        () = fire => unreachable!("the cancel loop never completes"),
    }
}

/// `MOVE [FORWARD | NEXT] [count | ALL] [FROM | IN] portal`: the count
/// (`None` for ALL) and the portal's name; other forms give `None`.
fn parse_move(sql: &str) -> Option<(Option<usize>, String)> {
    let words: Vec<&str> = sql.trim().trim_end_matches(';').split_whitespace().collect();
    let (first, mut rest) = words.split_first()?;
    if !first.eq_ignore_ascii_case("move") {
        return None;
    }
    let mut count = Some(1);
    if let Some(w) = rest.first() {
        if w.eq_ignore_ascii_case("forward") {
            rest = &rest[1..];
        } else if w.eq_ignore_ascii_case("next") {
            rest = &rest[1..];
            count = Some(1);
        }
    }
    if let Some(w) = rest.first() {
        if w.eq_ignore_ascii_case("all") {
            count = None;
            rest = &rest[1..];
        } else if let Ok(n) = w.parse::<usize>() {
            count = Some(n);
            rest = &rest[1..];
        }
    }
    if rest.first().is_some_and(|w| w.eq_ignore_ascii_case("from") || w.eq_ignore_ascii_case("in")) {
        rest = &rest[1..];
    }
    let [name] = rest else { return None };
    let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(q) => q.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    };
    Some((count, name))
}

fn portal_too_large(limit: usize) -> ExecError {
    ExecError::Proxy(
        "54000",
        format!(
            "the rows of this portal exceed server.max_portal_bytes ({limit} bytes), which a portal read in parts may hold; \
             fetch them without a row limit, add a LIMIT, or raise the setting"
        ),
    )
}

/// A count (int16) followed by that many type oids (int32): the parameter
/// types of a Parse, or the body of a ParameterDescription.
pub(super) fn type_oids(body: &[u8]) -> Vec<u32> {
    let mut r = Reader::new(body);
    let n = r.i16().unwrap_or(0).max(0) as usize;
    (0..n).filter_map(|_| r.i32().ok().map(|t| t as u32)).collect()
}

fn count_params(stmt: &RoutedStmt) -> usize {
    // the client's declared types may be fewer than the statement uses: the shard's describe knows
    match stmt.describe.get() {
        Some((t, _)) if t.len() >= 7 => i16::from_be_bytes([t[5], t[6]]).max(0) as usize,
        _ => max_placeholder(&stmt.sql).max(stmt.types.len()),
    }
}

/// Highest `$n` in a statement text (outside quotes, roughly): the parameter count.
fn max_placeholder(sql: &str) -> usize {
    let b = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'\'' || c == b'"' => quote = Some(c),
            None if c == b'$' => {
                let j = b[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
                if j > 0 {
                    if let Ok(n) = sql[i + 1..i + 1 + j].parse::<usize>() {
                        max = max.max(n);
                    }
                    i += j;
                }
            }
            None => {}
        }
        i += 1;
    }
    max
}

pub(super) fn parse_bind(r: &mut Reader<'_>, types: &[u32]) -> Result<Bound, &'static str> {
    let nf = r.i16().map_err(|e| e.0)?;
    if nf < 0 {
        return Err("invalid parameter format count in Bind");
    }
    let mut fmts = Vec::with_capacity(nf as usize);
    for _ in 0..nf {
        fmts.push(r.i16().map_err(|e| e.0)?);
    }
    let nv = r.i16().map_err(|e| e.0)?;
    if nv < 0 {
        return Err("invalid parameter count in Bind");
    }
    let mut values = Vec::with_capacity(nv as usize);
    for _ in 0..nv {
        let len = r.i32().map_err(|e| e.0)?;
        if len < 0 {
            values.push(None);
        } else {
            values.push(Some(Bytes::copy_from_slice(r.bytes(len as usize).map_err(|e| e.0)?)));
        }
    }
    let formats = match fmts.len() {
        0 => vec![0; values.len()],
        1 => vec![fmts[0]; values.len()],
        n if n == values.len() => fmts,
        _ => return Err("bind message has a different number of parameter formats and parameters"),
    };
    let nr = r.i16().map_err(|e| e.0)?;
    if nr < 0 {
        return Err("invalid result format count in Bind");
    }
    let mut result_formats = Vec::with_capacity(nr as usize);
    for _ in 0..nr {
        result_formats.push(r.i16().map_err(|e| e.0)?);
    }
    Ok(Bound { values, formats, types: types.to_vec(), result_formats })
}

/// The ErrorResponse frame for an execution error.
pub(super) fn error_frame(e: &ExecError) -> Bytes {
    match e {
        ExecError::Server(s) => s.raw.clone(),
        ExecError::Proxy(code, m) => {
            let mut b = BytesMut::new();
            msg::error_response(&mut b, Severity::Error, code, m);
            b.freeze()
        }
        ExecError::ClientIo(_) => Bytes::new(),
        ExecError::CatchUp(s) => {
            let mut b = BytesMut::new();
            msg::error_response(&mut b, Severity::Error, "57P03", &format!("shard db_{s} is catching up on orders written while it was down; retry shortly"));
            b.freeze()
        }
        ExecError::Unreachable(s) => {
            let mut b = BytesMut::new();
            msg::error_response(&mut b, Severity::Error, "08006", &format!("shard db_{s} is unavailable"));
            b.freeze()
        }
        ExecError::DownMissed(s) => error_frame(&crate::routed::exec::down_missed(*s)),
    }
}

/// Whether `buf` (whole protocol messages) holds a DataRow.
fn has_data_row(mut buf: &[u8]) -> bool {
    while buf.len() >= 5 {
        if buf[0] == b'D' {
            return true;
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        let Some(rest) = buf.get(1 + len..) else { return false };
        buf = rest;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_counted_outside_quotes() {
        assert_eq!(max_placeholder("select * from t_order where merchant_id = $1 and id in ($3, $2)"), 3);
        assert_eq!(max_placeholder("select '$9' from t_order"), 0);
    }

    #[test]
    fn move_statements() {
        assert_eq!(parse_move("MOVE FORWARD 10 \"__asyncpg_portal_2e__\""), Some((Some(10), "__asyncpg_portal_2e__".into())));
        assert_eq!(parse_move("move all in c1;"), Some((None, "c1".into())));
        assert_eq!(parse_move("MOVE NEXT FROM C1"), Some((Some(1), "c1".into())));
        assert_eq!(parse_move("MOVE BACKWARD 1 c1"), None);
        assert_eq!(parse_move("SELECT 1"), None);
    }

    #[test]
    fn transaction_verbs() {
        assert!(matches!(tx_verb("COMMIT"), TxVerb::Commit));
        assert!(matches!(tx_verb("/* app */ COMMIT"), TxVerb::Commit));
        assert!(matches!(tx_verb("-- x\ncommit"), TxVerb::Commit));
        assert!(matches!(tx_verb("COMMIT PREPARED 'g'"), TxVerb::Unsupported));
        assert!(matches!(tx_verb("select 1; commit"), TxVerb::Mixed));
        assert!(matches!(tx_verb("end;"), TxVerb::Commit));
        assert!(matches!(tx_verb("rollback"), TxVerb::Rollback));
        assert!(matches!(tx_verb("ROLLBACK TO SAVEPOINT a"), TxVerb::Unsupported));
        assert!(matches!(tx_verb("savepoint a"), TxVerb::Unsupported));
        assert!(matches!(tx_verb("begin"), TxVerb::Other));
    }
}

