//! Hostile and broken input never panics tether nor picks a backend it should not.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::scenario::*;
use support::*;
use tether::affinity::{KeyHasher, source_tag};
use tether::config::KeySource;

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
    lb.assert_no_panic();
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

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 exchanges
// ---------------------------------------------------------------------------------------------

/// How long a raw client waits for tether's answer before calling it a hang.
const RAW_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What tether answered to one raw request.
#[derive(Debug)]
struct Reply {
    /// The status, `None` if the connection closed (or timed out) without a response head.
    status: Option<u16>,
    /// The response head (status line and headers), lower-cased.
    head: String,
    /// The read timed out: tether neither answered nor closed within [`RAW_READ_TIMEOUT`].
    hung: bool,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    }

    /// Which backend answered (`x-backend-id`), if the request was routed.
    fn backend(&self) -> Option<&str> {
        self.header("x-backend-id")
    }

    /// tether (or the backend) announced it closes the connection after this response.
    fn closes(&self) -> bool {
        self.header("connection") == Some("close")
    }
}

/// Send `request` on a new connection and read the response head. A write error (tether
/// answered early and closed) is not a failure: the answer is read all the same.
fn exchange(port: u16, request: &[u8]) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to tether");
    s.set_read_timeout(Some(RAW_READ_TIMEOUT)).unwrap();
    let _ = s.write_all(request);
    read_head(&mut s)
}

fn read_head(s: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut hung = false;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                hung = true;
                break;
            }
            Err(_) => break,
        }
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok());
    Reply { status, head, hung }
}

/// `GET target` with extra header lines (each ending in CRLF) and `Connection: close`.
fn get(target: &[u8], headers: &[u8]) -> Vec<u8> {
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\n");
    req.extend_from_slice(headers);
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    req
}

// ---------------------------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------------------------

/// Connections a slow-loris client holds open in each of its three ways.
const SLOW_CONNECTIONS_EACH: usize = 100;
/// How often a dribbling client sends its next byte.
const DRIBBLE_EVERY: Duration = Duration::from_millis(100);

/// A request head that never ends: a dribbling client sends it one byte at a time.
const ENDLESS_HEAD_START: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ";

/// Slow-loris clients hold connections open: some send nothing, some half a request head and
/// then nothing, some a request head one byte at a time. Whatever tether's timeouts, they must
/// not cost anyone else: while they are all open, other clients are served promptly and
/// stickily.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_do_not_starve_other_clients() {
    let redis = RedisServer::start();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let body = config(
        &[&a, &b],
        Some(&redis),
        &format!("sources = [\"header:{SESSION_HEADER}\"]\npolicy = \"round_robin\""),
    );
    let lb = Balancer::start(&body).await;
    let port = lb.proxy_port();

    let connect = || TcpStream::connect(("127.0.0.1", port)).expect("connect to tether");
    let silent: Vec<TcpStream> = (0..SLOW_CONNECTIONS_EACH).map(|_| connect()).collect();
    let half: Vec<TcpStream> = (0..SLOW_CONNECTIONS_EACH)
        .map(|_| {
            let mut s = connect();
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Half: ")
                .expect("send half a head");
            s
        })
        .collect();
    // The dribblers run on their own thread until told to stop; they count bytes sent and
    // connections tether closed on them.
    let stop = Arc::new(AtomicBool::new(false));
    let dribbled = Arc::new(AtomicUsize::new(0));
    let dribblers: Vec<TcpStream> = (0..SLOW_CONNECTIONS_EACH).map(|_| connect()).collect();
    let dribbler = {
        let (stop, dribbled) = (stop.clone(), dribbled.clone());
        std::thread::spawn(move || {
            let mut conns = dribblers;
            let mut sent = 0usize;
            let mut closed = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let byte = ENDLESS_HEAD_START.get(sent).copied().unwrap_or(b'a');
                conns.retain_mut(|c| match c.write_all(&[byte]) {
                    Ok(()) => true,
                    Err(_) => {
                        closed += 1;
                        false
                    }
                });
                sent += 1;
                dribbled.store(sent, Ordering::Relaxed);
                std::thread::sleep(DRIBBLE_EVERY);
            }
            (conns, closed)
        })
    };

    // The dribblers are under way (tether holds part of each head) before the requests start;
    // none is closed until after them (asserted below): they were open while the requests ran,
    // however fast those are.
    assert!(
        eventually(Duration::from_secs(10), || {
            std::future::ready(dribbled.load(Ordering::Relaxed) >= 2)
        })
        .await,
        "the dribblers did not start"
    );
    // Meanwhile: 30 sessions of 10 requests each, 8 at a time, each on a new connection.
    let url = lb.url("/");
    let started = Instant::now();
    let results = for_each_concurrently(300, 8, move |i| {
        let url = url.clone();
        async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client");
            let session = format!("user-{}", i % 30);
            let t = Instant::now();
            let (status, backend, _) =
                try_get_backend(&http, &url, &[(SESSION_HEADER, session.as_str())])
                    .await
                    .unwrap_or_else(|e| panic!("request {i} failed under slow-loris: {e}"));
            (session, status, backend, t.elapsed())
        }
    })
    .await;
    let took = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    let (still_dribbling, closed) = dribbler.join().expect("dribbler thread");
    let slowest = results.iter().map(|r| r.3).max().unwrap_or_default();
    let mut sessions: BTreeMap<String, BTreeSet<Option<String>>> = BTreeMap::new();
    for (session, status, backend, _) in &results {
        assert_eq!(*status, 200, "session {session}: status {status}");
        sessions
            .entry(session.clone())
            .or_default()
            .insert(backend.clone());
    }
    for (session, backends) in &sessions {
        assert_eq!(backends.len(), 1, "session {session} moved: {backends:?}");
    }
    // Debug build, 2 worker threads: a request takes a few ms (more on a busy machine); a
    // request stuck behind the slow connections would wait for their 60 s timeout.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest request took {slowest:?} with {} slow connections open (all 300 took {took:?})",
        3 * SLOW_CONNECTIONS_EACH
    );
    // Well within Pingora's 60 s: none of the slow connections was cut yet, so they were all
    // open while the others were served.
    assert_eq!(closed, 0, "dribbling connections closed early");
    drop((silent, half, still_dribbling));
    lb.assert_no_panic();
}

/// Reads from `s` until tether closes it (EOF or reset); returns how long that took, or `None`
/// if it was still open after `limit`. Bytes tether sends (a response) are read and dropped.
fn closed_within(mut s: TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// `[server]` lines that make the client timeouts short enough to observe.
const SHORT_CLIENT_TIMEOUTS: &str = "keepalive_timeout_secs = 1\nclient_header_timeout_ms = 1500\n";
/// Generous slack over those timeouts for a loaded CI machine.
const SHORT_LIMIT: Duration = Duration::from_secs(6);

fn with_short_client_timeouts() -> BalancerOptions {
    BalancerOptions {
        server_extra: SHORT_CLIENT_TIMEOUTS.into(),
        ..BalancerOptions::default()
    }
}

/// A connection that sends nothing, or half a request head and then nothing, is closed once
/// `client_header_timeout_ms` has passed (NGINX `client_header_timeout`, HAProxy
/// `timeout http-request`).
#[test]
fn silent_and_half_sent_connections_are_closed_at_the_header_timeout() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let a = rt.block_on(Backend::start("a"));
    let lb = rt.block_on(Balancer::start_with(
        with_short_client_timeouts(),
        &config(&[&a], None, "sources = [\"ip\"]"),
    ));
    let port = lb.proxy_port();
    let silent = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut half = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    half.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    let t = std::thread::spawn(move || closed_within(silent, SHORT_LIMIT));
    let half_closed = closed_within(half, SHORT_LIMIT);
    let silent_closed = t.join().expect("thread");
    assert!(
        silent_closed.is_some(),
        "silent connection open after {SHORT_LIMIT:?}"
    );
    assert!(
        half_closed.is_some(),
        "half-sent head open after {SHORT_LIMIT:?}"
    );
    lb.assert_no_panic();
}

/// An idle keep-alive connection is closed after `keepalive_timeout_secs`, and a request head
/// dribbled one byte at a time (each read well under any per-read timeout) is cut at
/// `client_header_timeout_ms`: Pingora alone bounds neither (its HTTP/1.1 keep-alive is
/// infinite, and its 60 s applies to each read, not to the head); tether's front reads every
/// head and bounds both (src/engine.rs).
#[test]
fn idle_keep_alive_and_dribbled_heads_are_closed_within_a_bounded_time() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let a = rt.block_on(Backend::start("a"));
    let lb = rt.block_on(Balancer::start_with(
        with_short_client_timeouts(),
        &config(&[&a], None, "sources = [\"ip\"]"),
    ));
    let port = lb.proxy_port();

    // One complete keep-alive request, its answer read, then silence.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    idle.set_read_timeout(Some(RAW_READ_TIMEOUT)).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let first = read_head(&mut idle);
    assert_eq!(first.status, Some(200), "{first:?}");
    let idle_t = std::thread::spawn(move || closed_within(idle, SHORT_LIMIT));

    // A head that never ends, one byte every 100 ms.
    let dribble = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut writer = dribble.try_clone().expect("clone");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let feeder = std::thread::spawn(move || {
        let mut i = 0;
        while !stop2.load(Ordering::Relaxed) {
            let byte = ENDLESS_HEAD_START.get(i).copied().unwrap_or(b'a');
            if writer.write_all(&[byte]).is_err() {
                break;
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let dribble_closed = closed_within(dribble, SHORT_LIMIT);
    stop.store(true, Ordering::Relaxed);
    let idle_closed = idle_t.join().expect("thread");
    feeder.join().expect("feeder");
    lb.assert_no_panic();
    assert!(
        idle_closed.is_some() && dribble_closed.is_some(),
        "still open after {SHORT_LIMIT:?}: idle keep-alive connection: {}, dribbled head: {}",
        idle_closed.is_none(),
        dribble_closed.is_none()
    );
}

// ---------------------------------------------------------------------------------------------
// Oversized and ill-framed requests
// ---------------------------------------------------------------------------------------------

/// tether's own error answers come from Pingora's error path, which names itself; a backend's
/// answer carries `x-backend-id` (or, for what hyper refuses itself, neither).
/// tether's own error answer (src/http.rs `ErrorAnswer`): no backend named, no `server` token,
/// a short text body.
fn answered_by_tether(r: &Reply) -> bool {
    r.header("server").is_none()
        && r.backend().is_none()
        && r.header("content-type") == Some("text/plain; charset=utf-8")
}

/// `n` distinct header lines.
fn header_lines(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("X-H{i}: v\r\n").into_bytes())
        .collect()
}

/// What tether does with request lines and heads beyond its limits: like NGINX and HAProxy, a
/// target plus headers over `[server] max_request_header_bytes` (64 KiB by default) gets 414
/// (mostly target) or 431 (mostly headers) from tether, before anything is routed. Beyond
/// Pingora's own parser limits the answer is Pingora's 400, a clear 4xx as well:
/// - request target: `http::Uri` takes at most 65,534 bytes (http 1.x `uri/mod.rs` MAX_LEN);
/// - head: 1,048,575 bytes (pingora-core `protocols/http/v1/common.rs` MAX_HEADER_SIZE);
/// - header lines: 256 (same file, MAX_HEADERS, httparse `TooManyHeaders`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_lines_and_heads_get_414_431_or_400() {
    let a = Backend::start("a").await;
    let body = config(&[&a], None, "sources = [\"cookie:sid\", \"ip\"]");
    let lb = Balancer::start(&body).await;
    let port = lb.proxy_port();
    let send = |req: Vec<u8>| {
        a.clear();
        let reply = tokio::task::block_in_place(|| exchange(port, &req));
        (reply, a.requests())
    };

    // Within the limit, routed.
    let (r, seen) = send(get(format!("/{}", "z".repeat(30_000)).as_bytes(), b""));
    assert_eq!(
        (r.status, r.backend(), seen),
        (Some(200), Some("a"), 1),
        "{r:?}"
    );
    let cookie = format!("Cookie: sid={}\r\n", "c".repeat(30_000));
    let (r, seen) = send(get(b"/", cookie.as_bytes()));
    assert_eq!(
        (r.status, r.backend(), seen),
        (Some(200), Some("a"), 1),
        "{r:?}"
    );
    let (r, seen) = send(get(b"/", &header_lines(90)));
    assert_eq!((r.status, seen), (Some(200), 1), "{r:?}");

    // Over tether's 64 KiB: 414 for a long target, 431 for big headers; nothing reaches a.
    let (r, seen) = send(get(format!("/{}", "z".repeat(65_533)).as_bytes(), b""));
    assert_eq!((r.status, seen), (Some(414), 0), "{r:?}");
    assert!(answered_by_tether(&r), "{r:?}");
    let cookie = format!("Cookie: sid={}\r\n", "c".repeat(500_000));
    let (r, seen) = send(get(b"/", cookie.as_bytes()));
    assert_eq!((r.status, seen), (Some(431), 0), "{r:?}");
    assert!(answered_by_tether(&r), "{r:?}");
    // More header lines than [server] max_request_headers (100, HAProxy's 101): 431.
    let (r, seen) = send(get(b"/", &header_lines(100)));
    assert_eq!((r.status, seen), (Some(431), 0), "{r:?}");
    assert!(answered_by_tether(&r), "{r:?}");

    // Far beyond: the same answers, as soon as the limit is passed, and the connection closed.
    let (r, seen) = send(get(format!("/{}", "z".repeat(65_534)).as_bytes(), b""));
    assert_eq!(r.status, Some(414), "65,535-byte target: {r:?}");
    assert!(answered_by_tether(&r) && r.closes() && seen == 0, "{r:?}");
    let cookie = format!("Cookie: sid={}\r\n", "c".repeat(1 << 20));
    let (r, seen) = send(get(b"/", cookie.as_bytes()));
    assert_eq!(r.status, Some(431), "1 MiB cookie: {r:?}");
    assert!(answered_by_tether(&r) && r.closes() && seen == 0, "{r:?}");
    let (r, seen) = send(get(b"/", &header_lines(255)));
    assert_eq!(r.status, Some(431), "257 header lines: {r:?}");
    assert!(answered_by_tether(&r) && seen == 0, "{r:?}");

    // Still serving.
    let (r, _) = send(get(b"/", b""));
    assert_eq!(r.status, Some(200));
    lb.assert_no_panic();
}

/// `POST /` with these header lines and body bytes (no `Connection: close`: tether decides).
fn post(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!("POST / HTTP/1.1\r\nHost: t\r\n{headers}\r\n").into_bytes();
    req.extend_from_slice(body);
    req
}

/// Content-Length and Transfer-Encoding that cannot frame a body are refused with 400 before
/// anything is routed (pingora-core `protocols/http/v1/common.rs`, `validate_content_length`
/// and `buf_to_content_length`; `server.rs` `validate_request` for Transfer-Encoding).
/// Those that can reach the backend as one sane framing, and nothing hangs: a body that never
/// comes is bounded by the backend answering, and the connection is closed after the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_content_lengths_get_400_or_reach_the_backend_sane() {
    let a = Backend::start("a").await;
    let body = config(&[&a], None, "sources = [\"ip\"]") + "\n[upstream]\nread_timeout_ms = 2000\n";
    let lb = Balancer::start(&body).await;
    let port = lb.proxy_port();
    let send = |req: Vec<u8>| {
        a.clear();
        let started = Instant::now();
        let reply = tokio::task::block_in_place(|| exchange(port, &req));
        (reply, a.recorded(), started.elapsed())
    };

    // Refused by tether itself, nothing sent to the backend.
    let refused = [
        "Content-Length: 99999999999999999999\r\n", // beyond u64
        "Content-Length: 18446744073709551615\r\n", // more than 18 digits (NGINX: off_t)
        "Content-Length: -1\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: 1e3\r\n",
        "Content-Length: 0x10\r\n",
        "Content-Length: \r\n",
        "Content-Length: 3\r\nContent-Length: 4\r\n",
        "Content-Length: 3, 4\r\n",
        "Content-Length: 4\r\nContent-Length: 4\r\n",
        "Content-Length: 4, 4\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ];
    for headers in refused {
        let (r, seen, _) = send(post(headers, b"abcd"));
        assert_eq!(r.status, Some(400), "{headers:?}: {r:?}");
        assert!(answered_by_tether(&r) && r.closes(), "{headers:?}: {r:?}");
        assert!(seen.is_empty(), "{headers:?} reached the backend");
    }
    // A transfer coding other than chunked alone: 501, as NGINX answers.
    for headers in [
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: chunked, gzip\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked,\r\n",
    ] {
        let (r, seen, _) = send(post(headers, b"abcd"));
        assert_eq!(r.status, Some(501), "{headers:?}: {r:?}");
        assert!(answered_by_tether(&r) && r.closes(), "{headers:?}: {r:?}");
        assert!(seen.is_empty(), "{headers:?} reached the backend");
    }
    let (r, seen, _) = send(
        b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            .to_vec(),
    );
    assert_eq!(r.status, Some(400), "chunked HTTP/1.0: {r:?}");
    assert!(answered_by_tether(&r) && seen.is_empty(), "{r:?}");

    let content_lengths = |seen: &[support::RecordedRequest]| -> Vec<String> {
        seen.iter()
            .flat_map(|r| r.headers.get_all("content-length"))
            .map(|v| v.to_str().unwrap_or("?").to_string())
            .collect()
    };

    // Identical comma-joined values, or identical lines (RFC 9110 8.6 lets a recipient take
    // them as one, a proxy forward one value only): tether refuses both, as NGINX does.
    for headers in [
        "Content-Length: 3, 3\r\n",
        "Content-Length: 3\r\nContent-Length: 3\r\n",
    ] {
        let (r, seen, _) = send(post(headers, b"abc"));
        assert_eq!(r.status, Some(400), "{headers:?}: {r:?}");
        assert!(answered_by_tether(&r) && seen.is_empty(), "{r:?}");
    }

    // Whitespace around the value: one clean value goes on.
    for headers in ["Content-Length:  3 \r\n", "Content-Length:\t3\r\n"] {
        let (r, seen, _) = send(post(headers, b"abc"));
        assert_eq!(
            (r.status, r.backend()),
            (Some(200), Some("a")),
            "{headers:?}: {r:?}"
        );
        assert_eq!(content_lengths(&seen), ["3"], "{headers:?}");
    }

    // Content-Length with Transfer-Encoding (a smuggling classic): refused, as NGINX does.
    let (r, seen, _) = send(post(
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
    ));
    assert_eq!(r.status, Some(400), "{r:?}");
    assert!(
        answered_by_tether(&r) && r.closes() && seen.is_empty(),
        "{r:?}"
    );

    // Huge but well-formed lengths, with 3 bytes of body that never complete: forwarded as
    // they are; whatever the backend answers arrives at once, then tether closes.
    for (cl, backend_status) in [("1000000000000", 200), ("999999999999999999", 200)] {
        let (r, seen, took) = send(post(&format!("Content-Length: {cl}\r\n"), b"abc"));
        assert!(
            !r.hung && took < Duration::from_secs(5),
            "{cl}: hung {took:?}"
        );
        assert_eq!(r.status, Some(backend_status), "{cl}: {r:?}");
        assert!(
            r.closes(),
            "{cl}: connection kept alive with a body unread: {r:?}"
        );
        assert!(
            seen.is_empty() || content_lengths(&seen) == [cl],
            "{cl}: {:?}",
            content_lengths(&seen)
        );
    }

    // A chunk size that is not hex, or beyond u64: tether's 400 once it reads the body (the
    // head has already gone to the backend).
    for chunks in [&b"zz\r\nabc\r\n0\r\n\r\n"[..], b"ffffffffffffffffff\r\nabc"] {
        let (r, _, took) = send(post("Transfer-Encoding: chunked\r\n", chunks));
        assert!(!r.hung && took < Duration::from_secs(5), "hung {took:?}");
        assert_eq!(r.status, Some(400), "{r:?}");
        assert!(answered_by_tether(&r) && r.closes(), "{r:?}");
    }

    let (r, _, _) = send(get(b"/", b""));
    assert_eq!(r.status, Some(200));
    lb.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// Hostile keys
// ---------------------------------------------------------------------------------------------

/// (what, request target, header lines, the key tether must derive, from which source)
type KeyCase<'a> = (&'a str, &'a [u8], &'a [u8], &'a [u8], &'a KeySource);

/// Keys full of Redis glob characters, control-ish and non-UTF-8 bytes, duplicated cookies and
/// percent-encoded junk in the query: each usable key sticks to one backend (round-robin would
/// alternate otherwise), and Redis holds exactly one pin per distinct key, named by its hash:
/// no key is used raw, so `*` or `[a-z]` cannot match another session's pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_stick_and_never_match_each_other() {
    let redis = RedisServer::start();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let body = config(
        &[&a, &b],
        Some(&redis),
        "sources = [\"cookie:sid\", \"query:sid\"]\npolicy = \"round_robin\"\nmax_key_bytes = 64",
    );
    let lb = Balancer::start(&body).await;
    let port = lb.proxy_port();
    let cookie_src = KeySource::Cookie("sid".into());
    let query_src = KeySource::Query("sid".into());

    let cases: Vec<KeyCase> = vec![
        ("star", b"/", b"Cookie: sid=*\r\n", b"*", &cookie_src),
        (
            "question mark",
            b"/",
            b"Cookie: sid=?\r\n",
            b"?",
            &cookie_src,
        ),
        (
            "class",
            b"/",
            b"Cookie: sid=[a-z]\r\n",
            b"[a-z]",
            &cookie_src,
        ),
        (
            "negated class",
            b"/",
            b"Cookie: sid=[^x]*\r\n",
            b"[^x]*",
            &cookie_src,
        ),
        (
            "escaped star",
            b"/",
            b"Cookie: sid=\\*\r\n",
            b"\\*",
            &cookie_src,
        ),
        (
            "a command",
            b"/",
            b"Cookie: sid=KEYS *\r\n",
            b"KEYS *",
            &cookie_src,
        ),
        (
            "our own prefix",
            b"/",
            b"Cookie: sid=tether:pin:*\r\n",
            b"tether:pin:*",
            &cookie_src,
        ),
        (
            "cluster hash tag",
            b"/",
            b"Cookie: sid={tag}x\r\n",
            b"{tag}x",
            &cookie_src,
        ),
        (
            "tab inside",
            b"/",
            b"Cookie: sid=a\tb\r\n",
            b"a\tb",
            &cookie_src,
        ),
        (
            "not UTF-8",
            b"/",
            b"Cookie: sid=\xff\xfe\x80\r\n",
            b"\xff\xfe\x80",
            &cookie_src,
        ),
        (
            "quoted",
            b"/",
            b"Cookie: sid=\"quoted\"\r\n",
            b"quoted",
            &cookie_src,
        ),
        (
            "duplicates: first non-empty wins",
            b"/",
            b"Cookie: sid=; sid=one; sid=two\r\nCookie: sid=three\r\n",
            b"one",
            &cookie_src,
        ),
        (
            "the same, plainly",
            b"/",
            b"Cookie: sid=one\r\n",
            b"one",
            &cookie_src,
        ),
        (
            "query: encoded junk",
            b"/x?sid=%ff%fe%00",
            b"",
            b"\xff\xfe\x00",
            &query_src,
        ),
        (
            "query: encoded glob",
            b"/x?sid=%2A%3F",
            b"",
            b"*?",
            &query_src,
        ),
        ("query: raw glob", b"/x?sid=*?", b"", b"*?", &query_src),
        (
            "query: raw brackets",
            b"/x?sid=[a]",
            b"",
            b"[a]",
            &query_src,
        ),
        (
            "query: encoded UTF-8",
            b"/x?sid=%E2%82%AC",
            b"",
            "€".as_bytes(),
            &query_src,
        ),
        (
            "query: encoded space",
            b"/x?sid=a%20b",
            b"",
            b"a b",
            &query_src,
        ),
    ];
    let hasher = KeyHasher::new(TEST_HASH_KEY.as_bytes());
    let mut expected_pins = BTreeSet::new();
    let mut backend_of_key: BTreeMap<String, String> = BTreeMap::new();
    for (what, target, headers, key, source) in &cases {
        let mut backends = BTreeSet::new();
        for _ in 0..6 {
            let r = tokio::task::block_in_place(|| exchange(port, &get(target, headers)));
            assert_eq!(r.status, Some(200), "{what}: {r:?}");
            backends.insert(r.backend().unwrap_or("-").to_string());
        }
        assert_eq!(backends.len(), 1, "{what}: not sticky: {backends:?}");
        let pin = format!("tether:pin:{}", hasher.hash(&source_tag(source), key));
        // Two spellings of one key land on one backend.
        let backend = backends.into_iter().next().unwrap();
        if let Some(previous) = backend_of_key.insert(pin.clone(), backend.clone()) {
            assert_eq!(previous, backend, "{what}: same key, another backend");
        }
        expected_pins.insert(pin);
    }
    let pins: BTreeSet<String> = redis_pins(&redis).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        pins, expected_pins,
        "Redis pins are not one per distinct key"
    );
    lb.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// Requests with junk heads the memory test sends, and how many at a time.
const JUNK_REQUESTS: usize = 2_000;
const JUNK_CLIENTS: usize = 16;
/// Junk sizes, cycled: 100 KB to just over Pingora's 1 MiB head limit (refused with 400).
const JUNK_SIZES: [usize; 5] = [100_000, 250_000, 500_000, 750_000, 1_100_000];
/// Allowed RSS growth once the junk connections are closed. Every request carries at least
/// 100 KB of junk: keeping any of it per request would grow tether by 200 MB or more, while
/// the allocator keeping some freed memory around (per-thread arenas) stays well under this.
const RSS_GROWTH_LIMIT: u64 = 64 << 20;

/// Request `i` of the junk flood: junk in a cookie (too long to be a key), in another header,
/// or both, on a new connection.
fn junk_request(i: usize) -> Vec<u8> {
    let size = JUNK_SIZES[i % JUNK_SIZES.len()];
    let junk = "j".repeat(size);
    let headers = match i % 3 {
        0 => format!("Cookie: sid={junk}\r\n"),
        1 => format!("X-Junk: {junk}\r\n{SESSION_HEADER}: mem-{}\r\n", i % 50),
        _ => format!(
            "Cookie: a=b; sid={}; c={}\r\nX-Junk: {}\r\n",
            &junk[..size / 3],
            &junk[..size / 3],
            &junk[..size / 3]
        ),
    };
    get(b"/", headers.as_bytes())
}

/// 2,000 requests with 100 KB to 1 MB of junk in their heads, 16 connections at a time: every
/// one gets an answer (the backend's, or 400 beyond 1 MiB), and once they are closed tether's
/// resident memory is back within [`RSS_GROWTH_LIMIT`] of where it was after a warm-up that
/// made every kind of request once per client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_heads_leave_memory_bounded() {
    let redis = RedisServer::start();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let body = config(
        &[&a, &b],
        Some(&redis),
        &format!("sources = [\"cookie:sid\", \"header:{SESSION_HEADER}\"]"),
    );
    let lb = Balancer::start(&body).await;
    let (port, pid) = (lb.proxy_port(), lb.pid());
    let start_rss = rss_bytes(pid);

    // One round of every request shape per client: the allocator reaches its working size.
    let flood = |range: std::ops::Range<usize>| -> BTreeMap<Option<u16>, usize> {
        let next = AtomicUsize::new(range.start);
        let statuses = std::sync::Mutex::new(BTreeMap::new());
        std::thread::scope(|scope| {
            for _ in 0..JUNK_CLIENTS {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= range.end {
                            break;
                        }
                        let r = exchange(port, &junk_request(i));
                        assert!(!r.hung, "request {i} hung");
                        *statuses.lock().unwrap().entry(r.status).or_default() += 1;
                        // The test backends record every request: keep their memory (not
                        // tether's) small.
                        if i.is_multiple_of(64) {
                            a.clear();
                            b.clear();
                        }
                    }
                });
            }
        });
        statuses.into_inner().unwrap()
    };
    let warm = JUNK_CLIENTS * JUNK_SIZES.len() * 3;
    tokio::task::block_in_place(|| flood(0..warm));
    let warm_rss = rss_bytes(pid);

    let started = Instant::now();
    let statuses = tokio::task::block_in_place(|| flood(warm..warm + JUNK_REQUESTS));
    let took = started.elapsed();
    // Every request answered: 200 from a backend, or 400 (over 1 MiB).
    let answered: usize = statuses
        .iter()
        .filter(|(s, _)| matches!(s, Some(200) | Some(400) | Some(431)))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(answered, JUNK_REQUESTS, "statuses: {statuses:?}");

    // Closed connections free their buffers at once; allow tether a moment to drop its tasks.
    let mut end_rss = rss_bytes(pid);
    let settled = eventually(Duration::from_secs(5), || {
        end_rss = rss_bytes(pid);
        std::future::ready(end_rss < warm_rss + RSS_GROWTH_LIMIT)
    })
    .await;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    assert!(
        settled,
        "tether's RSS grew from {:.1} MiB (after warm-up; {:.1} at start) to {:.1} MiB after \
         {JUNK_REQUESTS} junk requests ({took:?}); limit +{:.0} MiB",
        mib(warm_rss),
        mib(start_rss),
        mib(end_rss),
        mib(RSS_GROWTH_LIMIT)
    );
    eprintln!(
        "RSS: start {:.1} MiB, after warm-up {:.1} MiB, after {JUNK_REQUESTS} junk requests \
         {:.1} MiB ({took:?}, {statuses:?})",
        mib(start_rss),
        mib(warm_rss),
        mib(end_rss)
    );

    // Still serving, sticky.
    let http = client();
    let (status, first, _) = get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, "after")]).await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        let again = get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, "after")]).await;
        assert_eq!(again.1, first);
    }
    lb.assert_no_panic();
}
