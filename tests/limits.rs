//! Limits from config (issue 6, item 2): client connections, per-client-key connections,
//! the handshake timeout and bound, first-frame timeout, turn idle timeout, queued frames.
//! After each, the gateway's counts are back to zero.

mod support;

use std::time::{Duration, Instant};

use support::*;
use wsgate::client::{Client, ClientError, create_body};
use wsgate::mock::{MockConfig, MockUpstream};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

#[tokio::test]
async fn max_client_connections_gives_503_before_the_upgrade() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| c.limits.max_client_connections = 2).await;
    let (c1, c2, c3) = (unique("max"), unique("max"), unique("max"));
    let a = gw.connect(&c1).await;
    let b = gw.connect(&c2).await;
    match Client::connect(&gw.url(), &gw.codex_headers(&c3)).await {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 503);
            assert!(body.contains("too_many_connections"), "{body}");
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        mock.accepted(),
        2,
        "no upstream was dialed for the refused client"
    );
    a.close().await;
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.active_sessions() == 1).await);
    let mut c = gw.connect(&c3).await;
    assert!(
        c.turn(&create_body(Some(&c3), "now there is room", None))
            .await
            .unwrap()
            .is_completed()
    );
    c.close().await;
    b.close().await;
    gw.assert_quiescent("max client connections").await;
    gw.stop().await;
}

#[tokio::test]
async fn per_client_key_connection_limit() {
    init();
    let mock = mock().await;
    let (mut config, _) = config(&mock.url(), &["acct-a"]);
    config.clients.push(wsgate::config::ClientKeyConfig {
        name: "other".into(),
        key_env: Some("OTHER_KEY".into()),
        key_file: None,
    });
    config.limits.max_connections_per_client = 1;
    let secrets = config
        .resolve_secrets(&|k| match k {
            "TEST_CLIENT_KEY" => Some(CLIENT_KEY.into()),
            "OTHER_KEY" => Some("other-key".into()),
            _ => Some("sk-acct-a".into()),
        })
        .unwrap();
    let gw = start_with(config, secrets).await;
    let first = gw.connect(&unique("pk")).await;
    let conv = unique("pk");
    match Client::connect(&gw.url(), &gw.codex_headers(&conv)).await {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 429);
            assert!(body.contains("too_many_connections_for_client"), "{body}");
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // Another key is not affected.
    let other = Client::connect(
        &gw.url(),
        &[
            ("authorization", "Bearer other-key"),
            ("session-id", conv.as_str()),
        ],
    )
    .await
    .unwrap();
    other.close().await;
    first.close().await;
    gw.assert_quiescent("per-client key").await;
    // The key's permit came back.
    let again = gw.connect(&unique("pk")).await;
    again.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_never_sends_a_frame_is_closed_and_its_upstream_pooled() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.first_frame_timeout = Duration::from_millis(300)
    })
    .await;
    let conv = unique("silent");
    // A session that sent its first frame in time streams on while the silent one is closed.
    let mut bystander = gw.bystander().await;
    bystander.start().await;
    let mut c = gw.connect(&conv).await;
    let started = Instant::now();
    let err = c.recv().await.unwrap_err();
    assert_eq!(err.close_code(), Some(1008), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    bystander.finish("first frame").await;
    bystander.close().await;
    gw.assert_quiescent("first frame").await;
    assert_eq!(
        gw.gateway.pool_stats().idle,
        2,
        "a clean upstream goes back to the pool (beside the bystander's)"
    );
    // A client that does send in time is not affected.
    let mut ok = gw.connect(&conv).await;
    assert!(
        ok.turn(&create_body(Some(&conv), "quick", None))
            .await
            .unwrap()
            .is_completed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        ok.turn(&create_body(Some(&conv), "later", None))
            .await
            .unwrap()
            .is_completed(),
        "the timeout applies to the first frame only"
    );
    ok.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_turn_whose_upstream_goes_silent_gets_504_and_the_session_goes_on() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.turn_idle_timeout = Duration::from_millis(400)
    })
    .await;
    let conv = unique("stall");
    let mut bystander = gw.bystander().await;
    let mut c = gw.connect(&conv).await;
    let started = Instant::now();
    bystander.start().await;
    let t = c
        .turn(&create_body(Some(&conv), "[[mock: stall=5000]]", None))
        .await
        .unwrap();
    bystander.finish("stalled upstream").await;
    let ev = t.terminal();
    assert_eq!(ev["type"], "error");
    assert_eq!(ev["status"], 504, "{ev}");
    assert_eq!(ev["error"]["code"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "timed out after {:?}",
        started.elapsed()
    );
    assert_eq!(evictions(&conv), ["dead"]);
    // A turn that keeps streaming slower than nothing-for-400ms is not cut.
    let t = c
        .turn(&create_body(
            Some(&conv),
            "[[mock: deltas=10, interval=150]]",
            None,
        ))
        .await
        .unwrap();
    assert!(t.is_completed(), "{:?}", t.terminal());
    c.close().await;
    bystander.close().await;
    gw.assert_quiescent("turn idle").await;
    gw.stop().await;
}

#[tokio::test]
async fn queued_frames_limit_closes_with_1008() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| c.relay.max_queued_frames = 2).await;
    let conv = unique("queue");
    let mut c = gw.connect(&conv).await;
    c.send_json(&create_body(
        Some(&conv),
        "[[mock: deltas=50, interval=20]]",
        None,
    ))
    .await
    .unwrap();
    for i in 0..3 {
        c.send_json(&create_body(Some(&conv), &format!("queued {i}"), None))
            .await
            .unwrap();
    }
    let err = loop {
        match c.recv().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.close_code(), Some(1008), "{err}");
    assert_eq!(mock.overlaps(), 0);
    gw.assert_quiescent("queued frames").await;
    assert_eq!(
        evictions(&conv),
        ["discarded"],
        "the turn in flight was abandoned with the session"
    );
    gw.stop().await;
}

#[tokio::test]
async fn handshake_timeout_closes_silent_and_trickling_clients_and_frees_their_slots() {
    use tokio::io::AsyncWriteExt;
    let mock = mock().await;
    let timeout = Duration::from_millis(400);
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.handshake_timeout = timeout;
        c.limits.max_handshakes = 2;
    })
    .await;

    // Connected, never sends a byte: closed once the timeout passes, not before.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent client is closed");
    assert!(
        took >= timeout - Duration::from_millis(50),
        "closed too early: {took:?}"
    );

    // Sends its request head a line every 100 ms (slowloris): closed at the timeout, long
    // before its head would be complete.
    let mut trickle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    for i in 0..30 {
        let line = if i == 0 {
            "GET /v1/responses HTTP/1.1\r\n".to_string()
        } else {
            format!("x-slow-{i}: {i}\r\n")
        };
        if trickle.write_all(line.as_bytes()).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut = cut
        || closed_within(&mut trickle, Duration::from_millis(100))
            .await
            .is_some();
    assert!(cut, "a trickling client is closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed at the deadline, not when the head would be complete: {:?}",
        started.elapsed()
    );

    // Two silent connections take both handshake slots: a real client waits for a slot (in
    // the accept backlog), is served once the silent ones time out, and its session is not
    // subject to the handshake deadline.
    let _a = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let conv = unique("after-slots");
    let started = Instant::now();
    let mut c = gw.connect(&conv).await;
    let waited = started.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(150),
        "the third connection waited for a slot: {waited:?}"
    );
    tokio::time::sleep(timeout * 2).await;
    assert!(
        c.turn(&create_body(Some(&conv), "after the deadline", None))
            .await
            .unwrap()
            .is_completed(),
        "an upgraded session outlives the handshake deadline"
    );
    c.close().await;
    gw.assert_quiescent("handshake timeout").await;
    gw.stop().await;
}

#[tokio::test]
async fn at_shutdown_a_connection_that_has_sent_nothing_is_closed_at_once() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.handshake_timeout = Duration::from_secs(5);
    })
    .await;
    let mut idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Accepted, and waiting for its request head.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    gw.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the shutdown waited {took:?} for a connection that never asked anything"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(1))
            .await
            .is_some(),
        "the idle connection is closed"
    );
}

#[tokio::test]
async fn an_oversized_request_head_gets_431_and_a_large_one_is_fine() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.max_header_size = bytesize::ByteSize::kib(16)
    })
    .await;
    let conv = unique("head");
    // 12 KiB of headers: under the limit, served.
    let big = "x".repeat(12 * 1024);
    let mut headers = gw.codex_headers(&conv);
    headers.push(("x-codex-big", big.as_str()));
    let mut c = Client::connect(&gw.url(), &headers).await.unwrap();
    assert!(
        c.turn(&create_body(Some(&conv), "big head", None))
            .await
            .unwrap()
            .is_completed()
    );
    c.close().await;
    // 40 KiB: HTTP 431, nothing dialed for it.
    let accepted = mock.accepted();
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = raw_upgrade(&unique("head")).replace(
        "\r\n\r\n",
        &format!("\r\nx-huge: {}\r\n\r\n", "y".repeat(40 * 1024)),
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 431"),
        "oversized head: {response}"
    );
    assert_eq!(mock.accepted(), accepted);
    gw.assert_quiescent("request head size").await;
    gw.stop().await;
}
