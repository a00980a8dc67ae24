//! HTTP request bodies: read within a deadline and a byte bound, then `Content-Encoding`
//! decoded (zstd, gzip, deflate, identity; stacked codings are undone in reverse order) with
//! the same bound on the decoded bytes, so a decompression bomb allocates no more than
//! `http.max_body_size`.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;

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
}

impl BodyError {
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge(_) => 413,
            BodyError::UnsupportedEncoding(_) => 415,
            BodyError::Corrupt(_) | BodyError::Read(_) => 400,
            BodyError::Timeout(_) => 408,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            BodyError::TooLarge(_) => "payload_too_large",
            BodyError::UnsupportedEncoding(_) => "unsupported_content_encoding",
            BodyError::Corrupt(_) => "invalid_body_encoding",
            BodyError::Timeout(_) => "request_timeout",
            BodyError::Read(_) => "invalid_body",
        }
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
                "zstd" | "gzip" | "x-gzip" | "deflate" => out.push(c),
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

/// Reads and decodes a request body: at most `max` bytes on the wire and after decoding,
/// within `timeout`.
pub async fn read<B>(
    body: B,
    headers: &HeaderMap,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let codings = codings(headers)?;
    let limited = http_body_util::Limited::new(body, max);
    let wire = match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => return Err(BodyError::Timeout(timeout)),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(BodyError::TooLarge(max));
        }
        Ok(Err(e)) => return Err(BodyError::Read(e.to_string())),
        Ok(Ok(c)) => c.to_bytes(),
    };
    if codings.is_empty() {
        return Ok(wire);
    }
    // Decoding is CPU work: off the async workers.
    tokio::task::spawn_blocking(move || decode(wire, &codings, max))
        .await
        .map_err(|e| BodyError::Read(e.to_string()))?
}

/// Undoes `codings` (applied in order) with at most `max` bytes out of each layer.
pub fn decode(mut data: Bytes, codings: &[String], max: usize) -> Result<Bytes, BodyError> {
    for coding in codings.iter().rev() {
        let reader: Box<dyn Read> = match coding.as_str() {
            "zstd" => Box::new(
                zstd::stream::read::Decoder::new(&data[..])
                    .map_err(|e| BodyError::Corrupt(e.to_string()))?,
            ),
            "gzip" | "x-gzip" => Box::new(flate2::read::GzDecoder::new(&data[..])),
            // HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2).
            _ => Box::new(flate2::read::ZlibDecoder::new(&data[..])),
        };
        let mut out = Vec::new();
        // One byte past the bound tells "too large" from "exactly the bound".
        reader
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| BodyError::Corrupt(e.to_string()))?;
        if out.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        data = Bytes::from(out);
    }
    Ok(data)
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

    #[tokio::test]
    async fn codings_decode_in_reverse_order_within_the_bound() {
        let json = br#"{"model":"m","input":"hi"}"#;
        let z = zstd::encode_all(&json[..], 3).unwrap();
        let body = http_body_util::Full::new(Bytes::from(z.clone()));
        let got = read(body, &headers("zstd"), 1024, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(&got[..], json);
        // gzip applied first, then zstd: undone zstd first.
        let stacked = zstd::encode_all(&gzip(json)[..], 3).unwrap();
        let body = http_body_util::Full::new(Bytes::from(stacked));
        let got = read(body, &headers("gzip, zstd"), 1024, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(&got[..], json);
        let body = http_body_util::Full::new(Bytes::from_static(b"x"));
        assert_eq!(
            read(body, &headers("br"), 1024, Duration::from_secs(1))
                .await
                .unwrap_err()
                .status(),
            415
        );
    }

    #[test]
    fn a_bomb_stops_at_the_bound() {
        // 64 MiB of zeros compress to a few KiB.
        let bomb = zstd::encode_all(std::io::repeat(0).take(64 << 20), 3).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let err = decode(Bytes::from(bomb), &["zstd".into()], 1 << 20).unwrap_err();
        assert_eq!(err, BodyError::TooLarge(1 << 20));
        assert!(decode(Bytes::from_static(b"nope"), &["gzip".into()], 10).is_err());
    }

    #[tokio::test]
    async fn the_wire_bound_applies_before_decoding() {
        let body = http_body_util::Full::new(Bytes::from(vec![b'a'; 2048]));
        let err = read(body, &HeaderMap::new(), 1024, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.status(), 413);
    }
}
