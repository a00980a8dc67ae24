//! The HTTP ingress (issue 12): `POST` on the paths rides the same pool as WebSocket sessions.
//! Byte-exact SSE, JSON bodies, lanes and reuse, owner routing, failover, failures before and
//! after the first byte, client disconnects, request encodings, and the HTTP relays.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use wsgate::client::create_body;
use wsgate::mock::{Limit, MockConfig, MockUpstream};

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await.unwrap()
}

const SSE: &str = "/v1/responses";

/// What the mock saw of the connection that carried `thread`.
fn conn_of(mock: &MockUpstream, thread: &str) -> std::sync::Arc<wsgate::mock::ConnRecord> {
    mock.connections()
        .into_iter()
        .find(|c| c.header("thread-id") == Some(thread))
        .unwrap_or_else(|| panic!("no upstream connection for {thread}"))
}

/// A streamed `POST` of a Codex-like client on `thread`, the mock's script `directive`.
async fn post_sse(addr: std::net::SocketAddr, thread: &str, directive: &str) -> HttpReply {
    http_request(
        addr,
        "POST",
        SSE,
        &codex(thread),
        http_body(directive, true, json!({})),
    )
    .await
}

/// Codex-like headers for `thread`.
fn codex(thread: &str) -> Vec<(&str, &str)> {
    vec![
        ("content-type", "application/json"),
        ("originator", "codex_exec"),
        ("session-id", thread),
        ("thread-id", thread),
        ("x-client-request-id", thread),
    ]
}

fn sse_of(frames: &[String]) -> String {
    frames
        .iter()
        .map(|f| {
            let ty: Value = serde_json::from_str(f).unwrap();
            format!("event: {}\ndata: {f}\n\n", ty["type"].as_str().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn a_streamed_post_relays_every_upstream_frame_byte_for_byte() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    for (directive, terminal) in [
        ("[[mock: deltas=5, custom]]", "response.completed"),
        ("[[mock: deltas=3, incomplete]]", "response.incomplete"),
    ] {
        let thread = unique("sse");
        let r = post_sse(gw.addr, &thread, directive).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.headers["content-type"], "text/event-stream");
        assert_eq!(
            r.headers["x-models-etag"], "mock-etag",
            "the upstream 101's headers"
        );
        let conn = conn_of(&mock, &thread);
        let frames = conn.sent_frames();
        assert!(frames.iter().any(|f| f.contains(terminal)));
        if directive.contains("custom") {
            assert!(frames.iter().any(|f| f.contains("\"x.custom\"")));
        }
        assert_eq!(r.text(), sse_of(&frames), "byte for byte, in order");
        assert!(!r.text().contains("[DONE]"));
        // The body ends right after the terminal event.
        let last = r
            .chunks
            .iter()
            .rev()
            .find(|(_, c)| String::from_utf8_lossy(c).contains(terminal))
            .unwrap()
            .0;
        assert!(
            r.ended.duration_since(last) < Duration::from_millis(100),
            "{:?}",
            r.ended.duration_since(last)
        );
    }
    gw.assert_quiescent("sse").await;
    // Both connections went back to the pool (incomplete is a clean end too).
    assert_eq!(gw.gateway.pool_stats().idle, 2);
    gw.stop().await;
}

/// The events of a stream cut mid-turn end with one synthetic `response.failed` that names
/// the turn's `response.created` response id; returns it.
fn ends_failed_naming_its_response(events: &[Value]) -> &Value {
    let created = events
        .iter()
        .find(|e| e["type"] == "response.created")
        .unwrap();
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.failed", "{events:?}");
    assert_eq!(last["response"]["id"], created["response"]["id"]);
    last
}

/// Runs each of `directives` as one POST (`stream` as given) of one thread, through a gateway
/// process of its own in front of the mock at speed (the upstream's answers arrive many frames
/// per read); `check` gets each directive, its reply and the upstream frames of its turn.
/// Then asserts that every frame went in the engine's raw runs (counted by
/// `wsgate_relay_raw_frames_total`), and returns the mock and the gateway.
async fn in_runs(
    stream: bool,
    directives: &[&str],
    check: impl Fn(&str, &HttpReply, &[String]),
) -> (MockUpstream, GatewayProcess) {
    let mock = speed_mock().await;
    let gw = GatewayProcess::start(&test_yaml(&mock.url(), &["acct-a"], ""));
    let thread = unique("runs");
    let mut relayed = 0;
    for directive in directives {
        let before = mock
            .connections()
            .first()
            .map_or(0, |c| c.sent_frames().len());
        let body = http_body(directive, stream, json!({}));
        let r = http_request(gw.addr, "POST", SSE, &codex(&thread), body).await;
        assert_eq!(r.status, 200, "{directive}: {}", r.text());
        let conns = mock.connections();
        assert_eq!(
            conns.len(),
            1,
            "{directive}: one pooled upstream connection"
        );
        let frames = conns[0].sent_frames();
        check(directive, &r, &frames[before..]);
        relayed += frames.len() - before;
    }
    let (_, metrics) = http_get(gw.addr, "/metrics", None).await;
    let raw = prom_value(&metrics, "wsgate_relay_raw_frames_total", &[]);
    assert_eq!(
        raw,
        Some(relayed as f64),
        "frames relayed in runs of {relayed}"
    );
    (mock, gw)
}

/// The SSE stream takes the runs of frames a read left buffered without decoding them one by
/// one and still relays every frame byte for byte, in order, one event each, and ends each
/// turn.
#[tokio::test]
async fn a_streamed_post_takes_runs_of_frames_and_stays_byte_for_byte() {
    let directives = [
        "[[mock: deltas=5]]",
        "[[mock: deltas=40, custom]]",
        "[[mock: deltas=3, incomplete]]",
    ];
    let (_mock, gw) = in_runs(true, &directives, |directive, r, frames| {
        assert_eq!(
            r.text(),
            sse_of(frames),
            "{directive}: byte for byte, in order"
        );
    })
    .await;
    // A stream cut after its `response.created` went out in a run: the one synthetic
    // `response.failed` names the created's response id.
    let cut = post_sse(
        gw.addr,
        &unique("sse-runs-cut"),
        "[[mock: deltas=4, close=1011@mid]]",
    )
    .await;
    ends_failed_naming_its_response(&cut.events());
}

/// The JSON body a non-streaming POST should get from the upstream `frames` of its turn: the
/// terminal's `response`, its `output` filled from the `output_item.done` items when empty.
fn json_of(frames: &[String]) -> Value {
    let frames: Vec<Value> = frames
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let mut response = frames.last().unwrap()["response"].clone();
    if response["output"].as_array().is_none_or(Vec::is_empty) {
        response["output"] = frames
            .iter()
            .filter(|f| f["type"] == "response.output_item.done")
            .map(|f| f["item"].clone())
            .collect();
    }
    response
}

/// A non-streaming POST takes the runs of frames a read left buffered as the SSE stream does,
/// keeping only the items and the terminal, and builds the body the frames call for: the
/// terminal's response, its `output` filled from the items when the upstream's is empty.
#[tokio::test]
async fn a_non_streaming_post_takes_runs_of_frames_and_builds_the_same_body() {
    let directives = [
        "[[mock: deltas=40, empty_output]]",
        "[[mock: deltas=40, custom]]",
        "[[mock: deltas=30, incomplete, empty_output]]",
        "[[mock: deltas=30, tool]]",
    ];
    in_runs(false, &directives, |directive, r, frames| {
        let expected = json_of(frames);
        assert!(
            !expected["output"].as_array().unwrap().is_empty(),
            "{directive}: the turn has output"
        );
        assert_eq!(r.json(), expected, "{directive}");
    })
    .await;
}

#[tokio::test]
async fn posts_of_one_lane_ride_one_upstream_connection_and_share_it_with_websocket_sessions() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let thread = unique("lane");
    let mut cached = Vec::new();
    for i in 0..3 {
        let r = http_request(
            gw.addr,
            "POST",
            SSE,
            &codex(&thread),
            // Full context each time, growing as a conversation does.
            http_body(&"context ".repeat(40 * (i + 1)), true, json!({})),
        )
        .await;
        assert_eq!(r.status, 200);
        let done = r
            .events()
            .into_iter()
            .find(|e| e["type"] == "response.completed")
            .unwrap();
        cached.push(
            done["response"]["usage"]["input_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(mock.accepted(), 1);
    assert!(
        cached[0] == 0 && cached[1] > 0 && cached[2] > cached[1],
        "{cached:?}"
    );
    let lines = log_lines(&["pool decision", &format!("conversation={thread} ")]);
    assert!(
        lines.iter().all(|l| l.contains("ingress=http")),
        "{lines:?}"
    );
    // A WebSocket session of the same lane reuses it too.
    let mut c = gw.connect(&thread).await;
    let t = c
        .turn(&create_body(Some(&thread), "over ws", None))
        .await
        .unwrap();
    assert!(t.is_completed());
    c.close().await;
    assert_eq!(mock.accepted(), 1);
    assert_eq!(
        decisions(&thread),
        ["new miss", "reuse -", "reuse -", "reuse -"]
    );
    gw.stop().await;
}

#[tokio::test]
async fn continuations_go_only_to_their_owner() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let thread = unique("owner");
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&thread),
        http_body("one", false, json!({})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let parent = r.json()["id"].as_str().unwrap().to_string();
    // Owned by the idle pooled connection: served there, with the delta only.
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&thread),
        http_body("two", false, json!({"previous_response_id": parent})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "completed", "the owner knew the parent");
    assert_eq!(mock.accepted(), 1);
    assert_eq!(mock.connection(1).unwrap().user_texts(), ["one", "two"]);
    // Unknown: 400 previous_response_not_found, nothing dialed.
    let other = unique("owner-unknown");
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&other),
        http_body("x", true, json!({"previous_response_id": "resp_nobody"})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "previous_response_not_found");
    assert_eq!(mock.accepted(), 1, "nothing dialed");
    gw.assert_quiescent("owner").await;
    gw.stop().await;
}

#[tokio::test]
async fn failures_before_and_after_the_first_byte() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a", "acct-b"], |_| {}).await;
    // A 429 before output with a second account: a 200 stream from the other one.
    let thread = unique("http-failover");
    let limited = gw.account_of(&thread);
    mock.limit(&account_key(&limited), Limit::default());
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&thread),
        http_body("hi", true, json!({})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = r.events();
    assert!(events.iter().all(|e| e["type"] != "error"), "{events:?}");
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    // Every account limited: HTTP 429 with resets_at.
    let other = if limited == "acct-a" {
        "acct-b"
    } else {
        "acct-a"
    };
    mock.limit(&account_key(other), Limit::default());
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&unique("all")),
        http_body("hi", true, json!({})),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    let e = r.json();
    assert_eq!(e["error"]["type"], "usage_limit_reached");
    assert!(e["error"]["resets_at"].as_u64().is_some(), "{e}");
    assert!(r.headers.contains_key("retry-after"));
    mock.unlimit(&account_key("acct-a"));
    mock.unlimit(&account_key("acct-b"));
    gw.gateway.enable_account("acct-a");
    gw.gateway.enable_account("acct-b");
    // Upstream 1011 after two deltas: one response.failed stream_disconnected, then the end.
    let thread = unique("http-1011");
    let r = post_sse(gw.addr, &thread, "[[mock: deltas=4, close=1011@mid]]").await;
    assert_eq!(r.status, 200);
    let events = r.events();
    let last = ends_failed_naming_its_response(&events);
    assert_eq!(last["response"]["error"]["code"], "stream_disconnected");
    assert!(events.iter().all(|e| e["type"] != "response.completed"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .count(),
        2
    );
    gw.assert_quiescent("1011").await;
    assert_eq!(evictions(&thread), ["dead"], "discarded, never pooled");
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_releases_its_upstream_at_once() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let thread = unique("http-gone");
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method("POST")
        .uri(SSE)
        .header("host", "t")
        .header("authorization", format!("Bearer {CLIENT_KEY}"));
    for (k, v) in codex(&thread) {
        req = req.header(k, v);
    }
    let body = http_body("[[mock: deltas=200, interval=20]]", true, json!({}));
    let resp = sender
        .send_request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    use http_body_util::BodyExt;
    let mut body = resp.into_body();
    // Read until the first delta, then hang up.
    let mut seen = String::new();
    while !seen.contains("response.output_text.delta") {
        let frame = body.frame().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(frame.data_ref().unwrap()));
    }
    drop(body);
    drop(sender);
    conn.abort();
    let left = tokio::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || mock.open() == 0).await,
        "the upstream closed within 1 s"
    );
    assert!(left.elapsed() < Duration::from_secs(1));
    gw.assert_quiescent("client gone").await;
    assert_eq!(evictions(&thread), ["discarded"]);
    assert_eq!(
        gw.gateway.account_state("acct-a"),
        Some("usable"),
        "not penalized"
    );
    gw.stop().await;
}

#[tokio::test]
async fn request_encodings_and_bounds() {
    use std::io::{Read, Write};
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.http.max_body_size = bytesize::ByteSize::mib(1);
    })
    .await;
    let json_body = http_body("compressed hello", false, json!({}));
    let zstd_body = zstd::encode_all(&json_body[..], 3).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&json_body).unwrap();
    let gzip_body = gz.finish().unwrap();
    for (encoding, body) in [("zstd", zstd_body), ("gzip", gzip_body)] {
        let thread = unique(encoding);
        let mut h = codex(&thread);
        h.push(("content-encoding", encoding));
        let r = http_request(gw.addr, "POST", SSE, &h, body).await;
        assert_eq!(r.status, 200, "{encoding}: {}", r.text());
        let conn = conn_of(&mock, &thread);
        assert_eq!(conn.user_texts(), ["compressed hello"], "{encoding}");
        assert!(conn.header("content-encoding").is_none());
    }
    // A zstd bomb: 512 MiB of zeros in a few KiB. Refused at the 1 MiB bound.
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let bomb = zstd::encode_all(std::io::repeat(0).take(512 << 20), 19).unwrap();
    assert!(bomb.len() < 64 * 1024);
    let before = rss();
    let mut h = codex("bomb");
    h.push(("content-encoding", "zstd"));
    let r = http_request(gw.addr, "POST", SSE, &h, bomb).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "payload_too_large");
    let grown_kib = rss().saturating_sub(before);
    assert!(grown_kib < 64 * 1024, "RSS grew {grown_kib} KiB");
    // Unknown coding: 415. Bad JSON or a missing field: 400.
    let mut h = codex("br");
    h.push(("content-encoding", "br"));
    assert_eq!(
        http_request(gw.addr, "POST", SSE, &h, b"x".to_vec())
            .await
            .status,
        415
    );
    for bad in [&b"{nope"[..], br#"{"model":"m"}"#, br#"{"input":"x"}"#] {
        let r = http_request(gw.addr, "POST", SSE, &codex("bad"), bad.to_vec()).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(mock.accepted(), 2, "nothing dialed for refused bodies");
    gw.assert_quiescent("encodings").await;
    gw.stop().await;
}

#[tokio::test]
async fn a_non_streaming_post_gets_one_json_body_with_the_output_items() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let thread = unique("json");
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&thread),
        http_body("[[mock: deltas=3, empty_output]]", false, json!({})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/json");
    let body = r.json();
    assert_eq!(body["status"], "completed");
    let frames = mock.connection(1).unwrap().sent_frames();
    let done: Vec<Value> = frames
        .iter()
        .map(|f| serde_json::from_str::<Value>(f).unwrap())
        .filter(|f| f["type"] == "response.output_item.done")
        .map(|f| f["item"].clone())
        .collect();
    let completed: Value = serde_json::from_str(frames.last().unwrap()).unwrap();
    assert_eq!(
        completed["response"]["output"],
        json!([]),
        "the upstream sent none"
    );
    assert!(!done.is_empty());
    assert_eq!(
        body["output"],
        Value::Array(done),
        "filled from output_item.done"
    );
    // An upstream error as the turn's only event: its status, OpenAI-shaped.
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&unique("json-err")),
        http_body("[[mock: error=400:invalid_prompt]]", false, json!({})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_prompt");
    gw.stop().await;
}

#[tokio::test]
async fn models_and_compact_are_relayed_with_the_accounts_credential() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let r = http_request(
        gw.addr,
        "GET",
        "/v1/models?client_version=0.171.0",
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"][0]["id"], "mock-model");
    assert_eq!(r.headers["x-models-etag"], "mock-etag");
    let r = http_request(
        gw.addr,
        "POST",
        "/backend-api/codex/responses/compact",
        &[
            ("content-type", "application/json"),
            ("originator", "codex_exec"),
        ],
        serde_json::to_vec(
            &json!({"model": "gpt-5.5", "input": [{"role": "user", "content": "long"}]}),
        )
        .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "response.compaction");
    let seen = mock.http_requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/v1/models?client_version=0.171.0");
    assert_eq!(seen[1].target, "/v1/responses/compact");
    for s in &seen {
        assert_eq!(
            s.authorization.as_deref(),
            Some(&*account_key("acct-a")),
            "the account's key, never the client's"
        );
    }
    // Client auth applies.
    let r = http_request(
        gw.addr,
        "GET",
        "/v1/models",
        &[("authorization", "Bearer wrong")],
        vec![],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(mock.http_requests().len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn keepalives_while_the_upstream_is_silent() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.http.sse_keepalive = Duration::from_millis(200);
    })
    .await;
    // Codex gets keepalive events; an SDK client gets comments.
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&unique("ka")),
        http_body("[[mock: delay=700]]", true, json!({})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .contains("event: codex.keepalive\ndata: {\"type\":\"codex.keepalive\"}\n\n"),
        "{}",
        r.text()
    );
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &[
            ("content-type", "application/json"),
            ("x-stainless-lang", "python"),
        ],
        http_body(
            "[[mock: delay=700]]",
            true,
            json!({"prompt_cache_key": unique("ka-sdk")}),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains(": keepalive\n\n"));
    assert!(!r.text().contains("codex.keepalive"));
    assert_eq!(r.events().last().unwrap()["type"], "response.completed");
    gw.stop().await;
}

#[tokio::test]
async fn a_large_relayed_answer_arrives_whole() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    // 4 MiB in, 4 MiB back: more than arrives with the response head.
    let big = "y".repeat(4 << 20);
    let r = http_request(
        gw.addr,
        "POST",
        "/v1/responses/compact",
        &[("content-type", "application/json")],
        serde_json::to_vec(
            &json!({"model": "gpt-5.5", "input": [{"role": "user", "content": big}]}),
        )
        .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", &r.text()[..r.text().len().min(300)]);
    let body = r.json();
    assert_eq!(
        body["input_echo"][0]["content"].as_str().map(str::len),
        Some(4 << 20)
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_body_still_arriving_holds_its_bytes_in_the_gateway_wide_budget() {
    use tokio::io::AsyncWriteExt;
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.max_buffered_bytes = bytesize::ByteSize::mib(6);
        c.http.max_body_size = bytesize::ByteSize::mib(8);
    })
    .await;
    // A client declares 8 MiB, sends 4 MiB of it and stalls: what arrived holds budget.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST {SSE} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {CLIENT_KEY}\r\n\
         content-type: application/json\r\nsession-id: slow\r\ncontent-length: {}\r\n\r\n",
        8 << 20
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&vec![b' '; 4 << 20]).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .gateway
            .resources()
            .buffered_bytes
            >= 4 << 20)
        .await,
        "the arriving body holds budget: {:?}",
        gw.gateway.resources()
    );
    // It holds what arrived, not what it declared (8 MiB would not fit in the 6 MiB budget):
    // no answer yet, it is still being read.
    let mut answer = [0u8; 64];
    assert!(
        tokio::time::timeout(
            Duration::from_millis(200),
            tokio::io::AsyncReadExt::read(&mut slow, &mut answer)
        )
        .await
        .is_err(),
        "the declared length was not taken up front"
    );
    // Another 3 MiB body does not fit beside it: 503, OpenAI-shaped, nothing dialed.
    let thread = unique("budget-second");
    let mut big = http_body("x", true, json!({}));
    big.resize(3 << 20, b' ');
    let r = http_request(gw.addr, "POST", SSE, &codex(&thread), big).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "buffer_budget_exhausted");
    // A small one still does.
    let thread = unique("budget-small");
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex(&thread),
        http_body("small", true, json!({})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The stalled client leaves: its bytes go back.
    drop(slow);
    gw.assert_quiescent("budgeted bodies").await;
    assert_eq!(gw.gateway.resources().buffered_bytes, 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_collected_json_response_is_bounded_by_its_size_and_by_the_gateway_wide_budget() {
    let mock = mock().await;
    // 4 deltas of 16,000 bytes: the item and the terminal each carry the 64 KB text.
    let big = || http_body("[[mock: deltas=4, size=16000]]", false, json!({}));
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.limits.max_buffered_bytes = bytesize::ByteSize::kib(100);
    })
    .await;
    let r = http_request(gw.addr, "POST", SSE, &codex(&unique("json-budget")), big()).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "buffer_budget_exhausted");
    // A small answer still fits.
    let small = http_body("[[mock: deltas=3]]", false, json!({}));
    let r = http_request(gw.addr, "POST", SSE, &codex(&unique("json-small")), small).await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.assert_quiescent("json budget").await;
    assert_eq!(gw.gateway.resources().buffered_bytes, 0);
    gw.stop().await;
    // Within the budget but past http.max_response_size: 502, with what to do instead.
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.http.max_response_size = bytesize::ByteSize::kib(96);
    })
    .await;
    let r = http_request(gw.addr, "POST", SSE, &codex(&unique("json-size")), big()).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "response_too_large");
    gw.assert_quiescent("json size").await;
    gw.stop().await;
}

/// The load generator's HTTP modes (the benchmark's workload (e) and `--http-json`) read
/// every event of a streamed answer, however its events fall into the body's chunks (long
/// deltas, many per chunk), and one body per non-streaming turn: the same events as over
/// WebSocket, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_reads_every_event_over_http() {
    let mock = speed_mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let run = |http, http_json, label: &str| {
        wsgate::loadgen::run(wsgate::loadgen::LoadgenConfig {
            key: Some(CLIENT_KEY.into()),
            sessions: 2,
            turns: 3,
            deltas: 2000,
            delta_size: 300,
            think_jitter: 0.0,
            connect_concurrency: 2,
            run_id: unique(label),
            http,
            http_json,
            ..wsgate::loadgen::LoadgenConfig::new(gw.url(), label)
        })
    };
    let ws = run(false, false, "lg-ws").await;
    let sse = run(true, false, "lg-sse").await;
    let json = run(true, true, "lg-json").await;
    for r in [&ws, &sse, &json] {
        assert_eq!(r.errors, 0, "{}: {:?}", r.label, r.first_error);
        assert_eq!(r.turns_ok, 6, "{}", r.label);
    }
    assert!(ws.events > 6 * 2000, "{}", ws.events);
    assert_eq!(sse.events, ws.events, "every event of every streamed turn");
    assert_eq!(sse.event_latency_us.count, ws.event_latency_us.count);
    assert_eq!(json.events, 6, "one body per non-streaming turn");
    gw.stop().await;
}

/// Peak resident set size of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The members of a create body the gateway reads are checked without building what they
/// hold: a `model`, `stream`, `background`, `previous_response_id` or `prompt_cache_key` that
/// is an 8 MiB array of numbers costs its bytes, not a parsed tree of them (~16x: 32 bytes a
/// number), which no budget counts. Measured as the gateway process's peak RSS.
#[tokio::test]
async fn a_large_member_of_a_create_body_is_not_built_into_a_tree() {
    let mock = mock().await;
    let yaml = test_yaml(&mock.url(), &["acct-a"], "http:\n  max_body_size: 16MiB\n");
    let gw = GatewayProcess::start(&yaml);
    // Warm: one small refused body, so what the first request allocates is in the baseline.
    let r = http_request(
        gw.addr,
        "POST",
        SSE,
        &codex("warm"),
        br#"{"model":"m"}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 400);
    let before = peak_rss_kib(gw.child.id());
    assert!(before > 0, "VmHWM is readable");
    let numbers = vec!["0"; 4 << 20].join(",");
    for member in [
        "model",
        "stream",
        "background",
        "previous_response_id",
        "prompt_cache_key",
        "input",
    ] {
        // `input: null` written last refuses every body once all of it has been read.
        let body = format!(r#"{{"model":"m","{member}":[{numbers}],"input":null}}"#);
        assert!(body.len() > 8 << 20);
        let r = http_request(gw.addr, "POST", SSE, &codex(member), body.into_bytes()).await;
        assert_eq!(r.status, 400, "{member}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let grown = peak_rss_kib(gw.child.id()).saturating_sub(before);
    // The body's bytes (8 MiB, collected once, in hyper's buffers meanwhile) and no tree.
    assert!(
        grown < 48 * 1024,
        "peak RSS grew {grown} KiB reading 8 MiB bodies"
    );
    assert_eq!(mock.accepted(), 0, "nothing dialed for refused bodies");
    // A body with a `type` of its own goes upstream retyped, member by member, not rebuilt
    // from a tree (here 8 MiB of tools: the body, its frame and the frame's write).
    let thread = unique("typed");
    let body = format!(
        r#"{{"type":"x","model":"m","tools":[{numbers}],"input":"[[mock: deltas=2]]","stream":true}}"#
    );
    let r = http_request(gw.addr, "POST", SSE, &codex(&thread), body.into_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("response.completed"), "{}", r.text());
    let grown = peak_rss_kib(gw.child.id()).saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "peak RSS grew {grown} KiB relaying an 8 MiB typed body"
    );
    let conn = conn_of(&mock, &thread);
    assert_eq!(conn.received_types(), ["response.create"]);
    assert_eq!(conn.user_texts(), ["[[mock: deltas=2]]"]);
}

/// An event stream read as an EventSource client reads it (the WHATWG rules: a line ends at
/// CR, LF or CRLF, a blank line ends an event, `data:` lines are joined with LF): each
/// event's name (`message` without an `event:` line) and data.
fn sse_client_events(text: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let (mut name, mut data): (Option<String>, Option<String>) = (None, None);
    for line in text.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push((name.take().unwrap_or_else(|| "message".into()), d));
            }
            name = None;
        } else if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.strip_prefix(' ').unwrap_or(v).to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            data = Some(match data.take() {
                Some(d) => format!("{d}\n{v}"),
                None => v.to_string(),
            });
        }
    }
    events
}

/// An upstream event whose type holds raw line breaks (not JSON, but UTF-8, so the relay
/// passes it on) must not become events of its own in the client's stream: it is one event,
/// and the turn's only `response.completed` is the upstream's.
#[tokio::test]
async fn line_breaks_in_an_upstream_type_cannot_forge_events() {
    let mock = mock().await;
    let gw = start_gateway(&mock, &["acct-a"], |_| {}).await;
    let thread = unique("linebreak");
    let r = post_sse(gw.addr, &thread, "[[mock: deltas=4, inject=linebreak]]").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = sse_client_events(&r.text());
    let conn = conn_of(&mock, &thread);
    let sent = conn.sent_frames();
    assert_eq!(
        events.len(),
        sent.len() + 1,
        "one event per frame: {events:?}"
    );
    let completed: Vec<_> = events
        .iter()
        .filter(|(name, data)| {
            name == "response.completed" || data.contains("response.completed\"")
        })
        .collect();
    assert_eq!(completed.len(), 1, "{events:?}");
    assert_eq!(
        completed[0].1,
        *sent.last().unwrap(),
        "the upstream's own terminal"
    );
    // The odd event reaches the client as one event, its lines as the upstream wrote them
    // (each run of line breaks one LF: a `data:` line is never empty, or it could end it).
    let odd = events.iter().find(|(_, d)| d.contains("x.line")).unwrap();
    assert_eq!(
        odd.0, "message",
        "no `event:` line from a type that cannot be one"
    );
    assert_eq!(
        odd.1,
        "{\"type\":\"x.line\nevent: response.completed\ndata: {}\ndata: 1\",\"n\":1}"
    );
    gw.stop().await;
}
