//! rideshare's real-time side with a real Socket.IO client (python-socketio, driven as a child
//! process: tests/clients/sio_client.py): cookie-authenticated sockets, rooms per ride,
//! broadcasts across instances through Redis, and recovery after a Redis restart.

mod support;

use std::time::Duration;

use ::rideshare::serde_json::{self, Value};
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

/// A `--stdin` client logged in as `name`/`role` on `app`; with `watch`, it sends
/// `watchDrivers` after connecting.
fn map_user(
    label: &str,
    app: &Rideshare,
    name: &str,
    role: &str,
    transports: &str,
    watch: bool,
) -> SioClient {
    let base = app.base();
    let mut args = vec![
        "--url",
        &base,
        "--name",
        name,
        "--role",
        role,
        "--transports",
        transports,
        "--stdin",
        "--timeout",
        "60",
    ];
    if watch {
        args.push("--watch-drivers");
    }
    SioClient::spawn(label, &args)
}

/// The `driverPosition` events of `driver` the client received, in order.
fn positions_of(client: &SioClient, driver: &str) -> Vec<Value> {
    client
        .events("driverPosition")
        .into_iter()
        .filter(|d| d["driver"] == driver)
        .collect()
}

fn is_at(position: &Value, lat: f64, lng: f64) -> bool {
    let near = |v: &Value, x: f64| v.as_f64().is_some_and(|v| (v - x).abs() < 1e-9);
    near(&position["lat"], lat) && near(&position["lng"], lng)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_watcher_hears_every_driver_position_on_every_instance_and_no_one_else_does() {
    let redis = RedisServer::start();
    let i1 = Rideshare::start("i1", Some(&redis)).await;
    let i2 = Rideshare::start("i2", Some(&redis)).await;
    let i3 = Rideshare::start("i3", Some(&redis)).await;

    // Watchers on instances 1 (a rider, WebSocket) and 2 (a driver who sends nothing,
    // long-polling only); a rider on instance 2 who does not watch; the driver who sends, on
    // instance 3, does not watch either.
    let mut erin = map_user("erin@i1", &i1, "erin", "rider", "websocket", true);
    let mut frank = map_user("frank@i2", &i2, "frank", "driver", "polling", true);
    let mut gina = map_user("gina@i2", &i2, "gina", "rider", "polling,websocket", false);
    let mut bob = map_user("bob@i3", &i3, "bob", "driver", "websocket", false);
    for (client, instance) in [(&erin, "i1"), (&frank, "i2")] {
        let ack = client.wait_ack(WAIT, "watchDrivers", 1).await;
        assert_eq!(ack["ok"], true, "{}", client.transcript());
        assert_eq!(ack["data"]["instance"], instance, "{}", client.transcript());
    }
    assert_eq!(
        frank.of_type("connected")[0]["transport"],
        "polling",
        "{}",
        frank.transcript()
    );
    for client in [&gina, &bob] {
        client
            .wait_for(WAIT, "connected", |l| {
                l.iter().any(|l| l["type"] == "connected")
            })
            .await;
    }

    // Each position is acknowledged after its broadcast and reaches both watchers before the
    // next is sent (the client prints events from several threads, so order is checked this
    // way rather than from two messages in flight at once).
    const POSITIONS: usize = 3;
    let at = |n: usize| (48.86 + n as f64 * 0.001, 2.34 + n as f64 * 0.001);
    for n in 0..POSITIONS {
        let (lat, lng) = at(n);
        bob.send(&format!("position {lat} {lng}"));
        let ack = bob.wait_ack(WAIT, "driverPosition", n + 1).await;
        assert_eq!(ack["ok"], true, "{}", bob.transcript());
        assert_eq!(ack["data"]["instance"], "i3");
        for client in [&erin, &frank] {
            client
                .wait_for(WAIT, &format!("driverPosition #{}", n + 1), |_| {
                    positions_of(client, "bob").len() == n + 1
                })
                .await;
            let position = &positions_of(client, "bob")[n];
            assert!(is_at(position, lat, lng), "in order: {position}");
            assert_eq!(
                position["instance"], "i3",
                "emitted by the sender's instance"
            );
        }
    }

    // A rider may watch but not send: refused, and broadcast to no one.
    erin.send("position 1 1");
    let ack = erin.wait_ack(WAIT, "driverPosition", 1).await;
    assert_eq!(ack["ok"], false, "{}", erin.transcript());
    assert_eq!(ack["data"]["error"], "only drivers send their position");

    // A marker from bob, sent after everything above and once gina watches too. When all three
    // watchers have it, anything broadcast before it has reached them too: an instance emits to
    // its own sockets and publishes to Redis before it acks, and Redis delivers to each
    // subscriber in the order it received the publishes.
    gina.send("watch");
    let ack = gina.wait_ack(WAIT, "watchDrivers", 1).await;
    assert_eq!(ack["data"]["instance"], "i2", "{}", gina.transcript());
    bob.send("position 10 20");
    assert_eq!(
        bob.wait_ack(WAIT, "driverPosition", POSITIONS + 1).await["ok"],
        true
    );
    for client in [&erin, &frank, &gina] {
        client
            .wait_for(WAIT, "the marker", |_| {
                positions_of(client, "bob")
                    .iter()
                    .any(|p| is_at(p, 10.0, 20.0))
            })
            .await;
    }

    // Exited clients have printed everything they received.
    for client in [&mut erin, &mut frank, &mut gina, &mut bob] {
        client.finish_ok(EXIT).await;
    }
    for client in [&erin, &frank] {
        let all = client.events("driverPosition");
        assert_eq!(all.len(), POSITIONS + 1, "{}", client.transcript());
        assert_eq!(positions_of(client, "bob").len(), POSITIONS + 1);
    }
    assert_eq!(
        gina.events("driverPosition").len(),
        1,
        "only the marker, sent after gina watched\n{}",
        gina.transcript()
    );
    assert!(
        bob.events("driverPosition").is_empty(),
        "the sender does not watch\n{}",
        bob.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watching_driver_hears_itself_and_bad_positions_are_refused() {
    let app = Rideshare::start("solo", None).await;
    let mut bob = map_user("bob", &app, "bob", "driver", "polling,websocket", false);
    let mut alice = map_user("alice", &app, "alice", "rider", "websocket", true);
    assert_eq!(alice.wait_ack(WAIT, "watchDrivers", 1).await["ok"], true);

    // watchDrivers takes any data, or none, as often as it comes.
    bob.send("emit watchDrivers 42");
    let ack = bob.wait_ack(WAIT, "watchDrivers", 1).await;
    assert_eq!(ack["ok"], true, "{}", bob.transcript());
    assert_eq!(ack["data"]["instance"], "solo");
    bob.send("watch");
    assert_eq!(bob.wait_ack(WAIT, "watchDrivers", 2).await["ok"], true);

    // Bad positions: refused with the reason, broadcast to no one (the sender included).
    let bad = [
        ("position 91 0", "lat must be between -90 and 90, got 91"),
        (
            "position 0 -180.5",
            "lng must be between -180 and 180, got -180.5",
        ),
        (
            r#"emit driverPosition '{"lat": 1}'"#,
            r#"expected {"lat": number, "lng": number}"#,
        ),
        (
            "emit driverPosition",
            r#"expected {"lat": number, "lng": number}"#,
        ),
    ];
    for (n, (command, error)) in bad.iter().enumerate() {
        bob.send(command);
        let ack = bob.wait_ack(WAIT, "driverPosition", n + 1).await;
        assert_eq!(ack["ok"], false, "{command}: {}", bob.transcript());
        assert_eq!(ack["data"]["error"], *error, "{command}");
    }
    // A rider is refused as a rider, whatever it sends.
    alice.send("emit driverPosition 42");
    assert_eq!(
        alice.wait_ack(WAIT, "driverPosition", 1).await["data"]["error"],
        "only drivers send their position"
    );

    // A good one: both watchers hear it, the driver too since it watches.
    bob.send("position 48.9 2.3");
    let ack = bob.wait_ack(WAIT, "driverPosition", bad.len() + 1).await;
    assert_eq!(ack["ok"], true, "{}", bob.transcript());
    for client in [&alice, &bob] {
        client
            .wait_for(WAIT, "bob's position", |_| {
                !client.events("driverPosition").is_empty()
            })
            .await;
    }
    for client in [&mut alice, &mut bob] {
        client.finish_ok(EXIT).await;
    }
    for client in [&alice, &bob] {
        let all = client.events("driverPosition");
        assert_eq!(all.len(), 1, "{}", client.transcript());
        assert_eq!(all[0]["driver"], "bob");
        assert_eq!(all[0]["instance"], "solo");
        assert!(is_at(&all[0], 48.9, 2.3), "{}", all[0]);
    }
}

// ---------------------------------------------------------------------------------------------
// A first event emitted the moment the socket connects
// ---------------------------------------------------------------------------------------------

/// How many raw clients connect at once in
/// [`an_event_emitted_the_moment_the_socket_connects_is_answered`].
const RACING_CLIENTS: usize = 400;

/// One raw Engine.IO v4 / Socket.IO v5 client over WebSocket, logged in with `cookie`: sends
/// `40` on the Engine.IO open packet and `420["watchDrivers"]` in the same breath as it reads
/// the namespace CONNECT (`40{"sid":...}`), then waits for the ack `430[{"ok":true,...}]` until
/// `deadline`. Returns the ack's data, or the frames it saw (for the panic message).
async fn watch_drivers_on_connect(
    url: String,
    cookie: String,
    deadline: tokio::time::Instant,
) -> Result<Value, String> {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let mut seen: Vec<String> = Vec::new();
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let cookie = format!("{}={cookie}", support::rideshare::COOKIE)
        .parse()
        .map_err(|e| format!("cookie header: {e}"))?;
    req.headers_mut().insert("cookie", cookie);
    let (mut ws, _) = tokio::time::timeout_at(deadline, tokio_tungstenite::connect_async(req))
        .await
        .map_err(|_| "websocket handshake: deadline passed".to_owned())?
        .map_err(|e| format!("websocket handshake: {e}"))?;
    let result = loop {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => break Err("no ack before the deadline: the event was dropped".to_owned()),
            Ok(None) => break Err("websocket closed".to_owned()),
            Ok(Some(Err(e))) => break Err(format!("websocket error: {e}")),
            Ok(Some(Ok(Message::Text(text)))) => text.as_str().to_owned(),
            Ok(Some(Ok(_))) => continue,
        };
        seen.push(frame.clone());
        let reply = if frame.starts_with('0') {
            // Engine.IO open: connect to namespace `/`.
            "40"
        } else if frame == "2" {
            "3"
        } else if frame.starts_with("40") {
            // The namespace CONNECT: emit right away, before anything else can happen.
            r#"420["watchDrivers"]"#
        } else if frame.starts_with("44") {
            break Err("connect_error".to_owned());
        } else if let Some(ack) = frame.strip_prefix("430") {
            break serde_json::from_str::<Value>(ack)
                .map_err(|e| format!("ack is not JSON: {e}"))
                .map(|mut data| data[0].take());
        } else {
            // `hello` and anything else.
            continue;
        };
        if let Err(e) = ws.send(Message::text(reply)).await {
            break Err(format!("sending {reply}: {e}"));
        }
    };
    let _ = ws.close(None).await;
    result.map_err(|why| format!("{why}; frames received: {seen:?}"))
}

/// Regression test for a race in socketioxide 0.18 (found by a benchmark, ~1 in 2,000 clients):
/// the server sends the namespace CONNECT packet before it runs the connect handler, and runs
/// an async handler in a task of its own (`tokio::spawn`). A client that emits the moment it
/// reads CONNECT (as socket.io-client does with events buffered while connecting) could reach a
/// socket with no event handlers yet, and the event was dropped without a word: no ack, ever.
/// The handlers are now registered in the connect middleware, before CONNECT leaves.
///
/// Many raw clients connect at once and each emits `watchDrivers` right on CONNECT: every one
/// must get its ack. The load and the 8 workers (more threads than cores on a small machine, so
/// the OS preempts them between CONNECT and the handler task) widen the window: before the fix,
/// 1 to 11 of the 400 clients lost their event in every run of six on a 2-core machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn an_event_emitted_the_moment_the_socket_connects_is_answered() {
    let redis = RedisServer::start();
    let app = Rideshare::start("i1", Some(&redis)).await;
    let mut cookies = Vec::with_capacity(RACING_CLIENTS);
    for n in 0..RACING_CLIENTS {
        let mut agent = Agent::new();
        agent
            .login(&app.base(), &format!("watcher{n}"), "rider")
            .await;
        cookies.push(agent.cookie.expect("login sets the session cookie"));
    }

    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", app.addr());
    let deadline = tokio::time::Instant::now() + WAIT;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(RACING_CLIENTS));
    let mut clients = tokio::task::JoinSet::new();
    for (n, cookie) in cookies.into_iter().enumerate() {
        let (url, start) = (url.clone(), start.clone());
        clients.spawn(async move {
            start.wait().await;
            (n, watch_drivers_on_connect(url, cookie, deadline).await)
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = clients.join_next().await {
        let (n, result) = joined.expect("a client task panicked");
        match result {
            Ok(ack) if ack["ok"] == true && ack["instance"] == "i1" => {}
            Ok(ack) => failures.push(format!("client {n}: unexpected ack {ack}")),
            Err(why) => failures.push(format!("client {n}: {why}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {RACING_CLIENTS} clients got no ack for the event emitted on CONNECT:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
