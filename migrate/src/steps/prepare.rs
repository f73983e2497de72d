//! `prepare`: the template and month tables (with their indexes) on every
//! shard for the legacy data's months plus the months ahead, the fallback
//! table and the control tables on `db_default`.

use anyhow::Context as _;
use shardgate_router::month::MonthKey;
use tokio_postgres::Client;

use crate::db::{columns, month_tables, Layout, Stores};

/// Indexes every physical table must have: (name suffix, unique, columns).
fn wanted_indexes(l: &Layout) -> Vec<(&'static str, bool, String)> {
    let has = |c: &str| l.cols.iter().any(|x| x.trim_matches('"') == c);
    let mut v = vec![("merchant_time", false, format!("{}, {}", l.rule.shard_key, l.rule.month_column))];
    if has("order_no") {
        v.push(("order_no", true, "order_no".into()));
    }
    if has("pay_status") {
        v.push(("status_time", false, format!("pay_status, {}", l.rule.month_column)));
    }
    v
}

/// Creates the missing indexes of `table`; returns what it created (or would).
async fn ensure_indexes(c: &Client, l: &Layout, table: &str, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let defs: Vec<String> = c.query("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = $1", &[&table]).await?.iter().map(|r| r.get(0)).collect();
    let mut made = Vec::new();
    for (suffix, unique, cols) in wanted_indexes(l) {
        let have = defs.iter().any(|d| d.ends_with(&format!("USING btree ({cols})")) && (!unique || d.starts_with("CREATE UNIQUE")));
        if have {
            continue;
        }
        let sql = format!("CREATE {}INDEX IF NOT EXISTS {table}_{suffix} ON {table} ({cols})", if unique { "UNIQUE " } else { "" });
        if !dry_run {
            c.batch_execute(&sql).await.with_context(|| format!("creating index {table}_{suffix}"))?;
        }
        made.push(format!("index {table}_{suffix}"));
    }
    Ok(made)
}

/// The template table as legacy defines it (columns, NOT NULL, primary key).
async fn template_ddl(legacy: &Client, l: &Layout) -> anyhow::Result<String> {
    let r = legacy
        .query_one(
            "SELECT string_agg(quote_ident(attname) || ' ' || format_type(atttypid, atttypmod) || CASE WHEN attnotnull THEN ' NOT NULL' ELSE '' END, ', ' ORDER BY attnum) \
             FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&l.rule.name],
        )
        .await?;
    let cols: Option<String> = r.get(0);
    let cols = cols.ok_or_else(|| anyhow::anyhow!("legacy has no table {}", l.rule.name))?;
    Ok(format!("CREATE TABLE IF NOT EXISTS {} ({cols}, PRIMARY KEY ({}))", l.rule.name, l.rule.id_column))
}

/// Months the legacy rows span.
async fn legacy_months(legacy: &Client, l: &Layout) -> anyhow::Result<Vec<MonthKey>> {
    let r = legacy
        .query_one(&format!("SELECT to_char(min({c}) AT TIME ZONE $1, 'YYYYMM'), to_char(max({c}) AT TIME ZONE $1, 'YYYYMM') FROM {t}", c = l.rule.month_column, t = l.rule.name), &[&l.tz_name])
        .await?;
    let (a, b): (Option<String>, Option<String>) = (r.get(0), r.get(1));
    let (Some(a), Some(b)) = (a.as_deref().and_then(MonthKey::parse_suffix), b.as_deref().and_then(MonthKey::parse_suffix)) else { return Ok(Vec::new()) };
    Ok((a.ordinal()..=b.ordinal()).filter_map(MonthKey::from_ordinal).collect())
}

/// Runs `prepare`; returns the lines it reports.
pub async fn run(stores: &Stores, months_ahead: u32, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let l = &stores.layout;
    let mut report = Vec::new();
    let verb = if dry_run { "would create" } else { "created" };
    let mut months = legacy_months(&stores.legacy, l).await?;
    let first = MonthKey::of(jiff::Timestamp::now(), &l.tz).ordinal();
    months.extend((first..=first + months_ahead as i32).filter_map(MonthKey::from_ordinal));
    months.sort();
    months.dedup();
    report.push(format!(
        "legacy {} spans {} month(s) with the months ahead: {}..{}",
        l.rule.name,
        months.len(),
        months.first().map(|m| m.suffix()).unwrap_or_default(),
        months.last().map(|m| m.suffix()).unwrap_or_default()
    ));
    let template = template_ddl(&stores.legacy, l).await?;
    for (i, c) in stores.shards.iter().enumerate() {
        let mut made = Vec::new();
        if columns(c, &l.rule.name).await?.is_empty() {
            if !dry_run {
                c.batch_execute(&template).await.with_context(|| format!("creating the template {} on db_{i}", l.rule.name))?;
            }
            made.push(format!("template {}", l.rule.name));
        }
        if !dry_run || !made.is_empty() {
            made.extend(ensure_indexes(c, l, &l.rule.name, dry_run).await?);
        }
        let existing = month_tables(c, &l.rule).await?;
        let mut new_tables = 0;
        for m in &months {
            if existing.contains(m) {
                made.extend(ensure_indexes(c, l, &l.rule.physical(*m), dry_run).await?);
                continue;
            }
            if !dry_run {
                crate::db::create_month_table(c, &l.rule, *m, i).await?;
                made.extend(ensure_indexes(c, l, &l.rule.physical(*m), false).await?);
            }
            new_tables += 1;
        }
        report.push(format!(
            "db_{i}: {verb} {new_tables} month table(s) ({} existed){}",
            existing.len(),
            if made.is_empty() { String::new() } else { format!("; {verb} {}", made.join(", ")) }
        ));
    }
    let d = &stores.default;
    let mut made = Vec::new();
    if columns(d, &l.rule.name).await?.is_empty() {
        if !dry_run {
            d.batch_execute(&template).await.context("creating the template on db_default")?;
        }
        made.push(format!("template {}", l.rule.name));
    }
    if columns(d, &l.rule.fallback_table()).await?.is_empty() {
        if !dry_run {
            d.batch_execute(&l.rule.create_fallback_table_sql()).await.context("creating the fallback table")?;
        }
        made.push(l.rule.fallback_table());
    }
    if !crate::state::exists(d).await? {
        made.push("control tables shardgate_migration, shardgate_migration_outbox, shardgate_migration_proxies".into());
    }
    if !dry_run {
        d.batch_execute(crate::state::DDL).await.context("creating the control tables")?;
    }
    report.push(format!("db_default: {}", if made.is_empty() { "everything exists".to_string() } else { format!("{verb} {}", made.join(", ")) }));
    Ok(report)
}
