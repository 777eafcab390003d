//! Building blocks the behaviour tests share: config bodies, the Redis key of a session, a
//! bounded concurrent client loop, and a client loop to run operations under ([`LoadLoop`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use tether::affinity::{KeyHash, KeyHasher, source_tag};
use tether::config::KeySource;

use super::{Backend, Balancer, RedisServer, tail, try_get_backend};

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
    let tables: Vec<String> = backends.iter().map(|b| b.toml()).collect();
    config_with(&tables, redis, affinity)
}

/// [`config`] for any backends, given as their `[[backend]]` tables.
pub fn config_with(
    backend_tables: &[String],
    redis: Option<&RedisServer>,
    affinity: &str,
) -> String {
    let mut out = format!("[affinity]\nhash_key = \"{TEST_HASH_KEY}\"\n{affinity}\n\n");
    if let Some(r) = redis {
        out.push_str(&format!(
            "[redis]\nurl = \"{}\"\ntimeout_ms = 200\n\n",
            r.url()
        ));
    }
    for t in backend_tables {
        out.push_str(t);
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

/// How many sessions Redis counts on backend `id`: the buckets of `tether:counts:<id>` that
/// have not ended, never below 0 (as tether's admin API adds them up).
pub fn session_count(redis: &RedisServer, id: &str) -> usize {
    let key = format!("tether:counts:{id}");
    let fields: Vec<(u64, i64)> = redis::cmd("HGETALL")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap_or_else(|e| panic!("HGETALL {key}: {e}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    fields
        .iter()
        .filter(|(end, _)| *end > now)
        .map(|(_, n)| n)
        .sum::<i64>()
        .max(0) as usize
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

// ---------------------------------------------------------------------------------------------
// A client loop under which operations must not fail
// ---------------------------------------------------------------------------------------------

/// A [`LoadLoop`] stops by itself after this long, whatever the test does.
pub const LOAD_LOOP_LIMIT: Duration = Duration::from_secs(120);

/// How a [`LoadLoop`] worker connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connections {
    /// One keep-alive connection (pool of one), reused request after request.
    KeepAlive,
    /// A new TCP connection for every request.
    New,
}

/// One request a [`LoadLoop`] made.
#[derive(Clone, Debug)]
pub struct Sample {
    pub worker: usize,
    /// When the request was sent (before the client wrote anything).
    pub started: Instant,
    /// The session header it carried, if any.
    pub session: Option<String>,
    /// Status and `x-backend-id`, or the transport error.
    pub outcome: Result<(u16, Option<String>), String>,
}

impl Sample {
    /// Answered 200.
    pub fn ok(&self) -> bool {
        matches!(self.outcome, Ok((200, _)))
    }

    /// The backend that answered, if one did.
    pub fn backend(&self) -> Option<&str> {
        match &self.outcome {
            Ok((_, b)) => b.as_deref(),
            Err(_) => None,
        }
    }
}

/// Workers that GET one URL back to back, each waiting for its answer before the next request
/// (so at most `workers` requests are in flight), recording every status and transport error,
/// until [`LoadLoop::stop`] (or [`LOAD_LOOP_LIMIT`]).
pub struct LoadLoop {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: JoinSet<Vec<Sample>>,
}

impl LoadLoop {
    /// Start `workers` workers on `url`. Worker `w` connects as `connections(w)` says and sends
    /// its `n`-th request with the session header `session(w, n)` (`None`: no key).
    pub fn start<C, S>(url: &str, workers: usize, connections: C, session: S) -> LoadLoop
    where
        C: Fn(usize) -> Connections,
        S: Fn(usize, usize) -> Option<String> + Send + Sync + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let session = Arc::new(session);
        let mut tasks = JoinSet::new();
        let until = Instant::now() + LOAD_LOOP_LIMIT;
        for w in 0..workers {
            let http = match connections(w) {
                // Idle connections are dropped after 2 s, before any server closes them (Pingora
                // closes idle ones 5 s into a graceful upgrade): otherwise a request sent on a
                // connection the server closes at that instant fails, with any server.
                Connections::KeepAlive => reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(1)
                    .pool_idle_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(10)),
                Connections::New => reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(10)),
            }
            .build()
            .expect("building a load-loop client");
            let (stop, done, session, url) =
                (stop.clone(), done.clone(), session.clone(), url.to_owned());
            tasks.spawn(async move {
                let mut samples = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    let key = session(w, n);
                    let headers: Vec<(&str, &str)> = key
                        .as_deref()
                        .map(|k| (SESSION_HEADER, k))
                        .into_iter()
                        .collect();
                    let started = Instant::now();
                    let outcome = try_get_backend(&http, &url, &headers)
                        .await
                        .map(|(status, backend, _)| (status, backend))
                        .map_err(|e| format!("{e:?}"));
                    samples.push(Sample {
                        worker: w,
                        started,
                        session: key,
                        outcome,
                    });
                    done.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                samples
            });
        }
        LoadLoop { stop, done, tasks }
    }

    /// Requests answered (or failed) so far.
    pub fn completed(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `more` requests beyond the current count have completed: proof the loop is
    /// running at this point of the test. Panics after `timeout`.
    pub async fn wait_for_more(&self, more: usize, timeout: Duration) {
        let target = self.completed() + more;
        let reached =
            super::eventually(timeout, || std::future::ready(self.completed() >= target)).await;
        assert!(
            reached,
            "the load loop made {} of {target} requests within {timeout:?}",
            self.completed()
        );
    }

    /// Stops the workers (each finishes its current request) and returns every sample.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        while let Some(done) = self.tasks.join_next().await {
            samples.extend(done.expect("load-loop worker panicked"));
        }
        samples.sort_by_key(|s| s.started);
        LoadReport { samples }
    }
}

/// Everything a [`LoadLoop`] saw.
pub struct LoadReport {
    pub samples: Vec<Sample>,
}

impl LoadReport {
    /// Requests that did not answer 200 (other status or transport error).
    pub fn failures(&self) -> Vec<&Sample> {
        self.samples.iter().filter(|s| !s.ok()).collect()
    }

    /// Panics unless every request answered 200, listing the first failures and a count by
    /// kind; `what` names the operation under load.
    pub fn assert_no_failures(&self, what: &str) {
        let failures = self.failures();
        if failures.is_empty() {
            return;
        }
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for f in &failures {
            let kind = match &f.outcome {
                Ok((status, _)) => format!("status {status}"),
                Err(e) => e.chars().take(160).collect(),
            };
            *kinds.entry(kind).or_default() += 1;
        }
        let first = self.samples.first().map(|s| s.started);
        let shown: Vec<String> = failures
            .iter()
            .take(10)
            .map(|f| {
                let at = first.map_or(0, |t| f.started.duration_since(t).as_millis());
                format!(
                    "  +{at} ms worker {} session {:?}: {:?}",
                    f.worker, f.session, f.outcome
                )
            })
            .collect();
        panic!(
            "{what}: {} of {} requests failed\nby kind: {kinds:#?}\nfirst:\n{}",
            failures.len(),
            self.samples.len(),
            shown.join("\n")
        );
    }

    /// Requests answered per backend among those sent at or after `since`.
    pub fn backends_since(&self, since: Instant) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.started >= since) {
            if let Some(b) = s.backend() {
                *out.entry(b.to_owned()).or_default() += 1;
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// A WebSocket client stream.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open `ws://.../ws` (the test backend's echo) through tether with the session header; returns
/// the socket and the backend that accepted the upgrade.
pub async fn open_ws(lb: &Balancer, session: &str) -> (Ws, String) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("ws://127.0.0.1:{}/ws", lb.proxy_port());
    let mut req = url.into_client_request().expect("a valid ws url");
    req.headers_mut()
        .insert(SESSION_HEADER, session.parse().expect("a valid header"));
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("websocket through tether: {e}\n{}", tail(&lb.log(), 30)));
    let id = resp.headers()["x-backend-id"]
        .to_str()
        .expect("ascii id")
        .to_owned();
    (ws, id)
}

/// Send `text`, expect `<backend>:<text>` back within 5 s.
pub async fn echo(ws: &mut Ws, text: &str) -> String {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text)).await.expect("ws send");
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.as_str().to_owned(),
        other => panic!("no echo for {text:?}: {other:?}"),
    }
}
