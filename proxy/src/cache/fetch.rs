//! One read of a cached statement's answer from PostgreSQL: the statement is
//! sent, the whole answer read until ReadyForQuery and kept as bytes.

use bytes::{Bytes, BytesMut};

use crate::backend::ServerConn;
use crate::protocol::codec::{put_cstr, put_message};
use crate::backend::query::ServerError;
use super::*;

/// A statement's whole reply, as read from a server.
pub struct Exchange {
    /// Everything the client would see, in order (no ParseComplete/BindComplete/ReadyForQuery).
    pub bytes: Bytes,
    pub rows: u32,
    pub error: Option<ServerError>,
    /// A plain result: exactly one CommandComplete, no notices.
    pub plain: bool,
    /// Transaction status from the ReadyForQuery.
    pub status: u8,
}

impl Exchange {
    pub(super) fn into_answer(self) -> Result<Answer, LoadError> {
        match (self.error, self.plain) {
            (Some(e), _) => Err(LoadError::Server(e)),
            (None, false) => Err(LoadError::Uncacheable("not a plain result".into())),
            (None, true) => Ok(Answer { bytes: self.bytes, rows: self.rows }),
        }
    }
}

/// Sends one statement (simple Query, or Parse/Bind/Execute/Sync) and reads its reply up to ReadyForQuery.
pub async fn exchange(conn: &mut ServerConn, f: &Fetch<'_>) -> Result<Exchange, crate::backend::BackendError> {
    let mut out = BytesMut::new();
    if f.simple {
        out.extend_from_slice(&crate::protocol::frontend::query(f.sql));
    } else {
        crate::backend::query::put_execute(&mut out, f.sql, f.types, f.values, f.formats, f.result_formats);
    }
    conn.send(&out).await?;
    let mut bytes = BytesMut::new();
    let (mut rows, mut tags, mut plain, mut error) = (0u32, 0u32, true, None);
    loop {
        let fr = conn.read_frame().await?;
        match fr.tag {
            b'1' | b'2' => continue,
            b'Z' => {
                let status = fr.body().first().copied().unwrap_or(b'I');
                return Ok(Exchange { bytes: bytes.freeze(), rows, error, plain: plain && tags == 1, status });
            }
            b'D' => rows += 1,
            b'C' => tags += 1,
            b'T' if f.simple => {}
            b'E' => error = Some(ServerError::from_frame(&fr)),
            // notices, an empty query, a parameter change: passed on, never cached
            _ => plain = false,
        }
        bytes.extend_from_slice(&fr.raw);
    }
}

pub(super) fn row_description(answer: &[u8]) -> Option<Bytes> {
    if answer.first() != Some(&b'T') || answer.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes(answer[1..5].try_into().ok()?) as usize;
    answer.get(..1 + len).map(Bytes::copy_from_slice)
}

/// The reply for a key that does not exist: RowDescription (simple protocol) and `SELECT 0`.
pub(super) fn empty_answer(row_description: Option<&Bytes>) -> Answer {
    let mut b = BytesMut::new();
    if let Some(rd) = row_description {
        b.extend_from_slice(rd);
    }
    put_message(&mut b, b'C', |o| put_cstr(o, b"SELECT 0"));
    Answer { bytes: b.freeze(), rows: 0 }
}
