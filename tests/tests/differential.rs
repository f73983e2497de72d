//! Differential test: the same workload against one plain PostgreSQL table
//! and through shardgate (8 shards, month tables). Rows, column names and
//! types, row counts and SQLSTATEs must be equal — with tokio-postgres
//! (simple and extended protocol, binary results) and with psycopg 3 and
//! asyncpg (tests/python/differential.py).

use std::process::Command;

use postgres_types::ToSql;
use shardgate_tests::workload::{self, Step, Value};
use shardgate_tests::{connect, month_tables, sqlstate, Cluster, Options, Raw};
use tokio_postgres::{Client, SimpleQueryMessage};


/// What a statement answered.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Rows { cols: Vec<String>, types: Vec<u32>, rows: Vec<Vec<Option<Vec<u8>>>> },
    Count(u64),
    Error(String),
}

fn params(p: &[Value]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    p.iter()
        .map(|v| -> Box<dyn ToSql + Sync + Send> {
            match v {
                Value::Int(i) => Box::new(*i),
                Value::Text(t) => Box::new(t.clone()),
            }
        })
        .collect()
}

fn drop_ignored(cols: &[String], ignore: &[String], row: Vec<Option<Vec<u8>>>) -> Vec<Option<Vec<u8>>> {
    row.into_iter().zip(cols).filter(|(_, c)| !ignore.contains(c)).map(|(v, _)| v).collect()
}

async fn extended(client: &Client, s: &Step) -> Outcome {
    let owned = params(&s.params);
    let refs: Vec<&(dyn ToSql + Sync)> = owned.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect();
    let returns_rows = s.sql.trim_start().to_ascii_uppercase().starts_with("SELECT") || s.sql.contains("RETURNING");
    if !returns_rows {
        return match client.execute(s.sql.as_str(), &refs).await {
            Ok(n) => Outcome::Count(n),
            Err(e) => Outcome::Error(sqlstate(&e).unwrap_or_else(|| format!("no sqlstate: {e}"))),
        };
    }
    match client.prepare(&s.sql).await {
        Err(e) => Outcome::Error(sqlstate(&e).unwrap_or_else(|| format!("no sqlstate: {e}"))),
        Ok(stmt) => {
            let cols: Vec<String> = stmt.columns().iter().map(|c| c.name().to_string()).collect();
            let types: Vec<u32> = stmt.columns().iter().map(|c| c.type_().oid()).collect();
            match client.query(&stmt, &refs).await {
                Err(e) => Outcome::Error(sqlstate(&e).unwrap_or_else(|| format!("no sqlstate: {e}"))),
                Ok(rows) => {
                    let mut out: Vec<Vec<Option<Vec<u8>>>> =
                        rows.iter().map(|r| drop_ignored(&cols, &s.ignore, (0..r.len()).map(|i| r.get::<_, Raw>(i).0).collect())).collect();
                    if !s.ordered {
                        out.sort();
                    }
                    let kept: Vec<String> = cols.iter().filter(|c| !s.ignore.contains(c)).cloned().collect();
                    Outcome::Rows { cols: kept, types, rows: out }
                }
            }
        }
    }
}

async fn simple(client: &Client, s: &Step) -> Outcome {
    match client.simple_query(&s.sql).await {
        Err(e) => Outcome::Error(sqlstate(&e).unwrap_or_else(|| format!("no sqlstate: {e}"))),
        Ok(msgs) => {
            let mut cols = Vec::new();
            let mut rows = Vec::new();
            let mut count = 0;
            let mut saw_rows = false;
            for m in msgs {
                match m {
                    SimpleQueryMessage::RowDescription(d) => {
                        saw_rows = true;
                        cols = d.iter().map(|c| c.name().to_string()).collect();
                    }
                    SimpleQueryMessage::Row(r) => {
                        saw_rows = true;
                        let values = (0..r.len()).map(|i| r.get(i).map(|v| v.as_bytes().to_vec())).collect();
                        rows.push(drop_ignored(&cols, &s.ignore, values));
                    }
                    SimpleQueryMessage::CommandComplete(n) => count = n,
                    _ => {}
                }
            }
            if !saw_rows {
                return Outcome::Count(count);
            }
            if !s.ordered {
                rows.sort();
            }
            let kept: Vec<String> = cols.iter().filter(|c| !s.ignore.contains(c)).cloned().collect();
            // the command tag's count must match the rows too
            rows.push(vec![Some(count.to_string().into_bytes())]);
            Outcome::Rows { cols: kept, types: Vec::new(), rows }
        }
    }
}

async fn run_step(client: &Client, s: &Step, use_simple: bool) -> Vec<Outcome> {
    if s.tx.is_empty() {
        return vec![if use_simple { simple(client, s).await } else { extended(client, s).await }];
    }
    let mut out = Vec::new();
    out.push(match client.batch_execute("BEGIN").await {
        Ok(()) => Outcome::Count(0),
        Err(e) => Outcome::Error(sqlstate(&e).unwrap_or_default()),
    });
    for inner in &s.tx {
        out.push(if use_simple { simple(client, inner).await } else { extended(client, inner).await });
    }
    out.push(simple(client, &workload_step(&s.tx_end)).await);
    out
}

fn workload_step(sql: &str) -> Step {
    Step { sql: sql.into(), params: Vec::new(), ordered: false, ignore: Vec::new(), error: None, tx: Vec::new(), tx_end: String::new() }
}

async fn reset_and_load(reference: &Client, proxy: &Client) {
    reference.batch_execute("DELETE FROM t_order").await.expect("reset reference");
    proxy.batch_execute("DELETE FROM t_order").await.expect("reset through shardgate");
    for sql in workload::load() {
        reference.batch_execute(&sql).await.expect("load reference");
        proxy.batch_execute(&sql).await.expect("load through shardgate");
    }
}

/// Expected outcome checks that keep the comparison from passing vacuously.
fn check_expected(s: &Step, got: &[Outcome], pass: &str) {
    let inner: Vec<&Step> = if s.tx.is_empty() { vec![s] } else { s.tx.iter().collect() };
    let offset = usize::from(!s.tx.is_empty());
    for (i, st) in inner.iter().enumerate() {
        match (&st.error, &got[i + offset]) {
            (Some(code), Outcome::Error(c)) => assert_eq!(c, code, "{pass}: {}", st.sql),
            (Some(code), other) => panic!("{pass}: {} should fail with {code}, got {other:?}", st.sql),
            (None, Outcome::Error(c)) => panic!("{pass}: {} failed with {c}", st.sql),
            (None, _) => {}
        }
    }
}

fn start() -> Cluster {
    let c = Cluster::start_temp(Options { all_clusters: true, redis: false, proxy: true, ..Options::default() }).expect("start cluster");
    // the plain table numbers rows that omit the id itself (compared without it)
    c.create_reference(true).expect("reference db");
    c
}

fn reference_dsn(c: &Cluster) -> String {
    c.info.default_dsn.replace("/db_default", "/reference")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_simple_and_extended_answer_like_one_table() {
    let c = start();
    let reference = connect(&reference_dsn(&c)).await.expect("reference");
    let proxy = connect(&c.info.proxy_dsn).await.expect("proxy");
    let steps = workload::steps();
    assert!(steps.len() >= 40, "at least 40 statements");
    let mut compared = 0;
    for use_simple in [true, false] {
        let pass = if use_simple { "simple" } else { "extended" };
        reset_and_load(&reference, &proxy).await;
        for s in &steps {
            if use_simple && !s.params.is_empty() {
                continue;
            }
            let want = run_step(&reference, s, use_simple).await;
            let got = run_step(&proxy, s, use_simple).await;
            check_expected(s, &want, &format!("{pass} reference"));
            assert_eq!(got, want, "{pass}: {}{:?}", s.sql, s.tx.iter().map(|t| &t.sql).collect::<Vec<_>>());
            compared += got.len();
        }
    }
    assert!(compared > 100, "compared {compared} answers");
    // rows landed in db_{merchant_id % 8}.t_order_{yyyyMM} and nowhere else
    let total: i64 = reference.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    let mut placed = 0i64;
    for (n, dsn) in c.info.shards.iter().enumerate() {
        let shard = connect(dsn).await.expect("shard");
        let template: i64 = shard.query_one("SELECT count(*) FROM t_order", &[]).await.expect("template").get(0);
        assert_eq!(template, 0, "db_{n}: the template table stays empty");
        let tables = month_tables(&shard).await;
        assert!(tables.len() >= 6, "db_{n} has month tables for the workload's six months");
        for name in tables {
            let month = &name["t_order_".len()..];
            let q = format!(
                "SELECT count(*), count(*) FILTER (WHERE merchant_id % 8 <> {n}), count(*) FILTER (WHERE to_char(create_time AT TIME ZONE 'UTC', 'YYYYMM') <> '{month}') FROM {name}"
            );
            let row = shard.query_one(q.as_str(), &[]).await.expect("placement");
            let (count, wrong_shard, wrong_month): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            assert_eq!((wrong_shard, wrong_month), (0, 0), "db_{n}.{name}: rows on the wrong shard or month");
            placed += count;
        }
    }
    assert_eq!(placed, total, "every row is on exactly one shard");
}

#[test]
fn python_clients_answer_like_one_table() {
    let c = start();
    let dir = tempfile::tempdir().expect("tmp");
    let wl = dir.path().join("workload.json");
    let json = serde_json::json!({ "load": workload::load(), "steps": workload::steps() });
    std::fs::write(&wl, serde_json::to_vec(&json).expect("json")).expect("write workload");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/differential.py");
    let out = Command::new("python3").arg(script).arg(&wl).arg(reference_dsn(&c)).arg(&c.info.proxy_dsn).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python differential failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for mode in ["psycopg-server", "psycopg-client", "psycopg-prepared", "psycopg-pipeline", "asyncpg"] {
        assert!(stdout.contains(&format!("{mode}: ok")), "{mode} did not run:\n{stdout}");
    }
}
