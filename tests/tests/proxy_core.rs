//! The transparent proxy core against real PostgreSQL 15, driven by real
//! clients: tokio-postgres, psql, pgbench, psycopg 3 and asyncpg.
// tokio_postgres::Client is not Debug, so `expect_err` cannot be used on connect results
#![allow(clippy::err_expect)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use shardgate_tests::raw::{frame, read_msgs_until};
use shardgate_tests::{connect, sqlstate, Cluster, Options, APP_USER, MD5_USER};

fn core(server_toml: &str, pool_toml: &str) -> Cluster {
    Cluster::start_temp(Options {
        all_clusters: false,
        redis: false,
        proxy: true,
        server_toml: server_toml.into(),
        pool_toml: pool_toml.into(),
        extra_toml: String::new(),
        legacy: false,
        tls: false,
    })
    .expect("start cluster")
}

#[tokio::test]
async fn simple_extended_transactions_and_errors_pass_through() {
    let c = core("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text); INSERT INTO kv VALUES (1, 'one'), (2, 'two')").await.expect("ddl");
    // extended protocol with parameters (unnamed and named statements)
    let row = client.query_one("SELECT v FROM kv WHERE k = $1", &[&2i32]).await.expect("query");
    assert_eq!(row.get::<_, String>(0), "two");
    let stmt = client.prepare("SELECT k, v FROM kv WHERE k >= $1 ORDER BY k").await.expect("prepare");
    assert_eq!(client.query(&stmt, &[&1i32]).await.expect("q").len(), 2);
    // server errors keep their SQLSTATE, and the session continues
    let e = client.simple_query("SELECT * FROM nope").await.expect_err("unknown table");
    assert_eq!(sqlstate(&e).as_deref(), Some("42P01"));
    let e = client.query("SELECT 1/0", &[]).await.expect_err("division");
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));
    // a transaction stays on one server connection and rolls back as a unit
    client.batch_execute("BEGIN; INSERT INTO kv VALUES (3, 'three')").await.expect("begin");
    let n: i64 = client.query_one("SELECT count(*) FROM kv", &[]).await.expect("in tx").get(0);
    assert_eq!(n, 3);
    client.batch_execute("ROLLBACK").await.expect("rollback");
    let n: i64 = client.query_one("SELECT count(*) FROM kv", &[]).await.expect("after").get(0);
    assert_eq!(n, 2);
    // a failed transaction reports 25P02 until it ends
    client.batch_execute("BEGIN").await.expect("begin");
    assert!(client.batch_execute("SELECT 1/0").await.is_err());
    let e = client.batch_execute("SELECT 1").await.expect_err("aborted");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"));
    client.batch_execute("ROLLBACK").await.expect("rollback");
    client.batch_execute("SELECT 1").await.expect("usable again");
}

#[tokio::test]
async fn prepared_statements_survive_pooling_with_more_clients_than_servers() {
    let c = core("", "size = 2");
    let setup = connect(&c.info.proxy_dsn).await.expect("connect");
    setup.batch_execute("CREATE TABLE p (id int PRIMARY KEY, v int); INSERT INTO p SELECT g, g * 10 FROM generate_series(1, 100) g").await.expect("setup");
    let mut tasks = Vec::new();
    for w in 0..8i32 {
        let dsn = c.info.proxy_dsn.clone();
        tasks.push(tokio::spawn(async move {
            let client = connect(&dsn).await.expect("connect");
            let stmt = client.prepare("SELECT v FROM p WHERE id = $1").await.expect("prepare");
            let upd = client.prepare("UPDATE p SET v = v WHERE id = $1").await.expect("prepare update");
            for i in 0..150i32 {
                let id = (w * 13 + i) % 100 + 1;
                // each execution is its own transaction: the server behind it changes
                let v: i32 = client.query_one(&stmt, &[&id]).await.expect("execute prepared").get(0);
                assert_eq!(v, id * 10);
                if i % 10 == 0 {
                    client.batch_execute("BEGIN").await.expect("begin");
                    assert_eq!(client.execute(&upd, &[&id]).await.expect("update"), 1);
                    client.batch_execute("COMMIT").await.expect("commit");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    // the pool never grew beyond its size
    let metrics = reqwest_text(&format!("{}/metrics", c.info.admin_url));
    assert!(metrics.contains("shardgate_pool_connections{state=\"size\"} 2"), "{metrics}");
}

fn reqwest_text(url: &str) -> String {
    // tiny HTTP/1.0 GET over std, enough for the admin endpoints
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = TcpStream::connect(host).expect("admin connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[tokio::test]
async fn cancel_reaches_the_running_query_within_a_second() {
    let c = core("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let other = connect(&c.info.proxy_dsn).await.expect("connect other");
    let token = client.cancel_token();
    let other_token = other.cancel_token();
    let slow = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = client.simple_query("SELECT pg_sleep(10)").await;
        (r.map(|_| ()), t0)
    });
    // a second client's long query must not be touched by the first client's cancel
    let other_slow = tokio::spawn(async move { other.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
    // cancel once the statement runs on the server (a cancel before it starts does
    // nothing, in PostgreSQL too): a fixed wait was too short on a loaded machine
    let db = connect(&c.info.default_dsn).await.expect("db_default");
    let t0 = Instant::now();
    loop {
        let n: i64 = db
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(10)'", &[])
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n > 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(8), "the slow statement never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t_cancel = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.expect("send cancel");
    let (r, _) = slow.await.expect("join");
    let took = t_cancel.elapsed();
    let e = r.expect_err("cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"));
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    other_slow.await.expect("join").expect("other query was not cancelled");
    // a cancel for a client that holds no server does nothing
    other_token.cancel_query(tokio_postgres::NoTls).await.expect("send idle cancel");
}

#[tokio::test]
async fn copy_in_and_out_of_100k_rows() {
    let c = core("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("CREATE TABLE cp (id int, name text)").await.expect("ddl");
    let sink = client.copy_in("COPY cp FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..100_000 {
        chunk.push_str(&format!("{i}\tname-{i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(Bytes::from(std::mem::take(&mut chunk))).await.expect("send");
        }
    }
    sink.send(Bytes::from(chunk)).await.expect("send");
    let n = match sink.finish().await {
        Ok(n) => n,
        Err(e) => panic!("finish: {e:?}\n{}", c.proxy_log()),
    };
    assert_eq!(n, 100_000);
    let stream = match client.copy_out("COPY (SELECT * FROM cp ORDER BY id) TO STDOUT").await {
        Ok(s) => s,
        Err(e) => panic!("copy out: {e:?}\n{}", c.proxy_log()),
    };
    futures_util::pin_mut!(stream);
    let mut data = Vec::new();
    while let Some(b) = stream.next().await {
        data.extend_from_slice(&b.expect("chunk"));
    }
    let text = String::from_utf8(data).expect("utf8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 100_000);
    assert_eq!(lines[99_999], "99999\tname-99999");
    let sum: i64 = client.query_one("SELECT sum(id)::bigint FROM cp", &[]).await.expect("sum").get(0);
    assert_eq!(sum, (0..100_000i64).sum::<i64>());
    // a failed COPY FROM leaves the session usable
    let sink = client.copy_in::<_, Bytes>("COPY cp FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"not-a-number\tx\n")).await.expect("send");
    let e = sink.finish().await.expect_err("bad row");
    assert_eq!(sqlstate(&e).as_deref(), Some("22P02"));
    client.batch_execute("SELECT 1").await.expect("usable");
}

#[tokio::test]
async fn authentication_scram_md5_and_failures() {
    let c = core("", "");
    let i = &c.info;
    connect(&i.proxy_dsn_for(MD5_USER.0, MD5_USER.1)).await.expect("md5 user").batch_execute("SELECT 1").await.expect("query");
    for (user, pw) in [(APP_USER.0, "wrong"), ("nosuchuser", "x"), (MD5_USER.0, "wrong")] {
        let e = connect(&i.proxy_dsn_for(user, pw)).await.err().expect("refused");
        let db = e.as_db_error().expect("server error");
        assert_eq!(db.code().code(), "28P01", "{user}");
        assert_eq!(db.message(), format!("password authentication failed for user \"{user}\""));
    }
    // the proxy's log never holds the password
    let log = c.proxy_log();
    assert!(!log.contains(APP_USER.1) && !log.contains(MD5_USER.1) && !log.contains("postgres:postgres"), "secret in log");
}

fn read_all(mut s: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn malformed_input_gets_an_error_and_others_keep_working() {
    let c = core("max_message_size = 65536", "");
    let healthy = connect(&c.info.proxy_dsn).await.expect("connect");
    // SSLRequest and GSSENCRequest are declined with 'N', then startup proceeds
    let mut s = shardgate_tests::raw::connect(&c);
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).expect("ssl");
    let mut n = [0u8; 1];
    s.read_exact(&mut n).expect("answer");
    assert_eq!(&n, b"N");
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).expect("gss");
    s.read_exact(&mut n).expect("answer");
    assert_eq!(&n, b"N");
    drop(s);
    // invalid UTF-8 in the startup packet
    let mut s = shardgate_tests::raw::connect(&c);
    s.write_all(&shardgate_tests::raw::startup_packet(&[("user", b"\xff\xfe")])).expect("write");
    let r = read_all(s);
    assert!(contains(&r, "08P01") && contains(&r, "invalid UTF-8"), "{:?}", String::from_utf8_lossy(&r));
    // a startup length that is absurd
    let mut s = shardgate_tests::raw::connect(&c);
    s.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).expect("write");
    let r = read_all(s);
    assert!(contains(&r, "08P01"), "{:?}", String::from_utf8_lossy(&r));
    // protocol 2 is refused
    let mut s = shardgate_tests::raw::connect(&c);
    s.write_all(&[0, 0, 0, 9, 0, 2, 0, 0, 0]).expect("write");
    assert!(contains(&read_all(s), "0A000"));
    // no user
    let mut s = shardgate_tests::raw::connect(&c);
    s.write_all(&shardgate_tests::raw::startup_packet(&[("database", b"x")])).expect("write");
    assert!(contains(&read_all(s), "28000"));
    // after login: oversize length prefix is refused before allocating
    let mut s = shardgate_tests::raw::md5_login(&c);
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xf0]).expect("write");
    let r = read_all(s);
    assert!(contains(&r, "54000") && contains(&r, "exceeds server.max_message_size"), "{:?}", String::from_utf8_lossy(&r));
    // a length smaller than the length field
    let mut s = shardgate_tests::raw::md5_login(&c);
    s.write_all(&[b'Q', 0, 0, 0, 2]).expect("write");
    assert!(contains(&read_all(s), "08P01"));
    // an unknown message type
    let mut s = shardgate_tests::raw::md5_login(&c);
    s.write_all(&[b'?', 0, 0, 0, 4]).expect("write");
    let r = read_all(s);
    assert!(contains(&r, "08P01") && contains(&r, "invalid frontend message type"), "{:?}", String::from_utf8_lossy(&r));
    // a malformed Bind body
    let mut s = shardgate_tests::raw::md5_login(&c);
    s.write_all(&[b'B', 0, 0, 0, 6, b'x', b'y']).expect("write");
    assert!(contains(&read_all(s), "08P01"));
    // a truncated frame, then the client goes away
    let mut s = shardgate_tests::raw::md5_login(&c);
    s.write_all(&[b'Q', 0, 0, 1, 0, b's', b'e']).expect("write");
    drop(s);
    // a Sync with nothing before it is answered like PostgreSQL does
    let mut s = shardgate_tests::raw::md5_login(&c);
    s.write_all(&[b'S', 0, 0, 0, 4]).expect("sync");
    let mut z = [0u8; 6];
    s.read_exact(&mut z).expect("ready");
    assert_eq!(&z, b"Z\0\0\0\x05I");
    // the healthy client never noticed
    let v: i32 = healthy.query_one("SELECT 41 + 1", &[]).await.expect("still served").get(0);
    assert_eq!(v, 42);
    connect(&c.info.proxy_dsn).await.expect("new clients still accepted");
}

#[tokio::test]
async fn pool_checkout_timeout_gives_53300_and_client_limit_gives_53300() {
    let c = core("max_client_connections = 3", "size = 1\ncheckout_timeout_ms = 300");
    let a = connect(&c.info.proxy_dsn).await.expect("a");
    let b = connect(&c.info.proxy_dsn).await.expect("b");
    a.batch_execute("BEGIN; SELECT 1").await.expect("a holds the only server");
    let t0 = Instant::now();
    let e = b.simple_query("SELECT 1").await.expect_err("no server free");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"));
    assert!(t0.elapsed() >= Duration::from_millis(250), "waited {:?}", t0.elapsed());
    a.batch_execute("COMMIT").await.expect("commit");
    b.batch_execute("SELECT 1").await.expect("server free again");
    let _c3 = connect(&c.info.proxy_dsn).await.expect("third client");
    let e = connect(&c.info.proxy_dsn).await.err().expect("fourth refused");
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("53300"));
}

#[tokio::test]
async fn session_state_pins_the_client_and_never_leaks() {
    let c = core("", "size = 2");
    let a = connect(&c.info.proxy_dsn).await.expect("a");
    let b = connect(&c.info.proxy_dsn).await.expect("b");
    let default_timeout: String = b.query_one("SHOW statement_timeout", &[]).await.expect("show").get(0);
    a.batch_execute("SET statement_timeout = '1234ms'").await.expect("set");
    a.batch_execute("CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (1)").await.expect("temp");
    // A keeps its session across transactions
    for _ in 0..5 {
        let st: String = a.query_one("SHOW statement_timeout", &[]).await.expect("show").get(0);
        assert_eq!(st, "1234ms");
        let n: i64 = a.query_one("SELECT count(*) FROM mine", &[]).await.expect("temp visible").get(0);
        assert_eq!(n, 1);
    }
    // B never sees A's state, whichever server it gets
    for _ in 0..5 {
        let st: String = b.query_one("SHOW statement_timeout", &[]).await.expect("show").get(0);
        assert_eq!(st, default_timeout);
        let e = b.query("SELECT * FROM mine", &[]).await.expect_err("not B's table");
        assert_eq!(sqlstate(&e).as_deref(), Some("42P01"));
    }
    // when A leaves, its server is discarded, not reused with A's state
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(connect(&c.info.proxy_dsn).await.expect("client"));
    }
    for cl in &clients {
        cl.batch_execute("BEGIN").await.expect("hold a server");
    }
    for cl in &clients {
        let st: String = cl.query_one("SHOW statement_timeout", &[]).await.expect("show").get(0);
        assert_eq!(st, default_timeout);
        assert!(cl.query("SELECT * FROM mine", &[]).await.is_err());
        cl.batch_execute("COMMIT").await.expect("commit");
    }
}

#[tokio::test]
async fn client_startup_parameters_follow_the_client_across_servers() {
    let c = core("", "size = 1");
    let tokyo = connect(&format!("{}&options=-c%20TimeZone%3DAsia%2FTokyo", c.info.proxy_dsn)).await.expect("tokyo");
    let plain = connect(&c.info.proxy_dsn).await.expect("plain");
    for _ in 0..3 {
        let tz: String = tokyo.query_one("SHOW TimeZone", &[]).await.expect("show").get(0);
        assert_eq!(tz, "Asia/Tokyo");
        let tz: String = plain.query_one("SHOW TimeZone", &[]).await.expect("show").get(0);
        assert_ne!(tz, "Asia/Tokyo");
    }
}

#[tokio::test]
async fn timeouts_idle_idle_in_transaction_and_query() {
    let c = core("client_idle_timeout_ms = 400\nidle_in_transaction_timeout_ms = 400\nquery_timeout_ms = 500", "");
    // query timeout cancels with 57014
    let q = connect(&c.info.proxy_dsn).await.expect("q");
    let t0 = Instant::now();
    let e = q.simple_query("SELECT pg_sleep(5)").await.expect_err("timed out");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // idle in transaction: FATAL 25P03 and the connection closes
    let t = connect(&c.info.proxy_dsn).await.expect("t");
    t.batch_execute("BEGIN").await.expect("begin");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let e = t.batch_execute("SELECT 1").await.expect_err("closed");
    assert!(t.is_closed() || sqlstate(&e).as_deref() == Some("25P03"), "{e}");
    // idle session: FATAL 57P05
    let i = connect(&c.info.proxy_dsn).await.expect("i");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(i.batch_execute("SELECT 1").await.is_err());
    assert!(i.is_closed());
    let log = c.proxy_log();
    assert!(log.contains("query timeout"), "{log}");
}

#[tokio::test]
async fn sigterm_lets_running_transactions_finish_and_refuses_new_clients() {
    let mut c = core("shutdown_timeout_ms = 10000", "");
    let a = connect(&c.info.proxy_dsn).await.expect("a");
    a.batch_execute("CREATE TABLE g (x int)").await.expect("ddl");
    a.batch_execute("BEGIN; INSERT INTO g VALUES (1)").await.expect("open tx");
    let idle = connect(&c.info.proxy_dsn).await.expect("idle");
    let pid = c.info.proxy_pid.expect("pid");
    Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("kill");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect(&c.info.proxy_dsn).await.is_err(), "new clients refused while draining");
    assert!(idle.batch_execute("SELECT 1").await.is_err(), "idle client closed");
    a.batch_execute("INSERT INTO g VALUES (2); COMMIT").await.expect("running transaction finishes");
    let st = c.stop_proxy(Duration::from_secs(10)).expect("proxy exits").expect("status");
    assert!(st.success(), "{st}");
    let direct = connect(&c.info.default_dsn).await.expect("direct");
    let n: i64 = direct.query_one("SELECT count(*) FROM g", &[]).await.expect("count").get(0);
    assert_eq!(n, 2, "the committed transaction is durable");
}

#[tokio::test]
async fn dead_server_connections_are_replaced_not_handed_out() {
    let c = core("", "size = 2");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("SELECT 1").await.expect("warm the pool");
    // kill every server backend the proxy holds
    let direct = connect(&c.info.default_dsn).await.expect("direct");
    let killed: i64 = direct
        .query_one("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'shardgate' AND pid <> pg_backend_pid()", &[])
        .await
        .expect("terminate")
        .get(0);
    assert!(killed >= 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        client.batch_execute("SELECT 1").await.expect("served by a fresh server connection");
    }
}

#[tokio::test]
async fn admin_http_livez_readyz_metrics() {
    let c = core("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("SELECT 1").await.expect("query");
    assert!(reqwest_text(&format!("{}/livez", c.info.admin_url)).starts_with("HTTP/1.0 200"));
    assert!(reqwest_text(&format!("{}/readyz", c.info.admin_url)).starts_with("HTTP/1.0 200"));
    let m = reqwest_text(&format!("{}/metrics", c.info.admin_url));
    for name in [
        "shardgate_client_connections_total",
        "shardgate_queries_total{kind=\"simple\"}",
        "shardgate_pool_wait_seconds_bucket",
        "shardgate_client_connections ",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
    // default database down: not ready
    for cl in &c.info.clusters {
        cl.stop_immediate().expect("stop");
    }
    let r = reqwest_text(&format!("{}/readyz", c.info.admin_url));
    assert!(r.starts_with("HTTP/1.0 503"), "{r}");
    assert!(reqwest_text(&format!("{}/livez", c.info.admin_url)).starts_with("HTTP/1.0 200"));
}

#[test]
fn psql_and_pgbench_in_every_query_mode() {
    let c = core("", "size = 4");
    let dsn = &c.info.proxy_dsn;
    let out = Command::new("psql").arg(dsn).args(["-XAtc", "select 1 + 1"]).output().expect("psql");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2", "{}", String::from_utf8_lossy(&out.stderr));
    // psql with sslmode=prefer sends SSLRequest first and falls back to plain text
    let prefer = dsn.replace("sslmode=disable", "sslmode=prefer");
    let out = Command::new("psql").arg(&prefer).args(["-XAtc", "select 'plain'"]).output().expect("psql");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "plain");
    let port = c.info.proxy_port.to_string();
    let pgbench = |args: &[&str]| {
        let out = Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port, "-U", APP_USER.0])
            .args(args)
            .arg("shardgate")
            .env("PGPASSWORD", APP_USER.1)
            .output()
            .expect("pgbench");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    };
    pgbench(&["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        // one thread per client: pgbench's blocking PQprepare would otherwise stall the
        // other clients of its thread while they hold servers (true of any transaction pooler)
        let text = pgbench(&["-c", "8", "-j", "8", "-t", "200", "-M", mode]);
        assert!(text.contains("number of transactions actually processed: 1600/1600"), "{mode}: {text}");
        assert!(text.contains("number of failed transactions: 0"), "{mode}: {text}");
    }
}

#[test]
fn psycopg3_and_asyncpg_normal_prepared_and_pipeline() {
    let c = core("", "size = 3");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/clients.py");
    let out = Command::new("python3").arg(script).arg(&c.info.proxy_dsn).output().expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("clients ok"), "{text}\n--- proxy log ---\n{}", c.proxy_log());
}

/// Reads messages until one with `tag` arrives; returns all tags seen.
fn read_until(s: &mut TcpStream, tag: u8) -> Vec<u8> {
    read_msgs_until(s, tag).into_iter().map(|(t, _)| t).collect()
}

#[tokio::test]
async fn messages_sent_after_an_error_and_before_sync_are_skipped_in_step() {
    let c = core("", "");
    let mut s = shardgate_tests::raw::md5_login(&c);
    // batch part 1: fails at Execute; Flush so the error reaches the client before Sync is sent
    let mut out = frame(b'P', b"\0SELECT 1/0\0\0\0");
    out.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend(frame(b'E', b"\0\0\0\0\0"));
    out.extend(frame(b'H', b""));
    s.write_all(&out).expect("write");
    assert_eq!(read_until(&mut s, b'E'), b"1E", "ParseComplete, then the error (1/0 is folded when Bind plans)");
    // part 2 of the same batch: the server skips all of it, then answers the Sync
    let mut out = frame(b'P', b"named\0SELECT 1\0\0\0");
    out.extend(frame(b'P', b"\0SELECT 2\0\0\0"));
    out.extend(frame(b'C', b"Snamed\0"));
    out.extend(frame(b'S', b""));
    s.write_all(&out).expect("write");
    assert_eq!(read_until(&mut s, b'Z'), b"Z");
    // the session is in step: a query afterwards is answered normally
    s.write_all(&frame(b'Q', b"SELECT 7\0")).expect("write");
    assert_eq!(read_until(&mut s, b'Z'), b"TDCZ");
}


#[tokio::test]
async fn reusing_a_prepared_statement_name_gives_42p05_like_postgres() {
    let c = core("", "");
    let mut s = shardgate_tests::raw::md5_login(&c);
    // create "dup", then Parse "dup" again in the same batch: 42P05, rest skipped until Sync
    let mut out = frame(b'P', b"dup\0SELECT 1\0\0\0");
    out.extend(frame(b'P', b"dup\0SELECT 2\0\0\0"));
    out.extend(frame(b'P', b"\0SELECT 3\0\0\0"));
    out.extend(frame(b'S', b""));
    s.write_all(&out).expect("write");
    let got = read_msgs_until(&mut s, b'Z');
    let tags: Vec<u8> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, b"1EZ", "ParseComplete, the duplicate's error, ReadyForQuery");
    let err = String::from_utf8_lossy(&got[1].1).to_string();
    assert!(err.contains("C42P05") && err.contains("prepared statement \"dup\" already exists"), "{err}");
    // the original statement still works
    let mut out = frame(b'B', b"\0dup\0\0\0\0\0\0\0");
    out.extend(frame(b'E', b"\0\0\0\0\0"));
    out.extend(frame(b'S', b""));
    s.write_all(&out).expect("write");
    let got = read_msgs_until(&mut s, b'Z');
    let tags: Vec<u8> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, b"2DCZ");
    assert_eq!(got[1].1, b"\0\x01\0\0\0\x011", "the first definition (SELECT 1) answers");
    // inside a transaction block the duplicate aborts the transaction, as in PostgreSQL
    s.write_all(&frame(b'Q', b"BEGIN\0")).expect("write");
    read_until(&mut s, b'Z');
    let mut out = frame(b'P', b"dup\0SELECT 9\0\0\0");
    out.extend(frame(b'S', b""));
    s.write_all(&out).expect("write");
    let got = read_msgs_until(&mut s, b'Z');
    assert_eq!(got.iter().map(|(t, _)| *t).collect::<Vec<_>>(), b"EZ");
    assert_eq!(got[1].1, b"E", "transaction is aborted");
    s.write_all(&frame(b'Q', b"SELECT 1\0")).expect("write");
    let got = read_msgs_until(&mut s, b'Z');
    assert!(String::from_utf8_lossy(&got[0].1).contains("C25P02"), "commands are refused until ROLLBACK");
    s.write_all(&frame(b'Q', b"ROLLBACK\0")).expect("write");
    let got = read_msgs_until(&mut s, b'Z');
    assert_eq!(got.last().map(|(_, b)| b.clone()), Some(b"I".to_vec()));
}

#[tokio::test]
async fn a_server_connection_keeps_at_most_max_prepared_statements_closing_the_least_recently_used() {
    // one server connection, room for 16 statements (the least allowed)
    let c = core("", "size = 1\nmax_prepared_statements = 16");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let mut stmts = Vec::new();
    for i in 0..40i32 {
        stmts.push(client.prepare(&format!("SELECT {i}::int + $1::int")).await.expect("prepare"));
    }
    // every statement keeps working, in any order, while others push it out and it comes back
    for round in 0..3 {
        for (i, s) in stmts.iter().enumerate().rev() {
            let v: i32 = client.query_one(s, &[&1i32]).await.unwrap_or_else(|e| panic!("round {round}, statement {i}: {e:?}")).get(0);
            assert_eq!(v, i as i32 + 1);
        }
    }
    // the server session behind the proxy holds no more than the cap (this query's own statement included)
    let n: i64 = client.query_one("SELECT count(*) FROM pg_prepared_statements", &[]).await.expect("count").get(0);
    assert!((1..=16).contains(&n), "{n} statements prepared on the server");
}

/// Parse of `name` (no parameter types).
fn parse_msg(name: &str, sql: &str) -> Vec<u8> {
    let body = [name.as_bytes(), &[0], sql.as_bytes(), &[0], &[0, 0]].concat();
    frame(b'P', &body)
}

/// Bind of the unnamed portal to `name` (no parameters, text results), then Execute and nothing else.
fn bind_execute(name: &str) -> Vec<u8> {
    let bind = [&[0u8][..], name.as_bytes(), &[0], &[0, 0, 0, 0, 0, 0]].concat();
    [frame(b'B', &bind), frame(b'E', &[0, 0, 0, 0, 0])].concat()
}

/// Reads until `n` ReadyForQuery messages arrived; returns the message tags and bodies.
fn read_messages(s: &mut TcpStream, n: usize) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut ready = 0;
    while ready < n {
        let mut hdr = [0u8; 5];
        s.read_exact(&mut hdr).expect("message header");
        let len = i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).expect("message body");
        if hdr[0] == b'Z' {
            ready += 1;
        }
        out.push((hdr[0], body));
    }
    out
}

#[test]
fn a_close_the_server_skipped_after_an_error_leaves_the_statement_known() {
    // room for 16; an error in the batch makes the server skip the Close the proxy
    // adds to make room, so that statement must still count as prepared there
    let c = core("", "size = 1\nmax_prepared_statements = 16");
    let mut s = shardgate_tests::raw::md5_login(&c);
    let sync = frame(b'S', &[]);
    // batch 1: sixteen statements fill the room ("s0" is the least recently used, then "s1")
    let fill: Vec<u8> = (0..16).flat_map(|i| parse_msg(&format!("s{i}"), &format!("SELECT {}", 100 + i))).collect();
    s.write_all(&[fill, sync.clone()].concat()).expect("batch 1");
    let r = read_messages(&mut s, 1);
    assert!(r.iter().all(|(t, _)| *t != b'E'), "batch 1: {r:?}");
    // batch 2: "d" makes room (closes "s0"), fails when run; then "e" would close "s1", but
    // the server skips everything after the error up to Sync
    s.write_all(&[parse_msg("d", "SELECT 1/0"), bind_execute("d"), parse_msg("e", "SELECT 5"), sync.clone()].concat()).expect("batch 2");
    let r = read_messages(&mut s, 1);
    let errors: Vec<String> = r.iter().filter(|(t, _)| *t == b'E').map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
    assert!(errors.len() == 1 && errors[0].contains("22012"), "batch 2: one division by zero, got {errors:?}");
    // batch 3: the text of "s1" again under another client name: the server still has it,
    // so the proxy must not Parse it under the same server name (42P05)
    s.write_all(&[parse_msg("f", "SELECT 101"), bind_execute("f"), sync.clone()].concat()).expect("batch 3");
    let r = read_messages(&mut s, 1);
    let errors: Vec<String> = r.iter().filter(|(t, _)| *t == b'E').map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
    assert!(errors.is_empty(), "batch 3: {errors:?}");
    let row = r.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert!(row.1.ends_with(b"101"), "SELECT 101 answered {:?}", row.1);
}

/// Bytes that reach the proxy just after it read the ones before them are read
/// too, without waiting for the client's next message. 96e11b4 cleared a
/// socket's read readiness after a short read with the readiness seen *after*
/// the read, so bytes arriving between the read and the clear lost their
/// wake-up: the session waited for more input while the client waited for the
/// answer (a 60 s hang of a driver's prepare in CI, the driver having sent the
/// Close of its previous statement in a write of its own just before). Here a
/// client sends two Syncs in two writes, with a gap that sweeps the window, many
/// times over; every Sync must be answered.
#[test]
fn bytes_arriving_right_after_a_read_are_not_left_unread() {
    let c = core("", "");
    // other clients keep the proxy's workers busy, so one of them polls for socket
    // events (between its tasks) while another is inside this session's read
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy: Vec<_> = (0..3)
        .map(|_| {
            let mut o = shardgate_tests::raw::md5_login(&c);
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let sync = frame(b'S', &[]);
                let mut z = [0u8; 6];
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    o.write_all(&sync).map_err(|e| format!("write after {n} Syncs: {e}"))?;
                    // these can hit the same race: a Sync left unread is a failure here too
                    o.read_exact(&mut z).map_err(|e| format!("no answer to Sync {n} within 10 s: {e}"))?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut s = shardgate_tests::raw::md5_login(&c);
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let sync = frame(b'S', &[]);
    let rounds: u64 = std::env::var("SHARDGATE_SYNC_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60_000);
    let t0 = Instant::now();
    for i in 0..rounds {
        // a gap of 0 to 100 µs between the two writes
        let gap = Duration::from_nanos((i % 500) * 200);
        s.write_all(&sync).expect("first Sync");
        let start = Instant::now();
        while start.elapsed() < gap {
            std::hint::spin_loop();
        }
        s.write_all(&sync).expect("second Sync");
        let mut got = [0u8; 12];
        if let Err(e) = s.read_exact(&mut got) {
            panic!("round {i} of {rounds} (gap {gap:?}): the proxy did not answer both Syncs within 3 s ({e}): it left the second one unread");
        }
        assert_eq!(got, *b"Z\0\0\0\x05IZ\0\0\0\x05I", "round {i}: two ReadyForQuery, idle");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in busy {
        let n = b.join().expect("busy client").unwrap_or_else(|e| panic!("a busy client: {e}"));
        assert!(n > 0, "a busy client got no answer at all");
    }
    println!("{rounds} pairs of Syncs answered in {:.1}s", t0.elapsed().as_secs_f64());
}

/// A named Parse that fails (or that the server skips after an earlier
/// error) makes no statement, as in PostgreSQL: the name can be prepared
/// again, and `DEALLOCATE` of it answers 26000. A `DEALLOCATE` pipelined
/// behind a statement that fails a block answers 25P02 and drops nothing.
#[tokio::test]
async fn a_failed_parse_makes_no_statement_and_deallocate_waits_for_the_answers_before_it() {
    use shardgate_tests::raw::{error_code, md5_login, read_until_ready};
    let c = core("", "");
    let mut s = md5_login(&c);
    let parse = |name: &str, sql: &str| frame(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat());
    let bind_exec = |name: &str| {
        let mut m = frame(b'B', &[b"\0", name.as_bytes(), b"\0\0\0\0\0\0\0"].concat());
        m.extend_from_slice(&frame(b'E', b"\0\0\0\0\0"));
        m
    };
    let sync = frame(b'S', &[]);
    let query = |sql: &str| frame(b'Q', &[sql.as_bytes(), b"\0"].concat());
    // a Parse that fails, and one the server skips behind it
    s.write_all(&[parse("s1", "SELEC 1"), parse("s2", "SELECT 2"), sync.clone()].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut s)).as_deref(), Some("42601"));
    for name in ["s1", "s2"] {
        s.write_all(&query(&format!("DEALLOCATE {name}"))).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)).as_deref(), Some("26000"), "DEALLOCATE {name}: no such statement");
        s.write_all(&[parse(name, "SELECT 3"), bind_exec(name), sync.clone()].concat()).expect("send");
        let msgs = read_until_ready(&mut s);
        assert_eq!(error_code(&msgs), None, "{name} can be prepared now");
        assert!(msgs.iter().any(|(t, _)| *t == b'D'), "{name} ran");
    }
    // BEGIN, a failing statement and DEALLOCATE in one write: the block has failed when
    // the DEALLOCATE runs, so it answers 25P02 and s1 stays
    s.write_all(&[query("BEGIN"), query("SELECT 1/0"), query("DEALLOCATE s1")].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    assert_eq!(error_code(&read_until_ready(&mut s)).as_deref(), Some("22012"));
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs).as_deref(), Some("25P02"));
    assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', b"E".to_vec())), "still in the failed block");
    s.write_all(&[query("ROLLBACK"), bind_exec("s1"), sync.clone()].concat()).expect("send");
    read_until_ready(&mut s);
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "s1 is still there");
    assert!(msgs.iter().any(|(t, _)| *t == b'D'));
}
