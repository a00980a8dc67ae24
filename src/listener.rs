//! Accepting connections: our own HTTP/1.1 accept loop ([`serve_http`]) and the optional TLS
//! listener (`tls.cert_file` / `tls.key_file`).
//!
//! axum's `serve` has no deadline for a client's request head, so a client that opens TCP and
//! sends nothing (or a header a byte a minute) would hold a socket and a task forever. Here
//! every connection must deliver its complete request head within `limits.handshake_timeout`
//! (hyper's header-read timer; it also closes idle keep-alive connections), TLS handshakes run
//! in their own tasks with the same deadline, and connections that have not (yet) become
//! WebSocket sessions are bounded by `limits.max_handshakes`: past that, new ones wait in the
//! kernel's accept backlog.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tower::ServiceExt;
use tracing::debug;

use crate::error::StartError;
use crate::ingress::client_io::{IntoClientIo, Prefixed};
use crate::ingress::fast::{FastUpgrade, Outcome};

/// Deadlines and bounds for connections that are not (yet) WebSocket sessions.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// TLS handshake, and then the complete HTTP request head, each within this.
    pub timeout: Duration,
    /// Connections in their TLS or HTTP phase at once.
    pub max: usize,
    /// Largest request head, in bytes (HTTP 431 beyond).
    pub max_header_size: usize,
}

impl HandshakeLimits {
    pub fn from_config(limits: &crate::config::LimitsConfig) -> HandshakeLimits {
        HandshakeLimits {
            timeout: limits.handshake_timeout,
            max: limits.max_handshakes,
            max_header_size: usize::try_from(limits.max_header_size.as_u64()).unwrap_or(usize::MAX),
        }
    }
}

/// Serves `app` over HTTP/1.1 (with upgrades) on `listener` until `stop` resolves; then stops
/// accepting, asks every open HTTP connection to finish its request and close, and waits for
/// them (at most `limits.timeout`). Upgraded connections are not waited for: they belong to
/// their session from the 101 on.
///
/// Each connection runs as a task of `connections` (so its length is the number open).
///
/// With `fast`, a connection whose first read is a plain WebSocket opening handshake is
/// answered without hyper (`ingress::fast`); the rest, and every connection without it, are
/// hyper's.
pub(crate) async fn serve_http<L>(
    mut listener: L,
    app: Router,
    limits: HandshakeLimits,
    connections: TaskTracker,
    fast: Option<Arc<FastUpgrade>>,
    stop: impl Future<Output = ()>,
) where
    L: Listener<Addr = SocketAddr>,
    L::Io: IntoClientIo,
{
    let slots = Arc::new(Semaphore::new(limits.max.max(1)));
    let stopping = CancellationToken::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.timeout)
        .max_header_size(limits.max_header_size);
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let (io, peer) = tokio::select! {
            conn = listener.accept() => conn,
            _ = &mut stop => break,
        };
        let app = app.clone();
        let activity = ConnActivity::new(slot);
        let service = hyper::service::service_fn({
            let activity = activity.clone();
            move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(activity.clone());
                app.clone().oneshot(req.map(axum::body::Body::new))
            }
        });
        let builder = builder.clone();
        let stopping = stopping.clone();
        let timeout = limits.timeout;
        let fast = fast.clone();
        connections.spawn(async move {
            // The connection's deadline: the head read, the response write and the keep-alive
            // idle all fall under it; it is suspended while a turn runs on the connection.
            let mut deadline = tokio::time::Instant::now() + timeout;
            let io = match fast {
                Some(fast) => {
                    // Boxed, as hyper's connection below: the task's own future stays small
                    // (tokio copies it whole when it is spawned and when it ends).
                    let served =
                        Box::pin(fast.serve(io, peer, &activity, limits, deadline, &stopping));
                    match served.await {
                        Outcome::Done => return,
                        Outcome::Hyper(io) => io,
                    }
                }
                None => Prefixed::new(bytes::Bytes::new(), io),
            };
            let mut conn = Box::pin(
                builder
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            );
            let result = loop {
                let changed = activity.0.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let busy = activity.turns() > 0;
                tokio::select! {
                    result = conn.as_mut() => break result,
                    _ = stopping.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                    _ = tokio::time::sleep_until(deadline), if !busy => {
                        crate::metrics::error("handshake_timeout");
                        debug!(client.addr = %peer, "HTTP connection deadline passed; closed");
                        break Ok(());
                    }
                    _ = changed => {
                        if activity.turns() == 0 {
                            deadline = tokio::time::Instant::now() + timeout;
                        }
                    }
                }
            };
            match result {
                Ok(()) => {}
                Err(e) if e.is_timeout() => {
                    crate::metrics::error("handshake_timeout");
                    debug!(client.addr = %peer, "client handshake timed out");
                }
                Err(e) => debug!(client.addr = %peer, error = %e, "client connection failed"),
            }
        });
    }
    stopping.cancel();
    connections.close();
    if tokio::time::timeout(limits.timeout, connections.wait())
        .await
        .is_err()
    {
        debug!(
            remaining = connections.len(),
            "HTTP connections still open at stop"
        );
    }
}

/// Binds a listening socket with `SO_REUSEADDR` and (on Linux and other unixes)
/// `SO_REUSEPORT`, so a replacement process can bind the same address while this one drains
/// (a rolling restart inside Codex's retry window).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Client sockets carry small, latency-sensitive events: no Nagle. Set on the listening
/// socket, where Linux copies `TCP_NODELAY` into every connection it accepts (one syscall
/// less per connection, which a client reconnecting every turn pays each time). Returns
/// whether it did; if not, each accepted socket needs its own [`TcpStream::set_nodelay`].
pub fn no_delay_on_accept(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .set_tcp_nodelay(true)
            .is_ok()
}

/// A connection's activity, shared with its requests (a request extension). A non-upgraded
/// connection lives under a deadline (`limits.handshake_timeout`: head read, response write,
/// keep-alive idle), so clients that pipeline requests and never read cannot hold a handshake
/// slot; an HTTP turn (or an upgrade's dial, or a relay) suspends it with [`ConnActivity::turn`],
/// and the first one hands the handshake slot back (the turn counts against the session
/// limits instead).
#[derive(Clone)]
pub struct ConnActivity(Arc<ActivityInner>);

struct ActivityInner {
    turns: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
    /// The `limits.max_handshakes` permit, until the first turn.
    slot: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl ConnActivity {
    fn new(slot: tokio::sync::OwnedSemaphorePermit) -> ConnActivity {
        ConnActivity(Arc::new(ActivityInner {
            turns: Default::default(),
            changed: tokio::sync::Notify::new(),
            slot: std::sync::Mutex::new(Some(slot)),
        }))
    }

    fn turns(&self) -> usize {
        self.0.turns.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A turn starts on this connection: its deadline waits until the guard drops.
    pub fn turn(&self) -> TurnGuard {
        self.0
            .turns
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Ok(mut slot) = self.0.slot.lock() {
            slot.take();
        }
        self.0.changed.notify_waiters();
        TurnGuard(self.clone())
    }
}

/// Suspends its connection's deadline while alive.
pub struct TurnGuard(ConnActivity);

impl Drop for TurnGuard {
    fn drop(&mut self) {
        self.0
            .0
            .turns
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.0.changed.notify_waiters();
    }
}

/// Builds the server TLS config from PEM files (ring provider, HTTP/1.1 ALPN).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let tls_err = |what: &str, e: String| StartError::Tls(format!("{what}: {e}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| tls_err("tls.cert_file", e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err("tls.cert_file", e.to_string()))?;
    if certs.is_empty() {
        return Err(tls_err("tls.cert_file", "holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| tls_err("tls.key_file", e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_err("tls", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| tls_err("tls", e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and hands out those that completed a TLS handshake.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    _accept: AbortOnDropHandle<()>,
}

impl TlsListener {
    pub fn new(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        limits: HandshakeLimits,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let inherited = no_delay_on_accept(&tcp);
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(Semaphore::new(limits.max.max(1)));
        let accept = tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if !inherited {
                    let _ = tcp.set_nodelay(true);
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(limits.timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            debug!(client.addr = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => {
                            crate::metrics::error("handshake_timeout");
                            debug!(client.addr = %peer, "TLS handshake timed out")
                        }
                    }
                });
            }
        });
        Ok(TlsListener {
            local,
            ready,
            _accept: AbortOnDropHandle::new(accept),
        })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ended (it never does while the listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An accepted client socket has Nagle off whichever way it got there: inherited from the
    /// listening socket (Linux), or set per connection where the listener could not pass it on.
    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inherited = no_delay_on_accept(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        if !inherited {
            accepted.set_nodelay(true).unwrap();
        }
        assert!(accepted.nodelay().unwrap(), "accepted socket has Nagle on");
        // The listener's setting is the server side's alone.
        assert!(!client.nodelay().unwrap());
    }
}
