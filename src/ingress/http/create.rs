//! A Responses create body (`POST`) checked and turned into the one `response.create` frame
//! the upstream gets. The body is read once, field by field: only the members the gateway acts
//! on are kept (`model` and `input` checked, `stream`, `background`, `previous_response_id`,
//! `prompt_cache_key`); every other value (the instructions, the tools, the input history: tens
//! of kilobytes for a Codex turn) is skipped without being built. A member written twice counts
//! from its last writing, as it would in a parsed object. The body then goes upstream as it
//! is, behind the event type.

use std::borrow::Cow;
use std::fmt;

use axum::response::Response;
use http::StatusCode;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::event;
use crate::server::json_error;

/// The fields of a create request the gateway acts on.
pub(super) struct CreateRequest {
    /// The `response.create` frame.
    pub(super) frame: Utf8Bytes,
    pub(super) stream: bool,
    pub(super) previous: Option<String>,
    pub(super) cache_key: Option<String>,
}

fn invalid(message: impl Into<String>) -> Response {
    json_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        &message.into(),
    )
}

/// Validates a Responses create body and turns it into one `response.create` frame.
#[allow(clippy::result_large_err)] // the refusal is the handler's answer, returned at once
pub(super) fn parse_create(body: &[u8], max_frame: usize) -> Result<CreateRequest, Response> {
    let text = std::str::from_utf8(body).map_err(|_| invalid("the body is not UTF-8 JSON"))?;
    let f: Fields = serde_json::from_str(text)
        .map_err(|e| invalid(format!("the body is not a JSON object: {e}")))?;
    if !f.model.as_ref().is_some_and(Value::is_string) {
        return Err(invalid("`model` (a string) is required"));
    }
    if !f.input {
        return Err(invalid("`input` is required"));
    }
    if f.background.as_ref().and_then(Value::as_bool) == Some(true) {
        return Err(invalid(
            "`background: true` is not supported by this gateway (its upstream is WebSocket mode)",
        ));
    }
    let string = |v: Option<Value>| match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let stream = f.stream.as_ref().and_then(Value::as_bool) == Some(true);
    let previous = string(f.previous).filter(|p| !p.is_empty());
    let cache_key = string(f.cache_key);
    let frame = if f.typed {
        // A body that names a type of its own (rare): its type replaced, re-serialized.
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| invalid(format!("the body is not a JSON object: {e}")))?;
        v.insert("type".into(), json!(event::RESPONSE_CREATE));
        Value::Object(v).to_string()
    } else {
        // Spliced, not re-serialized.
        let rest = text.trim_start().strip_prefix('{').unwrap_or_default();
        let sep = if rest.trim_start().starts_with('}') {
            ""
        } else {
            ","
        };
        format!("{{\"type\":\"{}\"{sep}{rest}", event::RESPONSE_CREATE)
    };
    if frame.len() > max_frame {
        return Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!(
                "the request is larger than the upstream accepts ({max_frame} bytes, relay.max_message_size)"
            ),
        ));
    }
    Ok(CreateRequest {
        frame: frame.into(),
        stream,
        previous,
        cache_key,
    })
}

/// The members of a create body the gateway reads, each from its last writing; the small ones
/// as values (their type is checked), `input` as whether it is there and not null.
#[derive(Default)]
struct Fields {
    model: Option<Value>,
    input: bool,
    stream: Option<Value>,
    background: Option<Value>,
    previous: Option<Value>,
    cache_key: Option<Value>,
    /// The body has a `type` member.
    typed: bool,
}

/// A member name, borrowed from the body unless it has escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields, M::Error> {
                let mut f = Fields::default();
                while let Some(Key(key)) = map.next_key()? {
                    match &*key {
                        "model" => f.model = Some(map.next_value()?),
                        "input" => f.input = map.next_value::<Option<IgnoredAny>>()?.is_some(),
                        "stream" => f.stream = Some(map.next_value()?),
                        "background" => f.background = Some(map.next_value()?),
                        "previous_response_id" => f.previous = Some(map.next_value()?),
                        "prompt_cache_key" => f.cache_key = Some(map.next_value()?),
                        other => {
                            f.typed |= other == "type";
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(f)
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies_become_one_frame() {
        let c = parse_create(br#"{"model":"m","input":"hi","stream":true}"#, 1 << 20).unwrap();
        assert_eq!(
            &*c.frame,
            r#"{"type":"response.create","model":"m","input":"hi","stream":true}"#
        );
        assert!(c.stream);
        let c = parse_create(
            br#"{"type":"x","model":"m","input":[],"previous_response_id":"r1"}"#,
            1 << 20,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&c.frame).unwrap();
        assert_eq!(v["type"], "response.create");
        assert_eq!(c.previous.as_deref(), Some("r1"));
        assert!(!c.stream);
        for bad in [
            &br#"[1]"#[..],
            br#"{"input":"x"}"#,
            br#"{"model":"m"}"#,
            br#"{"model":"m","input":"x","background":true}"#,
            b"not json",
        ] {
            assert!(parse_create(bad, 1 << 20).is_err());
        }
        assert_eq!(
            parse_create(br#"{"model":"m","input":"hi"}"#, 10)
                .err()
                .unwrap()
                .status(),
            413
        );
    }

    /// The reading this module replaced: the whole body parsed into an object. Kept as the
    /// reference the field-by-field reading must agree with.
    fn reference(body: &str) -> Option<(bool, Option<String>, Option<String>)> {
        let v: serde_json::Map<String, Value> = serde_json::from_str(body).ok()?;
        if !v.get("model").is_some_and(Value::is_string)
            || v.get("input").is_none_or(Value::is_null)
            || v.get("background").and_then(Value::as_bool) == Some(true)
        {
            return None;
        }
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Some((
            v.get("stream").and_then(Value::as_bool) == Some(true),
            s("previous_response_id").filter(|p| !p.is_empty()),
            s("prompt_cache_key"),
        ))
    }

    #[test]
    fn fields_are_read_as_a_parsed_object_reads_them() {
        let bodies = [
            r#"{"model":"m","input":"x"}"#,
            r#"{"model":"m","input":null}"#,
            r#"{"model":1,"input":"x"}"#,
            r#"{"model":"m","input":[{"type":"message","content":[{"text":"a\"b}"}]}],"stream":true}"#,
            r#"{"model":"m","input":"x","stream":"true"}"#,
            r#"{"model":"m","input":"x","background":false,"stream":false}"#,
            r#"{"model":"m","input":"x","background":"yes"}"#,
            // Written twice: the last writing counts.
            r#"{"model":"m","input":"x","stream":true,"stream":false}"#,
            r#"{"model":"m","input":"x","input":null}"#,
            r#"{"model":"m","input":null,"input":0}"#,
            r#"{"model":"m","model":{},"input":"x"}"#,
            r#"{"model":"m","input":"x","previous_response_id":"r1","previous_response_id":"r2"}"#,
            // Escaped member names and values.
            r#"{"mod\u0065l":"m","input":"x","prompt_cache_key":"c\u00e9"}"#,
            r#"{"model":"m","input":"x","previous_response_id":""}"#,
            r#"{"model":"m","input":"x","previous_response_id":7,"prompt_cache_key":null}"#,
            r#"{"model":"m","input":"x","tools":[{"a":{"b":[1,2,{"c":null}]}}],"x":1e5}"#,
            r#"  {"model" : "m" , "input" : "x" }  "#,
            r#"{"model":"m","input":"x",}"#,
            r#"{"model":"m","input":"x"} trailing"#,
            r#"{"model":"m","input":"x""#,
            r#"[{"model":"m","input":"x"}]"#,
            r#""model""#,
            "{}",
        ];
        for body in bodies {
            let ours = parse_create(body.as_bytes(), 1 << 20)
                .ok()
                .map(|c| (c.stream, c.previous, c.cache_key));
            assert_eq!(ours, reference(body), "{body}");
        }
    }
}
