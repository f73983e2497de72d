//! shardgate configuration: load a TOML file, apply defaults, validate.
//! No I/O beyond reading the file; every error is one line naming the key.

mod error;
mod model;
pub mod tls;

pub use error::ConfigError;
pub use model::*;

use std::collections::HashSet;
use std::path::Path;

/// A parsed backend DSN (`postgres://user:password@host:port/dbname`).
#[derive(Clone, PartialEq, Eq)]
pub struct Dsn {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Backend user.
    pub user: String,
    /// Backend password, if any (never printed by `Debug`).
    pub password: Option<String>,
    /// Database name.
    pub dbname: String,
    /// TLS to this server (`?sslmode=`; default `disable`).
    pub sslmode: SslMode,
    /// PEM file of the CA that signed the server's certificate (`?sslrootcert=`).
    pub sslrootcert: Option<String>,
}

/// How a connection to a PostgreSQL server uses TLS, as libpq's `sslmode`
/// (`allow` is not offered: it only ever falls back the other way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP (shardgate's default; set `verify-full` in production).
    #[default]
    Disable,
    /// TLS when the server offers it, without verifying the certificate; else plain.
    Prefer,
    /// TLS or fail; the certificate is verified only when `sslrootcert` is given (as libpq).
    Require,
    /// TLS, certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// TLS, chain verified and the host name (or IP) must match the certificate.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's names.
    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(format!("sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full")),
        })
    }
}

/// A URL with its password replaced, for Debug output and logs.
pub fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<not a URL>".into(),
    }
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "postgres://{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)?;
        if self.sslmode != SslMode::Disable {
            write!(f, "?sslmode={:?}", self.sslmode)?;
        }
        Ok(())
    }
}

impl Dsn {
    /// Parses a URL-form DSN; the error says what is missing.
    pub fn parse(s: &str) -> Result<Dsn, String> {
        let url = url::Url::parse(s).map_err(|e| format!("not a URL ({e}); expected postgres://user:password@host:port/dbname"))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(format!("scheme `{}` is not postgres:// or postgresql://", url.scheme()));
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("no host; expected postgres://user:password@host:port/dbname")?;
        let user = url.username();
        if user.is_empty() {
            return Err("no user; expected postgres://user:password@host:port/dbname".into());
        }
        let dbname = url.path().trim_start_matches('/');
        if dbname.is_empty() {
            return Err("no database name; expected postgres://user:password@host:port/dbname".into());
        }
        let decode = |v: &str| -> Result<String, String> {
            url::form_urlencoded::parse(format!("x={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .ok_or_else(|| "cannot decode".to_string())
        };
        let mut sslmode = SslMode::Disable;
        let mut sslrootcert = None;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" => sslmode = SslMode::parse(&v)?,
                "sslrootcert" => sslrootcert = Some(v.into_owned()),
                other => return Err(format!("unknown DSN parameter `{other}` (shardgate reads sslmode and sslrootcert)")),
            }
        }
        if matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull) && sslrootcert.is_none() {
            return Err(format!("sslmode {} needs sslrootcert=<CA file>", if sslmode == SslMode::VerifyCa { "verify-ca" } else { "verify-full" }));
        }
        Ok(Dsn {
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port: url.port().unwrap_or(5432),
            user: decode(user)?,
            password: url.password().map(decode).transpose()?,
            dbname: decode(dbname)?,
            sslmode,
            sslrootcert,
        })
    }
}

/// The annotated example config shipped in `config/shardgate.example.toml`.
pub const EXAMPLE_TOML: &str = include_str!("../shardgate.example.toml");

impl Config {
    /// The annotated example config, parsed (used by `shardgate route` without `--config`).
    pub fn example() -> Config {
        Config::from_toml(EXAMPLE_TOML, "shardgate.example.toml").expect("the shipped example config is valid")
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors. Users'
    /// `password_env` / `password_file` are read here.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1).unwrap_or(0);
            let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            ConfigError::Parse { origin: origin.to_string(), line, message }
        })?;
        for (i, u) in config.users.iter_mut().enumerate() {
            let key = |k: &str| format!("users[{i}].{k}");
            let sources = usize::from(!u.password.is_empty()) + usize::from(u.password_env.is_some()) + usize::from(u.password_file.is_some());
            if sources != 1 {
                return Err(ConfigError::invalid(key("password"), "give exactly one of password, password_env, password_file"));
            }
            if let Some(var) = &u.password_env {
                u.password = std::env::var(var).map_err(|_| ConfigError::invalid(key("password_env"), format!("environment variable `{var}` is not set")))?;
            }
            if let Some(file) = &u.password_file {
                u.password = std::fs::read_to_string(file)
                    .map_err(|e| ConfigError::invalid(key("password_file"), format!("cannot read `{file}`: {e}")))?
                    .trim()
                    .to_string();
            }
            if u.password.is_empty() {
                return Err(ConfigError::invalid(key("password"), "is empty"));
            }
        }
        if let Some(var) = config.server.admin_token_env.clone() {
            config.server.admin_token = Some(crate::model::Secret(std::env::var(&var).map_err(|_| ConfigError::invalid("server.admin_token_env", format!("environment variable `{var}` is not set")))?));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks everything serde cannot: counts, DSNs, duplicates, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        for (key, addr) in [("server.listen", &s.listen), ("server.admin_listen", &s.admin_listen)] {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|_| ConfigError::invalid(key, format!("`{addr}` is not an ip:port address")))?;
        }
        if s.max_client_connections == 0 {
            return Err(ConfigError::invalid("server.max_client_connections", "must be at least 1"));
        }
        if s.max_message_size < 1024 || s.max_message_size > 1 << 30 {
            return Err(ConfigError::invalid("server.max_message_size", "must be between 1024 and 1073741824 bytes"));
        }
        if self.users.is_empty() {
            return Err(ConfigError::invalid("users", "no users configured; add a [[users]] entry with name and password"));
        }
        let mut names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(ConfigError::invalid(format!("users[{i}].name"), "must not be empty"));
            }
            if !names.insert(u.name.as_str()) {
                return Err(ConfigError::invalid(format!("users[{i}].name"), format!("duplicate user `{}`; each user may appear once", u.name)));
            }
            if u.password.is_empty() {
                return Err(ConfigError::invalid(format!("users[{i}].password"), "must not be empty"));
            }
            let method = u.auth_method.unwrap_or(s.auth_method);
            if u.password.starts_with("SCRAM-SHA-256$") && method == AuthMethod::Md5 {
                return Err(ConfigError::invalid(format!("users[{i}].password"), "a SCRAM verifier cannot serve md5 authentication; give the plain password or an md5 hash"));
            }
            if is_md5_hash(&u.password) && method == AuthMethod::ScramSha256 {
                return Err(ConfigError::invalid(format!("users[{i}].password"), "an md5 hash cannot serve scram-sha-256 authentication; give the plain password or a SCRAM verifier"));
            }
        }
        if self.pool.size == 0 {
            return Err(ConfigError::invalid("pool.size", "must be at least 1"));
        }
        if self.pool.max_prepared_statements < 16 {
            // closing a statement also closes the portals bound to it: keep room for
            // the statements a client prepares while one of its portals is open
            return Err(ConfigError::invalid("pool.max_prepared_statements", "must be at least 16"));
        }
        if self.pool.idle_timeout_ms > 0 && self.pool.idle_timeout_ms < 1000 {
            // shorter would close connections between a client's transactions: a
            // reconnect (and its SCRAM key derivation) for most of them
            return Err(ConfigError::invalid("pool.idle_timeout_ms", "must be 0 (never) or at least 1000"));
        }
        if self.sharding.shard_count == 0 || self.sharding.shard_count > 8 {
            // Generated ids carry the shard in 3 bits (router::id).
            return Err(ConfigError::invalid("sharding.shard_count", "must be between 1 and 8"));
        }
        if self.shards.len() != self.sharding.shard_count {
            return Err(ConfigError::invalid(
                "shards",
                format!("{} shard(s) listed but sharding.shard_count = {}; list exactly one [[shards]] entry per shard", self.shards.len(), self.sharding.shard_count),
            ));
        }
        let mut dsns: Vec<(String, &str)> = self.shards.iter().enumerate().map(|(i, b)| (format!("shards[{i}].dsn"), b.dsn.as_str())).collect();
        dsns.push(("default_db.dsn".into(), &self.default_db.dsn));
        if let Some(l) = &self.legacy_db {
            dsns.push(("legacy_db.dsn".into(), &l.dsn));
        }
        for (key, text) in dsns {
            let d = Dsn::parse(text).map_err(|m| ConfigError::invalid(key.clone(), m))?;
            // the CA file is read and its certificates parsed now, not at the first connection
            if d.sslmode != SslMode::Disable {
                tls::client_config(d.sslmode, d.sslrootcert.as_deref()).map_err(|m| ConfigError::invalid(key, m))?;
            }
        }
        if self.sharding.time_zone.trim().is_empty() {
            return Err(ConfigError::invalid("sharding.time_zone", "must name an IANA time zone such as UTC"));
        }
        let mut tables = HashSet::new();
        for (i, t) in self.sharded_tables.iter().enumerate() {
            if !tables.insert(t.name.as_str()) {
                return Err(ConfigError::invalid(format!("sharded_tables[{i}].name"), format!("duplicate table `{}`", t.name)));
            }
            if !t.table_pattern.contains("{yyyyMM}") {
                return Err(ConfigError::invalid(format!("sharded_tables[{i}].table_pattern"), "must contain {yyyyMM}"));
            }
            for (k, v) in [("name", &t.name), ("shard_key", &t.shard_key), ("month_column", &t.month_column), ("id_column", &t.id_column)] {
                if !is_identifier(v) {
                    return Err(ConfigError::invalid(format!("sharded_tables[{i}].{k}"), format!("`{v}` is not a plain SQL identifier")));
                }
            }
            for c in &t.unique_lookups {
                if !is_identifier(c) {
                    return Err(ConfigError::invalid(format!("sharded_tables[{i}].unique_lookups"), format!("`{c}` is not a plain SQL identifier")));
                }
                if [&t.shard_key, &t.month_column, &t.id_column].iter().any(|k| k.eq_ignore_ascii_case(c)) {
                    return Err(ConfigError::invalid(
                        format!("sharded_tables[{i}].unique_lookups"),
                        format!("`{c}` is a routing column; list other columns (such as order_no)"),
                    ));
                }
            }
        }
        if let Some(w) = self.ids.worker_id {
            if w > 63 {
                return Err(ConfigError::invalid("ids.worker_id", format!("{w} is out of range 0..=63")));
            }
        }
        match (&self.server.tls_cert_file, &self.server.tls_key_file) {
            (Some(c), Some(k)) => {
                tls::server_config(c, k).map_err(|m| ConfigError::invalid("server.tls_cert_file", m))?;
            }
            (None, None) if self.server.require_tls => {
                return Err(ConfigError::invalid("server.require_tls", "needs server.tls_cert_file and server.tls_key_file"));
            }
            (None, None) => {}
            _ => return Err(ConfigError::invalid("server.tls_cert_file", "give both tls_cert_file and tls_key_file, or neither")),
        }
        if self.server.max_client_statements == 0 || self.server.max_client_portals == 0 {
            return Err(ConfigError::invalid("server", "max_client_statements and max_client_portals must be at least 1"));
        }
        if self.server.max_unauthenticated == 0 || self.server.login_timeout_ms < 100 {
            return Err(ConfigError::invalid("server", "max_unauthenticated must be at least 1 and login_timeout_ms at least 100"));
        }
        if self.ids.lease_ttl_ms < 1000 {
            return Err(ConfigError::invalid("ids.lease_ttl_ms", "must be at least 1000"));
        }
        if self.ids.max_clock_backward_ms.saturating_mul(10) >= self.ids.lease_ttl_ms {
            // a lease's ids may run that far ahead of the clock; the reservation covers a tenth of the TTL
            return Err(ConfigError::invalid("ids.max_clock_backward_ms", "must be less than a tenth of ids.lease_ttl_ms"));
        }
        if self.health.failure_threshold == 0 || self.health.recovery_threshold == 0 {
            return Err(ConfigError::invalid("health", "failure_threshold and recovery_threshold must be at least 1"));
        }
        if let Some(r) = &self.redis {
            match url::Url::parse(&r.url) {
                Ok(u) if u.scheme() == "redis" && r.tls_ca_file.is_some() => {
                    return Err(ConfigError::invalid("redis.tls_ca_file", "is set but redis.url is not rediss://"));
                }
                Ok(u) if u.scheme() == "redis" || u.scheme() == "rediss" => {}
                _ => return Err(ConfigError::invalid("redis.url", format!("`{}` is not a redis:// or rediss:// URL", crate::redact_url(&r.url)))),
            }
            if let Some(ca) = &r.tls_ca_file {
                if !Path::new(ca).is_file() {
                    return Err(ConfigError::invalid("redis.tls_ca_file", format!("`{ca}` is not a readable file")));
                }
            }
        }
        if self.cache.ttl_jitter_percent > 50 {
            return Err(ConfigError::invalid("cache.ttl_jitter_percent", "must be at most 50"));
        }
        let rate = self.cache.bloom_false_positive_rate;
        if !(rate > 0.0 && rate < 1.0) {
            return Err(ConfigError::invalid("cache.bloom_false_positive_rate", format!("{rate} must be between 0 and 1 (exclusive)")));
        }
        if self.cache.redis_pool_size == 0 || self.cache.redis_timeout_ms == 0 || self.cache.bloom_refresh_ms == 0 {
            return Err(ConfigError::invalid("cache", "redis_pool_size, redis_timeout_ms and bloom_refresh_ms must be at least 1"));
        }
        if self.migration.poll_interval_ms == 0 || self.migration.poll_interval_ms > 1_000 {
            return Err(ConfigError::invalid("migration.poll_interval_ms", "must be 1..=1000 (proxies follow a phase change within a second)"));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.cache.tables {
            let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok(&t.name) || !ok(&t.key) {
                return Err(ConfigError::invalid("cache.tables", format!("`{}`.`{}`: table and key must be lower-case unquoted identifiers", t.name, t.key)));
            }
            if !seen.insert(&t.name) {
                return Err(ConfigError::invalid("cache.tables", format!("table `{}` is listed twice", t.name)));
            }
            if self.sharded_tables.iter().any(|s| s.name == t.name) {
                return Err(ConfigError::invalid("cache.tables", format!("`{}` is a sharded table; only tables on db_default can be cached", t.name)));
            }
        }
        Ok(())
    }

    /// The user entry for `name`, if configured.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Parsed DSN of the default database (validated at load).
    pub fn default_dsn(&self) -> Dsn {
        Dsn::parse(&self.default_db.dsn).expect("default_db.dsn validated at load")
    }

    /// Parsed DSNs of the shards, in shard order (validated at load).
    pub fn shard_dsns(&self) -> Vec<Dsn> {
        self.shards.iter().map(|b| Dsn::parse(&b.dsn).expect("shards[].dsn validated at load")).collect()
    }
}

/// True for `md5` followed by 32 hex digits (the `pg_authid` md5 form).
pub fn is_md5_hash(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_identifier(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_') && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../shardgate.example.toml");

    fn err(text: &str) -> String {
        Config::from_toml(text, "test.toml").expect_err("must fail").to_string()
    }

    #[test]
    fn example_config_is_valid_and_complete() {
        let c = Config::from_toml(EXAMPLE, "example").expect("example parses");
        assert_eq!(c.shards.len(), 8);
        assert_eq!(c.sharded_tables[0].name, "t_order");
        assert_eq!(c.server.listen, "127.0.0.1:6432");
        assert!(c.legacy_db.is_some());
        assert!(c.redis.is_some());
    }

    #[test]
    fn misspelt_key_names_key_and_line() {
        let text = EXAMPLE.replacen("listen = ", "listn = ", 1);
        let e = err(&text);
        assert!(e.contains("unknown field `listn`"), "{e}");
        assert!(e.starts_with("test.toml:"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let line: usize = e.split(':').nth(1).and_then(|l| l.parse().ok()).expect("line number");
        assert_eq!(text.lines().nth(line - 1).map(|l| l.trim_start().starts_with("listn")), Some(true), "{e}");
    }

    #[test]
    fn passwords_come_from_env_or_file_and_secrets_never_show_in_debug() {
        let dir = std::env::temp_dir().join(format!("sg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("pw");
        std::fs::write(&file, "from-file\n").expect("write");
        std::env::set_var("SG_TEST_PW", "from-env");
        std::env::set_var("SG_TEST_TOKEN", "tok-secret");
        let text = EXAMPLE
            .replacen("name = \"app\"\npassword = \"app\"", "name = \"app\"\npassword_env = \"SG_TEST_PW\"", 1)
            .replacen("name = \"admin\"\npassword = \"admin\"", &format!("name = \"admin\"\npassword_file = \"{}\"", file.display()), 1)
            .replacen("[server]\n", "[server]\nadmin_token_env = \"SG_TEST_TOKEN\"\n", 1);
        let c = Config::from_toml(&text, "x").expect("parses");
        assert_eq!(c.users[0].password, "from-env");
        assert_eq!(c.users[1].password, "from-file");
        assert_eq!(c.server.admin_token.as_ref().map(|t| t.0.as_str()), Some("tok-secret"));
        let mut c2 = c.clone();
        c2.shards[0].dsn = "postgres://u:dsn-secret@127.0.0.1:5432/db_0".into();
        let debug = format!("{c2:?}");
        for secret in ["from-env", "from-file", "tok-secret", "dsn-secret"] {
            assert!(!debug.contains(secret), "{secret} in Debug output");
        }
        // exactly one source
        let both = EXAMPLE.replacen("name = \"app\"\npassword = \"app\"", "name = \"app\"\npassword = \"x\"\npassword_env = \"SG_TEST_PW\"", 1);
        assert!(err(&both).contains("exactly one of password, password_env, password_file"));
        let missing = EXAMPLE.replacen("name = \"app\"\npassword = \"app\"", "name = \"app\"\npassword_env = \"SG_TEST_NOT_SET_ANYWHERE\"", 1);
        assert!(err(&missing).contains("is not set"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn seven_shards_is_refused() {
        let mut c = Config::from_toml(EXAMPLE, "x").expect("parses");
        c.shards.pop();
        let e = c.validate().expect_err("7 shards").to_string();
        assert_eq!(e, "config key `shards`: 7 shard(s) listed but sharding.shard_count = 8; list exactly one [[shards]] entry per shard");
    }

    #[test]
    fn bad_dsn_names_the_shard() {
        let mut c = Config::from_toml(EXAMPLE, "x").expect("parses");
        c.shards[3].dsn = "postgres://127.0.0.1:5432".into();
        let e = c.validate().expect_err("bad dsn").to_string();
        assert!(e.starts_with("config key `shards[3].dsn`: no user"), "{e}");
        c.shards[3].dsn = "mysql://u@h/db".into();
        assert!(c.validate().expect_err("scheme").to_string().contains("scheme `mysql`"));
    }

    #[test]
    fn duplicate_user_is_refused() {
        let mut c = Config::from_toml(EXAMPLE, "x").expect("parses");
        let u = c.users[0].clone();
        c.users.push(u);
        let e = c.validate().expect_err("dup").to_string();
        assert!(e.contains("duplicate user `app`"), "{e}");
        assert!(e.starts_with("config key `users[2].name`"), "{e}");
    }

    #[test]
    fn an_idle_timeout_under_a_second_is_refused() {
        let mut c = Config::from_toml(EXAMPLE, "x").expect("parses");
        assert_eq!(c.pool.idle_timeout_ms, 600_000);
        c.pool.idle_timeout_ms = 999;
        let e = c.validate().expect_err("too short").to_string();
        assert_eq!(e, "config key `pool.idle_timeout_ms`: must be 0 (never) or at least 1000");
        c.pool.idle_timeout_ms = 0;
        c.validate().expect("0 = never");
        c.pool.idle_timeout_ms = 1000;
        c.validate().expect("a second");
    }

    #[test]
    fn a_prepared_statement_cap_below_sixteen_is_refused() {
        let mut c = Config::from_toml(EXAMPLE, "x").expect("parses");
        assert_eq!(c.pool.max_prepared_statements, 512);
        c.pool.max_prepared_statements = 15;
        let e = c.validate().expect_err("cap").to_string();
        assert_eq!(e, "config key `pool.max_prepared_statements`: must be at least 16");
    }

    #[test]
    fn wrong_type_and_bad_enum_are_one_line() {
        let e = err(&EXAMPLE.replacen("size = 20", "size = \"twenty\"", 1));
        assert!(e.contains("invalid type"), "{e}");
        assert!(!e.contains('\n'));
        let e = err(&EXAMPLE.replacen("policy = \"partial\"", "policy = \"maybe\"", 1));
        assert!(e.contains("unknown variant `maybe`"), "{e}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let mut text = String::from("[[users]]\nname = \"a\"\npassword = \"p\"\n[default_db]\ndsn = \"postgres://u@h/d\"\n");
        for i in 0..8 {
            text.push_str(&format!("[[shards]]\ndsn = \"postgres://u:p@h:5432/db_{i}\"\n"));
        }
        let c = Config::from_toml(&text, "min").expect("valid");
        assert_eq!(c.pool.size, 20);
        assert_eq!(c.server.auth_method, AuthMethod::ScramSha256);
        assert_eq!(c.sharded_tables.len(), 1);
        assert_eq!(c.shard_dsns()[7].dbname, "db_7");
    }

    #[test]
    fn dsn_parse_decodes_and_hides_password() {
        let d = Dsn::parse("postgresql://us%40r:p%3Ass@127.0.0.1:5433/db_1").expect("dsn");
        assert_eq!((d.user.as_str(), d.password.as_deref(), d.port, d.dbname.as_str()), ("us@r", Some("p:ss"), 5433, "db_1"));
        assert!(!format!("{d:?}").contains("p:ss"));
    }

    #[test]
    fn dsn_sslmode_follows_libpq_and_checks_its_ca_file() {
        assert_eq!(Dsn::parse("postgres://u@h/db").expect("dsn").sslmode, SslMode::Disable);
        assert_eq!(Dsn::parse("postgres://u@h/db?sslmode=require").expect("dsn").sslmode, SslMode::Require);
        assert_eq!(Dsn::parse("postgres://u@h/db?sslmode=prefer").expect("dsn").sslmode, SslMode::Prefer);
        let d = Dsn::parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=/etc/ca.crt").expect("dsn");
        assert_eq!((d.sslmode, d.sslrootcert.as_deref()), (SslMode::VerifyFull, Some("/etc/ca.crt")));
        // the file is read when the config is validated (not by every parse, which runs at run time too)
        let e = Config::from_toml(&EXAMPLE.replace("127.0.0.1:5433/db_0\"", "127.0.0.1:5433/db_0?sslmode=verify-ca&sslrootcert=/nonexistent/ca.crt\""), "t")
            .expect_err("a missing CA file");
        assert!(e.to_string().contains("shards[0].dsn") && e.to_string().contains("/nonexistent/ca.crt"), "{e}");
        let garbage = tempfile_path("garbage-ca.crt");
        let e = Config::from_toml(&EXAMPLE.replace("127.0.0.1:5433/db_0\"", &format!("127.0.0.1:5433/db_0?sslmode=verify-full&sslrootcert={garbage}\"")), "t")
            .expect_err("a CA file without certificates");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        for (bad, why) in [
            ("postgres://u@h/db?sslmode=allow", "not one of"),
            ("postgres://u@h/db?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://u@h/db?connect_timeout=3", "unknown DSN parameter"),
        ] {
            let e = Dsn::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn tempfile_path(name: &str) -> String {
        let p = std::env::temp_dir().join(format!("shardgate-config-test-{}-{name}", std::process::id()));
        std::fs::write(&p, "not read by Dsn::parse").expect("write temp file");
        p.display().to_string()
    }

    #[test]
    fn tls_settings_need_both_files_and_require_tls_needs_them() {
        let base = EXAMPLE.to_string();
        let with = |extra: &str| base.replacen("[server]\n", &format!("[server]\n{extra}\n"), 1);
        let e = Config::from_toml(&base.replace("require_tls = false", "require_tls = true"), "t").expect_err("require_tls alone");
        assert!(e.to_string().contains("server.require_tls"), "{e}");
        let cert = tempfile_path("cert.pem");
        let e = Config::from_toml(&with(&format!("tls_cert_file = \"{cert}\"")), "t").expect_err("cert without key");
        assert!(e.to_string().contains("both"), "{e}");
        let e = Config::from_toml(&with(&format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{cert}\"")), "t").expect_err("files without PEM");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = Config::from_toml(&base.replace("url = \"redis://127.0.0.1:6379\"", &format!("url = \"redis://127.0.0.1:6379\"\ntls_ca_file = \"{cert}\"")), "t").expect_err("CA for plain redis");
        assert!(e.to_string().contains("is set but redis.url is not rediss://"), "{e}");
    }

    #[test]
    fn md5_hash_recognised() {
        assert!(is_md5_hash("md5d41d8cd98f00b204e9800998ecf8427e"));
        assert!(!is_md5_hash("md5secret"));
    }
}
