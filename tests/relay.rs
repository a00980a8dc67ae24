//! Relay tests (issue 2): back-pressure with a slow client, strict turn serialization, bad
//! client input, header forwarding.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use wsgate::client::{Client, ClientError, create_body};
use wsgate::mock::{MockConfig, MockUpstream};

#[tokio::test]
async fn slow_client_back_pressures_the_upstream_with_bounded_gateway_memory() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = test_yaml(&mock.url(), &["acct-a"], "relay:\n  buffer_frames: 4\n");
    let gw = GatewayProcess::start(&yaml);
    let conv = unique("slow");
    let mut c = gw.connect(&conv).await;
    assert!(
        c.turn(&create_body(Some(&conv), "warm up", None))
            .await
            .unwrap()
            .is_completed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = gw.rss_kib();

    // 800 deltas of 64 KiB = 50 MiB, read slowly.
    const DELTAS: usize = 800;
    const SIZE: usize = 64 * 1024;
    let total = (DELTAS * SIZE) as u64;
    let sent_before = mock.bytes_sent();
    c.send_json(&create_body(
        Some(&conv),
        &format!("[[mock: deltas={DELTAS}, size={SIZE}]]"),
        None,
    ))
    .await
    .unwrap();
    let mut events = vec![c.recv().await.unwrap(), c.recv().await.unwrap()];
    // While the stalled stream is held, another session streams a whole turn unhindered.
    let other = unique("beside-slow");
    let mut by = gw.connect(&other).await;
    let t = by
        .turn(&create_body(
            Some(&other),
            "[[mock: deltas=20, interval=10]]",
            None,
        ))
        .await
        .unwrap();
    assert!(t.is_completed(), "bystander: {:?}", t.terminal());
    assert_eq!(t.delta_count(), 20);
    by.close().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stalled_at = mock.bytes_sent() - sent_before;
    let mut peak = gw.rss_kib();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let still_at = mock.bytes_sent() - sent_before;
    peak = peak.max(gw.rss_kib());
    assert!(
        stalled_at < total / 2,
        "upstream was not back-pressured: {stalled_at} of {total} bytes sent"
    );
    assert!(
        still_at - stalled_at < 1 << 20,
        "upstream kept streaming while the client stalled"
    );
    let growth_kib = peak.saturating_sub(baseline);
    assert!(
        growth_kib < 16 * 1024,
        "gateway grew by {growth_kib} KiB while holding a stalled 50 MiB stream"
    );

    // Now drain: every frame arrives, in order.
    c.set_timeout(Duration::from_secs(60));
    loop {
        let ev = c.recv().await.unwrap();
        let done = ev["type"] == "response.completed";
        events.push(ev);
        if done {
            break;
        }
    }
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "sequence numbers in order"
    );
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas.len(), DELTAS);
    for (i, d) in deltas.iter().enumerate() {
        assert!(d.contains(&format!(":{i:08}|")), "delta {i} out of order");
        assert_eq!(d.len(), SIZE);
    }
    eprintln!(
        "slow client: baseline {baseline} KiB, peak {peak} KiB, upstream stalled at {stalled_at} bytes"
    );
    c.close().await;
    gw.settle().await;
}

#[tokio::test]
async fn a_second_create_during_a_turn_is_held_not_interleaved() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("held");
    let mut c = gw.connect(&conv).await;
    c.send_json(&create_body(
        Some(&conv),
        "[[mock: deltas=20, interval=10]]",
        None,
    ))
    .await
    .unwrap();
    c.send_json(&create_body(Some(&conv), "second", None))
        .await
        .unwrap();
    let first = c.read_turn().await.unwrap();
    let second = c.read_turn().await.unwrap();
    assert!(first.is_completed() && second.is_completed());
    let id_of = |e: &Value| e["response"]["id"].as_str().map(str::to_string);
    assert_eq!(first.response_id(), Some("resp_1_1"));
    assert_eq!(second.response_id(), Some("resp_1_2"));
    assert!(
        first
            .events
            .iter()
            .filter_map(id_of)
            .all(|id| id == "resp_1_1")
    );
    assert_eq!(
        mock.overlaps(),
        0,
        "the upstream never saw two creates in flight"
    );
    assert_eq!(
        mock.connection(1)
            .unwrap()
            .creates
            .load(std::sync::atomic::Ordering::Acquire),
        2
    );
    c.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_other_sessions_are_unaffected() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.relay.max_message_size = bytesize::ByteSize::kib(64)
    })
    .await;
    // A bystander session streams the whole time.
    let bystander = unique("bystander");
    let mut by = gw.connect(&bystander).await;
    by.send_json(&create_body(
        Some(&bystander),
        "[[mock: deltas=40, interval=10]]",
        None,
    ))
    .await
    .unwrap();

    // Wrong or missing key: HTTP 401 before the upgrade.
    for auth in ["Bearer wrong-key", "Basic dGVzdA==", ""] {
        let conv = unique("auth");
        let mut h = vec![("session-id", conv.as_str())];
        if !auth.is_empty() {
            h.push(("authorization", auth));
        }
        match Client::connect(&gw.url(), &h).await {
            Err(ClientError::Refused { status, body }) => {
                assert_eq!(status, 401);
                assert!(body.contains("invalid_api_key"), "{body}");
            }
            other => panic!("expected 401, got {:?}", other.map(|_| ())),
        }
    }

    // Malformed JSON and a missing type: an error event with status 400; the session lives on.
    let conv = unique("bad");
    let mut c = gw.connect(&conv).await;
    c.send_text("{\"type\": \"response.create\", oops")
        .await
        .unwrap();
    let ev = c.recv().await.unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["status"].as_u64()),
        (Some("error"), Some(400)),
        "{ev}"
    );
    assert_eq!(ev["error"]["code"], "invalid_json");
    c.send_text("{\"input\": []}").await.unwrap();
    assert_eq!(c.recv().await.unwrap()["error"]["code"], "missing_type");
    assert!(
        c.turn(&create_body(Some(&conv), "valid now", None))
            .await
            .unwrap()
            .is_completed()
    );

    // A binary frame: close 1003 with a reason.
    c.send_message(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    let err = c.recv().await.unwrap_err();
    assert_eq!(err.close_code(), Some(1003), "{err}");

    // An oversize message: close 1009.
    let conv2 = unique("big");
    let mut big = gw.connect(&conv2).await;
    big.send_text(&create_body(Some(&conv2), &"x".repeat(100 * 1024), None).to_string())
        .await
        .unwrap();
    let err = big.recv().await.unwrap_err();
    assert_eq!(err.close_code(), Some(1009), "{err}");

    let t = by.read_turn().await.unwrap();
    assert!(t.is_completed());
    assert_eq!(t.delta_count(), 40);
    by.close().await;
    gw.assert_quiescent("bad client input").await;
    gw.stop().await;
}

#[tokio::test]
async fn headers_are_forwarded_replaced_and_copied_back() {
    let mock = MockUpstream::start(MockConfig {
        response_headers: vec![
            ("x-codex-turn-state".into(), "ts-1".into()),
            ("openai-model".into(), "mock-model".into()),
            ("x-models-etag".into(), "etag-1".into()),
            ("set-cookie".into(), "upstream=1".into()),
        ],
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let conv = unique("hdr");
    let mut h = gw.codex_headers(&conv);
    h.extend([
        ("x-codex-turn-metadata", "{\"turn_id\":\"t1\"}"),
        (
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits",
        ),
        ("cookie", "secret=1"),
        ("chatgpt-account-id", "client-supplied"),
    ]);
    let c = Client::connect(&gw.url(), &h).await.unwrap();
    let r = &c.response_headers;
    assert_eq!(r.get("openai-model").unwrap(), "mock-model");
    assert_eq!(r.get("x-models-etag").unwrap(), "etag-1");
    assert_eq!(r.get("x-codex-turn-state").unwrap(), "ts-1");
    assert!(r.get("set-cookie").is_none());
    assert!(
        r.get("sec-websocket-extensions").is_none(),
        "permessage-deflate is declined"
    );
    c.close().await;

    let up = mock.connection(1).unwrap();
    assert_eq!(
        up.header("authorization"),
        Some(account_key("acct-a").as_str()),
        "client key replaced"
    );
    for (k, v) in [
        ("openai-beta", "responses_websockets=2026-02-06"),
        ("originator", "codex_exec"),
        ("session-id", conv.as_str()),
        ("thread-id", conv.as_str()),
        ("x-client-request-id", conv.as_str()),
        ("x-codex-turn-metadata", "{\"turn_id\":\"t1\"}"),
    ] {
        assert_eq!(up.header(k), Some(v), "{k}");
    }
    for k in ["cookie", "chatgpt-account-id", "sec-websocket-extensions"] {
        assert!(up.header(k).is_none(), "{k} must not be forwarded");
    }

    // A reused connection replays the 101 headers, but not a stale turn-state token.
    assert!(wait_until(Duration::from_secs(5), || gw.gateway.pool_stats().idle == 1).await);
    let c2 = gw.connect(&conv).await;
    assert_eq!(
        c2.response_headers.get("openai-model").unwrap(),
        "mock-model"
    );
    assert!(c2.response_headers.get("x-codex-turn-state").is_none());
    c2.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn chatgpt_accounts_send_their_account_id() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    init();
    let yaml = format!(
        "listen: 127.0.0.1:0\nclients: []\nupstream:\n  url: {}\naccounts:\n  - id: team\n    access_token_env: TOKEN\n    chatgpt_account_id: ws-123\n",
        mock.url()
    );
    let config = wsgate::Config::from_yaml(&yaml).unwrap();
    let secrets = config
        .resolve_secrets(&|_| Some("at-secret".into()))
        .unwrap();
    let gw = start_with(config, secrets).await;
    let conv = unique("cgpt");
    let c = Client::connect(&gw.url(), &[("session-id", conv.as_str())])
        .await
        .unwrap();
    c.close().await;
    let up = mock.connection(1).unwrap();
    assert_eq!(up.header("authorization"), Some("Bearer at-secret"));
    assert_eq!(up.header("chatgpt-account-id"), Some("ws-123"));
    assert!(
        log_lines(&["at-secret"]).is_empty(),
        "credentials never logged"
    );
    gw.stop().await;
}

#[tokio::test]
async fn healthz_and_non_websocket_requests() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let get = |path: &'static str, auth: bool| {
        let addr = gw.addr;
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let auth = if auth {
                "Authorization: Bearer test-client-key\r\n"
            } else {
                ""
            };
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    assert!(get("/healthz", false).await.starts_with("HTTP/1.1 200"));
    assert!(
        get("/v1/responses", false)
            .await
            .starts_with("HTTP/1.1 401")
    );
    assert!(get("/v1/responses", true).await.starts_with("HTTP/1.1 426"));
    assert!(get("/nope", false).await.starts_with("HTTP/1.1 404"));
    assert_eq!(mock.accepted(), 0);
    gw.stop().await;
}

/// The worker-thread knob README "Performance" offers (`TOKIO_WORKER_THREADS`, read by tokio
/// at start) takes effect, and one worker serves concurrent sessions and their turns.
#[tokio::test]
async fn one_runtime_worker_serves_concurrent_sessions() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let yaml = test_yaml(&mock.url(), &["acct-a"], "");
    let gw = GatewayProcess::start_with_env(
        &yaml,
        &[("RUST_LOG", "info"), ("TOKIO_WORKER_THREADS", "1")],
    );
    let workers = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "tokio-rt-worker")
            })
            .count()
    };
    let turns = (0..8).map(|i| {
        let conv = unique(&format!("one-worker-{i}"));
        let gw = &gw;
        async move {
            let mut c = gw.connect(&conv).await;
            assert_eq!(run_chain(&mut c, &conv, 3).await.len(), 3);
        }
    });
    futures::future::join_all(turns).await;
    assert_eq!(
        workers(gw.child.id()),
        1,
        "TOKIO_WORKER_THREADS=1 gives one worker"
    );
}

/// A gateway process with 64 KiB reads in front of `mock`, warmed up (allocator arenas, the
/// first pooled connection), its freed pages returned to the kernel at once (jemalloc keeps
/// them for reuse for 10 s by default, so the resident size is what sessions hold, not what
/// turns freed); its warm-up client and its resident size after the warm-up.
async fn rss_gateway(mock: &MockUpstream) -> (GatewayProcess, Client, u64) {
    let yaml = test_yaml(
        &mock.url(),
        &["acct-a"],
        "relay:\n  read_buffer_size: 64KiB\nlimits:\n  max_connections_per_client: 0\npool:\n  max_total: 1000\n  max_per_account: 1000\n",
    );
    let gw = GatewayProcess::start_with_env(
        &yaml,
        &[
            ("RUST_LOG", "info"),
            ("_RJEM_MALLOC_CONF", "dirty_decay_ms:0"),
        ],
    );
    let warm = unique("idle-warm");
    let mut w = gw.connect(&warm).await;
    assert!(
        w.turn(&create_body(Some(&warm), "warm up", None))
            .await
            .unwrap()
            .is_completed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = gw.rss_kib();
    (gw, w, baseline)
}

/// Opens 300 sessions on `gw`, 50 at a time, each made ready by `ready` (given the client and
/// its conversation), and returns the resident KiB each holds once all are open, with the
/// clients (to keep them open until the caller closes them).
async fn held_pairs_kib<F, Fut>(gw: &GatewayProcess, baseline: u64, ready: F) -> (u64, Vec<Client>)
where
    F: Fn(Client, String) -> Fut,
    Fut: std::future::Future<Output = Client>,
{
    const PAIRS: usize = 300;
    let mut held = Vec::with_capacity(PAIRS);
    for batch in 0..PAIRS / 50 {
        let opened = (0..50).map(|i| {
            let conv = unique(&format!("idle-{batch}-{i}"));
            let ready = &ready;
            async move { ready(gw.connect(&conv).await, conv).await }
        });
        held.extend(futures::future::join_all(opened).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = gw.status().await;
    assert_eq!(status["sessions_active"], PAIRS + 1, "{status}");
    let per_pair_kib = gw.rss_kib().saturating_sub(baseline) / PAIRS as u64;
    (per_pair_kib, held)
}

/// Closes the sessions [`held_pairs_kib`] opened and the warm-up client.
async fn close_all(held: Vec<Client>, w: Client) {
    for c in held {
        c.close().await;
    }
    w.close().await;
}

/// Idle sessions hold no read or write buffers: with a 64 KiB read size, 300 sessions that each
/// ran a turn and then idle (client socket and pooled upstream socket both waiting for bytes)
/// would hold 2 x 64 KiB each if a waiting read allocated its buffer (37 MiB); they hold the
/// session's own state only.
#[tokio::test]
async fn idle_sessions_hold_no_socket_buffers() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (gw, w, baseline) = rss_gateway(&mock).await;
    let (per_pair_kib, held) = held_pairs_kib(&gw, baseline, |mut c, conv| async move {
        let t = c
            .turn(&create_body(Some(&conv), "[[mock: deltas=20]]", None))
            .await
            .unwrap();
        assert!(t.is_completed(), "{:?}", t.terminal());
        c
    })
    .await;
    assert!(
        per_pair_kib < 40,
        "{per_pair_kib} KiB per idle session pair (64 KiB reads): a waiting read holds a buffer"
    );
    close_all(held, w).await;
}

/// A session whose client has not sent its first frame yet holds no read buffer either: the
/// client socket's buffer and its upstream socket's (which has had only the handshake) start
/// released, as an idle one's. With a 64 KiB read size, such a session held 78 KiB when a
/// waiting first read zero-filled a buffer (either socket alone kept it there), 10 without.
#[tokio::test]
async fn sessions_waiting_for_a_first_frame_hold_no_read_buffer() {
    init();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (gw, w, baseline) = rss_gateway(&mock).await;
    let (per_pair_kib, held) = held_pairs_kib(&gw, baseline, |c, _| async move { c }).await;
    assert!(
        per_pair_kib < 40,
        "{per_pair_kib} KiB per session waiting for its first frame (64 KiB reads): the read holds a buffer"
    );
    close_all(held, w).await;
}

/// A gateway process in front of a mock that writes its events in batches (many frames per
/// read, so the relay takes raw runs), and a client of a fresh conversation named `name-...`.
async fn batching_gateway(name: &str) -> (MockUpstream, GatewayProcess, String, Client) {
    init();
    let mock = speed_mock().await;
    let gw = GatewayProcess::start(&test_yaml(&mock.url(), &["acct-a"], ""));
    let conv = unique(name);
    let c = gw.connect(&conv).await;
    (mock, gw, conv, c)
}

/// Sends a turn (`text` is the mock's script) and returns every frame the client got, up to
/// and including `response.completed`.
async fn completed_turn(c: &mut Client, conv: &str, text: &str) -> Vec<String> {
    c.send_json(&create_body(Some(conv), text, None))
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let text = c.recv_text().await.unwrap();
        let done = text.contains("\"type\":\"response.completed\"");
        got.push(text.to_string());
        if done {
            return got;
        }
    }
}

/// Deltas that arrive many per read are relayed as raw frame runs (with the items and parts
/// around them): what the client receives is exactly what the upstream sent, frame for frame and
/// byte for byte, in order, with the events the gateway reads (created, completed) handled one
/// by one.
#[tokio::test]
async fn batched_deltas_reach_the_client_byte_for_byte() {
    let (mock, _gw, conv, mut c) = batching_gateway("raw-run").await;
    for turn in 0..2 {
        let before = mock
            .connections()
            .first()
            .map_or(0, |c| c.sent_frames().len());
        let got = completed_turn(&mut c, &conv, "[[mock: deltas=2000, size=40]]").await;
        let conns = mock.connections();
        assert_eq!(conns.len(), 1, "one pooled upstream connection");
        let sent = conns[0].sent_frames();
        assert_eq!(got.len(), 2008, "turn {turn}: every event");
        assert!(
            got == sent[before..],
            "turn {turn}: the client got exactly the frames the upstream sent"
        );
    }
    c.close().await;
}

/// A short answer arrives in one read, so its terminal comes in the same batch as the run of
/// deltas before it, and its `response.created` opens that read: the whole answer goes out
/// as the upstream's bytes (counted by `wsgate_relay_raw_frames_total`) before the gateway
/// reads any of it, and the turn still ends, is attributed to the conversation (a client
/// that reconnects and continues from it is served on the same pooled connection, where the
/// upstream state lives: the created's response id was recorded) and reaches the client byte
/// for byte, whichever terminal it is.
#[tokio::test]
async fn a_terminal_batched_with_its_deltas_ends_and_records_the_turn() {
    let (mock, gw, conv, mut c) = batching_gateway("batched-terminal").await;
    let mut prev: Option<String> = None;
    let mut relayed = 0;
    for (turn, (text, terminal)) in [
        ("[[mock: deltas=3, incomplete]]", "response.incomplete"),
        ("[[mock: deltas=5]]", "response.completed"),
        ("[[mock: deltas=5]]", "response.completed"),
    ]
    .into_iter()
    .enumerate()
    {
        let before = mock
            .connections()
            .first()
            .map_or(0, |c| c.sent_frames().len());
        c.send_json(&create_body(Some(&conv), text, prev.as_deref()))
            .await
            .unwrap();
        let mut got = Vec::new();
        let last = loop {
            let text = c.recv_text().await.unwrap();
            got.push(text.to_string());
            let ty = wsgate::event::sniff_type(&text).unwrap_or_default();
            if wsgate::event::is_terminal(&ty) {
                break text;
            }
        };
        assert_eq!(
            wsgate::event::sniff_type(&last).as_deref(),
            Some(terminal),
            "turn {turn}: {last}"
        );
        let conns = mock.connections();
        assert_eq!(
            conns.len(),
            1,
            "turn {turn}: one pooled upstream connection"
        );
        assert!(
            got == conns[0].sent_frames()[before..],
            "turn {turn}: the client got exactly the frames the upstream sent"
        );
        relayed += got.len();
        let id = wsgate::event::response_id(&last);
        assert!(id.is_some(), "turn {turn}: the terminal has an id");
        // Only a completed response can be continued.
        prev = id.filter(|_| terminal == "response.completed");
        // Codex reconnects between turns: the continuation must find its connection.
        c.abort();
        c = gw.connect(&conv).await;
    }
    // The last turn continued the one before on the pooled connection (the gateway answers
    // previous_response_not_found for a response it did not record as completed there).
    assert_eq!(mock.connections().len(), 1);
    c.close().await;
    // Every turn ended: the connection went back to the pool, nothing left running.
    let status = gw.settle().await;
    assert_eq!(status["pool"]["idle"], 1, "{status}");
    assert_eq!(status["decisions"]["reuse"], 3, "{status}");
    // Each answer (one write of the mock's, under one read's size) went out raw, whole.
    let (_, metrics) = http_get(gw.addr, "/metrics", None).await;
    let raw = prom_value(&metrics, "wsgate_relay_raw_frames_total", &[]);
    assert_eq!(raw, Some(relayed as f64), "frames relayed raw of {relayed}");
}

/// Frames of ~360 bytes (3,000 deltas) cut by nearly every socket read: the frame a read cut in
/// two is completed by the next read and opens the next raw run (counted by
/// `wsgate_relay_raw_frames_total`), instead of being decoded and re-encoded alone once per
/// read. Only the events the gateway reads itself (the terminal, which echoes the whole
/// response) take the per-event path, and the client still gets the upstream's bytes.
#[tokio::test]
async fn frames_cut_by_reads_still_go_out_raw() {
    let (mock, gw, conv, mut c) = batching_gateway("raw-cut").await;
    let got = completed_turn(&mut c, &conv, "[[mock: deltas=3000, size=300]]").await;
    let conns = mock.connections();
    assert!(
        got == conns[0].sent_frames(),
        "the upstream's frames, in order"
    );
    let (_, metrics) = http_get(gw.addr, "/metrics", None).await;
    let down = [("direction", "upstream_to_client")];
    let total = prom_value(&metrics, "wsgate_frames_total", &down).expect("frames counted");
    let raw = prom_value(&metrics, "wsgate_relay_raw_frames_total", &[]).unwrap_or(0.0);
    assert_eq!(total, got.len() as f64);
    // ~1.1 MB in reads of 8 KiB: before, one frame per read (~130) went the per-event way.
    assert!(
        total - raw <= 3.0,
        "{raw} of {total} frames raw: frames cut by a read were decoded alone"
    );
    c.close().await;
}

/// A client that stops reading while deltas arrive many per read: the runs taken while its
/// socket is full go out frame by frame under back-pressure, and once it reads again every
/// delta arrives, once, in order.
#[tokio::test]
async fn batched_deltas_to_a_stalled_client_arrive_whole_and_in_order() {
    let (_mock, _gw, conv, mut c) = batching_gateway("raw-stalled").await;
    const DELTAS: usize = 30_000;
    c.send_json(&create_body(
        Some(&conv),
        &format!("[[mock: deltas={DELTAS}, size=300]]"),
        None,
    ))
    .await
    .unwrap();
    // Stalled: the gateway's writes to this client block long before 9 MB are relayed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.set_timeout(Duration::from_secs(60));
    let (mut deltas, mut last_seq) = (0usize, None::<u64>);
    loop {
        let ev = c.recv().await.unwrap();
        let seq = ev["sequence_number"].as_u64().unwrap();
        assert!(
            last_seq.is_none_or(|l| seq == l + 1),
            "{last_seq:?} then {seq}"
        );
        last_seq = Some(seq);
        if ev["type"] == "response.output_text.delta" {
            let text = ev["delta"].as_str().unwrap();
            let n: usize = text.split(':').nth(1).unwrap()[..8].parse().unwrap();
            assert_eq!(n, deltas, "delta {deltas} arrives in its place");
            deltas += 1;
        }
        if ev["type"] == "response.completed" {
            break;
        }
    }
    assert_eq!(deltas, DELTAS);
    c.close().await;
}
