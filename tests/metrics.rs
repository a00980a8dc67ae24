//! `/metrics` after a scripted run: exact counter values. This binary holds a single test,
//! because the Prometheus recorder is process-wide.

mod support;

use std::time::Duration;

use support::*;
use wsgate::client::create_body;
use wsgate::mock::{MockConfig, MockUpstream};

#[tokio::test]
async fn metrics_count_a_scripted_run_exactly() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.handshake_timeout = Duration::from_millis(200)
    })
    .await;
    let (a, b) = (unique("ma"), unique("mb"));
    // One client connects and never sends its request: a handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5))
            .await
            .is_some(),
        "the silent client is closed"
    );

    // A: new, then reuse while a concurrent session bypasses (busy).
    gw.warm(&a).await;
    let mut s2 = gw.connect(&a).await;
    assert!(
        s2.turn(&create_body(Some(&a), "again", None))
            .await
            .unwrap()
            .is_completed()
    );
    let mut s3 = gw.connect(&a).await;
    assert!(
        s3.turn(&create_body(Some(&a), "parallel", None))
            .await
            .unwrap()
            .is_completed()
    );
    s3.close().await;
    s2.close().await;
    // B: new, cut by 1012 mid-turn (evict), then new (evicted).
    let mut s4 = gw.connect(&b).await;
    let err = s4
        .turn(&create_body(
            Some(&b),
            "[[mock: deltas=6, close=1012@mid]]",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.close_code(), Some(1012));
    gw.warm(&b).await;
    // No conversation id at all.
    let mut s6 = gw.connect_without_conversation().await;
    assert!(
        s6.turn(&create_body(None, "anonymous", None))
            .await
            .unwrap()
            .is_completed()
    );
    // It leaves as Codex does: the TCP connection dropped, no close handshake.
    s6.abort();
    gw.assert_quiescent("scripted run").await;

    let (status, text) = http_get(gw.addr, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        !text.contains("sk-acct") && !text.contains("test-client-key"),
        "no secrets in metrics"
    );
    let v = |name: &str, labels: &[(&str, &str)]| {
        prom_value(&text, name, labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };
    let d = "wsgate_pool_decisions_total";
    assert_eq!(v(d, &[("decision", "new"), ("reason", "miss")]), 2.0);
    assert_eq!(v(d, &[("decision", "reuse"), ("reason", "-")]), 1.0);
    assert_eq!(v(d, &[("decision", "bypass"), ("reason", "busy")]), 1.0);
    assert_eq!(v(d, &[("decision", "new"), ("reason", "evicted")]), 1.0);
    assert_eq!(v(d, &[("decision", "bypass"), ("reason", "no_key")]), 1.0);
    assert_eq!(
        v("wsgate_pool_evictions_total", &[("reason", "close_1012")]),
        1.0
    );
    assert!(
        prom_value(
            &text,
            "wsgate_pool_evictions_total",
            &[("reason", "discarded")]
        )
        .is_none()
    );
    assert_eq!(
        v(
            "wsgate_turns_total",
            &[("terminal", "completed"), ("ingress", "ws")]
        ),
        5.0
    );
    assert_eq!(
        v(
            "wsgate_turns_total",
            &[("terminal", "upstream_failed"), ("ingress", "ws")]
        ),
        1.0
    );
    assert_eq!(
        v("wsgate_errors_total", &[("kind", "handshake_timeout")]),
        1.0
    );
    assert!(
        prom_value(
            &text,
            "wsgate_errors_total",
            &[("kind", "client_protocol_error")]
        )
        .is_none(),
        "a client that drops its connection is gone, not a protocol error:\n{text}"
    );
    assert_eq!(v("wsgate_client_connections_opened_total", &[]), 6.0);
    assert_eq!(v("wsgate_client_connections_closed_total", &[]), 6.0);
    assert_eq!(v("wsgate_upstream_connections_opened_total", &[]), 5.0);
    assert_eq!(v("wsgate_sessions_active", &[]), 0.0);
    assert_eq!(v("wsgate_tasks", &[("kind", "session")]), 0.0);
    assert_eq!(
        v("wsgate_tasks", &[("kind", "http_connection")]),
        1.0,
        "only the scrape's own connection"
    );
    assert_eq!(v("wsgate_tasks", &[("kind", "upstream_pump")]), 2.0);
    assert_eq!(
        v(
            "wsgate_pool_connections",
            &[("account", "acct-a"), ("state", "idle")]
        ),
        2.0
    );
    assert_eq!(v("wsgate_accounts", &[("state", "usable")]), 1.0);
    // The number that proves pooling pays: cached tokens only where a warm connection served.
    assert!(v("wsgate_cached_tokens_total", &[("decision", "reuse")]) > 0.0);
    assert_eq!(v("wsgate_cached_tokens_total", &[("decision", "new")]), 0.0);
    assert_eq!(
        v("wsgate_cached_tokens_total", &[("decision", "bypass")]),
        0.0
    );
    assert!(v("wsgate_input_tokens_total", &[("decision", "new")]) > 0.0);
    // Real histograms (buckets), not summaries.
    for h in [
        "wsgate_turn_duration_seconds",
        "wsgate_turn_first_event_seconds",
        "wsgate_upstream_dial_seconds",
        "wsgate_pool_reuse_age_seconds",
        "wsgate_turn_cached_ratio",
    ] {
        assert!(
            text.contains(&format!("{h}_bucket{{")),
            "{h} has buckets:\n{text}"
        );
    }
    assert_eq!(v("wsgate_upstream_dial_seconds_count", &[]), 5.0);
    assert_eq!(
        v("wsgate_turn_cached_ratio_count", &[("decision", "reuse")]),
        1.0
    );
    assert!(
        v(
            "wsgate_frames_total",
            &[("direction", "upstream_to_client")]
        ) > 20.0
    );
    assert_eq!(
        v(
            "wsgate_frames_total",
            &[("direction", "client_to_upstream")]
        ),
        6.0
    );
    assert!(v("wsgate_bytes_total", &[("direction", "upstream_to_client")]) > 1000.0);
    assert!(!text.contains("sk-acct"), "no secrets");
    gw.stop().await;
}
