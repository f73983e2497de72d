//! SQL the proxy builds never becomes more than the one intended statement:
//! the quoting helper turns any text into exactly one literal or identifier,
//! and the router's rewrite of one client statement is one statement per
//! target, carrying a client's literal as that literal and nothing else.
//! (The fuzz target `fuzz/fuzz_targets/sqlbuild.rs` runs the same checks on
//! arbitrary bytes: `make fuzz FUZZ_TARGET=sqlbuild`.)

#[path = "common/golden_cases.rs"]
mod golden_cases;

use std::ops::ControlFlow;

use proptest::prelude::*;
use shardgate_router::quote::{ident, literal};
use shardgate_router::Plan;
use sqlparser::ast::{visit_expressions, Expr, SelectItem, SetExpr, Statement, Value};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

fn parse(sql: &str) -> Vec<Statement> {
    Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap_or_else(|e| panic!("{sql:?} does not parse: {e}"))
}

/// Every single-quoted string literal in a statement.
fn literals(stmt: &Statement) -> Vec<String> {
    let mut out = Vec::new();
    let _ = visit_expressions(stmt, |e: &Expr| {
        if let Expr::Value(v) = e {
            match &v.value {
                Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => out.push(s.clone()),
                Value::DollarQuotedString(d) => out.push(d.value.clone()),
                _ => {}
            }
        }
        ControlFlow::<()>::Continue(())
    });
    out
}

/// Text that tries hard to end a literal or an identifier early.
fn hostile() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("'".to_string()),
            Just("\"".to_string()),
            Just("\\".to_string()),
            Just(";".to_string()),
            Just("--".to_string()),
            Just("/*".to_string()),
            Just("*/".to_string()),
            Just("$$".to_string()),
            Just("$x$".to_string()),
            Just("E'".to_string()),
            Just("\n".to_string()),
            Just(" DROP TABLE t_order".to_string()),
            "[a-zA-Z0-9 ]{0,4}",
            "\\PC{0,3}",
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn a_quoted_value_is_exactly_one_string_literal(s in hostile()) {
        let stmts = parse(&format!("SELECT {}", literal(&s)));
        prop_assert_eq!(stmts.len(), 1);
        let Statement::Query(q) = &stmts[0] else { panic!("not a query") };
        let SetExpr::Select(sel) = q.body.as_ref() else { panic!("not a select") };
        prop_assert_eq!(sel.projection.len(), 1);
        prop_assert_eq!(literals(&stmts[0]), vec![s]);
    }

    #[test]
    fn a_quoted_name_is_exactly_one_identifier(s in hostile().prop_filter("PostgreSQL names are not empty", |s| !s.is_empty())) {
        let stmts = parse(&format!("SELECT 1 AS {}", ident(&s)));
        prop_assert_eq!(stmts.len(), 1);
        let Statement::Query(q) = &stmts[0] else { panic!("not a query") };
        let SetExpr::Select(sel) = q.body.as_ref() else { panic!("not a select") };
        let SelectItem::ExprWithAlias { alias, .. } = &sel.projection[0] else { panic!("no alias") };
        prop_assert_eq!(&alias.value, &s);
        prop_assert_eq!(alias.quote_style, Some('"'));
    }

    #[test]
    fn a_client_literal_stays_one_literal_in_every_rewritten_statement(s in hostile(), merchant in 0i64..16, pick in 0usize..5) {
        let lit = literal(&s);
        let sql = match pick {
            0 => format!("SELECT * FROM t_order WHERE merchant_id = {merchant} AND pay_status = {lit}"),
            1 => format!("SELECT pay_status, count(*) FROM t_order WHERE pay_status <> {lit} GROUP BY pay_status ORDER BY 1"),
            2 => format!("UPDATE t_order SET pay_status = {lit} WHERE merchant_id = {merchant} AND create_time >= '2026-11-01'"),
            3 => format!("INSERT INTO t_order (id, merchant_id, order_no, create_time) VALUES (1, {merchant}, {lit}, '2026-11-05'), (2, {}, 'x', '2026-12-05')", merchant + 1),
            _ => format!("DELETE FROM t_order WHERE merchant_id = {merchant} AND pay_status IN ({lit}, 'PAID')"),
        };
        let w = golden_cases::World::new();
        match shardgate_router::plan(&sql, &[], &w.topo, &w.ctx()) {
            Ok(Plan::Routed(r)) => {
                for t in &r.targets {
                    let stmts = parse(&t.sql);
                    prop_assert_eq!(stmts.len(), 1, "{} became {}", sql, t.sql);
                    let found = literals(&stmts[0]);
                    // the client's value arrives as itself, or (an INSERT row for another
                    // shard) not at all: never cut into pieces
                    prop_assert!(found.contains(&s) || pick == 3, "{:?} lost from {}", s, t.sql);
                    let ours = ["x", "PAID", "2026-11-01", "2026-11-05", "2026-12-05"];
                    prop_assert!(found.iter().all(|f| f == &s || ours.contains(&f.as_str())), "{:?} in {}", found, t.sql);
                }
            }
            Ok(Plan::Passthrough(_)) => prop_assert!(false, "{} passed through", sql),
            // a refusal builds no SQL at all
            Err(_) => {}
        }
    }
}

/// Every golden statement that plans: each target's SQL is one statement.
#[test]
fn every_rewritten_golden_statement_is_one_statement() {
    let w = golden_cases::World::new();
    let mut checked = 0;
    for c in golden_cases::load() {
        let params: Vec<shardgate_router::Param<'_>> = c.params.iter().map(|p| p.as_deref().map_or(shardgate_router::Param::Null, shardgate_router::Param::Text)).collect();
        let topo = if c.file == "ids.txt" { &w.topo_route_by_id } else { &w.topo };
        if let Ok(Plan::Routed(r)) = shardgate_router::plan(&c.sql, &params, topo, &w.ctx()) {
            for t in &r.targets {
                assert_eq!(parse(&t.sql).len(), 1, "{}: {} became {}", c.name, c.sql, t.sql);
                checked += 1;
            }
        }
    }
    assert!(checked > 300, "only {checked} target statements checked");
}

/// `sql` is refused with 0A000, not planned.
fn assert_refused(w: &golden_cases::World, sql: &str) {
    match shardgate_router::plan(sql, &[], &w.topo, &w.ctx()) {
        Err(e) => assert_eq!(e.sqlstate(), "0A000", "{sql}: {e}"),
        Ok(Plan::Routed(r)) => panic!("{sql} was sent on as {}", r.targets[0].sql),
        Ok(p) => panic!("{sql}: {p:?}"),
    }
}

/// Literal and type forms sqlparser prints differently from how it read them
/// (found by review): each is refused, never sent on changed.
#[test]
fn forms_sqlparser_cannot_print_exactly_are_refused() {
    let w = golden_cases::World::new();
    for sql in [
        // a quoted type modifier loses its quotes: `''::bpchar(1) OR (true)` on the shard
        "DELETE FROM t_order WHERE merchant_id = 1 AND create_time >= '2026-11-01' AND pay_status = ''::bpchar('1) OR (true')",
        // X'…' / B'…' print their raw value: `X'a' = X'a' OR true --'` on the shard
        "DELETE FROM t_order WHERE merchant_id = 1 AND create_time >= '2026-11-01' AND X'a\\' = X\\'a\\' OR true --'",
        "DELETE FROM t_order WHERE merchant_id = 1 AND create_time >= '2026-11-01' AND B'1'' = B''1'' OR true --'",
        // a decoded value spelling a template hole
        "SELECT id FROM t_order WHERE merchant_id = 1 AND order_no = E'\\x5f_sg_hole_t__'",
    ] {
        assert_refused(&w, sql);
    }
    // a literal holding quotes and backslashes goes dollar-quoted, the same value
    let sql = "SELECT id FROM t_order WHERE merchant_id = 1 AND pay_status = 'it''s \\ $sg$'";
    let Ok(Plan::Routed(r)) = shardgate_router::plan(sql, &[], &w.topo, &w.ctx()) else { panic!("{sql} not routed") };
    assert!(r.targets[0].sql.contains("$sg1$it's \\ $sg$$sg1$"), "{}", r.targets[0].sql);
}

/// Functions that change the session of the shard connection (which other
/// clients use next) are refused wherever they stand, however they are named.
#[test]
fn functions_that_change_the_shard_session_are_refused() {
    let w = golden_cases::World::new();
    for sql in [
        "SELECT set_config('standard_conforming_strings', 'off', false) FROM t_order WHERE merchant_id = 1",
        "SELECT id FROM t_order WHERE merchant_id = 1 AND set_config('search_path', 'evil', true) IS NOT NULL",
        "SELECT pg_catalog.set_config('search_path', 'evil', false) FROM t_order WHERE merchant_id = 1",
        "SELECT \"set_config\"('search_path', 'evil', false) FROM t_order WHERE merchant_id = 1",
        "SELECT SET_CONFIG('search_path', 'evil', false) FROM t_order WHERE merchant_id = 1",
        "UPDATE t_order SET pay_status = set_config('a.b', 'c', false) WHERE merchant_id = 1 AND create_time >= '2026-11-01'",
        "SELECT pg_advisory_lock(id) FROM t_order WHERE merchant_id = 1",
        "SELECT pg_try_advisory_lock_shared(1) FROM t_order WHERE merchant_id = 1",
        "SELECT pg_advisory_unlock_all() FROM t_order WHERE merchant_id = 1",
        "SELECT count(*) FROM t_order WHERE merchant_id = 1 AND id IN (SELECT pg_advisory_lock(2))",
        // in FROM, as a table function (found by review)
        "SELECT o.id FROM t_order o, set_config('standard_conforming_strings', 'off', false) s WHERE o.merchant_id = 1",
        "SELECT o.id FROM t_order o, LATERAL pg_advisory_lock(o.id) l WHERE o.merchant_id = 1",
        "WITH c AS (SELECT * FROM set_config('TimeZone', 'Asia/Kathmandu', false)) SELECT o.id FROM t_order o, c WHERE o.merchant_id = 1",
        "SELECT o.id FROM t_order o WHERE o.merchant_id = 1 AND EXISTS (SELECT 1 FROM pg_catalog.set_config('a.b', 'c', false))",
        "INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES ((SELECT 1 FROM set_config('a.b', 'c', false)), 'x', 1, '2026-11-02')",
        "SELECT o.id, a.* FROM t_order o, pg_stat_get_activity(NULL) a WHERE o.merchant_id = 1",
        // other sessions of the shard role
        "SELECT pg_terminate_backend(pg_backend_pid() - 1) FROM t_order WHERE merchant_id = 1",
        "SELECT pg_cancel_backend(1) FROM t_order WHERE merchant_id = 1",
        "SELECT pg_stat_get_backend_activity(2) FROM t_order WHERE merchant_id = 1",
        "SELECT lastval() FROM t_order WHERE merchant_id = 1",
        "SELECT setseed(0) FROM t_order WHERE merchant_id = 1",
        "SELECT currval('s') FROM t_order WHERE merchant_id = 1",
    ] {
        assert_refused(&w, sql);
    }
    // a catalog view beside the sharded table is another table: refused as ever
    let sql = "SELECT o.id, a.query FROM t_order o, pg_stat_activity a WHERE o.merchant_id = 1";
    assert!(shardgate_router::plan(sql, &[], &w.topo, &w.ctx()).is_err(), "{sql}");
    // transaction-scoped locks end with the shard's transaction, and functions of their
    // arguments in FROM read nothing of the server: allowed
    for sql in [
        "SELECT pg_advisory_xact_lock(1) FROM t_order WHERE merchant_id = 1",
        "SELECT o.id, g FROM t_order o, generate_series(1, 3) g WHERE o.merchant_id = 1",
        "SELECT o.id, u FROM t_order o, unnest(ARRAY[1, 2]) u WHERE o.merchant_id = 1",
        "SELECT o.id, k FROM t_order o, LATERAL jsonb_object_keys('{\"a\": 1}'::jsonb) k WHERE o.merchant_id = 1",
        "SELECT o.id, g.n FROM t_order o, pg_catalog.generate_series(1, 2) WITH ORDINALITY g(v, n) WHERE o.merchant_id = 1",
    ] {
        assert!(matches!(shardgate_router::plan(sql, &[], &w.topo, &w.ctx()), Ok(Plan::Routed(_))), "{sql}");
    }
}
