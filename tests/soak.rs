//! Soak (issue 6, item 3; issue 13's attackers beside them): thousands of sessions against
//! the gateway binary, each with a random fault, bounded in count and time. Afterwards the gateway's RSS is within a small
//! margin of its post-warm-up value and its sessions, session tasks, HTTP connections, busy
//! and dialing slots and stray upstream pumps are back to zero. `SOAK_SESSIONS=50000 cargo test --test soak` runs longer.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::*;
use tokio_tungstenite::tungstenite::Message;
use wsgate::client::{Client, ClientError, create_body};
use wsgate::mock::{MockConfig, MockUpstream};

const CONVERSATIONS: u64 = 150;

/// Sessions that left during their handshake (never became client connections).
static LEFT_IN_HANDSHAKE: AtomicU64 = AtomicU64::new(0);

/// xorshift64*: deterministic per session, no extra dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
}

/// Runs one session with scenario `kind`; `Err` only when the gateway did not give a clear answer.
async fn session(url: &str, run: &str, i: u64, kind: u64) -> Result<(), String> {
    let conv = format!("{run}-{}", i % CONVERSATIONS);
    if kind == 13 {
        // Leave during the handshake: the whole upgrade request, gone before the 101.
        use tokio::io::AsyncWriteExt;
        LEFT_IN_HANDSHAKE.fetch_add(1, Ordering::Relaxed);
        let addr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap_or("");
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(raw_upgrade(&conv).as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        return Ok(());
    }
    let headers = [
        ("authorization", "Bearer test-client-key"),
        ("session-id", conv.as_str()),
    ];
    let mut c = Client::connect(url, &headers)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    c.set_timeout(Duration::from_secs(10));
    let body = |text: &str| create_body(Some(&conv), text, None);
    let clear = |r: Result<wsgate::client::TurnOutcome, ClientError>, what: &str| match r {
        Ok(t) if t.is_completed() || t.terminal()["status"].is_u64() => Ok(()),
        Ok(t) => Err(format!("{what}: unclear terminal {}", t.terminal())),
        Err(ClientError::Closed(Some(_))) => Ok(()),
        Err(e) => Err(format!("{what}: {e}")),
    };
    match kind {
        0..=2 => {
            // Normal multi-turn work with continuations.
            let t = c
                .turn(&body("hi [[mock: deltas=5]]"))
                .await
                .map_err(|e| e.to_string())?;
            let t2 = c
                .turn(&create_body(Some(&conv), "more", t.response_id()))
                .await;
            clear(t2, "continuation")?;
        }
        3 => clear(
            c.turn(&body("[[mock: deltas=6, close=1012@mid]]")).await,
            "1012",
        )?,
        4 => clear(
            c.turn(&body("[[mock: deltas=6, close=1011@mid]]")).await,
            "1011",
        )?,
        5 => clear(c.turn(&body("[[mock: close=eof@before]]")).await, "eof")?,
        6 => {
            // Leave mid-turn.
            c.send_json(&body("[[mock: deltas=40, interval=5]]"))
                .await
                .map_err(|e| e.to_string())?;
            let _ = c.recv().await;
            c.abort();
            return Ok(());
        }
        7 => {
            c.send_text("{not json").await.map_err(|e| e.to_string())?;
            let ev = c.recv().await.map_err(|e| e.to_string())?;
            if ev["status"] != 400 {
                return Err(format!("invalid json: {ev}"));
            }
            clear(c.turn(&body("after the bad frame")).await, "after bad json")?;
        }
        8 => {
            c.send_message(Message::binary(vec![0u8; 8]))
                .await
                .map_err(|e| e.to_string())?;
            match c.recv().await {
                Err(ClientError::Closed(Some(f))) if u16::from(f.code) == 1003 => {}
                other => return Err(format!("binary: {other:?}")),
            }
        }
        9 => clear(
            c.turn(&create_body(Some(&conv), "orphan", Some("resp_0_0")))
                .await,
            "orphan continuation",
        )?,
        10 => {
            c.send_text(&"x".repeat(300 * 1024))
                .await
                .map_err(|e| e.to_string())?;
            match c.recv().await {
                Err(ClientError::Closed(Some(f))) if u16::from(f.code) == 1009 => {}
                other => return Err(format!("oversize: {other:?}")),
            }
        }
        11 => clear(c.turn(&body("[[mock: stall=1500]]")).await, "stall")?,
        _ => {
            // Connect and vanish without a word.
            c.abort();
            return Ok(());
        }
    }
    c.close().await;
    Ok(())
}

async fn phase(
    url: Arc<String>,
    run: Arc<String>,
    count: u64,
    concurrency: usize,
    seed: u64,
) -> (u64, Vec<String>) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (url, run, next) = (url.clone(), run.clone(), next.clone());
        tasks.spawn(async move {
            let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15));
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return failures;
                }
                // Mostly normal sessions; each fault kind about 1 in 20; stalls rarer.
                let roll = rng.next() % 40;
                let kind = match roll {
                    0..=19 => roll % 3,
                    20..=37 => 3 + (roll - 20) % 8,
                    38 => 11,
                    _ => 12 + i % 2,
                };
                if let Err(e) = session(&url, &run, i, kind).await {
                    failures.push(format!("session {i} kind {kind}: {e}"));
                }
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        failures.extend(r.unwrap());
    }
    (count, failures)
}

/// Issue 13's attackers, beside the soak's sessions, `rounds` times each: a client that
/// pipelines `GET /healthz` and never reads, one that declares a whole frame and sends one byte,
/// one that stops reading mid-turn, and an upgrade abandoned right after its 101. Every one of
/// them must be cut by its deadline; none may leave anything behind.
async fn attackers(addr: std::net::SocketAddr, run: Arc<String>, rounds: u64) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut launched = 0;
    let mut held = Vec::new();
    for r in 0..rounds {
        let conv = format!("{run}-{}", r % CONVERSATIONS);
        // Pipelining non-reader.
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let one = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
            let chunk: Vec<u8> = one.iter().copied().cycle().take(one.len() * 4096).collect();
            held.push(tokio::spawn(async move {
                for _ in 0..32 {
                    if tokio::time::timeout(Duration::from_secs(5), s.write_all(&chunk))
                        .await
                        .map_or(true, |w| w.is_err())
                    {
                        break;
                    }
                }
                let _ = closed_within(&mut s, Duration::from_secs(10)).await;
            }));
            launched += 1;
        }
        // A declared 256 KiB frame with one byte of it.
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let head = raw_upgrade("x").replace("session-id: x\r\n", "");
            let _ = s.write_all(head.as_bytes()).await;
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let mut f = vec![0x81, 0x80 | 127];
            f.extend_from_slice(&(256u64 << 10).to_be_bytes());
            f.extend_from_slice(&[1, 2, 3, 4, b'{' ^ 1]);
            let _ = s.write_all(&f).await;
            held.push(tokio::spawn(async move {
                let _ = closed_within(&mut s, Duration::from_secs(10)).await;
            }));
            launched += 1;
        }
        // A client that stops reading mid-turn (4 MiB of deltas).
        let headers = [
            ("authorization", "Bearer test-client-key"),
            ("session-id", conv.as_str()),
        ];
        if let Ok(mut c) = Client::connect(&format!("ws://{addr}/v1/responses"), &headers).await {
            let _ = c
                .send_json(&create_body(
                    Some(&conv),
                    "[[mock: deltas=1000, size=4096]]",
                    None,
                ))
                .await;
            held.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(4)).await;
                drop(c);
            }));
            launched += 1;
        }
        // An upgrade abandoned right after its 101.
        if let Ok(c) = Client::connect(&format!("ws://{addr}/v1/responses"), &headers).await {
            c.abort();
            launched += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for h in held {
        let _ = h.await;
    }
    launched
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_random_faults_leaks_nothing() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = test_yaml(
        &mock.url(),
        &["acct-a"],
        "pool:\n  max_per_account: 1000\n  busy_wait: 20ms\nrelay:\n  max_message_size: 256KiB\n  client_write_timeout: 1s\nlimits:\n  turn_idle_timeout: 500ms\n  first_frame_timeout: 5s\n  frame_timeout: 500ms\n  handshake_timeout: 2s\n  max_connections_per_client: 0\nlog:\n  level: warn\n",
    );
    let gw = GatewayProcess::start_with_env(&yaml, &[("RUST_LOG", "warn,wsgate::server=info")]);
    let url = Arc::new(gw.url());
    let run = Arc::new(unique("soak"));
    let total: u64 = std::env::var("SOAK_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let started = std::time::Instant::now();

    // Warm-up: every conversation once, so the pool and allocator reach their working size.
    let (_, failures) = phase(url.clone(), run.clone(), CONVERSATIONS * 2, 16, 1).await;
    assert!(failures.is_empty(), "warm-up: {failures:?}");
    let warm = gw.settle().await;
    let baseline = gw.rss_kib();

    let attack = tokio::spawn(attackers(gw.addr, run.clone(), 10));
    let (count, failures) = phase(url.clone(), run.clone(), total, 32, 42).await;
    let attacked = attack.await.unwrap();
    assert!(attacked >= 30, "attackers ran: {attacked}");
    assert!(
        failures.is_empty(),
        "{} of {count} sessions had no clear answer, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let after = gw.settle().await;
    let rss = gw.rss_kib();
    let growth = rss.saturating_sub(baseline);
    eprintln!(
        "soak: {count} sessions in {:?}; RSS {baseline} -> {rss} KiB; pool {} -> {}; mock accepted {}",
        started.elapsed(),
        warm["pool"],
        after["pool"],
        mock.accepted()
    );
    assert!(
        growth < (baseline / 4).max(8 * 1024),
        "RSS grew by {growth} KiB over {count} sessions"
    );
    assert!(
        after["pool"]["total"].as_u64().unwrap() <= CONVERSATIONS,
        "pool bounded by conversations: {}",
        after["pool"]
    );
    assert_eq!(
        mock.overlaps(),
        0,
        "never two creates in flight on one upstream"
    );
    let (_, body) = http_get(gw.addr, "/metrics", None).await;
    let opened = prom_value(&body, "wsgate_client_connections_opened_total", &[]).unwrap();
    let closed = prom_value(&body, "wsgate_client_connections_closed_total", &[]).unwrap();
    assert_eq!(opened, closed, "every session that opened also closed");
    let left = LEFT_IN_HANDSHAKE.load(Ordering::Relaxed);
    assert!(left > 0, "some sessions left during their handshake");
    assert!(
        opened >= (count + CONVERSATIONS * 2 - left) as f64 * 0.99,
        "{opened} client connections for {count} sessions ({left} left in the handshake)"
    );
}
