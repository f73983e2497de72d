//! Simple-protocol statements planned from their shape (literals taken out,
//! the analysis cached, the client's literal text put back into each shard's
//! statement) answer like one plain table. A seeded generator writes the order
//! statements with every value spelled at random: plain, dollar-quoted, `E''`
//! and `U&''` strings, strings that look like SQL or placeholders, casts,
//! typed literals, signs (`-5`, `- -5`, `+5`, `-(-5)`), parentheses. Each runs
//! on the reference table and through shardgate with the simple protocol; the
//! answers (columns, rows, tags, SQLSTATEs) must be equal, or shardgate must
//! refuse with 0A000. `SHAPE_SEED` and `SHAPE_STATEMENTS` override the run.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_tests::{connect, sqlstate, Cluster, Options};
use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Rows { cols: Vec<String>, rows: Vec<Vec<Option<String>>>, tags: Vec<u64> },
    Error(String),
}

async fn run(c: &Client, sql: &str, ordered: bool) -> Outcome {
    match c.simple_query(sql).await {
        Err(e) => Outcome::Error(sqlstate(&e).unwrap_or_else(|| format!("no sqlstate: {e}"))),
        Ok(msgs) => {
            let (mut cols, mut rows, mut tags) = (Vec::new(), Vec::new(), Vec::new());
            for m in msgs {
                match m {
                    SimpleQueryMessage::RowDescription(d) => cols = d.iter().map(|c| c.name().to_string()).collect(),
                    SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
                    SimpleQueryMessage::CommandComplete(n) => tags.push(n),
                    _ => {}
                }
            }
            if !ordered {
                rows.sort();
            }
            Outcome::Rows { cols, rows, tags }
        }
    }
}

/// A text value in one of its spellings.
fn text(r: &mut StdRng, v: &str) -> String {
    let plain = format!("'{}'", v.replace('\'', "''"));
    match r.gen_range(0..9) {
        0 | 1 => plain,
        2 if !v.contains("$$") => format!("$${v}$$"),
        3 if !v.contains("$q$") => format!("$q${v}$q$"),
        4 => format!("E'{}'", v.chars().map(|c| if c.is_ascii_alphanumeric() && r.gen_bool(0.3) { format!("\\x{:02x}", c as u32) } else if c == '\'' { "\\'".into() } else if c == '\\' { "\\\\".into() } else { c.to_string() }).collect::<String>()),
        5 => format!("{plain}::text"),
        6 => format!("{plain}::varchar"),
        7 => format!("U&'{}'", v.chars().map(|c| if c.is_ascii_alphanumeric() && r.gen_bool(0.3) { format!("\\{:04x}", c as u32) } else if c == '\'' { "''".into() } else if c == '\\' { "\\\\".into() } else { c.to_string() }).collect::<String>()),
        _ => format!("({plain})"),
    }
}

/// An integer in one of its spellings.
fn int(r: &mut StdRng, v: i64) -> String {
    let lit = if v < 0 { format!("({v})") } else { v.to_string() };
    match r.gen_range(0..10) {
        0..=2 => v.to_string(),
        3 => format!("'{v}'"),
        4 => format!("{lit}::bigint"),
        5 if v >= 0 => format!("+{v}"),
        6 => format!("-(-{lit})"),
        7 => format!("- -{lit}"),
        8 => format!("({v})"),
        _ => format!("'{v}'::int8"),
    }
}

fn amount(r: &mut StdRng) -> String {
    let cents: i64 = r.gen_range(-500..100_000);
    let v = format!("{}{}.{:02}", if cents < 0 { "-" } else { "" }, cents.abs() / 100, cents.abs() % 100);
    match r.gen_range(0..6) {
        0 | 1 => v,
        2 => format!("'{v}'"),
        3 => format!("{v}::numeric"),
        4 => format!("({v})"),
        _ => (cents.abs() / 100).to_string(),
    }
}

fn time(r: &mut StdRng) -> String {
    let (m, d, h) = (r.gen_range(10..=12), r.gen_range(1..=28), r.gen_range(0..24));
    let v = format!("2026-{m:02}-{d:02} {h:02}:{:02}:00+00", r.gen_range(0..60));
    match r.gen_range(0..7) {
        0 | 1 => format!("'{v}'"),
        2 => format!("TIMESTAMPTZ '{v}'"),
        3 => format!("'{v}'::timestamptz"),
        4 => format!("$${v}$$"),
        5 => format!("'2026-{m:02}-{d:02}'"),
        _ => format!("E'{v}'"),
    }
}

/// Order numbers: a small pool (duplicates meet the unique index), some that
/// look like SQL, placeholders or quoting.
fn order_no(r: &mut StdRng) -> String {
    const ODD: &[&str] = &["x'); DROP TABLE t_order; --", "$1", "' OR 1=1 --", "a;b", "$$", "\\x41", "it's", "-- not a comment", "/* nor this */", "E'q'", "null"];
    if r.gen_bool(0.2) {
        ODD[r.gen_range(0..ODD.len())].to_string()
    } else {
        format!("S-{}", r.gen_range(0..60))
    }
}

fn merchant(r: &mut StdRng) -> i64 {
    if r.gen_bool(0.1) {
        -r.gen_range(1..20)
    } else {
        r.gen_range(0..24)
    }
}

const COLS: &str = "order_no, merchant_id, order_amount, pay_status, create_time";

/// One statement and whether its rows come in a defined order.
fn statement(r: &mut StdRng) -> (String, bool) {
    let status = |r: &mut StdRng| {
        let s = ["PAID", "NEW", "REFUNDED", "it's paid"][r.gen_range(0..4)];
        text(r, s)
    };
    match r.gen_range(0..10) {
        0..=2 => {
            let rows: Vec<String> = (0..r.gen_range(1..4))
                .map(|_| {
                    let (no, mid, amt, st, ts) = (order_no(r), merchant(r), amount(r), status(r), time(r));
                    format!("({}, {}, {amt}, {st}, {ts})", text(r, &no), int(r, mid))
                })
                .collect();
            (format!("INSERT INTO t_order ({COLS}) VALUES {}", rows.join(", ")), false)
        }
        3 => {
            let mid = merchant(r);
            (format!("SELECT {COLS} FROM t_order WHERE merchant_id = {} ORDER BY order_no", int(r, mid)), true)
        }
        4 => {
            let no = order_no(r);
            (format!("SELECT {COLS} FROM t_order WHERE order_no = {}", text(r, &no)), false)
        }
        5 => {
            let (a, b, ts, lim) = (merchant(r), merchant(r), time(r), r.gen_range(0..6));
            (format!("SELECT {COLS} FROM t_order WHERE merchant_id IN ({}, {}) AND create_time >= {ts} ORDER BY order_no LIMIT {}", int(r, a), int(r, b), int(r, lim)), true)
        }
        6 => {
            let (t1, t2) = (time(r), time(r));
            (format!("SELECT count(*), sum(order_amount) FROM t_order WHERE create_time BETWEEN {t1} AND {t2}"), false)
        }
        7 => {
            let (no, mid) = (order_no(r), merchant(r));
            (format!("UPDATE t_order SET pay_status = {} WHERE merchant_id = {} AND order_no = {}", status(r), int(r, mid), text(r, &no)), false)
        }
        8 => {
            let (no, mid) = (order_no(r), merchant(r));
            (format!("DELETE FROM t_order WHERE order_no = {} AND merchant_id = {}", text(r, &no), int(r, mid)), false)
        }
        _ => {
            let mid = merchant(r);
            (format!("SELECT {COLS} FROM t_order WHERE merchant_id = {} AND order_amount > {} ORDER BY order_no", int(r, mid), amount(r)), true)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaped_simple_statements_answer_like_one_table() {
    let seed: u64 = std::env::var("SHAPE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261130);
    let n: usize = std::env::var("SHAPE_STATEMENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let c = Cluster::start_temp(Options { redis: false, ..Options::default() }).expect("start cluster");
    let reference = connect(&c.create_reference(true).expect("reference")).await.expect("reference");
    let proxy = connect(&c.info.proxy_dsn).await.expect("proxy");
    let mut r = StdRng::seed_from_u64(seed);
    let (mut same, mut refused, mut wrong) = (0, 0, Vec::new());
    for i in 0..n {
        let (sql, ordered) = statement(&mut r);
        // through shardgate first: a refused statement is not run on the reference either
        let got = run(&proxy, &sql, ordered).await;
        if got == Outcome::Error("0A000".into()) {
            refused += 1;
            if refused <= 12 {
                eprintln!("refused: {sql}");
            }
            continue;
        }
        let want = run(&reference, &sql, ordered).await;
        if got == want {
            same += 1;
        } else {
            wrong.push(format!("#{i} {sql}\n  reference: {want:?}\n  shardgate: {got:?}"));
            // start again from two empty tables, so each difference is one of its own
            for c in [&proxy, &reference] {
                c.batch_execute("DELETE FROM t_order").await.expect("reset");
            }
        }
    }
    // the shape path answered: most statements were planned from a cached shape
    let (_, metrics) = shardgate_tests::http_get(&format!("{}/metrics", c.info.admin_url)).expect("metrics");
    let count = |path: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("shardgate_simple_plans_total") && l.contains(&format!("path=\"{path}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let (shaped, parsed) = (count("shape"), count("parse"));
    eprintln!("seed {seed}: {n} statements, {same} same, {refused} refused, {} wrong; planned from a shape {shaped}, parsed {parsed}", wrong.len());
    assert!(shaped > parsed, "the shape path planned {shaped}, the full parse {parsed}");
    // each statement is counted once, by the way it was finally planned
    assert!(shaped + parsed <= n as u64, "{shaped} + {parsed} plans counted for {n} statements");
    assert!(wrong.is_empty(), "seed {seed}: {} of {n} answers differ:\n{}", wrong.len(), wrong.iter().take(10).cloned().collect::<Vec<_>>().join("\n"));
    // and the tables hold the same rows at the end
    let all = format!("SELECT {COLS} FROM t_order");
    assert_eq!(run(&proxy, &all, false).await, run(&reference, &all, false).await, "final contents differ (seed {seed})");
    assert!(refused * 10 < n, "seed {seed}: {refused} of {n} refused");
}

/// Texts whose shape would read differently from the text, or which the
/// router can plan from the text but not from the shape: each answers as one
/// table does (found by a review of the shape path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_the_shape_cannot_stand_for_answer_like_one_table() {
    let c = Cluster::start_temp(Options { redis: false, ..Options::default() }).expect("start cluster");
    let reference = connect(&c.create_reference(true).expect("reference")).await.expect("reference");
    let proxy = connect(&c.info.proxy_dsn).await.expect("proxy");
    let rows = format!(
        "INSERT INTO t_order ({COLS}) VALUES ('A-1', 7, 1.00, 'NEW', '2026-11-05 10:00+00'), ('A-2', 5, 2.00, 'PAID', '2026-11-06 10:00+00'), ('A-3', 5, 3.00, 'NEW', '2026-10-06 10:00+00'), ('A-4', 13, 4.00, 'NEW', '2026-11-07 10:00+00')"
    );
    for c in [&proxy, &reference] {
        c.batch_execute(&rows).await.expect("rows");
    }
    for (sql, ordered) in [
        // glued to the next word: `$1FROM` would be one placeholder and the statement lose its FROM
        ("SELECT order_no, order_no = 'A-1'FROM t_order WHERE merchant_id = 7", false),
        ("SELECT count(*) > '0'FROM t_order WHERE merchant_id = 5", false),
        ("SELECT order_no, order_no = $$A-2$$FROM t_order WHERE merchant_id = 5", false),
        ("SELECT order_no, order_no = 'A-2'AND pay_status = 'PAID' AS both FROM t_order WHERE merchant_id = 5", false),
        // planned from the text: a placeholder cannot stand in a merged HAVING or GROUP BY match
        ("SELECT merchant_id, count(*) FROM t_order GROUP BY merchant_id HAVING count(*) > 1 ORDER BY 1", true),
        ("SELECT merchant_id = 5 AS m, count(*) FROM t_order GROUP BY merchant_id = 5 ORDER BY 1", true),
        ("SELECT DISTINCT merchant_id = 5 AS m FROM t_order ORDER BY merchant_id = 5", true),
        ("SELECT pay_status, sum(order_amount) FROM t_order WHERE create_time >= '2026-11-01' GROUP BY pay_status HAVING sum(order_amount) > 2 ORDER BY 1", true),
    ] {
        let (want, got) = (run(&reference, sql, ordered).await, run(&proxy, sql, ordered).await);
        assert_eq!(got, want, "{sql}");
    }
    // a string LIMIT is refused as the full parse refuses it, never read past PostgreSQL's rules
    let got = run(&proxy, "SELECT order_no FROM t_order WHERE merchant_id IN (5, 7) ORDER BY order_no LIMIT '2\u{a0}'", true).await;
    let want = run(&reference, "SELECT order_no FROM t_order WHERE merchant_id IN (5, 7) ORDER BY order_no LIMIT '2\u{a0}'", true).await;
    assert!(got == want || got == Outcome::Error("0A000".into()), "LIMIT '2<nbsp>': reference {want:?}, shardgate {got:?}");
}
