//! Affinity keys: where they come from, how they are hashed, where pins are kept.
//!
//! - this file: extracting a key from a request (sources tried in configured order) and hashing
//!   it with a keyed hash, so raw session ids never reach Redis or a log line;
//! - [`cookie`]: cookie parsing and tether's own signed cookie;
//! - [`cache`]: the per-instance pin cache;
//! - [`redis`]: the shared pin map in Redis, its refresher, invalidation and outage handling.
//!
//! Choosing a backend is not here (see [`crate::selection`], orchestrated by [`crate::routing`]).

pub mod cache;
pub mod cookie;
pub mod redis;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use http::HeaderMap;

use crate::config::{AffinitySettings, KeySource};
use cookie::InsertCookies;

/// The keyed hash of an affinity key: what Redis, the cache and the logs see.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub u128);

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

/// The 32 lowercase hex digits of a [`KeyHash`], without going through `fmt` (a new session
/// writes its key into two Redis arguments).
pub struct Hex([u8; 32]);

impl Hex {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl KeyHash {
    /// The hash as 32 lowercase hex digits, as [`Display`](fmt::Display) writes it.
    pub fn hex(&self) -> Hex {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in self.0.to_be_bytes().iter().enumerate() {
            out[2 * i] = DIGITS[(b >> 4) as usize];
            out[2 * i + 1] = DIGITS[(b & 0xf) as usize];
        }
        Hex(out)
    }

    /// Parse the 32 hex digits of [`Display`](fmt::Display).
    pub fn parse(hex: &str) -> Option<KeyHash> {
        (hex.len() == 32)
            .then(|| u128::from_str_radix(hex, 16).ok())
            .flatten()
            .map(KeyHash)
    }
}

/// Key-hash inputs up to this long (4 bytes of tag length, the tag, the value) are hashed from a
/// buffer on the stack in one call; longer ones are streamed.
const HASH_INPUT_ON_STACK: usize = 256;

/// BLAKE3 in keyed mode: a PRF, so hashes reveal nothing about session ids and cannot be
/// precomputed without the key; the same key gives every instance the same hashes.
#[derive(Clone)]
pub struct KeyHasher {
    key: [u8; 32],
}

impl KeyHasher {
    /// Derive the 32-byte hash key from the configured secret.
    pub fn new(secret: &[u8]) -> KeyHasher {
        KeyHasher {
            key: blake3::derive_key("tether 2026 affinity key hash v1", secret),
        }
    }

    /// A key drawn at random (the in-process map, which no other instance reads).
    pub fn random() -> KeyHasher {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random source is available");
        KeyHasher { key }
    }

    /// Hash `value` as found by the source tagged `tag`. The tag keeps sources apart: the same
    /// string in a cookie and in a header are different keys.
    pub fn hash(&self, tag: &[u8], value: &[u8]) -> KeyHash {
        // Every keyed request hashes its key: the input gathered on the stack and hashed in one
        // call when it fits (`keyed_hash`: no incremental hasher, whose three updates cost ~170
        // of ~760 instructions for a short session id), else streamed. The same bytes either
        // way, so the same hash.
        let mut buf = [0u8; HASH_INPUT_ON_STACK];
        let len = 4 + tag.len() + value.len();
        let out = if len <= buf.len() {
            buf[..4].copy_from_slice(&(tag.len() as u32).to_le_bytes());
            buf[4..4 + tag.len()].copy_from_slice(tag);
            buf[4 + tag.len()..len].copy_from_slice(value);
            blake3::keyed_hash(&self.key, &buf[..len])
        } else {
            self.hash_streamed(tag, value)
        };
        let bytes: [u8; 16] = out.as_bytes()[..16].try_into().expect("16 of 32 bytes");
        KeyHash(u128::from_le_bytes(bytes))
    }

    fn hash_streamed(&self, tag: &[u8], value: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(tag.len() as u32).to_le_bytes());
        h.update(tag);
        h.update(value);
        h.finalize()
    }
}

/// A key found in (or minted for) a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKey {
    pub hash: KeyHash,
    /// Index of the source in the configured `sources`.
    pub source: usize,
    pub insert: Option<InsertKey>,
}

/// Insert-mode state of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertKey {
    /// A valid, current signed cookie came with the request; the backend it names is a hint.
    /// The cookie is set again only if the pin moved off that hint.
    Presented { raw: String, hint: String },
    /// tether must set the cookie on the response: a key it minted (no valid cookie came), or
    /// the key of a valid cookie that is due to be re-issued (signed by an older secret, in
    /// the v1 format, or older than a quarter of its lifetime; see [`cookie::InsertCookies`]).
    /// A re-issued key is the presented one, so its pin holds; only its hint is not used for
    /// this one request (it matters only when Redis has lost the key).
    Minted { raw: String },
}

impl InsertKey {
    pub fn raw(&self) -> &str {
        match self {
            InsertKey::Presented { raw, .. } | InsertKey::Minted { raw } => raw,
        }
    }
}

/// Why a present key was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    TooLong,
    BadSignature,
    /// A validly signed insert cookie past its lifetime (or issued implausibly far ahead).
    Expired,
}

impl Invalid {
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::TooLong => "too_long",
            Invalid::BadSignature => "bad_signature",
            Invalid::Expired => "expired",
        }
    }
}

/// The outcome of extraction: a key (or none) and the first invalid key seen on the way.
#[derive(Debug, Default)]
pub struct Extracted {
    pub key: Option<SessionKey>,
    pub invalid: Option<Invalid>,
}

/// Finds a request's affinity key.
pub struct Extractor {
    sources: Vec<KeySource>,
    /// Hash tag per source: `c:<name>`, `i`, `h:<name>`, `q:<name>`, `ip`.
    tags: Vec<Vec<u8>>,
    max_key_bytes: usize,
    hasher: KeyHasher,
    insert: Option<InsertCookies>,
}

impl Extractor {
    pub fn new(s: &AffinitySettings, hasher: KeyHasher) -> Extractor {
        let tags = s.sources.iter().map(source_tag).collect();
        Extractor {
            sources: s.sources.clone(),
            tags,
            max_key_bytes: s.max_key_bytes,
            hasher,
            // Without `max_age_secs` a cookie lives as long as an idle pin.
            insert: s.insert.as_ref().map(|i| {
                let cookies = InsertCookies::new(i);
                match i.max_age {
                    Some(_) => cookies,
                    None => cookies.with_lifetime(s.ttl),
                }
            }),
        }
    }

    pub fn sources(&self) -> &[KeySource] {
        &self.sources
    }

    pub fn max_key_bytes(&self) -> usize {
        self.max_key_bytes
    }

    pub fn insert_cookies(&self) -> Option<&InsertCookies> {
        self.insert.as_ref()
    }

    /// Hash a value as source `index` would.
    pub fn hash_for(&self, index: usize, value: &[u8]) -> KeyHash {
        self.hasher.hash(&self.tags[index], value)
    }

    /// The key of a request: the first configured source that is present and valid wins; with
    /// `insert` configured and nothing present, a new key is minted.
    pub fn extract(
        &self,
        headers: &(impl RequestHeaders + ?Sized),
        query: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Extracted {
        self.extract_at(headers, query, peer, cookie::unix_secs())
    }

    /// [`Extractor::extract`] at `now` (Unix seconds), which decides whether an insert cookie has
    /// expired.
    pub fn extract_at(
        &self,
        headers: &(impl RequestHeaders + ?Sized),
        query: Option<&str>,
        peer: Option<IpAddr>,
        now: u64,
    ) -> Extracted {
        let mut out = Extracted::default();
        for (i, src) in self.sources.iter().enumerate() {
            let found: Option<Cow<[u8]>> = match src {
                KeySource::Cookie(name) => {
                    cookie::find_cookie(headers.values("cookie"), name.as_bytes())
                        .map(Cow::Borrowed)
                }
                KeySource::Header(name) => headers
                    .values(name.as_str())
                    .next()
                    .filter(|v| !v.is_empty())
                    .map(Cow::Borrowed),
                KeySource::Query(name) => query.and_then(|q| query_param(q, name)),
                KeySource::Ip => peer.map(|ip| Cow::Owned(ip_key(ip))),
                KeySource::Insert => {
                    let Some(ins) = &self.insert else { continue };
                    let Some(value) =
                        cookie::find_cookie(headers.values("cookie"), ins.name.as_bytes())
                    else {
                        continue;
                    };
                    match ins.check(value, now) {
                        Ok(c) => {
                            let raw = std::str::from_utf8(c.key)
                                .expect("verified keys are base64url")
                                .to_string();
                            let insert = if c.reissue {
                                InsertKey::Minted { raw }
                            } else {
                                InsertKey::Presented {
                                    raw,
                                    hint: c.backend_hint.to_string(),
                                }
                            };
                            out.key = Some(SessionKey {
                                hash: self.hasher.hash(&self.tags[i], c.key),
                                source: i,
                                insert: Some(insert),
                            });
                            return out;
                        }
                        Err(cookie::Rejected::Forged) => {
                            out.invalid.get_or_insert(Invalid::BadSignature);
                            continue;
                        }
                        Err(cookie::Rejected::Expired) => {
                            out.invalid.get_or_insert(Invalid::Expired);
                            continue;
                        }
                    }
                }
            };
            let Some(value) = found else { continue };
            if value.len() > self.max_key_bytes {
                out.invalid.get_or_insert(Invalid::TooLong);
                continue;
            }
            out.key = Some(SessionKey {
                hash: self.hasher.hash(&self.tags[i], &value),
                source: i,
                insert: None,
            });
            return out;
        }
        if let Some(i) = self.sources.iter().position(|s| *s == KeySource::Insert) {
            let raw = InsertCookies::mint();
            out.key = Some(SessionKey {
                hash: self.hasher.hash(&self.tags[i], raw.as_bytes()),
                source: i,
                insert: Some(InsertKey::Minted { raw }),
            });
        }
        out
    }
}

/// Whether a request is an Engine.IO polling handshake: `EIO=` present, no `sid` yet.
pub fn is_engine_io_handshake(query: Option<&str>) -> bool {
    query.is_some_and(|q| query_param(q, "EIO").is_some() && query_param(q, "sid").is_none())
}

/// The start of an Engine.IO handshake's response body, kept as it arrives until its `sid`
/// ([`engine_io_sid`]) is found or [`SidSearch::LOOK_AT`] bytes came without one. Both HTTP
/// engines search with it.
#[derive(Debug, Default)]
pub struct SidSearch {
    seen: Vec<u8>,
}

/// Where a [`SidSearch`] stands.
#[derive(Debug, PartialEq, Eq)]
pub enum SidFound<'a> {
    Sid(&'a [u8]),
    /// Not yet: more body may bring it.
    NotYet,
    /// Never: the body ended or went past [`SidSearch::LOOK_AT`] without one.
    Never,
}

impl SidSearch {
    /// How much of a handshake body is searched.
    pub const LOOK_AT: usize = 1024;

    /// Take the next body bytes (as decoded, whatever the framing).
    pub fn feed(&mut self, data: &[u8]) {
        let room = Self::LOOK_AT.saturating_sub(self.seen.len());
        self.seen.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The sid, if the bytes so far hold one; `ended`: the body is all in.
    pub fn found(&self, ended: bool) -> SidFound<'_> {
        match engine_io_sid(&self.seen) {
            Some(sid) => SidFound::Sid(sid),
            None if ended || self.seen.len() >= Self::LOOK_AT => SidFound::Never,
            None => SidFound::NotYet,
        }
    }
}

/// The session id in the start of an Engine.IO handshake response body: `0{"sid":"..."` (v4) or
/// `<len>:0{"sid":"..."` (v3). `None` until enough of the body is there, or if it is not one.
pub fn engine_io_sid(body: &[u8]) -> Option<&[u8]> {
    const FIELD: &[u8] = b"\"sid\":\"";
    // The open packet (type 0) comes first; v3 prefixes a length.
    let open = body.iter().position(|b| *b == b'0')?;
    if !body[..open]
        .iter()
        .all(|b| b.is_ascii_digit() || *b == b':')
    {
        return None;
    }
    let start = body.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let len = body[start..].iter().position(|b| *b == b'"')?;
    let sid = &body[start..start + len];
    let valid = (1..=128).contains(&sid.len())
        && sid
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(b));
    valid.then_some(sid)
}

/// What the `ip` source hashes for an address: its octets (so `::ffff:1.2.3.4` and `1.2.3.4`
/// are different keys, as they are different peers).
pub fn ip_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The hash tag of a source: `c:<name>`, `i`, `h:<name>`, `q:<name>` or `ip`. Part of the
/// persisted Redis key derivation: changing it orphans every pin.
pub fn source_tag(source: &KeySource) -> Vec<u8> {
    match source {
        KeySource::Cookie(n) => format!("c:{n}").into_bytes(),
        KeySource::Insert => b"i".to_vec(),
        KeySource::Header(n) => format!("h:{n}").into_bytes(),
        KeySource::Query(n) => format!("q:{n}").into_bytes(),
        KeySource::Ip => b"ip".to_vec(),
    }
}

/// A request's headers as key extraction reads them: Pingora's parsed header map, or the raw
/// header lines of tether's lean HTTP/1 path (`crate::fast`).
pub trait RequestHeaders {
    /// The values of header `name` (given in lowercase), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl RequestHeaders for HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

impl RequestHeaders for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// The first non-empty value of query parameter `name`, percent-decoded (`+` stays `+`: keys are
/// compared, not displayed, and Engine.IO ids never contain it).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, [u8]>> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name && !v.is_empty() {
            return Some(percent_decode(v.as_bytes()));
        }
    }
    None
}

fn percent_decode(v: &[u8]) -> Cow<'_, [u8]> {
    if !v.contains(&b'%') {
        return Cow::Borrowed(v);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%'
            && i + 2 < v.len()
            && let (Some(h), Some(l)) = (hex(v[i + 1]), hex(v[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(v[i]);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InsertSettings, Policy, SameSite, Secret};
    use http::HeaderValue;
    use std::time::Duration;

    fn settings(sources: Vec<KeySource>) -> AffinitySettings {
        let insert = sources
            .contains(&KeySource::Insert)
            .then(|| InsertSettings {
                cookie: "tether".into(),
                secrets: vec![Secret::new(b"0123456789abcdef-secret".to_vec())],
                secure: Some(false),
                same_site: SameSite::Lax,
                http_only: true,
                max_age: None,
            });
        AffinitySettings {
            sources,
            policy: Policy::RoundRobin,
            ttl: Duration::from_secs(60),
            hash_key: None,
            max_key_bytes: 64,
            cache_entries: 100,
            insert,
        }
    }

    #[test]
    fn a_key_hash_prints_as_32_hex_digits_and_parses_back() {
        for v in [
            0u128,
            1,
            0xdead_beef,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            let k = KeyHash(v);
            assert_eq!(k.to_string(), format!("{v:032x}"));
            assert_eq!(KeyHash::parse(&k.to_string()), Some(k));
        }
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    fn extractor(sources: Vec<KeySource>) -> Extractor {
        Extractor::new(&settings(sources), KeyHasher::new(b"0123456789abcdef"))
    }

    #[test]
    fn first_present_source_wins() {
        let e = extractor(vec![
            KeySource::Cookie("sid".into()),
            KeySource::Header(http::HeaderName::from_static("x-session")),
            KeySource::Query("sid".into()),
            KeySource::Ip,
        ]);
        let ip = Some("10.0.0.1".parse().unwrap());
        let h = headers(&[("x-session", b"h1"), ("cookie", b"a=b; sid=c1")]);
        assert_eq!(e.extract(&h, Some("sid=q1"), ip).key.unwrap().source, 0);
        let h = headers(&[("x-session", b"h1")]);
        assert_eq!(e.extract(&h, Some("sid=q1"), ip).key.unwrap().source, 1);
        assert_eq!(
            e.extract(&HeaderMap::new(), Some("EIO=4&sid=q1"), ip)
                .key
                .unwrap()
                .source,
            2
        );
        assert_eq!(
            e.extract(&HeaderMap::new(), Some("sid="), ip)
                .key
                .unwrap()
                .source,
            3
        );
        assert!(e.extract(&HeaderMap::new(), None, None).key.is_none());
    }

    #[test]
    fn hashes_are_keyed_and_separate_sources() {
        let a = KeyHasher::new(b"0123456789abcdef");
        let b = KeyHasher::new(b"0123456789abcdeX");
        assert_eq!(a.hash(b"c:sid", b"v"), a.hash(b"c:sid", b"v"));
        assert_ne!(a.hash(b"c:sid", b"v"), b.hash(b"c:sid", b"v"));
        assert_ne!(a.hash(b"c:sid", b"v"), a.hash(b"h:sid", b"v"));
        // Length-prefixed tag: moving bytes between tag and value changes the hash.
        assert_ne!(a.hash(b"c:si", b"dv"), a.hash(b"c:sid", b"v"));
    }

    #[test]
    fn hash_is_pinned() {
        // Redis keys derive from this: a change would orphan every pin. Pin the function.
        let h = KeyHasher::new(b"0123456789abcdef").hash(b"c:connect.sid", b"s:abc");
        assert_eq!(h.to_string(), "89975a05af28ad200389a4d554442677");
        assert_eq!(KeyHash::parse(&h.to_string()), Some(h));
        let again = KeyHasher::new(b"0123456789abcdef").hash(b"c:connect.sid", b"s:abc");
        assert_eq!(h, again);
    }

    #[test]
    fn keys_hashed_at_once_and_streamed_agree() {
        let h = KeyHasher::new(b"0123456789abcdef");
        let value: Vec<u8> = (0..2 * HASH_INPUT_ON_STACK).map(|i| i as u8).collect();
        for tag in [&b""[..], b"c:sid", b"h:x-session-id-header"] {
            for n in 0..value.len() {
                let streamed = h.hash_streamed(tag, &value[..n]).as_bytes()[..16].to_vec();
                let hashed = h.hash(tag, &value[..n]).0.to_le_bytes();
                assert_eq!(&hashed[..], &streamed[..], "tag {tag:?}, {n} bytes");
            }
        }
    }

    #[test]
    fn oversized_keys_are_absent() {
        let e = extractor(vec![KeySource::Cookie("sid".into()), KeySource::Ip]);
        let long = vec![b'x'; 65];
        let mut cookie = b"sid=".to_vec();
        cookie.extend_from_slice(&long);
        let out = e.extract(
            &headers(&[("cookie", &cookie)]),
            None,
            Some("::1".parse().unwrap()),
        );
        assert_eq!(out.invalid, Some(Invalid::TooLong));
        assert_eq!(out.key.unwrap().source, 1);
    }

    #[test]
    fn insert_mints_verifies_and_rejects_forgeries() {
        let e = extractor(vec![KeySource::Cookie("sid".into()), KeySource::Insert]);
        let minted = e.extract(&HeaderMap::new(), None, None).key.unwrap();
        let Some(InsertKey::Minted { raw }) = &minted.insert else {
            panic!("expected a minted key")
        };
        let set_cookie = e
            .insert_cookies()
            .unwrap()
            .set_cookie(raw.as_bytes(), "b1", false);
        let value = set_cookie.split(';').next().unwrap().to_string();
        let back = e.extract(&headers(&[("cookie", value.as_bytes())]), None, None);
        let key = back.key.unwrap();
        assert_eq!(key.hash, minted.hash);
        assert_eq!(
            key.insert,
            Some(InsertKey::Presented {
                raw: raw.clone(),
                hint: "b1".into()
            })
        );
        let forged = value.replace(".b1.", ".b2.");
        let out = e.extract(&headers(&[("cookie", forged.as_bytes())]), None, None);
        assert_eq!(out.invalid, Some(Invalid::BadSignature));
        let key = out.key.unwrap();
        assert!(matches!(key.insert, Some(InsertKey::Minted { .. })));
        assert_ne!(key.hash, minted.hash, "a forged cookie never names the key");
    }

    /// The cookie header for `key` signed by `e`'s first secret at `issued`.
    fn insert_cookie(e: &Extractor, key: &str, backend: &str, issued: u64) -> String {
        let set_cookie =
            e.insert_cookies()
                .unwrap()
                .set_cookie_at(key.as_bytes(), backend, issued, false);
        set_cookie.split(';').next().unwrap().to_string()
    }

    #[test]
    fn insert_cookies_expire_with_the_ttl_and_are_refreshed_before() {
        // settings(): ttl 60 s, no max_age_secs: cookies live 60 s after issue.
        let e = extractor(vec![KeySource::Insert]);
        let t0 = 1_800_000_000;
        let raw = InsertCookies::mint();
        let cookie = insert_cookie(&e, &raw, "b1", t0);
        let h = headers(&[("cookie", cookie.as_bytes())]);
        let hash = e.hash_for(0, raw.as_bytes());

        let fresh = e.extract_at(&h, None, None, t0 + 15).key.unwrap();
        assert_eq!(fresh.hash, hash);
        assert!(matches!(fresh.insert, Some(InsertKey::Presented { .. })));
        // Past a quarter of the lifetime: same key, cookie set again (Minted).
        let due = e.extract_at(&h, None, None, t0 + 16).key.unwrap();
        assert_eq!(due.hash, hash);
        assert_eq!(due.insert, Some(InsertKey::Minted { raw: raw.clone() }));
        // Past the lifetime: absent, a new key is minted, counted as expired.
        let out = e.extract_at(&h, None, None, t0 + 61);
        assert_eq!(out.invalid, Some(Invalid::Expired));
        let key = out.key.unwrap();
        assert_ne!(key.hash, hash);
        assert!(matches!(key.insert, Some(InsertKey::Minted { raw: r }) if r != raw));
    }

    #[test]
    fn insert_cookies_signed_by_an_older_secret_are_reissued() {
        let old = extractor(vec![KeySource::Insert]);
        let mut s = settings(vec![KeySource::Insert]);
        let insert = s.insert.as_mut().unwrap();
        insert
            .secrets
            .insert(0, Secret::new(b"a-newer-secret-0123456789".to_vec()));
        let rotated = Extractor::new(&s, KeyHasher::new(b"0123456789abcdef"));
        let raw = InsertCookies::mint();
        let now = 1_800_000_000;
        let cookie = insert_cookie(&old, &raw, "b1", now);
        let key = rotated
            .extract_at(&headers(&[("cookie", cookie.as_bytes())]), None, None, now)
            .key
            .unwrap();
        assert_eq!(
            key.hash,
            old.hash_for(0, raw.as_bytes()),
            "same key, same pin"
        );
        assert_eq!(key.insert, Some(InsertKey::Minted { raw }));
    }

    #[test]
    fn engine_io_handshakes_are_recognised() {
        assert!(is_engine_io_handshake(Some(
            "EIO=4&transport=polling&t=abc"
        )));
        assert!(!is_engine_io_handshake(Some(
            "EIO=4&transport=polling&sid=x"
        )));
        assert!(!is_engine_io_handshake(Some("transport=polling")));
        assert!(!is_engine_io_handshake(None));
        let v4 =
            br#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000}"#;
        assert_eq!(engine_io_sid(v4), Some(&b"lv_VI97HAXpY6yYWAAAC"[..]));
        let v3 = br#"97:0{"sid":"abc-123","upgrades":[]}2:40"#;
        assert_eq!(engine_io_sid(v3), Some(&b"abc-123"[..]));
        // Incomplete, hostile or foreign bodies.
        assert_eq!(engine_io_sid(br#"0{"sid":"abc"#), None);
        assert_eq!(engine_io_sid(br#"x0{"sid":"abc"}"#), None);
        assert_eq!(engine_io_sid(br#"0{"sid":"a b"}"#), None);
        assert_eq!(engine_io_sid(br#"0{"sid":""}"#), None);
        assert_eq!(engine_io_sid(b"\xff\xfe"), None);
        assert_eq!(engine_io_sid(b""), None);
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_param("a=1&sid=ab%2Dc", "sid").unwrap().as_ref(),
            b"ab-c"
        );
        assert_eq!(query_param("sid=%zz%", "sid").unwrap().as_ref(), b"%zz%");
        assert_eq!(query_param("sid=%41", "sid").unwrap().as_ref(), b"A");
        assert!(query_param("sidx=1&sid", "sid").is_none());
    }
}
