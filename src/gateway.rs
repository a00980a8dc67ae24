//! The gateway's shared state ([`Gateway`]) and the acquire path used by sessions:
//! account assignment -> pool checkout -> dial when the pool says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::accounts::Accounts;
use crate::config::{Config, Secrets};
use crate::error::{AcquireError, StartError};
use crate::headers::ForwardHeaders;
use crate::ids::{AccountId, ConversationId};
use crate::pool::{self, Checkout, EvictReason, Pool, PoolKey, PoolStats, Pooled};
use crate::upstream::{Dialer, UpstreamConn, ws_config};

/// Cheap-to-clone handle to a running gateway's state. Tests and the demo use it to inspect
/// the pool and to change account usability at runtime.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub config: Config,
    pub accounts: Accounts,
    pub pool: Pool<UpstreamConn>,
    pub dialer: Dialer,
    /// `(client name, key bytes)`; empty = no auth.
    pub client_keys: Vec<(String, Vec<u8>)>,
    pub ws_config: WebSocketConfig,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// Every session task; waited on at shutdown.
    pub sessions: TaskTracker,
    pub active_sessions: AtomicUsize,
    next_session: AtomicU64,
    /// The pool's reaper, stopped with the gateway.
    _reaper: tokio_util::task::AbortOnDropHandle<()>,
}

impl Gateway {
    /// Builds the gateway state. Must run inside a tokio runtime (it spawns the pool reaper).
    pub fn new(config: Config, secrets: Secrets) -> Result<Gateway, StartError> {
        config.validate()?;
        let pool = Pool::new(config.pool.clone());
        let reaper = pool::spawn_reaper(&pool);
        let dialer = Dialer::new(&config, pool.waker())?;
        let accounts = Accounts::from_config(&config.accounts, &secrets);
        let client_keys = secrets
            .clients
            .iter()
            .map(|(n, k)| (n.clone(), k.as_bytes().to_vec()))
            .collect();
        Ok(Gateway {
            shared: Arc::new(Shared {
                ws_config: ws_config(&config),
                config,
                accounts,
                pool,
                dialer,
                client_keys,
                shutdown: CancellationToken::new(),
                sessions: TaskTracker::new(),
                active_sessions: AtomicUsize::new(0),
                next_session: AtomicU64::new(1),
                _reaper: tokio_util::task::AbortOnDropHandle::new(reaper),
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.shared.pool.stats()
    }

    /// Sessions currently connected.
    pub fn active_sessions(&self) -> usize {
        self.shared.active_sessions.load(Ordering::Acquire)
    }

    /// The account a conversation (or routing key) is assigned to now.
    pub fn assigned_account(&self, conversation: &str) -> Option<String> {
        self.shared
            .accounts
            .assign(conversation)
            .map(|a| a.id.to_string())
    }

    /// Marks an account unusable: its conversations move to other accounts, and its pooled
    /// connections are evicted (`pool evict reason=account_changed`). Returns how many.
    pub fn disable_account(&self, id: &str) -> usize {
        let id = AccountId::new(id);
        if self.shared.accounts.set_usable(&id, false) {
            self.shared
                .pool
                .evict_account(&id, EvictReason::AccountChanged)
        } else {
            0
        }
    }

    /// Marks an account usable again; conversations assigned to it come back on their next
    /// acquire.
    pub fn enable_account(&self, id: &str) {
        self.shared.accounts.set_usable(&AccountId::new(id), true);
    }

    /// Starts shutting down: the listener stops, idle sessions are closed.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

impl Shared {
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Gets an upstream connection for a session: the conversation's account, then the pool's
    /// decision (logged), then a dial unless the pool handed out a connection.
    /// `routing` spreads unpooled sessions over accounts when there is no conversation.
    pub async fn acquire(
        &self,
        conversation: Option<&ConversationId>,
        routing: &str,
        headers: &ForwardHeaders,
    ) -> Result<Pooled<UpstreamConn>, AcquireError> {
        if self.shutdown.is_cancelled() {
            return Err(AcquireError::ShuttingDown);
        }
        let account = self
            .accounts
            .assign(conversation.map(ConversationId::as_str).unwrap_or(routing))
            .ok_or(AcquireError::NoAccount)?;
        let key = conversation.map(|c| PoolKey {
            account: account.id.clone(),
            conversation: c.clone(),
        });
        let Checkout { mut pooled, .. } = self.pool.checkout(key, &account.id);
        if pooled.conn().is_none() {
            match self.dialer.dial(pooled.id(), &account, headers).await {
                Ok(conn) => pooled.attach(conn),
                Err(e) => {
                    warn!(upstream.id = pooled.id(), account = %account.id, error = %e, "upstream dial failed");
                    return Err(e.into());
                }
            }
        }
        // A fresh or idle connection is clean: it may go back to the pool until a turn starts.
        pooled.set_reusable(true);
        Ok(pooled)
    }

    pub fn account_usable(&self, id: &AccountId) -> bool {
        self.accounts.get(id).is_some_and(|a| a.is_usable())
    }
}
