//! One client connection, start to end: startup and authentication, then a
//! full-duplex loop that forwards protocol messages to a pooled server
//! connection held for one transaction (transaction pooling).
//!
//! Rules this file keeps:
//! - bytes are forwarded as received; only Parse/Bind/Describe/Close are
//!   rewritten (statement names), and only the proxy's own injected messages
//!   have their replies swallowed, tracked in order by `Expect`;
//! - a server connection is returned only at a clean point: every request
//!   answered, transaction status idle, nothing pinned;
//! - reads stop while the other side's write buffer is full (backpressure),
//!   and writes never block reads, so pipelined clients cannot deadlock us.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use crate::protocol::sqlstate;

pub(crate) use crate::stream::write_all;
use crate::stream::Stream;
use tracing::{debug, info, warn};

use crate::backend::conn::STARTUP_PARAMS;
use crate::cancel::Registration;
use crate::metrics as m;
use crate::protocol::codec::{split_frame, FrameError};
use crate::state::Shared;

mod admin_sql;
mod client;
mod link;
mod startup;
mod cached;
mod migrating;
mod extended;
mod parts;
mod routing;
mod txn;
mod streaming;

use link::*;
use startup::*;

/// Stop reading from one side while this much is queued for the other.
const HIGH_WATER: usize = 256 * 1024;
/// Time allowed from connect to the end of authentication.
/// Statement name used to turn a client's Close of a statement into a no-op
/// on the server (closing a nonexistent statement is not an error).
const CLOSED_STATEMENT: &[u8] = b"shardgate_closed";

/// Client-settable parameters that change how a server behaves for the
/// client; they are applied with SET on whatever server the client gets.
/// Application users never touch the proxy's own tables in `db_default`.
const CONTROL_TABLES: &str = "permission denied: shardgate's control tables (the fallback table and its views, two-phase-commit decisions, \
     migration state and outbox) belong to the proxy; statements naming them are refused for application users (admin users may read them)";

/// Nobody runs, replaces or drops the statements the proxy prepared on a
/// pooled server connection (see [`shardgate_router::names_proxy_statement`]).
const PROXY_STATEMENTS: &str = "permission denied: prepared statements named sg_..., sgr_... or sgc_... belong to shardgate (a pooled server \
     connection holds those of other clients and the proxy's own); give your statement another name";

const TRACKED_PARAMS: &[&str] = &[
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "search_path",
    "standard_conforming_strings",
    "bytea_output",
    // timeouts stop a client's statements on the shards as on one server
    "statement_timeout",
    "lock_timeout",
];

/// A reply the server owes us for something we sent, in send order.
#[derive(Debug)]
enum Expect {
    /// ParseComplete for a Parse; `name` is the server statement it creates.
    /// `client`: the client's name for it, forgotten if the Parse fails or is
    /// skipped (PostgreSQL then has no statement by that name).
    ParseComplete { forward: bool, name: Option<Arc<str>>, client: Option<Box<[u8]>> },
    /// CloseComplete for a Close; `evicted` is the server statement the proxy
    /// closed to make room (back in the set if the server skipped the Close).
    CloseComplete { forward: bool, evicted: Option<Arc<str>> },
    /// ReadyForQuery for a client Sync (`sync`) or Query/FunctionCall, the
    /// `client_seq` of that message.
    Ready { sync: bool, seq: u64 },
    /// The client ended a COPY FROM STDIN (CopyDone/CopyFail) before the
    /// server's CopyInResponse was seen: Syncs sent before this marker were
    /// ignored by the server.
    CopyEnd,
    /// Everything up to and including ReadyForQuery of a query the proxy sent itself.
    SwallowUntilReady,
    /// BindComplete for a Bind: the client's (`forward`) or the proxy's own.
    BindComplete { forward: bool },
    /// The end of a forwarded Describe (RowDescription or NoData).
    Describe,
    /// The end of a forwarded Execute (CommandComplete, EmptyQueryResponse, PortalSuspended).
    /// `ends_block`: the portal is a block's end (COMMIT, ROLLBACK, …), which
    /// takes effect at its CommandComplete, before the batch's ReadyForQuery:
    /// statements later in the batch run after the block, as in PostgreSQL.
    Execute { ends_block: Option<BlockEnd>, seq: u64 },
    /// A Parse the proxy made fail on purpose (the client re-used a statement
    /// name): the server's ErrorResponse is replaced by this one, so the error
    /// arrives in order and the server skips to Sync / aborts the transaction
    /// exactly as PostgreSQL would for the duplicate name.
    ReplaceError(Bytes),
}

/// What a block-ending portal does when it completes (see `Expect::Execute`).
#[derive(Debug, Clone, Copy)]
enum BlockEnd {
    /// COMMIT or ROLLBACK (tag COMMIT or ROLLBACK): idle, or a new block `AND CHAIN`.
    Ends { chain: bool },
    /// PREPARE TRANSACTION (tag PREPARE TRANSACTION, or ROLLBACK in a failed block): idle.
    Prepared,
    /// ROLLBACK TO a savepoint (tag ROLLBACK): in the block, no longer failed.
    RolledBackTo,
}

/// A client's named prepared statement, mapped to a server statement name
/// derived from its text and types, so any server can hold it.
struct Statement {
    server_name: Arc<str>,
    /// The Parse message under the server name, ready to inject.
    parse: Bytes,
    /// Its text is transaction control (COMMIT, ROLLBACK, SAVEPOINT, …): a Bind
    /// or Execute of it must end the shards' part too.
    tx_control: bool,
}

/// How the loop goes on after handling a message.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// Why the session ended.
enum End {
    /// Normal close (Terminate or EOF).
    Done,
    /// Send this FATAL error, then close.
    Fatal(&'static str, String),
    /// I/O error on the client socket.
    ClientIo(std::io::Error),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::ClientIo(e)
    }
}

/// A connection's login state, shared with the accept loop (which may evict
/// the oldest connection still logging in).
pub const LOGGING_IN: u8 = 0;
/// Logged in (or its login ended): never evicted.
pub const LOGGED_IN: u8 = 1;
/// Evicted by the accept loop.
pub const EVICTED: u8 = 2;

/// Serves one client connection until it ends.
/// While it logs in the connection counts against `server.max_unauthenticated`
/// (`state`: the accept loop may evict it); a logged-in client holds one of
/// `limit` (`server.max_client_connections`).
pub async fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    limit: Arc<tokio::sync::Semaphore>,
    state: Arc<std::sync::atomic::AtomicU8>,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut cin = BytesMut::with_capacity(8 * 1024);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(shared.config.server.login_timeout_ms);
    // encryption first (a client too slow to finish its TLS handshake is simply closed)
    let plain = Stream::Tcp(stream);
    let start = match tokio::time::timeout_at(deadline, encryption_request(&shared, &plain, &mut cin)).await {
        Ok(Ok(Encryption::Plain)) => Ok(plain),
        Ok(Ok(Encryption::Tls(acceptor))) => {
            let Stream::Tcp(tcp) = plain else { unreachable!("built plain above") };
            match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => match crate::stream::relay(tls) {
                    Ok(s) => Ok(s),
                    Err(e) => {
                        warn!(error = %e, "cannot relay a TLS session");
                        return;
                    }
                },
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        Ok(Ok(Encryption::Close)) => return,
        Ok(Err(e)) => {
            debug!(error = %e, "startup failed");
            return;
        }
        Err(_) => Err(plain),
    };
    let stream = match start {
        Ok(s) => s,
        Err(plain) => {
            let _ = write_fatal(&plain, sqlstate::CONNECTION_FAILURE, "timeout during startup or authentication").await;
            return;
        }
    };
    let start = tokio::time::timeout_at(deadline, startup(&shared, &stream, &mut cin, &limit)).await;
    if state.compare_exchange(LOGGING_IN, LOGGED_IN, std::sync::atomic::Ordering::AcqRel, std::sync::atomic::Ordering::Acquire).is_err() {
        // evicted to make room for a newer login: the task is being aborted
        return;
    }
    let mut login = match start {
        Ok(Ok(Some(l))) => l,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(error = %e, "startup failed");
            return;
        }
        Err(_) => {
            let out = crate::error::ClientError::fatal(sqlstate::CONNECTION_FAILURE, "timeout during startup or authentication").frame();
            let _ = write_all(&stream, &out).await;
            return;
        }
    };
    let _place = login.permit.take();
    info!(user = %login.user, "client connected");
    metrics::gauge!(m::CLIENT_CONNECTIONS).increment(1.0);
    let id = shared.register_session(&login.user, peer);
    let mut s = Session::new(shared.clone(), stream, cin, login);
    let end = s.run_loop().await;
    s.finish(end).await;
    shared.unregister_session(id);
    metrics::gauge!(m::CLIENT_CONNECTIONS).decrement(1.0);
}

async fn read_more(stream: &Stream, buf: &mut BytesMut) -> std::io::Result<()> {
    loop {
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

type Server = crate::backend::Pooled;

struct Session {
    shared: Arc<Shared>,
    client: Stream,
    /// Bytes from the client not yet handled.
    cin: BytesMut,
    /// Bytes queued for the client.
    cout: BytesMut,
    /// Transaction status from the last ReadyForQuery.
    tx_status: u8,
    /// Why the client is pinned to its server, if it is.
    pinned: Option<&'static str>,
    /// After a proxy-made error in an extended batch, drop messages until Sync.
    discard_until_sync: bool,
    /// Client-requested parameter values to apply on each server.
    desired: Vec<(String, String)>,
    registration: Registration,
    /// Last time the client sent anything.
    last_client_activity: Instant,
    /// When the running request is cancelled for `query_timeout_ms`.
    query_deadline: Option<Instant>,
    /// Shutdown was requested: close at the next clean point.
    shutting_down: bool,
    max_message: usize,
    /// While set, routed answers are kept whole in `cout` (up to this many bytes), not sent.
    capture_limit: Option<usize>,
    /// The cancel slot's epoch when the routed statement now running began
    /// (see [`crate::cancel::CancelSlot::epoch`]).
    cancel_epoch: u64,
    /// The user may run admin commands.
    admin: bool,
    db: parts::DbLink,
    shard_tx: parts::ShardTx,
    routed: parts::RoutedPrepared,
    cache_hold: parts::CacheHold,
}

impl Session {
    fn new(shared: Arc<Shared>, client: Stream, cin: BytesMut, login: Login) -> Self {
        let max_message = shared.config.server.max_message_size;
        // values equal to what every server connection starts with need no SET
        let desired = login
            .desired
            .into_iter()
            .filter(|(k, _)| TRACKED_PARAMS.contains(&k.as_str()))
            .map(|(k, v)| (k, normalize_param(&v)))
            .filter(|(k, v)| !STARTUP_PARAMS.iter().any(|(sk, sv)| sk.eq_ignore_ascii_case(k) && normalize_param(sv) == *v))
            .collect();
        Session {
            shared,
            client,
            db: {
                let mut db = parts::DbLink::default();
                db.sout = BytesMut::with_capacity(8 * 1024);
                db
            },
            shard_tx: parts::ShardTx::default(),
            routed: parts::RoutedPrepared::default(),
            cache_hold: parts::CacheHold::default(),
            cin,
            cout: BytesMut::with_capacity(16 * 1024),
            tx_status: b'I',
            pinned: None,
            discard_until_sync: false,
            desired,
            registration: login.registration,
            last_client_activity: Instant::now(),
            query_deadline: None,
            shutting_down: false,
            max_message,
            capture_limit: None,
            cancel_epoch: 0,
            admin: login.admin,
        }
    }

    /// True when nothing is in flight and no transaction is open.
    fn at_clean_point(&self) -> bool {
        self.db.idle() && self.tx_status == b'I'
    }

    async fn run_loop(&mut self) -> End {
        match self.run_loop_inner().await {
            Ok(()) => End::Done,
            Err(e) => e,
        }
    }

    async fn run_loop_inner(&mut self) -> Result<(), End> {
        // one future for the session's life: a fresh `changed()` per wait would
        // register and drop a waiter on every message
        let mut shutdown = self.shared.shutdown.clone();
        let shutdown_signal = async move {
            let _ = shutdown.changed().await;
        };
        tokio::pin!(shutdown_signal);
        let cfg = &self.shared.config.server;
        let client_idle = Duration::from_millis(cfg.client_idle_timeout_ms);
        let idle_in_tx = Duration::from_millis(cfg.idle_in_transaction_timeout_ms);
        // the clock is read per client message only when a timeout needs it
        let track_activity = !client_idle.is_zero() || !idle_in_tx.is_zero();
        // One timer for the session's life. Deadlines mostly move later (every
        // message pushes the idle deadline), so the timer is only re-armed when a
        // deadline must come sooner; when it fires early the deadline is checked
        // and the timer re-armed. This keeps timer-wheel work off the per-message path.
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        loop {
            // 0. a COMMIT that carried a two-phase decision has ended: finish it before anything else
            if !self.shard_tx.resolve_2pc.is_empty() {
                self.resolve_pending_2pc().await;
            }
            // 1. client messages, while the server side is not backed up
            while self.db.sout.len() < HIGH_WATER {
                let frame = match split_frame(&mut self.cin, self.max_message) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max }) => {
                        return Err(End::Fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("message of {len} bytes exceeds server.max_message_size ({max})")));
                    }
                    Err(e) => return Err(End::Fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid message: {e}"))),
                };
                if self.on_client(frame).await? == Flow::Close {
                    return Ok(());
                }
            }
            // 2. server messages, while the client side is not backed up
            self.drain_server(|s| s.cout.len() >= HIGH_WATER)?;
            if self.routed.stream.is_some() && self.tx_status == b'I' && !self.shard_tx.batch_tx {
                // db_default's block ended under a streaming portal (a COMMIT pipelined
                // ahead of its Execute): the shard part cannot follow, it is closed
                self.abandon_stream().await;
                self.drop_orphaned_shard_tx();
            }
            // a COMMIT that carried a two-phase decision has ended: the shards commit before
            // the client hears of it (it may read its rows right after)
            if !self.shard_tx.resolve_2pc.is_empty() {
                self.resolve_pending_2pc().await;
            }
            // 3. committed cache invalidations reach Redis before the client hears of the commit
            self.flush_cache_invalidations().await;
            // return the server at a clean point
            self.maybe_release();
            // 4. write what we can without waiting; a write to a cached table is
            // reported only once its commit has dropped the keys (drivers treat
            // CommandComplete as done, before ReadyForQuery arrives)
            if !self.holding_for_cache() {
                flush_now(&self.client, &mut self.cout)?;
            }
            if let Some(server) = &self.db.server {
                if flush_now(&server.stream, &mut self.db.sout).is_err() {
                    self.server_lost()?;
                    continue;
                }
            }
            if self.shutting_down && self.db.server.is_none() && self.cout.is_empty() {
                return Err(End::Fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command".into()));
            }
            // 5. wait for the next event
            let (timer, _) = self.next_timer(client_idle, idle_in_tx);
            if let Some(t) = timer {
                if armed.is_none_or(|a| a > t) {
                    sleep.as_mut().reset(t.into());
                    armed = Some(t);
                }
            }
            let server_stream = self.db.server.as_ref().map(|s| &s.stream);
            let want_client = self.db.sout.len() < HIGH_WATER;
            let want_server = self.cout.len() < HIGH_WATER;
            let hold = self.holding_for_cache();
            tokio::select! {
                r = self.client.readable(), if want_client => {
                    r?;
                    match self.client.read_available(&mut self.cin) {
                        Ok(0) => return Ok(()),
                        Ok(_) => {
                            if track_activity {
                                self.last_client_activity = Instant::now();
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                r = readable(server_stream), if want_server && server_stream.is_some() => {
                    let server = &mut **self.db.server.as_mut().expect("guarded by server_stream");
                    let res = r.and_then(|()| {
                        let crate::backend::ServerConn { stream, rbuf, .. } = server;
                        stream.read_available(rbuf)
                    });
                    match res {
                        Ok(0) => self.server_lost()?,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => self.server_lost()?,
                    }
                }
                r = self.client.writable(), if !self.cout.is_empty() && !hold => r?,
                r = writable(server_stream), if !self.db.sout.is_empty() && server_stream.is_some() => {
                    if r.is_err() {
                        self.server_lost()?;
                    }
                }
                _ = &mut sleep, if armed.is_some() => {
                    armed = None;
                    let (timer, kind) = self.next_timer(client_idle, idle_in_tx);
                    if timer.is_some_and(|t| t <= Instant::now()) {
                        self.on_timer(kind)?;
                    }
                }
                () = &mut shutdown_signal, if !self.shutting_down => {
                    self.shutting_down = true;
                }
            }
        }
    }

    /// The earliest timeout that applies in the current state.
    fn next_timer(&self, client_idle: Duration, idle_in_tx: Duration) -> (Option<Instant>, Timer) {
        if let Some(d) = self.query_deadline {
            return (Some(d), Timer::Query);
        }
        if self.db.server.is_none() {
            if !client_idle.is_zero() {
                return (Some(self.last_client_activity + client_idle), Timer::ClientIdle);
            }
        } else if !idle_in_tx.is_zero() && self.db.pending_ready == 0 && !self.db.sent_since_sync && self.tx_status != b'I' {
            return (Some(self.last_client_activity + idle_in_tx), Timer::IdleInTransaction);
        }
        (None, Timer::Query)
    }

    fn on_timer(&mut self, kind: Timer) -> Result<(), End> {
        match kind {
            Timer::Query => {
                self.query_deadline = None;
                if let Some(server) = &self.db.server {
                    metrics::counter!(m::QUERY_TIMEOUTS_TOTAL).increment(1);
                    warn!(timeout_ms = self.shared.config.server.query_timeout_ms, "query timeout, cancelling");
                    let key = server.cancel_key.clone();
                    tokio::spawn(async move {
                        let _ = key.cancel().await;
                    });
                }
                Ok(())
            }
            Timer::ClientIdle => Err(End::Fatal(sqlstate::IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout".into())),
            Timer::IdleInTransaction => Err(End::Fatal(sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT, "terminating connection due to idle-in-transaction timeout".into())),
        }
    }

    async fn finish(&mut self, end: End) {
        self.abandon_stream().await;
        self.cache_on_end().await;
        match &end {
            End::Fatal(code, message) => {
                crate::error::ClientError::fatal(code, message.as_str()).put(&mut self.cout);
            }
            End::ClientIo(e) => debug!(error = %e, "client i/o error"),
            End::Done => {}
        }
        if !matches!(end, End::ClientIo(_)) && !self.cout.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), write_all(&self.client, &self.cout)).await;
        }
        if let Some(mut server) = self.db.server.take() {
            if self.pinned.is_some() || !self.at_clean_point() || server.broken {
                // session state or an open transaction must not reach another client
                server.broken = true;
                let _ = server.detach();
            }
        }
        for slot in self.shard_tx.slots.iter_mut() {
            if let Some(mut s) = slot.take() {
                if s.in_tx {
                    // an unfinished transaction block: close it, the server rolls back
                    s.conn.broken = true;
                }
            }
        }
        self.registration.slot.set(None);
        info!("client disconnected");
    }
}

#[derive(Clone, Copy)]
enum Timer {
    Query,
    ClientIdle,
    IdleInTransaction,
}

fn flush_now(stream: &Stream, buf: &mut BytesMut) -> std::io::Result<()> {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                let _ = buf.split_to(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn readable(s: Option<&Stream>) -> std::io::Result<()> {
    match s {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

async fn writable(s: Option<&Stream>) -> std::io::Result<()> {
    match s {
        Some(s) => s.writable().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parsing() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5 -cDateStyle=ISO junk"),
            vec![("search_path".into(), "a,b".into()), ("statement_timeout".into(), "5".into()), ("datestyle".into(), "ISO".into())]
        );
    }

    #[test]
    fn statement_names_depend_on_text_and_types() {
        let a = statement_name(b"select $1", b"\0\x01\0\0\0\x17");
        assert_eq!(a, statement_name(b"select $1", b"\0\x01\0\0\0\x17"));
        assert_ne!(a, statement_name(b"select $1", b"\0\x01\0\0\0\x14"));
        assert_ne!(a, statement_name(b"select $2", b"\0\x01\0\0\0\x17"));
        assert!(a.len() < 64, "fits NAMEDATALEN");
    }
}
