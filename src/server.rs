//! The listener: axum routes `/healthz`, the admin paths and the Responses API paths (`POST`
//! to the HTTP ingress, `GET` + Upgrade to the WebSocket one, `ingress::upgrade`), the drain
//! on shutdown, and the OpenAI-shaped error body every refusal uses.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::gateway::Gateway;
use crate::ingress::admit::{authenticate, unauthorized};
use crate::listener::{HandshakeLimits, TlsListener, serve_http};

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
                None,
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
    let fast = Some(std::sync::Arc::new(crate::ingress::fast::FastUpgrade::new(
        gateway.clone(),
        config.paths.clone(),
    )));
    match shared.listener_tls.clone() {
        Some(tls) => {
            let listener = TlsListener::new(listener, tls, limits)?;
            serve_http(listener, app, limits, connections, fast, stop_accepting).await;
        }
        None => {
            // Events are small and latency-sensitive: no Nagle on client sockets.
            let inherited = crate::listener::no_delay_on_accept(&listener);
            let listener = listener.tap_io(move |tcp: &mut tokio::net::TcpStream| {
                if !inherited {
                    let _ = tcp.set_nodelay(true);
                }
            });
            serve_http(listener, app, limits, connections, fast, stop_accepting).await;
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

/// Every path in `paths`: `POST` is the HTTP ingress, `GET` + Upgrade the WebSocket one.
async fn responses(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    if req.method() == Method::POST {
        return crate::ingress::http::responses(gw, peer, req).await;
    }
    crate::ingress::upgrade::upgrade(gw, peer, req).await
}
