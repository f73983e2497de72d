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
//! DELETE leaves the entry behind (it does not know the values it removes),
//! so an entry can outlive its row. An INSERT whose value has an entry
//! therefore checks that entry's row: if the row is gone the INSERT takes the
//! entry over (the entry stays locked until it commits), else it gets `23505`.
//! The check first waits for two-phase commits in progress on that shard, so
//! a row whose decision is made but not yet applied there counts as present.
//!
//! Reads: a WHERE that pins the column to values (`= v`, `IN (…)`) is routed
//! by their entries; a value without an entry (rows written before the lookup
//! existed) narrows nothing.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardgate_router::month::MonthKey;
use shardgate_router::{LookupRow, Resolved, TableRule};

use super::exec::{ExecError, Slots};
use super::wire;
use super::Engine;

/// One unique-lookup column, as prepared in `db_default`.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Sharded table.
    pub table: String,
    /// Unique column.
    pub column: String,
    /// `shardgate_lookup_<table>_<column>`.
    pub lookup_table: String,
    /// The name one table's unique index would report in `23505`.
    pub constraint: String,
}

/// The lookup tables, made on first need (`db_default` may be down at start).
#[derive(Default)]
pub struct Lookups {
    meta: tokio::sync::OnceCell<Vec<Meta>>,
}

fn not_ready(e: impl std::fmt::Display) -> ExecError {
    tracing::warn!(error = %e, "unique lookup tables not ready");
    ExecError::Proxy("57P03", "the unique-lookup tables in db_default are not ready (is db_default up?); retry shortly".into())
}

impl Lookups {
    /// The prepared lookup columns (creates the tables on first call).
    pub async fn meta(&self, engine: &Engine) -> Result<&[Meta], ExecError> {
        self.meta.get_or_try_init(|| prepare(engine)).await.map(Vec::as_slice).map_err(not_ready)
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
            let ddl = format!("CREATE TABLE IF NOT EXISTS {lookup_table} (value {ty} PRIMARY KEY, shard_key bigint NOT NULL, month text NOT NULL)");
            match wire::control(&mut conn, &ddl).await? {
                Ok(_) => {}
                // two proxies creating it at once
                Err(e) if e.code == "23505" || e.code == "42P07" => {}
                Err(e) => anyhow::bail!("creating {lookup_table}: SQLSTATE {}", e.code),
            }
            out.push(Meta { table: rule.name.clone(), column: column.clone(), lookup_table, constraint });
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
            (b'C', "23505".to_string()),
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
    ExecError::Server(wire::ServerError { raw, code: "23505".into() })
}

fn lost_default(e: impl std::fmt::Display) -> ExecError {
    tracing::warn!(error = %e, "db_default lost while recording unique values");
    ExecError::Proxy("08006", "lost the connection to db_default while recording unique values; the statement was not applied".into())
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
            Ok(Ok(r)) if !r.is_empty() => continue,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(e) => {
                conn.broken = true;
                return Err(lost_default(e));
            }
        }
        // taken: by this transaction, by a live row, or by a row deleted since
        let q = format!("SELECT shard_key, month, xmin = pg_current_xact_id()::xid FROM {} WHERE value = $1 FOR UPDATE", m.lookup_table);
        let held = match wire::query(conn, &q, &[Some(row.value.as_str())]).await {
            Ok(Ok(r)) => r.into_iter().next(),
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(e) => {
                conn.broken = true;
                return Err(lost_default(e));
            }
        };
        let Some([Some(k), Some(mo), Some(mine)]) = held.as_deref().map(|r| [r[0].clone(), r[1].clone(), r[2].clone()]) else {
            return Err(ExecError::Proxy("40001", "could not serialize access: a unique value changed hands concurrently; retry the transaction".into()));
        };
        let (Ok(k), Some(mo)) = (k.parse::<i64>(), MonthKey::parse_suffix(&mo)) else {
            return Err(ExecError::Proxy("XX000", format!("unreadable entry in {}", m.lookup_table)));
        };
        let exists = if mine == "t" {
            // written earlier in this transaction: its row, if still there, is on a
            // connection this transaction holds (the shard's, or db_default's fallback rows)
            own_row_exists(engine, slots, m, &row.value, k, mo).await?
        } else {
            let conn = &mut slots[slot_no].as_mut().expect("held").conn;
            row_exists(engine, conn, m, &row.value, k, mo).await?
        };
        if exists {
            return Err(duplicate(m, &row.value));
        }
        // the entry's row is gone: the value is free, this row takes the entry
        let conn = &mut slots[slot_no].as_mut().expect("held").conn;
        let u = format!("UPDATE {} SET shard_key = $2, month = $3 WHERE value = $1", m.lookup_table);
        match wire::query(conn, &u, &vals).await {
            Ok(Ok(_)) => tracing::debug!(table, column = %m.column, "took over the lookup entry of a deleted row"),
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(e) => {
                conn.broken = true;
                return Err(lost_default(e));
            }
        }
    }
    Ok(())
}

/// Whether this transaction's own row with `value` still exists where its
/// entry says (a later statement of the transaction may have deleted it, or a
/// first attempt never reached the shard).
async fn own_row_exists(engine: &Engine, slots: &mut Slots, m: &Meta, value: &str, shard_key: i64, month: MonthKey) -> Result<bool, ExecError> {
    let topo = engine.topology();
    let Some(rule) = topo.tables.iter().find(|r| r.name == m.table) else { return Ok(true) };
    let shard = shardgate_router::keys::shard_of(shardgate_router::keys::MerchantId(shard_key), topo.shard_count).0 as usize;
    let fb = format!(
        "SELECT 1 FROM {} WHERE {} = $1 AND target_db = $2 AND target_table = $3 AND sync_status <> 'SYNCED'",
        rule.fallback_table(),
        m.column
    );
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

/// Whether a row with `value` exists in the shard and month an entry names
/// (its unsynced fallback rows included). Waits first for the two-phase
/// commits in progress on that shard: one may be applying the entry's row.
async fn row_exists(engine: &Engine, def: &mut crate::backend::ServerConn, m: &Meta, value: &str, shard_key: i64, month: MonthKey) -> Result<bool, ExecError> {
    let topo = engine.topology();
    let Some(rule) = topo.tables.iter().find(|r| r.name == m.table) else { return Ok(true) };
    let shard = shardgate_router::keys::shard_of(shardgate_router::keys::MerchantId(shard_key), topo.shard_count).0 as usize;
    let unknown = || {
        ExecError::Proxy(
            "57P03",
            format!("{} {value} was used by an order on shard db_{shard}, which cannot be reached to check that the order still exists; retry when it is back", m.column),
        )
    };
    // rows written while the shard was down, not yet moved home (on the caller's
    // db_default connection: a small pool may have no other)
    let fb = format!(
        "SELECT 1 FROM {} WHERE {} = $1 AND target_db = $2 AND target_table = $3 AND sync_status <> 'SYNCED'",
        rule.fallback_table(),
        m.column
    );
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
    let prepared = "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE 'sg\\_%'";
    let before = match wire::query(&mut conn, prepared, &[]).await {
        Ok(Ok(r)) => r.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect::<Vec<_>>(),
        _ => return Err(unknown()),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    if !before.is_empty() {
        loop {
            let now: Vec<String> = match wire::query(&mut conn, prepared, &[]).await {
                Ok(Ok(r)) => r.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect(),
                _ => return Err(unknown()),
            };
            if !now.iter().any(|g| before.contains(g)) {
                break;
            }
            if Instant::now() > deadline {
                return Err(ExecError::Proxy(
                    "55P03",
                    format!("{} {value}: a transaction on shard db_{shard} that may hold it is still being committed; retry shortly", m.column),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let q = format!("SELECT 1 FROM {} WHERE {} = $1", rule.physical(month), m.column);
    match wire::query(&mut conn, &q, &[Some(value)]).await {
        Ok(Ok(r)) => Ok(!r.is_empty()),
        // the month table is not there: neither is the row
        Ok(Err(e)) if e.code == "42P01" => Ok(false),
        Ok(Err(e)) => Err(ExecError::Server(e)),
        Err(_) => {
            conn.broken = true;
            Err(unknown())
        }
    }
}

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
        out.push(Resolved { table: table.clone(), column: column.clone(), value: value.clone(), at });
    }
    out
}
