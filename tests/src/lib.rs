//! The local cluster, written once and used by the integration tests, by
//! `make up` (through the `devcluster` binary) and by the benchmarks.
//!
//! Layout: three PostgreSQL 15 clusters on free loopback ports so that one
//! shard can be stopped alone — `shard0` holds `db_0`; `shards` holds
//! `db_1`..`db_7`; `main` holds `db_default` and `legacy` — plus an optional
//! Redis and the `shardgate` proxy. PostgreSQL refuses to run as root, so
//! when we are root every server command runs as the `postgres` user.

pub mod gen;
pub mod raw;
pub mod schema;
pub mod workload;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Password of the `postgres` superuser on every test cluster (backends use SCRAM).
pub const PG_PASSWORD: &str = "postgres";
/// Proxy user with SCRAM-SHA-256.
pub const APP_USER: (&str, &str) = ("app", "app-secret");
/// Proxy user with md5.
pub const MD5_USER: (&str, &str) = ("legacyapp", "md5-secret");
/// Proxy admin user.
pub const ADMIN_USER: (&str, &str) = ("admin", "admin-secret");

/// Directory of the PostgreSQL 15 server binaries.
pub fn pg_bin() -> PathBuf {
    std::env::var_os("PG_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn is_root() -> bool {
    // SAFETY-free: reading our uid through the proc filesystem
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A command that runs as `postgres` when we are root.
fn pg_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn chown_postgres(path: &Path) -> Result<()> {
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("-R").arg("postgres:postgres").arg(path);
                c
            },
            "chown",
        )?;
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind an ephemeral port");
        let mut used = USED.lock().unwrap_or_else(|p| p.into_inner());
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listening on 127.0.0.1:{port} after {timeout:?}")
}

/// An initdb'd data directory copied for each cluster (initdb runs once per process).
fn template_dir() -> Result<PathBuf> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            (|| -> Result<PathBuf> {
                // shared by every process on the machine: built once, then renamed into place atomically
                let fixed = std::env::temp_dir().join("shardgate-pgtemplate-15-v1");
                if fixed.join("data").join("PG_VERSION").exists() {
                    return Ok(fixed.join("data"));
                }
                let root = tempfile::Builder::new().prefix("shardgate-pgtemplate-").tempdir()?.keep();
                chown_postgres(&root)?;
                let data = root.join("data");
                let pwfile = root.join("pw");
                fs::write(&pwfile, PG_PASSWORD)?;
                chown_postgres(&pwfile)?;
                let mut c = pg_command(&pg_bin().join("initdb"));
                c.arg("-D")
                    .arg(&data)
                    .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"])
                    .arg(format!("--pwfile={}", pwfile.display()));
                run(c, "initdb")?;
                if fs::rename(&root, &fixed).is_err() {
                    // another process won the race; use its template
                    let _ = fs::remove_dir_all(&root);
                }
                Ok(fixed.join("data"))
            })()
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// One PostgreSQL cluster (a postmaster) with some databases.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgCluster {
    /// Role in the layout: `shard0`, `shards`, `main`.
    pub name: String,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Databases created on it.
    pub databases: Vec<String>,
}

impl PgCluster {
    /// Creates (from the template) and starts a cluster under `root/name`.
    pub fn create(root: &Path, name: &str, databases: &[&str]) -> Result<PgCluster> {
        let dir = root.join(name);
        fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let template = template_dir()?;
        run(
            {
                let mut c = Command::new("cp");
                c.arg("-a").arg(&template).arg(&data);
                c
            },
            "copy template cluster",
        )?;
        fs::create_dir_all(dir.join("sock"))?;
        chown_postgres(&dir)?;
        // fsync is off (a killed postmaster loses nothing the OS has), but commits wait for
        // their WAL write: tests kill shards with immediate stop and count every acknowledged row
        let conf = "\nlisten_addresses = '127.0.0.1'\nfsync = off\nsynchronous_commit = on\nfull_page_writes = off\nmax_connections = 300\nshared_buffers = 128MB\nmax_prepared_transactions = 64\nlog_min_messages = warning\nlog_statement = 'none'\n";
        let mut f = fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut f, conf.as_bytes())?;
        let cluster = PgCluster { name: name.to_string(), port: free_port(), data_dir: data, databases: databases.iter().map(|s| s.to_string()).collect() };
        cluster.start()?;
        for db in databases {
            let mut c = pg_command(&pg_bin().join("createdb"));
            c.args(["-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", "postgres", db]).env("PGPASSWORD", PG_PASSWORD);
            run(c, &format!("createdb {db}"))?;
        }
        Ok(cluster)
    }

    /// Runs SQL in one of its databases (psql, stops at the first error).
    pub fn psql(&self, db: &str, sql: &str) -> Result<()> {
        let mut c = pg_command(&pg_bin().join("psql"));
        c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD);
        c.stdout(Stdio::null());
        run(c, &format!("psql {db}"))
    }

    fn sock_dir(&self) -> PathBuf {
        self.data_dir.parent().map(|p| p.join("sock")).unwrap_or_default()
    }

    /// Starts the postmaster and waits until it accepts connections.
    pub fn start(&self) -> Result<()> {
        self.pg_ctl_up("start")
    }

    /// `pg_ctl start` or `restart` with this cluster's port and socket directory;
    /// waits until it accepts connections.
    fn pg_ctl_up(&self, action: &str) -> Result<()> {
        let mut c = pg_command(&pg_bin().join("pg_ctl"));
        c.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.data_dir.parent().unwrap_or(Path::new("/tmp")).join("postgres.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!("-p {} -k {}", self.port, self.sock_dir().display()))
            .arg(action);
        run(c, &format!("pg_ctl {action} ({})", self.name))?;
        wait_for_port(self.port, Duration::from_secs(30))
    }

    /// Stops the postmaster in immediate mode (like a crash: no checkpoint).
    pub fn stop_immediate(&self) -> Result<()> {
        let mut c = pg_command(&pg_bin().join("pg_ctl"));
        c.arg("-D").arg(&self.data_dir).args(["-m", "immediate", "-w", "stop"]);
        run(c, &format!("pg_ctl stop ({})", self.name))
    }

    /// True when the postmaster is running.
    pub fn is_running(&self) -> bool {
        let mut c = pg_command(&pg_bin().join("pg_ctl"));
        c.arg("-D").arg(&self.data_dir).arg("status");
        c.stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
    }

    /// DSN of one of its databases, as the `postgres` user.
    pub fn dsn(&self, db: &str) -> String {
        format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// DSN of one of its databases over TLS, verifying the server against `ca`.
    pub fn dsn_tls(&self, db: &str, ca: &Path) -> String {
        format!("{}?sslmode=verify-full&sslrootcert={}", self.dsn(db), ca.display())
    }

    /// Turns TLS on with the certificates in `certs` (see `scripts/gen_certs.sh`)
    /// and refuses every TCP connection without it; restarts the postmaster.
    pub fn require_tls(&self, certs: &Path) -> Result<()> {
        for f in ["server.crt", "server.key"] {
            fs::copy(certs.join(f), self.data_dir.join(f))?;
        }
        chown_postgres(&self.data_dir)?;
        let mut conf = fs::OpenOptions::new().append(true).open(self.data_dir.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut conf, b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")?;
        let hba = self.data_dir.join("pg_hba.conf");
        let rules = fs::read_to_string(&hba)?;
        fs::write(&hba, format!("hostnossl all all 0.0.0.0/0 reject\nhostnossl all all ::/0 reject\n{rules}"))?;
        self.pg_ctl_up("restart")
    }
}

/// Makes a throwaway CA and a server certificate for 127.0.0.1 in `dir`
/// (`ca.crt`, `server.crt`, `server.key`) with `scripts/gen_certs.sh`.
pub fn make_certs(dir: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen_certs.sh");
    let mut c = Command::new("bash");
    c.arg(script).arg(dir);
    run(c, "scripts/gen_certs.sh (needs openssl)")
}

/// What `cluster.json` holds: everything a client, test or benchmark needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Connect here as an application (`app` user).
    pub proxy_dsn: String,
    /// Admin HTTP base URL.
    pub admin_url: String,
    /// Shard DSNs in shard order (`db_0` .. `db_7`).
    pub shards: Vec<String>,
    /// `db_default`.
    pub default_dsn: String,
    /// The legacy single-table store.
    pub legacy_dsn: String,
    /// Redis, if started.
    pub redis_url: Option<String>,
    /// The PostgreSQL clusters.
    pub clusters: Vec<PgCluster>,
    /// Proxy process id.
    pub proxy_pid: Option<u32>,
    /// Proxy port.
    pub proxy_port: u16,
    /// Admin HTTP port.
    pub admin_port: u16,
    /// Redis process id.
    pub redis_pid: Option<u32>,
    /// Where the config, logs and data live.
    pub root: PathBuf,
    /// CA of every TLS leg, when the system was started with TLS.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

impl ClusterInfo {
    /// The cluster holding shard `n`.
    pub fn cluster_of_shard(&self, n: usize) -> Option<&PgCluster> {
        let db = format!("db_{n}");
        self.clusters.iter().find(|c| c.databases.contains(&db))
    }

    /// DSN for a proxy user.
    pub fn proxy_dsn_for(&self, user: &str, password: &str) -> String {
        match &self.tls_ca {
            Some(ca) => format!("postgres://{user}:{password}@127.0.0.1:{}/shardgate?sslmode=verify-full&sslrootcert={}", self.proxy_port, ca.display()),
            None => format!("postgres://{user}:{password}@127.0.0.1:{}/shardgate?sslmode=disable", self.proxy_port),
        }
    }
}

/// Options for [`Cluster::start`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Start all three clusters (false: only `main`, for proxy-core tests;
    /// shard DSNs then point at `main` so the config stays valid).
    pub all_clusters: bool,
    /// Start Redis.
    pub redis: bool,
    /// Start the proxy.
    pub proxy: bool,
    /// Extra TOML appended to `[server]`.
    pub server_toml: String,
    /// Extra TOML appended to `[pool]`.
    pub pool_toml: String,
    /// Extra TOML appended at the end (whole sections).
    pub extra_toml: String,
    /// Configure `[legacy_db]` (the proxy then follows a migration from it).
    pub legacy: bool,
    /// TLS on every leg: a throwaway CA; the PostgreSQL clusters refuse
    /// plaintext; Redis listens with TLS only; the proxy presents a
    /// certificate and requires TLS from clients; every DSN verifies.
    pub tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { all_clusters: true, redis: true, proxy: true, server_toml: String::new(), pool_toml: String::new(), extra_toml: String::new(), legacy: false, tls: false }
    }
}

/// A running local system; stops everything on drop unless [`Cluster::detach`]ed.
pub struct Cluster {
    /// Addresses and processes.
    pub info: ClusterInfo,
    /// Keeps a temp dir alive (tests).
    _tmp: Option<tempfile::TempDir>,
    detached: bool,
    proxy: Option<std::process::Child>,
}

/// Path of the `shardgate` binary: `$SHARDGATE_BIN`, else the most recently
/// built of target/{release,debug} (`$SHARDGATE_PROFILE` picks one, or `serve`).
pub fn shardgate_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SHARDGATE_BIN") {
        return Ok(PathBuf::from(p));
    }
    built_bin("shardgate")
}

/// Path of the `shardgate-migrate` binary (the same rules as [`shardgate_bin`]).
pub fn migrate_bin() -> Result<PathBuf> {
    built_bin("shardgate-migrate")
}

fn built_bin(name: &str) -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| manifest.join("../target"));
    // `serve` (make up's build) only when asked for: tests take release or debug
    let newest = ["release", "debug", "serve"]
        .iter()
        .filter(|profile| std::env::var("SHARDGATE_PROFILE").map_or(**profile != "serve", |want| want == **profile))
        .map(|profile| target.join(profile).join(name))
        .filter_map(|p| fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .max_by_key(|(t, _)| *t);
    if let Some((_, p)) = newest {
        return Ok(p);
    }
    bail!("{name} binary not found under {}; run `cargo build --bins` first (make test does)", target.display())
}

impl Cluster {
    /// Starts a system in a fresh temp dir (tests).
    pub fn start_temp(opts: Options) -> Result<Cluster> {
        let tmp = tempfile::Builder::new().prefix("shardgate-test-").tempdir()?;
        let mut c = Cluster::start_in(tmp.path(), opts)?;
        c._tmp = Some(tmp);
        Ok(c)
    }

    /// Starts a system with its files under `root`.
    pub fn start_in(root: &Path, opts: Options) -> Result<Cluster> {
        fs::create_dir_all(root)?;
        let certs = root.join("tls");
        if opts.tls {
            make_certs(&certs)?;
        }
        let ca = opts.tls.then(|| certs.join("ca.crt"));
        let dsn = |c: &PgCluster, db: &str| match &ca {
            Some(ca) => c.dsn_tls(db, ca),
            None => c.dsn(db),
        };
        let mut clusters = Vec::new();
        let main = PgCluster::create(root, "main", &["db_default", "legacy"])?;
        let shard_dsns: Vec<String>;
        if opts.all_clusters {
            let s0 = PgCluster::create(root, "shard0", &["db_0"])?;
            let rest = PgCluster::create(root, "shards", &["db_1", "db_2", "db_3", "db_4", "db_5", "db_6", "db_7"])?;
            shard_dsns = std::iter::once(dsn(&s0, "db_0")).chain((1..8).map(|i| dsn(&rest, &format!("db_{i}")))).collect();
            // the order schema: every shard holds the template its month tables are made from;
            // db_default holds it too, empty, so catalog lookups (psql \d t_order) describe it
            main.psql("db_default", schema::T_ORDER_TEMPLATE)?;
            // the legacy single-table store starts with the same table, empty
            main.psql("legacy", schema::T_ORDER_TEMPLATE)?;
            s0.psql("db_0", schema::T_ORDER_TEMPLATE)?;
            for i in 1..8 {
                rest.psql(&format!("db_{i}"), schema::T_ORDER_TEMPLATE)?;
            }
            clusters.push(s0);
            clusters.push(rest);
        } else {
            shard_dsns = (0..8).map(|_| dsn(&main, "db_default")).collect();
        }
        main.psql("db_default", schema::T_MERCHANT)?;
        let default_dsn = dsn(&main, "db_default");
        let legacy_dsn = dsn(&main, "legacy");
        clusters.push(main);
        if opts.tls {
            for c in &clusters {
                c.require_tls(&certs)?;
            }
        }
        let mut cluster = Cluster {
            info: ClusterInfo {
                proxy_dsn: String::new(),
                admin_url: String::new(),
                shards: shard_dsns,
                default_dsn,
                legacy_dsn,
                redis_url: None,
                clusters,
                proxy_pid: None,
                proxy_port: free_port(),
                admin_port: free_port(),
                redis_pid: None,
                root: root.to_path_buf(),
                tls_ca: ca.clone(),
            },
            _tmp: None,
            detached: false,
            proxy: None,
        };
        cluster.info.proxy_dsn = cluster.info.proxy_dsn_for(APP_USER.0, APP_USER.1);
        cluster.info.admin_url = format!("http://127.0.0.1:{}", cluster.info.admin_port);
        if opts.redis {
            cluster.start_redis()?;
        }
        cluster.write_config(&opts)?;
        if opts.proxy {
            cluster.start_proxy()?;
        }
        Ok(cluster)
    }

    fn start_redis(&mut self) -> Result<()> {
        self.start_redis_on(free_port())
    }

    /// Kills Redis with SIGKILL (its data is gone: it keeps none on disk).
    /// Panics when Redis is not running under this harness: a kill that
    /// silently did nothing would make a Redis-outage test prove nothing.
    pub fn kill_redis(&mut self) {
        let pid = self.info.redis_pid.take().expect("kill_redis: this system's Redis pid is unknown (never started, or already killed)");
        signal(pid, "KILL");
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let port = self.info.redis_url.as_deref().and_then(|u| u.rsplit(':').next()).and_then(|p| p.parse::<u16>().ok()).expect("redis port");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "Redis (pid {pid}) still accepts connections on port {port} after SIGKILL");
    }

    /// Starts Redis again on the port it had.
    pub fn restart_redis(&mut self) -> Result<()> {
        let url = self.info.redis_url.clone().context("Redis was never started")?;
        let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).context("redis url port")?;
        let _ = fs::remove_file(self.info.root.join("redis").join("redis.pid"));
        self.start_redis_on(port)
    }

    /// Starts another proxy on new ports with the same configuration (same
    /// shards, db_default and Redis); it is killed when the value is dropped.
    pub fn start_extra_proxy(&self) -> Result<ExtraProxy> {
        self.start_extra_proxy_edited(|c| c)
    }

    /// [`Cluster::start_extra_proxy`] with its configuration text changed by `edit` first.
    pub fn start_extra_proxy_edited(&self, edit: impl FnOnce(String) -> String) -> Result<ExtraProxy> {
        let (port, admin) = (free_port(), free_port());
        let config = edit(fs::read_to_string(self.config_path())?)
            .replacen(&format!("listen = \"127.0.0.1:{}\"", self.info.proxy_port), &format!("listen = \"127.0.0.1:{port}\""), 1)
            .replacen(&format!("admin_listen = \"127.0.0.1:{}\"", self.info.admin_port), &format!("admin_listen = \"127.0.0.1:{admin}\""), 1);
        let path = self.info.root.join(format!("shardgate-{port}.toml"));
        fs::write(&path, config)?;
        let log_path = self.info.root.join(format!("shardgate-{port}.log"));
        let child = spawn_proxy(&path, &log_path)?;
        let extra = ExtraProxy {
            dsn: self.info.proxy_dsn.replacen(&format!(":{}/", self.info.proxy_port), &format!(":{port}/"), 1),
            admin_url: format!("http://127.0.0.1:{admin}"),
            log: log_path,
            child,
        };
        let t0 = Instant::now();
        while !matches!(http_get(&format!("{}/livez", extra.admin_url)), Ok((200, _))) {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("second shardgate did not start serving; see {}", extra.log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(extra)
    }

    fn start_redis_on(&mut self, port: u16) -> Result<()> {
        let dir = self.info.root.join("redis");
        fs::create_dir_all(&dir)?;
        let pidfile = dir.join("redis.pid");
        let mut c = Command::new("redis-server");
        if self.info.tls_ca.is_some() {
            // TLS only: the plain port is closed
            let certs = self.info.root.join("tls");
            c.args(["--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(certs.join("server.crt"))
                .arg("--tls-key-file")
                .arg(certs.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(certs.join("ca.crt"));
        } else {
            c.args(["--port", &port.to_string()]);
        }
        c.args(["--bind", "127.0.0.1", "--daemonize", "yes", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--logfile")
            .arg(dir.join("redis.log"));
        run(c, "redis-server (install it: apt-get install -y redis-server)")?;
        wait_for_port(port, Duration::from_secs(10))?;
        // the daemon creates its pidfile and writes it after: wait for a number, not for the file
        let t0 = Instant::now();
        let pid = loop {
            if let Some(pid) = fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
                break pid;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("redis-server on port {port} wrote no pid to {}", pidfile.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.info.redis_pid = Some(pid);
        let scheme = if self.info.tls_ca.is_some() { "rediss" } else { "redis" };
        self.info.redis_url = Some(format!("{scheme}://127.0.0.1:{port}"));
        Ok(())
    }

    /// Runs `shardgate-migrate <args>` with this system's config; returns its output.
    pub fn migrate(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(migrate_bin()?).arg("--config").arg(self.config_path()).args(args).stdin(Stdio::null()).output().context("running shardgate-migrate")
    }

    /// Starts `shardgate-migrate <args>` without waiting (stdout and stderr to `log`).
    pub fn migrate_spawn(&self, args: &[&str], log: &Path) -> Result<std::process::Child> {
        let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
        Command::new(migrate_bin()?)
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning shardgate-migrate")
    }

    /// Creates the oracle of the comparing tests: database `reference` on the
    /// main cluster holding one plain `t_order` (with an identity id for rows
    /// that omit it when `identity_ids`); returns its DSN.
    pub fn create_reference(&self, identity_ids: bool) -> Result<String> {
        let main = self.info.clusters.iter().find(|p| p.databases.iter().any(|d| d == "db_default")).context("no main cluster")?;
        main.psql("postgres", "CREATE DATABASE reference")?;
        main.psql("reference", schema::T_ORDER_TEMPLATE)?;
        if identity_ids {
            main.psql("reference", "ALTER TABLE t_order ALTER id ADD GENERATED BY DEFAULT AS IDENTITY (START 50000000)")?;
        }
        Ok(self.info.default_dsn.replace("/db_default", "/reference"))
    }

    /// Path of the generated proxy config.
    pub fn config_path(&self) -> PathBuf {
        self.info.root.join("shardgate.toml")
    }

    fn write_config(&self, opts: &Options) -> Result<()> {
        let i = &self.info;
        let mut t = String::new();
        t.push_str(&format!("[server]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\n{}\n", i.proxy_port, i.admin_port, opts.server_toml));
        if i.tls_ca.is_some() {
            let certs = i.root.join("tls");
            t.push_str(&format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nrequire_tls = true\n",
                certs.join("server.crt").display(),
                certs.join("server.key").display()
            ));
        }
        for (name, pw, extra) in
            [(APP_USER.0, APP_USER.1, ""), (MD5_USER.0, MD5_USER.1, "auth_method = \"md5\"\n"), (ADMIN_USER.0, ADMIN_USER.1, "admin = true\n")]
        {
            t.push_str(&format!("[[users]]\nname = \"{name}\"\npassword = \"{pw}\"\n{extra}"));
        }
        t.push_str(&format!("[pool]\n{}\n", opts.pool_toml));
        for s in &i.shards {
            t.push_str(&format!("[[shards]]\ndsn = \"{s}\"\n"));
        }
        t.push_str(&format!("[default_db]\ndsn = \"{}\"\n", i.default_dsn));
        if opts.legacy {
            t.push_str(&format!("[legacy_db]\ndsn = \"{}\"\n", i.legacy_dsn));
        }
        if let Some(r) = &i.redis_url {
            t.push_str(&format!("[redis]\nurl = \"{r}\"\n"));
            if let Some(ca) = &i.tls_ca {
                t.push_str(&format!("tls_ca_file = \"{}\"\n", ca.display()));
            }
        }
        t.push_str(&opts.extra_toml);
        fs::write(self.config_path(), t)?;
        Ok(())
    }

    /// Starts the proxy (detached from our process group) and waits for its port.
    pub fn start_proxy(&mut self) -> Result<()> {
        let child = spawn_proxy(&self.config_path(), &self.info.root.join("shardgate.log"))?;
        self.info.proxy_pid = Some(child.id());
        self.proxy = Some(child);
        wait_for_port(self.info.proxy_port, Duration::from_secs(30))
            .with_context(|| format!("shardgate did not start; see {}", self.info.root.join("shardgate.log").display()))?;
        wait_for_port(self.info.admin_port, Duration::from_secs(10))?;
        // the ports are bound before startup work (month tables, fallback table) is done;
        // the admin endpoint answers once the proxy serves
        let t0 = Instant::now();
        while !matches!(http_get(&format!("{}/livez", self.info.admin_url)), Ok((200, _))) {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("shardgate did not start serving; see {}", self.info.root.join("shardgate.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the proxy with SIGKILL (a crash: nothing is finished or cleaned up).
    pub fn kill_proxy(&mut self) -> Result<()> {
        if let Some(pid) = self.info.proxy_pid.take() {
            signal(pid, "KILL");
        }
        if let Some(mut child) = self.proxy.take() {
            child.wait()?;
        }
        Ok(())
    }

    /// Sends SIGTERM to the proxy and waits for it to exit.
    pub fn stop_proxy(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let Some(pid) = self.info.proxy_pid.take() else {
            return Ok(None);
        };
        signal(pid, "TERM");
        let t0 = Instant::now();
        if let Some(mut child) = self.proxy.take() {
            while t0.elapsed() < timeout {
                if let Some(st) = child.try_wait()? {
                    return Ok(Some(st));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let st = child.wait()?;
            bail!("shardgate did not exit within {timeout:?} of SIGTERM (killed: {st})");
        }
        // started by another process (make up): wait for the pid to go away
        while t0.elapsed() < timeout {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(pid, "KILL");
        Ok(None)
    }

    /// Keeps everything running after this value is dropped (`make up`).
    pub fn detach(mut self) -> ClusterInfo {
        self.detached = true;
        if let Some(child) = self.proxy.take() {
            std::mem::forget(child);
        }
        self.info.clone()
    }

    /// The log of the proxy so far (for test failure messages).
    pub fn proxy_log(&self) -> String {
        fs::read_to_string(self.info.root.join("shardgate.log")).unwrap_or_default()
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Stops everything a [`ClusterInfo`] describes; safe to call twice.
pub fn stop_all(info: &ClusterInfo) {
    if let Some(pid) = info.proxy_pid {
        signal(pid, "TERM");
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(pid, "KILL");
    }
    if let Some(pid) = info.redis_pid {
        signal(pid, "TERM");
    }
    for c in &info.clusters {
        if c.is_running() {
            let _ = c.stop_immediate();
        }
    }
}

/// Starts shardgate with a config, its output appended to `log`.
fn spawn_proxy(config: &Path, log: &Path) -> Result<std::process::Child> {
    let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new(shardgate_bin()?)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", std::env::var("SHARDGATE_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning shardgate")
}

/// Any value, as the raw bytes the server sent (binary format): equality of
/// these is stricter than equality of decoded values.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
pub struct Raw(pub Option<Vec<u8>>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(_: &tokio_postgres::types::Type, raw: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }
    fn from_sql_null(_: &tokio_postgres::types::Type) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// A second proxy of the same system (see [`Cluster::start_extra_proxy`]).
pub struct ExtraProxy {
    /// Connect here as an application (`app` user).
    pub dsn: String,
    /// Admin HTTP base URL.
    pub admin_url: String,
    /// Its log file.
    pub log: PathBuf,
    child: std::process::Child,
}

impl Drop for ExtraProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Some(mut child) = self.proxy.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.info.proxy_pid = None;
        }
        stop_all(&self.info);
    }
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes the month table `t_order_{month}` on every shard, as the proxy makes
/// it, for tests that write a fixed month straight to the shards (the proxy
/// makes only the current month and those ahead of it at start).
pub async fn make_month_everywhere(c: &Cluster, month: &str) {
    let key = shardgate_router::month::MonthKey::parse_suffix(month).unwrap_or_else(|| panic!("yyyyMM: {month}"));
    let topology = shardgate_router::Topology::example();
    let rule = topology.tables.iter().find(|t| t.name == "t_order").expect("t_order rule");
    // the proxy's own DDL for a month table
    let ddl = rule.create_month_table_sql(key);
    for dsn in &c.info.shards {
        let shard = connect(dsn).await.expect("shard");
        shard.batch_execute(&ddl).await.expect("month table");
    }
}

/// The month tables (`t_order_yyyyMM`) on a shard, by name.
pub async fn month_tables(shard: &tokio_postgres::Client) -> Vec<String> {
    shard
        .query("SELECT relname::text FROM pg_class WHERE relkind = 'r' AND relname ~ '^t_order_[0-9]{6}$'", &[])
        .await
        .expect("month tables")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Connects with tokio-postgres and drives the connection in the background;
/// a DSN with `sslrootcert=` (a TLS system) connects with rustls, verifying
/// the server against that CA.
pub async fn connect(dsn: &str) -> std::result::Result<tokio_postgres::Client, tokio_postgres::Error> {
    if let Some((base, params)) = dsn.split_once('?').filter(|(_, p)| p.contains("sslrootcert=")) {
        let ca = params.split('&').find_map(|kv| kv.strip_prefix("sslrootcert=")).unwrap_or_default();
        let tls = shardgate_config::tls::client_config(shardgate_config::SslMode::VerifyFull, Some(ca)).expect("TLS client settings from the test CA");
        let (client, conn) = tokio_postgres::connect(&format!("{base}?sslmode=require"), tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone())).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(client);
    }
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, if the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

/// HTTP/1.0 GET over std (enough for the admin endpoints): `(status, body)`.
pub fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
