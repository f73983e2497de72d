//! Client-facing errors. Every error shardgate itself sends a client is a
//! [`ClientError`]: its SQLSTATE is one of [`crate::protocol::sqlstate`]'s
//! names, its message passes [`scrub`] (no DSN, password or secret reaches a
//! client), and it is encoded here. The failures of the layers below map to
//! it here too: [`ProxyError`] (session pool and protocol), the executor's
//! [`ExecError`] ([`exec_frame`]). A shard's own ErrorResponse is the one
//! thing passed through as it came (it is PostgreSQL's answer to the
//! client's statement).

use bytes::{Bytes, BytesMut};

use crate::backend::BackendError;
use crate::protocol::backend::{error_response, Severity};
use crate::protocol::sqlstate;
use crate::routed::exec::ExecError;

/// An error shardgate reports to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    /// ERROR (the statement failed) or FATAL (the connection ends).
    pub severity: Severity,
    /// One of [`crate::protocol::sqlstate`]'s codes.
    pub code: &'static str,
    /// What happened and what to change; scrubbed.
    pub message: String,
}

impl ClientError {
    /// The statement failed; the session goes on.
    pub fn error(code: &'static str, message: impl Into<String>) -> ClientError {
        ClientError { severity: Severity::Error, code, message: scrub(&message.into()) }
    }

    /// The connection ends after this.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> ClientError {
        ClientError { severity: Severity::Fatal, code, message: scrub(&message.into()) }
    }

    /// Appends the ErrorResponse to `out`.
    pub fn put(&self, out: &mut BytesMut) {
        error_response(out, self.severity, self.code, &self.message);
    }

    /// The ErrorResponse as bytes.
    pub fn frame(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.put(&mut b);
        b.freeze()
    }
}

/// Removes what must never reach a client from a message: the password of a
/// connection URL (`postgres://user:secret@host`, `redis://:secret@host`) and
/// the value of a `password=` / `sslpassword=` pair of a keyword DSN. Nothing
/// else changes, so a message that quotes the client's own input (a value, a
/// statement name) reads as PostgreSQL would write it.
pub fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    loop {
        let url = url_secret(rest);
        let pair = ["password=", "sslpassword="].iter().filter_map(|k| find_key(rest, k).map(|p| (p, p + k.len()))).min();
        let next = match (url, pair) {
            (Some(u), Some(p)) => Some(if u.0 <= p.1 { u } else { (p.1, value_end(rest, p.1)) }),
            (Some(u), None) => Some(u),
            (None, Some(p)) => Some((p.1, value_end(rest, p.1))),
            (None, None) => None,
        };
        let Some((from, to)) = next else { break };
        out.push_str(&rest[..from]);
        out.push_str("[redacted]");
        rest = &rest[to..];
    }
    out.push_str(rest);
    out
}

/// The byte range of the first password in a URL's userinfo in `s`
/// (`scheme://user:password@host`).
fn url_secret(s: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(at) = s[from..].find("://").map(|p| p + from) {
        let after = &s[at + 3..];
        // the authority: up to '/', whitespace or a quote
        let auth_end = after.find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'').unwrap_or(after.len());
        if let Some(at_sign) = after[..auth_end].rfind('@') {
            if let Some(colon) = after[..at_sign].find(':') {
                return Some((at + 3 + colon + 1, at + 3 + at_sign));
            }
        }
        from = at + 3;
    }
    None
}

/// Where `key` starts in `s` as a word of its own (case ignored).
fn find_key(s: &str, key: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    let mut from = 0;
    while let Some(p) = lower[from..].find(key).map(|p| p + from) {
        if p == 0 || !lower.as_bytes()[p - 1].is_ascii_alphanumeric() && lower.as_bytes()[p - 1] != b'_' {
            return Some(p);
        }
        from = p + key.len();
    }
    None
}

/// End of a keyword-DSN value starting at `at`: a quoted value to its closing
/// quote, else up to whitespace or a closing bracket or quote.
fn value_end(s: &str, at: usize) -> usize {
    let b = s.as_bytes();
    if b.get(at) == Some(&b'\'') {
        let mut i = at + 1;
        while i < b.len() {
            if b[i] == b'\\' {
                i += 2;
                continue;
            }
            if b[i] == b'\'' {
                return i + 1;
            }
            i += 1;
        }
        return b.len();
    }
    s[at..].find(|c: char| c.is_whitespace() || matches!(c, ')' | ']' | '}' | '"' | ',' | ';')).map_or(s.len(), |e| at + e)
}

/// An error of the session's own db_default link.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No server connection became free within `pool.checkout_timeout_ms`.
    #[error("timed out waiting for a server connection")]
    PoolTimeout,
    /// The backend could not be reached or refused us.
    #[error("backend database unavailable")]
    BackendUnavailable(#[source] BackendError),
    /// The server connection died under a running request.
    #[error("server connection lost")]
    ServerLost,
    /// The client broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// Too many client connections.
    #[error("sorry, too many clients already")]
    TooManyClients,
}

impl From<&ProxyError> for ClientError {
    fn from(e: &ProxyError) -> ClientError {
        let code = match e {
            ProxyError::PoolTimeout | ProxyError::TooManyClients => sqlstate::TOO_MANY_CONNECTIONS,
            ProxyError::BackendUnavailable(_) | ProxyError::ServerLost => sqlstate::CONNECTION_FAILURE,
            ProxyError::Protocol(_) => sqlstate::PROTOCOL_VIOLATION,
        };
        // the source (which may name a host) is logged, not shown
        ClientError::error(code, e.to_string())
    }
}

/// What an executor error shows the client: a shard's ErrorResponse as it
/// came, else shardgate's own error. Empty when the client is gone.
pub fn exec_frame(e: &ExecError) -> Bytes {
    match e {
        ExecError::Server(s) => s.raw.clone(),
        ExecError::ClientIo(_) => Bytes::new(),
        ExecError::DownMissed(s) => exec_frame(&crate::routed::exec::down_missed(*s)),
        _ => exec_error(e).map(|c| c.frame()).unwrap_or_default(),
    }
}

/// shardgate's own error for an executor failure (None for a shard's own
/// error, a client that went away, and DownMissed, whose answer
/// [`exec_frame`] takes from `down_missed`).
pub fn exec_error(e: &ExecError) -> Option<ClientError> {
    match e {
        ExecError::Server(_) | ExecError::ClientIo(_) => None,
        ExecError::Proxy(code, m) => Some(ClientError::error(code, m.as_str())),
        ExecError::CatchUp(s) => {
            Some(ClientError::error(sqlstate::CANNOT_CONNECT_NOW, format!("shard db_{s} is catching up on orders written while it was down; retry shortly")))
        }
        ExecError::Unreachable(s) => Some(ClientError::error(sqlstate::CONNECTION_FAILURE, format!("shard db_{s} is unavailable"))),
        ExecError::DownMissed(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_dsn_or_password_reaches_a_client() {
        let m = "could not reach postgres://app:s3cret@db.internal:5432/db_3 (host=db password=hunter2) or redis://:pw@r:6379/0 dsn=\"host=h sslpassword='x y' port=1\"";
        let s = scrub(m);
        for secret in ["s3cret", "hunter2", ":pw@", "x y"] {
            assert!(!s.contains(secret), "{s}");
        }
        assert_eq!(s, "could not reach postgres://app:[redacted]@db.internal:5432/db_3 (host=db password=[redacted]) or redis://:[redacted]@r:6379/0 dsn=\"host=h sslpassword=[redacted] port=1\"");
        assert_eq!(ClientError::error(sqlstate::CONNECTION_FAILURE, m).message, s);
        // the client's own text is quoted as PostgreSQL quotes it
        for same in ["shard db_3 is unavailable", "invalid input syntax for type bigint: \"postgres://a\"", "prepared statement \"secret=1\" already exists", "  two  spaces\tkept "] {
            assert_eq!(scrub(same), same);
        }
    }

    #[test]
    fn every_executor_error_has_its_code() {
        let code = |e: &ExecError| exec_error(e).map(|c| c.code);
        assert_eq!(code(&ExecError::CatchUp(3)), Some(sqlstate::CANNOT_CONNECT_NOW));
        assert_eq!(code(&ExecError::Unreachable(3)), Some(sqlstate::CONNECTION_FAILURE));
        assert_eq!(code(&ExecError::Proxy(sqlstate::FEATURE_NOT_SUPPORTED, "x".into())), Some(sqlstate::FEATURE_NOT_SUPPORTED));
        assert!(!exec_frame(&ExecError::DownMissed(2)).is_empty(), "a write that matched nothing on fallback rows answers with an error");
        assert_eq!(code(&ExecError::ClientIo(std::io::Error::other("gone"))), None);
        assert!(exec_frame(&ExecError::ClientIo(std::io::Error::other("gone"))).is_empty());
        assert_eq!(ClientError::from(&ProxyError::PoolTimeout).code, sqlstate::TOO_MANY_CONNECTIONS);
    }
}
