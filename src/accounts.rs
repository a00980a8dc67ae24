//! Upstream accounts: credentials, availability, load, and the affinity -> account
//! assignment.
//!
//! - A new affinity (per client: `(client, affinity)`) goes to the least-loaded usable account
//!   (open upstream connections divided by `weight`); the assignment is sticky while that
//!   account stays usable.
//! - An account is unusable while cooling down after an account-wide rate limit (until
//!   `resets_in_seconds` or `routing.cooldown`), after the upstream refused its credential at
//!   the handshake (until `routing.auth_retry` passes and the next dial checks it again, or a
//!   reload), while disabled by an operator, or once removed from the config.
//! - The sticky map is FIFO-bounded by `routing.max_conversations`; a forgotten affinity is
//!   simply assigned again (to the least-loaded account).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{AccountConfig, Secrets};
use crate::fifo::FifoMap;
use crate::ids::{AccountId, ClientId, ConversationId};

/// The key of a sticky assignment: affinities are scoped by the client.
pub type AffinityKey = (ClientId, ConversationId);

/// Whether an account can take traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Usable,
    /// Rate-limited until this instant.
    Cooling {
        until: Instant,
    },
    /// The upstream refused its credential at the handshake. At `retry_at` it is usable again
    /// and the next dial checks the credential (a reload forgives at once).
    AuthFailed {
        retry_at: Instant,
    },
    /// Disabled by an operator (library API).
    Disabled,
    /// No longer in the config.
    Removed,
}

impl Availability {
    pub fn label(&self) -> &'static str {
        match self {
            Availability::Usable => "usable",
            Availability::Cooling { .. } => "cooling",
            Availability::AuthFailed { .. } => "auth_failed",
            Availability::Disabled => "disabled",
            Availability::Removed => "removed",
        }
    }
}

/// One upstream account. `Debug` never shows the credential.
pub struct Account {
    pub id: AccountId,
    credential: String,
    pub chatgpt_account_id: Option<String>,
    /// `openai-organization` / `openai-project` sent on its dials.
    pub organization: Option<String>,
    pub project: Option<String>,
    weight: AtomicU32,
    /// 0 = use `pool.max_per_account`.
    max_connections: AtomicUsize,
    state: Mutex<Availability>,
    /// Open upstream connections (pooled, busy or bypass): the load.
    open: AtomicUsize,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("id", &self.id)
            .field("availability", &self.availability())
            .field("open", &self.open_connections())
            .finish_non_exhaustive()
    }
}

impl Account {
    pub fn new(id: &str, credential: String, chatgpt_account_id: Option<String>) -> Self {
        Account {
            id: AccountId::new(id),
            credential,
            chatgpt_account_id,
            organization: None,
            project: None,
            weight: AtomicU32::new(1),
            max_connections: AtomicUsize::new(0),
            state: Mutex::new(Availability::Usable),
            open: AtomicUsize::new(0),
        }
    }

    fn from_config(c: &AccountConfig, secrets: &Secrets) -> Self {
        let mut a = Account::new(
            &c.id,
            secrets.accounts.get(&c.id).cloned().unwrap_or_default(),
            c.chatgpt_account_id.clone(),
        );
        a.organization = c.organization.clone();
        a.project = c.project.clone();
        a.apply_settings(c);
        a
    }

    fn apply_settings(&self, c: &AccountConfig) {
        self.weight.store(c.weight.max(1), Ordering::Release);
        self.max_connections
            .store(c.max_connections.unwrap_or(0), Ordering::Release);
    }

    /// The `Authorization` header value for the upstream.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.credential)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Acquire)
    }

    /// Per-account pooled-connection cap, if the account sets one.
    pub fn max_connections(&self) -> Option<usize> {
        Some(self.max_connections.load(Ordering::Acquire)).filter(|n| *n > 0)
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Current availability; an expired cooldown turns back into `Usable` here.
    pub fn availability(&self) -> Availability {
        let Ok(mut s) = self.state.lock() else {
            return Availability::Disabled;
        };
        match *s {
            Availability::Cooling { until } | Availability::AuthFailed { retry_at: until }
                if Instant::now() >= until =>
            {
                *s = Availability::Usable;
            }
            _ => {}
        }
        *s
    }

    pub fn is_usable(&self) -> bool {
        self.availability() == Availability::Usable
    }

    /// Sets the availability; returns true if the account went from usable to unusable.
    fn set(&self, to: Availability) -> bool {
        let was = self.availability();
        if let Ok(mut s) = self.state.lock() {
            *s = to;
        }
        was == Availability::Usable && to != Availability::Usable
    }

    fn same_credentials(&self, c: &AccountConfig, secrets: &Secrets) -> bool {
        secrets
            .accounts
            .get(&c.id)
            .is_some_and(|k| *k == self.credential)
            && c.chatgpt_account_id == self.chatgpt_account_id
            && c.organization == self.organization
            && c.project == self.project
    }

    /// A load lease, held by each open upstream connection of this account.
    pub fn lease(self: &Arc<Self>) -> AccountLease {
        self.open.fetch_add(1, Ordering::AcqRel);
        AccountLease(self.clone())
    }
}

/// Counts one open upstream connection against its account until dropped.
pub struct AccountLease(Arc<Account>);

impl Drop for AccountLease {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The result of [`Accounts::assign`].
pub struct Assignment {
    pub account: Arc<Account>,
    /// The conversation's previous account, when the assignment just changed.
    pub previous: Option<AccountId>,
}

/// No account is usable.
#[derive(Debug, Clone, Copy)]
pub struct NoUsableAccount {
    /// When the first cooling account frees up (none if no account is cooling).
    pub retry_after: Option<Duration>,
}

/// The configured accounts and the sticky assignments.
pub struct Accounts {
    list: RwLock<Vec<Arc<Account>>>,
    /// Sticky (client, affinity) -> account assignments (`routing.max_conversations`).
    sticky: Mutex<FifoMap<AffinityKey, AccountId>>,
    max_sticky: AtomicUsize,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.all().iter()).finish()
    }
}

impl Accounts {
    pub fn from_config(accounts: &[AccountConfig], secrets: &Secrets, max_sticky: usize) -> Self {
        Accounts {
            list: RwLock::new(
                accounts
                    .iter()
                    .map(|a| Arc::new(Account::from_config(a, secrets)))
                    .collect(),
            ),
            sticky: Mutex::new(FifoMap::default()),
            max_sticky: AtomicUsize::new(max_sticky),
        }
    }

    pub fn all(&self) -> Vec<Arc<Account>> {
        self.list.read().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn get(&self, id: &AccountId) -> Option<Arc<Account>> {
        self.list.read().ok()?.iter().find(|a| &a.id == id).cloned()
    }

    /// The account for an affinity (sticky), or for `routing` (a session id) when there is
    /// none. An affinity whose account became unusable is reassigned.
    pub fn assign(
        &self,
        affinity: Option<&AffinityKey>,
        routing: &str,
    ) -> Result<Assignment, NoUsableAccount> {
        let previous = match affinity.and_then(|c| self.sticky(c)) {
            Some(id) => match self.usable(&id) {
                Some(account) => {
                    return Ok(Assignment {
                        account,
                        previous: None,
                    });
                }
                None => Some(id),
            },
            None => None,
        };
        let key = affinity.map(|(_, a)| a.as_str()).unwrap_or(routing);
        let account = self.choose(key)?;
        if let Some(c) = affinity {
            self.stick(c, &account.id);
        }
        Ok(Assignment { account, previous })
    }

    /// The affinity's sticky account on this instance, if any.
    pub fn sticky(&self, affinity: &AffinityKey) -> Option<AccountId> {
        self.sticky
            .lock()
            .ok()
            .and_then(|s| s.get(affinity).cloned())
    }

    /// Makes `id` the affinity's sticky account.
    pub fn stick(&self, affinity: &AffinityKey, id: &AccountId) {
        if let Ok(mut s) = self.sticky.lock()
            && s.get(affinity) != Some(id)
        {
            s.insert(
                affinity.clone(),
                id.clone(),
                self.max_sticky.load(Ordering::Acquire),
            );
        }
    }

    /// The account `id` if it is configured and usable.
    pub fn usable(&self, id: &AccountId) -> Option<Arc<Account>> {
        self.get(id).filter(|a| a.is_usable())
    }

    /// The least-loaded usable account (open connections / weight), ties broken by a hash of
    /// `key` so equal accounts share new work.
    pub fn choose(&self, key: &str) -> Result<Arc<Account>, NoUsableAccount> {
        let list = self.all();
        let chosen = list
            .iter()
            .filter(|a| a.is_usable())
            .min_by_key(|a| {
                let load = (a.open_connections() as u64 * 1_000_000) / u64::from(a.weight().max(1));
                let mut h = DefaultHasher::new();
                key.hash(&mut h);
                a.id.as_str().hash(&mut h);
                (load, h.finish())
            })
            .cloned();
        chosen.ok_or_else(|| {
            let now = Instant::now();
            let retry_after = list
                .iter()
                .filter_map(|a| match a.availability() {
                    Availability::Cooling { until }
                    | Availability::AuthFailed { retry_at: until } => {
                        Some(until.saturating_duration_since(now))
                    }
                    _ => None,
                })
                .min();
            NoUsableAccount { retry_after }
        })
    }

    /// Marks an account; returns true if it went from usable to unusable (the caller evicts
    /// its pooled connections).
    pub fn set_availability(&self, id: &AccountId, to: Availability) -> bool {
        self.get(id).is_some_and(|a| a.set(to))
    }

    /// Puts an account in cooldown for `for_`.
    pub fn cool_down(&self, id: &AccountId, for_: Duration) -> bool {
        self.set_availability(
            id,
            Availability::Cooling {
                until: Instant::now() + for_,
            },
        )
    }

    /// Applies a new account list. Returns the ids whose connections must be evicted (removed
    /// accounts and accounts whose credentials changed). Auth failures are forgiven.
    pub fn reload(
        &self,
        accounts: &[AccountConfig],
        secrets: &Secrets,
        max_sticky: usize,
    ) -> Vec<AccountId> {
        self.max_sticky.store(max_sticky, Ordering::Release);
        let Ok(mut list) = self.list.write() else {
            return Vec::new();
        };
        let mut evict = Vec::new();
        let mut next = Vec::with_capacity(accounts.len());
        for c in accounts {
            match list.iter().find(|a| a.id.as_str() == c.id) {
                Some(old) if old.same_credentials(c, secrets) => {
                    old.apply_settings(c);
                    if matches!(old.availability(), Availability::AuthFailed { .. }) {
                        old.set(Availability::Usable);
                    }
                    next.push(old.clone());
                }
                Some(old) => {
                    old.set(Availability::Removed);
                    evict.push(old.id.clone());
                    next.push(Arc::new(Account::from_config(c, secrets)));
                }
                None => next.push(Arc::new(Account::from_config(c, secrets))),
            }
        }
        for old in list.iter() {
            if !accounts.iter().any(|c| c.id == old.id.as_str()) {
                old.set(Availability::Removed);
                evict.push(old.id.clone());
            }
        }
        *list = next;
        evict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts(ids: &[&str], weights: &[u32]) -> Accounts {
        let configs: Vec<AccountConfig> = ids
            .iter()
            .zip(weights)
            .map(|(id, w)| AccountConfig {
                id: id.to_string(),
                api_key_env: Some(format!("K_{id}")),
                api_key_file: None,
                access_token_env: None,
                access_token_file: None,
                chatgpt_account_id: None,
                weight: *w,
                max_connections: None,
                organization: None,
                project: None,
            })
            .collect();
        let mut secrets = Secrets::default();
        for id in ids {
            secrets.accounts.insert(id.to_string(), format!("sk-{id}"));
        }
        Accounts::from_config(&configs, &secrets, 1000)
    }

    fn conv(s: &str) -> AffinityKey {
        (ClientId::new("t"), ConversationId::new(s))
    }

    #[tokio::test(start_paused = true)]
    async fn least_loaded_sticky_and_cooldown() {
        let a = accounts(&["a", "b"], &[1, 1]);
        let first = a.assign(Some(&conv("c1")), "s").unwrap().account;
        let _lease = first.lease();
        // The next new conversation goes to the other (less loaded) account.
        let second = a.assign(Some(&conv("c2")), "s").unwrap().account;
        assert_ne!(first.id, second.id);
        // Sticky: c1 stays on its account even though it is now the more loaded one.
        let _l2 = second.lease();
        let _l3 = second.lease();
        assert_eq!(
            a.assign(Some(&conv("c1")), "s").unwrap().account.id,
            first.id
        );
        // Cooling moves c1, and says where from.
        assert!(a.cool_down(&first.id, Duration::from_secs(30)));
        let moved = a.assign(Some(&conv("c1")), "s").unwrap();
        assert_eq!(moved.account.id, second.id);
        assert_eq!(moved.previous, Some(first.id.clone()));
        // All unusable: the retry hint is the first cooldown to end.
        assert!(a.cool_down(&second.id, Duration::from_secs(10)));
        let err = a.assign(Some(&conv("c3")), "s").err().unwrap();
        assert_eq!(err.retry_after, Some(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(first.is_usable(), "back after the cooldown");
    }

    #[test]
    fn weights_shift_load() {
        let a = accounts(&["light", "heavy"], &[1, 4]);
        let mut leases = Vec::new();
        let mut heavy = 0;
        for i in 0..50 {
            let acct = a
                .assign(Some(&conv(&format!("w{i}"))), "s")
                .unwrap()
                .account;
            if acct.id.as_str() == "heavy" {
                heavy += 1;
            }
            leases.push(acct.lease());
        }
        assert_eq!(heavy, 40, "load follows weight 4:1");
    }

    #[test]
    fn reload_removes_and_replaces_and_forgives_auth() {
        let a = accounts(&["a", "b", "c"], &[1, 1, 1]);
        a.set_availability(
            &AccountId::new("c"),
            Availability::AuthFailed {
                retry_at: Instant::now() + Duration::from_secs(3600),
            },
        );
        let mut configs: Vec<AccountConfig> = ["b", "c", "d"]
            .iter()
            .map(|id| AccountConfig {
                id: id.to_string(),
                api_key_env: Some("X".into()),
                api_key_file: None,
                access_token_env: None,
                access_token_file: None,
                chatgpt_account_id: None,
                weight: 1,
                max_connections: Some(3),
                organization: None,
                project: None,
            })
            .collect();
        configs[0].weight = 5;
        let mut secrets = Secrets::default();
        secrets.accounts.insert("b".into(), "sk-b-rotated".into());
        secrets.accounts.insert("c".into(), "sk-c".into());
        secrets.accounts.insert("d".into(), "sk-d".into());
        let mut evicted = a.reload(&configs, &secrets, 10);
        evicted.sort();
        assert_eq!(evicted, vec![AccountId::new("a"), AccountId::new("b")]);
        let c = a.get(&AccountId::new("c")).unwrap();
        assert!(c.is_usable(), "auth failure forgiven on reload");
        assert_eq!(c.max_connections(), Some(3));
        assert_eq!(a.get(&AccountId::new("b")).unwrap().weight(), 5);
        assert!(a.get(&AccountId::new("a")).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn affinities_are_per_client_and_auth_failures_are_retried() {
        let a = accounts(&["a", "b"], &[1, 1]);
        let mine = (ClientId::new("one"), ConversationId::new("s"));
        let theirs = (ClientId::new("two"), ConversationId::new("s"));
        let first = a.assign(Some(&mine), "x").unwrap().account;
        let _lease = first.lease();
        // The same affinity id of another client is another assignment (least loaded: b).
        assert_ne!(a.assign(Some(&theirs), "x").unwrap().account.id, first.id);
        let retry_at = Instant::now() + Duration::from_secs(300);
        assert!(a.set_availability(&first.id, Availability::AuthFailed { retry_at }));
        assert!(!first.is_usable());
        tokio::time::sleep(Duration::from_secs(301)).await;
        assert!(first.is_usable(), "checked again after routing.auth_retry");
    }

    #[test]
    fn sticky_map_is_bounded() {
        let mut s = FifoMap::default();
        for i in 0..10_000 {
            s.insert(
                conv(&format!("c{}", i % 50)),
                AccountId::new(if i % 2 == 0 { "a" } else { "b" }),
                20,
            );
        }
        assert!(s.len() <= 20);
        assert!(s.queued() <= 2 * 20 + 16);
    }

    #[test]
    fn debug_hides_credential() {
        let a = Account::new("a", "sk-very-secret".into(), None);
        assert!(!format!("{a:?}").contains("sk-very-secret"));
        assert_eq!(a.authorization(), "Bearer sk-very-secret");
    }
}
