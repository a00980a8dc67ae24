//! The mock upstream's plain HTTP side: a connection whose request head is not a WebSocket
//! upgrade is answered by hyper (`GET .../models`, `POST .../responses/compact`), and each
//! request is recorded for tests.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::{HttpRecord, MockState};

/// True if the connection's request head (peeked, not consumed) is not a WebSocket upgrade.
pub(super) async fn is_plain_http(tcp: &TcpStream) -> bool {
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
pub(super) async fn serve_http(state: Arc<MockState>, tcp: TcpStream) {
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
