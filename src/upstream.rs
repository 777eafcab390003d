//! Connections to a backend, for the lean engine and the health checks: plain TCP, or TLS
//! (`tls = true` in its `[[backend]]`) through Pingora's own connector, the one Pingora's proxy
//! uses for the other requests, set up by the same [`HttpPeer`] ([`crate::backend::Backend::peer`]):
//! SNI, the CAs of `ca_file` or the system's, verification, and the handshake bounded by
//! `connect_timeout`. One TLS client for every path to a backend.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use pingora::connectors::TransportConnector;
use pingora::prelude::ErrorType;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection to a backend.
pub enum Upstream {
    /// Plain TCP, driven by tokio directly: the hot path has no layer between it and the socket.
    Plain(TcpStream),
    /// TLS, as Pingora's connector made it.
    Tls(Stream),
}

/// A connect (or TLS handshake) that failed: what kind, for the status and the metric
/// ([`crate::http::upstream_kind`]), and what happened, for the log line.
#[derive(Debug)]
pub struct ConnectError {
    pub etype: ErrorType,
    message: String,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Pingora's connector, without its pool (tether keeps idle connections itself, per thread).
/// Made on the first TLS connect: it reads the system's CAs once.
fn connector() -> &'static TransportConnector {
    static CONNECTOR: OnceLock<TransportConnector> = OnceLock::new();
    CONNECTOR.get_or_init(|| TransportConnector::new(None))
}

/// Connect to `peer`, within its `connection_timeout` (the TLS handshake included).
pub async fn connect(peer: &HttpPeer) -> Result<Upstream, ConnectError> {
    if peer.is_tls() {
        return match connector().new_stream(peer).await {
            Ok(stream) => Ok(Upstream::Tls(stream)),
            Err(e) => Err(ConnectError {
                etype: e.etype().clone(),
                message: e.to_string(),
            }),
        };
    }
    let Some(addr) = peer.address().as_inet().copied() else {
        return Err(ConnectError {
            etype: ErrorType::ConnectError,
            message: format!("{peer}: not an IP address"),
        });
    };
    let connecting = TcpStream::connect(addr);
    let connected = match peer.connection_timeout() {
        Some(t) => tokio::time::timeout(t, connecting)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        None => connecting.await,
    };
    let stream = connected
        .and_then(|s| s.set_nodelay(true).map(|()| s))
        .map_err(|e| ConnectError {
            etype: match e.kind() {
                io::ErrorKind::TimedOut => ErrorType::ConnectTimedout,
                io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                _ => ErrorType::ConnectError,
            },
            message: e.to_string(),
        })?;
    Ok(Upstream::Plain(stream))
}

impl Upstream {
    /// Whether an idle connection can carry a request: the backend has not closed it, nor sent
    /// bytes nobody asked for. Costs no system call when tokio saw no event on it; over TLS, a
    /// session ticket the backend sent after the handshake is consumed, not taken for data.
    pub fn idle_usable(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            Upstream::Plain(s) => {
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Upstream::Tls(s) => {
                // Nobody waits on an idle connection: a no-op waker is enough, and the next
                // read registers the real one.
                let mut cx = Context::from_waker(Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                Pin::new(s).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Plain(s) => s.is_write_vectored(),
            Upstream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
