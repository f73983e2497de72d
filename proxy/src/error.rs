//! Client-facing errors: one enum, SQLSTATE chosen in one place, messages that
//! never contain DSNs, host names or passwords.

use crate::backend::BackendError;

/// An error shardgate itself reports to a client.
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

impl ProxyError {
    /// The SQLSTATE sent with this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ProxyError::PoolTimeout | ProxyError::TooManyClients => "53300",
            ProxyError::BackendUnavailable(_) | ProxyError::ServerLost => "08006",
            ProxyError::Protocol(_) => "08P01",
        }
    }

    /// Text shown to the client (no DSNs, hosts or credentials).
    pub fn client_message(&self) -> String {
        self.to_string()
    }
}
