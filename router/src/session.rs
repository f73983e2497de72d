//! Which statements leave state behind in a server session. Under transaction
//! pooling a client that creates such state is pinned to its server connection
//! (the pgbouncer/pgdog rule), so nothing leaks to other clients.

use std::sync::LazyLock;

use aho_corasick::AhoCorasick;

use crate::lexer::{tokens, Token};

/// What a statement does to the server session beyond its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEffect {
    /// Nothing outlives the transaction.
    None,
    /// Leaves session state (SET, LISTEN, temp table, SQL PREPARE, WITH HOLD
    /// cursor, session advisory lock, LOAD): the client must keep its server.
    Pins(&'static str),
}

/// Every word that can make a statement pin holds one of these: SET, RESET,
/// set_config; LISTEN; LOAD; PREPARE, DEALLOCATE; DECLARE; TEMP, TEMPORARY; the advisory locks.
const PIN_HINTS: [&[u8]; 8] = [b"set", b"listen", b"load", b"prepare", b"deallocate", b"declare", b"temp", b"advisory"];

/// False when no statement in `sql` can pin: none of the words that pin occurs
/// anywhere in it. A byte scan, so the statements of a transaction-pooled
/// client skip the lexer unless they might pin.
pub fn may_pin(sql: &[u8]) -> bool {
    // one pass for all the words, not one scan per word
    static HINTS: LazyLock<AhoCorasick> =
        LazyLock::new(|| AhoCorasick::builder().ascii_case_insensitive(true).kind(Some(aho_corasick::AhoCorasickKind::DFA)).build(PIN_HINTS).expect("fixed ASCII patterns build"));
    HINTS.is_match(sql)
}

/// Classifies every statement in `sql` (a simple-query string may hold many);
/// the first one that pins decides.
pub fn session_effect(sql: &str) -> SessionEffect {
    if !may_pin(sql.as_bytes()) {
        return SessionEffect::None;
    }
    let toks = tokens(sql);
    for stmt in toks.split(|t| *t == Token::Semicolon) {
        if let Some(reason) = statement_pins(stmt) {
            return SessionEffect::Pins(reason);
        }
    }
    SessionEffect::None
}

/// How the statements the proxy prepares on server connections are named: a
/// client's own statements (renamed), routed statements' targets, and the
/// proxy's own statements. A client never gets to run, replace or drop them.
pub const PROXY_STATEMENT_PREFIXES: [&str; 3] = ["sg_", "sgr_", "sgc_"];

/// True when `sql` runs, prepares or drops (`EXECUTE`, `PREPARE`,
/// `DEALLOCATE`, also inside `EXPLAIN` and `CREATE TABLE AS`) a prepared
/// statement whose name starts with one of [`PROXY_STATEMENT_PREFIXES`]. A
/// pooled server connection holds the statements of every client that used it
/// and of the proxy itself (`pg_prepared_statements` lists them): run by
/// another client, the proxy's statement on its control tables would write
/// them with that client's values. Quoted names (`"sg_…"`, `U&"…"`) next to
/// one of the three words are refused too, without reading them.
pub fn names_proxy_statement(sql: &[u8]) -> bool {
    static WORDS: LazyLock<AhoCorasick> =
        LazyLock::new(|| AhoCorasick::builder().ascii_case_insensitive(true).build(["execute", "prepare", "deallocate"]).expect("fixed ASCII patterns build"));
    if !crate::lexer::contains_ignore_case(sql, b"sg") && !crate::lexer::contains_ignore_case(sql, b"u&\"") || !WORDS.is_match(sql) {
        return false;
    }
    let text = String::from_utf8_lossy(sql);
    let toks = tokens(&text);
    let verb = |t: Option<&Token<'_>>| is(t, "execute") || is(t, "prepare") || is(t, "deallocate");
    if !toks.iter().any(|t| verb(Some(t))) {
        return false;
    }
    let quoted = [&b"\"sg"[..], b"u&\""].iter().any(|q| crate::lexer::contains_ignore_case(sql, q));
    // (bytes: a word may hold a character of several bytes across a prefix's end)
    let reserved = |t: Option<&Token<'_>>| word(t).is_some_and(|w| PROXY_STATEMENT_PREFIXES.iter().any(|p| w.as_bytes().get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p.as_bytes()))));
    quoted
        || (0..toks.len()).any(|i| {
            let t = toks.get(i);
            verb(t) && (reserved(toks.get(i + 1)) || (is(toks.get(i + 1), "prepare") && reserved(toks.get(i + 2))))
        })
}

/// True when a statement of `sql` is `DISCARD ALL` or `DEALLOCATE [PREPARE]
/// ALL`: every prepared statement of the server session goes (comments, case
/// and spacing as PostgreSQL reads them).
pub fn drops_all_statements(sql: &[u8]) -> bool {
    // (run on every simple Query passed through: lex only texts that hold one of the verbs)
    if !crate::lexer::contains_ignore_case(sql, b"discard") && !crate::lexer::contains_ignore_case(sql, b"deallocate") {
        return false;
    }
    let text = String::from_utf8_lossy(sql);
    let toks = tokens(&text);
    toks.split(|t| *t == Token::Semicolon).any(|stmt| (is(stmt.first(), "discard") && is(stmt.get(1), "all")) || deallocates_all(stmt) == Some(true))
}

/// `DEALLOCATE [PREPARE] {name | ALL}`: `Some(true)` for ALL, `Some(false)`
/// for a name, `None` for any other statement.
fn deallocates_all(stmt: &[Token<'_>]) -> Option<bool> {
    if !is(stmt.first(), "deallocate") {
        return None;
    }
    let target = if is(stmt.get(1), "prepare") { stmt.get(2) } else { stmt.get(1) };
    Some(is(target, "all"))
}

/// The statement name of `sql` when it is exactly one `DEALLOCATE [PREPARE]
/// name`: an unquoted name folded to lower case as PostgreSQL folds it, a
/// quoted one as written with its doubled quotes undone. (psycopg 3 on a libpq
/// before 17 drops the statements it prepared through the protocol this way.)
pub fn deallocated_name(sql: &str) -> Option<String> {
    if !crate::lexer::contains_ignore_case(sql.as_bytes(), b"deallocate") {
        return None;
    }
    let toks = tokens(sql);
    let stmt = match toks.as_slice() {
        [s @ .., Token::Semicolon] => s,
        s => s,
    };
    let name = match stmt {
        [_, n] if deallocates_all(stmt) == Some(false) => n,
        [_, p, n] if is(Some(p), "prepare") && deallocates_all(stmt) == Some(false) => n,
        _ => return None,
    };
    match name {
        // PostgreSQL folds A-Z only
        Token::Word(w) => Some(w.to_ascii_lowercase()),
        // (a zero-length one is a syntax error the server reports)
        Token::Quoted(q) if !q.is_empty() => Some(q.replace("\"\"", "\"")),
        _ => None,
    }
}

fn word<'a>(t: Option<&Token<'a>>) -> Option<&'a str> {
    match t {
        Some(Token::Word(w)) => Some(w),
        _ => None,
    }
}

fn is(t: Option<&Token<'_>>, kw: &str) -> bool {
    word(t).is_some_and(|w| w.eq_ignore_ascii_case(kw))
}

fn statement_pins(stmt: &[Token<'_>]) -> Option<&'static str> {
    let first = stmt.first();
    if is(first, "set") {
        let second = stmt.get(1);
        if is(second, "local") || is(second, "transaction") || is(second, "constraints") {
            return None;
        }
        if is(second, "session") && is(stmt.get(2), "characteristics") {
            return Some("SET SESSION CHARACTERISTICS");
        }
        return Some("SET");
    }
    if is(first, "reset") {
        return Some("RESET");
    }
    if is(first, "listen") {
        return Some("LISTEN");
    }
    if is(first, "load") {
        return Some("LOAD");
    }
    if is(first, "prepare") && !is(stmt.get(1), "transaction") {
        return Some("PREPARE");
    }
    // DEALLOCATE of one name drops a statement the server connection holds, and
    // the proxy does not know which of its names that is: the client keeps this
    // connection, which is closed when it leaves (another client's statement by
    // that name would be gone). DEALLOCATE [PREPARE] ALL is followed instead.
    if deallocates_all(stmt) == Some(false) {
        return Some("DEALLOCATE");
    }
    if is(first, "declare") && stmt.windows(2).any(|w| is(w.first(), "with") && is(w.get(1), "hold")) {
        return Some("DECLARE ... WITH HOLD");
    }
    if is(first, "create") {
        // CREATE [GLOBAL|LOCAL] {TEMP|TEMPORARY} {TABLE|VIEW|SEQUENCE}, CREATE [OR REPLACE] TEMP VIEW
        if stmt.iter().take(6).any(|t| is(Some(t), "temp") || is(Some(t), "temporary")) {
            return Some("CREATE TEMP");
        }
    }
    // SELECT ... INTO TEMP t
    if stmt.windows(2).any(|w| is(w.first(), "into") && (is(w.get(1), "temp") || is(w.get(1), "temporary"))) {
        return Some("SELECT INTO TEMP");
    }
    // session-level advisory locks and set_config(..., false) as function calls anywhere
    for w in stmt.windows(2) {
        if w.get(1) != Some(&Token::OpenParen) {
            continue;
        }
        if let Some(name) = word(w.first()) {
            let lower = name.to_ascii_lowercase();
            if matches!(lower.as_str(), "pg_advisory_lock" | "pg_advisory_lock_shared" | "pg_try_advisory_lock" | "pg_try_advisory_lock_shared") {
                return Some("session advisory lock");
            }
            if lower == "set_config" {
                return Some("set_config");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_deallocated_name() {
        assert_eq!(deallocated_name("DEALLOCATE _pg3_0").as_deref(), Some("_pg3_0"));
        assert_eq!(deallocated_name("deallocate prepare S_1;").as_deref(), Some("s_1"));
        assert_eq!(deallocated_name("/* c */ DEALLOCATE x -- y").as_deref(), Some("x"));
        // quoted: case kept, doubled quotes undone
        assert_eq!(deallocated_name(r#"DEALLOCATE "S_1""#).as_deref(), Some("S_1"));
        assert_eq!(deallocated_name(r#"deallocate prepare "a""b";"#).as_deref(), Some(r#"a"b"#));
        assert_eq!(deallocated_name(r#"DEALLOCATE "ALL""#).as_deref(), Some("ALL"));
        // unterminated or empty: the server's syntax error, not the proxy's
        assert_eq!(deallocated_name(r#"DEALLOCATE "abc"#), None);
        assert_eq!(deallocated_name(r#"DEALLOCATE """#), None);
        assert_eq!(deallocated_name(r#"DEALLOCATE "abc"""#), None);
        assert_eq!(deallocated_name(r#"DEALLOCATE "x" -- ""#).as_deref(), Some("x"));
        for sql in ["DEALLOCATE ALL", "DEALLOCATE PREPARE ALL", "DEALLOCATE x; SELECT 1", "SELECT 1", "DEALLOCATE"] {
            assert_eq!(deallocated_name(sql), None, "{sql}");
        }
    }

    #[test]
    fn statements_that_drop_every_prepared_statement() {
        for sql in ["DISCARD ALL", "discard all;", "DEALLOCATE ALL;", "/**/DEALLOCATE ALL", "SELECT 1; DEALLOCATE ALL", "DEALLOCATE/**/ALL", "deallocate prepare all", "-- c\rDISCARD\nALL"] {
            assert!(drops_all_statements(sql.as_bytes()), "{sql}");
        }
        for sql in ["DISCARD PLANS", "DEALLOCATE p", "SELECT 'DISCARD ALL'", "SELECT all_rows FROM discard", "DEALLOCATE prepare"] {
            assert!(!drops_all_statements(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn the_proxys_statement_names_are_out_of_reach() {
        for sql in [
            "EXECUTE sgr_00aa(1, 2)",
            "execute SG_0123",
            "EXPLAIN ANALYZE EXECUTE sgc_entry('x')",
            "CREATE TABLE t AS EXECUTE sg_11",
            "PREPARE sgc_decision AS SELECT 1",
            "DEALLOCATE PREPARE sgr_1",
            "DEALLOCATE sg_1",
            "SELECT 1; EXECUTE sgc_x",
            "EXECUTE \"sg_1\"",
            "EXECUTE U&\"\\0073g_1\"",
            "-- a comment PostgreSQL ends at a carriage return\rEXECUTE sg_1(2)",
            "EXECUTE\x0bsg_1",
        ] {
            assert!(names_proxy_statement(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "EXECUTE q(1)",
            "PREPARE q AS SELECT msg_id FROM t",
            "SELECT sg_col FROM sg_table",
            "PREPARE TRANSACTION 'sg_1_2'",
            "COMMIT PREPARED 'sg_1_2_s0'",
            "DEALLOCATE ALL",
            "CREATE TRIGGER t AFTER INSERT ON x EXECUTE FUNCTION sg_audit()",
            "SELECT 'EXECUTE sg_1'",
            "EXECUTE éé -- sg",
            "PREPARE été AS SELECT 'sg'",
            "EXECUTE sgé",
        ] {
            assert!(!names_proxy_statement(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn pinning_statements() {
        let cases: &[(&str, Option<&str>)] = &[
            ("SET search_path = x", Some("SET")),
            ("set session timezone to 'UTC'", Some("SET")),
            ("SET LOCAL statement_timeout = 5", None),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
            ("SET CONSTRAINTS ALL DEFERRED", None),
            ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", Some("SET SESSION CHARACTERISTICS")),
            ("RESET ALL", Some("RESET")),
            ("LISTEN chan", Some("LISTEN")),
            ("LOAD 'auto_explain'", Some("LOAD")),
            ("PREPARE p AS SELECT 1", Some("PREPARE")),
            ("PREPARE TRANSACTION 'gid'", None),
            ("DEALLOCATE p", Some("DEALLOCATE")),
            ("deallocate prepare \"sg_0123\"", Some("DEALLOCATE")),
            ("DEALLOCATE all", None),
            ("DEALLOCATE PREPARE ALL", None),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Some("DECLARE ... WITH HOLD")),
            ("DECLARE c CURSOR FOR SELECT 1", None),
            ("CREATE TEMP TABLE t (a int)", Some("CREATE TEMP")),
            ("create local temporary table t (a int)", Some("CREATE TEMP")),
            ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", Some("CREATE TEMP")),
            ("CREATE TABLE temp_stuff (a int)", None),
            ("SELECT * INTO TEMP t FROM x", Some("SELECT INTO TEMP")),
            ("SELECT pg_advisory_lock(1)", Some("session advisory lock")),
            ("select PG_TRY_ADVISORY_LOCK(1, 2)", Some("session advisory lock")),
            ("SELECT pg_advisory_xact_lock(1)", None),
            ("SELECT set_config('a.b', 'c', false)", Some("set_config")),
            ("SELECT 'SET x = 1', \"listen\" FROM t", None),
            ("SELECT 1; SET x = 1", Some("SET")),
            ("BEGIN; SELECT 1; COMMIT", None),
            ("/* SET */ SELECT 1 -- LISTEN x", None),
            ("", None),
        ];
        for (sql, want) in cases {
            let got = match session_effect(sql) {
                SessionEffect::None => None,
                SessionEffect::Pins(r) => Some(r),
            };
            assert_eq!(got, *want, "{sql}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = session_effect(&s);
        }

        #[test]
        fn the_byte_scan_never_hides_a_pinning_statement(words in proptest::collection::vec(
            "(?i)(set|reset|listen|load|prepare|declare|temp|temporary|into|create|with|hold|transaction|local|select|pg_advisory_lock|pg_try_advisory_lock_shared|set_config|x|1|;|\\(|\\)|'a')", 0..8)) {
            let sql = words.join(" ");
            // session_effect only skips the lexer when may_pin says no; check it
            // against the lexer's own verdict
            let toks = tokens(&sql);
            let pins = toks.split(|t| *t == Token::Semicolon).any(|s| statement_pins(s).is_some());
            proptest::prop_assert!(!pins || may_pin(sql.as_bytes()), "{}", sql);
            proptest::prop_assert_eq!(pins, session_effect(&sql) != SessionEffect::None, "{}", sql);
        }

        #[test]
        fn quoted_text_never_pins(s in "[a-zA-Z ;()$]*") {
            let sql = format!("SELECT '{}'", s.replace('\'', "''"));
            proptest::prop_assert_eq!(session_effect(&sql), SessionEffect::None);
        }
    }
}
