//! The routing inputs: sharded-table rules from config, and the per-call
//! context (time, existing months, id source, bind values). No I/O.

use jiff::{tz::TimeZone, Timestamp};

use crate::id::{IdGenerator, IdLayout};
use crate::month::MonthKey;

/// One sharded table.
#[derive(Debug, Clone)]
pub struct TableRule {
    /// Logical name (`t_order`), as PostgreSQL folds it (lower case unless quoted in config).
    pub name: String,
    /// Shard-key column (`merchant_id`).
    pub shard_key: String,
    /// Month column (`create_time`).
    pub month_column: String,
    /// Id column (`id`).
    pub id_column: String,
    /// Physical name pattern with `{yyyyMM}`.
    pub pattern: String,
    /// Columns kept unique across shards and months through a lookup table in `db_default`.
    pub unique_lookups: Vec<String>,
}

impl TableRule {
    /// `t_order_202611`.
    pub fn physical(&self, month: MonthKey) -> String {
        let mut out = String::with_capacity(self.pattern.len());
        self.push_physical(&mut out, month);
        out
    }

    /// Appends [`Self::physical`] to `out`.
    pub fn push_physical(&self, out: &mut String, month: MonthKey) {
        let mut parts = self.pattern.split("{yyyyMM}");
        out.push_str(parts.next().unwrap_or_default());
        for rest in parts {
            month.push_suffix(out);
            out.push_str(rest);
        }
    }

    /// The lookup table in `db_default` for unique column `column`
    /// (`shardgate_lookup_t_order_order_no`): value → shard key and month.
    pub fn lookup_table(&self, column: &str) -> String {
        format!("shardgate_lookup_{}_{}", self.name, column)
    }

    /// DDL that creates the month table from the template table (same columns,
    /// defaults, constraints and indexes); idempotent.
    pub fn create_month_table_sql(&self, month: MonthKey) -> String {
        format!("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING ALL)", self.physical(month), self.name)
    }

    /// The fallback table on `db_default` (rows for a down shard).
    pub fn fallback_table(&self) -> String {
        format!("{}_fallback", self.name)
    }

    /// DDL of the fallback table and its indexes (needs the template table); idempotent.
    pub fn create_fallback_table_sql(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (LIKE {name} INCLUDING DEFAULTS INCLUDING CONSTRAINTS, \
             target_db text NOT NULL, target_table text NOT NULL, \
             sync_status text NOT NULL DEFAULT 'PENDING' CHECK (sync_status IN ('PENDING', 'SYNCED', 'FAILED')), \
             sync_attempts int NOT NULL DEFAULT 0, last_error text, next_attempt_at timestamptz, \
             created_at timestamptz NOT NULL DEFAULT now(), synced_at timestamptz, PRIMARY KEY ({id})); \
             CREATE INDEX IF NOT EXISTS {t}_todo ON {t} (target_db, id) WHERE sync_status <> 'SYNCED'; \
             CREATE INDEX IF NOT EXISTS {t}_synced ON {t} (synced_at) WHERE sync_status = 'SYNCED'",
            t = self.fallback_table(),
            name = self.name,
            id = self.id_column
        )
    }
}

/// Everything static the router needs.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Sharded tables.
    pub tables: Vec<TableRule>,
    /// Number of shard databases (1..=8).
    pub shard_count: u8,
    /// Zone in which months are cut.
    pub tz: TimeZone,
    /// Id layout for decoding ids in WHERE clauses.
    pub ids: IdLayout,
}

impl Topology {
    /// Builds the topology from a validated config.
    pub fn from_config(c: &shardgate_config::Config) -> Result<Topology, String> {
        let tz = TimeZone::get(&c.sharding.time_zone).map_err(|e| format!("sharding.time_zone: {e}"))?;
        let shard_count = u8::try_from(c.sharding.shard_count).ok().filter(|n| (1..=8).contains(n)).ok_or("sharding.shard_count must be 1..=8")?;
        let tables = c
            .sharded_tables
            .iter()
            .map(|t| TableRule {
                name: t.name.to_lowercase(),
                shard_key: t.shard_key.to_lowercase(),
                month_column: t.month_column.to_lowercase(),
                id_column: t.id_column.to_lowercase(),
                pattern: t.table_pattern.clone(),
                unique_lookups: t.unique_lookups.iter().map(|c| c.to_lowercase()).collect(),
            })
            .collect();
        let ids = IdLayout { epoch_ms: c.ids.epoch_ms, legacy_id_max: c.ids.legacy_id_max, shard_count, route_by_id: c.ids.route_by_id };
        Ok(Topology { tables, shard_count, tz, ids })
    }

    /// The default topology (`t_order` by `merchant_id` and `create_time`, 8 shards, UTC).
    pub fn example() -> Topology {
        Topology::from_config(&shardgate_config::Config::example()).expect("the built-in example config is valid")
    }
}

/// A bind value as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param<'a> {
    /// SQL NULL.
    Null,
    /// Text format.
    Text(&'a str),
    /// Binary format with the parameter's type OID (0 when the client left it unspecified).
    Binary {
        /// Type OID from Parse (0 = unspecified).
        oid: u32,
        /// Raw value.
        bytes: &'a [u8],
    },
    /// A literal of a simple-protocol statement taken out of its text
    /// ([`crate::shape`]): read exactly as the same literal in the text.
    Literal {
        /// A string's content, or an integer's digits.
        value: &'a str,
        /// An integer literal (else a string literal).
        integer: bool,
    },
}

/// Per-call inputs that change over time.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// The current time (used for rows that omit `create_time` and to judge ids).
    pub now: Timestamp,
    /// Month tables that exist, ascending.
    pub months: &'a [MonthKey],
    /// Where generated ids come from; `None` refuses INSERTs that omit the id.
    pub ids: Option<&'a IdGenerator>,
    /// The client session's TimeZone: times written without an offset are read
    /// in it, as PostgreSQL reads them.
    pub zone: SessionZone<'a>,
    /// Unique-lookup values the proxy looked up for this statement (see
    /// [`crate::Analysis::lookup_probes`]); a value not listed narrows nothing.
    pub lookups: &'a [Resolved],
}

/// One unique-lookup value and where the lookup table says its row lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The sharded table.
    pub table: String,
    /// The unique column.
    pub column: String,
    /// The value, as text.
    pub value: String,
    /// The row's shard key and month; `None` when the lookup table has no entry.
    pub at: Option<(i64, MonthKey)>,
}

/// The zone a session reads offset-free times in.
#[derive(Debug, Clone, Copy, Default)]
pub enum SessionZone<'a> {
    /// `sharding.time_zone` (the client did not set another).
    #[default]
    Sharding,
    /// The client's own TimeZone.
    Zone(&'a TimeZone),
    /// A TimeZone shardgate cannot read (a POSIX or offset spelling): an
    /// offset-free time narrows nothing, and an INSERT needs an offset.
    Unknown,
}
