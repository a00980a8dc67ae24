//! Turns that can succeed must succeed (issue 11): a rate limit before any output moves the
//! turn to another account without the client seeing it, an all-limited gateway says when to
//! retry, and a replacement process takes over the address while the old one drains.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use wsgate::client::create_body;
use wsgate::mock::{Limit, MockConfig, MockUpstream};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

/// A gateway with two accounts in front of a mock that answers `limit` on the account a
/// fresh conversation named `name-...` gets (returned with it). `batched`: the mock writes
/// each answer in one go (many frames per read, so the relay's raw runs see the no-output
/// events and the limit together); otherwise frame by frame.
async fn limited_gateway(
    batched: bool,
    name: &str,
    limit: Limit,
) -> (MockUpstream, TestGateway, String, String) {
    let mock = MockUpstream::start(MockConfig {
        speed: batched,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    let conv = unique(name);
    let limited = gw.account_of(&conv);
    mock.limit(&account_key(&limited), limit);
    (mock, gw, conv, limited)
}

fn other(account: &str) -> &'static str {
    if account == "acct-a" {
        "acct-b"
    } else {
        "acct-a"
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_rate_limit_before_any_output_moves_the_turn_to_the_other_account() {
    let cases = [(false, false), (false, true), (true, false), (true, true)];
    for (batched, (failed, created_first)) in [false, true]
        .into_iter()
        .flat_map(|b| cases.map(|c| (b, c)))
    {
        let what = format!("batched={batched} failed={failed} created_first={created_first}");
        let limit = Limit {
            failed,
            created_first,
            ..Limit::default()
        };
        let (mock, gw, conv, limited) = limited_gateway(batched, "failover", limit).await;
        let mut c = gw.connect(&conv).await;
        let t = c
            .turn(&create_body(Some(&conv), "hello failover", None))
            .await
            .unwrap();
        assert!(t.is_completed(), "{what}: {:?}", t.terminal());
        for f in &t.events {
            assert_ne!(f["type"], "error", "{what}: the client saw {f}");
            assert_ne!(f["status"], 429, "{what}");
            assert!(
                f["response"]["id"]
                    .as_str()
                    .is_none_or(|id| id.starts_with("resp_2_")),
                "{what}: a frame of the limited account's response reached the client: {f}"
            );
        }
        // The mock saw the request on the limited account, then its replay on the other one.
        let (first, second) = (mock.connection(1).unwrap(), mock.connection(2).unwrap());
        assert_eq!(first.user_texts(), ["hello failover"], "{what}");
        assert_eq!(second.user_texts(), ["hello failover"], "{what}");
        assert_eq!(first.header("authorization"), Some(&*account_key(&limited)));
        assert_eq!(
            second.header("authorization"),
            Some(&*account_key(other(&limited)))
        );
        assert_eq!(decisions(&conv), ["new miss", "new failover"], "{what}");
        assert_eq!(
            log_lines(&[
                "moved to another account",
                &format!("from_account={limited}"),
                &format!("account={} ", other(&limited)),
                &format!("conversation={conv}"),
            ])
            .len(),
            1,
            "{what}: logged with both accounts"
        );
        assert_eq!(gw.gateway.account_state(&limited), Some("cooling"));
        // The conversation stays on its new account.
        let t = c
            .turn(&create_body(Some(&conv), "next", None))
            .await
            .unwrap();
        assert!(t.is_completed());
        assert_eq!(mock.accepted(), 2);
        c.close().await;
        gw.assert_quiescent(&what).await;
        gw.stop().await;
    }
}

#[tokio::test]
async fn a_continuation_on_a_limited_account_asks_for_full_context() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    let conv = unique("failover-cont");
    let limited = gw.account_of(&conv);
    let mut c = gw.connect(&conv).await;
    let first = c
        .turn(&create_body(Some(&conv), "one", None))
        .await
        .unwrap();
    let parent = first.response_id().unwrap().to_string();
    mock.limit(&account_key(&limited), Limit::default());
    let t = c
        .turn(&create_body(Some(&conv), "two", Some(&parent)))
        .await
        .unwrap();
    assert_eq!(t.terminal()["status"], 400, "{:?}", t.terminal());
    assert_eq!(t.terminal()["error"]["code"], "previous_response_not_found");
    assert_eq!(mock.accepted(), 1, "nothing replayed anywhere");
    // Codex then resends full context: it lands on the other account.
    let t = c
        .turn(&create_body(Some(&conv), "one two", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    assert_eq!(
        mock.connection(2).unwrap().header("authorization"),
        Some(&*account_key(other(&limited)))
    );
    c.close().await;
    gw.assert_quiescent("continuation").await;
    gw.stop().await;
}

#[tokio::test]
async fn a_rate_limit_after_visible_output_is_forwarded() {
    for batched in [false, true] {
        let limit = Limit {
            after_deltas: 2,
            ..Limit::default()
        };
        let (mock, gw, conv, limited) = limited_gateway(batched, "late-limit", limit).await;
        let mut c = gw.connect(&conv).await;
        let t = c
            .turn(&create_body(Some(&conv), "late", None))
            .await
            .unwrap();
        // Everything the upstream sent, in order: the held no-output events went out in
        // front of the first delta.
        let types: Vec<&str> = t.events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            types,
            [
                "response.created",
                "codex.rate_limits",
                "response.output_text.delta",
                "response.output_text.delta",
                "error"
            ],
            "batched={batched}"
        );
        assert_eq!(t.terminal()["status"], 429, "{:?}", t.terminal());
        assert_eq!(t.terminal()["error"]["code"], "usage_limit_reached");
        assert_eq!(mock.accepted(), 1, "no replay after visible output");
        assert_eq!(gw.gateway.account_state(&limited), Some("cooling"));
        c.close().await;
        gw.stop().await;
    }
}

#[tokio::test]
async fn every_account_limited_says_when_to_retry() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    for a in ["acct-a", "acct-b"] {
        mock.limit(
            &account_key(a),
            Limit {
                resets_in_seconds: 120,
                ..Limit::default()
            },
        );
    }
    let conv = unique("all-limited");
    let mut c = gw.connect(&conv).await;
    let t = c
        .turn(&create_body(Some(&conv), "anyone?", None))
        .await
        .unwrap();
    let e: &Value = t.terminal();
    assert_eq!(e["type"], "error");
    assert_eq!(e["status"], 429);
    assert_eq!(e["error"]["type"], "usage_limit_reached");
    assert_eq!(
        e["error"]["code"], "usage_limit_reached",
        "the upstream's code"
    );
    let resets_at = e["error"]["resets_at"].as_u64().expect("resets_at");
    let want = unix_now() + 120;
    assert!(resets_at.abs_diff(want) <= 2, "{resets_at} vs {want}");
    assert_eq!(
        e["error"]["resets_in_seconds"]
            .as_u64()
            .map(|s| s.abs_diff(120) <= 2),
        Some(true)
    );
    assert_eq!(mock.accepted(), 2, "tried each account once");
    // The next request, with no account usable: same shape, gateway's own code.
    let t = c
        .turn(&create_body(Some(&conv), "still?", None))
        .await
        .unwrap();
    let e = t.terminal();
    assert_eq!(
        (&e["status"], &e["error"]["type"]),
        (&429.into(), &"usage_limit_reached".into())
    );
    assert_eq!(e["error"]["code"], "all_accounts_unavailable");
    assert!(e["error"]["resets_at"].as_u64().unwrap().abs_diff(want) <= 2);
    c.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_close_from_the_upstream_is_answered() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("idle-close");
    let mut c = gw.connect(&conv).await;
    let t = c
        .turn(&create_body(
            Some(&conv),
            "[[mock: close=1013@idle:100]]",
            None,
        ))
        .await
        .unwrap();
    assert!(t.is_completed());
    c.close().await;
    let first = mock.connection(1).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || first.peer_close_code()
            == Some(1013))
        .await,
        "the gateway echoed the upstream's close frame: {:?}",
        first.peer_close_code()
    );
    // The eviction is named by the next decision.
    let c = gw.connect(&conv).await;
    c.close().await;
    assert_eq!(decisions(&conv), ["new miss", "new evicted"]);
    gw.stop().await;
}

#[tokio::test]
async fn after_a_discard_the_next_decision_says_so() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("discard");
    let mut c = gw.connect(&conv).await;
    c.send_json(&create_body(
        Some(&conv),
        "[[mock: deltas=40, interval=10]]",
        None,
    ))
    .await
    .unwrap();
    c.recv().await.unwrap();
    c.abort();
    gw.assert_quiescent("client left mid-turn").await;
    let c = gw.connect(&conv).await;
    c.close().await;
    assert_eq!(decisions(&conv), ["new miss", "new discarded"]);
    gw.stop().await;
}

/// A free loopback port (bound and released: two processes will share it with SO_REUSEPORT).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_takes_over_the_address_while_the_old_process_drains() {
    let mock = mock().await;
    let port = free_port();
    let yaml = test_yaml(&mock.url(), &["acct-a"], "")
        .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"))
        + "shutdown:\n  grace: 20s\n";
    let mut a = GatewayProcess::start(&yaml);
    let conv = unique("restart");
    let mut streaming = a.start_long_turn(&conv).await;
    a.signal("TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = GatewayProcess::start(&yaml);
    assert_eq!(b.addr, a.addr, "the replacement bound the same address");
    // New clients during the hand-over: every one is served (by B), none refused or 503.
    for i in 0..10 {
        let other = unique(&format!("during-{i}"));
        let mut c = b.connect(&other).await;
        let t = c
            .turn(&create_body(Some(&other), "hi", None))
            .await
            .unwrap();
        assert!(t.is_completed(), "client {i}: {:?}", t.terminal());
        c.close().await;
    }
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "A is still draining its turn"
    );
    let t = streaming.read_turn().await.unwrap();
    assert!(t.is_completed(), "A's turn finished: {:?}", t.terminal());
    assert_eq!(t.delta_count(), 60);
    let status = a.wait_exit(Duration::from_secs(20)).await.expect("A exits");
    assert!(status.success(), "A exits 0: {status:?}");
    // The log reaches the test through a pipe read by another thread: wait for the lines.
    assert!(
        wait_until(Duration::from_secs(10), || b
            .stderr_text()
            .matches("pool decision")
            .count()
            >= 10)
        .await,
        "B served the new clients"
    );
    assert!(
        !a.stderr_text().contains("during-"),
        "A accepted nothing after SIGTERM"
    );
}
