//! What the mock does for one `response.create`: directives parsed from the last user message,
//! and the events built from the fixtures in `fixtures/mock/`.

use std::time::Duration;

use serde_json::{Value, json};

const PREWARM: &str = include_str!("../../fixtures/mock/prewarm.jsonl");
const TEXT_TURN: &str = include_str!("../../fixtures/mock/text_turn.jsonl");
const TOOL_CALL: &str = include_str!("../../fixtures/mock/tool_call.jsonl");
const FAILED_TURN: &str = include_str!("../../fixtures/mock/failed_turn.jsonl");
const PREV_NOT_FOUND: &str =
    include_str!("../../fixtures/mock/error_previous_response_not_found.json");

/// The command the mock's tool-call turn asks the client to run.
pub const TOOL_COMMAND: &str = "echo wsgate-tool-ok";

/// When a scripted close happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// After the create arrived, before any event.
    Before,
    /// After `response.created` and half of the deltas.
    Mid,
    /// Right after the terminal event.
    After,
    /// This long after the terminal event, while the connection idles.
    Idle(Duration),
    /// Before any event, but only on a connection that already served a turn (a stale reuse).
    Stale,
}

/// How a scripted close happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// A close frame with this code.
    Code(u16),
    /// Drop the TCP connection without a close frame (1006 on the other side).
    Eof,
}

/// Parsed `[[mock: ...]]` directives.
#[derive(Debug, Clone, PartialEq)]
pub struct Directives {
    pub deltas: usize,
    pub delta_size: usize,
    pub interval: Duration,
    /// Silence before the first event (the turn's "before first event" phase).
    pub delay: Duration,
    pub stall: Duration,
    pub tool: bool,
    pub close: Option<(CloseKind, Phase)>,
    pub fail: Option<String>,
    pub error: Option<(u16, String)>,
    /// `resets_in_seconds` of the `error` event (`error=429:usage_limit_reached:30`).
    pub resets_in_seconds: Option<u64>,
    /// After this turn, stop reading the socket (no pongs, no close replies).
    pub deaf: bool,
    /// This long after the turn, send an unsolicited event while the connection idles.
    pub junk_after: Option<Duration>,
    /// Mid-turn, send something a real upstream never sends: `binary`, `badutf8`, `huge`.
    pub inject: Option<String>,
    /// The tool call's command sleeps this long before printing (a long tool run).
    pub tool_sleep: Duration,
    /// After `response.created`, an event of a type no client knows (`x.custom`).
    pub custom: bool,
    /// End the text turn with `response.incomplete` instead of `response.completed`.
    pub incomplete: bool,
    /// The terminal's `response.output` is empty (as the ChatGPT backend sends it).
    pub empty_output: bool,
    /// The `error` event's message says the request is larger than a per-minute token limit
    /// (the real API's request-specific 429).
    pub too_large: bool,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            deltas: 3,
            delta_size: 0,
            interval: Duration::ZERO,
            delay: Duration::ZERO,
            stall: Duration::ZERO,
            tool: false,
            close: None,
            fail: None,
            error: None,
            resets_in_seconds: None,
            deaf: false,
            junk_after: None,
            inject: None,
            tool_sleep: Duration::ZERO,
            custom: false,
            incomplete: false,
            empty_output: false,
            too_large: false,
        }
    }
}

impl Directives {
    /// Parses every `[[mock: k=v, ...]]` block in `text`. Unknown keys are ignored.
    ///
    /// Keys: `deltas=N`, `size=BYTES` (per delta), `interval=MS` (between deltas),
    /// `delay=MS` (before the first event), `stall=MS` (after `response.created`), `tool` (a function-call turn),
    /// `close=CODE@PHASE` or `close=eof@PHASE` (PHASE: before, mid, after, idle:MS, stale),
    /// `deaf` (after the turn stop reading: no pongs), `junk=idle:MS` (an unsolicited event
    /// while idle), `inject=binary|badutf8|huge|linebreak` (mid-turn: a binary frame, a text
    /// frame that is not UTF-8, a 4 MiB event, or an event whose type holds raw line breaks),
    /// `fail=CODE` (`response.failed`), `error=STATUS:CODE[:RESETS_IN_SECONDS]` (an `error` event),
    /// `too_large` (that error's message says "Request too large": request-specific),
    /// `custom` (an `x.custom` event after `response.created`), `incomplete` (the text turn
    /// ends `response.incomplete`), `empty_output` (the terminal's `output` is `[]`),
    /// `tool_sleep=MS` (the tool call's command sleeps first).
    pub fn parse(text: &str) -> Directives {
        let mut d = Directives::default();
        let mut rest = text;
        while let Some(start) = rest.find("[[mock:") {
            let after = &rest[start + 7..];
            let Some(end) = after.find("]]") else { break };
            for part in after[..end].split(',') {
                let part = part.trim();
                let (k, v) = part.split_once('=').unwrap_or((part, ""));
                let ms = |v: &str| Duration::from_millis(v.parse().unwrap_or(0));
                match k.trim() {
                    "deltas" => d.deltas = v.parse().unwrap_or(d.deltas).min(10_000_000),
                    "size" => d.delta_size = v.parse().unwrap_or(0).min(16 * 1024 * 1024),
                    "interval" => d.interval = ms(v),
                    "delay" => d.delay = ms(v),
                    "stall" => d.stall = ms(v),
                    "tool" => d.tool = true,
                    "tool_sleep" => d.tool_sleep = ms(v),
                    "custom" => d.custom = true,
                    "incomplete" => d.incomplete = true,
                    "empty_output" => d.empty_output = true,
                    "deaf" => d.deaf = true,
                    "too_large" => d.too_large = true,
                    "inject" => d.inject = Some(v.to_string()),
                    "junk" => d.junk_after = Some(ms(v.strip_prefix("idle:").unwrap_or(v))),
                    "fail" => d.fail = Some(v.to_string()),
                    "error" => {
                        let mut parts = v.split(':');
                        if let (Some(s), Some(c)) = (parts.next(), parts.next()) {
                            d.error = Some((s.parse().unwrap_or(400), c.to_string()));
                            d.resets_in_seconds = parts.next().and_then(|r| r.parse().ok());
                        }
                    }
                    "close" => {
                        let (what, phase) = v.split_once('@').unwrap_or((v, "mid"));
                        let phase = match phase {
                            "before" => Phase::Before,
                            "after" => Phase::After,
                            "stale" => Phase::Stale,
                            p if p.starts_with("idle") => {
                                Phase::Idle(ms(p.strip_prefix("idle:").unwrap_or("100")))
                            }
                            _ => Phase::Mid,
                        };
                        let kind = match what {
                            "eof" => Some(CloseKind::Eof),
                            code => code.parse().ok().map(CloseKind::Code),
                        };
                        d.close = kind.map(|k| (k, phase));
                    }
                    _ => {}
                }
            }
            rest = &after[end..];
        }
        d
    }
}

/// The text of the last user message in a `response.create` body.
pub fn last_user_text(body: &Value) -> String {
    // `input` may be a plain string (SDK clients).
    if let Some(text) = body.get("input").and_then(Value::as_str) {
        return text.to_string();
    }
    let Some(items) = body.get("input").and_then(Value::as_array) else {
        return String::new();
    };
    for item in items.iter().rev() {
        if item.get("role").and_then(Value::as_str) == Some("user") {
            return match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => String::new(),
            };
        }
    }
    String::new()
}

/// The output of the last `function_call_output` item in the input, if any.
pub fn function_call_output(body: &Value) -> Option<String> {
    body.get("input")?
        .as_array()?
        .iter()
        .rev()
        .find_map(|item| {
            (item.get("type").and_then(Value::as_str) == Some("function_call_output")).then(|| {
                match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                }
            })
        })
}

/// The shell command of the mock's tool call: prints [`TOOL_COMMAND`]'s marker, after
/// `sleep` when one is asked for.
pub fn tool_command(sleep: Duration) -> String {
    if sleep.is_zero() {
        TOOL_COMMAND.to_string()
    } else {
        format!("sleep {:.3} && {TOOL_COMMAND}", sleep.as_secs_f64())
    }
}

/// A tool call the client can run: `(tool name, arguments JSON text)`, chosen from the tools
/// the request offers (Codex 0.171 offers `exec_command` with `{"cmd": ...}`).
pub fn choose_tool(body: &Value, command: &str) -> (String, String) {
    let names: Vec<&str> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| t.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if names.contains(&"exec_command") {
        ("exec_command".into(), json!({ "cmd": command }).to_string())
    } else if names.contains(&"shell_command") {
        (
            "shell_command".into(),
            json!({ "command": command }).to_string(),
        )
    } else if names.contains(&"shell") || names.is_empty() {
        (
            "shell".into(),
            json!({ "command": ["bash", "-lc", command] }).to_string(),
        )
    } else {
        (names[0].to_string(), "{}".into())
    }
}

/// Substitution values for a fixture.
pub struct Vars(pub Vec<(&'static str, Value)>);

impl Vars {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// The values as JSON text, serialized once for all the events of a turn that use them.
    pub fn texts(&self) -> VarTexts {
        VarTexts(
            self.0
                .iter()
                .map(|(k, v)| (*k, serde_json::to_string(v).unwrap_or_default()))
                .collect(),
        )
    }
}

/// [`Vars`] serialized (see [`Vars::texts`]).
pub struct VarTexts(Vec<(&'static str, String)>);

impl VarTexts {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn substitute(v: &mut Value, vars: &Vars) {
    match v {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix("{{").and_then(|r| r.strip_suffix("}}"))
                && let Some(val) = vars.get(name)
            {
                *v = val.clone();
                return;
            }
            if s.contains("{{") {
                for (k, val) in &vars.0 {
                    let pat = format!("{{{{{k}}}}}");
                    if s.contains(&pat) {
                        let text = match val {
                            Value::String(t) => t.clone(),
                            other => other.to_string(),
                        };
                        *s = s.replace(&pat, &text);
                    }
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| substitute(x, vars)),
        Value::Object(o) => o.values_mut().for_each(|x| substitute(x, vars)),
        _ => {}
    }
}

/// A fixture: its events, each a JSON value with placeholders, and each event's text split
/// at its whole-string placeholders (rendered without building a JSON value).
pub struct Fixture(Vec<Value>, Vec<Option<Template>>);

/// An event's text: `{"type":"..."` (where `sequence_number` goes), then literal text and
/// whole-string placeholders (`"{{name}}"`, replaced by the value's JSON).
struct Template {
    head: String,
    rest: Vec<Piece>,
}

enum Piece {
    Text(String),
    Var(String),
}

impl Template {
    /// `None` when the line does not start with its `type` or has a placeholder inside a
    /// longer string (those render through the JSON value).
    fn parse(line: &str) -> Option<Template> {
        let body = line.strip_prefix("{\"type\":\"")?;
        let end = body.find('"')?;
        let head = line[..9 + end + 1].to_string();
        let mut rest = Vec::new();
        let mut text = &line[head.len()..];
        while let Some(at) = text.find("{{") {
            let before = text[..at].strip_suffix('"')?;
            let after = &text[at + 2..];
            let close = after.find("}}\"")?;
            let name = &after[..close];
            if !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                return None;
            }
            rest.push(Piece::Text(before.to_string()));
            rest.push(Piece::Var(name.to_string()));
            text = &after[close + 3..];
        }
        rest.push(Piece::Text(text.to_string()));
        Some(Template { head, rest })
    }

    fn render(&self, vars: &VarTexts, seq: u64) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(256);
        out.push_str(&self.head);
        let _ = write!(out, ",\"sequence_number\":{seq}");
        for piece in &self.rest {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(name) => match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        let _ = write!(out, "\"{{{{{name}}}}}\"");
                    }
                },
            }
        }
        out
    }
}

#[derive(Clone, Copy)]
pub enum FixtureName {
    Prewarm,
    TextTurn,
    ToolCall,
    FailedTurn,
    PreviousResponseNotFound,
}

impl Fixture {
    /// The fixture, parsed once per process (turns render from the parsed events).
    pub fn load(name: FixtureName) -> &'static Fixture {
        static PARSED: std::sync::LazyLock<[Fixture; 5]> = std::sync::LazyLock::new(|| {
            [PREWARM, TEXT_TURN, TOOL_CALL, FAILED_TURN, PREV_NOT_FOUND].map(Fixture::parse)
        });
        &PARSED[match name {
            FixtureName::Prewarm => 0,
            FixtureName::TextTurn => 1,
            FixtureName::ToolCall => 2,
            FixtureName::FailedTurn => 3,
            FixtureName::PreviousResponseNotFound => 4,
        }]
    }

    fn parse(text: &str) -> Fixture {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        Fixture(
            lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| json!({"type": "error", "status": 500, "error": {"message": format!("bad fixture line: {e}")}})))
                .collect(),
            lines.iter().map(|l| Template::parse(l)).collect(),
        )
    }

    /// Event `i` rendered with `vars` straight to its text, `type` first and then
    /// `sequence_number`; `None` when the event has no text template.
    pub fn render_text(&self, i: usize, vars: &VarTexts, seq: u64) -> Option<String> {
        self.1.get(i)?.as_ref().map(|t| t.render(vars, seq))
    }

    pub fn events(&self) -> &[Value] {
        &self.0
    }

    /// Renders event `i` with `vars`.
    pub fn render(&self, i: usize, vars: &Vars) -> Value {
        let mut v = self.0[i].clone();
        substitute(&mut v, vars);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_templates_render_like_the_json_values() {
        let item =
            json!({"id": "msg_1", "type": "message", "content": [{"text": "a \"quoted\" b"}]});
        let vars = Vars(vec![
            ("id", json!("resp_1")),
            ("model", json!("m")),
            ("previous_response_id", Value::Null),
            ("usage", json!({"input_tokens": 3})),
            ("item_id", json!("msg_1")),
            ("text", json!("a \"quoted\" b\n")),
            ("delta", json!("d")),
            ("item", item),
        ]);
        let f = Fixture::load(FixtureName::TextTurn);
        for i in 0..f.events().len() {
            let text = f
                .render_text(i, &vars.texts(), 7 + i as u64)
                .expect("a template");
            assert!(text.starts_with("{\"type\":\""), "{text}");
            let mut want = f.render(i, &vars);
            want["sequence_number"] = json!(7 + i as u64);
            let got: Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(got, want, "event {i}");
        }
        // A placeholder inside a longer string renders through the JSON value.
        let failed = Fixture::load(FixtureName::FailedTurn);
        assert!(
            (0..failed.events().len()).any(|i| failed.render_text(i, &vars.texts(), 0).is_none())
        );
    }

    #[test]
    fn directives() {
        let d = Directives::parse(
            "hello [[mock: deltas=7, size=100, close=1012@mid, tool, interval=5, delay=40]] x",
        );
        assert_eq!(d.delay, Duration::from_millis(40));
        assert_eq!(d.deltas, 7);
        assert_eq!(d.delta_size, 100);
        assert_eq!(d.interval, Duration::from_millis(5));
        assert!(d.tool);
        assert_eq!(d.close, Some((CloseKind::Code(1012), Phase::Mid)));
        let d =
            Directives::parse("[[mock: close=eof@before]] [[mock: error=429:usage_limit_reached]]");
        assert_eq!(d.close, Some((CloseKind::Eof, Phase::Before)));
        assert_eq!(d.error, Some((429, "usage_limit_reached".into())));
        assert_eq!(Directives::parse("plain"), Directives::default());
    }

    #[test]
    fn fixtures_parse_and_substitute() {
        for name in [
            FixtureName::Prewarm,
            FixtureName::TextTurn,
            FixtureName::ToolCall,
            FixtureName::FailedTurn,
            FixtureName::PreviousResponseNotFound,
        ] {
            let f = Fixture::load(name);
            assert!(!f.events().is_empty());
            assert!(f.events().iter().all(|e| e.get("type").is_some()));
        }
        let f = Fixture::load(FixtureName::PreviousResponseNotFound);
        let v = f.render(0, &Vars(vec![("previous_response_id", json!("resp_9"))]));
        assert_eq!(
            v["error"]["message"],
            "Previous response with id 'resp_9' not found."
        );
        let f = Fixture::load(FixtureName::Prewarm);
        let v = f.render(
            1,
            &Vars(vec![
                ("id", json!("r")),
                ("usage", json!({"input_tokens": 1})),
            ]),
        );
        assert_eq!(v["response"]["usage"]["input_tokens"], 1);
    }

    #[test]
    fn user_text_and_tools() {
        let body = json!({"input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi [[mock: tool]]"}]},
            {"type": "function_call_output", "call_id": "c", "output": "wsgate-tool-ok"}
        ], "tools": [{"type": "function", "name": "exec_command"}]});
        assert_eq!(last_user_text(&body), "hi [[mock: tool]]");
        assert_eq!(
            function_call_output(&body).as_deref(),
            Some("wsgate-tool-ok")
        );
        let (name, args) = choose_tool(&body, TOOL_COMMAND);
        assert_eq!(name, "exec_command");
        assert!(args.contains("cmd"));
    }
}
