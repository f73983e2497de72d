//! Sharded execution: the router's plan run on the shards.
//!
//! - [`Engine`]: what every session shares — router, a pool per shard, the
//!   month tables that exist, the id generator.
//! - [`exec`]: runs one planned statement on its targets and writes the
//!   answer one table would give (streaming single targets and plain
//!   concatenations, collecting grouped ones); [`kway`] merges ordered ones.
//! - [`request`]: what the executor is given (`Bound`, `Request`, `Out`) and how it
//!   fails (`ExecError`); [`slots`]: the shard connections a session holds.
//! - [`merge`] / [`value`]: combining rows; messages to shards go through
//!   [`crate::backend::query`].
//! - [`months`]: the maintainer that creates month tables ahead.
//! - [`twopc`]: commits that span shards (PREPARE TRANSACTION + decision log).
//! - [`health`]: per-shard state from probes and live traffic.

pub mod entries;
pub mod exec;
pub mod fallback;
pub mod fence;
pub mod health;
pub mod kway;
pub mod lease;
pub mod lookup;
pub mod lookup_fill;
pub mod merge;
pub mod migration;
pub mod request;
pub mod slots;
pub mod months;
pub mod twopc;
pub mod value;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use shardgate_config::Config;
use shardgate_router::id::{IdGenerator, SystemClock};
use shardgate_router::month::MonthKey;
use shardgate_router::{contains_ignore_case, Context, Router, Topology};

use crate::backend::{pool, Pool};

/// Shared state for routed statements.
pub struct Engine {
    /// Plans statements (cached by text).
    pub router: Router,
    /// One pool per shard, `db_0` first.
    pub shards: Vec<Pool>,
    /// Month tables that exist on the shards, ascending.
    months: RwLock<Arc<Vec<MonthKey>>>,
    /// Generates ids for INSERTs that omit them.
    /// The id generator: set at start with a fixed `ids.worker_id`, else once a
    /// worker-id lease is held (see [`lease`]).
    pub ids: std::sync::OnceLock<IdGenerator>,
    /// Worker ids are leased (no fixed `ids.worker_id`): live leases tell
    /// which proxies run.
    pub leased_ids: bool,
    /// Month tables this proxy created and until when other proxies may not
    /// have listed them yet (see [`months::ensure`]).
    pub settling: std::sync::Mutex<Vec<(MonthKey, std::time::Instant)>>,
    /// Most rows or groups a merge holds in memory.
    pub max_merge_rows: usize,
    /// Most bytes a merge holds in memory.
    pub max_merge_bytes: usize,
    /// Most prepared statements a server connection keeps (`pool.max_prepared_statements`).
    pub max_prepared: usize,
    /// This proxy's id in two-phase commit names.
    /// `db_default` (decision log).
    pub default: Pool,
    /// Age after which recovery resolves a prepared transaction.
    pub orphan_age_ms: u64,
    /// `sharding.fenced_inserts` (see [`entries`]).
    pub fenced_inserts: bool,
    /// Per shard: its fence table is taken to exist ([`fence`]); an INSERT
    /// that finds it missing clears this, and INSERTs there commit the
    /// two-phase way until it is made.
    pub fence_ready: Vec<std::sync::atomic::AtomicBool>,
    /// Metric handles per shard, resolved once.
    pub meters: Vec<ShardMeters>,
    /// `shardgate_fanout_targets`.
    pub fanout: metrics::Histogram,
    /// Health of each shard, by shard number.
    pub health: Vec<health::Tracker>,
    /// Health of `db_default`.
    pub default_health: health::Tracker,
    /// Probe settings and thresholds.
    pub health_cfg: shardgate_config::HealthConfig,
    /// Shard DSNs (probes connect with them; never logged).
    pub shard_dsns: Vec<shardgate_config::Dsn>,
    /// `db_default` DSN.
    pub default_dsn: shardgate_config::Dsn,
    /// Fallback table state (unsynced rows per shard, views made).
    pub fallback: fallback::Fallback,
    /// Probe connections kept between probes: one per shard, then db_default.
    probe_conns: Vec<tokio::sync::Mutex<Option<crate::backend::ServerConn>>>,
    /// Reads of a down shard fail instead of answering from fallback rows.
    pub policy_fail: bool,
    /// Rows per sync-back batch.
    pub sync_batch: u32,
    /// The legacy store while migrating (`legacy_db`).
    pub legacy: Option<Pool>,
    /// The migration phase this proxy follows.
    pub migration: migration::Migration,
    /// Unique-lookup tables in `db_default`.
    pub lookups: lookup::Lookups,
    /// Decided two-phase commits not yet applied on some shard.
    pub unfinished: twopc::Unfinished,
    /// Decision rows to delete, in batches.
    pub forgotten: twopc::Forgotten,
    /// (shard, month) tables a shard missed when the month was made ([`months::create`]).
    /// With the last time each was tried.
    pub month_gaps: std::sync::Mutex<Vec<(usize, MonthKey, Option<std::time::Instant>)>>,
    /// Held while a session fills month gaps.
    pub gap_fill: tokio::sync::Mutex<()>,
}

/// A shard's metric handles (an update is an atomic add, no key lookup).
pub struct ShardMeters {
    /// `shardgate_shard_queries_total{shard}`.
    pub queries: metrics::Counter,
    /// `shardgate_shard_errors_total{shard}`.
    pub errors: metrics::Counter,
    /// `shardgate_shard_query_seconds{shard}`.
    pub seconds: metrics::Histogram,
    /// `shardgate_shard_pool_wait_seconds{shard}`.
    pub pool_wait: metrics::Histogram,
}

impl ShardMeters {
    fn new(shard: usize) -> ShardMeters {
        use crate::metrics as m;
        let label = exec::shard_label(shard);
        ShardMeters {
            queries: metrics::counter!(m::SHARD_QUERIES, "shard" => label),
            errors: metrics::counter!(m::SHARD_ERRORS, "shard" => label),
            seconds: metrics::histogram!(m::SHARD_QUERY_SECONDS, "shard" => label),
            pool_wait: metrics::histogram!(m::SHARD_POOL_WAIT_SECONDS, "shard" => label),
        }
    }
}

impl Engine {
    /// The per-shard meters of one statement, and the shards' health: a server's
    /// answer, even an error, shows the shard is up.
    pub(crate) fn account(&self, shards: &[usize], t0: std::time::Instant, result: &Result<(), exec::ExecError>) {
        for &s in shards {
            let Some(meters) = self.meters.get(s) else { continue };
            meters.queries.increment(1);
            meters.seconds.record(t0.elapsed().as_secs_f64());
            match result {
                Ok(()) => self.shard_answered(s),
                Err(exec::ExecError::Server(_)) => {
                    self.shard_answered(s);
                    meters.errors.increment(1);
                }
                Err(_) => meters.errors.increment(1),
            }
        }
    }

    /// The worker id of this proxy's ids (0 before a lease is held).
    pub fn worker(&self) -> u16 {
        self.ids.get().map_or(0, IdGenerator::worker)
    }

    /// Holds a worker-id lease for the life of the process when `ids.worker_id`
    /// is not set: takes one (retrying while db_default is unreachable or every
    /// worker id is held), starts the id generator behind its fence, renews it.
    pub fn start_id_lease(self: &std::sync::Arc<Self>, config: &Config, shutdown: tokio::sync::watch::Receiver<bool>) {
        if config.ids.worker_id.is_some() {
            return;
        }
        let engine = self.clone();
        let (dsn, ttl, backward) = (config.default_dsn(), config.ids.lease_ttl_ms, config.ids.max_clock_backward_ms);
        tokio::spawn(async move {
            let lease = loop {
                match lease::acquire(&dsn, ttl).await {
                    Ok(Some(l)) => break l,
                    Ok(None) => tracing::error!("all 64 worker ids are leased by live proxies; this proxy issues no ids until one is free"),
                    Err(e) => tracing::warn!(error = %e, "could not take a worker-id lease yet; retrying"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            };
            let layout = engine.topology().ids.clone();
            match IdGenerator::new(layout, lease.worker, backward, Box::new(SystemClock), lease.resume_after_ms) {
                Ok(g) => {
                    tracing::info!(worker = lease.worker, "worker-id lease taken");
                    let _ = engine.ids.set(g.with_fence(lease.fence.clone()));
                    lease::keep(dsn, lease, ttl, shutdown).await;
                }
                Err(e) => tracing::error!(error = %e, "cannot issue ids"),
            }
        });
    }

    /// Builds the engine; pools connect lazily.
    pub fn new(config: &Config, default: Pool) -> anyhow::Result<Engine> {
        let topo = Topology::from_config(config).map_err(anyhow::Error::msg)?;
        let p = &config.pool;
        let shards = config
            .shard_dsns()
            .into_iter()
            .map(|dsn| pool::build(dsn, p))
            .collect();
        let ids = std::sync::OnceLock::new();
        if let Some(worker) = config.ids.worker_id {
            let g = IdGenerator::new(topo.ids.clone(), worker, config.ids.max_clock_backward_ms, Box::new(SystemClock), 0).map_err(|e| anyhow::anyhow!("{e}"))?;
            let _ = ids.set(g);
        }
        Ok(Engine {
            router: Router::new(topo, shardgate_router::CACHE_BYTES),
            shards,
            months: RwLock::new(Arc::new(Vec::new())),
            ids,
            leased_ids: config.ids.worker_id.is_none(),
            settling: std::sync::Mutex::new(Vec::new()),
            max_merge_rows: config.server.max_merge_rows,
            max_merge_bytes: config.server.max_merge_bytes,
            max_prepared: config.pool.max_prepared_statements,
            default,
            orphan_age_ms: config.sharding.prepared_orphan_age_ms,
            fenced_inserts: config.sharding.fenced_inserts,
            fence_ready: (0..config.shards.len()).map(|_| true.into()).collect(),
            meters: (0..config.shards.len()).map(ShardMeters::new).collect(),
            fanout: metrics::histogram!(crate::metrics::FANOUT),
            health: (0..config.shards.len()).map(|_| health::Tracker::default()).collect(),
            default_health: health::Tracker::default(),
            health_cfg: config.health.clone(),
            shard_dsns: config.shard_dsns(),
            default_dsn: config.default_dsn(),
            fallback: fallback::Fallback::new(config.shards.len()),
            probe_conns: (0..=config.shards.len()).map(|_| tokio::sync::Mutex::new(None)).collect(),
            policy_fail: config.fallback.policy == shardgate_config::FallbackPolicy::Fail,
            sync_batch: config.fallback.batch_size.max(1),
            legacy: config
                .legacy_db
                .as_ref()
                .and_then(|l| shardgate_config::Dsn::parse(&l.dsn).ok())
                .map(|dsn| pool::build(dsn, p)),
            migration: migration::Migration::new(config),
            lookups: lookup::Lookups::default(),
            unfinished: twopc::Unfinished::default(),
            forgotten: twopc::Forgotten::default(),
            month_gaps: std::sync::Mutex::new(Vec::new()),
            gap_fill: tokio::sync::Mutex::new(()),
        })
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        self.router.topology()
    }

    /// Month tables known to exist.
    pub fn months(&self) -> Arc<Vec<MonthKey>> {
        self.months.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Records months that exist now.
    pub fn add_months(&self, found: &[MonthKey]) {
        if let Ok(mut m) = self.months.write() {
            let mut v: Vec<MonthKey> = m.iter().copied().chain(found.iter().copied()).collect();
            v.sort();
            v.dedup();
            *m = Arc::new(v);
        }
    }

    /// Planning context for now.
    pub fn plan(&self, sql: &str, params: &[shardgate_router::Param<'_>]) -> shardgate_router::Result<shardgate_router::Plan> {
        let months = self.months();
        let ctx = Context { now: jiff::Timestamp::now(), months: &months, ids: self.ids.get(), zone: Default::default(), lookups: &[] };
        self.router.plan(sql, params, &ctx)
    }

    /// Plans an already analysed statement (prepared statements keep theirs).
    /// `zone` is the client session's TimeZone (offset-free times are read in it).
    pub fn plan_analysis(
        &self,
        a: &shardgate_router::Analysis,
        params: &[shardgate_router::Param<'_>],
        zone: shardgate_router::SessionZone<'_>,
    ) -> shardgate_router::Result<shardgate_router::Plan> {
        self.plan_with(a, params, zone, &[])
    }

    /// [`Engine::plan_analysis`] with unique-lookup entries looked up for it.
    pub fn plan_with(
        &self,
        a: &shardgate_router::Analysis,
        params: &[shardgate_router::Param<'_>],
        zone: shardgate_router::SessionZone<'_>,
        lookups: &[shardgate_router::Resolved],
    ) -> shardgate_router::Result<shardgate_router::Plan> {
        let months = self.months();
        let ctx = Context { now: jiff::Timestamp::now(), months: &months, ids: self.ids.get(), zone, lookups };
        a.plan(params, self.topology(), &ctx)
    }

    /// True when `sql` may name a sharded table (a cheap scan before the router).
    pub fn may_route(&self, sql: &[u8]) -> bool {
        // a Unicode-escaped identifier may spell a sharded table's name (the router refuses it)
        self.topology().tables.iter().any(|t| contains_ignore_case(sql, t.name.as_bytes())) || contains_ignore_case(sql, b"u&\"")
    }

    /// The pool of a slot: shards by number, then `db_default` (fallback rows),
    /// then the legacy store.
    pub fn pool(&self, slot: usize) -> &Pool {
        match (self.shards.get(slot), &self.legacy) {
            (Some(p), _) => p,
            (None, Some(l)) if slot == self.legacy_slot() => l,
            _ => &self.default,
        }
    }

    /// Slot number of the legacy store.
    pub fn legacy_slot(&self) -> usize {
        self.shards.len() + 1
    }

    /// A shard is taken out of use (its writes go to the fallback table).
    pub fn is_down(&self, shard: usize) -> bool {
        self.health.get(shard).is_some_and(|h| h.state() == health::State::Down)
    }

    /// Live traffic could not reach a shard.
    pub fn shard_unreachable(&self, shard: usize, error: &str) {
        if let Some((from, to)) = self.health.get(shard).and_then(|h| h.unreachable(error)) {
            self.state_changed(shard, from, to, Some(error));
        }
    }

    /// A statement on a shard was answered.
    pub fn shard_answered(&self, shard: usize) {
        if let Some((from, to)) = self.health.get(shard).and_then(|h| h.traffic_ok()) {
            self.state_changed(shard, from, to, None);
        }
    }

    fn state_changed(&self, shard: usize, from: health::State, to: health::State, error: Option<&str>) {
        tracing::warn!(shard = exec::shard_label(shard), from = from.name(), to = to.name(), error = error.unwrap_or(""), "shard state changed");
        metrics::gauge!(crate::metrics::SHARD_UP, "shard" => exec::shard_label(shard)).set(if to == health::State::Down { 0.0 } else { 1.0 });
        metrics::gauge!(crate::metrics::SHARD_STATE, "shard" => exec::shard_label(shard)).set(to as u8 as f64);
    }

    /// One round of probes: every shard and `db_default`, concurrently.
    pub async fn probe_all(&self) {
        let timeout = Duration::from_millis(self.health_cfg.probe_timeout_ms);
        // a success counts only for a shard not marked down after this
        let started = std::time::Instant::now();
        // each shard: the probe, then (on the same kept connection) its month tables, all
        // shards at once, so a round lasts at most two timeouts
        let shard_probes = self.shard_dsns.iter().zip(&self.probe_conns).map(|(d, c)| async move {
            let r = health::probe(d, c, timeout).await;
            let mut listed = None;
            if r.is_ok() {
                let mut kept = c.lock().await;
                if let Some(conn) = kept.as_mut() {
                    match tokio::time::timeout(timeout, months::list(self, conn)).await {
                        Ok(Ok(m)) => listed = Some(m),
                        Ok(Err(e)) => tracing::debug!(error = %e, "listing month tables failed"),
                        Err(_) => *kept = None,
                    }
                }
            }
            (r, listed)
        });
        let default_conn = self.probe_conns.last().expect("one per shard and one for db_default");
        let (rounds, default) = tokio::join!(futures_join_all(shard_probes), health::probe(&self.default_dsn, default_conn, timeout));
        let mut found = Vec::new();
        let mut results = Vec::with_capacity(rounds.len());
        let mut lists = Vec::with_capacity(rounds.len());
        for (r, listed) in rounds {
            found.extend(listed.iter().flatten().copied());
            lists.push(listed);
            results.push(r);
        }
        for (shard, r) in results.iter().enumerate() {
            let t = &self.health[shard];
            let change = match &r {
                Ok(latency) => t.success(*latency, &self.health_cfg, started),
                Err(e) => t.failure(e, &self.health_cfg),
            };
            if let Some((from, to)) = change {
                self.state_changed(shard, from, to, r.as_ref().err().map(String::as_str));
                if from == health::State::Down {
                    // back from down: it may lack month tables made meanwhile
                    if !months::fill_in(self, shard).await {
                        tracing::warn!(shard = exec::shard_label(shard), "could not create missing month tables on a returning shard");
                    }
                }
            }
        }
        // month tables other proxies made
        if !found.is_empty() {
            found.sort();
            found.dedup();
            // a month listed on some shards and not on others (being made right now, or made
            // while they were away) is a gap: filled before a statement goes into it there
            // (noted before the month is known, so no statement sees one without the other)
            months::note_listed(self, &lists, &found);
            let known = self.months();
            if found.iter().any(|m| !known.contains(m)) {
                self.add_months(&found);
            }
        }
        let change = match &default {
            Ok(latency) => self.default_health.success(*latency, &self.health_cfg, started),
            Err(e) => self.default_health.failure(e, &self.health_cfg),
        };
        if let Some((from, to)) = change {
            tracing::warn!(from = from.name(), to = to.name(), error = default.as_ref().err().map_or("", String::as_str), "db_default state changed");
        }
    }

    /// What one merge may hold.
    pub fn merge_caps(&self) -> merge::Caps {
        merge::Caps { rows: self.max_merge_rows, bytes: self.max_merge_bytes }
    }

    /// Closes all shard pools.
    pub fn close(&self) {
        for p in &self.shards {
            p.close();
        }
    }
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|o| o.expect("all ready")).collect()
}
