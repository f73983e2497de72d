//! `backfill`: copies legacy rows onto the shards in merchant batches.
//!
//! Per batch (whole merchants, about `batch_rows` rows):
//! 1. legacy: `BEGIN`, lock the batch's rows `FOR SHARE` — a dual-write on
//!    them (the proxy keeps its legacy transaction open until the shards are
//!    written) finishes first, and none starts until the batch is copied;
//! 2. `COPY (SELECT …) TO STDOUT (FORMAT binary)` once; rows are split per
//!    shard and month without decoding other columns;
//! 3. every shard, concurrently: `COPY` into a temp table, then
//!    `INSERT INTO t_order_yyyyMM … ON CONFLICT DO NOTHING` per month — a row
//!    already there (written by dual-write, so newer) is never overwritten;
//! 4. the checkpoint (last merchant id) is saved on `db_default`, then the
//!    legacy locks are released. A run killed anywhere re-copies at most one
//!    batch, which inserts nothing twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shardgate_router::month::MonthKey;

use crate::db::{copy_in, copy_out, in_transaction, Stores, Tuple};
use crate::state;

/// Backfill options.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Rows per batch (whole merchants, so a batch may be larger).
    pub batch_rows: i64,
    /// Throttle; 0 = as fast as it goes.
    pub max_rows_per_sec: u64,
    /// Show what would be copied only.
    pub dry_run: bool,
}

/// What one run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Legacy rows read.
    pub rows_read: i64,
    /// Rows inserted on the shards (the rest were there already).
    pub rows_inserted: u64,
    /// Batches.
    pub batches: u64,
    /// Wall time.
    pub seconds: f64,
    /// Every merchant copied.
    pub finished: bool,
}

/// Runs the backfill from the saved checkpoint.
pub async fn run(stores: &Stores, opts: Options) -> anyhow::Result<Summary> {
    let l = &stores.layout;
    let d = &stores.default;
    let st = state::load(d).await?;
    let (t, k) = (&l.rule.name, &l.rule.shard_key);
    let mut checkpoint = st.checkpoint;
    let total: i64 = match st.backfill_total {
        Some(t) => t,
        None => {
            let n: i64 = stores.legacy.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await?.get(0);
            if !opts.dry_run {
                d.execute("UPDATE shardgate_migration SET backfill_total = $1 WHERE id = 1", &[&n]).await?;
            }
            n
        }
    };
    let left: i64 = stores
        .legacy
        .query_one(&format!("SELECT count(*) FROM {t} WHERE $1::bigint IS NULL OR {k} > $1"), &[&checkpoint])
        .await?
        .get(0);
    if opts.dry_run {
        println!(
            "backfill would copy {left} legacy row(s) of {total}{} in batches of about {} rows{}",
            checkpoint.map(|c| format!(", resuming after merchant_id {c}")).unwrap_or_default(),
            opts.batch_rows,
            if opts.max_rows_per_sec > 0 { format!(", at most {} rows/s", opts.max_rows_per_sec) } else { String::new() }
        );
        return Ok(Summary::default());
    }
    if let Some(c) = checkpoint {
        println!("resuming after merchant_id {c}: {left} row(s) left of {total}");
    }
    let bar = ProgressBar::with_draw_target(Some(total.max(0) as u64), ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template("{spinner} backfill [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "),
    );
    bar.set_position((total - left).max(0) as u64);
    let batch_rows = if opts.max_rows_per_sec > 0 { opts.batch_rows.min(opts.max_rows_per_sec as i64).max(1) } else { opts.batch_rows.max(1) };
    let legacy = stores.legacy_conn().await?;
    let cols = l.col_list();
    let t0 = Instant::now();
    let mut sum = Summary::default();
    loop {
        // the batch: merchants after the checkpoint, up to the one holding row `batch_rows`
        let hi: Option<i64> = legacy
            .query_opt(&format!("SELECT {k} FROM {t} WHERE $1::bigint IS NULL OR {k} > $1 ORDER BY {k} OFFSET $2 LIMIT 1"), &[&checkpoint, &batch_rows])
            .await?
            .map(|r| r.get(0));
        let range = format!(
            "{}{}",
            checkpoint.map(|c| format!("{k} > {c}")).unwrap_or_else(|| "true".into()),
            hi.map(|h| format!(" AND {k} <= {h}")).unwrap_or_default()
        );
        legacy.batch_execute("BEGIN").await?;
        let r: anyhow::Result<(i64, u64, Option<i64>)> = async {
            let locked: i64 = legacy.query_one(&format!("SELECT count(*) FROM (SELECT 1 FROM {t} WHERE {range} FOR SHARE) s"), &[]).await?.get(0);
            let tuples = copy_out(&legacy, &format!("SELECT {cols} FROM {t} WHERE {range}")).await.context("reading a batch from legacy")?;
            let mut last = hi;
            // per shard, per month
            let mut split: Vec<BTreeMap<MonthKey, Vec<Tuple>>> = vec![BTreeMap::new(); stores.shards.len()];
            for tu in tuples {
                let merchant = tu.int(l.key_pos).ok_or_else(|| anyhow::anyhow!("a legacy row has no {k}"))?;
                let month = tu.month(l.time_pos, &l.tz).ok_or_else(|| anyhow::anyhow!("a legacy row of merchant {merchant} has no {}", l.rule.month_column))?;
                last = Some(last.map_or(merchant, |x: i64| x.max(merchant)));
                split[l.shard_of(merchant)].entry(month).or_default().push(tu);
            }
            let jobs = split.iter().enumerate().filter(|(_, m)| !m.is_empty()).map(|(s, months)| load_shard(stores, s, months));
            let mut inserted = 0;
            for r in futures_util::future::join_all(jobs).await {
                inserted += r?;
            }
            record_lookups(stores, &legacy, &range).await?;
            Ok((locked, inserted, last))
        }
        .await;
        let (n, inserted, last) = match r {
            Ok(v) => v,
            Err(e) => {
                let _ = legacy.batch_execute("ROLLBACK").await;
                bar.abandon();
                return Err(e);
            }
        };
        let done = hi.is_none();
        // the checkpoint first, then the legacy locks go
        d.execute(
            "UPDATE shardgate_migration SET backfill_checkpoint = coalesce($1, backfill_checkpoint), backfill_rows = backfill_rows + $2, \
             backfill_done = $3, backfill_finished_at = CASE WHEN $3 THEN now() END WHERE id = 1",
            &[&last, &n, &done],
        )
        .await
        .context("saving the checkpoint")?;
        legacy.batch_execute("COMMIT").await?;
        checkpoint = last.or(checkpoint);
        sum.rows_read += n;
        sum.rows_inserted += inserted;
        sum.batches += 1;
        bar.inc(n.max(0) as u64);
        if done {
            sum.finished = true;
            break;
        }
        if opts.max_rows_per_sec > 0 {
            let due = Duration::from_secs_f64(sum.rows_read as f64 / opts.max_rows_per_sec as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    bar.finish();
    sum.seconds = t0.elapsed().as_secs_f64();
    Ok(sum)
}

/// Fills the unique-lookup tables in `db_default` (`unique_lookups`, such as
/// `order_no`) for the legacy rows matching `range` (a batch, the rows a
/// repair copies), as the proxy records them for its own INSERTs:
/// value → shard key and month. Legacy is the primary while this runs, so its
/// row wins over an entry already there (one left by a row deleted since); a
/// run that dies before its checkpoint writes the same entries again.
pub(crate) async fn record_lookups(stores: &Stores, legacy: &tokio_postgres::Client, range: &str) -> anyhow::Result<()> {
    let l = &stores.layout;
    let (t, k, time) = (&l.rule.name, &l.rule.shard_key, &l.rule.month_column);
    let zone = &l.tz_name;
    for column in &l.rule.unique_lookups {
        let table = l.rule.lookup_table(column);
        let ty: String = legacy
            .query_one("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2", &[t, column])
            .await
            .with_context(|| format!("the type of {t}.{column} in legacy"))?
            .get(0);
        stores
            .default
            .batch_execute(&format!("CREATE TABLE IF NOT EXISTS {table} (value {ty} PRIMARY KEY, shard_key bigint NOT NULL, month text NOT NULL)"))
            .await
            .with_context(|| format!("creating {table} in db_default"))?;
        let rows = legacy
            .query(&format!("SELECT {column}::text, {k}, to_char({time} AT TIME ZONE $1, 'YYYYMM') FROM {t} WHERE {range} AND {column} IS NOT NULL"), &[&zone])
            .await
            .with_context(|| format!("reading {column} of a batch"))?;
        let values: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let keys: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
        let months: Vec<String> = rows.iter().map(|r| r.get(2)).collect();
        stores
            .default
            .execute(
                &format!("INSERT INTO {table} (value, shard_key, month) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[]) \
                     ON CONFLICT (value) DO UPDATE SET shard_key = EXCLUDED.shard_key, month = EXCLUDED.month"),
                &[&values, &keys, &months],
            )
            .await
            .with_context(|| format!("recording {column} values in {table}"))?;
    }
    Ok(())
}

/// Loads one shard's part of a batch; returns rows inserted.
async fn load_shard(stores: &Stores, shard: usize, months: &BTreeMap<MonthKey, Vec<Tuple>>) -> anyhow::Result<u64> {
    let l = &stores.layout;
    let c = &stores.shards[shard];
    let cols = l.col_list();
    for m in months.keys() {
        crate::db::create_month_table(c, &l.rule, *m, shard).await?;
    }
    in_transaction(c, "BEGIN", async || {
        let all: Vec<Tuple> = months.values().flatten().cloned().collect();
        copy_in(c, &l.rule.name, &cols, &all).await.with_context(|| format!("copying into db_{shard}"))?;
        let mut n = 0;
        for m in months.keys() {
            n += c
                .execute(&format!("INSERT INTO {} ({cols}) SELECT {cols} FROM sg_load WHERE {} ON CONFLICT DO NOTHING", l.rule.physical(*m), l.month_range(*m)), &[])
                .await
                .with_context(|| format!("inserting into db_{shard}.{}", l.rule.physical(*m)))?;
        }
        Ok(n)
    })
    .await
}
