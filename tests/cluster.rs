//! Several tether instances and restarts agree, because the map lives in Redis.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::scenario::*;
use support::*;

fn body(backends: &[&Backend], redis: &RedisServer) -> String {
    // Round-robin: two instances whose rotations drift apart would disagree on most keys if the
    // first assignment were not atomic.
    config(
        backends,
        Some(redis),
        "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_racing_on_500_new_keys_never_disagree() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let one = Balancer::start(&body(&[&a, &b, &c], &redis)).await;
    let two = Balancer::start(&body(&[&a, &b, &c], &redis)).await;
    let urls = Arc::new((one.url("/"), two.url("/")));
    let http = client();

    // Each key's first requests go to both instances at the same moment; half the keys start on
    // each side, then a few more rounds through both.
    let answers = for_each_concurrently(500, 50, move |i| {
        let (urls, http) = (urls.clone(), http.clone());
        async move {
            let sid = format!("race-{i}");
            let h = [(SESSION_HEADER, sid.as_str())];
            let (first, second) = if i % 2 == 0 {
                (&urls.0, &urls.1)
            } else {
                (&urls.1, &urls.0)
            };
            let (x, y) = tokio::join!(
                get_backend(&http, first, &h),
                get_backend(&http, second, &h)
            );
            let mut seen = vec![x.1.unwrap(), y.1.unwrap()];
            for _ in 0..2 {
                seen.push(get_backend(&http, &urls.0, &h).await.1.unwrap());
                seen.push(get_backend(&http, &urls.1, &h).await.1.unwrap());
            }
            seen
        }
    })
    .await;

    let mut disagreements = 0;
    for (i, seen) in answers.iter().enumerate() {
        if seen.iter().any(|s| s != &seen[0]) {
            disagreements += 1;
            eprintln!("race-{i}: {seen:?}");
        }
        let stored = redis_get(&redis, &header_pin_key(&format!("race-{i}")));
        assert_eq!(stored, Some(format!("v1:{}", seen[0])), "race-{i}");
    }
    assert_eq!(disagreements, 0);
    // Each key is counted in exactly one backend's session set, the one its pin names: only the
    // assignment that won the race counts it, never the loser's candidate.
    let wanted: std::collections::BTreeMap<String, usize> =
        answers.iter().fold(Default::default(), |mut m, seen| {
            *m.entry(seen[0].clone()).or_default() += 1;
            m
        });
    let counted = |backend: &str| session_count(&redis, backend);
    assert_eventually!(
        Duration::from_secs(10),
        ["a", "b", "c"]
            .iter()
            .all(|b| counted(b) == wanted.get(*b).copied().unwrap_or(0)),
        "session sets {:?}, pins {wanted:?}",
        ["a", "b", "c"].map(counted)
    );
    // Some first requests really did race: the loser adopted the winner's pin.
    let redis_hits = metric_value(
        &one.metrics().await,
        "tether_affinity_lookups_total{result=\"redis\"}",
    )
    .unwrap_or(0.0)
        + metric_value(
            &two.metrics().await,
            "tether_affinity_lookups_total{result=\"redis\"}",
        )
        .unwrap_or(0.0);
    assert!(
        redis_hits >= 500.0,
        "each key is looked up once by the instance that did not pin it: {redis_hits}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_restarted_tether_routes_every_known_key_as_before() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let mut lb = Balancer::start(&body(&[&a, &b, &c], &redis)).await;
    let url = Arc::new(lb.url("/"));
    let http = client();
    let ask = {
        let http = http.clone();
        move |url: Arc<String>| {
            let http = http.clone();
            move |i: usize| {
                let (url, http) = (url.clone(), http.clone());
                async move {
                    let sid = format!("restart-{i}");
                    get_backend(&http, &url, &[(SESSION_HEADER, &sid)])
                        .await
                        .1
                        .unwrap()
                }
            }
        }
    };
    let before = for_each_concurrently(300, 20, ask(url.clone())).await;

    // SIGKILL: no chance to flush anything. A fresh process has an empty cache and a rotation
    // starting over, so only Redis can give the same answers.
    lb.kill();
    lb.restart().await;
    let after = for_each_concurrently(300, 20, ask(url)).await;
    assert_eq!(before, after);
    let m = lb.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"redis\"}"),
        Some(300.0)
    );
    assert_eq!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"miss\"}"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_made_by_one_instance_reaches_the_other_through_pubsub() {
    let redis = RedisServer::start();
    let (a, mut b, c) = three_backends().await;
    let one = Balancer::start(&body(&[&a, &b, &c], &redis)).await;
    let two = Balancer::start(&body(&[&a, &b, &c], &redis)).await;
    let http = client();
    let sids: Vec<String> = (0..60).map(|i| format!("moved-{i}")).collect();

    // Warm both caches.
    let mut on_b = Vec::new();
    for sid in &sids {
        let h = [(SESSION_HEADER, sid.as_str())];
        let x = get_backend(&http, &one.url("/"), &h).await.1.unwrap();
        let y = get_backend(&http, &two.url("/"), &h).await.1.unwrap();
        assert_eq!(x, y);
        if x == "b" {
            on_b.push(sid.clone());
        }
    }
    assert_eq!(on_b.len(), 20);

    // b dies; instance one moves its sessions (connect failure, then "down").
    b.kill_and_wait().await;
    let mut moved_to = Vec::new();
    for sid in &on_b {
        let (status, id, _) = get_backend(&http, &one.url("/"), &[(SESSION_HEADER, sid)]).await;
        assert_eq!(status, 200);
        assert_ne!(id.as_deref(), Some("b"));
        moved_to.push(id.unwrap());
    }

    // Instance two hears about every move and never tries b itself.
    assert_eventually!(
        Duration::from_secs(10),
        metric_value(&two.metrics().await, "tether_affinity_invalidations_total") == Some(20.0)
    );
    for (sid, expected) in on_b.iter().zip(&moved_to) {
        let (status, id, _) = get_backend(&http, &two.url("/"), &[(SESSION_HEADER, sid)]).await;
        assert_eq!(status, 200);
        assert_eq!(id.as_ref(), Some(expected), "{sid}");
    }
    let m = two.metrics().await;
    assert_eq!(
        metric_value(&m, "tether_upstream_connect_failures_total{backend=\"b\"}"),
        Some(0.0)
    );
}
