//! Admission: the checks every client request passes before it becomes a session or an
//! HTTP turn, whichever ingress carries it: the client key (constant-time), the Origin
//! allow-list and the loopback Host rule, the connection limits (this instance's and, with a
//! cluster, the client key's lease in Redis), and not shutting down.

use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use subtle::ConstantTimeEq;
use tracing::debug;

use crate::cluster::LeaseGrant;
use crate::ids::ClientId;
use crate::server::json_error;

/// HTTP 401 asking for a Bearer key.
pub(crate) fn unauthorized(code: &str, message: &str) -> Response {
    let mut r = json_error(StatusCode::UNAUTHORIZED, code, message);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Checks `Authorization: Bearer <key>` against the configured client keys in constant time.
/// Returns the client's name.
pub(crate) fn authenticate<'a>(
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
