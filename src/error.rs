//! Typed errors, one enum per boundary, each variant saying when it happens and what the
//! caller should do. `anyhow` is for `main.rs` and tests only.

use std::path::PathBuf;

/// Loading or validating `gateway.yaml`. The gateway refuses to start (exit 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` named a file that does not exist.
    #[error("config file `{}` does not exist", .0.display())]
    Missing(PathBuf),
    /// YAML syntax, an unknown key or a value of the wrong type; the message names the key.
    #[error("{0}")]
    Parse(String),
    /// A value that parsed but breaks a rule; `key` is its dotted path.
    #[error("invalid config key `{key}`: {msg}")]
    Invalid { key: String, msg: String },
}

impl ConfigError {
    pub(crate) fn from_figment(err: figment::Error) -> Self {
        let mut parts = Vec::new();
        for e in err {
            let path = e.path.join(".");
            let at = if path.is_empty() {
                String::new()
            } else {
                format!(" at key `{path}`")
            };
            let src = e
                .metadata
                .as_ref()
                .and_then(|m| m.source.as_ref())
                .map(|s| format!(" (from {s})"))
                .unwrap_or_default();
            parts.push(format!("invalid config{at}: {}{src}", e.kind));
        }
        ConfigError::Parse(parts.join("; "))
    }
}

/// Dialing the upstream failed. The session answers the client with [`DialError::http_status`]
/// (before the upgrade) or an `error` event with that status (after it).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP + TLS + handshake did not finish within `upstream.connect_timeout`.
    #[error("upstream connect timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// TCP connect or DNS failed.
    #[error("upstream connect failed: {0}")]
    Connect(String),
    /// TLS handshake failed (untrusted certificate, name mismatch, ...).
    #[error("upstream TLS failed: {0}")]
    Tls(String),
    /// The upstream answered the upgrade with a non-101 HTTP status. `body` is untrusted text
    /// as the upstream wrote it (at most [`MAX_REFUSAL_BODY`] bytes); the message shows it
    /// escaped and cut.
    #[error(
        "upstream refused the upgrade with HTTP {status}: {}",
        crate::telemetry::escape(body, 512)
    )]
    Status { status: u16, body: String },
    /// Anything else in the WebSocket handshake.
    #[error("upstream handshake failed: {0}")]
    Protocol(String),
}

impl DialError {
    /// The HTTP status a client should see for this failure. Only an upstream refusal's
    /// 4xx/5xx passes through; any other non-101 answer (a 200, a 3xx, a 1xx) is a 502.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::Timeout(_) => 504,
            DialError::Status { status, .. } if (400..=599).contains(status) => *status,
            _ => 502,
        }
    }

    /// True if the upstream refused the account's credential (so the account, not the
    /// request, is at fault): a 401 whose body names no other cause, or a 401/403 whose
    /// `error.code`/`error.type` is a credential code. A 401 about the organization or
    /// project, or a 403 about anything else, is not.
    pub fn refuses_credential(&self) -> bool {
        let DialError::Status { status, body } = self else {
            return false;
        };
        if !matches!(status, 401 | 403) {
            return false;
        }
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let err = &v["error"];
        let codes: Vec<&str> = [&err["code"], &err["type"]]
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        if codes.iter().any(|c| CREDENTIAL_CODES.contains(c)) {
            return true;
        }
        // A bare 401 (no JSON, or a generic type) is about authentication.
        *status == 401
            && !codes
                .iter()
                .any(|c| !matches!(*c, "invalid_request_error" | "authentication_error"))
    }

    /// Short machine-readable code for the `error` event.
    pub fn code(&self) -> &'static str {
        match self {
            DialError::Timeout(_) => "upstream_timeout",
            DialError::Connect(_) => "upstream_connect_failed",
            DialError::Tls(_) => "upstream_tls_failed",
            DialError::Status { .. } => "upstream_rejected",
            DialError::Protocol(_) => "upstream_handshake_failed",
        }
    }
}

/// A handshake refusal's body is kept up to this many bytes, enough for the real API's error
/// objects (pretty-printed, with a message of a few hundred characters).
pub const MAX_REFUSAL_BODY: usize = 4096;

/// `error.code` / `error.type` values of a handshake refusal that blame the credential.
const CREDENTIAL_CODES: &[&str] = &[
    "invalid_api_key",
    "invalid_authentication",
    "authentication_error",
    "token_expired",
    "token_invalidated",
    "token_revoked",
    "account_deactivated",
    "invalid_access_token",
];

/// Why a session could not get an upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Every account is unusable (cooling down, refused, disabled); answer 429 with a hint.
    #[error("{}", no_account_message(*.retry_after))]
    NoAccount {
        retry_after: Option<std::time::Duration>,
    },
    /// Dialing failed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The gateway is shutting down.
    #[error("gateway is shutting down")]
    ShuttingDown,
    /// `pool.max_total` upstream connections are open or dialing (one-shots included).
    #[error("the gateway is at its upstream connection limit (pool.max_total); try again")]
    AtCapacity,
}

impl AcquireError {
    pub fn http_status(&self) -> u16 {
        match self {
            AcquireError::NoAccount { .. } => 429,
            AcquireError::ShuttingDown | AcquireError::AtCapacity => 503,
            AcquireError::Dial(d) => d.http_status(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AcquireError::NoAccount { .. } => "all_accounts_unavailable",
            AcquireError::ShuttingDown => "shutting_down",
            AcquireError::AtCapacity => "upstream_capacity",
            AcquireError::Dial(d) => d.code(),
        }
    }
}

fn no_account_message(retry_after: Option<std::time::Duration>) -> String {
    match retry_after {
        Some(d) => format!(
            "every upstream account is rate-limited or unavailable; the first frees up in {}s",
            d.as_secs().max(1)
        ),
        None => "every upstream account is unavailable (refused, disabled or removed)".into(),
    }
}

/// Starting the gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("cluster.redis_url: {0}")]
    Cluster(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(status: u16, body: &str) -> DialError {
        DialError::Status {
            status,
            body: body.into(),
        }
    }

    #[test]
    fn credential_refusals() {
        assert!(refusal(401, "").refuses_credential(), "a bare 401");
        assert!(refusal(401, "mock rejects with 401").refuses_credential());
        assert!(
            refusal(401, r#"{"error":{"code":"invalid_api_key","message":"x"}}"#)
                .refuses_credential()
        );
        assert!(
            !refusal(401, r#"{"error":{"code":"mismatched_organization"}}"#).refuses_credential(),
            "the organization header, not the key"
        );
        assert!(!refusal(403, r#"{"error":{"code":"unsupported_country"}}"#).refuses_credential());
        assert!(refusal(403, r#"{"error":{"type":"account_deactivated"}}"#).refuses_credential());
        assert!(!refusal(403, "").refuses_credential());
        assert!(!refusal(429, "").refuses_credential());
    }

    #[test]
    fn only_4xx_and_5xx_pass_through() {
        assert_eq!(refusal(200, "").http_status(), 502);
        assert_eq!(refusal(302, "").http_status(), 502);
        assert_eq!(refusal(100, "").http_status(), 502);
        assert_eq!(refusal(403, "").http_status(), 403);
        assert_eq!(refusal(503, "").http_status(), 503);
    }
}
