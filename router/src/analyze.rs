//! Statement text → cached [`Analysis`] (parse, classify, rewrite once), and
//! [`Analysis::plan`] that applies bind values, time and existing months.

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

/// Every sharded table the statement names anywhere (any statement kind).
fn sharded_tables_named(s: &Statement, topo: &Topology) -> Vec<usize> {
    let mut found = Vec::new();
    let _ = visit_relations(s, |r: &ObjectName| {
        for (i, t) in topo.tables.iter().enumerate() {
            if is_table(r, &t.name) && !found.contains(&i) {
                found.push(i);
            }
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

/// `TABLE t_order` anywhere in the text (sqlparser reads it at most as a subquery).
fn table_command_on_sharded(sql: &str, topo: &Topology) -> bool {
    crate::lexer::tokens(sql).windows(2).any(|w| match (&w[0], &w[1]) {
        (crate::lexer::Token::Word(a), crate::lexer::Token::Word(b)) => {
            a.eq_ignore_ascii_case("table") && topo.tables.iter().any(|r| b.eq_ignore_ascii_case(&r.name))
        }
        _ => false,
    })
}

/// True when every mention of a sharded table's name in `s` is a column or
/// other identifier inside an expression (not a table): nothing to route.
fn names_only_as_column(s: &Statement, topo: &Topology) -> bool {
    // the printed statement keeps TABLE …; anything else mentioning the name is an identifier
    !table_command_on_sharded(&s.to_string(), topo)
}

fn mentions_sharded_word(sql: &str, topo: &Topology) -> bool {
    crate::lexer::tokens(sql).iter().any(|t| match t {
        crate::lexer::Token::Word(w) => topo.tables.iter().any(|r| w.eq_ignore_ascii_case(&r.name)),
        _ => false,
    })
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

/// `ONLY t_order` (no child tables: the same rows as `t_order`) with ONLY
/// blanked out; sqlparser would read ONLY as a table named "only".
fn without_only<'a>(sql: &'a str, topo: &Topology) -> std::borrow::Cow<'a, str> {
    if !crate::lexer::contains_ignore_case(sql.as_bytes(), b"only") {
        return std::borrow::Cow::Borrowed(sql);
    }
    let mut blank: Vec<std::ops::Range<usize>> = Vec::new();
    let mut prev: Option<&str> = None;
    crate::lexer::scan(sql, |t| {
        if let crate::lexer::Token::Word(w) = t {
            if let Some(p) = prev {
                let named = topo.tables.iter().any(|r| w.eq_ignore_ascii_case(&r.name));
                if p.eq_ignore_ascii_case("only") && named {
                    let start = p.as_ptr() as usize - sql.as_ptr() as usize;
                    blank.push(start..start + p.len());
                }
            }
            prev = Some(w);
        } else {
            prev = None;
        }
    });
    if blank.is_empty() {
        return std::borrow::Cow::Borrowed(sql);
    }
    let mut out = sql.as_bytes().to_vec();
    for r in blank {
        out[r].fill(b' ');
    }
    std::borrow::Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| sql.to_string()))
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
    Ok(Analysis::Write(Box::new(WriteAnalysis { rule: rule_idx, kind, cond, template: Template::parse(&stmt.to_string()) })))
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
    let Some(shard_pos) = pos(&rule.shard_key) else {
        return Err(RouteError::NotNull(format!("INSERT into {name} must set {}: it picks the shard", rule.shard_key)));
    };
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
    Ok(Analysis::Insert(Box::new(InsertAnalysis { rule: rule_idx, stmt, template, rows, generate_id })))
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

/// The FROM text for a target: one month table, a UNION ALL of several, or the empty template.
fn table_text(rule: &TableRule, months: &[MonthKey]) -> String {
    match months {
        [] => rule.name.clone(),
        [m] => rule.physical(*m),
        many => {
            let parts: Vec<String> = many.iter().map(|m| format!("SELECT * FROM {}", rule.physical(*m))).collect();
            format!("({})", parts.join(" UNION ALL "))
        }
    }
}

fn count_value(c: Option<Count>, params: &[Param<'_>], what: &str) -> Result<Option<u64>> {
    let Some(c) = c else { return Ok(None) };
    match c {
        Count::Lit(n) => Ok(Some(n)),
        Count::Param(i) => match crate::extract::int_value(&Src::Param(i), params)? {
            crate::extract::IntValue::Int(n) => {
                u64::try_from(n).map(Some).map_err(|_| RouteError::InvalidLimit(format!("{what} must not be negative")))
            }
            crate::extract::IntValue::Null => Ok(None),
            crate::extract::IntValue::Unroutable => Err(RouteError::unsupported(format!("{what} must be an integer"))),
        },
    }
}

/// Shard × month pairs (or shard → months) from a target set.
fn groups(set: &crate::extract::TargetSet, months: &[MonthKey], shard_count: u8, per_month: bool) -> Vec<(ShardId, Vec<MonthKey>)> {
    let mut out = Vec::new();
    for s in 0..shard_count {
        let bit = 1u8 << s;
        let ms: Vec<MonthKey> = months.iter().zip(&set.masks).filter(|(_, m)| *m & bit != 0).map(|(k, _)| *k).collect();
        if ms.is_empty() {
            continue;
        }
        if per_month {
            out.extend(ms.into_iter().map(|m| (ShardId(s), vec![m])));
        } else {
            out.push((ShardId(s), ms));
        }
    }
    if out.is_empty() {
        // No existing month can hold a matching row: run once on the empty template
        // table so the client still gets the right columns (and count = 0, etc.).
        let mask = set.shard_mask();
        let shard = (0..shard_count).find(|s| mask & (1 << s) != 0).unwrap_or(0);
        out.push((ShardId(shard), Vec::new()));
    }
    out
}

/// Renders the text of each distinct month set once: a statement spread over
/// all shards runs the same text on each of them.
fn shared_texts(
    groups: Vec<(ShardId, Vec<MonthKey>)>,
    mut render: impl FnMut(&[MonthKey]) -> String,
) -> impl Iterator<Item = (ShardId, Vec<MonthKey>, std::sync::Arc<str>)> {
    let mut done: Vec<(Vec<MonthKey>, std::sync::Arc<str>)> = Vec::new();
    groups.into_iter().map(move |(shard, months)| {
        let sql = match done.iter().find(|(m, _)| *m == months) {
            Some((_, sql)) => sql.clone(),
            None => {
                let sql: std::sync::Arc<str> = render(&months).into();
                done.push((months.clone(), sql.clone()));
                sql
            }
        };
        (shard, months, sql)
    })
}

impl Analysis {
    /// The unique-lookup values (`(table, column, value)`) whose entries could
    /// narrow this statement's targets: look them up and pass them in
    /// [`Context::lookups`]. Empty for INSERTs and statements without them.
    pub fn lookup_probes(&self, params: &[Param<'_>]) -> Vec<crate::extract::Probe> {
        let mut out = Vec::new();
        match self {
            Analysis::Select(a) => a.cond.lookup_probes(params, &mut out),
            Analysis::Write(a) => a.cond.lookup_probes(params, &mut out),
            _ => {}
        }
        out.dedup();
        out
    }

    /// The one unique-lookup value a cached location may route this
    /// statement by, checked by its answer: `Some` only for a plain SELECT of
    /// rows of the sharded table (one FROM item, no join, WITH, GROUP BY,
    /// HAVING, subquery, or function call other than a window call anywhere:
    /// an aggregate the router does not know would answer a row from nothing,
    /// and a function in LIMIT runs before any row) whose WHERE has
    /// `unique_col = v` as a conjunct. Every row of its answer then holds that
    /// value, which is unique across shards: if the answer at the cached place
    /// has a row, that place was right; an empty answer says nothing (the
    /// caller asks the lookup table and runs it again), and running it
    /// somewhere without rows changed nothing.
    pub fn lookup_hint(&self, params: &[Param<'_>]) -> Option<crate::extract::Probe> {
        let Analysis::Select(a) = self else { return None };
        if a.references != 1 || a.query.with.is_some() {
            return None;
        }
        let SetExpr::Select(s) = a.query.body.as_ref() else { return None };
        let plain_from = matches!(s.from.as_slice(), [t] if t.joins.is_empty()
            && matches!(&t.relation, sqlparser::ast::TableFactor::Table { name, .. } if crate::rewrite::object_base(name).as_deref() == Some(crate::rewrite::HOLE_TABLE)));
        let no_groups = matches!(&s.group_by, sqlparser::ast::GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty());
        if !plain_from || !no_groups || s.having.is_some() || s.into.is_some() || s.qualify.is_some() {
            return None;
        }
        let mut called = false;
        let _ = sqlparser::ast::visit_expressions(&a.query, |e| {
            called |= match e {
                // a window call gives a value per row of the answer, in the projection only
                Expr::Function(f) => f.over.is_none(),
                Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => true,
                _ => false,
            };
            ControlFlow::<()>::Continue(())
        });
        if called {
            return None;
        }
        let lookups: Vec<&crate::extract::Cond> = match &a.cond {
            c @ crate::extract::Cond::Lookup { .. } => vec![c],
            crate::extract::Cond::And(parts) => parts.iter().filter(|p| matches!(p, crate::extract::Cond::Lookup { .. })).collect(),
            _ => return None,
        };
        let [crate::extract::Cond::Lookup { table, column, vals }] = lookups.as_slice() else { return None };
        let [v] = vals.as_slice() else { return None };
        let crate::extract::LookupText::Text(value) = crate::extract::lookup_text(v, params).ok()? else { return None };
        let param = if let crate::extract::Src::Param(i) = v { Some(*i) } else { None };
        Some(crate::extract::Probe { table: table.clone(), column: column.clone(), value, param })
    }

    /// Applies bind values and context.
    pub fn plan(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
        match self {
            Analysis::Passthrough(c) => Ok(Plan::Passthrough(*c)),
            Analysis::Refused(e) => Err(e.clone()),
            Analysis::Select(a) => a.plan(params, topo, ctx),
            Analysis::Write(a) => a.plan(params, topo, ctx),
            Analysis::Insert(a) => a.plan(params, topo, ctx),
        }
    }
}

/// `$n` indexes in order of first appearance.
fn placeholders(q: &sqlparser::ast::Query) -> Vec<usize> {
    let mut out = Vec::new();
    let _ = sqlparser::ast::visit_expressions(q, |e| {
        if let Expr::Value(ValueWithSpan { value: Value::Placeholder(p), .. }) = e {
            if let Some(i) = crate::extract::placeholder_index(p) {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
    out
}

impl SelectAnalysis {
    fn scatter_form(&self, rule: &TableRule) -> std::result::Result<&ScatterForm, RouteError> {
        self.scatter
            .get_or_init(|| {
                if self.references != 1 {
                    return Err(RouteError::unsupported(format!(
                        "{} appears more than once in a statement that spans shards; add {} = … so it runs on one shard",
                        rule.name, rule.shard_key
                    )));
                }
                let mut sc = scatter(&self.query, rule)?;
                let mut ren = Renumber { map: Vec::new() };
                let _ = sc.query.visit(&mut ren);
                let params = (ren.map != placeholders(&self.query)).then_some(ren.map);
                Ok(ScatterForm { template: Template::parse(&sc.query.to_string()), scatter: sc, params })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn plan(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
        let rule = &topo.tables[self.rule];
        let set = self.cond.eval(params, topo, ctx)?;
        let gs = groups(&set, ctx.months, topo.shard_count, self.locking);
        if gs.len() == 1 {
            let (shard, months) = gs.into_iter().next().expect("one group");
            let single = self.single.get_or_init(|| Template::parse(&self.query.to_string()));
            let sql = single.render(&table_text(rule, &months), None, &[], &[]).into();
            return Ok(Plan::Routed(Box::new(Routed {
                kind: RoutedKind::Select,
                table: rule.name.clone(),
                targets: vec![Target { shard, months, sql, params: None, extra: Vec::new() }],
                merge: None,
                generated_ids: Vec::new(),
                logical: None,
                row_targets: Vec::new(),
                lookup_rows: Vec::new(),
            })));
        }
        let form = self.scatter_form(rule)?;
        let (template, sc) = (&form.template, &form.scatter);
        let limit = count_value(sc.limit, params, "LIMIT")?;
        let offset = count_value(sc.offset, params, "OFFSET")?.unwrap_or(0);
        let pushed = if sc.push_limit { limit.map(|l| l.saturating_add(offset)) } else { None };
        let targets = shared_texts(gs, |months| template.render(&table_text(rule, months), pushed, &[], &[]))
            .map(|(shard, months, sql)| Target { shard, months, sql, params: form.params.clone(), extra: Vec::new() })
            .collect();
        let mut spec = sc.spec.clone();
        spec.limit = limit;
        spec.offset = offset;
        Ok(Plan::Routed(Box::new(Routed { kind: RoutedKind::Select, table: rule.name.clone(), targets, merge: Some(spec), generated_ids: Vec::new(), row_targets: Vec::new(), logical: None, lookup_rows: Vec::new() })))
    }
}

impl WriteAnalysis {
    fn plan(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
        let rule = &topo.tables[self.rule];
        let set = self.cond.eval(params, topo, ctx)?;
        let gs = groups(&set, ctx.months, topo.shard_count, true);
        let targets = shared_texts(gs, |months| self.template.render(&table_text(rule, months), None, &[], &[]))
            .map(|(shard, months, sql)| Target { shard, months, sql, params: None, extra: Vec::new() })
            .collect();
        Ok(Plan::Routed(Box::new(Routed { kind: self.kind, table: rule.name.clone(), targets, merge: None, generated_ids: Vec::new(), row_targets: Vec::new(), logical: None, lookup_rows: Vec::new() })))
    }
}

/// Renumbers `$n` placeholders in order of first appearance; records the original indexes.
struct Renumber {
    map: Vec<usize>,
}

impl VisitorMut for Renumber {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::Value(ValueWithSpan { value: Value::Placeholder(p), .. }) = e {
            if let Some(old) = crate::extract::placeholder_index(p) {
                let new = match self.map.iter().position(|o| *o == old) {
                    Some(i) => i,
                    None => {
                        self.map.push(old);
                        self.map.len() - 1
                    }
                };
                *p = format!("${}", new + 1);
            }
        }
        ControlFlow::Continue(())
    }
}

/// With `ids.route_by_id`, lookups trust what a decodable id says: an explicit
/// id above `ids.legacy_id_max` that decodes must name its row's shard and month.
fn check_explicit_id(id: Option<&Src>, shard: ShardId, month: MonthKey, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>, rule: &TableRule) -> Result<()> {
    let hint = "omit the id to have shardgate generate one, keep application ids at or below ids.legacy_id_max, or set ids.route_by_id = false";
    let Some(src) = id else {
        return Err(RouteError::unsupported(format!(
            "with ids.route_by_id = true, {} in an INSERT into {} must be a literal or a $n parameter; {hint}",
            rule.id_column, rule.name
        )));
    };
    if let crate::extract::IntValue::Int(v) = crate::extract::int_value(src, params)? {
        if let Some(d) = topo.ids.decode(v, ctx.now, &topo.tz) {
            if d.shard != shard || d.month.is_some_and(|m| m != month) {
                return Err(RouteError::unsupported(format!(
                    "{} {v} reads as a shardgate id of db_{}{}, but the row belongs to db_{} month {}: a lookup by this id would miss it; {hint}",
                    rule.id_column,
                    d.shard.0,
                    d.month.map(|m| format!(" month {}", m.suffix())).unwrap_or_default(),
                    shard.0,
                    month.suffix()
                )));
            }
        }
    }
    Ok(())
}

fn time_literal(ts: jiff::Timestamp) -> String {
    format!("'{ts}'")
}

impl InsertAnalysis {
    fn plan(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
        let rule = &topo.tables[self.rule];
        let now_month = MonthKey::of(ctx.now, &topo.tz);
        let mut keys = Vec::with_capacity(self.rows.len());
        let mut lookup_rows = Vec::new();
        for r in &self.rows {
            let shard = row_shard(&r.shard, params, topo, rule)?;
            let month = match &r.time {
                Some(t) => row_month(t, params, topo, ctx, rule)?,
                None => now_month,
            };
            for (src, column) in r.lookups.iter().zip(&rule.unique_lookups) {
                match crate::extract::lookup_text(src, params)? {
                    // NULLs are not unique values (as in a unique index); the column's NOT NULL speaks
                    crate::extract::LookupText::Null => {}
                    crate::extract::LookupText::Text(value) => {
                        let crate::extract::IntValue::Int(shard_key) = crate::extract::int_value(&r.shard, params)? else {
                            unreachable!("row_shard accepted it")
                        };
                        let param = if let Src::Param(i) = src { Some(*i) } else { None };
                        lookup_rows.push(crate::plan::LookupRow { column: column.clone(), value, shard_key, month, param });
                    }
                    crate::extract::LookupText::Unknown => {
                        return Err(RouteError::unsupported(format!(
                            "{column} must be bound as text (or an integer type) in an INSERT into {}: it is kept unique across shards (unique_lookups)",
                            rule.name
                        )))
                    }
                }
            }
            if topo.ids.route_by_id {
                if let Some(id) = &r.id {
                    check_explicit_id(id.as_ref(), shard, month, params, topo, ctx, rule)?;
                }
            }
            keys.push((shard, month));
        }
        let mut ids = Vec::new();
        // one generated id per row that omits the column or says DEFAULT, in row order
        let mut row_ids: Vec<Option<String>> = vec![None; keys.len()];
        if self.generate_id || self.rows.iter().any(|r| r.id_default) {
            let Some(gen) = ctx.ids else {
                return Err(RouteError::IdGeneration(format!("no id generator configured; INSERT into {} must set {}", rule.name, rule.id_column)));
            };
            for (i, (shard, month)) in keys.iter().enumerate() {
                if self.generate_id || self.rows[i].id_default {
                    let id = gen.next_for_row(*shard, Some(*month), ctx.now, &topo.tz)?;
                    ids.push(id);
                    row_ids[i] = Some(id.to_string());
                }
            }
        }
        let id_text: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        // one time value per row that takes the proxy's now (omitted column or now())
        let row_time: Vec<Option<String>> = self.rows.iter().map(|r| r.time.is_none().then(|| time_literal(ctx.now))).collect();
        let time_text: Vec<String> = row_time.iter().flatten().cloned().collect();
        // a bound statement gets its generated values as parameters (see `Target::extra`)
        let bound = !params.is_empty();
        let now_text = ctx.now.to_string();
        let holes = |first: usize, ids: &[String], times: usize| -> (Vec<String>, Vec<String>, Vec<String>) {
            let id_holes = (0..ids.len()).map(|i| format!("${}", first + i + 1)).collect();
            let time_holes = (0..times).map(|i| format!("${}", first + ids.len() + i + 1)).collect();
            let extra = ids.iter().cloned().chain(std::iter::repeat_n(now_text.clone(), times)).collect();
            (id_holes, time_holes, extra)
        };
        // Group rows by target, in order of first appearance.
        let mut order: Vec<(ShardId, MonthKey)> = Vec::new();
        for k in &keys {
            if !order.contains(k) {
                order.push(*k);
            }
        }
        let targets = if order.len() == 1 {
            let (shard, month) = order[0];
            if bound {
                let (id_holes, time_holes, extra) = holes(params.len(), &id_text, time_text.len());
                let sql = self.template.render(&rule.physical(month), None, &id_holes, &time_holes);
                vec![Target { shard, months: vec![month], sql: sql.into(), params: None, extra }]
            } else {
                let sql = self.template.render(&rule.physical(month), None, &id_text, &time_text);
                vec![Target { shard, months: vec![month], sql: sql.into(), params: None, extra: Vec::new() }]
            }
        } else {
            let mut out = Vec::with_capacity(order.len());
            for &(shard, month) in &order {
                let rows: Vec<usize> = (0..keys.len()).filter(|i| keys[*i] == (shard, month)).collect();
                let mut stmt = self.stmt.clone();
                if let Statement::Insert(ins) = &mut stmt {
                    if let Some(SetExpr::Values(v)) = ins.source.as_mut().map(|s| s.body.as_mut()) {
                        let all = std::mem::take(&mut v.rows);
                        v.rows = all.into_iter().enumerate().filter(|(i, _)| rows.contains(i)).map(|(_, r)| r).collect();
                    }
                }
                let mut ren = Renumber { map: Vec::new() };
                let _ = stmt.visit(&mut ren);
                let row_id_text: Vec<String> = rows.iter().filter_map(|i| row_ids[*i].clone()).collect();
                let times: Vec<String> = rows.iter().filter_map(|i| row_time[*i].clone()).collect();
                let template = Template::parse(&stmt.to_string());
                let (sql, extra) = if bound {
                    let (id_holes, time_holes, extra) = holes(ren.map.len(), &row_id_text, times.len());
                    (template.render(&rule.physical(month), None, &id_holes, &time_holes), extra)
                } else {
                    (template.render(&rule.physical(month), None, &row_id_text, &times), Vec::new())
                };
                let params = if params.is_empty() && ren.map.is_empty() { None } else { Some(ren.map) };
                out.push(Target { shard, months: vec![month], sql: sql.into(), params, extra });
            }
            out
        };
        // which target each VALUES row went to (so RETURNING rows can be put back in row order)
        let row_targets = if targets.len() > 1 { keys.iter().map(|k| order.iter().position(|o| o == k).unwrap_or(0)).collect() } else { Vec::new() };
        let logical = Some(self.template.render(&rule.name, None, &id_text, &time_text));
        Ok(Plan::Routed(Box::new(Routed { kind: RoutedKind::Insert, table: rule.name.clone(), targets, merge: None, generated_ids: ids, row_targets, logical, lookup_rows })))
    }
}

/// Whether a `U&"…"` identifier in `sql` may spell a sharded table's name
/// (its escapes decoded, as PostgreSQL decodes them); a `UESCAPE` clause is
/// not decoded and counts as may.
fn unicode_names_sharded(sql: &str, topo: &Topology) -> bool {
    let b = sql.as_bytes();
    if !crate::lexer::contains_ignore_case(b, b"u&\"") {
        return false;
    }
    if crate::lexer::contains_ignore_case(b, b"uescape") {
        return true;
    }
    let mut i = 0;
    while i + 3 <= b.len() {
        if !(b[i].eq_ignore_ascii_case(&b'u') && b[i + 1] == b'&' && b[i + 2] == b'"') {
            i += 1;
            continue;
        }
        let mut j = i + 3;
        let mut raw = String::new();
        while j < b.len() {
            if b[j] == b'"' {
                if b.get(j + 1) == Some(&b'"') {
                    raw.push('"');
                    j += 2;
                    continue;
                }
                break;
            }
            let ch = sql[j..].chars().next().unwrap_or('\0');
            raw.push(ch);
            j += ch.len_utf8().max(1);
        }
        let name = decode_unicode_escapes(&raw);
        if name.as_deref().is_none_or(|n| topo.tables.iter().any(|t| t.name == n)) {
            return true;
        }
        i = j + 1;
    }
    false
}

/// `\XXXX`, `\+XXXXXX` and `\\` of a `U&` literal; `None` when malformed.
fn decode_unicode_escapes(raw: &str) -> Option<String> {
    let mut out = String::new();
    let mut it = raw.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let digits = match it.peek() {
            Some('\\') => {
                it.next();
                out.push('\\');
                continue;
            }
            Some('+') => {
                it.next();
                6
            }
            _ => 4,
        };
        let hex: String = (0..digits).filter_map(|_| it.next()).collect();
        let v = u32::from_str_radix(&hex, 16).ok().filter(|_| hex.len() == digits)?;
        out.push(char::from_u32(v)?);
    }
    Some(out)
}
