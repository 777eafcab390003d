//! Security: Redis passwords and TLS, secrets kept out of logs and output, insert-cookie signing,
//! rotation, attributes and expiry, the admin token, and affinity keys never logged or stored
//! raw.
//!
//! Every tether here logs at `RUST_LOG=debug` (set through [`BalancerOptions::env`], whatever
//! `TETHER_TEST_LOG` says), so a secret that reaches any log line at that level fails a test.

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use http::Method;
use support::scenario::*;
use support::*;
use tether::affinity::cookie::InsertCookies;
use tether::config::{InsertSettings, SameSite, Secret};

/// Redis password of the default user in these tests.
const REDIS_PASSWORD: &str = "redis-Pa55word-7c1d9e";
/// An ACL user and its password.
const REDIS_USER: &str = "tether-app";
const REDIS_USER_PASSWORD: &str = "acl-Pa55word-43b8f0";
/// A password Redis does not accept.
const WRONG_PASSWORD: &str = "wrong-Pa55word-e5a2c4";
/// Admin token.
const ADMIN_TOKEN: &str = "admin-T0ken-5f0e3b9a27c4d18e";

/// How long to wait for something tether does in the background.
const WAIT: Duration = Duration::from_secs(10);

/// Options that make tether log everything it logs at debug level, plus `env`.
fn debug_options(env: &[(&str, &str)]) -> BalancerOptions {
    let mut vars = vec![("RUST_LOG".to_string(), "debug".to_string())];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    BalancerOptions {
        env: vars,
        ..BalancerOptions::default()
    }
}

/// A config body keyed by the session header, with `redis` as the whole `[redis]` section.
fn body_with_redis(backends: &[&Backend], redis: &str) -> String {
    let mut out = format!(
        "[affinity]\nhash_key = \"{TEST_HASH_KEY}\"\nsources = [\"{}\"]\npolicy = \"round_robin\"\n\n[redis]\n{redis}\ntimeout_ms = 200\n\n",
        format_args!("header:{SESSION_HEADER}")
    );
    for b in backends {
        out.push_str(&b.toml());
        out.push('\n');
    }
    out
}

/// Panics if `needle` occurs in `haystack`, showing where.
fn assert_absent(haystack: &str, needle: &str, what: &str) {
    if let Some(at) = haystack.find(needle) {
        let start = haystack[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = haystack[at..].find('\n').map_or(haystack.len(), |i| at + i);
        panic!(
            "{what} contains `{needle}`:\n{}",
            &haystack[start..end.min(start + 2000)]
        );
    }
}

/// `raw` with every byte but the URL-unreserved ones percent-encoded (upper-case hex).
fn percent_encode(raw: &str) -> String {
    let mut out = String::new();
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every form a client or a log may show of `raw`: itself, percent-encoded with upper- and
/// lower-case hex, and with `+` for spaces.
fn encoded_forms(raw: &str) -> Vec<String> {
    let upper = percent_encode(raw);
    let lower = upper
        .split('%')
        .enumerate()
        .map(|(i, part)| {
            if i == 0 || part.len() < 2 {
                part.to_string()
            } else {
                format!("{}{}", part[..2].to_ascii_lowercase(), &part[2..])
            }
        })
        .collect::<Vec<_>>()
        .join("%");
    let plus = upper.replace("%20", "+");
    let mut forms = vec![raw.to_string(), upper, lower, plus];
    forms.sort();
    forms.dedup();
    forms
}

/// Sends one request keyed by the session header through `lb`; returns the backend.
async fn keyed(lb: &Balancer, http: &reqwest::Client, session: &str) -> String {
    let (status, id, _) = get_backend(http, &lb.url("/"), &[(SESSION_HEADER, session)]).await;
    assert_eq!(status, 200, "session {session}\n{}", tail(&lb.log(), 30));
    id.expect("x-backend-id")
}

/// Runs `tether check FILE` with `env`; returns (success, stdout + stderr).
fn tether_check(file: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("check")
        .arg(file)
        .env_remove("TETHER_HASH_KEY")
        .env_remove("TETHER_INSERT_SECRETS")
        .env_remove("TETHER_REDIS_URL")
        .env_remove("TETHER_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("running tether check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every key in Redis with its value(s), as text, for grepping.
fn redis_dump(redis: &RedisServer) -> String {
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut conn)
        .expect("KEYS *");
    let mut out = String::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query(&mut conn).expect("TYPE");
        let values: Vec<String> = match kind.as_str() {
            "string" => vec![
                redis::cmd("GET")
                    .arg(&k)
                    .query::<String>(&mut conn)
                    .expect("GET"),
            ],
            "zset" => redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(&mut conn)
                .expect("ZRANGE"),
            "hash" => redis::cmd("HGETALL")
                .arg(&k)
                .query(&mut conn)
                .expect("HGETALL"),
            "set" => redis::cmd("SMEMBERS")
                .arg(&k)
                .query(&mut conn)
                .expect("SMEMBERS"),
            "list" => redis::cmd("LRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query(&mut conn)
                .expect("LRANGE"),
            other => vec![format!("<{other}>")],
        };
        out.push_str(&format!("{k} = {}\n", values.join(" ")));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Redis: passwords
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_urls_route_and_pin_and_the_password_is_never_logged() {
    let redis = RedisServer::start_with(RedisOptions {
        password: Some(REDIS_PASSWORD.into()),
        users: vec![(REDIS_USER.into(), REDIS_USER_PASSWORD.into())],
        tcp: true,
        ..RedisOptions::default()
    });
    let port = redis.tcp_port().unwrap();
    let (a, b, c) = three_backends().await;
    let http = client();
    let urls = [
        (
            format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/"),
            "default-user",
        ),
        (
            format!("redis://{REDIS_USER}:{REDIS_USER_PASSWORD}@127.0.0.1:{port}/"),
            "acl-user",
        ),
    ];
    for (url, who) in urls {
        let body = body_with_redis(&[&a, &b, &c], &format!("url = \"{url}\""));
        let lb = Balancer::start_with(debug_options(&[]), &body).await;
        for i in 0..6 {
            let session = format!("{who}-session-{i}");
            let first = keyed(&lb, &http, &session).await;
            assert_eq!(keyed(&lb, &http, &session).await, first);
            // The pin is in Redis (read with an authenticated connection).
            let stored = redis_get(&redis, &header_pin_key(&session));
            assert_eq!(stored, Some(format!("v1:{first}")), "{who}: {session}");
        }
        assert_eq!(lb.metric("tether_redis_up").await, Some(1.0));
        let log = lb.log();
        assert!(
            log.contains(&format!("url=redis://***@127.0.0.1:{port}/")),
            "the redacted URL is logged at start-up:\n{}",
            tail(&log, 40)
        );
        assert_absent(&log, REDIS_PASSWORD, "tether's log");
        assert_absent(&log, REDIS_USER_PASSWORD, "tether's log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_open_and_is_never_printed() {
    let redis = RedisServer::start_with(RedisOptions {
        password: Some(REDIS_PASSWORD.into()),
        tcp: true,
        ..RedisOptions::default()
    });
    let port = redis.tcp_port().unwrap();
    let (a, b, c) = three_backends().await;
    let http = client();
    let socket = redis.socket_path().display().to_string();
    for url in [
        format!("redis://:{WRONG_PASSWORD}@127.0.0.1:{port}/"),
        format!("redis://default:{WRONG_PASSWORD}@127.0.0.1:{port}/"),
        format!("redis+unix://{socket}?pass={WRONG_PASSWORD}"),
    ] {
        let body = body_with_redis(&[&a, &b, &c], &format!("url = \"{url}\""));
        let lb = Balancer::start_with(debug_options(&[]), &body).await;
        // Fails open: every request answered, sessions still stick (rendezvous hash).
        for i in 0..10 {
            let session = format!("session-{i}");
            let first = keyed(&lb, &http, &session).await;
            assert_eq!(keyed(&lb, &http, &session).await, first);
        }
        assert_eq!(lb.metric("tether_redis_up").await, Some(0.0));
        let m = lb.metrics().await;
        assert_eq!(
            metric_sum(&m, "tether_requests_total", &[("class", "5xx")]),
            0.0
        );
        // Give the prober time to retry (and log at debug) a few times.
        let prober_tries = eventually(WAIT, || async {
            lb.log().matches("redis still unavailable").count() >= 2
        })
        .await;
        assert!(prober_tries, "{}", tail(&lb.log(), 30));
        let log = lb.log();
        let start_up = log
            .lines()
            .find(|l| l.contains("redis unreachable at start-up"))
            .unwrap_or_else(|| panic!("no start-up warning:\n{}", tail(&log, 40)));
        assert!(
            start_up.contains("password"),
            "the warning says what to check: {start_up}"
        );
        assert_absent(&log, WRONG_PASSWORD, "tether's log");
        assert_absent(&log, REDIS_PASSWORD, "tether's log");

        // `tether check` accepts the file (a password is not checked offline) and prints no
        // part of the URL's secret.
        let (ok, out) = tether_check(lb.config_path(), &[]);
        assert!(ok, "{out}");
        assert_absent(&out, WRONG_PASSWORD, "tether check's output");
    }
    assert_eq!(
        redis_dump(&redis),
        "",
        "nothing reached Redis without the password"
    );
}

#[test]
fn tether_check_never_prints_a_password_in_a_bad_url() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    let body = |url: &str| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n\n[affinity]\nhash_key = \"{TEST_HASH_KEY}\"\nsources = [\"ip\"]\n\n[redis]\nurl = \"{url}\"\n\n[[backend]]\nid = \"a\"\naddress = \"127.0.0.1:3001\"\n"
        )
    };
    for url in [
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:6379/not-a-db"),
        format!("rediss://user:{REDIS_PASSWORD}@127.0.0.1:6379/#insecure"),
        format!("redis+unix:///tmp/x.sock?db=nope&pass={REDIS_PASSWORD}"),
        format!("redis://user:{REDIS_PASSWORD}@127.0.0.1:6379/?protocol=resp9"),
    ] {
        std::fs::write(&file, body(&url)).unwrap();
        let (ok, out) = tether_check(&file, &[]);
        assert!(!ok, "{url} should not validate:\n{out}");
        assert!(out.contains("bad.toml:9:7:"), "{out}");
        assert_absent(&out, REDIS_PASSWORD, "tether check's output");
        // The same URL from the environment.
        std::fs::write(&file, body("redis://127.0.0.1:6379/")).unwrap();
        let (ok, out) = tether_check(&file, &[("TETHER_REDIS_URL", &url)]);
        assert!(
            !ok,
            "{url} should not validate from the environment:\n{out}"
        );
        assert!(out.contains("TETHER_REDIS_URL"), "{out}");
        assert_absent(&out, REDIS_PASSWORD, "tether check's output");
    }
}

// ---------------------------------------------------------------------------------------------
// Redis: TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_pins_in_redis() {
    let redis = RedisServer::start_with(RedisOptions {
        password: Some(REDIS_PASSWORD.into()),
        tls: true,
        ..RedisOptions::default()
    });
    let port = redis.tls_port().unwrap();
    let (a, b, c) = three_backends().await;
    let http = client();
    for host in ["127.0.0.1", "localhost"] {
        let body = body_with_redis(
            &[&a, &b, &c],
            &format!(
                "url = \"rediss://:{REDIS_PASSWORD}@{host}:{port}/\"\nca_file = \"{}\"",
                redis.ca_file().display()
            ),
        );
        let lb = Balancer::start_with(debug_options(&[]), &body).await;
        assert_eq!(
            lb.metric("tether_redis_up").await,
            Some(1.0),
            "{}",
            tail(&lb.log(), 30)
        );
        for i in 0..6 {
            let session = format!("tls-{host}-{i}");
            let first = keyed(&lb, &http, &session).await;
            assert_eq!(keyed(&lb, &http, &session).await, first);
            assert_eq!(
                redis_get(&redis, &header_pin_key(&session)),
                Some(format!("v1:{first}")),
                "{session}"
            );
        }
        let log = lb.log();
        let connected = log
            .lines()
            .find(|l| l.contains("connected to redis"))
            .unwrap_or_else(|| panic!("{}", tail(&log, 30)));
        assert!(
            connected.contains(&format!("url=rediss://***@{host}:{port}/"))
                && connected.contains("tls=true"),
            "{connected}"
        );
        assert_absent(&log, REDIS_PASSWORD, "tether's log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_wrong_ca_or_no_ca_fails_open_with_a_clear_log_line() {
    let redis = RedisServer::start_with(RedisOptions {
        tls: true,
        ..RedisOptions::default()
    });
    let port = redis.tls_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, test_ca("some other CA").0).unwrap();
    let (a, b, c) = three_backends().await;
    let http = client();
    let url = format!("url = \"rediss://127.0.0.1:{port}/\"");
    for redis_section in [
        // A CA that did not sign the server's certificate.
        format!("{url}\nca_file = \"{}\"", other_ca.display()),
        // The system's roots (which do not hold the test CA).
        url.clone(),
    ] {
        let body = body_with_redis(&[&a, &b, &c], &redis_section);
        let lb = Balancer::start_with(debug_options(&[]), &body).await;
        for i in 0..6 {
            let session = format!("session-{i}");
            let first = keyed(&lb, &http, &session).await;
            assert_eq!(keyed(&lb, &http, &session).await, first);
        }
        assert_eq!(lb.metric("tether_redis_up").await, Some(0.0));
        let log = lb.log();
        let line = log
            .lines()
            .find(|l| l.contains("redis unreachable at start-up"))
            .unwrap_or_else(|| panic!("no start-up warning:\n{}", tail(&log, 40)));
        assert!(
            line.contains("certificate") && line.contains("ca_file"),
            "the warning names the certificate problem and what to check: {line}"
        );
    }
    assert_eq!(redis_pins(&redis), vec![], "nothing was written");
}

// ---------------------------------------------------------------------------------------------
// Insert cookies
// ---------------------------------------------------------------------------------------------

const OLD_SECRET: &str = "insert-secret-old-0123456789";
const NEW_SECRET: &str = "insert-secret-new-9876543210";

fn insert_body(backends: &[&Backend], redis: &RedisServer, insert: &str) -> String {
    config(
        backends,
        Some(redis),
        &format!("sources = [\"insert\"]\npolicy = \"round_robin\"\n\n[affinity.insert]\n{insert}"),
    )
}

fn signer(secrets: &[&str]) -> InsertCookies {
    InsertCookies::new(&InsertSettings {
        cookie: "tether".into(),
        secrets: secrets
            .iter()
            .map(|s| Secret::new(s.as_bytes().to_vec()))
            .collect(),
        secure: Some(false),
        same_site: SameSite::Lax,
        http_only: true,
        max_age: None,
    })
}

/// The `name=value` part of the response's Set-Cookie for `tether`, if any.
fn insert_cookie_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("tether="))
        .map(|v| v.split(';').next().unwrap().to_string())
}

/// The key of an insert cookie (`tether=<key>.…`).
fn key_of(cookie: &str) -> &str {
    let value = cookie.strip_prefix("tether=").unwrap();
    value.split('.').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_keeps_sessions_and_reissues_with_the_new_secret() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let old_only = format!("secrets = [\"{OLD_SECRET}\"]");
    let mut lb = Balancer::start_with(
        debug_options(&[]),
        &insert_body(&[&a, &b, &c], &redis, &old_only),
    )
    .await;
    let http = client();
    let url = lb.url("/");

    // Sessions made before the rotation.
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let (status, owner, headers) = get_backend(&http, &url, &[]).await;
        assert_eq!(status, 200);
        let cookie = insert_cookie_of(&headers).expect("a new session gets a cookie");
        sessions.push((cookie, owner.unwrap()));
    }

    // Rotate: the new secret first, the old one still verifying.
    let rotated = format!("secrets = [\"{NEW_SECRET}\", \"{OLD_SECRET}\"]");
    lb.write_config(&insert_body(&[&a, &b, &c], &redis, &rotated));
    let reply = lb.admin(Method::POST, "/api/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    let new_only = signer(&[NEW_SECRET]);
    let old_verifier = signer(&[OLD_SECRET]);
    let mut reissued = Vec::new();
    for (cookie, owner) in &sessions {
        let (status, id, headers) = get_backend(&http, &url, &[("cookie", cookie)]).await;
        assert_eq!(status, 200);
        assert_eq!(
            id.as_ref(),
            Some(owner),
            "an old-secret cookie still routes"
        );
        let fresh = insert_cookie_of(&headers).expect("the old-secret cookie is re-issued");
        assert_eq!(key_of(&fresh), key_of(cookie), "same key, same pin");
        let value = fresh.strip_prefix("tether=").unwrap();
        assert!(
            new_only.verify(value.as_bytes()).is_some(),
            "signed by the new secret: {fresh}"
        );
        assert!(old_verifier.verify(value.as_bytes()).is_none());
        // With the new cookie: same backend, nothing to re-issue.
        let (_, id, headers) = get_backend(&http, &url, &[("cookie", &fresh)]).await;
        assert_eq!(id.as_ref(), Some(owner));
        assert_eq!(insert_cookie_of(&headers), None, "{fresh}");
        reissued.push((fresh, owner.clone()));
    }

    // Retire the old secret: re-issued cookies keep working, old ones count as absent.
    let new_secret_only = format!("secrets = [\"{NEW_SECRET}\"]");
    lb.write_config(&insert_body(&[&a, &b, &c], &redis, &new_secret_only));
    let reply = lb.admin(Method::POST, "/api/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    for ((old, _), (fresh, owner)) in sessions.iter().zip(&reissued) {
        let (_, id, headers) = get_backend(&http, &url, &[("cookie", fresh)]).await;
        assert_eq!(id.as_ref(), Some(owner));
        assert_eq!(insert_cookie_of(&headers), None);
        let (status, _, headers) = get_backend(&http, &url, &[("cookie", old)]).await;
        assert_eq!(status, 200);
        let minted = insert_cookie_of(&headers).expect("a new key for a retired-secret cookie");
        assert_ne!(key_of(&minted), key_of(old));
    }
    assert_eq!(
        lb.metric("tether_invalid_keys_total{reason=\"bad_signature\"}")
            .await,
        Some(3.0)
    );
    let log = lb.log();
    for secret in [OLD_SECRET, NEW_SECRET] {
        assert_absent(&log, secret, "tether's log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_cookie_attributes_are_configurable() {
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    let http = client();
    let cases = [
        (
            format!("secrets = [\"{OLD_SECRET}\"]"),
            vec!["; Path=/", "; HttpOnly", "; SameSite=Lax"],
            vec!["; Secure", "Max-Age"],
        ),
        (
            format!(
                "secrets = [\"{OLD_SECRET}\"]\ncookie = \"lb\"\nsecure = true\nsame_site = \"none\"\nhttp_only = false\nmax_age_secs = 3600"
            ),
            vec!["; Path=/", "; Secure", "; SameSite=None", "; Max-Age=3600"],
            vec!["HttpOnly"],
        ),
        (
            format!("secrets = [\"{OLD_SECRET}\"]\nsecure = true\nsame_site = \"strict\""),
            vec!["; HttpOnly", "; Secure", "; SameSite=Strict"],
            vec!["Max-Age"],
        ),
    ];
    for (insert, present, absent) in cases {
        let lb = Balancer::start(&insert_body(&[&a], &redis, &insert)).await;
        let (status, _, headers) = get_backend(&http, &lb.url("/"), &[]).await;
        assert_eq!(status, 200);
        let set_cookie = headers["set-cookie"].to_str().unwrap().to_string();
        for p in present {
            assert!(set_cookie.contains(p), "{insert}: {set_cookie} lacks {p}");
        }
        for p in absent {
            assert!(!set_cookie.contains(p), "{insert}: {set_cookie} has {p}");
        }
        // v2 format: key, marker, issue time, backend hint, signature.
        let value = set_cookie.split(';').next().unwrap();
        let parts: Vec<&str> = value.split_once('=').unwrap().1.split('.').collect();
        assert_eq!(parts.len(), 5, "{value}");
        assert_eq!((parts[1], parts[3]), ("v2", "a"), "{value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_insert_cookies_never_choose_a_backend_and_live_ones_are_refreshed() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    // A one-hour lifetime (max_age_secs), so the test can sign cookies of any age.
    let insert = format!("secrets = [\"{OLD_SECRET}\"]\nmax_age_secs = 3600");
    let lb = Balancer::start_with(
        debug_options(&[]),
        &insert_body(&[&a, &b, &c], &redis, &insert),
    )
    .await;
    let http = client();
    let url = lb.url("/");
    let signer = signer(&[OLD_SECRET]);
    let now = tether::affinity::cookie::unix_secs();

    let (_, owner, headers) = get_backend(&http, &url, &[]).await;
    let owner = owner.unwrap();
    let cookie = insert_cookie_of(&headers).unwrap();
    let key = key_of(&cookie).to_string();
    let other = ["a", "b", "c"].into_iter().find(|x| *x != owner).unwrap();
    let signed = |issued: u64, hint: &str| {
        let set_cookie = signer.set_cookie_at(key.as_bytes(), hint, issued, false);
        set_cookie.split(';').next().unwrap().to_string()
    };

    // Valid signature, past its lifetime, naming another backend: treated as absent, so
    // neither its pin nor its hint is used; a new key is minted.
    for issued in [now - 3601, now - 86_400, now + 3600] {
        let expired = signed(issued, other);
        let (status, _, headers) = get_backend(&http, &url, &[("cookie", &expired)]).await;
        assert_eq!(status, 200);
        let minted = insert_cookie_of(&headers).expect("a new key replaces an expired one");
        assert_ne!(key_of(&minted), key, "issued {issued}");
    }
    assert_eq!(
        lb.metric("tether_invalid_keys_total{reason=\"expired\"}")
            .await,
        Some(3.0)
    );

    // Older than a quarter of its lifetime: still the same session, the cookie refreshed.
    let aging = signed(now - 1800, &owner);
    let (_, id, headers) = get_backend(&http, &url, &[("cookie", &aging)]).await;
    assert_eq!(id.as_deref(), Some(owner.as_str()));
    let refreshed = insert_cookie_of(&headers).expect("an aging cookie is refreshed");
    assert_eq!(key_of(&refreshed), key);
    let issued: u64 = refreshed.split('.').nth(2).unwrap().parse().unwrap();
    assert!(issued >= now, "{refreshed}");
    // Young: no Set-Cookie.
    let (_, id, headers) = get_backend(&http, &url, &[("cookie", &refreshed)]).await;
    assert_eq!(id.as_deref(), Some(owner.as_str()));
    assert_eq!(insert_cookie_of(&headers), None);
}

// ---------------------------------------------------------------------------------------------
// Admin token
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_works_from_the_environment_and_is_never_logged() {
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    let body = config(&[&a], Some(&redis), "sources = [\"ip\"]");
    let lb =
        Balancer::start_with(debug_options(&[("TETHER_ADMIN_TOKEN", ADMIN_TOKEN)]), &body).await;
    let wrong = "admin-T0ken-wrong-guess-000000";
    for path in ["/metrics", "/api/backends", "/api/affinity/127.0.0.1"] {
        let none = lb.admin_with_token(Method::GET, path, None).await;
        assert_eq!(none.status, 401, "{path}");
        let bad = lb.admin_with_token(Method::GET, path, Some(wrong)).await;
        assert_eq!(bad.status, 401, "{path}");
        let good = lb
            .admin_with_token(Method::GET, path, Some(ADMIN_TOKEN))
            .await;
        assert!(good.status == 200 || good.status == 404, "{path}: {good:?}");
        assert_absent(&good.text, ADMIN_TOKEN, path);
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            lb.admin_with_token(Method::GET, path, None).await.status,
            200
        );
    }
    let reload = lb
        .admin_with_token(Method::POST, "/api/reload", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(reload.status, 200, "{}", reload.text);
    let log = lb.log();
    assert_absent(&log, ADMIN_TOKEN, "tether's log");
    assert_absent(&log, wrong, "tether's log");

    // From the file too; `tether check` does not print it.
    let options = BalancerOptions {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..debug_options(&[])
    };
    let lb = Balancer::start_with(options, &body).await;
    assert_eq!(lb.admin(Method::GET, "/api/backends").await.status, 200);
    assert_eq!(
        lb.admin_with_token(Method::GET, "/api/backends", None)
            .await
            .status,
        401
    );
    assert_absent(&lb.log(), ADMIN_TOKEN, "tether's log");
    let (ok, out) = tether_check(lb.config_path(), &[]);
    assert!(ok, "{out}");
    assert_absent(&out, ADMIN_TOKEN, "tether check's output");
}

// ---------------------------------------------------------------------------------------------
// Affinity keys are never logged or stored raw
// ---------------------------------------------------------------------------------------------

/// A client whose connections come from `ip` (any 127.x address is loopback on Linux).
fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("building a client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_keys_are_never_logged_or_stored_raw() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    // Every raw key carries this marker, so a fragment of any of them is found too.
    let marker = format!("KEY-{:08x}", rand_u32());
    // Distinctive raw keys, with characters that URL-encode (the app cookie as Express writes
    // it, a query sid with a space and a slash).
    let app_cookie = format!("s:cookie-{marker}.SiGnAtUrE/x+y=");
    let learned_cookie = format!("s:learned-{marker}");
    let header_key = format!("header-{marker}");
    let query_key = format!("query {marker}/x y");
    let client_ip: IpAddr = "127.0.0.77".parse().unwrap();

    let sources = format!(
        "sources = [\"cookie:connect.sid\", \"header:{SESSION_HEADER}\", \"query:sid\", \"insert\"]\npolicy = \"round_robin\"\n\n[affinity.insert]\nsecrets = [\"{OLD_SECRET}\"]"
    );
    let with_insert = Balancer::start_with(
        debug_options(&[]),
        &config(&[&a, &b, &c], Some(&redis), &sources),
    )
    .await;
    let with_ip = Balancer::start_with(
        debug_options(&[]),
        &config(
            &[&a, &b, &c],
            Some(&redis),
            "sources = [\"ip\"]\npolicy = \"round_robin\"",
        ),
    )
    .await;
    let http = client_from(client_ip);

    let encoded_query = percent_encode(&query_key);
    let plus_query = encoded_query.replace("%20", "+");
    let mut insert_keys = Vec::new();
    for round in 0..3 {
        let lb = &with_insert;
        let cookie = format!("connect.sid={}", percent_encode(&app_cookie));
        let requests: Vec<(String, Vec<(&str, &str)>)> = vec![
            (lb.url("/"), vec![("cookie", &cookie)]),
            (lb.url("/"), vec![(SESSION_HEADER, &header_key)]),
            (
                lb.url(&format!(
                    "/poll?EIO=4&transport=polling&sid={encoded_query}&t={round}"
                )),
                vec![],
            ),
            (lb.url(&format!("/x?sid={plus_query}")), vec![]),
        ];
        for (url, headers) in &requests {
            let (status, _, _) = get_backend(&http, url, headers).await;
            assert_eq!(status, 200, "{url}");
        }
        // The app sets its session cookie: tether learns it.
        let learn = lb.url(&format!(
            "/set-cookie?name=connect.sid&value={learned_cookie}"
        ));
        let (status, _, _) = get_backend(&http, &learn, &[(SESSION_HEADER, &header_key)]).await;
        assert_eq!(status, 200);
        let (status, _, _) = get_backend(
            &http,
            &lb.url("/"),
            &[("cookie", &format!("connect.sid={learned_cookie}"))],
        )
        .await;
        assert_eq!(status, 200);
        // Insert: a minted key, then used.
        let (status, _, headers) = get_backend(&http, &lb.url("/"), &[]).await;
        assert_eq!(status, 200);
        let cookie = insert_cookie_of(&headers).expect("minted");
        let (status, _, _) = get_backend(&http, &lb.url("/"), &[("cookie", &cookie)]).await;
        assert_eq!(status, 200);
        insert_keys.push(key_of(&cookie).to_string());
        // Admin lookups of the keys log nothing raw either.
        let reply = lb
            .admin(
                Method::GET,
                &format!(
                    "/api/affinity/{}?source=header:{SESSION_HEADER}",
                    percent_encode(&header_key)
                ),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        // ip
        let (status, _, _) = get_backend(&http, &with_ip.url("/"), &[]).await;
        assert_eq!(status, 200);
    }

    // Every key was pinned (hashed) in Redis.
    assert!(
        eventually(WAIT, || async { redis_pins(&redis).len() >= 8 }).await,
        "{:?}",
        redis_pins(&redis)
    );
    let dump = redis_dump(&redis);
    let logs = format!("{}\n{}", with_insert.log(), with_ip.log());
    assert!(
        logs.contains("DEBUG"),
        "the logs are at debug level:\n{}",
        tail(&logs, 20)
    );
    let mut secrets: Vec<String> = vec![marker.clone()];
    for raw in [&app_cookie, &learned_cookie, &header_key, &query_key] {
        secrets.extend(encoded_forms(raw));
    }
    secrets.extend(insert_keys.iter().cloned());
    secrets.sort();
    secrets.dedup();
    for s in &secrets {
        assert_absent(&logs, s, "tether's debug log");
        assert_absent(&dump, s, "Redis");
    }
    // The ip key: never in Redis; in the log only as the access log's client address (as in
    // every proxy's access log; `access_log = false` turns it off).
    let ip = client_ip.to_string();
    assert_absent(&dump, &ip, "Redis");
    for line in logs.lines().filter(|l| l.contains(&ip)) {
        assert!(
            line.contains("tether::access") && line.matches(&ip).count() == 1,
            "the client address appears outside the access log's client field: {line}"
        );
        assert!(line.contains(&format!("client={ip}")), "{line}");
    }
}

/// A random number from the OS (no `rand` dependency).
fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("OS randomness");
    u32::from_le_bytes(b)
}

/// Pingora logs every retried or failed request with `ProxyHttp::request_summary`, by default
/// `METHOD PATH?QUERY, Host: ...`: a `query:sid` key lands in the log at warn level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_keys_are_not_logged_when_a_backend_fails() {
    let redis = RedisServer::start();
    let (mut a, b, c) = three_backends().await;
    let lb = Balancer::start_with(
        debug_options(&[]),
        &config(
            &[&a, &b, &c],
            Some(&redis),
            "sources = [\"query:sid\"]\npolicy = \"round_robin\"",
        ),
    )
    .await;
    let http = client();
    let marker = format!("KEY-{:08x}", rand_u32());
    // Sessions pinned to a, then a dies: connect failures, retries elsewhere (Pingora logs a
    // warning per retried request).
    let mut on_a = Vec::new();
    for i in 0..12 {
        let sid = format!("{marker}-{i}");
        let (_, id, _) = get_backend(&http, &lb.url(&format!("/p?sid={sid}")), &[]).await;
        if id.as_deref() == Some("a") {
            on_a.push(sid);
        }
    }
    assert!(!on_a.is_empty());
    a.kill_and_wait().await;
    for sid in &on_a {
        let (status, id, _) = get_backend(&http, &lb.url(&format!("/p?sid={sid}")), &[]).await;
        assert_eq!(status, 200);
        assert_ne!(id.as_deref(), Some("a"));
    }
    let log = lb.log();
    assert!(log.contains("connect failed"), "{}", tail(&log, 20));
    assert_absent(&log, &marker, "tether's log");
}
