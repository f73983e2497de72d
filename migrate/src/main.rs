//! `shardgate-migrate`: dual-write migration from a legacy single-table store
//! onto the shards (README, "Migrating from a legacy single table"). Exit codes: 0 done or nothing to do,
//! 1 differences found or a step failed, 2 bad arguments or config,
//! 3 refused (out of order, or another step is running).

use clap::{Parser, Subcommand};
use shardgate_config::Config;
use shardgate_migrate::db::{connect, Stores};
use shardgate_migrate::plan::{Phase, Step as PlanStep};
use shardgate_migrate::state;
use shardgate_migrate::steps::{self, backfill, gate, prepare, status, verify, Outcome};

/// Move a legacy single-table `t_order` onto shardgate's shards without downtime.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// shardgate config file (legacy_db, default_db and the shards are read from it).
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
    /// Create month tables and indexes on every shard, the fallback and control tables.
    Prepare,
    /// Proxies write legacy first, then the shards; reads from legacy.
    DualWrite,
    /// Copy history in merchant batches, resumable and throttled.
    Backfill {
        /// Rows per batch (whole merchants).
        #[arg(long, default_value_t = 20_000)]
        batch_rows: i64,
        /// Copy at most this many rows per second (0 = no limit).
        #[arg(long, default_value_t = 0)]
        max_rows_per_sec: u64,
    },
    /// Compare counts and checksums per merchant and month; exit 1 on differences.
    Verify {
        /// Make the secondary store equal to the primary for differing rows.
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
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardgate-migrate: {e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shardgate-migrate: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(args, config)) {
        Ok(o) => o.code(),
        Err(e) => {
            eprintln!("shardgate-migrate: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(args: Args, config: Config) -> anyhow::Result<Outcome> {
    let dry = args.dry_run;
    if let Step::Status = args.step {
        let d = connect(&config.default_dsn(), "default_db").await?;
        status::run(&d).await?;
        return Ok(Outcome::Ok);
    }
    shardgate_migrate::db::legacy_dsn(&config)?;
    let step = match &args.step {
        Step::Prepare => PlanStep::Prepare,
        Step::DualWrite => PlanStep::DualWrite,
        Step::Backfill { .. } => PlanStep::Backfill,
        Step::Verify { .. } => PlanStep::Verify,
        Step::SwitchReads => PlanStep::SwitchReads,
        Step::SwitchWrites => PlanStep::SwitchWrites,
        Step::Finalize => PlanStep::Finalize,
        Step::Rollback => PlanStep::Rollback,
        Step::Status => unreachable!("handled above"),
    };
    let stores = Stores::open(&config).await?;
    let d = &stores.default;
    if !dry && !steps::lock(d, step).await? {
        return Ok(Outcome::Refused);
    }
    let st = state::load(d).await?;
    let next = match gate(step, &st) {
        Ok(n) => n,
        Err(o) => return Ok(o),
    };
    if step == PlanStep::Prepare && config.ids.route_by_id {
        // with ids.route_by_id, a legacy id above ids.legacy_id_max would be decoded as a shardgate
        // id and a lookup by it routed to the shard and month it seems to name: refuse if any would
        // be wrong (without it, lookups by id go everywhere and any id is fine)
        let topo = shardgate_router::Topology::from_config(&config).map_err(anyhow::Error::msg)?;
        let l = &stores.layout;
        let rows = stores
            .legacy
            .query(
                &format!(
                    "SELECT {id}, {k}, (extract(epoch FROM {t}) * 1000)::bigint FROM {n} WHERE {id} > $1 LIMIT 1000000",
                    id = l.rule.id_column,
                    k = l.rule.shard_key,
                    t = l.rule.month_column,
                    n = l.rule.name
                ),
                &[&config.ids.legacy_id_max],
            )
            .await?;
        let now = jiff::Timestamp::now();
        let wrong = rows.iter().find(|r| {
            let (id, merchant, ms): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            match topo.ids.decode(id, now, &l.tz) {
                None => false,
                Some(d) => {
                    let month = jiff::Timestamp::from_millisecond(ms).ok().map(|t| shardgate_router::month::MonthKey::of(t, &l.tz));
                    usize::from(d.shard.0) != l.shard_of(merchant) || d.month.is_some_and(|m| Some(m) != month)
                }
            }
        });
        if let Some(r) = wrong {
            let id: i64 = r.get(0);
            eprintln!(
                "prepare: refused: legacy {} {id} looks like a shardgate id but names another shard or month than its row; \
                 set ids.legacy_id_max to the largest id the legacy system issued (at least {id}) in the config of every proxy, \
                 so lookups by legacy ids go to every shard instead of being decoded",
                l.rule.id_column
            );
            return Ok(Outcome::Refused);
        }
    }
    // the steps that only change the phase (and rollback after its drain)
    let move_phase = async |next: Option<Phase>| -> anyhow::Result<()> {
        match next {
            Some(to) if dry => println!("{}: would move the phase from {} to {to}", step.command(), st.effective_phase()),
            Some(to) => steps::change_phase(d, &st, to).await?,
            None => {}
        }
        Ok(())
    };
    match args.step {
        Step::Prepare => {
            for line in prepare::run(&stores, config.sharding.months_ahead, dry).await? {
                println!("{line}");
            }
            if !dry {
                if st.phase == Some(Phase::RolledBack) {
                    // starting over: the shards may be stale, everything is copied and verified again
                    d.execute(
                        "UPDATE shardgate_migration SET backfill_checkpoint = NULL, backfill_done = false, backfill_rows = 0, backfill_total = NULL, \
                         backfill_finished_at = NULL, verify_at = NULL, verify_rows = NULL, verify_differences = NULL WHERE id = 1",
                        &[],
                    )
                    .await?;
                }
                if st.phase != Some(Phase::Prepared) {
                    steps::change_phase(d, &st, Phase::Prepared).await?;
                }
            }
        }
        Step::Backfill { batch_rows, max_rows_per_sec } => {
            let s = backfill::run(&stores, backfill::Options { batch_rows, max_rows_per_sec, dry_run: dry }).await?;
            if !dry {
                println!(
                    "backfill: read {} legacy rows in {} batch(es), inserted {} on the shards, {:.2} s ({:.0} rows/s){}",
                    s.rows_read,
                    s.batches,
                    s.rows_inserted,
                    s.seconds,
                    s.rows_read as f64 / s.seconds.max(1e-9),
                    if s.finished { "; every merchant copied — run `verify` next" } else { "" }
                );
            }
        }
        Step::Verify { repair } => {
            let left = verify::run(&stores, st.effective_phase(), repair, dry).await?;
            if left > 0 {
                eprintln!("verify: {left} difference(s){}", if repair { " remain after the repair; run verify --repair again" } else { "; run `verify --repair` to make the secondary equal to the primary" });
                return Ok(Outcome::Differences);
            }
        }
        Step::Rollback => {
            if st.phase == Some(Phase::ShardWrites) {
                // legacy must hold every write the shards took: apply what the outbox still owes it
                let owed = shardgate_migrate::sync::drain_outbox(&stores, shardgate_migrate::Store::Legacy, true, dry).await?;
                if owed > 0 && !dry {
                    eprintln!("rollback: refused: {owed} write(s) could not be brought to legacy yet; fix the cause (see `status`) and run rollback again");
                    return Ok(Outcome::Differences);
                }
            }
            move_phase(next).await?;
        }
        _ => move_phase(next).await?,
    }
    Ok(Outcome::Ok)
}
