//! Outbound connections to the upstream host: TCP without Nagle and, for `wss://` and
//! `https://`, rustls. Used by the upstream WebSocket dial and the plain-HTTP relays.
//!
//! [`UpstreamIo`] keeps the TLS state boxed: a plain-TCP connection then costs 32 bytes
//! instead of the ~1 KiB of an inline rustls connection (tokio-tungstenite's
//! `MaybeTlsStream` is as large as its TLS variant), which every pooled upstream connection
//! would otherwise carry (issue 14, idle memory).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A connected upstream socket: plain TCP or TLS over TCP.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("TLS failed: {0}")]
    Tls(String),
    #[error("bad upstream address: {0}")]
    Address(String),
}

impl From<ConnectError> for crate::error::DialError {
    fn from(e: ConnectError) -> Self {
        use crate::error::DialError;
        match e {
            ConnectError::Timeout(t) => DialError::Timeout(t),
            ConnectError::Connect(e) => DialError::Connect(e.to_string()),
            ConnectError::Tls(e) => DialError::Tls(e),
            ConnectError::Address(e) => DialError::Protocol(e),
        }
    }
}

/// Opens a connection to `uri`'s host (TLS for `wss`/`https`), within `timeout`.
pub async fn connect(
    uri: &Uri,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<UpstreamIo, ConnectError> {
    let secure = matches!(uri.scheme_str(), Some("wss" | "https"));
    let host = uri
        .host()
        .ok_or_else(|| ConnectError::Address("no host".into()))?;
    // `[::1]` in a URL is `::1` to the resolver and to TLS.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let open = async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(ConnectError::Connect)?;
        let _ = tcp.set_nodelay(true);
        if !secure {
            return Ok(UpstreamIo::Plain(tcp));
        }
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| ConnectError::Address(e.to_string()))?;
        match tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
        {
            Ok(s) => Ok(UpstreamIo::Tls(Box::new(s))),
            Err(e) => Err(
                match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(tls) => ConnectError::Tls(tls.to_string()),
                    None => ConnectError::Connect(e),
                },
            ),
        }
    };
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
