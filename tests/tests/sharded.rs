//! Sharded execution beyond the differential workload: prepared statements
//! whose targets change per execution, month tables created on demand, the
//! merge row cap, two-phase commit recovery after a proxy restart, admin SQL
//! and psql meta-commands.

use std::process::Command;
use std::time::{Duration, Instant};

use shardgate_tests::{connect, month_tables, pg_bin, sqlstate, Cluster, Options, ADMIN_USER};

fn start(server_toml: &str, extra_toml: &str) -> Cluster {
    Cluster::start_temp(Options {
        all_clusters: true,
        redis: false,
        proxy: true,
        server_toml: server_toml.into(),
        pool_toml: String::new(),
        extra_toml: extra_toml.into(),
        legacy: false,
        tls: false,
    })
    .expect("start cluster")
}

#[tokio::test]
async fn a_prepared_statement_follows_its_bind_values_to_other_shards_and_months() {
    let c = start("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let ins = client
        .prepare("INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ($1, $2, 1.00, $3) RETURNING id")
        .await
        .expect("prepare insert");
    let get = client.prepare("SELECT order_no, merchant_id FROM t_order WHERE merchant_id = $1 AND id = $2").await.expect("prepare select");
    let mut ids = Vec::new();
    for m in 0..16i64 {
        let ts: jiff::Timestamp = format!("2026-{:02}-15T12:00:00Z", 1 + m % 12).parse().expect("ts");
        let when = std::time::UNIX_EPOCH + Duration::from_secs(ts.as_second() as u64);
        let id: i64 = client.query_one(&ins, &[&format!("P{m}"), &m, &when]).await.expect("insert").get(0);
        ids.push((m, id));
    }
    for (m, id) in &ids {
        let row = client.query_one(&get, &[m, id]).await.expect("select");
        assert_eq!(row.get::<_, String>(0), format!("P{m}"));
    }
    // the rows are where the statement's values sent them
    for (m, _) in &ids {
        let shard = connect(&c.info.shards[(*m % 8) as usize]).await.expect("shard");
        let table = format!("t_order_2026{:02}", 1 + m % 12);
        let n: i64 = shard.query_one(&format!("SELECT count(*) FROM {table} WHERE order_no = $1"), &[&format!("P{m}")]).await.expect("direct").get(0);
        assert_eq!(n, 1, "P{m} in db_{}.{table}", m % 8);
    }
}

#[tokio::test]
async fn a_write_to_a_month_without_a_table_creates_it_on_every_shard() {
    let c = start("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client
        .batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'far', 3, '2028-05-05 00:00+00')")
        .await
        .expect("insert far month");
    for dsn in &c.info.shards {
        let shard = connect(dsn).await.expect("shard");
        let exists: bool = shard.query_one("SELECT to_regclass('t_order_202805') IS NOT NULL", &[]).await.expect("regclass").get(0);
        assert!(exists, "{dsn} has t_order_202805");
    }
    let n: i64 = client.query_one("SELECT count(*) FROM t_order WHERE create_time >= '2028-01-01'", &[]).await.expect("count").get(0);
    assert_eq!(n, 1);
    // and the maintainer made the current month and the months ahead
    let months = month_tables(&connect(&c.info.shards[0]).await.expect("shard0")).await;
    let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
    let this_month = format!("t_order_{}", now.strftime("%Y%m"));
    assert!(months.contains(&this_month), "{this_month} in {months:?}");
}

/// A month table one proxy creates on demand is read by every other proxy as
/// soon as the write that made it is acknowledged (they list month tables at
/// each health probe; the writer waits until they have).
#[tokio::test]
async fn a_month_table_made_by_one_proxy_is_read_by_the_others() {
    let c = start("", "[health]\nprobe_interval_ms = 300\nprobe_timeout_ms = 1000\n");
    let b = c.start_extra_proxy().expect("second proxy");
    let pa = connect(&c.info.proxy_dsn).await.expect("proxy A");
    let pb = connect(&b.dsn).await.expect("proxy B");
    // A has read everything once (its plans know the months that exist now)
    let n: i64 = pa.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 0);
    for (i, month) in ["2025-03", "2024-07"].iter().enumerate() {
        let t0 = Instant::now();
        pb.batch_execute(&format!("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('M{i}', 5, '{month}-10 10:00+00')")).await.expect("insert into a new month");
        let took = t0.elapsed();
        let n: i64 = pa.query_one("SELECT count(*) FROM t_order WHERE merchant_id = 5", &[]).await.expect("count by A").get(0);
        assert_eq!(n, i as i64 + 1, "A reads the row B wrote into {month} (B's INSERT took {took:?})");
        let rows = pa.query("SELECT order_no FROM t_order WHERE order_no = $1", &[&format!("M{i}")]).await.expect("by order_no");
        assert_eq!(rows.len(), 1);
        let n: i64 = pa.query_one(&format!("SELECT count(*) FROM t_order WHERE create_time >= '{month}-01 00:00+00' AND create_time < '{month}-01 00:00+00'::timestamptz + interval '1 month'"), &[]).await.expect("by month").get(0);
        assert_eq!(n, 1);
    }
    // another session of B writing into the month B's first session is still making known
    // waits as well (it used to see the month as known and go ahead at once)
    let dsn = b.dsn.clone();
    let first = tokio::spawn(async move {
        let s = connect(&dsn).await.expect("B, session 1");
        s.batch_execute("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('W1', 5, '2023-02-10 10:00+00')").await.expect("first");
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = connect(&b.dsn).await.expect("B, session 2");
    let t0 = Instant::now();
    second.batch_execute("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('W2', 13, '2023-02-11 10:00+00')").await.expect("second");
    let took = t0.elapsed();
    let n: i64 = pa.query_one("SELECT count(*) FROM t_order WHERE merchant_id = 13", &[]).await.expect("A reads W2").get(0);
    assert_eq!(n, 1, "A reads the second session's row (it waited {took:?})");
    assert!(took >= Duration::from_millis(1500), "the second session waited for the month to settle too: {took:?}");
    first.await.expect("first session");
}

#[tokio::test]
async fn merges_over_the_row_cap_fail_clearly_and_streams_are_not_capped() {
    let c = start("max_merge_rows = 50", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let values: Vec<String> = (1..=400).map(|i| format!("({i}, 'C{i}', {}, '2026-11-0{} 00:00+00')", i % 40, 1 + i % 9)).collect();
    client.batch_execute(&format!("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES {}", values.join(","))).await.expect("load");
    let e = client.query("SELECT DISTINCT order_no FROM t_order", &[]).await.expect_err("over the cap");
    assert_eq!(sqlstate(&e).as_deref(), Some("54000"));
    assert!(e.as_db_error().is_some_and(|d| d.message().contains("max_merge_rows")), "{e:?}");
    // streaming shapes are not limited: plain scans and ordered k-way merges
    assert_eq!(client.query("SELECT id FROM t_order", &[]).await.expect("scan").len(), 400);
    let rows = client.query("SELECT id FROM t_order ORDER BY id DESC", &[]).await.expect("ordered");
    assert_eq!(rows.len(), 400);
    assert_eq!(rows[0].get::<_, i64>(0), 400);
    // few groups are fine
    assert_eq!(client.query("SELECT merchant_id, count(*) FROM t_order GROUP BY 1", &[]).await.expect("groups").len(), 40);
}

/// `server.max_merge_bytes`: few rows of large values are refused by their
/// bytes (GROUP BY, DISTINCT, DISTINCT aggregates), while the
/// same rows stream, and small groups of them are fine.
#[tokio::test]
async fn merges_over_the_byte_cap_fail_clearly() {
    let c = start("max_merge_bytes = 200000", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // 40 rows of 20,000 characters, over 8 shards and two months
    let values: Vec<String> = (1..=40).map(|i| format!("({i}, 'B{i}', {i}, '2026-1{}-05 00:00+00', repeat('x', 20000) || {i})", 1 + i % 2)).collect();
    client.batch_execute(&format!("INSERT INTO t_order (id, order_no, merchant_id, create_time, pay_status) VALUES {}", values.join(","))).await.expect("load");
    for sql in [
        "SELECT DISTINCT pay_status FROM t_order",
        "SELECT pay_status, count(*) FROM t_order GROUP BY pay_status",
        "SELECT count(DISTINCT pay_status) FROM t_order",
    ] {
        let e = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("54000"), "{sql}: {e:?}");
        assert!(e.as_db_error().is_some_and(|d| d.message().contains("max_merge_bytes")), "{sql}: {e:?}");
    }
    assert_eq!(client.query("SELECT pay_status FROM t_order", &[]).await.expect("stream").len(), 40);
    assert_eq!(client.query("SELECT pay_status FROM t_order ORDER BY id", &[]).await.expect("k-way").len(), 40);
    assert_eq!(client.query("SELECT length(pay_status), count(*) FROM t_order GROUP BY 1", &[]).await.expect("small groups").len(), 2);
}

/// A prepared transaction on a shard as a crashed proxy would leave it.
async fn leave_prepared(dsn: &str, gid: &str, id: i64, merchant: i64) {
    let shard = connect(dsn).await.expect("shard");
    shard
        .batch_execute(&format!(
            "BEGIN; INSERT INTO t_order_202611 (id, order_no, merchant_id, create_time) VALUES ({id}, 'R{id}', {merchant}, '2026-11-10'); PREPARE TRANSACTION '{gid}'"
        ))
        .await
        .expect("prepare");
}

#[tokio::test]
async fn two_phase_commits_left_by_a_dead_proxy_are_resolved_after_restart() {
    let mut c = start("", "[sharding]\nprepared_orphan_age_ms = 500\n");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("SELECT count(*) FROM t_order").await.expect("months exist");
    c.stop_proxy(Duration::from_secs(10)).expect("stop proxy");
    // (a past month: not among those the proxy makes at start)
    shardgate_tests::make_month_everywhere(&c, "202611").await;
    // decided: the decision row exists → commit on both shards
    leave_prepared(&c.info.shards[3], "sg_9_1_aaaa_s3", 11, 3).await;
    leave_prepared(&c.info.shards[4], "sg_9_1_aaaa_s4", 12, 4).await;
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    def.batch_execute("INSERT INTO shardgate_2pc_decisions (gid, shards) VALUES ('sg_9_1_aaaa', '{3,4}')").await.expect("decision");
    // undecided: no row → roll back
    leave_prepared(&c.info.shards[5], "sg_9_2_bbbb_s5", 13, 5).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.start_proxy().expect("restart proxy");
    let t0 = Instant::now();
    loop {
        let mut pending = 0i64;
        for s in [3, 4, 5] {
            let shard = connect(&c.info.shards[s]).await.expect("shard");
            pending += shard.query_one("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'sg\\_%'", &[]).await.expect("xacts").get::<_, i64>(0);
        }
        if pending == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "recovery did not resolve the prepared transactions");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let ids: Vec<i64> = client.query("SELECT id FROM t_order WHERE id IN (11, 12, 13) ORDER BY id", &[]).await.expect("ids").iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![11, 12], "the decided transaction committed on both shards, the undecided one rolled back");
    // recovery won the race against the undecided transaction's decision: its abort marker
    // makes a late decision fail instead of committing what was rolled back
    let outcome: String = def.query_one("SELECT outcome FROM shardgate_2pc_decisions WHERE gid = 'sg_9_2_bbbb'", &[]).await.expect("marker").get(0);
    assert_eq!(outcome, "abort");
    let late = def.batch_execute("INSERT INTO shardgate_2pc_decisions (gid, shards) VALUES ('sg_9_2_bbbb', '{5}')").await.expect_err("a late decision");
    assert_eq!(shardgate_tests::sqlstate(&late).as_deref(), Some("23505"));
}

#[tokio::test]
async fn a_transaction_writing_two_shards_commits_both_or_neither() {
    let c = start("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'dup', 2, '2026-11-01')").await.expect("seed");
    // a failure on the second shard aborts the whole transaction, the first shard's write included
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (2, 'a', 1, '2026-11-01')").await.expect("first shard");
    let e = client
        .batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (3, 'dup', 2, '2026-11-02')")
        .await
        .expect_err("duplicate on the second shard");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"));
    let e = client.batch_execute("SELECT 1").await.expect_err("aborted");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"));
    client.batch_execute("COMMIT").await.expect("commit answers rollback");
    let n: i64 = client.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 1, "nothing of the failed transaction stayed");
    // several statements in one string with t_order are refused (0A000), not half-run
    client.batch_execute("BEGIN; INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (4, 'b', 1, '2026-11-01'); INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (5, 'c', 6, '2026-11-01'); COMMIT").await.expect_err("refused");
    // a good one commits on both shards, with no prepared transaction left behind
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (4, 'b', 1, '2026-11-01')").await.expect("shard 1");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (5, 'c', 6, '2026-11-01')").await.expect("shard 6");
    client.batch_execute("COMMIT").await.expect("commit");
    let n: i64 = client.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 3);
    for s in [1, 6] {
        let shard = connect(&c.info.shards[s]).await.expect("shard");
        let left: i64 = shard.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.expect("xacts").get(0);
        assert_eq!(left, 0);
    }
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    assert_eq!(decisions_left(&def).await, 0, "decision rows are removed once every shard committed");
}

#[tokio::test]
async fn admin_sql_and_psql_meta_commands() {
    let c = start("", "");
    let admin = connect(&c.info.proxy_dsn_for(ADMIN_USER.0, ADMIN_USER.1)).await.expect("admin");
    for (cmd, cols) in [("SHOW SHARDS", 10), ("SHOW POOLS", 6), ("SHOW CLIENTS", 4), ("SHOW MONTHS", 3), ("SHOW FALLBACK", 5)] {
        let msgs = admin.simple_query(cmd).await.expect(cmd);
        let rows: Vec<_> = msgs.iter().filter_map(|m| if let tokio_postgres::SimpleQueryMessage::Row(r) = m { Some(r) } else { None }).collect();
        assert!(!rows.is_empty(), "{cmd} lists something");
        assert_eq!(rows[0].len(), cols, "{cmd}");
        if cmd == "SHOW SHARDS" {
            assert_eq!(rows.len(), 8);
            assert_eq!(rows[7].get(1), Some("db_7"));
        }
    }
    // an application user's SHOW goes to PostgreSQL
    let app = connect(&c.info.proxy_dsn).await.expect("app");
    let e = app.simple_query("SHOW SHARDS").await.expect_err("not admin");
    assert_eq!(sqlstate(&e).as_deref(), Some("42704"));
    // psql meta-commands describe the logical table
    let out = Command::new(pg_bin().join("psql")).arg(&c.info.proxy_dsn).args(["-X", "-c", "\\d t_order", "-c", "\\dt t_order"]).output().expect("psql");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("merchant_id") && text.contains("create_time") && text.contains("t_order"), "{text}");
}

#[tokio::test]
async fn session_time_zone_reaches_the_shards() {
    let c = start("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'tz', 1, '2026-11-05 10:00:00+00')").await.expect("insert");
    client.batch_execute("SET TimeZone = 'Asia/Shanghai'").await.expect("set");
    let text = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| {
        msgs.into_iter().find_map(|m| if let tokio_postgres::SimpleQueryMessage::Row(r) = m { r.get(0).map(str::to_string) } else { None }).expect("a row")
    };
    let one = text(client.simple_query("SELECT create_time FROM t_order WHERE merchant_id = 1").await.expect("one shard"));
    assert_eq!(one, "2026-11-05 18:00:00+08");
    let all = text(client.simple_query("SELECT max(create_time) FROM t_order").await.expect("all shards"));
    assert_eq!(all, "2026-11-05 18:00:00+08");
    client.batch_execute("RESET TimeZone").await.expect("reset");
    let back = text(client.simple_query("SELECT create_time FROM t_order WHERE merchant_id = 1").await.expect("one shard"));
    assert_eq!(back, "2026-11-05 10:00:00+00");
}

#[tokio::test]
async fn commit_and_rollback_sent_with_the_extended_protocol_end_the_shards_too() {
    let c = start("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let ins = "INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES ($1, $2, $3, '2026-11-03')";
    // two shards written, COMMIT as Parse/Bind/Execute/Sync: two-phase commit
    client.execute("BEGIN", &[]).await.expect("begin");
    client.execute(ins, &[&1i64, &"x1", &1i64]).await.expect("shard 1");
    client.execute(ins, &[&2i64, &"x2", &6i64]).await.expect("shard 6");
    client.execute("COMMIT", &[]).await.expect("commit");
    let n: i64 = client.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 2, "both rows visible right after COMMIT");
    // one shard, ROLLBACK as extended: nothing stays
    client.execute("BEGIN", &[]).await.expect("begin");
    client.execute(ins, &[&3i64, &"x3", &2i64]).await.expect("shard 2");
    client.execute("ROLLBACK", &[]).await.expect("rollback");
    // one shard, COMMIT as extended
    client.execute("BEGIN", &[]).await.expect("begin");
    client.execute(ins, &[&4i64, &"x4", &3i64]).await.expect("shard 3");
    client.execute("COMMIT", &[]).await.expect("commit");
    let ids: Vec<i64> = client.query("SELECT id FROM t_order ORDER BY id", &[]).await.expect("ids").iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1, 2, 4]);
    for s in [1, 6] {
        let shard = connect(&c.info.shards[s]).await.expect("shard");
        let left: i64 = shard.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.expect("xacts").get(0);
        assert_eq!(left, 0, "db_{s} has no prepared transaction left");
    }
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    assert_eq!(decisions_left(&def).await, 0, "decision rows are removed once every shard committed");
}

#[tokio::test]
async fn more_distinct_statements_than_a_shard_connection_keeps_prepared_all_keep_working() {
    // one connection per shard: every statement below meets the same server session,
    // which keeps at most 512 routed statements (the least recently used are closed)
    let c = Cluster::start_temp(Options {
        all_clusters: true,
        redis: false,
        proxy: true,
        server_toml: String::new(),
        pool_toml: "size = 1".into(),
        extra_toml: String::new(),
        legacy: false,
        tls: false,
    })
    .expect("start cluster");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'lru', 8, '2026-11-05 00:00+00')").await.expect("seed");
    // 700 distinct texts, then all of them again: the second round re-prepares the evicted
    // ones under the same names, which fails (42P05) unless eviction closed them on the shard
    for round in 0..2 {
        for i in 0..700i32 {
            let sql = format!("SELECT order_no, {i} AS k FROM t_order WHERE merchant_id = $1 AND id = $2");
            let row = client.query_one(sql.as_str(), &[&8i64, &1i64]).await.unwrap_or_else(|e| panic!("round {round}, statement {i}: {e:?}"));
            assert_eq!(row.get::<_, String>(0), "lru");
            assert_eq!(row.get::<_, i32>(1), i);
        }
    }
    // and a statement used all along stays prepared through the churn
    let hot = client.prepare("SELECT order_no FROM t_order WHERE merchant_id = $1 AND id = $2").await.expect("prepare");
    for i in 0..1000i32 {
        let sql = format!("SELECT {i} AS k FROM t_order WHERE merchant_id = $1 AND id = $2");
        client.query_one(sql.as_str(), &[&8i64, &1i64]).await.expect("churn");
        assert_eq!(client.query_one(&hot, &[&8i64, &1i64]).await.expect("hot").get::<_, String>(0), "lru");
    }
}

/// Before the router's nesting bound, one statement with a 10,000-operator chain
/// (20 KB) overflowed a worker's stack and aborted the proxy for every client.
#[tokio::test]
async fn a_deeply_chained_statement_is_refused_and_the_proxy_keeps_serving() {
    let c = start("", "");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let chain = format!("1{}", "+1".repeat(100_000));
    let sharded = format!("SELECT * FROM t_order WHERE merchant_id = {chain}");
    let e = client.simple_query(&sharded).await.expect_err("simple protocol");
    assert_eq!(sqlstate(&e).as_deref(), Some("54001"), "{e:?}");
    assert!(e.as_db_error().is_some_and(|d| d.message().contains("= ANY($1)")), "{e:?}");
    let e = client.prepare(&format!("UPDATE t_order SET order_amount = {chain} WHERE merchant_id = $1")).await.expect_err("extended protocol");
    assert_eq!(sqlstate(&e).as_deref(), Some("54001"), "{e:?}");
    // Not about a sharded table: the server judges it (PostgreSQL has its own stack-depth check).
    match client.simple_query(&format!("SELECT {chain}")).await {
        Ok(_) => {}
        Err(e) => assert_eq!(sqlstate(&e).as_deref(), Some("54001"), "{e:?}"),
    }
    // the same session and new ones are served
    let one: i64 = client.query_one("SELECT count(*) FROM t_order WHERE merchant_id = $1", &[&7i64]).await.expect("same session").get(0);
    assert_eq!(one, 0);
    let other = connect(&c.info.proxy_dsn).await.expect("a new client after the deep statements");
    other.simple_query("SELECT 1").await.expect("new client");
}

/// Decision rows left in db_default once the proxy's batched cleanup had its
/// chance (it deletes them off the client's path, within milliseconds).
async fn decisions_left(def: &tokio_postgres::Client) -> i64 {
    let mut n = 0;
    for _ in 0..50 {
        n = def.query_one("SELECT count(*) FROM shardgate_2pc_decisions", &[]).await.expect("decisions").get(0);
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n
}
