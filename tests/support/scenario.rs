//! Building blocks the behaviour tests share: config bodies, the Redis key of a session, and a
//! bounded concurrent client loop.

use std::future::Future;
use std::sync::Arc;

use tether::affinity::{KeyHash, KeyHasher, source_tag};
use tether::config::KeySource;

use super::{Backend, RedisServer};

/// Three test backends named a, b and c.
pub async fn three_backends() -> (Backend, Backend, Backend) {
    (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    )
}

/// The `hash_key` every test config uses, so tests can derive Redis keys themselves.
pub const TEST_HASH_KEY: &str = "integration-test-hash-key-0123456789";
/// The insert-cookie secret of the tests that use `insert`.
pub const TEST_INSERT_SECRET: &str = "integration-test-insert-secret-0123";
/// The session header most tests key on.
pub const SESSION_HEADER: &str = "x-session-id";

/// A config body (everything but `[server]`/`[admin]`): `[affinity]` with the test hash key and
/// the given lines (sources, policy...), `[redis]` when given, then the backends. Further
/// sections (`[upstream]`, `[affinity.insert]`) may be appended by the caller.
pub fn config(backends: &[&Backend], redis: Option<&RedisServer>, affinity: &str) -> String {
    let mut out = format!("[affinity]\nhash_key = \"{TEST_HASH_KEY}\"\n{affinity}\n\n");
    if let Some(r) = redis {
        out.push_str(&format!(
            "[redis]\nurl = \"{}\"\ntimeout_ms = 200\n\n",
            r.url()
        ));
    }
    for b in backends {
        out.push_str(&b.toml());
        out.push('\n');
    }
    out
}

/// The keyed hash tether derives for `value` found by `source`.
pub fn key_hash(source: &KeySource, value: &str) -> KeyHash {
    KeyHasher::new(TEST_HASH_KEY.as_bytes()).hash(&source_tag(source), value.as_bytes())
}

/// The Redis key of the session `value` sent in the [`SESSION_HEADER`] header.
pub fn header_pin_key(value: &str) -> String {
    let src = KeySource::Header(http::HeaderName::from_static(SESSION_HEADER));
    format!("tether:pin:{}", key_hash(&src, value))
}

/// The stored value of a Redis key, if any.
pub fn redis_get(redis: &RedisServer, key: &str) -> Option<String> {
    let mut conn = redis.conn();
    redis::cmd("GET")
        .arg(key)
        .query(&mut conn)
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

/// Every `tether:pin:*` key and its value.
pub fn redis_pins(redis: &RedisServer) -> Vec<(String, String)> {
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tether:pin:*")
        .query(&mut conn)
        .expect("KEYS tether:pin:*");
    keys.into_iter()
        .filter_map(|k| {
            let v: Option<String> = redis::cmd("GET").arg(&k).query(&mut conn).expect("GET");
            v.map(|v| (k, v))
        })
        .collect()
}

/// Run `job(i)` for every `i` in `0..n` on `workers` tasks (worker `w` takes `w, w+workers, ...`
/// in order, so one index is never run twice at once) and return the results by index.
pub async fn for_each_concurrently<T, F, Fut>(n: usize, workers: usize, job: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send,
{
    let job = Arc::new(job);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers.min(n.max(1)) {
        let job = job.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            let mut i = w;
            while i < n {
                out.push((i, job(i).await));
                i += workers;
            }
            out
        });
    }
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(done) = set.join_next().await {
        for (i, v) in done.expect("worker task panicked") {
            results[i] = Some(v);
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every index ran"))
        .collect()
}
