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
    // Regression test for cloudflare/pingora#946 (vendor/README.md): with the routing decision
    // awaiting Redis, about 1 in 10 tunnels used to be torn down right after the 101.
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
