//! Failures move sessions without failed requests: a backend dies, Redis dies and returns.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use support::scenario::*;
use support::*;

/// GET every session once through `url`; returns the backend of each. Panics on a non-200.
async fn sweep(url: &str, prefix: &str, sessions: usize) -> Vec<String> {
    let url = Arc::new(url.to_string());
    let prefix = Arc::new(prefix.to_string());
    let http = client();
    for_each_concurrently(sessions, 16, move |i| {
        let (url, prefix, http) = (url.clone(), prefix.clone(), http.clone());
        async move {
            let sid = format!("{prefix}-{i}");
            let (status, id, _) = get_backend(&http, &url, &[(SESSION_HEADER, &sid)]).await;
            assert_eq!(status, 200, "{sid}");
            id.unwrap()
        }
    })
    .await
}

/// Pin 300 sessions over a, b, c; kill b; every session still gets 200, b's move exactly once
/// and stay moved, the others do not move. With Redis, the new pins are stored.
async fn kill_a_backend_under_sessions(with_redis: bool) {
    let redis = RedisServer::start();
    let (a, mut b, c) = three_backends().await;
    let lb = Balancer::start(&config(
        &[&a, &b, &c],
        with_redis.then_some(&redis),
        "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"",
    ))
    .await;

    let before = sweep(&lb.url("/"), "s", 300).await;
    let on_b = before.iter().filter(|id| *id == "b").count();
    assert_eq!(on_b, 100);

    b.kill_and_wait().await;
    // Concurrently, through pooled keep-alive connections that b's death just closed.
    let after = sweep(&lb.url("/"), "s", 300).await;
    for (i, (x, y)) in before.iter().zip(&after).enumerate() {
        if x == "b" {
            assert_ne!(y, "b", "s-{i} still on the dead backend");
        } else {
            assert_eq!(x, y, "s-{i} moved although its backend is alive");
        }
        if with_redis {
            let stored = redis_get(&redis, &header_pin_key(&format!("s-{i}")));
            assert_eq!(
                stored,
                Some(format!("v1:{y}")),
                "s-{i}: the new pin is stored"
            );
        }
    }
    // And it holds.
    assert_eq!(sweep(&lb.url("/"), "s", 300).await, after);

    let m = lb.metrics().await;
    let moved = metric_sum(&m, "tether_reassignments_total", &[]);
    assert_eq!(
        moved, 100.0,
        "each of b's sessions moved exactly once:\n{m}"
    );
    assert!(
        metric_value(&m, "tether_reassignments_total{reason=\"connect_failure\"}").unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric_value(&m, "tether_upstream_connect_failures_total{backend=\"b\"}").unwrap() >= 1.0
    );
    assert_eq!(
        metric_sum(&m, "tether_requests_total", &[("class", "5xx")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_loses_its_sessions_to_live_ones_without_a_failed_get() {
    kill_a_backend_under_sessions(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_map_moves_sessions_off_a_killed_backend_too() {
    kill_a_backend_under_sessions(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_tether_fails_open_and_writes_resume_when_it_returns() {
    let mut redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"",
    );
    let one = Balancer::start(&body).await;
    let two = Balancer::start(&body).await;

    let known = sweep(&one.url("/"), "known", 200).await;

    redis.kill();
    // Known keys keep their backend; no request fails.
    assert_eq!(sweep(&one.url("/"), "known", 200).await, known);
    assert_eventually!(
        Duration::from_secs(10),
        metric_value(&one.metrics().await, "tether_redis_up") == Some(0.0)
    );
    // New keys go where the rendezvous hash says: the same on both instances, spread over all.
    let new_one = sweep(&one.url("/"), "new", 150).await;
    let new_two = sweep(&two.url("/"), "new", 150).await;
    assert_eq!(
        new_one, new_two,
        "fail-open choices must agree across instances"
    );
    let mut spread: HashMap<&str, usize> = HashMap::new();
    for id in &new_one {
        *spread.entry(id).or_default() += 1;
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
    let m = one.metrics().await;
    assert!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"fallback\"}").unwrap() >= 150.0
    );
    assert_eq!(
        metric_sum(&m, "tether_requests_total", &[("class", "5xx")]),
        0.0
    );

    // Redis comes back empty (no persistence). Pins made during the outage are written on their
    // next request; new keys are pinned as usual.
    redis.restart();
    assert_eventually!(
        Duration::from_secs(10),
        metric_value(&one.metrics().await, "tether_redis_up") == Some(1.0)
    );
    assert_eq!(sweep(&one.url("/"), "new", 150).await, new_one);
    let later = sweep(&one.url("/"), "later", 30).await;
    assert_eventually!(Duration::from_secs(10), {
        (0..150).all(|i| {
            redis_get(&redis, &header_pin_key(&format!("new-{i}")))
                == Some(format!("v1:{}", new_one[i]))
        })
    });
    for (i, id) in later.iter().enumerate() {
        let stored = redis_get(&redis, &header_pin_key(&format!("later-{i}")));
        assert_eq!(stored, Some(format!("v1:{id}")));
    }
    // The other instance reads what the first wrote, once it hears Redis again.
    assert_eventually!(
        Duration::from_secs(10),
        metric_value(&two.metrics().await, "tether_redis_up") == Some(1.0)
    );
    assert_eq!(sweep(&two.url("/"), "later", 30).await, later);
    assert!(one.log().contains("redis answers again"), "{}", one.log());
}
