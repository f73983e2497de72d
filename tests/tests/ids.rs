//! Ids never miss: an application's own ids (a sequence above 2^22, a
//! bigserial, its own snowflakes with a recent epoch) are found by every kind
//! of lookup, and with `ids.route_by_id` a write that would break routing by
//! id is refused with a hint.

use shardgate_tests::{connect, sqlstate, Cluster, Options};

fn start(extra: &str) -> Cluster {
    Cluster::start_temp(Options { redis: false, extra_toml: extra.into(), ..Options::default() }).expect("start cluster")
}

/// (id, merchant, create_time): ids an application makes itself.
const APP_IDS: [(i64, i64, &str); 5] = [
    (9_100_002, 22, "2026-10-20 01:00+00"),
    (40_004_858, 3, "2026-11-02 00:00+00"),
    (132_271_570_944_001_580, 7, "2026-11-15 12:00+00"),
    (4_194_305, 1, "2026-09-30 23:59:59+00"),
    (382_832_581_017_686_016, 6, "2026-11-20 01:00+00"),
];

#[tokio::test]
async fn application_ids_are_found_by_every_lookup() {
    let c = start("");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    for (id, m, t) in APP_IDS {
        client
            .batch_execute(&format!("INSERT INTO t_order (id, order_no, merchant_id, order_amount, create_time) VALUES ({id}, 'A{id}', {m}, 1.00, '{t}')"))
            .await
            .expect("insert");
    }
    let by_id = client.prepare("SELECT order_no FROM t_order WHERE id = $1").await.expect("prepare");
    let by_both = client.prepare("SELECT order_no FROM t_order WHERE merchant_id = $1 AND id = $2").await.expect("prepare");
    for (id, m, _) in APP_IDS {
        let want = format!("A{id}");
        // simple protocol, literals
        let rows = client.simple_query(&format!("SELECT order_no FROM t_order WHERE id = {id}")).await.expect("simple by id");
        assert_eq!(rows.iter().filter(|r| matches!(r, tokio_postgres::SimpleQueryMessage::Row(_))).count(), 1, "simple WHERE id = {id}");
        // extended, bound
        assert_eq!(client.query(&by_id, &[&id]).await.expect("by id").len(), 1, "WHERE id = {id}");
        let row = client.query_one(&by_both, &[&m, &id]).await.unwrap_or_else(|e| panic!("merchant {m} and id {id}: {e}"));
        assert_eq!(row.get::<_, String>(0), want);
        let n = client.query(format!("SELECT 1 FROM t_order WHERE id IN ({id}, 1)").as_str(), &[]).await.expect("in").len();
        assert_eq!(n, 1, "id IN ({id}, 1)");
        let n = client.query("SELECT 1 FROM t_order WHERE id = ANY($1)", &[&vec![id, 2]]).await.expect("any").len();
        assert_eq!(n, 1, "id = ANY({{{id},2}})");
        // unit-of-work style writes by primary key
        assert_eq!(client.execute("UPDATE t_order SET pay_status = 'PAID' WHERE id = $1", &[&id]).await.expect("update"), 1, "UPDATE by id {id}");
        assert_eq!(client.execute(format!("UPDATE t_order SET order_amount = 2 WHERE merchant_id = {m} AND id = {id}").as_str(), &[]).await.expect("update"), 1);
    }
    for (id, _, _) in APP_IDS {
        assert_eq!(client.execute("DELETE FROM t_order WHERE id = $1", &[&id]).await.expect("delete"), 1, "DELETE by id {id}");
    }
    let n: i64 = client.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn with_route_by_id_a_write_that_would_break_it_is_refused() {
    let c = start("[ids]\nworker_id = 1\nroute_by_id = true\nlegacy_id_max = 1000000\n");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // 9100002 reads as a shardgate id of db_5 (moved), but merchant 22 lives on db_6
    let e = client
        .batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (9100002, 'N2', 22, '2026-10-20 01:00+00')")
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    let m = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(m.contains("omit the id") && m.contains("route_by_id"), "{m}");
    // the same through a bound parameter
    let e = client
        .execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES ($1, 'N3', 22, '2026-10-20 01:00+00')", &[&9_100_002i64])
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    // ids at or below legacy_id_max and generated ids are taken, and found by id alone
    client.batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (999999, 'L1', 22, '2026-10-20 01:00+00')").await.expect("legacy id");
    let id: i64 = client
        .query_one("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('G1', 22, '2026-10-20 01:00+00') RETURNING id", &[])
        .await
        .expect("generated")
        .get(0);
    for (id, no) in [(999_999i64, "L1"), (id, "G1")] {
        let row = client.query_one("SELECT order_no FROM t_order WHERE id = $1", &[&id]).await.expect("by id");
        assert_eq!(row.get::<_, String>(0), no);
    }
    let n: i64 = client.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(n, 2, "nothing of the refused inserts was written");
}
