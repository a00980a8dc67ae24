//! Turn integrity and tenant isolation (issue 10): an upstream event reaches only the turn it
//! belongs to, one client key never rides another's connection, account-describing headers
//! come from the account, request-specific refusals do not cool accounts, one-shots are
//! bounded, sub-agents get a socket each, and odd upgrade answers become 502.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use wsgate::client::{Client, ClientError, create_body};
use wsgate::mock::{MockConfig, MockUpstream};
use wsgate::{Config, config::Secrets};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

/// Reads frames until `n` turns ended with `response.completed`; fails on any other terminal
/// event of a response. Gateway `error` events are kept and returned with the rest.
async fn read_completed(c: &mut Client, n: usize) -> Vec<Value> {
    let mut frames = Vec::new();
    let mut done = 0;
    while done < n {
        let v = c.recv().await.expect("a frame");
        match v["type"].as_str().unwrap_or("") {
            "response.completed" => done += 1,
            "response.failed" | "response.incomplete" => panic!("turn failed: {v}"),
            _ => {}
        }
        frames.push(v);
    }
    frames
}

/// The response ids named by frames (`response.id`, or the `resp_…` prefix of a delta).
fn response_ids(frames: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = frames
        .iter()
        .filter_map(|f| {
            f["response"]["id"]
                .as_str()
                .map(str::to_string)
                .or_else(|| {
                    f["delta"]
                        .as_str()
                        .and_then(|d| d.split(' ').next())
                        .map(str::to_string)
                })
        })
        .collect();
    ids.dedup();
    ids
}

#[tokio::test]
async fn unknown_client_events_never_reach_the_upstream_nor_end_a_turn() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("unknown");
    let mut c = gw.connect(&conv).await;
    let slow = create_body(Some(&conv), "[[mock: deltas=20, interval=10]]", None);
    c.send_json(&slow).await.unwrap();
    // Mid-turn: an event type the gateway does not know, then the next request.
    c.recv().await.unwrap();
    c.send_json(&json!({"type": "response.cancel"}))
        .await
        .unwrap();
    c.send_json(&create_body(Some(&conv), "second", None))
        .await
        .unwrap();
    let frames = read_completed(&mut c, 2).await;
    let refusals: Vec<&Value> = frames.iter().filter(|f| f["type"] == "error").collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["status"], 400);
    assert_eq!(refusals[0]["error"]["code"], "unsupported_event_type");
    // Two turns, each with only its own response, in order.
    let ids = response_ids(&frames);
    assert_eq!(ids.len(), 2, "{ids:?}");
    let first_deltas = frames
        .iter()
        .take_while(|f| f["type"] != "response.completed")
        .filter(|f| f["type"] == "response.output_text.delta")
        .count();
    assert_eq!(first_deltas, 20, "the first turn kept all its deltas");
    let conn = mock.connection(1).expect("one upstream connection");
    assert_eq!(
        conn.received_types(),
        ["response.create", "response.create"],
        "the unknown event never reached the upstream"
    );
    assert_eq!(mock.overlaps(), 0, "never two creates in flight upstream");
    c.close().await;
    gw.assert_quiescent("unknown event").await;
    gw.stop().await;
}

/// Also when the answer's first events arrive in one read (a mock that writes what it has
/// before each pause): the relay then takes them, `response.created` included, as one raw run
/// before reading any, and the ledger must still learn from the created that the response is
/// running (else the steer's error would read as the create's answer and end the turn; a
/// relay that took `response.created` raw without reading it afterwards failed here).
#[tokio::test]
async fn a_steer_the_upstream_rejects_mid_turn_does_not_end_the_turn() {
    for batched in [false, true] {
        steer_rejected_mid_turn(batched).await;
    }
}

async fn steer_rejected_mid_turn(batched: bool) {
    let mock = MockUpstream::start(MockConfig {
        speed: batched,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("steer");
    let mut c = gw.connect(&conv).await;
    c.send_json(&create_body(
        Some(&conv),
        "[[mock: deltas=20, interval=10]]",
        None,
    ))
    .await
    .unwrap();
    c.recv().await.unwrap();
    c.send_json(&json!({"type": "response.steer", "input": [{"type": "message", "role": "user", "content": "faster"}]}))
        .await
        .unwrap();
    // The next request, held behind the turn in flight.
    c.send_json(&create_body(Some(&conv), "after the steer", None))
        .await
        .unwrap();
    let frames = read_completed(&mut c, 2).await;
    let rejected: Vec<&Value> = frames.iter().filter(|f| f["type"] == "error").collect();
    assert_eq!(rejected.len(), 1, "the upstream's answer to the steer");
    assert_eq!(rejected[0]["error"]["code"], "steering_not_supported");
    let first = frames
        .iter()
        .position(|f| f["type"] == "response.completed")
        .unwrap();
    let first_deltas = frames[..first]
        .iter()
        .filter(|f| f["type"] == "response.output_text.delta")
        .count();
    assert_eq!(
        first_deltas, 20,
        "batched={batched}: the steer's error did not end the first turn"
    );
    assert_eq!(response_ids(&frames).len(), 2);
    assert_eq!(
        mock.connection(1).unwrap().received_types(),
        ["response.create", "response.steer", "response.create"]
    );
    assert_eq!(
        mock.overlaps(),
        0,
        "the second create waited for the first's end"
    );
    c.close().await;
    // The error could have answered the steer or the response: the connection is never pooled.
    gw.assert_quiescent("after the steer").await;
    assert_eq!(
        gw.gateway.pool_stats().idle,
        0,
        "an uncertain connection is discarded"
    );
    let mut again = gw.connect(&conv).await;
    let t = again
        .turn(&create_body(Some(&conv), "fresh", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    let d = decisions(&conv);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d[1].starts_with("new "), "not reused: {d:?}");
    again.close().await;
    gw.stop().await;
}

/// A gateway with two client keys: `alpha` (`test-client-key`) and `beta` (`beta-key`).
fn two_tenants(upstream: &str, accounts: &[&str]) -> (Config, Secrets) {
    let yaml = test_yaml(upstream, accounts, "").replace(
        "clients:\n  - name: test\n    key_env: TEST_CLIENT_KEY\n",
        "clients:\n  - name: alpha\n    key_env: TEST_CLIENT_KEY\n  - name: beta\n    key_env: BETA_KEY\n",
    );
    let config = Config::from_yaml(&yaml).expect("config");
    let secrets = config
        .resolve_secrets(&|k| match k {
            "TEST_CLIENT_KEY" => Some("test-client-key".into()),
            "BETA_KEY" => Some("beta-key".into()),
            k => k
                .strip_prefix("KEY_")
                .map(|a| format!("sk-{}", a.to_lowercase().replace('_', "-"))),
        })
        .expect("secrets");
    (config, secrets)
}

fn as_tenant<'a>(key: &'a str, conversation: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("authorization", key),
        ("session-id", conversation),
        ("thread-id", conversation),
        ("x-client-request-id", conversation),
    ]
}

#[tokio::test]
async fn another_client_key_never_rides_the_same_connection() {
    init();
    let mock = mock().await;
    let (config, secrets) = two_tenants(&mock.url(), &["acct-a"]);
    let gw = start_with(config, secrets).await;
    let conv = unique("shared-id");
    let alpha = as_tenant("Bearer test-client-key", &conv);
    let beta = as_tenant("Bearer beta-key", &conv);

    // alpha completes a turn; its connection idles in the pool holding alpha's response.
    let mut a = Client::connect(&gw.url(), &alpha).await.unwrap();
    let t = a
        .turn(&create_body(Some(&conv), "alpha's secret", None))
        .await
        .unwrap();
    let alphas_response = t.response_id().unwrap().to_string();
    a.close().await;
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().idle == 1).await);

    // beta presents the same conversation id: a connection of its own.
    let mut b = Client::connect(&gw.url(), &beta).await.unwrap();
    assert_eq!(mock.accepted(), 2, "beta did not get alpha's connection");
    // beta tries to continue alpha's response: refused locally, sent nowhere.
    let stolen = b
        .turn(&create_body(
            Some(&conv),
            "continue",
            Some(&alphas_response),
        ))
        .await
        .unwrap();
    assert_eq!(stolen.terminal()["status"], 400);
    assert_eq!(
        stolen.terminal()["error"]["code"],
        "previous_response_not_found"
    );
    assert_eq!(
        mock.connection(1).unwrap().received_types().len(),
        1,
        "nothing reached alpha's connection"
    );
    assert_eq!(mock.connection(2).unwrap().received_types().len(), 0);

    // alpha runs a slow turn on its connection and leaves mid-turn; beta's turns meanwhile
    // and afterwards carry only beta's own responses.
    let mut a = Client::connect(&gw.url(), &alpha).await.unwrap();
    a.send_json(&create_body(
        Some(&conv),
        "[[mock: deltas=40, interval=10]]",
        None,
    ))
    .await
    .unwrap();
    a.recv().await.unwrap();
    a.abort();
    let t = b
        .turn(&create_body(Some(&conv), "beta's own", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    b.close().await;
    gw.assert_quiescent("alpha left mid-turn").await;
    let mut b = Client::connect(&gw.url(), &beta).await.unwrap();
    let t = b
        .turn(&create_body(Some(&conv), "beta again", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    for frame in &t.events {
        if let Some(id) = frame["response"]["id"].as_str() {
            assert!(
                id.starts_with("resp_2_"),
                "beta saw a frame of another connection's response: {frame}"
            );
        }
    }
    let clients: Vec<String> = log_lines(&["pool decision", &format!("conversation={conv} ")])
        .iter()
        .map(|l| {
            l.split(" client=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(clients, ["alpha", "beta", "alpha", "beta"]);
    assert_eq!(
        decisions(&conv),
        ["new miss", "new miss", "reuse -", "reuse -"]
    );
    b.close().await;
    gw.assert_quiescent("tenants").await;
    gw.stop().await;
}

#[tokio::test]
async fn client_organization_headers_never_reach_the_upstream() {
    let mock = MockUpstream::start(MockConfig {
        organization: Some("org-good".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let extra = "";
    let yaml = test_yaml(&mock.url(), &["acct-a", "acct-b"], extra).replace(
        "    api_key_env: KEY_ACCT_A\n",
        "    api_key_env: KEY_ACCT_A\n    organization: org-good\n    project: proj-good\n",
    );
    init();
    let config = Config::from_yaml(&yaml).unwrap();
    let secrets = config
        .resolve_secrets(&|k| match k {
            "TEST_CLIENT_KEY" => Some("test-client-key".into()),
            k => k.strip_prefix("KEY_").map(|a| format!("sk-{a}")),
        })
        .unwrap();
    let gw = start_with(config, secrets).await;
    for i in 0..6 {
        let conv = unique(&format!("org{i}"));
        let mut headers = gw.codex_headers(&conv);
        headers.push(("openai-organization", "org-evil"));
        headers.push(("openai-project", "proj-evil"));
        let mut c = Client::connect(&gw.url(), &headers)
            .await
            .expect("the client's organization header changes nothing");
        let t = c.turn(&create_body(Some(&conv), "hi", None)).await.unwrap();
        assert!(t.is_completed());
        c.close().await;
    }
    assert_eq!(mock.refused(), 0, "the mock never saw org-evil");
    for conn in mock.connections() {
        let auth = conn.header("authorization").unwrap();
        let (org, project) = (
            conn.header("openai-organization"),
            conn.header("openai-project"),
        );
        if auth.ends_with("ACCT_A") {
            assert_eq!((org, project), (Some("org-good"), Some("proj-good")));
        } else {
            assert_eq!((org, project), (None, None), "acct-b configures none");
        }
    }
    assert!(mock.connections().len() >= 2, "both accounts served");
    assert_eq!(gw.gateway.account_state("acct-a"), Some("usable"));
    assert_eq!(gw.gateway.account_state("acct-b"), Some("usable"));
    gw.assert_quiescent("organizations").await;
    gw.stop().await;

    // A 401 about the organization is not about the credential: the account stays usable.
    let yaml = test_yaml(&mock.url(), &["acct-a"], "").replace(
        "    api_key_env: KEY_ACCT_A\n",
        "    api_key_env: KEY_ACCT_A\n    organization: org-wrong\n",
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let secrets = config.resolve_secrets(&|k| Some(format!("v-{k}"))).unwrap();
    let gw = start_with(config, secrets).await;
    let conv = unique("org-wrong");
    let refused = Client::connect(&gw.url(), &as_tenant("Bearer v-TEST_CLIENT_KEY", &conv)).await;
    assert!(
        matches!(&refused, Err(ClientError::Refused { status: 401, body }) if body.contains("upstream_rejected")),
        "{:?}",
        refused.err()
    );
    assert_eq!(gw.gateway.account_state("acct-a"), Some("usable"));
    gw.stop().await;
}

#[tokio::test]
async fn a_request_specific_429_leaves_the_account_usable() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    let conv = unique("too-large");
    let account = gw.account_of(&conv);
    let mut c = gw.connect(&conv).await;
    let t = c
        .turn(&create_body(
            Some(&conv),
            "[[mock: error=429:rate_limit_exceeded, too_large]]",
            None,
        ))
        .await
        .unwrap();
    assert_eq!(t.terminal()["status"], 429, "forwarded as it is");
    assert!(
        t.terminal()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Request too large")
    );
    assert_eq!(gw.gateway.account_state(&account), Some("usable"));
    // The conversation stays where it was, on the same connection.
    let t = c
        .turn(&create_body(Some(&conv), "smaller", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    assert_eq!(gw.account_of(&conv), account);
    assert!(evictions(&conv).is_empty(), "{:?}", evictions(&conv));
    assert_eq!(mock.accepted(), 1);
    c.close().await;

    // An account-wide limit still cools the account (the contrast).
    let conv2 = unique("limited");
    let mut c = gw.connect(&conv2).await;
    let limited = gw.account_of(&conv2);
    let t = c
        .turn(&create_body(
            Some(&conv2),
            "[[mock: error=429:rate_limit_exceeded]]",
            None,
        ))
        .await
        .unwrap();
    assert_eq!(t.terminal()["status"], 429);
    assert_eq!(gw.gateway.account_state(&limited), Some("cooling"));
    c.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn one_client_opening_many_sessions_cannot_cool_the_accounts() {
    let mock = MockUpstream::start(MockConfig {
        max_open: Some(6),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |c| {
        c.pool.max_total = 6;
    })
    .await;
    let shared = unique("many");
    let mut sessions = Vec::new();
    let mut refused = 0;
    // 20 sessions of one client: ten on one lane (one pooled, then one-shots), ten on lanes
    // of their own.
    for i in 0..20 {
        let conv = if i < 10 {
            shared.clone()
        } else {
            unique("many-own")
        };
        match Client::connect(&gw.url(), &gw.codex_headers(&conv)).await {
            Ok(c) => sessions.push((conv, c)),
            Err(ClientError::Refused { status: 503, body }) => {
                assert!(body.contains("upstream_capacity"), "{body}");
                refused += 1;
            }
            Err(e) => panic!("session {i}: {e}"),
        }
    }
    assert_eq!(sessions.len(), 6, "pool.max_total bounds one-shots too");
    assert_eq!(refused, 14);
    assert_eq!(mock.refused(), 0, "the upstream never had to refuse");
    assert!(mock.open() <= 6);
    for (conv, c) in &mut sessions {
        let t = c.turn(&create_body(Some(conv), "hi", None)).await.unwrap();
        assert!(t.is_completed());
    }
    assert_eq!(gw.gateway.account_state("acct-a"), Some("usable"));
    assert_eq!(gw.gateway.account_state("acct-b"), Some("usable"));
    for (_, c) in sessions {
        c.close().await;
    }
    gw.assert_quiescent("many sessions").await;
    assert_eq!(gw.gateway.pool_stats().one_shots, 0);
    gw.stop().await;
}

/// Codex's headers for thread `thread` of the process tree rooted at `root`.
fn sub_agent<'a>(root: &'a str, thread: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("authorization", "Bearer test-client-key"),
        ("session-id", root),
        ("thread-id", thread),
        ("x-client-request-id", thread),
        ("x-openai-subagent", "collab_spawn"),
    ]
}

#[tokio::test]
async fn a_root_thread_and_its_sub_agents_get_a_socket_each_on_one_account() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b", "acct-c"], |_| {}).await;
    let root = unique("root");
    let threads = [root.clone(), unique("child1"), unique("child2")];
    let mut clients = Vec::new();
    for t in &threads {
        clients.push(
            Client::connect(&gw.url(), &sub_agent(&root, t))
                .await
                .unwrap(),
        );
    }
    // Concurrent turns, all with the root's prompt_cache_key (as Codex sends it).
    for c in &mut clients {
        c.send_json(&create_body(
            Some(&root),
            "[[mock: deltas=10, interval=10]]",
            None,
        ))
        .await
        .unwrap();
    }
    for c in &mut clients {
        let t = c.read_turn().await.unwrap();
        assert!(t.is_completed(), "{:?}", t.terminal());
    }
    assert_eq!(mock.accepted(), 3, "a socket per thread");
    assert_eq!(mock.overlaps(), 0);
    let accounts: Vec<String> = mock
        .connections()
        .iter()
        .map(|c| c.header("authorization").unwrap().to_string())
        .collect();
    assert!(
        accounts.iter().all(|a| a == &accounts[0]),
        "one account (one prompt cache) for the tree: {accounts:?}"
    );
    for t in &threads[1..] {
        let line = log_lines(&["pool decision", &format!("conversation={t} ")]);
        assert!(line[0].contains(&format!("affinity={root}")), "{}", line[0]);
    }
    for c in clients {
        c.close().await;
    }
    gw.assert_quiescent("sub-agents").await;
    // Each thread's reconnect reuses its own connection.
    for t in &threads {
        let mut c = Client::connect(&gw.url(), &sub_agent(&root, t))
            .await
            .unwrap();
        let turn = c
            .turn(&create_body(Some(&root), "again", None))
            .await
            .unwrap();
        assert_eq!(turn.cached_tokens().map(|c| c > 0), Some(true));
        c.close().await;
        assert_eq!(decisions(t), ["new miss", "reuse -"], "thread {t}");
    }
    assert_eq!(mock.accepted(), 3);
    assert!(log_lines(&["pool decision", "reason=busy", &root]).is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn upgrade_answers_other_than_4xx_5xx_become_502() {
    for status in [200u16, 302, 100] {
        let mock = MockUpstream::start(MockConfig {
            reject_status: Some(status),
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
        match Client::connect(&gw.url(), &gw.codex_headers(&unique("odd"))).await {
            Err(ClientError::Refused { status: got, body }) => {
                assert_eq!(got, 502, "upstream {status}: {body}");
            }
            other => panic!("{status}: expected a refusal, got {:?}", other.map(|_| ())),
        }
        assert_eq!(gw.gateway.account_state("acct-a"), Some("usable"));
        gw.assert_quiescent("odd upgrade answer").await;
        gw.stop().await;
    }
}

#[tokio::test]
async fn an_http_1_0_upgrade_is_refused_before_any_dial() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = raw_upgrade(&unique("http10")).replace("HTTP/1.1", "HTTP/1.0");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!((400..500).contains(&status), "{head}");
    assert_eq!(mock.accepted(), 0, "nothing dialed");
    assert_eq!(gw.gateway.pool_stats().total, 0);
    gw.stop().await;
}

/// A client text frame as RFC 6455 has it: FIN, text, masked with `mask`.
fn masked_text_frame(text: &str, mask: [u8; 4]) -> Vec<u8> {
    let payload = text.as_bytes();
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads a response head; returns it and any bytes read past it.
async fn read_head(s: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response head in time")
            .unwrap();
        assert!(n > 0, "closed before a response head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
    }
}

/// Reads frames until the turn's terminal; returns its type.
async fn turn_terminal(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> String {
    use futures::StreamExt;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("events in time")
            .expect("open")
            .unwrap();
        let Ok(text) = msg.to_text() else { continue };
        let v: Value = serde_json::from_str(text).unwrap();
        let ty = v["type"].as_str().unwrap_or_default().to_string();
        if matches!(
            ty.as_str(),
            "response.completed" | "response.failed" | "response.incomplete" | "error"
        ) {
            return ty;
        }
    }
}

#[tokio::test]
async fn both_opening_handshake_paths_carry_a_session() {
    use futures::SinkExt;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;

    // The fast path: the head and the first frame in one write (the frame is read with the
    // head and must reach the session).
    let conversation = unique("fast");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let create = wsgate::client::create_text(Some(&conversation), "hello", None);
    let mut bytes = raw_upgrade(&conversation).into_bytes();
    bytes.extend(masked_text_frame(&create, [7, 1, 9, 3]));
    s.write_all(&bytes).await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut fast = WebSocketStream::from_partially_read(s, rest, Role::Client, None).await;
    assert_eq!(turn_terminal(&mut fast).await, "response.completed");

    // hyper's path: the head split over two writes (the fast path sees half a head).
    let conversation = unique("split");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = raw_upgrade(&conversation);
    let (a, b) = req.split_at(20);
    s.write_all(a.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b.as_bytes()).await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(rest.is_empty());
    let mut split = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    split
        .send(tokio_tungstenite::tungstenite::Message::text(
            wsgate::client::create_text(Some(&conversation), "hello", None),
        ))
        .await
        .unwrap();
    assert_eq!(turn_terminal(&mut split).await, "response.completed");

    // A refusal on the fast path is a whole HTTP response, then the connection closes.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = raw_upgrade(&unique("badkey")).replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    s.write_all(req.as_bytes()).await.unwrap();
    let (head, _) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        closed_within(&mut s, Duration::from_secs(5))
            .await
            .is_some(),
        "closed after the refusal"
    );
    drop((fast, split));
    gw.assert_quiescent("both handshake paths").await;
    gw.stop().await;
}
