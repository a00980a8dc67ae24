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

use futures::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::upstream::UpstreamStream;

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
                    last_heard = Instant::now();
                }
                Err(_) => return,
            },
            msg = stream.next(), if pending.is_none() => {
                last_heard = Instant::now();
                ping_outstanding = false;
                match msg {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => pending = Some(PumpEvent::Frame(m)),
                    Some(Ok(Message::Close(frame))) => break PumpEvent::Closed(frame),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break PumpEvent::Failed(e.to_string()),
                    None => break PumpEvent::Failed("connection closed without a close frame".into()),
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                if pending.is_some() {
                    last_heard = now; // back-pressured: the upstream is demonstrably alive
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
    waker.notify_one();
    if let Some(p) = pending.take()
        && events.send(p).await.is_err()
    {
        return;
    }
    let _ = events.send(end).await;
    waker.notify_one();
}
