//! `verify [--repair]`: every merchant × month compared, differences
//! drilled down to rows, a summary printed, the result kept in the control
//! table. With `--repair` the secondary store is made equal to the primary
//! (legacy until `switch-writes`, the shards after) and the outbox entries
//! the repair covered are closed.

use crate::db::Stores;
use crate::plan::Phase;
use crate::state;
use crate::sync::{self, Scope};

/// Runs verify; returns the differences left.
pub async fn run(stores: &Stores, phase: Phase, repair: bool, dry_run: bool) -> anyhow::Result<usize> {
    let d = &stores.default;
    let primary = phase.primary();
    let outbox_upto = state::outbox_max_id(d).await?;
    let t0 = std::time::Instant::now();
    let report = sync::compare(stores, &Scope::default(), primary, repair && !dry_run).await?;
    let secs = t0.elapsed().as_secs_f64();
    print!("{}", sync::render(&report, primary));
    println!(
        "verify: {} rows in {secs:.2} s ({:.0} rows/s){}",
        report.legacy_rows + report.shard_rows,
        (report.legacy_rows + report.shard_rows) as f64 / secs.max(1e-9),
        if repair && dry_run { " — dry run: nothing repaired" } else { "" }
    );
    let left = if repair && !dry_run { report.remaining } else { report.differences() };
    if !dry_run {
        d.execute(
            "UPDATE shardgate_migration SET verify_at = now(), verify_rows = $1, verify_differences = $2 WHERE id = 1",
            &[&report.legacy_rows, &(left as i64)],
        )
        .await?;
        if left == 0 {
            let closed = state::outbox_done_upto(d, primary.other(), outbox_upto).await?;
            if closed > 0 {
                println!("closed {closed} outbox entr{} the comparison covered", if closed == 1 { "y" } else { "ies" });
            }
        }
    }
    Ok(left)
}
