//! Limits from config (issue 6, item 2): client connections, per-client-key connections,
//! first-frame timeout, turn idle timeout, queued frames. After each, the gateway's counts
//! are back to zero.

mod support;

use std::time::{Duration, Instant};

use support::*;
use wsgate::client::{Client, ClientError, create_body};
use wsgate::mock::{MockConfig, MockUpstream};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

async fn settled(gw: &TestGateway) {
    let zero = || {
        let s = gw.gateway.pool_stats();
        gw.gateway.active_sessions() == 0 && s.busy == 0 && s.dialing == 0
    };
    assert!(
        wait_until(Duration::from_secs(5), zero).await,
        "sessions and busy slots back to zero: {:?}",
        gw.gateway.pool_stats()
    );
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
    settled(&gw).await;
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
    settled(&gw).await;
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
    let mut c = gw.connect(&conv).await;
    let started = Instant::now();
    let err = c.recv().await.unwrap_err();
    assert_eq!(err.close_code(), Some(1008), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    settled(&gw).await;
    assert_eq!(
        gw.gateway.pool_stats().idle,
        1,
        "a clean upstream goes back to the pool"
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
    let mut c = gw.connect(&conv).await;
    let started = Instant::now();
    let t = c
        .turn(&create_body(Some(&conv), "[[mock: stall=5000]]", None))
        .await
        .unwrap();
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
    settled(&gw).await;
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
    settled(&gw).await;
    assert_eq!(
        evictions(&conv),
        ["discarded"],
        "the turn in flight was abandoned with the session"
    );
    gw.stop().await;
}
