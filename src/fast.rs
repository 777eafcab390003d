//! tether's lean HTTP/1 path: the common request, proxied without Pingora's HTTP machinery.
//!
//! Every client connection starts here. A request that is a plain HTTP/1.1 `GET` or `HEAD` (no
//! body, no upgrade, no `Expect`, an origin-form target, within the head limits, not an Engine.IO
//! handshake) is routed by the same code as Pingora's path ([`State::first_choice`], the pin
//! cache, Redis, retries, passive ejection) and then forwarded with its head parsed once in place
//! (`httparse`, no header map), written to a pooled backend connection in one write, and the
//! response head relayed the same way, body bytes streamed as they come. Anything else (a body, a
//! WebSocket upgrade, HTTP/1.0, a malformed or oversized head) goes to Pingora's proxy
//! ([`crate::routing::Router`]) with the bytes already read put back in front of the socket;
//! the connection comes back here for its next request.
//!
//! Why: under keep-alive GETs Pingora 0.9 spent ~98k instructions per request, most of them in its
//! per-request session objects, header maps and the boxed request future (tests/bench/README.md).
//!
//! Behaviour matches Pingora's path: `X-Forwarded-For` appended, `X-Forwarded-Proto: http`,
//! `Connection: keep-alive|close` on every response (the backend's `Connection` and `Keep-Alive`
//! headers describe its own connection and are dropped), Pingora's error answers (502, 503,
//! 504) with `Connection: close`, the same metrics and access log line ([`record`]).

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, Stream};
use pingora::proxy::{HttpProxy, SHUTDOWN_READ_GRACE};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::affinity::{SessionKey, is_engine_io_handshake};
use crate::backend::{ActiveGuard, Backend, BackendKey, now_ms};
use crate::metrics::UpstreamError;
use crate::routing::{
    Outcome, Router, connect_failed, count_upstream_error, insert_cookie, record,
    upstream_error_kind,
};
use crate::state::{Live, State};

/// Bytes read from a backend at a time, and the most a response head may take.
const UPSTREAM_READ: usize = 16 * 1024;
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 256;
/// Header slots tried first when parsing a head.
const FEW_HEADERS: usize = 24;

/// The proxy service's app: the lean path in front of Pingora's proxy.
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

/// What became of one request on the lean path.
enum Next {
    /// Served; the client connection may carry another request.
    KeepAlive,
    /// Served (or failed); the client connection closes.
    Close,
    /// Not for this path: Pingora's proxy takes the request (the bytes read so far stay).
    Pingora,
}

/// One client connection.
struct Client {
    stream: Box<L4Stream>,
    /// Bytes read and not yet consumed: the head being parsed, then any pipelined request.
    buf: Vec<u8>,
    peer_ip: Option<IpAddr>,
    /// `peer_ip` as text, formatted once per connection for `X-Forwarded-For`.
    peer_text: Option<Box<str>>,
    /// The connection carried a request before: the first waits `client_header_timeout` for its
    /// head, later ones the keep-alive idle time on top.
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
        if !stream.as_any().is::<L4Stream>() {
            // Not a plain socket (tether listens on TCP only): Pingora's proxy serves it.
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let stream = stream
            .into_any()
            .downcast::<L4Stream>()
            .expect("checked to be a plain stream");
        let peer_ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut client = Client {
            stream,
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
                Next::Pingora => {
                    let buf = std::mem::take(&mut client.buf);
                    client.stream = self.pingora(client.stream, &buf, shutdown).await?;
                    client.reused = true;
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
    /// back in front; the connection comes back if it stays open.
    async fn pingora(
        &self,
        mut stream: Box<L4Stream>,
        read: &[u8],
        shutdown: &ShutdownWatch,
    ) -> Option<Box<L4Stream>> {
        stream.rewind(read);
        let mut session = ServerSession::new_http1(stream);
        // As Pingora's own accept path does: its request filter then bounds the idle time.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let reused = HttpServerApp::process_new_http(&self.proxy, session, shutdown).await?;
        let (stream, _) = reused.consume();
        stream.into_any().downcast::<L4Stream>().ok()
    }

    /// Read, route and forward one request.
    async fn serve(&self, c: &mut Client) -> Next {
        // The limits while waiting come from the configuration in force then; the request runs
        // under the one in force when its head is in (a reload may come in between).
        let (deadline, max_head) = {
            let waiting = self.state.live();
            let server = &waiting.config.server;
            let limit = if c.reused {
                server.client_header_timeout + server.keepalive_timeout
            } else {
                server.client_header_timeout
            };
            (Instant::now() + limit, server.max_request_header_bytes)
        };
        // Wait for the blank line that ends the head; a request line that cannot be one, or a head
        // past the limit, goes to Pingora at once (it answers 400, 414 or 431).
        let head_len = loop {
            if let Some(n) = head_end(&c.buf) {
                break n;
            }
            if !c.buf.is_empty() {
                let mut none = [];
                let start = httparse::Request::new(&mut none).parse(&c.buf);
                if matches!(start, Err(e) if e != httparse::Error::TooManyHeaders)
                    || c.buf.len() > max_head
                {
                    return Next::Pingora;
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
        // The few slots live in the connection's task (no allocation per request).
        let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
        let mut many;
        let mut req = httparse::Request::new(&mut few);
        let mut parsed = req.parse(head);
        if parsed == Err(httparse::Error::TooManyHeaders) {
            many = vec![httparse::EMPTY_HEADER; server.max_request_headers];
            req = httparse::Request::new(&mut many);
            parsed = req.parse(head);
        }
        if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
            // Malformed, or more headers than allowed.
            return Next::Pingora;
        }
        let Some(plain) = Plain::of(&req, head_len, &live) else {
            return Next::Pingora;
        };
        let started = std::time::Instant::now();
        let closing = plain.client_close
            || self.state.stopping.load(Ordering::Relaxed)
            || *c.shutdown.borrow();
        let path = req.path.unwrap_or("/");
        let (route_path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let now = now_ms();
        let (key, first) = self
            .state
            .first_choice(&live, &*req.headers, query, c.peer_ip, now)
            .await;
        let upstream_request = upstream_request(&req, c.peer_text.as_deref());
        let mut ex = Exchange {
            state: &self.state,
            live: &live,
            key: key.as_ref(),
            head: plain.head,
            closing,
            attempts: 0,
            failed: Vec::new(),
        };
        let Served {
            guard,
            status,
            error,
            keep_alive,
        } = ex.run(first, &upstream_request, &mut c.stream).await;
        let next = if keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        };
        record(Outcome {
            live: &live,
            key: key.as_ref(),
            backend: guard.as_ref(),
            attempts: ex.attempts,
            started,
            upgraded: false,
            client: c.peer_ip,
            method: if plain.head {
                &http::Method::HEAD
            } else {
                &http::Method::GET
            },
            path: route_path,
            status,
            error: error.as_ref(),
            tunnel: None,
        });
        drop(guard);
        if matches!(next, Next::KeepAlive) {
            c.buf.drain(..head_len);
        }
        next
    }
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
        tokio::time::sleep(SHUTDOWN_READ_GRACE).await;
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

/// A request the lean path takes, and what it needs to know about it.
struct Plain {
    head: bool,
    /// The client asked to close after this response.
    client_close: bool,
}

impl Plain {
    fn of(req: &httparse::Request<'_, '_>, head_len: usize, live: &Live) -> Option<Plain> {
        let server = &live.config.server;
        if req.version != Some(1) || head_len > server.max_request_header_bytes {
            return None;
        }
        let head = match req.method? {
            "GET" => false,
            "HEAD" => true,
            _ => return None,
        };
        let path = req.path?;
        if !path.starts_with('/') {
            return None;
        }
        let mut client_close = false;
        for h in req.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("upgrade")
                || name.eq_ignore_ascii_case("expect")
            {
                return None;
            }
            if name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        client_close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return None;
                    }
                }
            }
        }
        let query = path.split_once('?').map(|(_, q)| q);
        if live.engine_io_source.is_some() && is_engine_io_handshake(query) {
            // Its response body teaches the pin: Pingora's path reads it.
            return None;
        }
        Some(Plain { head, client_close })
    }
}

/// The request as the backend gets it: the client's headers in their order and spelling, then
/// `X-Forwarded-For` (the client's values, folded, and the peer address) and
/// `X-Forwarded-Proto: http`.
fn upstream_request(req: &httparse::Request<'_, '_>, peer: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.push(h.value);
            continue;
        }
        if h.name.eq_ignore_ascii_case("x-forwarded-proto") {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(ip) = peer {
        out.extend_from_slice(b"x-forwarded-for: ");
        for v in forwarded_for {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ip.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-proto: http\r\n\r\n");
    out
}

/// How a request ended on the lean path.
struct Served {
    /// The backend of the last attempt (`None`: none was available).
    guard: Option<ActiveGuard>,
    status: u16,
    error: Option<ErrorType>,
    keep_alive: bool,
}

/// One request's attempts at backends.
struct Exchange<'a> {
    state: &'a State,
    live: &'a Live,
    key: Option<&'a SessionKey>,
    head: bool,
    /// The client connection closes after this response.
    closing: bool,
    attempts: usize,
    /// Backends whose connect failed during this request.
    failed: Vec<BackendKey>,
}

/// Why an attempt failed before anything reached the client.
enum Failed {
    Connect(io::Error),
    /// The backend's connection closed (or reset) before a response head: it cannot have
    /// answered; an idempotent request may go again.
    ClosedEarly(io::Error),
    Timeout,
    Protocol(&'static str),
}

impl Exchange<'_> {
    async fn run(
        &mut self,
        first: Option<Arc<Backend>>,
        request: &[u8],
        client: &mut L4Stream,
    ) -> Served {
        let upstream = &self.live.config.upstream;
        let mut backend = first;
        let mut fresh = false;
        loop {
            let Some(b) = backend.take() else {
                let served = Served {
                    guard: None,
                    status: 503,
                    error: Some(ErrorType::HTTPStatus(503)),
                    keep_alive: false,
                };
                return self.answer_error(client, served).await;
            };
            self.attempts += 1;
            let guard = b.track();
            let pooled = if fresh { None } else { pool::take(&b) };
            let reused = pooled.is_some();
            let conn = match pooled {
                Some(s) => Ok(s),
                None => connect(&b, upstream.connect_timeout).await,
            };
            let failure = match conn {
                Ok(mut up) => match self.forward(&b, &mut up, request, client).await {
                    Ok((status, keep_upstream, keep_client)) => {
                        if keep_upstream {
                            pool::put(
                                &b,
                                up,
                                self.live.config.server.upstream_keepalive_pool,
                                upstream.idle_timeout,
                            );
                        }
                        return Served {
                            guard: Some(guard),
                            status,
                            error: None,
                            keep_alive: keep_client,
                        };
                    }
                    Err(Relay::Before(f)) => f,
                    Err(Relay::After {
                        status,
                        error,
                        backend,
                    }) => {
                        // Part of the response went out: nothing to answer, nothing to retry.
                        if backend {
                            count_upstream_error(&b, upstream_error_kind(&error));
                        }
                        return Served {
                            guard: Some(guard),
                            status,
                            error: Some(error),
                            keep_alive: false,
                        };
                    }
                },
                Err(e) => Failed::Connect(e),
            };
            match failure {
                Failed::Connect(e) => {
                    if connect_failed(self.live, &b, &mut self.failed, &e) {
                        drop(guard);
                        backend = self
                            .state
                            .after_connect_failure(self.live, self.key, &b, &self.failed, now_ms())
                            .await;
                        fresh = false;
                        continue;
                    }
                    count_upstream_error(&b, UpstreamError::Connect);
                    let etype = match e.kind() {
                        io::ErrorKind::TimedOut => ErrorType::ConnectTimedout,
                        io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                        _ => ErrorType::ConnectError,
                    };
                    return self
                        .answer_error(client, failed_with(guard, 502, etype))
                        .await;
                }
                Failed::ClosedEarly(e) => {
                    // A pooled connection the backend had closed (Pingora resends those too),
                    // or a fresh one closed under the request: send it again, to the same
                    // backend, on a new connection. GET and HEAD are idempotent.
                    // At most `connect_retries` + 2 tries in all, as README says.
                    let resend = if reused {
                        self.attempts <= upstream.connect_retries + 1
                    } else {
                        self.attempts <= upstream.connect_retries
                    };
                    if resend {
                        if !reused {
                            warn!(backend = %b.id, error = %e, "connection closed before the response; retrying the idempotent request");
                        }
                        drop(guard);
                        backend = Some(b);
                        fresh = true;
                        continue;
                    }
                    count_upstream_error(&b, UpstreamError::Closed);
                    return self
                        .answer_error(client, failed_with(guard, 502, ErrorType::ConnectionClosed))
                        .await;
                }
                Failed::Timeout => {
                    count_upstream_error(&b, UpstreamError::Timeout);
                    return self
                        .answer_error(client, failed_with(guard, 504, ErrorType::ReadTimedout))
                        .await;
                }
                Failed::Protocol(why) => {
                    warn!(backend = %b.id, error = why, "invalid response from the backend");
                    count_upstream_error(&b, UpstreamError::Protocol);
                    return self
                        .answer_error(
                            client,
                            failed_with(guard, 502, ErrorType::InvalidHTTPHeader),
                        )
                        .await;
                }
            }
        }
    }

    /// Pingora's error answer (its path answers the same way), and the client connection closes.
    async fn answer_error(&self, client: &mut L4Stream, served: Served) -> Served {
        let reason = http::StatusCode::from_u16(served.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let date = pingora::protocols::http::date::get_cached_date();
        let mut out = Vec::with_capacity(192);
        std::io::Write::write_fmt(
            &mut out,
            format_args!(
                "HTTP/1.1 {} {reason}\r\nserver: Pingora\r\ndate: ",
                served.status
            ),
        )
        .expect("writing to a Vec cannot fail");
        out.extend_from_slice(date.as_bytes());
        out.extend_from_slice(
            b"\r\ncontent-length: 0\r\ncache-control: private, no-store\r\nconnection: close\r\n\r\n",
        );
        if let Err(e) = write_flush(client, &out).await {
            debug!(error = %e, "could not send the error response");
        }
        Served {
            keep_alive: false,
            ..served
        }
    }

    /// Send the request on `up` and relay the response to the client. `Ok((status, upstream
    /// reusable, client keeps alive))`.
    async fn forward(
        &self,
        b: &Backend,
        up: &mut TcpStream,
        request: &[u8],
        client: &mut L4Stream,
    ) -> Result<(u16, bool, bool), Relay> {
        let upstream = &self.live.config.upstream;
        match tokio::time::timeout(upstream.write_timeout, up.write_all(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Relay::Before(Failed::ClosedEarly(e))),
            Err(_) => return Err(Relay::Before(Failed::Timeout)),
        }
        let mut buf: Vec<u8> = Vec::with_capacity(UPSTREAM_READ);
        loop {
            // Read until a complete head is there.
            let head_len = loop {
                if let Some(n) = head_end(&buf) {
                    break n;
                }
                if !buf.is_empty() {
                    let mut none = [];
                    let start = parse_response_into(&mut httparse::Response::new(&mut none), &buf);
                    if matches!(start, Err(e) if e != httparse::Error::TooManyHeaders) {
                        return Err(Relay::Before(Failed::Protocol("malformed head")));
                    }
                    if buf.len() > MAX_RESPONSE_HEAD {
                        return Err(Relay::Before(Failed::Protocol("response head too large")));
                    }
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(UPSTREAM_READ);
                }
                match tokio::time::timeout(upstream.read_timeout, up.read_buf(&mut buf)).await {
                    Ok(Ok(0)) if buf.is_empty() => {
                        return Err(Relay::Before(Failed::ClosedEarly(
                            io::ErrorKind::UnexpectedEof.into(),
                        )));
                    }
                    Ok(Ok(0)) => {
                        return Err(Relay::Before(Failed::Protocol(
                            "connection closed inside the response head",
                        )));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if buf.is_empty() => {
                        return Err(Relay::Before(Failed::ClosedEarly(e)));
                    }
                    Ok(Err(_)) => {
                        return Err(Relay::Before(Failed::Protocol(
                            "connection failed inside the response head",
                        )));
                    }
                    Err(_) => return Err(Relay::Before(Failed::Timeout)),
                }
            };
            let head = &buf[..head_len];
            let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
            let mut many;
            let mut resp = httparse::Response::new(&mut few);
            let mut parsed = parse_response_into(&mut resp, head);
            if parsed == Err(httparse::Error::TooManyHeaders) {
                many = vec![httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                resp = httparse::Response::new(&mut many);
                parsed = parse_response_into(&mut resp, head);
            }
            if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
                return Err(Relay::Before(Failed::Protocol("malformed head")));
            }
            let status = resp.code.unwrap_or(0);
            if status == 101 {
                return Err(Relay::Before(Failed::Protocol(
                    "101 to a request that did not ask to upgrade",
                )));
            }
            if (100..200).contains(&status) {
                // Informational (103 Early Hints): relayed as is; 100 Continue was not asked for.
                if status != 100
                    && let Err(e) = write_flush(client, head).await
                {
                    debug!(error = %e, "client write failed");
                    return Err(Relay::After {
                        status,
                        error: ErrorType::WriteError,
                        backend: false,
                    });
                }
                buf.drain(..head_len);
                continue;
            }
            let framing = match Framing::of(&resp, self.head, status) {
                Ok(f) => f,
                Err(why) => return Err(Relay::Before(Failed::Protocol(why))),
            };
            let backend_close = resp.version != Some(1)
                || resp
                    .headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("connection") && has_close(h.value));
            let keep_client = !self.closing && !matches!(framing, Framing::UntilClose);
            // Learn pins from the app's Set-Cookie before the client can send its next request.
            let set_cookies = resp
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("set-cookie"))
                .map(|h| h.value);
            self.state
                .learn(self.live, set_cookies, b, self.key.map(|k| k.hash))
                .await;
            let mut out = Vec::with_capacity(head_len + 256);
            out.extend_from_slice(b"HTTP/1.1 ");
            // httparse gives three digits: always a valid status code.
            let code = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
            out.extend_from_slice(code.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
            out.extend_from_slice(b"\r\n");
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("connection")
                    || h.name.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
            if let Some(cookie) = self.key.and_then(|k| insert_cookie(self.live, k, b)) {
                out.extend_from_slice(b"set-cookie: ");
                out.extend_from_slice(cookie.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(if keep_client {
                b"connection: keep-alive\r\n\r\n"
            } else {
                b"connection: close\r\n\r\n"
            });
            let relayed = relay_body(
                framing,
                &mut buf,
                head_len,
                out,
                up,
                client,
                upstream.read_timeout,
            )
            .await
            .map_err(|e| match e {
                // The first body bytes were already bad: nothing went out, answer 502.
                BodyError::BeforeHead => Relay::Before(Failed::Protocol("invalid chunk")),
                BodyError::Client => Relay::After {
                    status,
                    error: ErrorType::WriteError,
                    backend: false,
                },
                BodyError::Backend(error) => Relay::After {
                    status,
                    error,
                    backend: true,
                },
            })?;
            return Ok((status, relayed && !backend_close, keep_client));
        }
    }
}

fn failed_with(guard: ActiveGuard, status: u16, error: ErrorType) -> Served {
    Served {
        guard: Some(guard),
        status,
        error: Some(error),
        keep_alive: false,
    }
}

/// An attempt that failed: before the client got anything (it may be retried or answered), or
/// after part of the response went out, by the backend's fault (counted in
/// `tether_upstream_errors_total`) or the client's.
enum Relay {
    Before(Failed),
    After {
        status: u16,
        error: ErrorType,
        backend: bool,
    },
}

/// A client write failure (the client went away): not the backend's.
fn client_error(e: io::Error) -> BodyError {
    debug!(error = %e, "client write failed");
    BodyError::Client
}

/// Where the head at the start of `buf` ends (after its blank line), if it is all there. Bare
/// LF line ends count, as httparse (and Pingora) accept them.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|b| *b == b'\n') {
        let at = from + i;
        match buf.get(at + 1..at + 3) {
            Some([b'\r', b'\n']) => return Some(at + 3),
            Some([b'\n', _]) => return Some(at + 2),
            None if buf.get(at + 1) == Some(&b'\n') => return Some(at + 2),
            _ => {}
        }
        from = at + 1;
    }
    None
}

/// Pingora's leniencies for response heads: spaces before the colon, folded header lines.
fn parse_response_into<'b>(
    resp: &mut httparse::Response<'_, 'b>,
    buf: &'b [u8],
) -> httparse::Result<usize> {
    httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .parse_response(resp, buf)
}

fn has_close(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// How a response body ends.
#[derive(Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked(Chunked),
    /// Neither length nor chunked: the body runs until the backend closes (then so does the client).
    UntilClose,
}

impl Framing {
    fn of(
        resp: &httparse::Response<'_, '_>,
        head: bool,
        status: u16,
    ) -> Result<Framing, &'static str> {
        let mut length: Option<u64> = None;
        let mut chunked = None;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .unwrap_or(b"")
                    .trim_ascii();
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value.trim_ascii())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or("invalid Content-Length")?;
                if length.is_some_and(|l| l != v) {
                    return Err("conflicting Content-Length headers");
                }
                length = Some(v);
            }
        }
        if head || status == 204 || status == 304 {
            return Ok(Framing::None);
        }
        match (chunked, length) {
            (Some(_), Some(_)) => Err("both Transfer-Encoding and Content-Length"),
            (Some(true), None) => Ok(Framing::Chunked(Chunked::default())),
            (Some(false), None) | (None, None) => Ok(Framing::UntilClose),
            (None, Some(0)) => Ok(Framing::None),
            (None, Some(n)) => Ok(Framing::Length(n)),
        }
    }
}

/// A body that could not be relayed: found bad before its head was sent (`out` still unsent),
/// the client's write failed, or the backend failed after the head went out.
enum BodyError {
    BeforeHead,
    Client,
    Backend(ErrorType),
}

impl From<ErrorType> for BodyError {
    fn from(e: ErrorType) -> BodyError {
        BodyError::Backend(e)
    }
}

/// Send the response head (`out`) with the body bytes already read behind it (in `buf` after
/// `head_len`), then stream the rest of the body. `Ok(true)`: the message ended where the
/// framing said, so the backend connection may be reused.
async fn relay_body(
    mut framing: Framing,
    buf: &mut Vec<u8>,
    head_len: usize,
    mut out: Vec<u8>,
    up: &mut TcpStream,
    client: &mut L4Stream,
    read_timeout: Duration,
) -> Result<bool, BodyError> {
    let mut start = head_len;
    loop {
        let chunk = &buf[start..];
        let (take, done) = match &mut framing {
            Framing::None => (0, true),
            Framing::Length(left) => {
                let n = (*left).min(chunk.len() as u64) as usize;
                *left -= n as u64;
                (n, *left == 0)
            }
            Framing::Chunked(c) => {
                let n = c.advance(chunk).map_err(|_| {
                    if out.is_empty() {
                        BodyError::Backend(ErrorType::new("InvalidChunk"))
                    } else {
                        BodyError::BeforeHead
                    }
                })?;
                (n, c.done())
            }
            Framing::UntilClose => (chunk.len(), false),
        };
        // Bytes past the end of the message: the backend sent more than it framed.
        let overrun = done && take < chunk.len();
        if out.is_empty() {
            write_flush(client, &chunk[..take])
                .await
                .map_err(client_error)?;
        } else {
            out.extend_from_slice(&chunk[..take]);
            write_flush(client, &out).await.map_err(client_error)?;
            out = Vec::new();
        }
        if done {
            return Ok(!overrun);
        }
        buf.clear();
        start = 0;
        buf.reserve(UPSTREAM_READ);
        match tokio::time::timeout(read_timeout, up.read_buf(buf)).await {
            Ok(Ok(0)) => {
                return if matches!(framing, Framing::UntilClose) {
                    Ok(false)
                } else {
                    Err(ErrorType::ConnectionClosed.into())
                };
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "backend read failed inside the body");
                return Err(ErrorType::ReadError.into());
            }
            Err(_) => return Err(ErrorType::ReadTimedout.into()),
        }
    }
}

async fn write_flush(client: &mut L4Stream, bytes: &[u8]) -> io::Result<()> {
    if !bytes.is_empty() {
        client.write_all(bytes).await?;
    }
    client.flush().await
}

async fn connect(b: &Backend, timeout: Duration) -> io::Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(b.addr)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Chunked transfer coding, tracked byte by byte so that the body is relayed as it came and the
/// end of the message is known (then the backend connection can be reused).
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (an empty one ends the message).
    TrailerStart,
    TrailerLine,
    EndLf,
    Done,
}

#[derive(Debug)]
struct BadChunk;

impl Chunked {
    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consume the bytes of `input` that belong to the message; returns how many.
    fn advance(&mut self, input: &[u8]) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 15 {
                            return Err(BadChunk);
                        }
                        let d = (b as char).to_digit(16).expect("a hex digit") as u64;
                        self.size = self.size * 16 + d;
                        self.digits += 1;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = ChunkState::Extension,
                    b'\r' if self.digits > 0 => self.state = ChunkState::SizeLf,
                    b'\n' if self.digits > 0 => self.end_size_line(),
                    _ => return Err(BadChunk),
                },
                ChunkState::Extension => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.end_size_line(),
                    _ => {}
                },
                ChunkState::SizeLf => match b {
                    b'\n' => self.end_size_line(),
                    _ => return Err(BadChunk),
                },
                ChunkState::Data => {
                    let n = self.size.min((input.len() - i) as u64) as usize;
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    b'\n' => self.next_chunk(),
                    _ => return Err(BadChunk),
                },
                ChunkState::DataLf => match b {
                    b'\n' => self.next_chunk(),
                    _ => return Err(BadChunk),
                },
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::EndLf,
                    b'\n' => self.state = ChunkState::Done,
                    _ => self.state = ChunkState::TrailerLine,
                },
                ChunkState::TrailerLine => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::EndLf => match b {
                    b'\n' => self.state = ChunkState::Done,
                    _ => return Err(BadChunk),
                },
                ChunkState::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
    }

    fn next_chunk(&mut self) {
        self.state = ChunkState::Size;
        self.size = 0;
        self.digits = 0;
    }
}

/// Idle backend connections, per worker thread (each runs its own current-thread runtime, so a
/// connection never changes thread), most recently used first.
mod pool {
    use super::*;

    struct Idle {
        backend: BackendKey,
        addr: SocketAddr,
        expires: Instant,
        stream: TcpStream,
    }

    thread_local! {
        static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
        static SWEEPING: Cell<bool> = const { Cell::new(false) };
    }

    /// An idle connection to `b` that is still open, if there is one.
    pub(super) fn take(b: &Backend) -> Option<TcpStream> {
        let now = Instant::now();
        IDLE.with_borrow_mut(|idle| {
            while let Some(i) = idle
                .iter()
                .rposition(|c| c.backend == b.key && c.addr == b.addr)
            {
                let c = idle.remove(i);
                if c.expires <= now {
                    continue;
                }
                // Readable while idle means the backend closed it (or sent bytes nobody asked
                // for): not reusable. Costs no system call when tokio saw no event on it.
                let mut probe = [0u8; 1];
                match c.stream.try_read(&mut probe) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(c.stream),
                    _ => continue,
                }
            }
            None
        })
    }

    /// Keep `stream` for the next request to `b`, unless `cap` connections to it are idle.
    pub(super) fn put(b: &Backend, stream: TcpStream, cap: usize, idle_timeout: Duration) {
        let expires = Instant::now() + idle_timeout;
        let kept = IDLE.with_borrow_mut(|idle| {
            let count = idle.iter().filter(|c| c.backend == b.key).count();
            if count >= cap {
                return false;
            }
            idle.push(Idle {
                backend: b.key,
                addr: b.addr,
                expires,
                stream,
            });
            true
        });
        if kept && !SWEEPING.get() {
            SWEEPING.set(true);
            tokio::spawn(sweep());
        }
    }

    /// Close connections idle past their time, once a second, on this thread.
    async fn sweep() {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = Instant::now();
            IDLE.with_borrow_mut(|idle| idle.retain(|c| c.expires > now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked_len(input: &[u8]) -> Result<(usize, bool), BadChunk> {
        let mut c = Chunked::default();
        let n = c.advance(input)?;
        Ok((n, c.done()))
    }

    #[test]
    fn a_head_ends_at_its_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nGET"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nGET /next";
        assert_eq!(chunked_len(body).unwrap(), (body.len() - 9, true));
        let trailers = b"3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n";
        assert_eq!(chunked_len(trailers).unwrap(), (trailers.len(), true));
        // Bare LF line ends, as Pingora accepts them.
        assert_eq!(chunked_len(b"2\nab\n0\n\n").unwrap(), (8, true));
    }

    #[test]
    fn a_chunked_body_split_anywhere_gives_the_same_end() {
        let body = b"a\r\n0123456789\r\n1F\r\n0123456789012345678901234567890\r\n0\r\n\r\n";
        for cut in 0..body.len() {
            let mut c = Chunked::default();
            let a = c.advance(&body[..cut]).unwrap();
            assert_eq!(a, cut);
            assert!(!c.done(), "done early at {cut}");
            let b = c.advance(&body[cut..]).unwrap();
            assert_eq!(a + b, body.len());
            assert!(c.done());
        }
    }

    #[test]
    fn malformed_chunk_framing_is_refused() {
        assert!(chunked_len(b"zz\r\n").is_err());
        assert!(chunked_len(b"\r\n").is_err());
        assert!(chunked_len(b"3\r\nabcX").is_err());
        assert!(chunked_len(b"ffffffffffffffff\r\n").is_err());
    }

    fn framing(head: &[u8], is_head: bool) -> Result<Framing, &'static str> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(head).unwrap();
        let status = resp.code.unwrap();
        Framing::of(&resp, is_head, status)
    }

    #[test]
    fn response_framing_follows_the_headers() {
        let f = |h: &[u8]| format!("{:?}", framing(h, false));
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"),
            "Ok(Length(12))"
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            "Ok(None)"
        );
        assert!(
            f(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
                .starts_with("Ok(Chunked")
        );
        assert_eq!(f(b"HTTP/1.1 200 OK\r\n\r\n"), "Ok(UntilClose)");
        assert_eq!(
            f(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            "Ok(None)"
        );
        assert_eq!(f(b"HTTP/1.1 304 Not Modified\r\n\r\n"), "Ok(None)");
        assert!(
            f(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .starts_with("Err")
        );
        assert!(f(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").starts_with("Err"));
        assert!(
            f(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n")
                .starts_with("Err")
        );
        assert_eq!(
            format!(
                "{:?}",
                framing(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true)
            ),
            "Ok(None)"
        );
    }
}
