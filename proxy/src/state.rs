//! What every session shares: the configuration, the db_default session pool,
//! the executor's engine, the cache, the cancel registry and the list of
//! sessions (for the admin endpoint and eviction).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardgate_config::Config;
use tokio::sync::watch;

use crate::auth::UserSecret;
use crate::backend::{pool, Pool};
use crate::cancel::CancelRegistry;

/// State every session shares.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// Precomputed secrets by user name.
    pub users: HashMap<String, UserSecret>,
    /// Key of the mock SCRAM salts of unknown users (see `ScramSecret::mock`).
    pub mock_key: [u8; 32],
    /// Pool of server connections to `default_db`.
    pub pool: Pool,
    /// Cancel routing.
    pub cancels: Arc<CancelRegistry>,
    /// Flips to true when shutdown starts.
    pub shutdown: watch::Receiver<bool>,
    /// Client sessions running now.
    pub clients: AtomicUsize,
    /// Per-request metric handles.
    pub meters: crate::metrics::Meters,
    /// Sharded execution.
    pub engine: Arc<crate::routed::Engine>,
    /// The merchant-info cache.
    pub cache: Arc<crate::cache::Cache>,
    /// TLS for clients (`server.tls_cert_file`), if configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Channel binding data of the proxy's certificate (SCRAM-SHA-256-PLUS), if any.
    pub tls_end_point: Option<Vec<u8>>,
    /// Logged-in clients, for `SHOW CLIENTS`.
    pub sessions: std::sync::Mutex<HashMap<u64, ClientInfo>>,
    next_session: std::sync::atomic::AtomicU64,
}

/// What `SHOW CLIENTS` lists about a client.
pub struct ClientInfo {
    /// User name.
    pub user: String,
    /// Peer address.
    pub addr: String,
    /// Login time.
    pub connected: jiff::Timestamp,
}

impl Shared {
    /// Builds shared state from a validated config.
    pub fn new(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<Shared> {
        let users = config.users.iter().map(|u| (u.name.clone(), UserSecret::from_config(u, config.server.auth_method))).collect();
        let p = &config.pool;
        let pool = pool::build(config.default_dsn(), p);
        // the proxy's own db_default work (two-phase decisions, lookup entries, fallback rows)
        // has a pool of its own: client sessions holding every session connection cannot starve it
        let internal = pool::build(config.default_dsn(), p);
        let engine = Arc::new(crate::routed::Engine::new(&config, internal)?);
        let cache = crate::cache::Cache::new(&config.cache, config.redis.as_ref(), engine.default.clone())?;
        let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
            (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(shardgate_config::tls::server_config(cert, key).map_err(anyhow::Error::msg)?)),
            _ => None,
        };
        let tls_end_point = config.server.tls_cert_file.as_deref().and_then(|f| shardgate_config::tls::first_certificate(f).ok()).and_then(|der| crate::auth::tls_server_end_point(&der));
        Ok(Shared {
            tls,
            tls_end_point,
            config,
            users,
            mock_key: rand::random(),
            pool,
            cancels: Arc::new(CancelRegistry::default()),
            shutdown,
            clients: AtomicUsize::new(0),
            meters: crate::metrics::Meters::new(),
            engine,
            cache,
            sessions: Default::default(),
            next_session: Default::default(),
        })
    }

    /// Records a logged-in client; returns its id.
    pub fn register_session(&self, user: &str, addr: String) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(id, ClientInfo { user: user.to_string(), addr, connected: jiff::Timestamp::now() });
        }
        id
    }

    /// Forgets a client.
    pub fn unregister_session(&self, id: u64) {
        if let Ok(mut m) = self.sessions.lock() {
            m.remove(&id);
        }
    }

    /// ParameterStatus values for a new client: the server's, with the
    /// client's own requests (client_encoding, DateStyle, ...) applied.
    pub async fn login_parameters(&self, desired: &[(String, String)]) -> Vec<(String, String)> {
        let known = || self.pool.manager().last_params.lock().map(|p| p.clone()).unwrap_or_default();
        let mut params = known();
        if params.is_empty() {
            // first client: reach a server once to learn its version and settings
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), self.pool.get()).await {
                drop(conn);
                params = known();
            }
        }
        if params.is_empty() {
            params = DEFAULT_PARAMS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        }
        params.retain(|(k, _)| k != "application_name" && k != "session_authorization");
        for (k, v) in desired {
            if let Some(slot) = params.iter_mut().find(|(pk, _)| pk.eq_ignore_ascii_case(k)) {
                slot.1 =
                    if k == "client_encoding" && matches!(v.to_ascii_lowercase().as_str(), "utf8" | "utf-8" | "unicode") { "UTF8".into() } else { v.clone() };
            }
        }
        let app = desired.iter().find(|(k, _)| k == "application_name").map(|(_, v)| v.clone()).unwrap_or_default();
        params.push(("application_name".into(), app));
        params
    }
}

/// Parameters reported at login when no server has been reached yet.
const DEFAULT_PARAMS: &[(&str, &str)] = &[
    ("server_version", "15.0"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
    ("is_superuser", "off"),
    ("default_transaction_read_only", "off"),
    ("in_hot_standby", "off"),
];
