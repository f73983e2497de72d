//! Statements whose expression trees nest deeply. sqlparser builds a chain of
//! binary operators (`1 + 1 + …`) as a left-deep tree without recursing, but
//! cloning, visiting and dropping it recurse once per operator: before the
//! depth bound, `WHERE merchant_id = 1+1+…` with 10,000 terms (20 KB of SQL)
//! overflowed the stack and aborted the whole proxy.
//!
//! Each statement here is planned on a thread with the stack the proxy gives
//! its workers (`PLANNING_STACK`), in whatever profile the tests are built
//! (debug in CI, the deepest frames). Just under the bound it must plan; just
//! over it, it must be refused with 54001 (sharded) or passed to the server.

#[path = "common/golden_cases.rs"]
mod golden_cases;

use golden_cases::World;
use shardgate_router::cache::{classify, CachedTable};
use shardgate_router::{Param, Plan, StatementClass};

/// Tokens of each shape outside its chain, and the chain's tokens per level
/// (`+1` is two tokens: the cheapest level there is).
fn chain(levels: usize) -> String {
    format!("1{}", "+1".repeat(levels))
}

/// `(name, statement)` with a chain of `levels` operators where each kind of
/// statement walks it hardest.
fn shapes(levels: usize) -> Vec<(&'static str, String)> {
    let c = chain(levels);
    vec![
        ("where of a single-shard select", format!("SELECT * FROM t_order WHERE merchant_id = 7 AND order_amount = {c}")),
        ("shard key from the chain (scatter)", format!("SELECT * FROM t_order WHERE merchant_id = {c}")),
        ("merged ORDER BY and LIMIT", format!("SELECT id, {c} AS x FROM t_order ORDER BY x LIMIT 5")),
        ("merged aggregate", format!("SELECT avg({c}) FROM t_order")),
        ("insert value", format!("INSERT INTO t_order (merchant_id, order_no, order_amount) VALUES (3, 'o', {c})")),
        ("update", format!("UPDATE t_order SET order_amount = {c} WHERE merchant_id = 3")),
        ("delete", format!("DELETE FROM t_order WHERE merchant_id = 3 AND order_amount = {c}")),
        ("unsharded table", format!("SELECT * FROM merchant WHERE id = {c}")),
        ("no table", format!("SELECT {c}")),
        ("parenthesised chain", format!("SELECT * FROM t_order WHERE merchant_id = 7 AND order_amount = ({})", chain(levels - 2))),
    ]
}

fn on_worker_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(shardgate_router::PLANNING_STACK).spawn(f).expect("spawn").join().expect("planning thread")
}

#[test]
fn statements_just_under_the_bound_plan_on_the_proxys_worker_stack() {
    // 1,500 tokens: a 1,480-token chain plus each shape's own tokens stays under for the longest shape.
    for (name, sql) in shapes(730) {
        let out = on_worker_stack(move || {
            let w = World::new();
            w.topo.tables.len(); // the world is built on this stack too
            shardgate_router::plan(&sql, &[] as &[Param<'_>], &w.topo, &w.ctx()).map(|p| matches!(p, Plan::Routed(_) | Plan::Passthrough(_)))
        });
        match out {
            Ok(true) => {}
            Ok(false) => panic!("{name}: unexpected plan"),
            Err(e) => assert_ne!(e.sqlstate(), "54001", "{name}: refused under the bound: {e}"),
        }
        let tables = vec![CachedTable { name: "merchant".into(), key: "id".into() }];
        let sql = shapes(730).into_iter().find(|(n, _)| *n == name).expect("shape").1;
        on_worker_stack(move || drop(classify(&sql, &tables)));
    }
}

#[test]
fn statements_over_the_bound_are_refused_or_left_to_the_server() {
    // 10,000 operators crashed the process before; the bound refuses them before sqlparser sees them.
    for levels in [760, 10_000, 200_000] {
        for (name, sql) in shapes(levels) {
            let sharded = sql.contains("t_order");
            let tables = vec![CachedTable { name: "merchant".into(), key: "id".into() }];
            let (planned, cached) = on_worker_stack(move || {
                let w = World::new();
                let p = shardgate_router::plan(&sql, &[] as &[Param<'_>], &w.topo, &w.ctx());
                (p, classify(&sql, &tables))
            });
            if sharded {
                let e = planned.expect_err(name);
                assert_eq!(e.sqlstate(), "54001", "{name} ({levels}): {e}");
                assert!(e.to_string().contains("IN (…) or = ANY($1)"), "{e}");
            } else {
                assert_eq!(planned.expect(name), Plan::Passthrough(StatementClass::Other), "{name} ({levels})");
            }
            // the cache cannot read a key out of it: it may write the whole table
            assert!(cached.read.is_none(), "{name}");
            if name == "unsharded table" {
                assert!(cached.writes.iter().any(|w| w.table == 0 && w.keys.is_none()), "{name}: {:?}", cached.writes);
            }
        }
    }
}
