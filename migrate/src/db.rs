//! Connections to the three kinds of database, the column list both stores
//! share, and binary COPY tuples (split per shard and month without decoding
//! any other column).

use anyhow::{anyhow, bail, Context as _};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use jiff::tz::TimeZone;
use shardgate_config::{Config, Dsn, SslMode};
use shardgate_router::month::MonthKey;
use shardgate_router::{TableRule, Topology};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Opens one connection with the settings every comparison relies on
/// (UTC text timestamps, ISO dates, shortest exact floats).
pub async fn connect(dsn: &Dsn, what: &str) -> anyhow::Result<Client> {
    let client = open(dsn, "shardgate-migrate").await.with_context(|| format!("connecting to {what} ({dsn:?})"))?;
    client
        .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 1; SET statement_timeout = 0")
        .await
        .with_context(|| format!("setting up the session on {what}"))?;
    Ok(client)
}

/// Creates a month table on one shard (idempotent). The proxy may be creating
/// the same table at that moment (a month it saw on some shards and not on
/// others): PostgreSQL then fails one of two concurrent `CREATE TABLE IF NOT
/// EXISTS` with 23505 or 42P07, and once the other has committed the
/// statement goes through.
pub async fn create_month_table(c: &Client, rule: &TableRule, m: MonthKey, shard: usize) -> anyhow::Result<()> {
    let sql = rule.create_month_table_sql(m);
    let mut tries = 0;
    loop {
        match c.batch_execute(&sql).await {
            Ok(()) => return Ok(()),
            // a concurrent CREATE TABLE IF NOT EXISTS (the proxy filling the month): 23505 on
            // pg_type while it is in progress, 42710 "type … already exists" or 42P07 once it
            // committed between this one's check and its own create
            Err(e) if tries < 5 && e.code().is_some_and(|s| [SqlState::UNIQUE_VIOLATION, SqlState::DUPLICATE_TABLE, SqlState::DUPLICATE_OBJECT].contains(s)) => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50 * tries)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("creating {} on db_{shard}", rule.physical(m))),
        }
    }
}

/// Opens a tokio-postgres connection (TLS as the DSN's `sslmode` says, with
/// rustls) and drives it in the background. Connect, TLS handshake and
/// startup together are bounded by 10 s (`connect_timeout` covers only TCP).
pub async fn open(dsn: &Dsn, application_name: &str) -> anyhow::Result<Client> {
    tokio::time::timeout(std::time::Duration::from_secs(10), open_inner(dsn, application_name))
        .await
        .map_err(|_| anyhow!("timed out connecting (TCP, TLS and startup took over 10 s)"))?
}

async fn open_inner(dsn: &Dsn, application_name: &str) -> anyhow::Result<Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&dsn.host).port(dsn.port).user(&dsn.user).dbname(&dsn.dbname).application_name(application_name);
    cfg.connect_timeout(std::time::Duration::from_secs(5));
    if let Some(p) = &dsn.password {
        cfg.password(p);
    }
    if dsn.sslmode == SslMode::Disable {
        let (client, conn) = cfg.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(client);
    }
    cfg.ssl_mode(if dsn.sslmode == SslMode::Prefer { tokio_postgres::config::SslMode::Prefer } else { tokio_postgres::config::SslMode::Require });
    let tls = shardgate_config::tls::client_config(dsn.sslmode, dsn.sslrootcert.as_deref()).map_err(|e| anyhow!(e))?;
    let (client, conn) = cfg.connect(tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone())).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The table being migrated and where it lives.
#[derive(Clone)]
pub struct Layout {
    /// The sharded-table rule (the first in the config).
    pub rule: TableRule,
    /// Zone that cuts months.
    pub tz: TimeZone,
    /// Its IANA name, for SQL.
    pub tz_name: String,
    /// Shard count.
    pub shard_count: usize,
    /// Columns both stores have, quoted, in legacy order.
    pub cols: Vec<String>,
    /// Position of the shard key in `cols`.
    pub key_pos: usize,
    /// Position of the month column.
    pub time_pos: usize,
    /// Position of the id column.
    pub id_pos: usize,
}

impl Layout {
    /// `a, b, c`.
    pub fn col_list(&self) -> String {
        self.cols.join(", ")
    }

    /// SQL for the shard of a row (`merchant_id` mod shard count, never negative).
    pub fn shard_expr(&self) -> String {
        let n = self.shard_count;
        format!("((({k} % {n}) + {n}) % {n})", k = self.rule.shard_key)
    }

    /// SQL for the `yyyyMM` of a row.
    pub fn month_expr(&self) -> String {
        format!("to_char({} AT TIME ZONE '{}', 'YYYYMM')", self.rule.month_column, self.tz_name.replace('\'', "''"))
    }

    /// SQL for a row's checksum (the same text on every PostgreSQL with these session settings).
    pub fn hash_expr(&self) -> String {
        format!("hashtextextended(ROW({})::text, 0)", self.col_list())
    }

    /// `create_time >= 'start' AND create_time < 'end'` for one month.
    pub fn month_range(&self, m: MonthKey) -> String {
        let next = MonthKey::from_ordinal(m.ordinal() + 1).unwrap_or(m);
        let (a, b) = (m.start(&self.tz), next.start(&self.tz));
        match (a, b) {
            (Some(a), Some(b)) => format!("{c} >= '{a}' AND {c} < '{b}'", c = self.rule.month_column),
            _ => "false".into(),
        }
    }

    /// Shard of a merchant.
    pub fn shard_of(&self, merchant: i64) -> usize {
        merchant.rem_euclid(self.shard_count as i64) as usize
    }
}

/// Connections to legacy, every shard and `db_default`.
pub struct Stores {
    /// The legacy store.
    pub legacy: Client,
    /// `db_0`.. in order.
    pub shards: Vec<Client>,
    /// `db_default` (control tables).
    pub default: Client,
    /// What is migrated.
    pub layout: Layout,
    /// DSNs, to open more connections.
    pub legacy_dsn: Dsn,
    /// Shard DSNs.
    pub shard_dsns: Vec<Dsn>,
}

/// The legacy DSN, or a clear error.
pub fn legacy_dsn(config: &Config) -> anyhow::Result<Dsn> {
    let l = config.legacy_db.as_ref().ok_or_else(|| anyhow!("legacy_db is not set in the config: add [legacy_db] dsn = \"postgres://…\""))?;
    Dsn::parse(&l.dsn).map_err(|e| anyhow!("legacy_db.dsn: {e}"))
}

impl Stores {
    /// Connects to everything and reads the column list from legacy.
    pub async fn open(config: &Config) -> anyhow::Result<Stores> {
        let topo = Topology::from_config(config).map_err(|e| anyhow!(e))?;
        let rule = topo.tables.first().cloned().ok_or_else(|| anyhow!("no sharded table in the config"))?;
        let legacy_dsn = legacy_dsn(config)?;
        let legacy = connect(&legacy_dsn, "legacy_db").await?;
        let default = connect(&config.default_dsn(), "default_db").await?;
        let shard_dsns = config.shard_dsns();
        let mut shards = Vec::with_capacity(shard_dsns.len());
        for (i, d) in shard_dsns.iter().enumerate() {
            shards.push(connect(d, &format!("shard db_{i}")).await?);
        }
        let cols = columns(&legacy, &rule.name).await?;
        if cols.is_empty() {
            bail!("legacy_db has no table {}", rule.name);
        }
        let find = |c: &str| cols.iter().position(|x| x.trim_matches('"') == c).ok_or_else(|| anyhow!("legacy {} has no column {c}", rule.name));
        let layout = Layout {
            key_pos: find(&rule.shard_key)?,
            time_pos: find(&rule.month_column)?,
            id_pos: find(&rule.id_column)?,
            tz_name: config.sharding.time_zone.clone(),
            tz: topo.tz.clone(),
            shard_count: shards.len(),
            cols,
            rule,
        };
        Ok(Stores { legacy, shards, default, layout, legacy_dsn, shard_dsns })
    }

    /// Another connection to legacy.
    pub async fn legacy_conn(&self) -> anyhow::Result<Client> {
        connect(&self.legacy_dsn, "legacy_db").await
    }

    /// Another connection to a shard.
    pub async fn shard_conn(&self, shard: usize) -> anyhow::Result<Client> {
        connect(&self.shard_dsns[shard], &format!("shard db_{shard}")).await
    }
}

/// Quoted column names of `table`, in order (empty when it does not exist).
pub async fn columns(c: &Client, table: &str) -> anyhow::Result<Vec<String>> {
    let rows = c
        .query(
            "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Month tables of `rule` on one shard.
pub async fn month_tables(c: &Client, rule: &TableRule) -> anyhow::Result<Vec<MonthKey>> {
    let (prefix, suffix) = rule.pattern.split_once("{yyyyMM}").unwrap_or((&rule.pattern, ""));
    let rows = c
        .query(
            "SELECT relname::text FROM pg_class WHERE relkind IN ('r', 'p') AND relnamespace = 'public'::regnamespace \
             AND starts_with(relname::text, $1) AND right(relname::text, length($2)) = $2 AND length(relname::text) = length($1) + 6 + length($2)",
            &[&prefix, &suffix],
        )
        .await?;
    let mut out: Vec<MonthKey> = rows
        .iter()
        .filter_map(|r| {
            let n: String = r.get(0);
            MonthKey::parse_suffix(&n[prefix.len()..n.len() - suffix.len()])
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Binary COPY header.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// One row in binary COPY form (field count, then length-prefixed fields).
#[derive(Clone)]
pub struct Tuple(pub Bytes);

impl Tuple {
    /// Field `i` (`None` = NULL).
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        let b = &self.0[..];
        let mut at = 2;
        for k in 0.. {
            let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            if k == i {
                return if len < 0 { None } else { b.get(at..at + len as usize) };
            }
            at += len.max(0) as usize;
        }
        None
    }

    /// An integer field (int2/int4/int8).
    pub fn int(&self, i: usize) -> Option<i64> {
        let f = self.field(i)?;
        Some(match f.len() {
            8 => i64::from_be_bytes(f.try_into().ok()?),
            4 => i64::from(i32::from_be_bytes(f.try_into().ok()?)),
            2 => i64::from(i16::from_be_bytes(f.try_into().ok()?)),
            _ => return None,
        })
    }

    /// A timestamptz field's month.
    pub fn month(&self, i: usize, tz: &TimeZone) -> Option<MonthKey> {
        let f = self.field(i)?;
        let micros = i64::from_be_bytes(f.try_into().ok()?);
        // binary timestamps count from 2000-01-01 UTC
        let ts = jiff::Timestamp::from_microsecond(micros.checked_add(946_684_800_000_000)?).ok()?;
        Some(MonthKey::of(ts, tz))
    }
}

/// Runs `body` in a transaction opened with `begin` (`BEGIN`, maybe followed by
/// `SET LOCAL …`): COMMIT when it succeeds, ROLLBACK when it fails.
pub async fn in_transaction<T>(c: &Client, begin: &str, body: impl AsyncFnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    c.batch_execute(begin).await?;
    match body().await {
        Ok(v) => {
            c.batch_execute("COMMIT").await?;
            Ok(v)
        }
        Err(e) => {
            let _ = c.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Runs `COPY (query) TO STDOUT (FORMAT binary)` and returns its rows.
pub async fn copy_out(c: &Client, query: &str) -> anyhow::Result<Vec<Tuple>> {
    let stream = c.copy_out(&format!("COPY ({query}) TO STDOUT (FORMAT binary)")).await?;
    futures_util::pin_mut!(stream);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut header = false;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        if !header {
            if buf.len() < SIGNATURE.len() + 8 {
                continue;
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                bail!("not a binary COPY stream");
            }
            let ext = u32::from_be_bytes(buf[SIGNATURE.len() + 4..SIGNATURE.len() + 8].try_into()?) as usize;
            if buf.len() < SIGNATURE.len() + 8 + ext {
                continue;
            }
            buf.advance(SIGNATURE.len() + 8 + ext);
            header = true;
        }
        while let Some(n) = tuple_len(&buf) {
            if n == 0 {
                buf.clear();
                break;
            }
            out.push(Tuple(buf.split_to(n).freeze()));
        }
    }
    Ok(out)
}

/// Length of the complete tuple at the start of `b` (0 = the trailer), or `None` if incomplete.
fn tuple_len(b: &[u8]) -> Option<usize> {
    let n = i16::from_be_bytes(b.get(0..2)?.try_into().ok()?);
    if n < 0 {
        return Some(0);
    }
    let mut at = 2;
    for _ in 0..n {
        let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4 + len.max(0) as usize;
        if at > b.len() {
            return None;
        }
    }
    Some(at)
}

/// Loads `tuples` into the temp table `sg_load` (made like `like`) on `c`;
/// the caller's transaction decides when it empties.
pub async fn copy_in(c: &Client, like: &str, cols: &str, tuples: &[Tuple]) -> anyhow::Result<()> {
    c.batch_execute(&format!("CREATE TEMP TABLE IF NOT EXISTS sg_load (LIKE {like} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS; TRUNCATE sg_load"))
        .await
        .context("creating the load table")?;
    let sink = c.copy_in(&format!("COPY sg_load ({cols}) FROM STDIN (FORMAT binary)")).await?;
    futures_util::pin_mut!(sink);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    buf.extend_from_slice(SIGNATURE);
    buf.extend_from_slice(&[0; 8]);
    for t in tuples {
        buf.extend_from_slice(&t.0);
        if buf.len() >= 256 * 1024 {
            sink.send(buf.split().freeze()).await?;
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    sink.send(buf.freeze()).await?;
    sink.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                None => v.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(b) => {
                    v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    v.extend_from_slice(b);
                }
            }
        }
        v
    }

    #[test]
    fn tuples_are_split_and_read() {
        let id = 42i64.to_be_bytes();
        // 2024-02-10T00:00:00Z in microseconds since 2000-01-01
        let ts = ((1_707_523_200i64 - 946_684_800) * 1_000_000).to_be_bytes();
        let t = tuple(&[Some(&id), None, Some(b"abc"), Some(&ts), Some(&7i32.to_be_bytes())]);
        assert_eq!(tuple_len(&t), Some(t.len()));
        assert_eq!(tuple_len(&t[..t.len() - 1]), None);
        assert_eq!(tuple_len(&(-1i16).to_be_bytes()), Some(0));
        let t = Tuple(Bytes::from(t));
        assert_eq!(t.int(0), Some(42));
        assert_eq!(t.field(1), None);
        assert_eq!(t.field(2), Some(&b"abc"[..]));
        assert_eq!(t.month(3, &TimeZone::UTC).map(|m| m.suffix()), Some("202402".into()));
        assert_eq!(t.int(4), Some(7));
        assert_eq!(t.field(9), None);
    }
}
