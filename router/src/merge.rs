//! Scatter rewrite of a SELECT on a sharded table: what each target runs and
//! the [`MergeSpec`] that turns the targets' rows into what one table returns.
//! Anything that cannot be merged exactly is refused here with 0A000.

use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_expressions, BinaryOperator, Distinct, Expr, Function, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    LimitClause, ObjectName, ObjectNamePart, OrderByKind, OrderBySort, Query, SelectItem, SetExpr, TableFactor, UnaryOperator, Value,
};

use crate::error::{Result, RouteError};
use crate::plan::{Agg, CmpOp, ColRef, Grouping, Having, MergeSpec, Operand, SortKey};
use crate::rewrite::{HOLE_LIMIT, HOLE_TABLE};

/// A LIMIT or OFFSET value: literal or bind parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Lit(u64),
    Param(usize),
}

/// The scatter form of a SELECT.
#[derive(Debug, Clone)]
pub(crate) struct Scatter {
    /// The statement each target runs (table and pushed LIMIT are holes).
    pub query: Query,
    /// Merge spec with `limit`/`offset` left for execution time.
    pub spec: MergeSpec,
    pub limit: Option<Count>,
    pub offset: Option<Count>,
    /// Targets get `LIMIT limit+offset`.
    pub push_limit: bool,
}

const MERGEABLE: [&str; 5] = ["count", "sum", "min", "max", "avg"];
const OTHER_AGGREGATES: [&str; 36] = [
    "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg", "bool_and", "bool_or", "every",
    "bit_and", "bit_or", "bit_xor", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "percentile_cont",
    "percentile_disc", "mode", "corr", "covar_pop", "covar_samp", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept",
    "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy", "xmlagg", "range_agg", "any_value",
];

/// Aggregates the database knows beyond the lists above (user-defined ones,
/// newer built-ins), learned from `pg_proc` by the proxy at startup.
static CATALOG_AGGREGATES: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Records the aggregate function names of the database (lower case).
pub(crate) fn learn_aggregates(names: Vec<String>) {
    if let Ok(mut a) = CATALOG_AGGREGATES.write() {
        *a = names;
    }
}

/// Columns of the sharded tables (lower case), learned from the template
/// table at startup: a GROUP BY name that is a column means the column, not
/// an output alias of that name.
static CATALOG_COLUMNS: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Records the sharded tables' column names.
pub(crate) fn learn_columns(names: Vec<String>) {
    if let Ok(mut c) = CATALOG_COLUMNS.write() {
        *c = names;
    }
}

fn catalog_column(name: &str) -> bool {
    CATALOG_COLUMNS.read().is_ok_and(|c| c.iter().any(|n| n == name))
}

fn fold(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

/// The name PostgreSQL gives an output column written without an alias
/// (FigureColname), where it is a name ORDER BY could use.
fn implicit_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(fold(i)),
        Expr::CompoundIdentifier(p) => p.last().map(fold),
        Expr::Nested(x) => implicit_name(x),
        Expr::Cast { expr, .. } => implicit_name(expr),
        Expr::Function(f) => Some(func_name(f)),
        Expr::Case { .. } => Some("case".into()),
        _ => None,
    }
}

/// An expression as PostgreSQL sees it for equality of select-list items:
/// unquoted names folded to lower case, parentheses dropped.
fn normalized(e: &Expr) -> String {
    let mut e = e.clone();
    let _ = sqlparser::ast::visit_expressions_mut(&mut e, |x: &mut Expr| {
        match x {
            Expr::Identifier(i) if i.quote_style.is_none() => i.value = i.value.to_lowercase(),
            Expr::CompoundIdentifier(p) => p.iter_mut().filter(|i| i.quote_style.is_none()).for_each(|i| i.value = i.value.to_lowercase()),
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
    while let Expr::Nested(inner) = e {
        e = *inner;
    }
    e.to_string()
}

fn catalog_aggregate(name: &str) -> bool {
    CATALOG_AGGREGATES.read().is_ok_and(|a| a.iter().any(|n| n == name))
}

/// Functions whose value belongs to one server, connection or transaction.
const PER_SERVER: &[&str] = &[
    "current_database",
    "pg_backend_pid",
    "inet_server_addr",
    "inet_server_port",
    "txid_current",
    "pg_current_xact_id",
    "now",
    "current_timestamp",
    "transaction_timestamp",
    "statement_timestamp",
    "clock_timestamp",
    "timeofday",
    "random",
    "gen_random_uuid",
    "pg_postmaster_start_time",
];

fn func_name(f: &Function) -> String {
    match f.name.0.last() {
        Some(ObjectNamePart::Identifier(i)) => i.value.to_lowercase(),
        _ => String::new(),
    }
}

/// Refuses window functions and non-mergeable aggregates anywhere in `e`; tells whether it contains an aggregate.
fn scan(e: &Expr) -> Result<bool> {
    let mut found = false;
    let mut err = None;
    let _ = visit_expressions(e, |x| {
        if let Expr::Function(f) = x {
            let name = func_name(f);
            if f.over.is_some() {
                err = Some(RouteError::unsupported(format!(
                    "window function {name}() cannot be computed across shards; add a {{shard key}} condition so the query runs on one shard"
                )));
                return ControlFlow::Break(());
            }
            // rank(…) WITHIN GROUP, percentile_cont(…) WITHIN GROUP, …: ordered-set and
            // hypothetical-set aggregates, whatever their name
            let other = OTHER_AGGREGATES.contains(&name.as_str()) || (!MERGEABLE.contains(&name.as_str()) && catalog_aggregate(&name));
            if other || !f.within_group.is_empty() {
                err = Some(RouteError::unsupported(format!(
                    "aggregate {name}() cannot be merged across shards (only count, sum, min, max, avg); add a {{shard key}} condition so the query runs on one shard"
                )));
                return ControlFlow::Break(());
            }
            if MERGEABLE.contains(&name.as_str()) {
                found = true;
            }
        }
        if let Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } = x {
            err = Some(RouteError::unsupported(
                "subqueries in a query that spans shards are not supported; add a {shard key} condition so the query runs on one shard",
            ));
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    match err {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// If `e` is exactly a mergeable aggregate call, its kind.
fn as_aggregate(e: &Expr) -> Result<Option<(&Function, &'static str)>> {
    let Expr::Function(f) = e else { return Ok(None) };
    let name = func_name(f);
    let Some(kind) = MERGEABLE.iter().find(|k| **k == name) else { return Ok(None) };
    if let FunctionArguments::List(list) = &f.args {
        if matches!(list.duplicate_treatment, Some(sqlparser::ast::DuplicateTreatment::Distinct)) && distinct_arg(f).is_none() {
            return Err(RouteError::unsupported(format!(
                "{name}(DISTINCT …) of several arguments cannot be merged across shards; add a {{shard key}} condition so the query runs on one shard"
            )));
        }
        if !list.clauses.is_empty() {
            return Err(RouteError::unsupported(format!("{name}() with ORDER BY/LIMIT inside cannot be merged across shards")));
        }
        for a in &list.args {
            let inner = match a {
                sqlparser::ast::FunctionArg::Unnamed(x) | sqlparser::ast::FunctionArg::Named { arg: x, .. } | sqlparser::ast::FunctionArg::ExprNamed { arg: x, .. } => x,
            };
            if let FunctionArgExpr::Expr(x) = inner {
                if scan(x)? {
                    return Err(RouteError::unsupported("nested aggregate calls are not supported"));
                }
            }
        }
    }
    if !f.within_group.is_empty() {
        return Err(RouteError::unsupported(format!("{name}() WITHIN GROUP cannot be merged across shards")));
    }
    Ok(Some((f, kind)))
}

/// The one argument of an aggregate called with DISTINCT.
fn distinct_arg(f: &Function) -> Option<&Expr> {
    let FunctionArguments::List(list) = &f.args else { return None };
    if !matches!(list.duplicate_treatment, Some(sqlparser::ast::DuplicateTreatment::Distinct)) {
        return None;
    }
    match list.args.as_slice() {
        [sqlparser::ast::FunctionArg::Unnamed(FunctionArgExpr::Expr(x))] => Some(x),
        _ => None,
    }
}

fn with_name(f: &Function, name: &str) -> Expr {
    let mut g = f.clone();
    g.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]);
    Expr::Function(g)
}

/// True when `e` is a bare name that one of the projection's output columns
/// has (an alias, or the name PostgreSQL gives an unaliased item).
fn names_alias(b: &Builder, e: &Expr) -> bool {
    let Expr::Identifier(id) = e else { return false };
    let name = fold(id);
    b.items.iter().flatten().any(|(x, a)| a.clone().or_else(|| implicit_name(x)).as_deref() == Some(name.as_str()))
}

/// How a bare name in a clause is looked up, as PostgreSQL does.
#[derive(Clone, Copy, PartialEq)]
enum Names {
    /// ORDER BY: output column names first (an error when several differ).
    OutputFirst,
    /// GROUP BY: an input column of that name first, then output aliases.
    InputFirst,
}

struct Builder {
    /// Projection items: (expr, alias) for plain items; `None` for wildcards.
    items: Vec<Option<(Expr, Option<String>)>>,
    wildcard: bool,
    /// Input columns known by name (the shard key and the learned ones).
    columns: Vec<String>,
    hidden: Vec<Expr>,
    aggregates: Vec<(ColRef, Agg)>,
    keys: Vec<ColRef>,
    key_exprs: Vec<Expr>,
    /// Arguments of DISTINCT aggregates: the targets group by them too.
    distinct_args: Vec<Expr>,
}

impl Builder {
    fn add_hidden(&mut self, e: Expr) -> ColRef {
        if let Some(i) = self.hidden.iter().position(|h| *h == e) {
            return ColRef::Hidden(i);
        }
        self.hidden.push(e);
        ColRef::Hidden(self.hidden.len() - 1)
    }

    /// A visible column the expression names: position, alias, or equal expression.
    fn find_visible(&self, e: &Expr) -> Result<Option<ColRef>> {
        self.find_visible_as(e, Names::OutputFirst)
    }

    fn find_visible_as(&self, e: &Expr, names: Names) -> Result<Option<ColRef>> {
        // `ORDER BY (1)` is a position too: PostgreSQL drops the parentheses first
        let mut e = e;
        while let Expr::Nested(inner) = e {
            e = inner;
        }
        if let Expr::Value(v) = e {
            if let Value::Number(n, _) = &v.value {
                let pos: usize = n.parse().map_err(|_| RouteError::unsupported("ORDER BY/GROUP BY position must be an integer"))?;
                if self.wildcard {
                    return Err(RouteError::unsupported(
                        "ORDER BY/GROUP BY by position together with * cannot be merged across shards; name the column",
                    ));
                }
                if pos == 0 || pos > self.items.len() {
                    return Err(RouteError::unsupported(format!("position {pos} is not in select list")));
                }
                return Ok(Some(ColRef::Visible(pos - 1)));
            }
        }
        if self.wildcard {
            return Ok(None);
        }
        if let Expr::Identifier(id) = e {
            let name = fold(id);
            let input = names == Names::InputFirst && (self.columns.contains(&name) || catalog_column(&name));
            if !input {
                // output columns by name: an alias, or the name an unaliased item gets
                let hits: Vec<usize> = (0..self.items.len())
                    .filter(|i| match &self.items[*i] {
                        Some((_, Some(a))) => *a == name,
                        Some((x, None)) => names == Names::OutputFirst && implicit_name(x).as_deref() == Some(name.as_str()),
                        None => false,
                    })
                    .collect();
                if let Some(&first) = hits.first() {
                    let same = |i: usize| self.items[i].as_ref().map(|(x, _)| normalized(x));
                    if hits.iter().any(|i| same(*i) != same(first)) {
                        let clause = if names == Names::OutputFirst { "ORDER BY" } else { "GROUP BY" };
                        return Err(RouteError::Ambiguous(format!("{clause} \"{name}\" is ambiguous")));
                    }
                    return Ok(Some(ColRef::Visible(first)));
                }
            }
        }
        let want = normalized(e);
        Ok(self.items.iter().position(|it| matches!(it, Some((x, _)) if x == e || normalized(x) == want)).map(ColRef::Visible))
    }

    /// The merged column for an aggregate call, adding hidden columns as needed.
    fn aggregate_col(&mut self, e: &Expr, f: &Function, kind: &str) -> Result<ColRef> {
        if let Some(c) = self.find_visible(e)? {
            if self.aggregates.iter().any(|(ac, _)| *ac == c) {
                return Ok(c);
            }
        }
        let col = self.add_hidden(e.clone());
        if !self.aggregates.iter().any(|(ac, _)| *ac == col) {
            let agg = self.agg_kind(f, kind);
            self.aggregates.push((col, agg));
        }
        Ok(col)
    }

    fn agg_kind(&mut self, f: &Function, kind: &str) -> Agg {
        if let Some(x) = distinct_arg(f) {
            let dk = match kind {
                "count" => Some(crate::plan::DistinctKind::Count),
                "sum" => Some(crate::plan::DistinctKind::Sum),
                "avg" => Some(crate::plan::DistinctKind::Avg),
                // min/max of the distinct values are min/max
                _ => None,
            };
            if let Some(kind) = dk {
                let of = self.add_hidden(x.clone());
                if !self.distinct_args.contains(x) {
                    self.distinct_args.push(x.clone());
                }
                return Agg::Distinct { of, kind };
            }
        }
        match kind {
            "count" => Agg::Count,
            "sum" => Agg::Sum,
            "min" => Agg::Min,
            "max" => Agg::Max,
            _ => {
                let sum = self.add_hidden(with_name(f, "sum"));
                let count = self.add_hidden(with_name(f, "count"));
                Agg::Avg { sum, count }
            }
        }
    }

    fn operand(&mut self, e: &Expr) -> Result<Operand> {
        match e {
            Expr::Nested(x) => self.operand(x),
            Expr::Value(v) => match &v.value {
                Value::Null => Ok(Operand::Null),
                Value::Number(n, _) => Ok(Operand::Number(n.clone())),
                Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => Ok(Operand::Literal(s.clone())),
                Value::DollarQuotedString(d) => Ok(Operand::Literal(d.value.clone())),
                _ => Err(having_err()),
            },
            Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match self.operand(expr)? {
                Operand::Number(n) => Ok(Operand::Number(match n.strip_prefix('-') {
                    Some(pos) => pos.to_string(),
                    None => format!("-{n}"),
                })),
                _ => Err(having_err()),
            },
            _ => {
                if let Some((f, kind)) = as_aggregate(e)? {
                    return Ok(Operand::Col(self.aggregate_col(e, f, kind)?));
                }
                if let Some(i) = self.key_exprs.iter().position(|k| k == e) {
                    return Ok(Operand::Col(self.keys[i]));
                }
                Err(having_err())
            }
        }
    }

    fn having(&mut self, e: &Expr) -> Result<Having> {
        Ok(match e {
            Expr::Nested(x) => self.having(x)?,
            Expr::BinaryOp { left, op: BinaryOperator::And, right } => Having::And(Box::new(self.having(left)?), Box::new(self.having(right)?)),
            Expr::BinaryOp { left, op: BinaryOperator::Or, right } => Having::Or(Box::new(self.having(left)?), Box::new(self.having(right)?)),
            Expr::UnaryOp { op: UnaryOperator::Not, expr } => Having::Not(Box::new(self.having(expr)?)),
            Expr::IsNull(x) => Having::IsNull(self.operand(x)?, false),
            Expr::IsNotNull(x) => Having::IsNull(self.operand(x)?, true),
            Expr::BinaryOp { left, op, right } => {
                let op = match op {
                    BinaryOperator::Eq => CmpOp::Eq,
                    BinaryOperator::NotEq => CmpOp::NotEq,
                    BinaryOperator::Lt => CmpOp::Lt,
                    BinaryOperator::LtEq => CmpOp::LtEq,
                    BinaryOperator::Gt => CmpOp::Gt,
                    BinaryOperator::GtEq => CmpOp::GtEq,
                    _ => return Err(having_err()),
                };
                Having::Cmp(self.operand(left)?, op, self.operand(right)?)
            }
            _ => return Err(having_err()),
        })
    }
}

fn having_err() -> RouteError {
    RouteError::unsupported(
        "HAVING across shards supports comparisons (=, <>, <, <=, >, >=, IS NULL) of aggregates and GROUP BY columns with literals, combined with AND/OR/NOT; simplify the HAVING clause or add a {shard key} condition",
    )
}

fn count_of(e: &Expr) -> Result<Option<Count>> {
    let bad = || RouteError::unsupported("LIMIT/OFFSET across shards must be an integer literal or a $n parameter");
    match e {
        Expr::Value(v) => match &v.value {
            Value::Null => Ok(None),
            Value::Number(n, _) => {
                let i: i64 = n.parse().map_err(|_| bad())?;
                u64::try_from(i).map(|u| Some(Count::Lit(u))).map_err(|_| RouteError::InvalidLimit("LIMIT must not be negative".into()))
            }
            Value::Placeholder(p) => {
                let n: usize = p.strip_prefix('$').and_then(|d| d.parse().ok()).ok_or_else(bad)?;
                Ok(n.checked_sub(1).map(Count::Param))
            }
            _ => Err(bad()),
        },
        Expr::Cast { expr, .. } | Expr::Nested(expr) => count_of(expr),
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } if matches!(count_of(expr), Ok(Some(Count::Lit(n))) if n > 0) => {
            Err(RouteError::InvalidLimit("LIMIT must not be negative".into()))
        }
        Expr::UnaryOp { op: UnaryOperator::Plus, expr } if matches!(count_of(expr), Ok(Some(Count::Lit(_)))) => count_of(expr),
        _ => Err(bad()),
    }
}

/// True when `e` reads no column and calls nothing (literals, casts and
/// operators over them): its value is the same on every shard.
fn is_constant(e: &Expr) -> bool {
    let mut constant = true;
    let _ = sqlparser::ast::visit_expressions(e, |x: &Expr| {
        if matches!(x, Expr::Identifier(_) | Expr::CompoundIdentifier(_) | Expr::Function(_) | Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. }) {
            constant = false;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    constant
}

/// Plans the scatter form of `q` (its sharded table already renamed to the hole).
pub(crate) fn scatter(q: &Query, rule: &crate::topology::TableRule) -> Result<Scatter> {
    let shard_key = &rule.shard_key;
    let fill = |e: RouteError| match e {
        RouteError::Unsupported(m) => RouteError::Unsupported(m.replace("{shard key}", &format!("{shard_key} = …"))),
        other => other,
    };
    // columns known by name even when the template's could not be learned
    let mut columns = vec![rule.shard_key.clone(), rule.month_column.clone(), rule.id_column.clone()];
    columns.extend(rule.unique_lookups.iter().cloned());
    scatter_inner(q, columns).map_err(fill)
}

fn scatter_inner(q: &Query, columns: Vec<String>) -> Result<Scatter> {
    let one_shard = "add a {shard key} condition to the WHERE of every query block that reads the table (a derived table, CTE or subquery is routed by its own WHERE, never by an outer one) so the query runs on one shard";
    if q.with.is_some() {
        return Err(RouteError::unsupported(format!("WITH queries on a sharded table that spans shards are not supported; {one_shard}")));
    }
    if q.fetch.is_some() {
        return Err(RouteError::unsupported("FETCH FIRST across shards is not supported; use LIMIT"));
    }
    let SetExpr::Select(sel) = q.body.as_ref() else {
        return Err(RouteError::unsupported(format!("UNION/INTERSECT/EXCEPT over a sharded table that spans shards is not supported; {one_shard}")));
    };
    // a value each shard computes for itself would come back once per shard, or differently
    for item in &sel.projection {
        let e = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            _ => continue,
        };
        let mut per_server: Option<String> = None;
        let _ = sqlparser::ast::visit_expressions(e, |x: &Expr| {
            if let Expr::Function(f) = x {
                let n = func_name(f);
                if PER_SERVER.contains(&n.as_str()) {
                    per_server = Some(n);
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        if let Some(n) = per_server {
            return Err(RouteError::unsupported(format!(
                "{n}() in the select list of a query that spans shards would answer once per shard database or transaction; select it on its own, or {one_shard}"
            )));
        }
    }
    // the merge compares values in the database's default collation only
    let collated = |e: &Expr| {
        let mut found = false;
        let _ = sqlparser::ast::visit_expressions(e, |x: &Expr| {
            found |= matches!(x, Expr::Collate { .. });
            ControlFlow::<()>::Continue(())
        });
        found
    };
    let sorted_or_grouped = sel.projection.iter().filter_map(|i| match i {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    });
    let order_exprs = q.order_by.iter().flat_map(|ob| match &ob.kind {
        OrderByKind::Expressions(v) => v.iter().map(|o| &o.expr).collect::<Vec<_>>(),
        _ => Vec::new(),
    });
    if sorted_or_grouped.chain(order_exprs).chain(sel.having.as_ref()).any(collated) {
        return Err(RouteError::unsupported(format!(
            "COLLATE in the select list, HAVING or ORDER BY of a query that spans shards is not supported (the merge compares in the database's collation); {one_shard}"
        )));
    }
    let distinct = match &sel.distinct {
        None | Some(Distinct::All) => false,
        Some(Distinct::Distinct) => true,
        Some(_) => return Err(RouteError::unsupported(format!("DISTINCT ON across shards is not supported; {one_shard}"))),
    };
    let single_table = sel.from.len() == 1
        && sel.from[0].joins.is_empty()
        && matches!(&sel.from[0].relation, TableFactor::Table { name, .. } if name.to_string() == HOLE_TABLE);
    if !single_table {
        return Err(RouteError::unsupported(format!(
            "a JOIN or several tables in a query that spans shards is not supported; {one_shard}"
        )));
    }
    if let Some(w) = &sel.selection {
        scan(w)?;
    }

    let mut b = Builder {
        items: Vec::new(),
        wildcard: false,
        columns,
        hidden: Vec::new(),
        aggregates: Vec::new(),
        keys: Vec::new(),
        key_exprs: Vec::new(),
        distinct_args: Vec::new(),
    };
    // Projection.
    let mut item_aggs: Vec<Option<(Function, &'static str)>> = Vec::new();
    for item in &sel.projection {
        match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                let alias = match item {
                    SelectItem::ExprWithAlias { alias, .. } => Some(if alias.quote_style.is_some() { alias.value.clone() } else { alias.value.to_lowercase() }),
                    _ => None,
                };
                let has_agg = scan(e)?;
                let agg = as_aggregate(e)?;
                if has_agg && agg.is_none() {
                    return Err(RouteError::unsupported(format!(
                        "expressions over aggregates (like `{e}`) cannot be merged across shards; select the aggregates themselves and compute in the application, or {one_shard}"
                    )));
                }
                item_aggs.push(agg.map(|(f, k)| (f.clone(), k)));
                b.items.push(Some((e.clone(), alias)));
            }
            _ => {
                b.wildcard = true;
                item_aggs.push(None);
                b.items.push(None);
            }
        }
    }
    let group_exprs: Vec<Expr> = match &sel.group_by {
        GroupByExpr::Expressions(exprs, mods) if mods.is_empty() => exprs.clone(),
        _ => return Err(RouteError::unsupported(format!("GROUP BY ALL/ROLLUP/CUBE/GROUPING SETS across shards is not supported; {one_shard}"))),
    };
    for g in &group_exprs {
        if let Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_) = g {
            return Err(RouteError::unsupported(format!("GROUP BY ROLLUP/CUBE/GROUPING SETS across shards is not supported; {one_shard}")));
        }
        if scan(g)? {
            return Err(RouteError::unsupported("aggregates are not allowed in GROUP BY"));
        }
    }
    // an aggregate only in ORDER BY makes the query an aggregate too (one row)
    let order_aggs = match &q.order_by {
        Some(ob) => match &ob.kind {
            OrderByKind::Expressions(exprs) => exprs.iter().map(|o| scan(&o.expr)).collect::<Result<Vec<bool>>>()?.into_iter().any(|a| a),
            _ => false,
        },
        None => false,
    };
    let grouping = item_aggs.iter().any(Option::is_some) || !group_exprs.is_empty() || sel.having.is_some() || order_aggs;
    if grouping && b.wildcard {
        return Err(RouteError::unsupported("* together with GROUP BY or aggregates cannot be merged across shards; name the columns"));
    }
    if grouping {
        for g in &group_exprs {
            let col = match b.find_visible_as(g, Names::InputFirst)? {
                Some(c) => c,
                None => b.add_hidden(g.clone()),
            };
            b.keys.push(col);
            // HAVING and ORDER BY may name the key by its expression or by the projection's.
            let key_expr = match col {
                ColRef::Visible(i) => b.items[i].as_ref().map_or_else(|| g.clone(), |(e, _)| e.clone()),
                ColRef::Hidden(_) => g.clone(),
            };
            b.key_exprs.push(key_expr);
        }
        for (i, agg) in item_aggs.iter().enumerate() {
            match agg {
                Some((f, kind)) => {
                    let a = b.agg_kind(f, kind);
                    b.aggregates.push((ColRef::Visible(i), a));
                }
                None => {
                    // a constant is the same in every group of every shard: a key of its own
                    if !b.keys.contains(&ColRef::Visible(i)) && b.items[i].as_ref().is_some_and(|(e, _)| is_constant(e)) {
                        b.keys.push(ColRef::Visible(i));
                        continue;
                    }
                    if !b.keys.contains(&ColRef::Visible(i)) {
                        let e = b.items[i].as_ref().map(|(e, _)| e.to_string()).unwrap_or_default();
                        return Err(RouteError::unsupported(format!(
                            "column `{e}` must appear in GROUP BY (or be inside count/sum/min/max/avg) to be merged across shards"
                        )));
                    }
                }
            }
        }
    }
    let having = match &sel.having {
        Some(h) => Some(b.having(h)?),
        None => None,
    };

    // ORDER BY.
    let mut order_by = Vec::new();
    if let Some(ob) = &q.order_by {
        let OrderByKind::Expressions(exprs) = &ob.kind else {
            return Err(RouteError::unsupported("ORDER BY ALL is not supported"));
        };
        for o in exprs {
            if o.with_fill.is_some() {
                return Err(RouteError::unsupported("ORDER BY … WITH FILL is not supported"));
            }
            let descending = match o.options.sort {
                None | Some(OrderBySort::Asc) => false,
                Some(OrderBySort::Desc) => true,
                Some(_) => return Err(RouteError::unsupported("ORDER BY … USING across shards is not supported; use ASC/DESC")),
            };
            let nulls_first = o.options.nulls_first.unwrap_or(descending);
            let has_agg = scan(&o.expr)?;
            let col = match b.find_visible(&o.expr)? {
                Some(c) => c,
                None if distinct => {
                    return Err(RouteError::unsupported(
                        "for SELECT DISTINCT, ORDER BY expressions must appear in select list",
                    ))
                }
                None if grouping => {
                    if let Some((f, kind)) = as_aggregate(&o.expr)? {
                        b.aggregate_col(&o.expr, f, kind)?
                    } else if let Some(i) = b.key_exprs.iter().position(|k| *k == o.expr) {
                        b.keys[i]
                    } else if has_agg {
                        return Err(RouteError::unsupported(format!(
                            "ORDER BY an expression over aggregates (`{}`) cannot be merged across shards; order by the aggregate itself",
                            o.expr
                        )));
                    } else {
                        return Err(RouteError::unsupported(format!(
                            "ORDER BY `{}` must be a GROUP BY column or an aggregate to be merged across shards",
                            o.expr
                        )));
                    }
                }
                None if b.wildcard && names_alias(&b, &o.expr) => {
                    // the targets cannot sort by an output name in a hidden column, and next
                    // to * the name may also be one of the table's columns (ambiguous there)
                    return Err(RouteError::unsupported(format!(
                        "ORDER BY the output name `{}` together with * cannot be merged across shards; order by its expression",
                        o.expr
                    )));
                }
                None => b.add_hidden(o.expr.clone()),
            };
            order_by.push(SortKey { col, descending, nulls_first });
        }
    }

    // LIMIT / OFFSET.
    let (limit, offset) = match &q.limit_clause {
        None => (None, None),
        Some(LimitClause::LimitOffset { limit, offset, limit_by }) if limit_by.is_empty() => {
            let l = match limit {
                Some(e) => count_of(e)?,
                None => None,
            };
            let o = match offset {
                Some(o) => count_of(&o.value)?,
                None => None,
            };
            (l, o)
        }
        Some(_) => return Err(RouteError::unsupported("LIMIT offset, count is MySQL syntax; use LIMIT … OFFSET …")),
    };
    let push_limit = limit.is_some() && !grouping && !distinct;

    if !b.distinct_args.is_empty() && group_exprs.is_empty() && !b.keys.is_empty() {
        // without GROUP BY a target with no rows sends no row at all; the merger then makes the
        // one row itself, which it can do for aggregates but not for other select items
        return Err(RouteError::unsupported(format!(
            "a DISTINCT aggregate beside plain select items without GROUP BY cannot be merged across shards; select only aggregates, or {one_shard}"
        )));
    }
    // The statement each target runs.
    let mut tq = q.clone();
    if let SetExpr::Select(ts) = tq.body.as_mut() {
        ts.having = None;
        for (i, h) in b.hidden.iter().enumerate() {
            ts.projection.push(SelectItem::ExprWithAlias { expr: h.clone(), alias: Ident::new(format!("__sg_h{i}")) });
        }
        if !b.distinct_args.is_empty() {
            // one row per group and distinct value: the merger keeps each group's distinct values
            if let GroupByExpr::Expressions(exprs, _) = &mut ts.group_by {
                for x in &b.distinct_args {
                    if !exprs.contains(x) {
                        exprs.push(x.clone());
                    }
                }
            }
        }
    }
    tq.limit_clause = if push_limit {
        Some(LimitClause::LimitOffset { limit: Some(Expr::Identifier(Ident::new(HOLE_LIMIT))), offset: None, limit_by: vec![] })
    } else {
        None
    };
    if grouping {
        // Targets' order is irrelevant: the merger re-groups and sorts.
        tq.order_by = None;
    }
    let spec = MergeSpec {
        hidden: b.hidden.len(),
        grouping: grouping.then(|| Grouping { keys: b.keys.clone(), aggregates: b.aggregates.clone(), having }),
        distinct,
        order_by,
        offset: 0,
        limit: None,
    };
    Ok(Scatter { query: tq, spec, limit, offset, push_limit })
}
