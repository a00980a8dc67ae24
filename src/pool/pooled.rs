//! The checked-out connection ([`Pooled`]) and the guard of an unpooled one-shot's count.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::{Decision, EvictReason, Inner, NewReason, PoolConn, PoolKey, SlotState};
use crate::ids::{AccountId, ConversationId, Ingress};

/// The checked-out connection. Poisoned unless the holder marks it reusable: dropped, it goes
/// back to the pool only if `reusable`, the slot was not evicted meanwhile, and it is younger
/// than `max_age`. Unpooled (bypass) guards just close their connection. `Drop` never blocks.
pub struct Pooled<C: PoolConn> {
    pub(super) conn: Option<C>,
    pub(super) id: u64,
    /// `None` for unpooled connections without a conversation; for bypass connections of a
    /// known conversation it is set but `pool` is empty.
    pub(super) key: Option<PoolKey>,
    pub(super) account: AccountId,
    pub(super) pool: Weak<Inner<C>>,
    pub(super) reusable: bool,
    pub(super) reused: bool,
    /// The decision that produced this checkout (metrics split by it).
    pub(super) decision: Decision,
    /// A one-shot's `max_total` lease, released with the guard.
    pub(super) _shot: Option<OneShotLease>,
}

/// Counts one one-shot connection against `max_total` until dropped.
pub(super) struct OneShotLease {
    pub(super) total: Arc<AtomicUsize>,
    pub(super) one_shots: Arc<AtomicUsize>,
}

impl OneShotLease {
    pub(super) fn take<C>(inner: &Inner<C>, max_total: usize) -> Option<OneShotLease> {
        inner
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t < max_total).then_some(t + 1)
            })
            .ok()?;
        inner.one_shots.fetch_add(1, Ordering::AcqRel);
        Some(OneShotLease {
            total: inner.total.clone(),
            one_shots: inner.one_shots.clone(),
        })
    }
}

impl Drop for OneShotLease {
    fn drop(&mut self) {
        self.one_shots.fetch_sub(1, Ordering::AcqRel);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Options of [`Pool::checkout_with`].
#[derive(Debug, Clone, Default)]
pub struct CheckoutOptions {
    /// `accounts[].max_connections`, when the account sets one.
    pub account_cap: Option<usize>,
    /// Overrides the `new` reason (the stale-reuse retry, failover).
    pub hint: Option<NewReason>,
    /// The route's affinity (logged as `affinity=` when it differs from the lane).
    pub affinity: Option<ConversationId>,
    /// Which ingress carried the request (logged as `ingress=`).
    pub ingress: Ingress,
}

impl<C: PoolConn> Pooled<C> {
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// The upstream id (known before the dial for new connections).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn account(&self) -> &AccountId {
        &self.account
    }

    pub fn key(&self) -> Option<&PoolKey> {
        self.key.as_ref()
    }

    /// True if the connection lives in the pool (not a bypass one-shot).
    pub fn is_pooled(&self) -> bool {
        self.pool.strong_count() > 0
    }

    /// True if this checkout reused an idle pooled connection.
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Hands the dialed connection to the guard; its slot goes from `dialing` to `busy`.
    pub fn attach(&mut self, conn: C) {
        if let (Some(pool), Some(key)) = (self.pool.upgrade(), self.key.as_ref())
            && let Some(mut slot) = pool.slots.get_mut(key)
            && slot.conn_id == self.id
        {
            if matches!(slot.state, SlotState::Dialing) {
                slot.state = SlotState::Busy;
            }
            slot.meta = conn.meta();
        }
        self.conn = Some(conn);
    }

    pub fn conn(&self) -> Option<&C> {
        self.conn.as_ref()
    }

    pub fn conn_mut(&mut self) -> Option<&mut C> {
        self.conn.as_mut()
    }

    /// Marks whether the connection may go back to the pool (true between clean turns).
    pub fn set_reusable(&mut self, reusable: bool) {
        self.reusable = reusable;
    }

    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    /// Evicts this connection's key (logged with `reason`) and closes the connection.
    pub fn evict(mut self, reason: EvictReason) {
        let conn = self.conn.take();
        if let (Some(pool), Some(key)) = (self.pool.upgrade(), self.key.as_ref()) {
            pool.evict_key(key, reason, Some(self.id));
        }
        drop(conn);
    }

    /// Returns the connection to the pool (if reusable) or closes it; same as dropping.
    pub fn release(self) {}
}

impl<C: PoolConn> Drop for Pooled<C> {
    fn drop(&mut self) {
        let conn = self.conn.take();
        if let (Some(pool), Some(key)) = (self.pool.upgrade(), self.key.as_ref()) {
            pool.put_back(key, self.id, conn, self.reusable);
        }
    }
}
