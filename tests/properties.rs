//! Property tests (issue 6, item 4): config parsing and the client-frame path never panic on
//! arbitrary input, and agree with a full JSON parse where they overlap.

use std::time::Duration;

use proptest::prelude::*;
use wsgate::config::Config;
use wsgate::event::{self, ClientEvent};
use wsgate::ids::ConversationId;

fn duration() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u64..100_000).prop_map(|n| format!("{n}ms")),
        (1u64..10_000).prop_map(|n| format!("{n}s")),
        (1u64..600).prop_map(|n| format!("{n}m")),
        "[a-z0-9 ]{0,6}",
    ]
}

fn yaml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        duration(),
        "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("null".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("true".to_string()),
    ]
}

const KEYS: &[&str] = &[
    "listen",
    "paths",
    "clients",
    "accounts",
    "upstream.url",
    "upstream.connect_timeout",
    "pool.enabled",
    "pool.max_age",
    "pool.idle_timeout",
    "pool.max_per_account",
    "pool.max_total",
    "pool.ping_interval",
    "pool.busy_wait",
    "relay.buffer_frames",
    "relay.max_message_size",
    "relay.read_buffer_size",
    "relay.max_queued_frames",
    "limits.turn_idle_timeout",
    "limits.max_client_connections",
    "routing.cooldown",
    "log.level",
    "log.format",
    "pool.max_aeg",
    "nonsense",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary key/value combinations: a config or a clear error, never a panic.
    #[test]
    fn config_parsing_never_panics(pairs in proptest::collection::vec((proptest::sample::select(KEYS), yaml_value()), 0..6)) {
        let mut yaml = String::new();
        let mut seen = std::collections::HashSet::new();
        for (key, value) in pairs {
            if !seen.insert(key) { continue; }
            match key.split_once('.') {
                Some((section, field)) => yaml.push_str(&format!("{section}:\n  {field}: {value}\n")),
                None => yaml.push_str(&format!("{key}: {value}\n")),
            }
        }
        match Config::from_yaml(&yaml) {
            Ok(c) => prop_assert!(c.validate().is_ok()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// A valid config survives a round trip through its own serialization (JSON is YAML).
    #[test]
    fn valid_configs_round_trip(max_total in 1usize..10_000, per_account in 1usize..1000, buffer in 1usize..4096,
                                age_s in 1u64..100_000, ping_ms in 10u64..600_000, clients_empty in any::<bool>()) {
        let mut c = Config::default();
        c.pool.max_total = max_total;
        c.pool.max_per_account = per_account;
        c.relay.buffer_frames = buffer;
        c.pool.max_age = Duration::from_secs(age_s);
        c.pool.ping_interval = Duration::from_millis(ping_ms);
        if clients_empty { c.clients.clear(); }
        let text = serde_json::to_string(&c).unwrap();
        let back = Config::from_yaml(&text).unwrap();
        prop_assert_eq!(back, c);
    }

    /// Any client frame text: parse gives an event or a typed error, never a panic.
    #[test]
    fn client_frames_never_panic(text in "\\PC{0,200}") {
        let _ = ClientEvent::parse(&text);
        let _ = event::sniff_type(&text);
        let _ = event::Terminal::inspect("error", &text);
    }

    /// Structured events: the fast sniffer agrees with a full parse.
    #[test]
    fn sniff_agrees_with_serde(ty in "[a-z._]{1,30}", delta in "\\PC{0,40}", first in any::<bool>()) {
        let text = if first {
            serde_json::json!({"type": ty, "delta": delta}).to_string()
        } else {
            format!("{{\"delta\":{},\"type\":{}}}", serde_json::to_string(&delta).unwrap(), serde_json::to_string(&ty).unwrap())
        };
        let full: serde_json::Value = serde_json::from_str(&text).unwrap();
        let sniffed = event::sniff_type(&text);
        prop_assert_eq!(sniffed.as_deref(), full["type"].as_str());
        let parsed = ClientEvent::parse(&text).unwrap();
        prop_assert_eq!(parsed.kind(), ty.as_str());
    }

    /// Conversation ids from headers: accepted exactly when 1..=256 visible ASCII characters.
    #[test]
    fn conversation_ids(id in "\\PC{0,300}") {
        let ok = !id.is_empty() && id.len() <= 256 && id.bytes().all(|b| b.is_ascii_graphic());
        prop_assert_eq!(ConversationId::parse(&id).is_ok(), ok);
    }
}
