//! Frame inspection: event-type sniffing on the hot path, the few client fields the gateway
//! needs, terminal-event detection, and the gateway's own `error` events.
//!
//! Frames are forwarded verbatim; nothing here rewrites them.

use std::borrow::Cow;

use serde::Deserialize;

#[doc(hidden)]
pub mod reference;
pub(crate) mod scan;

/// Client event types that start a turn.
pub const RESPONSE_CREATE: &str = "response.create";

/// Upstream events that end a turn (DESIGN §1).
pub fn is_terminal(event_type: &str) -> bool {
    is_terminal_type(event_type.as_bytes())
}

/// A terminal's type as [`Terminal::kind`]: the four of DESIGN §1 without an allocation.
fn kind_name(ty: &str) -> Cow<'static, str> {
    match ty {
        "response.completed" => Cow::Borrowed("response.completed"),
        "response.failed" => Cow::Borrowed("response.failed"),
        "response.incomplete" => Cow::Borrowed("response.incomplete"),
        "error" => Cow::Borrowed("error"),
        other => Cow::Owned(other.to_owned()),
    }
}

pub fn is_terminal_type(ty: &[u8]) -> bool {
    matches!(
        ty,
        b"response.completed" | b"response.failed" | b"response.incomplete" | b"error"
    )
}

/// Reads the `type` of an event. Fast path: the upstream writes `{"type":"…"` first, so the
/// common case costs a prefix compare and a search for the closing quote
/// ([`scan::plain_string_end`]); otherwise a structural scan finds the top-level `"type"` key,
/// skipping strings whole (no allocation, no value
/// parsing); an escaped type or anything the scan cannot follow falls back to a streaming
/// parse that skips every other value.
pub fn sniff_type(text: &str) -> Option<Cow<'_, str>> {
    const PREFIX: &str = "{\"type\":\"";
    if let Some(rest) = text.strip_prefix(PREFIX)
        && let Some(end) = scan::plain_string_end(rest.as_bytes(), 0)
    {
        return Some(Cow::Borrowed(&rest[..end]));
    }
    if let Some(ty) = scan::type_value(text) {
        return Some(Cow::Borrowed(ty));
    }
    #[derive(Deserialize)]
    struct TypeOnly<'a> {
        #[serde(rename = "type", borrow, default, deserialize_with = "borrowed")]
        kind: Option<Cow<'a, str>>,
    }
    serde_json::from_str::<TypeOnly<'_>>(text)
        .ok()
        .and_then(|t| t.kind)
}

/// Whether an event of type `ty` is a plain part of the running response: the ledger
/// attributes it to the turn (when parts are expected) without reading it or changing any
/// state. Everything else is read: `response.created` (the response id), the terminals and
/// `error` (the turn's end), the answers to side events (`response.steer.*`,
/// `response.inject.*`). The tests of [`Ledger`](crate::turn::ledger::Ledger) check it
/// against the ledger's own verdicts. (The no-output events a turn holds back before its
/// first output are plain parts too; before a turn has shown output the raw relay takes only
/// a run that carries output itself, see `Engine::relay_run`.)
pub fn is_plain_part(ty: &str) -> bool {
    is_plain_type(ty.as_bytes())
}

/// [`is_plain_part`] on the type's bytes (a raw frame's, before its payload is checked).
fn is_plain_type(ty: &[u8]) -> bool {
    !(is_terminal_type(ty)
        || ty == b"response.created"
        || ty.starts_with(b"response.steer.")
        || ty.starts_with(b"response.inject."))
}

/// Whether a frame payload can be relayed as part of a raw run: a plain part of the
/// running response ([`is_plain_part`]: deltas, output items and content parts as they are
/// added and done, ...) written `type` first as the upstream writes them, the type plain
/// (no escapes), and the payload valid UTF-8. Anything else (a type somebody reads, `type`
/// not first, an escaped type) goes through the per-event path.
pub fn is_relayable_part(payload: &[u8]) -> bool {
    raw_kind(payload, false) == Some(RawKind::Part)
}

/// What a frame payload is to the raw relay (see [`raw_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    /// A plain part of the running response ([`is_relayable_part`]).
    Part,
    /// A terminal (`response.completed`, `response.failed`, `response.incomplete`, `error`).
    Terminal,
    /// A `response.created` (the ledger reads its `response.id`).
    Created,
}

/// The largest terminal or `response.created` a raw run takes. The ledger needs such an
/// event's text as a `str`, which costs a raw one a second UTF-8 pass (the run's check, then
/// the conversion) where the per-event read makes one: on a small event the decode and
/// re-encode saved are worth more, on a large one (the real upstream echoes the whole
/// response, instructions included) the second pass costs more than they do.
pub const RAW_TERMINAL_MAX: usize = 4 << 10;

/// How the upstream opens every event: `type` first.
const TYPE_PREFIX: &[u8] = b"{\"type\":\"";

/// The plain parts most frequent in a stream, each with its closing quote (see
/// [`raw_kind`]).
const COMMON_PARTS: [&[u8]; 4] = [
    b"response.output_text.delta\"",
    b"response.reasoning_summary_text.delta\"",
    b"response.reasoning_text.delta\"",
    b"response.function_call_arguments.delta\"",
];

/// Classifies a frame payload for the raw relay: a plain part, or (with `lifecycle`) a
/// terminal or a `response.created` of at most [`RAW_TERMINAL_MAX`] bytes, each only when
/// written `type` first with a plain (unescaped) type and valid UTF-8; `None` for anything
/// else, which goes through the per-event path.
pub fn raw_kind(payload: &[u8], lifecycle: bool) -> Option<RawKind> {
    // Most of a stream is a few delta types: matched whole, closing quote included, before
    // the general read of the type.
    if payload
        .strip_prefix(TYPE_PREFIX)
        .is_some_and(|rest| COMMON_PARTS.iter().any(|t| rest.starts_with(t)))
    {
        return is_utf8(payload).then_some(RawKind::Part);
    }
    // The type is compared as bytes first: a frame that ends the run (a terminal, often the
    // whole response echoed) is refused without a UTF-8 pass its own read will make again.
    let ty = raw_type(payload)?;
    let small = lifecycle && payload.len() <= RAW_TERMINAL_MAX;
    let kind = if is_terminal_type(ty) {
        small.then_some(RawKind::Terminal)?
    } else if ty == b"response.created" {
        small.then_some(RawKind::Created)?
    } else if is_plain_type(ty) {
        RawKind::Part
    } else {
        return None;
    };
    is_utf8(payload).then_some(kind)
}

/// Whether a relayed frame's payload is valid UTF-8. Most of a stream's deltas are ASCII:
/// an OR of the payload's 8-byte words settles those (~5 ns on a 150 B delta, where the SIMD
/// validator takes ~13: it pays a dispatch and a padded tail per call); a payload with any
/// byte of 128 or more is validated in full (`simdutf8`).
pub fn is_utf8(payload: &[u8]) -> bool {
    let (words, rest) = payload.as_chunks::<8>();
    let mut high = 0u64;
    for w in words {
        high |= u64::from_ne_bytes(*w);
    }
    for &b in rest {
        high |= u64::from(b);
    }
    high & 0x8080_8080_8080_8080 == 0 || simdutf8::basic::from_utf8(payload).is_ok()
}

/// The type of a frame payload written `type` first with a plain (unescaped) type of at most
/// 96 bytes, as bytes (not yet checked to be UTF-8); `None` otherwise.
pub fn raw_type(payload: &[u8]) -> Option<&[u8]> {
    let rest = payload.strip_prefix(TYPE_PREFIX)?;
    let head = &rest[..rest.len().min(96)];
    Some(&head[..scan::plain_string_end(head, 0)?])
}

/// The fields of a client frame the gateway acts on. Parsing it also validates the JSON.
#[derive(Debug, Deserialize)]
pub struct ClientEvent<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "borrowed")]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub prompt_cache_key: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub previous_response_id: Option<Cow<'a, str>>,
}

/// An optional string borrowed from the frame when it has no escapes (serde borrows a bare
/// `Cow<str>` field but copies one inside an `Option`: three allocations per request).
fn borrowed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

/// Why a client frame was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClientFrameError {
    #[error("frame is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("event has no string `type` field")]
    MissingType,
}

impl<'a> ClientEvent<'a> {
    pub fn parse(text: &'a str) -> Result<ClientEvent<'a>, ClientFrameError> {
        let ev: ClientEvent<'a> =
            serde_json::from_str(text).map_err(|e| ClientFrameError::InvalidJson(e.to_string()))?;
        match ev.kind.as_deref() {
            Some(t) if !t.is_empty() => Ok(ev),
            _ => Err(ClientFrameError::MissingType),
        }
    }

    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or_default()
    }

    pub fn is_create(&self) -> bool {
        self.kind() == RESPONSE_CREATE
    }

    /// A `response.create` with a `previous_response_id` continues a response that only the
    /// upstream connection that produced it knows (store=false).
    pub fn is_continuation(&self) -> bool {
        self.previous_response_id
            .as_deref()
            .is_some_and(|s| !s.is_empty())
    }
}

/// Error codes that mean the account hit a rate or usage limit.
const RATE_LIMIT_CODES: &[&str] = &[
    "usage_limit_reached",
    "rate_limit_exceeded",
    "rate_limit_error",
    "usage_not_included",
];

/// What the session needs to know about a turn's terminal event.
#[derive(Debug, Default, PartialEq)]
pub struct Terminal {
    /// The event type (`response.completed`, `error`, ...).
    pub kind: Cow<'static, str>,
    /// `usage.input_tokens` and `usage.input_tokens_details.cached_tokens` of a completed turn.
    pub usage: Option<(u64, u64)>,
    /// `response.id` of any `response.*` terminal (the ledger matches it to the running
    /// response).
    pub response_id: Option<String>,
    /// A `response.incomplete` whose `incomplete_details.reason` is `steered` (the turn goes on
    /// in a successor).
    pub steered: bool,
    /// The account is rate- or usage-limited (status 429 or a limit code), account-wide: a
    /// refusal of this one request (a request larger than the limit) does not count.
    pub rate_limited: bool,
    /// `resets_in_seconds` of a limit error, if given.
    pub retry_after: Option<std::time::Duration>,
    /// `error.code` (else `error.type`) of a failed turn.
    pub code: Option<String>,
    /// `websocket_connection_limit_reached`: the upstream connection's lifetime is over.
    pub connection_limit: bool,
}

impl Terminal {
    /// Inspects a terminal event of type `ty`: only the fields named above are read, found by
    /// a structural scan (see [`scan`]); the rest of the event (the real upstream echoes the
    /// whole response: instructions, tools, output) is skipped, never parsed. A field of the
    /// wrong type is ignored on its own. A `response.completed`, a turn's usual end, is read
    /// from its two ends (see [`completed_ends`]): the echo in between is not walked at all.
    pub fn inspect(ty: &str, text: &str) -> Terminal {
        Terminal::read(ty, text, true)
    }

    /// `response.id` of a `response.completed` (it can be continued on this connection).
    pub fn completed_response_id(&self) -> Option<&str> {
        (self.kind == "response.completed")
            .then_some(self.response_id.as_deref())
            .flatten()
    }

    /// [`Terminal::inspect`], a `response.completed` read `from_the_ends` or walked whole.
    fn read(ty: &str, text: &str, from_the_ends: bool) -> Terminal {
        let mut t = Terminal {
            kind: kind_name(ty),
            ..Terminal::default()
        };
        if ty == "response.completed" {
            let ends = from_the_ends.then(|| completed_ends(text)).flatten();
            let (id, usage) = ends.unwrap_or_else(|| {
                let f = Fields::walk(text);
                (f.id, f.usage)
            });
            t.response_id = id.and_then(scan::string).map(Cow::into_owned);
            t.usage = usage.filter(|u| u.starts_with('{')).map(|u| {
                let input = scan::members(u).find("input_tokens");
                let cached = scan::find(u, &["input_tokens_details", "cached_tokens"]);
                (
                    input.and_then(scan::unsigned).unwrap_or(0),
                    cached.and_then(scan::unsigned).unwrap_or(0),
                )
            });
            return t;
        }
        let f = Fields::walk(text);
        t.response_id = f.id.and_then(scan::string).map(Cow::into_owned);
        t.steered = ty == "response.incomplete"
            && f.incomplete
                .and_then(|d| scan::members(d).find("reason"))
                .and_then(scan::string)
                .is_some_and(|r| r == "steered");
        // Failures are rare and their error objects small: parsed whole.
        let parse = |v: &str| serde_json::from_str::<Option<ErrorBody>>(v).ok().flatten();
        let err = f
            .error
            .and_then(parse)
            .or_else(|| f.response_error.and_then(parse));
        t.failure(f.status.and_then(scan::unsigned), err.unwrap_or_default());
        t
    }

    /// What a failed turn's status and error say: the error code, a connection at its
    /// lifetime limit, an account limit and when to retry.
    fn failure(&mut self, status: Option<u64>, err: ErrorBody) {
        let is =
            |name: &str| err.code.as_deref() == Some(name) || err.kind.as_deref() == Some(name);
        self.connection_limit = is("websocket_connection_limit_reached");
        self.code = err.code.clone().or_else(|| err.kind.clone());
        let limited = status == Some(429) || RATE_LIMIT_CODES.iter().any(|c| is(c));
        self.rate_limited = limited && !request_specific(&err.code, &err.message);
        self.retry_after = err
            .resets_in_seconds
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| std::time::Duration::from_secs_f64(s.min(7.0 * 86400.0)));
    }
}

/// The values a terminal's inspection reads, as written (see [`Terminal::inspect`]).
#[derive(Default)]
struct Fields<'a> {
    /// Top level: `status` and `error` (an `error` event).
    status: Option<&'a str>,
    error: Option<&'a str>,
    /// In `response`: its `id`, `usage`, `error` and `incomplete_details`.
    id: Option<&'a str>,
    usage: Option<&'a str>,
    response_error: Option<&'a str>,
    incomplete: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// One pass over the whole event: the response object is walked where it stands, not
    /// skipped and rescanned.
    fn walk(text: &'a str) -> Self {
        let mut f = Fields::default();
        let mut seen_response = false;
        let mut top = scan::members(text);
        while let Some((key, at)) = top.next_key() {
            if key == b"response" && !seen_response && text.as_bytes().get(at) == Some(&b'{') {
                seen_response = true;
                let mut r = scan::members_at(text, at);
                while let Some((key, at)) = r.next_key() {
                    let Some(value) = r.value(at) else { break };
                    match key {
                        b"id" => _ = f.id.get_or_insert(value),
                        b"usage" => _ = f.usage.get_or_insert(value),
                        b"error" => _ = f.response_error.get_or_insert(value),
                        b"incomplete_details" => _ = f.incomplete.get_or_insert(value),
                        _ => {}
                    }
                }
                match r.end() {
                    Some(end) => top.resume(end),
                    None => break,
                }
                continue;
            }
            let Some(value) = top.value(at) else { break };
            match key {
                b"status" => _ = f.status.get_or_insert(value),
                b"error" => _ = f.error.get_or_insert(value),
                b"response" => seen_response = true,
                _ => {}
            }
        }
        f
    }
}

/// A `response.completed`'s `response.id` and `response.usage`, read from the event's two
/// ends: the id from the front (the upstream writes it first in the response), the usage from
/// the back (it writes the usage last but for `user` and `metadata`, and puts the response
/// last in the event but for scalars such as `sequence_number`). Between them lies the echo of
/// the request and the output, tens of kilobytes for a Codex turn, which is never walked.
///
/// From the back, the event's last member whose value is an object is taken for the response
/// (the members after it must be scalars or strings; an array there, or no `usage` found in
/// that object, and `None` sends the caller to the one-pass walk of the whole event). So the
/// usage is the one the last object of the event holds at its top level; a usage written
/// twice counts from its last writing; the id is the response's first (the same as the
/// one-pass walk, on every event the upstream writes). A front walk that reaches the
/// response's end before the usage's member knows that object was another one: `None`.
fn completed_ends(text: &str) -> Option<(Option<&str>, Option<&str>)> {
    let b = text.as_bytes();
    // The response's opening brace, from the front (after the type and the sequence number).
    let mut top = scan::members(text);
    let at = loop {
        let (key, at) = top.next_key()?;
        if key == b"response" {
            break at;
        }
        top.value(at)?;
    };
    if b.get(at) != Some(&b'{') {
        return None;
    }
    // Its closing brace and usage, from the back.
    let mut tail = scan::members_rev(text, scan::last_non_ws(b, b.len())?);
    let close = loop {
        let last = tail.next_value_end()?;
        match b[last] {
            b'}' => break last,
            b']' => return None,
            _ => _ = tail.member(last)?,
        }
    };
    let mut back = scan::members_rev(text, close);
    let mut back_id = None;
    let (usage, usage_at) = loop {
        let (key, value) = back.next()?;
        match key {
            b"usage" => break (value, back.position()?),
            b"id" => back_id = Some(value),
            _ => {}
        }
    };
    // The id from the front, up to the usage's member (the ones after it were read above).
    let mut front = scan::members_at(text, at);
    while let Some((key, value_at)) = front.next_key() {
        if value_at >= usage_at {
            break;
        }
        let Some(value) = front.value(value_at) else {
            break;
        };
        if key == b"id" {
            return Some((Some(value), Some(usage)));
        }
    }
    // The response closed before the usage's member: that object was not the response.
    if front.end().is_some() {
        return None;
    }
    Some((back_id, Some(usage)))
}

/// The error object of a failed turn (`error`, or `response.error`).
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    resets_in_seconds: Option<f64>,
    #[serde(default)]
    message: Option<String>,
}

/// `response.id` of an event (`response.created`), reading no further than the id: the real
/// upstream echoes the whole request (instructions, tools) after it.
pub fn response_id(text: &str) -> Option<String> {
    scan::find(text, &["response", "id"])
        .and_then(scan::string)
        .map(Cow::into_owned)
}

/// A limit refusal about this one request rather than the account: the real API answers a
/// request larger than a per-minute token limit with 429 `rate_limit_exceeded` and "Request
/// too large for ... Limit N, Requested M"; retrying it elsewhere or cooling the account helps
/// nobody.
fn request_specific(code: &Option<String>, message: &Option<String>) -> bool {
    const REQUEST_CODES: &[&str] = &[
        "request_too_large",
        "context_length_exceeded",
        "string_above_max_length",
    ];
    code.as_deref().is_some_and(|c| REQUEST_CODES.contains(&c))
        || message
            .as_deref()
            .is_some_and(|m| m.to_ascii_lowercase().contains("request too large"))
}

/// An `error` event from the gateway itself, as a JSON value (callers may add fields).
/// `status` is top-level, as Codex requires (an `error` without it is ignored and the turn
/// hangs).
pub fn error_value(status: u16, code: &str, message: &str) -> serde_json::Value {
    let kind = match status {
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    serde_json::json!({
        "type": "error",
        "status": status,
        "error": { "type": kind, "code": code, "message": message },
    })
}

/// The `error` event a client gets when no account can take its turn: status 429 with
/// `error.type: usage_limit_reached`, the upstream's `code` (or `all_accounts_unavailable`),
/// and when the first account frees up as `resets_in_seconds` and `resets_at` (unix seconds),
/// so Codex prints "Try again at `<time>`" (it never retries a 429).
pub fn limit_error(code: &str, retry_after: Option<std::time::Duration>) -> serde_json::Value {
    let message = match retry_after {
        Some(d) => format!(
            "every upstream account is rate- or usage-limited; the first frees up in {}s",
            d.as_secs().max(1)
        ),
        None => "every upstream account is unavailable (refused, disabled or removed)".into(),
    };
    let mut v = error_value(429, code, &message);
    v["error"]["type"] = "usage_limit_reached".into();
    if let Some(d) = retry_after {
        let secs = d.as_secs().max(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        v["error"]["resets_in_seconds"] = secs.into();
        v["error"]["resets_at"] = (now + secs).into();
    }
    v
}

/// [`error_value`] as frame text.
pub fn error_event(status: u16, code: &str, message: &str) -> String {
    error_value(status, code, message).to_string()
}

#[cfg(test)]
mod tests;
