//! `shardgate` binary: load config, set up logging, run until SIGTERM/SIGINT.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads);
    }
    let rt = builder.enable_all().build().context("starting runtime")?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else { return };
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
