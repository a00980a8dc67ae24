//! Dialing the upstream (ws:// or wss:// with rustls), and [`UpstreamConn`]: one upstream
//! WebSocket with its pump.
//!
//! Ownership: the pump task owns the read half for the connection's whole life (while a
//! session holds it and while it idles in the pool), so upstream pings are always answered
//! and a close while idle is seen at once. The write half lives in the `UpstreamConn`, with
//! whoever holds it. Dropping the `UpstreamConn` aborts the pump and closes the socket.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::accounts::{Account, AccountLease};
use crate::config::{Config, RelayConfig};
use crate::error::{DialError, StartError};
use crate::headers::{ForwardHeaders, response_copy};
use crate::ids::AccountId;
use crate::pool::{ConnMeta, EvictReason, Health, PoolConn};
use crate::pump::{self, End, Link, PumpConfig, PumpEvent};
use std::sync::atomic::Ordering;

pub type UpstreamStream = WebSocketStream<crate::net::UpstreamIo>;

/// A validated upstream URL.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub uri: Uri,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let uri: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("ws") | Some("wss") => {}
            _ => return Err(format!("`{s}` must start with ws:// or wss://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("`{s}` has no host"));
        }
        Ok(UpstreamUrl { uri })
    }
}

/// tungstenite limits from config; used for both client and upstream sockets.
pub fn ws_config(config: &Config) -> WebSocketConfig {
    let r: &RelayConfig = &config.relay;
    let max_message = r.max_message_size.as_u64() as usize;
    let buf = r.read_buffer_size.as_u64() as usize;
    WebSocketConfig::default()
        .read_buffer_size(buf)
        .write_buffer_size(buf)
        .max_write_buffer_size(max_message + 2 * buf)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(config.max_frame_bytes()))
}

// === impl Dialer ===

/// Everything needed to open an upstream connection.
pub struct Dialer {
    url: UpstreamUrl,
    tls: Arc<rustls::ClientConfig>,
    ws_config: WebSocketConfig,
    connect_timeout: Duration,
    pump: PumpConfig,
    waker: Arc<Notify>,
    /// Every pump task, so shutdown can wait for their close frames.
    tasks: TaskTracker,
}

impl Dialer {
    pub fn new(config: &Config, waker: Arc<Notify>) -> Result<Dialer, StartError> {
        let url = UpstreamUrl::parse(&config.upstream.url).map_err(|msg| {
            crate::error::ConfigError::Invalid {
                key: "upstream.url".into(),
                msg,
            }
        })?;
        Ok(Dialer {
            url,
            tls: crate::tls::client_config(config.upstream.ca_file.as_deref())?,
            ws_config: ws_config(config),
            connect_timeout: config.upstream.connect_timeout,
            pump: PumpConfig {
                ping_interval: config.pool.ping_interval,
                write_timeout: config.upstream.write_timeout,
            },
            waker,
            tasks: TaskTracker::new(),
        })
    }

    /// The upstream TLS config (the HTTP relays use it too).
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    /// `upstream.connect_timeout`.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The pump tasks (shutdown waits on them).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Opens upstream connection `id` for `account`, forwarding the client's `headers`.
    pub async fn dial(
        &self,
        id: u64,
        account: &Arc<Account>,
        headers: &ForwardHeaders,
    ) -> Result<UpstreamConn, DialError> {
        let mut req = self
            .url
            .uri
            .clone()
            .into_client_request()
            .map_err(|e| DialError::Protocol(e.to_string()))?;
        let h = req.headers_mut();
        for (name, value) in headers.iter() {
            h.append(name.clone(), value.clone());
        }
        let auth = HeaderValue::from_str(&account.authorization()).map_err(|_| {
            DialError::Protocol("account credential is not a valid header value".into())
        })?;
        h.insert(http::header::AUTHORIZATION, auth);
        // Headers that describe the account come from the account, never from the client.
        for (name, value) in [
            ("chatgpt-account-id", &account.chatgpt_account_id),
            ("openai-organization", &account.organization),
            ("openai-project", &account.project),
        ] {
            if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
        let started = Instant::now();
        let connect = async {
            let io = crate::net::connect(&self.url.uri, &self.tls, self.connect_timeout).await?;
            tokio_tungstenite::client_async_with_config(req, io, Some(self.ws_config))
                .await
                .map_err(map_dial_error)
        };
        let (ws, response) = match tokio::time::timeout(self.connect_timeout, connect).await {
            Err(_) => return Err(DialError::Timeout(self.connect_timeout)),
            Ok(r) => r?,
        };
        debug!(upstream.id = id, account = %account.id, dial_ms = started.elapsed().as_millis() as u64, "upstream connected");
        let link = Link::new(ws, self.waker.clone());
        crate::metrics::dial(started.elapsed());
        ::metrics::counter!(crate::metrics::UPSTREAM_OPENED).increment(1);
        let pump_cfg = self.pump;
        let pump_link = link.clone();
        self.tasks.spawn(async move {
            pump::run(pump_link, pump_cfg).await;
            ::metrics::counter!(crate::metrics::UPSTREAM_CLOSED).increment(1);
        });
        Ok(UpstreamConn {
            id,
            created_at: Instant::now(),
            account: account.id.clone(),
            response_headers: response_copy(response.headers()),
            link,
            write_timeout: self.pump.write_timeout,
            recent: VecDeque::new(),
            meta: Arc::new(ConnMeta {
                created_at: Instant::now(),
                turns: Default::default(),
            }),
            _lease: account.lease(),
        })
    }
}

fn map_dial_error(e: tungstenite::Error) -> DialError {
    match e {
        tungstenite::Error::Http(resp) => {
            // As written (the real API's refusals are pretty-printed JSON, read whole to
            // classify them); escaped where it is shown (`DialError`'s message).
            let body = resp
                .body()
                .as_ref()
                .map(|b| {
                    String::from_utf8_lossy(&b[..b.len().min(crate::error::MAX_REFUSAL_BODY)])
                        .into_owned()
                })
                .unwrap_or_default();
            DialError::Status {
                status: resp.status().as_u16(),
                body,
            }
        }
        tungstenite::Error::Io(io) => {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                DialError::Tls(tls.to_string())
            } else {
                DialError::Connect(io.to_string())
            }
        }
        tungstenite::Error::Tls(t) => DialError::Tls(t.to_string()),
        other => DialError::Protocol(other.to_string()),
    }
}

// === impl UpstreamConn ===

/// Responses remembered per connection for owner routing.
const RECENT_RESPONSES: usize = 16;

/// Handle to one upstream WebSocket, whose pump task owns the socket. Dropping the handle makes
/// the pump close the socket (code 1000, or 1001 after [`UpstreamConn::set_close_code`]).
pub struct UpstreamConn {
    id: u64,
    created_at: Instant,
    account: AccountId,
    /// Headers of the upstream's 101, replayed on the client's 101.
    response_headers: Vec<(HeaderName, HeaderValue)>,
    /// The socket, shared with the pump (which watches it while it idles in the pool).
    link: Arc<Link>,
    write_timeout: Duration,
    /// Ids of the last responses completed on this connection (its `previous_response_id` state).
    recent: VecDeque<String>,
    /// Age and turns served, shared with the pool's status view.
    meta: Arc<ConnMeta>,
    /// Counts this connection against its account's load.
    _lease: AccountLease,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("id", &self.id)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl UpstreamConn {
    pub fn account(&self) -> &AccountId {
        &self.account
    }

    pub fn response_headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.response_headers
    }

    pub fn age(&self) -> Duration {
        Instant::now().saturating_duration_since(self.created_at)
    }

    /// Writes one frame to the upstream (within `upstream.write_timeout`). The holder reads
    /// the socket from now on.
    pub async fn send(&mut self, msg: Message) -> Result<(), tungstenite::Error> {
        self.link.hold();
        if self.link.end().is_some() {
            return Err(tungstenite::Error::AlreadyClosed);
        }
        self.link.write(msg, self.write_timeout).await
    }

    /// Counts a turn completed on this connection.
    pub fn count_turn(&self) {
        self.meta.turns.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a response completed on this connection.
    pub fn record_response(&mut self, id: &str) {
        if self.recent.len() == RECENT_RESPONSES {
            self.recent.pop_front();
        }
        self.recent.push_back(id.to_string());
    }

    /// True if `response_id` was completed on this connection (recently).
    pub fn produced(&self, response_id: &str) -> bool {
        // Newest first: a continuation names the response just completed.
        self.recent.iter().rev().any(|r| r == response_id)
    }

    /// The close code the pump sends when this handle is dropped.
    pub fn set_close_code(&self, code: u16) {
        self.link.set_close_code(code);
    }

    /// The next upstream frame, close or failure, read directly from the socket.
    pub async fn recv(&mut self) -> Option<PumpEvent> {
        self.link.hold();
        Some(std::future::poll_fn(|cx| self.link.poll_read(cx)).await)
    }

    /// The next upstream event, read directly from the socket, looking for a run first (see
    /// [`Link::poll_read_run`](crate::pump::Link::poll_read_run)): a run of frames `filter`
    /// takes from a read before any of them is decoded, or else the next frame.
    pub async fn recv_run<F>(&mut self, max_frames: usize, mut filter: F) -> PumpEvent
    where
        F: tokio_tungstenite::tungstenite::protocol::RunFilter + Send,
    {
        self.link.hold();
        std::future::poll_fn(|cx| self.link.poll_read_run(cx, max_frames, &mut filter)).await
    }

    /// A run of plain text frames already read from the socket, as raw bytes (see
    /// [`Link::take_text_run`](crate::pump::Link::take_text_run)).
    pub fn take_text_run(
        &mut self,
        max_frames: usize,
        filter: &mut dyn tokio_tungstenite::tungstenite::protocol::RunFilter,
        payloads: &mut Vec<std::ops::Range<usize>>,
    ) -> Option<bytes::Bytes> {
        self.link.take_text_run(max_frames, filter, payloads)
    }

    /// The next upstream frame if one is ready without waiting. `waker` is the holder's own
    /// (the one its reads already registered: registering it again costs nothing, where a
    /// stand-in would replace it and the next read would register it again).
    pub fn try_recv(&mut self, waker: &std::task::Waker) -> Option<PumpEvent> {
        let mut cx = std::task::Context::from_waker(waker);
        match self.link.poll_read(&mut cx) {
            std::task::Poll::Ready(ev) => Some(ev),
            std::task::Poll::Pending => None,
        }
    }

    /// As [`UpstreamConn::try_recv`], looking for a run first (as
    /// [`UpstreamConn::recv_run`] does).
    pub fn try_recv_run(
        &mut self,
        waker: &std::task::Waker,
        max_frames: usize,
        filter: &mut dyn tokio_tungstenite::tungstenite::protocol::RunFilter,
    ) -> Option<PumpEvent> {
        let mut cx = std::task::Context::from_waker(waker);
        match self.link.poll_read_run(&mut cx, max_frames, filter) {
            std::task::Poll::Ready(ev) => Some(ev),
            std::task::Poll::Pending => None,
        }
    }
}

impl Drop for UpstreamConn {
    fn drop(&mut self) {
        self.link.drop_handle();
    }
}

impl PoolConn for UpstreamConn {
    fn id(&self) -> u64 {
        self.id
    }

    fn created_at(&self) -> Instant {
        self.created_at
    }

    fn meta(&self) -> Option<Arc<ConnMeta>> {
        Some(self.meta.clone())
    }

    fn on_evict(&mut self, reason: EvictReason) {
        if reason == EvictReason::Shutdown {
            self.set_close_code(1001);
        }
    }

    fn on_idle(&mut self) {
        self.link.release();
    }

    fn check_idle(&mut self) -> Health {
        match self.link.end() {
            None => Health::Ok,
            Some(End::Closed(Some(f))) if f.code == CloseCode::Restart => {
                Health::Dead(EvictReason::Close1012)
            }
            Some(End::Closed(Some(f))) if f.code == CloseCode::Again => {
                Health::Dead(EvictReason::Close1013)
            }
            // Closed, failed, or unexpected data while idle: never hand it out.
            Some(_) => Health::Dead(EvictReason::Dead),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rules() {
        assert!(UpstreamUrl::parse("wss://api.openai.com/v1/responses").is_ok());
        assert!(UpstreamUrl::parse("ws://127.0.0.1:9/v1/responses").is_ok());
        assert!(UpstreamUrl::parse("https://api.openai.com/v1/responses").is_err());
        assert!(UpstreamUrl::parse("not a url").is_err());
    }

    fn refused(status: u16, body: &str) -> DialError {
        let mut resp = http::Response::new(Some(body.as_bytes().to_vec()));
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
        map_dial_error(tungstenite::Error::Http(Box::new(resp)))
    }

    /// The real API writes its refusals as pretty-printed JSON: they are classified as
    /// written, and shown escaped (one log line each).
    #[test]
    fn a_pretty_printed_refusal_is_read_as_written_and_shown_escaped() {
        let pretty = |status: u16, code: &str| {
            let body = serde_json::to_string_pretty(&serde_json::json!({"error": {
                "message": "x".repeat(300),
                "type": "invalid_request_error",
                "param": null,
                "code": code,
            }}))
            .unwrap();
            assert!(body.len() > 400 && body.contains('\n'));
            refused(status, &body)
        };
        assert!(pretty(403, "account_deactivated").refuses_credential());
        assert!(pretty(401, "invalid_api_key").refuses_credential());
        assert!(
            !pretty(401, "mismatched_organization").refuses_credential(),
            "the organization header, not the key"
        );
        assert!(!pretty(403, "unsupported_country_region_territory").refuses_credential());
        let shown = pretty(403, "account_deactivated").to_string();
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.contains("\\n"), "{shown}");
        assert!(shown.chars().count() < 600, "cut: {shown}");
        // What is kept is bounded.
        let DialError::Status { body, .. } = refused(401, &"y".repeat(1 << 20)) else {
            panic!("a status refusal");
        };
        assert_eq!(body.len(), crate::error::MAX_REFUSAL_BODY);
    }
}
