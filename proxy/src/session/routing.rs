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

use bytes::Bytes;
use shardgate_router::{Analysis, Plan, StatementClass};

use super::extended::*;
use super::txn::*;
use super::{End, Flow, Session};
use crate::protocol::backend::{self as msg};
use crate::protocol::codec::{put_cstr, put_message};
use crate::routed::exec::{self, Bound, ExecError, Out, Request};
use crate::routed::months;
use crate::protocol::sqlstate;

/// Counts a simple-protocol statement once, by the way it was finally planned:
/// from its cached shape, or from its whole text (no shape, or one the router
/// could not plan).
fn count_plan(simple: bool, bound: &Bound) {
    // the two handles resolved once (the recorder is installed before any session):
    // `counter!` with a label looks the series up in the registry at every call
    static PLANS: std::sync::OnceLock<[metrics::Counter; 2]> = std::sync::OnceLock::new();
    if simple {
        let [shape, parse] = PLANS.get_or_init(|| {
            [metrics::counter!(crate::metrics::SIMPLE_PLANS_TOTAL, "path" => "shape"), metrics::counter!(crate::metrics::SIMPLE_PLANS_TOTAL, "path" => "parse")]
        });
        if bound.shape.is_some() { shape } else { parse }.increment(1);
    }
}

/// A prepared statement on a sharded table, kept by the proxy.
pub(super) struct RoutedStmt {
    pub(super) sql: String,
    pub(super) types: Vec<u32>,
    pub(super) analysis: Arc<Analysis>,
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

/// A statement that fails on `db_default` with no side effects: used to put
/// its transaction into the aborted state when a shard statement failed.
pub(super) const FAIL_SQL: &str = "SELECT 'shardgate: a statement on a shard failed'::int";

/// The refusal of a statement on a sharded table whose text is not UTF-8.
pub(super) const NOT_UTF8: &str = "a statement on a sharded table must be valid UTF-8 text: shardgate reads it to route it; use client_encoding UTF8 for non-ASCII text";

/// PostgreSQL's answer to a statement in a failed block.
pub(super) fn in_failed_block() -> ExecError {
    ExecError::Proxy(sqlstate::IN_FAILED_SQL_TRANSACTION, "current transaction is aborted, commands ignored until end of transaction block".into())
}

impl Session {
    pub(super) fn shards_in_tx(&self) -> bool {
        self.shard_tx.slots.iter().flatten().any(|s| s.in_tx)
    }

    /// Shards take part in the block, or did until a COMMIT was parsed or bound
    /// that carries their prepared transactions' decision: transaction control
    /// the shards cannot follow (PREPARE TRANSACTION would leave that decision
    /// unreadable and the shards rolled back) stays refused until it has run.
    pub(super) fn shards_take_part(&self) -> bool {
        !self.shard_tx.pending_2pc.is_empty() || self.shards_in_tx()
    }

    /// True when the statement text must be looked at by the router.
    pub(super) fn wants_router(&self, sql: &[u8]) -> bool {
        self.shared.engine.may_route(sql) || self.shards_take_part()
    }

    /// Waits until `db_default` has answered everything sent so far.
    pub(super) async fn barrier(&mut self) -> Result<(), End> {
        if self.db.server.is_none() {
            return Ok(());
        }
        if self.db.sent_since_sync && !self.db.server_skipping && !self.db.expect.is_empty() {
            // have the server send what it buffered for this unfinished batch
            put_message(&mut self.db.sout, b'H', |_| {});
        }
        while !self.db.expect.is_empty() {
            let server = self.db.server.as_mut().expect("held");
            if !self.db.sout.is_empty() {
                if super::write_all(&server.stream, &self.db.sout).await.is_err() {
                    return self.server_lost();
                }
                self.db.sout.clear();
            }
            self.drain_server(|s| s.db.expect.is_empty())?;
            if self.cout.len() >= 64 * 1024 {
                super::write_all(&self.client, &self.cout).await?;
                self.cout.clear();
            }
            if self.db.expect.is_empty() {
                break;
            }
            let server = self.db.server.as_mut().expect("held");
            let crate::backend::ServerConn { stream, rbuf, .. } = &mut **server;
            if super::read_more(stream, rbuf).await.is_err() {
                return self.server_lost();
            }
        }
        if !self.db.sout.is_empty() {
            let server = self.db.server.as_mut().expect("held");
            if super::write_all(&server.stream, &self.db.sout).await.is_err() {
                return self.server_lost();
            }
            self.db.sout.clear();
        }
        // a COMMIT earlier in the batch carried a two-phase decision: its shards commit
        // before anything after it reads them
        if !self.shard_tx.resolve_2pc.is_empty() {
            self.resolve_pending_2pc().await;
        }
        Ok(())
    }

    /// Tries a simple Query on the routed path; `None` = not ours, pass it on.
    pub(super) async fn routed_query(&mut self, sql: &[u8]) -> Result<Option<Flow>, End> {
        if !self.routed.suspended.is_empty() {
            // MOVE on a t_order portal read in parts (asyncpg's cursor.forward) moves over its kept rows
            if let Some((count, name)) = std::str::from_utf8(sql).ok().and_then(parse_move) {
                if self.routed.suspended.contains_key(name.as_bytes()) {
                    self.barrier().await?;
                    if self.block_failed() {
                        self.fail_simple(in_failed_block()).await?;
                        return Ok(Some(Flow::Continue));
                    }
                    let s = self.routed.suspended.get_mut(name.as_bytes()).expect("checked");
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
            self.fail_simple(ExecError::Proxy(sqlstate::FEATURE_NOT_SUPPORTED, NOT_UTF8.into())).await?;
            return Ok(Some(Flow::Continue));
        };
        if self.shards_take_part() && !matches!(tx_verb(text), TxVerb::Other) {
            // read by the lexer, whatever sqlparser makes of it: the shards' part ends here too
            // (or the statement is refused before anything of it runs)
            self.barrier().await?;
            return self.end_transaction(text).await;
        }
        // simple-protocol texts carry their values as literals: the statement's shape (its
        // literals in value positions taken out) is analysed once and cached; what has no
        // shape, or a shape the router refuses, is analysed from its own text each time
        let shaped = if self.shared.engine.migration.enabled { None } else { self.shared.engine.router.shaped_analysis(text) };
        let (analysis, shaped) = match shaped {
            Some((a, s)) => (a, Some(s)),
            None => (self.shared.engine.router.analysis_uncached(text), None),
        };
        match &*analysis {
            Analysis::Passthrough(StatementClass::Transaction) if self.shards_take_part() => {
                self.barrier().await?;
                self.end_transaction(text).await
            }
            Analysis::Passthrough(_) => Ok(None),
            Analysis::Refused(e) => {
                self.barrier().await?;
                // an error PostgreSQL raises only when the statement runs comes after what
                // its parse reports (a shard parses the text)
                let parsed = if e.raised_at_execution() && !self.block_failed() {
                    let stmt = RoutedStmt { sql: text.to_string(), types: Vec::new(), analysis: analysis.clone(), describe: OnceLock::new(), cached: None, param_oids: Vec::new() };
                    self.parse_error(&stmt).await
                } else {
                    None
                };
                let e = if self.block_failed() {
                    in_failed_block()
                } else if let Some(p) = parsed {
                    p
                } else {
                    metrics::counter!(crate::metrics::ROUTE_REFUSED_TOTAL, "sqlstate" => e.sqlstate()).increment(1);
                    ExecError::Proxy(e.sqlstate(), e.to_string())
                };
                self.fail_simple(e).await?;
                Ok(Some(Flow::Continue))
            }
            _ => {
                self.barrier().await?;
                let bound = shaped.map(|s| Bound::shaped(text, s)).unwrap_or_default();
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

    /// Plans and runs a routed statement; rows and tag go to the client buffer.
    pub(super) async fn run_routed(&mut self, analysis: &Analysis, sql: &str, bound: &Bound, simple: bool, visible: Option<usize>) -> Result<Result<(), ExecError>, End> {
        if self.block_failed() {
            return Ok(Err(in_failed_block()));
        }
        // a CancelRequest from now on is for this statement (also while it looks up
        // an order number, makes a month table or waits for a connection)
        self.cancel_epoch = self.registration.slot.epoch();
        let engine = self.shared.engine.clone();
        let params = bound.params();
        // the session's TimeZone, if the client set one: offset-free times are read in it
        // (a SET LOCAL TimeZone of the block wins: the shards read times in it too)
        let session_tz = match self.shard_tx.local_sets.iter().rev().find(|(k, _)| k == "timezone") {
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
        let hint = if engine.migration.enabled || self.in_tx_block() || self.shard_tx.batch_tx {
            None
        } else {
            analysis.lookup_hint(&params).filter(|p| p.param.is_none_or(|i| text_like(bound, i)))
        };
        if let Some(probe) = &hint {
            if let Some(found) = engine.lookups.hint(probe) {
                if let Some(Ok(plan)) = engine.plan_with(analysis, &params, zone, std::slice::from_ref(&found)).ok().and_then(|p| match p {
                    Plan::Routed(r) => Some(bound.splice(r)),
                    Plan::Passthrough(_) => None,
                }) {
                    let mark = self.cout.len();
                    let (r, rows) = self.execute_routed(&plan, sql, bound, simple, visible).await?;
                    // a cancel or timeout stands; another error may belong to the place: ask the lookup
                    let canceled = match &r {
                        Err(ExecError::Server(e)) => e.code == sqlstate::QUERY_CANCELED,
                        Err(ExecError::Proxy(code, _)) => *code == sqlstate::QUERY_CANCELED,
                        _ => false,
                    };
                    if rows || canceled {
                        count_plan(simple, bound);
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
        // a shape the router cannot plan where it can plan the text (a placeholder in a
        // merged HAVING, copies of one literal no longer matching in GROUP BY): the text
        // is parsed whole and planned from its own analysis
        let (plain, full);
        let reshape = bound.shape.is_some() && matches!(&planned, Err(e) if e.sqlstate() == sqlstate::FEATURE_NOT_SUPPORTED);
        let (analysis, bound, params) = if reshape {
            plain = Bound::default();
            full = engine.router.analysis_uncached(sql);
            planned = engine.plan_analysis(&full, &[], zone);
            (&*full, &plain, Vec::new())
        } else {
            (analysis, bound, params)
        };
        count_plan(simple, bound);
        if let Ok(Plan::Routed(r)) = &planned {
            // `order_no = …` and other unique-lookup values: their entries say where the rows are
            if r.kind != shardgate_router::RoutedKind::Insert && r.targets.len() > 1 {
                let mut probes = analysis.lookup_probes(&params);
                // a value bound with another declared type (int4, bpchar) may compare changed
                probes.retain(|p| p.param.is_none_or(|i| text_like(bound, i)));
                if !probes.is_empty() {
                    let found = crate::routed::lookup::resolve(&engine, &mut self.shard_tx.slots, &probes).await;
                    if found.iter().any(|f| f.at.is_some()) {
                        planned = engine.plan_with(analysis, &params, zone, &found);
                    }
                }
            }
        }
        let plan = match planned {
            Ok(Plan::Routed(r)) => match bound.splice(r) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            },
            Ok(Plan::Passthrough(_)) => return Ok(Err(ExecError::Proxy(sqlstate::INTERNAL_ERROR, "statement unexpectedly not routed".into()))),
            Err(e) => {
                metrics::counter!(crate::metrics::ROUTE_REFUSED_TOTAL, "sqlstate" => e.sqlstate()).increment(1);
                return Ok(Err(ExecError::Proxy(e.sqlstate(), e.to_string())));
            }
        };
        if let Some(l) = plan.lookup_rows.iter().find(|l| l.param.is_some_and(|i| !text_like(bound, i))) {
            return Ok(Err(ExecError::Proxy(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("{} must be bound as text or varchar (or left to the server to type): it is kept unique across shards (unique_lookups), and a value of another type is stored changed", l.column),
            )));
        }
        if plan.kind == shardgate_router::RoutedKind::Insert {
            let ms: Vec<_> = plan.targets.iter().flat_map(|t| t.months.iter().copied()).collect();
            if let Err(m) = months::within_window(&engine, &self.shared.config.sharding, &ms) {
                return Ok(Err(ExecError::Proxy(sqlstate::FEATURE_NOT_SUPPORTED, m)));
            }
            months::ensure(&engine, &ms).await;
        } else if months::has_gaps(&engine) {
            let ms: Vec<_> = plan.targets.iter().flat_map(|t| t.months.iter().copied()).collect();
            months::fill_gaps(&engine, &ms).await;
        }
        Ok(self.execute_routed(&plan, sql, bound, simple, visible).await?.0)
    }

    /// Runs a planned routed statement; rows and tag go to the client buffer.
    /// Also tells whether the answer had a row.
    pub(super) async fn execute_routed(&mut self, plan: &shardgate_router::Routed, sql: &str, bound: &Bound, simple: bool, visible: Option<usize>) -> Result<(Result<(), ExecError>, bool), End> {
        let engine = self.shared.engine.clone();
        if engine.migration.enabled {
            return Ok((self.run_migrating(plan, sql, bound, simple, visible).await?, true));
        }
        let mark = self.cout.len();
        let mut in_tx = self.in_tx_block();
        // (or one whose batch already ran statements on db_default, whose implicit transaction
        // ends at the Sync: the write commits with it)
        let batch_begins = !simple && !in_tx && (self.shard_tx.batch_tx || (plan.kind != shardgate_router::RoutedKind::Select && (self.cin.first() != Some(&b'S') || self.db.sent_since_sync)));
        if batch_begins {
            // a write in an extended batch that goes on after it: the batch is one implicit
            // transaction in PostgreSQL, so the shards hold theirs until its Sync
            self.shard_tx.batch_tx = true;
            in_tx = true;
        }
        let begin = match &self.shard_tx.begin_sql {
            Some(b) if !batch_begins => b.as_str(),
            _ => "BEGIN",
        };
        if self.routed.stream_next && plan.kind == shardgate_router::RoutedKind::Select {
            let job = super::streaming::StreamJob { plan: plan.clone(), bound: bound.clone(), visible, begin: begin.to_string() };
            self.start_stream(Vec::new(), job);
            return Ok((Ok(()), true));
        }
        // borrowed, not cloned, for every statement: the session's fields apart from the
        // client buffer and the shard slots stay untouched while it runs
        let desired = &self.desired;
        let sets = move |c: &mut crate::backend::ServerConn| super::param_sets(desired, c);
        let cancel = self.registration.slot.clone();
        let req = Request {
            routed: plan,
            bound,
            simple,
            visible,
            tx: in_tx.then_some(begin),
            param_sets: &sets,
            local_sets: &self.shard_tx.local_sets,
            down_targets: &[],
            serial: false,
            cancel: Some(&cancel),
            cancel_epoch: self.cancel_epoch,
        };
        let keep = self.capture_limit;
        let mut out = Out { buf: &mut self.cout, client: if keep.is_some() { None } else { Some(&self.client) }, keep, overflow: false, flushed: false, sink: None };
        let timeout = self.shared.config.server.query_timeout_ms;
        let r = {
            let run = std::pin::pin!(exec::execute(&engine, &mut self.shard_tx.slots, &req, &mut out));
            with_query_timeout(timeout, &cancel, run).await
        };
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

    /// The client's block has failed (db_default's status, current after a
    /// barrier): a statement other than the block's end answers 25P02 before
    /// anything else, as PostgreSQL answers it, whatever else the proxy would
    /// have said of it.
    pub(super) fn block_failed(&self) -> bool {
        self.db.server.is_some() && self.tx_status == b'E'
    }

    /// Refuses a simple Query with `code` and `m`, in order, before anything of it runs.
    pub(super) async fn refuse_simple(&mut self, code: &'static str, m: String) -> Result<(), End> {
        self.barrier().await?;
        self.fail_simple(ExecError::Proxy(code, m)).await
    }

    /// Refuses an extended-protocol message with `code` and `m` (the batch skips to Sync).
    pub(super) async fn refuse_extended(&mut self, code: &'static str, m: String) -> Result<(), End> {
        self.barrier().await?;
        if self.db.server_skipping {
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

    /// Reports `e` the way the client's protocol expects: with ReadyForQuery
    /// (simple), or in its place among db_default's replies, skipping to Sync
    /// (extended).
    pub(super) async fn fail(&mut self, simple: bool, e: ExecError) -> Result<(), End> {
        if simple {
            self.fail_simple(e).await
        } else {
            self.fail_extended(e).await
        }
    }

    // ------------------------------------------------------------ extended protocol

    /// An extended-protocol error: in order, and skipping to Sync like PostgreSQL.
    pub(super) async fn fail_extended(&mut self, e: ExecError) -> Result<(), End> {
        let frame = error_frame(&e);
        if self.db.server.is_some() {
            self.fail_on_server(frame);
        } else {
            self.cout.extend_from_slice(&frame);
        }
        self.discard_until_sync = true;
        Ok(())
    }

    /// After db_default reported the end of a transaction the proxy did not
    /// see (COMMIT inside a multi-statement string, a FATAL): shard blocks
    /// cannot be committed safely, so their connections are closed (the
    /// server rolls back).
    pub(super) fn drop_orphaned_shard_tx(&mut self) {
        // (an extended batch's implicit transaction is ended at its Sync, not here)
        if self.tx_status == b'I' && !self.shard_tx.batch_tx && self.shards_in_tx() {
            self.shard_tx.secondaries.clear();
            tracing::warn!("transaction ended on db_default without COMMIT/ROLLBACK through shardgate; rolling back shard work");
            for slot in self.shard_tx.slots.iter_mut() {
                if let Some(mut s) = slot.take() {
                    s.conn.broken = true;
                }
            }
        }
    }
}

/// `run` is pinned by the caller, in its own future: taken by value it would be
/// moved in here (a routed statement's future is kilobytes) and kept twice.
pub(super) async fn with_query_timeout<T>(timeout_ms: u64, cancel: &crate::cancel::CancelSlot, mut run: std::pin::Pin<&mut impl std::future::Future<Output = T>>) -> T {
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
    tokio::select! {
        biased;
        r = &mut run => r,
        () = fire => unreachable!("the cancel loop never completes"),
    }
}

/// The ErrorResponse frame for an execution error.
pub(super) fn error_frame(e: &ExecError) -> Bytes {
    crate::error::exec_frame(e)
}

/// Whether `buf` (whole protocol messages) holds a DataRow.
pub(super) fn has_data_row(mut buf: &[u8]) -> bool {
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
    use super::super::{extended::*, txn::*};

    #[test]
    pub(super) fn placeholders_are_counted_outside_quotes() {
        assert_eq!(max_placeholder("select * from t_order where merchant_id = $1 and id in ($3, $2)"), 3);
        assert_eq!(max_placeholder("select '$9' from t_order"), 0);
    }

    #[test]
    pub(super) fn move_statements() {
        assert_eq!(parse_move("MOVE FORWARD 10 \"__asyncpg_portal_2e__\""), Some((Some(10), "__asyncpg_portal_2e__".into())));
        assert_eq!(parse_move("move all in c1;"), Some((None, "c1".into())));
        assert_eq!(parse_move("MOVE NEXT FROM C1"), Some((Some(1), "c1".into())));
        assert_eq!(parse_move("MOVE BACKWARD 1 c1"), None);
        assert_eq!(parse_move("SELECT 1"), None);
    }

    #[test]
    pub(super) fn transaction_verbs() {
        assert!(matches!(tx_verb("COMMIT"), TxVerb::Commit));
        assert!(matches!(tx_verb("/* app */ COMMIT"), TxVerb::Commit));
        assert!(matches!(tx_verb("-- x\ncommit"), TxVerb::Commit));
        assert!(matches!(tx_verb("COMMIT PREPARED 'g'"), TxVerb::Unsupported(_)));
        assert!(matches!(tx_verb("select 1; commit"), TxVerb::Mixed));
        assert!(matches!(tx_verb("end;"), TxVerb::Commit));
        assert!(matches!(tx_verb("rollback"), TxVerb::Rollback));
        assert!(matches!(tx_verb("ROLLBACK TO SAVEPOINT a"), TxVerb::Unsupported(_)));
        assert!(matches!(tx_verb("savepoint a"), TxVerb::Unsupported(_)));
        assert!(matches!(tx_verb("begin"), TxVerb::Other));
    }
}

