//! The differential workload: orders loaded into one plain `t_order` table and
//! through shardgate, then the same statements run on both. Shared by the
//! tokio-postgres test and the Python clients (serialized to JSON).

use serde::Serialize;

/// A bind value.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Value {
    /// bigint.
    Int(i64),
    /// text.
    Text(String),
}

/// One statement and how to compare its answers.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// SQL with `$n` placeholders.
    pub sql: String,
    /// Bind values.
    pub params: Vec<Value>,
    /// The row order is part of the answer (ORDER BY with unique keys).
    pub ordered: bool,
    /// Columns left out of the comparison (ids shardgate generates).
    pub ignore: Vec<String>,
    /// The SQLSTATE both must fail with, for error cases.
    pub error: Option<String>,
    /// Statements run in one transaction with this step (BEGIN … COMMIT/ROLLBACK);
    /// empty for a single statement.
    pub tx: Vec<Step>,
    /// How the transaction ends.
    pub tx_end: String,
}

fn step(sql: &str) -> Step {
    Step { sql: sql.into(), params: Vec::new(), ordered: sql.contains("ORDER BY"), ignore: Vec::new(), error: None, tx: Vec::new(), tx_end: String::new() }
}

fn with(sql: &str, params: Vec<Value>) -> Step {
    Step { params, ..step(sql) }
}

fn err(sql: &str, code: &str) -> Step {
    Step { error: Some(code.into()), ..step(sql) }
}

fn tx(steps: Vec<Step>, end: &str) -> Step {
    Step { tx: steps, tx_end: end.into(), ..step("") }
}

/// Orders in the workload.
pub const ORDERS: i64 = 2400;
/// Merchants they belong to.
pub const MERCHANTS: i64 = 80;
const STATUSES: [&str; 4] = ["NEW", "PAID", "REFUND", "CLOSED"];

/// Multi-row INSERTs of every order (ids given), 100 rows each: every batch
/// spans all shards and six months.
pub fn load() -> Vec<String> {
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for i in 1..=ORDERS {
        let merchant = 1 + (i * 7919) % MERCHANTS;
        let month = 6 + (i * 31) % 6; // 2026-06 .. 2026-11
        let day = 1 + (i * 13) % 28;
        let hour = (i * 7) % 24;
        let amount = if i % 97 == 0 { "NULL".to_string() } else { format!("{}.{:02}", 1 + (i * 37) % 100, (i * 53) % 100) };
        let status = if i % 89 == 0 { "NULL".to_string() } else { format!("'{}'", STATUSES[(i % 4) as usize]) };
        rows.push(format!("({i}, 'O{i:05}', {merchant}, {amount}, {status}, '2026-{month:02}-{day:02} {hour:02}:{:02}:00+00')", (i * 11) % 60));
        if rows.len() == 100 {
            out.push(format!("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES {}", rows.join(", ")));
            rows.clear();
        }
    }
    out
}

/// The statements compared after loading.
pub fn steps() -> Vec<Step> {
    use Value::{Int, Text};
    vec![
        // point reads and ranges
        step("SELECT count(*) FROM t_order"),
        with("SELECT * FROM t_order WHERE merchant_id = $1 AND id = $2", vec![Int(1 + (17 * 7919) % MERCHANTS), Int(17)]),
        with("SELECT * FROM t_order WHERE id = $1", vec![Int(1234)]),
        with("SELECT id, order_no, order_amount FROM t_order WHERE merchant_id = $1 ORDER BY create_time, id", vec![Int(5)]),
        step("SELECT * FROM t_order WHERE merchant_id = 5 AND create_time >= '2026-08-01' AND create_time < '2026-10-01' ORDER BY id"),
        step("SELECT id, merchant_id FROM t_order WHERE merchant_id IN (1, 2, 3, 12) ORDER BY id"),
        step("SELECT * FROM t_order WHERE id IN (1, 500, 1000, 2000) ORDER BY id"),
        step("SELECT id FROM t_order WHERE merchant_id = 3 OR merchant_id = 11 ORDER BY id"),
        step("SELECT id, create_time FROM t_order WHERE create_time BETWEEN '2026-07-10' AND '2026-07-12' ORDER BY id"),
        with("SELECT order_no FROM t_order WHERE merchant_id = $1 AND order_no = $2", vec![Int(1 + (42 * 7919) % MERCHANTS), Text("O00042".into())]),
        step("SELECT * FROM t_order WHERE merchant_id = 999999"),
        step("SELECT * FROM t_order WHERE pay_status IS NULL ORDER BY id"),
        step("SELECT id, order_amount * 2 AS dbl, upper(pay_status) AS st FROM t_order WHERE merchant_id = 7 ORDER BY id"),
        // global order, limit, offset
        step("SELECT id, order_amount FROM t_order ORDER BY order_amount DESC NULLS LAST, id LIMIT 10"),
        step("SELECT id, create_time FROM t_order ORDER BY create_time DESC, id DESC LIMIT 15 OFFSET 30"),
        step("SELECT id FROM t_order ORDER BY id OFFSET 2390"),
        with("SELECT id, order_no FROM t_order ORDER BY id LIMIT $1 OFFSET $2", vec![Int(7), Int(100)]),
        step("SELECT id, pay_status FROM t_order ORDER BY pay_status NULLS FIRST, id LIMIT 20"),
        step("SELECT order_no FROM t_order ORDER BY merchant_id, create_time, id LIMIT 25"),
        step("SELECT id FROM t_order ORDER BY id LIMIT 0"),
        // aggregates
        step("SELECT count(*) FROM t_order WHERE create_time >= '2026-09-01' AND create_time < '2026-11-01'"),
        step("SELECT sum(order_amount) FROM t_order"),
        step("SELECT avg(order_amount) FROM t_order"),
        step("SELECT min(create_time), max(create_time), min(order_amount), max(order_amount) FROM t_order"),
        step("SELECT count(order_amount), count(pay_status), count(*) FROM t_order"),
        step("SELECT count(*), sum(order_amount), avg(order_amount) FROM t_order WHERE create_time >= '2030-01-01'"),
        step("SELECT min(order_no), max(order_no) FROM t_order WHERE merchant_id IN (4, 44)"),
        // grouping
        step("SELECT pay_status, count(*), sum(order_amount), avg(order_amount) FROM t_order GROUP BY pay_status ORDER BY 1"),
        step("SELECT merchant_id, count(*) FROM t_order GROUP BY merchant_id HAVING count(*) > 30 ORDER BY merchant_id"),
        step("SELECT pay_status, sum(order_amount) AS total FROM t_order GROUP BY pay_status HAVING sum(order_amount) > 1000 ORDER BY total DESC"),
        step("SELECT merchant_id, count(*) AS n FROM t_order GROUP BY merchant_id ORDER BY n DESC, merchant_id LIMIT 5"),
        step("SELECT date_trunc('month', create_time) AS m, count(*), max(order_amount) FROM t_order GROUP BY 1 ORDER BY 1"),
        step("SELECT merchant_id, avg(order_amount) FROM t_order WHERE merchant_id < 20 GROUP BY merchant_id HAVING avg(order_amount) < 50 OR max(order_amount) IS NULL ORDER BY merchant_id"),
        step("SELECT pay_status, merchant_id, count(*) FROM t_order WHERE merchant_id < 10 GROUP BY pay_status, merchant_id ORDER BY 2, 1 NULLS FIRST"),
        step("SELECT DISTINCT pay_status FROM t_order ORDER BY 1"),
        step("SELECT DISTINCT merchant_id FROM t_order"),
        step("SELECT DISTINCT merchant_id, pay_status FROM t_order WHERE merchant_id < 8 ORDER BY 1, 2"),
        // errors
        err("SELECT nocol FROM t_order", "42703"),
        err("SELECT order_amount / 0 FROM t_order", "22012"),
        err("SELECT * FROM t_order WHERE merchant_id = 'abc'", "22P02"),
        err("SELEC * FROM t_order", "42601"),
        err("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (9000001, 'O00001', 80, '2026-07-05')", "23505"),
        err("INSERT INTO t_order (id, order_no, create_time) VALUES (9000002, 'X1', '2026-06-05')", "23502"),
        // writes
        step("UPDATE t_order SET pay_status = 'PAID' WHERE merchant_id = 5 AND create_time < '2026-08-01'"),
        step("UPDATE t_order SET order_amount = order_amount + 1 WHERE order_amount > 90"),
        step("DELETE FROM t_order WHERE id IN (3, 4, 5)"),
        step("DELETE FROM t_order WHERE merchant_id = 7 AND pay_status = 'CLOSED'"),
        with("UPDATE t_order SET pay_status = $1 WHERE merchant_id = $2 RETURNING id, pay_status", vec![Text("REFUND".into()), Int(9)]),
        // RETURNING rows come back in VALUES order although the rows are split over three targets
        Step {
            ordered: true,
            ..step("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES (9100001, 'N1', 21, 5.00, 'NEW', '2026-11-20 01:00+00'), (9100002, 'N2', 22, 6.00, 'NEW', '2026-10-20 01:00+00'), (9100003, 'N3', 23, 7.50, 'NEW', '2026-11-21 01:00+00'), (9100004, 'N4', 21, 8.25, 'NEW', '2026-11-22 01:00+00') RETURNING order_no, merchant_id")
        },
        Step { ignore: vec!["id".into()], ..step("INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ('G1', 31, 1.25, 'NEW', '2026-11-02 03:00+00') RETURNING id, order_no, merchant_id") },
        step("SELECT order_no, merchant_id, order_amount FROM t_order WHERE order_no LIKE 'N%' OR order_no LIKE 'G%' ORDER BY order_no"),
        // transactions
        tx(vec![step("UPDATE t_order SET pay_status = 'CLOSED' WHERE merchant_id = 1"), step("UPDATE t_order SET pay_status = 'CLOSED' WHERE merchant_id = 2"), step("SELECT pay_status, count(*) FROM t_order WHERE merchant_id IN (1, 2) GROUP BY 1 ORDER BY 1")], "COMMIT"),
        tx(vec![step("DELETE FROM t_order WHERE merchant_id = 10"), step("SELECT count(*) FROM t_order WHERE merchant_id = 10")], "ROLLBACK"),
        tx(vec![step("UPDATE t_order SET pay_status = 'X' WHERE merchant_id = 11"), err("SELECT 1/0 FROM t_order WHERE merchant_id = 11", "22012"), err("SELECT count(*) FROM t_order", "25P02")], "COMMIT"),
        step("SELECT merchant_id, pay_status, count(*) FROM t_order WHERE merchant_id IN (1, 2, 10, 11) GROUP BY 1, 2 ORDER BY 1, 2"),
        // the whole table at the end (generated ids left out)
        Step { ignore: vec!["id".into()], ..step("SELECT * FROM t_order ORDER BY order_no") },
    ]
}
