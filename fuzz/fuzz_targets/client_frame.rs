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
});
