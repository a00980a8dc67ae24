//! A reference point for workload (c) of bench/compare.sh: the least work a middle can do
//! and still keep one upstream WebSocket per conversation across client reconnects. It
//! answers the client's opening handshake itself, takes the conversation's upstream socket
//! from a map (or opens one: TCP and a WebSocket handshake), and copies bytes both ways
//! until the client's socket ends; then the upstream goes back to the map.
//!
//! It parses nothing past the request head: no frames, no turn boundaries, no checks, no
//! limits, no deadlines, no logs, no metrics. It relies on the load generator's shape (the
//! client leaves only after its turn's terminal event, so nothing is in flight when the
//! upstream goes back) and is no gateway: it shows the ceiling of the reconnect speed-up on
//! a machine, what any pooled middle pays for a client's connect, handshake, turn and close.
//!
//! Usage: cargo run --release --example pooled_relay -- <listen addr> <upstream addr> [path]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Each conversation's upstream: idle in the map, or `None` while a client holds it.
#[derive(Default)]
struct Pool {
    conns: Mutex<HashMap<String, Option<TcpStream>>>,
    released: Notify,
}

/// What a new client connection gets for its conversation.
enum Checkout {
    Idle(TcpStream),
    /// Held by the conversation's previous connection (its close not seen yet).
    Busy,
    Miss,
}

impl Pool {
    fn checkout(&self, conversation: &str) -> Checkout {
        let Ok(mut conns) = self.conns.lock() else {
            return Checkout::Miss;
        };
        match conns.get_mut(conversation) {
            Some(slot) => slot.take().map_or(Checkout::Busy, Checkout::Idle),
            None => {
                conns.insert(conversation.to_string(), None);
                Checkout::Miss
            }
        }
    }

    /// The upstream back (`Some`) or gone (`None`).
    fn release(&self, conversation: String, up: Option<TcpStream>) {
        if let Ok(mut conns) = self.conns.lock() {
            match up {
                Some(up) => conns.insert(conversation, Some(up)),
                None => conns.remove(&conversation),
            };
        }
        self.released.notify_waiters();
    }

    /// The conversation's upstream: the idle one, or the one its previous connection
    /// releases (a reconnecting client is usually faster than its old socket's close), or a
    /// new one.
    async fn take(&self, conversation: &str, upstream: &(String, String)) -> Option<TcpStream> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.checkout(conversation) {
                Checkout::Idle(up) => return Some(up),
                Checkout::Miss => break,
                Checkout::Busy => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        break;
                    }
                }
            }
        }
        dial(upstream).await
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: pooled_relay <listen addr> <upstream addr> [path]");
        std::process::exit(2);
    };
    let path = args.next().unwrap_or_else(|| "/v1/responses".into());
    let upstream: Arc<(String, String)> = Arc::new((upstream, path));
    let pool: Arc<Pool> = Arc::default();
    let listener = TcpListener::bind(&listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        let (pool, upstream) = (pool.clone(), upstream.clone());
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let _ = serve(client, &pool, &upstream).await;
        });
    }
}

async fn serve(mut client: TcpStream, pool: &Pool, upstream: &(String, String)) -> Option<()> {
    let mut buf = vec![0u8; 8192];
    let n = client.read(&mut buf).await.ok()?;
    let (key, conversation) = {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        let len = match req.parse(&buf[..n]).ok()? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return None,
        };
        if len != n {
            return None; // the load generator waits for the 101 before its first frame
        }
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        (header("sec-websocket-key")?, header("session-id")?)
    };
    let Some(mut up) = pool.take(&conversation, upstream).await else {
        pool.release(conversation, None);
        return None;
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    if client.write_all(answer.as_bytes()).await.is_err() {
        pool.release(conversation, Some(up));
        return None;
    }
    let (mut client_read, mut client_write) = client.split();
    let (mut up_read, mut up_write) = up.split();
    let upward = tokio::io::copy(&mut client_read, &mut up_write);
    let downward = tokio::io::copy(&mut up_read, &mut client_write);
    let clean = tokio::select! {
        // The client's socket ended (or failed): the upstream goes back unless it is gone.
        up = upward => up.is_ok(),
        // The upstream ended: it is not pooled again.
        _ = downward => false,
    };
    pool.release(conversation, clean.then_some(up));
    Some(())
}

/// A new upstream WebSocket: TCP, then the opening handshake (the 101's bytes read and
/// dropped; the mock sends nothing after them until the first request).
async fn dial((addr, path): &(String, String)) -> Option<TcpStream> {
    let mut up = TcpStream::connect(addr).await.ok()?;
    let _ = up.set_nodelay(true);
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    up.write_all(request.as_bytes()).await.ok()?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = up.read(&mut chunk).await.ok()?;
        if n == 0 || head.len() > 16 << 10 {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    head.starts_with(b"HTTP/1.1 101").then_some(up)
}
