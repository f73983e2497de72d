//! Transaction end for both protocols: COMMIT, ROLLBACK and their spellings, the
//! shards' part of a block (one shard or two-phase), db_default's part, batch
//! transactions of several statements in one Query.

use super::routing::*;
use super::{End, Flow, Session};
use crate::protocol::backend::{self as msg};
use crate::protocol::codec::{put_cstr, put_message};
use crate::routed::exec::{self, ExecError};
use crate::backend::query as wire;
use crate::routed::twopc;
use crate::protocol::sqlstate;

/// What the client's transaction-control statement does to held shards.
pub(super) enum TxVerb {
    Commit,
    Rollback,
    /// SAVEPOINT / ROLLBACK TO / RELEASE / PREPARE TRANSACTION / COMMIT PREPARED
    /// (the word names it): refused while shards take part.
    Unsupported(&'static str),
    /// Several statements in one string, one of them transaction control: refused
    /// while shards take part (the shards could not end in step with `db_default`).
    Mixed,
    Other,
}

pub(super) fn tx_verb(sql: &str) -> TxVerb {
    use shardgate_router::TxControl as T;
    match shardgate_router::transaction_control(sql) {
        T::Commit => TxVerb::Commit,
        T::Rollback => TxVerb::Rollback,
        T::Unsupported(what) => TxVerb::Unsupported(what),
        T::Mixed => TxVerb::Mixed,
        T::None | T::Begin => TxVerb::Other,
    }
}

pub(super) const NO_SAVEPOINTS: &str = "savepoints, PREPARE TRANSACTION and COMMIT/ROLLBACK PREPARED are not supported in a transaction that touched t_order; use a plain BEGIN … COMMIT";

pub(super) const NO_MIXED: &str = "COMMIT/ROLLBACK inside a string of several statements is not supported in a transaction that touched t_order; send COMMIT or ROLLBACK as a statement of its own";

impl Session {
    /// Ends the shards' part of an extended batch's implicit transaction at
    /// its Sync: committed (two-phase across several written shards) when the
    /// batch ran without error, else rolled back. A failed commit is reported
    /// before the Sync's ReadyForQuery, with `db_default`'s part failed too.
    pub(super) async fn end_batch_tx(&mut self) -> Result<(), End> {
        self.barrier().await?;
        self.shard_tx.batch_tx = false;
        if self.in_tx_block() {
            // a BEGIN later in the batch made the whole block explicit (as in PostgreSQL): the
            // shards' part now ends with the client's COMMIT or ROLLBACK, not at this Sync
            return Ok(());
        }
        if self.discard_until_sync || self.db.server_skipping || (self.db.server.is_some() && self.tx_status == b'E') {
            self.rollback_shard_part().await;
            return Ok(());
        }
        self.routed.suspended.clear();
        let in_tx = self.shards_in_block();
        let written: Vec<usize> = in_tx.iter().copied().filter(|&i| self.shard_tx.slots[i].as_ref().is_some_and(|s| s.wrote)).collect();
        if !written.is_empty() && self.db.server.is_some() && self.db.sent_since_sync {
            // the batch also ran statements on db_default (an outbox row, say), whose implicit
            // transaction commits at this Sync: it carries the decision of a two-phase commit
            // of the written shards, so the shards and db_default end the same way
            return self.commit_batch_carried(&in_tx, &written).await;
        }
        let r = if written.len() <= 1 {
            twopc::commit_each(&mut self.shard_tx.slots, &in_tx).await
        } else {
            let readers: Vec<usize> = in_tx.iter().copied().filter(|i| !written.contains(i)).collect();
            let _ = twopc::commit_each(&mut self.shard_tx.slots, &readers).await;
            twopc::commit(&self.shared.engine, &mut self.shard_tx.slots, &written).await
        };
        exec::release(&mut self.shard_tx.slots);
        if let Err(e) = r {
            self.fail_extended(e).await?;
        }
        Ok(())
    }

    /// Ends an extended batch's implicit transaction that wrote shards and used
    /// `db_default`: the written shards are prepared, then the decision row is
    /// written by a simple Query in `db_default`'s implicit transaction, which
    /// PostgreSQL commits at the end of that Query together with everything the
    /// batch did there. A failure there (a deferred constraint, say) rolls all
    /// of it back and the prepared shards with it.
    pub(super) async fn commit_batch_carried(&mut self, in_tx: &[usize], written: &[usize]) -> Result<(), End> {
        let readers: Vec<usize> = in_tx.iter().copied().filter(|i| !written.contains(i)).collect();
        let _ = twopc::commit_each(&mut self.shard_tx.slots, &readers).await;
        let engine = self.shared.engine.clone();
        let gid = twopc::new_gid(engine.worker());
        let prepared = twopc::prepare(&engine, &mut self.shard_tx.slots, written, &gid).await;
        exec::release(&mut self.shard_tx.slots);
        if let Err(e) = prepared {
            return self.fail_extended(e).await;
        }
        let server = self.db.server.as_mut().expect("checked by the caller");
        match wire::control(server, &twopc::decision_sql(&gid, written)).await {
            Ok(Ok(_)) => {
                twopc::crash_point("after_decision");
                twopc::resolve(&engine, &gid, written, true).await;
                Ok(())
            }
            Ok(Err(e)) => {
                twopc::resolve(&engine, &gid, written, false).await;
                self.fail_extended(twopc::decision_failed(e)).await
            }
            Err(_) => {
                // the decision's fate is unknown: recovery resolves it from the log
                self.server_lost().map(|_| ())
            }
        }
    }

    /// A COMMIT or ROLLBACK ends the block's SET LOCALs (also with AND CHAIN,
    /// where db_default stays in a block).
    pub(super) fn end_local_sets(&mut self, verb: &TxVerb) {
        if matches!(verb, TxVerb::Commit | TxVerb::Rollback) {
            self.shard_tx.local_sets.clear();
        }
    }

    /// Transaction status as the client must see it.
    pub(super) fn logical_status(&self) -> u8 {
        if self.db.server.is_some() {
            self.tx_status
        } else {
            b'I'
        }
    }

    pub(super) fn in_tx_block(&self) -> bool {
        self.db.server.is_some() && self.tx_status != b'I'
    }

    /// Aborts the open `db_default` transaction with a failing statement.
    pub(super) async fn abort_default(&mut self) -> Result<(), End> {
        let server = self.db.server.as_mut().expect("in a transaction block");
        match wire::control(server, FAIL_SQL).await {
            Ok(_) => self.tx_status = b'E',
            Err(_) => return self.server_lost(),
        }
        Ok(())
    }

    /// PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK.
    pub(super) fn effective_verb(&self, v: TxVerb) -> TxVerb {
        match v {
            TxVerb::Commit if self.tx_status == b'E' => TxVerb::Rollback,
            // what db_default answers as PostgreSQL would, the shards untouched: RELEASE
            // (it undoes nothing), COMMIT/ROLLBACK PREPARED (25001 in a block), and in a
            // failed block SAVEPOINT (25P02 there too). ROLLBACK TO stays refused: the
            // proxy cannot tell for sure which savepoints db_default holds (one made before
            // the shards joined would roll db_default back and leave the shards' writes),
            // and so does PREPARE TRANSACTION
            TxVerb::Unsupported("RELEASE SAVEPOINT" | "COMMIT PREPARED" | "ROLLBACK PREPARED") => TxVerb::Other,
            TxVerb::Unsupported("SAVEPOINT") if self.tx_status == b'E' => TxVerb::Other,
            v => v,
        }
    }

    /// Shards inside the client's transaction block.
    pub(super) fn shards_in_block(&self) -> Vec<usize> {
        self.shard_tx.slots.iter().enumerate().filter(|(_, s)| s.as_ref().is_some_and(|s| s.in_tx)).map(|(i, _)| i).collect()
    }

    /// ROLLBACK (or COMMIT of an aborted block) on every shard of the block.
    pub(super) async fn rollback_shard_part(&mut self) {
        self.routed.end_portals();
        self.shard_tx.secondaries.clear();
        let in_tx = self.shards_in_block();
        twopc::rollback(&mut self.shard_tx.slots, &in_tx).await;
        exec::release(&mut self.shard_tx.slots);
    }

    /// The shards' part of a COMMIT, before `db_default` commits: read-only shards
    /// and a single written shard commit; several written shards are prepared
    /// (two-phase commit) and `Some((gid, written))` says the decision is still to
    /// be made. On an error every shard is rolled back and released.
    pub(super) async fn commit_shard_part(&mut self) -> Result<Option<(String, Vec<usize>)>, ExecError> {
        self.routed.end_portals();
        // a migration's queued secondary writes go first, while the primary's locks are held
        self.flush_secondaries().await;
        let in_tx = self.shards_in_block();
        let written: Vec<usize> = in_tx.iter().copied().filter(|&i| self.shard_tx.slots[i].as_ref().is_some_and(|s| s.wrote)).collect();
        // one written shard commits alone, unless the client's own db_default transaction
        // wrote too (an order update plus an outbox row): then both take part in two-phase
        // commit, the decision riding on the client's COMMIT
        if written.is_empty() || (written.len() == 1 && !self.default_wrote().await) {
            let r = twopc::commit_each(&mut self.shard_tx.slots, &in_tx).await;
            exec::release(&mut self.shard_tx.slots);
            return r.map(|()| None);
        }
        let readers: Vec<usize> = in_tx.iter().copied().filter(|i| !written.contains(i)).collect();
        let _ = twopc::commit_each(&mut self.shard_tx.slots, &readers).await;
        let gid = twopc::new_gid(self.shared.engine.worker());
        let r = twopc::prepare(&self.shared.engine, &mut self.shard_tx.slots, &written, &gid).await;
        exec::release(&mut self.shard_tx.slots);
        r.map(|()| Some((gid, written)))
    }

    /// Whether the client's `db_default` transaction has written anything (it has
    /// a transaction id). Unknown counts as written: two-phase commit is never wrong.
    pub(super) async fn default_wrote(&mut self) -> bool {
        let Some(server) = self.db.server.as_mut() else { return false };
        match wire::control(server, "SELECT (pg_current_xact_id_if_assigned() IS NOT NULL)::text").await {
            Ok(Ok(rows)) => rows.first().cloned().flatten().as_deref() != Some("false"),
            _ => true,
        }
    }

    /// COMMIT / ROLLBACK / savepoints while shards take part (simple protocol).
    pub(super) async fn end_transaction(&mut self, sql: &str) -> Result<Option<Flow>, End> {
        let verb = self.effective_verb(tx_verb(sql));
        if !self.shard_tx.pending_2pc.is_empty() && matches!(verb, TxVerb::Commit | TxVerb::Rollback) && shardgate_router::and_chain(sql) {
            // the chained block would keep the pending decision's shards prepared
            let m = "COMMIT/ROLLBACK AND CHAIN cannot follow a COMMIT that is bound but not executed yet; execute that COMMIT first".to_string();
            self.fail_simple(ExecError::Proxy(sqlstate::FEATURE_NOT_SUPPORTED, m)).await?;
            return Ok(Some(Flow::Continue));
        }
        self.end_local_sets(&verb);
        match verb {
            TxVerb::Commit => {
                // the shards first, then db_default
                let (gid, written) = match self.commit_shard_part().await {
                    Ok(None) => return Ok(None),
                    Ok(Some(p)) => p,
                    Err(e) => {
                        self.rollback_default().await?;
                        self.cout.extend_from_slice(&error_frame(&e));
                        msg::ready_for_query(&mut self.cout, b'I');
                        return Ok(Some(Flow::Continue));
                    }
                };
                // the decision commits with the client's own db_default transaction; the
                // prepared shard transactions are then resolved on fresh connections.
                // COMMIT AND CHAIN opens the next block at once, as the client asked
                let chain = shardgate_router::and_chain(sql);
                let engine = self.shared.engine.clone();
                let server = self.db.server.as_mut().expect("in a transaction block");
                let decided = match wire::control(server, &twopc::decision_sql(&gid, &written)).await {
                    Ok(Ok(_)) => match wire::control(server, if chain { "COMMIT AND CHAIN" } else { "COMMIT" }).await {
                        // an error of the COMMIT itself (a deferred constraint) is the client's own
                        Ok(r) => r.map_err(ExecError::Server),
                        // the decision's fate is unknown: recovery resolves it from the log
                        Err(_) => return self.server_lost().map(|_| None),
                    },
                    Ok(Err(e)) => {
                        wire::rollback(server).await;
                        Err(twopc::decision_failed(e))
                    }
                    Err(_) => {
                        // the decision may have committed before the connection broke (or may
                        // still): never roll back here; recovery resolves it from the log,
                        // racing the decision with its abort marker
                        return self.server_lost().map(|_| None);
                    }
                };
                let status = if chain && decided.is_ok() { b'T' } else { b'I' };
                self.set_tx_status(status);
                // the committed block's portals and savepoints are gone in the chained one too
                self.forget_tx_portals_before(u64::MAX);
                self.shard_tx.local_marks.clear();
                match decided {
                    Ok(_) => {
                        // the proxy's own COMMIT: no ReadyForQuery of db_default shows it to the cache
                        if chain {
                            self.cache_on_commit();
                        } else {
                            self.cache_on_ready(b'I');
                        }
                        twopc::crash_point("after_decision");
                        twopc::resolve(&engine, &gid, &written, true).await;
                        put_message(&mut self.cout, b'C', |o| put_cstr(o, b"COMMIT"));
                    }
                    Err(e) => {
                        twopc::resolve(&engine, &gid, &written, false).await;
                        self.cout.extend_from_slice(&error_frame(&e));
                    }
                }
                msg::ready_for_query(&mut self.cout, status);
                Ok(Some(Flow::Continue))
            }
            other => self.end_without_commit(other, true).await,
        }
    }

    /// What both protocols do with a statement that ends no commit while shards
    /// take part: savepoints and mixed strings are refused, ROLLBACK rolls the
    /// shards' part back (db_default then runs it as sent), anything else goes on.
    async fn end_without_commit(&mut self, verb: TxVerb, simple: bool) -> Result<Option<Flow>, End> {
        let refusal = match verb {
            TxVerb::Unsupported(_) => NO_SAVEPOINTS,
            TxVerb::Mixed => NO_MIXED,
            TxVerb::Rollback => {
                self.rollback_shard_part().await;
                return Ok(None);
            }
            TxVerb::Other | TxVerb::Commit => return Ok(None),
        };
        self.fail(simple, ExecError::Proxy(sqlstate::FEATURE_NOT_SUPPORTED, refusal.into())).await?;
        Ok(Some(Flow::Continue))
    }

    /// COMMIT / ROLLBACK sent with the extended protocol while shards take
    /// part: the shards' part is done when the Parse arrives (drivers send
    /// Parse/Bind/Execute/Sync together); the statement then runs on
    /// `db_default` as sent. With several written shards the decision row is
    /// written inside the client's transaction, and the prepared shard
    /// transactions are resolved as soon as `db_default` reports the end of it.
    /// `Some` when the Parse was answered here (an error).
    pub(super) async fn extended_tx_end(&mut self, query: &[u8]) -> Result<Option<Flow>, End> {
        let Ok(text) = std::str::from_utf8(query) else {
            self.refuse_extended(sqlstate::FEATURE_NOT_SUPPORTED, NOT_UTF8.into()).await?;
            return Ok(Some(Flow::Continue));
        };
        if matches!(tx_verb(text), TxVerb::Other) {
            return Ok(None);
        }
        self.barrier().await?;
        if self.db.server_skipping {
            self.discard_until_sync = true;
            return Ok(Some(Flow::Continue));
        }
        // read after the barrier: a failure pipelined ahead of a COMMIT has failed the
        // block by now (the COMMIT is then a ROLLBACK), though it had not when it arrived
        let verb = self.effective_verb(tx_verb(text));
        if matches!(verb, TxVerb::Other) {
            return Ok(None);
        }
        self.end_local_sets(&verb);
        match verb {
            TxVerb::Commit => {
                let (gid, written) = match self.commit_shard_part().await {
                    Ok(None) => return Ok(None),
                    Ok(Some(p)) => p,
                    Err(e) => {
                        self.rollback_default().await?;
                        self.fail_extended(e).await?;
                        return Ok(Some(Flow::Continue));
                    }
                };
                let server = self.db.server.as_mut().expect("in a transaction block");
                match wire::control(server, &twopc::decision_sql(&gid, &written)).await {
                    Ok(Ok(_)) => {
                        // the client's COMMIT makes the decision durable; resolved at its ReadyForQuery
                        self.shard_tx.pending_2pc.push((gid, written));
                        Ok(None)
                    }
                    Ok(Err(e)) => {
                        twopc::resolve(&self.shared.engine, &gid, &written, false).await;
                        self.abort_default().await?;
                        self.fail_extended(twopc::decision_failed(e)).await?;
                        Ok(Some(Flow::Continue))
                    }
                    Err(_) => {
                        twopc::resolve(&self.shared.engine, &gid, &written, false).await;
                        self.server_lost().map(|_| None)
                    }
                }
            }
            other => self.end_without_commit(other, false).await,
        }
    }

    /// Resolves a two-phase commit whose decision rode on the client's own
    /// COMMIT: committed if the decision row exists now, rolled back if not.
    pub(super) async fn resolve_pending_2pc(&mut self) {
        for (gid, shards) in std::mem::take(&mut self.shard_tx.resolve_2pc) {
            let engine = self.shared.engine.clone();
            match twopc::decided(&engine, &gid).await {
                Some(commit) => twopc::resolve(&engine, &gid, &shards, commit).await,
                // unknown is not "no": a decision that committed must never be rolled back
                None => tracing::warn!(gid, "could not read the commit decision; recovery will resolve the prepared transactions"),
            }
        }
    }

    pub(super) async fn rollback_default(&mut self) -> Result<(), End> {
        if let Some(server) = self.db.server.as_mut() {
            if wire::control(server, "ROLLBACK").await.is_err() {
                return self.server_lost();
            }
            self.set_tx_status(b'I');
        }
        Ok(())
    }
}
