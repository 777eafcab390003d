//! Faults under continuous load: a backend SIGKILLed and restarted, Redis killed for seconds,
//! tether itself SIGKILLed (alone, or one of two instances), backends that answer too late, never
//! answer or reset mid-response, and a storm of reloads. Each test runs a bounded client loop
//! (every request recorded, errors included), injects the fault, polls for its effect with
//! deadlines, and asserts on the whole record at the end.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::rideshare::serde_json::{self, Value};
use tokio::task::JoinSet;

use support::faulty::{FaultyBackend, KillableApp, Mode, TOKEN_HEADER};
use support::rideshare::{Agent, COOKIE, Rideshare, SioClient};
use support::scenario::*;
use support::*;

/// Deadline for anything the tests wait for: a fault's effect, a recovery, load progress.
const SOON: Duration = Duration::from_secs(15);

/// Header-keyed sessions, new keys assigned round-robin (so every backend gets some).
const HEADER_SESSIONS: &str = "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"";

// ---------------------------------------------------------------------------------------------
// A client loop that records everything
// ---------------------------------------------------------------------------------------------

/// One request a [`Traffic`] worker makes.
#[derive(Clone, Debug)]
struct Req {
    /// Path (and query) on the balancer.
    path: String,
    /// The session it belongs to (for the record; sent only through `headers`).
    session: String,
    /// Headers to send: the session header, a cookie...
    headers: Vec<(&'static str, String)>,
    /// POST (not idempotent) rather than GET.
    post: bool,
}

impl Req {
    /// GET `/` with the session header.
    fn get(session: String) -> Req {
        Req {
            path: "/".to_owned(),
            headers: vec![(SESSION_HEADER, session.clone())],
            session,
            post: false,
        }
    }

    /// POST `/` with the session header.
    fn post(session: String) -> Req {
        Req {
            post: true,
            ..Req::get(session)
        }
    }
}

/// One request as a [`Traffic`] worker saw it.
#[derive(Clone, Debug)]
struct Hit {
    worker: usize,
    started: Instant,
    ended: Instant,
    session: String,
    post: bool,
    /// Unique per request (and per attempt): sent in [`TOKEN_HEADER`].
    token: String,
    /// The status, if response headers arrived.
    status: Option<u16>,
    /// `x-backend-id`, if response headers arrived.
    backend: Option<String>,
    /// The body, if it was read completely.
    body: Option<String>,
    /// The transport error (connect, reset, incomplete body...), if any.
    error: Option<String>,
    /// The error was a failure to connect to the balancer itself.
    refused: bool,
}

impl Hit {
    /// 200 with a complete body.
    fn ok(&self) -> bool {
        self.status == Some(200) && self.error.is_none()
    }

    fn elapsed(&self) -> Duration {
        self.ended - self.started
    }

    /// The backend of a successful answer.
    fn ok_backend(&self) -> Option<&str> {
        if self.ok() {
            self.backend.as_deref()
        } else {
            None
        }
    }

    fn describe(&self, origin: Instant) -> String {
        format!(
            "+{} ms ({} ms) worker {} {} {} token {}: status {:?} backend {:?} error {:?}",
            self.started.duration_since(origin).as_millis(),
            self.elapsed().as_millis(),
            self.worker,
            if self.post { "POST" } else { "GET" },
            self.session,
            self.token,
            self.status,
            self.backend,
            self.error
                .as_deref()
                .map(|e| e.chars().take(200).collect::<String>()),
        )
    }
}

/// How a [`Traffic`] loop behaves.
#[derive(Clone, Copy)]
struct TrafficOptions {
    /// Keep-alive (one pooled connection per worker) or a new connection per request.
    connections: fn(usize) -> Connections,
    /// Send a request again (with a new token) after a transport error, one poll interval later:
    /// for a client that keeps trying while the balancer itself is down. The failed attempt is
    /// recorded.
    retry_transport_errors: bool,
}

impl Default for TrafficOptions {
    fn default() -> Self {
        TrafficOptions {
            connections: |_| Connections::KeepAlive,
            retry_transport_errors: false,
        }
    }
}

/// Workers that send requests back to back (at most one in flight each), as `plan(worker, n)`
/// says, and record every outcome, until [`Traffic::stop`] or [`LOAD_LOOP_LIMIT`].
struct Traffic {
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<Hit>>>,
    tasks: JoinSet<()>,
    origin: Instant,
}

impl Traffic {
    fn start<P>(base: &str, workers: usize, options: TrafficOptions, plan: P) -> Traffic
    where
        P: Fn(usize, usize) -> Req + Send + Sync + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let plan = Arc::new(plan);
        let origin = Instant::now();
        let until = origin + LOAD_LOOP_LIMIT;
        let mut tasks = JoinSet::new();
        for w in 0..workers {
            let http = match (options.connections)(w) {
                // Idle connections are dropped after 2 s, before any server closes them.
                Connections::KeepAlive => reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .pool_idle_timeout(Duration::from_secs(2)),
                Connections::New => reqwest::Client::builder().pool_max_idle_per_host(0),
            }
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("building a traffic client");
            let (stop, hits, plan, base) =
                (stop.clone(), hits.clone(), plan.clone(), base.to_owned());
            tasks.spawn(async move {
                let mut n = 0;
                let mut attempt = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    let req = plan(w, n);
                    let token = format!("{w}-{n}-{attempt}");
                    let hit = send(&http, &base, w, &req, token).await;
                    let retry = options.retry_transport_errors && hit.error.is_some();
                    hits.lock().expect("hits lock").push(hit);
                    if retry {
                        attempt += 1;
                        tokio::time::sleep(POLL_INTERVAL).await;
                    } else {
                        attempt = 0;
                        n += 1;
                    }
                }
            });
        }
        Traffic {
            stop,
            hits,
            tasks,
            origin,
        }
    }

    /// Requests completed (or failed) so far.
    fn count(&self) -> usize {
        self.hits.lock().expect("hits lock").len()
    }

    /// A copy of every hit so far.
    fn snapshot(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits lock").clone()
    }

    /// Waits until `more` requests beyond the current count have completed; panics after
    /// [`SOON`].
    async fn wait_for_more(&self, more: usize) {
        let target = self.count() + more;
        let reached = eventually(SOON, || std::future::ready(self.count() >= target)).await;
        assert!(
            reached,
            "the client loop made {} of {target} requests within {SOON:?}",
            self.count()
        );
    }

    /// Waits until `condition` holds on the hits so far; panics with `what` after [`SOON`].
    async fn wait_until(&self, what: &str, condition: impl Fn(&[Hit]) -> bool) {
        let ok = eventually(SOON, || {
            std::future::ready(condition(&self.hits.lock().expect("hits lock")))
        })
        .await;
        assert!(ok, "{what}: not seen within {SOON:?}");
    }

    /// Stops the workers (each finishes its request in flight) and returns every hit, oldest
    /// first.
    async fn stop(mut self) -> (Vec<Hit>, Instant) {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(done) = self.tasks.join_next().await {
            done.expect("traffic worker panicked");
        }
        let mut hits = std::mem::take(&mut *self.hits.lock().expect("hits lock"));
        hits.sort_by_key(|h| h.started);
        (hits, self.origin)
    }
}

async fn send(http: &reqwest::Client, base: &str, worker: usize, req: &Req, token: String) -> Hit {
    let url = format!("{base}{}", req.path);
    let mut builder = if req.post {
        http.post(&url).body(format!("payload of {token}"))
    } else {
        http.get(&url)
    };
    builder = builder.header(TOKEN_HEADER, &token);
    for (k, v) in &req.headers {
        builder = builder.header(*k, v);
    }
    let started = Instant::now();
    let mut hit = Hit {
        worker,
        started,
        ended: started,
        session: req.session.clone(),
        post: req.post,
        token,
        status: None,
        backend: None,
        body: None,
        error: None,
        refused: false,
    };
    match builder.send().await {
        Ok(resp) => {
            hit.status = Some(resp.status().as_u16());
            hit.backend = resp
                .headers()
                .get("x-backend-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match resp.text().await {
                Ok(body) => hit.body = Some(body),
                Err(e) => hit.error = Some(format!("reading the body: {e:?}")),
            }
        }
        Err(e) => {
            hit.refused = e.is_connect();
            hit.error = Some(format!("{e:?}"));
        }
    }
    hit.ended = Instant::now();
    hit
}

/// Panics listing the hits that fail `expected`, with a count by kind.
fn assert_all(hits: &[&Hit], origin: Instant, what: &str, expected: impl Fn(&Hit) -> bool) {
    let bad: Vec<&&Hit> = hits.iter().filter(|h| !expected(h)).collect();
    if bad.is_empty() {
        return;
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for h in &bad {
        let kind = match (&h.status, &h.error) {
            (_, Some(e)) => e.chars().take(120).collect(),
            (Some(s), None) => format!("status {s}"),
            (None, None) => "nothing".to_owned(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let first: Vec<String> = bad.iter().take(12).map(|h| h.describe(origin)).collect();
    panic!(
        "{what}: {} of {} requests did not\nby kind: {kinds:#?}\nfirst:\n{}",
        bad.len(),
        hits.len(),
        first.join("\n")
    );
}

/// The lines of tether's log about failed or retried upstream attempts, for failure messages.
fn proxy_errors(lb: &Balancer) -> String {
    let log = lb.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Fail to proxy") || l.contains("retrying") || l.contains("no retry"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Each session's backends over time (successful answers only), oldest first.
fn history(hits: &[Hit]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in hits {
        if let Some(b) = h.ok_backend() {
            out.entry(h.session.clone()).or_default().push(b.to_owned());
        }
    }
    out
}

/// The backends a session went through, consecutive repeats collapsed: `[a]` if it never moved,
/// `[a, b]` if it moved once.
fn stints(backends: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for b in backends {
        if out.last() != Some(b) {
            out.push(b.clone());
        }
    }
    out
}

/// The value of a sample, 0 if absent.
async fn metric_or_zero(lb: &Balancer, sample: &str) -> f64 {
    lb.metric(sample).await.unwrap_or(0.0)
}

/// GET `/` as `session` through `lb`, with a fresh token; panics unless 200. Returns the backend.
async fn get_as(http: &reqwest::Client, lb: &Balancer, session: &str) -> String {
    let (status, backend, _) = get_backend(http, &lb.url("/"), &[(SESSION_HEADER, session)]).await;
    assert_eq!(status, 200, "GET / as {session} through {}", lb.url("/"));
    backend.unwrap_or_else(|| panic!("no x-backend-id for {session}"))
}

/// GET every session once through `lb`, 16 at a time; returns the backend of each, by session.
async fn sweep(lb: &Balancer, sessions: &[String]) -> BTreeMap<String, String> {
    let url = Arc::new(lb.url("/"));
    let list = Arc::new(sessions.to_vec());
    let http = client();
    let ids = {
        let list = list.clone();
        for_each_concurrently(sessions.len(), 16, move |i| {
            let (url, list, http) = (url.clone(), list.clone(), http.clone());
            async move {
                let sid = &list[i];
                let (status, id, _) = get_backend(&http, &url, &[(SESSION_HEADER, sid)]).await;
                assert_eq!(status, 200, "{sid}");
                id.unwrap_or_else(|| panic!("no x-backend-id for {sid}"))
            }
        })
        .await
    };
    list.iter().cloned().zip(ids).collect()
}

/// `count` session names `<prefix>-<i>`.
fn names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. A backend SIGKILLed and restarted
// ---------------------------------------------------------------------------------------------

/// Three backends that take 20 ms per request (so requests are in flight when one dies), 12
/// workers over 4 sessions each, every third request a POST with its own token. b is killed,
/// its sessions move; b comes back on its port and gets new sessions, the moved ones stay moved.
/// No GET fails; a POST in flight on b when it died fails with a 502 counted in
/// `tether_upstream_errors_total`, and no POST reaches a backend twice. With `keep_alive` false
/// the backends close every connection after one response, so tether sends each request on a
/// new connection (no pooled connection to find closed).
async fn backend_killed_and_restarted_under_load(keep_alive: bool) {
    const WORKERS: usize = 12;
    const SESSIONS_PER_WORKER: usize = 4;
    let redis = RedisServer::start();
    let slow = Mode::Answer {
        delay: Duration::from_millis(20),
    };
    let a = FaultyBackend::start("a", slow).await;
    let mut b = FaultyBackend::start("b", slow).await;
    let c = FaultyBackend::start("c", slow).await;
    let body = config_with(
        &[a.toml(), b.toml(), c.toml()],
        Some(&redis),
        HEADER_SESSIONS,
    ) + "[upstream]\npassive_eject_secs = 1\n";
    let lb = Balancer::start(&body).await;

    let traffic = Traffic::start(&lb.url(""), WORKERS, TrafficOptions::default(), |w, n| {
        let session = format!("s{w}-{}", n % SESSIONS_PER_WORKER);
        // Staggered, so that GETs and POSTs are in flight at any moment.
        if (n + w) % 3 == 2 {
            Req::post(session)
        } else {
            Req::get(session)
        }
    });
    // Every session has been answered at least twice.
    traffic
        .wait_for_more(WORKERS * SESSIONS_PER_WORKER * 2)
        .await;
    let pinned: BTreeMap<String, String> = history(&traffic.snapshot())
        .into_iter()
        .map(|(s, backends)| (s, backends[0].clone()))
        .collect();
    assert_eq!(pinned.len(), WORKERS * SESSIONS_PER_WORKER, "{pinned:?}");
    let on_b: BTreeSet<String> = pinned
        .iter()
        .filter(|(_, b)| *b == "b")
        .map(|(s, _)| s.clone())
        .collect();
    assert!(
        on_b.len() >= 8,
        "round-robin put too few sessions on b: {pinned:?}"
    );

    // SIGKILL b with requests in flight; its sessions move on their next request.
    let killed = Instant::now();
    b.kill_and_wait().await;
    traffic
        .wait_until("every session of b answered by another backend", |hits| {
            on_b.iter().all(|s| {
                hits.iter().any(|h| {
                    h.session == *s
                        && h.started > killed
                        && h.ok_backend().is_some_and(|x| x != "b")
                })
            })
        })
        .await;
    traffic.wait_for_more(200).await;

    // b comes back on its port. Once its ejection (1 s) is over it takes new sessions again,
    // while the sessions that left it stay where they went.
    let restarted = Instant::now();
    b.restart().await;
    let http = client();
    let mut probes = 0;
    let back = eventually(SOON, || {
        probes += 1;
        let (http, lb) = (&http, &lb);
        let sid = format!("probe-{probes}");
        async move { get_as(http, lb, &sid).await == "b" }
    })
    .await;
    assert!(
        back,
        "no new session reached the restarted b in {probes} probes"
    );
    traffic.wait_for_more(300).await;
    let (hits, origin) = traffic.stop().await;

    // No GET failed: those in flight on b were retried (connect failure, or a reused
    // connection closed before the response), the others never noticed.
    let gets: Vec<&Hit> = hits.iter().filter(|h| !h.post).collect();
    if gets.iter().any(|h| !h.ok()) {
        eprintln!("tether's view of the failures:\n{}", proxy_errors(&lb));
    }
    assert_all(
        &gets,
        origin,
        "GETs while b died and came back answered 200",
        Hit::ok,
    );

    // A POST either succeeded or failed with tether's 502: never a transport error, and the
    // failures are few (in flight on b when it died), all before b came back.
    let posts: Vec<&Hit> = hits.iter().filter(|h| h.post).collect();
    assert_all(&posts, origin, "POSTs answered 200 or 502", |h| {
        h.error.is_none() && matches!(h.status, Some(200 | 502))
    });
    let failed: Vec<&&Hit> = posts.iter().filter(|h| !h.ok()).collect();
    assert!(
        failed.len() <= WORKERS,
        "more failed POSTs ({}) than requests that can be in flight ({WORKERS}): {:#?}",
        failed.len(),
        failed
            .iter()
            .map(|h| h.describe(origin))
            .collect::<Vec<_>>()
    );
    for h in &failed {
        assert!(
            on_b.contains(&h.session) && h.started < restarted,
            "a failed POST not explained by b's death: {}",
            h.describe(origin)
        );
    }

    // No POST reached a backend twice, not even those that failed: each successful one reached
    // exactly the backend that answered it, once; a failed one at most b, once. (A GET may: one
    // in flight on b when it died is sent again, as HTTP allows for idempotent methods.)
    let mut seen: HashMap<String, Vec<(&str, u32)>> = HashMap::new();
    for backend in [&a, &b, &c] {
        for (token, times) in backend.tokens() {
            seen.entry(token).or_default().push((backend.id(), times));
        }
    }
    for h in &posts {
        let by = seen.get(&h.token).cloned().unwrap_or_default();
        if h.ok() {
            assert_eq!(
                by,
                vec![(h.backend.as_deref().expect("answered"), 1)],
                "{}",
                h.describe(origin)
            );
        } else {
            assert!(
                by.is_empty() || by == vec![("b", 1)],
                "a failed POST reached {by:?}: {}",
                h.describe(origin)
            );
        }
    }
    let replayed_gets = gets
        .iter()
        .filter(|h| {
            seen.get(&h.token)
                .is_some_and(|by| by.iter().map(|(_, n)| n).sum::<u32>() > 1)
        })
        .count();

    // Sessions: b's moved once, away from b, and never came back; the others never moved.
    let after = history(&hits);
    for (session, backends) in &after {
        let stints = stints(backends);
        if on_b.contains(session) {
            assert!(
                stints.len() == 2 && stints[0] == "b",
                "{session} was on b: expected one move away, got {stints:?}"
            );
            let stored = redis_get(&redis, &header_pin_key(session));
            assert_eq!(stored, Some(format!("v1:{}", stints[1])), "{session}");
        } else {
            assert_eq!(stints.len(), 1, "{session} moved: {stints:?}");
        }
    }

    // The metrics say what happened: b's sessions moved once each; every failed POST is an
    // upstream error of b (the connection closed under it), and nothing else is.
    let m = lb.metrics().await;
    let moved = metric_sum(&m, "tether_reassignments_total", &[]);
    assert_eq!(
        moved,
        on_b.len() as f64,
        "each of b's sessions moved once:\n{m}"
    );
    let errors = metric_sum(&m, "tether_upstream_errors_total", &[]);
    assert_eq!(errors, failed.len() as f64, "{m}");
    assert_eq!(
        metric_sum(&m, "tether_upstream_errors_total", &[("backend", "b")]),
        failed.len() as f64,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "tether_requests_total", &[("class", "5xx")]),
        failed.len() as f64,
        "{m}"
    );
    assert!(
        metric_value(&m, "tether_upstream_connect_failures_total{backend=\"b\"}").unwrap_or(0.0)
            >= 1.0
    );
    eprintln!(
        "keep-alive {keep_alive}: {} requests ({} POSTs, {} failed; {replayed_gets} GETs sent \
         twice), {} sessions moved off b, {probes} probes to see b back",
        hits.len(),
        posts.len(),
        failed.len(),
        on_b.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_backend_fails_no_get_replays_no_post_and_its_sessions_stay_moved() {
    backend_killed_and_restarted_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_upstream_keep_alive_a_killed_backend_fails_no_get_either() {
    backend_killed_and_restarted_under_load(false).await;
}

/// Nine users logged in through tether to three rideshare instances keep GETting `/me`; the
/// instance of three of them is killed, then started again on its port. Every `/me` answers 200
/// with the user's name (the session is in Redis), its users move once and stay moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logged_in_users_stay_logged_in_while_their_instance_is_killed_and_restarted() {
    const USERS: usize = 9;
    let redis = RedisServer::start();
    let mut apps = [
        KillableApp::start("i1", &redis).await,
        KillableApp::start("i2", &redis).await,
        KillableApp::start("i3", &redis).await,
    ];
    let tables: Vec<String> = apps.iter().map(KillableApp::toml).collect();
    let body = config_with(
        &tables,
        Some(&redis),
        "sources = [\"cookie:rs.sid\"]\npolicy = \"round_robin\"",
    ) + "[upstream]\npassive_eject_secs = 1\n";
    let lb = Balancer::start(&body).await;
    let base = lb.url("");

    let mut cookies = Vec::new();
    let mut homes = Vec::new();
    for u in 0..USERS {
        let mut agent = Agent::new();
        let login = agent.login(&base, &format!("user{u}"), "rider").await;
        homes.push(login.instance.clone().expect("x-backend-id"));
        cookies.push(agent.cookie.clone().expect("a session cookie after login"));
    }
    let victim = homes[0].clone();
    let victims: BTreeSet<String> = (0..USERS)
        .filter(|u| homes[*u] == victim)
        .map(|u| format!("user{u}"))
        .collect();
    assert!(victims.len() >= 2, "homes: {homes:?}");

    let cookies = Arc::new(cookies);
    let traffic = Traffic::start(&base, USERS, TrafficOptions::default(), move |w, _| Req {
        path: "/me".to_owned(),
        session: format!("user{w}"),
        headers: vec![("cookie", format!("{COOKIE}={}", cookies[w]))],
        post: false,
    });
    traffic.wait_for_more(USERS * 5).await;

    let pos = apps
        .iter()
        .position(|a| a.id() == victim)
        .expect("the victim runs");
    let killed = Instant::now();
    apps[pos].kill();
    traffic
        .wait_until(
            "every user of the killed instance answered elsewhere",
            |hits| {
                victims.iter().all(|s| {
                    hits.iter().any(|h| {
                        h.session == *s
                            && h.started > killed
                            && h.ok_backend().is_some_and(|x| x != victim)
                    })
                })
            },
        )
        .await;
    traffic.wait_for_more(100).await;

    // The instance comes back on its port: new users reach it again, the moved ones stay.
    apps[pos].restart().await;
    let mut logins = 0;
    let back = eventually(SOON, || {
        logins += 1;
        let base = base.clone();
        let victim = victim.clone();
        async move {
            let mut agent = Agent::new();
            let reply = agent.login(&base, &format!("late{logins}"), "rider").await;
            reply.instance.as_deref() == Some(victim.as_str())
        }
    })
    .await;
    assert!(
        back,
        "no login reached the restarted {victim} in {logins} tries"
    );
    traffic.wait_for_more(200).await;
    let (hits, origin) = traffic.stop().await;

    let all: Vec<&Hit> = hits.iter().collect();
    if all.iter().any(|h| !h.ok()) {
        eprintln!("tether's view of the failures:\n{}", proxy_errors(&lb));
    }
    assert_all(
        &all,
        origin,
        "GET /me answered 200 for the logged-in user",
        |h| {
            h.ok()
                && h.body
                    .as_deref()
                    .and_then(|b| serde_json::from_str::<Value>(b).ok())
                    .is_some_and(|v| v["name"] == h.session.as_str())
        },
    );
    for (user, backends) in history(&hits) {
        let stints = stints(&backends);
        if victims.contains(&user) {
            assert!(
                stints.len() == 2 && stints[0] == victim,
                "{user} was on {victim}: expected one move away, got {stints:?}"
            );
        } else {
            assert_eq!(stints.len(), 1, "{user} moved: {stints:?}");
        }
    }
    eprintln!(
        "{} GET /me, {} users moved off {victim}, {logins} logins to see it back",
        hits.len(),
        victims.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Redis killed for seconds
// ---------------------------------------------------------------------------------------------

/// How long Redis stays down, measured by polling tether's `tether_redis_up`.
const REDIS_OUTAGE: Duration = Duration::from_secs(3);

/// Kills Redis, waits until every balancer reports `tether_redis_up 0`, keeps polling that it
/// stays 0 for [`REDIS_OUTAGE`] after the kill, calls `before_restart`, then restarts Redis and
/// waits until every balancer reports 1 again. Returns (killed, all saw it down, restarted, all saw it up).
async fn redis_outage(
    redis: &mut RedisServer,
    lbs: &[&Balancer],
    before_restart: impl FnOnce(),
) -> (Instant, Instant, Instant, Instant) {
    let killed = Instant::now();
    redis.kill();
    for lb in lbs {
        assert_eventually!(
            SOON,
            lb.metric("tether_redis_up").await == Some(0.0),
            "tether never noticed Redis died:\n{}",
            tail(&lb.log(), 20)
        );
    }
    let down = Instant::now();
    while killed.elapsed() < REDIS_OUTAGE {
        for lb in lbs {
            assert_eq!(lb.metric("tether_redis_up").await, Some(0.0));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    before_restart();
    let restarted = Instant::now();
    redis.restart();
    for lb in lbs {
        assert_eventually!(
            SOON,
            lb.metric("tether_redis_up").await == Some(1.0),
            "tether never noticed Redis came back:\n{}",
            tail(&lb.log(), 20)
        );
    }
    (killed, down, restarted, Instant::now())
}

/// Two instances under load with known and new keys while Redis is down for 3 s: no request
/// fails, known keys keep their backend, new keys get the same backend on both instances (the
/// rendezvous hash), and once Redis is back those pins are written to it on their next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_killed_for_seconds_under_load_nothing_fails_and_both_instances_agree() {
    const KNOWN: usize = 60;
    const WORKERS: usize = 6;
    let mut redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(&[&a, &b, &c], Some(&redis), HEADER_SESSIONS);
    let one = Balancer::start(&body).await;
    let two = Balancer::start(&body).await;

    // Known keys: pinned, and cached by both instances.
    let known_names = names("known", KNOWN);
    let known = sweep(&one, &known_names).await;
    assert_eq!(sweep(&two, &known_names).await, known);

    // The same schedule on both instances: every other request a known key, the rest new keys
    // until Redis is restarted, known keys only after that (so that no instance claims, after
    // recovery, a key another one placed during the outage: see the recovery checks below).
    let new_keys = Arc::new(AtomicBool::new(true));
    let plan = {
        let new_keys = new_keys.clone();
        move |w: usize, n: usize| {
            Some(
                if n.is_multiple_of(2) || !new_keys.load(Ordering::Relaxed) {
                    format!("known-{}", (w * 7 + n) % KNOWN)
                } else {
                    format!("new-{w}-{n}")
                },
            )
        }
    };
    let load_one = LoadLoop::start(
        &one.url("/"),
        WORKERS,
        |_| Connections::KeepAlive,
        plan.clone(),
    );
    let load_two = LoadLoop::start(&two.url("/"), WORKERS, |_| Connections::New, plan);
    load_one.wait_for_more(200, SOON).await;
    load_two.wait_for_more(200, SOON).await;

    let fallback_before =
        metric_or_zero(&one, "tether_affinity_lookups_total{result=\"fallback\"}").await;
    let (killed, down, restarted, up) = redis_outage(&mut redis, &[&one, &two], || {
        new_keys.store(false, Ordering::Relaxed)
    })
    .await;
    load_one.wait_for_more(300, SOON).await;
    load_two.wait_for_more(300, SOON).await;
    let report_one = load_one.stop().await;
    let report_two = load_two.stop().await;

    // Zero failures, 5xx or otherwise, on either instance.
    report_one.assert_no_failures("instance one while Redis was down");
    report_two.assert_no_failures("instance two while Redis was down");

    // Known keys never moved.
    for s in report_one.samples.iter().chain(&report_two.samples) {
        let sid = s.session.as_deref().expect("every request has a key");
        if let Some(pinned) = known.get(sid) {
            assert_eq!(s.backend(), Some(pinned.as_str()), "{sid} moved");
        }
    }

    // New keys placed while both instances were failing open (every request of the key, on
    // either instance, sent between both reporting Redis down and its restart): the same
    // backend on both. (A key one instance placed just before it noticed the outage, by policy,
    // and the other during it, by the hash, may differ: neither could know the other's choice.)
    let mut outside: BTreeSet<String> = BTreeSet::new();
    let mut placed: BTreeMap<String, BTreeMap<&str, String>> = BTreeMap::new();
    for (lb, r) in [("one", &report_one), ("two", &report_two)] {
        for s in &r.samples {
            let sid = s.session.clone().expect("every request has a key");
            if !sid.starts_with("new-") {
                continue;
            }
            if s.started < down || s.started >= restarted {
                outside.insert(sid.clone());
            }
            placed
                .entry(sid)
                .or_default()
                .insert(lb, s.backend().expect("answered").to_owned());
        }
    }
    placed.retain(|k, _| !outside.contains(k));
    let common: Vec<&String> = placed
        .iter()
        .filter(|(_, by)| by.len() == 2)
        .map(|(k, _)| k)
        .collect();
    assert!(
        common.len() >= 20,
        "too few new keys seen by both instances during the outage: {}",
        common.len()
    );
    for k in &common {
        assert_eq!(
            placed[*k]["one"], placed[*k]["two"],
            "{k}: the instances disagree"
        );
    }
    let new_one: BTreeMap<String, String> = placed
        .iter()
        .filter_map(|(k, by)| Some((k.clone(), by.get("one")?.clone())))
        .collect();
    let spread: BTreeSet<&String> = new_one.values().collect();
    assert_eq!(spread.len(), 3, "the fallback spreads new keys: {spread:?}");
    let fallback = metric_or_zero(&one, "tether_affinity_lookups_total{result=\"fallback\"}").await
        - fallback_before;
    assert!(
        fallback >= new_one.len() as f64,
        "{fallback} fallback lookups for {} new keys",
        new_one.len()
    );

    // After recovery: the outage's new keys, asked again, are written to Redis with the backend
    // they got, and the other instance then agrees (for keys it never saw, too).
    let outage_keys: Vec<String> = new_one.keys().cloned().collect();
    let again = sweep(&one, &outage_keys).await;
    let moved: Vec<String> = outage_keys
        .iter()
        .filter(|k| again[*k] != new_one[*k])
        .map(|k| {
            let seen_by_two: Vec<String> = report_two
                .samples
                .iter()
                .filter(|s| s.session.as_deref() == Some(k.as_str()))
                .map(|s| {
                    format!(
                        "two +{:?} {:?}",
                        s.started.saturating_duration_since(restarted),
                        s.backend()
                    )
                })
                .collect();
            format!("{k}: {} -> {} ({seen_by_two:?})", new_one[k], again[k])
        })
        .collect();
    assert!(
        moved.is_empty(),
        "{} of {} keys placed during the outage moved after recovery:\n{}",
        moved.len(),
        outage_keys.len(),
        moved.join("\n")
    );
    assert_eventually!(
        SOON,
        outage_keys.iter().all(|k| {
            redis_get(&redis, &header_pin_key(k)) == Some(format!("v1:{}", new_one[k]))
        }),
        "pins of the outage were not written after recovery"
    );
    let on_two = sweep(&two, &outage_keys).await;
    let differ: Vec<String> = outage_keys
        .iter()
        .filter(|k| on_two[*k] != new_one[*k])
        .map(|k| {
            let seen: Vec<String> = report_one
                .samples
                .iter()
                .map(|s| ("one", s))
                .chain(report_two.samples.iter().map(|s| ("two", s)))
                .filter(|(_, s)| s.session.as_deref() == Some(k.as_str()))
                .map(|(lb, s)| {
                    let at = s.started.saturating_duration_since(down).as_millis() as i128
                        - down.saturating_duration_since(s.started).as_millis() as i128;
                    format!("{lb} at {at} ms after down: {:?}", s.backend())
                })
                .collect();
            format!("{k}: one {} two {} seen {seen:?}", new_one[k], on_two[k])
        })
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} outage keys differ on the other instance after recovery (restart at {:?}, up at {:?} after down):\n{}",
        differ.len(),
        outage_keys.len(),
        restarted - down,
        up - down,
        differ.join("\n")
    );
    let m = one.metrics().await;
    assert_eq!(
        metric_sum(&m, "tether_requests_total", &[("class", "5xx")]),
        0.0,
        "{m}"
    );
    eprintln!(
        "{} + {} requests; Redis down {:?} (seen down after {:?}), {} new keys during the outage, {} seen by both",
        report_one.len(),
        report_two.len(),
        restarted - down,
        down.duration_since(killed),
        new_one.len(),
        common.len()
    );
}

/// Pins that tether caches, written before Redis restarted empty, are in Redis again soon after
/// it returns (while their sessions keep sending requests): otherwise a third instance, or this
/// one restarted, would give those sessions another backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pins_cached_before_redis_restarted_empty_are_written_again_under_load() {
    const KNOWN: usize = 30;
    let mut redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(&[&a, &b, &c], Some(&redis), HEADER_SESSIONS);
    let one = Balancer::start(&body).await;
    let known_names = names("known", KNOWN);
    let known = sweep(&one, &known_names).await;

    let load = LoadLoop::start(
        &one.url("/"),
        4,
        |_| Connections::KeepAlive,
        |w, n| Some(format!("known-{}", (w + 4 * n) % KNOWN)),
    );
    load.wait_for_more(100, SOON).await;
    redis_outage(&mut redis, &[&one], || {}).await;
    load.wait_for_more(200, SOON).await;

    let restored = eventually(SOON, || {
        std::future::ready(
            known
                .iter()
                .all(|(k, id)| redis_get(&redis, &header_pin_key(k)) == Some(format!("v1:{id}"))),
        )
    })
    .await;
    let missing: Vec<&String> = known
        .keys()
        .filter(|k| redis_get(&redis, &header_pin_key(k)).is_none())
        .collect();
    let report = load.stop().await;
    report.assert_no_failures("known keys across the Redis restart");
    assert!(
        restored,
        "{} of {KNOWN} pins tether had cached were still missing in Redis {SOON:?} after it \
         came back, although their sessions kept sending requests: {missing:?}",
        missing.len()
    );
    // What the pins are for: an instance that never saw these keys agrees.
    let two = Balancer::start(&body).await;
    assert_eq!(sweep(&two, &known_names).await, known);
}

/// rideshare behind tether on the same Redis: a driver and a rider (real Socket.IO clients,
/// WebSockets through tether) exchange locations; Redis is killed for 3 s under HTTP load and
/// restarted empty; the users log in again and the driver's locations reach the rider again,
/// across instances, with no socket dropped and no request through tether failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rideshare_broadcasts_through_tether_recover_after_redis_is_killed_under_load() {
    let mut redis = RedisServer::start();
    let i1 = Rideshare::start("i1", Some(&redis)).await;
    let i2 = Rideshare::start("i2", Some(&redis)).await;
    let lb = Balancer::start(&config_with(
        &[i1.toml(), i2.toml()],
        Some(&redis),
        "sources = [\"cookie:rs.sid\", \"query:sid\"]\npolicy = \"round_robin\"",
    ))
    .await;
    let base = lb.url("");

    // Alice (rider) and Bob (driver) on different instances, through tether.
    let (alice, bob, ride) = ride_on_two_instances(&base, "a").await;
    let mut rider = sio(&base, "alice", "rider", &ride);
    let mut driver = sio(&base, "bob", "driver", &ride);
    rider.wait_ack(SOON, "joinRide", 1).await;
    driver.wait_ack(SOON, "joinRide", 1).await;
    let (before, _) = locations_until_heard(&mut driver, &rider, &ride, 1).await;
    assert!(before >= 1);
    drop((alice, bob));

    // HTTP load through the same tether while Redis is down (keyless: the page needs no Redis).
    let load = LoadLoop::start(&lb.url("/"), 4, |_| Connections::KeepAlive, |_, _| None);
    load.wait_for_more(100, SOON).await;
    redis_outage(&mut redis, &[&lb], || {}).await;
    load.wait_for_more(100, SOON).await;

    // Redis came back empty: log in again, a new ride, the same sockets join it, and the
    // driver's locations cross instances again.
    let (_alice, _bob, new_ride) = ride_on_two_instances(&base, "b").await;
    rider.send(&format!("join {new_ride}"));
    assert_eq!(
        rider.wait_ack(SOON, "joinRide", 2).await["ok"],
        true,
        "{}",
        rider.transcript()
    );
    driver.send(&format!("join {new_ride}"));
    assert_eq!(
        driver.wait_ack(SOON, "joinRide", 2).await["ok"],
        true,
        "{}",
        driver.transcript()
    );
    locations_until_heard(&mut driver, &rider, &new_ride, 2).await;

    let report = load.stop().await;
    report.assert_no_failures("HTTP through tether while Redis was down");
    for client in [&rider, &driver] {
        assert!(
            client.of_type("disconnect").is_empty(),
            "{}",
            client.transcript()
        );
    }
    let m = lb.metrics().await;
    assert_eq!(
        metric_sum(&m, "tether_requests_total", &[("class", "5xx")]),
        0.0,
        "{m}"
    );
    rider.finish_ok(SOON).await;
    driver.finish_ok(SOON).await;
}

/// Logs in a rider (`alice`) and a driver (`bob`) through tether until they are on different
/// instances, the rider requests a ride and the driver accepts it. Retries while rideshare's own
/// store still fails after a Redis restart.
async fn ride_on_two_instances(base: &str, tag: &str) -> (Agent, Agent, String) {
    let mut alice = Agent::new();
    let home = login_retrying(&mut alice, base, "alice", "rider", tag).await;
    let ride = alice.request_ride(base, "Gare du Nord", "Orly").await;
    for _ in 0..10 {
        let mut bob = Agent::new();
        if login_retrying(&mut bob, base, "bob", "driver", tag).await != home {
            bob.accept(base, &ride).await;
            return (alice, bob, ride);
        }
    }
    panic!("bob never landed on another instance than alice's {home}");
}

/// `POST /login` through tether until it answers 200 (rideshare answers 503 until its store
/// reconnects after a Redis restart); returns the instance that answered.
async fn login_retrying(
    agent: &mut Agent,
    base: &str,
    name: &str,
    role: &str,
    tag: &str,
) -> String {
    let url = format!("{base}/login");
    let body = serde_json::json!({ "name": name, "role": role });
    let deadline = Instant::now() + SOON;
    loop {
        let reply = agent.post(&url, Some(body.clone())).await;
        if reply.status == 200 {
            return reply.instance.expect("x-backend-id");
        }
        assert!(Instant::now() < deadline, "login {name} ({tag}): {reply:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A Socket.IO client through tether over WebSocket, logged in as `name`, in `ride`'s room,
/// reading commands from stdin.
fn sio(base: &str, name: &str, role: &str, ride: &str) -> SioClient {
    SioClient::spawn(
        &format!("{name}-{role}"),
        &[
            "--url",
            base,
            "--name",
            name,
            "--role",
            role,
            "--transports",
            "websocket",
            "--join",
            ride,
            "--stdin",
            "--timeout",
            "120",
        ],
    )
}

/// The driver sends locations for `ride` (one per poll) until the rider has heard one; returns
/// how many were sent and heard. `acks` is how many `locationUpdate` acks the driver had before.
async fn locations_until_heard(
    driver: &mut SioClient,
    rider: &SioClient,
    ride: &str,
    round: usize,
) -> (usize, usize) {
    let heard = |rider: &SioClient| {
        rider
            .events("location")
            .into_iter()
            .filter(|d| d["rideId"] == ride)
            .count()
    };
    let acks_before = driver
        .of_type("ack")
        .iter()
        .filter(|l| l["event"] == "locationUpdate")
        .count();
    let deadline = Instant::now() + SOON;
    let mut sent = 0;
    while heard(rider) == 0 {
        assert!(
            Instant::now() < deadline,
            "round {round}: no location for {ride} reached the rider\n{}\n{}",
            rider.transcript(),
            driver.transcript()
        );
        sent += 1;
        driver.send(&format!("location {ride} {round} {sent}"));
        driver
            .wait_ack(SOON, "locationUpdate", acks_before + sent)
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (sent, heard(rider))
}

// ---------------------------------------------------------------------------------------------
// 3. tether SIGKILLed and restarted
// ---------------------------------------------------------------------------------------------

/// Client options for a loop that keeps trying while tether is down.
fn retrying() -> TrafficOptions {
    TrafficOptions {
        retry_transport_errors: true,
        ..TrafficOptions::default()
    }
}

/// Panics unless every hit answered 200, or failed with a transport error while tether was down
/// (it ended after `killed` and started before `ready`); returns how many failed that way.
fn only_outage_errors(
    hits: &[Hit],
    origin: Instant,
    killed: Instant,
    ready: Instant,
    what: &str,
) -> usize {
    let all: Vec<&Hit> = hits.iter().collect();
    assert_all(&all, origin, what, |h| {
        h.ok() || (h.error.is_some() && h.ended >= killed && h.started <= ready)
    });
    hits.iter().filter(|h| !h.ok()).count()
}

/// One instance, SIGKILLed under load and started again on its ports: the client loop retries
/// connection errors (counted apart) while it is down; no request gets an error status, and
/// every session keeps its backend (the new process reads the pins from Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tether_sigkilled_and_restarted_under_load_keeps_every_session_on_its_backend() {
    const WORKERS: usize = 8;
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let mut lb = Balancer::start(&config(&[&a, &b, &c], Some(&redis), HEADER_SESSIONS)).await;
    let traffic = Traffic::start(&lb.url(""), WORKERS, retrying(), |w, n| {
        Req::get(format!("s{w}-{}", n % 6))
    });
    traffic.wait_for_more(300).await;

    let killed = Instant::now();
    lb.kill();
    lb.restart().await;
    let ready = Instant::now();
    traffic.wait_for_more(300).await;
    let (hits, origin) = traffic.stop().await;

    let failed = only_outage_errors(
        &hits,
        origin,
        killed,
        ready,
        "requests around tether's death",
    );
    for (session, backends) in history(&hits) {
        assert_eq!(
            stints(&backends).len(),
            1,
            "{session} moved: {:?}",
            stints(&backends)
        );
    }
    // The restarted process found them in Redis (its cache started empty).
    let m = lb.metrics().await;
    assert!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"redis\"}").unwrap_or(0.0)
            >= (WORKERS * 6) as f64,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "tether_reassignments_total", &[]),
        0.0,
        "{m}"
    );
    eprintln!(
        "{} requests, {failed} connection errors while tether was down for {:?}",
        hits.len(),
        ready - killed
    );
}

/// Two instances on one Redis serve the same sessions; one is SIGKILLed and restarted while the
/// other keeps serving (with zero failures), and makes new sessions meanwhile. Every session has
/// one backend on both instances, before, during and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_two_instances_sigkilled_and_restarted_leaves_affinity_intact_on_both() {
    const WORKERS: usize = 6;
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(&[&a, &b, &c], Some(&redis), HEADER_SESSIONS);
    let mut one = Balancer::start(&body).await;
    let two = Balancer::start(&body).await;

    let one_down = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicUsize::new(0));
    let shared = |w: usize, n: usize| Req::get(format!("shared-{w}-{}", n % 6));
    let on_one = Traffic::start(&one.url(""), WORKERS, retrying(), shared);
    let (flag, count) = (one_down.clone(), during.clone());
    let on_two = Traffic::start(
        &two.url(""),
        WORKERS,
        TrafficOptions::default(),
        move |w, n| {
            if flag.load(Ordering::Relaxed) && n % 3 == 0 {
                Req::get(format!("during-{}", count.fetch_add(1, Ordering::Relaxed)))
            } else {
                shared(w, n)
            }
        },
    );
    on_one.wait_for_more(200).await;
    on_two.wait_for_more(200).await;

    let killed = Instant::now();
    one.kill();
    one_down.store(true, Ordering::Relaxed);
    on_two.wait_for_more(150).await;
    one.restart().await;
    let ready = Instant::now();
    one_down.store(false, Ordering::Relaxed);
    on_one.wait_for_more(200).await;
    on_two.wait_for_more(200).await;
    let (hits_two, origin_two) = on_two.stop().await;
    let (hits_one, origin_one) = on_one.stop().await;

    let all_two: Vec<&Hit> = hits_two.iter().collect();
    assert_all(
        &all_two,
        origin_two,
        "the surviving instance answered 200",
        Hit::ok,
    );
    let failed = only_outage_errors(
        &hits_one,
        origin_one,
        killed,
        ready,
        "the restarted instance",
    );

    // One backend per session across both instances and the whole run.
    let mut both = history(&hits_one);
    for (s, backends) in history(&hits_two) {
        both.entry(s).or_default().extend(backends);
    }
    for (session, backends) in &both {
        let distinct: BTreeSet<&String> = backends.iter().collect();
        assert_eq!(distinct.len(), 1, "{session}: {distinct:?}");
    }
    // Sessions made on two while one was dead: the restarted one sends them to the same place.
    let made: BTreeMap<String, String> = history(&hits_two)
        .into_iter()
        .filter(|(s, _)| s.starts_with("during-"))
        .map(|(s, b)| (s, b[0].clone()))
        .collect();
    assert!(
        made.len() >= 10,
        "{} sessions made during the outage",
        made.len()
    );
    let keys: Vec<String> = made.keys().cloned().collect();
    // Each once more on two first: a pin two could not write (a Redis command that timed out on
    // a loaded machine makes it fail open for a moment) is written at its next request.
    assert_eq!(sweep(&two, &keys).await, made);
    let on_one = sweep(&one, &keys).await;
    let differ: Vec<String> = keys
        .iter()
        .filter(|k| on_one[*k] != made[*k])
        .map(|k| format!("{k}: two {} one {}", made[k], on_one[k]))
        .collect();
    if !differ.is_empty() {
        let m = two.metrics().await;
        let errors = metric_value(&m, "tether_redis_errors_total");
        let fallback = metric_value(&m, "tether_affinity_lookups_total{result=\"fallback\"}");
        panic!(
            "{} of {} sessions made on two while one was down are elsewhere on one: {differ:?}\n\
             two: redis errors {errors:?}, fallback lookups {fallback:?}\n{}",
            differ.len(),
            keys.len(),
            tail(&two.log(), 30)
        );
    }
    eprintln!(
        "{} + {} requests, {failed} connection errors to the dead instance, {} sessions made meanwhile",
        hits_one.len(),
        hits_two.len(),
        made.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Misbehaving backends
// ---------------------------------------------------------------------------------------------

/// tether's `read_timeout_ms` in the misbehaving-backend tests.
const READ_TIMEOUT: Duration = Duration::from_millis(300);

/// What the client should see from a misbehaving backend's sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// tether answers 504 after about the read timeout.
    GatewayTimeout,
    /// Response headers (200) then an incomplete body: a transport error.
    IncompleteBody,
}

/// Healthy backends a and b, and s which starts healthy (so sessions pin to it) and then turns
/// `bad`. Six workers keep to sessions on a and b, three to sessions on s. While s misbehaves:
/// every request of its sessions fails as `expect` says, once (never retried, nothing re-pinned),
/// with `tether_upstream_errors_total{backend="s",kind}` counting each; the others see no error
/// and no stall; afterwards nothing is stuck (no request in flight, no connection left open on
/// s), and when s behaves again its sessions are still there.
async fn misbehaving_backend_under_load(bad: Mode, expect: Expect, kind: &str) {
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let s = FaultyBackend::start(
        "s",
        Mode::Answer {
            delay: Duration::ZERO,
        },
    )
    .await;
    let body = config_with(
        &[a.toml(), b.toml(), s.toml()],
        Some(&redis),
        HEADER_SESSIONS,
    ) + &format!(
        "[upstream]\nread_timeout_ms = {}\n",
        READ_TIMEOUT.as_millis()
    );
    let lb = Balancer::start(&body).await;

    let pinned = sweep(&lb, &names("t", 30)).await;
    let on = |id: &str| -> Vec<String> {
        pinned
            .iter()
            .filter(|(_, b)| *b == id)
            .map(|(s, _)| s.clone())
            .collect()
    };
    let (good, bad_sessions): (Vec<String>, Vec<String>) =
        (on("a").into_iter().chain(on("b")).collect(), on("s"));
    assert_eq!((good.len(), bad_sessions.len()), (20, 10), "{pinned:?}");

    const GOOD_WORKERS: usize = 6;
    const BAD_WORKERS: usize = 3;
    let (g, bs) = (Arc::new(good.clone()), Arc::new(bad_sessions.clone()));
    let traffic = Traffic::start(
        &lb.url(""),
        GOOD_WORKERS + BAD_WORKERS,
        TrafficOptions::default(),
        move |w, n| {
            if w < GOOD_WORKERS {
                Req::get(g[(w + GOOD_WORKERS * n) % g.len()].clone())
            } else {
                Req::get(bs[(w + BAD_WORKERS * n) % bs.len()].clone())
            }
        },
    );
    traffic.wait_for_more(100).await;

    let turned = Instant::now();
    s.set_mode(bad);
    // Until each bad worker has failed a few times, and the good ones kept going meanwhile.
    traffic
        .wait_until("s's sessions failing a few times each", |hits| {
            hits.iter()
                .filter(|h| h.worker >= GOOD_WORKERS && h.started > turned && !h.ok())
                .count()
                >= BAD_WORKERS * 5
        })
        .await;
    traffic
        .wait_until("500 healthy requests while s misbehaves", |hits| {
            hits.iter()
                .filter(|h| h.worker < GOOD_WORKERS && h.started > turned)
                .count()
                >= 500
        })
        .await;
    let (hits, origin) = traffic.stop().await;
    let stopped = Instant::now();

    // Sessions on a and b: not one error, and never stalled behind s.
    let healthy: Vec<&Hit> = hits.iter().filter(|h| h.worker < GOOD_WORKERS).collect();
    assert_all(
        &healthy,
        origin,
        "sessions on healthy backends answered 200 by them",
        |h| h.ok() && h.backend.as_deref().is_some_and(|b| b != "s"),
    );
    let during: Vec<&&Hit> = healthy.iter().filter(|h| h.started > turned).collect();
    // Not stalled: were they queued behind s's requests, most would take the read timeout.
    // (Not a bound on the slowest: a loaded test machine may pause all workers for a moment.)
    let mut latencies: Vec<Duration> = during.iter().map(|h| h.elapsed()).collect();
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let slowest = latencies[latencies.len() - 1];
    let stalled = latencies.iter().filter(|l| **l >= READ_TIMEOUT).count();
    assert!(
        median < READ_TIMEOUT / 4 && stalled * 50 <= latencies.len(),
        "healthy requests while s misbehaved: median {median:?}, p99 {p99:?}, slowest {slowest:?}, \
         {stalled} of {} at or beyond the read timeout: stalled behind s?",
        latencies.len()
    );

    // Sessions on s: once it misbehaves (from the first request it read in its bad mode), every
    // request fails as expected, within about the read timeout, and is counted.
    let on_s: Vec<&Hit> = hits.iter().filter(|h| h.worker >= GOOD_WORKERS).collect();
    let failed: Vec<&&Hit> = on_s.iter().filter(|h| !h.ok()).collect();
    assert_all(
        &on_s,
        origin,
        "s's sessions answered by s (before) or failed as expected (after)",
        |h| {
            if h.ok() {
                return h.backend.as_deref() == Some("s")
                    && h.started < turned + Duration::from_millis(50);
            }
            match expect {
                Expect::GatewayTimeout => {
                    h.status == Some(504)
                        && h.error.is_none()
                        && h.elapsed() >= READ_TIMEOUT - Duration::from_millis(20)
                        && h.elapsed() < READ_TIMEOUT + Duration::from_secs(1)
                }
                Expect::IncompleteBody => {
                    h.status == Some(200)
                        && h.backend.as_deref() == Some("s")
                        && h.error.is_some()
                        && h.elapsed() < READ_TIMEOUT + Duration::from_secs(1)
                }
            }
        },
    );
    assert!(failed.len() >= BAD_WORKERS * 5);

    // Each failed request reached s exactly once: no retry, on s or elsewhere.
    let tokens = s.tokens();
    for h in &failed {
        assert_eq!(tokens.get(&h.token), Some(&1), "{}", h.describe(origin));
    }
    assert!(
        tokens.values().all(|n| *n == 1),
        "a request reached s twice"
    );
    for backend in [&a, &b] {
        let tokens: BTreeSet<String> = backend
            .recorded()
            .iter()
            .filter_map(|r| {
                r.headers
                    .get(TOKEN_HEADER)?
                    .to_str()
                    .ok()
                    .map(str::to_owned)
            })
            .collect();
        for h in &failed {
            assert!(
                !tokens.contains(&h.token),
                "{} was retried on {}",
                h.token,
                backend.id()
            );
        }
    }

    // Counted, by backend and kind.
    let m = lb.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            &format!("tether_upstream_errors_total{{backend=\"s\",kind=\"{kind}\"}}")
        ),
        Some(failed.len() as f64),
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "tether_upstream_errors_total", &[]),
        failed.len() as f64,
        "{m}"
    );

    // Nothing stuck: no request in flight in tether, every connection s held is closed.
    assert_eventually!(
        SOON,
        metric_sum(&lb.metrics().await, "tether_backend_active_requests", &[]) == 0.0,
        "requests still in flight:\n{}",
        lb.metrics().await
    );
    assert_eventually!(
        SOON,
        s.open_connections() == 0,
        "s still holds {} connections {:?} after the load stopped",
        s.open_connections(),
        stopped.elapsed()
    );

    // A backend that fails requests this way is not ejected, and its sessions are not moved (as
    // with HAProxy and NGINX's sticky modes: a timeout or reset is not a connect failure); when
    // it behaves again its sessions are there. Active health checks are what take it out.
    assert_eq!(
        metric_sum(&m, "tether_reassignments_total", &[]),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "tether_backend_up{backend=\"s\"}"),
        Some(1.0),
        "{m}"
    );
    for sid in &bad_sessions {
        assert_eq!(
            redis_get(&redis, &header_pin_key(sid)),
            Some("v1:s".to_owned()),
            "{sid}"
        );
    }
    s.set_mode(Mode::Answer {
        delay: Duration::ZERO,
    });
    let http = client();
    for sid in &bad_sessions {
        assert_eq!(get_as(&http, &lb, sid).await, "s", "{sid}");
    }
    eprintln!(
        "{} requests: {} healthy while s misbehaved (p99 {p99:?}, slowest {slowest:?}), {} failed on s",
        hits.len(),
        during.len(),
        failed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_slower_than_the_read_timeout_gets_504s_and_stalls_nothing_else() {
    let slow = Mode::Answer {
        delay: READ_TIMEOUT + Duration::from_millis(700),
    };
    misbehaving_backend_under_load(slow, Expect::GatewayTimeout, "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_that_never_answers_gets_504s_bounded_by_the_read_timeout() {
    misbehaving_backend_under_load(Mode::Silent, Expect::GatewayTimeout, "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_that_resets_mid_response_fails_only_those_responses() {
    misbehaving_backend_under_load(Mode::ResetMidBody, Expect::IncompleteBody, "closed").await;
}

// ---------------------------------------------------------------------------------------------
// 5. Reload storm
// ---------------------------------------------------------------------------------------------

/// 50 SIGHUPs, alternating two valid files (a b c with equal weights; a with weight 3, b, and d
/// instead of c), each waited for, under HTTP load and with a WebSocket open to each of a, b and
/// c: no request fails, every reload counts as ok, sessions on a and b never move, and every
/// WebSocket still echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_50_reloads_under_load_fails_nothing_and_keeps_websockets_open() {
    const RELOADS: usize = 50;
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let d = Backend::start("d").await;
    let affinity = "sources = [\"header:x-session-id\"]\npolicy = \"weighted\"";
    let even = config_with(&[a.toml(), b.toml(), c.toml()], Some(&redis), affinity);
    let odd = config_with(
        &[format!("{}weight = 3\n", a.toml()), b.toml(), d.toml()],
        Some(&redis),
        affinity,
    );
    let mut lb = Balancer::start(&even).await;

    // A WebSocket to each of a, b, c.
    let http = client();
    let mut sockets: BTreeMap<String, Ws> = BTreeMap::new();
    for i in 0..60 {
        let sid = format!("ws-{i}");
        let on = get_as(&http, &lb, &sid).await;
        if let std::collections::btree_map::Entry::Vacant(slot) = sockets.entry(on.clone()) {
            let (mut ws, ws_on) = open_ws(&lb, &sid).await;
            assert_eq!(ws_on, on, "the upgrade follows the session");
            assert_eq!(echo(&mut ws, "hello").await, format!("{on}:hello"));
            slot.insert(ws);
        }
        if sockets.len() == 3 {
            break;
        }
    }
    assert_eq!(sockets.len(), 3);

    let load = LoadLoop::start(
        &lb.url("/"),
        8,
        |w| {
            if w % 2 == 0 {
                Connections::KeepAlive
            } else {
                Connections::New
            }
        },
        |w, n| {
            Some(if n % 5 == 0 {
                format!("new-{w}-{n}")
            } else {
                format!("w{w}-{}", n % 10)
            })
        },
    );
    load.wait_for_more(200, SOON).await;

    let reloads_ok = "tether_config_reloads_total{result=\"ok\"}";
    let started = Instant::now();
    for i in 0..RELOADS {
        lb.write_config(if i % 2 == 0 { &odd } else { &even });
        lb.sighup();
        // Each SIGHUP is waited for: signals sent while one is pending merge into one.
        assert_eventually!(
            SOON,
            metric_or_zero(&lb, reloads_ok).await == (i + 1) as f64,
            "reload {} not counted:\n{}",
            i + 1,
            tail(&lb.log(), 20)
        );
    }
    let storm = started.elapsed();
    load.wait_for_more(200, SOON).await;
    let report = load.stop().await;

    report.assert_no_failures("HTTP during the reload storm");
    assert_eq!(
        metric_or_zero(&lb, "tether_config_reloads_total{result=\"failed\"}").await,
        0.0
    );
    // Sessions on a and b, in both files, never moved.
    let mut first: HashMap<String, String> = HashMap::new();
    for s in &report.samples {
        let (Some(sid), Some(on)) = (s.session.clone(), s.backend()) else {
            continue;
        };
        let was = first.entry(sid.clone()).or_insert_with(|| on.to_owned());
        if was == "a" || was == "b" {
            assert_eq!(was, on, "{sid} moved off {was}");
        }
    }
    // Every WebSocket still echoes, to its backend (c's too, removed and re-added 25 times).
    for (on, ws) in sockets.iter_mut() {
        assert_eq!(
            echo(ws, "after").await,
            format!("{on}:after"),
            "the tunnel to {on}"
        );
    }
    for (_, mut ws) in sockets {
        ws.close(None).await.ok();
    }
    assert_eventually!(
        SOON,
        metric_sum(&lb.metrics().await, "tether_backend_active_requests", &[]) == 0.0,
        "{}",
        lb.metrics().await
    );
    eprintln!(
        "{RELOADS} reloads in {storm:?} under {} requests",
        report.len()
    );
}
