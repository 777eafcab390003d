//! Active health checks: a failing backend is taken out and put back, a silent one is taken out
//! by the timeout, no checks without `[health]`, and reloads turn checks on and off.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::scenario::*;
use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How long a backend may take to change state: a few check intervals, with room for slow CI.
const STATE_CHANGE: Duration = Duration::from_secs(10);

/// Checks every 100 ms with a 100 ms timeout; two in a row to go down or come back.
const FAST_HEALTH: &str =
    "\n[health]\npath = \"/healthz\"\ninterval_ms = 100\ntimeout_ms = 100\nrise = 2\nfall = 2\n";

/// Header-keyed sessions, assigned round-robin.
const ROUND_ROBIN_SESSIONS: &str = "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"";

/// GET every session `{prefix}-{i}` once through tether; returns the backend of each, by index.
/// Panics on a non-200: no request may fail.
async fn sweep(lb: &Balancer, prefix: &str, sessions: usize) -> Vec<String> {
    let url = Arc::new(lb.url("/"));
    let prefix = Arc::new(prefix.to_string());
    let http = client();
    for_each_concurrently(sessions, 8, move |i| {
        let (url, prefix, http) = (url.clone(), prefix.clone(), http.clone());
        async move {
            let sid = format!("{prefix}-{i}");
            let (status, id, _) = get_backend(&http, &url, &[(SESSION_HEADER, &sid)]).await;
            assert_eq!(status, 200, "{sid}");
            id.unwrap_or_else(|| panic!("{sid}: no x-backend-id"))
        }
    })
    .await
}

/// `tether_backend_up{backend=id}` as scraped now.
async fn backend_up(lb: &Balancer, id: &str) -> Option<f64> {
    lb.metric(&format!("tether_backend_up{{backend=\"{id}\"}}"))
        .await
}

/// The `health` field of backend `id` in `GET /api/backends`.
async fn api_health(lb: &Balancer, id: &str) -> String {
    let url = lb.admin_url("/api/backends");
    let body = client()
        .get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("reading {url}: {e}"));
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"));
    v["backends"]
        .as_array()
        .and_then(|list| list.iter().find(|b| b["id"] == id))
        .and_then(|b| b["health"].as_str())
        .unwrap_or_else(|| panic!("no health for backend {id} in {body}"))
        .to_string()
}

/// Drive keyless requests through tether until `at_least` have been sent and `for_at_least` has
/// passed: the test's clock is real traffic, not a sleep.
async fn drive(lb: &Balancer, at_least: usize, for_at_least: Duration) -> usize {
    let http = client();
    let started = Instant::now();
    let mut sent = 0;
    while sent < at_least || started.elapsed() < for_at_least {
        let (status, _, _) = get_backend(&http, &lb.url("/"), &[]).await;
        assert_eq!(status, 200);
        sent += 1;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_taken_out_and_put_back() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(&[&a, &b, &c], Some(&redis), ROUND_ROBIN_SESSIONS) + FAST_HEALTH;
    let lb = Balancer::start(&body).await;

    // Checks reach every backend; sessions are spread over all three.
    assert_eventually!(
        STATE_CHANGE,
        [&a, &b, &c].iter().all(|x| x.health_checks() >= 2)
    );
    let before = sweep(&lb, "s", 30).await;
    let on_b = before.iter().filter(|id| *id == "b").count();
    assert_eq!(on_b, 10, "round robin over three: {before:?}");

    // b fails its checks (its other routes still answer): it goes down.
    b.set_healthy(false);
    assert_eventually!(
        STATE_CHANGE,
        backend_up(&lb, "b").await == Some(0.0),
        "log:\n{}",
        tail(&lb.log(), 30)
    );
    assert_eq!(api_health(&lb, "b").await, "down");
    assert_eq!(api_health(&lb, "a").await, "up");
    assert!(
        lb.log()
            .lines()
            .any(|l| l.contains("backend down") && l.contains("status 503")),
        "no `backend down` line with the reason:\n{}",
        tail(&lb.log(), 30)
    );

    // New sessions never land on b.
    let fresh = sweep(&lb, "n", 30).await;
    assert!(!fresh.iter().any(|id| id == "b"), "{fresh:?}");

    // b's sessions move (reason down), the others stay; nothing fails.
    let after = sweep(&lb, "s", 30).await;
    for (i, (x, y)) in before.iter().zip(&after).enumerate() {
        if x == "b" {
            assert_ne!(y, "b", "s-{i} still on the down backend");
            assert_eq!(
                redis_get(&redis, &header_pin_key(&format!("s-{i}"))),
                Some(format!("v1:{y}")),
                "s-{i}: the new pin is stored"
            );
        } else {
            assert_eq!(x, y, "s-{i} moved although its backend is up");
        }
    }
    let m = lb.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_reassignments_total{reason=\"down\"}"),
        Some(on_b as f64),
        "each of b's sessions moved once, for `down`:\n{m}"
    );
    assert_eq!(
        metric_sum(&m, "tether_requests_total", &[("class", "5xx")]),
        0.0,
        "no failed request:\n{m}"
    );
    assert!(
        metric_value(
            &m,
            "tether_health_checks_total{backend=\"b\",result=\"failed\"}"
        ) >= Some(2.0)
    );
    assert!(
        metric_value(
            &m,
            "tether_health_checks_total{backend=\"a\",result=\"ok\"}"
        ) >= Some(2.0)
    );

    // b recovers: up again, and new sessions reach it; moved sessions stay where they moved.
    b.set_healthy(true);
    assert_eventually!(STATE_CHANGE, backend_up(&lb, "b").await == Some(1.0));
    assert_eq!(api_health(&lb, "b").await, "up");
    assert!(
        lb.log().contains("backend up again"),
        "{}",
        tail(&lb.log(), 30)
    );
    let later = sweep(&lb, "r", 30).await;
    assert!(later.iter().any(|id| id == "b"), "{later:?}");
    assert_eq!(
        sweep(&lb, "s", 30).await,
        after,
        "moved sessions stay moved"
    );
}

/// A backend that accepts connections and never answers: it records the request line of each
/// connection and holds the socket open.
struct Silent {
    addr: std::net::SocketAddr,
    request_lines: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Silent {
    async fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let request_lines = Arc::new(Mutex::new(Vec::new()));
        let lines = request_lines.clone();
        let task = tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                let lines = lines.clone();
                held.spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
                            let line = String::from_utf8_lossy(&head[..end]).into_owned();
                            lines.lock().unwrap().push(line);
                            break;
                        }
                    }
                    // Never answer; hold the socket until the client gives up.
                    while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        Silent {
            addr,
            request_lines,
            task,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.request_lines.lock().unwrap().clone()
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_backend_is_taken_out_by_the_timeout() {
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let silent = Silent::start().await;
    let body = config(&[&a, &b], Some(&redis), ROUND_ROBIN_SESSIONS)
        + &format!("[[backend]]\nid = \"s\"\naddress = \"{}\"\n", silent.addr)
        + FAST_HEALTH;
    let lb = Balancer::start(&body).await;

    // No traffic until s is down: checks alone find it out.
    assert_eventually!(
        STATE_CHANGE,
        backend_up(&lb, "s").await == Some(0.0),
        "log:\n{}",
        tail(&lb.log(), 30)
    );
    assert_eq!(api_health(&lb, "s").await, "down");
    assert!(
        lb.log().lines().any(|l| l.contains("backend down")
            && l.contains("timeout")
            && l.contains("backend=s")),
        "no `backend down` line with a timeout for s:\n{}",
        tail(&lb.log(), 30)
    );

    // Sessions go to a and b only, none fails, and s never sees anything but checks.
    let ids = sweep(&lb, "t", 60).await;
    assert!(ids.iter().all(|id| id == "a" || id == "b"), "{ids:?}");
    let lines = silent.lines();
    assert!(lines.len() >= 2, "s was checked: {lines:?}");
    assert!(
        lines.iter().all(|l| l == "GET /healthz HTTP/1.1"),
        "s was sent something other than health checks: {lines:?}"
    );
    // Still down: the timeout keeps failing it.
    assert_eq!(backend_up(&lb, "s").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_health_section_no_checks_are_sent() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&config(&[&a, &b, &c], Some(&redis), ROUND_ROBIN_SESSIONS)).await;

    // Longer than the idle re-check of the configuration (1 s), with traffic meanwhile.
    let sent = drive(&lb, 50, Duration::from_millis(1_500)).await;
    assert_eq!(a.requests() + b.requests() + c.requests(), sent);
    for x in [&a, &b, &c] {
        assert_eq!(x.health_checks(), 0, "backend {} was checked", x.id());
    }
    let m = lb.metrics().await;
    assert_eq!(
        metric_sum(&m, "tether_health_checks_total", &[]),
        0.0,
        "{m}"
    );
    assert_eq!(backend_up(&lb, "b").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_checks_on_and_off() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let plain = config(&[&a, &b, &c], Some(&redis), ROUND_ROBIN_SESSIONS);
    let mut lb = Balancer::start(&plain).await;
    drive(&lb, 20, Duration::ZERO).await;
    assert_eq!(a.health_checks() + b.health_checks() + c.health_checks(), 0);

    // Adding [health] starts checks of every backend.
    lb.write_config(&(plain.clone() + FAST_HEALTH));
    lb.sighup();
    assert_eventually!(
        STATE_CHANGE,
        [&a, &b, &c].iter().all(|x| x.health_checks() > 0),
        "log:\n{}",
        tail(&lb.log(), 30)
    );

    // They work: b fails and goes down.
    b.set_healthy(false);
    assert_eventually!(STATE_CHANGE, backend_up(&lb, "b").await == Some(0.0));

    // Removing [health] stops them, and b (still failing /healthz) counts as healthy again.
    lb.write_config(&plain);
    lb.sighup();
    assert_eventually!(
        STATE_CHANGE,
        backend_up(&lb, "b").await == Some(1.0),
        "log:\n{}",
        tail(&lb.log(), 30)
    );
    assert_eq!(api_health(&lb, "b").await, "up");
    let counts = [&a, &b, &c].map(|x| x.health_checks());
    drive(&lb, 20, Duration::from_millis(1_500)).await;
    for (x, n) in [&a, &b, &c].iter().zip(counts) {
        // One check may have been on the wire when the tasks were stopped.
        assert!(
            x.health_checks() <= n + 1,
            "backend {} still checked: {} then {}",
            x.id(),
            n,
            x.health_checks()
        );
    }
    let fresh = sweep(&lb, "n", 30).await;
    assert!(fresh.iter().any(|id| id == "b"), "{fresh:?}");
}
