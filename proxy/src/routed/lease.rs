//! Worker-id leases: a proxy without `ids.worker_id` takes a free worker id
//! (0..=63) from `shardgate_worker_leases` in `db_default`, renews it every
//! third of `ids.lease_ttl_ms`, and issues ids only while it knows it holds
//! it (the generator's fence). Two proxies never hold one worker id at once:
//! a lease is taken only where none is live, by the database's clock, and
//! the fence ends a tenth of the TTL before the lease would expire.
//!
//! Each renewal also records `reserved_until_ms`, past the last millisecond
//! the holder may use: the next holder of that worker id (the same proxy
//! restarted with its clock set back, or another one) starts its ids after
//! it, so no id is issued twice.
//!
//! The control plane speaks to `db_default` through tokio-postgres with bind
//! parameters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use shardgate_config::Dsn;

const DDL: &str = "CREATE TABLE IF NOT EXISTS shardgate_worker_leases (\
    worker_id int PRIMARY KEY CHECK (worker_id BETWEEN 0 AND 63), \
    holder text NOT NULL, \
    expires_at timestamptz NOT NULL, \
    reserved_until_ms bigint NOT NULL DEFAULT 0)";

/// Takes the lowest worker id whose lease is free or expired; returns it and
/// the previous holder's `reserved_until_ms`.
const ACQUIRE: &str = "INSERT INTO shardgate_worker_leases AS l (worker_id, holder, expires_at) \
    SELECT w, $1, now() + $2::bigint * interval '1 millisecond' FROM generate_series(0, 63) w \
    WHERE NOT EXISTS (SELECT 1 FROM shardgate_worker_leases x WHERE x.worker_id = w AND x.expires_at > now()) \
    ORDER BY w LIMIT 1 \
    ON CONFLICT (worker_id) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at WHERE l.expires_at <= now() \
    RETURNING worker_id, reserved_until_ms";

/// Renews the lease if this proxy still holds it and reserves the ids' time up to `$4`.
const RENEW: &str = "UPDATE shardgate_worker_leases SET expires_at = now() + $3::bigint * interval '1 millisecond', \
    reserved_until_ms = greatest(reserved_until_ms, $4::bigint) WHERE worker_id = $1 AND holder = $2";

/// A held lease.
pub struct Lease {
    /// The leased worker id.
    pub worker: u16,
    /// Ids continue after this (ms since 1970).
    pub resume_after_ms: u64,
    /// Clock time (ms) until which ids may be issued.
    pub fence: Arc<AtomicU64>,
    holder: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn client(dsn: &Dsn) -> anyhow::Result<tokio_postgres::Client> {
    shardgate_migrate::db::open(dsn, "shardgate-lease").await.context("connecting to db_default")
}

/// Takes a lease (one attempt); `Ok(None)` when all 64 worker ids are held.
pub async fn acquire(dsn: &Dsn, ttl_ms: u64) -> anyhow::Result<Option<Lease>> {
    let c = client(dsn).await?;
    c.batch_execute(DDL).await.context("creating shardgate_worker_leases")?;
    let holder = format!("{}:{:016x}", std::process::id(), rand::random::<u64>());
    let start = now_ms();
    let Some(row) = c.query_opt(ACQUIRE, &[&holder, &(ttl_ms as i64)]).await.context("taking a worker-id lease")? else {
        return Ok(None);
    };
    let worker: i32 = row.get(0);
    let reserved: i64 = row.get(1);
    let lease = Lease {
        worker: u16::try_from(worker).context("worker id")?,
        resume_after_ms: u64::try_from(reserved).unwrap_or(0),
        fence: Arc::new(AtomicU64::new(0)),
        holder,
    };
    // reserve before the first id
    if !renew(&c, &lease, ttl_ms, start).await? {
        return Ok(None);
    }
    Ok(Some(lease))
}

/// One renewal; moves the fence on when the lease is still ours.
async fn renew(c: &tokio_postgres::Client, lease: &Lease, ttl_ms: u64, start: u64) -> anyhow::Result<bool> {
    let reserve = (start + ttl_ms) as i64;
    let n = c.execute(RENEW, &[&i32::from(lease.worker), &lease.holder, &(ttl_ms as i64), &reserve]).await.context("renewing the worker-id lease")?;
    if n == 1 {
        lease.fence.store(start + ttl_ms - ttl_ms / 10, Ordering::Release);
    }
    Ok(n == 1)
}

/// Keeps the lease for as long as the process runs: renews every third of
/// the TTL; a failed or refused renewal lets the fence run out, and ids stop.
pub async fn keep(dsn: Dsn, lease: Lease, ttl_ms: u64, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut conn: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ttl_ms / 3)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let start = now_ms();
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            conn = client(&dsn).await.map_err(|e| tracing::warn!(error = %e, "worker-id lease: db_default unreachable")).ok();
        }
        let Some(c) = conn.as_ref() else { continue };
        match renew(c, &lease, ttl_ms, start).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(worker = lease.worker, "the worker-id lease was taken over; this proxy issues no more ids");
                return;
            }
            Err(e) => tracing::warn!(error = %e, worker = lease.worker, "worker-id lease renewal failed; ids stop when the lease runs out"),
        }
    }
}

/// Live worker-id leases other proxies hold, read in `db_default`; `None`
/// when that cannot be told (fixed `ids.worker_id`, no lease held yet,
/// `db_default` unreachable).
pub async fn others_live(engine: &super::Engine) -> Option<i64> {
    if !engine.leased_ids {
        return None;
    }
    let me = engine.ids.get()?.worker().to_string();
    // not `pool.checkout_timeout_ms`: not knowing costs the caller a settle wait
    let mut conn = crate::backend::pool::checkout_within(&engine.default, Duration::from_secs(2)).await?;
    let sql = "SELECT count(*) FROM shardgate_worker_leases WHERE expires_at > now() AND worker_id <> $1::int";
    let rows = crate::backend::query::query(&mut conn, sql, &[Some(me.as_str())]).await.ok()?.ok()?;
    rows.first()?.first()?.as_deref()?.parse().ok()
}
