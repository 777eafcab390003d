//! Upgraded connections (WebSockets) after the `101`: the two sockets move into a small task of
//! their own that copies bytes both ways through one buffer per worker thread. An idle tunnel
//! holds its two sockets, this state and nothing else (about 6 KB per idle WebSocket, tests/bench
//! s4), where a request task kept alive for it would hold its whole HTTP state.
//!
//! A tunnel ends when either side closes (what that side sent is delivered first, then both are
//! closed, as NGINX does), on a socket error, or after `idle_timeout` without a byte either way
//! (HAProxy's `timeout tunnel`).

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::route::TunnelClosed;

/// Why a tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// The client closed its side (everything it sent was delivered).
    ClientClosed,
    /// The backend closed its side (everything it sent was delivered).
    BackendClosed,
    /// No byte either way for the idle timeout.
    IdleTimeout,
    /// Reading from or writing to the client failed.
    ClientError(io::Error),
    /// Reading from or writing to the backend failed.
    BackendError(io::Error),
}

/// What a tunnel did.
#[derive(Debug)]
pub struct TunnelReport {
    /// Bytes read from the client (and written to the backend, unless the tunnel failed).
    pub to_backend: u64,
    /// Bytes read from the backend (and written to the client, unless the tunnel failed).
    pub to_client: u64,
    pub end: TunnelEnd,
}

impl TunnelReport {
    /// For the access log line ([`crate::route::record`]).
    pub(crate) fn closed(&self) -> TunnelClosed {
        TunnelClosed {
            end: match self.end {
                TunnelEnd::ClientClosed => "client",
                TunnelEnd::BackendClosed => "backend",
                TunnelEnd::IdleTimeout => "idle_timeout",
                TunnelEnd::ClientError(_) => "client_error",
                TunnelEnd::BackendError(_) => "backend_error",
            },
            to_backend: self.to_backend,
            to_client: self.to_client,
        }
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
    fn new(pending: Vec<u8>) -> Self {
        // An empty buffer handed over (the front's read buffer) keeps no capacity: an idle
        // tunnel holds no memory of its own.
        let pending = if pending.is_empty() {
            Vec::new()
        } else {
            pending
        };
        Half {
            bytes: pending.len() as u64,
            pending,
            pos: 0,
            // The 101 itself may still sit in the client writer's buffer.
            unflushed: true,
            eof: false,
        }
    }

    /// Move bytes from `from` to `to` until either would wait. `Ready(Ok)`: `from` ended and
    /// everything it sent is flushed to `to`.
    fn poll_copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        buf: &mut [u8],
    ) -> Poll<Result<(), Fail>> {
        loop {
            while self.pos < self.pending.len() {
                match Pin::new(&mut *to).poll_write(cx, &self.pending[self.pos..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Fail::Write(io::ErrorKind::WriteZero.into())));
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
                        return Poll::Ready(Err(Fail::Write(io::ErrorKind::WriteZero.into())));
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

/// Copy both ways between `client` and `backend` until either side ends, a socket fails, or
/// nothing moved for `idle_timeout`. `client_early`/`backend_early`: bytes already read from
/// each side past the upgrade (a backend that speaks first, like Engine.IO, sends with its 101).
pub async fn run<C, B>(
    mut down: C,
    mut up: B,
    client_early: Vec<u8>,
    backend_early: Vec<u8>,
    idle_timeout: Option<Duration>,
) -> TunnelReport
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut to_up = Half::new(client_early);
    let mut to_down = Half::new(backend_early);
    let mut last_moved = started;
    let mut idle = idle_timeout.map(|t| (t, Box::pin(tokio::time::sleep_until(started + t))));

    let end = poll_fn(|cx| {
        let moved = to_up.bytes + to_down.bytes;
        let copied = COPY_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if let Poll::Ready(r) = to_up.poll_copy(cx, &mut down, &mut up, &mut buf) {
                return Poll::Ready(match r {
                    Ok(()) => TunnelEnd::ClientClosed,
                    Err(Fail::Read(e)) => TunnelEnd::ClientError(e),
                    Err(Fail::Write(e)) => TunnelEnd::BackendError(e),
                });
            }
            if let Poll::Ready(r) = to_down.poll_copy(cx, &mut up, &mut down, &mut buf) {
                return Poll::Ready(match r {
                    Ok(()) => TunnelEnd::BackendClosed,
                    Err(Fail::Read(e)) => TunnelEnd::BackendError(e),
                    Err(Fail::Write(e)) => TunnelEnd::ClientError(e),
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
        to_backend: to_up.bytes,
        to_client: to_down.bytes,
        end,
    }
}
