//! The pin cache filled past its bound, as a worker thread fills it under new sessions (bench s2):
//! nanoseconds per insert and per lookup, the slowest insert (a table growing under its lock
//! holds up every request of that worker), and the process's RSS before and after.
//!
//!   cargo bench --bench pin_cache [-- ENTRIES CAPACITY]   (defaults 1,500,000 and 1,000,000)
//!
//! Prints figures; asserts nothing (targets live in benchmarks, not tests).

use std::time::{Duration, Instant};

use tether::affinity::KeyHash;
use tether::affinity::cache::PinCache;
use tether::backend::BackendKey;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A key as the keyed hash makes them: 128 well-mixed bits.
fn key(i: u64) -> KeyHash {
    let a = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    KeyHash(((a as u128) << 64) | (a.rotate_left(29) ^ 0xD6E8_FEB8_6659_FD93) as u128)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let entries = args.first().copied().unwrap_or(1_500_000);
    let capacity = args.get(1).copied().unwrap_or(1_000_000) as usize;
    let before = rss_kib();
    let cache = PinCache::new(capacity, 86_400_000);
    let built = rss_kib();

    let start = Instant::now();
    let (mut worst, mut worst_at, mut over_1ms) = (Duration::ZERO, 0, 0);
    for i in 0..entries {
        let t = Instant::now();
        cache.put(key(i), BackendKey((i % 3) as u32), 0, true);
        let d = t.elapsed();
        if d > Duration::from_millis(1) {
            over_1ms += 1;
        }
        if d > worst {
            (worst, worst_at) = (d, i);
        }
    }
    let puts = start.elapsed();
    let filled = rss_kib();

    // Lookups of the most recent `capacity` keys, in a scattered order.
    let lookups = 3 * capacity as u64;
    let recent = capacity as u64;
    let start = Instant::now();
    let mut hits = 0u64;
    for n in 0..lookups {
        let i = entries - recent + (n * 7919) % recent;
        hits += cache.get(key(i), 1).is_some() as u64;
    }
    let gets = start.elapsed();

    println!("pin cache, capacity {capacity}, {entries} inserts of new keys:");
    println!(
        "  insert: {:.0} ns each; slowest {:?} (insert #{worst_at}); {over_1ms} over 1 ms",
        puts.as_nanos() as f64 / entries as f64,
        worst
    );
    println!(
        "  lookup of the last {recent} keys: {:.0} ns each, {:.1}% found",
        gets.as_nanos() as f64 / lookups as f64,
        hits as f64 * 100.0 / lookups as f64
    );
    println!(
        "  RSS: {before} KiB before, {built} KiB built, {filled} KiB filled ({:.1} bytes per slot of {})",
        (filled.saturating_sub(before)) as f64 * 1024.0 / cache.slots() as f64,
        cache.slots()
    );
}
