//! The reaper: a task that evicts idle pooled connections that expired (`max_age`), sat idle
//! too long (`idle_timeout`) or died (closed, failed, or sent data while idle). It holds only
//! a `Weak` to the pool and ends when the pool is dropped.

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Pool, PoolConn};

/// Spawns the reaper for `pool`. It wakes every [`Pool::reap_interval`] and whenever a
/// connection pokes [`Pool::waker`].
pub fn spawn_reaper<C: PoolConn>(pool: &Pool<C>) -> JoinHandle<()> {
    let weak = pool.downgrade();
    let wake = pool.waker();
    tokio::spawn(async move {
        loop {
            let interval = match weak.upgrade() {
                Some(inner) => Pool { inner }.reap_interval(),
                None => break,
            };
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = wake.notified() => {}
            }
            let Some(inner) = weak.upgrade() else { break };
            inner.reap(Instant::now());
        }
    })
}
