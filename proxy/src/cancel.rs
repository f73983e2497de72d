//! Routing of CancelRequests: each session gets its own (pid, secret) key; a
//! cancel with that key reaches the server connection the session holds right
//! now, and only that one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::CancelKey;

/// Where a session's running query can be cancelled.
#[derive(Default)]
pub struct CancelSlot {
    current: Mutex<Option<CancelKey>>,
    /// Shard connections running one of the session's routed statements right now.
    shards: Mutex<Vec<CancelKey>>,
    /// CancelRequests received for the session so far (counted before the
    /// servers to forward them to are read).
    requests: AtomicU64,
    /// Of those, the ones already forwarded to those servers.
    forwarded: AtomicU64,
    /// Wakes a routed statement that waits for its shard connections.
    requested: tokio::sync::Notify,
}

impl CancelSlot {
    /// Records the server connection the session now holds (or `None`).
    pub fn set(&self, key: Option<CancelKey>) {
        if let Ok(mut c) = self.current.lock() {
            *c = key;
        }
    }
    fn get(&self) -> Option<CancelKey> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// Records the shard connections a routed statement runs on (empty once it is answered).
    pub fn set_shards(&self, keys: Vec<CancelKey>) {
        if let Ok(mut s) = self.shards.lock() {
            *s = keys;
        }
    }

    /// The shard connections running a routed statement now.
    pub fn shards(&self) -> Vec<CancelKey> {
        self.shards.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many CancelRequests the session has received: a routed statement
    /// notes it when it starts, and one received after that, while it is still
    /// waiting for its shard connections (nothing to forward it to yet), stops it
    /// before anything is sent, as PostgreSQL cancels a query it has received.
    pub fn epoch(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }

    /// A CancelRequest came: counted before the servers to forward it to are
    /// read, so a statement that registers its shard connections at the same
    /// time either is forwarded to or sees the count move. Returns the
    /// servers; call [`CancelSlot::forwarded`] once they have been told.
    ///
    /// `None` while two of the session's requests are still being forwarded: a
    /// third would only cancel the same statement again, and a client sending
    /// cancels in a loop must not start forwards without end.
    pub fn request(&self) -> Option<Vec<CancelKey>> {
        let in_flight = self.requests.load(Ordering::Acquire).saturating_sub(self.forwarded.load(Ordering::Acquire));
        if in_flight >= 2 {
            return None;
        }
        self.requests.fetch_add(1, Ordering::AcqRel);
        Some(self.servers())
    }

    /// The servers of a [`CancelSlot::request`] have been told: a statement
    /// stopped by it may answer now (the client, told 57014, cannot have its
    /// next statement hit by that forward still on its way).
    pub fn forwarded(&self) {
        self.forwarded.fetch_add(1, Ordering::AcqRel);
        self.requested.notify_waiters();
    }

    /// Resolves once a CancelRequest has come after `epoch` and every request
    /// counted so far has been forwarded (forwards may end out of order: one
    /// still on its way must not reach the client's next statement).
    pub async fn requested_since(&self, epoch: u64) {
        loop {
            let woken = self.requested.notified();
            tokio::pin!(woken);
            // registered before the check, so a request in between is not missed
            woken.as_mut().enable();
            let requests = self.requests.load(Ordering::Acquire);
            if requests > epoch && self.forwarded.load(Ordering::Acquire) >= requests {
                return;
            }
            woken.await;
        }
    }

    /// The servers to cancel now: the session's `db_default` connection and
    /// the shard connections running its routed statement.
    pub fn servers(&self) -> Vec<CancelKey> {
        self.get().into_iter().chain(self.shards()).collect()
    }
}

/// All live sessions by their client-facing pid.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// Removes the session from the registry when dropped.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    /// The client-facing pid.
    pub pid: i32,
    /// The client-facing secret.
    pub secret: i32,
    /// Shared with the registry.
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.sessions.lock() {
            m.remove(&self.pid);
        }
    }
}

impl CancelRegistry {
    /// Registers a new session under a fresh random key.
    pub fn register(self: &Arc<Self>) -> Registration {
        let slot = Arc::new(CancelSlot::default());
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let pid: i32 = rand::random::<i32>() & 0x7fff_ffff;
            if pid != 0 && !m.contains_key(&pid) {
                let secret: i32 = rand::random();
                m.insert(pid, (secret, slot.clone()));
                return Registration { registry: self.clone(), pid, secret, slot };
            }
        }
    }
    /// The cancel slot of the session with this key, if any.
    pub fn find(&self, pid: i32, secret: i32) -> Option<Arc<CancelSlot>> {
        let m = self.sessions.lock().ok()?;
        let (s, slot) = m.get(&pid)?;
        (*s == secret).then(|| slot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_statement_stops_only_for_a_cancel_after_it_began_once_that_one_is_forwarded() {
        let slot = CancelSlot::default();
        let short = std::time::Duration::from_millis(50);
        // a cancel while idle, forwarded: not for the next statement
        assert!(slot.request().is_some());
        slot.forwarded();
        let epoch = slot.epoch();
        assert!(tokio::time::timeout(short, slot.requested_since(epoch)).await.is_err());
        // one for it, still being forwarded: the statement answers only after that
        assert!(slot.request().is_some());
        assert_ne!(slot.epoch(), epoch);
        assert!(tokio::time::timeout(short, slot.requested_since(epoch)).await.is_err());
        slot.forwarded();
        assert!(tokio::time::timeout(std::time::Duration::from_secs(5), slot.requested_since(epoch)).await.is_ok());
        // at most two forwards of one session at a time
        assert!(slot.request().is_some());
        assert!(slot.request().is_some());
        assert!(slot.request().is_none(), "a third cancel while two are forwarded");
        slot.forwarded();
        assert!(slot.request().is_some());
    }

    #[test]
    fn only_matching_secret_cancels_and_registration_expires() {
        let reg = Arc::new(CancelRegistry::default());
        let a = reg.register();
        let b = reg.register();
        let key = CancelKey { addr: "127.0.0.1:5432".parse().expect("addr"), pid: 42, secret: 7, tls: None };
        a.slot.set(Some(key));
        let found = |pid, secret| reg.find(pid, secret).map(|slot| slot.servers()).unwrap_or_default().iter().map(|k| (k.pid, k.secret)).collect::<Vec<_>>();
        assert_eq!(found(a.pid, a.secret), vec![(42, 7)]);
        assert_eq!(found(a.pid, a.secret.wrapping_add(1)), vec![]);
        assert_eq!(found(b.pid, b.secret), vec![], "b holds no server");
        let pid = a.pid;
        let secret = a.secret;
        drop(a);
        assert_eq!(found(pid, secret), vec![]);
    }
}
