//! A deadpool-managed pool of [`ServerConn`] per backend database. A connection
//! that is broken or found dead by a non-blocking probe at checkout is
//! replaced, never handed out.

use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use shardgate_config::Dsn;
use std::sync::Mutex;

use super::conn::{BackendError, ServerConn};

/// Creates and checks server connections for one backend.
pub struct ServerManager {
    /// Where to connect (credentials never logged).
    pub dsn: Dsn,
    /// Connect + startup timeout.
    pub connect_timeout: Duration,
    /// Parameters reported by the most recent new connection, shown to clients at login.
    pub last_params: Arc<Mutex<Vec<(String, String)>>>,
}

impl managed::Manager for ServerManager {
    type Type = ServerConn;
    type Error = BackendError;

    async fn create(&self) -> Result<ServerConn, BackendError> {
        // boxed: a connect (TLS, SCRAM) future is kilobytes, and deadpool's checkout
        // future embeds this one by value, so every routed statement's future (which
        // awaits a checkout) would carry it and move it around (memcpy) unboxed
        let conn = Box::pin(ServerConn::connect(&self.dsn, self.connect_timeout)).await?;
        metrics::counter!(crate::metrics::SERVER_CONNECTS).increment(1);
        if let Ok(mut p) = self.last_params.lock() {
            *p = conn.reported.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        Ok(conn)
    }

    async fn recycle(&self, conn: &mut ServerConn, metrics: &Metrics) -> RecycleResult<BackendError> {
        if conn.broken {
            return Err(RecycleError::message("connection marked broken"));
        }
        if !conn.in_step() {
            // a deferred statement never sent, or an answer nobody read: out of step
            return Err(RecycleError::message("connection given back with a deferred statement outstanding"));
        }
        // A connection used moments ago is checked against the runtime's
        // readiness (no syscall on the hot path); one idle longer gets a real
        // MSG_PEEK, which also sees a close the runtime has not polled yet.
        let probe = if metrics.last_used() < std::time::Duration::from_millis(100) {
            crate::backend::conn::Probe::Readiness
        } else {
            crate::backend::conn::Probe::Kernel
        };
        if !conn.is_alive(probe) {
            return Err(RecycleError::message("server closed the connection"));
        }
        Ok(())
    }
}

/// A pool of server connections to one database.
pub type Pool = managed::Pool<ServerManager>;

/// Checks out a connection: first without waiting, so no timer is set up when
/// one is free (the common case under transaction pooling); then waiting up to
/// the pool's wait timeout, in the semaphore's queue like any other waiter. A
/// free permit exists only while nobody queues, so the first try never jumps
/// the queue. The whole checkout's time goes to `wait` when given.
pub async fn checkout(pool: &Pool, wait: Option<&metrics::Histogram>) -> Result<managed::Object<ServerManager>, managed::PoolError<BackendError>> {
    let t0 = std::time::Instant::now();
    let mut now = pool.timeouts();
    now.wait = Some(Duration::ZERO);
    let got = match pool.timeout_get(&now).await {
        Err(managed::PoolError::Timeout(managed::TimeoutType::Wait)) => pool.get().await,
        got => got,
    };
    if let Some(h) = wait {
        h.record(t0.elapsed().as_secs_f64());
    }
    got
}

/// Checks out a connection within `wait` in all (a new connection's connect
/// included), whatever the pool's configured wait timeout:
/// `tokio::time::timeout(wait, pool.get())` gives up at the shorter of the two.
/// For a check whose "cannot tell" answer costs more than waiting: a write into
/// a new month asks db_default whether other proxies run, and not knowing makes
/// it wait out their listing interval (seconds).
pub async fn checkout_within(pool: &Pool, wait: Duration) -> Option<managed::Object<ServerManager>> {
    let mut t = pool.timeouts();
    t.wait = Some(wait);
    tokio::time::timeout(wait, pool.timeout_get(&t)).await.ok()?.ok()
}

/// Builds a pool; connections are made lazily on first checkout.
pub fn build(dsn: Dsn, size: usize, connect_timeout: Duration, checkout_timeout: Duration) -> Pool {
    let manager = ServerManager { dsn, connect_timeout, last_params: Arc::new(Mutex::new(Vec::new())) };
    managed::Pool::builder(manager)
        .max_size(size)
        // the most recently returned connection first: the busy set stays as small
        // as the concurrency needs, its backends warm (caches, prepared statements);
        // round-robin over all of them cost the shards a third more CPU per statement
        .queue_mode(managed::QueueMode::Lifo)
        .wait_timeout(Some(checkout_timeout))
        .create_timeout(Some(connect_timeout))
        // recycle never waits (a flag and a non-blocking probe), so a timeout
        // around it would only cost a clock read and a timer per checkout
        .recycle_timeout(None)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .expect("runtime and sizes are set")
}
