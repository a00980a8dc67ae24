//! Header rules (DESIGN §2, §6): conversation-id resolution, what is forwarded upstream,
//! and what is copied from the upstream's 101 back to the client.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::ids::ConversationId;

/// Conversation id headers, in the order they are looked at.
pub const CONVERSATION_HEADERS: &[&str] = &[
    "session_id",
    "session-id",
    "thread-id",
    "x-client-request-id",
];

/// Exact names forwarded client -> upstream.
const FORWARD: &[&str] = &[
    "openai-beta",
    "originator",
    "version",
    "session_id",
    "session-id",
    "thread-id",
    "x-client-request-id",
    "openai-organization",
    "openai-project",
];

/// Copied from the upstream 101 onto the client's 101.
pub const RESPONSE_COPY: &[&str] = &[
    "x-codex-turn-state",
    "x-models-etag",
    "x-reasoning-included",
    "openai-model",
];

/// Headers at most this long are forwarded; longer ones are dropped.
const MAX_FORWARDED_VALUE: usize = 8 * 1024;

/// The conversation id from the first header that has one. A header present but invalid is an
/// error (the client gets HTTP 400), not a silent fallback.
pub fn conversation_from_headers(headers: &HeaderMap) -> Result<Option<ConversationId>, String> {
    for name in CONVERSATION_HEADERS {
        if let Some(v) = headers.get(*name) {
            let s = v
                .to_str()
                .map_err(|_| format!("header `{name}` is not visible ASCII"))?;
            return ConversationId::parse(s)
                .map(Some)
                .map_err(|e| format!("header `{name}` {e}"));
        }
    }
    Ok(None)
}

/// The client headers that go upstream, captured at the handshake (kept for later dials).
#[derive(Debug, Clone, Default)]
pub struct ForwardHeaders(Vec<(HeaderName, HeaderValue)>);

impl ForwardHeaders {
    pub fn from_client(headers: &HeaderMap) -> Self {
        let mut out = Vec::new();
        for (name, value) in headers {
            let n = name.as_str();
            if (FORWARD.contains(&n) || n.starts_with("x-codex-"))
                && value.len() <= MAX_FORWARDED_VALUE
            {
                out.push((name.clone(), value.clone()));
            }
        }
        ForwardHeaders(out)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
        self.0.iter()
    }
}

/// The subset of an upstream 101's headers that the client sees.
pub fn response_copy(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    RESPONSE_COPY
        .iter()
        .filter_map(|n| {
            headers
                .get(*n)
                .map(|v| (HeaderName::from_static(n), v.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn conversation_order() {
        let h = map(&[
            ("x-client-request-id", "c"),
            ("thread-id", "b"),
            ("session-id", "a"),
        ]);
        assert_eq!(
            conversation_from_headers(&h).unwrap().unwrap().as_str(),
            "a"
        );
        let h = map(&[("x-client-request-id", "c"), ("thread-id", "b")]);
        assert_eq!(
            conversation_from_headers(&h).unwrap().unwrap().as_str(),
            "b"
        );
        let h = map(&[("session_id", "u"), ("session-id", "a")]);
        assert_eq!(
            conversation_from_headers(&h).unwrap().unwrap().as_str(),
            "u"
        );
        assert!(conversation_from_headers(&map(&[])).unwrap().is_none());
        assert!(conversation_from_headers(&map(&[("session-id", "has space")])).is_err());
    }

    #[test]
    fn forwarding_allow_list() {
        let h = map(&[
            ("authorization", "Bearer client"),
            ("openai-beta", "responses_websockets=2026-02-06"),
            ("originator", "codex_exec"),
            ("session-id", "s"),
            ("x-codex-turn-metadata", "{}"),
            ("chatgpt-account-id", "from-client"),
            ("sec-websocket-key", "k"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("host", "gw"),
            ("cookie", "c"),
        ]);
        let f = ForwardHeaders::from_client(&h);
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "openai-beta",
                "originator",
                "session-id",
                "x-codex-turn-metadata"
            ]
        );
    }

    #[test]
    fn response_headers_copied() {
        let h = map(&[
            ("x-codex-turn-state", "t"),
            ("openai-model", "m"),
            ("set-cookie", "no"),
        ]);
        let out = response_copy(&h);
        assert_eq!(out.len(), 2);
    }
}
