//! The WebSocket opening handshake is ours (not a library's), so the upstream is acquired
//! *before* answering the client: RFC 6455's checks, admission, the pre-101 acquire (inline
//! when the pool has the connection, in its own task when it must wait), the upstream's 101
//! headers copied onto ours (an upstream refusal becomes the client's HTTP status), then the
//! session spawned on the upgraded socket.

use std::net::SocketAddr;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{Instrument, debug, field, info_span};

use crate::error::AcquireError;
use crate::gateway::Gateway;
use crate::headers::{ForwardHeaders, HeaderIds};
use crate::ids::Ingress;
use crate::ingress::admit::{Admitted, admit};
use crate::ingress::client_io::ClientIo;
use crate::ingress::ws::Session;
use crate::server::json_error;
use crate::turn::engine::EngineStart;

/// Why an upgrade request is not a valid RFC 6455 opening handshake.
#[derive(Debug, PartialEq, Eq)]
enum BadUpgrade {
    /// Not an upgrade to WebSocket at all (426, `Upgrade: websocket`).
    NotWebSocket,
    /// `Sec-WebSocket-Version` missing or not 13 (426 with `Sec-WebSocket-Version: 13`,
    /// RFC 6455 §4.4).
    Version,
    /// `Sec-WebSocket-Key` missing or not the base64 of 16 bytes (400, §4.2.1).
    Key,
}

/// RFC 6455 §4.2.1: a GET with `Connection: upgrade`, `Upgrade: websocket`, version 13 and
/// a key that is the base64 encoding of 16 bytes.
fn check_upgrade(method: &Method, headers: &HeaderMap) -> Result<(), BadUpgrade> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if method != Method::GET
        || !has_token(header::CONNECTION, "upgrade")
        || !has_token(header::UPGRADE, "websocket")
    {
        return Err(BadUpgrade::NotWebSocket);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(BadUpgrade::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !is_base64_of_16_bytes(key) {
        return Err(BadUpgrade::Key);
    }
    Ok(())
}

/// 16 bytes in base64: 22 alphabet characters (the last one carrying 2 bits, so one of
/// `AQgw`) and `==`.
fn is_base64_of_16_bytes(key: &[u8]) -> bool {
    let alphabet = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22].iter().all(alphabet)
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
}

/// An opening handshake that passed every check and holds its upstream: the 101's headers,
/// and what the session needs once the socket is the client's.
pub(crate) struct Prepared {
    shared: std::sync::Arc<crate::gateway::Shared>,
    /// The 101's headers after the status line: `Connection`, `Upgrade`,
    /// `Sec-WebSocket-Accept` and those copied from the upstream's own 101.
    headers: HeaderMap,
    start: EngineStart,
    span: tracing::Span,
    permits: (
        tokio::sync::OwnedSemaphorePermit,
        crate::ingress::admit::ClientSlot,
    ),
}

/// The opening handshake up to the 101, for either ingress path (hyper's or the raw one in
/// `ingress::fast`): RFC 6455's checks, admission, and the pre-101 acquire. A refusal is the
/// HTTP response to send instead.
pub(crate) async fn prepare(
    gw: &Gateway,
    peer: SocketAddr,
    method: &Method,
    version: http::Version,
    headers: &HeaderMap,
    activity: Option<&crate::listener::ConnActivity>,
) -> Result<Prepared, Response> {
    let shared = &gw.shared;
    let Admitted {
        client,
        permits: (slot, client_slot),
    } = admit(shared, headers, peer).await?;
    // Admitted: the upstream dial before the 101 suspends the connection's deadline (the dial
    // has its own).
    let _conn_turn = activity.map(|a| a.turn());
    match check_upgrade(method, headers) {
        Ok(()) => {}
        Err(BadUpgrade::NotWebSocket) => {
            let mut r = json_error(
                StatusCode::UPGRADE_REQUIRED,
                "websocket_required",
                "this endpoint serves the Responses API over WebSocket (GET with Upgrade: websocket) or HTTP (POST)",
            );
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return Err(r);
        }
        Err(BadUpgrade::Version) => {
            let mut r = json_error(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported_websocket_version",
                "only WebSocket version 13 is supported",
            );
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return Err(r);
        }
        Err(BadUpgrade::Key) => {
            return Err(json_error(
                StatusCode::BAD_REQUEST,
                "invalid_websocket_key",
                "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
            ));
        }
    }
    if version < http::Version::HTTP_11 {
        // RFC 6455 §4.1: the opening handshake is HTTP/1.1 or later. Refused before any dial.
        return Err(json_error(
            StatusCode::BAD_REQUEST,
            "invalid_upgrade",
            "WebSocket upgrades need HTTP/1.1",
        ));
    }
    let ids = match HeaderIds::from_headers(headers) {
        Ok(ids) => ids,
        Err(msg) => {
            return Err(json_error(
                StatusCode::BAD_REQUEST,
                "invalid_conversation_id",
                &msg,
            ));
        }
    };
    let route = ids.route(client.clone(), None);
    let forward = ForwardHeaders::from_client(headers);
    let accept = derive_accept_key(
        headers
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|v| v.as_bytes())
            .unwrap_or_default(),
    );
    let id = shared.next_session_id();
    let span = info_span!(
        "session",
        session.id = id,
        client.addr = %peer,
        client.name = %client,
        account = field::Empty,
        conversation = field::Empty,
    );
    if let Some(c) = &route.lane {
        span.record("conversation", field::display(c));
    }

    // With a conversation id the upstream is acquired before the client's 101. An acquire
    // that must wait (a dial, a release) goes on in its own task: if the client leaves
    // mid-dial (the handshake's future is then dropped), the dial still completes and the
    // clean connection waits in the pool for the client's reconnect instead of being thrown
    // away half-open. The task holds the client's connection slot until it ends, so abandoned
    // dials stay within `limits.max_client_connections`. A pool hit completes at its first
    // poll, here, without a task.
    let mut upstream = None;
    let mut slot = slot;
    if route.lane.is_some() {
        let mut acquiring = Box::pin({
            let (shared, route, forward) = (shared.clone(), route.clone(), forward.clone());
            async move {
                let acquired = shared
                    .acquire(&route, &id.to_string(), &forward, None, Ingress::Ws)
                    .await;
                (slot, acquired)
            }
            .instrument(span.clone())
        });
        let acquired = match futures::poll!(acquiring.as_mut()) {
            std::task::Poll::Ready(done) => Ok(done),
            std::task::Poll::Pending => shared.sessions.spawn(acquiring).await,
        };
        let Ok((held, acquired)) = acquired else {
            return Err(json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "acquiring the upstream failed",
            ));
        };
        slot = held;
        match acquired {
            Ok(p) => {
                span.record("account", field::display(p.account()));
                upstream = Some(p);
            }
            // No usable account: upgrade anyway; the first create gets a 429 `error` event
            // with a retry hint and the session stays open.
            Err(AcquireError::NoAccount { .. }) => {}
            Err(e) => {
                let status =
                    StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
                return Err(json_error(status, e.code(), &e.to_string()));
            }
        }
    }

    let mut h = HeaderMap::with_capacity(4);
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(conn) = upstream
        .as_ref()
        .and_then(|p| p.conn().map(|c| (p.is_reused(), c)))
    {
        let (reused, conn) = conn;
        for (name, value) in conn.response_headers() {
            // A turn-state token belongs to the turn that opened the connection.
            if reused && name == "x-codex-turn-state" {
                continue;
            }
            h.insert(name.clone(), value.clone());
        }
    }
    let start = EngineStart {
        id,
        span: span.clone(),
        ids,
        route,
        headers: forward,
        upstream,
        ingress: Ingress::Ws,
    };
    Ok(Prepared {
        shared: shared.clone(),
        headers: h,
        start,
        span,
        permits: (slot, client_slot),
    })
}

impl Prepared {
    /// The 101's headers.
    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Spawns the session on the socket `io` yields (once the 101 is out), with `read` the
    /// bytes of the client's first frames already read past the request head. If `io`
    /// yields nothing (the client left first), the upstream goes back to the pool (it is
    /// clean).
    pub(crate) fn spawn<F>(self, io: F)
    where
        F: Future<Output = Option<(ClientIo, Vec<u8>)>> + Send + 'static,
    {
        let Prepared {
            shared,
            start,
            span,
            permits,
            ..
        } = self;
        let ws_config = shared.ws_config;
        shared.sessions.clone().spawn(
            async move {
                // Held for the session's life: they count it against the connection limits.
                let _permits = permits;
                let Some((io, read_ahead)) = io.await else {
                    return;
                };
                let (io, read) = crate::ingress::ws::Counted::new(io, &shared.buffered);
                let ws = if read_ahead.is_empty() {
                    WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config)).await
                } else {
                    WebSocketStream::from_partially_read(
                        io,
                        read_ahead,
                        Role::Server,
                        Some(ws_config),
                    )
                    .await
                };
                let session = Box::new(Session::new(shared, ws, read, start));
                session.run().await;
            }
            .instrument(span),
        );
    }
}

/// The WebSocket handshake of a request that came through hyper (`server::responses`): the
/// session starts once hyper has sent the 101 and handed over the socket.
pub(crate) async fn upgrade(gw: Gateway, peer: SocketAddr, mut req: Request) -> Response {
    let activity = req
        .extensions()
        .get::<crate::listener::ConnActivity>()
        .cloned();
    let mut prepared = match prepare(
        &gw,
        peer,
        req.method(),
        req.version(),
        req.headers(),
        activity.as_ref(),
    )
    .await
    {
        Ok(p) => p,
        Err(refusal) => return refusal,
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upgrade_unavailable",
            "connection cannot be upgraded",
        );
    };
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = std::mem::take(&mut prepared.headers);
    prepared.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => Some((ClientIo::Upgraded(TokioIo::new(upgraded)), Vec::new())),
            Err(e) => {
                debug!(error = %e, "client upgrade failed");
                None
            }
        }
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_handshake_rules() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(check_upgrade(&Method::GET, &h), Ok(()));
        assert_eq!(
            check_upgrade(&Method::POST, &h),
            Err(BadUpgrade::NotWebSocket)
        );
        for bad in [
            "",
            "not base64!",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZR==",
        ] {
            let mut h = h.clone();
            h.insert(
                header::SEC_WEBSOCKET_KEY,
                HeaderValue::from_str(bad).unwrap(),
            );
            assert_eq!(
                check_upgrade(&Method::GET, &h),
                Err(BadUpgrade::Key),
                "{bad:?}"
            );
        }
        let mut long = h.clone();
        long.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&"A".repeat(30_000)).unwrap(),
        );
        assert_eq!(check_upgrade(&Method::GET, &long), Err(BadUpgrade::Key));
        h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(check_upgrade(&Method::GET, &h), Err(BadUpgrade::Version));
    }
}
