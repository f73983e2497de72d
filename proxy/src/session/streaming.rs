//! Routed portals read in parts inside a transaction block (pgjdbc
//! `setFetchSize`, asyncpg cursors): the statement runs in a task of its own
//! that holds the session's shard connections and hands its answer over a
//! small channel, so the proxy holds a few chunks of it at a time, whatever
//! its size. Each Execute takes the rows it asks for; the shards are read
//! only as fast as the client takes them.
//!
//! While the task runs it holds the shard connections, so any other message
//! of the client (another statement, COMMIT, a Describe) first settles the
//! portal: the rest of the answer is kept (up to `server.max_portal_bytes`,
//! as a portal read whole is) and the connections come back. Closing the
//! portal or COMMIT reads the rest without keeping it; ROLLBACK gives it up
//! (the shard connections are closed: their part of the block rolls back).
//! Outside a block a portal ends at Sync, so it is read whole as before (see
//! `execute_in_parts`).
//!
//! Not as PostgreSQL: `query_timeout_ms` and CancelRequest do not reach a
//! streaming portal's shard statement (it runs while the client is between
//! parts, when PostgreSQL would ignore them); `statement_timeout` on a shard
//! counts from the portal's first Execute; an error in rows the client never
//! read still ends the block.

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::routing::Suspended;
use super::Session;
use crate::protocol::codec::{put_cstr, put_message, split_frame};
use crate::routed::exec::{self, ExecError, Out, Request, Slots};
use crate::protocol::sqlstate;

/// Chunks (of about 64 KiB) the channel holds ahead of the client.
const AHEAD: usize = 4;

/// The running statement of a portal read in parts.
pub(super) struct Streaming {
    /// The client's portal name.
    pub(super) portal: Vec<u8>,
    rx: mpsc::Receiver<Bytes>,
    /// Received, not yet handed out (whole messages and a partial one).
    pending: BytesMut,
    task: tokio::task::JoinHandle<(Slots, Result<(), ExecError>)>,
}

/// What the task needs, owned.
pub(super) struct StreamJob {
    pub(super) plan: shardgate_router::Routed,
    pub(super) bound: exec::Bound,
    pub(super) visible: Option<usize>,
    pub(super) begin: String,
}

impl Session {
    /// Starts `job` in its own task with the session's shard connections.
    pub(super) fn start_stream(&mut self, portal: Vec<u8>, job: StreamJob) {
        let engine = self.shared.engine.clone();
        let len = self.shard_tx.slots.len();
        let slots = std::mem::replace(&mut self.shard_tx.slots, (0..len).map(|_| None).collect());
        let desired = self.desired.clone();
        let locals = self.shard_tx.local_sets.clone();
        let (tx, rx) = mpsc::channel::<Bytes>(AHEAD);
        let task = tokio::spawn(async move {
            let mut slots = slots;
            let sets = move |c: &mut crate::backend::ServerConn| super::param_sets(&desired, c);
            let req = Request {
                routed: &job.plan,
                bound: &job.bound,
                simple: false,
                visible: job.visible,
                tx: Some(job.begin.as_str()),
                param_sets: &sets,
                local_sets: &locals,
                down_targets: &[],
                serial: false,
                // the shard statement lasts as long as the client takes to read the portal:
                // a CancelRequest or query_timeout_ms while the client is between parts
                // must not end it (PostgreSQL ignores a cancel while it waits for input)
                cancel: None,
                cancel_epoch: 0,
            };
            let mut buf = BytesMut::new();
            let mut out = Out { buf: &mut buf, client: None, keep: None, overflow: false, flushed: false, sink: Some(&tx) };
            let r = exec::execute(&engine, &mut slots, &req, &mut out).await;
            // what the statement wrote before it ended (or failed) goes out first
            if !buf.is_empty() {
                let _ = tx.send(buf.split().freeze()).await;
            }
            if tx.is_closed() {
                // the session gave the portal up while it ended: its block is rolled back
                for s in slots.iter_mut().flatten() {
                    s.conn.broken = true;
                }
            }
            (slots, r)
        });
        self.routed.stream = Some(Streaming { portal, rx, pending: BytesMut::new(), task });
    }

    /// Hands out up to `n` rows of the streaming portal, then PortalSuspended,
    /// or, once its answer ends, the tag of this part (or its error).
    pub(super) async fn stream_part(&mut self, n: usize) -> Result<(), End> {
        let Some(st) = self.routed.stream.as_mut() else { return Ok(()) };
        let mut sent = 0usize;
        let mut tag = None;
        while sent < n {
            match split_frame(&mut st.pending, usize::MAX) {
                Ok(Some(f)) => match f.tag {
                    b'D' => {
                        self.cout.extend_from_slice(&f.raw);
                        sent += 1;
                        // a large part goes out as it comes (the proxy never holds a whole part)
                        if self.cout.len() >= 64 * 1024 {
                            super::write_all(&self.client, &self.cout).await.map_err(End::ClientIo)?;
                            self.cout.clear();
                        }
                    }
                    b'C' => {
                        tag = Some(tag_verb(f.body()));
                        break;
                    }
                    _ => self.cout.extend_from_slice(&f.raw),
                },
                Ok(None) => match st.rx.recv().await {
                    Some(chunk) => st.pending.extend_from_slice(&chunk),
                    None => break,
                },
                Err(_) => break,
            }
        }
        if sent == n && tag.is_none() {
            put_message(&mut self.cout, b's', |_| {});
            return Ok(());
        }
        let st = self.routed.stream.take().expect("checked above");
        let (portal, r) = self.join_stream(st).await;
        match r {
            Ok(()) => {
                let tag = tag.unwrap_or_else(|| "SELECT".into());
                put_message(&mut self.cout, b'C', |o| put_cstr(o, format!("{tag} {sent}").as_bytes()));
                // at its end: a later Execute answers 0 rows, as in PostgreSQL
                self.routed.suspended.insert(portal, Suspended { rows: Default::default(), tag, error: None });
            }
            Err(e) => self.fail_extended(e).await?,
        }
        Ok(())
    }

    /// Waits for the task and takes the shard connections back.
    async fn join_stream(&mut self, st: Streaming) -> (Vec<u8>, Result<(), ExecError>) {
        drop(st.rx);
        let r = match st.task.await {
            Ok((slots, r)) => {
                self.shard_tx.slots = slots;
                r
            }
            Err(e) => {
                tracing::error!(error = %e, "a streaming portal's task failed");
                Err(ExecError::Proxy(sqlstate::INTERNAL_ERROR, "the portal's statement failed inside the proxy".into()))
            }
        };
        (st.portal, r)
    }

    /// Brings the streaming portal to its end before another message uses
    /// the shard connections: its rows are kept for later Executes when
    /// `keep` (up to `server.max_portal_bytes`), else read and dropped.
    /// `Err` is the statement's own error (the block is then aborted).
    pub(super) async fn settle_stream(&mut self, keep: bool) -> Result<(), ExecError> {
        let Some(mut st) = self.routed.stream.take() else { return Ok(()) };
        let limit = self.shared.config.server.max_portal_bytes;
        let mut rows = std::collections::VecDeque::new();
        let mut held = 0usize;
        let mut overflow = false;
        let mut tag = String::from("SELECT");
        loop {
            match split_frame(&mut st.pending, usize::MAX) {
                Ok(Some(f)) => match f.tag {
                    b'D' if keep && !overflow => {
                        held += f.raw.len();
                        if held > limit {
                            overflow = true;
                            rows.clear();
                        } else {
                            rows.push_back(f.raw);
                        }
                    }
                    b'C' => tag = tag_verb(f.body()),
                    _ => {}
                },
                Ok(None) => match st.rx.recv().await {
                    Some(chunk) => st.pending.extend_from_slice(&chunk),
                    None => break,
                },
                Err(_) => break,
            }
        }
        // the rest went through the channel: the task ends and hands the connections back
        let (portal, r) = self.join_stream(st).await;
        r?;
        let error = overflow.then(|| {
            (
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!("the rest of this portal is larger than server.max_portal_bytes ({limit}) and another statement ran before it was read; read a portal to its end before running other statements"),
            )
        });
        if keep {
            self.routed.suspended.insert(portal, Suspended { rows, tag, error });
        }
        Ok(())
    }

    /// The session ends with a portal still streaming: its task stops at its
    /// next chunk (its connections are closed; the block rolls back).
    pub(super) async fn abandon_stream(&mut self) {
        if let Some(st) = self.routed.stream.take() {
            drop(st.rx);
            if let Ok(Ok((slots, _))) = tokio::time::timeout(std::time::Duration::from_secs(5), st.task).await {
                self.shard_tx.slots = slots;
            }
        }
    }
}

use super::End;

/// A CommandComplete body's tag without its row count.
fn tag_verb(body: &[u8]) -> String {
    let t = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
    t.rsplit_once(' ').map_or(t.clone(), |(verb, _)| verb.to_string())
}
