//! The server pools, against a real PostgreSQL: a connection is handed to the
//! next user only idle, with every answer read. One given back inside a
//! transaction block (open or failed) or with an answer still unread is
//! closed at once, so the server rolls it back and frees its locks now, and
//! nobody inherits it; an idle one is kept and reused.

use std::time::Duration;

use shardgate::backend::pool::{self, Pool};
use shardgate::backend::query as wire;
use shardgate_config::Dsn;
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
    pool::build(dsn, 2, Duration::from_secs(3), Duration::from_secs(3))
}

async fn backend_pid(p: &Pool) -> String {
    let mut c = p.get().await.expect("checkout");
    let rows = wire::control(&mut c, "SELECT pg_backend_pid()").await.expect("io").expect("sql");
    assert_eq!(c.ready_status, b'I');
    rows[0].clone().expect("a pid")
}

/// Whether the server still has a backend with this pid.
async fn alive(observer: &tokio_postgres::Client, pid: &str) -> bool {
    let n: i64 = observer.query_one(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"), &[]).await.expect("count").get(0);
    n == 1
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
    let mut ended = false;
    for _ in 0..50 {
        if !alive(&observer, &pid).await {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "the connection given back inside a block was closed, its backend gone");
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
    assert_ne!(backend_pid(&p).await, pid, "a failed block is not handed on");

    // an answer nobody read: the next user must not read it as its own
    let pid = {
        let mut c = p.get().await.expect("checkout");
        let pid = wire::control(&mut c, "SELECT pg_backend_pid()").await.expect("io").expect("sql")[0].clone().expect("pid");
        c.send(&shardgate::protocol::frontend::query("SELECT 'stale'")).await.expect("send");
        pid
    };
    let mut c = p.get().await.expect("checkout");
    let rows = wire::control(&mut c, "SELECT 'mine'").await.expect("io").expect("sql");
    assert_eq!(rows, vec![Some("mine".to_string())], "the next user reads its own answer");
    let now = wire::control(&mut c, "SELECT pg_backend_pid()").await.expect("io").expect("sql")[0].clone().expect("pid");
    assert_ne!(now, pid);
    drop(c);
    // and healthy connections still come back: two checkouts, two pids, both reused
    let a = backend_pid(&p).await;
    assert_eq!(backend_pid(&p).await, a);
}
