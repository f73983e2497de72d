//! A small SQL lexer: words, symbols and statement breaks, skipping comments and
//! every kind of quoted text, so keyword checks never look inside literals.

/// A token that matters to keyword checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Token<'a> {
    /// Unquoted word (keyword or identifier), as written.
    Word(&'a str),
    /// `;` outside quotes: a statement break.
    Semicolon,
    /// `(`.
    OpenParen,
    /// `)`.
    CloseParen,
    /// `,`.
    Comma,
    /// A double-quoted identifier: the text between its quotes, doubled quotes
    /// as written.
    Quoted(&'a str),
    /// Anything else outside quotes and comments (one token per literal/symbol).
    Other,
}

/// True when `needle` occurs in `hay`, ASCII case ignored. A byte scan with no
/// lexing: a cheap necessary condition before a keyword check that lexes.
pub fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() || hay.len() < needle.len() {
        return needle.is_empty();
    }
    // jump between occurrences of the first byte in either case (memchr), compare there
    let (lo, up) = (needle[0].to_ascii_lowercase(), needle[0].to_ascii_uppercase());
    let last = hay.len() - needle.len();
    memchr::memchr2_iter(lo, up, &hay[..=last]).any(|i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// The first word of `sql` after whitespace and comments (`None` if it starts
/// with anything else). Reads only as far as that word: cheap on long texts.
pub fn first_word(sql: &str) -> Option<&str> {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        if let Some(end) = comment_end(b, i) {
            i = end;
            continue;
        }
        match b.get(i)? {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c' => i += 1,
            c if c.is_ascii_alphabetic() || *c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                return sql.get(start..i);
            }
            _ => return None,
        }
    }
}

/// If a comment starts at `i` (`-- …` to the end of the line, which for
/// PostgreSQL is a `\n` or a `\r`, or a block comment, nested as PostgreSQL
/// allows), the index just past it.
pub(crate) fn comment_end(b: &[u8], mut i: usize) -> Option<usize> {
    match (b.get(i), b.get(i + 1)) {
        (Some(b'-'), Some(b'-')) => {
            while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                i += 1;
            }
            Some(i)
        }
        (Some(b'/'), Some(b'*')) => {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            Some(i)
        }
        _ => None,
    }
}

/// Splits `sql` into tokens. Never panics, whatever bytes it is given.
pub(crate) fn tokens(sql: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    scan(sql, |t| out.push(t));
    out
}

/// Whether `sql` is one statement: no `;` outside literals, quoted names and
/// comments, but at its end.
pub fn is_one_statement(sql: &str) -> bool {
    // no `;` byte anywhere: no Semicolon token either (asked of every shard text of a
    // simple-protocol client; the lexer cost about 20 instructions a byte)
    if memchr::memchr(b';', sql.as_bytes()).is_none() {
        return true;
    }
    let (mut ended, mut more) = (false, false);
    scan(sql, |t| match t {
        Token::Semicolon => ended = true,
        _ if ended => more = true,
        _ => {}
    });
    !more
}

/// Calls `emit` with each token of `sql` in order, without collecting them.
pub(crate) fn scan<'a>(sql: &'a str, mut emit: impl FnMut(Token<'a>)) {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if let Some(end) = comment_end(b, i) {
            i = end;
            continue;
        }
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c' => i += 1,
            b'\'' => {
                i = skip_quoted(b, i + 1, b'\'', false);
                emit(Token::Other);
            }
            b'"' => {
                // (an unterminated one runs to the end: not an identifier)
                match quoted_end(b, i + 1, b'"', false) {
                    Some(end) => {
                        // both ends sit at ASCII quotes
                        emit(Token::Quoted(sql.get(i + 1..end - 1).unwrap_or("")));
                        i = end;
                    }
                    None => {
                        emit(Token::Other);
                        i = b.len();
                    }
                }
            }
            b'$' => {
                // dollar quote $tag$...$tag$, or a parameter $1
                let start = i;
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') && !b[i + 1].is_ascii_digit() {
                    j += 1;
                }
                if j < b.len() && b[j] == b'$' && !b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                    let tag = &b[start..=j];
                    let mut k = j + 1;
                    loop {
                        if k + tag.len() > b.len() {
                            i = b.len();
                            break;
                        }
                        if &b[k..k + tag.len()] == tag {
                            i = k + tag.len();
                            break;
                        }
                        k += 1;
                    }
                } else {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                emit(Token::Other);
            }
            b';' | b'(' | b')' | b',' => {
                emit(match c {
                    b';' => Token::Semicolon,
                    b'(' => Token::OpenParen,
                    b')' => Token::CloseParen,
                    _ => Token::Comma,
                });
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                // E'...' escape strings: a word E/e directly followed by a quote
                if (c == b'e' || c == b'E') && b.get(i + 1) == Some(&b'\'') {
                    i = skip_quoted(b, i + 2, b'\'', true);
                    emit(Token::Other);
                    continue;
                }
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80) {
                    i += 1;
                }
                // start and i are on char boundaries: both sit at ASCII bytes or the ends
                emit(Token::Word(sql.get(start..i).unwrap_or("")));
            }
            _ => {
                emit(Token::Other);
                i += 1;
            }
        }
    }
}

/// Most tokens a statement may have along one path of open parentheses; see
/// [`depth_bound`]. sqlparser builds a chain of binary operators (`a + b + c …`,
/// `x = 1 OR x = 2 OR …`, `v::int::text …`) as a left-deep tree without
/// recursing, but cloning, visiting and dropping that tree recurse once per
/// operator: a few thousand of them overflow a thread's stack and abort the
/// whole process. Texts beyond this bound are never handed to sqlparser.
pub(crate) const MAX_DEPTH_TOKENS: usize = 1500;

/// An upper bound on how deeply sqlparser's tree of `sql` can nest: the most
/// tokens counted along one path of open parentheses, where a `,` starts a new
/// list item (it resets the count to where its parenthesis opened) and a `;` a
/// new statement. Every nesting level of the tree (an operator in a chain, a
/// parenthesis, a function call) has a token of its own on that path, so the
/// tree is never deeper than this. Long lists (`IN (…)`, multi-row VALUES, wide
/// select lists) are cut by their commas and cost nothing.
pub(crate) fn depth_bound(sql: &str) -> usize {
    let mut open: Vec<usize> = Vec::new();
    let (mut cur, mut max) = (0usize, 0usize);
    scan(sql, |t| {
        match t {
            Token::Semicolon => {
                open.clear();
                cur = 0;
            }
            Token::Comma => cur = open.last().copied().unwrap_or(0),
            Token::OpenParen => {
                cur += 1;
                open.push(cur);
            }
            Token::CloseParen => cur = open.pop().unwrap_or(cur) + 1,
            Token::Word(_) | Token::Quoted(_) | Token::Other => cur += 1,
        }
        max = max.max(cur);
    });
    max
}

/// Returns the index just past the closing quote (doubled quotes escape;
/// with `backslash`, `\x` escapes too). Unterminated text runs to the end.
pub(crate) fn skip_quoted(b: &[u8], i: usize, q: u8, backslash: bool) -> usize {
    quoted_end(b, i, q, backslash).unwrap_or(b.len())
}

/// As [`skip_quoted`], or `None` when the text ends before the closing quote.
fn quoted_end(b: &[u8], mut i: usize, q: u8, backslash: bool) -> Option<usize> {
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cheap_scan_finds_table_names_in_any_case() {
        assert!(contains_ignore_case(b"select * from T_Order where x", b"t_order"));
        assert!(!contains_ignore_case(b"select * from pgbench_accounts", b"t_order"));
        assert!(contains_ignore_case(b"T_ORDER", b"t_order"));
        assert!(!contains_ignore_case(b"t_orde", b"t_order"));
        assert!(contains_ignore_case(b"", b""));
    }

    #[test]
    fn one_statement_is_told_from_several() {
        for one in [
            "SELECT 1",
            "SELECT 1;",
            "SELECT 1; ;",
            "SELECT ';' FROM t",
            "SELECT $$;$$, $a$;$a$, \"a;b\", E'\\';' -- ;\n FROM t /* ; /* ; */ ; */",
            "SELECT 1; -- trailing comment",
        ] {
            assert!(is_one_statement(one), "{one}");
        }
        for several in ["SELECT 1; SELECT 2", "SELECT ''; DROP TABLE t", "SELECT E'\\''; DROP TABLE t; '", "SELECT 1;x"] {
            assert!(!is_one_statement(several), "{several}");
        }
    }

    fn words(sql: &str) -> Vec<String> {
        tokens(sql)
            .into_iter()
            .filter_map(|t| match t {
                Token::Word(w) => Some(w.to_string()),
                Token::Semicolon => Some(";".into()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn skips_comments_and_quotes() {
        assert_eq!(words("select 'set x' -- set y\n /* a /* set */ b */ from t"), ["select", "from", "t"]);
        assert_eq!(words("select $q$ ; set $q$, $1, E'it\\'s ; set' ; listen x"), ["select", ";", "listen", "x"]);
        assert_eq!(words("select \"set\"\"x\"; set a"), ["select", ";", "set", "a"]);
    }

    #[test]
    fn depth_bound_counts_chains_not_lists() {
        let chain = format!("select 1{}", "+1".repeat(500));
        assert!(depth_bound(&chain) > 1000);
        // lists are cut at their commas, at every level
        let list = format!("select * from t where a in ({})", vec!["1"; 5000].join(","));
        assert!(depth_bound(&list) < 20, "{}", depth_bound(&list));
        let rows = format!("insert into t (a, b) values {}", vec!["(1, 'x')"; 5000].join(","));
        assert!(depth_bound(&rows) < 20);
        // a chain inside parentheses adds to the chain around it
        let nested = format!("select (1{a}) + (1{a})", a = "+1".repeat(300));
        assert!(depth_bound(&nested) > 600, "{}", depth_bound(&nested));
        let deep = format!("select {}1{}", "(1+".repeat(300), ")".repeat(300));
        assert!(depth_bound(&deep) > 900);
        // statements are counted on their own; quotes and comments hide their text
        let two = format!("select 1{a}; select 1{a}", a = "+1".repeat(300));
        assert!(depth_bound(&two) < 700);
        assert!(depth_bound(&format!("select '{}' -- {}", "+1".repeat(900), "+1".repeat(900))) < 5);
        // unbalanced parentheses do not panic
        assert!(depth_bound(")))(((") < 10);
    }

    #[test]
    fn first_word_skips_comments_only() {
        assert_eq!(first_word("  /* a /* b */ */ -- c\n SET x = 1"), Some("SET"));
        assert_eq!(first_word("reset all"), Some("reset"));
        assert_eq!(first_word("'set'"), None);
        assert_eq!(first_word("/* unterminated"), None);
        assert_eq!(first_word(""), None);
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for s in ["'abc", "\"abc", "$a$ abc", "/* abc", "E'\\", "$", "$$", "é'", "select é"] {
            let _ = tokens(s);
        }
    }
}
