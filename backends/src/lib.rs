//! rideshare: the demo app behind tether. Riders and drivers log in, a rider requests a ride, a
//! driver accepts it and streams its location; every instance sharing a Redis serves every
//! session and ride, and Socket.IO broadcasts reach a ride's room on every instance.
//!
//! Crate map:
//! - `api`: the HTTP routes (JSON), errors as `{"error": ...}`;
//! - `session`: signed-cookie sessions in the store (express-session + connect-redis style);
//! - `rides`: the ride model and its storage;
//! - `store`: Redis (ConnectionManager, RESP3) or an in-process map;
//! - `realtime`: Socket.IO handlers, rooms and broadcasts;
//! - `pubsub`: the socketioxide-redis driver that survives Redis restarts.
//!
//! Entry point: [`serve`] with a [`Config`]. Every response carries `x-backend-id: <id>`.

pub mod api;
pub mod pubsub;
pub mod realtime;
pub mod rides;
pub mod session;
pub mod store;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use socketioxide::SocketIo;
use socketioxide::adapter::{Adapter, Emitter};
use socketioxide::layer::SocketIoLayer;
use socketioxide_redis::{CustomRedisAdapter, RedisAdapterConfig, RedisAdapterCtr};

use crate::pubsub::ManagedDriver;
use crate::realtime::{Realtime, RoomEmitter};
use crate::rides::Rides;
use crate::session::Sessions;
use crate::store::Store;

// Tether's integration tests read this crate's JSON answers and have no serde_json of their own.
#[doc(hidden)]
pub use serde_json;

/// The header naming the instance that served a response.
pub const BACKEND_ID_HEADER: &str = "x-backend-id";

/// Default session lifetime without activity (rolling).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default ride lifetime in the store.
pub const DEFAULT_RIDE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default time given to open connections to finish after the shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the pub/sub connection is pinged (so it reconnects while idle).
const PUBSUB_KEEPALIVE: Duration = Duration::from_secs(1);
/// Bound on closing the Socket.IO side at shutdown (it unsubscribes in Redis).
const SOCKETS_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The Socket.IO adapter used with Redis: socketioxide-redis on our resilient driver.
pub type RedisAdapter = CustomRedisAdapter<Emitter, ManagedDriver>;

/// How an instance runs.
#[derive(Clone)]
pub struct Config {
    /// This instance's name, sent in `x-backend-id` and in Socket.IO messages.
    pub id: String,
    /// Redis shared by the instances (`redis://…` or `redis+unix:///…`; this build has no TLS); RESP3 is
    /// used whatever the URL says. `None`: embedded mode (in-process sessions, rides and
    /// broadcasts; one instance only).
    pub redis_url: Option<String>,
    /// Key that signs session cookies. Instances must share it to read each other's cookies.
    pub session_secret: Vec<u8>,
    /// Session lifetime without activity; every request that reads the session renews it.
    pub session_ttl: Duration,
    /// How long a ride stays in the store after it was requested.
    pub ride_ttl: Duration,
    /// Adds `Secure` to the session cookie (set it when clients reach the app over HTTPS).
    pub cookie_secure: bool,
    /// How long open connections may take to finish after the shutdown signal.
    pub shutdown_grace: Duration,
}

impl Config {
    /// Embedded mode with defaults and a random session secret (see [`random_secret`]).
    pub fn new(id: impl Into<String>) -> Self {
        Config {
            id: id.into(),
            redis_url: None,
            session_secret: random_secret(),
            session_ttl: DEFAULT_SESSION_TTL,
            ride_ttl: DEFAULT_RIDE_TTL,
            cookie_secure: false,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// Uses Redis at `url`.
    pub fn with_redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// Signs cookies with `secret`.
    pub fn with_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.session_secret = secret.into();
        self
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.id.is_empty() && HeaderValue::from_str(&self.id).is_ok(),
            "instance id {:?} must be non-empty and printable ASCII (it is sent as a header)",
            self.id
        );
        anyhow::ensure!(
            !self.session_secret.is_empty(),
            "session secret is empty: give one, or leave it random"
        );
        anyhow::ensure!(
            !self.session_ttl.is_zero(),
            "session TTL must be above zero"
        );
        anyhow::ensure!(!self.ride_ttl.is_zero(), "ride TTL must be above zero");
        Ok(())
    }
}

/// 32 random bytes: a session secret that no other process shares (so other instances cannot
/// read this one's cookies).
pub fn random_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    getrandom::fill(&mut secret).expect("the OS random source is available");
    secret
}

/// Shared by the HTTP handlers.
pub struct App {
    /// The instance id.
    pub id: String,
    pub rides: Rides,
    emitter: Box<dyn RoomEmitter>,
}

impl App {
    /// Tells the ride's room about its new status. A failed broadcast is logged, not returned:
    /// the change itself is stored and `GET /rides/{id}` shows it.
    pub async fn broadcast_status(&self, ride: &rides::Ride) {
        let message = realtime::status_message(ride, &self.id);
        if let Err(e) = self
            .emitter
            .emit(realtime::room(&ride.id), "rideStatus", message)
            .await
        {
            tracing::warn!(ride = %ride.id, error = %e, "rideStatus broadcast failed");
        }
    }
}

/// Serves the app on `listener` until `shutdown` completes, then closes the sockets and lets
/// open requests finish (up to [`Config::shutdown_grace`]).
///
/// Fails at start if the config is invalid or Redis cannot be reached; later Redis outages are
/// answered with 503 and recovered from without a restart.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let addr = listener
        .local_addr()
        .context("reading the listener address")?;
    let store = match &config.redis_url {
        Some(url) => Store::connect(url)
            .await
            .context("connecting to Redis for sessions and rides")?,
        None => Store::memory(),
    };
    let sessions = Sessions::new(
        store.clone(),
        &config.session_secret,
        config.session_ttl,
        config.cookie_secure,
    );
    let rides = Rides::new(store, config.ride_ttl);
    let realtime = Realtime {
        id: config.id.clone(),
        sessions: sessions.clone(),
        rides: rides.clone(),
    };
    let builder = SocketIo::builder().with_state(realtime);

    // Stops the pub/sub keepalive when serve returns or is dropped.
    let mut _keepalive = None;
    let (router, emitter): (Router<Arc<App>>, Box<dyn RoomEmitter>) = match &config.redis_url {
        Some(url) => {
            let driver = ManagedDriver::connect(url)
                .await
                .context("connecting to Redis for Socket.IO pub/sub")?;
            _keepalive = Some(driver.spawn_keepalive(PUBSUB_KEEPALIVE));
            let adapter = RedisAdapterCtr::new_with_driver(driver, RedisAdapterConfig::default());
            let (layer, io) = builder.with_adapter::<RedisAdapter>(adapter).build_layer();
            realtime::register_redis(&io).await?;
            tracing::info!(
                instance = %config.id, %addr,
                "rideshare listening: sessions, rides and Socket.IO broadcasts in Redis"
            );
            (routes(layer, sessions.clone()), Box::new(io))
        }
        None => {
            let (layer, io) = builder.build_layer();
            realtime::register_local(&io);
            tracing::info!(
                instance = %config.id, %addr,
                "rideshare listening in embedded mode (no Redis): sessions, rides and Socket.IO \
                 broadcasts are in this process only, so run a single instance"
            );
            (routes(layer, sessions.clone()), Box::new(io))
        }
    };
    let app = Arc::new(App {
        id: config.id.clone(),
        rides,
        emitter,
    });
    let router = router
        .with_state(app.clone())
        .layer(middleware::from_fn_with_state(
            HeaderValue::from_str(&config.id).expect("validated above"),
            backend_id,
        ));

    // Shutdown: first disconnect the sockets (WebSockets and long polls would otherwise keep
    // the server open), then let axum drain; give up after the grace period.
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let closing = app.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!(instance = %closing.id, "shutting down");
        if tokio::time::timeout(SOCKETS_CLOSE_TIMEOUT, closing.emitter.close())
            .await
            .is_err()
        {
            tracing::warn!("closing the sockets timed out");
        }
        let _ = draining_tx.send(());
    };
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .into_future();
    let grace = config.shutdown_grace;
    tokio::select! {
        result = server => result.context("serving HTTP"),
        () = async {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(?grace, "connections still open after the grace period, closing them");
            Ok(())
        }
    }
}

/// The routes, with sessions on the HTTP API and Socket.IO in front (it answers `/socket.io/`
/// itself, without touching the session store).
fn routes<A: Adapter>(socket_io: SocketIoLayer<A>, sessions: Sessions) -> Router<Arc<App>> {
    let api = Router::new()
        .route("/login", post(api::login))
        .route("/me", get(api::whoami))
        .route("/logout", post(api::logout))
        .route("/location", get(api::get_location).post(api::set_location))
        .route("/rides", post(api::request_ride))
        .route("/rides/{id}", get(api::get_ride))
        .route("/rides/{id}/accept", post(api::accept_ride))
        .route("/rides/{id}/complete", post(api::complete_ride))
        .route_layer(middleware::from_fn_with_state(
            sessions,
            session::middleware,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(api::healthz))
        .route("/", get(index))
        .route("/socket.io.min.js", get(socket_io_js))
        .fallback(api::not_found)
        .layer(socket_io)
}

/// Adds `x-backend-id` to every response, Socket.IO's and errors included.
async fn backend_id(State(id): State<HeaderValue>, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    response
        .headers_mut()
        .insert(HeaderName::from_static(BACKEND_ID_HEADER), id);
    response
}

const INDEX_HTML: &str = include_str!("../static/index.html");
/// The Socket.IO browser client (socket.io-client 4.8.4, MIT: static/socket.io-client.LICENSE),
/// served from here because the demo machines have no internet access.
const SOCKET_IO_JS: &str = include_str!("../static/socket.io.min.js");

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
}

async fn socket_io_js() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/javascript; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        SOCKET_IO_JS,
    )
}
