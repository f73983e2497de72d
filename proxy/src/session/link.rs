//! The session's link to db_default: the pooled server connection held for a
//! transaction, the replies the proxy expects from it ([`Expect`]), the
//! server-side prepared statements it keeps, and what comes back from it.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use deadpool::managed::{PoolError, TimeoutType};
use shardgate_config::PoolMode;

use tracing::warn;

use crate::backend::conn::MAX_SERVER_MESSAGE;
use crate::error::ProxyError;
use crate::metrics as m;
use crate::protocol::backend::{self as msg, parse_error_fields, parse_parameter_status};
use crate::protocol::codec::{frame_total, FrameRef};
use super::*;
use crate::protocol::sqlstate;

/// The messages that bring a server's session parameters in line with what a
/// client asked for (set what it wants, reset what an earlier client changed
/// and this one did not ask for), recorded as applied. Values travel as bind
/// parameters of one fixed statement (`set_config`), never as SQL text; a
/// server that rejects them is not reused (see the swallow path). Empty when
/// nothing differs.
pub(super) fn param_sets(desired: &[(String, String)], server: &mut crate::backend::ServerConn) -> Bytes {
    let mut changes: Vec<(&str, Option<&str>)> = Vec::new();
    for name in TRACKED_PARAMS {
        let want = desired.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if server.applied.get(*name) == want {
            continue;
        }
        changes.push((name, want.map(String::as_str)));
        match want {
            Some(v) => server.applied.insert(name.to_string(), v.clone()),
            None => server.applied.remove(*name),
        };
    }
    crate::protocol::frontend::set_config_pipeline(&changes)
}

/// A server statement name that depends only on the statement's text and
/// parameter types, so every client preparing the same statement shares it.
pub(super) fn statement_name(query: &[u8], param_types: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut h);
    param_types.hash(&mut h);
    let mut h2 = std::collections::hash_map::DefaultHasher::new();
    param_types.hash(&mut h2);
    query.hash(&mut h2);
    query.len().hash(&mut h2);
    format!("sg_{:016x}{:016x}", h.finish(), h2.finish())
}

/// Canonical spelling of a parameter value for comparison.
pub(super) fn normalize_param(v: &str) -> String {
    match v.to_ascii_lowercase().as_str() {
        "utf8" | "utf-8" | "unicode" => "UTF8".into(),
        _ => v.to_string(),
    }
}

/// Closes the least recently used statement of `server` when it holds
/// `cap` already, ahead of a Parse in the same pipeline.
pub(super) fn make_room(server: &mut crate::backend::ServerConn, cap: usize, sout: &mut BytesMut, expect: &mut VecDeque<Expect>) {
    if let Some(old) = server.prepared.evict_for_one_more(cap) {
        crate::protocol::frontend::close_statement(sout, old.as_bytes());
        expect.push_back(Expect::CloseComplete { forward: false, evicted: Some(old.into()) });
    }
}

/// A Close of `name` ahead of its Parse on a connection the proxy believes
/// lacks it: a statement the proxy forgot while the server kept it (a
/// `DISCARD ALL` that failed in a block) would otherwise fail that Parse with
/// 42P05. Closing a name that does not exist is no error.
pub(super) fn close_first(name: &str, sout: &mut BytesMut, expect: &mut VecDeque<Expect>) {
    crate::protocol::frontend::close_statement(sout, name.as_bytes());
    expect.push_back(Expect::CloseComplete { forward: false, evicted: None });
}

impl Session {
    /// Returns the server to the pool when the client is at a clean point.
    pub(super) fn maybe_release(&mut self) {
        if !self.shard_tx.slots.is_empty() {
            self.drop_orphaned_shard_tx();
        }
        if self.db.server.is_none() || !self.at_clean_point() || self.pinned.is_some() || self.shared.config.pool.mode == PoolMode::Session {
            return;
        }
        debug_assert!(self.db.sout.is_empty());
        tracing::trace!("server returned to pool");
        self.db.server = None;
        self.registration.slot.set(None);
    }

    /// Makes sure a server is held; on failure queues the error for the client.
    pub(super) async fn ensure_server(&mut self) -> Result<bool, ProxyError> {
        if self.db.server.is_some() {
            return Ok(true);
        }
        let got = crate::backend::pool::checkout(&self.shared.pool, Some(&self.shared.meters.pool_wait)).await;
        let mut server = match got {
            Ok(s) => s,
            Err(PoolError::Timeout(TimeoutType::Wait)) => return Err(ProxyError::PoolTimeout),
            Err(PoolError::Backend(e)) => return Err(ProxyError::BackendUnavailable(e)),
            Err(PoolError::Timeout(_)) => return Err(ProxyError::BackendUnavailable(crate::backend::BackendError::Timeout)),
            // pool closed (shutdown) or misbuilt: the backend is unavailable to us, not a client protocol error
            Err(e) => return Err(ProxyError::BackendUnavailable(crate::backend::BackendError::Protocol(format!("pool: {e}")))),
        };
        let sets = param_sets(&self.desired, &mut server);
        if !sets.is_empty() {
            self.db.sout.extend_from_slice(&sets);
            self.db.expect.push_back(Expect::SwallowUntilReady);
        }
        self.registration.slot.set(Some(server.cancel_key.clone()));
        // (a fresh connection is idle: portals bound before are gone, but the message
        // that made this checkout may be a Bind of one)
        self.set_tx_status_at(b'I', self.db.client_seq.saturating_sub(1));
        self.db.server = Some(server);
        self.db.checkouts += 1;
        Ok(true)
    }

    /// Gets a server for a request, or answers the client with the error.
    pub(super) async fn server_for(&mut self, extended: bool) -> bool {
        match self.ensure_server().await {
            Ok(_) => true,
            Err(e) => {
                let c = crate::error::ClientError::from(&e);
                warn!(error = %e, sqlstate = c.code, "no server connection for request");
                metrics::counter!(m::ERRORS_TOTAL, "sqlstate" => c.code).increment(1);
                c.put(&mut self.cout);
                if extended {
                    self.discard_until_sync = true;
                } else {
                    msg::ready_for_query(&mut self.cout, b'I');
                }
                false
            }
        }
    }

    /// 42P05 for a Parse that reuses a name, in order with the server's replies.
    pub(super) fn fail_duplicate(&mut self, name: &[u8]) {
        let err = duplicate_statement(name).frame();
        if self.db.server.is_some() && !self.db.server_skipping {
            self.fail_on_server(err);
        } else if self.db.server.is_none() {
            self.cout.extend_from_slice(&err);
        }
        self.discard_until_sync = true;
    }

    /// Answers `err` in its place among db_default's replies: db_default is made
    /// to fail a Parse there (a syntax error, no side effects), so it skips to
    /// Sync and aborts an open transaction exactly as the client expects, and
    /// its error is replaced by `err`.
    pub(super) fn fail_on_server(&mut self, err: Bytes) {
        // (a Parse of the unnamed statement: the client's is gone from the server)
        self.db.unnamed_at = None;
        crate::protocol::codec::put_message(&mut self.db.sout, b'P', |b| b.extend_from_slice(b"\0!\0\0\0"));
        self.db.expect.push_back(Expect::ReplaceError(err));
        self.db.sent_since_sync = true;
    }

    /// Makes sure the held server has `stmt` prepared, injecting its Parse if not.
    pub(super) fn ensure_prepared(&mut self, name: &[u8]) {
        let cap = self.shared.config.pool.max_prepared_statements;
        let (Some(stmt), Some(server)) = (self.db.statements.get(name), self.db.server.as_mut()) else {
            return;
        };
        if server.prepared.contains(&stmt.server_name) {
            server.prepared.touch(&stmt.server_name);
            return;
        }
        if !self.db.server_skipping {
            make_room(server, cap, &mut self.db.sout, &mut self.db.expect);
            close_first(&stmt.server_name, &mut self.db.sout, &mut self.db.expect);
        }
        self.db.sout.extend_from_slice(&stmt.parse);
        if !self.db.server_skipping {
            server.prepared.insert(&stmt.server_name);
            self.db.expect.push_back(Expect::ParseComplete { forward: false, name: Some(stmt.server_name.clone()), client: None });
        }
    }

    /// Before a Bind or Describe of the unnamed statement: the held server must
    /// have this client's, never another client's left there. Sends its Parse
    /// again if the server has not seen it; false when the client has none
    /// (PostgreSQL answers 26000).
    pub(super) fn ensure_unnamed(&mut self) -> bool {
        if self.db.unnamed.is_none() {
            return false;
        }
        if self.db.server_skipping {
            // the server skips the Bind too
            return true;
        }
        let here = self.unnamed_here();
        // a Parse of it in an earlier batch not answered yet may still be skipped
        let last_parse = self.db.expect.iter().rposition(|e| matches!(e, Expect::ParseComplete { name: None, client: Some(_), .. }));
        let settled = last_parse.is_none_or(|i| !self.db.expect.iter().skip(i).any(|e| matches!(e, Expect::Ready { .. })));
        if here.is_some() && self.db.unnamed_at == here && settled {
            return true;
        }
        let parse = self.db.unnamed.clone().expect("checked above");
        self.db.sout.extend_from_slice(&parse);
        self.expect_reply(Expect::ParseComplete { forward: false, name: None, client: Some(Box::default()) });
        self.db.unnamed_at = here;
        true
    }

    /// The held connection's place for [`DbLink::unnamed_at`].
    pub(super) fn unnamed_here(&self) -> Option<(u64, u64)> {
        self.db.server.as_ref().map(|s| (self.db.checkouts, s.own_sends))
    }

    /// Expects a reply to a message just forwarded, unless the server skips it.
    pub(super) fn expect_reply(&mut self, e: Expect) {
        if !self.db.server_skipping {
            self.db.expect.push_back(e);
        }
    }

    /// DISCARD ALL / DEALLOCATE ALL drop server-side statements: forget ours.
    pub(super) fn forget_statements_if_discarded(&mut self, sql: &[u8]) {
        if shardgate_router::drops_all_statements(sql) {
            self.db.statements.clear();
            self.cache_hold.cache_write_stmts.clear();
            self.routed.routed_stmts.clear();
            self.routed.routed_portals.clear();
            if let Some(server) = self.db.server.as_mut() {
                server.prepared.clear();
            }
        }
    }

    /// Handles the whole server messages already read, in place (no copy of a
    /// message before it goes to the client buffer), until `stop` says so.
    pub(super) fn drain_server(&mut self, stop: impl Fn(&Self) -> bool) -> Result<(), End> {
        let Some(server) = self.db.server.as_mut() else {
            return Ok(());
        };
        let mut rbuf = std::mem::take(&mut server.rbuf);
        let mut used = 0;
        let mut res = Ok(());
        let mut bad = None;
        while !stop(self) {
            match frame_total(&rbuf[used..], MAX_SERVER_MESSAGE) {
                Ok(Some(total)) if rbuf.len() - used >= total => {
                    let f = FrameRef { tag: rbuf[used], raw: &rbuf[used..used + total] };
                    used += total;
                    res = self.on_server(f);
                    if res.is_err() {
                        break;
                    }
                }
                Ok(Some(total)) => {
                    // reserve at most what the (already bounded) message still needs
                    rbuf.advance(used);
                    used = 0;
                    rbuf.reserve(total - rbuf.len());
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        rbuf.advance(used);
        // on_server never swaps or drops the server connection
        if let Some(server) = self.db.server.as_mut() {
            server.rbuf = rbuf;
        }
        res?;
        if let Some(e) = bad {
            warn!(error = %e, "bad message from server");
            self.server_lost()?;
        }
        Ok(())
    }

    pub(super) fn on_server(&mut self, f: FrameRef<'_>) -> Result<(), End> {
        tracing::trace!(tag = %(f.tag as char), len = f.raw.len(), expect = ?self.db.expect.front(), "server message");
        let swallowing = matches!(self.db.expect.front(), Some(Expect::SwallowUntilReady));
        if swallowing && !matches!(f.tag, b'E' | b'Z' | b'S') {
            // the replies to the proxy's own parameter pipeline
            return Ok(());
        }
        match f.tag {
            b'1' => match self.db.expect.pop_front() {
                Some(Expect::ParseComplete { forward, .. }) => {
                    if forward {
                        self.cout.extend_from_slice(f.raw);
                    }
                }
                other => return self.desync("ParseComplete", other),
            },
            b'3' => match self.db.expect.pop_front() {
                Some(Expect::CloseComplete { forward, .. }) => {
                    if forward {
                        self.cout.extend_from_slice(f.raw);
                    }
                }
                other => return self.desync("CloseComplete", other),
            },
            b'E' => {
                let fields = parse_error_fields(f.body());
                let replacement = match self.db.expect.front() {
                    Some(Expect::ReplaceError(b)) => Some(b.clone()),
                    _ => None,
                };
                // the server skips to the next Sync: drop what those messages would have answered
                while let Some(e) = self.db.expect.front() {
                    match e {
                        Expect::Ready { .. } | Expect::SwallowUntilReady => break,
                        Expect::ParseComplete { name: Some(n), client, .. } => {
                            if let Some(server) = self.db.server.as_mut() {
                                server.prepared.remove(n);
                            }
                            if let Some(c) = client.clone() {
                                // the client's statement was never made
                                self.db.statements.remove(&c[..]);
                                self.cache_hold.cache_write_stmts.remove(&c[..]);
                            }
                            self.db.expect.pop_front();
                        }
                        Expect::ParseComplete { name: None, client: Some(_), forward } => {
                            // a Parse of the unnamed statement failed or was skipped: the server
                            // may hold anything there now. The client's own failed: it has none
                            // (unless the client has parsed it again since, in a later batch)
                            let again = self.db.expect.iter().skip(1).any(|e| matches!(e, Expect::ParseComplete { name: None, client: Some(_), forward: true }));
                            if *forward && !again {
                                self.db.unnamed = None;
                            }
                            self.db.unnamed_at = None;
                            self.db.expect.pop_front();
                        }
                        Expect::CloseComplete { evicted: Some(n), .. } => {
                            // the Close was skipped: the statement is still there
                            if let Some(server) = self.db.server.as_mut() {
                                server.prepared.insert(n);
                            }
                            self.db.expect.pop_front();
                        }
                        _ => {
                            self.db.expect.pop_front();
                        }
                    }
                }
                // no ReadyForQuery owed yet: the client has not sent this batch's Sync,
                // and the server will skip what the client sends until it does
                if !self.db.expect.iter().any(|e| matches!(e, Expect::Ready { .. } | Expect::SwallowUntilReady)) {
                    self.db.server_skipping = true;
                }
                if fields.severity == "FATAL" || fields.severity == "PANIC" {
                    if let Some(server) = self.db.server.as_mut() {
                        server.broken = true;
                    }
                }
                if swallowing {
                    // what is applied there is unknown now: never hand this connection on
                    warn!(sqlstate = %fields.code, "applying client parameters on server failed");
                    if let Some(server) = self.db.server.as_mut() {
                        server.broken = true;
                    }
                } else if let Some(b) = replacement {
                    self.cout.extend_from_slice(&b);
                } else {
                    self.cout.extend_from_slice(f.raw);
                }
            }
            b'Z' => {
                let status = f.body().first().copied().unwrap_or(b'I');
                if let Some(server) = self.db.server.as_mut() {
                    server.note_ready(status);
                }
                while matches!(self.db.expect.front(), Some(Expect::CopyEnd)) {
                    self.db.expect.pop_front();
                }
                self.db.copy_in = None;
                match self.db.expect.pop_front() {
                    // the proxy's own queries: the client may be ahead, its portals stay
                    Some(Expect::SwallowUntilReady) => self.set_tx_status_at(status, 0),
                    Some(Expect::Ready { seq, .. }) => {
                        if self.db.block_end_query == Some(seq) {
                            self.db.block_end_query = None;
                        }
                        self.db.pending_ready = self.db.pending_ready.saturating_sub(1);
                        self.set_tx_status_at(status, seq);
                        self.cache_on_ready(status);
                        if self.db.pending_ready == 0 {
                            self.query_deadline = None;
                        }
                        self.cout.extend_from_slice(f.raw);
                    }
                    other => return self.desync("ReadyForQuery", other),
                }
            }
            b'G' => {
                if matches!(self.db.expect.front(), Some(Expect::Execute { .. })) {
                    self.db.expect.pop_front();
                }
                self.enter_copy_in();
                self.cout.extend_from_slice(f.raw);
            }
            b'2' => {
                let forward = match self.db.expect.front() {
                    Some(Expect::BindComplete { forward }) => *forward,
                    _ => true,
                };
                if matches!(self.db.expect.front(), Some(Expect::BindComplete { .. })) {
                    self.db.expect.pop_front();
                }
                if forward {
                    self.cout.extend_from_slice(f.raw);
                }
            }
            b'T' | b'n' if matches!(self.db.expect.front(), Some(Expect::Describe)) => {
                self.db.expect.pop_front();
                self.cout.extend_from_slice(f.raw);
            }
            b'C' | b'I' | b's' if matches!(self.db.expect.front(), Some(Expect::Execute { .. })) => {
                let (ends_block, seq) = match self.db.expect.pop_front() {
                    Some(Expect::Execute { ends_block, seq }) => (ends_block, seq),
                    _ => (None, 0),
                };
                if f.tag == b'C' && f.body() == b"COMMIT\0" && !self.cache_hold.cache_pending.is_empty() {
                    self.cache_hold.commit_seen = true;
                }
                if let (b'C', Some(end)) = (f.tag, ends_block) {
                    // the block ended here, mid-batch: what follows in the batch runs after it
                    // (a failed block's statements no longer answer 25P02; routed ones do not
                    // join the ended block)
                    self.block_ended_mid_batch(end, f.body().strip_suffix(&[0]).unwrap_or(f.body()), seq);
                } else if f.tag == b'C' {
                    // a BEGIN executed in an extended batch opens the block now, not at the
                    // batch's ReadyForQuery: routed statements later in the same batch (pgjdbc
                    // sends BEGIN with the first statement) must join it on the shards
                    match f.body().strip_suffix(&[0]).unwrap_or(f.body()) {
                        b"BEGIN" | b"START TRANSACTION" if self.tx_status == b'I' => self.tx_status = b'T',
                        _ => {}
                    }
                }
                self.cout.extend_from_slice(f.raw);
            }
            b'S' => {
                if let (Some((k, v)), Some(server)) = (parse_parameter_status(f.body()), self.db.server.as_mut()) {
                    server.reported.insert(k, v);
                }
                if !swallowing {
                    self.cout.extend_from_slice(f.raw);
                }
            }
            _ => {
                if f.tag == b'C' && f.body() == b"COMMIT\0" && !self.cache_hold.cache_pending.is_empty() {
                    self.cache_hold.commit_seen = true;
                }
                if let (b'C', Some(seq), Some(Expect::Ready { sync: false, seq: at })) = (f.tag, self.db.block_end_query, self.db.expect.front()) {
                    if *at == seq && matches!(f.body(), b"COMMIT\0" | b"ROLLBACK\0" | b"PREPARE TRANSACTION\0") {
                        // the string's COMMIT/ROLLBACK ran: its block's portals are gone
                        self.db.block_end_query = None;
                        self.forget_tx_portals_before(seq);
                        self.routed.end_portals();
                    }
                }
                if !swallowing {
                    self.cout.extend_from_slice(f.raw);
                }
            }
        }
        Ok(())
    }

    /// CopyInResponse: the server now ignores Sync until CopyDone/CopyFail, so
    /// the Syncs the client pipelined after the COPY's Execute get no reply.
    /// The first pending ReadyForQuery belongs to the message that started
    /// the COPY: kept for a simple Query, dropped for an extended Sync.
    pub(super) fn enter_copy_in(&mut self) {
        let Some(first) = self.db.expect.iter().position(|e| matches!(e, Expect::Ready { .. })) else {
            return;
        };
        let extended = matches!(self.db.expect[first], Expect::Ready { sync: true, .. });
        let mut i = if extended { first } else { first + 1 };
        while i < self.db.expect.len() {
            match self.db.expect[i] {
                Expect::Ready { sync: true, .. } => {
                    self.db.expect.remove(i);
                    self.db.pending_ready = self.db.pending_ready.saturating_sub(1);
                }
                Expect::CopyEnd => {
                    // the client already ended the COPY; an extended COPY still owes its Sync
                    self.db.expect.remove(i);
                    let sync_after = self.db.expect.iter().skip(i).any(|e| matches!(e, Expect::Ready { sync: true, .. }));
                    if extended && !sync_after {
                        self.db.sent_since_sync = true;
                    }
                    return;
                }
                _ => i += 1,
            }
        }
        self.db.copy_in = Some(extended);
    }

    pub(super) fn desync(&mut self, got: &str, expected: Option<Expect>) -> Result<(), End> {
        warn!(got, ?expected, "server reply out of step with requests");
        if let Some(server) = self.db.server.as_mut() {
            server.broken = true;
        }
        Err(End::Fatal(sqlstate::PROTOCOL_VIOLATION, "protocol synchronization lost with server".into()))
    }

    /// The server connection died: discard it, tell the client, end the session.
    pub(super) fn server_lost(&mut self) -> Result<(), End> {
        if let Some(mut server) = self.db.server.take() {
            server.broken = true;
            let _ = server.detach();
        }
        self.registration.slot.set(None);
        warn!("server connection lost");
        Err(End::Fatal(crate::error::ClientError::from(&ProxyError::ServerLost).code, ProxyError::ServerLost.to_string()))
    }
}

/// PostgreSQL's 42P05 for a Parse that reuses a statement name.
pub(super) fn duplicate_statement(name: &[u8]) -> crate::error::ClientError {
    crate::error::ClientError::error(sqlstate::DUPLICATE_PREPARED_STATEMENT, format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(name)))
}
