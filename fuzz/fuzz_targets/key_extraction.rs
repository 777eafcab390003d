//! A request's affinity key from its cookies, a header, the query and the peer
//! (`tether::affinity::Extractor`, every source configured, insert cookies signed by two
//! secrets). The input is split at 0xFF bytes into: the query, the `x-session` value, then any
//! number of `Cookie` field values. No panic; the same request gives the same key; a presented
//! insert cookie is one the signer verifies.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tether::affinity::cookie::find_cookie;
use tether::affinity::{Extractor, InsertKey, KeyHasher, query_param};

#[path = "common.rs"]
mod common;

static EXTRACTOR: LazyLock<Extractor> = LazyLock::new(|| {
    Extractor::new(
        &common::config().affinity,
        KeyHasher::new(b"fuzzing hash key"),
    )
});

/// A fixed "now", a day after the epoch of the cookies the corpus holds.
const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0xff);
    let query = parts.next().and_then(|q| std::str::from_utf8(q).ok());
    let session = parts.next().unwrap_or_default();
    let cookies: Vec<&[u8]> = parts.collect();
    let mut headers = vec![httparse::Header {
        name: "x-session",
        value: session,
    }];
    headers.extend(cookies.iter().map(|c| httparse::Header {
        name: "Cookie",
        value: c,
    }));
    let peer = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));

    let ex = &*EXTRACTOR;
    let first = ex.extract_at(&headers[..], query, peer, NOW);
    let again = ex.extract_at(&headers[..], query, peer, NOW);
    let key = first.key.expect("the ip source always yields a key");
    let again = again.key.expect("the ip source always yields a key");
    assert_eq!(key.source, again.source);
    assert!(key.source < ex.sources().len());
    match &key.insert {
        // A minted key is new each time; everything else is a function of the request.
        Some(InsertKey::Minted { .. }) => {}
        Some(InsertKey::Presented { raw, .. }) => {
            assert_eq!(key.hash, again.hash);
            let value = find_cookie(cookies.iter().copied(), b"tether").expect("it was presented");
            let checked = ex
                .insert_cookies()
                .expect("insert is configured")
                .check(value, NOW)
                .expect("a presented cookie verifies");
            assert_eq!(checked.key, raw.as_bytes());
        }
        None => assert_eq!(key.hash, again.hash),
    }
    if let Some(q) = query {
        // Percent-decoding never grows a value.
        if let Some(v) = query_param(q, "sid") {
            assert!(v.len() <= q.len());
        }
    }
});
