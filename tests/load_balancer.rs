//! The load-balancer recipes of docs/CLUSTER.md, run exactly as documented (only the
//! addresses replaced) in front of two instances sharing a real Redis: Debian nginx, and
//! HAProxy when installed. Skipped loudly when a part is missing.

mod support;

use std::time::Duration;

use support::lb::{Proxy, instance};
use support::redis_server::RedisServer;
use support::*;
use wsgate::client::{Client, create_body};
use wsgate::mock::{MockConfig, MockUpstream};

/// Pool decisions `p` logged for session `s` (as lane or as affinity).
fn served(p: &GatewayProcess, s: &str) -> usize {
    p.stderr_text()
        .lines()
        .filter(|l| {
            l.contains("pool decision")
                && (l.contains(&format!("conversation={s} "))
                    || l.contains(&format!("affinity={s} ")))
        })
        .count()
}

/// A Codex process tree's headers: the root (no thread id) and two sub-agents, all with one
/// session id in the given spelling.
fn tree(session: &str, spelling: &'static str) -> Vec<Vec<(&'static str, String)>> {
    (0..3)
        .map(|k| {
            let mut h = vec![
                ("authorization", format!("Bearer {CLIENT_KEY}")),
                (spelling, session.to_string()),
            ];
            if k > 0 {
                h.push(("thread-id", format!("{session}-agent{k}")));
            }
            h
        })
        .collect()
}

async fn connect(url: &str, h: &[(&'static str, String)]) -> Client {
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Client::connect(url, &h)
        .await
        .expect("connect through the load balancer")
}

/// A turn without `prompt_cache_key`: the gateway can only key it by the headers that
/// crossed the load balancer (a dropped `session_id` would leave it without a lane).
async fn turn(c: &mut Client) {
    let t = c
        .turn(&create_body(None, "hello from a tree", None))
        .await
        .expect("turn");
    assert!(t.is_completed(), "{:?}", t.terminal());
}

/// Runs 10 process trees (alternating `session-id` / `session_id`) through `lb`; asserts each
/// tree reached exactly one instance, and that the trees were spread over both (the hash
/// key is the session, not only the client key). Returns the trees' roots, still connected.
async fn trees_stick(
    lb: &Proxy,
    a: &GatewayProcess,
    b: &GatewayProcess,
) -> Vec<(String, Vec<(&'static str, String)>, Client)> {
    let mut roots = Vec::new();
    for i in 0..10 {
        let session = unique(&format!("tree{i}"));
        let spelling = if i % 2 == 0 {
            "session-id"
        } else {
            "session_id"
        };
        let mut members = tree(&session, spelling).into_iter();
        let root_headers = members.next().unwrap();
        let mut root = connect(&lb.url(), &root_headers).await;
        turn(&mut root).await;
        for h in members {
            let mut agent = connect(&lb.url(), &h).await;
            turn(&mut agent).await;
            agent.close().await;
        }
        // A decision line reaches the captured stderr a moment after the turn's answer (the
        // log writer and the pipe's reader are threads of their own): wait for all three.
        wait_until(Duration::from_secs(5), || {
            served(a, &session) + served(b, &session) >= 3
        })
        .await;
        let (on_a, on_b) = (served(a, &session), served(b, &session));
        assert!(
            (on_a, on_b) == (3, 0) || (on_a, on_b) == (0, 3),
            "tree {i} ({spelling}) on one instance: A {on_a}, B {on_b}"
        );
        roots.push((session, root_headers, root));
    }
    let on_a = roots.iter().filter(|(s, _, _)| served(a, s) > 0).count();
    assert!(
        on_a > 0 && on_a < roots.len(),
        "10 sessions hashed onto both instances (all on one has odds 1/512): {on_a} on A"
    );
    roots
}

async fn setup(ns: &str) -> Option<(RedisServer, MockUpstream, GatewayProcess, GatewayProcess)> {
    let redis = RedisServer::any()?;
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let drain = "shutdown:\n  grace: 10s\n";
    let a = instance(&mock, &redis, ns, "A", drain);
    let b = instance(&mock, &redis, ns, "B", drain);
    Some((redis, mock, a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_keeps_a_codex_process_tree_on_one_instance_and_drains_to_the_other() {
    let Some((_redis, _mock, a, b)) = setup(&unique("nginx")).await else {
        return;
    };
    let Some(lb) = Proxy::nginx(a.addr, b.addr) else {
        return;
    };
    let mut roots = trees_stick(&lb, &a, &b).await;

    // Drain the instance that serves tree 0: its idle root gets 1012 and reconnects through
    // nginx, which now sends it to the other instance; the next turn completes there, on
    // the same account (the affinity is shared).
    let (session, headers, mut root) = roots.remove(0);
    let (mut draining, other) = if served(&a, &session) > 0 {
        (a, b)
    } else {
        (b, a)
    };
    let account_before = draining
        .stderr_text()
        .lines()
        .find(|l| l.contains("pool decision") && l.contains(&format!("conversation={session} ")))
        .and_then(|l| {
            l.split(" account=")
                .nth(1)?
                .split(' ')
                .next()
                .map(str::to_string)
        })
        .unwrap();
    draining.signal("TERM");
    let closed = tokio::time::timeout(Duration::from_secs(5), root.recv())
        .await
        .expect("the idle root is closed at once")
        .expect_err("closed, not a frame");
    assert_eq!(closed.close_code(), Some(1012), "{closed}");
    let mut again = connect(&lb.url(), &headers).await;
    turn(&mut again).await;
    // The log reaches the test through a pipe read by another thread: wait for the line.
    wait_until(Duration::from_secs(10), || served(&other, &session) > 0).await;
    let on_other: Vec<String> = other
        .stderr_text()
        .lines()
        .filter(|l| l.contains("pool decision") && l.contains(&format!("conversation={session} ")))
        .map(str::to_string)
        .collect();
    assert_eq!(on_other.len(), 1, "the next turn ran on the other instance");
    assert!(
        on_other[0].contains(&format!(" account={account_before} ")),
        "on the same account: {}",
        on_other[0]
    );
    again.close().await;
    drop(roots);
    let status = draining
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the drained instance exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_keeps_a_codex_process_tree_on_one_instance() {
    let Some((_redis, _mock, a, b)) = setup(&unique("haproxy")).await else {
        return;
    };
    let Some(lb) = Proxy::haproxy(a.addr, b.addr) else {
        return;
    };
    let roots = trees_stick(&lb, &a, &b).await;
    assert_eq!(roots.len(), 10);
}
