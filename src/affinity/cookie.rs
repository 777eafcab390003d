//! Cookie parsing (request `Cookie`, response `Set-Cookie`) and tether's own signed cookie.
//!
//! Parsing works on raw bytes and never fails: malformed pairs are skipped, so a hostile header
//! can make a key absent but cannot make tether panic or choose a backend.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::InsertSettings;

/// The first non-empty value of cookie `name` across `headers` (each a `Cookie` header value).
pub fn find_cookie<'a>(headers: impl Iterator<Item = &'a [u8]>, name: &[u8]) -> Option<&'a [u8]> {
    for header in headers {
        for pair in header.split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != name {
                continue;
            }
            let value = unquote(pair[eq + 1..].trim_ascii());
            if !value.is_empty() {
                return Some(value);
            }
        }
    }
    None
}

fn unquote(v: &[u8]) -> &[u8] {
    if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// A `Set-Cookie` header reduced to what affinity needs.
#[derive(Debug, PartialEq, Eq)]
pub struct SetCookie<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    /// The cookie is being removed (empty value, `Max-Age` <= 0, or an `Expires` in 1970, the
    /// form Express and most frameworks use to clear a cookie).
    pub removal: bool,
}

/// Parse one `Set-Cookie` header value; `None` if it has no `name=value` pair.
pub fn parse_set_cookie(header: &[u8]) -> Option<SetCookie<'_>> {
    let mut parts = header.split(|b| *b == b';');
    let first = parts.next()?.trim_ascii();
    let eq = first.iter().position(|b| *b == b'=')?;
    let name = first[..eq].trim_ascii();
    if name.is_empty() {
        return None;
    }
    let value = unquote(first[eq + 1..].trim_ascii());
    let mut removal = value.is_empty();
    for attr in parts {
        let attr = attr.trim_ascii();
        let (k, v) = match attr.iter().position(|b| *b == b'=') {
            Some(i) => (attr[..i].trim_ascii(), attr[i + 1..].trim_ascii()),
            None => (attr, &b""[..]),
        };
        if k.eq_ignore_ascii_case(b"max-age") {
            let v = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok());
            if v.is_some_and(|v| v <= 0) {
                removal = true;
            }
        } else if k.eq_ignore_ascii_case(b"expires") && v.windows(4).any(|w| w == b"1970") {
            removal = true;
        }
    }
    Some(SetCookie {
        name,
        value,
        removal,
    })
}

/// Length of a minted key: 16 random bytes in unpadded base64url.
const KEY_LEN: usize = 22;
/// Length of the signature: HMAC-SHA256 truncated to 16 bytes, unpadded base64url.
const MAC_LEN: usize = 22;
/// Domain separation for the signature, versioned with the cookie format.
const MAC_CONTEXT_V1: &[u8] = b"tether-insert-v1\0";
const MAC_CONTEXT_V2: &[u8] = b"tether-insert-v2\0";
/// The format marker of the current cookie, its second field.
const V2: &[u8] = b"v2";
/// Longest issue time accepted (decimal Unix seconds).
const MAX_ISSUED_DIGITS: usize = 12;
/// Longest backend id (see `config::is_backend_id`).
const MAX_BACKEND_LEN: usize = 64;
/// How far in the future an issue time may lie (clocks of instances disagree a little); beyond
/// that the cookie is treated as expired.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// Lifetime of a cookie when neither `max_age_secs` nor the affinity TTL is given to
/// [`InsertCookies`] (the default `ttl_secs`).
const DEFAULT_LIFETIME_SECS: u64 = crate::config::DEFAULT_TTL_SECS;

/// Mints, signs and verifies tether's own cookie.
///
/// Format v2 (written): `<key>.v2.<issued>.<backend id>.<signature>`
/// - key: 128 random bits, unpadded base64url (22 characters); first in every version, so the
///   key is always the text before the first dot (the admin API relies on it);
/// - issued: when this cookie was set, decimal Unix seconds;
/// - backend id: a hint used only when neither the cache nor Redis knows the key;
/// - signature: HMAC-SHA256 (context `tether-insert-v2`) over key, issued and backend id,
///   truncated to 128 bits, unpadded base64url.
///
/// Format v1 (read only): `<key>.<backend id>.<signature>`, no issue time. A v1 cookie that
/// verifies is accepted once and re-issued as v2; v1 reading is meant to last one secret
/// rotation (drop it in the release after; until then an operator who wants v1 cookies gone
/// rotates the secret that signed them out).
///
/// A cookie is valid for its lifetime after it was issued (`max_age_secs`, or the affinity TTL
/// when that is not set): after that, or with a forged or edited signature, it counts as absent
/// and never chooses a backend. An active client never sees it expire: a cookie older than a
/// quarter of its lifetime is re-issued (HAProxy's `maxidle` does the same), and so is one
/// signed by a secret other than the first (so a rotation completes) or in the v1 format.
pub struct InsertCookies {
    pub name: String,
    /// Keyed MAC states, cloned per use: the first signs, all verify.
    macs: Vec<Hmac<Sha256>>,
    /// `; Path=/; HttpOnly; SameSite=Lax...`, fixed at start-up: on responses to plain
    /// requests, and (`[1]`) to TLS requests, which differ by `; Secure` when `secure` is unset.
    attributes: [String; 2],
    /// How long after its issue time a cookie is valid, in seconds.
    lifetime_secs: u64,
}

/// A valid insert cookie.
#[derive(Debug, PartialEq, Eq)]
pub struct InsertCookie<'a> {
    pub key: &'a [u8],
    pub backend_hint: &'a str,
    /// When it was issued (Unix seconds); `None` for a v1 cookie.
    pub issued: Option<u64>,
    /// It should be set again: signed by an older secret, in the v1 format, or older than a
    /// quarter of its lifetime.
    pub reissue: bool,
}

/// Why a presented cookie does not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Malformed, or not signed by any configured secret.
    Forged,
    /// Validly signed, but issued longer ago than its lifetime (or implausibly far ahead).
    Expired,
}

/// Unix seconds now.
pub fn unix_secs() -> u64 {
    crate::backend::unix_ms() / 1000
}

impl InsertCookies {
    /// Cookies valid for `max_age_secs` after issue, or a day without it: the extractor sets
    /// the affinity TTL instead with [`InsertCookies::with_lifetime`].
    pub fn new(s: &InsertSettings) -> InsertCookies {
        let macs = s
            .secrets
            .iter()
            .map(|k| {
                Hmac::<Sha256>::new_from_slice(k.expose()).expect("HMAC takes keys of any length")
            })
            .collect();
        let attributes = |tls: bool| {
            let mut a = String::from("; Path=/");
            if s.http_only {
                a.push_str("; HttpOnly");
            }
            // Unset: Secure where the request came over TLS.
            if s.secure.unwrap_or(tls) {
                a.push_str("; Secure");
            }
            a.push_str("; SameSite=");
            a.push_str(s.same_site.as_str());
            if let Some(age) = s.max_age {
                a.push_str(&format!("; Max-Age={}", age.as_secs()));
            }
            a
        };
        InsertCookies {
            name: s.cookie.clone(),
            macs,
            attributes: [attributes(false), attributes(true)],
            lifetime_secs: s.max_age.map_or(DEFAULT_LIFETIME_SECS, |a| a.as_secs()),
        }
    }

    /// Set how long a cookie is valid after it was issued (at least one second).
    pub fn with_lifetime(mut self, lifetime: std::time::Duration) -> InsertCookies {
        self.lifetime_secs = lifetime.as_secs().max(1);
        self
    }

    /// How long a cookie is valid after it was issued.
    pub fn lifetime(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lifetime_secs)
    }

    /// A new random key.
    pub fn mint() -> String {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn mac_v1(mac: &Hmac<Sha256>, key: &[u8], backend: &[u8]) -> Hmac<Sha256> {
        let mut m = mac.clone();
        m.update(MAC_CONTEXT_V1);
        m.update(key);
        m.update(b".");
        m.update(backend);
        m
    }

    fn mac_v2(mac: &Hmac<Sha256>, key: &[u8], issued: &[u8], backend: &[u8]) -> Hmac<Sha256> {
        let mut m = mac.clone();
        m.update(MAC_CONTEXT_V2);
        m.update(key);
        m.update(b".");
        m.update(issued);
        m.update(b".");
        m.update(backend);
        m
    }

    /// The `Set-Cookie` header value pinning `key` to `backend`, issued now, on a response to a
    /// request that came over TLS (`tls`) or not.
    pub fn set_cookie(&self, key: &[u8], backend: &str, tls: bool) -> String {
        self.set_cookie_at(key, backend, unix_secs(), tls)
    }

    /// [`InsertCookies::set_cookie`] with the issue time given (Unix seconds).
    pub fn set_cookie_at(&self, key: &[u8], backend: &str, issued: u64, tls: bool) -> String {
        let issued = issued.to_string();
        let tag = Self::mac_v2(&self.macs[0], key, issued.as_bytes(), backend.as_bytes())
            .finalize()
            .into_bytes();
        let sig = URL_SAFE_NO_PAD.encode(&tag[..16]);
        let attributes = &self.attributes[usize::from(tls)];
        let mut out = String::with_capacity(
            self.name.len() + 64 + issued.len() + backend.len() + attributes.len(),
        );
        out.push_str(&self.name);
        out.push('=');
        out.push_str(std::str::from_utf8(key).expect("minted keys are base64url"));
        out.push_str(".v2.");
        out.push_str(&issued);
        out.push('.');
        out.push_str(backend);
        out.push('.');
        out.push_str(&sig);
        out.push_str(attributes);
        out
    }

    /// Check a cookie value now; `None` for anything not minted and signed by a configured
    /// secret, or expired.
    pub fn verify<'a>(&self, value: &'a [u8]) -> Option<InsertCookie<'a>> {
        self.check(value, unix_secs()).ok()
    }

    /// Check a cookie value at `now` (Unix seconds).
    pub fn check<'a>(&self, value: &'a [u8], now: u64) -> Result<InsertCookie<'a>, Rejected> {
        const MAX_LEN: usize = KEY_LEN + 4 + MAX_ISSUED_DIGITS + MAX_BACKEND_LEN + MAC_LEN + 4;
        if value.len() < KEY_LEN + 2 + MAC_LEN + 1 || value.len() > MAX_LEN {
            return Err(Rejected::Forged);
        }
        let base64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
        let mut parts = value.split(|b| *b == b'.');
        let fields: [Option<&[u8]>; 6] = std::array::from_fn(|_| parts.next());
        let (key, issued, backend, sig) = match fields {
            // v1: key.backend.sig
            [Some(k), Some(b), Some(s), None, None, None] => (k, None, b, s),
            // v2: key.v2.issued.backend.sig
            [Some(k), Some(V2), Some(i), Some(b), Some(s), None] => (k, Some(i), b, s),
            _ => return Err(Rejected::Forged),
        };
        let well_formed = key.len() == KEY_LEN
            && key.iter().all(base64url)
            && (1..=MAX_BACKEND_LEN).contains(&backend.len())
            && backend.iter().all(base64url)
            && sig.len() == MAC_LEN
            && issued.is_none_or(|i| {
                (1..=MAX_ISSUED_DIGITS).contains(&i.len()) && i.iter().all(u8::is_ascii_digit)
            });
        if !well_formed {
            return Err(Rejected::Forged);
        }
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| Rejected::Forged)?;
        let signer = self
            .macs
            .iter()
            .position(|m| {
                let m = match issued {
                    Some(i) => Self::mac_v2(m, key, i, backend),
                    None => Self::mac_v1(m, key, backend),
                };
                m.verify_truncated_left(&sig).is_ok()
            })
            .ok_or(Rejected::Forged)?;
        let issued = issued.map(|i| {
            std::str::from_utf8(i)
                .ok()
                .and_then(|i| i.parse::<u64>().ok())
                .expect("at most 12 ASCII digits")
        });
        let reissue = match issued {
            Some(t) if t > now.saturating_add(MAX_CLOCK_SKEW_SECS) => {
                return Err(Rejected::Expired);
            }
            Some(t) if now.saturating_sub(t) > self.lifetime_secs => {
                return Err(Rejected::Expired);
            }
            // Refresh after a quarter of the lifetime, so an active client never reaches it.
            Some(t) => signer != 0 || now.saturating_sub(t) * 4 > self.lifetime_secs,
            None => true,
        };
        Ok(InsertCookie {
            key,
            backend_hint: std::str::from_utf8(backend).expect("checked ASCII above"),
            issued,
            reissue,
        })
    }

    /// The v1 `Set-Cookie` value earlier releases wrote: for compatibility tests.
    #[cfg(test)]
    pub fn set_cookie_v1(&self, key: &[u8], backend: &str) -> String {
        let tag = Self::mac_v1(&self.macs[0], key, backend.as_bytes())
            .finalize()
            .into_bytes();
        format!(
            "{}={}.{backend}.{}{}",
            self.name,
            std::str::from_utf8(key).expect("base64url"),
            URL_SAFE_NO_PAD.encode(&tag[..16]),
            self.attributes[0]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SameSite, Secret};
    use std::time::Duration;

    fn settings(secrets: &[&str]) -> InsertSettings {
        InsertSettings {
            cookie: "tether".into(),
            secrets: secrets
                .iter()
                .map(|s| Secret::new(s.as_bytes().to_vec()))
                .collect(),
            secure: Some(true),
            same_site: SameSite::Strict,
            http_only: true,
            max_age: None,
        }
    }

    fn cookies(secrets: &[&str]) -> InsertCookies {
        InsertCookies::new(&settings(secrets))
    }

    fn value_of(set_cookie: &str) -> &str {
        set_cookie
            .strip_prefix("tether=")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
    }

    #[test]
    fn finds_the_first_non_empty_cookie() {
        let h: Vec<&[u8]> = vec![b"a=1; sid=; x", b" sid = \"abc\" ; sid=def"];
        assert_eq!(find_cookie(h.into_iter(), b"sid"), Some(&b"abc"[..]));
        let h: Vec<&[u8]> = vec![b";;;==;=", b"\xff\xfe=\x00", b"sid"];
        assert_eq!(find_cookie(h.into_iter(), b"sid"), None);
    }

    #[test]
    fn set_cookie_parsing() {
        let c = parse_set_cookie(b"connect.sid=s%3Aabc; Path=/; HttpOnly").unwrap();
        assert_eq!(
            (c.name, c.value, c.removal),
            (&b"connect.sid"[..], &b"s%3Aabc"[..], false)
        );
        assert!(parse_set_cookie(b"sid=x; Max-Age=0").unwrap().removal);
        assert!(
            parse_set_cookie(b"sid=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT")
                .unwrap()
                .removal
        );
        assert!(parse_set_cookie(b"sid=; Path=/").unwrap().removal);
        assert!(!parse_set_cookie(b"sid=x; max-age=60").unwrap().removal);
        assert_eq!(parse_set_cookie(b"novalue"), None);
        assert_eq!(parse_set_cookie(b"=x"), None);
    }

    #[test]
    fn signed_cookie_round_trips_and_carries_attributes() {
        let c = cookies(&["0123456789abcdef0123"]);
        let key = InsertCookies::mint();
        let header = c.set_cookie(key.as_bytes(), "app-2", false);
        assert!(
            header.ends_with("; Path=/; HttpOnly; Secure; SameSite=Strict"),
            "{header}"
        );
        let v = c.verify(value_of(&header).as_bytes()).expect("valid");
        assert_eq!(v.key, key.as_bytes());
        assert_eq!(v.backend_hint, "app-2");
        assert!(!v.reissue);
        assert!(v.issued.is_some_and(|t| t.abs_diff(unix_secs()) < 60));
    }

    #[test]
    fn v2_format_is_pinned() {
        // Cookies live in browsers across releases: this format must not change without a new
        // marker (and reading the old one for a rotation).
        let c = cookies(&["0123456789abcdef0123"]);
        let header = c.set_cookie_at(b"AAAAAAAAAAAAAAAAAAAAAA", "app1", 1_700_000_000, false);
        assert_eq!(
            value_of(&header),
            "AAAAAAAAAAAAAAAAAAAAAA.v2.1700000000.app1.KkgU4wkHOvSJihoLzTHxhA"
        );
    }

    #[test]
    fn forged_or_tampered_cookies_are_rejected() {
        let c = cookies(&["0123456789abcdef0123"]);
        let key = InsertCookies::mint();
        let good = c.set_cookie(key.as_bytes(), "app1", false);
        let good = value_of(&good);
        // Another backend id with the same signature.
        assert!(
            c.verify(good.replace(".app1.", ".app2.").as_bytes())
                .is_none()
        );
        // Another issue time (to make an old cookie young again).
        let (head, tail) = good.split_at(KEY_LEN + 4);
        let older = format!(
            "{head}{}",
            tail.replacen(|ch: char| ch.is_ascii_digit(), "1", 1)
        );
        if older != good {
            assert_eq!(
                c.check(older.as_bytes(), unix_secs()),
                Err(Rejected::Forged)
            );
        }
        // Downgraded to v1 (no issue time) with the v2 signature.
        let parts: Vec<&str> = good.split('.').collect();
        let v1 = format!("{}.{}.{}", parts[0], parts[3], parts[4]);
        assert_eq!(c.check(v1.as_bytes(), unix_secs()), Err(Rejected::Forged));
        // A flipped key character.
        let mut bad = good.as_bytes().to_vec();
        bad[0] = if bad[0] == b'A' { b'B' } else { b'A' };
        assert!(c.verify(&bad).is_none());
        // Signed with another secret.
        let other = cookies(&["another-secret-of-16-bytes"]);
        assert!(other.verify(good.as_bytes()).is_none());
        // Garbage of every shape.
        for junk in [
            &b""[..],
            b"....",
            b"\xff\xff",
            &[b'a'; 5000][..],
            b"AAAAAAAAAAAAAAAAAAAAAA.x.AAAAAAAAAAAAAAAAAAAAAA",
            b"AAAAAAAAAAAAAAAAAAAAAA.v2.1.x.AAAAAAAAAAAAAAAAAAAAAA",
            b"AAAAAAAAAAAAAAAAAAAAAA.v2.-1.x.AAAAAAAAAAAAAAAAAAAAAA",
            b"AAAAAAAAAAAAAAAAAAAAAA.v2.99999999999999999999.x.AAAAAAAAAAAAAAAAAAAAAA",
            b"AAAAAAAAAAAAAAAAAAAAAA.v3.1.x.AAAAAAAAAAAAAAAAAAAAAA",
            b"AAAAAAAAAAAAAAAAAAAAAA.v2.1.x.y.AAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(c.check(junk, unix_secs()), Err(Rejected::Forged));
        }
    }

    #[test]
    fn rotated_secrets_still_verify_and_ask_for_reissue() {
        let old = cookies(&["old-secret-0123456789"]);
        let rotated = cookies(&["new-secret-0123456789", "old-secret-0123456789"]);
        let key = InsertCookies::mint();
        let by_old = old.set_cookie(key.as_bytes(), "a", false);
        let v = rotated.verify(value_of(&by_old).as_bytes()).expect("valid");
        assert!(v.reissue, "signed by an older secret: re-issue");
        let by_new = rotated.set_cookie(key.as_bytes(), "a", false);
        assert!(
            !rotated
                .verify(value_of(&by_new).as_bytes())
                .unwrap()
                .reissue
        );
        assert!(old.verify(value_of(&by_new).as_bytes()).is_none());
    }

    #[test]
    fn cookies_expire_and_are_refreshed_before_they_do() {
        let c = cookies(&["0123456789abcdef0123"]).with_lifetime(Duration::from_secs(400));
        let key = InsertCookies::mint();
        let t0 = 1_800_000_000;
        let header = c.set_cookie_at(key.as_bytes(), "b", t0, false);
        let v = value_of(&header).as_bytes();
        let at = |now| c.check(v, now).map(|c| c.reissue);
        assert_eq!(at(t0), Ok(false));
        assert_eq!(at(t0 + 100), Ok(false));
        assert_eq!(at(t0 + 101), Ok(true), "older than a quarter: refresh");
        assert_eq!(at(t0 + 400), Ok(true));
        assert_eq!(at(t0 + 401), Err(Rejected::Expired));
        // Clock skew between instances is tolerated, a cookie from far ahead is not.
        assert_eq!(at(t0 - MAX_CLOCK_SKEW_SECS), Ok(false));
        assert_eq!(at(t0 - MAX_CLOCK_SKEW_SECS - 1), Err(Rejected::Expired));
        // max_age_secs sets the lifetime unless the extractor overrides it.
        let mut s = settings(&["0123456789abcdef0123"]);
        s.max_age = Some(Duration::from_secs(60));
        assert_eq!(InsertCookies::new(&s).lifetime(), Duration::from_secs(60));
    }

    #[test]
    fn v1_cookies_verify_once_and_are_reissued() {
        let c = cookies(&["0123456789abcdef0123"]);
        let key = InsertCookies::mint();
        let header = c.set_cookie_v1(key.as_bytes(), "app1");
        let v = c
            .verify(value_of(&header).as_bytes())
            .expect("v1 still verifies");
        assert_eq!((v.key, v.backend_hint), (key.as_bytes(), "app1"));
        assert_eq!(v.issued, None);
        assert!(v.reissue, "v1 is re-issued as v2");
        // A v1 cookie naming a backend called `v2` is still v1.
        let header = c.set_cookie_v1(key.as_bytes(), "v2");
        assert_eq!(
            c.verify(value_of(&header).as_bytes()).unwrap().backend_hint,
            "v2"
        );
    }
}
