//! Which header fields cross tether, and what it adds: hop-by-hop fields are removed (RFC 9110
//! section 7.6.1), `X-Forwarded-For` is appended to and `X-Forwarded-Proto` set. Every engine
//! asks [`Hop`] field by field; none keeps its own list.

/// Fields that describe one connection, never forwarded (RFC 9110 section 7.6.1, plus the
/// obsolete `Proxy-Connection` and the credentials meant for tether itself).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "proxy-connection",
    "proxy-authorization",
    // RFC 9113 section 3.2.1 (h2c upgrades, which tether does not offer).
    "http2-settings",
];

/// The most field names a `Connection` header may add to the hop-by-hop set; more are refused
/// by [`Hop::of`]'s caller as a bad request.
pub const MAX_CONNECTION_TOKENS: usize = 16;

/// The hop-by-hop decisions for one message: the fields its `Connection` header names.
#[derive(Debug, Default)]
pub struct Hop<'a> {
    named: [&'a [u8]; MAX_CONNECTION_TOKENS],
    count: usize,
    /// `Connection: close` was among them.
    pub close: bool,
    /// `Connection: keep-alive` was among them (an HTTP/1.0 client asking to keep it open).
    pub keep_alive: bool,
    /// `Connection: upgrade` was among them.
    pub upgrade: bool,
}

impl<'a> Hop<'a> {
    /// Read the `Connection` field lines `values`. `None`: more than [`MAX_CONNECTION_TOKENS`]
    /// names, or a name that is not a token.
    pub fn of(values: impl Iterator<Item = &'a [u8]>) -> Option<Hop<'a>> {
        let mut hop = Hop::default();
        for v in values {
            for token in v.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.is_empty() {
                    continue;
                }
                if !token.iter().all(|b| super::framing::is_tchar(*b)) {
                    return None;
                }
                if token.eq_ignore_ascii_case(b"close") {
                    hop.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    hop.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    hop.upgrade = true;
                }
                if hop.count == MAX_CONNECTION_TOKENS {
                    return None;
                }
                hop.named[hop.count] = token;
                hop.count += 1;
            }
        }
        Some(hop)
    }

    fn named(&self, name: &str) -> bool {
        self.named[..self.count]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// Whether request field `name` goes to the backend. `upgrade`: the request is a real
    /// upgrade (its `Upgrade` field goes, with `Connection: upgrade`, written by the engine).
    /// `host`: the client's `Host` goes (not when an absolute-form target's authority replaces
    /// it). `X-Forwarded-For` and `-Proto` are rewritten by [`forwarded_for`] and
    /// [`FORWARDED_PROTO`]; `Expect` is answered by tether (see [`super::Request`]).
    pub fn request_keeps(&self, name: &str, upgrade: bool, host: bool) -> bool {
        if !host && name.eq_ignore_ascii_case("host") {
            return false;
        }
        if HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || name.eq_ignore_ascii_case("x-forwarded-for")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || name.eq_ignore_ascii_case("expect")
        {
            return false;
        }
        if name.eq_ignore_ascii_case("upgrade") {
            return upgrade;
        }
        !self.named(name)
    }

    /// Whether response field `name` goes to the client. The engine writes its own
    /// `Connection`; `Upgrade` stays on a 101 (and on 426, which names what to upgrade to).
    /// Framing fields are the engine's business (relayed as they are, or re-encoded).
    pub fn response_keeps(&self, name: &str, status: u16) -> bool {
        if HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            return false;
        }
        if name.eq_ignore_ascii_case("upgrade") {
            return status == 101 || status == 426;
        }
        !self.named(name)
    }
}

/// `X-Forwarded-Proto` on every request to a backend: tether listens on plain HTTP only, and a
/// client cannot claim otherwise.
pub const FORWARDED_PROTO: &str = "http";

/// The `X-Forwarded-For` value for a backend: the client's values (folded, in order), then the
/// peer address, as NGINX's `$proxy_add_x_forwarded_for`.
pub fn forwarded_for<'a>(client_values: impl Iterator<Item = &'a [u8]>, peer: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(48);
    for v in client_values {
        value.extend_from_slice(v);
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(peer.as_bytes());
    value
}

/// A `Host` value that names a host: `host[:port]` with a registered name or an IP literal, no
/// user information (`user@host`), no path, no whitespace (NGINX refuses those with 400).
pub fn valid_host(value: &[u8]) -> bool {
    !value.is_empty()
        && value
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b))
        && value[0] != b'.'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_stay_behind() {
        let hop = Hop::of([&b"close, X-Foo"[..], b"keep-alive"].into_iter()).unwrap();
        assert!(hop.close && hop.keep_alive && !hop.upgrade);
        for gone in [
            "Connection",
            "Keep-Alive",
            "TE",
            "Proxy-Connection",
            "Proxy-Authorization",
            "x-foo",
            "Upgrade",
            "X-Forwarded-For",
            "x-forwarded-proto",
            "Expect",
        ] {
            assert!(!hop.request_keeps(gone, false, true), "{gone}");
        }
        for kept in ["host", "cookie", "x-bar", "authorization", "trailer"] {
            assert!(hop.request_keeps(kept, false, true), "{kept}");
        }
        assert!(hop.request_keeps("upgrade", true, true));
        assert!(!hop.request_keeps("host", false, false));
        assert!(!hop.response_keeps("upgrade", 200));
        assert!(hop.response_keeps("upgrade", 101));
        assert!(!hop.response_keeps("x-foo", 200));
        assert!(hop.response_keeps("set-cookie", 200));
    }

    #[test]
    fn a_connection_header_that_is_not_a_token_list_is_refused() {
        assert!(Hop::of([&b"close, a b"[..]].into_iter()).is_none());
        let many = b"a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q";
        assert!(Hop::of([&many[..]].into_iter()).is_none());
        assert!(Hop::of([&b"upgrade,,"[..]].into_iter()).unwrap().upgrade);
    }

    #[test]
    fn hosts_name_a_host_and_nothing_else() {
        for ok in [
            &b"example.com"[..],
            b"a:8080",
            b"[::1]:80",
            b"10.0.0.1",
            b"xn--bcher-kva.de",
        ] {
            assert!(valid_host(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [&b""[..], b"user@host", b"a b", b"a/b", b"a\\b", b".a"] {
            assert!(!valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        assert_eq!(forwarded_for(std::iter::empty(), "1.2.3.4"), b"1.2.3.4");
        assert_eq!(
            forwarded_for([&b"9.9.9.9"[..], b"8.8.8.8"].into_iter(), "1.2.3.4"),
            b"9.9.9.9, 8.8.8.8, 1.2.3.4"
        );
    }
}
