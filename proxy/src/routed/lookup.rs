//! Unique lookups: a column listed in a sharded table's `unique_lookups`
//! (`order_no`) is unique across every shard and month, as a unique index on
//! one table would make it, and a lookup by it goes to one shard and month.
//!
//! Each value is recorded in `shardgate_lookup_<table>_<column>` in
//! `db_default` (value → shard key, month). The entry is written on the
//! session's `db_default` slot inside the same transaction as the row, so the
//! two commit together (two-phase commit when the row is on a shard): an
//! acknowledged row always has its entry, and a rolled-back row leaves none.
//! The primary key makes a concurrent INSERT of the same value wait for the
//! first transaction and then fail with `23505`, as one table would.
//!
//! An autocommit INSERT on one shard commits its entries first, marked with
//! its token, and its row after ([`super::entries`]); an entry can then be
//! an orphan, whose row never committed.
//!
//! DELETE leaves the entry behind (it does not know the values it removes),
//! so an entry can outlive its row. An INSERT whose value has an entry
//! therefore checks that entry's row: if the row is gone the INSERT takes the
//! entry over (the entry stays locked until it commits), else it gets `23505`.
//! The check first waits for two-phase commits in progress on that shard, so
//! a row whose decision is made but not yet applied there counts as present,
//! and fences the token of an entry written ahead of its row
//! ([`super::fence::take`]), so a row still on its way either counts or can
//! never commit.
//!
//! Reads: a WHERE that pins the column to values (`= v`, `IN (…)`) is routed
//! by their entries; a value without an entry (rows written before the lookup
//! existed) narrows nothing.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardgate_router::month::MonthKey;
use shardgate_router::{LookupRow, Resolved, TableRule};

use super::exec::{ExecError, Slots};
use crate::backend::query as wire;
use super::Engine;
use crate::protocol::sqlstate;

/// One unique-lookup column, as prepared in `db_default`.
#[derive(Debug)]
pub struct Meta {
    /// Sharded table.
    pub table: String,
    /// Unique column.
    pub column: String,
    /// `shardgate_lookup_<table>_<column>`.
    pub lookup_table: String,
    /// The name one table's unique index would report in `23505`.
    pub constraint: String,
    /// Every row on the shards has its entry (rows from before the lookup
    /// existed were filled in): only then does an entry narrow a read.
    pub complete: std::sync::atomic::AtomicBool,
}

/// Which lookup tables hold an entry for every row (see [`fill`]).
pub const STATE_DDL: &str = "CREATE TABLE IF NOT EXISTS shardgate_lookup_state (lookup_table text PRIMARY KEY, complete boolean NOT NULL DEFAULT false, filled_at timestamptz)";

/// An entry's month for a value held by rows in several places (they were
/// written before the lookup existed): the value is taken, and reads by it
/// go everywhere.
pub(super) const AMBIGUOUS: &str = "";

/// The lookup tables, made on first need (`db_default` may be down at start).
pub struct Lookups {
    meta: tokio::sync::OnceCell<Vec<Meta>>,
    /// Places entries were last read at, by (table, column, value): a hint
    /// for reads whose answer proves it (see
    /// [`shardgate_router::Analysis::lookup_hint`]); never trusted otherwise.
    hints: moka::sync::Cache<(String, String, String), (i64, MonthKey)>,
}

/// Bytes of hints kept per proxy.
const HINT_BYTES: u64 = 16 << 20;

impl Default for Lookups {
    fn default() -> Self {
        // sized for a full cache from the start: growing its table (a rehash of every
        // entry) was 3% of a routed INSERT's proxy CPU while it filled
        let hints = moka::sync::Cache::builder()
            .max_capacity(HINT_BYTES)
            .initial_capacity((HINT_BYTES / 128) as usize)
            .weigher(|k: &(String, String, String), _v: &(i64, MonthKey)| u32::try_from(k.0.len() + k.1.len() + k.2.len() + 96).unwrap_or(u32::MAX))
            .build();
        Lookups { meta: Default::default(), hints }
    }
}

fn not_ready(e: impl std::fmt::Display) -> ExecError {
    tracing::warn!(error = %e, "unique lookup tables not ready");
    ExecError::Proxy(sqlstate::CANNOT_CONNECT_NOW, "the unique-lookup tables in db_default are not ready (is db_default up?); retry shortly".into())
}

impl Lookups {
    /// The prepared lookup columns (creates the tables on first call).
    pub async fn meta(&self, engine: &Engine) -> Result<&[Meta], ExecError> {
        self.meta.get_or_try_init(|| prepare(engine)).await.map(Vec::as_slice).map_err(not_ready)
    }

    /// The place `probe`'s entry was last read at, if this proxy remembers
    /// one and the lookup is complete. Only a read whose answer has a row may
    /// trust it; an empty answer must [`forget`](Self::forget) it and ask
    /// the lookup table.
    pub fn hint(&self, probe: &shardgate_router::Probe) -> Option<Resolved> {
        let meta = self.meta.get()?;
        let m = find(meta, &probe.table, &probe.column)?;
        if !m.complete.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let at = self.hints.get(&(probe.table.clone(), probe.column.clone(), probe.value.clone()))?;
        Some(Resolved { table: probe.table.clone(), column: probe.column.clone(), value: probe.value.clone(), at: Some(at) })
    }

    /// Remembers where a value lives, once the lookup is complete (before,
    /// filling may still find the value elsewhere and mark it ambiguous).
    fn remember(&self, table: &str, column: &str, value: &str, at: (i64, MonthKey)) {
        let complete = self.meta.get().and_then(|meta| find(meta, table, column)).is_some_and(|m| m.complete.load(std::sync::atomic::Ordering::Relaxed));
        if complete {
            self.hints.insert((table.to_string(), column.to_string(), value.to_string()), at);
        }
    }

    /// Drops a hint its read did not confirm.
    pub fn forget(&self, probe: &shardgate_router::Probe) {
        self.hints.invalidate(&(probe.table.clone(), probe.column.clone(), probe.value.clone()));
    }
}

/// Creates each lookup table with the column's type from the template table,
/// and finds the name of the template's unique index on the column.
async fn prepare(engine: &Engine) -> anyhow::Result<Vec<Meta>> {
    let mut out = Vec::new();
    let rules: Vec<&TableRule> = engine.topology().tables.iter().filter(|r| !r.unique_lookups.is_empty()).collect();
    if rules.is_empty() {
        return Ok(out);
    }
    let mut conn = tokio::time::timeout(Duration::from_secs(5), engine.default.get()).await.map_err(|_| anyhow::anyhow!("timed out"))?.map_err(|e| anyhow::anyhow!("{e}"))?;
    match wire::control(&mut conn, STATE_DDL).await? {
        Ok(_) => {}
        Err(e) if e.code == sqlstate::UNIQUE_VIOLATION || e.code == sqlstate::DUPLICATE_TABLE => {}
        Err(e) => anyhow::bail!("creating shardgate_lookup_state: SQLSTATE {}", e.code),
    }
    for rule in rules {
        for column in &rule.unique_lookups {
            // names are plain identifiers (checked when the config is read); values go as parameters
            let ty = wire::query(
                &mut conn,
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
                &[Some(&rule.name), Some(column)],
            )
            .await?
            .map_err(|e| anyhow::anyhow!("reading {}.{column}: SQLSTATE {}", rule.name, e.code))?;
            let Some(Some(ty)) = ty.into_iter().next().and_then(|r| r.into_iter().next()) else {
                anyhow::bail!("{}.{column} (unique_lookups) does not exist in the template table in db_default", rule.name);
            };
            // bound values are read as text: the column must be text-like
            if !(ty == "text" || ty.starts_with("character varying")) {
                anyhow::bail!("{}.{column} is {ty}; unique_lookups supports text and varchar columns", rule.name);
            }
            let constraint = wire::query(
                &mut conn,
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                 WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnkeyatts = 1 AND a.attname = $2 ORDER BY 1 LIMIT 1",
                &[Some(&rule.name), Some(column)],
            )
            .await?
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|r| r.into_iter().next().flatten())
            .unwrap_or_else(|| format!("{}_{column}_key", rule.name));
            let lookup_table = rule.lookup_table(column);
            // token: the INSERT that wrote the entry before its row (see super::entries); NULL
            // when the entry committed with its row
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {lookup_table} (value {ty} PRIMARY KEY, shard_key bigint NOT NULL, month text NOT NULL, token text); \
                 ALTER TABLE {lookup_table} ADD COLUMN IF NOT EXISTS token text"
            );
            match wire::control(&mut conn, &ddl).await? {
                Ok(_) => {}
                // two proxies creating it at once
                Err(e) if e.code == sqlstate::UNIQUE_VIOLATION || e.code == sqlstate::DUPLICATE_TABLE => {}
                Err(e) => anyhow::bail!("creating {lookup_table}: SQLSTATE {}", e.code),
            }
            let state = wire::query(
                &mut conn,
                "INSERT INTO shardgate_lookup_state (lookup_table) VALUES ($1) ON CONFLICT (lookup_table) DO UPDATE SET lookup_table = EXCLUDED.lookup_table RETURNING complete::text",
                &[Some(&lookup_table)],
            )
            .await?
            .map_err(|e| anyhow::anyhow!("reading shardgate_lookup_state: SQLSTATE {}", e.code))?;
            let complete = state.first().and_then(|r| r.first().cloned().flatten()).is_some_and(|c| c == "true");
            if !complete {
                tracing::warn!(table = %lookup_table, "unique lookup not complete yet: filling it from the rows on the shards; until then reads by it go to every shard");
            }
            out.push(Meta { table: rule.name.clone(), column: column.clone(), lookup_table, constraint, complete: complete.into() });
        }
    }
    Ok(out)
}

fn find<'m>(meta: &'m [Meta], table: &str, column: &str) -> Option<&'m Meta> {
    meta.iter().find(|m| m.table == table && m.column == column)
}

/// The `23505` one table would answer.
fn duplicate(m: &Meta, value: &str) -> ExecError {
    use bytes::BufMut;
    let mut b = BytesMut::new();
    crate::protocol::codec::put_message(&mut b, b'E', |o| {
        for (f, v) in [
            (b'S', "ERROR".to_string()),
            (b'V', "ERROR".to_string()),
            (b'C', sqlstate::UNIQUE_VIOLATION.to_string()),
            (b'M', format!("duplicate key value violates unique constraint \"{}\"", m.constraint)),
            (b'D', format!("Key ({})=({value}) already exists.", m.column)),
            (b's', "public".to_string()),
            (b't', m.table.clone()),
            (b'n', m.constraint.clone()),
        ] {
            o.put_u8(f);
            crate::protocol::codec::put_cstr(o, v.as_bytes());
        }
        o.put_u8(0);
    });
    let raw = b.freeze();
    ExecError::Server(wire::ServerError { raw, code: sqlstate::UNIQUE_VIOLATION.into() })
}

fn lost_default(e: impl std::fmt::Display) -> ExecError {
    tracing::warn!(error = %e, "db_default lost while recording unique values");
    ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "lost the connection to db_default while recording unique values; the statement was not applied".into())
}

/// An INSERT's entries for the way that commits them before the row
/// ([`super::entries::insert`]): (lookup table, [value, shard key, month]).
/// There a taken value fails with `23505` instead of being looked into as
/// [`record`] does. The same value twice in the statement is refused here,
/// as in [`record`].
pub async fn entry_rows(engine: &Engine, rows: &[LookupRow], table: &str) -> Result<Vec<(String, [String; 3])>, ExecError> {
    let meta = engine.lookups.meta(engine).await?;
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let Some(m) = find(meta, table, &row.column) else { continue };
        if rows[..i].iter().any(|r| r.column == row.column && r.value == row.value) {
            return Err(duplicate(m, &row.value));
        }
        out.push((m.lookup_table.clone(), [row.value.clone(), row.shard_key.to_string(), row.month.suffix()]));
    }
    Ok(out)
}

/// Remembers where the rows of a committed INSERT are, for reads by their values.
pub fn remember_all(engine: &Engine, rows: &[LookupRow], table: &str) {
    for row in rows {
        engine.lookups.remember(table, &row.column, &row.value, (row.shard_key, row.month));
    }
}

/// Records the entries of an INSERT on the `db_default` slot, whose
/// transaction is open (the caller commits it with the rows). A value taken
/// by a row that exists answers `23505`.
pub async fn record(engine: &Engine, slots: &mut Slots, rows: &[LookupRow], table: &str) -> Result<(), ExecError> {
    let meta = engine.lookups.meta(engine).await?;
    let slot_no = engine.shards.len();
    // the same value twice in one statement
    for (i, row) in rows.iter().enumerate() {
        if rows[..i].iter().any(|r| r.column == row.column && r.value == row.value) {
            if let Some(m) = find(meta, table, &row.column) {
                return Err(duplicate(m, &row.value));
            }
        }
    }
    for row in rows {
        let Some(m) = find(meta, table, &row.column) else { continue };
        let key = row.shard_key.to_string();
        let month = row.month.suffix();
        let conn = &mut slots[slot_no].as_mut().expect("the caller holds the db_default slot").conn;
        let sql = format!("INSERT INTO {} (value, shard_key, month) VALUES ($1, $2, $3) ON CONFLICT (value) DO NOTHING", m.lookup_table);
        let vals = [Some(row.value.as_str()), Some(key.as_str()), Some(month.as_str())];
        // the tag says whether it was inserted: read it through a RETURNING row
        let sql = format!("{sql} RETURNING 1");
        match wire::query(conn, &sql, &vals).await {
            Ok(Ok(r)) if !r.is_empty() => {
                // a read after the INSERT commits goes straight there (a rollback leaves
                // a hint no answer will confirm)
                engine.lookups.remember(table, &m.column, &row.value, (row.shard_key, row.month));
                continue;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(e) => {
                conn.broken = true;
                return Err(lost_default(e));
            }
        }
        // taken: by this transaction, by a live row, or by a row deleted since
        let q = format!("SELECT shard_key, month, xmin = pg_current_xact_id()::xid, token FROM {} WHERE value = $1 FOR UPDATE", m.lookup_table);
        let held = match wire::query(conn, &q, &[Some(row.value.as_str())]).await {
            Ok(Ok(r)) => r.into_iter().next(),
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(e) => {
                conn.broken = true;
                return Err(lost_default(e));
            }
        };
        let Some([Some(k), Some(mo), Some(mine), token]) = held.as_deref().map(|r| [r[0].clone(), r[1].clone(), r[2].clone(), r.get(3).cloned().flatten()]) else {
            return Err(ExecError::Proxy(sqlstate::SERIALIZATION_FAILURE, "could not serialize access: a unique value changed hands concurrently; retry the transaction".into()));
        };
        if mo == AMBIGUOUS {
            // held by several rows written before the lookup existed
            return Err(duplicate(m, &row.value));
        }
        let (Ok(k), Some(mo)) = (k.parse::<i64>(), MonthKey::parse_suffix(&mo)) else {
            return Err(ExecError::Proxy(sqlstate::INTERNAL_ERROR, format!("unreadable entry in {}", m.lookup_table)));
        };
        let mine = mine == "t";
        let mut exists = entry_row_exists(engine, slots, m, &row.value, k, mo, mine).await?;
        if let (Some(token), false, false) = (&token, mine, exists) {
            // written ahead of its row by an INSERT that may still be on its way to the
            // shard: fence it, so no row of it can appear after a second look (a row
            // seen already is final)
            let Some((_, shard)) = place(engine, m, k) else {
                return Err(ExecError::Proxy(sqlstate::INTERNAL_ERROR, format!("unreadable entry in {}", m.lookup_table)));
            };
            super::fence::take(engine, shard, token, &format!("{} {}", m.column, row.value)).await?;
            exists = entry_row_exists(engine, slots, m, &row.value, k, mo, mine).await?;
        }
        if !exists && !mine && committed_unseen(engine, slots, m, &row.value, k, mo).await? {
            // committed after this block's snapshot, which a unique index would see
            exists = true;
        }
        if exists {
            return Err(duplicate(m, &row.value));
        }
        // the entry's row is gone: the value is free, this row takes the entry
        let conn = &mut slots[slot_no].as_mut().expect("held").conn;
        let u = format!("UPDATE {} SET shard_key = $2, month = $3, token = NULL WHERE value = $1", m.lookup_table);
        match wire::query(conn, &u, &vals).await {
            Ok(Ok(_)) => {
                tracing::debug!(table, column = %m.column, "took over the lookup entry of a deleted row");
                engine.lookups.remember(table, &m.column, &row.value, (row.shard_key, row.month));
            }
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(e) => {
                conn.broken = true;
                return Err(lost_default(e));
            }
        }
    }
    Ok(())
}

/// Whether the row of an entry (value at shard key `k`, month `mo`) exists,
/// read where this transaction can see it (see [`own_row_exists`],
/// [`held_row_exists`], [`row_exists`]).
#[allow(clippy::too_many_arguments)]
async fn entry_row_exists(engine: &Engine, slots: &mut Slots, m: &Meta, value: &str, k: i64, mo: MonthKey, mine: bool) -> Result<bool, ExecError> {
    if mine {
        // written earlier in this transaction: its row, if still there, is on a
        // connection this transaction holds (the shard's, or db_default's fallback rows)
        return own_row_exists(engine, slots, m, value, k, mo).await;
    }
    if let Some(exists) = held_row_exists(engine, slots, m, value, k, mo).await? {
        return Ok(exists);
    }
    let conn = &mut slots[engine.shards.len()].as_mut().expect("the caller holds the db_default slot").conn;
    row_exists(engine, conn, m, value, k, mo).await
}

/// Whether the entry's row, found absent by this block on the shard
/// connection it holds, is there committed all the same: under REPEATABLE
/// READ or SERIALIZABLE the block's snapshot may predate it (one table's
/// unique index would see it and answer `23505`). Read on a pool connection;
/// if the row is there, the block's own snapshot says whether it saw that row
/// (then the block deleted it itself, and the value is free). Always false
/// under READ COMMITTED, and when the block does not hold that shard (the
/// look was on a pool connection already).
async fn committed_unseen(engine: &Engine, slots: &mut Slots, m: &Meta, value: &str, shard_key: i64, month: MonthKey) -> Result<bool, ExecError> {
    let Some((rule, shard)) = place(engine, m, shard_key) else { return Ok(false) };
    let lost = |shard: usize| ExecError::Proxy(sqlstate::CONNECTION_FAILURE, format!("lost the connection to shard db_{shard}"));
    let Some(held) = slots.get_mut(shard).and_then(Option::as_mut).filter(|s| s.in_tx && !s.conn.broken) else { return Ok(false) };
    let iso = match wire::query(&mut held.conn, "SELECT current_setting('transaction_isolation')", &[]).await {
        Ok(Ok(r)) => r.first().and_then(|r| r.first().cloned().flatten()).unwrap_or_default(),
        Ok(Err(e)) => return Err(ExecError::Server(e)),
        Err(_) => {
            held.conn.broken = true;
            return Err(lost(shard));
        }
    };
    if iso == "read committed" {
        return Ok(false);
    }
    // the committed row's xmin, widened to a full transaction id by the snapshot's epoch
    let q = format!("SELECT xmin::text, pg_snapshot_xmax(pg_current_snapshot())::text FROM {} WHERE {} = $1", rule.physical(month), m.column);
    let mut conn = match tokio::time::timeout(Duration::from_secs(5), engine.pool(shard).get()).await {
        Ok(Ok(c)) => c,
        _ => return Err(ExecError::Proxy(sqlstate::CANNOT_CONNECT_NOW, format!("shard db_{shard} cannot be reached to check {} {value}; retry", m.column))),
    };
    let row = match wire::query(&mut conn, &q, &[Some(value)]).await {
        Ok(Ok(r)) => r.into_iter().next(),
        Ok(Err(e)) if e.code == sqlstate::UNDEFINED_TABLE => None,
        Ok(Err(e)) => return Err(ExecError::Server(e)),
        Err(_) => {
            conn.broken = true;
            return Err(lost(shard));
        }
    };
    drop(conn);
    let Some((Some(Ok(xmin)), Some(Ok(next)))) = row.map(|r| (r.first().cloned().flatten().map(|x| x.parse::<u64>()), r.get(1).cloned().flatten().map(|x| x.parse::<u64>()))) else {
        return Ok(false);
    };
    let mut full = (next & !0xffff_ffff) | xmin;
    if full >= next {
        full = full.saturating_sub(1 << 32);
    }
    let held = slots.get_mut(shard).and_then(Option::as_mut).expect("checked above");
    let full = full.to_string();
    let unseen = match wire::query(&mut held.conn, "SELECT pg_visible_in_snapshot($1::xid8, pg_current_snapshot())::text", &[Some(&full)]).await {
        Ok(Ok(r)) => r.first().and_then(|r| r.first().cloned().flatten()).as_deref() != Some("true"),
        Ok(Err(e)) => return Err(ExecError::Server(e)),
        Err(_) => {
            held.conn.broken = true;
            return Err(lost(shard));
        }
    };
    if !unseen {
        return Ok(false);
    }
    // unseen by the block, so not locked by it: wait, as a unique index would, for
    // another transaction deleting it (gone once that commits, there if it rolls back)
    let mut conn = match tokio::time::timeout(Duration::from_secs(5), engine.pool(shard).get()).await {
        Ok(Ok(c)) => c,
        _ => return Err(ExecError::Proxy(sqlstate::CANNOT_CONNECT_NOW, format!("shard db_{shard} cannot be reached to check {} {value}; retry", m.column))),
    };
    locked_row_exists(&mut conn, rule, m, value, month, || lost(shard)).await
}

/// Whether the row with `value` is in `month`'s table, read on a pool
/// connection with FOR KEY SHARE, which waits (at most [`LOCK_WAIT_MS`]), as
/// one table's unique index would, for a transaction deleting or updating
/// it: gone once that commits, still there if it rolls back. `lost`: the
/// error when the connection fails.
async fn locked_row_exists(
    conn: &mut crate::backend::ServerConn,
    rule: &TableRule,
    m: &Meta,
    value: &str,
    month: MonthKey,
    lost: impl Fn() -> ExecError,
) -> Result<bool, ExecError> {
    if !matches!(wire::control(conn, LOCK_WAIT_BEGIN).await, Ok(Ok(_))) {
        conn.broken = true;
        return Err(lost());
    }
    let q = format!("SELECT 1 FROM {} WHERE {} = $1 FOR KEY SHARE", rule.physical(month), m.column);
    let r = wire::query(conn, &q, &[Some(value)]).await;
    wire::rollback(conn).await;
    match r {
        Ok(Ok(r)) => Ok(!r.is_empty()),
        // the month table is not there: neither is the row
        Ok(Err(e)) if e.code == sqlstate::UNDEFINED_TABLE => Ok(false),
        Ok(Err(e)) if e.code == sqlstate::LOCK_NOT_AVAILABLE => Err(ExecError::Proxy(
            sqlstate::LOCK_NOT_AVAILABLE,
            format!("{} {value}: the order that held it is locked by another transaction (deleting it?) for longer than {LOCK_WAIT_MS} ms; retry", m.column),
        )),
        Ok(Err(e)) => Err(ExecError::Server(e)),
        Err(_) => {
            conn.broken = true;
            Err(lost())
        }
    }
}

/// The sharded table of an entry and the shard its shard key picks.
fn place<'e>(engine: &'e Engine, m: &Meta, shard_key: i64) -> Option<(&'e TableRule, usize)> {
    let topo = engine.topology();
    let rule = topo.tables.iter().find(|r| r.name == m.table)?;
    Some((rule, shardgate_router::keys::shard_of(shardgate_router::keys::MerchantId(shard_key), topo.shard_count).0 as usize))
}

/// A fallback row (written while its shard was down, not yet home) with value
/// `$1` for shard `$2`, month table `$3`.
fn fallback_query(rule: &TableRule, m: &Meta) -> String {
    format!(
        "SELECT 1 FROM {} WHERE {} = $1 AND target_db = $2 AND target_table = $3 AND sync_status <> 'SYNCED'",
        rule.fallback_table(),
        m.column
    )
}

/// Whether this transaction's own row with `value` still exists where its
/// entry says (a later statement of the transaction may have deleted it, or a
/// first attempt never reached the shard).
async fn own_row_exists(engine: &Engine, slots: &mut Slots, m: &Meta, value: &str, shard_key: i64, month: MonthKey) -> Result<bool, ExecError> {
    let Some((rule, shard)) = place(engine, m, shard_key) else { return Ok(true) };
    let fb = fallback_query(rule, m);
    let target_db = format!("db_{shard}");
    let table = rule.physical(month);
    let checks = [(engine.shards.len(), fb), (shard, format!("SELECT 1 FROM {table} WHERE {} = $1", m.column))];
    for (slot, q) in checks {
        let Some(held) = slots.get_mut(slot).and_then(Option::as_mut).filter(|h| h.in_tx) else { continue };
        let vals: Vec<Option<&str>> = if slot == shard { vec![Some(value)] } else { vec![Some(value), Some(&target_db), Some(&table)] };
        match wire::query(&mut held.conn, &q, &vals).await {
            Ok(Ok(r)) if !r.is_empty() => return Ok(true),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(e) => {
                held.conn.broken = true;
                return Err(lost_default(e));
            }
        }
    }
    Ok(false)
}

/// Whether the entry's row exists, read on the connections this transaction
/// holds when it holds the entry's shard (`None` when it does not): its own
/// DELETE of the row counts (a pooled connection would wait for it), and
/// FOR KEY SHARE waits for another transaction deleting it, within this
/// transaction and its own lock settings.
async fn held_row_exists(engine: &Engine, slots: &mut Slots, m: &Meta, value: &str, shard_key: i64, month: MonthKey) -> Result<Option<bool>, ExecError> {
    let Some((rule, shard)) = place(engine, m, shard_key) else { return Ok(None) };
    if !slots.get(shard).and_then(Option::as_ref).is_some_and(|s| s.in_tx && !s.conn.broken) {
        return Ok(None);
    }
    let fb = fallback_query(rule, m);
    let target_db = format!("db_{shard}");
    let table = rule.physical(month);
    let def = &mut slots[engine.shards.len()].as_mut().expect("the caller holds the db_default slot").conn;
    match wire::query(def, &fb, &[Some(value), Some(&target_db), Some(&table)]).await {
        Ok(Ok(r)) if !r.is_empty() => return Ok(Some(true)),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(ExecError::Server(e)),
        Err(e) => {
            def.broken = true;
            return Err(lost_default(e));
        }
    }
    let held = &mut slots[shard].as_mut().expect("checked above").conn;
    // as in row_exists: a decided row may still be prepared there (invisible to FOR KEY SHARE)
    match wait_for_prepared(held, m, value, shard).await {
        Ok(()) => {}
        Err(Some(e)) => return Err(e),
        Err(None) => {
            held.broken = true;
            return Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, format!("lost the connection to shard db_{shard}")));
        }
    }
    // a month table an operator dropped holds no row: asked first, as an error here
    // (42P01) would abort the client's block
    let q = format!("SELECT 1 FROM {table} WHERE {} = $1 FOR KEY SHARE", m.column);
    let exists = wire::query(held, "SELECT 1 WHERE to_regclass($1) IS NOT NULL", &[Some(&table)]).await;
    let r = match exists {
        Ok(Ok(r)) if r.is_empty() => return Ok(Some(false)),
        Ok(Ok(_)) => wire::query(held, &q, &[Some(value)]).await,
        other => other,
    };
    match r {
        Ok(Ok(r)) => Ok(Some(!r.is_empty())),
        Ok(Err(e)) => Err(ExecError::Server(e)),
        Err(e) => {
            held.broken = true;
            tracing::warn!(shard, error = %e, "shard connection failed checking a unique value");
            Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, format!("lost the connection to shard db_{shard}")))
        }
    }
}

/// Waits (at most 5 s) until the two-phase commits in progress on a shard
/// when this is called have finished: one may be applying the row of an
/// entry whose decision is already committed (the row is invisible until its
/// COMMIT PREPARED). `Err(None)`: the shard could not be read.
async fn wait_for_prepared(conn: &mut crate::backend::ServerConn, m: &Meta, value: &str, shard: usize) -> Result<(), Option<ExecError>> {
    let prepared = "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE 'sg\\_%'";
    let before = match wire::query(conn, prepared, &[]).await {
        Ok(Ok(r)) => r.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect::<Vec<_>>(),
        _ => return Err(None),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    if !before.is_empty() {
        loop {
            let now: Vec<String> = match wire::query(conn, prepared, &[]).await {
                Ok(Ok(r)) => r.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect(),
                _ => return Err(None),
            };
            if !now.iter().any(|g| before.contains(g)) {
                break;
            }
            if Instant::now() > deadline {
                return Err(Some(ExecError::Proxy(
                    sqlstate::LOCK_NOT_AVAILABLE,
                    format!("{} {value}: a transaction on shard db_{shard} that may hold it is still being committed; retry shortly", m.column),
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// Whether a row with `value` exists in the shard and month an entry names
/// (its unsynced fallback rows included). Waits first for the two-phase
/// commits in progress on that shard: one may be applying the entry's row.
async fn row_exists(engine: &Engine, def: &mut crate::backend::ServerConn, m: &Meta, value: &str, shard_key: i64, month: MonthKey) -> Result<bool, ExecError> {
    let Some((rule, shard)) = place(engine, m, shard_key) else { return Ok(true) };
    let unknown = || {
        ExecError::Proxy(
            sqlstate::CANNOT_CONNECT_NOW,
            format!("{} {value} was used by an order on shard db_{shard}, which cannot be reached to check that the order still exists; retry when it is back", m.column),
        )
    };
    // rows written while the shard was down, not yet moved home (on the caller's
    // db_default connection: a small pool may have no other)
    let fb = fallback_query(rule, m);
    let target_db = format!("db_{shard}");
    match wire::query(def, &fb, &[Some(value), Some(&target_db), Some(&rule.physical(month))]).await {
        Ok(Ok(r)) if !r.is_empty() => return Ok(true),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(ExecError::Server(e)),
        Err(_) => {
            def.broken = true;
            return Err(unknown());
        }
    }
    let mut conn = match tokio::time::timeout(Duration::from_secs(5), engine.pool(shard).get()).await {
        Ok(Ok(c)) => c,
        _ => return Err(unknown()),
    };
    wait_for_prepared(&mut conn, m, value, shard).await.map_err(|e| e.unwrap_or_else(unknown))?;
    // (the wait is bounded: the deleter may itself wait for this entry)
    locked_row_exists(&mut conn, rule, m, value, month, unknown).await
}

/// How long an INSERT waits for a transaction that holds the row of a taken value.
const LOCK_WAIT_MS: u64 = 5000;
const LOCK_WAIT_BEGIN: &str = "BEGIN; SET LOCAL lock_timeout = 5000";

/// Looks up `probes` (from
/// [`shardgate_router::Analysis::lookup_probes`]) for routing a read or write.
/// A failure only means no narrowing: the statement then goes everywhere.
///
/// Inside a transaction that holds the `db_default` slot the lookup runs there
/// (it sees the transaction's own entries, in its snapshot); else on a pool
/// connection.
pub async fn resolve(engine: &Engine, slots: &mut Slots, probes: &[shardgate_router::Probe]) -> Vec<Resolved> {
    let Ok(meta) = engine.lookups.meta(engine).await else { return Vec::new() };
    let mut pooled;
    let conn = match slots.get_mut(engine.shards.len()).and_then(Option::as_mut) {
        Some(slot) if !slot.conn.broken => &mut slot.conn,
        _ => {
            let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), engine.default.get()).await else { return Vec::new() };
            pooled = c;
            &mut *pooled
        }
    };
    let mut out = Vec::with_capacity(probes.len());
    for shardgate_router::Probe { table, column, value, .. } in probes {
        let Some(m) = find(meta, table, column) else { continue };
        if !m.complete.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        let q = format!("SELECT shard_key, month FROM {} WHERE value = $1", m.lookup_table);
        let at = match wire::query(conn, &q, &[Some(value)]).await {
            Ok(Ok(rows)) => rows.into_iter().next().and_then(|r| {
                let k = r.first()?.as_deref()?.parse::<i64>().ok()?;
                let mo = MonthKey::parse_suffix(r.get(1)?.as_deref()?)?;
                Some((k, mo))
            }),
            // a value the column type rejects: no entry (the statement will say why)
            Ok(Err(_)) => None,
            Err(_) => {
                conn.broken = true;
                return out;
            }
        };
        if let Some(at) = at {
            engine.lookups.remember(table, column, value, at);
        }
        out.push(Resolved { table: table.clone(), column: column.clone(), value: value.clone(), at });
    }
    out
}

pub use super::lookup_fill::fill;
