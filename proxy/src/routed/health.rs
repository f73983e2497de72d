//! Per-shard health: `up → suspect → down → recovering → up`.
//!
//! Active probes (a fresh connection and `SELECT 1` every
//! `health.probe_interval_ms`, bounded by `health.probe_timeout_ms`) move a
//! shard through the states with `failure_threshold` consecutive failures and
//! `recovery_threshold` consecutive successes. Live traffic reports too: a
//! connection to a shard that cannot be made marks it down at once, and an
//! answered statement clears the failed probes of a suspect or recovering
//! shard. A recovering shard goes back down only after `failure_threshold`
//! failed probes in a row, like an up one: it is already taking writes and
//! sync-back is moving its outage's orders home, so one slow probe on a busy
//! machine must not send it back (its synced orders would be out of reach).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shardgate_config::{Dsn, HealthConfig};

use crate::backend::ServerConn;

/// A shard's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Serving.
    Up = 0,
    /// A probe failed; still used until `failure_threshold` failures in a row.
    Suspect = 1,
    /// Not used: writes go to the fallback table.
    Down = 2,
    /// Probes succeed again; used, but not yet trusted as up.
    Recovering = 3,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Suspect,
            2 => State::Down,
            3 => State::Recovering,
            _ => State::Up,
        }
    }

    /// Lowercase name, as shown in `/health` and `SHOW SHARDS`.
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Suspect => "suspect",
            State::Down => "down",
            State::Recovering => "recovering",
        }
    }
}

/// One database's health record.
#[derive(Debug, Default)]
pub struct Tracker {
    state: AtomicU8,
    failures: AtomicU32,
    successes: AtomicU32,
    latency_us: AtomicU64,
    last_error: Mutex<Option<String>>,
    changed: Mutex<Option<Instant>>,
}

impl Tracker {
    /// Current state.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Consecutive failed probes.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Latency of the last successful probe.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    /// Last failure seen (no DSNs or passwords in it).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn set(&self, s: State) -> Option<State> {
        let old = State::from_u8(self.state.swap(s as u8, Ordering::AcqRel));
        if old != s {
            if let Ok(mut c) = self.changed.lock() {
                *c = Some(Instant::now());
            }
            return Some(old);
        }
        None
    }

    /// A probe that began at `started` succeeded; returns the transition if any.
    ///
    /// A probe that began before the shard was last marked down says nothing
    /// about it now: it may have answered just before the shard died (live
    /// traffic then found it unreachable). Counting it would move a shard that
    /// is still down to recovering, and writes during its outage would go
    /// uncounted as fallback rows (a read after its return would miss them).
    pub fn success(&self, latency: Duration, cfg: &HealthConfig, started: Instant) -> Option<(State, State)> {
        if self.state() == State::Down && self.changed.lock().ok().and_then(|c| *c).is_some_and(|c| c > started) {
            return None;
        }
        self.latency_us.store(latency.as_micros() as u64, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        let ok = self.successes.fetch_add(1, Ordering::AcqRel) + 1;
        let next = match self.state() {
            State::Up => State::Up,
            State::Suspect => State::Up,
            State::Down => {
                if cfg.recovery_threshold <= 1 {
                    State::Up
                } else {
                    State::Recovering
                }
            }
            State::Recovering if ok >= cfg.recovery_threshold => State::Up,
            State::Recovering => State::Recovering,
        };
        self.set(next).map(|old| (old, next))
    }

    /// A probe failed; returns the transition if any.
    pub fn failure(&self, error: &str, cfg: &HealthConfig) -> Option<(State, State)> {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error.to_string());
        }
        self.successes.store(0, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let next = match self.state() {
            State::Up if n >= cfg.failure_threshold => State::Down,
            State::Up => State::Suspect,
            State::Suspect if n >= cfg.failure_threshold => State::Down,
            State::Suspect => State::Suspect,
            State::Recovering if n >= cfg.failure_threshold => State::Down,
            State::Recovering => State::Recovering,
            State::Down => State::Down,
        };
        self.set(next).map(|old| (old, next))
    }

    /// Live traffic was answered: a suspect database is serving, so it is up
    /// (a slow probe on a busy machine must not take a working shard out).
    pub fn traffic_ok(&self) -> Option<(State, State)> {
        match self.state() {
            State::Suspect => {}
            State::Recovering => {
                // serving: its failed probes so far were slowness, not an outage
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                return None;
            }
            State::Up | State::Down => return None,
        }
        self.failures.store(0, Ordering::Relaxed);
        self.set(State::Up).map(|old| (old, State::Up))
    }

    /// Live traffic could not reach the database: down at once.
    pub fn unreachable(&self, error: &str) -> Option<(State, State)> {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error.to_string());
        }
        self.successes.store(0, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::AcqRel);
        self.set(State::Down).map(|old| (old, State::Down))
    }
}

/// One probe: `SELECT 1` on the probe connection kept from the last probe
/// (connecting, and authenticating, only when there is none or it broke),
/// within `timeout`.
pub async fn probe(dsn: &Dsn, kept: &tokio::sync::Mutex<Option<ServerConn>>, timeout: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut slot = kept.lock().await;
    let r = tokio::time::timeout(timeout, async {
        if let Some(conn) = slot.as_mut() {
            if conn.simple_query("SELECT 1").await.is_ok() {
                return Ok(());
            }
            *slot = None;
        }
        let mut conn = ServerConn::connect(dsn, timeout).await.map_err(|e| e.to_string())?;
        conn.simple_query("SELECT 1").await.map_err(|e| e.to_string())?;
        *slot = Some(conn);
        Ok(())
    })
    .await;
    match r {
        Ok(Ok(())) => Ok(t0.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            // a connection that did not answer in time is not trusted again
            *slot = None;
            Err(format!("no answer within {} ms", timeout.as_millis()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig { probe_interval_ms: 1000, probe_timeout_ms: 1000, failure_threshold: 3, recovery_threshold: 2 }
    }

    #[test]
    fn probes_walk_the_state_machine() {
        let t = Tracker::default();
        let c = cfg();
        assert_eq!(t.state(), State::Up);
        assert_eq!(t.failure("x", &c), Some((State::Up, State::Suspect)));
        assert_eq!(t.failure("x", &c), None);
        assert_eq!(t.failure("x", &c), Some((State::Suspect, State::Down)));
        assert_eq!(t.success(Duration::from_millis(1), &c, Instant::now()), Some((State::Down, State::Recovering)));
        // a recovering shard needs failure_threshold failures in a row to go back down
        assert_eq!(t.failure("x", &c), None);
        assert_eq!(t.failure("x", &c), None);
        assert_eq!(t.failure("x", &c), Some((State::Recovering, State::Down)));
        t.success(Duration::from_millis(1), &c, Instant::now());
        assert_eq!(t.state(), State::Recovering);
        // a failure in between starts the count of successes over
        t.failure("x", &c);
        assert_eq!(t.success(Duration::from_millis(1), &c, Instant::now()), None);
        assert_eq!(t.state(), State::Recovering);
        assert_eq!(t.success(Duration::from_millis(1), &c, Instant::now()), Some((State::Recovering, State::Up)));
        // a suspect shard that answers again is up
        t.failure("x", &c);
        assert_eq!(t.success(Duration::from_millis(1), &c, Instant::now()), Some((State::Suspect, State::Up)));
    }

    #[test]
    fn answered_traffic_clears_a_suspect() {
        let t = Tracker::default();
        let c = cfg();
        t.failure("slow probe", &c);
        assert_eq!(t.traffic_ok(), Some((State::Suspect, State::Up)));
        assert_eq!(t.failures(), 0);
        // a recovering shard that answers keeps recovering, its failed probes forgotten
        t.unreachable("refused");
        t.success(Duration::from_millis(1), &c, Instant::now());
        t.failure("slow probe", &c);
        t.failure("slow probe", &c);
        assert_eq!(t.traffic_ok(), None);
        assert_eq!(t.failures(), 0);
        assert_eq!(t.failure("slow probe", &c), None);
        assert_eq!(t.state(), State::Recovering);
        // a down shard is not brought back by traffic (it gets none); only probes do that
        t.unreachable("refused");
        assert_eq!(t.traffic_ok(), None);
        assert_eq!(t.state(), State::Down);
    }

    #[test]
    fn a_probe_that_began_before_the_shard_went_down_does_not_bring_it_back() {
        let t = Tracker::default();
        let c = HealthConfig { recovery_threshold: 1, ..cfg() };
        let began = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        // live traffic finds the shard unreachable while the probe is on its way
        t.unreachable("connection refused");
        assert_eq!(t.success(Duration::from_millis(1), &c, began), None, "a stale probe result");
        assert_eq!(t.state(), State::Down);
        // a probe that began after that counts
        assert_eq!(t.success(Duration::from_millis(1), &c, Instant::now()), Some((State::Down, State::Up)));
    }

    #[test]
    fn live_traffic_failure_is_down_at_once() {
        let t = Tracker::default();
        assert_eq!(t.unreachable("connection refused"), Some((State::Up, State::Down)));
        assert_eq!(t.last_error().as_deref(), Some("connection refused"));
    }
}
