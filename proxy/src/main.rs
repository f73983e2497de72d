//! `shardgate` binary: load config, set up logging, run until SIGTERM/SIGINT;
//! `shardgate route` prints a routing plan without any database.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// jemalloc instead of glibc's malloc: a routed statement allocates and frees
/// a few dozen small buffers across tasks and threads, where glibc's malloc and
/// free took about a tenth of the proxy's CPU. mimalloc saved as much CPU but
/// held twice glibc's memory per idle client; jemalloc holds less (README,
/// Benchmarks).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// shardgate: a sharding gateway for PostgreSQL.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML config file.
    #[arg(short, long, default_value = "shardgate.toml")]
    config: PathBuf,
    /// Only validate the config and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Print the plan of one statement (targets, rewritten SQL, merge spec) without any database.
    Route(RouteArgs),
}

#[derive(clap::Args)]
struct RouteArgs {
    /// The statement.
    #[arg(long)]
    sql: String,
    /// A bind value for $1, $2, … in order (text form; `\N` is NULL).
    #[arg(long = "param")]
    params: Vec<String>,
    /// Current time (RFC 3339); default: now.
    #[arg(long)]
    now: Option<String>,
    /// Existing month tables as `yyyyMM..yyyyMM`; default: 12 months back to `sharding.months_ahead` ahead.
    #[arg(long)]
    months: Option<String>,
    /// Use the built-in example config instead of --config.
    #[arg(long)]
    example_config: bool,
}

/// `shardgate route`: exit 0 with the plan, 1 with `ERROR <sqlstate>: <message>`.
fn route(config: &shardgate_config::Config, a: &RouteArgs) -> anyhow::Result<i32> {
    use shardgate_router::id::{IdGenerator, SystemClock};
    use shardgate_router::month::MonthKey;
    let topo = shardgate_router::Topology::from_config(config).map_err(anyhow::Error::msg)?;
    let now: jiff::Timestamp = match &a.now {
        Some(t) => t.parse().with_context(|| format!("--now {t}: expected RFC 3339 like 2026-11-22T10:00:00Z"))?,
        None => jiff::Timestamp::now(),
    };
    let current = MonthKey::of(now, &topo.tz).ordinal();
    let (lo, hi) = match &a.months {
        Some(r) => {
            let (l, h) = r.split_once("..").context("--months must look like 202601..202612")?;
            let parse = |s: &str| MonthKey::parse_suffix(s).with_context(|| format!("--months: `{s}` is not yyyyMM"));
            (parse(l)?.ordinal(), parse(h)?.ordinal())
        }
        None => (current - 12, current + i32::try_from(config.sharding.months_ahead).unwrap_or(3)),
    };
    let months: Vec<MonthKey> = (lo..=hi).filter_map(MonthKey::from_ordinal).collect();
    let worker = config.ids.worker_id.unwrap_or(0);
    let ids = IdGenerator::new(topo.ids.clone(), worker, config.ids.max_clock_backward_ms, Box::new(SystemClock), 0)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let params: Vec<shardgate_router::Param<'_>> =
        a.params.iter().map(|p| if p == "\\N" { shardgate_router::Param::Null } else { shardgate_router::Param::Text(p) }).collect();
    let ctx = shardgate_router::Context { now, months: &months, ids: Some(&ids), zone: Default::default(), lookups: &[] };
    match shardgate_router::plan(&a.sql, &params, &topo, &ctx) {
        Ok(plan) => {
            print!("{plan}");
            Ok(0)
        }
        Err(e) => {
            println!("ERROR {}: {e}", e.sqlstate());
            Ok(1)
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Route(r)) = &args.command {
        let config = if r.example_config {
            shardgate_config::Config::example()
        } else {
            match shardgate_config::Config::load(&args.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("shardgate: {e} (or pass --example-config)");
                    std::process::exit(2);
                }
            }
        };
        std::process::exit(route(&config, r)?);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match shardgate_config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardgate: {e}");
            std::process::exit(2);
        }
    };
    if args.check {
        println!("config ok");
        return Ok(());
    }
    if config.server.worker_threads == 1 {
        // one thread: a current-thread runtime, without the work-stealing scheduler's
        // wake-ups of idle workers; it runs on a thread of its own, whose stack is the
        // planning stack (Client statements are planned on it, see PLANNING_STACK)
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting runtime")?;
        return std::thread::Builder::new()
            .name("shardgate".into())
            .stack_size(shardgate_router::PLANNING_STACK)
            .spawn(move || serve(&rt, config))
            .context("starting the runtime thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("the runtime thread panicked"))?;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // Client statements are planned on the workers (see PLANNING_STACK).
    builder.thread_stack_size(shardgate_router::PLANNING_STACK);
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads);
    }
    let rt = builder.enable_all().build().context("starting runtime")?;
    serve(&rt, config)
}

/// Runs the proxy on `rt` until a shutdown signal has been handled.
fn serve(rt: &tokio::runtime::Runtime, config: shardgate_config::Config) -> anyhow::Result<()> {
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        // the handlers are installed now, before startup's work: on one thread the task
        // below first runs when that work awaits, and a SIGTERM before would kill outright
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        tokio::spawn(async move {
            let (Ok(mut term), Ok(mut int)) = signals else { return };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutdown signal received");
            let _ = tx.send(true);
        });
        shardgate::run(config, rx).await
    })
}
