//! Router cost: `plan()` uncached (parse + analyse + render) and cached with
//! new bind values, and id generation. Targets (issue: router): uncached
//! ≤ 15 µs, cached ≤ 2 µs, ids ≥ 1 M/s on one core.
//!
//! `simple_protocol`: a simple-protocol statement (values as literals) planned
//! by a full parse of its text, beside the shape path (literals taken out,
//! the shape's cached analysis, the literals put back into each target).
//!
//! Run: `cargo bench -p shardgate-router --bench plan`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use jiff::Timestamp;
use shardgate_router::id::{IdGenerator, SystemClock};
use shardgate_router::keys::ShardId;
use shardgate_router::month::MonthKey;
use shardgate_router::{Context, Param, Router, Topology};

const STATEMENTS: [(&str, &str); 4] = [
    ("point_select", "SELECT id, order_no, order_amount, pay_status FROM t_order WHERE merchant_id = $1 AND create_time >= $2 AND create_time < $3"),
    ("insert_generated_id", "INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, $3, $4, $5) RETURNING id"),
    ("update_status", "UPDATE t_order SET pay_status = $1 WHERE merchant_id = $2 AND create_time = $3 AND order_no = $4"),
    ("scatter_page", "SELECT id, merchant_id, order_amount FROM t_order WHERE create_time >= $1 ORDER BY create_time DESC LIMIT $2"),
];

fn params(name: &str, i: u64) -> Vec<String> {
    let m = (i % 1000).to_string();
    match name {
        "point_select" => vec![m, "2026-11-01".into(), "2026-12-01".into()],
        "insert_generated_id" => vec![format!("O-{i}"), m, "12.50".into(), "NEW".into(), "2026-11-20 10:00:00+00".into()],
        "update_status" => vec!["PAID".into(), m, "2026-11-20 10:00:00+00".into(), format!("O-{i}")],
        _ => vec!["2026-11-01".into(), "20".into()],
    }
}

fn bench(c: &mut Criterion) {
    let topo = Topology::example();
    let months: Vec<MonthKey> = (1..=12).filter_map(|m| MonthKey::new(2026, m)).collect();
    let ids = IdGenerator::new(topo.ids.clone(), 1, 50, Box::new(SystemClock), 0).expect("ids");
    let now = Timestamp::from_second(1_795_341_600).expect("now");
    let ctx = Context { now, months: &months, ids: Some(&ids), zone: Default::default(), lookups: &[] };

    // Baseline measured in the same run: sqlparser parse + print alone.
    let mut g = c.benchmark_group("baseline_parse_print");
    for (name, sql) in STATEMENTS {
        g.bench_function(name, |b| {
            b.iter(|| {
                let s = sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, black_box(sql)).expect("parse");
                black_box(s[0].to_string())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("plan_uncached");
    for (name, sql) in STATEMENTS {
        let p = params(name, 7);
        g.bench_function(name, |b| {
            b.iter(|| {
                let binds: Vec<Param<'_>> = p.iter().map(|s| Param::Text(s)).collect();
                black_box(shardgate_router::plan(black_box(sql), &binds, &topo, &ctx).expect("plan"))
            })
        });
    }
    g.finish();

    let router = Router::new(topo.clone(), shardgate_router::CACHE_BYTES);
    let mut g = c.benchmark_group("plan_cached_new_binds");
    for (name, sql) in STATEMENTS {
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    i += 1;
                    params(name, i)
                },
                |p| {
                    let binds: Vec<Param<'_>> = p.iter().map(|s| Param::Text(s)).collect();
                    black_box(router.plan(black_box(sql), &binds, &ctx).expect("plan"))
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // simple protocol: the same statements with their values as literals, new values each time
    let literal_text = |name: &str, i: u64| -> String {
        let mut sql = STATEMENTS.iter().find(|(n, _)| *n == name).map(|(_, s)| s.to_string()).unwrap_or_default();
        for (k, v) in params(name, i).iter().enumerate().rev() {
            let lit = if v.bytes().all(|b| b.is_ascii_digit()) { v.clone() } else { format!("'{v}'") };
            sql = sql.replace(&format!("${}", k + 1), &lit);
        }
        sql
    };
    let mut g = c.benchmark_group("simple_protocol");
    for (name, _) in STATEMENTS {
        let mut i = 0u64;
        g.bench_function(format!("{name}/full_parse"), |b| {
            b.iter_batched(
                || {
                    i += 1;
                    literal_text(name, i)
                },
                |sql| black_box(router.analysis_uncached(black_box(&sql)).plan(&[], &topo, &ctx).expect("plan")),
                BatchSize::SmallInput,
            )
        });
        let mut i = 0u64;
        g.bench_function(format!("{name}/shape"), |b| {
            b.iter_batched(
                || {
                    i += 1;
                    literal_text(name, i)
                },
                |sql| {
                    let (a, s) = router.shaped_analysis(black_box(&sql)).expect("shaped");
                    let plan = a.plan(&s.params(), &topo, &ctx).expect("plan");
                    let shardgate_router::Plan::Routed(r) = plan else { panic!("not routed") };
                    let texts: Vec<String> = r
                        .targets
                        .iter()
                        .map(|t| shardgate_router::shape::splice(&t.sql, t.params.as_deref(), &t.extra, &sql, &s).expect("splice"))
                        .collect();
                    black_box(texts)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    let mut g = c.benchmark_group("ids");
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_thread", |b| b.iter(|| black_box(ids.next(ShardId(3), false).expect("id"))));
    g.finish();

    let shared = Arc::new(IdGenerator::new(topo.ids.clone(), 2, 50, Box::new(SystemClock), 0).expect("ids"));
    let mut g = c.benchmark_group("ids_8_threads");
    const PER_THREAD: u64 = 20_000;
    g.throughput(Throughput::Elements(8 * PER_THREAD));
    g.sample_size(20);
    g.bench_function("8x20k_same_shard", |b| {
        b.iter(|| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let s = shared.clone();
                    std::thread::spawn(move || {
                        for _ in 0..PER_THREAD {
                            black_box(s.next(ShardId(1), false).expect("id"));
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("thread");
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
