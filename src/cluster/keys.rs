//! Redis key names. One versioned namespace (`<namespace>:v1:`); every identifier that comes
//! from a client or the upstream (client names, affinity ids, response ids) and every account
//! id is hashed, so Redis never holds a raw id or a secret.

use std::fmt::Write;

/// The key layout of one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// A short, stable digest: the first 16 bytes of SHA-256 over the parts (NUL-separated), hex.
pub fn digest(parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            ctx.update(&[0]);
        }
        ctx.update(p.as_bytes());
    }
    let d = ctx.finish();
    let mut out = String::with_capacity(32);
    for b in &d.as_ref()[..16] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl Keys {
    pub fn new(namespace: &str) -> Keys {
        Keys {
            prefix: format!("{namespace}:v1"),
        }
    }

    /// `(client, affinity)` -> account id.
    pub fn affinity(&self, client: &str, affinity: &str) -> String {
        format!("{}:aff:{}", self.prefix, digest(&[client, affinity]))
    }

    /// An account's shared unusable state (`cooling` / `auth_failed`), expiring with it.
    pub fn account_state(&self, account: &str) -> String {
        format!("{}:acct:{}:state", self.prefix, digest(&[account]))
    }

    /// response id -> owner (instance, client, lane).
    pub fn response(&self, response_id: &str) -> String {
        format!("{}:resp:{}", self.prefix, digest(&[response_id]))
    }

    /// A client key's connection leases (sorted set: member -> expiry).
    pub fn client_leases(&self, client: &str) -> String {
        format!("{}:client:{}:conns", self.prefix, digest(&[client]))
    }

    /// The instance registry (hash: instance id -> JSON).
    pub fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    /// The pub/sub channel for account state changes.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// The account digest carried in events (ids are hashed on the wire too).
    pub fn account_tag(&self, account: &str) -> String {
        digest(&[account])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_versioned_and_hashed() {
        let k = Keys::new("wsg");
        let aff = k.affinity("team-a", "sess-123");
        assert!(aff.starts_with("wsg:v1:aff:"));
        assert!(!aff.contains("team-a") && !aff.contains("sess-123"));
        assert_eq!(aff.len(), "wsg:v1:aff:".len() + 32);
        // Scoped by client: another client's same affinity is another key.
        assert_ne!(aff, k.affinity("team-b", "sess-123"));
        // The separator makes ("ab","c") and ("a","bc") different.
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
        assert!(!k.response("resp_secret").contains("resp_secret"));
        assert!(!k.account_state("acct-a").contains("acct-a"));
        assert_eq!(Keys::new("x").events(), "x:v1:events");
    }
}
