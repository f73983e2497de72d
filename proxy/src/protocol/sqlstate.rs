//! Every SQLSTATE shardgate sends or looks for, by its PostgreSQL name
//! (Appendix A of the PostgreSQL manual). No other file writes a code as a
//! literal: `tests/layout.rs` checks it.

/// 01000: a warning (NoticeResponse).
pub const WARNING: &str = "01000";
/// 08006: a connection (to a shard or db_default) failed.
pub const CONNECTION_FAILURE: &str = "08006";
/// 08P01: the client broke the protocol.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// 0A000: refused, with a message saying what to change.
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// 22003
pub const NUMERIC_VALUE_OUT_OF_RANGE: &str = "22003";
/// 23505
pub const UNIQUE_VIOLATION: &str = "23505";
/// 25P02
pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
/// 25P03
pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
/// 28000
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// 28P01
pub const INVALID_PASSWORD: &str = "28P01";
/// 40000
pub const TRANSACTION_ROLLBACK: &str = "40000";
/// 40001
pub const SERIALIZATION_FAILURE: &str = "40001";
/// 42501
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// 42704
pub const UNDEFINED_OBJECT: &str = "42704";
/// 42P01
pub const UNDEFINED_TABLE: &str = "42P01";
pub const NOT_NULL_VIOLATION: &str = "23502";
/// 26000
pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
/// 34000: a portal that does not exist (ended with its transaction).
pub const INVALID_CURSOR_NAME: &str = "34000";
/// 42P05
pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
/// A Bind to a portal name in use.
pub const DUPLICATE_CURSOR: &str = "42P03";
/// 42P07
pub const DUPLICATE_TABLE: &str = "42P07";
/// duplicate_object (a view's row type made by a concurrent CREATE VIEW).
pub const DUPLICATE_OBJECT: &str = "42710";
/// 53300
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// 53400
pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
/// 54000
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
/// 55P03
pub const LOCK_NOT_AVAILABLE: &str = "55P03";
/// 57014
pub const QUERY_CANCELED: &str = "57014";
/// 57P01
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// 57P03: the shard is catching up (or the proxy shutting down); retry shortly.
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// 57P05
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
/// XX000
pub const INTERNAL_ERROR: &str = "XX000";
