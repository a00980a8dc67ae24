//! The gateway's shared state ([`Gateway`]) and the acquire path used by sessions:
//! account assignment -> pool checkout -> dial when the pool says so, failing over to another
//! account when the upstream refuses a credential.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::accounts::{Accounts, Availability};
use crate::cluster::SharedState;
use crate::config::{Config, Secrets};
use crate::error::{AcquireError, DialError, StartError};
use crate::headers::ForwardHeaders;
use crate::ids::{AccountId, ClientId, ConversationId, Route};
use crate::pool::{
    self, Checkout, CheckoutOptions, EvictReason, NewReason, Pool, PoolKey, PoolStats, Pooled,
};
use crate::upstream::{Dialer, UpstreamConn, ws_config};

/// Cheap-to-clone handle to a running gateway's state. Tests and the demo use it to inspect
/// the pool and to change account usability at runtime.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    /// The config in force; replaced by [`Gateway::reload`].
    config: RwLock<Arc<Config>>,
    pub accounts: Accounts,
    pub pool: Pool<UpstreamConn>,
    pub dialer: Dialer,
    /// `(client name, key bytes)`; empty = no auth.
    client_keys: RwLock<ClientKeys>,
    pub ws_config: WebSocketConfig,
    /// Cancelled when the gateway starts shutting down (drain).
    pub shutdown: CancellationToken,
    /// Cancelled when the drain is over and the listeners stop.
    pub stopped: CancellationToken,
    /// Every session task (and upgrade-time acquire task); waited on at shutdown.
    pub sessions: TaskTracker,
    /// The main listener's HTTP connections not (yet) upgraded.
    pub http_connections: TaskTracker,
    pub active_sessions: AtomicUsize,
    next_session: AtomicU64,
    /// Per-frame counters.
    pub relay: crate::metrics::Relay,
    /// The Prometheus handle behind `/metrics`.
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Set once the listener accepts connections (readiness).
    pub listening: std::sync::atomic::AtomicBool,
    pub started: tokio::time::Instant,
    /// Token totals of completed turns by decision (status page).
    pub usage: crate::status::UsageTotals,
    /// The admin key (`admin.key_*`), if set.
    admin_key: RwLock<Option<Vec<u8>>>,
    /// Where the separate admin listener is bound, if `admin.listen` is set.
    pub admin_addr: std::sync::Mutex<Option<std::net::SocketAddr>>,
    /// The listener's TLS config (`tls`), built at start so bad files are a start error.
    pub listener_tls: Option<Arc<rustls::ServerConfig>>,
    /// One permit per client session (`limits.max_client_connections`).
    pub client_slots: Arc<tokio::sync::Semaphore>,
    /// Buffered bytes across all clients (`limits.max_buffered_bytes`).
    pub buffered: Arc<Budget>,
    /// Sessions per client key name (`limits.max_connections_per_client`); bounded by the
    /// number of configured client keys.
    per_client: dashmap::DashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Shared state with other instances (`cluster.redis_url`); disabled without it.
    pub cluster: crate::cluster::Cluster,
    /// The pool's reaper, stopped with the gateway.
    _reaper: tokio_util::task::AbortOnDropHandle<()>,
}

/// A gateway-wide budget of buffered bytes (`limits.max_buffered_bytes`): client messages
/// still arriving, client frames held behind a turn, HTTP bodies (as they arrive, and each
/// decoded layer) and collected HTTP answers take leases; past the budget new work is refused
/// (WebSocket close 1013, HTTP 503) instead of the process growing.
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

/// Bytes taken from the [`Budget`] until dropped.
pub struct BudgetLease {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes `bytes`, or `None` if that would pass the budget.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Option<BudgetLease> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + bytes <= self.limit).then_some(u + bytes)
            })
            .ok()?;
        Some(BudgetLease {
            budget: self.clone(),
            bytes,
        })
    }

    /// An empty lease, to [`BudgetLease::grow_to`] as bytes arrive.
    pub fn lease(self: &Arc<Self>) -> BudgetLease {
        BudgetLease {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Bytes leased now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

impl BudgetLease {
    /// Grows the lease to `bytes` in all (no change if it holds that much already); `false`
    /// if that would pass the budget (the lease is unchanged).
    pub fn grow_to(&mut self, bytes: usize) -> bool {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|m| *m > 0) else {
            return true;
        };
        let limit = self.budget.limit;
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(more).filter(|n| *n <= limit)
            })
            .is_ok();
        if taken {
            self.bytes = bytes;
        }
        taken
    }

    /// Gives back what the lease holds past `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        if let Some(less) = self.bytes.checked_sub(bytes).filter(|l| *l > 0) {
            self.budget.used.fetch_sub(less, Ordering::AcqRel);
            self.bytes = bytes;
        }
    }

    /// Bytes this lease holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for BudgetLease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// What the gateway holds right now. Between sessions, everything but the idle pooled
/// connections (each with its one pump task) is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Connected client sessions.
    pub sessions: usize,
    /// Session tasks alive, upgrade-time acquire tasks included (a session's task outlives
    /// its counter by its teardown).
    pub session_tasks: usize,
    /// HTTP connections on the main listener not (yet) upgraded.
    pub http_connections: usize,
    /// Upstream pump tasks: one per open upstream connection.
    pub upstream_pumps: usize,
    /// Pool slots counted against `max_total` (idle + busy + dialing).
    pub pool_reserved: usize,
    pub pool_idle: usize,
    pub pool_busy: usize,
    pub pool_dialing: usize,
    /// The per-account reservation counts, summed (must equal `pool_reserved`).
    pub pool_reserved_by_account: usize,
    /// Bytes leased from `limits.max_buffered_bytes` (zero between sessions).
    pub buffered_bytes: usize,
    /// Entries of the per-account map (none at zero: at most one per reserved slot).
    pub pool_account_entries: usize,
}

impl Resources {
    /// No session, no HTTP connection, no checkout or dial in flight, and every upstream
    /// connection (and pump) is an idle pooled one, with the cap counters agreeing.
    pub fn quiescent(&self) -> bool {
        self.sessions == 0
            && self.session_tasks == 0
            && self.http_connections == 0
            && self.pool_busy == 0
            && self.pool_dialing == 0
            && self.pool_reserved == self.pool_idle
            && self.pool_reserved_by_account == self.pool_reserved
            && self.pool_account_entries <= self.pool_reserved
            && self.upstream_pumps == self.pool_idle
            && self.buffered_bytes == 0
    }
}

/// `(client name, key bytes)` pairs.
pub(crate) type ClientKeys = Arc<Vec<(String, Vec<u8>)>>;

fn client_keys(secrets: &Secrets) -> ClientKeys {
    Arc::new(
        secrets
            .clients
            .iter()
            .map(|(n, k)| (n.clone(), k.as_bytes().to_vec()))
            .collect(),
    )
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Accounts removed or with new credentials (their connections were evicted).
    pub evicted_accounts: Vec<String>,
    /// Keys that changed but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Gateway {
    /// Builds the gateway state. Must run inside a tokio runtime (it spawns the pool reaper).
    pub fn new(config: Config, secrets: Secrets) -> Result<Gateway, StartError> {
        config.validate()?;
        let max_clients = config.limits.max_client_connections;
        let buffered_limit = config.limits.max_buffered_bytes.as_u64() as usize;
        let listener_tls = match &config.tls {
            Some(t) => Some(crate::listener::server_config(&t.cert_file, &t.key_file)?),
            None => None,
        };
        // Metric handles registered below must see the real recorder.
        let prometheus = crate::metrics::install();
        let pool = Pool::new(config.pool.clone());
        let reaper = pool::spawn_reaper(&pool);
        let dialer = Dialer::new(&config, pool.waker())?;
        let accounts =
            Accounts::from_config(&config.accounts, &secrets, config.routing.max_conversations);
        let (cluster, notices) = crate::cluster::Cluster::start(
            &config.cluster,
            config.accounts.iter().map(|a| a.id.clone()).collect(),
        )?;
        let gateway = Gateway {
            shared: Arc::new(Shared {
                ws_config: ws_config(&config),
                config: RwLock::new(Arc::new(config)),
                accounts,
                pool,
                dialer,
                client_keys: RwLock::new(client_keys(&secrets)),
                shutdown: CancellationToken::new(),
                stopped: CancellationToken::new(),
                sessions: TaskTracker::new(),
                http_connections: TaskTracker::new(),
                active_sessions: AtomicUsize::new(0),
                next_session: AtomicU64::new(1),
                relay: crate::metrics::Relay::new(),
                prometheus,
                listening: std::sync::atomic::AtomicBool::new(false),
                started: tokio::time::Instant::now(),
                usage: Default::default(),
                admin_key: RwLock::new(secrets.admin.as_ref().map(|k| k.as_bytes().to_vec())),
                admin_addr: std::sync::Mutex::new(None),
                client_slots: Arc::new(tokio::sync::Semaphore::new(max_clients)),
                buffered: Budget::new(buffered_limit),
                listener_tls,
                per_client: dashmap::DashMap::new(),
                cluster,
                _reaper: tokio_util::task::AbortOnDropHandle::new(reaper),
            }),
        };
        if let Some(mut notices) = notices {
            // Other instances' account states, applied here; ends with the gateway.
            let shared = Arc::downgrade(&gateway.shared);
            tokio::spawn(async move {
                while let Some(n) = notices.recv().await {
                    match shared.upgrade() {
                        Some(s) => s.apply_shared_state(n),
                        None => return,
                    }
                }
            });
        }
        Ok(gateway)
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.shared.config()
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.shared.pool.stats()
    }

    /// Sessions currently connected.
    pub fn active_sessions(&self) -> usize {
        self.shared.active_sessions.load(Ordering::Acquire)
    }

    /// Live resource counts, for leak checks: see [`Resources::quiescent`].
    pub fn resources(&self) -> Resources {
        let shared = &self.shared;
        let pool = shared.pool.stats();
        Resources {
            sessions: self.active_sessions(),
            session_tasks: shared.sessions.len(),
            http_connections: shared.http_connections.len(),
            upstream_pumps: shared.dialer.tasks().len(),
            pool_reserved: pool.total,
            pool_idle: pool.idle,
            pool_busy: pool.busy,
            pool_dialing: pool.dialing,
            pool_reserved_by_account: pool.reserved_by_account,
            buffered_bytes: shared.buffered.used(),
            pool_account_entries: pool.account_entries,
        }
    }

    /// Where the separate admin listener is bound (`admin.listen`), once serving.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.admin_addr.lock().ok().and_then(|a| *a)
    }

    /// The `/status.json` snapshot.
    pub fn status(&self) -> crate::status::Status {
        self.shared.status()
    }

    /// The account a client's affinity is assigned to now (assigning it if new).
    pub fn assigned_account(&self, client: &str, affinity: &str) -> Option<String> {
        let key = (ClientId::new(client), ConversationId::new(affinity));
        self.shared
            .accounts
            .assign(Some(&key), affinity)
            .ok()
            .map(|a| a.account.id.to_string())
    }

    /// An account's availability (`usable`, `cooling`, `auth_failed`, `disabled`, `removed`).
    pub fn account_state(&self, id: &str) -> Option<&'static str> {
        self.shared
            .accounts
            .get(&AccountId::new(id))
            .map(|a| a.availability().label())
    }

    /// Marks an account unusable: its conversations move to other accounts, and its pooled
    /// connections are evicted (`pool evict reason=account_changed`). Returns how many.
    pub fn disable_account(&self, id: &str) -> usize {
        self.shared
            .make_unusable(&AccountId::new(id), Availability::Disabled)
    }

    /// Marks an account usable again (new conversations may land on it).
    pub fn enable_account(&self, id: &str) {
        self.shared
            .accounts
            .set_availability(&AccountId::new(id), Availability::Usable);
    }

    /// Starts shutting down: the listener stops, idle sessions are closed.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Applies a new config: pool limits, routing, client keys and accounts take effect at
    /// once (removed or changed accounts evict their connections); `listen`, `paths`,
    /// `upstream` and `relay` are reported as needing a restart.
    pub fn reload(
        &self,
        config: Config,
        secrets: Secrets,
    ) -> Result<ReloadSummary, crate::error::ConfigError> {
        config.validate()?;
        let shared = &self.shared;
        let old = shared.config();
        let mut summary = ReloadSummary::default();
        for (changed, key) in [
            (old.listen != config.listen, "listen"),
            (old.paths != config.paths, "paths"),
            (old.upstream != config.upstream, "upstream"),
            (old.relay != config.relay, "relay"),
            (old.log != config.log, "log"),
            (old.admin.listen != config.admin.listen, "admin.listen"),
            (old.limits != config.limits, "limits"),
            (old.tls != config.tls, "tls"),
            (old.cluster != config.cluster, "cluster"),
        ] {
            if changed {
                summary.needs_restart.push(key);
            }
        }
        shared.pool.set_limits(config.pool.clone());
        for id in
            shared
                .accounts
                .reload(&config.accounts, &secrets, config.routing.max_conversations)
        {
            shared.pool.evict_account(&id, EvictReason::AccountChanged);
            summary.evicted_accounts.push(id.to_string());
        }
        shared
            .cluster
            .set_accounts(config.accounts.iter().map(|a| a.id.clone()).collect());
        if let Ok(mut k) = shared.client_keys.write() {
            *k = client_keys(&secrets);
        }
        // Permits of removed client keys go with them (sessions holding one keep it).
        shared
            .per_client
            .retain(|name, _| config.clients.iter().any(|c| &c.name == name));
        if let Ok(mut k) = shared.admin_key.write() {
            *k = secrets.admin.as_ref().map(|k| k.as_bytes().to_vec());
        }
        if let Ok(mut c) = shared.config.write() {
            *c = Arc::new(config);
        }
        info!(
            evicted_accounts = ?summary.evicted_accounts,
            needs_restart = ?summary.needs_restart,
            "config reloaded"
        );
        Ok(summary)
    }

    /// Waits until every upstream pump has ended (their close frames are sent), at most `timeout`.
    pub async fn wait_upstreams_closed(&self, timeout: Duration) -> bool {
        let tasks = self.shared.dialer.tasks();
        tasks.close();
        tokio::time::timeout(timeout, tasks.wait()).await.is_ok()
    }
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// A per-client-key session permit; `None` when there is no per-key limit,
    /// `Some(Err(()))` when the key is at its limit.
    pub fn client_permit(
        &self,
        client: &str,
    ) -> Option<Result<tokio::sync::OwnedSemaphorePermit, ()>> {
        let limit = self.config().limits.max_connections_per_client;
        if limit == 0 {
            return None;
        }
        let sem = self
            .per_client
            .entry(client.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(limit)))
            .clone();
        Some(sem.try_acquire_owned().map_err(|_| ()))
    }

    pub fn admin_key(&self) -> Option<Vec<u8>> {
        self.admin_key.read().ok().and_then(|k| k.clone())
    }

    pub fn client_keys(&self) -> ClientKeys {
        self.client_keys
            .read()
            .map(|k| k.clone())
            .unwrap_or_default()
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes an account unusable and evicts its pooled connections (an account change for
    /// every conversation on it). Returns how many connections were evicted. A credential
    /// refusal is shared with the other instances.
    pub fn make_unusable(&self, id: &AccountId, to: Availability) -> usize {
        if let Availability::AuthFailed { retry_at } = to {
            let left = retry_at.saturating_duration_since(tokio::time::Instant::now());
            self.cluster
                .share_account_state(id.as_str(), SharedState::AuthFailed, left);
        }
        if self.accounts.set_availability(id, to) {
            warn!(account = %id, state = to.label(), "account unusable");
            self.pool.evict_account(id, EvictReason::AccountChanged)
        } else {
            0
        }
    }

    /// A rate limit from the upstream: cool the account down, here and (shared) everywhere.
    pub fn cool_down(&self, id: &AccountId, for_: Option<Duration>) {
        let for_ = for_.unwrap_or(self.config().routing.cooldown);
        let until = tokio::time::Instant::now() + for_;
        if self
            .accounts
            .set_availability(id, Availability::Cooling { until })
        {
            warn!(account = %id, cooldown_s = for_.as_secs(), "account rate-limited; cooling down");
            self.cluster
                .share_account_state(id.as_str(), SharedState::Cooling, for_);
            self.pool.evict_account(id, EvictReason::AccountChanged);
        }
    }

    /// Another instance saw an account refused or rate-limited: the same here (not shared
    /// again). Its pooled connections go; its conversations move on their next request.
    pub fn apply_shared_state(&self, n: crate::cluster::AccountNotice) {
        let id = AccountId::new(n.account.as_str());
        let until = tokio::time::Instant::now() + n.remaining;
        let to = match n.state {
            SharedState::Cooling => Availability::Cooling { until },
            SharedState::AuthFailed => Availability::AuthFailed { retry_at: until },
        };
        if self.accounts.set_availability(&id, to) {
            warn!(
                account = %id,
                state = to.label(),
                remaining_s = n.remaining.as_secs(),
                from_instance = %n.from,
                "account unusable (shared by the cluster)"
            );
            self.pool.evict_account(&id, EvictReason::AccountChanged);
        }
    }

    /// The account for an affinity: shared with the other instances when the cluster is on
    /// ([`crate::cluster::assign`]), this instance's sticky map otherwise.
    pub async fn assign(
        &self,
        affinity: Option<&crate::accounts::AffinityKey>,
        routing: &str,
    ) -> Result<crate::accounts::Assignment, crate::accounts::NoUsableAccount> {
        crate::cluster::assign(&self.accounts, &self.cluster, affinity, routing).await
    }

    /// Gets an upstream connection for a route: the affinity's account, then the pool's
    /// decision (logged), then a dial unless the pool handed out a connection. An upstream
    /// that refuses the account's credential (see [`DialError::refuses_credential`]) or
    /// rate-limits it (429) at the handshake makes that account unusable and the acquire moves
    /// on to the next account; any other refusal is the request's and is returned as it is.
    /// `routing` spreads unpooled sessions over accounts when there is no affinity;
    /// `hint` overrides the `new` reason (stale-reuse retry).
    pub async fn acquire(
        &self,
        route: &Route,
        routing: &str,
        headers: &ForwardHeaders,
        hint: Option<NewReason>,
        ingress: crate::ids::Ingress,
    ) -> Result<Pooled<UpstreamConn>, AcquireError> {
        let attempts = self.accounts.all().len().max(1);
        let affinity = route
            .affinity
            .as_ref()
            .map(|a| (route.client.clone(), a.clone()));
        let mut last_err = None;
        let mut hint = hint;
        for _ in 0..attempts {
            if self.shutdown.is_cancelled() {
                return Err(AcquireError::ShuttingDown);
            }
            let assignment = self.assign(affinity.as_ref(), routing).await.map_err(|e| {
                AcquireError::NoAccount {
                    retry_after: e.retry_after,
                }
            })?;
            let account = assignment.account;
            let key_on = |account: AccountId| {
                route.lane.as_ref().map(|c| PoolKey {
                    client: route.client.clone(),
                    account,
                    conversation: c.clone(),
                })
            };
            if let Some(old) = assignment.previous.and_then(key_on) {
                // The affinity changed accounts: the lane's connection on the old one goes.
                self.pool.evict_key(&old, EvictReason::AccountChanged);
            }
            let key = key_on(account.id.clone());
            if let Some(k) = &key {
                // A reconnecting client may race its own previous session's teardown.
                self.pool
                    .wait_released(k, self.pool.limits().busy_wait)
                    .await;
            }
            let opts = CheckoutOptions {
                account_cap: account.max_connections(),
                hint,
                affinity: route.affinity.clone(),
                ingress,
            };
            let Checkout { mut pooled, .. } = self
                .pool
                .checkout_with(key, &account.id, &opts)
                .map_err(|_| {
                    crate::metrics::error("upstream_capacity");
                    AcquireError::AtCapacity
                })?;
            if pooled.conn().is_none() {
                match self.dialer.dial(pooled.id(), &account, headers).await {
                    Ok(conn) => pooled.attach(conn),
                    Err(e) => {
                        warn!(upstream.id = pooled.id(), account = %account.id, error = %e, "upstream dial failed");
                        crate::metrics::error("dial_failed");
                        drop(pooled);
                        match &e {
                            e if e.refuses_credential() => {
                                let retry_at =
                                    tokio::time::Instant::now() + self.config().routing.auth_retry;
                                self.make_unusable(
                                    &account.id,
                                    Availability::AuthFailed { retry_at },
                                );
                            }
                            DialError::Status { status: 429, .. } => {
                                self.cool_down(&account.id, None)
                            }
                            _ => return Err(e.into()),
                        }
                        last_err = Some(e);
                        // The next account's dial is a failover.
                        hint = Some(NewReason::Failover);
                        continue;
                    }
                }
            }
            // A fresh or idle connection is clean: it may go back to the pool until a turn starts.
            pooled.set_reusable(true);
            return Ok(pooled);
        }
        Err(match last_err {
            Some(e) => e.into(),
            None => AcquireError::NoAccount { retry_after: None },
        })
    }

    pub fn account_usable(&self, id: &AccountId) -> bool {
        self.accounts.get(id).is_some_and(|a| a.is_usable())
    }
}
