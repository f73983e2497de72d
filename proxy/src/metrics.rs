//! Every metric name shardgate exports, in one place; labels come from small enums.

/// Client connections accepted (counter).
pub const CLIENT_CONNECTIONS_TOTAL: &str = "shardgate_client_connections_total";
/// Client connections open now (gauge).
pub const CLIENT_CONNECTIONS: &str = "shardgate_client_connections";
/// Client connections refused over `max_client_connections` (counter).
pub const CLIENT_REFUSED_TOTAL: &str = "shardgate_client_refused_total";
/// Authentication failures (counter).
pub const AUTH_FAILURES_TOTAL: &str = "shardgate_auth_failures_total";
/// Requests forwarded, label `kind` = simple | extended (counter).
pub const QUERIES_TOTAL: &str = "shardgate_queries_total";
/// Errors shardgate generated itself, label `sqlstate` (counter).
pub const ERRORS_TOTAL: &str = "shardgate_errors_total";
/// Time waiting for a server connection (histogram, seconds).
pub const POOL_WAIT_SECONDS: &str = "shardgate_pool_wait_seconds";
/// New server connections made (counter).
pub const SERVER_CONNECTS: &str = "shardgate_server_connects_total";
/// Clients pinned to a server connection by session state, label `reason` (counter).
pub const PINNED_TOTAL: &str = "shardgate_pinned_clients_total";
/// Queries cancelled by `query_timeout_ms` (counter).
pub const QUERY_TIMEOUTS_TOTAL: &str = "shardgate_query_timeouts_total";
/// Server connections in the pool, label `state` = size | available (gauge).
pub const POOL_CONNECTIONS: &str = "shardgate_pool_connections";

/// Statements run on a shard, label `shard` (counter).
pub const SHARD_QUERIES: &str = "shardgate_shard_queries_total";
/// Statements that failed on a shard, label `shard` (counter).
pub const SHARD_ERRORS: &str = "shardgate_shard_errors_total";
/// Time from sending a routed statement to its last reply, label `shard` (histogram, seconds).
pub const SHARD_QUERY_SECONDS: &str = "shardgate_shard_query_seconds";
/// Time waiting for a shard connection, label `shard` (histogram, seconds).
pub const SHARD_POOL_WAIT_SECONDS: &str = "shardgate_shard_pool_wait_seconds";
/// Targets per routed statement (histogram).
pub const FANOUT: &str = "shardgate_fanout_targets";
/// Statements refused by the router, label `sqlstate` (counter).
pub const ROUTE_REFUSED_TOTAL: &str = "shardgate_route_refused_total";
/// Reads routed by a remembered unique-lookup place, label `result` =
/// confirmed (the answer had a row) | unconfirmed (asked the lookup table and ran again) (counter).
pub const LOOKUP_HINTS_TOTAL: &str = "shardgate_lookup_hints_total";
/// Simple-protocol statements on sharded tables, by `path`: `shape` (planned
/// from the cached analysis of their shape) or `parse` (their text parsed).
pub const SIMPLE_PLANS_TOTAL: &str = "shardgate_simple_plans_total";
/// Transactions committed on several shards with two-phase commit (counter).
pub const TWO_PHASE_COMMITS: &str = "shardgate_two_phase_commits_total";

/// 1 while a shard is in use (up, suspect, recovering), 0 while down, label `shard` (gauge).
pub const SHARD_UP: &str = "shardgate_shard_up";
/// A shard's state: 0 up, 1 suspect, 2 down, 3 recovering, label `shard` (gauge).
pub const SHARD_STATE: &str = "shardgate_shard_state";

/// Fallback rows not yet synced back, labels `shard`, `status` = pending | failed (gauge).
pub const FALLBACK_ROWS: &str = "shardgate_fallback_rows";
/// Age of the oldest fallback row not yet synced back, label `shard` (gauge, seconds).
pub const FALLBACK_LAG_SECONDS: &str = "shardgate_fallback_lag_seconds";
/// Fallback rows synced back to their shard (counter).
pub const FALLBACK_SYNCED_TOTAL: &str = "shardgate_fallback_synced_total";

/// Cache lookups answered, label `level` = bloom | l1 | l2 | db (counter).
pub const CACHE_HITS: &str = "shardgate_cache_hits_total";
/// Migration phase this proxy follows (index: legacy, prepared, dual_write, shard_reads, shard_writes, finalized, rolled_back).
pub const MIGRATION_PHASE: &str = "shardgate_migration_phase";
/// Secondary writes that failed and went to the outbox, by `target` store.
pub const MIGRATION_OUTBOX_TOTAL: &str = "shardgate_migration_outbox_total";
/// Outbox entries not applied yet.
pub const MIGRATION_OUTBOX_PENDING: &str = "shardgate_migration_outbox_pending";
/// Cache lookups a level could not answer, label `level` = l1 | l2 (counter).
pub const CACHE_MISSES: &str = "shardgate_cache_misses_total";
/// Point reads that skipped the cache, label `reason` (counter).
pub const CACHE_BYPASS: &str = "shardgate_cache_bypass_total";
/// Time to answer a cached point read by the level that answered it, label `level` (histogram, seconds).
pub const CACHE_LOOKUP_SECONDS: &str = "shardgate_cache_lookup_seconds";
/// Keys or tables invalidated, label `origin` = local | remote, `scope` = key | table (counter).
pub const CACHE_INVALIDATIONS: &str = "shardgate_cache_invalidations_total";
/// Redis commands that failed or timed out (counter).
pub const CACHE_REDIS_ERRORS: &str = "shardgate_cache_redis_errors_total";
/// Keys in the bloom filter after its last load, label `table` (gauge).
pub const CACHE_BLOOM_KEYS: &str = "shardgate_cache_bloom_keys";

/// Bucket bounds (seconds) for [`POOL_WAIT_SECONDS`].
pub const POOL_WAIT_BUCKETS: &[f64] = &[0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Bucket bounds (seconds) for [`SHARD_QUERY_SECONDS`].
pub const QUERY_BUCKETS: &[f64] = &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
/// Bucket bounds (seconds) for [`CACHE_LOOKUP_SECONDS`].
pub const CACHE_BUCKETS: &[f64] = &[0.000_005, 0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.01, 0.1, 1.0];
/// Bucket bounds for [`FANOUT`].
pub const FANOUT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Handles for the metrics touched on every request, resolved once: a handle
/// update is an atomic add, where the macros hash and look up the key each time.
pub struct Meters {
    /// `shardgate_queries_total{kind="simple"}`.
    pub queries_simple: metrics::Counter,
    /// `shardgate_queries_total{kind="extended"}`.
    pub queries_extended: metrics::Counter,
    /// `shardgate_pool_wait_seconds`.
    pub pool_wait: metrics::Histogram,
}

impl Meters {
    /// Resolves the handles against the installed recorder.
    pub fn new() -> Meters {
        Meters {
            queries_simple: metrics::counter!(QUERIES_TOTAL, "kind" => "simple"),
            queries_extended: metrics::counter!(QUERIES_TOTAL, "kind" => "extended"),
            pool_wait: metrics::histogram!(POOL_WAIT_SECONDS),
        }
    }
}

impl Default for Meters {
    fn default() -> Self {
        Self::new()
    }
}
