//! One raw protocol connection to a PostgreSQL server: connect, authenticate
//! (SCRAM-SHA-256, md5, cleartext or trust), remember its parameters, its
//! cancel key and which shardgate prepared statements it holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use postgres_protocol::message::frontend;
use shardgate_config::{Dsn, SslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stream::Stream;

use crate::protocol::backend::{parse_error_fields, parse_parameter_status};
use crate::protocol::codec::{split_frame, Frame};
use crate::protocol::frontend::{Reader, CANCEL_REQUEST, SSL_REQUEST};

/// Largest message accepted from a server (PostgreSQL's own limit is 1 GiB).
pub const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// Failure talking to a backend server.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// TCP-level failure.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Connect or startup took too long.
    #[error("timed out connecting")]
    Timeout,
    /// The server refused us with an ErrorResponse.
    #[error("server error {code}: {message}")]
    Server {
        /// SQLSTATE.
        code: String,
        /// Server's message.
        message: String,
    },
    /// TLS could not be set up as the DSN's sslmode demands.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server said something we did not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl BackendError {
    /// True when the failure means the server cannot be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, BackendError::Io(_) | BackendError::Timeout)
            || matches!(self, BackendError::Server { code, .. } if code.starts_with("57P") || code.starts_with("08"))
    }
}

/// What it takes to cancel the query running on a server connection.
#[derive(Debug, Clone)]
pub struct CancelKey {
    /// Server address.
    pub addr: SocketAddr,
    /// Server process id.
    pub pid: i32,
    /// Server secret.
    pub secret: i32,
    /// The connection's TLS settings: a cancel goes encrypted too, so the key
    /// never crosses the network in clear text (PostgreSQL 17's libpq does the same).
    pub tls: Option<Arc<CancelTls>>,
}

/// How a cancel reaches a server that was connected with TLS.
#[derive(Debug)]
pub struct CancelTls {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
    /// `prefer`: a server that declines TLS gets the cancel in plain text.
    fallback_plain: bool,
}

impl CancelKey {
    /// Sends a CancelRequest to the server (new connection, as the protocol demands).
    pub async fn cancel(&self) -> std::io::Result<()> {
        tokio::time::timeout(Duration::from_secs(5), self.cancel_inner())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel request timed out"))?
    }

    async fn cancel_inner(&self) -> std::io::Result<()> {
        let mut msg = Vec::with_capacity(16);
        msg.extend_from_slice(&16i32.to_be_bytes());
        msg.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        msg.extend_from_slice(&self.pid.to_be_bytes());
        msg.extend_from_slice(&self.secret.to_be_bytes());
        let mut s = TcpStream::connect(self.addr).await?;
        if let Some(tls) = &self.tls {
            let mut req = Vec::with_capacity(8);
            req.extend_from_slice(&8i32.to_be_bytes());
            req.extend_from_slice(&SSL_REQUEST.to_be_bytes());
            s.write_all(&req).await?;
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer).await?;
            if answer[0] == b'S' {
                let mut t = tokio_rustls::TlsConnector::from(tls.config.clone()).connect(tls.name.clone(), s).await?;
                t.write_all(&msg).await?;
                t.flush().await?;
                // wait for the server to close, so the cancel has been delivered
                let mut sink = [0u8; 1];
                let _ = tokio::time::timeout(Duration::from_secs(1), t.read(&mut sink)).await;
                return Ok(());
            }
            if !tls.fallback_plain {
                return Err(std::io::Error::other("the server declined TLS for a cancel request"));
            }
        }
        s.write_all(&msg).await?;
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut sink)).await;
        Ok(())
    }
}

/// Parameters every server connection is started with, so that pooled
/// connections are interchangeable. Clients that want other values get them
/// with a SET at checkout (see `session`).
pub const STARTUP_PARAMS: &[(&str, &str)] = &[("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("application_name", "shardgate")];

/// Negotiates TLS as `dsn.sslmode` asks (SSLRequest, then a rustls
/// handshake); `disable` and a `prefer` the server declines stay plain.
/// With TLS, also the channel binding data of the server's certificate and
/// what a cancel to this server needs.
async fn start_tls(mut tcp: TcpStream, dsn: &Dsn) -> Result<(Stream, Option<(Option<Vec<u8>>, Arc<CancelTls>)>), BackendError> {
    if dsn.sslmode == SslMode::Disable {
        return Ok((Stream::Tcp(tcp), None));
    }
    let mut req = Vec::with_capacity(8);
    req.extend_from_slice(&8i32.to_be_bytes());
    req.extend_from_slice(&SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if dsn.sslmode == SslMode::Prefer => return Ok((Stream::Tcp(tcp), None)),
        b'N' => return Err(BackendError::Tls(format!("{}:{} does not offer TLS (sslmode {:?})", dsn.host, dsn.port, dsn.sslmode))),
        b'E' => return Err(BackendError::Tls(format!("{}:{} refused the SSL request", dsn.host, dsn.port))),
        other => return Err(BackendError::Protocol(format!("unexpected answer {:?} to SSLRequest", other as char))),
    }
    let config = tls_config(dsn).map_err(BackendError::Tls)?;
    let name = shardgate_config::tls::server_name(&dsn.host).map_err(BackendError::Tls)?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| BackendError::Tls(format!("TLS handshake with {}:{}: {e}", dsn.host, dsn.port)))?;
    let end_point = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::auth::tls_server_end_point(c.as_ref()));
    let cancel = Arc::new(CancelTls { config, name, fallback_plain: dsn.sslmode == SslMode::Prefer });
    Ok((crate::stream::relay(tls)?, Some((end_point, cancel))))
}

/// The rustls client settings of a DSN, built once per (mode, CA file).
fn tls_config(dsn: &Dsn) -> Result<Arc<rustls::ClientConfig>, String> {
    type Key = (SslMode, Option<String>);
    static CONFIGS: std::sync::Mutex<Vec<(Key, std::sync::Arc<rustls::ClientConfig>)>> = std::sync::Mutex::new(Vec::new());
    let key = (dsn.sslmode, dsn.sslrootcert.clone());
    let mut configs = CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = configs.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let c = shardgate_config::tls::client_config(dsn.sslmode, dsn.sslrootcert.as_deref())?;
    configs.push((key, c.clone()));
    Ok(c)
}

/// A connected, authenticated, idle server connection.
pub struct ServerConn {
    /// The socket (TCP, or the relay of a TLS session).
    pub stream: Stream,
    /// Bytes read from the server and not yet handled.
    pub rbuf: BytesMut,
    /// Last reported value of each ParameterStatus.
    pub reported: HashMap<String, String>,
    /// Parameters shardgate changed with SET at checkout, away from their
    /// values at connect (lowercase name → value); absent means as at connect.
    pub applied: HashMap<String, String>,
    /// Cancel key of this server process.
    pub cancel_key: CancelKey,
    /// shardgate-named prepared statements that exist on this connection
    /// (clients' statements under their server names, and routed `sgr_…` ones).
    pub prepared: Prepared,
    /// The names of the proxy's own statements for the texts it ran last.
    pub statement_names: super::names::StatementNames,
    /// Set when the connection must not be reused (I/O error, unknown state).
    pub broken: bool,
    /// The transaction status of the last ReadyForQuery read (`I`, `T`, `E`).
    pub ready_status: u8,
    /// ReadyForQuerys still owed for what [`ServerConn::send`] wrote (one per
    /// Sync or simple Query): answers not read yet.
    owed_ready: u32,
    /// Messages the proxy itself sent with [`ServerConn::send`] (its own queries
    /// replace the connection's unnamed statement): a session knows its
    /// client's unnamed statement is still there only while this is unchanged.
    pub own_sends: u64,
    /// When it was last given back to its pool (or made): what the pool's idle
    /// timeout counts from.
    pub idle_since: std::time::Instant,
    /// Statements deferred to ride with the next send (see [`ServerConn::defer`]).
    ahead: BytesMut,
    /// How many statements `ahead` holds.
    ahead_count: u32,
    /// A statement in `ahead` must run in the transaction of the pipeline it
    /// rides with (see [`ServerConn::defer_messages`]).
    ahead_must_ride: bool,
    /// What [`ServerConn::read_frame`] still owes the deferred statements it sent.
    owed: Owed,
    /// A message read and given back (see [`ServerConn::unread`]).
    unread: Option<Frame>,
}

/// The answers of deferred statements sent ahead of an extended-protocol
/// pipeline, read and dropped before the answer of the statement they rode
/// with: each ends in a CommandComplete; an error instead ends them all (the
/// server then skips the rest of the pipeline, the caller's statement
/// included, and the error is the caller's answer).
#[derive(Default)]
struct Owed {
    completes: u32,
}

/// The most a connection keeps allocated for deferred statements between uses.
const KEPT_AHEAD_BYTES: usize = 16 * 1024;

impl ServerConn {
    /// Connects and authenticates, bounded by `timeout`.
    pub async fn connect(dsn: &Dsn, timeout: Duration) -> Result<ServerConn, BackendError> {
        tokio::time::timeout(timeout, Self::connect_inner(dsn)).await.map_err(|_| BackendError::Timeout)?
    }

    async fn connect_inner(dsn: &Dsn) -> Result<ServerConn, BackendError> {
        let tcp = TcpStream::connect((dsn.host.as_str(), dsn.port)).await?;
        tcp.set_nodelay(true)?;
        // a peer gone without a FIN or RST (a firewall's dropped state, a dead host) is
        // found by the kernel within about 90 s idle, not when a statement hangs on it
        socket2::SockRef::from(&tcp).set_tcp_keepalive(&SERVER_KEEPALIVE)?;
        let addr = tcp.peer_addr()?;
        let (stream, session) = start_tls(tcp, dsn).await?;
        let (end_point, tls) = session.map_or((None, None), |(e, c)| (e, Some(c)));
        let mut conn = ServerConn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            reported: HashMap::new(),
            applied: HashMap::new(),
            cancel_key: CancelKey { addr, pid: 0, secret: 0, tls },
            prepared: Prepared::default(),
            statement_names: Default::default(),
            broken: false,
            ready_status: b'I',
            owed_ready: 0,
            own_sends: 0,
            idle_since: std::time::Instant::now(),
            ahead: BytesMut::new(),
            ahead_count: 0,
            ahead_must_ride: false,
            owed: Owed::default(),
            unread: None,
        };
        let mut out = BytesMut::new();
        let mut params: Vec<(&str, &str)> = vec![("user", &dsn.user), ("database", &dsn.dbname)];
        params.extend_from_slice(STARTUP_PARAMS);
        frontend::startup_message(params, &mut out)?;
        conn.stream.write_all(&out).await?;
        conn.authenticate(dsn, end_point).await?;
        // until ReadyForQuery: ParameterStatus, BackendKeyData, notices
        loop {
            let f = conn.read_frame().await?;
            match f.tag {
                b'S' => {
                    if let Some((k, v)) = parse_parameter_status(f.body()) {
                        conn.reported.insert(k, v);
                    }
                }
                b'K' => {
                    let mut r = Reader::new(f.body());
                    conn.cancel_key.pid = r.i32().map_err(|e| BackendError::Protocol(e.to_string()))?;
                    conn.cancel_key.secret = r.i32().map_err(|e| BackendError::Protocol(e.to_string()))?;
                }
                b'Z' => return Ok(conn),
                b'E' => return Err(server_error(&f)),
                b'N' => {}
                t => return Err(BackendError::Protocol(format!("unexpected message {:?} during startup", t as char))),
            }
        }
    }

    async fn authenticate(&mut self, dsn: &Dsn, end_point: Option<Vec<u8>>) -> Result<(), BackendError> {
        let password = dsn.password.as_deref().unwrap_or("");
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.read_frame().await?;
            if f.tag == b'E' {
                return Err(server_error(&f));
            }
            if f.tag != b'R' {
                return Err(BackendError::Protocol(format!("unexpected message {:?} during authentication", f.tag as char)));
            }
            let mut r = Reader::new(f.body());
            let code = r.i32().map_err(|e| BackendError::Protocol(e.to_string()))?;
            let mut out = BytesMut::new();
            match code {
                0 => return Ok(()),
                3 => frontend::password_message(password.as_bytes(), &mut out)?,
                5 => {
                    let salt: [u8; 4] = r.bytes(4).ok().and_then(|s| s.try_into().ok()).ok_or_else(|| BackendError::Protocol("short md5 salt".into()))?;
                    let hash = postgres_protocol::authentication::md5_hash(dsn.user.as_bytes(), password.as_bytes(), salt);
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                10 => {
                    let mechs: Vec<&[u8]> = r.rest().split(|&b| b == 0).collect();
                    let plus = mechs.contains(&SCRAM_SHA_256_PLUS.as_bytes());
                    // over TLS, bind the exchange to the server's certificate when the server
                    // offers it (a man in the middle relaying SCRAM then fails); else say we
                    // could have ("y"), so a server stripped of PLUS notices
                    let (mech, binding) = match (&end_point, plus) {
                        (Some(h), true) => (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(h.clone())),
                        (Some(_), false) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                        (None, _) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                    };
                    if !mechs.contains(&mech.as_bytes()) {
                        return Err(BackendError::Protocol(format!("server offers no {mech}")));
                    }
                    let s = ScramSha256::new(password.as_bytes(), binding);
                    frontend::sasl_initial_response(mech, s.message(), &mut out)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| BackendError::Protocol("SASL continue without start".into()))?;
                    s.update(r.rest())?;
                    frontend::sasl_response(s.message(), &mut out)?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| BackendError::Protocol("SASL final without start".into()))?;
                    s.finish(r.rest())?;
                    continue;
                }
                c => return Err(BackendError::Protocol(format!("unsupported authentication request {c}"))),
            }
            self.stream.write_all(&out).await?;
        }
    }

    /// Marks the connection unusable and closes its socket now: the server
    /// stops the statement it is running (at its next write) and rolls back.
    pub fn discard(&mut self) {
        self.broken = true;
        self.stream.close_now();
    }

    /// Reads one whole message from the server, after the answers of the
    /// deferred statements sent ahead of the caller's (see [`ServerConn::defer`]).
    pub async fn read_frame(&mut self) -> Result<Frame, BackendError> {
        if let Some(f) = self.unread.take() {
            return Ok(f);
        }
        loop {
            let f = self.read_raw().await?;
            if self.owed.completes > 0 {
                match f.tag {
                    b'C' => self.owed.completes -= 1,
                    b'E' => {
                        // what the server holds now is not what the caller meant (a skipped
                        // Close, a block that never began): this connection ends with this answer
                        self.owed.completes = 0;
                        self.broken = true;
                        return Ok(f);
                    }
                    b'N' | b'S' | b'A' => return Ok(f),
                    // ParseComplete, BindComplete of the deferred statement
                    _ => {}
                }
                continue;
            }
            return Ok(f);
        }
    }

    async fn read_raw(&mut self) -> Result<Frame, BackendError> {
        loop {
            if let Some(f) = split_frame(&mut self.rbuf, MAX_SERVER_MESSAGE).map_err(|e| BackendError::Protocol(e.to_string()))? {
                if f.tag == b'Z' {
                    self.note_ready(f.body().first().copied().unwrap_or(b'I'));
                }
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(BackendError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Defers `sql` (a statement without parameters or rows, such as a
    /// transaction block's BEGIN) to the next [`ServerConn::send`], saving it
    /// a round trip of its own. Ahead of one extended-protocol pipeline (one
    /// Sync, at its end) it runs in that pipeline: if it fails, the server
    /// skips the rest, so the statement after it never runs outside the block
    /// it was meant for, and its error is the caller's answer. Ahead of
    /// anything else (a simple Query, several pipelines, whose later ones would
    /// run after a failed BEGIN) it is sent first in a round trip of its own.
    pub fn defer(&mut self, sql: &str) {
        use bytes::BufMut;
        use crate::protocol::codec::{put_cstr, put_message};
        if self.ahead_count == 0 {
            // nothing deferred: whatever a send cut short left here is not to be sent
            self.ahead.clear();
            self.ahead_must_ride = false;
        }
        put_message(&mut self.ahead, b'P', |o| {
            put_cstr(o, b"");
            put_cstr(o, sql.as_bytes());
            o.put_i16(0);
        });
        put_message(&mut self.ahead, b'B', |o| {
            put_cstr(o, b"");
            put_cstr(o, b"");
            o.put_i16(0);
            o.put_i16(0);
            o.put_i16(0);
        });
        put_message(&mut self.ahead, b'E', |o| {
            put_cstr(o, b"");
            o.put_i32(0);
        });
        self.ahead_count += 1;
    }

    /// Defers one statement already written as extended-protocol messages
    /// (Parse if needed, Bind, Execute; no Sync), such as a named statement
    /// with bound values ([`crate::backend::query::put_named_step`]): as
    /// [`ServerConn::defer`], its answer is read and dropped, an error ends
    /// the deferred statements and the connection. It must run in the
    /// implicit transaction of the one pipeline it rides with: a send of
    /// anything else fails instead of running it on its own.
    pub fn defer_messages(&mut self, msgs: &[u8]) {
        if self.ahead_count == 0 {
            self.ahead.clear();
        }
        self.ahead.extend_from_slice(msgs);
        self.ahead_count += 1;
        self.ahead_must_ride = true;
    }

    /// Gives a message back: the next [`ServerConn::read_frame`] returns it.
    pub fn unread(&mut self, f: Frame) {
        debug_assert!(self.unread.is_none(), "one message given back at a time");
        self.unread = Some(f);
    }

    /// Whether statements are deferred and not yet sent.
    pub fn has_deferred(&self) -> bool {
        self.ahead_count > 0
    }

    /// Forgets deferred statements that were never sent (nothing of them
    /// reached the server).
    pub fn drop_deferred(&mut self) {
        if self.ahead_must_ride {
            // it may have recorded a statement as prepared that the server never saw
            self.broken = true;
        }
        self.ahead.clear();
        self.ahead_count = 0;
        self.ahead_must_ride = false;
    }

    /// Writes `msgs` (whole messages ending in a Sync or a simple Query), the
    /// deferred statements first (see [`ServerConn::defer`]).
    pub async fn send(&mut self, msgs: &[u8]) -> std::io::Result<()> {
        self.owed_ready += readies_owed(msgs);
        self.own_sends += 1;
        if self.ahead_count == 0 {
            return self.stream.write_all(msgs).await;
        }
        let n = std::mem::take(&mut self.ahead_count);
        let must_ride = std::mem::take(&mut self.ahead_must_ride);
        if must_ride && !one_pipeline(msgs) {
            // (a proxy bug, never the client's doing) the statement would commit on its own
            self.ahead.clear();
            self.broken = true;
            return Err(std::io::Error::other("a deferred statement that must ride with one pipeline was sent ahead of something else"));
        }
        if one_pipeline(msgs) {
            self.owed.completes += n;
            // (the buffer is kept for the next deferred statement: taken, it was
            // allocated and grown again for every statement)
            self.ahead.extend_from_slice(msgs);
            let r = self.stream.write_all(&self.ahead).await;
            self.ahead.clear();
            if self.ahead.capacity() > KEPT_AHEAD_BYTES {
                // a large statement rode here once: not kept for the connection's life
                self.ahead = BytesMut::new();
            }
            return r;
        }
        let mut all = std::mem::take(&mut self.ahead);
        crate::protocol::codec::put_message(&mut all, b'S', |_| {});
        self.owed_ready += 1;
        self.stream.write_all(&all).await?;
        let mut failed = None;
        loop {
            let f = self.read_raw().await.map_err(std::io::Error::other)?;
            match f.tag {
                b'E' => failed = Some(parse_error_fields(f.body())),
                b'Z' => break,
                _ => {}
            }
        }
        if let Some(e) = failed {
            self.broken = true;
            return Err(std::io::Error::other(format!("a deferred statement failed: {} {}", e.code, e.message)));
        }
        self.stream.write_all(msgs).await
    }

    /// Whether the connection is idle and in step: nothing deferred unsent,
    /// no deferred answer unread (the pool takes back only such connections).
    pub fn in_step(&self) -> bool {
        self.ahead_count == 0 && self.owed.completes == 0 && self.unread.is_none()
    }

    /// Records a ReadyForQuery read (by this connection's reader, or by a
    /// session's pass-through, which reads the socket itself).
    pub fn note_ready(&mut self, status: u8) {
        self.ready_status = status;
        self.owed_ready = self.owed_ready.saturating_sub(1);
    }

    /// Whether another user may have this connection: not broken, in step,
    /// every answer read, and outside any transaction block. Anything else
    /// (a block left open or failed, an answer nobody read) would reach the
    /// next client as its own.
    pub fn reusable(&self) -> bool {
        !self.broken && self.in_step() && self.owed_ready == 0 && self.ready_status == b'I'
    }

    /// Runs a simple query to completion, discarding its rows (control use only).
    pub async fn simple_query(&mut self, sql: &str) -> Result<(), BackendError> {
        self.send(&crate::protocol::frontend::query(sql)).await?;
        let mut err = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'E' => err = Some(server_error(&f)),
                b'S' => {
                    if let Some((k, v)) = parse_parameter_status(f.body()) {
                        self.reported.insert(k, v);
                    }
                }
                b'Z' => return err.map_or(Ok(()), Err),
                _ => {}
            }
        }
    }

    /// Non-blocking liveness check for an idle connection: an idle server
    /// sends nothing, so EOF or unexpected bytes (say, a FATAL on admin
    /// shutdown) both mean the connection is unusable.
    ///
    /// `Probe::Readiness` trusts the runtime's readiness state (no syscall when
    /// nothing was signalled); `Probe::Kernel` asks the kernel with a
    /// non-blocking `MSG_PEEK`, which also sees a FIN or RST the runtime has not
    /// polled yet.
    pub fn is_alive(&self, probe: Probe) -> bool {
        match probe {
            Probe::Readiness => {
                let mut byte = [0u8; 1];
                matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            Probe::Kernel => {
                let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                matches!(self.stream.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Whether a deferred statement may ride ahead of `msgs`: one
/// extended-protocol pipeline (one Sync), optionally followed by one simple
/// `PREPARE TRANSACTION` of that block. Were the deferred BEGIN to fail, the
/// server would skip the pipeline and then meet that PREPARE outside any
/// block, where it only warns and answers ROLLBACK (nothing is prepared).
fn one_pipeline(msgs: &[u8]) -> bool {
    let mut synced = false;
    for (tag, at, end) in messages(msgs) {
        match tag {
            b'S' if !synced => synced = true,
            b'Q' if synced && end == msgs.len() => return msgs[at + 5..].starts_with(b"PREPARE TRANSACTION '"),
            b'S' | b'Q' => return false,
            _ if synced => return false,
            _ => {}
        }
    }
    synced
}

/// The whole messages in `msgs`, each as (tag, start, end).
fn messages(msgs: &[u8]) -> impl Iterator<Item = (u8, usize, usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 5 > msgs.len() {
            return None;
        }
        let len = i32::from_be_bytes([msgs[at + 1], msgs[at + 2], msgs[at + 3], msgs[at + 4]]) as usize;
        let (start, end) = (at, (at + 1 + len.max(4)).min(msgs.len()));
        at = end;
        Some((msgs[start], start, end))
    })
}

/// TCP keepalive of every server connection: first probe after 60 s idle, then
/// every 10 s; 3 unanswered close it.
const SERVER_KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10)).with_retries(3);

/// How many ReadyForQuerys the server owes for `msgs` (whole messages): one
/// per Sync and per simple Query.
fn readies_owed(msgs: &[u8]) -> u32 {
    messages(msgs).filter(|(tag, ..)| matches!(tag, b'S' | b'Q')).count() as u32
}

/// How [`ServerConn::is_alive`] checks a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The runtime's readiness state (free; for connections used moments ago).
    Readiness,
    /// A non-blocking `MSG_PEEK` syscall (for connections idle a while).
    Kernel,
}

fn server_error(f: &Frame) -> BackendError {
    let e = parse_error_fields(f.body());
    BackendError::Server { code: e.code, message: e.message }
}

/// The statements shardgate keeps prepared on one server connection, by
/// recency: at `pool.max_prepared_statements` the least recently used gives
/// way to a new one (its name is returned for the caller to Close on the
/// server in the same pipeline), so statements seen once cannot use up the
/// room of the ones a workload repeats, and a long-lived connection does not
/// grow the server's memory without bound.
#[derive(Debug, Default)]
pub struct Prepared {
    last_use: HashMap<String, u64, foldhash::quality::RandomState>,
    tick: u64,
}

impl Prepared {
    /// True when `name` exists on the server.
    pub fn contains(&self, name: &str) -> bool {
        self.last_use.contains_key(name)
    }

    /// Records that `name` now exists on the server, or a use of it.
    pub fn insert(&mut self, name: &str) {
        self.tick += 1;
        match self.last_use.get_mut(name) {
            Some(t) => *t = self.tick,
            None => {
                self.last_use.insert(name.to_string(), self.tick);
            }
        }
    }

    /// Records a use of `name` if it exists.
    pub fn touch(&mut self, name: &str) {
        self.tick += 1;
        if let Some(t) = self.last_use.get_mut(name) {
            *t = self.tick;
        }
    }

    /// Makes room for one more below `cap`: forgets the least recently used
    /// name and returns it, if one must go.
    pub fn evict_for_one_more(&mut self, cap: usize) -> Option<String> {
        if self.last_use.len() < cap {
            return None;
        }
        let old = self.last_use.iter().min_by_key(|(_, t)| **t).map(|(n, _)| n.clone())?;
        self.last_use.remove(&old);
        Some(old)
    }

    /// Forgets `name` (closed, or its Parse failed).
    pub fn remove(&mut self, name: &str) {
        self.last_use.remove(name);
    }

    /// Forgets every name (`DISCARD ALL` / `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.last_use.clear();
    }
}

#[cfg(test)]
mod prepared_tests {
    use super::*;

    #[test]
    fn a_deferred_statement_rides_only_ahead_of_one_pipeline() {
        use crate::protocol::codec::put_message;
        let step = |b: &mut BytesMut| {
            put_message(b, b'P', |o| o.extend_from_slice(b"\0SELECT 1\0\0\0"));
            put_message(b, b'E', |o| o.extend_from_slice(b"\0\0\0\0\0"));
        };
        let sync = |b: &mut BytesMut| put_message(b, b'S', |_| {});
        let mut one = BytesMut::new();
        step(&mut one);
        sync(&mut one);
        assert!(one_pipeline(&one));
        let mut prepared = one.clone();
        prepared.extend_from_slice(&crate::protocol::frontend::query("PREPARE TRANSACTION 'sg_1_2_3_s4'"));
        assert!(one_pipeline(&prepared), "a block's PREPARE behind its statement");
        let mut other = one.clone();
        other.extend_from_slice(&crate::protocol::frontend::query("DELETE FROM t"));
        assert!(!one_pipeline(&other), "any other Query would run after a failed BEGIN");
        let mut two = one.clone();
        step(&mut two);
        sync(&mut two);
        assert!(!one_pipeline(&two), "the second pipeline would run after a failed BEGIN");
        assert!(!one_pipeline(&crate::protocol::frontend::query("COMMIT")));
        let mut unsynced = BytesMut::new();
        step(&mut unsynced);
        assert!(!one_pipeline(&unsynced));
    }

    #[test]
    fn the_least_recently_used_name_gives_way() {
        let mut p = Prepared::default();
        for n in ["a", "b", "c"] {
            assert_eq!(p.evict_for_one_more(3), None);
            p.insert(n);
        }
        // "a" is used again: "b" is now the oldest
        p.touch("a");
        assert_eq!(p.evict_for_one_more(3).as_deref(), Some("b"));
        assert!(!p.contains("b"));
        p.insert("d");
        assert_eq!(p.evict_for_one_more(3).as_deref(), Some("c"));
        p.insert("e");
        assert_eq!(p.evict_for_one_more(3).as_deref(), Some("a"));
        // "d" and "e" are left: below the cap once one is removed
        p.remove("d");
        assert_eq!(p.evict_for_one_more(2), None);
        assert!(p.contains("e") && !p.contains("d"));
        // touching a name that is not there creates nothing
        p.touch("zz");
        assert!(!p.contains("zz"));
        p.clear();
        assert!(!p.contains("e"));
        assert_eq!(p.evict_for_one_more(1), None);
    }

    /// A server that answers an SSLRequest with `answer` and records what it received.
    async fn fake_server(answer: u8) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut got = vec![0u8; 8];
            s.read_exact(&mut got).await.expect("first packet");
            s.write_all(&[answer]).await.expect("answer");
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
            got.extend_from_slice(&rest);
            got
        });
        (addr, h)
    }

    fn key(addr: SocketAddr, fallback_plain: bool) -> CancelKey {
        let config = shardgate_config::tls::client_config(SslMode::Require, None).expect("config");
        let name = shardgate_config::tls::server_name("127.0.0.1").expect("name");
        CancelKey { addr, pid: 42, secret: 7, tls: Some(Arc::new(CancelTls { config, name, fallback_plain })) }
    }

    #[tokio::test]
    async fn a_cancel_to_a_tls_server_never_sends_the_key_in_clear_text() {
        let (addr, server) = fake_server(b'N').await;
        assert!(key(addr, false).cancel().await.is_err(), "a server that declines TLS gets no cancel");
        let got = server.await.expect("server");
        assert_eq!(got, [0, 0, 0, 8, 4, 210, 22, 47], "only the SSLRequest crossed the network");
        // sslmode=prefer: the connection itself fell back to plain text, so may the cancel
        let (addr, server) = fake_server(b'N').await;
        key(addr, true).cancel().await.expect("plain cancel");
        let got = server.await.expect("server");
        assert_eq!(&got[8..12], &16i32.to_be_bytes());
        assert_eq!(&got[12..16], &CANCEL_REQUEST.to_be_bytes());
    }
}
