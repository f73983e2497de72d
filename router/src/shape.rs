//! Simple-protocol statements planned without parsing them again.
//!
//! A simple-protocol client sends its values as literals, so the same
//! statement arrives with new text each time. [`shape`] replaces the literals
//! that stand in a value position by placeholders `$1 … $n`; the text left
//! (the shape) is the same from one execution to the next, and its analysis
//! is cached like a prepared statement's. The literals are given to the plan
//! as [`crate::Param::Literal`], which the router reads exactly as it reads the
//! same literal in the text. [`splice`] then puts the client's literal text
//! back into each target's SQL, so PostgreSQL reads every literal as the
//! client wrote it (no change of typing).
//!
//! Only literals whose meaning cannot depend on the placeholder are taken:
//! standard strings `'…'` and dollar-quoted strings, and integers that fit a
//! bigint, right after a comparison operator (`=`, `<`, `>`, `<=`, `>=`,
//! `<>`, `!=`), `BETWEEN … AND`, or as an item of a `VALUES` row or an
//! `IN (…)` list (integers also after `LIMIT` and `OFFSET`), and followed by
//! nothing that would extend them (a cast `::`, an operator, a subscript,
//! `COLLATE`, another string) or touch them (`'x'FROM`). Everything else (decimals, negative numbers, `E''`, `U&''`,
//! `B''`, typed literals such as `DATE '…'`, `ORDER BY 1`, select-list
//! constants) stays in the shape as written. A statement with `$n`
//! placeholders, or several statements, is not shaped.

use crate::topology::Param;

/// One literal taken out of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Literal {
    /// Byte range of the literal as written in the statement.
    pub span: std::ops::Range<usize>,
    /// Its value: a string's content (quotes undone), or the integer's digits.
    pub value: String,
    /// An integer (else a string).
    pub integer: bool,
}

/// A statement's shape and the literals taken out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shaped {
    /// The statement with each taken literal replaced by `$k` (k = its place).
    pub shape: String,
    /// The literals, in order: `$k` is `literals[k - 1]`.
    pub literals: Vec<Literal>,
}

impl Shaped {
    /// The literals as parameters of the shape's plan.
    pub fn params(&self) -> Vec<Param<'_>> {
        self.literals.iter().map(|l| Param::Literal { value: &l.value, integer: l.integer }).collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev {
    /// A comparison operator.
    Cmp,
    /// The AND of a BETWEEN.
    Takes,
    /// LIMIT or OFFSET: an integer only (a string there is not read as the
    /// full parse reads it).
    Limit,
    /// `VALUES`.
    Values,
    /// `IN`.
    In,
    /// `BETWEEN` (its AND takes a value too).
    Between,
    Open,
    Comma,
    /// A literal (a string next to it would continue it).
    Literal,
    Other,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Paren {
    /// A row of VALUES or an IN list: its items are values.
    Items,
    Other,
}

/// Words that may follow a taken literal.
const FOLLOWERS: &[&str] = &[
    "and", "or", "limit", "offset", "order", "group", "having", "returning", "for", "where", "from", "union", "except", "intersect", "on", "then", "else", "end", "when",
];

fn is_op(c: u8) -> bool {
    matches!(c, b'+' | b'-' | b'*' | b'/' | b'<' | b'>' | b'=' | b'~' | b'!' | b'@' | b'#' | b'%' | b'^' | b'&' | b'|' | b'`' | b'?')
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// May a literal ending at `end` be taken, judging by what follows it?
/// (Nothing may touch it: `'x'FROM` would become the placeholder `$1FROM`.)
fn free_after(b: &[u8], mut end: usize) -> bool {
    if b.get(end).is_some_and(|c| is_word(*c) || *c == b'\'' || *c == b'"') {
        return false;
    }
    loop {
        while end < b.len() && b[end].is_ascii_whitespace() {
            end += 1;
        }
        match crate::lexer::comment_end(b, end) {
            Some(e) => end = e,
            None => break,
        }
    }
    match b.get(end) {
        None | Some(b')' | b',' | b';') => true,
        Some(c) if c.is_ascii_alphabetic() => {
            let start = end;
            while end < b.len() && is_word(b[end]) {
                end += 1;
            }
            let w = std::str::from_utf8(&b[start..end]).unwrap_or("");
            FOLLOWERS.iter().any(|f| f.eq_ignore_ascii_case(w))
        }
        _ => false,
    }
}

/// The shape of `sql` and its literals; `None` when the statement is not
/// shaped (placeholders, several statements, a number glued to a word).
pub fn shape(sql: &str) -> Option<Shaped> {
    let b = sql.as_bytes();
    let mut literals = Vec::new();
    let (mut prev, mut parens, mut values_at) = (Prev::Other, Vec::<Paren>::new(), None::<usize>);
    // the parenthesis depth of a BETWEEN whose AND is still to come
    let mut between_at = None::<usize>;
    let mut i = 0;
    while i < b.len() {
        if let Some(end) = crate::lexer::comment_end(b, i) {
            i = end;
            continue;
        }
        let c = b[i];
        let takes_value = |prev: Prev, parens: &[Paren]| match prev {
            Prev::Cmp | Prev::Takes | Prev::Between => true,
            Prev::Limit => false,
            Prev::Open | Prev::Comma => parens.last() == Some(&Paren::Items),
            _ => false,
        };
        match c {
            _ if c.is_ascii_whitespace() => i += 1,
            b'\'' => {
                let end = crate::lexer::skip_quoted(b, i + 1, b'\'', false);
                if end > b.len() || b.get(end - 1) != Some(&b'\'') || end == i + 1 {
                    return None; // unterminated
                }
                if takes_value(prev, &parens) && free_after(b, end) {
                    let value = sql.get(i + 1..end - 1)?.replace("''", "'");
                    literals.push(Literal { span: i..end, value, integer: false });
                }
                prev = Prev::Literal;
                i = end;
            }
            b'"' => {
                i = crate::lexer::skip_quoted(b, i + 1, b'"', false);
                prev = Prev::Other;
            }
            b'$' => {
                if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    return None; // a placeholder: not a simple-protocol text
                }
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                if b.get(j) != Some(&b'$') {
                    return None;
                }
                let tag = &b[i..=j];
                let body = j + 1;
                let close = b[body..].windows(tag.len()).position(|w| w == tag)? + body;
                let end = close + tag.len();
                if takes_value(prev, &parens) && free_after(b, end) {
                    literals.push(Literal { span: i..end, value: sql.get(body..close)?.to_string(), integer: false });
                }
                prev = Prev::Literal;
                i = end;
            }
            b'0'..=b'9' | b'.' if c != b'.' || b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                    i += 1;
                }
                if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                    i += 1;
                    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
                        i += 1;
                    }
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                if i < b.len() && is_word(b[i]) {
                    return None; // 1_000, 0x1F, 12abc: left to the full parse
                }
                let text = &sql[start..i];
                let integer = text.bytes().all(|d| d.is_ascii_digit()) && text.parse::<i64>().is_ok();
                if integer && (prev == Prev::Limit || takes_value(prev, &parens)) && free_after(b, i) {
                    literals.push(Literal { span: start..i, value: text.to_string(), integer: true });
                }
                prev = Prev::Literal;
            }
            b'(' => {
                let items = matches!(prev, Prev::In) || (matches!(prev, Prev::Values | Prev::Comma) && values_at == Some(parens.len()));
                parens.push(if items { Paren::Items } else { Paren::Other });
                prev = Prev::Open;
                i += 1;
            }
            b')' => {
                parens.pop();
                prev = Prev::Other;
                i += 1;
            }
            b',' => {
                prev = Prev::Comma;
                i += 1;
            }
            b';' => {
                if b[i + 1..].iter().any(|c| !c.is_ascii_whitespace()) {
                    return None; // several statements
                }
                i = b.len();
            }
            _ if is_op(c) => {
                let start = i;
                while i < b.len() && is_op(b[i]) && crate::lexer::comment_end(b, i).is_none() {
                    i += 1;
                }
                prev = match &sql[start..i] {
                    "=" | "<" | ">" | "<=" | ">=" | "<>" | "!=" => Prev::Cmp,
                    _ => Prev::Other,
                };
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len() && is_word(b[i]) {
                    i += 1;
                }
                if b.get(i) == Some(&b'\'') {
                    // E'…', U&'…' (with the &), B'…', X'…', N'…': a prefixed literal, kept
                    i = crate::lexer::skip_quoted(b, i + 1, b'\'', sql[start..i].eq_ignore_ascii_case("e"));
                    prev = Prev::Literal;
                    continue;
                }
                // (compared in place, not through a lowercase copy of every word)
                let w = &sql[start..i];
                let is = |k: &str| w.eq_ignore_ascii_case(k);
                if values_at == Some(parens.len()) && !is("values") {
                    values_at = None;
                }
                prev = if is("limit") || is("offset") {
                    Prev::Limit
                } else if is("values") {
                    values_at = Some(parens.len());
                    Prev::Values
                } else if is("in") {
                    Prev::In
                } else if is("between") {
                    between_at = Some(parens.len());
                    Prev::Between
                } else if is("and") && between_at == Some(parens.len()) {
                    // the AND of `BETWEEN x AND y` takes the upper value
                    between_at = None;
                    Prev::Takes
                } else {
                    Prev::Other
                };
            }
            _ => {
                prev = Prev::Other;
                i += 1;
            }
        }
    }
    let mut shape = String::with_capacity(sql.len());
    let mut at = 0;
    for (k, l) in literals.iter().enumerate() {
        shape.push_str(&sql[at..l.span.start]);
        shape.push('$');
        shape.push_str(&(k + 1).to_string());
        at = l.span.end;
    }
    shape.push_str(&sql[at..]);
    Some(Shaped { shape, literals })
}

/// A target's SQL with the client's literals put back in place of its
/// placeholders. `params` maps the target's `$j` to the statement's literal
/// (`None`: in order); placeholders after those stand for `extra` values the
/// router filled in (ids, times), written as string literals of unknown type.
/// `None` if a placeholder names no value.
pub fn splice(target: &str, params: Option<&[usize]>, extra: &[String], sql: &str, shaped: &Shaped) -> Option<String> {
    let n_client = params.map_or(shaped.literals.len(), <[usize]>::len);
    let b = target.as_bytes();
    let mut out = String::with_capacity(target.len() + 32);
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        if let Some(end) = crate::lexer::comment_end(b, i) {
            i = end;
            continue;
        }
        match b[i] {
            b'\'' => i = crate::lexer::skip_quoted(b, i + 1, b'\'', i > 0 && (b[i - 1] == b'e' || b[i - 1] == b'E') && (i < 2 || !is_word(b[i - 2]))),
            b'"' => i = crate::lexer::skip_quoted(b, i + 1, b'"', false),
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let start = i;
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let j: usize = target[start + 1..i].parse().ok()?;
                out.push_str(&target[copied..start]);
                if j >= 1 && j <= n_client {
                    let k = params.map_or(Some(j - 1), |p| p.get(j - 1).copied())?;
                    out.push_str(sql.get(shaped.literals.get(k)?.span.clone())?);
                } else {
                    let v = extra.get(j.checked_sub(n_client + 1)?)?;
                    out.push('\'');
                    out.push_str(&v.replace('\'', "''"));
                    out.push('\'');
                }
                copied = i;
            }
            b'$' => {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                if b.get(j) == Some(&b'$') {
                    let tag = &b[i..=j];
                    i = b[j + 1..].windows(tag.len()).position(|w| w == tag).map_or(b.len(), |p| j + 1 + p + tag.len());
                } else {
                    i += 1;
                }
            }
            c if is_word(c) => {
                while i < b.len() && is_word(b[i]) {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&target[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_of(sql: &str) -> (String, Vec<String>) {
        let s = shape(sql).expect("shaped");
        (s.shape.clone(), s.literals.iter().map(|l| sql[l.span.clone()].to_string()).collect())
    }

    #[test]
    fn values_in_value_positions_are_taken() {
        let (s, l) = shape_of("INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ('A-1', 7, 9.90, '2026-11-05 10:00+00'), ('B''x', 8, 1.00, now())");
        assert_eq!(s, "INSERT INTO t_order (order_no, merchant_id, order_amount, create_time) VALUES ($1, $2, 9.90, $3), ($4, $5, 1.00, now())");
        assert_eq!(l, ["'A-1'", "7", "'2026-11-05 10:00+00'", "'B''x'", "8"]);
        assert_eq!(shape("SELECT 1 FROM t_order WHERE order_no = 'B''x'").expect("s").literals[0].value, "B'x");
        let (s, _) = shape_of("select * from t_order where merchant_id = 5 and create_time >= '2026-11-01' and id in (1, 2, 3) order by 2 limit 10 offset 5");
        assert_eq!(s, "select * from t_order where merchant_id = $1 and create_time >= $2 and id in ($3, $4, $5) order by 2 limit $6 offset $7");
        let (s, _) = shape_of("UPDATE t_order SET pay_status = 'PAID' WHERE merchant_id = 3 AND create_time BETWEEN '2026-11-01' AND '2026-11-30'");
        assert_eq!(s, "UPDATE t_order SET pay_status = $1 WHERE merchant_id = $2 AND create_time BETWEEN $3 AND $4");
        let (s, _) = shape_of("SELECT 1 FROM t_order WHERE order_no = $tag$it's ; $1$tag$");
        assert_eq!(s, "SELECT 1 FROM t_order WHERE order_no = $1");
    }

    #[test]
    fn literals_whose_meaning_could_change_stay_in_the_shape() {
        for sql in [
            "SELECT 1, 'a' FROM t_order ORDER BY 1",
            "SELECT * FROM t_order WHERE merchant_id = -5",
            "SELECT * FROM t_order WHERE merchant_id = - -5",
            "SELECT * FROM t_order WHERE merchant_id = '5'::int",
            "SELECT * FROM t_order WHERE order_amount = 1.5",
            "SELECT * FROM t_order WHERE merchant_id = 5 + 1",
            "SELECT * FROM t_order WHERE order_no = E'a\\'b'",
            "SELECT * FROM t_order WHERE order_no = U&'d\\0061t'",
            "SELECT * FROM t_order WHERE create_time = DATE '2026-11-05'",
            "SELECT * FROM t_order WHERE create_time = TIMESTAMPTZ '2026-11-05 10:00+00'",
            "SELECT * FROM t_order WHERE order_no = 'a' 'b'",
            "SELECT * FROM t_order WHERE order_no = 'a' COLLATE \"C\"",
            "SELECT * FROM t_order WHERE merchant_id = 99999999999999999999",
            "SELECT * FROM t_order WHERE order_no = 'x' || 'y'",
            "SELECT * FROM t_order GROUP BY 1, 2",
            "SELECT id, order_no = 'A-1'FROM t_order",
            "SELECT id, order_no = $$x$$FROM t_order",
            "SELECT id, order_no = 'x'AND pay_status FROM t_order",
            "SELECT id FROM t_order ORDER BY id LIMIT '3'",
        ] {
            let s = shape(sql).expect("shaped");
            assert!(s.literals.is_empty() || sql.contains("'x' || 'y'") && s.literals.is_empty(), "{sql}: took {:?}", s.literals);
            assert_eq!(s.shape, sql);
        }
    }

    #[test]
    fn texts_it_does_not_shape() {
        for sql in ["SELECT * FROM t_order WHERE id = $1", "SELECT 1; SELECT 2", "SELECT * FROM t_order WHERE merchant_id = 1_000", "SELECT * FROM t_order WHERE x = 0x1F"] {
            assert!(shape(sql).is_none(), "{sql}");
        }
        // a trailing semicolon is one statement
        assert!(shape("SELECT * FROM t_order WHERE merchant_id = 1;  ").is_some());
    }

    #[test]
    fn splicing_puts_the_client_text_back() {
        let sql = "INSERT INTO t_order (order_no, merchant_id, create_time) VALUES ('A-1', 7, '2026-11-05'), ($q$B$q$, 8, now())";
        let s = shape(sql).expect("shaped");
        // a split target: the second row alone, renumbered, plus an id the router filled in
        let t = "INSERT INTO t_order_202611 (order_no, merchant_id, create_time, id) VALUES ($1, $2, now(), $3) /* '$9' */";
        let out = splice(t, Some(&[3, 4]), &["123".into()], sql, &s).expect("spliced");
        assert_eq!(out, "INSERT INTO t_order_202611 (order_no, merchant_id, create_time, id) VALUES ($q$B$q$, 8, now(), '123') /* '$9' */");
        assert!(splice("SELECT $6", None, &[], sql, &s).is_none(), "a placeholder naming nothing");
        assert_eq!(splice("SELECT '$1', $1", None, &[], sql, &s).as_deref(), Some("SELECT '$1', 'A-1'"));
    }
}
