//! Several instances: account state shared on Redis (`cluster.redis_url`).
//!
//! Without a URL the [`Cluster`] is disabled: every call answers "nothing shared" at once, no
//! task runs and no connection is opened anywhere (one process, today's behaviour).
//!
//! With one, Redis holds (HTTP-AND-CLUSTER.md B.3; keys in [`keys`], all hashed):
//! - affinity -> account, set-if-absent, moved by compare-and-set ([`scripts`]);
//! - accounts' unusable states with their expiry, announced on one pub/sub channel so one
//!   instance's 429 stops the others at once;
//! - response id -> owner (instance, client, lane), for a fast, logged
//!   `previous_response_not_found` on a misrouted continuation;
//! - per-client-key connection leases (expire unless refreshed: a crashed instance's go);
//! - the instance registry with serving/draining state.
//!
//! Not shared: sockets, the pool, turns. Redis is never needed to start or to serve: every
//! call has `cluster.call_timeout`; a failure switches the instance to local decisions
//! (`cluster degraded`, logged once, gauge set) until the supervisor reconnects, resubscribes
//! and republishes (`cluster recovered`). While healthy and idle, an instance sends one
//! command per heartbeat (plus one lease refresh per client key while it has sessions).

mod assign;
mod keys;
mod scripts;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::ClusterConfig;
use crate::error::StartError;

pub use assign::assign;
pub use keys::digest;
use store::{Inner, Write};

/// An account's state as shared between instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedState {
    Cooling,
    AuthFailed,
}

impl SharedState {
    pub fn label(self) -> &'static str {
        match self {
            SharedState::Cooling => "cooling",
            SharedState::AuthFailed => "auth_failed",
        }
    }

    fn parse(s: &str) -> Option<SharedState> {
        match s {
            "cooling" => Some(SharedState::Cooling),
            "auth_failed" => Some(SharedState::AuthFailed),
            _ => None,
        }
    }
}

/// Another instance (or Redis, after a reconnect) says an account is unusable for `remaining`.
#[derive(Debug, Clone)]
pub struct AccountNotice {
    pub account: String,
    pub state: SharedState,
    pub remaining: Duration,
    /// The instance that saw it (`redis` when read back after a reconnect).
    pub from: String,
}

/// Where a response id lives, per Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub instance: String,
    /// The asking client is the one that created it.
    pub same_client: bool,
}

/// The answer to a connection-lease request.
pub enum LeaseGrant {
    /// Counted cluster-wide until the lease is dropped.
    Granted(Lease),
    /// The client key is at its limit across the cluster.
    Refused,
    /// No shared state (disabled or degraded): only the local limit applies.
    Local,
}

/// One client connection counted against its key's cluster-wide limit; released on drop.
pub struct Lease {
    inner: Arc<Inner>,
    client: String,
    member: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.release_lease(&self.client, &self.member);
    }
}

/// `/status.json`'s `cluster` object.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    pub enabled: bool,
    pub instance: Option<String>,
    /// Redis is configured but not answering: decisions are local.
    pub degraded: bool,
    pub instances: Vec<InstanceView>,
    /// Accounts another instance (or this one) marked unusable, with the time left.
    pub accounts: Vec<SharedAccountView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub id: String,
    pub addr: Option<String>,
    pub state: String,
    pub this: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SharedAccountView {
    pub id: String,
    pub state: String,
    pub remaining_s: f64,
}

/// The gateway's handle on shared state (see the module docs). Dropping it stops the
/// background tasks.
pub struct Cluster {
    inner: Option<Arc<Inner>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(i) = &self.inner {
            i.stop.cancel();
        }
    }
}

impl Cluster {
    /// No shared state (no `cluster.redis_url`).
    pub fn disabled() -> Cluster {
        Cluster { inner: None }
    }

    /// Starts the shared state for `cfg` if it names a Redis: the connection is made in the
    /// background (never a start-up dependency). The receiver yields other instances'
    /// account notices; the gateway applies them. Must run inside a tokio runtime.
    pub fn start(
        cfg: &ClusterConfig,
        accounts: Vec<String>,
    ) -> Result<(Cluster, Option<mpsc::Receiver<AccountNotice>>), StartError> {
        let Some(url) = &cfg.redis_url else {
            return Ok((Cluster::disabled(), None));
        };
        // The parse error may quote the URL (and its password): say only what is wrong.
        let client = redis::Client::open(url.as_str())
            .map_err(|e| StartError::Cluster(format!("not a Redis URL ({:?})", e.kind())))?;
        let (inner, notices) = Inner::new(cfg, client, accounts);
        store::spawn(&inner);
        Ok((Cluster { inner: Some(inner) }, Some(notices)))
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Configured but not answering right now.
    pub fn degraded(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| !i.is_up())
    }

    /// This instance's id (when enabled).
    pub fn instance(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.instance.as_str())
    }

    /// The configured account ids (to read their shared state and to name them in notices).
    pub fn set_accounts(&self, ids: Vec<String>) {
        if let Some(i) = &self.inner
            && let Ok(mut a) = i.accounts.write()
        {
            *a = ids;
        }
    }

    /// The account bound to `(client, affinity)`: `None` when there is no shared answer
    /// (disabled or degraded), `Some(None)` when Redis has no binding.
    pub async fn affinity(&self, client: &str, affinity: &str) -> Option<Option<String>> {
        let i = self.inner.as_ref()?;
        let key = i.keys.affinity(client, affinity);
        let ttl = i.cfg.affinity_ttl.as_millis() as u64;
        i.run("affinity_get", move |mut c| async move {
            redis::cmd("GETEX")
                .arg(&key)
                .arg("PX")
                .arg(ttl)
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// Binds `(client, affinity)` to `account` unless bound already; returns the binding in
    /// force (another instance's choice if it was first). `None`: no shared answer.
    pub async fn claim(&self, client: &str, affinity: &str, account: &str) -> Option<String> {
        let i = self.inner.as_ref()?;
        let key = i.keys.affinity(client, affinity);
        let (account, ttl) = (account.to_string(), i.cfg.affinity_ttl.as_millis() as u64);
        i.run("affinity_claim", move |mut c| async move {
            scripts::CLAIM
                .key(&key)
                .arg(&account)
                .arg(ttl)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    /// Moves `(client, affinity)` from `from` to `to` if it is still bound to `from`
    /// (compare-and-set); returns the binding in force.
    pub async fn move_affinity(
        &self,
        client: &str,
        affinity: &str,
        from: &str,
        to: &str,
    ) -> Option<String> {
        let i = self.inner.as_ref()?;
        let key = i.keys.affinity(client, affinity);
        let (from, to) = (from.to_string(), to.to_string());
        let ttl = i.cfg.affinity_ttl.as_millis() as u64;
        i.run("affinity_move", move |mut c| async move {
            scripts::MOVE
                .key(&key)
                .arg(&from)
                .arg(&to)
                .arg(ttl)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    /// Tells every instance that `account` is unusable for `remaining` (written in the
    /// background; remembered and republished after a Redis outage).
    pub fn share_account_state(&self, account: &str, state: SharedState, remaining: Duration) {
        if let Some(i) = &self.inner {
            i.share_account_state(account, state, remaining);
        }
    }

    /// Records that this instance's connection for `(client, lane)` produced `response_id`
    /// (in the background), for `ttl` (the pool's max age: the connection is gone after it).
    pub fn record_owner(&self, response_id: &str, client: &str, lane: &str, ttl: Duration) {
        let Some(i) = &self.inner else { return };
        let value = serde_json::json!({
            "instance": i.instance,
            "client": digest(&[client]),
            "lane": digest(&[client, lane]),
        });
        i.write(Write::Owner {
            key: i.keys.response(response_id),
            value: value.to_string(),
            ttl_ms: ttl.as_millis().max(1) as u64,
        });
    }

    /// Who produced `response_id`, if Redis knows (and answers in time).
    pub async fn owner(&self, response_id: &str, client: &str) -> Option<Owner> {
        let i = self.inner.as_ref()?;
        let key = i.keys.response(response_id);
        let text: String = i
            .run("owner_get", move |mut c| async move {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<String>>(&mut c)
                    .await
            })
            .await??;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(Owner {
            instance: v["instance"].as_str()?.to_string(),
            same_client: v["client"].as_str() == Some(digest(&[client]).as_str()),
        })
    }

    /// Counts one connection of `client` against `limit` across the cluster.
    pub async fn lease(&self, client: &str, limit: usize) -> LeaseGrant {
        let Some(i) = &self.inner else {
            return LeaseGrant::Local;
        };
        let member = format!(
            "{}:{}",
            i.instance,
            i.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let key = i.keys.client_leases(client);
        let ttl = i.cfg.lease_ttl.as_millis() as u64;
        let m = member.clone();
        let granted: Option<i64> = i
            .run("lease", move |mut c| async move {
                scripts::LEASE
                    .key(&key)
                    .arg(&m)
                    .arg(limit)
                    .arg(ttl)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match granted {
            None => LeaseGrant::Local,
            Some(0) => LeaseGrant::Refused,
            Some(_) => {
                i.hold_lease(client, &member);
                LeaseGrant::Granted(Lease {
                    inner: i.clone(),
                    client: client.to_string(),
                    member,
                })
            }
        }
    }

    /// Where this instance serves (shown in the registry).
    pub fn set_addr(&self, addr: SocketAddr) {
        if let Some(i) = &self.inner {
            i.set_registry(Some(addr), None);
        }
    }

    /// Marks this instance draining in the registry (at once, in the background).
    pub fn set_draining(&self) {
        if let Some(i) = &self.inner {
            i.set_registry(None, Some("draining"));
        }
    }

    /// Removes this instance from the registry (end of a graceful stop), within the call
    /// timeout.
    pub async fn leave(&self) {
        if let Some(i) = &self.inner {
            i.leave().await;
        }
    }

    /// What this instance knows without asking Redis.
    pub fn local_status(&self) -> ClusterStatus {
        ClusterStatus {
            enabled: self.enabled(),
            instance: self.instance().map(str::to_string),
            degraded: self.degraded(),
            ..Default::default()
        }
    }

    /// The cluster as this instance sees it (reads Redis; degraded: local view only).
    pub async fn status(&self) -> ClusterStatus {
        match &self.inner {
            None => ClusterStatus::default(),
            Some(i) => i.status().await,
        }
    }
}
