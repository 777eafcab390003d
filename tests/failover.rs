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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_moved_off_a_dead_backend_is_counted_only_where_it_went() {
    // A new session's count on its backend is sent a little after its `SET NX` wins. When the
    // connect that follows fails, the compare-and-set moves the pin and its count to the next
    // backend, before that count reached Redis: the two must still cancel on the dead one.
    let redis = RedisServer::start();
    let a = Backend::start("a").await;
    let mut dead = Backend::start("dead").await;
    dead.kill_and_wait().await;
    let body = config(
        &[&a, &dead],
        Some(&redis),
        "sources = [\"header:x-session-id\"]\npolicy = \"round_robin\"",
    );
    let lb = Balancer::start(&body).await;
    // One connection, so one worker thread: its counts are sent in the order they were made.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .expect("client");
    let sessions = 6;
    for i in 0..sessions {
        let sid = format!("moved-{i}");
        let (status, id, _) = get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, &sid)]).await;
        assert_eq!((status, id.as_deref()), (200, Some("a")), "{sid}");
    }
    // Round-robin gave "dead" one of the first two, which moved: the others went to a at once.
    let retried = lb.metric("tether_retries_total").await.unwrap_or(0.0);
    assert_eq!(retried, 1.0, "{}", tail(&lb.log(), 30));
    let card = |set: &str| session_count(&redis, set);
    // Every session counted on a; the last of them was queued after the dead one's count, on
    // the same thread, so once it is in, the dead one's was sent.
    assert_eventually!(
        Duration::from_secs(5),
        card("a") == sessions,
        "a counts {}",
        card("a")
    );
    assert_eq!(
        card("dead"),
        0,
        "a moved session is still counted on the backend it left"
    );
    // The +1 tether computed and the -1 the script computed went to the same bucket (a 24 h TTL
    // makes buckets 338 s wide: the two cannot straddle a boundary but by a broken formula).
    let fields: Vec<(u64, i64)> = redis::cmd("HGETALL")
        .arg("tether:counts:dead")
        .query(&mut redis.conn())
        .expect("HGETALL");
    assert!(
        !fields.is_empty() && fields.iter().all(|(_, n)| *n == 0),
        "dead's buckets {fields:?}"
    );
    // Both hashes expire a TTL and two buckets after their last change (the batch's `PEXPIRE`
    // for a, the compare-and-set's for dead), so a backend removed for good leaves nothing.
    let hold = tether::affinity::redis::count_hold_ms(86_400_000) as i64;
    for id in ["a", "dead"] {
        let left: i64 = redis::cmd("PTTL")
            .arg(format!("tether:counts:{id}"))
            .query(&mut redis.conn())
            .expect("PTTL");
        assert!(
            left > hold - 60_000 && left <= hold,
            "{id}'s counts live {left} ms more"
        );
    }
}

#[test]
fn the_scripts_and_tether_put_an_expiry_in_the_same_count_bucket() {
    use tether::affinity::redis::{BUCKET_LUA, bucket_end, bucket_width};
    let redis = RedisServer::start();
    let script = format!("{BUCKET_LUA}return bucket(ARGV[1], ARGV[2])");
    let day = 86_400_000;
    assert_eq!(bucket_width(day), 338);
    assert_eq!(bucket_width(60_000), 1);
    assert_eq!(bucket_width(256_001), 2);
    for width in [1, 2, 338, 3600] {
        let w = width * 1000;
        for expiry in [
            1_764_612_345_678,
            1_764_612_000_000 / w * w,
            1_764_612_000_000 / w * w + 1,
            1_764_612_000_000 / w * w - 1,
            4_102_444_800_000,
        ] {
            let lua: String = redis::cmd("EVAL")
                .arg(&script)
                .arg(0)
                .arg(expiry)
                .arg(width)
                .query(&mut redis.conn())
                .expect("EVAL");
            let end = bucket_end(expiry, width);
            assert_eq!(lua, end.to_string(), "expiry {expiry}, width {width}");
            assert!(
                end * 1000 >= expiry && end * 1000 < expiry + w,
                "{expiry} -> {end}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_own_redis_connection_is_refused_keeps_using_the_shared_one() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let lb = Balancer::start(&config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"header:x-session-id\"]",
    ))
    .await;
    assert_eventually!(
        Duration::from_secs(10),
        lb.metric("tether_redis_up").await == Some(1.0),
        "redis is up"
    );
    // This connection, and the ones tether holds now, are all Redis takes: the proxy workers'
    // own connections (made on their first command) are refused.
    let mut admin = redis.conn();
    let clients = |admin: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query(admin)
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("connected_clients")
    };
    let maxclients = |admin: &mut redis::Connection, n: u64| {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(n)
            .query(admin)
            .expect("CONFIG SET maxclients");
    };
    let held = clients(&mut admin);
    maxclients(&mut admin, held);

    let http = client();
    for i in 0..40 {
        let sid = format!("refused-{i}");
        let (status, id, _) = get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, &sid)]).await;
        assert_eq!(status, 200, "{}", tail(&lb.log(), 30));
        let stored: Option<String> = redis::cmd("GET")
            .arg(header_pin_key(&sid))
            .query(&mut admin)
            .expect("GET");
        assert_eq!(
            stored,
            Some(format!(
                "v1:{}",
                id.expect("every answer names its backend")
            )),
            "{sid} was pinned in Redis, not failed open; log:\n{}",
            tail(&lb.log(), 30)
        );
    }
    assert_eq!(
        lb.metric("tether_redis_errors_total").await.unwrap_or(0.0),
        0.0
    );
    assert_eq!(lb.metric("tether_redis_up").await, Some(1.0));

    // Once Redis takes more clients, the workers' own connections are made.
    maxclients(&mut admin, 1000);
    assert_eventually!(
        Duration::from_secs(15),
        {
            let (status, _, _) =
                get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, "again")]).await;
            status == 200 && clients(&mut admin) > held
        },
        "no worker connection was made: {} clients",
        clients(&mut admin)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_redis_refused_is_sent_again_once_redis_takes_it() {
    let redis = RedisServer::start();
    let (a, b, c) = three_backends().await;
    let body = config(
        &[&a, &b, &c],
        Some(&redis),
        "sources = [\"header:x-session-id\"]",
    );
    let lb = Balancer::start(&body).await;
    let acl = |rule: &str| {
        let () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(rule)
            .query(&mut redis.conn())
            .expect("ACL SETUSER");
    };
    let card = |set: &str| session_count(&redis, set);
    let http = client();
    let send = || async {
        let (status, id, _) =
            get_backend(&http, &lb.url("/"), &[(SESSION_HEADER, "refused")]).await;
        assert_eq!(status, 200, "{}", tail(&lb.log(), 30));
        id.expect("every answer names its backend")
    };

    // Redis takes the pin (SET) but refuses its count (HINCRBY).
    acl("-hincrby");
    let first = send().await;
    assert_eq!(
        redis_get(&redis, &header_pin_key("refused")),
        Some(format!("v1:{first}"))
    );
    assert_eventually!(
        Duration::from_secs(5),
        lb.metric("tether_redis_errors_total").await.unwrap_or(0.0) >= 1.0,
        "the refused count was sent"
    );
    assert_eq!(card(&first), 0);

    // Once Redis takes counts again, the count held back is sent (tether retries with a pause
    // doubling to 5 s while Redis is down or refuses).
    acl("+hincrby");
    assert_eventually!(
        Duration::from_secs(10),
        lb.metric("tether_redis_up").await == Some(1.0),
        "redis is up again"
    );
    assert_eq!(send().await, first, "the pin held");
    assert_eventually!(
        Duration::from_secs(15),
        card(&first) == 1,
        "{first} counts {}",
        card(&first)
    );
}
