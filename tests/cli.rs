//! The `wsgate` binary: config errors, check-config, the demo (the README's first command),
//! and the standalone mock upstream.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use wsgate::client::{Client, create_body};

fn wsgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    c.env_remove("RUST_LOG");
    c
}

#[test]
fn invalid_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, key) in [
        ("pool:\n  max_aeg: 5m\n", "max_aeg"),
        ("pool:\n  max_age: later\n", "max_age"),
        ("listen: 0.0.0.0:8080\nclients: []\n", "clients"),
        ("upstream:\n  url: http://example.com\n", "upstream.url"),
    ] {
        let path = dir.path().join("g.yaml");
        std::fs::write(&path, yaml).unwrap();
        for args in [
            vec!["--config", path.to_str().unwrap(), "check-config"],
            vec!["run", "--config", path.to_str().unwrap()],
        ] {
            let out = wsgate().args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{yaml}: {stderr}");
            assert!(stderr.contains(key), "{yaml}: {stderr}");
        }
    }
    let out = wsgate()
        .args(["--config", "/nonexistent/g.yaml", "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    std::fs::write(&path, "pool:\n  max_total: 7\n").unwrap();
    let out = wsgate()
        .args(["check-config", "--config", path.to_str().unwrap()])
        .env("WSGATE_CLIENT_KEY", "client-secret-value")
        .env("OPENAI_API_KEY", "sk-secret-value")
        .env("WSGATE_POOL__MAX_AGE", "20m")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["pool"]["max_total"], 7);
    assert_eq!(v["pool"]["max_age"], "20m");
    assert!(!stdout.contains("secret-value"));
    // A named secret that is missing is an error naming it.
    let out = wsgate()
        .args(["check-config", "--config", path.to_str().unwrap()])
        .env_remove("OPENAI_API_KEY")
        .env("WSGATE_CLIENT_KEY", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OPENAI_API_KEY"));
}

#[test]
fn demo_shows_new_reuse_bypass_and_evict() {
    let out = wsgate().arg("demo").stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let order = [
        "pool decision decision=new reason=miss",
        "pool decision decision=reuse reason=-",
        "pool decision decision=bypass reason=busy",
        "pool evict reason=close_1012",
        "pool decision decision=new reason=evicted",
        "pool evict reason=account_changed",
    ];
    let mut at = 0;
    for needle in order {
        let found = stderr[at..]
            .find(needle)
            .unwrap_or_else(|| panic!("`{needle}` missing or out of order:\n{stderr}"));
        at += found + needle.len();
    }
    assert!(
        stdout.contains("client saw close code Some(1012)"),
        "{stdout}"
    );
    assert!(stdout.contains("demo finished"));
}

#[tokio::test]
async fn mock_upstream_subcommand_serves_turns() {
    let mut child = wsgate()
        .args(["mock-upstream", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("ws://127.0.0.1:"), "{line}");
    let mut c = Client::connect(&url, &[]).await.unwrap();
    let t = c
        .turn(&create_body(Some("c"), "hello [[mock: deltas=5]]", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    assert_eq!(t.delta_count(), 5);
    let t2 = c
        .turn(&create_body(Some("c"), "again", t.response_id()))
        .await
        .unwrap();
    assert!(t2.is_completed());
    assert!(t2.cached_tokens().unwrap() > 0);
    let t3 = c
        .turn(&create_body(Some("c"), "stale", Some("resp_9_9")))
        .await
        .unwrap();
    assert_eq!(t3.terminal()["status"], 400);
    assert_eq!(
        t3.terminal()["error"]["code"],
        "previous_response_not_found"
    );
    let _ = child.kill();
    let _ = child.wait();
}
