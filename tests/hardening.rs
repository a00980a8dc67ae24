//! Hardening of the listener (issue 13, in part): RFC 6455 opening-handshake validation, and
//! a no-auth gateway that browsers and DNS-rebinding pages cannot use.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::mock::{MockConfig, MockUpstream};

/// Sends a raw request head and returns the status line and headers of the answer.
async fn raw(addr: std::net::SocketAddr, head: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn upgrade_head(host: &str, extra: &str, key: &str, version: &str) -> String {
    format!(
        "GET /v1/responses HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n\
         Authorization: Bearer test-client-key\r\nsession-id: {}\r\n{extra}\r\n",
        unique("hs")
    )
}

#[tokio::test]
async fn the_opening_handshake_is_checked_as_rfc_6455_says() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let long = "A".repeat(30_000);
    for key in ["", "not-base64!!", "dGhlIHNhbXBsZSBub25jZQ", long.as_str()] {
        let (status, text) = raw(gw.addr, &upgrade_head("t", "", key, "13")).await;
        assert_eq!(status, 400, "key {:?}: {text}", &key[..key.len().min(20)]);
    }
    let (status, text) = raw(
        gw.addr,
        &upgrade_head("t", "", "dGhlIHNhbXBsZSBub25jZQ==", "8"),
    )
    .await;
    assert_eq!(status, 426, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{text}"
    );
    assert_eq!(mock.accepted(), 0, "nothing dialed for a bad handshake");
    // A good one still works.
    let (status, text) = raw(
        gw.addr,
        &upgrade_head("t", "", "dGhlIHNhbXBsZSBub25jZQ==", "13"),
    )
    .await;
    assert_eq!(status, 101, "{text}");
    gw.stop().await;
}

#[tokio::test]
async fn a_no_auth_gateway_refuses_browsers_and_foreign_hosts() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = test_yaml(&mock.url(), &["acct-a"], "").replace(
        "clients:\n  - name: test\n    key_env: TEST_CLIENT_KEY\n",
        "clients: []\n",
    );
    let config = wsgate::Config::from_yaml(&yaml).unwrap();
    let secrets = config
        .resolve_secrets(&|k| k.strip_prefix("KEY_").map(|a| format!("sk-{a}")))
        .unwrap();
    let gw = start_with(config, secrets).await;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let (status, text) = raw(
        gw.addr,
        &upgrade_head("127.0.0.1", "Origin: http://evil.example\r\n", key, "13"),
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("origin_not_allowed"));
    let (status, text) = raw(gw.addr, &upgrade_head("rebound.example", "", key, "13")).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("host_not_allowed"));
    // The HTTP ingress too.
    let r = http_request(
        gw.addr,
        "POST",
        "/v1/responses",
        &[
            ("origin", "http://evil.example"),
            ("content-type", "application/json"),
        ],
        http_body("hi", false, serde_json::json!({})),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "origin_not_allowed");
    assert_eq!(mock.accepted(), 0);
    // Codex (no Origin, a loopback Host) is unaffected.
    let conv = unique("no-auth");
    let mut c = wsgate::client::Client::connect(
        &gw.url(),
        &[("session-id", conv.as_str()), ("thread-id", conv.as_str())],
    )
    .await
    .expect("Codex-like client");
    let t = c
        .turn(&wsgate::client::create_body(Some(&conv), "hi", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    c.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn untrusted_text_reaches_the_log_escaped_on_one_line() {
    let mock = MockUpstream::start(MockConfig {
        close_reason: Some("bye\nINFO wsgate: forged-line \u{1b}[31mred".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("inject");
    let mut c = gw.connect(&conv).await;
    let t = c
        .turn(&wsgate::client::create_body(
            Some(&conv),
            "[[mock: deltas=4, close=1011@mid]]",
            None,
        ))
        .await
        .unwrap();
    assert_eq!(t.terminal()["status"], 502);
    c.close().await;
    let lines = log_lines(&["forged-line"]);
    assert!(!lines.is_empty(), "the reason was logged");
    for l in &lines {
        assert!(
            l.contains("bye\\\\nINFO") || l.contains("bye\\nINFO"),
            "escaped: {l}"
        );
        assert!(!l.contains('\u{1b}'), "no raw escape sequence: {l:?}");
        assert!(
            !l.starts_with("INFO wsgate: forged-line"),
            "no forged line: {l}"
        );
    }
    assert!(
        log_lines(&["INFO wsgate: forged-line"])
            .iter()
            .all(|l| !l.trim_start().starts_with("INFO wsgate: forged")),
        "the newline never split a line"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_mid_turn_is_closed_and_frees_its_slot() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.relay.client_write_timeout = Duration::from_millis(500);
        c.relay.max_message_size = bytesize::ByteSize::kib(256);
        c.pool.max_per_account = 1;
    })
    .await;
    let conv = unique("stalled-reader");
    let mut c = gw.connect(&conv).await;
    // 100 MiB of deltas: far more than the socket buffers hold. Then never read again.
    c.send_json(&wsgate::client::create_body(
        Some(&conv),
        "[[mock: deltas=25600, size=4096]]",
        None,
    ))
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || gw.gateway.resources().sessions
            == 0)
        .await,
        "the session ended: {:?}",
        gw.gateway.resources()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    gw.assert_quiescent("stalled reader").await;
    assert_eq!(evictions(&conv), ["discarded"]);
    assert!(
        wait_until(Duration::from_secs(2), || mock.open() == 0).await,
        "upstream closed"
    );
    // Its pool slot is free: a victim's new conversation is pooled, not bypassed.
    let victim = unique("victim");
    gw.warm(&victim).await;
    assert_eq!(decisions(&victim), ["new miss"]);
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn abandoned_upgrades_make_room_for_a_real_conversation() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| c.pool.max_per_account = 8).await;
    // 8 upgrades with fresh ids, closed right after the 101: 8 dialed, pooled, never used.
    for i in 0..8 {
        let c = gw.connect(&unique(&format!("abandoned-{i}"))).await;
        c.abort();
    }
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().idle == 8).await);
    let victim = unique("victim");
    gw.warm(&victim).await;
    assert_eq!(decisions(&victim), ["new miss"], "not bypass cap");
    assert_eq!(log_lines(&["pool evict", "reason=lru"]).len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn unused_pooled_connections_are_not_kept_for_the_whole_idle_timeout() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.pool.unused_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let abandoned = unique("unused");
    gw.connect(&abandoned).await.abort();
    let used = unique("used");
    gw.warm(&used).await;
    assert!(
        wait_until(Duration::from_secs(3), || gw.gateway.pool_stats().idle == 1).await,
        "only the unused one went: {:?}",
        gw.gateway.pool_stats()
    );
    assert_eq!(evictions(&abandoned), ["idle_timeout"]);
    assert!(evictions(&used).is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn held_frames_are_bounded_in_bytes() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = GatewayProcess::start(&test_yaml(&mock.url(), &["acct-a"], ""));
    let conv = unique("held-bytes");
    let mut c = gw.connect(&conv).await;
    let before = gw.rss_kib();
    c.send_json(&wsgate::client::create_body(
        Some(&conv),
        "[[mock: deltas=100, interval=20]]",
        None,
    ))
    .await
    .unwrap();
    // 16 creates of 30 MiB each behind the turn in flight: the second passes 32 MiB.
    let big = wsgate::client::create_body(Some(&conv), &"x".repeat(30 << 20), None).to_string();
    let mut closed = None;
    for _ in 0..16 {
        if let Err(e) = c.send_text(&big).await {
            closed = closed.or(e.close_code());
            break;
        }
    }
    loop {
        match c.recv().await {
            Ok(_) => continue,
            Err(e) => {
                closed = closed.or(e.close_code());
                break;
            }
        }
    }
    assert_eq!(closed, Some(1008), "refused past relay.max_queued_bytes");
    let grown_mib = gw.rss_kib().saturating_sub(before) / 1024;
    // The README's bound: max_queued_bytes (32 MiB) + one message being read (up to 2 x 32 MiB
    // while its buffer grows) + buffers and allocator slack (32 MiB).
    assert!(grown_mib < 128, "RSS grew {grown_mib} MiB");
    gw.settle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_non_readers_cannot_hold_the_listener() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.handshake_timeout = Duration::from_secs(1);
        c.limits.max_handshakes = 4;
    })
    .await;
    let addr = gw.addr;
    // 8 clients pipeline 8 MiB of `GET /healthz` and never read an answer: the answers fill
    // the socket buffers and the gateway's writes stall.
    let started = tokio::time::Instant::now();
    let attackers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let one = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
                let chunk: Vec<u8> = one.iter().copied().cycle().take(one.len() * 2048).collect();
                let mut sent = 0;
                while sent < 8 << 20 {
                    match tokio::time::timeout(Duration::from_secs(10), s.write_all(&chunk)).await {
                        Ok(Ok(())) => sent += chunk.len(),
                        // Closed by the gateway (reset), or stuck for 10 s (the bug).
                        Ok(Err(_)) => return Some(started.elapsed()),
                        Err(_) => return None,
                    }
                }
                // Everything was written: wait (without reading) for the close.
                closed_within(&mut s, Duration::from_secs(10))
                    .await
                    .map(|_| started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A health check and a real session are still served.
    let served = tokio::time::timeout(Duration::from_secs(4), async {
        assert_eq!(http_get(addr, "/healthz", None).await.0, 200);
        let conv = unique("after-attack");
        let mut c = gw.connect(&conv).await;
        let t = c
            .turn(&wsgate::client::create_body(Some(&conv), "hi", None))
            .await
            .unwrap();
        assert!(t.is_completed());
        c.close().await;
    })
    .await;
    assert!(served.is_ok(), "the listener kept serving");
    for a in attackers {
        let closed = a.await.unwrap().expect("the attacker was disconnected");
        assert!(closed < Duration::from_secs(4), "closed after {closed:?}");
    }
    assert!(
        wait_until(Duration::from_secs(3), || gw
            .gateway
            .resources()
            .http_connections
            == 0)
        .await
    );
    gw.stop().await;
}

/// A masked text frame header declaring `len` payload bytes, and the first payload byte.
fn frame_header_declaring(len: u64) -> Vec<u8> {
    let mut f = vec![0x81, 0x80 | 127];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[1, 2, 3, 4]); // mask key
    f.push(b'{' ^ 1);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_frame_lengths_reserve_nothing() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "\n!!!!!!!! SKIPPED declared_frame_lengths_reserve_nothing: prlimit is not installed !!!!!!!!\n"
        );
        return;
    }
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = test_yaml(
        &mock.url(),
        &["acct-a"],
        "limits:\n  max_connections_per_client: 0\n",
    );
    // 2 GiB of address space: 500 reservations of 32 MiB would need 16 GiB.
    let gw = GatewayProcess::start_wrapped(
        &yaml,
        &[("RUST_LOG", "info")],
        &["prlimit", "--as=2147483648", "--"],
    );
    let addr = gw.addr;
    let baseline = gw.rss_kib();
    let mut attackers = Vec::new();
    for _ in 0..500 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // An upgrade without a conversation id (nothing is dialed), then one frame header
        // declaring 32 MiB and a single payload byte.
        let head = raw_upgrade("x").replace("session-id: x\r\n", "");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
        s.write_all(&frame_header_declaring(32 << 20))
            .await
            .unwrap();
        attackers.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = gw.rss_kib();
    // A normal turn completes beside them: the process is alive.
    let conv = unique("beside-frames");
    let mut c = gw.connect(&conv).await;
    let t = c
        .turn(&wsgate::client::create_body(Some(&conv), "hi", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    c.close().await;
    assert!(
        held.saturating_sub(baseline) < 100 * 1024,
        "500 declared 32 MiB frames held {} MiB",
        held.saturating_sub(baseline) / 1024
    );
    drop(attackers);
    let status = gw.settle().await;
    assert_eq!(status["sessions_active"], 0);
    let after = gw.rss_kib();
    assert!(
        after.saturating_sub(baseline) < 64 * 1024,
        "RSS back near its baseline: {baseline} -> {after} KiB"
    );
}

#[tokio::test]
async fn protocol_violations_get_a_1002_close_frame() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    for bad in [
        // RSV1 set on a text frame (no extension was negotiated).
        vec![0xC1, 0x80 | 2, 1, 2, 3, 4, b'{' ^ 1, b'}' ^ 2],
        // An unmasked client frame.
        vec![0x81, 2, b'{', b'}'],
    ] {
        assert_eq!(close_code_after(gw.addr, &bad).await, 1002, "{bad:?}");
    }
    gw.assert_quiescent("protocol violations").await;
    gw.stop().await;
}

/// Upgrades a raw connection (no conversation id: nothing is dialed), writes `frame` and
/// returns the code of the close frame the gateway answers with.
async fn close_code_after(addr: std::net::SocketAddr, frame: &[u8]) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = raw_upgrade("x").replace("session-id: x\r\n", "");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an upgrade answer")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    s.write_all(frame).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert!(n >= 4, "a close frame, not a bare TCP close");
    assert_eq!(buf[0], 0x88, "close opcode: {:?}", &buf[..n]);
    u16::from_be_bytes([buf[2], buf[3]])
}

/// A text frame that is not UTF-8 gets the 1007 close RFC 6455 §7.4.1 names, wherever the
/// bad byte sits (the vendored tungstenite checks with SIMD in 64-byte blocks: a bad byte
/// after a long valid prefix, or a sequence cut at the end, must still be found), and is
/// counted like every other client violation (`errors_total{kind="client_invalid_utf8"}`).
#[tokio::test]
async fn text_that_is_not_utf8_gets_a_1007_close_frame() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let mut long_prefix = vec![b'a'; 100];
    long_prefix.push(0xff);
    let mut cut = "é".repeat(40).into_bytes();
    cut.push(0xc3);
    for bad in [long_prefix, cut, vec![b'{', 0xed, 0xa0, 0x80, b'}']] {
        assert_eq!(
            close_code_after(gw.addr, &masked_frame(&bad)).await,
            1007,
            "{bad:?}"
        );
    }
    // The recorder is the process's: no other test of this binary sends such a frame.
    let (_, metrics) = http_get(gw.addr, "/metrics", None).await;
    let counted = prom_value(
        &metrics,
        "wsgate_errors_total",
        &[("kind", "client_invalid_utf8")],
    );
    assert_eq!(counted, Some(3.0), "{metrics}");
    gw.assert_quiescent("invalid UTF-8").await;
    gw.stop().await;
}

/// A masked client text frame of any payload under 64 KiB.
fn masked_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [7u8, 1, 9, 3];
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Valid UTF-8 of every width, across the validator's block boundaries, is read as sent.
#[test]
fn multibyte_text_across_block_boundaries_is_read_as_sent() {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    let texts: Vec<String> = (0..70)
        .map(|pad| format!("{}é€😀 ü{}", "x".repeat(pad), "😀".repeat(20)))
        .collect();
    let socket = RecordingSocket {
        incoming: [texts
            .iter()
            .flat_map(|t| masked_frame(t.as_bytes()))
            .collect()]
        .into(),
        offered: Vec::new(),
    };
    let config = WebSocketConfig::default().read_buffer_size(64 << 10);
    let mut ws = WebSocket::from_raw_socket(socket, Role::Server, Some(config));
    for want in &texts {
        let msg = ws.read().expect("a frame");
        assert_eq!(msg.into_text().unwrap().as_str(), want);
    }
}

#[tokio::test]
async fn a_frame_that_never_completes_is_cut_at_its_deadline() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.frame_timeout = Duration::from_millis(200);
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = raw_upgrade("x").replace("session-id: x\r\n", "");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    // A 1 MiB frame, of which one byte arrives.
    s.write_all(&frame_header_declaring(1 << 20)).await.unwrap();
    let started = tokio::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed by its deadline")
        .unwrap();
    assert!(n >= 4 && buf[0] == 0x88, "a close frame: {:?}", &buf[..n]);
    assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 1008);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    drop(s);
    // An idle session that sends nothing is left alone (first_frame_timeout is 60 s).
    let idle = gw.connect_without_conversation().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        wait_until(Duration::from_secs(3), || gw.gateway.resources().sessions
            == 1)
        .await,
        "the idle session is still there, the cut one is gone: {:?}",
        gw.gateway.resources()
    );
    drop(idle);
    gw.stop().await;
}

#[tokio::test]
async fn the_gateway_wide_byte_budget_refuses_new_work_instead_of_growing() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.max_buffered_bytes = bytesize::ByteSize::mib(6);
        c.relay.max_queued_bytes = bytesize::ByteSize::mib(5);
    })
    .await;
    let big = |conv: &str| {
        wsgate::client::create_body(Some(conv), &"x".repeat(4 << 20), None).to_string()
    };
    // Session A holds 4 MiB behind its turn: within the budget.
    let a = unique("budget-a");
    let mut ca = gw.connect(&a).await;
    ca.send_json(&wsgate::client::create_body(
        Some(&a),
        "[[mock: deltas=20, interval=20]]",
        None,
    ))
    .await
    .unwrap();
    ca.recv().await.unwrap();
    ca.send_text(&big(&a)).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || gw
            .gateway
            .resources()
            .buffered_bytes
            > 4 << 20)
        .await
    );
    // Session B's 4 MiB would pass the 6 MiB budget: refused with 1013, A unaffected.
    let b = unique("budget-b");
    let mut cb = gw.connect(&b).await;
    cb.send_json(&wsgate::client::create_body(
        Some(&b),
        "[[mock: deltas=20, interval=20]]",
        None,
    ))
    .await
    .unwrap();
    cb.recv().await.unwrap();
    let _ = cb.send_text(&big(&b)).await;
    let code = loop {
        match cb.recv().await {
            Ok(_) => continue,
            Err(e) => break e.close_code(),
        }
    };
    assert_eq!(code, Some(1013));
    // A's turn and its held request both complete; the budget goes back to zero.
    let first = ca.read_turn().await.unwrap();
    assert!(first.is_completed());
    let second = ca.read_turn().await.unwrap();
    assert!(second.is_completed());
    ca.close().await;
    gw.assert_quiescent("budget").await;
    assert_eq!(gw.gateway.resources().buffered_bytes, 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_message_still_arriving_holds_its_bytes_in_the_gateway_wide_budget() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.max_buffered_bytes = bytesize::ByteSize::mib(6);
    })
    .await;
    // A client declares an 8 MiB frame, sends 5 MiB of it and stalls.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(raw_upgrade(&unique("slow")).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = slow.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    slow.write_all(&frame_header_declaring(8 << 20))
        .await
        .unwrap();
    slow.write_all(&vec![b' ' ^ 1; 5 << 20]).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .gateway
            .resources()
            .buffered_bytes
            >= 5 << 20)
        .await,
        "the arriving message holds budget: {:?}",
        gw.gateway.resources()
    );
    // Another client's 2 MiB message does not fit beside it: 1013, nothing sent upstream.
    let c = unique("budget-ws");
    let mut other = gw.connect(&c).await;
    let _ = other
        .send_text(&wsgate::client::create_body(Some(&c), &"x".repeat(2 << 20), None).to_string())
        .await;
    let code = loop {
        match other.recv().await {
            Ok(_) => continue,
            Err(e) => break e.close_code(),
        }
    };
    assert_eq!(code, Some(1013));
    // Small messages still pass.
    let d = unique("budget-ws-small");
    let mut small = gw.connect(&d).await;
    assert!(
        small
            .turn(&wsgate::client::create_body(Some(&d), "hi", None))
            .await
            .unwrap()
            .is_completed()
    );
    small.close().await;
    // The stalled client leaves: its bytes go back.
    drop(slow);
    gw.assert_quiescent("budgeted messages").await;
    assert_eq!(gw.gateway.resources().buffered_bytes, 0);
    gw.stop().await;
}

/// A socket that hands out queued bytes and records how much room each read offered.
struct RecordingSocket {
    incoming: std::collections::VecDeque<Vec<u8>>,
    offered: Vec<usize>,
}

impl std::io::Read for RecordingSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.offered.push(buf.len());
        match self.incoming.pop_front() {
            Some(mut chunk) => {
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.incoming.push_front(chunk.split_off(n));
                }
                Ok(n)
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl std::io::Write for RecordingSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A masked client text frame.
fn client_frame(text: &str) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The vendored tungstenite releases an empty read buffer (idle memory) and must allocate it
/// again at a full read's size: a burst after an idle moment is one `recv`, not a 14-byte
/// header read and then the rest (which doubled the reads of every turn).
#[test]
fn a_released_read_buffer_comes_back_at_full_read_size() {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let socket = RecordingSocket {
        incoming: [client_frame("first"), client_frame("second")].into(),
        offered: Vec::new(),
    };
    let mut ws = WebSocket::from_raw_socket(socket, Role::Server, Some(config));
    for want in ["first", "second"] {
        let msg = ws.read().expect("a frame");
        assert_eq!(msg.into_text().unwrap().as_str(), want);
    }
    let offered = &ws.get_ref().offered;
    assert_eq!(offered.len(), 2, "one read per frame: {offered:?}");
    assert!(
        offered.iter().all(|n| *n >= 4096),
        "every read offered a full buffer: {offered:?}"
    );
}

/// An unmasked server frame: `first` is the FIN/RSV/opcode byte.
fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

fn delta(text: &str) -> Vec<u8> {
    format!(r#"{{"type":"response.output_text.delta","delta":"{text}"}}"#).into_bytes()
}

/// A client-role socket holding `frames` in one read.
fn upstream_holding(
    frames: &[Vec<u8>],
) -> tokio_tungstenite::tungstenite::WebSocket<RecordingSocket> {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    let socket = RecordingSocket {
        incoming: [frames.concat()].into(),
        offered: Vec::new(),
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(64 << 10)
        .max_frame_size(Some(1000));
    WebSocket::from_raw_socket(socket, Role::Client, Some(config))
}

/// The raw relay (vendored tungstenite, `take_text_run`) takes only what the per-event path
/// would relay unchanged: complete, final, unmasked text frames without reserved bits, within
/// the size limit, that are plain parts of the response (deltas, items done, ...: nothing the
/// ledger reads) in valid UTF-8. It stops at anything else, which the per-event read then
/// handles (and rejects, where the protocol says so).
#[test]
fn raw_runs_take_only_complete_plain_part_frames() {
    use tokio_tungstenite::tungstenite::Message;
    let accept = &mut wsgate::event::is_relayable_part;
    let mut payloads = Vec::new();
    let first = server_frame(0x81, &delta("first"));
    let item_done = br#"{"type":"response.output_item.done","item":{"type":"message"}}"#;
    let (a, b) = (
        server_frame(0x81, &delta("a")),
        server_frame(0x81, item_done),
    );
    // Stoppers, each after the same two good parts: the types the ledger reads, and frames
    // the per-event read must check.
    let created = server_frame(0x81, br#"{"type":"response.created","response":{}}"#);
    let completed = server_frame(0x81, br#"{"type":"response.completed","response":{}}"#);
    let error = server_frame(0x81, br#"{"type":"error","status":500}"#);
    let steer = server_frame(0x81, br#"{"type":"response.steer.accepted"}"#);
    let escaped = server_frame(0x81, br#"{"type":"response.complete\u0064","response":{}}"#);
    let binary = server_frame(0x82, &delta("bin"));
    let mut masked = vec![0x81, 0x80 | 4, 0, 0, 0, 0];
    masked.extend_from_slice(b"abcd");
    let fragment = server_frame(0x01, &delta("part"));
    let rsv = server_frame(0xC1, &delta("rsv"));
    let mut bad_utf8 = delta("x");
    bad_utf8[40] = 0xff;
    let bad_utf8 = server_frame(0x81, &bad_utf8);
    let too_big = server_frame(0x81, &delta(&"y".repeat(1200)));
    let partial = server_frame(0x81, &delta("cut"))[..10].to_vec();
    let type_later = server_frame(
        0x81,
        br#"{"delta":"z","type":"response.output_text.delta"}"#,
    );
    for (name, stopper) in [
        ("created", created),
        ("completed", completed),
        ("error", error),
        ("steer answer", steer),
        ("escaped type", escaped),
        ("binary", binary),
        ("masked", masked),
        ("fragment", fragment),
        ("rsv", rsv),
        ("bad utf8", bad_utf8),
        ("too big", too_big),
        ("partial", partial),
        ("type not first", type_later),
    ] {
        let mut ws = upstream_holding(&[first.clone(), a.clone(), b.clone(), stopper.clone()]);
        let msg = ws.read().expect("the first frame, the usual way");
        assert!(
            matches!(msg, Message::Text(t) if t.contains("first")),
            "{name}"
        );
        let run = ws
            .take_text_run(64, accept, &mut payloads)
            .unwrap_or_else(|| panic!("{name}: a run"));
        assert_eq!(
            run.as_ref(),
            [a.clone(), b.clone()].concat(),
            "{name}: raw bytes"
        );
        let texts: Vec<&[u8]> = payloads.iter().map(|p| &run[p.clone()]).collect();
        assert_eq!(
            texts,
            [&delta("a")[..], item_done],
            "{name}: payload ranges"
        );
        assert!(
            ws.take_text_run(64, accept, &mut payloads).is_none(),
            "{name}: the run stops before it"
        );
        assert!(payloads.is_empty());
    }
    // The frame count limit holds, and the rest stays for the next run.
    let mut ws = upstream_holding(&[first, a.clone(), b.clone()]);
    ws.read().unwrap();
    assert_eq!(
        ws.take_text_run(1, accept, &mut payloads).unwrap().as_ref(),
        a
    );
    assert_eq!(
        ws.take_text_run(1, accept, &mut payloads).unwrap().as_ref(),
        b
    );
}

/// `fill` (vendored tungstenite) buffers a read without decoding any of it, so a run can start
/// at the read's first frame (`response.created` opening a turn's answer); with nothing to
/// read it reports the would-block as a read does; it hands over to the frame read when a
/// frame header is already decoded, at the stream's end, and on a server-role socket.
#[test]
fn fill_buffers_a_read_without_decoding_it() {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    use tokio_tungstenite::tungstenite::{Error, Message};
    let all = &mut |_: &[u8]| true;
    let mut payloads = Vec::new();
    let created = server_frame(0x81, br#"{"type":"response.created","response":{}}"#);
    let (a, b) = (
        server_frame(0x81, &delta("a")),
        server_frame(0x81, &delta("b")),
    );
    let mut ws = upstream_holding(&[created.clone(), a.clone(), b.clone()]);
    assert!(ws.fill().expect("bytes arrived"));
    assert!(ws.fill().expect("still buffered"), "no second read");
    assert_eq!(ws.get_ref().offered.len(), 1, "one read");
    let run = ws.take_text_run(64, all, &mut payloads).expect("a run");
    assert_eq!(
        run.as_ref(),
        [created, a, b.clone()].concat(),
        "from the read's first frame"
    );
    match ws.fill() {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        other => panic!("nothing to read: {other:?}"),
    }
    // A frame whose header the frame read already decoded: the frame read finishes it.
    let mut ws = upstream_holding(&[b[..4].to_vec()]);
    assert!(
        matches!(ws.read(), Err(Error::Io(_))),
        "the rest is missing"
    );
    assert!(!ws.fill().unwrap(), "half a frame is the frame read's");
    ws.get_mut().incoming.push_back(b[4..].to_vec());
    assert!(matches!(ws.read().unwrap(), Message::Text(t) if t.contains("\"b\"")));
    // The stream's end: the frame read reports it.
    let mut ws = upstream_holding(&[Vec::new()]);
    assert!(!ws.fill().unwrap());
    // A server-role socket (client frames are masked, never relayed raw).
    let socket = RecordingSocket {
        incoming: [client_frame("x")].into(),
        offered: Vec::new(),
    };
    let config = WebSocketConfig::default();
    let mut ws = WebSocket::from_raw_socket(socket, Role::Server, Some(config));
    assert!(!ws.fill().unwrap());
    assert!(ws.get_ref().offered.is_empty(), "nothing read");
}

/// A frame the last read cut in two (in its payload or in its header, a 16-bit length's
/// included) is completed by `fill`, one more read, so the next run starts with it whole:
/// decoded alone instead, each read cost a decode and an encode on the way to the client.
/// Complete frames still buffered are taken without a read.
#[test]
fn fill_completes_a_frame_the_last_read_cut() {
    let all = &mut |_: &[u8]| true;
    let mut payloads = Vec::new();
    let long = format!("{:x<300}", "");
    let (a, b, c) = (
        server_frame(0x81, &delta("a")),
        server_frame(0x81, &delta(&long)),
        server_frame(0x81, &delta("c")),
    );
    assert_eq!(b[1], 126, "b has a 16-bit length");
    for cut in [1, 3, 10, b.len() - 1] {
        let mut ws = upstream_holding(&[]);
        let reads = [
            [a.clone(), b[..cut].to_vec()].concat(),
            b[cut..].to_vec(),
            c.clone(),
        ];
        ws.get_mut().incoming = reads.into();
        assert!(ws.fill().expect("bytes arrived"));
        let run = ws.take_text_run(64, all, &mut payloads).expect("a");
        assert_eq!(
            run.as_ref(),
            a.as_slice(),
            "cut {cut}: the whole frames only"
        );
        assert!(ws.fill().expect("the rest of b arrived"), "cut {cut}");
        let run = ws.take_text_run(64, all, &mut payloads).expect("b");
        assert_eq!(run.as_ref(), b.as_slice(), "cut {cut}: b whole, in one run");
        assert_eq!(ws.get_ref().offered.len(), 2, "cut {cut}: one read each");
        assert!(ws.fill().expect("c arrived"));
        let run = ws.take_text_run(64, all, &mut payloads).expect("c");
        assert_eq!(run.as_ref(), c.as_slice());
    }
    // Still cut after the read (the upstream has sent no more): nothing to take, and the
    // would-block is reported as a read reports it.
    let mut ws = upstream_holding(&[]);
    ws.get_mut().incoming = [b[..50].to_vec()].into();
    assert!(ws.fill().unwrap());
    assert!(ws.take_text_run(64, all, &mut payloads).is_none());
    match ws.fill() {
        Err(tokio_tungstenite::tungstenite::Error::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock)
        }
        other => panic!("nothing more to read: {other:?}"),
    }
    ws.get_mut().incoming.push_back(b[50..].to_vec());
    assert!(ws.fill().unwrap());
    let run = ws.take_text_run(64, all, &mut payloads).expect("b");
    assert_eq!(run.as_ref(), b.as_slice());
}

/// A run's filter sees every frame it could take before it decides how many to keep
/// (`RunFilter::keep`): the frames it does not keep stay buffered, whole and in order, for the
/// next run or the per-event read.
#[test]
fn a_run_keeps_only_what_its_filter_keeps() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::RunFilter;
    struct KeepFirst {
        seen: usize,
        keep: usize,
    }
    impl RunFilter for KeepFirst {
        fn accept(&mut self, _payload: &[u8]) -> bool {
            self.seen += 1;
            true
        }
        fn keep(&mut self, accepted: usize) -> usize {
            assert_eq!(
                accepted, self.seen,
                "keep is asked once the run was scanned"
            );
            self.keep
        }
    }
    let frames: Vec<Vec<u8>> = ["a", "b", "c"]
        .iter()
        .map(|t| server_frame(0x81, &delta(t)))
        .collect();
    let mut payloads = Vec::new();
    // Each socket holds a first frame, read the usual way (the read that buffers the rest).
    let holding = |frames: &[Vec<u8>]| {
        let mut ws = upstream_holding(&[&[server_frame(0x81, &delta("first"))], frames].concat());
        ws.read().expect("the first frame");
        ws
    };
    // Nothing kept: nothing taken, every frame still there for the per-event read.
    let mut ws = holding(&frames);
    let mut none = KeepFirst { seen: 0, keep: 0 };
    assert!(ws.take_text_run(64, &mut none, &mut payloads).is_none());
    assert_eq!(none.seen, 3);
    assert!(payloads.is_empty());
    for t in ["a", "b", "c"] {
        let msg = ws.read().expect("a frame left buffered");
        assert!(
            matches!(msg, Message::Text(ref x) if x.contains(t)),
            "{msg:?}"
        );
    }
    // Two of three kept: the third is the next run's first.
    let mut ws = holding(&frames);
    let mut two = KeepFirst { seen: 0, keep: 2 };
    let run = ws.take_text_run(64, &mut two, &mut payloads).unwrap();
    assert_eq!(run.as_ref(), frames[..2].concat());
    assert_eq!(payloads.len(), 2);
    let mut all = KeepFirst { seen: 0, keep: 9 };
    let run = ws.take_text_run(64, &mut all, &mut payloads).unwrap();
    assert_eq!(
        run.as_ref(),
        frames[2],
        "a keep above the count takes what was accepted"
    );
}

/// Frames relayed raw reach the client byte for byte, and only a server-role socket (whose
/// frames are unmasked, like the upstream's) accepts them.
#[test]
fn raw_frames_are_written_verbatim_by_a_server_socket_only() {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
    let frames = [
        server_frame(0x81, &delta("a")),
        server_frame(0x81, &delta(&"b".repeat(300))),
    ]
    .concat();
    #[derive(Default)]
    struct Sink(Vec<u8>);
    impl std::io::Read for Sink {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut server = WebSocket::from_raw_socket(Sink::default(), Role::Server, None);
    server.write_raw_frames(&frames).unwrap();
    server.flush().unwrap();
    assert_eq!(server.get_ref().0, frames);
    let mut client = WebSocket::from_raw_socket(Sink::default(), Role::Client, None);
    assert!(client.write_raw_frames(&frames).is_err());
    assert!(client.get_ref().0.is_empty());
}
