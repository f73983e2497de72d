//! The CLI steps, one file each; this module holds what they share: the
//! ordering gate, the single-runner lock, phase changes and waiting for the
//! proxies to follow them.

pub mod backfill;
pub mod prepare;
pub mod status;
pub mod verify;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_postgres::Client;

use crate::plan::{decide, Decision, Phase, Step};
use crate::state::{self, State};

/// How a step ended (the process exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done, or nothing to do (0).
    Ok,
    /// Ran and found differences or could not finish (1).
    Differences,
    /// Refused: out of order or another run holds the lock (3).
    Refused,
}

impl Outcome {
    /// Exit code.
    pub fn code(self) -> i32 {
        match self {
            Outcome::Ok => 0,
            Outcome::Differences => 1,
            Outcome::Refused => 3,
        }
    }
}

/// Checks the order; `Err(outcome)` when the step must not run.
pub fn gate(step: Step, st: &State) -> Result<Option<Phase>, Outcome> {
    match decide(step, &st.facts()) {
        Decision::Run(next) => Ok(next),
        Decision::Done(m) => {
            println!("{}: {m}", step.command());
            Err(Outcome::Ok)
        }
        Decision::Refuse(m) => {
            eprintln!("{}: refused: {m}", step.command());
            Err(Outcome::Refused)
        }
    }
}

/// Takes the session advisory lock on `db_default` (one changing step at a time).
pub async fn lock(c: &Client, step: Step) -> anyhow::Result<bool> {
    let got: bool = c.query_one("SELECT pg_try_advisory_lock($1)", &[&state::LOCK_KEY]).await?.get(0);
    if !got {
        eprintln!("{}: refused: another shardgate-migrate step is running (advisory lock on db_default)", step.command());
    }
    Ok(got)
}

/// Moves the phase and waits (up to 10 s) until every live proxy follows it.
pub async fn change_phase(c: &Client, st: &State, to: Phase) -> anyhow::Result<()> {
    if !state::set_phase(c, st.phase, to).await? {
        anyhow::bail!("the phase changed while this step ran (now {:?}); run `status` and retry", state::phase(c).await?.0);
    }
    let epoch = state::phase(c).await?.1;
    println!("phase: {} -> {to} (epoch {epoch})", st.effective_phase());
    wait_for_proxies(c, epoch).await
}

/// Waits until every proxy seen in the last 5 s acknowledges `epoch`.
pub async fn wait_for_proxies(c: &Client, epoch: i64) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let lagging = state::lagging_proxies(c, epoch, 5.0).await.context("reading proxy acknowledgements")?;
        if lagging.is_empty() {
            println!("every running proxy follows the new phase ({:.1} s)", t0.elapsed().as_secs_f64());
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            eprintln!("warning: proxies not following the new phase after 10 s: {}; they stop answering t_order until they do", lagging.join(", "));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
