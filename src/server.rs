//! The listener: axum routes `/healthz` and the upgrade paths; the upgrade itself is ours, so
//! the upstream is acquired *before* answering the client (its 101 headers are copied onto
//! ours, and an upstream refusal becomes the client's HTTP status).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::serve::ListenerExt;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{Instrument, debug, field, info, info_span, warn};

use crate::cluster::LeaseGrant;
use crate::error::AcquireError;
use crate::gateway::Gateway;
use crate::headers::{ForwardHeaders, HeaderIds};
use crate::ids::ClientId;
use crate::ids::Ingress;
use crate::ingress::ws::Session;
use crate::listener::{HandshakeLimits, TlsListener, serve_http};
use crate::turn::engine::EngineStart;

/// Serves `gateway` on `listener` until `shutdown` resolves, then drains: the listening socket
/// is closed at once (a replacement process bound to the same address with `SO_REUSEPORT`
/// takes the new connections), idle sessions are closed with 1012, sessions with a turn in
/// flight get `grace` to finish, the admin listener (if separate) keeps answering `/readyz`
/// with `draining`; then pooled upstreams are closed with 1001.
pub async fn serve(
    gateway: Gateway,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let shared = gateway.shared.clone();
    let config = shared.config();
    let mut router = Router::new().route("/healthz", get(healthz));
    let mut model_paths = std::collections::HashSet::new();
    for path in &config.paths {
        router = router.route(path, any(responses));
        router = router.route(
            &format!("{path}/compact"),
            axum::routing::post(crate::ingress::passthrough::compact),
        );
        let models = format!("{}/models", path.strip_suffix("/responses").unwrap_or(path));
        if !config.paths.contains(&models) && model_paths.insert(models.clone()) {
            router = router.route(&models, get(crate::ingress::passthrough::models));
        }
    }
    let limits = HandshakeLimits::from_config(&config.limits);
    let mut admin_server = None;
    match config.admin.listen {
        None => router = router.merge(admin_routes()),
        Some(addr) => {
            let admin_listener = crate::listener::bind(addr)?;
            let bound = admin_listener.local_addr()?;
            if let Ok(mut a) = shared.admin_addr.lock() {
                *a = Some(bound);
            }
            info!(addr = %bound, "wsgate admin listening");
            let app = Router::new()
                .route("/healthz", get(healthz))
                .merge(admin_routes())
                .fallback(not_found)
                .with_state(gateway.clone());
            let stopped = shared.stopped.clone();
            admin_server = Some(tokio::spawn(serve_http(
                admin_listener,
                app,
                limits,
                tokio_util::task::TaskTracker::new(),
                stopped.cancelled_owned(),
            )));
        }
    }
    let app = router.fallback(not_found).with_state(gateway.clone());
    let connections = shared.http_connections.clone();
    let addr = listener.local_addr()?;
    shared
        .listening
        .store(true, std::sync::atomic::Ordering::Release);
    info!(addr = %addr, "wsgate listening");
    shared.cluster.set_addr(addr);
    let token = shared.shutdown.clone();
    tokio::spawn({
        let token = token.clone();
        async move {
            tokio::select! {
                _ = shutdown => token.cancel(),
                _ = token.cancelled() => {}
            }
        }
    });
    // At shutdown the accept loop ends and the listening socket closes at once; requests
    // already on a connection are answered, upgraded sessions drain below.
    let stop_accepting = shared.shutdown.clone().cancelled_owned();
    match shared.listener_tls.clone() {
        Some(tls) => {
            let listener = TlsListener::new(listener, tls, limits)?;
            serve_http(listener, app, limits, connections, stop_accepting).await;
        }
        None => {
            // Events are small and latency-sensitive: no Nagle on client sockets.
            let listener = listener.tap_io(|tcp: &mut tokio::net::TcpStream| {
                let _ = tcp.set_nodelay(true);
            });
            serve_http(listener, app, limits, connections, stop_accepting).await;
        }
    }
    info!(
        sessions = shared.sessions.len(),
        "listener closed; draining"
    );
    // Other instances and operators see it in the registry; new conversations go elsewhere.
    shared.cluster.set_draining();
    shared.sessions.close();
    if tokio::time::timeout(grace, shared.sessions.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = shared.sessions.len(),
            "shutdown grace expired with sessions still running"
        );
    }
    shared.stopped.cancel();
    shared
        .listening
        .store(false, std::sync::atomic::Ordering::Release);
    if let Some(admin) = admin_server {
        let _ = admin.await;
    }
    // Pooled upstreams are closed with 1001; wait (briefly) until their close frames are out.
    shared.pool.close();
    if !gateway.wait_upstreams_closed(Duration::from_secs(2)).await {
        warn!("some upstream connections did not close in time");
    }
    shared.cluster.leave().await;
    info!("wsgate stopped");
    Ok(())
}

fn admin_routes() -> Router<Gateway> {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_page))
        .route("/status.json", get(status_json))
}

/// Checks the operator key (`admin.key_*`), if one is configured.
fn admin_denied(gw: &Gateway, headers: &HeaderMap) -> Option<Response> {
    let key = gw.shared.admin_key()?;
    let keys = [("admin".to_string(), key)];
    match authenticate(&keys, headers) {
        Ok(_) => None,
        Err(()) => Some(unauthorized(
            "invalid_admin_key",
            "missing or wrong admin key",
        )),
    }
}

async fn readyz(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&gw, &headers) {
        return denied;
    }
    match gw.shared.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&gw, &headers) {
        return denied;
    }
    gw.shared.update_gauges();
    match &gw.shared.prometheus {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics_unavailable",
            "another metrics recorder is installed",
        ),
    }
}

async fn status_json(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&gw, &headers) {
        return denied;
    }
    axum::Json(gw.shared.status_with_cluster().await).into_response()
}

async fn status_page(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&gw, &headers) {
        return denied;
    }
    let html = crate::status::render_html(&gw.shared.status_with_cluster().await);
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not_found", "no such path")
}

/// An OpenAI-shaped error response: `{"error": {"message", "type", "param", "code"}}`.
pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    })
    .to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// HTTP 401 asking for a Bearer key.
fn unauthorized(code: &str, message: &str) -> Response {
    let mut r = json_error(StatusCode::UNAUTHORIZED, code, message);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Checks `Authorization: Bearer <key>` against the configured client keys in constant time.
/// Returns the client's name.
fn authenticate<'a>(
    keys: &'a [(String, Vec<u8>)],
    headers: &HeaderMap,
) -> Result<Option<&'a str>, ()> {
    if keys.is_empty() {
        return Ok(None);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    let mut found = None;
    for (name, key) in keys {
        // Compare every key, whatever matched, so timing says nothing about which one did.
        if bool::from(presented.as_bytes().ct_eq(key)) {
            found = Some(name.as_str());
        }
    }
    found.map(Some).ok_or(())
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

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

/// What admission gave a client request: its tenant and the permits that count it against
/// `limits.max_client_connections` and `limits.max_connections_per_client` (held for the
/// session's or the HTTP turn's life).
pub(crate) struct Admitted {
    pub client: ClientId,
    pub permits: (tokio::sync::OwnedSemaphorePermit, ClientSlot),
}

/// A client key's share of `limits.max_connections_per_client`: this instance's permit and,
/// with a cluster, the key's lease in Redis (so the limit holds across instances).
pub(crate) struct ClientSlot {
    _local: Option<tokio::sync::OwnedSemaphorePermit>,
    _shared: Option<crate::cluster::Lease>,
}

/// The checks every client request passes, WebSocket or HTTP: the client key, the Origin
/// allow-list, the connection limits, and not shutting down.
#[allow(clippy::result_large_err)] // the refusal is the handler's answer, returned at once
pub(crate) async fn admit(
    shared: &crate::gateway::Shared,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Admitted, Response> {
    let client = match authenticate(&shared.client_keys(), headers) {
        Ok(name) => name.map(ClientId::from).unwrap_or_else(ClientId::anonymous),
        Err(()) => {
            debug!(client.addr = %peer, "rejected client key");
            return Err(unauthorized(
                "invalid_api_key",
                "missing or wrong gateway API key",
            ));
        }
    };
    let config = shared.config();
    let origins = &config.limits.allowed_origins;
    // Without client keys anyone who can reach the listener spends the operator's account, so
    // browsers (which send an Origin) must be listed, and on loopback the Host must be a
    // loopback name: a web page, or a DNS-rebinding page, cannot use the gateway.
    let no_auth = shared.client_keys().is_empty();
    if let Some(origin) = headers.get(header::ORIGIN)
        && (!origins.is_empty() || no_auth)
        && !origins.iter().any(|o| origin.as_bytes() == o.as_bytes())
    {
        crate::metrics::error("origin_not_allowed");
        return Err(json_error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin is not in limits.allowed_origins",
        ));
    }
    if no_auth
        && config.listen.ip().is_loopback()
        && !headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(is_loopback_host)
    {
        crate::metrics::error("host_not_allowed");
        return Err(json_error(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            "without client keys the gateway only answers requests for a loopback Host",
        ));
    }
    let Ok(slot) = shared.client_slots.clone().try_acquire_owned() else {
        crate::metrics::error("too_many_connections");
        return Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the gateway is at limits.max_client_connections",
        ));
    };
    let too_many = || {
        crate::metrics::error("too_many_connections_for_client");
        json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections_for_client",
            "this client key is at limits.max_connections_per_client",
        )
    };
    let local = match shared.client_permit(client.as_str()) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(())) => return Err(too_many()),
    };
    let limit = config.limits.max_connections_per_client;
    let shared_lease = if limit > 0 && shared.cluster.enabled() {
        match shared.cluster.lease(client.as_str(), limit).await {
            LeaseGrant::Granted(l) => Some(l),
            LeaseGrant::Refused => return Err(too_many()),
            LeaseGrant::Local => None,
        }
    } else {
        None
    };
    let client_slot = ClientSlot {
        _local: local,
        _shared: shared_lease,
    };
    if shared.shutdown.is_cancelled() {
        return Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "gateway is shutting down",
        ));
    }
    Ok(Admitted {
        client,
        permits: (slot, client_slot),
    })
}

/// Every path in `paths`: `POST` is the HTTP ingress, `GET` + Upgrade the WebSocket one.
async fn responses(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    if req.method() == Method::POST {
        return crate::ingress::http::responses(gw, peer, req).await;
    }
    upgrade(gw, peer, req).await
}

async fn upgrade(gw: Gateway, peer: SocketAddr, mut req: Request) -> Response {
    let shared = &gw.shared;
    let headers = req.headers();
    let Admitted {
        client,
        permits: (slot, client_slot),
    } = match admit(shared, headers, peer).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    // Admitted: the upstream dial before the 101 suspends the connection's deadline (the dial
    // has its own).
    let _conn_turn = req
        .extensions()
        .get::<crate::listener::ConnActivity>()
        .map(|a| a.turn());
    match check_upgrade(req.method(), headers) {
        Ok(()) => {}
        Err(BadUpgrade::NotWebSocket) => {
            let mut r = json_error(
                StatusCode::UPGRADE_REQUIRED,
                "websocket_required",
                "this endpoint serves the Responses API over WebSocket (GET with Upgrade: websocket) or HTTP (POST)",
            );
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return r;
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
            return r;
        }
        Err(BadUpgrade::Key) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "invalid_websocket_key",
                "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
            );
        }
    }
    if req.version() < http::Version::HTTP_11 {
        // RFC 6455 §4.1: the opening handshake is HTTP/1.1 or later. Refused before any dial.
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_upgrade",
            "WebSocket upgrades need HTTP/1.1",
        );
    }
    let ids = match HeaderIds::from_headers(headers) {
        Ok(ids) => ids,
        Err(msg) => return json_error(StatusCode::BAD_REQUEST, "invalid_conversation_id", &msg),
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
    // mid-dial (hyper then drops this handler), the dial still completes and the clean
    // connection waits in the pool for the client's reconnect instead of being thrown away
    // half-open. The task holds the client's connection slot until it ends, so abandoned
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
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "acquiring the upstream failed",
            );
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
                return json_error(status, e.code(), &e.to_string());
            }
        }
    }

    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upgrade_unavailable",
            "connection cannot be upgraded",
        );
    };
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
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
    let ws_config = shared.ws_config;
    let shared = shared.clone();
    shared.sessions.clone().spawn(
        async move {
            // Held for the session's life: they count it against the connection limits.
            let _permits = (slot, client_slot);
            match on_upgrade.await {
                Ok(upgraded) => {
                    let (io, read) = crate::ingress::ws::Counted::new(TokioIo::new(upgraded));
                    let ws =
                        WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config)).await;
                    Session::new(shared, ws, read, start).run().await;
                }
                // The client went away before the upgrade completed: `start` drops, and with it
                // the upstream, which goes back to the pool (it is clean).
                Err(e) => debug!(error = %e, "client upgrade failed"),
            }
        }
        .instrument(span),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:9",
            "[::1]:80",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "rebound.example",
            "rebound.example:8080",
            "10.0.0.1",
            "localhost.evil.example",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

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

    #[test]
    fn auth_rules() {
        let keys = vec![
            ("a".to_string(), b"k1".to_vec()),
            ("b".to_string(), b"k2".to_vec()),
        ];
        let mut h = HeaderMap::new();
        assert!(authenticate(&keys, &h).is_err());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k2"));
        assert_eq!(authenticate(&keys, &h), Ok(Some("b")));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k3"));
        assert!(authenticate(&keys, &h).is_err());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        assert!(
            authenticate(&keys, &h).is_err(),
            "prefix of a key is not the key"
        );
        assert_eq!(authenticate(&[], &HeaderMap::new()), Ok(None));
    }
}
