//! Tests of the test harness itself (`tests/support`), for the parts that do not need tether:
//! `RedisServer`, `Backend`, the polling helpers and the Prometheus text parser. If these fail,
//! every other integration test's result means nothing.

mod support;

use std::time::{Duration, Instant};

use support::{Backend, RedisServer, assert_eventually, client, get_backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Whether `pid` names a live process (or an unreaped zombie).
fn process_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; no memory is involved.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn redis_server_start_set_get_kill_restart() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    assert!(url.starts_with("redis+unix:///"), "url {url}");
    assert!(!url.contains('?'), "url must carry no query: {url}");
    assert!(redis.socket_path().exists());
    let pid = redis.pid();
    assert!(process_exists(pid));

    let mut conn = redis.conn();
    let () = redis::cmd("SET")
        .arg("greeting")
        .arg("hello")
        .query(&mut conn)
        .expect("SET");
    let got: Option<String> = redis::cmd("GET").arg("greeting").query(&mut conn).unwrap();
    assert_eq!(got.as_deref(), Some("hello"));

    // Kill: the process is gone and reaped, the socket is gone, a new connection fails, and the
    // old connection no longer works.
    redis.kill();
    assert!(!redis.is_running());
    assert!(!process_exists(pid), "redis-server {pid} still exists");
    assert!(!redis.socket_path().exists(), "socket file left behind");
    let connect = redis::Client::open(url.as_str()).and_then(|c| c.get_connection());
    assert!(connect.is_err(), "connected to a killed redis-server");
    let ping: redis::RedisResult<String> = redis::cmd("PING").query(&mut conn);
    assert!(ping.is_err(), "old connection still answers: {ping:?}");

    // Restart: same URL, a new process, PING works, the data is gone.
    redis.restart();
    assert_eq!(redis.url(), url);
    assert_ne!(redis.pid(), pid);
    let mut conn = redis.conn();
    let pong: String = redis::cmd("PING").query(&mut conn).expect("PING");
    assert_eq!(pong, "PONG");
    let got: Option<String> = redis::cmd("GET").arg("greeting").query(&mut conn).unwrap();
    assert_eq!(got, None, "data survived a restart");
    let keys: i64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(keys, 0);

    // Drop kills and reaps the restarted server too.
    let pid = redis.pid();
    let socket = redis.socket_path().to_owned();
    drop(redis);
    assert!(!process_exists(pid), "redis-server {pid} survived drop");
    assert!(!socket.exists(), "temp dir not removed on drop");
}

#[test]
fn redis_servers_are_independent() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.url(), b.url());
    let () = redis::cmd("SET")
        .arg("k")
        .arg("a")
        .query(&mut a.conn())
        .unwrap();
    let got: Option<String> = redis::cmd("GET").arg("k").query(&mut b.conn()).unwrap();
    assert_eq!(got, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_serves_its_id_and_records_requests() {
    let backend = Backend::start("alpha").await;
    assert_eq!(backend.id(), "alpha");
    assert!(backend.addr().ip().is_loopback());
    assert_ne!(backend.addr().port(), 0);
    assert_eq!(
        backend.toml(),
        format!(
            "[[backend]]\nid = \"alpha\"\naddress = \"{}\"\n",
            backend.addr()
        )
    );
    let c = client();
    let base = format!("http://{}", backend.addr());

    let (status, id, headers) = get_backend(
        &c,
        &format!("{base}/some/path?x=1"),
        &[("x-forwarded-for", "192.0.2.7")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(id.as_deref(), Some("alpha"));
    assert_eq!(headers["x-backend-id"], "alpha");
    assert!(headers.get("set-cookie").is_none());
    assert_eq!(backend.requests(), 1);
    assert_eq!(backend.last_headers()["x-forwarded-for"], "192.0.2.7");
    assert_eq!(backend.recorded()[0].uri.path(), "/some/path");

    let body = c.get(&base).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "alpha");
    assert_eq!(backend.requests(), 2);
    assert!(backend.last_headers().get("x-forwarded-for").is_none());

    let (status, id, headers) = get_backend(
        &c,
        &format!("{base}/set-cookie?name=connect.sid&value=s%3Aabc"),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(id.as_deref(), Some("alpha"));
    assert_eq!(
        headers["set-cookie"],
        "connect.sid=s%3Aabc; Path=/; HttpOnly"
    );
    assert_eq!(backend.requests(), 3);

    // Health checks answer, are counted apart, and can be failed on purpose.
    let (status, id, _) = get_backend(&c, &format!("{base}/healthz"), &[]).await;
    assert_eq!((status, id.as_deref()), (200, Some("alpha")));
    assert_eq!(backend.health_checks(), 1);
    assert_eq!(
        backend.requests(),
        3,
        "/healthz must not count as a request"
    );
    backend.set_healthy(false);
    let (status, _, _) = get_backend(&c, &format!("{base}/healthz"), &[]).await;
    assert_eq!(status, 503);
    let (status, _, _) = get_backend(&c, &base, &[]).await;
    assert_eq!(status, 200, "only /healthz fails when unhealthy");
    backend.set_healthy(true);
    let (status, _, _) = get_backend(&c, &format!("{base}/healthz"), &[]).await;
    assert_eq!(status, 200);

    backend.clear();
    assert_eq!((backend.requests(), backend.health_checks()), (0, 0));
}

/// Sends one keep-alive request on `stream` and reads the whole response.
async fn keepalive_request(stream: &mut TcpStream, expect_body: &str) {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&buf).ends_with(expect_body) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("response within 5 s")
            .unwrap();
        assert_ne!(n, 0, "connection closed mid-response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("x-backend-id: "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_kill_refuses_and_closes_then_restart_serves_again() {
    let mut backend = Backend::start("beta").await;
    let addr = backend.addr();

    // A keep-alive connection, like the ones tether pools.
    let mut pooled = TcpStream::connect(addr).await.unwrap();
    keepalive_request(&mut pooled, "beta").await;
    keepalive_request(&mut pooled, "beta").await;
    assert_eq!(backend.requests(), 2);

    backend.kill();
    assert_eventually!(
        WAIT,
        TcpStream::connect(addr).await.is_err(),
        "{addr} still accepts after kill"
    );
    // The open connection was aborted too: reading gives EOF or a reset, not a hang.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, pooled.read(&mut byte))
        .await
        .expect("open connection not closed by kill");
    assert!(matches!(read, Ok(0) | Err(_)), "read {read:?}");
    assert!(!backend.is_running());

    backend.restart().await;
    assert_eq!(backend.addr(), addr, "restart must reuse the address");
    assert!(backend.is_running());
    let c = client();
    let (status, id, _) = get_backend(&c, &format!("http://{addr}/again"), &[]).await;
    assert_eq!((status, id.as_deref()), (200, Some("beta")));
    assert_eq!(backend.requests(), 3, "records survive a restart");

    // Killing twice and restarting twice is fine.
    backend.kill_and_wait().await;
    backend.kill();
    assert!(TcpStream::connect(addr).await.is_err());
    backend.restart().await;
    backend.restart().await;
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    keepalive_request(&mut fresh, "beta").await;

    // Drop stops it as well.
    drop(backend);
    assert_eventually!(
        WAIT,
        TcpStream::connect(addr).await.is_err(),
        "{addr} still accepts after drop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_are_independent() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    assert_ne!(a.addr(), b.addr());
    let c = client();
    let (_, id, _) = get_backend(&c, &format!("http://{}/", b.addr()), &[]).await;
    assert_eq!(id.as_deref(), Some("b"));
    assert_eq!((a.requests(), b.requests()), (0, 1));
}

#[tokio::test]
async fn eventually_polls_until_true_or_deadline() {
    let start = Instant::now();
    let mut calls = 0;
    let ok = support::eventually(Duration::from_secs(5), || {
        calls += 1;
        std::future::ready(calls == 3)
    })
    .await;
    assert!(ok);
    assert_eq!(calls, 3);
    assert!(start.elapsed() < Duration::from_secs(2));

    let start = Instant::now();
    let ok = support::eventually(Duration::from_millis(100), || std::future::ready(false)).await;
    assert!(!ok);
    assert!(start.elapsed() >= Duration::from_millis(100));

    let mut n = 0;
    assert!(support::eventually_blocking(Duration::from_secs(5), || {
        n += 1;
        n > 2
    }));
    assert!(!support::eventually_blocking(
        Duration::from_millis(50),
        || false
    ));
}

#[tokio::test]
#[should_panic(expected = "condition `1 + 1 == 3` still false after 50ms: arithmetic 42")]
async fn assert_eventually_panics_at_the_deadline_with_the_message() {
    let n = 42;
    assert_eventually!(Duration::from_millis(50), 1 + 1 == 3, "arithmetic {n}");
}

#[tokio::test]
#[should_panic(expected = "condition `false` still false after 50ms")]
async fn assert_eventually_panics_at_the_deadline_without_a_message() {
    assert_eventually!(Duration::from_millis(50), false);
}

#[tokio::test]
async fn assert_eventually_passes_once_the_condition_holds() {
    let mut polls = 0;
    assert_eventually!(Duration::from_secs(5), {
        polls += 1;
        tokio::task::yield_now().await;
        polls == 3
    });
    assert_eq!(polls, 3);
}

#[test]
fn metric_value_matches_name_and_labels_in_any_order() {
    let text = r#"# HELP tether_reassignments_total Sessions moved to another backend.
# TYPE tether_reassignments_total counter
tether_reassignments_total{reason="connect_failure"} 3
tether_reassignments_total{reason="backend_down"} 1
tether_requests_total{backend="a",outcome="ok"} 10
tether_requests_total{outcome="ok",backend="b"} 5
tether_requests_total{backend="b",outcome="error"} 2
tether_redis_up 1
tether_weird{path="a,b=\"c\"",x="y"} 7 1700000000000
tether_latency_bucket{le="+Inf"} +Inf
"#;
    let v = |s| support::metric_value(text, s);
    assert_eq!(
        v(r#"tether_reassignments_total{reason="connect_failure"}"#),
        Some(3.0)
    );
    assert_eq!(
        v(r#"tether_reassignments_total{reason="backend_down"}"#),
        Some(1.0)
    );
    assert_eq!(v(r#"tether_reassignments_total{reason="other"}"#), None);
    assert_eq!(
        v(r#"tether_requests_total{outcome="ok", backend="a"}"#),
        Some(10.0)
    );
    assert_eq!(
        v(r#"tether_requests_total{backend="b",outcome="ok"}"#),
        Some(5.0)
    );
    assert_eq!(
        v(r#"tether_requests_total{backend="b"}"#),
        None,
        "labels must match exactly"
    );
    assert_eq!(v("tether_requests_total"), None);
    assert_eq!(v("tether_redis_up"), Some(1.0));
    assert_eq!(v("tether_redis"), None, "names must match exactly");
    assert_eq!(
        v(r#"tether_weird{x="y",path="a,b=\"c\""}"#),
        Some(7.0),
        "escaped quotes, commas and a timestamp"
    );
    assert_eq!(
        v(r#"tether_latency_bucket{le="+Inf"}"#),
        Some(f64::INFINITY)
    );
    assert_eq!(
        support::metric_sum(text, "tether_requests_total", &[("backend", "b")]),
        7.0
    );
    assert_eq!(
        support::metric_sum(text, "tether_requests_total", &[]),
        17.0
    );
    assert_eq!(support::metric_sum(text, "nope", &[]), 0.0);
    assert_eq!(
        support::Balancer::metric_value(text, "tether_redis_up"),
        Some(1.0)
    );
}

#[test]
fn free_port_is_bindable() {
    let port = support::free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("free_port gave a taken port");
}
