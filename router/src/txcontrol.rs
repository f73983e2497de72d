//! What a statement text does to the client's transaction, read with the
//! lexer (comments, quotes and case never fool it): the proxy uses this to end
//! the shards' part of a transaction exactly when `db_default`'s part ends.

use crate::lexer::{scan, Token};

/// The effect of a statement text on an open transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxControl {
    /// Not a transaction-control statement.
    None,
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` / `END` (any case, comments, `WORK`/`TRANSACTION`, `AND [NO] CHAIN`).
    Commit,
    /// `ROLLBACK` / `ABORT` (same forms).
    Rollback,
    /// Savepoints, `ROLLBACK TO`, `PREPARE TRANSACTION`, `COMMIT/ROLLBACK PREPARED`:
    /// the shards cannot follow these; the word names the statement.
    Unsupported(&'static str),
    /// Several statements in one text, at least one of them transaction control:
    /// the shards cannot end in step with it.
    Mixed,
}

/// Classifies `sql` (one or several statements).
pub fn transaction_control(sql: &str) -> TxControl {
    let kinds = statement_kinds(sql);
    match kinds.as_slice() {
        [] => TxControl::None,
        [k] => *k,
        ks if ks.iter().all(|k| *k == TxControl::None) => TxControl::None,
        _ => TxControl::Mixed,
    }
}

/// What the statements of one text do to a transaction block, whatever else
/// is in the text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockSteps {
    /// A statement ends the block: COMMIT, ROLLBACK (either `AND CHAIN`), PREPARE TRANSACTION.
    pub ends: bool,
    /// A statement is ROLLBACK TO a savepoint.
    pub rolls_back_to: bool,
}

/// [`BlockSteps`] of `sql` (one or several statements).
pub fn block_steps(sql: &str) -> BlockSteps {
    let kinds = statement_kinds(sql);
    BlockSteps {
        ends: kinds.iter().any(|k| matches!(k, TxControl::Commit | TxControl::Rollback | TxControl::Unsupported("PREPARE TRANSACTION"))),
        rolls_back_to: kinds.contains(&TxControl::Unsupported("ROLLBACK TO SAVEPOINT")),
    }
}

/// Whether any statement of `sql` is PREPARE TRANSACTION.
pub fn prepares_transaction(sql: &str) -> bool {
    statement_kinds(sql).contains(&TxControl::Unsupported("PREPARE TRANSACTION"))
}

/// What each non-empty statement of `sql` is (first three words of each).
fn statement_kinds(sql: &str) -> Vec<TxControl> {
    // the first three words of each non-empty statement
    let mut stmts: Vec<[Option<&str>; 3]> = Vec::new();
    let mut cur: [Option<&str>; 3] = [None; 3];
    let mut n = 0usize;
    let mut any_to = false;
    let mut tos: Vec<bool> = Vec::new();
    let mut nonempty = false;
    scan(sql, |t| match t {
        Token::Semicolon => {
            if nonempty {
                stmts.push(cur);
                tos.push(any_to);
            }
            cur = [None; 3];
            n = 0;
            any_to = false;
            nonempty = false;
        }
        Token::Word(w) => {
            nonempty = true;
            if n < 3 {
                cur[n] = Some(w);
            }
            n += 1;
            any_to |= w.eq_ignore_ascii_case("to");
        }
        _ => {
            nonempty = true;
            n += 1;
        }
    });
    if nonempty {
        stmts.push(cur);
        tos.push(any_to);
    }
    stmts.iter().zip(&tos).map(|(w, to)| one(w, *to)).collect()
}

fn one(w: &[Option<&str>; 3], has_to: bool) -> TxControl {
    let is = |i: usize, word: &str| w[i].is_some_and(|x| x.eq_ignore_ascii_case(word));
    let Some(first) = w[0] else { return TxControl::None };
    let first = first.to_ascii_lowercase();
    match first.as_str() {
        "begin" | "start" => TxControl::Begin,
        "commit" | "end" if is(1, "prepared") => TxControl::Unsupported("COMMIT PREPARED"),
        "commit" | "end" => TxControl::Commit,
        "rollback" | "abort" if is(1, "prepared") => TxControl::Unsupported("ROLLBACK PREPARED"),
        "rollback" | "abort" if has_to => TxControl::Unsupported("ROLLBACK TO SAVEPOINT"),
        "rollback" | "abort" => TxControl::Rollback,
        "savepoint" => TxControl::Unsupported("SAVEPOINT"),
        "release" => TxControl::Unsupported("RELEASE SAVEPOINT"),
        "prepare" if is(1, "transaction") => TxControl::Unsupported("PREPARE TRANSACTION"),
        _ => TxControl::None,
    }
}

/// Whether a COMMIT or ROLLBACK (one statement) ends `AND CHAIN`: a new block
/// starts at once (`AND NO CHAIN` and no clause do not).
pub fn and_chain(sql: &str) -> bool {
    let mut last: [Option<&str>; 2] = [None; 2];
    scan(sql, |t| match t {
        Token::Word(w) => last = [last[1], Some(w)],
        Token::Semicolon => {}
        _ => last = [last[1], None],
    });
    matches!(last, [Some(a), Some(c)] if a.eq_ignore_ascii_case("and") && c.eq_ignore_ascii_case("chain"))
}

/// A savepoint statement, with the savepoint's name as PostgreSQL folds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavepointOp {
    /// `SAVEPOINT name`.
    Define(String),
    /// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`.
    RollbackTo(String),
    /// `RELEASE [SAVEPOINT] name`.
    Release(String),
}

/// What `sql` (one statement) does to savepoints, if anything.
pub fn savepoint_op(sql: &str) -> Option<SavepointOp> {
    use sqlparser::ast::Statement;
    let first = crate::lexer::first_word(sql)?.to_ascii_lowercase();
    if !matches!(first.as_str(), "savepoint" | "rollback" | "abort" | "release") {
        return None;
    }
    let fold = |i: &sqlparser::ast::Ident| if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() };
    match crate::analyze::parse(sql).ok()?.as_slice() {
        [Statement::Savepoint { name }] => Some(SavepointOp::Define(fold(name))),
        [Statement::Rollback { savepoint: Some(name), .. }] => Some(SavepointOp::RollbackTo(fold(name))),
        [Statement::ReleaseSavepoint { name }] => Some(SavepointOp::Release(fold(name))),
        _ => None,
    }
}

/// The statement a shard joins the client's transaction with: the client's
/// `BEGIN`/`START TRANSACTION` parsed and printed again (its isolation level and
/// access mode), never the client's own text. Anything else gives `BEGIN`.
pub fn begin_statement(sql: &str) -> String {
    use sqlparser::ast::Statement;
    match crate::analyze::parse(sql) {
        Ok(stmts) => match stmts.as_slice() {
            [s @ Statement::StartTransaction { .. }] => s.to_string(),
            _ => "BEGIN".into(),
        },
        Err(_) => "BEGIN".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{begin_statement, savepoint_op, transaction_control as tc, SavepointOp, TxControl as T};

    #[test]
    fn and_chain_is_read_from_the_last_two_words() {
        use super::and_chain;
        for yes in ["COMMIT AND CHAIN", "commit work and chain;", "ROLLBACK TRANSACTION /* x */ AND\nchain", "end and chain"] {
            assert!(and_chain(yes), "{yes}");
        }
        for no in ["COMMIT", "COMMIT AND NO CHAIN", "rollback and no chain", "ROLLBACK", "abort work"] {
            assert!(!and_chain(no), "{no}");
        }
    }

    #[test]
    fn block_steps_are_found_in_any_statement_of_a_string() {
        use super::{block_steps, BlockSteps};
        let ends = BlockSteps { ends: true, rolls_back_to: false };
        let to = BlockSteps { ends: false, rolls_back_to: true };
        for (sql, want) in [
            ("COMMIT AND CHAIN", ends),
            ("select 1; commit and chain", ends),
            ("COMMIT; BEGIN", ends),
            ("rollback work and chain; select 2", ends),
            ("PREPARE TRANSACTION 'x'", ends),
            ("ROLLBACK TO s", to),
            ("select 1; rollback to savepoint s", to),
            ("SELECT 'commit'", BlockSteps::default()),
            ("COMMIT PREPARED 'x'", BlockSteps::default()),
            ("SAVEPOINT s; RELEASE s", BlockSteps::default()),
        ] {
            assert_eq!(block_steps(sql), want, "{sql}");
        }
    }

    #[test]
    fn prepare_transaction_is_found_in_any_statement_of_a_string() {
        use super::prepares_transaction;
        for yes in ["PREPARE TRANSACTION 'x'", "update t set a = 1; prepare /* c */ transaction 'x'", "  Prepare\nTransaction 'y';"] {
            assert!(prepares_transaction(yes), "{yes}");
        }
        for no in ["PREPARE p AS SELECT 1", "SELECT 'prepare transaction'", "COMMIT PREPARED 'x'", "-- prepare transaction\nSELECT 1", ""] {
            assert!(!prepares_transaction(no), "{no}");
        }
    }

    #[test]
    fn savepoint_names_fold_as_postgresql_folds_them() {
        assert_eq!(savepoint_op("SAVEPOINT Sp1"), Some(SavepointOp::Define("sp1".into())));
        assert_eq!(savepoint_op("savepoint \"Sp1\""), Some(SavepointOp::Define("Sp1".into())));
        assert_eq!(savepoint_op("ROLLBACK TO SAVEPOINT sp1"), Some(SavepointOp::RollbackTo("sp1".into())));
        assert_eq!(savepoint_op("rollback work to SP1"), Some(SavepointOp::RollbackTo("sp1".into())));
        assert_eq!(savepoint_op("RELEASE SAVEPOINT sp1"), Some(SavepointOp::Release("sp1".into())));
        assert_eq!(savepoint_op("release sp1"), Some(SavepointOp::Release("sp1".into())));
        assert_eq!(savepoint_op("ROLLBACK"), None);
        assert_eq!(savepoint_op("SELECT 1"), None);
    }

    #[test]
    fn begin_is_printed_from_its_parse_not_copied() {
        assert_eq!(begin_statement("begin"), "BEGIN");
        let s = begin_statement("/* x */ begin isolation level serializable, read only");
        assert!(s.contains("SERIALIZABLE") && s.contains("READ ONLY"), "{s}");
        assert_eq!(begin_statement("begin; create table pwned()"), "BEGIN");
        assert_eq!(begin_statement("begin /*"), "BEGIN");
    }

    #[test]
    fn commit_in_every_spelling() {
        for s in [
            "COMMIT",
            "commit;",
            "end",
            "END TRANSACTION",
            "/* app:checkout */ COMMIT",
            "-- note\nCOMMIT",
            "  \n\tCoMmIt WORK",
            "COMMIT AND CHAIN",
            "/* a /* nested */ b */commit",
            "commit;;",
        ] {
            assert_eq!(tc(s), T::Commit, "{s:?}");
        }
    }

    #[test]
    fn rollback_and_the_forms_shards_cannot_follow() {
        assert_eq!(tc("ROLLBACK"), T::Rollback);
        assert_eq!(tc("/*x*/ abort"), T::Rollback);
        assert_eq!(tc("rollback and no chain"), T::Rollback);
        assert_eq!(tc("ROLLBACK TO SAVEPOINT a"), T::Unsupported("ROLLBACK TO SAVEPOINT"));
        assert_eq!(tc("rollback work to a"), T::Unsupported("ROLLBACK TO SAVEPOINT"));
        assert_eq!(tc("ROLLBACK PREPARED 'x'"), T::Unsupported("ROLLBACK PREPARED"));
        assert_eq!(tc("COMMIT PREPARED 'x'"), T::Unsupported("COMMIT PREPARED"));
        assert_eq!(tc("savepoint a"), T::Unsupported("SAVEPOINT"));
        assert_eq!(tc("RELEASE a"), T::Unsupported("RELEASE SAVEPOINT"));
        assert_eq!(tc("PREPARE TRANSACTION 'g'"), T::Unsupported("PREPARE TRANSACTION"));
        assert_eq!(tc("BEGIN"), T::Begin);
        assert_eq!(tc("start transaction isolation level serializable"), T::Begin);
    }

    #[test]
    fn other_statements_and_hidden_words() {
        for s in ["", ";", "select 1", "select 'commit'", "-- commit", "/* commit */", "prepare p as select 1", "\"commit\"", "update t set a = 'rollback'"] {
            assert_eq!(tc(s), T::None, "{s:?}");
        }
        assert_eq!(tc("select 1; select 2"), T::None);
    }

    #[test]
    fn several_statements_with_transaction_control_are_mixed() {
        assert_eq!(tc("INSERT INTO x VALUES (1); COMMIT"), T::Mixed);
        assert_eq!(tc("update x set a = 1;commit;"), T::Mixed);
        assert_eq!(tc("COMMIT; BEGIN"), T::Mixed);
        assert_eq!(tc("select 1; /* c */ rollback"), T::Mixed);
    }
}
