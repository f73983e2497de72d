//! `db_default` carries the two-phase decisions and the `order_no` lookup
//! entries. Writers run while it is stopped and started again, and while its
//! pool is too small for them; afterwards every order is whole: an
//! acknowledged statement's rows are all there exactly once with their
//! entries, and any other statement left all of its rows or none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardgate_tests::{connect, Cluster, Options};

/// Per statement: its two order_nos and whether the client was told it committed.
type Outcomes = Arc<Mutex<Vec<([String; 2], bool)>>>;

async fn write_for(dsn: String, w: usize, until: Instant, out: Outcomes, errors: Arc<Mutex<HashMap<String, usize>>>) {
    let mut client = connect(&dsn).await.ok();
    let mut i = 0;
    while Instant::now() < until {
        i += 1;
        let nos = [format!("D{w}-{i}-a"), format!("D{w}-{i}-b")];
        let (m1, m2) = ((w * 7 + i) % 64, (w * 7 + i + 3) % 64);
        let sql = format!(
            "INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ('{}', {m1}, 1.00, '2026-11-05 10:00+00'), ('{}', {m2}, 2.00, '2026-10-05 10:00+00')",
            nos[0], nos[1]
        );
        let Some(c) = client.as_ref() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client = connect(&dsn).await.ok();
            continue;
        };
        match c.batch_execute(&sql).await {
            Ok(()) => out.lock().expect("lock").push((nos, true)),
            Err(e) => {
                out.lock().expect("lock").push((nos, false));
                let key = e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| "closed".into());
                *errors.lock().expect("lock").entry(key).or_default() += 1;
                if e.is_closed() {
                    client = None;
                }
            }
        }
    }
}

/// Rows per order_no on the shards, and lookup entries per order_no.
async fn stored(c: &Cluster) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let mut rows = HashMap::new();
    for dsn in &c.info.shards {
        let s = connect(dsn).await.expect("shard");
        for t in shardgate_tests::month_tables(&s).await {
            for r in s.query(&format!("SELECT order_no FROM {t} WHERE order_no LIKE 'D%'"), &[]).await.expect("rows") {
                *rows.entry(r.get::<_, String>(0)).or_default() += 1;
            }
        }
    }
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let mut entries = HashMap::new();
    for r in def.query("SELECT value FROM shardgate_lookup_t_order_order_no WHERE value LIKE 'D%'", &[]).await.expect("entries") {
        *entries.entry(r.get::<_, String>(0)).or_default() += 1;
    }
    (rows, entries)
}

async fn settle(c: &Cluster) {
    let t0 = Instant::now();
    loop {
        let mut left = 0;
        for dsn in c.info.shards.iter().chain(std::iter::once(&c.info.default_dsn)) {
            if let Ok(s) = connect(dsn).await {
                left += s.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(1);
            } else {
                left += 1;
            }
        }
        if left == 0 {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "{left} prepared transactions never resolved");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn check(outcomes: &[([String; 2], bool)], rows: &HashMap<String, usize>, entries: &HashMap<String, usize>) -> (usize, usize) {
    let (mut acked, mut lost_statements) = (0, 0);
    for (nos, ok) in outcomes {
        let r: Vec<usize> = nos.iter().map(|n| rows.get(n).copied().unwrap_or(0)).collect();
        let e: Vec<usize> = nos.iter().map(|n| entries.get(n).copied().unwrap_or(0)).collect();
        assert!(r.iter().all(|x| *x <= 1), "{nos:?} stored {r:?} times");
        assert_eq!(r[0], r[1], "{nos:?}: one row of the statement committed without the other ({r:?})");
        assert_eq!(r, e, "{nos:?}: rows {r:?} but lookup entries {e:?}");
        if *ok {
            acked += 1;
            assert_eq!(r, vec![1, 1], "{nos:?} was acknowledged but is not stored");
        } else if r[0] == 0 {
            lost_statements += 1;
        }
    }
    (acked, lost_statements)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn db_default_stopped_during_commits_leaves_every_statement_whole() {
    let c = Cluster::start_temp(Options { redis: false, extra_toml: "[sharding]\nprepared_orphan_age_ms = 1000\n".into(), ..Options::default() }).expect("start cluster");
    let out: Outcomes = Arc::default();
    let errors = Arc::new(Mutex::new(HashMap::new()));
    // the writers' months exist before the run: a month created on demand while
    // db_default is down cannot ask whether other proxies run, and its first writes
    // wait until any would have listed it (what this test measures is the commits)
    let warm = connect(&c.info.proxy_dsn).await.expect("proxy");
    warm.batch_execute("INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ('W-1', 1, 1.00, '2026-11-05 10:00+00'), ('W-2', 2, 1.00, '2026-10-05 10:00+00')")
        .await
        .expect("warm-up insert");
    let until = Instant::now() + Duration::from_secs(9);
    let writers: Vec<_> = (0..6).map(|w| tokio::spawn(write_for(c.info.proxy_dsn.clone(), w, until, out.clone(), errors.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let main = c.info.clusters.iter().find(|k| k.databases.iter().any(|d| d == "db_default")).expect("db_default's cluster").clone();
    main.stop_immediate().expect("stop db_default");
    tokio::time::sleep(Duration::from_secs(2)).await;
    main.start().expect("start db_default");
    for w in writers {
        w.await.expect("writer");
    }
    settle(&c).await;
    let (rows, entries) = stored(&c).await;
    let outcomes = out.lock().expect("lock").clone();
    let (acked, failed) = check(&outcomes, &rows, &entries);
    eprintln!("{} statements, {acked} acknowledged, {failed} failed and left nothing; errors {:?}", outcomes.len(), errors.lock().expect("lock"));
    if !(acked > 50 && outcomes.len() > acked) {
        let log = c.proxy_log();
        let tail: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
        panic!("the run must see both outcomes; proxy log ({} lines, {:?}):\n{}", log.len(), c.info.root, tail[tail.len().saturating_sub(60)..].join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_db_default_pool_smaller_than_the_writers_keeps_every_decision() {
    let c = Cluster::start_temp(Options { redis: false, pool_toml: "size = 2\ncheckout_timeout_ms = 300\n".into(), ..Options::default() }).expect("start cluster");
    let out: Outcomes = Arc::default();
    let errors = Arc::new(Mutex::new(HashMap::new()));
    let until = Instant::now() + Duration::from_secs(6);
    let writers: Vec<_> = (0..12).map(|w| tokio::spawn(write_for(c.info.proxy_dsn.clone(), w, until, out.clone(), errors.clone()))).collect();
    for w in writers {
        w.await.expect("writer");
    }
    settle(&c).await;
    let (rows, entries) = stored(&c).await;
    let outcomes = out.lock().expect("lock").clone();
    let (acked, _) = check(&outcomes, &rows, &entries);
    let errors = errors.lock().expect("lock").clone();
    eprintln!("{} statements, {acked} acknowledged; errors {errors:?}", outcomes.len());
    assert!(acked > 50, "writers got through");
    // waiting for a connection is the only failure a small pool may cause
    assert!(errors.keys().all(|k| k == "53300"), "unexpected errors: {errors:?}");
}

/// A write that makes a new month table asks db_default whether other
/// proxies run; not knowing makes it wait out their listing interval (the
/// settle time, 6 s here). That question waits for a connection as long as
/// it says (2 s), not `pool.checkout_timeout_ms`: with a 300 ms checkout
/// timeout and the one internal db_default connection held by a client's
/// open block for 1 s, the write used to give up asking and wait 6 s though
/// no other proxy runs (the stall behind a CI failure of the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_month_made_while_db_default_is_busy_does_not_wait_for_proxies_that_do_not_exist() {
    let c = Cluster::start_temp(Options { redis: false, pool_toml: "size = 1\ncheckout_timeout_ms = 300\n".into(), ..Options::default() }).expect("start cluster");
    let a = connect(&c.info.proxy_dsn).await.expect("client a");
    let b = connect(&c.info.proxy_dsn).await.expect("client b");
    // a's block holds the internal db_default connection (its order_no entry) until COMMIT
    // (the proxy's startup work may hold the one connection for a moment)
    let mut tries = 0;
    loop {
        a.batch_execute("BEGIN").await.expect("a's BEGIN");
        match a.batch_execute("INSERT INTO t_order (order_no, merchant_id, order_amount) VALUES ('BUSY-1', 1, 1.00)").await {
            Ok(()) => break,
            Err(e) if tries < 30 => {
                eprintln!("a's INSERT, try {tries}: {e}");
                a.batch_execute("ROLLBACK").await.expect("a's ROLLBACK");
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("a's INSERT: {e}"),
        }
    }
    let holder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        a.batch_execute("COMMIT").await.expect("a commits");
    });
    // 2026-08 is no month the proxy made at startup (months from now on)
    b.batch_execute("INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ('NEW-MONTH-1', 2, 1.00, '2026-08-05 10:00+00')")
        .await
        .expect("b's insert into a new month");
    holder.await.expect("holder");
    let log = c.proxy_log();
    assert!(log.contains("creating month tables on demand"), "the INSERT made the month (log: {} lines)", log.lines().count());
    assert!(!log.contains("waiting for other proxies to see new month tables"), "the INSERT waited for other proxies though it could have asked:\n{log}");
    let n = b.query_one("SELECT count(*) FROM t_order WHERE order_no IN ('BUSY-1', 'NEW-MONTH-1')", &[]).await.expect("count").get::<_, i64>(0);
    assert_eq!(n, 2);
}
