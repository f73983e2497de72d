//! The one quoting helper for SQL the proxy builds from data: a value becomes
//! exactly one string literal, a name exactly one identifier, whatever they
//! hold. Both assume `standard_conforming_strings = on`, which shardgate
//! enforces on every connection (a backslash is an ordinary character).
//! Property-tested (tests/sql_building.rs) and fuzzed (`fuzz/sqlbuild`): the
//! output never parses as more than the one intended token.

/// `'…'` with every `'` doubled. A NUL byte cannot be part of PostgreSQL text:
/// it is kept, and the server refuses the literal (no statement runs).
pub fn literal(value: &str) -> String {
    quoted(value, '\'')
}

/// `"…"` with every `"` doubled (the name keeps its case).
pub fn ident(name: &str) -> String {
    quoted(name, '"')
}

/// `text` between two `q`, every `q` inside doubled.
fn quoted(text: &str, q: char) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push(q);
    for c in text.chars() {
        if c == q {
            out.push(q);
        }
        out.push(c);
    }
    out.push(q);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled_and_nothing_else_changes() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\\'; DROP TABLE x; --"), "'a\\''; DROP TABLE x; --'");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}
