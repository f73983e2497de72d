//! The fence of an INSERT whose unique-lookup entries commit before its row
//! ([`super::entries`]): a table on each shard holding one token per such
//! INSERT, written in the row's own transaction.
//!
//! The INSERT's entries in `db_default` carry its token, and its row's
//! pipeline on the shard first inserts that token here. Whoever finds the
//! entry of a value without its row (a later INSERT of that value, see
//! [`super::lookup::record`]) inserts the same token first
//! ([`take`]): if the owner's transaction is in flight this waits for it
//! (the primary key), and if the owner has not reached the shard yet its
//! fence insert fails later, so its row can never appear after the taker
//! looked. Either way, what the taker then reads of the row is final.
//!
//! An owner's fence carries the time its token was made; the shard refuses
//! it (`23502`, a NULL token) once that is [`FRESH_SECS`] old, so a pipeline
//! delayed that long (a paused proxy) cannot meet a fence that has been
//! swept: rows are kept [`KEEP_SECS`] by the shard's clock ([`sweep`]). The
//! two clocks may differ by up to the gap between those.

use std::time::Duration;

use super::exec::ExecError;
use super::Engine;
use crate::backend::query as wire;
use crate::protocol::sqlstate;

/// The fence table on each shard (under the `shardgate_2pc` prefix that
/// clients' statements may not name).
pub const TABLE: &str = "shardgate_2pc_fence";

/// [`TABLE`] in the schema every statement here names it in: the client's
/// `search_path` is applied to the shard connection the owner's fence runs on.
const QUALIFIED: &str = "public.shardgate_2pc_fence";

const DDL: &str = "CREATE TABLE IF NOT EXISTS public.shardgate_2pc_fence (token text PRIMARY KEY, made_at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// An owner's fence is refused this long after its token was made.
pub const FRESH_SECS: u64 = 120;
/// Fence rows are deleted this long after they were written.
pub const KEEP_SECS: u64 = 900;

/// A new token: a two-phase-commit style id (worker, time, randomness), and
/// the time it was made, in ms since the epoch.
pub fn new_token(engine: &Engine) -> (String, u128) {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    (super::twopc::new_gid(engine.worker()), ms)
}

/// The owner's fence, deferred ahead of its row's pipeline: `$1` the token,
/// `$2` the time it was made (ms since the epoch). A statement the shard
/// keeps prepared on each connection.
pub const OWNER_SQL: &str = "INSERT INTO public.shardgate_2pc_fence (token) VALUES \
     (CASE WHEN to_timestamp($2::bigint / 1000.0) > clock_timestamp() - interval '120 seconds' THEN $1::text END)";

/// Defers the owner's fence on `conn`, ahead of the row's pipeline.
pub fn defer_owner(conn: &mut crate::backend::ServerConn, token: &str, made_ms: u128) {
    let made = made_ms.to_string();
    let mut msgs = bytes::BytesMut::with_capacity(256);
    wire::put_named_step(&mut msgs, conn, OWNER_SQL, &[Some(token.as_bytes()), Some(made.as_bytes())]);
    conn.defer_messages(&msgs);
}

/// Whether a server error is about the fence (taken, stale, or its table
/// missing) rather than the client's row.
pub fn is_fence_error(e: &wire::ServerError) -> bool {
    e.raw.get(5..).is_some_and(|body| {
        let f = crate::protocol::backend::parse_error_fields(body);
        f.table == TABLE || f.message.contains(TABLE)
    })
}

/// Whether `shard`'s fence table is known to exist.
pub fn ready(engine: &Engine, shard: usize) -> bool {
    engine.fence_ready.get(shard).is_some_and(|r| r.load(std::sync::atomic::Ordering::Relaxed))
}

pub(super) fn set_ready(engine: &Engine, shard: usize, ready: bool) {
    if let Some(r) = engine.fence_ready.get(shard) {
        r.store(ready, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Creates the fence table on `shard` (best effort: [`sweep`] tries again
/// every minute; until it exists INSERTs there commit the two-phase way).
pub async fn create_on(engine: &Engine, shard: usize) {
    if let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(5), engine.pool(shard).get()).await {
        match wire::control(&mut conn, DDL).await {
            Ok(Ok(_)) => {
                tracing::debug!(shard, "INSERT fence table ready");
                set_ready(engine, shard, true);
            }
            // two proxies creating it at once: it is there
            Ok(Err(e)) if e.code == sqlstate::UNIQUE_VIOLATION || e.code == sqlstate::DUPLICATE_TABLE => set_ready(engine, shard, true),
            Ok(Err(e)) => tracing::warn!(
                shard,
                code = %e.code,
                "could not create public.shardgate_2pc_fence on shard db_{shard} (may the proxy's role create tables in schema public?); INSERTs there commit the slower two-phase way"
            ),
            Err(_) => conn.broken = true,
        }
    }
}

/// The taker's fence: inserts `token` on `shard`, waiting (at most 5 s) for
/// an owner whose transaction holds it. Afterwards no row of that owner can
/// appear on the shard that is not there now.
pub async fn take(engine: &Engine, shard: usize, token: &str, what: &str) -> Result<(), ExecError> {
    let unknown = || {
        ExecError::Proxy(
            sqlstate::CANNOT_CONNECT_NOW,
            format!("{what} was being used by an order on shard db_{shard}, which cannot be reached to settle it; retry when it is back"),
        )
    };
    for attempt in 0..2 {
        let mut conn = match tokio::time::timeout(Duration::from_secs(5), engine.pool(shard).get()).await {
            Ok(Ok(c)) => c,
            _ => return Err(unknown()),
        };
        let mut msgs = bytes::BytesMut::new();
        wire::put_step(&mut msgs, "BEGIN", &[]);
        wire::put_step(&mut msgs, "SET LOCAL lock_timeout = 5000", &[]);
        wire::put_step(&mut msgs, "INSERT INTO public.shardgate_2pc_fence (token) VALUES ($1) ON CONFLICT (token) DO NOTHING", &[Some(token.as_bytes())]);
        wire::put_step(&mut msgs, "COMMIT", &[]);
        wire::put_sync(&mut msgs);
        let r = wire::pipeline(&mut conn, &msgs).await;
        if matches!(r, Ok(Err(_))) {
            wire::rollback(&mut conn).await;
        }
        match r {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if e.code == sqlstate::UNDEFINED_TABLE && attempt == 0 => {
                drop(conn);
                create_on(engine, shard).await;
            }
            Ok(Err(e)) if e.code == sqlstate::LOCK_NOT_AVAILABLE => {
                return Err(ExecError::Proxy(sqlstate::LOCK_NOT_AVAILABLE, format!("{what}: the order being written with it on shard db_{shard} is still in progress after 5 s; retry")));
            }
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(_) => {
                conn.broken = true;
                return Err(unknown());
            }
        }
    }
    Err(unknown())
}

/// Deletes fence rows older than [`KEEP_SECS`] on every reachable shard,
/// and creates the table where it is missing (at startup, before the first
/// INSERT needs it; until then an INSERT there goes the usual way).
pub async fn sweep(engine: &Engine) {
    let q = format!("DELETE FROM {QUALIFIED} WHERE made_at < clock_timestamp() - interval '{KEEP_SECS} seconds'");
    for (shard, pool) in engine.shards.iter().enumerate() {
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(3), pool.get()).await else { continue };
        match wire::control_tag(&mut conn, &q).await {
            Ok(Ok(tag)) => {
                tracing::debug!(shard, tag, "swept the INSERT fence");
                set_ready(engine, shard, true);
            }
            Ok(Err(e)) if e.code == sqlstate::UNDEFINED_TABLE => {
                set_ready(engine, shard, false);
                drop(conn);
                create_on(engine, shard).await;
            }
            Ok(Err(e)) => tracing::warn!(shard, code = %e.code, "could not sweep the INSERT fence"),
            Err(_) => conn.broken = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_fence_is_refused_when_its_token_is_stale() {
        assert!(OWNER_SQL.contains(&format!("interval '{FRESH_SECS} seconds'")));
        assert!(OWNER_SQL.starts_with(&format!("INSERT INTO {QUALIFIED} ")));
        assert!(DDL.contains(QUALIFIED));
    }
}
