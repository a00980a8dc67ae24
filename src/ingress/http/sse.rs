//! `stream: true`: each upstream frame as a server-sent event (`event: <type>` + `data:` with
//! the frame's bytes verbatim), keepalives while silent, and the HTTP status or the one
//! synthetic `response.failed` a failure becomes (before or after the first byte).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{BODY_CHUNKS, HttpDown, Reply, copy_headers, error_response};
use crate::event;
use crate::pump::RawRun;
use crate::server::json_error;
use crate::turn::engine::{ClientGone, Downstream};

/// `stream: true`: upstream frames as server-sent events.
pub(super) struct SseDown {
    /// Until the head is sent (`Some`), an `error` may still become an HTTP status.
    reply: Option<oneshot::Sender<Reply>>,
    tx: mpsc::Sender<Bytes>,
    rx: Option<mpsc::Receiver<Bytes>>,
    buf: BytesMut,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// An error seen before the first byte: a gateway `error` value, or an upstream `error`
    /// frame with its text.
    pending_error: Option<(Value, Option<Utf8Bytes>)>,
    /// `response.id` of the response streaming, for a synthetic `response.failed`.
    response_id: Option<String>,
    /// Keepalives as `codex.keepalive` events (Codex) rather than comments.
    codex: bool,
    last_write: Instant,
    write_timeout: Duration,
    failed: bool,
}

impl SseDown {
    pub(super) fn new(
        reply: oneshot::Sender<Reply>,
        codex: bool,
        write_timeout: Duration,
    ) -> SseDown {
        let (tx, rx) = mpsc::channel(BODY_CHUNKS);
        SseDown {
            reply: Some(reply),
            tx,
            rx: Some(rx),
            buf: BytesMut::new(),
            headers: Vec::new(),
            pending_error: None,
            response_id: None,
            codex,
            last_write: Instant::now(),
            write_timeout,
            failed: false,
        }
    }

    /// Commits to a 200 event stream.
    fn start(&mut self) -> Result<(), ClientGone> {
        if let (Some(reply), Some(body)) = (self.reply.take(), self.rx.take()) {
            let headers = std::mem::take(&mut self.headers);
            reply
                .send(Reply::Stream { headers, body })
                .map_err(|_| ClientGone)?;
            // An upstream error frame held before the start goes out first, verbatim.
            if let Some((_, Some(raw))) = self.pending_error.take() {
                self.push_event(&raw);
            }
        }
        Ok(())
    }

    fn push_event(&mut self, text: &str) {
        let ty = event::sniff_type(text);
        encode_event(
            &mut self.buf,
            ty.as_deref().map(str::as_bytes),
            text.as_bytes(),
        );
    }

    /// An upstream frame of type `ty` as an event, once the stream has started (one frame of
    /// [`Downstream::feed`] or of a run alike); a `response.created` gives the `response.id` a
    /// later synthetic `response.failed` names, read no further than the id (the upstream
    /// echoes the whole request after it).
    fn push_frame(&mut self, ty: Option<&[u8]>, payload: &[u8]) {
        if ty == Some(b"response.created") {
            self.response_id = std::str::from_utf8(payload)
                .ok()
                .and_then(event::response_id);
        }
        encode_event(&mut self.buf, ty, payload);
    }

    async fn send_buf(&mut self) -> Result<(), ClientGone> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        match tokio::time::timeout(self.write_timeout, self.tx.send(chunk)).await {
            Ok(Ok(())) => {
                self.last_write = Instant::now();
                Ok(())
            }
            // The client is gone, or it stopped reading for `relay.client_write_timeout`.
            _ => Err(ClientGone),
        }
    }

    /// After the first byte a failure is one `response.failed` (`stream_disconnected`).
    async fn fail_stream(&mut self, message: &str) -> Result<(), ClientGone> {
        if self.failed {
            return Ok(());
        }
        self.failed = true;
        let failed = json!({
            "type": "response.failed",
            "response": {
                "id": self.response_id.as_deref().unwrap_or("resp_gateway"),
                "object": "response",
                "status": "failed",
                "output": [],
                "error": {"code": "stream_disconnected", "message": message},
            },
        });
        self.push_event(&failed.to_string());
        self.send_buf().await
    }
}

/// What an event adds to its frame's payload, at most, for a type of up to 48 bytes:
/// `event: `, the type and its line break, `data: `, the line break and the blank line.
const EVENT_OVERHEAD: usize = 7 + 48 + 1 + 6 + 2;

/// Appends one server-sent event to `buf`: `event: <ty>` when the frame has a type, then the
/// frame as `data:` lines, then the blank line that ends the event. A frame is one JSON text
/// and the upstream writes none with a raw line break (JSON escapes them in strings), so the
/// common case is one `data:` line, found by one `memchr` pass; should a frame hold raw line
/// breaks between its tokens, each non-empty line is a `data:` line of its own. A type with a
/// raw line break (a frame that is not JSON: the relay checks UTF-8, not JSON) gets no
/// `event:` line, since its break would end the line and the rest of the type would be read
/// as lines, and events, of their own.
fn encode_event(buf: &mut BytesMut, ty: Option<&[u8]>, text: &[u8]) {
    const EVENT: &[u8] = b"event: ";
    const DATA: &[u8] = b"data: ";
    let ty = ty.filter(|t| memchr::memchr2(b'\n', b'\r', t).is_none());
    buf.reserve(EVENT.len() + ty.map_or(0, <[u8]>::len) + DATA.len() + text.len() + 3);
    if let Some(ty) = ty {
        buf.extend_from_slice(EVENT);
        buf.extend_from_slice(ty);
        buf.extend_from_slice(b"\n");
    }
    let mut start = 0;
    for end in memchr::memchr2_iter(b'\n', b'\r', text).chain([text.len()]) {
        if end > start {
            buf.extend_from_slice(DATA);
            buf.extend_from_slice(&text[start..end]);
            buf.extend_from_slice(b"\n");
        }
        start = end + 1;
    }
    buf.extend_from_slice(b"\n");
}

impl Downstream for SseDown {
    async fn feed(&mut self, text: Utf8Bytes) -> Result<(), ClientGone> {
        let ty = event::sniff_type(&text);
        if self.reply.is_some() && ty.as_deref() == Some("error") {
            // Perhaps the turn's only event: an HTTP status then.
            self.pending_error = Some((super::upstream_error(&text), Some(text)));
            return Ok(());
        }
        self.start()?;
        self.push_frame(ty.as_deref().map(str::as_bytes), text.as_bytes());
        Ok(())
    }

    fn raw_frames(&self) -> bool {
        true
    }

    /// Each payload of the run as an event, its type read raw (a run's frames are written
    /// `type` first with a plain type, their payloads checked UTF-8 when the run was taken).
    /// Before the stream has started, a run holding an `error` goes frame by frame instead:
    /// that error may still become the HTTP status ([`Downstream::feed`]).
    fn try_feed_run(&mut self, run: &RawRun) -> Result<bool, ClientGone> {
        let payloads = || run.payloads.iter().map(|r| &run.frames[r.clone()]);
        if self.reply.is_some() && payloads().any(|p| event::raw_type(p) == Some(b"error")) {
            return Ok(false);
        }
        self.start()?;
        // The run's events in one allocation, not grown event by event: its frames (their
        // headers included) plus each event's lines, for a type of up to 48 bytes.
        self.buf
            .reserve(run.frames.len() + run.payloads.len() * EVENT_OVERHEAD);
        for payload in payloads() {
            self.push_frame(event::raw_type(payload), payload);
        }
        Ok(true)
    }

    async fn flush(&mut self) -> Result<(), ClientGone> {
        self.send_buf().await
    }

    async fn error(&mut self, ev: Value) -> Result<(), ClientGone> {
        if self.reply.is_some() {
            self.pending_error = Some((ev, None));
            return Ok(());
        }
        let message = ev["error"]["message"]
            .as_str()
            .unwrap_or("the upstream failed")
            .to_string();
        self.fail_stream(&message).await
    }

    async fn closed(&mut self, code: u16, reason: &str) {
        let message = format!("upstream closed with {code}: {reason}");
        if self.reply.is_some() {
            self.pending_error = Some((event::error_value(502, "upstream_closed", &message), None));
        } else {
            let _ = self.fail_stream(&message).await;
        }
    }

    fn connected(&mut self, headers: &[(HeaderName, HeaderValue)], reused: bool) {
        self.headers = copy_headers(headers, reused);
    }
}

impl HttpDown for SseDown {
    fn keepalive_due(&self, every: Duration) -> Option<Instant> {
        Some(self.last_write + every)
    }

    async fn keepalive(&mut self) -> Result<(), ClientGone> {
        self.start()?;
        if self.codex {
            // Codex's idle timer ignores comments: it needs an event.
            self.buf.extend_from_slice(
                b"event: codex.keepalive\ndata: {\"type\":\"codex.keepalive\"}\n\n",
            );
        } else {
            self.buf.extend_from_slice(b": keepalive\n\n");
        }
        self.send_buf().await
    }

    async fn finish(mut self) {
        if let Some(reply) = self.reply.take() {
            let response = match self.pending_error.take() {
                Some((v, _)) => error_response(&v),
                // The turn ended with nothing to say (the client went away first).
                None => json_error(
                    StatusCode::BAD_GATEWAY,
                    "stream_incomplete",
                    "the turn ended before any event",
                ),
            };
            let _ = reply.send(Reply::Full(response));
            return;
        }
        let _ = self.send_buf().await;
        // Dropping the sender ends the body.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(ty: Option<&str>, text: &str) -> String {
        let mut buf = BytesMut::new();
        encode_event(&mut buf, ty.map(str::as_bytes), text.as_bytes());
        String::from_utf8(buf.to_vec()).unwrap()
    }

    #[test]
    fn frames_become_one_event_each() {
        let delta = r#"{"type":"response.output_text.delta","delta":"a\nb"}"#;
        assert_eq!(
            encoded(Some("response.output_text.delta"), delta),
            format!("event: response.output_text.delta\ndata: {delta}\n\n")
        );
        // No type: data only.
        assert_eq!(encoded(None, "{}"), "data: {}\n\n");
        // Raw line breaks between tokens: each non-empty line is a data line of its own.
        assert_eq!(
            encoded(Some("x"), "{\r\n\"type\":\"x\",\n\n\"a\":1\r}"),
            "event: x\ndata: {\ndata: \"type\":\"x\",\ndata: \"a\":1\ndata: }\n\n"
        );
        assert_eq!(encoded(None, "\n{}\n"), "data: {}\n\n");
        // Events follow each other in one buffer.
        let mut buf = BytesMut::new();
        encode_event(&mut buf, Some(b"a"), b"{}");
        encode_event(&mut buf, Some(b"b"), b"[]");
        assert_eq!(&buf[..], b"event: a\ndata: {}\n\nevent: b\ndata: []\n\n");
    }

    #[test]
    fn a_type_with_a_line_break_gets_no_event_line() {
        for ty in ["a\nevent: b", "a\rdata: {}", "a\r\n\r\nevent: b"] {
            let frame = format!("{{\"type\":\"{ty}\"}}");
            let out = encoded(Some(ty), &frame);
            assert!(out.starts_with("data: {\"type\":\"a"), "{out:?}");
            assert!(
                !out.contains("event:") || out.contains("data: event:"),
                "{out:?}"
            );
            assert_eq!(out.matches("\n\n").count(), 1, "one event: {out:?}");
            assert!(out.ends_with("\n\n"), "{out:?}");
        }
    }
}
