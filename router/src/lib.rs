//! SQL analysis for shardgate. Pure: no sockets, no tokio, no clock reads.
//!
//! Today: [`session_effect`] tells the proxy whether a statement leaves state
//! in the server session (so a transaction-pooled client must be pinned).
//! Shard and month routing land here next (see the router issue).

mod lexer;
mod session;

pub use session::{session_effect, SessionEffect};
