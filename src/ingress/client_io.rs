//! The client's socket under a WebSocket session, whichever way its opening handshake went:
//! answered by wsgate itself on the raw socket (`ingress::fast`, the usual case) or by hyper
//! (a request the fast path handed on), and a connection whose first bytes were already read
//! ([`Prefixed`]) for hyper to read again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A client session's socket. The raw variants skip hyper's boxed `Upgraded` (a virtual call
/// and a read-back buffer check on every read and write).
pub(crate) enum ClientIo {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
}

/// A listener's connection that can become a [`ClientIo`] as it is.
pub(crate) trait IntoClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_client_io(self) -> ClientIo;
}

impl IntoClientIo for TcpStream {
    fn into_client_io(self) -> ClientIo {
        ClientIo::Tcp(self)
    }
}

impl IntoClientIo for TlsStream<TcpStream> {
    fn into_client_io(self) -> ClientIo {
        ClientIo::Tls(Box::new(self))
    }
}

macro_rules! each {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            ClientIo::Tcp($io) => $e,
            ClientIo::Tls($io) => $e,
            ClientIo::Upgraded($io) => $e,
        }
    };
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Tcp(io) => io.is_write_vectored(),
            ClientIo::Tls(io) => io.is_write_vectored(),
            ClientIo::Upgraded(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, io => Pin::new(io).poll_shutdown(cx))
    }
}

/// A connection with bytes already read from it in front: reads return those first, then
/// the socket's. Writes go straight to the socket.
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if !this.prefix.has_remaining() {
                // An emptied `Bytes` still holds its buffer: let it go, so a kept-alive HTTP
                // connection does not carry the first read's buffer for its whole life.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefixed_reads_its_prefix_then_the_socket_and_writes_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let first_read = Bytes::from(b"GET / HT".to_vec());
        let mut p = Prefixed::new(first_read.clone(), a);
        b.write_all(b"TP/1.1\r\n").await.unwrap();
        let mut small = [0u8; 3];
        p.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"GET");
        let mut rest = [0u8; 13];
        p.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" / HTTP/1.1\r\n");
        // The first read's buffer is let go once read (only this handle holds it now).
        assert!(first_read.is_unique());
        p.write_all(b"ok").await.unwrap();
        let mut back = [0u8; 2];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ok");
    }
}
