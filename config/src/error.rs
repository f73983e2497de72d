//! Config errors: every variant renders as one line that names the key and says what to fix.

use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path we tried.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax or shape error (unknown key, wrong type), located by line.
    #[error("{origin}:{line}: {message}")]
    Parse {
        /// File name or `<string>`.
        origin: String,
        /// 1-based line of the offending key or value.
        line: usize,
        /// The parser's message folded to one line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key, e.g. `shards[3].dsn`.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }
}
