//! The load generator over the HTTP ingress: a `POST` per turn, answered with server-sent
//! events (`--http`) or one JSON body (`--http-json`), each session on one HTTP/1.1
//! connection.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::Ctx;
use super::stats::Stats;
use crate::client::create_body;
use crate::event;

/// The longest server-sent event the load generator holds while it arrives (tungstenite's
/// default largest WebSocket message, the WebSocket client's bound).
const MAX_SSE_EVENT: usize = 64 << 20;

/// The load generator's reader of a server-sent event stream: body chunks in, each complete
/// event's `data:` line out, however events fall into chunks.
#[derive(Default)]
struct SseReader {
    /// Bytes of events not yet complete (an event may span chunks, a character too).
    pending: Vec<u8>,
    /// How much of `pending` was searched for an event's end without finding one (less one
    /// byte: the `\n\n` may straddle two chunks), so a long event arriving in many chunks
    /// is searched once, not again from its start at every chunk.
    searched: usize,
}

impl SseReader {
    /// Adds a chunk and hands `on_event` the `data:` line of every event it completes; the
    /// first error `on_event` returns, or an event still arriving past [`MAX_SSE_EVENT`]
    /// (bounded as a WebSocket message is), ends the stream.
    fn push(
        &mut self,
        chunk: &[u8],
        mut on_event: impl FnMut(&str) -> Result<(), String>,
    ) -> Result<(), String> {
        self.pending.extend_from_slice(chunk);
        // Every complete event of the buffer, then the rest moved to its front once (a drain
        // per event made the load generator, not the gateway, the bottleneck).
        let mut at = 0;
        while let Some(len) = memchr::memmem::find(&self.pending[at.max(self.searched)..], b"\n\n")
        {
            let end = at.max(self.searched) + len;
            let block = String::from_utf8_lossy(&self.pending[at..end]);
            at = end + 2;
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                on_event(data)?;
            }
        }
        self.pending.drain(..at);
        self.searched = self.pending.len().saturating_sub(1);
        if self.pending.len() > MAX_SSE_EVENT {
            return Err(format!(
                "an SSE event longer than {} MiB",
                MAX_SSE_EVENT >> 20
            ));
        }
        Ok(())
    }
}

pub(super) type HttpSender =
    hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

impl Ctx {
    /// One turn over HTTP: a streamed `POST`; returns the completed response id.
    async fn http_turn(
        &self,
        sender: &mut HttpSender,
        conversation: &str,
        prev: Option<&str>,
        stats: &mut Stats,
    ) -> Result<Option<String>, String> {
        use http_body_util::BodyExt;
        let text = self.load_text();
        let mut body = create_body(Some(conversation), &text, prev);
        if let Some(o) = body.as_object_mut() {
            o.remove("type");
            if self.cfg.http_json {
                o.insert("stream".into(), Value::Bool(false));
            }
        }
        let uri: http::Uri = self.cfg.url.parse().map_err(|e| format!("{e}"))?;
        let mut req = http::Request::post(uri.path())
            .header("host", uri.authority().map(|a| a.as_str()).unwrap_or("gw"))
            .header("content-type", "application/json")
            .header("originator", "wsgate_loadgen")
            .header("session-id", conversation);
        if let Some(k) = &self.cfg.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .map_err(|e| e.to_string())?;
        let sent = Instant::now();
        let resp = tokio::time::timeout(Duration::from_secs(120), sender.send_request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("HTTP {}", resp.status()));
        }
        if self.cfg.http_json {
            return Self::json_reply(resp.into_body(), sent, stats).await;
        }
        let mut body = resp.into_body();
        let mut first = true;
        let mut reader = SseReader::default();
        let mut id = None;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(120), body.frame())
                .await
                .map_err(|_| "timed out".to_string())?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| e.to_string())?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if first {
                first = false;
                stats.first_event(sent);
            }
            reader.push(&data, |data| {
                stats.event(data);
                match event::sniff_type(data).as_deref() {
                    Some("response.completed") => id = event::response_id(data),
                    Some(t) if event::is_terminal(t) => {
                        return Err(data.chars().take(200).collect());
                    }
                    _ => {}
                }
                Ok(())
            })?;
        }
        id.map(Some)
            .ok_or_else(|| "the stream ended without response.completed".into())
    }

    /// A non-streaming reply: the whole body (at most [`MAX_SSE_EVENT`] bytes, within 120 s),
    /// a completed response; returns its id.
    async fn json_reply(
        body: hyper::body::Incoming,
        sent: Instant,
        stats: &mut Stats,
    ) -> Result<Option<String>, String> {
        use http_body_util::BodyExt;
        let whole = tokio::time::timeout(
            Duration::from_secs(120),
            http_body_util::Limited::new(body, MAX_SSE_EVENT).collect(),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
        stats.first_event(sent);
        stats.event("");
        let v: Value = serde_json::from_slice(&whole).map_err(|e| e.to_string())?;
        if v["status"] != "completed" {
            return Err(String::from_utf8_lossy(&whole).chars().take(200).collect());
        }
        Ok(v["id"].as_str().map(str::to_string))
    }

    async fn http_connect(&self) -> Result<HttpSender, String> {
        let _permit = self.connects.acquire().await;
        let uri: http::Uri = self.cfg.url.parse().map_err(|e| format!("{e}"))?;
        let host = uri.host().unwrap_or("127.0.0.1").to_string();
        let port = uri.port_u16().unwrap_or(80);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// An HTTP session's connection: one kept-alive HTTP/1.1 connection, a `POST` per turn.
impl super::Conn for HttpSender {
    type Error = String;

    async fn open(ctx: &Ctx, _conversation: &str) -> Result<HttpSender, String> {
        ctx.http_connect().await
    }

    async fn turn(
        &mut self,
        ctx: &Ctx,
        conversation: &str,
        prev: Option<&str>,
        stats: &mut Stats,
    ) -> Result<Option<String>, String> {
        ctx.http_turn(self, conversation, prev, stats).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Split at every byte (one chunk boundary) or into single bytes, a stream reads as the
    /// same events: `data:` lines only, comments and blank events skipped.
    #[test]
    fn sse_events_are_read_whatever_the_chunks() {
        let stream = "event: a\ndata: {\"x\":\"\u{e9}\"}\n\n: keepalive\n\ndata: {}\n\nevent: b\ndata: [1]\n\n";
        let read = |chunks: &[&[u8]]| {
            let mut r = SseReader::default();
            let mut events = Vec::new();
            for c in chunks {
                r.push(c, |d| {
                    events.push(d.to_string());
                    Ok(())
                })
                .unwrap();
            }
            assert!(r.pending.is_empty(), "nothing left over");
            events
        };
        let whole = read(&[stream.as_bytes()]);
        assert_eq!(whole, ["{\"x\":\"\u{e9}\"}", "{}", "[1]"]);
        let b = stream.as_bytes();
        for cut in 1..b.len() {
            assert_eq!(read(&[&b[..cut], &b[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(read(&bytes), whole, "byte by byte");
        // The handler's error ends the stream.
        let mut r = SseReader::default();
        assert_eq!(
            r.push(stream.as_bytes(), |_| Err("stop".into())),
            Err("stop".into())
        );
    }
}
