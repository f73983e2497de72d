//! The one quoting helper for SQL the proxy builds from data: a value becomes
//! exactly one string literal, a name exactly one identifier, whatever they
//! hold. Both assume `standard_conforming_strings = on`, which shardgate
//! enforces on every connection (a backslash is an ordinary character).
//! Property-tested (tests/sql_building.rs) and fuzzed (`fuzz/sqlbuild`): the
//! output never parses as more than the one intended token.

/// `'…'` with every `'` doubled. A NUL byte cannot be part of PostgreSQL text:
/// it is kept, and the server refuses the literal (no statement runs).
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// `"…"` with every `"` doubled (the name keeps its case).
pub fn ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
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
