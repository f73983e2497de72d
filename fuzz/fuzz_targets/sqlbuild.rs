//! The SQL shardgate builds never becomes more than the one intended
//! statement: any text through the quoting helper is one literal (or one
//! identifier), and any single statement on t_order the router rewrites is one
//! statement per target. The property tests in router/tests/sql_building.rs
//! check the same on generated input in CI.
#![no_main]

use std::ops::ControlFlow;

use libfuzzer_sys::fuzz_target;
use shardgate_router::quote::{ident, literal};
use shardgate_router::Plan;
use sqlparser::ast::{visit_expressions, Expr, Statement, Value};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

#[path = "world.rs"]
mod world;
use world::world;

fn parse(sql: &str) -> Vec<Statement> {
    Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap_or_else(|e| panic!("{sql:?} does not parse: {e}"))
}

fn string_literals(stmt: &Statement) -> Vec<String> {
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

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // 1. the quoting helper
    let stmts = parse(&format!("SELECT {}", literal(text)));
    assert_eq!(stmts.len(), 1);
    assert_eq!(string_literals(&stmts[0]), vec![text.to_string()]);
    if !text.is_empty() {
        assert_eq!(parse(&format!("SELECT 1 AS {}", ident(text))).len(), 1);
    }
    // 2. a client literal inside a routed statement
    let w = world();
    let ctx = w.ctx();
    let sql = format!("DELETE FROM t_order WHERE merchant_id = 3 AND pay_status = {}", literal(text));
    if let Ok(Plan::Routed(r)) = shardgate_router::plan(&sql, &[], &w.topo, &ctx) {
        for t in &r.targets {
            let stmts = parse(&t.sql);
            assert_eq!(stmts.len(), 1, "{sql} became {}", t.sql);
            assert_eq!(string_literals(&stmts[0]), vec![text.to_string()], "{sql} became {}", t.sql);
        }
    }
    // 3. the input itself as a statement: if it is one statement, each target is one
    if let Ok(parsed) = Parser::parse_sql(&PostgreSqlDialect {}, text) {
        if parsed.len() == 1 {
            if let Ok(Plan::Routed(r)) = shardgate_router::plan(text, &[], &w.topo, &ctx) {
                for t in &r.targets {
                    assert_eq!(parse(&t.sql).len(), 1, "{text} became {}", t.sql);
                }
            }
        }
    }
});
