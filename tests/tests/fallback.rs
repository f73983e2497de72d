//! Shard down: fallback to db_default and sync-back (README, "When a shard is down"), against
//! real PostgreSQL clusters stopped and started under the proxy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardgate_tests::{connect, http_get, month_tables, sqlstate, Cluster, Options, wait_for};
use tokio_postgres::SimpleQueryMessage;

const FAST: &str = "[health]\nprobe_interval_ms = 200\nprobe_timeout_ms = 2000\nfailure_threshold = 2\nrecovery_threshold = 2\n[fallback]\nsync_interval_ms = 300\n";

fn start(extra: &str) -> Cluster {
    Cluster::start_temp(Options { all_clusters: true, redis: false, proxy: true, server_toml: String::new(), pool_toml: String::new(), extra_toml: extra.into(), legacy: false, tls: false }).expect("start cluster")
}

fn health(c: &Cluster) -> (u16, serde_json::Value) {
    let (code, body) = http_get(&format!("{}/health", c.info.admin_url)).expect("health");
    (code, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

fn shard_state(c: &Cluster, n: usize) -> String {
    health(c).1["shards"][n]["state"].as_str().unwrap_or_default().to_string()
}

fn notices_and_rows(msgs: &[SimpleQueryMessage]) -> usize {
    msgs.iter().filter(|m| matches!(m, SimpleQueryMessage::Row(_))).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_shard_takes_orders_in_fallback_and_gets_them_back() {
    let c = start(FAST);
    let month = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC).strftime("%Y%m").to_string();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status) VALUES (1, 'on-shard', 8, 1.00, 'NEW')").await.expect("seed shard 0");
    c.info.cluster_of_shard(0).expect("shard 0 cluster").stop_immediate().expect("stop shard 0");
    // the first INSERT after the kill is redirected: the client sees no error
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status) VALUES (2, 'in-fallback', 16, 2.00, 'NEW')").await.expect("insert while down");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status) VALUES (3, 'other-shard', 1, 3.00, 'NEW')").await.expect("other shards unaffected");
    assert_eq!(shard_state(&c, 0), "down");
    let (code, body) = health(&c);
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["shards"][1]["state"], "up");
    // reads of the down shard: fallback rows, with a NOTICE (policy partial)
    let rows = client.simple_query("SELECT order_no FROM t_order WHERE merchant_id = 16").await.expect("read down shard");
    assert_eq!(notices_and_rows(&rows), 1);
    let out = std::process::Command::new(shardgate_tests::pg_bin().join("psql"))
        .arg(&c.info.proxy_dsn)
        .args(["-X", "-At", "-c", "SELECT order_no FROM t_order WHERE merchant_id = 16"])
        .output()
        .expect("psql");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "in-fallback");
    assert!(stderr.contains("NOTICE:  shard db_0 is unavailable"), "{stderr}");
    // an UPDATE of a fallback row works; of a row on the dead shard fails clearly
    assert_eq!(client.execute("UPDATE t_order SET pay_status = 'PAID' WHERE merchant_id = 16 AND id = 2", &[]).await.expect("update fallback row"), 1);
    let e = client.execute("UPDATE t_order SET pay_status = 'PAID' WHERE merchant_id = 8 AND id = 1", &[]).await.expect_err("row on the dead shard");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"));
    assert!(e.as_db_error().is_some_and(|d| d.message().contains("db_0")), "{e:?}");
    let e = client.execute("DELETE FROM t_order WHERE merchant_id = 8", &[]).await.expect_err("delete on the dead shard");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"));
    // back up: probes see it, sync-back moves the row home, reads are whole again
    c.info.cluster_of_shard(0).expect("cluster").start().expect("restart shard 0");
    wait_for("shard 0 up", Duration::from_secs(20), || shard_state(&c, 0) == "up").await;
    wait_for("sync-back", Duration::from_secs(20), || health(&c).1["shards"][0]["fallback_pending_rows"] == 0).await;
    let mut rows = Vec::new();
    for _ in 0..50 {
        match client.query("SELECT id, order_no, pay_status FROM t_order WHERE merchant_id IN (8, 16) ORDER BY id", &[]).await {
            Ok(r) => {
                rows = r;
                break;
            }
            Err(e) if sqlstate(&e).as_deref() == Some("57P03") => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
    let got: Vec<(i64, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(got, vec![(1, "on-shard".into(), "NEW".into()), (2, "in-fallback".into(), "PAID".into())]);
    let shard0 = connect(&c.info.shards[0]).await.expect("shard 0");
    let n: i64 = shard0.query_one(&format!("SELECT count(*) FROM t_order_{month} WHERE id = 2 AND pay_status = 'PAID'"), &[]).await.expect("direct").get(0);
    assert_eq!(n, 1, "the fallback row is in db_0.t_order_{month} with its update");
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let status: String = def.query_one("SELECT sync_status FROM t_order_fallback WHERE id = 2", &[]).await.expect("fallback row").get(0);
    assert_eq!(status, "SYNCED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_fail_and_both_shard_and_default_down() {
    let c = start(&format!("{FAST}policy = \"fail\"\n"));
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    c.info.cluster_of_shard(0).expect("cluster").stop_immediate().expect("stop shard 0");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id) VALUES (5, 'x', 8)").await.expect("insert goes to fallback");
    let e = client.query("SELECT * FROM t_order WHERE merchant_id = 8", &[]).await.expect_err("policy fail");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"));
    // shards 1..7 keep working
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id) VALUES (6, 'y', 9)").await.expect("shard 1");
    assert_eq!(client.query("SELECT * FROM t_order WHERE merchant_id = 9", &[]).await.expect("shard 1 read").len(), 1);
    // db_default down too: nothing is acknowledged that is not stored
    let main = c.info.clusters.iter().find(|p| p.databases.iter().any(|d| d == "db_default")).expect("main");
    main.stop_immediate().expect("stop db_default");
    let e = client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id) VALUES (7, 'z', 16)").await.expect_err("nowhere to store it");
    assert!(matches!(sqlstate(&e).as_deref(), Some("08006") | Some("57P03")), "{e:?}");
}

/// Every acknowledged order, by id.
type Acked = Arc<Mutex<HashMap<i64, (i64, String)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_shard_0_under_write_load_loses_and_doubles_nothing() {
    let c = start(FAST);
    let acked: Acked = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // successful shard-0 inserts, as ms since start
    let shard0_times: Arc<Mutex<Vec<u128>>> = Arc::default();
    let t0 = Instant::now();
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let (dsn, acked, errors, stop, times) = (c.info.proxy_dsn.clone(), acked.clone(), errors.clone(), stop.clone(), shard0_times.clone());
        writers.push(tokio::spawn(async move {
            let client = connect(&dsn).await.expect("connect");
            let ins = client.prepare("INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status) VALUES ($1, $2, 1.00, 'NEW') RETURNING id").await.expect("prepare");
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let merchant = 1 + (n * 37 + w * 11) % 800;
                let order_no = format!("w{w}-{n}");
                match client.query_one(&ins, &[&order_no, &merchant]).await {
                    Ok(row) => {
                        acked.lock().expect("lock").insert(row.get(0), (merchant, order_no));
                        if merchant % 8 == 0 {
                            times.lock().expect("lock").push(t0.elapsed().as_millis());
                        }
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("client error: {e} {:?}", e.as_db_error().map(|d| d.message().to_string()));
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let shard0 = c.info.cluster_of_shard(0).expect("cluster");
    let kill_ms = t0.elapsed().as_millis();
    shard0.stop_immediate().expect("kill shard 0");
    tokio::time::sleep(Duration::from_secs(10)).await;
    shard0.start().expect("restart shard 0");
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    // writes to shard 0 resumed quickly after the kill
    let times = shard0_times.lock().expect("lock").clone();
    let before = times.iter().filter(|t| **t <= kill_ms).max().copied().unwrap_or(0);
    let after = times.iter().filter(|t| **t > kill_ms).min().copied().expect("shard-0 writes after the kill");
    let gap = after - before;
    let errs = errors.load(Ordering::Relaxed);
    let acked = acked.lock().expect("lock").clone();
    println!("chaos: {} orders acknowledged, {errs} client errors, shard-0 write gap around the kill {gap} ms", acked.len());
    assert!(gap <= 2000, "writes to shard 0 resumed after {gap} ms");
    assert!(errs <= 8, "{errs} client errors: only statements already running on the killed shard may fail");
    // wait for sync-back to finish
    wait_for("shard 0 up and synced", Duration::from_secs(60), || {
        let (_, h) = health(&c);
        h["shards"][0]["state"] == "up" && h["shards"][0]["fallback_pending_rows"] == 0 && h["shards"][0]["fallback_failed_rows"] == 0
    })
    .await;
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let t_wait = Instant::now();
    loop {
        let left: i64 = def.query_one("SELECT count(*) FROM t_order_fallback WHERE sync_status <> 'SYNCED'", &[]).await.expect("fallback").get(0);
        if left == 0 {
            break;
        }
        assert!(t_wait.elapsed() < Duration::from_secs(60), "{left} fallback rows never synced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // every acknowledged order exactly once, in its own shard's month table
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for (n, dsn) in c.info.shards.iter().enumerate() {
        let shard = connect(dsn).await.expect("shard");
        for name in month_tables(&shard).await {
            for r in shard.query(&format!("SELECT id, merchant_id, order_no FROM {name}"), &[]).await.expect("rows") {
                let (id, merchant, order_no): (i64, i64, String) = (r.get(0), r.get(1), r.get(2));
                assert_eq!(merchant % 8, n as i64, "{order_no} on the wrong shard");
                *seen.entry(id).or_default() += 1;
                if let Some((m, o)) = acked.get(&id) {
                    assert_eq!((*m, o.as_str()), (merchant, order_no.as_str()), "values of {id}");
                }
            }
        }
    }
    for (id, (merchant, order_no)) in &acked {
        let n = seen.get(id).copied().unwrap_or(0);
        if n != 1 {
            let fb = def.query("SELECT target_table, sync_status, last_error FROM t_order_fallback WHERE id = $1", &[id]).await.expect("fallback lookup");
            let fb: Vec<(String, String, Option<String>)> = fb.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
            panic!("acknowledged order {id} ({order_no}, merchant {merchant}) exists {n} times on the shards; in the fallback table: {fb:?}");
        }
    }
    assert!(seen.values().all(|n| *n == 1), "no order is doubled");
    let synced: i64 = def.query_one("SELECT count(*) FROM t_order_fallback WHERE sync_status = 'SYNCED'", &[]).await.expect("fallback").get(0);
    assert!(synced > 0, "orders went through the fallback table");
    println!("chaos: {synced} orders went through the fallback table and back");
}

/// Shard 0 down, `n` orders for it written through the proxy (into the fallback table).
async fn orders_while_down(c: &Cluster, n: i64) -> Vec<i64> {
    c.info.cluster_of_shard(0).expect("cluster").stop_immediate().expect("stop shard 0");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let mut ids = Vec::new();
    for chunk in (1..=n).collect::<Vec<_>>().chunks(500) {
        let values: Vec<String> = chunk.iter().map(|i| format!("({i}, 'k{i}', {}, 1.00, 'v0')", 8 * (1 + i % 50))).collect();
        client.batch_execute(&format!("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status) VALUES {}", values.join(","))).await.expect("insert while down");
        ids.extend_from_slice(chunk);
    }
    ids
}

/// How many rows with each id the shard's month tables hold.
async fn shard0_counts(c: &Cluster) -> HashMap<i64, (usize, String)> {
    let shard = connect(&c.info.shards[0]).await.expect("shard 0");
    let mut seen: HashMap<i64, (usize, String)> = HashMap::new();
    for name in month_tables(&shard).await {
        for r in shard.query(&format!("SELECT id, pay_status FROM {name}"), &[]).await.expect("rows") {
            let e = seen.entry(r.get(0)).or_insert((0, String::new()));
            e.0 += 1;
            e.1 = r.get(1);
        }
    }
    seen
}

async fn wait_synced(c: &Cluster, timeout: Duration) {
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let t0 = Instant::now();
    loop {
        let left: i64 = def.query_one("SELECT count(*) FROM t_order_fallback WHERE sync_status <> 'SYNCED'", &[]).await.expect("fallback").get(0);
        if left == 0 {
            return;
        }
        assert!(t0.elapsed() < timeout, "{left} fallback rows never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_proxy_during_sync_back_loses_and_doubles_nothing() {
    let mut c = start(&FAST.replace("sync_interval_ms = 300", "sync_interval_ms = 100\nbatch_size = 200"));
    let ids = orders_while_down(&c, 6000).await;
    c.info.cluster_of_shard(0).expect("cluster").start().expect("restart shard 0");
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    // kill the proxy three times while sync-back is moving rows
    let mut kills = 0;
    let t0 = Instant::now();
    while kills < 3 && t0.elapsed() < Duration::from_secs(60) {
        let synced: i64 = def.query_one("SELECT count(*) FROM t_order_fallback WHERE sync_status = 'SYNCED'", &[]).await.expect("count").get(0);
        if synced > (kills as i64 + 1) * 1000 || (synced > 0 && kills == 0) {
            c.kill_proxy().expect("SIGKILL");
            kills += 1;
            c.start_proxy().expect("restart proxy");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(kills >= 1, "the proxy was killed during sync-back");
    wait_synced(&c, Duration::from_secs(60)).await;
    let seen = shard0_counts(&c).await;
    for id in &ids {
        assert_eq!(seen.get(id).map(|s| s.0), Some(1), "order {id} exactly once on db_0");
    }
    assert_eq!(seen.len(), ids.len());
    println!("sigkill: {kills} proxy kills during sync-back of {} rows; all exactly once", ids.len());
}

/// The race behind a flaky update storm: an UPDATE planned while its shard is
/// down runs on the fallback row, waits there for the row lock of a sync-back
/// batch, and when that batch commits, the row has moved home and no longer
/// matches. The shard is back by then, so the update must run again there —
/// not fail with "no order written for it while it is down matched". The test
/// holds the lock itself and moves the row as sync-back does, so the order of
/// events is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_waited_for_sync_back_to_move_its_row_runs_again_on_the_shard() {
    let c = start(FAST);
    c.info.cluster_of_shard(0).expect("cluster").stop_immediate().expect("stop shard 0");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status) VALUES (2, 'moved', 16, 2.00, 'NEW')").await.expect("insert while down");
    assert_eq!(shard_state(&c, 0), "down");
    // the "sync-back batch": the fallback row locked in a transaction on db_default
    let mut def = connect(&c.info.default_dsn).await.expect("db_default");
    let tx = def.transaction().await.expect("begin");
    let row = tx.query_one("SELECT target_table, row_to_json(f)::text FROM t_order_fallback f WHERE id = 2 FOR UPDATE", &[]).await.expect("lock the row");
    let (table, json): (String, String) = (row.get(0), row.get(1));
    // the update is planned while db_0 is down and waits for the lock
    let dsn = c.info.proxy_dsn.clone();
    let update = tokio::spawn(async move {
        let client = connect(&dsn).await.expect("connect");
        client.execute("UPDATE t_order SET pay_status = 'PAID' WHERE merchant_id = 16 AND id = 2", &[]).await
    });
    let watcher = connect(&c.info.default_dsn).await.expect("db_default");
    let t0 = Instant::now();
    loop {
        let waiting: i64 = watcher
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE%'", &[])
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(!update.is_finished() && t0.elapsed() < Duration::from_secs(10), "the update did not wait for the row lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // db_0 comes back; the batch moves the row home and marks it synced
    c.info.cluster_of_shard(0).expect("cluster").start().expect("restart shard 0");
    wait_for("db_0 no longer down", Duration::from_secs(20), || shard_state(&c, 0) != "down").await;
    let shard0 = connect(&c.info.shards[0]).await.expect("shard 0");
    shard0.execute(&format!("INSERT INTO {table} SELECT * FROM json_populate_record(NULL::{table}, $1::text::json)"), &[&json]).await.expect("move the row home");
    tx.execute("UPDATE t_order_fallback SET sync_status = 'SYNCED', synced_at = now() WHERE id = 2", &[]).await.expect("mark synced");
    tx.commit().await.expect("commit the batch");
    let n = update.await.expect("update task").expect("the update runs again on the shard");
    assert_eq!(n, 1);
    let status: String = shard0.query_one(&format!("SELECT pay_status FROM {table} WHERE id = 2"), &[]).await.expect("row on db_0").get(0);
    assert_eq!(status, "PAID");
    assert!(c.proxy_log().contains("the shard is back, so it runs again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_storm_during_sync_back_keeps_the_last_acknowledged_value() {
    let c = start(&FAST.replace("sync_interval_ms = 300", "sync_interval_ms = 100\nbatch_size = 100"));
    let ids = orders_while_down(&c, 2000).await;
    c.info.cluster_of_shard(0).expect("cluster").start().expect("restart shard 0");
    // 4 updaters, each owning a quarter of the rows, update them while sync-back runs
    let last: Arc<Mutex<HashMap<i64, String>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let (dsn, last, mine) = (c.info.proxy_dsn.clone(), last.clone(), ids.iter().copied().filter(|i| (*i as usize) % 4 == w).collect::<Vec<_>>());
        tasks.push(tokio::spawn(async move {
            let client = connect(&dsn).await.expect("connect");
            let upd = client.prepare("UPDATE t_order SET pay_status = $1 WHERE merchant_id = $2 AND id = $3").await.expect("prepare");
            let t0 = Instant::now();
            let mut round = 0;
            while t0.elapsed() < Duration::from_secs(6) {
                round += 1;
                for id in mine.iter().step_by(7) {
                    let v = format!("v{round}");
                    let merchant = 8 * (1 + id % 50);
                    match client.execute(&upd, &[&v, &merchant, id]).await {
                        Ok(1) => {
                            last.lock().expect("lock").insert(*id, v);
                        }
                        Ok(n) => panic!("update of {id} matched {n} rows"),
                        Err(e) => panic!("update of {id} failed: {e:?}"),
                    }
                }
            }
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await {
            failed.push(e);
        }
    }
    if !failed.is_empty() {
        let log = c.proxy_log();
        let states: Vec<&str> = log.lines().filter(|l| l.contains("state changed") || l.contains("sync") || l.contains("unavailable")).collect();
        panic!("updaters failed: {failed:?}\nproxy log (shard states, sync-back):\n{}", states.join("\n"));
    }
    let again = c.proxy_log().lines().filter(|l| l.contains("the shard is back, so it runs again")).count();
    println!("update storm: {again} update(s) planned while db_0 was down ran again after sync-back had moved their row");
    wait_synced(&c, Duration::from_secs(60)).await;
    let seen = shard0_counts(&c).await;
    let last = last.lock().expect("lock").clone();
    assert!(!last.is_empty());
    for id in &ids {
        let (n, status) = seen.get(id).cloned().unwrap_or_default();
        assert_eq!(n, 1, "order {id} exactly once");
        if let Some(v) = last.get(id) {
            assert_eq!(&status, v, "order {id} keeps its last acknowledged update");
        }
    }
    println!("update storm: {} rows updated while syncing, all final values as last acknowledged", last.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_returning_shard_includes_the_orders_of_its_outage() {
    // the sync-back worker is slow here: the read itself brings the rows home
    let c = start(&FAST.replace("sync_interval_ms = 300", "sync_interval_ms = 600000"));
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, pay_status) VALUES (1, 'before', 8, 'NEW')").await.expect("seed");
    c.info.cluster_of_shard(0).expect("cluster").stop_immediate().expect("stop shard 0");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, pay_status) VALUES (2, 'during', 8, 'NEW'), (3, 'during2', 16, 'NEW')").await.expect("insert while down");
    client.batch_execute("UPDATE t_order SET pay_status = 'PAID' WHERE merchant_id = 8 AND id = 2").await.expect("update while down");
    c.info.cluster_of_shard(0).expect("cluster").start().expect("restart shard 0");
    wait_for("shard 0 up", Duration::from_secs(20), || shard_state(&c, 0) == "up").await;
    let rows = client.query("SELECT id, pay_status FROM t_order WHERE merchant_id IN (8, 16) ORDER BY id", &[]).await.expect("read after the outage");
    let got: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    if got != vec![(1, "NEW".into()), (2, "PAID".into()), (3, "NEW".into())] {
        // failed once in CI (only row 1): what each side held, and what the proxy did
        let fb: Vec<String> = def
            .query("SELECT id::text || ' ' || pay_status || ' ' || sync_status || ' ' || target_db || ' ' || target_table FROM t_order_fallback ORDER BY id", &[])
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default();
        let shard = connect(&c.info.shards[0]).await.expect("db_0");
        let mut on_shard = Vec::new();
        for t in shardgate_tests::month_tables(&shard).await {
            for r in shard.query(&format!("SELECT id::text || ' ' || pay_status FROM {t} ORDER BY id"), &[]).await.expect("shard rows") {
                on_shard.push(format!("{t}: {}", r.get::<_, String>(0)));
            }
        }
        let (_, h) = health(&c);
        let log = c.proxy_log();
        let tail: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
        panic!(
            "read after the outage: {got:?}\nfallback rows: {fb:?}\nshard 0 rows: {on_shard:?}\nhealth: {h}\nproxy log:\n{}",
            tail[tail.len().saturating_sub(40)..].join("\n")
        );
    }
    let left: i64 = def.query_one("SELECT count(*) FROM t_order_fallback WHERE sync_status <> 'SYNCED'", &[]).await.expect("fallback").get(0);
    assert_eq!(left, 0, "the read moved the rows home");
}

/// An INSERT planned while its shard was down commits on the fallback table
/// after the shard came back: it is counted as an order of the outage all the
/// same, so a read after the return brings it home first. The count used to be
/// taken by the shard's state when the INSERT ended (no longer down: not
/// counted), and the read then answered from the shard alone, without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_of_the_outage_that_commits_after_the_return_is_read() {
    // the sync-back worker is slow here: only the read can bring the row home
    let c = start(&FAST.replace("sync_interval_ms = 300", "sync_interval_ms = 600000"));
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, pay_status) VALUES (1, 'before', 8, 'NEW')").await.expect("seed");
    c.info.cluster_of_shard(0).expect("cluster").stop_immediate().expect("stop shard 0");
    // hold the INSERT on the fallback table (its row lock conflicts with SHARE)
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    def.batch_execute("BEGIN; LOCK TABLE t_order_fallback IN SHARE MODE").await.expect("lock the fallback table");
    let writer = connect(&c.info.proxy_dsn).await.expect("writer");
    let insert = tokio::spawn(async move { writer.execute("INSERT INTO t_order (id, order_no, merchant_id, pay_status) VALUES (2, 'during', 8, 'NEW')", &[]).await });
    let probe = connect(&c.info.default_dsn).await.expect("db_default");
    let t0 = Instant::now();
    loop {
        let waiting: i64 = probe
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE '%INSERT%'", &[])
            .await
            .expect("activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(!insert.is_finished(), "the INSERT ended before it reached the fallback table: {:?}", insert.await);
        assert!(t0.elapsed() < Duration::from_secs(20), "the INSERT never waited on the fallback table");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shard_state(&c, 0), "down");
    // the shard returns while the INSERT waits
    c.info.cluster_of_shard(0).expect("cluster").start().expect("restart shard 0");
    wait_for("shard 0 up", Duration::from_secs(20), || shard_state(&c, 0) == "up").await;
    def.batch_execute("ROLLBACK").await.expect("release the fallback table");
    assert_eq!(insert.await.expect("insert task").expect("the INSERT is acknowledged"), 1);
    let rows = client.query("SELECT id FROM t_order WHERE merchant_id = 8 ORDER BY id", &[]).await.expect("read after the outage");
    let got: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, vec![1, 2], "the acknowledged order of the outage is in the answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_cannot_go_home_is_failed_with_its_error_and_the_rest_sync() {
    let c = start(FAST);
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id) VALUES (4, 'seed', 8)").await.expect("seed");
    // a row written on the shard behind the proxy's back (so order_no 'taken' has no lookup entry)
    let shard = connect(&c.info.shards[0]).await.expect("db_0");
    shard
        .batch_execute("DO $$ BEGIN EXECUTE format('INSERT INTO t_order_%s (id, order_no, merchant_id) VALUES (1, ''taken'', 8)', to_char(now() AT TIME ZONE 'UTC', 'YYYYMM')); END $$")
        .await
        .expect("row behind the proxy");
    drop(shard);
    c.info.cluster_of_shard(0).expect("cluster").stop_immediate().expect("stop shard 0");
    // same order_no as that row: the shard's unique index refuses it later
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id) VALUES (2, 'taken', 16), (3, 'fine', 24)").await.expect("insert while down");
    c.info.cluster_of_shard(0).expect("cluster").start().expect("restart shard 0");
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let t0 = Instant::now();
    loop {
        let rows = def.query("SELECT id, sync_status, sync_attempts, coalesce(last_error, '') FROM t_order_fallback ORDER BY id", &[]).await.expect("fallback");
        let got: Vec<(i64, String, i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
        if got.len() == 2 && got[0].1 == "FAILED" && got[1].1 == "SYNCED" {
            assert!(got[0].3.contains("23505"), "the error is kept: {got:?}");
            assert!(got[0].2 >= 1);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "sync-back did not isolate the bad row: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // the shard cannot be read whole while an order of its outage is stuck: a clear error, not a partial answer
    let e = client.query("SELECT * FROM t_order WHERE merchant_id = 16", &[]).await.expect_err("stuck row");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e:?}");
    let (_, h) = health(&c);
    assert_eq!(h["shards"][0]["fallback_failed_rows"], 1, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_two_down_shards_that_misses_one_changes_neither() {
    let c = start(FAST);
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    c.info.cluster_of_shard(0).expect("shard 0 cluster").stop_immediate().expect("stop shard 0");
    c.info.cluster_of_shard(1).expect("shard 1 cluster").stop_immediate().expect("stop shard 1");
    // merchant 16 (db_0) has a row in fallback; merchant 9 (db_1) has none there
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status) VALUES (2, 'in-fallback', 16, 2.00, 'NEW')").await.expect("insert while down");
    wait_for("both down", Duration::from_secs(10), || shard_state(&c, 0) == "down" && shard_state(&c, 1) == "down").await;
    // both shards' targets are fallback rows on one db_default connection: db_1's matched
    // nothing, so the rows may be on db_1 itself — the statement fails and changes nothing
    let e = client.batch_execute("UPDATE t_order SET order_amount = order_amount + 1 WHERE merchant_id IN (16, 9)").await.expect_err("db_1's rows are unknown");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e:?}");
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let amount: String = def.query_one("SELECT order_amount::text FROM t_order_fallback WHERE id = 2", &[]).await.expect("fallback row").get(0);
    assert_eq!(amount, "2.00", "a statement answered with an error left part of its work behind");
}

/// A sync-back batch whose marking in `db_default` fails (here a trigger
/// refuses it) must not give its connection back to the pool inside its
/// failed transaction block: with the pool handing out the most recently
/// returned connection first, the next INSERT's unique-lookup entries would
/// run in that block (25P02 for the client, or entries left uncommitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_back_that_fails_to_mark_its_rows_leaves_no_connection_in_its_transaction() {
    let c = Cluster::start_temp(Options { all_clusters: true, redis: false, pool_toml: "size = 2".into(), extra_toml: FAST.into(), ..Options::default() }).expect("start cluster");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // db_7, the last shard a sync-back round visits: its failed batch is the round's last
    // use of db_default until the next round (the next shard's batch would have rolled back
    // the block it found, hiding the leak)
    c.info.cluster_of_shard(7).expect("cluster").stop_immediate().expect("stop shard 7");
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id) VALUES (7001, 'fb-7001', 15)").await.expect("insert while down");
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    def.batch_execute(
        "CREATE FUNCTION refuse_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'marking refused'; END $$; \
         CREATE TRIGGER refuse_mark BEFORE UPDATE ON t_order_fallback FOR EACH ROW EXECUTE FUNCTION refuse_mark()",
    )
    .await
    .expect("trigger");
    c.info.cluster_of_shard(7).expect("cluster").start().expect("restart shard 7");
    // the batch reaches the shard (an upsert, kept), then its marking fails, every 300 ms
    let shard = loop {
        if let Ok(s) = connect(&c.info.shards[7]).await {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let t0 = Instant::now();
    loop {
        let mut n = 0i64;
        for name in month_tables(&shard).await {
            n += shard.query_one(&format!("SELECT count(*) FROM {name} WHERE id = 7001"), &[]).await.expect("count").get::<_, i64>(0);
        }
        if n == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "sync-back never reached the shard");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // INSERTs with order_no entries on another shard meanwhile: every one commits, once
    for i in 0..30 {
        client.batch_execute(&format!("INSERT INTO t_order (order_no, merchant_id) VALUES ('after-{i}', 8)")).await.unwrap_or_else(|e| panic!("INSERT {i}: {e:?}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n: i64 = def.query_one("SELECT count(*) FROM shardgate_lookup_t_order_order_no WHERE value LIKE 'after-%'", &[]).await.expect("entries").get(0);
    assert_eq!(n, 30, "every INSERT's entry committed");
    def.batch_execute("DROP TRIGGER refuse_mark ON t_order_fallback").await.expect("drop trigger");
    wait_synced(&c, Duration::from_secs(30)).await;
    let rows = client.query("SELECT order_no FROM t_order WHERE merchant_id = 8 ORDER BY order_no", &[]).await.expect("read");
    assert_eq!(rows.len(), 30);
}
