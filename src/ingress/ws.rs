//! The WebSocket ingress: one client WebSocket session, an adapter around the turn
//! [`Engine`].
//!
//! Invariants:
//! - Only client events the gateway understands reach the engine (`response.create`,
//!   `response.steer`, `response.inject`, `response.processed`); anything else gets a local
//!   `error` (400).
//! - At most one turn in flight: a `response.create` arriving during a turn is held, bounded by
//!   `relay.max_queued_frames`, and handed to the engine after the turn's own terminal event.
//!   Side events go at once unless something is held before them. Frames are never reordered.
//! - A session that never sends a frame is closed (1008) after `limits.first_frame_timeout`;
//!   a turn whose upstream stays silent ends after `limits.turn_idle_timeout`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tracing::{debug, info};

use super::wake::WakeFlag;
use crate::close;
use crate::event::{ClientEvent, ClientFrameError};
use crate::gateway::Shared;
use crate::pump::RawRun;
use crate::turn::Sent;
use crate::turn::engine::{ClientGone, Downstream, Engine, EngineStart, Flow};

pub(crate) type ClientWs = WebSocketStream<Counted<crate::ingress::client_io::ClientIo>>;

/// The client socket, counting the bytes it delivers: a session compares the count at each
/// complete message with the count now to see a frame that started and never finished. The
/// bytes read since the last complete message (a message still arriving, buffered by the
/// WebSocket layer) are held in the gateway-wide budget (`limits.max_buffered_bytes`); a read
/// that would pass it fails with [`OverBudget`] and the session closes with 1013.
pub(crate) struct Counted<S> {
    inner: S,
    read: Arc<std::sync::atomic::AtomicU64>,
    /// The count at the last complete message ([`Counted::settle`]).
    settled: u64,
    lease: crate::gateway::BudgetLease,
}

/// A client's message still arriving would pass the gateway's byte budget.
#[derive(Debug, thiserror::Error)]
#[error("the gateway's buffer budget is exhausted (limits.max_buffered_bytes); try again")]
pub(crate) struct OverBudget;

impl<S> Counted<S> {
    pub fn new(
        inner: S,
        budget: &Arc<crate::gateway::Budget>,
    ) -> (Counted<S>, Arc<std::sync::atomic::AtomicU64>) {
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        (
            Counted {
                inner,
                read: read.clone(),
                settled: 0,
                lease: budget.lease(),
            },
            read,
        )
    }

    /// A message completed: the bytes read so far are no longer a message in progress (those
    /// of the next message already read, at most one socket read, count from the next read).
    pub fn settle(&mut self) {
        self.settled = self.read.load(Ordering::Relaxed);
        self.lease.shrink_to(0);
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            let total = self.read.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            let pending = usize::try_from(total - self.settled).unwrap_or(usize::MAX);
            if !self.lease.grow_to(pending) {
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::OutOfMemory,
                    OverBudget,
                )));
            }
        }
        poll
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The client socket as the engine's downstream: frames as they are. Every write must make
/// progress within `relay.client_write_timeout`, else the client counts as gone (a client
/// that stops reading cannot pin its session, upstream connection and pool slot).
struct WsDown<'a>(&'a mut ClientWs, std::time::Duration);

impl WsDown<'_> {
    async fn write<F: Future<Output = Result<(), tungstenite::Error>>>(
        timeout: std::time::Duration,
        write: F,
    ) -> Result<(), ClientGone> {
        // Most writes complete at once (into the socket's write buffer): only a write that has
        // to wait gets a deadline, so the hot path reads no clock and arms no timer.
        let mut write = std::pin::pin!(write);
        let immediate = futures::FutureExt::now_or_never(write.as_mut());
        let result = match immediate {
            Some(r) => Ok(r),
            None => tokio::time::timeout(timeout, write).await,
        };
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                debug!(error = %e, "client write failed");
                Err(ClientGone)
            }
            Err(_) => {
                crate::metrics::error("client_write_timeout");
                info!(
                    timeout = ?timeout,
                    "client stopped reading (relay.client_write_timeout); session ended"
                );
                Err(ClientGone)
            }
        }
    }
}

impl Downstream for WsDown<'_> {
    async fn feed(&mut self, text: Utf8Bytes) -> Result<(), ClientGone> {
        Self::write(self.1, self.0.feed(Message::Text(text))).await
    }

    fn raw_frames(&self) -> bool {
        true
    }

    fn try_feed_run(&mut self, run: &RawRun) -> Result<bool, ClientGone> {
        use futures::Sink;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let queued = match std::pin::Pin::new(&mut *self.0).poll_ready(&mut cx) {
            std::task::Poll::Pending => return Ok(false),
            std::task::Poll::Ready(ready) => {
                ready.and_then(|()| self.0.start_send_raw(&run.frames))
            }
        };
        match queued {
            Ok(()) => Ok(true),
            Err(e) => {
                debug!(error = %e, "client write failed");
                Err(ClientGone)
            }
        }
    }

    async fn flush(&mut self) -> Result<(), ClientGone> {
        Self::write(self.1, self.0.flush()).await
    }

    async fn error(&mut self, event: serde_json::Value) -> Result<(), ClientGone> {
        Self::write(self.1, self.0.send(Message::text(event.to_string()))).await
    }

    async fn closed(&mut self, code: u16, reason: &str) {
        Box::pin(close_client(self.0, code, reason)).await;
    }
}

/// Closes the client with `code` and waits (bounded) for its answer.
async fn close_client(client: &mut ClientWs, code: u16, reason: &str) {
    // Close reasons are limited to 123 bytes by the protocol.
    let mut reason = reason.to_string();
    while reason.len() > 123 {
        reason.pop();
    }
    info!(code, reason = %crate::telemetry::escape(&reason, 123), "closing client");
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let closing = async {
        let _ = client.send(Message::Close(Some(frame))).await;
        // Drain until the client answers the close (bounded below).
        while let Some(Ok(_)) = client.next().await {}
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), closing).await;
}

pub(crate) struct Session {
    gw: Arc<Shared>,
    client: ClientWs,
    engine: Engine,
    /// Client frames held behind the turn in flight (each with its lease of the gateway's
    /// byte budget), and their bytes.
    held: VecDeque<(Utf8Bytes, crate::gateway::BudgetLease)>,
    held_bytes: usize,
    /// `relay.client_write_timeout`.
    write_timeout: std::time::Duration,
    /// The first-frame and turn-idle deadline; armed only when one of them applies.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The gateway's shutdown, watched between turns. One future for the session's life: a
    /// fresh `cancelled()` per loop would join and leave the token's waiter list (one lock
    /// shared by every session) on each pass between turns.
    shutdown: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// True once the client sent a frame.
    got_frame: bool,
    /// Bytes the client socket delivered so far, and at the end of the last message.
    read: Arc<std::sync::atomic::AtomicU64>,
    read_at_message: u64,
    /// Checks for a frame that started and did not finish (`limits.frame_timeout`).
    frame_check: tokio::time::Interval,
    /// A partial frame was seen at the last check.
    partial: bool,
    /// Gate the upstream's and the client's branches of the loop's `select!`: a branch is
    /// polled when its own waker fired, or when the loop raised it after handling something
    /// that may have changed what it would read (see [`super::wake`]).
    upstream_woke: WakeFlag,
    client_woke: WakeFlag,
}

impl Session {
    pub fn new(
        gw: Arc<Shared>,
        client: ClientWs,
        read: Arc<std::sync::atomic::AtomicU64>,
        start: EngineStart,
    ) -> Session {
        let every = gw.config().limits.frame_timeout;
        let mut frame_check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        frame_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Session {
            read,
            read_at_message: 0,
            frame_check,
            partial: false,
            timer: Box::pin(tokio::time::sleep(gw.config().limits.first_frame_timeout)),
            shutdown: Box::pin(gw.shutdown.clone().cancelled_owned()),
            engine: Engine::new(gw.clone(), start),
            client,
            held: VecDeque::new(),
            held_bytes: 0,
            write_timeout: gw.config().relay.client_write_timeout,
            got_frame: false,
            upstream_woke: WakeFlag::new(),
            client_woke: WakeFlag::new(),
            gw,
        }
    }

    /// Runs the session to its end. The caller instruments it with the session span. The
    /// session is boxed: its task then holds a pointer, not a copy of it that the task's
    /// future would keep beside the one `run` uses (issue 14: every idle session pays for
    /// its task's size).
    pub async fn run(mut self: Box<Self>) {
        self.gw.active_sessions.fetch_add(1, Ordering::AcqRel);
        self.gw.relay.client_opened.increment(1);
        debug!("session started");
        loop {
            if !self.engine.in_turn()
                && let Some((text, _lease)) = self.held.pop_front()
            {
                self.held_bytes -= text.len();
                if Box::pin(self.client_text(text)).await == Flow::Stop {
                    break;
                }
                self.raise_both();
                continue;
            }
            let idle = !self.engine.in_turn();
            let timed = !self.got_frame || !idle;
            // Every handler below runs boxed: an idle session's task then holds only the
            // select's small futures, not the state of the deepest path (a turn start that
            // dials, a failover), which would make every idle session pay for it (issue 14).
            // The relay too: one allocation per batch of up to `relay.buffer_frames` frames
            // costs less than the ~0.8 KiB its inline state adds to every idle session.
            let flow = tokio::select! {
                biased;
                _ = &mut self.shutdown, if idle => {
                    Box::pin(close_client(&mut self.client, close::client::RESTART, "gateway shutting down")).await;
                    Flow::Stop
                }
                ev = self.upstream_woke.gate(self.engine.next_upstream(true)) => {
                    // Frames may be left buffered (a batch stops at `relay.buffer_frames`),
                    // and the relay's own reads registered the task's waker, not the flag's.
                    self.upstream_woke.raise();
                    // The turn-idle deadline only moves later while upstream events arrive:
                    // the timer keeps its earlier deadline and re-arms itself when it fires
                    // (`on_timer`), instead of touching the timer wheel per batch.
                    Box::pin(self.engine.upstream_event(&mut WsDown(&mut self.client, self.write_timeout), ev)).await
                }
                msg = self.client_woke.gate(self.client.next()) => {
                    // More frames may sit in the read buffer; a turn may have started on
                    // another upstream connection.
                    self.raise_both();
                    Box::pin(self.client_message(msg)).await
                }
                _ = &mut self.timer, if timed => {
                    self.raise_both();
                    Box::pin(self.on_timer()).await
                }
                _ = self.frame_check.tick() => {
                    self.raise_both();
                    Box::pin(self.check_partial_frame()).await
                }
            };
            if flow == Flow::Stop {
                break;
            }
        }
        self.engine.finish();
        self.gw.active_sessions.fetch_sub(1, Ordering::AcqRel);
        self.gw.relay.client_closed.increment(1);
        debug!(turns = self.engine.turns(), "session ended");
    }

    /// The next pass of the loop polls both sockets' branches.
    fn raise_both(&self) {
        self.upstream_woke.raise();
        self.client_woke.raise();
    }

    /// The first-frame or turn-idle deadline passed (or a stale one: re-armed).
    async fn on_timer(&mut self) -> Flow {
        if !self.got_frame {
            let reason = format!(
                "no request within {:?} (limits.first_frame_timeout)",
                self.gw.config().limits.first_frame_timeout
            );
            return self
                .refuse("first_frame_timeout", close::client::POLICY, &reason)
                .await;
        }
        match self.engine.idle_deadline() {
            None => Flow::Continue,
            Some(due) if tokio::time::Instant::now() < due => {
                self.timer.as_mut().reset(due);
                Flow::Continue
            }
            Some(_) => {
                self.engine
                    .turn_idle_expired(&mut WsDown(&mut self.client, self.write_timeout))
                    .await
            }
        }
    }

    /// A frame that started arriving must finish within `limits.frame_timeout` (the bytes it
    /// holds are released only when it completes): two checks in a row that see bytes beyond
    /// the last complete message, with no message in between, close the session (1008).
    async fn check_partial_frame(&mut self) -> Flow {
        let pending = self.read.load(Ordering::Relaxed) > self.read_at_message;
        if pending && self.partial {
            let reason = format!(
                "a frame did not complete within {:?} (limits.frame_timeout)",
                self.gw.config().limits.frame_timeout
            );
            return self
                .refuse("client_frame_timeout", close::client::POLICY, &reason)
                .await;
        }
        self.partial = pending;
        Flow::Continue
    }

    async fn client_message(&mut self, msg: Option<Result<Message, tungstenite::Error>>) -> Flow {
        // A complete message (or the end): what was read so far is accounted for.
        self.read_at_message = self.read.load(Ordering::Relaxed);
        self.partial = false;
        self.client.get_mut().settle();
        match msg {
            Some(Ok(Message::Text(text))) => {
                self.got_frame = true;
                self.client_text(text).await
            }
            Some(Ok(Message::Binary(_))) => {
                self.refuse(
                    "client_binary_frame",
                    close::client::UNSUPPORTED_DATA,
                    "binary frames are not supported; send JSON text frames",
                )
                .await
            }
            Some(Ok(Message::Close(_))) | None => Flow::Stop,
            Some(Ok(_)) => Flow::Continue, // ping/pong: tungstenite answers pings
            Some(Err(tungstenite::Error::Capacity(e))) => {
                let reason = format!("message too big: {e}");
                self.refuse("client_message_too_big", close::client::TOO_BIG, &reason)
                    .await
            }
            Some(Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ))) => {
                // How Codex leaves (it exits or reconnects without a close handshake): the
                // client is gone, not wrong; there is no one to send a close frame to.
                debug!("client left without a close handshake");
                Flow::Stop
            }
            Some(Err(tungstenite::Error::Protocol(e))) => {
                // RFC 6455 §7.4.1: 1002 for a protocol error, while a close frame can be sent.
                let reason = format!("protocol error: {e}");
                self.refuse("client_protocol_error", close::client::PROTOCOL, &reason)
                    .await
            }
            Some(Err(tungstenite::Error::Utf8(_))) => {
                self.refuse(
                    "client_invalid_utf8",
                    close::client::INVALID_PAYLOAD,
                    "text frame is not valid UTF-8",
                )
                .await
            }
            Some(Err(tungstenite::Error::Io(e)))
                if e.get_ref().is_some_and(|e| e.is::<OverBudget>()) =>
            {
                self.refuse(
                    "buffer_budget_exhausted",
                    close::client::TRY_AGAIN,
                    &OverBudget.to_string(),
                )
                .await
            }
            Some(Err(e)) => {
                debug!(error = %e, "client connection failed");
                Flow::Stop
            }
        }
    }

    async fn client_text(&mut self, text: Utf8Bytes) -> Flow {
        let (kind, previous, cache_key) = match ClientEvent::parse(&text) {
            Ok(ev) => match Sent::from_type(ev.kind()) {
                Some(kind) => (
                    kind,
                    ev.previous_response_id
                        .filter(|p| !p.is_empty())
                        .map(|p| p.into_owned()),
                    ev.prompt_cache_key.map(|c| c.into_owned()),
                ),
                None => {
                    crate::metrics::error("client_unsupported_event");
                    let ty = crate::telemetry::escape(ev.kind(), 64);
                    let msg = format!(
                        "event type `{ty}` is not supported; send response.create (or response.steer, \
                         response.inject, response.processed)"
                    );
                    return Box::pin(self.local_error(400, "unsupported_event_type", &msg)).await;
                }
            },
            Err(e) => {
                let code = match e {
                    ClientFrameError::InvalidJson(_) => "invalid_json",
                    ClientFrameError::MissingType => "missing_type",
                };
                crate::metrics::error(if code == "invalid_json" {
                    "client_invalid_json"
                } else {
                    "client_missing_type"
                });
                return Box::pin(self.local_error(400, code, &e.to_string())).await;
            }
        };
        let relay = self.gw.config().relay.clone();
        let max_queued = relay.max_queued_frames;
        // Creates wait for the turn in flight; side events too when something is held before
        // them, so nothing is reordered.
        if self.engine.in_turn() && (kind == Sent::Create || !self.held.is_empty()) {
            if self.held.len() >= max_queued
                || self.held_bytes + text.len() > relay.max_queued_bytes.as_u64() as usize
            {
                return self
                    .refuse(
                        "client_queue_full",
                        close::client::POLICY,
                        "too many frames or bytes queued behind the response in flight",
                    )
                    .await;
            }
            let Some(lease) = self.gw.buffered.take(text.len()) else {
                let reason = "the gateway's buffer budget is exhausted (limits.max_buffered_bytes); try again";
                return self
                    .refuse("buffer_budget_exhausted", close::client::TRY_AGAIN, reason)
                    .await;
            };
            self.held_bytes += text.len();
            self.held.push_back((text, lease));
            return Flow::Continue;
        }
        let down = &mut WsDown(&mut self.client, self.write_timeout);
        let flow = if kind == Sent::Create {
            self.engine
                .start_turn(down, text, previous, cache_key)
                .await
        } else if self.engine.outstanding() >= max_queued {
            return self
                .refuse(
                    "client_queue_full",
                    close::client::POLICY,
                    "too many events awaiting an upstream answer",
                )
                .await;
        } else {
            self.engine.forward_side(down, kind, text).await
        };
        if let Some(due) = self.engine.idle_deadline() {
            self.timer.as_mut().reset(due);
        }
        flow
    }

    /// The client broke a rule of the session: counted as `kind` (`errors_total`), closed with
    /// `code` and `reason`, and the session ends.
    async fn refuse(&mut self, kind: &'static str, code: u16, reason: &str) -> Flow {
        crate::metrics::error(kind);
        Box::pin(close_client(&mut self.client, code, reason)).await;
        Flow::Stop
    }

    async fn local_error(&mut self, status: u16, code: &str, message: &str) -> Flow {
        debug!(status, code, message, "error event to client");
        let ev = crate::event::error_value(status, code, message);
        match WsDown(&mut self.client, self.write_timeout).error(ev).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }
}
