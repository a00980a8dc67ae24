//! Micro-benchmarks of the per-frame hot path: event-type sniffing (vs a full JSON parse),
//! terminal inspection and the created event's id (structural scan vs the serde parse it
//! replaced, small and Codex-sized events), UTF-8 checks, client-frame parsing, the pump -> session handoff, and relaying one
//! frame through tungstenite (decode as the upstream's client, encode as the client's server),
//! and relaying a burst of deltas per event or as a raw run.
//! Run: `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::io::{Read, Write};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use wsgate::event::{self, ClientEvent, Terminal};
use wsgate::pump::PumpEvent;

const DELTA: &str = r#"{"type":"response.output_text.delta","sequence_number":8,"item_id":"msg_01","output_index":1,"content_index":0,"delta":"There are two files: ","logprobs":[]}"#;
/// A delta whose text is not all ASCII (the ASCII check cannot settle it).
const DELTA_NON_ASCII: &str = r#"{"type":"response.output_text.delta","sequence_number":8,"item_id":"msg_01","output_index":1,"content_index":0,"delta":"Deux fichiers — café ","logprobs":[]}"#;
/// The same delta with `type` not first (serde_json's alphabetical order; some proxies and
/// SDKs reorder keys).
const DELTA_TYPE_LAST: &str = r#"{"content_index":0,"delta":"There are two files: ","item_id":"msg_01","logprobs":[],"output_index":1,"sequence_number":8,"type":"response.output_text.delta"}"#;
/// The mock's `response.completed` of a workload (b) turn (five deltas echoed in the output).
const MOCK_COMPLETED: &str = r#"{"type":"response.completed","sequence_number":12,"response":{"id":"resp_1_1","object":"response","status":"completed","model":"gpt-5.5","output":[{"content":[{"annotations":[],"text":"resp_1_1 delta 0. resp_1_1 delta 1. resp_1_1 delta 2. resp_1_1 delta 3. resp_1_1 delta 4. ","type":"output_text"}],"id":"msg_1_1","role":"assistant","status":"completed","type":"message"}],"usage":{"input_tokens":27,"input_tokens_details":{"cached_tokens":0},"output_tokens":22,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":49}}}"#;
const COMPLETED: &str = r#"{"type":"response.completed","sequence_number":13,"response":{"id":"resp_B2","object":"response","status":"completed","output":[],"usage":{"input_tokens":6230,"input_tokens_details":{"cached_tokens":6016},"output_tokens":41,"output_tokens_details":{"reasoning_tokens":12},"total_tokens":6271}}}"#;

fn create_body() -> String {
    let mut body = wsgate::client::create_body(
        Some("5d0c2f7e-1b7a-4c1e-9a51-3f2b8e0d4c11"),
        &"x".repeat(20_000),
        Some("resp_A1"),
    );
    body["tools"] = serde_json::json!([{"type": "function", "name": "exec_command", "parameters": {"type": "object"}}]);
    body.to_string()
}

/// An in-memory byte pipe for tungstenite.
#[derive(Default)]
struct Pipe {
    buf: Vec<u8>,
    at: usize,
}

impl Pipe {
    /// Everything written and not yet read.
    fn take(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.at);
        self.buf.clear();
        self.at = 0;
        rest
    }
}

impl Read for Pipe {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = out.len().min(self.buf.len() - self.at);
        if n == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sniffing(c: &mut Criterion) {
    let mut g = c.benchmark_group("sniff");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sniff_type (fast path)", |b| {
        b.iter(|| event::sniff_type(black_box(DELTA)))
    });
    g.bench_function("sniff_type (type not first)", |b| {
        b.iter(|| event::sniff_type(black_box(DELTA_TYPE_LAST)))
    });
    g.bench_function("full serde_json::Value parse", |b| {
        b.iter(|| {
            serde_json::from_str::<serde_json::Value>(black_box(DELTA))
                .map(|v| v["type"].is_string())
        })
    });
    g.bench_function("is_terminal on a delta", |b| {
        b.iter(|| event::sniff_type(black_box(DELTA)).is_some_and(|t| event::is_terminal(&t)))
    });
    g.bench_function("Terminal::inspect (completed)", |b| {
        b.iter(|| Terminal::inspect("response.completed", black_box(COMPLETED)))
    });
    g.finish();
    upstream_fields(c);
    let body = create_body();
    let mut g = c.benchmark_group("client frame");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("ClientEvent::parse (20 KB create)", |b| {
        b.iter(|| ClientEvent::parse(black_box(&body)).map(|e| e.is_create()))
    });
    g.finish();
}

/// A `response.completed` and a `response.created` as the real upstream writes them for a
/// Codex turn: the whole request echoed (~14 KB of instructions full of `\n` and quotes, the
/// tools), then the output and the usage.
fn codex_sized_events() -> (String, String) {
    let instructions = "You are Codex, a coding agent.\n\n## Rules\n- Use \"apply_patch\" to edit files; never `cat >`.\n- Keep answers short.\n".repeat(120);
    let tools = serde_json::json!([
        {"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
         "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}},
         "workdir": {"type": "string"}, "timeout_ms": {"type": "number"}}, "required": ["command"]}},
        {"type": "function", "name": "apply_patch", "description": "Applies a patch.",
         "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}
    ]);
    let mut response = serde_json::json!({
        "id": "resp_abc", "object": "response", "created_at": 1764633600, "status": "completed",
        "model": "gpt-5.5", "instructions": instructions, "tools": tools,
        "output": [{"type": "reasoning", "id": "rs_1", "summary": []},
                   {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "Done: the tests pass.", "annotations": []}]}],
        "usage": {"input_tokens": 15342, "input_tokens_details": {"cached_tokens": 15104},
                  "output_tokens": 212, "output_tokens_details": {"reasoning_tokens": 128}, "total_tokens": 15554}
    });
    let completed =
        format!(r#"{{"type":"response.completed","sequence_number":40,"response":{response}}}"#);
    response["status"] = "in_progress".into();
    response["output"] = serde_json::json!([]);
    response["usage"] = serde_json::Value::Null;
    let created =
        format!(r#"{{"type":"response.created","sequence_number":0,"response":{response}}}"#);
    (completed, created)
}

/// The fields read from upstream events: the structural scan against the serde parse of the
/// whole event it replaced (`event::reference`), on the small event above and Codex-sized
/// ones; and the UTF-8 check of a relayed delta, SIMD against std.
fn upstream_fields(c: &mut Criterion) {
    let (completed, created) = codex_sized_events();
    let mut g = c.benchmark_group("upstream event fields");
    g.throughput(Throughput::Elements(1));
    for (name, text) in [
        ("small completed", COMPLETED),
        ("mock's (b) completed", MOCK_COMPLETED),
        ("Codex-sized completed", &completed),
    ] {
        g.bench_function(format!("{name}: scan (Terminal::inspect)"), |b| {
            b.iter(|| Terminal::inspect("response.completed", black_box(text)))
        });
        g.bench_function(
            format!("{name}: one walk of the whole event (stops 26-41)"),
            |b| b.iter(|| event::reference::inspect_walked("response.completed", black_box(text))),
        );
        g.bench_function(format!("{name}: serde parse (before)"), |b| {
            b.iter(|| event::reference::inspect("response.completed", black_box(text)))
        });
    }
    g.bench_function("Codex-sized created: scan (response_id)", |b| {
        b.iter(|| event::response_id(black_box(&created)))
    });
    g.bench_function("Codex-sized created: serde parse (before)", |b| {
        b.iter(|| event::reference::response_id(black_box(&created)))
    });
    g.bench_function("delta UTF-8: simdutf8", |b| {
        b.iter(|| simdutf8::basic::from_utf8(black_box(DELTA.as_bytes())).is_ok())
    });
    g.bench_function(
        "delta UTF-8: event::is_utf8 (ASCII words, then simdutf8)",
        |b| b.iter(|| event::is_utf8(black_box(DELTA.as_bytes()))),
    );
    g.bench_function("non-ASCII delta UTF-8: simdutf8", |b| {
        b.iter(|| simdutf8::basic::from_utf8(black_box(DELTA_NON_ASCII.as_bytes())).is_ok())
    });
    g.bench_function("non-ASCII delta UTF-8: event::is_utf8", |b| {
        b.iter(|| event::is_utf8(black_box(DELTA_NON_ASCII.as_bytes())))
    });
    g.bench_function("delta UTF-8: std (before)", |b| {
        b.iter(|| std::str::from_utf8(black_box(DELTA.as_bytes())).is_ok())
    });
    g.finish();
}

fn relay(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay one frame");
    g.throughput(Throughput::Elements(1));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PumpEvent>(64);
    let text = Utf8Bytes::from_static(DELTA);
    // The per-frame task hop removed in issue 14 (the session now reads the upstream socket
    // itself); kept to show what each relayed frame used to pay on top of the socket work.
    g.bench_function("pump -> session channel handoff (removed)", |b| {
        b.iter(|| {
            tx.try_send(PumpEvent::Frame(Message::Text(text.clone())))
                .ok();
            black_box(rx.try_recv().ok())
        })
    });
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    // Upstream side: frames the upstream (a server) wrote, read by our client-role socket.
    let mut upstream_server =
        WebSocket::from_raw_socket(Pipe::default(), Role::Server, Some(config));
    let mut upstream_client =
        WebSocket::from_raw_socket(Pipe::default(), Role::Client, Some(config));
    // Client side: our server-role socket writes to the client.
    let mut to_client = WebSocket::from_raw_socket(Pipe::default(), Role::Server, Some(config));
    g.bench_function("decode from upstream + sniff + encode to client", |b| {
        b.iter(|| {
            upstream_server.send(Message::Text(text.clone())).ok();
            let bytes = upstream_server.get_mut().take();
            upstream_client.get_mut().write_all(&bytes).ok();
            let msg = upstream_client.read().expect("a frame");
            if let Message::Text(t) = &msg {
                black_box(event::sniff_type(t).is_some_and(|t| event::is_terminal(&t)));
            }
            to_client.send(msg).ok();
            black_box(to_client.get_mut().take().len())
        })
    });
    g.finish();

    // A burst as one socket read brings it in workload (a): 22 deltas. Per event (decode,
    // sniff, encode each) against the raw run (the first frame decoded, the other 21 taken
    // as bytes, checked and copied once), as the session relays them since issue 14.
    const BURST: usize = 22;
    let mut g = c.benchmark_group("relay a burst of 22 deltas");
    g.throughput(Throughput::Elements(BURST as u64));
    let burst = {
        let mut server = WebSocket::from_raw_socket(Pipe::default(), Role::Server, Some(config));
        for _ in 0..BURST {
            server.write(Message::Text(text.clone())).ok();
        }
        server.flush().ok();
        server.get_mut().take()
    };
    g.bench_function("per event: decode + sniff + encode each", |b| {
        b.iter(|| {
            upstream_client.get_mut().write_all(&burst).ok();
            for _ in 0..BURST {
                let msg = upstream_client.read().expect("a frame");
                if let Message::Text(t) = &msg {
                    black_box(event::sniff_type(t).is_some_and(|t| event::is_terminal(&t)));
                }
                to_client.write(msg).ok();
            }
            to_client.flush().ok();
            black_box(to_client.get_mut().take().len())
        })
    });
    let mut payloads = Vec::new();
    g.bench_function("raw run: first decoded, the rest copied as bytes", |b| {
        b.iter(|| {
            upstream_client.get_mut().write_all(&burst).ok();
            let msg = upstream_client.read().expect("a frame");
            if let Message::Text(t) = &msg {
                black_box(event::sniff_type(t).is_some_and(|t| event::is_terminal(&t)));
            }
            to_client.write(msg).ok();
            let run = upstream_client
                .take_text_run(BURST, &mut event::is_relayable_part, &mut payloads)
                .expect("a run");
            assert_eq!(payloads.len(), BURST - 1);
            to_client.write_raw_frames(&run).ok();
            to_client.flush().ok();
            black_box(to_client.get_mut().take().len())
        })
    });
    g.finish();
}

criterion_group!(benches, sniffing, relay);
criterion_main!(benches);
