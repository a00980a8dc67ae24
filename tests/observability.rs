//! Issue 4: /readyz, /status.json against the pool's real content, the admin key and
//! listener, JSON logs with span fields, and /status rendered by headless Chromium.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use wsgate::client::create_body;
use wsgate::mock::{MockConfig, MockUpstream};

#[tokio::test]
async fn readyz_flips_when_all_accounts_cool_down_and_while_draining() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    // Readiness on the admin listener: it stays up while the main listener is closed to
    // drain.
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |c| {
        c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.admin_addr().is_some()).await);
    let admin = gw.gateway.admin_addr().unwrap();
    assert_eq!(
        http_get(admin, "/readyz", None).await,
        (200, "ready\n".into())
    );
    assert_eq!(http_get(gw.addr, "/healthz", None).await.0, 200);

    // Both accounts hit their usage limit.
    let conv = unique("ready");
    let mut s = gw.connect(&conv).await;
    for _ in 0..2 {
        let t = s
            .turn(&create_body(
                Some(&conv),
                "[[mock: error=429:usage_limit_reached:2]]",
                None,
            ))
            .await
            .unwrap();
        assert_eq!(t.terminal()["status"], 429);
    }
    let (status, body) = http_get(admin, "/readyz", None).await;
    assert_eq!(status, 503);
    assert!(body.contains("no usable upstream account"), "{body}");
    assert_eq!(
        http_get(gw.addr, "/healthz", None).await.0,
        200,
        "alive while not ready"
    );
    // They come back after the cooldown.
    let back = || async { http_get(admin, "/readyz", None).await.0 == 200 };
    let mut ok = false;
    for _ in 0..100 {
        if back().await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "ready again after the cooldown");

    // Draining: a turn in flight keeps the gateway up, and readiness says draining.
    s.send_json(&create_body(
        Some(&conv),
        "[[mock: deltas=20, interval=50]]",
        None,
    ))
    .await
    .unwrap();
    let _ = s.recv().await.unwrap();
    gw.gateway.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, body) = http_get(admin, "/readyz", None).await;
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "the main listener closed at once: new sessions go to a replacement"
    );
    assert!(s.read_turn().await.unwrap().is_completed());
    gw.stop().await;
}

#[tokio::test]
async fn status_json_matches_the_pool() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let (idle, busy) = (
        unique("status-idle-conversation"),
        unique("status-busy-conversation"),
    );
    gw.warm(&idle).await;
    let mut held = gw.connect(&busy).await;
    for i in 0..2 {
        assert!(
            held.turn(&create_body(Some(&busy), &format!("turn {i}"), None))
                .await
                .unwrap()
                .is_completed()
        );
    }
    let (status, body) = http_get(gw.addr, "/status.json", None).await;
    assert_eq!(status, 200);
    let s: Value = serde_json::from_str(&body).unwrap();
    let stats = gw.gateway.pool_stats();
    assert_eq!(s["pool"]["total"], stats.total as u64);
    assert_eq!(
        (s["pool"]["idle"].as_u64(), s["pool"]["busy"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(s["sessions_active"], 1);
    let conns = s["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 2);
    let find = |state: &str| conns.iter().find(|c| c["state"] == state).unwrap().clone();
    let (ci, cb) = (find("idle"), find("busy"));
    assert_eq!(ci["conversation"], format!("{}…", &idle[..8]), "shortened");
    assert_eq!(ci["turns"], 1);
    assert_eq!(cb["turns"], 2);
    assert_eq!(cb["account"], "acct-a");
    assert!(ci["idle_s"].is_u64() && cb["idle_s"].is_null());
    assert_eq!(s["accounts"][0]["id"], "acct-a");
    assert_eq!(s["accounts"][0]["state"], "usable");
    assert_eq!(s["accounts"][0]["pooled"], 2);
    assert_eq!(s["accounts"][0]["open_connections"], 2);
    assert_eq!(s["decisions"]["new"], 2);
    let recent = s["recent_decisions"].as_array().unwrap();
    assert_eq!(recent.len(), 2);
    assert_eq!(
        recent[0]["conversation"],
        format!("{}…", &busy[..8]),
        "newest first"
    );
    assert!(s["ready"].as_bool().unwrap());
    assert!(
        !body.contains(&idle) && !body.contains(&busy),
        "full conversation ids are not shown"
    );
    assert!(
        !body.contains("sk-acct") && !body.contains("test-client-key"),
        "no secrets"
    );
    // The HTML page carries the same facts.
    let (status, html) = http_get(gw.addr, "/status", None).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("acct-a")
            && html.contains(&format!("{}…", &busy[..8]))
            && html.contains("http-equiv=\"refresh\"")
    );
    assert!(
        !html.contains("<script") && !html.contains("http://") && !html.contains("https://"),
        "self-contained"
    );
    assert!(
        !html.contains("sk-acct") && !html.contains("test-client-key"),
        "no secrets on the page"
    );
    held.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn admin_key_and_separate_admin_listener() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (mut config, _) = config(&mock.url(), &["acct-a"]);
    config.admin.key_env = Some("ADMIN_KEY".into());
    config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    let secrets = config
        .resolve_secrets(&|k| match k {
            "ADMIN_KEY" => Some("admin-secret".into()),
            "TEST_CLIENT_KEY" => Some(CLIENT_KEY.into()),
            _ => Some("sk-acct-a".into()),
        })
        .unwrap();
    let gw = start_with(config, secrets).await;
    let admin = {
        let mut addr = None;
        for _ in 0..100 {
            addr = gw.gateway.admin_addr();
            if addr.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        addr.expect("admin listener up")
    };
    for path in ["/metrics", "/status", "/status.json", "/readyz"] {
        assert_eq!(
            http_get(admin, path, None).await.0,
            401,
            "{path} without key"
        );
        assert_eq!(
            http_get(admin, path, Some("wrong")).await.0,
            401,
            "{path} wrong key"
        );
        assert_eq!(
            http_get(admin, path, Some("admin-secret")).await.0,
            200,
            "{path} with key"
        );
        assert_eq!(
            http_get(gw.addr, path, Some("admin-secret")).await.0,
            404,
            "{path} not on the main listener"
        );
    }
    assert_eq!(http_get(admin, "/healthz", None).await.0, 200);
    gw.stop().await;
}

#[tokio::test]
async fn json_logs_carry_span_fields() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = test_yaml(
        &mock.url(),
        &["acct-a"],
        "log:\n  format: json\n  level: debug\n",
    );
    let mut gw = GatewayProcess::start_with_env(&yaml, &[("RUST_LOG", "wsgate=debug")]);
    let conv = unique("json");
    let mut c = gw.connect(&conv).await;
    assert!(
        c.turn(&create_body(Some(&conv), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    c.close().await;
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .stderr_text()
            .contains("turn ended"))
        .await
    );
    let lines: Vec<Value> = gw
        .stderr_text()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}"))
        })
        .collect();
    let decision = lines
        .iter()
        .find(|l| l["message"] == "pool decision")
        .expect("decision line");
    assert_eq!(decision["decision"], "new");
    assert_eq!(decision["reason"], "miss");
    assert_eq!(decision["conversation"], conv.as_str());
    assert_eq!(decision["upstream.id"], 1);
    let turn = lines
        .iter()
        .find(|l| l["message"] == "turn ended")
        .expect("turn line");
    // The event's own span (`span`) and its parents (`spans`) carry the fields.
    let mut spans = turn["spans"].as_array().expect("span list").clone();
    spans.push(turn["span"].clone());
    let field = |name: &str| {
        spans
            .iter()
            .find_map(|s| s.get(name).cloned())
            .unwrap_or(Value::Null)
    };
    assert_eq!(field("session.id"), 1);
    assert_eq!(field("account"), "acct-a");
    assert_eq!(field("conversation"), conv.as_str());
    assert_eq!(field("upstream.id"), 1);
    assert_eq!(field("upstream.reused"), false);
    assert_eq!(field("turn.seq"), 1);
    assert!(
        !gw.stderr_text().contains("sk-acct-a") && !gw.stderr_text().contains("test-client-key"),
        "no secrets in logs"
    );
    gw.child.kill().ok();
}

#[tokio::test]
async fn status_page_renders_in_headless_chromium_without_console_errors() {
    let Some(chromium) = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!(
            "\n!!!!!!!! SKIPPED status_page_renders_in_headless_chromium: Debian chromium is not installed (.ci/run installs it) !!!!!!!!\n"
        );
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    let conv = unique("browser");
    gw.warm(&conv).await;
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status.png");
    let url = format!("http://{}/status", gw.addr);
    let flags = |extra: Vec<String>| {
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,1024",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ));
        args.extend(extra);
        args.push(url.clone());
        args
    };
    let run = |args: Vec<String>| {
        tokio::process::Command::new(chromium)
            .args(args)
            .kill_on_drop(true)
            .output()
    };
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        run(flags(vec![format!("--screenshot={}", shot.display())])),
    )
    .await
    .expect("chromium finished")
    .expect("chromium ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot ({} bytes)",
        png.len()
    );
    for bad in [
        "Uncaught",
        "CONSOLE(",
        "Failed to load resource",
        "Refused to",
    ] {
        assert!(!stderr.contains(bad), "console error `{bad}`:\n{stderr}");
    }
    let dom = tokio::time::timeout(
        Duration::from_secs(90),
        run(flags(vec!["--dump-dom".into()])),
    )
    .await
    .expect("chromium finished")
    .expect("chromium ran");
    let dom = String::from_utf8_lossy(&dom.stdout);
    for needle in [
        "wsgate",
        "Accounts",
        "acct-a",
        "acct-b",
        "Recent decisions",
        &format!("{}…", &conv[..8]),
    ] {
        assert!(dom.contains(needle), "rendered DOM lacks `{needle}`");
    }
    if let Ok(keep) = std::env::var("WSGATE_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&shot, keep);
    }
    gw.stop().await;
}
