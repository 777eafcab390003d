//! tether's HTTP/1 policy: every decision about a message that is not about bytes, in one place,
//! for every engine ([`crate::engine`]). Engines translate bytes; they ask here what to forward,
//! when a request is refused and with what status, how a body is framed, when a request may be
//! sent again, what a failure is answered with and counted as, how long a head may take, and
//! which settings a reload may change.
//!
//! - Request heads ([`check_request`]): HTTP/1.0 or 1.1, origin-form (or absolute-form, or `*`
//!   for OPTIONS); exactly one valid `Host` on HTTP/1.1 (at most one on 1.0), no `user@host`;
//!   framing by [`framing::request_body`]; `Expect: 100-continue` only (417 otherwise), answered
//!   by dropping it on a request without a body; CONNECT is refused (405), as NGINX does. Syntax
//!   (tokens, control bytes, obs-fold, whitespace before a colon) is httparse's strict default:
//!   400.
//! - Headers ([`headers`]): hop-by-hop fields removed both ways, `X-Forwarded-For` appended,
//!   `X-Forwarded-Proto: http`.
//! - Responses: framing by [`framing::response_body`] (anything ambiguous is a 502), no obs-fold,
//!   no `101` to a request that did not ask to upgrade, at most [`MAX_RESPONSE_HEAD`] bytes.
//! - Failures ([`failure_status`], [`upstream_kind`]) and tether's own answers
//!   ([`ErrorAnswer`]).
//! - Resends ([`may_resend`]): at most `connect_retries + 2` attempts per request.

pub mod framing;
pub mod headers;

use std::time::Duration;

use pingora::prelude::{ErrorSource, ErrorType};

use crate::config::ServerSettings;
use crate::metrics::UpstreamError;
use framing::{RequestBody, ResponseBody};
use headers::{Hop, MAX_CONNECTION_FIELDS};

/// A request tether answers itself, with this status, instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// For the debug log: what was wrong.
    pub reason: &'static str,
}

impl Refusal {
    pub fn new(status: u16, reason: &'static str) -> Refusal {
        Refusal { status, reason }
    }

    pub fn bad_request(reason: &'static str) -> Refusal {
        Refusal::new(400, reason)
    }
}

/// A request head that passed the policy, and what the engines need to know about it.
#[derive(Debug)]
pub struct Request<'h> {
    pub body: RequestBody,
    /// A WebSocket-style upgrade: `Connection: upgrade` and an `Upgrade` field on an HTTP/1.1
    /// request without a body. Anything else is forwarded without its `Upgrade` field, and a
    /// 101 to it is a 502.
    pub upgrade: bool,
    /// The connection closes after this response (`Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive`).
    pub close: bool,
    pub http10: bool,
    /// The target starts with `/`.
    pub origin_form: bool,
    /// The target as the backend gets it: origin-form (an absolute-form target's path and
    /// query, `/` if it has none), or `*`.
    pub target: &'h str,
    /// An absolute-form target's authority: it replaces the `Host` field (RFC 9112 section
    /// 3.2.2).
    pub authority: Option<&'h str>,
    /// The method may be sent twice without changing more than once (RFC 9110 section 9.2.2).
    pub idempotent: bool,
    pub hop: Hop<'h>,
}

/// Check a parsed request head (`head_len` bytes) against the policy and `limits`.
pub fn check_request<'h>(
    req: &httparse::Request<'_, 'h>,
    head_len: usize,
    limits: &ServerSettings,
) -> Result<Request<'h>, Refusal> {
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    if let Some(r) = head_too_large(head_len, target.len(), limits) {
        return Err(r);
    }
    if req.headers.len() > limits.max_request_headers {
        return Err(Refusal::new(431, "too many header fields"));
    }
    let http10 = req.version == Some(0);
    if method == "CONNECT" {
        return Err(Refusal::new(405, "CONNECT is not proxied"));
    }
    let origin_form = target.starts_with('/');
    let scheme = ["http://", "https://"].into_iter().find(|s| {
        !origin_form
            && target
                .get(..s.len())
                .is_some_and(|t| t.eq_ignore_ascii_case(s))
    });
    let (forward_target, authority) = match scheme {
        _ if origin_form => (target, None),
        Some(s) => {
            let rest = &target[s.len()..];
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            if !headers::valid_host(authority.as_bytes()) {
                return Err(Refusal::bad_request("absolute-form target without a host"));
            }
            match path {
                "" => ("/", Some(authority)),
                p if p.starts_with('?') => {
                    return Err(Refusal::bad_request("absolute-form target without a path"));
                }
                p => (p, Some(authority)),
            }
        }
        None if target == "*" && method == "OPTIONS" => (target, None),
        None => {
            return Err(Refusal::bad_request(
                "request target is not origin- or absolute-form",
            ));
        }
    };
    // One pass over the fields for everything the policy looks at (this runs per request).
    let (mut hosts, mut host) = (0, &b""[..]);
    let mut fields = FramingFields::default();
    let mut has_upgrade = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if fields.take(name, h.value) {
            continue;
        }
        // Dispatch on length first: most fields are none of these.
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                hosts += 1;
                host = h.value;
            }
            6 if name.eq_ignore_ascii_case(b"expect")
                && !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") =>
            {
                return Err(Refusal::new(417, "Expect other than 100-continue"));
            }
            // h2c is not offered (RFC 9113 deprecates it): such a request is served as HTTP/1.1.
            7 if name.eq_ignore_ascii_case(b"upgrade") => {
                has_upgrade = !h.value.trim_ascii().eq_ignore_ascii_case(b"h2c");
            }
            _ => {}
        }
    }
    match hosts {
        0 if !http10 && authority.is_none() => {
            return Err(Refusal::bad_request("no Host field"));
        }
        0 => {}
        1 if !headers::valid_host(host.trim_ascii()) => {
            return Err(Refusal::bad_request("Host is not a host"));
        }
        1 => {}
        _ => return Err(Refusal::bad_request("more than one Host field")),
    }
    let body = framing::request_body(fields.lengths(), fields.codings())?;
    if http10 && body == RequestBody::Chunked {
        return Err(Refusal::bad_request(
            "chunked request body from an HTTP/1.0 client",
        ));
    }
    let hop = Hop::of(fields.connection().map_err(Refusal::bad_request)?)
        .ok_or(Refusal::bad_request("Connection is not a short token list"))?;
    let upgrade = hop.upgrade && !http10 && body == RequestBody::None && has_upgrade;
    Ok(Request {
        body,
        upgrade,
        close: hop.close || (http10 && !hop.keep_alive),
        http10,
        origin_form,
        target: forward_target,
        authority,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
        ),
        hop,
    })
}

/// Where the head at the start of `buf` ends (after its blank line), if it is all there. Bare
/// LF line ends count, as httparse (and NGINX) accept them.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|b| *b == b'\n') {
        let at = from + i;
        match buf.get(at + 1..at + 3) {
            Some([b'\r', b'\n']) => return Some(at + 3),
            Some([b'\n', _]) => return Some(at + 2),
            None if buf.get(at + 1) == Some(&b'\n') => return Some(at + 2),
            _ => {}
        }
        from = at + 1;
    }
    None
}

/// A head of `head_len` bytes with a `target_len`-byte target is over the limit: 414 when the
/// target takes most of it, 431 otherwise (as NGINX and HAProxy answer). The one measure of a
/// head's size: its bytes on the wire.
pub fn head_too_large(
    head_len: usize,
    target_len: usize,
    limits: &ServerSettings,
) -> Option<Refusal> {
    let max = limits.max_request_header_bytes;
    if head_len <= max {
        return None;
    }
    Some(if target_len > max / 2 {
        Refusal::new(414, "request target too long")
    } else {
        Refusal::new(431, "request head too large")
    })
}

/// How long a client has for the whole head of its next request: `client_header_timeout`, plus
/// the keep-alive idle time on a connection that already carried one.
pub fn head_timeout(limits: &ServerSettings, reused: bool) -> Duration {
    if reused {
        limits.client_header_timeout + limits.keepalive_timeout
    } else {
        limits.client_header_timeout
    }
}

/// Once tether is stopping, how long a connection still waiting for its request head gets to
/// deliver it (a client connected just before the listener closed). Idle keep-alive connections
/// close after it.
pub const SHUTDOWN_READ_GRACE: Duration = Duration::from_secs(1);

/// The most a response head may take, and the most header fields it may have.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
pub const MAX_RESPONSE_HEADERS: usize = 256;

/// How httparse reads response heads: its strict defaults (no obs-fold, no whitespace before a
/// colon). Pingora's own parser allows both; its engine refuses them by their traces (see
/// [`response_fields_valid`]).
pub fn parse_response<'b>(
    resp: &mut httparse::Response<'_, 'b>,
    buf: &'b [u8],
) -> httparse::Result<usize> {
    resp.parse(buf)
}

/// The fields framing and hop-by-hop decisions read (`Content-Length`, `Transfer-Encoding`,
/// `Connection`), gathered in the one pass over a message's fields that [`check_request`] and
/// [`check_response`] make.
#[derive(Default)]
struct FramingFields<'h> {
    /// Two values of either say "more than one" as well as all of them would.
    lengths: [&'h [u8]; 2],
    n_lengths: usize,
    codings: [&'h [u8]; 2],
    n_codings: usize,
    connection: [&'h [u8]; MAX_CONNECTION_FIELDS],
    n_connection: usize,
}

impl<'h> FramingFields<'h> {
    /// Keep field `name: value` if it is one of these (`true`). More `Connection` lines than
    /// [`MAX_CONNECTION_FIELDS`] are counted, and refused by [`FramingFields::connection`].
    #[inline(always)]
    fn take(&mut self, name: &[u8], value: &'h [u8]) -> bool {
        match name.len() {
            10 if name.eq_ignore_ascii_case(b"connection") => {
                if let Some(slot) = self.connection.get_mut(self.n_connection) {
                    *slot = value;
                }
                self.n_connection += 1;
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                self.lengths[self.n_lengths.min(1)] = value;
                self.n_lengths += 1;
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                self.codings[self.n_codings.min(1)] = value;
                self.n_codings += 1;
            }
            _ => return false,
        }
        true
    }

    fn lengths(&self) -> impl Iterator<Item = &'h [u8]> + Clone + '_ {
        self.lengths[..self.n_lengths.min(2)].iter().copied()
    }

    fn codings(&self) -> impl Iterator<Item = &'h [u8]> + Clone + '_ {
        self.codings[..self.n_codings.min(2)].iter().copied()
    }

    /// The `Connection` values; `Err` when there were too many lines.
    fn connection(&self) -> Result<impl Iterator<Item = &'h [u8]> + '_, &'static str> {
        match self.connection.get(..self.n_connection) {
            Some(values) => Ok(values.iter().copied()),
            None => Err("too many Connection fields"),
        }
    }
}

/// A backend's response head that passed the policy, and what the engine needs to know of it.
#[derive(Debug)]
pub struct Response<'h> {
    pub body: ResponseBody,
    pub hop: Hop<'h>,
    /// It has `Set-Cookie` fields (affinity may learn a pin from them).
    pub set_cookie: bool,
}

/// Check a parsed final response head (not a 1xx other than 101) in one pass over its fields:
/// its framing ([`framing::response_body`]), its `Connection` field, and a 101 only to a
/// request that asked to upgrade (`upgrade`), with an `Upgrade` field. `head`: the request was
/// HEAD. `Err`: answer 502 and do not reuse the connection.
pub fn check_response<'h>(
    resp: &httparse::Response<'_, 'h>,
    head: bool,
    upgrade: bool,
) -> Result<Response<'h>, &'static str> {
    let status = resp.code.unwrap_or(0);
    if status == 101 && !upgrade {
        return Err("101 to a request that did not ask to upgrade");
    }
    let mut fields = FramingFields::default();
    let (mut has_upgrade, mut set_cookie) = (false, false);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if fields.take(name, h.value) {
            continue;
        }
        match name.len() {
            7 if name.eq_ignore_ascii_case(b"upgrade") => has_upgrade = true,
            10 if name.eq_ignore_ascii_case(b"set-cookie") => set_cookie = true,
            _ => {}
        }
    }
    let body = framing::response_body(status, head, fields.lengths(), fields.codings())?;
    let hop = Hop::of(fields.connection()?).ok_or("malformed Connection field")?;
    if status == 101 && !has_upgrade {
        return Err("101 without Upgrade");
    }
    Ok(Response {
        body,
        hop,
        set_cookie,
    })
}

/// A response field value holds no CR or LF (an obs-fold that a lenient parser let through).
pub fn response_fields_valid<'a>(values: impl Iterator<Item = &'a [u8]>) -> bool {
    values
        .into_iter()
        .all(|v| !v.iter().any(|b| *b == b'\r' || *b == b'\n'))
}

/// Whether a request whose attempt failed before any response byte reached tether may be sent
/// again (to the same backend, on a new connection). Only an idempotent method, and only when
/// the backend closed the connection without answering: a timeout means the backend may still
/// be working on it. `upstream_reused`: the attempt ran on a pooled connection, which the
/// backend may have closed while idle (one more resend for those). `attempts` counts every
/// attempt so far, connect failovers included: at most `connect_retries + 2` in all.
pub fn may_resend(
    idempotent: bool,
    closed_before_response: bool,
    upstream_reused: bool,
    attempts: usize,
    connect_retries: usize,
) -> bool {
    idempotent
        && closed_before_response
        && attempts <= connect_retries + usize::from(upstream_reused)
}

/// Pingora's own cap on attempts after the first (`ServerConf::max_retries`): the same
/// `connect_retries + 2` attempts in all as [`may_resend`] and
/// [`crate::route::connect_failed`] allow; they decide each retry.
pub fn pingora_max_retries(connect_retries: usize) -> usize {
    connect_retries + 1
}

/// What kind of upstream failure an error is, for `tether_upstream_errors_total{kind}`.
pub fn upstream_kind(etype: &ErrorType) -> UpstreamError {
    use ErrorType::*;
    match etype {
        ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
        | BindError | SocketError => UpstreamError::Connect,
        TLSWantX509Lookup | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert
        | HandshakeError => UpstreamError::Tls,
        ReadTimedout | WriteTimedout => UpstreamError::Timeout,
        ConnectionClosed | ReadError | WriteError => UpstreamError::Closed,
        // pingora-core's `PREMATURE_BODY_END`: the connection closed before Content-Length.
        Custom("PrematureBodyEnd") => UpstreamError::Closed,
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade => UpstreamError::Protocol,
        Custom("InvalidChunk" | "InvalidTrailerEnd" | "InvalidFraming") => UpstreamError::Protocol,
        _ => UpstreamError::Other,
    }
}

/// The status tether answers a failed request with (0: nobody to answer, the client left).
/// A backend that did not answer in time: 504, as HAProxy and NGINX; any other backend failure:
/// 502; a bad request: 400.
pub fn failure_status(etype: &ErrorType, source: &ErrorSource) -> u16 {
    match (etype, source) {
        (ErrorType::HTTPStatus(code), _) => *code,
        (_, ErrorSource::Upstream) if upstream_kind(etype) == UpstreamError::Timeout => 504,
        (_, ErrorSource::Upstream) => 502,
        (
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
            ErrorSource::Downstream,
        ) => 0,
        (_, ErrorSource::Downstream) => 400,
        (_, ErrorSource::Internal | ErrorSource::Unset) => 500,
    }
}

/// tether's own answer to a request it refuses or cannot serve: a short text body, no `server`
/// token, `Connection: close` (after an error the connection's state is not trusted).
pub struct ErrorAnswer {
    pub status: u16,
    pub reason: &'static str,
    pub body: String,
}

impl ErrorAnswer {
    pub fn new(status: u16) -> ErrorAnswer {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        ErrorAnswer {
            status,
            reason,
            body: format!("{status} {reason}\n"),
        }
    }

    /// The header fields, in order (engines write them as they are).
    pub fn fields(&self, date: &str) -> [(&'static str, String); 5] {
        [
            ("Date", date.to_owned()),
            ("content-type", "text/plain; charset=utf-8".to_owned()),
            ("content-length", self.body.len().to_string()),
            ("cache-control", "no-store".to_owned()),
            ("Connection", "close".to_owned()),
        ]
    }

    /// The whole answer as HTTP/1.1 bytes; `head`: the request was HEAD (no body).
    pub fn to_bytes(&self, date: &str, head: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(192);
        out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", self.status, self.reason).as_bytes());
        for (name, value) in self.fields(date) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// Requests to a `listen_redirect` listener under this prefix are proxied, not redirected: an
/// ACME client answering HTTP-01 challenges (RFC 8555 section 8.3) behind tether must get them.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Whether a request to a redirect listener with this (origin-form) target is redirected.
pub fn redirects(target: &str) -> bool {
    !target.starts_with(ACME_CHALLENGE_PREFIX)
}

/// tether's `308 Permanent Redirect` to the same host and target over HTTPS, on `port` (left
/// out when it is 443). `host` is the request's `Host` (or absolute-form authority), whose own
/// port is dropped. 308 keeps the method and body (RFC 9110 section 15.4.9), as HAProxy's
/// `redirect scheme https code 308` does. `close`: `Connection: close` (a request with a body,
/// which is not read).
pub fn https_redirect(host: &str, target: &str, port: u16, date: &str, close: bool) -> Vec<u8> {
    let name = match host.rsplit_once(':') {
        // An IPv6 literal keeps its brackets; only a port after them goes.
        Some((name, p)) if !p.contains(']') && p.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let location = if port == 443 {
        format!("https://{name}{target}")
    } else {
        format!("https://{name}:{port}{target}")
    };
    let connection = if close { "close" } else { "keep-alive" };
    format!(
        "HTTP/1.1 308 Permanent Redirect\r\nDate: {date}\r\nLocation: {location}\r\n\
         content-length: 0\r\nConnection: {connection}\r\n\r\n"
    )
    .into_bytes()
}

/// The `[server]` settings a reload cannot change: they are bound when tether starts (listeners,
/// runtimes, Pingora's own settings and its upstream pool size, which the lean engine follows
/// too). Everything else in `[server]` (timeouts, head limits, the access log, `engine`) applies
/// to the next request after a reload.
pub fn restart_only(old: &ServerSettings, new: &ServerSettings) -> Vec<&'static str> {
    let bound = [
        ("server.listen", old.listen != new.listen),
        ("server.listen_tls", old.listen_tls != new.listen_tls),
        (
            "server.h2_max_concurrent_streams",
            old.h2_max_concurrent_streams != new.h2_max_concurrent_streams,
        ),
        (
            "server.h2_max_header_list_bytes",
            old.h2_max_header_list_bytes != new.h2_max_header_list_bytes,
        ),
        (
            "server.h2_stream_window_bytes",
            old.h2_stream_window_bytes != new.h2_stream_window_bytes,
        ),
        (
            "server.h2_connection_window_bytes",
            old.h2_connection_window_bytes != new.h2_connection_window_bytes,
        ),
        (
            "server.listen_redirect",
            old.listen_redirect != new.listen_redirect,
        ),
        ("server.threads", old.threads != new.threads),
        (
            "server.grace_period_secs",
            old.grace_period != new.grace_period,
        ),
        (
            "server.graceful_shutdown_timeout_secs",
            old.graceful_shutdown_timeout != new.graceful_shutdown_timeout,
        ),
        ("server.upgrade_sock", old.upgrade_sock != new.upgrade_sock),
        (
            "server.upstream_keepalive_pool",
            old.upstream_keepalive_pool != new.upstream_keepalive_pool,
        ),
    ];
    bound
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_keep_host_and_target_and_name_the_tls_port() {
        let text = |host, target, port| {
            String::from_utf8(https_redirect(host, target, port, "D", false)).unwrap()
        };
        assert!(
            text("example.com", "/a?b=1", 443).contains("Location: https://example.com/a?b=1\r\n")
        );
        assert!(
            text("example.com:80", "/", 8443).contains("Location: https://example.com:8443/\r\n")
        );
        assert!(text("[::1]:80", "/x", 443).contains("Location: https://[::1]/x\r\n"));
        assert!(text("[::1]", "/x", 443).contains("Location: https://[::1]/x\r\n"));
        assert!(
            String::from_utf8(https_redirect("h", "/", 443, "D", true))
                .unwrap()
                .contains("Connection: close")
        );
        assert!(redirects("/index.html"));
        assert!(!redirects("/.well-known/acme-challenge/token"));
        assert!(redirects("/.well-known/acme-challengeX"));
    }

    fn limits() -> ServerSettings {
        crate::config::test_server_settings()
    }

    fn check(head: &[u8]) -> Result<(bool, bool, bool, RequestBody), u16> {
        let mut h = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut h);
        let n = match req.parse(head) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => return Err(400),
        };
        check_request(&req, n, &limits())
            .map(|r| (r.upgrade, r.close, r.idempotent, r.body))
            .map_err(|r| r.status)
    }

    #[test]
    fn a_head_ends_at_its_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nGET"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
    }

    #[test]
    fn request_heads_follow_the_policy() {
        let ok = |h: &str| check(h.as_bytes()).unwrap();
        assert_eq!(
            ok("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            (false, false, true, RequestBody::None)
        );
        assert_eq!(
            ok("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            (true, false, true, RequestBody::None)
        );
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").0);
        assert!(ok("GET / HTTP/1.0\r\n\r\n").1);
        assert!(!ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").1);
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n").3,
            RequestBody::Length(3)
        );
        assert!(!ok("POST / HTTP/1.1\r\nHost: a\r\n\r\n").2);
        ok("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n");
        ok("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
        ok("GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn bad_request_heads_are_refused_with_the_status_nginx_gives() {
        let refused = |h: &str| check(h.as_bytes()).expect_err(&h[..h.len().min(80)]);
        assert_eq!(refused("GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(refused("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(refused("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"), 400);
        assert_eq!(refused("GET x HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(refused("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"), 405);
        assert_eq!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nExpect: x\r\n\r\n"),
            417
        );
        assert_eq!(
            refused(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            400
        );
        assert_eq!(
            refused("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
            501
        );
        assert_eq!(
            refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nConnection: a b\r\n\r\n"),
            400
        );
        // httparse's strict defaults: obs-fold, whitespace before the colon, NUL, bare CR.
        assert_eq!(
            refused("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"),
            400
        );
        assert_eq!(refused("GET / HTTP/1.1\r\nHost : a\r\n\r\n"), 400);
        assert_eq!(refused("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n"), 400);
        assert_eq!(refused("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n"), 400);
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000));
        assert_eq!(refused(&long), 414);
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(70_000)
        );
        assert_eq!(refused(&big), 431);
    }

    #[test]
    fn at_most_connect_retries_plus_two_attempts() {
        // connect_retries = 1: a fresh connection closed early may be sent once more, a stale
        // pooled one twice; never a POST, never after a timeout.
        assert!(may_resend(true, true, false, 1, 1));
        assert!(!may_resend(true, true, false, 2, 1));
        assert!(may_resend(true, true, true, 2, 1));
        assert!(!may_resend(true, true, true, 3, 1));
        assert!(!may_resend(false, true, true, 1, 1));
        assert!(!may_resend(true, false, true, 1, 1));
        assert_eq!(pingora_max_retries(1) + 1, 3);
    }

    #[test]
    fn failures_map_to_statuses_and_kinds() {
        let up = ErrorSource::Upstream;
        assert_eq!(failure_status(&ErrorType::ReadTimedout, &up), 504);
        assert_eq!(failure_status(&ErrorType::WriteTimedout, &up), 504);
        assert_eq!(failure_status(&ErrorType::ConnectRefused, &up), 502);
        assert_eq!(failure_status(&ErrorType::HTTPStatus(503), &up), 503);
        assert_eq!(
            failure_status(&ErrorType::ReadError, &ErrorSource::Downstream),
            0
        );
        assert_eq!(
            failure_status(&ErrorType::InvalidHTTPHeader, &ErrorSource::Downstream),
            400
        );
        let kind = |t: ErrorType| upstream_kind(&t).as_str();
        assert_eq!(kind(ErrorType::ConnectRefused), "connect");
        assert_eq!(kind(ErrorType::ConnectTimedout), "connect");
        assert_eq!(kind(ErrorType::ReadTimedout), "timeout");
        assert_eq!(kind(ErrorType::WriteTimedout), "timeout");
        assert_eq!(kind(ErrorType::ConnectionClosed), "closed");
        assert_eq!(kind(ErrorType::ReadError), "closed");
        assert_eq!(kind(ErrorType::new("PrematureBodyEnd")), "closed");
        assert_eq!(kind(ErrorType::InvalidHTTPHeader), "protocol");
        assert_eq!(kind(ErrorType::new("InvalidChunk")), "protocol");
        assert_eq!(kind(ErrorType::InternalError), "other");
    }

    #[test]
    fn error_answers_are_short_and_tethers_own() {
        let a = ErrorAnswer::new(502).to_bytes("Mon, 07 Dec 2026 20:00:00 GMT", false);
        let text = String::from_utf8(a).unwrap();
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(!text.to_ascii_lowercase().contains("pingora"));
        assert!(text.ends_with("\r\n\r\n502 Bad Gateway\n"));
        assert!(text.contains("content-length: 16\r\n"));
    }
}
