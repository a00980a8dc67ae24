//! The pool's vocabulary for what it did: the three decisions with their reasons, and why a
//! connection left the pool (the `pool decision` and `pool evict` log lines, metrics labels).

use std::fmt;

/// The three decisions (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Reuse,
    New(NewReason),
    Bypass(BypassReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewReason {
    /// Nothing pooled for the key.
    Miss,
    /// The pooled connection reached `max_age`.
    Expired,
    /// The key's connection was evicted (1012/1013, account change).
    Evicted,
    /// The pooled connection died while idle.
    Dead,
    /// A reused connection failed before the turn produced anything; the turn is retried once.
    RetryAfterStaleReuse,
    /// The key's connection was discarded (a turn did not end cleanly, or an upstream event
    /// could not be attributed).
    Discarded,
    /// The turn's account hit a rate or usage limit before anything reached the client; the
    /// turn moved to another account.
    Failover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BypassReason {
    /// Another session holds the key's connection.
    Busy,
    /// `max_per_account` or `max_total` reached.
    Cap,
    /// `pool.enabled: false`.
    Disabled,
    /// No conversation id.
    NoKey,
}

/// Why a pooled connection left the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    Close1012,
    Close1013,
    AccountChanged,
    MaxAge,
    IdleTimeout,
    /// Closed, failed, or sent data while idle; or failed mid-turn.
    Dead,
    /// Poisoned: the turn did not end cleanly (e.g. the client left mid-turn).
    Discarded,
    Shutdown,
    /// A cap was reached: the least recently used idle connection made room for a new key.
    Lru,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Decision {
    /// `reuse`, `new` or `bypass` (log field, metrics label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Reuse => "reuse",
            Decision::New(_) => "new",
            Decision::Bypass(_) => "bypass",
        }
    }

    /// Every decision with every reason, in [`Decision::index`] order.
    pub const ALL: [Decision; 12] = [
        Decision::Reuse,
        Decision::New(NewReason::Miss),
        Decision::New(NewReason::Expired),
        Decision::New(NewReason::Evicted),
        Decision::New(NewReason::Dead),
        Decision::New(NewReason::RetryAfterStaleReuse),
        Decision::New(NewReason::Discarded),
        Decision::New(NewReason::Failover),
        Decision::Bypass(BypassReason::Busy),
        Decision::Bypass(BypassReason::Cap),
        Decision::Bypass(BypassReason::Disabled),
        Decision::Bypass(BypassReason::NoKey),
    ];

    /// The decision's place in [`Decision::ALL`] (per decision-and-reason counters), or
    /// `ALL.len()` for one the list lacks (the metrics then count it by lookup). Found by
    /// search rather than a second hand-kept mapping, which could point a decision added to
    /// the enum but not to the list at another decision's counter.
    pub fn index(&self) -> usize {
        Decision::ALL
            .iter()
            .position(|d| d == self)
            .unwrap_or(Decision::ALL.len())
    }

    /// 0 for reuse, 1 for new, 2 for bypass (per-decision counters).
    pub fn slot(&self) -> usize {
        match self {
            Decision::Reuse => 0,
            Decision::New(_) => 1,
            Decision::Bypass(_) => 2,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Decision::Reuse => "-",
            Decision::New(r) => match r {
                NewReason::Miss => "miss",
                NewReason::Expired => "expired",
                NewReason::Evicted => "evicted",
                NewReason::Dead => "dead",
                NewReason::RetryAfterStaleReuse => "retry_after_stale_reuse",
                NewReason::Discarded => "discarded",
                NewReason::Failover => "failover",
            },
            Decision::Bypass(r) => match r {
                BypassReason::Busy => "busy",
                BypassReason::Cap => "cap",
                BypassReason::Disabled => "disabled",
                BypassReason::NoKey => "no_key",
            },
        }
    }
}

impl fmt::Display for EvictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EvictReason::Close1012 => "close_1012",
            EvictReason::Close1013 => "close_1013",
            EvictReason::AccountChanged => "account_changed",
            EvictReason::MaxAge => "max_age",
            EvictReason::IdleTimeout => "idle_timeout",
            EvictReason::Dead => "dead",
            EvictReason::Discarded => "discarded",
            EvictReason::Shutdown => "shutdown",
            EvictReason::Lru => "lru",
        })
    }
}

impl EvictReason {
    /// What the next `new` of the same key says about why nothing was reusable.
    pub(super) fn next_new_reason(self) -> NewReason {
        match self {
            EvictReason::MaxAge => NewReason::Expired,
            EvictReason::Close1012
            | EvictReason::Close1013
            | EvictReason::AccountChanged
            | EvictReason::Lru => NewReason::Evicted,
            EvictReason::Dead => NewReason::Dead,
            EvictReason::Discarded => NewReason::Discarded,
            EvictReason::IdleTimeout | EvictReason::Shutdown => NewReason::Miss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decision_has_its_own_index() {
        for (i, d) in Decision::ALL.iter().enumerate() {
            assert_eq!(d.index(), i, "{d} {}", d.reason());
        }
        let mut labels: Vec<_> = Decision::ALL
            .iter()
            .map(|d| (d.as_str(), d.reason()))
            .collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), Decision::ALL.len());
    }
}
