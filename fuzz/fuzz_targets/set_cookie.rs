//! `Set-Cookie` values from backends (`parse_set_cookie`, which affinity learns pins from) and
//! insert cookies from clients (`InsertCookies::check`). No panic; what parses is a part of the
//! input; a cookie tether signs verifies, and flipping any byte of it does not.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tether::affinity::cookie::{InsertCookies, Rejected, parse_set_cookie};

#[path = "common.rs"]
mod common;

static COOKIES: LazyLock<InsertCookies> = LazyLock::new(|| {
    InsertCookies::new(
        common::config()
            .affinity
            .insert
            .as_ref()
            .expect("insert is configured"),
    )
});

const NOW: u64 = 1_800_000_000;

fn within(part: &[u8], whole: &[u8]) -> bool {
    let range = whole.as_ptr_range();
    part.is_empty() || (range.contains(&part.as_ptr()) && part.len() <= whole.len())
}

fuzz_target!(|data: &[u8]| {
    if let Some(c) = parse_set_cookie(data) {
        assert!(within(c.name, data) && within(c.value, data));
        if c.value.is_empty() {
            assert!(c.removal, "an empty value is a removal");
        }
    }
    let cookies = &*COOKIES;
    if let Ok(c) = cookies.check(data, NOW) {
        assert!(within(c.key, data));
        assert!(c.key.iter().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(b)));
    }
    // A cookie tether issued, with one byte the input picks changed, is refused; unchanged it
    // verifies.
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let key = "AAAAAAAAAAAAAAAAAAAAAA";
    let issued = NOW - u64::from(which);
    let header = cookies.set_cookie_at(key.as_bytes(), "b", issued, false);
    let value = parse_set_cookie(header.as_bytes())
        .expect("tether's own Set-Cookie parses")
        .value
        .to_vec();
    let ok = cookies.check(&value, NOW).expect("tether's own cookie verifies");
    assert_eq!(ok.key, key.as_bytes());
    assert_eq!(ok.backend_hint, "b");
    if let Some(&flip) = rest.first() {
        let mut forged = value.clone();
        let at = usize::from(which) % forged.len();
        forged[at] ^= flip | 1;
        assert!(
            matches!(cookies.check(&forged, NOW), Err(Rejected::Forged)),
            "a changed cookie verified: {:?}",
            String::from_utf8_lossy(&forged)
        );
    }
});
