//! `shardgate-migrate`: dual-write migration from a legacy single-table store
//! onto the shards. The subcommands are declared here; their engine lands with
//! the migration issue, and until then each one says so and exits with status 2.

use clap::{Parser, Subcommand};

/// Move a legacy single-table `t_order` onto shardgate's shards without downtime.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// shardgate config file (legacy_db and default_db are read from it).
    #[arg(short, long, default_value = "shardgate.toml", global = true)]
    config: std::path::PathBuf,
    /// Show what would be done without doing it.
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    step: Step,
}

/// The steps, in the order they must run.
#[derive(Subcommand, Debug)]
enum Step {
    /// Create month tables and indexes on every shard, and the fallback table.
    Prepare,
    /// Proxies write legacy first, then shards; reads from legacy.
    DualWrite,
    /// Copy history in merchant batches, resumable and throttled.
    Backfill,
    /// Compare counts and checksums per merchant and month.
    Verify {
        /// Make the shards equal to legacy for differing rows.
        #[arg(long)]
        repair: bool,
    },
    /// Reads from the shards; writes still dual.
    SwitchReads,
    /// Shards primary; legacy kept in step for rollback.
    SwitchWrites,
    /// Stop writing legacy.
    Finalize,
    /// Return to legacy (any phase before finalize).
    Rollback,
    /// Phase, backfill progress, outbox depth, last verify.
    Status,
}

fn main() {
    let args = Args::parse();
    eprintln!("shardgate-migrate: `{:?}` is not implemented yet (config {}, dry-run {}); it lands with the migration issue", args.step, args.config.display(), args.dry_run);
    std::process::exit(2);
}
