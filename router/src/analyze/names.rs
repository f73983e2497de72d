//! Whether a statement names a sharded table, in any spelling (quoted,
//! `U&"…"` escapes, `ONLY`, `TABLE t`, a column of the same name).

use super::*;

/// Every sharded table the statement names anywhere (any statement kind).
pub(super) fn sharded_tables_named(s: &Statement, topo: &Topology) -> Vec<usize> {
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
pub(super) fn table_command_on_sharded(sql: &str, topo: &Topology) -> bool {
    crate::lexer::tokens(sql).windows(2).any(|w| match (&w[0], &w[1]) {
        (crate::lexer::Token::Word(a), crate::lexer::Token::Word(b)) => {
            a.eq_ignore_ascii_case("table") && topo.tables.iter().any(|r| b.eq_ignore_ascii_case(&r.name))
        }
        _ => false,
    })
}

/// True when every mention of a sharded table's name in `s` is a column or
/// other identifier inside an expression (not a table): nothing to route.
pub(super) fn names_only_as_column(s: &Statement, topo: &Topology) -> bool {
    // the printed statement keeps TABLE …; anything else mentioning the name is an identifier
    !table_command_on_sharded(&s.to_string(), topo)
}

pub(super) fn mentions_sharded_word(sql: &str, topo: &Topology) -> bool {
    crate::lexer::tokens(sql).iter().any(|t| match t {
        crate::lexer::Token::Word(w) => topo.tables.iter().any(|r| w.eq_ignore_ascii_case(&r.name)),
        _ => false,
    })
}

/// `ONLY t_order` (no child tables: the same rows as `t_order`) with ONLY
/// blanked out; sqlparser would read ONLY as a table named "only".
pub(super) fn without_only<'a>(sql: &'a str, topo: &Topology) -> std::borrow::Cow<'a, str> {
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

/// Whether a `U&"…"` identifier in `sql` may spell a sharded table's name
/// (its escapes decoded, as PostgreSQL decodes them); a `UESCAPE` clause is
/// not decoded and counts as may.
pub(super) fn unicode_names_sharded(sql: &str, topo: &Topology) -> bool {
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
pub(super) fn decode_unicode_escapes(raw: &str) -> Option<String> {
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
