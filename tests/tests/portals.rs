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

/// Outside a block a portal ends at Sync, so its answer is read whole and
/// kept (up to `server.max_portal_bytes`); inside a block it streams from
/// the shards as the client reads it, whatever its size.
#[tokio::test]
async fn a_portal_too_large_to_keep_is_refused_outside_a_block_and_streams_inside_one() {
    use shardgate_tests::raw::{error_code, frame, md5_login, pbe, pbe_rows, read_until_ready};
    use std::io::Write;
    let c = Cluster::start_temp(Options { redis: false, server_toml: "max_portal_bytes = 20000\n".into(), ..Options::default() }).expect("start cluster");
    let mut proxy = connect(&c.info.proxy_dsn).await.expect("proxy");
    load(&proxy).await;
    // outside a block (asyncpg fetchrow): Parse, Bind, Execute with a row limit, Sync
    let mut s = md5_login(&c);
    let mut batch = pbe_rows("SELECT * FROM t_order ORDER BY id", 10);
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).expect("batch");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs).as_deref(), Some("54000"), "{msgs:?}");
    // a write read in parts whose answer is too large to keep is refused before it commits
    let mut batch = pbe_rows("UPDATE t_order SET pay_status = 'PAID' RETURNING *", 10);
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).expect("batch");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs).as_deref(), Some("54000"), "{msgs:?}");
    let paid: i64 = proxy.query_one("SELECT count(*) FROM t_order WHERE pay_status = 'PAID'", &[]).await.expect("count").get(0);
    assert_eq!(paid, 0, "an UPDATE answered with an error committed");
    // a portal ends with its implicit transaction at Sync: executing it again is 34000, and
    // the write does not run a second time
    let mut batch = pbe("UPDATE t_order SET order_amount = order_amount + 1 WHERE id = 1 RETURNING id");
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).expect("batch");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    let mut again = frame(b'E', &[0, 0, 0, 0, 0]);
    again.extend(frame(b'S', b""));
    s.write_all(&again).expect("execute again");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs).as_deref(), Some("34000"), "{msgs:?}");
    let amount: String = proxy.query_one("SELECT order_amount::text FROM t_order WHERE id = 1", &[]).await.expect("row 1").get(0);
    assert_eq!(amount, "2.01", "the UPDATE ran once");
    // inside a block: 700 rows of about 100 bytes, far over 20,000 bytes, 10 at a time
    let (parts, rows) = in_parts(&mut proxy, "SELECT * FROM t_order ORDER BY id", 10).await;
    assert_eq!(rows.len(), 700);
    assert_eq!(parts.len(), 71, "70 full parts and an empty last one");
    // the whole answer without a row limit still streams
    assert_eq!(proxy.query("SELECT * FROM t_order ORDER BY id", &[]).await.expect("all").len(), 700);
}


/// Inside a block, a multi-shard ORDER BY read 100 rows at a time streams:
/// about 64 MB of rows pass through the proxy with its memory bounded far
/// below that (`max_portal_bytes` is 1 MiB here: keeping it would fail).
/// Other statements may run between parts (the rest is kept), a portal
/// closed early lets the block go on, the block's own writes are seen, and
/// a client that leaves mid-portal leaves no transaction behind on a shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portals_inside_a_block_stream_with_bounded_memory() {
    let c = Cluster::start_temp(Options { redis: false, server_toml: "max_portal_bytes = 1048576\n".into(), ..Options::default() }).expect("start cluster");
    let pid = c.info.proxy_pid.expect("proxy pid");
    let mut proxy = connect(&c.info.proxy_dsn).await.expect("proxy");
    // one row per shard through the proxy makes the month table; then 8,000 rows of 1 KB per shard
    // straight into it (8 × 8,000 × 1 KB = 64 MB); ids interleave across shards
    for m in 0..8i64 {
        proxy
            .execute("INSERT INTO t_order (id, merchant_id, order_no, create_time) VALUES ($1, $2, $3, '2026-11-02 00:00:00+00')", &[&(m + 1_000_000), &m, &format!("seed{m}")])
            .await
            .expect("seed");
        let shard = connect(&c.info.shards[m as usize]).await.expect("shard");
        shard
            .batch_execute(&format!(
                "INSERT INTO t_order_202611 (id, merchant_id, order_no, pay_status, create_time) \
                 SELECT g * 8 + {m}, {m}, 'S' || (g * 8 + {m}), repeat('x', 1000), '2026-11-03 00:00:00+00' FROM generate_series(0, 7999) g"
            ))
            .await
            .expect("load");
    }
    let before = shardgate_tests::rss_kib(pid);
    // sampled every 5 ms while the portals are read (a buffer may come and go between reads)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(shardgate_tests::rss_kib(pid));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak
        })
    };
    let mut peak = before;
    {
        let tx = proxy.transaction().await.expect("begin");
        // the block's own write is part of what it reads
        tx.execute("INSERT INTO t_order (id, merchant_id, order_no, pay_status, create_time) VALUES (64000, 3, 'mine', 'y', '2026-11-04 00:00:00+00')", &[]).await.expect("write");
        let stmt = tx.prepare("SELECT id, pay_status FROM t_order WHERE id < 1000000 ORDER BY id").await.expect("prepare");
        let portal = tx.bind(&stmt, &[]).await.expect("bind");
        let mut next = 0i64;
        let mut parts = 0;
        loop {
            let part = tx.query_portal(&portal, 100).await.expect("part");
            for r in &part {
                assert_eq!(r.get::<_, i64>(0), next, "rows in id order across the shards");
                next += 1;
            }
            parts += 1;
            if parts % 50 == 0 {
                peak = peak.max(shardgate_tests::rss_kib(pid));
            }
            if part.len() < 100 {
                break;
            }
        }
        assert_eq!(next, 64_001, "every row once, the block's own row last");
        // another statement between parts: the rest of a small portal is kept and goes on after it
        let small = tx.prepare("SELECT id FROM t_order WHERE merchant_id IN (1, 2) AND id < 200 ORDER BY id").await.expect("prepare");
        let p2 = tx.bind(&small, &[]).await.expect("bind");
        let first: Vec<i64> = tx.query_portal(&p2, 10).await.expect("part").iter().map(|r| r.get(0)).collect();
        let n: i64 = tx.query_one("SELECT count(*) FROM t_order WHERE merchant_id = 3", &[]).await.expect("between parts").get(0);
        assert_eq!(n, 8_002);
        let rest: Vec<i64> = tx.query_portal(&p2, 1000).await.expect("rest").iter().map(|r| r.get(0)).collect();
        let all: Vec<i64> = first.into_iter().chain(rest).collect();
        let want: Vec<i64> = (0..200).filter(|i| i % 8 == 1 || i % 8 == 2).collect();
        assert_eq!(all, want);
        // a part without a row limit (the rest at once) streams out as well
        let p4 = tx.bind(&stmt, &[]).await.expect("bind");
        assert_eq!(tx.query_portal(&p4, 100).await.expect("part").len(), 100);
        assert_eq!(tx.query_portal(&p4, 0).await.expect("the rest").len(), 63_901);
        peak = peak.max(shardgate_tests::rss_kib(pid));
        // a portal closed early (dropped) lets the block go on; COMMIT with one still open
        let p3 = tx.bind(&stmt, &[]).await.expect("bind");
        assert_eq!(tx.query_portal(&p3, 100).await.expect("part").len(), 100);
        drop(p3);
        tx.execute("UPDATE t_order SET pay_status = 'z' WHERE id = 64000 AND merchant_id = 3", &[]).await.expect("after the close");
        let p5 = tx.bind(&stmt, &[]).await.expect("bind");
        assert_eq!(tx.query_portal(&p5, 100).await.expect("part").len(), 100);
        tx.commit().await.expect("commit with a portal open");
    }
    // ROLLBACK with a portal open: the block's write is gone, the session goes on
    {
        let tx = proxy.transaction().await.expect("begin");
        tx.execute("INSERT INTO t_order (id, merchant_id, order_no, create_time) VALUES (64001, 5, 'gone', '2026-11-04 00:00:00+00')", &[]).await.expect("write");
        let stmt = tx.prepare("SELECT id, pay_status FROM t_order ORDER BY id").await.expect("prepare");
        let portal = tx.bind(&stmt, &[]).await.expect("bind");
        assert_eq!(tx.query_portal(&portal, 100).await.expect("part").len(), 100);
        tx.rollback().await.expect("rollback with a portal open");
    }
    let gone: i64 = proxy.query_one("SELECT count(*) FROM t_order WHERE id = 64001 AND merchant_id = 5", &[]).await.expect("rolled back").get(0);
    assert_eq!(gone, 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    peak = peak.max(sampler.join().expect("sampler"));
    let grown = peak.saturating_sub(before);
    eprintln!("streaming portal: proxy RSS {before} KiB before, peak {peak} KiB while 64 MB passed in parts of 100 rows");
    assert!(grown < 32 * 1024, "the proxy grew by {grown} KiB while streaming 64 MB");
    let z: String = proxy.query_one("SELECT pay_status FROM t_order WHERE id = 64000 AND merchant_id = 3", &[]).await.expect("committed").get(0);
    assert_eq!(z, "z");
    // a client that leaves in the middle of a portal: nothing stays open on the shards
    {
        let mut gone = connect(&c.info.proxy_dsn).await.expect("connect");
        let tx = gone.transaction().await.expect("begin");
        let stmt = tx.prepare("SELECT id, pay_status FROM t_order ORDER BY id").await.expect("prepare");
        let portal = tx.bind(&stmt, &[]).await.expect("bind");
        assert_eq!(tx.query_portal(&portal, 100).await.expect("part").len(), 100);
        std::mem::forget(tx);
        drop(gone);
    }
    let t0 = std::time::Instant::now();
    loop {
        let mut open = 0i64;
        for dsn in &c.info.shards {
            let shard = connect(dsn).await.expect("shard");
            open += shard
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'", &[])
                .await
                .expect("activity")
                .get::<_, i64>(0);
        }
        if open == 0 {
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{open} shard transactions left open by a client that left");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let n: i64 = proxy.query_one("SELECT count(*) FROM t_order", &[]).await.expect("still serving").get(0);
    assert_eq!(n, 64_009);
}
