//! End to end with the real Codex CLI (npm `@openai/codex`, pinned): `codex exec` through the
//! gateway against the mock upstream: a tool-call turn, a rate-limited account it never sees,
//! every account limited ("Try again at"), and a gateway restart during a tool run.
//!
//! The binary comes from `CODEX_BIN`, or `target/codex-npm-<version>` (installed by `.ci/run`,
//! or here with `npm install` when missing). If it cannot be had, each test says so loudly and
//! skips.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::*;
use wsgate::mock::{Limit, MockConfig, MockUpstream};

const CODEX_VERSION: &str = "0.171.0";

fn codex_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CODEX_BIN") {
        return Some(PathBuf::from(p));
    }
    let prefix =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/codex-npm-{CODEX_VERSION}"));
    let bin = prefix.join("node_modules/.bin/codex");
    if !bin.exists() {
        // One install for all the tests of this binary.
        static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
        if !bin.exists() {
            eprintln!(
                "installing @openai/codex@{CODEX_VERSION} into {}",
                prefix.display()
            );
            let _ = std::fs::create_dir_all(&prefix);
            let status = std::process::Command::new("timeout")
                .args([
                    "300",
                    "npm",
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--prefix",
                ])
                .arg(&prefix)
                .arg(format!("@openai/codex@{CODEX_VERSION}"))
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                return None;
            }
        }
    }
    bin.exists().then_some(bin)
}

/// The Codex binary, or a loud skip message naming `test`.
fn codex_or_skip(test: &str) -> Option<PathBuf> {
    let bin = codex_bin();
    if bin.is_none() {
        eprintln!(
            "\n!!!!!!!! SKIPPED {test}: the Codex CLI could not be installed from the npm registry !!!!!!!!\n"
        );
    }
    bin
}

/// A `CODEX_HOME` whose provider points at `addr` (over WebSockets).
fn codex_home(addr: std::net::SocketAddr) -> tempfile::TempDir {
    codex_home_with(addr, "supports_websockets = true\n")
}

/// A `CODEX_HOME` whose provider points at `addr`, with `extra` provider lines.
fn codex_home_with(addr: std::net::SocketAddr, extra: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "model_provider = \"gw\"\nmodel = \"gpt-5.5\"\n\n[model_providers.gw]\nname = \"gw\"\nbase_url = \"http://{addr}/v1\"\nenv_key = \"GW_KEY\"\nwire_api = \"responses\"\n{extra}"
        ),
    )
    .unwrap();
    home
}

/// `codex exec <prompt>` in a scratch folder, with the test client key.
fn codex_exec(codex: &Path, home: &Path, work: &Path, prompt: &str) -> tokio::process::Child {
    tokio::process::Command::new(codex)
        .args([
            "exec",
            "--skip-git-repo-check",
            "-s",
            "danger-full-access",
            prompt,
        ])
        .current_dir(work)
        .env("CODEX_HOME", home)
        .env("GW_KEY", CLIENT_KEY)
        .env_remove("OPENAI_API_KEY")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("codex runs")
}

/// Starts `codex exec` on a prompt whose tool runs for 3 s and returns once Codex is running
/// it (the mock answered the tool-call turn: prewarm + turn on one upstream connection).
async fn start_tool_run(
    codex: &Path,
    home: &Path,
    work: &Path,
    mock: &MockUpstream,
) -> tokio::process::Child {
    let run = codex_exec(
        codex,
        home,
        work,
        "Run the check tool. [[mock: tool, tool_sleep=3000]]",
    );
    let tool_running = wait_until(Duration::from_secs(60), || {
        mock.connections()
            .iter()
            .any(|c| c.creates.load(std::sync::atomic::Ordering::Acquire) >= 2)
    })
    .await;
    assert!(tool_running, "Codex reached its tool run");
    run
}

async fn finished(child: tokio::process::Child) -> (Output, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("codex exec finished in time")
        .expect("codex ran");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// The tool really ran and its output came back in the mock's final answer.
fn assert_tool_answer(out: &Output, stdout: &str, stderr: &str) {
    assert!(
        out.status.success(),
        "codex failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("tool output:") && stdout.contains("wsgate-tool-ok"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_exec_runs_a_tool_turn_through_the_gateway() {
    let Some(codex) = codex_or_skip("codex_exec_runs_a_tool_turn_through_the_gateway") else {
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let (home, work) = (codex_home(gw.addr), tempfile::tempdir().unwrap());
    let run = codex_exec(
        &codex,
        home.path(),
        work.path(),
        "Run the check tool. [[mock: tool]]",
    );
    let (out, stdout, stderr) = finished(run).await;
    assert_tool_answer(&out, &stdout, &stderr);
    assert_eq!(
        mock.accepted(),
        1,
        "prewarm, turn and tool follow-up share one upstream connection"
    );
    let up = mock.connection(1).unwrap();
    assert!(
        up.creates.load(std::sync::atomic::Ordering::Acquire) >= 3,
        "prewarm + turn + tool output"
    );
    assert_eq!(
        up.header("authorization"),
        Some(account_key("acct-a").as_str())
    );
    assert_eq!(
        up.header("openai-beta"),
        Some("responses_websockets=2026-02-06")
    );
    let thread = up
        .header("session-id")
        .expect("Codex sends session-id")
        .to_string();
    assert_eq!(decisions(&thread), ["new miss"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_never_sees_a_rate_limit_while_another_account_is_free() {
    let Some(codex) = codex_or_skip("codex_never_sees_a_rate_limit_while_another_account_is_free")
    else {
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    // An idle connection on acct-b makes acct-a the least loaded: Codex's new conversation
    // lands there, and acct-a is the one the upstream limits.
    let on_b = (0..)
        .map(|i| unique(&format!("warm-b-{i}")))
        .find(|c| gw.account_of(c) == "acct-b")
        .unwrap();
    gw.warm(&on_b).await;
    mock.limit(&account_key("acct-a"), Limit::default());
    let (home, work) = (codex_home(gw.addr), tempfile::tempdir().unwrap());
    let run = codex_exec(
        &codex,
        home.path(),
        work.path(),
        "Run the check tool. [[mock: tool]]",
    );
    let (out, stdout, stderr) = finished(run).await;
    assert_tool_answer(&out, &stdout, &stderr);
    assert!(!stderr.contains("429"), "Codex saw the limit:\n{stderr}");
    let limited: Vec<_> = mock
        .connections()
        .into_iter()
        .filter(|c| c.header("authorization") == Some(&*account_key("acct-a")))
        .collect();
    assert_eq!(limited.len(), 1, "Codex's first request went to acct-a");
    assert!(
        limited[0]
            .creates
            .load(std::sync::atomic::Ordering::Acquire)
            >= 1
    );
    let thread = limited[0].header("session-id").unwrap().to_string();
    let d = decisions(&thread);
    assert!(d.contains(&"new failover".to_string()), "{d:?}");
    assert_eq!(gw.gateway.account_state("acct-a"), Some("cooling"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_says_when_to_try_again_when_every_account_is_limited() {
    let Some(codex) = codex_or_skip("codex_says_when_to_try_again_when_every_account_is_limited")
    else {
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    for a in ["acct-a", "acct-b"] {
        mock.limit(&account_key(a), Limit::default());
    }
    let (home, work) = (codex_home(gw.addr), tempfile::tempdir().unwrap());
    let run = codex_exec(&codex, home.path(), work.path(), "hello");
    let (out, stdout, stderr) = finished(run).await;
    let all = format!("{stdout}\n{stderr}");
    assert!(
        all.contains("Try again at"),
        "Codex shows when to retry (exit {}):\n{all}",
        out.status
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_survives_a_gateway_restart_during_a_tool_run() {
    let Some(codex) = codex_or_skip("codex_survives_a_gateway_restart_during_a_tool_run") else {
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = test_yaml(&mock.url(), &["acct-a"], "")
        .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
    let mut a = GatewayProcess::start(&yaml);
    let (home, work) = (codex_home(a.addr), tempfile::tempdir().unwrap());
    let run = start_tool_run(&codex, home.path(), work.path(), &mock).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.signal("TERM");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = GatewayProcess::start(&yaml);
    let (out, stdout, stderr) = finished(run).await;
    assert_tool_answer(&out, &stdout, &stderr);
    let status = a.wait_exit(Duration::from_secs(20)).await.expect("A exits");
    assert!(status.success(), "A exits 0: {status:?}");
    // The log reaches the test through a pipe read by another thread: wait for the line.
    assert!(
        wait_until(Duration::from_secs(10), || b
            .stderr_text()
            .contains("pool decision"))
        .await,
        "the follow-up was served by the replacement"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_over_http_rides_one_pooled_upstream_websocket() {
    let Some(codex) = codex_or_skip("codex_over_http_rides_one_pooled_upstream_websocket") else {
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    // No supports_websockets: Codex speaks HTTP (POST /v1/responses, SSE) to the gateway.
    let (home, work) = (codex_home_with(gw.addr, ""), tempfile::tempdir().unwrap());
    let run = codex_exec(
        &codex,
        home.path(),
        work.path(),
        "Run the check tool. [[mock: tool]]",
    );
    let (out, stdout, stderr) = finished(run).await;
    assert_tool_answer(&out, &stdout, &stderr);
    assert_eq!(
        mock.accepted(),
        1,
        "every request of the turn on one upstream WebSocket"
    );
    let up = mock.connection(1).unwrap();
    assert!(
        up.creates.load(std::sync::atomic::Ordering::Acquire) >= 2,
        "the turn and its tool follow-up"
    );
    let thread = up
        .header("thread-id")
        .or(up.header("session-id"))
        .unwrap()
        .to_string();
    let lines = log_lines(&["pool decision", &format!("conversation={thread} ")]);
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.contains("ingress=http")),
        "{lines:?}"
    );
    assert!(
        lines.iter().skip(1).all(|l| l.contains("decision=reuse")),
        "{lines:?}"
    );
    gw.stop().await;
}

/// Two instances sharing a Redis behind nginx configured as docs/CLUSTER.md says. Codex's
/// instance is drained (SIGTERM) while Codex runs a tool: the idle session gets 1012, Codex
/// reconnects through nginx, and its next turn (the tool output) completes on the other
/// instance, on the same account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_behind_nginx_finishes_on_the_other_instance_when_its_instance_drains() {
    let test = "codex_behind_nginx_finishes_on_the_other_instance_when_its_instance_drains";
    let Some(codex) = codex_or_skip(test) else {
        return;
    };
    let Some(redis) = support::redis_server::RedisServer::any() else {
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let ns = unique("codex-lb");
    let drain = "shutdown:\n  grace: 20s\n";
    let a = support::lb::instance(&mock, &redis, &ns, "A", drain);
    let b = support::lb::instance(&mock, &redis, &ns, "B", drain);
    let Some(lb) = support::lb::Proxy::nginx(a.addr, b.addr) else {
        return;
    };
    let lb_addr: std::net::SocketAddr = format!("127.0.0.1:{}", lb.port).parse().unwrap();
    let (home, work) = (codex_home(lb_addr), tempfile::tempdir().unwrap());
    let run = start_tool_run(&codex, home.path(), work.path(), &mock).await;
    let decided = |p: &GatewayProcess| p.stderr_text().contains("pool decision");
    // The log reaches the test through a pipe read by another thread: wait for the line.
    wait_until(Duration::from_secs(10), || decided(&a) || decided(&b)).await;
    let (mut drained, other) = match (decided(&a), decided(&b)) {
        (true, false) => (a, b),
        (false, true) => (b, a),
        d => panic!("Codex's session is on exactly one instance: {d:?}"),
    };
    let account = |p: &GatewayProcess| {
        p.stderr_text()
            .lines()
            .filter(|l| l.contains("pool decision"))
            .filter_map(|l| {
                l.split(" account=")
                    .nth(1)?
                    .split(' ')
                    .next()
                    .map(String::from)
            })
            .next_back()
    };
    let before = account(&drained);
    drained.signal("TERM");
    let (out, stdout, stderr) = finished(run).await;
    assert_tool_answer(&out, &stdout, &stderr);
    assert!(
        wait_until(Duration::from_secs(10), || decided(&other)).await,
        "the next turn ran on the other instance: {}",
        other.stderr_text()
    );
    assert_eq!(
        account(&other),
        before,
        "on the same account (shared affinity)"
    );
    let status = drained
        .wait_exit(Duration::from_secs(25))
        .await
        .expect("the drained instance exits");
    assert!(status.success(), "{status:?}");
}
