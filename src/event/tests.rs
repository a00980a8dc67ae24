//! Unit tests of frame inspection: sniffing, client frames, terminal events (the structural
//! scan against the serde parse it replaced), error events.

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

/// The raw relay's classification: parts always, terminals and `response.created` only when
/// asked for (a run then ends with the one, may open with the other); anything else the
/// ledger reads, or whose type or text needs a closer look, is none of these and goes
/// through the per-event path.
#[test]
fn raw_kinds_of_frame_payloads() {
    let part = br#"{"type":"response.output_text.delta","delta":"hi"}"#;
    let item_done = br#"{"type":"response.output_item.done","item":{"type":"message"}}"#;
    for p in [&part[..], &item_done[..]] {
        assert_eq!(raw_kind(p, false), Some(RawKind::Part));
        assert_eq!(raw_kind(p, true), Some(RawKind::Part));
        assert!(is_relayable_part(p));
    }
    for p in [
        &br#"{"type":"response.completed","response":{"id":"resp_1"}}"#[..],
        br#"{"type":"response.failed","response":{}}"#,
        br#"{"type":"response.incomplete","response":{}}"#,
        br#"{"type":"error","status":429,"error":{"code":"rate_limit_exceeded"}}"#,
    ] {
        assert_eq!(raw_kind(p, false), None);
        assert_eq!(raw_kind(p, true), Some(RawKind::Terminal));
        assert!(!is_relayable_part(p));
    }
    let mut bad_utf8 = br#"{"type":"response.completed","response":{"id":"resp_x"}}"#.to_vec();
    bad_utf8[48] = 0xff;
    // A terminal is taken up to RAW_TERMINAL_MAX bytes; a larger one (an echoed response)
    // goes through the per-event path.
    let sized = |n: usize| {
        let head = br#"{"type":"response.completed","response":{"instructions":""#;
        let mut p = head.to_vec();
        p.resize(n - 3, b'x');
        p.extend_from_slice(br#""}}"#);
        assert_eq!(p.len(), n);
        p
    };
    assert_eq!(
        raw_kind(&sized(RAW_TERMINAL_MAX), true),
        Some(RawKind::Terminal)
    );
    let large = sized(RAW_TERMINAL_MAX + 1);
    let created = br#"{"type":"response.created","response":{"id":"resp_1"}}"#;
    assert_eq!(raw_kind(created, true), Some(RawKind::Created));
    assert_eq!(raw_kind(created, false), None);
    assert!(!is_relayable_part(created));
    let mut large_created = created.to_vec();
    large_created.splice(45..45, std::iter::repeat_n(b'x', RAW_TERMINAL_MAX));
    let mut bad_created = created.to_vec();
    bad_created[45] = 0xff;
    for p in [
        &large_created[..],
        &bad_created,
        br#"{"type":"response.steer.accepted"}"#,
        br#"{"type":"response.inject.accepted"}"#,
        br#"{"type":"response.complete\u0064","response":{}}"#,
        br#"{"response":{},"type":"response.completed"}"#,
        br#"{ "type":"response.completed","response":{}}"#,
        &bad_utf8,
        &large,
        br#"{"type":"response.completed"#,
        b"",
    ] {
        assert_eq!(raw_kind(p, true), None, "{}", String::from_utf8_lossy(p));
        assert_eq!(raw_kind(p, false), None);
    }
}

/// The delta types matched whole first (`COMMON_PARTS`) are parts when their text is UTF-8,
/// and only when the type ends where theirs does: a longer type, an escaped one or bad UTF-8
/// gets the general path's verdict.
#[test]
fn common_delta_types_are_parts_only_when_the_type_and_text_are() {
    for ty in [
        "response.output_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
        "response.function_call_arguments.delta",
    ] {
        let p = format!(r#"{{"type":"{ty}","delta":"h\u00e9 é"}}"#).into_bytes();
        assert_eq!(raw_kind(&p, false), Some(RawKind::Part), "{ty}");
        let mut bad = p.clone();
        let at = bad.len() - 4;
        bad[at] = 0xff;
        assert_eq!(raw_kind(&bad, true), None, "{ty}: bad UTF-8");
        let escaped = format!(r#"{{"type":"{}\u0061","delta":""}}"#, &ty[..ty.len() - 1]);
        assert_eq!(raw_kind(escaped.as_bytes(), true), None, "{ty}: escaped");
        // The whole type followed by an escape: only the closing quote tells it apart.
        let continued = format!(r#"{{"type":"{ty}\u0021","delta":""}}"#);
        assert_eq!(
            raw_kind(continued.as_bytes(), true),
            None,
            "{ty}: continued"
        );
    }
    // A type that merely starts with a common one is read the general way (a plain part
    // too); a payload cut inside the type is nothing.
    let longer = br#"{"type":"response.output_text.delta.extra","delta":""}"#;
    assert_eq!(raw_kind(longer, false), Some(RawKind::Part));
    let unterminated = br#"{"type":"response.output_text.delta"#;
    assert_eq!(raw_kind(unterminated, false), None);
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
    let ev = ClientEvent::parse(r#"{"type":"response.create","prompt_cache_key":"a\"b"}"#).unwrap();
    assert!(matches!(ev.prompt_cache_key, Some(Cow::Owned(ref k)) if k == "a\"b"));
    let ev =
        ClientEvent::parse(r#"{"type":"response.create","previous_response_id":null}"#).unwrap();
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
    assert_eq!(t.completed_response_id(), Some("resp_1"));
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
    assert!(t.rate_limited && t.retry_after.is_none() && t.completed_response_id().is_none());
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

/// A completed event as the real upstream writes it for a Codex turn (the request echoed, the
/// sequence number after the response, `user` and `metadata` after the usage) is read from
/// its two ends; the echo in between could hold anything.
#[test]
fn a_completed_event_is_read_from_its_two_ends() {
    let echo = r#""instructions":"Say \"usage\":{\"input_tokens\":1} \\","tools":[{"name":"x","parameters":{"properties":{"usage":{"type":"object"}}}}],"output":[{"type":"message","content":[{"text":"} ] \" {"}]}]"#;
    let text = format!(
        r#"{{"type":"response.completed","response":{{"id":"resp_9","object":"response","error":null,{echo},"usage":{{"input_tokens":120,"input_tokens_details":{{"cached_tokens":64}}}},"user":null,"metadata":{{"usage":"7","id":"m"}}}},"sequence_number":41}}"#
    );
    assert_eq!(
        completed_ends(&text),
        Some((
            Some(r#""resp_9""#),
            Some(r#"{"input_tokens":120,"input_tokens_details":{"cached_tokens":64}}"#)
        ))
    );
    let t = Terminal::inspect("response.completed", &text);
    assert_eq!(t, reference::inspect("response.completed", &text));
    assert_eq!(t.usage, Some((120, 64)));
    assert_eq!(t.completed_response_id(), Some("resp_9"));
    // An id written after the usage is found from the back.
    let late = r#"{"type":"response.completed","response":{"output":[],"usage":{"input_tokens":5},"id":"resp_late"}}"#;
    assert_eq!(
        Terminal::inspect("response.completed", late).completed_response_id(),
        Some("resp_late")
    );
    // No usage in the event's last object, or an array after it: the whole event is walked.
    for text in [
        r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":3}},"note":{"a":1}}"#,
        r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":3}},"note":[]}"#,
    ] {
        assert_eq!(completed_ends(text), None, "{text}");
        let t = Terminal::inspect("response.completed", text);
        assert_eq!(
            (t.usage, t.response_id.as_deref()),
            (Some((3, 0)), Some("r"))
        );
    }
    // A front walk that reaches the response's end before the usage's member: the usage (and
    // the id after it) were another object's, and the whole event is walked.
    let other = r#"{"type":"response.completed","response":{"output":[],"usage":{"input_tokens":3}},"note":{"usage":{"input_tokens":9},"id":"x"}}"#;
    assert_eq!(completed_ends(other), None);
    let t = Terminal::inspect("response.completed", other);
    assert_eq!((t.usage, t.response_id), (Some((3, 0)), None));
}

/// Hostile shapes at the event's end, where the backward walk starts: a long run of escaped
/// quotes and backslashes, brackets nested 100,000 deep, a long scalar. Each is read in
/// linear time without recursion (a quadratic walk of these ~1 MB would not finish), and
/// what is found agrees with the whole walk. (Well-formed, but nested deeper than serde's
/// recursion limit, so not checked against the serde parse.)
#[test]
fn hostile_ends_of_a_completed_event_are_read_in_one_pass() {
    let escapes = "\\\"\\\\".repeat(100_000);
    let nested = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(50_000), "}".repeat(50_000));
    let long = "9".repeat(300_000);
    for tail in [
        format!(r#""note":"{escapes}""#),
        format!(r#""note":{nested}"#),
        format!(r#""note":{objects}"#),
        format!(r#""note":{long}"#),
    ] {
        for text in [
            format!(
                r#"{{"type":"response.completed","response":{{"id":"r","usage":{{"input_tokens":3}},{tail}}}}}"#
            ),
            format!(
                r#"{{"type":"response.completed","response":{{"id":"r","usage":{{"input_tokens":3}}}},{tail}}}"#
            ),
        ] {
            let t = Terminal::inspect("response.completed", &text);
            assert_eq!(t, reference::inspect_walked("response.completed", &text));
            assert_eq!(
                (t.usage, t.response_id.as_deref()),
                (Some((3, 0)), Some("r"))
            );
        }
    }
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
    let (mut checked, mut from_the_ends) = (0, 0);
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
        let inspected = Terminal::inspect(ty, &text);
        assert_eq!(inspected, reference::inspect(ty, &text), "{text}");
        assert_eq!(inspected, reference::inspect_walked(ty, &text), "{text}");
        assert_eq!(response_id(&text), reference::response_id(&text), "{text}");
        if ty == "response.completed" {
            // Where the two ends settle a completed event, they read what the walk of the
            // whole event reads.
            let walked = Fields::walk(&text);
            if let Some(ends) = completed_ends(&text) {
                assert_eq!(ends, (walked.id, walked.usage), "{text}");
                from_the_ends += 1;
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 4000);
    eprintln!("completed events settled from their two ends: {from_the_ends}");
    // The seed is fixed: 262 of the ~1,000 completed events are settled from their ends.
    assert!(from_the_ends >= 250, "{from_the_ends}");
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

/// The ASCII check in front of the full validation settles only all-ASCII payloads: a byte
/// of 128 or more anywhere (in the 8-byte words or the tail after them) goes to the full
/// validation, which refuses what is not UTF-8.
#[test]
fn a_relayed_payload_is_utf8_checked_in_every_position() {
    let ascii = br#"{"type":"response.output_text.delta","delta":"plain text"}"#;
    assert!(is_utf8(ascii));
    assert!(is_utf8(b""));
    for at in 0..ascii.len() {
        let mut bad = ascii.to_vec();
        bad[at] = 0xff;
        assert!(!is_utf8(&bad), "0xff at {at}");
        let mut lone = ascii.to_vec();
        lone[at] = 0x80; // a continuation byte with no lead
        assert!(!is_utf8(&lone), "0x80 at {at}");
        let mut overlong = ascii.to_vec();
        overlong.splice(at..at, [0xc0, 0xaf]); // "/" encoded in two bytes
        assert!(!is_utf8(&overlong), "overlong at {at}");
        let mut valid = ascii.to_vec();
        valid.splice(at..at, "é😀".bytes());
        assert!(is_utf8(&valid), "é😀 at {at}");
        let mut cut = ascii[..at].to_vec();
        cut.extend_from_slice(&"😀".as_bytes()[..3]); // a sequence cut short at the end
        assert!(!is_utf8(&cut), "cut sequence after {at}");
    }
}
