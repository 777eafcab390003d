//! Sessions stick: many sessions, every key source, insert cookies, learning from Set-Cookie,
//! the in-process map, and the headers tether adds.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use support::scenario::*;
use support::*;

/// Sends `rounds` requests for each of `sessions` header-keyed sessions through `lb`, 32 sessions
/// at a time; returns, per session, the set of backends that answered. Every answer must be 200.
async fn drive_sessions(lb: &Balancer, sessions: usize, rounds: usize) -> Vec<HashSet<String>> {
    let url = Arc::new(lb.url("/"));
    let http = client();
    for_each_concurrently(sessions, 32, move |i| {
        let (url, http) = (url.clone(), http.clone());
        async move {
            let sid = format!("session-{i}");
            let mut seen = HashSet::new();
            for _ in 0..rounds {
                let (status, id, _) = get_backend(&http, &url, &[(SESSION_HEADER, &sid)]).await;
                assert_eq!(status, 200, "session {sid}");
                seen.insert(id.expect("x-backend-id"));
            }
            seen
        }
    })
    .await
}

fn spread(seen: &[HashSet<String>]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for s in seen {
        assert_eq!(s.len(), 1, "a session saw several backends: {s:?}");
        *counts.entry(s.iter().next().unwrap().clone()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sessions_each_see_one_backend_round_robin() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"",
    ))
    .await;

    let seen = drive_sessions(&lb, 1000, 4).await;
    let counts = spread(&seen);
    // Each new key is assigned exactly once, in rotation.
    let mut sizes: Vec<usize> = counts.values().copied().collect();
    sizes.sort();
    // (A Redis timeout under load makes some keys fail open to the rendezvous hash: the log says.)
    assert_eq!(
        sizes,
        vec![333, 333, 334],
        "{counts:?}\n{}",
        tail(&lb.log(), 40)
    );

    // Every pin is in Redis, versioned, naming the backend that answered.
    for (i, s) in seen.iter().enumerate() {
        let stored = redis_get(&redis, &header_pin_key(&format!("session-{i}")));
        let id = s.iter().next().unwrap();
        assert_eq!(
            stored.as_deref(),
            Some(format!("v1:{id}").as_str()),
            "session-{i}"
        );
    }
    // Steady state is served from the local cache: 1000 misses, 3000 cache hits.
    let m = lb.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"miss\"}"),
        Some(1000.0)
    );
    assert_eq!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"cache\"}"),
        Some(3000.0)
    );
    assert_eq!(
        metric_value(&m, "tether_assignments_total{policy=\"round_robin\"}"),
        Some(1000.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_and_least_connections_spread_new_sessions() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    // c has weight 2: smooth weighted round-robin gives it exactly half of the new keys.
    let backends = format!(
        "{}{}[[backend]]\nid = \"c\"\naddress = \"{}\"\nweight = 2\n",
        a.toml(),
        b.toml(),
        c.address()
    );
    let body = format!(
        "[affinity]\nhash_key = \"{TEST_HASH_KEY}\"\nsources = [\"header:x-session-id\"]\npolicy = \"weighted\"\n\n[redis]\nurl = \"{}\"\n\n{backends}",
        redis.url()
    );
    let lb = Balancer::start(&body).await;
    let counts = spread(&drive_sessions(&lb, 400, 2).await);
    assert_eq!(
        (counts["a"], counts["b"], counts["c"]),
        (100, 100, 200),
        "{counts:?}"
    );
    drop(lb);

    // Least-connections on idle backends rotates ties: an even spread.
    let redis = RedisServer::start();
    let lb = Balancer::start(&config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"header:x-session-id\"]",
    ))
    .await;
    let counts = spread(&drive_sessions(&lb, 300, 2).await);
    for id in ["a", "b", "c"] {
        assert!(
            counts[id] >= 60,
            "least_connections starved {id}: {counts:?}"
        );
    }
}

/// A backend of `lb` issues session `sid` (`GET /set-cookie`, no cookie sent, so the policy picks
/// it): (status, the backend that answered, headers).
async fn issue_session(
    http: &reqwest::Client,
    lb: &Balancer,
    sid: &str,
) -> (u16, Option<String>, http::HeaderMap) {
    let url = lb.url(&format!("/set-cookie?name=connect.sid&value={sid}"));
    get_backend(http, &url, &[]).await
}

/// The pin Redis holds for the `connect.sid` session `sid`.
fn connect_sid_pin(redis: &RedisServer, sid: &str) -> Option<String> {
    let source = tether::config::KeySource::Cookie("connect.sid".into());
    redis_get(redis, &format!("tether:pin:{}", key_hash(&source, sid)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_session_cookie_is_learned_from_set_cookie() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"cookie:connect.sid\"]\npolicy = \"round_robin\"",
    );
    let lb = Balancer::start(&body).await;
    let http = client();
    let mut owners = Vec::new();

    for n in 0..9 {
        // The login response sets the session cookie: whoever answered now owns the session.
        let sid = format!("s%3Asession{n}");
        let (status, owner, headers) = issue_session(&http, &lb, &sid).await;
        assert_eq!(status, 200);
        assert!(headers.get("set-cookie").is_some());
        let owner = owner.unwrap();
        let cookie = format!("connect.sid={sid}");
        // Round-robin would rotate these; the learned pin holds them.
        for _ in 0..5 {
            let (_, id, _) = get_backend(&http, &lb.url("/"), &[("cookie", &cookie)]).await;
            assert_eq!(id.as_deref(), Some(owner.as_str()), "session {n}");
        }
        assert_eq!(connect_sid_pin(&redis, &sid), Some(format!("v1:{owner}")));
        owners.push(owner);
    }
    let m = lb.metrics().await;
    assert_eq!(metric_value(&m, "tether_affinity_learned_total"), Some(9.0));
    // Each learned pin is counted in its owner's session set, and nowhere else.
    let wanted = ["a", "b", "c"].map(|id| owners.iter().filter(|o| *o == id).count());
    assert_eq!(wanted.iter().sum::<usize>(), 9);
    assert_eventually!(
        Duration::from_secs(5),
        ["a", "b", "c"].map(|id| session_count(&redis, id)) == wanted,
        "session sets {:?}, owners {wanted:?}",
        ["a", "b", "c"].map(|id| session_count(&redis, id))
    );

    // Session 0 issued again by each backend in turn (round-robin, no cookie sent), its first
    // owner among them: the pin follows the last issuer, and its count moves with it, never
    // counted twice.
    let sid = "s%3Asession0";
    let mut last = String::new();
    for _ in 0..3 {
        let (status, by, _) = issue_session(&http, &lb, sid).await;
        assert_eq!(status, 200);
        last = by.expect("every answer names its backend");
    }
    assert_eq!(connect_sid_pin(&redis, sid), Some(format!("v1:{last}")));
    let mut wanted = ["a", "b", "c"].map(|id| owners[1..].iter().filter(|o| *o == id).count());
    wanted[["a", "b", "c"].iter().position(|id| *id == last).unwrap()] += 1;
    assert_eventually!(
        Duration::from_secs(5),
        ["a", "b", "c"].map(|id| session_count(&redis, id)) == wanted,
        "counts {:?}, wanted {wanted:?} (session 0 last issued by {last})",
        ["a", "b", "c"].map(|id| session_count(&redis, id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_cookie_is_minted_signed_and_forgeries_are_ignored() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"insert\"]\npolicy = \"round_robin\"",
    ) + &format!("\n[affinity.insert]\nsecrets = [\"{TEST_INSERT_SECRET}\"]\n");
    let lb = Balancer::start(&body).await;
    let http = client();

    let mut owners = HashSet::new();
    for _ in 0..6 {
        let (status, owner, headers) = get_backend(&http, &lb.url("/"), &[]).await;
        assert_eq!(status, 200);
        let owner = owner.unwrap();
        owners.insert(owner.clone());
        let set_cookie = headers["set-cookie"].to_str().unwrap().to_string();
        assert!(set_cookie.starts_with("tether="), "{set_cookie}");
        assert!(set_cookie.contains("; HttpOnly") && set_cookie.contains("; SameSite=Lax"));
        let cookie = set_cookie.split(';').next().unwrap().to_string();
        // The cookie names its backend as a hint; the pin is what routes.
        assert!(cookie.contains(&format!(".{owner}.")), "{cookie}");
        for _ in 0..4 {
            let (_, id, headers) = get_backend(&http, &lb.url("/"), &[("cookie", &cookie)]).await;
            assert_eq!(id.as_deref(), Some(owner.as_str()));
            assert!(
                headers.get("set-cookie").is_none(),
                "a valid cookie is not re-issued"
            );
        }
        // Claiming another backend with the same signature: treated as absent, a new key.
        let other = ["a", "b", "c"].into_iter().find(|x| *x != owner).unwrap();
        let forged = cookie.replace(&format!(".{owner}."), &format!(".{other}."));
        let (status, _, headers) = get_backend(&http, &lb.url("/"), &[("cookie", &forged)]).await;
        assert_eq!(status, 200);
        let reissued = headers["set-cookie"].to_str().unwrap();
        assert_ne!(reissued.split(';').next().unwrap(), forged);
    }
    assert_eq!(owners.len(), 3, "new sessions rotate over every backend");
    let m = lb.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_invalid_keys_total{reason=\"bad_signature\"}"),
        Some(6.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_header_and_ip_sources_in_order() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"header:x-session-id\", \"query:sid\", \"ip\"]\npolicy = \"round_robin\"",
    ))
    .await;
    let http = client();

    // query:sid keys requests without the header; each sid sticks.
    for n in 0..6 {
        let url = lb.url(&format!("/socket.io/?EIO=4&transport=polling&sid=abc{n}"));
        let (_, first, _) = get_backend(&http, &url, &[]).await;
        for _ in 0..3 {
            assert_eq!(get_backend(&http, &url, &[]).await.1, first);
        }
    }
    // Neither header nor query: the client address, one backend for every such request.
    let (_, by_ip, _) = get_backend(&http, &lb.url("/plain"), &[]).await;
    for _ in 0..6 {
        assert_eq!(get_backend(&http, &lb.url("/plain"), &[]).await.1, by_ip);
    }
    let m = lb.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"none\"}"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_map_is_in_process() {
    let (a, b, c) = three_backends().await;
    let body = format!(
        "[affinity]\nsources = [\"header:x-session-id\"]\npolicy = \"round_robin\"\n\n{}{}{}",
        a.toml(),
        b.toml(),
        c.toml()
    );
    let lb = Balancer::start(&body).await;
    let counts = spread(&drive_sessions(&lb, 300, 3).await);
    assert_eq!((counts["a"], counts["b"], counts["c"]), (100, 100, 100));
    assert!(
        lb.log().contains("no [redis] section"),
        "start-up must say the map is in process:\n{}",
        lb.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_reach_the_backend() {
    let a = Backend::start("a").await;
    let lb = Balancer::start(&config(&[&a], None, "sources = [\"ip\"]")).await;
    let http = client();
    get_backend(&http, &lb.url("/"), &[]).await;
    let h = a.last_headers();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    // A client's own X-Forwarded-For is kept and the peer appended; its proto is not trusted.
    get_backend(
        &http,
        &lb.url("/"),
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await;
    let h = a.last_headers();
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_session_slides_its_ttl_and_an_idle_one_expires() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"header:x-session-id\"]\nttl_secs = 2",
    ))
    .await;
    let http = client();
    let key = header_pin_key("busy");
    let pttl = |redis: &RedisServer| -> i64 {
        redis::cmd("PTTL")
            .arg(&key)
            .query(&mut redis.conn())
            .unwrap()
    };

    // Requests every 50 ms for three TTLs: the pin never lapses and never moves.
    let (_, first, _) = get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, "busy")]).await;
    let started = std::time::Instant::now();
    let mut requests = 1;
    while started.elapsed() < std::time::Duration::from_secs(6) {
        let (status, id, _) = get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, "busy")]).await;
        assert_eq!((status, &id), (200, &first));
        let left = pttl(&redis);
        assert!(left > 0, "pin expired while in use (PTTL {left})");
        requests += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Refreshed about every ttl/4, not on every request.
    let m = lb.metrics().await;
    let refreshes = metric_sum(&m, "tether_affinity_refreshes_total", &[]);
    assert!(
        refreshes >= 6.0,
        "too few refreshes for 6 s at ttl 2 s: {refreshes}"
    );
    assert!(
        refreshes * 5.0 < requests as f64,
        "{refreshes} refreshes for {requests} requests"
    );

    // Idle: Redis forgets it after one TTL.
    assert_eventually!(std::time::Duration::from_secs(10), pttl(&redis) == -2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_sources_affinity_is_off_and_every_request_is_balanced() {
    // `sources = []`: a plain load balancer. The same session cookie and header go wherever the
    // policy says, and nothing is pinned.
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = []\npolicy = \"round_robin\"",
    ))
    .await;
    let http = client();
    let mut order = Vec::new();
    for _ in 0..6 {
        let (status, id, _) = get_backend(
            &http,
            &lb.url("/"),
            &[
                (SESSION_HEADER, "one-session"),
                ("cookie", "connect.sid=s1"),
            ],
        )
        .await;
        assert_eq!(status, 200);
        order.push(id.expect("x-backend-id"));
    }
    // Round-robin: each backend twice, in one rotation.
    assert_eq!(order[..3], order[3..], "{order:?}");
    let distinct: HashSet<&String> = order.iter().collect();
    assert_eq!(distinct.len(), 3, "{order:?}");
    assert!(redis_pins(&redis).is_empty(), "nothing is pinned");
    let m = lb.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"none\"}"),
        Some(6.0)
    );
}
