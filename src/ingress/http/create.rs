//! A Responses create body (`POST`) checked and turned into the one `response.create` frame
//! the upstream gets. The body is read once, field by field: only the members the gateway acts
//! on are kept (`model` and `input` checked, `stream`, `background`, `previous_response_id`,
//! `prompt_cache_key`), and of those only a string or a boolean is kept; every other value
//! (the instructions, the tools, the input history: tens of kilobytes for a Codex turn, or a
//! hostile array in a member we read) is skipped without being built, so reading a body costs
//! no memory beyond its bytes. A member written twice counts from its last writing, as it
//! would in a parsed object. The body then goes upstream as it is, behind the event type.

use std::borrow::Cow;
use std::fmt;

use axum::response::Response;
use http::StatusCode;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
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
    if !matches!(f.model, Some(Small::Str(_))) {
        return Err(invalid("`model` (a string) is required"));
    }
    if !f.input {
        return Err(invalid("`input` is required"));
    }
    if matches!(f.background, Some(Small::Bool(true))) {
        return Err(invalid(
            "`background: true` is not supported by this gateway (its upstream is WebSocket mode)",
        ));
    }
    let stream = matches!(f.stream, Some(Small::Bool(true)));
    let previous = f.previous.and_then(Small::string).filter(|p| !p.is_empty());
    let cache_key = f.cache_key.and_then(Small::string);
    let frame = if f.typed {
        // A body that names a type of its own (rare): its `type` members left out, the rest
        // copied member by member as written.
        retyped(text).map_err(|e| invalid(format!("the body is not a JSON object: {e}")))?
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
/// as what their type makes them to the gateway, `input` as whether it is there and not null.
#[derive(Default)]
struct Fields<'a> {
    model: Option<Small<'a>>,
    input: bool,
    stream: Option<Small<'a>>,
    background: Option<Small<'a>>,
    previous: Option<Small<'a>>,
    cache_key: Option<Small<'a>>,
    /// The body has a `type` member.
    typed: bool,
}

/// A member's value as far as the gateway reads it: a string, a boolean, or anything else
/// (a number, null, an array, an object), which is checked as JSON and skipped, never built.
#[derive(Debug, PartialEq)]
enum Small<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Other,
}

impl Small<'_> {
    fn string(self) -> Option<String> {
        match self {
            Small::Str(s) => Some(s.into_owned()),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Small<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SmallVisitor;
        impl<'de> Visitor<'de> for SmallVisitor {
            type Value = Small<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Small<'de>, E> {
                Ok(Small::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Small<'de>, E> {
                Ok(Small::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Small<'de>, E> {
                Ok(Small::Str(Cow::Owned(v)))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Small<'de>, E> {
                Ok(Small::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Small<'de>, E> {
                Ok(Small::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Small<'de>, E> {
                Ok(Small::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Small<'de>, E> {
                Ok(Small::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Small<'de>, E> {
                Ok(Small::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Small<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Small::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Small<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Small::Other)
            }
        }
        d.deserialize_any(SmallVisitor)
    }
}

/// `text` (a JSON object) as a `response.create` frame: its `type` members (however their
/// name is escaped) left out, every other member copied as written, no value parsed into a
/// tree.
fn retyped(text: &str) -> serde_json::Result<String> {
    struct Retyped(String);
    impl<'de> Visitor<'de> for Retyped {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<M: MapAccess<'de>>(mut self, mut map: M) -> Result<String, M::Error> {
            let out = &mut self.0;
            while let Some(Key(key)) = map.next_key()? {
                let value: &RawValue = map.next_value()?;
                if key == "type" {
                    continue;
                }
                out.push(',');
                // The name as JSON again (escapes, if it had any, written anew).
                out.push_str(&serde_json::to_string(&key).map_err(de::Error::custom)?);
                out.push(':');
                out.push_str(value.get());
            }
            out.push('}');
            Ok(self.0)
        }
    }
    let mut out = String::with_capacity(text.len() + 32);
    out.push_str(&format!("{{\"type\":\"{}\"", event::RESPONSE_CREATE));
    let mut d = serde_json::Deserializer::from_str(text);
    let frame = serde::Deserializer::deserialize_map(&mut d, Retyped(out))?;
    d.end()?;
    Ok(frame)
}

/// A member name, borrowed from the body unless it has escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields<'de>, M::Error> {
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
    use serde_json::{Value, json};

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

    #[test]
    fn small_members_keep_strings_and_booleans_only() {
        fn small(v: &str) -> Small<'_> {
            serde_json::from_str(v).unwrap()
        }
        assert_eq!(small(r#""m""#), Small::Str(Cow::Borrowed("m")));
        assert!(matches!(small(r#""\u00e9""#), Small::Str(Cow::Owned(s)) if s == "é"));
        assert_eq!(small("true"), Small::Bool(true));
        for other in [
            "null",
            "0",
            "-1",
            "1.5e3",
            "[]",
            "[1,[2,{\"a\":[]}]]",
            r#"{"a":{"b":1}}"#,
        ] {
            assert_eq!(small(other), Small::Other, "{other}");
        }
        // Skipped, still checked: malformed JSON inside a skipped value is refused.
        for bad in ["[1,", r#"{"a"}"#, "[tru]"] {
            assert!(serde_json::from_str::<Small>(bad).is_err(), "{bad}");
        }
    }

    /// A typed body's frame is its members (its `type`s left out, however written) behind
    /// `"type":"response.create"`, each as written: the object it parses to is the body's
    /// object with its type replaced, as the reading it replaced made it.
    #[test]
    fn a_typed_body_is_retyped_member_by_member() {
        let bodies = [
            r#"{"type":"x","model":"m","input":[]}"#,
            r#"{"model":"m","input":"x","type":"response.cancel"}"#,
            r#"{"typ\u0065":"response.inject","model":"m","input":"x"}"#,
            r#"{"type":1,"model":"m","type":{"a":[1]},"input":"x","type":null}"#,
            r#" { "type" : "x" , "model" : "m" , "input" : [ { "a" : "b\"}" } ] , "t\"k" : 1e5 } "#,
            r#"{"type":"x","model":"m","input":"x","input":null,"model":"n"}"#,
        ];
        for body in bodies {
            let frame = retyped(body).unwrap();
            assert!(frame.starts_with(r#"{"type":"response.create""#), "{frame}");
            let ours: serde_json::Map<String, Value> = serde_json::from_str(&frame).unwrap();
            let mut theirs: serde_json::Map<String, Value> = serde_json::from_str(body).unwrap();
            theirs.insert("type".into(), json!(event::RESPONSE_CREATE));
            assert_eq!(ours, theirs, "{body}");
            // Exactly one `type` member: nothing a client writes reaches the upstream as the
            // event's type.
            assert_eq!(frame.matches(r#""type""#).count(), 1, "{frame}");
        }
        assert!(retyped(r#"{"type":"x","model":"m""#).is_err());
        assert!(retyped(r#"{"type":"x"} {}"#).is_err());
        assert!(retyped("[]").is_err());
    }
}
