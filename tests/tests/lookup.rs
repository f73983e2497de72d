//! `order_no` is unique across every shard and month, as one table's unique
//! index makes it, and a lookup by it goes to one shard and month
//! (`unique_lookups = ["order_no"]`, the default for `t_order`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardgate_tests::{connect, http_get, sqlstate, Cluster, Options};

const FAST: &str = "[health]\nprobe_interval_ms = 200\nprobe_timeout_ms = 2000\nfailure_threshold = 2\nrecovery_threshold = 2\n[fallback]\nsync_interval_ms = 300\n";

fn start() -> Cluster {
    Cluster::start_temp(Options { redis: false, extra_toml: FAST.into(), ..Options::default() }).expect("start cluster")
}

fn health(c: &Cluster) -> serde_json::Value {
    let (_, body) = http_get(&format!("{}/health", c.info.admin_url)).unwrap_or_default();
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

fn insert(no: &str, merchant: i64, time: &str) -> String {
    format!("INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ('{no}', {merchant}, 1.00, 'NEW', '{time}')")
}

/// `shardgate_shard_queries_total` per shard.
fn shard_queries(admin: &str) -> HashMap<String, f64> {
    let (_, body) = http_get(&format!("{admin}/metrics")).expect("metrics");
    body.lines()
        .filter(|l| l.starts_with("shardgate_shard_queries_total{"))
        .filter_map(|l| {
            let shard = l.split("shard=\"").nth(1)?.split('"').next()?.to_string();
            let v = l.rsplit(' ').next()?.parse().ok()?;
            Some((shard, v))
        })
        .collect()
}

/// Waits until the proxy has filled the lookup from the rows already on the
/// shards (until then reads by `order_no` go to every shard): its state row
/// says complete, and the proxy marks it so in memory right after writing it.
async fn wait_filled(c: &Cluster) {
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let t0 = Instant::now();
    loop {
        let done = def.query_opt("SELECT complete FROM shardgate_lookup_state WHERE lookup_table = 'shardgate_lookup_t_order_order_no'", &[]).await.ok().flatten().is_some_and(|r| r.get::<_, bool>(0));
        if done {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the lookup was never filled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows with `order_no` on every shard (all months), read on the shards themselves.
async fn copies(c: &Cluster, order_no: &str) -> usize {
    let mut n = 0;
    for dsn in &c.info.shards {
        let shard = connect(dsn).await.expect("shard");
        for t in shardgate_tests::month_tables(&shard).await {
            n += shard.query_one(&format!("SELECT count(*) FROM {t} WHERE order_no = $1"), &[&order_no]).await.expect("count").get::<_, i64>(0) as usize;
        }
    }
    n
}

#[tokio::test]
async fn a_taken_order_no_is_refused_on_every_shard_and_month_as_one_table_refuses_it() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute(&insert("U1", 1, "2026-11-02 10:00+00")).await.expect("first");
    // another merchant (another shard), the same merchant in another month, bound as a parameter
    for sql in [insert("U1", 2, "2026-11-02 10:00+00"), insert("U1", 1, "2026-10-02 10:00+00"), insert("U1", 9, "2026-12-02 10:00+00")] {
        let e = client.batch_execute(&sql).await.expect_err("duplicate order_no");
        assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{sql}: {e}");
        let db = e.as_db_error().expect("server error");
        assert_eq!(db.message(), "duplicate key value violates unique constraint \"t_order_order_no\"");
        assert_eq!(db.detail(), Some("Key (order_no)=(U1) already exists."));
        assert_eq!(db.table(), Some("t_order"));
    }
    let e = client
        .execute("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ($1, $2, '2026-11-03 10:00+00')", &[&"U1", &6i64])
        .await
        .expect_err("bound duplicate");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e} {:?}", e.as_db_error().map(|d| d.message().to_string()));
    assert_eq!(copies(&c, "U1").await, 1);

    // a statement with the same value twice applies nothing
    let e = client
        .batch_execute("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('U2', 1, '2026-11-02 10:00+00'), ('U3', 2, '2026-11-02 10:00+00'), ('U2', 3, '2026-10-02 10:00+00')")
        .await
        .expect_err("duplicate within the statement");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e} {:?}", e.as_db_error());
    assert_eq!(copies(&c, "U2").await + copies(&c, "U3").await, 0);

    // in a block: the second insert fails, ROLLBACK leaves nothing, the value is free again
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute(&insert("U4", 3, "2026-11-02 10:00+00")).await.expect("in block");
    let e = client.batch_execute(&insert("U4", 4, "2026-11-02 10:00+00")).await.expect_err("duplicate in block");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(copies(&c, "U4").await, 0);
    client.batch_execute(&insert("U4", 4, "2026-11-02 10:00+00")).await.expect("free after rollback");
    assert_eq!(copies(&c, "U4").await, 1);

    // a deleted order frees its order_no, for another merchant and month
    client.batch_execute("DELETE FROM t_order WHERE order_no = 'U1'").await.expect("delete");
    client.batch_execute(&insert("U1", 5, "2026-12-02 10:00+00")).await.expect("reuse after delete");
    let rows = client.query("SELECT merchant_id FROM t_order WHERE order_no = 'U1'", &[]).await.expect("read");
    assert_eq!(rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>(), vec![5]);
    assert_eq!(copies(&c, "U1").await, 1);
    // and the old owner cannot take it back
    let e = client.batch_execute(&insert("U1", 1, "2026-11-02 10:00+00")).await.expect_err("taken again");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");

    // UPDATE of order_no and ON CONFLICT are refused with a hint, not half-done
    for sql in ["UPDATE t_order SET order_no = 'U9' WHERE order_no = 'U4'", "INSERT INTO t_order (order_no, merchant_id) VALUES ('U8', 1) ON CONFLICT (order_no) DO NOTHING"] {
        let e = client.batch_execute(sql).await.expect_err("refused");
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
    }
    // the lookup table is the proxy's: an ordinary client cannot touch it
    let e = client.batch_execute("DELETE FROM shardgate_lookup_t_order_order_no").await.expect_err("control table");
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
}

#[tokio::test]
async fn a_read_by_order_no_goes_to_one_shard_and_month() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    for (i, m) in [(0, 3i64), (1, 5), (2, 6)] {
        client.batch_execute(&insert(&format!("R{i}"), m, &format!("2026-1{i}-05 10:00+00"))).await.expect("insert");
    }
    wait_filled(&c).await;
    let before = shard_queries(&c.info.admin_url);
    let row = client.query_one("SELECT merchant_id, order_no FROM t_order WHERE order_no = $1", &[&"R1"]).await.expect("point read");
    assert_eq!(row.get::<_, i64>(0), 5);
    let n = client.execute("UPDATE t_order SET pay_status = 'PAID' WHERE order_no = 'R1'", &[]).await.expect("update");
    assert_eq!(n, 1);
    let after = shard_queries(&c.info.admin_url);
    let touched: Vec<&String> = after.keys().filter(|k| after[*k] != before.get(*k).copied().unwrap_or(0.0)).collect();
    assert_eq!(touched, vec!["db_5"], "only merchant 5's shard answers a lookup by its order_no");
    // IN lists: the union of their entries; a value without an entry reads everywhere (still exact)
    let rows = client.query("SELECT order_no FROM t_order WHERE order_no IN ('R0', 'R2', 'nope') ORDER BY 1", &[]).await.expect("in");
    assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), vec!["R0", "R2"]);
    let rows = client.query("SELECT order_no FROM t_order WHERE order_no IN ('R0', 'R2') OR merchant_id = 5 ORDER BY 1", &[]).await.expect("or");
    assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), vec!["R0", "R1", "R2"]);
    // rows written straight to a shard (before the lookup existed) are still found
    let shard = connect(&c.info.shards[7]).await.expect("shard");
    shard.batch_execute("INSERT INTO t_order_202611 (id, order_no, merchant_id, create_time) VALUES (77, 'OLD7', 7, '2026-11-05 10:00+00')").await.expect("direct");
    let n: i64 = client.query_one("SELECT count(*) FROM t_order WHERE order_no = 'OLD7'", &[]).await.expect("old").get(0);
    assert_eq!(n, 1);
}

/// `shardgate_lookup_hints_total{result=…}` of one proxy.
fn hints(admin: &str, result: &str) -> f64 {
    let (_, body) = http_get(&format!("{admin}/metrics")).expect("metrics");
    let key = format!("shardgate_lookup_hints_total{{result=\"{result}\"}}");
    body.lines().find(|l| l.starts_with(&key)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

/// A proxy remembers where it last found an order_no and reads there without
/// asking the lookup table, but only trusts the place when the answer has a
/// row: another proxy moving the value (DELETE, then INSERT of the same
/// order_no for another merchant) never makes it answer wrong.
#[tokio::test]
async fn a_remembered_order_no_place_is_used_only_when_the_answer_proves_it() {
    let c = start();
    let b = c.start_extra_proxy().expect("second proxy");
    let pa = connect(&c.info.proxy_dsn).await.expect("proxy A");
    let pb = connect(&b.dsn).await.expect("proxy B");
    let read = "SELECT merchant_id, order_no FROM t_order WHERE order_no = $1";
    let merchants = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>();
    pa.batch_execute(&insert("H1", 3, "2026-11-02 10:00+00")).await.expect("insert");
    assert_eq!(merchants(pa.query(read, &[&"H1"]).await.expect("first read")), vec![3]);
    let confirmed = hints(&c.info.admin_url, "confirmed");
    let before = shard_queries(&c.info.admin_url);
    assert_eq!(merchants(pa.query(read, &[&"H1"]).await.expect("second read")), vec![3]);
    assert_eq!(hints(&c.info.admin_url, "confirmed"), confirmed + 1.0, "the second read used the remembered place");
    let after = shard_queries(&c.info.admin_url);
    let touched: Vec<&String> = after.keys().filter(|k| after[*k] != before.get(*k).copied().unwrap_or(0.0)).collect();
    assert_eq!(touched, vec!["db_3"]);

    // B moves H1 to merchant 6 (another shard) and month; A still remembers db_3
    pb.batch_execute("DELETE FROM t_order WHERE order_no = 'H1'").await.expect("delete");
    pb.batch_execute(&insert("H1", 6, "2026-12-02 10:00+00")).await.expect("take over");
    let unconfirmed = hints(&c.info.admin_url, "unconfirmed");
    assert_eq!(merchants(pa.query(read, &[&"H1"]).await.expect("moved, extended")), vec![6]);
    assert!(hints(&c.info.admin_url, "unconfirmed") > unconfirmed, "the empty answer at the old place was not trusted");
    // the same in the simple protocol and inside a block, after another move
    pb.batch_execute("DELETE FROM t_order WHERE order_no = 'H1'").await.expect("delete");
    pb.batch_execute(&insert("H1", 2, "2026-11-03 10:00+00")).await.expect("take over");
    let rows = pa.simple_query("SELECT merchant_id FROM t_order WHERE order_no = 'H1'").await.expect("simple");
    let got: Vec<String> = rows.iter().filter_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    }).collect();
    assert_eq!(got, vec!["2"]);
    pb.batch_execute("DELETE FROM t_order WHERE order_no = 'H1'").await.expect("delete");
    pb.batch_execute(&insert("H1", 5, "2026-11-03 10:00+00")).await.expect("take over");
    pa.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(merchants(pa.query("SELECT merchant_id, order_no FROM t_order WHERE order_no = $1 FOR UPDATE", &[&"H1"]).await.expect("in block")), vec![5]);
    pa.batch_execute("COMMIT").await.expect("commit");
    // statements whose answer has a row anyway never use the remembered place
    pb.batch_execute("DELETE FROM t_order WHERE order_no = 'H1'").await.expect("delete");
    pb.batch_execute(&insert("H1", 1, "2026-11-03 10:00+00")).await.expect("take over");
    let n: i64 = pa.query_one("SELECT count(*) FROM t_order WHERE order_no = 'H1'", &[]).await.expect("count").get(0);
    assert_eq!(n, 1);
    let n: i64 = pa.query_one("SELECT count(*) FROM t_order WHERE order_no = 'H1' AND merchant_id = 1", &[]).await.expect("count").get(0);
    assert_eq!(n, 1);
    // a legitimately empty answer stays empty; a gone value reads nothing
    assert!(pa.query("SELECT merchant_id, order_no FROM t_order WHERE order_no = $1 AND pay_status = 'NOPE'", &[&"H1"]).await.expect("empty").is_empty());
    pb.batch_execute("DELETE FROM t_order WHERE order_no = 'H1'").await.expect("delete");
    assert!(pa.query(read, &[&"H1"]).await.expect("gone").is_empty());
    assert_eq!(copies(&c, "H1").await, 0);
}

/// An INSERT of an order_no whose order another transaction is deleting
/// waits for it, as one table's unique index makes it wait: it succeeds once
/// the DELETE commits and gets 23505 if it rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_waits_for_a_transaction_deleting_the_order_that_holds_its_order_no() {
    let c = start();
    let a = connect(&c.info.proxy_dsn).await.expect("a");
    a.batch_execute(&insert("D1", 1, "2026-11-02 10:00+00")).await.expect("insert");
    for (end, moved) in [("COMMIT", true), ("ROLLBACK", false)] {
        let holder: i64 = a.query_one("SELECT merchant_id FROM t_order WHERE order_no = 'D1'", &[]).await.expect("holder").get(0);
        a.batch_execute("BEGIN").await.expect("begin");
        assert_eq!(a.execute("DELETE FROM t_order WHERE order_no = 'D1'", &[]).await.expect("delete"), 1);
        let dsn = c.info.proxy_dsn.clone();
        let next = holder + 1;
        let b = tokio::spawn(async move {
            let b = connect(&dsn).await.expect("b");
            b.batch_execute(&insert("D1", next, "2026-11-03 10:00+00")).await
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!b.is_finished(), "the INSERT waits for the deleting transaction ({end})");
        a.batch_execute(end).await.expect("end");
        let r = tokio::time::timeout(Duration::from_secs(10), b).await.expect("the INSERT finishes").expect("task");
        if moved {
            r.expect("the order_no is free once the DELETE commits");
            let now: i64 = a.query_one("SELECT merchant_id FROM t_order WHERE order_no = 'D1'", &[]).await.expect("moved").get(0);
            assert_eq!(now, next);
        } else {
            let e = r.expect_err("the order still holds it after the rollback");
            assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
        }
        assert_eq!(copies(&c, "D1").await, 1);
    }
    // the transaction's own DELETE frees the value for its own INSERT at once, on the same
    // shard or another one (it waited on itself for 5 s, then 55P03)
    let holder: i64 = a.query_one("SELECT merchant_id FROM t_order WHERE order_no = 'D1'", &[]).await.expect("holder").get(0);
    for next in [holder, holder + 1] {
        let t0 = std::time::Instant::now();
        a.batch_execute("BEGIN").await.expect("begin");
        a.batch_execute("DELETE FROM t_order WHERE order_no = 'D1'").await.expect("delete");
        a.batch_execute(&insert("D1", next, "2026-11-04 10:00+00")).await.expect("its own DELETE freed the value");
        a.batch_execute("COMMIT").await.expect("commit");
        assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
        assert_eq!(copies(&c, "D1").await, 1);
    }
}

/// Must show 4: writers race on a shared pool of order_nos (collisions on
/// purpose) while a shard is stopped and started again. Every acknowledged
/// order_no is there exactly once, and every refusal was a 23505 for a value
/// that someone else holds. `SHARDGATE_LOOKUP_SECONDS` (default 8) sets the length.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_and_a_lost_shard_leave_each_order_no_exactly_once() {
    let c = start();
    let seconds: u64 = std::env::var("SHARDGATE_LOOKUP_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let acked: Arc<Mutex<HashMap<String, (i64, String)>>> = Arc::default();
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let other = Arc::new(Mutex::new(Vec::<String>::new()));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let dsn = c.info.proxy_dsn.clone();
        let (acked, refused, other) = (acked.clone(), refused.clone(), other.clone());
        writers.push(tokio::spawn(async move {
            let client = connect(&dsn).await.expect("connect");
            let mut i = 0i64;
            while Instant::now() < end {
                i += 1;
                // 8 writers draw from 400 values: most values are tried by several writers
                let no = format!("RACE{}", (i * 7 + w * 13) % 400);
                let merchant = (w * 31 + i) % 64;
                let month = if i % 2 == 0 { "2026-11-10 10:00+00" } else { "2026-10-10 10:00+00" };
                let sql = format!("INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, 2.50, 'NEW', '{month}')");
                match client.execute(sql.as_str(), &[&no, &merchant]).await {
                    Ok(1) => {
                        let prev = acked.lock().expect("lock").insert(no.clone(), (merchant, month.to_string()));
                        assert!(prev.is_none(), "{no} acknowledged twice: {prev:?} and merchant {merchant}");
                    }
                    Ok(n) => panic!("INSERT answered {n} rows"),
                    Err(e) if sqlstate(&e).as_deref() == Some("23505") => refused.lock().expect("lock").push(no),
                    Err(e) => other.lock().expect("lock").push(format!("{no}: {e} {:?}", e.as_db_error().map(|d| (d.message().to_string(), d.routine().map(str::to_string), d.where_().map(str::to_string))))),
                }
            }
        }));
    }
    // a shard goes away mid-run (its merchants' orders go to db_default) and comes back
    tokio::time::sleep(Duration::from_secs(seconds / 3)).await;
    let shard2 = c.info.cluster_of_shard(2).expect("cluster of db_2").clone();
    shard2.stop_immediate().expect("stop shard cluster");
    tokio::time::sleep(Duration::from_secs(seconds / 3)).await;
    shard2.start().expect("restart shard cluster");
    for w in writers {
        w.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    let refused = refused.lock().expect("lock").clone();
    let other = other.lock().expect("lock").clone();
    eprintln!("acknowledged {}, refused with 23505 {}, other errors {}", acked.len(), refused.len(), other.len());
    assert!(acked.len() > 100 && refused.len() > 100, "the run must race: {} acknowledged, {} refused", acked.len(), refused.len());
    // errors other than 23505 are only the moments the shard was going away (nothing acknowledged)
    for e in &other {
        assert!(e.contains("unavailable") || e.contains("lost") || e.contains("shard") || e.contains("retry"), "unexpected error: {e}\n{}", c.proxy_log().lines().filter(|l| (l.contains("WARN") || l.contains("ERROR") || l.contains("month")) && !l.contains("state changed")).take(100).collect::<Vec<_>>().join("\n"));
    }
    // every refused value is held by an acknowledged order
    let held: HashSet<&String> = acked.keys().collect();
    for no in &refused {
        assert!(held.contains(no), "{no} was refused as taken, but no acknowledged order holds it");
    }
    // once the fallback rows are home: each acknowledged order_no exactly once, with its values
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    shardgate_tests::wait_for("db_2 up and its fallback rows home", Duration::from_secs(60), || {
        let h = health(&c);
        h["shards"][2]["state"] == "up" && h["shards"][2]["fallback_pending_rows"] == 0 && h["shards"][2]["fallback_failed_rows"] == 0
    })
    .await;
    let rows = client.query("SELECT order_no, merchant_id, create_time::text FROM t_order WHERE order_no LIKE 'RACE%'", &[]).await.expect("read all");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        let no: String = r.get(0);
        *seen.entry(no.clone()).or_default() += 1;
        let (m, _) = acked.get(&no).unwrap_or_else(|| panic!("{no} is stored but was never acknowledged"));
        assert_eq!(*m, r.get::<_, i64>(1), "{no} stored for another merchant than acknowledged");
    }
    for (no, n) in &seen {
        assert_eq!(*n, 1, "{no} stored {n} times");
    }
    let missing: Vec<&String> = acked.keys().filter(|k| !seen.contains_key(*k)).collect();
    if !missing.is_empty() {
        let mut prepared = Vec::new();
        for dsn in &c.info.shards {
            let shard = connect(dsn).await.expect("shard");
            for r in shard.query("SELECT gid, prepared::text FROM pg_prepared_xacts", &[]).await.expect("prepared") {
                prepared.push(format!("{} {}", r.get::<_, String>(0), r.get::<_, String>(1)));
            }
        }
        panic!("acknowledged orders missing: {missing:?} (of {}); prepared on the shards: {prepared:?}", acked.len());
    }
    // and on the shards themselves, after sync-back
    let mut on_shards = 0;
    for no in acked.keys().take(40) {
        on_shards += copies(&c, no).await;
    }
    assert_eq!(on_shards, acked.len().min(40));
}

#[tokio::test]
async fn values_of_other_declared_types_and_reuse_inside_a_block() {
    use std::io::Write;
    use shardgate_tests::raw::{error_code, frame, md5_login, pbe_typed, read_until_ready};
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute(&insert("A1", 1, "2026-11-02 10:00+00")).await.expect("A1");
    client.batch_execute(&insert("A1 ", 2, "2026-11-02 10:00+00")).await.expect("'A1 ' is another value");
    let mut s = md5_login(&c);
    // '007' declared int4 is stored as '7': refused, not recorded as '007'
    let sql = "INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ($1, $2, '2026-11-02 10:00+00')";
    s.write_all(&[pbe_typed(sql, &[23, 20], &["007", "3"]), frame(b'S', b"")].concat()).expect("write");
    assert_eq!(error_code(&read_until_ready(&mut s)).as_deref(), Some("0A000"));
    // 'A1 ' declared bpchar compares as 'A1' (trailing blanks dropped): one table finds the
    // 'A1' row, so the entry of the text value 'A1 ' must not narrow the read to merchant 2
    let sql = "SELECT merchant_id FROM t_order WHERE order_no = $1";
    s.write_all(&[pbe_typed(sql, &[1042], &["A1 "]), frame(b'S', b"")].concat()).expect("write");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    let rows: Vec<&Vec<u8>> = msgs.iter().filter(|(t, _)| *t == b'D').map(|(_, b)| b).collect();
    assert_eq!(rows.len(), 1, "one row, merchant 1's: {msgs:?}");
    assert!(rows[0].ends_with(b"1"), "{rows:?}");

    // inside one block: insert, delete, insert again elsewhere, as one table allows
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute(&insert("RE1", 4, "2026-11-02 10:00+00")).await.expect("first");
    client.batch_execute("DELETE FROM t_order WHERE order_no = 'RE1'").await.expect("delete");
    client.batch_execute(&insert("RE1", 5, "2026-10-02 10:00+00")).await.expect("again, after the delete");
    let e = client.batch_execute(&insert("RE1", 6, "2026-10-02 10:00+00")).await.expect_err("a third time: taken");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute(&insert("RE2", 4, "2026-11-02 10:00+00")).await.expect("first");
    client.batch_execute("DELETE FROM t_order WHERE order_no = 'RE2'").await.expect("delete");
    client.batch_execute(&insert("RE2", 5, "2026-10-02 10:00+00")).await.expect("again, after the delete");
    client.batch_execute("COMMIT").await.expect("commit");
    let rows = client.query("SELECT merchant_id FROM t_order WHERE order_no = 'RE2'", &[]).await.expect("read");
    assert_eq!(rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>(), vec![5]);
    assert_eq!(copies(&c, "RE2").await, 1);
}

/// Rows already on the shards when the lookup is created (written by an older
/// version, or straight to the shards) are filled in: their order_nos are taken,
/// and reads by them are routed only once every row has its entry.
#[tokio::test]
async fn rows_from_before_the_lookup_are_filled_in() {
    let mut c = start();
    c.kill_proxy().expect("stop proxy");
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    def.batch_execute("DROP TABLE IF EXISTS shardgate_lookup_t_order_order_no; DROP TABLE IF EXISTS shardgate_lookup_state").await.expect("no lookup yet");
    // (a past month: not among those the proxy makes at start)
    shardgate_tests::make_month_everywhere(&c, "202611").await;
    for (shard, rows) in [(1, "(101, 'OLD1', 1), (102, 'DUPX', 9)"), (2, "(201, 'DUPX', 2), (202, 'OLD2', 10)")] {
        let s = connect(&c.info.shards[shard]).await.expect("shard");
        s.batch_execute(&format!("INSERT INTO t_order_202611 (id, order_no, merchant_id) SELECT * FROM (VALUES {rows}) v")).await.expect("old rows");
    }
    c.start_proxy().expect("start proxy");
    let t0 = Instant::now();
    loop {
        let done = def.query_opt("SELECT complete FROM shardgate_lookup_state WHERE lookup_table = 'shardgate_lookup_t_order_order_no'", &[]).await.ok().flatten().is_some_and(|r| r.get::<_, bool>(0));
        if done {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the lookup was never filled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // an old order_no is taken for everyone
    for no in ["OLD1", "OLD2", "DUPX"] {
        let e = client.batch_execute(&insert(no, 5, "2026-11-02 10:00+00")).await.expect_err("taken");
        assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{no}: {e}");
    }
    // reads by them answer what one table holds: the duplicate from before (both rows)
    let n = |no: &'static str| {
        let client = &client;
        async move { client.query_one("SELECT count(*) FROM t_order WHERE order_no = $1", &[&no]).await.expect("read").get::<_, i64>(0) }
    };
    assert_eq!(n("OLD1").await, 1);
    assert_eq!(n("OLD2").await, 1);
    assert_eq!(n("DUPX").await, 2);
}

/// An INSERT with an order_no commits in fewer round trips: its shard prepares
/// right behind the row, and the entry rides with the commit decision. When
/// the row fails on the shard (here a numeric overflow, an extended-protocol
/// client whose statement is parsed there for the first time), that prepared
/// block is undone at once, no entry stays, and the session's next statements
/// work: nothing waits for recovery's orphan age.
#[tokio::test]
async fn an_insert_failing_on_its_shard_leaves_no_prepared_transaction_and_no_entry() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let bad = "INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ($1, $2, 1e30, '2026-11-03 10:00+00')";
    for i in 0..3i64 {
        let no = format!("F{i}");
        let e = client.execute(bad, &[&no, &(3 + 8 * i)]).await.expect_err("overflow");
        assert_eq!(sqlstate(&e).as_deref(), Some("22003"), "{e}");
    }
    let shard = connect(&c.info.shards[3]).await.expect("shard");
    let left: i64 = shard.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.expect("xacts").get(0);
    assert_eq!(left, 0, "a prepared transaction was left on db_3 for recovery to find");
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let entries: i64 = def.query_one("SELECT count(*) FROM shardgate_lookup_t_order_order_no WHERE value LIKE 'F%'", &[]).await.expect("entries").get(0);
    assert_eq!(entries, 0, "an entry outlived its failed row");
    // the same order_no now inserts fine, from the same session, and only once
    let good = "INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ($1, $2, 1.00, '2026-11-03 10:00+00')";
    for i in 0..3i64 {
        client.execute(good, &[&format!("F{i}"), &(3 + 8 * i)]).await.expect("insert");
    }
    let e = client.execute(good, &[&"F0", &4i64]).await.expect_err("taken");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    assert_eq!(copies(&c, "F0").await, 1);
}

/// The entry and decision of an INSERT are statements db_default keeps
/// prepared on each connection. When such a pipeline fails on the entry (a
/// value taken), the server skips the rest of it, the decision's first Parse
/// among it: the next INSERT on that connection must prepare it again, not
/// run a statement that is not there.
#[tokio::test]
async fn an_insert_after_a_failed_first_commit_on_a_connection_still_commits() {
    let c = Cluster::start_temp(Options { redis: false, extra_toml: FAST.into(), pool_toml: "size = 1\n".into(), ..Options::default() }).expect("start cluster");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    client.batch_execute(&insert("W1", 3, "2026-11-02 10:00+00")).await.expect("warm-up");
    // an entry whose row was never written (a proxy that died between the two)
    def.batch_execute("INSERT INTO shardgate_lookup_t_order_order_no (value, shard_key, month) VALUES ('ORPHAN1', 3, '202611')").await.expect("orphan entry");
    // the proxy's db_default connections go: the next INSERT's pipeline is the first on a new one
    def.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        .await
        .expect("terminate");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut first = client.batch_execute(&insert("ORPHAN1", 3, "2026-11-02 10:00+00")).await;
    if let Err(e) = &first {
        // a connection the proxy had not seen closed yet may fail this once (08006), never more
        assert_eq!(sqlstate(e).as_deref(), Some("08006"), "{e}");
        first = client.batch_execute(&insert("ORPHAN1", 3, "2026-11-02 10:00+00")).await;
    }
    first.expect("the orphan entry is taken over");
    for no in ["FRESH1", "FRESH2", "FRESH3"] {
        client.batch_execute(&insert(no, 3, "2026-11-02 10:00+00")).await.unwrap_or_else(|e| panic!("{no} after the failed pipeline: {e}"));
    }
    for no in ["W1", "ORPHAN1", "FRESH1", "FRESH2", "FRESH3"] {
        assert_eq!(copies(&c, no).await, 1, "{no} is there once");
    }
}

/// An operator archives a month by dropping its table on a shard: its orders
/// are gone, so their order_nos are free again, as in one table whose old rows
/// were deleted. Inside a block that already holds that shard the check of
/// the entry's row runs on the block's own connection; a missing month table
/// there must read as "no row", not fail the client's transaction with 42P01.
#[tokio::test]
async fn order_nos_of_a_dropped_month_table_are_free_again() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // merchants 1 and 9 are on db_1
    for (no, merchant) in [("ARC1", 1), ("ARC2", 9)] {
        client.batch_execute(&insert(no, merchant, "2026-10-02 10:00+00")).await.expect("October order");
    }
    let shard = connect(&c.info.shards[1]).await.expect("db_1");
    shard.batch_execute("DROP TABLE t_order_202610").await.expect("archive October");
    // autocommit: the check runs on a pooled connection
    client.batch_execute(&insert("ARC1", 1, "2026-11-02 10:00+00")).await.expect("ARC1 is free again");
    // in a block holding db_1: the check runs on the block's connection
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute(&insert("ARC3", 1, "2026-11-02 10:00+00")).await.expect("the block takes db_1");
    client.batch_execute(&insert("ARC2", 9, "2026-11-03 10:00+00")).await.expect("ARC2 is free again, inside the block");
    client.batch_execute("COMMIT").await.expect("commit");
    for no in ["ARC1", "ARC2", "ARC3"] {
        assert_eq!(copies(&c, no).await, 1, "{no}");
    }
    let rows = client.query("SELECT order_no, merchant_id FROM t_order WHERE order_no IN ('ARC1', 'ARC2') ORDER BY 1", &[]).await.expect("read");
    assert_eq!(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect::<Vec<_>>(), vec![("ARC1".into(), 1), ("ARC2".into(), 9)]);
    // and a taken value is still taken
    let e = client.batch_execute(&insert("ARC2", 2, "2026-11-02 10:00+00")).await.expect_err("taken");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
}
