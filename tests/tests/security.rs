//! No client reaches beyond its own SQL: each attack as it was reproduced,
//! plus variants, asserting it is refused and that nothing changed.

use shardgate_tests::{connect, sqlstate, Cluster, Options};

fn start() -> Cluster {
    Cluster::start_temp(Options { redis: false, ..Options::default() }).expect("start cluster")
}

/// Tables named `name` in the public schema of every shard and db_default.
async fn tables_named(c: &Cluster, name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for dsn in c.info.shards.iter().chain(std::iter::once(&c.info.default_dsn)) {
        let db = connect(dsn).await.expect("direct");
        let n: i64 = db.query_one("SELECT count(*) FROM pg_class WHERE relname = $1", &[&name]).await.expect("pg_class").get(0);
        if n > 0 {
            found.push(dsn.rsplit('/').next().unwrap_or_default().to_string());
        }
    }
    found
}

#[tokio::test]
async fn session_settings_never_become_sql_on_the_shards() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'S1', 1, '2026-11-02 00:00+00')").await.expect("seed");
    // the reproduced attack: strings read with backslash escapes, then a search_path that
    // closes the proxy's quote when pasted into SET … = '…'
    let e = client.batch_execute("SET standard_conforming_strings = off").await.expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    client.batch_execute("SELECT id FROM t_order WHERE merchant_id = 1").await.expect("query");
    let attacks = [
        // simple protocol, the exact text
        r"SET search_path = E'public\\\';CREATE TABLE public.pwned_by_client();--'",
        // a doubled quote in a standard string
        "SET search_path = 'public'';CREATE TABLE public.pwned_by_client();--'",
        // TimeZone and DateStyle carry values to the shards as well
        "SET TimeZone = 'UTC'';CREATE TABLE public.pwned_by_client();--'",
        "SET datestyle = 'ISO'';CREATE TABLE public.pwned_by_client();--'",
    ];
    for a in attacks {
        // PostgreSQL may accept or reject the odd value on db_default; either way the
        // shards get it only as a bind value
        let _ = client.batch_execute(a).await;
        let _ = client.batch_execute("SELECT id FROM t_order WHERE merchant_id = 1").await;
        let _ = client.batch_execute("SELECT count(*) FROM t_order").await;
        client.batch_execute("RESET ALL").await.expect("reset");
    }
    // the extended protocol (tokio-postgres prepares every statement)
    let _ = client.execute("SET search_path = 'public'';CREATE TABLE public.pwned_by_client();--'", &[]).await;
    let _ = client.query("SELECT id FROM t_order WHERE merchant_id = $1", &[&1i64]).await;
    client.batch_execute("RESET ALL").await.expect("reset");
    assert!(tables_named(&c, "pwned_by_client").await.is_empty(), "a client's setting ran as SQL");
    // settings still reach the shards: a zone changes how timestamptz is printed there
    client.batch_execute("SET TimeZone = 'Asia/Shanghai'").await.expect("set zone");
    let row = client.query_one("SELECT create_time::text FROM t_order WHERE merchant_id = 1", &[]).await.expect("read");
    assert_eq!(row.get::<_, String>(0), "2026-11-02 08:00:00+08");
    let row = client.simple_query("SELECT create_time FROM t_order WHERE merchant_id = 1").await.expect("read");
    let text = row.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(text.as_deref(), Some("2026-11-02 08:00:00+08"));
    // and the setting still works after the client's connection came back to the pool
    client.batch_execute("SET search_path = public, \"$user\"").await.expect("set path");
    let n: i64 = client.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_client_cannot_ask_for_backslash_strings_at_startup() {
    let c = start();
    let dsn = format!("{}&options=-c%20standard_conforming_strings%3Doff", c.info.proxy_dsn_for("app", "app-secret"));
    let r = connect(&dsn).await;
    let e = match r {
        Ok(client) => client.simple_query("SELECT 1").await.expect_err("refused"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
}

const FAST_SYNC: &str = "[health]\nprobe_interval_ms = 200\nprobe_timeout_ms = 2000\nfailure_threshold = 2\nrecovery_threshold = 2\n[fallback]\nsync_interval_ms = 300\n";

#[tokio::test]
async fn application_users_cannot_touch_the_control_tables() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // a write through t_order makes the proxy's tables exist for sure
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'C1', 1, '2026-11-02 00:00+00')").await.expect("seed");
    let attempts = [
        "INSERT INTO t_order_fallback (id, order_no, merchant_id, create_time, target_db, target_table) VALUES (7, 'x', 1, now(), 'db_1', 't_order_202611')",
        "SELECT * FROM t_order_fallback",
        "select * from \"t_order_fallback\"",
        "UPDATE public.T_ORDER_FALLBACK SET sync_status = 'SYNCED'",
        "SELECT * FROM shardgate_2pc_decisions",
        "DELETE FROM shardgate_2pc_decisions",
        "INSERT INTO shardgate_2pc_decisions (gid, shards) VALUES ('sg_x', '{1}')",
        "SELECT * FROM shardgate_migration",
        "/* x */ TRUNCATE t_order_fallback",
        // Unicode escapes spell the same names
        "DELETE FROM U&\"\\0073hardgate_lookup_t_order_order_no\"",
        "SELECT * FROM u&\"shardgate\\005flookup_t_order_order_no\"",
        "SELECT * FROM U&\"\\+000073hardgate_2pc_decisions\"",
        "SELECT * FROM U&\"t_order_fallbac\\006B\"",
        "SELECT * FROM U&\"!0073hardgate_2pc_decisions\" UESCAPE '!'",
        "SELECT to_regclass(U&'\\0073hardgate_lookup_t_order_order_no')",
        "/* u&\" */ DELETE FROM U&\"\\0073hardgate_lookup_t_order_order_no\"",
    ];
    for sql in attempts {
        let e = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "simple: {sql}: {e}");
        let e = client.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "extended: {sql}: {e}");
    }
    // inside a transaction block the refusal aborts it, as an error would
    client.batch_execute("BEGIN").await.expect("begin");
    assert!(client.batch_execute("SELECT * FROM t_order_fallback").await.is_err());
    let e = client.batch_execute("SELECT 1").await.expect_err("aborted");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"));
    client.batch_execute("ROLLBACK").await.expect("rollback");
    // nothing reached db_default
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let n: i64 = def.query_one("SELECT count(*) FROM t_order_fallback", &[]).await.expect("fallback").get(0);
    assert_eq!(n, 0);
    // the admin user still may read them (operations)
    let admin = connect(&c.info.proxy_dsn_for(shardgate_tests::ADMIN_USER.0, shardgate_tests::ADMIN_USER.1)).await.expect("admin");
    admin.batch_execute("SELECT count(*) FROM t_order_fallback").await.expect("admin reads");
}

#[tokio::test]
async fn sync_back_never_uses_a_name_it_did_not_make() {
    let c = Cluster::start_temp(Options { redis: false, extra_toml: FAST_SYNC.into(), ..Options::default() }).expect("start cluster");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'C1', 1, '2026-11-02 00:00+00')").await.expect("seed");
    // rows planted in the fallback table by someone with db_default access
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    def.batch_execute(
        "INSERT INTO t_order_fallback (id, order_no, merchant_id, create_time, target_db, target_table) VALUES \
         (11, 'evil', 1, '2026-11-02 00:00+00', 'db_1', 't_order_202611 (id) SELECT 1 WHERE false; CREATE TABLE public.pwned_via_sync(); --'), \
         (12, 'other-shard', 2, '2026-11-02 00:00+00', 'db_1', 't_order_202611'), \
         (13, 'fine', 9, '2026-11-02 00:00+00', 'db_1', 't_order_202611')",
    )
    .await
    .expect("plant rows");
    let t0 = std::time::Instant::now();
    loop {
        let rows = def.query("SELECT id, sync_status FROM t_order_fallback WHERE id IN (11, 12, 13) ORDER BY id", &[]).await.expect("status");
        let st: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if st.iter().all(|(_, s)| s != "PENDING") {
            assert_eq!(st, vec![(11, "FAILED".into()), (12, "FAILED".into()), (13, "SYNCED".into())]);
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "sync-back never looked at the rows: {st:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(tables_named(&c, "pwned_via_sync").await.is_empty(), "a fallback row's target_table ran as SQL");
    let err: String = def.query_one("SELECT last_error FROM t_order_fallback WHERE id = 11", &[]).await.expect("error").get(0);
    assert!(err.contains("not a month table"), "{err}");
    // the misplaced row did not land on db_1; the right one did
    let shard1 = connect(&c.info.shards[1]).await.expect("db_1");
    let ids: Vec<i64> = shard1.query("SELECT id FROM t_order_202611 ORDER BY id", &[]).await.expect("db_1").iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1, 13]);
}

/// Statements still running on the shards that contain `marker`.
async fn running_on_shards(c: &Cluster, marker: &str) -> i64 {
    running_on(&c.info.shards, marker).await
}

async fn running_on(shards: &[String], marker: &str) -> i64 {
    let mut n = 0;
    for dsn in shards {
        let db = connect(dsn).await.expect("direct");
        n += db
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()", &[&marker])
            .await
            .expect("pg_stat_activity")
            .get::<_, i64>(0);
    }
    n
}

async fn seed_two_shards(client: &tokio_postgres::Client) {
    client
        .batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'S1', 1, '2026-11-02 00:00+00'), (2, 'S2', 2, '2026-11-02 00:00+00')")
        .await
        .expect("seed");
}

#[tokio::test]
async fn a_cancel_stops_the_statement_on_every_shard_it_runs_on() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    seed_two_shards(&client).await;
    for (marker, shards, sql) in [
        ("sg_cancel_one", 1, "SELECT pg_sleep(6), id, 'sg_cancel_one' FROM t_order WHERE merchant_id = 1"),
        ("sg_cancel_two", 2, "SELECT pg_sleep(6), id, 'sg_cancel_two' FROM t_order WHERE merchant_id IN (1, 2)"),
    ] {
        for extended in [false, true] {
            let token = client.cancel_token();
            let dsns = c.info.shards.clone();
            let canceller = tokio::spawn(async move {
                // once the statement runs on its shards (a fixed delay was sometimes too short
                // on a loaded machine: the cancel came before anything ran, and was a no-op)
                let t0 = std::time::Instant::now();
                while running_on(&dsns, marker).await < shards {
                    assert!(t0.elapsed() < std::time::Duration::from_secs(5), "{marker}: never ran on {shards} shard(s)");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                token.cancel_query(tokio_postgres::NoTls).await.expect("cancel");
                std::time::Instant::now()
            });
            let e = if extended { client.query(sql, &[]).await.map(|_| ()).expect_err(sql) } else { client.batch_execute(sql).await.expect_err(sql) };
            let sent = canceller.await.expect("canceller");
            assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{sql}: {e}");
            assert!(sent.elapsed() < std::time::Duration::from_secs(1), "{sql}: the answer came {:?} after the cancel", sent.elapsed());
            assert_eq!(running_on_shards(&c, marker).await, 0, "{sql}: still running on a shard");
        }
    }
    // the session goes on
    let n: i64 = client.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 2);
}

/// A cancel that comes while the statement still waits for a shard connection
/// (here: the shard's pool is held by other clients' blocks) stops it
/// there, as PostgreSQL cancels a query it has received; it used to be lost (no
/// server ran the statement yet), and the statement ran once the connection
/// was free, long after the client had given up on it.
#[tokio::test]
async fn a_cancel_while_the_statement_waits_for_a_shard_connection_stops_it() {
    // pools of 3: three blocks hold db_1's
    let c = Cluster::start_temp(Options { redis: false, pool_toml: "size = 3\ncheckout_timeout_ms = 8000\n".into(), ..Options::default() }).expect("start cluster");
    let mut holders = Vec::new();
    for _ in 0..3 {
        let holder = connect(&c.info.proxy_dsn).await.expect("holder");
        if holders.is_empty() {
            seed_two_shards(&holder).await;
        }
        holder.batch_execute("BEGIN").await.expect("begin");
        holder.query("SELECT id FROM t_order WHERE merchant_id = 1", &[]).await.expect("hold a db_1 connection");
        holders.push(holder);
    }
    let client = connect(&c.info.proxy_dsn).await.expect("client");
    let token = client.cancel_token();
    let waiting = tokio::spawn(async move {
        let r = client.query("SELECT id FROM t_order WHERE merchant_id = 1", &[]).await.map(|rows| rows.len());
        (r, client)
    });
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert!(!waiting.is_finished(), "the statement did not wait for a db_1 connection");
    let sent = std::time::Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel");
    let (r, client) = tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await.expect("an answer after the cancel").expect("task");
    let e = r.expect_err("the canceled statement");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(sent.elapsed() < std::time::Duration::from_secs(2), "the answer came {:?} after the cancel", sent.elapsed());
    for holder in &holders {
        holder.batch_execute("COMMIT").await.expect("commit");
    }
    // the session goes on, and a cancel before a statement does not carry over to it
    assert_eq!(client.query("SELECT id FROM t_order WHERE merchant_id = 1", &[]).await.expect("after the cancel").len(), 1);
    let token = client.cancel_token();
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel while idle");
    // (the proxy handles it apart from the session: give it time to arrive first)
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(client.query("SELECT id FROM t_order WHERE merchant_id = 1", &[]).await.expect("a cancel while idle is ignored").len(), 1);
}

#[tokio::test]
async fn statement_timeout_and_query_timeout_reach_the_shards() {
    let c = Cluster::start_temp(Options { redis: false, server_toml: "query_timeout_ms = 1500\n".into(), ..Options::default() }).expect("start cluster");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    seed_two_shards(&client).await;
    // the client's statement_timeout
    client.batch_execute("SET statement_timeout = '500ms'").await.expect("set");
    for sql in ["SELECT pg_sleep(4), 'sg_st_one' FROM t_order WHERE merchant_id = 1", "SELECT pg_sleep(4), 'sg_st_two' FROM t_order"] {
        let t0 = std::time::Instant::now();
        let e = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{sql}: {e}");
        assert!(t0.elapsed() < std::time::Duration::from_millis(1400), "{sql}: took {:?}", t0.elapsed());
    }
    assert_eq!(running_on_shards(&c, "sg_st_").await, 0);
    client.batch_execute("RESET statement_timeout").await.expect("reset");
    // the proxy's query_timeout_ms covers routed statements
    for sql in ["SELECT pg_sleep(5), 'sg_qt_one' FROM t_order WHERE merchant_id = 1", "SELECT pg_sleep(5), 'sg_qt_two' FROM t_order"] {
        let t0 = std::time::Instant::now();
        let e = client.query(sql, &[]).await.map(|_| ()).expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{sql}: {e}");
        assert!(t0.elapsed() < std::time::Duration::from_millis(2500), "{sql}: took {:?}", t0.elapsed());
    }
    assert_eq!(running_on_shards(&c, "sg_qt_").await, 0);
    let n: i64 = client.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn set_local_timeouts_apply_on_the_shards_for_the_block_only() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    seed_two_shards(&client).await;
    // SET LOCAL before any shard joined the block, and after one had
    for (prelude, sql) in [
        ("", "SELECT pg_sleep(4), 'sg_sl_one' FROM t_order WHERE merchant_id = 1"),
        ("SELECT id FROM t_order WHERE merchant_id = 2", "SELECT pg_sleep(4), 'sg_sl_two' FROM t_order"),
    ] {
        client.batch_execute("BEGIN").await.expect("begin");
        if !prelude.is_empty() {
            client.batch_execute(prelude).await.expect("a shard joins the block");
        }
        client.batch_execute("SET LOCAL statement_timeout = '500ms'").await.expect("set local");
        let t0 = std::time::Instant::now();
        let e = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{sql}: {e}");
        assert!(t0.elapsed() < std::time::Duration::from_millis(1400), "{sql}: took {:?}", t0.elapsed());
        client.batch_execute("ROLLBACK").await.expect("rollback");
        assert_eq!(running_on_shards(&c, "sg_sl_").await, 0);
    }
    // SET LOCAL lock_timeout: a row another transaction holds is given up after it
    let other = connect(&c.info.proxy_dsn).await.expect("connect");
    other.batch_execute("BEGIN").await.expect("begin");
    other.batch_execute("UPDATE t_order SET pay_status = 'LOCKED' WHERE merchant_id = 1").await.expect("lock the row");
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute("SET LOCAL lock_timeout = '300ms'").await.expect("set local");
    let t0 = std::time::Instant::now();
    let e = client.batch_execute("UPDATE t_order SET pay_status = 'X' WHERE merchant_id = 1").await.expect_err("lock timeout");
    assert_eq!(sqlstate(&e).as_deref(), Some("55P03"), "{e}");
    assert!(t0.elapsed() < std::time::Duration::from_millis(1500), "took {:?}", t0.elapsed());
    client.batch_execute("ROLLBACK").await.expect("rollback");
    other.batch_execute("ROLLBACK").await.expect("rollback");
    // after the block the setting is gone, on every shard connection
    let r = client.query("SELECT pg_sleep(1), id FROM t_order", &[]).await.expect("no timeout after the block");
    assert_eq!(r.len(), 2);
    // a block that wrote two shards (two-phase commit) ends its SET LOCAL too: the next
    // block's shard statements run without it
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute("SET LOCAL statement_timeout = '300ms'").await.expect("set local");
    client.batch_execute("UPDATE t_order SET pay_status = 'A' WHERE merchant_id = 1").await.expect("db_1");
    client.batch_execute("UPDATE t_order SET pay_status = 'A' WHERE merchant_id = 2").await.expect("db_2");
    client.batch_execute("COMMIT").await.expect("commit");
    client.batch_execute("BEGIN").await.expect("begin");
    client.query("SELECT pg_sleep(1), id FROM t_order WHERE merchant_id = 1", &[]).await.expect("the last block's SET LOCAL is gone");
    client.batch_execute("COMMIT").await.expect("commit");
    // savepoints before any shard joined: ROLLBACK TO undoes the SET LOCALs after it,
    // RELEASE keeps them; COMMIT AND CHAIN ends them (its new block has none)
    for (steps, kept) in [
        (&["SAVEPOINT a", "SET LOCAL statement_timeout = '300ms'", "ROLLBACK TO SAVEPOINT a"][..], false),
        (&["SAVEPOINT a", "SET LOCAL statement_timeout = '300ms'", "SAVEPOINT b", "ROLLBACK TO a", "RELEASE a"][..], false),
        (&["SET LOCAL statement_timeout = '300ms'", "SAVEPOINT \"A\"", "SET LOCAL lock_timeout = '1s'", "ROLLBACK TO \"A\""][..], true),
        (&["SAVEPOINT a", "SET LOCAL statement_timeout = '300ms'", "RELEASE SAVEPOINT a"][..], true),
        (&["SET LOCAL statement_timeout = '300ms'", "COMMIT AND CHAIN"][..], false),
    ] {
        client.batch_execute("BEGIN").await.expect("begin");
        for step in steps {
            client.batch_execute(step).await.expect(step);
        }
        let r = client.query("SELECT pg_sleep(1), id FROM t_order WHERE merchant_id = 1", &[]).await;
        match kept {
            true => assert_eq!(r.as_ref().err().and_then(sqlstate).as_deref(), Some("57014"), "{steps:?}: the SET LOCAL stands"),
            false => assert!(r.is_ok(), "{steps:?}: the SET LOCAL is gone: {r:?}"),
        }
        client.batch_execute("ROLLBACK").await.expect("rollback");
    }
    // BEGIN and SET LOCAL in one extended batch (as pgjdbc sends them) apply too
    {
        use shardgate_tests::raw::{frame, md5_login, pbe, read_until_ready};
        use std::io::Write;
        let mut s = md5_login(&c);
        let mut batch = pbe("BEGIN");
        batch.extend(pbe("SET LOCAL statement_timeout = '500ms'"));
        batch.extend(pbe("SELECT pg_sleep(4), 'sg_sl_batch' FROM t_order WHERE merchant_id = 1"));
        batch.extend(frame(b'S', b""));
        let t0 = std::time::Instant::now();
        s.write_all(&batch).expect("batch");
        let msgs = read_until_ready(&mut s);
        assert_eq!(shardgate_tests::raw::error_code(&msgs).as_deref(), Some("57014"), "{msgs:?}");
        assert!(t0.elapsed() < std::time::Duration::from_millis(1400), "took {:?}", t0.elapsed());
    }
    // SET LOCAL TimeZone: the router reads offset-free times in it, as the shards do
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute("SET LOCAL TIME ZONE 'Asia/Tokyo'").await.expect("set local");
    client
        .batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (77, 'TZ1', 1, '2026-12-01 03:00')")
        .await
        .expect("insert");
    client.batch_execute("COMMIT").await.expect("commit");
    // 2026-12-01 03:00 in Tokyo is 2026-11-30 18:00 UTC: November's table, found by a November range
    let n: i64 = client
        .query_one("SELECT count(*) FROM t_order WHERE merchant_id = 1 AND create_time >= '2026-11-30 00:00+00' AND create_time < '2026-12-01 00:00+00' AND id = 77", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "the row went to the month of its instant");
}

#[tokio::test]
async fn an_insert_cannot_make_month_tables_outside_the_window() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    for when in ["9999-01-01 00:00+00", "1970-01-01 00:00+00", "2040-01-01 00:00+00"] {
        let sql = format!("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'far', 3, '{when}')");
        let e = client.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
        let m = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
        assert!(m.contains("create_months_ahead"), "{m}");
    }
    for dsn in &c.info.shards {
        let shard = connect(dsn).await.expect("shard");
        let months = shardgate_tests::month_tables(&shard).await;
        assert!(months.iter().all(|t| t.as_str() > "t_order_2020" && t.as_str() < "t_order_2030"), "{dsn}: {months:?}");
    }
    // within the window, a missing month is still made on demand
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'old', 3, '2024-02-03 00:00+00')").await.expect("in the window");
}

/// The SCRAM server-first message (`r=…,s=<salt>,i=<iterations>`) the proxy
/// sends `user`; the salt and iterations part of it.
fn scram_salt(port: u16, user: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let mut body = Vec::new();
    body.extend_from_slice(&196_608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", "shardgate")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg).expect("startup");
    let read_msg = |s: &mut std::net::TcpStream| -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).expect("header");
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        let mut b = vec![0u8; len];
        s.read_exact(&mut b).expect("body");
        (head[0], b)
    };
    let (tag, b) = read_msg(&mut s);
    assert_eq!((tag, &b[..4]), (b'R', &10i32.to_be_bytes()[..]), "SASL offered to {user}");
    let first = b"n,,n=,r=clientnonceclientnonce";
    let mut m = Vec::new();
    m.extend_from_slice(b"SCRAM-SHA-256\0");
    m.extend_from_slice(&(first.len() as i32).to_be_bytes());
    m.extend_from_slice(first);
    let mut out = vec![b'p'];
    out.extend_from_slice(&((m.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&m);
    s.write_all(&out).expect("sasl initial");
    let (tag, b) = read_msg(&mut s);
    assert_eq!((tag, &b[..4]), (b'R', &11i32.to_be_bytes()[..]), "SASL continue for {user}");
    let text = String::from_utf8_lossy(&b[4..]).into_owned();
    text.split(',').filter(|p| p.starts_with("s=") || p.starts_with("i=")).collect::<Vec<_>>().join(",")
}

#[tokio::test]
async fn an_unknown_user_looks_like_a_known_one_with_a_wrong_password() {
    let c = start();
    let port = c.info.proxy_port;
    let known = [scram_salt(port, "app"), scram_salt(port, "app")];
    let ghost = [scram_salt(port, "ghost"), scram_salt(port, "ghost")];
    assert_eq!(known[0], known[1], "a known user's salt is stable");
    assert_eq!(ghost[0], ghost[1], "an unknown user's salt must be stable too, or it gives the user away");
    assert_ne!(ghost[0], scram_salt(port, "ghost2"), "each unknown name has its own salt");
    let iterations = |s: &str| s.split(',').find(|p| p.starts_with("i=")).map(str::to_string);
    assert_eq!(iterations(&known[0]), iterations(&ghost[0]), "same iteration count");
    // and both fail the same way with a wrong password
    for user in ["app", "ghost"] {
        let e = connect(&c.info.proxy_dsn_for(user, "wrong")).await.expect_err("refused");
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{user}: {e}");
        let m = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
        assert_eq!(m, format!("password authentication failed for user \"{user}\""));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_that_never_log_in_do_not_keep_a_real_client_out() {
    use tokio::io::AsyncReadExt;
    let c = Cluster::start_temp(Options { redis: false, server_toml: "max_unauthenticated = 64\nlogin_timeout_ms = 2000\n".into(), ..Options::default() })
        .expect("start cluster");
    let addr = format!("127.0.0.1:{}", c.info.proxy_port);
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.expect("connect"));
    }
    // a real client still logs in and is served while they sit there: each new connection
    // beyond max_unauthenticated ends the one that has waited longest
    let t0 = std::time::Instant::now();
    let client = tokio::time::timeout(std::time::Duration::from_secs(5), connect(&c.info.proxy_dsn)).await.expect("login in time").expect("login");
    client.batch_execute("SELECT count(*) FROM t_order").await.expect("query");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    // the oldest waiting sockets made room: closed at once
    let mut buf = Vec::new();
    let first = idle.first_mut().expect("sockets");
    tokio::time::timeout(std::time::Duration::from_secs(1), first.read_to_end(&mut buf)).await.expect("evicted at once").expect("read");
    // and the newest ones, still waiting, are closed with 08006 after login_timeout_ms
    let mut buf = Vec::new();
    let last = idle.last_mut().expect("sockets");
    tokio::time::timeout(std::time::Duration::from_secs(5), last.read_to_end(&mut buf)).await.expect("closed after the login timeout").expect("read");
    assert_eq!(buf.first(), Some(&b'E'), "an ErrorResponse");
    assert!(String::from_utf8_lossy(&buf).contains("08006"), "{:?}", String::from_utf8_lossy(&buf));
    // the proxy holds no more than the cap of them meanwhile (and none now)
    let (_, metrics) = shardgate_tests::http_get(&format!("{}/metrics", c.info.admin_url)).expect("metrics");
    assert!(metrics.contains("shardgate_"), "metrics served");
    drop(idle);
    client.batch_execute("SELECT 1").await.expect("still served");
}

/// GET `path` on the admin port, with an optional bearer token; the status code.
fn admin_status(port: u16, path: &str, token: Option<&str>) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("admin port");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn the_admin_port_can_require_a_bearer_token() {
    let c = Cluster::start_temp(Options { redis: false, server_toml: "admin_token = \"t0ken-sg\"\n".into(), ..Options::default() }).expect("start cluster");
    let port = c.info.admin_port;
    assert_eq!(admin_status(port, "/livez", None), 200, "liveness stays open for the orchestrator");
    for path in ["/metrics", "/health", "/readyz"] {
        assert_eq!(admin_status(port, path, None), 401, "{path} without a token");
        assert_eq!(admin_status(port, path, Some("wrong-token")), 401, "{path} with a wrong token");
        assert_ne!(admin_status(port, path, Some("t0ken-sg")), 401, "{path} with the token");
    }
    assert_eq!(admin_status(port, "/metrics", Some("t0ken-sg")), 200);
    // no secret in the proxy's log at info level
    let log = c.proxy_log();
    for secret in ["t0ken-sg", "app-secret"] {
        assert!(!log.contains(secret), "{secret} in the proxy log");
    }
}

#[tokio::test]
async fn names_that_merely_contain_shardgate_are_not_refused() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("SET application_name = 'shardgate_billing'").await.expect("an application name is not a control table");
    client.batch_execute("/* shardgate_trace=1 */ SELECT 1").await.expect("a comment");
    client.batch_execute("CREATE TABLE shardgate_notes (x int); DROP TABLE shardgate_notes").await.expect("an application's own table");
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_a_hundred_thousand_prepared_statements() {
    use shardgate_tests::raw::{frame, md5_login, read_until_ready};
    use std::io::Write;
    let c = start();
    let pid = c.info.proxy_pid.expect("proxy pid");
    let before = shardgate_tests::rss_kib(pid);
    let mut s = md5_login(&c);
    let mut w = s.try_clone().expect("clone");
    // 100,000 distinct named statements, half on t_order (answered by the proxy), half passed
    // through to db_default, in one pipeline; a writer thread, so neither side waits on the other
    let writer = std::thread::spawn(move || {
        let mut batch = Vec::with_capacity(1 << 20);
        for i in 0..100_000u32 {
            let sql = if i % 2 == 0 { format!("SELECT id FROM t_order WHERE merchant_id = {i}") } else { format!("SELECT {i}") };
            let mut body = format!("s{i}\0{sql}\0").into_bytes();
            body.extend_from_slice(&0i16.to_be_bytes());
            batch.extend_from_slice(&frame(b'P', &body));
            if batch.len() > 1 << 19 {
                w.write_all(&batch).expect("parses");
                batch.clear();
            }
        }
        batch.extend_from_slice(&frame(b'S', &[]));
        w.write_all(&batch).expect("sync");
    });
    let msgs = read_until_ready(&mut s);
    writer.join().expect("writer");
    let complete = msgs.iter().filter(|(t, _)| *t == b'1').count();
    assert_eq!(complete, 10_000, "server.max_client_statements (10,000 by default) statements are prepared");
    assert_eq!(shardgate_tests::raw::error_code(&msgs).as_deref(), Some("53400"), "then 53400: configuration limit exceeded");
    // closing one makes room for one more; the session is still usable
    let mut again = frame(b'C', b"Ss0\0");
    again.extend_from_slice(&frame(b'P', b"fresh\0SELECT 1\0\0\0"));
    again.extend_from_slice(&frame(b'S', &[]));
    s.write_all(&again).expect("close and parse");
    let msgs = read_until_ready(&mut s);
    assert_eq!(msgs.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![b'3', b'1', b'Z'], "CloseComplete, ParseComplete, ReadyForQuery");
    // named portals of t_order statements (the proxy holds them) are capped too
    let mut binds = frame(b'C', b"Ss2\0");
    binds.extend_from_slice(&frame(b'P', b"portal_stmt\0SELECT id FROM t_order WHERE merchant_id = 1\0\0\0"));
    for i in 0..1_001 {
        let mut body = format!("c{i}\0portal_stmt\0").into_bytes();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        binds.extend_from_slice(&frame(b'B', &body));
    }
    binds.extend_from_slice(&frame(b'S', &[]));
    s.write_all(&binds).expect("binds");
    let msgs = read_until_ready(&mut s);
    assert_eq!(msgs.iter().filter(|(t, _)| *t == b'2').count(), 1_000, "server.max_client_portals (1,000 by default) portals are bound");
    assert_eq!(shardgate_tests::raw::error_code(&msgs).as_deref(), Some("53400"));
    let grown = shardgate_tests::rss_kib(pid).saturating_sub(before);
    assert!(grown < 200 * 1024, "the proxy grew by {grown} KiB for one client's statements");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_a_large_answer_costs_bounded_memory() {
    use std::io::Write;
    let c = start();
    let pid = c.info.proxy_pid.expect("proxy pid");
    let app = connect(&c.info.proxy_dsn).await.expect("connect");
    // one order per shard through the proxy makes the month table; then 20,000 wide rows per
    // shard straight into it: the whole answer is about 8 × 20,000 × 1 KB = 160 MB
    for m in 0..8i64 {
        app.execute(
            "INSERT INTO t_order (id, merchant_id, order_no, order_amount, pay_status, create_time) VALUES ($1, $2, $3, 1, 'PAID', '2026-11-02 00:00:00+00')",
            &[&(900_000 + m), &m, &format!("wide-seed-{m}")],
        )
        .await
        .expect("seed");
        let shard = connect(&c.info.shards[m as usize]).await.expect("shard");
        shard
            .batch_execute(&format!(
                "INSERT INTO t_order_202611 (id, merchant_id, order_no, order_amount, pay_status, create_time) \
                 SELECT 1000000 * ({m} + 1) + g, {m}, 'wide-{m}-' || g || '-' || repeat('x', 1000), 1, 'PAID', '2026-11-03 00:00:00+00' FROM generate_series(1, 20000) g"
            ))
            .await
            .expect("wide rows");
    }
    let before = shardgate_tests::rss_kib(pid);
    let mut s = shardgate_tests::raw::md5_login(&c);
    s.write_all(&shardgate_tests::raw::frame(b'Q', b"SELECT * FROM t_order\0")).expect("query");
    // it never reads; meanwhile the proxy's memory stays bounded and other clients are served
    let mut peak = 0;
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        peak = peak.max(shardgate_tests::rss_kib(pid).saturating_sub(before));
        let n: i64 = app.query_one("SELECT count(*) FROM t_order WHERE merchant_id = 1", &[]).await.expect("another client is served").get(0);
        assert_eq!(n, 20_001);
    }
    assert!(peak < 48 * 1024, "the proxy grew by {peak} KiB while one client did not read a 160 MB answer");
    // the shards are paused too, not buffering into the proxy: their statements are still there
    let running = async || {
        let mut n = 0i64;
        for dsn in &c.info.shards {
            let db = connect(dsn).await.expect("shard");
            n += db
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT%t_order_202611%' AND state = 'active' AND pid <> pg_backend_pid()", &[])
                .await
                .expect("activity")
                .get::<_, i64>(0);
        }
        n
    };
    assert!(running().await >= 1, "the answer is being produced while the client does not read");
    // the client goes away: the shard statements end
    drop(s);
    let t0 = std::time::Instant::now();
    while running().await > 0 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "shard statements outlived their client by {:?}", t0.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_string_literal_reaches_the_shards_as_the_same_literal() {
    let c = start();
    let app = connect(&c.info.proxy_dsn).await.expect("connect");
    // merchants 1 and 9 live on db_1
    app.batch_execute(
        "INSERT INTO t_order (id, merchant_id, order_no, order_amount, pay_status, create_time) VALUES \
         (5001, 1, 'q-1', 1, 'PAID', '2026-11-02 00:00:00+00'), (5002, 9, 'q-9', 1, 'PAID', '2026-11-03 00:00:00+00'), \
         (5003, 1, 'a''''b', 1, 'it''s', '2026-11-04 00:00:00+00'), (5004, 1, 'back\\slash', 1, '\\''', '2026-11-05 00:00:00+00')",
    )
    .await
    .expect("insert");
    // sqlparser printed the value \' OR true -- as '\' OR true --': on the shard that is
    // `pay_status = '\'` OR true, and this DELETE removed every row of db_1's month tables
    let r = app
        .simple_query("DELETE FROM t_order WHERE merchant_id = 1 AND create_time >= '2026-11-01' AND pay_status = '\\'' OR true --'")
        .await
        .expect("delete");
    let tag = r.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert_eq!(tag, Some(0), "no row has that pay_status");
    // the same through a type modifier and a bit string, which sqlparser prints unquoted
    for sql in [
        "DELETE FROM t_order WHERE merchant_id = 1 AND create_time >= '2026-11-01' AND pay_status = ''::bpchar('1) OR (true')",
        "DELETE FROM t_order WHERE merchant_id = 1 AND create_time >= '2026-11-01' AND B'1'' = B''1'' OR true --'",
    ] {
        let e = app.simple_query(sql).await.expect_err("refused");
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
    }
    let n: i64 = app.query_one("SELECT count(*) FROM t_order WHERE merchant_id IN (1, 9)", &[]).await.expect("count").get(0);
    assert_eq!(n, 4, "every row is still there");
    // and values with doubled quotes and backslashes round-trip exactly, in WHERE and in results
    for (sql, want) in [
        ("SELECT order_no FROM t_order WHERE merchant_id = 1 AND order_no = 'a''''b'", "a''b"),
        ("SELECT pay_status FROM t_order WHERE merchant_id = 1 AND pay_status = 'it''s'", "it's"),
        ("SELECT pay_status FROM t_order WHERE merchant_id = 1 AND pay_status = '\\'''", "\\'"),
        ("SELECT order_no FROM t_order WHERE order_no = 'back\\slash'", "back\\slash"),
        ("SELECT 'x''''y' || order_no FROM t_order WHERE id = 5001 AND merchant_id = 1", "x''yq-1"),
    ] {
        let rows = app.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let got: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![want.to_string()], "{sql}");
    }
    // a quoted name holding its own quote cannot be printed exactly: refused, not altered
    let e = app.simple_query("SELECT id AS \"a\"\"b\" FROM t_order WHERE merchant_id = 1").await.expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_caches_are_bounded_in_bytes() {
    use shardgate_tests::raw::{frame, md5_login, read_until_ready};
    use std::io::Write;
    let c = start();
    let pid = c.info.proxy_pid.expect("proxy pid");
    let mut s = md5_login(&c);
    // warm up, then measure: 600 distinct statements on t_order of about 60 KB each,
    // prepared (the router analyses and caches each text): 36 MB of text, which the router
    // cache (64 MiB, each text weighed at 33 times its length) does not keep all of; before
    // it was bounded in bytes the proxy grew by 1.6 GB here (4 GB for 1,500 texts)
    let statement = |i: usize| {
        let values: Vec<String> = (0..6_000).map(|j| format!("'v{i}-{j}'")).collect();
        format!("SELECT id FROM t_order WHERE merchant_id = $1 AND order_no IN ({})", values.join(","))
    };
    let parse = |i: usize| {
        let mut body = format!("\0{}\0", statement(i)).into_bytes();
        body.extend_from_slice(&0i16.to_be_bytes());
        let mut m = frame(b'P', &body);
        m.extend_from_slice(&frame(b'S', &[]));
        m
    };
    for i in 0..20 {
        s.write_all(&parse(i)).expect("parse");
        read_until_ready(&mut s);
    }
    let before = shardgate_tests::rss_kib(pid);
    let mut peak = 0;
    for i in 20..620 {
        s.write_all(&parse(i)).expect("parse");
        let msgs = read_until_ready(&mut s);
        assert_eq!(msgs.first().map(|m| m.0), Some(b'1'), "ParseComplete");
        if i % 100 == 0 {
            peak = peak.max(shardgate_tests::rss_kib(pid).saturating_sub(before));
        }
    }
    peak = peak.max(shardgate_tests::rss_kib(pid).saturating_sub(before));
    assert!(peak < 160 * 1024, "the proxy grew by {peak} KiB caching one client's statement texts");
    // named statements stay with the client (and keep their analyses): bounded per client
    // in bytes too (server.max_client_statement_bytes, 64 MiB; an 84 KB t_order statement
    // counts about 2.8 MB with its analysis)
    let mut prepared = 0;
    let refused = loop {
        let mut body = format!("big{prepared}\0{}\0", statement(100_000 + prepared)).into_bytes();
        body.extend_from_slice(&0i16.to_be_bytes());
        let mut m = frame(b'P', &body);
        m.extend_from_slice(&frame(b'S', &[]));
        s.write_all(&m).expect("parse");
        let msgs = read_until_ready(&mut s);
        if let Some(code) = shardgate_tests::raw::error_code(&msgs) {
            break code;
        }
        prepared += 1;
        assert!(prepared < 100, "100 named 60 KB statements held by one client");
    };
    assert_eq!(refused, "53400");
    assert!((15..40).contains(&prepared), "{prepared} named statements before the byte cap");
}

/// A statement on t_order cannot change the session of the shard connection it
/// runs on (which other clients use next): found by a review of the simple
/// Query path, where `standard_conforming_strings` turned off that way made a
/// spliced literal `'a\'` end early and the rest of the text a second statement.
#[tokio::test]
async fn a_statement_on_t_order_cannot_change_the_shard_session() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (1, 'S1', 1, '2026-11-02 00:00+00')").await.expect("seed");
    let month = "t_order_202611";
    assert!(!tables_named(&c, month).await.is_empty());
    for sql in [
        "SELECT set_config('standard_conforming_strings', 'off', false) FROM t_order WHERE merchant_id = 1",
        "SELECT id FROM t_order WHERE merchant_id = 1 AND \"set_config\"('standard_conforming_strings', 'off', true) IS NOT NULL",
        "SELECT pg_catalog.set_config('search_path', 'pg_temp', false) FROM t_order WHERE merchant_id = 1",
        "SELECT pg_advisory_lock(42) FROM t_order WHERE merchant_id = 1",
        "SELECT o.id FROM t_order o, set_config('standard_conforming_strings', 'off', false) s WHERE o.merchant_id = 1",
        "SELECT o.id FROM t_order o, LATERAL pg_advisory_lock(o.id) l WHERE o.merchant_id = 1",
        "SELECT pg_terminate_backend(pg_backend_pid() - 1) FROM t_order WHERE merchant_id = 1",
    ] {
        // on its own and inside a block (where a setting local to the transaction would last
        // for the statements after it)
        let e = client.simple_query(sql).await.expect_err("refused");
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
        client.batch_execute("BEGIN").await.expect("begin");
        let e = client.simple_query(sql).await.expect_err("refused in a block");
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
        client.batch_execute("ROLLBACK").await.expect("rollback");
    }
    // the text the reviewer's attack sent next: one literal, on every shard connection
    for _ in 0..20 {
        let rows = client
            .simple_query(r"SELECT id FROM t_order WHERE merchant_id = 1 AND order_no = 'a\' AND pay_status = '; DROP TABLE t_order_202611; --'")
            .await
            .expect("one statement");
        assert!(!rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
    }
    assert_eq!(tables_named(&c, month).await.len(), 8, "every shard still has {month}");
    // nor did any of them reach a shard's session
    for dsn in &c.info.shards {
        let db = connect(dsn).await.expect("direct");
        let n: i64 = db.query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", &[]).await.expect("pg_locks").get(0);
        assert_eq!(n, 0, "an advisory lock is held on {dsn}");
    }
}

/// A pooled server connection carries the prepared statements of every client
/// that used it (renamed by the proxy, listed in `pg_prepared_statements`). A
/// client that drops one of them by name (`DEALLOCATE`, in either protocol),
/// or all of them (`DISCARD ALL` / `DEALLOCATE ALL` through the extended
/// protocol), must not break the next client's statements on that connection.
#[tokio::test]
async fn a_client_cannot_drop_the_prepared_statements_of_another() {
    // one db_default connection: every client below shares it
    let c = Cluster::start_temp(Options { redis: false, pool_toml: "size = 1\n".into(), ..Options::default() }).expect("start cluster");
    let victim = connect(&c.info.proxy_dsn).await.expect("victim");
    let stmt = victim.prepare("SELECT $1::int + 1").await.expect("prepare");
    let answer = |r: Vec<tokio_postgres::Row>| r[0].get::<_, i32>(0);
    assert_eq!(answer(victim.query(&stmt, &[&41i32]).await.expect("first run")), 42);
    // (the last two fail on the server, in a block, and drop nothing; `|` separates two
    // statements sent one after the other)
    let attacks = ["DEALLOCATE {name}", "DEALLOCATE PREPARE {name}", "deallocate  {name}", "DISCARD ALL", "DEALLOCATE ALL", "BEGIN|DISCARD ALL", "DISCARD ALL; SELECT 1", "-- PostgreSQL ends this at a carriage return\rDEALLOCATE {name}", "/**/DEALLOCATE ALL;", "SELECT 1; DEALLOCATE ALL"];
    for attack in attacks {
        for extended in [false, true] {
            if extended && (attack.contains(';') || attack.contains('|')) {
                continue;
            }
            let attacker = connect(&c.info.proxy_dsn).await.expect("attacker");
            let names: Vec<String> = attacker
                .query("SELECT name FROM pg_prepared_statements", &[])
                .await
                .expect("listed")
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(!names.is_empty(), "the victim's statement is on the shared connection");
            for name in &names {
                let sql = attack.replace("{name}", name);
                let (first, sql) = sql.split_once('|').map_or(("", sql.as_str()), |(a, b)| (a, b));
                if !first.is_empty() {
                    attacker.batch_execute(first).await.expect("first statement");
                }
                let r = if extended { attacker.execute(sql, &[]).await.map(|_| ()) } else { attacker.batch_execute(sql).await };
                // (whatever PostgreSQL answers the attacker; what matters is the victim)
                let _ = r;
                let _ = attacker.batch_execute("ROLLBACK").await;
            }
            drop(attacker);
            // the attacker's connection task ends; give the proxy its disconnect
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let got = victim.query(&stmt, &[&41i32]).await;
            assert_eq!(got.map(answer).map_err(|e| e.to_string()), Ok(42), "after another client ran {attack:?} (extended: {extended})");
        }
    }
    // nor run or replace one: the names are listed, but not reachable
    let attacker = connect(&c.info.proxy_dsn).await.expect("attacker");
    let names: Vec<String> = attacker.query("SELECT name FROM pg_prepared_statements", &[]).await.expect("listed").iter().map(|r| r.get(0)).collect();
    assert!(!names.is_empty());
    for name in &names {
        for sql in [
            format!("EXECUTE {name}(1)"),
            format!("EXPLAIN EXECUTE {name}(1)"),
            format!("EXECUTE \"{name}\"(1)"),
            format!("PREPARE {name}x AS SELECT 1"),
            format!("-- a comment\rEXECUTE {name}(1)"),
        ] {
            let e = attacker.batch_execute(&sql).await.expect_err("refused");
            assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e}");
            let e = attacker.execute(sql.as_str(), &[]).await.expect_err("refused, extended");
            assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e}");
        }
    }
    // a name of several-byte characters where the proxy's prefixes would end is PostgreSQL's to answer
    for sql in ["EXECUTE éé -- sg", "EXECUTE sgé"] {
        let e = attacker.batch_execute(sql).await.expect_err("no such statement");
        assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{sql}: {e}");
    }
    // the attacker's session goes on; its own statements are its own
    attacker.batch_execute("PREPARE mine(int) AS SELECT $1 + 1").await.expect("own PREPARE");
    let r = attacker.simple_query("EXECUTE mine(1)").await.expect("own EXECUTE");
    assert!(r.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("2"))));
    // (PREPARE pinned it to the pool's one connection, closed when it leaves)
    drop(attacker);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(answer(victim.query(&stmt, &[&41i32]).await.expect("victim after all")), 42);
}

/// A statement's server name comes from its text, and a pooled connection
/// keeps it: prepared by one client under a search path of its choosing, the
/// same text of another client must still read that client's tables
/// (PostgreSQL parses a prepared statement again when the search path it is
/// run under differs from the one it was prepared under).
#[tokio::test]
async fn a_client_cannot_swap_the_tables_behind_another_clients_statement() {
    let c = Cluster::start_temp(Options { redis: false, pool_toml: "size = 1\n".into(), ..Options::default() }).expect("start cluster");
    let db = connect(&c.info.default_dsn).await.expect("db_default");
    db.batch_execute(
        "CREATE TABLE sp_t (v int); INSERT INTO sp_t VALUES (1); CREATE SCHEMA evil; CREATE TABLE evil.sp_t (v int); INSERT INTO evil.sp_t VALUES (666); \
         GRANT ALL ON SCHEMA evil TO PUBLIC; GRANT ALL ON ALL TABLES IN SCHEMA evil TO PUBLIC",
    )
    .await
    .expect("tables");
    let victim = connect(&c.info.proxy_dsn).await.expect("victim");
    let stmt = victim.prepare("SELECT v FROM sp_t").await.expect("prepare");
    let read = |r: Vec<tokio_postgres::Row>| r[0].get::<_, i32>(0);
    assert_eq!(read(victim.query(&stmt, &[]).await.expect("first")), 1);
    for setting in ["SET LOCAL search_path = evil, public", "SET LOCAL SCHEMA 'evil'"] {
        let attacker = connect(&c.info.proxy_dsn).await.expect("attacker");
        attacker.batch_execute(&format!("BEGIN; {setting}")).await.expect("in a block");
        let own = attacker.prepare("SELECT v FROM sp_t").await.expect("the same text");
        assert_eq!(read(attacker.query(&own, &[]).await.expect("its own")), 666, "the attacker reads its path");
        attacker.batch_execute("COMMIT").await.expect("commit");
        drop(attacker);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(read(victim.query(&stmt, &[]).await.expect("victim")), 1, "after another client prepared the text under {setting:?}");
    }
}

/// `DEALLOCATE name` of a statement prepared through the protocol (psycopg 3
/// on a libpq before 17 drops its statements this way) answers as one
/// PostgreSQL does, on db_default's tables and on t_order: the statement goes
/// for this client only, the next use is 26000, in a failed block 25P02; a
/// quoted name keeps its case and its doubled quotes. Driven by psycopg, whose statement names (`_pg3_0`, ...) are known.
#[tokio::test]
async fn deallocate_of_a_protocol_statement_answers_as_postgresql_does() {
    let c = start();
    let db = connect(&c.info.default_dsn).await.expect("db_default");
    db.batch_execute("CREATE TABLE dealloc_t (v int); INSERT INTO dealloc_t VALUES (7)").await.expect("table");
    const SCRIPT: &str = r#"
import sys, json, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True, prepare_threshold=None)
sql = "SELECT count(*) FROM " + sys.argv[2]
out = []
def run(f):
    try:
        f(); out.append("ok")
    except psycopg.Error as e:
        out.append(e.sqlstate or str(e))
# each execute with prepare=True on a new text makes _pg3_<n>; the raw protocol reuses it
pg = conn.pgconn
def use(name):
    r = pg.exec_prepared(name.encode(), [])
    if r.status != psycopg.pq.ExecStatus.TUPLES_OK:
        raise psycopg.errors.lookup(r.error_field(psycopg.pq.DiagnosticField.SQLSTATE).decode())("x")
def prep(name):
    r = pg.prepare(name.encode(), sql.encode())
    if r.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.lookup(r.error_field(psycopg.pq.DiagnosticField.SQLSTATE).decode())("x")
run(lambda: prep("_pg3_0")); run(lambda: use("_pg3_0"))
run(lambda: conn.execute("DEALLOCATE _pg3_0")); run(lambda: use("_pg3_0"))
run(lambda: conn.execute("DEALLOCATE _pg3_0"))
run(lambda: prep("_pg3_1"))
run(lambda: conn.execute("BEGIN")); run(lambda: conn.execute("DEALLOCATE PREPARE _PG3_1;")); run(lambda: conn.execute("COMMIT"))
run(lambda: use("_pg3_1"))
run(lambda: prep("_pg3_2"))
run(lambda: conn.execute("BEGIN")); run(lambda: conn.execute("SELECT 1/0")); run(lambda: conn.execute("DEALLOCATE _pg3_2")); run(lambda: conn.execute("ROLLBACK"))
run(lambda: use("_pg3_2"))
# a name that needs quotes (mixed case, a doubled quote): only its quoted spelling names it
run(lambda: prep('Mixed"Q')); run(lambda: conn.execute('DEALLOCATE "mixed""q"'))
run(lambda: conn.execute('DEALLOCATE PREPARE "Mixed""Q"')); run(lambda: use('Mixed"Q'))
run(lambda: prep("UPPER")); run(lambda: conn.execute("DEALLOCATE UPPER")); run(lambda: conn.execute('deallocate "UPPER";')); run(lambda: use("UPPER"))
print(json.dumps(out))
"#;
    let run = |dsn: &str, table: &str| -> Vec<String> {
        let out = std::process::Command::new("python3").args(["-c", SCRIPT, dsn, table]).output().expect("python3");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let expected = run(&c.info.default_dsn, "dealloc_t");
    assert_eq!(
        expected,
        [
            "ok", "ok", "ok", "26000", "26000", "ok", "ok", "ok", "ok", "26000", "ok", "ok", "22012", "25P02", "ok", "ok", "ok", "26000", "ok", "26000", "ok", "26000",
            "ok", "26000"
        ],
        "PostgreSQL's answers"
    );
    for table in ["dealloc_t", "t_order"] {
        assert_eq!(run(&c.info.proxy_dsn, table), expected, "through the proxy, on {table}");
    }
}

/// The unnamed prepared statement is the client's own, as in PostgreSQL: a
/// Bind of it by a client that parsed none answers 26000, never runs what
/// another client left unnamed on a pooled server connection; and a client's
/// own unnamed statement still runs after its server connection went back to
/// the pool between transactions.
#[tokio::test]
async fn the_unnamed_statement_of_another_client_is_never_run() {
    use std::io::Write;
    use shardgate_tests::raw::{error_code, frame, md5_login, read_until_ready};
    let c = start();
    let parse = |sql: &str| frame(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat());
    let bind_exec = [frame(b'B', b"\0\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0")].concat();
    let sync = frame(b'S', b"");
    let rows = |msgs: &[(u8, Vec<u8>)]| msgs.iter().filter(|(t, _)| *t == b'D').map(|(_, b)| String::from_utf8_lossy(&b[6..]).to_string()).collect::<Vec<_>>();
    let mut a = md5_login(&c);
    a.write_all(&[parse("SELECT 'left by a'"), bind_exec.clone(), sync.clone()].concat()).expect("send");
    assert_eq!(rows(&read_until_ready(&mut a)), ["left by a"]);
    // b has parsed nothing: PostgreSQL has no unnamed statement for it
    for _ in 0..3 {
        let mut b = md5_login(&c);
        b.write_all(&[bind_exec.clone(), sync.clone()].concat()).expect("send");
        let msgs = read_until_ready(&mut b);
        assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "b ran: {:?}", rows(&msgs));
    }
    // a's own unnamed statement is still a's, in a later transaction
    a.write_all(&[bind_exec.clone(), sync.clone()].concat()).expect("send");
    assert_eq!(rows(&read_until_ready(&mut a)), ["left by a"]);
    // a re-parse of a's statement that the server skips (a failed Parse ahead of it in the
    // batch) does not leave b's in place for a's next batch
    let mut b = md5_login(&c);
    b.write_all(&[parse("SELECT 'left by b'"), bind_exec.clone(), sync.clone()].concat()).expect("send");
    assert_eq!(rows(&read_until_ready(&mut b)), ["left by b"]);
    drop(b);
    let named_bad = frame(b'P', b"f\0SELEC\0\0\0");
    a.write_all(&[named_bad, bind_exec.clone(), sync.clone(), bind_exec.clone(), sync.clone()].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut a)).as_deref(), Some("42601"));
    assert_eq!(rows(&read_until_ready(&mut a)), ["left by a"], "a's own statement, not b's");
    // a session pinned by a Parse it never ran has no unnamed statement of its own either
    let mut b = md5_login(&c);
    b.write_all(&[parse("SELECT 'left by b'"), bind_exec.clone(), sync.clone()].concat()).expect("send");
    assert_eq!(rows(&read_until_ready(&mut b)), ["left by b"]);
    drop(b);
    let mut d = md5_login(&c);
    let pin = frame(b'P', b"s\0LISTEN x\0\0\0");
    d.write_all(&[pin, bind_exec.clone(), sync.clone()].concat()).expect("send");
    let msgs = read_until_ready(&mut d);
    assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "pinned d ran: {:?}", rows(&msgs));
    // nor can it bind, describe or close the proxy's own statements
    for m in [frame(b'B', b"\0sg_0\0\0\0\0\0\0\0"), frame(b'D', b"Ssg_0\0")] {
        d.write_all(&[m, sync.clone()].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut d)).as_deref(), Some("26000"));
    }
}
