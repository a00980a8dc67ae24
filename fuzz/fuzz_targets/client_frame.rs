//! Fuzzes the client-frame handling path: event parsing and sniffing, terminal inspection,
//! turn attribution, lane/affinity resolution and header forwarding. Run:
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run client_frame -- -max_total_time=30` (see .ci/run).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::event::{self, ClientEvent, Terminal};
use wsgate::headers::{ForwardHeaders, HeaderIds};
use wsgate::turn::{Ledger, Sent};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ev) = ClientEvent::parse(text) {
            let _ = (ev.is_create(), ev.is_continuation(), Sent::from_type(ev.kind()));
        }
        // Any text as a turn's usual terminal too: read from its two ends, or walked whole.
        let _ = Terminal::inspect("response.completed", text);
        if let Some(ty) = event::sniff_type(text) {
            if event::is_terminal(&ty) {
                let _ = Terminal::inspect(&ty, text);
            }
            // The same frame as an upstream event, in each state a ledger can be in.
            let mut ledger = Ledger::default();
            for sent in [Sent::Create, Sent::Steer, Sent::Processed] {
                let _ = ledger.attribute(&ty, text);
                ledger.sent(sent);
            }
            let _ = ledger.attribute(&ty, text);
        }
        let _ = wsgate::ids::ConversationId::parse(text);
    }
    // The same bytes as header values, split at the first NUL into name/value pairs.
    let mut headers = http::HeaderMap::new();
    for chunk in data.split(|b| *b == 0).take(8) {
        let (name, value) = chunk.split_at(chunk.len().min(12));
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
        for fixed in ["session-id", "thread-id", "x-codex-turn-metadata"] {
            if let Ok(v) = http::HeaderValue::from_bytes(chunk) {
                headers.append(http::HeaderName::from_static(fixed), v);
            }
        }
    }
    if let Ok(ids) = HeaderIds::from_headers(&headers) {
        let _ = ids.route(wsgate::ids::ClientId::anonymous(), None);
    }
    let _ = ForwardHeaders::from_client(&headers);
    upstream_bytes(data);
});

/// The same bytes as what an upstream sent: raw runs and per-frame reads alternate over
/// them (as the relay does) and never panic; every run holds only what was buffered.
fn upstream_bytes(data: &[u8]) {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    struct Bytes<'a>(&'a [u8]);
    impl std::io::Read for Bytes<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.0.len()).min(97);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    impl std::io::Write for Bytes<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let _ = event::is_relayable_part(data);
    let config = WebSocketConfig::default()
        .read_buffer_size(512)
        .max_frame_size(Some(4096))
        .max_message_size(Some(8192));
    let mut ws = WebSocket::from_raw_socket(Bytes(data), Role::Client, Some(config));
    let mut payloads = Vec::new();
    for _ in 0..64 {
        if let Some(run) = ws.take_text_run(8, &mut event::is_relayable_part, &mut payloads) {
            assert!(run.len() <= data.len());
            assert!(payloads.iter().all(|p| p.end <= run.len()));
        }
        if ws.read().is_err() {
            break;
        }
    }
}
