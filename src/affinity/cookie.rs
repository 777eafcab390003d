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
const MAC_CONTEXT: &[u8] = b"tether-insert-v1\0";

/// Mints, signs and verifies tether's own cookie: `<key>.<backend id>.<signature>`.
///
/// The key is 128 random bits; the backend id is a hint used only when neither the cache nor
/// Redis knows the key (Redis lost it); the signature (HMAC-SHA256 over both, truncated to 128
/// bits) makes a forged or edited cookie count as absent.
pub struct InsertCookies {
    pub name: String,
    /// Keyed MAC states, cloned per use: the first signs, all verify.
    macs: Vec<Hmac<Sha256>>,
    /// `; Path=/; HttpOnly; SameSite=Lax...`, fixed at start-up.
    attributes: String,
}

/// A valid insert cookie.
#[derive(Debug, PartialEq, Eq)]
pub struct InsertCookie<'a> {
    pub key: &'a [u8],
    pub backend_hint: &'a str,
}

impl InsertCookies {
    pub fn new(s: &InsertSettings) -> InsertCookies {
        let macs = s
            .secrets
            .iter()
            .map(|k| {
                Hmac::<Sha256>::new_from_slice(k.expose()).expect("HMAC takes keys of any length")
            })
            .collect();
        let mut attributes = String::from("; Path=/");
        if s.http_only {
            attributes.push_str("; HttpOnly");
        }
        if s.secure {
            attributes.push_str("; Secure");
        }
        attributes.push_str("; SameSite=");
        attributes.push_str(s.same_site.as_str());
        if let Some(age) = s.max_age {
            attributes.push_str(&format!("; Max-Age={}", age.as_secs()));
        }
        InsertCookies {
            name: s.cookie.clone(),
            macs,
            attributes,
        }
    }

    /// A new random key.
    pub fn mint() -> String {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn mac(mac: &Hmac<Sha256>, key: &[u8], backend: &[u8]) -> Hmac<Sha256> {
        let mut m = mac.clone();
        m.update(MAC_CONTEXT);
        m.update(key);
        m.update(b".");
        m.update(backend);
        m
    }

    /// The `Set-Cookie` header value pinning `key` to `backend`.
    pub fn set_cookie(&self, key: &[u8], backend: &str) -> String {
        let tag = Self::mac(&self.macs[0], key, backend.as_bytes())
            .finalize()
            .into_bytes();
        let sig = URL_SAFE_NO_PAD.encode(&tag[..16]);
        let mut out =
            String::with_capacity(self.name.len() + 50 + backend.len() + self.attributes.len());
        out.push_str(&self.name);
        out.push('=');
        out.push_str(std::str::from_utf8(key).expect("minted keys are base64url"));
        out.push('.');
        out.push_str(backend);
        out.push('.');
        out.push_str(&sig);
        out.push_str(&self.attributes);
        out
    }

    /// Check a cookie value; `None` for anything not minted and signed by a configured secret.
    pub fn verify<'a>(&self, value: &'a [u8]) -> Option<InsertCookie<'a>> {
        if value.len() < KEY_LEN + 2 + MAC_LEN || value.len() > KEY_LEN + 2 + MAC_LEN + 64 {
            return None;
        }
        let (key, rest) = value.split_at(KEY_LEN);
        let rest = rest.strip_prefix(b".")?;
        let (backend, sig) = rest.split_at(rest.len() - MAC_LEN);
        let backend = backend.strip_suffix(b".")?;
        let base64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
        if !key.iter().all(base64url) || backend.is_empty() || !backend.iter().all(base64url) {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        let valid = self.macs.iter().any(|m| {
            Self::mac(m, key, backend)
                .verify_truncated_left(&sig)
                .is_ok()
        });
        valid.then(|| InsertCookie {
            key,
            backend_hint: std::str::from_utf8(backend).expect("checked ASCII above"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SameSite, Secret};

    fn cookies(secrets: &[&str]) -> InsertCookies {
        InsertCookies::new(&InsertSettings {
            cookie: "tether".into(),
            secrets: secrets
                .iter()
                .map(|s| Secret::new(s.as_bytes().to_vec()))
                .collect(),
            secure: true,
            same_site: SameSite::Strict,
            http_only: true,
            max_age: None,
        })
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
        let header = c.set_cookie(key.as_bytes(), "app-2");
        assert!(
            header.ends_with("; Path=/; HttpOnly; Secure; SameSite=Strict"),
            "{header}"
        );
        let v = c.verify(value_of(&header).as_bytes()).expect("valid");
        assert_eq!(v.key, key.as_bytes());
        assert_eq!(v.backend_hint, "app-2");
    }

    #[test]
    fn forged_or_tampered_cookies_are_rejected() {
        let c = cookies(&["0123456789abcdef0123"]);
        let key = InsertCookies::mint();
        let good = c.set_cookie(key.as_bytes(), "app1");
        let good = value_of(&good);
        // Another backend id with the same signature.
        assert!(
            c.verify(good.replace(".app1.", ".app2.").as_bytes())
                .is_none()
        );
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
        ] {
            assert!(c.verify(junk).is_none());
        }
    }

    #[test]
    fn rotated_secrets_still_verify() {
        let old = cookies(&["old-secret-0123456789"]);
        let rotated = cookies(&["new-secret-0123456789", "old-secret-0123456789"]);
        let key = InsertCookies::mint();
        let by_old = old.set_cookie(key.as_bytes(), "a");
        assert!(rotated.verify(value_of(&by_old).as_bytes()).is_some());
        let by_new = rotated.set_cookie(key.as_bytes(), "a");
        assert!(old.verify(value_of(&by_new).as_bytes()).is_none());
    }
}
