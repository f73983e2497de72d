//! The shard connections one client session holds ([`Slots`]): checked out
//! for a statement or held for a transaction block, given back clean.

use deadpool::managed::{PoolError, TimeoutType};

use crate::backend::query as wire;
use super::Engine;
use crate::backend::{BackendError, Pooled};
use super::request::*;
use crate::protocol::sqlstate;

/// A shard connection a session holds.
pub struct ShardSlot {
    /// The connection.
    pub conn: Pooled,
    /// A transaction block is open on it.
    pub in_tx: bool,
    /// The open transaction wrote on it.
    pub wrote: bool,
    /// How many of the block's `SET LOCAL` settings it has applied.
    pub locals: usize,
    /// The block's `PREPARE TRANSACTION` was sent behind its statement under
    /// this name, and its answer is not read yet ([`super::twopc::prepare`]).
    pub preparing: Option<String>,
}

impl Drop for ShardSlot {
    /// A slot dropped with its transaction block open (a panic, a path that
    /// forgot it) must not hand that block to the pool's next user.
    fn drop(&mut self) {
        if self.in_tx {
            self.conn.broken = true;
        }
    }
}

/// A session's shard connections, by shard number.
pub type Slots = Vec<Option<ShardSlot>>;

pub(crate) fn lost(shard: usize, e: &BackendError) -> ExecError {
    tracing::warn!(shard, error = %e, "shard connection failed");
    ExecError::Proxy(sqlstate::CONNECTION_FAILURE, format!("lost the connection to shard db_{shard}"))
}

/// Checks out a connection for `shard` (if not held), applies the client's
/// parameters and joins the transaction block.
pub async fn hold(
    engine: &Engine,
    slots: &mut Slots,
    shard: usize,
    tx: Option<&str>,
    param_sets: &(dyn Fn(&mut crate::backend::ServerConn) -> bytes::Bytes + Sync),
    local_sets: &[(String, Option<String>)],
) -> Result<(), ExecError> {
    hold_unless_canceled(engine, slots, shard, tx, param_sets, local_sets, None).await
}

/// [`hold`], where a CancelRequest of the client after `cancel`'s epoch ends
/// the wait for a pool connection (and only that wait: a round trip on a
/// connection is never abandoned halfway, which would leave its answer unread).
#[allow(clippy::too_many_arguments)]
pub async fn hold_unless_canceled(
    engine: &Engine,
    slots: &mut Slots,
    shard: usize,
    tx: Option<&str>,
    param_sets: &(dyn Fn(&mut crate::backend::ServerConn) -> bytes::Bytes + Sync),
    local_sets: &[(String, Option<String>)],
    cancel: Option<(&crate::cancel::CancelSlot, u64)>,
) -> Result<(), ExecError> {
    // one slot per shard, then one for db_default (fallback rows), then legacy
    if slots.len() < engine.shards.len() + 2 {
        slots.resize_with(engine.shards.len() + 2, || None);
    }
    if slots[shard].is_none() {
        let checkout = crate::backend::pool::checkout(engine.pool(shard), engine.meters.get(shard).map(|m| &m.pool_wait));
        let got = match cancel {
            Some((c, epoch)) => tokio::select! {
                biased;
                () = c.requested_since(epoch) => return Err(canceled()),
                got = checkout => got,
            },
            None => checkout.await,
        };
        let mut conn = match got {
            Ok(c) => c,
            Err(PoolError::Timeout(TimeoutType::Wait)) => {
                let db = if shard == engine.shards.len() { "db_default".to_string() } else { format!("shard db_{shard}") };
                return Err(ExecError::Proxy(sqlstate::TOO_MANY_CONNECTIONS, format!("timed out waiting for a connection to {db} (pool.size connections are all in use)")));
            }
            Err(e) if shard == engine.legacy_slot() => {
                tracing::warn!(error = %e, "legacy_db unavailable");
                return Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "legacy_db is unavailable (t_order lives there during this migration phase)".into()));
            }
            Err(e) if shard == engine.shards.len() => {
                tracing::warn!(error = %e, "db_default unavailable for fallback rows");
                return Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "db_default is unavailable: orders for an unavailable shard cannot be stored".into()));
            }
            Err(e) => {
                tracing::warn!(shard, error = %e, "shard unavailable");
                engine.shard_unreachable(shard, &e.to_string());
                return Err(ExecError::Unreachable(shard));
            }
        };
        let sets = param_sets(&mut conn);
        if !sets.is_empty() {
            match wire::pipeline(&mut conn, &sets).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    // what is applied there is unknown now: never hand this connection on
                    conn.broken = true;
                    return Err(ExecError::Server(e));
                }
                Err(e) => {
                    conn.broken = true;
                    return Err(lost(shard, &e));
                }
            }
        }
        slots[shard] = Some(ShardSlot { conn, in_tx: false, wrote: false, locals: 0, preparing: None });
    }
    let slot = slots[shard].as_mut().expect("just filled");
    if let (Some(begin), false) = (tx, slot.in_tx) {
        // sent with the block's first statement, in its pipeline: one round trip fewer,
        // and if BEGIN fails the statement does not run (its answer is BEGIN's error)
        slot.conn.defer(begin);
        slot.in_tx = true;
        slot.locals = 0;
    }
    if slot.in_tx && slot.locals < local_sets.len() {
        // the client's SET LOCAL reaches every shard of its block, as bind values
        let changes: Vec<(&str, Option<&str>)> = local_sets[slot.locals..].iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        match wire::pipeline(&mut slot.conn, &crate::protocol::frontend::set_local_config_pipeline(&changes)).await {
            Ok(Ok(_)) => slot.locals = local_sets.len(),
            Ok(Err(e)) => return Err(ExecError::Server(e)),
            Err(e) => {
                slot.conn.broken = true;
                return Err(lost(shard, &e));
            }
        }
    }
    Ok(())
}

/// The client's error for a statement its CancelRequest stopped before it reached a shard.
pub(crate) fn canceled() -> ExecError {
    ExecError::Proxy(sqlstate::QUERY_CANCELED, "canceling statement due to user request".into())
}

/// Returns every held shard connection that is not inside a transaction block.
pub fn release(slots: &mut Slots) {
    for slot in slots.iter_mut() {
        if slot.as_ref().is_some_and(|s| !s.in_tx || s.conn.broken) {
            if let Some(mut s) = slot.take() {
                if s.in_tx {
                    s.conn.broken = true;
                }
            }
        }
    }
}

/// Marks a connection broken on I/O failure and turns the error into the client's.
pub(crate) fn fail(slots: &mut Slots, shard: usize, e: BackendError) -> ExecError {
    if let Some(s) = slots[shard].as_mut() {
        s.conn.broken = true;
    }
    lost(shard, &e)
}
