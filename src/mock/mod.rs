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

pub mod script;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use script::{CloseKind, Directives, Fixture, FixtureName, Phase, Vars};

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
    /// Accepted `authorization` values; others get HTTP 401. Empty = accept any.
    pub require_keys: Vec<String>,
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
            } else if is_plain_http(&tcp).await {
                serve_http(state, tcp).await;
            } else {
                serve_conn::<TcpStream>(state, tcp).await;
            }
        });
    }
}

/// True if the connection's request head (peeked, not consumed) is not a WebSocket upgrade.
async fn is_plain_http(tcp: &TcpStream) -> bool {
    let mut buf = vec![0u8; 8192];
    for _ in 0..200 {
        let Ok(n) = tcp.peek(&mut buf).await else {
            return false;
        };
        let head = &buf[..n];
        if n == 0 {
            return false;
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || n == buf.len() {
            let text = String::from_utf8_lossy(head).to_ascii_lowercase();
            return !text.contains("upgrade: websocket");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// The upstream's plain HTTP endpoints: `GET .../models`, `POST .../responses/compact`.
async fn serve_http(state: Arc<MockState>, tcp: TcpStream) {
    use http_body_util::BodyExt;
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let state = state.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = http_body_util::Limited::new(body, 64 << 20)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let target = parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let record = HttpRecord {
                method: parts.method.to_string(),
                target: target.clone(),
                authorization: parts
                    .headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                body: String::from_utf8_lossy(&body).into_owned(),
            };
            if let Ok(mut r) = state.http_requests.lock() {
                r.push_back(record);
                while r.len() > 1024 {
                    r.pop_front();
                }
            }
            let path = parts.uri.path();
            let (status, text) = if parts.method == http::Method::GET && path.ends_with("/models") {
                (
                    200,
                    json!({
                        "object": "list",
                        "data": [
                            {"id": "mock-model", "object": "model", "owned_by": "mock"},
                            {"id": "mock-model-mini", "object": "model", "owned_by": "mock"},
                        ],
                        "models": [{"slug": "mock-model"}, {"slug": "mock-model-mini"}],
                    })
                    .to_string(),
                )
            } else if parts.method == http::Method::POST && path.ends_with("/responses/compact") {
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let input = v.get("input").map(|i| i.to_string().len()).unwrap_or(0);
                (
                    200,
                    json!({
                        "id": "cmp_mock",
                        "object": "response.compaction",
                        "output": [{"type": "compaction", "encrypted_content": format!("mock-compacted-{input}")}],
                        // The input back, so a large request makes a large answer.
                        "input_echo": v.get("input").cloned().unwrap_or(Value::Null),
                    })
                    .to_string(),
                )
            } else {
                (404, json!({"error": {"message": "mock: no such path", "type": "invalid_request_error", "code": "not_found"}}).to_string())
            };
            let resp = http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("x-models-etag", "mock-etag")
                .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                .unwrap_or_default();
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
        .await;
}

/// Decrements the open counter when the connection ends.
struct OpenGuard(Arc<MockState>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
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
        let status = match reject {
            Some(s) => Some((s, format!("mock rejects with {s}"))),
            None if !keys.is_empty() && !keys.iter().any(|k| k == auth) => {
                Some((401, "mock rejects with 401".into()))
            }
            None if foreign_org => Some((
                401,
                r#"{"error":{"type":"invalid_request_error","code":"mismatched_organization","message":"OpenAI-Organization header should match organization for API key"}}"#.into(),
            )),
            None if full => Some((
                429,
                r#"{"error":{"type":"requests","code":"rate_limit_exceeded","message":"too many connections"}}"#.into(),
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

fn script_is_create(text: &str) -> bool {
    crate::event::sniff_type(text).is_some_and(|t| t == crate::event::RESPONSE_CREATE)
}

/// Per-connection upstream state.
struct ConnState {
    id: u64,
    /// The `authorization` the connection was opened with (its account).
    authorization: String,
    /// Frames sent (shared with the connection's record).
    sent: Arc<Mutex<Vec<String>>>,
    next: u64,
    /// `(response id, context tokens)` of the last responses, newest last.
    cache: VecDeque<(String, u64)>,
    /// Context tokens of the last request served on this connection (the prompt-cache model).
    last_context: u64,
    /// Set to stop the reader (the connection goes deaf: no pongs).
    deaf: Arc<std::sync::atomic::AtomicBool>,
}

/// Client events of one connection.
struct Inbox {
    /// In arrival order.
    rx: mpsc::Receiver<String>,
    /// Creates that arrived during a turn (served after it, in order).
    backlog: VecDeque<String>,
}

/// The answer to a client event other than `response.create`: nothing for
/// `response.processed`, an `error` (status 400) for a steer (the mock's model cannot be
/// steered) and for unknown types.
fn side_answer(text: &str) -> Option<Value> {
    let ty = crate::event::sniff_type(text).unwrap_or_default();
    match &*ty {
        "response.processed" => None,
        "response.steer" => Some(crate::event::error_value(
            400,
            "steering_not_supported",
            "mock: this model cannot be steered",
        )),
        other => Some(crate::event::error_value(
            400,
            "unknown_event_type",
            &format!("mock: unknown event type `{other}`"),
        )),
    }
}

enum Outcome {
    Continue,
    Close(u16),
    /// Close (with a code, or by dropping TCP) after the connection idled this long.
    CloseLater(CloseKind, Duration),
    /// Send an unsolicited event after the connection idled this long.
    JunkLater(Duration),
    Eof,
    /// The gateway went away.
    Gone,
}

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Sends events with increasing `sequence_number`. Before each, it answers the client events
/// other than creates that arrived meanwhile (creates wait in the backlog).
struct Emitter<'a, S> {
    sink: &'a mut Sink<S>,
    inbox: &'a mut mpsc::Receiver<String>,
    backlog: &'a mut VecDeque<String>,
    sent: Arc<Mutex<Vec<String>>>,
    /// Benchmark mode: batch writes.
    batch: bool,
    unflushed: usize,
    bytes_sent: &'a AtomicU64,
    seq: u64,
    pending: &'a AtomicUsize,
    terminal_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Emitter<'_, S> {
    async fn emit(&mut self, mut v: Value) -> bool {
        if let Some(o) = v.as_object_mut()
            && o.get("type").and_then(Value::as_str) != Some("error")
        {
            o.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq += 1;
        if crate::event::is_terminal(v.get("type").and_then(Value::as_str).unwrap_or("")) {
            // The turn is over before the client can possibly send the next create.
            self.end();
        }
        let terminal =
            crate::event::is_terminal(v.get("type").and_then(Value::as_str).unwrap_or(""));
        self.send_text(type_first(&v), terminal).await
    }

    /// Sends an event already rendered with `self.seq` as its `sequence_number`.
    async fn emit_rendered(&mut self, text: String, terminal: bool) -> bool {
        self.seq += 1;
        if terminal {
            self.end();
        }
        self.send_text(text, terminal).await
    }

    /// Writes one frame; in batch mode flushes every 64 frames and on `flush`.
    async fn send_text(&mut self, text: String, flush: bool) -> bool {
        while let Ok(t) = self.inbox.try_recv() {
            if script_is_create(&t) {
                self.backlog.push_back(t);
            } else if let Some(answer) = side_answer(&t)
                && self
                    .sink
                    .send(Message::text(answer.to_string()))
                    .await
                    .is_err()
            {
                return false;
            }
        }
        let len = text.len() as u64;
        self.bytes_sent.fetch_add(len, Ordering::AcqRel);
        if let Ok(mut sent) = self.sent.lock()
            && sent.len() < 4096
        {
            sent.push(text.clone());
        }
        if !self.batch {
            return self.sink.send(Message::text(text)).await.is_ok();
        }
        if self.sink.feed(Message::text(text)).await.is_err() {
            return false;
        }
        self.unflushed += 1;
        if flush || self.unflushed >= 64 {
            self.unflushed = 0;
            return self.sink.flush().await.is_ok();
        }
        true
    }

    fn end(&mut self) {
        if !self.terminal_sent {
            self.terminal_sent = true;
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A create on a rate-limited account: optionally `response.created` (and deltas), then the
/// limit as an `error` (status 429) or a `response.failed`.
async fn answer_limited<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut ConnState,
    limit: Limit,
    em: &mut Emitter<'_, S>,
) -> bool {
    conn.next += 1;
    let id = format!("resp_{}_{}", conn.id, conn.next);
    let mut ok = true;
    if limit.created_first || limit.after_deltas > 0 {
        ok = ok && em.emit(json!({"type": "response.created", "response": {"id": id, "status": "in_progress"}})).await;
        ok = ok
            && em
                .emit(json!({"type": "codex.rate_limits", "rate_limits": {"limit_reached": true}}))
                .await;
    }
    for i in 0..limit.after_deltas {
        ok = ok && em
            .emit(
                json!({"type": "response.output_text.delta", "delta": format!("{id} delta {i}. ")}),
            )
            .await;
    }
    let error = json!({
        "type": "usage_limit_reached",
        "code": "usage_limit_reached",
        "message": "mock: the usage limit has been reached",
        "resets_in_seconds": limit.resets_in_seconds,
    });
    let last = if limit.failed {
        json!({"type": "response.failed", "response": {"id": id, "status": "failed", "error": error}})
    } else {
        json!({"type": "error", "status": 429, "error": error})
    };
    ok && em.emit(last).await
}

fn tokens(text_len: usize) -> u64 {
    (text_len as u64 / 4).max(1)
}

async fn serve_frame<S: AsyncRead + AsyncWrite + Unpin>(
    state: &MockState,
    conn: &mut ConnState,
    inbox: &mut Inbox,
    pending: &AtomicUsize,
    text: &str,
    sink: &mut Sink<S>,
) -> Outcome {
    let is_create = script_is_create(text);
    let mut em = Emitter {
        sink,
        inbox: &mut inbox.rx,
        backlog: &mut inbox.backlog,
        sent: conn.sent.clone(),
        batch: state.config.speed,
        unflushed: 0,
        bytes_sent: &state.bytes_sent,
        seq: 0,
        pending,
        terminal_sent: !is_create,
    };
    let outcome = serve_create(state, conn, text, &mut em).await;
    em.end();
    outcome
}

async fn serve_create<S: AsyncRead + AsyncWrite + Unpin>(
    state: &MockState,
    conn: &mut ConnState,
    text: &str,
    em: &mut Emitter<'_, S>,
) -> Outcome {
    let body: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let err = crate::event::error_value(400, "invalid_json", &format!("mock: {e}"));
            return if em.emit(err).await {
                Outcome::Continue
            } else {
                Outcome::Gone
            };
        }
    };
    if body.get("type").and_then(Value::as_str) != Some("response.create") {
        if let Some(answer) = side_answer(text)
            && !em.emit(answer).await
        {
            return Outcome::Gone;
        }
        return Outcome::Continue;
    }
    let d = Directives::parse(&script::last_user_text(&body));
    let limit = state
        .limited
        .lock()
        .ok()
        .and_then(|l| l.get(&conn.authorization).copied());
    if let Some(limit) = limit {
        return if answer_limited(conn, limit, em).await {
            Outcome::Continue
        } else {
            Outcome::Gone
        };
    }
    let close_at = |p: Phase| match d.close {
        Some((CloseKind::Code(c), phase)) if phase == p => Some(Outcome::Close(c)),
        Some((CloseKind::Eof, phase)) if phase == p => Some(Outcome::Eof),
        _ => None,
    };
    if let Some(o) = close_at(Phase::Before) {
        return o;
    }
    if conn.next > 0
        && let Some(o) = close_at(Phase::Stale)
    {
        return o;
    }
    let prev = body
        .get("previous_response_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let mut parent_context = 0;
    if let Some(p) = &prev {
        match conn.cache.iter().find(|(id, _)| id == p) {
            Some((_, ctx)) => parent_context = *ctx,
            None => {
                let f = Fixture::load(FixtureName::PreviousResponseNotFound);
                let ok = em
                    .emit(f.render(0, &Vars(vec![("previous_response_id", json!(p))])))
                    .await;
                return if ok { Outcome::Continue } else { Outcome::Gone };
            }
        }
    }
    if !d.delay.is_zero() {
        tokio::time::sleep(d.delay).await;
    }
    if conn.next == 0 && !state.config.fresh_cost.is_zero() {
        // A cold connection: the upstream has to set it up and load the prompt.
        tokio::time::sleep(state.config.fresh_cost).await;
    }
    conn.next += 1;
    let id = format!("resp_{}_{}", conn.id, conn.next);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string();
    let input_len = body.get("input").map(|i| i.to_string().len()).unwrap_or(0);
    let input_tokens = parent_context + tokens(input_len);
    let cached = if conn.last_context > 0 {
        conn.last_context.min(input_tokens)
    } else {
        0
    };
    let generate = body.get("generate").and_then(Value::as_bool) != Some(false);

    let base = |usage: Value| -> Vec<(&'static str, Value)> {
        vec![
            ("id", json!(id)),
            ("model", json!(model)),
            (
                "previous_response_id",
                prev.as_ref().map(|p| json!(p)).unwrap_or(Value::Null),
            ),
            ("usage", usage),
        ]
    };
    let usage = |output: u64| {
        json!({
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output,
        })
    };

    let mut output_tokens = 0;
    let sent = if !generate {
        let f = Fixture::load(FixtureName::Prewarm);
        let vars = Vars(base(usage(0)));
        let mut ok = true;
        for i in 0..f.events().len() {
            ok = ok && em.emit(f.render(i, &vars)).await;
        }
        ok
    } else if let Some((status, code)) = &d.error {
        let message = if d.too_large {
            "Request too large for gpt-5.5 in organization org-mock on tokens per min (TPM): \
             Limit 30000, Requested 52000."
                .to_string()
        } else {
            format!("mock error {code}")
        };
        let mut err = crate::event::error_value(*status, code, &message);
        if let Some(r) = d.resets_in_seconds {
            err["error"]["resets_in_seconds"] = json!(r);
        }
        em.emit(err).await
    } else if let Some(code) = &d.fail {
        let f = Fixture::load(FixtureName::FailedTurn);
        let mut vars = base(usage(0));
        vars.push(("code", json!(code)));
        let vars = Vars(vars);
        let mut ok = true;
        for i in 0..f.events().len() {
            ok = ok && em.emit(f.render(i, &vars)).await;
        }
        ok
    } else if d.tool && script::function_call_output(&body).is_none() {
        let (name, args) = script::choose_tool(&body, &script::tool_command(d.tool_sleep));
        let call_id = format!("call_{}_{}", conn.id, conn.next);
        let item_id = format!("fc_{}_{}", conn.id, conn.next);
        let item = json!({"id": item_id, "type": "function_call", "status": "completed", "call_id": call_id, "name": name, "arguments": args});
        output_tokens = tokens(args.len());
        let mut vars = base(usage(output_tokens));
        vars.extend([
            ("item_id", json!(item_id)),
            ("call_id", json!(call_id)),
            ("tool_name", json!(name)),
            ("arguments", json!(args)),
            ("item", item),
        ]);
        let f = Fixture::load(FixtureName::ToolCall);
        let vars = Vars(vars);
        let mut ok = true;
        for i in 0..f.events().len() {
            ok = ok && em.emit(f.render(i, &vars)).await;
        }
        ok
    } else {
        let reply = script::function_call_output(&body)
            .map(|o| format!("tool output: {}", o.chars().take(500).collect::<String>()));
        let (deltas, size) = if reply.is_some() {
            (1, 0)
        } else {
            (d.deltas, d.delta_size)
        };
        let delta_text = |i: usize| -> String {
            if let Some(r) = &reply {
                return r.clone();
            }
            if size == 0 {
                format!("{id} delta {i}. ")
            } else {
                let mut s = format!("{id}:{i:08}|");
                s.extend(std::iter::repeat_n('x', size.saturating_sub(s.len())));
                s
            }
        };
        let total: usize = if size == 0 {
            (0..deltas).map(|i| delta_text(i).len()).sum()
        } else {
            deltas * size.max(1)
        };
        let full = if total <= 64 * 1024 {
            (0..deltas).map(delta_text).collect::<String>()
        } else {
            format!("[{total} bytes streamed by {id}]")
        };
        output_tokens = tokens(total);
        let item_id = format!("msg_{}_{}", conn.id, conn.next);
        let item = json!({"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": full, "annotations": []}]});
        let mut vars = base(usage(output_tokens));
        vars.extend([
            ("item_id", json!(item_id)),
            ("text", json!(full)),
            ("item", item),
        ]);
        let vars = Vars(vars);
        let f = Fixture::load(FixtureName::TextTurn);
        let mut ok = true;
        'events: for (i, ev) in f.events().iter().enumerate() {
            let is_delta =
                ev.get("type").and_then(Value::as_str) == Some("response.output_text.delta");
            if !is_delta {
                let ty = ev.get("type").and_then(Value::as_str).unwrap_or("");
                let rendered = (!d.incomplete && !d.empty_output)
                    .then(|| f.render_text(i, &vars, em.seq))
                    .flatten();
                if let Some(text) = rendered {
                    ok = ok && em.emit_rendered(text, crate::event::is_terminal(ty)).await;
                } else {
                    let mut v = f.render(i, &vars);
                    if v["type"] == "response.completed" {
                        if d.incomplete {
                            v["type"] = json!("response.incomplete");
                            v["response"]["status"] = json!("incomplete");
                            v["response"]["incomplete_details"] =
                                json!({"reason": "max_output_tokens"});
                        }
                        if d.empty_output {
                            v["response"]["output"] = json!([]);
                        }
                    }
                    ok = ok && em.emit(v).await;
                }
                if i == 0 && d.custom {
                    ok = ok
                        && em
                            .emit(json!({"type": "x.custom", "note": "a type no client knows"}))
                            .await;
                }
                if i == 0 && !d.stall.is_zero() {
                    tokio::time::sleep(d.stall).await;
                }
                if !ok {
                    break;
                }
                continue;
            }
            for n in 0..deltas {
                if n == deltas / 2
                    && let Some(o) = close_at(Phase::Mid)
                {
                    return o;
                }
                if n == deltas / 2
                    && let Some(what) = &d.inject
                {
                    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
                    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
                    let frame = match what.as_str() {
                        "binary" => Message::binary(vec![0u8, 1, 2, 3]),
                        "badutf8" => Message::Frame(Frame::message(
                            vec![b'{', 0xff, 0xfe, b'}'],
                            OpCode::Data(Data::Text),
                            true,
                        )),
                        _ => Message::text(format!(
                            "{{\"type\":\"response.output_text.delta\",\"delta\":\"{}\"}}",
                            "x".repeat(4 << 20)
                        )),
                    };
                    if em.sink.send(frame).await.is_err() {
                        return Outcome::Gone;
                    }
                }
                let sent = if state.config.speed {
                    // Hand-built frame with its send time, so clients can measure latency.
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    let delta = serde_json::to_string(&delta_text(n)).unwrap_or_default();
                    let text = format!(
                        "{{\"type\":\"response.output_text.delta\",\"sequence_number\":{},\"item_id\":\"msg_{}_{}\",\"output_index\":0,\"content_index\":0,\"delta\":{delta},\"ts_ns\":{ts}}}",
                        em.seq, conn.id, conn.next
                    );
                    em.seq += 1;
                    em.send_text(text, false).await
                } else {
                    let mut v = f.render(i, &vars);
                    v["delta"] = json!(delta_text(n));
                    em.emit(v).await
                };
                if !sent {
                    ok = false;
                    break 'events;
                }
                if !d.interval.is_zero() {
                    tokio::time::sleep(d.interval).await;
                }
            }
            if deltas == 0
                && let Some(o) = close_at(Phase::Mid)
            {
                return o;
            }
        }
        ok
    };
    if !sent {
        return Outcome::Gone;
    }
    if let Some(o) = close_at(Phase::Mid) {
        // Turns without deltas close "mid" right after their events.
        if !generate || d.tool || d.error.is_some() || d.fail.is_some() {
            return o;
        }
    }
    conn.cache.push_back((id, input_tokens + output_tokens));
    while conn.cache.len() > state.config.cache_depth.max(1) {
        conn.cache.pop_front();
    }
    conn.last_context = input_tokens + output_tokens;
    if d.deaf {
        conn.deaf.store(true, Ordering::Release);
    }
    if let Some((kind, Phase::Idle(after))) = d.close {
        return Outcome::CloseLater(kind, after);
    }
    if let Some(after) = d.junk_after {
        return Outcome::JunkLater(after);
    }
    close_at(Phase::After).unwrap_or(Outcome::Continue)
}

/// Serializes an event with `type` as its first key, as the real upstream writes its events
/// (serde_json's map would order keys alphabetically).
fn type_first(v: &Value) -> String {
    let Some(map) = v.as_object() else {
        return v.to_string();
    };
    let Some(ty) = map.get("type") else {
        return v.to_string();
    };
    let mut out = format!("{{\"type\":{ty}");
    for (k, val) in map.iter().filter(|(k, _)| *k != "type") {
        out.push(',');
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&val.to_string());
    }
    out.push('}');
    out
}
