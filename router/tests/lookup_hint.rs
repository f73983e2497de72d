//! Which statements a cached unique-lookup location may route: only those
//! whose answer has a row exactly when the cached place holds the value.

use shardgate_router::{analyze, Param, Topology};

fn hint(sql: &str, params: &[Param<'_>]) -> Option<String> {
    let topo = Topology::example();
    let a = analyze(sql, &topo);
    a.lookup_hint(params).map(|p| format!("{}.{}={}", p.table, p.column, p.value))
}

#[test]
fn plain_row_reads_by_the_unique_value_may_use_a_cached_place() {
    for sql in [
        "SELECT * FROM t_order WHERE order_no = 'A1'",
        "SELECT id, pay_status FROM t_order WHERE order_no = 'A1' AND pay_status = 'PAID'",
        "SELECT * FROM t_order o WHERE o.order_no = 'A1' ORDER BY id LIMIT 5",
        "SELECT *, row_number() OVER () FROM t_order WHERE order_no = 'A1'",
        "SELECT * FROM t_order WHERE order_no = 'A1' FOR UPDATE",
        "SELECT DISTINCT pay_status FROM t_order WHERE (order_no = 'A1') AND (merchant_id > 3 OR pay_status IS NULL)",
        "SELECT id, order_amount * 2 AS twice, create_time::date FROM t_order WHERE order_no = 'A1' AND order_amount > 0.5",
    ] {
        assert_eq!(hint(sql, &[]).as_deref(), Some("t_order.order_no=A1"), "{sql}");
    }
    assert_eq!(hint("SELECT * FROM t_order WHERE order_no = $1", &[Param::Text("B2")]).as_deref(), Some("t_order.order_no=B2"));
}

#[test]
fn answers_that_can_have_rows_without_a_match_or_do_work_elsewhere_may_not() {
    for sql in [
        // aggregates answer a row from nothing
        "SELECT count(*) FROM t_order WHERE order_no = 'A1'",
        "SELECT 1 FROM t_order WHERE order_no = 'A1' ORDER BY count(*)",
        "SELECT max(id) FILTER (WHERE true) FROM t_order WHERE order_no = 'A1'",
        "SELECT pay_status FROM t_order WHERE order_no = 'A1' GROUP BY pay_status",
        "SELECT 1 FROM t_order WHERE order_no = 'A1' HAVING true",
        // any function call outside a window: an aggregate the router does not know (a
        // user-defined one, json_arrayagg) answers a row from nothing
        "SELECT my_first(pay_status) FROM t_order WHERE order_no = 'A1'",
        "SELECT lower(order_no) FROM t_order WHERE order_no = 'A1'",
        "SELECT sum(count(*)) OVER () FROM t_order WHERE order_no = 'A1'",
        // LIMIT/OFFSET are evaluated before any row
        "SELECT * FROM t_order WHERE order_no = 'A1' LIMIT (SELECT nextval('s'))",
        "SELECT * FROM t_order WHERE order_no = 'A1' LIMIT audit_fn()",
        "SELECT (SELECT count(*) FROM t_order) FROM t_order WHERE order_no = 'A1'",
        // the value is not a conjunct of every row
        "SELECT * FROM t_order WHERE order_no = 'A1' OR merchant_id = 5",
        "SELECT * FROM t_order WHERE order_no IN ('A1', 'A2')",
        "SELECT * FROM t_order WHERE NOT (order_no = 'A1')",
        // joins, set operations, WITH, derived tables
        "SELECT * FROM t_order o LEFT JOIN t_order p ON p.id = o.id WHERE o.order_no = 'A1'",
        "SELECT * FROM t_order WHERE order_no = 'A1' UNION ALL SELECT * FROM t_order WHERE order_no = 'A1'",
        "WITH w AS (SELECT 1) SELECT * FROM t_order WHERE order_no = 'A1'",
        "SELECT * FROM (SELECT * FROM t_order WHERE order_no = 'A1') s",
        // a function in WHERE could run on rows of another place
        "SELECT * FROM t_order WHERE order_no = 'A1' AND nextval('s') > 0",
        "SELECT * FROM t_order WHERE order_no = 'A1' AND EXISTS (SELECT 1)",
        // writes
        "UPDATE t_order SET pay_status = 'X' WHERE order_no = 'A1'",
        "DELETE FROM t_order WHERE order_no = 'A1'",
    ] {
        assert_eq!(hint(sql, &[]), None, "{sql}");
    }
    assert_eq!(hint("SELECT * FROM t_order WHERE order_no = $1", &[Param::Null]), None);
}
