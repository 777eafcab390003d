//! WebSockets and Engine.IO through tether: same affinity as the session's HTTP requests, idle
//! tunnels outlive the HTTP read timeout (and close at the tunnel timeout), a pin cannot expire
//! under an open WebSocket, and Engine.IO sids are learned from handshakes.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use support::scenario::*;
use support::*;

fn body(backends: &[&Backend], redis: &RedisServer, extra: &str) -> String {
    config(
        backends,
        Some(redis),
        "sources = [\"header:x-session-id\", \"query:sid\"]\npolicy = \"round_robin\"",
    ) + extra
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_follows_its_session_and_outlives_the_read_timeout() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&body(
        &[&a, &b, &c],
        &redis,
        "\n[upstream]\nread_timeout_ms = 300\ntunnel_timeout_secs = 30\n",
    ))
    .await;
    let http = client();

    for n in 0..6 {
        let session = format!("ws-{n}");
        let (_, http_backend, _) =
            get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, &session)]).await;
        let (mut ws, ws_backend) = open_ws(&lb, &session).await;
        // Round-robin would rotate; the pin sends the upgrade where the session lives.
        assert_eq!(Some(ws_backend.clone()), http_backend);
        assert_eq!(echo(&mut ws, "hello").await, format!("{ws_backend}:hello"));
        if n == 0 {
            // Idle for several HTTP read timeouts: the tunnel timeout governs, not the read one.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(
                echo(&mut ws, "still here").await,
                format!("{ws_backend}:still here")
            );
        }
        ws.close(None).await.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_websockets_each_echo_their_first_message() {
    // Regression test for cloudflare/pingora#946: on Pingora's proxy, with the routing decision
    // awaiting Redis, about 1 in 10 tunnels were torn down right after the 101 (upgrades now take
    // tether's lean engine).
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&body(&[&a, &b, &c], &redis, "")).await;
    for n in 0..200 {
        let (mut ws, backend) = open_ws(&lb, &format!("first-{n}")).await;
        assert_eq!(
            echo(&mut ws, "first").await,
            format!("{backend}:first"),
            "tunnel {n}"
        );
        ws.close(None).await.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_timeout_closes_an_idle_websocket() {
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    let lb = Balancer::start(&body(
        &[&a],
        &redis,
        "\n[upstream]\ntunnel_timeout_secs = 1\n",
    ))
    .await;
    let (mut ws, _) = open_ws(&lb, "idle").await;
    assert_eq!(echo(&mut ws, "x").await, "a:x");
    let opened = Instant::now();
    // Idle: tether closes it at the tunnel timeout (the next read ends), not before.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "an idle websocket stayed open 10 s with tunnel_timeout_secs = 1"
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        opened.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_cannot_expire_under_an_open_websocket() {
    let redis = RedisServer::start();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let lb = Balancer::start(&config(
        &[&a, &b],
        Some(&redis),
        "sources = [\"header:x-session-id\"]\nttl_secs = 1",
    ))
    .await;
    let key = header_pin_key("long-lived");
    let pttl = |redis: &RedisServer| -> i64 {
        redis::cmd("PTTL")
            .arg(&key)
            .query(&mut redis.conn())
            .unwrap()
    };
    let (mut ws, backend) = open_ws(&lb, "long-lived").await;
    let gauge = format!("tether_backend_open_websockets{{backend=\"{backend}\"}}");
    assert_eq!(lb.metric(&gauge).await, Some(1.0));

    // Three TTLs of silence on an open WebSocket: the pin is kept alive in Redis all along.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let left = pttl(&redis);
        assert!(
            left > 0,
            "pin expired under an open websocket after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(echo(&mut ws, "ping").await, format!("{backend}:ping"));

    // Closed: the gauge drops and the pin may now lapse.
    ws.close(None).await.ok();
    drop(ws);
    assert_eventually!(Duration::from_secs(5), lb.metric(&gauge).await == Some(0.0));
    assert_eventually!(Duration::from_secs(10), pttl(&redis) == -2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_io_sids_are_learned_from_the_handshake_on_every_instance() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    // No cookie, no header: only the sid can keep polling requests together.
    let body = config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"query:sid\"]\npolicy = \"round_robin\"",
    );
    let one = Balancer::start(&body).await;
    let two = Balancer::start(&body).await;
    let http = Arc::new(client());

    for n in 0..6 {
        let handshake = format!("/socket.io/?EIO=4&transport=polling&t=h{n}");
        let resp = http.get(one.url(&handshake)).send().await.unwrap();
        let owner = resp.headers()["x-backend-id"].to_str().unwrap().to_string();
        let text = resp.text().await.unwrap();
        let sid = text
            .split("\"sid\":\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string();
        assert!(sid.starts_with(&format!("{owner}-")), "{text}");
        // The pin was in Redis before the handshake body reached us: a poll through any other
        // instance, sent the moment the client has the sid, finds it.
        let src = tether::config::KeySource::Query("sid".into());
        let pin = format!("tether:pin:{}", key_hash(&src, &sid));
        assert_eq!(
            redis_get(&redis, &pin),
            Some(format!("v1:{owner}")),
            "sid {sid}"
        );
        // Every poll, through either instance, reaches the backend that opened the session.
        for lb in [&one, &two, &one, &two] {
            let poll = lb.url(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}"));
            let (status, id, _) = get_backend(&http, &poll, &[]).await;
            assert_eq!(
                (status, id.as_deref()),
                (200, Some(owner.as_str())),
                "sid {sid}"
            );
        }
    }
    let m = one.metrics().await;
    assert_eq!(metric_value(&m, "tether_affinity_learned_total"), Some(6.0));
}

// The tunnel an upgraded connection runs in once the 101 is out (src/engine/tunnel.rs): these
// drive it with raw sockets on both sides, so what it must carry is
// exactly what was sent.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const UPGRADE_RESPONSE: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

fn upgrade_request(session: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: tether\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         {SESSION_HEADER}: {session}\r\n\r\n"
    )
}

/// Reads up to the end of an HTTP head: the head, and what came after it.
async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("an HTTP head within 5 s")
            .expect("read");
        assert!(n > 0, "EOF before the end of the head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until `got` holds `want` bytes (what it already holds counts).
async fn read_exactly(s: &mut (impl AsyncRead + Unpin), got: &mut Vec<u8>, want: usize) {
    let mut chunk = vec![0u8; 64 * 1024];
    while got.len() < want {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{} of {want} bytes after 10 s", got.len()))
            .expect("read");
        assert!(n > 0, "EOF after {} of {want} bytes", got.len());
        got.extend_from_slice(&chunk[..n]);
    }
}

/// A one-connection backend that answers the upgrade with a 101 (and `with_101` in the same
/// write), then hands the socket and the bytes read past the request head to `then`.
async fn raw_backend<F, Fut, T>(with_101: &'static [u8], then: F) -> (String, JoinHandle<T>)
where
    F: FnOnce(TcpStream, Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let table = format!(
        "[[backend]]\nid = \"raw\"\naddress = \"{}\"\n",
        listener.local_addr().unwrap()
    );
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let (head, rest) = read_head(&mut s).await;
        assert!(head.starts_with("GET /ws "), "{head}");
        s.write_all(&[UPGRADE_RESPONSE, with_101].concat())
            .await
            .unwrap();
        then(s, rest).await
    });
    (table, task)
}

use tokio::task::JoinHandle;

/// tether in front of one raw backend (`table`), keyed on the session header.
async fn raw_balancer(redis: &RedisServer, table: String, extra: &str) -> Balancer {
    let affinity = format!("sources = [\"header:x-session-id\"]\n{extra}");
    Balancer::start(&config_with(&[table], Some(redis), &affinity)).await
}

/// Sends an upgrade request for `session` (and `early` right behind it) on `c`, which is
/// connected to tether; returns what came after the 101's head.
async fn upgrade(c: &mut TcpStream, session: &str, early: &[u8]) -> Vec<u8> {
    c.write_all(&[upgrade_request(session).as_bytes(), early].concat())
        .await
        .unwrap();
    let (head, rest) = read_head(c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_with_the_101_and_with_the_upgrade_request_cross_the_tunnel() {
    // A backend that speaks first (Engine.IO's open packet) writes with its 101; a client may
    // write right behind its request. Both reach the other side, then the backend's close
    // closes the client's connection, and the tunnel is logged and counted when it closes.
    const EARLY: &[u8] = b"client bytes behind the request";
    let redis = RedisServer::start();
    let (table, backend) = raw_backend(b"hello from the backend", |mut s, mut rest| async move {
        read_exactly(&mut s, &mut rest, EARLY.len()).await;
        s.write_all(b"|got it").await.unwrap();
        rest
    })
    .await;
    let lb = raw_balancer(&redis, table, "").await;
    let mut c = TcpStream::connect(("127.0.0.1", lb.proxy_port()))
        .await
        .unwrap();
    let mut rest = upgrade(&mut c, "early", EARLY).await;
    let want = b"hello from the backend|got it";
    read_exactly(&mut c, &mut rest, want.len()).await;
    assert_eq!(
        String::from_utf8_lossy(&rest),
        String::from_utf8_lossy(want)
    );
    assert_eq!(backend.await.unwrap(), EARLY, "what the backend got");

    // The backend's socket is gone (its task ended): the client's connection ends too.
    assert!(eof_within(&mut c, Duration::from_secs(5)).await);
    let gauge = "tether_backend_open_websockets{backend=\"raw\"}";
    assert_eventually!(Duration::from_secs(5), lb.metric(gauge).await == Some(0.0));
    let requests = "tether_requests_total{backend=\"raw\",class=\"1xx\"}";
    assert_eq!(lb.metric(requests).await, Some(1.0));
    let line = format!(
        "closed=backend bytes_to_backend={} bytes_to_client={}",
        EARLY.len(),
        want.len()
    );
    assert_eventually!(
        Duration::from_secs(5),
        lb.log()
            .lines()
            .any(|l| l.contains("tether::access") && l.contains(&line)),
        "an access line with `{line}`:\n{}",
        tail(&lb.log(), 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabytes_cross_the_tunnel_both_ways_intact_past_a_client_that_reads_late() {
    // The client sends everything before it reads anything: the backend's bytes pile up in
    // tether until the client reads, while the client's keep flowing the other way.
    const SIZE: usize = 24 << 20;
    let pattern = |seed: u8| -> Vec<u8> {
        (0..SIZE)
            .map(|i| (i % 251) as u8 ^ seed)
            .collect::<Vec<u8>>()
    };
    let (up, down) = (Arc::new(pattern(0x5a)), Arc::new(pattern(0xa5)));
    let redis = RedisServer::start();
    let (received, all_received) = tokio::sync::oneshot::channel();
    let (table, backend) = {
        let (up, down) = (up.clone(), down.clone());
        raw_backend(b"", move |s, mut rest| async move {
            let (mut r, mut w) = s.into_split();
            let read = async {
                read_exactly(&mut r, &mut rest, SIZE).await;
                assert!(rest == *up, "the client's bytes arrived changed");
                received.send(()).unwrap();
            };
            // The socket closes once both are done: a close ends the tunnel both ways.
            let ((), written) = tokio::join!(read, w.write_all(&down));
            written.expect("writing to tether");
        })
        .await
    };
    let lb = raw_balancer(&redis, table, "").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut c = socket
        .connect(([127, 0, 0, 1], lb.proxy_port()).into())
        .await
        .unwrap();
    let mut rest = upgrade(&mut c, "bulk", b"").await;
    c.write_all(&up).await.unwrap();
    // Everything the client sent arrived while none of what the backend sent was read.
    tokio::time::timeout(Duration::from_secs(20), all_received)
        .await
        .expect("the backend got the client's bytes within 20 s")
        .unwrap();
    read_exactly(&mut c, &mut rest, SIZE).await;
    assert!(rest == *down, "the backend's bytes arrived changed");
    backend.await.unwrap();
    assert!(eof_within(&mut c, Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_one_way_keeps_a_tunnel_open_past_the_tunnel_timeout() {
    // `tunnel_timeout_secs` counts silence both ways (HAProxy's `timeout tunnel`): a backend
    // that pushes while the client says nothing keeps the tunnel open; once it stops, the
    // tunnel closes one timeout later.
    const TICKS: usize = 12;
    let redis = RedisServer::start();
    let (table, backend) = raw_backend(b"", |mut s, _| async move {
        for _ in 0..TICKS {
            s.write_all(b".").await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Silent but open: tether must close it.
        let mut chunk = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await;
        matches!(closed, Ok(Ok(0)) | Ok(Err(_)))
    })
    .await;
    let lb = raw_balancer(&redis, table, "\n[upstream]\ntunnel_timeout_secs = 1\n").await;
    let mut c = TcpStream::connect(("127.0.0.1", lb.proxy_port()))
        .await
        .unwrap();
    let mut rest = upgrade(&mut c, "push", b"").await;
    // 3 s of pushes, three tunnel timeouts: all of them arrive.
    read_exactly(&mut c, &mut rest, TICKS).await;
    let quiet = Instant::now();
    assert!(eof_within(&mut c, Duration::from_secs(10)).await);
    assert!(
        quiet.elapsed() >= Duration::from_millis(500),
        "closed {:?} after the last push, tunnel_timeout_secs = 1",
        quiet.elapsed()
    );
    assert!(backend.await.unwrap(), "the backend side was not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_tether_at_once_right_after_a_websocket() {
    // Pingora's fast shutdown (SIGINT) stops its per-thread runtimes one by one without first
    // ending the accept loops; an accept loop whose listener was registered on a runtime already
    // stopped then fails without ever yielding, and the process spun at 100% CPU, logging
    // "Accept() failed", instead of exiting (about 1 stop in 7 right after a WebSocket closed,
    // two proxy threads). tether exits on SIGINT itself.
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    for n in 0..15 {
        let mut lb = Balancer::start(&body(&[&a], &redis, "")).await;
        let (mut ws, _) = open_ws(&lb, &format!("stop-{n}")).await;
        assert_eq!(echo(&mut ws, "x").await, "a:x");
        ws.close(None).await.ok();
        drop(ws);
        let log_before = lb.log();
        assert!(
            lb.stop().await.is_some(),
            "tether still running {BALANCER_STOP_TIMEOUT:?} after SIGINT (stop {n}):\n{}",
            tail(&log_before, 10)
        );
    }
}
