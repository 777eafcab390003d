//! Hostile and broken input never panics tether nor picks a backend it should not.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::scenario::*;
use support::*;

/// Send raw bytes as one request on a new connection; return the status line tether answered
/// (empty if it closed the connection without one).
fn raw_request(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to tether");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A large request may be cut off by tether answering early: that is an answer too.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// (what, request target, extra header lines, acceptable statuses)
type Case<'a> = (&'a str, &'a [u8], Vec<u8>, &'a [u16]);

fn status_of(line: &str) -> Option<u16> {
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_forged_keys_are_routed_sanely() {
    let redis = RedisServer::start();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let body = config(
        &[&a, &b],
        Some(&redis),
        "sources = [\"cookie:sid\", \"insert\"]\npolicy = \"round_robin\"\nmax_key_bytes = 64",
    ) + &format!("\n[affinity.insert]\nsecrets = [\"{TEST_INSERT_SECRET}\"]\n");
    let lb = Balancer::start(&body).await;
    let port = lb.proxy_port();

    let long = "x".repeat(65);
    let huge = "y".repeat(60_000);
    let ok: &[u16] = &[200];
    let ok_or_4xx: &[u16] = &[200, 400, 413, 414, 431];
    let cases: Vec<Case> = vec![
        (
            "empty and broken pairs",
            b"/",
            b"Cookie: ;;;==;=;sid;sid=\r\n".to_vec(),
            ok,
        ),
        (
            "non-UTF-8 value",
            b"/",
            b"Cookie: sid=\xff\xfe\x80abc\r\n".to_vec(),
            ok,
        ),
        (
            "redis glob characters",
            b"/",
            b"Cookie: sid=*?[a-z]\\ KEYS *\r\n".to_vec(),
            ok,
        ),
        (
            "duplicate cookies and headers",
            b"/",
            b"Cookie: sid=one; sid=two\r\nCookie: sid=three\r\n".to_vec(),
            ok,
        ),
        (
            "over max_key_bytes",
            b"/",
            format!("Cookie: sid={long}\r\n").into_bytes(),
            ok,
        ),
        (
            "forged insert cookie",
            b"/",
            b"Cookie: tether=AAAAAAAAAAAAAAAAAAAAAA.a.AAAAAAAAAAAAAAAAAAAAAA\r\n".to_vec(),
            ok,
        ),
        (
            "garbage insert cookie",
            b"/",
            b"Cookie: tether=....\xff\r\n".to_vec(),
            ok,
        ),
        (
            "percent-encoded junk in the query",
            b"/x?sid=%ff%00&q=%zz",
            Vec::new(),
            ok,
        ),
        // Not HTTP: a clear 400 from the parser, before any routing.
        (
            "control characters in a header",
            b"/",
            b"Cookie: sid=a\x01\x02b\r\n".to_vec(),
            &[400],
        ),
        (
            "raw invalid UTF-8 in the query",
            b"/x?q=\xff\xfe",
            Vec::new(),
            &[400],
        ),
        (
            "60 KB cookie",
            b"/",
            format!("Cookie: sid={huge}\r\n").into_bytes(),
            ok_or_4xx,
        ),
    ];
    for (name, target, header, expected) in &cases {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\n");
        req.extend_from_slice(header);
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        let line = raw_request(port, &req);
        let status = status_of(&line).unwrap_or(0);
        assert!(
            expected.contains(&status),
            "{name}: tether answered {line:?}, expected one of {expected:?}\n{}",
            tail(&lb.log(), 40)
        );
    }

    // A request line and headers far beyond any sane size.
    let monster = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "z".repeat(1 << 20));
    let line = raw_request(port, monster.as_bytes());
    assert!(
        line.is_empty() || matches!(status_of(&line), Some(400..=499)),
        "1 MB request line: {line:?}"
    );

    // Still alive and still sticky after all that.
    let http = client();
    let (status, first, _) = get_backend(&http, &lb.url("/"), &[("cookie", "sid=fine")]).await;
    assert_eq!(status, 200);
    for _ in 0..5 {
        assert_eq!(
            get_backend(&http, &lb.url("/"), &[("cookie", "sid=fine")])
                .await
                .1,
            first
        );
    }
    let log = lb.log();
    assert!(!log.contains("panicked"), "tether panicked:\n{log}");
    let m = lb.metrics().await;
    assert!(
        metric_value(&m, "tether_invalid_keys_total{reason=\"too_long\"}").unwrap_or(0.0) >= 1.0
    );
    assert!(
        metric_value(&m, "tether_invalid_keys_total{reason=\"bad_signature\"}").unwrap_or(0.0)
            >= 2.0
    );
    // No raw key reached Redis: every key is a 32-hex hash.
    for (k, v) in redis_pins(&redis) {
        let hex = k.strip_prefix("tether:pin:").unwrap();
        assert!(
            hex.len() == 32 && hex.bytes().all(|c| c.is_ascii_hexdigit()),
            "{k}"
        );
        assert!(v == "v1:a" || v == "v1:b", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_never_reach_the_log_or_redis() {
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    let body = config(&[&a], Some(&redis), "sources = [\"cookie:connect.sid\"]");
    let mut lb = Balancer::start(&body).await;
    let http = client();
    let secret = "s%3AVerySecretSessionId.signature";
    get_backend(
        &http,
        &lb.url(&format!("/set-cookie?name=connect.sid&value={secret}")),
        &[],
    )
    .await;
    for _ in 0..3 {
        get_backend(
            &http,
            &lb.url("/"),
            &[("cookie", &format!("connect.sid={secret}"))],
        )
        .await;
    }
    lb.stop().await;
    let log = lb.log();
    assert!(
        !log.contains("VerySecretSessionId"),
        "raw session id in the log:\n{log}"
    );
    for (k, v) in redis_pins(&redis) {
        assert!(!k.contains("VerySecret") && !v.contains("VerySecret"));
    }
}
