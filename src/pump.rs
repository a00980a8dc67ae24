//! The pump: reads upstream frames into a bounded channel. A full channel (slow client) stops
//! the reads, so back-pressure reaches the upstream through TCP instead of memory.
//! tungstenite answers upstream pings while the pump reads.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::SplitStream;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::upstream::UpstreamStream;

/// What the pump hands to the holder of the connection.
#[derive(Debug)]
pub enum PumpEvent {
    /// A data frame (text, or binary which the session treats as a protocol violation).
    Frame(Message),
    /// The upstream sent a close frame (with its code, if any). The pump has ended.
    Closed(Option<CloseFrame>),
    /// The connection failed or hit EOF without a close frame. The pump has ended.
    Failed(String),
}

/// Runs until the upstream ends or the receiver is dropped. `waker` is poked when the
/// connection ends so the pool's reaper can evict it if it is idle.
pub async fn run(
    mut stream: SplitStream<UpstreamStream>,
    tx: mpsc::Sender<PumpEvent>,
    waker: Arc<Notify>,
) {
    let end = loop {
        match stream.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                if tx.send(PumpEvent::Frame(m)).await.is_err() {
                    return;
                }
            }
            Some(Ok(Message::Close(frame))) => break PumpEvent::Closed(frame),
            Some(Ok(_)) => {}
            Some(Err(e)) => break PumpEvent::Failed(e.to_string()),
            None => break PumpEvent::Failed("connection closed without a close frame".into()),
        }
    };
    waker.notify_one();
    let _ = tx.send(end).await;
    waker.notify_one();
}
