//! Choosing a backend for a key that has no usable pin.
//!
//! Candidates are the backends that are up and not excluded for this request; if none is up, the
//! ejected ones that are not excluded (an ejection is a guess; a request that may still succeed
//! beats a certain 503, as NGINX does when every server is marked failed).
//!
//! [`rendezvous`] is also the fail-open choice while Redis is unavailable: it depends only on the
//! key's hash and the backends' ids and weights, so every instance makes the same choice.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::affinity::KeyHash;
use crate::backend::{AdminState, Backend, BackendKey, BackendSet, mix64};
use crate::config::Policy;
use crate::metrics::Reassign;

/// Pick a backend for a new key (or a keyless request) with `policy`.
pub fn pick(
    set: &BackendSet,
    policy: Policy,
    key: Option<KeyHash>,
    exclude: &[BackendKey],
    now: u64,
) -> Option<Arc<Backend>> {
    let eligible = eligibility(set, exclude, now);
    match (policy, key) {
        (Policy::LeastConnections, _) => least_connections(set, &eligible),
        (Policy::Weighted, _) => smooth_weighted(set, &eligible),
        (Policy::Rendezvous, Some(k)) => rendezvous_among(set, k, &eligible),
        // A keyless request has nothing to hash: rotate instead.
        (Policy::RoundRobin, _) | (Policy::Rendezvous, None) => round_robin(set, &eligible),
    }
}

/// The deterministic choice for `key`: weighted rendezvous (highest random weight) hashing over
/// the eligible backends. Used by the `rendezvous` policy and whenever Redis is unavailable.
pub fn rendezvous(
    set: &BackendSet,
    key: KeyHash,
    exclude: &[BackendKey],
    now: u64,
) -> Option<Arc<Backend>> {
    rendezvous_among(set, key, &eligibility(set, exclude, now))
}

/// Which backends may be chosen, best tier that has any: up and enabled; else up and draining
/// (drain is a preference, not a refusal); else enabled or draining whatever their health (a
/// request that may succeed beats a certain 503). Never a disabled or excluded backend.
fn eligibility<'a>(
    set: &BackendSet,
    exclude: &'a [BackendKey],
    now: u64,
) -> impl Fn(&Backend) -> bool + 'a {
    let allowed = move |b: &Backend| {
        !exclude.contains(&b.key) && !matches!(b.pin_blocked(now), Some(Reassign::Disabled))
    };
    let tier1 = |b: &Backend| allowed(b) && b.takes_new(now);
    let tier2 = |b: &Backend| allowed(b) && b.pin_blocked(now).is_none();
    let tier = if set.all().iter().any(|b| tier1(b)) {
        1
    } else if set.all().iter().any(|b| tier2(b)) {
        2
    } else {
        3
    };
    move |b: &Backend| match tier {
        1 => allowed(b) && b.takes_new(now),
        2 => allowed(b) && b.pin_blocked(now).is_none(),
        _ => allowed(b) && b.admin_state() != AdminState::Disabled,
    }
}

fn rendezvous_among(
    set: &BackendSet,
    key: KeyHash,
    eligible: &dyn Fn(&Backend) -> bool,
) -> Option<Arc<Backend>> {
    let k = key.0 as u64 ^ (key.0 >> 64) as u64;
    set.all()
        .iter()
        .filter(|b| eligible(b))
        .map(|b| (rendezvous_score(k, b.id_hash, b.weight()), b))
        // Ties (practically impossible) go to the smaller id, the same on every instance.
        .max_by(|(sa, a), (sb, b)| sa.total_cmp(sb).then_with(|| b.id.cmp(&a.id)))
        .map(|(_, b)| b.clone())
}

/// Weighted rendezvous score: `-weight / ln(u)` with `u` uniform in (0, 1) from the two hashes.
fn rendezvous_score(key: u64, id_hash: u64, weight: u32) -> f64 {
    let h = mix64(key ^ id_hash.rotate_left(17));
    // 53 random bits, shifted off zero so ln(u) is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(weight as f64) / u.ln()
}

fn round_robin(set: &BackendSet, eligible: &dyn Fn(&Backend) -> bool) -> Option<Arc<Backend>> {
    let n = set.all().iter().filter(|b| eligible(b)).count();
    if n == 0 {
        return None;
    }
    let i = set.rotation.fetch_add(1, Ordering::Relaxed) % n;
    set.all().iter().filter(|b| eligible(b)).nth(i).cloned()
}

/// Fewest in-flight requests per unit of weight; ties (an idle cluster) rotate, so they spread
/// evenly instead of all landing on the first backend.
fn least_connections(
    set: &BackendSet,
    eligible: &dyn Fn(&Backend) -> bool,
) -> Option<Arc<Backend>> {
    // `a` is less loaded than `b`: active_a / weight_a < active_b / weight_b, without division.
    let load = |b: &Backend| (b.active() as u64, b.weight() as u64);
    let less = |(aa, wa): (u64, u64), (ab, wb): (u64, u64)| aa * wb < ab * wa;
    let mut best: Option<(u64, u64)> = None;
    let mut ties = 0usize;
    for b in set.all().iter().filter(|b| eligible(b)) {
        let l = load(b);
        match best {
            Some(cur) if less(cur, l) => {}
            Some(cur) if !less(l, cur) => ties += 1,
            _ => {
                best = Some(l);
                ties = 1;
            }
        }
    }
    let best = best?;
    let n = set.rotation.fetch_add(1, Ordering::Relaxed) % ties;
    set.all()
        .iter()
        .filter(|b| eligible(b) && !less(best, load(b)) && !less(load(b), best))
        .nth(n)
        .cloned()
        // Loads moved between the passes: any eligible backend will do.
        .or_else(|| set.all().iter().find(|b| eligible(b)).cloned())
}

/// NGINX's smooth weighted round-robin: each pick adds every eligible backend's weight to its
/// current weight, takes the largest, and subtracts the eligible total from it.
fn smooth_weighted(set: &BackendSet, eligible: &dyn Fn(&Backend) -> bool) -> Option<Arc<Backend>> {
    let all = set.all();
    let mut current = set.swrr.lock().expect("swrr lock is never poisoned");
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, b) in all.iter().enumerate() {
        if !eligible(b) {
            continue;
        }
        let w = b.weight() as i64;
        current[i] += w;
        total += w;
        if best.is_none_or(|j| current[i] > current[j]) {
            best = Some(i);
        }
    }
    let i = best?;
    current[i] -= total;
    Some(all[i].clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Interner;
    use crate::config::BackendSettings;
    use std::collections::HashMap;
    use std::time::Duration;

    fn set(weights: &[(&str, u32)]) -> BackendSet {
        let settings: Vec<BackendSettings> = weights
            .iter()
            .enumerate()
            .map(|(i, (id, w))| BackendSettings {
                id: id.to_string(),
                address_text: String::new(),
                tls: None,
                address: format!("127.0.0.1:{}", 4000 + i).parse().unwrap(),
                weight: *w,
            })
            .collect();
        BackendSet::new(
            &settings,
            &crate::backend::tests::upstream(),
            &Interner::default(),
        )
    }

    fn counts(set: &BackendSet, policy: Policy, n: u128) -> HashMap<String, usize> {
        let mut c = HashMap::new();
        for i in 0..n {
            let k = KeyHash(mix64(i as u64) as u128 | (i << 64));
            let b = pick(set, policy, Some(k), &[], 0).unwrap();
            *c.entry(b.id.to_string()).or_default() += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_exact() {
        let s = set(&[("a", 1), ("b", 1), ("c", 1)]);
        let c = counts(&s, Policy::RoundRobin, 300);
        assert_eq!(c.values().copied().collect::<Vec<_>>(), vec![100; 3]);
    }

    #[test]
    fn smooth_weighted_follows_weights_and_interleaves() {
        let s = set(&[("a", 5), ("b", 1), ("c", 1)]);
        let order: Vec<String> = (0..7)
            .map(|_| {
                pick(&s, Policy::Weighted, None, &[], 0)
                    .unwrap()
                    .id
                    .to_string()
            })
            .collect();
        // NGINX's documented sequence for weights 5,1,1.
        assert_eq!(order, ["a", "a", "b", "a", "c", "a", "a"]);
    }

    #[test]
    fn least_connections_prefers_idle_and_rotates_ties() {
        let s = set(&[("a", 1), ("b", 1), ("c", 1)]);
        let _busy = s.all()[0].track();
        let c = counts(&s, Policy::LeastConnections, 100);
        assert_eq!(c.get("a"), None);
        assert_eq!(c["b"] + c["c"], 100);
        assert!(c["b"] >= 49 && c["c"] >= 49, "{c:?}");
    }

    #[test]
    fn rendezvous_is_weighted_and_stable() {
        let s = set(&[("a", 1), ("b", 1), ("c", 2)]);
        let c = counts(&s, Policy::Rendezvous, 20_000);
        let share_c = c["c"] as f64 / 20_000.0;
        assert!((share_c - 0.5).abs() < 0.03, "{c:?}");
        // Same key, same answer, on a freshly built set (another instance).
        let s2 = set(&[("a", 1), ("b", 1), ("c", 2)]);
        for i in 0..1000u128 {
            let k = KeyHash(i * 7919);
            assert_eq!(
                rendezvous(&s, k, &[], 0).unwrap().id,
                rendezvous(&s2, k, &[], 0).unwrap().id
            );
        }
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_removed_backend() {
        let full = set(&[("a", 1), ("b", 1), ("c", 1)]);
        let less = set(&[("a", 1), ("b", 1)]);
        for i in 0..2000u128 {
            let k = KeyHash(i * 104_729);
            let before = rendezvous(&full, k, &[], 0).unwrap();
            let after = rendezvous(&less, k, &[], 0).unwrap();
            if &*before.id != "c" {
                assert_eq!(before.id, after.id);
            }
        }
    }

    #[test]
    fn draining_takes_no_new_keys_and_disabled_takes_nothing() {
        let s = set(&[("a", 1), ("b", 1), ("c", 1)]);
        s.all()[0].set_admin_state(AdminState::Draining { deadline_ms: None });
        s.all()[1].set_admin_state(AdminState::Disabled);
        for p in [
            Policy::RoundRobin,
            Policy::LeastConnections,
            Policy::Weighted,
            Policy::Rendezvous,
        ] {
            for i in 0..20u128 {
                assert_eq!(&*pick(&s, p, Some(KeyHash(i)), &[], 0).unwrap().id, "c");
            }
        }
        // Only draining and disabled left: draining still beats a 503, disabled never serves.
        let c = s.all()[2].key;
        assert_eq!(
            &*pick(&s, Policy::RoundRobin, None, &[c], 0).unwrap().id,
            "a"
        );
        s.all()[0].set_admin_state(AdminState::Disabled);
        assert!(pick(&s, Policy::RoundRobin, None, &[c], 0).is_none());
    }

    #[test]
    fn ejected_and_excluded_backends_are_skipped_until_nothing_else_is_left() {
        let s = set(&[("a", 1), ("b", 1)]);
        let a = s.all()[0].clone();
        let b = s.all()[1].clone();
        a.eject(0, Duration::from_secs(10));
        for p in [
            Policy::RoundRobin,
            Policy::LeastConnections,
            Policy::Weighted,
        ] {
            for _ in 0..10 {
                assert_eq!(&*pick(&s, p, None, &[], 5).unwrap().id, "b");
            }
        }
        assert_eq!(&*rendezvous(&s, KeyHash(1), &[], 5).unwrap().id, "b");
        // b excluded for this request: the ejected a is better than nothing.
        assert_eq!(
            &*pick(&s, Policy::RoundRobin, None, &[b.key], 5).unwrap().id,
            "a"
        );
        assert!(pick(&s, Policy::RoundRobin, None, &[a.key, b.key], 5).is_none());
    }
}
