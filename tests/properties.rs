//! Property tests of everything tether parses from clients, backends and operators: cookie and
//! key extraction, insert-cookie verification, Engine.IO handshake parsing, `Set-Cookie`
//! parsing and configuration files. Each property says what must hold for *any* input, and the
//! first one in every group is "does not panic" (panics are for broken invariants, never for bad
//! input).
//!
//! Written against the public API only (`tether::affinity`, `tether::config`): the settings come
//! from parsing a config text, so the tests do not depend on how those structs are built, and
//! insert cookies are checked through `set_cookie`/`verify`, not their format.
//!
//! Case counts are kept small enough for the whole file to run in a few seconds in a debug
//! build; raise them for a one-off search with `PROPTEST_CASES=10000`.

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

use tether::affinity::cookie::{InsertCookies, find_cookie, parse_set_cookie};
use tether::affinity::{
    Extractor, KeyHasher, engine_io_sid, ip_key, is_engine_io_handshake, query_param,
};
use tether::config::{Config, EnvOverrides, KeySource, redact_url};

/// Cases for the cheap properties (pure parsing).
const CASES: u32 = 512;
/// Cases for properties that sign or parse whole config files.
const FEW_CASES: u32 = 128;

const HASH_KEY: &str = "property-test-hash-key-0123456789";
const INSERT_SECRET: &str = "property-test-insert-secret-0123";
/// The shipped, fully commented example: the seed of the config mutations.
const SHIPPED_CONFIG: &str = include_str!("../conf/tether.toml");

/// A config with every key source, in the order the README documents (`ip` last).
fn config_text(sources: &str, max_key_bytes: usize) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:18080\"]\n\n[affinity]\nhash_key = \"{HASH_KEY}\"\n\
         sources = [{sources}]\nmax_key_bytes = {max_key_bytes}\n\n\
         [affinity.insert]\nsecrets = [\"{INSERT_SECRET}\"]\n\n\
         [[backend]]\nid = \"a\"\naddress = \"127.0.0.1:3001\"\n"
    )
}

fn parse_ok(text: &str) -> Config {
    Config::parse(Path::new("prop.toml"), text, &EnvOverrides::default())
        .unwrap_or_else(|e| panic!("the test config does not parse:\n{e}\n{text}"))
}

/// The `max_key_bytes` values the extraction properties try.
const MAX_KEY_BYTES: [usize; 3] = [16, 64, 256];

/// Extractors for `sources`, one per [`MAX_KEY_BYTES`] value, built once.
fn extractor(
    cache: &'static OnceLock<Vec<Extractor>>,
    sources: &str,
    max_key_bytes: usize,
) -> &'static Extractor {
    let all = cache.get_or_init(|| {
        MAX_KEY_BYTES
            .iter()
            .map(|max| {
                let c = parse_ok(&config_text(sources, *max));
                Extractor::new(&c.affinity, KeyHasher::new(HASH_KEY.as_bytes()))
            })
            .collect()
    });
    let i = MAX_KEY_BYTES
        .iter()
        .position(|m| *m == max_key_bytes)
        .expect("one of MAX_KEY_BYTES");
    &all[i]
}

/// Every source, insert included: extraction always yields a key (minted if need be).
fn extractor_all_sources(max_key_bytes: usize) -> &'static Extractor {
    static CACHE: OnceLock<Vec<Extractor>> = OnceLock::new();
    extractor(
        &CACHE,
        "\"cookie:sid\", \"insert\", \"header:x-session-id\", \"query:sid\", \"ip\"",
        max_key_bytes,
    )
}

/// Every source but insert: extraction is a pure function of the request.
fn extractor_deterministic(max_key_bytes: usize) -> &'static Extractor {
    static CACHE: OnceLock<Vec<Extractor>> = OnceLock::new();
    extractor(
        &CACHE,
        "\"cookie:sid\", \"header:x-session-id\", \"query:sid\", \"ip\"",
        max_key_bytes,
    )
}

fn insert_cookies() -> &'static InsertCookies {
    static COOKIES: OnceLock<InsertCookies> = OnceLock::new();
    COOKIES.get_or_init(|| {
        let c = parse_ok(&config_text("\"insert\"", 256));
        InsertCookies::new(
            c.affinity
                .insert
                .as_ref()
                .expect("insert settings with the insert source"),
        )
    })
}

/// The cookie value in a `Set-Cookie` header value (`name=value; attributes`).
fn set_cookie_value<'a>(set_cookie: &'a str, name: &str) -> &'a str {
    set_cookie
        .split(';')
        .next()
        .and_then(|pair| pair.strip_prefix(name))
        .and_then(|rest| rest.strip_prefix('='))
        .unwrap_or_else(|| panic!("not a {name} Set-Cookie: {set_cookie}"))
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Bytes `http::HeaderValue` accepts (what Pingora hands tether): any byte but controls other
/// than HTAB, and DEL. Biased towards the separators cookie parsing cares about.
fn header_value_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => prop::sample::select(b"=; \t\",sid".to_vec()),
        2 => 0x20u8..0x7f,
        1 => 0x80u8..=0xff,
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..max).prop_map(|v| {
        v.into_iter()
            .filter(|b| HeaderValue::from_bytes(&[*b]).is_ok())
            .collect()
    })
}

/// Query strings: any Unicode, and (mostly) `&`/`=`/`%`-heavy text around `sid`/`EIO`.
fn query_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(
            prop_oneof![
                Just("sid".to_string()),
                Just("EIO".to_string()),
                Just("=".to_string()),
                Just("&".to_string()),
                Just("%".to_string()),
                "%[0-9a-fA-FzZ]{0,2}",
                "[a-z0-9_.~+-]{0,4}",
                any::<char>().prop_map(String::from),
            ],
            0..24
        )
        .prop_map(|parts| parts.concat()),
    ]
}

fn ip() -> impl Strategy<Value = Option<IpAddr>> {
    prop_oneof![
        1 => Just(None),
        2 => any::<[u8; 4]>().prop_map(|o| Some(IpAddr::from(o))),
        2 => any::<[u8; 16]>().prop_map(|o| Some(IpAddr::from(o))),
    ]
}

/// A request's headers: cookies, the session header and others, values as Pingora would pass.
fn request_headers() -> impl Strategy<Value = HeaderMap> {
    let name = prop::sample::select(vec!["cookie", "x-session-id", "x-other", "set-cookie"]);
    prop::collection::vec((name, header_value_bytes(160)), 0..6).prop_map(|pairs| {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            let value = HeaderValue::from_bytes(&value).expect("filtered to valid bytes");
            h.append(HeaderName::from_static(name), value);
        }
        h
    })
}

/// A cookie name or value without the bytes that delimit pairs (`;`, `=`), quotes or spaces.
fn cookie_token(min: usize) -> impl Strategy<Value = String> {
    prop::string::string_regex(&format!("[A-Za-z0-9!#$%&'*+.^_`|~:/?@-]{{{min},12}}"))
        .expect("valid regex")
}

/// Engine.IO session ids as servers mint them (base64url-ish, plus `.` and `~`).
fn engine_io_id() -> impl Strategy<Value = String> {
    prop::string::string_regex("[A-Za-z0-9_.~-]{1,128}").expect("valid regex")
}

/// Backend ids the config accepts: 1 to 64 of A-Z a-z 0-9 _ -.
fn backend_id() -> impl Strategy<Value = String> {
    prop::string::string_regex("[A-Za-z0-9_-]{1,64}").expect("valid regex")
}

// ---------------------------------------------------------------------------------------------
// Key extraction
// ---------------------------------------------------------------------------------------------

/// What the extractor should pick among cookie:sid, header:x-session-id, query:sid, ip: the
/// first source present whose value fits in `max` bytes.
fn expected_source(
    headers: &HeaderMap,
    query: Option<&str>,
    peer: Option<IpAddr>,
    max: usize,
) -> Option<(usize, Vec<u8>)> {
    let cookies = headers
        .get_all(http::header::COOKIE)
        .iter()
        .map(|v| v.as_bytes());
    let cookie = find_cookie(cookies, b"sid").map(<[u8]>::to_vec);
    let header = headers
        .get("x-session-id")
        .map(|v| v.as_bytes().to_vec())
        .filter(|v| !v.is_empty());
    let query = query
        .and_then(|q| query_param(q, "sid"))
        .map(Cow::into_owned);
    let ip = peer.map(ip_key);
    [cookie, header, query, ip]
        .into_iter()
        .enumerate()
        .find_map(|(i, v)| v.filter(|v| v.len() <= max).map(|v| (i, v)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Any request: no panic; with `insert` configured there is always a key, from a configured
    /// source.
    #[test]
    fn extraction_never_panics(
        headers in request_headers(),
        query in prop::option::of(query_string()),
        peer in ip(),
        max in prop::sample::select(MAX_KEY_BYTES.to_vec()),
    ) {
        let e = extractor_all_sources(max);
        let out = e.extract(&headers, query.as_deref(), peer);
        let key = out.key.expect("insert mints a key when nothing else is present");
        prop_assert!(key.source < e.sources().len());
    }

    /// Without `insert`, the key is exactly the first present source whose value fits in
    /// `max_key_bytes`, hashed with that source's tag; the same request always gives the same
    /// hash; a present but too long value is reported.
    #[test]
    fn extraction_takes_the_first_usable_source(
        headers in request_headers(),
        query in prop::option::of(query_string()),
        peer in ip(),
        max in prop::sample::select(MAX_KEY_BYTES.to_vec()),
    ) {
        let e = extractor_deterministic(max);
        let out = e.extract(&headers, query.as_deref(), peer);
        let again = e.extract(&headers, query.as_deref(), peer);
        match expected_source(&headers, query.as_deref(), peer, max) {
            None => prop_assert!(out.key.is_none()),
            Some((source, value)) => {
                let key = out.key.expect("a usable source is present");
                prop_assert_eq!(key.source, source);
                prop_assert_eq!(key.hash, e.hash_for(source, &value));
                prop_assert!(key.insert.is_none());
                prop_assert_eq!(Some(key.hash), again.key.map(|k| k.hash));
            }
        }
    }

    /// The documented rule in isolation: a session cookie longer than `max_key_bytes` counts
    /// as absent (the next source decides) and is reported as too long.
    #[test]
    fn oversized_cookie_keys_are_absent(
        len in 65usize..4096,
        fill in prop::sample::select(b"a*?[]\\%\xff".to_vec()),
        peer in ip(),
    ) {
        let e = extractor_deterministic(64);
        let mut cookie = b"sid=".to_vec();
        cookie.extend(std::iter::repeat_n(fill, len));
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, HeaderValue::from_bytes(&cookie).expect("valid bytes"));
        let out = e.extract(&h, None, peer);
        prop_assert_eq!(out.invalid.map(|i| i.as_str()), Some("too_long"));
        prop_assert_eq!(out.key.map(|k| k.source), peer.map(|_| 3));
    }

    /// `find_cookie` on arbitrary bytes: no panic; a value found is non-empty, holds no `;`,
    /// and lies inside one of the headers.
    #[test]
    fn find_cookie_never_panics(
        headers in prop::collection::vec(header_value_bytes(200), 0..4),
        name in prop::collection::vec(any::<u8>(), 0..6),
    ) {
        if let Some(v) = find_cookie(headers.iter().map(Vec::as_slice), &name) {
            prop_assert!(!v.is_empty());
            prop_assert!(!v.contains(&b';'));
            prop_assert!(headers.iter().any(|h| h.windows(v.len()).any(|w| w == v)));
        }
    }

    /// `find_cookie` on well-formed headers (any spacing, several `Cookie` headers, empty
    /// values, quoted values) returns the first non-empty value of the name.
    #[test]
    fn find_cookie_returns_the_first_non_empty_value(
        headers in prop::collection::vec(
            prop::collection::vec(
                (
                    prop_oneof![Just("sid".to_string()), cookie_token(1)],
                    prop_oneof![Just(String::new()), cookie_token(1)],
                    any::<bool>(),
                    prop::sample::select(vec![";", "; ", " ;  ", ";\t"]),
                ),
                0..5,
            ),
            1..3,
        ),
    ) {
        let mut expected = None;
        let mut wire: Vec<Vec<u8>> = Vec::new();
        for pairs in &headers {
            let mut text = String::new();
            for (name, value, quoted, sep) in pairs {
                if !text.is_empty() {
                    text.push_str(sep);
                }
                if *quoted {
                    text.push_str(&format!("{name}=\"{value}\""));
                } else {
                    text.push_str(&format!("{name}={value}"));
                }
                if expected.is_none() && name == "sid" && !value.is_empty() {
                    expected = Some(value.clone());
                }
            }
            wire.push(text.into_bytes());
        }
        let found = find_cookie(wire.iter().map(Vec::as_slice), b"sid");
        prop_assert_eq!(found, expected.as_deref().map(str::as_bytes));
    }
}

// ---------------------------------------------------------------------------------------------
// Query parameters and Engine.IO
// ---------------------------------------------------------------------------------------------

/// `%XX` for every byte, the way a client percent-encodes an opaque value.
fn percent_encode_all(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// A v4 open packet as Engine.IO servers write it.
fn handshake_v4(sid: &str, upgrades: &[&str], ping: u32) -> String {
    let upgrades: Vec<String> = upgrades.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "0{{\"sid\":\"{sid}\",\"upgrades\":[{}],\"pingInterval\":{ping},\"pingTimeout\":20000,\
         \"maxPayload\":1000000}}",
        upgrades.join(",")
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Any query string: no panic, and a handshake is exactly "EIO present, sid absent".
    #[test]
    fn query_parsing_never_panics(query in query_string(), name in "[a-zA-Z]{0,4}") {
        let _ = query_param(&query, &name);
        let handshake = is_engine_io_handshake(Some(&query));
        prop_assert_eq!(
            handshake,
            query_param(&query, "EIO").is_some() && query_param(&query, "sid").is_none()
        );
    }

    /// Any byte string percent-encoded as a query value decodes back to itself, wherever the
    /// parameter stands; the first occurrence wins.
    #[test]
    fn percent_encoded_values_round_trip(
        value in prop::collection::vec(any::<u8>(), 1..64),
        other in prop::collection::vec(any::<u8>(), 1..8),
        before in "x[a-z]{0,2}=[a-z0-9]{0,3}",
    ) {
        let query = format!(
            "{before}&sid={}&sid={}",
            percent_encode_all(&value),
            percent_encode_all(&other)
        );
        let decoded = query_param(&query, "sid").expect("present");
        prop_assert_eq!(decoded.as_ref(), value.as_slice());
    }

    /// Any response body: no panic, and a sid found is 1..=128 bytes of the Engine.IO alphabet
    /// taken from the body.
    #[test]
    fn engine_io_sid_never_panics(body in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Some(sid) = engine_io_sid(&body) {
            prop_assert!((1..=128).contains(&sid.len()));
            prop_assert!(sid.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(b)));
            prop_assert!(body.windows(sid.len()).any(|w| w == sid));
        }
    }

    /// Bytes that merely look like a handshake (a sid field anywhere, junk around it): still no
    /// panic, and never a sid outside the Engine.IO alphabet.
    #[test]
    fn engine_io_lookalikes_never_panic(
        prefix in prop::collection::vec(prop::sample::select(b"0123456789:{x\"".to_vec()), 0..6),
        sid in prop::collection::vec(any::<u8>(), 0..140),
        suffix in prop::collection::vec(any::<u8>(), 0..10),
    ) {
        let mut body = prefix;
        body.extend_from_slice(b"{\"sid\":\"");
        body.extend_from_slice(&sid);
        body.extend_from_slice(&suffix);
        if let Some(found) = engine_io_sid(&body) {
            prop_assert!(found.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(b)));
        }
    }

    /// A real handshake body (v4, or v3 with its length prefix and further packets) yields its
    /// sid as soon as the sid's closing quote has arrived, and not before: tether reads the sid
    /// out of the first chunks of the body.
    #[test]
    fn valid_handshakes_yield_their_sid(
        sid in engine_io_id(),
        websocket in any::<bool>(),
        ping in 1u32..100_000,
        v3 in any::<bool>(),
    ) {
        let upgrades: &[&str] = if websocket { &["websocket"] } else { &[] };
        let packet = handshake_v4(&sid, upgrades, ping);
        let body = if v3 {
            format!("{}:{packet}2:40", packet.len())
        } else {
            packet
        };
        let body = body.as_bytes();
        prop_assert_eq!(engine_io_sid(body), Some(sid.as_bytes()));
        let field = "\"sid\":\"";
        let sid_end = body
            .windows(field.len())
            .position(|w| w == field.as_bytes())
            .expect("the field is there")
            + field.len()
            + sid.len();
        for cut in 0..=body.len() {
            let expected = (cut > sid_end).then_some(sid.as_bytes());
            prop_assert_eq!(engine_io_sid(&body[..cut]), expected, "cut at {}", cut);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Set-Cookie
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Any `Set-Cookie` bytes from a backend: no panic; a parsed name is non-empty.
    #[test]
    fn set_cookie_parsing_never_panics(header in header_value_bytes(300)) {
        if let Some(c) = parse_set_cookie(&header) {
            prop_assert!(!c.name.is_empty());
        }
    }

    /// A well-formed `Set-Cookie` gives back its name and value; it is a removal exactly when
    /// the value is empty, `Max-Age` <= 0 or `Expires` is in 1970.
    #[test]
    fn set_cookie_name_value_and_removal(
        name in cookie_token(1),
        value in prop_oneof![Just(String::new()), cookie_token(1)],
        max_age in prop::option::of(-5i64..100_000),
        expired in any::<bool>(),
        path in any::<bool>(),
    ) {
        let mut header = format!("{name}={value}");
        if path {
            header.push_str("; Path=/");
        }
        if let Some(age) = max_age {
            header.push_str(&format!("; Max-Age={age}"));
        }
        if expired {
            header.push_str("; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
        }
        header.push_str("; HttpOnly");
        let c = parse_set_cookie(header.as_bytes()).expect("well formed");
        prop_assert_eq!(c.name, name.as_bytes());
        prop_assert_eq!(c.value, value.as_bytes());
        let removal = value.is_empty() || max_age.is_some_and(|a| a <= 0) || expired;
        prop_assert_eq!(c.removal, removal);
    }
}

// ---------------------------------------------------------------------------------------------
// Insert cookies
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(FEW_CASES))]

    /// Arbitrary cookie values (and ones shaped like a signed cookie): never a panic, never
    /// valid.
    #[test]
    fn arbitrary_insert_cookies_never_verify(
        junk in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            "[A-Za-z0-9_-]{22}\\.(v2\\.[0-9]{1,12}\\.)?[A-Za-z0-9_-]{1,64}\\.[A-Za-z0-9_-]{22}"
                .prop_map(String::into_bytes),
        ],
    ) {
        let c = insert_cookies();
        prop_assert!(c.verify(&junk).is_none());
    }

    /// A minted key signed for any valid backend id verifies, giving back the key and the id.
    #[test]
    fn signed_insert_cookies_verify(backend in backend_id()) {
        let c = insert_cookies();
        let key = InsertCookies::mint();
        let header = c.set_cookie(key.as_bytes(), &backend, false);
        let value = set_cookie_value(&header, &c.name);
        let v = c.verify(value.as_bytes()).expect("a cookie tether just signed verifies");
        prop_assert_eq!(v.key, key.as_bytes());
        prop_assert_eq!(v.backend_hint, backend.as_str());
    }

    /// Any single-byte change (substitution, deletion or insertion) of a signed cookie never
    /// verifies.
    #[test]
    fn edited_insert_cookies_never_verify(
        backend in backend_id(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        edit in 0u8..3,
    ) {
        let c = insert_cookies();
        let key = InsertCookies::mint();
        let header = c.set_cookie(key.as_bytes(), &backend, false);
        let mut value = set_cookie_value(&header, &c.name).as_bytes().to_vec();
        let i = at.index(value.len());
        match edit {
            0 => {
                let replacement = if value[i] == byte { byte.wrapping_add(1) } else { byte };
                value[i] = replacement;
            }
            1 => {
                value.remove(i);
            }
            _ => value.insert(i, byte),
        }
        prop_assert!(c.verify(&value).is_none(), "edited cookie verified: {:?}", value.escape_ascii().to_string());
    }
}

/// Exhaustively for one cookie: every position, every other byte value.
#[test]
fn every_single_byte_substitution_is_rejected() {
    let c = insert_cookies();
    let key = InsertCookies::mint();
    let header = c.set_cookie(key.as_bytes(), "backend-7", false);
    let good = set_cookie_value(&header, &c.name).as_bytes().to_vec();
    assert!(c.verify(&good).is_some());
    for i in 0..good.len() {
        for b in 0..=u8::MAX {
            if b == good[i] {
                continue;
            }
            let mut bad = good.clone();
            bad[i] = b;
            assert!(
                c.verify(&bad).is_none(),
                "byte {i} set to {b:#04x} still verifies: {}",
                bad.escape_ascii()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration files
// ---------------------------------------------------------------------------------------------

/// Lines of `text` as `line_col` counts them (a final newline starts one more, empty line).
fn line_count(text: &str) -> usize {
    text.matches('\n').count() + 1
}

/// Parse `text`: must not panic; every error must point inside the text.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    let Err(e) = Config::parse(Path::new("fuzz.toml"), text, &EnvOverrides::default()) else {
        return Ok(());
    };
    prop_assert!(!e.diagnostics.is_empty(), "an error without diagnostics");
    let lines: Vec<&str> = text.split('\n').collect();
    for d in &e.diagnostics {
        let Some((line, col)) = d.position else {
            return Err(TestCaseError::fail(format!(
                "diagnostic without a position: {:?}\n--- text ---\n{text}",
                d.message
            )));
        };
        prop_assert!(
            (1..=line_count(text)).contains(&line),
            "line {} outside 1..={}: {}",
            line,
            line_count(text),
            d.message
        );
        let width = lines[line - 1].chars().count();
        prop_assert!(
            (1..=width + 1).contains(&col),
            "column {} outside line {} ({} chars): {}",
            col,
            line,
            width,
            d.message
        );
        // The rendered form is what `tether check` prints: it names the position.
        let rendered = format!("fuzz.toml:{line}:{col}: ");
        prop_assert!(
            e.to_string().contains(&rendered),
            "{} not in {}",
            rendered,
            e
        );
    }
    Ok(())
}

/// Text made of TOML's punctuation and tether's own keys and values, so that many inputs get
/// past the TOML parser into validation.
fn toml_ish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("\n".to_string()),
        Just(" = ".to_string()),
        Just("\"".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("[[backend]]\n".to_string()),
        Just("[server]\n".to_string()),
        Just("[affinity]\n".to_string()),
        Just("[affinity.insert]\n".to_string()),
        Just("[upstream]\n".to_string()),
        Just("[redis]\n".to_string()),
        Just("[health]\n".to_string()),
        Just("[admin]\n".to_string()),
        prop::sample::select(vec![
            "id",
            "address",
            "weight",
            "listen",
            "threads",
            "sources",
            "policy",
            "ttl_secs",
            "hash_key",
            "max_key_bytes",
            "secrets",
            "same_site",
            "url",
            "timeout_ms",
            "rise",
            "interval_ms",
            "path",
            "cookie",
            "token",
            "read_timeout_ms",
        ])
        .prop_map(str::to_string),
        prop::sample::select(vec![
            "\"a\"",
            "\"127.0.0.1:1\"",
            "0",
            "1",
            "-1",
            "99999999999999999999",
            "true",
            "1.5",
            "[\"ip\"]",
            "[\"cookie:sid\", \"insert\"]",
            "\"round_robin\"",
            "\"0123456789abcdef0123\"",
            "\"redis+unix:///tmp/x.sock\"",
            "{}",
            "'é'",
            "#",
        ])
        .prop_map(str::to_string),
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

/// One edit of a config text.
#[derive(Debug, Clone)]
enum Edit {
    /// Remove `len` bytes at a position.
    Delete(prop::sample::Index, usize),
    /// Insert text at a position.
    Insert(prop::sample::Index, String),
    /// Duplicate a line (a key or a section header given twice).
    DuplicateLine(prop::sample::Index),
    /// Remove a line.
    DeleteLine(prop::sample::Index),
    /// Swap two lines (keys change sections).
    SwapLines(prop::sample::Index, prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let snippet = prop_oneof![
        toml_ish(),
        any::<String>(),
        prop::sample::select(vec![
            "\n",
            "\"",
            "=",
            "]",
            "[",
            "#",
            "0",
            "\u{e9}",
            "\u{1F600}"
        ])
        .prop_map(str::to_string),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), 1usize..40).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<prop::sample::Index>(), snippet).prop_map(|(i, s)| Edit::Insert(i, s)),
        any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
        any::<prop::sample::Index>().prop_map(Edit::DeleteLine),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Edit::SwapLines(a, b)),
    ]
}

/// Byte ranges of `address = "..."` values: edits stay out of them, so no mutation turns a
/// numeric address into a host name that validation would look up in DNS.
fn protected_ranges(text: &str) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with("address") {
            out.push(offset..offset + line.len());
        }
        offset += line.len();
    }
    out
}

/// The nearest char boundary at or before `i`, outside the protected ranges (or `None`).
fn edit_point(text: &str, i: usize) -> Option<usize> {
    let mut i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    let protected = protected_ranges(text);
    (!protected.iter().any(|r| r.contains(&i) && i != r.start)).then_some(i)
}

fn apply(text: &str, edit: &Edit) -> String {
    let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
    let is_address = |l: &str| l.trim_start().starts_with("address");
    match edit {
        Edit::Delete(at, len) => {
            let Some(start) = edit_point(text, at.index(text.len() + 1)) else {
                return text.to_string();
            };
            let mut end = (start + len).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            if protected_ranges(text)
                .iter()
                .any(|r| r.start < end && start < r.end)
            {
                return text.to_string();
            }
            format!("{}{}", &text[..start], &text[end..])
        }
        Edit::Insert(at, snippet) => {
            if snippet.contains("address") {
                return text.to_string();
            }
            match edit_point(text, at.index(text.len() + 1)) {
                Some(i) => format!("{}{snippet}{}", &text[..i], &text[i..]),
                None => text.to_string(),
            }
        }
        Edit::DuplicateLine(at) if !lines.is_empty() => {
            let i = at.index(lines.len());
            let line = lines[i];
            lines.insert(i, line);
            lines.concat()
        }
        Edit::DeleteLine(at) if !lines.is_empty() => {
            let i = at.index(lines.len());
            if !is_address(lines[i]) {
                lines.remove(i);
            }
            lines.concat()
        }
        Edit::SwapLines(a, b) if !lines.is_empty() => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
            // Keep every line newline-terminated, so the swap does not join two lines.
            lines
                .iter()
                .map(|l| {
                    if l.ends_with('\n') {
                        l.to_string()
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect()
        }
        _ => text.to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(FEW_CASES))]

    /// Any string: no panic; errors point inside the text.
    #[test]
    fn config_parsing_never_panics_on_any_text(text in any::<String>()) {
        check_config(&text)?;
    }

    /// TOML-shaped text with tether's keys: no panic; errors point inside the text.
    #[test]
    fn config_parsing_never_panics_on_toml_ish_text(text in toml_ish()) {
        check_config(&text)?;
    }

    /// The shipped config after a few random edits: no panic; errors point inside the text.
    #[test]
    fn config_parsing_never_panics_on_mutated_shipped_config(
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        let mut text = SHIPPED_CONFIG.to_string();
        for e in &edits {
            text = apply(&text, e);
        }
        check_config(&text)?;
    }

    /// `redact_url` (used on every Redis URL and error that reaches a log): no panic on any
    /// text, and a `scheme://user:password@host` form never shows the password.
    #[test]
    fn redact_url_never_panics_or_leaks(
        text in any::<String>(),
        password in "[A-Za-z0-9]{8,16}",
        host in "[a-z]{1,8}(:[0-9]{1,5})?",
    ) {
        let _ = redact_url(&text);
        let url = format!("redis://user:{password}@{host}/0");
        prop_assert!(!redact_url(&url).contains(&password));
    }
}

/// The seed of the mutations must itself be valid, or the mutations test little.
#[test]
fn the_shipped_config_parses() {
    parse_ok(SHIPPED_CONFIG);
}

/// The fixture the extraction properties rely on: every source, in the configured order.
#[test]
fn the_fixture_has_every_source() {
    let e = extractor_all_sources(256);
    assert_eq!(
        e.sources(),
        &[
            KeySource::Cookie("sid".into()),
            KeySource::Insert,
            KeySource::Header(HeaderName::from_static("x-session-id")),
            KeySource::Query("sid".into()),
            KeySource::Ip,
        ]
    );
}
