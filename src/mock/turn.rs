//! One mock connection's answers: its state (response cache, cached-token growth, queued
//! creates), side events answered at once, and a create's turn streamed as events (text,
//! tool calls, failures, limits, the `[[mock: ...]]` hooks).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::SinkExt;
use futures::stream::SplitSink;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::script::{self, CloseKind, Directives, Fixture, FixtureName, Phase, Vars};
use super::stamped::{self, StampedDeltas};
use super::{Limit, MockState};

/// Whether a client frame is a `response.create`.
pub(super) fn script_is_create(text: &str) -> bool {
    crate::event::sniff_type(text).is_some_and(|t| t == crate::event::RESPONSE_CREATE)
}

/// Per-connection upstream state.
pub(super) struct ConnState {
    pub(super) id: u64,
    /// The `authorization` the connection was opened with (its account).
    pub(super) authorization: String,
    /// Frames sent (shared with the connection's record).
    pub(super) sent: Arc<Mutex<Vec<String>>>,
    pub(super) next: u64,
    /// `(response id, context tokens)` of the last responses, newest last.
    pub(super) cache: VecDeque<(String, u64)>,
    /// Context tokens of the last request served on this connection (the prompt-cache model).
    pub(super) last_context: u64,
    /// Set to stop the reader (the connection goes deaf: no pongs).
    pub(super) deaf: Arc<std::sync::atomic::AtomicBool>,
}

/// Client events of one connection.
pub(super) struct Inbox {
    /// In arrival order.
    pub(super) rx: mpsc::Receiver<String>,
    /// Creates that arrived during a turn (served after it, in order).
    pub(super) backlog: VecDeque<String>,
}

/// The answer to a client event other than `response.create`: nothing for
/// `response.processed`, an `error` (status 400) for a steer (the mock's model cannot be
/// steered) and for unknown types.
fn side_answer(text: &str) -> Option<Value> {
    let ty = crate::event::sniff_type(text).unwrap_or_default();
    match &*ty {
        "response.processed" => None,
        "response.steer" => Some(crate::event::error_value(
            400,
            "steering_not_supported",
            "mock: this model cannot be steered",
        )),
        other => Some(crate::event::error_value(
            400,
            "unknown_event_type",
            &format!("mock: unknown event type `{other}`"),
        )),
    }
}

pub(super) enum Outcome {
    Continue,
    Close(u16),
    /// Close (with a code, or by dropping TCP) after the connection idled this long.
    CloseLater(CloseKind, Duration),
    /// Send an unsolicited event after the connection idled this long.
    JunkLater(Duration),
    Eof,
    /// The gateway went away.
    Gone,
}

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Sends events with increasing `sequence_number`. Before each, it answers the client events
/// other than creates that arrived meanwhile (creates wait in the backlog).
pub(super) struct Emitter<'a, S> {
    pub(super) sink: &'a mut Sink<S>,
    pub(super) inbox: &'a mut mpsc::Receiver<String>,
    pub(super) backlog: &'a mut VecDeque<String>,
    pub(super) sent: Arc<Mutex<Vec<String>>>,
    /// Benchmark mode: batch writes.
    pub(super) batch: bool,
    pub(super) unflushed: usize,
    pub(super) bytes_sent: &'a AtomicU64,
    pub(super) seq: u64,
    pub(super) pending: &'a AtomicUsize,
    pub(super) terminal_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Emitter<'_, S> {
    async fn emit(&mut self, mut v: Value) -> bool {
        if let Some(o) = v.as_object_mut()
            && o.get("type").and_then(Value::as_str) != Some("error")
        {
            o.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq += 1;
        if crate::event::is_terminal(v.get("type").and_then(Value::as_str).unwrap_or("")) {
            // The turn is over before the client can possibly send the next create.
            self.end();
        }
        let terminal =
            crate::event::is_terminal(v.get("type").and_then(Value::as_str).unwrap_or(""));
        self.send_text(type_first(&v), terminal).await
    }

    /// Sends an event already rendered with `self.seq` as its `sequence_number`.
    async fn emit_rendered(&mut self, text: String, terminal: bool) -> bool {
        self.seq += 1;
        if terminal {
            self.end();
        }
        self.send_text(text, terminal).await
    }

    /// Writes one frame; in batch mode flushes every 64 frames and on `flush`.
    async fn send_text(&mut self, text: String, flush: bool) -> bool {
        while let Ok(t) = self.inbox.try_recv() {
            if script_is_create(&t) {
                self.backlog.push_back(t);
            } else if let Some(answer) = side_answer(&t)
                && self
                    .sink
                    .send(Message::text(answer.to_string()))
                    .await
                    .is_err()
            {
                return false;
            }
        }
        let len = text.len() as u64;
        self.bytes_sent.fetch_add(len, Ordering::AcqRel);
        if let Ok(mut sent) = self.sent.lock()
            && sent.len() < 4096
        {
            sent.push(text.clone());
        }
        if !self.batch {
            return self.sink.send(Message::text(text)).await.is_ok();
        }
        if self.sink.feed(Message::text(text)).await.is_err() {
            return false;
        }
        self.unflushed += 1;
        if flush || self.unflushed >= 64 {
            self.unflushed = 0;
            return self.sink.flush().await.is_ok();
        }
        true
    }

    /// Writes out what batch mode queued, before the mock goes quiet (a pause between
    /// events): a real upstream sends what it has before it waits.
    async fn flush_before_pause(&mut self) -> bool {
        if self.unflushed == 0 {
            return true;
        }
        self.unflushed = 0;
        self.sink.flush().await.is_ok()
    }

    fn end(&mut self) {
        if !self.terminal_sent {
            self.terminal_sent = true;
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A create on a rate-limited account: optionally `response.created` (and deltas), then the
/// limit as an `error` (status 429) or a `response.failed`.
async fn answer_limited<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut ConnState,
    limit: Limit,
    em: &mut Emitter<'_, S>,
) -> bool {
    conn.next += 1;
    let id = format!("resp_{}_{}", conn.id, conn.next);
    let mut ok = true;
    if limit.created_first || limit.after_deltas > 0 {
        ok = ok && em.emit(json!({"type": "response.created", "response": {"id": id, "status": "in_progress"}})).await;
        ok = ok
            && em
                .emit(json!({"type": "codex.rate_limits", "rate_limits": {"limit_reached": true}}))
                .await;
    }
    for i in 0..limit.after_deltas {
        ok = ok && em
            .emit(
                json!({"type": "response.output_text.delta", "delta": format!("{id} delta {i}. ")}),
            )
            .await;
    }
    let error = json!({
        "type": "usage_limit_reached",
        "code": "usage_limit_reached",
        "message": "mock: the usage limit has been reached",
        "resets_in_seconds": limit.resets_in_seconds,
    });
    let last = if limit.failed {
        json!({"type": "response.failed", "response": {"id": id, "status": "failed", "error": error}})
    } else {
        json!({"type": "error", "status": 429, "error": error})
    };
    ok && em.emit(last).await
}

fn tokens(text_len: usize) -> u64 {
    (text_len as u64 / 4).max(1)
}

pub(super) async fn serve_frame<S: AsyncRead + AsyncWrite + Unpin>(
    state: &MockState,
    conn: &mut ConnState,
    inbox: &mut Inbox,
    pending: &AtomicUsize,
    text: &str,
    sink: &mut Sink<S>,
) -> Outcome {
    let is_create = script_is_create(text);
    let mut em = Emitter {
        sink,
        inbox: &mut inbox.rx,
        backlog: &mut inbox.backlog,
        sent: conn.sent.clone(),
        batch: state.config.speed,
        unflushed: 0,
        bytes_sent: &state.bytes_sent,
        seq: 0,
        pending,
        terminal_sent: !is_create,
    };
    let outcome = serve_create(state, conn, text, &mut em).await;
    em.end();
    outcome
}

async fn serve_create<S: AsyncRead + AsyncWrite + Unpin>(
    state: &MockState,
    conn: &mut ConnState,
    text: &str,
    em: &mut Emitter<'_, S>,
) -> Outcome {
    let body: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let err = crate::event::error_value(400, "invalid_json", &format!("mock: {e}"));
            return if em.emit(err).await {
                Outcome::Continue
            } else {
                Outcome::Gone
            };
        }
    };
    if body.get("type").and_then(Value::as_str) != Some("response.create") {
        if let Some(answer) = side_answer(text)
            && !em.emit(answer).await
        {
            return Outcome::Gone;
        }
        return Outcome::Continue;
    }
    let d = Directives::parse(&script::last_user_text(&body));
    let limit = state
        .limited
        .lock()
        .ok()
        .and_then(|l| l.get(&conn.authorization).copied());
    if let Some(limit) = limit {
        return if answer_limited(conn, limit, em).await {
            Outcome::Continue
        } else {
            Outcome::Gone
        };
    }
    let close_at = |p: Phase| match d.close {
        Some((CloseKind::Code(c), phase)) if phase == p => Some(Outcome::Close(c)),
        Some((CloseKind::Eof, phase)) if phase == p => Some(Outcome::Eof),
        _ => None,
    };
    if let Some(o) = close_at(Phase::Before) {
        return o;
    }
    if conn.next > 0
        && let Some(o) = close_at(Phase::Stale)
    {
        return o;
    }
    let prev = body
        .get("previous_response_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let mut parent_context = 0;
    if let Some(p) = &prev {
        match conn.cache.iter().find(|(id, _)| id == p) {
            Some((_, ctx)) => parent_context = *ctx,
            None => {
                let f = Fixture::load(FixtureName::PreviousResponseNotFound);
                let ok = em
                    .emit(f.render(0, &Vars(vec![("previous_response_id", json!(p))])))
                    .await;
                return if ok { Outcome::Continue } else { Outcome::Gone };
            }
        }
    }
    if !d.delay.is_zero() {
        tokio::time::sleep(d.delay).await;
    }
    if conn.next == 0 && !state.config.fresh_cost.is_zero() {
        // A cold connection: the upstream has to set it up and load the prompt.
        tokio::time::sleep(state.config.fresh_cost).await;
    }
    conn.next += 1;
    let id = format!("resp_{}_{}", conn.id, conn.next);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string();
    let input_len = body.get("input").map(|i| i.to_string().len()).unwrap_or(0);
    let input_tokens = parent_context + tokens(input_len);
    let cached = if conn.last_context > 0 {
        conn.last_context.min(input_tokens)
    } else {
        0
    };
    let generate = body.get("generate").and_then(Value::as_bool) != Some(false);

    let base = |usage: Value| -> Vec<(&'static str, Value)> {
        vec![
            ("id", json!(id)),
            ("model", json!(model)),
            (
                "previous_response_id",
                prev.as_ref().map(|p| json!(p)).unwrap_or(Value::Null),
            ),
            ("usage", usage),
        ]
    };
    let usage = |output: u64| {
        json!({
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output,
        })
    };

    let mut output_tokens = 0;
    let sent = if !generate {
        let f = Fixture::load(FixtureName::Prewarm);
        let vars = Vars(base(usage(0)));
        let mut ok = true;
        for i in 0..f.events().len() {
            ok = ok && em.emit(f.render(i, &vars)).await;
        }
        ok
    } else if let Some((status, code)) = &d.error {
        let message = if d.too_large {
            "Request too large for gpt-5.5 in organization org-mock on tokens per min (TPM): \
             Limit 30000, Requested 52000."
                .to_string()
        } else {
            format!("mock error {code}")
        };
        let mut err = crate::event::error_value(*status, code, &message);
        if let Some(r) = d.resets_in_seconds {
            err["error"]["resets_in_seconds"] = json!(r);
        }
        em.emit(err).await
    } else if let Some(code) = &d.fail {
        let f = Fixture::load(FixtureName::FailedTurn);
        let mut vars = base(usage(0));
        vars.push(("code", json!(code)));
        let vars = Vars(vars);
        let mut ok = true;
        for i in 0..f.events().len() {
            ok = ok && em.emit(f.render(i, &vars)).await;
        }
        ok
    } else if d.tool && script::function_call_output(&body).is_none() {
        let (name, args) = script::choose_tool(&body, &script::tool_command(d.tool_sleep));
        let call_id = format!("call_{}_{}", conn.id, conn.next);
        let item_id = format!("fc_{}_{}", conn.id, conn.next);
        let item = json!({"id": item_id, "type": "function_call", "status": "completed", "call_id": call_id, "name": name, "arguments": args});
        output_tokens = tokens(args.len());
        let mut vars = base(usage(output_tokens));
        vars.extend([
            ("item_id", json!(item_id)),
            ("call_id", json!(call_id)),
            ("tool_name", json!(name)),
            ("arguments", json!(args)),
            ("item", item),
        ]);
        let f = Fixture::load(FixtureName::ToolCall);
        let vars = Vars(vars);
        let mut ok = true;
        for i in 0..f.events().len() {
            ok = ok && em.emit(f.render(i, &vars)).await;
        }
        ok
    } else {
        let reply = script::function_call_output(&body)
            .map(|o| format!("tool output: {}", o.chars().take(500).collect::<String>()));
        let (deltas, size) = if reply.is_some() {
            (1, 0)
        } else {
            (d.deltas, d.delta_size)
        };
        let delta_text = |i: usize| -> String {
            if let Some(r) = &reply {
                return r.clone();
            }
            if size == 0 {
                stamped::plain_delta(&id, i)
            } else {
                let mut s = format!("{id}:{i:08}|");
                s.extend(std::iter::repeat_n('x', size.saturating_sub(s.len())));
                s
            }
        };
        let total: usize = if let Some(r) = &reply {
            r.len()
        } else if size == 0 {
            stamped::plain_total_len(&id, deltas)
        } else {
            deltas * size.max(1)
        };
        let full = if total <= 64 * 1024 {
            (0..deltas).map(delta_text).collect::<String>()
        } else {
            format!("[{total} bytes streamed by {id}]")
        };
        output_tokens = tokens(total);
        let item_id = format!("msg_{}_{}", conn.id, conn.next);
        let item = json!({"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": full, "annotations": []}]});
        let mut vars = base(usage(output_tokens));
        vars.extend([
            ("item_id", json!(item_id)),
            ("text", json!(full)),
            ("item", item),
        ]);
        let vars = Vars(vars);
        let texts = vars.texts();
        let stamped = state
            .config
            .speed
            .then(|| StampedDeltas::new(&item_id, &id, reply.is_none() && size == 0));
        let f = Fixture::load(FixtureName::TextTurn);
        let mut ok = true;
        'events: for (i, ev) in f.events().iter().enumerate() {
            let is_delta =
                ev.get("type").and_then(Value::as_str) == Some("response.output_text.delta");
            if !is_delta {
                let ty = ev.get("type").and_then(Value::as_str).unwrap_or("");
                let rendered = (!d.incomplete && !d.empty_output)
                    .then(|| f.render_text(i, &texts, em.seq))
                    .flatten();
                if let Some(text) = rendered {
                    ok = ok && em.emit_rendered(text, crate::event::is_terminal(ty)).await;
                } else {
                    let mut v = f.render(i, &vars);
                    if v["type"] == "response.completed" {
                        if d.incomplete {
                            v["type"] = json!("response.incomplete");
                            v["response"]["status"] = json!("incomplete");
                            v["response"]["incomplete_details"] =
                                json!({"reason": "max_output_tokens"});
                        }
                        if d.empty_output {
                            v["response"]["output"] = json!([]);
                        }
                    }
                    ok = ok && em.emit(v).await;
                }
                if i == 0 && d.custom {
                    ok = ok
                        && em
                            .emit(json!({"type": "x.custom", "note": "a type no client knows"}))
                            .await;
                }
                if i == 0 && !d.stall.is_zero() {
                    ok = ok && em.flush_before_pause().await;
                    tokio::time::sleep(d.stall).await;
                }
                if !ok {
                    break;
                }
                continue;
            }
            for n in 0..deltas {
                if n == deltas / 2
                    && let Some(o) = close_at(Phase::Mid)
                {
                    return o;
                }
                if n == deltas / 2
                    && let Some(what) = &d.inject
                {
                    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
                    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
                    let frame = match what.as_str() {
                        "binary" => Message::binary(vec![0u8, 1, 2, 3]),
                        "badutf8" => Message::Frame(Frame::message(
                            vec![b'{', 0xff, 0xfe, b'}'],
                            OpCode::Data(Data::Text),
                            true,
                        )),
                        // Not JSON (a string holds raw line breaks): written into an event
                        // stream as it is, its type would end the event and start others.
                        "linebreak" => Message::text(
                            "{\"type\":\"x.line\n\nevent: response.completed\ndata: {}\r\rdata: 1\",\"n\":1}",
                        ),
                        _ => Message::text(format!(
                            "{{\"type\":\"response.output_text.delta\",\"delta\":\"{}\"}}",
                            "x".repeat(4 << 20)
                        )),
                    };
                    if em.sink.send(frame).await.is_err() {
                        return Outcome::Gone;
                    }
                }
                let sent = if let Some(stamped) = &stamped {
                    // Hand-built frame with its send time, so clients can measure latency.
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0);
                    let text = stamped.frame(em.seq, n, ts, delta_text);
                    em.seq += 1;
                    em.send_text(text, false).await
                } else {
                    let mut v = f.render(i, &vars);
                    v["delta"] = json!(delta_text(n));
                    em.emit(v).await
                };
                if !sent {
                    ok = false;
                    break 'events;
                }
                if !d.interval.is_zero() {
                    if !em.flush_before_pause().await {
                        ok = false;
                        break 'events;
                    }
                    tokio::time::sleep(d.interval).await;
                }
            }
            if deltas == 0
                && let Some(o) = close_at(Phase::Mid)
            {
                return o;
            }
        }
        ok
    };
    if !sent {
        return Outcome::Gone;
    }
    if let Some(o) = close_at(Phase::Mid) {
        // Turns without deltas close "mid" right after their events.
        if !generate || d.tool || d.error.is_some() || d.fail.is_some() {
            return o;
        }
    }
    conn.cache.push_back((id, input_tokens + output_tokens));
    while conn.cache.len() > state.config.cache_depth.max(1) {
        conn.cache.pop_front();
    }
    conn.last_context = input_tokens + output_tokens;
    if d.deaf {
        conn.deaf.store(true, Ordering::Release);
    }
    if let Some((kind, Phase::Idle(after))) = d.close {
        return Outcome::CloseLater(kind, after);
    }
    if let Some(after) = d.junk_after {
        return Outcome::JunkLater(after);
    }
    close_at(Phase::After).unwrap_or(Outcome::Continue)
}

/// Serializes an event with `type` as its first key, as the real upstream writes its events
/// (serde_json's map would order keys alphabetically).
fn type_first(v: &Value) -> String {
    let Some(map) = v.as_object() else {
        return v.to_string();
    };
    let Some(ty) = map.get("type") else {
        return v.to_string();
    };
    let mut out = format!("{{\"type\":{ty}");
    for (k, val) in map.iter().filter(|(k, _)| *k != "type") {
        out.push(',');
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&val.to_string());
    }
    out.push('}');
    out
}
