//! tether's lean HTTP/1 engine: requests without a body, proxied without Pingora's HTTP
//! machinery. It serves what [`super::Front`] gives it: HTTP/1.1 requests without a body
//! (plain requests, WebSocket upgrades, Engine.IO handshakes), their heads already checked by
//! [`crate::http::check_request`].
//!
//! A request is routed by [`crate::route`] (the pin cache, Redis, retries, passive ejection) and
//! forwarded with its head parsed once in place (`httparse`, no header map), written to a pooled
//! backend connection in one write; the response head is checked and relayed the same way, body
//! bytes streamed as they come, chunked bodies decoded strictly on the way (they are relayed as
//! they came). A `101` to an upgrade hands both sockets to a [`super::tunnel`]. An Engine.IO
//! handshake's `sid` is pinned (Redis written) before the body that carries it reaches the
//! client, whose next poll may reach another tether instance.
//!
//! Why: under keep-alive GETs Pingora 0.9 spent ~98k instructions per request, most of them in its
//! per-request session objects, header maps and the boxed request future (tests/bench/README.md).
//! Every decision (what to forward, framing, resends, error answers) is [`crate::http`]'s.

use std::cell::{Cell, RefCell};
use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use pingora::prelude::{ErrorSource, ErrorType};
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::affinity::{SessionKey, SidFound, SidSearch};
use crate::backend::{ActiveGuard, Backend, BackendKey, now_ms};
use crate::http::framing::{BadChunk, ChunkDecoder, ResponseBody};
use crate::http::headers::{forwarded_for, forwarded_proto};
use crate::http::{self, ErrorAnswer, MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS, Request};
use crate::route::{
    Outcome, Protocol, connect_failed, count_upstream_error, insert_cookie, record,
};
use crate::state::{Live, State, TunnelGuard};
use crate::upstream::{self, ConnectError, Upstream};

use super::tunnel;

/// Bytes read from a backend at a time.
const UPSTREAM_READ: usize = 16 * 1024;
/// Header slots tried first when parsing a head.
pub(super) const FEW_HEADERS: usize = 24;

/// One request for the lean engine.
pub(super) struct Job<'a, 'hs, 'b> {
    pub state: &'a State,
    pub live: &'a Live,
    pub req: &'a httparse::Request<'hs, 'b>,
    pub checked: &'a Request<'b>,
    /// The client connection closes after this response.
    pub closing: bool,
    pub peer: Option<std::net::IpAddr>,
    pub peer_text: Option<&'a str>,
    /// The client came over TLS.
    pub tls: bool,
    /// Its response body carries an Engine.IO `sid` to pin (key source index).
    pub engine_io: Option<usize>,
}

/// What became of a request.
pub(super) enum Done {
    KeepAlive,
    Close,
    /// Upgraded: the tunnel takes the client socket (and the bytes it sent past the head).
    Upgraded(Box<Upgraded>),
}

/// Serve one request. `client` is the client's socket.
pub(super) async fn serve(job: Job<'_, '_, '_>, client: &mut Stream) -> Done {
    let Job {
        state,
        live,
        req,
        checked,
        closing,
        peer,
        peer_text,
        tls,
        engine_io,
    } = job;
    let started = std::time::Instant::now();
    let target = checked.target;
    let (route_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let method = ::http::Method::from_bytes(req.method.unwrap_or("GET").as_bytes())
        .unwrap_or(::http::Method::GET);
    let (key, first) = state
        .first_choice(live, &*req.headers, query, peer, now_ms())
        .await;
    let upstream_request = upstream_request(req, checked, peer_text, tls);
    let mut ex = Exchange {
        state,
        live,
        key: key.as_ref(),
        head: method == ::http::Method::HEAD,
        idempotent: checked.idempotent,
        upgrade: checked.upgrade,
        closing,
        engine_io: engine_io.filter(|_| method == ::http::Method::GET),
        tls,
        attempts: 0,
        failed: Vec::new(),
    };
    let served = ex.run(first, &upstream_request, client).await;
    let attempts = ex.attempts;
    match served {
        Served::Done {
            guard,
            status,
            error,
            keep_alive,
        } => {
            record(Outcome {
                live,
                key: key.as_ref(),
                backend: guard.as_ref(),
                attempts,
                started,
                upgraded: false,
                client: peer,
                method: &method,
                path: route_path,
                status,
                error: error.as_ref(),
                tunnel: None,
                protocol: Protocol::Http11,
                tls,
            });
            if keep_alive {
                Done::KeepAlive
            } else {
                Done::Close
            }
        }
        Served::Upgraded {
            guard,
            upstream,
            early,
        } => {
            let tunnel = state
                .tunnels
                .open(key.as_ref().map(|k| k.hash), guard.backend().clone());
            Done::Upgraded(Box::new(Upgraded {
                upstream,
                early,
                idle_timeout: live.config.upstream.tunnel_timeout,
                log: UpgradeLog {
                    live: state.live_full(),
                    key,
                    guard,
                    tunnel,
                    attempts,
                    started,
                    client: peer,
                    method,
                    path: route_path.to_owned(),
                    tls,
                },
            }))
        }
    }
}

/// An upgraded connection, ready for its tunnel.
pub(super) struct Upgraded {
    upstream: Upstream,
    /// What the backend sent right behind its 101.
    early: Vec<u8>,
    idle_timeout: Duration,
    log: UpgradeLog,
}

/// What the upgraded request's log line needs, written when the tunnel closes; the backend stays
/// counted as in use (least-connections) and the key's pin alive until then.
struct UpgradeLog {
    live: Arc<Live>,
    key: Option<SessionKey>,
    guard: ActiveGuard,
    tunnel: TunnelGuard,
    attempts: usize,
    started: std::time::Instant,
    client: Option<std::net::IpAddr>,
    method: ::http::Method,
    path: String,
    tls: bool,
}

impl Upgraded {
    /// Run the tunnel in a task of its own (the connection's task ends: an idle WebSocket then
    /// costs its two sockets and little else). `client_early`: bytes the client sent past the
    /// upgrade request.
    pub(super) fn spawn(self, client: Stream, client_early: Vec<u8>) {
        tokio::spawn(async move {
            let Upgraded {
                upstream,
                early,
                idle_timeout,
                log,
            } = self;
            let report =
                tunnel::run(client, upstream, client_early, early, Some(idle_timeout)).await;
            let closed = report.closed();
            record(Outcome {
                live: &log.live,
                key: log.key.as_ref(),
                backend: Some(&log.guard),
                attempts: log.attempts,
                started: log.started,
                upgraded: true,
                client: log.client,
                method: &log.method,
                path: &log.path,
                status: 101,
                error: None,
                tunnel: Some(&closed),
                protocol: Protocol::Http11,
                tls: log.tls,
            });
            drop(log.tunnel);
        });
    }
}

/// The request as the backend gets it: the method and (origin-form) target, the authority of an
/// absolute-form target as `Host`, the client's fields in their order
/// and spelling less the hop-by-hop ones ([`Hop::request_keeps`]), `Connection: upgrade` for an
/// upgrade, then `X-Forwarded-For` and `X-Forwarded-Proto`.
fn upstream_request(
    req: &httparse::Request<'_, '_>,
    checked: &Request<'_>,
    peer: Option<&str>,
    tls: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(checked.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(authority) = checked.authority {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for h in req.headers.iter() {
        if !checked
            .hop
            .request_keeps(h.name, checked.upgrade, checked.authority.is_none())
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if checked.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if let Some(ip) = peer {
        let client_values = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
            .map(|h| h.value);
        out.extend_from_slice(b"x-forwarded-for: ");
        forwarded_for(&mut out, client_values, ip);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-proto: ");
    out.extend_from_slice(forwarded_proto(tls).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// How a request ended.
enum Served {
    Done {
        /// The backend of the last attempt (`None`: none was available).
        guard: Option<ActiveGuard>,
        status: u16,
        error: Option<ErrorType>,
        keep_alive: bool,
    },
    Upgraded {
        guard: ActiveGuard,
        upstream: Upstream,
        early: Vec<u8>,
    },
}

/// One request's attempts at backends.
struct Exchange<'a> {
    state: &'a State,
    live: &'a Live,
    key: Option<&'a SessionKey>,
    head: bool,
    idempotent: bool,
    upgrade: bool,
    /// The client connection closes after this response.
    closing: bool,
    engine_io: Option<usize>,
    /// The client came over TLS.
    tls: bool,
    attempts: usize,
    /// Backends whose connect failed during this request.
    failed: Vec<BackendKey>,
}

/// Why an attempt failed before anything reached the client.
enum Failed {
    Connect(ConnectError),
    /// The backend's connection closed (or reset) before a response head: it cannot have
    /// answered; an idempotent request may go again.
    ClosedEarly(io::Error),
    Timeout(ErrorType),
    Protocol(&'static str),
}

/// A response relayed (`Ok`), or a 101 that turned the connection into a tunnel.
enum Relayed {
    Response {
        status: u16,
        upstream_reusable: bool,
        keep_client: bool,
    },
    Upgraded {
        early: Vec<u8>,
    },
}

impl Exchange<'_> {
    async fn run(
        &mut self,
        first: Option<Arc<Backend>>,
        request: &[u8],
        client: &mut Stream,
    ) -> Served {
        let upstream = &self.live.config.upstream;
        let mut backend = first;
        let mut fresh = false;
        loop {
            let Some(b) = backend.take() else {
                return self
                    .answer_error(client, None, ErrorType::HTTPStatus(503))
                    .await;
            };
            self.attempts += 1;
            let guard = b.track();
            let peer = b.current_peer();
            let pooled = if fresh || self.upgrade {
                None
            } else {
                pool::take(&b, peer.reuse_hash)
            };
            let reused = pooled.is_some();
            let conn = match pooled {
                Some(s) => Ok(s),
                None => upstream::connect(&peer.peer).await,
            };
            let failure = match conn {
                Ok(mut up) => match self.forward(&b, &mut up, request, client).await {
                    Ok(Relayed::Response {
                        status,
                        upstream_reusable,
                        keep_client,
                    }) => {
                        if upstream_reusable {
                            pool::put(
                                &b,
                                peer.reuse_hash,
                                up,
                                self.state.upstream_keepalive_pool,
                                upstream.idle_timeout,
                            );
                        }
                        return Served::Done {
                            guard: Some(guard),
                            status,
                            error: None,
                            keep_alive: keep_client,
                        };
                    }
                    Ok(Relayed::Upgraded { early }) => {
                        return Served::Upgraded {
                            guard,
                            upstream: up,
                            early,
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
                            count_upstream_error(&b, http::upstream_kind(&error));
                        }
                        return Served::Done {
                            guard: Some(guard),
                            status,
                            error: Some(error),
                            keep_alive: false,
                        };
                    }
                },
                Err(e) => Failed::Connect(e),
            };
            let etype = match failure {
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
                    e.etype
                }
                Failed::ClosedEarly(e) => {
                    // A pooled connection the backend had closed, or a fresh one closed under
                    // the request: sent again, to the same backend, on a new connection, if
                    // the policy allows (idempotent, within the attempt budget).
                    if http::may_resend(
                        self.idempotent,
                        true,
                        reused,
                        self.attempts,
                        upstream.connect_retries,
                    ) {
                        if !reused {
                            warn!(backend = %b.id, error = %e, "connection closed before the response; retrying the idempotent request");
                        }
                        drop(guard);
                        backend = Some(b);
                        fresh = true;
                        continue;
                    }
                    ErrorType::ConnectionClosed
                }
                Failed::Timeout(etype) => etype,
                Failed::Protocol(why) => {
                    warn!(backend = %b.id, error = why, "invalid response from the backend");
                    ErrorType::InvalidHTTPHeader
                }
            };
            count_upstream_error(&b, http::upstream_kind(&etype));
            return self.answer_error(client, Some(guard), etype).await;
        }
    }

    /// tether's error answer for `etype` ([`crate::http::failure_status`]); the client
    /// connection closes.
    async fn answer_error(
        &self,
        client: &mut Stream,
        guard: Option<ActiveGuard>,
        etype: ErrorType,
    ) -> Served {
        let status = http::failure_status(&etype, &ErrorSource::Upstream);
        let send = self.live.config.server.client_send_timeout;
        write_error_answer(client, status, self.head, send).await;
        Served::Done {
            guard,
            status,
            error: Some(etype),
            keep_alive: false,
        }
    }

    /// Send the request on `up` and relay the response to the client.
    async fn forward(
        &self,
        b: &Backend,
        up: &mut Upstream,
        request: &[u8],
        client: &mut Stream,
    ) -> Result<Relayed, Relay> {
        let upstream = &self.live.config.upstream;
        match tokio::time::timeout(upstream.write_timeout, up.write_all(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Relay::Before(Failed::ClosedEarly(e))),
            Err(_) => return Err(Relay::Before(Failed::Timeout(ErrorType::WriteTimedout))),
        }
        let mut buf: Vec<u8> = Vec::with_capacity(UPSTREAM_READ);
        loop {
            // Read until a complete head is there.
            let head_len = loop {
                if let Some(n) = http::head_end(&buf) {
                    break n;
                }
                if !buf.is_empty() {
                    let mut none = [];
                    let start = http::parse_response(&mut httparse::Response::new(&mut none), &buf);
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
                    Err(_) => return Err(Relay::Before(Failed::Timeout(ErrorType::ReadTimedout))),
                }
            };
            let head = &buf[..head_len];
            let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
            let mut many;
            let mut resp = httparse::Response::new(&mut few);
            let mut parsed = http::parse_response(&mut resp, head);
            if parsed == Err(httparse::Error::TooManyHeaders) {
                many = vec![httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                resp = httparse::Response::new(&mut many);
                parsed = http::parse_response(&mut resp, head);
            }
            if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
                return Err(Relay::Before(Failed::Protocol("malformed head")));
            }
            let status = resp.code.unwrap_or(0);
            if (100..200).contains(&status) && status != 101 {
                // Informational (103 Early Hints): relayed as is; 100 Continue was not asked for.
                if status != 100
                    && let Err(e) =
                        write_flush(client, head, self.live.config.server.client_send_timeout).await
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
            let checked = http::check_response(&resp, self.head, self.upgrade)
                .map_err(|why| Relay::Before(Failed::Protocol(why)))?;
            let (framing, hop) = (checked.body, checked.hop);
            let backend_close = resp.version != Some(1) || hop.close;
            let keep_client = !self.closing && framing != ResponseBody::UntilClose;
            // Learn pins from the app's Set-Cookie before the client can send its next request.
            if checked.set_cookie {
                let set_cookies = resp
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("set-cookie"))
                    .map(|h| h.value);
                self.state
                    .learn(self.live, set_cookies, b, self.key.map(|k| k.hash))
                    .await;
            }
            let mut out = Vec::with_capacity(head_len + 256);
            out.extend_from_slice(b"HTTP/1.1 ");
            // httparse gives three digits: always a valid status code.
            let code =
                ::http::StatusCode::from_u16(status).unwrap_or(::http::StatusCode::BAD_GATEWAY);
            out.extend_from_slice(code.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
            out.extend_from_slice(b"\r\n");
            // tether's Connection goes where the backend's was (or last), a Date is added when
            // the backend sent none (RFC 9110 section 6.6.1): the same head as Pingora writes.
            let connection: &[u8] = if status == 101 {
                b"upgrade"
            } else if keep_client {
                b"keep-alive"
            } else {
                b"close"
            };
            let mut wrote_connection = false;
            let mut has_date = false;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("connection") {
                    if !wrote_connection {
                        out.extend_from_slice(b"Connection: ");
                        out.extend_from_slice(connection);
                        out.extend_from_slice(b"\r\n");
                        wrote_connection = true;
                    }
                    continue;
                }
                if !hop.response_keeps(h.name, status) {
                    continue;
                }
                has_date |= h.name.eq_ignore_ascii_case("date");
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
            if let Some(cookie) = self
                .key
                .and_then(|k| insert_cookie(self.live, k, b, self.tls))
            {
                out.extend_from_slice(b"set-cookie: ");
                out.extend_from_slice(cookie.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            if !has_date {
                out.extend_from_slice(b"Date: ");
                out.extend_from_slice(pingora::protocols::http::date::get_cached_date().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            if !wrote_connection {
                out.extend_from_slice(b"Connection: ");
                out.extend_from_slice(connection);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            if status == 101 {
                let send = self.live.config.server.client_send_timeout;
                write_flush(client, &out, send).await.map_err(|e| {
                    debug!(error = %e, "client write failed");
                    Relay::After {
                        status,
                        error: ErrorType::WriteError,
                        backend: false,
                    }
                })?;
                return Ok(Relayed::Upgraded {
                    early: buf[head_len..].to_vec(),
                });
            }
            let sniff = match self.engine_io {
                Some(source) if status == 200 => Some(EngineIo {
                    source,
                    search: SidSearch::default(),
                    backend: b,
                }),
                _ => None,
            };
            let relayed = relay_body(
                BodyRelay {
                    framing,
                    decoder: ChunkDecoder::default(),
                    sniff,
                    state: self.state,
                    live: self.live,
                },
                &mut buf,
                head_len,
                out,
                up,
                client,
            )
            .await
            .map_err(|e| match e {
                // The first body bytes were already bad: nothing went out, answer 502.
                BodyError::BeforeHead(why) => Relay::Before(Failed::Protocol(why)),
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
            return Ok(Relayed::Response {
                status,
                upstream_reusable: relayed && !backend_close,
                keep_client,
            });
        }
    }
}

/// Write tether's error answer for `status` ([`ErrorAnswer`]); `head`: no body (a HEAD request).
pub(super) async fn write_error_answer(
    client: &mut Stream,
    status: u16,
    head: bool,
    send_timeout: Duration,
) {
    let date = pingora::protocols::http::date::get_cached_date();
    let out = ErrorAnswer::new(status).to_bytes(date.to_str().unwrap_or(""), head);
    if let Err(e) = write_flush(client, &out, send_timeout).await {
        debug!(error = %e, "could not send the error response");
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

/// An Engine.IO handshake's body, searched for its `sid`.
struct EngineIo<'a> {
    source: usize,
    search: SidSearch,
    backend: &'a Backend,
}

/// A response body on its way: its framing, the decoder for a chunked one, and the Engine.IO
/// search.
struct BodyRelay<'a> {
    framing: ResponseBody,
    decoder: ChunkDecoder,
    sniff: Option<EngineIo<'a>>,
    state: &'a State,
    live: &'a Live,
}

impl BodyRelay<'_> {
    /// How many bytes of `chunk` belong to the message, and whether it ended with them.
    fn take(&mut self, chunk: &[u8], left: &mut u64) -> Result<(usize, bool), BadChunk> {
        let mut search = self.sniff.as_mut().map(|s| &mut s.search);
        let mut look = |data: &[u8]| {
            if let Some(search) = search.as_mut() {
                search.feed(data);
            }
        };
        Ok(match self.framing {
            ResponseBody::None => (0, true),
            ResponseBody::Length(_) => {
                let n = (*left).min(chunk.len() as u64) as usize;
                *left -= n as u64;
                look(&chunk[..n]);
                (n, *left == 0)
            }
            ResponseBody::Chunked => {
                let n = self.decoder.advance(chunk, &mut look)?;
                (n, self.decoder.done())
            }
            ResponseBody::UntilClose => {
                look(chunk);
                (chunk.len(), false)
            }
        })
    }

    /// Pin the handshake's `sid` once it is in, before the bytes carrying it go to the client.
    async fn pin_sid(&mut self, done: bool) {
        let Some(s) = &self.sniff else {
            return;
        };
        match s.search.found(done) {
            SidFound::Sid(sid) => {
                let key = self.live.extractor.hash_for(s.source, sid);
                self.state.learn_pin(key, s.backend, "engine.io").await;
                self.sniff = None;
            }
            SidFound::Never => self.sniff = None,
            SidFound::NotYet => {}
        }
    }
}

/// A body that could not be relayed: found bad before its head was sent (`out` still unsent),
/// the client's write failed, or the backend failed after the head went out.
enum BodyError {
    BeforeHead(&'static str),
    Client,
    Backend(ErrorType),
}

/// Send the response head (`out`) with the body bytes already read behind it (in `buf` after
/// `head_len`), then stream the rest of the body. `Ok(true)`: the message ended where the
/// framing said, so the backend connection may be reused.
async fn relay_body(
    mut body: BodyRelay<'_>,
    buf: &mut Vec<u8>,
    head_len: usize,
    mut out: Vec<u8>,
    up: &mut Upstream,
    client: &mut Stream,
) -> Result<bool, BodyError> {
    let read_timeout = body.live.config.upstream.read_timeout;
    let send_timeout = body.live.config.server.client_send_timeout;
    let mut start = head_len;
    let mut left = match body.framing {
        ResponseBody::Length(n) => n,
        _ => 0,
    };
    loop {
        let chunk = &buf[start..];
        let (take, done) = body.take(chunk, &mut left).map_err(|BadChunk(why)| {
            if out.is_empty() {
                BodyError::Backend(ErrorType::new("InvalidChunk"))
            } else {
                BodyError::BeforeHead(why)
            }
        })?;
        body.pin_sid(done).await;
        // Bytes past the end of the message: the backend sent more than it framed.
        let overrun = done && take < chunk.len();
        if out.is_empty() {
            write_flush(client, &chunk[..take], send_timeout)
                .await
                .map_err(client_error)?;
        } else {
            out.extend_from_slice(&chunk[..take]);
            write_flush(client, &out, send_timeout)
                .await
                .map_err(client_error)?;
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
                return if body.framing == ResponseBody::UntilClose {
                    Ok(false)
                } else {
                    Err(BodyError::Backend(ErrorType::ConnectionClosed))
                };
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "backend read failed inside the body");
                return Err(BodyError::Backend(ErrorType::ReadError));
            }
            Err(_) => return Err(BodyError::Backend(ErrorType::ReadTimedout)),
        }
    }
}

/// A client write failure (the client went away): not the backend's.
fn client_error(e: io::Error) -> BodyError {
    debug!(error = %e, "client write failed");
    BodyError::Client
}

/// Write `bytes` to the client and flush, within `send_timeout` (`client_send_timeout_ms`: a
/// client that stops reading is let go, as NGINX's `send_timeout`).
pub(super) async fn write_flush(
    client: &mut Stream,
    bytes: &[u8],
    send_timeout: Duration,
) -> io::Result<()> {
    let mut write = std::pin::pin!(async {
        if !bytes.is_empty() {
            client.write_all(bytes).await?;
        }
        client.flush().await
    });
    // Almost every write is taken by the socket at once: the timer (a clock read and a runtime
    // handle) only for one that has to wait.
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(done) => done,
        Poll::Pending => tokio::time::timeout(send_timeout, write)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
    }
}

/// Idle backend connections, per worker thread (each runs its own current-thread runtime, so a
/// connection never changes thread), most recently used first.
mod pool {
    use super::*;

    struct Idle {
        backend: BackendKey,
        /// The [`crate::backend::BackendPeer::reuse_hash`] of the peer it was made with.
        reuse_hash: u64,
        expires: Instant,
        stream: Upstream,
    }

    thread_local! {
        static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
        static SWEEPING: Cell<bool> = const { Cell::new(false) };
    }

    /// An idle connection to `b`'s peer of `reuse_hash` that is still open, if there is one.
    pub(super) fn take(b: &Backend, reuse_hash: u64) -> Option<Upstream> {
        let now = Instant::now();
        IDLE.with_borrow_mut(|idle| {
            while let Some(i) = idle
                .iter()
                .rposition(|c| c.backend == b.key && c.reuse_hash == reuse_hash)
            {
                let mut c = idle.remove(i);
                if c.expires > now && c.stream.idle_usable() {
                    return Some(c.stream);
                }
            }
            None
        })
    }

    /// Keep `stream` (made for `b`'s peer of `reuse_hash`) for the next request to `b`, unless
    /// `cap` connections to it are idle.
    pub(super) fn put(
        b: &Backend,
        reuse_hash: u64,
        stream: Upstream,
        cap: usize,
        idle_timeout: Duration,
    ) {
        let expires = Instant::now() + idle_timeout;
        let kept = IDLE.with_borrow_mut(|idle| {
            let count = idle.iter().filter(|c| c.backend == b.key).count();
            if count >= cap {
                return false;
            }
            idle.push(Idle {
                backend: b.key,
                reuse_hash,
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
