//! Statements on the sharded table while a migration from `legacy_db` runs
//! (README, "Migrating from a legacy single table"); the phase says where reads go and which store is written
//! first.
//!
//! - Legacy primary (`dual_write`, `shard_reads`), outside a transaction
//!   block: the statement runs on legacy inside a transaction that stays open
//!   while the same statement (same generated ids and times) runs on the
//!   shards; then legacy commits. A backfill batch or a repair that locks
//!   those legacy rows therefore never sees a write that is on one store
//!   only. A failed shard write goes to the outbox and the client still gets
//!   legacy's answer.
//! - Shards primary (`shard_writes`): the shards answer, then legacy is
//!   written; its failures go to the outbox.
//! - Inside a transaction block the primary joins the block and the
//!   secondary writes are queued; they run at COMMIT, before the primary
//!   commits (dropped at ROLLBACK).

use bytes::BytesMut;
use shardgate_migrate::{Store, Writes};
use shardgate_router::keys::ShardId;
use shardgate_router::{Routed, RoutedKind, Target};

use super::{End, Session};
use crate::routed::exec::{self, Bound, ExecError, Out, Request};
use crate::backend::query as wire;
use crate::routed::twopc;
use crate::protocol::sqlstate;

/// A write the secondary store still has to get (queued inside a block).
pub(super) struct Secondary {
    plan: Box<Routed>,
    bound: Bound,
    target: Store,
    sql: String,
}

/// The statement for legacy: the client's text, with generated ids for an INSERT.
fn legacy_sql(plan: &Routed, sql: &str) -> String {
    plan.logical.clone().unwrap_or_else(|| sql.to_string())
}

/// Keys of a write for the outbox: the shards and months its plan touches.
fn keys(plan: &Routed) -> (Vec<i32>, Vec<String>) {
    let mut shards: Vec<i32> = plan.targets.iter().map(|t| i32::from(t.shard.0)).collect();
    shards.sort_unstable();
    shards.dedup();
    // a target without months reads every month
    let every = plan.targets.iter().any(|t| t.months.is_empty());
    let mut months: Vec<String> = if every { Vec::new() } else { plan.targets.iter().flat_map(|t| t.months.iter().map(|m| m.suffix())).collect() };
    months.sort();
    months.dedup();
    (shards, months)
}

impl Session {
    /// A plan on one legacy target.
    fn legacy_plan(&self, plan: &Routed, sql: &str) -> Routed {
        let slot = self.shared.engine.legacy_slot();
        Routed {
            kind: plan.kind,
            table: plan.table.clone(),
            targets: vec![Target { shard: ShardId(slot as u8), months: Vec::new(), sql: legacy_sql(plan, sql).into(), params: None, extra: Vec::new() }],
            merge: None,
            generated_ids: plan.generated_ids.clone(),
            row_targets: Vec::new(),
            logical: None,
            // the lookup entries go with the shard-side write
            lookup_rows: Vec::new(),
        }
    }

    /// Runs `routed` to the client (or, `to_client` false, discarding the answer).
    #[allow(clippy::too_many_arguments)]
    async fn run_plan(
        &mut self,
        routed: &Routed,
        bound: &Bound,
        simple: bool,
        visible: Option<usize>,
        tx: Option<&str>,
        to_client: bool,
        direct: bool,
    ) -> Result<Result<(), ExecError>, End> {
        let engine = self.shared.engine.clone();
        let desired = self.desired.clone();
        let sets = move |c: &mut crate::backend::ServerConn| super::param_sets(&desired, c);
        let cancel = self.registration.slot.clone();
        let locals = self.shard_tx.local_sets.clone();
        // a secondary write keeps the stores in step: the client's cancel is not for it
        // (canceled, it would go to the outbox while the client's write stands)
        let req = Request {
            routed,
            bound,
            simple,
            visible,
            tx,
            param_sets: &sets,
            local_sets: &locals,
            down_targets: &[],
            serial: false,
            cancel: to_client.then_some(&*cancel),
            cancel_epoch: self.cancel_epoch,
        };
        let mut scratch = BytesMut::new();
        let keep = self.capture_limit;
        let mut out = if to_client {
            Out { buf: &mut self.cout, client: if keep.is_some() { None } else { Some(&self.client) }, keep, overflow: false, flushed: false, sink: None }
        } else {
            Out { buf: &mut scratch, client: None, keep: None, overflow: false, flushed: false, sink: None }
        };
        let r = if direct { exec::execute_direct(&engine, &mut self.shard_tx.slots, &req, &mut out).await } else { exec::execute(&engine, &mut self.shard_tx.slots, &req, &mut out).await };
        // a portal read in parts kept more than it may (rows, or with its tag and notices after
        // them, which the caller counts too): refused, and a write is rolled back
        // (a secondary write's answer goes to a scratch buffer and is not kept)
        let over = to_client && keep.is_some_and(|k| out.overflow || out.buf.len() > k);
        let r = match r {
            Ok(()) if over => Err(super::extended::portal_too_large(keep.unwrap_or_default())),
            other => other,
        };
        match r {
            Err(ExecError::ClientIo(e)) => Err(End::ClientIo(e)),
            other => Ok(other),
        }
    }

    /// Commits (or rolls back) the legacy transaction a dual-write opened.
    async fn end_legacy_tx(&mut self, commit: bool) -> Result<(), ExecError> {
        let slot = self.shared.engine.legacy_slot();
        let r = match self.shard_tx.slots.get_mut(slot).and_then(Option::as_mut) {
            Some(s) if commit => match wire::control(&mut s.conn, "COMMIT").await {
                Ok(Ok(_)) => {
                    s.in_tx = false;
                    Ok(())
                }
                Ok(Err(e)) => {
                    s.in_tx = false;
                    Err(ExecError::Server(e))
                }
                Err(_) => {
                    s.conn.broken = true;
                    Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "lost the connection to legacy_db while committing; the write's outcome is unknown".into()))
                }
            },
            Some(_) => {
                twopc::rollback(&mut self.shard_tx.slots, &[slot]).await;
                Ok(())
            }
            None => Ok(()),
        };
        exec::release(&mut self.shard_tx.slots);
        r
    }

    /// Ends the shards' transaction of a write held open until its answer was
    /// known to fit (see `run_migrating`): committed (two-phase across several
    /// written shards) or rolled back.
    async fn end_held_shards(&mut self, commit: bool) -> Result<(), ExecError> {
        let in_tx = self.shards_in_block();
        let r = if commit {
            let written: Vec<usize> = in_tx.iter().copied().filter(|&i| self.shard_tx.slots[i].as_ref().is_some_and(|s| s.wrote)).collect();
            if written.len() <= 1 {
                twopc::commit_each(&mut self.shard_tx.slots, &in_tx).await
            } else {
                let readers: Vec<usize> = in_tx.iter().copied().filter(|i| !written.contains(i)).collect();
                let _ = twopc::commit_each(&mut self.shard_tx.slots, &readers).await;
                twopc::commit(&self.shared.engine, &mut self.shard_tx.slots, &written).await
            }
        } else {
            twopc::rollback(&mut self.shard_tx.slots, &in_tx).await;
            Ok(())
        };
        exec::release(&mut self.shard_tx.slots);
        r
    }

    /// Runs a write on its primary store (legacy, else the shards) in a
    /// transaction that commits only if the write and its answer succeeded.
    async fn run_held(&mut self, routed: &Routed, bound: &Bound, simple: bool, visible: Option<usize>, on_legacy: bool) -> Result<Result<(), ExecError>, End> {
        let r = self.run_plan(routed, bound, simple, visible, Some("BEGIN"), true, on_legacy).await?;
        let ended = if on_legacy { self.end_legacy_tx(r.is_ok()).await } else { self.end_held_shards(r.is_ok()).await };
        Ok(r.and(ended))
    }

    /// Writes the secondary store; a failure goes to the outbox.
    async fn apply_secondary(&mut self, plan: &Routed, sql: &str, bound: &Bound, target: Store) {
        let routed = match target {
            Store::Shards => plan.clone(),
            Store::Legacy => self.legacy_plan(plan, sql),
        };
        // the answer is thrown away: text results, no Describe needed
        let b = Bound { result_formats: Vec::new(), ..bound.clone() };
        let r = match self.run_plan(&routed, &b, true, None, None, false, true).await {
            Ok(r) => r,
            Err(_) => Err(ExecError::Proxy(sqlstate::CONNECTION_FAILURE, "client went away".into())),
        };
        if let Err(e) = r {
            let (shards, months) = keys(plan);
            let text = plan.logical.as_deref().or(routed.targets.first().map(|t| &*t.sql)).unwrap_or(sql);
            self.shared.engine.migration.record_outbox(target, text, &shards, &months, &describe(&e)).await;
        }
    }

    /// Runs the queued secondary writes of a block (at COMMIT, before the primary commits).
    pub(super) async fn flush_secondaries(&mut self) {
        for s in std::mem::take(&mut self.shard_tx.secondaries) {
            self.apply_secondary(&s.plan, &s.sql, &s.bound, s.target).await;
        }
    }

    /// Runs a planned statement as the migration phase says.
    pub(super) async fn run_migrating(
        &mut self,
        plan: &Routed,
        sql: &str,
        bound: &Bound,
        simple: bool,
        visible: Option<usize>,
    ) -> Result<Result<(), ExecError>, End> {
        let engine = self.shared.engine.clone();
        let _gate = engine.migration.gate.read().await;
        let Some(phase) = engine.migration.phase() else {
            return Ok(Err(ExecError::Proxy(sqlstate::CANNOT_CONNECT_NOW, "the migration phase is not known yet (db_default unreachable?); retry shortly".into())));
        };
        let in_block = self.in_tx_block();
        let begin = self.shard_tx.begin_sql.clone().unwrap_or_else(|| "BEGIN".into());
        let block_tx = in_block.then_some(begin.as_str());
        let legacy = self.legacy_plan(plan, sql);
        if plan.kind == RoutedKind::Select {
            return if phase.reads_legacy() {
                self.run_plan(&legacy, bound, simple, visible, block_tx, true, true).await
            } else {
                self.run_plan(plan, bound, simple, visible, block_tx, true, false).await
            };
        }
        // A write whose answer is kept to be read in parts (an Execute with a row limit
        // outside a block) is refused if that answer turns out too large to keep: by then it
        // must not have committed anywhere, so the primary's transaction stays open until
        // the answer is in (legacy's already does while the shards are written)
        let held = !in_block && self.capture_limit.is_some();
        match phase.writes() {
            Writes::LegacyOnly if held => self.run_held(&legacy, bound, simple, visible, true).await,
            Writes::LegacyOnly => self.run_plan(&legacy, bound, simple, visible, block_tx, true, true).await,
            Writes::ShardsOnly if held => self.run_held(plan, bound, simple, visible, false).await,
            Writes::ShardsOnly => self.run_plan(plan, bound, simple, visible, block_tx, true, false).await,
            Writes::LegacyThenShards | Writes::ShardsThenLegacy if in_block => {
                let (primary, target, direct) = match phase.writes() {
                    Writes::LegacyThenShards => (&legacy, Store::Shards, true),
                    _ => (plan, Store::Legacy, false),
                };
                let r = self.run_plan(primary, bound, simple, visible, block_tx, true, direct).await?;
                if r.is_ok() {
                    self.shard_tx.secondaries.push(Secondary { plan: Box::new(plan.clone()), bound: bound.clone(), target, sql: sql.to_string() });
                }
                Ok(r)
            }
            Writes::LegacyThenShards => {
                // legacy's transaction stays open until the shards have the write
                let r = self.run_plan(&legacy, bound, simple, visible, Some("BEGIN"), true, true).await?;
                if let Err(e) = r {
                    let _ = self.end_legacy_tx(false).await;
                    return Ok(Err(e));
                }
                self.apply_secondary(plan, sql, bound, Store::Shards).await;
                match self.end_legacy_tx(true).await {
                    Ok(()) => Ok(Ok(())),
                    Err(e) => {
                        // the shards may hold a write legacy does not: compare them again
                        let (shards, months) = keys(plan);
                        engine.migration.record_outbox(Store::Shards, sql, &shards, &months, &format!("legacy commit failed: {}", describe(&e))).await;
                        Ok(Err(e))
                    }
                }
            }
            Writes::ShardsThenLegacy => {
                let r = if held {
                    self.run_held(plan, bound, simple, visible, false).await?
                } else {
                    self.run_plan(plan, bound, simple, visible, None, true, false).await?
                };
                if r.is_ok() {
                    self.apply_secondary(plan, sql, bound, Store::Legacy).await;
                }
                Ok(r)
            }
        }
    }
}

/// An error, short, for the outbox.
fn describe(e: &ExecError) -> String {
    match e {
        ExecError::Server(s) => format!("SQLSTATE {}: {}", s.code, crate::protocol::backend::parse_error_fields(&s.raw[5..]).message),
        ExecError::Proxy(code, m) => format!("SQLSTATE {code}: {m}"),
        ExecError::Unreachable(s) => format!("shard db_{s} unreachable"),
        ExecError::CatchUp(s) => format!("shard db_{s} catching up"),
        ExecError::DownMissed(s) => format!("shard db_{s} down: no fallback row matched"),
        ExecError::ClientIo(e) => format!("client I/O: {e}"),
    }
}
