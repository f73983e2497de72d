//! `devcluster`: the local system for humans (`make up`, `make down`,
//! `make shard-stop SHARD=n`, `make shard-start SHARD=n`). State lives in
//! `target/dev/cluster.json`; every command is idempotent.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use shardgate_tests::{stop_all, Cluster, ClusterInfo, Options};

#[derive(Parser)]
struct Args {
    /// Where cluster.json, data, logs and the config live.
    #[arg(long, default_value = "target/dev")]
    dir: PathBuf,
    /// Extra TOML lines for the proxy's [server] section (e.g. "worker_threads = 1").
    #[arg(long, default_value = "")]
    server_toml: String,
    /// Extra TOML lines for the proxy's [pool] section (e.g. "size = 4").
    #[arg(long, default_value = "")]
    pool_toml: String,
    /// Extra TOML sections appended to the config (`\n` for newlines).
    #[arg(long, default_value = "")]
    extra_toml: String,
    /// Configure [legacy_db] (the proxy follows a migration from it).
    #[arg(long)]
    legacy: bool,
    /// TLS on every leg: a throwaway CA in <dir>/tls, PostgreSQL and Redis
    /// accept only TLS, the proxy requires it from clients (`make up` does this).
    #[arg(long)]
    tls: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start PostgreSQL clusters, Redis and the proxy in the background.
    Up,
    /// Stop everything and remove the data.
    Down,
    /// Stop (immediate mode) the cluster holding shard N.
    ShardStop { shard: usize },
    /// Start the cluster holding shard N again.
    ShardStart { shard: usize },
    /// Print cluster.json.
    Status,
}

fn load(dir: &Path) -> Result<Option<ClusterInfo>> {
    let p = dir.join("cluster.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p)?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?))
}

fn alive(pid: Option<u32>) -> bool {
    pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::path::absolute(&args.dir)?;
    match args.cmd {
        Cmd::Up => {
            if let Some(info) = load(&dir)? {
                if alive(info.proxy_pid) && info.clusters.iter().all(|c| c.is_running()) {
                    println!("already up");
                    print_usage(&dir, &info);
                    return Ok(());
                }
                stop_all(&info);
            }
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            let opts = Options { server_toml: args.server_toml.replace("\\n", "\n"), pool_toml: args.pool_toml.replace("\\n", "\n"), extra_toml: args.extra_toml.replace("\\n", "\n"), legacy: args.legacy, tls: args.tls, ..Options::default() };
            let info = Cluster::start_in(&dir, opts)?.detach();
            std::fs::write(dir.join("cluster.json"), serde_json::to_string_pretty(&info)?)?;
            print_usage(&dir, &info);
        }
        Cmd::Down => {
            if let Some(info) = load(&dir)? {
                stop_all(&info);
            }
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            println!("down");
        }
        Cmd::ShardStop { shard } | Cmd::ShardStart { shard } => {
            let Some(info) = load(&dir)? else { bail!("not up; run `make up` first") };
            let c = info.cluster_of_shard(shard).with_context(|| format!("no shard {shard}"))?;
            let start = matches!(args.cmd, Cmd::ShardStart { .. });
            match (start, c.is_running()) {
                (true, true) | (false, false) => println!("cluster `{}` (shard {shard}) already {}", c.name, if start { "running" } else { "stopped" }),
                (true, false) => {
                    c.start()?;
                    println!("started cluster `{}` holding {}", c.name, c.databases.join(", "));
                }
                (false, true) => {
                    c.stop_immediate()?;
                    println!("stopped cluster `{}` holding {}", c.name, c.databases.join(", "));
                }
            }
        }
        Cmd::Status => match load(&dir)? {
            Some(info) => println!("{}", serde_json::to_string_pretty(&info)?),
            None => println!("not up"),
        },
    }
    Ok(())
}

fn print_usage(dir: &Path, info: &ClusterInfo) {
    println!("shardgate is up.");
    println!("  connect:  psql \"{}\"", info.proxy_dsn);
    if let Some(ca) = &info.tls_ca {
        println!("  TLS:      every leg; throwaway CA {} (clients: sslmode=verify-full sslrootcert=<it>)", ca.display());
    }
    println!("  admin:    curl {}/metrics", info.admin_url);
    println!("  state:    {}/cluster.json   logs: {}/shardgate.log", dir.display(), dir.display());
    println!("  stop:     make down");
}
