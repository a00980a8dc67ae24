//! The HTTP ingress: `POST` on every path in `paths` (Codex's HTTPS fallback, SDK clients).
//! One request is one turn of the [`Engine`] on the same pool, keys, decisions and failure
//! policy as a WebSocket turn; this module only encodes what the engine yields:
//!
//! - `stream: true`: `text/event-stream`, each upstream frame as `event: <type>` +
//!   `data: <frame bytes verbatim>`, in order, no `[DONE]`; the body ends right after the turn's
//!   terminal event. Keepalives while silent (`codex.keepalive` events for Codex, comments for
//!   others). Before the first byte a failure is an HTTP status with an OpenAI-shaped body;
//!   after it, one `response.failed` with code `stream_disconnected`, never a fabricated
//!   `response.completed`.
//! - otherwise: one JSON body built from the terminal event, `output` filled from
//!   `response.output_item.done` events when the terminal's is empty.
//!
//! The turn runs in its own task (tracked with the sessions, so a drain waits for it); the
//! handler waits for the head (an error response, the JSON body, or the start of the stream).
//! A client that goes away cancels the turn: the upstream connection is discarded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, field, info_span};

use crate::gateway::{Gateway, Shared};
use crate::headers::{ForwardHeaders, HeaderIds};
use crate::ids::{ConversationId, Ingress};
use crate::ingress::admit::{Admitted, admit};
use crate::server::json_error;
use crate::turn::engine::{ClientGone, Downstream, Engine, EngineStart, Flow};

mod create;
mod json;
mod sse;

use create::parse_create;
use json::JsonDown;
use sse::SseDown;

/// SSE chunks buffered between the turn task and the response body.
const BODY_CHUNKS: usize = 16;

/// What the handler answers with.
enum Reply {
    /// A whole response: an error before the first byte, or the JSON body.
    Full(Response),
    /// A 200 event stream with these headers; its chunks follow on `body`.
    Stream {
        headers: Vec<(HeaderName, HeaderValue)>,
        body: mpsc::Receiver<Bytes>,
    },
}

/// `POST` on a Responses path.
pub(crate) async fn responses(gw: Gateway, peer: SocketAddr, req: Request) -> Response {
    let shared = gw.shared.clone();
    let (parts, body) = req.into_parts();
    let Admitted { client, permits } = match admit(&shared, &parts.headers, peer).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    // Admitted: the connection's deadline waits while this runs (body read included).
    let conn_turn = parts
        .extensions
        .get::<crate::listener::ConnActivity>()
        .map(|a| a.turn());
    let config = shared.config();
    let max_frame = config.relay.max_message_size.as_u64() as usize;
    // The body takes its bytes from the gateway-wide budget as they arrive and keeps them for
    // the turn's life (the request is kept for a replay).
    let crate::ingress::body::Held {
        bytes,
        lease: body_lease,
    } = match crate::ingress::body::read_request(&shared, &parts.headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let create = match parse_create(&bytes, max_frame) {
        Ok(c) => c,
        Err(r) => return r,
    };
    drop(bytes);
    let ids = match HeaderIds::from_http_headers(&parts.headers) {
        Ok(ids) => ids,
        Err(msg) => return json_error(StatusCode::BAD_REQUEST, "invalid_conversation_id", &msg),
    };
    let cache_key = match create.cache_key.as_deref().map(ConversationId::parse) {
        Some(Err(e)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "invalid_prompt_cache_key",
                &format!("prompt_cache_key {e}"),
            );
        }
        Some(Ok(c)) => Some(c),
        None => None,
    };
    let route = ids.route(client.clone(), cache_key);
    let id = shared.next_session_id();
    let span = info_span!(
        "request",
        session.id = id,
        client.addr = %peer,
        client.name = %client,
        ingress = %"http",
        account = field::Empty,
        conversation = field::Empty,
    );
    if let Some(c) = &route.lane {
        span.record("conversation", field::display(c));
    }
    let engine = Engine::new(
        shared.clone(),
        EngineStart {
            id,
            span: span.clone(),
            ids,
            route,
            headers: ForwardHeaders::from_client(&parts.headers),
            upstream: None,
            ingress: Ingress::Http,
        },
    );
    // Cancelled when the handler (before the head) or the response body (after it) is
    // dropped: the client went away.
    let gone = CancellationToken::new();
    let guard = gone.clone().drop_guard();
    let (reply, replied) = oneshot::channel();
    let turn = Turn {
        frame: create.frame,
        previous: create.previous,
        keepalive: config.http.sse_keepalive,
        gone,
        _permits: permits,
        _conn_turn: conn_turn,
        _body: body_lease,
    };
    let codex = parts.headers.contains_key("originator");
    let write_timeout = config.relay.client_write_timeout;
    // The turn's future is boxed: the task then holds a pointer, where tokio would copy the
    // whole future (the engine and the downstream) when it is spawned and when it ends.
    if create.stream {
        let down = SseDown::new(reply, codex, write_timeout);
        let turn = Box::pin(drive(shared.clone(), engine, down, turn).instrument(span));
        shared.sessions.spawn(turn);
    } else {
        let max = config.http.max_response_size.as_u64() as usize;
        let down = JsonDown::new(reply, max, shared.buffered.lease());
        let turn = Box::pin(drive(shared.clone(), engine, down, turn).instrument(span));
        shared.sessions.spawn(turn);
    }
    match replied.await {
        Ok(Reply::Full(r)) => r,
        Ok(Reply::Stream { headers, mut body }) => {
            // The guard lives as long as the body: dropping it (client gone) cancels the turn.
            let stream = futures::stream::poll_fn(move |cx| {
                let _ = &guard;
                body.poll_recv(cx).map(|c| c.map(Ok::<_, Infallible>))
            });
            let mut r = Response::new(axum::body::Body::from_stream(stream));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert(
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            );
            for (name, value) in headers {
                h.insert(name, value);
            }
            r
        }
        Err(_) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the turn ended without an answer",
        ),
    }
}

/// One HTTP turn's inputs.
struct Turn {
    frame: Utf8Bytes,
    previous: Option<String>,
    keepalive: Duration,
    gone: CancellationToken,
    /// Held for the turn's life: it counts against the connection limits.
    _permits: (
        tokio::sync::OwnedSemaphorePermit,
        crate::ingress::admit::ClientSlot,
    ),
    /// Suspends the HTTP connection's deadline for the turn's life.
    _conn_turn: Option<crate::listener::TurnGuard>,
    /// The request's bytes in the gateway-wide budget.
    _body: crate::gateway::BudgetLease,
}

/// What the turn task needs of an HTTP downstream beyond [`Downstream`].
trait HttpDown: Downstream {
    /// When the next keepalive is due, if this downstream sends any.
    fn keepalive_due(&self, every: Duration) -> Option<Instant>;
    fn keepalive(&mut self) -> impl Future<Output = Result<(), ClientGone>> + Send;
    /// The turn is over (or abandoned): answer, or end the body.
    fn finish(self) -> impl Future<Output = ()> + Send;
}

/// Runs one HTTP turn on the engine: the same engine calls as a WebSocket session, with the
/// HTTP deadlines (turn idle, keepalive) and the client's disappearance as the other events.
async fn drive<D: HttpDown>(shared: Arc<Shared>, mut engine: Engine, mut down: D, turn: Turn) {
    shared.active_sessions.fetch_add(1, Ordering::AcqRel);
    let mut flow = engine
        .start_turn(&mut down, turn.frame, turn.previous, None)
        .await;
    while flow == Flow::Continue && engine.in_turn() {
        let idle = engine.idle_deadline().unwrap_or_else(Instant::now);
        let keepalive = down.keepalive_due(turn.keepalive);
        flow = tokio::select! {
            biased;
            _ = turn.gone.cancelled() => {
                debug!("HTTP client went away mid-turn");
                Flow::Stop
            }
            ev = engine.next_upstream(down.raw_frames()) => engine.upstream_event(&mut down, ev).await,
            _ = tokio::time::sleep_until(idle) => {
                if engine.idle_deadline().is_some_and(|d| Instant::now() >= d) {
                    engine.turn_idle_expired(&mut down).await
                } else {
                    Flow::Continue
                }
            }
            _ = tokio::time::sleep_until(keepalive.unwrap_or(idle)), if keepalive.is_some() => {
                match down.keepalive().await {
                    Ok(()) => Flow::Continue,
                    Err(ClientGone) => Flow::Stop,
                }
            }
        };
    }
    // Mid-turn (client gone): the upstream is discarded, never pooled.
    engine.finish();
    down.finish().await;
    shared.active_sessions.fetch_sub(1, Ordering::AcqRel);
}

/// An error response from a WebSocket-shaped `error` value (top-level `status`, nested
/// `error`, optional `headers`): the status, `{"error": ...}`, and the `headers` pairs as
/// HTTP headers (the inverse of how the upstream moved HTTP errors onto WebSocket).
/// An upstream error (an `error` event, a failed response's `error` object) is parsed into a
/// value to answer with when it is at most this long: a parsed tree costs up to ~16 times its
/// text and no budget counts it. A longer one (none is, from a real upstream) is answered
/// with its status and code, read in place.
const MAX_PARSED_ERROR: usize = 64 * 1024;

/// The upstream `error` event `text` as the value [`error_response`] answers with.
fn upstream_error(text: &str) -> Value {
    if text.len() <= MAX_PARSED_ERROR {
        return serde_json::from_str(text).unwrap_or_default();
    }
    let status = crate::event::scan::find(text, &["status"]).and_then(crate::event::scan::unsigned);
    let code = crate::event::scan::find(text, &["error", "code"]);
    json!({ "status": status, "error": too_large_error(code) })
}

/// A failed response's `error` object (its text in the terminal) as a value.
fn upstream_error_object(text: &str) -> Value {
    if text.len() <= MAX_PARSED_ERROR {
        return serde_json::from_str(text).unwrap_or_default();
    }
    too_large_error(crate::event::scan::find(text, &["code"]))
}

/// The error object answered for an upstream error too long to parse: its code (if short).
fn too_large_error(code: Option<&str>) -> Value {
    let code = code
        .filter(|c| c.len() <= 256)
        .and_then(crate::event::scan::string);
    json!({
        "message": "the upstream's error was too large to relay",
        "type": "server_error",
        "param": null,
        "code": code,
    })
}

fn error_response(v: &Value) -> Response {
    let status = v["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (400..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut error = v["error"].clone();
    if let Some(e) = error.as_object_mut() {
        e.entry("param").or_insert(Value::Null);
        e.entry("message").or_insert(json!("upstream error"));
    } else {
        error = json!({"message": "upstream error", "type": "server_error", "param": null, "code": null});
    }
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": error }).to_string(),
    )
        .into_response();
    let h = r.headers_mut();
    if let Some(pairs) = v["headers"].as_object() {
        for (k, val) in pairs.iter().take(32) {
            let (Ok(name), Some(val)) = (HeaderName::from_bytes(k.as_bytes()), val.as_str()) else {
                continue;
            };
            // The rate-limit headers the upstream reports (`x-codex-*`, `x-ratelimit-*`,
            // `openai-*`, `retry-after`); nothing that would frame the response or act in the
            // client (cookies, redirects, caching, CORS).
            let n = name.as_str();
            let relayed = (n.starts_with("x-") || n.starts_with("openai-") || n == "retry-after")
                && !n.starts_with("x-forwarded-");
            if let (true, Ok(val)) = (relayed, HeaderValue::from_str(val)) {
                h.insert(name, val);
            }
        }
    }
    if let Some(secs) = v["error"]["resets_in_seconds"].as_u64()
        && let Ok(val) = HeaderValue::from_str(&secs.to_string())
    {
        h.insert(header::RETRY_AFTER, val);
    }
    r
}

/// The upstream 101's headers an HTTP client reads from the response.
fn copy_headers(
    headers: &[(HeaderName, HeaderValue)],
    reused: bool,
) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(n, _)| !(reused && n == "x-codex-turn-state"))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_become_http_errors() {
        let v = json!({"type": "error", "status": 429, "error": {"type": "usage_limit_reached", "code": "usage_limit_reached", "message": "x"}, "headers": {
            "x-codex-primary-used-percent": "100.0",
            "x-ratelimit-remaining-requests": "0",
            "openai-processing-ms": "12",
            "retry-after": "30",
            "content-length": "9",
            "set-cookie": "session=evil",
            "location": "https://evil.example/",
            "access-control-allow-origin": "*",
            "connection": "close",
            "x-forwarded-for": "10.0.0.1",
        }});
        let r = error_response(&v);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-codex-primary-used-percent"], "100.0");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
        assert_eq!(r.headers()["openai-processing-ms"], "12");
        assert_eq!(r.headers()["retry-after"], "30");
        assert_ne!(
            r.headers().get("content-length").map(|v| v.as_bytes()),
            Some(&b"9"[..])
        );
        for name in [
            "set-cookie",
            "location",
            "access-control-allow-origin",
            "connection",
            "x-forwarded-for",
        ] {
            assert!(r.headers().get(name).is_none(), "{name}");
        }
        assert_eq!(error_response(&json!({"status": 200})).status(), 502);
    }
}
