//! The per-instance cache of pins in front of Redis (and, without Redis, the whole map).
//!
//! Bounded by entry count (quick_cache: CLOCK-PRO eviction, sharded locks, every insert admitted,
//! memory allocated as entries arrive, shards small enough that growing one takes well under a
//! millisecond). An entry expires locally when it has not been refreshed for a full TTL, which is
//! when Redis would have expired it too. It records when it was last refreshed so the request
//! path can tell, without a Redis round trip, whether the sliding TTL is due for a refresh (every
//! ttl/4).
//!
//! Time is passed in (milliseconds of [`crate::backend::now_ms`]) so tests can drive it.

use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, UnitWeighter};

use super::KeyHash;
use crate::backend::BackendKey;

/// One cached pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The full key hash: the cache indexes by 64 bits, a mismatch here is a miss.
    key: u128,
    pub backend: BackendKey,
    /// When this instance last refreshed (or wrote) the pin in Redis.
    pub refreshed_ms: u64,
    /// False while Redis does not hold this pin as far as we know (written during an outage, or
    /// a refresh failed): the next request after Redis returns writes it.
    pub synced: bool,
}

impl Pin {
    pub fn new(key: KeyHash, backend: BackendKey, refreshed_ms: u64, synced: bool) -> Pin {
        Pin {
            key: key.0,
            backend,
            refreshed_ms,
            synced,
        }
    }
}

/// Entries per shard, about: growing a shard's table moves its entries while that shard is
/// locked, and a request waits for it. TinyUFO, before, kept one table for the whole cache: built
/// for a million entries it wrote 70 MB at start-up (its admission sketch: 54 MB, twenty cache
/// misses per insert, never read since every insert here is forced); built small, its table grew
/// by doubling and the insert that grew it past 786,432 entries took 121 ms.
const SHARD_ENTRIES: usize = 4096;
/// At most this many shards (a cache of more than 4M entries gets bigger shards).
const MAX_SHARDS: usize = 1024;

pub struct PinCache {
    map: Cache<u64, Pin>,
    /// The affinity TTL; a reload may change it.
    ttl_ms: AtomicU64,
}

impl PinCache {
    pub fn new(capacity: usize, ttl_ms: u64) -> PinCache {
        let shards = capacity
            .div_ceil(SHARD_ENTRIES)
            .next_power_of_two()
            .min(MAX_SHARDS);
        let options = OptionsBuilder::new()
            .estimated_items_capacity(capacity)
            .weight_capacity(capacity as u64)
            .shards(shards)
            .build()
            .expect("estimated_items_capacity and weight_capacity are set");
        PinCache {
            map: Cache::with_options(
                options,
                UnitWeighter,
                Default::default(),
                Default::default(),
            ),
            ttl_ms: AtomicU64::new(ttl_ms),
        }
    }

    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms.load(Ordering::Relaxed)
    }

    /// Apply a reloaded TTL to every entry's expiry and refresh pace.
    pub fn set_ttl_ms(&self, ttl_ms: u64) {
        self.ttl_ms.store(ttl_ms, Ordering::Relaxed);
    }

    /// The live pin of `key` at `now`.
    pub fn get(&self, key: KeyHash, now: u64) -> Option<Pin> {
        let pin = self.map.get(&(key.0 as u64))?;
        (pin.key == key.0 && now.saturating_sub(pin.refreshed_ms) < self.ttl_ms()).then_some(pin)
    }

    /// Pin `key` to `backend`, refreshed at `now`.
    pub fn put(&self, key: KeyHash, backend: BackendKey, now: u64, synced: bool) {
        let pin = Pin::new(key, backend, now, synced);
        // Always admitted: the client's next request must find what this one decided.
        self.map.insert(key.0 as u64, pin);
    }

    /// Whether a hit at `now` should refresh the pin in Redis.
    pub fn refresh_due(&self, pin: &Pin, now: u64) -> bool {
        !pin.synced || now.saturating_sub(pin.refreshed_ms) >= self.ttl_ms() / 4
    }

    /// Apply what Redis says `key` is pinned to, if this instance caches it. Returns whether an
    /// entry changed.
    pub fn update_if_cached(&self, key: KeyHash, backend: BackendKey, now: u64) -> bool {
        match self.get(key, now) {
            Some(pin) if pin.backend != backend => {
                self.put(key, backend, now, true);
                true
            }
            Some(pin) if !pin.synced => {
                self.put(key, backend, pin.refreshed_ms, true);
                false
            }
            _ => false,
        }
    }

    /// Mark `key` as not written to Redis, if it is still pinned to `backend`.
    pub fn mark_unsynced(&self, key: KeyHash, backend: BackendKey, now: u64) {
        if let Some(pin) = self.get(key, now)
            && pin.backend == backend
        {
            self.put(key, backend, pin.refreshed_ms, false);
        }
    }

    pub fn remove(&self, key: KeyHash) {
        if let Some(pin) = self.map.get(&(key.0 as u64))
            && pin.key == key.0
        {
            self.map.remove(&(key.0 as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 1000;

    #[test]
    fn entries_expire_after_a_ttl_without_refresh() {
        let c = PinCache::new(100, TTL);
        let k = KeyHash(42);
        c.put(k, BackendKey(1), 0, true);
        assert_eq!(c.get(k, 999).unwrap().backend, BackendKey(1));
        assert!(c.get(k, 1000).is_none());
        // A refresh slides the expiry.
        c.put(k, BackendKey(1), 900, true);
        assert!(c.get(k, 1899).is_some());
    }

    #[test]
    fn refresh_is_due_every_quarter_ttl_or_when_unsynced() {
        let c = PinCache::new(100, TTL);
        let k = KeyHash(7);
        c.put(k, BackendKey(0), 0, true);
        let pin = c.get(k, 100).unwrap();
        assert!(!c.refresh_due(&pin, 249));
        assert!(c.refresh_due(&pin, 250));
        c.mark_unsynced(k, BackendKey(0), 10);
        let pin = c.get(k, 10).unwrap();
        assert!(!pin.synced && c.refresh_due(&pin, 10));
    }

    #[test]
    fn a_64_bit_collision_is_a_miss() {
        let c = PinCache::new(100, TTL);
        let a = KeyHash(5);
        let b = KeyHash(5 | (1u128 << 100));
        c.put(a, BackendKey(1), 0, true);
        assert!(c.get(b, 0).is_none());
        c.remove(b);
        assert!(
            c.get(a, 0).is_some(),
            "removing a colliding key must not drop another's pin"
        );
    }

    #[test]
    fn updates_apply_only_to_cached_keys() {
        let c = PinCache::new(100, TTL);
        let k = KeyHash(9);
        assert!(!c.update_if_cached(k, BackendKey(2), 0));
        assert!(c.get(k, 0).is_none());
        c.put(k, BackendKey(1), 0, true);
        assert!(c.update_if_cached(k, BackendKey(2), 5));
        assert_eq!(c.get(k, 5).unwrap().backend, BackendKey(2));
    }

    #[test]
    fn capacity_is_bounded() {
        let c = PinCache::new(1000, TTL);
        for i in 0..20_000u128 {
            c.put(KeyHash(i), BackendKey(0), 0, true);
        }
        let live = (0..20_000u128)
            .filter(|i| c.get(KeyHash(*i), 0).is_some())
            .count();
        assert!(live <= 1000, "{live} entries live in a 1000-entry cache");
        // The most recent write is always kept.
        assert!(c.get(KeyHash(19_999), 0).is_some());
    }

    #[test]
    fn sessions_in_use_outlive_a_flood_of_new_ones() {
        // Eviction keeps what is read: quick_cache's hot region (97% of the entries by default)
        // protects sessions in use from one-off keys, which pass through the cold region.
        let c = PinCache::new(1000, TTL);
        let hot = 0..600u128;
        for i in hot.clone() {
            c.put(KeyHash(i), BackendKey(1), 0, true);
        }
        for n in 0..50_000u128 {
            // Every hot session makes a request between each few hundred new ones.
            if n % 200 == 0 {
                for i in hot.clone() {
                    assert!(c.get(KeyHash(i), 0).is_some(), "hot key {i} evicted at {n}");
                }
            }
            c.put(KeyHash(1_000_000 + n), BackendKey(2), 0, true);
        }
    }
}
