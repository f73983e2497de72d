//! Ids are unique across proxies: each proxy leases its own worker id from
//! db_default, and one whose lease is gone issues no ids.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use shardgate_tests::{connect, month_tables, sqlstate, Cluster, Options};

const LEASE: &str = "[ids]\nlease_ttl_ms = 3000\n";

/// Every id in every month table of every shard.
async fn all_ids(c: &Cluster) -> Vec<i64> {
    let mut ids = Vec::new();
    for dsn in &c.info.shards {
        let shard = connect(dsn).await.expect("shard");
        for t in month_tables(&shard).await {
            ids.extend(shard.query(&format!("SELECT id FROM {t}"), &[]).await.expect("ids").iter().map(|r| r.get::<_, i64>(0)));
        }
    }
    ids
}

fn worker_of(id: i64) -> i64 {
    (id >> 16) & 63
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_on_one_config_never_issue_the_same_id() {
    let c = Cluster::start_temp(Options { redis: false, extra_toml: LEASE.into(), ..Options::default() }).expect("start cluster");
    let b = c.start_extra_proxy().expect("second proxy");
    let d = c.start_extra_proxy().expect("third proxy");
    let seconds: u64 = std::env::var("SHARDGATE_LEASE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut tasks = Vec::new();
    for (p, dsn) in [c.info.proxy_dsn.clone(), b.dsn.clone(), d.dsn.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let client = connect(&dsn).await.expect("connect");
            let ins = client.prepare("INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ($1, $2, now()) RETURNING id").await.expect("prepare");
            let t0 = Instant::now();
            let mut ids = Vec::new();
            let mut n = 0i64;
            while t0.elapsed() < Duration::from_secs(seconds) {
                let id: i64 = client.query_one(&ins, &[&format!("P{p}-{n}"), &(n % 16)]).await.expect("insert").get(0);
                ids.push(id);
                n += 1;
            }
            ids
        }));
    }
    let mut acknowledged = Vec::new();
    let mut workers = Vec::new();
    for t in tasks {
        let ids = t.await.expect("task");
        assert!(!ids.is_empty());
        let w: HashSet<i64> = ids.iter().map(|i| worker_of(*i)).collect();
        assert_eq!(w.len(), 1, "one proxy, one worker id: {w:?}");
        workers.extend(w);
        acknowledged.extend(ids);
    }
    let distinct_workers: HashSet<i64> = workers.iter().copied().collect();
    assert_eq!(distinct_workers.len(), 3, "each proxy leased its own worker id: {workers:?}");
    let stored = all_ids(&c).await;
    let unique: HashSet<i64> = stored.iter().copied().collect();
    assert_eq!(unique.len(), stored.len(), "{} duplicate ids on the shards", stored.len() - unique.len());
    assert_eq!(stored.len(), acknowledged.len(), "every acknowledged insert is stored once");
    println!("{} ids from 3 proxies (workers {workers:?}), 0 duplicates", stored.len());

    // a proxy whose lease is taken over stops issuing ids (explicit ids still work)
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let taken = def
        .execute("UPDATE shardgate_worker_leases SET holder = 'someone else' WHERE worker_id = $1", &[&(workers[1] as i32)])
        .await
        .expect("take the lease over");
    assert_eq!(taken, 1);
    let client = connect(&b.dsn).await.expect("connect");
    let t0 = Instant::now();
    let mut k = 0;
    let e = loop {
        k += 1;
        match client.query_one("INSERT INTO t_order (order_no, merchant_id) VALUES ($1, 1) RETURNING id", &[&format!("after-{k}")]).await {
            Err(e) => break e,
            Ok(_) => assert!(t0.elapsed() < Duration::from_secs(6), "the proxy kept issuing ids after losing its lease"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    let m = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(m.contains("worker-id lease"), "{m}");
    client
        .batch_execute("INSERT INTO t_order (id, order_no, merchant_id, create_time) VALUES (42, 'explicit', 1, now())")
        .await
        .expect("an explicit id needs no lease");
    // the others go on
    connect(&d.dsn).await.expect("connect").batch_execute("INSERT INTO t_order (order_no, merchant_id) VALUES ('still', 2)").await.expect("third proxy");
}

#[tokio::test]
async fn a_new_holder_of_a_worker_id_starts_after_what_the_last_one_reserved() {
    let mut c = Cluster::start_temp(Options { redis: false, extra_toml: LEASE.into(), ..Options::default() }).expect("start cluster");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    let first: i64 = client.query_one("INSERT INTO t_order (order_no, merchant_id) VALUES ('a', 1) RETURNING id", &[]).await.expect("insert").get(0);
    drop(client);
    c.kill_proxy().expect("kill");
    // as if the clock had been far ahead when the last holder ran: it reserved a time in the future
    let def = connect(&c.info.default_dsn).await.expect("db_default");
    let future_ms: i64 = 1_704_067_200_000 + ((first >> 22) + 3_600_000);
    def.execute("UPDATE shardgate_worker_leases SET expires_at = now(), reserved_until_ms = $1", &[&future_ms]).await.expect("expire");
    c.start_proxy().expect("restart");
    let client = connect(&c.info.proxy_dsn).await.expect("connect");
    // the restarted proxy's clock is now an hour "behind" what was reserved: it must not
    // issue ids in the reserved range; it refuses until its clock catches up
    let r = client.query_one("INSERT INTO t_order (order_no, merchant_id) VALUES ('b', 1) RETURNING id", &[]).await;
    match r {
        Ok(row) => {
            let id: i64 = row.get(0);
            assert!((id >> 22) + 1_704_067_200_000 > future_ms, "an id inside the reserved range was issued again");
        }
        Err(e) => assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}"),
    }
}
