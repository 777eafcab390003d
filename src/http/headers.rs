//! Which header fields cross tether, and what it adds: hop-by-hop fields are removed (RFC 9110
//! section 7.6.1), `X-Forwarded-For` is appended to and `X-Forwarded-Proto` set. Every engine
//! asks [`Hop`] field by field; none keeps its own list.

/// Whether `name` is a field that describes one connection, never forwarded (RFC 9110 section
/// 7.6.1, plus the obsolete `Proxy-Connection`, the credentials meant for tether itself, and
/// RFC 9113 section 3.2.1's `HTTP2-Settings` of h2c upgrades, which tether does not offer).
/// Dispatched on length first: this runs for every field of every message.
fn hop_by_hop(name: &[u8]) -> bool {
    let is = |hop: &[u8]| name.eq_ignore_ascii_case(hop);
    match name.len() {
        2 => is(b"te"),
        10 => is(b"connection") || is(b"keep-alive"),
        14 => is(b"http2-settings"),
        16 => is(b"proxy-connection"),
        19 => is(b"proxy-authorization"),
        _ => false,
    }
}

/// The most field names a `Connection` header may add to the hop-by-hop set, and the most
/// `Connection` field lines a message may have; more are refused by [`Hop::of`] (a bad request,
/// or a 502 for a response).
pub const MAX_CONNECTION_TOKENS: usize = 16;
pub const MAX_CONNECTION_FIELDS: usize = 4;

/// The hop-by-hop decisions for one message: the fields its `Connection` header names. Small
/// (it is made for every message): the field values are kept, and read again only when they
/// name a field other than `close`, `keep-alive` and `upgrade`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hop<'a> {
    values: [&'a [u8]; MAX_CONNECTION_FIELDS],
    count: u8,
    /// A token other than `close`, `keep-alive` and `upgrade` is among them.
    names_others: bool,
    /// `Connection: close` was among them.
    pub close: bool,
    /// `Connection: keep-alive` was among them (an HTTP/1.0 client asking to keep it open).
    pub keep_alive: bool,
    /// `Connection: upgrade` was among them.
    pub upgrade: bool,
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

impl<'a> Hop<'a> {
    /// Read the `Connection` field lines `values`. `None`: more than [`MAX_CONNECTION_FIELDS`]
    /// lines, more than [`MAX_CONNECTION_TOKENS`] names, or a name that is not a token.
    pub fn of(values: impl Iterator<Item = &'a [u8]>) -> Option<Hop<'a>> {
        let mut hop = Hop::default();
        let mut names = 0;
        for v in values {
            let slot = hop.values.get_mut(usize::from(hop.count))?;
            *slot = v;
            hop.count += 1;
            for token in tokens(v) {
                if !token.iter().all(|b| super::framing::is_tchar(*b)) {
                    return None;
                }
                if token.eq_ignore_ascii_case(b"close") {
                    hop.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    hop.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    hop.upgrade = true;
                } else {
                    hop.names_others = true;
                }
                names += 1;
                if names > MAX_CONNECTION_TOKENS {
                    return None;
                }
            }
        }
        Some(hop)
    }

    /// `Connection` names field `name`.
    fn named(&self, name: &[u8]) -> bool {
        let named = |t: &[u8]| t.eq_ignore_ascii_case(name);
        match name.len() {
            5 if named(b"close") => self.close,
            7 if named(b"upgrade") => self.upgrade,
            10 if named(b"keep-alive") => self.keep_alive,
            _ => {
                self.names_others
                    && self.values[..usize::from(self.count)]
                        .iter()
                        .any(|v| tokens(v).any(named))
            }
        }
    }

    /// Whether request field `name` goes to the backend. `upgrade`: the request is a real
    /// upgrade (its `Upgrade` field goes, with `Connection: upgrade`, written by the engine).
    /// `host`: the client's `Host` goes (not when an absolute-form target's authority replaces
    /// it). `X-Forwarded-For` and `-Proto` are rewritten by [`forwarded_for`] and
    /// [`forwarded_proto`]; `Expect` is answered by tether (see [`super::Request`]).
    pub fn request_keeps(&self, name: &str, upgrade: bool, host: bool) -> bool {
        let name = name.as_bytes();
        let is = |field: &[u8]| name.eq_ignore_ascii_case(field);
        let keeps = match name.len() {
            4 if is(b"host") => host,
            6 if is(b"expect") => false,
            7 if is(b"upgrade") => return upgrade,
            15 if is(b"x-forwarded-for") => false,
            17 if is(b"x-forwarded-proto") => false,
            _ => !hop_by_hop(name),
        };
        keeps && !self.named(name)
    }

    /// Whether response field `name` goes to the client. The engine writes its own
    /// `Connection`; `Upgrade` stays on a 101 (and on 426, which names what to upgrade to).
    /// Framing fields are the engine's business (relayed as they are, or re-encoded).
    pub fn response_keeps(&self, name: &str, status: u16) -> bool {
        let name = name.as_bytes();
        if name.len() == 7 && name.eq_ignore_ascii_case(b"upgrade") {
            return status == 101 || status == 426;
        }
        !hop_by_hop(name) && !self.named(name)
    }
}

/// `X-Forwarded-Proto` on every request to a backend: the scheme the client reached tether
/// with (`tls`: a TLS listener). A client's own value is dropped: it cannot claim otherwise.
pub fn forwarded_proto(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// Write the `X-Forwarded-For` value for a backend to `out`: the client's values (folded, in
/// order), then the peer address, as NGINX's `$proxy_add_x_forwarded_for`.
pub fn forwarded_for<'a>(
    out: &mut Vec<u8>,
    client_values: impl Iterator<Item = &'a [u8]>,
    peer: &str,
) {
    for v in client_values {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.as_bytes());
}

/// One `Cookie` value for an HTTP/1.1 backend from several `cookie` fields: HTTP/2 clients may
/// send the cookie as crumbs, one field each, which a proxy to HTTP/1.1 joins with `; ` (RFC
/// 9113 section 8.2.3); many HTTP/1.1 servers read only the first `Cookie` line. `None`: at most
/// one field, nothing to join.
pub fn joined_cookies<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let first = values.next()?;
    let second = values.next()?;
    let mut out = Vec::with_capacity(first.len() + second.len() + 32);
    for v in [first, second].into_iter().chain(values) {
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(v);
    }
    Some(out)
}

const HOST_CHAR: [bool; 256] = super::framing::byte_class(true, b"-._~!$&'()*+,;=:[]%");

/// A `Host` value that names a host: `host[:port]` with a registered name or an IP literal, no
/// user information (`user@host`), no path, no whitespace (NGINX refuses those with 400).
pub fn valid_host(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(|&b| HOST_CHAR[usize::from(b)]) && value[0] != b'.'
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
            "HTTP2-Settings",
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
        assert!(Hop::of([&many[2..]].into_iter()).is_some());
        assert!(Hop::of([&b"a"[..]; MAX_CONNECTION_FIELDS + 1].into_iter()).is_none());
        let four = Hop::of([&b"a"[..], b"b", b"c", b"Close"].into_iter()).unwrap();
        assert!(four.close && !four.request_keeps("C", false, true));
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
    fn cookie_crumbs_are_joined() {
        assert_eq!(joined_cookies(std::iter::empty()), None);
        assert_eq!(joined_cookies([&b"a=1"[..]].into_iter()), None);
        assert_eq!(
            joined_cookies([&b"a=1"[..], b"sid=x", b"b=2"].into_iter()).as_deref(),
            Some(&b"a=1; sid=x; b=2"[..])
        );
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let value = |client: &[&'static [u8]]| {
            let mut out = Vec::new();
            forwarded_for(&mut out, client.iter().copied(), "1.2.3.4");
            out
        };
        assert_eq!(value(&[]), b"1.2.3.4");
        assert_eq!(
            value(&[b"9.9.9.9", b"8.8.8.8"]),
            b"9.9.9.9, 8.8.8.8, 1.2.3.4"
        );
    }
}
