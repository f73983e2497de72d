//! The accept loop: connection limit, one task per client, graceful shutdown
//! (stop accepting, let running transactions finish, then close).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, info_span, warn, Instrument};

use crate::state::Shared;
use crate::protocol::sqlstate;

/// 53300 for a connection with no place to log in; nothing of it is read.
async fn refuse_login(stream: tokio::net::TcpStream) {
    let out = crate::error::ClientError::fatal(sqlstate::TOO_MANY_CONNECTIONS, "sorry, too many connections are logging in").frame();
    let stream = crate::stream::Stream::Tcp(stream);
    let _ = tokio::time::timeout(Duration::from_secs(1), crate::stream::write_all(&stream, &out)).await;
}

/// Ends the connection that has waited longest to log in; false if none is left.
fn evict_oldest(logins: &mut std::collections::VecDeque<(Arc<std::sync::atomic::AtomicU8>, tokio::task::AbortHandle)>) -> bool {
    use crate::session::{EVICTED, LOGGING_IN};
    while let Some((state, handle)) = logins.pop_front() {
        // the session moves itself to logged in; whichever of the two moves first wins
        if state.compare_exchange(LOGGING_IN, EVICTED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            handle.abort();
            return true;
        }
    }
    false
}

/// Accepts clients until `shutdown` flips, then waits up to
/// `server.shutdown_timeout_ms` for their sessions to end.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(shared.config.server.max_client_connections));
    let max_logins = shared.config.server.max_unauthenticated;
    let mut shutdown = shared.shutdown.clone();
    let mut sessions = JoinSet::new();
    let mut next_id: u64 = 0;
    // connections still logging in, oldest first
    let mut logins: std::collections::VecDeque<(Arc<std::sync::atomic::AtomicU8>, tokio::task::AbortHandle)> = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                next_id += 1;
                // every place for a login is taken: the connection that has waited longest goes
                // (a real client logs in within milliseconds, an idle socket never does)
                logins.retain(|(s, _)| s.load(Ordering::Acquire) == crate::session::LOGGING_IN);
                if logins.len() >= max_logins && !evict_oldest(&mut logins) {
                    metrics::counter!(crate::metrics::CLIENT_REFUSED_TOTAL).increment(1);
                    tokio::spawn(refuse_login(stream));
                    continue;
                }
                let shared = shared.clone();
                let limit = limit.clone();
                let span = info_span!("session", id = next_id, %peer);
                let state = Arc::new(std::sync::atomic::AtomicU8::new(crate::session::LOGGING_IN));
                let task_state = state.clone();
                let handle = sessions.spawn(async move {
                    shared.clients.fetch_add(1, Ordering::Relaxed);
                    crate::session::run(shared.clone(), stream, limit, task_state).await;
                    shared.clients.fetch_sub(1, Ordering::Relaxed);
                }.instrument(span));
                logins.push_back((state, handle));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let n = sessions.len();
    info!(sessions = n, "shutting down: no new connections, waiting for running transactions");
    let wait = Duration::from_millis(shared.config.server.shutdown_timeout_ms);
    let drained = tokio::time::timeout(wait, async { while sessions.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(left = sessions.len(), "shutdown timeout reached, closing remaining sessions");
        sessions.abort_all();
    }
    shared.pool.close();
    shared.engine.close();
    info!("shutdown complete");
}
