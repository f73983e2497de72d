//! The parts a session is made of, each with its own state: the db_default
//! link, the shards' part of the transaction, prepared statements on sharded
//! tables, and what is held for the cache. (The client link is the session
//! itself: its stream, buffers and timers.)

use super::*;

/// The session's link to db_default: the server connection held, what is queued for it and what it owes.
#[derive(Default)]
pub(super) struct DbLink {
    /// The server connection held now, if any.
    pub(super) server: Option<Server>,
    /// Bytes queued for the server.
    pub(super) sout: BytesMut,
    /// Replies the server owes, in order.
    pub(super) expect: VecDeque<Expect>,
    /// Sync/Query messages forwarded whose ReadyForQuery has not come back.
    pub(super) pending_ready: u32,
    /// Extended-protocol messages forwarded since the last Sync.
    pub(super) sent_since_sync: bool,
    /// The client's named prepared statements.
    pub(super) statements: HashMap<Vec<u8>, Statement, foldhash::quality::RandomState>,
    /// The client's unnamed statement when it is an ordinary one: its last Parse
    /// of the unnamed statement, as sent, to send again ahead of a Bind or
    /// Describe of it on a server connection that does not have it (another
    /// client's may be there). `None`: the client has none.
    pub(super) unnamed: Option<Bytes>,
    /// `unnamed` is transaction control (see `Statement::tx_control`).
    pub(super) unnamed_tx: bool,
    /// Where `unnamed` was last parsed: the checkout (see `checkouts`) and the
    /// connection's `own_sends` then. The held connection has it only while both
    /// are unchanged (the proxy's own queries and its failing Parse replace it).
    pub(super) unnamed_at: Option<(u64, u64)>,
    /// Server connections checked out so far by this session.
    pub(super) checkouts: u64,
    /// Portals the client bound to a transaction-control statement (COMMIT,
    /// ROLLBACK, SAVEPOINT, …), with its text and the `client_seq` of the
    /// Bind: executed while shards take part, the shards' part ends with it.
    /// Portals end with their transaction, and so do these: at a block's end
    /// those bound before it are forgotten (the client may be batches ahead of
    /// the replies, so a later batch's are kept).
    pub(super) tx_portals: HashMap<Vec<u8>, TxPortal, foldhash::quality::RandomState>,
    /// Client messages handled so far (stamps `tx_portals` and ReadyForQuerys).
    pub(super) client_seq: u64,
    /// The simple Query (its `client_seq`) whose string ends a block: its
    /// portals are forgotten at the CommandComplete of that end.
    pub(super) block_end_query: Option<u64>,
    /// The server reported an error and skips messages until the next Sync,
    /// which the client has not sent yet: Parse/Close sent until then get no reply.
    pub(super) server_skipping: bool,
    /// The server is in COPY FROM STDIN mode (ignoring Sync until CopyDone/CopyFail);
    /// `Some(true)` when the COPY came from the extended protocol, which still owes a Sync after it.
    pub(super) copy_in: Option<bool>,
}

/// The shards' part of the client's transaction: connections held, the block's BEGIN and SET LOCALs, two-phase commits riding on a COMMIT.
#[derive(Default)]
pub(super) struct ShardTx {
    /// Shard connections held (inside a transaction block, or during one statement).
    pub(super) slots: crate::routed::exec::Slots,
    /// Secondary writes of the open block, run at COMMIT (migration dual-write).
    pub(super) secondaries: Vec<migrating::Secondary>,
    /// Shards joined the implicit transaction of the current extended batch
    /// (writes before one Sync apply together, as in PostgreSQL): ended at the Sync.
    pub(super) batch_tx: bool,
    /// The client's BEGIN text, repeated on shards that join the transaction.
    pub(super) begin_sql: Option<String>,
    /// The open block's `SET LOCAL`s of tracked parameters, for the shards that
    /// join it (cleared when the block ends).
    pub(super) local_sets: Vec<(String, Option<String>)>,
    /// Savepoints of the open block and how many `local_sets` were made
    /// before each: `ROLLBACK TO` one undoes the `SET LOCAL`s after it.
    pub(super) local_marks: Vec<(String, usize)>,
    /// A two-phase commit whose decision row rides on the client's COMMIT (extended protocol).
    /// (Several, when shards joined again after a COMMIT was bound and before it ran.)
    pub(super) pending_2pc: Vec<(String, Vec<usize>)>,
    /// That COMMIT has ended on db_default: resolve the prepared shard transactions.
    pub(super) resolve_2pc: Vec<(String, Vec<usize>)>,
}

/// The client's prepared statements and portals on sharded tables (answered by the proxy), and portals read in parts.
#[derive(Default)]
pub(super) struct RoutedPrepared {
    /// The client's prepared statements on sharded tables (answered by the proxy).
    pub(super) routed_stmts: HashMap<Vec<u8>, Arc<routing::RoutedStmt>, foldhash::quality::RandomState>,
    /// Portals bound to those statements.
    pub(super) routed_portals: HashMap<Vec<u8>, routing::RoutedPortal, foldhash::quality::RandomState>,
    /// Routed portals read in parts (Execute with a row limit): the rows not yet sent.
    pub(super) suspended: HashMap<Vec<u8>, routing::Suspended, foldhash::quality::RandomState>,
    /// A portal read in parts inside a block, streaming from its own task
    /// (which holds the shard connections meanwhile).
    pub(super) stream: Option<streaming::Streaming>,
    /// The next routed SELECT is to start streaming instead of running inline.
    pub(super) stream_next: bool,
}

impl RoutedPrepared {
    /// The transaction the routed portals belong to has ended: PostgreSQL drops
    /// its portals, so a later Execute of one gets 34000, never a second run.
    pub(super) fn end_portals(&mut self) {
        self.suspended.clear();
        self.routed_portals.clear();
    }
}

/// What the session holds for the cache: statements that write cached tables, invalidations waiting for their transaction to end.
#[derive(Default)]
pub(super) struct CacheHold {
    /// The client's prepared statements that write a cached table.
    pub(super) cache_write_stmts: HashMap<Vec<u8>, cached::CacheWrites, foldhash::quality::RandomState>,
    /// Cache invalidations waiting for their transaction to end, each with the
    /// number of ReadyForQuerys owed before its statement's own.
    pub(super) cache_pending: Vec<(u32, crate::cache::Invalidation)>,
    /// The open transaction wrote a cached table: its point reads skip the cache.
    pub(super) cache_tx_wrote: bool,
    /// Committed invalidations are waiting to be sent to Redis and the other proxies.
    pub(super) cache_flush: bool,
    /// `db_default` answered COMMIT since its last ReadyForQuery.
    pub(super) commit_seen: bool,
}

/// A portal the client bound to a transaction-control statement (see `DbLink::tx_portals`).
#[derive(Debug, Clone)]
pub(super) struct TxPortal {
    /// The statement's text.
    pub(super) text: String,
    /// The `client_seq` of the Bind.
    pub(super) seq: u64,
    /// The unnamed portal only: `unnamed_here()` at the Bind. The proxy's own
    /// queries since then dropped it on `db_default`, where PostgreSQL keeps it.
    pub(super) bound_at: Option<(u64, u64)>,
    /// The unnamed portal only: a ROLLBACK TO ran since its Bind, which drops it
    /// in PostgreSQL if its savepoint is older than the Bind (unknown here).
    pub(super) uncertain: bool,
}

impl Drop for DbLink {
    /// A session that panicked mid-statement (a bug, never client input by
    /// design) may leave its server inside a transaction, pinned state or an
    /// answer half read: it is closed, never handed to the next client.
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(server) = self.server.as_mut() {
                server.broken = true;
            }
        }
    }
}

impl DbLink {
    /// Nothing is queued for, owed by or running on db_default (the
    /// transaction status is the session's to judge).
    pub(super) fn idle(&self) -> bool {
        self.pending_ready == 0 && !self.sent_since_sync && self.expect.is_empty() && self.copy_in.is_none()
    }
}

impl ShardTx {
    /// Savepoints and block ends on `db_default` (no shard takes part; with
    /// shards they are handled, or refused, before this): `SET LOCAL`s made
    /// after a savepoint end with `ROLLBACK TO` it, and all of them end with
    /// the block, `COMMIT AND CHAIN` too (whose new block keeps the status).
    pub(super) fn note_block_step(&mut self, text: &str) {
        use shardgate_router::{SavepointOp, TxControl};
        match shardgate_router::savepoint_op(text) {
            Some(SavepointOp::Define(name)) => self.local_marks.push((name, self.local_sets.len())),
            Some(SavepointOp::RollbackTo(name)) => {
                if let Some(i) = self.local_marks.iter().rposition(|(n, _)| *n == name) {
                    // the savepoint stays; later ones are gone
                    self.local_marks.truncate(i + 1);
                    let keep = self.local_marks[i].1;
                    self.local_sets.truncate(keep);
                }
            }
            Some(SavepointOp::Release(name)) => {
                if let Some(i) = self.local_marks.iter().rposition(|(n, _)| *n == name) {
                    self.local_marks.truncate(i);
                }
            }
            None => {
                if matches!(shardgate_router::transaction_control(text), TxControl::Commit | TxControl::Rollback) {
                    self.local_sets.clear();
                    self.local_marks.clear();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tx: &mut ShardTx, name: &str) {
        tx.local_sets.push((name.into(), Some("x".into())));
    }

    #[test]
    fn set_local_follows_savepoints_and_the_block() {
        let mut tx = ShardTx::default();
        set(&mut tx, "a");
        tx.note_block_step("SAVEPOINT s1");
        set(&mut tx, "b");
        tx.note_block_step("savepoint s2");
        set(&mut tx, "c");
        tx.note_block_step("ROLLBACK TO SAVEPOINT s1");
        let names = |tx: &ShardTx| tx.local_sets.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&tx), ["a"], "ROLLBACK TO undoes the SET LOCALs after its savepoint");
        assert_eq!(tx.local_marks.len(), 1, "the savepoint itself stays, later ones are gone");
        set(&mut tx, "d");
        tx.note_block_step("RELEASE s1");
        assert_eq!(names(&tx), ["a", "d"], "RELEASE keeps them");
        assert!(tx.local_marks.is_empty());
        tx.note_block_step("SELECT 1");
        assert_eq!(names(&tx).len(), 2);
        tx.note_block_step("COMMIT");
        assert!(tx.local_sets.is_empty() && tx.local_marks.is_empty(), "the block's end clears them");
    }

    #[test]
    fn the_link_is_idle_only_when_nothing_is_owed() {
        let mut l = DbLink::default();
        assert!(l.idle());
        l.pending_ready = 1;
        assert!(!l.idle());
        l.pending_ready = 0;
        l.copy_in = Some(false);
        assert!(!l.idle());
    }
}
