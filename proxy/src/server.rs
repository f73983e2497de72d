//! The accept loop: connection limit, one task per client, graceful shutdown
//! (stop accepting, let running transactions finish, then close).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardgate_config::Config;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, info_span, warn, Instrument};

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

impl Shared {
    /// Builds shared state from a validated config.
    pub fn new(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<Shared> {
        let users = config.users.iter().map(|u| (u.name.clone(), UserSecret::from_config(u, config.server.auth_method))).collect();
        let p = &config.pool;
        let pool = pool::build(config.default_dsn(), p.size, Duration::from_millis(p.connect_timeout_ms), Duration::from_millis(p.checkout_timeout_ms));
        // the proxy's own db_default work (two-phase decisions, lookup entries, fallback rows)
        // has a pool of its own: client sessions holding every session connection cannot starve it
        let internal = pool::build(config.default_dsn(), p.size, Duration::from_millis(p.connect_timeout_ms), Duration::from_millis(p.checkout_timeout_ms));
        let engine = Arc::new(crate::routed::Engine::new(&config, internal)?);
        let cache = crate::cache::Cache::new(&config.cache, config.redis.as_ref(), engine.clone())?;
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

/// 53300 for a connection with no place to log in; nothing of it is read.
async fn refuse_login(stream: tokio::net::TcpStream) {
    let mut out = bytes::BytesMut::new();
    crate::protocol::backend::error_response(&mut out, crate::protocol::backend::Severity::Fatal, "53300", "sorry, too many connections are logging in");
    let stream = crate::stream::Stream::Tcp(stream);
    let _ = tokio::time::timeout(Duration::from_secs(1), crate::stream::write_all(&stream, &out)).await;
}

/// Ends the connection that has waited longest to log in; false if none is left.
fn evict_oldest(logins: &mut std::collections::VecDeque<(Arc<std::sync::atomic::AtomicU8>, tokio::task::AbortHandle)>) -> bool {
    use crate::session::{EVICTED, LOGGING_IN};
    while let Some((state, handle)) = logins.pop_front() {
        // the session moves itself to logged in; whichever of the two moves first wins
        if state.compare_exchange(LOGGING_IN, EVICTED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            handle.abort();
            return true;
        }
    }
    false
}

/// Accepts clients until `shutdown` flips, then waits up to
/// `server.shutdown_timeout_ms` for their sessions to end.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(shared.config.server.max_client_connections));
    let max_logins = shared.config.server.max_unauthenticated;
    let mut shutdown = shared.shutdown.clone();
    let mut sessions = JoinSet::new();
    let mut next_id: u64 = 0;
    // connections still logging in, oldest first
    let mut logins: std::collections::VecDeque<(Arc<std::sync::atomic::AtomicU8>, tokio::task::AbortHandle)> = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                next_id += 1;
                // every place for a login is taken: the connection that has waited longest goes
                // (a real client logs in within milliseconds, an idle socket never does)
                logins.retain(|(s, _)| s.load(Ordering::Acquire) == crate::session::LOGGING_IN);
                if logins.len() >= max_logins && !evict_oldest(&mut logins) {
                    metrics::counter!(crate::metrics::CLIENT_REFUSED_TOTAL).increment(1);
                    tokio::spawn(refuse_login(stream));
                    continue;
                }
                let shared = shared.clone();
                let limit = limit.clone();
                let span = info_span!("session", id = next_id, %peer);
                let state = Arc::new(std::sync::atomic::AtomicU8::new(crate::session::LOGGING_IN));
                let task_state = state.clone();
                let handle = sessions.spawn(async move {
                    shared.clients.fetch_add(1, Ordering::Relaxed);
                    crate::session::run(shared.clone(), stream, limit, task_state).await;
                    shared.clients.fetch_sub(1, Ordering::Relaxed);
                }.instrument(span));
                logins.push_back((state, handle));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let n = sessions.len();
    info!(sessions = n, "shutting down: no new connections, waiting for running transactions");
    let wait = Duration::from_millis(shared.config.server.shutdown_timeout_ms);
    let drained = tokio::time::timeout(wait, async { while sessions.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(left = sessions.len(), "shutdown timeout reached, closing remaining sessions");
        sessions.abort_all();
    }
    shared.pool.close();
    shared.engine.close();
    info!("shutdown complete");
}
