//! The names under which the proxy prepares its own statements on a server
//! connection (`sgr_…`), kept per connection for the texts it saw last.

use std::sync::Arc;

/// Server statement name of a target statement: two SipHashes of its text and
/// parameter types, in hex.
pub fn target_statement_name(sql: &str, types: &[u32]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sql.hash(&mut h);
    types.hash(&mut h);
    let mut h2 = std::collections::hash_map::DefaultHasher::new();
    types.hash(&mut h2);
    sql.len().hash(&mut h2);
    sql.hash(&mut h2);
    // (hex by hand: `format!` was a twentieth of the proxy's instructions per routed statement)
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = String::with_capacity(36);
    name.push_str("sgr_");
    for v in [h.finish(), h2.finish()] {
        for i in (0..16).rev() {
            name.push(char::from(HEX[((v >> (i * 4)) & 0xf) as usize]));
        }
    }
    name
}

/// The names of the statements a connection ran last, by text (the same `Arc`:
/// the router keeps the texts it rendered, see its `Renders`) and parameter
/// types. Hashing a text for its name was a twentieth of the proxy's
/// instructions per routed statement. Holding the `Arc` keeps its address from
/// being reused by another text. At most [`StatementNames::KEEP`], the oldest
/// forgotten first.
#[derive(Debug, Default)]
pub struct StatementNames(Vec<(Arc<str>, Vec<u32>, String)>);

impl StatementNames {
    pub const KEEP: usize = 32;

    /// [`target_statement_name`] of `sql` and `types`.
    pub fn name(&mut self, sql: &Arc<str>, types: &[u32]) -> String {
        if let Some((_, _, name)) = self.0.iter().find(|(s, t, _)| Arc::ptr_eq(s, sql) && t.as_slice() == types) {
            return name.clone();
        }
        let name = target_statement_name(sql, types);
        if self.0.len() >= Self::KEEP {
            self.0.remove(0);
        }
        self.0.push((sql.clone(), types.to_vec(), name.clone()));
        name
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn target_statement_names_are_the_two_hashes_in_hex() {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let (sql, types) = ("SELECT * FROM t_order_202612 WHERE id = $1", [20u32]);
        let hash = |f: &dyn Fn(&mut DefaultHasher)| -> u64 { let mut h = DefaultHasher::new(); f(&mut h); h.finish() };
        let (a, b) = (hash(&|h| (sql, types.as_slice()).hash(h)), hash(&|h| (types.as_slice(), sql.len(), sql).hash(h)));
        assert_eq!(super::target_statement_name(sql, &types), format!("sgr_{a:016x}{b:016x}"));
    }

    #[test]
    fn a_kept_name_is_the_name_of_its_text() {
        use std::sync::Arc;
        let mut names = super::StatementNames::default();
        let a: Arc<str> = Arc::from("SELECT 1");
        let b: Arc<str> = Arc::from("SELECT 2");
        for _ in 0..2 {
            assert_eq!(names.name(&a, &[]), super::target_statement_name("SELECT 1", &[]));
            assert_eq!(names.name(&a, &[25]), super::target_statement_name("SELECT 1", &[25]));
            assert_eq!(names.name(&b, &[]), super::target_statement_name("SELECT 2", &[]));
        }
        // the same text in another allocation: the same name
        assert_eq!(names.name(&Arc::from("SELECT 1"), &[]), super::target_statement_name("SELECT 1", &[]));
        for i in 0..100 {
            let t: Arc<str> = Arc::from(format!("SELECT {i}"));
            assert_eq!(names.name(&t, &[]), super::target_statement_name(&t, &[]));
        }
        assert!(names.0.len() <= super::StatementNames::KEEP);
    }
}
