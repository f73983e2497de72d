//! A deadpool-managed pool of [`ServerConn`] per backend database. A connection
//! that is broken or found dead by a non-blocking probe at checkout is
//! replaced, never handed out; one given back inside a transaction block, out
//! of step or broken is closed at once ([`Pooled`]), never pooled.

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
    // boxed: a checkout moves the pooled object through deadpool's futures, the
    // Pooled and the session's slot; a connection by value (its buffers, caches and
    // reported parameters inline) was a tenth of the proxy's instructions in memcpy
    type Type = Box<ServerConn>;
    type Error = BackendError;

    async fn create(&self) -> Result<Box<ServerConn>, BackendError> {
        // boxed: a connect (TLS, SCRAM) future is kilobytes, and deadpool's checkout
        // future embeds this one by value, so every routed statement's future (which
        // awaits a checkout) would carry it and move it around (memcpy) unboxed
        let conn = Box::pin(ServerConn::connect(&self.dsn, self.connect_timeout)).await?;
        metrics::counter!(crate::metrics::SERVER_CONNECTS).increment(1);
        if let Ok(mut p) = self.last_params.lock() {
            *p = conn.reported.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        Ok(Box::new(conn))
    }

    async fn recycle(&self, conn: &mut Box<ServerConn>, metrics: &Metrics) -> RecycleResult<BackendError> {
        if !conn.reusable() {
            // (Pooled's drop closes such a connection; this is the last line)
            return Err(RecycleError::message("connection broken, out of step or inside a transaction block"));
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

/// A pool of server connections to one database. Every checkout is a
/// [`Pooled`], so no path can give a connection back in a state another user
/// would inherit.
#[derive(Clone)]
pub struct Pool(managed::Pool<ServerManager>);

impl Pool {
    /// Checks out a connection, waiting up to the pool's wait timeout.
    pub async fn get(&self) -> Result<Pooled, managed::PoolError<BackendError>> {
        self.0.get().await.map(Pooled::new)
    }

    /// Connections held and idle, and the pool's size.
    pub fn status(&self) -> managed::Status {
        self.0.status()
    }

    /// Closes the pool: idle connections now, the others when given back.
    pub fn close(&self) {
        self.0.close();
    }

    /// Where the pool connects, and what its last new connection reported.
    pub fn manager(&self) -> &ServerManager {
        self.0.manager()
    }
}

/// A checked-out server connection. Given back to the pool only when
/// [`ServerConn::reusable`]; otherwise (a block left open or failed by a path
/// that returned early, an answer never read, a broken connection) its socket
/// is closed when it is dropped, so the server rolls back and frees the
/// block's locks at once instead of at the pool's next checkout, and nobody
/// else inherits it.
pub struct Pooled(Option<managed::Object<ServerManager>>);

impl Pooled {
    fn new(o: managed::Object<ServerManager>) -> Pooled {
        Pooled(Some(o))
    }

    /// Takes the connection out of the pool for good (it no longer counts
    /// against the pool's size); dropping it closes it.
    pub fn detach(mut self) -> Option<ServerConn> {
        self.0.take().map(|o| *managed::Object::take(o))
    }
}

impl std::ops::Deref for Pooled {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.0.as_ref().expect("a Pooled holds its connection until dropped")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.0.as_mut().expect("a Pooled holds its connection until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(mut o) = self.0.take() {
            if o.reusable() {
                // (deadpool's own metrics count from the last checkout: a connection
                // held for a whole session would look idle since it began)
                o.idle_since = std::time::Instant::now();
            } else {
                tracing::debug!(status = %(o.ready_status as char), broken = o.broken, "closing a server connection given back unclean");
                let mut conn = managed::Object::take(o);
                conn.discard();
            }
        }
    }
}

/// Checks out a connection: first without waiting, so no timer is set up when
/// one is free (the common case under transaction pooling); then waiting up to
/// the pool's wait timeout, in the semaphore's queue like any other waiter. A
/// free permit exists only while nobody queues, so the first try never jumps
/// the queue. The whole checkout's time goes to `wait` when given.
pub async fn checkout(pool: &Pool, wait: Option<&metrics::Histogram>) -> Result<Pooled, managed::PoolError<BackendError>> {
    let t0 = std::time::Instant::now();
    let mut now = pool.0.timeouts();
    now.wait = Some(Duration::ZERO);
    let got = match pool.0.timeout_get(&now).await {
        Err(managed::PoolError::Timeout(managed::TimeoutType::Wait)) => pool.0.get().await,
        got => got,
    }
    .map(Pooled::new);
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
pub async fn checkout_within(pool: &Pool, wait: Duration) -> Option<Pooled> {
    let mut t = pool.0.timeouts();
    t.wait = Some(wait);
    tokio::time::timeout(wait, pool.0.timeout_get(&t)).await.ok()?.ok().map(Pooled::new)
}

/// Builds a pool; connections are made lazily on first checkout. Inside a
/// runtime, a task closes the connections idle longer than
/// `pool.idle_timeout_ms` for as long as the pool exists.
pub fn build(dsn: Dsn, p: &shardgate_config::PoolConfig) -> Pool {
    let connect_timeout = Duration::from_millis(p.connect_timeout_ms);
    let manager = ServerManager { dsn, connect_timeout, last_params: Arc::new(Mutex::new(Vec::new())) };
    let pool = Pool(
        managed::Pool::builder(manager)
            .max_size(p.size)
            // the most recently returned connection first: the busy set stays as small
            // as the concurrency needs, its backends warm (caches, prepared statements);
            // round-robin over all of them cost the shards a third more CPU per statement
            .queue_mode(managed::QueueMode::Lifo)
            .wait_timeout(Some(Duration::from_millis(p.checkout_timeout_ms)))
            .create_timeout(Some(connect_timeout))
            // recycle never waits (a flag and a non-blocking probe), so a timeout
            // around it would only cost a clock read and a timer per checkout
            .recycle_timeout(None)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("runtime and sizes are set"),
    );
    if let (Some(idle), Ok(rt)) = ((p.idle_timeout_ms > 0).then(|| Duration::from_millis(p.idle_timeout_ms)), tokio::runtime::Handle::try_current()) {
        rt.spawn(close_idle(pool.0.weak(), idle));
    }
    pool
}

/// Closes the connections idle in the pool longer than `idle` (LIFO checkout
/// leaves the ones a burst made at the bottom, untouched), until the pool is gone.
async fn close_idle(pool: managed::WeakPool<ServerManager>, idle: Duration) {
    let mut tick = tokio::time::interval((idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(30)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let closed = pool.retain(|conn, _| conn.idle_since.elapsed() < idle).removed.len();
        if closed > 0 {
            tracing::debug!(closed, "closed server connections idle too long");
        }
    }
}
