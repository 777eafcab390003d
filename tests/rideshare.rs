//! rideshare over HTTP: sessions (express-session + connect-redis behaviour), input
//! validation, the ride flow, embedded mode, and a Redis restart under a running instance.

mod support;

use std::time::Duration;

use ::rideshare::serde_json::{Value, json};
use support::rideshare::{Agent, COOKIE, Rideshare};
use support::{RedisServer, assert_eventually};

const WAIT: Duration = Duration::from_secs(10);

fn keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query(&mut redis.conn())
        .unwrap_or_else(|e| panic!("KEYS {pattern}: {e}"))
}

fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query(&mut redis.conn())
        .unwrap_or_else(|e| panic!("PTTL {key}: {e}"))
}

fn get(redis: &RedisServer, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut redis.conn())
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

fn session_key(agent: &Agent) -> String {
    format!(
        "sess:{}",
        agent.session_id().expect("agent has a session cookie")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_visitors_get_no_cookie_and_no_session() {
    let redis = RedisServer::start();
    let app = Rideshare::start("a", Some(&redis)).await;
    let mut visitor = Agent::new();
    for (path, status) in [
        ("/", 200),
        ("/healthz", 200),
        ("/socket.io.min.js", 200),
        ("/me", 401),
        ("/location", 401),
        ("/no/such/page", 404),
    ] {
        let reply = visitor.get(&app.url(path)).await;
        assert_eq!(reply.status, status, "GET {path}: {reply:?}");
        assert_eq!(
            reply.instance.as_deref(),
            Some("a"),
            "GET {path}: x-backend-id"
        );
        assert!(
            reply.set_cookies.is_empty(),
            "GET {path} set a cookie: {reply:?}"
        );
        if status >= 400 {
            assert!(!reply.error().is_empty(), "GET {path}: JSON error");
        }
    }
    let page = visitor.get(&app.url("/")).await;
    assert!(
        page.text.contains("/socket.io.min.js"),
        "the page loads the vendored client"
    );
    // Logging out without a session stores nothing either.
    let reply = visitor.post(&app.url("/logout"), None).await;
    assert_eq!(reply.status, 200);
    assert!(reply.set_cookies.is_empty(), "{reply:?}");
    // A Socket.IO handshake is no session either (and names the instance too).
    let handshake = visitor
        .get(&app.url("/socket.io/?EIO=4&transport=polling"))
        .await;
    assert_eq!(handshake.status, 200, "{handshake:?}");
    assert_eq!(handshake.instance.as_deref(), Some("a"));
    assert!(handshake.set_cookies.is_empty(), "{handshake:?}");
    assert_eq!(keys(&redis, "sess:*"), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sets_a_signed_cookie_and_a_session_key_with_ttl() {
    let redis = RedisServer::start();
    let app = Rideshare::start("a", Some(&redis)).await;
    let mut alice = Agent::new();
    let reply = alice.login(&app.base(), "alice", "rider").await;
    assert_eq!(
        reply.json,
        json!({ "name": "alice", "role": "rider", "instance": "a" })
    );
    let cookie = reply.session_cookie().expect("login sets rs.sid");
    let value = alice.cookie.clone().expect("cookie kept");
    assert!(value.starts_with("s:") && value.contains('.'), "{cookie}");
    for attribute in ["Path=/", "HttpOnly", "SameSite=Lax"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(
        !cookie.contains("Max-Age"),
        "a browser-session cookie: {cookie}"
    );

    let key = session_key(&alice);
    assert_eq!(keys(&redis, "sess:*"), vec![key.clone()]);
    let ttl = pttl(&redis, &key);
    assert!(
        ttl > 0 && ttl <= ::rideshare::DEFAULT_SESSION_TTL.as_millis() as i64,
        "PTTL {ttl}"
    );
    let stored: Value = ::rideshare::serde_json::from_str(&get(&redis, &key).expect("stored"))
        .expect("JSON session");
    assert_eq!(stored["user"], json!({ "name": "alice", "role": "rider" }));

    let me = alice.get(&app.url("/me")).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.json["name"], "alice");
    assert!(
        me.set_cookies.is_empty(),
        "no new cookie for a known session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_regenerates_the_session_id() {
    let redis = RedisServer::start();
    let app = Rideshare::start("a", Some(&redis)).await;
    let mut agent = Agent::new();
    agent.login(&app.base(), "alice", "rider").await;
    let first = agent.cookie.clone().expect("cookie");
    let first_key = session_key(&agent);

    agent.login(&app.base(), "bob", "driver").await;
    let second_key = session_key(&agent);
    assert_ne!(first_key, second_key, "login must mint a new session id");
    assert_eq!(get(&redis, &first_key), None, "the old session is deleted");
    assert!(get(&redis, &second_key).is_some());
    assert_eq!(agent.get(&app.url("/me")).await.json["name"], "bob");

    let mut stale = Agent::new();
    stale.cookie = Some(first);
    assert_eq!(stale.get(&app.url("/me")).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_made_on_one_instance_is_valid_on_another() {
    let redis = RedisServer::start();
    let a = Rideshare::start("a", Some(&redis)).await;
    let b = Rideshare::start("b", Some(&redis)).await;
    let mut alice = Agent::new();
    alice.login(&a.base(), "alice", "rider").await;

    let me = alice.get(&b.url("/me")).await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.instance.as_deref(), Some("b"));
    assert_eq!(me.json["name"], "alice");
    assert_eq!(me.json["instance"], "b");

    // Changes made on B are seen on A.
    let set = alice
        .post(
            &b.url("/location"),
            Some(json!({ "lat": 48.85, "lng": 2.35 })),
        )
        .await;
    assert_eq!(set.status, 200, "{set:?}");
    let got = alice.get(&a.url("/location")).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        (got.json["lat"].as_f64(), got.json["lng"].as_f64()),
        (Some(48.85), Some(2.35))
    );

    // An instance with another secret cannot read the cookie: shared secret is required.
    let mut other = Rideshare::config("c", Some(&redis));
    other.session_secret = b"another secret".to_vec();
    let c = Rideshare::start_with(other).await;
    assert_eq!(alice.get(&c.url("/me")).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_session_renews_its_ttl_and_it_expires_without_use() {
    let redis = RedisServer::start();
    let mut config = Rideshare::config("a", Some(&redis));
    config.session_ttl = Duration::from_secs(60);
    let app = Rideshare::start_with(config).await;
    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;
    let key = session_key(&alice);
    let stored = get(&redis, &key).expect("session stored");

    // Shorten the TTL by hand; one read (GETEX ... PX) brings it back to the full TTL.
    let () = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(5_000)
        .query(&mut redis.conn())
        .expect("PEXPIRE");
    assert!(pttl(&redis, &key) <= 5_000);
    assert_eq!(alice.get(&app.url("/me")).await.status, 200);
    let renewed = pttl(&redis, &key);
    assert!(renewed > 55_000, "PTTL after a read: {renewed}");
    assert_eq!(
        get(&redis, &key).as_deref(),
        Some(stored.as_str()),
        "touch, not rewrite"
    );

    // Unused, it expires: then the cookie is no session.
    let () = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(50)
        .query(&mut redis.conn())
        .expect("PEXPIRE");
    assert_eventually!(WAIT, get(&redis, &key).is_none());
    let me = alice.get(&app.url("/me")).await;
    assert_eq!(me.status, 401, "{me:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_ttl_is_kept_alive_by_activity() {
    let redis = RedisServer::start();
    let mut config = Rideshare::config("a", Some(&redis));
    config.session_ttl = Duration::from_millis(800);
    let app = Rideshare::start_with(config).await;
    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;
    let key = session_key(&alice);
    // Active for three TTLs: every request renews it.
    let until = std::time::Instant::now() + Duration::from_millis(2_400);
    while std::time::Instant::now() < until {
        let me = alice.get(&app.url("/me")).await;
        assert_eq!(me.status, 200, "an active session must not expire: {me:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Idle: gone within about one TTL.
    assert_eventually!(WAIT, get(&redis, &key).is_none());
    assert_eq!(alice.get(&app.url("/me")).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_destroys_the_session() {
    let redis = RedisServer::start();
    let app = Rideshare::start("a", Some(&redis)).await;
    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;
    let key = session_key(&alice);
    let old_cookie = alice.cookie.clone();

    let reply = alice.post(&app.url("/logout"), None).await;
    assert_eq!(reply.status, 200);
    let cleared = reply.session_cookie().expect("logout clears the cookie");
    assert!(cleared.starts_with(&format!("{COOKIE}=;")), "{cleared}");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert_eq!(alice.cookie, None);
    assert_eq!(get(&redis, &key), None);
    assert_eq!(keys(&redis, "sess:*"), Vec::<String>::new());

    let mut replay = Agent::new();
    replay.cookie = old_cookie;
    assert_eq!(replay.get(&app.url("/me")).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_tampered_cookies_are_no_session() {
    let redis = RedisServer::start();
    let app = Rideshare::start("a", Some(&redis)).await;
    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;
    let good = alice.cookie.clone().expect("cookie");
    let (id, sig) = good
        .strip_prefix("s:")
        .and_then(|r| r.rsplit_once('.'))
        .expect("s:<id>.<sig>");
    let mut flipped = sig.to_owned().into_bytes();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).expect("ascii");
    let other_id = "A".repeat(id.len());
    let forged = [
        format!("s:{id}.{flipped}"),
        format!("s:{other_id}.{sig}"),
        format!("s:{id}"),
        format!("{id}.{sig}"),
        format!("s:{id}.{sig}x"),
        format!("s:{id}.!!!"),
        "s:.".to_owned(),
        String::new(),
        "x".repeat(10_000),
        "s:%00%ff.%ff".to_owned(),
        "s:ä.ö".to_owned(),
    ];
    for value in forged {
        let mut mallory = Agent::new();
        mallory.cookie = Some(value.clone());
        let me = mallory.get(&app.url("/me")).await;
        assert_eq!(me.status, 401, "cookie {value:?}: {me:?}");
        assert!(!me.error().is_empty());
    }
    assert_eq!(keys(&redis, "sess:*").len(), 1, "only alice's session");
    // Still serving, and the genuine cookie still works.
    assert_eq!(alice.get(&app.url("/me")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_4xx() {
    let redis = RedisServer::start();
    let app = Rideshare::start("a", Some(&redis)).await;
    let login = app.url("/login");
    let mut anon = Agent::new();
    let cases: Vec<(&str, &str, &str)> = vec![
        ("application/json", "{\"name\":", "truncated JSON"),
        ("application/json", "not json", "not JSON"),
        (
            "text/plain",
            "{\"name\":\"a\",\"role\":\"rider\"}",
            "wrong content type",
        ),
        (
            "application/json",
            "{\"name\":\"a\",\"role\":\"pilot\"}",
            "bad role",
        ),
        ("application/json", "{\"name\":\"a\"}", "no role"),
        (
            "application/json",
            "{\"name\":\"\",\"role\":\"rider\"}",
            "empty name",
        ),
        (
            "application/json",
            "{\"name\":\"a\",\"role\":\"rider\",\"x\":1}",
            "unknown field",
        ),
        ("application/json", "[]", "not an object"),
    ];
    for (content_type, body, what) in cases {
        let reply = anon.post_raw(&login, content_type, body).await;
        assert!((400..500).contains(&reply.status), "{what}: {reply:?}");
        assert!(!reply.error().is_empty(), "{what}");
        assert!(
            reply.set_cookies.is_empty(),
            "{what}: no session for bad input"
        );
    }
    let long_name = "n".repeat(41);
    let reply = anon
        .post(&login, Some(json!({ "name": long_name, "role": "rider" })))
        .await;
    assert_eq!(reply.status, 422, "{reply:?}");

    let mut rider = Agent::new();
    rider.login(&app.base(), "alice", "rider").await;
    for (lat, lng) in [(90.5, 0.0), (-91.0, 0.0), (0.0, 180.5), (0.0, -181.0)] {
        let reply = rider
            .post(
                &app.url("/location"),
                Some(json!({ "lat": lat, "lng": lng })),
            )
            .await;
        assert_eq!(reply.status, 422, "({lat}, {lng}): {reply:?}");
        assert!(reply.error().contains("must be between"), "{reply:?}");
    }
    let reply = rider
        .post(
            &app.url("/location"),
            Some(json!({ "lat": "north", "lng": 1 })),
        )
        .await;
    assert_eq!(reply.status, 422, "{reply:?}");
    let reply = rider.get(&app.url("/location")).await;
    assert_eq!(
        reply.status, 404,
        "no location stored by bad input: {reply:?}"
    );
    for body in [
        json!({ "from": "", "to": "b" }),
        json!({ "from": "a" }),
        json!({ "from": { "lat": 100, "lng": 0 }, "to": "b" }),
        json!({ "from": 5, "to": "b" }),
    ] {
        let reply = rider.post(&app.url("/rides"), Some(body.clone())).await;
        assert_eq!(reply.status, 422, "{body}: {reply:?}");
    }
    for path in [
        "/rides/zzz",
        "/rides/0123456789abcdef",
        "/rides/..%2F..%2Fx",
    ] {
        let reply = rider.get(&app.url(path)).await;
        assert_eq!(reply.status, 404, "{path}: {reply:?}");
        assert!(!reply.error().is_empty());
    }
    let reply = rider
        .post(&app.url("/rides/0123456789abcdef/accept"), None)
        .await;
    assert_eq!(reply.status, 403, "riders cannot accept: {reply:?}");

    let mut driver = Agent::new();
    driver.login(&app.base(), "bob", "driver").await;
    let reply = driver
        .post(&app.url("/rides"), Some(json!({ "from": "a", "to": "b" })))
        .await;
    assert_eq!(reply.status, 403, "drivers cannot request: {reply:?}");
    let reply = driver
        .post(&app.url("/rides/0123456789abcdef/accept"), None)
        .await;
    assert_eq!(reply.status, 404, "{reply:?}");

    // Unauthenticated API calls: 401 JSON.
    for path in ["/rides", "/location"] {
        let reply = anon.post(&app.url(path), Some(json!({}))).await;
        assert!(matches!(reply.status, 401 | 422), "{path}: {reply:?}");
    }
    let reply = anon
        .post(&app.url("/location"), Some(json!({ "lat": 1, "lng": 1 })))
        .await;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert!(app.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_requests_and_a_driver_accepts_on_other_instances() {
    let redis = RedisServer::start();
    let a = Rideshare::start("a", Some(&redis)).await;
    let b = Rideshare::start("b", Some(&redis)).await;
    let mut alice = Agent::new();
    alice.login(&a.base(), "alice", "rider").await;
    let reply = alice
        .post(
            &a.url("/rides"),
            Some(json!({ "from": "Gare du Nord", "to": { "lat": 48.7262, "lng": 2.3652 } })),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let ride = reply.json.clone();
    let id = ride["id"].as_str().expect("id").to_owned();
    assert_eq!(ride["status"], "requested");
    assert_eq!(ride["rider"], "alice");
    assert_eq!(ride["driver"], Value::Null);
    assert_eq!(ride["to"], json!({ "lat": 48.7262, "lng": 2.3652 }));
    let key = format!("ride:{id}");
    assert!(pttl(&redis, &key) > 0, "rides are stored with a TTL");

    let mut bob = Agent::new();
    bob.login(&b.base(), "bob", "driver").await;
    let forbidden = bob.get(&b.url(&format!("/rides/{id}"))).await;
    assert_eq!(forbidden.status, 403, "not bob's ride yet: {forbidden:?}");
    let accepted = bob.accept(&b.base(), &id).await;
    assert_eq!(accepted.json["status"], "accepted");
    assert_eq!(accepted.json["driver"], "bob");
    assert_eq!(accepted.instance.as_deref(), Some("b"));
    // Accepting again as bob changes nothing; another driver is refused.
    assert_eq!(bob.accept(&b.base(), &id).await.json["driver"], "bob");
    let mut dave = Agent::new();
    dave.login(&a.base(), "dave", "driver").await;
    let conflict = dave
        .post(&a.url(&format!("/rides/{id}/accept")), None)
        .await;
    assert_eq!(conflict.status, 409, "{conflict:?}");
    let complete = dave
        .post(&a.url(&format!("/rides/{id}/complete")), None)
        .await;
    assert_eq!(complete.status, 403, "{complete:?}");

    let seen = alice.get(&b.url(&format!("/rides/{id}"))).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.json["status"], "accepted");
    assert_eq!(seen.json["driver"], "bob");

    let mut carol = Agent::new();
    carol.login(&a.base(), "carol", "rider").await;
    assert_eq!(carol.get(&a.url(&format!("/rides/{id}"))).await.status, 403);

    let done = bob
        .post(&a.url(&format!("/rides/{id}/complete")), None)
        .await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(done.json["status"], "completed");
    assert_eq!(
        alice.get(&a.url(&format!("/rides/{id}"))).await.json["status"],
        "completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_serves_one_instance_without_redis() {
    let app = Rideshare::start("solo", None).await;
    let mut visitor = Agent::new();
    let page = visitor.get(&app.url("/")).await;
    assert_eq!(page.status, 200);
    assert!(page.set_cookies.is_empty());

    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;
    let first = alice.cookie.clone();
    alice.login(&app.base(), "alice", "rider").await;
    assert_ne!(alice.cookie, first, "regenerated in embedded mode too");
    let mut stale = Agent::new();
    stale.cookie = first;
    assert_eq!(stale.get(&app.url("/me")).await.status, 401);

    let set = alice
        .post(
            &app.url("/location"),
            Some(json!({ "lat": 1.5, "lng": -2.5 })),
        )
        .await;
    assert_eq!(set.status, 200);
    assert_eq!(alice.get(&app.url("/location")).await.json["lat"], 1.5);
    let id = alice.request_ride(&app.base(), "here", "there").await;
    let mut bob = Agent::new();
    bob.login(&app.base(), "bob", "driver").await;
    assert_eq!(bob.accept(&app.base(), &id).await.json["driver"], "bob");
    assert_eq!(
        alice.get(&app.url(&format!("/rides/{id}"))).await.json["status"],
        "accepted"
    );
    let out = alice.post(&app.url("/logout"), None).await;
    assert!(
        out.session_cookie()
            .is_some_and(|c| c.contains("Max-Age=0"))
    );
    assert_eq!(alice.get(&app.url("/me")).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rideshare_keeps_serving_across_a_redis_restart() {
    let mut redis = RedisServer::start();
    let app = Rideshare::start("a", Some(&redis)).await;
    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;

    redis.kill();
    // While Redis is down: the session cannot be read, so 503 (not a panic, not a hang).
    let down = alice.get(&app.url("/me")).await;
    assert_eq!(down.status, 503, "{down:?}");
    assert!(down.error().contains("store unavailable"), "{down:?}");
    // Pages that need no session are still served.
    assert_eq!(Agent::new().get(&app.url("/healthz")).await.status, 200);

    redis.restart();
    // No persistence in the test Redis: the old session is gone, so /me says 401...
    assert_eventually!(
        WAIT,
        alice.get(&app.url("/me")).await.status == 401,
        "old session after the restart"
    );
    // ...and a new login works without restarting rideshare, and so does everything after it.
    let mut bob = Agent::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let reply = bob
            .post(
                &app.url("/login"),
                Some(json!({ "name": "bob", "role": "rider" })),
            )
            .await;
        if reply.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "login after the restart, still failing after {WAIT:?}: {reply:?}"
        );
        tokio::time::sleep(support::POLL_INTERVAL).await;
    }
    let me = bob.get(&app.url("/me")).await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.json["name"], "bob");
    let id = bob.request_ride(&app.base(), "a", "b").await;
    assert!(get(&redis, &format!("ride:{id}")).is_some());
    assert_eq!(keys(&redis, "sess:*"), vec![session_key(&bob)]);
    assert!(app.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_fails_fast_on_bad_config_and_stops_gracefully() {
    let mut config = ::rideshare::Config::new("bad id\n");
    config.session_secret = b"x".to_vec();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = ::rideshare::serve(listener, config, std::future::pending())
        .await
        .expect_err("an id that cannot be a header is refused");
    assert!(err.to_string().contains("instance id"), "{err:#}");

    let redis = RedisServer::start();
    let mut app = Rideshare::start("a", Some(&redis)).await;
    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;
    app.stop().await;
    assert!(!app.is_running());
    assert!(
        support::client()
            .get(app.url("/healthz"))
            .send()
            .await
            .is_err(),
        "the listener is closed after stop"
    );
}
