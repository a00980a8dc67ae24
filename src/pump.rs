//! The pump: one task per upstream connection, for the connection's whole life, that keeps the
//! socket alive and watched; and the [`Link`] it shares with whoever holds the connection.
//!
//! Who reads the socket:
//! - While the connection idles in the pool the pump reads it: upstream pings are answered, a
//!   close (1012/1013) or a failure is seen at once and the pool's reaper is poked; any data
//!   frame while idle means the connection cannot be trusted and it ends.
//! - While a session holds it, the holder reads it directly ([`Link::poll_read`]) and writes its
//!   frames straight to its client: no task hop, no channel per frame. The bounded buffer
//!   between upstream and client is the holder's batch (`relay.buffer_frames` frames per
//!   flush) plus the client socket's bounded write buffer; while the client write waits, the
//!   holder does not read, so back-pressure reaches the upstream through TCP, never memory.
//! - Keepalive runs in the pump in both modes: every `ping_interval` of silence it sends a
//!   ping; if nothing at all (pong or data) is heard for two intervals the connection is
//!   declared dead (the holder is woken with [`PumpEvent::Failed`]). Pings run during turns
//!   too, so long silent reasoning turns survive idle NATs.
//! - When the handle ([`UpstreamConn`](crate::upstream::UpstreamConn)) is dropped the pump
//!   writes out a pending close reply, sends a close frame (1000, or 1001 at shutdown) with a
//!   short timeout and ends.
//!
//! The socket sits behind a mutex that is only ever held for one non-blocking poll. The
//! `held` flag is changed under that mutex, so no frame is read by the pump once a holder has
//! taken the connection.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::{Sink, Stream};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use crate::upstream::UpstreamStream;

/// What the holder of a connection reads from it.
#[derive(Debug)]
pub enum PumpEvent {
    /// A data frame (text, or binary which the session treats as a protocol violation).
    Frame(Message),
    /// The upstream sent a close frame (with its code, if any).
    Closed(Option<CloseFrame>),
    /// The connection failed, hit EOF, or stopped answering pings.
    Failed(String),
    /// Plain text frames taken from a read as they arrived (see [`Link::poll_read_run`]).
    Run(RawRun),
}

/// A run of complete text frames taken from the socket as raw bytes, headers included, for
/// relaying verbatim (see `tungstenite::WebSocket::take_text_run`).
#[derive(Debug)]
pub struct RawRun {
    pub frames: bytes::Bytes,
    /// Each frame's payload, as a range of `frames`.
    pub payloads: Vec<std::ops::Range<usize>>,
}

impl RawRun {
    /// Frame `i`'s payload as text, if its `type` (read raw, see
    /// [`crate::event::raw_type`]) passes `want`. Each payload was checked to be UTF-8 when
    /// the run was taken.
    pub fn text(&self, i: usize, want: impl FnOnce(&[u8]) -> bool) -> Option<Utf8Bytes> {
        let payload = self.frames.slice(self.payloads.get(i)?.clone());
        crate::event::raw_type(&payload)
            .is_some_and(want)
            .then(|| Utf8Bytes::try_from(payload.clone()).ok())
            .flatten()
    }
}

/// Pump settings.
#[derive(Debug, Clone, Copy)]
pub struct PumpConfig {
    pub ping_interval: Duration,
    /// A single upstream write may take this long before the connection is declared dead.
    pub write_timeout: Duration,
}

/// How a connection ended, as the pump found it (kept for the holder and the pool).
#[derive(Debug, Clone)]
pub enum End {
    Closed(Option<CloseFrame>),
    Failed(String),
}

impl From<End> for PumpEvent {
    fn from(end: End) -> PumpEvent {
        match end {
            End::Closed(f) => PumpEvent::Closed(f),
            End::Failed(e) => PumpEvent::Failed(e),
        }
    }
}

/// One upstream connection's socket and state, shared by its pump and its handle.
pub struct Link {
    ws: Mutex<UpstreamStream>,
    /// A holder reads the socket (set and cleared under `ws`'s lock).
    held: AtomicBool,
    /// Anything heard since the pump's last keepalive tick.
    heard: AtomicBool,
    /// The holder is waiting for the upstream (its last read found nothing). While it is busy
    /// (writing to a slow client) the upstream is not read, so silence proves nothing.
    waiting: AtomicBool,
    /// The handle was dropped: close and end.
    dropped: AtomicBool,
    /// Set once `end` is filled.
    ended: AtomicBool,
    end: Mutex<Option<End>>,
    close_code: AtomicU16,
    /// Wakes the pump: held/idle changed, or the handle was dropped.
    to_pump: Notify,
    /// Wakes the holder's read when the pump ends the connection.
    holder: AtomicWaker,
    /// Poked when the connection ends, so the pool's reaper can evict it if idle.
    pool_waker: Arc<Notify>,
}

impl Link {
    pub fn new(ws: UpstreamStream, pool_waker: Arc<Notify>) -> Arc<Link> {
        Arc::new(Link {
            ws: Mutex::new(ws),
            held: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            dropped: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            end: Mutex::new(None),
            close_code: AtomicU16::new(1000),
            to_pump: Notify::new(),
            holder: AtomicWaker::new(),
            pool_waker,
        })
    }

    fn ws(&self) -> MutexGuard<'_, UpstreamStream> {
        // Held only for one non-blocking poll; a panic there cannot leave the socket torn.
        self.ws.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A holder takes the socket: the pump stops reading it.
    pub fn hold(&self) {
        if !self.held.load(Ordering::Relaxed) {
            let _ws = self.ws();
            self.held.store(true, Ordering::Release);
            drop(_ws);
            self.to_pump.notify_one();
        }
    }

    /// The connection went back to the pool: the pump watches it again.
    pub fn release(&self) {
        if self.held.load(Ordering::Relaxed) {
            let _ws = self.ws();
            self.held.store(false, Ordering::Release);
            self.waiting.store(false, Ordering::Relaxed);
            drop(_ws);
            self.to_pump.notify_one();
        }
    }

    /// The handle is gone: the pump closes the socket with `close_code` and ends.
    pub fn drop_handle(&self) {
        self.dropped.store(true, Ordering::Release);
        self.to_pump.notify_one();
    }

    pub fn set_close_code(&self, code: u16) {
        self.close_code.store(code, Ordering::Release);
    }

    /// How the connection ended, if the pump found it ended.
    pub fn end(&self) -> Option<End> {
        if !self.ended.load(Ordering::Acquire) {
            return None;
        }
        self.end.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn finish(&self, end: End) {
        let mut slot = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(end);
            self.ended.store(true, Ordering::Release);
        }
        drop(slot);
        self.holder.wake();
        self.pool_waker.notify_one();
    }

    /// The holder's read: the next data frame, close or failure. Pings and pongs are answered
    /// and skipped.
    pub fn poll_read(&self, cx: &mut Context<'_>) -> Poll<PumpEvent> {
        if let Some(end) = self.end() {
            return Poll::Ready(end.into());
        }
        self.read_frame(&mut self.ws(), cx)
    }

    /// The holder's read that looks for a run first: once bytes arrived, and before any frame
    /// of them is decoded, a run of plain text frames `filter` takes (see
    /// `tungstenite::WebSocket::fill` and `take_text_run`), at most `max_frames`, is returned
    /// as raw bytes; with no such run, the next frame as [`Link::poll_read`] reads it.
    pub fn poll_read_run(
        &self,
        cx: &mut Context<'_>,
        max_frames: usize,
        filter: &mut dyn tokio_tungstenite::tungstenite::protocol::RunFilter,
    ) -> Poll<PumpEvent> {
        if let Some(end) = self.end() {
            return Poll::Ready(end.into());
        }
        let mut ws = self.ws();
        match ws.poll_fill(cx) {
            Poll::Pending => return self.wait(cx),
            Poll::Ready(Err(e)) => {
                self.mark_heard();
                return Poll::Ready(PumpEvent::Failed(e.to_string()));
            }
            Poll::Ready(Ok(true)) => {
                let mut payloads = Vec::new();
                if let Some(frames) = ws.take_text_run(max_frames, filter, &mut payloads) {
                    self.mark_heard();
                    return Poll::Ready(PumpEvent::Run(RawRun { frames, payloads }));
                }
            }
            // A frame is half read or the stream ended: the frame read takes over.
            Poll::Ready(Ok(false)) => {}
        }
        self.read_frame(&mut ws, cx)
    }

    /// Something arrived for the holder.
    fn mark_heard(&self) {
        self.waiting.store(false, Ordering::Relaxed);
        self.heard.store(true, Ordering::Relaxed);
    }

    /// The holder waits for the socket.
    fn wait(&self, cx: &mut Context<'_>) -> Poll<PumpEvent> {
        // Only a holder about to wait needs the pump's wake-up: registered, then the end
        // re-checked, so an end set in between is not missed.
        self.holder.register(cx.waker());
        if let Some(end) = self.end() {
            return Poll::Ready(end.into());
        }
        self.waiting.store(true, Ordering::Relaxed);
        Poll::Pending
    }

    fn read_frame(&self, ws: &mut UpstreamStream, cx: &mut Context<'_>) -> Poll<PumpEvent> {
        loop {
            let Poll::Ready(next) = Pin::new(&mut *ws).poll_next(cx) else {
                return self.wait(cx);
            };
            self.mark_heard();
            return Poll::Ready(match next {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => PumpEvent::Frame(m),
                Some(Ok(Message::Close(frame))) => PumpEvent::Closed(frame),
                Some(Ok(_)) => continue,
                Some(Err(e)) => PumpEvent::Failed(e.to_string()),
                None => PumpEvent::Failed("connection closed without a close frame".into()),
            });
        }
    }

    /// The holder's raw read: a run of plain text frames already buffered (see
    /// `tungstenite::WebSocket::take_text_run`), without I/O; `None` when there is none or
    /// the connection ended.
    pub fn take_text_run(
        &self,
        max_frames: usize,
        filter: &mut dyn tokio_tungstenite::tungstenite::protocol::RunFilter,
        payloads: &mut Vec<std::ops::Range<usize>>,
    ) -> Option<bytes::Bytes> {
        if self.ended.load(Ordering::Acquire) {
            payloads.clear();
            return None;
        }
        let run = self.ws().take_text_run(max_frames, filter, payloads)?;
        self.heard.store(true, Ordering::Relaxed);
        Some(run)
    }

    /// The pump's read while the connection idles: `None` once a holder took it.
    fn poll_idle(&self, cx: &mut Context<'_>) -> Poll<Option<End>> {
        let mut ws = self.ws();
        if self.held.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        loop {
            let next = ready!(Pin::new(&mut *ws).poll_next(cx));
            self.heard.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(match next {
                Some(Ok(Message::Close(frame))) => End::Closed(frame),
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    End::Failed("upstream sent a frame while the connection was idle".into())
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => End::Failed(e.to_string()),
                None => End::Failed("connection closed without a close frame".into()),
            }));
        }
    }

    /// Writes one frame (and flushes), within `timeout`.
    pub async fn write(&self, msg: Message, timeout: Duration) -> Result<(), tungstenite::Error> {
        let mut msg = Some(msg);
        let write = poll_fn(|cx| {
            let mut ws = self.ws();
            if msg.is_some() {
                ready!(Pin::new(&mut *ws).poll_ready(cx))?;
                if let Some(m) = msg.take() {
                    Pin::new(&mut *ws).start_send(m)?;
                }
            }
            Pin::new(&mut *ws).poll_flush(cx)
        });
        match tokio::time::timeout(timeout, write).await {
            Ok(r) => r,
            Err(_) => Err(tungstenite::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "upstream write timed out",
            ))),
        }
    }

    /// Writes out what tungstenite queued (a close reply, pongs), within `timeout`.
    async fn flush(&self, timeout: Duration) {
        let flush = poll_fn(|cx| Pin::new(&mut *self.ws()).poll_flush(cx));
        let _ = tokio::time::timeout(timeout, flush).await;
    }
}

/// Runs until the handle is dropped (then closes politely) or the connection ends.
pub async fn run(link: Arc<Link>, cfg: PumpConfig) {
    let mut last_heard = Instant::now();
    // One ping per silence: set when sent, cleared by anything heard.
    let mut ping_outstanding = false;
    // Look four times per interval, so a dead connection is noticed within ~2 intervals.
    let period = cfg.ping_interval / 4;
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if link.dropped.load(Ordering::Acquire) {
            // Write out a pending close reply first (the upstream then sees its own code,
            // not 1006), then say goodbye; both bounded, the peer may be gone.
            link.flush(Duration::from_secs(1)).await;
            if link.end().is_none() {
                let code = CloseCode::from(link.close_code.load(Ordering::Acquire));
                let frame = CloseFrame {
                    code,
                    reason: "".into(),
                };
                let _ = link
                    .write(Message::Close(Some(frame)), Duration::from_secs(1))
                    .await;
            }
            return;
        }
        if link.end().is_some() {
            // Dead: nothing more to watch; wait for the handle to go.
            link.to_pump.notified().await;
            continue;
        }
        let idle = !link.held.load(Ordering::Acquire);
        tokio::select! {
            biased;
            _ = link.to_pump.notified() => {}
            end = poll_fn(|cx| link.poll_idle(cx)), if idle => {
                if let Some(end) = end {
                    if matches!(end, End::Closed(_)) {
                        link.flush(Duration::from_secs(1)).await;
                    }
                    link.finish(end);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let busy = link.held.load(Ordering::Acquire) && !link.waiting.load(Ordering::Relaxed);
                if link.heard.swap(false, Ordering::Relaxed) || busy {
                    last_heard = now;
                    ping_outstanding = false;
                    continue;
                }
                let silent = now.saturating_duration_since(last_heard);
                if silent >= cfg.ping_interval * 2 {
                    link.finish(End::Failed(format!("upstream did not answer pings for {silent:?}")));
                } else if silent >= cfg.ping_interval && !ping_outstanding {
                    ping_outstanding = true;
                    if let Err(e) = link.write(Message::Ping(Default::default()), cfg.write_timeout).await {
                        link.finish(End::Failed(format!("upstream ping failed: {e}")));
                    }
                }
            }
        }
    }
}
