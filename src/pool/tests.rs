//! Socket-free pool tests with fake connections under paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::*;

struct FakeConn {
    id: u64,
    created_at: Instant,
    health: Arc<std::sync::Mutex<Health>>,
    dropped: Arc<AtomicBool>,
}

impl PoolConn for FakeConn {
    fn id(&self) -> u64 {
        self.id
    }
    fn created_at(&self) -> Instant {
        self.created_at
    }
    fn check_idle(&mut self) -> Health {
        *self.health.lock().unwrap()
    }
}

impl Drop for FakeConn {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

struct Handle {
    health: Arc<std::sync::Mutex<Health>>,
    dropped: Arc<AtomicBool>,
}

fn fake(id: u64) -> (FakeConn, Handle) {
    let health = Arc::new(std::sync::Mutex::new(Health::Ok));
    let dropped = Arc::new(AtomicBool::new(false));
    (
        FakeConn {
            id,
            created_at: Instant::now(),
            health: health.clone(),
            dropped: dropped.clone(),
        },
        Handle { health, dropped },
    )
}

fn limits() -> PoolConfig {
    PoolConfig {
        max_age: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(30),
        max_per_account: 2,
        max_total: 3,
        ..PoolConfig::default()
    }
}

fn key(a: &str, c: &str) -> PoolKey {
    PoolKey {
        client: "t".into(),
        account: a.into(),
        conversation: c.into(),
    }
}

/// Checks out `k` expecting a dial, attaches a fake, marks it reusable.
fn dial(pool: &Pool<FakeConn>, k: &PoolKey) -> (Decision, Pooled<FakeConn>, Handle) {
    let Checkout {
        decision,
        mut pooled,
    } = pool.checkout(Some(k.clone()), &k.account).unwrap();
    assert!(pooled.conn().is_none(), "{decision:?} must dial");
    let (c, h) = fake(pooled.id());
    pooled.attach(c);
    pooled.set_reusable(true);
    (decision, pooled, h)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn reuse_after_clean_release() {
    let pool = Pool::new(limits());
    let k = key("a", "c1");
    let (d, p, h) = dial(&pool, &k);
    assert_eq!(d, Decision::New(NewReason::Miss));
    let id = p.id();
    p.release();
    assert!(!h.dropped.load(Ordering::SeqCst));
    assert_eq!(pool.stats().idle, 1);
    let co = pool.checkout(Some(k.clone()), &k.account).unwrap();
    assert_eq!(co.decision, Decision::Reuse);
    assert_eq!(co.pooled.id(), id);
    assert!(co.pooled.is_reused());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn poisoned_guard_is_discarded_not_returned() {
    let pool = Pool::new(limits());
    let k = key("a", "c1");
    let (_, mut p, h) = dial(&pool, &k);
    p.set_reusable(false);
    drop(p);
    assert!(h.dropped.load(Ordering::SeqCst));
    assert_eq!(
        pool.stats(),
        PoolStats {
            tombstones: 1,
            ..Default::default()
        }
    );
    assert_eq!(pool.account_count(&k.account), 0, "reservation released");
    let co = pool.checkout(Some(k.clone()), &k.account).unwrap();
    assert_eq!(co.decision, Decision::New(NewReason::Discarded));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn busy_key_bypasses_and_dial_failure_releases() {
    let pool = Pool::<FakeConn>::new(limits());
    let k = key("a", "c1");
    let first = pool.checkout(Some(k.clone()), &k.account).unwrap();
    assert_eq!(first.decision, Decision::New(NewReason::Miss));
    let second = pool.checkout(Some(k.clone()), &k.account).unwrap();
    assert_eq!(second.decision, Decision::Bypass(BypassReason::Busy));
    assert!(!second.pooled.is_pooled());
    drop(first); // dial failed: nothing attached
    assert_eq!(pool.stats().total, 1, "the one-shot still counts");
    drop(second);
    assert_eq!(pool.stats().total, 0);
    assert_eq!(
        pool.checkout(Some(k.clone()), &k.account).unwrap().decision,
        Decision::New(NewReason::Miss)
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn caps_count_dials_in_progress_and_one_shots() {
    let pool = Pool::<FakeConn>::new(limits());
    let a1 = pool.checkout(Some(key("a", "1")), &"a".into()).unwrap();
    let a2 = pool.checkout(Some(key("a", "2")), &"a".into()).unwrap();
    let a3 = pool.checkout(Some(key("a", "3")), &"a".into()).unwrap();
    assert_eq!(
        a3.decision,
        Decision::Bypass(BypassReason::Cap),
        "per-account cap"
    );
    // The one-shot counts against max_total (3): nothing more may be dialed.
    assert_eq!(pool.stats().one_shots, 1);
    assert!(pool.checkout(Some(key("b", "1")), &"b".into()).is_err());
    assert!(
        pool.checkout(None, &"b".into()).is_err(),
        "no-key one-shots too"
    );
    drop(a3);
    let b1 = pool.checkout(Some(key("b", "1")), &"b".into()).unwrap();
    assert_eq!(b1.decision, Decision::New(NewReason::Miss));
    assert_eq!(
        pool.checkout(Some(key("b", "2")), &"b".into()).err(),
        Some(AtCapacity),
        "total cap"
    );
    assert_eq!(pool.stats().dialing, 3);
    drop((a1, a2, b1));
    assert_eq!(pool.stats().total, 0);
    assert_eq!(pool.stats().one_shots, 0);
    assert_eq!(pool.account_count(&"a".into()), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn max_age_at_checkout_and_at_return() {
    let pool = Pool::new(limits());
    let k = key("a", "c1");
    let (_, p, h) = dial(&pool, &k);
    p.release();
    tokio::time::sleep(Duration::from_secs(61)).await;
    // Expired at checkout: evicted, and the replacement says why.
    let co = pool.checkout(Some(k.clone()), &k.account).unwrap();
    assert_eq!(co.decision, Decision::New(NewReason::Expired));
    assert!(h.dropped.load(Ordering::SeqCst));
    let mut p = co.pooled;
    let (c, h2) = fake(p.id());
    p.attach(c);
    p.set_reusable(true);
    // A long turn: it is never cut, but the connection is not returned once past max_age.
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(!h2.dropped.load(Ordering::SeqCst), "never cut mid-turn");
    drop(p);
    assert!(h2.dropped.load(Ordering::SeqCst));
    assert_eq!(
        pool.checkout(Some(k.clone()), &k.account).unwrap().decision,
        Decision::New(NewReason::Expired)
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn dead_idle_connection_is_replaced() {
    let pool = Pool::new(limits());
    let k = key("a", "c1");
    let (_, p, h) = dial(&pool, &k);
    p.release();
    *h.health.lock().unwrap() = Health::Dead(EvictReason::Dead);
    let co = pool.checkout(Some(k.clone()), &k.account).unwrap();
    assert_eq!(co.decision, Decision::New(NewReason::Dead));
    assert!(h.dropped.load(Ordering::SeqCst));
    assert_eq!(pool.stats().total, 1, "the slot passed to the replacement");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn evict_key_1012_then_new_evicted() {
    let pool = Pool::new(limits());
    let k = key("a", "c1");
    let (_, p, h) = dial(&pool, &k);
    p.evict(EvictReason::Close1012);
    assert!(h.dropped.load(Ordering::SeqCst));
    assert_eq!(pool.stats().total, 0);
    assert_eq!(
        pool.checkout(Some(k.clone()), &k.account).unwrap().decision,
        Decision::New(NewReason::Evicted)
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn account_eviction_idle_now_busy_on_return() {
    let pool = Pool::new(limits());
    let idle = key("a", "idle");
    let busy = key("a", "busy");
    let other = key("b", "x");
    let (_, p, hi) = dial(&pool, &idle);
    p.release();
    let (_, pb, hb) = dial(&pool, &busy);
    let (_, po, ho) = dial(&pool, &other);
    po.release();
    assert_eq!(
        pool.evict_account(&"a".into(), EvictReason::AccountChanged),
        2
    );
    assert!(hi.dropped.load(Ordering::SeqCst), "idle closed at once");
    assert!(!hb.dropped.load(Ordering::SeqCst), "busy stream finishes");
    drop(pb); // reusable, but evicted: discarded
    assert!(hb.dropped.load(Ordering::SeqCst));
    assert!(
        !ho.dropped.load(Ordering::SeqCst),
        "other account untouched"
    );
    assert_eq!(pool.stats().total, 1);
    assert_eq!(pool.account_count(&"a".into()), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn reaper_evicts_idle_timeout_and_dead() {
    let pool = Pool::new(limits());
    let _reaper = spawn_reaper(&pool);
    let k1 = key("a", "1");
    let k2 = key("a", "2");
    let (_, p1, h1) = dial(&pool, &k1);
    p1.release();
    let (_, p2, h2) = dial(&pool, &k2);
    p2.release();
    *h2.health.lock().unwrap() = Health::Dead(EvictReason::Close1013);
    pool.waker().notify_one();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        h2.dropped.load(Ordering::SeqCst),
        "dead conn evicted on wake"
    );
    assert!(!h1.dropped.load(Ordering::SeqCst));
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(h1.dropped.load(Ordering::SeqCst), "idle timeout");
    assert_eq!(pool.stats().total, 0);
    assert_eq!(
        pool.checkout(Some(k2.clone()), &k2.account)
            .unwrap()
            .decision,
        Decision::New(NewReason::Evicted)
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn unpooled_paths() {
    let pool = Pool::<FakeConn>::new(PoolConfig {
        enabled: false,
        ..limits()
    });
    assert_eq!(
        pool.checkout(None, &"a".into()).unwrap().decision,
        Decision::Bypass(BypassReason::NoKey)
    );
    assert_eq!(
        pool.checkout(Some(key("a", "1")), &"a".into())
            .unwrap()
            .decision,
        Decision::Bypass(BypassReason::Disabled)
    );
    assert_eq!(pool.stats().total, 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn close_evicts_idle_and_disables() {
    let pool = Pool::new(limits());
    let k = key("a", "1");
    let (_, p, h) = dial(&pool, &k);
    p.release();
    pool.close();
    assert!(h.dropped.load(Ordering::SeqCst));
    assert_eq!(
        pool.checkout(Some(k.clone()), &k.account).unwrap().decision,
        Decision::Bypass(BypassReason::Disabled)
    );
}

#[test]
fn tombstones_are_bounded() {
    let mut t = FifoMap::default();
    for i in 0..1000 {
        t.insert(key("a", &format!("{}", i % 7)), EvictReason::Dead, 5);
        t.insert(key("a", &format!("x{i}")), EvictReason::Dead, 5);
    }
    assert!(t.len() <= 5);
    assert!(t.queued() <= 5 * 2 + 16);
}

#[test]
fn decision_reasons_match_design() {
    assert_eq!(Decision::Reuse.reason(), "-");
    assert_eq!(Decision::New(NewReason::Expired).reason(), "expired");
    assert_eq!(Decision::Bypass(BypassReason::NoKey).reason(), "no_key");
    assert_eq!(EvictReason::Close1012.to_string(), "close_1012");
    assert_eq!(EvictReason::AccountChanged.to_string(), "account_changed");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn disabled_bypass_keeps_the_conversation_for_the_log() {
    let pool = Pool::<FakeConn>::new(PoolConfig {
        enabled: false,
        ..limits()
    });
    let co = pool.checkout(Some(key("a", "c9")), &"a".into()).unwrap();
    assert_eq!(co.decision, Decision::Bypass(BypassReason::Disabled));
    assert_eq!(co.pooled.key().map(|k| k.conversation.as_str()), Some("c9"));
    assert!(!co.pooled.is_pooled());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn attach_moves_the_slot_from_dialing_to_busy() {
    let pool = Pool::new(limits());
    let k = key("a", "c1");
    let co = pool.checkout(Some(k.clone()), &k.account).unwrap();
    assert_eq!(pool.stats().dialing, 1);
    let mut p = co.pooled;
    let (c, _h) = fake(p.id());
    p.attach(c);
    assert_eq!((pool.stats().dialing, pool.stats().busy), (0, 1));
    assert_eq!(pool.snapshot()[0].state, "busy");
}

/// A reconnect waiting for its key's previous session wakes when that key is released, and
/// only then: releases of keys in other shards do not wake it (no pool-wide herd).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_reconnect_waits_for_its_own_key_only() {
    let mut limits = limits();
    limits.max_per_account = 10;
    limits.max_total = 10;
    let pool = Arc::new(Pool::new(limits));
    let k = key("a", "c1");
    // A key in another release shard.
    let other = (2..200)
        .map(|i| key("a", &format!("c{i}")))
        .find(|o| {
            release_shard(pool.inner.slots.hasher(), o)
                != release_shard(pool.inner.slots.hasher(), &k)
        })
        .expect("a key in another shard");
    let (_, mine, _h1) = dial(&pool, &k);
    let (_, theirs, _h2) = dial(&pool, &other);
    let started = Instant::now();
    let waiter = tokio::spawn({
        let (pool, k) = (pool.clone(), k.clone());
        async move {
            let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = polls.clone();
            let wait = pool.wait_released(&k, Duration::from_secs(5));
            tokio::pin!(wait);
            std::future::poll_fn(|cx| {
                counted.fetch_add(1, Ordering::SeqCst);
                wait.as_mut().poll(cx)
            })
            .await;
            (Instant::now(), polls.load(Ordering::SeqCst))
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    theirs.release(); // another shard: the waiter is not woken
    tokio::time::sleep(Duration::from_millis(100)).await;
    mine.release();
    let (woke, polls) = waiter.await.unwrap();
    assert_eq!(
        woke.duration_since(started),
        Duration::from_millis(200),
        "woken by its own release"
    );
    assert_eq!(
        polls, 2,
        "polled once to wait and once when its key was released"
    );
    assert_eq!(
        pool.checkout(Some(k.clone()), &k.account).unwrap().decision,
        Decision::Reuse
    );
}
