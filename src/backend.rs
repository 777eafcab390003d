//! The configured backends and their live state: requests in flight and passive ejection.
//!
//! A backend is named by its configured `id` everywhere that outlives one process (Redis values,
//! insert cookies), and by a [`BackendKey`] inside the process: a small integer interned from the
//! id, so a cache entry is a few bytes and a lookup is an index. This module does not choose
//! backends (see [`crate::selection`]) nor check their health actively.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pingora::upstreams::peer::{HttpPeer, Peer};
use prometheus::{IntCounter, IntGauge};

use crate::config::{BackendSettings, UpstreamSettings};
use crate::metrics::{Metrics, Reassign, STATUS_CLASSES};

/// Milliseconds since this process started: a cheap monotonic clock for ejection and cache ages.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Backend ids one process can intern over its life: what a pin cache slot holds
/// ([`crate::affinity::cache::BACKEND_KEYS`]). A configuration with more backends is rejected,
/// and so is a reload that would take the process past it (restart it to start counting again).
pub const MAX_BACKEND_IDS: usize = crate::affinity::cache::BACKEND_KEYS as usize;

/// A backend id interned for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKey(pub u32);

/// Maps backend ids to [`BackendKey`]s and back. Ids are never forgotten: there are only as many
/// as the configurations of this process ever named, plus unknown ids read from Redis are never
/// interned (see [`Interner::lookup`]).
#[derive(Default)]
pub struct Interner {
    inner: RwLock<InternerInner>,
}

#[derive(Default)]
struct InternerInner {
    by_name: HashMap<Arc<str>, BackendKey>,
    names: Vec<Arc<str>>,
}

impl Interner {
    /// The key for `id`, interning it if new. Only for configured ids.
    pub fn intern(&self, id: &str) -> BackendKey {
        if let Some(k) = self.lookup(id) {
            return k;
        }
        let mut inner = self.inner.write().expect("interner lock is never poisoned");
        if let Some(k) = inner.by_name.get(id) {
            return *k;
        }
        // Config validation and reload keep the count within the bound.
        assert!(
            inner.names.len() < MAX_BACKEND_IDS,
            "more than {MAX_BACKEND_IDS} backend ids interned"
        );
        let key = BackendKey(inner.names.len() as u32);
        let name: Arc<str> = Arc::from(id);
        inner.names.push(name.clone());
        inner.by_name.insert(name, key);
        key
    }

    /// The key for `id` if some configuration named it; never interns (ids read from Redis may
    /// be anything).
    pub fn lookup(&self, id: &str) -> Option<BackendKey> {
        let inner = self.inner.read().expect("interner lock is never poisoned");
        inner.by_name.get(id).copied()
    }

    /// The id of `key`.
    pub fn name(&self, key: BackendKey) -> Arc<str> {
        let inner = self.inner.read().expect("interner lock is never poisoned");
        inner.names[key.0 as usize].clone()
    }

    /// How many ids the interner would hold with `ids` interned too.
    pub fn count_with<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> usize {
        let inner = self.inner.read().expect("interner lock is never poisoned");
        let new = ids
            .into_iter()
            .filter(|id| !inner.by_name.contains_key(*id))
            .count();
        inner.names.len() + new
    }

    /// Every id interned so far.
    pub fn names(&self) -> Vec<Arc<str>> {
        let inner = self.inner.read().expect("interner lock is never poisoned");
        inner.names.clone()
    }
}

/// Operator state of a backend, set through the admin API and shared by every instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Takes new sessions and keeps its pins.
    Enabled,
    /// Keeps its pins, takes no new sessions; with a deadline (wall-clock ms since the Unix
    /// epoch), its pins move once it has passed.
    Draining { deadline_ms: Option<u64> },
    /// Takes nothing: its pins move on their next request.
    Disabled,
}

impl AdminState {
    pub fn name(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Draining { .. } => "draining",
            AdminState::Disabled => "disabled",
        }
    }
}

/// Milliseconds since the Unix epoch (wall clock): drain deadlines are shared between instances.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One backend and its live state.
pub struct Backend {
    pub id: Arc<str>,
    pub key: BackendKey,
    pub address_text: String,
    pub addr: SocketAddr,
    /// A stable hash of the id, the backend's share in rendezvous hashing.
    pub id_hash: u64,
    /// Changed in place by a reload.
    weight: AtomicU32,
    /// The peer every request to this backend starts from (TLS and timeouts filled in), with
    /// its reuse hash; swapped whole by a reload.
    peer: ArcSwap<BackendPeer>,
    active: AtomicUsize,
    /// [`now_ms`] until which the backend is ejected; 0 = never ejected.
    ejected_until_ms: AtomicU64,
    /// Active health: up until `fall` consecutive failed checks, down until `rise` successes.
    healthy: AtomicBool,
    check_successes: AtomicU32,
    check_failures: AtomicU32,
    /// [`AdminState`], encoded: 0 enabled, 1 draining, 2 disabled.
    admin: AtomicU8,
    /// Drain deadline in [`unix_ms`]; 0 = none.
    drain_deadline_ms: AtomicU64,
    pub stats: BackendStats,
}

/// Per-backend metric handles, resolved once so the request path never looks labels up.
pub struct BackendStats {
    pub requests: [IntCounter; 5],
    pub active: IntGauge,
    pub websockets: IntGauge,
    pub connect_failures: IntCounter,
    pub duration: prometheus::Histogram,
}

/// A backend's peer and its [`Peer::reuse_hash`]: a pooled connection serves only a peer of the
/// same hash (address, TLS, SNI, verification), as in Pingora's own pool. A connection keeps the
/// hash of the peer it was made with, so a reload in between cannot file it under another.
pub struct BackendPeer {
    pub peer: HttpPeer,
    pub reuse_hash: u64,
}

impl BackendPeer {
    fn new(s: &BackendSettings, upstream: &UpstreamSettings) -> BackendPeer {
        let peer = peer_for(s, upstream);
        BackendPeer {
            reuse_hash: peer.reuse_hash(),
            peer,
        }
    }
}

/// The peer of backend `s`: its address, TLS (SNI, CAs, verification) and the timeouts. Both
/// engines and the health checks connect to it through Pingora's connectors, so TLS to a
/// backend is set up in one place.
fn peer_for(s: &BackendSettings, upstream: &UpstreamSettings) -> HttpPeer {
    let mut peer = match &s.tls {
        None => HttpPeer::new(s.address, false, String::new()),
        Some(tls) => {
            let mut peer = HttpPeer::new(s.address, true, tls.sni.clone());
            peer.options.verify_cert = tls.verify;
            peer.options.verify_hostname = tls.verify;
            peer.options.ca = tls.ca.as_ref().map(|ca| Arc::from(ca.for_pingora()));
            peer
        }
    };
    // A TLS handshake is bounded by the connect timeout too.
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.read_timeout = Some(upstream.read_timeout);
    peer.options.write_timeout = Some(upstream.write_timeout);
    peer.options.idle_timeout = Some(upstream.idle_timeout);
    peer
}

impl Backend {
    fn new(s: &BackendSettings, key: BackendKey, upstream: &UpstreamSettings) -> Backend {
        let m = Metrics::get();
        let id: Arc<str> = Arc::from(s.id.as_str());
        Backend {
            id_hash: stable_hash(s.id.as_bytes()),
            key,
            address_text: s.address_text.clone(),
            addr: s.address,
            weight: AtomicU32::new(s.weight),
            peer: ArcSwap::from_pointee(BackendPeer::new(s, upstream)),
            active: AtomicUsize::new(0),
            ejected_until_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            check_successes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            admin: AtomicU8::new(0),
            drain_deadline_ms: AtomicU64::new(0),
            stats: BackendStats {
                requests: STATUS_CLASSES.map(|c| m.requests.with_label_values(&[&*id, c])),
                active: m.active_requests.with_label_values(&[&*id]),
                websockets: m.open_websockets.with_label_values(&[&*id]),
                connect_failures: m.connect_failures.with_label_values(&[&*id]),
                duration: m.request_duration.with_label_values(&[&*id]),
            },
            id,
        }
    }

    /// A fresh peer for one request.
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(HttpPeer::clone(&self.peer.load().peer))
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Requests in flight (an open WebSocket is one).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Count a request in flight until the guard drops.
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.stats.active.inc();
        ActiveGuard(self.clone())
    }

    /// Keep the backend out of rotation until `now + for_`.
    pub fn eject(&self, now: u64, for_: Duration) {
        self.ejected_until_ms
            .fetch_max(now + for_.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether passive ejection keeps the backend out at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Whether active health checks consider the backend up.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the backend can take requests at `now`: healthy and not ejected.
    pub fn is_up(&self, now: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now)
    }

    /// Record one active check; returns the new health when it flips (`rise` consecutive
    /// successes bring a down backend up, `fall` consecutive failures take an up one down).
    pub fn record_check(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.check_failures.store(0, Ordering::Relaxed);
            let n = self.check_successes.fetch_add(1, Ordering::Relaxed) + 1;
            (!self.is_healthy() && n >= rise).then(|| {
                self.healthy.store(true, Ordering::Relaxed);
                // Back from the dead: forget a passive ejection from before it went down.
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                true
            })
        } else {
            self.check_successes.store(0, Ordering::Relaxed);
            let n = self.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
            (self.is_healthy() && n >= fall).then(|| {
                self.healthy.store(false, Ordering::Relaxed);
                false
            })
        }
    }

    /// Forget active health: up, with no streak (health checks were turned off). Returns
    /// whether the backend was down.
    pub fn reset_health(&self) -> bool {
        self.check_successes.store(0, Ordering::Relaxed);
        self.check_failures.store(0, Ordering::Relaxed);
        !self.healthy.swap(true, Ordering::Relaxed)
    }

    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            1 => AdminState::Draining {
                deadline_ms: Some(self.drain_deadline_ms.load(Ordering::Relaxed))
                    .filter(|d| *d > 0),
            },
            2 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }

    pub fn set_admin_state(&self, state: AdminState) {
        let (code, deadline) = match state {
            AdminState::Enabled => (0, 0),
            AdminState::Draining { deadline_ms } => (1, deadline_ms.unwrap_or(0)),
            AdminState::Disabled => (2, 0),
        };
        self.drain_deadline_ms.store(deadline, Ordering::Relaxed);
        self.admin.store(code, Ordering::Relaxed);
    }

    /// Whether new sessions may be assigned here at `now`: up and enabled.
    pub fn takes_new(&self, now: u64) -> bool {
        self.is_up(now) && self.admin.load(Ordering::Relaxed) == 0
    }

    /// Why a pin to this backend must move at `now` ([`now_ms`]), if it must. The wall clock
    /// (drain deadlines are shared between instances) is read only for a draining backend with
    /// a deadline.
    pub fn pin_blocked(&self, now: u64) -> Option<Reassign> {
        if !self.is_up(now) {
            return Some(Reassign::Down);
        }
        match self.admin_state() {
            AdminState::Enabled => None,
            AdminState::Draining {
                deadline_ms: Some(d),
            } if unix_ms() >= d => Some(Reassign::DrainDeadline),
            AdminState::Draining { .. } => None,
            AdminState::Disabled => Some(Reassign::Disabled),
        }
    }

    /// Apply a reloaded configuration of the same backend (same id and address).
    fn reconfigure(&self, s: &BackendSettings, upstream: &UpstreamSettings) {
        self.weight.store(s.weight, Ordering::Relaxed);
        self.peer.store(Arc::new(BackendPeer::new(s, upstream)));
    }

    /// The peer as it is now, and its reuse hash (one load: the two always agree).
    pub fn current_peer(&self) -> Arc<BackendPeer> {
        self.peer.load_full()
    }
}

/// Decrements a backend's in-flight count when dropped.
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.stats.active.dec();
    }
}

/// The configured backends, plus the rotation state of the policies that need one.
pub struct BackendSet {
    list: Vec<Arc<Backend>>,
    /// `slots[key]` is the position in `list` of the backend interned as `key`.
    slots: Vec<Option<usize>>,
    /// Round-robin position (round_robin, tie-breaks of least_connections).
    pub(crate) rotation: AtomicUsize,
    /// Smooth weighted round-robin current weights, one per backend in `list` order.
    pub(crate) swrr: Mutex<Vec<i64>>,
}

impl BackendSet {
    pub fn new(
        settings: &[BackendSettings],
        upstream: &UpstreamSettings,
        interner: &Interner,
    ) -> BackendSet {
        Self::reloaded(settings, upstream, interner, None)
    }

    /// The set for `settings`, keeping the live state (in-flight count, health, ejection,
    /// admin state) of every backend of `previous` whose id and address are unchanged.
    pub fn reloaded(
        settings: &[BackendSettings],
        upstream: &UpstreamSettings,
        interner: &Interner,
        previous: Option<&BackendSet>,
    ) -> BackendSet {
        let list: Vec<Arc<Backend>> = settings
            .iter()
            .map(|s| {
                let key = interner.intern(&s.id);
                match previous
                    .and_then(|p| p.get(key))
                    .filter(|b| b.addr == s.address)
                {
                    Some(b) => {
                        b.reconfigure(s, upstream);
                        b.clone()
                    }
                    None => Arc::new(Backend::new(s, key, upstream)),
                }
            })
            .collect();
        let mut slots = Vec::new();
        for (i, b) in list.iter().enumerate() {
            let k = b.key.0 as usize;
            if slots.len() <= k {
                slots.resize(k + 1, None);
            }
            slots[k] = Some(i);
        }
        BackendSet {
            swrr: Mutex::new(vec![0; list.len()]),
            rotation: AtomicUsize::new(0),
            slots,
            list,
        }
    }

    pub fn all(&self) -> &[Arc<Backend>] {
        &self.list
    }

    /// The configured backend interned as `key`, if it is in this set.
    pub fn get(&self, key: BackendKey) -> Option<&Arc<Backend>> {
        let i = (*self.slots.get(key.0 as usize)?)?;
        Some(&self.list[i])
    }
}

/// FNV-1a folded through a finalizer: stable across processes and builds, unlike `DefaultHasher`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

/// SplitMix64's finalizer: spreads every input bit over the output.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_interner_counts_ids_it_has_not_seen() {
        let interner = Interner::default();
        interner.intern("a");
        interner.intern("b");
        interner.intern("a");
        assert_eq!(interner.count_with([]), 2);
        assert_eq!(interner.count_with(["a", "c", "d", "b"]), 4);
    }

    fn settings(ids: &[&str]) -> Vec<BackendSettings> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| BackendSettings {
                id: id.to_string(),
                address_text: format!("127.0.0.1:{}", 3000 + i),
                tls: None,
                address: format!("127.0.0.1:{}", 3000 + i).parse().unwrap(),
                weight: 1,
            })
            .collect()
    }

    pub(crate) fn upstream() -> UpstreamSettings {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            tunnel_timeout: Duration::from_secs(1),
            connect_retries: 2,
            passive_eject: Duration::from_secs(10),
        }
    }

    #[test]
    fn interned_keys_survive_a_new_set() {
        let interner = Interner::default();
        let a = BackendSet::new(&settings(&["a", "b"]), &upstream(), &interner);
        let b = BackendSet::new(&settings(&["c", "b"]), &upstream(), &interner);
        let kb = interner.lookup("b").unwrap();
        assert_eq!(&*a.get(kb).unwrap().id, "b");
        assert_eq!(&*b.get(kb).unwrap().id, "b");
        assert!(b.get(interner.lookup("a").unwrap()).is_none());
        assert!(interner.lookup("zzz").is_none());
        assert_eq!(&*interner.name(kb), "b");
    }

    #[test]
    fn ejection_expires() {
        let interner = Interner::default();
        let set = BackendSet::new(&settings(&["a"]), &upstream(), &interner);
        let b = &set.all()[0];
        assert!(b.is_up(100));
        b.eject(100, Duration::from_millis(50));
        assert!(!b.is_up(120));
        assert!(b.is_up(150));
    }

    #[test]
    fn active_guard_counts() {
        let interner = Interner::default();
        let set = BackendSet::new(&settings(&["a"]), &upstream(), &interner);
        let b = set.all()[0].clone();
        let g1 = b.track();
        let g2 = b.track();
        assert_eq!(b.active(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(b.active(), 0);
    }

    #[test]
    fn stable_hash_is_stable() {
        // Rendezvous fallback must agree across instances and versions: pin the function.
        assert_eq!(stable_hash(b"app1"), stable_hash(b"app1"));
        assert_ne!(stable_hash(b"app1"), stable_hash(b"app2"));
        assert_eq!(stable_hash(b""), mix64(0xcbf2_9ce4_8422_2325));
    }
}
