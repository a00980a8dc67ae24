//! `stream` false or absent: one JSON response built from the terminal event, its `output`
//! filled from the `response.output_item.done` events when the terminal's is empty.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{HttpDown, Reply, copy_headers, error_response};
use crate::event;
use crate::pump::RawRun;
use crate::server::json_error;
use crate::turn::engine::{ClientGone, Downstream};

/// `stream` false or absent: one JSON response built from the terminal event.
pub(super) struct JsonDown {
    reply: oneshot::Sender<Reply>,
    /// `response.output_item.done` items by `output_index`.
    items: Vec<(u64, Value)>,
    collected: usize,
    max: usize,
    /// The collected bytes, held in the gateway-wide budget until the reply is built.
    lease: crate::gateway::BudgetLease,
    terminal: Option<Value>,
    error: Option<Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
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
        let Some(t) = self.terminal.take() else {
            return json_error(
                StatusCode::BAD_GATEWAY,
                "stream_incomplete",
                "the upstream ended the turn without a terminal event",
            );
        };
        match t["type"].as_str().unwrap_or_default() {
            "response.completed" | "response.incomplete" => {
                let mut response = t["response"].clone();
                let empty = response["output"].as_array().is_none_or(Vec::is_empty);
                if empty && !self.items.is_empty() {
                    let mut items = std::mem::take(&mut self.items);
                    items.sort_by_key(|(i, _)| *i);
                    response["output"] =
                        Value::Array(items.into_iter().map(|(_, item)| item).collect());
                }
                let mut r = (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    response.to_string(),
                )
                    .into_response();
                for (name, value) in std::mem::take(&mut self.headers) {
                    r.headers_mut().insert(name, value);
                }
                r
            }
            "response.failed" => {
                let error = t["response"]["error"].clone();
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
            // An upstream `error` frame.
            _ => error_response(&t),
        }
    }
}

impl JsonDown {
    /// Keeps one upstream frame if the body is built from it (an `output_item.done`, the
    /// terminal), within `http.max_response_size` and the gateway-wide budget.
    fn take(&mut self, ty: &[u8], payload: &[u8]) -> Result<(), ClientGone> {
        let item = ty == b"response.output_item.done";
        if !item && !event::is_terminal_type(ty) {
            return Ok(());
        }
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
        let v: Value = serde_json::from_slice(payload).unwrap_or_default();
        if item {
            let index = v["output_index"]
                .as_u64()
                .unwrap_or(self.items.len() as u64);
            self.items.push((index, v["item"].clone()));
        } else {
            self.terminal = Some(v);
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
