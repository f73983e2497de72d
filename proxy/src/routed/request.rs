//! What the executor is given and what it gives back: the statement's bound
//! values ([`Bound`]), one execution request ([`Request`]), where its answer goes
//! ([`Out`]), and how it fails ([`ExecError`]).

use bytes::{Bytes, BytesMut};
use shardgate_router::Routed;

use super::value::ValueError;
use crate::backend::query::ServerError;

/// The client's bind values for one execution.
#[derive(Debug, Default, Clone)]
pub struct Bound {
    /// Values (`None` = NULL).
    pub values: Vec<Option<Bytes>>,
    /// Format of each value (0 text, 1 binary).
    pub formats: Vec<i16>,
    /// Parameter type OIDs from Parse (0 = unspecified).
    pub types: Vec<u32>,
    /// Result format codes as the client sent them (0, 1 or one per column).
    pub result_formats: Vec<i16>,
    /// A simple-protocol statement planned from its shape: its literals stand
    /// for the values (there are no bind values), and they go back into each
    /// target's text before it runs ([`Bound::splice`]).
    pub shape: Option<std::sync::Arc<Shape>>,
}

/// A simple-protocol statement's text and the literals taken out of it.
#[derive(Debug)]
pub struct Shape {
    /// The client's text.
    pub sql: String,
    /// Its shape and literals.
    pub shaped: shardgate_router::shape::Shaped,
}

impl Bound {
    /// Values as the router reads them.
    pub fn params(&self) -> Vec<shardgate_router::Param<'_>> {
        use shardgate_router::Param;
        if let Some(s) = &self.shape {
            return s.shaped.params();
        }
        self.values
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                None => Param::Null,
                Some(b) if self.formats.get(i).copied().unwrap_or(0) == 1 => Param::Binary { oid: self.types.get(i).copied().unwrap_or(0), bytes: b },
                // invalid UTF-8 cannot be valid text input of any type: the server will say so
                Some(b) => Param::Text(std::str::from_utf8(b).unwrap_or("\u{fffd}")),
            })
            .collect()
    }

    /// The values of a simple-protocol statement from its shape, as the router reads them.
    pub fn shaped(sql: &str, shaped: shardgate_router::shape::Shaped) -> Bound {
        Bound { shape: Some(std::sync::Arc::new(Shape { sql: sql.to_string(), shaped })), ..Bound::default() }
    }

    /// The plan with the client's literals put back into each target's text
    /// (for a statement planned from its shape; others are returned as they are).
    pub fn splice(&self, mut plan: Box<Routed>) -> Result<Box<Routed>, ExecError> {
        let Some(s) = &self.shape else { return Ok(plan) };
        for t in &mut plan.targets {
            let text = shardgate_router::shape::splice(&t.sql, t.params.as_deref(), &t.extra, &s.sql, &s.shaped).ok_or_else(|| {
                ExecError::Proxy(crate::protocol::sqlstate::INTERNAL_ERROR, "a statement's literals could not be put back into its plan".into())
            })?;
            t.sql = text.into();
            t.params = Some(Vec::new());
            t.extra.clear();
        }
        Ok(plan)
    }

    /// Whether the client wants column `i` of `n` in binary.
    pub fn binary(&self, i: usize) -> bool {
        match self.result_formats.len() {
            0 => false,
            1 => self.result_formats[0] == 1,
            _ => self.result_formats.get(i).copied().unwrap_or(0) == 1,
        }
    }
}

/// How a statement failed.
#[derive(Debug)]
pub enum ExecError {
    /// A shard's ErrorResponse, forwarded whole.
    Server(ServerError),
    /// shardgate's own error.
    Proxy(&'static str, String),
    /// The client went away while we wrote.
    ClientIo(std::io::Error),
    /// A shard could not be reached before anything was sent to it.
    Unreachable(usize),
    /// A read of a shard that still has unsynced fallback rows: bring them home first.
    CatchUp(usize),
    /// An UPDATE/DELETE that ran only on a down shard's fallback rows matched none
    /// of them; nothing was changed.
    DownMissed(usize),
}

impl From<ValueError> for ExecError {
    fn from(e: ValueError) -> Self {
        ExecError::Proxy(e.sqlstate(), e.to_string())
    }
}

/// One execution request.
pub struct Request<'a> {
    /// The plan.
    pub routed: &'a Routed,
    /// Bind values and formats.
    pub bound: &'a Bound,
    /// Simple-protocol client: send RowDescription before rows.
    pub simple: bool,
    /// Visible column count, when known from a Describe (needed for per-column formats).
    pub visible: Option<usize>,
    /// `Some(begin)` inside a transaction block: shards join it with this statement.
    pub tx: Option<&'a str>,
    /// SET statements that bring a fresh shard connection in line with the client's parameters.
    pub param_sets: &'a (dyn Fn(&mut crate::backend::ServerConn) -> bytes::Bytes + Sync),
    /// The block's `SET LOCAL` settings (name, value; `None` = default), applied
    /// on each shard of the block before its statements.
    pub local_sets: &'a [(String, Option<String>)],
    /// Targets standing in for a down shard, with that shard (UPDATE/DELETE must match there).
    pub down_targets: &'a [(usize, usize)],
    /// Run the targets one after another, in order (not all at once).
    pub serial: bool,
    /// The client's cancel slot: the shard connections running this statement are
    /// registered there while it runs, so a CancelRequest reaches them.
    pub cancel: Option<&'a crate::cancel::CancelSlot>,
    /// The slot's [`crate::cancel::CancelSlot::epoch`] when the statement started:
    /// a CancelRequest after it stops the statement even before it reaches a shard.
    pub cancel_epoch: u64,
}

/// Where answers go.
pub struct Out<'a> {
    /// Bytes queued for the client.
    pub buf: &'a mut BytesMut,
    /// The client socket; `None` discards the answer (a secondary write).
    pub client: Option<&'a crate::stream::Stream>,
    /// Keep the whole answer in `buf`, up to this many bytes (a portal read
    /// in parts); over it `buf` is emptied and `overflow` set, while the
    /// shards' answers are still read to their end.
    pub keep: Option<usize>,
    /// The kept answer went over `keep`.
    pub overflow: bool,
    /// Part of the answer left `buf` (sent, or dropped over `keep`); only
    /// ever after a row was added.
    pub flushed: bool,
    /// The answer goes here in chunks instead of to `client` (a portal
    /// streaming in parts); waits while the channel is full. A closed channel
    /// ends the statement as a gone client does.
    pub sink: Option<&'a tokio::sync::mpsc::Sender<bytes::Bytes>>,
}

impl Out<'_> {
    pub(crate) async fn maybe_flush(&mut self) -> Result<(), ExecError> {
        if let Some(limit) = self.keep {
            if self.overflow || self.buf.len() > limit {
                self.overflow = true;
                self.flushed = true;
                self.buf.clear();
            }
            return Ok(());
        }
        if self.buf.len() >= 64 * 1024 {
            if let Some(sink) = self.sink {
                self.flushed = true;
                return sink
                    .send(self.buf.split().freeze())
                    .await
                    .map_err(|_| ExecError::ClientIo(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the streaming portal was given up")));
            }
            if let Some(c) = self.client {
                crate::stream::write_all(c, self.buf).await.map_err(ExecError::ClientIo)?;
            }
            self.flushed = true;
            self.buf.clear();
        }
        Ok(())
    }
}
