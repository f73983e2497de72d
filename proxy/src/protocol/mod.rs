//! PostgreSQL protocol v3 pieces shardgate needs: frame splitting ([`codec`]),
//! the few frontend messages it must look inside ([`frontend`]) and the
//! messages it writes itself ([`backend`]).
//! See <https://www.postgresql.org/docs/15/protocol-message-formats.html>.

pub mod backend;
pub mod codec;
pub mod frontend;
