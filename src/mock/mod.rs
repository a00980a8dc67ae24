//! The built-in mock upstream: a Responses API WebSocket server that behaves like the real one
//! where it matters to a gateway, plus test hooks.
//!
//! - response ids `resp_<conn>_<n>`; a connection-local cache of the last `cache_depth`
//!   responses (default 1, like the real upstream): an unknown `previous_response_id` gets
//!   `error` status 400 `previous_response_not_found`;
//! - one turn at a time per connection: creates that arrive while a turn streams are queued,
//!   and counted as overlaps ([`MockUpstream::overlaps`]) so tests can prove serialization;
//! - streamed deltas, tool-call turns, `generate:false` prewarm, `response.failed`, `error`;
//! - `usage.input_tokens_details.cached_tokens` grows per connection (0 on a fresh
//!   connection), so cache locality is observable;
//! - hooks from `[[mock: ...]]` directives in the last user message (see [`script`]): close
//!   with a code or drop the TCP connection before/mid/after a turn, stall, slow deltas;
//! - client events other than `response.create` are answered at once, even mid-turn, as the
//!   real upstream does: `response.processed` silently, `response.steer` and unknown types with
//!   an `error` (status 400) while the turn in flight goes on streaming;
//! - counters of accepted and open connections, each connection's upgrade headers and the
//!   types of the events it received.

mod plain;
pub mod script;
mod stamped;
mod turn;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use script::CloseKind;
use turn::{ConnState, Inbox, Outcome, script_is_create, serve_frame};

/// Mock settings.
#[derive(Clone)]
pub struct MockConfig {
    pub listen: SocketAddr,
    /// Responses remembered per connection for `previous_response_id`. Default 1.
    pub cache_depth: usize,
    /// Wait this long before answering each upgrade (to test concurrent dials).
    pub handshake_delay: Duration,
    /// Serve wss:// with this config.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Extra headers on the 101 (e.g. `x-codex-turn-state`, `openai-model`).
    pub response_headers: Vec<(String, String)>,
    /// Answer every upgrade with this HTTP status instead of 101.
    pub reject_status: Option<u16>,
    /// Largest message accepted.
    pub max_message_size: usize,
    /// Accepted `authorization` values; others get [`MockConfig::key_refusal`]. Empty =
    /// accept any.
    pub require_keys: Vec<String>,
    /// The HTTP status and `error.code` a refused key gets (default 401 `invalid_api_key`).
    pub key_refusal: (u16, &'static str),
    /// Simulated cost of a fresh connection: its first turn waits this long (cold cache).
    pub fresh_cost: Duration,
    /// Benchmark mode: deltas carry `ts_ns` (send time, ns since the Unix epoch) and are
    /// written in batches (flushed every 64 frames and at the end of the turn).
    pub speed: bool,
    /// Handshakes carrying an `openai-organization` other than this get HTTP 401
    /// `mismatched_organization` (the real API's answer to a foreign organization).
    pub organization: Option<String>,
    /// Handshakes beyond this many open connections get HTTP 429 (an upstream connection
    /// limit); counted in [`MockUpstream::refused`].
    pub max_open: Option<usize>,
    /// The reason of scripted close frames (default `mock close <code>`); a hostile upstream
    /// can put anything there.
    pub close_reason: Option<String>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cache_depth: 1,
            handshake_delay: Duration::ZERO,
            tls: None,
            response_headers: vec![
                ("openai-model".into(), "mock-model".into()),
                ("x-models-etag".into(), "mock-etag".into()),
            ],
            reject_status: None,
            max_message_size: 64 << 20,
            require_keys: Vec::new(),
            key_refusal: (401, "invalid_api_key"),
            fresh_cost: Duration::ZERO,
            speed: false,
            organization: None,
            max_open: None,
            close_reason: None,
        }
    }
}

/// How the mock answers every create on a rate-limited account ([`MockUpstream::limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// `response.failed` (code `usage_limit_reached`) instead of an `error` event (429).
    pub failed: bool,
    /// Send `response.created` (and `codex.rate_limits`) first.
    pub created_first: bool,
    /// Stream this many deltas before the limit (visible output).
    pub after_deltas: usize,
    pub resets_in_seconds: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            failed: false,
            created_first: false,
            after_deltas: 0,
            resets_in_seconds: 60,
        }
    }
}

/// A plain HTTP request the mock served.
#[derive(Debug, Clone)]
pub struct HttpRecord {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub authorization: Option<String>,
    pub body: String,
}

/// What the mock saw of one connection.
#[derive(Debug)]
pub struct ConnRecord {
    pub id: u64,
    /// Upgrade request headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// `response.create` frames received.
    pub creates: AtomicUsize,
    /// The close code the gateway sent, if it closed with a frame.
    pub peer_close: Mutex<Option<u16>>,
    /// The `type` of every event received, in order (the first 1024).
    pub received: Mutex<Vec<String>>,
    /// The last user text of every `response.create` received (the first 1024).
    pub user_texts: Mutex<Vec<String>>,
    /// Every event frame sent, verbatim (the first 4096).
    pub sent: Arc<Mutex<Vec<String>>>,
}

impl ConnRecord {
    pub fn peer_close_code(&self) -> Option<u16> {
        self.peer_close.lock().ok().and_then(|c| *c)
    }

    /// The last user text of each `response.create` received so far.
    pub fn user_texts(&self) -> Vec<String> {
        self.user_texts
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// The event frames sent so far, verbatim.
    pub fn sent_frames(&self) -> Vec<String> {
        self.sent.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The types of the events received so far.
    pub fn received_types(&self) -> Vec<String> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct MockState {
    config: MockConfig,
    accepted: AtomicU64,
    open: AtomicUsize,
    overlaps: AtomicUsize,
    /// Handshakes refused by `organization` or `max_open`.
    refused: AtomicUsize,
    /// Rate-limited accounts, by `authorization` value.
    limited: Mutex<std::collections::HashMap<String, Limit>>,
    /// Plain HTTP requests served (`/models`, `/responses/compact`), the last 1024.
    http_requests: Mutex<VecDeque<HttpRecord>>,
    /// Bytes of event frames written to gateways.
    bytes_sent: AtomicU64,
    /// Last 1024 connections.
    conns: Mutex<VecDeque<Arc<ConnRecord>>>,
}

/// A running mock upstream; stops when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    tls: bool,
    state: Arc<MockState>,
    _task: AbortOnDropHandle<()>,
}

impl MockUpstream {
    pub async fn start(config: MockConfig) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let tls = config.tls.is_some();
        let state = Arc::new(MockState {
            config,
            accepted: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            overlaps: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            limited: Mutex::new(Default::default()),
            http_requests: Mutex::new(VecDeque::new()),
            bytes_sent: AtomicU64::new(0),
            conns: Mutex::new(VecDeque::new()),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(MockUpstream {
            addr,
            tls,
            state,
            _task: AbortOnDropHandle::new(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to put in `upstream.url`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}/v1/responses",
            if self.tls { "wss" } else { "ws" },
            self.addr
        )
    }

    /// WebSocket connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Acquire)
    }

    /// WebSocket connections open now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::Acquire)
    }

    /// `response.create` frames that arrived while another turn was in flight on the same
    /// connection.
    pub fn overlaps(&self) -> usize {
        self.state.overlaps.load(Ordering::Acquire)
    }

    /// From now on every create on a connection authorized with `authorization` (e.g.
    /// `Bearer sk-acct-a`) ends in a rate/usage limit, shaped by `limit`.
    pub fn limit(&self, authorization: &str, limit: Limit) {
        if let Ok(mut l) = self.state.limited.lock() {
            l.insert(authorization.to_string(), limit);
        }
    }

    /// Lifts [`MockUpstream::limit`].
    pub fn unlimit(&self, authorization: &str) {
        if let Ok(mut l) = self.state.limited.lock() {
            l.remove(authorization);
        }
    }

    /// The plain HTTP requests served so far (`/models`, `/responses/compact`).
    pub fn http_requests(&self) -> Vec<HttpRecord> {
        self.state
            .http_requests
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Handshakes refused for a foreign organization or over `max_open`.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::Acquire)
    }

    /// Bytes of event frames written so far.
    pub fn bytes_sent(&self) -> u64 {
        self.state.bytes_sent.load(Ordering::Acquire)
    }

    /// The record of connection `id` (ids start at 1, in accept order).
    pub fn connection(&self, id: u64) -> Option<Arc<ConnRecord>> {
        self.state
            .conns
            .lock()
            .ok()?
            .iter()
            .find(|c| c.id == id)
            .cloned()
    }

    pub fn connections(&self) -> Vec<Arc<ConnRecord>> {
        self.state
            .conns
            .lock()
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<MockState>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            if !state.config.handshake_delay.is_zero() {
                tokio::time::sleep(state.config.handshake_delay).await;
            }
            if let Some(tls) = state.config.tls.clone() {
                match tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await {
                    Ok(stream) => serve_conn(state, stream).await,
                    Err(e) => debug!(error = %e, "mock TLS accept failed"),
                }
            } else if plain::is_plain_http(&tcp).await {
                plain::serve_http(state, tcp).await;
            } else {
                serve_conn::<TcpStream>(state, tcp).await;
            }
        });
    }
}

/// Decrements the open counter when the connection ends.
struct OpenGuard(Arc<MockState>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upgrade refusal's body as the real API writes it: a pretty-printed error object.
fn refusal_body(kind: &str, code: &str, message: &str) -> String {
    let v = serde_json::json!({"error": {
        "message": message,
        "type": kind,
        "param": null,
        "code": code,
    }});
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

async fn serve_conn<S>(state: Arc<MockState>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut seen_headers = Vec::new();
    let reject = state.config.reject_status;
    let extra = state.config.response_headers.clone();
    let keys = state.config.require_keys.clone();
    let mut stats_request = false;
    #[allow(clippy::result_large_err)] // the signature is tungstenite's callback type
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == "/mock/stats" {
            stats_request = true;
            return Ok(resp);
        }
        for (k, v) in req.headers() {
            seen_headers.push((k.as_str().to_string(), v.to_str().unwrap_or("").to_string()));
        }
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let organization = req
            .headers()
            .get("openai-organization")
            .and_then(|v| v.to_str().ok());
        let foreign_org = match (&state.config.organization, organization) {
            (Some(ours), Some(theirs)) => ours != theirs,
            _ => false,
        };
        let full = state
            .config
            .max_open
            .is_some_and(|max| state.open.load(Ordering::Acquire) >= max);
        let (refused_status, refused_code) = state.config.key_refusal;
        let status = match reject {
            Some(s) => Some((s, format!("mock rejects with {s}"))),
            None if !keys.is_empty() && !keys.iter().any(|k| k == auth) => Some((
                refused_status,
                refusal_body(
                    "invalid_request_error",
                    refused_code,
                    "Incorrect API key provided",
                ),
            )),
            None if foreign_org => Some((
                401,
                refusal_body(
                    "invalid_request_error",
                    "mismatched_organization",
                    "OpenAI-Organization header should match organization for API key",
                ),
            )),
            None if full => Some((
                429,
                refusal_body("requests", "rate_limit_exceeded", "too many connections"),
            )),
            None => None,
        };
        if foreign_org || (full && reject.is_none()) {
            state.refused.fetch_add(1, Ordering::AcqRel);
        }
        if let Some((status, body)) = status {
            let mut err = ErrorResponse::new(Some(body));
            *err.status_mut() =
                http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
            return Err(err);
        }
        for (k, v) in &extra {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                resp.headers_mut().insert(k, v);
            }
        }
        Ok(resp)
    };
    // 16 KiB reads and write batches: tungstenite's default 128 KiB read buffer is
    // zero-filled before every read.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(16 << 10)
        .write_buffer_size(16 << 10)
        .max_message_size(Some(state.config.max_message_size))
        .max_frame_size(Some(state.config.max_message_size));
    let ws =
        match tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config))
            .await
        {
            Ok(ws) => ws,
            Err(e) => {
                debug!(error = %e, "mock handshake failed");
                return;
            }
        };
    if stats_request {
        let mut ws = ws;
        let stats = json!({
            "accepted": state.accepted.load(Ordering::Acquire),
            "open": state.open.load(Ordering::Acquire),
            "overlaps": state.overlaps.load(Ordering::Acquire),
            "bytes_sent": state.bytes_sent.load(Ordering::Acquire),
        });
        let _ = ws.send(Message::text(stats.to_string())).await;
        let _ = ws.close(None).await;
        return;
    }
    let id = state.accepted.fetch_add(1, Ordering::AcqRel) + 1;
    state.open.fetch_add(1, Ordering::AcqRel);
    let _open = OpenGuard(state.clone());
    let record = Arc::new(ConnRecord {
        id,
        headers: seen_headers,
        creates: AtomicUsize::new(0),
        peer_close: Mutex::new(None),
        received: Mutex::new(Vec::new()),
        user_texts: Mutex::new(Vec::new()),
        sent: Arc::new(Mutex::new(Vec::new())),
    });
    if let Ok(mut conns) = state.conns.lock() {
        conns.push_back(record.clone());
        while conns.len() > 1024 {
            conns.pop_front();
        }
    }

    let (mut sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::channel::<String>(256);
    let pending = Arc::new(AtomicUsize::new(0));
    let deaf = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (pending, state, record, deaf) =
            (pending.clone(), state.clone(), record.clone(), deaf.clone());
        AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                if deaf.load(Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
                let msg = match tokio::time::timeout(Duration::from_millis(50), stream.next()).await
                {
                    Err(_) => continue,
                    Ok(Some(Ok(msg))) => msg,
                    Ok(_) => break,
                };
                match msg {
                    Message::Text(t) => {
                        if let Ok(mut r) = record.received.lock()
                            && r.len() < 1024
                        {
                            let ty = crate::event::sniff_type(&t).unwrap_or_default();
                            r.push(ty.into_owned());
                        }
                        if script_is_create(&t) {
                            if let Ok(mut u) = record.user_texts.lock()
                                && u.len() < 1024
                            {
                                let body = serde_json::from_str(&t).unwrap_or_default();
                                u.push(script::last_user_text(&body));
                            }
                            record.creates.fetch_add(1, Ordering::AcqRel);
                            if pending.fetch_add(1, Ordering::AcqRel) > 0 {
                                state.overlaps.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        if tx.send(t.to_string()).await.is_err() {
                            break;
                        }
                    }
                    Message::Close(frame) => {
                        if let Ok(mut c) = record.peer_close.lock() {
                            *c = Some(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                        }
                        break;
                    }
                    _ => {}
                }
            }
        }))
    };
    let mut conn = ConnState {
        id,
        authorization: record.header("authorization").unwrap_or("").to_string(),
        sent: record.sent.clone(),
        next: 0,
        cache: VecDeque::new(),
        last_context: 0,
        deaf,
    };
    let mut inbox = Inbox {
        rx,
        backlog: VecDeque::new(),
    };
    loop {
        let text = match inbox.backlog.pop_front() {
            Some(t) => t,
            None => match inbox.rx.recv().await {
                Some(t) => t,
                None => break,
            },
        };
        match serve_frame(&state, &mut conn, &mut inbox, &pending, &text, &mut sink).await {
            Outcome::Continue => {}
            Outcome::JunkLater(after) => {
                if let Err(_elapsed) =
                    tokio::time::timeout(after, std::future::pending::<()>()).await
                {
                    let junk =
                        json!({"type": "response.output_text.delta", "delta": "unsolicited"})
                            .to_string();
                    if sink.send(Message::text(junk)).await.is_err() {
                        break;
                    }
                }
            }
            Outcome::CloseLater(kind, after) => {
                // Idle close, unless another create arrives first.
                match tokio::time::timeout(after, inbox.rx.recv()).await {
                    Err(_) => {
                        if let CloseKind::Code(code) = kind {
                            let reason = format!("mock idle close {code}").into();
                            let frame = CloseFrame {
                                code: CloseCode::from(code),
                                reason,
                            };
                            let _ = sink.send(Message::Close(Some(frame))).await;
                            let _ =
                                tokio::time::timeout(Duration::from_millis(200), inbox.rx.recv())
                                    .await;
                        }
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(next)) => {
                        let o =
                            serve_frame(&state, &mut conn, &mut inbox, &pending, &next, &mut sink)
                                .await;
                        if !matches!(o, Outcome::Continue) {
                            break;
                        }
                    }
                }
            }
            Outcome::Close(code) => {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: state
                        .config
                        .close_reason
                        .clone()
                        .unwrap_or_else(|| format!("mock close {code}"))
                        .into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                // Give the peer a moment to answer the close before the socket drops.
                let _ = tokio::time::timeout(Duration::from_millis(200), inbox.rx.recv()).await;
                break;
            }
            Outcome::Eof | Outcome::Gone => break,
        }
    }
    drop(reader);
    drop(sink);
}
