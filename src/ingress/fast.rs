//! The WebSocket opening handshake read and answered on the raw socket, without the HTTP
//! stack: a reconnecting client (Codex opens a WebSocket per session, and again after every
//! drop) costs the gateway one read, one parse and one write before its session starts,
//! instead of hyper's connection machinery, axum's routing and hyper's upgrade hand-off
//! between two tasks (README "Performance", workload (c)).
//!
//! Only the plain case takes this path: the connection's first read holds a complete
//! `GET <path> HTTP/1.1` head, within `limits.max_header_size`, for one of the Responses API
//! paths, with an `Upgrade` header and no body. Anything else (another path or method, a head
//! split over reads, a malformed or oversized head) goes on to hyper with the bytes already
//! read in front ([`Prefixed`]), and gets exactly the answers it always got. The checks and
//! refusals of the handshake itself are `upgrade::prepare`'s, shared by both paths; a refusal
//! here is written as the same OpenAI-shaped response, and the connection then closes.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::response::Response;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::gateway::Gateway;
use crate::ingress::client_io::{IntoClientIo, Prefixed};
use crate::ingress::upgrade::prepare;
use crate::listener::{ConnActivity, HandshakeLimits};

/// Most headers a fast-path head may have (more goes to hyper).
const MAX_HEADERS: usize = 64;
/// The first read's buffer, at most (`limits.max_header_size` if smaller). Codex's opening
/// handshake is about 1 KiB.
const FIRST_READ: usize = 8 << 10;
/// Largest refusal body written here (ours are a few hundred bytes).
const MAX_REFUSAL_BODY: usize = 64 << 10;

/// The fast path of one listener: its gateway and the paths its router serves.
pub(crate) struct FastUpgrade {
    gw: Gateway,
    paths: Vec<String>,
}

/// What became of a connection.
pub(crate) enum Outcome<S> {
    /// Answered here: the session runs, or the refusal was written and the socket closed.
    Done,
    /// Not for this path: hyper serves it, reading the bytes already read first.
    Hyper(Prefixed<S>),
}

/// A head the fast path takes: its headers, and its length in the buffer.
#[derive(Debug)]
struct Head {
    headers: HeaderMap,
    len: usize,
}

impl FastUpgrade {
    pub(crate) fn new(gw: Gateway, paths: Vec<String>) -> FastUpgrade {
        FastUpgrade { gw, paths }
    }

    /// Reads the connection's first bytes (by `deadline`; a connection that has sent nothing
    /// when `stopping` fires is closed, as hyper closes an idle one at shutdown) and, if they
    /// are a plain opening handshake within `limits.max_header_size`, answers it; the 101 and
    /// a refusal are written within `limits.timeout`.
    pub(crate) async fn serve<S: IntoClientIo>(
        &self,
        mut io: S,
        peer: SocketAddr,
        activity: &ConnActivity,
        limits: HandshakeLimits,
        deadline: Instant,
        stopping: &CancellationToken,
    ) -> Outcome<S> {
        let (max_header_size, write_timeout) = (limits.max_header_size, limits.timeout);
        let mut buf = BytesMut::with_capacity(FIRST_READ.min(max_header_size.max(1)));
        let first = tokio::select! {
            read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)) => read,
            _ = stopping.cancelled() => return Outcome::Done,
        };
        match first {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Outcome::Done, // closed or failed before a byte
            Err(_) => {
                crate::metrics::error("handshake_timeout");
                debug!(client.addr = %peer, "client handshake timed out");
                return Outcome::Done;
            }
        }
        let Some(head) = parse_head(&buf, &self.paths, max_header_size) else {
            return Outcome::Hyper(Prefixed::new(buf.freeze(), io));
        };
        let read_ahead = buf[head.len..].to_vec();
        drop(buf);
        let prepared = match prepare(
            &self.gw,
            peer,
            &Method::GET,
            http::Version::HTTP_11,
            &head.headers,
            Some(activity),
        )
        .await
        {
            Ok(p) => p,
            Err(refusal) => {
                refuse(&mut io, refusal, write_timeout).await;
                return Outcome::Done;
            }
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
        put_headers(&mut out, prepared.headers());
        out.extend_from_slice(b"\r\n");
        match tokio::time::timeout(write_timeout, io.write_all(&out)).await {
            Ok(Ok(())) => {}
            // The client left or stopped reading: `prepared` drops, and with it the upstream,
            // which goes back to the pool (it is clean).
            _ => {
                debug!(client.addr = %peer, "client left before the 101");
                return Outcome::Done;
            }
        }
        let io = io.into_client_io();
        prepared.spawn(async move { Some((io, read_ahead)) });
        Outcome::Done
    }
}

/// The head in `buf` if the fast path takes it (see the module doc).
fn parse_head(buf: &[u8], paths: &[String], max_header_size: usize) -> Option<Head> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= max_header_size => len,
        _ => return None,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return None;
    }
    let path = req.path?;
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if !paths.iter().any(|p| p == path) {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        headers.append(name, value);
    }
    let plain = headers.contains_key(header::UPGRADE)
        && !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING);
    plain.then_some(Head { headers, len })
}

fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes `refusal` (status, headers, body) and closes the connection.
async fn refuse<S: tokio::io::AsyncWrite + Unpin>(
    io: &mut S,
    refusal: Response,
    write_timeout: Duration,
) {
    let (parts, body) = refusal.into_parts();
    let body = axum::body::to_bytes(body, MAX_REFUSAL_BODY)
        .await
        .unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let mut headers = parts.headers;
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    put_headers(&mut out, &headers);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    let _ = tokio::time::timeout(write_timeout, async {
        io.write_all(&out).await?;
        io.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nsession-id: c1\r\n\r\n";

    fn paths() -> Vec<String> {
        vec![
            "/v1/responses".into(),
            "/backend-api/codex/responses".into(),
        ]
    }

    #[test]
    fn plain_opening_handshakes_take_the_fast_path() {
        let head = parse_head(HEAD.as_bytes(), &paths(), 32 << 10).expect("fast");
        assert_eq!(head.len, HEAD.len());
        assert_eq!(head.headers["session-id"], "c1");
        assert_eq!(head.headers[header::UPGRADE], "websocket");
        // A frame sent right behind the head stays in the buffer past `len`.
        let mut with_frame = HEAD.as_bytes().to_vec();
        with_frame.extend_from_slice(&[0x81, 0x82, 1, 2, 3, 4, 5, 6]);
        assert_eq!(
            parse_head(&with_frame, &paths(), 32 << 10).map(|h| h.len),
            Some(HEAD.len())
        );
        let query = HEAD.replace("/v1/responses", "/backend-api/codex/responses?x=1");
        assert!(parse_head(query.as_bytes(), &paths(), 32 << 10).is_some());
    }

    #[test]
    fn anything_unusual_goes_to_hyper() {
        let cases = [
            // split over reads: the head is not complete yet
            HEAD[..HEAD.len() - 2].to_string(),
            HEAD.replace("GET", "POST"),
            HEAD.replace("HTTP/1.1", "HTTP/1.0"),
            HEAD.replace("/v1/responses", "/healthz"),
            HEAD.replace("/v1/responses", "/v1/responses/"),
            HEAD.replace("/v1/responses", "http://127.0.0.1/v1/responses"),
            HEAD.replace("Upgrade: websocket\r\n", ""),
            HEAD.replace("session-id: c1\r\n", "Content-Length: 0\r\n"),
            HEAD.replace("session-id: c1\r\n", "Transfer-Encoding: chunked\r\n"),
            HEAD.replace("session-id: c1", "bad header: x"),
            HEAD.replace("session-id: c1\r\n", &"x-a: b\r\n".repeat(MAX_HEADERS)),
        ];
        for case in cases {
            assert!(
                parse_head(case.as_bytes(), &paths(), 32 << 10).is_none(),
                "{case:?}"
            );
        }
        // Over `limits.max_header_size`: hyper answers 431.
        assert!(parse_head(HEAD.as_bytes(), &paths(), HEAD.len() - 1).is_none());
    }

    /// The bytes from the request line on: like hyper, httparse skips empty lines before it
    /// (RFC 9112 §2.2).
    fn request_line(bytes: &[u8]) -> &[u8] {
        let start = bytes.iter().position(|b| !matches!(b, b'\r' | b'\n'));
        &bytes[start.unwrap_or(bytes.len())..]
    }

    #[test]
    fn empty_lines_before_the_request_line_are_skipped() {
        let head = format!("\r\n{HEAD}");
        let taken = parse_head(head.as_bytes(), &paths(), 32 << 10).expect("fast");
        assert_eq!(taken.len, head.len());
        assert!(taken.headers.contains_key(header::UPGRADE));
    }

    proptest::proptest! {
        /// Any first read, from any client before it is admitted: the parse never panics, and
        /// a head it takes is a GET for one of the paths that ends within the bytes read and
        /// within `limits.max_header_size`.
        #[test]
        fn any_first_read_is_parsed_safely(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            max in 0usize..4096,
        ) {
            if let Some(head) = parse_head(&bytes, &paths(), max) {
                proptest::prop_assert!(head.len <= bytes.len() && head.len <= max);
                proptest::prop_assert!(request_line(&bytes).starts_with(b"GET /"));
                proptest::prop_assert!(head.headers.contains_key(header::UPGRADE));
            }
        }

        /// The real handshake with bytes changed, cut or put in: the same holds, and the
        /// head is taken only where the change left a plain handshake.
        #[test]
        fn a_damaged_handshake_is_parsed_safely(
            edits in proptest::collection::vec(
                (0usize..HEAD.len(), proptest::prelude::any::<u8>(), 0u8..3),
                1..6,
            ),
        ) {
            let mut bytes = HEAD.as_bytes().to_vec();
            for (at, byte, how) in edits {
                let at = at.min(bytes.len());
                match how {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, byte),
                }
            }
            if let Some(head) = parse_head(&bytes, &paths(), 32 << 10) {
                proptest::prop_assert!(head.len <= bytes.len());
                proptest::prop_assert!(request_line(&bytes).starts_with(b"GET /"));
                proptest::prop_assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
            }
        }
    }

    #[test]
    fn headers_are_written_as_http_lines() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let mut out = Vec::new();
        put_headers(&mut out, &h);
        assert_eq!(out, b"upgrade: websocket\r\nconnection: upgrade\r\n");
    }

    #[tokio::test]
    async fn a_refusal_is_a_complete_response_then_close() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let refusal = crate::server::json_error(
            axum::http::StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "nope",
        );
        refuse(&mut a, refusal, Duration::from_secs(1)).await;
        drop(a);
        let mut text = String::new();
        b.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "websocket_required");
    }
}
