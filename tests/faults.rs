//! Close-code policy and failure tests (issue 2): 1012/1013 evict and pass through, other
//! upstream failures become `error` events with a top-level status, a client that leaves
//! mid-turn poisons its upstream, and an account change evicts.

mod support;

use std::time::Duration;

use support::*;
use wsgate::client::create_body;
use wsgate::mock::{MockConfig, MockUpstream};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

async fn restart_code_is_forwarded_and_evicts(code: u16) {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique(&format!("close{code}"));
    // A healthy first session puts the connection in the pool.
    gw.warm(&conv).await;

    // The reused connection is closed by the upstream mid-turn.
    let mut s2 = gw.connect(&conv).await;
    let err = s2
        .turn(&create_body(
            Some(&conv),
            &format!("[[mock: deltas=8, close={code}@mid]]"),
            None,
        ))
        .await
        .expect_err("the turn is cut by the upstream");
    assert_eq!(err.close_code(), Some(code), "{err}");
    assert_eq!(evictions(&conv), [format!("close_{code}")]);

    // Never reused: the next session dials a new connection and says why.
    let mut s3 = gw.connect(&conv).await;
    assert!(
        s3.turn(&create_body(Some(&conv), "full context", None))
            .await
            .unwrap()
            .is_completed()
    );
    assert_eq!(decisions(&conv), ["new miss", "reuse -", "new evicted"]);
    assert_eq!(mock.accepted(), 2);
    s3.close().await;
    gw.assert_quiescent(&format!("close {code}")).await;
    gw.stop().await;
}

#[tokio::test]
async fn upstream_1012_mid_turn_is_forwarded_and_evicts() {
    restart_code_is_forwarded_and_evicts(1012).await;
}

#[tokio::test]
async fn upstream_1013_mid_turn_is_forwarded_and_evicts() {
    restart_code_is_forwarded_and_evicts(1013).await;
}

async fn failure_becomes_error_event(directive: &str) {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("fail");
    let mut s1 = gw.connect(&conv).await;
    let t = s1
        .turn(&create_body(Some(&conv), directive, None))
        .await
        .expect("an error event, not a close");
    let ev = t.terminal();
    assert_eq!(ev["type"], "error", "{ev}");
    assert_eq!(ev["status"], 502, "top-level status so Codex retries: {ev}");
    assert_eq!(ev["error"]["code"], "upstream_closed");
    assert!(
        t.events.iter().any(|e| e["type"] == "response.created"),
        "events before the failure were relayed"
    );
    assert_eq!(evictions(&conv), ["dead"]);

    // The session stays usable: a full request goes to a fresh connection.
    let t2 = s1
        .turn(&create_body(Some(&conv), "retry with full context", None))
        .await
        .unwrap();
    assert!(t2.is_completed());
    // A continuation of the dead connection's response is refused, never sent elsewhere.
    let t3 = s1
        .turn(&create_body(Some(&conv), "continue", Some("resp_1_1")))
        .await
        .unwrap();
    assert_eq!(
        t3.terminal()["error"]["code"],
        "previous_response_not_found"
    );
    s1.close().await;

    let mut s2 = gw.connect(&conv).await;
    assert!(
        s2.turn(&create_body(Some(&conv), "again", None))
            .await
            .unwrap()
            .is_completed()
    );
    s2.close().await;
    assert_eq!(decisions(&conv), ["new miss", "new dead", "reuse -"]);
    assert_eq!(mock.accepted(), 2);
    gw.assert_quiescent(directive).await;
    gw.stop().await;
}

#[tokio::test]
async fn upstream_1011_mid_turn_becomes_error_event_and_is_not_reused() {
    failure_becomes_error_event("[[mock: deltas=6, close=1011@mid]]").await;
}

#[tokio::test]
async fn upstream_eof_mid_turn_becomes_error_event_and_is_not_reused() {
    failure_becomes_error_event("[[mock: deltas=6, close=eof@mid]]").await;
}

#[tokio::test]
async fn client_leaving_mid_turn_discards_the_upstream_and_late_frames_never_leak() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("leave");
    let mut s1 = gw.connect(&conv).await;
    s1.send_json(&create_body(
        Some(&conv),
        "[[mock: deltas=200, interval=10]]",
        None,
    ))
    .await
    .unwrap();
    let mut first_id = None;
    for _ in 0..4 {
        let ev = s1.recv().await.unwrap();
        if ev["type"] == "response.created" {
            first_id = ev["response"]["id"].as_str().map(str::to_string);
        }
    }
    let first_id = first_id.expect("saw response.created");
    s1.abort();
    assert!(
        wait_until(Duration::from_secs(5), || mock.open() == 0).await,
        "upstream closed"
    );
    assert_eq!(evictions(&conv), ["discarded"]);

    let mut s2 = gw.connect(&conv).await;
    let t = s2
        .turn(&create_body(Some(&conv), "fresh", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    let mine = t.response_id().unwrap().to_string();
    assert_ne!(mine, first_id);
    for ev in &t.events {
        assert!(
            !ev.to_string().contains(&first_id),
            "late frame of the abandoned turn leaked: {ev}"
        );
    }
    assert_eq!(decisions(&conv), ["new miss", "new discarded"]);
    assert_eq!(mock.accepted(), 2);
    s2.close().await;
    gw.assert_quiescent("client left mid-turn").await;
    gw.stop().await;
}

#[tokio::test]
async fn account_change_evicts_and_moves_the_conversation() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    let conv = unique("move");
    let first = gw.account_of(&conv);
    gw.warm(&conv).await;

    assert_eq!(gw.gateway.disable_account(&first), 1);
    assert_eq!(evictions(&conv), ["account_changed"]);
    assert!(
        wait_until(Duration::from_secs(5), || mock.open() == 0).await,
        "the old connection is closed"
    );

    let second = gw.account_of(&conv);
    assert_ne!(first, second);
    let mut s2 = gw.connect(&conv).await;
    assert!(
        s2.turn(&create_body(Some(&conv), "hi again", None))
            .await
            .unwrap()
            .is_completed()
    );
    s2.close().await;
    assert_eq!(decisions(&conv), ["new miss", "new miss"]);
    let lines = log_lines(&["pool decision", &format!("conversation={conv} ")]);
    assert!(
        lines[0].contains(&format!("account={first} "))
            && lines[1].contains(&format!("account={second} ")),
        "{lines:?}"
    );
    assert_eq!(
        mock.connection(2).unwrap().header("authorization").unwrap(),
        account_key(&second)
    );
    gw.stop().await;
}

#[tokio::test]
async fn account_change_during_a_session_moves_on_and_never_sends_a_continuation_elsewhere() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    let conv = unique("live");
    let first = gw.account_of(&conv);
    let mut s = gw.connect(&conv).await;
    let t1 = s.turn(&create_body(Some(&conv), "hi", None)).await.unwrap();
    gw.gateway.disable_account(&first);
    // The account is gone: its connection is left, and the continuation is refused with the
    // code that makes clients resend full context, instead of reaching a connection without
    // its parent.
    let t2 = s
        .turn(&create_body(Some(&conv), "continue", t1.response_id()))
        .await
        .unwrap();
    assert_eq!(t2.terminal()["status"], 400);
    assert_eq!(
        t2.terminal()["error"]["code"],
        "previous_response_not_found"
    );
    // The full request moves to the new account.
    let t3 = s
        .turn(&create_body(Some(&conv), "full", None))
        .await
        .unwrap();
    assert!(t3.is_completed());
    assert!(t3.response_id().unwrap().starts_with("resp_2_"));
    let second = gw.account_of(&conv);
    assert_ne!(first, second);
    assert_eq!(
        mock.connection(2).unwrap().header("authorization").unwrap(),
        account_key(&second)
    );
    assert_eq!(
        mock.connection(1)
            .unwrap()
            .creates
            .load(std::sync::atomic::Ordering::Acquire),
        1
    );
    s.close().await;
    assert!(
        wait_until(Duration::from_secs(5), || mock.open() == 1).await,
        "the evicted connection was not pooled"
    );
    gw.stop().await;
}

/// A client without a conversation id header upgrades first; the upstream is dialed at its
/// first request. Sends two requests (fresh conversations) and returns their terminal events;
/// the session stays open through both.
async fn first_requests(gw: &TestGateway) -> [serde_json::Value; 2] {
    let mut c = gw.connect_without_conversation().await;
    let mut out = [serde_json::Value::Null, serde_json::Value::Null];
    for ev in &mut out {
        let conv = unique("first-request");
        let t = c.turn(&create_body(Some(&conv), "hi", None)).await.unwrap();
        *ev = t.terminal().clone();
    }
    c.close().await;
    out
}

/// Both of [`first_requests`] fail with an `error` event of `status` and `code`.
async fn assert_first_request_fails(gw: &TestGateway, status: u16, code: &str) {
    for ev in first_requests(gw).await {
        assert_eq!(ev["type"], "error", "{status}: {ev}");
        assert_eq!(ev["status"], status, "{status}: {ev}");
        assert_eq!(ev["error"]["code"], code, "{status}: {ev}");
    }
}

#[tokio::test]
async fn upstream_handshake_failures_reach_the_client_with_their_status() {
    use wsgate::client::{Client, ClientError};
    // Refused: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("ws://{}/v1/responses", closed.local_addr().unwrap());
    drop(closed);
    init();
    let (config, secrets) = config(&dead_url, &["acct-a"]);
    let gw = start_with(config, secrets).await;
    let refused = Client::connect(&gw.url(), &gw.codex_headers(&unique("refused"))).await;
    assert!(
        matches!(&refused, Err(ClientError::Refused { status: 502, body }) if body.contains("upstream_connect_failed")),
        "{:?}",
        refused.err()
    );
    assert_eq!(gw.gateway.pool_stats().total, 0);
    assert_first_request_fails(&gw, 502, "upstream_connect_failed").await;
    gw.assert_quiescent("upstream refused").await;
    gw.stop().await;

    // Timed out: the upstream never finishes its handshake in time.
    let slow = MockUpstream::start(MockConfig {
        handshake_delay: std::time::Duration::from_secs(3),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&slow, &["acct-a"], |c| {
        c.upstream.connect_timeout = Duration::from_millis(300)
    })
    .await;
    let timed_out = Client::connect(&gw.url(), &gw.codex_headers(&unique("slow"))).await;
    assert!(
        matches!(&timed_out, Err(ClientError::Refused { status: 504, body }) if body.contains("upstream_timeout")),
        "{:?}",
        timed_out.err()
    );
    assert_first_request_fails(&gw, 504, "upstream_timeout").await;
    gw.assert_quiescent("upstream handshake timeout").await;
    gw.stop().await;

    // HTTP statuses on the upstream upgrade come back as the same status before the client's own upgrade.
    for status in [401u16, 403, 500, 426] {
        let mock = MockUpstream::start(MockConfig {
            reject_status: Some(status),
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
        match Client::connect(&gw.url(), &gw.codex_headers(&unique("status"))).await {
            Err(ClientError::Refused { status: got, body }) => {
                assert_eq!(got, status, "{body}");
                assert!(body.contains("upstream_rejected"), "{body}");
            }
            other => panic!("{status}: expected a refusal, got {:?}", other.map(|_| ())),
        }
        assert_eq!(
            gw.gateway.pool_stats().total,
            0,
            "{status}: the failed dial released its slot"
        );
        gw.assert_quiescent(&format!("upstream {status}")).await;
        gw.stop().await;

        // Without a conversation id header the client upgrades first and the upstream is
        // dialed at its first request: the refusal is an `error` event with the same status.
        // A credential refusal (a 401 naming no other cause) takes the only account out until
        // `routing.auth_retry`, so the next request hears that no account is usable; other
        // refusals (this 403 names no credential code) are the request's and repeat.
        let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
        let [first, second] = first_requests(&gw).await;
        assert_eq!(
            (&first["type"], &first["status"], &first["error"]["code"]),
            (&"error".into(), &status.into(), &"upstream_rejected".into()),
            "{status}: {first}"
        );
        let (want_status, want_code) = match status {
            401 => (429, "all_accounts_unavailable"),
            _ => (status, "upstream_rejected"),
        };
        assert_eq!(
            (&second["status"], &second["error"]["code"]),
            (&want_status.into(), &want_code.into()),
            "{status}: {second}"
        );
        gw.assert_quiescent(&format!("upstream {status} at the first request"))
            .await;
        gw.stop().await;
    }

    // 429 on the upgrade: that client gets HTTP 429, and the account cools down, so the next
    // client upgrades and its request gets a 429 event with a retry hint.
    let mock = MockUpstream::start(MockConfig {
        reject_status: Some(429),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let first = Client::connect(&gw.url(), &gw.codex_headers(&unique("limited"))).await;
    assert!(
        matches!(&first, Err(ClientError::Refused { status: 429, .. })),
        "{:?}",
        first.err()
    );
    assert_eq!(gw.gateway.account_state("acct-a"), Some("cooling"));
    let conv = unique("limited");
    let mut c = gw.connect(&conv).await;
    let t = c.turn(&create_body(Some(&conv), "hi", None)).await.unwrap();
    assert_eq!(t.terminal()["status"], 429);
    assert_eq!(t.terminal()["error"]["code"], "all_accounts_unavailable");
    assert!(
        t.terminal()["error"]["resets_in_seconds"]
            .as_u64()
            .is_some()
    );
    c.close().await;
    gw.assert_quiescent("upstream 429").await;
    gw.stop().await;
}

#[tokio::test]
async fn origin_allow_list() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.allowed_origins = vec!["https://ok.example".into()]
    })
    .await;
    let conv = unique("origin");
    let mut h = gw.codex_headers(&conv);
    h.push(("origin", "https://evil.example"));
    match wsgate::client::Client::connect(&gw.url(), &h).await {
        Err(wsgate::client::ClientError::Refused { status, body }) => {
            assert_eq!(status, 403);
            assert!(body.contains("origin_not_allowed"));
        }
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let mut ok = gw.codex_headers(&conv);
    ok.push(("origin", "https://ok.example"));
    wsgate::client::Client::connect(&gw.url(), &ok)
        .await
        .unwrap()
        .close()
        .await;
    // No Origin at all (Codex): accepted.
    gw.connect(&conv).await.close().await;
    assert_eq!(
        mock.accepted(),
        1,
        "the refused request never dialed upstream"
    );
    gw.stop().await;
}

/// What the client of a turn should see when the upstream closes with `code` in `phase`.
#[derive(Debug)]
enum Expect {
    CloseCode(u16),
    ErrorStatus(u16),
    Completed,
}

#[tokio::test]
async fn upstream_close_table_every_code_and_phase() {
    let mock = mock().await;
    // Every combination leaves its conversation's connection pooled: room for all of them.
    let gw = start_gateway(&mock, &["acct-a"], |c| c.pool.max_per_account = 100).await;
    let mut bystander = gw.bystander().await;
    for code in ["eof", "1009", "1011", "1012", "1013"] {
        for phase in ["before", "mid", "after", "idle:100"] {
            let row = format!("{code}@{phase}");
            let conv = unique(&format!("table-{code}"));
            bystander.start().await;
            let restart = code == "1012" || code == "1013";
            let expect = match (phase, restart) {
                ("before" | "mid", true) => Expect::CloseCode(code.parse().unwrap()),
                ("before" | "mid", false) => Expect::ErrorStatus(502),
                _ => Expect::Completed,
            };
            let mut c = gw.connect(&conv).await;
            let directive = format!("[[mock: deltas=4, close={code}@{phase}]]");
            let got = c.turn(&create_body(Some(&conv), &directive, None)).await;
            match (&expect, &got) {
                (Expect::CloseCode(want), Err(e)) => {
                    assert_eq!(e.close_code(), Some(*want), "{code}@{phase}: {e}")
                }
                (Expect::ErrorStatus(want), Ok(t)) => assert_eq!(
                    t.terminal()["status"],
                    *want,
                    "{code}@{phase}: {:?}",
                    t.terminal()
                ),
                (Expect::Completed, Ok(t)) => {
                    assert!(t.is_completed(), "{code}@{phase}: {:?}", t.terminal())
                }
                _ => panic!(
                    "{code}@{phase}: expected {expect:?}, got {:?}",
                    got.as_ref()
                        .map(|t| t.terminal().clone())
                        .map_err(|e| e.to_string())
                ),
            }
            if phase == "after" && restart {
                // A restart code between turns is passed to the client too.
                let e = c.recv().await.unwrap_err();
                assert_eq!(e.close_code(), code.parse().ok(), "{code}@{phase}");
                c.abort();
            } else if matches!(expect, Expect::CloseCode(_)) {
                c.abort();
            } else {
                c.close().await;
            }
            // Whatever happened, the conversation works again at once, and nothing is left over.
            if phase.starts_with("idle") {
                let evicted = || !evictions(&conv).is_empty();
                assert!(
                    wait_until(Duration::from_secs(5), evicted).await,
                    "{code}@{phase}: idle close evicted"
                );
            }
            let mut again = gw.connect(&conv).await;
            let t = again
                .turn(&create_body(Some(&conv), "next session", None))
                .await
                .unwrap();
            assert!(
                t.is_completed(),
                "{code}@{phase}: next session {:?}",
                t.terminal()
            );
            again.close().await;
            bystander.finish(&row).await;
            // Nothing left over but the bystander's session.
            gw.assert_settled(1, &row).await;
            // The failed connection was never handed out again.
            let lines = decisions(&conv);
            assert_eq!(lines.len(), 2, "{code}@{phase}: {lines:?}");
            assert!(
                lines[1].starts_with("new"),
                "{code}@{phase}: the next session got a fresh connection: {lines:?}"
            );
        }
    }
    bystander.close().await;
    gw.assert_quiescent("close table").await;
    assert_eq!(mock.overlaps(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn upstream_protocol_violations_mid_turn_give_502_and_discard() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.relay.max_message_size = bytesize::ByteSize::mib(1);
        c.pool.max_per_account = 100;
    })
    .await;
    let mut bystander = gw.bystander().await;
    for what in ["binary", "badutf8", "huge"] {
        let conv = unique(&format!("inject-{what}"));
        bystander.start().await;
        let mut c = gw.connect(&conv).await;
        let t = c
            .turn(&create_body(
                Some(&conv),
                &format!("[[mock: deltas=6, inject={what}]]"),
                None,
            ))
            .await
            .unwrap();
        assert_eq!(t.terminal()["type"], "error", "{what}: {:?}", t.terminal());
        assert_eq!(t.terminal()["status"], 502, "{what}");
        assert!(
            t.events
                .iter()
                .all(|e| e["delta"].as_str().is_none_or(|d| d.len() < 1000)),
            "{what}: nothing oversized reached the client"
        );
        assert_eq!(evictions(&conv), ["dead"], "{what}");
        // The session goes on with a fresh connection.
        assert!(
            c.turn(&create_body(Some(&conv), "again", None))
                .await
                .unwrap()
                .is_completed(),
            "{what}"
        );
        c.close().await;
        bystander.finish(what).await;
        gw.assert_settled(1, what).await;
    }
    bystander.close().await;
    gw.assert_quiescent("protocol violations").await;
    gw.stop().await;
}

#[tokio::test]
async fn client_non_create_first_and_a_burst_of_ten_thousand_frames() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| c.relay.max_queued_frames = 16).await;
    // A non-create event first: a clear 400, nothing sent upstream.
    let conv = unique("first");
    let mut c = gw.connect_without_conversation().await;
    c.send_json(&serde_json::json!({"type": "response.processed", "response_id": "resp_x"}))
        .await
        .unwrap();
    let ev = c.recv().await.unwrap();
    assert_eq!(
        (ev["status"].as_u64(), ev["error"]["code"].as_str()),
        (Some(400), Some("no_active_connection")),
        "{ev}"
    );
    assert!(
        c.turn(&create_body(Some(&conv), "then a real turn", None))
            .await
            .unwrap()
            .is_completed()
    );
    c.close().await;
    gw.assert_quiescent("non-create first").await;

    // 10,000 frames as fast as the socket takes them while a turn streams: the session is
    // closed with 1008 once the hold queue is full; a bystander is unaffected.
    let bystander = unique("bystander");
    let mut by = gw.connect(&bystander).await;
    by.send_json(&create_body(
        Some(&bystander),
        "[[mock: deltas=30, interval=10]]",
        None,
    ))
    .await
    .unwrap();
    let flood = unique("flood");
    let mut f = gw.connect(&flood).await;
    f.send_json(&create_body(
        Some(&flood),
        "[[mock: deltas=30, interval=10]]",
        None,
    ))
    .await
    .unwrap();
    let frame = create_body(Some(&flood), "again", None).to_string();
    let mut sent = 0;
    for _ in 0..10_000 {
        if f.send_text(&frame).await.is_err() {
            break;
        }
        sent += 1;
    }
    let err = loop {
        match f.recv().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(sent, 10_000, "the socket took the whole burst");
    assert_eq!(
        err.close_code(),
        Some(1008),
        "the flood ends with 1008: {err}"
    );
    let t = by.read_turn().await.unwrap();
    assert!(t.is_completed());
    assert_eq!(t.delta_count(), 30);
    by.close().await;
    assert_eq!(mock.overlaps(), 0);
    gw.assert_quiescent("burst").await;
    gw.stop().await;
}

#[tokio::test]
async fn client_disconnects_at_every_phase() {
    use tokio::io::AsyncWriteExt;
    // Dials take 200 ms, so a client can leave while its upstream is being dialed.
    let mock = MockUpstream::start(MockConfig {
        handshake_delay: Duration::from_millis(200),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| c.pool.max_per_account = 100).await;
    let mut bystander = gw.bystander().await;
    let phases = [
        "tcp only",
        "half a request head",
        "during the upstream dial",
        "after the 101",
        "before the first event",
        "mid-stream",
        "mid-stream, with a close frame",
        "with a create held behind the turn",
        "right after the terminal event",
    ];
    for phase in phases {
        let conv = unique("leave");
        bystander.start().await;
        // What the conversation's connection should have become once the client is gone.
        let mut evicted = true;
        match phase {
            "tcp only" | "half a request head" => {
                evicted = false;
                let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
                if phase != "tcp only" {
                    let head = raw_upgrade(&conv);
                    s.write_all(&head.as_bytes()[..head.len() / 2])
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            "during the upstream dial" => {
                evicted = false;
                let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
                s.write_all(raw_upgrade(&conv).as_bytes()).await.unwrap();
                let dialing = || gw.gateway.resources().pool_dialing == 1;
                assert!(
                    wait_until(Duration::from_secs(5), dialing).await,
                    "{phase}: the dial started"
                );
            }
            "after the 101" => {
                evicted = false;
                gw.connect(&conv).await.abort();
            }
            "right after the terminal event" => {
                evicted = false;
                let mut c = gw.connect(&conv).await;
                let t = c.turn(&create_body(Some(&conv), "hi", None)).await.unwrap();
                assert!(t.is_completed(), "{phase}");
                c.abort();
            }
            _ => {
                let mut c = gw.connect(&conv).await;
                let creates = || {
                    mock.connections()
                        .iter()
                        .map(|c| c.creates.load(std::sync::atomic::Ordering::Acquire))
                        .sum::<usize>()
                };
                let before = creates();
                let directive = match phase {
                    "before the first event" => "[[mock: delay=300]]",
                    _ => "[[mock: deltas=50, interval=10]]",
                };
                c.send_json(&create_body(Some(&conv), directive, None))
                    .await
                    .unwrap();
                match phase {
                    "before the first event" => {
                        // The create is upstream; its first event is 300 ms away.
                        let forwarded = || creates() > before;
                        assert!(wait_until(Duration::from_secs(5), forwarded).await);
                    }
                    _ => {
                        for _ in 0..5 {
                            c.recv().await.unwrap();
                        }
                    }
                }
                if phase.contains("held") {
                    c.send_json(&create_body(Some(&conv), "held", None))
                        .await
                        .unwrap();
                }
                if phase.contains("close frame") {
                    c.close().await;
                } else {
                    c.abort();
                }
            }
        }
        // Gone: the gateway lets go of everything the client held; the bystander never noticed.
        gw.assert_settled(1, phase).await;
        bystander.finish(phase).await;
        let evictions = evictions(&conv);
        if evicted {
            assert_eq!(
                evictions,
                ["discarded"],
                "{phase}: a turn in flight poisons"
            );
        } else {
            assert!(evictions.is_empty(), "{phase}: {evictions:?}");
        }
        // The conversation works again at once.
        let mut again = gw.connect(&conv).await;
        let t = again
            .turn(&create_body(Some(&conv), "back", None))
            .await
            .unwrap();
        assert!(t.is_completed(), "{phase}: {:?}", t.terminal());
        again.close().await;
        gw.assert_settled(1, phase).await;
        let lines = decisions(&conv);
        if evicted || phase.contains("request head") || phase == "tcp only" {
            assert!(
                lines.last().is_some_and(|l| l.starts_with("new")),
                "{phase}: {lines:?}"
            );
        } else {
            assert_eq!(
                lines.last().map(String::as_str),
                Some("reuse -"),
                "{phase}: a clean connection is reused"
            );
        }
    }
    bystander.close().await;
    gw.assert_quiescent("client disconnects").await;
    assert_eq!(mock.overlaps(), 0, "no two turns ever shared an upstream");
    gw.stop().await;
}

#[tokio::test]
async fn a_client_cannot_choose_where_the_gateway_dials() {
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let configured = mock().await;
    let elsewhere = mock().await;
    let gw = start_gateway(&configured, &["acct-a"], |_| {}).await;
    let conv = unique("dest");
    let other = elsewhere.url();
    let other_host = other
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // Every way a client might name a destination: an absolute-form target, Host, forwarding
    // and provider-ish headers, a query string, and URL-ish fields in the body.
    let head = format!(
        "GET {other}?upstream={other}&base_url={other} HTTP/1.1\r\nHost: {other_host}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer test-client-key\r\n\
         session-id: {conv}\r\nX-Forwarded-Host: {other_host}\r\nForwarded: host={other_host}\r\n\
         X-Upstream-Url: {other}\r\nOpenAI-Base-URL: {other}\r\nX-Codex-Base-Url: {other}\r\n\r\n"
    );
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "101 head");
        response.push(byte[0]);
    }
    let response = String::from_utf8_lossy(&response).to_string();
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    let mut body = create_body(Some(&conv), "where am I", None);
    body["base_url"] = other.clone().into();
    body["url"] = other.clone().into();
    ws.send(Message::text(body.to_string())).await.unwrap();
    let completed = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let ev: serde_json::Value = serde_json::from_str(&t).unwrap();
                if ev["type"] == "response.completed" {
                    break true;
                }
                assert_ne!(ev["type"], "error", "{ev}");
            }
            Some(Ok(_)) => continue,
            other => panic!("stream ended: {other:?}"),
        }
    };
    assert!(completed);
    assert_eq!(elsewhere.accepted(), 0, "nothing reached the other address");
    assert_eq!(
        configured.accepted(),
        1,
        "the configured upstream served it"
    );
    let upstream_req = configured.connection(1).unwrap();
    let configured_host = configured
        .url()
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    for name in [
        "x-forwarded-host",
        "forwarded",
        "x-upstream-url",
        "openai-base-url",
    ] {
        assert_eq!(upstream_req.header(name), None, "{name} is not forwarded");
    }
    assert_eq!(
        upstream_req.header("host"),
        Some(configured_host.as_str()),
        "the upstream's Host is its own"
    );
    ws.close(None).await.unwrap();
    gw.assert_quiescent("client-named destination").await;
    gw.stop().await;
}
