//! The cross-field rules of a [`Config`] that serde cannot express.

use std::time::Duration;

use super::Config;
use crate::error::ConfigError;

impl Config {
    /// Cross-field rules that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, msg: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                msg,
            })
        };
        if self.paths.is_empty() {
            return invalid("paths", "at least one path is required".into());
        }
        let cl = &self.cluster;
        if let Some(url) = &cl.redis_url
            && ![
                "redis://",
                "rediss://",
                "redis+unix://",
                "unix://",
                "valkey://",
                "valkeys://",
            ]
            .iter()
            .any(|s| url.starts_with(s))
        {
            // The URL may hold a password: name the key, not the value.
            return invalid(
                "cluster.redis_url",
                "must start with redis://, rediss://, redis+unix:// or unix://".into(),
            );
        }
        if cl.call_timeout.is_zero()
            || cl.lease_ttl < Duration::from_secs(1)
            || cl.heartbeat.is_zero()
        {
            return invalid(
                "cluster",
                "call_timeout and heartbeat must be > 0 and lease_ttl >= 1s".into(),
            );
        }
        if cl.namespace.is_empty() || cl.namespace.contains(char::is_whitespace) {
            return invalid("cluster.namespace", "must be a non-empty word".into());
        }
        for (i, p) in self.paths.iter().enumerate() {
            if !p.starts_with('/') || p.len() < 2 {
                return invalid(&format!("paths[{i}]"), format!("`{p}` must start with `/`"));
            }
        }
        if self.clients.is_empty() && !self.listen.ip().is_loopback() {
            return invalid(
                "clients",
                format!(
                    "an empty list disables client authentication, which is only allowed when \
                     `listen` is a loopback address (listen is {})",
                    self.listen
                ),
            );
        }
        for (i, c) in self.clients.iter().enumerate() {
            if c.key_env.is_some() == c.key_file.is_some() {
                return invalid(
                    &format!("clients[{i}]"),
                    "set exactly one of `key_env` or `key_file`".into(),
                );
            }
        }
        match crate::upstream::UpstreamUrl::parse(&self.upstream.url) {
            Ok(_) => {}
            Err(msg) => return invalid("upstream.url", msg),
        }
        if let Err(msg) = self.upstream_http_base() {
            return invalid("upstream.http_url", msg);
        }
        if self.limits.frame_timeout < Duration::from_millis(10) {
            return invalid("limits.frame_timeout", "must be at least 10ms".into());
        }
        if self.relay.client_write_timeout.is_zero() {
            return invalid(
                "relay.client_write_timeout",
                "must be greater than 0".into(),
            );
        }
        if self.relay.max_queued_bytes.as_u64() < 1024 {
            return invalid("relay.max_queued_bytes", "must be at least 1KiB".into());
        }
        let h = &self.http;
        if h.max_body_size.as_u64() < 1024 {
            return invalid("http.max_body_size", "must be at least 1KiB".into());
        }
        if h.max_response_size.as_u64() < 1024 {
            return invalid("http.max_response_size", "must be at least 1KiB".into());
        }
        if h.body_timeout.is_zero() {
            return invalid("http.body_timeout", "must be greater than 0".into());
        }
        if h.sse_keepalive.is_zero() {
            return invalid("http.sse_keepalive", "must be greater than 0".into());
        }
        let l = &self.limits;
        if l.max_client_connections == 0 {
            return invalid("limits.max_client_connections", "must be at least 1".into());
        }
        if l.handshake_timeout.is_zero() {
            return invalid("limits.handshake_timeout", "must be greater than 0".into());
        }
        if l.max_header_size.as_u64() < 8 * 1024 || l.max_header_size.as_u64() > 1024 * 1024 {
            return invalid(
                "limits.max_header_size",
                "must be between 8KiB and 1MiB".into(),
            );
        }
        if l.max_handshakes == 0 {
            return invalid("limits.max_handshakes", "must be at least 1".into());
        }
        if l.first_frame_timeout.is_zero() {
            return invalid(
                "limits.first_frame_timeout",
                "must be greater than 0".into(),
            );
        }
        if l.turn_idle_timeout.is_zero() {
            return invalid("limits.turn_idle_timeout", "must be greater than 0".into());
        }
        if self.admin.key_env.is_some() && self.admin.key_file.is_some() {
            return invalid("admin", "set at most one of `key_env` or `key_file`".into());
        }
        if self.upstream.connect_timeout.is_zero() {
            return invalid("upstream.connect_timeout", "must be greater than 0".into());
        }
        if self.accounts.is_empty() {
            return invalid("accounts", "at least one account is required".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let key = format!("accounts[{i}]");
            if a.id.is_empty() || a.id.contains(char::is_whitespace) {
                return invalid(
                    &format!("{key}.id"),
                    "must be non-empty without spaces".into(),
                );
            }
            if !seen.insert(a.id.as_str()) {
                return invalid(
                    &format!("{key}.id"),
                    format!("duplicate account id `{}`", a.id),
                );
            }
            let sources = [
                a.api_key_env.is_some(),
                a.api_key_file.is_some(),
                a.access_token_env.is_some(),
                a.access_token_file.is_some(),
            ];
            if a.weight == 0 {
                return invalid(&format!("{key}.weight"), "must be at least 1".into());
            }
            if a.max_connections == Some(0) {
                return invalid(
                    &format!("{key}.max_connections"),
                    "must be at least 1".into(),
                );
            }
            if sources.iter().filter(|s| **s).count() != 1 {
                return invalid(
                    &key,
                    "set exactly one of `api_key_env`, `api_key_file`, `access_token_env`, \
                     `access_token_file`"
                        .into(),
                );
            }
        }
        let p = &self.pool;
        if p.max_age.is_zero() {
            return invalid("pool.max_age", "must be greater than 0".into());
        }
        if p.idle_timeout.is_zero() {
            return invalid("pool.idle_timeout", "must be greater than 0".into());
        }
        if p.unused_idle_timeout.is_zero() {
            return invalid("pool.unused_idle_timeout", "must be greater than 0".into());
        }
        if p.ping_interval < Duration::from_millis(10) {
            return invalid("pool.ping_interval", "must be at least 10ms".into());
        }
        if self.upstream.write_timeout.is_zero() {
            return invalid("upstream.write_timeout", "must be greater than 0".into());
        }
        if p.max_per_account == 0 {
            return invalid("pool.max_per_account", "must be at least 1".into());
        }
        if p.max_total == 0 {
            return invalid("pool.max_total", "must be at least 1".into());
        }
        let r = &self.relay;
        if r.buffer_frames == 0 {
            return invalid("relay.buffer_frames", "must be at least 1".into());
        }
        if r.max_message_size.as_u64() < 1024 {
            return invalid("relay.max_message_size", "must be at least 1KiB".into());
        }
        if let Some(f) = r.max_frame_size
            && (f.as_u64() < 1024 || f > r.max_message_size)
        {
            return invalid(
                "relay.max_frame_size",
                "must be between 1KiB and relay.max_message_size".into(),
            );
        }
        if r.read_buffer_size.as_u64() < 512 {
            return invalid("relay.read_buffer_size", "must be at least 512B".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid("log.level", e.to_string());
        }
        Ok(())
    }
}
