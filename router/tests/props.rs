//! Property tests over whole plans: a split INSERT keeps every row exactly
//! once on its own shard and month table, and a SELECT never routes away from
//! a row that satisfies its WHERE clause.

#[path = "common/golden_cases.rs"]
mod golden_cases;

use jiff::{tz::TimeZone, Timestamp};
use proptest::prelude::*;
use shardgate_router::keys::{shard_of, MerchantId};
use shardgate_router::month::MonthKey;
use shardgate_router::{Param, Plan};
use sqlparser::ast::{Expr, SetExpr, Statement, Value};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// 2026-09-01 .. 2027-02-01 (the golden world's months) in seconds.
const LO: i64 = 1_788_220_800;
const HI: i64 = 1_801_440_000;

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).expect("ts")
}

/// `(order_no, merchant, time)` of every VALUES row of a printed INSERT, with `$n` resolved through `params`.
fn rows_of(sql: &str, params: &[String]) -> (String, Vec<(String, i64, String)>) {
    let stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql).expect("rewritten INSERT parses").remove(0);
    let Statement::Insert(ins) = stmt else { panic!("not an insert: {sql}") };
    let table = ins.table.to_string();
    let cols: Vec<String> = ins.columns.iter().map(|c| c.to_string()).collect();
    let Some(SetExpr::Values(v)) = ins.source.map(|s| *s.body) else { panic!("no VALUES") };
    let val = |e: &Expr| -> String {
        match e {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) => s.clone(),
                Value::Number(n, _) => n.clone(),
                Value::Placeholder(p) => params[p[1..].parse::<usize>().expect("n") - 1].clone(),
                other => panic!("{other:?}"),
            },
            Expr::UnaryOp { expr, .. } => format!("-{}", match expr.as_ref() {
                Expr::Value(v) => v.to_string(),
                other => panic!("{other:?}"),
            }),
            other => panic!("{other:?}"),
        }
    };
    let pos = |c: &str| cols.iter().position(|x| x == c).expect("column");
    let rows = v
        .rows
        .iter()
        .map(|r| (val(&r[pos("order_no")]), val(&r[pos("merchant_id")]).parse().expect("int"), val(&r[pos("create_time")])))
        .collect();
    (table, rows)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn split_insert_keeps_every_row_exactly_once(
        rows in prop::collection::vec((any::<i64>(), LO..HI), 1..40),
        use_params: bool,
    ) {
        let world = golden_cases::World::new();
        let tz = TimeZone::UTC;
        let mut sql = String::from("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ");
        let mut params: Vec<String> = Vec::new();
        for (i, (m, t)) in rows.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            let time = ts(*t).to_string();
            if use_params {
                let n = params.len();
                sql.push_str(&format!("(${}, ${}, ${})", n + 1, n + 2, n + 3));
                params.extend([format!("r{i}"), m.to_string(), time]);
            } else {
                sql.push_str(&format!("('r{i}', {m}, '{time}')"));
            }
        }
        let binds: Vec<Param<'_>> = params.iter().map(|p| Param::Text(p)).collect();
        let Plan::Routed(r) = shardgate_router::plan(&sql, &binds, &world.topo, &world.ctx()).expect("plan") else { panic!("not routed") };
        let mut seen = vec![0u32; rows.len()];
        for t in &r.targets {
            let mut target_params: Vec<String> = match &t.params {
                Some(map) => map.iter().map(|i| params[*i].clone()).collect(),
                None => params.clone(),
            };
            target_params.extend(t.extra.iter().cloned());
            let (table, got) = rows_of(&t.sql, &target_params);
            prop_assert_eq!(t.months.len(), 1);
            prop_assert_eq!(&table, &format!("t_order_{}", t.months[0]));
            for (no, m, time) in got {
                let i: usize = no[1..].parse().expect("row number");
                seen[i] += 1;
                prop_assert_eq!(m, rows[i].0);
                prop_assert_eq!(shard_of(MerchantId(m), 8), t.shard);
                let at: Timestamp = time.parse().expect("time");
                prop_assert_eq!(MonthKey::of(at, &tz), t.months[0]);
            }
        }
        prop_assert!(seen.iter().all(|n| *n == 1), "rows seen {:?}", seen);
        prop_assert_eq!(r.generated_ids.len(), rows.len());
    }

    #[test]
    fn select_never_misses_a_matching_row(
        m in any::<i64>(),
        t in LO..HI,
        other_m in any::<i64>(),
        lo_back in 0i64..10_000_000,
        hi_ahead in 1i64..10_000_000,
        shape in 0u8..6,
    ) {
        let world = golden_cases::World::new();
        let tz = TimeZone::UTC;
        let row_time = ts(t);
        let lo = ts(t - lo_back).to_string();
        let hi = ts(t + hi_ahead).to_string();
        // Each WHERE clause is satisfied by the row (m, row_time).
        let sql = match shape {
            0 => format!("SELECT id FROM t_order WHERE merchant_id = {m} AND create_time >= '{lo}' AND create_time < '{hi}'"),
            1 => format!("SELECT id FROM t_order WHERE merchant_id IN ({other_m}, {m}) AND create_time BETWEEN '{lo}' AND '{hi}'"),
            2 => format!("SELECT id FROM t_order WHERE (merchant_id = {other_m} OR create_time > '{lo}') AND create_time <= '{hi}'"),
            3 => "SELECT id FROM t_order WHERE merchant_id = ANY($1) AND create_time > $2".to_string(),
            4 => format!("SELECT id FROM t_order WHERE create_time = '{}' OR merchant_id = {other_m}", row_time),
            _ => format!("SELECT count(*) FROM t_order WHERE NOT (merchant_id = {other_m}) AND create_time < '{hi}'"),
        };
        let arr = format!("{{{other_m},{m}}}");
        let lo_minus = ts(t - lo_back - 1).to_string();
        let params: Vec<Param<'_>> = if shape == 3 { vec![Param::Text(&arr), Param::Text(&lo_minus)] } else { vec![] };
        let Plan::Routed(r) = shardgate_router::plan(&sql, &params, &world.topo, &world.ctx()).expect("plan") else { panic!("not routed") };
        let want_shard = shard_of(MerchantId(m), 8);
        let want_month = MonthKey::of(row_time, &tz);
        prop_assert!(
            r.targets.iter().any(|x| x.shard == want_shard && x.months.contains(&want_month)),
            "row ({m}, {row_time}) on {want_shard}/{want_month} missed by {sql}: {r:?}"
        );
    }
}

#[test]
fn binary_bind_values_route_like_text() {
    let world = golden_cases::World::new();
    let sql = "SELECT id FROM t_order WHERE merchant_id = $1 AND create_time >= $2";
    // 2027-01-05T00:00:00Z as microseconds since 2000-01-01.
    let micros: i64 = (1_799_107_200 - 946_684_800) * 1_000_000;
    let m8 = 13i64.to_be_bytes();
    let m4 = 13i32.to_be_bytes();
    let t = micros.to_be_bytes();
    let expect = |p: &[Param<'_>]| {
        let Plan::Routed(r) = shardgate_router::plan(sql, p, &world.topo, &world.ctx()).expect("plan") else { panic!() };
        assert_eq!(r.targets.len(), 1);
        assert_eq!(r.targets[0].shard.0, 5);
        assert_eq!(r.targets[0].months.iter().map(|m| m.to_string()).collect::<Vec<_>>(), ["202701"]);
    };
    expect(&[Param::Binary { oid: 20, bytes: &m8 }, Param::Binary { oid: 1184, bytes: &t }]);
    expect(&[Param::Binary { oid: 23, bytes: &m4 }, Param::Binary { oid: 0, bytes: &t }]);
    expect(&[Param::Text("13"), Param::Text("2027-01-05")]);
    // A binary int8[] array (ndim 1, no nulls, elem int8, [13, 21]).
    let mut arr = Vec::new();
    for v in [1i32, 0, 20, 2, 1] {
        arr.extend_from_slice(&v.to_be_bytes());
    }
    for v in [13i64, 21] {
        arr.extend_from_slice(&8i32.to_be_bytes());
        arr.extend_from_slice(&v.to_be_bytes());
    }
    let Plan::Routed(r) = shardgate_router::plan(
        "SELECT id FROM t_order WHERE merchant_id = ANY($1) AND create_time >= '2027-01-01'",
        &[Param::Binary { oid: 1016, bytes: &arr }],
        &world.topo,
        &world.ctx(),
    )
    .expect("plan") else { panic!() };
    assert_eq!(r.targets.iter().map(|t| t.shard.0).collect::<Vec<_>>(), [5]);
    // Truncated binary array: not decodable, so every shard (never fewer).
    let Plan::Routed(r) = shardgate_router::plan(
        "SELECT id FROM t_order WHERE merchant_id = ANY($1) AND create_time >= '2027-01-01'",
        &[Param::Binary { oid: 1016, bytes: &arr[..arr.len() - 3] }],
        &world.topo,
        &world.ctx(),
    )
    .expect("plan") else { panic!() };
    assert_eq!(r.targets.len(), 8);
}

#[test]
fn cached_router_applies_new_bind_values() {
    let world = golden_cases::World::new();
    let router = shardgate_router::Router::new(world.topo.clone(), shardgate_router::CACHE_BYTES);
    let sql = "SELECT * FROM t_order WHERE merchant_id = $1 AND create_time >= $2 AND create_time < $3";
    for (m, shard) in [("1", 1u8), ("10", 2), ("-1", 7)] {
        let Plan::Routed(r) = router.plan(sql, &[Param::Text(m), Param::Text("2026-10-01"), Param::Text("2026-11-01")], &world.ctx()).expect("plan") else { panic!() };
        assert_eq!(r.targets.len(), 1);
        assert_eq!(r.targets[0].shard.0, shard);
        assert_eq!(&*r.targets[0].sql, "SELECT * FROM t_order_202610 AS t_order WHERE merchant_id = $1 AND create_time >= $2 AND create_time < $3");
    }
}
