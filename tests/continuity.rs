//! Issue 3: accounts (rate limits, cooldown, all-limited 429), the idle watcher (pings, pong
//! timeout, idle close), stale-reuse retry, previous_response_id owner routing, and the
//! upstream connection limit.

mod support;

use std::time::{Duration, Instant};

use support::*;
use wsgate::client::create_body;
use wsgate::mock::{MockConfig, MockUpstream};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

#[tokio::test]
async fn rate_limit_moves_the_conversation_and_the_account_comes_back() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    let conv = unique("rl");
    let first = gw.account_of(&conv);
    let mut s = gw.connect(&conv).await;
    assert!(
        s.turn(&create_body(Some(&conv), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    // The upstream says the account is out of quota for 2 s, before any output: the turn
    // moves to the other account and the client never sees the 429 (issue 11).
    mock.limit(
        &account_key(&first),
        wsgate::mock::Limit {
            resets_in_seconds: 2,
            ..Default::default()
        },
    );
    let moved = s
        .turn(&create_body(Some(&conv), "full context", None))
        .await
        .unwrap();
    assert!(moved.is_completed(), "{:?}", moved.terminal());
    assert_eq!(gw.gateway.account_state(&first), Some("cooling"));
    assert_eq!(evictions(&conv), ["account_changed"]);
    let second = gw.account_of(&conv);
    assert_ne!(first, second);
    assert_eq!(
        mock.connection(2).unwrap().header("authorization").unwrap(),
        account_key(&second)
    );
    let lines = log_lines(&["pool decision", &format!("conversation={conv} ")]);
    assert!(
        lines
            .last()
            .unwrap()
            .contains(&format!("account={second} ")),
        "{lines:?}"
    );
    s.close().await;
    // A comes back after its cooldown.
    assert!(
        wait_until(Duration::from_secs(5), || gw.gateway.account_state(&first)
            == Some("usable"))
        .await
    );
    gw.stop().await;
}

#[tokio::test]
async fn all_accounts_limited_gives_429_with_a_retry_hint_and_the_session_stays_open() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    let conv = unique("all");
    let mut s = gw.connect(&conv).await;
    // The first account's limit moves the turn to the second, which is limited too.
    let t = s
        .turn(&create_body(
            Some(&conv),
            "[[mock: error=429:usage_limit_reached:120]]",
            None,
        ))
        .await
        .unwrap();
    assert_eq!(t.terminal()["status"], 429, "both accounts limited");
    assert_eq!(t.terminal()["error"]["type"], "usage_limit_reached");
    for _ in 0..2 {
        let t = s
            .turn(&create_body(Some(&conv), "anyone?", None))
            .await
            .unwrap();
        let ev = t.terminal();
        assert_eq!(ev["type"], "error");
        assert_eq!(ev["status"], 429);
        assert_eq!(ev["error"]["code"], "all_accounts_unavailable");
        let hint = ev["error"]["resets_in_seconds"].as_u64().unwrap();
        assert!(
            (100..=120).contains(&hint),
            "the first account frees up in ~120s, got {hint}"
        );
        assert!(
            ev["error"]["message"]
                .as_str()
                .unwrap()
                .contains("frees up in")
        );
    }
    // New sessions of any conversation get the same answer after a normal upgrade.
    let other = unique("all2");
    let mut s2 = gw.connect(&other).await;
    assert_eq!(
        s2.turn(&create_body(Some(&other), "hi", None))
            .await
            .unwrap()
            .terminal()["status"],
        429
    );
    assert_eq!(mock.accepted(), 2);
    s.close().await;
    s2.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn handshake_401_fails_over_to_another_account() {
    // acct-a's key is refused by the mock, acct-b's accepted: no client ever sees the 401.
    let mock = MockUpstream::start(MockConfig {
        require_keys: vec![account_key("acct-b")],
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    for _ in 0..3 {
        let conv = unique("auth");
        let mut s = gw.connect(&conv).await;
        assert!(
            s.turn(&create_body(Some(&conv), "hi", None))
                .await
                .unwrap()
                .is_completed()
        );
        s.close().await;
    }
    assert_eq!(gw.gateway.account_state("acct-a"), Some("auth_failed"));
    assert!(
        log_lines(&["upstream dial failed", "401"]).len() <= 1,
        "acct-a is tried at most once"
    );
    gw.stop().await;
}

/// The real API refuses a deactivated account's handshake with a 403 whose pretty-printed
/// error object names `account_deactivated`: read as written, it blames the credential, so
/// the turn fails over to the healthy account instead of failing.
#[tokio::test]
async fn a_pretty_printed_403_about_the_account_fails_over_to_another_account() {
    let mock = MockUpstream::start(MockConfig {
        require_keys: vec![account_key("acct-b")],
        key_refusal: (403, "account_deactivated"),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    for _ in 0..3 {
        let conv = unique("deactivated");
        let mut s = gw.connect(&conv).await;
        let t = s.turn(&create_body(Some(&conv), "hi", None)).await.unwrap();
        assert!(t.is_completed(), "{:?}", t.terminal());
        s.close().await;
    }
    assert_eq!(gw.gateway.account_state("acct-a"), Some("auth_failed"));
    let refused = log_lines(&["upstream dial failed", "403"]);
    assert_eq!(refused.len(), 1, "acct-a is tried once: {refused:?}");
    assert!(
        refused[0].contains("account_deactivated"),
        "the refusal's body is on the log line (escaped: one line): {}",
        refused[0]
    );
    gw.stop().await;
}

#[tokio::test]
async fn silent_idle_upstream_is_evicted_within_two_ping_intervals() {
    let mock = mock().await;
    let interval = Duration::from_millis(300);
    let gw = start_gateway(&mock, &["acct-a"], |c| c.pool.ping_interval = interval).await;
    // Control: a healthy idle connection answers pings and stays pooled.
    let healthy = unique("healthy");
    let mut h = gw.connect(&healthy).await;
    assert!(
        h.turn(&create_body(Some(&healthy), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    h.close().await;

    let conv = unique("deaf");
    let mut s = gw.connect(&conv).await;
    assert!(
        s.turn(&create_body(Some(&conv), "hi [[mock: deaf]]", None))
            .await
            .unwrap()
            .is_completed()
    );
    let went_silent = Instant::now();
    s.close().await;
    assert!(wait_until(Duration::from_secs(5), || !evictions(&conv).is_empty()).await);
    let took = went_silent.elapsed();
    assert_eq!(evictions(&conv), ["dead"]);
    assert!(
        took <= interval * 2 + Duration::from_millis(250),
        "evicted after {took:?}"
    );
    tokio::time::sleep(interval * 3).await;
    assert!(
        evictions(&healthy).is_empty(),
        "the healthy idle connection survived 3 intervals"
    );
    let mut again = gw.connect(&healthy).await;
    assert!(
        again
            .turn(&create_body(Some(&healthy), "still here", None))
            .await
            .unwrap()
            .is_completed()
    );
    assert_eq!(decisions(&healthy), ["new miss", "reuse -"]);
    again.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn idle_close_1013_is_evicted_with_its_code() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("idle1013");
    let mut s = gw.connect(&conv).await;
    assert!(
        s.turn(&create_body(
            Some(&conv),
            "[[mock: close=1013@idle:300]]",
            None
        ))
        .await
        .unwrap()
        .is_completed()
    );
    s.close().await;
    assert!(wait_until(Duration::from_secs(5), || !evictions(&conv).is_empty()).await);
    assert_eq!(evictions(&conv), ["close_1013"]);
    let mut s2 = gw.connect(&conv).await;
    assert!(
        s2.turn(&create_body(Some(&conv), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    assert_eq!(decisions(&conv), ["new miss", "new evicted"]);
    s2.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_silent_turn_that_answers_pings_completes() {
    let mock = mock().await;
    let interval = Duration::from_millis(200);
    let gw = start_gateway(&mock, &["acct-a"], |c| c.pool.ping_interval = interval).await;
    let conv = unique("think");
    let mut s = gw.connect(&conv).await;
    // 3.5 intervals of silence after response.created (long reasoning), pings answered.
    let t = s
        .turn(&create_body(Some(&conv), "[[mock: stall=700]]", None))
        .await
        .unwrap();
    assert!(t.is_completed(), "{:?}", t.terminal());
    assert!(evictions(&conv).is_empty());
    s.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn stale_reuse_is_retried_once_before_visible_output_only() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("stale");
    gw.warm(&conv).await;

    // The reused connection dies before the first event: the turn succeeds on a fresh one.
    let mut s2 = gw.connect(&conv).await;
    let t = s2
        .turn(&create_body(
            Some(&conv),
            "full request [[mock: close=eof@stale]]",
            None,
        ))
        .await
        .unwrap();
    assert!(t.is_completed(), "{:?}", t.terminal());
    assert!(t.response_id().unwrap().starts_with("resp_2_"));
    assert_eq!(
        decisions(&conv),
        ["new miss", "reuse -", "new retry_after_stale_reuse"]
    );
    s2.close().await;
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().idle == 1).await);

    // After a visible delta there is no retry: the client gets the error.
    let mut s3 = gw.connect(&conv).await;
    let t = s3
        .turn(&create_body(
            Some(&conv),
            "[[mock: deltas=6, close=eof@mid]]",
            None,
        ))
        .await
        .unwrap();
    assert_eq!(t.terminal()["status"], 502);
    assert!(
        t.events
            .iter()
            .any(|e| e["type"] == "response.output_text.delta")
    );
    assert_eq!(
        log_lines(&["retry_after_stale_reuse", &format!("conversation={conv} ")]).len(),
        1,
        "exactly one retry"
    );
    s3.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn continuations_follow_their_owner_or_get_previous_response_not_found() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("owner");
    let mut a = gw.connect(&conv).await;
    let r1 = a.turn(&create_body(Some(&conv), "hi", None)).await.unwrap();
    let r1 = r1.response_id().unwrap().to_string();
    // B shares the conversation while A holds the pooled connection: B is on a bypass one.
    let mut b = gw.connect(&conv).await;
    let t = b
        .turn(&create_body(
            Some(&conv),
            "continue A's response",
            Some(&r1),
        ))
        .await
        .unwrap();
    assert_eq!(
        t.terminal()["error"]["code"],
        "previous_response_not_found",
        "owner busy: never sent elsewhere"
    );
    assert_eq!(
        mock.connection(2)
            .unwrap()
            .creates
            .load(std::sync::atomic::Ordering::Acquire),
        0
    );
    // A leaves: its connection idles in the pool, and B's continuation goes to it.
    a.close().await;
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().idle == 1).await);
    let t = b
        .turn(&create_body(
            Some(&conv),
            "continue A's response",
            Some(&r1),
        ))
        .await
        .unwrap();
    assert!(t.is_completed(), "{:?}", t.terminal());
    assert!(
        t.response_id().unwrap().starts_with("resp_1_"),
        "served by the owner connection"
    );
    assert!(
        wait_until(Duration::from_secs(5), || mock.open() == 1).await,
        "B's bypass connection closed"
    );
    b.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn continuation_whose_owner_died_is_refused_not_forwarded() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("orphan");
    let mut s = gw.connect(&conv).await;
    let t = s
        .turn(&create_body(
            Some(&conv),
            "[[mock: close=1011@idle:50]]",
            None,
        ))
        .await
        .unwrap();
    let r1 = t.response_id().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(5), || mock.open() == 0).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = s
        .turn(&create_body(Some(&conv), "continue", Some(&r1)))
        .await
        .unwrap();
    assert_eq!(t.terminal()["status"], 400);
    assert_eq!(t.terminal()["error"]["code"], "previous_response_not_found");
    assert_eq!(
        mock.accepted(),
        1,
        "the continuation was not sent over a new socket"
    );
    // A new session with a fresh connection refuses it too, before the upstream sees it.
    let mut s2 = gw.connect(&conv).await;
    let t = s2
        .turn(&create_body(Some(&conv), "continue", Some(&r1)))
        .await
        .unwrap();
    assert_eq!(t.terminal()["error"]["code"], "previous_response_not_found");
    assert_eq!(
        mock.connection(2)
            .unwrap()
            .creates
            .load(std::sync::atomic::Ordering::Acquire),
        0
    );
    s.close().await;
    s2.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn connection_limit_is_forwarded_and_treated_like_max_age() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("limit");
    let mut s = gw.connect(&conv).await;
    let t = s
        .turn(&create_body(
            Some(&conv),
            "[[mock: error=400:websocket_connection_limit_reached]]",
            None,
        ))
        .await
        .unwrap();
    assert_eq!(
        t.terminal()["error"]["code"],
        "websocket_connection_limit_reached",
        "forwarded for Codex to retry"
    );
    assert_eq!(evictions(&conv), ["max_age"]);
    let t = s
        .turn(&create_body(Some(&conv), "retry with full context", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    assert_eq!(decisions(&conv), ["new miss", "new expired"]);
    s.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn unexpected_data_while_idle_evicts() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("junk");
    let mut s = gw.connect(&conv).await;
    assert!(
        s.turn(&create_body(Some(&conv), "[[mock: junk=idle:200]]", None))
            .await
            .unwrap()
            .is_completed()
    );
    s.close().await;
    assert!(wait_until(Duration::from_secs(5), || !evictions(&conv).is_empty()).await);
    assert_eq!(evictions(&conv), ["dead"]);
    // The next session never sees the stray frame: it gets a fresh connection.
    let mut s2 = gw.connect(&conv).await;
    let t = s2
        .turn(&create_body(Some(&conv), "hi", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    assert!(!t.events.iter().any(|e| e["delta"] == "unsolicited"));
    assert_eq!(decisions(&conv), ["new miss", "new dead"]);
    s2.close().await;
    gw.stop().await;
}
