//! AST rewrites: sharded table references become a hole (kept under their
//! logical name as alias, so `t_order.col` stays valid), printed once into a
//! [`Template`]; each execution fills the holes with physical names, the pushed
//! LIMIT and generated values. Holes are identifiers no client may use
//! (`__sg_hole_*`, refused in input), so filling never touches user text.

use std::ops::ControlFlow;

use sqlparser::ast::{Ident, ObjectName, ObjectNamePart, TableAlias, TableFactor, VisitorMut};

use crate::extract::Scope;
use crate::topology::TableRule;

/// Marker prefix reserved for holes.
pub(crate) const HOLE_PREFIX: &str = "__sg_hole_";
pub(crate) const HOLE_TABLE: &str = "__sg_hole_t__";
pub(crate) const HOLE_LIMIT: &str = "__sg_hole_l__";
pub(crate) const HOLE_ID: &str = "__sg_hole_i__";
pub(crate) const HOLE_TIME: &str = "__sg_hole_c__";

/// A piece of a printed statement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seg {
    Lit(String),
    Table,
    Limit,
    Id,
    Time,
}

/// A printed statement with holes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Template {
    segs: Vec<Seg>,
    len: usize,
}

impl Template {
    /// Splits printed SQL at the holes.
    pub fn parse(printed: &str) -> Template {
        let mut segs = Vec::new();
        let mut rest = printed;
        while let Some(pos) = rest.find(HOLE_PREFIX) {
            if pos > 0 {
                segs.push(Seg::Lit(rest[..pos].to_string()));
            }
            let after = &rest[pos..];
            let (seg, n) = if after.starts_with(HOLE_TABLE) {
                (Seg::Table, HOLE_TABLE.len())
            } else if after.starts_with(HOLE_LIMIT) {
                (Seg::Limit, HOLE_LIMIT.len())
            } else if after.starts_with(HOLE_ID) {
                (Seg::Id, HOLE_ID.len())
            } else if after.starts_with(HOLE_TIME) {
                (Seg::Time, HOLE_TIME.len())
            } else {
                // Not one of ours (cannot happen: input containing the prefix is refused).
                (Seg::Lit(HOLE_PREFIX.to_string()), HOLE_PREFIX.len())
            };
            segs.push(seg);
            rest = &after[n..];
        }
        if !rest.is_empty() {
            segs.push(Seg::Lit(rest.to_string()));
        }
        Template { segs, len: printed.len() }
    }

    /// Fills the holes. `ids`/`times` are consumed in order of appearance.
    pub fn render(&self, table: &str, limit: Option<u64>, ids: &[String], times: &[String]) -> String {
        let mut out = String::with_capacity(self.len + table.len() + 16);
        let (mut i, mut t) = (0, 0);
        for s in &self.segs {
            match s {
                Seg::Lit(l) => out.push_str(l),
                Seg::Table => out.push_str(table),
                Seg::Limit => match limit {
                    Some(n) => {
                        use std::fmt::Write;
                        let _ = write!(out, "{n}");
                    }
                    // LIMIT NULL: no limit.
                    None => out.push_str("ALL"),
                },
                Seg::Id => {
                    out.push_str(ids.get(i).map_or("DEFAULT", String::as_str));
                    i += 1;
                }
                Seg::Time => {
                    out.push_str(times.get(t).map_or("DEFAULT", String::as_str));
                    t += 1;
                }
            }
        }
        out
    }
}

/// The texts a statement's template rendered, by what filled its holes (its
/// month tables and `variant`, a number for the rest): an application repeats
/// its statements on the same months, and rendering again cost the proxy a
/// table name, a text and an allocation per statement. The same text (one
/// `Arc`) each time also lets the proxy keep its name for the statement it
/// prepares on a shard. At most [`Renders::KEEP`] texts of
/// [`Renders::KEEP_BYTES`] in all (the oldest go first; a longer text is not
/// kept), counted in the analysis's cache weight.
#[derive(Debug, Default)]
pub(crate) struct Renders(std::sync::Mutex<Vec<Rendered>>);

/// A rendered text: its month tables, its variant, the text.
type Rendered = (Vec<crate::month::MonthKey>, u64, std::sync::Arc<str>);

impl Renders {
    pub const KEEP: usize = 16;
    pub const KEEP_BYTES: usize = 2048;

    /// The text for `months` and `variant`, rendered by `render` if not kept.
    pub fn get(&self, months: &[crate::month::MonthKey], variant: u64, render: impl FnOnce() -> String) -> std::sync::Arc<str> {
        // (a poisoned lock only means a panic elsewhere: the list is still whole)
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, sql)) = kept.iter().find(|(m, v, _)| *v == variant && m.as_slice() == months) {
            return sql.clone();
        }
        let sql: std::sync::Arc<str> = render().into();
        if sql.len() > Self::KEEP_BYTES {
            return sql;
        }
        let mut bytes = kept.iter().map(|(_, _, s)| s.len()).sum::<usize>() + sql.len();
        while kept.len() >= Self::KEEP || bytes > Self::KEEP_BYTES {
            bytes -= kept.remove(0).2.len();
        }
        kept.push((months.to_vec(), variant, sql.clone()));
        sql
    }
}

impl Clone for Renders {
    /// A copy starts empty (its texts are rendered again on need).
    fn clone(&self) -> Renders {
        Renders::default()
    }
}

/// Replaces every reference to the sharded table with the table hole, aliased
/// to the name the statement used; collects the qualifiers that mean the table.
pub(crate) struct Renamer<'r> {
    pub rule: &'r TableRule,
    /// How many references were replaced.
    pub count: usize,
    /// Qualifiers (alias or table name) seen for the sharded table.
    pub qualifiers: Vec<String>,
    /// Other tables referenced (unsharded).
    pub others: Vec<String>,
}

impl<'r> Renamer<'r> {
    pub fn new(rule: &'r TableRule) -> Self {
        Renamer { rule, count: 0, qualifiers: Vec::new(), others: Vec::new() }
    }

    /// True when `name` is the sharded table (optionally schema-qualified with `public`).
    pub fn is_sharded(&self, name: &ObjectName) -> bool {
        is_table(name, &self.rule.name)
    }

    pub fn scope(&self) -> Scope<'r> {
        Scope { rule: self.rule, qualifiers: self.qualifiers.clone(), qualified_only: false }
    }
}

/// Last part of an object name, folded like PostgreSQL folds unquoted identifiers.
pub(crate) fn object_base(name: &ObjectName) -> Option<String> {
    match name.0.last()? {
        ObjectNamePart::Identifier(i) => Some(if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() }),
        _ => None,
    }
}

pub(crate) fn is_table(name: &ObjectName, table: &str) -> bool {
    // PostgreSQL folds unquoted names; a quoted schema must be exactly "public"
    let schema_ok = match name.0.len() {
        1 => true,
        2 => matches!(&name.0[0], ObjectNamePart::Identifier(i)
            if (i.quote_style.is_none() && i.value.eq_ignore_ascii_case("public")) || (i.quote_style == Some('"') && i.value == "public")),
        _ => false,
    };
    // sqlparser takes 't_order' (a string) as a name; PostgreSQL does not
    let quoted_as_string = name.0.iter().any(|p| matches!(p, ObjectNamePart::Identifier(i) if i.quote_style.is_some_and(|q| q != '"')));
    schema_ok && !quoted_as_string && object_base(name).as_deref() == Some(table)
}

pub(crate) fn hole_name() -> ObjectName {
    ObjectName(vec![ObjectNamePart::Identifier(Ident::new(HOLE_TABLE))])
}

impl VisitorMut for Renamer<'_> {
    type Break = ();

    fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table { name, alias, args: None, .. } = tf {
            if self.is_sharded(name) {
                self.count += 1;
                let qualifier = match alias {
                    Some(a) => {
                        let n = &a.name;
                        if n.quote_style.is_some() { n.value.clone() } else { n.value.to_lowercase() }
                    }
                    None => {
                        *alias = Some(TableAlias { explicit: true, name: Ident::new(self.rule.name.clone()), columns: vec![], at: None });
                        self.rule.name.clone()
                    }
                };
                self.qualifiers.push(qualifier);
                // A schema-qualified reference (`public.t_order`) is also valid as a qualifier.
                *name = hole_name();
            } else if let Some(base) = object_base(name) {
                self.others.push(base);
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::Renders;
    use crate::month::MonthKey;
    use std::sync::Arc;

    #[test]
    fn kept_renders_are_the_same_text_and_stay_bounded() {
        let r = Renders::default();
        let m = |k: u8| MonthKey::new(2026, k).expect("month");
        let a = r.get(&[m(1)], 0, || "SELECT 1".into());
        // kept: the same allocation, not rendered again
        assert!(Arc::ptr_eq(&a, &r.get(&[m(1)], 0, || unreachable!("kept"))));
        // another variant or other months are other texts
        assert_eq!(&*r.get(&[m(1)], 1, || "SELECT 2".into()), "SELECT 2");
        assert_eq!(&*r.get(&[m(1), m(2)], 0, || "SELECT 3".into()), "SELECT 3");
        // at most KEEP texts of KEEP_BYTES in all; a longer one is not kept
        for k in 0..40u64 {
            r.get(&[m(3)], 100 + k, || "x".repeat(300));
            let kept = r.0.lock().expect("lock");
            assert!(kept.len() <= Renders::KEEP && kept.iter().map(|e| e.2.len()).sum::<usize>() <= Renders::KEEP_BYTES);
        }
        let long = r.get(&[m(4)], 0, || "y".repeat(Renders::KEEP_BYTES + 1));
        assert!(!Arc::ptr_eq(&long, &r.get(&[m(4)], 0, || "y".repeat(Renders::KEEP_BYTES + 1))));
    }
}
