//! Before the loop: TLS or GSS encryption requests, the startup packet, and
//! authentication of the client (SCRAM, MD5, trust) against `[[users]]`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use shardgate_config::AuthMethod;

use crate::stream::Stream;
use tracing::{debug, info, warn};

use crate::auth::{verify_md5, ScramSecret, ScramServer};
use crate::cancel::Registration;
use crate::metrics as m;
use crate::protocol::backend::{self as msg};
use crate::protocol::codec::{put_message, split_frame, split_startup, Frame};
use crate::protocol::frontend::{parse_startup, SaslInitial, StartupPacket, GSSENC_REQUEST, SSL_REQUEST};
use crate::state::Shared;
use super::*;
use crate::protocol::sqlstate;

/// Largest startup packet accepted (PostgreSQL's MAX_STARTUP_PACKET_LENGTH).
pub(super) const MAX_STARTUP: usize = 10_000;

/// What the client asked for before its startup packet.
pub(super) enum Encryption {
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
pub(super) async fn encryption_request(shared: &Shared, stream: &Stream, cin: &mut BytesMut) -> std::io::Result<Encryption> {
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
            write_fatal(stream, sqlstate::PROTOCOL_VIOLATION, "received unencrypted data after SSL request").await?;
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
pub(super) struct Login {
    pub(super) user: String,
    pub(super) admin: bool,
    pub(super) desired: Vec<(String, String)>,
    pub(super) registration: Registration,
    /// The client's place under `server.max_client_connections` (held by `run` until the session ends).
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub(super) async fn write_fatal(stream: &Stream, code: &'static str, message: &str) -> std::io::Result<()> {
    write_all(stream, &crate::error::ClientError::fatal(code, message).frame()).await
}

/// Reads one startup packet; `None` on a malformed one (after telling the client).
pub(super) async fn read_startup_packet(stream: &Stream, cin: &mut BytesMut) -> std::io::Result<Option<Bytes>> {
    loop {
        match split_startup(cin, MAX_STARTUP) {
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => read_more(stream, cin).await?,
            Err(_) => {
                write_fatal(stream, sqlstate::PROTOCOL_VIOLATION, "invalid length of startup packet").await?;
                return Ok(None);
            }
        }
    }
}

/// Reads one tagged message during authentication.
pub(super) async fn read_auth_message(stream: &Stream, cin: &mut BytesMut) -> std::io::Result<Option<Frame>> {
    loop {
        match split_frame(cin, MAX_STARTUP) {
            Ok(Some(f)) if f.tag == b'p' => return Ok(Some(f)),
            Ok(Some(_)) => {
                write_fatal(stream, sqlstate::PROTOCOL_VIOLATION, "expected password response").await?;
                return Ok(None);
            }
            Ok(None) => read_more(stream, cin).await?,
            Err(_) => {
                write_fatal(stream, sqlstate::PROTOCOL_VIOLATION, "invalid message length during authentication").await?;
                return Ok(None);
            }
        }
    }
}

pub(super) async fn startup(shared: &Arc<Shared>, stream: &Stream, cin: &mut BytesMut, limit: &Arc<tokio::sync::Semaphore>) -> std::io::Result<Option<Login>> {
    let Some(pkt) = read_startup_packet(stream, cin).await? else {
        return Ok(None);
    };
    let (version, params) = match parse_startup(&pkt) {
        Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
            // encryption_request answered the ones that open a connection; PostgreSQL
            // refuses one after that (inside TLS)
            write_fatal(stream, sqlstate::PROTOCOL_VIOLATION, "unsupported frontend protocol: encryption is negotiated only before the startup packet").await?;
            return Ok(None);
        }
        Ok(StartupPacket::Cancel { pid, secret }) => {
            let Some(slot) = shared.cancels.find(pid, secret) else { return Ok(None) };
            let Some(keys) = slot.request() else { return Ok(None) };
            if !keys.is_empty() {
                debug!(pid, servers = keys.len(), "forwarding cancel request");
            }
            // a task of its own: this connection's login deadline (or its eviction by newer
            // logins) must not cut the forwards short, or the request would stay counted
            // as not forwarded and a statement it stopped would wait for it for ever
            tokio::spawn(async move {
                for key in keys {
                    if let Err(e) = key.cancel().await {
                        warn!(error = %e, "cancel request to server failed");
                    }
                }
                // then a routed statement still waiting for its connections stops
                slot.forwarded();
            });
            return Ok(None);
        }
        Ok(StartupPacket::Startup { version, params }) => (version, params),
        Err(e) => {
            write_fatal(stream, sqlstate::PROTOCOL_VIOLATION, &format!("invalid startup packet: {e}")).await?;
            return Ok(None);
        }
    };
    if shared.config.server.require_tls && !stream.is_tls() {
        metrics::counter!(m::CLIENT_REFUSED_TOTAL).increment(1);
        write_fatal(stream, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, "this server accepts only TLS connections (server.require_tls): connect with sslmode=require or stronger").await?;
        return Ok(None);
    }
    if version >> 16 != 3 {
        write_fatal(stream, sqlstate::FEATURE_NOT_SUPPORTED, &format!("unsupported frontend protocol {}.{}: server supports 3.0 to 3.0", version >> 16, version & 0xffff)).await?;
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
        write_fatal(stream, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, "no PostgreSQL user name specified in startup packet").await?;
        return Ok(None);
    };
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        metrics::counter!(m::CLIENT_REFUSED_TOTAL).increment(1);
        write_fatal(stream, sqlstate::TOO_MANY_CONNECTIONS, "sorry, too many clients already").await?;
        return Ok(None);
    };
    if !authenticate(shared, stream, cin, &user).await? {
        metrics::counter!(m::AUTH_FAILURES_TOTAL).increment(1);
        info!(user = %user, "authentication failed");
        write_fatal(stream, sqlstate::INVALID_PASSWORD, &format!("password authentication failed for user \"{user}\"")).await?;
        return Ok(None);
    }
    if *shared.shutdown.borrow() {
        write_fatal(stream, sqlstate::CANNOT_CONNECT_NOW, "the database system is shutting down").await?;
        return Ok(None);
    }
    if desired.iter().any(|(k, v)| k == "standard_conforming_strings" && !matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "1" | "yes")) {
        write_fatal(stream, sqlstate::FEATURE_NOT_SUPPORTED, "standard_conforming_strings must stay on through shardgate: it reads and rewrites SQL text with standard string literals").await?;
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
pub(super) fn parse_options(options: &str) -> Vec<(String, String)> {
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
pub(super) async fn authenticate(shared: &Shared, stream: &Stream, cin: &mut BytesMut, user: &str) -> std::io::Result<bool> {
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
                    write_fatal(stream, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, "client selected an invalid SASL authentication mechanism").await?;
                    return Ok(false);
                }
            };
            let (server, server_first) = match ScramServer::start(scram, init.data, plus, binding.is_some()) {
                Ok(x) => x,
                Err(crate::auth::AuthError::ChannelBinding) => {
                    write_fatal(stream, sqlstate::PROTOCOL_VIOLATION, "SCRAM channel binding negotiation error").await?;
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
