//! The pool's shared state at work: slot bookkeeping under the lock, returns, evictions
//! and the reaper's pass.

use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry;
use tokio::time::Instant;
use tracing::{debug, info};

use super::{EvictReason, Health, Inner, PoolConn, PoolKey, Slot, SlotState, release_shard};
use crate::config::PoolConfig;
use crate::ids::AccountId;

impl<C: PoolConn> Inner<C> {
    pub(super) fn limits(&self) -> std::sync::RwLockReadGuard<'_, PoolConfig> {
        self.limits.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves one slot for `account`, or reports the cap.
    pub(super) fn reserve(
        &self,
        account: &AccountId,
        limits: &PoolConfig,
        account_cap: Option<usize>,
    ) -> bool {
        let Ok(mut per) = self.per_account.lock() else {
            return false;
        };
        let n = per.get(account).copied().unwrap_or(0);
        if n >= account_cap.unwrap_or(limits.max_per_account) {
            return false;
        }
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t < limits.max_total).then_some(t + 1)
            })
            .is_err()
        {
            return false;
        }
        per.insert(account.clone(), n + 1);
        true
    }

    /// Releases one slot of `account` (a slot was removed).
    pub(super) fn release(&self, account: &AccountId) {
        if let Ok(mut per) = self.per_account.lock()
            && let Some(n) = per.get_mut(account)
        {
            *n -= 1;
            if *n == 0 {
                per.remove(account);
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    pub(super) fn tombstone(&self, key: &PoolKey, reason: EvictReason) {
        let cap = self.limits().max_tombstones;
        if let Ok(mut t) = self.tombstones.lock() {
            t.insert(key.clone(), reason, cap);
        }
    }

    /// Evicts `key`'s slot. Idle: removed and closed now. Dialing/busy: marked, discarded by its
    /// guard. `only_conn` restricts the eviction to one connection id.
    pub(super) fn evict_key(
        &self,
        key: &PoolKey,
        reason: EvictReason,
        only_conn: Option<u64>,
    ) -> bool {
        let mut doomed = None;
        let mut hit = false;
        if let Entry::Occupied(mut e) = self.slots.entry(key.clone()) {
            let slot = e.get_mut();
            if only_conn.is_none_or(|id| id == slot.conn_id) {
                hit = true;
                log_evict(reason, key, slot.conn_id);
                self.tombstone(key, reason);
                if matches!(slot.state, SlotState::Idle { .. }) {
                    if let SlotState::Idle { mut conn, .. } = e.remove().state {
                        conn.on_evict(reason);
                        doomed = Some(conn);
                    }
                    self.release(&key.account);
                } else {
                    slot.evicted = true;
                }
            }
        }
        drop(doomed);
        hit
    }

    /// Evicts `key`'s slot if it is idle and `why` says so.
    pub(super) fn evict_idle_if(
        &self,
        key: &PoolKey,
        why: impl FnOnce(&mut C, Instant) -> Option<EvictReason>,
    ) {
        let mut doomed = None;
        if let Entry::Occupied(mut e) = self.slots.entry(key.clone()) {
            let slot = e.get_mut();
            let conn_id = slot.conn_id;
            if let SlotState::Idle { conn, since } = &mut slot.state
                && let Some(reason) = why(conn, *since)
            {
                log_evict(reason, key, conn_id);
                self.tombstone(key, reason);
                if let SlotState::Idle { mut conn, .. } = e.remove().state {
                    conn.on_evict(reason);
                    doomed = Some(conn);
                }
                self.release(&key.account);
            }
        }
        drop(doomed);
    }

    /// When a new key of `account` finds a cap reached, evicts the least recently used idle
    /// connection to make room (`pool evict reason=lru`): of the same account when its cap
    /// binds, of any account when `max_total` does. Connections that never completed a turn
    /// (their client upgraded and left) go first.
    pub(super) fn make_room(
        &self,
        account: &AccountId,
        limits: &PoolConfig,
        account_cap: Option<usize>,
    ) {
        let per_account = self
            .per_account
            .lock()
            .ok()
            .and_then(|p| p.get(account).copied())
            .unwrap_or(0);
        let account_full = per_account >= account_cap.unwrap_or(limits.max_per_account);
        let total_full = self.total.load(Ordering::Acquire) >= limits.max_total;
        if !account_full && !total_full {
            return;
        }
        let victim = self
            .slots
            .iter()
            .filter(|e| !account_full || &e.key().account == account)
            .filter_map(|e| match e.value().state {
                SlotState::Idle { since, .. } => {
                    Some((served(e.value()) > 0, since, e.key().clone()))
                }
                _ => None,
            })
            .min_by_key(|(proven, since, _)| (*proven, *since))
            .map(|(_, _, key)| key);
        if let Some(key) = victim {
            self.evict_idle_if(&key, |_, _| Some(EvictReason::Lru));
        }
    }

    pub(super) fn reap(&self, now: Instant) {
        let limits = self.limits().clone();
        let keys: Vec<(PoolKey, bool)> = self
            .slots
            .iter()
            .filter(|e| matches!(e.value().state, SlotState::Idle { .. }))
            .map(|e| (e.key().clone(), served(e.value()) == 0))
            .collect();
        for (key, unused) in keys {
            self.evict_idle_if(&key, |conn, since| {
                let idle = now.saturating_duration_since(since);
                if now.saturating_duration_since(conn.created_at()) >= limits.max_age {
                    Some(EvictReason::MaxAge)
                } else if idle >= limits.idle_timeout
                    || (unused && idle >= limits.unused_idle_timeout)
                {
                    Some(EvictReason::IdleTimeout)
                } else {
                    match conn.check_idle() {
                        Health::Ok => None,
                        Health::Dead(r) => Some(r),
                    }
                }
            });
        }
    }

    /// A guard came back. Puts the connection back to idle, or removes the slot.
    pub(super) fn put_back(&self, key: &PoolKey, conn_id: u64, conn: Option<C>, reusable: bool) {
        self.put_back_inner(key, conn_id, conn, reusable);
        self.released[release_shard(self.slots.hasher(), key)].notify_waiters();
    }

    pub(super) fn put_back_inner(
        &self,
        key: &PoolKey,
        conn_id: u64,
        conn: Option<C>,
        reusable: bool,
    ) {
        let now = Instant::now();
        let max_age = self.limits().max_age;
        let closed = self.closed.load(Ordering::Acquire);
        let mut doomed = None;
        if let Entry::Occupied(mut e) = self.slots.entry(key.clone()) {
            let slot = e.get_mut();
            if slot.conn_id != conn_id {
                // Not our slot any more (cannot happen while we held it; be safe).
                drop(e);
                drop(conn);
                return;
            }
            let keep = match conn {
                Some(conn) if reusable && !slot.evicted => {
                    let reason = if closed {
                        Some(EvictReason::Shutdown)
                    } else if now.saturating_duration_since(conn.created_at()) >= max_age {
                        Some(EvictReason::MaxAge)
                    } else {
                        None
                    };
                    match reason {
                        None => {
                            let mut conn = conn;
                            conn.on_idle();
                            slot.state = SlotState::Idle { conn, since: now };
                            debug!(account = %key.account, conversation = %key.conversation, upstream.id = conn_id, "pooled");
                            true
                        }
                        Some(reason) => {
                            log_evict(reason, key, conn_id);
                            self.tombstone(key, reason);
                            let mut conn = conn;
                            conn.on_evict(reason);
                            doomed = Some(conn);
                            false
                        }
                    }
                }
                Some(conn) => {
                    if !slot.evicted {
                        log_evict(EvictReason::Discarded, key, conn_id);
                        self.tombstone(key, EvictReason::Discarded);
                    }
                    doomed = Some(conn);
                    false
                }
                // Dial failed or the connection was already evicted by its holder.
                None => false,
            };
            if !keep {
                e.remove();
                self.release(&key.account);
            }
        }
        drop(doomed);
    }
}

/// Turns a slot's connection completed (connections without shared facts count as used).
pub(super) fn served<C>(slot: &Slot<C>) -> u64 {
    slot.meta
        .as_ref()
        .map(|m| m.turns.load(Ordering::Relaxed))
        .unwrap_or(1)
}

pub(super) fn log_evict(reason: EvictReason, key: &PoolKey, conn_id: u64) {
    crate::metrics::eviction(reason);
    info!(
        reason = %reason,
        client = %key.client,
        account = %key.account,
        conversation = %key.conversation,
        upstream.id = conn_id,
        "pool evict"
    );
}
