//! The dual-write migration end to end (issue 6): real PostgreSQL clusters,
//! the proxy, and the `shardgate-migrate` binary.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardgate_tests::{Cluster, Options};

async fn connect(dsn: &str) -> tokio_postgres::Client {
    shardgate_tests::connect(dsn).await.expect("connect")
}

const LEGACY_ROWS: i64 = 200_000;

fn start(extra: &str) -> Cluster {
    let extra = format!("[ids]\nworker_id = 1\nlegacy_id_max = 1000000000\n{extra}");
    Cluster::start_temp(Options { redis: false, extra_toml: extra, legacy: true, ..Options::default() }).expect("start cluster")
}

/// `rows` legacy orders for 5,000 merchants over 13 months (2025-01 .. 2026-01).
async fn fill_legacy(c: &Cluster, rows: i64) {
    let l = connect(&c.info.legacy_dsn).await;
    l.batch_execute(&format!(
        "INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) \
         SELECT g, 'L' || g, (g * 7919) % 5000 + 1, (g % 10000) / 100.0, CASE WHEN g % 3 = 0 THEN 'PAID' ELSE 'NEW' END, \
                timestamptz '2025-01-01 00:00:00+00' + (g % 395) * interval '1 day' + (g % 86400) * interval '1 second' \
         FROM generate_series(1, {rows}) g; ANALYZE t_order"
    ))
    .await
    .expect("legacy rows");
}

/// Runs a step; returns (exit code, stdout + stderr).
fn step(c: &Cluster, args: &[&str]) -> (i32, String) {
    let out = c.migrate(args).expect("run shardgate-migrate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("$ shardgate-migrate {}\n{text}", args.join(" "));
    (out.status.code().unwrap_or(-1), text)
}

fn ok(c: &Cluster, args: &[&str]) -> String {
    let (code, text) = step(c, args);
    assert_eq!(code, 0, "`{}` failed:\n{text}", args.join(" "));
    text
}

/// Inserts (ids from shardgate) and updates orders through the proxy until stopped;
/// returns the acknowledged new order numbers and the acknowledged updates.
struct Writer {
    stop: Arc<AtomicBool>,
    inserted: Arc<Mutex<Vec<(String, i64)>>>,
    updated: Arc<Mutex<HashMap<String, String>>>,
    errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    async fn start(dsn: &str, tag: &'static str) -> Writer {
        let client = connect(dsn).await;
        let stop = Arc::new(AtomicBool::new(false));
        let inserted = Arc::new(Mutex::new(Vec::new()));
        let updated = Arc::new(Mutex::new(HashMap::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, ins, upd, errs) = (stop.clone(), inserted.clone(), updated.clone(), errors.clone());
        let task = tokio::spawn(async move {
            let mut n: i64 = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let merchant = (n * 37) % 5000 + 1;
                let order_no = format!("{tag}{n}");
                let r = client
                    .execute(
                        "INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, 12.34, 'NEW', now())",
                        &[&order_no, &merchant],
                    )
                    .await;
                match r {
                    Ok(1) => ins.lock().expect("lock").push((order_no.clone(), merchant)),
                    Ok(k) => errs.lock().expect("lock").push(format!("insert {order_no} affected {k} rows")),
                    Err(e) => errs.lock().expect("lock").push(format!("insert {order_no}: {e}")),
                }
                // update a legacy order (by its shard key) and, every other time, a new one
                let g = (n * 104_729) % LEGACY_ROWS + 1;
                let (no, m) = if n % 2 == 0 { (format!("L{g}"), (g * 7919) % 5000 + 1) } else { (order_no.clone(), merchant) };
                let status = format!("S{n}");
                match client.execute("UPDATE t_order SET pay_status = $1 WHERE merchant_id = $2 AND order_no = $3", &[&status, &m, &no]).await {
                    Ok(_) => {
                        upd.lock().expect("lock").insert(no, status);
                    }
                    Err(e) => errs.lock().expect("lock").push(format!("update {no}: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Writer { stop, inserted, updated, errors, task }
    }

    async fn stop(self) -> (Vec<(String, i64)>, HashMap<String, String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer task");
        let errors = self.errors.lock().expect("lock").clone();
        assert!(errors.is_empty(), "the writer saw errors through the proxy: {:?}", &errors[..errors.len().min(10)]);
        let ins = self.inserted.lock().expect("lock").clone();
        let upd = self.updated.lock().expect("lock").clone();
        (ins, upd)
    }

    fn count(&self) -> usize {
        self.inserted.lock().expect("lock").len()
    }
}

async fn control(c: &Cluster, sql: &str) -> i64 {
    let d = connect(&c.info.default_dsn).await;
    d.query_one(sql, &[]).await.expect("control query").get(0)
}

/// Every row of every shard: (id, merchant, shard, table month, row month).
async fn shard_rows(c: &Cluster) -> Vec<(i64, i64, usize, String, String, String, String)> {
    let mut out = Vec::new();
    for (i, dsn) in c.info.shards.iter().enumerate() {
        let s = connect(dsn).await;
        for t in shardgate_tests::month_tables(&s).await {
            let rows = s
                .query(&format!("SELECT id, merchant_id, to_char(create_time AT TIME ZONE 'UTC', 'YYYYMM'), order_no, coalesce(pay_status, '') FROM {t}"), &[])
                .await
                .expect("rows");
            for r in rows {
                out.push((r.get(0), r.get(1), i, t[8..].to_string(), r.get(2), r.get(3), r.get(4)));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_migration_under_write_load_with_a_killed_backfill_and_a_stopped_shard() {
    // the outbox is left to verify --repair here, so the differences stay visible
    let c = start("[migration]\noutbox_retry_interval_ms = 0\n");
    fill_legacy(&c, LEGACY_ROWS).await;
    let writer = Writer::start(&c.info.proxy_dsn, "N").await;

    // out of order: refused with what to run first
    let (code, text) = step(&c, &["backfill"]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("run `prepare`"), "{text}");

    let text = ok(&c, &["prepare", "--dry-run"]);
    assert!(text.contains("would create"), "{text}");
    let made: bool = connect(&c.info.shards[7]).await.query_one("SELECT to_regclass('t_order_202503') IS NOT NULL", &[]).await.expect("regclass").get(0);
    assert!(!made, "a dry run creates nothing");
    assert_eq!(control(&c, "SELECT count(*) FROM pg_class WHERE relname = 'shardgate_migration'").await, 0, "a dry run or refused step creates nothing");
    let text = ok(&c, &["prepare"]);
    assert!(text.contains("db_0: created") && text.contains("phase: legacy -> prepared"), "{text}");
    // every legacy month plus the months ahead, with the three indexes
    let s7 = connect(&c.info.shards[7]).await;
    let idx: i64 = s7
        .query_one("SELECT count(*) FROM pg_indexes WHERE tablename = 't_order_202503' AND (indexdef LIKE '%(merchant_id, create_time)' OR indexdef LIKE 'CREATE UNIQUE%(order_no)' OR indexdef LIKE '%(pay_status, create_time)')", &[])
        .await
        .expect("indexes")
        .get(0);
    assert_eq!(idx, 3);
    let text = ok(&c, &["prepare"]);
    assert!(text.contains("db_0: created 0 month table(s)"), "re-run is a no-op: {text}");

    ok(&c, &["dual-write"]);
    let (code, text) = step(&c, &["dual-write"]);
    assert!(code == 0 && text.contains("already done"), "{text}");

    // backfill killed mid-way, then re-run from its checkpoint
    let log = c.info.root.join("backfill.log");
    let mut child = c.migrate_spawn(&["backfill", "--max-rows-per-sec", "40000", "--batch-rows", "5000"], &log).expect("spawn backfill");
    let t0 = std::time::Instant::now();
    while control(&c, "SELECT coalesce(backfill_rows, 0) FROM shardgate_migration").await < 20_000 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no backfill checkpoint; see {}", log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().expect("SIGKILL the backfill");
    child.wait().expect("reap");
    let copied = control(&c, "SELECT backfill_rows FROM shardgate_migration").await;
    assert!(copied > 0 && copied < LEGACY_ROWS, "killed mid-way: {copied} rows recorded");
    assert_eq!(control(&c, "SELECT backfill_done::int::bigint FROM shardgate_migration").await, 0);
    let (code, text) = step(&c, &["switch-reads"]);
    assert_eq!(code, 3, "switch-reads before the backfill finished is refused: {text}");
    let text = ok(&c, &["backfill"]);
    assert!(text.contains("resuming after merchant_id") && text.contains("every merchant copied"), "{text}");

    // a shard stopped during dual-write, after the backfill (so the backfill cannot mend it): its writes fail on the shard, never for the client
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shard0 = c.info.cluster_of_shard(0).expect("shard 0 cluster");
    shard0.stop_immediate().expect("stop shard 0");
    let before = writer.count();
    shardgate_tests::wait_for("writes while shard 0 is down", Duration::from_secs(30), || writer.count() >= before + 200).await;
    shard0.start().expect("start shard 0");
    let outbox = control(&c, "SELECT count(*) FROM shardgate_migration_outbox WHERE status = 'PENDING' AND 0 = ANY(shards)").await;
    assert!(outbox > 0, "failed shard writes are in the outbox");

    // verify finds what the stopped shard missed, --repair fixes it
    let (code, text) = step(&c, &["verify"]);
    assert_eq!(code, 1, "verify must report the missed writes: {text}");
    assert!(text.contains("missing"), "{text}");
    let (code, text) = step(&c, &["switch-reads"]);
    assert_eq!(code, 3, "no clean verify yet: {text}");
    let text = ok(&c, &["verify", "--repair"]);
    assert!(text.contains("repaired"), "{text}");
    let text = ok(&c, &["verify"]);
    assert!(text.contains("differences: 0 row(s)"), "{text}");
    assert_eq!(control(&c, "SELECT count(*) FROM shardgate_migration_outbox WHERE status = 'PENDING'").await, 0, "a clean verify closes the outbox");

    ok(&c, &["switch-reads"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(&c, &["switch-writes"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (inserted, updated) = writer.stop().await;
    assert!(inserted.len() > 300, "the writer ran the whole time ({} orders)", inserted.len());
    let text = ok(&c, &["verify"]);
    assert!(text.contains("differences: 0 row(s)"), "{text}");
    ok(&c, &["finalize"]);
    let text = ok(&c, &["status"]);
    assert!(text.contains("phase:     finalized"), "{text}");

    // every legacy and new order exactly once, on its shard and month table
    let rows = shard_rows(&c).await;
    let mut ids = HashSet::new();
    let mut by_no: HashMap<String, String> = HashMap::new();
    for (id, merchant, shard, table, month, no, status) in &rows {
        assert!(ids.insert(*id), "id {id} is stored twice");
        assert_eq!(merchant.rem_euclid(8) as usize, *shard, "order {no} on the wrong shard");
        assert_eq!(table, month, "order {no} in the wrong month table");
        by_no.insert(no.clone(), status.clone());
    }
    let legacy = connect(&c.info.legacy_dsn).await;
    let legacy_count: i64 = legacy.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count").get(0);
    assert_eq!(rows.len() as i64, legacy_count);
    assert_eq!(legacy_count, LEGACY_ROWS + inserted.len() as i64);
    for (no, _) in &inserted {
        assert!(by_no.contains_key(no), "acknowledged order {no} is missing on the shards");
    }
    for (no, status) in &updated {
        assert_eq!(by_no.get(no), Some(status), "acknowledged update of {no} lost");
    }
    // new orders carry shardgate ids, the same in both stores
    let new_ids: i64 = legacy.query_one("SELECT count(*) FROM t_order WHERE id > 1000000000", &[]).await.expect("ids").get(0);
    assert_eq!(new_ids, inserted.len() as i64);
    // the proxy answers from the shards alone now
    let p = connect(&c.info.proxy_dsn).await;
    let n: i64 = p.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count via proxy").get(0);
    assert_eq!(n, legacy_count);
    // every order_no has its unique-lookup entry (backfill, dual-write and repair wrote them),
    // naming the order's merchant and month: a taken order_no is refused for another merchant
    let def = connect(&c.info.default_dsn).await;
    let entries: HashMap<String, (i64, String)> = def
        .query("SELECT value, shard_key, month FROM shardgate_lookup_t_order_order_no", &[])
        .await
        .expect("lookup entries")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for (_, merchant, _, _, month, no, _) in &rows {
        let want = (*merchant, month.trim_start_matches("t_order_").to_string());
        assert_eq!(entries.get(no), Some(&want), "lookup entry of {no}");
    }
    let (_, merchant, _, _, _, no, _) = &rows[0];
    let e = p
        .execute("INSERT INTO t_order (order_no, merchant_id) VALUES ($1, $2)", &[no, &(merchant + 1)])
        .await
        .expect_err("a migrated order_no is taken");
    assert_eq!(e.code().map(|c| c.code()), Some("23505"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_from_switch_writes_keeps_legacy_in_step() {
    let c = start("");
    fill_legacy(&c, 3_000).await;
    for s in ["prepare", "dual-write", "backfill", "verify", "switch-reads", "switch-writes"] {
        ok(&c, &[s]);
    }
    let p = connect(&c.info.proxy_dsn).await;
    let admin = connect(&c.info.proxy_dsn_for(shardgate_tests::ADMIN_USER.0, shardgate_tests::ADMIN_USER.1)).await;
    let m = admin.simple_query("SHOW MIGRATION").await.expect("show migration");
    let row = m.iter().find_map(|r| if let tokio_postgres::SimpleQueryMessage::Row(r) = r { Some(r.get(0).map(str::to_string)) } else { None }).flatten();
    assert_eq!(row.as_deref(), Some("shard_writes"));
    let (_, health) = shardgate_tests::http_get(&format!("{}/health", c.info.admin_url)).expect("health");
    assert!(health.contains("\"phase\":\"shard_writes\""), "{health}");

    // written after the switch: shards first, legacy kept in step
    for i in 0..50i64 {
        p.execute("INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, 1.00, 'NEW', now())", &[&format!("R{i}"), &(i + 1)])
            .await
            .expect("insert after switch-writes");
    }
    p.execute("UPDATE t_order SET pay_status = 'REFUNDED' WHERE merchant_id = $1 AND order_no = 'L7'", &[&((7i64 * 7919) % 5000 + 1)]).await.expect("update");
    // and inside a transaction block
    p.batch_execute("BEGIN").await.expect("begin");
    p.batch_execute("INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ('TX1', 3, 5.00, 'NEW', now())").await.expect("in block");
    p.batch_execute("COMMIT").await.expect("commit");
    ok(&c, &["rollback"]);
    let legacy = connect(&c.info.legacy_dsn).await;
    let n: i64 = legacy.query_one("SELECT count(*) FROM t_order WHERE order_no LIKE 'R%' OR order_no = 'TX1'", &[]).await.expect("count").get(0);
    assert_eq!(n, 51, "orders written after switch-writes are in legacy");
    let st: String = legacy.query_one("SELECT pay_status FROM t_order WHERE order_no = 'L7'", &[]).await.expect("l7").get(0);
    assert_eq!(st, "REFUNDED");
    // same ids in both stores
    // (TX1 was written at now(): whichever month table that is)
    let shard3 = connect(&c.info.shards[3]).await;
    let months = shardgate_tests::month_tables(&shard3).await;
    let union = months.iter().map(|m| format!("SELECT id FROM {m} WHERE order_no = 'TX1'")).collect::<Vec<_>>().join(" UNION ALL ");
    let shard_id: i64 = shard3.query_one(&union, &[]).await.expect("tx1 on shard").get(0);
    let legacy_id: i64 = legacy.query_one("SELECT id FROM t_order WHERE order_no = 'TX1'", &[]).await.expect("tx1").get(0);
    assert_eq!(shard_id, legacy_id);
    // after the rollback the proxy answers from legacy again
    legacy.execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (999999, 'ONLY-LEGACY', 1, now())", &[]).await.expect("direct");
    let seen: i64 = p.query_one("SELECT count(*) FROM t_order WHERE order_no = 'ONLY-LEGACY'", &[]).await.expect("read").get(0);
    assert_eq!(seen, 1);
    // finalize is not possible any more without starting over
    let (code, text) = step(&c, &["finalize"]);
    assert_eq!(code, 3, "{text}");
}

/// A write read in parts (an Execute with a row limit outside a block, as
/// asyncpg's fetchrow sends it) whose answer is too large to keep is refused
/// with 54000 in every phase of a migration, and neither store keeps it: it
/// used to be refused after it had committed (on legacy, on the shards, or
/// both). One whose answer fits is kept in every store the phase writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_read_in_parts_that_is_refused_changes_neither_store() {
    use shardgate_tests::raw::{error_code, frame, md5_login, pbe_rows, read_until_ready};
    use std::io::Write;
    let extra = "[ids]\nworker_id = 1\nlegacy_id_max = 1000000000\n".to_string();
    let c = Cluster::start_temp(Options { redis: false, extra_toml: extra, legacy: true, server_toml: "max_portal_bytes = 2000\n".into(), ..Options::default() })
        .expect("start cluster");
    fill_legacy(&c, 300).await;
    let legacy = connect(&c.info.legacy_dsn).await;
    let mut s = md5_login(&c);
    // L5's merchant: (5 * 7919) % 5000 + 1
    let l5 = (5i64 * 7919) % 5000 + 1;
    // (steps before the phase, legacy written, shards written)
    let phases: [(&[&str], bool, bool); 4] = [
        (&[], true, false),
        (&["prepare", "dual-write", "backfill", "verify"], true, true),
        (&["switch-reads", "switch-writes"], true, true),
        (&["verify", "finalize"], false, true),
    ];
    // an UPDATE read one row at a time: its messages up to ReadyForQuery
    let mut in_parts = |sql: String| {
        let mut batch = pbe_rows(&sql, 1);
        batch.extend(frame(b'S', b""));
        s.write_all(&batch).expect("batch");
        read_until_ready(&mut s)
    };
    // rows with this pay_status on legacy and on the shards
    let kept = |status: String| {
        let (legacy, c) = (&legacy, &c);
        async move {
            let on_legacy: i64 = legacy.query_one("SELECT count(*) FROM t_order WHERE pay_status = $1", &[&status]).await.expect("legacy").get(0);
            (on_legacy, shard_rows(c).await.iter().filter(|r| r.6 == status).count())
        }
    };
    for (i, (steps, on_legacy, on_shards)) in phases.iter().enumerate() {
        for st in *steps {
            ok(&c, &[st]);
        }
        // every row (300 of them, far over 2,000 bytes), read one at a time
        let msgs = in_parts(format!("UPDATE t_order SET pay_status = 'X{i}' WHERE merchant_id > 0 RETURNING *"));
        assert_eq!(error_code(&msgs).as_deref(), Some("54000"), "phase {i}: {msgs:?}");
        let (l, sh) = kept(format!("X{i}")).await;
        assert_eq!(l, 0, "phase {i}: legacy kept a write answered with an error");
        assert_eq!(sh, 0, "phase {i}: the shards kept a write answered with an error");
        // one row of 1,996 bytes (fits) whose tag takes the answer past 2,000 bytes (does not):
        // refused, and kept nowhere
        let msgs = in_parts(format!("UPDATE t_order SET pay_status = 'E{i}' WHERE merchant_id = {l5} AND order_no = 'L5' RETURNING repeat('x', 1985)"));
        assert_eq!(error_code(&msgs).as_deref(), Some("54000"), "phase {i}, at the limit: {msgs:?}");
        let (l, sh) = kept(format!("E{i}")).await;
        assert_eq!(l, 0, "phase {i}: legacy kept a write refused at the limit");
        assert_eq!(sh, 0, "phase {i}: the shards kept a write refused at the limit");
        // one row: its answer fits, it is kept where the phase writes
        let msgs = in_parts(format!("UPDATE t_order SET pay_status = 'Y{i}' WHERE merchant_id = {l5} AND order_no = 'L5' RETURNING id"));
        assert_eq!(error_code(&msgs), None, "phase {i}: {msgs:?}");
        assert_eq!(msgs.iter().filter(|(t, _)| *t == b'D').count(), 1, "phase {i}: {msgs:?}");
        let (l, sh) = kept(format!("Y{i}")).await;
        assert_eq!(l, i64::from(*on_legacy), "phase {i}: on legacy");
        assert_eq!(sh, usize::from(*on_shards), "phase {i}: on the shards");
    }
}
