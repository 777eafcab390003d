//! Operating tether: backend states set through the admin API and shared by every instance
//! through Redis, the admin API's errors and token, key lookup and unpin, reload under load, and
//! the Prometheus families after a scripted scenario.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::Value;

use support::scenario::*;
use support::*;

/// Deadline for an operator state set on one instance to show on another: pub/sub makes it
/// immediate, the periodic resync (5 s) makes it certain.
const PROPAGATION: Duration = Duration::from_secs(10);

/// Deadline for things that only wait on a background task of tether (refresher, reload).
const SOON: Duration = Duration::from_secs(5);

fn body(backends: &[&Backend], redis: &RedisServer) -> String {
    // Round-robin: new sessions spread exactly, so "no new session on b" means something.
    config(
        backends,
        Some(redis),
        "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"",
    )
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

/// GET `/` through `lb` as `session`; panics unless 200. Returns the backend.
async fn send(http: &reqwest::Client, lb: &Balancer, session: &str) -> String {
    let (status, id, _) = get_backend(http, &lb.url("/"), &[(SESSION_HEADER, session)]).await;
    assert_eq!(status, 200, "GET / as {session}\n{}", tail(&lb.log(), 30));
    id.expect("every answer names its backend")
}

/// `count` new sessions `<prefix>-<i>` through `lb`, 16 at a time; returns each one's backend.
async fn new_sessions(lb: &Balancer, prefix: &str, count: usize) -> Vec<(String, String)> {
    let url = Arc::new(lb.url("/"));
    let prefix = Arc::new(prefix.to_string());
    let http = client();
    for_each_concurrently(count, 16, move |i| {
        let (url, prefix, http) = (url.clone(), prefix.clone(), http.clone());
        async move {
            let sid = format!("{prefix}-{i}");
            let (status, id, _) = get_backend(&http, &url, &[(SESSION_HEADER, &sid)]).await;
            assert_eq!(status, 200, "{sid}");
            (sid, id.expect("every answer names its backend"))
        }
    })
    .await
}

/// How many of `answers` went to each backend.
fn spread(answers: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (_, b) in answers {
        *out.entry(b.clone()).or_default() += 1;
    }
    out
}

/// POST an admin action; panics unless 200. Returns the JSON reply.
async fn act(lb: &Balancer, path: &str) -> Value {
    let reply = lb.admin(Method::POST, path).await;
    assert_eq!(reply.status, 200, "POST {path}: {}", reply.text);
    reply.json()
}

async fn state_of(lb: &Balancer, id: &str) -> String {
    lb.admin_backend(id).await["state"]
        .as_str()
        .expect("state is a string")
        .to_string()
}

async fn pinned_of(lb: &Balancer, id: &str) -> Option<u64> {
    lb.admin_backend(id).await["pinned_sessions"].as_u64()
}

/// The "pin moved" lines of the balancers' logs, for failure messages.
fn moves_logged(lbs: &[&Balancer]) -> String {
    lbs.iter()
        .enumerate()
        .flat_map(|(i, lb)| {
            lb.log()
                .lines()
                .filter(|l| l.contains("pin moved"))
                .map(|l| format!("instance {}: {l}", i + 1))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn metric_or_zero(lb: &Balancer, sample: &str) -> f64 {
    lb.metric(sample).await.unwrap_or(0.0)
}

/// 30 sessions `<prefix>-<i>` through `lb` (round-robin on a fresh instance: ten per backend);
/// returns the ones on b, after checking there are exactly ten.
async fn ten_on_b(lb: &Balancer, prefix: &str) -> Vec<String> {
    let http = client();
    let mut on_b = Vec::new();
    for i in 0..30 {
        let sid = format!("{prefix}-{i}");
        if send(&http, lb, &sid).await == "b" {
            on_b.push(sid);
        }
    }
    assert_eq!(
        on_b.len(),
        10,
        "round-robin over a, b, c gives b every third session"
    );
    on_b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_set_on_one_instance_is_obeyed_by_the_other_and_survives_a_restart() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = body(&[&a, &b, &c], &redis);
    let one = Balancer::start(&body).await;
    let mut two = Balancer::start(&body).await;
    let http = client();

    let on_b = ten_on_b(&one, "old").await;
    // Pins are counted in Redis (the refresher adds them off the request path): nothing moved
    // or expired, so the count is exact, and the same on both instances.
    for lb in [&one, &two] {
        assert_eventually!(SOON, pinned_of(lb, "b").await == Some(10));
        assert_eventually!(SOON, pinned_of(lb, "a").await == Some(10));
    }

    // Drain b through instance one.
    let reply = act(&one, "/api/backends/b/drain").await;
    assert_eq!(reply["state"], "draining", "{reply}");
    assert_eq!(reply["drain_deadline_unix_ms"], Value::Null, "{reply}");
    assert_eq!(state_of(&one, "b").await, "draining");
    let set_at = Instant::now();
    assert_eventually!(PROPAGATION, state_of(&two, "b").await == "draining");
    eprintln!("drain reached instance two after {:?}", set_at.elapsed());
    let entry = two.admin_backend("b").await;
    assert_eq!(entry["health"], "up", "{entry}");
    assert_eq!(entry["up"], true, "{entry}");
    assert_eq!(entry["drain_deadline_unix_ms"], Value::Null, "{entry}");
    assert_eq!(state_of(&two, "a").await, "enabled");

    // Instance two gives b no new session...
    let fresh = new_sessions(&two, "new", 200).await;
    let counts = spread(&fresh);
    assert_eq!(
        counts.get("b"),
        None,
        "new sessions on a draining backend: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 200);
    // ...and the sessions already on b stay there, through either instance.
    for sid in &on_b {
        assert_eq!(send(&http, &one, sid).await, "b", "{sid} via one");
        assert_eq!(send(&http, &two, sid).await, "b", "{sid} via two");
    }
    let stored = redis_get(&redis, &header_pin_key(&on_b[0]));
    assert_eq!(stored.as_deref(), Some("v1:b"));
    for lb in [&one, &two] {
        assert_eventually!(SOON, pinned_of(lb, "b").await == Some(10));
        assert_eventually!(
            SOON,
            pinned_of(lb, "a").await.unwrap_or(0) + pinned_of(lb, "c").await.unwrap_or(0) == 220
        );
    }
    // No reassignment happened: draining keeps pins.
    let m = one.metrics().await;
    assert_eq!(metric_sum(&m, "tether_reassignments_total", &[]), 0.0);

    // Unpinning one of b's sessions lowers b's count at once (same script) on every instance.
    let gone = &on_b[0];
    let reply = two
        .admin(Method::DELETE, &format!("/api/affinity/{gone}"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["unpinned"], true);
    assert_eq!(pinned_of(&two, "b").await, Some(9));
    assert_eq!(pinned_of(&one, "b").await, Some(9));
    // Its next request is a new session: not b, which is draining.
    assert_ne!(send(&http, &one, gone).await, "b");

    // The state is in Redis: a restarted instance applies it before its first request.
    two.restart().await;
    assert_eq!(state_of(&two, "b").await, "draining");
    let after_restart = spread(&new_sessions(&two, "restarted", 30).await);
    assert_eq!(after_restart.get("b"), None, "{after_restart:?}");
    for sid in &on_b[1..] {
        assert_eq!(send(&http, &two, sid).await, "b", "{sid} after the restart");
    }

    // Enable through instance two: instance one gives b new sessions again.
    let reply = act(&two, "/api/backends/b/enable").await;
    assert_eq!(reply["state"], "enabled", "{reply}");
    assert_eventually!(PROPAGATION, state_of(&one, "b").await == "enabled");
    let again = spread(&new_sessions(&one, "again", 30).await);
    assert!(
        again.get("b").copied().unwrap_or(0) >= 5,
        "an enabled b takes new sessions again: {again:?}"
    );
}

/// Sessions of `sessions`, round after round, through two instances at once: 4 workers each.
fn load_on_both(one: &Balancer, two: &Balancer, sessions: &[String]) -> (LoadLoop, LoadLoop) {
    let list = Arc::new(sessions.to_vec());
    let pick = |list: Arc<Vec<String>>| {
        move |w: usize, n: usize| Some(list[(w * 7 + n) % list.len()].clone())
    };
    (
        LoadLoop::start(
            &one.url("/"),
            4,
            |_| Connections::KeepAlive,
            pick(list.clone()),
        ),
        LoadLoop::start(&two.url("/"), 4, |_| Connections::KeepAlive, pick(list)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_drain_deadline_pinned_sessions_move_without_a_failed_request() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = body(&[&a, &b, &c], &redis);
    let one = Balancer::start(&body).await;
    let two = Balancer::start(&body).await;
    let http = client();

    let on_b = ten_on_b(&one, "s").await;
    let all: Vec<String> = (0..30).map(|i| format!("s-{i}")).collect();
    for sid in &on_b {
        // Cached on instance two as well: the move must reach its cache.
        assert_eq!(send(&http, &two, sid).await, "b");
    }
    assert_eventually!(SOON, pinned_of(&one, "b").await == Some(10));

    let (l1, l2) = load_on_both(&one, &two, &all);
    l1.wait_for_more(50, SOON).await;

    let (posted, posted_wall) = (Instant::now(), wall_ms());
    let reply = act(&one, "/api/backends/b/drain?deadline_secs=1").await;
    let deadline = reply["drain_deadline_unix_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("a drain deadline in {reply}"));
    assert!(
        (posted_wall + 900..=wall_ms() + 1100).contains(&deadline),
        "deadline {deadline} is one second after {posted_wall}"
    );
    assert_eventually!(PROPAGATION, state_of(&two, "b").await == "draining");
    assert_eq!(
        two.admin_backend("b").await["drain_deadline_unix_ms"].as_u64(),
        Some(deadline)
    );
    // The same Instant on this machine's clock (tether and the test share it).
    let deadline_at = posted + Duration::from_millis(deadline - posted_wall);

    // Once the deadline has passed, every session of b moves on its next request.
    assert_eventually!(Duration::from_secs(10), {
        let mut moved = true;
        for sid in &on_b {
            moved &= send(&http, &one, sid).await != "b";
            moved &= send(&http, &two, sid).await != "b";
        }
        moved
    });
    l1.wait_for_more(50, SOON).await;
    l2.wait_for_more(50, SOON).await;
    let r1 = l1.stop().await;
    let r2 = l2.stop().await;
    r1.assert_no_failures("drain deadline passing (instance one)");
    r2.assert_no_failures("drain deadline passing (instance two)");
    // Before the deadline the load did reach b; after it (with 100 ms of slack for requests
    // already inside tether), never.
    assert!(r1.samples.iter().any(|s| s.backend() == Some("b")));
    for r in [&r1, &r2] {
        let late = r.backends_since(deadline_at + Duration::from_millis(100));
        assert_eq!(late.get("b"), None, "after the deadline: {late:?}");
    }

    // Each session moved exactly once, by whichever instance saw it first; the other followed.
    let moved = metric_or_zero(
        &one,
        "tether_reassignments_total{reason=\"drain_deadline\"}",
    )
    .await
        + metric_or_zero(
            &two,
            "tether_reassignments_total{reason=\"drain_deadline\"}",
        )
        .await;
    for sid in &on_b {
        let stored = redis_get(&redis, &header_pin_key(sid)).expect("still pinned");
        assert_ne!(stored, "v1:b", "{sid}");
        assert_eq!(
            Some(stored),
            Some(format!("v1:{}", send(&http, &two, sid).await))
        );
    }
    assert_eventually!(SOON, pinned_of(&one, "b").await == Some(0));
    assert_eq!(state_of(&one, "b").await, "draining");
    // Last, so that everything else is checked even when this fails.
    assert_eq!(
        moved,
        10.0,
        "each session moved once (a double count is the bug that \
         concurrent_requests_of_a_moving_session_count_one_reassignment isolates); logged:\n{}",
        moves_logged(&[&one, &two])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_moves_pinned_sessions_on_their_next_request_and_survives_a_restart() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = body(&[&a, &b, &c], &redis);
    let mut one = Balancer::start(&body).await;
    let two = Balancer::start(&body).await;
    let http = client();

    let on_b = ten_on_b(&one, "s").await;
    let all: Vec<String> = (0..30).map(|i| format!("s-{i}")).collect();
    let (l1, l2) = load_on_both(&one, &two, &all);
    l2.wait_for_more(50, SOON).await;

    // Disable through instance two, under load on both.
    let reply = act(&two, "/api/backends/b/disable").await;
    assert_eq!(reply["state"], "disabled", "{reply}");
    let disabled_at = Instant::now();
    assert_eventually!(PROPAGATION, state_of(&one, "b").await == "disabled");
    let seen_at = Instant::now();
    l1.wait_for_more(100, SOON).await;
    l2.wait_for_more(100, SOON).await;
    let r1 = l1.stop().await;
    let r2 = l2.stop().await;
    r1.assert_no_failures("disable (instance one)");
    r2.assert_no_failures("disable (instance two)");
    let late = r2.backends_since(disabled_at);
    assert_eq!(late.get("b"), None, "instance two after disable: {late:?}");
    let late = r1.backends_since(seen_at);
    assert_eq!(
        late.get("b"),
        None,
        "instance one once it shows disabled: {late:?}"
    );

    for sid in &on_b {
        let now_on = send(&http, &one, sid).await;
        assert_ne!(now_on, "b", "{sid}");
        assert_eq!(send(&http, &two, sid).await, now_on, "{sid}: both agree");
        assert_eq!(
            redis_get(&redis, &header_pin_key(sid)),
            Some(format!("v1:{now_on}"))
        );
    }
    let moved = metric_or_zero(&one, "tether_reassignments_total{reason=\"disabled\"}").await
        + metric_or_zero(&two, "tether_reassignments_total{reason=\"disabled\"}").await;
    assert_eventually!(SOON, pinned_of(&two, "b").await == Some(0));

    // The state is in Redis: a restarted instance applies it before its first request.
    one.restart().await;
    assert_eq!(state_of(&one, "b").await, "disabled");
    let m = one.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_backend_state{backend=\"b\",state=\"disabled\"}"),
        Some(1.0)
    );
    let fresh = spread(&new_sessions(&one, "fresh", 30).await);
    assert_eq!(fresh.get("b"), None, "{fresh:?}");
    assert_eq!(fresh.values().sum::<usize>(), 30);
    // Last, so that everything else is checked even when this fails.
    assert_eq!(
        moved,
        10.0,
        "each of b's sessions moved once (a double count is the bug that \
         concurrent_requests_of_a_moving_session_count_one_reassignment isolates); logged:\n{}",
        moves_logged(&[&one, &two])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_of_a_moving_session_count_one_reassignment() {
    // With a and b only, every move off b goes to a: two requests of one session that both find
    // the pin on b race their compare-and-set to the same value, and only the winner moved it.
    let redis = RedisServer::start();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let body = body(&[&a, &b], &redis);
    let one = Balancer::start(&body).await;
    let two = Balancer::start(&body).await;
    let http = client();
    let mut on_b = Vec::new();
    for i in 0..20 {
        let sid = format!("s-{i}");
        if send(&http, &one, &sid).await == "b" {
            assert_eq!(send(&http, &two, &sid).await, "b");
            on_b.push(sid);
        }
    }
    assert_eq!(on_b.len(), 10);

    act(&one, "/api/backends/b/disable").await;
    assert_eventually!(PROPAGATION, state_of(&two, "b").await == "disabled");
    for sid in &on_b {
        let (w, x, y, z) = tokio::join!(
            send(&http, &one, sid),
            send(&http, &one, sid),
            send(&http, &two, sid),
            send(&http, &two, sid)
        );
        assert_eq!([&w, &x, &y, &z], ["a"; 4], "{sid}");
    }
    let moved = metric_or_zero(&one, "tether_reassignments_total{reason=\"disabled\"}").await
        + metric_or_zero(&two, "tether_reassignments_total{reason=\"disabled\"}").await;
    assert_eq!(
        moved,
        10.0,
        "10 pins moved in Redis, each once; counted:\n{}",
        moves_logged(&[&one, &two])
    );
}

const TOKEN: &str = "admin-token-for-tests-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_errors_are_clear_4xx_and_the_token_guards_everything_but_health() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = body(&[&a, &b, &c], &redis);
    let options = BalancerOptions {
        admin_token: Some(TOKEN.to_string()),
        ..BalancerOptions::default()
    };
    let mut lb = Balancer::start_with(options, &body).await;

    // Without the right token: 401 JSON with a Bearer challenge, on /metrics and /api/*.
    let wrong = format!("{TOKEN}x");
    let prefix = &TOKEN[..TOKEN.len() - 1];
    for (method, path) in [
        (Method::GET, "/metrics"),
        (Method::GET, "/api/backends"),
        (Method::POST, "/api/backends/a/drain"),
        (Method::GET, "/api/affinity/some-key"),
        (Method::DELETE, "/api/affinity/some-key"),
        (Method::POST, "/api/reload"),
        (Method::GET, "/api/nothing-here"),
    ] {
        for auth in [
            None,
            Some(format!("Bearer {wrong}")),
            Some(format!("Bearer {prefix}")),
            Some("Bearer ".to_string()),
            Some(TOKEN.to_string()),
            Some(format!("Basic {TOKEN}")),
        ] {
            let reply = lb
                .admin_with_header(method.clone(), path, auth.as_deref())
                .await;
            assert_eq!(
                reply.status, 401,
                "{method} {path} with {auth:?}: {}",
                reply.text
            );
            assert!(reply.json()["error"].is_string(), "{}", reply.text);
            assert_eq!(
                reply.headers.get("www-authenticate").map(|v| v.as_bytes()),
                Some(&b"Bearer"[..])
            );
        }
    }
    // Nothing was changed by the refused requests.
    assert_eq!(state_of(&lb, "a").await, "enabled");
    // Health and readiness stay open to probes.
    for path in ["/healthz", "/readyz"] {
        let reply = lb.admin_with_token(Method::GET, path, None).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        let reply = lb.admin_with_token(Method::GET, path, Some(&wrong)).await;
        assert_eq!(
            reply.status, 200,
            "{path} with a wrong token: {}",
            reply.text
        );
    }
    let ready = lb.admin(Method::GET, "/readyz").await.json();
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["redis"], "up", "{ready}");
    // With it: 200.
    let reply = lb.admin(Method::GET, "/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(reply.text.contains("tether_redis_up 1"), "{}", reply.text);
    assert_eq!(lb.admin(Method::GET, "/api/backends").await.status, 200);

    // Errors, authorized: unknown backend, unknown action, bad deadline, wrong method, no route.
    let cases: &[(Method, &str, u16)] = &[
        (Method::POST, "/api/backends/zzz/drain", 404),
        (Method::POST, "/api/backends/zzz/enable", 404),
        (Method::POST, "/api/backends/a/explode", 404),
        (
            Method::POST,
            "/api/backends/a/drain?deadline_secs=soon",
            400,
        ),
        (Method::POST, "/api/backends/a/drain?deadline_secs=0", 400),
        (Method::GET, "/api/backends/a/drain", 405),
        (Method::DELETE, "/api/backends", 405),
        (Method::POST, "/metrics", 405),
        (Method::GET, "/api/reload", 405),
        (Method::PUT, "/api/affinity/k", 405),
        (Method::GET, "/api/nothing-here", 404),
        (Method::GET, "/api/backends/a", 404),
        (Method::GET, "/api/affinity/k?source=cookie:nope", 400),
    ];
    for (method, path, status) in cases {
        let reply = lb.admin(method.clone(), path).await;
        assert_eq!(reply.status, *status, "{method} {path}: {}", reply.text);
        let json = reply.json();
        let message = json["error"].as_str().unwrap_or_else(|| panic!("{json}"));
        assert!(!message.is_empty());
        assert_eq!(
            reply.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
    }
    let unknown = lb
        .admin(Method::POST, "/api/backends/zzz/drain")
        .await
        .json();
    assert!(
        unknown["error"].as_str().unwrap().contains("zzz"),
        "the error names the id: {unknown}"
    );
    // None of that changed a state.
    for id in ["a", "b", "c"] {
        assert_eq!(state_of(&lb, id).await, "enabled", "{id}");
    }
    let m = lb.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_backend_state{backend=\"a\",state=\"enabled\"}"),
        Some(1.0)
    );

    // The token is read on reload like the rest of the file: a new one replaces the old.
    let new_token = "a-rotated-admin-token-9876543210";
    let text = std::fs::read_to_string(lb.config_path()).unwrap();
    std::fs::write(
        lb.config_path(),
        text.replace(
            &format!("token = \"{TOKEN}\""),
            &format!("token = \"{new_token}\""),
        ),
    )
    .unwrap();
    let reply = lb.admin(Method::POST, "/api/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["restart_required"], serde_json::json!([]));
    assert_eq!(lb.admin(Method::GET, "/api/backends").await.status, 401);
    let reply = lb
        .admin_with_token(Method::GET, "/api/backends", Some(new_token))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // Neither token ever reaches the log, whatever was asked.
    lb.stop().await;
    let log = lb.log();
    assert!(log.contains("tether starting"), "{}", tail(&log, 20));
    assert!(!log.contains(TOKEN), "the admin token is in the log");
    assert!(
        !log.contains(new_token),
        "the new admin token is in the log"
    );
    assert!(!log.contains(prefix), "a prefix of the token is in the log");
}

/// Percent-encodes everything but unreserved characters, as for a path segment.
fn encode_segment(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_can_be_looked_up_and_unpinned_on_every_instance() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    // The cookie comes first, so the header source has to be named.
    let body = config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"cookie:connect.sid\", \"header:x-session-id\"]\npolicy = \"round_robin\"",
    );
    let one = Balancer::start(&body).await;
    let two = Balancer::start(&body).await;
    let http = client();

    let session = "s:42/x+y=z %";
    let path = format!(
        "/api/affinity/{}?source=header:x-session-id",
        encode_segment(session)
    );
    let source = tether::config::KeySource::Header(http::HeaderName::from_static(SESSION_HEADER));
    let hash = key_hash(&source, session).to_string();
    let pin_key = header_pin_key(session);

    // Nothing yet.
    let reply = one.admin(Method::GET, &path).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let info = reply.json();
    assert_eq!(info["key_hash"], hash.as_str(), "{info}");
    assert_eq!(info["pinned_backend"], Value::Null, "{info}");
    assert_eq!(info["cached_backend"], Value::Null, "{info}");

    let first = send(&http, &one, session).await;
    let info = one.admin(Method::GET, &path).await.json();
    assert_eq!(info["source"], "header:x-session-id", "{info}");
    assert_eq!(info["pinned_backend"], first.as_str(), "{info}");
    assert_eq!(info["cached_backend"], first.as_str(), "{info}");
    assert_eq!(info["stored_value"], format!("v1:{first}"), "{info}");
    let ttl = info["ttl_ms"].as_i64().unwrap_or(-1);
    assert!((1..=86_400_000).contains(&ttl), "ttl_ms {ttl}: {info}");
    // Instance two knows it from Redis only, until it serves it.
    let info = two.admin(Method::GET, &path).await.json();
    assert_eq!(info["pinned_backend"], first.as_str(), "{info}");
    assert_eq!(info["cached_backend"], Value::Null, "{info}");
    assert_eq!(send(&http, &two, session).await, first);
    let info = two.admin(Method::GET, &path).await.json();
    assert_eq!(info["cached_backend"], first.as_str(), "{info}");
    // The default source is the first configured one: another key entirely.
    let other = two
        .admin(
            Method::GET,
            &format!("/api/affinity/{}", encode_segment(session)),
        )
        .await
        .json();
    assert_eq!(other["source"], "cookie:connect.sid", "{other}");
    assert_ne!(other["key_hash"], hash.as_str(), "{other}");
    assert_eq!(other["pinned_backend"], Value::Null, "{other}");
    assert_eq!(one.admin(Method::GET, "/api/affinity/").await.status, 400);

    // Unpin through one: gone from Redis, from one's cache at once and from two's by pub/sub.
    let mut current = first.clone();
    let mut changed = false;
    let mut unpins = 0.0;
    for round in 0..8 {
        let (here, there) = if round % 2 == 0 {
            (&one, &two)
        } else {
            (&two, &one)
        };
        let reply = here.admin(Method::DELETE, &path).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let json = reply.json();
        assert_eq!(json["unpinned"], true, "round {round}: {json}");
        assert_eq!(json["key_hash"], hash.as_str(), "{json}");
        unpins += 1.0;
        assert_eq!(redis_get(&redis, &pin_key), None, "round {round}");
        let info = here.admin(Method::GET, &path).await.json();
        assert_eq!(info["cached_backend"], Value::Null, "{info}");
        assert_eq!(info["pinned_backend"], Value::Null, "{info}");
        assert_eventually!(
            PROPAGATION,
            there.admin(Method::GET, &path).await.json()["cached_backend"] == Value::Null,
            "round {round}: the other instance still has the key cached"
        );
        // The next request, through the other instance, is a new assignment there.
        let misses = metric_or_zero(there, "tether_affinity_lookups_total{result=\"miss\"}").await;
        let now_on = send(&http, there, session).await;
        assert_eq!(
            metric_or_zero(there, "tether_affinity_lookups_total{result=\"miss\"}").await,
            misses + 1.0,
            "round {round}: assigned afresh"
        );
        assert_eq!(redis_get(&redis, &pin_key), Some(format!("v1:{now_on}")));
        assert_eq!(send(&http, here, session).await, now_on, "both agree");
        changed |= now_on != current;
        current = now_on;
        if changed && round >= 1 {
            break;
        }
    }
    assert!(changed, "round-robin never gave the key another backend");
    let counted = metric_or_zero(&one, "tether_reassignments_total{reason=\"unpinned\"}").await
        + metric_or_zero(&two, "tether_reassignments_total{reason=\"unpinned\"}").await;
    assert_eq!(counted, unpins);

    // Unpinning what is not pinned is not an error, and counts nothing.
    let reply = one.admin(Method::DELETE, "/api/affinity/never-seen").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["unpinned"], false);
    let counted = metric_or_zero(&one, "tether_reassignments_total{reason=\"unpinned\"}").await
        + metric_or_zero(&two, "tether_reassignments_total{reason=\"unpinned\"}").await;
    assert_eq!(counted, unpins);
}

/// The 1-based line of the first occurrence of `needle` in the balancer's config file.
fn line_of(lb: &Balancer, needle: &str) -> usize {
    let text = std::fs::read_to_string(lb.config_path()).expect("reading the config");
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} is not in the config"));
    text[..at].lines().count() + usize::from(text[..at].ends_with('\n') || at == 0)
}

/// The `n`-th (0-based) line that contains `needle`, 1-based.
fn nth_line_with(lb: &Balancer, needle: &str, n: usize) -> usize {
    let text = std::fs::read_to_string(lb.config_path()).expect("reading the config");
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(n)
        .unwrap_or_else(|| panic!("no {n}-th line with {needle:?}"))
        .0
        + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_swaps_backends_without_a_failed_request_and_a_bad_file_changes_nothing()
{
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let d = Backend::start("d").await;
    let mut lb = Balancer::start(&body(&[&a, &b, &c], &redis)).await;
    let http = client();
    let reloads_ok = "tether_config_reloads_total{result=\"ok\"}";
    let reloads_failed = "tether_config_reloads_total{result=\"failed\"}";

    // Three WebSockets, one to each backend (sessions pinned by a first GET).
    let mut sockets: BTreeMap<String, Ws> = BTreeMap::new();
    for i in 0.. {
        let sid = format!("ws-{i}");
        let on = send(&http, &lb, &sid).await;
        if let std::collections::btree_map::Entry::Vacant(slot) = sockets.entry(on.clone()) {
            let (mut ws, ws_on) = open_ws(&lb, &sid).await;
            assert_eq!(ws_on, on, "the upgrade follows the session");
            assert_eq!(echo(&mut ws, "x").await, format!("{on}:x"));
            slot.insert(ws);
        }
        if sockets.len() == 3 || i > 30 {
            break;
        }
    }
    assert_eq!(sockets.len(), 3);
    assert_eventually!(
        SOON,
        lb.admin_backend("c").await["open_websockets"].as_u64() == Some(1)
    );

    // 8 workers: each has 10 sessions of its own it comes back to, and every fifth request is
    // a new session.
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

    // 1. SIGHUP: c out, d in.
    lb.write_config(&body(&[&a, &b, &d], &redis));
    lb.sighup();
    assert_eventually!(SOON, metric_or_zero(&lb, reloads_ok).await == 1.0);
    let first_reload = Instant::now();
    assert!(lb.log().contains("configuration reloaded"));
    load.wait_for_more(200, SOON).await;
    let fresh = spread(&new_sessions(&lb, "after-hup", 30).await);
    assert!(fresh.get("d").copied().unwrap_or(0) > 0, "{fresh:?}");
    assert_eq!(fresh.get("c"), None, "{fresh:?}");

    // 2. The API: b out too.
    let reply = lb.admin(Method::POST, "/api/reload").await;
    // Not yet written: nothing changed, still a successful reload.
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.json(),
        serde_json::json!({"ok": true, "added": [], "removed": [], "restart_required": []})
    );
    lb.write_config(&body(&[&a, &d], &redis));
    let reply = lb.admin(Method::POST, "/api/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.json(),
        serde_json::json!({"ok": true, "added": [], "removed": ["b"], "restart_required": []})
    );
    let second_reload = Instant::now();
    assert_eq!(metric_or_zero(&lb, reloads_ok).await, 3.0);
    load.wait_for_more(200, SOON).await;

    // 3. Broken files: a syntax error, then a semantic one (c again, and d twice). Neither
    //    applies; both are reported with FILE:LINE:COL by the API, SIGHUP and the log.
    let good = body(&[&a, &d], &redis);
    lb.write_config(&format!("{good}\n[[backend]\nid = \"c\"\n"));
    let syntax_line = line_of(&lb, "[[backend]\nid = \"c\"");
    let reply = lb.admin(Method::POST, "/api/reload").await;
    assert_eq!(reply.status, 422, "{}", reply.text);
    let json = reply.json();
    assert_eq!(json["ok"], false, "{json}");
    let diagnostics: Vec<String> = json["diagnostics"]
        .as_array()
        .unwrap_or_else(|| panic!("diagnostics in {json}"))
        .iter()
        .map(|d| d.as_str().expect("a diagnostic line").to_string())
        .collect();
    let file = lb.config_path().display().to_string();
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert!(
        diagnostics[0].starts_with(&format!("{file}:{syntax_line}:")),
        "FILE:LINE:COL for line {syntax_line}: {diagnostics:?}"
    );

    lb.write_config(&format!("{}{}{}", good, c.toml(), d.toml()));
    let duplicate_line = nth_line_with(&lb, "id = \"d\"", 1);
    let reply = lb.admin(Method::POST, "/api/reload").await;
    assert_eq!(reply.status, 422, "{}", reply.text);
    let diagnostics = reply.json()["diagnostics"].clone();
    let first = diagnostics[0].as_str().unwrap_or_default().to_string();
    assert!(
        first.starts_with(&format!("{file}:{duplicate_line}:6: ")) && first.contains("duplicate"),
        "the duplicate id at {duplicate_line}:6: {diagnostics}"
    );
    lb.sighup();
    assert_eventually!(SOON, metric_or_zero(&lb, reloads_failed).await == 3.0);
    assert!(
        lb.log().contains(&first),
        "the log has the diagnostic {first:?}:\n{}",
        tail(&lb.log(), 20)
    );
    assert_eq!(metric_or_zero(&lb, reloads_ok).await, 3.0);
    let broken_at = Instant::now();
    load.wait_for_more(200, SOON).await;

    // Still a and d only, for new sessions and old.
    let listed: Vec<String> = lb.admin(Method::GET, "/api/backends").await.json()["backends"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| b["id"].as_str().expect("an id").to_string())
        .collect();
    assert_eq!(listed, ["a", "d"]);
    let fresh = spread(&new_sessions(&lb, "after-broken", 30).await);
    assert_eq!(fresh.keys().collect::<Vec<_>>(), ["a", "d"], "{fresh:?}");

    let report = load.stop().await;
    report.assert_no_failures("reloads under load");
    // Requests sent after a reload took effect never reach what it removed.
    let after_first = report.backends_since(first_reload);
    assert_eq!(
        after_first.get("c"),
        None,
        "after the first reload: {after_first:?}"
    );
    assert!(
        after_first.get("d").copied().unwrap_or(0) > 0,
        "{after_first:?}"
    );
    let after_second = report.backends_since(second_reload);
    assert_eq!(
        after_second.keys().collect::<Vec<_>>(),
        ["a", "d"],
        "after the second reload: {after_second:?}"
    );
    let after_broken = report.backends_since(broken_at);
    assert_eq!(after_broken.keys().collect::<Vec<_>>(), ["a", "d"]);
    eprintln!(
        "{} requests under load, {:?} after the first reload",
        report.len(),
        after_first
    );

    // Every WebSocket is still open, to its backend, removed or not.
    for (on, ws) in sockets.iter_mut() {
        assert_eq!(echo(ws, "x").await, format!("{on}:x"), "the tunnel to {on}");
    }
    assert_eq!(
        lb.admin_backend("a").await["open_websockets"].as_u64(),
        Some(1)
    );
    // Sessions once on removed backends moved, and say why.
    assert!(metric_or_zero(&lb, "tether_reassignments_total{reason=\"removed\"}").await > 0.0);
    for (_, mut ws) in sockets {
        ws.close(None).await.ok();
    }
    let m = lb.metrics().await;
    assert_eventually!(
        SOON,
        metric_sum(&lb.metrics().await, "tether_backend_open_websockets", &[]) == 0.0,
        "{m}"
    );
}

/// Every request the metrics scenario sends through tether, by backend and status class, and
/// where each session is now.
#[derive(Default)]
struct Tally {
    requests: BTreeMap<(String, String), f64>,
    on: BTreeMap<String, String>,
}

impl Tally {
    /// GET `path` through `lb` (as `session`, if any); records the answer; returns status and
    /// backend.
    async fn get(
        &mut self,
        http: &reqwest::Client,
        lb: &Balancer,
        path: &str,
        session: Option<&str>,
    ) -> (u16, String) {
        let headers: Vec<(&str, &str)> = session.map(|s| (SESSION_HEADER, s)).into_iter().collect();
        let (status, id, _) = get_backend(http, &lb.url(path), &headers).await;
        let id =
            id.unwrap_or_else(|| panic!("GET {path} as {session:?}: {status} from no backend"));
        let class = format!("{}xx", status / 100);
        *self.requests.entry((id.clone(), class)).or_default() += 1.0;
        if let Some(s) = session {
            self.on.insert(s.to_string(), id.clone());
        }
        (status, id)
    }

    async fn ok(&mut self, http: &reqwest::Client, lb: &Balancer, session: Option<&str>) -> String {
        let (status, id) = self.get(http, lb, "/", session).await;
        assert_eq!(status, 200, "GET / as {session:?}");
        id
    }

    /// The sessions now on `backend`.
    fn sessions_on(&self, backend: &str) -> Vec<String> {
        self.on
            .iter()
            .filter(|(_, b)| *b == backend)
            .map(|(s, _)| s.clone())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_family_with_the_values_of_a_scripted_scenario() {
    let redis = RedisServer::start();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut k = Backend::start("k").await;
    // k is killed on the way: its ejection must outlast the scenario.
    let body = body(&[&a, &b, &k], &redis) + "\n[upstream]\npassive_eject_secs = 600\n";
    let warm = Balancer::start(&body).await;
    let mut lb = Balancer::start(&body).await;
    let http = client();
    let mut t = Tally::default();
    // Expected counter values, by sample.
    let mut want: BTreeMap<&str, f64> = BTreeMap::new();
    let add = |want: &mut BTreeMap<&str, f64>, sample: &'static str, n: f64| {
        *want.entry(sample).or_default() += n;
    };
    const CACHE: &str = "tether_affinity_lookups_total{result=\"cache\"}";
    const REDIS: &str = "tether_affinity_lookups_total{result=\"redis\"}";
    const MISS: &str = "tether_affinity_lookups_total{result=\"miss\"}";
    const FALLBACK: &str = "tether_affinity_lookups_total{result=\"fallback\"}";
    const NONE: &str = "tether_affinity_lookups_total{result=\"none\"}";
    const ASSIGNED: &str = "tether_assignments_total{policy=\"round_robin\"}";
    const DOWN: &str = "tether_reassignments_total{reason=\"down\"}";
    const DISABLED: &str = "tether_reassignments_total{reason=\"disabled\"}";
    const DEADLINE: &str = "tether_reassignments_total{reason=\"drain_deadline\"}";
    const UNPINNED: &str = "tether_reassignments_total{reason=\"unpinned\"}";
    const CONNECT: &str = "tether_reassignments_total{reason=\"connect_failure\"}";
    const RETRIES: &str = "tether_retries_total";
    const K_FAILED: &str = "tether_upstream_connect_failures_total{backend=\"k\"}";
    const RELOAD_OK: &str = "tether_config_reloads_total{result=\"ok\"}";
    const RELOAD_FAILED: &str = "tether_config_reloads_total{result=\"failed\"}";

    let m = lb.metrics().await;
    assert_eq!(metric_value(&m, "tether_redis_up"), Some(1.0));
    assert_eq!(metric_sum(&m, "tether_requests_total", &[]), 0.0);

    // 1. Six new sessions (round-robin: two per backend), then three pinned by another
    //    instance, found in Redis.
    for i in 0..6 {
        t.ok(&http, &lb, Some(&format!("m-{i}"))).await;
    }
    add(&mut want, MISS, 6.0);
    add(&mut want, ASSIGNED, 6.0);
    for i in 0..3 {
        let sid = format!("p-{i}");
        send(&http, &warm, &sid).await;
        t.ok(&http, &lb, Some(&sid)).await;
    }
    add(&mut want, REDIS, 3.0);
    // 2. Each of the six twice more: from the cache.
    for _ in 0..2 {
        for i in 0..6 {
            t.ok(&http, &lb, Some(&format!("m-{i}"))).await;
        }
    }
    add(&mut want, CACHE, 12.0);
    // 3. Three requests without a key.
    for _ in 0..3 {
        t.ok(&http, &lb, None).await;
    }
    add(&mut want, NONE, 3.0);
    // 4. A 5xx and a 4xx from backends (an unhealthy /healthz, an unknown Engine.IO sid).
    a.set_healthy(false);
    let on_a = t.sessions_on("a")[0].clone();
    assert_eq!(
        t.get(&http, &lb, "/healthz", Some(&on_a)).await,
        (503, "a".into())
    );
    a.set_healthy(true);
    let on_b = t.sessions_on("b")[0].clone();
    let path = "/socket.io/?EIO=4&transport=polling&sid=nobody";
    assert_eq!(
        t.get(&http, &lb, path, Some(&on_b)).await,
        (400, "b".into())
    );
    add(&mut want, CACHE, 2.0);

    // 5. k dies. Its first session finds out by a refused connect (retried elsewhere, pin
    //    moved); k is then ejected, so its second session moves before trying (down).
    k.kill_and_wait().await;
    let on_k: Vec<String> = t
        .sessions_on("k")
        .into_iter()
        .filter(|s| s.starts_with("m-"))
        .collect();
    assert_eq!(on_k.len(), 2, "{:?}", t.on);
    assert_ne!(t.ok(&http, &lb, Some(&on_k[0])).await, "k");
    add(&mut want, CACHE, 1.0);
    add(&mut want, K_FAILED, 1.0);
    add(&mut want, RETRIES, 1.0);
    add(&mut want, CONNECT, 1.0);
    assert_ne!(t.ok(&http, &lb, Some(&on_k[1])).await, "k");
    add(&mut want, DOWN, 1.0);
    // Found in the cache (a lookup), then moved.
    add(&mut want, CACHE, 1.0);
    let k_entry = lb.admin_backend("k").await;
    assert_eq!(k_entry["ejected"], true, "{k_entry}");
    assert_eq!(k_entry["up"], false, "{k_entry}");

    // 6. a drains with a one-second deadline; once it passed, a's sessions move (to b).
    let deadline =
        act(&lb, "/api/backends/a/drain?deadline_secs=1").await["drain_deadline_unix_ms"]
            .as_u64()
            .expect("a deadline");
    assert_eventually!(Duration::from_secs(5), wall_ms() > deadline);
    let leaving_a = t.sessions_on("a");
    assert!(leaving_a.len() >= 2, "{:?}", t.on);
    for sid in &leaving_a {
        assert_eq!(t.ok(&http, &lb, Some(sid)).await, "b", "{sid}");
    }
    add(&mut want, DEADLINE, leaving_a.len() as f64);
    add(&mut want, CACHE, leaving_a.len() as f64);
    act(&lb, "/api/backends/a/enable").await;
    // 7. b is disabled: its sessions move on their next request (to a).
    act(&lb, "/api/backends/b/disable").await;
    let leaving_b = t.sessions_on("b");
    for sid in &leaving_b {
        assert_eq!(t.ok(&http, &lb, Some(sid)).await, "a", "{sid}");
    }
    add(&mut want, DISABLED, leaving_b.len() as f64);
    add(&mut want, CACHE, leaving_b.len() as f64);
    act(&lb, "/api/backends/b/enable").await;
    // 8. An operator unpins m-0: its next request is a new assignment.
    let reply = lb
        .admin(
            Method::DELETE,
            "/api/affinity/m-0?source=header:x-session-id",
        )
        .await;
    assert_eq!(reply.json()["unpinned"], true, "{}", reply.text);
    add(&mut want, UNPINNED, 1.0);
    t.ok(&http, &lb, Some("m-0")).await;
    add(&mut want, MISS, 1.0);
    add(&mut want, ASSIGNED, 1.0);
    // A session id that must never reach the log.
    let secret = "raw-session-secret-q7w8e9";
    t.ok(&http, &lb, Some(secret)).await;
    add(&mut want, MISS, 1.0);
    add(&mut want, ASSIGNED, 1.0);

    // 9. A WebSocket counts as an active request and an open WebSocket while open, and as one
    //    1xx request once closed.
    let (mut ws, ws_on) = open_ws(&lb, "ws-session").await;
    add(&mut want, MISS, 1.0);
    add(&mut want, ASSIGNED, 1.0);
    assert_eq!(echo(&mut ws, "x").await, format!("{ws_on}:x"));
    let m = lb.metrics().await;
    let open = format!("tether_backend_open_websockets{{backend=\"{ws_on}\"}}");
    let active = format!("tether_backend_active_requests{{backend=\"{ws_on}\"}}");
    assert_eq!(metric_value(&m, &open), Some(1.0), "{m}");
    assert_eq!(metric_value(&m, &active), Some(1.0), "{m}");
    assert_eq!(metric_sum(&m, "tether_backend_open_websockets", &[]), 1.0);
    assert_eq!(metric_sum(&m, "tether_backend_active_requests", &[]), 1.0);
    let entry = lb.admin_backend(&ws_on).await;
    assert_eq!(entry["open_websockets"], 1, "{entry}");
    assert_eq!(entry["active_requests"], 1, "{entry}");
    ws.close(None).await.expect("closing the websocket");
    drop(ws);
    assert_eventually!(
        SOON,
        metric_sum(&lb.metrics().await, "tether_backend_active_requests", &[]) == 0.0
    );
    *t.requests.entry((ws_on.clone(), "1xx".into())).or_default() += 1.0;

    // 10. A reload of the same file, and one of a broken file.
    lb.sighup();
    assert_eventually!(SOON, lb.metric(RELOAD_OK).await == Some(1.0));
    add(&mut want, RELOAD_OK, 1.0);
    let good = lb.body().to_string();
    lb.write_config(&format!("{good}\n[upstream]\n"));
    assert_eq!(lb.admin(Method::POST, "/api/reload").await.status, 422);
    add(&mut want, RELOAD_FAILED, 1.0);
    lb.write_config(&good);

    // Pinned sessions: what Redis holds, per backend (nothing moved or expired behind tether's
    // back so far, so the count is exact).
    let mut stored: BTreeMap<String, f64> = BTreeMap::new();
    for (_, v) in redis_pins(&redis) {
        *stored
            .entry(v.trim_start_matches("v1:").to_string())
            .or_default() += 1.0;
    }
    for backend in ["a", "b", "k"] {
        let sample = format!("tether_backend_pinned_sessions{{backend=\"{backend}\"}}");
        let expected = stored.get(backend).copied().unwrap_or(0.0);
        assert_eventually!(
            SOON,
            lb.metric(&sample).await == Some(expected),
            "{sample} is {:?}: Redis holds {stored:?}",
            lb.metric(&sample).await
        );
    }
    // A count bucket that has ended counts nothing, and reading the counts deletes it.
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        - 10;
    let _: i64 = redis::cmd("HINCRBY")
        .arg("tether:counts:a")
        .arg(ended)
        .arg(7)
        .query(&mut redis.conn())
        .expect("HINCRBY");
    let sample = "tether_backend_pinned_sessions{backend=\"a\"}";
    assert_eq!(
        lb.metric(sample).await,
        Some(stored.get("a").copied().unwrap_or(0.0))
    );
    let kept: bool = redis::cmd("HEXISTS")
        .arg("tether:counts:a")
        .arg(ended)
        .query(&mut redis.conn())
        .expect("HEXISTS");
    assert!(!kept, "an ended bucket was kept");

    // 11. Redis stalls (paused longer than the 200 ms timeout): one command times out, Redis is
    //     marked down, and a new session is placed by the rendezvous hash.
    let errors_before = lb.metric("tether_redis_errors_total").await.unwrap_or(0.0);
    let mut conn = redis.conn();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query(&mut conn)
        .expect("CLIENT PAUSE");
    t.ok(&http, &lb, Some("during-the-stall")).await;
    add(&mut want, FALLBACK, 1.0);
    assert_eventually!(
        Duration::from_secs(10),
        lb.metric("tether_redis_up").await == Some(1.0)
    );

    // The whole exposition.
    let m = lb.metrics().await;
    for (sample, value) in &want {
        assert_eq!(metric_value(&m, sample), Some(*value), "{sample}\n{m}");
    }
    for zero in [REDIS, FALLBACK, NONE, CACHE, MISS]
        .iter()
        .chain(&[DOWN, DISABLED, DEADLINE, UNPINNED, CONNECT])
    {
        // Every label value is exported, even at zero.
        assert!(metric_value(&m, zero).is_some(), "{zero} is exported\n{m}");
    }
    for ((backend, class), n) in &t.requests {
        let sample = format!("tether_requests_total{{backend=\"{backend}\",class=\"{class}\"}}");
        assert_eq!(metric_value(&m, &sample), Some(*n), "{sample}\n{m}");
    }
    let total: f64 = t.requests.values().sum();
    assert_eq!(metric_sum(&m, "tether_requests_total", &[]), total, "{m}");
    assert_eq!(
        metric_sum(&m, "tether_requests_total", &[("class", "2xx")]),
        total - 3.0,
        "all but the 503, the 400 and the WebSocket's 101"
    );
    for backend in ["a", "b", "k"] {
        let answered: f64 = t
            .requests
            .iter()
            .filter(|((b, _), _)| b == backend)
            .map(|(_, n)| n)
            .sum();
        let count = format!("tether_request_duration_seconds_count{{backend=\"{backend}\"}}");
        assert_eq!(metric_value(&m, &count), Some(answered), "{count}\n{m}");
        let inf =
            format!("tether_request_duration_seconds_bucket{{backend=\"{backend}\",le=\"+Inf\"}}");
        assert_eq!(metric_value(&m, &inf), Some(answered), "{inf}");
        let sum = format!("tether_request_duration_seconds_sum{{backend=\"{backend}\"}}");
        let sum = metric_value(&m, &sum).unwrap_or(-1.0);
        assert!(
            answered == 0.0 || sum > 0.0,
            "{backend}: duration sum {sum}"
        );
        let active = format!("tether_backend_active_requests{{backend=\"{backend}\"}}");
        assert_eq!(metric_value(&m, &active), Some(0.0), "{active}");
        let open = format!("tether_backend_open_websockets{{backend=\"{backend}\"}}");
        assert_eq!(metric_value(&m, &open), Some(0.0), "{open}");
    }
    assert_eq!(
        metric_sum(&m, "tether_upstream_connect_failures_total", &[]),
        1.0
    );
    // Redis: up again, the stall counted, and request-path commands timed (one per assignment
    // or move at least).
    assert_eq!(metric_value(&m, "tether_redis_up"), Some(1.0));
    let errors = metric_value(&m, "tether_redis_errors_total").unwrap_or(0.0);
    assert!(
        (errors_before + 1.0..=errors_before + 3.0).contains(&errors),
        "redis errors {errors_before} -> {errors}"
    );
    let redis_calls =
        metric_value(&m, "tether_redis_command_duration_seconds_count").unwrap_or(0.0);
    assert!(
        redis_calls >= want[MISS] + 1.0 + 3.0,
        "{redis_calls} timed redis commands"
    );
    let redis_time = metric_value(&m, "tether_redis_command_duration_seconds_sum").unwrap_or(0.0);
    assert!(
        redis_time >= 0.2,
        "the timed-out command alone took 200 ms: {redis_time}"
    );
    // Backends: k down (ejected), a and b up; states.
    assert_eq!(
        metric_value(&m, "tether_backend_up{backend=\"a\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&m, "tether_backend_up{backend=\"b\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&m, "tether_backend_up{backend=\"k\"}"),
        Some(0.0)
    );
    act(&lb, "/api/backends/a/drain").await;
    act(&lb, "/api/backends/b/disable").await;
    let m = lb.metrics().await;
    for (backend, state) in [("a", "draining"), ("b", "disabled"), ("k", "enabled")] {
        for s in ["enabled", "draining", "disabled"] {
            let sample = format!("tether_backend_state{{backend=\"{backend}\",state=\"{s}\"}}");
            let value = if s == state { 1.0 } else { 0.0 };
            assert_eq!(metric_value(&m, &sample), Some(value), "{sample}");
        }
    }
    // The access log: a line per request, with the key's hash and never the key.
    let log = lb.log();
    assert!(!log.contains(secret), "a raw session id is in the log");
    let source = tether::config::KeySource::Header(http::HeaderName::from_static(SESSION_HEADER));
    let hashed = key_hash(&source, secret).to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("tether::access") && l.contains(&hashed)),
        "an access line with key {hashed}:\n{}",
        tail(&log, 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_first_placed_during_a_redis_stall_keeps_its_backend_when_redis_recovers() {
    // A stall (Redis slow, not gone) times out the first assignment's `SET NX`; tether fails
    // open. Redis still executes the command when the stall ends. The session must stay where
    // its first request went: its app state is there.
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&body(&[&a, &b, &c], &redis)).await;
    let http = client();
    let mut moved = Vec::new();
    for i in 0..6 {
        let sid = format!("stalled-{i}");
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(800)
            .arg("ALL")
            .query(&mut redis.conn())
            .expect("CLIENT PAUSE");
        let first = send(&http, &lb, &sid).await;
        assert_eventually!(
            Duration::from_secs(10),
            lb.metric("tether_redis_up").await == Some(1.0)
        );
        let mut later = Vec::new();
        for _ in 0..4 {
            later.push(send(&http, &lb, &sid).await);
        }
        let stored = redis_get(&redis, &header_pin_key(&sid));
        if later.iter().any(|l| *l != first) || stored != Some(format!("v1:{first}")) {
            moved.push(format!(
                "{sid}: first on {first}, then {later:?}; Redis holds {stored:?}"
            ));
        }
    }
    assert!(
        moved.is_empty(),
        "sessions switched backends after a Redis stall:\n{}",
        moved.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_lookup_finds_an_ip_key_given_as_the_client_address() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"ip\"]\npolicy = \"round_robin\"",
    ))
    .await;
    let (status, on, _) = get_backend(&client(), &lb.url("/"), &[]).await;
    assert_eq!(status, 200);
    let on = on.expect("a backend");
    assert_eq!(redis_pins(&redis).len(), 1, "the client address is pinned");
    let info = lb
        .admin(Method::GET, "/api/affinity/127.0.0.1")
        .await
        .json();
    assert_eq!(info["source"], "ip", "{info}");
    assert_eq!(
        info["pinned_backend"],
        on.as_str(),
        "an operator names an IP key by the address: {info}\nRedis: {:?}",
        redis_pins(&redis)
    );
    let reply = lb.admin(Method::DELETE, "/api/affinity/127.0.0.1").await;
    assert_eq!(reply.json()["unpinned"], true, "{}", reply.text);
    assert!(redis_pins(&redis).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_lookup_finds_an_insert_key_given_as_the_cookie_value() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(
        &(config(
            &[&a, &b, &c],
            Some(&redis),
            "sources = [\"insert\"]\npolicy = \"round_robin\"",
        ) + &format!("\n[affinity.insert]\nsecrets = [\"{TEST_INSERT_SECRET}\"]\n")),
    )
    .await;
    let (status, on, headers) = get_backend(&client(), &lb.url("/"), &[]).await;
    assert_eq!(status, 200);
    let on = on.expect("a backend");
    let set_cookie = headers["set-cookie"].to_str().expect("ascii").to_string();
    let value = set_cookie
        .split(';')
        .next()
        .and_then(|c| c.strip_prefix("tether="))
        .unwrap_or_else(|| panic!("{set_cookie}"))
        .to_string();
    let path = format!("/api/affinity/{}", encode_segment(&value));
    let info = lb.admin(Method::GET, &path).await.json();
    assert_eq!(info["source"], "insert", "{info}");
    assert_eq!(
        info["pinned_backend"],
        on.as_str(),
        "an operator names an insert key by the cookie value the client sends ({value}): {info}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    // RFC 9110 section 11.1: the authentication scheme is a case-insensitive token.
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    let options = BalancerOptions {
        admin_token: Some(TOKEN.to_string()),
        ..BalancerOptions::default()
    };
    let lb = Balancer::start_with(options, &body(&[&a], &redis)).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} {TOKEN}");
        let reply = lb
            .admin_with_header(Method::GET, "/api/backends", Some(&auth))
            .await;
        assert_eq!(reply.status, 200, "{scheme}: {}", reply.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_settings_that_need_a_restart_and_keeps_the_running_ones() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&body(&[&a, &b, &c], &redis)).await;
    let http = client();
    let before: Vec<String> = [0, 1, 2, 3].iter().map(|i| format!("r-{i}")).collect();
    let mut pinned = BTreeMap::new();
    for sid in &before {
        pinned.insert(sid.clone(), send(&http, &lb, sid).await);
    }

    // Every start-up-bound setting changed at once; the listeners must stay where they are.
    let text = std::fs::read_to_string(lb.config_path()).unwrap();
    let (new_proxy, new_admin) = two_free_ports();
    let changed = text
        .replace(
            &format!("127.0.0.1:{}", lb.proxy_port()),
            &format!("127.0.0.1:{new_proxy}"),
        )
        .replace(
            &format!("127.0.0.1:{}", lb.admin_port()),
            &format!("127.0.0.1:{new_admin}"),
        )
        .replace("threads = 2", "threads = 3")
        .replace("grace_period_secs = 0", "grace_period_secs = 7")
        .replace(
            "graceful_shutdown_timeout_secs = 0",
            "graceful_shutdown_timeout_secs = 8",
        )
        .replace(TEST_HASH_KEY, "another-hash-key-0123456789abcdef");
    assert_ne!(changed, text);
    std::fs::write(lb.config_path(), changed).unwrap();
    let reply = lb.admin(Method::POST, "/api/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let json = reply.json();
    let required: HashSet<String> = json["restart_required"]
        .as_array()
        .unwrap_or_else(|| panic!("{json}"))
        .iter()
        .map(|v| v.as_str().expect("a setting name").to_string())
        .collect();
    let missing = |settings: &[&str]| -> Vec<String> {
        settings
            .iter()
            .filter(|s| !required.contains(**s))
            .map(|s| s.to_string())
            .collect()
    };
    let bound = missing(&[
        "server.listen",
        "server.threads",
        "admin.listen",
        "affinity.hash_key",
    ]);
    assert!(bound.is_empty(), "not reported: {bound:?} in {json}");
    // Still on the old ports, with the old hash key: every session where it was.
    for sid in &before {
        assert_eq!(&send(&http, &lb, sid).await, &pinned[sid], "{sid}");
    }
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", new_proxy))
            .await
            .is_err()
    );
    // Pingora reads its grace periods once, when the server is built: a changed value only
    // applies after a restart or upgrade, and the operator should be told.
    let grace = missing(&[
        "server.grace_period_secs",
        "server.graceful_shutdown_timeout_secs",
    ]);
    assert!(grace.is_empty(), "not reported: {grace:?} in {json}");
}
