//! The affinity -> account decision when Redis holds the bindings: the binding in Redis wins
//! over this instance's own sticky map, a new binding is claimed set-if-absent, and a binding
//! to an account that became unusable is moved by compare-and-set, so instances racing on one
//! conversation all end on one account. Without shared state (disabled, degraded, no
//! affinity) it is [`Accounts::assign`].

use tracing::{debug, info};

use super::Cluster;
use crate::accounts::Accounts;
use crate::accounts::{AffinityKey, Assignment, NoUsableAccount};
use crate::ids::AccountId;

/// See the module docs.
pub async fn assign(
    accounts: &Accounts,
    cluster: &Cluster,
    affinity: Option<&AffinityKey>,
    routing: &str,
) -> Result<Assignment, NoUsableAccount> {
    // Degraded: `affinity` answers `None` at once (counted as a fallback).
    let Some(key) = affinity.filter(|_| cluster.enabled()) else {
        return accounts.assign(affinity, routing);
    };
    let (client, aff) = (key.0.as_str(), key.1.as_str());
    let local = accounts.sticky(key);
    let Some(remote) = cluster.affinity(client, aff).await else {
        return accounts.assign(affinity, routing);
    };
    let (account, reason) = match remote.map(AccountId::new) {
        Some(id) => match accounts.usable(&id) {
            Some(a) => (a, "shared_affinity"),
            None => {
                let chosen = accounts.choose(aff)?;
                let now = cluster
                    .move_affinity(client, aff, id.as_str(), chosen.id.as_str())
                    .await;
                match now.and_then(|w| accounts.usable(&AccountId::new(w))) {
                    Some(w) if w.id != chosen.id => (w, "shared_affinity"),
                    _ => (chosen, "moved"),
                }
            }
        },
        None => {
            let chosen = accounts.choose(aff)?;
            let now = cluster.claim(client, aff, chosen.id.as_str()).await;
            match now.and_then(|w| accounts.usable(&AccountId::new(w))) {
                Some(w) if w.id != chosen.id => (w, "shared_affinity"),
                _ => (chosen, "claimed"),
            }
        }
    };
    accounts.stick(key, &account.id);
    if local.as_ref() != Some(&account.id) {
        if reason == "claimed" {
            debug!(client = %client, affinity = %aff, account = %account.id, reason = %reason, "affinity bound");
        } else {
            info!(client = %client, affinity = %aff, account = %account.id, reason = %reason, "affinity bound by the cluster");
        }
    }
    Ok(Assignment {
        previous: local.filter(|l| *l != account.id),
        account,
    })
}
