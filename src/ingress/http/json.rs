//! `stream` false or absent: one JSON response built from the terminal event, its `output`
//! filled from the `response.output_item.done` events when the terminal's is empty.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode, header};
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{HttpDown, Reply, copy_headers, error_response};
use crate::event::{self, scan};
use crate::pump::RawRun;
use crate::server::json_error;
use crate::turn::engine::{ClientGone, Downstream};

/// `stream` false or absent: one JSON response built from the terminal event.
pub(super) struct JsonDown {
    reply: oneshot::Sender<Reply>,
    /// The `response.output_item.done` frames, verbatim: parsed only if the terminal's
    /// `output` is empty.
    items: Vec<String>,
    collected: usize,
    max: usize,
    /// The collected bytes, held in the gateway-wide budget until the reply is built.
    lease: crate::gateway::BudgetLease,
    /// The terminal frame, verbatim, and its kind.
    terminal: Option<(String, Terminal)>,
    error: Option<Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// The terminal's kind, as far as the body is concerned.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Terminal {
    /// `response.completed` or `response.incomplete`: the response is the body.
    Response,
    /// `response.failed`: its error, with a status from its code.
    Failed,
    /// An upstream `error` event.
    Error,
}

impl JsonDown {
    pub(super) fn new(
        reply: oneshot::Sender<Reply>,
        max: usize,
        lease: crate::gateway::BudgetLease,
    ) -> JsonDown {
        JsonDown {
            reply,
            items: Vec::new(),
            collected: 0,
            max,
            lease,
            terminal: None,
            error: None,
            headers: Vec::new(),
        }
    }

    fn build(&mut self) -> Response {
        if let Some(e) = self.error.take() {
            return error_response(&e);
        }
        let Some((t, kind)) = self.terminal.take() else {
            return json_error(
                StatusCode::BAD_GATEWAY,
                "stream_incomplete",
                "the upstream ended the turn without a terminal event",
            );
        };
        match kind {
            Terminal::Response => match self.response_body(&t) {
                Some(body) => {
                    let mut r = (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                        .into_response();
                    for (name, value) in std::mem::take(&mut self.headers) {
                        r.headers_mut().insert(name, value);
                    }
                    r
                }
                None => json_error(
                    StatusCode::BAD_GATEWAY,
                    "invalid_upstream_response",
                    "the upstream's terminal event holds no response object",
                ),
            },
            Terminal::Failed => {
                let error = scan::find(&t, &["response", "error"])
                    .map(super::upstream_error_object)
                    .unwrap_or_default();
                let code = error["code"].as_str().unwrap_or_default();
                let status = match code {
                    c if c.contains("rate_limit")
                        || c.contains("usage_limit")
                        || c.contains("quota") =>
                    {
                        429
                    }
                    "invalid_api_key" | "token_expired" | "token_invalidated" => 401,
                    "invalid_request_error" | "context_length_exceeded" | "invalid_prompt" => 400,
                    _ => 502,
                };
                error_response(&json!({"status": status, "error": error}))
            }
            Terminal::Error => error_response(&super::upstream_error(&t)),
        }
    }

    /// The body of a completed (or incomplete) response: the terminal's `response` as the
    /// upstream wrote it (checked to be one JSON object) when its `output` holds items or
    /// none were collected; otherwise the same with the collected items, in `output_index`
    /// order, spliced in as its `output` (each item as written: nothing is parsed into a
    /// tree, which would cost many times the bytes the budget counted). `None` when the
    /// terminal holds no `response` object.
    fn response_body(&mut self, t: &str) -> Option<String> {
        let raw = scan::find(t, &["response"]).filter(|r| r.starts_with('{'))?;
        serde_json::from_str::<IgnoredAny>(raw).ok()?;
        let filled = scan::find(raw, &["output"])
            .is_some_and(|o| o.starts_with('[') && !o[1..].trim_start().starts_with(']'));
        if filled || self.items.is_empty() {
            return Some(raw.to_string());
        }
        // The `output` member to fill (its last writing, as a parsed object has it) and the
        // object's end.
        let mut members = scan::members(raw);
        let mut output = None;
        while let Some((key, at)) = members.next_key() {
            let value = members.value(at)?;
            if key == b"output" {
                output = Some((at, value));
            }
        }
        let close = members.end()? - 1;
        let mut items: Vec<(u64, &str)> = self
            .items
            .iter()
            .enumerate()
            .map(|(n, frame)| {
                let index = scan::find(frame, &["output_index"]).and_then(scan::unsigned);
                let item = scan::find(frame, &["item"])
                    .filter(|i| serde_json::from_str::<IgnoredAny>(i).is_ok())
                    .unwrap_or("null");
                (index.unwrap_or(n as u64), item)
            })
            .collect();
        items.sort_by_key(|(i, _)| *i);
        let len = items.iter().map(|(_, i)| i.len() + 1).sum::<usize>();
        let mut body = String::with_capacity(raw.len() + len + 16);
        let rest = match output {
            Some((at, value)) => {
                body.push_str(&raw[..at]);
                &raw[at + value.len()..]
            }
            None => {
                body.push_str(&raw[..close]);
                if !raw[1..close].trim().is_empty() {
                    body.push(',');
                }
                body.push_str("\"output\":");
                &raw[close..]
            }
        };
        body.push('[');
        for (n, (_, item)) in items.iter().enumerate() {
            if n > 0 {
                body.push(',');
            }
            body.push_str(item);
        }
        body.push(']');
        body.push_str(rest);
        Some(body)
    }

    /// Keeps one upstream frame if the body is built from it (an `output_item.done`, the
    /// terminal), within `http.max_response_size` and the gateway-wide budget.
    fn take(&mut self, ty: &[u8], payload: &[u8]) -> Result<(), ClientGone> {
        let kind = match ty {
            b"response.output_item.done" => None,
            b"response.completed" | b"response.incomplete" => Some(Terminal::Response),
            b"response.failed" => Some(Terminal::Failed),
            b"error" => Some(Terminal::Error),
            _ => return Ok(()),
        };
        self.collected += payload.len();
        if self.collected > self.max {
            self.error = Some(event::error_value(
                502,
                "response_too_large",
                "the response is larger than http.max_response_size; use stream: true",
            ));
            return Err(ClientGone);
        }
        if !self.lease.grow_to(self.collected) {
            crate::metrics::error("buffer_budget_exhausted");
            self.error = Some(event::error_value(
                503,
                "buffer_budget_exhausted",
                "the gateway's buffer budget is exhausted (limits.max_buffered_bytes); try again",
            ));
            return Err(ClientGone);
        }
        // Upstream frames were checked to be UTF-8 when read: this copies, never replaces.
        let text = String::from_utf8_lossy(payload).into_owned();
        match kind {
            None => self.items.push(text),
            Some(kind) => self.terminal = Some((text, kind)),
        }
        Ok(())
    }
}

impl Downstream for JsonDown {
    async fn feed(&mut self, text: Utf8Bytes) -> Result<(), ClientGone> {
        let ty = event::sniff_type(&text).unwrap_or_default();
        self.take(ty.as_bytes(), text.as_bytes())
    }

    fn raw_frames(&self) -> bool {
        true
    }

    /// The run's frames one by one through [`JsonDown::take`], their types read raw (a run's
    /// frames are written `type` first with a plain type): most are deltas, skipped without
    /// a decode; the body is only built at the end, so nothing has to wait.
    fn try_feed_run(&mut self, run: &RawRun) -> Result<bool, ClientGone> {
        for r in &run.payloads {
            let payload = &run.frames[r.clone()];
            match event::raw_type(payload) {
                Some(ty) => self.take(ty, payload)?,
                // Not in a run (the run's filter takes only frames with a raw type); read as
                // a frame fed alone would be, should one be.
                None => {
                    let text = std::str::from_utf8(payload).unwrap_or_default();
                    let ty = event::sniff_type(text).unwrap_or_default();
                    self.take(ty.as_bytes(), payload)?;
                }
            }
        }
        Ok(true)
    }

    async fn flush(&mut self) -> Result<(), ClientGone> {
        Ok(())
    }

    async fn error(&mut self, ev: Value) -> Result<(), ClientGone> {
        self.error = Some(ev);
        Ok(())
    }

    async fn closed(&mut self, code: u16, reason: &str) {
        self.error = Some(event::error_value(
            502,
            "upstream_closed",
            &format!("upstream closed with {code}: {reason}"),
        ));
    }

    fn connected(&mut self, headers: &[(HeaderName, HeaderValue)], reused: bool) {
        self.headers = copy_headers(headers, reused);
    }
}

impl HttpDown for JsonDown {
    fn keepalive_due(&self, _every: Duration) -> Option<Instant> {
        None
    }

    async fn keepalive(&mut self) -> Result<(), ClientGone> {
        Ok(())
    }

    async fn finish(mut self) {
        let response = self.build();
        let _ = self.reply.send(Reply::Full(response));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body's status, JSON and text after the upstream `frames` were taken, in order.
    async fn body_of(frames: &[&str]) -> (StatusCode, Value, String) {
        let (reply, _) = oneshot::channel();
        let mut d = JsonDown::new(reply, 1 << 20, crate::gateway::Budget::new(1 << 20).lease());
        for f in frames {
            let ty = event::sniff_type(f).unwrap_or_default();
            d.take(ty.as_bytes(), f.as_bytes()).unwrap();
        }
        let r = d.build();
        let status = r.status();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        (status, serde_json::from_str(&text).unwrap(), text)
    }

    /// The body as the whole terminal parsed into a value made it (the reading before the
    /// verbatim path), for a terminal whose `response` is an object.
    fn reference(frames: &[&str]) -> Value {
        let t: Value = serde_json::from_str(frames.last().unwrap()).unwrap();
        let mut response = t["response"].clone();
        let empty = response["output"].as_array().is_none_or(Vec::is_empty);
        let mut items: Vec<(u64, Value)> = frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str::<Value>(f).unwrap())
            .filter(|v| v["type"] == "response.output_item.done")
            .enumerate()
            .map(|(n, v)| {
                (
                    v["output_index"].as_u64().unwrap_or(n as u64),
                    v["item"].clone(),
                )
            })
            .collect();
        if empty && !items.is_empty() {
            items.sort_by_key(|(i, _)| *i);
            response["output"] = items.into_iter().map(|(_, item)| item).collect();
        }
        response
    }

    const ITEM0: &str = r#"{"type":"response.output_item.done","output_index":0,"item":{"id":"m0","content":[{"text":"a"}]}}"#;
    const ITEM1: &str =
        r#"{"type":"response.output_item.done","output_index":1,"item":{"id":"m1"}}"#;
    const DELTA: &str = r#"{"type":"response.output_text.delta","delta":"a"}"#;

    #[tokio::test]
    async fn a_response_with_output_is_sent_as_the_upstream_wrote_it() {
        let t = r#"{"type":"response.completed","response":{"id":"r1","z":1,"a":{"b":[1, 2]},"output":[{"id":"m0"}]},"sequence_number":9}"#;
        let (status, _, text) = body_of(&[ITEM0, DELTA, t]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            text, r#"{"id":"r1","z":1,"a":{"b":[1, 2]},"output":[{"id":"m0"}]}"#,
            "verbatim: its key order and spacing kept"
        );
    }

    #[tokio::test]
    async fn an_empty_output_is_filled_from_the_items_in_index_order() {
        let t = r#"{"type":"response.incomplete","response":{"id":"r1","output":[ ],"status":"incomplete"}}"#;
        let (status, v, _) = body_of(&[ITEM1, DELTA, ITEM0, t]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            v["output"],
            json!([{"id": "m0", "content": [{"text": "a"}]}, {"id": "m1"}])
        );
        assert_eq!(v["status"], "incomplete");
    }

    /// Whatever the terminal's shape, the body is what parsing the whole terminal made of it.
    #[tokio::test]
    async fn bodies_are_what_the_parsed_terminal_made() {
        let terminals = [
            r#"{"type":"response.completed","response":{"id":"r","output":[]}}"#,
            r#"{"type":"response.completed","response":{"id":"r","output":null}}"#,
            r#"{"type":"response.completed","response":{"id":"r","output":{"a":1}}}"#,
            r#"{"type":"response.completed","response":{"id":"r"}}"#,
            r#"{"type":"response.completed","response":{"id":"r","output":[1]}}"#,
            r#"{"type":"response.completed","response":{"id":"r","output":"[x]"}}"#,
            r#"{"type":"response.completed","response":{"id":"r\"}","output":[],"x":"\u00e9"}}"#,
            r#"{"type":"response.completed", "response" : { "output" : [ ] , "id":"r" } }"#,
        ];
        for t in terminals {
            for frames in [vec![t], vec![ITEM0, t], vec![ITEM1, DELTA, ITEM0, t]] {
                let (status, v, _) = body_of(&frames).await;
                assert_eq!(status, StatusCode::OK, "{frames:?}");
                assert_eq!(v, reference(&frames), "{frames:?}");
            }
        }
    }

    /// Items are spliced in as written: a missing `output` is added at the end (after a
    /// comma only when the object has members), an item frame whose `item` is not JSON
    /// stands as `null`, and the last writing of a twice-written empty `output` is the one
    /// filled.
    #[tokio::test]
    async fn items_are_spliced_in_as_written() {
        let spaced = r#"{"type":"response.output_item.done","output_index":0,"item": { "id" : "m0" , "n":[1, 2] }}"#;
        let (_, _, text) =
            body_of(&[spaced, r#"{"type":"response.completed","response":{}}"#]).await;
        assert_eq!(text, r#"{"output":[{ "id" : "m0" , "n":[1, 2] }]}"#);
        let (_, _, text) = body_of(&[
            spaced,
            r#"{"type":"response.completed","response":{ "id":"r" }}"#,
        ])
        .await;
        assert_eq!(
            text,
            r#"{ "id":"r" ,"output":[{ "id" : "m0" , "n":[1, 2] }]}"#
        );
        let broken = r#"{"type":"response.output_item.done","output_index":1,"item":{"id":}"#;
        let t = r#"{"type":"response.completed","response":{"output":[],"id":"r","output":null}}"#;
        let (status, v, _) = body_of(&[broken, ITEM0, t]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            v["output"],
            json!([{"id": "m0", "content": [{"text": "a"}]}, null])
        );
    }

    /// An upstream error too long to parse (no real one is) is answered with its status and
    /// code, not parsed into a tree many times its size.
    #[tokio::test]
    async fn an_error_too_long_to_parse_keeps_its_status_and_code() {
        let junk = vec!["0"; 40_000].join(",");
        let failed = format!(
            r#"{{"type":"response.failed","response":{{"id":"r","error":{{"code":"rate_limit_exceeded","message":"m","junk":[{junk}]}}}}}}"#
        );
        let (status, v, _) = body_of(&[&failed]).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(
            v["error"]["message"],
            "the upstream's error was too large to relay"
        );
        let error = format!(
            r#"{{"type":"error","status":503,"error":{{"code":"overloaded","junk":[{junk}]}}}}"#
        );
        let (status, v, _) = body_of(&[&error]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["error"]["code"], "overloaded");
        // Short ones are answered as they were.
        let (status, v, _) =
            body_of(&[r#"{"type":"error","status":400,"error":{"code":"bad","message":"why"}}"#])
                .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["message"], "why");
    }

    /// A terminal without a `response` object, or not JSON, is a 502 (when the whole
    /// terminal was parsed into a value, filling a string's `output` panicked, and a null
    /// `response` was answered 200 with the body `null`).
    #[tokio::test]
    async fn a_response_that_is_not_an_object_is_a_bad_gateway() {
        for t in [
            r#"{"type":"response.completed","response":"oops"}"#,
            r#"{"type":"response.completed","response":null}"#,
            r#"{"type":"response.completed"}"#,
            r#"{"type":"response.completed","response":[1]}"#,
            r#"{"type":"response.completed","response":{"id":"r","output":[1}}"#,
            r#"{"type":"response.completed","response":{"id":"r""#,
        ] {
            for frames in [vec![t], vec![ITEM0, t]] {
                let (status, v, _) = body_of(&frames).await;
                assert_eq!(status, StatusCode::BAD_GATEWAY, "{frames:?}");
                assert_eq!(
                    v["error"]["code"], "invalid_upstream_response",
                    "{frames:?}"
                );
            }
        }
    }
}
