//! Rate-limit failover (DESIGN §4): while a turn has shown the client nothing, the events
//! that carry no output are held; a turn that then ends in an account-wide rate or usage limit
//! moves to another account (a full request is replayed, a continuation is asked for full
//! context), or, with no account usable, ends with a 429 that says when to retry.

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, info};

use super::{Downstream, Engine, Flow};
use crate::error::AcquireError;
use crate::event;
use crate::pool::{EvictReason, NewReason};
use crate::turn::Sent;

/// Events that carry no output, held back (at most this many, this many bytes) until the
/// turn's first output event or its end, so a turn that ends in a rate limit has shown the
/// client nothing and can move to another account.
const HOLD_FRAMES: usize = 8;
const HOLD_BYTES: usize = 64 * 1024;

/// Upstream events that show the client nothing of the response.
pub(super) fn carries_no_output(ty: &str) -> bool {
    type_carries_no_output(ty.as_bytes())
}

/// [`carries_no_output`] on a type's bytes (a raw frame's, see [`event::raw_type`]).
pub(super) fn type_carries_no_output(ty: &[u8]) -> bool {
    matches!(
        ty,
        b"response.created"
            | b"response.in_progress"
            | b"response.queued"
            | b"codex.rate_limits"
            | b"response.metadata"
            | b"codex.response.metadata"
            | b"responsesapi.websocket_timing"
    )
}

impl Engine {
    /// Holds a no-output event back while the turn has shown nothing; false when the hold is
    /// full (the event and everything held go out now).
    pub(super) fn hold_quiet(&mut self, text: &Utf8Bytes) -> bool {
        let Some(t) = self.turn.as_mut() else {
            return false;
        };
        if t.quiet.len() >= HOLD_FRAMES || t.quiet_bytes + text.len() > HOLD_BYTES {
            return false;
        }
        t.quiet_bytes += text.len();
        t.quiet.push(text.clone());
        true
    }

    /// The turn's account hit an account-wide rate or usage limit before anything of the turn
    /// reached the client (DESIGN §4): the account cools down, and while another account is
    /// usable the turn moves there (a full request is replayed; a continuation gets
    /// `previous_response_not_found` so the client resends full context). Otherwise the client
    /// gets a 429 that says when to retry.
    pub(super) async fn limited_before_output<D: Downstream>(
        &mut self,
        d: &mut D,
        terminal: event::Terminal,
    ) -> Flow {
        let Some(up) = self.upstream.take() else {
            return Flow::Continue;
        };
        let from = up.account().clone();
        // Evicted first (one `account_changed` line), then the account's other connections.
        self.evict(up, EvictReason::AccountChanged);
        self.gw.cool_down(&from, terminal.retry_after);
        let code = terminal.code.as_deref().unwrap_or("rate_limit_exceeded");
        let Some(turn) = self.turn.as_mut() else {
            return Flow::Continue;
        };
        turn.quiet.clear();
        turn.quiet_bytes = 0;
        turn.failed_over.push(from.clone());
        let request = turn.request.clone();
        let failed_over = turn.failed_over.clone();
        if let Err(no) = self.gw.accounts.assign(None, "") {
            return self.end_turn_limited(d, code, no.retry_after).await;
        }
        let Some(request) = request else {
            self.end_turn_failed("failover_continuation");
            info!(from_account = %from, code, "rate limit before any output on a continuation; the client resends full context");
            let msg = format!(
                "account `{from}` hit a rate limit; the previous response lives on its connection, \
                 so resend the full context without previous_response_id"
            );
            return Box::pin(self.send_error(d, 400, "previous_response_not_found", &msg)).await;
        };
        match Box::pin(self.acquire(Some(NewReason::Failover))).await {
            Ok(p) if !failed_over.contains(p.account()) => {
                info!(from_account = %from, account = %p.account(), upstream.id = p.id(), code,
                    "rate limit before any output; the turn moved to another account");
                self.set_upstream(p);
                self.ledger.sent(Sent::Create);
                self.sync_reusable();
                self.last_upstream = Instant::now();
                if let Err(e) = self.send_upstream(request).await {
                    debug!(error = %e, "failover send failed");
                }
                Flow::Continue
            }
            Ok(_) => self.end_turn_limited(d, code, None).await,
            Err(AcquireError::NoAccount { retry_after }) => {
                self.end_turn_limited(d, code, retry_after).await
            }
            Err(e) => {
                self.end_turn_failed("upstream_failed");
                Box::pin(self.acquire_failed(d, e)).await
            }
        }
    }

    /// Ends the turn in flight with `terminal` as its metric label.
    pub(super) fn end_turn_failed(&mut self, terminal: &str) {
        if let Some(turn) = self.turn.take() {
            self.gw
                .relay
                .turn(terminal, self.ingress, turn.started.elapsed());
        }
    }

    /// No account can take the turn: a 429 shaped so Codex shows when to retry.
    pub(super) async fn end_turn_limited<D: Downstream>(
        &mut self,
        d: &mut D,
        code: &str,
        retry_after: Option<std::time::Duration>,
    ) -> Flow {
        self.end_turn_failed("rate_limited");
        let ev = event::limit_error(code, retry_after);
        crate::metrics::error("all_accounts_limited");
        match d.error(ev).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }
}
