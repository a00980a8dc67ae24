//! Several instances (issue 15): two or three gateway processes, one real `redis-server`,
//! the in-process mock as the upstream. Skipped loudly when Redis is not installed.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::lb::instance;
use support::redis_server::RedisServer;
use support::*;
use wsgate::client::{Client, ClientError, create_body};
use wsgate::mock::{Limit, MockConfig, MockUpstream};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

/// Waits until `p` logged a line containing `needle` (at most `within`).
async fn logged(p: &GatewayProcess, needle: &str, within: Duration) -> bool {
    wait_until(within, || p.stderr_text().contains(needle)).await
}

async fn connected(p: &GatewayProcess) {
    assert!(
        logged(p, "cluster connected", Duration::from_secs(10)).await,
        "instance connected to Redis: {}",
        p.stderr_text()
    );
}

/// The `account=` of `p`'s pool decisions for lines containing `needle`.
fn accounts_in(p: &GatewayProcess, needle: &str) -> Vec<String> {
    p.stderr_text()
        .lines()
        .filter(|l| l.contains("pool decision") && l.contains(needle))
        .filter_map(|l| {
            l.split(" account=")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .map(str::to_string)
        })
        .collect()
}

/// `p`'s pool decisions for lines containing `needle`, once `done` holds of them (waiting at
/// most 10 s): the log reaches the test through a pipe read by another thread, so a decision
/// written before a turn's answer can be read after the answer.
async fn decisions(
    p: &GatewayProcess,
    needle: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    wait_until(Duration::from_secs(10), || done(&accounts_in(p, needle))).await;
    accounts_in(p, needle)
}

fn made_one(d: &[String]) -> bool {
    !d.is_empty()
}

async fn one_turn(url: &str, headers: &[(&str, &str)], conv: &str) -> Value {
    let mut c = Client::connect(url, headers).await.expect("connect");
    let t = c
        .turn(&create_body(Some(conv), "hello cluster", None))
        .await
        .expect("turn");
    assert!(t.is_completed(), "{:?}", t.terminal());
    c.close().await;
    t.terminal().clone()
}

fn ws_headers(conv: &str) -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {CLIENT_KEY}")),
        ("session-id", conv.to_string()),
    ]
}

fn borrowed<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_keeps_its_account_on_every_instance() {
    let Some(redis) = RedisServer::any() else {
        return;
    };
    let mock = mock().await;
    let ns = unique("aff");
    let extra = "pool:\n  max_per_account: 64\n  max_total: 256\n";
    let a = instance(&mock, &redis, &ns, "A", extra);
    let b = instance(&mock, &redis, &ns, "B", extra);
    connected(&a).await;
    connected(&b).await;
    // Load on B: its own least-loaded choice differs from A's for some conversations.
    let warm = unique("warm");
    one_turn(&b.url(), &borrowed(&ws_headers(&warm)), &warm).await;
    for i in 0..8 {
        let conv = unique(&format!("conv{i}"));
        let h = ws_headers(&conv);
        one_turn(&a.url(), &borrowed(&h), &conv).await;
        one_turn(&b.url(), &borrowed(&h), &conv).await;
        let needle = format!("conversation={conv} ");
        let on_a = decisions(&a, &needle, made_one).await;
        let on_b = decisions(&b, &needle, made_one).await;
        assert_eq!(on_a.len(), 1);
        assert_eq!(on_a, on_b, "conversation {i}: B uses A's account");
    }
    assert!(
        b.stderr_text().contains("reason=shared_affinity"),
        "B followed a binding it would not have chosen itself: {}",
        b.stderr_text()
    );

    // 50 concurrent first requests of one affinity (sub-agent lanes), across A and B.
    let shared = unique("burst");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = if i % 2 == 0 { a.url() } else { b.url() };
        let (shared, lane) = (shared.clone(), unique("lane"));
        tasks.push(tokio::spawn(async move {
            let headers = [
                ("authorization", format!("Bearer {CLIENT_KEY}")),
                ("session-id", shared.clone()),
                ("x-client-request-id", lane),
            ];
            one_turn(&url, &borrowed(&headers), &shared).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let needle = format!("affinity={shared}");
    wait_until(Duration::from_secs(10), || {
        accounts_in(&a, &needle).len() + accounts_in(&b, &needle).len() >= 50
    })
    .await;
    let mut all = accounts_in(&a, &needle);
    all.extend(accounts_in(&b, &needle));
    assert_eq!(all.len(), 50, "every request made one decision");
    all.dedup();
    assert_eq!(all.len(), 1, "all 50 ended on one account: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_seen_by_one_instance_stops_the_others_within_a_second() {
    let Some(redis) = RedisServer::any() else {
        return;
    };
    let mock = mock().await;
    let ns = unique("cool");
    let a = instance(&mock, &redis, &ns, "A", "");
    let b = instance(&mock, &redis, &ns, "B", "");
    connected(&a).await;
    connected(&b).await;
    let conv = unique("bound");
    let h = ws_headers(&conv);
    one_turn(&a.url(), &borrowed(&h), &conv).await;
    one_turn(&b.url(), &borrowed(&h), &conv).await;
    let x = decisions(&b, &format!("conversation={conv} "), made_one).await[0].clone();
    let y = if x == "acct-a" { "acct-b" } else { "acct-a" };

    // A hits the account-wide limit on X: its turn moves to Y (issue 11) and X cools.
    mock.limit(&account_key(&x), Limit::default());
    one_turn(&a.url(), &borrowed(&h), &conv).await;
    let seen = Instant::now();
    assert!(
        logged(
            &b,
            "account unusable (shared by the cluster)",
            Duration::from_secs(1)
        )
        .await,
        "B heard of the limit within 1 s: {}",
        b.stderr_text()
    );
    eprintln!(
        "B stopped assigning {x} {:?} after A's turn",
        seen.elapsed()
    );
    let status = b.status().await;
    let state = status["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == x.as_str())
        .unwrap()["state"]
        .clone();
    assert_eq!(state, "cooling", "{status}");
    assert!(
        status["cluster"]["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == x.as_str() && s["state"] == "cooling"),
        "the shared state is on B's status: {}",
        status["cluster"]
    );
    // New conversations on B avoid X, and the conversation bound to X moves to Y, on both.
    for i in 0..4 {
        let other = unique(&format!("new{i}"));
        one_turn(&b.url(), &borrowed(&ws_headers(&other)), &other).await;
        let on_b = decisions(&b, &format!("conversation={other} "), made_one).await;
        assert_eq!(on_b, [y]);
    }
    one_turn(&b.url(), &borrowed(&h), &conv).await;
    one_turn(&a.url(), &borrowed(&h), &conv).await;
    let needle = format!("conversation={conv} ");
    let moved = |d: &[String]| d.last().map(String::as_str) == Some(y);
    let on_b = decisions(&b, &needle, moved).await;
    let on_a = decisions(&a, &needle, moved).await;
    assert_eq!(on_b.last().map(String::as_str), Some(y), "{on_b:?}");
    assert_eq!(on_a.last().map(String::as_str), Some(y), "{on_a:?}");
}

fn refused_status(e: ClientError) -> u16 {
    match e {
        ClientError::Refused { status, .. } => status,
        e => panic!("expected an HTTP refusal, got {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_limit_holds_across_instances_and_a_crashed_instance_frees_its_leases() {
    let Some(redis) = RedisServer::any() else {
        return;
    };
    let mock = mock().await;
    let ns = unique("lease");
    let extra = "limits:\n  max_connections_per_client: 3\n";
    let a = instance(&mock, &redis, &ns, "A", extra);
    let mut b = instance(&mock, &redis, &ns, "B", extra);
    connected(&a).await;
    connected(&b).await;
    let mut held = Vec::new();
    for p in [&a, &a, &b] {
        held.push(p.connect(&unique("held")).await);
    }
    // Live sessions' leases are refreshed: still counted after the lease TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for p in [&a, &b] {
        let conv = unique("fourth");
        let e = Client::connect(&p.url(), &borrowed(&ws_headers(&conv)))
            .await
            .err()
            .expect("a 4th connection is refused");
        assert_eq!(refused_status(e), 429);
    }
    // B crashes: its lease stays until it expires (lease_ttl 3s), then A has room.
    b.child.kill().unwrap();
    let _ = b.child.wait();
    let killed = Instant::now();
    let conv = unique("after");
    let e = Client::connect(&a.url(), &borrowed(&ws_headers(&conv)))
        .await
        .err()
        .expect("B's lease is still counted right after the crash");
    assert_eq!(refused_status(e), 429);
    let mut freed = None;
    while killed.elapsed() < Duration::from_secs(8) {
        if let Ok(c) = Client::connect(&a.url(), &borrowed(&ws_headers(&conv))).await {
            freed = Some((killed.elapsed(), c));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, _c) = freed.expect("B's lease expired");
    assert!(
        !a.stderr_text().contains("cluster degraded"),
        "lease refreshes kept working: {}",
        a.stderr_text()
    );
    assert!(
        after <= Duration::from_millis(4_500),
        "freed within the lease expiry (3 s after its last refresh): {after:?}"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_owned_by_another_instance_is_answered_at_once() {
    let Some(redis) = RedisServer::any() else {
        return;
    };
    let mock = mock().await;
    let ns = unique("owner");
    let a = instance(&mock, &redis, &ns, "A", "");
    let b = instance(&mock, &redis, &ns, "B", "");
    connected(&a).await;
    connected(&b).await;
    let conv = unique("http");
    let headers = [("session-id", conv.as_str())];
    let first = http_request(
        a.addr,
        "POST",
        "/v1/responses",
        &headers,
        http_body("first", false, json!({})),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text());
    let id = first.json()["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dials = mock.accepted();
    let started = Instant::now();
    let second = http_request(
        b.addr,
        "POST",
        "/v1/responses",
        &headers,
        http_body("second", false, json!({"previous_response_id": id})),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(second.status, 400, "{}", second.text());
    assert_eq!(
        second.json()["error"]["code"],
        "previous_response_not_found"
    );
    assert!(took < Duration::from_millis(50), "answered in {took:?}");
    assert_eq!(mock.accepted(), dials, "nothing dialed");
    assert!(
        logged(&b, "prev_id_owner=other_instance", Duration::from_secs(1)).await
            && b.stderr_text().contains("owner_instance=A"),
        "B logged where the response lives: {}",
        b.stderr_text()
    );
}

fn count(p: &GatewayProcess, needle: &str) -> usize {
    p.stderr_text().matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_degrades_to_local_state_and_its_return_republishes() {
    let Some(mut redis) = RedisServer::own() else {
        return;
    };
    let mock = mock().await;
    let ns = unique("outage");
    let a = instance(&mock, &redis, &ns, "A", "");
    let b = instance(&mock, &redis, &ns, "B", "");
    connected(&a).await;
    connected(&b).await;
    let held = a.connect(&unique("held")).await;
    redis.stop();
    for p in [&a, &b] {
        assert!(
            logged(p, "cluster degraded", Duration::from_secs(3)).await,
            "{}",
            p.stderr_text()
        );
        for _ in 0..3 {
            let conv = unique("local");
            let started = Instant::now();
            one_turn(&p.url(), &borrowed(&ws_headers(&conv)), &conv).await;
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "served on local state"
            );
        }
        assert_eq!(count(p, "cluster degraded"), 1, "one line per outage");
    }
    let metrics = http_get(a.addr, "/metrics", None).await.1;
    assert_eq!(
        prom_value(&metrics, "wsgate_cluster_degraded", &[]),
        Some(1.0)
    );
    assert!(
        prom_value(
            &metrics,
            "wsgate_cluster_redis_errors_total",
            &[("op", "subscribe")]
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert!(
        prom_value(
            &metrics,
            "wsgate_cluster_fallbacks_total",
            &[("op", "affinity_get")]
        )
        .is_some_and(|n| n >= 3.0),
        "every turn's assignment fell back to local state: {metrics}"
    );
    redis.restart();
    let back = Instant::now();
    for p in [&a, &b] {
        assert!(
            logged(p, "cluster recovered", Duration::from_secs(5)).await,
            "{}",
            p.stderr_text()
        );
    }
    assert!(back.elapsed() < Duration::from_secs(5));
    let mut c = redis.conn().await;
    let instances: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{ns}:v1:instances"))
        .query_async(&mut c)
        .await
        .unwrap();
    let mut ids: Vec<_> = instances.keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, ["A", "B"], "registry republished");
    let leases: u64 = redis::cmd("ZCARD")
        .arg(format!(
            "{ns}:v1:client:{}:conns",
            wsgate::cluster::digest(&["test"])
        ))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(leases, 1, "A's live session's lease republished");
    assert_eq!(count(&a, "cluster degraded"), 1);
    let metrics = http_get(a.addr, "/metrics", None).await.1;
    assert_eq!(
        prom_value(&metrics, "wsgate_cluster_degraded", &[]),
        Some(0.0)
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_costs_a_request_at_most_the_call_timeout() {
    let Some(redis) = RedisServer::own() else {
        return;
    };
    let mock = mock().await;
    let ns = unique("slow");
    let a = instance(&mock, &redis, &ns, "A", "");
    connected(&a).await;
    // Redis accepts connections but runs no command for 3 s (a stalled server).
    let mut c = redis.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut c)
        .await
        .unwrap();
    for i in 0..3 {
        let conv = unique("during-pause");
        let started = Instant::now();
        one_turn(&a.url(), &borrowed(&ws_headers(&conv)), &conv).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(250 + 400),
            "turn {i} waited at most the call timeout (250ms) for Redis: {took:?}"
        );
    }
    assert!(
        logged(&a, "cluster degraded", Duration::from_secs(3)).await,
        "{}",
        a.stderr_text()
    );
    assert_eq!(count(&a, "cluster degraded"), 1, "{}", a.stderr_text());
    assert!(
        logged(&a, "cluster recovered", Duration::from_secs(8)).await,
        "back once Redis answers: {}",
        a.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_is_marked_in_the_registry_then_leaves_it() {
    let Some(redis) = RedisServer::any() else {
        return;
    };
    let mock = mock().await;
    let ns = unique("drain");
    let drain = "shutdown:\n  grace: 10s\n";
    let mut a = instance(&mock, &redis, &ns, "A", drain);
    let b = instance(&mock, &redis, &ns, "B", drain);
    let states = |s: &Value| -> Vec<(String, String)> {
        s["cluster"]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_string(),
                    i["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let status = b.status().await;
    assert_eq!(
        states(&status),
        [
            ("A".into(), "serving".into()),
            ("B".into(), "serving".into())
        ],
        "{}",
        status["cluster"]
    );
    assert_eq!(status["cluster"]["instance"], "B");
    assert_eq!(status["cluster"]["degraded"], false);
    // A turn in flight keeps A draining for a while.
    let conv = unique("inflight");
    let mut streaming = a.start_long_turn(&conv).await;
    a.signal("TERM");
    let mut draining = false;
    for _ in 0..50 {
        if states(&b.status().await).contains(&("A".into(), "draining".into())) {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(draining, "B sees A draining");
    let page = http_get(b.addr, "/status", None).await.1;
    assert!(
        page.contains("<h2>Cluster</h2>") && page.contains("draining"),
        "{page}"
    );
    let t = streaming.read_turn().await.unwrap();
    assert!(t.is_completed());
    assert!(a.wait_exit(Duration::from_secs(10)).await.is_some());
    assert_eq!(
        states(&b.status().await),
        [("B".into(), "serving".into())],
        "A left the registry when it stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_send_less_than_one_command_per_second() {
    let Some(redis) = RedisServer::own() else {
        return;
    };
    let mock = mock().await;
    let ns = unique("idle");
    let a = instance(&mock, &redis, &ns, "A", "");
    let b = instance(&mock, &redis, &ns, "B", "");
    connected(&a).await;
    connected(&b).await;
    let conv = unique("once");
    one_turn(&a.url(), &borrowed(&ws_headers(&conv)), &conv).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = redis.commands().await;
    // Twelve seconds hold at least one registry heartbeat per instance (every 10 s by
    // default); anything that polls Redis at 1/s or faster shows as 24 or more.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let during = redis.commands().await - before;
    eprintln!("two idle instances sent {during} commands in 12 s");
    assert!(
        during < 12,
        "less than 0.5/s per instance: {during} in 12 s"
    );
}

/// Every `connect()` the gateway made (strace), as strace prints them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_redis_url_no_connection_is_attempted() {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("\n!!! SKIPPED: strace is not installed (it shows every connect()) !!!\n");
        return;
    }
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("connects.txt");
    let yaml = test_yaml(&mock.url(), &["acct-a"], "");
    let trace_arg = trace.to_str().unwrap().to_string();
    let mut p = GatewayProcess::start_wrapped(
        &yaml,
        &[("RUST_LOG", "info")],
        &["strace", "-f", "-e", "trace=connect", "-o", &trace_arg],
    );
    let conv = unique("solo");
    one_turn(&p.url(), &borrowed(&ws_headers(&conv)), &conv).await;
    // The child is strace; the gateway is its child (strace would detach on a signal).
    let strace = p.child.id();
    let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
        .unwrap_or_default();
    let gateway = children
        .split_whitespace()
        .next()
        .expect("the traced gateway");
    std::process::Command::new("kill")
        .args(["-TERM", gateway])
        .status()
        .unwrap();
    p.wait_exit(Duration::from_secs(10)).await.expect("exits");
    let connects = std::fs::read_to_string(&trace).unwrap();
    let calls: Vec<&str> = connects
        .lines()
        .filter(|l| l.contains("connect("))
        .collect();
    let mock_port = format!("sin_port=htons({})", mock.addr().port());
    assert!(
        calls.iter().any(|l| l.contains(&mock_port)),
        "the trace saw the upstream dial: {connects}"
    );
    for l in &calls {
        assert!(
            l.contains(&mock_port) || l.contains("nscd"),
            "only the upstream was dialed: {l}"
        );
    }
    assert!(
        !p.stderr_text().contains("cluster"),
        "and nothing about a cluster is logged"
    );
}
