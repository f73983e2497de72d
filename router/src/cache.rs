//! Which statements the merchant-info cache may answer, and which keys a write
//! invalidates. Pure: the proxy asks, then looks keys up or drops them.
//!
//! A *point read* is exactly `SELECT <columns | *> FROM <table> [[AS] alias]
//! WHERE <key> = <literal | $n>`: plain column references only (no functions,
//! no aggregates, no special values such as `current_user`), nothing after the
//! WHERE. Its answer depends only on the row(s) with that key, so the bytes
//! PostgreSQL sent once can be sent again until the key is written.
//!
//! Writes are classified conservatively: when the keys a statement touches
//! cannot be read from its text (`UPDATE … WHERE name = 'x'`, `INSERT …
//! SELECT`, DDL, COPY, anything unparsable that names the table) the whole
//! table is invalidated.

use sqlparser::ast::{
    AssignmentTarget, BinaryOperator, Expr, FromTable, Ident, OnConflictAction, OnInsert, SelectItem, SetExpr,
    Statement, TableFactor, TableObject, UnaryOperator, Value,
};

use crate::extract::{placeholder_index, src_of, Src};
use crate::rewrite::{is_table, object_base};

/// A table served through the cache: its name and key column (lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedTable {
    pub name: String,
    pub key: String,
}

/// A key as written in the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyArg {
    /// A numeric literal, as written (`42`, `-7`, `4.0`).
    Number(String),
    /// A string literal.
    Text(String),
    /// `$n` (0-based).
    Param(usize),
    /// NULL: matches nothing.
    Null,
}

/// A cacheable point read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRead {
    /// Index into the configured tables.
    pub table: usize,
    pub key: KeyArg,
    /// The statement with its key value replaced by `$?`: reads of different
    /// keys with one shape share a RowDescription.
    pub shape: String,
}

/// What a write does to one cached table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteEffect {
    pub table: usize,
    /// The keys written; `None` = any key (invalidate the whole table).
    pub keys: Option<Vec<KeyArg>>,
}

/// The cache's view of a statement text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheAnalysis {
    /// Set when the text is one cacheable point read.
    pub read: Option<PointRead>,
    /// Cached tables the text may write.
    pub writes: Vec<WriteEffect>,
}

/// True when `sql` names a cached table as a word (outside quotes and comments).
pub fn mentions(sql: &str, tables: &[CachedTable]) -> Vec<usize> {
    let mut found = Vec::new();
    for t in crate::lexer::tokens(sql) {
        if let crate::lexer::Token::Word(w) = t {
            if let Some(i) = tables.iter().position(|c| w.eq_ignore_ascii_case(&c.name)) {
                if !found.contains(&i) {
                    found.push(i);
                }
            }
        }
    }
    // a quoted name ("t_merchant") is also the table
    for (i, c) in tables.iter().enumerate() {
        if !found.contains(&i) && sql.contains(&format!("\"{}\"", c.name)) {
            found.push(i);
        }
    }
    found
}

/// A literal taken out of a statement text by [`normalize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    Number(String),
    Text(String),
}

/// Placeholders standing for literals in a normalized text are `$1001`, `$1002`, …
pub const LITERAL_BASE: usize = 1000;

/// Replaces the numeric and plain string literals of a statement text by
/// placeholders (`$1001`, `$1002`, … in order), so texts that differ only in
/// their values share one classification. `None` for texts this simple scan
/// does not handle (parameters, dollar quotes, escape strings, comments,
/// prefixed strings): classify those in full.
pub fn normalize(sql: &str) -> Option<(String, Vec<Literal>)> {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 8);
    let mut lits = Vec::new();
    let mut i = 0;
    let mut last = 0;
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    while i < b.len() {
        let c = b[i];
        match c {
            b'$' | b'\\' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => return None,
            b'/' if b.get(i + 1) == Some(&b'*') => return None,
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                if i >= b.len() {
                    return None;
                }
                i += 1;
            }
            b'\'' => {
                // a string right after a word is prefixed (E'', B'', DATE '' is fine but rare): full path
                if i > 0 && word(b[i - 1]) {
                    return None;
                }
                let start = i;
                let mut text = String::new();
                i += 1;
                let mut seg = i;
                loop {
                    if i >= b.len() {
                        return None;
                    }
                    if b[i] == b'\'' {
                        text.push_str(sql.get(seg..i)?);
                        if b.get(i + 1) == Some(&b'\'') {
                            text.push('\'');
                            i += 2;
                            seg = i;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
                out.push_str(sql.get(last..start)?);
                lits.push(Literal::Text(text));
                out.push_str(&format!("${}", LITERAL_BASE + lits.len()));
                last = i;
            }
            c if c.is_ascii_digit() && (i == 0 || !word(b[i - 1])) => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                    i += 1;
                }
                if i < b.len() && word(b[i]) {
                    return None;
                }
                out.push_str(sql.get(last..start)?);
                lits.push(Literal::Number(sql.get(start..i)?.to_string()));
                out.push_str(&format!("${}", LITERAL_BASE + lits.len()));
                last = i;
            }
            c if word(c) => {
                while i < b.len() && (word(b[i]) || b[i] == b'$') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(sql.get(last..)?);
    Some((out, lits))
}

/// The key of a point read classified from a normalized text, from its literals.
pub fn literal_key(read: &PointRead, literals: &[Literal]) -> Option<KeyArg> {
    match &read.key {
        KeyArg::Param(p) if *p >= LITERAL_BASE => match literals.get(p - LITERAL_BASE)? {
            Literal::Number(n) => Some(KeyArg::Number(n.clone())),
            Literal::Text(t) => Some(KeyArg::Text(t.clone())),
        },
        _ => None,
    }
}

/// Classifies a statement text (possibly several statements).
pub fn classify(sql: &str, tables: &[CachedTable]) -> CacheAnalysis {
    let named = mentions(sql, tables);
    if named.is_empty() {
        return CacheAnalysis::default();
    }
    let whole = |ts: &[usize]| ts.iter().map(|&table| WriteEffect { table, keys: None }).collect::<Vec<_>>();
    let stmts = match crate::analyze::parse(sql) {
        Ok(s) => s,
        // too deep to parse, or not parsed: the server has the full grammar, and
        // whatever this is, it may write the table
        Err(_) => return CacheAnalysis { read: None, writes: whole(&named) },
    };
    let mut out = CacheAnalysis::default();
    let single = stmts.len() == 1;
    for s in &stmts {
        let here = mentions(&s.to_string(), tables);
        if here.is_empty() {
            continue;
        }
        match s {
            Statement::Query(q) => {
                if single {
                    out.read = point_read(s, tables);
                }
                if modifying_cte(q) {
                    out.writes.extend(whole(&here));
                }
            }
            Statement::Insert(ins) => {
                if let Some(t) = target_table(&ins.table, tables) {
                    out.writes.push(WriteEffect { table: t, keys: insert_keys(ins, &tables[t]) });
                }
                if let Some(q) = &ins.source {
                    if modifying_cte(q) {
                        out.writes.extend(whole(&here));
                    }
                }
            }
            Statement::Update(u) => {
                let t = match &u.table.relation {
                    TableFactor::Table { name, .. } if u.table.joins.is_empty() => tables.iter().position(|c| is_table(name, &c.name)),
                    _ => None,
                };
                // (UPDATE other_table … FROM t_merchant only reads it)
                if let Some(t) = t {
                    let key = &tables[t].key;
                    let moves_key = u.assignments.iter().any(|a| match &a.target {
                        AssignmentTarget::ColumnName(n) => object_base(n).as_deref() == Some(key.as_str()),
                        AssignmentTarget::Tuple(ns) => ns.iter().any(|n| object_base(n).as_deref() == Some(key.as_str())),
                    });
                    let keys = if moves_key || u.from.is_some() { None } else { u.selection.as_ref().and_then(|w| where_keys(w, key)) };
                    out.writes.push(WriteEffect { table: t, keys });
                }
            }
            Statement::Delete(d) => {
                let from = match &d.from {
                    FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f) => f,
                };
                let t = match from.as_slice() {
                    [twj] if twj.joins.is_empty() && d.tables.is_empty() => match &twj.relation {
                        TableFactor::Table { name, .. } => tables.iter().position(|c| is_table(name, &c.name)),
                        _ => None,
                    },
                    _ => None,
                };
                match t {
                    Some(t) => {
                        let keys = if d.using.is_some() { None } else { d.selection.as_ref().and_then(|w| where_keys(w, &tables[t].key)) };
                        out.writes.push(WriteEffect { table: t, keys });
                    }
                    None if from.iter().any(|f| matches!(&f.relation, TableFactor::Table { name, .. } if tables.iter().any(|c| is_table(name, &c.name)))) => {
                        out.writes.extend(whole(&here))
                    }
                    None => {}
                }
            }
            // DDL, COPY, TRUNCATE, EXPLAIN ANALYZE, CALL, …: anything may change
            _ => out.writes.extend(whole(&here)),
        }
    }
    out.writes.dedup();
    out
}

fn target_table(t: &TableObject, tables: &[CachedTable]) -> Option<usize> {
    match t {
        TableObject::TableName(n) => tables.iter().position(|c| is_table(n, &c.name)),
        _ => None,
    }
}

/// A WITH clause holding INSERT/UPDATE/DELETE writes whatever it names.
fn modifying_cte(q: &sqlparser::ast::Query) -> bool {
    q.with.as_ref().is_some_and(|w| w.cte_tables.iter().any(|c| !matches!(c.query.body.as_ref(), SetExpr::Select(_) | SetExpr::Values(_) | SetExpr::Query(_))))
}

fn insert_keys(ins: &sqlparser::ast::Insert, table: &CachedTable) -> Option<Vec<KeyArg>> {
    let pos = ins.columns.iter().position(|c| object_base(c).as_deref() == Some(table.key.as_str()))?;
    if let Some(OnInsert::OnConflict(oc)) = &ins.on {
        if let OnConflictAction::DoUpdate(_) = &oc.action {
            // DO UPDATE on another unique column changes a row with another key
            let on_key = match &oc.conflict_target {
                Some(sqlparser::ast::ConflictTarget::Columns(cols)) => cols.len() == 1 && ident_is(&cols[0], &table.key),
                _ => false,
            };
            if !on_key {
                return None;
            }
        }
    }
    let SetExpr::Values(v) = ins.source.as_ref()?.body.as_ref() else { return None };
    v.rows.iter().map(|row| row.get(pos).and_then(write_value)).collect()
}

fn ident_is(i: &Ident, name: &str) -> bool {
    if i.quote_style.is_some() {
        i.value == name
    } else {
        i.value.eq_ignore_ascii_case(name)
    }
}

/// A written value: a literal or parameter, seen through casts.
fn write_value(e: &Expr) -> Option<KeyArg> {
    Some(match src_of(e)? {
        Src::Int(i) => KeyArg::Number(i.to_string()),
        Src::Number(n) => KeyArg::Number(n),
        Src::Text(t) => KeyArg::Text(t),
        Src::Null => KeyArg::Null,
        Src::Param(p) => KeyArg::Param(p),
        // a value the cache cannot read: treated as no known key
        Src::Opaque | Src::Civil(..) => return None,
    })
}

fn is_key_column(e: &Expr, key: &str) -> bool {
    match e {
        Expr::Nested(x) => is_key_column(x, key),
        Expr::Identifier(i) => ident_is(i, key),
        Expr::CompoundIdentifier(parts) => parts.last().is_some_and(|i| ident_is(i, key)),
        _ => false,
    }
}

/// The keys a WHERE clause restricts a write to; `None` when it may match any key.
fn where_keys(e: &Expr, key: &str) -> Option<Vec<KeyArg>> {
    match e {
        Expr::Nested(x) => where_keys(x, key),
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => where_keys(left, key).or_else(|| where_keys(right, key)),
        Expr::BinaryOp { left, op: BinaryOperator::Or, right } => {
            let mut l = where_keys(left, key)?;
            l.extend(where_keys(right, key)?);
            Some(l)
        }
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => {
            if is_key_column(left, key) {
                write_value(right).map(|v| vec![v])
            } else if is_key_column(right, key) {
                write_value(left).map(|v| vec![v])
            } else {
                None
            }
        }
        Expr::InList { expr, list, negated: false } if is_key_column(expr, key) => list.iter().map(write_value).collect(),
        _ => None,
    }
}

/// SQL value functions that look like column names but are not stable.
const SPECIAL_WORDS: &[&str] = &[
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "current_user",
    "session_user",
    "user",
    "current_role",
    "current_catalog",
    "current_schema",
    "system_user",
];

fn plain_column(i: &Ident) -> bool {
    i.quote_style.is_some() || !SPECIAL_WORDS.iter().any(|w| i.value.eq_ignore_ascii_case(w))
}

/// A read-side key: a literal or `$n`, no casts (a cast may change the comparison).
fn read_value(e: &Expr) -> Option<KeyArg> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, false) => Some(KeyArg::Number(n.clone())),
            Value::SingleQuotedString(s) => Some(KeyArg::Text(s.clone())),
            Value::Null => Some(KeyArg::Null),
            Value::Placeholder(p) => placeholder_index(p).map(KeyArg::Param),
            _ => None,
        },
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, false) => Some(KeyArg::Number(format!("-{n}"))),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

fn point_read(s: &Statement, tables: &[CachedTable]) -> Option<PointRead> {
    let Statement::Query(q) = s else { return None };
    let SetExpr::Select(sel) = q.body.as_ref() else { return None };
    let [twj] = sel.from.as_slice() else { return None };
    if !twj.joins.is_empty() {
        return None;
    }
    let TableFactor::Table { name, alias, args: None, with_hints, version: None, with_ordinality: false, partitions, json_path: None, sample: None, index_hints } =
        &twj.relation
    else {
        return None;
    };
    if !with_hints.is_empty() || !partitions.is_empty() || !index_hints.is_empty() || alias.as_ref().is_some_and(|a| !a.columns.is_empty()) {
        return None;
    }
    let table = tables.iter().position(|c| is_table(name, &c.name))?;
    let key = &tables[table].key;
    // every qualifier must be the table's own name or alias
    let quals: Vec<String> = match alias {
        Some(a) => vec![a.name.value.to_lowercase()],
        None => vec![object_base(name)?],
    };
    let qual_ok = |parts: &[Ident]| parts.len() == 2 && quals.contains(&parts[0].value.to_lowercase()) && plain_column(&parts[1]);
    let column_ok = |e: &Expr| match e {
        Expr::Identifier(i) => plain_column(i),
        Expr::CompoundIdentifier(parts) => qual_ok(parts),
        _ => false,
    };
    for item in &sel.projection {
        let ok = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => column_ok(e),
            SelectItem::Wildcard(_) => true,
            SelectItem::QualifiedWildcard(sqlparser::ast::SelectItemQualifiedWildcardKind::ObjectName(n), _) => {
                n.0.len() == 1 && object_base(n).is_some_and(|b| quals.contains(&b))
            }
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    let Some(Expr::BinaryOp { left, op: BinaryOperator::Eq, right }) = &sel.selection else { return None };
    let key_side = |e: &Expr| match e {
        Expr::Identifier(i) => ident_is(i, key),
        Expr::CompoundIdentifier(parts) => qual_ok(parts) && ident_is(&parts[1], key),
        _ => false,
    };
    let (value_expr, value) = if key_side(left) {
        (right.as_ref(), read_value(right)?)
    } else if key_side(right) {
        (left.as_ref(), read_value(left)?)
    } else {
        return None;
    };
    // nothing else may be in the statement: rebuild its canonical form from the
    // parts checked above and compare with the whole statement as printed
    let projection: Vec<String> = sel.projection.iter().map(|p| p.to_string()).collect();
    let relation = twj.relation.to_string();
    let selection = sel.selection.as_ref()?.to_string();
    let canonical = format!("SELECT {} FROM {relation} WHERE {selection}", projection.join(", "));
    let printed = s.to_string();
    if printed != canonical {
        return None;
    }
    let shape = if std::ptr::eq(left.as_ref(), value_expr) {
        format!("SELECT {} FROM {relation} WHERE $? = {right}", projection.join(", "))
    } else {
        format!("SELECT {} FROM {relation} WHERE {left} = $?", projection.join(", "))
    };
    Some(PointRead { table, key: value, shape })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Vec<CachedTable> {
        vec![CachedTable { name: "t_merchant".into(), key: "merchant_id".into() }]
    }

    fn read(sql: &str) -> Option<PointRead> {
        classify(sql, &tables()).read
    }

    fn writes(sql: &str) -> Vec<WriteEffect> {
        classify(sql, &tables()).writes
    }

    fn keys(sql: &str) -> Option<Vec<KeyArg>> {
        let w = writes(sql);
        assert_eq!(w.len(), 1, "{sql}: {w:?}");
        w[0].keys.clone()
    }

    #[test]
    fn point_reads_are_recognised() {
        let r = read("SELECT * FROM t_merchant WHERE merchant_id = 42").expect("point read");
        assert_eq!(r.key, KeyArg::Number("42".into()));
        assert_eq!(r.shape, "SELECT * FROM t_merchant WHERE merchant_id = $?");
        let r = read("select name, m.status AS s from public.t_merchant m where m.merchant_id = $1;").expect("point read");
        assert_eq!(r.key, KeyArg::Param(0));
        assert_eq!(read("SELECT name FROM t_merchant WHERE '7' = merchant_id").expect("point read").key, KeyArg::Text("7".into()));
        assert_eq!(read("SELECT name FROM t_merchant WHERE merchant_id = -3").expect("point read").key, KeyArg::Number("-3".into()));
        // one shape for every key
        assert_eq!(read("SELECT * FROM t_merchant WHERE merchant_id = 1").map(|r| r.shape), read("SELECT * FROM t_merchant WHERE merchant_id = 99").map(|r| r.shape));
    }

    #[test]
    fn anything_more_is_not_a_point_read() {
        for sql in [
            "SELECT count(*) FROM t_merchant WHERE merchant_id = 1",
            "SELECT now(), name FROM t_merchant WHERE merchant_id = 1",
            "SELECT current_user FROM t_merchant WHERE merchant_id = 1",
            "SELECT name FROM t_merchant WHERE merchant_id = 1 LIMIT 1",
            "SELECT name FROM t_merchant WHERE merchant_id = 1 ORDER BY name",
            "SELECT name FROM t_merchant WHERE merchant_id = 1 FOR UPDATE",
            "SELECT DISTINCT name FROM t_merchant WHERE merchant_id = 1",
            "SELECT name FROM t_merchant WHERE merchant_id = 1 AND status = 1",
            "SELECT name FROM t_merchant WHERE merchant_id > 1",
            "SELECT name FROM t_merchant WHERE merchant_id = $1::bigint",
            "SELECT name FROM t_merchant WHERE merchant_id = 1 + 1",
            "SELECT name FROM t_merchant, t_other WHERE merchant_id = 1",
            "SELECT name FROM t_merchant JOIN t_other USING (merchant_id) WHERE merchant_id = 1",
            "SELECT name FROM other.t_merchant WHERE merchant_id = 1",
            "SELECT o.name FROM t_merchant m WHERE m.merchant_id = 1",
            "SELECT name FROM t_merchant WHERE merchant_id = 1; SELECT 1",
            "WITH x AS (SELECT 1) SELECT name FROM t_merchant WHERE merchant_id = 1",
            "SELECT name FROM t_merchant WHERE name = 'x'",
            "SELECT (SELECT 1), name FROM t_merchant WHERE merchant_id = 1",
            "SELECT name FROM t_merchant WHERE merchant_id = 1 UNION SELECT 'x'",
        ] {
            assert_eq!(read(sql), None, "{sql}");
        }
    }

    #[test]
    fn reads_write_nothing() {
        assert!(writes("SELECT * FROM t_merchant WHERE merchant_id = 1").is_empty());
        assert!(writes("SELECT * FROM t_merchant WHERE name LIKE 'a%' FOR UPDATE").is_empty());
        assert!(writes("SELECT 1").is_empty());
        assert!(writes("UPDATE t_order SET amount = 1 FROM t_merchant WHERE t_order.merchant_id = t_merchant.merchant_id").is_empty());
        assert!(writes("SELECT 't_merchant'").is_empty());
    }

    #[test]
    fn written_keys_are_read_from_the_statement() {
        assert_eq!(keys("UPDATE t_merchant SET name = 'x' WHERE merchant_id = 5"), Some(vec![KeyArg::Number("5".into())]));
        assert_eq!(keys("UPDATE t_merchant SET name = $2 WHERE merchant_id = $1::bigint AND status = 1"), Some(vec![KeyArg::Param(0)]));
        assert_eq!(
            keys("DELETE FROM t_merchant WHERE merchant_id IN (1, 2) OR merchant_id = '3'"),
            Some(vec![KeyArg::Number("1".into()), KeyArg::Number("2".into()), KeyArg::Text("3".into())])
        );
        assert_eq!(
            keys("INSERT INTO t_merchant (merchant_id, name) VALUES (7, 'a'), ($1, 'b') ON CONFLICT DO NOTHING"),
            Some(vec![KeyArg::Number("7".into()), KeyArg::Param(0)])
        );
        assert_eq!(
            keys("INSERT INTO t_merchant (merchant_id, name) VALUES (7, 'a') ON CONFLICT (merchant_id) DO UPDATE SET name = excluded.name"),
            Some(vec![KeyArg::Number("7".into())])
        );
    }

    #[test]
    fn unknown_keys_invalidate_the_table() {
        for sql in [
            "UPDATE t_merchant SET name = 'x' WHERE name = 'y'",
            "UPDATE t_merchant SET merchant_id = 9 WHERE merchant_id = 5",
            "UPDATE t_merchant SET status = 0",
            "DELETE FROM t_merchant WHERE merchant_id = 1 OR name = 'a'",
            "INSERT INTO t_merchant SELECT * FROM staging",
            "INSERT INTO t_merchant (name) VALUES ('x')",
            "INSERT INTO t_merchant (merchant_id, name) VALUES (7, 'a') ON CONFLICT (name) DO UPDATE SET status = 1",
            "TRUNCATE t_merchant",
            "ALTER TABLE t_merchant ADD COLUMN x int",
            "COPY t_merchant FROM STDIN",
            "WITH d AS (DELETE FROM t_merchant RETURNING *) SELECT count(*) FROM d",
            "EXPLAIN ANALYZE UPDATE t_merchant SET status = 1 WHERE merchant_id = 1",
            "this is not sql about t_merchant",
        ] {
            assert_eq!(keys(sql), None, "{sql}");
        }
    }

    #[test]
    fn normalized_texts_share_a_classification() {
        let (n, lits) = normalize("SELECT * FROM t_merchant WHERE merchant_id = 42").expect("simple");
        assert_eq!(n, "SELECT * FROM t_merchant WHERE merchant_id = $1001");
        assert_eq!(lits, vec![Literal::Number("42".into())]);
        let r = read(&n).expect("point read");
        assert_eq!(literal_key(&r, &lits), Some(KeyArg::Number("42".into())));
        assert_eq!(r.shape, read("SELECT * FROM t_merchant WHERE merchant_id = 7").expect("read").shape);
        let (n, lits) = normalize("select name from t_merchant m2 where m2.merchant_id = 'it''s'").expect("simple");
        assert_eq!(n, "select name from t_merchant m2 where m2.merchant_id = $1001");
        assert_eq!(lits, vec![Literal::Text("it's".into())]);
        // words with digits are not literals; what the scan does not handle goes the full way
        assert_eq!(normalize("SELECT c1 FROM t2 WHERE x = 1.5").map(|(n, _)| n).as_deref(), Some("SELECT c1 FROM t2 WHERE x = $1001"));
        for sql in ["SELECT $1", "SELECT E'a'", "SELECT 1 -- c", "SELECT /* c */ 1", "SELECT 'unterminated", "SELECT 1e5", "SELECT $$a$$", "SELECT \"x"] {
            assert_eq!(normalize(sql), None, "{sql}");
        }
        // a literal elsewhere than the key keeps the statement from being a point read
        let (n, _) = normalize("SELECT 1, name FROM t_merchant WHERE merchant_id = 2").expect("simple");
        assert_eq!(read(&n), None);
    }

    #[test]
    fn several_statements_collect_every_write() {
        let a = classify("BEGIN; UPDATE t_merchant SET name = 'a' WHERE merchant_id = 1; DELETE FROM t_merchant WHERE merchant_id = 2; COMMIT", &tables());
        assert_eq!(a.read, None);
        assert_eq!(a.writes.len(), 2);
    }
}
