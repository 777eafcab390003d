//! The shared pin map in Redis, and what keeps this instance in step with it.
//!
//! Layout (prefix `tether:` by default):
//! - `<prefix>pin:<32 hex>` = `v1:<backend id>`, expiring after the affinity TTL; the hex is the
//!   keyed hash of the session key, never the key itself;
//! - `<prefix>counts:<backend id>`: hash of the pins on that backend by when they expire: field =
//!   the end of an expiry bucket (Unix seconds, a multiple of the bucket width, ttl/256 and at
//!   least 1 s), value = how many pins on that backend expire in it. Every write, move, refresh
//!   and removal moves a pin's +1 between buckets and backends, so the values of the fields still
//!   ahead of now count the sessions pinned there. Counters commute: a worker thread sends the
//!   +1s of its new sessions batched, one `HINCRBY` per backend and bucket every
//!   [`COUNT_INTERVAL`], and a move Redis applies first still balances. Approximate: an expired
//!   pin counts until its bucket ends (up to ttl/256 late), a pin removed by Redis itself
//!   (eviction) until its bucket ends, and a count lost to a timeout is lost. Every change gives
//!   the hash a TTL and two buckets more to live ([`count_hold_ms`]): a backend no configuration
//!   names any more leaves nothing behind;
//! - `<prefix>admin`: hash of backend id -> `drain`, `drain:<deadline unix ms>` or `disable`,
//!   the operator states every instance applies;
//! - channel `<prefix>pins`: `<32 hex> <backend id>` for every reassignment (empty id: unpinned),
//!   applied by every instance to its cache; `admin` when an operator state changed.
//!
//! One multiplexed RESP3 connection (redis-rs `ConnectionManager`) carries the subscription,
//! background and admin commands; it reconnects and resubscribes by itself after a Redis restart.
//! The request path's commands go on one more such connection per thread that sends them (each
//! proxy worker's own), so they do not hop to the Redis runtime's thread and back.
//!
//! Security: the URL may carry a password (`redis://user:password@host`) and is only ever logged
//! through [`redact_url`]; `rediss://` connects with TLS (rustls, `ring` provider), verifying the
//! server's certificate and name against the system's roots or `[redis] ca_file`.
//!
//! Outages: any error or timeout marks Redis down. While down, the request path never waits on
//! Redis (the router uses its cache, then the rendezvous hash) and a prober pings until Redis
//! answers. Sliding-TTL refreshes go through a bounded queue to a background task; when the queue
//! is full a refresh is dropped and retried on a later request.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushKind, Value};
use thread_local::ThreadLocal;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use super::cache::PinCache;
use super::{Hex, KeyHash};
use crate::backend::{BackendKey, Interner, now_ms, unix_ms};
use crate::config::{RedisSettings, redact_url};
use crate::metrics::Metrics;

/// Version prefix of a pin's value. A new format gets a new prefix; readers of the old one treat
/// an unknown prefix as a pin to an unknown backend.
pub const PIN_VERSION: &str = "v1:";

/// The value stored for a pin to backend `id`.
pub fn encode_pin(id: &str) -> String {
    [PIN_VERSION, id].concat()
}

/// The backend id of a stored value, `None` if the format is not one this build reads.
pub fn decode_pin(value: &str) -> Option<&str> {
    value.strip_prefix(PIN_VERSION).filter(|id| !id.is_empty())
}

/// Errors talking to Redis. Never shown to clients: the router fails open on every one.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Redis is marked down; the command was not sent.
    #[error("redis is unavailable (failing open until it answers)")]
    Unavailable,
    #[error("redis command timed out after {0:?}")]
    Timeout(Duration),
    #[error("redis command failed: {0}")]
    Command(#[from] redis::RedisError),
    #[error("redis returned an unexpected reply: {0}")]
    Reply(String),
}

impl RedisError {
    /// What an operator should check for this error, when there is more to say than the error.
    /// The Redis URL itself is never part of an error: redis-rs errors name host and port only.
    pub fn hint(&self) -> Option<&'static str> {
        let RedisError::Command(e) = self else {
            return None;
        };
        let text = e.to_string();
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || text.contains("WRONGPASS")
            || text.contains("NOAUTH")
        {
            Some("check the user and password in [redis] url (or TETHER_REDIS_URL)")
        } else if text.contains("certificate") || text.contains("Certificate") {
            Some(
                "TLS: the server certificate did not verify: check [redis] ca_file and that the certificate names the host of the URL",
            )
        } else if text.contains("tls") || text.contains("TLS") || text.contains("handshake") {
            Some("TLS: check that the port serves TLS (rediss://) and the server's TLS settings")
        } else {
            None
        }
    }

    /// Whether Redis may still execute the command: it was sent, but no answer came in time.
    pub fn is_ambiguous(&self) -> bool {
        match self {
            RedisError::Timeout(_) => true,
            RedisError::Command(e) => e.is_timeout(),
            _ => false,
        }
    }
}

/// Result of a first assignment.
#[derive(Debug, PartialEq, Eq)]
pub enum Assigned {
    /// Our candidate is now the pin.
    Won,
    /// Another writer got there first; this is its value (raw, see [`decode_pin`]).
    Existing(String),
}

/// The start of every script that moves counts: `bucket(at, w)` is the count field of a pin
/// expiring at `at` (Unix ms) with buckets `w` seconds wide: [`bucket_end`] in Lua. `%d`, not
/// `tostring`: Lua 5.1 would print a large number in exponent form.
macro_rules! bucket_lua {
    () => {
        "local function bucket(at, w) return string.format('%d', math.ceil(at / (w * 1000)) * w) end\n"
    };
}
/// `count(k, at, n, ttl, w)`: add `n` to the bucket of `at` in counts hash `k`, which then lives
/// [`count_hold_ms`] longer (a hash nothing touched for that long counts only ended buckets).
/// `repin(k, cur, v, ttl, now, w, prefix, to)`: set pin `k`, which holds `cur`, to `v` for `ttl`
/// ms, and move its count from the backend `cur` names to counts hash `to`.
macro_rules! counting_script {
    ($body:literal) => {
        concat!(
            bucket_lua!(),
            r#"
local function count(k, at, n, ttl, w)
  redis.call('HINCRBY', k, bucket(at, w), n)
  redis.call('PEXPIRE', k, ttl + 2000 * w)
end
local function repin(k, cur, v, ttl, now, w, prefix, to)
  local left = cur and redis.call('PTTL', k) or -2
  redis.call('SET', k, v, 'PX', ttl)
  if left > 0 and string.sub(cur, 1, 3) == 'v1:' then
    count(prefix .. string.sub(cur, 4), now + left, -1, ttl, w)
  end
  count(to, now + ttl, 1, ttl, w)
end
"#,
            $body
        )
    };
}

/// [`bucket_end`] as the scripts compute it (see `tests/failover.rs`, which holds the two equal).
pub const BUCKET_LUA: &str = bucket_lua!();

/// Compare-and-set: replace the pin only if it still holds `expected` (or nothing), publish the
/// change, and return the pin as it now is. Moves the pin's count from the backend it left (the
/// bucket it would have expired in) to the new one.
/// KEYS: pin, new backend's counts; ARGV: expected, new value, ttl ms, channel, key hex,
/// counts-key prefix, now (unix ms), bucket width (s).
const CAS_SCRIPT: &str = counting_script!(
    r#"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  repin(KEYS[1], cur, ARGV[2], ARGV[3], ARGV[7], ARGV[8], ARGV[6], KEYS[2])
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. string.sub(ARGV[2], 4))
  return '+' .. ARGV[2]
end
return cur
"#
);

/// KEYS: pin; ARGV: channel, key hex, counts-key prefix, now (unix ms), bucket width (s), ttl
/// ms. Deletes the pin and its count, tells every instance; returns the value it had.
const UNPIN_SCRIPT: &str = counting_script!(
    r#"
local cur = redis.call('GET', KEYS[1])
if cur == false then return false end
local left = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
if left > 0 and string.sub(cur, 1, 3) == 'v1:' then
  count(ARGV[3] .. string.sub(cur, 4), ARGV[4] + left, -1, ARGV[6], ARGV[5])
end
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' ')
return cur
"#
);

/// KEYS: pin; ARGV: value, ttl ms, now (unix ms), bucket width (s), counts-key prefix. Slides the
/// pin (or restores it if Redis lost it) and moves its count to the bucket it now expires in, on
/// whatever backend Redis holds; returns the value Redis had (nil: restored, and counted).
const REFRESH_SCRIPT: &str = counting_script!(
    r#"
local cur = redis.call('GET', KEYS[1])
local holds = cur
local left = -2
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  holds = ARGV[1]
else
  left = redis.call('PTTL', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if string.sub(holds, 1, 3) == 'v1:' then
  local k = ARGV[5] .. string.sub(holds, 4)
  if cur == false then
    count(k, ARGV[3] + ARGV[2], 1, ARGV[2], ARGV[4])
  elseif left > 0 and bucket(ARGV[3] + left, ARGV[4]) ~= bucket(ARGV[3] + ARGV[2], ARGV[4]) then
    count(k, ARGV[3] + left, -1, ARGV[2], ARGV[4])
    count(k, ARGV[3] + ARGV[2], 1, ARGV[2], ARGV[4])
  end
end
return cur
"#
);

/// Record a pin a backend issued: `SET ... PX ttl` whatever was there, counted on `backend` and
/// no longer where it was (a backend may re-issue a session it already holds: the count moves
/// between buckets, it is not counted twice).
/// KEYS: pin, backend's counts; ARGV: value, ttl ms, now (unix ms), bucket width (s), counts-key
/// prefix.
const LEARN_SCRIPT: &str = counting_script!(
    r#"
repin(KEYS[1], redis.call('GET', KEYS[1]), ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], KEYS[2])
return 1
"#
);

/// KEYS: backends' counts; ARGV: now (Unix s). Per key, the sum of the buckets still ahead of
/// now (never below 0: a move may reach Redis before the count it balances), after deleting the
/// buckets that ended.
const PINNED_SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  local n = 0
  local past = {}
  local all = redis.call('HGETALL', k)
  for j = 1, #all, 2 do
    if tonumber(all[j]) <= now then
      past[#past + 1] = all[j]
    else
      n = n + tonumber(all[j + 1])
    end
  end
  for j = 1, #past, 1000 do
    redis.call('HDEL', k, unpack(past, j, math.min(j + 999, #past)))
  end
  out[i] = math.max(n, 0)
end
return out
"#;

/// Into how many buckets a TTL's worth of expiries is split for counting (see the module doc).
const COUNT_BUCKETS: u64 = 256;

/// The width in seconds of the count buckets for `ttl_ms`.
pub fn bucket_width(ttl_ms: u64) -> u64 {
    ttl_ms.div_ceil(COUNT_BUCKETS * 1000).max(1)
}

/// How long a counts hash lives after its last change: a TTL and two buckets, by when every pin
/// it counted has expired and its bucket ended (so a backend gone from every configuration leaves
/// nothing behind). The scripts' `count`.
pub fn count_hold_ms(ttl_ms: u64) -> u64 {
    ttl_ms + 2000 * bucket_width(ttl_ms)
}

/// The count field (end of its bucket, Unix s) of a pin expiring at `expiry_ms`; the scripts'
/// `bucket`.
pub fn bucket_end(expiry_ms: u64, width: u64) -> u64 {
    expiry_ms.div_ceil(width * 1000) * width
}

/// Payload published on the pins channel when an operator state changes.
const ADMIN_CHANGED: &[u8] = b"admin";

/// A sliding-TTL refresh of one cached pin.
#[derive(Debug)]
pub struct Refresh {
    pub key: KeyHash,
    pub backend: BackendKey,
}

/// This thread's won assignments not yet counted in Redis (see [`RedisMap::count`]): how many
/// per backend and bucket end (Unix s).
#[derive(Default)]
struct Counts {
    pending: RefCell<Vec<(BackendKey, u64, i64)>>,
    /// A task of this thread is due to send them.
    flushing: Cell<bool>,
}

/// Whether Redis answers, shared by the request path, the push handler and the prober.
#[derive(Default)]
struct Liveness {
    up: AtomicBool,
    /// [`now_ms`] when Redis last came up (start-up or reconnect): a pin this instance last
    /// wrote or refreshed before then may have been lost with Redis's data.
    up_since_ms: AtomicU64,
    wake_prober: Notify,
}

impl Liveness {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            self.up_since_ms.store(now_ms(), Ordering::Release);
        }
        Metrics::get().redis_up.set(1);
    }

    fn mark_down(&self, why: &dyn std::fmt::Display) {
        if self.up.swap(false, Ordering::AcqRel) {
            warn!(error = %why, "redis unavailable: failing open (local cache, then rendezvous hash)");
            Metrics::get().redis_up.set(0);
            self.wake_prober.notify_one();
        }
    }
}

/// A worker thread's own request-path connection, and whether it has answered yet
/// ([`RedisMap::request_conn`]).
struct LocalConn {
    conn: Option<ConnectionManager>,
    state: Arc<AtomicU8>,
}

/// Not known to answer, and nobody is trying: the thread's next command starts [`warm`].
const LOCAL_COLD: u8 = 0;
/// [`warm`] is trying.
const LOCAL_WARMING: u8 = 1;
/// It answered: the thread's commands go on it.
const LOCAL_READY: u8 = 2;

/// PING a worker's own connection until it answers (backing off from 100 ms to 5 s), then mark it
/// ready. Ends without it if the connection's [`RedisMap`] is gone (only this task holds `state`).
async fn warm(mut conn: ConnectionManager, state: Arc<AtomicU8>, timeout: Duration) {
    let mut pause = Duration::from_millis(100);
    loop {
        match ping(&mut conn, timeout).await {
            Ok(()) => {
                state.store(LOCAL_READY, Ordering::Release);
                return;
            }
            Err(e) => debug!(error = %e, "a worker's redis connection did not answer yet"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
        if Arc::strong_count(&state) == 1 {
            return;
        }
    }
}

pub struct RedisMap {
    /// The subscription, the prober, the refresher and the admin API.
    conn: ConnectionManager,
    /// The request path's connections: one per thread that asks, made on first use and used once
    /// it answers ([`RedisMap::request_conn`]), so a proxy worker's Redis round trip stays on its
    /// own thread (no hand-off to the Redis runtime's thread and back: two cross-thread wake-ups
    /// per new session, bench s2).
    local: ThreadLocal<LocalConn>,
    counts: ThreadLocal<Counts>,
    client: redis::Client,
    local_config: ConnectionManagerConfig,
    /// `<prefix>pin:`
    prefix: String,
    /// `<prefix>counts:`
    counts_prefix: String,
    /// `<prefix>admin`
    admin_key: String,
    channel: String,
    /// The affinity TTL; a reload may change it.
    ttl_ms: AtomicU64,
    timeout: Duration,
    liveness: Arc<Liveness>,
    /// Woken when an operator state changed (or Redis came back): the state re-reads them.
    admin_changed: Arc<Notify>,
    refresh_tx: mpsc::Sender<Refresh>,
    cas: redis::Script,
    unpin: redis::Script,
    refresh: redis::Script,
    learn: redis::Script,
    pinned: redis::Script,
    cache: Arc<PinCache>,
    interner: Arc<Interner>,
}

/// Where a pin stands in Redis, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPin {
    /// The raw value (`v1:<id>`).
    pub value: String,
    /// Milliseconds left before it expires.
    pub ttl_ms: i64,
}

/// Queue length of pending refreshes; beyond it refreshes are dropped and retried later.
const REFRESH_QUEUE: usize = 16_384;
/// Refreshes sent to Redis in one pipeline.
const REFRESH_BATCH: usize = 256;
/// How long a worker thread collects the counts of its assignments before it sends them (see
/// [`RedisMap::count`]).
const COUNT_INTERVAL: Duration = Duration::from_millis(10);
/// How often each instance deletes the count buckets that ended, whether or not anyone asks for
/// the counts.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

impl RedisMap {
    /// Connect (waiting at most `timeout` x a few for a first answer), subscribe, and start the
    /// refresher and prober on the current Tokio runtime. Redis being down is not an error: tether
    /// starts failing open and the prober connects when Redis answers.
    pub async fn start(
        settings: &RedisSettings,
        ttl: Duration,
        cache: Arc<PinCache>,
        interner: Arc<Interner>,
    ) -> Result<Arc<RedisMap>, RedisError> {
        install_crypto_provider();
        let info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())?;
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let info = info.set_redis_settings(resp3);
        let client = match &settings.ca {
            // A private CA replaces the system's roots for this connection.
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.pem.clone()),
                },
            )?,
            None => redis::Client::open(info)?,
        };
        let url = redact_url(&settings.url);

        let channel = format!("{}pins", settings.key_prefix);
        let liveness = Arc::new(Liveness::default());
        // The push callback runs on the connection's task: keep it short (a cache update).
        let push_cache = cache.clone();
        let push_interner = interner.clone();
        let push_channel = channel.clone();
        let push_liveness = liveness.clone();
        let admin_changed = Arc::new(Notify::new());
        let push_admin = admin_changed.clone();
        let on_push = move |push: redis::PushInfo| -> Result<(), redis::aio::SendError> {
            if push.kind == PushKind::Disconnection {
                // The manager reconnects and resubscribes by itself; until the prober has seen
                // an answer, the request path does not wait on Redis. Messages published
                // meanwhile are lost, which compare-and-set and refreshes repair.
                push_liveness.mark_down(&"connection lost");
            }
            apply_push(
                &push,
                &push_channel,
                &push_cache,
                &push_interner,
                &push_admin,
            );
            Ok(())
        };
        let local_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(250))))
            // Every request-path command is bounded by `within(timeout)` already: a second timer
            // per command inside redis-rs would only cost (bench s2).
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_pipeline_buffer_size(1024);
        let config = local_config
            .clone()
            .set_response_timeout(Some(settings.timeout))
            .set_push_sender(on_push)
            .set_automatic_resubscription();
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;

        let (refresh_tx, refresh_rx) = mpsc::channel(REFRESH_QUEUE);
        let map = Arc::new(RedisMap {
            conn,
            local: ThreadLocal::new(),
            counts: ThreadLocal::new(),
            client,
            local_config,
            prefix: format!("{}pin:", settings.key_prefix),
            counts_prefix: format!("{}counts:", settings.key_prefix),
            admin_key: format!("{}admin", settings.key_prefix),
            channel,
            ttl_ms: AtomicU64::new(ttl.as_millis() as u64),
            timeout: settings.timeout,
            liveness,
            admin_changed,
            refresh_tx,
            cas: redis::Script::new(CAS_SCRIPT),
            unpin: redis::Script::new(UNPIN_SCRIPT),
            refresh: redis::Script::new(REFRESH_SCRIPT),
            learn: redis::Script::new(LEARN_SCRIPT),
            pinned: redis::Script::new(PINNED_SCRIPT),
            cache,
            interner,
        });
        Metrics::get().redis_up.set(0);
        match map.connect().await {
            Ok(()) => {
                info!(%url, tls = settings.url.starts_with("rediss://"), "connected to redis")
            }
            Err(e) => {
                warn!(%url, error = %e, hint = e.hint(), "redis unreachable at start-up: failing open until it answers");
                map.liveness.wake_prober.notify_one();
            }
        }
        tokio::spawn(map.clone().prober());
        tokio::spawn(map.clone().refresher(refresh_rx));
        tokio::spawn(map.clone().pruner());
        Ok(map)
    }

    /// Ping and subscribe; mark up on success.
    async fn connect(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let timeout = self.timeout.max(Duration::from_millis(500));
        ping(&mut conn, timeout).await?;
        within(timeout, conn.subscribe(&self.channel)).await?;
        // The workers' own connections too: one that lost its socket fails its next command
        // (and reconnects), which must be this PING rather than a request's.
        // One that cannot answer (Redis refuses more clients, say) leaves its thread on the shared
        // connection and is warmed again on its thread's next command.
        for local in self.local.iter() {
            let Some(conn) = &local.conn else { continue };
            match ping(&mut conn.clone(), timeout).await {
                Ok(()) => local.state.store(LOCAL_READY, Ordering::Release),
                Err(e) => {
                    debug!(error = %e, "a worker's redis connection did not answer: it uses the shared one");
                    let _ = local.state.compare_exchange(
                        LOCAL_READY,
                        LOCAL_COLD,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
        }
        self.liveness.mark_up();
        // Operator states may have changed while we could not hear about it.
        self.admin_changed.notify_one();
        Ok(())
    }

    /// Whether the request path should talk to Redis.
    pub fn is_up(&self) -> bool {
        self.liveness.is_up()
    }

    /// [`now_ms`] when Redis last came up. A pin refreshed at or before this instant is not known
    /// to be in Redis any more (a restart loses what was not persisted): refresh it (the refresh
    /// restores it, or follows what another instance wrote meanwhile).
    pub fn up_since_ms(&self) -> u64 {
        self.liveness.up_since_ms.load(Ordering::Acquire)
    }

    fn mark_down(&self, error: &RedisError) {
        Metrics::get().redis_errors.inc();
        self.liveness.mark_down(error);
    }

    /// The Redis key of a pin, as a command argument.
    pub fn redis_key(&self, key: KeyHash) -> PinKey<'_> {
        PinKey {
            prefix: &self.prefix,
            hex: key.hex(),
        }
    }

    /// The hash counting the pins on backend `id`.
    fn counts_key(&self, id: &str) -> String {
        [self.counts_prefix.as_str(), id].concat()
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl_ms.load(Ordering::Relaxed)
    }

    /// Apply a reloaded affinity TTL to future writes and refreshes.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(ttl.as_millis() as u64, Ordering::Relaxed);
    }

    /// Woken when operator states may have changed.
    pub fn admin_changed(&self) -> &Notify {
        &self.admin_changed
    }

    /// The connection for a request-path command on this thread: its own once that has answered
    /// a PING, the shared one until then. The first time a thread asks, its own connection is
    /// made (lazily) and warmed in the background, so no request waits on a connect: a connect on
    /// a loaded machine can outlast `timeout_ms`, and one Redis refuses (`maxclients`) would fail
    /// every request sent on it and mark Redis down while the shared connection works.
    fn request_conn(&self) -> ConnectionManager {
        let local = self.local.get_or(|| LocalConn {
            conn: ConnectionManager::new_lazy_with_config(
                self.client.clone(),
                self.local_config.clone(),
            )
            // Only a configuration the shared connection was built from gets here.
            .map_err(|e| debug!(error = %e, "no redis connection of this thread's own"))
            .ok(),
            state: Arc::new(AtomicU8::new(LOCAL_COLD)),
        });
        let Some(conn) = &local.conn else {
            return self.conn.clone();
        };
        if local.state.load(Ordering::Acquire) == LOCAL_READY {
            return conn.clone();
        }
        // Only the first command to find it cold starts the warming.
        let cold = local.state.compare_exchange(
            LOCAL_COLD,
            LOCAL_WARMING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if cold.is_ok() {
            let timeout = self.timeout.max(Duration::from_millis(500));
            tokio::spawn(warm(conn.clone(), local.state.clone(), timeout));
        }
        self.conn.clone()
    }

    /// Run one command, pipeline or script of a proxy worker (a request's, or its thread's batched
    /// counts) on the thread's connection: skipped while down, bounded by the timeout, timed, and
    /// marking Redis down on failure.
    async fn call<T: redis::FromRedisValue + Send>(
        &self,
        command: &impl Query,
    ) -> Result<T, RedisError> {
        if !self.is_up() {
            return Err(RedisError::Unavailable);
        }
        let mut conn = self.request_conn();
        let start = Instant::now();
        let result = within(self.timeout, command.query(&mut conn)).await;
        Metrics::get()
            .redis_duration
            .observe(start.elapsed().as_secs_f64());
        result.inspect_err(|e| self.mark_down(e))
    }

    /// First assignment: `SET key v1:<id> NX PX ttl GET`, one round trip: a new key almost
    /// always wins. If another instance won the race, its value comes back and the caller adopts
    /// it. A win is counted on `backend` a little later ([`RedisMap::count`]).
    pub async fn assign(
        self: &Arc<Self>,
        key: KeyHash,
        id: &str,
        backend: BackendKey,
    ) -> Result<Assigned, RedisError> {
        let ttl = self.ttl_ms();
        // Every new session builds this command: sized once, the key and the value written
        // straight into it (argument by argument from empty, its two vectors grew five times,
        // and the key and the value were strings of their own).
        let key = self.redis_key(key);
        let pin = PinValue(id);
        let mut set = redis::Cmd::with_capacity(7, 32 + key.len() + pin.len());
        set.arg("SET")
            .arg(key)
            .arg(pin)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .arg("GET");
        let old: Option<String> = self.call(&set).await?;
        Ok(match old {
            None => {
                self.count(backend, unix_ms() + ttl, ttl);
                Assigned::Won
            }
            Some(v) => Assigned::Existing(v),
        })
    }

    /// Count a pin this thread just assigned on `backend`, expiring at `expiry_ms`. A `ZADD` per
    /// assignment once cost Redis as much CPU as the `SET` itself, and a batched `ZADD` with a
    /// member per session still cost tether and Redis ~20% of bench s2's rate: the counts are
    /// only numbers now, added up per backend and bucket on this thread and sent every
    /// [`COUNT_INTERVAL`], one `HINCRBY` each. Lost if tether stops within that interval.
    fn count(self: &Arc<Self>, backend: BackendKey, expiry_ms: u64, ttl_ms: u64) {
        let bucket = bucket_end(expiry_ms, bucket_width(ttl_ms));
        let counts = self.counts.get_or_default();
        add_count(&mut counts.pending.borrow_mut(), backend, bucket, 1);
        if !counts.flushing.replace(true) {
            // Proxy workers run current-thread runtimes (server.rs: no work stealing): the task
            // stays on this thread and sends this thread's counts.
            tokio::spawn(self.clone().send_counts());
        }
    }

    /// Task of one worker thread: every [`COUNT_INTERVAL`], while it has counts pending, send
    /// them. Counts Redis did not take (down, or it refused them) are kept and sent again, the
    /// pause doubling up to 5 s; after a timeout they may have been applied, and are dropped.
    async fn send_counts(self: Arc<Self>) {
        let mut pause = COUNT_INTERVAL;
        loop {
            tokio::time::sleep(pause).await;
            let now_s = unix_ms() / 1000;
            // Not held across an await: `Counts` is this thread's, not `Sync`.
            let mut batch = {
                let counts = self.counts.get_or_default();
                let mut batch = counts.pending.take();
                // Buckets that ended count nothing any more.
                batch.retain(|&(_, bucket, n)| bucket > now_s && n != 0);
                if batch.is_empty() {
                    counts.flushing.set(false);
                    return;
                }
                batch
            };
            let hold = count_hold_ms(self.ttl_ms());
            let mut pipe = redis::pipe();
            for &(backend, bucket, n) in &batch {
                let key = self.counts_key(&self.interner.name(backend));
                pipe.cmd("HINCRBY").arg(&key).arg(bucket).arg(n).ignore();
                pipe.cmd("PEXPIRE").arg(&key).arg(hold).ignore();
            }
            // On failure `call` marked Redis down.
            match self.call::<()>(&pipe).await {
                Err(e) if !e.is_ambiguous() => {
                    let counts = self.counts.get_or_default();
                    let mut pending = counts.pending.borrow_mut();
                    for (backend, bucket, n) in batch.drain(..) {
                        add_count(&mut pending, backend, bucket, n);
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                // Taken, or perhaps taken (a timeout): sending it again could count it twice.
                _ => pause = COUNT_INTERVAL,
            }
        }
    }

    /// Record a pin the backend itself created (its Set-Cookie): it is set whatever was there,
    /// the backend that issued a session id is its authority ([`LEARN_SCRIPT`], which also moves
    /// its count).
    pub async fn learn(&self, key: KeyHash, id: &str) -> Result<(), RedisError> {
        let ttl = self.ttl_ms();
        let mut inv = self.learn.key(self.redis_key(key));
        inv.key(self.counts_key(id))
            .arg(PinValue(id))
            .arg(ttl)
            .arg(unix_ms())
            .arg(bucket_width(ttl))
            .arg(&self.counts_prefix);
        let _: i64 = self.call(&inv).await?;
        Ok(())
    }

    /// Move a pin from `expected` (a raw stored value, `None` if it was missing) to `id`, unless
    /// another instance moved it first; returns the raw value that now holds. Publishes the move.
    pub async fn compare_and_set(
        &self,
        key: KeyHash,
        expected: Option<&str>,
        id: &str,
    ) -> Result<(bool, String), RedisError> {
        let ttl = self.ttl_ms();
        let mut inv = self.cas.key(self.redis_key(key));
        inv.key(self.counts_key(id))
            .arg(expected.unwrap_or(""))
            .arg(PinValue(id))
            .arg(ttl)
            .arg(&self.channel)
            .arg(key.hex().as_str())
            .arg(&self.counts_prefix)
            .arg(unix_ms())
            .arg(bucket_width(ttl));
        let v: String = self.call(&inv).await?;
        Ok(match v.strip_prefix('+') {
            Some(ours) => (true, ours.to_string()),
            None => (false, v),
        })
    }

    /// Where `key` is pinned in Redis (admin API; not on the request path).
    pub async fn lookup(&self, key: KeyHash) -> Result<Option<StoredPin>, RedisError> {
        let k = self.redis_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&k).cmd("PTTL").arg(&k);
        let (value, ttl_ms): (Option<String>, i64) = self.admin_call(&pipe).await?;
        Ok(value.map(|value| StoredPin { value, ttl_ms }))
    }

    /// Remove the pin of `key` everywhere (Redis, its count, every instance's cache).
    /// Returns the value it had, if any.
    pub async fn unpin(&self, key: KeyHash) -> Result<Option<String>, RedisError> {
        let mut inv = self.unpin.key(self.redis_key(key));
        inv.arg(&self.channel)
            .arg(key.hex().as_str())
            .arg(&self.counts_prefix)
            .arg(unix_ms())
            .arg(bucket_width(self.ttl_ms()))
            .arg(self.ttl_ms());
        self.admin_call(&inv).await
    }

    /// Sessions pinned to each of `ids` (deleting the buckets that ended first).
    pub async fn pinned_counts(&self, ids: &[Arc<str>]) -> Result<Vec<u64>, RedisError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.pinned.prepare_invoke();
        for id in ids {
            inv.key(self.counts_key(id));
        }
        inv.arg(unix_ms() / 1000);
        self.admin_call(&inv).await
    }

    /// Background task: every [`PRUNE_INTERVAL`], delete the count buckets that ended of every
    /// backend this process knows, so that the hashes stay ~256 fields even where nobody reads
    /// the counts.
    async fn pruner(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PRUNE_INTERVAL).await;
            if !self.is_up() {
                continue;
            }
            let ids = self.interner.names();
            if let Err(e) = self.pinned_counts(&ids).await {
                debug!(error = %e, "pruning the session counts failed; trying again later");
            }
        }
    }

    /// The operator states stored in Redis: backend id -> raw state.
    pub async fn load_admin_states(&self) -> Result<HashMap<String, String>, RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&self.admin_key);
        let (map,): (HashMap<String, String>,) = self.admin_call(&pipe).await?;
        Ok(map)
    }

    /// Store (or with `None`, clear) backend `id`'s operator state and tell every instance.
    pub async fn store_admin_state(&self, id: &str, state: Option<&str>) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        match state {
            Some(v) => pipe
                .cmd("HSET")
                .arg(&self.admin_key)
                .arg(id)
                .arg(v)
                .ignore(),
            None => pipe.cmd("HDEL").arg(&self.admin_key).arg(id).ignore(),
        };
        pipe.cmd("PUBLISH")
            .arg(&self.channel)
            .arg(ADMIN_CHANGED)
            .ignore();
        self.admin_call(&pipe).await
    }

    /// Run an admin command, pipeline or script: refused while Redis is down, bounded by a few
    /// timeouts, on the shared connection.
    async fn admin_call<T: redis::FromRedisValue + Send>(
        &self,
        command: &impl Query,
    ) -> Result<T, RedisError> {
        if !self.is_up() {
            return Err(RedisError::Unavailable);
        }
        let mut conn = self.conn.clone();
        within(self.timeout * 5, command.query(&mut conn))
            .await
            .inspect_err(|e| self.mark_down(e))
    }

    /// Queue a sliding-TTL refresh. Never waits: a full queue drops it (the pin is marked
    /// unsynced and a later request retries).
    pub fn refresh(&self, key: KeyHash, backend: BackendKey) {
        if self.refresh_tx.try_send(Refresh { key, backend }).is_err() {
            Metrics::get()
                .refreshes
                .with_label_values(&["dropped"])
                .inc();
            self.cache.mark_unsynced(key, backend, now_ms());
        }
    }

    /// Background task: send queued refreshes in pipelined batches of [`REFRESH_SCRIPT`]: slide
    /// the pin's TTL (or restore it if Redis lost it, e.g. after a restart) and its count
    /// entry; the cache then takes what Redis holds.
    async fn refresher(self: Arc<Self>, mut rx: mpsc::Receiver<Refresh>) {
        let mut batch = Vec::with_capacity(REFRESH_BATCH);
        while rx.recv_many(&mut batch, REFRESH_BATCH).await > 0 {
            let jobs: Vec<(Refresh, Arc<str>)> = batch
                .drain(..)
                .map(|r| {
                    let id = self.interner.name(r.backend);
                    (r, id)
                })
                .collect();
            let now = now_ms();
            if !self.is_up() {
                self.refreshes_failed(&jobs, now);
                continue;
            }
            let result = self.send_refreshes(&jobs).await;
            match result {
                Ok(values) => {
                    let m = &Metrics::get().refreshes;
                    for ((r, id), value) in jobs.iter().zip(values) {
                        let outcome = self.apply_refresh(r, id, value.as_deref(), now);
                        m.with_label_values(&[outcome]).inc();
                    }
                }
                Err(e) => {
                    self.refreshes_failed(&jobs, now);
                    self.mark_down(&e);
                }
            }
        }
    }

    /// One pipeline of refresh scripts (EVALSHA); after a Redis restart the script cache is empty,
    /// so a NOSCRIPT answer loads the script and sends the batch once more.
    async fn send_refreshes(
        &self,
        jobs: &[(Refresh, Arc<str>)],
    ) -> Result<Vec<Option<String>>, RedisError> {
        let ttl = self.ttl_ms();
        let now = unix_ms();
        let width = bucket_width(ttl);
        let mut pipe = redis::pipe();
        for (r, id) in jobs {
            pipe.cmd("EVALSHA")
                .arg(self.refresh.get_hash())
                .arg(1)
                .arg(self.redis_key(r.key))
                .arg(PinValue(id))
                .arg(ttl)
                .arg(now)
                .arg(width)
                .arg(&self.counts_prefix);
        }
        let mut conn = self.conn.clone();
        let timeout = self.timeout * 4;
        match within(timeout, pipe.query_async(&mut conn)).await {
            Err(RedisError::Command(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(REFRESH_SCRIPT);
                let _: String = within(timeout, load.query_async(&mut conn)).await?;
                within(timeout, pipe.query_async(&mut conn)).await
            }
            other => other,
        }
    }

    /// Refreshes that did not reach Redis: their pins are written on a later request.
    fn refreshes_failed(&self, jobs: &[(Refresh, Arc<str>)], now: u64) {
        for (r, _) in jobs {
            self.cache.mark_unsynced(r.key, r.backend, now);
        }
        Metrics::get()
            .refreshes
            .with_label_values(&["failed"])
            .inc_by(jobs.len() as u64);
    }

    /// Bring the cache in line with one refresh reply; returns the outcome label.
    fn apply_refresh(&self, r: &Refresh, id: &str, stored: Option<&str>, now: u64) -> &'static str {
        match stored {
            // NX set it: Redis had lost the pin (restart, eviction) and has it again.
            None => {
                self.cache.update_if_cached(r.key, r.backend, now);
                "restored"
            }
            Some(v) if decode_pin(v) == Some(id) => {
                self.cache.update_if_cached(r.key, r.backend, now);
                "ok"
            }
            // Another instance moved it: follow Redis, or forget the pin if it names a backend
            // this instance does not know (the next request reassigns with compare-and-set).
            Some(v) => {
                match decode_pin(v).and_then(|id| self.interner.lookup(id)) {
                    Some(k) => {
                        self.cache.update_if_cached(r.key, k, now);
                    }
                    None => self.cache.remove(r.key),
                }
                "changed"
            }
        }
    }

    /// Background task: while Redis is down, ping it with backoff; resubscribe when it answers.
    async fn prober(self: Arc<Self>) {
        loop {
            self.liveness.wake_prober.notified().await;
            let mut delay = Duration::from_millis(100);
            while !self.is_up() {
                tokio::time::sleep(delay).await;
                match self.connect().await {
                    Ok(()) => info!("redis answers again: pins are written and refreshed again"),
                    Err(e) => debug!(error = %e, "redis still unavailable"),
                }
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Apply one push message: a reassignment published by some instance, or a disconnection.
fn apply_push(
    push: &redis::PushInfo,
    channel: &str,
    cache: &PinCache,
    interner: &Interner,
    admin_changed: &Notify,
) {
    if push.kind != PushKind::Message {
        return;
    }
    let [Value::BulkString(ch), Value::BulkString(payload)] = push.data.as_slice() else {
        return;
    };
    if ch.as_slice() != channel.as_bytes() {
        return;
    }
    if payload.as_slice() == ADMIN_CHANGED {
        admin_changed.notify_one();
        return;
    }
    let Some((hex, id)) = std::str::from_utf8(payload)
        .ok()
        .and_then(|p| p.split_once(' '))
    else {
        return;
    };
    let Some(key) = KeyHash::parse(hex) else {
        return;
    };
    let now = now_ms();
    match interner.lookup(id) {
        Some(backend) => {
            if cache.update_if_cached(key, backend, now) {
                Metrics::get().invalidations.inc();
            }
        }
        // A backend this instance does not know: forget the pin, the next request reassigns.
        None => cache.remove(key),
    }
}

/// Make `ring` rustls's process-wide crypto provider, once. redis-rs builds its TLS config with
/// the process default; relying on crate features to pick one would panic at the first `rediss://`
/// connection if another dependency ever enabled a second provider.
pub fn install_crypto_provider() {
    // Err means a provider is already installed: keep it.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A command, a pipeline or a script invocation, for [`RedisMap::call`] and
/// [`RedisMap::admin_call`].
trait Query: Sync {
    fn query<T: redis::FromRedisValue + Send>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send;
}

impl Query for redis::Cmd {
    fn query<T: redis::FromRedisValue + Send>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

impl Query for redis::ScriptInvocation<'_> {
    fn query<T: redis::FromRedisValue + Send>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.invoke_async(conn)
    }
}

impl Query for redis::Pipeline {
    fn query<T: redis::FromRedisValue + Send>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

/// A pin's Redis key (`<prefix><32 hex digits>`), written into a command as one argument
/// without a string of its own.
pub struct PinKey<'a> {
    prefix: &'a str,
    hex: Hex,
}

impl PinKey<'_> {
    fn len(&self) -> usize {
        self.prefix.len() + self.hex.as_str().len()
    }
}

impl redis::ToRedisArgs for PinKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        write_parts(out, &[self.prefix.as_bytes(), self.hex.as_str().as_bytes()]);
    }
}

/// The stored value of a pin to backend `id` ([`encode_pin`]'s), as a command argument.
struct PinValue<'a>(&'a str);

impl PinValue<'_> {
    fn len(&self) -> usize {
        PIN_VERSION.len() + self.0.len()
    }
}

impl redis::ToRedisArgs for PinValue<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        write_parts(out, &[PIN_VERSION.as_bytes(), self.0.as_bytes()]);
    }
}

/// Write `parts` as one argument, straight into the command's buffer.
fn write_parts<W: ?Sized + redis::RedisWrite>(out: &mut W, parts: &[&[u8]]) {
    use std::io::Write;
    let mut arg = out.writer_for_next_arg();
    for part in parts {
        arg.write_all(part)
            .expect("a command buffer takes every byte");
    }
}

/// Add `n` to the pending count of `backend`'s `bucket`.
fn add_count(pending: &mut Vec<(BackendKey, u64, i64)>, backend: BackendKey, bucket: u64, n: i64) {
    match pending
        .iter_mut()
        .find(|(b, end, _)| *b == backend && *end == bucket)
    {
        Some(entry) => entry.2 += n,
        None => pending.push((backend, bucket, n)),
    }
}

/// PING `conn` within `timeout`; anything but `PONG` is an error.
async fn ping(conn: &mut ConnectionManager, timeout: Duration) -> Result<(), RedisError> {
    let pong: String = within(timeout, redis::cmd("PING").query_async(conn)).await?;
    if pong != "PONG" {
        return Err(RedisError::Reply(pong));
    }
    Ok(())
}

async fn within<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(RedisError::Command),
        Err(_) => Err(RedisError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_format_is_v1() {
        // Persisted state shared by every instance and version: this format must not change
        // without a new prefix.
        assert_eq!(encode_pin("app1"), "v1:app1");
        assert_eq!(decode_pin("v1:app1"), Some("app1"));
        assert_eq!(decode_pin("v1:"), None);
        assert_eq!(decode_pin("v2:app1"), None);
        assert_eq!(decode_pin("app1"), None);
    }

    #[test]
    fn pin_keys_and_values_are_one_argument_each_of_their_parts() {
        let key = PinKey {
            prefix: "tether:pin:",
            hex: KeyHash(0xff).hex(),
        };
        let hex = KeyHash(0xff).hex();
        let mut parts = redis::cmd("SET");
        parts.arg(&key).arg(PinValue("b1")).arg(7u64);
        let mut plain = redis::cmd("SET");
        plain
            .arg(["tether:pin:", hex.as_str()].concat())
            .arg(encode_pin("b1"))
            .arg(7u64);
        assert_eq!(parts.get_packed_command(), plain.get_packed_command());
        assert_eq!(key.len(), "tether:pin:".len() + 32);
        assert_eq!(PinValue("b1").len(), encode_pin("b1").len());
    }

    #[test]
    fn push_messages_update_only_cached_keys() {
        let cache = PinCache::new(10, 60_000);
        let interner = Interner::default();
        let a = interner.intern("a");
        let b = interner.intern("b");
        let cached = KeyHash(1);
        let other = KeyHash(2);
        let now = now_ms();
        cache.put(cached, a, now, true);
        let msg = |k: KeyHash, id: &str| redis::PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(b"tether:pins".to_vec()),
                Value::BulkString(format!("{k} {id}").into_bytes()),
            ],
        };
        let notify = Notify::new();
        apply_push(&msg(cached, "b"), "tether:pins", &cache, &interner, &notify);
        apply_push(&msg(other, "b"), "tether:pins", &cache, &interner, &notify);
        assert_eq!(cache.get(cached, now).unwrap().backend, b);
        assert!(cache.get(other, now).is_none());
        // Another channel, garbage, and unknown backends.
        apply_push(&msg(cached, "a"), "other", &cache, &interner, &notify);
        assert_eq!(cache.get(cached, now).unwrap().backend, b);
        let junk = redis::PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(b"tether:pins".to_vec()),
                Value::BulkString(b"\xff zz".to_vec()),
            ],
        };
        apply_push(&junk, "tether:pins", &cache, &interner, &notify);
        apply_push(
            &msg(cached, "gone"),
            "tether:pins",
            &cache,
            &interner,
            &notify,
        );
        assert!(cache.get(cached, now).is_none());
    }
}
