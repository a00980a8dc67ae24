//! Pool acceptance tests (issue 2): reuse, keys, busy/cap bypass, max-age — through real
//! sockets against the mock upstream.

mod support;

use std::time::Duration;

use futures::future::join_all;
use support::*;
use wsgate::client::create_body;
use wsgate::mock::{MockConfig, MockUpstream};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

#[tokio::test]
async fn five_turns_in_one_session_use_one_upstream_with_continuations() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("five");
    let mut c = gw.connect(&conv).await;
    let ids = run_chain(&mut c, &conv, 5).await;
    // Every continuation was accepted by the one upstream connection that owns the chain.
    assert_eq!(mock.accepted(), 1);
    assert!(ids.iter().all(|id| id.starts_with("resp_1_")), "{ids:?}");
    assert_eq!(mock.overlaps(), 0);
    assert_eq!(decisions(&conv), ["new miss"]);
    c.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn sessions_of_one_conversation_reuse_the_upstream_and_its_continuations() {
    let mock = MockUpstream::start(MockConfig {
        cache_depth: 4,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("three");

    let mut s1 = gw.connect(&conv).await;
    let t1 = s1
        .turn(&create_body(Some(&conv), "first", None))
        .await
        .unwrap();
    let t2 = s1
        .turn(&create_body(Some(&conv), "second", t1.response_id()))
        .await
        .unwrap();
    assert!(t2.is_completed());
    let from_session_1 = t2.response_id().unwrap().to_string();
    s1.close().await;
    assert!(
        wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().idle == 1).await,
        "returned to the pool"
    );

    let mut s2 = gw.connect(&conv).await;
    let t3 = s2
        .turn(&create_body(Some(&conv), "full context again", None))
        .await
        .unwrap();
    assert!(t3.is_completed());
    assert!(
        t3.cached_tokens().unwrap() > 0,
        "a warm upstream reports cached tokens"
    );
    s2.abort(); // Codex exits without a close handshake
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().idle == 1).await);

    let mut s3 = gw.connect(&conv).await;
    let t4 = s3
        .turn(&create_body(
            Some(&conv),
            "continue session 1",
            Some(&from_session_1),
        ))
        .await
        .unwrap();
    assert!(
        t4.is_completed(),
        "continuation from session 1 works in session 3: {:?}",
        t4.terminal()
    );
    s3.close().await;

    assert_eq!(mock.accepted(), 1);
    assert_eq!(decisions(&conv), ["new miss", "reuse -", "reuse -"]);
    let reuse = log_lines(&["decision=reuse", &format!("conversation={conv} ")]);
    assert!(
        reuse
            .iter()
            .all(|l| l.contains("upstream.id=") && l.contains("upstream.age_ms=")),
        "{reuse:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn conversations_and_accounts_get_their_own_upstreams() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    // Two conversations that the gateway assigns to different accounts.
    let mut by_account = std::collections::HashMap::new();
    while by_account.len() < 2 {
        let c = unique("acct");
        by_account.entry(gw.account_of(&c)).or_insert(c);
    }
    let mut seen = Vec::new();
    for (account, conv) in &by_account {
        for _ in 0..2 {
            let mut c = gw.connect(conv).await;
            let t = c.turn(&create_body(Some(conv), "hi", None)).await.unwrap();
            assert!(t.is_completed());
            seen.push((account.clone(), t.response_id().unwrap().to_string()));
            c.close().await;
            wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().busy == 0).await;
        }
    }
    assert_eq!(
        mock.accepted(),
        2,
        "one upstream per (account, conversation), reused once each"
    );
    // Each upstream connection carried exactly one account's credential.
    for rec in mock.connections() {
        let auth = rec.header("authorization").unwrap();
        let account = ["acct-a", "acct-b"]
            .into_iter()
            .find(|a| auth == account_key(a))
            .expect("an account key");
        let conn_prefix = format!("resp_{}_", rec.id);
        assert!(
            seen.iter()
                .filter(|(_, r)| r.starts_with(&conn_prefix))
                .all(|(a, _)| a == account)
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn concurrent_sessions_of_one_conversation_bypass_busy_and_both_complete() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("busy");
    let mut a = gw.connect(&conv).await;
    let mut b = gw.connect(&conv).await;
    let body = create_body(Some(&conv), "[[mock: deltas=10, interval=5]]", None);
    let (ta, tb) = tokio::join!(a.turn(&body), b.turn(&body));
    assert!(ta.unwrap().is_completed());
    assert!(tb.unwrap().is_completed());
    assert_eq!(decisions(&conv), ["new miss", "bypass busy"]);
    assert_eq!(mock.accepted(), 2);
    b.close().await;
    a.close().await;
    // The bypass connection is closed with its session; only the pooled one stays.
    assert!(
        wait_until(Duration::from_secs(5), || mock.open() == 1).await,
        "open={}",
        mock.open()
    );
    assert_eq!(gw.gateway.pool_stats().idle, 1);
    gw.stop().await;
}

#[tokio::test]
async fn per_account_cap_bypasses() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| c.pool.max_per_account = 2).await;
    let convs: Vec<String> = (0..3).map(|_| unique("cap")).collect();
    let mut clients = Vec::new();
    for conv in &convs {
        let mut c = gw.connect(conv).await;
        assert!(
            c.turn(&create_body(Some(conv), "hi", None))
                .await
                .unwrap()
                .is_completed()
        );
        clients.push(c);
    }
    assert_eq!(decisions(&convs[0]), ["new miss"]);
    assert_eq!(decisions(&convs[1]), ["new miss"]);
    assert_eq!(decisions(&convs[2]), ["bypass cap"]);
    for c in clients {
        c.close().await;
    }
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().idle == 2).await);
    assert_eq!(gw.gateway.pool_stats().total, 2);
    gw.stop().await;
}

#[tokio::test]
async fn total_cap_counts_concurrent_dials() {
    // Slow handshakes keep all dials in progress at once.
    let mock = MockUpstream::start(MockConfig {
        handshake_delay: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |c| {
        c.pool.max_total = 3;
        c.pool.max_per_account = 8;
    })
    .await;
    let convs: Vec<String> = (0..6).map(|_| unique("total")).collect();
    let sessions = join_all(convs.iter().map(|conv| {
        let gw = &gw;
        async move {
            match wsgate::client::Client::connect(&gw.url(), &gw.codex_headers(conv)).await {
                Ok(mut c) => {
                    let t = c.turn(&create_body(Some(conv), "hi", None)).await.unwrap();
                    assert!(t.is_completed());
                    Some(c)
                }
                // Past max_total (one-shots count too) nothing more is dialed.
                Err(wsgate::client::ClientError::Refused { status: 503, body }) => {
                    assert!(body.contains("upstream_capacity"), "{body}");
                    None
                }
                Err(e) => panic!("{e}"),
            }
        }
    }))
    .await;
    let all: Vec<String> = convs.iter().flat_map(|c| decisions(c)).collect();
    assert_eq!(all, ["new miss", "new miss", "new miss"], "{all:?}");
    assert_eq!(sessions.iter().flatten().count(), 3);
    assert_eq!(mock.accepted(), 3, "never more than max_total dials");
    assert_eq!(gw.gateway.pool_stats().total, 3);
    for c in sessions.into_iter().flatten() {
        c.close().await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn max_age_expires_between_turns_never_mid_turn() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.pool.max_age = Duration::from_millis(400)
    })
    .await;
    let conv = unique("age");

    let mut s1 = gw.connect(&conv).await;
    assert!(
        s1.turn(&create_body(Some(&conv), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    s1.close().await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    // The next acquire cannot reuse the expired connection.
    let mut s2 = gw.connect(&conv).await;
    assert_eq!(decisions(&conv), ["new miss", "new expired"]);
    // A turn that outlives max_age is not cut: all 20 deltas arrive.
    let long = s2
        .turn(&create_body(
            Some(&conv),
            "[[mock: deltas=20, interval=50]]",
            None,
        ))
        .await
        .unwrap();
    assert!(long.is_completed());
    assert_eq!(long.delta_count(), 20);
    // The connection is now past max_age: the next full turn rotates to a fresh one.
    let next = s2
        .turn(&create_body(Some(&conv), "after rotation", None))
        .await
        .unwrap();
    assert!(next.is_completed());
    assert_ne!(
        next.response_id().unwrap()[..7],
        long.response_id().unwrap()[..7]
    );
    assert_eq!(decisions(&conv), ["new miss", "new expired", "new expired"]);
    assert!(
        evictions(&conv).iter().all(|r| r == "max_age"),
        "{:?}",
        evictions(&conv)
    );
    s2.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn conversation_from_prompt_cache_key_and_no_key_bypass() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("pck");
    for _ in 0..2 {
        let mut c = gw.connect_without_conversation().await;
        assert!(
            c.turn(&create_body(Some(&conv), "hi", None))
                .await
                .unwrap()
                .is_completed()
        );
        c.close().await;
        wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().busy == 0).await;
    }
    assert_eq!(decisions(&conv), ["new miss", "reuse -"]);

    let before = log_lines(&["reason=no_key"]).len();
    let mut c = gw.connect_without_conversation().await;
    assert!(
        c.turn(&create_body(None, "no id anywhere", None))
            .await
            .unwrap()
            .is_completed()
    );
    c.close().await;
    assert_eq!(log_lines(&["reason=no_key"]).len(), before + 1);
    assert_eq!(mock.accepted(), 2);
    gw.stop().await;
}

/// A client that gives up while its upstream is being dialed (before the 101) does not waste
/// the dial: it completes in its own task and the clean connection waits in the pool, where
/// the client's reconnect finds it. (A pool hit completes inline, without that task.)
#[tokio::test]
async fn a_client_that_leaves_mid_dial_finds_the_dialed_connection_on_reconnect() {
    use tokio::io::AsyncWriteExt;
    let mock = MockUpstream::start(MockConfig {
        handshake_delay: Duration::from_millis(400),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("mid-dial");
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(raw_upgrade(&conv).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.gateway.pool_stats().idle, 0, "still dialing");
    drop(tcp); // gone before the 101
    assert!(
        wait_until(Duration::from_secs(3), || gw.gateway.pool_stats().idle == 1).await,
        "the dial completed and was pooled: {:?}",
        gw.gateway.pool_stats()
    );
    assert_eq!(mock.accepted(), 1);
    gw.warm(&conv).await;
    assert_eq!(decisions(&conv), ["new miss", "reuse -"]);
    assert_eq!(mock.accepted(), 1, "nothing dialed again");
    gw.stop().await;
}
