//! The previous ways of reading upstream events: a serde parse of the whole event into structs
//! holding the wanted fields, and (for a terminal) the structural scan's one walk of the whole
//! event that a `response.completed` took before it was read from its two ends. Kept as the
//! references the structural scan ([`super::scan`]) is tested against (it must agree on every
//! well-formed event) and benchmarked against (`benches/hot_path.rs`); nothing on the relay
//! path calls them.

use serde::Deserialize;

use super::{ErrorBody, Terminal};

/// [`Terminal::inspect`] as a serde parse of the whole event.
pub fn inspect(ty: &str, text: &str) -> Terminal {
    #[derive(Deserialize, Default)]
    struct Details {
        #[serde(default)]
        cached_tokens: u64,
    }
    #[derive(Deserialize, Default)]
    struct Usage {
        #[serde(default)]
        input_tokens: u64,
        #[serde(default)]
        input_tokens_details: Option<Details>,
    }
    #[derive(Deserialize, Default)]
    struct Incomplete {
        #[serde(default)]
        reason: Option<String>,
    }
    #[derive(Deserialize, Default)]
    struct Response {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        usage: Option<Usage>,
        #[serde(default)]
        error: Option<ErrorBody>,
        #[serde(default)]
        incomplete_details: Option<Incomplete>,
    }
    #[derive(Deserialize, Default)]
    struct Event {
        #[serde(default)]
        status: Option<u16>,
        #[serde(default)]
        error: Option<ErrorBody>,
        #[serde(default)]
        response: Option<Response>,
    }
    let ev: Event = serde_json::from_str(text).unwrap_or_default();
    let mut t = Terminal {
        kind: ty.to_string().into(),
        ..Terminal::default()
    };
    let response = ev.response.unwrap_or_default();
    t.response_id = response.id;
    t.steered = ty == "response.incomplete"
        && response
            .incomplete_details
            .and_then(|d| d.reason)
            .is_some_and(|r| r == "steered");
    if ty == "response.completed" {
        t.usage = response.usage.map(|u| {
            (
                u.input_tokens,
                u.input_tokens_details.map(|d| d.cached_tokens).unwrap_or(0),
            )
        });
        return t;
    }
    t.failure(
        ev.status.map(u64::from),
        ev.error.or(response.error).unwrap_or_default(),
    );
    t
}

/// [`super::response_id`] as a serde parse of the whole event.
pub fn response_id(text: &str) -> Option<String> {
    #[derive(Deserialize, Default)]
    struct Response {
        #[serde(default)]
        id: Option<String>,
    }
    #[derive(Deserialize, Default)]
    struct Event {
        #[serde(default)]
        response: Option<Response>,
    }
    serde_json::from_str::<Event>(text)
        .unwrap_or_default()
        .response
        .unwrap_or_default()
        .id
}

/// [`Terminal::inspect`] as it read every terminal before stop 42: one walk of the whole
/// event, a `response.completed` included (now read from its two ends). Kept to test the two
/// ends against and to benchmark beside them.
pub fn inspect_walked(ty: &str, text: &str) -> Terminal {
    Terminal::read(ty, text, false)
}
