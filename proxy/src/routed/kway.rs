//! ORDER BY across targets on distinct connections (one target each): a
//! streaming k-way merge of their answers, holding one row per target.

use std::collections::BinaryHeap;

use bytes::BytesMut;
use shardgate_router::MergeSpec;

use super::exec::{ExecError, Out, Request, Shape, Slots};
use super::merge;
use super::slots::fail;
use super::value::Key;
use crate::backend::query::{self as wire, Event, Head, ServerError};
use crate::protocol::codec::put_message;

/// Heap entry of the k-way merge: the head row of one target.
struct HeadRow<'a> {
    keys: Vec<Option<Key>>,
    frame: crate::protocol::codec::Frame,
    target: usize,
    order: &'a [shardgate_router::SortKey],
}

impl PartialEq for HeadRow<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for HeadRow<'_> {}
impl PartialOrd for HeadRow<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeadRow<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: reverse, ties go to the earlier target
        merge::compare_rows(&self.keys, &other.keys, self.order).then(self.target.cmp(&other.target)).reverse()
    }
}

/// ORDER BY across targets on distinct connections: a streaming k-way merge.
pub(super) async fn kway(slots: &mut Slots, req: &Request<'_>, out: &mut Out<'_>, spec: &MergeSpec) -> Result<(), ExecError> {
    let targets = &req.routed.targets;
    let mut shape = Shape { desc: None, cols: Vec::new(), visible: 0 };
    let mut first_err: Option<ExecError> = None;
    let mut notices = BytesMut::new();
    let mut live = vec![true; targets.len()];
    for (i, t) in targets.iter().enumerate() {
        let shard = t.shard.0 as usize;
        let conn = &mut slots[shard].as_mut().expect("held").conn;
        match wire::read_head(conn, &mut notices).await {
            Ok(Head::Rows(d)) => shape.learn(&d, spec.hidden)?,
            Ok(Head::NoRows) => {}
            Ok(Head::Failed(e)) => {
                live[i] = false;
                first_err.get_or_insert(ExecError::Server(e));
            }
            Err(e) => return Err(fail(slots, shard, e)),
        }
    }
    out.buf.extend_from_slice(&notices.split());
    if first_err.is_none() {
        if let Err(e) = merge::check_orderable(&spec.order_by, &shape.cols, shape.visible) {
            first_err = Some(e.into());
        }
    }
    if req.simple && first_err.is_none() {
        if let Some(d) = shape.client_description(req.bound) {
            out.buf.extend_from_slice(&d);
        }
    }
    let mut heap = BinaryHeap::new();
    // prime: first row of each target
    for (i, t) in targets.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let shard = t.shard.0 as usize;
        match advance(slots, shard, &mut notices).await? {
            Step::Row(f) => {
                if first_err.is_none() {
                    let keys = keys_of(&f, spec, &shape)?;
                    heap.push(HeadRow { keys, frame: f, target: i, order: &spec.order_by });
                } else {
                    live[i] = drain_rows(slots, shard, &mut notices).await?.is_none();
                }
            }
            Step::Done => live[i] = false,
            Step::Failed(e) => {
                live[i] = false;
                first_err.get_or_insert(ExecError::Server(e));
            }
        }
    }
    let mut seen = 0u64;
    let mut emitted = 0u64;
    while let Some(top) = heap.pop() {
        if first_err.is_none() {
            seen += 1;
            if seen > spec.offset && spec.limit.is_none_or(|l| emitted < l) {
                if spec.hidden > 0 {
                    merge::trim_data_row(out.buf, top.frame.body(), shape.visible)?;
                } else {
                    out.buf.extend_from_slice(&top.frame.raw);
                }
                emitted += 1;
                out.maybe_flush().await?;
            }
        }
        let i = top.target;
        let shard = targets[i].shard.0 as usize;
        match advance(slots, shard, &mut notices).await? {
            Step::Row(f) => {
                let keys = keys_of(&f, spec, &shape)?;
                heap.push(HeadRow { keys, frame: f, target: i, order: &spec.order_by });
            }
            Step::Done => live[i] = false,
            Step::Failed(e) => {
                live[i] = false;
                first_err.get_or_insert(ExecError::Server(e));
            }
        }
    }
    out.buf.extend_from_slice(&notices.split());
    for t in targets {
        let shard = t.shard.0 as usize;
        let conn = &mut slots[shard].as_mut().expect("held").conn;
        if let Err(e) = wire::read_ready(conn).await {
            return Err(fail(slots, shard, e));
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    put_message(out.buf, b'C', |o| crate::protocol::codec::put_cstr(o, format!("SELECT {emitted}").as_bytes()));
    Ok(())
}

enum Step {
    Row(crate::protocol::codec::Frame),
    Done,
    Failed(ServerError),
}

async fn advance(slots: &mut Slots, shard: usize, notices: &mut BytesMut) -> Result<Step, ExecError> {
    let conn = &mut slots[shard].as_mut().expect("held").conn;
    match wire::next_event(conn, notices).await {
        Ok(Event::Row(f)) => Ok(Step::Row(f)),
        Ok(Event::Done(_)) => Ok(Step::Done),
        Ok(Event::Failed(e)) => Ok(Step::Failed(e)),
        Err(e) => Err(fail(slots, shard, e)),
    }
}

/// Reads and drops rows to the end of the statement; `Some` if it failed.
async fn drain_rows(slots: &mut Slots, shard: usize, notices: &mut BytesMut) -> Result<Option<ServerError>, ExecError> {
    loop {
        match advance(slots, shard, notices).await? {
            Step::Row(_) => {}
            Step::Done => return Ok(None),
            Step::Failed(e) => return Ok(Some(e)),
        }
    }
}

fn keys_of(f: &crate::protocol::codec::Frame, spec: &MergeSpec, shape: &Shape) -> Result<Vec<Option<Key>>, ExecError> {
    let row = merge::parse_data_row(f.body())?;
    Ok(merge::sort_keys(&row, &spec.order_by, &shape.cols, shape.visible)?)
}
