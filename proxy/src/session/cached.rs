//! The session's side of the merchant-info cache: point reads of cached
//! tables answered from the cache, writes to them noted and invalidated when
//! their transaction ends.
//!
//! - A simple-protocol point read is answered here when the cache has it (or
//!   loads it); otherwise the Query goes on to `db_default` untouched, so
//!   errors are PostgreSQL's own.
//! - A prepared point read is kept by the proxy like a statement on a sharded
//!   table (see `routing`): Parse is checked and described on `db_default`,
//!   Execute is answered from the cache.
//! - Reads in a transaction that wrote a cached table, and reads the cache
//!   cannot answer exactly, run on the client's own `db_default` connection.
//! - Writes: the keys are noted when the statement is sent; at the
//!   ReadyForQuery that ends its transaction they are dropped locally (before
//!   the client sees it), then in Redis and on the other proxies (before the
//!   client's next bytes are written).

use std::sync::Arc;

use shardgate_router::cache::{KeyArg, WriteEffect};

use super::extended::{parse_bind, type_oids};
use super::routing::RoutedStmt;
use super::{End, Flow, Session};
use crate::cache::{Cache, Fetch, Invalidation, LoadError};
use crate::metrics as m;
use crate::protocol::backend as msg;
use crate::protocol::codec::put_message;
use crate::protocol::frontend::Reader;
use crate::routed::exec::{Bound, ExecError};
use crate::protocol::sqlstate;

/// A write statement prepared by the client: what it writes, and its declared types.
pub(super) type CacheWrites = (Arc<Vec<WriteEffect>>, Vec<u32>);

impl Session {
    /// Why a point read must not be answered from the cache, if it must not.
    fn cache_bypass(&self) -> Option<&'static str> {
        if self.cache_hold.cache_tx_wrote {
            Some("transaction_wrote_table")
        } else if self.db.server.is_some() && self.tx_status == b'E' {
            Some("transaction_aborted")
        } else {
            None
        }
    }

    /// Notes the cached-table writes of a statement about to be sent: dropped
    /// at the ReadyForQuery that ends its transaction.
    fn note_cache_writes(&mut self, writes: &[WriteEffect], values: &[Option<&[u8]>], formats: &[i16], types: &[u32]) {
        let cache = self.shared.cache.clone();
        // ReadyForQuerys owed for what was sent before this statement
        let wait = self.db.pending_ready;
        for w in writes {
            match &w.keys {
                None => self.cache_hold.cache_pending.push((wait, Invalidation { table: w.table, key: None })),
                Some(keys) => {
                    for k in keys {
                        match cache.canonical_key(w.table, k, values, formats, types) {
                            Some(c) => self.cache_hold.cache_pending.push((wait, Invalidation { table: w.table, key: Some(c) })),
                            // NULL matches no row; anything else unreadable: the whole table
                            None if matches!(k, KeyArg::Null) => {}
                            None => self.cache_hold.cache_pending.push((wait, Invalidation { table: w.table, key: None })),
                        }
                    }
                }
            }
        }
        if !writes.is_empty() {
            self.cache_hold.cache_tx_wrote = true;
        }
    }

    /// At each ReadyForQuery from `db_default`: writes whose transaction has
    /// ended are dropped from this proxy's cache now, and queued for Redis.
    pub(super) fn cache_on_ready(&mut self, status: u8) {
        if self.cache_hold.cache_pending.is_empty() && !self.cache_hold.cache_tx_wrote {
            return;
        }
        if std::mem::take(&mut self.cache_hold.commit_seen) && status != b'I' {
            // COMMIT AND CHAIN: committed, though the connection stays in a block
            self.cache_on_commit();
        }
        let mut due = Vec::new();
        if status == b'I' {
            let mut later = Vec::new();
            for (wait, inv) in self.cache_hold.cache_pending.drain(..) {
                if wait == 0 {
                    due.push(inv);
                } else {
                    later.push((wait - 1, inv));
                }
            }
            self.cache_hold.cache_pending = later;
            if self.cache_hold.cache_pending.is_empty() {
                self.cache_hold.cache_tx_wrote = false;
            }
        } else {
            for (wait, _) in self.cache_hold.cache_pending.iter_mut() {
                *wait = wait.saturating_sub(1);
            }
        }
        if !due.is_empty() {
            self.shared.cache.invalidate_local(&due);
            self.cache_hold.cache_flush = true;
        }
    }

    /// A COMMIT that leaves no idle status for `cache_on_ready` to see (`COMMIT
    /// AND CHAIN`): what was written before it is committed, so it is dropped
    /// now, before the client hears of the COMMIT. The entries stay noted: a
    /// statement of the chained block may be among them (a portal bound before
    /// the COMMIT and executed after it), and dropping a key again is harmless.
    pub(super) fn cache_on_commit(&mut self) {
        if !self.cache_hold.cache_pending.is_empty() {
            let inv: Vec<Invalidation> = self.cache_hold.cache_pending.iter().map(|(_, i)| i.clone()).collect();
            self.shared.cache.invalidate_local(&inv);
            self.cache_hold.cache_flush = true;
        }
    }

    /// Replies are held back while a statement that writes a cached table may
    /// be committing: until the ReadyForQuery that ends it has been read. Only
    /// while that needs no more client input: a Sync/Query is outstanding and
    /// the server is not waiting for COPY data.
    pub(super) fn holding_for_cache(&self) -> bool {
        self.db.pending_ready > 0
            && self.db.copy_in.is_none()
            && self.cout.len() < super::HIGH_WATER
            && self.cache_hold.cache_pending.iter().any(|(wait, _)| *wait < self.db.pending_ready)
    }

    /// Sends committed invalidations to Redis and the other proxies.
    pub(super) async fn flush_cache_invalidations(&mut self) {
        if std::mem::take(&mut self.cache_hold.cache_flush) {
            self.shared.cache.invalidate_shared().await;
        }
    }

    /// The session is ending: whatever was written may have committed.
    pub(super) async fn cache_on_end(&mut self) {
        let inv: Vec<Invalidation> = self.cache_hold.cache_pending.drain(..).map(|(_, i)| i).collect();
        if !inv.is_empty() {
            self.shared.cache.invalidate_local(&inv);
            self.cache_hold.cache_flush = true;
        }
        self.flush_cache_invalidations().await;
    }

    /// A simple Query: `Some` when answered from the cache.
    pub(super) async fn cached_query(&mut self, sql: &[u8]) -> Result<Option<Flow>, End> {
        let cache = self.shared.cache.clone();
        if !cache.enabled() || !cache.may_concern(sql) {
            return Ok(None);
        }
        let Ok(text) = std::str::from_utf8(sql) else { return Ok(None) };
        let (read, key_arg) = match cache.classify_simple(text) {
            Some((Some(read), Some(key))) => (read, key),
            Some(_) => return Ok(None),
            None => {
                let a = cache.classify(text);
                if !a.writes.is_empty() {
                    self.note_cache_writes(&a.writes, &[], &[], &[]);
                    return Ok(None);
                }
                let Some(read) = a.read else { return Ok(None) };
                let key = read.key.clone();
                (read, key)
            }
        };
        if let Some(reason) = self.cache_bypass() {
            metrics::counter!(m::CACHE_BYPASS, "reason" => reason).increment(1);
            return Ok(None);
        }
        if self.db.sent_since_sync || self.db.copy_in.is_some() {
            // inside an unfinished extended batch: keep the server's order
            return Ok(None);
        }
        let Some(key) = cache.canonical_key(read.table, &key_arg, &[], &[], &[]) else {
            metrics::counter!(m::CACHE_BYPASS, "reason" => "key").increment(1);
            return Ok(None);
        };
        self.barrier().await?;
        self.flush_cache_invalidations().await;
        let variant = Cache::variant(&read.shape, true, &[], &[], &self.desired);
        let desired = &self.desired;
        let sets = |c: &mut crate::backend::ServerConn| super::param_sets(desired, c);
        let fetch = Fetch { simple: true, sql: text, types: &[], values: &[], formats: &[], result_formats: &[], param_sets: &sets };
        match cache.get(read.table, &key, variant, &fetch).await {
            Ok((a, _)) => {
                self.cout.extend_from_slice(&a.bytes);
                let status = self.logical_status();
                msg::ready_for_query(&mut self.cout, status);
                Ok(Some(Flow::Continue))
            }
            // db_default answers it the ordinary way, with its own error if any
            Err(_) => Ok(None),
        }
    }

    /// Parse: `Some` when the statement is a point read kept by the proxy (or its error).
    pub(super) async fn cached_parse(&mut self, name: &[u8], query: &[u8], param_types: &[u8]) -> Result<Option<Flow>, End> {
        let cache = self.shared.cache.clone();
        if !cache.enabled() {
            return Ok(None);
        }
        if !cache.may_concern(query) {
            if !self.cache_hold.cache_write_stmts.is_empty() && name.is_empty() {
                self.cache_hold.cache_write_stmts.remove(name);
            }
            return Ok(None);
        }
        let Ok(text) = std::str::from_utf8(query) else { return Ok(None) };
        let types = type_oids(param_types);
        let a = cache.classify(text);
        // a name is reused by the client only after Close (or it is the unnamed one)
        self.cache_hold.cache_write_stmts.remove(name);
        if !a.writes.is_empty() {
            self.cache_hold.cache_write_stmts.insert(name.to_vec(), (Arc::new(a.writes), types));
            return Ok(None);
        }
        let Some(read) = a.read else { return Ok(None) };
        if !name.is_empty() && (self.routed.routed_stmts.contains_key(name) || self.db.statements.contains_key(name)) {
            // the ordinary path answers 42P05
            return Ok(None);
        }
        self.barrier().await?;
        if self.db.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        let described = match cache.described(text, &types) {
            Some(d) => d,
            None => {
                let probe = RoutedStmt::cached(text.to_string(), types.clone(), read.clone(), None);
                match self.describe(&probe).await {
                    Ok(d) => {
                        cache.remember_description(text, &types, d.clone());
                        d
                    }
                    Err(ExecError::Server(e)) => {
                        // the Parse's own error, in order
                        self.fail_extended(ExecError::Server(e)).await?;
                        return Ok(Some(Flow::Continue));
                    }
                    // db_default unreachable from here: the ordinary path reports it
                    Err(_) => return Ok(None),
                }
            }
        };
        self.routed.routed_stmts.insert(name.to_vec(), Arc::new(RoutedStmt::cached(text.to_string(), types, read, Some(described))));
        put_message(&mut self.cout, b'1', |_| {});
        Ok(Some(Flow::Continue))
    }

    /// Bind of a statement that writes a cached table: note its keys.
    pub(super) fn cached_bind_write(&mut self, statement: &[u8], rest: &[u8]) {
        let Some((writes, types)) = self.cache_hold.cache_write_stmts.get(statement).cloned() else { return };
        match parse_bind(&mut Reader::new(rest), &types) {
            Ok(b) => {
                let values: Vec<Option<&[u8]>> = b.values.iter().map(|v| v.as_deref()).collect();
                self.note_cache_writes(&writes, &values, &b.formats, &types);
            }
            // a malformed Bind fails on the server; drop the table to be safe
            Err(_) => {
                let all: Vec<WriteEffect> = writes.iter().map(|w| WriteEffect { table: w.table, keys: None }).collect();
                self.note_cache_writes(&all, &[], &[], &[]);
            }
        }
    }

    /// Execute of a prepared point read.
    pub(super) async fn cached_execute(&mut self, stmt: &RoutedStmt, bound: &Bound, max_rows: i32) -> Result<(), End> {
        let Some(read) = stmt.cached.as_ref() else { return Ok(()) };
        if self.block_failed() {
            return self.fail_extended(super::routing::in_failed_block()).await;
        }
        let cache = self.shared.cache.clone();
        let values: Vec<Option<&[u8]>> = bound.values.iter().map(|v| v.as_deref()).collect();
        let desired = self.desired.clone();
        let sets = move |c: &mut crate::backend::ServerConn| super::param_sets(&desired, c);
        let fetch = Fetch { simple: false, sql: &stmt.sql, types: &stmt.types, values: &values, formats: &bound.formats, result_formats: &bound.result_formats, param_sets: &sets };
        let bypass = self.cache_bypass();
        let key = cache.canonical_key(read.table, &read.key, &values, &bound.formats, &stmt.param_oids);
        if let (None, Some(key)) = (bypass, key.as_ref()) {
            self.flush_cache_invalidations().await;
            let variant = Cache::variant(&stmt.sql, false, &stmt.types, &bound.result_formats, &self.desired);
            match cache.get(read.table, key, variant, &fetch).await {
                Ok((a, _)) if max_rows <= 0 || (a.rows as i64) < i64::from(max_rows) => {
                    self.cout.extend_from_slice(&a.bytes);
                    return Ok(());
                }
                Ok(_) => return self.fail_extended(ExecError::Proxy(sqlstate::FEATURE_NOT_SUPPORTED, BATCHED.into())).await,
                Err(LoadError::Server(e)) => return self.fail_extended(ExecError::Server(e)).await,
                Err(LoadError::Uncacheable(_)) => {}
            }
        } else {
            metrics::counter!(m::CACHE_BYPASS, "reason" => bypass.unwrap_or("key")).increment(1);
        }
        // on the client's own db_default connection, inside its transaction
        if max_rows > 0 {
            return self.fail_extended(ExecError::Proxy(sqlstate::FEATURE_NOT_SUPPORTED, BATCHED.into())).await;
        }
        if !self.server_for(true).await {
            return Ok(());
        }
        // the connection's session settings first
        self.barrier().await?;
        let server = self.db.server.as_mut().expect("server_for succeeded");
        match crate::cache::exchange(server, &fetch).await {
            Ok(x) => {
                self.set_tx_status(x.status);
                self.cout.extend_from_slice(&x.bytes);
                if x.error.is_some() {
                    self.discard_until_sync = true;
                }
                Ok(())
            }
            Err(_) => self.server_lost(),
        }
    }
}

const BATCHED: &str = "fetching rows of a cached point read in batches (Execute with a row limit) is not supported; fetch all rows";

