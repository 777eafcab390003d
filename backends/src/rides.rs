//! Rides: the model, its validation, and its storage at `ride:<id>` (JSON, with a TTL) so that
//! any instance can serve any ride. Status changes go through a compare-and-set, so two drivers
//! accepting at once cannot both win. Does not broadcast: the HTTP handlers do that.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// Prefix of the ride keys in the store.
pub const KEY_PREFIX: &str = "ride:";
/// Random bytes in a ride id (encoded as 16 lowercase hex digits).
const ID_BYTES: usize = 8;
/// Longest place name accepted.
const MAX_PLACE_LEN: usize = 200;
/// Attempts at a compare-and-set before giving up on a contended ride.
const CAS_ATTEMPTS: usize = 5;

/// Where a ride starts or ends: free text or coordinates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Place {
    Coords { lat: f64, lng: f64 },
    Name(String),
}

impl Place {
    /// Checks the place: a non-blank name of at most 200 characters, or valid coordinates.
    pub fn validate(&self, field: &str) -> Result<(), String> {
        match self {
            Place::Name(name) if name.trim().is_empty() => Err(format!("`{field}` is empty")),
            Place::Name(name) if name.chars().count() > MAX_PLACE_LEN => Err(format!(
                "`{field}` is longer than {MAX_PLACE_LEN} characters"
            )),
            Place::Name(_) => Ok(()),
            Place::Coords { lat, lng } => {
                check_coords(*lat, *lng).map_err(|e| format!("`{field}`: {e}"))
            }
        }
    }
}

/// Checks that `lat` is in [-90, 90] and `lng` in [-180, 180] (NaN is in neither).
pub fn check_coords(lat: f64, lng: f64) -> Result<(), String> {
    if !(-90.0..=90.0).contains(&lat) {
        return Err(format!("lat must be between -90 and 90, got {lat}"));
    }
    if !(-180.0..=180.0).contains(&lng) {
        return Err(format!("lng must be between -180 and 180, got {lng}"));
    }
    Ok(())
}

/// Where a ride is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RideStatus {
    Requested,
    Accepted,
    Completed,
}

/// A ride, as stored and as returned by the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ride {
    pub id: String,
    pub status: RideStatus,
    /// The rider's name.
    pub rider: String,
    /// The driver's name, once accepted.
    pub driver: Option<String>,
    pub from: Place,
    pub to: Place,
    /// Unix time in milliseconds.
    pub created_at: u64,
    pub updated_at: u64,
    /// The instance that took the request.
    pub requested_via: String,
}

/// Why a status change was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("ride not found")]
    NotFound,
    /// The ride is not in a state that allows this change (e.g. already accepted by another).
    #[error("{0}")]
    Conflict(String),
    #[error("ride is being changed concurrently, try again")]
    Contended,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Ride storage.
#[derive(Clone)]
pub struct Rides {
    store: Store,
    ttl: Duration,
}

impl Rides {
    pub fn new(store: Store, ttl: Duration) -> Self {
        Rides { store, ttl }
    }

    /// Stores a new ride in status `requested`.
    pub async fn create(
        &self,
        rider: &str,
        from: Place,
        to: Place,
        instance: &str,
    ) -> Result<Ride, StoreError> {
        let now = now_ms();
        let ride = Ride {
            id: new_ride_id(),
            status: RideStatus::Requested,
            rider: rider.to_owned(),
            driver: None,
            from,
            to,
            created_at: now,
            updated_at: now,
            requested_via: instance.to_owned(),
        };
        let json = serde_json::to_string(&ride).expect("rides always serialize");
        self.store.set(&key(&ride.id), &json, self.ttl).await?;
        Ok(ride)
    }

    /// The ride, if it exists (an id that cannot be one is simply not found).
    pub async fn get(&self, id: &str) -> Result<Option<Ride>, StoreError> {
        Ok(self.get_raw(id).await?.map(|(ride, _)| ride))
    }

    async fn get_raw(&self, id: &str) -> Result<Option<(Ride, String)>, StoreError> {
        if !is_ride_id(id) {
            return Ok(None);
        }
        let Some(json) = self.store.get(&key(id)).await? else {
            return Ok(None);
        };
        match serde_json::from_str(&json) {
            Ok(ride) => Ok(Some((ride, json))),
            Err(e) => {
                tracing::warn!(ride = id, error = %e, "unreadable ride document, ignoring it");
                Ok(None)
            }
        }
    }

    /// Applies `change` to the ride atomically: `change` returns `Ok(true)` to write the new
    /// value, `Ok(false)` if the ride is already as wanted (no write, no broadcast), or an
    /// error message for a conflict. Returns the ride and whether it changed.
    pub async fn transition(
        &self,
        id: &str,
        change: impl Fn(&mut Ride) -> Result<bool, String>,
    ) -> Result<(Ride, bool), TransitionError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut ride, old) = self.get_raw(id).await?.ok_or(TransitionError::NotFound)?;
            if !change(&mut ride).map_err(TransitionError::Conflict)? {
                return Ok((ride, false));
            }
            ride.updated_at = now_ms();
            let new = serde_json::to_string(&ride).expect("rides always serialize");
            if self.store.compare_and_set(&key(id), &old, &new).await? {
                return Ok((ride, true));
            }
        }
        Err(TransitionError::Contended)
    }
}

fn key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

fn new_ride_id() -> String {
    let mut bytes = [0u8; ID_BYTES];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Ids are checked before they become Redis keys, so a client cannot name arbitrary keys.
fn is_ride_id(id: &str) -> bool {
    id.len() == ID_BYTES * 2 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_validate() {
        assert!(Place::Name("Gare du Nord".into()).validate("from").is_ok());
        assert!(Place::Name("  ".into()).validate("from").is_err());
        assert!(Place::Name("x".repeat(201)).validate("from").is_err());
        assert!(
            Place::Coords {
                lat: 48.8,
                lng: 2.3
            }
            .validate("to")
            .is_ok()
        );
        assert!(
            Place::Coords {
                lat: 91.0,
                lng: 0.0
            }
            .validate("to")
            .is_err()
        );
        assert!(
            Place::Coords {
                lat: 0.0,
                lng: f64::NAN
            }
            .validate("to")
            .is_err()
        );
        let p: Place = serde_json::from_str(r#"{"lat":1,"lng":2}"#).unwrap();
        assert_eq!(p, Place::Coords { lat: 1.0, lng: 2.0 });
        let p: Place = serde_json::from_str(r#""Airport""#).unwrap();
        assert_eq!(p, Place::Name("Airport".into()));
    }

    #[tokio::test]
    async fn only_one_transition_wins() {
        let rides = Rides::new(Store::memory(), Duration::from_secs(60));
        let ride = rides
            .create(
                "alice",
                Place::Name("a".into()),
                Place::Name("b".into()),
                "i1",
            )
            .await
            .unwrap();
        assert!(is_ride_id(&ride.id));
        let accept = |driver: &'static str| {
            move |r: &mut Ride| match r.status {
                RideStatus::Requested => {
                    r.status = RideStatus::Accepted;
                    r.driver = Some(driver.to_owned());
                    Ok(true)
                }
                _ => Err("already accepted".to_owned()),
            }
        };
        let (r, changed) = rides.transition(&ride.id, accept("bob")).await.unwrap();
        assert!(changed);
        assert_eq!(r.driver.as_deref(), Some("bob"));
        assert!(matches!(
            rides.transition(&ride.id, accept("dave")).await,
            Err(TransitionError::Conflict(_))
        ));
        assert!(matches!(
            rides.transition("0123456789abcdef", accept("dave")).await,
            Err(TransitionError::NotFound)
        ));
        assert_eq!(rides.get("../../etc").await.unwrap(), None);
    }
}
