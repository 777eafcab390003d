//! The HTTP/1 engines and the front that gives each request to one of them.
//!
//! [`Front`] owns every client connection, plain or HTTP/1.1 over TLS (an HTTP/2 connection,
//! chosen by ALPN, goes to Pingora's proxy whole): it reads each request head (within
//! `client_header_timeout`, plus the keep-alive idle time on a reused connection, and a short
//! grace once tether is stopping), parses it strictly and checks it against the policy
//! ([`crate::http::check_request`]): a refused request gets tether's own error answer and the
//! connection closes. Then:
//! - [`lean`]: HTTP/1.1 requests without a body (plain requests, WebSocket upgrades and their
//!   [`tunnel`]s, Engine.IO handshakes), the common case, on tether's lean engine;
//! - [`pingora`]: requests with a body, and HTTP/1.0 (and with `[server] engine = "pingora"`,
//!   every plain request), on Pingora's proxy, through a [`BodyFence`] that hands it the bytes
//!   already read first; the connection comes back here for its next request.
//!
//! The engines share the routing core ([`crate::route`]) and the policy ([`crate::http`]); neither
//! imports the other.

pub mod lean;
pub mod pingora;
pub mod tunnel;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ::pingora::apps::{HttpServerApp, ServerApp};
use ::pingora::protocols::http::ServerSession;
use ::pingora::protocols::{ALPN, Stream};
use ::pingora::proxy::HttpProxy;
use ::pingora::server::ShutdownWatch;
use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tracing::debug;

use self::pingora::{BodyFence, Router};
use crate::affinity::{RequestHeaders, is_engine_io_handshake};
use crate::config::Engine;
use crate::http::framing::RequestBody;
use crate::http::{self, Refusal};
use crate::state::State;

/// The proxy service's app: the front of both engines.
pub struct Front {
    proxy: Arc<HttpProxy<Router>>,
    state: Arc<State>,
}

impl Front {
    pub fn new(proxy: HttpProxy<Router>, state: Arc<State>) -> Front {
        Front {
            proxy: Arc::new(proxy),
            state,
        }
    }
}

/// What became of one request.
enum Next {
    /// Served; the client connection may carry another request.
    KeepAlive,
    /// Served, refused or failed; the client connection closes.
    Close,
    /// Pingora's proxy takes it (the bytes read so far stay), through a [`BodyFence`] that
    /// knows where the message ends.
    Pingora { head_len: usize, body: RequestBody },
    /// Upgraded: the tunnel takes the socket.
    Upgraded(Box<lean::Upgraded>),
}

/// One client connection.
struct Client {
    /// A plain socket, or TLS over one (HTTP/1.1 by ALPN, or no ALPN).
    stream: Stream,
    /// The client came over TLS.
    tls: bool,
    /// It came to a `listen_redirect` listener: requests are redirected to HTTPS.
    redirect: bool,
    /// Bytes read and not yet consumed: the head being parsed, then any pipelined request.
    buf: Vec<u8>,
    peer_ip: Option<IpAddr>,
    /// `peer_ip` as text, formatted once per connection for `X-Forwarded-For`.
    peer_text: Option<Box<str>>,
    /// The connection carried a request before.
    reused: bool,
    shutdown: ShutdownWatch,
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            // HTTP/2 (a TLS listener, by ALPN): Pingora's proxy serves its streams.
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let tls = stream.get_ssl_digest().is_some();
        let digest = stream.get_socket_digest();
        let peer_ip = digest
            .as_ref()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        // A redirect listener is told apart by the local address (a getsockname per
        // connection, only when there are redirect listeners).
        let redirect = !tls && {
            let live = self.state.live();
            let redirects = &live.config.server.listen_redirect;
            !redirects.is_empty()
                && digest
                    .as_ref()
                    .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())
                    .is_some_and(|a| {
                        // A listener on 0.0.0.0 or [::] sees the address the client connected to.
                        redirects.iter().any(|r| {
                            r.port() == a.port() && (r.ip() == a.ip() || r.ip().is_unspecified())
                        })
                    })
        };
        let mut client = Client {
            stream,
            tls,
            redirect,
            buf: Vec::new(),
            peer_ip,
            peer_text: peer_ip.map(|ip| ip.to_string().into_boxed_str()),
            reused: false,
            shutdown: shutdown.clone(),
        };
        loop {
            match self.serve(&mut client).await {
                Next::KeepAlive => client.reused = true,
                Next::Close => return None,
                Next::Pingora { head_len, body } => {
                    let read = std::mem::take(&mut client.buf);
                    let (stream, rest) = self
                        .pingora(client.stream, read, head_len, body, shutdown)
                        .await?;
                    client.stream = stream;
                    // A pipelined request the fence kept from Pingora: the front reads it next.
                    client.buf = rest;
                    client.reused = true;
                }
                Next::Upgraded(upgraded) => {
                    let early = std::mem::take(&mut client.buf);
                    upgraded.spawn(client.stream, early);
                    return None;
                }
            }
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

impl Front {
    /// Hand one request to Pingora's proxy with `read` (the bytes taken off the socket so far) put
    /// back in front, behind a [`BodyFence`] that stops Pingora at the end of the request (so a
    /// pipelined request stays for the front) and checks a chunked body; the connection comes
    /// back if it stays open, with what the fence kept.
    async fn pingora(
        &self,
        stream: Stream,
        read: Vec<u8>,
        head_len: usize,
        body: RequestBody,
        shutdown: &ShutdownWatch,
    ) -> Option<(Stream, Vec<u8>)> {
        let io: Stream = Box::new(BodyFence::new(stream, read, head_len, body));
        let mut session = ServerSession::new_http1(io);
        // As Pingora's own accept path does: its request filter then bounds the idle time.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let reused = HttpServerApp::process_new_http(&self.proxy, session, shutdown).await?;
        let (stream, _) = reused.consume();
        let fence = stream.into_any().downcast::<BodyFence>().ok()?;
        Some(fence.into_parts())
    }

    /// Read and check one request head, then serve it or say who does.
    async fn serve(&self, c: &mut Client) -> Next {
        let (deadline, max_head) = {
            // The limits while waiting come from the configuration in force then; the request
            // runs under the one in force when its head is in (a reload may come in between).
            let waiting = self.state.live();
            let server = &waiting.config.server;
            (
                Instant::now() + http::head_timeout(server, c.reused),
                server.max_request_header_bytes,
            )
        };
        let head_len = loop {
            if let Some(n) = http::head_end(&c.buf) {
                break n;
            }
            if !c.buf.is_empty() {
                let mut none = [];
                let start = httparse::Request::new(&mut none).parse(&c.buf);
                if matches!(start, Err(e) if e != httparse::Error::TooManyHeaders) {
                    return self
                        .refuse(c, Refusal::bad_request("malformed request head"))
                        .await;
                }
                if c.buf.len() > max_head {
                    let line = c
                        .buf
                        .iter()
                        .position(|b| *b == b'\n')
                        .unwrap_or(c.buf.len());
                    let live = self.state.live();
                    let refusal = http::head_too_large(c.buf.len(), line, &live.config.server)
                        .expect("over the limit");
                    return self.refuse(c, refusal).await;
                }
            }
            match read_more(c, deadline).await {
                Ok(true) => {}
                Ok(false) => return Next::Close,
                Err(e) => {
                    debug!(error = %e, "client connection ended before a request head");
                    return Next::Close;
                }
            }
        };
        let live = self.state.live_full();
        let server = &live.config.server;
        let head = &c.buf[..head_len];
        // Few header slots first (filling them costs), as many as allowed if they do not do.
        let mut few = [httparse::EMPTY_HEADER; lean::FEW_HEADERS];
        let mut many;
        let mut req = httparse::Request::new(&mut few);
        let mut parsed = req.parse(head);
        if parsed == Err(httparse::Error::TooManyHeaders) {
            many = vec![httparse::EMPTY_HEADER; server.max_request_headers];
            req = httparse::Request::new(&mut many);
            parsed = req.parse(head);
        }
        let refusal = match parsed {
            Ok(httparse::Status::Complete(_)) => None,
            Err(httparse::Error::TooManyHeaders) => {
                Some(Refusal::new(431, "too many header fields"))
            }
            _ => Some(Refusal::bad_request("malformed request head")),
        };
        if let Some(r) = refusal {
            return self.refuse(c, r).await;
        }
        let checked = match http::check_request(&req, head_len, server) {
            Ok(r) => r,
            Err(r) => return self.refuse(c, r).await,
        };
        if c.redirect && http::redirects(checked.target) {
            let stopping = *c.shutdown.borrow();
            return match redirect_answer(&req, &checked, server, stopping) {
                Ok((answer, close)) => {
                    redirect(c, &answer, close, head_len, server.client_send_timeout).await
                }
                Err(refusal) => self.refuse(c, refusal).await,
            };
        }
        let query = checked.target.split_once('?').map(|(_, q)| q);
        let engine_io = live
            .engine_io_source
            .filter(|_| is_engine_io_handshake(query));
        let lean = checked.body == RequestBody::None
            && !checked.http10
            && (server.engine == Engine::Lean || checked.upgrade || engine_io.is_some());
        if !lean {
            return Next::Pingora {
                head_len,
                body: checked.body,
            };
        }
        let closing =
            checked.close || self.state.stopping.load(Ordering::Relaxed) || *c.shutdown.borrow();
        let job = lean::Job {
            state: &self.state,
            live: &live,
            req: &req,
            checked: &checked,
            closing,
            peer: c.peer_ip,
            peer_text: c.peer_text.as_deref(),
            tls: c.tls,
            engine_io,
        };
        let done = lean::serve(job, &mut c.stream).await;
        match done {
            lean::Done::KeepAlive => {
                c.buf.drain(..head_len);
                Next::KeepAlive
            }
            lean::Done::Close => Next::Close,
            lean::Done::Upgraded(u) => {
                c.buf.drain(..head_len);
                Next::Upgraded(u)
            }
        }
    }

    /// Answer a refused request head and close the connection.
    async fn refuse(&self, c: &mut Client, refusal: Refusal) -> Next {
        debug!(
            status = refusal.status,
            reason = refusal.reason,
            "request refused"
        );
        crate::route::count_unrouted(refusal.status);
        let head = c.buf.starts_with(b"HEAD ");
        let send = self.state.live().config.server.client_send_timeout;
        lean::write_error_answer(&mut c.stream, refusal.status, head, send).await;
        Next::Close
    }
}

/// Send a redirect listener's answer ([`redirect_answer`]); `close`: the connection closes
/// after it.
async fn redirect(
    c: &mut Client,
    answer: &[u8],
    close: bool,
    head_len: usize,
    send_timeout: std::time::Duration,
) -> Next {
    crate::route::count_unrouted(308);
    if lean::write_flush(&mut c.stream, answer, send_timeout)
        .await
        .is_err()
        || close
    {
        return Next::Close;
    }
    c.buf.drain(..head_len);
    Next::KeepAlive
}

/// A redirect listener's answer to a request: tether's redirect to HTTPS
/// ([`http::https_redirect`]) on the first TLS listener's port, and whether the connection
/// closes after it (a request with a body, which is not read, or one that asked to close).
fn redirect_answer(
    req: &httparse::Request<'_, '_>,
    checked: &http::Request<'_>,
    server: &crate::config::ServerSettings,
    stopping: bool,
) -> Result<(Vec<u8>, bool), Refusal> {
    // check_request let through one valid Host (ASCII) or an absolute-form authority. Looked up
    // here, on redirect listeners only, rather than carried by every request.
    let host = checked
        .authority
        .map(str::as_bytes)
        .or_else(|| req.headers.values("host").next().map(<[u8]>::trim_ascii))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or(Refusal::bad_request("no Host to redirect to"))?;
    let port = server.listen_tls.first().map_or(443, |a| a.port());
    let close = checked.close || checked.body != RequestBody::None || stopping;
    let date = ::pingora::protocols::http::date::get_cached_date();
    let bytes = http::https_redirect(
        host,
        checked.target,
        port,
        date.to_str().unwrap_or(""),
        close,
    );
    Ok((bytes, close))
}

/// Read more client bytes into the buffer before `deadline`. `Ok(false)`: the client closed, the
/// deadline passed, or tether is stopping and the grace for a pending request ran out.
async fn read_more(c: &mut Client, deadline: Instant) -> io::Result<bool> {
    if c.buf.capacity() - c.buf.len() < 1024 {
        c.buf.reserve(4096);
    }
    let shutdown = &mut c.shutdown;
    let stop = async {
        if !*shutdown.borrow() {
            // An error: the server is gone, as good as stopping.
            let _ = shutdown.changed().await;
        }
        tokio::time::sleep(http::SHUTDOWN_READ_GRACE).await;
    };
    tokio::select! {
        biased;
        read = tokio::time::timeout_at(deadline, c.stream.read_buf(&mut c.buf)) => match read {
            Ok(Ok(n)) => Ok(n > 0),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                debug!("client header timeout: closing the connection");
                Ok(false)
            }
        },
        _ = stop => Ok(false),
    }
}
