//! The pool of upstream connections, keyed by `(client, account, lane)` (DESIGN §1-§3).
//!
//! Invariants:
//! - A key names its tenant: one client key never rides another's connection.
//! - At most one pooled connection per [`PoolKey`]. Its slot is `Dialing`, `Busy` (checked out
//!   by exactly one session) or `Idle` (owned by the pool). A second session of a busy key gets
//!   an unpooled one-shot connection (`bypass reason=busy`).
//! - Every slot counts toward `max_per_account` and `max_total` from the moment it is reserved
//!   (dials in progress included) until it is removed; counts are released exactly once, when
//!   the slot is removed. One-shot (`bypass`) connections count toward `max_total` too, for
//!   their guard's life; past `max_total` a checkout is refused ([`AtCapacity`]).
//! - A connection is handed out only if it is open, quiet and younger than `max_age`; age is
//!   checked at checkout and at return, never mid-turn.
//! - A [`Pooled`] guard returns its connection only if the holder marked it reusable (the last
//!   turn ended cleanly); dropped without that, the connection is discarded (poisoned).
//! - Every map here is bounded: slots by `max_total`, per-account counts by the number of
//!   accounts, tombstones by `max_tombstones`.
//!
//! Every acquire logs one `pool decision` line and every removal one `pool evict` line, at INFO.

mod decision;
mod inner;
mod pooled;
mod reaper;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::info;

use crate::config::PoolConfig;
use crate::fifo::FifoMap;
use crate::ids::{AccountId, ClientId, ConversationId, Ingress};

pub use decision::{BypassReason, Decision, EvictReason, NewReason};
use inner::log_evict;
use pooled::OneShotLease;
pub use pooled::{CheckoutOptions, Pooled};
pub use reaper::spawn_reaper;

/// The pool key: the real values, not a hash. `conversation` is the lane (DESIGN §2).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub client: ClientId,
    pub account: AccountId,
    pub conversation: ConversationId,
}

/// Every upstream connection the pool allows (`max_total`, one-shots included) is open or
/// being dialed: the checkout is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the gateway is at pool.max_total upstream connections")]
pub struct AtCapacity;

/// What the pool needs from a connection. Implemented by
/// [`UpstreamConn`](crate::upstream::UpstreamConn) and by fakes in tests.
pub trait PoolConn: Send + Sync + 'static {
    fn id(&self) -> u64;
    fn created_at(&self) -> Instant;
    /// Non-blocking check of an idle connection: did anything happen while it sat in the pool?
    fn check_idle(&mut self) -> Health;
    /// Called just before an evicted connection is dropped.
    fn on_evict(&mut self, _reason: EvictReason) {}
    /// Called when the connection goes (back) to idle in the pool.
    fn on_idle(&mut self) {}
    /// Shared facts about the connection, readable while a session holds it (status page).
    fn meta(&self) -> Option<Arc<ConnMeta>> {
        None
    }
}

/// Facts about a connection that the pool can show while a session holds it.
#[derive(Debug)]
pub struct ConnMeta {
    pub created_at: Instant,
    /// Turns completed on the connection.
    pub turns: AtomicU64,
}

/// One recent decision (status page).
#[derive(Debug, Clone)]
pub struct DecisionRecord {
    pub at: Instant,
    pub decision: Decision,
    pub account: AccountId,
    pub client: Option<ClientId>,
    pub conversation: Option<ConversationId>,
    /// The affinity, when it differs from the lane.
    pub affinity: Option<ConversationId>,
    pub ingress: Ingress,
    pub upstream_id: u64,
}

/// One pooled slot (status page).
#[derive(Debug, Clone)]
pub struct SlotSnapshot {
    pub key: PoolKey,
    pub upstream_id: u64,
    /// `idle`, `busy` or `dialing`.
    pub state: &'static str,
    pub meta: Option<Arc<ConnMeta>>,
    /// Idle since (idle slots).
    pub idle_since: Option<Instant>,
}

/// Recent decisions kept for the status page.
const RECENT_DECISIONS: usize = 64;

/// Result of [`PoolConn::check_idle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// The connection must not be used again; the reason is logged.
    Dead(EvictReason),
}

/// A snapshot of the pool's counters (tests, status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Upstream connections counted against `max_total`: pooled slots and one-shots.
    pub total: usize,
    /// One-shot (bypass) connections open or dialing.
    pub one_shots: usize,
    pub idle: usize,
    pub busy: usize,
    pub dialing: usize,
    pub tombstones: usize,
    /// The per-account reservation counts, summed (equals `total`).
    pub reserved_by_account: usize,
    /// Entries in the per-account map (entries at zero are removed).
    pub account_entries: usize,
}

// === impl Pool ===

/// Shared handle to the pool.
pub struct Pool<C: PoolConn> {
    inner: Arc<Inner<C>>,
}

impl<C: PoolConn> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<C> {
    /// Keyed with a per-process random seed (foldhash's quality variant): a reconnect hashes
    /// its key several times (checkout, release, the release shard), and SipHash cost more
    /// than the rest of the lookup; the map is bounded by `max_total` either way.
    slots: DashMap<PoolKey, Slot<C>, foldhash::quality::RandomState>,
    /// Reserved slots per account; entries are removed when they reach zero.
    per_account: Mutex<HashMap<AccountId, usize>>,
    /// Pooled slots and one-shot leases, against `max_total`.
    total: Arc<AtomicUsize>,
    /// One-shot leases alone (stats).
    one_shots: Arc<AtomicUsize>,
    /// Recent evictions, so the next `new` of a key can say why (`max_tombstones`).
    tombstones: Mutex<FifoMap<PoolKey, EvictReason>>,
    limits: RwLock<PoolConfig>,
    next_id: AtomicU64,
    /// Woken when an idle connection may have died, so the reaper looks at once.
    wake: Arc<Notify>,
    closed: AtomicBool,
    /// The last decisions (bounded ring), and per-decision totals since start.
    recent: Mutex<VecDeque<DecisionRecord>>,
    /// Decisions since start: reuse, new, bypass.
    totals: [AtomicU64; 3],
    /// Woken when a busy slot is released (returned or removed): one notifier per shard of
    /// keys, so a release wakes only the reconnects waiting on keys of its shard, not every
    /// waiter in the pool.
    released: [Notify; RELEASE_SHARDS],
    /// Decision counters and reuse ages (pre-registered).
    metrics: crate::metrics::PoolMetrics,
}

/// Shards of [`Inner::released`].
const RELEASE_SHARDS: usize = 64;

fn release_shard<S: std::hash::BuildHasher>(hasher: &S, key: &PoolKey) -> usize {
    (hasher.hash_one(key) % RELEASE_SHARDS as u64) as usize
}

struct Slot<C> {
    /// The id of the connection this slot holds (or is dialing).
    conn_id: u64,
    state: SlotState<C>,
    /// Set when the slot was evicted while checked out: its guard discards on return.
    evicted: bool,
    /// The connection's shared facts, once attached.
    meta: Option<Arc<ConnMeta>>,
}

enum SlotState<C> {
    Dialing,
    Busy,
    Idle { conn: C, since: Instant },
}

/// What a checkout produced: the decision (already logged) and the guard.
pub struct Checkout<C: PoolConn> {
    pub decision: Decision,
    pub pooled: Pooled<C>,
}

impl<C: PoolConn> Pool<C> {
    pub fn new(limits: PoolConfig) -> Self {
        Pool {
            inner: Arc::new(Inner {
                slots: DashMap::with_hasher(foldhash::quality::RandomState::default()),
                per_account: Mutex::new(HashMap::new()),
                total: Arc::new(AtomicUsize::new(0)),
                one_shots: Arc::new(AtomicUsize::new(0)),
                tombstones: Mutex::new(FifoMap::default()),
                limits: RwLock::new(limits),
                next_id: AtomicU64::new(1),
                wake: Arc::new(Notify::new()),
                closed: AtomicBool::new(false),
                recent: Mutex::new(VecDeque::with_capacity(RECENT_DECISIONS)),
                totals: Default::default(),
                released: std::array::from_fn(|_| Notify::new()),
                metrics: crate::metrics::PoolMetrics::new(),
            }),
        }
    }

    /// The notifier a connection pokes when it dies, so the reaper evicts it promptly.
    pub fn waker(&self) -> Arc<Notify> {
        self.inner.wake.clone()
    }

    pub fn limits(&self) -> PoolConfig {
        self.inner.limits().clone()
    }

    /// Replaces the limits; they apply to the next checkout.
    pub fn set_limits(&self, limits: PoolConfig) {
        if let Ok(mut l) = self.inner.limits.write() {
            *l = limits;
        }
    }

    /// Acquires a connection for `key` (or an unpooled one when `key` is `None`).
    ///
    /// For [`Decision::Reuse`] the guard holds the connection. Otherwise the guard holds a
    /// fresh upstream id ([`Pooled::id`]); the caller dials and [`Pooled::attach`]es, or drops
    /// the guard on failure, which releases the reservation.
    pub fn checkout(
        &self,
        key: Option<PoolKey>,
        account: &AccountId,
    ) -> Result<Checkout<C>, AtCapacity> {
        self.checkout_with(key, account, &CheckoutOptions::default())
    }

    /// [`Pool::checkout`] with an account-specific cap (`accounts[].max_connections`), a
    /// reason that overrides the `new` reason (the stale-reuse retry), and the affinity for
    /// the decision line.
    pub fn checkout_with(
        &self,
        key: Option<PoolKey>,
        account: &AccountId,
        opts: &CheckoutOptions,
    ) -> Result<Checkout<C>, AtCapacity> {
        let inner = &self.inner;
        let limits = inner.limits().clone();
        let now = Instant::now();
        let (decision, pooled) = match key {
            None => (
                Decision::Bypass(BypassReason::NoKey),
                self.unpooled(account, None, &limits),
            ),
            Some(key) if !limits.enabled || inner.closed.load(Ordering::Acquire) => (
                Decision::Bypass(BypassReason::Disabled),
                // Unpooled, but the log still names the conversation.
                self.unpooled(account, Some(key), &limits),
            ),
            Some(key) => self.checkout_key(key, &limits, opts, now),
        };
        let Some(mut pooled) = pooled else {
            info!(account = %account, max_total = limits.max_total, "pool refused: at capacity");
            return Err(AtCapacity);
        };
        let age = match (&decision, &pooled.conn) {
            (Decision::Reuse, Some(c)) => Some(now.saturating_duration_since(c.created_at())),
            _ => None,
        };
        self.record_decision(decision, account, pooled.key.as_ref(), opts, pooled.id, age);
        pooled.decision = decision;
        Ok(Checkout { decision, pooled })
    }

    /// Logs one decision line (DESIGN §3), counts it, and keeps it for the status page.
    fn record_decision(
        &self,
        decision: Decision,
        account: &AccountId,
        key: Option<&PoolKey>,
        opts: &CheckoutOptions,
        id: u64,
        age: Option<Duration>,
    ) {
        let conversation = key.map(|k| k.conversation.as_str()).unwrap_or("-");
        let client = key.map(|k| k.client.as_str()).unwrap_or("-");
        let affinity = opts
            .affinity
            .as_ref()
            .filter(|a| key.is_none_or(|k| &k.conversation != *a));
        // `None` fields are left out of the line.
        info!(
            decision = %decision,
            reason = %decision.reason(),
            ingress = %opts.ingress.label(),
            client = %client,
            account = %account,
            conversation = %conversation,
            affinity = affinity.map(tracing::field::display),
            upstream.id = id,
            upstream.age_ms = age.map(|a| a.as_millis() as u64),
            "pool decision"
        );
        self.inner.metrics.decision(decision, age);
        self.inner.totals[decision.slot()].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.inner.recent.lock() {
            if r.len() == RECENT_DECISIONS {
                r.pop_front();
            }
            r.push_back(DecisionRecord {
                at: Instant::now(),
                decision,
                account: account.clone(),
                client: key.map(|k| k.client.clone()),
                conversation: key.map(|k| k.conversation.clone()),
                affinity: affinity.cloned(),
                ingress: opts.ingress,
                upstream_id: id,
            });
        }
    }

    /// Decisions since start (status page).
    pub fn decision_totals(&self) -> crate::status::DecisionTotals {
        let t = |i: usize| self.inner.totals[i].load(Ordering::Relaxed);
        crate::status::DecisionTotals {
            reuse: t(0),
            new: t(1),
            bypass: t(2),
            hit_rate: None,
        }
    }

    /// The last decisions, oldest first (status page).
    pub fn recent_decisions(&self) -> Vec<DecisionRecord> {
        self.inner
            .recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every slot (status page, gauges).
    pub fn snapshot(&self) -> Vec<SlotSnapshot> {
        self.inner
            .slots
            .iter()
            .map(|e| {
                let slot = e.value();
                let (state, idle_since) = match &slot.state {
                    SlotState::Dialing => ("dialing", None),
                    SlotState::Busy => ("busy", None),
                    SlotState::Idle { since, .. } => ("idle", Some(*since)),
                };
                SlotSnapshot {
                    key: e.key().clone(),
                    upstream_id: slot.conn_id,
                    state,
                    meta: slot.meta.clone(),
                    idle_since,
                }
            })
            .collect()
    }

    /// A guard on `key`'s slot; reused when it comes with an idle connection. Not reusable
    /// until its holder says so.
    fn pooled(&self, key: PoolKey, id: u64, conn: Option<C>) -> Pooled<C> {
        Pooled {
            reused: conn.is_some(),
            conn,
            id,
            account: key.account.clone(),
            key: Some(key),
            pool: Arc::downgrade(&self.inner),
            reusable: false,
            decision: Decision::Reuse,
            _shot: None,
        }
    }

    /// A one-shot guard (its key, if any, only names the conversation in logs), holding a
    /// `max_total` lease; `None` when the pool is at capacity.
    fn unpooled(
        &self,
        account: &AccountId,
        key: Option<PoolKey>,
        limits: &PoolConfig,
    ) -> Option<Pooled<C>> {
        let shot = OneShotLease::take(&self.inner, limits.max_total)?;
        Some(Pooled {
            decision: Decision::Bypass(BypassReason::NoKey),
            conn: None,
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            key,
            account: account.clone(),
            pool: Weak::new(),
            reusable: false,
            reused: false,
            _shot: Some(shot),
        })
    }

    /// Hands out the idle pooled connection of `key` if `owns` says it holds the state the
    /// caller needs (owner routing of `previous_response_id`). Logged as `reuse`.
    pub fn checkout_owner(&self, key: &PoolKey, owns: impl Fn(&C) -> bool) -> Option<Checkout<C>> {
        let limits = self.inner.limits().clone();
        let now = Instant::now();
        let conn = {
            let mut slot = self.inner.slots.get_mut(key)?;
            let conn_id = slot.conn_id;
            let SlotState::Idle { conn, .. } = &mut slot.state else {
                return None;
            };
            if !owns(conn)
                || now.saturating_duration_since(conn.created_at()) >= limits.max_age
                || conn.check_idle() != Health::Ok
            {
                return None;
            }
            let SlotState::Idle { conn, .. } = std::mem::replace(&mut slot.state, SlotState::Busy)
            else {
                return None;
            };
            (conn, conn_id)
        };
        let (conn, id) = conn;
        let age = now.saturating_duration_since(conn.created_at());
        let opts = CheckoutOptions::default();
        self.record_decision(
            Decision::Reuse,
            &key.account,
            Some(key),
            &opts,
            id,
            Some(age),
        );
        Some(Checkout {
            decision: Decision::Reuse,
            pooled: self.pooled(key.clone(), id, Some(conn)),
        })
    }

    fn checkout_key(
        &self,
        key: PoolKey,
        limits: &PoolConfig,
        opts: &CheckoutOptions,
        now: Instant,
    ) -> (Decision, Option<Pooled<C>>) {
        let hint = opts.hint;
        let inner = &self.inner;
        if !inner.slots.contains_key(&key) {
            inner.make_room(&key.account, limits, opts.account_cap);
        }
        // Connections taken out of the pool are dropped after the shard lock is released.
        let mut doomed: Option<C> = None;
        let outcome = match inner.slots.entry(key.clone()) {
            Entry::Occupied(mut e) => {
                let slot = e.get_mut();
                match &mut slot.state {
                    SlotState::Dialing | SlotState::Busy => {
                        Err(Decision::Bypass(BypassReason::Busy))
                    }
                    SlotState::Idle { conn, .. } => {
                        let verdict =
                            if now.saturating_duration_since(conn.created_at()) >= limits.max_age {
                                Health::Dead(EvictReason::MaxAge)
                            } else {
                                conn.check_idle()
                            };
                        let old_id = slot.conn_id;
                        match verdict {
                            Health::Ok => {
                                let SlotState::Idle { conn, .. } =
                                    std::mem::replace(&mut slot.state, SlotState::Busy)
                                else {
                                    unreachable!("matched Idle above")
                                };
                                Ok((Decision::Reuse, Some(conn), old_id))
                            }
                            Health::Dead(reason) => {
                                // The slot (and its reservation) passes to the replacement dial.
                                let SlotState::Idle { conn, .. } =
                                    std::mem::replace(&mut slot.state, SlotState::Dialing)
                                else {
                                    unreachable!("matched Idle above")
                                };
                                doomed = Some(conn);
                                log_evict(reason, &key, old_id);
                                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                                slot.conn_id = id;
                                let reason = hint.unwrap_or(reason.next_new_reason());
                                Ok((Decision::New(reason), None, id))
                            }
                        }
                    }
                }
            }
            Entry::Vacant(v) => {
                if inner.reserve(&key.account, limits, opts.account_cap) {
                    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                    v.insert(Slot {
                        meta: None,
                        conn_id: id,
                        state: SlotState::Dialing,
                        evicted: false,
                    });
                    let remembered = inner
                        .tombstones
                        .lock()
                        .ok()
                        .and_then(|mut t| t.remove(&key))
                        .map(EvictReason::next_new_reason)
                        .unwrap_or(NewReason::Miss);
                    let reason = hint.unwrap_or(remembered);
                    Ok((Decision::New(reason), None, id))
                } else {
                    Err(Decision::Bypass(BypassReason::Cap))
                }
            }
        };
        drop(doomed);
        match outcome {
            Ok((decision, conn, id)) => (decision, Some(self.pooled(key, id, conn))),
            // Bypass connections are unpooled but the log still names the conversation.
            Err(decision) => {
                let account = key.account.clone();
                (decision, self.unpooled(&account, Some(key), limits))
            }
        }
    }

    /// Waits, at most `timeout`, until `key` is not held by another session (busy or dialing).
    pub async fn wait_released(&self, key: &PoolKey, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            // Register before looking, so a release between the look and the wait is not lost.
            let notified =
                self.inner.released[release_shard(self.inner.slots.hasher(), key)].notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let held = self
                .inner
                .slots
                .get(key)
                .is_some_and(|s| matches!(s.state, SlotState::Busy | SlotState::Dialing));
            if !held || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Evicts every pooled connection of `account` (account change). Idle ones are closed
    /// now; busy ones finish their session and are discarded on return.
    pub fn evict_account(&self, account: &AccountId, reason: EvictReason) -> usize {
        let keys: Vec<PoolKey> = self
            .inner
            .slots
            .iter()
            .filter(|e| &e.key().account == account)
            .map(|e| e.key().clone())
            .collect();
        keys.iter()
            .filter(|k| self.inner.evict_key(k, reason, None))
            .count()
    }

    /// Evicts the pooled connection of `key`, whatever its state.
    pub fn evict_key(&self, key: &PoolKey, reason: EvictReason) -> bool {
        self.inner.evict_key(key, reason, None)
    }

    /// Closes the pool: idle connections are evicted (`shutdown`), busy ones are discarded on
    /// return, and every later checkout is `bypass reason=disabled`.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let keys: Vec<PoolKey> = self.inner.slots.iter().map(|e| e.key().clone()).collect();
        for k in keys {
            self.inner
                .evict_idle_if(&k, |_, _| Some(EvictReason::Shutdown));
        }
    }

    /// Looks at every idle connection: expired, idle too long, or dead ones are evicted.
    pub fn reap(&self) {
        self.inner.reap(Instant::now());
    }

    pub fn stats(&self) -> PoolStats {
        let mut s = PoolStats {
            total: self.inner.total.load(Ordering::Acquire),
            one_shots: self.inner.one_shots.load(Ordering::Acquire),
            ..Default::default()
        };
        for e in self.inner.slots.iter() {
            match e.value().state {
                SlotState::Dialing => s.dialing += 1,
                SlotState::Busy => s.busy += 1,
                SlotState::Idle { .. } => s.idle += 1,
            }
        }
        if let Ok(p) = self.inner.per_account.lock() {
            s.reserved_by_account = p.values().sum();
            s.account_entries = p.len();
        }
        s.tombstones = self.inner.tombstones.lock().map(|t| t.len()).unwrap_or(0);
        s
    }

    /// Reserved slots per account (tests, status).
    pub fn account_count(&self, account: &AccountId) -> usize {
        self.inner
            .per_account
            .lock()
            .ok()
            .and_then(|m| m.get(account).copied())
            .unwrap_or(0)
    }

    /// The reaper's period for the current limits.
    pub fn reap_interval(&self) -> Duration {
        let l = self.inner.limits();
        (l.idle_timeout.min(l.max_age).min(l.unused_idle_timeout) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1))
    }

    fn downgrade(&self) -> Weak<Inner<C>> {
        Arc::downgrade(&self.inner)
    }
}

#[cfg(test)]
mod tests;
