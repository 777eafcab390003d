//! rideshare's real-time side with a real Socket.IO client (python-socketio, driven as a child
//! process: tests/clients/sio_client.py): cookie-authenticated sockets, rooms per ride,
//! broadcasts across instances through Redis, and recovery after a Redis restart.

mod support;

use std::time::Duration;

use ::rideshare::serde_json::Value;
use support::RedisServer;
use support::rideshare::{Agent, Rideshare, SioClient, pause};

/// Deadline for anything a client should see.
const WAIT: Duration = Duration::from_secs(20);
/// Deadline for a client to exit after its work (or after stdin closes).
const EXIT: Duration = Duration::from_secs(15);

fn has_ack(lines: &[Value], event: &str, ok: bool) -> bool {
    lines
        .iter()
        .any(|l| l["type"] == "ack" && l["event"] == event && l["ok"] == ok)
}

/// Events about `ride` in what the client received.
fn about(client: &SioClient, event: &str, ride: &str) -> Vec<Value> {
    client
        .events(event)
        .into_iter()
        .filter(|d| d["rideId"] == ride)
        .collect()
}

/// A client logged in as `name` that joins `ride` and then waits for commands on stdin.
fn rider(label: &str, app: &Rideshare, name: &str, ride: &str, transports: &str) -> SioClient {
    SioClient::spawn(
        label,
        &[
            "--url",
            &app.base(),
            "--name",
            name,
            "--role",
            "rider",
            "--transports",
            transports,
            "--join",
            ride,
            "--stdin",
            "--timeout",
            "60",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rider_of_a_ride_hears_its_driver_on_every_instance_and_no_one_else_does() {
    let redis = RedisServer::start();
    let i1 = Rideshare::start("i1", Some(&redis)).await;
    let i2 = Rideshare::start("i2", Some(&redis)).await;
    let i3 = Rideshare::start("i3", Some(&redis)).await;

    let mut alice = Agent::new();
    alice.login(&i2.base(), "alice", "rider").await;
    let ride = alice.request_ride(&i2.base(), "Gare du Nord", "Orly").await;
    let mut carol = Agent::new();
    carol.login(&i3.base(), "carol", "rider").await;
    let other_ride = carol.request_ride(&i3.base(), "Bastille", "CDG").await;

    // Riders of the ride on instances 2 (WebSocket) and 3 (long-polling only); a rider of
    // another ride on instance 3 (polling, then upgrade).
    let mut a2 = rider("alice@i2", &i2, "alice", &ride, "websocket");
    let mut a3 = rider("alice@i3", &i3, "alice", &ride, "polling");
    let mut c3 = rider("carol@i3", &i3, "carol", &other_ride, "polling,websocket");
    for client in [&a2, &a3, &c3] {
        let ack = client.wait_ack(WAIT, "joinRide", 1).await;
        assert_eq!(ack["ok"], true, "{}", client.transcript());
    }
    assert_eq!(a2.events("hello")[0]["instance"], "i2");
    assert_eq!(a3.events("hello")[0]["instance"], "i3");
    assert!(
        a3.of_type("connected")[0]["transport"] == "polling",
        "{}",
        a3.transcript()
    );

    // The driver, on instance 1: accepts over HTTP (rideStatus to the room), joins, and sends
    // three locations, each acknowledged after its broadcast.
    const UPDATES: usize = 3;
    let mut driver = SioClient::spawn(
        "bob@i1",
        &[
            "--url",
            &i1.base(),
            "--name",
            "bob",
            "--role",
            "driver",
            "--accept",
            &ride,
            "--join",
            &ride,
            "--send-locations",
            &UPDATES.to_string(),
            "--interval",
            "0.05",
            "--timeout",
            "30",
        ],
    );
    driver.finish_ok(WAIT).await;

    for client in [&a2, &a3] {
        client
            .wait_for(WAIT, "the ride status and every location", |_| {
                about(client, "rideStatus", &ride).len() == 1
                    && about(client, "location", &ride).len() == UPDATES
            })
            .await;
        let status = &about(client, "rideStatus", &ride)[0];
        assert_eq!(status["status"], "accepted");
        assert_eq!(status["driver"], "bob");
        assert_eq!(
            status["instance"], "i1",
            "emitted by the instance that took the accept"
        );
        for (n, location) in about(client, "location", &ride).iter().enumerate() {
            assert_eq!(location["driver"], "bob");
            assert_eq!(location["instance"], "i1");
            let lat = location["lat"].as_f64().expect("lat");
            assert!(
                (lat - (48.85 + n as f64 * 0.001)).abs() < 1e-9,
                "in order: {location}"
            );
        }
    }

    // A marker for carol's ride, published by instance 1 after everything above: once carol
    // hears it, anything of alice's ride that leaked to her would already have arrived.
    let mut dave = Agent::new();
    dave.login(&i1.base(), "dave", "driver").await;
    dave.accept(&i1.base(), &other_ride).await;
    c3.wait_for(WAIT, "the rideStatus of carol's own ride", |_| {
        about(&c3, "rideStatus", &other_ride).len() == 1
    })
    .await;
    assert_eq!(
        c3.events("location"),
        Vec::<Value>::new(),
        "{}",
        c3.transcript()
    );
    assert_eq!(c3.events("rideStatus").len(), 1, "{}", c3.transcript());
    for client in [&a2, &a3] {
        assert!(about(client, "rideStatus", &other_ride).is_empty());
    }

    for client in [&mut a2, &mut a3, &mut c3] {
        client.finish_ok(EXIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sockets_need_a_session_and_rooms_need_a_part_in_the_ride() {
    let redis = RedisServer::start();
    let app = Rideshare::start("i1", Some(&redis)).await;

    // No login: the connection is refused with the server's message, verbatim.
    let mut anonymous = SioClient::spawn(
        "anonymous",
        &["--url", &app.base(), "--no-login", "--timeout", "10"],
    );
    let (code, summary) = anonymous.finish(EXIT).await;
    assert_eq!(code, Some(1), "{}", anonymous.transcript());
    assert_eq!(summary["ok"], false);
    let refused = anonymous.of_type("connect_error");
    assert!(
        refused[0]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("not logged in")),
        "{}",
        anonymous.transcript()
    );

    // A forged cookie is no better.
    let mut forged = SioClient::spawn(
        "forged",
        &[
            "--url",
            &app.base(),
            "--no-login",
            "--cookie",
            "rs.sid=s:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.AAAA",
            "--transports",
            "polling",
            "--timeout",
            "10",
        ],
    );
    assert_eq!(
        forged.finish(EXIT).await.0,
        Some(1),
        "{}",
        forged.transcript()
    );
    assert_eq!(
        forged.of_type("connect_error").len(),
        1,
        "{}",
        forged.transcript()
    );

    // Logged in, but not part of the ride: joinRide and locationUpdate are refused.
    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;
    let ride = alice.request_ride(&app.base(), "a", "b").await;
    let mut carol = SioClient::spawn(
        "carol",
        &[
            "--url",
            &app.base(),
            "--name",
            "carol",
            "--role",
            "rider",
            "--stdin",
            "--timeout",
            "30",
        ],
    );
    carol
        .wait_for(WAIT, "connected", |l| {
            l.iter().any(|l| l["type"] == "connected")
        })
        .await;
    carol.send(&format!("join {ride}"));
    let ack = carol.wait_ack(WAIT, "joinRide", 1).await;
    assert_eq!(ack["ok"], false);
    assert_eq!(
        ack["data"]["error"],
        "only the ride's rider or driver can join it"
    );
    carol.send(&format!("location {ride} 1 1"));
    let ack = carol.wait_ack(WAIT, "locationUpdate", 1).await;
    assert_eq!(
        ack["data"]["error"],
        "only the ride's driver can send its location"
    );
    carol.send("join not-a-ride");
    assert_eq!(
        carol.wait_ack(WAIT, "joinRide", 2).await["data"]["error"],
        "ride not found"
    );
    carol.send("emit joinRide 42");
    assert_eq!(carol.wait_ack(WAIT, "joinRide", 3).await["ok"], false);
    carol.finish_ok(EXIT).await;

    // The rider may join but not drive; a driver of another ride may not send locations.
    let mut bob = Agent::new();
    bob.login(&app.base(), "bob", "driver").await;
    bob.accept(&app.base(), &ride).await;
    let mut rider = SioClient::spawn(
        "alice",
        &[
            "--url",
            &app.base(),
            "--name",
            "alice",
            "--role",
            "rider",
            "--join",
            &ride,
            "--stdin",
            "--timeout",
            "30",
        ],
    );
    rider
        .wait_for(WAIT, "joined", |l| has_ack(l, "joinRide", true))
        .await;
    rider.send(&format!("location {ride} 1 1"));
    assert_eq!(rider.wait_ack(WAIT, "locationUpdate", 1).await["ok"], false);
    let mut dave = SioClient::spawn(
        "dave",
        &[
            "--url",
            &app.base(),
            "--name",
            "dave",
            "--role",
            "driver",
            "--stdin",
            "--timeout",
            "30",
        ],
    );
    dave.wait_for(WAIT, "connected", |l| {
        l.iter().any(|l| l["type"] == "connected")
    })
    .await;
    dave.send(&format!("location {ride} 1 1"));
    assert_eq!(dave.wait_ack(WAIT, "locationUpdate", 1).await["ok"], false);
    dave.send(&format!("join {ride}"));
    assert_eq!(dave.wait_ack(WAIT, "joinRide", 1).await["ok"], false);
    dave.finish_ok(EXIT).await;
    rider.finish_ok(EXIT).await;
    assert!(
        rider.events("location").is_empty(),
        "{}",
        rider.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broadcasts_work_again_after_a_redis_restart_without_restarting_rideshare() {
    let mut redis = RedisServer::start();
    let i1 = Rideshare::start("i1", Some(&redis)).await;
    let i2 = Rideshare::start("i2", Some(&redis)).await;

    // A ride in progress: rider on instance 2, driver on instance 1.
    let mut alice = Agent::new();
    alice.login(&i2.base(), "alice", "rider").await;
    let ride = alice.request_ride(&i2.base(), "a", "b").await;
    let mut bob = Agent::new();
    bob.login(&i1.base(), "bob", "driver").await;
    bob.accept(&i1.base(), &ride).await;
    let mut rider = rider("alice@i2", &i2, "alice", &ride, "websocket");
    let mut driver = SioClient::spawn(
        "bob@i1",
        &[
            "--url",
            &i1.base(),
            "--name",
            "bob",
            "--role",
            "driver",
            "--join",
            &ride,
            "--stdin",
            "--timeout",
            "90",
        ],
    );
    rider
        .wait_for(WAIT, "joined", |l| has_ack(l, "joinRide", true))
        .await;
    driver
        .wait_for(WAIT, "joined", |l| has_ack(l, "joinRide", true))
        .await;
    driver.send(&format!("location {ride} 10 10"));
    rider
        .wait_for(WAIT, "a location before the restart", |_| {
            !about(&rider, "location", &ride).is_empty()
        })
        .await;

    // Redis restarts empty (the test server keeps no data): sessions and rides are gone, the
    // sockets stay connected to rideshare, and no rideshare instance is restarted.
    redis.restart();

    // Once Redis answers again: a new session and ride over HTTP (the store reconnected)...
    let deadline = std::time::Instant::now() + WAIT;
    let (mut alice, mut bob) = (Agent::new(), Agent::new());
    loop {
        let a = alice
            .post(
                &i2.url("/login"),
                Some(::rideshare::serde_json::json!({ "name": "alice", "role": "rider" })),
            )
            .await;
        if a.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "login after restart: {a:?}"
        );
        pause().await;
    }
    let new_ride = alice.request_ride(&i2.base(), "c", "d").await;
    bob.login(&i1.base(), "bob", "driver").await;
    bob.accept(&i1.base(), &new_ride).await;
    rider.send(&format!("join {new_ride}"));
    assert_eq!(rider.wait_ack(WAIT, "joinRide", 2).await["ok"], true);
    driver.send(&format!("join {new_ride}"));
    assert_eq!(driver.wait_ack(WAIT, "joinRide", 2).await["ok"], true);

    // ...and the driver's updates on instance 1 reach the rider on instance 2 again: the
    // pub/sub driver resubscribed by itself. Keep sending until one arrives (the subscriptions
    // come back within the reconnect backoff), then check a few more arrive in order.
    let deadline = std::time::Instant::now() + WAIT;
    let mut sent = 0;
    while about(&rider, "location", &new_ride).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no location crossed instances {WAIT:?} after the Redis restart\n{}\n{}",
            rider.transcript(),
            driver.transcript()
        );
        sent += 1;
        driver.send(&format!("location {new_ride} 20 {sent}"));
        driver.wait_ack(WAIT, "locationUpdate", sent + 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 1..=3 {
        driver.send(&format!("location {new_ride} 30 {n}"));
    }
    rider
        .wait_for(WAIT, "three more locations after recovery", |_| {
            about(&rider, "location", &new_ride)
                .iter()
                .filter(|l| l["lat"] == 30.0)
                .count()
                == 3
        })
        .await;
    for l in about(&rider, "location", &new_ride) {
        assert_eq!(l["instance"], "i1", "emitted on instance 1: {l}");
    }
    // The sockets never dropped: nothing was restarted or reconnected.
    assert!(
        rider.of_type("disconnect").is_empty(),
        "{}",
        rider.transcript()
    );
    assert!(
        driver.of_type("disconnect").is_empty(),
        "{}",
        driver.transcript()
    );
    assert!(i1.is_running() && i2.is_running());
    rider.finish_ok(EXIT).await;
    driver.finish_ok(EXIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_mode_broadcasts_within_the_instance() {
    let app = Rideshare::start("solo", None).await;
    let mut alice = Agent::new();
    alice.login(&app.base(), "alice", "rider").await;
    let ride = alice.request_ride(&app.base(), "a", "b").await;
    let mut rider = rider("alice", &app, "alice", &ride, "polling,websocket");
    rider
        .wait_for(WAIT, "joined", |l| has_ack(l, "joinRide", true))
        .await;
    let mut driver = SioClient::spawn(
        "bob",
        &[
            "--url",
            &app.base(),
            "--name",
            "bob",
            "--role",
            "driver",
            "--accept",
            &ride,
            "--join",
            &ride,
            "--send-locations",
            "2",
            "--expect-event",
            "location=2",
            "--timeout",
            "30",
        ],
    );
    let summary = driver.finish_ok(WAIT).await;
    assert_eq!(
        summary["received"]["location"], 2,
        "the driver hears itself"
    );
    rider
        .wait_for(WAIT, "status and two locations", |_| {
            about(&rider, "rideStatus", &ride).len() == 1
                && about(&rider, "location", &ride).len() == 2
        })
        .await;
    rider.finish_ok(EXIT).await;
}
