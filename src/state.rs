//! The state every part of a running tether shares: the live (reloadable) configuration and
//! backend set, the pin cache and Redis map, open tunnels, and operator states of backends.
//!
//! Reload: [`State::reload`] re-reads the file, validates it fully, builds a new [`Live`] (keeping
//! the live state of unchanged backends) and swaps it in atomically; requests in flight keep the
//! `Live` they started with. A broken file changes nothing. Settings bound at start-up (listeners,
//! admin address, Redis, hash key, cache size) are reported as needing a restart or a graceful
//! upgrade.
//!
//! Operator states (drain, disable) are kept in Redis and applied by every instance; without
//! Redis they are local to this instance.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tracing::{error, info, warn};

use crate::affinity::cache::{Pin, PinCache};
use crate::affinity::redis::{RedisError, RedisMap};
use crate::affinity::{Extractor, KeyHash, KeyHasher};
use crate::backend::{
    AdminState, Backend, BackendKey, BackendSet, Interner, MAX_BACKEND_IDS, now_ms,
};
use crate::config::{Config, ConfigError, Diagnostic, KeySource, Policy};
use crate::metrics::Metrics;

/// The reloadable part: one consistent configuration and the backends built from it.
pub struct Live {
    pub config: Config,
    pub backends: BackendSet,
    pub extractor: Extractor,
    /// `(source index, cookie name)` of every `cookie:<name>` source: learned from Set-Cookie.
    pub(crate) learned_cookies: Vec<(usize, Vec<u8>)>,
    /// Index of the `query:sid` source: Engine.IO handshakes teach its pins.
    pub(crate) engine_io_source: Option<usize>,
}

impl Live {
    fn new(
        config: Config,
        hasher: KeyHasher,
        interner: &Interner,
        previous: Option<&Live>,
    ) -> Live {
        let a = &config.affinity;
        let backends = BackendSet::reloaded(
            &config.backends,
            &config.upstream,
            interner,
            previous.map(|p| &p.backends),
        );
        let learned_cookies = a
            .sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                KeySource::Cookie(name) => Some((i, name.as_bytes().to_vec())),
                _ => None,
            })
            .collect();
        let engine_io_source = a
            .sources
            .iter()
            .position(|s| *s == KeySource::Query("sid".into()));
        Live {
            extractor: Extractor::new(a, hasher),
            backends,
            learned_cookies,
            engine_io_source,
            config,
        }
    }

    pub fn policy(&self) -> Policy {
        self.config.affinity.policy
    }
}

/// What a successful reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Settings that changed in the file but only take effect after a restart or upgrade.
    pub restart_required: Vec<String>,
}

/// Errors of an operator action on backends or pins.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no backend `{0}` in the running configuration")]
    UnknownBackend(String),
    #[error("redis is unavailable: the change was not stored (retry when /readyz shows redis up)")]
    Redis(#[from] RedisError),
}

pub struct State {
    live: ArcSwap<Live>,
    pub interner: Arc<Interner>,
    pub cache: Arc<PinCache>,
    /// `None`: the map is in process (the cache is the whole map).
    pub redis: Option<Arc<RedisMap>>,
    /// Keys with an upgraded connection (WebSocket) open through this instance.
    pub tunnels: Arc<Tunnels>,
    /// Fixed at start-up: changing it would orphan every pin.
    hasher: KeyHasher,
    config_path: PathBuf,
    /// Operator states by backend id, as last read from Redis (or set here without Redis);
    /// applied to every backend set, including reloaded ones.
    admin_states: Mutex<HashMap<String, AdminState>>,
    /// Serialises reloads (SIGHUP and the API may race).
    reloading: tokio::sync::Mutex<()>,
    /// Set once Pingora starts handing the listeners over or shutting down: every response then
    /// says `Connection: close`, so keep-alive clients move to the new process.
    pub stopping: std::sync::atomic::AtomicBool,
    /// `[server] upstream_keepalive_pool` as tether started with: Pingora's pool is sized once,
    /// and the lean engine keeps the same bound (a reload reports it as needing a restart).
    pub upstream_keepalive_pool: usize,
    /// The certificates of the TLS listeners (`None` without any), chosen by SNI; a reload
    /// swaps them in (the listeners themselves need a restart).
    pub tls: Option<Arc<crate::tls::SniResolver>>,
}

/// Log a loaded configuration's warnings (a certificate expiring soon) as `tether check` prints
/// them.
fn log_warnings(config: &Config, path: &Path) {
    for w in &config.warnings {
        warn!("{}", w.located(path, ""));
    }
}

impl State {
    /// Build the shared state; connects to Redis when configured (on the current runtime, which
    /// must outlive the state: the refresher and prober run there).
    pub async fn build(config: Config, config_path: &Path) -> anyhow::Result<State> {
        let a = &config.affinity;
        let interner = Arc::new(Interner::default());
        let hasher = match &a.hash_key {
            Some(k) => KeyHasher::new(k.expose()),
            None => KeyHasher::random(),
        };
        let cache = Arc::new(PinCache::new(a.cache_entries, a.ttl.as_millis() as u64));
        let redis = match &config.redis {
            Some(r) => Some(RedisMap::start(r, a.ttl, cache.clone(), interner.clone()).await?),
            None => {
                warn!(
                    "no [redis] section: the session map is kept in this process only; run a single tether instance, pins are lost on restart"
                );
                None
            }
        };
        let upstream_keepalive_pool = config.server.upstream_keepalive_pool;
        log_warnings(&config, config_path);
        let tls = config
            .tls
            .as_ref()
            .map(|t| Arc::new(crate::tls::SniResolver::new(&t.certs)));
        let live = Live::new(config, hasher.clone(), &interner, None);
        let state = State {
            upstream_keepalive_pool,
            tls,
            live: ArcSwap::from_pointee(live),
            interner,
            cache,
            redis,
            tunnels: Arc::default(),
            hasher,
            config_path: config_path.to_path_buf(),
            admin_states: Mutex::default(),
            reloading: tokio::sync::Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        };
        if state.redis.as_ref().is_some_and(|r| r.is_up()) {
            state.sync_admin_states().await;
        }
        Ok(state)
    }

    /// The live configuration, cheaply (a guard, for the request path).
    pub fn live(&self) -> Guard<Arc<Live>> {
        self.live.load()
    }

    /// The live configuration as an owned reference (kept across awaits and hooks).
    pub fn live_full(&self) -> Arc<Live> {
        self.live.load_full()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Re-read the configuration file and apply it. A file that does not validate changes
    /// nothing; the error carries every FILE:LINE:COL.
    pub async fn reload(&self) -> Result<ReloadReport, ConfigError> {
        let _one_at_a_time = self.reloading.lock().await;
        let m = Metrics::get();
        let config = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                m.reloads.with_label_values(&["failed"]).inc();
                error!("reload refused, the running configuration is kept:\n{e}");
                return Err(e);
            }
        };
        let ids = self
            .interner
            .count_with(config.backends.iter().map(|b| b.id.as_str()));
        if ids > MAX_BACKEND_IDS {
            let e = ConfigError {
                path: self.config_path.clone(),
                diagnostics: vec![Diagnostic {
                    position: None,
                    message: format!(
                        "this configuration would take the backend ids this process has \
                         interned (every id any of its configurations named) to {ids}, past \
                         the {MAX_BACKEND_IDS} it can hold: restart tether to load it"
                    ),
                }],
            };
            m.reloads.with_label_values(&["failed"]).inc();
            error!("reload refused, the running configuration is kept:\n{e}");
            return Err(e);
        }
        let old = self.live.load_full();
        let report = diff(&old.config, &config);
        log_warnings(&config, &self.config_path);
        // New handshakes take the new certificates; open connections keep theirs.
        if let (Some(resolver), Some(tls)) = (&self.tls, &config.tls)
            && old.config.tls.as_ref() != Some(tls)
        {
            resolver.replace(&tls.certs);
            info!(
                certificates = ?tls.certs.iter().map(|c| c.names.join(",")).collect::<Vec<_>>(),
                "TLS certificates reloaded"
            );
        }
        let ttl = config.affinity.ttl;
        let live = Live::new(config, self.hasher.clone(), &self.interner, Some(&old));
        self.apply_admin_states(&live.backends);
        self.cache.set_ttl_ms(ttl.as_millis() as u64);
        if let Some(r) = &self.redis {
            r.set_ttl(ttl);
        }
        self.live.store(Arc::new(live));
        // Again after the swap: an operator state set while the new set was being built went
        // to the old set only.
        self.apply_admin_states(&self.live().backends);
        m.reloads.with_label_values(&["ok"]).inc();
        info!(
            added = ?report.added,
            removed = ?report.removed,
            restart_required = ?report.restart_required,
            "configuration reloaded"
        );
        if !report.restart_required.is_empty() {
            warn!(
                settings = ?report.restart_required,
                "these settings changed but only apply after a restart or a graceful upgrade (run -u)"
            );
        }
        Ok(report)
    }

    /// Background task: reload on SIGHUP.
    pub async fn reload_on_sighup(self: Arc<Self>) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGHUP: reload only through POST /api/reload");
                return;
            }
        };
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading {}", self.config_path.display());
            // Errors are logged and counted by reload itself.
            let _ = self.reload().await;
        }
    }

    /// Set a backend's operator state: in Redis for every instance (and kept across restarts),
    /// or only here without Redis.
    pub async fn set_admin_state(&self, id: &str, state: AdminState) -> Result<(), AdminError> {
        if self
            .interner
            .lookup(id)
            .and_then(|k| self.live().backends.get(k).cloned())
            .is_none()
        {
            return Err(AdminError::UnknownBackend(id.to_string()));
        }
        if let Some(redis) = &self.redis {
            redis
                .store_admin_state(id, encode_admin_state(state).as_deref())
                .await?;
        }
        {
            let mut states = self
                .admin_states
                .lock()
                .expect("admin states lock is never poisoned");
            match state {
                AdminState::Enabled => states.remove(id),
                s => states.insert(id.to_string(), s),
            };
        }
        self.apply_admin_states(&self.live().backends);
        info!(
            backend = id,
            state = state.name(),
            "backend state set by an operator"
        );
        Ok(())
    }

    /// Give every backend of `set` its operator state.
    fn apply_admin_states(&self, set: &BackendSet) {
        let states = self
            .admin_states
            .lock()
            .expect("admin states lock is never poisoned");
        for b in set.all() {
            b.set_admin_state(states.get(&*b.id).copied().unwrap_or(AdminState::Enabled));
        }
    }

    /// Read the operator states from Redis and apply them.
    async fn sync_admin_states(&self) {
        let Some(redis) = &self.redis else { return };
        match redis.load_admin_states().await {
            Ok(raw) => {
                let parsed: HashMap<String, AdminState> = raw
                    .into_iter()
                    .filter_map(|(id, v)| match decode_admin_state(&v) {
                        Some(s) => Some((id, s)),
                        None => {
                            warn!(backend = %id, value = %v, "unreadable backend state in redis; ignored");
                            None
                        }
                    })
                    .collect();
                *self
                    .admin_states
                    .lock()
                    .expect("admin states lock is never poisoned") = parsed;
                self.apply_admin_states(&self.live().backends);
            }
            Err(e) => {
                warn!(error = %e, "could not read backend states from redis; keeping the last known")
            }
        }
    }

    /// Background task: follow operator states in Redis (on change notices, and every few
    /// seconds in case one was missed).
    pub async fn follow_admin_states(self: Arc<Self>) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(5), redis.admin_changed().notified())
                .await;
            if redis.is_up() {
                self.sync_admin_states().await;
            }
        }
    }

    /// Where `key` is pinned: this instance's cache and, with Redis, the shared map.
    pub async fn lookup_pin(&self, key: KeyHash) -> Result<PinInfo, AdminError> {
        let cached = self
            .cache
            .get(key, now_ms())
            .map(|p| self.interner.name(p.backend).to_string());
        let stored = match &self.redis {
            Some(r) => r.lookup(key).await?,
            None => None,
        };
        Ok(PinInfo { cached, stored })
    }

    /// Remove the pin of `key` everywhere; its next request is assigned afresh.
    pub async fn unpin(&self, key: KeyHash) -> Result<bool, AdminError> {
        let had_local = self.cache.get(key, now_ms()).is_some();
        self.cache.remove(key);
        let had = match &self.redis {
            Some(r) => r.unpin(key).await?.is_some() || had_local,
            None => had_local,
        };
        if had {
            Metrics::get()
                .reassignments
                .with_label_values(&[crate::metrics::Reassign::Unpinned.as_str()])
                .inc();
        }
        Ok(had)
    }

    /// Sessions pinned per backend id (Redis only: without Redis pins are not counted).
    pub async fn pinned_counts(&self, backends: &[Arc<Backend>]) -> Option<HashMap<String, u64>> {
        let redis = self.redis.as_ref()?;
        let ids: Vec<Arc<str>> = backends.iter().map(|b| b.id.clone()).collect();
        match redis.pinned_counts(&ids).await {
            Ok(counts) => Some(ids.iter().map(|i| i.to_string()).zip(counts).collect()),
            Err(e) => {
                warn!(error = %e, "could not count pinned sessions");
                None
            }
        }
    }

    /// Slide a pin's TTL: locally now, in Redis off the request path.
    pub(crate) fn refresh(&self, key: KeyHash, pin: &Pin, now: u64) {
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
        loop {
            let every = Duration::from_millis((self.cache.ttl_ms() / 4).max(250));
            tokio::time::sleep(every).await;
            let now = now_ms();
            for (key, backend) in self.tunnels.keys() {
                let stale = Pin {
                    backend,
                    refreshed_ms: 0,
                    synced: true,
                };
                self.refresh(key, &stale, now);
            }
        }
    }
}

/// A pin as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinInfo {
    /// The backend this instance's cache routes the key to.
    pub cached: Option<String>,
    /// The pin in Redis.
    pub stored: Option<crate::affinity::redis::StoredPin>,
}

/// The Redis form of an operator state (`None`: enabled, nothing stored).
fn encode_admin_state(state: AdminState) -> Option<String> {
    match state {
        AdminState::Enabled => None,
        AdminState::Draining { deadline_ms: None } => Some("drain".into()),
        AdminState::Draining {
            deadline_ms: Some(d),
        } => Some(format!("drain:{d}")),
        AdminState::Disabled => Some("disable".into()),
    }
}

fn decode_admin_state(v: &str) -> Option<AdminState> {
    match v {
        "drain" => Some(AdminState::Draining { deadline_ms: None }),
        "disable" => Some(AdminState::Disabled),
        _ => v
            .strip_prefix("drain:")
            .and_then(|d| d.parse().ok())
            .map(|d| AdminState::Draining {
                deadline_ms: Some(d),
            }),
    }
}

/// Whether the `[redis]` settings differ (compared field by field: `Debug` hides the URL).
fn redis_differs(old: &Config, new: &Config) -> bool {
    match (&old.redis, &new.redis) {
        (None, None) => false,
        (Some(a), Some(b)) => {
            a.url != b.url || a.key_prefix != b.key_prefix || a.timeout != b.timeout || a.ca != b.ca
        }
        _ => true,
    }
}

/// What changed between two configurations, for the reload report.
fn diff(old: &Config, new: &Config) -> ReloadReport {
    let ids = |c: &Config| c.backends.iter().map(|b| b.id.clone()).collect::<Vec<_>>();
    let (old_ids, new_ids) = (ids(old), ids(new));
    // Bound at start-up: Pingora's listeners, runtimes and proxy settings, the Redis connection,
    // the key hash and the cache are built once.
    let (o, n) = (old, new);
    let mut restart_required: Vec<String> = crate::http::restart_only(&o.server, &n.server)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let bound = [
        ("admin.listen", o.admin.listen != n.admin.listen),
        ("redis", redis_differs(o, n)),
        (
            "affinity.hash_key",
            o.affinity.hash_key != n.affinity.hash_key,
        ),
        (
            "affinity.cache_entries",
            o.affinity.cache_entries != n.affinity.cache_entries,
        ),
    ];
    restart_required.extend(
        bound
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| name.to_string()),
    );
    ReloadReport {
        added: new_ids
            .iter()
            .filter(|i| !old_ids.contains(i))
            .cloned()
            .collect(),
        removed: old_ids
            .iter()
            .filter(|i| !new_ids.contains(i))
            .cloned()
            .collect(),
        restart_required,
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
    pub(crate) fn open(
        self: &Arc<Self>,
        key: Option<KeyHash>,
        backend: Arc<Backend>,
    ) -> TunnelGuard {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_states_round_trip_through_their_redis_form() {
        for s in [
            AdminState::Enabled,
            AdminState::Draining { deadline_ms: None },
            AdminState::Draining {
                deadline_ms: Some(1_795_000_000_000),
            },
            AdminState::Disabled,
        ] {
            let decoded =
                encode_admin_state(s).map_or(Some(AdminState::Enabled), |v| decode_admin_state(&v));
            assert_eq!(decoded, Some(s));
        }
        assert_eq!(decode_admin_state("drain:soon"), None);
        assert_eq!(decode_admin_state("weird"), None);
    }

    #[test]
    fn diff_names_what_needs_a_restart() {
        let base = "[server]\nlisten = [\"127.0.0.1:8080\"]\n[affinity]\nsources = [\"ip\"]\n[[backend]]\nid = \"a\"\naddress = \"127.0.0.1:3001\"\n";
        let parse = |t: &str| Config::parse(Path::new("t"), t, &Default::default()).unwrap();
        let old = parse(base);
        let new = parse(
            &base
                .replace("8080", "8081")
                .replace("id = \"a\"", "id = \"b\""),
        );
        let r = diff(&old, &new);
        assert_eq!(r.added, vec!["b"]);
        assert_eq!(r.removed, vec!["a"]);
        assert_eq!(r.restart_required, vec!["server.listen"]);
    }
}
