//! `SET` / `RESET` of a session parameter that the proxy carries to every
//! server connection a client uses. The value is read the way PostgreSQL reads
//! it (quotes, `E''` escapes, lists) and later applied with bind parameters
//! (`set_config($1, $2, false)`), so no client text ever becomes SQL the
//! proxy sends.

use sqlparser::ast::{ContextModifier, Expr, Reset, Set, Statement, UnaryOperator, Value};

/// What a statement does to one of the tracked parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingChange {
    /// `SET name = value` (the value as the server stores it).
    Set(String, String),
    /// `RESET name`, `SET name TO DEFAULT`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
    /// `SET LOCAL name = value` (`None`: `SET LOCAL name TO DEFAULT`): for the
    /// rest of the transaction block only.
    Local(String, Option<String>),
    /// A change the shards cannot follow: refused with 0A000 and this message.
    Refused(String),
}

/// The change `sql` makes to a parameter in `tracked` (lower-case names), if any.
/// Statements on other parameters give `None`.
pub fn setting_change(sql: &str, tracked: &[&str]) -> Option<SettingChange> {
    let stmts = crate::analyze::parse(sql).ok()?;
    let [stmt] = stmts.as_slice() else { return None };
    let local = matches!(stmt, Statement::Set(Set::SingleAssignment { scope: Some(ContextModifier::Local), .. }) | Statement::Set(Set::SetTimeZone { local: true, .. }));
    let change = session_change(stmt, tracked)?;
    Some(match (local, change) {
        (true, SettingChange::Set(name, v)) => SettingChange::Local(name, Some(v)),
        (true, SettingChange::Reset(name)) => SettingChange::Local(name, None),
        (_, c) => c,
    })
}

fn session_change(stmt: &Statement, tracked: &[&str]) -> Option<SettingChange> {
    let (name, values) = match stmt {
        Statement::Reset(r) => {
            return match &r.reset {
                Reset::ALL => Some(SettingChange::ResetAll),
                Reset::ConfigurationParameter(n) => {
                    let name = n.to_string().to_ascii_lowercase();
                    tracked.contains(&name.as_str()).then_some(SettingChange::Reset(name))
                }
                Reset::SessionAuthorization => None,
            };
        }
        Statement::Set(Set::SingleAssignment { variable, values, .. }) => (variable.to_string().to_ascii_lowercase(), values.as_slice()),
        Statement::Set(Set::SetTimeZone { value, .. }) => ("timezone".to_string(), std::slice::from_ref(value)),
        _ => return None,
    };
    let name = match name.as_str() {
        "time zone" => "timezone".to_string(),
        _ => name,
    };
    if !tracked.contains(&name.as_str()) {
        return None;
    }
    if let [Expr::Identifier(i)] = values {
        if i.quote_style.is_none() && (i.value.eq_ignore_ascii_case("default") || (name == "timezone" && i.value.eq_ignore_ascii_case("local"))) {
            return Some(SettingChange::Reset(name));
        }
    }
    let list_quote = name == "search_path";
    let mut parts = Vec::with_capacity(values.len());
    for v in values {
        match value_text(v, list_quote) {
            Some(t) => parts.push(t),
            None => {
                return Some(SettingChange::Refused(format!(
                    "shardgate carries {name} to the shards and cannot read this value; write it as a single-quoted string or a plain word"
                )))
            }
        }
    }
    let value = parts.join(", ");
    if name == "standard_conforming_strings" && !matches!(value.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1") {
        return Some(SettingChange::Refused(
            "standard_conforming_strings must stay on through shardgate: it reads and rewrites SQL text with standard string literals (use E'…' for escapes)"
                .into(),
        ));
    }
    Some(SettingChange::Set(name, value))
}

/// The text PostgreSQL's `flatten_set_variable_args` makes of one value.
fn value_text(e: &Expr, list_quote: bool) -> Option<String> {
    let quote = |s: &str| -> String {
        let plain = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if list_quote && !plain {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => Some(quote(s)),
            Value::Number(n, _) => Some(n.to_string()),
            Value::Boolean(b) => Some(if *b { "on" } else { "off" }.into()),
            _ => None,
        },
        Expr::Identifier(i) if i.quote_style.is_none() => Some(quote(&i.value.to_ascii_lowercase())),
        Expr::Identifier(i) if i.quote_style == Some('"') => Some(quote(&i.value)),
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Some(format!("-{n}")),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{setting_change as sc, SettingChange as C};

    const T: &[&str] = &["timezone", "search_path", "standard_conforming_strings", "extra_float_digits", "datestyle"];

    #[test]
    fn values_are_read_as_postgresql_reads_them() {
        assert_eq!(sc("SET TimeZone = 'Asia/Shanghai'", T), Some(C::Set("timezone".into(), "Asia/Shanghai".into())));
        assert_eq!(sc("set time zone 'UTC'", T), Some(C::Set("timezone".into(), "UTC".into())));
        assert_eq!(sc("SET SESSION timezone TO utc", T), Some(C::Set("timezone".into(), "utc".into())));
        assert_eq!(sc("/* c */ set search_path = a, \"B c\", 'd e'", T), Some(C::Set("search_path".into(), "a, \"B c\", \"d e\"".into())));
        assert_eq!(sc("SET extra_float_digits = -1", T), Some(C::Set("extra_float_digits".into(), "-1".into())));
        assert_eq!(sc("SET DateStyle = ISO, MDY", T), Some(C::Set("datestyle".into(), "iso, mdy".into())));
        assert_eq!(sc("SET search_path = E'it\\'s'", T), Some(C::Set("search_path".into(), "\"it's\"".into())));
    }

    #[test]
    fn resets_local_and_untracked() {
        assert_eq!(sc("RESET timezone", T), Some(C::Reset("timezone".into())));
        assert_eq!(sc("reset all", T), Some(C::ResetAll));
        assert_eq!(sc("SET timezone TO DEFAULT", T), Some(C::Reset("timezone".into())));
        assert_eq!(sc("SET TIME ZONE LOCAL", T), Some(C::Reset("timezone".into())));
        assert_eq!(sc("SET LOCAL timezone = 'UTC'", T), Some(C::Local("timezone".into(), Some("UTC".into()))));
        assert_eq!(sc("SET LOCAL timezone TO DEFAULT", T), Some(C::Local("timezone".into(), None)));
        assert_eq!(sc("SET LOCAL TIME ZONE 'UTC'", T), Some(C::Local("timezone".into(), Some("UTC".into()))));
        assert_eq!(sc("SET work_mem = '1MB'", T), None);
        assert_eq!(sc("select 1", T), None);
        assert_eq!(sc("SET timezone = 'UTC'; SET search_path = x", T), None);
    }

    #[test]
    fn the_injection_value_is_data_and_standard_strings_stay_on() {
        // the value of the reported injection is one (odd) schema name, nothing more
        match sc("SET search_path = E'public\\\\\\';CREATE TABLE public.pwned_by_client();--'", T) {
            Some(C::Set(n, v)) => {
                assert_eq!(n, "search_path");
                assert!(v.starts_with('"') && v.contains("CREATE TABLE"), "{v}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(sc("SET standard_conforming_strings = off", T), Some(C::Refused(_))));
        assert!(matches!(sc("SET standard_conforming_strings TO false", T), Some(C::Refused(_))));
        assert_eq!(sc("SET standard_conforming_strings = on", T), Some(C::Set("standard_conforming_strings".into(), "on".into())));
        assert!(matches!(sc("SET timezone = now()", T), Some(C::Refused(_))));
    }
}
