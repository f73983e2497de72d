//! Statement text → cached [`Analysis`] (parse, classify, rewrite once), and
//! [`Analysis::plan`] that applies bind values, time and existing months.

mod names;
mod targets;

use names::*;

use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_relations, Expr, Ident, Insert, ObjectName, SetExpr, Statement, TableAliasWithoutColumns, TableObject, Value, ValueWithSpan,
    VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::error::{Result, RouteError};
use crate::extract::{row_month, row_shard, Cond, Src};
use crate::keys::ShardId;
use crate::merge::{scatter, Count, Scatter};
use crate::month::MonthKey;
use crate::plan::{Plan, Routed, RoutedKind, StatementClass, Target};
use crate::rewrite::{hole_name, is_table, Renamer, Template, HOLE_ID, HOLE_PREFIX, HOLE_TIME};
use crate::topology::{Context, Param, TableRule, Topology};

/// What is known about a statement text before bind values.
#[derive(Debug, Clone)]
pub enum Analysis {
    /// Goes to `db_default` unchanged.
    Passthrough(StatementClass),
    /// Refused whatever the bind values.
    Refused(RouteError),
    /// SELECT on a sharded table.
    Select(Box<SelectAnalysis>),
    /// INSERT into a sharded table.
    Insert(Box<InsertAnalysis>),
    /// UPDATE / DELETE on a sharded table.
    Write(Box<WriteAnalysis>),
}

/// A SELECT, analysed.
#[derive(Debug, Clone)]
pub struct SelectAnalysis {
    rule: usize,
    cond: Cond,
    /// The statement for one target, printed on first need (scatters never need it).
    single: std::sync::OnceLock<Template>,
    /// The renamed statement, kept to build the scatter form on first need.
    query: sqlparser::ast::Query,
    /// How many times the sharded table is referenced.
    references: usize,
    /// Scatter form, built lazily: most statements route to one target.
    scatter: std::sync::OnceLock<std::result::Result<ScatterForm, RouteError>>,
    /// FOR UPDATE/SHARE: month tables cannot be combined with UNION ALL.
    locking: bool,
    /// The one-target texts rendered so far.
    renders: crate::rewrite::Renders,
}

/// The statement each target of a scatter runs, and how to merge.
#[derive(Debug, Clone)]
struct ScatterForm {
    template: Template,
    scatter: Scatter,
    /// Bind values the scatter statement still uses (LIMIT/OFFSET values are
    /// applied by the router and dropped); `None` = all of them.
    params: Option<Vec<usize>>,
}

/// An UPDATE or DELETE, analysed.
#[derive(Debug, Clone)]
pub struct WriteAnalysis {
    rule: usize,
    kind: RoutedKind,
    cond: Cond,
    template: Template,
    /// The texts rendered so far.
    renders: crate::rewrite::Renders,
}

#[derive(Debug, Clone)]
struct RowAnalysis {
    shard: Src,
    time: Option<Src>,
    /// The explicit id: `Some(None)` when it is an expression (not a literal or parameter).
    id: Option<Option<Src>>,
    /// The id column is listed and this row says DEFAULT: shardgate generates it.
    id_default: bool,
    /// The values of the rule's unique-lookup columns, in `unique_lookups` order.
    lookups: Vec<Src>,
}

/// An INSERT … VALUES, analysed.
#[derive(Debug, Clone)]
pub struct InsertAnalysis {
    rule: usize,
    /// The statement with the table hole and generated-value holes in place.
    stmt: Statement,
    template: Template,
    rows: Vec<RowAnalysis>,
    generate_id: bool,
    /// The one-target texts of bound executions rendered so far.
    renders: crate::rewrite::Renders,
}

fn class_of(s: &Statement) -> StatementClass {
    use Statement as S;
    match s {
        S::StartTransaction { .. } | S::Commit { .. } | S::Rollback { .. } | S::Savepoint { .. } | S::ReleaseSavepoint { .. } => {
            StatementClass::Transaction
        }
        S::Set(_) | S::ShowVariable { .. } | S::ShowVariables { .. } | S::Discard { .. } => StatementClass::Session,
        S::Query(_) => StatementClass::Read,
        S::Insert(_) | S::Update(_) | S::Delete(_) | S::Merge { .. } => StatementClass::Write,
        _ => StatementClass::Other,
    }
}

/// Why a text was not parsed.
pub(crate) enum Unparsed {
    /// Deeper than [`crate::lexer::MAX_DEPTH_TOKENS`]: never handed to sqlparser.
    TooDeep,
    /// sqlparser's error.
    Syntax(sqlparser::parser::ParserError),
}

/// The one way the router parses SQL: within the nesting bound (see
/// [`crate::lexer::depth_bound`]), then with sqlparser's PostgreSQL dialect.
pub(crate) fn parse(sql: &str) -> std::result::Result<Vec<Statement>, Unparsed> {
    if crate::lexer::depth_bound(sql) > crate::lexer::MAX_DEPTH_TOKENS {
        return Err(Unparsed::TooDeep);
    }
    Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(Unparsed::Syntax)
}

/// Analyses one statement text (possibly several statements).
pub fn analyze(sql: &str, topo: &Topology) -> Analysis {
    match analyze_inner(sql, topo) {
        Ok(a) => a,
        Err(e) => Analysis::Refused(e),
    }
}

fn analyze_inner(sql: &str, topo: &Topology) -> Result<Analysis> {
    let sql = &*without_only(sql, topo);
    if sql.as_bytes().windows(HOLE_PREFIX.len()).any(|w| w.eq_ignore_ascii_case(HOLE_PREFIX.as_bytes())) {
        return Err(RouteError::unsupported(format!("identifiers starting with {HOLE_PREFIX} are reserved by shardgate")));
    }
    if unicode_names_sharded(sql, topo) {
        // U&"t\005Forder" names t_order where neither the router nor its table check can see it
        return Err(RouteError::unsupported("Unicode-escaped identifiers (U&\"…\") naming a sharded table are not supported through shardgate; write the name plainly"));
    }
    let stmts = match parse(sql) {
        Ok(s) => s,
        Err(Unparsed::TooDeep) => {
            if mentions_sharded_word(sql, topo) {
                return Err(RouteError::TooComplex(format!(
                    "this statement chains too many operators for shardgate to analyse (over {} tokens along one expression); \
                     write long OR lists as IN (…) or = ANY($1), or split the statement",
                    crate::lexer::MAX_DEPTH_TOKENS
                )));
            }
            // Not about sharded tables: the server parses it, with its own stack-depth check.
            return Ok(Analysis::Passthrough(StatementClass::Other));
        }
        Err(Unparsed::Syntax(e)) => {
            if table_command_on_sharded(sql, topo) {
                return Err(RouteError::unsupported("TABLE on a sharded table is not supported through shardgate; write SELECT * FROM it"));
            }
            if mentions_sharded_word(sql, topo) {
                let text = e.to_string();
                if text.contains("Expected: an SQL statement") {
                    // not even a statement keyword (`SELEC * FROM t_order`): PostgreSQL says 42601 too
                    return Err(RouteError::Syntax(format!(
                        "shardgate could not parse this statement on a sharded table: {}",
                        text.trim_start_matches("sql parser error: ")
                    )));
                }
                // PostgreSQL may well accept it (BETWEEN SYMMETRIC, rarer syntax): refused,
                // not answered with a syntax error one table would not give
                return Err(RouteError::unsupported(format!(
                    "shardgate could not parse this statement on a sharded table ({}); if PostgreSQL accepts it, write it in a more common form \
                     (for example BETWEEN SYMMETRIC as two comparisons)",
                    e.to_string().trim_start_matches("sql parser error: ")
                )));
            }
            // Not about sharded tables: the server has the full grammar; let it judge.
            return Ok(Analysis::Passthrough(StatementClass::Other));
        }
    };
    let named: Vec<Vec<usize>> = stmts.iter().map(|s| sharded_tables_named(s, topo)).collect();
    match stmts.len() {
        0 => return Ok(Analysis::Passthrough(StatementClass::Empty)),
        1 => {}
        _ => {
            if named.iter().any(|n| !n.is_empty()) || mentions_sharded_word(sql, topo) {
                return Err(RouteError::unsupported(
                    "several statements in one query string cannot include a sharded table; send each statement on its own",
                ));
            }
            return Ok(Analysis::Passthrough(StatementClass::Other));
        }
    }
    let mut stmt = stmts.into_iter().next().expect("one statement");
    protect_unary_signs(&mut stmt);
    let named = &named[0];
    if named.is_empty() {
        let dml = matches!(stmt, Statement::Query(_) | Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_));
        // Utility statements (COPY, LOCK, …) keep table names where the relation
        // visitor does not look: refuse any that mention a sharded table at all.
        if !dml && mentions_sharded_word(sql, topo) {
            return Err(RouteError::unsupported(format!(
                "{} naming a sharded table is not supported through shardgate; use SELECT/INSERT/UPDATE/DELETE, or run it on each shard's month tables",
                statement_word(&stmt)
            )));
        }
        // a sharded table's name where the relation walk does not see it (`(TABLE t_order)`,
        // `INSERT … SELECT … FROM (TABLE t_order)`): db_default's empty template would answer
        if dml && mentions_sharded_word(sql, topo) && !names_only_as_column(&stmt, topo) {
            return Err(RouteError::unsupported(
                "shardgate cannot tell how this statement uses the sharded table (for example TABLE t_order inside it); write SELECT … FROM t_order",
            ));
        }
        return Ok(Analysis::Passthrough(class_of(&stmt)));
    }
    if named.len() > 1 {
        return Err(RouteError::unsupported("a statement may use only one sharded table"));
    }
    // from here on the statement is printed for the shards
    make_printable(&mut stmt, &topo.tables[named[0]].name)?;
    let rule_idx = named[0];
    let rule = &topo.tables[rule_idx];
    match stmt {
        Statement::Query(q) => analyze_select(*q, rule_idx, rule),
        Statement::Insert(ins) => analyze_insert(ins, rule_idx, rule),
        Statement::Update(_) | Statement::Delete(_) => analyze_write(stmt, rule_idx, rule),
        other => Err(RouteError::unsupported(format!(
            "{} on sharded table {} is not supported through shardgate; run it on the shard databases directly (`shardgate route` shows where a statement goes)",
            statement_word(&other),
            rule.name
        ))),
    }
}

/// sqlparser prints `- -x` as `--x`, which the shard reads as a comment
/// swallowing the rest of the statement: a sign directly over another sign
/// gets parentheses (`-(-x)`, the same value).
fn protect_unary_signs(stmt: &mut Statement) {
    use sqlparser::ast::UnaryOperator as U;
    let _ = sqlparser::ast::visit_expressions_mut(stmt, |e: &mut Expr| {
        if let Expr::UnaryOp { op: U::Minus | U::Plus, expr } = e {
            if matches!(expr.as_ref(), Expr::UnaryOp { .. }) {
                let inner = std::mem::replace(expr.as_mut(), Expr::Value(Value::Null.into()));
                **expr = Expr::Nested(Box::new(inner));
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

/// sqlparser prints string literals and quoted names lossily: a value holding
/// `''` or `\'` is printed as it is, so `'a''''b'` came out as `'a''b'` and
/// the value `\' OR true --` as `'\' OR true --'` — a literal a shard reads
/// as SQL. Before a statement is printed for the shards, a literal holding a
/// quote or backslash becomes an `E'…'` literal (printed with every quote and
/// backslash escaped: the same value, the same unknown-type constant), and a
/// statement with a quoted name or N'…' literal holding its own quote
/// character is refused.
/// PostgreSQL's system columns: the month tables have them, the statement the
/// shards run (over a UNION ALL of month tables) does not.
const SYSTEM_COLUMNS: [&str; 6] = ["ctid", "tableoid", "xmin", "xmax", "cmin", "cmax"];

/// Functions that change the server session beyond the statement, or reach
/// the other sessions of the shard role (every client's pooled connections
/// use that one role): refused in a statement on a sharded table.
const SESSION_FUNCTIONS: [&str; 13] = [
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "lastval",
    "currval",
    "setseed",
];
/// Name prefixes of such functions (other sessions' activity, dblink's connections).
const SESSION_FUNCTION_PREFIXES: [&str; 3] = ["pg_stat_get_backend", "pg_stat_get_activity", "dblink"];

/// The refusal of a call to `name` (its last part, folded unless quoted) if it is
/// one of [`SESSION_FUNCTIONS`] or starts with one of [`SESSION_FUNCTION_PREFIXES`].
fn session_function_refusal(name: &sqlparser::ast::ObjectName) -> Option<String> {
    let name = crate::rewrite::object_base(name)?;
    let reaches = SESSION_FUNCTIONS.contains(&name.as_str()) || SESSION_FUNCTION_PREFIXES.iter().any(|p| name.starts_with(p));
    reaches.then(|| {
        format!(
            "{name}() is not supported in a statement on a sharded table: it would change or read the sessions of the shard \
             connections, which shardgate shares between clients; for settings use SET LOCAL, for locks pg_advisory_xact_lock, in a transaction"
        )
    })
}

struct Printable {
    refused: Option<String>,
    /// The sharded table's name.
    table: String,
}

impl VisitorMut for Printable {
    type Break = ();

    fn pre_visit_value(&mut self, value: &mut sqlparser::ast::ValueWithSpan) -> ControlFlow<()> {
        // a decoded value spelling a template hole (E'\x5f_sg_hole_…') would be filled in
        if let Some(text) = value.value.clone().into_string() {
            if text.to_ascii_lowercase().contains(HOLE_PREFIX) {
                self.refused = Some(format!("values containing {HOLE_PREFIX} are reserved by shardgate"));
                return ControlFlow::Break(());
            }
        }
        match &mut value.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) if s.contains(['\'', '\\']) => {
                // dollar quoting: no quote or backslash means anything inside it, in any
                // client encoding (E'\'' is refused under SJIS and other encodings)
                let tag = dollar_tag(s);
                value.value = Value::DollarQuotedString(sqlparser::ast::DollarQuotedString { value: std::mem::take(s), tag: Some(tag) });
            }
            Value::SingleQuotedString(_) | Value::EscapedStringLiteral(_) | Value::DollarQuotedString(_) | Value::UnicodeStringLiteral(_) => {}
            Value::Number(..) | Value::Boolean(_) | Value::Null | Value::Placeholder(_) => {}
            Value::NationalStringLiteral(s) if !s.contains(['\'', '\\']) => {}
            other => {
                // X'…', B'…' and N'…' with quotes print raw: the shard would read something else
                self.refused = Some(format!("the literal {other} cannot be passed to the shards exactly; write it as an ordinary string with a cast"));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = &*expr {
            if let Some(m) = session_function_refusal(&f.name) {
                self.refused = Some(m);
                return ControlFlow::Break(());
            }
        }
        // public.t_order.col: the shards read t_order as a derived table, which has no schema
        if let Expr::CompoundIdentifier(parts) = expr {
            let norm = |i: &Ident| if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() };
            if parts.len() == 3 && norm(&parts[0]) == "public" && norm(&parts[1]) == self.table {
                parts.remove(0);
            }
        }
        let last = match &*expr {
            Expr::Identifier(i) => Some(i),
            Expr::CompoundIdentifier(parts) => parts.last(),
            _ => None,
        };
        if let Some(i) = last {
            let name = if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() };
            if SYSTEM_COLUMNS.contains(&name.as_str()) {
                self.refused = Some(format!(
                    "the system column {name} is not available on a sharded table through shardgate (its rows live in month tables on several shards); use the id column"
                ));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &mut sqlparser::ast::TableFactor) -> ControlFlow<()> {
        use sqlparser::ast::TableFactor as T;
        // the same functions called in FROM (`FROM set_config(…)`, `LATERAL pg_advisory_lock(…)`)
        let refusal = match &*tf {
            T::Table { name, args: Some(_), .. } | T::Function { name, .. } => session_function_refusal(name),
            _ => None,
        };
        if let Some(m) = refusal {
            self.refused = Some(m);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_ident(&mut self, ident: &mut Ident) -> ControlFlow<()> {
        if let Some(q) = ident.quote_style {
            if ident.value.contains(q) {
                self.refused = Some(format!("the quoted name {:?} holds its own quote character, which shardgate cannot pass to the shards exactly; rename it", ident.value));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}

/// A dollar-quote tag that does not occur in `value` (`$sg$`, `$sg1$`, …).
fn dollar_tag(value: &str) -> String {
    (0..).map(|i| if i == 0 { "sg".to_string() } else { format!("sg{i}") }).find(|t| !value.contains(&format!("${t}$"))).expect("a free tag")
}

fn make_printable(stmt: &mut Statement, table: &str) -> Result<()> {
    let mut p = Printable { refused: None, table: table.to_string() };
    let _ = stmt.visit(&mut p);
    if let Some(m) = p.refused {
        return Err(RouteError::unsupported(m));
    }
    // whatever else sqlparser prints differently from what it read (type modifiers
    // lose their quotes, …): the printed statement must read back as the same tree
    let printed = stmt.to_string();
    match parse(&printed) {
        Ok(again) if again.len() == 1 && again[0] == *stmt => Ok(()),
        _ => Err(RouteError::unsupported(
            "shardgate cannot print this statement for the shards exactly as it was written (a rarely used literal or type form); write it in a more common form",
        )),
    }
}

/// The command words of a statement (`ALTER TABLE`, `COPY`), for messages.
fn statement_word(s: &Statement) -> String {
    let text = s.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    match words.as_slice() {
        [a, b] if b.chars().all(|c| c.is_ascii_uppercase()) => format!("{a} {b}"),
        [a, ..] => a.to_string(),
        [] => String::new(),
    }
}

fn rename<'r, T: VisitMut>(node: &mut T, rule: &'r TableRule, ctes: &[String]) -> Result<Renamer<'r>> {
    let mut r = Renamer::new(rule);
    let _ = node.visit(&mut r);
    r.others.retain(|o| !ctes.contains(o));
    if !r.others.is_empty() {
        return Err(RouteError::unsupported(format!(
            "{} lives on the shards and {} on the default database; a statement cannot use both. Query them separately",
            rule.name,
            r.others.join(", ")
        )));
    }
    Ok(r)
}

fn analyze_select(mut q: sqlparser::ast::Query, rule_idx: usize, rule: &TableRule) -> Result<Analysis> {
    let locking = !q.locks.is_empty();
    fn has_into(e: &SetExpr) -> bool {
        match e {
            SetExpr::Select(s) => s.into.is_some(),
            SetExpr::Query(q) => has_into(&q.body),
            SetExpr::SetOperation { left, right, .. } => has_into(left) || has_into(right),
            _ => false,
        }
    }
    if has_into(&q.body) {
        // it would create the table on each shard it runs on
        return Err(RouteError::unsupported(format!(
            "SELECT … INTO from {} is not supported; read the rows and insert them into the new table from the application",
            rule.name
        )));
    }
    let ctes: Vec<String> = q.with.as_ref().map_or_else(Vec::new, |w| w.cte_tables.iter().map(|c| c.alias.name.value.to_lowercase()).collect());
    if ctes.contains(&rule.name) {
        return Err(RouteError::unsupported(format!("a WITH query named {} hides the sharded table; give the WITH query another name", rule.name)));
    }
    let r = rename(&mut q, rule, &ctes)?;
    if r.count == 0 {
        return Err(RouteError::unsupported(format!("{} is referenced in a way shardgate cannot route", rule.name)));
    }
    // Each reference to the sharded table is routed by the WHERE of the query
    // block whose FROM holds it (a derived table, CTE or subquery is routed by its
    // own WHERE, never by an outer one); the statement runs where the union of
    // them leads, and anything but a single target must fit the scatter forms.
    let cond = reference_conds(&q, rule, r.count);
    Ok(Analysis::Select(Box::new(SelectAnalysis {
        rule: rule_idx,
        cond,
        single: std::sync::OnceLock::new(),
        query: q,
        references: r.count,
        scatter: std::sync::OnceLock::new(),
        locking,
        renders: Default::default(),
    })))
}

/// The routing condition of a SELECT: per reference to the sharded table, its
/// query block's WHERE read with that reference's qualifier (only qualified
/// columns when the block has several FROM items; nothing from a reference
/// whose alias renames its columns); the union of them. `Cond::All` when a
/// reference sits where this walk does not look.
fn reference_conds(q: &sqlparser::ast::Query, rule: &TableRule, references: usize) -> Cond {
    use sqlparser::ast::{Query, Select, TableFactor, TableWithJoins, Visit, Visitor};
    struct Refs<'r> {
        rule: &'r TableRule,
        conds: Vec<Cond>,
    }
    fn factors<'a>(twj: &'a [TableWithJoins], out: &mut Vec<&'a TableFactor>) {
        for t in twj {
            for f in std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)) {
                match f {
                    TableFactor::NestedJoin { table_with_joins, .. } => factors(std::slice::from_ref(table_with_joins.as_ref()), out),
                    other => out.push(other),
                }
            }
        }
    }
    impl Refs<'_> {
        fn select(&mut self, s: &Select) {
            let mut fs = Vec::new();
            factors(&s.from, &mut fs);
            let several = fs.len() > 1;
            for f in fs {
                let TableFactor::Table { name, alias, .. } = f else { continue };
                if crate::rewrite::object_base(name).as_deref() != Some(crate::rewrite::HOLE_TABLE) {
                    continue;
                }
                let cond = match alias {
                    Some(a) if a.columns.is_empty() => {
                        let qual = if a.name.quote_style.is_some() { a.name.value.clone() } else { a.name.value.to_lowercase() };
                        let scope = crate::extract::Scope { rule: self.rule, qualifiers: vec![qual], qualified_only: several };
                        s.selection.as_ref().map_or(Cond::All, |w| scope.cond(w))
                    }
                    _ => Cond::All,
                };
                self.conds.push(cond);
            }
        }
        fn body(&mut self, e: &SetExpr) {
            match e {
                SetExpr::Select(s) => self.select(s),
                SetExpr::SetOperation { left, right, .. } => {
                    self.body(left);
                    self.body(right);
                }
                // a nested Query is visited on its own
                _ => {}
            }
        }
    }
    impl Visitor for Refs<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            self.body(&q.body);
            ControlFlow::Continue(())
        }
    }
    let mut v = Refs { rule, conds: Vec::new() };
    let _ = q.visit(&mut v);
    if v.conds.len() != references {
        return Cond::All;
    }
    match v.conds.len() {
        1 => v.conds.pop().expect("one"),
        _ => Cond::Or(v.conds),
    }
}

fn analyze_write(mut stmt: Statement, rule_idx: usize, rule: &TableRule) -> Result<Analysis> {
    let kind = if matches!(stmt, Statement::Update(_)) { RoutedKind::Update } else { RoutedKind::Delete };
    let r = rename(&mut stmt, rule, &[])?;
    let scope = r.scope();
    let (selection, extra) = match &stmt {
        Statement::Update(u) => {
            for a in &u.assignments {
                let cols: Vec<String> = match &a.target {
                    sqlparser::ast::AssignmentTarget::ColumnName(n) => vec![crate::rewrite::object_base(n).unwrap_or_default()],
                    sqlparser::ast::AssignmentTarget::Tuple(ns) => ns.iter().filter_map(crate::rewrite::object_base).collect(),
                };
                for c in cols {
                    if c == rule.shard_key || c == rule.month_column || c == rule.id_column {
                        return Err(RouteError::unsupported(format!(
                            "UPDATE of {c} would move the row to another shard or month table; DELETE it and INSERT the new row instead"
                        )));
                    }
                    if rule.unique_lookups.contains(&c) {
                        return Err(RouteError::unsupported(format!(
                            "UPDATE of {c} is not supported: it is kept unique across shards (sharding unique_lookups); DELETE the row and INSERT it with the new {c}"
                        )));
                    }
                }
            }
            (u.selection.clone(), u.from.is_some() || !u.table.joins.is_empty())
        }
        Statement::Delete(d) => (d.selection.clone(), d.using.is_some() || !d.tables.is_empty()),
        _ => (None, false),
    };
    if extra || r.count != 1 {
        return Err(RouteError::unsupported(format!(
            "UPDATE/DELETE on {} with FROM/USING or several references is not supported; use a plain WHERE",
            rule.name
        )));
    }
    let cond = selection.as_ref().map_or(Cond::All, |w| scope.cond(w));
    Ok(Analysis::Write(Box::new(WriteAnalysis { rule: rule_idx, kind, cond, template: Template::parse(&stmt.to_string()), renders: Default::default() })))
}

fn col_name(n: &ObjectName) -> String {
    crate::rewrite::object_base(n).unwrap_or_default()
}

fn analyze_insert(mut ins: Insert, rule_idx: usize, rule: &TableRule) -> Result<Analysis> {
    let name = &rule.name;
    match &ins.table {
        TableObject::TableName(n) if is_table(n, name) => {}
        _ => return Err(RouteError::unsupported(format!("INSERT into {name} must name the table directly"))),
    }
    if ins.columns.is_empty() {
        return Err(RouteError::unsupported(format!(
            "INSERT into sharded table {name} must list its columns (INSERT INTO {name} (…) VALUES …)"
        )));
    }
    let cols: Vec<String> = ins.columns.iter().map(col_name).collect();
    let pos = |c: &str| cols.iter().position(|x| x == c);
    // (a missing shard key is PostgreSQL's NOT NULL violation, raised when the statement
    // runs: checked after what fails sooner, the refusals and the VALUES rows' length)
    let shard_pos = pos(&rule.shard_key);
    let time_pos = pos(&rule.month_column);
    let id_pos = pos(&rule.id_column);
    let generate_id = id_pos.is_none();
    let generate_time = time_pos.is_none();
    if !rule.unique_lookups.is_empty() && ins.on.is_some() {
        return Err(RouteError::unsupported(format!(
            "INSERT … ON CONFLICT into {name} is not supported while {} is kept unique across shards (unique_lookups); \
             INSERT and handle the unique violation (23505), or look the row up first",
            rule.unique_lookups.join(", ")
        )));
    }
    let lookup_pos: Vec<usize> = rule
        .unique_lookups
        .iter()
        .map(|c| {
            pos(c).ok_or_else(|| {
                RouteError::unsupported(format!("INSERT into {name} must set {c}: it is kept unique across shards (unique_lookups), so shardgate records each value"))
            })
        })
        .collect::<Result<_>>()?;
    if let Some(sqlparser::ast::OnInsert::OnConflict(oc)) = &ins.on {
        if let sqlparser::ast::OnConflictAction::DoUpdate(du) = &oc.action {
            for a in &du.assignments {
                let cols: Vec<String> = match &a.target {
                    sqlparser::ast::AssignmentTarget::ColumnName(n) => vec![col_name(n)],
                    sqlparser::ast::AssignmentTarget::Tuple(ns) => ns.iter().map(col_name).collect(),
                };
                for c in cols {
                    if c == rule.shard_key || c == rule.month_column || c == rule.id_column {
                        return Err(RouteError::unsupported(format!(
                            "ON CONFLICT DO UPDATE of {c} would move the row to another shard or month table"
                        )));
                    }
                }
            }
        }
    }
    let Some(source) = ins.source.as_mut() else {
        return Err(RouteError::unsupported(format!("INSERT into {name} needs VALUES")));
    };
    if source.with.is_some() || source.order_by.is_some() || source.limit_clause.is_some() {
        return Err(RouteError::unsupported(format!("INSERT … SELECT into {name} cannot be routed; insert the rows with VALUES")));
    }
    let SetExpr::Values(values) = source.body.as_mut() else {
        return Err(RouteError::unsupported(format!(
            "INSERT … SELECT into sharded table {name} cannot be routed row by row; select the rows and INSERT them with VALUES"
        )));
    };
    if let Some(row) = values.rows.iter().find(|r| r.len() != cols.len()) {
        return Err(RouteError::Syntax(format!("INSERT has {} target columns but a VALUES row has {} expressions", cols.len(), row.len())));
    }
    let Some(shard_pos) = shard_pos else {
        return Err(RouteError::NotNull(format!("INSERT into {name} must set {}: it picks the shard", rule.shard_key)));
    };
    let mut rows = Vec::with_capacity(values.rows.len());
    for row in values.rows.iter_mut() {
        if row.len() != cols.len() {
            return Err(RouteError::Syntax(format!(
                "INSERT has {} target columns but a VALUES row has {} expressions",
                cols.len(),
                row.len()
            )));
        }
        let shard = src_of_value(&row[shard_pos], &rule.shard_key, name)?;
        let time = match time_pos {
            // now() and friends: the proxy's current time, as for a row that omits the column
            Some(p) if is_current_time(&row[p]) => {
                row[p] = Expr::Identifier(Ident::new(HOLE_TIME));
                None
            }
            Some(p) => Some(src_of_value(&row[p], &rule.month_column, name)?),
            None => None,
        };
        // `DEFAULT` for the id: the logical table's default is shardgate's generated id
        let id_default = id_pos.is_some_and(|p| matches!(&row[p], Expr::Identifier(i) if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("default")));
        if id_default {
            if let Some(p) = id_pos {
                row[p] = Expr::Identifier(Ident::new(HOLE_ID));
            }
        }
        let id = if id_default { None } else { id_pos.map(|p| crate::extract::src_of(&row[p])) };
        if generate_id {
            row.push(Expr::Identifier(Ident::new(HOLE_ID)));
        }
        if generate_time {
            row.push(Expr::Identifier(Ident::new(HOLE_TIME)));
        }
        let lookups = lookup_pos
            .iter()
            .zip(&rule.unique_lookups)
            .map(|(&p, c)| {
                crate::extract::lookup_src(&row[p]).ok_or_else(|| {
                    RouteError::unsupported(format!(
                        "{c} in an INSERT into {name} must be a string literal or a $n parameter (got `{}`): it is kept unique across shards (unique_lookups)",
                        row[p]
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        rows.push(RowAnalysis { shard, time, id, id_default, lookups });
    }
    if generate_id {
        ins.columns.push(ObjectName::from(vec![Ident::new(rule.id_column.clone())]));
    }
    if generate_time {
        ins.columns.push(ObjectName::from(vec![Ident::new(rule.month_column.clone())]));
    }
    ins.table = TableObject::TableName(hole_name());
    if ins.table_alias.is_none() {
        ins.table_alias = Some(TableAliasWithoutColumns { explicit: true, alias: Ident::new(name.clone()) });
    }
    let stmt = Statement::Insert(ins);
    let template = Template::parse(&stmt.to_string());
    Ok(Analysis::Insert(Box::new(InsertAnalysis { rule: rule_idx, stmt, template, rows, generate_id, renders: Default::default() })))
}

/// `now()`, `CURRENT_TIMESTAMP`, `transaction_timestamp()`, `statement_timestamp()`, `clock_timestamp()`.
fn is_current_time(e: &Expr) -> bool {
    let Expr::Function(f) = e else { return false };
    let no_args = match &f.args {
        sqlparser::ast::FunctionArguments::None => true,
        sqlparser::ast::FunctionArguments::List(l) => l.args.is_empty(),
        sqlparser::ast::FunctionArguments::Subquery(_) => false,
    };
    let name = f.name.to_string().to_ascii_lowercase();
    no_args && matches!(name.as_str(), "now" | "current_timestamp" | "transaction_timestamp" | "statement_timestamp" | "clock_timestamp")
}

fn src_of_value(e: &Expr, col: &str, table: &str) -> Result<Src> {
    crate::extract::src_of(e).ok_or_else(|| {
        RouteError::unsupported(format!(
            "{col} in an INSERT into {table} must be a literal or a $n parameter (got `{e}`) so shardgate can route the row"
        ))
    })
}
