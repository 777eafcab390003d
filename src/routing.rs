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
//! - Malformed keys: ignored as absent, counted in `tether_invalid_keys_total`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use tracing::{debug, info, warn};

use crate::affinity::cache::{Pin, PinCache};
use crate::affinity::cookie::parse_set_cookie;
use crate::affinity::redis::{Assigned, RedisMap, decode_pin, encode_pin};
use crate::affinity::{
    Extractor, InsertKey, KeyHash, KeyHasher, SessionKey, engine_io_sid, is_engine_io_handshake,
};
use crate::backend::{ActiveGuard, Backend, BackendKey, BackendSet, Interner, now_ms};
use crate::config::{Config, KeySource, Policy};
use crate::metrics::{Lookup, Metrics, Reassign, status_class};
use crate::selection;
use bytes::Bytes;

/// Everything the request path and the admin listener share.
pub struct State {
    pub backends: ArcSwap<BackendSet>,
    pub interner: Arc<Interner>,
    pub extractor: Extractor,
    pub cache: Arc<PinCache>,
    /// `None`: the map is in process (the cache is the whole map).
    pub redis: Option<Arc<RedisMap>>,
    pub policy: Policy,
    passive_eject: Duration,
    connect_retries: usize,
    tunnel_timeout: Duration,
    /// `(source index, cookie name)` of every `cookie:<name>` source: learned from Set-Cookie.
    learned_cookies: Vec<(usize, Vec<u8>)>,
    /// Index of the `query:sid` source: Engine.IO handshakes teach its pins.
    engine_io_source: Option<usize>,
    /// Keys with an upgraded connection (WebSocket) open through this instance.
    pub tunnels: Arc<Tunnels>,
}

impl State {
    /// Build the shared state; connects to Redis when configured (on the current runtime, which
    /// must outlive the state: the refresher and prober run there).
    pub async fn build(config: &Config) -> anyhow::Result<State> {
        let a = &config.affinity;
        let interner = Arc::new(Interner::default());
        let backends = BackendSet::new(&config.backends, &config.upstream, &interner);
        let hasher = match &a.hash_key {
            Some(k) => KeyHasher::new(k.expose()),
            None => KeyHasher::random(),
        };
        let ttl_ms = a.ttl.as_millis() as u64;
        let cache = Arc::new(PinCache::new(a.cache_entries, ttl_ms));
        let redis = match &config.redis {
            Some(r) => Some(RedisMap::start(r, a.ttl, cache.clone(), interner.clone()).await?),
            None => {
                warn!(
                    "no [redis] section: the session map is kept in this process only; run a single tether instance, pins are lost on restart"
                );
                None
            }
        };
        let learned_cookies = a
            .sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                KeySource::Cookie(name) => Some((i, name.as_bytes().to_vec())),
                _ => None,
            })
            .collect();
        Ok(State {
            backends: ArcSwap::from_pointee(backends),
            interner,
            extractor: Extractor::new(a, hasher),
            cache,
            redis,
            policy: a.policy,
            passive_eject: config.upstream.passive_eject,
            connect_retries: config.upstream.connect_retries,
            tunnel_timeout: config.upstream.tunnel_timeout,
            learned_cookies,
            engine_io_source: a
                .sources
                .iter()
                .position(|s| *s == KeySource::Query("sid".into())),
            tunnels: Arc::default(),
        })
    }

    /// The backend for a keyed request's first attempt.
    async fn resolve(&self, set: &BackendSet, key: &SessionKey, now: u64) -> Option<Arc<Backend>> {
        let m = Metrics::get();
        if let Some(pin) = self.cache.get(key.hash, now) {
            return match set.get(pin.backend) {
                Some(b) if b.is_up(now) => {
                    m.lookup(Lookup::Cache);
                    if self.cache.refresh_due(&pin, now) {
                        self.refresh(key.hash, &pin, now);
                    }
                    Some(b.clone())
                }
                Some(b) => {
                    let expected = encode_pin(&b.id);
                    self.reassign(set, key, Some(expected), Reassign::Down, &[], now)
                        .await
                }
                None => {
                    let expected = encode_pin(&self.interner.name(pin.backend));
                    self.reassign(set, key, Some(expected), Reassign::Removed, &[], now)
                        .await
                }
            };
        }

        let hint = self.usable_hint(set, key, &[], now);
        let Some(redis) = &self.redis else {
            // In process: the cache is the map, and it has no pin.
            let b = hint.or_else(|| selection::pick(set, self.policy, Some(key.hash), &[], now))?;
            self.cache.put(key.hash, b.key, now, true);
            m.lookup(Lookup::Miss);
            m.assignments
                .with_label_values(&[self.policy.as_str()])
                .inc();
            return Some(b);
        };
        if redis.is_up() {
            let candidate = hint
                .clone()
                .or_else(|| selection::pick(set, self.policy, Some(key.hash), &[], now))?;
            match redis.assign(key.hash, &candidate.id).await {
                Ok(Assigned::Won) => {
                    self.cache.put(key.hash, candidate.key, now, true);
                    m.lookup(Lookup::Miss);
                    m.assignments
                        .with_label_values(&[self.policy.as_str()])
                        .inc();
                    return Some(candidate);
                }
                Ok(Assigned::Existing(raw)) => {
                    m.lookup(Lookup::Redis);
                    let pinned = decode_pin(&raw)
                        .and_then(|id| self.interner.lookup(id))
                        .and_then(|k| set.get(k));
                    return match pinned {
                        Some(b) if b.is_up(now) => {
                            self.cache.put(key.hash, b.key, now, true);
                            // SET NX did not touch the TTL: slide it now, off the request path.
                            redis.refresh(key.hash, b.key);
                            Some(b.clone())
                        }
                        Some(_) => {
                            self.reassign(set, key, Some(raw), Reassign::Down, &[], now)
                                .await
                        }
                        None => {
                            self.reassign(set, key, Some(raw), Reassign::Removed, &[], now)
                                .await
                        }
                    };
                }
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

    /// The backend named by a presented insert cookie, if it can take the request.
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
        (b.is_up(now) && !exclude.contains(&b.key)).then(|| b.clone())
    }

    /// Move `key` off its pinned backend: choose again (skipping `exclude`) and compare-and-set
    /// against `expected`, the raw value believed to be stored. If another instance moved it
    /// first, adopt its choice when usable.
    async fn reassign(
        &self,
        set: &BackendSet,
        key: &SessionKey,
        expected: Option<String>,
        reason: Reassign,
        exclude: &[BackendKey],
        now: u64,
    ) -> Option<Arc<Backend>> {
        let m = Metrics::get();
        let Some(redis) = self.redis.as_deref() else {
            let b = selection::pick(set, self.policy, Some(key.hash), exclude, now)?;
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
                .or_else(|| selection::pick(set, self.policy, Some(key.hash), exclude, now))?;
            match redis
                .compare_and_set(key.hash, expected.as_deref(), &candidate.id)
                .await
            {
                Ok(current) if decode_pin(&current) == Some(&candidate.id) => {
                    self.cache.put(key.hash, candidate.key, now, true);
                    m.reassignments.with_label_values(&[reason.as_str()]).inc();
                    info!(key = %key.hash, to = %candidate.id, reason = reason.as_str(), "pin moved");
                    return Some(candidate);
                }
                Ok(current) => {
                    let theirs = decode_pin(&current)
                        .and_then(|id| self.interner.lookup(id))
                        .and_then(|k| set.get(k))
                        .filter(|b| b.is_up(now) && !exclude.contains(&b.key));
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

    /// Slide a pin's TTL: locally now, in Redis off the request path.
    fn refresh(&self, key: KeyHash, pin: &Pin, now: u64) {
        match self.redis.as_deref() {
            Some(redis) if redis.is_up() => {
                self.cache.put(key, pin.backend, now, true);
                redis.refresh(key, pin.backend);
            }
            // Without Redis the cache is the map: sliding it is the whole refresh.
            None => self.cache.put(key, pin.backend, now, true),
            // Redis down: keep the pin alive here (at the same pace) and written when it returns.
            Some(_) => {
                if now.saturating_sub(pin.refreshed_ms) >= self.cache.ttl_ms() / 4 {
                    self.cache.put(key, pin.backend, now, false);
                }
            }
        }
    }

    /// Background task: while a WebSocket keyed by a pin is open through this instance, slide the
    /// pin every ttl/4 so that it cannot expire under an idle but open connection.
    pub async fn keep_tunnel_pins_alive(self: Arc<Self>) {
        let every = Duration::from_millis((self.cache.ttl_ms() / 4).max(250));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = now_ms();
            for (key, backend) in self.tunnels.keys() {
                let stale = Pin::new(key, backend, 0, true);
                self.refresh(key, &stale, now);
            }
        }
    }

    /// Pin `key` to `backend` now, as learned from a response body. Body filters are synchronous,
    /// but the client's next request may reach another instance as soon as it has the body, so
    /// the Redis write must land first: it blocks this worker for one Redis round trip (at most
    /// `timeout_ms`) inside `block_in_place`, once per Engine.IO session.
    fn learn_now(&self, key: KeyHash, backend: &Backend) {
        let now = now_ms();
        Metrics::get().learned.inc();
        let Some(redis) = self.redis.as_deref().filter(|r| r.is_up()) else {
            // In process, or Redis down (written when it returns, like any unsynced pin).
            self.cache.put(key, backend.key, now, self.redis.is_none());
            return;
        };
        let handle = tokio::runtime::Handle::current();
        let synced = match handle.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| {
                handle.block_on(redis.learn(key, &backend.id)).is_ok()
            }),
            // Pingora without work stealing runs current-thread runtimes: write after the fact.
            _ => {
                let (redis, cache) = (self.redis.clone(), self.cache.clone());
                let (id, bkey) = (backend.id.clone(), backend.key);
                tokio::spawn(async move {
                    if let Some(r) = redis
                        && r.learn(key, &id).await.is_ok()
                    {
                        cache.update_if_cached(key, bkey, now_ms());
                    }
                });
                false
            }
        };
        self.cache.put(key, backend.key, now, synced);
        debug!(key = %key, backend = %backend.id, "learned pin from an Engine.IO handshake");
    }

    /// Record pins from the `Set-Cookie` headers of a response served by `backend`.
    async fn learn(&self, response: &ResponseHeader, backend: &Backend, current: Option<KeyHash>) {
        if self.learned_cookies.is_empty() {
            return;
        }
        let mut learned: Vec<KeyHash> = Vec::new();
        for header in response.headers.get_all(http::header::SET_COOKIE) {
            let Some(c) = parse_set_cookie(header.as_bytes()) else {
                continue;
            };
            if c.removal {
                continue;
            }
            for (source, name) in &self.learned_cookies {
                if c.name == name.as_slice() && c.value.len() <= self.extractor.max_key_bytes() {
                    let h = self.extractor.hash_for(*source, c.value);
                    if Some(h) != current && !learned.contains(&h) {
                        learned.push(h);
                    }
                }
            }
        }
        let now = now_ms();
        for h in learned {
            Metrics::get().learned.inc();
            let synced = match self.redis.as_deref() {
                None => true,
                Some(r) if r.is_up() => r.learn(h, &backend.id).await.is_ok(),
                Some(_) => false,
            };
            self.cache.put(h, backend.key, now, synced);
            debug!(key = %h, backend = %backend.id, "learned pin from Set-Cookie");
        }
    }
}

/// Upgraded connections open through this instance, by key.
#[derive(Default)]
pub struct Tunnels {
    open: Mutex<HashMap<KeyHash, (BackendKey, usize)>>,
}

impl Tunnels {
    /// Register an upgraded connection to `backend` (for `key`, if it has one) until the guard
    /// drops.
    fn open(self: &Arc<Self>, key: Option<KeyHash>, backend: Arc<Backend>) -> TunnelGuard {
        backend.stats.websockets.inc();
        if let Some(k) = key {
            let mut open = self.open.lock().expect("tunnels lock is never poisoned");
            let entry = open.entry(k).or_insert((backend.key, 0));
            entry.0 = backend.key;
            entry.1 += 1;
        }
        TunnelGuard {
            tunnels: self.clone(),
            key,
            backend,
        }
    }

    /// Keys with an open tunnel and the backend it goes to.
    pub fn keys(&self) -> Vec<(KeyHash, BackendKey)> {
        let open = self.open.lock().expect("tunnels lock is never poisoned");
        open.iter().map(|(k, (b, _))| (*k, *b)).collect()
    }
}

/// An open upgraded connection; closing it (dropping the request context) unregisters it.
pub struct TunnelGuard {
    tunnels: Arc<Tunnels>,
    key: Option<KeyHash>,
    backend: Arc<Backend>,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.backend.stats.websockets.dec();
        if let Some(k) = self.key {
            let mut open = self
                .tunnels
                .open
                .lock()
                .expect("tunnels lock is never poisoned");
            if let Some(entry) = open.get_mut(&k) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    open.remove(&k);
                }
            }
        }
    }
}

/// The Pingora proxy.
pub struct Router {
    pub state: Arc<State>,
}

/// Per-request state.
pub struct RequestCtx {
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
    /// Held while the upgraded connection is open.
    tunnel: Option<TunnelGuard>,
}

impl Router {
    async fn first_choice(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        set: &BackendSet,
        now: u64,
    ) -> Option<Arc<Backend>> {
        let req = session.req_header();
        let peer_ip = client_ip(session);
        let extracted = self
            .state
            .extractor
            .extract(&req.headers, req.uri.query(), peer_ip);
        if let Some(invalid) = extracted.invalid {
            Metrics::get()
                .invalid_keys
                .with_label_values(&[invalid.as_str()])
                .inc();
        }
        ctx.key = extracted.key;
        match &ctx.key {
            Some(key) => self.state.resolve(set, key, now).await,
            None => {
                Metrics::get().lookup(Lookup::None);
                selection::pick(set, self.state.policy, None, &[], now)
            }
        }
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

#[async_trait]
impl ProxyHttp for Router {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            key: None,
            current: None,
            failed: Vec::new(),
            attempts: 0,
            started: Instant::now(),
            upgrade: false,
            engine_io: None,
            tunnel: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if session.is_upgrade_req() {
            // Pingora's downstream read timeout (60 s) would cut idle WebSockets.
            ctx.upgrade = true;
            session.set_read_timeout(Some(self.state.tunnel_timeout));
        }
        if self.state.engine_io_source.is_some()
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
        let set = self.state.backends.load();
        let now = now_ms();
        let previous = ctx.current.as_ref().map(|g| g.backend().clone());
        let chosen = match previous {
            None => self.first_choice(session, ctx, &set, now).await,
            // A retry after a connect failure: move the pin (nothing was sent yet).
            Some(prev) if ctx.failed.contains(&prev.key) => match &ctx.key {
                Some(key) => {
                    let expected = Some(encode_pin(&prev.id));
                    let failed = ctx.failed.clone();
                    self.state
                        .reassign(&set, key, expected, Reassign::ConnectFailure, &failed, now)
                        .await
                }
                None => selection::pick(&set, self.state.policy, None, &ctx.failed, now),
            },
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
            peer.options.read_timeout = Some(self.state.tunnel_timeout);
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
        backend.eject(now_ms(), self.state.passive_eject);
        backend.stats.connect_failures.inc();
        if !ctx.failed.contains(&backend.key) {
            ctx.failed.push(backend.key);
        }
        let others_left = self
            .state
            .backends
            .load()
            .all()
            .iter()
            .any(|b| !ctx.failed.contains(&b.key));
        if ctx.attempts <= self.state.connect_retries && others_left {
            warn!(backend = %backend.id, error = %e, "connect failed; retrying on another backend");
            Metrics::get().retries.inc();
            e.set_retry(true);
        } else {
            warn!(backend = %backend.id, error = %e, "connect failed; no retry left");
            e.set_retry(false);
        }
        e
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
            let mut value = Vec::new();
            for v in upstream_request.headers.get_all("x-forwarded-for") {
                value.extend_from_slice(v.as_bytes());
                value.extend_from_slice(b", ");
            }
            value.extend_from_slice(ip.to_string().as_bytes());
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
        let Some(backend) = ctx.current.as_ref().map(|g| g.backend().clone()) else {
            return Ok(());
        };
        if let Some(key) = &ctx.key {
            // Insert mode: set the cookie when minted, or when the pin moved off its hint.
            let cookie = match (&key.insert, self.state.extractor.insert_cookies()) {
                (Some(InsertKey::Minted { raw }), Some(c)) => {
                    Some(c.set_cookie(raw.as_bytes(), &backend.id))
                }
                (Some(InsertKey::Presented { raw, hint }), Some(c)) if *hint != *backend.id => {
                    Some(c.set_cookie(raw.as_bytes(), &backend.id))
                }
                _ => None,
            };
            if let Some(cookie) = cookie {
                upstream_response.append_header("set-cookie", cookie)?;
            }
        }
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let key = ctx.key.as_ref().map(|k| k.hash);
            ctx.tunnel = Some(self.state.tunnels.open(key, backend.clone()));
        }
        if upstream_response.status != http::StatusCode::OK {
            ctx.engine_io = None;
        }
        let current = ctx.key.as_ref().map(|k| k.hash);
        self.state.learn(upstream_response, &backend, current).await;
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
                (found.as_deref(), backend, self.state.engine_io_source)
            {
                let key = self.state.extractor.hash_for(source, sid);
                self.state.learn_now(key, &backend);
                ctx.engine_io = None;
            } else if end_of_stream || buf.len() >= LOOK_AT {
                ctx.engine_io = None;
            }
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let backend = ctx.current.take();
        match (&backend, status_class(status)) {
            (Some(g), Some(class)) => {
                let stats = &g.backend().stats;
                stats.requests[class].inc();
                stats.duration.observe(ctx.started.elapsed().as_secs_f64());
            }
            (None, Some(class)) => {
                Metrics::get()
                    .requests
                    .with_label_values(&["none", crate::metrics::STATUS_CLASSES[class]])
                    .inc();
            }
            _ => {}
        }
        debug!(
            key = ?ctx.key.as_ref().map(|k| k.hash),
            backend = ?backend.as_ref().map(|g| g.backend().id.clone()),
            status,
            attempts = ctx.attempts,
            error = ?e.map(|e| e.etype()),
            "request"
        );
    }
}
