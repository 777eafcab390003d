//! The routing core, protocol-neutral: which backend a request goes to and what a response
//! teaches. Both HTTP engines ([`crate::engine`]) call it; it knows nothing of HTTP syntax.
//!
//! Per request: extract the affinity key -> local cache -> (miss) one Redis round trip that
//! either records our choice or returns the winner's -> route. A pin whose backend is down or
//! gone moves with compare-and-set. A connect failure ejects the backend, re-pins the key and
//! retries elsewhere (nothing was sent yet). Responses teach pins (the app's Set-Cookie, an
//! Engine.IO handshake's sid) and carry tether's own cookie in insert mode. [`record`] counts a
//! finished request and writes its access log line.
//!
//! Failure policy:
//! - Redis unavailable: never an error. Cache, then the insert cookie's hint, then the rendezvous
//!   hash over live backends (the same on every instance); pins made meanwhile are written when
//!   Redis answers again.
//! - No backend configured or none left to try: the engine answers 503 ([`crate::http`]).
//! - Malformed keys: ignored as absent, counted in `tether_invalid_keys_total`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use pingora::prelude::ErrorType;
use tracing::{debug, info, warn};

use crate::affinity::cookie::parse_set_cookie;
use crate::affinity::redis::{Assigned, decode_pin, encode_pin};
use crate::affinity::{InsertKey, KeyHash, RequestHeaders, SessionKey};
use crate::backend::{ActiveGuard, Backend, BackendKey, BackendSet, now_ms};
use crate::metrics::{Lookup, Metrics, Reassign, UpstreamError, status_class};
use crate::selection;
use crate::state::{Live, State};

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
    pub(crate) async fn learn_pin(&self, key: KeyHash, backend: &Backend, from: &'static str) {
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
/// was minted, or when the pin moved off the backend the presented cookie names. `tls`: the
/// request came over TLS (the cookie is then `Secure` unless `secure = false`).
pub(crate) fn insert_cookie(
    live: &Live,
    key: &SessionKey,
    backend: &Backend,
    tls: bool,
) -> Option<String> {
    match (&key.insert, live.extractor.insert_cookies()) {
        (Some(InsertKey::Minted { raw }), Some(c)) => {
            Some(c.set_cookie(raw.as_bytes(), &backend.id, tls))
        }
        (Some(InsertKey::Presented { raw, hint }), Some(c)) if *hint != *backend.id => {
            Some(c.set_cookie(raw.as_bytes(), &backend.id, tls))
        }
        _ => None,
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
    pub(crate) tunnel: Option<&'a TunnelClosed>,
    /// How the client spoke to tether.
    pub(crate) protocol: Protocol,
    /// Over TLS (a `listen_tls` listener).
    pub(crate) tls: bool,
}

/// The HTTP version a client used, for the access log and
/// `tether_requests_by_protocol_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http10 = 0,
    Http11 = 1,
    H2 = 2,
}

impl Protocol {
    /// In discriminant order (`Protocol as usize` indexes it).
    pub const ALL: [Protocol; 3] = [Protocol::Http10, Protocol::Http11, Protocol::H2];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http10 => "http/1.0",
            Protocol::Http11 => "http/1.1",
            Protocol::H2 => "h2",
        }
    }
}

/// Count a request answered without a backend (none available, or refused before routing) in
/// `tether_requests_total{backend="none"}`.
pub(crate) fn count_unrouted(status: u16) {
    if let Some(class) = status_class(status) {
        Metrics::get()
            .requests
            .with_label_values(&["none", crate::metrics::STATUS_CLASSES[class]])
            .inc();
    }
}

/// Count a finished request by backend and status class, and write its access log line.
pub(crate) fn record(o: Outcome<'_>) {
    match (o.backend, status_class(o.status)) {
        (Some(g), Some(class)) => {
            let stats = &g.backend().stats;
            stats.requests[class].inc();
            stats.duration.observe(o.started.elapsed().as_secs_f64());
        }
        (None, Some(_)) => count_unrouted(o.status),
        _ => {}
    }
    Metrics::get().by_protocol(o.protocol, o.tls).inc();
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
            protocol = o.protocol.as_str(),
            tls = o.tls,
            status = o.status,
            backend = o.backend.map_or("-", |g| &*g.backend().id),
            key = %OrDash(o.key.map(|k| k.hash)),
            source = %OrDash(source),
            attempts = o.attempts,
            upgraded = o.upgraded,
            duration_ms = o.started.elapsed().as_secs_f64() * 1000.0,
            error = ?o.error,
            closed = %OrDash(o.tunnel.map(|t| t.end)),
            bytes_to_backend = %OrDash(o.tunnel.map(|t| t.to_backend)),
            bytes_to_client = %OrDash(o.tunnel.map(|t| t.to_client)),
        );
    }
}

/// How an upgraded connection (a WebSocket) ended, for its access log line.
pub(crate) struct TunnelClosed {
    /// Who closed it, or why: `client`, `backend`, `idle_timeout`, `client_error`,
    /// `backend_error`.
    pub(crate) end: &'static str,
    pub(crate) to_backend: u64,
    pub(crate) to_client: u64,
}
