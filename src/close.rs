//! The close-code policy, in one place (DESIGN §4): what an upstream close or failure means
//! for the pool and what the client is told.

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::pool::EvictReason;

/// What to do when the upstream connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// 1012/1013: evict the session's key and close the client with the same code, so Codex
    /// reconnects and resends full context. The connection is never reused.
    EvictAndForward { code: u16, reason: EvictReason },
    /// Any other end while a turn is in flight: the client gets an `error` event with this
    /// top-level status; the connection is discarded.
    FailTurn { status: u16, code: &'static str },
    /// Any other end between turns: the connection is discarded quietly; the next turn dials.
    Discard,
}

/// Maps an upstream close (`Some(code)`) or a failure / EOF without a close frame (`None`).
pub fn upstream_ended(code: Option<CloseCode>, in_turn: bool) -> Disposition {
    match code {
        Some(CloseCode::Restart) => Disposition::EvictAndForward {
            code: 1012,
            reason: EvictReason::Close1012,
        },
        Some(CloseCode::Again) => Disposition::EvictAndForward {
            code: 1013,
            reason: EvictReason::Close1013,
        },
        _ if in_turn => Disposition::FailTurn {
            status: 502,
            code: "upstream_closed",
        },
        _ => Disposition::Discard,
    }
}

/// Close codes the gateway sends to clients.
pub mod client {
    /// The client broke the WebSocket protocol (reserved bits, unmasked frames, bad opcodes).
    pub const PROTOCOL: u16 = 1002;
    /// Client sent a binary frame.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text frame that is not valid UTF-8 (RFC 6455 §7.4.1).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Too many frames queued behind an in-flight turn.
    pub const POLICY: u16 = 1008;
    /// Frame or message over `relay.max_message_size`.
    pub const TOO_BIG: u16 = 1009;
    /// The gateway is shutting down; reconnect elsewhere.
    pub const RESTART: u16 = 1012;
    /// The gateway cannot take this now (its buffer budget is exhausted); try again later.
    pub const TRY_AGAIN: u16 = 1013;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_table() {
        let cases: &[(Option<CloseCode>, bool, Disposition)] = &[
            (
                Some(CloseCode::Restart),
                true,
                Disposition::EvictAndForward {
                    code: 1012,
                    reason: EvictReason::Close1012,
                },
            ),
            (
                Some(CloseCode::Restart),
                false,
                Disposition::EvictAndForward {
                    code: 1012,
                    reason: EvictReason::Close1012,
                },
            ),
            (
                Some(CloseCode::Again),
                true,
                Disposition::EvictAndForward {
                    code: 1013,
                    reason: EvictReason::Close1013,
                },
            ),
            (
                Some(CloseCode::Again),
                false,
                Disposition::EvictAndForward {
                    code: 1013,
                    reason: EvictReason::Close1013,
                },
            ),
            (
                Some(CloseCode::Error),
                true,
                Disposition::FailTurn {
                    status: 502,
                    code: "upstream_closed",
                },
            ),
            (
                Some(CloseCode::Normal),
                true,
                Disposition::FailTurn {
                    status: 502,
                    code: "upstream_closed",
                },
            ),
            (
                None,
                true,
                Disposition::FailTurn {
                    status: 502,
                    code: "upstream_closed",
                },
            ),
            (Some(CloseCode::Error), false, Disposition::Discard),
            (Some(CloseCode::Normal), false, Disposition::Discard),
            (None, false, Disposition::Discard),
        ];
        for (code, in_turn, want) in cases {
            assert_eq!(
                &upstream_ended(*code, *in_turn),
                want,
                "{code:?} in_turn={in_turn}"
            );
        }
    }
}
