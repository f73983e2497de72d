//! Portals read in parts (Execute with a row limit: pgjdbc fetch size and
//! batches, asyncpg fetchrow and cursors) answer on `t_order` as on one plain
//! table: each part, PortalSuspended in between, the end, inside and outside
//! transaction blocks, single- and multi-shard.

use shardgate_tests::{connect, Cluster, Options, Raw};
use tokio_postgres::Client;

fn start() -> Cluster {
    let c = Cluster::start_temp(Options { redis: false, ..Options::default() }).expect("start cluster");
    c.create_reference(false).expect("reference db");
    c
}

async fn load(client: &Client) {
    let mut rows = Vec::new();
    for i in 1..=700i64 {
        let merchant = 1 + (i * 7919) % 40;
        let month = 6 + (i * 31) % 6;
        rows.push(format!("({i}, 'O{i:05}', {merchant}, {}.{:02}, 'NEW', '2026-{month:02}-{:02} 10:00+00')", i % 90, i % 100, 1 + i % 28));
    }
    for chunk in rows.chunks(100) {
        client
            .batch_execute(&format!("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES {}", chunk.join(", ")))
            .await
            .expect("load");
    }
}

/// Reads `sql` through a portal `n` rows at a time inside a transaction; the
/// parts' sizes and every row's raw bytes.
async fn in_parts(client: &mut Client, sql: &str, n: i32) -> (Vec<usize>, Vec<Vec<Option<Vec<u8>>>>) {
    let tx = client.transaction().await.expect("begin");
    let stmt = tx.prepare(sql).await.expect("prepare");
    let portal = tx.bind(&stmt, &[]).await.expect("bind");
    let mut parts = Vec::new();
    let mut rows = Vec::new();
    loop {
        let part = tx.query_portal(&portal, n).await.expect("execute part");
        parts.push(part.len());
        for r in &part {
            rows.push((0..r.len()).map(|i| r.get::<_, Raw>(i).0).collect());
        }
        if part.len() < n as usize {
            break;
        }
    }
    tx.commit().await.expect("commit");
    (parts, rows)
}

#[tokio::test]
async fn portals_read_in_parts_answer_like_one_table() {
    let c = start();
    let mut reference = connect(&c.info.default_dsn.replace("/db_default", "/reference")).await.expect("reference");
    let mut proxy = connect(&c.info.proxy_dsn).await.expect("proxy");
    load(&reference).await;
    load(&proxy).await;
    for (sql, n) in [
        // several shards, merged in id order, 100 at a time (pgjdbc setFetchSize(100))
        ("SELECT id, order_no, merchant_id, order_amount FROM t_order ORDER BY id", 100),
        // a part size that divides the rows exactly: the last part is empty
        ("SELECT id FROM t_order WHERE merchant_id = 3 ORDER BY id", 1),
        ("SELECT id, create_time FROM t_order WHERE merchant_id IN (3, 5) ORDER BY create_time, id", 7),
        // grouped across shards
        ("SELECT merchant_id, count(*), sum(order_amount) FROM t_order GROUP BY merchant_id ORDER BY merchant_id", 6),
        ("SELECT count(*) FROM t_order", 1),
        ("SELECT id FROM t_order WHERE merchant_id = 999", 5),
    ] {
        let want = in_parts(&mut reference, sql, n).await;
        let got = in_parts(&mut proxy, sql, n).await;
        assert!(!want.1.is_empty() || sql.contains("999"), "{sql}: the reference returned rows");
        assert_eq!(got, want, "{sql} read {n} rows at a time");
    }
    // a row limit on a statement that returns no rows is ignored (pgjdbc executeBatch)
    for client in [&mut reference, &mut proxy] {
        let tx = client.transaction().await.expect("begin");
        let ins = tx.prepare("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES ($1, $2, $3, '2026-11-02 00:00+00')").await.expect("prepare");
        for (id, m) in [(9001i64, 1i64), (9002, 2), (9003, 9)] {
            let p = tx.bind(&ins, &[&id, &format!("B{id}"), &m]).await.expect("bind");
            assert!(tx.query_portal(&p, 1).await.expect("insert with a row limit").is_empty());
        }
        // INSERT … RETURNING read one row at a time
        let ret = tx.prepare("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (9004, 'R1', 3, '2026-11-02 00:00+00'), (9005, 'R2', 4, '2026-10-02 00:00+00') RETURNING order_no").await.expect("prepare");
        let p = tx.bind(&ret, &[]).await.expect("bind");
        let a = tx.query_portal(&p, 1).await.expect("first");
        let b = tx.query_portal(&p, 1).await.expect("second");
        let rest = tx.query_portal(&p, 1).await.expect("end");
        assert_eq!((a.len(), b.len(), rest.len()), (1, 1, 0));
        assert_eq!((a[0].get::<_, String>(0), b[0].get::<_, String>(0)), ("R1".into(), "R2".into()));
        tx.commit().await.expect("commit");
    }
    let q = "SELECT order_no FROM t_order WHERE id > 9000 ORDER BY id";
    let want: Vec<String> = reference.query(q, &[]).await.expect("ref").iter().map(|r| r.get(0)).collect();
    let got: Vec<String> = proxy.query(q, &[]).await.expect("proxy").iter().map(|r| r.get(0)).collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 5);
    // a rolled-back block leaves nothing, and the session goes on
    let tx = proxy.transaction().await.expect("begin");
    let stmt = tx.prepare("SELECT id FROM t_order ORDER BY id").await.expect("prepare");
    let p = tx.bind(&stmt, &[]).await.expect("bind");
    assert_eq!(tx.query_portal(&p, 10).await.expect("part").len(), 10);
    tx.rollback().await.expect("rollback");
    let n: i64 = proxy.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 705);
}

#[tokio::test]
async fn a_portal_too_large_to_keep_is_refused_with_a_hint() {
    let c = Cluster::start_temp(Options { redis: false, server_toml: "max_portal_bytes = 20000\n".into(), ..Options::default() }).expect("start cluster");
    let mut proxy = connect(&c.info.proxy_dsn).await.expect("proxy");
    load(&proxy).await;
    let tx = proxy.transaction().await.expect("begin");
    let stmt = tx.prepare("SELECT * FROM t_order ORDER BY id").await.expect("prepare");
    let p = tx.bind(&stmt, &[]).await.expect("bind");
    let e = tx.query_portal(&p, 10).await.expect_err("over max_portal_bytes");
    assert_eq!(shardgate_tests::sqlstate(&e).as_deref(), Some("54000"), "{e}");
    drop(tx);
    // the whole answer without a row limit still streams
    assert_eq!(proxy.query("SELECT * FROM t_order ORDER BY id", &[]).await.expect("all").len(), 700);
}
