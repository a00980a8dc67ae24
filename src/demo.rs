//! `wsgate demo`: the mock upstream and the gateway in one process, driven by a scripted
//! multi-turn, multi-reconnect conversation, so the log shows new -> reuse -> bypass -> evict.
//! Offline: everything listens on 127.0.0.1 port 0.

use std::time::Duration;

use tokio::net::TcpListener;

use crate::client::{Client, ClientError, create_body};
use crate::config::{Config, Secrets};
use crate::gateway::Gateway;
use crate::mock::{MockConfig, MockUpstream};

/// Errors of the demo itself (a step that did not behave as scripted).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup failed: {0}")]
    Setup(String),
    #[error("demo step `{step}` failed: {error}")]
    Step { step: &'static str, error: String },
}

fn step<T>(step: &'static str, r: Result<T, ClientError>) -> Result<T, DemoError> {
    r.map_err(|e| DemoError::Step {
        step,
        error: e.to_string(),
    })
}

/// The demo's gateway config: two accounts, the mock as upstream, no client keys (loopback).
pub fn demo_config(upstream_url: &str) -> Result<(Config, Secrets), DemoError> {
    let yaml = format!(
        "listen: 127.0.0.1:0\nclients: []\nupstream:\n  url: {upstream_url}\n  connect_timeout: 5s\n\
         accounts:\n  - id: acct-a\n    api_key_env: DEMO_KEY_A\n  - id: acct-b\n    api_key_env: DEMO_KEY_B\n"
    );
    let config = Config::from_yaml(&yaml).map_err(|e| DemoError::Setup(e.to_string()))?;
    let secrets = config
        .resolve_secrets(&|k| Some(format!("sk-demo-{}", k.to_lowercase())))
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    Ok((config, secrets))
}

/// Runs the demo; prints what the client sees to stdout (the gateway logs go to stderr).
pub async fn run() -> Result<(), DemoError> {
    let mock = MockUpstream::start(MockConfig {
        cache_depth: 4,
        ..MockConfig::default()
    })
    .await
    .map_err(|e| DemoError::Setup(e.to_string()))?;
    let (config, secrets) = demo_config(&mock.url())?;
    let gateway = Gateway::new(config, secrets).map_err(|e| DemoError::Setup(e.to_string()))?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::serve(
        gateway.clone(),
        listener,
        async {
            let _ = stop_rx.await;
        },
        Duration::from_secs(5),
    ));
    let url = format!("ws://{addr}/v1/responses");
    println!(
        "wsgate demo: mock upstream at {}, gateway at {url}\n",
        mock.url()
    );
    let conv = "demo-conversation-1";
    let headers = |c: &'static str| {
        vec![
            ("session-id", c),
            ("openai-beta", "responses_websockets=2026-02-06"),
        ]
    };

    println!(
        "1. Session 1 opens conversation {conv}: prewarm, a turn, a tool turn (expect decision=new reason=miss)"
    );
    let mut s1 = step("connect 1", Client::connect(&url, &headers(conv)).await)?;
    let mut warm = create_body(Some(conv), "", None);
    warm["generate"] = serde_json::json!(false);
    let t0 = step("prewarm", s1.turn(&warm).await)?;
    let t1 = step(
        "turn 1",
        s1.turn(&create_body(Some(conv), "hello", t0.response_id()))
            .await,
    )?;
    let t2 = step(
        "turn 2",
        s1.turn(&create_body(
            Some(conv),
            "run a tool [[mock: tool]]",
            t1.response_id(),
        ))
        .await,
    )?;
    println!(
        "   responses {:?} -> {:?} -> {:?}; cached_tokens {:?} -> {:?} -> {:?}",
        t0.response_id(),
        t1.response_id(),
        t2.response_id(),
        t0.cached_tokens(),
        t1.cached_tokens(),
        t2.cached_tokens()
    );
    let last = t2.response_id().map(str::to_string);
    s1.close().await;

    println!(
        "2. Session 2 reconnects to {conv} and continues from session 1's response (expect decision=reuse)"
    );
    let mut s2 = step("connect 2", Client::connect(&url, &headers(conv)).await)?;
    let t3 = step(
        "turn 3",
        s2.turn(&create_body(
            Some(conv),
            "continue after reconnect",
            last.as_deref(),
        ))
        .await,
    )?;
    println!(
        "   {} continued {:?} on the same upstream; cached_tokens {:?}",
        t3.response_id().unwrap_or("?"),
        last,
        t3.cached_tokens()
    );

    println!(
        "3. Session 3 opens {conv} while session 2 still holds it (expect decision=bypass reason=busy)"
    );
    let mut s3 = step("connect 3", Client::connect(&url, &headers(conv)).await)?;
    let t4 = step(
        "turn 4",
        s3.turn(&create_body(Some(conv), "a parallel sub-task", None))
            .await,
    )?;
    println!(
        "   {} served on a one-shot upstream; cached_tokens {:?}",
        t4.response_id().unwrap_or("?"),
        t4.cached_tokens()
    );
    s3.close().await;
    s2.close().await;

    println!(
        "4. Session 4: the upstream restarts mid-turn with 1012 (expect pool evict reason=close_1012)"
    );
    let mut s4 = step("connect 4", Client::connect(&url, &headers(conv)).await)?;
    match s4
        .turn(&create_body(
            Some(conv),
            "[[mock: deltas=6, close=1012@mid]]",
            None,
        ))
        .await
    {
        Err(e) => println!(
            "   client saw close code {:?}, as Codex expects (it reconnects with full context)",
            e.close_code()
        ),
        Ok(t) => println!("   unexpected: turn ended with {}", t.terminal_type()),
    }
    s4.abort();

    println!("5. Session 5 reconnects (expect decision=new reason=evicted)");
    let mut s5 = step("connect 5", Client::connect(&url, &headers(conv)).await)?;
    let t5 = step(
        "turn 5",
        s5.turn(&create_body(Some(conv), "full context again", None))
            .await,
    )?;
    println!("   {} on a fresh upstream", t5.response_id().unwrap_or("?"));
    s5.close().await;

    let account = gateway.pool_stats();
    let owner = ["acct-a", "acct-b"].into_iter().find(|a| {
        gateway
            .shared
            .pool
            .account_count(&crate::ids::AccountId::new(*a))
            > 0
    });
    if let Some(owner) = owner {
        println!(
            "6. Account {owner} becomes unusable (expect pool evict reason=account_changed, then decision=new on the other account)"
        );
        gateway.disable_account(owner);
        let mut s6 = step("connect 6", Client::connect(&url, &headers(conv)).await)?;
        let t6 = step(
            "turn 6",
            s6.turn(&create_body(Some(conv), "after the account change", None))
                .await,
        )?;
        println!(
            "   {} served on the other account",
            t6.response_id().unwrap_or("?")
        );
        s6.close().await;
    }
    println!("\npool before the account change: {account:?}");
    println!(
        "upstream connections accepted by the mock: {}",
        mock.accepted()
    );
    let _ = stop_tx.send(());
    let _ = server.await;
    println!("demo finished");
    Ok(())
}
