//! Redis: the shared cache level (a bb8 pool of multiplexed connections for commands) and the
//! invalidation channel (a RESP3 `ConnectionManager` that resubscribes by
//! itself). Every Redis call is bounded by `cache.redis_timeout_ms`; after a
//! failure Redis is skipped for a second, so a dead Redis costs one timeout,
//! not one per lookup.
//!
//! Keys: `sg:c:{table}:{generation}:{key}` is a hash of variant → reply;
//! `sg:v:{table}:{key}` is the key's version (incremented by every write);
//! `sg:g:{table}` is the table's generation (incremented by a table-wide
//! invalidation).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use bytes::{BufMut, Bytes, BytesMut};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushKind, Value};
use shardgate_config::CacheConfig;

use super::{Answer, Cache, Invalidation};
use crate::metrics as m;

/// The pub/sub channel every proxy listens on.
pub const CHANNEL: &str = "shardgate:cache:invalidate";

/// Pending invalidations kept while Redis is unreachable; beyond this they
/// collapse into one table-wide invalidation per table.
const MAX_PENDING: usize = 10_000;

/// Stores a reply only if the key was not written since its version was read.
const STORE: &str = r"
local v = redis.call('GET', KEYS[2])
if (v or '0') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1";

/// A written key: new version, reply dropped (in the current generation), others told.
const DROP_KEY: &str = r"
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local g = redis.call('GET', KEYS[2]) or '0'
redis.call('DEL', ARGV[1] .. g .. ':' .. ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return tonumber(g)";

/// A table-wide invalidation: the next generation, others told.
const DROP_TABLE: &str = r"
local g = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. g)
return g";

#[derive(Default)]
struct Pending {
    items: Vec<(String, Invalidation)>,
    /// Times the list was collapsed into table-wide invalidations.
    collapses: u64,
}

/// What another proxy invalidated.
pub(super) enum Remote {
    Key(String),
    Generation(u64),
}

/// bb8 manager for multiplexed Redis connections made by one configured
/// client (plain, or TLS with the configured CA, which bb8-redis cannot take).
#[derive(Clone)]
pub(super) struct Manager(redis::Client);

impl bb8::ManageConnection for Manager {
    type Connection = MultiplexedConnection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        self.0.get_multiplexed_async_connection().await
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        let pong: String = redis::cmd("PING").query_async(conn).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err((redis::ErrorKind::Extension, "unexpected answer to PING").into())
        }
    }

    fn has_broken(&self, _: &mut Self::Connection) -> bool {
        false
    }
}

/// A Redis client for `url`: `rediss://` verifies the server against
/// `tls_ca` (PEM) when given, else against the system's roots.
fn client(url: &str, tls_ca: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    match tls_ca {
        Some(ca) => redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert: Some(ca.to_vec()) }),
        None => redis::Client::open(url),
    }
}

pub(super) struct L2 {
    url: String,
    tls_ca: Option<Vec<u8>>,
    pool: bb8::Pool<Manager>,
    timeout: Duration,
    down_until: Mutex<Option<Instant>>,
    /// Invalidations made locally and not yet delivered to Redis (in flight included).
    pending: Mutex<Pending>,
    /// One delivery at a time, so delivered entries can be removed by count.
    delivering: tokio::sync::Mutex<()>,
    /// Wakes the background retry when a delivery left invalidations pending.
    retry: tokio::sync::Notify,
    /// Tells this proxy's own messages apart.
    instance: String,
    version_ttl_ms: u64,
}

fn ckey(table: &str, generation: u64, key: &str) -> String {
    format!("sg:c:{table}:{generation}:{key}")
}

fn vkey(table: &str, key: &str) -> String {
    format!("sg:v:{table}:{key}")
}

fn gkey(table: &str) -> String {
    format!("sg:g:{table}")
}

impl L2 {
    pub(super) fn new(redis: &shardgate_config::RedisConfig, cfg: &CacheConfig) -> anyhow::Result<L2> {
        let timeout = Duration::from_millis(cfg.redis_timeout_ms);
        let tls_ca = match &redis.tls_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| anyhow::anyhow!("redis.tls_ca_file `{path}`: {e}"))?),
            None => None,
        };
        let manager = Manager(client(&redis.url, tls_ca.as_deref())?);
        let pool = bb8::Pool::builder().max_size(cfg.redis_pool_size).connection_timeout(timeout).retry_connection(false).build_unchecked(manager);
        Ok(L2 {
            url: redis.url.clone(),
            tls_ca,
            pool,
            timeout,
            down_until: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            delivering: tokio::sync::Mutex::new(()),
            retry: tokio::sync::Notify::new(),
            instance: format!("{:016x}", rand::random::<u64>()),
            // versions must outlive any load in flight and any stored reply
            version_ttl_ms: cfg.l2_ttl_ms.saturating_mul(2).max(3_600_000),
        })
    }

    fn available(&self) -> bool {
        match *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(t) => Instant::now() >= t,
            None => true,
        }
    }

    /// Redis may hold replies this proxy knows are stale (invalidations not
    /// delivered yet): neither read nor fill it until they are.
    fn trusted(&self) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).items.is_empty()
    }

    fn failed(&self, what: &str, e: &str) {
        metrics::counter!(m::CACHE_REDIS_ERRORS).increment(1);
        let mut d = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(error = %e, "cache: Redis {what} failed; using the local cache and the database for 1 s");
        }
        *d = Some(Instant::now() + Duration::from_secs(1));
    }

    fn succeeded(&self) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A pooled connection, unless Redis is known to be down (and `force` is off).
    async fn conn(&self, force: bool) -> Result<bb8::PooledConnection<'_, Manager>, String> {
        if !force && !self.available() {
            return Err("down".into());
        }
        self.pool.get().await.map_err(|e| e.to_string())
    }

    /// Records how a bounded Redis call went; `None` on any failure.
    fn outcome<T>(&self, what: &str, r: Result<Result<T, String>, tokio::time::error::Elapsed>) -> Option<T> {
        match r {
            Ok(Ok(v)) => {
                self.succeeded();
                Some(v)
            }
            Ok(Err(e)) if e == "down" => None,
            Ok(Err(e)) => {
                self.failed(what, &e);
                None
            }
            Err(_) => {
                self.failed(what, "timed out");
                None
            }
        }
    }

    /// The stored reply (if any) and the key's version; `None` when Redis is unavailable.
    pub(super) async fn get(&self, table: &str, generation: u64, key: &str, variant: u64) -> Option<(Option<Answer>, String)> {
        if !self.trusted() {
            return None;
        }
        let (c, v, field) = (ckey(table, generation, key), vkey(table, key), format!("{variant:016x}"));
        let r = tokio::time::timeout(self.timeout, async {
            let mut conn = self.conn(false).await?;
            redis::pipe().hget(&c, &field).get(&v).query_async::<(Option<Vec<u8>>, Option<String>)>(&mut *conn).await.map_err(|e| e.to_string())
        })
        .await;
        let (reply, version) = self.outcome("read", r)?;
        let answer = reply.and_then(|r| decode(&r));
        Some((answer, version.unwrap_or_else(|| "0".into())))
    }

    /// Stores a reply unless the key's version moved on since `version` was read.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn put(&self, table: &str, generation: u64, key: &str, variant: u64, version: String, a: &Answer, ttl: Duration) {
        let (c, v, field) = (ckey(table, generation, key), vkey(table, key), format!("{variant:016x}"));
        if !self.trusted() {
            return;
        }
        let value = encode(a);
        let ms = ttl.as_millis().max(1) as u64;
        let r = tokio::time::timeout(self.timeout, async {
            let mut conn = self.conn(false).await?;
            redis::cmd("EVAL")
                .arg(STORE)
                .arg(2)
                .arg(&c)
                .arg(&v)
                .arg(version)
                .arg(field)
                .arg(value.as_ref())
                .arg(ms)
                .query_async::<i64>(&mut *conn)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let _ = self.outcome("write", r);
    }

    /// Records invalidations made locally: from now until they reach Redis
    /// this proxy neither reads nor fills Redis (it may hold what they drop).
    pub(super) fn mark(&self, items: Vec<(String, Invalidation)>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.items.extend(items);
        if p.items.len() > MAX_PENDING {
            let mut tables: Vec<(String, Invalidation)> = Vec::new();
            for (name, inv) in p.items.drain(..) {
                if !tables.iter().any(|(n, _)| *n == name) {
                    tables.push((name, Invalidation { table: inv.table, key: None }));
                }
            }
            p.items = tables;
            p.collapses += 1;
        }
    }

    /// Delivers what is pending (drop in Redis, publish to the other
    /// proxies); returns the table generations seen. What fails stays
    /// pending for the background retry, which `force`s delivery: it tries
    /// even within the second Redis is skipped for after a failure, since
    /// other proxies answer from their caches until it goes through.
    pub(super) async fn flush(&self, force: bool) -> Vec<(String, u64)> {
        let out = self.flush_once(force).await;
        if !force && self.pending_len() > 0 {
            self.retry.notify_one();
        }
        out
    }

    async fn flush_once(&self, force: bool) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        if !force && !self.available() {
            return out;
        }
        let _one = self.delivering.lock().await;
        let (n, collapses, mut items) = {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            (p.items.len(), p.collapses, p.items.clone())
        };
        if n == 0 {
            return out;
        }
        let mut seen = std::collections::HashSet::new();
        items.retain(|(t, i)| seen.insert((t.clone(), i.key.clone())));
        for chunk in items.chunks(1_000) {
            match self.deliver(chunk.to_vec(), force).await {
                Some(gens) => out.extend(gens),
                None => return out,
            }
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // a collapse meanwhile rewrote the list: keep it (delivering it again is harmless)
        if p.collapses == collapses && p.items.len() >= n {
            p.items.drain(..n);
        }
        out
    }

    /// One pipelined round trip for a batch; `None` when it did not go through.
    async fn deliver(&self, items: Vec<(String, Invalidation)>, force: bool) -> Option<Vec<(String, u64)>> {
        // EVAL: no script cache to miss after a Redis restart
        let mut pipe = redis::pipe();
        for (table, inv) in &items {
            match &inv.key {
                Some(k) => pipe
                    .cmd("EVAL")
                    .arg(DROP_KEY)
                    .arg(2)
                    .arg(vkey(table, k))
                    .arg(gkey(table))
                    .arg(format!("sg:c:{table}:"))
                    .arg(k)
                    .arg(CHANNEL)
                    .arg(format!("{}|k|{table}|{k}", self.instance))
                    .arg(self.version_ttl_ms),
                None => pipe.cmd("EVAL").arg(DROP_TABLE).arg(1).arg(gkey(table)).arg(CHANNEL).arg(format!("{}|g|{table}|", self.instance)),
            };
        }
        // a large backlog (after an outage) gets more time than one lookup
        let limit = if items.len() > 16 { self.timeout * 20 } else { self.timeout };
        let r = tokio::time::timeout(limit, async {
            let mut conn = self.conn(force).await?;
            let gens: Vec<u64> = pipe.query_async(&mut *conn).await.map_err(|e| e.to_string())?;
            Ok(items.iter().map(|(t, _)| t.clone()).zip(gens).collect::<Vec<_>>())
        })
        .await;
        self.outcome("invalidation", r)
    }

    pub(super) fn pending_len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).items.len()
    }

    /// Parses a message; `None` for this proxy's own or a malformed one.
    fn parse_message(&self, payload: &str) -> Option<(String, Remote)> {
        let mut parts = payload.splitn(4, '|');
        let (from, kind, table, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if from == self.instance {
            return None;
        }
        match kind {
            "k" => Some((table.to_string(), Remote::Key(rest.to_string()))),
            "g" => Some((table.to_string(), Remote::Generation(rest.parse().ok()?))),
            _ => None,
        }
    }
}

fn encode(a: &Answer) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + a.bytes.len());
    b.put_u32(a.rows);
    b.extend_from_slice(&a.bytes);
    b.freeze()
}

fn decode(v: &[u8]) -> Option<Answer> {
    let rows = u32::from_be_bytes(v.get(..4)?.try_into().ok()?);
    Some(Answer { bytes: Bytes::copy_from_slice(&v[4..]), rows })
}

/// First wait before retrying invalidations that could not reach Redis.
const RETRY_FIRST: Duration = Duration::from_millis(20);
/// Longest wait between retries while Redis stays unreachable.
const RETRY_MAX: Duration = Duration::from_millis(500);

/// Retries invalidations that could not reach Redis: soon after a failure
/// (until they are delivered, other proxies may answer from their local
/// caches what the write changed), then backing off to [`RETRY_MAX`].
pub(super) async fn retry_pending(cache: Arc<Cache>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(l2) = &cache.l2 else { return };
    loop {
        // told by a delivery that failed; the tick is a safety net
        tokio::select! {
            _ = l2.retry.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let mut wait = RETRY_FIRST;
        while l2.pending_len() > 0 {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(&mut shutdown) => return,
            }
            for (t, g) in l2.flush(true).await {
                cache.set_generation(&t, g);
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }
}

fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

/// Reads the tables' generations and drops every local entry: called when
/// the subscription is (re)made, since messages sent meanwhile are lost.
/// Until the generations are read (false: tried again later) the proxy
/// stays unsubscribed, using neither its local cache nor Redis.
async fn resync(cache: &Cache, conn: &mut ConnectionManager) -> bool {
    let names: Vec<String> = cache.tables.iter().map(|t| gkey(&t.spec.name)).collect();
    // a generation learned while the MGET was out (this proxy's own table-wide write,
    // another's message) may be newer than what it read: read again then. (Not the
    // larger of the two: a Redis that lost its data starts the generations again at 0.)
    let mut stable = names.is_empty();
    for _ in 0..5 {
        if stable {
            break;
        }
        let moves = cache.generation_moves.load(Ordering::Acquire);
        let gens: redis::RedisResult<Vec<Option<u64>>> = redis::cmd("MGET").arg(&names).query_async(conn).await;
        match gens {
            Ok(gens) => {
                for (t, g) in cache.tables.iter().zip(gens) {
                    t.generation.store(g.unwrap_or(0), Ordering::Release);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cache: reading the table generations failed; retrying");
                return false;
            }
        }
        stable = cache.generation_moves.load(Ordering::Acquire) == moves;
    }
    if !stable {
        return false;
    }
    // subscribed first, then the epoch moved on: whatever was made before it
    // (L1 entries, filters, which are never made unsubscribed) goes unused
    cache.subscribed.store(true, Ordering::Release);
    cache.flush_local();
    true
}

/// PINGs of the invalidation connection that may fail in a row before it is made anew.
const MAX_FAILED_PINGS: u32 = 10;

/// Keeps a subscription to [`CHANNEL`] and applies what other proxies invalidate.
pub(super) async fn listen(cache: Arc<Cache>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(l2) = &cache.l2 else { return };
    let url = l2.url.clone();
    let mut warned = false;
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cfg = ConnectionManagerConfig::new()
            .set_push_sender(tx)
            .set_automatic_resubscription()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_max_delay(Duration::from_secs(1));
        let made = match client(&resp3(&url), l2.tls_ca.as_deref()) {
            Ok(client) => match ConnectionManager::new_with_config(client, cfg).await {
                Ok(mut conn) => match conn.subscribe(CHANNEL).await {
                    Ok(()) => Ok(conn),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let mut conn = match made {
            Ok(c) => c,
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cache: cannot subscribe to Redis invalidations; retrying (local entries are dropped when it succeeds)");
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = stopped(&mut shutdown) => return,
                }
            }
        };
        warned = false;
        // a resync that failed is tried again at the next ping that goes through
        let mut need_resync = !resync(&cache, &mut conn).await;
        tracing::info!("cache: subscribed to Redis invalidations");
        let mut ping = tokio::time::interval(Duration::from_millis(500));
        // PINGs failed in a row: the manager keeps a connection error that is not an I/O
        // error (a refused AUTH, maxclients) for ever, so after a while it is made anew
        let mut failed_pings = 0u32;
        loop {
            tokio::select! {
                p = rx.recv() => {
                    let Some(p) = p else { break };
                    match p.kind {
                        PushKind::Message => {
                            let payload = match p.data.get(1) {
                                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                                _ => continue,
                            };
                            if let Some((table, r)) = l2.parse_message(&payload) {
                                cache.on_remote(&table, r);
                            }
                        }
                        PushKind::Disconnection => {
                            cache.subscribed.store(false, Ordering::Release);
                            cache.flush_local();
                            // not before the subscription is remade (its Subscribe resyncs)
                            need_resync = false;
                        }
                        // resubscribed after a reconnect
                        PushKind::Subscribe => need_resync = !resync(&cache, &mut conn).await,
                        _ => {}
                    }
                }
                _ = ping.tick() => {
                    // keeps the connection checked; a failure makes the manager reconnect
                    let r: redis::RedisResult<Value> = redis::cmd("PING").query_async(&mut conn).await;
                    if let Err(e) = r {
                        if cache.subscribed.swap(false, Ordering::AcqRel) {
                            cache.flush_local();
                        }
                        need_resync = true;
                        failed_pings += 1;
                        if failed_pings >= MAX_FAILED_PINGS {
                            tracing::warn!(error = %e, "cache: the Redis invalidation connection keeps failing; connecting again");
                            break;
                        }
                    } else {
                        failed_pings = 0;
                        if need_resync {
                            // subscribe again (the manager's own resubscription after a
                            // reconnect is not checked), then resync; the Subscribe message
                            // this sends resyncs once more, harmlessly
                            need_resync = match conn.subscribe(CHANNEL).await {
                                Ok(()) => !resync(&cache, &mut conn).await,
                                Err(_) => true,
                            };
                        }
                    }
                }
                _ = stopped(&mut shutdown) => return,
            }
        }
    }
}

async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let a = Answer { bytes: Bytes::from_static(b"D\0\0\0\x06\0\0C\0\0\0\x0dSELECT 1\0"), rows: 1 };
        let b = decode(&encode(&a)).expect("decodes");
        assert_eq!(b.bytes, a.bytes);
        assert_eq!(b.rows, 1);
        assert!(decode(b"\0\0").is_none());
    }

    #[test]
    fn resp3_is_asked_for() {
        assert_eq!(resp3("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(resp3("redis://h:1/?db=2"), "redis://h:1/?db=2&protocol=resp3");
    }
}
