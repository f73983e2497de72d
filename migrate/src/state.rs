//! The control tables on `db_default`: the migration's phase and progress, the
//! outbox of secondary writes that failed, and the proxies' acknowledgements.
//! Shared by the CLI and the proxies.

use tokio_postgres::Client;

use crate::plan::{Facts, Phase, Store};

/// Control tables (idempotent).
pub const DDL: &str = "
CREATE TABLE IF NOT EXISTS shardgate_migration (
    id int PRIMARY KEY CHECK (id = 1),
    phase text NOT NULL,
    epoch bigint NOT NULL DEFAULT 1,
    changed_at timestamptz NOT NULL DEFAULT now(),
    backfill_checkpoint bigint,
    backfill_done boolean NOT NULL DEFAULT false,
    backfill_rows bigint NOT NULL DEFAULT 0,
    backfill_total bigint,
    backfill_finished_at timestamptz,
    verify_at timestamptz,
    verify_rows bigint,
    verify_differences bigint
);
CREATE TABLE IF NOT EXISTS shardgate_migration_outbox (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    target text NOT NULL CHECK (target IN ('shards', 'legacy')),
    statement text NOT NULL,
    shards int[] NOT NULL,
    months text[] NOT NULL,
    error text,
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DONE')),
    done_at timestamptz
);
CREATE INDEX IF NOT EXISTS shardgate_migration_outbox_todo ON shardgate_migration_outbox (next_attempt_at) WHERE status = 'PENDING';
CREATE TABLE IF NOT EXISTS shardgate_migration_proxies (
    proxy text PRIMARY KEY,
    epoch bigint NOT NULL,
    phase text NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now()
);";

/// Channel the CLI notifies on a phase change.
pub const CHANNEL: &str = "shardgate_migration";

/// Advisory lock key held by a running CLI step that changes anything.
pub const LOCK_KEY: i64 = 0x5347_4d49_4752;

/// The control row.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// `None`: no migration has started.
    pub phase: Option<Phase>,
    /// Bumped on every phase change.
    pub epoch: i64,
    /// Last merchant id fully copied.
    pub checkpoint: Option<i64>,
    /// Every merchant copied.
    pub backfill_done: bool,
    /// Rows copied so far.
    pub backfill_rows: i64,
    /// Legacy rows when the backfill started.
    pub backfill_total: Option<i64>,
    /// The last verify ran after the backfill finished.
    pub verify_after_backfill: bool,
    /// Rows compared by the last verify.
    pub verify_rows: Option<i64>,
    /// Differences the last verify left (after repair, if repairing).
    pub verify_differences: Option<i64>,
    /// When the last verify ran.
    pub verify_at: Option<String>,
    /// Outbox entries not applied.
    pub outbox_pending: i64,
}

impl State {
    /// Phase for routing (no row: legacy alone).
    pub fn effective_phase(&self) -> Phase {
        self.phase.unwrap_or(Phase::Legacy)
    }

    /// Ordering facts.
    pub fn facts(&self) -> Facts {
        Facts {
            phase: self.effective_phase(),
            backfill_done: self.backfill_done,
            verified_clean: self.verify_after_backfill && self.verify_differences == Some(0),
            outbox_pending: self.outbox_pending,
        }
    }
}

/// True when the control table exists.
pub async fn exists(c: &Client) -> Result<bool, tokio_postgres::Error> {
    let r = c.query_one("SELECT to_regclass('shardgate_migration') IS NOT NULL", &[]).await?;
    Ok(r.get(0))
}

/// Reads the control row and the outbox depth; no table yet = no migration.
pub async fn load(c: &Client) -> Result<State, tokio_postgres::Error> {
    if !exists(c).await? {
        return Ok(State::default());
    }
    let row = c
        .query_opt(
            "SELECT phase, epoch, backfill_checkpoint, backfill_done, backfill_rows, backfill_total, \
                    verify_at IS NOT NULL AND backfill_finished_at IS NOT NULL AND verify_at >= backfill_finished_at, \
                    verify_rows, verify_differences, to_char(verify_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    (SELECT count(*) FROM shardgate_migration_outbox WHERE status = 'PENDING') \
             FROM shardgate_migration WHERE id = 1",
            &[],
        )
        .await?;
    let Some(r) = row else {
        let pending: i64 = c.query_one("SELECT count(*) FROM shardgate_migration_outbox WHERE status = 'PENDING'", &[]).await?.get(0);
        return Ok(State { outbox_pending: pending, ..State::default() });
    };
    let phase: String = r.get(0);
    Ok(State {
        phase: Phase::parse(&phase),
        epoch: r.get(1),
        checkpoint: r.get(2),
        backfill_done: r.get(3),
        backfill_rows: r.get(4),
        backfill_total: r.get(5),
        verify_after_backfill: r.get(6),
        verify_rows: r.get(7),
        verify_differences: r.get(8),
        verify_at: r.get(9),
        outbox_pending: r.get(10),
    })
}

/// Phase and epoch only (what a proxy polls).
pub async fn phase(c: &Client) -> Result<(Option<Phase>, i64), tokio_postgres::Error> {
    if !exists(c).await? {
        return Ok((None, 0));
    }
    let r = c.query_opt("SELECT phase, epoch FROM shardgate_migration WHERE id = 1", &[]).await?;
    Ok(match r {
        Some(r) => (Phase::parse(r.get::<_, &str>(0)), r.get(1)),
        None => (None, 0),
    })
}

/// Moves the phase from `from` (`None`: no row) to `to`; false if someone else moved it.
pub async fn set_phase(c: &Client, from: Option<Phase>, to: Phase) -> Result<bool, tokio_postgres::Error> {
    let n = match from {
        None => {
            c.execute("INSERT INTO shardgate_migration (id, phase) VALUES (1, $1) ON CONFLICT (id) DO NOTHING", &[&to.name()]).await?
        }
        Some(f) => {
            c.execute(
                "UPDATE shardgate_migration SET phase = $2, epoch = epoch + 1, changed_at = now() WHERE id = 1 AND phase = $1",
                &[&f.name(), &to.name()],
            )
            .await?
        }
    };
    if n == 1 {
        c.batch_execute(&format!("NOTIFY {CHANNEL}")).await?;
    }
    Ok(n == 1)
}

/// A proxy says which epoch it follows now.
pub async fn acknowledge(c: &Client, proxy: &str, epoch: i64, phase: Phase) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO shardgate_migration_proxies (proxy, epoch, phase, seen_at) VALUES ($1, $2, $3, now()) \
         ON CONFLICT (proxy) DO UPDATE SET epoch = excluded.epoch, phase = excluded.phase, seen_at = now()",
        &[&proxy, &epoch, &phase.name()],
    )
    .await?;
    Ok(())
}

/// Proxies seen in the last `within_s` seconds that have not acknowledged `epoch`.
pub async fn lagging_proxies(c: &Client, epoch: i64, within_s: f64) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT proxy FROM shardgate_migration_proxies WHERE seen_at > now() - make_interval(secs => $1) AND epoch < $2 ORDER BY 1",
            &[&within_s, &epoch],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// One failed secondary write.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// Row id.
    pub id: i64,
    /// The store that missed the write.
    pub target: Store,
    /// Shards the write touched.
    pub shards: Vec<i32>,
    /// Months it touched (`yyyyMM`); empty = every month.
    pub months: Vec<String>,
    /// Tries so far.
    pub attempts: i32,
}

/// Records a secondary write that failed.
pub async fn record_outbox(
    c: &Client,
    target: Store,
    statement: &str,
    shards: &[i32],
    months: &[String],
    error: &str,
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO shardgate_migration_outbox (target, statement, shards, months, error) VALUES ($1, $2, $3, $4, $5)",
        &[&target.name(), &statement, &shards, &months, &error],
    )
    .await?;
    Ok(())
}

/// Entries due for a retry, oldest first; `all` ignores the backoff.
pub async fn due_outbox(c: &Client, limit: i64, all: bool) -> Result<Vec<OutboxEntry>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT id, target, shards, months, attempts FROM shardgate_migration_outbox \
             WHERE status = 'PENDING' AND ($2 OR next_attempt_at <= now()) ORDER BY id LIMIT $1",
            &[&limit, &all],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OutboxEntry {
            id: r.get(0),
            target: if r.get::<_, &str>(1) == "legacy" { Store::Legacy } else { Store::Shards },
            shards: r.get(2),
            months: r.get(3),
            attempts: r.get(4),
        })
        .collect())
}

/// Marks entries applied.
pub async fn outbox_done(c: &Client, ids: &[i64]) -> Result<(), tokio_postgres::Error> {
    c.execute("UPDATE shardgate_migration_outbox SET status = 'DONE', done_at = now() WHERE id = ANY($1)", &[&ids]).await?;
    Ok(())
}

/// Marks entries applied up to `max_id` for `target` (a full repair covered them).
pub async fn outbox_done_upto(c: &Client, target: Store, max_id: i64) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        "UPDATE shardgate_migration_outbox SET status = 'DONE', done_at = now() WHERE status = 'PENDING' AND target = $1 AND id <= $2",
        &[&target.name(), &max_id],
    )
    .await
}

/// Highest outbox id now (0 when empty).
pub async fn outbox_max_id(c: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one("SELECT coalesce(max(id), 0) FROM shardgate_migration_outbox", &[]).await?.get(0))
}

/// A retry failed: back off exponentially (capped at a minute).
pub async fn outbox_retry_later(c: &Client, id: i64, error: &str) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "UPDATE shardgate_migration_outbox SET attempts = attempts + 1, error = $2, \
         next_attempt_at = now() + least(interval '60 seconds', interval '250 milliseconds' * power(2, least(attempts, 8))) WHERE id = $1",
        &[&id, &error],
    )
    .await?;
    Ok(())
}
