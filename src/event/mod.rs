//! Frame inspection: event-type sniffing on the hot path, the few client fields the gateway
//! needs, terminal-event detection, and the gateway's own `error` events.
//!
//! Frames are forwarded verbatim; nothing here rewrites them.

use std::borrow::Cow;

use serde::Deserialize;

#[doc(hidden)]
pub mod reference;
mod scan;

/// Client event types that start a turn.
pub const RESPONSE_CREATE: &str = "response.create";

/// Upstream events that end a turn (DESIGN §1).
pub fn is_terminal(event_type: &str) -> bool {
    matches!(
        event_type,
        "response.completed" | "response.failed" | "response.incomplete" | "error"
    )
}

/// Reads the `type` of an event. Fast path: the upstream writes `{"type":"…"` first, so the
/// common case costs a prefix compare and one `memchr` scan; otherwise a structural scan
/// finds the top-level `"type"` key, skipping strings with `memchr` (no allocation, no value
/// parsing); an escaped type or anything the scan cannot follow falls back to a streaming
/// parse that skips every other value.
pub fn sniff_type(text: &str) -> Option<Cow<'_, str>> {
    const PREFIX: &str = "{\"type\":\"";
    if let Some(rest) = text.strip_prefix(PREFIX)
        && let Some(end) = memchr::memchr(b'"', rest.as_bytes())
    {
        let ty = &rest[..end];
        if !ty.contains('\\') {
            return Some(Cow::Borrowed(ty));
        }
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
/// first output are plain parts too; the raw relay takes runs only once a turn has shown
/// output, see `Engine::relay_run`.)
pub fn is_plain_part(ty: &str) -> bool {
    !(is_terminal(ty)
        || ty == "response.created"
        || ty.starts_with("response.steer.")
        || ty.starts_with("response.inject."))
}

/// Whether a frame payload can be relayed as part of a raw run: a plain part of the
/// running response ([`is_plain_part`]: deltas, output items and content parts as they are
/// added and done, ...) written `type` first as the upstream writes them, the type plain
/// (no escapes), and the payload valid UTF-8. Anything else (a type somebody reads, `type`
/// not first, an escaped type) goes through the per-event path.
pub fn is_relayable_part(payload: &[u8]) -> bool {
    const PREFIX: &[u8] = b"{\"type\":\"";
    let Some(rest) = payload.strip_prefix(PREFIX) else {
        return false;
    };
    let head = &rest[..rest.len().min(96)];
    let Some(end) = memchr::memchr(b'"', head) else {
        return false;
    };
    // The payload is checked once, and the type read from the checked text (it starts and
    // ends at ASCII bytes, so the slice is on character boundaries).
    let Ok(text) = simdutf8::basic::from_utf8(payload) else {
        return false;
    };
    text.get(PREFIX.len()..PREFIX.len() + end)
        .is_some_and(|ty| !ty.contains('\\') && is_plain_part(ty))
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
    pub kind: String,
    /// `usage.input_tokens` and `usage.input_tokens_details.cached_tokens` of a completed turn.
    pub usage: Option<(u64, u64)>,
    /// `response.id` of a `response.completed` (it can be continued on this connection).
    pub completed_response_id: Option<String>,
    /// `response.id` of any `response.*` terminal (the ledger matches it to the running
    /// response).
    pub response_id: Option<String>,
    /// `response.incomplete_details.reason` is `steered` (the turn goes on in a successor).
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
    /// wrong type is ignored on its own.
    pub fn inspect(ty: &str, text: &str) -> Terminal {
        let mut t = Terminal {
            kind: ty.to_string(),
            ..Terminal::default()
        };
        let (mut status, mut error) = (None, None);
        let (mut id, mut usage, mut response_error, mut incomplete) = (None, None, None, None);
        // One pass: the response object is walked where it stands, not skipped and rescanned.
        let mut seen_response = false;
        let mut top = scan::members(text);
        while let Some((key, at)) = top.next_key() {
            if key == b"response" && !seen_response && text.as_bytes().get(at) == Some(&b'{') {
                seen_response = true;
                let mut r = scan::members_at(text, at);
                while let Some((key, at)) = r.next_key() {
                    let Some(value) = r.value(at) else { break };
                    match key {
                        b"id" => _ = id.get_or_insert(value),
                        b"usage" => _ = usage.get_or_insert(value),
                        b"error" => _ = response_error.get_or_insert(value),
                        b"incomplete_details" => _ = incomplete.get_or_insert(value),
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
                b"status" => _ = status.get_or_insert(value),
                b"error" => _ = error.get_or_insert(value),
                b"response" => seen_response = true,
                _ => {}
            }
        }
        t.response_id = id.and_then(scan::string).map(Cow::into_owned);
        t.steered = incomplete
            .and_then(|d| scan::members(d).find("reason"))
            .and_then(scan::string)
            .is_some_and(|r| r == "steered");
        if ty == "response.completed" {
            t.completed_response_id = t.response_id.clone();
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
        // Failures are rare and their error objects small: parsed whole.
        let parse = |v: &str| serde_json::from_str::<Option<ErrorBody>>(v).ok().flatten();
        let err = error
            .and_then(parse)
            .or_else(|| response_error.and_then(parse));
        t.failure(status.and_then(scan::unsigned), err.unwrap_or_default());
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
mod tests {
    use super::*;

    #[test]
    fn sniff_fast_and_slow_paths() {
        assert_eq!(
            sniff_type(r#"{"type":"response.output_text.delta","delta":"x"}"#).unwrap(),
            "response.output_text.delta"
        );
        assert_eq!(
            sniff_type(r#"{ "sequence_number": 3, "type" : "error" }"#).unwrap(),
            "error"
        );
        assert_eq!(sniff_type(r#"{"type":"a\"b"}"#).unwrap(), "a\"b");
        assert!(sniff_type("not json").is_none());
        // Any key order: the structural scan skips nested objects, arrays and strings that
        // look like keys.
        assert_eq!(
            sniff_type(r#"{"response":{"type":"inner","x":[{"type":"no"}]},"note":"\"type\":\"no\"","type":"response.created"}"#)
                .unwrap(),
            "response.created"
        );
        assert_eq!(
            sniff_type(r#"{"a":[1,{"b":"}"}],"type" : "error"}"#).unwrap(),
            "error"
        );
        // No top-level type (only nested ones), or a non-string type.
        assert!(sniff_type(r#"{"response":{"type":"inner"}}"#).is_none());
        assert!(sniff_type(r#"{"type":5}"#).is_none());
        assert!(sniff_type(r#"[{"type":"x"}]"#).is_none());
        assert!(sniff_type(r#"{"x":1}"#).is_none());
    }

    #[test]
    fn terminal_events() {
        for t in [
            "response.completed",
            "response.failed",
            "response.incomplete",
            "error",
        ] {
            assert!(is_terminal(t), "{t}");
        }
        for t in [
            "response.created",
            "response.output_text.delta",
            "codex.rate_limits",
            "response.done",
        ] {
            assert!(!is_terminal(t), "{t}");
        }
    }

    #[test]
    fn client_event_parse() {
        let ev = ClientEvent::parse(
            r#"{"type":"response.create","input":[{"a":[1,2]}],"prompt_cache_key":"conv-1","previous_response_id":"resp_1","stream":true}"#,
        )
        .unwrap();
        assert!(ev.is_create() && ev.is_continuation());
        assert_eq!(ev.prompt_cache_key.as_deref(), Some("conv-1"));
        // Borrowed from the frame, not copied; an escaped string is decoded into its own.
        assert!(matches!(ev.kind, Some(Cow::Borrowed("response.create"))));
        assert!(matches!(
            ev.previous_response_id,
            Some(Cow::Borrowed("resp_1"))
        ));
        let ev =
            ClientEvent::parse(r#"{"type":"response.create","prompt_cache_key":"a\"b"}"#).unwrap();
        assert!(matches!(ev.prompt_cache_key, Some(Cow::Owned(ref k)) if k == "a\"b"));
        let ev = ClientEvent::parse(r#"{"type":"response.create","previous_response_id":null}"#)
            .unwrap();
        assert!(!ev.is_continuation());
        assert!(matches!(
            ClientEvent::parse("{nope"),
            Err(ClientFrameError::InvalidJson(_))
        ));
        assert!(matches!(
            ClientEvent::parse("[1,2]"),
            Err(ClientFrameError::InvalidJson(_))
        ));
        assert_eq!(
            ClientEvent::parse(r#"{"input":[]}"#).unwrap_err(),
            ClientFrameError::MissingType
        );
        assert_eq!(
            ClientEvent::parse(r#"{"type":""}"#).unwrap_err(),
            ClientFrameError::MissingType
        );
    }

    #[test]
    fn terminal_inspection() {
        let t = Terminal::inspect(
            "response.completed",
            r#"{"type":"response.completed","response":{"id":"resp_1","usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":80}}}}"#,
        );
        assert_eq!(t.completed_response_id.as_deref(), Some("resp_1"));
        assert_eq!(t.usage, Some((100, 80)));
        let t = Terminal::inspect(
            "error",
            r#"{"type":"error","status":429,"error":{"type":"usage_limit_reached","resets_in_seconds":90}}"#,
        );
        assert!(t.rate_limited);
        assert_eq!(t.retry_after, Some(std::time::Duration::from_secs(90)));
        let t = Terminal::inspect(
            "response.failed",
            r#"{"type":"response.failed","response":{"id":"r","error":{"code":"rate_limit_exceeded","message":"try again"}}}"#,
        );
        assert!(t.rate_limited && t.retry_after.is_none() && t.completed_response_id.is_none());
        let t = Terminal::inspect(
            "error",
            r#"{"type":"error","status":429,"error":{"code":"rate_limit_exceeded","message":"Request too large for gpt-5 in organization org-x on tokens per min (TPM): Limit 30000, Requested 52000."}}"#,
        );
        assert!(
            !t.rate_limited,
            "one oversized request does not cool the account"
        );
        let t = Terminal::inspect(
            "error",
            r#"{"type":"error","status":400,"error":{"code":"websocket_connection_limit_reached"}}"#,
        );
        assert!(t.connection_limit && !t.rate_limited);
        let t = Terminal::inspect(
            "response.failed",
            r#"{"type":"response.failed","response":{"error":{"code":"server_error"}}}"#,
        );
        assert_eq!(
            t,
            Terminal {
                kind: "response.failed".into(),
                code: Some("server_error".into()),
                ..Terminal::default()
            }
        );
    }

    /// Generated well-formed events: any key order, whitespace, escapes in strings and keys'
    /// neighbours, fields present, null or absent, nested filler that looks like the wanted
    /// keys. The scan and the parse agree on every one.
    #[test]
    fn structural_inspection_agrees_with_a_full_parse() {
        struct Rng(std::cell::Cell<u64>);
        impl Rng {
            fn below(&self, n: usize) -> usize {
                let mut x = self.0.get();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.0.set(x);
                (x % n as u64) as usize
            }
            fn pick<'a>(&self, xs: &[&'a str]) -> &'a str {
                xs[self.below(xs.len())]
            }
        }
        let rng = &Rng(std::cell::Cell::new(0x9e37_79b9_7f4a_7c15));
        const STRINGS: &[&str] = &[
            r#""resp_1""#,
            r#""resp_\"q\"""#,
            r#""r\u0041\n""#,
            r#""é ü 😀""#,
            r#""""#,
            r#""}]{[,:""#,
            r#""\\""#,
        ];
        const FILLER: &[&str] = &[
            r#"[{"id":"nested","usage":{"input_tokens":7},"type":"message","content":[{"text":"a \"quoted\" }{ text\n"}]}]"#,
            r#"{"error":{"code":"rate_limit_exceeded"},"status":429,"response":{"id":"inner"}}"#,
            r#""You are Codex.\n\n## Rules\n- \"quote\" \\ back\tslash \u2603""#,
            "-1.5e-3",
            "true",
            "null",
            "[]",
            "{}",
            r#"[[[["deep"]]],{"a":[{"b":[]}]}]"#,
        ];
        fn ws(rng: &Rng) -> &'static str {
            ["", " ", "\n  ", "\t"][rng.below(4)]
        }
        fn object(rng: &Rng, mut members: Vec<(String, String)>) -> String {
            for i in (1..members.len()).rev() {
                members.swap(i, rng.below(i + 1));
            }
            let body: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{}\"{k}\"{}:{}{v}{}", ws(rng), ws(rng), ws(rng), ws(rng)))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        fn maybe(rng: &Rng, out: &mut Vec<(String, String)>, k: &str, v: String) {
            match rng.below(4) {
                0 => {}
                1 => out.push((k.into(), "null".into())),
                _ => out.push((k.into(), v)),
            }
        }
        // The token counts were plain `u64`s in the parse (null was a type error there).
        fn count(rng: &Rng, out: &mut Vec<(String, String)>, k: &str, v: &str) {
            if rng.below(4) > 0 {
                out.push((k.into(), v.into()));
            }
        }
        let mut checked = 0;
        for _ in 0..4000 {
            let ty = rng.pick(&[
                "response.completed",
                "response.failed",
                "response.incomplete",
                "error",
            ]);
            let mut error = Vec::new();
            maybe(
                rng,
                &mut error,
                "code",
                rng.pick(&[
                    r#""rate_limit_exceeded""#,
                    r#""server_error""#,
                    r#""websocket_connection_limit_reached""#,
                    r#""usage_limit_reached""#,
                ])
                .into(),
            );
            maybe(
                rng,
                &mut error,
                "type",
                rng.pick(&[
                    r#""usage_limit_reached""#,
                    r#""invalid_request_error""#,
                    r#""rate_limit_error""#,
                ])
                .into(),
            );
            maybe(
                rng,
                &mut error,
                "message",
                rng.pick(&[
                    r#""try again""#,
                    r#""Request too large for gpt-5: Limit 30000, Requested 52000.""#,
                    r#""a \"b\"""#,
                ])
                .into(),
            );
            maybe(
                rng,
                &mut error,
                "resets_in_seconds",
                rng.pick(&["90", "1.5", "0", "604801"]).into(),
            );
            if rng.below(2) == 0 {
                error.push(("param".into(), rng.pick(FILLER).into()));
            }
            let error = object(rng, error);
            let mut usage = Vec::new();
            count(
                rng,
                &mut usage,
                "input_tokens",
                rng.pick(&["0", "27", "123456789"]),
            );
            let mut details = Vec::new();
            count(
                rng,
                &mut details,
                "cached_tokens",
                rng.pick(&["0", "80", "4096"]),
            );
            details.push(("audio_tokens".into(), "0".into()));
            maybe(
                rng,
                &mut usage,
                "input_tokens_details",
                object(rng, details),
            );
            usage.push(("total_tokens".into(), "49".into()));
            let usage = object(rng, usage);
            let mut incomplete = Vec::new();
            maybe(
                rng,
                &mut incomplete,
                "reason",
                rng.pick(&[
                    r#""steered""#,
                    r#""max_output_tokens""#,
                    r#""steer\u0065d""#,
                ])
                .into(),
            );
            let incomplete = object(rng, incomplete);
            let mut response = Vec::new();
            maybe(rng, &mut response, "id", rng.pick(STRINGS).into());
            maybe(rng, &mut response, "usage", usage);
            maybe(rng, &mut response, "error", error.clone());
            maybe(rng, &mut response, "incomplete_details", incomplete);
            for k in ["output", "instructions", "tools", "metadata"] {
                if rng.below(2) == 0 {
                    response.push((k.into(), rng.pick(FILLER).into()));
                }
            }
            let response = object(rng, response);
            let mut top = vec![("type".into(), format!("\"{ty}\""))];
            maybe(rng, &mut top, "sequence_number", "12".into());
            maybe(
                rng,
                &mut top,
                "status",
                rng.pick(&["429", "400", "500"]).into(),
            );
            maybe(rng, &mut top, "error", error);
            maybe(rng, &mut top, "response", response);
            if rng.below(2) == 0 {
                top.push(("note".into(), rng.pick(FILLER).into()));
            }
            let text = object(rng, top);
            assert!(
                serde_json::from_str::<serde_json::Value>(&text).is_ok(),
                "generated text is JSON: {text}"
            );
            assert_eq!(
                Terminal::inspect(ty, &text),
                reference::inspect(ty, &text),
                "{text}"
            );
            assert_eq!(response_id(&text), reference::response_id(&text), "{text}");
            checked += 1;
        }
        assert_eq!(checked, 4000);
    }

    #[test]
    fn limit_errors_say_when_to_retry() {
        let v = limit_error(
            "usage_limit_reached",
            Some(std::time::Duration::from_secs(90)),
        );
        assert_eq!(v["status"], 429);
        assert_eq!(v["error"]["type"], "usage_limit_reached");
        assert_eq!(v["error"]["resets_in_seconds"], 90);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let at = v["error"]["resets_at"].as_u64().unwrap();
        assert!(at >= now + 89 && at <= now + 91, "{at} vs {now}");
        let v = limit_error("all_accounts_unavailable", None);
        assert!(v["error"].get("resets_at").is_none());
    }

    #[test]
    fn error_events() {
        let ev: serde_json::Value =
            serde_json::from_str(&error_event(502, "upstream_closed", "gone")).unwrap();
        assert_eq!(ev["type"], "error");
        assert_eq!(ev["status"], 502);
        assert_eq!(ev["error"]["code"], "upstream_closed");
        assert_eq!(ev["error"]["type"], "server_error");
    }
}
