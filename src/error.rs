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
    /// The upstream answered the upgrade with a non-101 HTTP status.
    #[error("upstream refused the upgrade with HTTP {status}: {body}")]
    Status { status: u16, body: String },
    /// Anything else in the WebSocket handshake.
    #[error("upstream handshake failed: {0}")]
    Protocol(String),
}

impl DialError {
    /// The HTTP status a client should see for this failure.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::Timeout(_) => 504,
            DialError::Status { status, .. } => *status,
            _ => 502,
        }
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
}

impl AcquireError {
    pub fn http_status(&self) -> u16 {
        match self {
            AcquireError::NoAccount { .. } => 429,
            AcquireError::ShuttingDown => 503,
            AcquireError::Dial(d) => d.http_status(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AcquireError::NoAccount { .. } => "all_accounts_unavailable",
            AcquireError::ShuttingDown => "shutting_down",
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
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}
