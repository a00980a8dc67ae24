//! Header rules (DESIGN §2, §6): lane and affinity resolution, what is forwarded upstream,
//! and what is copied from the upstream's 101 back to the client.
//!
//! Headers that describe an account (`openai-organization`, `openai-project`,
//! `chatgpt-account-id`, `authorization`) are never taken from the client: the dial sets them
//! from the account.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::ids::{ClientId, ConversationId, Route};

/// Lane headers, in the order they are looked at (DESIGN §2): a thread's own id first, so a
/// root thread and its sub-agents get a socket each.
pub const LANE_HEADERS: &[&str] = &[
    "thread-id",
    "x-client-request-id",
    "session-id",
    "session_id",
];

/// Affinity headers: a Codex process tree shares `session-id` (the root thread's id), so its
/// threads share an account and its prompt cache.
pub const AFFINITY_HEADERS: &[&str] = &["session-id", "session_id"];

// The same names parsed once: a lookup by `&str` parses and classifies the name on every call,
// and the opening handshake makes six of them (issue 14).
const LANE: [HeaderName; 4] = [
    HeaderName::from_static(LANE_HEADERS[0]),
    HeaderName::from_static(LANE_HEADERS[1]),
    HeaderName::from_static(LANE_HEADERS[2]),
    HeaderName::from_static(LANE_HEADERS[3]),
];
/// [`LANE`] without `x-client-request-id` (see [`HeaderIds::from_http_headers`]).
const HTTP_LANE: [HeaderName; 3] = [
    HeaderName::from_static(LANE_HEADERS[0]),
    HeaderName::from_static(LANE_HEADERS[2]),
    HeaderName::from_static(LANE_HEADERS[3]),
];
const AFFINITY: [HeaderName; 2] = [
    HeaderName::from_static(AFFINITY_HEADERS[0]),
    HeaderName::from_static(AFFINITY_HEADERS[1]),
];
const ORIGINATOR: HeaderName = HeaderName::from_static("originator");

/// Exact names forwarded client -> upstream.
const FORWARD: &[&str] = &[
    "openai-beta",
    "originator",
    "version",
    "session_id",
    "session-id",
    "thread-id",
    "x-client-request-id",
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

/// The lane and affinity ids the upgrade headers carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderIds {
    pub lane: Option<ConversationId>,
    pub affinity: Option<ConversationId>,
}

impl HeaderIds {
    /// Reads both ids. A header present but invalid is an error (the client gets HTTP 400),
    /// not a silent fallback.
    pub fn from_headers(headers: &HeaderMap) -> Result<HeaderIds, String> {
        Ok(HeaderIds {
            lane: first_id(headers, &LANE)?,
            affinity: first_id(headers, &AFFINITY)?,
        })
    }

    /// [`HeaderIds::from_headers`] for an HTTP request: `x-client-request-id` names a lane
    /// only when an `originator` header marks a Codex client (Codex sets it to the thread id;
    /// SDK clients may send a fresh id per request, which would open a lane per request).
    pub fn from_http_headers(headers: &HeaderMap) -> Result<HeaderIds, String> {
        if headers.contains_key(ORIGINATOR) {
            return Self::from_headers(headers);
        }
        Ok(HeaderIds {
            lane: first_id(headers, &HTTP_LANE)?,
            affinity: first_id(headers, &AFFINITY)?,
        })
    }

    /// The route: lane = headers, else the body's `prompt_cache_key`; affinity = the
    /// `session-id` header, else `prompt_cache_key`, else the lane.
    pub fn route(&self, client: ClientId, prompt_cache_key: Option<ConversationId>) -> Route {
        let lane = self.lane.clone().or_else(|| prompt_cache_key.clone());
        let affinity = self
            .affinity
            .clone()
            .or(prompt_cache_key)
            .or_else(|| lane.clone());
        Route {
            client,
            lane,
            affinity,
        }
    }
}

fn first_id(headers: &HeaderMap, names: &[HeaderName]) -> Result<Option<ConversationId>, String> {
    for name in names {
        if let Some(v) = headers.get(name) {
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

    fn ids(pairs: &[(&str, &str)]) -> (Option<String>, Option<String>) {
        let r = HeaderIds::from_headers(&map(pairs))
            .unwrap()
            .route(ClientId::anonymous(), None);
        (
            r.lane.map(|l| l.to_string()),
            r.affinity.map(|a| a.to_string()),
        )
    }

    #[test]
    fn lane_and_affinity_order() {
        // A Codex sub-agent: its own thread id is the lane, the root's session id the affinity.
        let sub = ids(&[
            ("x-client-request-id", "child"),
            ("thread-id", "child"),
            ("session-id", "root"),
        ]);
        assert_eq!(sub, (Some("child".into()), Some("root".into())));
        assert_eq!(
            ids(&[("x-client-request-id", "c"), ("session_id", "s")]),
            (Some("c".into()), Some("s".into()))
        );
        assert_eq!(
            ids(&[("session_id", "u"), ("session-id", "a")]),
            (Some("a".into()), Some("a".into()))
        );
        assert_eq!(
            ids(&[("thread-id", "t")]),
            (Some("t".into()), Some("t".into()))
        );
        assert_eq!(ids(&[]), (None, None));
        assert!(HeaderIds::from_headers(&map(&[("session-id", "has space")])).is_err());
        // The body's prompt_cache_key fills what the headers lack.
        let pck = Some(ConversationId::new("pck"));
        let r = HeaderIds::default().route(ClientId::anonymous(), pck.clone());
        assert_eq!(
            (r.lane.clone(), r.affinity.clone()),
            (pck.clone(), pck.clone())
        );
        let r = HeaderIds::from_headers(&map(&[("thread-id", "t")]))
            .unwrap()
            .route(ClientId::anonymous(), pck.clone());
        assert_eq!(r.affinity, pck);
        assert_eq!(r.distinct_affinity(), pck.as_ref());
    }

    #[test]
    fn parsed_names_match_the_lists() {
        let names = |h: &[HeaderName]| h.iter().map(|n| n.as_str().to_string()).collect::<Vec<_>>();
        assert_eq!(names(&LANE), LANE_HEADERS);
        assert_eq!(names(&AFFINITY), AFFINITY_HEADERS);
        let http: Vec<&str> = LANE_HEADERS
            .iter()
            .copied()
            .filter(|h| *h != "x-client-request-id")
            .collect();
        assert_eq!(names(&HTTP_LANE), http);
    }

    #[test]
    fn http_lanes_ignore_per_request_ids_of_non_codex_clients() {
        let sdk = map(&[("x-client-request-id", "req-1")]);
        assert_eq!(HeaderIds::from_http_headers(&sdk).unwrap().lane, None);
        let codex = map(&[("x-client-request-id", "t1"), ("originator", "codex_exec")]);
        assert_eq!(
            HeaderIds::from_http_headers(&codex)
                .unwrap()
                .lane
                .unwrap()
                .as_str(),
            "t1"
        );
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
            ("openai-organization", "org-evil"),
            ("openai-project", "proj-evil"),
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
