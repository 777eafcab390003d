// tether patch: detached tunnels for upgraded HTTP/1 connections (WebSockets).
//
// Once a `101 Switching Protocols` has gone downstream, Pingora keeps proxying the connection
// inside the request's own task: the whole `process_request` state machine (about 20 KiB),
// both HTTP sessions with their header and body buffers, and two task channels stay allocated
// for as long as the WebSocket is open, about 50 KiB per idle WebSocket. When the proxy opts in
// (`ProxyHttp::detach_upgraded`), the request task ends after the 101 instead, and the two
// sockets move into the small task spawned here, which copies bytes both ways through one
// buffer per thread: an idle tunnel holds its two sockets, its state and nothing else.

use bytes::Bytes;
use futures::FutureExt;
use pingora_core::protocols::http::v1::client::HttpSession as HttpSessionV1;
use pingora_core::protocols::http::ServerSession as HttpSession;
use pingora_core::protocols::Stream;
use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// How an opted-in upgraded connection is run once detached.
#[derive(Debug, Clone, Default)]
pub struct DetachedTunnel {
    /// Close the tunnel after this long without a byte in either direction (HAProxy's
    /// `timeout tunnel`). `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// Why a detached tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// The client closed its side (everything it sent was delivered).
    DownstreamClosed,
    /// The upstream closed its side (everything it sent was delivered).
    UpstreamClosed,
    /// No byte either way for the idle timeout.
    IdleTimeout,
    /// Reading from or writing to the client failed.
    DownstreamError(io::Error),
    /// Reading from or writing to the upstream failed.
    UpstreamError(io::Error),
}

/// What a detached tunnel did, handed to the proxy's close callback.
#[derive(Debug)]
pub struct TunnelReport {
    /// Bytes read from the client (and written to the upstream, unless the tunnel failed).
    pub to_upstream: u64,
    /// Bytes read from the upstream (and written to the client, unless the tunnel failed).
    pub to_downstream: u64,
    /// From the detach (just after the 101) to the close.
    pub duration: Duration,
    pub end: TunnelEnd,
}

/// Runs when a detached tunnel closes.
pub type OnTunnelClose = Box<dyn FnOnce(TunnelReport) + Send>;

/// Per request: a detach the proxy asked for, then the upstream socket once the 101 went out.
pub(crate) struct PendingTunnel {
    pub settings: DetachedTunnel,
    /// The upstream socket and what its session had already read past the 101.
    pub upstream: Option<(Stream, Vec<Bytes>)>,
}

/// At most this much is taken out of a session's buffers (and socket) before detaching; the
/// rest stays in the socket for the tunnel.
const DRAIN_LIMIT: usize = 256 * 1024;

/// Bytes a session has already read (or can read right now without waiting) past the upgrade:
/// a backend that speaks first (Engine.IO's open packet) often sends them with its 101.
fn drain_now<S>(
    session: &mut S,
    mut read: impl FnMut(&mut S) -> futures::future::BoxFuture<'_, pingora_error::Result<Option<Bytes>>>,
) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut total = 0;
    while total < DRAIN_LIMIT {
        // A read that would wait is dropped before it has taken anything (the body readers
        // read straight from the socket), so the bytes it would have read stay in the socket.
        match read(session).now_or_never() {
            Some(Ok(Some(b))) if !b.is_empty() => {
                total += b.len();
                out.push(b);
            }
            _ => break,
        }
    }
    out
}

/// The upstream session's socket and the bytes it read past the 101.
pub(crate) fn take_upstream(mut h1: HttpSessionV1) -> (Stream, Vec<Bytes>) {
    let early = drain_now(&mut h1, |s| s.read_body_bytes().boxed());
    (h1.into_inner(), early)
}

/// The client's socket and the bytes it sent past the upgrade request, or `None` if the
/// session is not HTTP/1.
pub(crate) fn take_downstream(session: Box<HttpSession>) -> Option<(Stream, Vec<Bytes>)> {
    match *session {
        HttpSession::H1(mut h1) => {
            let early = drain_now(&mut h1, |s| s.read_body_bytes().boxed());
            Some((h1.into_inner(), early))
        }
        _ => None,
    }
}

const COPY_BUF_SIZE: usize = 16 * 1024;

thread_local! {
    // One copy buffer per worker thread for all its tunnels: bytes are read into it and written
    // on at once; only what the other side cannot take right away is kept, per tunnel.
    static COPY_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUF_SIZE].into_boxed_slice());
}

/// One direction of a tunnel.
struct Half {
    /// Read but not yet written (the other side pushed back); empty, unallocated, when idle.
    pending: Vec<u8>,
    pos: usize,
    /// Written but maybe still in the writer's buffer.
    unflushed: bool,
    eof: bool,
    bytes: u64,
}

enum Fail {
    Read(io::Error),
    Write(io::Error),
}

impl Half {
    fn new(early: Vec<Bytes>) -> Self {
        let pending = early.concat();
        Half {
            bytes: pending.len() as u64,
            pending,
            pos: 0,
            // The 101 itself may still sit in the downstream writer's buffer.
            unflushed: true,
            eof: false,
        }
    }

    /// Move bytes from `from` to `to` until either would wait. `Ready(Ok)`: `from` ended and
    /// everything it sent is flushed to `to`.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut Stream,
        to: &mut Stream,
        buf: &mut [u8],
    ) -> Poll<Result<(), Fail>> {
        loop {
            while self.pos < self.pending.len() {
                match Pin::new(&mut *to).poll_write(cx, &self.pending[self.pos..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Fail::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fail::Write(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.pos > 0 {
                // All written: give the memory back, an idle tunnel keeps none.
                self.pending = Vec::new();
                self.pos = 0;
            }
            if self.unflushed {
                match Pin::new(&mut *to).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fail::Write(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(buf);
            match Pin::new(&mut *from).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Fail::Read(e))),
                Poll::Ready(Ok(())) => {}
            }
            let n = read.filled().len();
            if n == 0 {
                self.eof = true;
                continue;
            }
            self.bytes += n as u64;
            let mut off = 0;
            while off < n {
                match Pin::new(&mut *to).poll_write(cx, &buf[off..n]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Fail::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Poll::Ready(Ok(k)) => {
                        off += k;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fail::Write(e))),
                    // The waker is registered for `to`: keep the rest until it can take it.
                    Poll::Pending => {
                        self.pending.extend_from_slice(&buf[off..n]);
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// Copy both ways between `down` (the client) and `up` until either side ends (what it sent is
/// delivered first, then both are closed, as NGINX does), a socket fails, or nothing moved for
/// `idle_timeout`. `down_early`/`up_early`: bytes already read from each side.
pub(crate) async fn run(
    mut down: Stream,
    mut up: Stream,
    down_early: Vec<Bytes>,
    up_early: Vec<Bytes>,
    idle_timeout: Option<Duration>,
) -> TunnelReport {
    let started = Instant::now();
    let mut to_up = Half::new(down_early);
    let mut to_down = Half::new(up_early);
    let mut last_moved = started;
    let mut idle = idle_timeout.map(|t| (t, Box::pin(tokio::time::sleep_until(started + t))));

    let end = poll_fn(|cx| {
        let moved = to_up.bytes + to_down.bytes;
        let copied = COPY_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if let Poll::Ready(r) = to_up.poll_copy(cx, &mut down, &mut up, &mut buf) {
                return Poll::Ready(match r {
                    Ok(()) => TunnelEnd::DownstreamClosed,
                    Err(Fail::Read(e)) => TunnelEnd::DownstreamError(e),
                    Err(Fail::Write(e)) => TunnelEnd::UpstreamError(e),
                });
            }
            if let Poll::Ready(r) = to_down.poll_copy(cx, &mut up, &mut down, &mut buf) {
                return Poll::Ready(match r {
                    Ok(()) => TunnelEnd::UpstreamClosed,
                    Err(Fail::Read(e)) => TunnelEnd::UpstreamError(e),
                    Err(Fail::Write(e)) => TunnelEnd::DownstreamError(e),
                });
            }
            Poll::Pending
        });
        if copied.is_ready() {
            return copied;
        }
        let Some((timeout, sleep)) = idle.as_mut() else {
            return Poll::Pending;
        };
        let timeout = *timeout;
        if to_up.bytes + to_down.bytes != moved {
            last_moved = Instant::now();
        }
        // The timer is not reset on every byte: when it fires, it is moved to the last
        // movement's deadline if that is still ahead.
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = last_moved + timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(TunnelEnd::IdleTimeout);
            }
            sleep.as_mut().reset(deadline);
        }
    })
    .await;

    // Close both sides; a peer that does not take the close promptly is dropped anyway.
    let close = async {
        let _ = down.shutdown().await;
        let _ = up.shutdown().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;

    TunnelReport {
        to_upstream: to_up.bytes,
        to_downstream: to_down.bytes,
        duration: started.elapsed(),
        end,
    }
}
