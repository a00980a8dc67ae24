//! Issue 3: hot reload (file change, SIGHUP, broken config) and graceful drain on SIGTERM.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use wsgate::client::{Client, create_body};
use wsgate::config::Config;
use wsgate::mock::{MockConfig, MockUpstream};

fn yaml(mock: &MockUpstream, accounts: &[&str], max_per_account: usize) -> String {
    test_yaml(
        &mock.url(),
        accounts,
        &format!("pool:\n  max_per_account: {max_per_account}\nshutdown:\n  grace: 10s\n"),
    )
}

fn lookup(k: &str) -> Option<String> {
    match k {
        "TEST_CLIENT_KEY" => Some(CLIENT_KEY.into()),
        k => k
            .strip_prefix("KEY_")
            .map(|a| format!("sk-{}", a.to_lowercase().replace('_', "-"))),
    }
}

#[tokio::test]
async fn file_changes_reload_limits_and_accounts_and_broken_config_is_rejected() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml(&mock, &["acct-a", "acct-b"], 3)).unwrap();
    let config = Config::load(&path, true).unwrap();
    let secrets = config.resolve_secrets(&lookup).unwrap();
    let gw = start_with(config, secrets).await;
    wsgate::reload::spawn(gw.gateway.clone(), path.clone(), Arc::new(lookup));
    tokio::time::sleep(Duration::from_millis(200)).await; // the watcher is up

    let conv = unique("reload");
    let owner = gw.account_of(&conv);
    let keep = if owner == "acct-a" {
        "acct-b"
    } else {
        "acct-a"
    };
    gw.warm(&conv).await;

    // Remove the conversation's account and lower the per-account cap.
    let reloads = log_lines(&["config reloaded"]).len();
    std::fs::write(&path, yaml(&mock, &[keep], 1)).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || log_lines(&["config reloaded"])
            .len()
            > reloads)
        .await,
        "reloaded"
    );
    assert_eq!(gw.gateway.config().pool.max_per_account, 1);
    assert_eq!(evictions(&conv), ["account_changed"]);
    assert_eq!(gw.gateway.account_state(&owner), None, "removed");
    assert!(
        wait_until(Duration::from_secs(5), || mock.open() == 0).await,
        "its connection closed"
    );

    // The lower cap applies to the next acquire.
    let (c1, c2) = (unique("cap1"), unique("cap2"));
    let mut a = gw.connect(&c1).await;
    let mut b = gw.connect(&c2).await;
    assert!(
        a.turn(&create_body(Some(&c1), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    assert!(
        b.turn(&create_body(Some(&c2), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    assert_eq!(decisions(&c1), ["new miss"]);
    assert_eq!(decisions(&c2), ["bypass cap"]);
    a.close().await;
    b.close().await;

    // A broken file is rejected with a reason; the config in force stays.
    std::fs::write(&path, "pool: [not, a, map\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !log_lines(&[
            "config reload rejected"
        ])
        .is_empty())
        .await
    );
    assert_eq!(gw.gateway.config().pool.max_per_account, 1);
    assert_eq!(gw.gateway.config().accounts.len(), 1);
    let c3 = unique("after");
    let mut c = gw.connect(&c3).await;
    assert!(
        c.turn(&create_body(Some(&c3), "still serving", None))
            .await
            .unwrap()
            .is_completed()
    );
    c.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = GatewayProcess::start(&yaml(&mock, &["acct-a"], 8));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!gw.stderr_text().contains("config reloaded"));
    gw.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .stderr_text()
            .contains("config reloaded"))
        .await,
        "{}",
        gw.stderr_text()
    );
    // Still serving.
    let conv = unique("hup");
    let mut c = gw.connect(&conv).await;
    assert!(
        c.turn(&create_body(Some(&conv), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    c.close().await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_turns_closes_idle_clients_with_1012_and_exits_0() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let mut gw = GatewayProcess::start(&yaml(&mock, &["acct-a"], 8));
    let (idle_conv, busy_conv) = (unique("idle"), unique("busy"));
    let idle_h = [
        ("authorization", "Bearer test-client-key"),
        ("session-id", idle_conv.as_str()),
    ];
    let mut idle = Client::connect(&gw.url(), &idle_h).await.unwrap();
    assert!(
        idle.turn(&create_body(Some(&idle_conv), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    let mut busy = gw.connect(&busy_conv).await;
    busy.send_json(&create_body(
        Some(&busy_conv),
        "[[mock: deltas=30, interval=40]]",
        None,
    ))
    .await
    .unwrap();
    let _created = busy.recv().await.unwrap();

    gw.signal("TERM");
    // The idle client is told to reconnect elsewhere.
    let err = idle.recv().await.unwrap_err();
    assert_eq!(err.close_code(), Some(1012), "{err}");
    // The turn in flight completes.
    let rest = busy.read_turn().await.unwrap();
    assert!(rest.is_completed());
    assert_eq!(rest.delta_count(), 30);
    // New connections are refused.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(Client::connect(&gw.url(), &idle_h).await.is_err());
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exited within grace");
    assert_eq!(status.code(), Some(0), "{}", gw.stderr_text());
    // Pooled upstreams were closed with 1001.
    let all_closed = || {
        mock.connections()
            .iter()
            .all(|r| r.peer_close_code().is_some())
    };
    assert!(wait_until(Duration::from_secs(5), all_closed).await);
    for rec in mock.connections() {
        assert_eq!(
            rec.peer_close_code(),
            Some(1001),
            "upstream {}: {}",
            rec.id,
            gw.stderr_text()
        );
    }
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let mut gw = GatewayProcess::start(&yaml(&mock, &["acct-a"], 8));
    let conv = unique("twice");
    let mut c = gw.connect(&conv).await;
    c.send_json(&create_body(
        Some(&conv),
        "[[mock: deltas=100, interval=100]]",
        None,
    ))
    .await
    .unwrap();
    let _ = c.recv().await.unwrap();
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "draining, not exited"
    );
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(3))
        .await
        .expect("exited at once");
    assert_ne!(status.code(), Some(0));
}
