//! Upstream accounts: credentials, usability, and the conversation -> account assignment.
//!
//! Assignment is rendezvous (highest-random-weight) hashing over the usable accounts: it needs
//! no per-conversation map (nothing grows with uptime), a conversation keeps its account while
//! that account stays usable, and when an account becomes unusable only its conversations move.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{AccountConfig, Secrets};
use crate::ids::AccountId;

/// One upstream account. `Debug` never shows the credential.
pub struct Account {
    pub id: AccountId,
    credential: String,
    pub chatgpt_account_id: Option<String>,
    usable: AtomicBool,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("id", &self.id)
            .field("usable", &self.is_usable())
            .finish_non_exhaustive()
    }
}

impl Account {
    pub fn new(id: &str, credential: String, chatgpt_account_id: Option<String>) -> Self {
        Account {
            id: AccountId::new(id),
            credential,
            chatgpt_account_id,
            usable: AtomicBool::new(true),
        }
    }

    /// The `Authorization` header value for the upstream.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.credential)
    }

    pub fn is_usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }
}

/// The configured accounts.
#[derive(Debug)]
pub struct Accounts {
    list: Vec<Arc<Account>>,
}

impl Accounts {
    pub fn from_config(accounts: &[AccountConfig], secrets: &Secrets) -> Self {
        let list = accounts
            .iter()
            .map(|a| {
                let cred = secrets.accounts.get(&a.id).cloned().unwrap_or_default();
                Arc::new(Account::new(&a.id, cred, a.chatgpt_account_id.clone()))
            })
            .collect();
        Accounts { list }
    }

    pub fn get(&self, id: &AccountId) -> Option<&Arc<Account>> {
        self.list.iter().find(|a| &a.id == id)
    }

    pub fn all(&self) -> &[Arc<Account>] {
        &self.list
    }

    /// The account for `routing_key` (a conversation id, or a session id when there is none):
    /// the usable account with the highest rendezvous weight. `None` when none is usable.
    pub fn assign(&self, routing_key: &str) -> Option<Arc<Account>> {
        self.list
            .iter()
            .filter(|a| a.is_usable())
            .max_by_key(|a| {
                let mut h = DefaultHasher::new();
                routing_key.hash(&mut h);
                a.id.as_str().hash(&mut h);
                h.finish()
            })
            .cloned()
    }

    /// Marks an account usable or not. Returns whether the state changed.
    pub fn set_usable(&self, id: &AccountId, usable: bool) -> bool {
        match self.get(id) {
            Some(a) => a.usable.swap(usable, Ordering::AcqRel) != usable,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts(n: usize) -> Accounts {
        Accounts {
            list: (0..n)
                .map(|i| Arc::new(Account::new(&format!("acct{i}"), format!("sk-{i}"), None)))
                .collect(),
        }
    }

    #[test]
    fn assignment_is_sticky_and_moves_only_when_unusable() {
        let a = accounts(3);
        let convs: Vec<String> = (0..300).map(|i| format!("conv-{i}")).collect();
        let before: Vec<AccountId> = convs
            .iter()
            .map(|c| a.assign(c).unwrap().id.clone())
            .collect();
        // Spread: every account gets some conversations.
        for acc in a.all() {
            assert!(before.iter().filter(|id| **id == acc.id).count() > 50);
        }
        let gone = a.all()[1].id.clone();
        assert!(a.set_usable(&gone, false));
        for (c, old) in convs.iter().zip(&before) {
            let now = a.assign(c).unwrap().id.clone();
            if *old == gone {
                assert_ne!(now, gone);
            } else {
                assert_eq!(&now, old, "conversations of usable accounts never move");
            }
        }
        a.set_usable(&gone, true);
        let back: Vec<AccountId> = convs
            .iter()
            .map(|c| a.assign(c).unwrap().id.clone())
            .collect();
        assert_eq!(back, before);
        for acc in a.all() {
            a.set_usable(&acc.id, false);
        }
        assert!(a.assign("x").is_none());
    }

    #[test]
    fn debug_hides_credential() {
        let a = Account::new("a", "sk-very-secret".into(), None);
        assert!(!format!("{a:?}").contains("sk-very-secret"));
        assert_eq!(a.authorization(), "Bearer sk-very-secret");
    }
}
