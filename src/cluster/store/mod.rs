//! The Redis side of [`super::Cluster`]: the connection (a redis-rs `ConnectionManager` plus
//! one pub/sub connection), calls under a deadline, the degraded switch, the background
//! writer, and the supervisor that connects, listens, beats and republishes (the last two in
//! `supervisor`).
//!
//! Life of the connection: CONNECTING (start; calls answer "no shared state") -> UP after the
//! first connect and resync -> DOWN when any call fails or the subscription ends (one
//! `cluster degraded` line) -> the supervisor retries every second -> UP again after a resync
//! (`cluster recovered`). Only the supervisor's retries touch Redis while DOWN.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::RedisResult;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::keys::Keys;
use super::{AccountNotice, ClusterStatus, InstanceView, SharedAccountView, SharedState};
use crate::config::ClusterConfig;
use crate::telemetry::escape;

mod supervisor;

pub(super) use supervisor::spawn;

const CONNECTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Background writes waiting for the writer; past this they are dropped (counted as
/// fallbacks): what matters is republished after an outage anyway.
const WRITE_QUEUE: usize = 4096;
/// Notices from other instances waiting to be applied.
const NOTICE_QUEUE: usize = 256;
/// Between reconnect attempts while DOWN.
const RETRY: Duration = Duration::from_secs(1);
/// The longest unusable state taken from Redis (the upstream's own `resets_in_seconds` is
/// clamped the same way): a hostile or corrupt value cannot park an account for ever, or
/// overflow a deadline.
const MAX_SHARED_STATE: Duration = Duration::from_secs(7 * 86400);

/// A write that does not need an answer.
pub(super) enum Write {
    Owner {
        key: String,
        value: String,
        ttl_ms: u64,
    },
    Release {
        key: String,
        member: String,
    },
    AccountState {
        account: String,
        state: SharedState,
        ms: u64,
    },
    Registry,
}

struct Registry {
    addr: Option<SocketAddr>,
    state: &'static str,
}

pub(super) struct Inner {
    pub cfg: ClusterConfig,
    pub instance: String,
    pub keys: Keys,
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    state: AtomicU8,
    /// Poked when a call fails, so the supervisor drops the connection and reconnects.
    lost: Notify,
    writes: mpsc::Sender<Write>,
    writes_rx: Mutex<Option<mpsc::Receiver<Write>>>,
    notices: mpsc::Sender<AccountNotice>,
    /// This instance's leases: client name -> members (bounded by its live sessions).
    leases: Mutex<HashMap<String, HashSet<String>>>,
    /// What this instance announced: account -> (state, until), bounded by the accounts.
    published: Mutex<HashMap<String, (SharedState, Instant)>>,
    pub accounts: RwLock<Vec<String>>,
    registry: Mutex<Registry>,
    pub next_lease: AtomicU64,
    pub stop: CancellationToken,
    started_ms: u64,
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `<hostname>-<pid>`.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wsgate".into());
    format!("{host}-{}", std::process::id())
}

fn fallback(op: &'static str) {
    ::metrics::counter!(crate::metrics::CLUSTER_FALLBACKS, "op" => op).increment(1);
}

impl Inner {
    pub fn new(
        cfg: &ClusterConfig,
        client: redis::Client,
        accounts: Vec<String>,
    ) -> (Arc<Inner>, mpsc::Receiver<AccountNotice>) {
        let (writes, writes_rx) = mpsc::channel(WRITE_QUEUE);
        let (notices, notices_rx) = mpsc::channel(NOTICE_QUEUE);
        let inner = Arc::new(Inner {
            instance: cfg.instance_id.clone().unwrap_or_else(default_instance_id),
            keys: Keys::new(&cfg.namespace),
            cfg: cfg.clone(),
            client,
            conn: Mutex::new(None),
            state: AtomicU8::new(CONNECTING),
            lost: Notify::new(),
            writes,
            writes_rx: Mutex::new(Some(writes_rx)),
            notices,
            leases: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            accounts: RwLock::new(accounts),
            registry: Mutex::new(Registry {
                addr: None,
                state: "serving",
            }),
            next_lease: AtomicU64::new(1),
            stop: CancellationToken::new(),
            started_ms: epoch_ms(),
        });
        ::metrics::gauge!(crate::metrics::CLUSTER_DEGRADED).set(1.0);
        (inner, notices_rx)
    }

    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == UP
    }

    /// Runs one Redis call if the connection is up, under `cluster.call_timeout`. `None` =
    /// no shared answer (the caller decides locally; counted as a fallback).
    pub async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = if self.is_up() {
            self.connection()
        } else {
            None
        };
        let Some(conn) = conn else {
            fallback(op);
            return None;
        };
        self.exec(op, conn, f).await
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn.lock().ok().and_then(|c| c.clone())
    }

    /// One call on `conn`, whatever the state (the supervisor's resync uses it before UP).
    async fn exec<T, F, Fut>(&self, op: &'static str, conn: ConnectionManager, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        match tokio::time::timeout(self.cfg.call_timeout, f(conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(op, &e.to_string());
                None
            }
            Err(_) => {
                self.failed(op, "timed out");
                None
            }
        }
    }

    fn failed(&self, op: &'static str, why: &str) {
        fallback(op);
        self.degrade(op, why);
    }

    /// A Redis error (counted): switches to local decisions; logs once per outage.
    fn degrade(&self, op: &'static str, why: &str) {
        ::metrics::counter!(crate::metrics::CLUSTER_REDIS_ERRORS, "op" => op).increment(1);
        if self.state.swap(DOWN, Ordering::AcqRel) != DOWN {
            ::metrics::gauge!(crate::metrics::CLUSTER_DEGRADED).set(1.0);
            warn!(
                instance = %self.instance,
                op = %op,
                reason = %escape(why, 200),
                "cluster degraded: Redis is not answering; deciding on local state until it does"
            );
        }
        self.lost.notify_one();
    }

    /// Queues a background write (dropped, and counted, when the queue is full).
    pub fn write(&self, w: Write) {
        if self.writes.try_send(w).is_err() {
            fallback("write_queue_full");
        }
    }

    pub fn share_account_state(&self, account: &str, state: SharedState, remaining: Duration) {
        if let Ok(mut p) = self.published.lock() {
            p.retain(|_, (_, until)| *until > Instant::now());
            p.insert(account.to_string(), (state, Instant::now() + remaining));
        }
        self.write(Write::AccountState {
            account: account.to_string(),
            state,
            ms: remaining.as_millis().max(1) as u64,
        });
    }

    pub fn hold_lease(&self, client: &str, member: &str) {
        if let Ok(mut l) = self.leases.lock() {
            l.entry(client.to_string())
                .or_default()
                .insert(member.to_string());
        }
    }

    pub fn release_lease(&self, client: &str, member: &str) {
        if let Ok(mut l) = self.leases.lock()
            && let Some(set) = l.get_mut(client)
        {
            set.remove(member);
            if set.is_empty() {
                l.remove(client);
            }
        }
        self.write(Write::Release {
            key: self.keys.client_leases(client),
            member: member.to_string(),
        });
    }

    pub fn set_registry(&self, addr: Option<SocketAddr>, state: Option<&'static str>) {
        if let Ok(mut r) = self.registry.lock() {
            if addr.is_some() {
                r.addr = addr;
            }
            if let Some(s) = state {
                r.state = s;
            }
        }
        self.write(Write::Registry);
    }

    fn registry_entry(&self) -> String {
        let (addr, state) = self
            .registry
            .lock()
            .map(|r| (r.addr.map(|a| a.to_string()), r.state))
            .unwrap_or((None, "serving"));
        serde_json::json!({
            "addr": addr,
            "state": state,
            "started_ms": self.started_ms,
            "expires_ms": epoch_ms() + 3 * self.cfg.heartbeat.as_millis() as u64,
        })
        .to_string()
    }

    pub async fn leave(&self) {
        let Some(conn) = self.connection().filter(|_| self.is_up()) else {
            return;
        };
        self.unregister(conn, vec![self.instance.clone()]).await;
    }

    /// Removes instances (this one leaving, or expired entries) from the instance registry.
    async fn unregister(&self, conn: ConnectionManager, ids: Vec<String>) {
        let key = self.keys.instances();
        self.exec("registry", conn, move |mut c| async move {
            redis::cmd("HDEL")
                .arg(&key)
                .arg(&ids)
                .query_async::<()>(&mut c)
                .await
        })
        .await;
    }

    pub async fn status(&self) -> ClusterStatus {
        let mut status = ClusterStatus {
            enabled: true,
            instance: Some(self.instance.clone()),
            degraded: !self.is_up(),
            ..Default::default()
        };
        let Some(conn) = self.connection().filter(|_| self.is_up()) else {
            return status;
        };
        let key = self.keys.instances();
        let all: HashMap<String, String> = self
            .exec("status", conn.clone(), move |mut c| async move {
                redis::cmd("HGETALL").arg(&key).query_async(&mut c).await
            })
            .await
            .unwrap_or_default();
        let now = epoch_ms();
        let mut expired = Vec::new();
        for (id, text) in all {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if v["expires_ms"].as_u64().is_none_or(|e| e < now) {
                expired.push(id);
                continue;
            }
            status.instances.push(InstanceView {
                this: id == self.instance,
                id: escape(&id, 64),
                addr: v["addr"].as_str().map(|a| escape(a, 64)),
                state: escape(v["state"].as_str().unwrap_or("?"), 16),
            });
        }
        status.instances.sort_by(|a, b| a.id.cmp(&b.id));
        if !expired.is_empty() {
            self.unregister(conn.clone(), expired).await;
        }
        status.accounts = self
            .read_account_states(&conn)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(id, state, left)| SharedAccountView {
                id,
                state: state.label().into(),
                remaining_s: left.as_secs_f64(),
            })
            .collect();
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner() -> (Arc<Inner>, mpsc::Receiver<AccountNotice>) {
        let cfg = ClusterConfig {
            redis_url: Some("redis://127.0.0.1:1/".into()),
            instance_id: Some("me".into()),
            ..Default::default()
        };
        // Opening a client does not connect; nothing here touches the network.
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        Inner::new(&cfg, client, vec!["acct-a".into(), "acct-b".into()])
    }

    #[test]
    fn events_from_others_are_applied_and_hostile_ones_are_not() {
        let (i, mut rx) = inner();
        let tag = i.keys.account_tag("acct-b");
        let event = |from: &str, account: &str, state: &str, ms: u64| {
            serde_json::json!({"from": from, "account": account, "state": state, "ms": ms})
                .to_string()
        };
        i.on_event(event("other", &tag, "cooling", 1500).as_bytes());
        let n = rx.try_recv().expect("applied");
        assert_eq!(
            (n.account.as_str(), n.state),
            ("acct-b", SharedState::Cooling)
        );
        assert_eq!(n.remaining, Duration::from_millis(1500));
        assert_eq!(n.from, "other");
        // Its own announcements, unknown accounts, unknown states and garbage are ignored.
        i.on_event(event("me", &tag, "cooling", 1500).as_bytes());
        i.on_event(event("other", "not-a-tag", "cooling", 1500).as_bytes());
        i.on_event(event("other", &tag, "exploded", 1500).as_bytes());
        i.on_event(b"\xff{not json");
        assert!(rx.try_recv().is_err());
        // A value that would park the account for ever (or overflow a deadline) is clamped,
        // and the sender's name is escaped before it reaches a log line.
        i.on_event(event("evil\n\u{1b}[31m", &tag, "auth_failed", u64::MAX).as_bytes());
        let n = rx.try_recv().expect("applied, clamped");
        assert_eq!(n.remaining, MAX_SHARED_STATE);
        assert!(!n.from.contains('\n') && !n.from.contains('\u{1b}'));
    }

    #[tokio::test]
    async fn without_a_connection_every_call_falls_back_at_once() {
        let (i, _rx) = inner();
        let started = std::time::Instant::now();
        let v: Option<String> = i
            .run("test", |mut c| async move {
                redis::cmd("GET").arg("k").query_async(&mut c).await
            })
            .await;
        assert!(v.is_none());
        assert!(started.elapsed() < Duration::from_millis(50));
        assert!(!i.is_up());
    }
}
