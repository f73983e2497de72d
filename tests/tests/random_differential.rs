//! Randomized differential test: statements generated from a seed
//! (`shardgate_tests::gen`) run on one plain PostgreSQL table (database
//! `reference` on the main cluster) and through shardgate, with the simple
//! protocol and with the extended protocol (bind parameters where the
//! generator chose them). Compared: column names, column type oids
//! (extended), rows (sorted unless the statement orders by … id), row counts of
//! the command tag, and SQLSTATEs. Each INSERT/UPDATE/DELETE runs on shardgate
//! first and is followed by a whole-table comparison.
//!
//! Per statement: `same`; `refused` (shardgate answered 0A000 with a message
//! while the reference succeeded — allowed); `wrong` (anything else different).
//!
//! Environment:
//! - `SHARDGATE_SEED` — the seed (default 20261129);
//! - `SHARDGATE_STATEMENTS` — statements per protocol (default 1500);
//! - `SHARDGATE_SOAK_SECONDS` — soak: random seeds until the time is up (`make soak`);
//! - `SHARDGATE_PROTOCOLS` — `simple`, `extended` or both (default `simple,extended`);
//! - `SHARDGATE_VERBOSE=1` — print every statement and its classification;
//! - `SHARDGATE_STATEMENT_TIMEOUT_MS` — how long a statement may take (default 60000); on a
//!   timeout the report shows every server's sessions, waiting locks and the proxy's log;
//! - `SHARDGATE_SHOW_WRONG` — how many wrong answers the report shows in full (default 10);
//! - `SHARDGATE_SESSION_TZ` — run both sessions with this `TimeZone` (default: the server's, UTC,
//!   which is also shardgate's `sharding.time_zone`).
//!
//! Reproduce a reported statement: run with its seed (and the protocol); the
//! statement index in the report is the generator's index for that seed.
//! `cargo test -p shardgate-tests --test random_differential print_statements -- --ignored --nocapture`
//! prints the statements of `SHARDGATE_SEED` without a database.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::TryStreamExt;
use postgres_types::{to_sql_checked, IsNull, ToSql, Type};
use shardgate_tests::gen::{format_pg_micros, Gen, Kind, Param, Stmt};
use shardgate_tests::{connect, month_tables, raw, Cluster, Options, Raw};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, SimpleQueryMessage};

const DEFAULT_SEED: u64 = 20_261_129;
const DEFAULT_STATEMENTS: usize = 1500;
const INITIAL_ROWS: usize = 300;
/// How long a statement may take before it counts as not answered
/// (`SHARDGATE_STATEMENT_TIMEOUT_MS`, default 60 s).
fn statement_timeout() -> Duration {
    Duration::from_millis(env_u64("SHARDGATE_STATEMENT_TIMEOUT_MS").unwrap_or(60_000))
}

// ---------------------------------------------------------------- outcomes

/// What one statement answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok {
        cols: Vec<String>,
        /// Column type oids (extended protocol only).
        types: Vec<u32>,
        /// Text (simple) or binary (extended) values.
        rows: Vec<Vec<Option<Vec<u8>>>>,
        /// The count of the command tag.
        affected: Option<u64>,
    },
    Err {
        code: String,
        msg: String,
    },
}

impl Outcome {
    fn is_refusal(&self) -> bool {
        matches!(self, Outcome::Err { code, .. } if code == "0A000")
    }
    fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }
}

/// Equal answers: everything for results, the SQLSTATE for errors.
fn same(a: &Outcome, b: &Outcome) -> bool {
    match (a, b) {
        (Outcome::Err { code: x, .. }, Outcome::Err { code: y, .. }) => x == y,
        _ => a == b,
    }
}

fn err_outcome(e: &tokio_postgres::Error) -> Outcome {
    match e.as_db_error() {
        Some(db) => Outcome::Err { code: db.code().code().to_string(), msg: db.message().to_string() },
        None => Outcome::Err { code: "client".into(), msg: e.to_string() },
    }
}

/// Binary timestamptz parameter (microseconds since 2000-01-01 UTC).
#[derive(Debug)]
struct TsParam(i64);

impl ToSql for TsParam {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_i64(self.0);
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
    to_sql_checked!();
}

fn bind_values(params: &[Param]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    params
        .iter()
        .map(|p| -> Box<dyn ToSql + Sync + Send> {
            match p {
                Param::Int(i) => Box::new(*i),
                Param::Text(t) => Box::new(t.clone()),
                Param::Ts(us) => Box::new(TsParam(*us)),
                Param::IntArray(v) => Box::new(v.clone()),
            }
        })
        .collect()
}

async fn run_simple(client: &Client, sql: &str, ordered: bool) -> Outcome {
    match client.simple_query(sql).await {
        Err(e) => err_outcome(&e),
        Ok(msgs) => {
            let mut cols = Vec::new();
            let mut rows = Vec::new();
            let mut affected = None;
            for m in msgs {
                match m {
                    SimpleQueryMessage::RowDescription(d) => cols = d.iter().map(|c| c.name().to_string()).collect(),
                    SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).map(|v| v.as_bytes().to_vec())).collect()),
                    SimpleQueryMessage::CommandComplete(n) => affected = Some(n),
                    _ => {}
                }
            }
            if !ordered {
                rows.sort();
            }
            Outcome::Ok { cols, types: Vec::new(), rows, affected }
        }
    }
}

async fn run_extended(client: &Client, sql: &str, params: &[Param], ordered: bool) -> Outcome {
    let stmt = match client.prepare(sql).await {
        Ok(s) => s,
        Err(e) => return err_outcome(&e),
    };
    let cols: Vec<String> = stmt.columns().iter().map(|c| c.name().to_string()).collect();
    let types: Vec<u32> = stmt.columns().iter().map(|c| c.type_().oid()).collect();
    let owned = bind_values(params);
    let refs: Vec<&(dyn ToSql + Sync)> = owned.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect();
    let stream = match client.query_raw(&stmt, refs.iter().map(|p| *p as &dyn ToSql)).await {
        Ok(s) => s,
        Err(e) => return err_outcome(&e),
    };
    futures_util::pin_mut!(stream);
    let mut rows = Vec::new();
    loop {
        match stream.try_next().await {
            Ok(Some(row)) => rows.push((0..row.len()).map(|i| row.get::<_, Raw>(i).0).collect::<Vec<_>>()),
            Ok(None) => break,
            Err(e) => return err_outcome(&e),
        }
    }
    let affected = stream.rows_affected();
    if !ordered {
        rows.sort();
    }
    Outcome::Ok { cols, types, rows, affected }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Simple,
    Extended,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
        }
    }
}

/// Runs one statement (with a time limit).
async fn exec(client: &Client, proto: Protocol, sql: &str, params: &[Param], ordered: bool) -> Outcome {
    let fut = async {
        match proto {
            Protocol::Simple => run_simple(client, sql, ordered).await,
            Protocol::Extended => run_extended(client, sql, params, ordered).await,
        }
    };
    let limit = statement_timeout();
    match tokio::time::timeout(limit, fut).await {
        Ok(o) => o,
        Err(_) => Outcome::Err { code: "timeout".into(), msg: format!("no answer within {limit:?}") },
    }
}

// ---------------------------------------------------------------- display

fn be_i64(b: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(b.try_into().ok()?))
}

/// Binary numeric → text.
fn numeric_text(b: &[u8]) -> Option<String> {
    let rd = |i: usize| -> Option<i64> { Some(i64::from(i16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))) };
    let ndigits = rd(0)? as usize;
    let weight = rd(2)?;
    let sign = u16::from_be_bytes([*b.get(4)?, *b.get(5)?]);
    let dscale = u16::from_be_bytes([*b.get(6)?, *b.get(7)?]) as usize;
    if sign == 0xC000 {
        return Some("NaN".into());
    }
    let digit = |i: i64| -> i64 {
        if i < 0 || i as usize >= ndigits {
            0
        } else {
            rd(8 + 2 * i as usize).unwrap_or(0)
        }
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for i in 0..=weight {
            if i == 0 {
                s.push_str(&digit(i).to_string());
            } else {
                s.push_str(&format!("{:04}", digit(i)));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut i = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(i)));
            i += 1;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Some(s)
}

fn show_value(v: &Option<Vec<u8>>, oid: Option<u32>) -> String {
    let Some(b) = v else { return "NULL".into() };
    let decoded = match oid {
        None => Some(String::from_utf8_lossy(b).into_owned()),
        Some(20) => be_i64(b).map(|i| i.to_string()),
        Some(23) => b.as_slice().try_into().ok().map(|a: [u8; 4]| i32::from_be_bytes(a).to_string()),
        Some(21) => b.as_slice().try_into().ok().map(|a: [u8; 2]| i16::from_be_bytes(a).to_string()),
        Some(16) => b.first().map(|x| if *x != 0 { "t".to_string() } else { "f".to_string() }),
        Some(25) | Some(1043) | Some(19) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(1184) | Some(1114) => be_i64(b).map(format_pg_micros),
        Some(1700) => numeric_text(b),
        Some(701) => b.as_slice().try_into().ok().map(|a: [u8; 8]| f64::from_be_bytes(a).to_string()),
        _ => None,
    };
    decoded.unwrap_or_else(|| format!("\\x{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()))
}

fn show_row(row: &[Option<Vec<u8>>], types: &[u32]) -> String {
    let vals: Vec<String> = row.iter().enumerate().map(|(i, v)| show_value(v, types.get(i).copied())).collect();
    format!("({})", vals.join(", "))
}

/// An outcome, in full or (large row sets) summarized.
fn show(o: &Outcome, limit: usize) -> String {
    match o {
        Outcome::Err { code, msg } => format!("ERROR {code}: {msg}"),
        Outcome::Ok { cols, types, rows, affected } => {
            let mut s = format!("cols [{}]", cols.join(", "));
            if !types.is_empty() {
                s.push_str(&format!(" types {types:?}"));
            }
            s.push_str(&format!(" tag {} rows {}", affected.map_or("-".to_string(), |n| n.to_string()), rows.len()));
            for r in rows.iter().take(limit) {
                s.push_str(&format!("\n        {}", show_row(r, types)));
            }
            if rows.len() > limit {
                s.push_str(&format!("\n        … {} more", rows.len() - limit));
            }
            s
        }
    }
}

/// For two row sets: the rows only one side has (multiset difference), both ways.
fn row_diff(want: &Outcome, got: &Outcome) -> Option<String> {
    let (Outcome::Ok { rows: a, types, cols: ca, .. }, Outcome::Ok { rows: b, cols: cb, .. }) = (want, got) else { return None };
    if ca != cb {
        return None;
    }
    let mut count: BTreeMap<&Vec<Option<Vec<u8>>>, i64> = BTreeMap::new();
    for r in a {
        *count.entry(r).or_default() += 1;
    }
    for r in b {
        *count.entry(r).or_default() -= 1;
    }
    let only_ref: Vec<String> = count.iter().filter(|(_, n)| **n > 0).map(|(r, _)| show_row(r, types)).collect();
    let only_proxy: Vec<String> = count.iter().filter(|(_, n)| **n < 0).map(|(r, _)| show_row(r, types)).collect();
    let mut s = String::new();
    if only_ref.is_empty() && only_proxy.is_empty() {
        s.push_str("      same rows, different order or tag/types");
    }
    for (label, rows) in [("only in reference", only_ref), ("only through shardgate", only_proxy)] {
        if rows.is_empty() {
            continue;
        }
        s.push_str(&format!("      {label} ({}):", rows.len()));
        for r in rows.iter().take(10) {
            s.push_str(&format!("\n        {r}"));
        }
        if rows.len() > 10 {
            s.push_str(&format!("\n        … {} more", rows.len() - 10));
        }
        s.push('\n');
    }
    Some(s)
}

// ---------------------------------------------------------------- tally

#[derive(Debug, Clone)]
struct Wrong {
    seed: u64,
    proto: Protocol,
    index: String,
    shape: String,
    sql: String,
    params: Vec<Param>,
    reference: Outcome,
    proxy: Outcome,
}

#[derive(Debug, Default)]
struct Tally {
    same: usize,
    refused: usize,
    wrong: usize,
    /// shape → (same, refused, wrong)
    by_shape: BTreeMap<String, [usize; 3]>,
    /// refusal message → (count, an example statement)
    refusals: BTreeMap<String, (usize, String)>,
    wrongs: Vec<Wrong>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.same += other.same;
        self.refused += other.refused;
        self.wrong += other.wrong;
        for (k, v) in other.by_shape {
            let e = self.by_shape.entry(k).or_default();
            for i in 0..3 {
                e[i] += v[i];
            }
        }
        for (k, (n, ex)) in other.refusals {
            let e = self.refusals.entry(k).or_insert((0, ex));
            e.0 += n;
        }
        self.wrongs.extend(other.wrongs);
    }
    fn total(&self) -> usize {
        self.same + self.refused + self.wrong
    }
}

/// Shape without the bracketed id kind, for the per-shape table.
fn shape_class(shape: &str) -> String {
    shape.split(" [").next().unwrap_or(shape).to_string()
}

struct Pass<'a> {
    seed: u64,
    proto: Protocol,
    reference: Client,
    proxy: Client,
    /// db_0 .. db_7, to check where rows landed.
    shards: Vec<Client>,
    proxy_dsn: &'a str,
    reference_dsn: &'a str,
    /// For the diagnosis of a statement shardgate did not answer (its log).
    cluster: &'a Cluster,
    tally: Tally,
    verbose: bool,
    /// The reference could not be made equal to shardgate's table again: stop the pass.
    broken: bool,
}

impl Pass<'_> {
    /// Reconnects a client that the last statement left closed.
    async fn heal(&mut self) {
        if self.proxy.is_closed() {
            eprintln!("  (shardgate connection closed; reconnecting)");
            self.proxy = connect(self.proxy_dsn).await.expect("reconnect to shardgate");
        }
        if self.reference.is_closed() {
            self.reference = connect(self.reference_dsn).await.expect("reconnect to reference");
        }
    }

    /// Classifies and records one comparison.
    fn record(&mut self, index: String, shape: &str, sql: &str, params: &[Param], reference: &Outcome, proxy: &Outcome) {
        let class = if same(reference, proxy) {
            0
        } else if proxy.is_refusal() && reference.is_ok() && matches!(proxy, Outcome::Err { msg, .. } if !msg.trim().is_empty()) {
            1
        } else {
            2
        };
        match class {
            0 => self.tally.same += 1,
            1 => {
                self.tally.refused += 1;
                if let Outcome::Err { msg, .. } = proxy {
                    let e = self.tally.refusals.entry(format!("[{} {}] {msg}", self.proto.name(), shape_class(shape))).or_insert((0, sql.to_string()));
                    e.0 += 1;
                }
            }
            _ => {
                self.tally.wrong += 1;
                self.tally.wrongs.push(Wrong {
                    seed: self.seed,
                    proto: self.proto,
                    index: index.clone(),
                    shape: shape.to_string(),
                    sql: sql.to_string(),
                    params: params.to_vec(),
                    reference: reference.clone(),
                    proxy: proxy.clone(),
                });
            }
        }
        self.tally.by_shape.entry(shape_class(shape)).or_default()[class] += 1;
        if self.verbose {
            let label = ["same", "REFUSED", "WRONG"][class];
            println!("  [{} #{index}] {label} {shape}: {sql} {params:?}", self.proto.name());
            if class == 2 {
                println!("      reference: {}\n      shardgate: {}", show(reference, 5), show(proxy, 5));
            }
        }
    }

    /// When shardgate did not answer in time: what every server was doing then
    /// (sessions, ungranted locks, prepared transactions) and the proxy's log,
    /// so that a hang seen once (in CI) can be diagnosed from its report.
    async fn diagnose_timeout(&self, index: &str, got: &Outcome) {
        if !matches!(got, Outcome::Err { code, .. } if code == "timeout") {
            return;
        }
        println!("\n==== [{} #{index}] shardgate gave no answer within {:?}; the servers now:", self.proto.name(), statement_timeout());
        const ACTIVITY: &str = "SELECT datname, pid, coalesce(application_name, ''), coalesce(state, ''), coalesce(wait_event_type || '/' || wait_event, ''), \
             coalesce(extract(epoch FROM now() - query_start)::int::text, ''), coalesce(backend_xid::text, ''), left(coalesce(query, ''), 160) \
             FROM pg_stat_activity WHERE datname IS NOT NULL AND pid <> pg_backend_pid() ORDER BY datname, pid";
        const LOCKS: &str = "SELECT l.pid, l.locktype, l.mode, coalesce(l.relation::regclass::text, l.transactionid::text, ''), \
             array_to_string(pg_blocking_pids(l.pid), ',') FROM pg_locks l WHERE NOT l.granted";
        const PREPARED: &str = "SELECT database, gid, prepared::text FROM pg_prepared_xacts";
        let mut seen_clusters = std::collections::HashSet::new();
        let servers = std::iter::once(("reference (main)".to_string(), &self.reference)).chain(self.shards.iter().enumerate().map(|(i, c)| (format!("db_{i}"), c)));
        for (name, shard) in servers {
            // one query per cluster: pg_stat_activity and pg_locks are cluster-wide
            let Ok(port) = shard.simple_query("SHOW port").await else { continue };
            let port = port.iter().find_map(|m| if let SimpleQueryMessage::Row(r) = m { r.get(0).map(str::to_string) } else { None });
            if !seen_clusters.insert(port.clone()) {
                continue;
            }
            println!("  -- cluster of {name} (port {}):", port.unwrap_or_default());
            for (label, q) in [("session", ACTIVITY), ("waiting lock", LOCKS), ("prepared xact", PREPARED)] {
                match shard.simple_query(q).await {
                    Ok(rows) => {
                        for m in rows {
                            if let SimpleQueryMessage::Row(r) = m {
                                let cols: Vec<&str> = (0..r.len()).map(|k| r.get(k).unwrap_or("NULL")).collect();
                                println!("     {label}: {}", cols.join(" | ").replace('\n', " "));
                            }
                        }
                    }
                    Err(e) => println!("     {label}: query failed: {e}"),
                }
            }
        }
        let log = self.cluster.proxy_log();
        let lines: Vec<&str> = log.lines().collect();
        println!("  -- shardgate's log, last {} of {} lines:", lines.len().min(80), lines.len());
        for l in &lines[lines.len().saturating_sub(80)..] {
            println!("     {l}");
        }
        println!("==== end of diagnosis\n");
    }

    /// Runs one generated statement on both sides and records it (DML: shardgate first,
    /// then the whole table is compared).
    async fn statement(&mut self, gen: &mut Gen, s: &Stmt, index: String) {
        let ext = self.proto == Protocol::Extended;
        let (sql, params) = s.render(ext, &HashMap::new());
        if !s.kind.is_dml() {
            let want = exec(&self.reference, self.proto, &sql, &params, s.ordered).await;
            let got = exec(&self.proxy, self.proto, &sql, &params, s.ordered).await;
            self.diagnose_timeout(&index, &got).await;
            self.record(index, &s.shape, &sql, &params, &want, &got);
            self.heal().await;
            return;
        }
        let got = exec(&self.proxy, self.proto, &sql, &params, s.ordered).await;
        self.diagnose_timeout(&index, &got).await;
        self.heal().await;
        let filled = returned_ids(self.proto, &got);
        for (no, id) in &filled {
            gen.note_generated_id(no, *id);
        }
        let fill: HashMap<String, i64> = if s.generated_id_rows().is_empty() { HashMap::new() } else { filled };
        let (ref_sql, ref_params) = s.render(ext, &fill);
        let want = if got.is_refusal() {
            // not applied through shardgate: see what one table would say, then undo it
            self.reference.batch_execute("BEGIN").await.expect("BEGIN on reference");
            let w = exec(&self.reference, self.proto, &ref_sql, &ref_params, s.ordered).await;
            self.reference.batch_execute("ROLLBACK").await.expect("ROLLBACK on reference");
            w
        } else {
            exec(&self.reference, self.proto, &ref_sql, &ref_params, s.ordered).await
        };
        self.heal().await;
        // compare shardgate's statement text; the reference ran it with the generated ids filled in
        self.record(index.clone(), &s.shape, &sql, &params, &want, &got);
        let nos = s.order_nos();
        if s.kind == Kind::Insert && got.is_ok() && same(&want, &got) && !nos.is_empty() {
            self.placement(&format!("{index}+placement"), Some(&nos)).await;
        }
        self.table_check(&format!("{index}+table")).await;
    }

    /// A transaction-control statement on both sides; true when they answered alike.
    async fn control(&mut self, sql: &str, index: String) -> bool {
        self.control_ok(sql, index).await.0
    }

    /// As [`Pass::control`], and whether it succeeded on the reference.
    async fn control_ok(&mut self, sql: &str, index: String) -> (bool, bool) {
        let want = exec(&self.reference, self.proto, sql, &[], false).await;
        let got = exec(&self.proxy, self.proto, sql, &[], false).await;
        self.diagnose_timeout(&index, &got).await;
        let alike = same(&want, &got);
        self.record(index, "block control", sql, &[], &want, &got);
        self.heal().await;
        (alike, want.is_ok())
    }

    /// One generated statement inside a block, shardgate first (its generated ids
    /// go to the reference). Nothing is undone here: the block ends with both
    /// sides. False when the two can no longer be compared inside this block
    /// (shardgate refused what the reference ran, or they answered differently).
    async fn statement_in_block(&mut self, gen: &mut Gen, s: &Stmt, index: String) -> bool {
        let ext = self.proto == Protocol::Extended;
        let (sql, params) = s.render(ext, &HashMap::new());
        let got = exec(&self.proxy, self.proto, &sql, &params, s.ordered).await;
        self.diagnose_timeout(&index, &got).await;
        let filled = returned_ids(self.proto, &got);
        for (no, id) in &filled {
            gen.note_generated_id(no, *id);
        }
        let fill: HashMap<String, i64> = if s.generated_id_rows().is_empty() { HashMap::new() } else { filled };
        let (ref_sql, ref_params) = s.render(ext, &fill);
        let want = exec(&self.reference, self.proto, &ref_sql, &ref_params, s.ordered).await;
        let alike = same(&want, &got);
        self.record(index, &format!("in block: {}", s.shape), &sql, &params, &want, &got);
        let open = !self.proxy.is_closed() && !self.reference.is_closed();
        self.heal().await;
        alike && open
    }

    /// Generated statements inside a block sent all at once (the client pipelines
    /// them, each with its own Sync), on shardgate and then, with shardgate's
    /// generated ids filled in, the same way on the reference. False as
    /// [`Pass::statement_in_block`].
    async fn pipelined_in_block(&mut self, gen: &mut Gen, stmts: &[Stmt], number: usize, in_block: bool) -> bool {
        let ext = self.proto == Protocol::Extended;
        let proto = self.proto;
        let rendered: Vec<(String, Vec<Param>)> = stmts.iter().map(|s| s.render(ext, &HashMap::new())).collect();
        let proxy = &self.proxy;
        let gots = futures_util::future::join_all(stmts.iter().zip(&rendered).map(|(s, (sql, params))| exec(proxy, proto, sql, params, s.ordered))).await;
        let mut fills = Vec::new();
        for (s, got) in stmts.iter().zip(&gots) {
            let filled = returned_ids(proto, got);
            for (no, id) in &filled {
                gen.note_generated_id(no, *id);
            }
            fills.push(if s.generated_id_rows().is_empty() { HashMap::new() } else { filled });
        }
        let for_reference: Vec<(String, Vec<Param>)> = stmts.iter().zip(&fills).map(|(s, f)| s.render(ext, f)).collect();
        let reference = &self.reference;
        let wants = if in_block {
            futures_util::future::join_all(stmts.iter().zip(&for_reference).map(|(s, (sql, params))| exec(reference, proto, sql, params, s.ordered))).await
        } else {
            // each statement is a transaction of its own: one after another is the same, and
            // what shardgate refused is run inside a block that is rolled back, as in `statement`
            let mut wants = Vec::new();
            for ((s, (sql, params)), got) in stmts.iter().zip(&for_reference).zip(&gots) {
                if got.is_refusal() {
                    reference.batch_execute("BEGIN").await.expect("BEGIN on reference");
                    wants.push(exec(reference, proto, sql, params, s.ordered).await);
                    reference.batch_execute("ROLLBACK").await.expect("ROLLBACK on reference");
                } else {
                    wants.push(exec(reference, proto, sql, params, s.ordered).await);
                }
            }
            wants
        };
        // a refusal at Parse fails the block before the statements pipelined ahead of it
        // run (as a Parse error does in PostgreSQL), where the reference runs them: only
        // the refusal is recorded then
        let refused = |g: &Outcome, w: &Outcome| g.is_refusal() && w.is_ok();
        let any_refused = in_block && gots.iter().zip(&wants).any(|(g, w)| refused(g, w));
        let mut alike = !any_refused;
        for (((s, (sql, params)), got), want) in stmts.iter().zip(&rendered).zip(&gots).zip(&wants) {
            let index = format!("block{number}:{}", s.index);
            if any_refused {
                if refused(got, want) {
                    self.record(index, &format!("pipelined in block: {}", s.shape), sql, params, want, got);
                }
                continue;
            }
            self.diagnose_timeout(&index, got).await;
            let where_ = if in_block { "pipelined in block" } else { "pipelined, autocommit" };
            if in_block {
                alike &= same(want, got);
            }
            self.record(index, &format!("{where_}: {}", s.shape), sql, params, want, got);
            if !alike {
                break;
            }
        }
        let open = !self.proxy.is_closed() && !self.reference.is_closed();
        self.heal().await;
        alike && open
    }

    /// `k` generated statements in one block on both sides: BEGIN, maybe a
    /// SAVEPOINT before one of them and a ROLLBACK TO it after, the whole table
    /// read inside the block (its own writes, on every shard), then COMMIT or
    /// ROLLBACK; after it the whole table is compared (and the rows' places
    /// after a COMMIT). A statement that fails fails the block on both sides:
    /// the ones after it answer 25P02, a ROLLBACK TO an earlier savepoint
    /// recovers it, a COMMIT answers ROLLBACK. When the sides part (a refusal,
    /// a different answer), both roll back.
    async fn block(&mut self, gen: &mut Gen, rng: &mut StdRng, number: usize, k: usize) {
        let at = |what: &str| format!("block{number}:{what}");
        const BEGINS: [&str; 5] = ["BEGIN", "START TRANSACTION", "begin isolation level read committed", "BEGIN ISOLATION LEVEL REPEATABLE READ", "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE"];
        let begin = BEGINS[rng.gen_range(0..BEGINS.len())];
        let mut alike = self.control(begin, at("begin")).await;
        let savepoint = rng.gen_bool(0.4).then(|| rng.gen_range(0..k));
        // (ROLLBACK TO is refused while shards take part, also of a savepoint that does not
        // exist: asked only of one that does)
        let mut saved = false;
        // now and then all of them at once, pipelined
        if savepoint.is_none() && k > 1 && rng.gen_bool(0.3) {
            if alike {
                let stmts: Vec<Stmt> = (0..k).map(|_| gen.next_stmt()).collect();
                alike = self.pipelined_in_block(gen, &stmts, number, true).await;
            }
        } else {
        for i in 0..k {
            if !alike {
                break;
            }
            if savepoint == Some(i) {
                (alike, saved) = self.control_ok("SAVEPOINT s1", at("savepoint")).await;
                if !alike {
                    break;
                }
            }
            let s = gen.next_stmt();
            alike = self.statement_in_block(gen, &s, at(&s.index.to_string())).await;
        }
        }
        if alike && saved && rng.gen_bool(0.5) {
            alike = self.control("ROLLBACK TO SAVEPOINT s1", at("rollback-to")).await;
        }
        if alike {
            let sql = "SELECT * FROM t_order ORDER BY id";
            let want = exec(&self.reference, self.proto, sql, &[], true).await;
            let got = exec(&self.proxy, self.proto, sql, &[], true).await;
            alike = same(&want, &got);
            self.record(at("table-inside"), "block: the table inside the block", sql, &[], &want, &got);
            self.heal().await;
        }
        let end = if alike && rng.gen_bool(0.7) { "COMMIT" } else { "ROLLBACK" };
        self.control(end, at(end)).await;
        self.table_check(&at("table")).await;
        if end == "COMMIT" {
            self.placement(&at("placement"), None).await;
        }
    }

    /// Every row (or the rows with these order numbers) is in
    /// `db_{merchant_id mod 8}.t_order_{yyyyMM of create_time in UTC}`, once.
    async fn placement(&mut self, index: &str, order_nos: Option<&[String]>) {
        let filter = match order_nos {
            Some(nos) => format!(" WHERE order_no IN ({})", nos.iter().map(|n| format!("'{}'", n.replace('\'', "''"))).collect::<Vec<_>>().join(", ")),
            None => String::new(),
        };
        let sql = format!("SELECT order_no, merchant_id, to_char(create_time AT TIME ZONE 'UTC', 'YYYYMM') FROM t_order{filter}");
        let mut want: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
        match self.reference.simple_query(&sql).await {
            Ok(msgs) => {
                for m in msgs {
                    if let SimpleQueryMessage::Row(r) = m {
                        let (no, merchant, month) = (r.get(0).unwrap_or(""), r.get(1).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0), r.get(2).unwrap_or(""));
                        want.push(vec![Some(format!("{no} in db_{}.t_order_{month}", merchant.rem_euclid(8)).into_bytes())]);
                    }
                }
            }
            Err(e) => panic!("placement: reference: {e}"),
        }
        let mut got: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
        for (n, shard) in self.shards.iter().enumerate() {
            let mut tables = month_tables(shard).await;
            tables.push("t_order".to_string());
            let q = tables.iter().map(|t| format!("SELECT '{t}', order_no FROM {t}{filter}")).collect::<Vec<_>>().join(" UNION ALL ");
            match shard.simple_query(&q).await {
                Ok(msgs) => {
                    for m in msgs {
                        if let SimpleQueryMessage::Row(r) = m {
                            got.push(vec![Some(format!("{} in db_{n}.{}", r.get(1).unwrap_or(""), r.get(0).unwrap_or("")).into_bytes())]);
                        }
                    }
                }
                Err(e) => panic!("placement: db_{n}: {e}"),
            }
        }
        want.sort();
        got.sort();
        let cols = vec!["placement".to_string()];
        let want = Outcome::Ok { cols: cols.clone(), types: Vec::new(), affected: Some(want.len() as u64), rows: want };
        let got = Outcome::Ok { cols, types: Vec::new(), affected: Some(got.len() as u64), rows: got };
        self.record(index.to_string(), "placement of inserted rows", &format!("where rows are on the shards{filter}"), &[], &want, &got);
    }

    /// The whole table on both sides; on a difference the reference is made equal to
    /// shardgate's table (so one wrong write is reported once, not by every later statement).
    async fn table_check(&mut self, index: &str) {
        let sql = "SELECT * FROM t_order ORDER BY id";
        let want = exec(&self.reference, self.proto, sql, &[], true).await;
        let got = exec(&self.proxy, self.proto, sql, &[], true).await;
        let equal = same(&want, &got);
        self.record(index.to_string(), "table-check after write", sql, &[], &want, &got);
        if !equal && !self.resync().await {
            // the reference cannot hold shardgate's table: later answers would all differ
            self.broken = true;
        }
    }

    /// Copies the table as shardgate shows it into the reference; false when that
    /// is not possible (shardgate's table cannot be read, or holds rows one table cannot:
    /// the same id or order_no twice, in different month tables).
    async fn resync(&mut self) -> bool {
        let msgs = match self.proxy.simple_query("SELECT id, order_no, merchant_id, order_amount, pay_status, create_time FROM t_order").await {
            Ok(m) => m,
            Err(e) => {
                println!("  resync (seed {} {} pass): cannot read the table through shardgate: {e}", self.seed, self.proto.name());
                return false;
            }
        };
        let mut rows = Vec::new();
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                let vals: Vec<String> = (0..6).map(|i| r.get(i).map_or("NULL".to_string(), |v| format!("'{}'", v.replace('\'', "''")))).collect();
                rows.push(format!("({})", vals.join(", ")));
            }
        }
        self.reference.batch_execute("DELETE FROM t_order").await.expect("resync: clear reference");
        for chunk in rows.chunks(200) {
            let sql = format!("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES {}", chunk.join(", "));
            if let Err(e) = self.reference.batch_execute(&sql).await {
                println!(
                    "  resync (seed {} {} pass): one table cannot hold shardgate's rows ({}); the rest of this pass is skipped",
                    self.seed,
                    self.proto.name(),
                    e.as_db_error().map_or_else(|| e.to_string(), |d| format!("{}: {}", d.code().code(), d.message()))
                );
                return false;
            }
        }
        true
    }
}

/// Ids shardgate returned for rows inserted without one (RETURNING id, order_no).
fn returned_ids(proto: Protocol, o: &Outcome) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    let Outcome::Ok { cols, rows, .. } = o else { return out };
    let (Some(ci), Some(cn)) = (cols.iter().position(|c| c == "id"), cols.iter().position(|c| c == "order_no")) else { return out };
    for r in rows {
        let (Some(Some(id)), Some(Some(no))) = (r.get(ci), r.get(cn)) else { continue };
        let id = match proto {
            Protocol::Simple => String::from_utf8_lossy(id).parse::<i64>().ok(),
            Protocol::Extended => be_i64(id),
        };
        if let Some(id) = id {
            out.insert(String::from_utf8_lossy(no).into_owned(), id);
        }
    }
    out
}

// ---------------------------------------------------------------- driver

fn start() -> Cluster {
    let c = Cluster::start_temp(Options { all_clusters: true, redis: false, proxy: true, ..Options::default() }).expect("start cluster");
    // the plain table numbers rows that omit the id itself (only used when shardgate's
    // generated ids are unknown, e.g. a refused INSERT checked inside a rolled-back transaction)
    c.create_reference(true).expect("reference db");
    c
}

fn reference_dsn(c: &Cluster) -> String {
    c.info.default_dsn.replace("/db_default", "/reference")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// One seed on one protocol: reset both tables, load the seed's rows, run `n` statements.
async fn run_pass(c: &Cluster, seed: u64, proto: Protocol, n: usize, deadline: Option<Instant>, blocks: bool) -> Tally {
    let proxy_dsn = c.info.proxy_dsn.clone();
    let ref_dsn = reference_dsn(c);
    let mut pass = Pass {
        seed,
        proto,
        reference: connect(&ref_dsn).await.expect("reference"),
        proxy: connect(&proxy_dsn).await.expect("shardgate"),
        shards: {
            let mut v = Vec::new();
            for dsn in &c.info.shards {
                v.push(connect(dsn).await.expect("shard"));
            }
            v
        },
        proxy_dsn: &proxy_dsn,
        reference_dsn: &ref_dsn,
        cluster: c,
        tally: Tally::default(),
        verbose: std::env::var("SHARDGATE_VERBOSE").is_ok_and(|v| v != "0"),
        broken: false,
    };
    if let Ok(tz) = std::env::var("SHARDGATE_SESSION_TZ") {
        // both sessions in another zone than sharding.time_zone (times without offset are read in it)
        let set = format!("SET TimeZone = '{}'", tz.replace('\'', "''"));
        pass.reference.batch_execute(&set).await.expect("SET TimeZone on the reference");
        pass.proxy.batch_execute(&set).await.expect("SET TimeZone through shardgate");
    }
    pass.reference.batch_execute("DELETE FROM t_order").await.expect("reset reference");
    pass.proxy.batch_execute("DELETE FROM t_order").await.expect("reset through shardgate");
    let mut gen = Gen::new(seed);
    // the initial load: simple protocol, must succeed on both
    for s in gen.initial_load(INITIAL_ROWS) {
        let sql = s.sql();
        let got = run_simple(&pass.proxy, &sql, true).await;
        assert!(got.is_ok(), "seed {seed}: initial load through shardgate failed: {}\n{sql}", show(&got, 3));
        let fill = if s.generated_id_rows().is_empty() { HashMap::new() } else { returned_ids(Protocol::Simple, &got) };
        for (no, id) in &fill {
            gen.note_generated_id(no, *id);
        }
        let want = run_simple(&pass.reference, &s.render(false, &fill).0, true).await;
        assert!(want.is_ok(), "seed {seed}: initial load on the reference failed: {}", show(&want, 3));
    }
    let t0 = Instant::now();
    pass.table_check("load+table").await;
    pass.placement("load+placement", None).await;
    // blocks: 1 to 4 statements each, their shape from a generator of its own
    let mut block_rng = StdRng::seed_from_u64(seed ^ 0xB10C_0000_B10C);
    let (mut done, mut number) = (0, 0);
    while done < n {
        if deadline.is_some_and(|d| Instant::now() >= d) || pass.broken {
            break;
        }
        if blocks && block_rng.gen_bool(0.15) {
            // outside a block, pipelined: each statement commits (or fails) on its own
            let k = block_rng.gen_range(2..=4);
            let stmts: Vec<Stmt> = (0..k).map(|_| gen.next_stmt()).collect();
            pass.pipelined_in_block(&mut gen, &stmts, number, false).await;
            pass.table_check(&format!("group{number}:table")).await;
            number += 1;
            done += k;
        } else if blocks {
            let k = block_rng.gen_range(1..=4);
            pass.block(&mut gen, &mut block_rng, number, k).await;
            number += 1;
            done += k;
        } else {
            let s = gen.next_stmt();
            pass.statement(&mut gen, &s, s.index.to_string()).await;
            done += 1;
        }
    }
    let t = pass.tally;
    println!(
        "random differential{} ({}, seed {seed}): {} same, {} refused, {} wrong  [{} comparisons in {:.1}s]",
        if blocks { " in blocks" } else { "" },
        proto.name(),
        t.same,
        t.refused,
        t.wrong,
        t.total(),
        t0.elapsed().as_secs_f64()
    );
    t
}

/// SQL on one line (a `-- comment` ends with a newline).
fn one_line(sql: &str) -> String {
    sql.replace('\n', "\\n")
}

fn print_report(t: &Tally) {
    println!("\n== per shape (same / refused / wrong)");
    for (shape, [s, r, w]) in &t.by_shape {
        println!("  {shape:<50} {s:>5} {r:>5} {w:>5}{}", if *w > 0 { "   <-- WRONG" } else { "" });
    }
    if !t.refusals.is_empty() {
        println!("\n== refusals (0A000) by shape and message");
        for (msg, (n, example)) in &t.refusals {
            println!("  {n:>5}  {msg}\n         e.g. {}", one_line(example));
        }
    }
    if t.wrongs.is_empty() {
        return;
    }
    let full = env_u64("SHARDGATE_SHOW_WRONG").map_or(10, |n| n as usize);
    println!("\n== wrong answers: first {full} in full");
    for w in t.wrongs.iter().take(full) {
        println!("\n  seed {} {} #{} [{}]\n    {}", w.seed, w.proto.name(), w.index, w.shape, w.sql);
        if !w.params.is_empty() {
            println!("    params {:?}", w.params);
        }
        println!("    reference: {}\n    shardgate: {}", show(&w.reference, 12), show(&w.proxy, 12));
        if let Some(d) = row_diff(&w.reference, &w.proxy) {
            println!("{d}");
        }
    }
    // every wrong one, one line each, and the shortest statement per shape
    println!("\n== all wrong answers ({})", t.wrongs.len());
    for w in &t.wrongs {
        let short = |o: &Outcome| match o {
            Outcome::Err { code, .. } => format!("ERROR {code}"),
            Outcome::Ok { rows, affected, .. } => format!("{} rows, tag {}", rows.len(), affected.map_or("-".into(), |n| n.to_string())),
        };
        println!(
            "  seed {} {} #{} [{}] reference: {} / shardgate: {} :: {}",
            w.seed,
            w.proto.name(),
            w.index,
            w.shape,
            short(&w.reference),
            short(&w.proxy),
            one_line(&w.sql)
        );
    }
    let mut shortest: BTreeMap<String, &Wrong> = BTreeMap::new();
    for w in &t.wrongs {
        let key = format!("{} {}", w.proto.name(), w.shape);
        let shorter = match shortest.get(&key) {
            Some(x) => w.sql.len() < x.sql.len(),
            None => true,
        };
        if shorter {
            shortest.insert(key, w);
        }
    }
    println!("\n== shortest wrong statement per protocol and shape");
    for (key, w) in shortest {
        println!(
            "  {key}: seed {} #{} :: {}{}",
            w.seed,
            w.index,
            one_line(&w.sql),
            if w.params.is_empty() { String::new() } else { format!("  params {:?}", w.params) }
        );
    }
}

fn protocols() -> Vec<Protocol> {
    let want = std::env::var("SHARDGATE_PROTOCOLS").unwrap_or_else(|_| "simple,extended".into());
    let mut out = Vec::new();
    if want.contains("simple") {
        out.push(Protocol::Simple);
    }
    if want.contains("extended") {
        out.push(Protocol::Extended);
    }
    assert!(!out.is_empty(), "SHARDGATE_PROTOCOLS names neither simple nor extended");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_statements_answer_like_one_table() {
    let n = env_u64("SHARDGATE_STATEMENTS").map_or(DEFAULT_STATEMENTS, |v| v as usize);
    let soak = env_u64("SHARDGATE_SOAK_SECONDS");
    let t0 = Instant::now();
    let c = start();
    println!("cluster started in {:.1}s", t0.elapsed().as_secs_f64());
    let mut all = Tally::default();
    let mut per_protocol: BTreeMap<&str, Tally> = BTreeMap::new();
    match soak {
        None => {
            let seed = env_u64("SHARDGATE_SEED").unwrap_or(DEFAULT_SEED);
            for proto in protocols() {
                let t = run_pass(&c, seed, proto, n, None, false).await;
                per_protocol.entry(proto.name()).or_default().add(t);
            }
        }
        Some(secs) => {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut seed = env_u64("SHARDGATE_SEED")
                .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) % 1_000_000_000);
            println!("soak for {secs}s");
            while Instant::now() < deadline {
                println!("soak: seed {seed}");
                for proto in protocols() {
                    let t = run_pass(&c, seed, proto, n, Some(deadline), false).await;
                    per_protocol.entry(proto.name()).or_default().add(t);
                }
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407) % 1_000_000_000;
            }
        }
    }
    for (k, t) in per_protocol {
        println!("total ({k}): {} same, {} refused, {} wrong", t.same, t.refused, t.wrong);
        all.add(t);
    }
    report_and_check("random differential", &all, n, t0);
}

/// Prints the report and the summary line `<label>: N same, …`, and fails on
/// any wrong answer or on too few comparisons to mean anything.
fn report_and_check(label: &str, all: &Tally, n: usize, t0: Instant) {
    print_report(all);
    println!(
        "\n{label}: {} same, {} refused ({:.1}%), {} wrong in {:.1}s",
        all.same,
        all.refused,
        100.0 * all.refused as f64 / all.total().max(1) as f64,
        all.wrong,
        t0.elapsed().as_secs_f64()
    );
    assert!(all.total() >= n.min(100), "{label}: only {} comparisons ran", all.total());
    assert!(
        all.same * 10 >= all.total() * 6,
        "{label}: only {} of {} answers were the same (refused {}): the comparison is not meaningful",
        all.same,
        all.total(),
        all.refused
    );
    assert_eq!(all.wrong, 0, "{label}: {} statements answered differently through shardgate (report above)", all.wrong);
}

/// The generated statements inside transaction blocks (`SHARDGATE_BLOCK_STATEMENTS`
/// per protocol, default 300; seed as above): what a block reads of its own writes
/// across shards, failed blocks and savepoints, COMMIT and ROLLBACK, each answer
/// and the table after each block compared with one table's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_blocks_answer_like_one_table() {
    let n = env_u64("SHARDGATE_BLOCK_STATEMENTS").map_or(300, |v| v as usize);
    let seed = env_u64("SHARDGATE_SEED").unwrap_or(DEFAULT_SEED);
    let t0 = Instant::now();
    let c = start();
    let mut all = Tally::default();
    for proto in protocols() {
        all.add(run_pass(&c, seed, proto, n, None, true).await);
    }
    report_and_check("random differential in blocks", &all, n, t0);
}

/// Transaction control and refused statements inside blocks, in both protocols,
/// answer as one table's database answers them: in a failed block everything
/// but the block's end is 25P02 (a statement shardgate would refuse, a SAVEPOINT,
/// a Parse of a statement naming a missing column), a RELEASE of a savepoint
/// that does not exist is 3B001, COMMIT PREPARED inside a block 25001. ROLLBACK
/// TO is refused (0A000) while shards take part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_control_answers_like_one_table() {
    let c = start();
    let ref_dsn = reference_dsn(&c);
    let reference = connect(&ref_dsn).await.expect("reference");
    let proxy = connect(&c.info.proxy_dsn).await.expect("shardgate");
    let insert = "INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES (77, 'BC-77', 5, 1.00, 'NEW', '2026-11-02 10:00+00')";
    let script: &[&str] = &[
        // a block that touched t_order: RELEASE / ROLLBACK TO of no savepoint, COMMIT PREPARED
        "BEGIN",
        insert,
        "RELEASE SAVEPOINT nosuch",
        "ROLLBACK",
        "BEGIN",
        insert,
        "ROLLBACK TO SAVEPOINT nosuch",
        "ROLLBACK",
        "BEGIN",
        "SAVEPOINT before_shards",
        insert,
        "ROLLBACK TO SAVEPOINT before_shards",
        "ROLLBACK",
        "BEGIN",
        insert,
        "COMMIT PREPARED 'nosuch'",
        "ROLLBACK",
        // a failed block: 25P02 before anything shardgate would say
        "BEGIN",
        insert,
        "SELECT 1/0",
        "UPDATE t_order SET order_no = order_no || 'x' WHERE merchant_id = 5",
        "SELECT nocol FROM t_order WHERE merchant_id = 5",
        "SELECT every(pay_status IS NOT NULL) FROM t_order",
        "SELECT * FROM t_order WHERE merchant_id = 5",
        "SAVEPOINT s1",
        "RELEASE SAVEPOINT s1",
        "ROLLBACK TO SAVEPOINT s1",
        "COMMIT PREPARED 'nosuch'",
        "COMMIT",
        "SELECT count(*) FROM t_order WHERE order_no = 'BC-77'",
    ];
    for proto in [Protocol::Simple, Protocol::Extended] {
        for sql in script {
            let want = exec(&reference, proto, sql, &[], false).await;
            let got = exec(&proxy, proto, sql, &[], false).await;
            let code = |o: &Outcome| match o {
                Outcome::Ok { rows, affected, .. } => format!("ok {affected:?} {rows:?}"),
                Outcome::Err { code, .. } => code.clone(),
            };
            let want = if sql.starts_with("ROLLBACK TO") { "0A000".to_string() } else { code(&want) };
            assert_eq!(code(&got), want, "{} {sql}: shardgate {}", proto.name(), show(&got, 2));
        }
    }
    // INSERTs without merchant_id: PostgreSQL reports what its parse finds (the VALUES
    // row's length, a column name, a literal of the wrong type) at Parse, and the missing
    // NOT NULL value only when the statement runs (23502). In a block, a read prepared
    // before and executed right behind the INSERT's Parse (Parse/Describe/Sync of the
    // INSERT, then Bind/Execute/Sync of the read, written at once on a raw connection, so
    // the order on the wire is fixed) shows when: it runs if the INSERT fails only at
    // Execute, it answers 25P02 if the INSERT's Parse failed (a driver's pipelining
    // decides that order on its own, differently from run to run)
    let read = "SELECT count(*) FROM t_order WHERE merchant_id = 5";
    let bad_inserts = [
        ("INSERT INTO t_order (id, order_no, create_time) VALUES (78, 'BC-78', '2026-11-02 10:00+00')", "23502"),
        ("INSERT INTO t_order (id, order_no) VALUES (79)", "42601"),
        ("INSERT INTO t_order (id, order_no, bogus) VALUES (80, 'BC-80', 2)", "42703"),
        ("INSERT INTO t_order (id, order_no) VALUES ('abc', 'BC-81')", "22P02"),
        ("INSERT INTO t_order (id, order_no, create_time) VALUES (82, 'BC-82', 'not a time')", "22007"),
    ];
    let mut raw = raw::md5_login(&c);
    let sync = raw::frame(b'S', b"");
    let parse = |name: &str, sql: &str| raw::frame(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat());
    raw.write_all(&[raw::pbe("BEGIN"), parse("read", read), sync.clone(), raw::pbe("ROLLBACK"), sync.clone()].concat()).expect("write");
    raw::read_until_ready(&mut raw);
    raw::read_until_ready(&mut raw);
    for (bad, code) in bad_inserts {
        for (name, client) in [("one table", &reference), ("shardgate", &proxy)] {
            let simple = exec(client, Protocol::Simple, bad, &[], false).await;
            assert!(matches!(&simple, Outcome::Err { code: c, .. } if c == code), "{name}, simple: {bad}: {}", show(&simple, 2));
            let extended = exec(client, Protocol::Extended, bad, &[], false).await;
            assert!(matches!(&extended, Outcome::Err { code: c, .. } if c == code), "{name}, extended: {bad}: {}", show(&extended, 2));
        }
        let bind_read = raw::frame(b'B', b"\0read\0\0\0\0\0\0\0");
        let execute = raw::frame(b'E', b"\0\0\0\0\0");
        raw.write_all(&[raw::pbe("BEGIN"), sync.clone(), parse("", bad), raw::frame(b'D', b"S\0"), sync.clone(), bind_read, execute, sync.clone(), raw::pbe("ROLLBACK"), sync.clone()].concat())
            .expect("write");
        raw::read_until_ready(&mut raw);
        let parsed = raw::read_until_ready(&mut raw);
        let read_answer = raw::read_until_ready(&mut raw);
        raw::read_until_ready(&mut raw);
        let want = if code == "23502" { None } else { Some("25P02") };
        assert_eq!(raw::error_code(&parsed).is_some(), want.is_some(), "the Parse of {bad}: {parsed:?}");
        assert_eq!(raw::error_code(&read_answer).as_deref(), want, "the read behind the Parse of {bad}: {read_answer:?}");
    }
}

/// Prints the statements of `SHARDGATE_SEED` (no database needed).
#[test]
#[ignore]
fn print_statements() {
    let seed = env_u64("SHARDGATE_SEED").unwrap_or(DEFAULT_SEED);
    let n = env_u64("SHARDGATE_STATEMENTS").map_or(DEFAULT_STATEMENTS, |v| v as usize);
    let mut gen = Gen::new(seed);
    for s in gen.initial_load(INITIAL_ROWS) {
        println!("load #{}: {}", s.index, s.sql());
    }
    for _ in 0..n {
        let s = gen.next_stmt();
        let (ext, params) = s.render(true, &HashMap::new());
        println!("#{} [{}] {}\n    ext: {ext} {params:?}", s.index, s.shape, s.sql());
    }
}
