//! Router errors. Each one maps to exactly one SQLSTATE in [`RouteError::sqlstate`];
//! messages are client-facing and say what to change.

/// Why a statement cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The statement does not parse.
    #[error("{0}")]
    Syntax(String),
    /// The statement cannot be answered exactly across shards; the message says what to change.
    #[error("{0}")]
    Unsupported(String),
    /// A shard key, month or id value is not valid for its column.
    #[error("{0}")]
    InvalidValue(String),
    /// A timestamp literal PostgreSQL would reject.
    #[error("{0}")]
    InvalidDatetime(String),
    /// A NOT NULL routing column is missing its value.
    #[error("{0}")]
    NotNull(String),
    /// A value does not fit (for example a merchant id beyond bigint).
    #[error("{0}")]
    OutOfRange(String),
    /// A negative LIMIT or OFFSET.
    #[error("{0}")]
    InvalidLimit(String),
    /// A bind parameter the statement uses was not supplied.
    #[error("{0}")]
    Protocol(String),
    /// The id generator cannot hand out an id (clock stepped back too far).
    #[error("{0}")]
    IdGeneration(String),
    /// The statement nests too deeply to analyse safely.
    #[error("{0}")]
    TooComplex(String),
    /// A name that means several columns (`ORDER BY x` with two output columns named x).
    #[error("{0}")]
    Ambiguous(String),
}

impl RouteError {
    /// The SQLSTATE sent to the client for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            RouteError::Syntax(_) => "42601",
            RouteError::Unsupported(_) => "0A000",
            RouteError::InvalidValue(_) => "22P02",
            RouteError::OutOfRange(_) => "22003",
            RouteError::InvalidDatetime(_) => "22007",
            RouteError::NotNull(_) => "23502",
            RouteError::InvalidLimit(_) => "2201W",
            RouteError::Protocol(_) => "08P01",
            RouteError::IdGeneration(_) => "55000",
            RouteError::TooComplex(_) => "54001",
            RouteError::Ambiguous(_) => "42702",
        }
    }

    /// PostgreSQL raises this when the statement runs, not when it parses it (a
    /// NOT NULL column left without a value, a negative LIMIT, an id that cannot
    /// be made): a Parse of the statement succeeds, and an extended-protocol
    /// client hears of it at Execute. The others (syntax, names, literals that
    /// do not fit their column, statements refused with 0A000) fail its Parse.
    pub fn raised_at_execution(&self) -> bool {
        matches!(self, RouteError::NotNull(_) | RouteError::InvalidLimit(_) | RouteError::IdGeneration(_))
    }

    pub(crate) fn unsupported(msg: impl Into<String>) -> Self {
        RouteError::Unsupported(msg.into())
    }
}

/// Result alias for the router.
pub type Result<T, E = RouteError> = std::result::Result<T, E>;
