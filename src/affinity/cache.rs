//! The per-instance cache of pins in front of Redis (and, without Redis, the whole map).
//!
//! A set-associative table, as a CPU cache is built: a key's hash picks one set of [`WAYS`]
//! slots and the key can only live there. A set is 512 bytes aligned to cache lines. Its first
//! line holds everything a lookup or an eviction decides on: the set's version word, one "in use"
//! mark per slot, and a 16-bit fingerprint per slot. Each slot is 16 bytes (the key's tag, and one
//! packed word: backend, last refresh, synced). A lookup reads the first line and, on a
//! fingerprint match, the line of that slot: two cache lines for a hit, one for a miss, two for
//! an insert. quick_cache, before, took four dependent cache misses per lookup (its shard lock,
//! table control bytes, table bucket, entry) and 116 bytes per entry: with a million keys in it,
//! a pinned request's lookup went from 1.6% to 4.7% of tether's CPU (perf, bench s1 after s2).
//! This one takes 512 / 27 = 19 bytes per slot, allocated at start.
//!
//! Eviction within a set is a CLOCK: a lookup that hits marks its slot; a new key takes an empty
//! slot, else the first unmarked one from the set's clock hand, clearing the marks it passes
//! (every mark, when all are set), and the hand moves past it. A key written once and never read
//! again (a session of one request) is never marked, so a flood of them takes each other's slots
//! and leaves the sessions in use alone while a set holds fewer of those than it has ways.
//!
//! Readers take no lock: a set's version is odd while a writer changes it (writers take it with
//! a compare-and-swap, one at a time), and a reader that saw it odd or changed reads again (a
//! sequence lock); after a few tries it reads as a writer, so it cannot starve. Every word is an
//! atomic.
//!
//! An entry expires locally when it has not been refreshed for a full TTL, which is when Redis
//! would have expired it too. It records when it was last refreshed so the request path can
//! tell, without a Redis round trip, whether the sliding TTL is due for a refresh (every ttl/4).
//!
//! Time is passed in (milliseconds of [`crate::backend::now_ms`]) so tests can drive it.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering, fence};

use super::KeyHash;
use crate::backend::BackendKey;

/// Slots per set: 27 fingerprints fill the set's first cache line beside its version, its marks
/// and its clock hand. More ways keep a set from losing sessions in use when more of them than
/// average hash to it.
pub const WAYS: usize = 27;

/// Lock-free reads of a set before a reader takes the writers' lock instead.
const READ_TRIES: usize = 8;

/// The packed word of a slot: bits 0..41 the last refresh (ms of `now_ms`, 69 years), bit 41
/// synced, bits 43..64 the backend.
const TIME_BITS: u32 = 41;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const SYNCED: u64 = 1 << 41;
const BACKEND_SHIFT: u32 = 43;
/// Backend keys a slot can hold; the interner takes no more ([`crate::backend::MAX_BACKEND_IDS`]).
pub const BACKEND_KEYS: u64 = 1 << (64 - BACKEND_SHIFT);

/// One cached pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub backend: BackendKey,
    /// When this instance last refreshed (or wrote) the pin in Redis.
    pub refreshed_ms: u64,
    /// False while Redis does not hold this pin as far as we know (written during an outage, or
    /// a refresh failed): the next request after Redis returns writes it.
    pub synced: bool,
}

impl Pin {
    fn pack(self) -> u64 {
        (self.refreshed_ms & TIME_MASK)
            | if self.synced { SYNCED } else { 0 }
            | (u64::from(self.backend.0) << BACKEND_SHIFT)
    }

    fn unpack(word: u64) -> Pin {
        Pin {
            backend: BackendKey((word >> BACKEND_SHIFT) as u32),
            refreshed_ms: word & TIME_MASK,
            synced: word & SYNCED != 0,
        }
    }
}

/// One set: 512 bytes, its first cache line the version, the marks and the fingerprints.
#[repr(C, align(64))]
struct Set {
    /// Even: stable. Odd: a writer is changing the set.
    version: AtomicU32,
    /// Bit i: slot i was read since the clock last passed it.
    marks: AtomicU32,
    /// The slot the clock looks at first when the set is full.
    hand: AtomicU16,
    /// Per slot, 16 bits of the key's tag (never 0), or 0 for an empty slot.
    fingerprints: [AtomicU16; WAYS],
    /// Per slot: the key's tag, then the packed word.
    slots: [[AtomicU64; 2]; WAYS],
}

impl Default for Set {
    fn default() -> Set {
        Set {
            version: AtomicU32::new(0),
            marks: AtomicU32::new(0),
            hand: AtomicU16::new(0),
            fingerprints: std::array::from_fn(|_| AtomicU16::new(0)),
            slots: std::array::from_fn(|_| [AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }
}

/// Where a key lives: its set, its fingerprint there, its tag.
#[derive(Clone, Copy)]
struct Place {
    set: usize,
    fingerprint: u16,
    tag: u64,
}

pub struct PinCache {
    sets: Box<[Set]>,
    /// The affinity TTL; a reload may change it.
    ttl_ms: AtomicU64,
}

impl PinCache {
    /// A cache of at least `capacity` slots (rounded up to whole sets), allocated now.
    pub fn new(capacity: usize, ttl_ms: u64) -> PinCache {
        let sets = capacity.div_ceil(WAYS).max(1);
        PinCache {
            sets: (0..sets).map(|_| Set::default()).collect(),
            ttl_ms: AtomicU64::new(ttl_ms),
        }
    }

    /// How many keys the cache can hold.
    pub fn slots(&self) -> usize {
        self.sets.len() * WAYS
    }

    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms.load(Ordering::Relaxed)
    }

    /// Apply a reloaded TTL to every entry's expiry and refresh pace.
    pub fn set_ttl_ms(&self, ttl_ms: u64) {
        self.ttl_ms.store(ttl_ms, Ordering::Relaxed);
    }

    fn place(&self, key: KeyHash) -> Place {
        // Keys are keyed hashes, uniform already; the multiply (a bijection) spreads any keys,
        // tests' small integers too. The set comes from its upper bits (a multiply, not a
        // modulo: any number of sets). The tag folds in the upper half of the key, so two keys
        // that differ in only one half never share a tag; any other pair of keys does one time in
        // 2^64. The fingerprint is 16 bits of the tag; 0 marks an empty slot.
        let mixed = (key.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let set = ((u128::from(mixed) * self.sets.len() as u128) >> 64) as usize;
        let tag = ((key.0 >> 64) as u64) ^ mixed;
        Place {
            set,
            fingerprint: (tag as u16).max(1),
            tag,
        }
    }

    /// The live pin of `key` at `now`. A hit marks the slot as in use.
    pub fn get(&self, key: KeyHash, now: u64) -> Option<Pin> {
        let place = self.place(key);
        let set = &self.sets[place.set];
        let mut found = None;
        for _ in 0..READ_TRIES {
            let before = set.version.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let read = find(set, place);
            fence(Ordering::Acquire);
            if set.version.load(Ordering::Relaxed) == before {
                found = Some(read);
                break;
            }
        }
        // Writers kept changing the set: read it as one of them, so that a reader cannot starve.
        let (slot, word) = found.unwrap_or_else(|| self.write(place, |set| find(set, place)))?;
        let pin = Pin::unpack(word);
        if now.saturating_sub(pin.refreshed_ms) >= self.ttl_ms() {
            return None;
        }
        let bit = 1 << slot;
        if set.marks.load(Ordering::Relaxed) & bit == 0 {
            // Outside the writers' lock: at worst the mark lands on the slot's next key, or the
            // clock clears it at once; neither changes which backend a key maps to.
            set.marks.fetch_or(bit, Ordering::Relaxed);
        }
        Some(pin)
    }

    /// Pin `key` to `backend`, refreshed at `now`.
    pub fn put(&self, key: KeyHash, backend: BackendKey, now: u64, synced: bool) {
        // The interner never hands out keys past what a slot holds (MAX_BACKEND_IDS).
        debug_assert!(u64::from(backend.0) < BACKEND_KEYS);
        let word = Pin {
            backend,
            refreshed_ms: now,
            synced,
        }
        .pack();
        let place = self.place(key);
        self.write(place, |set| {
            // Always admitted: the client's next request must find what this one decided.
            let slot = match find(set, place) {
                Some((slot, _)) => slot,
                None => {
                    let slot = victim(set);
                    set.fingerprints[slot].store(place.fingerprint, Ordering::Relaxed);
                    set.slots[slot][0].store(place.tag, Ordering::Relaxed);
                    set.marks.fetch_and(!(1 << slot), Ordering::Relaxed);
                    slot
                }
            };
            set.slots[slot][1].store(word, Ordering::Relaxed);
        });
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
        let place = self.place(key);
        self.write(place, |set| {
            // A fingerprint of 0 is an empty slot: `find` skips it and `victim` takes it first.
            if let Some((slot, _)) = find(set, place) {
                set.fingerprints[slot].store(0, Ordering::Relaxed);
                set.marks.fetch_and(!(1 << slot), Ordering::Relaxed);
            }
        });
    }

    /// Change `place`'s set as its only writer: the version odd meanwhile, so that readers retry.
    fn write<T>(&self, place: Place, change: impl FnOnce(&Set) -> T) -> T {
        let set = &self.sets[place.set];
        let mut spins = 0u32;
        let version = loop {
            let v = set.version.load(Ordering::Relaxed);
            if v & 1 == 0
                && set
                    .version
                    .compare_exchange_weak(v, v + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break v;
            }
            // Another writer holds this set for a few dozen instructions; if it was preempted
            // there, let it run.
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        };
        // The odd version is visible before any of the changes.
        fence(Ordering::Release);
        let out = change(set);
        set.version
            .store(version.wrapping_add(2), Ordering::Release);
        out
    }
}

/// The slot of `place`'s key in its set and its packed word.
fn find(set: &Set, place: Place) -> Option<(usize, u64)> {
    (0..WAYS).find_map(|i| {
        (set.fingerprints[i].load(Ordering::Relaxed) == place.fingerprint
            && set.slots[i][0].load(Ordering::Relaxed) == place.tag)
            .then(|| (i, set.slots[i][1].load(Ordering::Relaxed)))
    })
}

/// The slot a new key takes (the caller holds the set): an empty one, else the clock's: the
/// first unmarked slot from the hand, the marks it passes cleared (when every slot is marked,
/// the hand goes round once, clearing them all, and takes the slot it started at); the hand
/// moves past it.
fn victim(set: &Set) -> usize {
    if let Some(empty) = (0..WAYS).find(|&i| set.fingerprints[i].load(Ordering::Relaxed) == 0) {
        return empty;
    }
    let start = usize::from(set.hand.load(Ordering::Relaxed)) % WAYS;
    let marks = set.marks.load(Ordering::Relaxed);
    let mut passed = 0u32;
    let victim = (0..WAYS)
        .map(|n| (start + n) % WAYS)
        .find(|&i| {
            let unmarked = marks & (1 << i) == 0;
            if !unmarked {
                passed |= 1 << i;
            }
            unmarked
        })
        .unwrap_or(start);
    set.marks.fetch_and(!passed, Ordering::Relaxed);
    set.hand
        .store(((victim + 1) % WAYS) as u16, Ordering::Relaxed);
    victim
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
        // Rounded up to whole sets.
        assert_eq!(c.slots(), 1026);
        for i in 0..20_000u128 {
            c.put(KeyHash(i), BackendKey(0), 0, true);
        }
        let live = (0..20_000u128)
            .filter(|i| c.get(KeyHash(*i), 0).is_some())
            .count();
        assert!(
            live <= c.slots(),
            "{live} entries live in {} slots",
            c.slots()
        );
        assert!(live > 900, "only {live} of 1026 slots in use");
        // The most recent write is always kept.
        assert!(c.get(KeyHash(19_999), 0).is_some());
    }

    #[test]
    fn sessions_in_use_outlive_a_flood_of_new_ones() {
        // Eviction keeps what is read: a lookup marks its slot, and new keys, unmarked, take
        // each other's slots.
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

    #[test]
    fn a_full_set_evicts_an_unread_key_first() {
        // One set: every key lands in it.
        let c = PinCache::new(WAYS, TTL);
        let keys = |range: std::ops::Range<u128>| range.map(KeyHash);
        for k in keys(0..WAYS as u128) {
            c.put(k, BackendKey(1), 0, true);
        }
        // All read but key 5: the new key takes its slot.
        for k in keys(0..WAYS as u128).filter(|k| k.0 != 5) {
            assert!(c.get(k, 1).is_some());
        }
        c.put(KeyHash(100), BackendKey(2), 1, true);
        assert!(c.get(KeyHash(5), 1).is_none());
        let present = |c: &PinCache| {
            keys(0..WAYS as u128)
                .chain(keys(100..102))
                .filter(|&k| c.get(k, 1).is_some())
                .count()
        };
        // Now every slot is marked (key 100 by the read in `present`): the marks are cleared and
        // one key goes, not the new one.
        assert_eq!(present(&c), WAYS);
        c.put(KeyHash(101), BackendKey(2), 1, true);
        assert!(c.get(KeyHash(101), 1).is_some());
        assert_eq!(present(&c), WAYS);
    }

    #[test]
    fn a_key_read_again_survives_new_keys_that_are_not() {
        let c = PinCache::new(WAYS, TTL);
        for i in 0..WAYS as u128 {
            c.put(KeyHash(i), BackendKey(1), 0, true);
        }
        // Key 3 is read before each new key; no other key is read again.
        for n in 0..10 * WAYS as u128 {
            assert!(
                c.get(KeyHash(3), 0).is_some(),
                "key 3 evicted by new key {n}"
            );
            c.put(KeyHash(1000 + n), BackendKey(2), 0, true);
        }
    }

    #[test]
    fn a_slot_holds_the_largest_backend_key_and_time() {
        let c = PinCache::new(10, u64::MAX);
        let backend = BackendKey((BACKEND_KEYS - 1) as u32);
        let time = TIME_MASK;
        c.put(KeyHash(3), backend, time, false);
        assert_eq!(
            c.get(KeyHash(3), time),
            Some(Pin {
                backend,
                refreshed_ms: time,
                synced: false
            })
        );
    }

    #[test]
    fn removed_keys_are_gone_and_their_slot_reused() {
        let c = PinCache::new(WAYS, TTL);
        for i in 0..WAYS as u128 {
            c.put(KeyHash(i), BackendKey(1), 0, true);
            c.get(KeyHash(i), 0);
        }
        c.remove(KeyHash(9));
        assert!(c.get(KeyHash(9), 0).is_none());
        // The freed slot takes the next key: every other (marked) key stays.
        c.put(KeyHash(50), BackendKey(2), 0, true);
        assert!(
            (0..WAYS as u128)
                .filter(|&i| i != 9)
                .all(|i| c.get(KeyHash(i), 0).is_some())
        );
    }

    #[test]
    fn concurrent_readers_see_only_whole_entries() {
        // Writers put each key with a backend and time derived from the key, over and over,
        // evicting each other in a small cache; readers check that whatever they find is the
        // entry written for that key (a torn read or a slot read mid-change would not be).
        let c = std::sync::Arc::new(PinCache::new(WAYS, u64::MAX));
        let expect = |k: u128| (BackendKey((k % 1000) as u32), (k * 7) as u64 & TIME_MASK);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..2u128 {
            let (c, stop) = (c.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0u128;
                while !stop.load(Ordering::Relaxed) {
                    let k = (n * 2 + t) % 100;
                    let (b, time) = expect(k);
                    c.put(KeyHash(k), b, time, k.is_multiple_of(2));
                    if n.is_multiple_of(7) {
                        c.remove(KeyHash((k + 3) % 100));
                    }
                    n += 1;
                }
            }));
        }
        let mut found = 0u64;
        for n in 0..1_000_000u128 {
            let k = n % 100;
            if let Some(pin) = c.get(KeyHash(k), 0) {
                let (b, time) = expect(k);
                assert_eq!(
                    (pin.backend, pin.refreshed_ms, pin.synced),
                    (b, time, k.is_multiple_of(2))
                );
                found += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        assert!(found > 0, "no lookup found anything");
    }
}
