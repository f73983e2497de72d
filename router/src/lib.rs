//! SQL → [`Plan`] for shardgate. Pure: no sockets, no tokio, no clock reads
//! (time, existing months and the id source are passed in via [`Context`]).
//!
//! # Layout
//! - [`keys`]: `merchant_id % shard_count` in one place.
//! - [`month`]: `create_time` → `yyyyMM` in the configured zone.
//! - [`id`]: snowflake ids that name their shard and month.
//! - `extract`: shard key / month / id out of WHERE and VALUES.
//! - `rewrite`: sharded table → hole on the AST, printed once into a template.
//! - `merge`: scatter form of a SELECT and its [`MergeSpec`].
//! - `analyze`: statement text → cached [`Analysis`] → [`Plan`] per execution.
//! - [`session_effect`]: does a statement leave state in the server session.
//! - [`transaction_control`]: does a statement text end or open a transaction.

mod analyze;
pub mod cache;
mod error;
mod extract;
pub mod id;
pub mod keys;
mod lexer;
mod merge;
pub mod month;
mod plan;
pub mod quote;
pub mod shape;
mod rewrite;
mod session;
mod setting;
mod topology;
mod txcontrol;

use std::sync::Arc;

pub use analyze::{analyze, Analysis};
pub use extract::Probe;
pub use error::{Result, RouteError};
pub use plan::{Agg, CmpOp, ColRef, DistinctKind, Grouping, Having, LookupRow, MergeSpec, Operand, Plan, Routed, RoutedKind, SortKey, StatementClass, Target};
pub use lexer::{contains_ignore_case, first_word, is_one_statement};
pub use setting::{setting_change, SettingChange};
pub use session::{deallocated_name, drops_all_statements, may_pin, names_proxy_statement, session_effect, SessionEffect, PROXY_STATEMENT_PREFIXES};
pub use topology::{Context, Param, Resolved, SessionZone, TableRule, Topology};
pub use txcontrol::{and_chain, begin_statement, block_steps, prepares_transaction, savepoint_op, transaction_control, BlockSteps, SavepointOp, TxControl};

/// The stack a thread that plans statements should have. Statements are
/// analysed up to a fixed nesting bound (longer operator chains are refused with
/// 54001 before sqlparser sees them); at that bound a debug build needs about
/// 4 MiB, more than the 2 MiB tokio gives its workers by default. Threads only
/// reserve this address space: pages are touched as the stack grows.
pub const PLANNING_STACK: usize = 8 << 20;

/// The words that name the proxy's control tables: two-phase-commit
/// decisions, worker-id leases, migration state and outbox, and, per sharded
/// table, `<table>_fallback` and its per-shard views `<table>_fb_…` / `<table>_fbw_…`.
fn control_table_words(topo: &Topology) -> Vec<String> {
    let mut words: Vec<String> = ["shardgate_2pc", "shardgate_worker_leases", "shardgate_migration", "shardgate_lookup"].iter().map(|w| w.to_string()).collect();
    for t in &topo.tables {
        words.push(format!("{}_fallback", t.name));
        words.push(format!("{}_fb_", t.name));
        words.push(format!("{}_fbw_", t.name));
    }
    words
}

/// `sql` with every Unicode escape decoded (`\XXXX`, `\+XXXXXX`, `\\`)
/// wherever it stands, for a byte scan of the names a `U&"…"` or `U&'…'`
/// spells. No quote state: a `u&"` inside a comment or a string must not
/// make the real one look closed. An escape cannot span a body's opening
/// quote (not a hex digit), so a real body decodes as PostgreSQL reads it;
/// elsewhere decoding only adds text to scan, after the text itself, so it
/// can only refuse more. An escape that is not valid is kept as written.
fn unicode_escapes_decoded(sql: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(sql.len());
    let mut i = 0;
    let hex = |from: usize, n: usize| -> Option<char> {
        let h = sql.get(from..from + n)?;
        if !h.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok().and_then(char::from_u32)
    };
    while i < sql.len() {
        if sql[i] == b'\\' {
            let decoded = match sql.get(i + 1) {
                Some(b'\\') => Some(('\\', 2)),
                Some(b'+') => hex(i + 2, 6).map(|c| (c, 8)),
                _ => hex(i + 1, 4).map(|c| (c, 5)),
            };
            if let Some((c, n)) = decoded {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += n;
                continue;
            }
        }
        out.push(sql[i]);
        i += 1;
    }
    out
}

/// Plans one statement without caching: parse, analyse, apply bind values.
pub fn plan(sql: &str, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
    analyze(sql, topo).plan(params, topo, ctx)
}

/// A router with a plan cache keyed by statement text: a prepared statement
/// is analysed once, later executions only apply their bind values.
pub struct Router {
    topo: Topology,
    cache: moka::sync::Cache<Arc<str>, Arc<Analysis>>,
    /// Names of the proxy's own tables in `db_default` (see [`Router::names_control_table`]).
    control: aho_corasick::AhoCorasick,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("topology", &self.topo).field("cached", &self.cache.entry_count()).finish()
    }
}

/// Bytes the router's cache of analysed statements may take, by default.
pub const CACHE_BYTES: u64 = 64 << 20;
/// Statement texts longer than this are analysed each time, never cached.
pub const MAX_CACHED_TEXT: usize = 64 << 10;

/// What an analysed statement of `text_len` bytes takes: its text and an
/// analysis (the syntax tree and the printed templates) estimated at 32
/// bytes per byte of text, since clients choose the texts, and the rendered
/// texts it keeps (at most 2 KiB). The router's
/// cache and the proxy's per-client statement bound both count with it.
pub fn analysis_weight(text_len: usize) -> usize {
    text_len.saturating_mul(33).saturating_add(512 + rewrite::Renders::KEEP_BYTES)
}

fn cache_weight(text: &str) -> u32 {
    u32::try_from(analysis_weight(text.len())).unwrap_or(u32::MAX)
}

impl Router {
    /// A router whose cache of analysed statement texts holds about `max_bytes`.
    pub fn new(topo: Topology, max_bytes: u64) -> Router {
        // (a DFA: scanned on every simple Query, the default automaton cost about
        // 20 instructions a byte)
        let control = aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            // (its prefilter stopped at every `t_order` of an order statement)
            .prefilter(false)
            .build(control_table_words(&topo))
            .expect("ASCII table names build");
        let cache = moka::sync::Cache::builder().max_capacity(max_bytes).weigher(|k: &Arc<str>, _: &Arc<Analysis>| cache_weight(k)).build();
        Router { topo, cache, control }
    }

    /// True when a client text mentions one of the proxy's own tables in
    /// `db_default` (the fallback table and its views, two-phase-commit
    /// decisions, migration state and outbox), anywhere: quoted or not, in a
    /// string or a comment. Such statements are refused for application users;
    /// a byte scan, cheap enough for every statement.
    pub fn names_control_table(&self, sql: &[u8]) -> bool {
        if self.control.is_match(sql) {
            return true;
        }
        // a name spelled with Unicode escapes (U&"\0073hardgate_…", U&'…' strings):
        // decoded and scanned too; with a UESCAPE clause (another escape character)
        // such a text is refused whole
        if !memchr::memchr_iter(b'&', sql).any(|i| i > 0 && sql[i - 1].eq_ignore_ascii_case(&b'u')) {
            return false;
        }
        if sql.windows(7).any(|w| w.eq_ignore_ascii_case(b"uescape")) {
            return true;
        }
        self.control.is_match(&unicode_escapes_decoded(sql))
    }

    /// Learns the aggregate functions the database has (`pg_proc.prokind = 'a'`),
    /// so a user-defined aggregate is refused across shards instead of being
    /// answered once per shard; forgets every cached analysis.
    pub fn learn_aggregates(&self, names: Vec<String>) {
        merge::learn_aggregates(names.into_iter().map(|n| n.to_lowercase()).collect());
        self.cache.invalidate_all();
    }

    /// Learns the columns of the sharded tables' template, so a GROUP BY
    /// name that is a column is read as the column (as PostgreSQL reads it),
    /// not as an output alias of that name; forgets every cached analysis.
    pub fn learn_columns(&self, names: Vec<String>) {
        // attnames as stored: unquoted names are lower case there already
        merge::learn_columns(names);
        self.cache.invalidate_all();
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The cached analysis of `sql`.
    pub fn analysis(&self, sql: &str) -> Arc<Analysis> {
        if sql.len() > MAX_CACHED_TEXT {
            return Arc::new(analyze(sql, &self.topo));
        }
        if let Some(a) = self.cache.get(sql) {
            return a;
        }
        let a = Arc::new(analyze(sql, &self.topo));
        self.cache.insert(Arc::from(sql), a.clone());
        a
    }

    /// The analysis of `sql`: from the cache if there, else computed and not
    /// stored (for statement texts with literals, which rarely repeat).
    pub fn analysis_uncached(&self, sql: &str) -> Arc<Analysis> {
        self.cache.get(sql).unwrap_or_else(|| Arc::new(analyze(sql, &self.topo)))
    }

    /// The cached analysis of a simple-protocol statement's shape (its literals
    /// in value positions taken out, [`shape`]) and the literals, which are the
    /// values of its plan. `None` when the text has no shape or the shape is
    /// refused (a placeholder may be refused where the literal is not): the
    /// text's own analysis answers then.
    pub fn shaped_analysis(&self, sql: &str) -> Option<(Arc<Analysis>, shape::Shaped)> {
        if sql.len() > MAX_CACHED_TEXT {
            return None;
        }
        let s = shape::shape(sql)?;
        if s.literals.is_empty() {
            // nothing taken: the text is its own shape, and caching every such text
            // (with values the shape keeps, such as `-5` or `1.5`) would churn the cache
            return None;
        }
        let a = self.analysis(&s.shape);
        if matches!(*a, Analysis::Refused(_)) {
            return None;
        }
        Some((a, s))
    }

    /// Plans `sql` with bind values, using the cache.
    pub fn plan(&self, sql: &str, params: &[Param<'_>], ctx: &Context<'_>) -> Result<Plan> {
        self.analysis(sql).plan(params, &self.topo, ctx)
    }
}

#[cfg(test)]
mod control_name_tests {
    use super::unicode_escapes_decoded;

    #[test]
    fn unicode_escapes_are_decoded_for_the_name_scan() {
        let d = |s: &str| String::from_utf8(unicode_escapes_decoded(s.as_bytes())).expect("utf8");
        assert!(d(r#"DELETE FROM U&"\0073hardgate_lookup_x""#).contains("shardgate_lookup_x"));
        assert!(d(r#"select * from u&"\+000073hardgate_2pc""#).contains("shardgate_2pc"));
        assert!(d(r#"SELECT U&'a\\b''\0063'"#).contains(r"a\b''c"));
        // a u&" in a comment does not hide the real one
        assert!(d(r#"/* u&" */ DELETE FROM U&"\0073hardgate_lookup_x""#).contains("shardgate_lookup_x"));
        // not an escape: kept as written; a text without U& is unchanged
        assert!(d(r#"U&"\zz""#).contains(r"\zz"));
        assert_eq!(d("SELECT 'a&b' || x"), "SELECT 'a&b' || x");
        // cut short: no panic
        for s in [r#"U&""#, r#"U&"\"#, r#"U&"\+00"#, "u&'", r#"U&"\00e9"#] {
            let _ = d(s);
        }
    }
}
