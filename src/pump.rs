//! The pump: one task per upstream connection that owns the socket for the connection's whole
//! life (while a session holds it and while it idles in the pool).
//!
//! - Upstream data frames go into a bounded channel (`relay.buffer_frames`). While the channel
//!   is full (slow client) the pump stops reading, so back-pressure reaches the upstream
//!   through TCP instead of memory.
//! - Frames from the holder arrive on a small command channel and are written in order.
//! - Keepalive: every `ping_interval` of silence it sends a ping; if nothing at all (pong or
//!   data) is heard for two intervals the connection is declared dead. Pings run during turns
//!   too, so long silent reasoning turns survive idle NATs. While back-pressured, data is
//!   flowing by definition and the liveness clock is not run.
//! - tungstenite answers upstream pings while the pump reads.
//! - When the handle ([`UpstreamConn`](crate::upstream::UpstreamConn)) is dropped the pump
//!   sends a close frame (1000, or 1001 at shutdown) with a short timeout and ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::upstream::UpstreamStream;

/// Frames handed over per wake-up at most (amortizes the select).
const MAX_DRAIN: usize = 256;

/// What the pump hands to the holder of the connection.
#[derive(Debug)]
pub enum PumpEvent {
    /// A data frame (text, or binary which the session treats as a protocol violation).
    Frame(Message),
    /// The upstream sent a close frame (with its code, if any). The pump has ended.
    Closed(Option<CloseFrame>),
    /// The connection failed, hit EOF, or stopped answering pings. The pump has ended.
    Failed(String),
}

/// Pump settings.
#[derive(Debug, Clone, Copy)]
pub struct PumpConfig {
    pub ping_interval: Duration,
    /// A single upstream write may take this long before the connection is declared dead.
    pub write_timeout: Duration,
}

/// The pump's channels.
pub struct PumpIo {
    pub commands: mpsc::Receiver<Message>,
    pub events: mpsc::Sender<PumpEvent>,
    /// Poked when the connection ends, so the pool's reaper can evict it if idle.
    pub waker: Arc<Notify>,
    /// Close code sent when the handle is dropped.
    pub close_code: Arc<AtomicU16>,
}

/// Runs until the upstream ends or the handle is dropped.
pub async fn run(ws: UpstreamStream, io: PumpIo, cfg: PumpConfig) {
    let PumpIo {
        mut commands,
        events,
        waker,
        close_code,
    } = io;
    let (mut sink, mut stream) = ws.split();
    let mut pending: Option<PumpEvent> = None;
    let mut last_heard = Instant::now();
    // Anything heard since the last tick (cheaper than reading the clock per frame).
    let mut heard = false;
    // One ping per silence: set when sent, cleared by anything heard.
    let mut ping_outstanding = false;
    // Look four times per interval, so a dead connection is noticed within ~2 intervals.
    let period = cfg.ping_interval / 4;
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            biased;
            cmd = commands.recv() => match cmd {
                Some(msg) => match tokio::time::timeout(cfg.write_timeout, sink.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break PumpEvent::Failed(format!("upstream write failed: {e}")),
                    Err(_) => break PumpEvent::Failed("upstream write timed out".into()),
                },
                None => {
                    // The handle was dropped: say goodbye politely, then end.
                    let code = CloseCode::from(close_code.load(Ordering::Acquire));
                    let frame = CloseFrame { code, reason: "".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
                    return;
                }
            },
            permit = events.reserve(), if pending.is_some() => match permit {
                Ok(p) => {
                    if let Some(ev) = pending.take() {
                        p.send(ev);
                    }
                    heard = true;
                }
                Err(_) => return,
            },
            msg = stream.next(), if pending.is_none() => {
                heard = true;
                ping_outstanding = false;
                // Hand over this frame and every other one already readable, without going
                // back through the select for each (the hot path under load).
                let mut next = Some(msg);
                let mut drained = 0;
                let end = loop {
                    let Some(msg) = next.take() else { break None };
                    match msg {
                        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                            match events.try_send(PumpEvent::Frame(m)) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(ev)) => {
                                    pending = Some(ev);
                                    break None;
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => return,
                            }
                        }
                        Some(Ok(Message::Close(frame))) => break Some(PumpEvent::Closed(frame)),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break Some(PumpEvent::Failed(e.to_string())),
                        None => break Some(PumpEvent::Failed("connection closed without a close frame".into())),
                    }
                    drained += 1;
                    if drained == MAX_DRAIN {
                        break None;
                    }
                    // Cancel-safe: an unfinished read stays buffered in the stream.
                    next = stream.next().now_or_never();
                };
                if let Some(end) = end {
                    break end;
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                if heard || pending.is_some() {
                    // Heard something (or back-pressured: the upstream is demonstrably alive).
                    heard = false;
                    last_heard = now;
                    continue;
                }
                let silent = now.saturating_duration_since(last_heard);
                if silent >= cfg.ping_interval * 2 {
                    break PumpEvent::Failed(format!("upstream did not answer pings for {silent:?}"));
                }
                if silent >= cfg.ping_interval
                    && !ping_outstanding
                    && tokio::time::timeout(cfg.write_timeout, sink.send(Message::Ping(Default::default()))).await.is_err()
                {
                    break PumpEvent::Failed("upstream ping write timed out".into());
                }
                if silent >= cfg.ping_interval {
                    ping_outstanding = true;
                }
            }
        }
    };
    if matches!(end, PumpEvent::Closed(_)) {
        // tungstenite queued the reply to the upstream's close frame; write it out, so the
        // upstream sees a clean close and not 1006 (bounded: the peer may be gone).
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.flush()).await;
    }
    waker.notify_one();
    if let Some(p) = pending.take()
        && events.send(p).await.is_err()
    {
        return;
    }
    let _ = events.send(end).await;
    waker.notify_one();
}
