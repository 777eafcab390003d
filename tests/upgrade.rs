//! Graceful upgrade (Pingora's): a second tether started with `-u` takes the listening sockets
//! over through `[server] upgrade_sock`, the old one gets SIGQUIT and drains. Under continuous
//! load, no request fails and every session keeps its backend.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::Method;

use support::scenario::*;
use support::*;

/// Upgrade tether twice under a client loop of 8 workers, each connecting as `connections` says;
/// check that each old process exits, each new one is ready and serves, no session moved, and
/// (last, so that the rest is checked whatever happens) that no request failed.
async fn upgrade_under_load(connections: fn(usize) -> Connections) {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"",
    );
    let mut lb = Balancer::start_with_upgrade_sock(&body).await;
    let http = client();

    // 30 sessions, pinned before the upgrade.
    let sessions: Vec<String> = (0..30).map(|i| format!("s-{i}")).collect();
    let mut pinned = BTreeMap::new();
    for sid in &sessions {
        let (status, on, _) = get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, sid)]).await;
        assert_eq!(status, 200);
        pinned.insert(sid.clone(), on.expect("a backend id"));
    }

    let list = sessions.clone();
    let load = LoadLoop::start(&lb.url("/"), 8, connections, move |w, n| {
        Some(list[(w * 7 + n) % list.len()].clone())
    });
    load.wait_for_more(200, Duration::from_secs(10)).await;

    // Two upgrades in a row under the same load, as two deploys would be.
    let mut upgrades = Vec::new();
    for round in 0..2 {
        let began = Instant::now();
        let upgrade = lb.graceful_upgrade().await;
        let ended = Instant::now();
        eprintln!("upgrade {round}: {upgrade:?}");
        // The old process exited cleanly; the new one is the balancer now, ready and serving.
        assert!(upgrade.old_exit.success(), "old tether: {upgrade:?}");
        assert_ne!(upgrade.old_pid, upgrade.new_pid);
        assert_eq!(lb.pid(), upgrade.new_pid);
        assert!(lb.is_running());
        let ready = lb.admin(Method::GET, "/readyz").await;
        assert_eq!(ready.status, 200, "{}", ready.text);
        assert_eq!(ready.json()["redis"], "up");
        // Requests served by the new process alone.
        load.wait_for_more(300, Duration::from_secs(10)).await;
        upgrades.push((began, ended, upgrade));
    }
    let report = load.stop().await;
    let (_, last_ended, _) = upgrades[1];

    for (began, ended, _) in &upgrades {
        let during = report
            .samples
            .iter()
            .filter(|s| s.started >= *began && s.started <= *ended)
            .count();
        assert!(
            during >= 100,
            "the load ran across the whole upgrade: {during} requests during it"
        );
    }
    // Every session stayed on its backend, before, during and after (failed requests, if any,
    // are reported last).
    for s in report.samples.iter().filter(|s| s.ok()) {
        let sid = s.session.as_deref().expect("keyed");
        assert_eq!(s.backend(), Some(pinned[sid].as_str()), "{sid} moved");
    }
    for sid in &sessions {
        let (status, on, _) = get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, sid)]).await;
        assert_eq!(status, 200);
        assert_eq!(on.as_deref(), Some(pinned[sid].as_str()), "{sid}");
    }
    // The last process's counters started at zero: what it counts, it served. The sessions it
    // saw first came from Redis, not from a cache it could not have.
    let m = lb.metrics().await;
    let served = metric_sum(&m, "tether_requests_total", &[("class", "2xx")]);
    let after = report
        .samples
        .iter()
        .filter(|s| s.started > last_ended)
        .count() as f64;
    assert!(served >= after + 30.0, "the new process served {served}");
    assert_eq!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"miss\"}"),
        Some(0.0),
        "no session was assigned afresh"
    );
    assert!(
        metric_value(&m, "tether_affinity_lookups_total{result=\"redis\"}").unwrap_or(0.0) >= 30.0
    );
    let log = lb.log();
    assert_eq!(
        log.matches("SIGQUIT received").count(),
        2,
        "each old process logged its hand-over:\n{}",
        tail(&log, 30)
    );

    let first = report.samples[0].started;
    let at = |t: Instant| t.duration_since(first).as_millis();
    let timeline: Vec<String> = upgrades
        .iter()
        .map(|(_, _, u)| {
            format!(
                "SIGQUIT at +{} ms, old process gone at +{} ms",
                at(u.quit_at),
                at(u.quit_at + u.old_exit_after)
            )
        })
        .collect();
    report.assert_no_failures(&format!("graceful upgrades ({})", timeline.join("; ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_hands_new_connections_over_without_a_failure() {
    upgrade_under_load(|_| Connections::New).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_load_fails_no_request_and_keeps_every_session() {
    // Half the workers reuse one keep-alive connection, half open a new one per request. The
    // old process stops 5 s after SIGQUIT (Pingora's close timeout) and then drops the
    // keep-alive connections that wait for their next request: a client that sends one at that
    // moment gets a reset, unless tether told it beforehand (`Connection: close`) to reconnect.
    upgrade_under_load(|w| {
        if w % 2 == 0 {
            Connections::KeepAlive
        } else {
            Connections::New
        }
    })
    .await;
}
