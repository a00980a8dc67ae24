//! wsgate: a WebSocket-first gateway for Codex-style clients of the OpenAI Responses API
//! WebSocket mode. Each client session rides a pooled upstream WebSocket keyed by
//! `(client, account, lane)`, so `previous_response_id` continuations and the prompt cache
//! survive client reconnects.
//!
//! # Layout
//! - [`config`]: `gateway.yaml` schema, figment loading, validation, secrets.
//! - [`telemetry`]: tracing subscriber (pretty / JSON).
//! - [`error`]: typed errors per boundary.
//! - [`ids`]: `AccountId`, `ConversationId`, `ClientId`, `Route` (client, lane, affinity).
//! - `fifo`: `FifoMap`, the bounded map behind sticky assignments and tombstones.
//! - [`accounts`]: upstream credentials, usability, conversation -> account assignment.
//! - [`headers`]: lane and affinity resolution, header forwarding rules.
//! - [`event`]: frame sniffing, terminal events, gateway `error` events.
//! - [`ingress`]: how requests enter: the WebSocket session, the HTTP `POST` (SSE/JSON), request
//!   bodies, the `/models` and `/compact` relays; adapters around the turn engine.
//! - [`turn`]: the turn engine (one relay loop for every ingress) and the ledger that
//!   attributes upstream events to client events.
//! - [`close`]: the close-code policy.
//! - [`tls`]: the upstream rustls config (ring).
//! - [`upstream`]: dialing, `UpstreamConn`.
//! - [`net`]: outbound TCP/TLS connections to the upstream host.
//! - [`pump`]: the socket shared by an upstream connection's keepalive task and its holder.
//! - [`pool`]: `Pool`, `PoolKey`, `Pooled`, decisions, evictions, the reaper.
//! - [`gateway`]: shared state and the acquire path.
//! - [`listener`]: the HTTP/1.1 accept loop (handshake deadline and bound) and the TLS listener.
//! - [`server`]: axum routes, authentication, the upgrade, shutdown drain.
//! - [`reload`]: hot reload on SIGHUP and config file changes.
//! - [`metrics`]: Prometheus metric names, buckets and hot-path handles.
//! - [`status`]: the `/status` page and `/status.json`.
//! - [`mock`]: the built-in mock upstream.
//! - [`client`]: a small WebSocket client for the demo and tests.
//! - [`demo`]: the offline demo.
//! - [`loadgen`]: the load generator behind `wsgate loadgen`.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod client;
pub mod close;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod error;
pub mod event;
mod fifo;
pub mod gateway;
pub mod headers;
pub mod ids;
pub mod ingress;
pub mod listener;
pub mod loadgen;
pub mod metrics;
pub mod mock;
pub mod net;
pub mod pool;
pub mod pump;
pub mod reload;
pub mod server;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod turn;
pub mod upstream;

pub use config::Config;
pub use gateway::Gateway;
pub use server::serve;
