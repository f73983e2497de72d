//! The migration engine behind `shardgate-migrate`, also used by the proxy
//! (phase, outbox) — README, "Migrating from a legacy single table".
//!
//! - [`plan`]: phases and which step may run when (pure).
//! - [`state`]: the control tables on `db_default`.
//! - [`db`]: connections, the shared column list, binary COPY rows.
//! - [`sync`]: checksums per merchant × month, drill-down, repair.
//! - [`steps`]: one module per CLI step.

pub mod db;
pub mod plan;
pub mod state;
pub mod steps;
pub mod sync;

pub use plan::{Phase, Store, Writes};
