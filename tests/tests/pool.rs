//! The server pools, against a real PostgreSQL: a connection is handed to the
//! next user only idle, with every answer read. One given back inside a
//! transaction block (open or failed) or with an answer still unread is
//! closed at once, so the server rolls it back and frees its locks now, and
//! nobody inherits it; an idle one is kept and reused.

use std::time::Duration;

use shardgate::backend::pool::{self, Pool};
use shardgate::backend::query as wire;
use shardgate_config::{Dsn, PoolConfig};
use shardgate_tests::{connect, PgCluster};

struct Server {
    pg: PgCluster,
    _root: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.pg.stop_immediate();
    }
}

fn server() -> Server {
    let root = tempfile::Builder::new().prefix("shardgate-test-").tempdir().expect("temp dir");
    let pg = PgCluster::create(root.path(), "pool", &["p"]).expect("cluster");
    Server { pg, _root: root }
}

fn pool_of(s: &Server) -> Pool {
    let dsn = Dsn::parse(&s.pg.dsn("p")).expect("dsn");
    pool::build(dsn, &PoolConfig { size: 2, ..PoolConfig::default() })
}

/// Server processes of the pool's database other than `observer`'s.
async fn backends(observer: &tokio_postgres::Client) -> i64 {
    observer.query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = 'p' AND pid <> pg_backend_pid()", &[]).await.expect("count").get(0)
}

async fn backend_pid(p: &Pool) -> String {
    let mut c = p.get().await.expect("checkout");
    let rows = wire::control(&mut c, "SELECT pg_backend_pid()").await.expect("io").expect("sql");
    assert_eq!(c.ready_status, b'I');
    rows[0].clone().expect("a pid")
}

/// Whether the server ends the backend with this pid within 5 s (a closed
/// connection's backend ends at once; a pooled one never does).
async fn ends(observer: &tokio_postgres::Client, pid: &str) -> bool {
    for _ in 0..50 {
        let n: i64 = observer.query_one(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"), &[]).await.expect("count").get(0);
        if n == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_given_back_in_a_block_or_out_of_step_is_closed_at_once_and_an_idle_one_is_kept() {
    let s = server();
    let p = pool_of(&s);
    let observer = connect(&s.pg.dsn("p")).await.expect("observer");
    observer.batch_execute("CREATE TABLE t (k int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0)").await.expect("table");

    // idle: kept and handed out again (the guard does not close healthy connections)
    let first = backend_pid(&p).await;
    assert_eq!(backend_pid(&p).await, first, "an idle connection is reused");

    // inside an open block holding a row lock
    let pid = {
        let mut c = p.get().await.expect("checkout");
        let rows = wire::control(&mut c, "BEGIN; UPDATE t SET v = v + 1 WHERE k = 1; SELECT pg_backend_pid()").await.expect("io").expect("sql");
        assert_eq!(c.ready_status, b'T');
        rows[0].clone().expect("pid")
    };
    assert!(ends(&observer, &pid).await, "the connection given back inside a block was closed, its backend gone");
    // the lock is free: this update does not wait
    observer.batch_execute("SET lock_timeout = '1s'; UPDATE t SET v = v + 10 WHERE k = 1").await.expect("the row lock was freed");
    let v: i32 = observer.query_one("SELECT v FROM t WHERE k = 1", &[]).await.expect("v").get(0);
    assert_eq!(v, 10, "the abandoned block's update was rolled back");
    let next = backend_pid(&p).await;
    assert_ne!(next, pid, "nobody inherits the block");

    // inside a failed block
    let pid = {
        let mut c = p.get().await.expect("checkout");
        let pid = wire::control(&mut c, "SELECT pg_backend_pid()").await.expect("io").expect("sql")[0].clone().expect("pid");
        let failed = wire::control(&mut c, "BEGIN; SELECT 1/0").await.expect("io");
        assert!(failed.is_err());
        assert_eq!(c.ready_status, b'E');
        pid
    };
    assert!(ends(&observer, &pid).await, "the connection given back in a failed block was closed");
    assert_ne!(backend_pid(&p).await, pid, "a failed block is not handed on");

    // an answer nobody read: the next user must not read it as its own
    let pid = {
        let mut c = p.get().await.expect("checkout");
        let pid = wire::control(&mut c, "SELECT pg_backend_pid()").await.expect("io").expect("sql")[0].clone().expect("pid");
        // (its answer comes after the next checkout, so no liveness probe can see it there)
        c.send(&shardgate::protocol::frontend::query("SELECT 'stale' FROM pg_sleep(0.5)")).await.expect("send");
        pid
    };
    let mut c = p.get().await.expect("checkout");
    let rows = wire::control(&mut c, "SELECT 'mine'").await.expect("io").expect("sql");
    assert_eq!(rows, vec![Some("mine".to_string())], "the next user reads its own answer");
    let now = wire::control(&mut c, "SELECT pg_backend_pid()").await.expect("io").expect("sql")[0].clone().expect("pid");
    assert_ne!(now, pid);
    drop(c);
    assert!(ends(&observer, &pid).await, "the connection with an answer unread was closed");
    // and a healthy connection still comes back
    let a = backend_pid(&p).await;
    assert_eq!(backend_pid(&p).await, a);
}

/// Sum of a Prometheus metric's samples.
fn metric(admin_url: &str, name: &str) -> f64 {
    let (_, body) = shardgate_tests::http_get(&format!("{admin_url}/metrics")).expect("metrics");
    body.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// One round of what applications do through the proxy: pass-through
/// statements (simple and extended, an error among them), routed ones on one
/// shard and on all (simple and prepared, with their errors), a block on one
/// shard, a block on two (two-phase commit), a failed block, a rollback.
async fn round(c: &tokio_postgres::Client, r: i64) {
    let m = 1000 + r;
    c.simple_query("SELECT 1").await.expect("pass-through");
    c.query_one("SELECT $1::int", &[&1i32]).await.expect("pass-through extended");
    assert!(c.simple_query("SELECT 1/0").await.is_err());
    c.simple_query(&format!("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('p{r}', {m}, now())")).await.expect("insert");
    let id: i64 = c.query_one("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ($1, $2, now()) RETURNING id", &[&format!("q{r}"), &m]).await.expect("insert prepared").get(0);
    c.query("SELECT * FROM t_order WHERE merchant_id = $1 AND id = $2", &[&m, &id]).await.expect("point read");
    c.simple_query(&format!("UPDATE t_order SET pay_status = 'PAID' WHERE merchant_id = {m} AND id = {id}")).await.expect("update");
    c.simple_query("SELECT count(*) FROM t_order").await.expect("fan-out");
    assert!(c.query("SELECT 1/0 FROM t_order WHERE merchant_id = $1", &[&m]).await.is_err());
    let block = async |stmts: &[String], end: &str| {
        c.batch_execute("BEGIN").await.expect("begin");
        for q in stmts {
            c.simple_query(q).await.unwrap_or_else(|e| panic!("{q}: {e}"));
        }
        c.batch_execute(end).await.expect("end of block");
    };
    let ins = |no: String, m: i64| format!("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('{no}', {m}, now())");
    block(&[format!("UPDATE t_order SET pay_status = 'NEW' WHERE merchant_id = {m} AND id = {id}")], "COMMIT").await;
    block(&[ins(format!("a{r}"), m), ins(format!("b{r}"), m + 1)], "COMMIT").await;
    block(&[format!("UPDATE t_order SET pay_status = 'X' WHERE merchant_id = {m}")], "ROLLBACK").await;
    c.batch_execute("BEGIN").await.expect("begin");
    assert!(c.simple_query(&format!("SELECT 1/0 FROM t_order WHERE merchant_id = {m}")).await.is_err());
    c.batch_execute("ROLLBACK").await.expect("rollback of a failed block");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_proxy_every_kind_of_statement_gives_its_connection_back_for_reuse() {
    // (on the single-threaded runtime, `worker_threads = 1`, which no other test runs)
    let opts = shardgate_tests::Options { redis: false, server_toml: "worker_threads = 1\n".into(), ..Default::default() };
    let c = shardgate_tests::Cluster::start_temp(opts).expect("start cluster");
    let pid = c.info.proxy_pid.expect("proxy pid");
    // (thread id, name) of every thread of the proxy; the main thread's id is the pid
    let threads: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|t| {
            let t = t.ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(t.path().join("comm")).ok()?.trim().to_string()))
        })
        .collect();
    assert!(threads.iter().any(|(tid, name)| name == "shardgate" && *tid != pid.to_string()), "the single-threaded runtime's own thread runs: {threads:?}");
    assert!(!threads.iter().any(|(_, name)| name.starts_with("tokio-rt-worker")), "no multi-threaded runtime's workers: {threads:?}");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // warm-up: every pool the rounds touch gets its connections, month tables are made
    for r in 0..3 {
        round(&client, r).await;
    }
    let before = metric(&c.info.admin_url, "shardgate_server_connects_total");
    assert!(before > 0.0);
    for r in 3..23 {
        round(&client, r).await;
    }
    let after = metric(&c.info.admin_url, "shardgate_server_connects_total");
    // one client, one statement at a time: what it gave back is what it gets again.
    // (a connection judged unclean by mistake would cost a connect per round)
    assert!(after - before <= 2.0, "20 more rounds made {} new server connections", after - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_idle_longer_than_the_idle_timeout_are_closed_and_made_again_on_demand() {
    let s = server();
    let p = pool::build(Dsn::parse(&s.pg.dsn("p")).expect("dsn"), &PoolConfig { size: 4, idle_timeout_ms: 600, ..PoolConfig::default() });
    let observer = connect(&s.pg.dsn("p")).await.expect("observer");
    // a burst: three connections at once, all given back idle
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| p.get())).await.into_iter().map(|c| c.expect("checkout")).collect();
    drop(held);
    assert_eq!(p.status().size, 3);
    assert_eq!(backends(&observer).await, 3);
    // one of them stays in use, never idle for long
    let deadline = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < deadline {
        let _ = backend_pid(&p).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.status().size, 1, "the two idle since the burst were closed, the one in use kept");
    assert_eq!(backends(&observer).await, 1);
    // and the pool makes connections again when the load comes back
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| p.get())).await.into_iter().map(|c| c.expect("checkout")).collect();
    assert_eq!(held.len(), 3);
    drop(held);
    // idle counts from when a connection came back, not from its checkout: one held
    // (as a session-pooled client holds it) longer than the timeout is not closed
    // the moment it returns
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(p.status().size, 0, "all idle since the second burst");
    let long = p.get().await.expect("checkout");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(long);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(p.status().size, 1, "a connection given back 350 ms ago is kept");
}
