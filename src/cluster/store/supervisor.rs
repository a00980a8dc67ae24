//! The Redis side's background work: the supervisor that connects, subscribes, listens,
//! beats and republishes (one retry a second while DOWN), the writer that applies queued
//! writes in order, and what they do with Redis (apply a write, refresh this instance's
//! leases, resync after a connect, take another instance's account event).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use redis::RedisResult;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info};

use super::{Inner, MAX_SHARED_STATE, RETRY, UP, Write, fallback};
use crate::cluster::scripts;
use crate::cluster::{AccountNotice, SharedState};
use crate::telemetry::escape;

impl Inner {
    /// Carries out one background write on `conn`; false if Redis did not take it.
    pub(super) async fn apply(&self, conn: ConnectionManager, w: Write) -> bool {
        match w {
            Write::Owner { key, value, ttl_ms } => self
                .exec("owner_put", conn, move |mut c| async move {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&value)
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
                .is_some(),
            Write::Release { key, member } => self
                .exec("lease_release", conn, move |mut c| async move {
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&member)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
                .is_some(),
            Write::AccountState { account, state, ms } => {
                let key = self.keys.account_state(&account);
                let event = serde_json::json!({
                    "from": self.instance,
                    "account": self.keys.account_tag(&account),
                    "state": state.label(),
                    "ms": ms,
                })
                .to_string();
                let channel = self.keys.events();
                self.exec("account_state", conn, move |mut c| async move {
                    redis::pipe()
                        .cmd("SET")
                        .arg(&key)
                        .arg(state.label())
                        .arg("PX")
                        .arg(ms)
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(&channel)
                        .arg(&event)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
                .is_some()
            }
            Write::Registry => {
                let (key, field, value) = (
                    self.keys.instances(),
                    self.instance.clone(),
                    self.registry_entry(),
                );
                self.exec("registry", conn, move |mut c| async move {
                    redis::cmd("HSET")
                        .arg(&key)
                        .arg(&field)
                        .arg(&value)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
                .is_some()
            }
        }
    }

    /// Re-sends this instance's leases (refresh, or republish after an outage).
    pub(super) async fn refresh_leases(&self, conn: &ConnectionManager) -> bool {
        let leases: Vec<(String, Vec<String>)> = self
            .leases
            .lock()
            .map(|l| {
                l.iter()
                    .map(|(c, m)| (c.clone(), m.iter().cloned().collect()))
                    .collect()
            })
            .unwrap_or_default();
        let ttl = self.cfg.lease_ttl.as_millis() as u64;
        for (client, members) in leases {
            let key = self.keys.client_leases(&client);
            let done = self
                .exec("lease_refresh", conn.clone(), move |mut c| async move {
                    let mut inv = scripts::REFRESH.key(&key);
                    inv.arg(ttl);
                    for m in &members {
                        inv.arg(m);
                    }
                    inv.invoke_async::<i64>(&mut c).await
                })
                .await;
            if done.is_none() {
                return false;
            }
        }
        true
    }

    /// After (re)connecting: announce this instance, republish its account states and
    /// leases, and read every account's shared state (notices may have been missed).
    pub(super) async fn resync(&self, conn: &ConnectionManager) -> bool {
        if !self.apply(conn.clone(), Write::Registry).await {
            return false;
        }
        let published: Vec<(String, SharedState, Instant)> = self
            .published
            .lock()
            .map(|p| p.iter().map(|(a, (s, u))| (a.clone(), *s, *u)).collect())
            .unwrap_or_default();
        for (account, state, until) in published {
            let left = until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                let ms = left.as_millis().max(1) as u64;
                if !self
                    .apply(conn.clone(), Write::AccountState { account, state, ms })
                    .await
                {
                    return false;
                }
            }
        }
        if !self.refresh_leases(conn).await {
            return false;
        }
        let Some(states) = self.read_account_states(conn).await else {
            return false;
        };
        for (account, state, left) in states {
            let _ = self.notices.try_send(AccountNotice {
                account,
                state,
                remaining: left,
                from: "redis".into(),
            });
        }
        true
    }

    /// Every configured account's shared state: (account, state, time left).
    pub(super) async fn read_account_states(
        &self,
        conn: &ConnectionManager,
    ) -> Option<Vec<(String, SharedState, Duration)>> {
        let ids = self.accounts.read().map(|a| a.clone()).unwrap_or_default();
        let keys: Vec<String> = ids.iter().map(|a| self.keys.account_state(a)).collect();
        let replies: Vec<(Option<String>, i64)> = self
            .exec("account_read", conn.clone(), move |mut c| async move {
                let mut p = redis::pipe();
                for k in &keys {
                    p.cmd("GET").arg(k).cmd("PTTL").arg(k);
                }
                p.query_async::<Vec<(Option<String>, i64)>>(&mut c).await
            })
            .await?;
        Some(
            ids.into_iter()
                .zip(replies)
                .filter_map(|(id, (state, ttl))| {
                    let state = SharedState::parse(state.as_deref()?)?;
                    let left = Duration::from_millis(ttl as u64).min(MAX_SHARED_STATE);
                    (ttl > 0).then_some((id, state, left))
                })
                .collect(),
        )
    }

    /// A message on the events channel: another instance's account state.
    pub(super) fn on_event(&self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let from = v["from"].as_str().unwrap_or("?");
        if from == self.instance {
            return;
        }
        let (Some(tag), Some(state), Some(ms)) = (
            v["account"].as_str(),
            v["state"].as_str().and_then(SharedState::parse),
            v["ms"].as_u64(),
        ) else {
            return;
        };
        let ids = self.accounts.read().map(|a| a.clone()).unwrap_or_default();
        if let Some(account) = ids.into_iter().find(|a| self.keys.account_tag(a) == tag) {
            let _ = self.notices.try_send(AccountNotice {
                account,
                state,
                remaining: Duration::from_millis(ms).min(MAX_SHARED_STATE),
                from: escape(from, 64),
            });
        }
    }
}

/// Starts the supervisor and the writer.
pub(in crate::cluster) fn spawn(inner: &Arc<Inner>) {
    tokio::spawn(supervise(inner.clone()));
    if let Some(rx) = inner.writes_rx.lock().ok().and_then(|mut r| r.take()) {
        tokio::spawn(writer(inner.clone(), rx));
    }
}

/// Applies background writes in order; while DOWN they are dropped (the resync after the
/// outage republishes what still matters).
async fn writer(inner: Arc<Inner>, mut rx: mpsc::Receiver<Write>) {
    loop {
        let w = tokio::select! {
            _ = inner.stop.cancelled() => return,
            w = rx.recv() => match w { Some(w) => w, None => return },
        };
        match inner.connection().filter(|_| inner.is_up()) {
            Some(conn) => {
                inner.apply(conn, w).await;
            }
            None => fallback("write_while_degraded"),
        }
    }
}

async fn connect(inner: &Inner) -> RedisResult<(ConnectionManager, redis::aio::PubSub)> {
    let deadline = inner.cfg.call_timeout.max(Duration::from_secs(1));
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_connection_timeout(Some(deadline))
        .set_response_timeout(Some(inner.cfg.call_timeout));
    let manager = ConnectionManager::new_with_config(inner.client.clone(), config).await?;
    let mut pubsub = inner.client.get_async_pubsub().await?;
    pubsub.subscribe(inner.keys.events()).await?;
    Ok((manager, pubsub))
}

/// Connects, resyncs, then listens and beats until the connection is lost; retries every
/// second while Redis is away. Ends when the cluster handle is dropped.
async fn supervise(inner: Arc<Inner>) {
    let mut connected_once = false;
    loop {
        let deadline = inner.cfg.call_timeout.max(Duration::from_secs(1));
        let attempt = tokio::select! {
            _ = inner.stop.cancelled() => return,
            a = tokio::time::timeout(deadline, connect(&inner)) => a,
        };
        match attempt {
            Ok(Ok((manager, pubsub))) => {
                if let Ok(mut c) = inner.conn.lock() {
                    *c = Some(manager.clone());
                }
                if inner.resync(&manager).await {
                    inner.state.store(UP, Ordering::Release);
                    ::metrics::gauge!(crate::metrics::CLUSTER_DEGRADED).set(0.0);
                    if connected_once {
                        info!(instance = %inner.instance, "cluster recovered: Redis answers again; state republished");
                    } else {
                        info!(instance = %inner.instance, "cluster connected");
                    }
                    connected_once = true;
                    listen(&inner, pubsub).await;
                }
            }
            Ok(Err(e)) => inner.degrade("connect", &e.to_string()),
            Err(_) => inner.degrade("connect", "timed out"),
        }
        if let Ok(mut c) = inner.conn.lock() {
            *c = None;
        }
        if inner.stop.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// While UP: other instances' notices, the registry heartbeat, lease refreshes.
async fn listen(inner: &Inner, pubsub: redis::aio::PubSub) {
    let mut messages = pubsub.into_on_message();
    let beat = inner.cfg.heartbeat;
    let refresh_every = inner.cfg.lease_ttl / 3;
    let mut heartbeat = tokio::time::interval_at(Instant::now() + beat, beat);
    let mut refresh = tokio::time::interval_at(Instant::now() + refresh_every, refresh_every);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = inner.lost.notified() => {
                if !inner.is_up() {
                    return;
                }
            }
            m = messages.next() => match m {
                Some(m) => inner.on_event(m.get_payload_bytes()),
                None => {
                    inner.degrade("subscribe", "subscription connection closed");
                    return;
                }
            },
            _ = heartbeat.tick() => {
                if let Some(conn) = inner.connection() {
                    inner.apply(conn, Write::Registry).await;
                }
            }
            _ = refresh.tick() => {
                let idle = inner.leases.lock().map(|l| l.is_empty()).unwrap_or(true);
                if !idle && let Some(conn) = inner.connection() {
                    debug!("refreshing client connection leases");
                    inner.refresh_leases(&conn).await;
                }
            }
        }
    }
}
