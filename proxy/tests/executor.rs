//! The executor without a client session, against a scripted backend: one
//! loopback server that speaks the PostgreSQL protocol for every database of
//! the config (eight shards and db_default), answers each statement from a
//! script, can fail chosen statements, and records what it received in order.
//! The tests check the executor's decisions: k-way merging, passing a shard's
//! error through whole, the two-phase commit's outcome when a PREPARE or the
//! decision fails, and the retry of a shard that could not be reached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use shardgate::routed::exec::{self, Bound, ExecError, Out, Request, Slots};
use shardgate::routed::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Columns (name, type OID) and rows (text values) of a scripted answer.
type Answer = (Vec<(String, u32)>, Vec<Vec<Option<String>>>);

/// What the scripted server does and what it saw.
#[derive(Default)]
struct Script {
    /// Rows (text values) a SELECT on a database answers, with the column types.
    rows: HashMap<String, Answer>,
    /// (database, text the statement contains, SQLSTATE): that statement fails.
    fail: Vec<(String, String, &'static str)>,
    /// Every statement text received, in order: (database, text).
    seen: Vec<(String, String)>,
    /// The database of every flight of messages received: a message that
    /// found nothing more buffered behind the last one starts a round trip.
    flights: Vec<String>,
}

type Shared = Arc<Mutex<Script>>;

fn put(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.put_u8(0);
}

fn read_cstr(b: &mut &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).to_string();
    *b = &b[(end + 1).min(b.len())..];
    s
}

fn error(out: &mut BytesMut, code: &str, message: &str) {
    put(out, b'E', |b| {
        for (k, v) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', code), (b'M', message)] {
            b.put_u8(k);
            cstr(b, v);
        }
        b.put_u8(0);
    });
}

impl Script {
    fn failing(&self, db: &str, sql: &str) -> Option<&'static str> {
        self.fail.iter().find(|(d, s, _)| d == db && sql.contains(s.as_str())).map(|(_, _, c)| *c)
    }
}

fn is_select(sql: &str) -> bool {
    sql.trim_start().to_ascii_uppercase().starts_with("SELECT")
}

fn row_description(out: &mut BytesMut, cols: &[(String, u32)]) {
    put(out, b'T', |b| {
        b.put_i16(cols.len() as i16);
        for (name, oid) in cols {
            cstr(b, name);
            b.put_u32(0);
            b.put_i16(0);
            b.put_u32(*oid);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0);
        }
    });
}

fn rows_and_tag(out: &mut BytesMut, rows: &[Vec<Option<String>>]) {
    for r in rows {
        put(out, b'D', |b| {
            b.put_i16(r.len() as i16);
            for v in r {
                match v {
                    Some(s) => {
                        b.put_i32(s.len() as i32);
                        b.extend_from_slice(s.as_bytes());
                    }
                    None => b.put_i32(-1),
                }
            }
        });
    }
    put(out, b'C', |b| cstr(b, &format!("SELECT {}", rows.len())));
}

fn tag_of(sql: &str) -> String {
    let up = sql.trim_start().to_ascii_uppercase();
    for t in ["BEGIN", "COMMIT PREPARED", "ROLLBACK PREPARED", "PREPARE TRANSACTION", "COMMIT", "ROLLBACK", "SET", "DELETE", "UPDATE", "CREATE"] {
        if up.starts_with(t) {
            return match t {
                "DELETE" | "UPDATE" => format!("{t} 0"),
                "CREATE" => "CREATE TABLE".into(),
                _ => t.into(),
            };
        }
    }
    if up.starts_with("INSERT") {
        return format!("INSERT 0 {}", 1 + up.matches("),").count());
    }
    "SELECT 0".into()
}

async fn serve_conn(s: TcpStream, script: Shared) -> std::io::Result<()> {
    let mut s = tokio::io::BufReader::new(s);
    // startup (decline an SSLRequest)
    let db = loop {
        let len = s.read_i32().await? as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await?;
        if body[..4] == 80877103i32.to_be_bytes() {
            s.write_all(b"N").await?;
            continue;
        }
        let mut rest = &body[4..];
        let mut db = String::new();
        while !rest.is_empty() && rest[0] != 0 {
            let (k, v) = (read_cstr(&mut rest), read_cstr(&mut rest));
            if k == "database" {
                db = v;
            }
        }
        break db;
    };
    let mut out = BytesMut::new();
    put(&mut out, b'R', |b| b.put_i32(0));
    for (k, v) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        put(&mut out, b'S', |b| {
            cstr(b, k);
            cstr(b, v);
        });
    }
    put(&mut out, b'K', |b| {
        b.put_i32(4242);
        b.put_i32(7);
    });
    put(&mut out, b'Z', |b| b.put_u8(b'I'));
    s.write_all(&out).await?;
    let (mut stmts, mut portal, mut failed, mut status) = (HashMap::<String, String>::new(), String::new(), false, b'I');
    loop {
        // a message with nothing buffered before it was sent after the client read an answer
        let fresh = s.buffer().is_empty();
        let tag = match s.read_u8().await {
            Ok(t) => t,
            Err(_) => return Ok(()),
        };
        if fresh {
            script.lock().expect("script").flights.push(db.clone());
        }
        let len = s.read_i32().await? as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await?;
        let mut b = &body[..];
        let mut out = BytesMut::new();
        match tag {
            b'X' => return Ok(()),
            b'S' => {
                failed = false;
                put(&mut out, b'Z', |o| o.put_u8(status));
            }
            _ if failed => {}
            b'P' => {
                let (name, sql) = (read_cstr(&mut b), read_cstr(&mut b));
                let mut sc = script.lock().expect("script");
                sc.seen.push((db.clone(), sql.clone()));
                if let Some(code) = sc.failing(&db, &sql) {
                    error(&mut out, code, "scripted failure");
                    failed = true;
                    if status == b'T' {
                        status = b'E';
                    }
                } else if !name.is_empty() && stmts.contains_key(&name) {
                    error(&mut out, "42P05", &format!("prepared statement \"{name}\" already exists"));
                    failed = true;
                    if status == b'T' {
                        status = b'E';
                    }
                } else {
                    stmts.insert(name, sql);
                    put(&mut out, b'1', |_| {});
                }
            }
            b'B' => {
                let _portal = read_cstr(&mut b);
                portal = stmts.get(&read_cstr(&mut b)).cloned().unwrap_or_default();
                put(&mut out, b'2', |_| {});
            }
            b'D' => {
                let kind = b.get_u8();
                let sql = if kind == b'S' { stmts.get(&read_cstr(&mut b)).cloned().unwrap_or_default() } else { portal.clone() };
                if kind == b'S' {
                    put(&mut out, b't', |o| o.put_i16(0));
                }
                let sc = script.lock().expect("script");
                match sc.rows.get(&db) {
                    Some((cols, _)) if is_select(&sql) => row_description(&mut out, cols),
                    _ => put(&mut out, b'n', |_| {}),
                }
            }
            b'E' => {
                let sc = script.lock().expect("script");
                if is_select(&portal) {
                    rows_and_tag(&mut out, sc.rows.get(&db).map(|(_, r)| r.as_slice()).unwrap_or_default());
                } else {
                    let t = tag_of(&portal);
                    status = match t.as_str() {
                        "BEGIN" => b'T',
                        "COMMIT" | "ROLLBACK" | "PREPARE TRANSACTION" => b'I',
                        _ => status,
                    };
                    put(&mut out, b'C', |o| cstr(o, &t));
                }
            }
            b'C' => {
                if b.get_u8() == b'S' {
                    stmts.remove(&read_cstr(&mut b));
                }
                put(&mut out, b'3', |_| {});
            }
            b'H' => {}
            b'Q' => {
                let text = read_cstr(&mut b);
                let mut sc = script.lock().expect("script");
                // several statements (as shardgate joins a connection's targets): each
                // answered in turn, none after one that fails
                for sql in text.split("\n;\n").map(str::to_string) {
                    sc.seen.push((db.clone(), sql.clone()));
                    if let Some(code) = sc.failing(&db, &sql) {
                        error(&mut out, code, "scripted failure");
                        if status == b'T' {
                            status = b'E';
                        }
                        break;
                    } else if is_select(&sql) {
                        match sc.rows.get(&db) {
                            Some((cols, rows)) => {
                                row_description(&mut out, cols);
                                rows_and_tag(&mut out, rows);
                            }
                            None => put(&mut out, b'C', |o| cstr(o, "SELECT 0")),
                        }
                    } else {
                        let mut t = tag_of(&sql);
                        if t == "PREPARE TRANSACTION" && status != b'T' {
                            // PostgreSQL rolls a failed block back instead of preparing it (and
                            // outside a block it only warns): either way the tag says ROLLBACK
                            t = "ROLLBACK".into();
                        }
                        status = match t.as_str() {
                            "BEGIN" => b'T',
                            "COMMIT" | "ROLLBACK" | "PREPARE TRANSACTION" => b'I',
                            _ => status,
                        };
                        put(&mut out, b'C', |o| cstr(o, &t));
                    }
                }
                put(&mut out, b'Z', |o| o.put_u8(status));
            }
            other => panic!("scripted server: unexpected message {:?}", other as char),
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
        }
    }
}

/// Starts the scripted server; returns its port.
async fn scripted(script: Shared) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let _ = serve_conn(s, script).await;
            });
        }
    });
    port
}

/// An engine whose eight shards and db_default are databases of the scripted
/// server; `closed` shards point at a port nobody listens on.
async fn engine(script: &Shared, closed: &[usize]) -> Engine {
    engine_sized(script, closed, 4).await
}

/// [`engine`] with `size` connections per database.
async fn engine_sized(script: &Shared, closed: &[usize], size: usize) -> Engine {
    let port = scripted(script.clone()).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut t = String::from("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[[users]]\nname = \"app\"\npassword = \"app\"\n");
    t.push_str(&format!("[pool]\nsize = {size}\nconnect_timeout_ms = 1000\ncheckout_timeout_ms = 1000\n"));
    for s in 0..8 {
        let p = if closed.contains(&s) { dead } else { port };
        t.push_str(&format!("[[shards]]\ndsn = \"postgres://postgres@127.0.0.1:{p}/db_{s}?sslmode=disable\"\n"));
    }
    t.push_str(&format!("[default_db]\ndsn = \"postgres://postgres@127.0.0.1:{port}/db_default?sslmode=disable\"\n"));
    t.push_str("[ids]\nworker_id = 3\n[fallback]\npolicy = \"fail\"\n");
    // no unique lookups: the two-phase commit then spans the shards only
    t.push_str("[[sharded_tables]]\nname = \"t_order\"\nshard_key = \"merchant_id\"\nmonth_column = \"create_time\"\ntable_pattern = \"t_order_{yyyyMM}\"\nid_column = \"id\"\nunique_lookups = []\n");
    let config = shardgate_config::Config::from_toml(&t, "executor test").expect("config");
    let p = &config.pool;
    let default = shardgate::backend::pool::build(config.default_dsn(), p);
    let engine = Engine::new(&config, default).expect("engine");
    engine.add_months(&["202610", "202611"].map(|m| shardgate_router::month::MonthKey::parse_suffix(m).expect("month")));
    engine
}

/// Runs `sql` (no parameters) through the executor as a simple-protocol
/// statement; returns the result and the bytes meant for the client.
async fn run(engine: &Engine, sql: &str) -> (Result<(), ExecError>, BytesMut) {
    run_in(engine, sql, None).await
}

/// [`run`] inside the client's transaction block when `tx` is given (its BEGIN).
async fn run_in(engine: &Engine, sql: &str, tx: Option<&str>) -> (Result<(), ExecError>, BytesMut) {
    run_as(engine, sql, tx, true).await
}

/// [`run_in`] as a simple- or extended-protocol statement (extended: kept prepared on the shard).
async fn run_as(engine: &Engine, sql: &str, tx: Option<&str>, simple: bool) -> (Result<(), ExecError>, BytesMut) {
    let plan = engine.plan(sql, &[]).expect("plan");
    let shardgate_router::Plan::Routed(routed) = plan else { panic!("not routed: {sql}") };
    let bound = Bound::default();
    let none = |_: &mut shardgate::backend::ServerConn| bytes::Bytes::new();
    let req = Request {
        routed: &routed,
        bound: &bound,
        simple,
        visible: None,
        tx,
        param_sets: &none,
        local_sets: &[],
        down_targets: &[],
        serial: false,
        cancel: None,
        cancel_epoch: 0,
    };
    let mut buf = BytesMut::new();
    let mut out = Out { buf: &mut buf, client: None, keep: None, overflow: false, flushed: false, sink: None };
    let mut slots: Slots = Vec::new();
    let r = exec::execute(engine, &mut slots, &req, &mut out).await;
    exec::release(&mut slots);
    (r, buf)
}

/// (tag, body) of every message in `buf`.
fn messages(mut buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    while buf.len() >= 5 {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        v.push((buf[0], buf[5..1 + len].to_vec()));
        buf = &buf[1 + len..];
    }
    v
}

fn first_values(buf: &[u8]) -> Vec<String> {
    messages(buf)
        .into_iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| {
            let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]) as usize;
            String::from_utf8_lossy(&b[6..6 + len]).to_string()
        })
        .collect()
}

fn seen(script: &Shared) -> Vec<(String, String)> {
    script.lock().expect("script").seen.clone()
}

fn int_rows(ids: &[i64]) -> Answer {
    (vec![("id".into(), 20)], ids.iter().map(|i| vec![Some(i.to_string())]).collect())
}

#[tokio::test]
async fn an_ordered_read_of_several_shards_is_merged_in_order() {
    let script: Shared = Arc::default();
    {
        let mut s = script.lock().expect("script");
        s.rows.insert("db_1".into(), int_rows(&[1, 4, 9]));
        s.rows.insert("db_2".into(), int_rows(&[2, 3, 10]));
    }
    let engine = engine(&script, &[]).await;
    let (r, buf) = run(&engine, "SELECT id FROM t_order WHERE merchant_id IN (1, 2) ORDER BY id").await;
    assert!(r.is_ok(), "{:?}", r.err());
    assert_eq!(first_values(&buf), ["1", "2", "3", "4", "9", "10"]);
    let tags: Vec<String> = messages(&buf).into_iter().filter(|(t, _)| *t == b'C').map(|(_, b)| String::from_utf8_lossy(&b[..b.len() - 1]).to_string()).collect();
    assert_eq!(tags, ["SELECT 6"], "one CommandComplete for the merged answer");
    let dbs: Vec<String> = seen(&script).into_iter().map(|(d, _)| d).collect();
    assert!(dbs.contains(&"db_1".into()) && dbs.contains(&"db_2".into()) && !dbs.contains(&"db_0".into()), "{dbs:?}");
}

#[tokio::test]
async fn a_shard_error_reaches_the_client_whole() {
    let script: Shared = Arc::default();
    {
        let mut s = script.lock().expect("script");
        s.rows.insert("db_1".into(), int_rows(&[1]));
        s.fail.push(("db_2".into(), "t_order_202611".into(), "42703"));
    }
    let engine = engine(&script, &[]).await;
    let (r, _) = run(&engine, "SELECT id FROM t_order WHERE merchant_id IN (1, 2)").await;
    match r {
        Err(ExecError::Server(e)) => assert_eq!(e.code, "42703"),
        other => panic!("expected the shard's error, got {other:?}"),
    }
}

/// Statements of the two-phase commit, in the order the scripted server saw them.
fn commit_steps(script: &Shared) -> Vec<String> {
    seen(script)
        .into_iter()
        .filter(|(_, s)| s.contains("PREPARE") || s.contains("PREPARED") || s.contains("shardgate_2pc_decisions") && s.starts_with("INSERT"))
        .map(|(d, s)| format!("{d}: {}", s.split('\'').next().unwrap_or("").trim()))
        .collect()
}

const TWO_SHARDS: &str = "INSERT INTO t_order (merchant_id, order_amount, create_time) VALUES (1, 1.00, '2026-11-05 10:00+00'), (2, 2.00, '2026-11-05 10:00+00')";

#[tokio::test]
async fn a_write_on_two_shards_records_its_decision_before_committing() {
    let script: Shared = Arc::default();
    let engine = engine(&script, &[]).await;
    let (r, buf) = run(&engine, TWO_SHARDS).await;
    assert!(r.is_ok(), "{:?}", r.err());
    assert!(messages(&buf).iter().any(|(t, b)| *t == b'C' && b.starts_with(b"INSERT 0 2")), "one tag for both rows");
    let steps = commit_steps(&script);
    let decision = steps.iter().position(|s| s.starts_with("db_default: INSERT")).expect("a decision row");
    let prepared: Vec<usize> = steps.iter().enumerate().filter(|(_, s)| s.contains("PREPARE TRANSACTION")).map(|(i, _)| i).collect();
    let committed: Vec<usize> = steps.iter().enumerate().filter(|(_, s)| s.contains("COMMIT PREPARED")).map(|(i, _)| i).collect();
    assert_eq!((prepared.len(), committed.len()), (2, 2), "{steps:?}");
    assert!(prepared.iter().all(|p| *p < decision) && committed.iter().all(|c| *c > decision), "prepare, decide, commit: {steps:?}");
}

#[tokio::test]
async fn a_failed_prepare_rolls_every_shard_back_and_decides_nothing() {
    let script: Shared = Arc::default();
    script.lock().expect("script").fail.push(("db_2".into(), "PREPARE TRANSACTION".into(), "53100"));
    let engine = engine(&script, &[]).await;
    let (r, _) = run(&engine, TWO_SHARDS).await;
    assert!(r.is_err(), "the write must fail");
    let steps = commit_steps(&script);
    assert!(!steps.iter().any(|s| s.contains("COMMIT PREPARED") || s.starts_with("db_default: INSERT")), "{steps:?}");
    let all = seen(&script);
    // the shard that prepared rolls its prepared transaction back; the other its open one
    assert!(all.iter().any(|(d, s)| d == "db_1" && s.starts_with("ROLLBACK PREPARED")), "{all:?}");
    assert!(!all.iter().any(|(d, s)| d == "db_2" && s.starts_with("COMMIT")), "{all:?}");
}

#[tokio::test]
async fn a_decision_that_cannot_be_recorded_rolls_both_shards_back() {
    let script: Shared = Arc::default();
    script.lock().expect("script").fail.push(("db_default".into(), "shardgate_2pc_decisions (gid".into(), "53100"));
    let engine = engine(&script, &[]).await;
    let (r, _) = run(&engine, TWO_SHARDS).await;
    assert!(r.is_err(), "the write must fail");
    let steps = commit_steps(&script);
    let rolled: Vec<&String> = steps.iter().filter(|s| s.contains("ROLLBACK PREPARED")).collect();
    assert_eq!(rolled.len(), 2, "{steps:?}");
    assert!(!steps.iter().any(|s| s.contains("COMMIT PREPARED")), "{steps:?}");
}

#[tokio::test]
async fn an_unreachable_shard_is_planned_again_around_and_answered_by_policy() {
    let script: Shared = Arc::default();
    script.lock().expect("script").rows.insert("db_1".into(), int_rows(&[1]));
    let engine = engine(&script, &[2]).await;
    assert!(!engine.is_down(2));
    let (r, _) = run(&engine, "SELECT id FROM t_order WHERE merchant_id IN (1, 2)").await;
    // the connect fails before anything is sent: the shard is marked down and the
    // read planned again, which fallback.policy = "fail" refuses with 57P03
    match r {
        Err(ExecError::Proxy(code, m)) => {
            assert_eq!(code, shardgate::protocol::sqlstate::CANNOT_CONNECT_NOW, "{m}");
            assert!(m.contains("db_2"), "{m}");
        }
        other => panic!("expected a refusal by policy, got {other:?}"),
    }
    assert!(engine.is_down(2), "the failed connect marks the shard down");
}

#[tokio::test]
async fn a_block_begins_with_its_first_statement_in_one_round_trip() {
    let script: Shared = Arc::default();
    let engine = engine(&script, &[]).await;
    let (r, _) = run(&engine, TWO_SHARDS).await;
    assert!(r.is_ok(), "{:?}", r.err());
    let all = seen(&script);
    for db in ["db_1", "db_2"] {
        let mine: Vec<&str> = all.iter().filter(|(d, _)| d == db).map(|(_, s)| s.split('\'').next().unwrap_or("").trim()).collect();
        assert_eq!(mine.first().copied(), Some("BEGIN"), "{db}: {mine:?}");
        assert!(mine.get(1).is_some_and(|s| s.starts_with("INSERT INTO t_order_202611")), "{db}: {mine:?}");
        assert_eq!(mine.get(2).copied(), Some("PREPARE TRANSACTION"), "{db}: {mine:?}");
    }
    let flights = script.lock().expect("script").flights.clone();
    // BEGIN + INSERT, PREPARE TRANSACTION (sent once every shard answered), COMMIT PREPARED
    for db in ["db_1", "db_2"] {
        assert_eq!(flights.iter().filter(|d| *d == db).count(), 3, "{db}: {flights:?}");
    }
}

#[tokio::test]
async fn a_begin_that_fails_keeps_its_statement_from_running_outside_the_block() {
    let script: Shared = Arc::default();
    script.lock().expect("script").fail.push(("db_2".into(), "BEGIN".into(), "25001"));
    let engine = engine(&script, &[]).await;
    let (r, _) = run(&engine, TWO_SHARDS).await;
    match r {
        Err(ExecError::Server(e)) => assert_eq!(e.code, "25001", "BEGIN's error is the statement's"),
        other => panic!("expected BEGIN's error, got {other:?}"),
    }
    let all = seen(&script);
    assert!(!all.iter().any(|(d, s)| d == "db_2" && s.starts_with("INSERT")), "the INSERT on db_2 must not run: {all:?}");
    assert!(!all.iter().any(|(_, s)| s.starts_with("COMMIT") || s.contains("shardgate_2pc_decisions")), "nothing is decided or committed: {all:?}");
    assert!(!all.iter().any(|(d, s)| d == "db_2" && s.starts_with("ROLLBACK PREPARED")), "db_2 prepared nothing: {all:?}");
    assert!(all.iter().any(|(d, s)| d == "db_1" && s.starts_with("ROLLBACK")), "db_1's block is rolled back: {all:?}");
    // the connections are in step afterwards: the next statement on both shards works
    let (r, _) = run(&engine, "UPDATE t_order SET order_amount = 3 WHERE merchant_id = 1").await;
    assert!(r.is_ok(), "{:?}", r.err());
}

#[tokio::test]
async fn a_deferred_statement_ahead_of_anything_but_one_pipeline_gets_a_round_trip_of_its_own() {
    use shardgate::backend::query as wire;
    let script: Shared = Arc::default();
    script.lock().expect("script").fail.push(("db_4".into(), "BEGIN".into(), "25001"));
    let port = scripted(script.clone()).await;
    let dsn = shardgate_config::Dsn::parse(&format!("postgres://postgres@127.0.0.1:{port}/db_4?sslmode=disable")).expect("dsn");
    let mut conn = shardgate::backend::ServerConn::connect(&dsn, Duration::from_secs(2)).await.expect("connect");
    // ahead of a simple Query, BEGIN goes first and is answered first: failing, it stops
    // the Query from being sent at all and ends the connection
    conn.defer("BEGIN");
    assert!(conn.has_deferred() && !conn.in_step());
    assert!(wire::control(&mut conn, "UPDATE t_order_202611 SET order_amount = 1").await.is_err(), "BEGIN failed");
    assert!(conn.broken, "a connection whose deferred statement failed is not reused");
    assert!(!seen(&script).iter().any(|(_, s)| s.starts_with("UPDATE")), "the statement behind the failed BEGIN never ran");
    // succeeding, the caller reads its own answer after it, in step
    script.lock().expect("script").fail.clear();
    let mut conn = shardgate::backend::ServerConn::connect(&dsn, Duration::from_secs(2)).await.expect("connect");
    let before = script.lock().expect("script").flights.len();
    conn.defer("BEGIN");
    let tag = wire::control_tag(&mut conn, "COMMIT").await.expect("io").expect("no error");
    assert_eq!(tag, "COMMIT", "the deferred BEGIN's tag is not the caller's");
    assert!(conn.in_step() && !conn.broken);
    let flights = script.lock().expect("script").flights.len() - before;
    assert_eq!(flights, 2, "BEGIN, then COMMIT");
    // ahead of one pipeline it rides in it: one round trip
    let before = script.lock().expect("script").flights.len();
    conn.defer("BEGIN");
    let rows = wire::query(&mut conn, "SELECT 1", &[]).await.expect("io").expect("no error");
    assert!(rows.is_empty() && conn.in_step());
    assert_eq!(script.lock().expect("script").flights.len() - before, 1, "BEGIN rode with the SELECT");
}

#[tokio::test]
async fn a_statement_failing_on_one_of_two_shards_prepares_nothing() {
    let script: Shared = Arc::default();
    script.lock().expect("script").fail.push(("db_2".into(), "INSERT INTO t_order_202611".into(), "23505"));
    let engine = engine(&script, &[]).await;
    let (r, _) = run(&engine, TWO_SHARDS).await;
    match r {
        Err(ExecError::Server(e)) => assert_eq!(e.code, "23505"),
        other => panic!("expected db_2's error, got {other:?}"),
    }
    let all = seen(&script);
    // several shards: each prepares only once every shard has answered
    assert!(!all.iter().any(|(_, s)| s.contains("PREPARE") || s.contains("shardgate_2pc_decisions")), "{all:?}");
    assert!(all.iter().any(|(d, s)| d == "db_1" && s == "ROLLBACK"), "{all:?}");
    // both connections are in step: the next statement on both shards runs and answers
    script.lock().expect("script").fail.clear();
    let (r, buf) = run(&engine, TWO_SHARDS).await;
    assert!(r.is_ok(), "{:?}", r.err());
    assert!(messages(&buf).iter().any(|(t, b)| *t == b'C' && b.starts_with(b"INSERT 0 2")));
}

#[tokio::test]
async fn a_begin_that_fails_ahead_of_several_month_tables_runs_none_of_them() {
    let script: Shared = Arc::default();
    script.lock().expect("script").fail.push(("db_1".into(), "BEGIN".into(), "25001"));
    let engine = engine(&script, &[]).await;
    // two month tables on one shard, in the client's block: BEGIN rides in front of their
    // one pipeline, and if it fails the server skips both
    let (r, _) = run_in(&engine, TWO_MONTHS, Some("BEGIN")).await;
    assert!(r.is_err(), "BEGIN failed: the statement must fail");
    let all = seen(&script);
    assert!(!all.iter().any(|(_, s)| s.starts_with("INSERT")), "no month table's INSERT may run outside the block: {all:?}");
}

const TWO_MONTHS: &str = "INSERT INTO t_order (merchant_id, order_amount, create_time) VALUES (1, 1.00, '2026-11-05 10:00+00'), (1, 2.00, '2026-10-05 10:00+00')";

#[tokio::test]
async fn a_write_over_several_month_tables_of_one_shard_is_one_pipeline_and_one_round_trip() {
    let script: Shared = Arc::default();
    let engine = engine(&script, &[]).await;
    let (r, buf) = run(&engine, TWO_MONTHS).await;
    assert!(r.is_ok(), "{:?}", r.err());
    assert!(messages(&buf).iter().any(|(t, b)| *t == b'C' && b.starts_with(b"INSERT 0 2")));
    let mine: Vec<String> = seen(&script).into_iter().filter(|(d, _)| d == "db_1").map(|(_, s)| s).collect();
    // autocommit: the pipeline's implicit transaction holds both months, no block of its own
    assert_eq!(mine.len(), 2, "two INSERTs and nothing else: {mine:?}");
    assert!(mine.iter().all(|s| s.starts_with("INSERT INTO t_order_2026")), "{mine:?}");
    let flights = script.lock().expect("script").flights.clone();
    assert_eq!(flights.iter().filter(|d| *d == "db_1").count(), 1, "one round trip: {flights:?}");
    // the first month fails: the server skips the second (it never runs), the error is the answer
    let first = mine[0].split_whitespace().nth(2).unwrap_or_default().to_string();
    script.lock().expect("script").fail.push(("db_1".into(), format!("INSERT INTO {first}"), "22012"));
    let before = seen(&script).len();
    let (r, _) = run(&engine, TWO_MONTHS).await;
    match r {
        Err(ExecError::Server(e)) => assert_eq!(e.code, "22012"),
        other => panic!("expected the first month's error, got {other:?}"),
    }
    let after: Vec<(String, String)> = seen(&script)[before..].to_vec();
    assert_eq!(after.len(), 1, "the second month's INSERT was skipped with the first: {after:?}");
    // the connection is in step: the next statement runs and answers
    script.lock().expect("script").fail.clear();
    let (r, buf) = run(&engine, TWO_MONTHS).await;
    assert!(r.is_ok(), "{:?}", r.err());
    assert!(messages(&buf).iter().any(|(t, b)| *t == b'C' && b.starts_with(b"INSERT 0 2")));
}

#[tokio::test]
async fn a_statement_evicted_from_a_connection_is_closed_even_when_a_target_before_it_fails() {
    let script: Shared = Arc::default();
    let mut engine = engine_sized(&script, &[], 1).await;
    engine.max_prepared = 2;
    let one_month = "UPDATE t_order SET order_amount = 1 WHERE merchant_id = 1 AND create_time >= '2026-11-01 00:00+00'";
    let two_months = "UPDATE t_order SET order_amount = 2 WHERE merchant_id = 1";
    // the connection keeps one statement prepared
    let (r, _) = run_as(&engine, one_month, None, false).await;
    assert!(r.is_ok(), "{:?}", r.err());
    // two more: the second target evicts the first statement; the first target fails
    script.lock().expect("script").fail.push(("db_1".into(), "UPDATE t_order_202610 AS t_order SET order_amount = 2".into(), "23514"));
    let (r, _) = run_as(&engine, two_months, None, false).await;
    match r {
        Err(ExecError::Server(e)) => assert_eq!(e.code, "23514"),
        other => panic!("expected the first target's error, got {other:?}"),
    }
    script.lock().expect("script").fail.clear();
    // the evicted statement was closed on the server: preparing it again works
    let (r, _) = run_as(&engine, one_month, None, false).await;
    assert!(r.is_ok(), "the evicted statement was left on the server: {:?}", r.err());
}
