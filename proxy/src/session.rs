//! One client connection, start to end: startup and authentication, then a
//! full-duplex loop that forwards protocol messages to a pooled server
//! connection held for one transaction (transaction pooling).
//!
//! Rules this file keeps:
//! - bytes are forwarded as received; only Parse/Bind/Describe/Close are
//!   rewritten (statement names), and only the proxy's own injected messages
//!   have their replies swallowed, tracked in order by [`Expect`];
//! - a server connection is returned only at a clean point: every request
//!   answered, transaction status idle, nothing pinned;
//! - reads stop while the other side's write buffer is full (backpressure),
//!   and writes never block reads, so pipelined clients cannot deadlock us.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use deadpool::managed::{Object, PoolError, TimeoutType};
use shardgate_config::{AuthMethod, PoolMode};
use shardgate_router::{SettingChange, session_effect, SessionEffect};
use tokio::net::TcpStream;

pub(crate) use crate::stream::write_all;
use crate::stream::Stream;
use tracing::{debug, info, warn};

use crate::auth::{verify_md5, ScramSecret, ScramServer};
use crate::backend::conn::MAX_SERVER_MESSAGE;
use crate::backend::conn::STARTUP_PARAMS;
use crate::backend::ServerManager;
use crate::cancel::Registration;
use crate::error::ProxyError;
use crate::metrics as m;
use crate::protocol::backend::{self as msg, parse_error_fields, parse_parameter_status, Severity};
use crate::protocol::codec::{frame_total, put_message, split_frame, split_startup, Frame, FrameError, FrameRef};
use crate::protocol::frontend::{parse_startup, Bind, Parse, SaslInitial, StartupPacket, Target, GSSENC_REQUEST, SSL_REQUEST};
use crate::server::Shared;

mod admin_sql;
mod cached;
mod migrating;
mod routing;
mod streaming;

/// Largest startup packet accepted (PostgreSQL's MAX_STARTUP_PACKET_LENGTH).
const MAX_STARTUP: usize = 10_000;
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
    ParseComplete { forward: bool, name: Option<Arc<str>> },
    /// CloseComplete for a Close; `evicted` is the server statement the proxy
    /// closed to make room (back in the set if the server skipped the Close).
    CloseComplete { forward: bool, evicted: Option<Arc<str>> },
    /// ReadyForQuery for a client Sync (`sync`) or Query/FunctionCall.
    Ready { sync: bool },
    /// The client ended a COPY FROM STDIN (CopyDone/CopyFail) before the
    /// server's CopyInResponse was seen: Syncs sent before this marker were
    /// ignored by the server.
    CopyEnd,
    /// Everything up to and including ReadyForQuery of a query the proxy sent itself.
    SwallowUntilReady,
    /// BindComplete for a forwarded Bind.
    BindComplete,
    /// The end of a forwarded Describe (RowDescription or NoData).
    Describe,
    /// The end of a forwarded Execute (CommandComplete, EmptyQueryResponse, PortalSuspended).
    Execute,
    /// A Parse the proxy made fail on purpose (the client re-used a statement
    /// name): the server's ErrorResponse is replaced by this one, so the error
    /// arrives in order and the server skips to Sync / aborts the transaction
    /// exactly as PostgreSQL would for the duplicate name.
    ReplaceError(Bytes),
}

/// A client's named prepared statement, mapped to a server statement name
/// derived from its text and types, so any server can hold it.
struct Statement {
    server_name: Arc<str>,
    /// The Parse message under the server name, ready to inject.
    parse: Bytes,
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
            let _ = write_fatal(&plain, "08006", "timeout during startup or authentication").await;
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
            let mut out = BytesMut::new();
            msg::error_response(&mut out, Severity::Fatal, "08006", "timeout during startup or authentication");
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

/// What the client asked for before its startup packet.
enum Encryption {
    /// Nothing (or encryption we declined): the startup packet is in `cin`.
    Plain,
    /// TLS, answered `S`: the handshake comes next.
    Tls(tokio_rustls::TlsAcceptor),
    /// The connection is to close (told why).
    Close,
}

/// Answers the encryption requests that may open a connection: GSSENCRequest
/// gets `N`; SSLRequest gets `S` when `server.tls_cert_file` is set, else `N`.
/// Any other first packet is left in `cin`.
async fn encryption_request(shared: &Shared, stream: &Stream, cin: &mut BytesMut) -> std::io::Result<Encryption> {
    // one SSLRequest and one GSSENCRequest at most, as PostgreSQL allows
    for _ in 0..2 {
        while cin.len() < 8 {
            read_more(stream, cin).await?;
        }
        let len = i32::from_be_bytes([cin[0], cin[1], cin[2], cin[3]]);
        let code = i32::from_be_bytes([cin[4], cin[5], cin[6], cin[7]]);
        if len != 8 || (code != SSL_REQUEST && code != GSSENC_REQUEST) {
            return Ok(Encryption::Plain);
        }
        let _ = cin.split_to(8);
        if !cin.is_empty() {
            // bytes sent before our answer could be injected by a man in the middle
            write_fatal(stream, "08P01", "received unencrypted data after SSL request").await?;
            return Ok(Encryption::Close);
        }
        match (&shared.tls, code == SSL_REQUEST) {
            (Some(acceptor), true) => {
                write_all(stream, b"S").await?;
                return Ok(Encryption::Tls(acceptor.clone()));
            }
            _ => write_all(stream, b"N").await?,
        }
    }
    Ok(Encryption::Plain)
}

/// What startup established.
struct Login {
    user: String,
    admin: bool,
    desired: Vec<(String, String)>,
    registration: Registration,
    /// The client's place under `server.max_client_connections` (held by `run` until the session ends).
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A short read drained the socket: clear tokio's read readiness without the
/// extra `recv` that would only return EAGAIN. Safe against lost wakeups:
/// tokio clears only the readiness event observed before this call; data that
/// arrives later raises a new one.
fn clear_read_readiness(stream: &Stream) {
    let _ = stream.try_io(tokio::io::Interest::READABLE, || Err::<(), _>(std::io::ErrorKind::WouldBlock.into()));
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

async fn write_fatal(stream: &Stream, code: &str, message: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    msg::error_response(&mut out, Severity::Fatal, code, message);
    write_all(stream, &out).await
}

/// Reads one startup packet; `None` on a malformed one (after telling the client).
async fn read_startup_packet(stream: &Stream, cin: &mut BytesMut) -> std::io::Result<Option<Bytes>> {
    loop {
        match split_startup(cin, MAX_STARTUP) {
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => read_more(stream, cin).await?,
            Err(_) => {
                write_fatal(stream, "08P01", "invalid length of startup packet").await?;
                return Ok(None);
            }
        }
    }
}

/// Reads one tagged message during authentication.
async fn read_auth_message(stream: &Stream, cin: &mut BytesMut) -> std::io::Result<Option<Frame>> {
    loop {
        match split_frame(cin, MAX_STARTUP) {
            Ok(Some(f)) if f.tag == b'p' => return Ok(Some(f)),
            Ok(Some(_)) => {
                write_fatal(stream, "08P01", "expected password response").await?;
                return Ok(None);
            }
            Ok(None) => read_more(stream, cin).await?,
            Err(_) => {
                write_fatal(stream, "08P01", "invalid message length during authentication").await?;
                return Ok(None);
            }
        }
    }
}

async fn startup(shared: &Arc<Shared>, stream: &Stream, cin: &mut BytesMut, limit: &Arc<tokio::sync::Semaphore>) -> std::io::Result<Option<Login>> {
    let Some(pkt) = read_startup_packet(stream, cin).await? else {
        return Ok(None);
    };
    let (version, params) = match parse_startup(&pkt) {
        Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
            // encryption_request answered the ones that open a connection; PostgreSQL
            // refuses one after that (inside TLS)
            write_fatal(stream, "08P01", "unsupported frontend protocol: encryption is negotiated only before the startup packet").await?;
            return Ok(None);
        }
        Ok(StartupPacket::Cancel { pid, secret }) => {
            let keys = shared.cancels.lookup(pid, secret);
            if !keys.is_empty() {
                debug!(pid, servers = keys.len(), "forwarding cancel request");
            }
            for key in keys {
                if let Err(e) = key.cancel().await {
                    warn!(error = %e, "cancel request to server failed");
                }
            }
            return Ok(None);
        }
        Ok(StartupPacket::Startup { version, params }) => (version, params),
        Err(e) => {
            write_fatal(stream, "08P01", &format!("invalid startup packet: {e}")).await?;
            return Ok(None);
        }
    };
    if shared.config.server.require_tls && !stream.is_tls() {
        metrics::counter!(m::CLIENT_REFUSED_TOTAL).increment(1);
        write_fatal(stream, "28000", "this server accepts only TLS connections (server.require_tls): connect with sslmode=require or stronger").await?;
        return Ok(None);
    }
    if version >> 16 != 3 {
        write_fatal(stream, "0A000", &format!("unsupported frontend protocol {}.{}: server supports 3.0 to 3.0", version >> 16, version & 0xffff)).await?;
        return Ok(None);
    }
    let mut user = None;
    let mut desired = Vec::new();
    let mut unknown_protocol_options = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" => user = Some(v),
            "database" | "replication" => {}
            "options" => desired.extend(parse_options(&v)),
            k if k.starts_with("_pq_.") => unknown_protocol_options.push(k.to_string()),
            _ => desired.push((k.to_ascii_lowercase(), v)),
        }
    }
    if version & 0xffff != 0 || !unknown_protocol_options.is_empty() {
        // NegotiateProtocolVersion: we speak 3.0 and no protocol extensions
        let mut out = BytesMut::new();
        put_message(&mut out, b'v', |o| {
            o.extend_from_slice(&(3i32 << 16).to_be_bytes());
            o.extend_from_slice(&(unknown_protocol_options.len() as i32).to_be_bytes());
            for name in &unknown_protocol_options {
                crate::protocol::codec::put_cstr(o, name.as_bytes());
            }
        });
        write_all(stream, &out).await?;
    }
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        write_fatal(stream, "28000", "no PostgreSQL user name specified in startup packet").await?;
        return Ok(None);
    };
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        metrics::counter!(m::CLIENT_REFUSED_TOTAL).increment(1);
        write_fatal(stream, "53300", "sorry, too many clients already").await?;
        return Ok(None);
    };
    if !authenticate(shared, stream, cin, &user).await? {
        metrics::counter!(m::AUTH_FAILURES_TOTAL).increment(1);
        info!(user = %user, "authentication failed");
        write_fatal(stream, "28P01", &format!("password authentication failed for user \"{user}\"")).await?;
        return Ok(None);
    }
    if *shared.shutdown.borrow() {
        write_fatal(stream, "57P03", "the database system is shutting down").await?;
        return Ok(None);
    }
    if desired.iter().any(|(k, v)| k == "standard_conforming_strings" && !matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "1" | "yes")) {
        write_fatal(stream, "0A000", "standard_conforming_strings must stay on through shardgate: it reads and rewrites SQL text with standard string literals").await?;
        return Ok(None);
    }
    let registration = shared.cancels.register();
    let mut out = BytesMut::new();
    msg::authentication(&mut out, 0, &[]);
    for (k, v) in shared.login_parameters(&desired).await {
        msg::parameter_status(&mut out, &k, &v);
    }
    msg::backend_key_data(&mut out, registration.pid, registration.secret);
    msg::ready_for_query(&mut out, b'I');
    write_all(stream, &out).await?;
    metrics::counter!(m::CLIENT_CONNECTIONS_TOTAL).increment(1);
    let admin = shared.config.user(&user).is_some_and(|u| u.admin);
    Ok(Some(Login { user, admin, desired, registration, permit: Some(permit) }))
}

/// Parses `-c name=value` / `--name=value` pairs of the `options` startup parameter.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let kv = if w == "-c" { words.next() } else { w.strip_prefix("--").or_else(|| w.strip_prefix("-c")) };
        if let Some((k, v)) = kv.and_then(|kv| kv.split_once('=')) {
            out.push((k.replace('-', "_").to_ascii_lowercase(), v.to_string()));
        }
    }
    out
}

/// Runs the configured exchange; false when the password is wrong or the user unknown.
async fn authenticate(shared: &Shared, stream: &Stream, cin: &mut BytesMut, user: &str) -> std::io::Result<bool> {
    let secret = shared.users.get(user);
    let method = secret.map_or(shared.config.server.auth_method, |s| s.method);
    let mut out = BytesMut::new();
    match method {
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            msg::authentication(&mut out, 5, &salt);
            write_all(stream, &out).await?;
            let Some(f) = read_auth_message(stream, cin).await? else {
                return Ok(false);
            };
            let resp = f.body().strip_suffix(&[0]).unwrap_or(f.body());
            Ok(secret.and_then(|s| s.md5.as_deref()).is_some_and(|h| verify_md5(h, salt, resp)))
        }
        AuthMethod::ScramSha256 => {
            // unknown users run the same exchange against a secret nothing matches
            let scram = secret.and_then(|s| s.scram.clone()).unwrap_or_else(|| ScramSecret::mock(user, &shared.mock_key));
            // over TLS, SCRAM-SHA-256-PLUS too: bound to the proxy's certificate, a
            // man in the middle cannot relay the exchange
            let binding = shared.tls_end_point.as_deref().filter(|_| stream.is_tls());
            let mechanisms: &[u8] = if binding.is_some() { b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0" } else { b"SCRAM-SHA-256\0\0" };
            msg::authentication(&mut out, 10, mechanisms);
            write_all(stream, &out).await?;
            let Some(f) = read_auth_message(stream, cin).await? else {
                return Ok(false);
            };
            let Ok(init) = SaslInitial::parse(f.body()) else {
                return Ok(false);
            };
            let plus = match (init.mechanism, binding) {
                (b"SCRAM-SHA-256", _) => None,
                (b"SCRAM-SHA-256-PLUS", Some(b)) => Some(b),
                _ => {
                    write_fatal(stream, "28000", "client selected an invalid SASL authentication mechanism").await?;
                    return Ok(false);
                }
            };
            let (server, server_first) = match ScramServer::start(scram, init.data, plus, binding.is_some()) {
                Ok(x) => x,
                Err(crate::auth::AuthError::ChannelBinding) => {
                    write_fatal(stream, "08P01", "SCRAM channel binding negotiation error").await?;
                    return Ok(false);
                }
                Err(_) => return Ok(false),
            };
            out.clear();
            msg::authentication(&mut out, 11, server_first.as_bytes());
            write_all(stream, &out).await?;
            let Some(f) = read_auth_message(stream, cin).await? else {
                return Ok(false);
            };
            match server.finish(f.body()) {
                Ok(server_final) if secret.is_some() => {
                    out.clear();
                    msg::authentication(&mut out, 12, server_final.as_bytes());
                    write_all(stream, &out).await?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
    }
}

type Server = Object<ServerManager>;

struct Session {
    shared: Arc<Shared>,
    client: Stream,
    /// Bytes from the client not yet handled.
    cin: BytesMut,
    /// Bytes queued for the client.
    cout: BytesMut,
    /// The server connection held now, if any.
    server: Option<Server>,
    /// Bytes queued for the server.
    sout: BytesMut,
    /// Replies the server owes, in order.
    expect: VecDeque<Expect>,
    /// Sync/Query messages forwarded whose ReadyForQuery has not come back.
    pending_ready: u32,
    /// Extended-protocol messages forwarded since the last Sync.
    sent_since_sync: bool,
    /// Transaction status from the last ReadyForQuery.
    tx_status: u8,
    /// Why the client is pinned to its server, if it is.
    pinned: Option<&'static str>,
    /// After a proxy-made error in an extended batch, drop messages until Sync.
    discard_until_sync: bool,
    /// The client's named prepared statements.
    statements: HashMap<Vec<u8>, Statement>,
    /// The server reported an error and skips messages until the next Sync,
    /// which the client has not sent yet: Parse/Close sent until then get no reply.
    server_skipping: bool,
    /// Client-requested parameter values to apply on each server.
    desired: Vec<(String, String)>,
    registration: Registration,
    /// Last time the client sent anything.
    last_client_activity: Instant,
    /// When the running request is cancelled for `query_timeout_ms`.
    query_deadline: Option<Instant>,
    /// Shutdown was requested: close at the next clean point.
    shutting_down: bool,
    /// The server is in COPY FROM STDIN mode (ignoring Sync until CopyDone/CopyFail);
    /// `Some(true)` when the COPY came from the extended protocol, which still owes a Sync after it.
    copy_in: Option<bool>,
    max_message: usize,
    /// Shard connections held (inside a transaction block, or during one statement).
    slots: crate::routed::exec::Slots,
    /// Secondary writes of the open block, run at COMMIT (migration dual-write).
    secondaries: Vec<migrating::Secondary>,
    /// The client's prepared statements on sharded tables (answered by the proxy).
    routed_stmts: HashMap<Vec<u8>, Arc<routing::RoutedStmt>>,
    /// Portals bound to those statements.
    routed_portals: HashMap<Vec<u8>, routing::RoutedPortal>,
    /// Routed portals read in parts (Execute with a row limit): the rows not yet sent.
    suspended: HashMap<Vec<u8>, routing::Suspended>,
    /// A portal read in parts inside a block, streaming from its own task
    /// (which holds the shard connections meanwhile).
    stream: Option<streaming::Streaming>,
    /// The next routed SELECT is to start streaming instead of running inline.
    stream_next: bool,
    /// While set, routed answers are kept whole in `cout` (up to this many bytes), not sent.
    capture_limit: Option<usize>,
    /// Shards joined the implicit transaction of the current extended batch
    /// (writes before one Sync apply together, as in PostgreSQL): ended at the Sync.
    batch_tx: bool,
    /// The client's BEGIN text, repeated on shards that join the transaction.
    begin_sql: Option<String>,
    /// The open block's `SET LOCAL`s of tracked parameters, for the shards that
    /// join it (cleared when the block ends).
    local_sets: Vec<(String, Option<String>)>,
    /// Savepoints of the open block and how many `local_sets` were made
    /// before each: `ROLLBACK TO` one undoes the `SET LOCAL`s after it.
    local_marks: Vec<(String, usize)>,
    /// The user may run admin commands.
    admin: bool,
    /// A two-phase commit whose decision row rides on the client's COMMIT (extended protocol).
    pending_2pc: Option<(String, Vec<usize>)>,
    /// That COMMIT has ended on db_default: resolve the prepared shard transactions.
    resolve_2pc: Option<(String, Vec<usize>)>,
    /// The client's prepared statements that write a cached table.
    cache_write_stmts: HashMap<Vec<u8>, cached::CacheWrites>,
    /// Cache invalidations waiting for their transaction to end, each with the
    /// number of ReadyForQuerys owed before its statement's own.
    cache_pending: Vec<(u32, crate::cache::Invalidation)>,
    /// The open transaction wrote a cached table: its point reads skip the cache.
    cache_tx_wrote: bool,
    /// Committed invalidations are waiting to be sent to Redis and the other proxies.
    cache_flush: bool,
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
            cin,
            cout: BytesMut::with_capacity(16 * 1024),
            server: None,
            sout: BytesMut::with_capacity(8 * 1024),
            expect: VecDeque::new(),
            pending_ready: 0,
            sent_since_sync: false,
            tx_status: b'I',
            pinned: None,
            discard_until_sync: false,
            server_skipping: false,
            statements: HashMap::new(),
            desired,
            registration: login.registration,
            last_client_activity: Instant::now(),
            query_deadline: None,
            shutting_down: false,
            copy_in: None,
            max_message,
            slots: Vec::new(),
            secondaries: Vec::new(),
            routed_stmts: HashMap::new(),
            batch_tx: false,
            suspended: HashMap::new(),
            stream: None,
            stream_next: false,
            capture_limit: None,
            routed_portals: HashMap::new(),
            begin_sql: None,
            local_sets: Vec::new(),
            local_marks: Vec::new(),
            admin: login.admin,
            pending_2pc: None,
            resolve_2pc: None,
            cache_write_stmts: HashMap::new(),
            cache_pending: Vec::new(),
            cache_tx_wrote: false,
            cache_flush: false,
        }
    }

    /// True when nothing is in flight and no transaction is open.
    fn at_clean_point(&self) -> bool {
        self.pending_ready == 0 && !self.sent_since_sync && self.tx_status == b'I' && self.expect.is_empty() && self.copy_in.is_none()
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
            if self.resolve_2pc.is_some() {
                self.resolve_pending_2pc().await;
            }
            // 1. client messages, while the server side is not backed up
            while self.sout.len() < HIGH_WATER {
                let frame = match split_frame(&mut self.cin, self.max_message) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max }) => {
                        return Err(End::Fatal("54000", format!("message of {len} bytes exceeds server.max_message_size ({max})")));
                    }
                    Err(e) => return Err(End::Fatal("08P01", format!("invalid message: {e}"))),
                };
                if self.on_client(frame).await? == Flow::Close {
                    return Ok(());
                }
            }
            // 2. server messages, while the client side is not backed up
            self.drain_server(|s| s.cout.len() >= HIGH_WATER)?;
            if self.stream.is_some() && self.tx_status == b'I' && !self.batch_tx {
                // db_default's block ended under a streaming portal (a COMMIT pipelined
                // ahead of its Execute): the shard part cannot follow, it is closed
                self.abandon_stream().await;
                self.drop_orphaned_shard_tx();
            }
            // a COMMIT that carried a two-phase decision has ended: the shards commit before
            // the client hears of it (it may read its rows right after)
            if self.resolve_2pc.is_some() {
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
            if let Some(server) = &self.server {
                if flush_now(&server.stream, &mut self.sout).is_err() {
                    self.server_lost()?;
                    continue;
                }
            }
            if self.shutting_down && self.server.is_none() && self.cout.is_empty() {
                return Err(End::Fatal("57P01", "terminating connection due to administrator command".into()));
            }
            // 5. wait for the next event
            let (timer, _) = self.next_timer(client_idle, idle_in_tx);
            if let Some(t) = timer {
                if armed.is_none_or(|a| a > t) {
                    sleep.as_mut().reset(t.into());
                    armed = Some(t);
                }
            }
            let server_stream = self.server.as_ref().map(|s| &s.stream);
            let want_client = self.sout.len() < HIGH_WATER;
            let want_server = self.cout.len() < HIGH_WATER;
            let hold = self.holding_for_cache();
            tokio::select! {
                r = self.client.readable(), if want_client => {
                    r?;
                    let spare = self.cin.capacity() - self.cin.len();
                    match self.client.try_read_buf(&mut self.cin) {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            if track_activity {
                                self.last_client_activity = Instant::now();
                            }
                            if n < spare {
                                clear_read_readiness(&self.client);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                r = readable(server_stream), if want_server && server_stream.is_some() => {
                    let server = &mut **self.server.as_mut().expect("guarded by server_stream");
                    let res = r.and_then(|()| {
                        let crate::backend::ServerConn { stream, rbuf, .. } = server;
                        let spare = rbuf.capacity() - rbuf.len();
                        let n = stream.try_read_buf(rbuf)?;
                        if n > 0 && n < spare {
                            clear_read_readiness(stream);
                        }
                        Ok(n)
                    });
                    match res {
                        Ok(0) => self.server_lost()?,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => self.server_lost()?,
                    }
                }
                r = self.client.writable(), if !self.cout.is_empty() && !hold => r?,
                r = writable(server_stream), if !self.sout.is_empty() && server_stream.is_some() => {
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
        if self.server.is_none() {
            if !client_idle.is_zero() {
                return (Some(self.last_client_activity + client_idle), Timer::ClientIdle);
            }
        } else if !idle_in_tx.is_zero() && self.pending_ready == 0 && !self.sent_since_sync && self.tx_status != b'I' {
            return (Some(self.last_client_activity + idle_in_tx), Timer::IdleInTransaction);
        }
        (None, Timer::Query)
    }

    fn on_timer(&mut self, kind: Timer) -> Result<(), End> {
        match kind {
            Timer::Query => {
                self.query_deadline = None;
                if let Some(server) = &self.server {
                    metrics::counter!(m::QUERY_TIMEOUTS_TOTAL).increment(1);
                    warn!(timeout_ms = self.shared.config.server.query_timeout_ms, "query timeout, cancelling");
                    let key = server.cancel_key.clone();
                    tokio::spawn(async move {
                        let _ = key.cancel().await;
                    });
                }
                Ok(())
            }
            Timer::ClientIdle => Err(End::Fatal("57P05", "terminating connection due to idle-session timeout".into())),
            Timer::IdleInTransaction => Err(End::Fatal("25P03", "terminating connection due to idle-in-transaction timeout".into())),
        }
    }

    /// Returns the server to the pool when the client is at a clean point.
    fn maybe_release(&mut self) {
        if !self.slots.is_empty() {
            self.drop_orphaned_shard_tx();
        }
        if self.server.is_none() || !self.at_clean_point() || self.pinned.is_some() || self.shared.config.pool.mode == PoolMode::Session {
            return;
        }
        debug_assert!(self.sout.is_empty());
        tracing::trace!("server returned to pool");
        self.server = None;
        self.registration.slot.set(None);
    }

    /// Makes sure a server is held; on failure queues the error for the client.
    async fn ensure_server(&mut self) -> Result<bool, ProxyError> {
        if self.server.is_some() {
            return Ok(true);
        }
        let got = crate::backend::pool::checkout(&self.shared.pool, Some(&self.shared.meters.pool_wait)).await;
        let mut server = match got {
            Ok(s) => s,
            Err(PoolError::Timeout(TimeoutType::Wait)) => return Err(ProxyError::PoolTimeout),
            Err(PoolError::Backend(e)) => return Err(ProxyError::BackendUnavailable(e)),
            Err(PoolError::Timeout(_)) => return Err(ProxyError::BackendUnavailable(crate::backend::BackendError::Timeout)),
            // pool closed (shutdown) or misbuilt: the backend is unavailable to us, not a client protocol error
            Err(e) => return Err(ProxyError::BackendUnavailable(crate::backend::BackendError::Protocol(format!("pool: {e}")))),
        };
        let sets = param_sets(&self.desired, &mut server);
        if !sets.is_empty() {
            self.sout.extend_from_slice(&sets);
            self.expect.push_back(Expect::SwallowUntilReady);
        }
        self.registration.slot.set(Some(server.cancel_key.clone()));
        self.set_tx_status(b'I');
        self.server = Some(server);
        Ok(true)
    }

    /// Gets a server for a request, or answers the client with the error.
    async fn server_for(&mut self, extended: bool) -> bool {
        match self.ensure_server().await {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, sqlstate = e.sqlstate(), "no server connection for request");
                metrics::counter!(m::ERRORS_TOTAL, "sqlstate" => e.sqlstate()).increment(1);
                msg::error_response(&mut self.cout, Severity::Error, e.sqlstate(), &e.client_message());
                if extended {
                    self.discard_until_sync = true;
                } else {
                    msg::ready_for_query(&mut self.cout, b'I');
                }
                false
            }
        }
    }

    /// What the client's prepared statements take in the proxy (see [`statement_weight`]).
    fn statement_bytes(&self) -> usize {
        let plain: usize = self.statements.values().map(|s| s.parse.len()).sum();
        let routed: usize = self.routed_stmts.values().map(|r| shardgate_router::analysis_weight(r.sql.len())).sum();
        plain + routed
    }

    /// Records `db_default`'s transaction status; a block's `SET LOCAL`s end with it.
    fn set_tx_status(&mut self, status: u8) {
        self.tx_status = status;
        if status == b'I' {
            self.local_sets.clear();
            self.local_marks.clear();
        }
    }

    /// Notes what a statement sent on to `db_default` does to the session: a
    /// tracked parameter the shards must follow, or pinning. `Err` is a SET the
    /// shards cannot follow: the statement is refused with this message.
    fn note_statement_text(&mut self, sql: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(sql).ok();
        let word = text.and_then(shardgate_router::first_word);
        if let Some(t) = text.filter(|_| word.is_some_and(|w| ["savepoint", "rollback", "abort", "release", "commit", "end"].iter().any(|k| w.eq_ignore_ascii_case(k)))) {
            self.note_block_step(t);
        }
        if word.is_some_and(|w| w.eq_ignore_ascii_case("set") || w.eq_ignore_ascii_case("reset")) {
            // shard connections get the client's session parameters too (see param_sets)
            match text.and_then(|t| shardgate_router::setting_change(t, TRACKED_PARAMS)) {
                Some(SettingChange::ResetAll) => self.desired.clear(),
                Some(SettingChange::Reset(name)) => self.desired.retain(|(k, _)| *k != name),
                Some(SettingChange::Set(name, v)) => {
                    self.desired.retain(|(k, _)| *k != name);
                    self.desired.push((name, normalize_param(&v)));
                }
                // recorded even before db_default reports the block (BEGIN and SET LOCAL in one
                // extended batch, or an implicit batch transaction); outside a transaction it
                // is dropped at the next ReadyForQuery, as PostgreSQL drops it
                Some(SettingChange::Local(name, v)) => {
                    self.local_sets.push((name, v.map(|v| normalize_param(&v))));
                }
                Some(SettingChange::Refused(m)) => return Err(m),
                None => {}
            }
        }
        self.note_pinning(sql);
        Ok(())
    }

    /// Savepoints and block ends on `db_default` (no shard takes part; with
    /// shards they are handled, or refused, before this): `SET LOCAL`s made
    /// after a savepoint end with `ROLLBACK TO` it, and all of them end with
    /// the block, `COMMIT AND CHAIN` too (whose new block keeps the status).
    fn note_block_step(&mut self, text: &str) {
        use shardgate_router::{SavepointOp, TxControl};
        match shardgate_router::savepoint_op(text) {
            Some(SavepointOp::Define(name)) => self.local_marks.push((name, self.local_sets.len())),
            Some(SavepointOp::RollbackTo(name)) => {
                if let Some(i) = self.local_marks.iter().rposition(|(n, _)| *n == name) {
                    // the savepoint stays; later ones are gone
                    self.local_marks.truncate(i + 1);
                    let keep = self.local_marks[i].1;
                    self.local_sets.truncate(keep);
                }
            }
            Some(SavepointOp::Release(name)) => {
                if let Some(i) = self.local_marks.iter().rposition(|(n, _)| *n == name) {
                    self.local_marks.truncate(i);
                }
            }
            None => {
                if matches!(shardgate_router::transaction_control(text), TxControl::Commit | TxControl::Rollback) {
                    self.local_sets.clear();
                    self.local_marks.clear();
                }
            }
        }
    }

    /// Messages that leave a streaming portal running: its own Execute, Sync and Flush.
    fn stream_goes_on(&self, f: &Frame) -> bool {
        match f.tag {
            b'S' | b'H' => true,
            b'E' => {
                let mut r = crate::protocol::frontend::Reader::new(f.body());
                r.cstr().is_ok_and(|p| self.stream.as_ref().is_some_and(|s| s.portal == p))
            }
            _ => false,
        }
    }

    fn note_pinning(&mut self, sql: &[u8]) {
        if self.pinned.is_some() || !shardgate_router::may_pin(sql) {
            return;
        }
        let text = String::from_utf8_lossy(sql);
        if let SessionEffect::Pins(reason) = session_effect(&text) {
            debug!(reason, "client pinned to its server connection");
            metrics::counter!(m::PINNED_TOTAL, "reason" => reason).increment(1);
            self.pinned = Some(reason);
        }
    }

    /// Remembers the client's BEGIN text so shards joining the block start it the same way.
    fn note_begin(&mut self, sql: &[u8]) {
        // cheap first: the first word must be BEGIN or START (reading past comments)
        let head = sql.iter().find(|b| !b.is_ascii_whitespace()).map(u8::to_ascii_lowercase);
        if !matches!(head, Some(b'b' | b's' | b'/' | b'-')) {
            return;
        }
        let text = String::from_utf8_lossy(sql);
        if !shardgate_router::first_word(&text).is_some_and(|w| w.eq_ignore_ascii_case("begin") || w.eq_ignore_ascii_case("start")) {
            return;
        }
        if shardgate_router::transaction_control(&text) == shardgate_router::TxControl::Begin {
            // the shards join with the BEGIN as the router reads it, never the client's text
            self.begin_sql = Some(shardgate_router::begin_statement(&text));
        }
    }

    /// 42P05 for a Parse that reuses a name, in order with the server's replies.
    fn fail_duplicate(&mut self, name: &[u8]) {
        let mut err = BytesMut::new();
        msg::error_response(&mut err, Severity::Error, "42P05", &format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(name)));
        if self.server.is_some() && !self.server_skipping {
            crate::protocol::codec::put_message(&mut self.sout, b'P', |b| b.extend_from_slice(b"\0!\0\0\0"));
            self.expect.push_back(Expect::ReplaceError(err.freeze()));
            self.sent_since_sync = true;
        } else if self.server.is_none() {
            self.cout.extend_from_slice(&err);
        }
        self.discard_until_sync = true;
    }

    fn arm_query_timeout(&mut self) {
        let t = self.shared.config.server.query_timeout_ms;
        if t > 0 && self.query_deadline.is_none() {
            self.query_deadline = Some(Instant::now() + Duration::from_millis(t));
        }
    }

    /// Makes sure the held server has `stmt` prepared, injecting its Parse if not.
    fn ensure_prepared(&mut self, name: &[u8]) {
        let cap = self.shared.config.pool.max_prepared_statements;
        let (Some(stmt), Some(server)) = (self.statements.get(name), self.server.as_mut()) else {
            return;
        };
        if server.prepared.contains(&stmt.server_name) {
            server.prepared.touch(&stmt.server_name);
            return;
        }
        if !self.server_skipping {
            make_room(server, cap, &mut self.sout, &mut self.expect);
        }
        self.sout.extend_from_slice(&stmt.parse);
        if !self.server_skipping {
            server.prepared.insert(&stmt.server_name);
            self.expect.push_back(Expect::ParseComplete { forward: false, name: Some(stmt.server_name.clone()) });
        }
    }

    async fn on_client(&mut self, f: Frame) -> Result<Flow, End> {
        tracing::trace!(tag = %(f.tag as char), len = f.raw.len(), server = self.server.is_some(), "client message");
        if self.discard_until_sync && f.tag != b'S' && f.tag != b'X' {
            return Ok(Flow::Continue);
        }
        if self.stream.is_some() && !self.stream_goes_on(&f) {
            // another message needs the shard connections: the portal's answer is read now
            let closes = f.tag == b'C' && Target::parse(f.body()).is_ok_and(|t| t.kind == b'P' && self.stream.as_ref().is_some_and(|s| s.portal == t.name));
            let text = match f.tag {
                b'Q' => f.body().strip_suffix(&[0]),
                b'P' => {
                    let mut r = crate::protocol::frontend::Reader::new(f.body());
                    r.cstr().ok().and_then(|_| r.cstr().ok())
                }
                _ => None,
            };
            let control = text.and_then(|t| std::str::from_utf8(t).ok()).map(shardgate_router::transaction_control);
            if f.tag == b'X' || control == Some(shardgate_router::TxControl::Rollback) {
                // the block rolls back anyway: its shard part goes with the closed connections
                self.abandon_stream().await;
            } else if let Err(e) = self.settle_stream(!closes && control != Some(shardgate_router::TxControl::Commit)).await {
                // the statement failed on its shard: the block is aborted, this message skipped
                if f.tag == b'Q' {
                    self.barrier().await?;
                    self.fail_simple(e).await?;
                } else {
                    self.barrier().await?;
                    self.fail_extended(e).await?;
                }
                return Ok(Flow::Continue);
            }
        }
        match f.tag {
            b'Q' => {
                let sql = f.body().strip_suffix(&[0]).unwrap_or(f.body());
                self.shared.meters.queries_simple.increment(1);
                if self.admin && self.admin_command(sql).await? {
                    return Ok(Flow::Continue);
                }
                if !self.admin && self.shared.engine.router.names_control_table(sql) {
                    self.refuse_simple("42501", CONTROL_TABLES.into()).await?;
                    return Ok(Flow::Continue);
                }
                if let Some(flow) = self.routed_query(sql).await? {
                    return Ok(flow);
                }
                if let Some(flow) = self.cached_query(sql).await? {
                    return Ok(flow);
                }
                self.note_begin(sql);
                if let Err(m) = self.note_statement_text(sql) {
                    self.refuse_simple("0A000", m).await?;
                    return Ok(Flow::Continue);
                }
                if !self.server_for(false).await {
                    return Ok(Flow::Continue);
                }
                self.forget_statements_if_discarded(sql);
                self.sout.extend_from_slice(&f.raw);
                self.expect.push_back(Expect::Ready { sync: false });
                self.pending_ready += 1;
                self.arm_query_timeout();
            }
            b'P' => {
                let p = Parse::parse(f.body()).map_err(|e| End::Fatal("08P01", e.to_string()))?;
                if !self.admin && self.shared.engine.router.names_control_table(p.query) {
                    self.refuse_extended("42501", CONTROL_TABLES.into()).await?;
                    return Ok(Flow::Continue);
                }
                let cap = self.shared.config.server.max_client_statements;
                if !p.name.is_empty()
                    && !self.statements.contains_key(p.name)
                    && !self.routed_stmts.contains_key(p.name)
                    && self.statements.len() + self.routed_stmts.len() >= cap
                {
                    let m = format!("too many prepared statements on this connection (server.max_client_statements = {cap}); close some with Close or DEALLOCATE");
                    self.refuse_extended("53400", m).await?;
                    return Ok(Flow::Continue);
                }
                let bytes_cap = self.shared.config.server.max_client_statement_bytes;
                if !p.name.is_empty() && self.statement_bytes() + shardgate_router::analysis_weight(p.query.len()) > bytes_cap {
                    let m = format!(
                        "the prepared statements on this connection would take more than server.max_client_statement_bytes = {bytes_cap} bytes; close some with Close or DEALLOCATE"
                    );
                    self.refuse_extended("53400", m).await?;
                    return Ok(Flow::Continue);
                }
                if let Some(flow) = self.routed_parse(p.name, p.query, p.param_types).await? {
                    return Ok(flow);
                }
                if let Some(flow) = self.cached_parse(p.name, p.query, p.param_types).await? {
                    return Ok(flow);
                }
                if !p.name.is_empty() && self.routed_stmts.contains_key(p.name) {
                    self.fail_duplicate(p.name);
                    return Ok(Flow::Continue);
                }
                self.note_begin(p.query);
                if let Err(m) = self.note_statement_text(p.query) {
                    self.refuse_extended("0A000", m).await?;
                    return Ok(Flow::Continue);
                }
                if !self.server_for(true).await {
                    return Ok(Flow::Continue);
                }
                if p.name.is_empty() {
                    self.sout.extend_from_slice(&f.raw);
                    self.expect_reply(Expect::ParseComplete { forward: true, name: None });
                } else if self.statements.contains_key(p.name) {
                    // PostgreSQL: 42P05, the existing statement stays. The server
                    // never saw the client's name, so have it fail a Parse in the
                    // same position (a syntax error, no side effects) and answer
                    // with the right error instead.
                    if !self.server_skipping {
                        let mut err = BytesMut::new();
                        msg::error_response(
                            &mut err,
                            Severity::Error,
                            "42P05",
                            &format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(p.name)),
                        );
                        let mut parse = BytesMut::new();
                        crate::protocol::codec::put_message(&mut parse, b'P', |b| {
                            b.extend_from_slice(b"\0!\0\0\0");
                        });
                        self.sout.extend_from_slice(&parse);
                        self.expect.push_back(Expect::ReplaceError(err.freeze()));
                    }
                } else {
                    let server_name: Arc<str> = statement_name(p.query, p.param_types).into();
                    let mut parse = BytesMut::new();
                    p.write_renamed(&mut parse, server_name.as_bytes());
                    let parse = parse.freeze();
                    let server = self.server.as_mut().expect("server_for succeeded");
                    if self.server_skipping {
                        // the server skips this Parse: nothing is created, nothing is answered
                        self.sout.extend_from_slice(&parse);
                    } else {
                        if server.prepared.contains(&server_name) {
                            // re-prepare in place so the reply stays in order
                            crate::protocol::frontend::close_statement(&mut self.sout, server_name.as_bytes());
                            self.expect.push_back(Expect::CloseComplete { forward: false, evicted: None });
                        } else {
                            make_room(server, self.shared.config.pool.max_prepared_statements, &mut self.sout, &mut self.expect);
                        }
                        self.sout.extend_from_slice(&parse);
                        server.prepared.insert(&server_name);
                        self.expect.push_back(Expect::ParseComplete { forward: true, name: Some(server_name.clone()) });
                    }
                    self.statements.insert(p.name.to_vec(), Statement { server_name, parse });
                }
                self.sent_since_sync = true;
            }
            b'B' => {
                let b = Bind::parse(f.body()).map_err(|e| End::Fatal("08P01", e.to_string()))?;
                self.shared.meters.queries_extended.increment(1);
                if !self.routed_stmts.is_empty() || !self.routed_portals.is_empty() {
                    if let Some(flow) = self.routed_bind(f.body()).await? {
                        return Ok(flow);
                    }
                }
                if self.shards_in_tx() {
                    // a named statement prepared earlier may be COMMIT/ROLLBACK (pgjdbc keeps
                    // them prepared): the shards' part ends with it, as at a Parse
                    let text = self.statements.get(b.statement).map(|s| s.parse.clone());
                    if let Some(parse) = text {
                        if let Ok(p) = Parse::parse(parse.get(5..).unwrap_or_default()) {
                            if let Some(flow) = self.extended_tx_end(p.query).await? {
                                return Ok(flow);
                            }
                        }
                    }
                }
                if !self.server_for(true).await {
                    return Ok(Flow::Continue);
                }
                if !self.cache_write_stmts.is_empty() {
                    self.cached_bind_write(b.statement, b.rest);
                }
                match self.statements.get(b.statement).map(|s| s.server_name.clone()) {
                    Some(server_name) => {
                        self.ensure_prepared(b.statement);
                        b.write_renamed(&mut self.sout, server_name.as_bytes());
                    }
                    None => self.sout.extend_from_slice(&f.raw),
                }
                self.expect_reply(Expect::BindComplete);
                self.sent_since_sync = true;
            }
            b'D' | b'C' => {
                let t = Target::parse(f.body()).map_err(|e| End::Fatal("08P01", e.to_string()))?;
                if !self.routed_stmts.is_empty() || !self.routed_portals.is_empty() {
                    let handled = if f.tag == b'D' { self.routed_describe(&t).await? } else { self.routed_close(&t).await? };
                    if let Some(flow) = handled {
                        return Ok(flow);
                    }
                }
                if !self.server_for(true).await {
                    return Ok(Flow::Continue);
                }
                let known = t.kind == b'S' && !t.name.is_empty() && self.statements.contains_key(t.name);
                if f.tag == b'D' && known {
                    let server_name = self.statements.get(t.name).map(|s| s.server_name.clone()).expect("known");
                    self.ensure_prepared(t.name);
                    t.write_renamed(&mut self.sout, b'D', server_name.as_bytes());
                } else if f.tag == b'C' && known {
                    // the server keeps its copy for other clients; close a name that does not exist
                    self.statements.remove(t.name);
                    self.cache_write_stmts.remove(t.name);
                    t.write_renamed(&mut self.sout, b'C', CLOSED_STATEMENT);
                } else {
                    self.sout.extend_from_slice(&f.raw);
                }
                if f.tag == b'C' {
                    self.expect_reply(Expect::CloseComplete { forward: true, evicted: None });
                } else {
                    self.expect_reply(Expect::Describe);
                }
                self.sent_since_sync = true;
            }
            b'E' | b'H' => {
                if f.tag == b'E' && !self.routed_portals.is_empty() {
                    if let Some(flow) = self.routed_execute(f.body()).await? {
                        return Ok(flow);
                    }
                }
                if f.tag == b'H' && self.server.is_none() {
                    // Flush with nothing in flight: answers the proxy made are flushed anyway
                    return Ok(Flow::Continue);
                }
                if !self.server_for(true).await {
                    return Ok(Flow::Continue);
                }
                self.sout.extend_from_slice(&f.raw);
                self.sent_since_sync = true;
                if f.tag == b'E' {
                    self.expect_reply(Expect::Execute);
                    self.arm_query_timeout();
                }
            }
            b'S' => {
                if self.batch_tx {
                    self.end_batch_tx().await?;
                }
                if self.server.is_none() {
                    self.suspended.clear();
                }
                if self.discard_until_sync && self.server.is_none() {
                    self.discard_until_sync = false;
                    msg::ready_for_query(&mut self.cout, b'I');
                } else if self.server.is_none() {
                    msg::ready_for_query(&mut self.cout, b'I');
                } else if self.copy_in.is_some() {
                    // the server ignores Sync in COPY FROM STDIN mode; no reply comes
                    self.sout.extend_from_slice(&f.raw);
                } else {
                    if !self.suspended.is_empty() && !self.in_tx_block() {
                        // portals end with their (implicit) transaction, as in PostgreSQL
                        self.suspended.clear();
                    }
                    self.discard_until_sync = false;
                    self.sout.extend_from_slice(&f.raw);
                    self.expect.push_back(Expect::Ready { sync: true });
                    self.pending_ready += 1;
                    self.sent_since_sync = false;
                    self.server_skipping = false;
                }
            }
            b'F' => {
                if !self.server_for(false).await {
                    return Ok(Flow::Continue);
                }
                self.sout.extend_from_slice(&f.raw);
                self.expect.push_back(Expect::Ready { sync: false });
                self.pending_ready += 1;
            }
            b'd' | b'c' | b'f' => {
                // COPY data goes to the server running the COPY; outside COPY it is ignored, as PostgreSQL does
                if self.server.is_some() {
                    self.sout.extend_from_slice(&f.raw);
                    if f.tag != b'd' {
                        match self.copy_in.take() {
                            Some(extended) => self.sent_since_sync |= extended,
                            None => self.expect.push_back(Expect::CopyEnd),
                        }
                    }
                }
            }
            b'X' => return Ok(Flow::Close),
            b'p' => return Err(End::Fatal("08P01", "unexpected password message".into())),
            t => {
                let shown = if t.is_ascii_graphic() { format!("\"{}\"", t as char) } else { format!("0x{t:02x}") };
                return Err(End::Fatal("08P01", format!("invalid frontend message type {shown}")));
            }
        }
        Ok(Flow::Continue)
    }

    /// Expects a reply to a message just forwarded, unless the server skips it.
    fn expect_reply(&mut self, e: Expect) {
        if !self.server_skipping {
            self.expect.push_back(e);
        }
    }

    /// DISCARD ALL / DEALLOCATE ALL drop server-side statements: forget ours.
    fn forget_statements_if_discarded(&mut self, sql: &[u8]) {
        if !sql.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|b| b.eq_ignore_ascii_case(&b'd')) {
            return;
        }
        let head: String = String::from_utf8_lossy(&sql[..sql.len().min(64)]).to_ascii_lowercase();
        let words: Vec<&str> = head.split_whitespace().collect();
        let drops_all = matches!(words.as_slice(), ["discard", "all", ..] | ["deallocate", "all", ..] | ["deallocate", "prepare", "all", ..]);
        if drops_all {
            self.statements.clear();
            self.cache_write_stmts.clear();
            self.routed_stmts.clear();
            self.routed_portals.clear();
            if let Some(server) = self.server.as_mut() {
                server.prepared.clear();
            }
        }
    }

    /// Handles the whole server messages already read, in place (no copy of a
    /// message before it goes to the client buffer), until `stop` says so.
    fn drain_server(&mut self, stop: impl Fn(&Self) -> bool) -> Result<(), End> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let mut rbuf = std::mem::take(&mut server.rbuf);
        let mut used = 0;
        let mut res = Ok(());
        let mut bad = None;
        while !stop(self) {
            match frame_total(&rbuf[used..], MAX_SERVER_MESSAGE) {
                Ok(Some(total)) if rbuf.len() - used >= total => {
                    let f = FrameRef { tag: rbuf[used], raw: &rbuf[used..used + total] };
                    used += total;
                    res = self.on_server(f);
                    if res.is_err() {
                        break;
                    }
                }
                Ok(Some(total)) => {
                    // reserve at most what the (already bounded) message still needs
                    rbuf.advance(used);
                    used = 0;
                    rbuf.reserve(total - rbuf.len());
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        rbuf.advance(used);
        // on_server never swaps or drops the server connection
        if let Some(server) = self.server.as_mut() {
            server.rbuf = rbuf;
        }
        res?;
        if let Some(e) = bad {
            warn!(error = %e, "bad message from server");
            self.server_lost()?;
        }
        Ok(())
    }

    fn on_server(&mut self, f: FrameRef<'_>) -> Result<(), End> {
        tracing::trace!(tag = %(f.tag as char), len = f.raw.len(), expect = ?self.expect.front(), "server message");
        let swallowing = matches!(self.expect.front(), Some(Expect::SwallowUntilReady));
        if swallowing && !matches!(f.tag, b'E' | b'Z' | b'S') {
            // the replies to the proxy's own parameter pipeline
            return Ok(());
        }
        match f.tag {
            b'1' => match self.expect.pop_front() {
                Some(Expect::ParseComplete { forward, .. }) => {
                    if forward {
                        self.cout.extend_from_slice(f.raw);
                    }
                }
                other => return self.desync("ParseComplete", other),
            },
            b'3' => match self.expect.pop_front() {
                Some(Expect::CloseComplete { forward, .. }) => {
                    if forward {
                        self.cout.extend_from_slice(f.raw);
                    }
                }
                other => return self.desync("CloseComplete", other),
            },
            b'E' => {
                let fields = parse_error_fields(f.body());
                let replacement = match self.expect.front() {
                    Some(Expect::ReplaceError(b)) => Some(b.clone()),
                    _ => None,
                };
                // the server skips to the next Sync: drop what those messages would have answered
                while let Some(e) = self.expect.front() {
                    match e {
                        Expect::Ready { .. } | Expect::SwallowUntilReady => break,
                        Expect::ParseComplete { name: Some(n), .. } => {
                            if let Some(server) = self.server.as_mut() {
                                server.prepared.remove(n);
                            }
                            self.expect.pop_front();
                        }
                        Expect::CloseComplete { evicted: Some(n), .. } => {
                            // the Close was skipped: the statement is still there
                            if let Some(server) = self.server.as_mut() {
                                server.prepared.insert(n);
                            }
                            self.expect.pop_front();
                        }
                        _ => {
                            self.expect.pop_front();
                        }
                    }
                }
                // no ReadyForQuery owed yet: the client has not sent this batch's Sync,
                // and the server will skip what the client sends until it does
                if !self.expect.iter().any(|e| matches!(e, Expect::Ready { .. } | Expect::SwallowUntilReady)) {
                    self.server_skipping = true;
                }
                if fields.severity == "FATAL" || fields.severity == "PANIC" {
                    if let Some(server) = self.server.as_mut() {
                        server.broken = true;
                    }
                }
                if swallowing {
                    // what is applied there is unknown now: never hand this connection on
                    warn!(sqlstate = %fields.code, "applying client parameters on server failed");
                    if let Some(server) = self.server.as_mut() {
                        server.broken = true;
                    }
                } else if let Some(b) = replacement {
                    self.cout.extend_from_slice(&b);
                } else {
                    self.cout.extend_from_slice(f.raw);
                }
            }
            b'Z' => {
                let status = f.body().first().copied().unwrap_or(b'I');
                while matches!(self.expect.front(), Some(Expect::CopyEnd)) {
                    self.expect.pop_front();
                }
                self.copy_in = None;
                match self.expect.pop_front() {
                    Some(Expect::SwallowUntilReady) => self.set_tx_status(status),
                    Some(Expect::Ready { .. }) => {
                        self.pending_ready = self.pending_ready.saturating_sub(1);
                        self.set_tx_status(status);
                        self.cache_on_ready(status);
                        if status == b'I' && self.pending_2pc.is_some() {
                            self.resolve_2pc = self.pending_2pc.take();
                        }
                        if self.pending_ready == 0 {
                            self.query_deadline = None;
                        }
                        self.cout.extend_from_slice(f.raw);
                    }
                    other => return self.desync("ReadyForQuery", other),
                }
            }
            b'G' => {
                if matches!(self.expect.front(), Some(Expect::Execute)) {
                    self.expect.pop_front();
                }
                self.enter_copy_in();
                self.cout.extend_from_slice(f.raw);
            }
            b'2' => {
                if matches!(self.expect.front(), Some(Expect::BindComplete)) {
                    self.expect.pop_front();
                }
                self.cout.extend_from_slice(f.raw);
            }
            b'T' | b'n' if matches!(self.expect.front(), Some(Expect::Describe)) => {
                self.expect.pop_front();
                self.cout.extend_from_slice(f.raw);
            }
            b'C' | b'I' | b's' if matches!(self.expect.front(), Some(Expect::Execute)) => {
                self.expect.pop_front();
                if f.tag == b'C' {
                    // a BEGIN executed in an extended batch opens the block now, not at the
                    // batch's ReadyForQuery: routed statements later in the same batch (pgjdbc
                    // sends BEGIN with the first statement) must join it on the shards
                    match f.body().strip_suffix(&[0]).unwrap_or(f.body()) {
                        b"BEGIN" | b"START TRANSACTION" if self.tx_status == b'I' => self.tx_status = b'T',
                        _ => {}
                    }
                }
                self.cout.extend_from_slice(f.raw);
            }
            b'S' => {
                if let (Some((k, v)), Some(server)) = (parse_parameter_status(f.body()), self.server.as_mut()) {
                    server.reported.insert(k, v);
                }
                if !swallowing {
                    self.cout.extend_from_slice(f.raw);
                }
            }
            _ => {
                if !swallowing {
                    self.cout.extend_from_slice(f.raw);
                }
            }
        }
        Ok(())
    }

    /// CopyInResponse: the server now ignores Sync until CopyDone/CopyFail, so
    /// the Syncs the client pipelined after the COPY's Execute get no reply.
    /// The first pending ReadyForQuery belongs to the message that started
    /// the COPY: kept for a simple Query, dropped for an extended Sync.
    fn enter_copy_in(&mut self) {
        let Some(first) = self.expect.iter().position(|e| matches!(e, Expect::Ready { .. })) else {
            return;
        };
        let extended = matches!(self.expect[first], Expect::Ready { sync: true });
        let mut i = if extended { first } else { first + 1 };
        while i < self.expect.len() {
            match self.expect[i] {
                Expect::Ready { sync: true } => {
                    self.expect.remove(i);
                    self.pending_ready = self.pending_ready.saturating_sub(1);
                }
                Expect::CopyEnd => {
                    // the client already ended the COPY; an extended COPY still owes its Sync
                    self.expect.remove(i);
                    let sync_after = self.expect.iter().skip(i).any(|e| matches!(e, Expect::Ready { sync: true }));
                    if extended && !sync_after {
                        self.sent_since_sync = true;
                    }
                    return;
                }
                _ => i += 1,
            }
        }
        self.copy_in = Some(extended);
    }

    fn desync(&mut self, got: &str, expected: Option<Expect>) -> Result<(), End> {
        warn!(got, ?expected, "server reply out of step with requests");
        if let Some(server) = self.server.as_mut() {
            server.broken = true;
        }
        Err(End::Fatal("08P01", "protocol synchronization lost with server".into()))
    }

    /// The server connection died: discard it, tell the client, end the session.
    fn server_lost(&mut self) -> Result<(), End> {
        if let Some(mut server) = self.server.take() {
            server.broken = true;
            let _ = Object::take(server);
        }
        self.registration.slot.set(None);
        warn!("server connection lost");
        Err(End::Fatal(ProxyError::ServerLost.sqlstate(), ProxyError::ServerLost.client_message()))
    }

    async fn finish(&mut self, end: End) {
        self.abandon_stream().await;
        self.cache_on_end().await;
        match &end {
            End::Fatal(code, message) => {
                msg::error_response(&mut self.cout, Severity::Fatal, code, message);
            }
            End::ClientIo(e) => debug!(error = %e, "client i/o error"),
            End::Done => {}
        }
        if !matches!(end, End::ClientIo(_)) && !self.cout.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), write_all(&self.client, &self.cout)).await;
        }
        if let Some(mut server) = self.server.take() {
            if self.pinned.is_some() || !self.at_clean_point() || server.broken {
                // session state or an open transaction must not reach another client
                server.broken = true;
                let _ = Object::take(server);
            }
        }
        for slot in self.slots.iter_mut() {
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

/// The messages that bring a server's session parameters in line with what a
/// client asked for (set what it wants, reset what an earlier client changed
/// and this one did not ask for), recorded as applied. Values travel as bind
/// parameters of one fixed statement (`set_config`), never as SQL text; a
/// server that rejects them is not reused (see the swallow path). Empty when
/// nothing differs.
fn param_sets(desired: &[(String, String)], server: &mut crate::backend::ServerConn) -> Bytes {
    let mut changes: Vec<(&str, Option<&str>)> = Vec::new();
    for name in TRACKED_PARAMS {
        let want = desired.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if server.applied.get(*name) == want {
            continue;
        }
        changes.push((name, want.map(String::as_str)));
        match want {
            Some(v) => server.applied.insert(name.to_string(), v.clone()),
            None => server.applied.remove(*name),
        };
    }
    crate::protocol::frontend::set_config_pipeline(&changes)
}

#[derive(Clone, Copy)]
enum Timer {
    Query,
    ClientIdle,
    IdleInTransaction,
}

/// A server statement name that depends only on the statement's text and
/// parameter types, so every client preparing the same statement shares it.
fn statement_name(query: &[u8], param_types: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut h);
    param_types.hash(&mut h);
    let mut h2 = std::collections::hash_map::DefaultHasher::new();
    param_types.hash(&mut h2);
    query.hash(&mut h2);
    query.len().hash(&mut h2);
    format!("sg_{:016x}{:016x}", h.finish(), h2.finish())
}

/// Canonical spelling of a parameter value for comparison.
fn normalize_param(v: &str) -> String {
    match v.to_ascii_lowercase().as_str() {
        "utf8" | "utf-8" | "unicode" => "UTF8".into(),
        _ => v.to_string(),
    }
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

/// Closes the least recently used statement of `server` when it holds
/// `cap` already, ahead of a Parse in the same pipeline.
fn make_room(server: &mut crate::backend::ServerConn, cap: usize, sout: &mut BytesMut, expect: &mut VecDeque<Expect>) {
    if let Some(old) = server.prepared.evict_for_one_more(cap) {
        crate::protocol::frontend::close_statement(sout, old.as_bytes());
        expect.push_back(Expect::CloseComplete { forward: false, evicted: Some(old.into()) });
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
