//! End to end with the real Codex CLI (npm `@openai/codex`): `codex exec` through the gateway
//! against the mock upstream, including a tool-call turn.
//!
//! The binary comes from `CODEX_BIN`, or `target/codex-npm` (installed by `.ci/run`, or here
//! with `npm install` when missing). If it cannot be had, the test says so loudly and skips.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;
use wsgate::mock::{MockConfig, MockUpstream};

const CODEX_VERSION: &str = "0.169.0";

fn codex_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CODEX_BIN") {
        return Some(PathBuf::from(p));
    }
    let prefix = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/codex-npm");
    let bin = prefix.join("node_modules/.bin/codex");
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
    bin.exists().then_some(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_exec_runs_a_tool_turn_through_the_gateway() {
    let Some(codex) = codex_bin() else {
        eprintln!(
            "\n!!!!!!!! SKIPPED codex_exec_runs_a_tool_turn_through_the_gateway: the Codex CLI could not be installed from the npm registry !!!!!!!!\n"
        );
        return;
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "model_provider = \"gw\"\nmodel = \"gpt-5.5\"\n\n[model_providers.gw]\nname = \"gw\"\nbase_url = \"http://{}/v1\"\nenv_key = \"GW_KEY\"\nwire_api = \"responses\"\nsupports_websockets = true\n",
            gw.addr
        ),
    )
    .unwrap();
    let run = tokio::process::Command::new(&codex)
        .args([
            "exec",
            "--skip-git-repo-check",
            "-s",
            "danger-full-access",
            "Run the check tool. [[mock: tool]]",
        ])
        .current_dir(work.path())
        .env("CODEX_HOME", home.path())
        .env("GW_KEY", CLIENT_KEY)
        .env_remove("OPENAI_API_KEY")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("codex exec finished in time")
        .expect("codex ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "codex failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // The mock's final answer echoes what the tool printed: the tool really ran, and its output
    // came back as a function_call_output continuation on the same upstream connection.
    assert!(
        stdout.contains("tool output:") && stdout.contains("wsgate-tool-ok"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
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
