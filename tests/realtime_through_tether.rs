//! The product's promise end to end: tether in front of three rideshare instances, driven by a
//! real Socket.IO client (python-socketio, tests/clients/sio_client.py) and a cookie-keeping
//! HTTP client. Long-polling works through tether and fails without stickiness; the Engine.IO sid
//! alone keeps polling together; a logged-in user survives the death of its instance.

mod support;

use std::time::Duration;

use ::rideshare::serde_json::Value;
use support::rideshare::{Agent, Rideshare, SioClient};
use support::scenario::config_with;
use support::{Balancer, RedisServer, metric_value};

/// Deadline for a client to finish its scripted work.
const EXIT: Duration = Duration::from_secs(40);

/// tether over the three instances with the given `[affinity]` lines.
fn tether_config(apps: &[&Rideshare], redis: &RedisServer, affinity: &str) -> String {
    let tables: Vec<String> = apps.iter().map(|a| a.toml()).collect();
    config_with(&tables, Some(redis), affinity)
}

async fn three_instances(redis: &RedisServer) -> (Rideshare, Rideshare, Rideshare) {
    (
        Rideshare::start_killable("i1", Some(redis)).await,
        Rideshare::start_killable("i2", Some(redis)).await,
        Rideshare::start_killable("i3", Some(redis)).await,
    )
}

/// Instances that answered the client's Socket.IO HTTP requests (`--trace-http`).
fn socketio_instances(client: &SioClient) -> Vec<String> {
    client
        .of_type("socketio_http")
        .iter()
        .filter_map(|l| l["instance"].as_str().map(str::to_owned))
        .collect()
}

/// A rider who requests a ride and listens on polling only; the driver accepts it and streams 5
/// locations, also on polling only; both through `url`.
async fn ride_over_polling(url: &str, tag: &str) -> (SioClient, SioClient) {
    let mut rider_http = Agent::new();
    rider_http
        .login(url, &format!("rider-{tag}"), "rider")
        .await;
    let ride = rider_http.request_ride(url, "Gare du Nord", "Orly").await;
    let rider = SioClient::spawn(
        &format!("rider-{tag}"),
        &[
            "--url",
            url,
            "--name",
            &format!("rider-{tag}"),
            "--role",
            "rider",
            "--transports",
            "polling",
            "--trace-http",
            "--join",
            &ride,
            "--expect-event",
            "location=5",
            "--timeout",
            "30",
        ],
    );
    // The rider must be in the room before the driver moves.
    rider
        .wait_for(
            Duration::from_secs(30),
            "the rider's joinRide ack",
            |lines| {
                lines
                    .iter()
                    .any(|l| l["type"] == "ack" || l["type"] == "summary")
            },
        )
        .await;
    let driver = SioClient::spawn(
        &format!("driver-{tag}"),
        &[
            "--url",
            url,
            "--name",
            &format!("driver-{tag}"),
            "--role",
            "driver",
            "--transports",
            "polling",
            "--trace-http",
            "--accept",
            &ride,
            "--join",
            &ride,
            "--send-locations",
            "5",
            "--interval",
            "0.1",
            "--timeout",
            "30",
        ],
    );
    (rider, driver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn socketio_long_polling_works_through_tether_and_fails_without_stickiness() {
    let redis = RedisServer::start();
    let (i1, i2, i3) = three_instances(&redis).await;
    let apps = [&i1, &i2, &i3];

    // Sticky: the session cookie, else the Engine.IO sid. Round-robin for new keys, so that
    // nothing but the pins keeps a client's polls together.
    let sticky = Balancer::start(&tether_config(
        &apps,
        &redis,
        "sources = [\"cookie:rs.sid\", \"query:sid\"]\npolicy = \"round_robin\"",
    ))
    .await;
    let (mut rider, mut driver) = ride_over_polling(&sticky.url(""), "sticky").await;
    driver.finish_ok(EXIT).await;
    let summary = rider.finish_ok(EXIT).await;
    assert_eq!(summary["received"]["location"], 5, "{}", rider.transcript());
    for client in [&rider, &driver] {
        let seen = socketio_instances(client);
        assert!(seen.len() >= 3, "too few polls traced: {seen:?}");
        assert!(
            seen.iter().all(|i| *i == seen[0]),
            "polls spread over {seen:?}"
        );
    }

    // Not sticky: the same instances behind a round-robin that never finds a key.
    let rotating = Balancer::start(&tether_config(
        &apps,
        &redis,
        "sources = [\"header:x-no-such-header\"]\npolicy = \"round_robin\"",
    ))
    .await;
    let mut lost = SioClient::spawn(
        "rider-rotating",
        &[
            "--url",
            &rotating.url(""),
            "--name",
            "rider-rotating",
            "--role",
            "rider",
            "--transports",
            "polling",
            "--trace-http",
            "--expect-event",
            "hello=1",
            "--timeout",
            "20",
        ],
    );
    let (code, summary) = lost.finish(EXIT).await;
    assert_ne!(
        code,
        Some(0),
        "polling without stickiness should fail:\n{}",
        lost.transcript()
    );
    let unknown = lost.of_type("http_error").iter().any(|l| {
        l["status"] == 400
            && l["body"]
                .as_str()
                .is_some_and(|b| b.contains("Session ID unknown"))
    });
    assert!(
        unknown,
        "expected the server's 400 Session ID unknown: {summary}\n{}",
        lost.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_engine_io_sid_alone_keeps_long_polling_on_one_instance() {
    let redis = RedisServer::start();
    let (i1, i2, i3) = three_instances(&redis).await;
    // No cookie source: the client's rs.sid cookie is invisible to tether; only the sid learned
    // from the handshake response can route its polls.
    let lb = Balancer::start(&tether_config(
        &[&i1, &i2, &i3],
        &redis,
        "sources = [\"query:sid\"]\npolicy = \"round_robin\"",
    ))
    .await;
    let mut client = SioClient::spawn(
        "sid-only",
        &[
            "--url",
            &lb.url(""),
            "--name",
            "sid-only",
            "--role",
            "rider",
            "--transports",
            "polling",
            "--trace-http",
            "--expect-event",
            "hello=1",
            "--timeout",
            "30",
        ],
    );
    client.finish_ok(EXIT).await;
    let seen = socketio_instances(&client);
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter().all(|i| *i == seen[0]),
        "polls spread over {seen:?}"
    );
    assert!(metric_value(&lb.metrics().await, "tether_affinity_learned_total").unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_logged_in_user_survives_the_death_of_its_instance() {
    let redis = RedisServer::start();
    let (i1, i2, i3) = three_instances(&redis).await;
    let lb = Balancer::start(&tether_config(
        &[&i1, &i2, &i3],
        &redis,
        "sources = [\"cookie:rs.sid\"]\npolicy = \"round_robin\"",
    ))
    .await;
    let base = lb.url("");
    let mut user = Agent::new();
    let login = user.login(&base, "ada", "rider").await;
    let home = login.instance.clone().expect("x-backend-id");
    for _ in 0..3 {
        let me = user.get(&lb.url("/me")).await;
        assert_eq!(
            (me.status, me.instance.as_deref()),
            (200, Some(home.as_str()))
        );
    }

    // Its instance dies (aborted, not drained): the next request lands elsewhere, logged in.
    let mut apps = vec![i1, i2, i3];
    let pos = apps
        .iter()
        .position(|a| a.id() == home)
        .expect("home is one of them");
    drop(apps.remove(pos));
    let me = user.get(&lb.url("/me")).await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_ne!(me.instance.as_deref(), Some(home.as_str()));
    assert_eq!(me.json["name"], Value::from("ada"), "{me:?}");
    let moved_to = me.instance.clone();
    for _ in 0..3 {
        let again = user.get(&lb.url("/me")).await;
        assert_eq!((again.status, &again.instance), (200, &moved_to));
    }
}
