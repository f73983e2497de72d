//! An autocommit INSERT on one shard commits its `order_no` entry in
//! `db_default` first and its row after, without two-phase commit; the row's
//! transaction also inserts the INSERT's token into a fence table on the
//! shard. These tests stop that INSERT between its two commits (kill -9, a
//! pause, a lock on the shard) and send a second INSERT of the same value
//! meanwhile: the value must end with exactly one row, the one whose INSERT
//! was acknowledged, and the other INSERT must get one table's answer.
//!
//! One test function: the fault is given to the proxy through the
//! environment (`SHARDGATE_CRASH_AT` / `SHARDGATE_PAUSE_AT`), which this
//! process sets before each start.

use std::time::{Duration, Instant};

use shardgate_tests::{connect, sqlstate, Cluster, Options};

const MONTH_TIME: &str = "2026-11-05 10:00+00";

fn insert(no: &str, merchant: i64) -> String {
    format!("INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ('{no}', {merchant}, 1.00, 'NEW', '{MONTH_TIME}')")
}

/// Merchants of the rows with this order_no, read on the shards themselves.
async fn rows_of(c: &Cluster, no: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for dsn in &c.info.shards {
        let s = connect(dsn).await.expect("shard");
        for t in shardgate_tests::month_tables(&s).await {
            for r in s.query(&format!("SELECT merchant_id FROM {t} WHERE order_no = $1"), &[&no]).await.expect("rows") {
                out.push(r.get::<_, i64>(0));
            }
        }
    }
    out.sort_unstable();
    out
}

/// The entry of a value: (shard key, token).
async fn entry(def: &tokio_postgres::Client, no: &str) -> Option<(i64, Option<String>)> {
    def.query_opt("SELECT shard_key, token FROM shardgate_lookup_t_order_order_no WHERE value = $1", &[&no]).await.expect("entry").map(|r| (r.get(0), r.get(1)))
}

/// Waits (at most 5 s) until a statement naming `marker` waits for a lock on `shard`.
async fn waiting_for_lock(shard: &tokio_postgres::Client, marker: &str) {
    let t0 = Instant::now();
    loop {
        let waiting: i64 = shard
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'", &[&marker])
            .await
            .expect("activity")
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "the owner's INSERT never reached the shard");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start_faulty(c: &mut Cluster, var: &str, value: &str) {
    std::env::set_var(var, value);
    c.start_proxy().expect("start proxy with a fault hook");
    std::env::remove_var(var);
}

#[tokio::test]
async fn an_order_no_written_ahead_of_its_row_is_never_lost_or_doubled() {
    // db_0 in a cluster of its own (step 7 stops it)
    let mut c = Cluster::start_temp(Options { redis: false, all_clusters: true, ..Options::default() }).expect("start cluster");
    let def = connect(&c.info.default_dsn).await.expect("db_default");

    // the proxy makes the fence table on every shard at startup
    let t0 = Instant::now();
    for dsn in &c.info.shards {
        let s = connect(dsn).await.expect("shard");
        while s.query_one("SELECT to_regclass('shardgate_2pc_fence') IS NULL", &[]).await.expect("regclass").get::<_, bool>(0) {
            assert!(t0.elapsed() < Duration::from_secs(10), "no fence table on {dsn}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // the way is taken: the entry carries a token, the shard has its fence, nothing is prepared
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute(&insert("F-plain", 1)).await.expect("insert");
    let (key, token) = entry(&def, "F-plain").await.expect("entry");
    assert_eq!(key, 1);
    let token = token.expect("an entry written ahead of its row carries its INSERT's token");
    let shard1 = connect(&c.info.shards[1]).await.expect("db_1");
    let fenced: i64 = shard1.query_one("SELECT count(*) FROM shardgate_2pc_fence WHERE token = $1", &[&token]).await.expect("fence").get(0);
    assert_eq!(fenced, 1, "the row's transaction wrote its fence");
    let prepared: i64 = shard1.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.expect("prepared").get(0);
    assert_eq!(prepared, 0);
    // a client cannot reach the fence
    let e = client.batch_execute("SELECT * FROM t_order WHERE order_no IN (SELECT token FROM shardgate_2pc_fence)").await.expect_err("control table");
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");

    // 1. the proxy dies right after the entry committed: an orphan entry, no row
    c.kill_proxy().expect("stop proxy");
    start_faulty(&mut c, "SHARDGATE_CRASH_AT", "after_entries");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let e = client.batch_execute(&insert("F-crash", 1)).await.expect_err("the proxy dies between the entry and the row");
    assert!(e.is_closed() || e.as_db_error().is_none(), "a lost connection, not an answer: {e}");
    c.kill_proxy().expect("reap");
    c.start_proxy().expect("restart");
    assert!(entry(&def, "F-crash").await.is_some_and(|(k, t)| k == 1 && t.is_some()), "the orphan entry is there");
    assert!(rows_of(&c, "F-crash").await.is_empty());
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let n = client.query("SELECT * FROM t_order WHERE order_no = 'F-crash'", &[]).await.expect("read by the orphan entry").len();
    assert_eq!(n, 0);
    client.batch_execute(&insert("F-crash", 2)).await.expect("the value of an orphan entry is free");
    assert_eq!(rows_of(&c, "F-crash").await, vec![2]);
    assert_eq!(entry(&def, "F-crash").await, Some((2, None)), "taken over, committed with its row");
    let e = client.batch_execute(&insert("F-crash", 3)).await.expect_err("now taken");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    let got: Vec<i64> = client.query("SELECT merchant_id FROM t_order WHERE order_no = 'F-crash'", &[]).await.expect("read").iter().map(|r| r.get(0)).collect();
    assert_eq!(got, vec![2]);

    // 2. the owner pauses after its entry; a second INSERT of the value finds no row,
    // fences the owner's token and takes the value; the owner's row then cannot commit
    c.kill_proxy().expect("stop proxy");
    start_faulty(&mut c, "SHARDGATE_PAUSE_AT", "after_entries=3000");
    let owner = connect(&c.info.proxy_dsn).await.expect("connect");
    let t0 = Instant::now();
    let owner = tokio::spawn(async move { owner.batch_execute(&insert("F-race", 1)).await });
    while entry(&def, "F-race").await.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(2), "the owner's entry never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taker = connect(&c.info.proxy_dsn).await.expect("connect");
    taker.batch_execute(&insert("F-race", 2)).await.expect("the taker finds no row behind the entry and takes the value");
    assert!(t0.elapsed() < Duration::from_millis(2900), "the taker finished while the owner was paused ({:?})", t0.elapsed());
    let e = owner.await.expect("task").expect_err("the owner's row meets the taker's fence");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "the owner gets one table's answer: {e}");
    assert_eq!(rows_of(&c, "F-race").await, vec![2], "exactly the taker's row");
    assert_eq!(entry(&def, "F-race").await, Some((2, None)));

    // 3. the owner's row is on its way (its INSERT waits for a lock on the shard, the
    // fence row written and uncommitted): a second INSERT waits for it, then gets 23505
    c.kill_proxy().expect("stop proxy");
    c.start_proxy().expect("restart");
    let mut locker = connect(&c.info.shards[1]).await.expect("db_1");
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE t_order_202611 IN SHARE ROW EXCLUSIVE MODE").await.expect("lock");
    let owner = connect(&c.info.proxy_dsn).await.expect("connect");
    let owner = tokio::spawn(async move { owner.batch_execute(&insert("F-wait", 1)).await });
    waiting_for_lock(&shard1, "F-wait").await;
    let taker = connect(&c.info.proxy_dsn).await.expect("connect");
    let taker = tokio::spawn(async move { taker.batch_execute(&insert("F-wait", 2)).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!taker.is_finished(), "the taker waits for the owner's transaction, as a unique index would");
    lock.commit().await.expect("release the lock");
    owner.await.expect("task").expect("the owner commits");
    let e = taker.await.expect("task").expect_err("then the value is taken");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    assert_eq!(rows_of(&c, "F-wait").await, vec![1]);

    // 3b. the same with the taker in a REPEATABLE READ block that read the owner's shard
    // first: its snapshot cannot see the row it waited for, so it must not take the value
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE t_order_202611 IN SHARE ROW EXCLUSIVE MODE").await.expect("lock");
    let taker = connect(&c.info.proxy_dsn).await.expect("connect");
    taker.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.expect("begin");
    taker.query("SELECT count(*) FROM t_order WHERE merchant_id = 9", &[]).await.expect("a snapshot on db_1");
    let owner = connect(&c.info.proxy_dsn).await.expect("connect");
    let owner = tokio::spawn(async move { owner.batch_execute(&insert("F-rr", 1)).await });
    waiting_for_lock(&shard1, "F-rr").await;
    let taker = tokio::spawn(async move {
        let r = taker.batch_execute(&insert("F-rr", 2)).await;
        let _ = taker.batch_execute("ROLLBACK").await;
        r
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    lock.commit().await.expect("release the lock");
    owner.await.expect("task").expect("the owner commits");
    let e = taker.await.expect("task").expect_err("the taker's snapshot cannot see the owner's row, a unique index would");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    assert_eq!(rows_of(&c, "F-rr").await, vec![1], "exactly the owner's row");
    drop(locker);

    // 3c. a REPEATABLE READ block that deletes an order and inserts its order_no again
    // (elsewhere) takes the value, as on one table
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute(&insert("F-del", 1)).await.expect("insert");
    client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.expect("begin");
    let n = client.execute("DELETE FROM t_order WHERE merchant_id = 1 AND order_no = 'F-del'", &[]).await.expect("delete");
    assert_eq!(n, 1);
    client.batch_execute(&insert("F-del", 2)).await.expect("the block's own delete frees the value");
    client.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(rows_of(&c, "F-del").await, vec![2]);

    // 3d. the same snapshot question for an entry written with its row (in a block, no
    // token): a row committed after the taker's snapshot is seen as a unique index sees it
    let taker = connect(&c.info.proxy_dsn).await.expect("connect");
    taker.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.expect("begin");
    taker.query("SELECT count(*) FROM t_order WHERE merchant_id = 9", &[]).await.expect("a snapshot on db_1");
    let owner = connect(&c.info.proxy_dsn).await.expect("connect");
    owner.batch_execute("BEGIN").await.expect("begin");
    owner.batch_execute(&insert("F-rr2", 1)).await.expect("the owner's INSERT in a block");
    owner.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(entry(&def, "F-rr2").await, Some((1, None)));
    let e = taker.batch_execute(&insert("F-rr2", 2)).await.expect_err("taken by a row the snapshot does not show");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    taker.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(rows_of(&c, "F-rr2").await, vec![1]);

    // 4. a row the shard refuses leaves no entry: the value stays free
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let bad = format!("INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ('F-bad', 1, 100000000000000000000, 'NEW', '{MONTH_TIME}')");
    let e = client.batch_execute(&bad).await.expect_err("order_amount overflows numeric(18,2)");
    assert_eq!(sqlstate(&e).as_deref(), Some("22003"), "{e}");
    assert_eq!(entry(&def, "F-bad").await, None, "the failed row's entry was deleted");
    client.batch_execute(&insert("F-bad", 5)).await.expect("the value is free");
    assert_eq!(rows_of(&c, "F-bad").await, vec![5]);

    // 5. an id the month table already holds: one table's 23505 on the primary key, no entry left
    client.batch_execute(&format!("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (77, 'F-id-1', 9, '{MONTH_TIME}')")).await.expect("first");
    let e = client
        .batch_execute(&format!("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (77, 'F-id-2', 17, '{MONTH_TIME}')"))
        .await
        .expect_err("the same id on the same shard and month");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    assert_eq!(entry(&def, "F-id-2").await, None);
    assert!(rows_of(&c, "F-id-2").await.is_empty());

    // 6. sharding.fenced_inserts = false (a rolling upgrade): the entry commits with its
    // row under two-phase commit, no token
    let plain = c
        .start_extra_proxy_edited(|t| {
            if t.contains("[sharding]\n") {
                t.replacen("[sharding]\n", "[sharding]\nfenced_inserts = false\n", 1)
            } else {
                format!("{t}\n[sharding]\nfenced_inserts = false\n")
            }
        })
        .expect("a proxy without fenced inserts");
    let client = connect(&plain.dsn).await.expect("connect");
    client.batch_execute(&insert("F-2pc", 1)).await.expect("insert");
    assert_eq!(entry(&def, "F-2pc").await, Some((1, None)));
    assert_eq!(rows_of(&c, "F-2pc").await, vec![1]);
    let e = client.batch_execute(&insert("F-race", 4)).await.expect_err("taken");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    drop(plain);

    // 7. an orphan whose shard is down: its row may be there, so the value answers 57P03
    // until the shard is back, then is free
    c.kill_proxy().expect("stop proxy");
    start_faulty(&mut c, "SHARDGATE_CRASH_AT", "after_entries");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute(&insert("F-down", 8)).await.expect_err("the proxy dies between the entry and the row");
    c.kill_proxy().expect("reap");
    c.start_proxy().expect("restart");
    let db0 = c.info.cluster_of_shard(0).expect("db_0's cluster").clone();
    db0.stop_immediate().expect("stop db_0");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let e = client.batch_execute(&insert("F-down", 2)).await.expect_err("the orphan's shard cannot say whether its row is there");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    db0.start().expect("start db_0");
    let t0 = Instant::now();
    loop {
        match client.batch_execute(&insert("F-down", 2)).await {
            Ok(()) => break,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(30), "the value never became free: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rows_of(&c, "F-down").await, vec![2]);
}
