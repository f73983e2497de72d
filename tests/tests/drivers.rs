//! Driver matrix: real client libraries used the way applications use them,
//! each answer compared with one plain PostgreSQL table (the `reference`
//! database on the main cluster, made like the one in differential.rs).
//!
//! One cluster serves every driver. Before each driver both sides are reset
//! and loaded with the same orders (explicit ids of every kind: small ones,
//! ones just above 2^22, larger ones, snowflake-shaped ids shardgate did not
//! issue, negative ones). Each driver program (tests/drivers/) gets
//! `IDS.tsv REFERENCE_DSN PROXY_DSN`, runs its scenario on both, compares
//! rows, column names, row counts and SQLSTATEs itself, and prints one line
//! per check (rules in tests/drivers/python/matrix.py, the same in every
//! program):
//!
//! - `PASS`: the same answer as the one table;
//! - `REFUSED <driver> <check>: <message>`: the reference succeeded and
//!   shardgate refused with `0A000` and a message saying what to change, on a
//!   check in the program's explicit allowlist of documented refusals (a
//!   `0A000` anywhere else is a `FAIL`);
//! - `KNOWN GAP <driver> <check> (<issue>): ...`: a check in the program's
//!   explicit list of known gaps whose answer differs in exactly its known way
//!   (a known gap that answers like the reference prints `FIXED` and fails);
//! - `FAIL` with a diff.
//!
//! It ends with `<driver>: ok (N passed, R refused, K known gaps)` and exit
//! status 0. This test requires, for every driver: exit status 0, that line,
//! counts equal to the `PASS`/`REFUSED`/`KNOWN GAP` lines printed, no `FAIL`
//! or `FIXED` line, and at least [`MIN_PASSED`] passed checks (so the matrix
//! cannot pass vacuously).
//!
//! | driver | program | how it runs |
//! |---|---|---|
//! | pgjdbc | java/PgJdbcMatrix.java | javac at test time, /usr/share/java/postgresql.jar |
//! | asyncpg | python/asyncpg_matrix.py | python3 |
//! | psycopg | python/psycopg_matrix.py | python3 |
//! | node-postgres | node/pg_matrix.js | node, `pg` from tests/drivers/node/node_modules |
//! | sqlalchemy | python/sqlalchemy_matrix.py | python3, SQLAlchemy 2 ORM over psycopg |
//!
//! tokio-postgres is covered by differential.rs. `bash scripts/setup.sh`
//! installs everything these need.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardgate_tests::{connect, Cluster, Options};

/// Rows loaded before each driver.
const ROWS: i64 = 400;
/// Merchants 1..=MERCHANTS.
const MERCHANTS: i64 = 40;
const STATUSES: [&str; 4] = ["NEW", "PAID", "REFUND", "CLOSED"];
/// How long one driver program may run.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Fewest `PASS` checks each driver must print: a little under what each
/// passes today (pgjdbc 31, asyncpg 52, psycopg 101, node-postgres 34,
/// sqlalchemy 31); raise them when adding checks.
const MIN_PASSED: [(&str, usize); 5] = [("pgjdbc", 30), ("asyncpg", 50), ("psycopg", 100), ("node-postgres", 33), ("sqlalchemy", 30)];

/// Milliseconds from the id epoch (2024-01-01) to 2026-08-15 00:00 UTC: the
/// timestamp bits of the snowflake-shaped ids below.
const SNOWFLAKE_TS: i64 = 82_684_800_000;

/// A snowflake-shaped id (41 bits ms, 6 bits worker 3, moved bit 0, 3 bits
/// shard, 12 bits sequence) that an application made itself.
fn snowflake_shaped(shard: i64, seq: i64) -> i64 {
    SNOWFLAKE_TS << 22 | 3 << 16 | (shard & 7) << 12 | (seq & 0xfff)
}

/// The kind of an explicit application id.
fn id_of(i: i64, merchant: i64) -> (&'static str, i64) {
    if i % 50 == 17 {
        return ("negative", -i);
    }
    match i % 5 {
        0 => ("small", i),
        1 => ("just_above_2^22", (1 << 22) + i),
        2 => ("mid", 20_000_000 + i * 1_013),
        3 => ("large", 1_000_000_000_000 + i * 104_729),
        // shard bits that do not match the row's shard (merchant_id % 8), a month that is not its month
        _ => ("snowflake_shaped", snowflake_shaped((merchant % 8 + 3) % 8, i)),
    }
}

struct Seed {
    inserts: Vec<String>,
    /// kind -> ids (a few of each, for point lookups)
    kinds: Vec<(String, Vec<i64>)>,
}

fn seed() -> Seed {
    let mut rows = Vec::new();
    let mut inserts = Vec::new();
    let mut kinds: Vec<(String, Vec<i64>)> = Vec::new();
    for i in 1..=ROWS {
        let merchant = 1 + (i * 7919) % MERCHANTS;
        let (kind, id) = id_of(i, merchant);
        match kinds.iter_mut().find(|(k, _)| k == kind) {
            Some((_, ids)) if ids.len() < 4 => ids.push(id),
            Some(_) => {}
            None => kinds.push((kind.to_string(), vec![id])),
        }
        let month = 6 + (i * 31) % 6; // 2026-06 .. 2026-11
        let day = 1 + (i * 13) % 28;
        let hour = (i * 7) % 24;
        let amount = if i % 37 == 0 { "NULL".to_string() } else { format!("{}.{:02}", 1 + (i * 37) % 500, (i * 53) % 100) };
        let status = if i % 41 == 0 { "NULL".to_string() } else { format!("'{}'", STATUSES[(i % 4) as usize]) };
        rows.push(format!("({id}, 'S{i:05}', {merchant}, {amount}, {status}, '2026-{month:02}-{day:02} {hour:02}:{:02}:00+00')", (i * 11) % 60));
        if rows.len() == 100 {
            inserts.push(format!("INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES {}", rows.join(", ")));
            rows.clear();
        }
    }
    assert!(rows.is_empty(), "ROWS is a multiple of 100");
    // ids no row has, one of each shape
    kinds.push(("missing".into(), vec![3, (1 << 22) + 3, 1_000_000_000_001, snowflake_shaped(0, 4095), -3]));
    Seed { inserts, kinds }
}

fn reference_dsn(c: &Cluster) -> String {
    c.info.default_dsn.replace("/db_default", "/reference")
}

/// The cluster and the reference database (exactly as differential.rs makes it).
fn start() -> Cluster {
    let c = Cluster::start_temp(Options { all_clusters: true, redis: false, proxy: true, ..Options::default() }).expect("start cluster");
    // the plain table numbers rows that omit the id itself (compared without it)
    c.create_reference(true).expect("reference db");
    c
}

/// Empties `t_order` on both sides and loads the seed through each.
async fn reset_and_load(reference: &str, proxy: &str, seed: &Seed) {
    let r = connect(reference).await.expect("connect reference");
    let p = connect(proxy).await.expect("connect shardgate");
    r.batch_execute("DELETE FROM t_order").await.expect("reset reference");
    p.batch_execute("DELETE FROM t_order").await.expect("reset through shardgate");
    for sql in &seed.inserts {
        r.batch_execute(sql).await.expect("load reference");
        p.batch_execute(sql).await.expect("load through shardgate");
    }
    let count = |c: tokio_postgres::Client| async move { c.query_one("SELECT count(*) FROM t_order", &[]).await.map(|r| r.get::<_, i64>(0)) };
    assert_eq!(count(r).await.expect("count reference"), ROWS);
    assert_eq!(count(p).await.expect("count through shardgate"), ROWS, "every seeded row is visible through shardgate");
}

struct Run {
    name: &'static str,
    ok: bool,
    /// From the `<driver>: ok (...)` line, when there was one.
    counts: Option<Counts>,
    report: String,
}

/// What a driver program counted: checks that passed, documented refusals, known gaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Counts {
    passed: usize,
    refused: usize,
    gaps: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} refused, {} known gaps", self.passed, self.refused, self.gaps)
    }
}

/// `<name>: ok (N passed, R refused, K known gaps)`.
fn ok_line(name: &str, stdout: &str) -> Option<Counts> {
    let prefix = format!("{name}: ok (");
    let inner = stdout.lines().find_map(|l| l.strip_prefix(prefix.as_str()))?.strip_suffix(')')?;
    let mut parts = inner.split(", ");
    let mut num = |suffix: &str| parts.next()?.strip_suffix(suffix)?.parse::<usize>().ok();
    let counts = Counts { passed: num(" passed")?, refused: num(" refused")?, gaps: num(" known gaps")? };
    parts.next().is_none().then_some(counts)
}

/// The per-check lines a program printed: (counts, FAIL lines, FIXED lines).
fn check_lines(name: &str, stdout: &str) -> (Counts, usize, usize) {
    let n = |tag: &str| {
        let prefix = format!("{tag} {name} ");
        stdout.lines().filter(|l| l.starts_with(&prefix)).count()
    };
    (Counts { passed: n("PASS"), refused: n("REFUSED"), gaps: n("KNOWN GAP") }, n("FAIL"), n("FIXED"))
}

/// Why a finished program's output does not show a driver that answers like one table (empty: it does).
fn problems(name: &str, stdout: &str) -> (Option<Counts>, Vec<String>) {
    let mut out = Vec::new();
    let counts = ok_line(name, stdout);
    let (lines, fails, fixed) = check_lines(name, stdout);
    match counts {
        None => out.push(format!("`{name}: ok (N passed, R refused, K known gaps)` not printed")),
        Some(c) if c != lines => out.push(format!("its summary says {c} but it printed {lines} lines")),
        Some(_) => {}
    }
    if fails > 0 || fixed > 0 {
        out.push(format!("{fails} FAIL and {fixed} FIXED lines"));
    }
    let min = MIN_PASSED.iter().find(|(n, _)| *n == name).map_or(1, |(_, m)| *m);
    if lines.passed < min {
        out.push(format!("only {} checks passed, at least {min} must (MIN_PASSED)", lines.passed));
    }
    (counts, out)
}

/// Runs one driver program with a deadline; its output goes to files (no pipe can fill up).
fn run_driver(name: &'static str, mut cmd: Command, dir: &Path) -> Run {
    let out_path = dir.join(format!("{name}.out"));
    let err_path = dir.join(format!("{name}.err"));
    let spawned = fs::File::create(&out_path)
        .and_then(|o| fs::File::create(&err_path).map(|e| (o, e)))
        .and_then(|(o, e)| cmd.stdin(Stdio::null()).stdout(o).stderr(e).spawn());
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Run { name, ok: false, counts: None, report: format!("could not start {cmd:?}: {e} (run `bash scripts/setup.sh`)") },
    };
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if t0.elapsed() > DRIVER_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("waiting for {name}: {e}"),
        }
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let (counts, mut wrong) = problems(name, &stdout);
    match status {
        None => wrong.insert(0, format!("killed after {DRIVER_TIMEOUT:?}")),
        Some(st) if !st.success() => wrong.insert(0, format!("exit {st}")),
        Some(_) => {}
    }
    let mut report = String::new();
    let _ = writeln!(report, "===== {name} ({:.1}s) =====", t0.elapsed().as_secs_f64());
    report.push_str(&stdout);
    if !stderr.trim().is_empty() {
        let _ = writeln!(report, "----- {name} stderr -----\n{}", stderr.trim_end());
    }
    if !wrong.is_empty() {
        let _ = writeln!(report, "{name}: {}", wrong.join("; "));
    }
    Run { name, ok: wrong.is_empty(), counts, report }
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers")
}

const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Compiles the pgjdbc program into `dir`; an error names what is missing.
fn compile_java(dir: &Path) -> Result<(), String> {
    if !Path::new(PGJDBC_JAR).exists() {
        return Err(format!("{PGJDBC_JAR} is missing: run `bash scripts/setup.sh` (Debian package libpostgresql-jdbc-java)"));
    }
    let out = Command::new("javac")
        .args(["-nowarn", "-encoding", "UTF-8", "-d"])
        .arg(dir)
        .args(["-cp", PGJDBC_JAR])
        .arg(drivers_dir().join("java/PgJdbcMatrix.java"))
        .output()
        .map_err(|e| format!("javac: {e} (run `bash scripts/setup.sh`)"))?;
    if !out.status.success() {
        return Err(format!("javac failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

#[test]
fn drivers_answer_like_one_table() {
    let c = start();
    let reference = reference_dsn(&c);
    let proxy = c.info.proxy_dsn.clone();
    let seed = seed();
    let tmp = tempfile::tempdir().expect("tmp");
    let ids = tmp.path().join("ids.tsv");
    let tsv: String = seed.kinds.iter().map(|(k, v)| format!("{k}\t{}\n", v.iter().map(i64::to_string).collect::<Vec<_>>().join(","))).collect();
    fs::write(&ids, tsv).expect("write ids.tsv");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");

    let java = compile_java(tmp.path());
    let dir = drivers_dir();
    let node_pg = dir.join("node/node_modules/pg");
    let mut plan: Vec<(&'static str, Result<Command, String>)> = Vec::new();
    plan.push((
        "pgjdbc",
        java.map(|()| {
            let mut cmd = Command::new("java");
            cmd.arg("-cp").arg(format!("{}:{PGJDBC_JAR}", tmp.path().display())).arg("PgJdbcMatrix");
            cmd
        }),
    ));
    for (name, script) in [("asyncpg", "asyncpg_matrix.py"), ("psycopg", "psycopg_matrix.py")] {
        let mut cmd = Command::new("python3");
        cmd.arg(dir.join("python").join(script));
        plan.push((name, Ok(cmd)));
    }
    plan.push((
        "node-postgres",
        if node_pg.exists() {
            let mut cmd = Command::new("node");
            cmd.arg(dir.join("node/pg_matrix.js"));
            Ok(cmd)
        } else {
            Err(format!("{} is missing: run `bash scripts/setup.sh`", node_pg.display()))
        },
    ));
    let mut cmd = Command::new("python3");
    cmd.arg(dir.join("python/sqlalchemy_matrix.py"));
    plan.push(("sqlalchemy", Ok(cmd)));

    let mut runs = Vec::new();
    for (name, cmd) in plan {
        let run = match cmd {
            Err(why) => Run { name, ok: false, counts: None, report: format!("===== {name} =====\n{name}: not run: {why}\n") },
            Ok(mut cmd) => {
                rt.block_on(reset_and_load(&reference, &proxy, &seed));
                cmd.arg(&ids).arg(&reference).arg(&proxy).env("PYTHONUNBUFFERED", "1").env("PYTHONDONTWRITEBYTECODE", "1");
                run_driver(name, cmd, tmp.path())
            }
        };
        println!("{}", run.report);
        runs.push(run);
    }
    assert_eq!(runs.len(), MIN_PASSED.len(), "every driver of MIN_PASSED ran");
    println!("driver matrix:");
    for r in &runs {
        let counts = r.counts.map_or(String::new(), |c| format!(" ({c})"));
        println!("  {}: {}{counts}", r.name, if r.ok { "ok" } else { "FAILED" });
    }
    // the PASS/FAIL lines and diffs are printed above; the message names what failed
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| !r.ok)
        .map(|r| {
            let last = r.report.lines().filter(|l| l.starts_with(&format!("{}: ", r.name))).collect::<Vec<_>>().join("\n");
            if last.is_empty() {
                format!("{}: no summary line", r.name)
            } else {
                last
            }
        })
        .collect();
    let log = c.proxy_log();
    let tail: Vec<&str> = log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(failed.is_empty(), "drivers that do not answer like one table (diffs above):\n{}\n(proxy log tail)\n{}", failed.join("\n"), tail.join("\n"));
}

/// The summary checks above, on made-up output (no cluster).
#[test]
fn driver_output_is_judged_by_its_lines() {
    let pass = |n: usize| (0..n).map(|k| format!("PASS d c{k}\n")).collect::<String>();
    let min = MIN_PASSED.iter().find(|(n, _)| *n == "asyncpg").expect("asyncpg has a floor").1;
    let good = format!("{}REFUSED asyncpg r: use VALUES\nKNOWN GAP asyncpg g (issue 18): reference x, proxy y\nasyncpg: ok ({min} passed, 1 refused, 1 known gaps)\n", pass(min).replace(" d ", " asyncpg "));
    assert_eq!(problems("asyncpg", &good), (Some(Counts { passed: min, refused: 1, gaps: 1 }), vec![]));
    // a summary that does not match its lines, a FAIL/FIXED line, too few passes, no summary
    assert_eq!(problems("asyncpg", &good.replace("1 refused", "0 refused")).1.len(), 1);
    assert_eq!(problems("asyncpg", &format!("{good}FIXED asyncpg g: remove it from the known gaps\n")).1.len(), 1);
    assert!(problems("asyncpg", &good.replacen("PASS asyncpg c0\n", "", 1)).1.iter().any(|p| p.contains("MIN_PASSED")));
    assert_eq!(problems("asyncpg", "PASS asyncpg a\nasyncpg: ok (1 checks)\n").0, None);
    assert_eq!(ok_line("asyncpg", "asyncpg: ok (3 passed, 0 refused, 0 known gaps, 2 more)"), None);
}
