//! HTTP bodies in memory: read within a deadline and a byte bound, every byte taken from the
//! gateway-wide budget (`limits.max_buffered_bytes`) as it arrives; request bodies are then
//! `Content-Encoding` decoded (zstd, gzip, deflate, identity; stacked codings, at most
//! [`MAX_CODINGS`], are undone in reverse order) with the same bound and the same budget on
//! each decoded layer, so neither a decompression bomb nor many slow bodies at once hold more
//! than the config allows.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;

use crate::gateway::{Budget, BudgetLease};

/// Stacked codings decoded at most: each layer may cost up to the size bound in CPU and
/// memory, and real clients send one.
pub const MAX_CODINGS: usize = 4;

/// Decoded bytes are produced in steps of this size.
const DECODE_STEP: usize = 64 * 1024;

/// Why a body was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// On the wire or decoded, the body is larger than `http.max_body_size` (413).
    #[error("the request body is larger than {0} bytes (http.max_body_size)")]
    TooLarge(usize),
    /// A `Content-Encoding` this gateway does not decode (415).
    #[error("Content-Encoding `{0}` is not supported (zstd, gzip, deflate, identity are)")]
    UnsupportedEncoding(String),
    /// The body did not decode (400).
    #[error("the request body does not decode as its Content-Encoding says: {0}")]
    Corrupt(String),
    /// The body did not arrive within `http.body_timeout` (408), or the client went away.
    #[error("the request body did not arrive in time ({0:?}, http.body_timeout)")]
    Timeout(Duration),
    #[error("reading the request body failed: {0}")]
    Read(String),
    /// Holding the body would pass `limits.max_buffered_bytes` (503).
    #[error("the gateway's buffer budget is exhausted (limits.max_buffered_bytes); try again")]
    BudgetExhausted,
}

impl BodyError {
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge(_) => 413,
            BodyError::UnsupportedEncoding(_) => 415,
            BodyError::Corrupt(_) | BodyError::Read(_) => 400,
            BodyError::Timeout(_) => 408,
            BodyError::BudgetExhausted => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            BodyError::TooLarge(_) => "payload_too_large",
            BodyError::UnsupportedEncoding(_) => "unsupported_content_encoding",
            BodyError::Corrupt(_) => "invalid_body_encoding",
            BodyError::Timeout(_) => "request_timeout",
            BodyError::Read(_) => "invalid_body",
            BodyError::BudgetExhausted => "buffer_budget_exhausted",
        }
    }
}

/// A body in memory and the budget it holds (released when dropped).
pub struct Held {
    pub bytes: Bytes,
    pub lease: BudgetLease,
}

impl Held {
    /// The bytes as a response body that keeps the budget until it has been written out.
    pub fn into_body(self) -> axum::body::Body {
        axum::body::Body::new(Leased {
            inner: http_body_util::Full::new(self.bytes),
            _lease: self.lease,
        })
    }
}

/// A body whose bytes stay counted in the budget while the connection writes them.
struct Leased {
    inner: http_body_util::Full<Bytes>,
    _lease: BudgetLease,
}

impl http_body::Body for Leased {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The codings of a `Content-Encoding` header, in the order they were applied.
fn codings(headers: &HeaderMap) -> Result<Vec<String>, BodyError> {
    let mut out = Vec::new();
    for v in headers.get_all(http::header::CONTENT_ENCODING) {
        let v = v
            .to_str()
            .map_err(|_| BodyError::UnsupportedEncoding("(not ASCII)".into()))?;
        for c in v.split(',').map(|c| c.trim().to_ascii_lowercase()) {
            match c.as_str() {
                "" | "identity" => {}
                "zstd" | "gzip" | "x-gzip" | "deflate" if out.len() < MAX_CODINGS => out.push(c),
                "zstd" | "gzip" | "x-gzip" | "deflate" => {
                    return Err(BodyError::UnsupportedEncoding(format!(
                        "more than {MAX_CODINGS} stacked codings"
                    )));
                }
                other => {
                    return Err(BodyError::UnsupportedEncoding(
                        other.chars().take(32).collect(),
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Makes room in `buf` for `extra` more bytes (at most `max` in all), the lease growing to
/// the bytes held before the buffer does (its spare capacity, under twice that, aside).
fn room(
    buf: &mut Vec<u8>,
    lease: &mut BudgetLease,
    extra: usize,
    max: usize,
) -> Result<(), BodyError> {
    let need = buf.len() + extra;
    if need > max {
        return Err(BodyError::TooLarge(max));
    }
    if !lease.grow_to(need) {
        return Err(BodyError::BudgetExhausted);
    }
    if need > buf.capacity() {
        let cap = need.max(buf.capacity().saturating_mul(2)).min(max);
        buf.reserve_exact(cap - buf.len());
    }
    Ok(())
}

/// Reads `body` into memory: at most `max` bytes, within `timeout`, taking `budget` as the
/// bytes arrive (a declared `Content-Length` takes nothing before its bytes come: a client
/// that declares much and sends little holds only what it sent).
pub async fn collect<B>(
    body: B,
    max: usize,
    timeout: Duration,
    budget: &Arc<Budget>,
) -> Result<Held, BodyError>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: std::fmt::Display,
{
    // A timeout too large to add (a config of centuries) waits as long as it can.
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
    let mut body = std::pin::pin!(body);
    let mut lease = budget.lease();
    let mut buf = Vec::new();
    if body.size_hint().lower() > max as u64 {
        return Err(BodyError::TooLarge(max));
    }
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout(timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers carry nothing for us.
        if let Ok(data) = frame.into_data() {
            room(&mut buf, &mut lease, data.len(), max)?;
            buf.extend_from_slice(&data);
        }
    }
    Ok(Held {
        bytes: Bytes::from(buf),
        lease,
    })
}

/// Reads and decodes an admitted HTTP request's body with the config's bounds
/// (`http.max_body_size`, `http.body_timeout`) and the gateway-wide budget; a refusal is the
/// OpenAI-shaped error reply (counted by its code).
pub(crate) async fn read_request<B>(
    shared: &crate::gateway::Shared,
    headers: &HeaderMap,
    body: B,
) -> Result<Held, axum::response::Response>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: std::fmt::Display,
{
    let config = shared.config();
    read(
        body,
        headers,
        config.http.max_body_size.as_u64() as usize,
        config.http.body_timeout,
        &shared.buffered,
    )
    .await
    .map_err(|e| {
        crate::metrics::error(e.code());
        let status =
            http::StatusCode::from_u16(e.status()).unwrap_or(http::StatusCode::BAD_REQUEST);
        crate::server::json_error(status, e.code(), &e.to_string())
    })
}

/// Reads and decodes a request body: at most `max` bytes on the wire and after decoding,
/// within `timeout`, every buffer taken from `budget`.
pub async fn read<B>(
    body: B,
    headers: &HeaderMap,
    max: usize,
    timeout: Duration,
    budget: &Arc<Budget>,
) -> Result<Held, BodyError>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: std::fmt::Display,
{
    let codings = codings(headers)?;
    let wire = collect(body, max, timeout, budget).await?;
    if codings.is_empty() {
        return Ok(wire);
    }
    // Decoding is CPU work: off the async workers.
    let budget = budget.clone();
    tokio::task::spawn_blocking(move || decode(wire, &codings, max, &budget))
        .await
        .map_err(|e| BodyError::Read(e.to_string()))?
}

/// Undoes `codings` (applied in order) with at most `max` bytes out of each layer, each
/// layer's buffer taken from `budget` (the layer it came from is released once decoded).
pub fn decode(
    mut held: Held,
    codings: &[String],
    max: usize,
    budget: &Arc<Budget>,
) -> Result<Held, BodyError> {
    for coding in codings.iter().rev() {
        let data = held.bytes.clone();
        let mut reader: Box<dyn Read> = match coding.as_str() {
            "zstd" => Box::new(
                zstd::stream::read::Decoder::new(&data[..])
                    .map_err(|e| BodyError::Corrupt(e.to_string()))?,
            ),
            "gzip" | "x-gzip" => Box::new(flate2::read::GzDecoder::new(&data[..])),
            // HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2).
            _ => Box::new(flate2::read::ZlibDecoder::new(&data[..])),
        };
        let mut lease = budget.lease();
        let mut out = Vec::new();
        loop {
            // One byte past the bound tells "too large" from "exactly the bound".
            let step = DECODE_STEP.min(max + 1 - out.len());
            if step == 0 {
                return Err(BodyError::TooLarge(max));
            }
            room(&mut out, &mut lease, step, max + 1)?;
            let len = out.len();
            out.resize(len + step, 0);
            let n = reader
                .read(&mut out[len..])
                .map_err(|e| BodyError::Corrupt(e.to_string()))?;
            out.truncate(len + n);
            if n == 0 {
                break;
            }
        }
        if out.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        drop(reader);
        held = Held {
            bytes: Bytes::from(out),
            lease,
        };
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn headers(encoding: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_str(encoding).unwrap(),
        );
        h
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn full(data: impl Into<Bytes>) -> http_body_util::Full<Bytes> {
        http_body_util::Full::new(data.into())
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn codings_decode_in_reverse_order_within_the_bound() {
        let budget = Budget::new(1 << 20);
        let json = br#"{"model":"m","input":"hi"}"#;
        let z = zstd::encode_all(&json[..], 3).unwrap();
        let got = read(full(z), &headers("zstd"), 1024, SECOND, &budget)
            .await
            .unwrap();
        assert_eq!(&got.bytes[..], json);
        assert!(
            got.lease.bytes() >= json.len(),
            "the decoded body holds budget"
        );
        assert_eq!(
            budget.used(),
            got.lease.bytes(),
            "the wire bytes were released"
        );
        drop(got);
        assert_eq!(budget.used(), 0);
        // gzip applied first, then zstd: undone zstd first.
        let stacked = zstd::encode_all(&gzip(json)[..], 3).unwrap();
        let got = read(full(stacked), &headers("gzip, zstd"), 1024, SECOND, &budget)
            .await
            .unwrap();
        assert_eq!(&got.bytes[..], json);
        let err = read(full("x"), &headers("br"), 1024, SECOND, &budget).await;
        assert_eq!(err.err().map(|e| e.status()), Some(415));
    }

    #[test]
    fn stacked_codings_are_bounded() {
        let ok = ["gzip"; MAX_CODINGS].join(", ");
        assert_eq!(codings(&headers(&ok)).unwrap().len(), MAX_CODINGS);
        let too_many = ["gzip"; MAX_CODINGS + 1].join(", ");
        let err = codings(&headers(&too_many)).unwrap_err();
        assert_eq!(err.status(), 415);
        assert!(err.to_string().contains("stacked"), "{err}");
    }

    #[test]
    fn a_bomb_stops_at_the_bound() {
        let budget = Budget::new(64 << 20);
        // 64 MiB of zeros compress to a few KiB.
        let bomb = zstd::encode_all(std::io::repeat(0).take(64 << 20), 3).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let held = Held {
            bytes: Bytes::from(bomb),
            lease: budget.lease(),
        };
        let err = decode(held, &["zstd".into()], 1 << 20, &budget).err();
        assert_eq!(err, Some(BodyError::TooLarge(1 << 20)));
        assert_eq!(budget.used(), 0, "every layer's lease is released");
        let held = Held {
            bytes: Bytes::from_static(b"nope"),
            lease: budget.lease(),
        };
        assert!(decode(held, &["gzip".into()], 10, &budget).is_err());
    }

    #[test]
    fn a_decoded_layer_takes_its_bytes_from_the_budget() {
        // 4 MiB decoded from a few KiB: within the size bound, past a 1 MiB budget.
        let budget = Budget::new(1 << 20);
        let packed = zstd::encode_all(std::io::repeat(b'a').take(4 << 20), 3).unwrap();
        let held = Held {
            lease: budget.lease(),
            bytes: Bytes::from(packed),
        };
        let err = decode(held, &["zstd".into()], 8 << 20, &budget).err();
        assert_eq!(err, Some(BodyError::BudgetExhausted));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn the_wire_bound_applies_before_decoding() {
        let budget = Budget::new(1 << 20);
        let err = read(
            full(vec![b'a'; 2048]),
            &HeaderMap::new(),
            1024,
            SECOND,
            &budget,
        )
        .await;
        assert_eq!(err.err().map(|e| e.status()), Some(413));
        assert_eq!(budget.used(), 0);
    }

    type Chunk = Result<http_body::Frame<Bytes>, std::io::Error>;

    /// A body that arrives in chunks through a channel (no declared length).
    fn streamed() -> (
        futures::channel::mpsc::Sender<Chunk>,
        http_body_util::StreamBody<futures::channel::mpsc::Receiver<Chunk>>,
    ) {
        let (tx, rx) = futures::channel::mpsc::channel(4);
        (tx, http_body_util::StreamBody::new(rx))
    }

    #[tokio::test]
    async fn bytes_count_against_the_budget_while_they_arrive() {
        let budget = Budget::new(1 << 20);
        let (mut tx, body) = streamed();
        let reading = tokio::spawn({
            let budget = budget.clone();
            async move { collect(body, 4 << 20, SECOND * 10, &budget).await }
        });
        use futures::SinkExt;
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![
            b'a';
            600 << 10
        ]))))
        .await
        .unwrap();
        // The first chunk is held before the body is complete...
        let deadline = tokio::time::Instant::now() + SECOND * 5;
        while budget.used() < 600 << 10 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(budget.used() >= 600 << 10, "held: {}", budget.used());
        // ... so a second body cannot take what the first one holds.
        let second = collect(full(vec![b'b'; 600 << 10]), 4 << 20, SECOND, &budget).await;
        assert_eq!(second.err(), Some(BodyError::BudgetExhausted));
        // The first one passes the budget with its next chunk: refused, everything released.
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![
            b'a';
            600 << 10
        ]))))
        .await
        .unwrap();
        let first = reading.await.unwrap();
        assert_eq!(first.err(), Some(BodyError::BudgetExhausted));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_timeout_too_large_to_add_is_no_panic() {
        let budget = Budget::new(1024);
        let got = collect(full("{}"), 1024, Duration::MAX, &budget).await;
        assert_eq!(got.map(|h| h.bytes).ok(), Some(Bytes::from_static(b"{}")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_and_releases_its_bytes() {
        let budget = Budget::new(1 << 20);
        let (mut tx, body) = streamed();
        use futures::SinkExt;
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"{\"in"))))
            .await
            .unwrap();
        let err = collect(body, 1024, SECOND, &budget).await.err();
        assert_eq!(err, Some(BodyError::Timeout(SECOND)));
        assert_eq!(budget.used(), 0);
        drop(tx);
    }
}
