//! Nothing lost, nothing doubled: every way a client can end a transaction
//! ends the shards' part of it the same way, or is refused before anything
//! commits. Each write is read back from the shard itself.

use shardgate_tests::raw::{frame, md5_login, pbe, read_until_ready};
use shardgate_tests::{connect, sqlstate, Cluster, Options};

fn start() -> Cluster {
    Cluster::start_temp(Options { redis: false, ..Options::default() }).expect("start cluster")
}

/// Rows with this order_no, counted on the shard of merchant 1 (db_1), all months.
async fn on_shard(c: &Cluster, order_no: &str) -> i64 {
    let shard = connect(&c.info.shards[1]).await.expect("shard");
    let tables = shardgate_tests::month_tables(&shard).await;
    let mut n = 0;
    for t in tables {
        n += shard.query_one(&format!("SELECT count(*) FROM {t} WHERE order_no = $1"), &[&order_no]).await.expect("count").get::<_, i64>(0);
    }
    n
}

/// Every row as `id:amount:status`, in id order.
async fn state(client: &tokio_postgres::Client) -> Vec<String> {
    let q = "SELECT id::text || ':' || order_amount::text || ':' || pay_status FROM t_order ORDER BY id";
    client.query(q, &[]).await.expect("state").iter().map(|r| r.get::<_, String>(0)).collect()
}

fn insert(no: &str) -> String {
    format!("INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ('{no}', 1, 1.00, '2026-11-02 10:00+00')")
}

/// An order of merchant 2 (shard 2), else as `insert`.
fn other(no: &str) -> String {
    insert(no).replace("', 1, 1.00", "', 2, 1.00")
}

/// Parse of `sql` as the statement `name`, no parameter types.
fn parse(name: &str, sql: &str) -> Vec<u8> {
    frame(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat())
}

/// Bind of the statement `name` (no parameters) to `portal`.
fn bind(portal: &str, name: &str) -> Vec<u8> {
    frame(b'B', &[portal.as_bytes(), b"\0", name.as_bytes(), b"\0\0\0\0\0\0\0"].concat())
}

/// Execute of every row of `portal`.
fn exec(portal: &str) -> Vec<u8> {
    frame(b'E', &[portal.as_bytes(), b"\0\0\0\0\0"].concat())
}

/// A simple Query.
fn query(sql: &str) -> Vec<u8> {
    frame(b'Q', &[sql.as_bytes(), b"\0"].concat())
}

#[tokio::test]
async fn every_spelling_of_commit_commits_the_shards_too() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // simple protocol: COMMIT behind comments, in other case, with WORK / AND NO CHAIN
    let spellings = ["/* app:checkout */ COMMIT", "-- note\nCOMMIT", "  cOmMiT work", "END", "/* a /* nested */ b */ commit and no chain"];
    for (i, commit) in spellings.iter().enumerate() {
        let no = format!("CMT{i}");
        client.batch_execute("BEGIN").await.expect("begin");
        client.batch_execute(&insert(&no)).await.expect("insert");
        client.batch_execute(commit).await.unwrap_or_else(|e| panic!("{commit:?}: {e}"));
        assert_eq!(on_shard(&c, &no).await, 1, "{commit:?} acknowledged, row must be on the shard");
    }
    // extended protocol: a named COMMIT prepared before the transaction and executed
    // inside it (pgjdbc keeps COMMIT prepared once it passes prepareThreshold)
    let commit = client.prepare("/* pooled */ COMMIT").await.expect("prepare commit");
    for i in 0..2 {
        let no = format!("PREP{i}");
        client.batch_execute("BEGIN").await.expect("begin");
        client.execute(insert(&no).as_str(), &[]).await.expect("insert");
        client.execute(&commit, &[]).await.expect("prepared commit");
        assert_eq!(on_shard(&c, &no).await, 1, "prepared COMMIT #{i} acknowledged, row must be on the shard");
    }
    // and a named ROLLBACK rolls the shard back
    let rollback = client.prepare("ROLLBACK").await.expect("prepare rollback");
    client.batch_execute("BEGIN").await.expect("begin");
    client.execute(insert("RB1").as_str(), &[]).await.expect("insert");
    client.execute(&rollback, &[]).await.expect("prepared rollback");
    assert_eq!(on_shard(&c, "RB1").await, 0);
    // the session is clean afterwards
    let n: i64 = client.query_one("SELECT count(*) FROM t_order WHERE merchant_id = 1", &[]).await.expect("count").get(0);
    assert_eq!(n, 7);
}

#[tokio::test]
async fn transaction_control_the_shards_cannot_follow_is_refused_before_anything_commits() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let default = connect(&c.info.default_dsn).await.expect("db_default");
    default.batch_execute("CREATE TABLE outbox (id int)").await.expect("outbox");
    // COMMIT at the end of a multi-statement string: refused, nothing commits anywhere
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute(&insert("MIX1")).await.expect("insert");
    let e = client.batch_execute("INSERT INTO outbox VALUES (1); COMMIT").await.expect_err("mixed string refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    let m = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(m.contains("COMMIT or ROLLBACK as a statement of its own"), "{m}");
    // the transaction is aborted, as after any error: ROLLBACK ends it everywhere
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(on_shard(&c, "MIX1").await, 0);
    let n: i64 = default.query_one("SELECT count(*) FROM outbox", &[]).await.expect("outbox").get(0);
    assert_eq!(n, 0, "the outbox row must not commit without the order");
    // savepoints inside a block that touched t_order: refused (0A000) where the shards would
    // have to follow; COMMIT PREPARED fails as in PostgreSQL (25001 inside a block). Either
    // way the block is aborted and ROLLBACK leaves nothing
    for (before, stmt, code) in [
        ("", "COMMIT PREPARED 'x'", "25001"),
        ("", "SAVEPOINT a", "0A000"),
        ("", "/* c */ rollback to savepoint a", "0A000"),
        ("SAVEPOINT a", "/* c */ rollback to savepoint a", "0A000"),
    ] {
        client.batch_execute("BEGIN").await.expect("begin");
        if !before.is_empty() {
            client.batch_execute(before).await.expect("savepoint before t_order");
        }
        client.batch_execute(&insert("SP1")).await.expect("insert");
        let e = client.batch_execute(stmt).await.expect_err("refused");
        assert_eq!(sqlstate(&e).as_deref(), Some(code), "{before} {stmt}: {e}");
        client.batch_execute("ROLLBACK").await.expect("rollback");
        assert_eq!(on_shard(&c, "SP1").await, 0, "{stmt}");
    }
    // an order plus its outbox row (local message table) commit together
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute(&insert("OUT1")).await.expect("insert");
    client.batch_execute("INSERT INTO outbox VALUES (2)").await.expect("outbox");
    client.batch_execute("/* done */ COMMIT").await.expect("commit");
    assert_eq!(on_shard(&c, "OUT1").await, 1);
    let n: i64 = default.query_one("SELECT count(*) FROM outbox", &[]).await.expect("outbox").get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_statement_over_several_month_tables_or_shards_applies_completely_or_not_at_all() {
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client
        .batch_execute(
            "INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES \
             (1, 'A1', 5, 10.00, 'NEW', '2026-10-05 10:00+00'), (2, 'A2', 5, 20.00, 'NEW', '2026-12-05 10:00+00'), \
             (3, 'B1', 6, 30.00, 'NEW', '2026-11-05 10:00+00')",
        )
        .await
        .expect("seed");
    let before = state(&client).await;
    // the reproduced case: fails in December after October was updated (one shard, two months)
    for (simple, sql) in [
        (true, "UPDATE t_order SET order_amount = 100/(EXTRACT(MONTH FROM create_time)::int - 12) WHERE merchant_id = 5"),
        (false, "UPDATE t_order SET order_amount = 100/(EXTRACT(MONTH FROM create_time)::int - 12) WHERE merchant_id = 5"),
        (true, "UPDATE t_order SET pay_status = 'HALF', order_amount = order_amount / CASE WHEN create_time >= '2026-11-01 00:00+00' THEN 0 ELSE 1 END WHERE merchant_id = 5"),
        (true, "DELETE FROM t_order WHERE merchant_id = 5 AND 1/(EXTRACT(MONTH FROM create_time)::int - 12) > 0"),
    ] {
        let e = if simple { client.batch_execute(sql).await.expect_err(sql) } else { client.execute(sql, &[]).await.map(|_| ()).expect_err(sql) };
        assert_eq!(sqlstate(&e).as_deref(), Some("22012"), "{sql}: {e}");
        assert_eq!(state(&client).await, before, "{sql} left part of its work behind");
    }
    // a multi-row INSERT whose December row collides: the October row must not stay
    let e = client
        .batch_execute(
            "INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (7001, 'AT1', 5, '2026-10-10 00:00+00'), (2, 'AT2', 5, '2026-12-10 00:00+00')",
        )
        .await
        .expect_err("duplicate id");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    // and the same over two shards (two-phase commit)
    let e = client
        .batch_execute(
            "INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (7002, 'AT3', 6, '2026-11-10 00:00+00'), (2, 'AT4', 5, '2026-12-10 00:00+00')",
        )
        .await
        .expect_err("duplicate id");
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    assert_eq!(state(&client).await, before, "a failed INSERT left rows behind");
    // inside a block the statement fails as a whole too, and ROLLBACK undoes the rest
    client.batch_execute("BEGIN").await.expect("begin");
    client.batch_execute("UPDATE t_order SET pay_status = 'IN' WHERE merchant_id = 6").await.expect("update");
    assert!(client.batch_execute("UPDATE t_order SET order_amount = 100/(EXTRACT(MONTH FROM create_time)::int - 12) WHERE merchant_id = 5").await.is_err());
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(state(&client).await, before);
    // the successful form changes both months at once
    assert_eq!(client.execute("UPDATE t_order SET pay_status = 'PAID' WHERE merchant_id = 5", &[]).await.expect("update"), 2);
}

#[tokio::test]
async fn a_begin_later_in_a_batch_makes_the_whole_batch_one_block_that_rollback_undoes() {
    use std::io::Write;
    let c = start();
    let mut s = md5_login(&c);
    // one batch: a write, BEGIN, another write, Sync (PostgreSQL: the BEGIN turns the
    // implicit block into an explicit one, and the first write belongs to it)
    let mut batch = pbe(&insert("BATCH1"));
    batch.extend(pbe("BEGIN"));
    batch.extend(pbe(&insert("BATCH2")));
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).expect("batch");
    let msgs = read_until_ready(&mut s);
    assert!(!msgs.iter().any(|(t, _)| *t == b'E'), "the batch failed: {msgs:?}");
    s.write_all(&frame(b'Q', b"ROLLBACK\0")).expect("rollback");
    read_until_ready(&mut s);
    assert_eq!(on_shard(&c, "BATCH1").await, 0, "ROLLBACK must undo the write made before BEGIN in the same batch");
    assert_eq!(on_shard(&c, "BATCH2").await, 0);
    // and without BEGIN the batch commits at its Sync
    let mut batch = pbe(&insert("BATCH3"));
    batch.extend(pbe(&insert("BATCH4")));
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).expect("batch");
    read_until_ready(&mut s);
    assert_eq!(on_shard(&c, "BATCH3").await + on_shard(&c, "BATCH4").await, 2);
}

#[tokio::test]
async fn an_extended_batch_that_writes_a_shard_and_db_default_commits_both_or_neither() {
    use std::io::Write;
    let c = start();
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    client.batch_execute(&insert("OUTBOX1")).await.expect("seed");
    // an outbox table in db_default whose uniqueness is checked at commit
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    def.batch_execute("CREATE TABLE app_outbox (k int UNIQUE DEFERRABLE INITIALLY DEFERRED); INSERT INTO app_outbox VALUES (1)").await.expect("outbox");
    let status = || async {
        let shard = connect(&c.info.shards[1]).await.expect("shard");
        let mut out = Vec::new();
        for t in shardgate_tests::month_tables(&shard).await {
            for r in shard.query(&format!("SELECT coalesce(pay_status, 'NULL') FROM {t} WHERE order_no = 'OUTBOX1'"), &[]).await.expect("read") {
                out.push(r.get::<_, String>(0));
            }
        }
        out
    };
    let before = status().await;
    // one batch, no BEGIN (one implicit transaction in PostgreSQL): the order's update on db_1
    // and an outbox row on db_default that fails its deferred check when the batch commits
    let mut s = md5_login(&c);
    let mut batch = pbe("UPDATE t_order SET pay_status = 'SHIPPED' WHERE merchant_id = 1 AND order_no = 'OUTBOX1'");
    batch.extend(pbe("INSERT INTO app_outbox VALUES (1)"));
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).expect("batch");
    let msgs = read_until_ready(&mut s);
    assert_eq!(shardgate_tests::raw::error_code(&msgs).as_deref(), Some("23505"), "the batch fails at its commit: {msgs:?}");
    assert_eq!(status().await, before, "the shard's update must not outlive db_default's rollback");
    let n: i64 = def.query_one("SELECT count(*) FROM app_outbox", &[]).await.expect("outbox").get(0);
    assert_eq!(n, 1);
    // the same batch without the violation commits both
    let mut batch = pbe("UPDATE t_order SET pay_status = 'SHIPPED' WHERE merchant_id = 1 AND order_no = 'OUTBOX1'");
    batch.extend(pbe("INSERT INTO app_outbox VALUES (2)"));
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).expect("batch");
    let msgs = read_until_ready(&mut s);
    assert!(!msgs.iter().any(|(t, _)| *t == b'E'), "{msgs:?}");
    assert_eq!(status().await, vec!["SHIPPED".to_string()]);
    let n: i64 = def.query_one("SELECT count(*) FROM app_outbox", &[]).await.expect("outbox").get(0);
    assert_eq!(n, 2);
    // the outbox row first and the order's write last (pgjdbc executeBatch order): the same
    let mut batch = pbe("INSERT INTO app_outbox VALUES (1)");
    batch.extend(pbe("UPDATE t_order SET pay_status = 'RETURNED' WHERE merchant_id = 1 AND order_no = 'OUTBOX1'"));
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).expect("batch");
    let msgs = read_until_ready(&mut s);
    assert_eq!(shardgate_tests::raw::error_code(&msgs).as_deref(), Some("23505"), "{msgs:?}");
    assert_eq!(status().await, vec!["SHIPPED".to_string()], "the shard's update must not outlive db_default's rollback");
}

/// A failure and the COMMIT after it sent in one write, each with its Sync
/// (a pipelining driver): the COMMIT arrives before the failure's answer, yet
/// the block has failed when it runs, so PostgreSQL answers it ROLLBACK and
/// keeps nothing. The shards' part must roll back with it, not commit.
#[tokio::test]
async fn a_commit_pipelined_behind_a_failure_rolls_the_shards_back() {
    use std::io::Write;
    use shardgate_tests::raw::{error_code, frame, md5_login, pbe, read_until_ready};
    let c = start();
    for (no, failing) in [("PIPE1", "SELECT 1/0"), ("PIPE2", "SELECT nocol FROM t_order WHERE merchant_id = 1")] {
        let mut s = md5_login(&c);
        s.write_all(&[pbe("BEGIN"), pbe(&insert(no)), frame(b'S', b"")].concat()).expect("write");
        let msgs = read_until_ready(&mut s);
        assert_eq!(error_code(&msgs), None, "{msgs:?}");
        s.write_all(&[pbe(failing), frame(b'S', b""), pbe("COMMIT"), frame(b'S', b"")].concat()).expect("write");
        let failed = read_until_ready(&mut s);
        assert!(error_code(&failed).is_some(), "{failing}: {failed:?}");
        let commit = read_until_ready(&mut s);
        assert_eq!(error_code(&commit), None, "{commit:?}");
        let tag = commit.iter().find(|(t, _)| *t == b'C').map(|(_, b)| String::from_utf8_lossy(b).trim_end_matches('\0').to_string());
        assert_eq!(tag.as_deref(), Some("ROLLBACK"), "COMMIT of a failed block: {commit:?}");
        assert_eq!(commit.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])), "{commit:?}");
        drop(s);
        assert_eq!(on_shard(&c, no).await, 0, "{failing}: the block's order must not commit");
    }
}

/// A Parse of the unnamed statement drops the one before it even when it
/// fails, as in PostgreSQL: a Bind of the unnamed statement then answers
/// 26000, whether either statement is on t_order or not.
#[tokio::test]
async fn a_failed_unnamed_parse_drops_the_unnamed_statement_before_it() {
    use std::io::Write;
    use shardgate_tests::raw::{error_code, frame, md5_login, read_until_ready};
    let c = start();
    let mut s = md5_login(&c);
    let parse = |sql: &str| frame(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat());
    let bind_exec = [frame(b'B', b"\0\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0")].concat();
    let sync = frame(b'S', b"");
    let routed = "SELECT count(*) FROM t_order WHERE merchant_id = 1";
    for (first, failing) in [
        (routed, "SELECT * FROM t_order WHERE"),
        (routed, "SELECT * FROM shardgate_lookup_t_order_order_no"),
        (routed, "SELEC 1"),
        ("SELECT 1", "SELECT * FROM t_order WHERE"),
    ] {
        s.write_all(&[parse(first), bind_exec.clone(), sync.clone()].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{first}");
        s.write_all(&[parse(failing), sync.clone()].concat()).expect("send");
        assert!(error_code(&read_until_ready(&mut s)).is_some(), "{failing}");
        s.write_all(&[bind_exec.clone(), sync.clone()].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)).as_deref(), Some("26000"), "after {first} and a failed Parse of {failing}");
    }
}

/// The unnamed statement lasts across transactions: a COMMIT parsed as the
/// unnamed statement outside a block and bound inside a later one (whose
/// statements are named) commits that block's shards too, not db_default alone.
#[tokio::test]
async fn an_unnamed_commit_bound_in_a_later_block_commits_the_shards() {
    use std::io::Write;
    use shardgate_tests::raw::{error_code, frame, md5_login, read_until_ready};
    let c = start();
    let mut s = md5_login(&c);
    let bind_exec = |name: &str| [frame(b'B', &[b"\0", name.as_bytes(), b"\0\0\0\0\0\0\0"].concat()), frame(b'E', b"\0\0\0\0\0")].concat();
    let sync = frame(b'S', b"");
    // outside a block: a warning, no error
    s.write_all(&[parse("", "COMMIT"), bind_exec(""), sync.clone()].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    s.write_all(&[parse("b", "BEGIN"), bind_exec("b"), sync.clone()].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    s.write_all(&[parse("i", &insert("UCOMMIT1")), bind_exec("i"), sync.clone()].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    s.write_all(&[bind_exec(""), sync.clone()].concat()).expect("send");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])));
    drop(s);
    assert_eq!(on_shard(&c, "UCOMMIT1").await, 1, "the client was told COMMIT: the order is there");
}

/// A portal bound to COMMIT before the shards joined the block and executed
/// after: the shards commit with it (the client is told COMMIT).
#[tokio::test]
async fn a_commit_portal_bound_before_the_shards_joined_commits_them() {
    use std::io::Write;
    use shardgate_tests::raw::{error_code, frame, md5_login, read_until_ready};
    let c = start();
    for (no, statement) in [("PCOMMIT1", ""), ("PCOMMIT2", "cm")] {
        let mut s = md5_login(&c);
        s.write_all(&query("BEGIN")).expect("send");
        read_until_ready(&mut s);
        let parse = frame(b'P', &[statement.as_bytes(), b"\0COMMIT\0\0\0"].concat());
        let bind = frame(b'B', &[b"c\0", statement.as_bytes(), b"\0\0\0\0\0\0\0"].concat());
        s.write_all(&[parse, bind, frame(b'S', b"")].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        s.write_all(&query(&insert(no))).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        s.write_all(&[frame(b'E', b"c\0\0\0\0\0"), frame(b'S', b"")].concat()).expect("send");
        let msgs = read_until_ready(&mut s);
        assert_eq!(error_code(&msgs), None, "{msgs:?}");
        assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])));
        drop(s);
        assert_eq!(on_shard(&c, no).await, 1, "{statement:?}: the client was told COMMIT: the order is there");
    }
}

/// A block's end executed in the middle of an extended batch (no Sync before
/// the next statement) ends it there: PostgreSQL runs the statements after it
/// in a new implicit transaction, whether the block had failed or not. Each
/// batch is sent twice, once ending with a statement on t_order and once with
/// a plain `SELECT 1` that shardgate passes through to db_default (the
/// oracle): the messages must be the same, and the block's order must be on
/// its shard exactly when the block committed.
#[tokio::test]
async fn a_block_ended_mid_batch_lets_the_next_statements_run() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    let sync = frame(b'S', b"");
    let tags = |msgs: &[(u8, Vec<u8>)]| -> Vec<String> {
        msgs.iter()
            .map(|(t, b)| match t {
                b'C' => format!("C {}", String::from_utf8_lossy(b).trim_end_matches('\0')),
                b'E' => format!("E {}", error_code(&[(*t, b.clone())]).unwrap_or_default()),
                b'D' | b'T' => "row".to_string(),
                b'Z' => format!("Z {}", b[0] as char),
                t => (*t as char).to_string(),
            })
            .collect()
    };
    let routed = "SELECT 1 AS n FROM t_order WHERE merchant_id = 1 LIMIT 1";
    let mut case = 0;
    for fail in [true, false] {
        for end in ["ROLLBACK", "COMMIT"] {
            let mut answers = Vec::new();
            for last in ["SELECT 1 AS n", routed] {
                case += 1;
                let no = format!("MIDB{case}");
                let mut s = md5_login(&c);
                // a row on the shard so the routed read has one, as the plain one has
                s.write_all(&[pbe(&insert(&format!("{no}-seen"))), sync.clone()].concat()).expect("write");
                assert_eq!(error_code(&read_until_ready(&mut s)), None);
                let failing = if fail { pbe("SELECT 1/0") } else { Vec::new() };
                s.write_all(&[pbe("BEGIN"), pbe(&insert(&no)), failing, sync.clone()].concat()).expect("write");
                read_until_ready(&mut s);
                s.write_all(&[pbe(end), pbe(last), pbe(&insert(&format!("{no}-after"))), sync.clone()].concat()).expect("write");
                let msgs = read_until_ready(&mut s);
                answers.push(tags(&msgs));
                drop(s);
                let committed = !fail && end == "COMMIT";
                assert_eq!(on_shard(&c, &no).await, i64::from(committed), "{end} (failed block: {fail}) then {last}: {msgs:?}");
                assert_eq!(on_shard(&c, &format!("{no}-after")).await, 1, "the INSERT after {end} (failed block: {fail}), {last}: {msgs:?}");
            }
            assert_eq!(answers[1], answers[0], "{end} of a block (failed: {fail}) then a statement on t_order, in one batch");
        }
    }
}

/// A COMMIT of a block that wrote two shards (two-phase), executed in the
/// middle of a batch: a read later in the same batch sees both rows, as on one
/// server; and after `COMMIT AND CHAIN` the batch's next INSERT is in the new
/// block, which the batch's ROLLBACK ends without it.
#[tokio::test]
async fn a_two_phase_commit_mid_batch_is_seen_by_the_statements_after_it() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    let sync = frame(b'S', b"");
    let mut s = md5_login(&c);
    s.write_all(&[pbe("BEGIN"), pbe(&insert("TPC-A")), pbe(&other("TPC-B")), sync.clone()].concat()).expect("write");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    let read = "SELECT count(*) FROM t_order WHERE order_no IN ('TPC-A', 'TPC-B')";
    s.write_all(&[pbe("COMMIT"), pbe(read), sync.clone()].concat()).expect("write");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    let count = msgs.iter().find(|(t, _)| *t == b'D').map(|(_, b)| String::from_utf8_lossy(&b[6..]).to_string());
    assert_eq!(count.as_deref(), Some("2"), "the read after the COMMIT, in its batch: {msgs:?}");
    assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])));

    s.write_all(&[pbe("BEGIN"), pbe(&insert("CHAIN-1")), pbe(&other("CHAIN-2")), sync.clone()].concat()).expect("write");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    s.write_all(&[pbe("COMMIT AND CHAIN"), pbe(&insert("CHAIN-3")), pbe("ROLLBACK"), sync.clone()].concat()).expect("write");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])));
    drop(s);
    assert_eq!(on_shard(&c, "CHAIN-1").await, 1, "committed by COMMIT AND CHAIN");
    assert_eq!(on_shard(&c, "CHAIN-3").await, 0, "in the chained block, rolled back");
}

/// From a review of the mid-batch block end: a COMMIT bound (the shards
/// prepared, the decision riding on it) and executed only after other
/// statements commits both shards' rows, and a savepoint in between is
/// refused rather than settling the decision before the COMMIT ran; and a
/// portal on t_order bound in a block and executed after a mid-batch COMMIT
/// is gone, as a plain portal is (34000), its INSERT never run.
#[tokio::test]
async fn a_block_end_mid_batch_keeps_the_commit_and_drops_the_portals() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    let sync = frame(b'S', b"");
    let on_both = |no: &'static str| {
        let c = &c;
        async move {
            let shard2 = connect(&c.info.shards[2]).await.expect("shard 2");
            let mut on2 = 0;
            for t in shardgate_tests::month_tables(&shard2).await {
                on2 += shard2.query_one(&format!("SELECT count(*) FROM {t} WHERE order_no = $1"), &[&format!("{no}-B")]).await.expect("count").get::<_, i64>(0);
            }
            (on_shard(c, &format!("{no}-A")).await, on2)
        }
    };
    // a savepoint after the COMMIT's Bind is refused (the shards' decision is pending), and
    // nothing of the block commits; without one, a routed Parse between the COMMIT's Bind
    // and its Execute (a barrier) does not settle the decision early
    for (no, between, refused) in [("RBT", vec![pbe("SAVEPOINT s2"), pbe("ROLLBACK TO SAVEPOINT s2")], true), ("RBQ", vec![], false)] {
        let mut s = md5_login(&c);
        s.write_all(&[pbe("BEGIN"), pbe(&insert(&format!("{no}-A"))), pbe(&other(&format!("{no}-B"))), sync.clone()].concat()).expect("write");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        s.write_all(&[&[parse("c", "COMMIT"), bind("c", "c")][..], &between, &[parse("q", "SELECT 1 FROM t_order WHERE merchant_id = 1"), exec("c"), sync.clone()]].concat().concat()).expect("write");
        let msgs = read_until_ready(&mut s);
        assert_eq!(error_code(&msgs).as_deref(), refused.then_some("0A000"), "{no}: {msgs:?}");
        s.write_all(&[pbe("ROLLBACK"), sync.clone()].concat()).expect("write");
        read_until_ready(&mut s);
        drop(s);
        let want = if refused { (0, 0) } else { (1, 1) };
        assert_eq!(on_both(no).await, want, "{no}: on shard 1 and shard 2: {msgs:?}");
    }

    let mut codes = Vec::new();
    for (name, sql) in [("plain", "SELECT 1".to_string()), ("routed", insert("PORTAL-GONE"))] {
        let mut s = md5_login(&c);
        s.write_all(&[pbe("BEGIN"), parse("w", &sql), bind("w", "w"), sync.clone()].concat()).expect("write");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{name}");
        s.write_all(&[pbe("COMMIT"), exec("w"), sync.clone()].concat()).expect("write");
        codes.push(error_code(&read_until_ready(&mut s)));
    }
    assert_eq!(codes[0].as_deref(), Some("34000"), "one server: the portal ended with its block");
    assert_eq!(codes[1], codes[0], "the routed portal after a mid-batch COMMIT");
    assert_eq!(on_shard(&c, "PORTAL-GONE").await, 0);
}

/// From a review: the proxy remembers portals bound to COMMIT (and the like)
/// until their block ends, and the client may be batches ahead of the
/// replies. An earlier batch's idle ReadyForQuery must not make it forget a
/// COMMIT portal of a later batch (db_default then committed alone and the
/// shard's part was dropped: the order lost though the client was told
/// COMMIT); and a COMMIT portal spent mid-batch is gone, as in PostgreSQL
/// (34000), never a second COMMIT of the shards.
#[tokio::test]
async fn commit_portals_are_remembered_for_their_own_block() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    let sync = frame(b'S', b"");
    let mut s = md5_login(&c);
    s.write_all(&[parse("c", "COMMIT"), sync.clone()].concat()).expect("write");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    // batch 1 ends idle; batch 2 binds the COMMIT before its INSERT (whose Bind waits for
    // batch 1's ReadyForQuery) and executes it after
    s.write_all(&[pbe("SELECT 1"), sync.clone(), pbe("BEGIN"), bind("p", "c"), pbe(&insert("AHEAD-1")), exec("p"), sync.clone()].concat()).expect("write");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])), "{msgs:?}");
    assert_eq!(on_shard(&c, "AHEAD-1").await, 1, "acknowledged by COMMIT: {msgs:?}");
    // a COMMIT portal executed, then a block with an INSERT, then the spent portal again
    s.write_all(&[bind("p", "c"), exec("p"), pbe("BEGIN"), pbe(&insert("SPENT-1")), exec("p"), sync.clone()].concat()).expect("write");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs).as_deref(), Some("34000"), "the spent COMMIT portal: {msgs:?}");
    s.write_all(&[pbe("ROLLBACK"), sync.clone()].concat()).expect("write");
    read_until_ready(&mut s);
    drop(s);
    assert_eq!(on_shard(&c, "SPENT-1").await, 0, "the block failed and was rolled back");
}

/// From a review: once a COMMIT carrying a two-phase decision is bound, the
/// shards' transactions are prepared and released, but PREPARE TRANSACTION
/// stays refused until that COMMIT has run. Before, it ran: db_default's part
/// (with the decision row) was prepared, the decision read as "no", and the
/// shards rolled back, so a later COMMIT PREPARED acknowledged rows that were gone.
#[tokio::test]
async fn prepare_transaction_after_a_bound_two_phase_commit_is_refused() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    let sync = frame(b'S', b"");
    // extended, and as a simple Query after the batch that bound the COMMIT
    for (no, simple) in [("PT-A", false), ("PT-S", true)] {
        let mut s = md5_login(&c);
        s.write_all(&[pbe("BEGIN"), pbe(&insert(no)), pbe(&other(&format!("{no}-2"))), sync.clone()].concat()).expect("write");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        let msgs = if simple {
            s.write_all(&[parse("c", "COMMIT"), bind("c", "c"), sync.clone(), frame(b'Q', b"PREPARE TRANSACTION 'pt'\0")].concat()).expect("write");
            assert_eq!(error_code(&read_until_ready(&mut s)), None);
            read_until_ready(&mut s)
        } else {
            s.write_all(&[parse("c", "COMMIT"), bind("c", "c"), pbe("PREPARE TRANSACTION 'pt'"), sync.clone()].concat()).expect("write");
            read_until_ready(&mut s)
        };
        assert_eq!(error_code(&msgs).as_deref(), Some("0A000"), "{no}: {msgs:?}");
        s.write_all(&[pbe("ROLLBACK"), sync.clone()].concat()).expect("write");
        read_until_ready(&mut s);
        drop(s);
        assert_eq!(on_shard(&c, no).await, 0, "{no}: the block was rolled back");
    }
}

/// From a review: a COMMIT bound with the extended protocol carries a
/// two-phase decision; when the client then writes again and ends the block
/// with a simple COMMIT instead, both decisions are settled before the client
/// hears COMMIT (before, the first one's shards stayed prepared: the rows
/// invisible and locked until orphan recovery); and a simple COMMIT AND CHAIN
/// in that state is refused (its chained block would keep them prepared).
#[tokio::test]
async fn a_bound_commit_overtaken_by_a_simple_commit_settles_its_decision() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    let sync = frame(b'S', b"");
    for (no, end, committed) in [("OVT", "COMMIT", true), ("OVC", "COMMIT AND CHAIN", false)] {
        let mut s = md5_login(&c);
        s.write_all(&[pbe("BEGIN"), pbe(&insert(&format!("{no}-1"))), pbe(&other(&format!("{no}-2"))), sync.clone()].concat()).expect("write");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        s.write_all(&[parse("c", "COMMIT"), bind("c", "c"), sync.clone(), query(&insert(&format!("{no}-3"))), query(end)].concat()).expect("write");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        let msgs = read_until_ready(&mut s);
        if committed {
            assert_eq!(error_code(&msgs), None, "{no}: {msgs:?}");
            // read on the shard itself right after the client heard COMMIT
            assert_eq!(on_shard(&c, &format!("{no}-1")).await, 1, "{no}: the first decision's row");
            assert_eq!(on_shard(&c, &format!("{no}-3")).await, 1, "{no}: the second's");
        } else {
            assert_eq!(error_code(&msgs).as_deref(), Some("0A000"), "{no}: {msgs:?}");
            s.write_all(&query("ROLLBACK")).expect("write");
            read_until_ready(&mut s);
            assert_eq!(on_shard(&c, &format!("{no}-1")).await, 0, "{no}: rolled back");
        }
    }
}

/// `COMMIT AND CHAIN` (simple protocol) of a block that wrote two shards
/// commits them and opens the next block at once, as PostgreSQL does
/// (ReadyForQuery `T`): a write after it is undone by the client's ROLLBACK.
/// Before, the proxy committed with a plain COMMIT and answered `I`, so the
/// next write committed on its own.
#[tokio::test]
async fn commit_and_chain_across_shards_opens_the_next_block() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    let mut s = md5_login(&c);
    for sql in ["BEGIN".to_string(), insert("CHN-1"), other("CHN-2")] {
        s.write_all(&query(&sql)).expect("write");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{sql}");
    }
    s.write_all(&query("COMMIT AND CHAIN")).expect("write");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'T'])), "in the chained block: {msgs:?}");
    assert_eq!(on_shard(&c, "CHN-1").await, 1, "committed");
    for sql in [insert("CHN-3"), "ROLLBACK".to_string()] {
        s.write_all(&query(&sql)).expect("write");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{sql}");
    }
    drop(s);
    assert_eq!(on_shard(&c, "CHN-3").await, 0, "the chained block's write was rolled back");
}

/// From a review of 0f0993c: a COMMIT portal bound in a block that then ends
/// with a simple COMMIT AND CHAIN is gone in the chained block (34000), and
/// never commits that block's shard.
#[tokio::test]
async fn a_commit_portal_does_not_outlive_commit_and_chain() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    let sync = frame(b'S', b"");
    let mut s = md5_login(&c);
    s.write_all(&[query("BEGIN"), parse("c", "COMMIT"), bind("p", "c"), sync.clone()].concat()).expect("write");
    read_until_ready(&mut s);
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    // (the chained block's write is an UPDATE: an INSERT's order_no entry would make
    // db_default written, and its failure would then roll the shard back anyway)
    let update = "UPDATE t_order SET order_amount = 9.99 WHERE merchant_id = 1 AND order_no = 'CHP-1'".to_string();
    for sql in [insert("CHP-1"), other("CHP-2"), "COMMIT AND CHAIN".to_string(), update] {
        s.write_all(&query(&sql)).expect("write");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{sql}");
    }
    s.write_all(&[frame(b'E', b"p\0\0\0\0\0"), sync.clone()].concat()).expect("write");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs).as_deref(), Some("34000"), "{msgs:?}");
    s.write_all(&query("ROLLBACK")).expect("write");
    read_until_ready(&mut s);
    drop(s);
    assert_eq!(on_shard(&c, "CHP-1").await, 1);
    let shard = connect(&c.info.shards[1]).await.expect("shard");
    let mut amounts = Vec::new();
    for t in shardgate_tests::month_tables(&shard).await {
        for r in shard.query(&format!("SELECT order_amount::text FROM {t} WHERE order_no = 'CHP-1'"), &[]).await.expect("read") {
            amounts.push(r.get::<_, String>(0));
        }
    }
    assert_eq!(amounts, ["1.00"], "the chained block's UPDATE was rolled back");
}

/// COMMIT bound to the unnamed portal before the shards joined, and executed
/// (`Execute ""`) after routed statements that used named portals, which leave
/// the unnamed portal in place in PostgreSQL: the proxy's own queries on
/// db_default (at that Execute, or at a Parse of another COMMIT before it)
/// must not drop it. Before, db_default answered 34000 after the shards had
/// committed, so the client was told its COMMIT failed while the order stayed.
#[tokio::test]
async fn an_unnamed_commit_portal_survives_the_proxys_own_queries() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    for (no, two_shards, parse_commit_first) in [("UPORTAL1", false, false), ("UPORTAL2", true, false), ("UPORTAL3", false, true), ("UPORTAL4", true, true)] {
        let mut s = md5_login(&c);
        s.write_all(&query("BEGIN")).expect("send");
        read_until_ready(&mut s);
        s.write_all(&[parse("", "COMMIT"), bind("", ""), frame(b'S', b"")].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        let mut batch = [parse("i", &insert(no)), bind("p", "i"), exec("p")].concat();
        if two_shards {
            batch.extend([parse("o", &other(&format!("{no}b"))), bind("q", "o"), exec("q")].concat());
        }
        batch.extend(frame(b'S', b""));
        s.write_all(&batch).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        if parse_commit_first {
            s.write_all(&[parse("c", "COMMIT"), frame(b'S', b"")].concat()).expect("send");
            assert_eq!(error_code(&read_until_ready(&mut s)), None);
        }
        s.write_all(&[exec(""), frame(b'S', b"")].concat()).expect("send");
        let msgs = read_until_ready(&mut s);
        let committed = error_code(&msgs).is_none();
        let status = msgs.last().map(|(t, b)| (*t, b.clone()));
        // whatever the client was told, the shard must agree with it
        s.write_all(&query("ROLLBACK")).expect("send");
        read_until_ready(&mut s);
        drop(s);
        let n = on_shard(&c, no).await;
        let case = format!("two shards: {two_shards}, COMMIT parsed first: {parse_commit_first}");
        assert_eq!(n, i64::from(committed), "{case}: told {msgs:?}, the shard has {n}");
        assert!(committed, "{case}: PostgreSQL commits: {msgs:?}");
        assert_eq!(status, Some((b'Z', vec![b'I'])));
    }
}

/// The other side: an unnamed COMMIT portal that PostgreSQL has dropped (a
/// Close, a simple Query, a ROLLBACK TO of a savepoint older than it) is not
/// brought back by the proxy when the shards have joined: its Execute fails
/// (PostgreSQL's 34000, or 0A000 where the proxy cannot tell) and nothing of
/// the block commits.
#[tokio::test]
async fn a_dropped_unnamed_commit_portal_commits_nothing() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    for (no, dropped_by, code) in [
        ("UDROP1", frame(b'C', b"P\0"), "34000"),
        ("UDROP2", query("SELECT 1"), "34000"),
        ("UDROP3", [parse("r", "ROLLBACK TO s"), bind("r", "r"), exec("r")].concat(), "0A000"),
    ] {
        let mut s = md5_login(&c);
        s.write_all(&query("BEGIN")).expect("send");
        read_until_ready(&mut s);
        s.write_all(&query("SAVEPOINT s")).expect("send");
        read_until_ready(&mut s);
        s.write_all(&[parse("", "COMMIT"), bind("", ""), frame(b'S', b"")].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{no}");
        let sync = if dropped_by[0] == b'Q' { Vec::new() } else { frame(b'S', b"") };
        s.write_all(&[dropped_by, sync].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{no}");
        let batch = [parse("i", &insert(no)), bind("p", "i"), exec("p"), parse("o", &other(&format!("{no}b"))), bind("q", "o"), exec("q"), frame(b'S', b"")].concat();
        s.write_all(&batch).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{no}");
        s.write_all(&[exec(""), frame(b'S', b"")].concat()).expect("send");
        let msgs = read_until_ready(&mut s);
        assert_eq!(error_code(&msgs).as_deref(), Some(code), "{no}: {msgs:?}");
        s.write_all(&query("ROLLBACK")).expect("send");
        read_until_ready(&mut s);
        drop(s);
        assert_eq!(on_shard(&c, no).await, 0, "{no}: the client was told the COMMIT failed");
    }
}

/// A simple `COMMIT AND CHAIN` / `ROLLBACK AND CHAIN` (alone or in a string of
/// several statements) ends the block's portals although the status stays
/// in a block, and a ROLLBACK TO drops those bound after its savepoint: a
/// COMMIT portal executed after that, once a shard has joined with an UPDATE
/// (no order_no entry in db_default, so one shard commits on its own), is
/// PostgreSQL's 34000 or refused, and the shard's part must not commit. Also
/// a Describe of the unnamed COMMIT portal after the proxy's own queries
/// dropped it on db_default: NoData, as PostgreSQL answers, then COMMIT.
#[tokio::test]
async fn portals_of_a_chained_block_and_a_described_unnamed_commit() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    /// Whether a message starts at `i` of a run of whole frames.
    fn is_frame_start(frames: &[u8], i: usize) -> bool {
        let mut at = 0;
        while at < frames.len() {
            if at == i {
                return true;
            }
            at += 1 + u32::from_be_bytes(frames[at + 1..at + 5].try_into().expect("length")) as usize;
        }
        false
    }
    /// order_amount of the order on merchant 1's shard, all months.
    async fn amount(c: &Cluster, no: &str) -> String {
        let shard = connect(&c.info.shards[1]).await.expect("shard");
        let mut out = Vec::new();
        for t in shardgate_tests::month_tables(&shard).await {
            for r in shard.query(&format!("SELECT order_amount::text FROM {t} WHERE order_no = $1"), &[&no]).await.expect("read") {
                out.push(r.get::<_, String>(0));
            }
        }
        out.join(",")
    }
    let mut setup = md5_login(&c);
    let cases: [(&str, Vec<&str>, Vec<u8>); 7] = [
        // the string fails inside a savepoint made after the Bind, before its COMMIT runs:
        // the block and the portal go on in PostgreSQL (after ROLLBACK TO), so the COMMIT
        // commits there
        ("CHAINP5", vec![], [query("SAVEPOINT s"), query("SELECT 1/0; COMMIT AND CHAIN"), query("ROLLBACK TO s")].concat()),
        ("CHAINP1", vec![], query("COMMIT AND CHAIN")),
        ("CHAINP2", vec![], query("ROLLBACK AND CHAIN")),
        ("CHAINP3", vec![], query("SELECT 1; COMMIT AND CHAIN")),
        ("CHAINP4", vec![], query("COMMIT; BEGIN")),
        ("ROLLTO1", vec!["SAVEPOINT s"], query("ROLLBACK TO s")),
        ("ROLLTO2", vec!["SAVEPOINT s"], [parse("r", "ROLLBACK TO s"), bind("rp", "r"), exec("rp"), frame(b'S', b"")].concat()),
    ];
    for (no, before, end) in cases {
        setup.write_all(&query(&insert(no))).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut setup)), None);
        let mut s = md5_login(&c);
        for q in std::iter::once("BEGIN").chain(before) {
            s.write_all(&query(q)).expect("send");
            read_until_ready(&mut s);
        }
        s.write_all(&[parse("c", "COMMIT"), bind("cp", "c"), frame(b'S', b"")].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        s.write_all(&end).expect("send");
        let readies = end.iter().enumerate().filter(|(i, b)| (**b == b'Q' || **b == b'S') && is_frame_start(&end, *i)).count();
        for _ in 0..readies - 1 {
            read_until_ready(&mut s);
        }
        let last = read_until_ready(&mut s);
        if no != "CHAINP5" {
            assert_eq!(error_code(&last), None, "{no}");
        }
        s.write_all(&query(&format!("UPDATE t_order SET order_amount = 2.00 WHERE merchant_id = 1 AND order_no = '{no}'"))).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None, "{no}");
        s.write_all(&[exec("cp"), frame(b'S', b"")].concat()).expect("send");
        let msgs = read_until_ready(&mut s);
        let failed = error_code(&msgs);
        s.write_all(&query("ROLLBACK")).expect("send");
        read_until_ready(&mut s);
        drop(s);
        // whatever the client was told, the shard agrees with it
        let want = if failed.is_none() { "2.00" } else { "1.00" };
        assert_eq!(amount(&c, no).await, want, "{no}: told {msgs:?}");
        if no == "CHAINP5" {
            assert!(matches!(failed.as_deref(), None | Some("0A000")), "{no}: PostgreSQL commits, or refused: {msgs:?}");
        } else {
            assert!(matches!(failed.as_deref(), Some("34000" | "0A000")), "{no}: {msgs:?}");
        }
    }
    // a COMMIT that PostgreSQL refuses before it runs, after a shard joined: parsed under a
    // statement name in use (42P05), bound with a parameter it does not take (08P01), or a
    // routed statement bound under the COMMIT portal's name (42P03); nothing commits
    let one_param = frame(b'B', &[b"\0c\0".as_slice(), &0i16.to_be_bytes(), &1i16.to_be_bytes(), &1i32.to_be_bytes(), b"1", &0i16.to_be_bytes()].concat());
    let select = "SELECT order_amount FROM t_order WHERE merchant_id = 1 AND order_no = 'x'";
    for (no, attack, code) in [
        ("REPARSE1", [parse("c", "COMMIT"), frame(b'S', b"")].concat(), "42P05"),
        ("PARAMS1", [one_param, exec(""), frame(b'S', b"")].concat(), "08P01"),
        // COMMIT parsed with a declared parameter type, bound with none: 08P01 at the Bind
        ("PARAMS2", [frame(b'P', b"t\0COMMIT\0\0\x01\0\0\0\x17"), bind("", "t"), exec(""), frame(b'S', b"")].concat(), "08P01"),
        ("REBIND2", [parse("r", select), bind("cp", "r"), exec("cp"), frame(b'S', b"")].concat(), "42P03"),
        // the COMMIT bound again under the portal name in use: PostgreSQL refuses the Bind
        // (42P03); the shard must not have committed at that Bind
        ("REBIND1", [bind("cp", "c"), frame(b'S', b"")].concat(), "42P03"),
    ] {
        setup.write_all(&query(&insert(no))).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut setup)), None);
        let mut s = md5_login(&c);
        s.write_all(&query("BEGIN")).expect("send");
        read_until_ready(&mut s);
        s.write_all(&[parse("c", "COMMIT"), bind("cp", "c"), frame(b'S', b"")].concat()).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        s.write_all(&query(&format!("UPDATE t_order SET order_amount = 2.00 WHERE merchant_id = 1 AND order_no = '{no}'"))).expect("send");
        assert_eq!(error_code(&read_until_ready(&mut s)), None);
        s.write_all(&attack).expect("send");
        let msgs = read_until_ready(&mut s);
        assert_eq!(error_code(&msgs).as_deref(), Some(code), "{no}: {msgs:?}");
        s.write_all(&query("ROLLBACK")).expect("send");
        read_until_ready(&mut s);
        drop(s);
        assert_eq!(amount(&c, no).await, "1.00", "{no}: refused, then rolled back");
    }
    // a portal name freed by a Sync pipelined ahead (outside a block the portal ends
    // with its implicit transaction) is free for the next Bind, as in PostgreSQL
    let mut s = md5_login(&c);
    s.write_all(&[parse("c", "COMMIT"), bind("cp", "c"), exec("cp"), frame(b'S', b""), parse("s", "SELECT 1"), bind("cp", "s"), exec("cp"), frame(b'S', b"")].concat()).expect("send");
    for _ in 0..2 {
        let msgs = read_until_ready(&mut s);
        assert_eq!(error_code(&msgs), None, "{msgs:?}");
    }
    drop(s);
    // Describe of the unnamed COMMIT portal after the proxy's own queries (a Parse of
    // COMMIT while a shard takes part): NoData, then the COMMIT commits the shard
    let mut s = md5_login(&c);
    s.write_all(&query("BEGIN")).expect("send");
    read_until_ready(&mut s);
    s.write_all(&[parse("", "COMMIT"), bind("", ""), frame(b'S', b"")].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    s.write_all(&[parse("i", &insert("DESCP1")), bind("p", "i"), exec("p"), frame(b'S', b"")].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    s.write_all(&[parse("c2", "COMMIT"), frame(b'S', b"")].concat()).expect("send");
    assert_eq!(error_code(&read_until_ready(&mut s)), None);
    s.write_all(&[frame(b'D', b"P\0"), exec(""), frame(b'S', b"")].concat()).expect("send");
    let msgs = read_until_ready(&mut s);
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    assert_eq!(msgs.first().map(|(t, _)| *t), Some(b'n'), "NoData first: {msgs:?}");
    assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])));
    drop(s);
    assert_eq!(on_shard(&c, "DESCP1").await, 1, "the client was told COMMIT");
}

/// A simple Query sent inside an extended batch that has already failed is
/// ignored by PostgreSQL, which skips every message up to the batch's Sync:
/// one ErrorResponse, one ReadyForQuery, and the session goes on.
#[tokio::test]
async fn a_query_inside_a_failed_extended_batch_is_skipped() {
    use std::io::Write;
    use shardgate_tests::raw::error_code;
    let c = start();
    for skipped in [query("SELECT 1"), query(&insert("SKIPPEDQ1")), query("COMMIT")] {
        let mut s = md5_login(&c);
        s.write_all(&query("BEGIN")).expect("send");
        read_until_ready(&mut s);
        s.write_all(&[parse("z", "SELECT 1/0"), bind("zp", "z"), exec("zp"), skipped, frame(b'S', b"")].concat()).expect("send");
        let msgs = read_until_ready(&mut s);
        assert_eq!(error_code(&msgs).as_deref(), Some("22012"), "{msgs:?}");
        assert_eq!(msgs.iter().filter(|(t, _)| *t == b'E').count(), 1, "{msgs:?}");
        assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'E'])), "{:?}", msgs.iter().map(|(t, b)| (*t as char, String::from_utf8_lossy(b).into_owned())).collect::<Vec<_>>());
        s.write_all(&query("ROLLBACK")).expect("send");
        let msgs = read_until_ready(&mut s);
        assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])), "{msgs:?}");
        // every later answer is the one to its own statement
        for n in 2..5 {
            s.write_all(&query(&format!("SELECT {n}"))).expect("send");
            let msgs = read_until_ready(&mut s);
            let row = msgs.iter().find(|(t, _)| *t == b'D').map(|(_, b)| b[6..].to_vec());
            assert_eq!(row, Some(n.to_string().into_bytes()), "{msgs:?}");
            assert_eq!(msgs.last().map(|(t, b)| (*t, b.clone())), Some((b'Z', vec![b'I'])));
        }
    }
    assert_eq!(on_shard(&c, "SKIPPEDQ1").await, 0);
}
