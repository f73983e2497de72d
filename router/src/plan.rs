//! What the router decides: a [`Plan`] (targets, rewritten SQL, merge spec).
//! Plain data; `Display` prints the form used by golden tests and `shardgate route`.

use std::fmt;

use crate::keys::ShardId;
use crate::month::MonthKey;

/// Where a statement goes and how its answers are combined.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// No sharded table involved: send the statement to `db_default` unchanged.
    Passthrough(StatementClass),
    /// A statement on a sharded table.
    Routed(Box<Routed>),
}

/// What a passthrough statement is, so the proxy knows how to treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementClass {
    /// Empty query string or only comments.
    Empty,
    /// BEGIN / COMMIT / ROLLBACK / SAVEPOINT / RELEASE.
    Transaction,
    /// SET / RESET / SHOW / DISCARD: session state.
    Session,
    /// A query that only reads (SELECT, VALUES, EXPLAIN without ANALYZE of a write …).
    Read,
    /// INSERT / UPDATE / DELETE / MERGE on unsharded tables.
    Write,
    /// DDL, COPY, utility commands, several statements in one string, or SQL the
    /// router's parser does not understand (the server will judge it).
    Other,
}

/// The kind of a routed statement; tells the proxy how to combine command tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutedKind {
    /// `SELECT n`.
    Select,
    /// `INSERT 0 n`.
    Insert,
    /// `UPDATE n`.
    Update,
    /// `DELETE n`.
    Delete,
}

/// A statement on a sharded table, planned for concrete bind values.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// Statement kind.
    pub kind: RoutedKind,
    /// Logical table name.
    pub table: String,
    /// Statements to run; never empty (a statement that can match no row still
    /// runs once, on the empty template table, so the client gets the right shape).
    pub targets: Vec<Target>,
    /// How to merge rows when there is more than one target (reads only);
    /// writes with several targets add up their command tags and concatenate RETURNING rows.
    pub merge: Option<MergeSpec>,
    /// Ids the plan generated for rows that omitted them, in row order.
    pub generated_ids: Vec<i64>,
    /// For a multi-row INSERT split over several targets: the target index of
    /// each VALUES row, in row order (RETURNING rows are put back in this
    /// order); empty otherwise.
    pub row_targets: Vec<usize>,
    /// For an INSERT: the statement for one unsharded table that holds every
    /// row (the legacy store during a migration): the client's text with the
    /// ids and times this plan generated. `None`: the client's text as is.
    pub logical: Option<String>,
    /// For an INSERT into a table with unique lookups: the entries to record in
    /// the lookup tables, in the same transaction as the rows.
    pub lookup_rows: Vec<LookupRow>,
}

/// An entry for a unique-lookup table: `value` of `column` lives in the row
/// with this shard key and month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupRow {
    /// The unique column.
    pub column: String,
    /// Its value, as text.
    pub value: String,
    /// The row's shard-key value.
    pub shard_key: i64,
    /// The row's month.
    pub month: MonthKey,
    /// The bind parameter the value came from: its declared type must be
    /// text-like (a text value declared `int4` or `bpchar` is stored changed).
    pub param: Option<usize>,
}

/// One statement on one shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Database `db_N`.
    pub shard: ShardId,
    /// Month tables read or written; empty means the template table (no month exists).
    pub months: Vec<MonthKey>,
    /// Rewritten SQL, runs on PostgreSQL 15. Targets on different shards with
    /// the same month tables share one text.
    pub sql: std::sync::Arc<str>,
    /// Bind values for this statement, as indexes into the client's values;
    /// `None` means all of them in order.
    pub params: Option<Vec<usize>>,
    /// Values the router filled in itself (generated ids, then the proxy's
    /// time for rows without one) for a statement with bind parameters: the SQL
    /// names them as placeholders after the client's (`params`), and they are
    /// bound as text of unknown type, like the literals they stand for. The
    /// target text is then the same from one execution to the next, so a shard
    /// keeps it prepared instead of parsing and planning every INSERT. Empty for
    /// statements without parameters (the values are literals in `sql`).
    pub extra: Vec<String>,
}

/// Reference to a column of the rows a target returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColRef {
    /// A column the client asked for, by position (0-based).
    Visible(usize),
    /// A helper column shardgate appended (0 = the first appended one); dropped after merging.
    Hidden(usize),
}

/// How one output column combines across targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    /// Sum of per-target counts.
    Count,
    /// Sum of per-target sums (NULL when every part is NULL).
    Sum,
    /// Least of per-target minimums.
    Min,
    /// Greatest of per-target maximums.
    Max,
    /// `sum / count` from two hidden columns; the visible column keeps avg's type.
    Avg {
        /// Hidden `sum(x)`.
        sum: ColRef,
        /// Hidden `count(x)`.
        count: ColRef,
    },
    /// `count/sum/avg(DISTINCT x)`: targets group by `x` too and send it in a
    /// hidden column; the merger keeps each group's distinct values.
    Distinct {
        /// Hidden `x`.
        of: ColRef,
        /// Which aggregate of the distinct values.
        kind: DistinctKind,
    },
}

/// The aggregate of a group's distinct values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistinctKind {
    /// `count(DISTINCT x)`.
    Count,
    /// `sum(DISTINCT x)`.
    Sum,
    /// `avg(DISTINCT x)`.
    Avg,
}

/// Comparison operators usable in a merged HAVING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `<>`
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
}

/// A HAVING predicate evaluated by the merger on merged groups.
#[derive(Debug, Clone, PartialEq)]
pub enum Having {
    /// Both hold.
    And(Box<Having>, Box<Having>),
    /// Either holds.
    Or(Box<Having>, Box<Having>),
    /// Does not hold.
    Not(Box<Having>),
    /// Compare two operands (SQL three-valued: a NULL side is unknown → group dropped).
    Cmp(Operand, CmpOp, Operand),
    /// `operand IS [NOT] NULL`.
    IsNull(Operand, bool),
}

/// A HAVING operand.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A merged column.
    Col(ColRef),
    /// A string literal (its type comes from what it is compared with).
    Literal(String),
    /// A number literal in PostgreSQL text form (integer or numeric by its own spelling).
    Number(String),
    /// NULL.
    Null,
}

/// Sort key for the k-way merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    /// Column compared.
    pub col: ColRef,
    /// DESC.
    pub descending: bool,
    /// NULLS FIRST (PostgreSQL's default is NULLS LAST for ASC, FIRST for DESC).
    pub nulls_first: bool,
}

/// Grouping done by the merger.
#[derive(Debug, Clone, PartialEq)]
pub struct Grouping {
    /// Group key columns (empty: one group, as for `SELECT count(*)`).
    pub keys: Vec<ColRef>,
    /// Aggregated columns and how each combines.
    pub aggregates: Vec<(ColRef, Agg)>,
    /// Evaluated on merged groups.
    pub having: Option<Having>,
}

/// How to combine the rows of several targets into what one table would return.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSpec {
    /// Number of trailing helper columns to drop before rows reach the client.
    pub hidden: usize,
    /// Re-group and combine aggregates.
    pub grouping: Option<Grouping>,
    /// Remove duplicate rows (on visible columns).
    pub distinct: bool,
    /// Order of the merged rows (applied after grouping).
    pub order_by: Vec<SortKey>,
    /// Rows skipped after ordering.
    pub offset: u64,
    /// Rows returned after the offset; `None` = all.
    pub limit: Option<u64>,
}

impl fmt::Display for StatementClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            StatementClass::Empty => "empty",
            StatementClass::Transaction => "transaction",
            StatementClass::Session => "session",
            StatementClass::Read => "read",
            StatementClass::Write => "write",
            StatementClass::Other => "other",
        };
        f.write_str(s)
    }
}

impl fmt::Display for ColRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColRef::Visible(i) => write!(f, "#{i}"),
            ColRef::Hidden(i) => write!(f, "h{i}"),
        }
    }
}

impl fmt::Display for Agg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Agg::Count => f.write_str("count"),
            Agg::Sum => f.write_str("sum"),
            Agg::Min => f.write_str("min"),
            Agg::Max => f.write_str("max"),
            Agg::Avg { sum, count } => write!(f, "avg({sum}/{count})"),
            Agg::Distinct { of, kind } => write!(f, "{}(distinct {of})", match kind {
                DistinctKind::Count => "count",
                DistinctKind::Sum => "sum",
                DistinctKind::Avg => "avg",
            }),
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CmpOp::Eq => "=",
            CmpOp::NotEq => "<>",
            CmpOp::Lt => "<",
            CmpOp::LtEq => "<=",
            CmpOp::Gt => ">",
            CmpOp::GtEq => ">=",
        })
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Col(c) => write!(f, "{c}"),
            Operand::Literal(l) => write!(f, "'{l}'"),
            Operand::Number(n) => write!(f, "{n}"),
            Operand::Null => f.write_str("NULL"),
        }
    }
}

impl fmt::Display for Having {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Having::And(a, b) => write!(f, "({a} AND {b})"),
            Having::Or(a, b) => write!(f, "({a} OR {b})"),
            Having::Not(a) => write!(f, "NOT {a}"),
            Having::Cmp(a, op, b) => write!(f, "{a} {op} {b}"),
            Having::IsNull(a, neg) => write!(f, "{a} IS {}NULL", if *neg { "NOT " } else { "" }),
        }
    }
}

impl fmt::Display for MergeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "merge:")?;
        if let Some(g) = &self.grouping {
            let keys: Vec<String> = g.keys.iter().map(|k| k.to_string()).collect();
            let aggs: Vec<String> = g.aggregates.iter().map(|(c, a)| format!("{c}={a}")).collect();
            write!(f, " group=[{}] aggs=[{}]", keys.join(","), aggs.join(","))?;
            if let Some(h) = &g.having {
                write!(f, " having={h}")?;
            }
        }
        if self.distinct {
            write!(f, " distinct")?;
        }
        if !self.order_by.is_empty() {
            let keys: Vec<String> = self
                .order_by
                .iter()
                .map(|k| format!("{}{}{}", k.col, if k.descending { " desc" } else { "" }, if k.nulls_first { " nulls_first" } else { "" }))
                .collect();
            write!(f, " order=[{}]", keys.join(","))?;
        }
        if self.offset > 0 {
            write!(f, " offset={}", self.offset)?;
        }
        if let Some(l) = self.limit {
            write!(f, " limit={l}")?;
        }
        if self.hidden > 0 {
            write!(f, " hidden={}", self.hidden)?;
        }
        if self.grouping.is_none() && !self.distinct && self.order_by.is_empty() && self.offset == 0 && self.limit.is_none() {
            write!(f, " concat")?;
        }
        Ok(())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Plan::Passthrough(class) => writeln!(f, "passthrough {class} -> db_default"),
            Plan::Routed(r) => {
                let kind = match r.kind {
                    RoutedKind::Select => "select",
                    RoutedKind::Insert => "insert",
                    RoutedKind::Update => "update",
                    RoutedKind::Delete => "delete",
                };
                writeln!(f, "{kind} {} targets={}", r.table, r.targets.len())?;
                for t in &r.targets {
                    let months: Vec<String> = t.months.iter().map(|m| m.to_string()).collect();
                    let months = if months.is_empty() { "template".to_string() } else { months.join(",") };
                    write!(f, "  {} [{months}]", t.shard)?;
                    if let Some(p) = &t.params {
                        let p: Vec<String> = p.iter().map(|i| format!("${}", i + 1)).collect();
                        write!(f, " params=[{}]", p.join(","))?;
                    }
                    if !t.extra.is_empty() {
                        write!(f, " extra=[{}]", t.extra.join(","))?;
                    }
                    writeln!(f, ": {}", t.sql)?;
                }
                if let Some(m) = &r.merge {
                    writeln!(f, "  {m}")?;
                }
                for l in &r.lookup_rows {
                    writeln!(f, "  lookup {}={:?} -> {}@{}", l.column, l.value, l.shard_key, l.month)?;
                }
                if !r.generated_ids.is_empty() {
                    let ids: Vec<String> = r.generated_ids.iter().map(|i| i.to_string()).collect();
                    writeln!(f, "  generated ids: {}", ids.join(","))?;
                }
                Ok(())
            }
        }
    }
}
