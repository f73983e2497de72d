//! The merchant-info cache: point reads of configured tables on `db_default`
//! are answered from a local moka cache (L1), then Redis (L2), then the
//! database. What is cached is the exact reply PostgreSQL sent (RowDescription
//! for the simple protocol, DataRows, CommandComplete), keyed by table, key and
//! a *variant* (statement shape, protocol, result formats, session settings
//! that change how values print), so a hit is byte-for-byte the database's answer.
//!
//! # Staying correct
//! - A write through the proxy names its keys (or, when they cannot be read
//!   from the statement, the whole table). When its transaction ends the keys
//!   are invalidated here (synchronously, before the client hears of the
//!   commit), then in Redis, and published to every other proxy.
//! - L1 keys carry epochs (global, per table, and per key stripe): an
//!   invalidation bumps the epoch, so a load that started before the write can
//!   never be found by a read that starts after it.
//! - Redis entries are only written with a compare-and-set on the key's
//!   version, which each invalidation increments: a slow reader cannot put an
//!   old answer back after a write. A table-wide invalidation moves every proxy
//!   to a new key generation.
//! - Without the pub/sub subscription (lost, or not made yet) neither L1,
//!   the bloom filters nor Redis answer: other proxies' writes would not
//!   reach the first two, and a table generation moved on unheard would make
//!   old Redis entries look current.
//!   Losing or remaking it moves the global epoch on, which makes every L1
//!   entry and every filter loaded before unusable (filters are reloaded).
//! - Invalidations that could not reach Redis are retried within tens of
//!   milliseconds, not after the second reads skip Redis for.
//! - Concurrent misses for one key share one load (moka's entry API).
//! - Keys that do not exist are stopped by a bloom filter loaded from the
//!   table; absent keys that get past it are cached for `negative_ttl_ms`.
//! - TTLs are spread by ±`ttl_jitter_percent`.
//!
//! Writes that bypass shardgate (another client on the database, triggers
//! on other tables) are seen when entries expire (`l1_ttl_ms`, `l2_ttl_ms`)
//! and, for new keys, when the bloom filter is reloaded (`bloom_refresh_ms`).

mod bloom;
mod fetch;
mod l2;

pub use fetch::{exchange, Exchange};
use fetch::{empty_answer, row_description};

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastbloom::AtomicBloomFilter;
use shardgate_config::CacheConfig;
use shardgate_router::cache::{CacheAnalysis, CachedTable, KeyArg};

use crate::backend::ServerConn;
use crate::metrics as m;
use crate::backend::query::ServerError;
use crate::backend::Pool;

const STRIPES: usize = 4096;

/// How a key column's values are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// smallint, integer, bigint: `'042'`, `42` and `+42` are one key.
    Int,
    /// text, varchar, char-free string types: compared as written.
    Text,
}

/// A cached reply.
#[derive(Debug)]
pub struct Answer {
    /// The reply's bytes as PostgreSQL sent them (without ReadyForQuery).
    pub bytes: Bytes,
    /// DataRows in it.
    pub rows: u32,
}

impl Answer {
    fn negative(&self) -> bool {
        self.rows == 0
    }
}

/// Which level answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Bloom,
    L1,
    L2,
    Db,
}

impl Served {
    fn label(self) -> &'static str {
        match self {
            Served::Bloom => "bloom",
            Served::L1 => "l1",
            Served::L2 => "l2",
            Served::Db => "db",
        }
    }
}

/// Why the database could not give a cacheable answer: the caller sends the
/// statement down the ordinary path, where the client gets the real error.
#[derive(Debug, Clone)]
pub enum LoadError {
    /// PostgreSQL reported an error.
    Server(ServerError),
    /// `db_default` could not be reached, or the reply was not a plain result.
    Uncacheable(String),
}

/// One key of one table, or all of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    pub table: usize,
    /// Canonical key; `None` = every key.
    pub key: Option<String>,
}

/// What to run on `db_default` when a lookup misses.
pub struct Fetch<'a> {
    pub simple: bool,
    pub sql: &'a str,
    pub types: &'a [u32],
    pub values: &'a [Option<&'a [u8]>],
    pub formats: &'a [i16],
    pub result_formats: &'a [i16],
    /// SET statements the connection needs first (the client's session settings).
    pub param_sets: &'a (dyn Fn(&mut ServerConn) -> bytes::Bytes + Sync),
}

struct TableState {
    spec: CachedTable,
    key_type: RwLock<Option<KeyType>>,
    epoch: AtomicU64,
    /// Redis key generation (a table-wide invalidation moves it on).
    generation: AtomicU64,
    /// The filter and the values of `Cache::global` and of this table's
    /// `epoch` when its load began: it answers only while both are still
    /// those (keys another proxy wrote while this one was not subscribed, or
    /// that a table-wide write added, may be missing from it).
    bloom: RwLock<Option<([u64; 2], Arc<AtomicBloomFilter>)>>,
    /// Keys written while the bloom filter is being reloaded.
    recent: Mutex<Option<Vec<String>>>,
    reload: tokio::sync::Notify,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct L1Key {
    table: usize,
    epochs: [u64; 3],
    key: Arc<str>,
    variant: u64,
}

struct Expiry {
    ttl: Duration,
    negative_ttl: Duration,
    jitter: u8,
}

impl moka::Expiry<L1Key, Arc<Answer>> for Expiry {
    fn expire_after_create(&self, _key: &L1Key, value: &Arc<Answer>, _now: Instant) -> Option<Duration> {
        Some(jittered(if value.negative() { self.negative_ttl } else { self.ttl }, self.jitter))
    }
}

/// `d` spread by up to ±`percent` %.
pub(crate) fn jittered(d: Duration, percent: u8) -> Duration {
    if percent == 0 {
        return d;
    }
    let p = f64::from(percent) / 100.0;
    let f = 1.0 + rand::Rng::gen_range(&mut rand::thread_rng(), -p..=p);
    d.mul_f64(f)
}

/// The cache shared by all sessions of one proxy.
pub struct Cache {
    tables: Vec<TableState>,
    specs: Vec<CachedTable>,
    cfg: CacheConfig,
    l1: moka::future::Cache<L1Key, Arc<Answer>>,
    /// RowDescription of each simple-protocol variant: the answer for an absent key.
    shapes: moka::sync::Cache<u64, Bytes>,
    /// ParameterDescription and RowDescription/NoData of prepared point reads, by text and declared types.
    describes: moka::sync::Cache<(String, Vec<u32>), (Bytes, Bytes)>,
    stripes: Box<[AtomicU64]>,
    global: AtomicU64,
    l2: Option<l2::L2>,
    /// The proxy's own db_default pool (answers are read there).
    default: Pool,
    /// Set once the pub/sub subscription has been made (invalidations from other proxies arrive).
    subscribed: AtomicBool,
    /// Generations learned from Redis so far (a resync reads them again if one came meanwhile).
    generation_moves: AtomicU64,
    /// Classification of literal-free statement texts (see `normalize`).
    normalized: moka::sync::Cache<String, Arc<CacheAnalysis>>,
    meters: Meters,
}

/// Metric handles, registered once (labels are fixed).
struct Meters {
    hits: [metrics::Counter; 4],
    seconds: [metrics::Histogram; 4],
    miss_l1: metrics::Counter,
    miss_l2: metrics::Counter,
}

impl Meters {
    fn new() -> Meters {
        let levels = [Served::Bloom, Served::L1, Served::L2, Served::Db];
        Meters {
            hits: levels.map(|l| metrics::counter!(m::CACHE_HITS, "level" => l.label())),
            seconds: levels.map(|l| metrics::histogram!(m::CACHE_LOOKUP_SECONDS, "level" => l.label())),
            miss_l1: metrics::counter!(m::CACHE_MISSES, "level" => "l1"),
            miss_l2: metrics::counter!(m::CACHE_MISSES, "level" => "l2"),
        }
    }
}

/// Bytes each of the caches keyed by statement text may hold.
const TEXT_CACHE_BYTES: u64 = 16 << 20;

/// A cache entry's weight: its bytes plus a fixed overhead.
fn weight(bytes: usize) -> u32 {
    u32::try_from(bytes.saturating_add(128)).unwrap_or(u32::MAX)
}

/// The L1 cache, bounded by `l1_max_bytes` and `l1_capacity` at once: each
/// entry weighs its bytes, and at least `l1_max_bytes / l1_capacity`.
fn l1_cache(cfg: &CacheConfig) -> moka::future::Cache<L1Key, Arc<Answer>> {
    let bytes = cfg.l1_max_bytes.max(1);
    let floor = bytes.div_ceil(cfg.l1_capacity.max(1));
    moka::future::Cache::builder()
        .max_capacity(bytes)
        .weigher(move |k: &L1Key, v: &Arc<Answer>| {
            let size = u64::from(weight(k.key.len() + v.bytes.len() + 64));
            u32::try_from(size.max(floor)).unwrap_or(u32::MAX)
        })
        .expire_after(Expiry {
            ttl: Duration::from_millis(cfg.l1_ttl_ms),
            negative_ttl: Duration::from_millis(cfg.negative_ttl_ms),
            jitter: cfg.ttl_jitter_percent,
        })
        .build()
}

impl Cache {
    pub fn new(cfg: &CacheConfig, redis: Option<&shardgate_config::RedisConfig>, default: Pool) -> anyhow::Result<Arc<Cache>> {
        let specs: Vec<CachedTable> = cfg.tables.iter().map(|t| CachedTable { name: t.name.clone(), key: t.key.clone() }).collect();
        let tables = specs
            .iter()
            .map(|s| TableState {
                spec: s.clone(),
                key_type: RwLock::new(None),
                epoch: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                bloom: RwLock::new(None),
                recent: Mutex::new(None),
                reload: tokio::sync::Notify::new(),
            })
            .collect();
        let l1 = l1_cache(cfg);
        let l2 = match redis {
            Some(r) => Some(l2::L2::new(r, cfg)?),
            None => None,
        };
        Ok(Arc::new(Cache {
            tables,
            specs,
            cfg: cfg.clone(),
            l1,
            // bounded in bytes: keys are client statement texts
            shapes: moka::sync::Cache::builder().max_capacity(TEXT_CACHE_BYTES).weigher(|_: &u64, v: &Bytes| weight(v.len() + 8)).build(),
            describes: moka::sync::Cache::builder()
                .max_capacity(TEXT_CACHE_BYTES)
                .weigher(|k: &(String, Vec<u32>), v: &(Bytes, Bytes)| weight(k.0.len() + 4 * k.1.len() + v.0.len() + v.1.len()))
                .build(),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            global: AtomicU64::new(0),
            l2,
            default,
            subscribed: AtomicBool::new(false),
            generation_moves: AtomicU64::new(0),
            normalized: moka::sync::Cache::builder().max_capacity(TEXT_CACHE_BYTES).weigher(|k: &String, _: &Arc<CacheAnalysis>| weight(2 * k.len())).build(),
            meters: Meters::new(),
        }))
    }

    /// True when some table is cached.
    pub fn enabled(&self) -> bool {
        !self.specs.is_empty()
    }

    /// The configured tables, for the router's classifier.
    pub fn specs(&self) -> &[CachedTable] {
        &self.specs
    }

    /// Cheap pre-check on the hot path: does the text contain a cached table's name?
    pub fn may_concern(&self, sql: &[u8]) -> bool {
        self.specs.iter().any(|t| shardgate_router::contains_ignore_case(sql, t.name.as_bytes()))
    }

    /// Classifies a statement text.
    pub fn classify(&self, sql: &str) -> CacheAnalysis {
        shardgate_router::cache::classify(sql, &self.specs)
    }

    /// Classifies a simple-protocol text through its literal-free form (one
    /// parse per statement shape, not per key); `None` when the text needs the
    /// full [`Cache::classify`] (it may write a cached table, or the scan
    /// cannot normalize it).
    pub fn classify_simple(&self, sql: &str) -> Option<(Option<shardgate_router::cache::PointRead>, Option<KeyArg>)> {
        let (norm, literals) = shardgate_router::cache::normalize(sql)?;
        let a = match self.normalized.get(&norm) {
            Some(a) => a,
            None => {
                let a = Arc::new(self.classify(&norm));
                self.normalized.insert(norm, a.clone());
                a
            }
        };
        if !a.writes.is_empty() {
            return None;
        }
        match &a.read {
            Some(r) => {
                let key = shardgate_router::cache::literal_key(r, &literals);
                Some((Some(r.clone()), key))
            }
            None => Some((None, None)),
        }
    }

    fn key_type(&self, table: usize) -> Option<KeyType> {
        *self.tables.get(table)?.key_type.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The canonical form of a key as written or bound; `None` when it cannot be
    /// cached (NULL, a type the key column does not compare with directly,
    /// or the table's key type is not known yet).
    pub fn canonical_key(&self, table: usize, arg: &KeyArg, values: &[Option<&[u8]>], formats: &[i16], types: &[u32]) -> Option<String> {
        let kt = self.key_type(table)?;
        let text = |s: &str| match kt {
            KeyType::Int => int_text(s),
            KeyType::Text => Some(s.to_string()),
        };
        match arg {
            KeyArg::Null => None,
            KeyArg::Number(n) => match kt {
                KeyType::Int => n.parse::<i64>().ok().map(|i| i.to_string()),
                KeyType::Text => None,
            },
            KeyArg::Text(s) => text(s),
            KeyArg::Param(i) => {
                let v = (*values.get(*i)?)?;
                let binary = formats.get(*i).copied().unwrap_or(0) == 1;
                if !binary {
                    return text(std::str::from_utf8(v).ok()?);
                }
                let ty = types.get(*i).copied().unwrap_or(0);
                match (kt, ty, v.len()) {
                    (KeyType::Int, 20 | 0, 8) => Some(i64::from_be_bytes(v.try_into().ok()?).to_string()),
                    (KeyType::Int, 23 | 0, 4) => Some(i32::from_be_bytes(v.try_into().ok()?).to_string()),
                    (KeyType::Int, 21 | 0, 2) => Some(i16::from_be_bytes(v.try_into().ok()?).to_string()),
                    (KeyType::Text, 25 | 1043 | 0, _) => std::str::from_utf8(v).ok().map(str::to_string),
                    _ => None,
                }
            }
        }
    }

    /// Identifies what a reply depends on besides the key.
    pub fn variant(shape: &str, simple: bool, types: &[u32], result_formats: &[i16], settings: &[(String, String)]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        shape.hash(&mut h);
        simple.hash(&mut h);
        types.hash(&mut h);
        result_formats.hash(&mut h);
        settings.hash(&mut h);
        h.finish()
    }

    fn stripe(&self, table: usize, key: &str) -> &AtomicU64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (table, key).hash(&mut h);
        &self.stripes[(h.finish() as usize) % STRIPES]
    }

    /// Looks a point read up: bloom filter, L1, L2, then `db_default`.
    pub async fn get(&self, table: usize, key: &str, variant: u64, fetch: &Fetch<'_>) -> Result<(Arc<Answer>, Served), LoadError> {
        let started = Instant::now();
        let t = &self.tables[table];
        // read before `subscribed`: a subscription lost after this read also moved it on
        let global = self.global.load(Ordering::Acquire);
        if !self.local_trusted() {
            // other proxies' invalidations do not reach this one: nothing it holds, and
            // nothing in Redis under a table generation it may have missed, is current
            metrics::counter!(m::CACHE_BYPASS, "reason" => "not_subscribed").increment(1);
            let a = Arc::new(self.fetch(fetch).await?);
            return Ok(self.served(a, Served::Db, started));
        }
        // stopped by the bloom filter: the key does not exist
        if let Some(bloom) = self.bloom_at(t, global) {
            if !bloom.contains(key) {
                let empty = if fetch.simple { self.shapes.get(&variant).map(|rd| empty_answer(Some(&rd))) } else { Some(empty_answer(None)) };
                if let Some(a) = empty {
                    return Ok(self.served(Arc::new(a), Served::Bloom, started));
                }
            }
        }
        let k = L1Key {
            table,
            epochs: [global, t.epoch.load(Ordering::Acquire), self.stripe(table, key).load(Ordering::Acquire)],
            key: Arc::from(key),
            variant,
        };
        if let Some(a) = self.l1.get(&k).await {
            return Ok(self.served(a, Served::L1, started));
        }
        let level = Mutex::new(Served::L1);
        let entry = self
            .l1
            .entry(k)
            .or_try_insert_with(async {
                let (a, s) = self.load(table, key, variant, fetch).await?;
                *level.lock().unwrap_or_else(|e| e.into_inner()) = s;
                Ok::<_, LoadError>(a)
            })
            .await;
        match entry {
            Ok(e) => {
                let served = if e.is_fresh() { *level.lock().unwrap_or_else(|e| e.into_inner()) } else { Served::L1 };
                if served != Served::L1 {
                    self.meters.miss_l1.increment(1);
                }
                Ok(self.served(e.into_value(), served, started))
            }
            Err(e) => Err((*e).clone()),
        }
    }

    fn served(&self, a: Arc<Answer>, s: Served, started: Instant) -> (Arc<Answer>, Served) {
        let i = s as usize;
        self.meters.hits[i].increment(1);
        self.meters.seconds[i].record(started.elapsed().as_secs_f64());
        (a, s)
    }

    /// L2, then the database (storing into L2 unless the key was written meanwhile).
    async fn load(&self, table: usize, key: &str, variant: u64, fetch: &Fetch<'_>) -> Result<(Arc<Answer>, Served), LoadError> {
        let t = &self.tables[table];
        let generation = t.generation.load(Ordering::Acquire);
        let mut version = None;
        if let Some(l2) = &self.l2 {
            match l2.get(&t.spec.name, generation, key, variant).await {
                Some((Some(a), _)) => return Ok((Arc::new(a), Served::L2)),
                Some((None, v)) => {
                    self.meters.miss_l2.increment(1);
                    version = Some(v);
                }
                None => {}
            }
        }
        let a = Arc::new(self.fetch(fetch).await?);
        if fetch.simple {
            if let Some(rd) = row_description(&a.bytes) {
                self.shapes.insert(variant, rd);
            }
        }
        if let (Some(l2), Some(v)) = (&self.l2, version) {
            let ttl = if a.negative() { self.cfg.negative_ttl_ms } else { self.cfg.l2_ttl_ms };
            l2.put(&t.spec.name, generation, key, variant, v, &a, jittered(Duration::from_millis(ttl), self.cfg.ttl_jitter_percent)).await;
        }
        Ok((a, Served::Db))
    }

    /// Runs the statement on a `db_default` connection of the proxy's own and
    /// keeps the reply's bytes.
    async fn fetch(&self, f: &Fetch<'_>) -> Result<Answer, LoadError> {
        let pool = &self.default;
        let mut conn = pool.get().await.map_err(|e| LoadError::Uncacheable(format!("db_default: {e}")))?;
        let sets = (f.param_sets)(&mut conn);
        if !sets.is_empty() {
            match crate::backend::query::pipeline(&mut conn, &sets).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    conn.broken = true;
                    return Err(LoadError::Server(e));
                }
                Err(e) => {
                    conn.broken = true;
                    return Err(LoadError::Uncacheable(e.to_string()));
                }
            }
        }
        match exchange(&mut conn, f).await {
            Ok(x) => x.into_answer(),
            Err(e) => {
                conn.broken = true;
                Err(LoadError::Uncacheable(e.to_string()))
            }
        }
    }

    /// The description of a prepared point read learned earlier, if any.
    pub fn described(&self, sql: &str, types: &[u32]) -> Option<(Bytes, Bytes)> {
        self.describes.get(&(sql.to_string(), types.to_vec()))
    }

    /// Remembers the description of a prepared point read.
    pub fn remember_description(&self, sql: &str, types: &[u32], d: (Bytes, Bytes)) {
        self.describes.insert((sql.to_string(), types.to_vec()), d);
    }

    /// Drops keys in this proxy at once (before the client hears of the
    /// commit); Redis is kept off until [`Cache::invalidate_shared`] delivered them.
    pub fn invalidate_local(&self, inv: &[Invalidation]) {
        if let Some(l2) = &self.l2 {
            l2.mark(inv.iter().filter_map(|i| Some((self.tables.get(i.table)?.spec.name.clone(), i.clone()))).collect());
        }
        for i in inv {
            self.apply(i, "local");
        }
    }

    fn apply(&self, i: &Invalidation, origin: &'static str) {
        let Some(t) = self.tables.get(i.table) else { return };
        match &i.key {
            Some(k) => {
                self.stripe(i.table, k).fetch_add(1, Ordering::AcqRel);
                // a written key exists now (or did): the bloom filter must let it through.
                // The list of a reload in flight first: a reload swaps its filter in while it
                // holds the list, so the key is in the list it takes or in the filter it swapped in
                if let Some(r) = t.recent.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    r.push(k.clone());
                }
                if let Some((_, b)) = t.bloom.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    b.insert(k.as_str());
                }
                metrics::counter!(m::CACHE_INVALIDATIONS, "origin" => origin, "scope" => "key").increment(1);
            }
            None => {
                t.epoch.fetch_add(1, Ordering::AcqRel);
                // DDL may have changed the columns: describe again, learn row shapes again
                self.describes.invalidate_all();
                self.shapes.invalidate_all();
                // unknown keys may have been added: no bloom filter until it is reloaded
                *t.bloom.write().unwrap_or_else(|e| e.into_inner()) = None;
                t.reload.notify_one();
                metrics::counter!(m::CACHE_INVALIDATIONS, "origin" => origin, "scope" => "table").increment(1);
            }
        }
    }

    /// Drops the locally invalidated keys in Redis and tells the other
    /// proxies. Waits at most the Redis timeout; what cannot be delivered now
    /// is retried in the background.
    pub async fn invalidate_shared(&self) {
        if let Some(l2) = &self.l2 {
            for (table, g) in l2.flush(false).await {
                self.set_generation(&table, g);
            }
        }
    }

    fn set_generation(&self, table: &str, g: u64) {
        if let Some(t) = self.tables.iter().find(|t| t.spec.name == table) {
            t.generation.fetch_max(g, Ordering::AcqRel);
            self.generation_moves.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Every local entry and bloom filter becomes unusable (pub/sub was lost
    /// or remade: invalidations and keys written meanwhile may have been
    /// missed); the filters are loaded again.
    fn flush_local(&self) {
        self.global.fetch_add(1, Ordering::AcqRel);
        // (a filter loaded while not subscribed would not be used)
        if self.local_trusted() {
            for t in &self.tables {
                t.reload.notify_one();
            }
        }
    }

    /// The table's bloom filter, if loaded since `global` and its own epoch
    /// were last moved on.
    fn bloom_at(&self, t: &TableState, global: u64) -> Option<Arc<AtomicBloomFilter>> {
        let tag = [global, t.epoch.load(Ordering::Acquire)];
        t.bloom.read().unwrap_or_else(|e| e.into_inner()).as_ref().filter(|(at, _)| *at == tag).map(|(_, b)| b.clone())
    }

    /// Whether this proxy's own L1 and bloom filters may answer: always
    /// without Redis (no other proxy to hear from), else only while the
    /// pub/sub subscription is up.
    fn local_trusted(&self) -> bool {
        self.l2.is_none() || self.subscribed()
    }

    /// A message from another proxy.
    fn on_remote(&self, table: &str, inv: l2::Remote) {
        let Some(idx) = self.tables.iter().position(|t| t.spec.name == table) else { return };
        match inv {
            l2::Remote::Key(k) => self.apply(&Invalidation { table: idx, key: Some(k) }, "remote"),
            l2::Remote::Generation(g) => {
                self.set_generation(table, g);
                self.apply(&Invalidation { table: idx, key: None }, "remote");
            }
        }
    }

    /// Background work: the pub/sub listener, the retry of Redis
    /// invalidations, and each table's bloom filter.
    pub fn start(self: &Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        if self.l2.is_some() {
            tokio::spawn(l2::listen(self.clone(), shutdown.clone()));
            tokio::spawn(l2::retry_pending(self.clone(), shutdown.clone()));
        }
        for i in 0..self.tables.len() {
            tokio::spawn(bloom::bloom_loop(self.clone(), i, shutdown.clone()));
        }
    }

    /// True when the pub/sub subscription is up (for `/health` and tests).
    pub fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// For `/health`: tables, bloom filters, Redis.
    pub fn status(&self) -> serde_json::Value {
        let tables: Vec<serde_json::Value> = self
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::json!({
                    "table": t.spec.name,
                    "key": t.spec.key,
                    "key_type_known": self.key_type(i).is_some(),
                    "bloom_loaded": self.local_trusted() && self.bloom_at(t, self.global.load(Ordering::Acquire)).is_some(),
                })
            })
            .collect();
        serde_json::json!({
            "tables": tables,
            "l1_entries": self.l1.entry_count(),
            "redis": self.l2.is_some(),
            "redis_subscribed": self.subscribed(),
            "redis_pending_invalidations": self.l2.as_ref().map_or(0, |l| l.pending_len()),
        })
    }
}

/// `'042'` → `42`, as an integer key column reads it; `None` if not an integer.
fn int_text(s: &str) -> Option<String> {
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    t.parse::<i64>().ok().map(|i| i.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> L1Key {
        L1Key { table: 0, epochs: [0; 3], key: Arc::from(i.to_string().as_str()), variant: 0 }
    }

    #[tokio::test]
    async fn l1_is_bounded_in_bytes_and_in_entries() {
        let cfg = CacheConfig { l1_capacity: 1000, l1_max_bytes: 1 << 20, ..CacheConfig::default() };
        let l1 = l1_cache(&cfg);
        // large answers: the bytes bound holds (about 100 of 10 KiB fit in 1 MiB)
        for i in 0..1000 {
            l1.insert(key(i), Arc::new(Answer { bytes: Bytes::from(vec![b'x'; 10 << 10]), rows: 1 })).await;
        }
        l1.run_pending_tasks().await;
        let held: u64 = l1.iter().map(|(_, v)| v.bytes.len() as u64).sum();
        assert!(held <= 1 << 20, "{held} bytes held");
        assert!(l1.entry_count() <= 110, "{} entries", l1.entry_count());
        // small answers: the entry bound holds
        l1.invalidate_all();
        for i in 0..5000 {
            l1.insert(key(i), Arc::new(Answer { bytes: Bytes::from_static(b"small"), rows: 1 })).await;
        }
        l1.run_pending_tasks().await;
        assert!(l1.entry_count() <= 1000, "{} entries", l1.entry_count());
        assert!(l1.entry_count() >= 500, "{} entries: the bytes bound must not cut small entries short", l1.entry_count());
    }

    #[test]
    fn integer_keys_are_canonical() {
        assert_eq!(int_text(" +042 ").as_deref(), Some("42"));
        assert_eq!(int_text("-7").as_deref(), Some("-7"));
        assert_eq!(int_text("4.0"), None);
        assert_eq!(int_text("99999999999999999999"), None);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_millis(1000), 10);
            assert!(d >= Duration::from_millis(900) && d <= Duration::from_millis(1100), "{d:?}");
        }
        assert_eq!(jittered(Duration::from_millis(1000), 0), Duration::from_millis(1000));
    }

    #[test]
    fn variants_differ_by_what_changes_the_bytes() {
        let base = Cache::variant("SELECT * FROM t WHERE k = $?", true, &[], &[], &[]);
        assert_ne!(base, Cache::variant("SELECT * FROM t WHERE k = $?", false, &[], &[], &[]));
        assert_ne!(base, Cache::variant("SELECT * FROM t WHERE k = $?", true, &[], &[1], &[]));
        assert_ne!(base, Cache::variant("SELECT * FROM t WHERE k = $?", true, &[], &[], &[("timezone".into(), "UTC".into())]));
        assert_eq!(base, Cache::variant("SELECT * FROM t WHERE k = $?", true, &[], &[], &[]));
    }

    #[test]
    fn absent_keys_answer_like_postgres() {
        let a = empty_answer(None);
        assert_eq!(&a.bytes[..], b"C\0\0\0\x0dSELECT 0\0");
        let rd = Bytes::from_static(b"T\0\0\0\x06\0\0");
        assert_eq!(row_description(&[&rd[..], &a.bytes[..]].concat()), Some(rd.clone()));
    }
}
