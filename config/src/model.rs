//! The whole shardgate configuration as serde types. Unknown keys are rejected
//! (`deny_unknown_fields`) so a misspelt key never silently falls back to a default.

use serde::{Deserialize, Serialize};

/// Root of `shardgate.toml`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, limits and timeouts of the client-facing server.
    #[serde(default)]
    pub server: ServerConfig,
    /// Users allowed to connect to the proxy (not the backend users).
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Backend pool sizing and timeouts (applies to every backend).
    #[serde(default)]
    pub pool: PoolConfig,
    /// Shard databases, in shard order: entry `n` is `db_n`.
    #[serde(default)]
    pub shards: Vec<BackendConfig>,
    /// The default database: unsharded tables, fallback table, control tables.
    pub default_db: BackendConfig,
    /// The legacy single-table store, only needed while migrating.
    #[serde(default)]
    pub legacy_db: Option<BackendConfig>,
    /// How rows are spread: shard count, time zone, month tables.
    #[serde(default)]
    pub sharding: ShardingConfig,
    /// Tables that are sharded; everything else is passed through to `default_db`.
    #[serde(default = "default_sharded_tables")]
    pub sharded_tables: Vec<ShardedTableConfig>,
    /// Global (snowflake) id generation.
    #[serde(default)]
    pub ids: IdConfig,
    /// Shard health probing and state thresholds.
    #[serde(default)]
    pub health: HealthConfig,
    /// Behaviour while a shard is down.
    #[serde(default)]
    pub fallback: FallbackConfig,
    /// Redis, used for the L2 cache, invalidation pub/sub and worker-id leases.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Merchant-info cache settings.
    #[serde(default)]
    pub cache: CacheConfig,
    /// How proxies follow a migration from `legacy_db` (shardgate-migrate).
    #[serde(default)]
    pub migration: MigrationConfig,
}

/// Migration settings of the proxy (the CLI's own options are flags).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// How often the proxy reads the migration phase from `db_default`.
    pub poll_interval_ms: u64,
    /// How often failed secondary writes (the outbox) are retried; 0 = never
    /// (only `shardgate-migrate verify --repair` closes them).
    pub outbox_retry_interval_ms: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig { poll_interval_ms: 250, outbox_retry_interval_ms: 2_000 }
    }
}

/// A secret value: never printed by `Debug`.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Client-facing server settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Postgres wire protocol listen address.
    pub listen: String,
    /// Admin HTTP listen address (`/livez`, `/readyz`, `/health`, `/metrics`).
    pub admin_listen: String,
    /// Logged-in client connections above this are refused with SQLSTATE 53300.
    pub max_client_connections: usize,
    /// When set, the admin HTTP port answers everything but `/livez` only to
    /// `Authorization: Bearer <token>` (401 otherwise).
    pub admin_token: Option<Secret>,
    /// Name of an environment variable holding `admin_token`.
    pub admin_token_env: Option<String>,
    /// Connections still logging in above this are refused at once with 53300
    /// (they do not take places of logged-in clients).
    pub max_unauthenticated: usize,
    /// A connection that has not logged in after this long is closed (08006).
    pub login_timeout_ms: u64,
    /// Largest protocol message accepted from a client, in bytes; a larger
    /// length prefix is refused before anything is allocated.
    pub max_message_size: usize,
    /// Close a client that is idle outside a transaction this long (0 = never).
    pub client_idle_timeout_ms: u64,
    /// Close a client that sits idle inside a transaction this long (0 = never).
    pub idle_in_transaction_timeout_ms: u64,
    /// Cancel a statement that runs longer than this (0 = never); client gets 57014.
    pub query_timeout_ms: u64,
    /// On SIGTERM, wait this long for running transactions before closing.
    pub shutdown_timeout_ms: u64,
    /// Authentication method demanded from clients.
    pub auth_method: AuthMethod,
    /// Runtime worker threads; 0 means one per CPU core.
    pub worker_threads: usize,
    /// Most rows (or groups) one cross-shard merge may hold in memory
    /// (GROUP BY, DISTINCT, ORDER BY without streaming); above it the query
    /// fails with 54000 and a hint. Streams (single shard, plain and ordered
    /// concatenations) are not limited.
    pub max_merge_rows: usize,
    /// Most bytes of rows, groups and distinct values one cross-shard merge
    /// may hold (the same merges as `max_merge_rows`; 54000 above it).
    pub max_merge_bytes: usize,
    /// Named prepared statements one client may hold at once (Parse of one
    /// more fails with 53400 until it closes some); the unnamed one is free.
    pub max_client_statements: usize,
    /// Bytes one client's named prepared statements may take in the proxy
    /// (text, and 32 bytes per byte of text for the analysis of one on a
    /// sharded table); Parse of one more fails with 53400.
    pub max_client_statement_bytes: usize,
    /// Named portals of sharded-table statements one client may hold open at
    /// once (Bind of one more fails with 53400).
    pub max_client_portals: usize,
    /// PEM file with the certificate chain the proxy presents to TLS clients
    /// (with `tls_key_file`; both unset: SSLRequest is answered `N`).
    pub tls_cert_file: Option<String>,
    /// PEM file with the private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<String>,
    /// Refuse clients that did not negotiate TLS (28000, before authentication).
    pub require_tls: bool,
    /// Most bytes of rows one client portal of a sharded table may hold
    /// between Executes with a row limit (pgjdbc fetch size, asyncpg
    /// cursors): the answer is read whole and handed out in parts; above it
    /// the Execute fails with 54000 and a hint.
    pub max_portal_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:6432".into(),
            admin_listen: "127.0.0.1:9930".into(),
            max_client_connections: 4096,
            max_unauthenticated: 256,
            admin_token: None,
            admin_token_env: None,
            login_timeout_ms: 10_000,
            max_message_size: 64 * 1024 * 1024,
            client_idle_timeout_ms: 0,
            idle_in_transaction_timeout_ms: 0,
            query_timeout_ms: 0,
            shutdown_timeout_ms: 30_000,
            auth_method: AuthMethod::ScramSha256,
            worker_threads: 0,
            max_merge_rows: 1_000_000,
            max_merge_bytes: 256 << 20,
            max_portal_bytes: 64 * 1024 * 1024,
            max_client_statements: 10_000,
            max_client_portals: 1_000,
            max_client_statement_bytes: 64 << 20,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
        }
    }
}

/// How a client proves its password.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum AuthMethod {
    /// SCRAM-SHA-256 (default; the password never crosses the wire).
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// Legacy md5 challenge.
    #[serde(rename = "md5")]
    Md5,
}

/// A proxy user.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Login name.
    pub name: String,
    /// Plain password, or a `SCRAM-SHA-256$...` verifier, or an `md5...` hash.
    /// Or leave it out and give `password_env` or `password_file`.
    #[serde(default)]
    pub password: String,
    /// Name of an environment variable holding the password (read at start).
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding the password (read at start; surrounding whitespace dropped).
    #[serde(default)]
    pub password_file: Option<String>,
    /// Overrides `server.auth_method` for this user.
    #[serde(default)]
    pub auth_method: Option<AuthMethod>,
    /// May run admin commands (`SHOW SHARDS`, ...).
    #[serde(default)]
    pub admin: bool,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("auth_method", &self.auth_method)
            .field("admin", &self.admin)
            .finish()
    }
}

/// Backend connection pool settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Maximum server connections per backend database.
    pub size: usize,
    /// How long a client waits for a server connection before 53300.
    pub checkout_timeout_ms: u64,
    /// TCP connect + startup timeout to a backend.
    pub connect_timeout_ms: u64,
    /// `transaction` (default) or `session` pooling.
    pub mode: PoolMode,
    /// Prepared statements one server connection keeps for shardgate (clients'
    /// statements and routed ones); beyond this the least recently used is closed.
    pub max_prepared_statements: usize,
    /// A server connection idle in its pool this long is closed (0 = never).
    pub idle_timeout_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { size: 20, checkout_timeout_ms: 5_000, connect_timeout_ms: 3_000, mode: PoolMode::Transaction, max_prepared_statements: 512, idle_timeout_ms: 600_000 }
    }
}

/// When a server connection goes back to the pool.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Returned at the end of every transaction.
    Transaction,
    /// Held for the whole client session.
    Session,
}

/// One backend database.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `postgres://user:password@host:port/dbname`.
    pub dsn: String,
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig").field("dsn", &crate::redact_url(&self.dsn)).finish()
    }
}

/// Sharding parameters.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShardingConfig {
    /// Number of shard databases; `shards` must list exactly this many.
    pub shard_count: usize,
    /// IANA time zone used to turn `create_time` into `yyyyMM`.
    pub time_zone: String,
    /// Month tables kept created ahead of the current month.
    pub months_ahead: u32,
    /// A shard's prepared transaction (two-phase commit) older than this whose
    /// proxy is gone is resolved by recovery from the decision log.
    pub prepared_orphan_age_ms: u64,
    /// An INSERT may create a missing month table only this many months
    /// before the current month (an older one is refused with 0A000: one
    /// client must not make thousands of tables on every shard).
    pub create_months_back: u32,
    /// … and only this many months after it.
    pub create_months_ahead: u32,
    /// An autocommit INSERT on one shard commits its unique-lookup entries
    /// ahead of its row, behind a fence, instead of with two-phase commit.
    /// Every proxy on the same databases must run a version that fences (an
    /// older one would take an entry over without waiting for its row):
    /// during a rolling upgrade from such a version, set false until all run
    /// this one.
    pub fenced_inserts: bool,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig {
            shard_count: 8,
            time_zone: "UTC".into(),
            months_ahead: 3,
            prepared_orphan_age_ms: 60_000,
            create_months_back: 120,
            create_months_ahead: 24,
            fenced_inserts: true,
        }
    }
}

/// A logical table spread over shards and months.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardedTableConfig {
    /// Logical name the application uses.
    pub name: String,
    /// Column whose value modulo `shard_count` picks the database.
    pub shard_key: String,
    /// Timestamp column whose month picks the physical table.
    pub month_column: String,
    /// Physical table name; must contain `{yyyyMM}`.
    pub table_pattern: String,
    /// Primary-key column filled with a snowflake id when an INSERT omits it.
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Columns kept unique across every shard and month (as a unique index on
    /// one table would): each value is recorded in a lookup table in
    /// `db_default`, written atomically with the row, so an INSERT of a taken
    /// value gets `23505` and `WHERE col = value` goes to one shard and month.
    #[serde(default)]
    pub unique_lookups: Vec<String>,
}

fn default_id_column() -> String {
    "id".into()
}

fn default_sharded_tables() -> Vec<ShardedTableConfig> {
    vec![ShardedTableConfig {
        name: "t_order".into(),
        shard_key: "merchant_id".into(),
        month_column: "create_time".into(),
        table_pattern: "t_order_{yyyyMM}".into(),
        id_column: default_id_column(),
        unique_lookups: vec!["order_no".into()],
    }]
}

/// Snowflake id settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdConfig {
    /// This proxy's worker id (0..=63), fixed by the operator, who must then
    /// make sure no two proxies share it. `None` (the default) leases a free
    /// one from `db_default` (`shardgate_worker_leases`), renewed while the
    /// proxy runs; without a valid lease no id is handed out.
    pub worker_id: Option<u16>,
    /// How long a worker-id lease lasts without renewal (renewed every third of it).
    pub lease_ttl_ms: u64,
    /// Epoch of the id timestamp, milliseconds since 1970-01-01 UTC.
    pub epoch_ms: u64,
    /// Largest backwards clock step (ms) waited out instead of failing.
    pub max_clock_backward_ms: u64,
    /// Ids up to this value were not issued by shardgate (for example legacy
    /// sequence ids brought in by a migration): they are never decoded for
    /// routing, a lookup by such an id goes to every shard and month.
    pub legacy_id_max: i64,
    /// Whether `WHERE id = …` alone may narrow a statement to the shard and
    /// month an id names. Off (the default): applications bring their own ids
    /// (sequences, their own snowflakes, migrated rows), so a lookup by id
    /// goes to every shard and month and always finds its row. On: every id
    /// above `legacy_id_max` that decodes as a shardgate id must name its
    /// row's shard and month — an INSERT with an explicit id that does not is
    /// refused (0A000) — and lookups by such ids go to one shard and month.
    pub route_by_id: bool,
}

impl Default for IdConfig {
    fn default() -> Self {
        // 2024-01-01T00:00:00Z
        IdConfig { worker_id: None, lease_ttl_ms: 30_000, epoch_ms: 1_704_067_200_000, max_clock_backward_ms: 50, legacy_id_max: 0, route_by_id: false }
    }
}

/// Health probing.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between active probes of each shard.
    pub probe_interval_ms: u64,
    /// A probe slower than this counts as failed.
    pub probe_timeout_ms: u64,
    /// Consecutive failures that turn `suspect` into `down`.
    pub failure_threshold: u32,
    /// Consecutive successes that turn `recovering` into `up`.
    pub recovery_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { probe_interval_ms: 1_000, probe_timeout_ms: 1_000, failure_threshold: 3, recovery_threshold: 2 }
    }
}

/// What reads see while a shard is down.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FallbackPolicy {
    /// Return fallback rows with a NOTICE naming the shard.
    Partial,
    /// Fail the read.
    Fail,
}

/// Fallback and sync-back.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    /// Read policy while a shard is down.
    pub policy: FallbackPolicy,
    /// Time between sync-back rounds.
    pub sync_interval_ms: u64,
    /// Rows moved per sync-back transaction.
    pub batch_size: u32,
    /// SYNCED rows older than this are purged.
    pub retention_hours: u64,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig { policy: FallbackPolicy::Partial, sync_interval_ms: 5_000, batch_size: 1_000, retention_hours: 72 }
    }
}

/// Redis connection.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`, or `rediss://…` for TLS (the server's
    /// certificate is verified against `tls_ca_file`, else the system roots).
    pub url: String,
    /// PEM file of the CA that signed Redis's certificate (`rediss://` only).
    #[serde(default)]
    pub tls_ca_file: Option<String>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig").field("url", &crate::redact_url(&self.url)).field("tls_ca_file", &self.tls_ca_file).finish()
    }
}

/// Two-level cache.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Entries kept in the local (L1) cache.
    pub l1_capacity: u64,
    /// Bytes of answers kept in the local (L1) cache (with `l1_capacity`,
    /// whichever is reached first).
    pub l1_max_bytes: u64,
    /// L1 time to live.
    pub l1_ttl_ms: u64,
    /// Redis (L2) time to live.
    pub l2_ttl_ms: u64,
    /// How long a "no such key" answer is cached.
    pub negative_ttl_ms: u64,
    /// TTLs are spread by up to this percentage to avoid synchronized expiry.
    pub ttl_jitter_percent: u8,
    /// How often each proxy reloads the bloom filter of existing keys from the
    /// table (keys written through shardgate are added at once).
    pub bloom_refresh_ms: u64,
    /// False-positive rate of the bloom filter (0 < rate < 1).
    pub bloom_false_positive_rate: f64,
    /// A Redis command taking longer than this counts as Redis being down:
    /// the lookup goes on to the database.
    pub redis_timeout_ms: u64,
    /// Pooled Redis connections for cache commands.
    pub redis_pool_size: u32,
    /// Tables served through the cache.
    pub tables: Vec<CachedTableConfig>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1_capacity: 100_000,
            l1_max_bytes: 64 << 20,
            l1_ttl_ms: 60_000,
            l2_ttl_ms: 600_000,
            negative_ttl_ms: 5_000,
            ttl_jitter_percent: 10,
            bloom_refresh_ms: 30_000,
            bloom_false_positive_rate: 0.01,
            redis_timeout_ms: 100,
            redis_pool_size: 16,
            tables: vec![CachedTableConfig { name: "t_merchant".into(), key: "merchant_id".into() }],
        }
    }
}

/// A table whose point reads by key are cached.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CachedTableConfig {
    /// Table on `default_db`.
    pub name: String,
    /// Key column.
    pub key: String,
}
