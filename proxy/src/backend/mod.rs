//! Server side: raw protocol connections to PostgreSQL ([`conn`]) and the
//! deadpool-managed pools of them ([`pool`]).

pub mod conn;
pub mod names;
pub mod pool;
pub mod query;

pub use conn::{BackendError, CancelKey, ServerConn};
pub use pool::{Pool, Pooled, ServerManager};
