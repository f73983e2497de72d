//! `shardgate route` prints plans without any database running.

use std::process::Command;

use shardgate_tests::shardgate_bin;

fn route(args: &[&str]) -> (i32, String) {
    let out = Command::new(shardgate_bin().expect("build shardgate first"))
        .args(["route", "--example-config", "--now", "2026-11-22T10:00:00Z", "--months", "202609..202701"])
        .args(args)
        .output()
        .expect("run shardgate route");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn route_prints_targets_sql_and_merge_spec() {
    let (code, out) = route(&["--sql", "SELECT pay_status, avg(order_amount) FROM t_order WHERE merchant_id IN ($1, $2) AND create_time >= $3 GROUP BY pay_status", "--param", "1", "--param", "2", "--param", "2027-01-01"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("select t_order targets=2\n"), "{out}");
    assert!(out.contains("  db_1 [202701]: SELECT pay_status, avg(order_amount), sum(order_amount) AS __sg_h0, count(order_amount) AS __sg_h1 FROM t_order_202701 AS t_order"), "{out}");
    assert!(out.contains("merge: group=[#0] aggs=[#1=avg(h0/h1)] hidden=2"), "{out}");

    let (code, out) = route(&["--sql", "INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('a', 9, '2026-12-03')"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("db_1 [202612]: INSERT INTO t_order_202612 AS t_order (order_no, merchant_id, create_time, id) VALUES ('a', 9, '2026-12-03', "), "{out}");
    assert!(out.contains("generated ids: "), "{out}");
}

#[test]
fn route_reports_refusals_with_sqlstate() {
    let (code, out) = route(&["--sql", "SELECT id, rank() OVER (ORDER BY id) FROM t_order"]);
    assert_eq!(code, 1);
    assert!(out.starts_with("ERROR 0A000: window function rank() cannot be computed across shards"), "{out}");
    let (code, out) = route(&["--sql", "SELECT id FROM t_order WHERE merchant_id = $1", "--param", "\\N"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[template]"), "NULL key matches no row: {out}");
}
