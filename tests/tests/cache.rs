//! The merchant-info cache (README, "Merchant info cache") against real PostgreSQL and Redis:
//! exact answers, invalidation across proxies, bloom filter, one load per
//! key, and Redis going away and coming back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardgate_tests::{connect, http_get, Cluster, Options, Raw, wait_for};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Short bloom reloads and long TTLs: anything fresh after a write is the invalidation's doing.
const CACHE: &str = "[cache]\nl1_ttl_ms = 600000\nl2_ttl_ms = 600000\nnegative_ttl_ms = 600000\nbloom_refresh_ms = 1000\n";
const MERCHANTS: i64 = 1000;

fn start() -> Cluster {
    Cluster::start_temp(Options { extra_toml: CACHE.into(), ..Options::default() }).expect("start cluster")
}

async fn seed(c: &Cluster) -> Client {
    let db = connect(&c.info.default_dsn).await.expect("db_default");
    db.batch_execute(&format!(
        "TRUNCATE t_merchant; INSERT INTO t_merchant (merchant_id, merchant_name, status, fee_rate, settle_account, updated_at)
         SELECT g, 'merchant ' || g, (g % 3)::smallint, 0.0060 + (g % 7) / 10000.0, CASE WHEN g % 5 = 0 THEN NULL ELSE 'ACC' || g END,
                '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 minute'
         FROM generate_series(1, {MERCHANTS}) g"
    ))
    .await
    .expect("seed merchants");
    db
}

/// Sum of a Prometheus metric's samples whose labels contain `labels`.
fn metric(admin_url: &str, name: &str, labels: &str) -> f64 {
    let (_, body) = http_get(&format!("{admin_url}/metrics")).expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Simple protocol: column names, text values and the row count of the tag.
async fn simple(c: &Client, sql: &str) -> (Vec<String>, Vec<Vec<Option<String>>>, u64) {
    let msgs = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    let mut tag = u64::MAX;
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(d) => cols = d.iter().map(|c| c.name().to_string()).collect(),
            SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
            SimpleQueryMessage::CommandComplete(n) => tag = n,
            _ => {}
        }
    }
    (cols, rows, tag)
}

/// Extended protocol (binary results): column names and types, raw values.
async fn extended(c: &Client, sql: &str, key: i64) -> (Vec<(String, Type)>, Vec<Vec<Raw>>) {
    let st = c.prepare(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let cols = st.columns().iter().map(|c| (c.name().to_string(), c.type_().clone())).collect();
    let rows = c.query(&st, &[&key]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    (cols, rows.iter().map(|r| (0..r.len()).map(|i| r.get::<_, Raw>(i)).collect()).collect())
}

fn subscribed(admin_url: &str) -> bool {
    let (_, body) = http_get(&format!("{admin_url}/health")).expect("health");
    serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["cache"]["redis_subscribed"].as_bool()) == Some(true)
}

async fn name_of(c: &Client, key: i64) -> Option<String> {
    let rows = c.query("SELECT merchant_name FROM t_merchant WHERE merchant_id = $1", &[&key]).await.expect("point read");
    rows.first().map(|r| r.get(0))
}

/// How long until `client` reads `want` as the name of `key` (polled every 2 ms);
/// fails the test once `limit` has passed.
async fn seen_within(client: &Client, key: i64, want: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while name_of(client, key).await.as_deref() != Some(want) {
        assert!(t0.elapsed() < limit, "the proxy still answers the old value of {key} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_reads_answer_like_the_database_and_follow_writes() {
    let c = start();
    let db = seed(&c).await;
    let proxy = connect(&c.info.proxy_dsn).await.expect("proxy");
    let admin = &c.info.admin_url;
    wait_for("bloom filter", Duration::from_secs(20), || metric(admin, "shardgate_cache_bloom_keys", "t_merchant") == MERCHANTS as f64).await;

    let simple_reads = [
        "SELECT * FROM t_merchant WHERE merchant_id = 5",
        "select merchant_name, fee_rate AS f, m.updated_at from t_merchant m where m.merchant_id = '7'",
        "SELECT settle_account FROM t_merchant WHERE merchant_id = 10",
        // absent: stopped by the bloom filter (or a negative entry), same empty answer
        "SELECT * FROM t_merchant WHERE merchant_id = 99999",
        "SELECT * FROM t_merchant WHERE merchant_id = -3",
    ];
    // cold (database), then warm (L1): both equal to PostgreSQL's own answer
    for round in 0..3 {
        for sql in simple_reads {
            assert_eq!(simple(&proxy, sql).await, simple(&db, sql).await, "round {round}: {sql}");
        }
        for key in [5i64, 6, 99999] {
            let sql = "SELECT * FROM t_merchant WHERE merchant_id = $1";
            assert_eq!(extended(&proxy, sql, key).await, extended(&db, sql, key).await, "round {round}: key {key}");
        }
    }
    // errors are PostgreSQL's: a bad key literal, an unknown column
    for sql in ["SELECT * FROM t_merchant WHERE merchant_id = 'x'", "SELECT nope FROM t_merchant WHERE merchant_id = 1"] {
        let (a, b) = (proxy.simple_query(sql).await.expect_err(sql), db.simple_query(sql).await.expect_err(sql));
        assert_eq!(a.code(), b.code(), "{sql}");
        assert_eq!(a.as_db_error().map(|e| e.message()), b.as_db_error().map(|e| e.message()), "{sql}");
    }
    let e = proxy.prepare("SELECT nope FROM t_merchant WHERE merchant_id = $1").await.expect_err("bad column");
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN));
    let l1 = metric(admin, "shardgate_cache_hits_total", "level=\"l1\"");
    let bloom = metric(admin, "shardgate_cache_hits_total", "level=\"bloom\"");
    assert!(l1 >= 10.0, "warm reads come from L1: {l1}");
    assert!(bloom >= 2.0, "absent keys stopped by the bloom filter: {bloom}");

    // served from the cache: a write that bypasses shardgate is not seen (until TTL) ...
    assert_eq!(name_of(&proxy, 5).await.as_deref(), Some("merchant 5"));
    db.batch_execute("UPDATE t_merchant SET merchant_name = 'changed behind the proxy' WHERE merchant_id = 5").await.expect("direct update");
    assert_eq!(name_of(&proxy, 5).await.as_deref(), Some("merchant 5"));
    // ... a write through shardgate is seen at once, by both protocols
    proxy.batch_execute("UPDATE t_merchant SET merchant_name = 'renamed' WHERE merchant_id = 5").await.expect("update through proxy");
    assert_eq!(name_of(&proxy, 5).await.as_deref(), Some("renamed"));
    assert_eq!(simple(&proxy, "SELECT merchant_name FROM t_merchant WHERE merchant_id = 5").await.1, vec![vec![Some("renamed".to_string())]]);
    // extended-protocol writes name their key in a parameter
    proxy.execute("UPDATE t_merchant SET merchant_name = $2 WHERE merchant_id = $1", &[&6i64, &"six"]).await.expect("extended update");
    assert_eq!(name_of(&proxy, 6).await.as_deref(), Some("six"));
    // a new key is found at once (bloom filter and negative entry both dropped)
    assert_eq!(name_of(&proxy, 99999).await, None);
    proxy.batch_execute("INSERT INTO t_merchant (merchant_id, merchant_name) VALUES (99999, 'new')").await.expect("insert");
    assert_eq!(name_of(&proxy, 99999).await.as_deref(), Some("new"));
    // keys the statement does not name: the whole table is dropped
    proxy.batch_execute("UPDATE t_merchant SET merchant_name = merchant_name || '!' WHERE status = 1").await.expect("update by status");
    assert_eq!(name_of(&proxy, 7).await, db.query_one("SELECT merchant_name FROM t_merchant WHERE merchant_id = 7", &[]).await.ok().map(|r| r.get(0)));
    assert_eq!(name_of(&proxy, 7).await.as_deref(), Some("merchant 7!"));
    proxy.batch_execute("INSERT INTO t_merchant (merchant_id, merchant_name) SELECT 100000 + g, 'bulk' FROM generate_series(1, 3) g").await.expect("bulk");
    assert_eq!(name_of(&proxy, 100002).await.as_deref(), Some("bulk"));

    // COPY into the table through shardgate: the whole table is dropped (and the reply is not held back)
    assert_eq!(name_of(&proxy, 200001).await, None);
    let mut child = std::process::Command::new(shardgate_tests::pg_bin().join("psql"))
        .arg(&c.info.proxy_dsn)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", "COPY t_merchant (merchant_id, merchant_name) FROM STDIN"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"200001\tcopied\n200002\tcopied too\n\\.\n").expect("copy data");
    }
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("psql exit");
    assert!(status.success(), "COPY through the proxy");
    assert_eq!(name_of(&proxy, 200001).await.as_deref(), Some("copied"));

    // inside a transaction that wrote the table, reads see its own writes; a rollback leaves the committed value
    proxy.batch_execute("BEGIN; UPDATE t_merchant SET merchant_name = 'uncommitted' WHERE merchant_id = 8").await.expect("begin");
    assert_eq!(name_of(&proxy, 8).await.as_deref(), Some("uncommitted"));
    assert_eq!(simple(&proxy, "SELECT merchant_name FROM t_merchant WHERE merchant_id = 8").await.1, vec![vec![Some("uncommitted".to_string())]]);
    proxy.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(name_of(&proxy, 8).await.as_deref(), Some("merchant 8"));
    // a transaction that commits: visible after COMMIT
    proxy.batch_execute("BEGIN; UPDATE t_merchant SET merchant_name = 'committed' WHERE merchant_id = 8; COMMIT").await.expect("tx");
    assert_eq!(name_of(&proxy, 8).await.as_deref(), Some("committed"));
    let bypass = metric(admin, "shardgate_cache_bypass_total", "transaction_wrote_table");
    assert!(bypass >= 2.0, "reads in the writing transaction bypassed the cache: {bypass}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_proxy_is_seen_by_another_within_100ms() {
    let c = start();
    let _db = seed(&c).await;
    let b = c.start_extra_proxy().expect("second proxy");
    let pa = connect(&c.info.proxy_dsn).await.expect("proxy A");
    let pb = connect(&b.dsn).await.expect("proxy B");
    let mut worst = Duration::ZERO;
    for i in 0..20i64 {
        let key = 100 + i;
        // cached in B (L1) first
        assert_eq!(name_of(&pb, key).await, Some(format!("merchant {key}")));
        assert_eq!(name_of(&pb, key).await, Some(format!("merchant {key}")));
        let want = format!("v{i}");
        pa.execute("UPDATE t_merchant SET merchant_name = $2 WHERE merchant_id = $1", &[&key, &want]).await.expect("update on A");
        worst = worst.max(seen_within(&pb, key, &want, Duration::from_secs(2)).await);
    }
    eprintln!("invalidation A → B: worst {worst:?} over 20 writes");
    assert!(worst < Duration::from_millis(100), "B saw a write through A only after {worst:?}");
    assert!(metric(&b.admin_url, "shardgate_cache_invalidations_total", "origin=\"remote\"") >= 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_database_read_and_no_read_is_stale() {
    let c = start();
    let _db = seed(&c).await;
    let admin = c.info.admin_url.clone();
    let before = metric(&admin, "shardgate_cache_hits_total", "level=\"db\"");
    let mut clients = Vec::new();
    for _ in 0..32 {
        clients.push(Arc::new(connect(&c.info.proxy_dsn).await.expect("proxy")));
    }
    let mut tasks = Vec::new();
    for cl in &clients {
        let cl = cl.clone();
        tasks.push(tokio::spawn(async move { name_of(&cl, 42).await }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").as_deref(), Some("merchant 42"));
    }
    let loads = metric(&admin, "shardgate_cache_hits_total", "level=\"db\"") - before;
    assert_eq!(loads, 1.0, "32 concurrent misses of one key made {loads} database reads");

    // readers hammer one key while a writer commits new versions through the proxy:
    // once a version's UPDATE has returned, no read started later answers an older one
    let committed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for cl in clients.iter().take(8) {
        let (cl, committed, stop, stale) = (cl.clone(), committed.clone(), stop.clone(), stale.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let floor = committed.load(Ordering::Acquire);
                let got: u64 = name_of(&cl, 43).await.and_then(|s| s.strip_prefix('v').and_then(|v| v.parse().ok())).unwrap_or(0);
                if got < floor {
                    if stale.load(Ordering::Relaxed) < 5 {
                        eprintln!("stale: floor {floor} got {got} now {}", committed.load(Ordering::Acquire));
                    }
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            n
        }));
    }
    let writer = connect(&c.info.proxy_dsn).await.expect("writer");
    for v in 1..=200u64 {
        writer.execute("UPDATE t_merchant SET merchant_name = $2 WHERE merchant_id = $1", &[&43i64, &format!("v{v}")]).await.expect("write");
        committed.store(v, Ordering::Release);
    }
    stop.store(true, Ordering::Release);
    let mut reads = 0;
    for r in readers {
        reads += r.await.expect("reader");
    }
    eprintln!("{reads} reads during 200 writes; redis errors {}", metric(&admin, "shardgate_cache_redis_errors_total", ""));
    assert!(reads > 200, "readers ran: {reads}");
    assert_eq!(stale.load(Ordering::Relaxed), 0, "stale reads after a committed write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_costs_no_client_errors() {
    let mut c = start();
    let _db = seed(&c).await;
    let admin = c.info.admin_url.clone();
    let b = c.start_extra_proxy().expect("second proxy");
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4i64 {
        let dsn = if w % 2 == 0 { c.info.proxy_dsn.clone() } else { b.dsn.clone() };
        let (stop, errors, reads) = (stop.clone(), errors.clone(), reads.clone());
        workers.push(tokio::spawn(async move {
            let cl = connect(&dsn).await.expect("proxy");
            let mut i = 0i64;
            while !stop.load(Ordering::Acquire) {
                i += 1;
                let key = 1 + (i * 7 + w) % 200;
                let r = if i % 10 == 0 {
                    cl.execute("UPDATE t_merchant SET status = $2 WHERE merchant_id = $1", &[&key, &((i % 3) as i16)]).await.map(|_| ())
                } else {
                    cl.query("SELECT * FROM t_merchant WHERE merchant_id = $1", &[&key]).await.map(|_| ())
                };
                match r {
                    Ok(()) => {
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("client error: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(subscribed(&admin) && subscribed(&b.admin_url), "both proxies listen for invalidations");
    c.kill_redis();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = reads.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(reads.load(Ordering::Relaxed) > during, "clients kept being answered while Redis was down");
    c.restart_redis().expect("restart redis");
    // both proxies reconnect by themselves and use Redis again
    let l2 = |url: &str| metric(url, "shardgate_cache_hits_total", "level=\"l2\"");
    let after_kill = l2(&admin) + l2(&b.admin_url);
    wait_for("L2 hits after the restart", Duration::from_secs(20), || l2(&admin) + l2(&b.admin_url) > after_kill).await;
    wait_for("both proxies resubscribed", Duration::from_secs(20), || subscribed(&admin) && subscribed(&b.admin_url)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    for w in workers {
        w.await.expect("worker");
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "client errors while Redis was killed and restarted");
    let noticed = metric(&admin, "shardgate_cache_redis_errors_total", "") + metric(&b.admin_url, "shardgate_cache_redis_errors_total", "");
    assert!(noticed > 0.0, "the proxies noticed Redis was gone");

    // after the restart: a write through A is seen by B (pub/sub resubscribed) and answers are current
    let pa = connect(&c.info.proxy_dsn).await.expect("A");
    let pb = connect(&b.dsn).await.expect("B");
    assert_eq!(name_of(&pb, 500).await.as_deref(), Some("merchant 500"));
    let t0 = Instant::now();
    pa.execute("UPDATE t_merchant SET merchant_name = 'after restart' WHERE merchant_id = $1", &[&500i64]).await.expect("update");
    while name_of(&pb, 500).await.as_deref() != Some("after restart") {
        if t0.elapsed() > Duration::from_secs(5) {
            eprintln!("--- A\n{}\n--- B\n{}", c.proxy_log(), std::fs::read_to_string(&b.log).unwrap_or_default());
            eprintln!("A health {:?}\nB health {:?}", http_get(&format!("{admin}/health")), http_get(&format!("{}/health", b.admin_url)));
            panic!("B did not see the write after Redis came back");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `signal` to this system's Redis (STOP freezes it: calls time out, nothing is refused).
fn signal_redis(c: &Cluster, signal: &str) {
    let pid = c.info.redis_pid.expect("redis pid");
    let ok = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_that_timed_out_reaches_the_other_proxy_once_redis_answers() {
    let c = start();
    let _db = seed(&c).await;
    let b = c.start_extra_proxy().expect("second proxy");
    wait_for("both proxies subscribed", Duration::from_secs(20), || subscribed(&c.info.admin_url) && subscribed(&b.admin_url)).await;
    let pa = connect(&c.info.proxy_dsn).await.expect("proxy A");
    let pb = connect(&b.dsn).await.expect("proxy B");
    let mut worst = Duration::ZERO;
    for round in 0..3i64 {
        let key = 300 + round;
        assert_eq!(name_of(&pb, key).await, Some(format!("merchant {key}")));
        assert_eq!(name_of(&pb, key).await, Some(format!("merchant {key}")));
        let want = format!("frozen {round}");
        // Redis frozen: A's invalidation times out (redis_timeout_ms = 100) and
        // Redis counts as down for a second; the write itself is acknowledged
        signal_redis(&c, "-STOP");
        let r = pa.execute("UPDATE t_merchant SET merchant_name = $2 WHERE merchant_id = $1", &[&key, &want]).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        signal_redis(&c, "-CONT");
        r.expect("update on A while Redis is frozen");
        worst = worst.max(seen_within(&pb, key, &want, Duration::from_secs(5)).await);
    }
    eprintln!("invalidation A → B after Redis answers again: worst {worst:?} over 3 writes");
    // delivery is retried within tens of milliseconds; waiting out the second
    // Redis is skipped for (as reads do) would take 850 ms or more here
    assert!(worst < Duration::from_millis(600), "B saw the write only {worst:?} after Redis answered again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_its_subscription_answers_from_the_database() {
    // bloom filters are not reloaded on a timer here: only what the proxy hears keeps them current
    let toml = "[cache]\nl1_ttl_ms = 600000\nl2_ttl_ms = 600000\nnegative_ttl_ms = 600000\nbloom_refresh_ms = 600000\n";
    let mut c = Cluster::start_temp(Options { extra_toml: toml.into(), ..Options::default() }).expect("start cluster");
    let _db = seed(&c).await;
    let b = c.start_extra_proxy().expect("second proxy");
    wait_for("both proxies subscribed", Duration::from_secs(20), || subscribed(&c.info.admin_url) && subscribed(&b.admin_url)).await;
    wait_for("B's bloom filter", Duration::from_secs(20), || metric(&b.admin_url, "shardgate_cache_bloom_keys", "t_merchant") == MERCHANTS as f64).await;
    let pa = connect(&c.info.proxy_dsn).await.expect("proxy A");
    let pb = connect(&b.dsn).await.expect("proxy B");
    // in B's L1, and (absent) in its bloom filter
    for _ in 0..2 {
        assert_eq!(name_of(&pb, 700).await.as_deref(), Some("merchant 700"));
        assert_eq!(name_of(&pb, 5001).await, None);
        assert_eq!(name_of(&pb, 5002).await, None);
    }
    c.kill_redis();
    wait_for("B noticed it lost its subscription", Duration::from_secs(20), || !subscribed(&b.admin_url)).await;
    // read again meanwhile (noticing the loss dropped what B held)
    for _ in 0..2 {
        assert_eq!(name_of(&pb, 700).await.as_deref(), Some("merchant 700"));
    }
    // writes through A cannot reach B now
    pa.execute("UPDATE t_merchant SET merchant_name = 'during the outage' WHERE merchant_id = $1", &[&700i64]).await.expect("update on A");
    let insert = "INSERT INTO t_merchant (merchant_id, merchant_name, status, fee_rate, settle_account, updated_at) VALUES ($1, $2, 1, 0.0060, 'ACC', now())";
    pa.execute(insert, &[&5001i64, &"added during the outage"]).await.expect("insert on A");
    assert_eq!(name_of(&pb, 700).await.as_deref(), Some("during the outage"), "B answered from its L1 without its subscription");
    assert_eq!(name_of(&pb, 5001).await.as_deref(), Some("added during the outage"), "B answered from its bloom filter without its subscription");
    // Redis back: B resubscribes; what it missed meanwhile is not answered from what it held
    c.restart_redis().expect("restart redis");
    wait_for("both proxies resubscribed", Duration::from_secs(20), || subscribed(&c.info.admin_url) && subscribed(&b.admin_url)).await;
    pa.execute(insert, &[&5002i64, &"added after the outage"]).await.expect("insert on A after");
    assert_eq!(name_of(&pb, 5001).await.as_deref(), Some("added during the outage"), "B's bloom filter from before the outage answered");
    assert_eq!(name_of(&pb, 5002).await.as_deref(), Some("added after the outage"));
    assert_eq!(name_of(&pb, 700).await.as_deref(), Some("during the outage"));
    assert!(metric(&b.admin_url, "shardgate_cache_bypass_total", "not_subscribed") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_its_subscription_does_not_read_redis_under_a_generation_it_missed() {
    let c = start();
    let _db = seed(&c).await;
    // B's Redis user may read and write keys but not subscribe: B never hears another proxy
    let url = c.info.redis_url.clone().expect("redis url");
    let port = url.rsplit(':').next().expect("port").to_string();
    let acl = std::process::Command::new("redis-cli")
        .args(["-p", &port, "ACL", "SETUSER", "nosub", "on", ">nosub-secret", "~*", "resetchannels", "+@all"])
        .output()
        .expect("redis-cli");
    assert!(String::from_utf8_lossy(&acl.stdout).contains("OK"), "ACL SETUSER: {acl:?}");
    let b = c.start_extra_proxy_edited(|t| t.replacen(&url, &url.replacen("://", "://nosub:nosub-secret@", 1), 1)).expect("second proxy");
    let pa = connect(&c.info.proxy_dsn).await.expect("proxy A");
    let pb = connect(&b.dsn).await.expect("proxy B");
    wait_for("A subscribed", Duration::from_secs(20), || subscribed(&c.info.admin_url)).await;
    // (the merchants were seeded straight into the database: A's filter must have them)
    wait_for("A's bloom filter", Duration::from_secs(20), || metric(&c.info.admin_url, "shardgate_cache_bloom_keys", "t_merchant") == MERCHANTS as f64).await;
    // in Redis under the table's current generation (A's read stores it)
    for _ in 0..2 {
        assert_eq!(name_of(&pa, 900).await.as_deref(), Some("merchant 900"));
    }
    assert!(metric(&c.info.admin_url, "shardgate_cache_hits_total", "level=\"l1\"") >= 1.0);
    // a write whose keys cannot be read from it moves the table to a new generation;
    // the old one's entries stay in Redis (under a generation only A and Redis know is old)
    pa.execute("UPDATE t_merchant SET merchant_name = 'renamed' WHERE merchant_name = 'merchant 900'", &[]).await.expect("table-wide update on A");
    assert!(!subscribed(&b.admin_url), "B cannot subscribe");
    for _ in 0..2 {
        assert_eq!(name_of(&pb, 900).await.as_deref(), Some("renamed"), "B answered from Redis under a generation it never heard was old");
    }
    assert_eq!(metric(&b.admin_url, "shardgate_cache_hits_total", "level=\"l2\""), 0.0);
}

fn redis_cli(c: &Cluster, args: &[&str]) -> String {
    let url = c.info.redis_url.clone().expect("redis url");
    let port = url.rsplit(':').next().expect("port").to_string();
    let out = std::process::Command::new("redis-cli").args(["-p", &port]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_subscribes_again_after_its_redis_login_was_refused_for_a_while() {
    let c = start();
    let _db = seed(&c).await;
    assert!(redis_cli(&c, &["ACL", "SETUSER", "flaky", "on", ">flaky-secret", "~*", "allchannels", "+@all"]).contains("OK"));
    let url = c.info.redis_url.clone().expect("redis url");
    let b = c.start_extra_proxy_edited(|t| t.replacen(&url, &url.replacen("://", "://flaky:flaky-secret@", 1), 1)).expect("second proxy");
    wait_for("B subscribed", Duration::from_secs(20), || subscribed(&b.admin_url)).await;
    // B's logins are refused (a server error, not an I/O error) until the user is enabled again
    assert!(redis_cli(&c, &["ACL", "SETUSER", "flaky", "off"]).contains("OK"));
    redis_cli(&c, &["CLIENT", "KILL", "USER", "flaky"]);
    wait_for("B noticed it lost its subscription", Duration::from_secs(20), || !subscribed(&b.admin_url)).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(redis_cli(&c, &["ACL", "SETUSER", "flaky", "on"]).contains("OK"));
    wait_for("B subscribed again", Duration::from_secs(30), || subscribed(&b.admin_url)).await;
    // and uses its cache again: a write through A reaches it
    let pa = connect(&c.info.proxy_dsn).await.expect("proxy A");
    let pb = connect(&b.dsn).await.expect("proxy B");
    for _ in 0..2 {
        assert_eq!(name_of(&pb, 950).await.as_deref(), Some("merchant 950"));
    }
    pa.execute("UPDATE t_merchant SET merchant_name = 'after the refusals' WHERE merchant_id = $1", &[&950i64]).await.expect("update on A");
    seen_within(&pb, 950, "after the refusals", Duration::from_secs(5)).await;
    assert!(metric(&b.admin_url, "shardgate_cache_hits_total", "level=\"l1\"") >= 1.0, "B answers from its L1 again");
}

/// Another client sees a committed write of the table as soon as the COMMIT
/// is answered, even when the writer then stays silent or goes on in a
/// chained block: a COMMIT the proxy makes itself (the block also wrote
/// several shards), and `COMMIT AND CHAIN` in both protocols, where the
/// writer's connection never reports the idle status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_seen_by_other_clients_before_the_writer_speaks_again() {
    let c = start();
    let _db = seed(&c).await;
    let admin = &c.info.admin_url;
    wait_for("bloom filter", Duration::from_secs(20), || metric(admin, "shardgate_cache_bloom_keys", "t_merchant") == MERCHANTS as f64).await;
    let writer = connect(&c.info.proxy_dsn).await.expect("writer");
    let reader = connect(&c.info.proxy_dsn).await.expect("reader");
    let orders = |no: &str| [1, 2].map(|m| format!("INSERT INTO t_order (order_no, merchant_id, order_amount) VALUES ('{no}{m}', {m}, 1.00)")).to_vec();
    for (key, block, end, extended) in [
        (9i64, orders("CC1"), "COMMIT", false),
        (10, Vec::new(), "COMMIT AND CHAIN", false),
        (11, orders("CC3"), "COMMIT AND CHAIN", false),
        (12, Vec::new(), "COMMIT AND CHAIN", true),
    ] {
        // the reader's proxy has the old value cached
        assert_eq!(name_of(&reader, key).await, Some(format!("merchant {key}")));
        assert_eq!(name_of(&reader, key).await, Some(format!("merchant {key}")));
        let name = format!("renamed {key}");
        writer.batch_execute("BEGIN").await.expect("begin");
        if extended {
            writer.execute("UPDATE t_merchant SET merchant_name = $1 WHERE merchant_id = $2", &[&name, &key]).await.expect("update");
            writer.execute(end, &[]).await.expect("end");
        } else {
            writer.batch_execute(&format!("UPDATE t_merchant SET merchant_name = '{name}' WHERE merchant_id = {key}")).await.expect("update");
            for sql in &block {
                writer.batch_execute(sql).await.expect("order");
            }
            writer.batch_execute(end).await.expect("end");
        }
        assert_eq!(name_of(&reader, key).await, Some(name), "key {key}: {end} (extended: {extended}) was answered, the write is committed");
        writer.batch_execute("ROLLBACK").await.expect("end the chain");
    }
}

/// PREPARE TRANSACTION of a block that wrote the cached table is refused
/// (0A000), in both protocols: its COMMIT PREPARED, from any session, could
/// not drop the cached row, and readers would see the old one until its TTL.
/// Before, it was prepared, the key was dropped at once (the status was idle),
/// a reader cached the old row again, and COMMIT PREPARED left it stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_transaction_after_a_cached_write_is_refused() {
    let c = start();
    let _db = seed(&c).await;
    let writer = connect(&c.info.proxy_dsn).await.expect("writer");
    for (key, extended) in [(21i64, false), (22, true)] {
        writer.batch_execute("BEGIN").await.expect("begin");
        let name = format!("prepared {key}");
        if extended {
            writer.execute("UPDATE t_merchant SET merchant_name = $1 WHERE merchant_id = $2", &[&name, &key]).await.expect("update");
        } else {
            writer.batch_execute(&format!("UPDATE t_merchant SET merchant_name = '{name}' WHERE merchant_id = {key}")).await.expect("update");
        }
        let sql = format!("PREPARE TRANSACTION 'sg_cache_{key}'");
        let e = if extended { writer.execute(sql.as_str(), &[]).await.map(|_| ()) } else { writer.batch_execute(&sql).await };
        let e = e.expect_err("refused");
        assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED), "extended: {extended}: {e:?}");
        writer.batch_execute("ROLLBACK").await.expect("rollback");
        assert_eq!(name_of(&writer, key).await, Some(format!("merchant {key}")), "nothing was prepared or committed");
    }
    // a block that wrote no cached table prepares as before
    writer.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    writer.batch_execute("PREPARE TRANSACTION 'sg_cache_none'").await.expect("prepare without cached writes");
    writer.batch_execute("ROLLBACK PREPARED 'sg_cache_none'").await.expect("rollback prepared");
}
