//! Comparing the two stores and making the secondary equal to the primary.
//!
//! 1. Counts and checksums per merchant × month are computed inside each
//!    database (legacy in one pass, every shard concurrently); only the
//!    groups travel.
//! 2. Groups that differ are drilled down to rows (`id` and row checksum),
//!    while legacy is quiesced: `LOCK TABLE … IN SHARE MODE` waits for the
//!    dual-writes in flight (a proxy keeps its legacy transaction open until
//!    the shards are written) and holds new ones back for the moment the
//!    drill-down takes. With the shards primary (`shard_writes`) a difference
//!    must be seen twice, 300 ms apart, to count.
//! 3. `repair` deletes the secondary's extra and changed rows and copies the
//!    missing and changed ones from the primary (binary COPY).

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Context as _;
use shardgate_router::month::MonthKey;
use tokio_postgres::Client;

use crate::db::{copy_in, copy_out, in_transaction, month_tables, Layout, Stores};
use crate::plan::Store;

/// Which part of the data to compare.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Shards (`None` = all).
    pub shards: Option<Vec<usize>>,
    /// Months (`None` = all).
    pub months: Option<Vec<MonthKey>>,
}

impl Scope {
    fn has_shard(&self, s: usize) -> bool {
        self.shards.as_ref().is_none_or(|v| v.contains(&s))
    }

    fn has_month(&self, m: MonthKey) -> bool {
        self.months.as_ref().is_none_or(|v| v.contains(&m))
    }

    /// Everything.
    pub fn is_all(&self) -> bool {
        self.shards.is_none() && self.months.is_none()
    }
}

type Key = (i64, MonthKey);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Agg {
    count: i64,
    sum: String,
}

/// Rows of a merchant that sit in the wrong shard or month table.
#[derive(Debug, Clone)]
pub struct Misplaced {
    /// Shard holding them.
    pub shard: usize,
    /// Month table holding them.
    pub table: MonthKey,
    /// Their merchant.
    pub merchant: i64,
    /// How many.
    pub rows: i64,
}

/// Row-level differences of one merchant × month.
#[derive(Debug, Clone, Default)]
pub struct KeyDiff {
    /// Merchant.
    pub merchant: i64,
    /// Month.
    pub month: Option<MonthKey>,
    /// Ids in the primary only.
    pub missing: Vec<i64>,
    /// Ids in the secondary only.
    pub extra: Vec<i64>,
    /// Ids in both with different contents.
    pub changed: Vec<i64>,
}

impl KeyDiff {
    fn rows(&self) -> usize {
        self.missing.len() + self.extra.len() + self.changed.len()
    }
}

/// What a comparison found.
#[derive(Debug, Default)]
pub struct Report {
    /// Rows in legacy (in scope).
    pub legacy_rows: i64,
    /// Rows on the shards (in scope, in the right place).
    pub shard_rows: i64,
    /// Merchant × month groups compared.
    pub groups: usize,
    /// Groups whose counts or checksums differed at first.
    pub differing_groups: usize,
    /// Row differences confirmed (before repair).
    pub diffs: Vec<KeyDiff>,
    /// Misplaced rows found.
    pub misplaced: Vec<Misplaced>,
    /// Rows written by the repair.
    pub repaired: usize,
    /// Differences left after the repair (all of them without repair).
    pub remaining: usize,
}

impl Report {
    /// Differing rows (missing + extra + changed + misplaced).
    pub fn differences(&self) -> usize {
        self.diffs.iter().map(KeyDiff::rows).sum::<usize>() + self.misplaced.iter().map(|m| m.rows as usize).sum::<usize>()
    }
}

fn legacy_filter(l: &Layout, scope: &Scope) -> String {
    let mut w = vec!["true".to_string()];
    if let Some(s) = &scope.shards {
        let list: Vec<String> = s.iter().map(|x| x.to_string()).collect();
        w.push(format!("{} IN ({})", l.shard_expr(), list.join(", ")));
    }
    if let Some(ms) = &scope.months {
        let parts: Vec<String> = ms.iter().map(|m| format!("({})", l.month_range(*m))).collect();
        w.push(format!("({})", if parts.is_empty() { "false".into() } else { parts.join(" OR ") }));
    }
    w.join(" AND ")
}

fn month_of(s: &str) -> Option<MonthKey> {
    MonthKey::parse_suffix(s)
}

async fn legacy_groups(c: &Client, l: &Layout, scope: &Scope) -> anyhow::Result<HashMap<Key, Agg>> {
    let sql = format!(
        "SELECT {k}, {m}, count(*), sum({h})::text FROM {t} WHERE {w} GROUP BY 1, 2",
        k = l.rule.shard_key,
        m = l.month_expr(),
        h = l.hash_expr(),
        t = l.rule.name,
        w = legacy_filter(l, scope)
    );
    let rows = c.query(&sql, &[]).await.context("checksums on legacy")?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let Some(m) = month_of(r.get(1)) else { continue };
        out.insert((r.get::<_, i64>(0), m), Agg { count: r.get(2), sum: r.get(3) });
    }
    Ok(out)
}

/// Legacy's groups in two concurrent scans (disjoint shard sets): the per-row
/// checksum is the cost, and PostgreSQL does not hash in parallel workers.
async fn legacy_groups_parallel(stores: &Stores, scope: &Scope) -> anyhow::Result<HashMap<Key, Agg>> {
    let l = &stores.layout;
    let all: Vec<usize> = scope.shards.clone().unwrap_or_else(|| (0..l.shard_count).collect());
    if all.len() < 2 {
        return legacy_groups(&stores.legacy, l, scope).await;
    }
    let (a, b) = all.split_at(all.len() / 2);
    let part = |shards: &[usize]| Scope { shards: Some(shards.to_vec()), months: scope.months.clone() };
    let (sa, sb) = (part(a), part(b));
    let second = stores.legacy_conn().await?;
    // a hash aggregate over a sequential scan (not an index walk), held in memory
    for c in [&stores.legacy, &second] {
        c.batch_execute("SET work_mem = '256MB'; SET enable_indexscan = off; SET enable_bitmapscan = off").await?;
    }
    let (ra, rb) = tokio::join!(legacy_groups(&stores.legacy, l, &sa), legacy_groups(&second, l, &sb));
    let _ = stores.legacy.batch_execute("RESET work_mem; RESET enable_indexscan; RESET enable_bitmapscan").await;
    let mut m = ra?;
    m.extend(rb?);
    Ok(m)
}

async fn shard_groups(c: &Client, l: &Layout, shard: usize, scope: &Scope) -> anyhow::Result<(HashMap<Key, Agg>, Vec<Misplaced>)> {
    let mut out = HashMap::new();
    let mut misplaced = Vec::new();
    if !scope.has_shard(shard) {
        return Ok((out, misplaced));
    }
    for table in month_tables(c, &l.rule).await? {
        if !scope.has_month(table) {
            continue;
        }
        let sql = format!(
            "SELECT {k}, {m}, count(*), sum({h})::text FROM {t} GROUP BY 1, 2",
            k = l.rule.shard_key,
            m = l.month_expr(),
            h = l.hash_expr(),
            t = l.rule.physical(table)
        );
        let rows = c.query(&sql, &[]).await.with_context(|| format!("checksums on db_{shard}.{}", l.rule.physical(table)))?;
        for r in rows {
            let merchant: i64 = r.get(0);
            let month = month_of(r.get(1));
            if month == Some(table) && l.shard_of(merchant) == shard {
                out.insert((merchant, table), Agg { count: r.get(2), sum: r.get(3) });
            } else {
                misplaced.push(Misplaced { shard, table, merchant, rows: r.get(2) });
            }
        }
    }
    Ok((out, misplaced))
}

/// `(id, checksum)` of one merchant × month in one store.
async fn rows_of(stores: &Stores, legacy: &Client, store: Store, merchant: i64, month: MonthKey) -> anyhow::Result<HashMap<i64, i64>> {
    let l = &stores.layout;
    let (c, sql) = match store {
        Store::Legacy => (
            legacy,
            format!("SELECT {id}, {h} FROM {t} WHERE {k} = $1 AND {r}", id = l.rule.id_column, h = l.hash_expr(), t = l.rule.name, k = l.rule.shard_key, r = l.month_range(month)),
        ),
        Store::Shards => {
            let c = &stores.shards[l.shard_of(merchant)];
            let t = l.rule.physical(month);
            let exists: bool = c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&t]).await?.get(0);
            if !exists {
                return Ok(HashMap::new());
            }
            (c, format!("SELECT {id}, {h} FROM {t} WHERE {k} = $1", id = l.rule.id_column, h = l.hash_expr(), k = l.rule.shard_key))
        }
    };
    let rows = c.query(&sql, &[&merchant]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn drill(stores: &Stores, legacy: &Client, primary: Store, merchant: i64, month: MonthKey) -> anyhow::Result<KeyDiff> {
    let p = rows_of(stores, legacy, primary, merchant, month).await?;
    let s = rows_of(stores, legacy, primary.other(), merchant, month).await?;
    let mut d = KeyDiff { merchant, month: Some(month), ..KeyDiff::default() };
    for (id, h) in &p {
        match s.get(id) {
            None => d.missing.push(*id),
            Some(x) if x != h => d.changed.push(*id),
            Some(_) => {}
        }
    }
    d.extra = s.keys().filter(|id| !p.contains_key(id)).copied().collect();
    d.missing.sort_unstable();
    d.changed.sort_unstable();
    d.extra.sort_unstable();
    Ok(d)
}

fn id_array(ids: &[i64]) -> String {
    let v: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!("'{{{}}}'::bigint[]", v.join(","))
}

/// Makes the secondary equal to the primary for one merchant × month; rows written.
async fn repair_key(stores: &Stores, legacy: &Client, primary: Store, d: &KeyDiff) -> anyhow::Result<usize> {
    let l = &stores.layout;
    let Some(month) = d.month else { return Ok(0) };
    let gone: Vec<i64> = d.extra.iter().chain(&d.changed).copied().collect();
    let copy: Vec<i64> = d.missing.iter().chain(&d.changed).copied().collect();
    let shard = l.shard_of(d.merchant);
    let table = l.rule.physical(month);
    let cols = l.col_list();
    match primary {
        Store::Legacy => {
            let c = &stores.shards[shard];
            c.batch_execute(&l.rule.create_month_table_sql(month)).await.ok();
            let tuples = if copy.is_empty() {
                Vec::new()
            } else {
                copy_out(legacy, &format!("SELECT {cols} FROM {} WHERE {} = ANY({})", l.rule.name, l.rule.id_column, id_array(&copy))).await?
            };
            in_transaction(c, "BEGIN; SET LOCAL lock_timeout = '5s'", async || {
                if !gone.is_empty() {
                    c.batch_execute(&format!("DELETE FROM {table} WHERE {} = ANY({})", l.rule.id_column, id_array(&gone))).await?;
                }
                if !tuples.is_empty() {
                    copy_in(c, &l.rule.name, &cols, &tuples).await?;
                    c.batch_execute(&format!("INSERT INTO {table} ({cols}) SELECT {cols} FROM sg_load ON CONFLICT DO NOTHING")).await?;
                }
                Ok(())
            })
            .await?;
            if !copy.is_empty() {
                crate::steps::backfill::record_lookups(stores, legacy, &format!("{} = ANY({})", l.rule.id_column, id_array(&copy))).await?;
            }
        }
        Store::Shards => {
            let c = &stores.shards[shard];
            let tuples = if copy.is_empty() {
                Vec::new()
            } else {
                copy_out(c, &format!("SELECT {cols} FROM {table} WHERE {} = ANY({})", l.rule.id_column, id_array(&copy))).await?
            };
            // legacy is written inside the caller's transaction
            if !gone.is_empty() {
                legacy.batch_execute(&format!("DELETE FROM {} WHERE {} = ANY({})", l.rule.name, l.rule.id_column, id_array(&gone))).await?;
            }
            if !tuples.is_empty() {
                copy_in(legacy, &l.rule.name, &cols, &tuples).await?;
                legacy.batch_execute(&format!("INSERT INTO {t} ({cols}) SELECT {cols} FROM sg_load ON CONFLICT DO NOTHING", t = l.rule.name)).await?;
            }
        }
    }
    Ok(gone.len() + copy.len())
}

/// Removes rows that sit in the wrong shard or month table (legacy primary only).
async fn remove_misplaced(stores: &Stores, m: &Misplaced) -> anyhow::Result<()> {
    let l = &stores.layout;
    let c = &stores.shards[m.shard];
    c.batch_execute(&format!(
        "DELETE FROM {t} WHERE {k} = {merchant} AND NOT ({s} = {shard} AND {me} = '{suffix}')",
        t = l.rule.physical(m.table),
        k = l.rule.shard_key,
        merchant = m.merchant,
        s = l.shard_expr(),
        shard = m.shard,
        me = l.month_expr(),
        suffix = m.table.suffix()
    ))
    .await?;
    Ok(())
}

/// Groups whose aggregates differ (both directions).
fn differing(a: &HashMap<Key, Agg>, b: &HashMap<Key, Agg>) -> Vec<Key> {
    let mut keys: HashSet<Key> = a.iter().filter(|(k, v)| b.get(k) != Some(v)).map(|(k, _)| *k).collect();
    keys.extend(b.keys().filter(|k| !a.contains_key(k)).copied());
    let mut v: Vec<Key> = keys.into_iter().collect();
    v.sort();
    v
}

/// Keys drilled down per quiesced moment (legacy locked).
const KEYS_PER_LOCK: usize = 50;

/// Compares `scope`; with `repair`, makes the secondary equal to `primary`.
pub async fn compare(stores: &Stores, scope: &Scope, primary: Store, repair: bool) -> anyhow::Result<Report> {
    let l = &stores.layout;
    let shard_futs = (0..stores.shards.len()).map(|s| shard_groups(&stores.shards[s], l, s, scope));
    let (legacy, shards) = tokio::join!(legacy_groups_parallel(stores, scope), futures_util::future::join_all(shard_futs));
    let legacy = legacy?;
    let mut on_shards = HashMap::new();
    let mut misplaced = Vec::new();
    for r in shards {
        let (g, m) = r?;
        on_shards.extend(g);
        misplaced.extend(m);
    }
    let mut report = Report {
        legacy_rows: legacy.values().map(|a| a.count).sum(),
        shard_rows: on_shards.values().map(|a| a.count).sum(),
        groups: legacy.len().max(on_shards.len()),
        ..Report::default()
    };
    if repair && primary == Store::Legacy {
        for m in &misplaced {
            remove_misplaced(stores, m).await.with_context(|| format!("removing misplaced rows of merchant {} on db_{}", m.merchant, m.shard))?;
        }
    }
    let keys = differing(&legacy, &on_shards);
    report.differing_groups = keys.len();
    let legacy_conn = stores.legacy_conn().await?;
    for chunk in keys.chunks(KEYS_PER_LOCK) {
        in_transaction(&legacy_conn, "BEGIN", async || {
            if primary == Store::Legacy {
                legacy_conn.batch_execute(&format!("SET LOCAL lock_timeout = '10s'; LOCK TABLE {} IN SHARE MODE", l.rule.name)).await?;
            }
            for &(merchant, month) in chunk {
                let mut d = drill(stores, &legacy_conn, primary, merchant, month).await?;
                if primary == Store::Shards && d.rows() > 0 {
                    // the shards are written first: a write may be between the two stores
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    let again = drill(stores, &legacy_conn, primary, merchant, month).await?;
                    let keep = |a: &mut Vec<i64>, b: &[i64]| a.retain(|x| b.binary_search(x).is_ok());
                    keep(&mut d.missing, &again.missing);
                    keep(&mut d.extra, &again.extra);
                    keep(&mut d.changed, &again.changed);
                }
                if d.rows() == 0 {
                    continue;
                }
                if repair {
                    report.repaired += repair_key(stores, &legacy_conn, primary, &d).await?;
                }
                report.diffs.push(d);
            }
            Ok(())
        })
        .await?;
    }
    report.misplaced = misplaced;
    report.remaining = if repair {
        // what is left: compare the repaired groups again
        let mut left = 0;
        for d in &report.diffs {
            if let Some(m) = d.month {
                left += drill(stores, &stores.legacy, primary, d.merchant, m).await?.rows();
            }
        }
        left
    } else {
        report.differences()
    };
    Ok(report)
}

/// A summary table per month, and the first differing rows.
pub fn render(report: &Report, primary: Store) -> String {
    use std::fmt::Write;
    let mut per_month: BTreeMap<MonthKey, (usize, usize, usize, usize)> = BTreeMap::new();
    for d in &report.diffs {
        if let Some(m) = d.month {
            let e = per_month.entry(m).or_default();
            e.0 += 1;
            e.1 += d.missing.len();
            e.2 += d.extra.len();
            e.3 += d.changed.len();
        }
    }
    let mut s = String::new();
    let _ = writeln!(s, "compared {} legacy rows with {} shard rows in {} merchant×month groups (primary: {})", report.legacy_rows, report.shard_rows, report.groups, primary.name());
    if !per_month.is_empty() {
        let _ = writeln!(s, "{:<8} {:>10} {:>10} {:>10} {:>10}", "month", "merchants", "missing", "extra", "changed");
        for (m, (k, a, b, c)) in &per_month {
            let _ = writeln!(s, "{:<8} {k:>10} {a:>10} {b:>10} {c:>10}", m.suffix());
        }
    }
    for m in report.misplaced.iter().take(20) {
        let _ = writeln!(s, "misplaced: {} row(s) of merchant {} in db_{}.{}", m.rows, m.merchant, m.shard, m.table.suffix());
    }
    for d in report.diffs.iter().take(10) {
        let show = |v: &[i64]| v.iter().take(5).map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        let _ = writeln!(
            s,
            "merchant {} month {}: missing [{}] extra [{}] changed [{}]",
            d.merchant,
            d.month.map(|m| m.suffix()).unwrap_or_default(),
            show(&d.missing),
            show(&d.extra),
            show(&d.changed)
        );
    }
    let _ = writeln!(
        s,
        "differences: {} row(s) ({} group(s) differed in the checksums){}",
        report.differences(),
        report.differing_groups,
        if report.repaired > 0 { format!("; repaired {} row(s), {} left", report.repaired, report.remaining) } else { String::new() }
    );
    s
}

/// Applies what the outbox owes `target`: each distinct scope is compared and
/// repaired once (primary → `target`); returns the entries still pending.
/// `all` ignores the entries' backoff.
pub async fn drain_outbox(stores: &Stores, target: Store, all: bool, dry_run: bool) -> anyhow::Result<usize> {
    let d = &stores.default;
    let entries: Vec<_> = crate::state::due_outbox(d, 10_000, all).await?.into_iter().filter(|e| e.target == target).collect();
    if dry_run {
        println!("would apply {} outbox entr(ies) owed to {}", entries.len(), target.name());
        return Ok(0);
    }
    let mut by_scope: BTreeMap<(Vec<i32>, Vec<String>), Vec<i64>> = BTreeMap::new();
    for e in &entries {
        by_scope.entry((e.shards.clone(), e.months.clone())).or_default().push(e.id);
    }
    let mut left = 0;
    for ((shards, months), ids) in by_scope {
        match apply_scope(stores, &shards, &months, target).await {
            Ok(0) => crate::state::outbox_done(d, &ids).await?,
            Ok(n) => {
                left += ids.len();
                for id in &ids {
                    crate::state::outbox_retry_later(d, *id, &format!("{n} difference(s) left after a repair")).await?;
                }
            }
            Err(e) => {
                left += ids.len();
                for id in &ids {
                    crate::state::outbox_retry_later(d, *id, &format!("{e:#}")).await?;
                }
            }
        }
    }
    Ok(left)
}

/// Repairs `target` from the other store in one outbox scope; differences left.
pub async fn apply_scope(stores: &Stores, shards: &[i32], months: &[String], target: Store) -> anyhow::Result<usize> {
    let scope = Scope {
        shards: Some(shards.iter().filter_map(|s| usize::try_from(*s).ok()).collect()),
        months: if months.is_empty() { None } else { Some(months.iter().filter_map(|m| MonthKey::parse_suffix(m)).collect()) },
    };
    let r = compare(stores, &scope, target.other(), true).await?;
    Ok(r.remaining)
}
