//! The migration's phases and which step may run in which (pure: no I/O).
//!
//! ```text
//! (none) ─prepare─► prepared ─dual-write─► dual_write ─backfill, verify─► ─switch-reads─► shard_reads
//!        ─switch-writes─► shard_writes ─finalize─► finalized
//! rollback: prepared | dual_write | shard_reads | shard_writes ─► rolled_back (legacy only again)
//! ```

use std::fmt;

/// Where the proxies send `t_order` traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// No migration has started: legacy is the only store.
    Legacy,
    /// Month tables exist on the shards; legacy is still the only store written.
    Prepared,
    /// Writes go to legacy, then to the shards; reads from legacy.
    DualWrite,
    /// Writes still legacy first; reads from the shards.
    ShardReads,
    /// Writes go to the shards, then to legacy (kept in step for rollback); reads from the shards.
    ShardWrites,
    /// The shards alone.
    Finalized,
    /// Back to legacy alone after a rollback.
    RolledBack,
}

impl Phase {
    /// Name stored in the control table.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Legacy => "legacy",
            Phase::Prepared => "prepared",
            Phase::DualWrite => "dual_write",
            Phase::ShardReads => "shard_reads",
            Phase::ShardWrites => "shard_writes",
            Phase::Finalized => "finalized",
            Phase::RolledBack => "rolled_back",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Phase> {
        [Phase::Legacy, Phase::Prepared, Phase::DualWrite, Phase::ShardReads, Phase::ShardWrites, Phase::Finalized, Phase::RolledBack]
            .into_iter()
            .find(|p| p.name() == s)
    }

    /// Reads are answered by legacy.
    pub fn reads_legacy(self) -> bool {
        matches!(self, Phase::Legacy | Phase::Prepared | Phase::DualWrite | Phase::RolledBack)
    }

    /// Where writes go, primary first.
    pub fn writes(self) -> Writes {
        match self {
            Phase::Legacy | Phase::Prepared | Phase::RolledBack => Writes::LegacyOnly,
            Phase::DualWrite | Phase::ShardReads => Writes::LegacyThenShards,
            Phase::ShardWrites => Writes::ShardsThenLegacy,
            Phase::Finalized => Writes::ShardsOnly,
        }
    }

    /// The store that is the source of truth (verify compares the other against it).
    pub fn primary(self) -> Store {
        match self.writes() {
            Writes::LegacyOnly | Writes::LegacyThenShards => Store::Legacy,
            Writes::ShardsThenLegacy | Writes::ShardsOnly => Store::Shards,
        }
    }

    fn rank(self) -> u8 {
        match self {
            Phase::Legacy | Phase::RolledBack => 0,
            Phase::Prepared => 1,
            Phase::DualWrite => 2,
            Phase::ShardReads => 3,
            Phase::ShardWrites => 4,
            Phase::Finalized => 5,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a phase sends writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Legacy alone.
    LegacyOnly,
    /// Legacy (the client's answer), then the shards (failures go to the outbox).
    LegacyThenShards,
    /// The shards (the client's answer), then legacy (failures go to the outbox).
    ShardsThenLegacy,
    /// The shards alone.
    ShardsOnly,
}

/// One of the two stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The legacy single table.
    Legacy,
    /// The shards' month tables.
    Shards,
}

impl Store {
    /// Name stored in the outbox.
    pub fn name(self) -> &'static str {
        match self {
            Store::Legacy => "legacy",
            Store::Shards => "shards",
        }
    }

    /// The other store.
    pub fn other(self) -> Store {
        match self {
            Store::Legacy => Store::Shards,
            Store::Shards => Store::Legacy,
        }
    }
}

/// A CLI step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create month tables, indexes, fallback and control tables.
    Prepare,
    /// Enter dual-write.
    DualWrite,
    /// Copy history.
    Backfill,
    /// Compare (and optionally repair).
    Verify,
    /// Reads from the shards.
    SwitchReads,
    /// Shards primary.
    SwitchWrites,
    /// Legacy no longer written.
    Finalize,
    /// Back to legacy.
    Rollback,
}

impl Step {
    /// The command name.
    pub fn command(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::DualWrite => "dual-write",
            Step::Backfill => "backfill",
            Step::Verify => "verify",
            Step::SwitchReads => "switch-reads",
            Step::SwitchWrites => "switch-writes",
            Step::Finalize => "finalize",
            Step::Rollback => "rollback",
        }
    }
}

/// What the control table says, as far as ordering is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Current phase.
    pub phase: Phase,
    /// Backfill copied every legacy merchant.
    pub backfill_done: bool,
    /// The last verify ran after the backfill finished and found no difference.
    pub verified_clean: bool,
    /// Outbox entries not applied yet.
    pub outbox_pending: i64,
}

/// Whether a step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it; the phase it sets afterwards, if any.
    Run(Option<Phase>),
    /// Already done: nothing to do (exit 0).
    Done(String),
    /// Out of order: the message says what must run first (non-zero exit).
    Refuse(String),
}

/// Decides whether `step` may run now.
pub fn decide(step: Step, f: &Facts) -> Decision {
    use Decision::{Done, Refuse, Run};
    let p = f.phase;
    let past = |what: &str| Done(format!("{what} is already done (phase {p}); nothing to do"));
    match step {
        Step::Prepare => match p {
            Phase::Legacy | Phase::Prepared | Phase::RolledBack => Run(Some(Phase::Prepared)),
            _ => past("prepare"),
        },
        Step::DualWrite => match p {
            Phase::Prepared => Run(Some(Phase::DualWrite)),
            Phase::Legacy | Phase::RolledBack => Refuse(format!("phase is {p}: run `prepare` first")),
            _ => past("dual-write"),
        },
        Step::Backfill => match p {
            Phase::DualWrite if f.backfill_done => Done("backfill already copied every merchant; nothing to do".into()),
            Phase::DualWrite => Run(None),
            Phase::Legacy | Phase::RolledBack => Refuse(format!("phase is {p}: run `prepare`, then `dual-write`, first")),
            Phase::Prepared => Refuse("phase is prepared: run `dual-write` first, so that no write made during the copy is missed".into()),
            _ => past("backfill"),
        },
        Step::Verify => match p {
            Phase::DualWrite if !f.backfill_done => Refuse("the backfill has not finished: run `backfill` first".into()),
            Phase::DualWrite | Phase::ShardReads | Phase::ShardWrites => Run(None),
            Phase::Finalized => Refuse("phase is finalized: legacy is no longer written, there is nothing to compare".into()),
            _ => Refuse(format!("phase is {p}: run `prepare`, `dual-write` and `backfill` first")),
        },
        Step::SwitchReads => match p {
            Phase::DualWrite if !f.backfill_done => Refuse("the backfill has not finished: run `backfill`, then `verify`, first".into()),
            Phase::DualWrite if !f.verified_clean => {
                Refuse("no clean verify since the backfill: run `verify` (and `verify --repair` if it finds differences) first".into())
            }
            Phase::DualWrite if f.outbox_pending > 0 => Refuse(format!(
                "{} shard write(s) from dual-write are still in the outbox: wait for the retries or run `verify --repair`",
                f.outbox_pending
            )),
            Phase::DualWrite => Run(Some(Phase::ShardReads)),
            Phase::ShardReads | Phase::ShardWrites | Phase::Finalized => past("switch-reads"),
            _ => Refuse(format!("phase is {p}: run `dual-write`, `backfill` and `verify` first")),
        },
        Step::SwitchWrites => match p {
            Phase::ShardReads => Run(Some(Phase::ShardWrites)),
            Phase::ShardWrites | Phase::Finalized => past("switch-writes"),
            _ => Refuse(format!("phase is {p}: run `switch-reads` first")),
        },
        Step::Finalize => match p {
            Phase::ShardWrites => Run(Some(Phase::Finalized)),
            Phase::Finalized => past("finalize"),
            _ => Refuse(format!("phase is {p}: run `switch-writes` first")),
        },
        Step::Rollback => match p {
            Phase::Prepared | Phase::DualWrite | Phase::ShardReads | Phase::ShardWrites => Run(Some(Phase::RolledBack)),
            Phase::Legacy | Phase::RolledBack => Done(format!("phase is {p}: legacy is already the only store")),
            Phase::Finalized => Refuse("phase is finalized: legacy has not been written since, a rollback would lose orders".into()),
        },
    }
}

/// Phase order, for "is at least".
pub fn at_least(p: Phase, q: Phase) -> bool {
    p.rank() >= q.rank()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(phase: Phase) -> Facts {
        Facts { phase, backfill_done: false, verified_clean: false, outbox_pending: 0 }
    }

    #[test]
    fn the_happy_path_runs_in_order() {
        let mut f = facts(Phase::Legacy);
        for (step, next) in [(Step::Prepare, Phase::Prepared), (Step::DualWrite, Phase::DualWrite)] {
            assert_eq!(decide(step, &f), Decision::Run(Some(next)));
            f.phase = next;
        }
        assert_eq!(decide(Step::Backfill, &f), Decision::Run(None));
        f.backfill_done = true;
        assert_eq!(decide(Step::Verify, &f), Decision::Run(None));
        f.verified_clean = true;
        for (step, next) in [(Step::SwitchReads, Phase::ShardReads), (Step::SwitchWrites, Phase::ShardWrites), (Step::Finalize, Phase::Finalized)] {
            assert_eq!(decide(step, &f), Decision::Run(Some(next)));
            f.phase = next;
        }
    }

    #[test]
    fn out_of_order_steps_say_what_to_run_first() {
        let cases = [
            (Step::DualWrite, facts(Phase::Legacy), "prepare"),
            (Step::Backfill, facts(Phase::Prepared), "dual-write"),
            (Step::Verify, facts(Phase::DualWrite), "backfill"),
            (Step::SwitchReads, Facts { backfill_done: true, ..facts(Phase::DualWrite) }, "verify"),
            (Step::SwitchReads, Facts { backfill_done: true, verified_clean: true, outbox_pending: 3, ..facts(Phase::DualWrite) }, "outbox"),
            (Step::SwitchWrites, facts(Phase::DualWrite), "switch-reads"),
            (Step::Finalize, facts(Phase::ShardReads), "switch-writes"),
            (Step::Rollback, facts(Phase::Finalized), "lose orders"),
            (Step::Verify, facts(Phase::Finalized), "no longer written"),
        ];
        for (step, f, says) in cases {
            match decide(step, &f) {
                Decision::Refuse(m) => assert!(m.contains(says), "{step:?} in {:?}: {m}", f.phase),
                other => panic!("{step:?} in {:?} should be refused, got {other:?}", f.phase),
            }
        }
    }

    #[test]
    fn re_running_a_finished_step_is_a_no_op() {
        assert!(matches!(decide(Step::Prepare, &facts(Phase::ShardReads)), Decision::Done(_)));
        assert!(matches!(decide(Step::DualWrite, &facts(Phase::DualWrite)), Decision::Done(_)));
        assert!(matches!(decide(Step::Backfill, &Facts { backfill_done: true, ..facts(Phase::DualWrite) }), Decision::Done(_)));
        assert!(matches!(decide(Step::Rollback, &facts(Phase::RolledBack)), Decision::Done(_)));
        // prepare again after a rollback starts over
        assert_eq!(decide(Step::Prepare, &facts(Phase::RolledBack)), Decision::Run(Some(Phase::Prepared)));
    }

    #[test]
    fn rollback_is_possible_until_finalize() {
        for p in [Phase::Prepared, Phase::DualWrite, Phase::ShardReads, Phase::ShardWrites] {
            assert_eq!(decide(Step::Rollback, &facts(p)), Decision::Run(Some(Phase::RolledBack)));
        }
    }

    #[test]
    fn routing_of_each_phase() {
        assert!(Phase::DualWrite.reads_legacy() && !Phase::ShardReads.reads_legacy());
        assert_eq!(Phase::ShardReads.writes(), Writes::LegacyThenShards);
        assert_eq!(Phase::ShardWrites.primary(), Store::Shards);
        assert_eq!(Phase::RolledBack.writes(), Writes::LegacyOnly);
        for p in ["legacy", "prepared", "dual_write", "shard_reads", "shard_writes", "finalized", "rolled_back"] {
            assert_eq!(Phase::parse(p).map(Phase::name), Some(p));
        }
    }
}
