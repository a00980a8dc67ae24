//! The HTTP relays: `GET .../models` (with its query) and `POST .../responses/compact`, sent
//! over HTTP to the upstream's HTTP base (`upstream.http_url`, or derived from
//! `upstream.url`) with the affinity's account credential and the DESIGN §6 header rules. The
//! request body is bounded like the HTTP ingress's; the response body by
//! `http.max_response_size`. Every wait has a deadline.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use crate::accounts::Account;
use crate::gateway::{Gateway, Shared};
use crate::headers::{ForwardHeaders, HeaderIds};
use crate::ingress::admit::{Admitted, admit};
use crate::ingress::body::{BodyError, Held};
use crate::server::json_error;

/// Response headers relayed back to the client.
const RELAYED: &[&str] = &[
    "content-type",
    "etag",
    "x-models-etag",
    "openai-model",
    "x-request-id",
    "x-reasoning-included",
];

/// `GET {prefix}/models`.
pub(crate) async fn models(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    relay(
        &gw.shared,
        peer,
        req,
        Method::GET,
        &format!("/models{query}"),
    )
    .await
}

/// `POST {path}/compact`.
pub(crate) async fn compact(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    relay(&gw.shared, peer, req, Method::POST, "/responses/compact").await
}

async fn relay(
    shared: &Shared,
    peer: SocketAddr,
    req: Request,
    method: Method,
    suffix: &str,
) -> Response {
    let (parts, body) = req.into_parts();
    let Admitted { client, permits } = match admit(shared, &parts.headers, peer).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    // Admitted: the connection's deadline waits while this runs (body read included).
    let _conn_turn = parts
        .extensions
        .get::<crate::listener::ConnActivity>()
        .map(|a| a.turn());
    let config = shared.config();
    let body = if method == Method::POST {
        match crate::ingress::body::read_request(shared, &parts.headers, body).await {
            Ok(b) => Some(b),
            Err(r) => return r,
        }
    } else {
        None
    };
    // The affinity's account (least loaded when the request names none).
    let affinity = HeaderIds::from_http_headers(&parts.headers)
        .ok()
        .and_then(|ids| ids.route(client.clone(), None).affinity)
        .map(|a| (client.clone(), a));
    let account = match shared.assign(affinity.as_ref(), suffix).await {
        Ok(a) => a.account,
        Err(no) => {
            let v = crate::event::limit_error("all_accounts_unavailable", no.retry_after);
            return json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "all_accounts_unavailable",
                v["error"]["message"].as_str().unwrap_or_default(),
            );
        }
    };
    let base = match config.upstream_http_base() {
        Ok(b) => b,
        Err(e) => return json_error(StatusCode::BAD_GATEWAY, "upstream_misconfigured", &e),
    };
    let url = format!("{base}{suffix}");
    let forward = ForwardHeaders::from_client(&parts.headers);
    let deadline = config.limits.turn_idle_timeout;
    let max = config.http.max_response_size.as_u64() as usize;
    let sent = tokio::time::timeout(
        deadline,
        request(
            shared,
            &url,
            method,
            &account,
            &forward,
            body.as_ref().map(|b| b.bytes.clone()),
            max,
        ),
    )
    .await;
    drop(body);
    drop(permits);
    match sent {
        Err(_) => json_error(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            &format!("the upstream did not answer {suffix} within {deadline:?}"),
        ),
        Ok(Err(e)) => {
            warn!(account = %account.id, error = %crate::telemetry::escape(&e, 200), "HTTP relay failed");
            crate::metrics::error("http_relay_failed");
            json_error(StatusCode::BAD_GATEWAY, "upstream_connect_failed", &e)
        }
        Ok(Ok((status, headers, body))) => {
            info!(account = %account.id, status = status.as_u16(), path = suffix, "HTTP relay");
            let mut r = (status, body.into_body()).into_response();
            for name in RELAYED {
                if let Some(v) = headers.get(*name) {
                    r.headers_mut()
                        .insert(HeaderName::from_static(name), v.clone());
                }
            }
            r
        }
    }
}

/// One HTTP/1.1 request to the upstream: TCP (+ TLS for https) within
/// `upstream.connect_timeout`, the account's credential, the forwarded headers; the response
/// body at most `max` bytes, taken from the gateway-wide budget as it arrives.
async fn request(
    shared: &Shared,
    url: &str,
    method: Method,
    account: &Account,
    forward: &ForwardHeaders,
    body: Option<Bytes>,
    max: usize,
) -> Result<(StatusCode, HeaderMap, Held), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad upstream URL: {e}"))?;
    let host = uri.host().ok_or("upstream URL has no host")?.to_string();
    let io = crate::net::connect(&uri, &shared.dialer.tls(), shared.dialer.connect_timeout())
        .await
        .map_err(|e| e.to_string())?;
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(
            header::HOST,
            uri.authority().map(|a| a.as_str()).unwrap_or(&host),
        )
        .header(header::ACCEPT, "application/json")
        .header(header::AUTHORIZATION, account.authorization());
    for (name, value) in forward.iter() {
        req = req.header(name, value);
    }
    for (name, value) in [
        ("chatgpt-account-id", &account.chatgpt_account_id),
        ("openai-organization", &account.organization),
        ("openai-project", &account.project),
    ] {
        if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            req = req.header(name, v);
        }
    }
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| format!("bad request: {e}"))?;
    let response = send(io, req).await?;
    // The connection task drives the body too: it lives until the body is read.
    let (response, _conn) = response;
    let (parts, body) = response.into_parts();
    // The whole exchange runs under the turn-idle timeout too (the caller's).
    let timeout = shared.config().limits.turn_idle_timeout;
    let body = crate::ingress::body::collect(body, max, timeout, &shared.buffered)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge(max) => {
                format!("the upstream response is larger than {max} bytes (http.max_response_size)")
            }
            BodyError::Timeout(t) => format!("the upstream response did not arrive within {t:?}"),
            e => format!("reading the upstream response failed: {e}"),
        })?;
    Ok((parts.status, parts.headers, body))
}

/// Sends `req` on a new HTTP/1.1 connection; returns the response and the task driving the
/// connection (aborted when dropped, so it must outlive the reading of the body).
async fn send<S>(
    io: S,
    req: http::Request<Full<Bytes>>,
) -> Result<
    (
        http::Response<hyper::body::Incoming>,
        tokio_util::task::AbortOnDropHandle<()>,
    ),
    String,
>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "upstream HTTP connection ended");
        }
    }));
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    Ok((response, conn))
}
