//! Socket.IO: sockets authenticated by the session cookie, one room per ride (`ride:<id>`) and
//! one for the map of cars around you (`drivers`), driver locations and ride status changes
//! broadcast to their room on every instance (through the Redis adapter; locally in embedded
//! mode).
//!
//! Events (client -> server, answered through the ack if the client asks for one; a refusal is
//! `{"ok": false, "error"}`):
//! - `joinRide {"rideId"}`: the ride's rider or driver joins its room;
//!   ack `{"ok": true, "ride": {...}, "instance"}`.
//! - `locationUpdate {"rideId", "lat", "lng"}` (the ride's driver): the room hears
//!   `location {"rideId", "lat", "lng", "driver", "instance"}`.
//! - `watchDrivers` (any data or none; any user): joins the room `drivers`;
//!   ack `{"ok": true, "instance"}`.
//! - `driverPosition {"lat", "lng"}` (any driver, no ride needed): the room `drivers` hears
//!   `driverPosition {"driver", "lat", "lng", "instance"}`, the sender too if it watches;
//!   ack `{"ok": true, "instance"}` after the broadcast.
//!
//! Server -> client: `hello {"name", "role", "instance"}` after connecting, `location`,
//! `driverPosition`, and `rideStatus {"rideId", "status", "driver", "rider", "instance"}` (sent
//! by the HTTP handlers).
//!
//! Owns the socket handlers and the type-erased emitter the HTTP side uses; the pub/sub driver
//! is in `pubsub`.

use std::future::Future;
use std::pin::Pin;

use serde::Deserialize;
use serde_json::json;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, Extension, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler as _;

use crate::api::{Role, User, is_party};
use crate::rides::{Ride, RideStatus, Rides, check_coords};
use crate::session::{SessionData, Sessions};

/// What the socket handlers need (a Socket.IO state: see `SocketIoBuilder::with_state`).
#[derive(Clone)]
pub struct Realtime {
    pub id: String,
    pub sessions: Sessions,
    pub rides: Rides,
}

/// The room of the sockets that watch every driver's position (`watchDrivers`): one room for
/// everybody, so one `driverPosition` is one broadcast whatever the number of watchers.
pub const DRIVERS_ROOM: &str = "drivers";

/// The room of a ride.
pub fn room(ride_id: &str) -> String {
    format!("ride:{ride_id}")
}

/// The `rideStatus` message for a ride.
pub fn status_message(ride: &Ride, instance: &str) -> serde_json::Value {
    json!({
        "rideId": ride.id,
        "status": ride.status,
        "driver": ride.driver,
        "rider": ride.rider,
        "instance": instance,
    })
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Room broadcasts and shutdown, whatever the adapter (so the HTTP side is not generic).
pub trait RoomEmitter: Send + Sync {
    /// Emits `event` with `data` to every socket in `room`, on every instance.
    fn emit(
        &self,
        room: String,
        event: &'static str,
        data: serde_json::Value,
    ) -> BoxFuture<'_, Result<(), String>>;
    /// Disconnects every socket of this instance.
    fn close(&self) -> BoxFuture<'_, ()>;
}

impl<A: Adapter> RoomEmitter for SocketIo<A> {
    fn emit(
        &self,
        room: String,
        event: &'static str,
        data: serde_json::Value,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.to(room)
                .emit(event, &data)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(SocketIo::close(self))
    }
}

/// Registers the handlers of namespace `/` on a Socket.IO instance with the default (local)
/// adapter.
pub fn register_local(io: &SocketIo) {
    io.ns("/", on_connect.with(authenticate));
}

/// [`register_local`] for the Redis adapter; subscribes to the adapter's channels.
pub async fn register_redis(io: &SocketIo<crate::RedisAdapter>) -> anyhow::Result<()> {
    io.ns("/", on_connect.with(authenticate))
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to the Socket.IO channels in Redis: {e}"))
}

/// Why a socket was refused (sent to the client as the `connect_error` message).
#[derive(Debug, thiserror::Error)]
enum AuthError {
    #[error("not logged in: POST /login first, then connect with the rs.sid cookie")]
    NotLoggedIn,
    #[error("session store unavailable, try again")]
    Unavailable,
}

/// Connect middleware: the handshake request must carry a valid session cookie of a logged-in
/// user, who is then kept in the socket's extensions.
async fn authenticate<A: Adapter>(
    socket: SocketRef<A>,
    State(rt): State<Realtime>,
) -> Result<(), AuthError> {
    match rt.sessions.load(&socket.req_parts().headers).await {
        Ok(Some(SessionData {
            user: Some(user), ..
        })) => {
            socket.extensions.insert(user);
            register_events(&socket);
            Ok(())
        }
        Ok(_) => Err(AuthError::NotLoggedIn),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a socket's session");
            Err(AuthError::Unavailable)
        }
    }
}

/// The event handlers of an authenticated socket (its user is in the extensions).
///
/// Called from [`authenticate`], not from [`on_connect`]: socketioxide 0.18 sends the CONNECT
/// packet after the middleware and only then calls the connect handler, an async one in a task
/// of its own (`tokio::spawn`), so a client that emits as soon as it reads CONNECT could find no
/// handler yet, and socketioxide drops an event without a handler silently. A refused socket
/// never gets here (and is discarded anyway).
fn register_events<A: Adapter>(socket: &SocketRef<A>) {
    socket.on("joinRide", join_ride);
    socket.on("locationUpdate", location_update);
    socket.on("watchDrivers", watch_drivers);
    socket.on("driverPosition", driver_position);
}

/// Greets a connected socket; its event handlers are already there (see [`register_events`]).
async fn on_connect<A: Adapter>(
    socket: SocketRef<A>,
    Extension(user): Extension<User>,
    State(rt): State<Realtime>,
) {
    tracing::debug!(sid = %socket.id, user = %user.name, "socket connected");
    let hello = json!({ "name": user.name, "role": user.role, "instance": rt.id });
    if let Err(e) = socket.emit("hello", &hello) {
        tracing::debug!(error = %e, "cannot greet socket");
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JoinRide {
    ride_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocationUpdate {
    ride_id: String,
    lat: f64,
    lng: f64,
}

#[derive(Deserialize)]
struct DriverPosition {
    lat: f64,
    lng: f64,
}

fn nack(ack: AckSender<impl Adapter>, error: &str) {
    // A client that asked for no ack gets nothing; send() is then a no-op.
    let _ = ack.send(&json!({ "ok": false, "error": error }));
}

/// The ride a socket event names, or the error its ack carries.
async fn load_ride(rt: &Realtime, id: &str) -> Result<Ride, &'static str> {
    match rt.rides.get(id).await {
        Ok(Some(ride)) => Ok(ride),
        Ok(None) => Err("ride not found"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read ride");
            Err("store unavailable, try again")
        }
    }
}

async fn join_ride<A: Adapter>(
    socket: SocketRef<A>,
    Extension(user): Extension<User>,
    State(rt): State<Realtime>,
    TryData(req): TryData<JoinRide>,
    ack: AckSender<A>,
) {
    let Ok(req) = req else {
        return nack(ack, "expected {\"rideId\": \"...\"}");
    };
    let ride = match load_ride(&rt, &req.ride_id).await {
        Ok(ride) => ride,
        Err(why) => return nack(ack, why),
    };
    if !is_party(&ride, &user) {
        return nack(ack, "only the ride's rider or driver can join it");
    }
    socket.join(room(&ride.id));
    tracing::debug!(sid = %socket.id, ride = %ride.id, user = %user.name, "joined ride");
    let _ = ack.send(&json!({ "ok": true, "ride": ride, "instance": rt.id }));
}

async fn location_update<A: Adapter>(
    socket: SocketRef<A>,
    Extension(user): Extension<User>,
    State(rt): State<Realtime>,
    TryData(req): TryData<LocationUpdate>,
    ack: AckSender<A>,
) {
    let Ok(req) = req else {
        return nack(
            ack,
            "expected {\"rideId\": \"...\", \"lat\": number, \"lng\": number}",
        );
    };
    if let Err(e) = check_coords(req.lat, req.lng) {
        return nack(ack, &e);
    }
    let ride = match load_ride(&rt, &req.ride_id).await {
        Ok(ride) => ride,
        Err(why) => return nack(ack, why),
    };
    if user.role != Role::Driver || ride.driver.as_deref() != Some(user.name.as_str()) {
        return nack(ack, "only the ride's driver can send its location");
    }
    if ride.status != RideStatus::Accepted {
        return nack(ack, "the ride is not in progress");
    }
    let message = json!({
        "rideId": ride.id,
        "lat": req.lat,
        "lng": req.lng,
        "driver": user.name,
        "instance": rt.id,
    });
    // The driver sees its own position as the room does.
    broadcast(&socket, room(&ride.id), "location", &message, ack, &rt.id).await;
}

/// Emits `event` to `room` on every instance, this socket included (`within`), then acks
/// `{"ok": true, "instance"}`, or says the broadcast failed.
async fn broadcast<A: Adapter>(
    socket: &SocketRef<A>,
    room: String,
    event: &'static str,
    message: &serde_json::Value,
    ack: AckSender<A>,
    instance: &str,
) {
    match socket.within(room.clone()).emit(event, message).await {
        Ok(()) => {
            let _ = ack.send(&json!({ "ok": true, "instance": instance }));
        }
        Err(e) => {
            tracing::warn!(error = %e, %room, event, "broadcast failed");
            nack(ack, "broadcast failed (is Redis down?), try again");
        }
    }
}

/// Joins [`DRIVERS_ROOM`]. Whatever data came with the event is ignored.
async fn watch_drivers<A: Adapter>(
    socket: SocketRef<A>,
    State(rt): State<Realtime>,
    ack: AckSender<A>,
) {
    socket.join(DRIVERS_ROOM);
    tracing::debug!(sid = %socket.id, "watching drivers");
    let _ = ack.send(&json!({ "ok": true, "instance": rt.id }));
}

/// Broadcasts a driver's position to [`DRIVERS_ROOM`]. No store access: the user comes from the
/// socket's extensions, so the cost is one publish to Redis (each instance then emits to its own
/// watchers).
async fn driver_position<A: Adapter>(
    socket: SocketRef<A>,
    Extension(user): Extension<User>,
    State(rt): State<Realtime>,
    TryData(req): TryData<DriverPosition>,
    ack: AckSender<A>,
) {
    if user.role != Role::Driver {
        return nack(ack, "only drivers send their position");
    }
    let Ok(req) = req else {
        return nack(ack, "expected {\"lat\": number, \"lng\": number}");
    };
    if let Err(e) = check_coords(req.lat, req.lng) {
        return nack(ack, &e);
    }
    let message = json!({
        "driver": user.name,
        "lat": req.lat,
        "lng": req.lng,
        "instance": rt.id,
    });
    // The sender hears it too if it watches.
    let room = DRIVERS_ROOM.to_string();
    broadcast(&socket, room, "driverPosition", &message, ack, &rt.id).await;
}
