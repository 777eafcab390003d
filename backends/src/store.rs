//! Key-value storage for sessions and rides: Redis (shared by every instance) or an in-process
//! map (embedded mode, one process). Owns the Redis connection for data; not the pub/sub one,
//! which lives in `pubsub`.
//!
//! Only the few operations the app needs, each one round trip: `GETEX … PX` (read and touch),
//! `GET`, `SET … PX`, `DEL`, and a compare-and-set for ride transitions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, IntoConnectionInfo, ProtocolVersion};

/// Errors from the store. The in-process map cannot fail: only Redis errors exist.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused or could not be reached; the request gets a 503 and may be retried.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Opens a Redis client that always speaks RESP3, whatever the URL says: the connection
/// manager reconnects quietly with RESP3 (commands wait for the new connection instead of
/// failing), and push messages (pub/sub) need it.
pub fn resp3_client(url: &str) -> redis::RedisResult<Client> {
    let info = url.into_connection_info()?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Client::open(info.set_redis_settings(settings))
}

/// Reconnection settings shared by the data and pub/sub connections: short timeouts so that a
/// dead Redis answers "unavailable" within seconds, and a capped backoff so that a restarted
/// one is found again quickly.
pub fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(3)))
        .set_max_delay(Duration::from_secs(1))
}

/// Where sessions and rides live. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    /// Shared by every instance that uses the same Redis.
    Redis(ConnectionManager),
    /// One process only (embedded mode): lost at exit, invisible to other instances.
    Memory(Arc<Mutex<HashMap<String, Entry>>>),
}

/// A value in the in-process map, with its deadline.
pub struct Entry {
    value: String,
    expires: Instant,
}

// Compare-and-set for ride transitions: replace the value only if it is still the one the
// caller read, keeping the key's TTL.
const CAS_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
";

impl Store {
    /// Connects to Redis (fails if it cannot be reached now; reconnects by itself later).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = resp3_client(url)?;
        let manager = client
            .get_connection_manager_with_config(manager_config())
            .await?;
        Ok(Store::Redis(manager))
    }

    /// An empty in-process store.
    pub fn memory() -> Self {
        Store::Memory(Arc::default())
    }

    /// Reads `key` and, if it exists, resets its TTL to `ttl` (`GETEX key PX ttl`).
    pub async fn get_touch(&self, key: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        match self {
            Store::Redis(conn) => {
                let value: Option<String> = redis::cmd("GETEX")
                    .arg(key)
                    .arg("PX")
                    .arg(millis(ttl))
                    .query_async(&mut conn.clone())
                    .await?;
                Ok(value)
            }
            Store::Memory(map) => {
                let mut map = lock(map);
                let now = Instant::now();
                Ok(live(&mut map, key, now).map(|entry| {
                    entry.expires = now + ttl;
                    entry.value.clone()
                }))
            }
        }
    }

    /// Reads `key` without touching its TTL.
    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Redis(conn) => Ok(conn.clone().get(key).await?),
            Store::Memory(map) => {
                let mut map = lock(map);
                Ok(live(&mut map, key, Instant::now()).map(|e| e.value.clone()))
            }
        }
    }

    /// Writes `key` with a TTL (`SET key value PX ttl`).
    pub async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        match self {
            Store::Redis(conn) => {
                let () = conn.clone().pset_ex(key, value, millis(ttl)).await?;
            }
            Store::Memory(map) => {
                let mut map = lock(map);
                let now = Instant::now();
                // Demo-sized map: sweeping on write keeps it bounded without a timer task.
                map.retain(|_, e| e.expires > now);
                map.insert(
                    key.to_owned(),
                    Entry {
                        value: value.to_owned(),
                        expires: now + ttl,
                    },
                );
            }
        }
        Ok(())
    }

    /// Deletes `key` (no error if it does not exist).
    pub async fn del(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(conn) => {
                let _: i64 = conn.clone().del(key).await?;
            }
            Store::Memory(map) => {
                lock(map).remove(key);
            }
        }
        Ok(())
    }

    /// Replaces the value of `key` with `new` if it is still `old`; keeps the TTL. Returns
    /// whether it did.
    pub async fn compare_and_set(
        &self,
        key: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Redis(conn) => {
                let swapped: i64 = redis::Script::new(CAS_SCRIPT)
                    .key(key)
                    .arg(old)
                    .arg(new)
                    .invoke_async(&mut conn.clone())
                    .await?;
                Ok(swapped == 1)
            }
            Store::Memory(map) => {
                let mut map = lock(map);
                match live(&mut map, key, Instant::now()) {
                    Some(entry) if entry.value == old => {
                        entry.value = new.to_owned();
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
        }
    }
}

/// The entry for `key` if it has not expired (an expired one is removed).
fn live<'m>(map: &'m mut HashMap<String, Entry>, key: &str, now: Instant) -> Option<&'m mut Entry> {
    if map.get(key).is_some_and(|e| e.expires <= now) {
        map.remove(key);
    }
    map.get_mut(key)
}

fn lock(map: &Mutex<HashMap<String, Entry>>) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
    // A panic while holding this lock cannot leave the map half-updated (every critical
    // section is a single insert/remove/assign), so a poisoned lock is still usable.
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_expires_touches_and_swaps() {
        let store = Store::memory();
        store
            .set("k", "v1", Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(store.get("k").await.unwrap().as_deref(), Some("v1"));
        // Touch pushes the deadline out.
        assert_eq!(
            store
                .get_touch("k", Duration::from_secs(60))
                .await
                .unwrap()
                .as_deref(),
            Some("v1")
        );
        assert!(!store.compare_and_set("k", "other", "v2").await.unwrap());
        assert!(store.compare_and_set("k", "v1", "v2").await.unwrap());
        assert_eq!(store.get("k").await.unwrap().as_deref(), Some("v2"));
        store.del("k").await.unwrap();
        assert_eq!(store.get("k").await.unwrap(), None);

        store
            .set("gone", "x", Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store
                .get_touch("gone", Duration::from_secs(1))
                .await
                .unwrap(),
            None
        );
    }

    #[test]
    fn resp3_is_forced_on_any_url() {
        let client = resp3_client("redis://127.0.0.1:6379/0").unwrap();
        assert_eq!(
            client.get_connection_info().redis_settings().protocol(),
            ProtocolVersion::RESP3
        );
    }
}
