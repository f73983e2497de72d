//! The extended protocol on t_order: Parse, Bind (decoded once into a [`Bound`]),
//! Describe, Execute (whole or in parts), Close.

use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use shardgate_router::Analysis;

use super::routing::*;
use super::{End, Flow, Session};
use crate::protocol::codec::{put_cstr, put_message};
use crate::protocol::frontend::{Reader, Target};
use crate::routed::exec::{Bound, ExecError};
use crate::backend::query::{self as wire, ServerError};
use crate::protocol::sqlstate;

/// Runs a routed statement; past `server.query_timeout_ms` (0 = never) the
/// shard connections running it get a CancelRequest, and the statement ends
/// with the shards' 57014 as a statement on one server would.
/// Whether bind parameter `i` is declared text-like (or left to the server).
pub(super) fn text_like(bound: &Bound, i: usize) -> bool {
    matches!(bound.types.get(i).copied().unwrap_or(0), 0 | 25 | 1043)
}

/// `MOVE [FORWARD | NEXT] [count | ALL] [FROM | IN] portal`: the count
/// (`None` for ALL) and the portal's name; other forms give `None`.
pub(super) fn parse_move(sql: &str) -> Option<(Option<usize>, String)> {
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

pub(super) fn portal_too_large(limit: usize) -> ExecError {
    ExecError::Proxy(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
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

pub(super) fn count_params(stmt: &RoutedStmt) -> usize {
    // the client's declared types may be fewer than the statement uses: the shard's describe knows
    match stmt.describe.get() {
        Some((t, _)) if t.len() >= 7 => i16::from_be_bytes([t[5], t[6]]).max(0) as usize,
        _ => max_placeholder(&stmt.sql).max(stmt.types.len()),
    }
}

/// Highest `$n` in a statement text (outside quotes, roughly): the parameter count.
pub(super) fn max_placeholder(sql: &str) -> usize {
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
    Ok(Bound { values, formats, types: types.to_vec(), result_formats, shape: None })
}

impl Session {
    /// Parse: `Some` when the statement is routed (handled here).
    pub(super) async fn routed_parse(&mut self, name: &[u8], query: &[u8], param_types: &[u8]) -> Result<Option<Flow>, End> {
        // (a Parse under a name in use fails, 42P05: a COMMIT there must not end the shards' part)
        let duplicate = !name.is_empty() && (self.routed.routed_stmts.contains_key(name) || self.db.statements.contains_key(name));
        // (nor with declared parameter types, which its Bind must match: left to the Bind)
        let declares = param_types.get(..2).is_some_and(|n| n != [0, 0]);
        if self.shards_take_part() && !duplicate && !declares {
            if let Some(flow) = self.extended_tx_end(query).await? {
                return Ok(Some(flow));
            }
        }
        if !self.shared.engine.may_route(query) {
            if name.is_empty() {
                self.routed.routed_stmts.remove(name);
            }
            return Ok(None);
        }
        let Ok(text) = std::str::from_utf8(query) else { return Ok(None) };
        let analysis = self.shared.engine.router.analysis(text);
        if matches!(&*analysis, Analysis::Passthrough(_)) {
            if name.is_empty() {
                self.routed.routed_stmts.remove(name);
            }
            return Ok(None);
        }
        self.barrier().await?;
        if self.db.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        if self.block_failed() {
            // (transaction control was handled above)
            self.fail_extended(super::routing::in_failed_block()).await?;
            return Ok(Some(Flow::Continue));
        }
        if !name.is_empty() && (self.routed.routed_stmts.contains_key(name) || self.db.statements.contains_key(name)) {
            let m = format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(name));
            self.fail_extended(ExecError::Proxy(sqlstate::DUPLICATE_PREPARED_STATEMENT, m)).await?;
            return Ok(Some(Flow::Continue));
        }
        // (an error PostgreSQL raises only when the statement runs comes at its Execute: in a
        // block, what was pipelined ahead of this Parse still runs)
        if let Analysis::Refused(e) = &*analysis {
            if !e.raised_at_execution() {
                metrics::counter!(crate::metrics::ROUTE_REFUSED_TOTAL, "sqlstate" => e.sqlstate()).increment(1);
                self.fail_extended(ExecError::Proxy(e.sqlstate(), e.to_string())).await?;
                return Ok(Some(Flow::Continue));
            }
        }
        let types = type_oids(param_types);
        let stmt = RoutedStmt { sql: text.to_string(), types, analysis, describe: OnceLock::new(), cached: None, param_oids: Vec::new() };
        if matches!(&*stmt.analysis, Analysis::Refused(_)) {
            if let Some(e) = self.parse_error(&stmt).await {
                self.fail_extended(e).await?;
                return Ok(Some(Flow::Continue));
            }
        }
        self.routed.routed_stmts.insert(name.to_vec(), Arc::new(stmt));
        put_message(&mut self.cout, b'1', |_| {});
        Ok(Some(Flow::Continue))
    }

    /// Bind: `Some` when it binds a routed statement.
    pub(super) async fn routed_bind(&mut self, body: &[u8]) -> Result<Option<Flow>, End> {
        let mut r = Reader::new(body);
        let (Ok(portal), Ok(statement)) = (r.cstr(), r.cstr()) else { return Ok(None) };
        let Some(stmt) = self.routed.routed_stmts.get(statement).cloned() else {
            if !self.routed.routed_portals.is_empty() {
                self.routed.routed_portals.remove(portal);
                self.routed.suspended.remove(portal);
            }
            return Ok(None);
        };
        let portal = portal.to_vec();
        self.barrier().await?;
        if self.db.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        let bound = match parse_bind(&mut r, &stmt.types) {
            Ok(b) => b,
            Err(m) => return Err(End::Fatal(sqlstate::PROTOCOL_VIOLATION, m.to_string())),
        };
        if bound.values.len() != count_params(&stmt) {
            let m = format!("bind message supplies {} parameters, but prepared statement requires {}", bound.values.len(), count_params(&stmt));
            self.fail_extended(ExecError::Proxy(sqlstate::PROTOCOL_VIOLATION, m)).await?;
            return Ok(Some(Flow::Continue));
        }
        // (after the count, as PostgreSQL checks them)
        if self.block_failed() {
            self.fail_extended(super::routing::in_failed_block()).await?;
            return Ok(Some(Flow::Continue));
        }
        let cap = self.shared.config.server.max_client_portals;
        if !portal.is_empty() && !self.routed.routed_portals.contains_key(&portal) && self.routed.routed_portals.len() >= cap {
            let m = format!("too many open portals on this connection (server.max_client_portals = {cap}); close some with Close or end the transaction");
            self.fail_extended(ExecError::Proxy(sqlstate::CONFIGURATION_LIMIT_EXCEEDED, m)).await?;
            return Ok(Some(Flow::Continue));
        }
        self.routed.suspended.remove(&portal);
        self.routed.routed_portals.insert(portal, RoutedPortal { stmt, bound: Arc::new(bound) });
        put_message(&mut self.cout, b'2', |_| {});
        Ok(Some(Flow::Continue))
    }

    /// Describe: `Some` when it describes a routed statement or portal.
    pub(super) async fn routed_describe(&mut self, t: &Target<'_>) -> Result<Option<Flow>, End> {
        let (stmt, portal_bound) = match t.kind {
            b'S' => match self.routed.routed_stmts.get(t.name) {
                Some(s) => (s.clone(), None),
                None => return Ok(None),
            },
            _ => match self.routed.routed_portals.get(t.name) {
                Some(p) => (p.stmt.clone(), Some(p.bound.clone())),
                None => return Ok(None),
            },
        };
        self.barrier().await?;
        if self.db.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        let (params, rows) = match self.describe(&stmt).await {
            // in a failed block PostgreSQL describes only what returns no rows
            Ok((_, rows)) if self.block_failed() && rows.first() == Some(&b'T') => {
                self.fail_extended(super::routing::in_failed_block()).await?;
                return Ok(Some(Flow::Continue));
            }
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
                let n = wire::row_fields(&rows[5..]).map_or(0, |f| f.len());
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

    /// A shard's error parsing `stmt` (a name, the VALUES rows' length, a literal
    /// of the wrong type): what PostgreSQL reports before an error the router
    /// found that PostgreSQL raises only when the statement runs.
    pub(super) async fn parse_error(&mut self, stmt: &RoutedStmt) -> Option<ExecError> {
        match self.describe(stmt).await {
            Err(e @ ExecError::Server(_)) => Some(e),
            _ => None,
        }
    }

    /// ParameterDescription and RowDescription/NoData of a routed statement,
    /// from a shard (the template table has the logical table's columns).
    pub(super) async fn describe(&mut self, stmt: &RoutedStmt) -> Result<(Bytes, Bytes), ExecError> {
        if let Some(d) = stmt.describe.get() {
            return Ok(d.clone());
        }
        let engine = self.shared.engine.clone();
        let mut last = ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "no shard is available to describe the statement".into());
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
            if conn.send(&buf).await.is_err() {
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
            last = ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "lost a shard connection while describing the statement".into());
        }
        Err(last)
    }

    /// Execute: `Some` when it runs a routed portal.
    pub(super) async fn routed_execute(&mut self, body: &[u8]) -> Result<Option<Flow>, End> {
        let mut r = Reader::new(body);
        let Ok(portal) = r.cstr() else { return Ok(None) };
        let max_rows = r.i32().unwrap_or(0);
        let Some(p) = self.routed.routed_portals.get(portal) else { return Ok(None) };
        let (stmt, bound) = (p.stmt.clone(), p.bound.clone());
        self.barrier().await?;
        if self.db.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        if !self.routed.routed_portals.contains_key(portal) {
            // a COMMIT or ROLLBACK earlier in the batch ended the block and its portals
            let m = format!("portal \"{}\" does not exist", String::from_utf8_lossy(portal));
            self.fail_extended(ExecError::Proxy(sqlstate::INVALID_CURSOR_NAME, m)).await?;
            return Ok(Some(Flow::Continue));
        }
        if stmt.cached.is_some() {
            self.cached_execute(&stmt, &bound, max_rows).await?;
            return Ok(Some(Flow::Continue));
        }
        let n = if max_rows > 0 { max_rows as usize } else { usize::MAX };
        if self.routed.stream.as_ref().is_some_and(|s| s.portal == portal) {
            // the next part of a portal streaming from its own task
            self.stream_part(n).await?;
            return Ok(Some(Flow::Continue));
        }
        if let Some(s) = self.routed.suspended.get_mut(portal) {
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
                Ok((_, rows)) if rows[0] == b'T' => wire::row_fields(&rows[5..]).map(|f| f.len()),
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
    pub(super) async fn execute_in_parts(&mut self, portal: Vec<u8>, stmt: &RoutedStmt, bound: &Bound, max_rows: usize) -> Result<Flow, End> {
        let visible = if bound.result_formats.iter().any(|f| *f != 0) {
            match self.describe(stmt).await {
                Ok((_, rows)) if rows[0] == b'T' => wire::row_fields(&rows[5..]).map(|f| f.len()),
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
            self.routed.stream_next = true;
            let r = self.run_routed(&stmt.analysis, &stmt.sql, bound, false, visible).await;
            self.routed.stream_next = false;
            match r? {
                Ok(()) => {
                    if let Some(st) = self.routed.stream.as_mut() {
                        st.portal = portal;
                        self.stream_part(max_rows).await?;
                    }
                }
                Err(e) => self.fail_extended(e).await?,
            }
            return Ok(Flow::Continue);
        }
        let limit = self.shared.config.server.max_portal_bytes;
        if !self.in_tx_block() && !matches!(*stmt.analysis, Analysis::Select(_)) {
            // a write whose answer may be refused as too large to keep: the shards hold it
            // until the Sync (committed there, or rolled back after the refusal), as the
            // batch's implicit transaction does on one table
            self.shard_tx.batch_tx = true;
        }
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
        self.routed.suspended.insert(portal.clone(), Suspended { rows, tag, error: None });
        self.send_part(&portal, max_rows);
        Ok(Flow::Continue)
    }

    /// Sends up to `n` kept rows of a portal read in parts, then
    /// PortalSuspended, or the tag (`SELECT` and the rows of this part, as
    /// PostgreSQL counts them) once a part comes up short. Like PostgreSQL, a
    /// part that takes exactly the last rows is still suspended: the next
    /// Execute answers `SELECT 0`.
    pub(super) fn send_part(&mut self, portal: &[u8], n: usize) {
        let Some(s) = self.routed.suspended.get_mut(portal) else { return };
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
            b'S' => self.routed.routed_stmts.remove(t.name).is_some(),
            _ => {
                self.routed.suspended.remove(t.name);
                self.routed.routed_portals.remove(t.name).is_some()
            }
        };
        if !found {
            return Ok(None);
        }
        self.barrier().await?;
        if self.db.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        put_message(&mut self.cout, b'3', |_| {});
        Ok(Some(Flow::Continue))
    }
}
