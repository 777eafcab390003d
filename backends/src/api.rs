//! The HTTP API: JSON in, JSON out, errors as `{"error": "..."}` with a 4xx/5xx status.
//! Owns the request/response shapes and the handlers; sessions and rides storage live in
//! `session` and `rides`, broadcasting in `realtime`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::App;
use crate::rides::{Place, Ride, RideStatus, TransitionError, check_coords};
use crate::session::{Session, SessionData};
use crate::store::StoreError;

/// Longest user name accepted.
const MAX_NAME_LEN: usize = 40;

/// What a user is in the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Rider,
    Driver,
}

/// A logged-in user. The name is the identity (this is a demo: there are no passwords).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub role: Role,
}

/// A position, as kept in the session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Location {
    pub lat: f64,
    pub lng: f64,
    /// Unix time in milliseconds.
    pub updated_at: u64,
}

/// An error answer: a status and a message, sent as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// Well-formed JSON with values out of range or empty (422, like axum's own rejections).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "not logged in: POST /login first")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The store failed: 503, logged (the client may retry; Redis may be restarting).
    pub fn unavailable(err: &StoreError) -> Self {
        tracing::warn!(error = %err, "session/ride store unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable, try again: {err}"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::unavailable(&err)
    }
}

impl From<TransitionError> for ApiError {
    fn from(err: TransitionError) -> Self {
        match err {
            TransitionError::NotFound => ApiError::not_found("ride not found"),
            TransitionError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            TransitionError::Contended => ApiError::new(StatusCode::CONFLICT, err.to_string()),
            TransitionError::Store(e) => ApiError::unavailable(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// `Json<T>` whose rejections (bad syntax, wrong content type, wrong shape) are JSON errors.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(rejection_error(&rejection)),
        }
    }
}

fn rejection_error(rejection: &JsonRejection) -> ApiError {
    ApiError::new(rejection.status(), rejection.body_text())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn require_user(session: &Session) -> Result<User, ApiError> {
    session.user().ok_or_else(ApiError::unauthorized)
}

fn me(app: &App, user: &User) -> serde_json::Value {
    json!({ "name": user.name, "role": user.role, "instance": app.id })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    name: String,
    role: Role,
}

/// `POST /login {"name", "role"}`: a new session (new id) for this user.
pub async fn login(
    State(app): State<Arc<App>>,
    session: Session,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control)
    {
        return Err(ApiError::unprocessable(format!(
            "name must be 1 to {MAX_NAME_LEN} printable characters"
        )));
    }
    let user = User {
        name: name.to_owned(),
        role: req.role,
    };
    session.regenerate(SessionData {
        user: Some(user.clone()),
        location: None,
    });
    tracing::debug!(user = %user.name, role = ?user.role, "login");
    Ok(Json(me(&app, &user)))
}

/// `GET /me`: the session's user, or 401.
pub async fn whoami(
    State(app): State<Arc<App>>,
    session: Session,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = require_user(&session)?;
    Ok(Json(me(&app, &user)))
}

/// `POST /logout`: ends the session (also fine without one).
pub async fn logout(State(app): State<Arc<App>>, session: Session) -> Json<serde_json::Value> {
    session.destroy();
    Json(json!({ "ok": true, "instance": app.id }))
}

/// `GET /location`: the user's last location, 404 if none yet.
pub async fn get_location(session: Session) -> Result<Json<Location>, ApiError> {
    require_user(&session)?;
    session
        .data()
        .location
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no location yet: POST /location first"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationRequest {
    lat: f64,
    lng: f64,
}

/// `POST /location {"lat", "lng"}`: keeps the location in the session.
pub async fn set_location(
    session: Session,
    JsonBody(req): JsonBody<LocationRequest>,
) -> Result<Json<Location>, ApiError> {
    require_user(&session)?;
    check_coords(req.lat, req.lng).map_err(ApiError::unprocessable)?;
    let location = Location {
        lat: req.lat,
        lng: req.lng,
        updated_at: now_ms(),
    };
    session.update(|data| data.location = Some(location.clone()));
    Ok(Json(location))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RideRequest {
    from: Place,
    to: Place,
}

/// `POST /rides {"from", "to"}` (riders): a new ride, 201.
pub async fn request_ride(
    State(app): State<Arc<App>>,
    session: Session,
    JsonBody(req): JsonBody<RideRequest>,
) -> Result<(StatusCode, Json<Ride>), ApiError> {
    let user = require_user(&session)?;
    if user.role != Role::Rider {
        return Err(ApiError::forbidden("only riders can request rides"));
    }
    req.from.validate("from").map_err(ApiError::unprocessable)?;
    req.to.validate("to").map_err(ApiError::unprocessable)?;
    let ride = app
        .rides
        .create(&user.name, req.from, req.to, &app.id)
        .await?;
    tracing::info!(ride = %ride.id, rider = %user.name, "ride requested");
    Ok((StatusCode::CREATED, Json(ride)))
}

/// `GET /rides/{id}`: the ride, for its rider or its driver.
pub async fn get_ride(
    State(app): State<Arc<App>>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Json<Ride>, ApiError> {
    let user = require_user(&session)?;
    let ride = app
        .rides
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("ride not found"))?;
    if !is_party(&ride, &user) {
        return Err(ApiError::forbidden(
            "only the ride's rider or driver can see it",
        ));
    }
    Ok(Json(ride))
}

/// Whether `user` is the ride's rider or its driver.
pub fn is_party(ride: &Ride, user: &User) -> bool {
    match user.role {
        Role::Rider => ride.rider == user.name,
        Role::Driver => ride.driver.as_deref() == Some(user.name.as_str()),
    }
}

/// `POST /rides/{id}/accept` (drivers): the ride becomes `accepted` with this driver, and its
/// room hears `rideStatus`. Accepting again as the same driver is a no-op.
pub async fn accept_ride(
    State(app): State<Arc<App>>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Json<Ride>, ApiError> {
    let user = require_user(&session)?;
    if user.role != Role::Driver {
        return Err(ApiError::forbidden("only drivers can accept rides"));
    }
    let (ride, changed) = app
        .rides
        .transition(&id, |ride| match (ride.status, ride.driver.as_deref()) {
            (RideStatus::Requested, _) => {
                ride.status = RideStatus::Accepted;
                ride.driver = Some(user.name.clone());
                Ok(true)
            }
            (RideStatus::Accepted, Some(d)) if d == user.name => Ok(false),
            (status, _) => Err(format!("ride is already {}", status_name(status))),
        })
        .await?;
    if changed {
        tracing::info!(ride = %ride.id, driver = %user.name, "ride accepted");
        app.broadcast_status(&ride).await;
    }
    Ok(Json(ride))
}

/// `POST /rides/{id}/complete` (the ride's driver): the ride becomes `completed`.
pub async fn complete_ride(
    State(app): State<Arc<App>>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Json<Ride>, ApiError> {
    let user = require_user(&session)?;
    let current = app
        .rides
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("ride not found"))?;
    if user.role != Role::Driver || current.driver.as_deref() != Some(user.name.as_str()) {
        return Err(ApiError::forbidden(
            "only the ride's driver can complete it",
        ));
    }
    // The driver cannot change once accepted, so only the status is checked again here.
    let (ride, changed) = app
        .rides
        .transition(&id, |ride| match ride.status {
            RideStatus::Accepted => {
                ride.status = RideStatus::Completed;
                Ok(true)
            }
            RideStatus::Completed => Ok(false),
            RideStatus::Requested => Err("ride is not accepted yet".to_owned()),
        })
        .await?;
    if changed {
        tracing::info!(ride = %ride.id, "ride completed");
        app.broadcast_status(&ride).await;
    }
    Ok(Json(ride))
}

fn status_name(status: RideStatus) -> &'static str {
    match status {
        RideStatus::Requested => "requested",
        RideStatus::Accepted => "accepted",
        RideStatus::Completed => "completed",
    }
}

/// `GET /healthz`.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Anything else: 404 as JSON.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}
