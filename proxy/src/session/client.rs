//! Messages from the client: each frame is decided (admin, sharded, cached or
//! forwarded) and acted on; what the session notes about the statements it
//! forwards (transaction status, pinning, SET LOCAL marks, statement texts).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardgate_router::{SettingChange, session_effect, SessionEffect};

use tracing::debug;

use crate::metrics as m;
use crate::protocol::backend::{self as msg};
use crate::protocol::codec::Frame;
use crate::protocol::frontend::{Bind, Parse, Target};
use super::*;
use crate::protocol::sqlstate;

impl Session {
    /// What the client's prepared statements take in the proxy (see [`statement_weight`]).
    pub(super) fn statement_bytes(&self) -> usize {
        let plain: usize = self.db.statements.values().map(|s| s.parse.len()).sum::<usize>() + self.db.unnamed.as_ref().map_or(0, Bytes::len);
        let routed: usize = self.routed.routed_stmts.values().map(|r| shardgate_router::analysis_weight(r.sql.len())).sum();
        plain + routed
    }

    /// Records `db_default`'s transaction status, at a point where everything the
    /// client sent has been answered; a block's `SET LOCAL`s end with it.
    pub(super) fn set_tx_status(&mut self, status: u8) {
        self.set_tx_status_at(status, u64::MAX);
    }

    /// Records `db_default`'s transaction status as of the client message
    /// `seq`: portals bound before it end with an ended block, later ones stay.
    /// Idle means the block has ended however it ended (a simple COMMIT through
    /// the proxy, a ROLLBACK, an error): a two-phase decision it carried is final.
    pub(super) fn set_tx_status_at(&mut self, status: u8, seq: u64) {
        self.tx_status = status;
        if status == b'I' {
            self.shard_tx.local_sets.clear();
            self.shard_tx.local_marks.clear();
            self.forget_tx_portals_before(seq);
            if !self.shard_tx.pending_2pc.is_empty() {
                let pending = std::mem::take(&mut self.shard_tx.pending_2pc);
                self.shard_tx.resolve_2pc.extend(pending);
            }
        }
    }

    pub(super) fn forget_tx_portals_before(&mut self, seq: u64) {
        if !self.db.tx_portals.is_empty() {
            self.db.tx_portals.retain(|_, p| p.seq > seq);
        }
    }

    /// Notes what a statement sent on to `db_default` does to the session: a
    /// tracked parameter the shards must follow, or pinning. `Err` is a SET the
    /// shards cannot follow: the statement is refused with this message.
    pub(super) fn note_statement_text(&mut self, sql: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(sql).ok();
        let word = text.and_then(shardgate_router::first_word);
        if let Some(t) = text.filter(|_| word.is_some_and(|w| ["savepoint", "rollback", "abort", "release", "commit", "end"].iter().any(|k| w.eq_ignore_ascii_case(k)))) {
            self.note_block_step(t);
        }
        if word.is_some_and(|w| w.eq_ignore_ascii_case("set") || w.eq_ignore_ascii_case("reset")) {
            // shard connections get the client's session parameters too (see param_sets)
            match text.and_then(|t| shardgate_router::setting_change(t, TRACKED_PARAMS)) {
                Some(SettingChange::ResetAll) => self.desired.clear(),
                Some(SettingChange::Reset(name)) => self.desired.retain(|(k, _)| *k != name),
                Some(SettingChange::Set(name, v)) => {
                    self.desired.retain(|(k, _)| *k != name);
                    self.desired.push((name, normalize_param(&v)));
                }
                // recorded even before db_default reports the block (BEGIN and SET LOCAL in one
                // extended batch, or an implicit batch transaction); outside a transaction it
                // is dropped at the next ReadyForQuery, as PostgreSQL drops it
                Some(SettingChange::Local(name, v)) => {
                    self.shard_tx.local_sets.push((name, v.map(|v| normalize_param(&v))));
                }
                Some(SettingChange::Refused(m)) => return Err(m),
                None => {}
            }
        }
        self.note_pinning(sql);
        Ok(())
    }

    /// `DEALLOCATE name` of a statement the client prepared through the
    /// protocol: the server knows it under the proxy's name (and keeps it for
    /// other clients), so the proxy drops the client's name and answers as
    /// PostgreSQL does. Inside a failed block the server answers (25P02).
    pub(super) async fn deallocate_own(&mut self, sql: &[u8]) -> Result<Option<Flow>, End> {
        let Some(name) = std::str::from_utf8(sql).ok().and_then(shardgate_router::deallocated_name) else {
            return Ok(None);
        };
        let known = |s: &Self| s.db.statements.contains_key(name.as_bytes()) || s.routed.routed_stmts.contains_key(name.as_bytes());
        if !known(self) {
            return Ok(None);
        }
        // what the server has not answered yet decides: a failed block (25P02), a
        // batch that skips to its Sync (no answer at all), a Parse of this name
        // that failed
        self.barrier().await?;
        if !known(self) || self.tx_status == b'E' || self.db.server_skipping {
            return Ok(None);
        }
        self.db.statements.remove(name.as_bytes());
        self.cache_hold.cache_write_stmts.remove(name.as_bytes());
        self.routed.routed_stmts.remove(name.as_bytes());
        crate::protocol::codec::put_message(&mut self.cout, b'C', |o| crate::protocol::codec::put_cstr(o, b"DEALLOCATE"));
        let status = self.logical_status();
        msg::ready_for_query(&mut self.cout, status);
        Ok(Some(Flow::Continue))
    }

    /// Savepoints and block ends on `db_default` (no shard takes part; with
    /// shards they are handled, or refused, before this): `SET LOCAL`s made
    /// after a savepoint end with `ROLLBACK TO` it, and all of them end with
    /// the block, `COMMIT AND CHAIN` too (whose new block keeps the status).
    pub(super) fn note_block_step(&mut self, text: &str) {
        self.shard_tx.note_block_step(text);
    }

    /// What the portal an Execute names does to the block, if it ends it.
    fn block_end(&self, execute: &[u8]) -> Option<BlockEnd> {
        use shardgate_router::TxControl as T;
        let portal = crate::protocol::frontend::Reader::new(execute).cstr().ok()?;
        let text = &self.db.tx_portals.get(portal)?.text;
        match shardgate_router::transaction_control(text) {
            T::Commit | T::Rollback => Some(BlockEnd::Ends { chain: shardgate_router::and_chain(text) }),
            T::Unsupported("PREPARE TRANSACTION") => Some(BlockEnd::Prepared),
            T::Unsupported("ROLLBACK TO SAVEPOINT") => Some(BlockEnd::RolledBackTo),
            _ => None,
        }
    }

    /// Execute of a portal bound to a transaction-control statement: a COMMIT or
    /// ROLLBACK bound before the shards joined ends their part now. The unnamed
    /// one is bound again if the proxy's own queries on `db_default` (here or at
    /// an earlier message) dropped it there, where PostgreSQL keeps it. `Some`
    /// when the Execute was answered here.
    async fn execute_tx_portal(&mut self, execute: &[u8]) -> Result<Option<Flow>, End> {
        let portal = crate::protocol::frontend::Reader::new(execute).cstr().unwrap_or_default().to_vec();
        if !self.db.tx_portals.contains_key(&portal) {
            return Ok(None);
        }
        if self.db.expect.iter().any(|e| matches!(e, Expect::Execute { ends_block: Some(BlockEnd::RolledBackTo), .. })) {
            // a ROLLBACK TO still in flight may drop the portal: known once it has run
            self.barrier().await?;
        }
        let Some(p) = self.db.tx_portals.get(&portal).cloned() else { return Ok(None) };
        if self.cache_hold.cache_tx_wrote && shardgate_router::prepares_transaction(&p.text) {
            self.refuse_extended(sqlstate::FEATURE_NOT_SUPPORTED, NO_PREPARED_CACHE_WRITE.into()).await?;
            return Ok(Some(Flow::Continue));
        }
        if p.uncertain && (self.shards_take_part() || (portal.is_empty() && self.unnamed_here() != p.bound_at)) {
            let m = "a COMMIT or ROLLBACK bound before a ROLLBACK TO cannot be executed after it while orders take part (the ROLLBACK TO may have dropped its portal); bind it again after the ROLLBACK TO".to_string();
            self.refuse_extended(sqlstate::FEATURE_NOT_SUPPORTED, m).await?;
            return Ok(Some(Flow::Continue));
        }
        if self.shards_take_part() {
            if let Some(flow) = self.extended_tx_end(p.text.as_bytes()).await? {
                return Ok(Some(flow));
            }
        }
        if portal.is_empty() {
            self.rebind_unnamed_tx_portal();
        }
        Ok(None)
    }

    /// The unnamed portal bound to a transaction-control statement is bound
    /// again if the proxy's own queries on `db_default` dropped it there since
    /// the client bound it (PostgreSQL keeps it), unless it may be gone anyway.
    pub(super) fn rebind_unnamed_tx_portal(&mut self) {
        let here = self.unnamed_here();
        let Some(p) = self.db.tx_portals.get_mut(b"".as_slice()) else { return };
        if here == p.bound_at || here.is_none() || p.uncertain || self.db.server_skipping {
            return;
        }
        p.bound_at = here;
        let text = p.text.clone();
        crate::backend::query::put_parse(&mut self.db.sout, b"", &text, &[]);
        crate::backend::query::put_bind(&mut self.db.sout, b"", &[], &[], &[]);
        self.expect_reply(Expect::ParseComplete { forward: false, name: None, client: None });
        self.expect_reply(Expect::BindComplete { forward: false });
        // the unnamed statement is now this one, not the client's
        self.db.unnamed_at = None;
    }

    /// A ROLLBACK TO (client message `seq`) drops the portals bound after its
    /// savepoint, which the proxy cannot tell from those bound before: the ones
    /// bound before `seq` are uncertain now (see `execute_tx_portal`). So are
    /// they before a simple Query that may end their block.
    pub(super) fn after_rollback_to(&mut self, seq: u64) {
        for p in self.db.tx_portals.values_mut() {
            p.uncertain |= p.seq < seq;
        }
    }

    /// A block-ending portal completed with `tag` in the middle of a batch: the
    /// session follows db_default now, not at the batch's ReadyForQuery (which
    /// still has the last word). A tag other than the statement's (the server ran
    /// an older portal of that name) changes nothing.
    pub(super) fn block_ended_mid_batch(&mut self, end: BlockEnd, tag: &[u8], seq: u64) {
        let ended = tag == b"COMMIT" || tag == b"ROLLBACK";
        let status = match end {
            BlockEnd::Ends { chain } if ended => if chain { b'T' } else { b'I' },
            BlockEnd::Prepared if ended || tag == b"PREPARE TRANSACTION" => b'I',
            BlockEnd::RolledBackTo if tag == b"ROLLBACK" => b'T',
            _ => return,
        };
        self.tx_status = status;
        let ends_tx = matches!(end, BlockEnd::Ends { .. });
        if ends_tx || status == b'I' {
            self.shard_tx.local_sets.clear();
            self.shard_tx.local_marks.clear();
            // the block's portals are gone on db_default; so are the proxy's routed ones
            self.forget_tx_portals_before(seq);
            self.routed.end_portals();
        } else {
            self.after_rollback_to(seq);
        }
        // a two-phase decision the block's COMMIT carried is durable now (or rolled back
        // with it); never at a ROLLBACK TO, before the COMMIT has run
        if ends_tx && !self.shard_tx.pending_2pc.is_empty() {
            let pending = std::mem::take(&mut self.shard_tx.pending_2pc);
            self.shard_tx.resolve_2pc.extend(pending);
        }
    }

    /// Messages that leave a streaming portal running: its own Execute, Sync and Flush.
    pub(super) fn stream_goes_on(&self, f: &Frame) -> bool {
        match f.tag {
            b'S' | b'H' => true,
            b'E' => {
                let mut r = crate::protocol::frontend::Reader::new(f.body());
                r.cstr().is_ok_and(|p| self.routed.stream.as_ref().is_some_and(|s| s.portal == p))
            }
            _ => false,
        }
    }

    pub(super) fn note_pinning(&mut self, sql: &[u8]) {
        if self.pinned.is_some() || !shardgate_router::may_pin(sql) {
            return;
        }
        let text = String::from_utf8_lossy(sql);
        if let SessionEffect::Pins(reason) = session_effect(&text) {
            debug!(reason, "client pinned to its server connection");
            metrics::counter!(m::PINNED_TOTAL, "reason" => reason).increment(1);
            self.pinned = Some(reason);
        }
    }

    /// Remembers the client's BEGIN text so shards joining the block start it the same way.
    pub(super) fn note_begin(&mut self, sql: &[u8]) {
        // cheap first: the first word must be BEGIN or START (reading past comments)
        let head = sql.iter().find(|b| !b.is_ascii_whitespace()).map(u8::to_ascii_lowercase);
        if !matches!(head, Some(b'b' | b's' | b'/' | b'-')) {
            return;
        }
        let text = String::from_utf8_lossy(sql);
        if !shardgate_router::first_word(&text).is_some_and(|w| w.eq_ignore_ascii_case("begin") || w.eq_ignore_ascii_case("start")) {
            return;
        }
        if shardgate_router::transaction_control(&text) == shardgate_router::TxControl::Begin {
            // the shards join with the BEGIN as the router reads it, never the client's text
            self.shard_tx.begin_sql = Some(shardgate_router::begin_statement(&text));
        }
    }

    pub(super) fn arm_query_timeout(&mut self) {
        let t = self.shared.config.server.query_timeout_ms;
        if t > 0 && self.query_deadline.is_none() {
            self.query_deadline = Some(Instant::now() + Duration::from_millis(t));
        }
    }

    pub(super) async fn on_client(&mut self, f: Frame) -> Result<Flow, End> {
        self.db.client_seq += 1;
        tracing::trace!(tag = %(f.tag as char), len = f.raw.len(), server = self.db.server.is_some(), "client message");
        if self.discard_until_sync && f.tag != b'S' && f.tag != b'X' {
            return Ok(Flow::Continue);
        }
        if self.routed.stream.is_some() && !self.stream_goes_on(&f) {
            // another message needs the shard connections: the portal's answer is read now
            let closes = f.tag == b'C' && Target::parse(f.body()).is_ok_and(|t| t.kind == b'P' && self.routed.stream.as_ref().is_some_and(|s| s.portal == t.name));
            let text = match f.tag {
                b'Q' => f.body().strip_suffix(&[0]),
                b'P' => {
                    let mut r = crate::protocol::frontend::Reader::new(f.body());
                    r.cstr().ok().and_then(|_| r.cstr().ok())
                }
                _ => None,
            };
            let control = text.and_then(|t| std::str::from_utf8(t).ok()).map(shardgate_router::transaction_control);
            if f.tag == b'X' || control == Some(shardgate_router::TxControl::Rollback) {
                // the block rolls back anyway: its shard part goes with the closed connections
                self.abandon_stream().await;
            } else if let Err(e) = self.settle_stream(!closes && control != Some(shardgate_router::TxControl::Commit)).await {
                // the statement failed on its shard: the block is aborted, this message skipped
                self.barrier().await?;
                self.fail(f.tag == b'Q', e).await?;
                return Ok(Flow::Continue);
            }
        }
        match f.tag {
            b'Q' => {
                if self.db.sent_since_sync && self.db.server.is_some() {
                    // a Query inside an extended batch not synced yet: PostgreSQL ignores it
                    // if the batch has failed (it skips everything up to the Sync)
                    self.barrier().await?;
                    if self.db.server_skipping {
                        return Ok(Flow::Continue);
                    }
                }
                let sql = f.body().strip_suffix(&[0]).unwrap_or(f.body());
                // a simple Query drops the unnamed statement and portal (PostgreSQL's exec_simple_query)
                self.db.unnamed = None;
                self.db.tx_portals.remove(b"".as_slice());
                self.routed.routed_stmts.remove(&b""[..]);
                self.shared.meters.queries_simple.increment(1);
                if self.admin && self.admin_command(sql).await? {
                    return Ok(Flow::Continue);
                }
                if !self.admin && self.shared.engine.router.names_control_table(sql) {
                    self.refuse_simple(sqlstate::INSUFFICIENT_PRIVILEGE, CONTROL_TABLES.into()).await?;
                    return Ok(Flow::Continue);
                }
                if shardgate_router::names_proxy_statement(sql) {
                    self.refuse_simple(sqlstate::INSUFFICIENT_PRIVILEGE, PROXY_STATEMENTS.into()).await?;
                    return Ok(Flow::Continue);
                }
                if let Some(flow) = self.routed_query(sql).await? {
                    return Ok(flow);
                }
                if let Some(flow) = self.cached_query(sql).await? {
                    return Ok(flow);
                }
                if let Some(flow) = self.deallocate_own(sql).await? {
                    return Ok(flow);
                }
                if self.cache_hold.cache_tx_wrote && std::str::from_utf8(sql).is_ok_and(shardgate_router::prepares_transaction) {
                    self.refuse_simple(sqlstate::FEATURE_NOT_SUPPORTED, NO_PREPARED_CACHE_WRITE.into()).await?;
                    return Ok(Flow::Continue);
                }
                self.note_begin(sql);
                if let Err(m) = self.note_statement_text(sql) {
                    self.refuse_simple(sqlstate::FEATURE_NOT_SUPPORTED, m).await?;
                    return Ok(Flow::Continue);
                }
                if !self.server_for(false).await {
                    return Ok(Flow::Continue);
                }
                self.forget_statements_if_discarded(sql);
                if self.db.tx_portals.len() + self.routed.routed_portals.len() > 0 {
                    if let Ok(steps) = std::str::from_utf8(sql).map(shardgate_router::block_steps) {
                        // a block ended by this string has none of its portals left, even where
                        // the status stays T (AND CHAIN, a BEGIN after it), so no idle status
                        // forgets them; but the string may fail before its end runs (inside a
                        // savepoint, the block goes on): uncertain now, forgotten at the end's
                        // own CommandComplete (see `Session::on_server`)
                        if steps.ends || steps.rolls_back_to {
                            self.after_rollback_to(self.db.client_seq);
                        }
                        if steps.ends && !steps.rolls_back_to {
                            self.db.block_end_query = Some(self.db.client_seq);
                        }
                    }
                }
                self.db.sout.extend_from_slice(&f.raw);
                self.db.expect.push_back(Expect::Ready { sync: false, seq: self.db.client_seq });
                self.db.pending_ready += 1;
                self.arm_query_timeout();
            }
            b'P' => {
                let p = Parse::parse(f.body()).map_err(|e| End::Fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
                if p.name.is_empty() {
                    // a Parse of the unnamed statement drops the one before it, even when it
                    // fails (PostgreSQL's drop_unnamed_stmt)
                    self.routed.routed_stmts.remove(p.name);
                    self.db.unnamed = None;
                }
                if !self.admin && self.shared.engine.router.names_control_table(p.query) {
                    self.refuse_extended(sqlstate::INSUFFICIENT_PRIVILEGE, CONTROL_TABLES.into()).await?;
                    return Ok(Flow::Continue);
                }
                if shardgate_router::names_proxy_statement(p.query) {
                    self.refuse_extended(sqlstate::INSUFFICIENT_PRIVILEGE, PROXY_STATEMENTS.into()).await?;
                    return Ok(Flow::Continue);
                }
                let cap = self.shared.config.server.max_client_statements;
                if !p.name.is_empty()
                    && !self.db.statements.contains_key(p.name)
                    && !self.routed.routed_stmts.contains_key(p.name)
                    && self.db.statements.len() + self.routed.routed_stmts.len() >= cap
                {
                    let m = format!("too many prepared statements on this connection (server.max_client_statements = {cap}); close some with Close or DEALLOCATE");
                    self.refuse_extended(sqlstate::CONFIGURATION_LIMIT_EXCEEDED, m).await?;
                    return Ok(Flow::Continue);
                }
                let bytes_cap = self.shared.config.server.max_client_statement_bytes;
                if !p.name.is_empty() && self.statement_bytes() + shardgate_router::analysis_weight(p.query.len()) > bytes_cap {
                    let m = format!(
                        "the prepared statements on this connection would take more than server.max_client_statement_bytes = {bytes_cap} bytes; close some with Close or DEALLOCATE"
                    );
                    self.refuse_extended(sqlstate::CONFIGURATION_LIMIT_EXCEEDED, m).await?;
                    return Ok(Flow::Continue);
                }
                if let Some(flow) = self.routed_parse(p.name, p.query, p.param_types).await? {
                    return Ok(flow);
                }
                if let Some(flow) = self.cached_parse(p.name, p.query, p.param_types).await? {
                    return Ok(flow);
                }
                if !p.name.is_empty() && self.routed.routed_stmts.contains_key(p.name) {
                    self.fail_duplicate(p.name);
                    return Ok(Flow::Continue);
                }
                self.note_begin(p.query);
                if let Err(m) = self.note_statement_text(p.query) {
                    self.refuse_extended(sqlstate::FEATURE_NOT_SUPPORTED, m).await?;
                    return Ok(Flow::Continue);
                }
                if !self.server_for(true).await {
                    return Ok(Flow::Continue);
                }
                if self.pinned.is_none() && shardgate_router::drops_all_statements(p.query) {
                    // runs at some Execute, or never: the proxy cannot tell when this
                    // connection's statements go, so it is this client's alone from now
                    // on and closed when the client leaves
                    metrics::counter!(m::PINNED_TOTAL, "reason" => "DISCARD ALL (extended)").increment(1);
                    self.pinned = Some("DISCARD ALL or DEALLOCATE ALL in the extended protocol");
                }
                if p.name.is_empty() {
                    self.db.sout.extend_from_slice(&f.raw);
                    if !self.db.server_skipping {
                        // (a copy: a slice would keep the client's whole read buffer)
                        self.db.unnamed = Some(Bytes::copy_from_slice(&f.raw));
                        self.db.unnamed_tx = is_tx_control(p.query);
                        self.db.unnamed_at = self.unnamed_here();
                    }
                    self.expect_reply(Expect::ParseComplete { forward: true, name: None, client: Some(Box::default()) });
                } else if self.db.statements.contains_key(p.name) {
                    // PostgreSQL: 42P05, the existing statement stays. The server
                    // never saw the client's name, so have it fail a Parse in the
                    // same position (a syntax error, no side effects) and answer
                    // with the right error instead.
                    if !self.db.server_skipping {
                        self.fail_on_server(duplicate_statement(p.name).frame());
                    }
                } else {
                    let server_name: Arc<str> = statement_name(p.query, p.param_types).into();
                    let mut parse = BytesMut::new();
                    p.write_renamed(&mut parse, server_name.as_bytes());
                    let parse = parse.freeze();
                    let server = self.db.server.as_mut().expect("server_for succeeded");
                    if self.db.server_skipping {
                        // the server skips this Parse: nothing is created, nothing is answered
                        self.db.sout.extend_from_slice(&parse);
                    } else {
                        if !server.prepared.contains(&server_name) {
                            make_room(server, self.shared.config.pool.max_prepared_statements, &mut self.db.sout, &mut self.db.expect);
                        }
                        // re-prepared in place so the reply stays in order (and a statement
                        // the proxy forgot, but the server kept, does not fail the Parse)
                        super::link::close_first(&server_name, &mut self.db.sout, &mut self.db.expect);
                        self.db.sout.extend_from_slice(&parse);
                        server.prepared.insert(&server_name);
                        self.db.expect.push_back(Expect::ParseComplete { forward: true, name: Some(server_name.clone()), client: Some(p.name.into()) });
                    }
                    // (a Parse the server skips creates nothing, as in PostgreSQL)
                    if !self.db.server_skipping {
                        let tx_control = is_tx_control(p.query);
                        self.db.statements.insert(p.name.to_vec(), Statement { server_name, parse, tx_control });
                    }
                }
                self.db.sent_since_sync = true;
            }
            b'B' => {
                let b = Bind::parse(f.body()).map_err(|e| End::Fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
                self.shared.meters.queries_extended.increment(1);
                if b.portal.is_empty() {
                    // a Bind of the unnamed portal replaces it, whatever it binds
                    self.db.tx_portals.remove(b.portal);
                } else if self.db.tx_portals.contains_key(b.portal) {
                    // db_default may hold a portal of that name: PostgreSQL refuses the Bind, also
                    // of a statement the proxy routes (whose portal would hide the COMMIT's).
                    // Known once what was sent before has been answered (a Sync or a block's end
                    // pipelined ahead drops the portal)
                    self.barrier().await?;
                    if let Some(p) = self.db.tx_portals.get(b.portal).filter(|_| !self.db.server_skipping) {
                        let (code, m) = if p.uncertain {
                            (sqlstate::FEATURE_NOT_SUPPORTED, format!("portal \"{}\" may still hold a COMMIT or ROLLBACK bound before a ROLLBACK TO; bind under another portal name", String::from_utf8_lossy(b.portal)))
                        } else {
                            (sqlstate::DUPLICATE_CURSOR, format!("cursor \"{}\" already exists", String::from_utf8_lossy(b.portal)))
                        };
                        self.refuse_extended(code, m).await?;
                        return Ok(Flow::Continue);
                    }
                }
                if !self.routed.routed_stmts.is_empty() || !self.routed.routed_portals.is_empty() {
                    if let Some(flow) = self.routed_bind(f.body()).await? {
                        return Ok(flow);
                    }
                }
                // a statement prepared earlier may be COMMIT/ROLLBACK (pgjdbc keeps them
                // prepared; the unnamed one is kept across transactions too): bound to the
                // unnamed portal, the shards' part ends with it, as at a Parse (before the
                // portal exists: the proxy's own queries on db_default would drop it); and
                // its portal is remembered, for an Execute after shards have joined
                let tx = if b.statement.is_empty() { self.db.unnamed_tx && self.db.unnamed.is_some() } else { self.db.statements.get(b.statement).is_some_and(|s| s.tx_control) };
                let parse = if !tx {
                    None
                } else if b.statement.is_empty() {
                    self.db.unnamed.clone()
                } else {
                    self.db.statements.get(b.statement).map(|s| s.parse.clone())
                };
                let parsed = parse.as_ref().and_then(|p| Parse::parse(p.get(5..).unwrap_or_default()).ok());
                let text = parsed.as_ref().and_then(|p| std::str::from_utf8(p.query).ok().map(str::to_string));
                match text {
                    Some(t) => {
                        // (a named portal waits for its Execute: the Bind may still fail, 42P03
                        // for a name in use, after the shards had committed)
                        // (nor a Bind PostgreSQL refuses: as many values as the Parse declared
                        // types, COMMIT has no $n; otherwise the Execute decides, after the Bind)
                        let declared = parsed.as_ref().and_then(|p| p.param_types.get(..2).map(|n| i16::from_be_bytes([n[0], n[1]]))).unwrap_or(-1);
                        let fits = super::extended::parse_bind(&mut crate::protocol::frontend::Reader::new(b.rest), &[]).is_ok_and(|v| i16::try_from(v.values.len()) == Ok(declared));
                        if self.shards_take_part() && b.portal.is_empty() && fits {
                            if let Some(flow) = self.extended_tx_end(t.as_bytes()).await? {
                                return Ok(flow);
                            }
                        }
                        if !self.db.server_skipping {
                            let p = super::parts::TxPortal { text: t, seq: self.db.client_seq, bound_at: None, uncertain: false };
                            self.db.tx_portals.insert(b.portal.to_vec(), p);
                        }
                    }
                    None if !self.db.tx_portals.is_empty() => {
                        self.db.tx_portals.remove(b.portal);
                    }
                    None => {}
                }
                if !self.server_for(true).await {
                    return Ok(Flow::Continue);
                }
                if b.portal.is_empty() {
                    let here = self.unnamed_here();
                    if let Some(p) = self.db.tx_portals.get_mut(b"".as_slice()).filter(|p| p.seq == self.db.client_seq) {
                        p.bound_at = here;
                    }
                }
                if !self.cache_hold.cache_write_stmts.is_empty() {
                    self.cached_bind_write(b.statement, b.rest);
                }
                match self.db.statements.get(b.statement).map(|s| s.server_name.clone()) {
                    Some(server_name) => {
                        self.ensure_prepared(b.statement);
                        b.write_renamed(&mut self.db.sout, server_name.as_bytes());
                    }
                    None if b.statement.is_empty() && self.ensure_unnamed() => self.db.sout.extend_from_slice(&f.raw),
                    // (a session pinned to its server may bind what SQL PREPARE made there)
                    None if !b.statement.is_empty() && self.pinned.is_some() && !proxy_name(b.statement) => self.db.sout.extend_from_slice(&f.raw),
                    // never a statement the client did not make: another client's unnamed one
                    // left on this connection, or one of the proxy's own
                    None => {
                        self.refuse_extended(sqlstate::INVALID_SQL_STATEMENT_NAME, no_statement(b.statement)).await?;
                        return Ok(Flow::Continue);
                    }
                }
                self.expect_reply(Expect::BindComplete { forward: true });
                self.db.sent_since_sync = true;
            }
            b'D' | b'C' => {
                let t = Target::parse(f.body()).map_err(|e| End::Fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
                if f.tag == b'C' && t.kind == b'P' {
                    self.db.tx_portals.remove(t.name);
                }
                if f.tag == b'D' && t.kind == b'P' && t.name.is_empty() && self.db.tx_portals.contains_key(t.name) && self.db.server.is_some() {
                    self.rebind_unnamed_tx_portal();
                }
                if !self.routed.routed_stmts.is_empty() || !self.routed.routed_portals.is_empty() {
                    let handled = if f.tag == b'D' { self.routed_describe(&t).await? } else { self.routed_close(&t).await? };
                    if let Some(flow) = handled {
                        return Ok(flow);
                    }
                }
                if !self.server_for(true).await {
                    return Ok(Flow::Continue);
                }
                let known = t.kind == b'S' && !t.name.is_empty() && self.db.statements.contains_key(t.name);
                // only the client's own statements (a pinned session's also what SQL PREPARE made)
                let foreign = t.kind == b'S' && !known && !t.name.is_empty() && (self.pinned.is_none() || proxy_name(t.name));
                if t.kind == b'S' && t.name.is_empty() {
                    if f.tag == b'C' {
                        self.db.unnamed = None;
                    } else if !self.ensure_unnamed() {
                        self.refuse_extended(sqlstate::INVALID_SQL_STATEMENT_NAME, no_statement(t.name)).await?;
                        return Ok(Flow::Continue);
                    }
                } else if foreign && f.tag == b'D' {
                    self.refuse_extended(sqlstate::INVALID_SQL_STATEMENT_NAME, no_statement(t.name)).await?;
                    return Ok(Flow::Continue);
                }
                if f.tag == b'D' && known {
                    let server_name = self.db.statements.get(t.name).map(|s| s.server_name.clone()).expect("known");
                    self.ensure_prepared(t.name);
                    t.write_renamed(&mut self.db.sout, b'D', server_name.as_bytes());
                } else if f.tag == b'C' && known {
                    // the server keeps its copy for other clients; close a name that does not exist
                    self.db.statements.remove(t.name);
                    self.cache_hold.cache_write_stmts.remove(t.name);
                    t.write_renamed(&mut self.db.sout, b'C', CLOSED_STATEMENT);
                } else if f.tag == b'C' && foreign {
                    // not the client's: nothing of another client's (or the proxy's) is closed,
                    // and PostgreSQL answers CloseComplete for a name that does not exist
                    t.write_renamed(&mut self.db.sout, b'C', CLOSED_STATEMENT);
                } else {
                    self.db.sout.extend_from_slice(&f.raw);
                }
                if f.tag == b'C' {
                    self.expect_reply(Expect::CloseComplete { forward: true, evicted: None });
                } else {
                    self.expect_reply(Expect::Describe);
                }
                self.db.sent_since_sync = true;
            }
            b'E' | b'H' => {
                if f.tag == b'E' && !self.routed.routed_portals.is_empty() {
                    if let Some(flow) = self.routed_execute(f.body()).await? {
                        return Ok(flow);
                    }
                }
                if f.tag == b'E' && !self.db.tx_portals.is_empty() {
                    if let Some(flow) = self.execute_tx_portal(f.body()).await? {
                        return Ok(flow);
                    }
                }
                if f.tag == b'H' && self.db.server.is_none() {
                    // Flush with nothing in flight: answers the proxy made are flushed anyway
                    return Ok(Flow::Continue);
                }
                if !self.server_for(true).await {
                    return Ok(Flow::Continue);
                }
                self.db.sout.extend_from_slice(&f.raw);
                self.db.sent_since_sync = true;
                if f.tag == b'E' {
                    let ends_block = if self.db.tx_portals.is_empty() { None } else { self.block_end(f.body()) };
                    self.expect_reply(Expect::Execute { ends_block, seq: self.db.client_seq });
                    self.arm_query_timeout();
                }
            }
            b'S' => {
                if self.shard_tx.batch_tx {
                    self.end_batch_tx().await?;
                }
                if self.db.server.is_none() {
                    self.routed.end_portals();
                }
                if self.discard_until_sync && self.db.server.is_none() {
                    self.discard_until_sync = false;
                    msg::ready_for_query(&mut self.cout, b'I');
                } else if self.db.server.is_none() {
                    msg::ready_for_query(&mut self.cout, b'I');
                } else if self.db.copy_in.is_some() {
                    // the server ignores Sync in COPY FROM STDIN mode; no reply comes
                    self.db.sout.extend_from_slice(&f.raw);
                } else {
                    if !self.in_tx_block() {
                        // portals end with their (implicit) transaction, as in PostgreSQL: a
                        // later Execute of one is answered 34000 by db_default, not run again
                        self.routed.end_portals();
                    }
                    self.discard_until_sync = false;
                    self.db.sout.extend_from_slice(&f.raw);
                    self.db.expect.push_back(Expect::Ready { sync: true, seq: self.db.client_seq });
                    self.db.pending_ready += 1;
                    self.db.sent_since_sync = false;
                    self.db.server_skipping = false;
                }
            }
            b'F' => {
                if !self.server_for(false).await {
                    return Ok(Flow::Continue);
                }
                self.db.sout.extend_from_slice(&f.raw);
                self.db.expect.push_back(Expect::Ready { sync: false, seq: self.db.client_seq });
                self.db.pending_ready += 1;
            }
            b'd' | b'c' | b'f' => {
                // COPY data goes to the server running the COPY; outside COPY it is ignored, as PostgreSQL does
                if self.db.server.is_some() {
                    self.db.sout.extend_from_slice(&f.raw);
                    if f.tag != b'd' {
                        match self.db.copy_in.take() {
                            Some(extended) => self.db.sent_since_sync |= extended,
                            None => self.db.expect.push_back(Expect::CopyEnd),
                        }
                    }
                }
            }
            b'X' => return Ok(Flow::Close),
            b'p' => return Err(End::Fatal(sqlstate::PROTOCOL_VIOLATION, "unexpected password message".into())),
            t => {
                let shown = if t.is_ascii_graphic() { format!("\"{}\"", t as char) } else { format!("0x{t:02x}") };
                return Err(End::Fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid frontend message type {shown}")));
            }
        }
        Ok(Flow::Continue)
    }
}

/// PostgreSQL's message for a statement the client has not prepared.
fn no_statement(name: &[u8]) -> String {
    if name.is_empty() {
        "unnamed prepared statement does not exist".into()
    } else {
        format!("prepared statement \"{}\" does not exist", String::from_utf8_lossy(name))
    }
}

/// A name of the proxy's own server-side statements (`sg_…`), never a client's.
fn proxy_name(name: &[u8]) -> bool {
    shardgate_router::PROXY_STATEMENT_PREFIXES.iter().any(|p| name.starts_with(p.as_bytes()))
}

/// Whether a statement's text is transaction control the shards must follow
/// (COMMIT, ROLLBACK, savepoints, PREPARE TRANSACTION, …), as the lexer reads it.
fn is_tx_control(query: &[u8]) -> bool {
    // (a Parse holds one statement: its first word decides, cheaply, before the lexer)
    const WORDS: [&str; 8] = ["commit", "end", "rollback", "abort", "savepoint", "release", "prepare", "start"];
    let Ok(t) = std::str::from_utf8(query) else { return false };
    shardgate_router::first_word(t).is_some_and(|w| WORDS.iter().any(|k| w.eq_ignore_ascii_case(k))) && !matches!(super::txn::tx_verb(t), super::txn::TxVerb::Other)
}

/// PREPARE TRANSACTION of a block that wrote a cached table: its COMMIT PREPARED
/// (from any session) could not drop the cached rows.
const NO_PREPARED_CACHE_WRITE: &str = "PREPARE TRANSACTION is not supported in a transaction that wrote a cached table (the cache could not follow its COMMIT PREPARED); commit the transaction directly, or remove the table from [[cache.tables]]";
