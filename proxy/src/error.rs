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

/// Removes what must never reach a client from a message: connection URLs
/// (`postgres://…`, `redis://…`, which may carry a password) and
/// `password=…` / `secret=…` pairs of a keyword DSN.
pub fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while !rest.is_empty() {
        let start = rest.find(|c: char| !c.is_whitespace()).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..end];
        let lower = word.to_ascii_lowercase();
        let trimmed = lower.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
        if ["postgres://", "postgresql://", "redis://", "rediss://"].iter().any(|p| trimmed.starts_with(p)) {
            out.push_str("[redacted]");
        } else if let Some(k) = ["password=", "passwd=", "secret=", "sslpassword="].iter().find(|p| trimmed.starts_with(*p)) {
            out.push_str(&word[..word.len() - trimmed.len() + k.len()]);
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
        rest = &rest[end..];
    }
    out
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
    match exec_error(e) {
        Some(c) => c.frame(),
        None => match e {
            ExecError::Server(s) => s.raw.clone(),
            _ => Bytes::new(),
        },
    }
}

/// shardgate's own error for an executor failure (None for a shard's own
/// error and for a client that went away).
pub fn exec_error(e: &ExecError) -> Option<ClientError> {
    match e {
        ExecError::Server(_) | ExecError::ClientIo(_) => None,
        ExecError::Proxy(code, m) => Some(ClientError::error(code, m.as_str())),
        ExecError::CatchUp(s) => {
            Some(ClientError::error(sqlstate::CANNOT_CONNECT_NOW, format!("shard db_{s} is catching up on orders written while it was down; retry shortly")))
        }
        ExecError::Unreachable(s) => Some(ClientError::error(sqlstate::CONNECTION_FAILURE, format!("shard db_{s} is unavailable"))),
        ExecError::DownMissed(s) => exec_error(&crate::routed::exec::down_missed(*s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_dsn_or_password_reaches_a_client() {
        let m = "could not reach postgres://app:s3cret@db.internal:5432/db_3 (host=db password=hunter2 sslpassword=x) or redis://:pw@r:6379";
        let s = scrub(m);
        for secret in ["s3cret", "hunter2", "db.internal", ":pw@"] {
            assert!(!s.contains(secret), "{s}");
        }
        assert_eq!(s, "could not reach [redacted] (host=db password=[redacted] sslpassword=[redacted] or [redacted]");
        assert_eq!(ClientError::error(sqlstate::CONNECTION_FAILURE, m).message, s);
        assert_eq!(scrub("shard db_3 is unavailable"), "shard db_3 is unavailable");
        assert_eq!(scrub("  two  spaces\tkept "), "  two  spaces\tkept ");
    }

    #[test]
    fn every_executor_error_has_its_code() {
        let code = |e: &ExecError| exec_error(e).map(|c| c.code);
        assert_eq!(code(&ExecError::CatchUp(3)), Some(sqlstate::CANNOT_CONNECT_NOW));
        assert_eq!(code(&ExecError::Unreachable(3)), Some(sqlstate::CONNECTION_FAILURE));
        assert_eq!(code(&ExecError::Proxy(sqlstate::FEATURE_NOT_SUPPORTED, "x".into())), Some(sqlstate::FEATURE_NOT_SUPPORTED));
        assert!(code(&ExecError::DownMissed(2)).is_some());
        assert_eq!(code(&ExecError::ClientIo(std::io::Error::other("gone"))), None);
        assert!(exec_frame(&ExecError::ClientIo(std::io::Error::other("gone"))).is_empty());
        assert_eq!(ClientError::from(&ProxyError::PoolTimeout).code, sqlstate::TOO_MANY_CONNECTIONS);
    }
}
