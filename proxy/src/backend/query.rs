//! The messages shardgate sends to shards for one planned statement, and the
//! replies it reads back. Every target runs as an unnamed
//! Parse/Bind/Describe/Execute/Sync, so bind values and result formats work
//! the same for simple and extended clients.

use bytes::{BufMut, Bytes, BytesMut};

use crate::backend::{BackendError, ServerConn};
use crate::protocol::backend::parse_error_fields;
use crate::protocol::codec::{put_cstr, put_message, Frame};

/// Appends one statement of a pipeline: Parse (unless `statement` is already
/// prepared on the connection), Bind, Describe, Execute. The caller ends the
/// pipeline with [`put_sync`].
#[allow(clippy::too_many_arguments)]
pub fn put_statement(out: &mut BytesMut, statement: &[u8], parse: bool, sql: &str, types: &[u32], values: &[Option<&[u8]>], formats: &[i16], result_formats: &[i16]) {
    if parse {
        put_parse(out, statement, sql, types);
    }
    put_bind(out, statement, values, formats, result_formats);
    put_message(out, b'D', |o| {
        o.put_u8(b'P');
        put_cstr(o, b"");
    });
    put_message(out, b'E', |o| {
        put_cstr(o, b"");
        o.put_i32(0);
    });
}

/// Appends Parse (unnamed) + Bind + Execute + Sync: the rows and tag, no RowDescription.
pub fn put_execute(out: &mut BytesMut, sql: &str, types: &[u32], values: &[Option<&[u8]>], formats: &[i16], result_formats: &[i16]) {
    put_parse(out, b"", sql, types);
    put_bind(out, b"", values, formats, result_formats);
    put_message(out, b'E', |o| {
        put_cstr(o, b"");
        o.put_i32(0);
    });
    put_message(out, b'S', |_| {});
}

/// Appends Parse (unnamed) + Bind (text values) + Execute without a Sync: one
/// step of a pipeline the caller ends with [`put_sync`]. If a step fails the
/// server skips the later ones.
pub fn put_step(out: &mut BytesMut, sql: &str, values: &[Option<&[u8]>]) {
    put_parse(out, b"", sql, &[]);
    put_bind(out, b"", values, &[], &[]);
    put_message(out, b'E', |o| {
        put_cstr(o, b"");
        o.put_i32(0);
    });
}

/// Appends one step of a pipeline run as a named statement the connection
/// keeps (Bind and Execute; the first time on this connection also Close and
/// Parse, the Close for a name the proxy forgot while the server kept it):
/// for statements the proxy itself sends with every write, which PostgreSQL
/// then parses and plans once per connection instead of every time. The name
/// is `sgc_` and a hash of the text. Returns the name when it parsed it:
/// if the pipeline fails, pass those to [`forget_named`].
pub fn put_named_step(out: &mut BytesMut, conn: &mut ServerConn, sql: &str, values: &[Option<&[u8]>]) -> Option<String> {
    let name = own_statement_name(sql);
    let parsed = if conn.prepared.contains(&name) {
        conn.prepared.touch(&name);
        None
    } else {
        crate::protocol::frontend::close_statement(out, name.as_bytes());
        put_parse(out, name.as_bytes(), sql, &[]);
        conn.prepared.insert(&name);
        Some(name.clone())
    };
    put_bind(out, name.as_bytes(), values, &[], &[]);
    put_message(out, b'E', |o| {
        put_cstr(o, b"");
        o.put_i32(0);
    });
    parsed
}

/// After a pipeline of [`put_named_step`]s failed: the server skipped the
/// steps after the failed one, Parses perhaps among them, so the statements
/// parsed there may not exist; the next use parses them again (its Close
/// first makes that right either way).
pub fn forget_named(conn: &mut ServerConn, parsed: &[String]) {
    for name in parsed {
        conn.prepared.remove(name);
    }
}

/// The server name of one of the proxy's own statements (see [`put_named_step`]).
fn own_statement_name(sql: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sql.hash(&mut h);
    format!("sgc_{:016x}_{}", h.finish(), sql.len())
}

/// Appends Sync.
pub fn put_sync(out: &mut BytesMut) {
    put_message(out, b'S', |_| {});
}

/// Bind of the unnamed portal.
pub(crate) fn put_bind(out: &mut BytesMut, statement: &[u8], values: &[Option<&[u8]>], formats: &[i16], result_formats: &[i16]) {
    put_message(out, b'B', |o| {
        put_cstr(o, b"");
        put_cstr(o, statement);
        o.put_i16(formats.len() as i16);
        for f in formats {
            o.put_i16(*f);
        }
        o.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(b) => {
                    o.put_i32(b.len() as i32);
                    o.extend_from_slice(b);
                }
                None => o.put_i32(-1),
            }
        }
        o.put_i16(result_formats.len() as i16);
        for f in result_formats {
            o.put_i16(*f);
        }
    });
}

pub(crate) fn put_parse(out: &mut BytesMut, statement: &[u8], sql: &str, types: &[u32]) {
    put_message(out, b'P', |o| {
        put_cstr(o, statement);
        put_cstr(o, sql.as_bytes());
        o.put_i16(types.len() as i16);
        for t in types {
            o.put_u32(*t);
        }
    });
}

/// Appends Parse + Describe statement + Sync (learn parameter and row types).
pub fn put_describe(out: &mut BytesMut, sql: &str, types: &[u32]) {
    put_parse(out, b"", sql, types);
    put_message(out, b'D', |o| {
        o.put_u8(b'S');
        put_cstr(o, b"");
    });
    put_message(out, b'S', |_| {});
}

/// A server's ErrorResponse, kept whole so the client gets every field.
#[derive(Debug, Clone)]
pub struct ServerError {
    /// The raw frame.
    pub raw: Bytes,
    /// Its SQLSTATE.
    pub code: String,
}

impl ServerError {
    pub(crate) fn from_frame(f: &Frame) -> ServerError {
        ServerError { raw: f.raw.clone(), code: parse_error_fields(f.body()).code }
    }
}

/// Start of a statement's answer.
pub enum Head {
    /// It returns rows described by this RowDescription frame.
    Rows(Bytes),
    /// No rows (a write without RETURNING).
    NoRows,
    /// It failed before running; the server now skips to Sync.
    Failed(ServerError),
}

/// One step of a statement's answer.
pub enum Event {
    /// A DataRow frame.
    Row(Frame),
    /// CommandComplete (its tag) or EmptyQueryResponse (empty tag).
    Done(String),
    /// It failed; the server now skips to Sync.
    Failed(ServerError),
}

/// A ParameterStatus in a statement's answer: a statement that turned
/// standard_conforming_strings off (however it got past the router) leaves a
/// connection whose server reads string literals differently from shardgate.
/// The statement fails as if the connection were lost (in a block, the
/// client's transaction with it) and the connection is not used again.
fn watch_parameter(conn: &mut ServerConn, f: &crate::protocol::codec::Frame) -> Result<(), BackendError> {
    let mut parts = f.body().split(|b| *b == 0);
    if parts.next() == Some(b"standard_conforming_strings".as_slice()) && parts.next() != Some(b"on".as_slice()) {
        conn.broken = true;
        return Err(BackendError::Protocol("the server turned standard_conforming_strings off".into()));
    }
    Ok(())
}

/// Reads CloseComplete (of an evicted statement)/ParseComplete/BindComplete
/// and the portal description.
pub async fn read_head(conn: &mut ServerConn, notices: &mut BytesMut) -> Result<Head, BackendError> {
    loop {
        let f = conn.read_frame().await?;
        match f.tag {
            b'S' => watch_parameter(conn, &f)?,
            b'1' | b'2' | b'3' | b'A' => {}
            b'N' => notices.extend_from_slice(&f.raw),
            b'T' => return Ok(Head::Rows(f.raw)),
            b'n' => return Ok(Head::NoRows),
            // a simple Query's statement without rows has no NoData: its tag comes at once
            b'C' => {
                conn.unread(f);
                return Ok(Head::NoRows);
            }
            b'E' => return Ok(Head::Failed(ServerError::from_frame(&f))),
            t => return Err(BackendError::Protocol(format!("unexpected message {:?} before results", t as char))),
        }
    }
}

/// Reads the next row or the end of the statement.
pub async fn next_event(conn: &mut ServerConn, notices: &mut BytesMut) -> Result<Event, BackendError> {
    loop {
        let f = conn.read_frame().await?;
        match f.tag {
            b'D' => return Ok(Event::Row(f)),
            b'C' => {
                let tag = f.body().strip_suffix(&[0]).unwrap_or(f.body());
                return Ok(Event::Done(String::from_utf8_lossy(tag).into_owned()));
            }
            b'I' => return Ok(Event::Done(String::new())),
            b'E' => return Ok(Event::Failed(ServerError::from_frame(&f))),
            b'N' => notices.extend_from_slice(&f.raw),
            b'S' => watch_parameter(conn, &f)?,
            b'A' => {}
            t => return Err(BackendError::Protocol(format!("unexpected message {:?} in results", t as char))),
        }
    }
}

/// Reads up to and including ReadyForQuery; returns the transaction status.
pub async fn read_ready(conn: &mut ServerConn) -> Result<u8, BackendError> {
    read_ready_status(conn).await.map(|(_, status)| status)
}

/// Reads up to and including ReadyForQuery after a statement's answer: an
/// ErrorResponse there is the commit at Sync of the pipeline's implicit
/// transaction failing (a deferred constraint, a serialization failure), so
/// nothing of the pipeline was kept.
pub async fn read_ready_checked(conn: &mut ServerConn) -> Result<Result<u8, ServerError>, BackendError> {
    read_ready_status(conn).await.map(|(err, status)| err.map_or(Ok(status), Err))
}

/// Sends messages ending in one Sync and reads up to ReadyForQuery, rows
/// discarded: the first error, if any, and the transaction status after it.
pub async fn exchange_status(conn: &mut ServerConn, msgs: &[u8]) -> Result<(Option<ServerError>, u8), BackendError> {
    conn.send(msgs).await?;
    read_ready_status(conn).await
}

/// Reads up to and including ReadyForQuery, rows discarded: the first error,
/// if any, and the transaction status.
async fn read_ready_status(conn: &mut ServerConn) -> Result<(Option<ServerError>, u8), BackendError> {
    let mut err = None;
    loop {
        let f = conn.read_frame().await?;
        match f.tag {
            b'E' => err = err.or_else(|| Some(ServerError::from_frame(&f))),
            b'Z' => return Ok((err, f.body().first().copied().unwrap_or(b'I'))),
            b'S' => watch_parameter(conn, &f)?,
            _ => {}
        }
    }
}

/// Rolls back the connection's transaction block. A connection whose ROLLBACK
/// does not succeed is marked broken: it is closed, never pooled inside the
/// block. Returns whether the ROLLBACK succeeded.
pub async fn rollback(conn: &mut ServerConn) -> bool {
    let done = matches!(control(conn, "ROLLBACK").await, Ok(Ok(_)));
    if !done {
        conn.broken = true;
    }
    done
}

/// Runs a control statement (BEGIN, PREPARE TRANSACTION …) and returns the
/// rows of its first column, or the server's error.
pub async fn control(conn: &mut ServerConn, sql: &str) -> Result<Result<Vec<Option<String>>, ServerError>, BackendError> {
    pipeline(conn, &crate::protocol::frontend::query(sql)).await
}

/// Runs a control statement and returns its command tag (`PREPARE TRANSACTION`,
/// or `ROLLBACK` when the server rolled an aborted transaction back instead),
/// or the server's error.
pub async fn control_tag(conn: &mut ServerConn, sql: &str) -> Result<Result<String, ServerError>, BackendError> {
    conn.send(&crate::protocol::frontend::query(sql)).await?;
    read_tag(conn).await
}

/// Reads the answer of a control statement sent earlier, up to its
/// ReadyForQuery: its command tag or the server's error.
pub async fn read_tag(conn: &mut ServerConn) -> Result<Result<String, ServerError>, BackendError> {
    let mut tag = String::new();
    let mut err = None;
    loop {
        let f = conn.read_frame().await?;
        match f.tag {
            b'C' => tag = String::from_utf8_lossy(f.body().strip_suffix(&[0]).unwrap_or(f.body())).into_owned(),
            b'E' => err = Some(ServerError::from_frame(&f)),
            b'Z' => return Ok(err.map_or(Ok(tag), Err)),
            _ => {}
        }
    }
}

/// Sends messages the proxy made that end in one Sync or Query (for example
/// [`crate::protocol::frontend::set_config_pipeline`]) and reads up to the
/// ReadyForQuery: the rows of the first column, or the first error.
pub async fn pipeline(conn: &mut ServerConn, msgs: &[u8]) -> Result<Result<Vec<Option<String>>, ServerError>, BackendError> {
    Ok(exchange(conn, msgs).await?.map(|rows| rows.into_iter().map(|r| r.into_iter().next().flatten()).collect()))
}

/// Runs one statement the proxy wrote, with text bind values (`None` = NULL;
/// values are never spliced into the text), and returns its rows, every
/// column as text, or the server's error.
pub async fn query(conn: &mut ServerConn, sql: &str, values: &[Option<&str>]) -> Result<Result<Vec<Vec<Option<String>>>, ServerError>, BackendError> {
    let mut out = BytesMut::new();
    let vals: Vec<Option<&[u8]>> = values.iter().map(|v| v.map(str::as_bytes)).collect();
    put_execute(&mut out, sql, &[], &vals, &[], &[]);
    exchange(conn, &out).await
}

/// Sends messages ending in one Sync or Query and reads up to ReadyForQuery:
/// every row (all columns as text), or the first error.
async fn exchange(conn: &mut ServerConn, msgs: &[u8]) -> Result<Result<Vec<Vec<Option<String>>>, ServerError>, BackendError> {
    conn.send(msgs).await?;
    let mut rows = Vec::new();
    let mut err = None;
    loop {
        let f = conn.read_frame().await?;
        match f.tag {
            b'D' => {
                let row = crate::protocol::backend::data_row(f.body()).ok_or_else(|| BackendError::Protocol("malformed DataRow".into()))?;
                rows.push(row.into_iter().map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned())).collect());
            }
            b'E' => err = Some(ServerError::from_frame(&f)),
            b'Z' => return Ok(err.map_or(Ok(rows), Err)),
            _ => {}
        }
    }
}

/// The row count at the end of a command tag (`INSERT 0 3` → 3).
pub fn tag_count(tag: &str) -> u64 {
    tag.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// A RowDescription keeping the first `n` fields, with format codes set per `binary`.
pub fn row_description(frame_body: &[u8], n: usize, binary: Option<&[bool]>) -> Option<(Bytes, Vec<(u32, i16)>)> {
    let mut fields = Vec::new();
    let mut out = BytesMut::with_capacity(frame_body.len() + 5);
    let mut ok = true;
    put_message(&mut out, b'T', |o| ok = describe_fields(frame_body, n, binary, Some(o), &mut fields).is_some());
    ok.then(|| (out.freeze(), fields))
}

/// The (type oid, format) of each field of a RowDescription body, without
/// building a new frame.
pub fn row_fields(frame_body: &[u8]) -> Option<Vec<(u32, i16)>> {
    let mut fields = Vec::new();
    describe_fields(frame_body, usize::MAX, None, None, &mut fields)?;
    Some(fields)
}

/// Reads a RowDescription body into `fields`; with `out`, also writes the body
/// of one that keeps the first `n` fields, formats changed to `binary`'s.
fn describe_fields(frame_body: &[u8], n: usize, binary: Option<&[bool]>, mut out: Option<&mut BytesMut>, fields: &mut Vec<(u32, i16)>) -> Option<()> {
    // (a negative count is no RowDescription)
    let count = usize::try_from(i16::from_be_bytes(frame_body.get(0..2)?.try_into().ok()?)).ok()?;
    let mut pos = 2;
    fields.reserve(count);
    let keep = n.min(count);
    if let Some(o) = out.as_deref_mut() {
        o.put_i16(keep as i16);
    }
    for i in 0..count {
        let name_end = pos + frame_body.get(pos..)?.iter().position(|&b| b == 0)?;
        let end = name_end + 1 + 18;
        let f = frame_body.get(pos..end)?;
        let type_oid = u32::from_be_bytes(frame_body.get(name_end + 7..name_end + 11)?.try_into().ok()?);
        let format = i16::from_be_bytes(frame_body.get(end - 2..end)?.try_into().ok()?);
        let format = binary.map_or(format, |b| i16::from(b.get(i).copied().unwrap_or(false)));
        if let Some(o) = out.as_deref_mut().filter(|_| i < keep) {
            o.extend_from_slice(&f[..f.len() - 2]);
            o.put_i16(format);
        }
        fields.push((type_oid, format));
        pos = end;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_description_trims_and_sets_formats() {
        let mut body = BytesMut::new();
        body.put_i16(2);
        for (name, oid) in [("a", 20u32), ("__sg_h0", 1700)] {
            put_cstr(&mut body, name.as_bytes());
            body.put_i32(0);
            body.put_i16(0);
            body.put_u32(oid);
            body.put_i16(8);
            body.put_i32(-1);
            body.put_i16(0);
        }
        let (t, fields) = row_description(&body, 1, Some(&[true])).expect("valid");
        assert_eq!(fields, vec![(20, 1), (1700, 0)]);
        assert_eq!(&t[5..7], &[0, 1]);
        assert_eq!(t[t.len() - 1], 1, "binary format set");
        assert_eq!(tag_count("INSERT 0 12"), 12);
        assert_eq!(tag_count("UPDATE 3"), 3);
        // the same body read whole, and bodies that are no RowDescription
        assert_eq!(row_fields(&body), Some(vec![(20, 0), (1700, 0)]));
        let (whole, _) = row_description(&body, usize::MAX, None).expect("valid");
        assert_eq!(&whole[5..], &body[..], "kept as it came");
        assert_eq!(row_fields(&body[..body.len() - 1]), None, "truncated");
        assert_eq!(row_description(&[0x80, 0x00], 1, None), None, "negative count");
        assert_eq!(row_fields(&[0xff, 0xff]), None, "negative count");
    }
}
