//! The Pingora engine: tether's [`ProxyHttp`] on the released `pingora-proxy`, for requests with
//! a body and HTTP/1.0 clients (and, with `[server] engine = "pingora"`, every plain request).
//! [`super::Front`] has already read and checked the request head ([`crate::http`]); Pingora
//! re-reads it from the bytes put back in front of the socket, streams the body, and owns the
//! upstream connection pool for these requests.
//!
//! What tether adds on Pingora's path, all from [`crate::http`] and [`crate::route`]: routing,
//! hop-by-hop removal and `X-Forwarded-*`, resends within the budget, failure statuses and
//! tether's own error answers, and two checks Pingora does not make:
//! - A chunked request body is checked by the same decoder as the lean engine's, on the socket
//!   ([`BodyFence`]): Pingora takes an empty chunk-size line (or `;ext` alone) for the last
//!   chunk and swallows a request line inside the trailers; such a body is answered 400 and the
//!   connection closed.
//! - A response whose framing Pingora would guess at is a 502: pingora-core frames by "the last
//!   token after the last comma" of the last `Transfer-Encoding` line, so `chunked,` or an empty
//!   second line made it read a chunked body as close-delimited while the client was told
//!   keep-alive (docs/upstream/pingora-te-last-token.md). A `101` is refused too: nothing on
//!   this path asked to upgrade (WebSockets take the lean engine).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

use crate::affinity::{KeyHash, SessionKey, SidFound, SidSearch, is_engine_io_handshake};
use crate::backend::{ActiveGuard, Backend, BackendKey, now_ms};
use crate::http::framing::{ChunkDecoder, RequestBody};
use crate::http::headers::{Hop, forwarded_for, forwarded_proto, joined_cookies};
use crate::http::{self, ErrorAnswer};
use crate::metrics::UpstreamError;
use crate::route::{
    Outcome, Protocol, connect_failed, count_upstream_error, insert_cookie, record,
};
use crate::state::{Live, State};

/// The Pingora proxy.
pub struct Router {
    pub state: Arc<State>,
}

/// Per-request state.
pub struct RequestCtx {
    /// The configuration this request runs under, start to end, whatever a reload does.
    live: Arc<Live>,
    key: Option<SessionKey>,
    /// The backend of the current attempt, counted as in flight while held.
    current: Option<ActiveGuard>,
    /// Backends whose connect failed during this request.
    failed: Vec<BackendKey>,
    attempts: usize,
    started: Instant,
    /// An Engine.IO handshake from an HTTP/1.0 client: the start of its response body, until
    /// the sid is found.
    engine_io: Option<SidSearch>,
    /// A response header arrived from a backend: from then on nothing may be retried.
    responded: bool,
    /// How the client speaks to tether and whether over TLS ([`client_side`]), read once in
    /// `request_filter`.
    client: Option<(Protocol, bool)>,
}

impl Router {
    async fn first_choice(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        now: u64,
    ) -> Option<Arc<Backend>> {
        let req = session.req_header();
        let live = ctx.live.clone();
        let (key, backend) = self
            .state
            .first_choice(
                &live,
                &req.headers,
                req.uri.query(),
                client_ip(session),
                now,
            )
            .await;
        ctx.key = key;
        backend
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The HTTP version the client speaks, and whether it reached tether over TLS (a `listen_tls`
/// listener).
fn client_side(session: &Session) -> (Protocol, bool) {
    let protocol = if session.as_downstream().is_http2() {
        Protocol::H2
    } else if session.req_header().version == ::http::Version::HTTP_10 {
        Protocol::Http10
    } else {
        Protocol::Http11
    };
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    (protocol, tls)
}

impl RequestCtx {
    fn client(&mut self, session: &Session) -> (Protocol, bool) {
        *self.client.get_or_insert_with(|| client_side(session))
    }
}

/// The request's chunked body failed [`BodyFence`]'s check.
fn body_refused(session: &Session) -> bool {
    session
        .as_downstream()
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<BodyFence>())
        .is_some_and(|c| c.refused.load(Ordering::Relaxed))
}

/// The hop-by-hop decisions for a message with these header fields ([`Hop::of`]).
fn hop_of(headers: &::http::HeaderMap) -> Option<Hop<'_>> {
    Hop::of(
        headers
            .get_all(::http::header::CONNECTION)
            .into_iter()
            .map(|v| v.as_bytes()),
    )
}

/// Refuse a response Pingora would frame by guessing, or a 101 nobody asked for: what the lean
/// engine refuses too.
fn check_response(resp: &ResponseHeader) -> std::result::Result<(), &'static str> {
    if resp.status == ::http::StatusCode::SWITCHING_PROTOCOLS {
        return Err("101 to a request that did not ask to upgrade");
    }
    let values = |name: ::http::header::HeaderName| {
        resp.headers.get_all(name).into_iter().map(|v| v.as_bytes())
    };
    // pingora-core removed a Content-Length sent beside Transfer-Encoding (RFC 9112 allows it
    // either way); what is left must be framing tether would accept.
    http::framing::response_body(
        resp.status.as_u16(),
        false,
        values(::http::header::CONTENT_LENGTH),
        values(::http::header::TRANSFER_ENCODING),
    )?;
    if !http::response_fields_valid(resp.headers.values().map(|v| v.as_bytes())) {
        return Err("folded (obs-fold) response header field");
    }
    hop_of(&resp.headers).ok_or("malformed Connection field")?;
    Ok(())
}

#[async_trait]
impl ProxyHttp for Router {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora's default adds its compression module, disabled, which
    /// still ran on every request and body chunk: tether compresses nothing.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            live: self.state.live_full(),
            key: None,
            current: None,
            failed: Vec::new(),
            attempts: 0,
            started: Instant::now(),
            engine_io: None,
            responded: false,
            client: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.client(session);
        // A client that stops reading (an HTTP/2 stream on a zero window, a full socket) is let
        // go after this, as on the lean engine.
        session.set_write_timeout(Some(ctx.live.config.server.client_send_timeout));
        if self.state.stopping.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() {
            // Pingora keeps an idle HTTP/1.1 connection forever; bound it. (The next head is
            // read by the front, which applies the same bound.)
            session.set_keepalive(Some(ctx.live.config.server.keepalive_timeout.as_secs()));
        }
        if ctx.live.engine_io_source.is_some()
            && is_engine_io_handshake(session.req_header().uri.query())
        {
            ctx.engine_io = Some(SidSearch::default());
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let now = now_ms();
        let live = ctx.live.clone();
        let previous = ctx.current.as_ref().map(|g| g.backend().clone());
        let chosen = match previous {
            None => self.first_choice(session, ctx, now).await,
            // A retry after a connect failure: move the pin (nothing was sent yet).
            Some(prev) if ctx.failed.contains(&prev.key) => {
                self.state
                    .after_connect_failure(&live, ctx.key.as_ref(), &prev, &ctx.failed, now)
                    .await
            }
            // A resend after the connection closed before any response: same backend.
            Some(prev) => Some(prev),
        };
        ctx.attempts += 1;
        let Some(backend) = chosen else {
            ctx.current = None;
            return Error::e_explain(ErrorType::HTTPStatus(503), "no backend available");
        };
        let peer = backend.peer();
        ctx.current = Some(backend.track());
        Ok(peer)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let Some(backend) = ctx.current.as_ref().map(|g| g.backend().clone()) else {
            return e;
        };
        let retry = connect_failed(&ctx.live, &backend, &mut ctx.failed, &e);
        e.set_retry(retry);
        e
    }

    /// A client that went away or broke the protocol (a reset HTTP/2 stream, a closed
    /// connection, a malformed frame) is no failure of tether's: no ERROR line for it, as the
    /// lean engine logs none (the access log has the request and its status); at debug it says
    /// what happened. Backend and internal failures keep Pingora's ERROR line.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        let client_side = *error.esource() == ErrorSource::Downstream;
        if client_side {
            debug!(%error, "the client's side of a request failed");
        }
        client_side
    }

    /// What Pingora's own warn/error lines say about a request: method, path and Host, never the
    /// query (it may carry a `sid` key) nor other headers.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let host = req
            .headers
            .get(::http::header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
        format!(
            "{} {}, Host: {}",
            req.method,
            req.uri.path(),
            host.as_deref().unwrap_or("-")
        )
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let idempotent = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        let closed = !ctx.responded
            && *e.esource() == ErrorSource::Upstream
            && http::upstream_kind(e.etype()) == UpstreamError::Closed;
        let resend = http::may_resend(
            idempotent,
            closed,
            client_reused,
            ctx.attempts,
            ctx.live.config.upstream.connect_retries,
        );
        if resend
            && !client_reused
            && let Some(g) = &ctx.current
        {
            warn!(backend = %g.backend().id, error = %e, "connection closed before the response; retrying the idempotent request");
        }
        e.set_retry(resend);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let kind = (*e.esource() == ErrorSource::Upstream).then(|| http::upstream_kind(e.etype()));
        if let (Some(kind), Some(g)) = (kind, &ctx.current) {
            count_upstream_error(g.backend(), kind);
        }
        let code = if body_refused(session) {
            400
        } else {
            http::failure_status(e.etype(), e.esource())
        };
        if code > 0 {
            write_error_answer(session, code).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // An absolute-form target: its authority replaces Host, the backend gets origin-form
        // (RFC 9112 section 3.2.2); an HTTP/1.0 request without Host gets the backend's address
        // (the request goes on as HTTP/1.1, which requires one).
        let authority = upstream_request
            .uri
            .authority()
            .map(|a| a.as_str().to_owned());
        if let Some(authority) = &authority {
            let origin = upstream_request
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let uri = origin
                .parse::<::http::Uri>()
                .or_err(ErrorType::InvalidHTTPHeader, "absolute-form target")?;
            upstream_request.set_uri(uri);
            upstream_request.insert_header(::http::header::HOST, authority)?;
        } else if upstream_request.headers.get(::http::header::HOST).is_none()
            && let Some(g) = &ctx.current
        {
            upstream_request.insert_header(::http::header::HOST, g.backend().addr.to_string())?;
        }
        // The front refused a request whose Connection is not a short token list.
        let hop = hop_of(&session.req_header().headers).unwrap_or_default();
        let gone: Vec<::http::header::HeaderName> = upstream_request
            .headers
            .keys()
            .filter(|name| !hop.request_keeps(name.as_str(), false, true))
            .cloned()
            .collect();
        let forwarded = client_ip(session).map(|ip| {
            let values = upstream_request
                .headers
                .get_all("x-forwarded-for")
                .into_iter()
                .map(|v| v.as_bytes());
            let mut value = Vec::with_capacity(48);
            forwarded_for(&mut value, values, &ip.to_string());
            value
        });
        for name in gone {
            upstream_request.remove_header(&name);
        }
        if let Some(value) = forwarded {
            upstream_request.insert_header("x-forwarded-for", value)?;
        }
        // HTTP/2 cookie crumbs, one field for the HTTP/1.1 backend. (An HTTP/1.1 client's
        // lines go as sent, on either engine.)
        let (protocol, tls) = ctx.client(session);
        if protocol == Protocol::H2 {
            let cookies = upstream_request
                .headers
                .get_all(::http::header::COOKIE)
                .into_iter()
                .map(|v| v.as_bytes());
            if let Some(joined) = joined_cookies(cookies) {
                upstream_request.insert_header(::http::header::COOKIE, joined)?;
            }
        }
        upstream_request.insert_header("x-forwarded-proto", forwarded_proto(tls))?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Err(why) = check_response(upstream_response) {
            if let Some(g) = &ctx.current {
                warn!(backend = %g.backend().id, error = why, "invalid response from the backend");
            }
            return Error::e_explain(ErrorType::InvalidHTTPHeader, why).map_err(|e| e.into_up());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.responded = true;
        let Some(backend) = ctx.current.as_ref().map(|g| g.backend().clone()) else {
            return Ok(());
        };
        let named: Vec<::http::header::HeaderName> = {
            // `check_response` refused a response whose Connection is not a token list.
            let hop = hop_of(&upstream_response.headers).unwrap_or_default();
            let status = upstream_response.status.as_u16();
            upstream_response
                .headers
                .keys()
                .filter(|n| {
                    // Pingora writes its own Connection and framing fields.
                    *n != ::http::header::CONNECTION
                        && *n != ::http::header::TRANSFER_ENCODING
                        && !hop.response_keeps(n.as_str(), status)
                })
                // An HTTP/1.0 client cannot read chunked: without the field Pingora sends the
                // (decoded) body until it closes the connection.
                .chain(
                    (session.req_header().version == ::http::Version::HTTP_10)
                        .then_some(&::http::header::TRANSFER_ENCODING),
                )
                .cloned()
                .collect()
        };
        for name in named {
            upstream_response.remove_header(&name);
        }
        let (_, tls) = ctx.client(session);
        if let Some(cookie) = ctx
            .key
            .as_ref()
            .and_then(|key| insert_cookie(&ctx.live, key, &backend, tls))
        {
            upstream_response.append_header("set-cookie", cookie)?;
        }
        if upstream_response.status != ::http::StatusCode::OK {
            ctx.engine_io = None;
        }
        let current = ctx.key.as_ref().map(|k| k.hash);
        let live = ctx.live.clone();
        let set_cookies = upstream_response
            .headers
            .get_all(::http::header::SET_COOKIE)
            .into_iter()
            .map(|v| v.as_bytes());
        self.state
            .learn(&live, set_cookies, &backend, current)
            .await;
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        // An Engine.IO handshake on this path (an HTTP/1.0 client; HTTP/1.1 handshakes take the
        // lean engine, which pins before the body goes out): the sid is in the first bytes of
        // the body. Body filters cannot wait, so the pin is written by a task of its own.
        let Some(search) = ctx.engine_io.as_mut() else {
            return Ok(None);
        };
        if let Some(chunk) = body.as_ref() {
            search.feed(chunk);
        }
        match search.found(end_of_stream) {
            SidFound::Sid(sid) => {
                let backend = ctx.current.as_ref().map(|g| g.backend().clone());
                if let (Some(backend), Some(source)) = (backend, ctx.live.engine_io_source) {
                    let key: KeyHash = ctx.live.extractor.hash_for(source, sid);
                    let state = self.state.clone();
                    tokio::spawn(async move { state.learn_pin(key, &backend, "engine.io").await });
                }
                ctx.engine_io = None;
            }
            SidFound::Never => ctx.engine_io = None,
            SidFound::NotYet => {}
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let backend = ctx.current.take();
        let (protocol, tls) = ctx.client(session);
        let req = session.req_header();
        record(Outcome {
            live: &ctx.live,
            key: ctx.key.as_ref(),
            backend: backend.as_ref(),
            attempts: ctx.attempts,
            started: ctx.started,
            upgraded: false,
            client: client_ip(session),
            method: &req.method,
            path: req.uri.path(),
            status,
            error: e.map(|e| e.etype()),
            tunnel: None,
            protocol,
            tls,
        });
    }
}

/// tether's own error answer ([`ErrorAnswer`]), as the lean engine writes it. A no-op if a
/// response head already went out (a response cut short mid-body).
async fn write_error_answer(session: &mut Session, status: u16) {
    let answer = ErrorAnswer::new(status);
    let date = pingora::protocols::http::date::get_cached_date();
    let head = session.req_header().method == ::http::Method::HEAD;
    let built = ResponseHeader::build(status, Some(5)).and_then(|mut resp| {
        for (name, value) in answer.fields(date.to_str().unwrap_or("")) {
            resp.append_header(name, value)?;
        }
        Ok(resp)
    });
    let result = match built {
        Ok(resp) => {
            let body = if head {
                Bytes::new()
            } else {
                Bytes::from(answer.body)
            };
            session
                .as_downstream_mut()
                .write_error_response(resp, body)
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        debug!(error = %e, "could not send the error response");
    }
}

/// A client socket as Pingora sees it for one request: the request's bytes pass through
/// unchanged (the head, then the body, a chunked one checked by the one chunk decoder,
/// [`ChunkDecoder`]), and Pingora never gets a byte past the end of the request: what the client
/// pipelined behind it is kept here for the front, which reads the next head itself (Pingora
/// would drop it and close the connection). A chunked body that breaks the coding makes reads
/// fail, which ends the request before Pingora can take the bad bytes for the end of the body (or
/// a trailer for a field); `fail_to_proxy` then answers 400.
#[derive(Debug)]
pub(super) struct BodyFence {
    inner: Stream,
    /// Bytes the front already read off `inner` (the head, maybe body bytes), handed on first.
    replay: Bytes,
    /// Head bytes still to pass before the body starts.
    head_left: usize,
    body: Fence,
    /// Bytes read past the end of the request, for the front.
    kept: Vec<u8>,
    refused: AtomicBool,
}

#[derive(Debug)]
enum Fence {
    Length(u64),
    Chunked(ChunkDecoder),
    /// The request is all through.
    Done,
}

/// The most the fence keeps for the front while Pingora handles the request before it; beyond it
/// it stops reading (the socket holds the rest).
const MAX_KEPT: usize = 64 * 1024;

impl BodyFence {
    /// `read`: what the front read off `inner` so far, from the start of the request head.
    pub(super) fn new(
        inner: Stream,
        read: Vec<u8>,
        head_len: usize,
        body: RequestBody,
    ) -> BodyFence {
        BodyFence {
            inner,
            replay: Bytes::from(read),
            head_left: head_len,
            body: match body {
                RequestBody::None => Fence::Length(0),
                RequestBody::Length(n) => Fence::Length(n),
                RequestBody::Chunked => Fence::Chunked(ChunkDecoder::default()),
            },
            kept: Vec::new(),
            refused: AtomicBool::new(false),
        }
    }

    /// The socket, and the bytes read past the request.
    pub(super) fn into_parts(self) -> (Stream, Vec<u8>) {
        (self.inner, self.kept)
    }

    /// Of `bytes` just read, how many belong to the request (the rest is kept); `Err(n)`: a
    /// chunked body broke the coding, only the first `n` (head bytes) may be handed on.
    fn fence(&mut self, bytes: &[u8]) -> std::result::Result<usize, usize> {
        let head = self.head_left.min(bytes.len());
        self.head_left -= head;
        if self.head_left > 0 {
            return Ok(head);
        }
        let rest = &bytes[head..];
        let taken = match &mut self.body {
            Fence::Done => 0,
            Fence::Length(left) => {
                let n = (*left).min(rest.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    self.body = Fence::Done;
                }
                n
            }
            Fence::Chunked(decoder) => match decoder.advance(rest, |_| {}) {
                Ok(n) => {
                    if decoder.done() {
                        self.body = Fence::Done;
                    }
                    n
                }
                Err(bad) => {
                    debug!(error = bad.0, "invalid chunked request body");
                    self.refused.store(true, Ordering::Relaxed);
                    return Err(head);
                }
            },
        };
        self.kept.extend_from_slice(&rest[taken..]);
        Ok(head + taken)
    }

    /// After the request: read what the client sends next into `kept` (Pingora gets nothing,
    /// and is woken when the socket has more or closes).
    fn poll_after(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut chunk = [0u8; 4096];
        while self.kept.len() < MAX_KEPT {
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut *self.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => self.kept.extend_from_slice(read.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
    }
}

fn invalid_body() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "invalid chunked request body",
    )
}

impl AsyncRead for BodyFence {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.refused.load(Ordering::Relaxed) {
            return Poll::Ready(Err(invalid_body()));
        }
        if matches!(this.body, Fence::Done) && this.head_left == 0 {
            return this.poll_after(cx);
        }
        let before = buf.filled().len();
        let read = if !this.replay.is_empty() {
            let n = buf.remaining().min(this.replay.len());
            buf.put_slice(&this.replay.split_to(n));
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut *this.inner).poll_read(cx, buf)
        };
        match read {
            Poll::Ready(Ok(())) => {
                match this.fence(&buf.filled()[before..]) {
                    Ok(keep) => buf.set_filled(before + keep),
                    // A read that finds the body broken hands on only the head bytes it holds
                    // (so that Pingora has the request and answers through `fail_to_proxy`);
                    // the next read fails.
                    Err(0) => return Poll::Ready(Err(invalid_body())),
                    Err(keep) => buf.set_filled(before + keep),
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for BodyFence {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for BodyFence {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for BodyFence {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

/// TLS facts come from the socket underneath (Pingora reads them for its digest).
impl Ssl for BodyFence {
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

/// Peeking is not offered: it would read past the check.
#[async_trait]
impl Peek for BodyFence {}

impl GetTimingDigest for BodyFence {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for BodyFence {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for BodyFence {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}
