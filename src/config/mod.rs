//! Configuration: the `gateway.yaml` schema, its defaults, loading through figment
//! (defaults < YAML file < `WSGATE_` environment with `__` nesting) and validation.
//!
//! Invariants: a [`Config`] that passed [`Config::validate`] has a parseable upstream URL,
//! at least one account, non-zero pool and relay limits, and either client keys or a
//! loopback listener. Secrets never live in a [`Config`]: it names where they come from
//! (`*_env`, `*_file`); [`Config::resolve_secrets`] reads them into [`Secrets`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Yaml};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

mod validate;

/// Top-level keys; environment variables `WSGATE_<KEY>[__<SUB>...]` are only read for these,
/// so unrelated variables such as `WSGATE_CLIENT_KEY` (a secret named by `key_env`) are ignored.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen", "paths", "clients", "upstream", "accounts", "routing", "pool", "relay", "shutdown",
    "admin", "limits", "tls", "log", "http", "cluster",
];

/// The whole gateway configuration (DESIGN §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the listener binds. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// URL paths that accept the WebSocket upgrade. Default
    /// `[/v1/responses, /responses, /backend-api/codex/responses]`.
    pub paths: Vec<String>,
    /// Gateway API keys accepted as `Authorization: Bearer`. Empty = no auth (loopback only).
    pub clients: Vec<ClientKeyConfig>,
    /// Where and how to dial the upstream.
    pub upstream: UpstreamConfig,
    /// Upstream credentials. At least one.
    pub accounts: Vec<AccountConfig>,
    /// Conversation -> account assignment policy.
    pub routing: RoutingConfig,
    /// Pool limits.
    pub pool: PoolConfig,
    /// Relay buffers and frame limits.
    pub relay: RelayConfig,
    /// Graceful drain.
    pub shutdown: ShutdownConfig,
    /// `/metrics`, `/readyz`, `/status`, `/status.json`.
    pub admin: AdminConfig,
    /// Connection and time limits for clients and turns.
    pub limits: LimitsConfig,
    /// The HTTP ingress (`POST` on the paths) and the HTTP relays (`/models`, `/compact`).
    pub http: HttpConfig,
    /// Serve wss:// (and https://) on `listen` with this certificate. Default: plain.
    pub tls: Option<TlsConfig>,
    /// Logging.
    pub log: LogConfig,
    /// Several instances sharing account state on Redis. Default: off (one process, no
    /// external dependency).
    pub cluster: ClusterConfig,
}

/// Shared state on Redis (`cluster.redis_url`); without it nothing is shared and no
/// connection is opened anywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://host:port/db`, `rediss://...`, or `redis+unix:///path/to.sock`. Default: none.
    /// The URL may carry a password: it is never logged.
    pub redis_url: Option<String>,
    /// This instance's name in the registry and in other instances' logs. Default:
    /// `<hostname>-<pid>`.
    pub instance_id: Option<String>,
    /// The key namespace; keys are `<namespace>:v1:...`. Default `wsg`.
    pub namespace: String,
    /// Every Redis call's deadline; past it the decision falls back to local state.
    /// Default `250ms`.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How long a shared affinity -> account binding lives after its last use. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub affinity_ttl: Duration,
    /// A client-key connection lease expires this long after its last refresh (a crashed
    /// instance's leases go with it); refreshed every third of it. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// The instance registry heartbeat; an entry expires after three missed beats.
    /// Default `10s`.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: None,
            instance_id: None,
            namespace: "wsg".into(),
            call_timeout: Duration::from_millis(250),
            affinity_ttl: Duration::from_secs(3600),
            lease_ttl: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
        }
    }
}

/// One gateway API key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKeyConfig {
    /// Name shown in logs (never the key).
    pub name: String,
    /// Environment variable holding the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// File holding the key (trailing whitespace trimmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// Upstream endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `ws://` or `wss://` URL of the Responses WebSocket endpoint.
    /// Default `wss://api.openai.com/v1/responses`.
    pub url: String,
    /// TCP + TLS + WebSocket handshake deadline. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Extra PEM roots trusted beside the webpki roots. Default none.
    pub ca_file: Option<PathBuf>,
    /// One upstream write may take this long before the connection is declared dead. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// `http://` or `https://` base for the HTTP relays (`{base}/models`,
    /// `{base}/responses/compact`). Default: from `url` (`wss` -> `https`, same host, the path
    /// without its last `/responses`).
    pub http_url: Option<String>,
}

/// The HTTP ingress and relays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest request body, after decoding (and on the wire); larger gets HTTP 413.
    /// Default `64MiB`.
    pub max_body_size: ByteSize,
    /// The whole request body must arrive within this. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// An SSE stream silent this long gets a keepalive (`codex.keepalive` events for Codex,
    /// `: keepalive` comments for other clients); before the first byte this is also how long
    /// an error can still become an HTTP status. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub sse_keepalive: Duration,
    /// Largest response relayed from the upstream's `/models` or `/responses/compact`, and
    /// largest non-streaming response collected. Default `32MiB`.
    pub max_response_size: ByteSize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_size: ByteSize::mib(64),
            body_timeout: Duration::from_secs(60),
            sse_keepalive: Duration::from_secs(10),
            max_response_size: ByteSize::mib(32),
        }
    }
}

/// One upstream account. Exactly one credential source: an API key, or a ChatGPT access token
/// (with `chatgpt_account_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// Stable id used in pool keys and logs.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token_file: Option<PathBuf>,
    /// Sent upstream as `chatgpt-account-id` (ChatGPT-auth upstreams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chatgpt_account_id: Option<String>,
    /// Share of new conversations relative to other accounts (load / weight). Default 1.
    #[serde(default = "one")]
    pub weight: u32,
    /// Pooled connections of this account; default `pool.max_per_account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Sent upstream as `openai-organization` (never taken from the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// Sent upstream as `openai-project` (never taken from the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

fn one() -> u32 {
    1
}

/// How conversations are assigned to accounts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Cooldown after a rate limit that does not say when it resets. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Remembered conversation -> account assignments. Default 100000.
    pub max_conversations: usize,
    /// An account whose credential the upstream refused at the handshake is tried again
    /// after this (the next dial is the check; it recovers if that succeeds). Default `5m`.
    #[serde(with = "humantime_serde")]
    pub auth_retry: Duration,
}

/// The listener's TLS certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// Connection and time limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client WebSocket sessions at once; more get HTTP 503 before the upgrade. Default 10000.
    pub max_client_connections: usize,
    /// Sessions at once per client key (`clients[].name`); 0 = no per-key limit. Default 256.
    pub max_connections_per_client: usize,
    /// A client must complete its handshake within this: the TLS handshake (with `tls`), and
    /// then the whole HTTP upgrade request head; else the connection is closed. Also closes
    /// idle keep-alive HTTP connections. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Connections in their handshake (TLS or HTTP, not yet a WebSocket session) at once,
    /// health checks and scrapes included; more wait in the accept backlog. Default 1024.
    pub max_handshakes: usize,
    /// Bytes buffered for all clients together (held WebSocket frames, decoded HTTP request
    /// bodies); past it new work is refused (close 1013, HTTP 503). Default `1GiB`.
    pub max_buffered_bytes: ByteSize,
    /// Largest HTTP request head (request line + headers) accepted; larger gets HTTP 431.
    /// Default `64KiB`.
    pub max_header_size: ByteSize,
    /// A WebSocket frame that started arriving must be complete within this (checked every
    /// interval, so it is closed within twice this); else close 1008. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// A new session must send its first frame within this; else close 1008. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub first_frame_timeout: Duration,
    /// During a turn, the upstream must send something within this; else the client gets an
    /// `error` event with status 504 and the connection is discarded. Default `300s` (Codex's
    /// own stream idle timeout).
    #[serde(with = "humantime_serde")]
    pub turn_idle_timeout: Duration,
    /// Browser `Origin` values accepted on upgrades. Empty = any. Requests without an
    /// `Origin` header (Codex, other non-browser clients) are always accepted. Default empty.
    pub allowed_origins: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_client_connections: 10_000,
            max_connections_per_client: 256,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_header_size: ByteSize::kib(64),
            max_buffered_bytes: ByteSize::gib(1),
            first_frame_timeout: Duration::from_secs(60),
            frame_timeout: Duration::from_secs(60),
            turn_idle_timeout: Duration::from_secs(300),
            allowed_origins: Vec::new(),
        }
    }
}

/// Operator endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer key required on the operator endpoints (env var). Default: none (open).
    pub key_env: Option<String>,
    /// Bearer key required on the operator endpoints (file).
    pub key_file: Option<PathBuf>,
    /// Serve the operator endpoints on this address instead of `listen`.
    pub listen: Option<SocketAddr>,
}

/// Graceful drain on SIGTERM / SIGINT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long turns in flight may run after the signal. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// Pool limits (DESIGN §1, §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// `false` = every session dials its own one-shot upstream (`bypass reason=disabled`).
    pub enabled: bool,
    /// A pooled connection this old is never handed out (upstream kills them at 60m). Default `55m`.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// An idle pooled connection is closed after this long unused. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Pooled connections (idle + busy + dialing) per account. Default 8.
    pub max_per_account: usize,
    /// Upstream connections in total: pooled (dials in progress included) and one-shots.
    /// Default 256.
    pub max_total: usize,
    /// Remembered recent evictions (so the next `new` says why). Default 1024.
    pub max_tombstones: usize,
    /// A pooled connection that never completed a turn (its client upgraded and left) is
    /// closed after this much idle time instead of `idle_timeout`. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub unused_idle_timeout: Duration,
    /// Keepalive: a ping after this much upstream silence; two intervals without anything
    /// heard evicts the connection. Runs while idle and during turns. Default `25s`.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A session whose key is held by another session waits this long for it to be released
    /// before taking a one-shot connection (`bypass reason=busy`). Covers a client that
    /// reconnects while its previous socket is still being torn down. Default `250ms`.
    #[serde(with = "humantime_serde")]
    pub busy_wait: Duration,
}

/// Relay limits (DESIGN §1 "Pump").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Ready upstream frames relayed per client flush at most (the batch between reading the
    /// upstream and one client write). Default 64.
    pub buffer_frames: usize,
    /// Largest WebSocket message accepted from either side. Default `32MiB`.
    pub max_message_size: ByteSize,
    /// Largest single WebSocket frame. Default: same as `max_message_size`.
    pub max_frame_size: Option<ByteSize>,
    /// Per-socket read buffer (also the write batching target). Default `16KiB`: allocated
    /// per read and released once drained, so an idle session holds none; a stream pays one
    /// read (and one client write) per 16 KiB: against `8KiB`, workload (a) ~1.05x the
    /// events/s at ~0.8x the CPU per event, (f) ~0.87x the CPU for ~2 MiB more peak RSS
    /// (bench/results/profile-stop38.md; `4KiB` -> `8KiB`: profile-stop35.md).
    pub read_buffer_size: ByteSize,
    /// Client frames held while a turn is in flight before the session is closed (1008). Default 16.
    pub max_queued_frames: usize,
    /// A write to a client that makes no progress this long ends the request or session
    /// (its upstream connection is discarded). Default `30s`.
    #[serde(with = "humantime_serde")]
    pub client_write_timeout: Duration,
    /// Bytes of client frames held behind an in-flight turn; more closes the session (1008).
    /// Default `32MiB`.
    pub max_queued_bytes: ByteSize,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` (one human line per event) or `json` (one JSON object per line).
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` itself overrides it. Default `info`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

// === impl Defaults ===

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            paths: vec![
                "/v1/responses".into(),
                "/responses".into(),
                "/backend-api/codex/responses".into(),
            ],
            clients: vec![ClientKeyConfig {
                name: "dev".into(),
                key_env: Some("WSGATE_CLIENT_KEY".into()),
                key_file: None,
            }],
            upstream: UpstreamConfig::default(),
            accounts: vec![AccountConfig {
                id: "main".into(),
                api_key_env: Some("OPENAI_API_KEY".into()),
                api_key_file: None,
                access_token_env: None,
                access_token_file: None,
                chatgpt_account_id: None,
                weight: 1,
                max_connections: None,
                organization: None,
                project: None,
            }],
            routing: RoutingConfig::default(),
            pool: PoolConfig::default(),
            relay: RelayConfig::default(),
            shutdown: ShutdownConfig::default(),
            admin: AdminConfig::default(),
            limits: LimitsConfig::default(),
            http: HttpConfig::default(),
            tls: None,
            log: LogConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "wss://api.openai.com/v1/responses".into(),
            connect_timeout: Duration::from_secs(10),
            ca_file: None,
            write_timeout: Duration::from_secs(60),
            http_url: None,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            cooldown: Duration::from_secs(60),
            max_conversations: 100_000,
            auth_retry: Duration::from_secs(300),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(30),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: true,
            max_age: Duration::from_secs(55 * 60),
            idle_timeout: Duration::from_secs(10 * 60),
            max_per_account: 8,
            max_total: 256,
            max_tombstones: 1024,
            unused_idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(25),
            busy_wait: Duration::from_millis(250),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            buffer_frames: 64,
            max_message_size: ByteSize::mib(32),
            max_frame_size: None,
            read_buffer_size: ByteSize::kib(16),
            max_queued_frames: 16,
            client_write_timeout: Duration::from_secs(30),
            max_queued_bytes: ByteSize::mib(32),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

// === impl Config ===

impl Config {
    /// Loads defaults < `path` (if it exists, or always when `required`) < `WSGATE_` env,
    /// then validates.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        if required && !path.exists() {
            return Err(ConfigError::Missing(path.to_path_buf()));
        }
        Self::from_figment(Self::figment(path))
    }

    /// The figment used by [`Config::load`]; exposed so tests can extend it.
    pub fn figment(path: &Path) -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Yaml::file(path))
            .merge(Env::prefixed("WSGATE_").split("__").filter(|k| {
                let k = k.as_str().to_ascii_lowercase();
                let first = k.split(['.', '_']).next().unwrap_or("");
                TOP_LEVEL_KEYS.contains(&first)
            }))
    }

    /// Parses YAML text over the defaults (no environment); used by tests and the demo.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Yaml::string(text)),
        )
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(ConfigError::from_figment)?;
        config.validate()?;
        Ok(config)
    }

    /// The base URL of the upstream's HTTP API (`upstream.http_url`, or derived from
    /// `upstream.url`: `wss` -> `https`, `ws` -> `http`, same authority, the path without its
    /// trailing `/responses`), without a trailing slash.
    pub fn upstream_http_base(&self) -> Result<String, String> {
        if let Some(u) = &self.upstream.http_url {
            let uri: http::Uri = u.parse().map_err(|e| format!("`{u}` is not a URL: {e}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!(
                    "`{u}` must be an http:// or https:// URL with a host"
                ));
            }
            return Ok(u.trim_end_matches('/').to_string());
        }
        let uri: http::Uri = self
            .upstream
            .url
            .parse()
            .map_err(|e| format!("upstream.url: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("wss") => "https",
            _ => "http",
        };
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let path = uri.path().trim_end_matches('/');
        let path = path.strip_suffix("/responses").unwrap_or(path);
        Ok(format!("{scheme}://{authority}{path}"))
    }

    /// Reads every secret the config names, through `lookup` for environment variables.
    pub fn resolve_secrets(
        &self,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Secrets, ConfigError> {
        let read = |key: String, env: &Option<String>, file: &Option<PathBuf>| {
            let value = if let Some(var) = env {
                lookup(var).ok_or_else(|| ConfigError::Invalid {
                    key: key.clone(),
                    msg: format!("environment variable `{var}` is not set"),
                })?
            } else if let Some(path) = file {
                std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
                    key: key.clone(),
                    msg: format!("cannot read `{}`: {e}", path.display()),
                })?
            } else {
                return Ok(None);
            };
            let value = value.trim().to_string();
            if value.is_empty() {
                return Err(ConfigError::Invalid {
                    key,
                    msg: "the secret is empty".into(),
                });
            }
            Ok(Some(value))
        };
        let mut clients = Vec::new();
        for (i, c) in self.clients.iter().enumerate() {
            let key = read(format!("clients[{i}]"), &c.key_env, &c.key_file)?;
            clients.push((c.name.clone(), key.unwrap_or_default()));
        }
        let mut accounts = HashMap::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let k = format!("accounts[{i}]");
            let cred = if let Some(v) = read(k.clone(), &a.api_key_env, &a.api_key_file)? {
                v
            } else {
                read(k, &a.access_token_env, &a.access_token_file)?.unwrap_or_default()
            };
            accounts.insert(a.id.clone(), cred);
        }
        let admin = read("admin".into(), &self.admin.key_env, &self.admin.key_file)?;
        Ok(Secrets {
            clients,
            accounts,
            admin,
        })
    }

    /// Max frame size in bytes (defaults to the message size).
    pub fn max_frame_bytes(&self) -> usize {
        self.relay
            .max_frame_size
            .unwrap_or(self.relay.max_message_size)
            .as_u64() as usize
    }
}

/// Secrets read at startup. `Debug` is redacted.
#[derive(Clone, Default)]
pub struct Secrets {
    /// `(client name, key)` pairs.
    pub clients: Vec<(String, String)>,
    /// account id -> bearer credential.
    pub accounts: HashMap<String, String>,
    /// The operator endpoints' key.
    pub admin: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field(
                "clients",
                &self.clients.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("accounts", &self.accounts.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests;
