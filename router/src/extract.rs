//! Shard key, month and id out of WHERE clauses and VALUES rows, with bind
//! values applied. Analysis (`Cond`) is cached per statement text; evaluation
//! (`Cond::eval`) runs per execution. Unknown predicates widen, never narrow.

mod values;

pub(crate) use values::*;
use jiff::Timestamp;
use sqlparser::ast::{BinaryOperator, CastKind, DataType, Expr, Ident, UnaryOperator, Value};

use crate::error::{Result, RouteError};
use crate::keys::{shard_of, MerchantId, ShardId};
use crate::month::{months_in_range, time_from_binary_micros, Bound, MonthKey, TimeValue};
use crate::topology::{Context, Param, TableRule, Topology};

/// A value in the statement: a literal or a bind parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Src {
    /// Integer literal that fits bigint.
    Int(i64),
    /// Any other numeric literal (decimal, or beyond bigint), as written.
    Number(String),
    /// String literal (also typed literals like `TIMESTAMPTZ '…'`).
    Text(String),
    /// NULL.
    Null,
    /// `$n` (0-based index).
    Param(usize),
    /// A value whose meaning shardgate does not read: routes nowhere in particular.
    Opaque,
    /// A string cast to `timestamp without time zone` (`false`) or `date`
    /// (`true`): PostgreSQL drops any offset (and for a date the time of day)
    /// and reads the rest in the session zone.
    Civil(String, bool),
}

/// Which routing column an expression names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Col {
    Shard,
    Month,
    Id,
    /// A unique-lookup column (index into the rule's `unique_lookups`).
    Lookup(usize),
}

/// Comparison in a month predicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

/// What a WHERE clause says about routing columns.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cond {
    /// Nothing known: every shard and month.
    All,
    And(Vec<Cond>),
    Or(Vec<Cond>),
    /// `shard_key = v` / `IN (…)` / `= ANY(ARRAY[…])`.
    Shard(Vec<Src>),
    /// `shard_key = ANY($n)` or `= ANY('{…}')`: an array value.
    ShardArray(Src),
    /// `id = v` / `IN (…)`.
    Id(Vec<Src>),
    /// `id = ANY($n)`.
    IdArray(Src),
    /// `month_col <op> v`.
    Time(Cmp, Src),
    /// `month_col IN (…)`.
    TimeIn(Vec<Src>),
    /// `month_col BETWEEN a AND b`.
    TimeBetween(Src, Src),
    /// `unique_col = v` / `IN (…)`: where the lookup table says the rows are.
    Lookup { table: String, column: String, vals: Vec<Src> },
}

/// Names by which a statement refers to the sharded table (`t_order`, its alias).
#[derive(Debug, Clone)]
pub(crate) struct Scope<'r> {
    pub rule: &'r TableRule,
    /// Lower-cased qualifiers that mean the sharded table.
    pub qualifiers: Vec<String>,
    /// Only qualified column references count (a self-join: bare names are ambiguous).
    pub qualified_only: bool,
}

fn ident_name(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

impl Scope<'_> {
    /// Which routing column `e` is, if it is a bare or qualified column reference.
    pub fn column(&self, e: &Expr) -> Option<Col> {
        let name = match e {
            Expr::Identifier(_) if self.qualified_only => return None,
            Expr::Identifier(i) => ident_name(i),
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                if !self.qualifiers.contains(&ident_name(&parts[0])) {
                    return None;
                }
                ident_name(&parts[1])
            }
            Expr::Nested(inner) => return self.column(inner),
            _ => return None,
        };
        if name == self.rule.shard_key {
            Some(Col::Shard)
        } else if name == self.rule.month_column {
            Some(Col::Month)
        } else if name == self.rule.id_column {
            Some(Col::Id)
        } else {
            self.rule.unique_lookups.iter().position(|c| *c == name).map(Col::Lookup)
        }
    }

    /// Analyses a WHERE clause.
    pub fn cond(&self, e: &Expr) -> Cond {
        match e {
            Expr::Nested(inner) => self.cond(inner),
            Expr::BinaryOp { left, op: BinaryOperator::And, right } => Cond::And(vec![self.cond(left), self.cond(right)]),
            Expr::BinaryOp { left, op: BinaryOperator::Or, right } => Cond::Or(vec![self.cond(left), self.cond(right)]),
            Expr::BinaryOp { left, op, right } => {
                let Some(cmp) = cmp_of(op) else { return Cond::All };
                if cmp == Cmp::Eq {
                    for (c, v) in [(left, right), (right, left)] {
                        if let (Some(Col::Lookup(i)), Some(v)) = (self.column(c), lookup_src(v)) {
                            return self.lookup(i, vec![v]);
                        }
                    }
                }
                if let (Some(col), Some(v)) = (self.column(left), src_of(right)) {
                    leaf(col, cmp, v)
                } else if let (Some(col), Some(v)) = (self.column(right), src_of(left)) {
                    leaf(col, flip(cmp), v)
                } else {
                    Cond::All
                }
            }
            Expr::InList { expr, list, negated: false } => {
                let Some(col) = self.column(expr) else { return Cond::All };
                if let Col::Lookup(i) = col {
                    let Some(vals) = list.iter().map(lookup_src).collect::<Option<Vec<_>>>() else { return Cond::All };
                    return self.lookup(i, vals);
                }
                let Some(vals) = list.iter().map(src_of).collect::<Option<Vec<_>>>() else { return Cond::All };
                match col {
                    Col::Shard => Cond::Shard(vals),
                    Col::Id => Cond::Id(vals),
                    Col::Month => Cond::TimeIn(vals),
                    Col::Lookup(_) => Cond::All,
                }
            }
            Expr::Between { expr, negated: false, low, high } => match (self.column(expr), src_of(low), src_of(high)) {
                (Some(Col::Month), Some(lo), Some(hi)) => Cond::TimeBetween(lo, hi),
                _ => Cond::All,
            },
            Expr::AnyOp { left, compare_op: BinaryOperator::Eq, right, .. } => {
                let col = match self.column(left) {
                    Some(c @ (Col::Shard | Col::Id)) => c,
                    _ => return Cond::All,
                };
                let inner = strip_casts(right);
                if let Expr::Array(arr) = inner {
                    let Some(vals) = arr.elem.iter().map(src_of).collect::<Option<Vec<_>>>() else { return Cond::All };
                    return if col == Col::Shard { Cond::Shard(vals) } else { Cond::Id(vals) };
                }
                match src_of(right) {
                    Some(v @ (Src::Param(_) | Src::Text(_))) => {
                        if col == Col::Shard {
                            Cond::ShardArray(v)
                        } else {
                            Cond::IdArray(v)
                        }
                    }
                    _ => Cond::All,
                }
            }
            _ => Cond::All,
        }
    }
}

impl Scope<'_> {
    fn lookup(&self, i: usize, vals: Vec<Src>) -> Cond {
        Cond::Lookup { table: self.rule.name.clone(), column: self.rule.unique_lookups[i].clone(), vals }
    }
}

/// A unique-lookup value written so that its text is the value stored: a
/// string literal, an integer, a parameter, or those cast to `text` or
/// `varchar` without a length. Other casts may change the value (`'007'::int`
/// stores `7`), so they are not read.
pub(crate) fn lookup_src(e: &Expr) -> Option<Src> {
    match e {
        Expr::Nested(inner) => lookup_src(inner),
        Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, data_type: DataType::Text | DataType::Varchar(None) | DataType::CharacterVarying(None), format: None } => {
            lookup_src(expr)
        }
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) | Value::NationalStringLiteral(s) | Value::UnicodeStringLiteral(s) => Some(Src::Text(s.clone())),
            Value::DollarQuotedString(d) => Some(Src::Text(d.value.clone())),
            Value::Number(n, _) => n.parse::<i64>().ok().map(Src::Int),
            Value::Null => Some(Src::Null),
            Value::Placeholder(p) => placeholder_index(p).map(Src::Param),
            _ => None,
        },
        _ => None,
    }
}

/// A unique-lookup value once bind values are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LookupText {
    Null,
    Text(String),
    /// A parameter type whose text form may differ from the stored value.
    Unknown,
}

pub(crate) fn lookup_text(src: &Src, params: &[Param<'_>]) -> Result<LookupText> {
    Ok(match src {
        Src::Text(s) => LookupText::Text(s.clone()),
        Src::Int(i) => LookupText::Text(i.to_string()),
        Src::Null => LookupText::Null,
        Src::Param(i) => match param(params, *i)? {
            Param::Null => LookupText::Null,
            Param::Text(s) => LookupText::Text(s.to_string()),
            // text, varchar, name, or left to the server, which infers the column's own type
            // (unique-lookup columns are text or varchar; the proxy checks at start)
            Param::Binary { oid: 25 | 1043 | 19 | 0, bytes } => match std::str::from_utf8(bytes) {
                Ok(s) => LookupText::Text(s.to_string()),
                Err(_) => LookupText::Unknown,
            },
            Param::Binary { oid: oid @ (20 | 23 | 21), bytes } => match int_from_binary(oid, bytes) {
                IntValue::Int(v) => LookupText::Text(v.to_string()),
                _ => LookupText::Unknown,
            },
            Param::Binary { .. } => LookupText::Unknown,
            Param::Literal { value, integer } => return lookup_text(&literal_src(value, integer), params),
        },
        _ => LookupText::Unknown,
    })
}

/// A unique-lookup value a statement could be narrowed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Sharded table.
    pub table: String,
    /// Unique column.
    pub column: String,
    /// The value as text.
    pub value: String,
    /// The bind parameter it came from (its declared type must be text-like).
    pub param: Option<usize>,
}

impl Cond {
    /// The unique-lookup values this condition could narrow by.
    pub fn lookup_probes(&self, params: &[Param<'_>], out: &mut Vec<Probe>) {
        match self {
            Cond::And(parts) | Cond::Or(parts) => parts.iter().for_each(|p| p.lookup_probes(params, out)),
            Cond::Lookup { table, column, vals } => {
                for v in vals {
                    if let Ok(LookupText::Text(value)) = lookup_text(v, params) {
                        let param = if let Src::Param(i) = v { Some(*i) } else { None };
                        out.push(Probe { table: table.clone(), column: column.clone(), value, param });
                    }
                }
            }
            _ => {}
        }
    }
}

fn leaf(col: Col, cmp: Cmp, v: Src) -> Cond {
    match (col, cmp) {
        (Col::Shard, Cmp::Eq) => Cond::Shard(vec![v]),
        (Col::Id, Cmp::Eq) => Cond::Id(vec![v]),
        (Col::Month, c) => Cond::Time(c, v),
        _ => Cond::All,
    }
}

fn cmp_of(op: &BinaryOperator) -> Option<Cmp> {
    Some(match op {
        BinaryOperator::Eq => Cmp::Eq,
        BinaryOperator::Lt => Cmp::Lt,
        BinaryOperator::LtEq => Cmp::LtEq,
        BinaryOperator::Gt => Cmp::Gt,
        BinaryOperator::GtEq => Cmp::GtEq,
        _ => return None,
    })
}

fn flip(c: Cmp) -> Cmp {
    match c {
        Cmp::Eq => Cmp::Eq,
        Cmp::Lt => Cmp::Gt,
        Cmp::LtEq => Cmp::GtEq,
        Cmp::Gt => Cmp::Lt,
        Cmp::GtEq => Cmp::LtEq,
    }
}

/// Types whose casts keep a routing value meaningful.
fn transparent_type(t: &DataType) -> bool {
    use DataType as D;
    match t {
        D::BigInt(_) | D::Int8(_) | D::Integer(_) | D::Int(_) | D::Int4(_) | D::SmallInt(_) | D::Int2(_) | D::Numeric(_)
        | D::Decimal(_) | D::Text | D::Varchar(_) | D::CharacterVarying(_) | D::Date => return true,
        D::Timestamp(..) => return true,
        _ => {}
    }
    let s = t.to_string().to_ascii_lowercase();
    matches!(
        s.as_str(),
        "bigint" | "int8" | "integer" | "int" | "int4" | "smallint" | "int2" | "numeric" | "decimal" | "text" | "varchar"
            | "character varying" | "date" | "timestamp" | "timestamptz" | "timestamp with time zone"
            | "timestamp without time zone" | "bigint[]" | "int8[]" | "integer[]" | "int[]" | "int4[]"
    )
}

fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip_casts(inner),
        Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, data_type, format: None } if transparent_type(data_type) => strip_casts(expr),
        _ => e,
    }
}

/// 0-based index of a `$n` placeholder (`$1` → 0); `None` for anything else.
pub(crate) fn placeholder_index(p: &str) -> Option<usize> {
    p.strip_prefix('$')?.parse::<usize>().ok()?.checked_sub(1)
}

/// A cast to a type that drops an offset or a time of day (`timestamp`, `date`):
/// PostgreSQL reads `'2026-11-30 23:00-10'::timestamp` as 23:00 in the session
/// zone, not as the instant the offset names.
fn drops_offset(t: &DataType) -> bool {
    use sqlparser::ast::TimezoneInfo as Tz;
    matches!(t, DataType::Date | DataType::Timestamp(_, Tz::None | Tz::WithoutTimeZone))
        || matches!(t.to_string().to_ascii_lowercase().as_str(), "date" | "timestamp" | "timestamp without time zone")
}

/// A literal or parameter, seen through casts to routing-compatible types.
pub(crate) fn src_of(e: &Expr) -> Option<Src> {
    let mut cur = e;
    loop {
        match cur {
            Expr::Nested(inner) => cur = inner,
            Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, data_type, format: None } if transparent_type(data_type) => {
                if matches!(data_type, DataType::Numeric(_) | DataType::Decimal(_)) || matches!(data_type.to_string().to_ascii_lowercase().as_str(), "numeric" | "decimal") {
                    // '9.0'::numeric compares as a number: 9 when whole, else no bigint equals it
                    return src_of(expr).map(|s| match s {
                        Src::Text(t) => t.trim().parse::<i64>().map_or(Src::Number(t), Src::Int),
                        other => other,
                    });
                }
                if drops_offset(data_type) {
                    let date = matches!(data_type, DataType::Date) || data_type.to_string().eq_ignore_ascii_case("date");
                    return src_of(expr).map(|s| match s {
                        Src::Null | Src::Param(_) => s,
                        Src::Text(t) => Src::Civil(t, date),
                        _ => Src::Opaque,
                    });
                }
                cur = expr;
            }
            Expr::TypedString(ts) if drops_offset(&ts.data_type) => {
                let date = matches!(ts.data_type, DataType::Date);
                return Some(match &ts.value.value {
                    Value::SingleQuotedString(s) => Src::Civil(s.clone(), date),
                    _ => Src::Opaque,
                });
            }
            _ => break,
        }
    }
    match strip_casts(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.parse::<i64>().map_or_else(|_| Src::Number(n.clone()), Src::Int)),
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) | Value::NationalStringLiteral(s) | Value::UnicodeStringLiteral(s) => Some(Src::Text(s.clone())),
            Value::DollarQuotedString(d) => Some(Src::Text(d.value.clone())),
            Value::Null => Some(Src::Null),
            Value::Placeholder(p) => placeholder_index(p).map(Src::Param),
            _ => None,
        },
        Expr::TypedString(ts) if transparent_type(&ts.data_type) => match &ts.value.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => Some(Src::Text(s.clone())),
            Value::DollarQuotedString(d) => Some(Src::Text(d.value.clone())),
            _ => None,
        },
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match src_of(expr)? {
            Src::Int(i) => Some(i.checked_neg().map_or_else(|| Src::Number(format!("-{i}")), Src::Int)),
            Src::Number(n) => Some(Src::Number(format!("-{n}"))),
            _ => None,
        },
        // `+5`: a number stays itself (PostgreSQL has no unary + for a string literal)
        Expr::UnaryOp { op: UnaryOperator::Plus, expr } => match src_of(expr)? {
            s @ (Src::Int(_) | Src::Number(_)) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// A time in a WHERE clause: a text shardgate cannot read (zone names, `24:00`,
/// other date styles) narrows nothing — the shards read it and judge it, so the
/// answer (or PostgreSQL's own error) is the one table's.
fn where_time(src: &Src, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Option<TimeValue>> {
    match time_value(src, params, topo, ctx) {
        Err(RouteError::InvalidDatetime(_) | RouteError::Unsupported(_)) => Ok(Some(TimeValue::Unknown)),
        other => other,
    }
}

/// Resolves a timestamp-valued source.
pub(crate) fn time_value(src: &Src, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Option<TimeValue>> {
    // offset-free times are read in the session's zone, as PostgreSQL reads them
    let zone: Option<&jiff::tz::TimeZone> = match ctx.zone {
        crate::topology::SessionZone::Sharding => Some(&topo.tz),
        crate::topology::SessionZone::Zone(z) => Some(z),
        crate::topology::SessionZone::Unknown => None,
    };
    let read = |s: &str| crate::month::parse_time_in(s, zone);
    Ok(Some(match src {
        Src::Null => return Ok(None),
        Src::Text(s) => read(s)?,
        Src::Int(_) | Src::Number(_) | Src::Opaque => TimeValue::Unknown,
        Src::Civil(s, date) => read(crate::month::civil_prefix(s, *date))?,
        Src::Param(i) => match param(params, *i)? {
            Param::Null => return Ok(None),
            Param::Text(s) => read(s)?,
            Param::Literal { value, integer } => return time_value(&literal_src(value, integer), params, topo, ctx),
            Param::Binary { oid, bytes } => match (oid, bytes.len()) {
                (1184 | 0, 8) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(bytes);
                    time_from_binary_micros(i64::from_be_bytes(a))
                }
                // timestamp without time zone: a civil time in the session's zone
                (1114, 8) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(bytes);
                    match (time_from_binary_micros(i64::from_be_bytes(a)), zone) {
                        (TimeValue::At(ts), Some(z)) => ts
                            .to_zoned(jiff::tz::TimeZone::UTC)
                            .datetime()
                            .to_zoned(z.clone())
                            .map_or(TimeValue::Unknown, |zd| TimeValue::At(zd.timestamp())),
                        (TimeValue::At(_), None) => TimeValue::Unknown,
                        (other, _) => other,
                    }
                }
                (1082, 4) => {
                    let days = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    match days {
                        i32::MAX => TimeValue::Infinity,
                        i32::MIN => TimeValue::NegInfinity,
                        _ => jiff::civil::date(2000, 1, 1)
                            .checked_add(jiff::Span::new().days(i64::from(days)))
                            .ok()
                            .and_then(|d| zone.and_then(|z| d.to_zoned(z.clone()).ok()))
                            .map_or(TimeValue::Unknown, |z| TimeValue::At(z.timestamp())),
                    }
                }
                _ => TimeValue::Unknown,
            },
        },
    }))
}

/// Bitmask of every shard.
fn all_shards(shard_count: u8) -> u8 {
    if shard_count >= 8 {
        0xFF
    } else {
        (1u8 << shard_count) - 1
    }
}

/// Shards that may hold rows with these shard-key values (NULL matches none,
/// an unroutable value any).
fn shard_mask(ints: &[IntValue], shard_count: u8) -> u8 {
    ints.iter().fold(0u8, |mask, v| {
        mask | match v {
            IntValue::Int(i) => 1 << shard_of(MerchantId(*i), shard_count).0,
            IntValue::Null => 0,
            IntValue::Unroutable => all_shards(shard_count),
        }
    })
}

/// Shards × existing months a statement may touch: one shard bitmask per month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetSet {
    pub masks: Vec<u8>,
}

impl TargetSet {
    fn full(n_months: usize, shard_count: u8) -> TargetSet {
        TargetSet { masks: vec![all_shards(shard_count); n_months] }
    }

    fn empty(n_months: usize) -> TargetSet {
        TargetSet { masks: vec![0; n_months] }
    }

    fn and(mut self, o: &TargetSet) -> TargetSet {
        self.masks.iter_mut().zip(&o.masks).for_each(|(a, b)| *a &= *b);
        self
    }

    fn or(mut self, o: &TargetSet) -> TargetSet {
        self.masks.iter_mut().zip(&o.masks).for_each(|(a, b)| *a |= *b);
        self
    }

    fn shards(n_months: usize, mask: u8) -> TargetSet {
        TargetSet { masks: vec![mask; n_months] }
    }

    /// Shards that have any month selected.
    pub fn shard_mask(&self) -> u8 {
        self.masks.iter().fold(0, |a, b| a | b)
    }
}

impl Cond {
    /// Which shards and existing months may hold matching rows.
    pub fn eval(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<TargetSet> {
        let n = ctx.months.len();
        Ok(match self {
            Cond::All => TargetSet::full(n, topo.shard_count),
            Cond::And(parts) => {
                let mut acc = TargetSet::full(n, topo.shard_count);
                for p in parts {
                    acc = acc.and(&p.eval(params, topo, ctx)?);
                }
                acc
            }
            Cond::Or(parts) => {
                let mut acc = TargetSet::empty(n);
                for p in parts {
                    acc = acc.or(&p.eval(params, topo, ctx)?);
                }
                acc
            }
            Cond::Shard(vals) => {
                let ints = vals.iter().map(|v| int_value(v, params)).collect::<Result<Vec<_>>>()?;
                TargetSet::shards(n, shard_mask(&ints, topo.shard_count))
            }
            Cond::ShardArray(src) => match array_values(src, params)? {
                None => TargetSet::full(n, topo.shard_count),
                Some(ints) => TargetSet::shards(n, shard_mask(&ints, topo.shard_count)),
            },
            Cond::Id(vals) => {
                let ints = vals.iter().map(|v| int_value(v, params)).collect::<Result<Vec<_>>>()?;
                id_targets(&ints, topo, ctx)
            }
            Cond::IdArray(src) => match array_values(src, params)? {
                None => TargetSet::full(n, topo.shard_count),
                Some(ints) => id_targets(&ints, topo, ctx),
            },
            Cond::Time(cmp, src) => {
                let Some(t) = where_time(src, params, topo, ctx)? else { return Ok(TargetSet::empty(n)) };
                let (lo, hi) = match cmp {
                    Cmp::Eq => (incl(t, true), incl(t, false)),
                    Cmp::Lt => (Some(Bound::Unbounded), excl(t, false)),
                    Cmp::LtEq => (Some(Bound::Unbounded), incl(t, false)),
                    Cmp::Gt => (excl(t, true), Some(Bound::Unbounded)),
                    Cmp::GtEq => (incl(t, true), Some(Bound::Unbounded)),
                };
                months_set(lo, hi, topo, ctx)
            }
            Cond::TimeIn(vals) => {
                let mut acc = TargetSet::empty(n);
                for v in vals {
                    if let Some(t) = where_time(v, params, topo, ctx)? {
                        acc = acc.or(&months_set(incl(t, true), incl(t, false), topo, ctx));
                    }
                }
                acc
            }
            Cond::TimeBetween(lo, hi) => {
                let (Some(l), Some(h)) = (where_time(lo, params, topo, ctx)?, where_time(hi, params, topo, ctx)?) else {
                    return Ok(TargetSet::empty(n));
                };
                months_set(incl(l, true), incl(h, false), topo, ctx)
            }
            Cond::Lookup { table, column, vals } => {
                let mut acc = TargetSet::empty(n);
                for v in vals {
                    let text = match lookup_text(v, params)? {
                        // `= NULL` matches no row
                        LookupText::Null => continue,
                        LookupText::Unknown => return Ok(TargetSet::full(n, topo.shard_count)),
                        LookupText::Text(t) => t,
                    };
                    // not looked up, no entry (a row from before the lookup existed), or a
                    // month this proxy does not know yet: anywhere
                    let found = ctx.lookups.iter().find(|r| r.table == *table && r.column == *column && r.value == text).and_then(|r| r.at);
                    let Some((key, month)) = found else { return Ok(TargetSet::full(n, topo.shard_count)) };
                    let Some(i) = ctx.months.iter().position(|m| *m == month) else { return Ok(TargetSet::full(n, topo.shard_count)) };
                    acc.masks[i] |= 1u8 << shard_of(MerchantId(key), topo.shard_count).0;
                }
                acc
            }
        })
    }
}

/// A bound from a time value; `None` means "no instant can satisfy it".
/// `lower` says which side of the range the bound is on.
fn incl(t: TimeValue, lower: bool) -> Option<Bound> {
    bound(t, lower, Bound::Inclusive)
}

fn excl(t: TimeValue, lower: bool) -> Option<Bound> {
    bound(t, lower, Bound::Exclusive)
}

fn bound(t: TimeValue, lower: bool, mk: fn(Timestamp) -> Bound) -> Option<Bound> {
    match (t, lower) {
        (TimeValue::At(ts), _) => Some(mk(ts)),
        (TimeValue::Unknown, _) => Some(Bound::Unbounded),
        // Nothing finite lies above +infinity or below -infinity.
        (TimeValue::Infinity, true) | (TimeValue::NegInfinity, false) => None,
        (TimeValue::Infinity, false) | (TimeValue::NegInfinity, true) => Some(Bound::Unbounded),
    }
}

fn months_set(lo: Option<Bound>, hi: Option<Bound>, topo: &Topology, ctx: &Context<'_>) -> TargetSet {
    let n = ctx.months.len();
    let (Some(lo), Some(hi)) = (lo, hi) else { return TargetSet::empty(n) };
    let chosen = months_in_range(lo, hi, &topo.tz, ctx.months);
    let all = all_shards(topo.shard_count);
    let mut set = TargetSet::empty(n);
    for (i, m) in ctx.months.iter().enumerate() {
        if chosen.contains(m) {
            set.masks[i] = all;
        }
    }
    set
}

fn id_targets(ints: &[IntValue], topo: &Topology, ctx: &Context<'_>) -> TargetSet {
    let n = ctx.months.len();
    if !topo.ids.route_by_id {
        // application ids carry no placement: any id may be on any shard and month
        return TargetSet::full(n, topo.shard_count);
    }
    let mut set = TargetSet::empty(n);
    for v in ints {
        match v {
            IntValue::Null => {}
            IntValue::Unroutable => return TargetSet::full(n, topo.shard_count),
            IntValue::Int(id) => match topo.ids.decode(*id, ctx.now, &topo.tz) {
                // Not issued by shardgate (legacy, foreign): it may live anywhere.
                None => return TargetSet::full(n, topo.shard_count),
                Some(d) => {
                    let bit = 1u8 << d.shard.0;
                    for (i, m) in ctx.months.iter().enumerate() {
                        if d.month.is_none_or(|dm| dm == *m) {
                            set.masks[i] |= bit;
                        }
                    }
                }
            },
        }
    }
    set
}

/// Shard of one INSERT row's shard-key value; NULL and unroutable values are errors.
pub(crate) fn row_shard(src: &Src, params: &[Param<'_>], topo: &Topology, rule: &TableRule) -> Result<ShardId> {
    match int_value(src, params)? {
        IntValue::Int(i) => Ok(shard_of(MerchantId(i), topo.shard_count)),
        IntValue::Null => Err(RouteError::NotNull(format!(
            "null value in column \"{}\" of relation \"{}\": every row needs a shard key",
            rule.shard_key, rule.name
        ))),
        IntValue::Unroutable => match src {
            Src::Number(n) if n.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) => {
                Err(RouteError::OutOfRange("bigint out of range".into()))
            }
            // one table would round it into the bigint column: the row's shard is unsure
            Src::Number(n) => Err(RouteError::unsupported(format!(
                "{} = {n} is not an integer; write the shard key as an integer literal or bind it as bigint",
                rule.shard_key
            ))),
            _ => Err(RouteError::InvalidValue(format!(
                "{} must be a bigint value to route the row; got a non-integer number",
                rule.shard_key
            ))),
        },
    }
}

/// Month of one INSERT row's month-column value.
pub(crate) fn row_month(src: &Src, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>, rule: &TableRule) -> Result<MonthKey> {
    let t = match time_value(src, params, topo, ctx) {
        Err(RouteError::InvalidDatetime(_)) => {
            return Err(RouteError::unsupported(format!(
                "shardgate could not read {} to pick the month table; write it in ISO form with an offset (YYYY-MM-DD HH:MM:SS[.ffffff]+HH:MM)",
                rule.month_column
            )))
        }
        other => other?,
    };
    match t {
        Some(TimeValue::At(ts)) => Ok(MonthKey::of(ts, &topo.tz)),
        None => Err(RouteError::NotNull(format!(
            "null value in column \"{}\" of relation \"{}\": every row needs a time to pick its month table",
            rule.month_column, rule.name
        ))),
        Some(_) => Err(RouteError::unsupported(format!(
            "{} must be a concrete time (not now/infinity/an expression) to pick the month table; send the value itself",
            rule.month_column
        ))),
    }
}
