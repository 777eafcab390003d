//! The request path: Pingora's `ProxyHttp` for tether.
//!
//! Per request: extract the affinity key -> local cache -> (miss) one Redis round trip that
//! either records our choice or returns the winner's -> route. A pin whose backend is down or
//! gone moves with compare-and-set. A connect failure ejects the backend, re-pins the key and
//! retries elsewhere (nothing was sent yet). Responses teach pins (the app's Set-Cookie) and carry
//! tether's own cookie in insert mode.
//!
//! Failure policy, in one place:
//! - Redis unavailable: never an error. Cache, then the insert cookie's hint, then the rendezvous
//!   hash over live backends (the same on every instance); pins made meanwhile are written when
//!   Redis answers again.
//! - No backend configured or none left to try: 502/503 from Pingora's error path.
//! - A backend that fails a request (connect, timeout, closed connection, bad HTTP): 502, or 504
//!   for a read or write timeout (as HAProxy and NGINX answer), counted in
//!   `tether_upstream_errors_total{backend,kind}`. Retried only when the backend cannot have
//!   acted on the request or the method allows a replay: connect failures (any method, on another
//!   backend), and an idempotent request whose connection closed before any response header
//!   (NGINX's `proxy_next_upstream error` for GET, HEAD, PUT, DELETE, OPTIONS). A POST or PATCH the
//!   backend may have received is never sent again. Timeouts are not retried and do not move
//!   the pin: the backend may still be working on the request.
//! - Malformed keys: ignored as absent, counted in `tether_invalid_keys_total`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{
    DetachedTunnel, FailToProxy, OnTunnelClose, ProxyHttp, Session, TunnelEnd, TunnelReport,
};
use tracing::{debug, info, warn};

use crate::affinity::cookie::parse_set_cookie;
use crate::affinity::redis::{Assigned, decode_pin, encode_pin};
use crate::affinity::{
    InsertKey, KeyHash, RequestHeaders, SessionKey, engine_io_sid, is_engine_io_handshake,
};
use crate::backend::{ActiveGuard, Backend, BackendKey, BackendSet, now_ms};
use crate::metrics::{Lookup, Metrics, Reassign, UpstreamError, status_class};
use crate::selection;
use crate::state::{Live, State, TunnelGuard};
use bytes::Bytes;

impl State {
    /// The backend for a keyed request's first attempt.
    async fn resolve(&self, live: &Live, key: &SessionKey, now: u64) -> Option<Arc<Backend>> {
        let set = &live.backends;
        let policy = live.policy();
        let m = Metrics::get();
        if let Some(pin) = self.cache.get(key.hash, now) {
            m.lookup(Lookup::Cache);
            let Some(b) = set.get(pin.backend) else {
                let expected = encode_pin(&self.interner.name(pin.backend));
                return self
                    .reassign(live, key, Some(expected), Reassign::Removed, &[], now)
                    .await;
            };
            return match b.pin_blocked(now) {
                None => {
                    // Also after a Redis reconnect: Redis may have lost the pin with its data.
                    let lost = self
                        .redis
                        .as_ref()
                        .is_some_and(|r| pin.refreshed_ms <= r.up_since_ms());
                    if lost || self.cache.refresh_due(&pin, now) {
                        self.refresh(key.hash, &pin, now);
                    }
                    Some(b.clone())
                }
                Some(reason) => {
                    let expected = encode_pin(&b.id);
                    self.reassign(live, key, Some(expected), reason, &[], now)
                        .await
                }
            };
        }

        let hint = self.usable_hint(set, key, &[], now);
        let Some(redis) = &self.redis else {
            // In process: the cache is the map, and it has no pin.
            let b = hint.or_else(|| selection::pick(set, policy, Some(key.hash), &[], now))?;
            self.cache.put(key.hash, b.key, now, true);
            m.lookup(Lookup::Miss);
            m.assigned(policy);
            return Some(b);
        };
        if redis.is_up() {
            let candidate = hint
                .clone()
                .or_else(|| selection::pick(set, policy, Some(key.hash), &[], now))?;
            match redis.assign(key.hash, &candidate.id, candidate.key).await {
                Ok(Assigned::Won) => {
                    // `assign` counts it on the backend.
                    self.cache.put(key.hash, candidate.key, now, true);
                    m.lookup(Lookup::Miss);
                    m.assigned(policy);
                    return Some(candidate);
                }
                Ok(Assigned::Existing(raw)) => {
                    m.lookup(Lookup::Redis);
                    let pinned = decode_pin(&raw)
                        .and_then(|id| self.interner.lookup(id))
                        .and_then(|k| set.get(k));
                    let reason = match pinned.map(|b| (b, b.pin_blocked(now))) {
                        Some((b, None)) => {
                            self.cache.put(key.hash, b.key, now, true);
                            // SET NX did not touch the TTL: slide it, off the request path.
                            redis.refresh(key.hash, b.key);
                            return Some(b.clone());
                        }
                        Some((_, Some(reason))) => reason,
                        None => Reassign::Removed,
                    };
                    // The compare-and-set slides the TTL and moves the count between backends.
                    return self.reassign(live, key, Some(raw), reason, &[], now).await;
                }
                // A timeout is ambiguous: Redis may still execute the write. Stay with what it
                // would hold, so that recovery does not move the session.
                Err(e) if e.is_ambiguous() => {
                    debug!(key = %key.hash, error = %e, "redis timed out; failing open to our candidate");
                    return self.fail_open(set, key, Some(candidate), &[], now);
                }
                // Not sent, or refused: the rendezvous hash agrees with every other instance.
                Err(e) => debug!(key = %key.hash, error = %e, "redis lookup failed; failing open"),
            }
        }
        self.fail_open(set, key, hint, &[], now)
    }

    /// Redis is unavailable: the insert cookie's hint, else the rendezvous hash (the same on
    /// every instance). Cached as unsynced, so it is written when Redis answers again.
    fn fail_open(
        &self,
        set: &BackendSet,
        key: &SessionKey,
        hint: Option<Arc<Backend>>,
        exclude: &[BackendKey],
        now: u64,
    ) -> Option<Arc<Backend>> {
        let b = hint.or_else(|| selection::rendezvous(set, key.hash, exclude, now))?;
        self.cache.put(key.hash, b.key, now, false);
        Metrics::get().lookup(Lookup::Fallback);
        Some(b)
    }

    /// The backend named by a presented insert cookie, if a pin to it would hold.
    fn usable_hint(
        &self,
        set: &BackendSet,
        key: &SessionKey,
        exclude: &[BackendKey],
        now: u64,
    ) -> Option<Arc<Backend>> {
        let Some(InsertKey::Presented { hint, .. }) = &key.insert else {
            return None;
        };
        let b = set.get(self.interner.lookup(hint)?)?;
        (b.pin_blocked(now).is_none() && !exclude.contains(&b.key)).then(|| b.clone())
    }

    /// The backend for a request's next attempt after a connect to `failed_on` failed (on either
    /// HTTP path): the key's pin moves off it (compare-and-set), or a keyless request picks
    /// again; neither takes a backend in `failed`.
    pub(crate) async fn after_connect_failure(
        &self,
        live: &Live,
        key: Option<&SessionKey>,
        failed_on: &Backend,
        failed: &[BackendKey],
        now: u64,
    ) -> Option<Arc<Backend>> {
        match key {
            Some(key) => {
                let expected = Some(encode_pin(&failed_on.id));
                self.reassign(live, key, expected, Reassign::ConnectFailure, failed, now)
                    .await
            }
            None => selection::pick(&live.backends, live.policy(), None, failed, now),
        }
    }

    /// Move `key` off its pinned backend: choose again (skipping `exclude`) and compare-and-set
    /// against `expected`, the raw value believed to be stored. If another instance moved it
    /// first, adopt its choice when usable.
    async fn reassign(
        &self,
        live: &Live,
        key: &SessionKey,
        expected: Option<String>,
        reason: Reassign,
        exclude: &[BackendKey],
        now: u64,
    ) -> Option<Arc<Backend>> {
        let set = &live.backends;
        let policy = live.policy();
        let m = Metrics::get();
        let Some(redis) = self.redis.as_deref() else {
            let b = selection::pick(set, policy, Some(key.hash), exclude, now)?;
            self.cache.put(key.hash, b.key, now, true);
            m.reassignments.with_label_values(&[reason.as_str()]).inc();
            return Some(b);
        };
        let mut expected = expected;
        // Two rounds: ours, then (if another instance moved the pin to a backend we cannot use)
        // one more against its value.
        for _ in 0..2 {
            if !redis.is_up() {
                break;
            }
            let candidate = self
                .usable_hint(set, key, exclude, now)
                .or_else(|| selection::pick(set, policy, Some(key.hash), exclude, now))?;
            match redis
                .compare_and_set(key.hash, expected.as_deref(), &candidate.id)
                .await
            {
                Ok((true, _)) => {
                    self.cache.put(key.hash, candidate.key, now, true);
                    m.reassignments.with_label_values(&[reason.as_str()]).inc();
                    info!(key = %key.hash, to = %candidate.id, reason = reason.as_str(), "pin moved");
                    return Some(candidate);
                }
                Ok((false, current)) => {
                    let theirs = decode_pin(&current)
                        .and_then(|id| self.interner.lookup(id))
                        .and_then(|k| set.get(k))
                        .filter(|b| b.pin_blocked(now).is_none() && !exclude.contains(&b.key));
                    if let Some(b) = theirs {
                        self.cache.put(key.hash, b.key, now, true);
                        return Some(b.clone());
                    }
                    expected = Some(current);
                }
                Err(e) => {
                    debug!(key = %key.hash, error = %e, "compare-and-set failed; failing open");
                    break;
                }
            }
        }
        m.reassignments.with_label_values(&[reason.as_str()]).inc();
        let hint = self.usable_hint(set, key, exclude, now);
        self.fail_open(set, key, hint, exclude, now)
    }

    /// Pin `key` to `backend`, which issued it (a Set-Cookie, an Engine.IO handshake): written to
    /// Redis now when it answers, else cached as unsynced and written when it returns.
    async fn learn_pin(&self, key: KeyHash, backend: &Backend, from: &'static str) {
        Metrics::get().learned.inc();
        let synced = match &self.redis {
            // In process: the cache is the map.
            None => true,
            Some(r) if r.is_up() => r.learn(key, &backend.id).await.is_ok(),
            Some(_) => false,
        };
        self.cache.put(key, backend.key, now_ms(), synced);
        debug!(key = %key, backend = %backend.id, from, "learned pin");
    }

    /// Record pins from the `Set-Cookie` header values of a response served by `backend`.
    pub(crate) async fn learn<'h>(
        &self,
        live: &Live,
        set_cookies: impl Iterator<Item = &'h [u8]> + Send,
        backend: &Backend,
        current: Option<KeyHash>,
    ) {
        if live.learned_cookies.is_empty() {
            return;
        }
        let mut learned: Vec<KeyHash> = Vec::new();
        for header in set_cookies {
            let Some(c) = parse_set_cookie(header) else {
                continue;
            };
            if c.removal {
                continue;
            }
            for (source, name) in &live.learned_cookies {
                if c.name == name.as_slice() && c.value.len() <= live.extractor.max_key_bytes() {
                    let h = live.extractor.hash_for(*source, c.value);
                    if Some(h) != current && !learned.contains(&h) {
                        learned.push(h);
                    }
                }
            }
        }
        for h in learned {
            self.learn_pin(h, backend, "set-cookie").await;
        }
    }

    /// A request's affinity key and the backend of its first attempt (`None`: none available).
    pub(crate) async fn first_choice(
        &self,
        live: &Live,
        headers: &(impl RequestHeaders + Sync + ?Sized),
        query: Option<&str>,
        peer_ip: Option<IpAddr>,
        now: u64,
    ) -> (Option<SessionKey>, Option<Arc<Backend>>) {
        let extracted = live.extractor.extract(headers, query, peer_ip);
        if let Some(invalid) = extracted.invalid {
            Metrics::get()
                .invalid_keys
                .with_label_values(&[invalid.as_str()])
                .inc();
        }
        let backend = match &extracted.key {
            Some(key) => self.resolve(live, key, now).await,
            None => {
                Metrics::get().lookup(Lookup::None);
                selection::pick(&live.backends, live.policy(), None, &[], now)
            }
        };
        (extracted.key, backend)
    }
}

/// The `Set-Cookie` value tether adds to a response from `backend` in insert mode: when the key
/// was minted, or when the pin moved off the backend the presented cookie names.
pub(crate) fn insert_cookie(live: &Live, key: &SessionKey, backend: &Backend) -> Option<String> {
    match (&key.insert, live.extractor.insert_cookies()) {
        (Some(InsertKey::Minted { raw }), Some(c)) => {
            Some(c.set_cookie(raw.as_bytes(), &backend.id))
        }
        (Some(InsertKey::Presented { raw, hint }), Some(c)) if *hint != *backend.id => {
            Some(c.set_cookie(raw.as_bytes(), &backend.id))
        }
        _ => None,
    }
}

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
    /// The client asked to upgrade (WebSocket): tunnel timeouts apply.
    upgrade: bool,
    /// An Engine.IO polling handshake: the start of its response body, until the sid is found.
    engine_io: Option<Vec<u8>>,
    /// The handshake's sid, found in the body chunk being forwarded: pinned (Redis written) by
    /// `response_body_settle` before that chunk leaves, so the client's next poll finds it on
    /// every instance (one Redis round trip per Engine.IO session; the worker keeps serving).
    handshake_pin: Option<(KeyHash, Arc<Backend>)>,
    /// Held while the upgraded connection is open.
    tunnel: Option<TunnelGuard>,
    /// A response header arrived from a backend: from then on nothing may be retried.
    responded: bool,
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

/// A connect to `backend` failed (on either HTTP path): eject it, count it, add it to `failed`,
/// and say whether the request may go to another backend. `connect_retries` counts the other
/// backends tried after connect failures; resends to the same backend after a closed connection
/// (see `error_while_proxy`) do not use it up.
pub(crate) fn connect_failed(
    live: &Live,
    backend: &Backend,
    failed: &mut Vec<BackendKey>,
    error: &dyn std::fmt::Display,
) -> bool {
    backend.eject(now_ms(), live.config.upstream.passive_eject);
    backend.stats.connect_failures.inc();
    if !failed.contains(&backend.key) {
        failed.push(backend.key);
    }
    let others_left = live.backends.all().iter().any(|b| !failed.contains(&b.key));
    if failed.len() <= live.config.upstream.connect_retries && others_left {
        warn!(backend = %backend.id, %error, "connect failed; retrying on another backend");
        Metrics::get().retries.inc();
        true
    } else {
        warn!(backend = %backend.id, %error, "connect failed; no retry left");
        false
    }
}

/// Count a failed request against `backend` in `tether_upstream_errors_total{backend,kind}`.
pub(crate) fn count_upstream_error(backend: &Backend, kind: UpstreamError) {
    Metrics::get()
        .upstream_errors
        .with_label_values(&[&*backend.id, kind.as_str()])
        .inc();
}

/// Displays a value, or `-` when there is none, without formatting into a `String` first
/// (the access log writes one line per request).
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// What kind of upstream failure a Pingora error is, for `tether_upstream_errors_total`.
pub(crate) fn upstream_error_kind(etype: &ErrorType) -> UpstreamError {
    use ErrorType::*;
    match etype {
        ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
        | TLSWantX509Lookup | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert
        | HandshakeError | BindError | SocketError => UpstreamError::Connect,
        ReadTimedout | WriteTimedout => UpstreamError::Timeout,
        ConnectionClosed | ReadError | WriteError => UpstreamError::Closed,
        // pingora-core's `PREMATURE_BODY_END`: the connection closed before Content-Length.
        Custom("PrematureBodyEnd") => UpstreamError::Closed,
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade => UpstreamError::Protocol,
        Custom("InvalidChunk" | "InvalidTrailerEnd") => UpstreamError::Protocol,
        _ => UpstreamError::Other,
    }
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
            upgrade: false,
            engine_io: None,
            handshake_pin: None,
            tunnel: None,
            responded: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let server = &ctx.live.config.server;
        if self
            .state
            .stopping
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() {
            // Pingora keeps an idle HTTP/1.1 connection forever; bound it. Only where keep-alive
            // is on: Pingora turns it off for requests it must not reuse (CL + TE).
            session.set_keepalive(Some(server.keepalive_timeout.as_secs()));
        }
        // Pingora accepts heads up to 1 MB; answer big ones as NGINX and HAProxy do.
        let req = session.req_header();
        let target = req.raw_path().len();
        let headers: usize = req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let too_many = req.headers.len() > server.max_request_headers;
        if too_many || target + headers > server.max_request_header_bytes {
            let status = if !too_many && target > server.max_request_header_bytes / 2 {
                414
            } else {
                431
            };
            // Counted in tether_requests_total{backend="none",class="4xx"} by `logging`.
            session.respond_error(status).await?;
            return Ok(true);
        }
        if session.is_upgrade_req() {
            // Pingora's downstream read timeout (60 s) would cut idle WebSockets.
            ctx.upgrade = true;
            session.set_read_timeout(Some(ctx.live.config.upstream.tunnel_timeout));
        }
        if ctx.live.engine_io_source.is_some()
            && is_engine_io_handshake(session.req_header().uri.query())
        {
            ctx.engine_io = Some(Vec::new());
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
            // A retry after a reused keep-alive connection turned out closed: same backend.
            Some(prev) => Some(prev),
        };
        ctx.attempts += 1;
        let Some(backend) = chosen else {
            ctx.current = None;
            return Error::e_explain(ErrorType::HTTPStatus(503), "no backend available");
        };
        let mut peer = backend.peer();
        if ctx.upgrade {
            peer.options.read_timeout = Some(live.config.upstream.tunnel_timeout);
        }
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

    /// Mark every connection that served a request, so that Pingora can tell a reused one (its
    /// head timeout then starts after the keep-alive idle time). A zero-sized box: no allocation.
    fn persist_connection_context(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        Some(Box::new(()))
    }

    /// What Pingora's own warn/error lines say about a request: method, path and Host, never the
    /// query (it may carry a `sid` key) nor other headers.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
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
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && !ctx.responded;
        if !replayable {
            // Not idempotent (the backend may have acted on it), or part of a response already
            // went to the client: never sent again.
            e.set_retry(false);
            return e;
        }
        // Pingora's default: a reused keep-alive connection that closed under the request.
        e.retry.decide_reuse(client_reused);
        if !e.retry()
            && *e.esource() == ErrorSource::Upstream
            && upstream_error_kind(e.etype()) == UpstreamError::Closed
            && ctx.attempts <= ctx.live.config.upstream.connect_retries
        {
            // A fresh connection closed before any response header: the backend died or dropped
            // the request. An idempotent request may be sent again (NGINX does so by default);
            // first to the same backend, which keeps the session where it is if it is alive and
            // moves it (connect failure) if it is not.
            if let Some(g) = &ctx.current {
                warn!(backend = %g.backend().id, error = %e, "connection closed before the response; retrying the idempotent request");
            }
            e.set_retry(true);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let kind = (*e.esource() == ErrorSource::Upstream).then(|| upstream_error_kind(e.etype()));
        if let (Some(kind), Some(g)) = (kind, &ctx.current) {
            count_upstream_error(g.backend(), kind);
        }
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            // HAProxy and NGINX answer a backend that did not answer in time with 504.
            (_, ErrorSource::Upstream) if kind == Some(UpstreamError::Timeout) => 504,
            (_, ErrorSource::Upstream) => 502,
            // The client went away: nobody to answer.
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => 0,
            (_, ErrorSource::Downstream) => 400,
            (_, ErrorSource::Internal | ErrorSource::Unset) => 500,
        };
        // A no-op if the response header was already sent (a response cut short mid-body).
        if code > 0
            && let Err(write) = session.respond_error(code).await
        {
            debug!(error = %write, "could not send the error response");
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
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(ip) = client_ip(session) {
            // Append to any X-Forwarded-For the client sent (folding repeated headers), as
            // NGINX's $proxy_add_x_forwarded_for does.
            // One buffer, the address formatted straight into it.
            let mut value = Vec::with_capacity(48);
            for v in upstream_request.headers.get_all("x-forwarded-for") {
                value.extend_from_slice(v.as_bytes());
                value.extend_from_slice(b", ");
            }
            std::io::Write::write_fmt(&mut value, format_args!("{ip}"))
                .expect("writing to a Vec cannot fail");
            upstream_request.insert_header("x-forwarded-for", value)?;
        }
        // tether terminates plain HTTP only; a client cannot claim otherwise.
        upstream_request.insert_header("x-forwarded-proto", "http")?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.responded = true;
        let Some(backend) = ctx.current.as_ref().map(|g| g.backend().clone()) else {
            return Ok(());
        };
        if let Some(cookie) = ctx
            .key
            .as_ref()
            .and_then(|key| insert_cookie(&ctx.live, key, &backend))
        {
            upstream_response.append_header("set-cookie", cookie)?;
        }
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let key = ctx.key.as_ref().map(|k| k.hash);
            ctx.tunnel = Some(self.state.tunnels.open(key, backend.clone()));
        }
        if upstream_response.status != http::StatusCode::OK {
            ctx.engine_io = None;
        }
        let current = ctx.key.as_ref().map(|k| k.hash);
        let live = ctx.live.clone();
        let set_cookies = upstream_response
            .headers
            .get_all(http::header::SET_COOKIE)
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
        // Engine.IO handshake: the sid is in the first bytes of the body.
        const LOOK_AT: usize = 1024;
        if let Some(buf) = ctx.engine_io.as_mut() {
            if let Some(chunk) = body.as_ref() {
                let room = LOOK_AT.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            let found = engine_io_sid(buf).map(<[u8]>::to_vec);
            let backend = ctx.current.as_ref().map(|g| g.backend().clone());
            if let (Some(sid), Some(backend), Some(source)) =
                (found.as_deref(), backend, ctx.live.engine_io_source)
            {
                let key = ctx.live.extractor.hash_for(source, sid);
                ctx.handshake_pin = Some((key, backend));
                ctx.engine_io = None;
            } else if end_of_stream || buf.len() >= LOOK_AT {
                ctx.engine_io = None;
            }
        }
        Ok(None)
    }

    fn response_body_settle<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>> {
        let (key, backend) = ctx.handshake_pin.take()?;
        Some(Box::pin(async move {
            self.state.learn_pin(key, &backend, "engine.io").await;
            Ok(())
        }))
    }

    /// Upgraded connections (WebSockets) leave the request's task once the 101 is out and run
    /// in a small task of their own (vendored Pingora hook; see vendor/README.md): an idle
    /// WebSocket then costs its two sockets and little else.
    fn detach_upgraded(&self, _session: &Session, ctx: &RequestCtx) -> Option<DetachedTunnel> {
        Some(DetachedTunnel {
            idle_timeout: Some(ctx.live.config.upstream.tunnel_timeout),
        })
    }

    /// The request's log line and metrics wait for the tunnel to close, as for a WebSocket
    /// Pingora proxies itself; the backend stays counted as in use (least-connections) and the
    /// key's pin kept alive until then.
    fn tunnel_detached(&self, session: &mut Session, ctx: &mut RequestCtx) -> OnTunnelClose {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let client = client_ip(session);
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_owned());
        let (live, key, attempts, started) =
            (ctx.live.clone(), ctx.key.take(), ctx.attempts, ctx.started);
        let backend = ctx.current.take();
        let tunnel = ctx.tunnel.take();
        Box::new(move |report: TunnelReport| {
            record(Outcome {
                live: &live,
                key: key.as_ref(),
                backend: backend.as_ref(),
                attempts,
                started,
                upgraded: true,
                client,
                method: &method,
                path: &path,
                status,
                error: None,
                tunnel: Some(&report),
            });
            drop(tunnel);
        })
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let backend = ctx.current.take();
        let req = session.req_header();
        record(Outcome {
            live: &ctx.live,
            key: ctx.key.as_ref(),
            backend: backend.as_ref(),
            attempts: ctx.attempts,
            started: ctx.started,
            upgraded: ctx.upgrade && status == 101,
            client: client_ip(session),
            method: &req.method,
            path: req.uri.path(),
            status,
            error: e.map(|e| e.etype()),
            tunnel: None,
        });
    }
}

/// How a request (or the WebSocket it became) ended: what its metrics and log line need.
pub(crate) struct Outcome<'a> {
    pub(crate) live: &'a Live,
    pub(crate) key: Option<&'a SessionKey>,
    pub(crate) backend: Option<&'a ActiveGuard>,
    pub(crate) attempts: usize,
    pub(crate) started: Instant,
    pub(crate) upgraded: bool,
    pub(crate) client: Option<IpAddr>,
    pub(crate) method: &'a http::Method,
    pub(crate) path: &'a str,
    pub(crate) status: u16,
    pub(crate) error: Option<&'a ErrorType>,
    pub(crate) tunnel: Option<&'a TunnelReport>,
}

/// Count a finished request by backend and status class, and write its access log line.
pub(crate) fn record(o: Outcome<'_>) {
    match (o.backend, status_class(o.status)) {
        (Some(g), Some(class)) => {
            let stats = &g.backend().stats;
            stats.requests[class].inc();
            stats.duration.observe(o.started.elapsed().as_secs_f64());
        }
        (None, Some(class)) => {
            Metrics::get()
                .requests
                .with_label_values(&["none", crate::metrics::STATUS_CLASSES[class]])
                .inc();
        }
        _ => {}
    }
    if o.live.config.server.access_log {
        // One structured line per request. The key is its keyed hash, never the raw
        // session id; the path is logged without its query (which may carry a sid).
        let source = o
            .key
            .and_then(|k| o.live.config.affinity.sources.get(k.source));
        info!(
            target: "tether::access",
            client = %OrDash(o.client),
            method = %o.method,
            path = o.path,
            status = o.status,
            backend = o.backend.map_or("-", |g| &*g.backend().id),
            key = %OrDash(o.key.map(|k| k.hash)),
            source = %OrDash(source),
            attempts = o.attempts,
            upgraded = o.upgraded,
            duration_ms = o.started.elapsed().as_secs_f64() * 1000.0,
            error = ?o.error,
            closed = %OrDash(o.tunnel.map(|t| tunnel_end(&t.end))),
            bytes_to_backend = %OrDash(o.tunnel.map(|t| t.to_upstream)),
            bytes_to_client = %OrDash(o.tunnel.map(|t| t.to_downstream)),
        );
    }
}

/// Why a WebSocket closed, for its access log line.
fn tunnel_end(end: &TunnelEnd) -> &'static str {
    match end {
        TunnelEnd::DownstreamClosed => "client",
        TunnelEnd::UpstreamClosed => "backend",
        TunnelEnd::IdleTimeout => "idle_timeout",
        TunnelEnd::DownstreamError(_) => "client_error",
        TunnelEnd::UpstreamError(_) => "backend_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_are_classified_by_what_the_operator_should_look_at() {
        let kind = |t: ErrorType| upstream_error_kind(&t).as_str();
        assert_eq!(kind(ErrorType::ConnectRefused), "connect");
        assert_eq!(kind(ErrorType::ConnectTimedout), "connect");
        assert_eq!(kind(ErrorType::ReadTimedout), "timeout");
        assert_eq!(kind(ErrorType::WriteTimedout), "timeout");
        assert_eq!(kind(ErrorType::ConnectionClosed), "closed");
        assert_eq!(kind(ErrorType::ReadError), "closed");
        assert_eq!(kind(ErrorType::new("PrematureBodyEnd")), "closed");
        assert_eq!(kind(ErrorType::InvalidHTTPHeader), "protocol");
        assert_eq!(kind(ErrorType::new("InvalidChunk")), "protocol");
        assert_eq!(kind(ErrorType::InternalError), "other");
    }
}
