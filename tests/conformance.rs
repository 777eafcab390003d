//! HTTP/1 conformance on raw bytes at both ends: a table of request-side, response-side and
//! connection-level vectors (smuggling, lengths, header syntax, Host, chunked bodies,
//! pipelining, Expect, HTTP/1.0, upgrades, hop-by-hop headers), each sent through a fresh tether
//! in front of a fresh [`RawBackend`], and judged on what the client read and what the backend
//! received.
//!
//! The verdicts are the target policy (DESIGN.md: strict framing per RFC 9112, reject
//! ambiguity, never guess; a response's Transfer-Encoding must be exactly `chunked`, as NGINX 1.22
//! requires), not a record of what tether does today. Every vector is also checked for the
//! central invariant, no desync:
//! - the client never reads bytes that are not a response to a request it sent: its stream splits
//!   into strict responses, no more final responses than requests, none carrying the body of the
//!   `/smuggled` request the vectors hide in bodies and trailers; and a connection left open
//!   answers a probe request with the probe's own answer, nothing before it;
//! - the backend never sees a request the client did not send as one: no `/smuggled`, no more
//!   requests than the client sent, every message well-formed (one Host, HTTP/1.1, one framing).
//!
//! Each group test runs every vector and lists every failure (name, what went wrong, what the
//! client and the backend got) before it panics. `tether_is_never_more_lenient_than_nginx` runs
//! the same table through a local NGINX 1.22 (scripts/test installs it): NGINX's verdicts must be
//! the ones docs/conformance.md records, and tether must meet every vector NGINX meets.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use support::raw::*;
use support::scenario::config_with;
use support::{Balancer, eventually_blocking, free_port, tail};

/// Longest wait for one phase of a vector (the answers, then the close or the probe's answer).
const DEADLINE: Duration = Duration::from_secs(3);

/// Sent on a connection the proxy left open, to see that it still frames requests where the
/// client does. Its answer has the body [`PROBE_BODY`].
const PROBE: &[u8] = b"GET /probe HTTP/1.1\r\nHost: tether\r\nConnection: close\r\n\r\n";
const PROBE_TARGET: &str = "/probe";
const PROBE_BODY: &[u8] = b"probe";

/// The request the smuggling vectors hide. The backend answers it with a body naming it, so the
/// client side sees it too.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: tether\r\n\r\n";

/// The RFC 6455 example key and its accept value.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

// ---------------------------------------------------------------------------------------------
// The vector table
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    Request,
    Response,
    Connection,
}

/// What the client must read.
#[derive(Clone, Debug)]
enum Want {
    /// Exactly one final response, with one of these statuses.
    Status(&'static [u16]),
    /// Exactly these final responses, in this order.
    Statuses(&'static [u16]),
    /// A response cut short: a 502 or a response that never completes, and then the connection
    /// closes (never kept alive).
    Cut,
    /// A 101, then these bytes, sent by the client, come back through the backend's echo.
    Tunnel(&'static [u8]),
}

/// What becomes of the client connection after the vector's responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// It closes (announced or not); a probe must not be answered.
    Must,
    /// It stays open and answers the probe.
    Never,
    /// Either, as long as it is not left hanging.
    Any,
}

/// What the backend must receive (probe requests aside).
#[derive(Clone, Copy, Debug)]
enum Reach {
    /// Not one byte.
    Nothing,
    /// Exactly this many complete, well-formed requests.
    Requests(usize),
    /// Nothing, or the start of one request whose body was streaming; never a second one.
    NoSecond,
}

/// An assertion on each request the backend received.
#[derive(Clone, Debug)]
enum Check {
    /// No such header.
    No(&'static str),
    /// Exactly one line of it, with this value.
    One(&'static str, &'static str),
    /// The token appears in its comma-separated list.
    Token(&'static str, &'static str),
    /// The body, de-chunked.
    Body(&'static [u8]),
    Target(&'static str),
}

impl Check {
    fn holds(&self, r: &RawRequest) -> Result<(), String> {
        let ok = match self {
            Check::No(name) => !r.has(name),
            Check::One(name, value) => r.header(name).as_deref() == Some(*value),
            Check::Token(name, token) => r.has_token(name, token),
            Check::Body(body) => r.body == *body,
            Check::Target(t) => r.target == *t,
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            Check::No(name) => format!("has {name}: {:?}", r.values(name)),
            Check::One(name, value) => format!("{name} is {:?}, not one {value:?}", r.values(name)),
            Check::Token(name, token) => format!("{name} {:?} lacks {token:?}", r.values(name)),
            Check::Body(body) => format!("body {:?}, not {:?}", show(&r.body), show(body)),
            Check::Target(t) => format!("target {:?}, not {t:?}", r.target),
        })
    }
}

/// An assertion on the vector's final responses (not the probe's).
#[derive(Clone, Debug)]
enum RespCheck {
    No(&'static str),
    NoToken(&'static str, &'static str),
    Body(&'static [u8]),
    /// The interim (1xx) statuses before the first final response.
    Interim(&'static [u16]),
}

#[derive(Clone)]
struct Vector {
    name: String,
    group: Group,
    /// Written one piece at a time ([`RawClient::send_pieces`]); usually one piece.
    client: Vec<Vec<u8>>,
    /// How many requests the client sent (for the invariant).
    requests: usize,
    /// The backend's answers to its non-probe requests, in order; after them a 200 whose body is
    /// the target.
    answers: Vec<Answer>,
    want: Want,
    close: Close,
    reach: Reach,
    checks: Vec<Check>,
    /// The backend's request targets, in order (empty: not checked).
    targets: Vec<&'static str>,
    resp: Vec<RespCheck>,
}

fn vector(group: Group, name: &str, client: impl AsRef<[u8]>) -> Vector {
    Vector {
        name: name.to_owned(),
        group,
        client: vec![client.as_ref().to_vec()],
        requests: 1,
        answers: Vec::new(),
        want: Want::Status(&[200]),
        close: Close::Any,
        reach: Reach::Requests(1),
        checks: Vec::new(),
        targets: Vec::new(),
        resp: Vec::new(),
    }
}

impl Vector {
    fn answer(mut self, a: Answer) -> Self {
        self.answers.push(a);
        self
    }
    fn want(mut self, w: Want) -> Self {
        self.want = w;
        self
    }
    fn status(self, s: &'static [u16]) -> Self {
        self.want(Want::Status(s))
    }
    fn close(mut self, c: Close) -> Self {
        self.close = c;
        self
    }
    fn reach(mut self, r: Reach) -> Self {
        self.reach = r;
        self
    }
    /// A framing or syntax error: this status, the connection closes, the backend gets nothing.
    fn rejected(self, s: &'static [u16]) -> Self {
        self.status(s).close(Close::Must).reach(Reach::Nothing)
    }
    /// Refused on its merits (Host, Expect): this status, the backend gets nothing.
    fn refused(self, s: &'static [u16]) -> Self {
        self.status(s).reach(Reach::Nothing)
    }
    fn check(mut self, c: Check) -> Self {
        self.checks.push(c);
        self
    }
    fn targets(mut self, t: &[&'static str]) -> Self {
        self.targets = t.to_vec();
        self
    }
    fn resp(mut self, c: RespCheck) -> Self {
        self.resp.push(c);
        self
    }
    fn requests(mut self, n: usize) -> Self {
        self.requests = n;
        self
    }
    /// Send the client bytes in two writes, cut after `at` bytes.
    fn cut_at(mut self, at: usize) -> Self {
        let all = self.client.concat();
        self.client = vec![all[..at].to_vec(), all[at..].to_vec()];
        self
    }

    /// The target verdict in a few words, for the tables.
    fn target(&self) -> String {
        let statuses = |s: &[u16]| s.iter().map(u16::to_string).collect::<Vec<_>>().join("/");
        let client = match &self.want {
            Want::Status(s) => statuses(s),
            Want::Statuses(s) => s.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
            Want::Cut => "cut or 502".to_owned(),
            Want::Tunnel(_) => "101 + echo".to_owned(),
        };
        let close = match self.close {
            Close::Must => ", close",
            Close::Never => ", keep-alive",
            Close::Any => "",
        };
        let backend = match self.reach {
            Reach::Nothing => "nothing".to_owned(),
            Reach::Requests(n) => format!("{n} req"),
            Reach::NoSecond => "nothing or 1 partial".to_owned(),
        };
        let mut checks: Vec<String> = self
            .checks
            .iter()
            .map(|c| match c {
                Check::No(h) => format!("no {h}"),
                Check::One(h, v) => format!("{h}: {v}"),
                Check::Token(h, t) => format!("{h} ∋ {t}"),
                Check::Body(b) => format!("body {}", show(b)),
                Check::Target(t) => format!("target {t}"),
            })
            .collect();
        checks.extend(self.resp.iter().map(|c| match c {
            RespCheck::No(h) => format!("client: no {h}"),
            RespCheck::NoToken(h, t) => format!("client: no {h} {t}"),
            RespCheck::Body(b) => format!("client body {}", show(b)),
            RespCheck::Interim(s) => format!("client 1xx {s:?}"),
        }));
        let checks = if checks.is_empty() {
            String::new()
        } else {
            format!(" ({})", checks.join("; "))
        };
        format!("{client}{close}; backend {backend}{checks}")
    }
}

fn get(headers: &str) -> Vec<u8> {
    format!("GET /v HTTP/1.1\r\nHost: tether\r\n{headers}\r\n").into_bytes()
}

fn post(headers: &str, body: &str) -> Vec<u8> {
    format!("POST /v HTTP/1.1\r\nHost: tether\r\n{headers}\r\n{body}").into_bytes()
}

fn chunked_post(body: &str) -> Vec<u8> {
    post("Transfer-Encoding: chunked\r\n", body)
}

/// TE.CL: `te_lines` plus `Content-Length: 4`, and a chunked body whose first chunk is
/// [`SMUGGLED`]: a recipient that goes by the length sees `/smuggled` as the next request.
fn te_cl(te_lines: &str) -> Vec<u8> {
    post(
        &format!("{te_lines}Content-Length: 4\r\n"),
        &format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len()),
    )
}

/// A WebSocket upgrade request for `/ws` in this HTTP version, with extra header lines.
fn ws_request(method: &str, version: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} /ws {version}\r\nHost: tether\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn ws_accept() -> Answer {
    Answer::bytes(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
    ))
}

const CHUNKED_HELLO: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

fn request_vectors() -> Vec<Vector> {
    use Group::Request as G;
    let hello = "5\r\nhello\r\n0\r\n\r\n";
    let mut v = vec![
        // Smuggling.
        vector(
            G,
            "smuggle: CL.TE",
            post(
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                    5 + SMUGGLED.len()
                ),
                &format!("0\r\n\r\n{SMUGGLED}"),
            ),
        )
        .rejected(&[400]),
        vector(G, "smuggle: TE.CL", te_cl("Transfer-Encoding: chunked\r\n")).rejected(&[400]),
        vector(
            G,
            "smuggle: TE.TE chunked + identity lines, CL",
            te_cl("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"),
        )
        .rejected(&[400]),
        vector(
            G,
            "smuggle: TE.TE `chunked, identity`, CL",
            te_cl("Transfer-Encoding: chunked, identity\r\n"),
        )
        .rejected(&[400]),
        vector(
            G,
            "smuggle: TE.TE vertical tab before chunked, CL",
            te_cl("Transfer-Encoding:\x0bchunked\r\n"),
        )
        .rejected(&[400]),
        vector(
            G,
            "smuggle: TE.TE obs-folded chunked, CL",
            te_cl("Transfer-Encoding:\r\n chunked\r\n"),
        )
        .rejected(&[400]),
        vector(
            G,
            "smuggle: TE.TE xchunked, CL",
            te_cl("Transfer-Encoding: xchunked\r\n"),
        )
        .rejected(&[400, 501]),
        vector(
            G,
            "smuggle: TE.TE `Transfer-Encoding : chunked`, CL",
            te_cl("Transfer-Encoding : chunked\r\n"),
        )
        .rejected(&[400]),
        vector(
            G,
            "te: chunked + identity lines",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                hello,
            ),
        )
        .rejected(&[400]),
        vector(
            G,
            "te: `chunked, identity`",
            post("Transfer-Encoding: chunked, identity\r\n", hello),
        )
        // A coding other than chunked alone: 501, as NGINX answers.
        .rejected(&[501]),
        vector(
            G,
            "te: `chunked, chunked`",
            post("Transfer-Encoding: chunked, chunked\r\n", hello),
        )
        .rejected(&[501]),
        vector(
            G,
            "te: vertical tab before chunked",
            post("Transfer-Encoding:\x0bchunked\r\n", hello),
        )
        .rejected(&[400]),
        vector(
            G,
            "te: xchunked",
            post("Transfer-Encoding: xchunked\r\n", hello),
        )
        .rejected(&[400, 501]),
        vector(
            G,
            "te: `Transfer-Encoding : chunked`",
            post("Transfer-Encoding : chunked\r\n", hello),
        )
        .rejected(&[400]),
        vector(
            G,
            "te: tabs around chunked (valid OWS)",
            post("Transfer-Encoding:\tchunked\t\r\n", hello),
        )
        .check(Check::Body(b"hello")),
        vector(
            G,
            "te: CHUNKED in capitals (valid)",
            post("Transfer-Encoding: CHUNKED\r\n", hello),
        )
        .check(Check::Body(b"hello")),
        vector(
            G,
            "smuggle: CL and TE on a GET",
            "GET /v HTTP/1.1\r\nHost: tether\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .rejected(&[400]),
        vector(
            G,
            "te: GET with an empty chunked body (valid)",
            "GET /v HTTP/1.1\r\nHost: tether\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        // Lengths.
        vector(
            G,
            "cl: two equal lines",
            post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
        )
        // RFC 9110 8.6 lets a recipient take them as one; NGINX and tether refuse them.
        .rejected(&[400]),
        vector(G, "cl: `5, 5`", post("Content-Length: 5, 5\r\n", "hello")).rejected(&[400]),
        vector(
            G,
            "cl: two different lines",
            post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
        )
        .rejected(&[400]),
        vector(G, "cl: `+5`", post("Content-Length: +5\r\n", "hello")).rejected(&[400]),
        vector(G, "cl: `-1`", post("Content-Length: -1\r\n", "hello")).rejected(&[400]),
        vector(G, "cl: `0x5`", post("Content-Length: 0x5\r\n", "hello")).rejected(&[400]),
        vector(G, "cl: `5 5`", post("Content-Length: 5 5\r\n", "hello")).rejected(&[400]),
        vector(
            G,
            "cl: 20 digits",
            post("Content-Length: 99999999999999999999\r\n", "hello"),
        )
        .rejected(&[400, 413]),
        vector(G, "cl: empty", post("Content-Length: \r\n", "hello")).rejected(&[400]),
        vector(
            G,
            "cl: leading zeros (valid)",
            post("Content-Length: 005\r\n", "hello"),
        )
        .check(Check::Body(b"hello")),
        // Header syntax.
        vector(G, "syntax: obs-fold", get("X-Fold: a\r\n b\r\n")).rejected(&[400]),
        vector(G, "syntax: bare CR inside a line", get("X-Cr: a\rb\r\n")).rejected(&[400]),
        vector(
            G,
            "syntax: bare LF line ends (accepted)",
            "GET /v HTTP/1.1\nHost: tether\nX-Lf: 1\n\n",
        )
        .check(Check::Target("/v"))
        .check(Check::One("x-lf", "1")),
        vector(G, "syntax: NUL in a value", get("X-Nul: a\x00b\r\n")).rejected(&[400]),
        vector(G, "syntax: 0x01 in a value", get("X-Ctl: a\x01b\r\n")).rejected(&[400]),
        vector(G, "syntax: DEL in a value", get("X-Del: a\x7fb\r\n")).rejected(&[400]),
        vector(G, "syntax: 0x01 in a name", get("X-C\x01tl: 1\r\n")).rejected(&[400]),
        vector(G, "syntax: NUL in a name", get("X-N\x00ul: 1\r\n")).rejected(&[400]),
        vector(G, "syntax: space before the colon", get("X-Sp : 1\r\n")).rejected(&[400]),
        vector(G, "syntax: `(` in a name", get("X(Foo): 1\r\n")).rejected(&[400]),
        vector(G, "syntax: empty name", get(": nameless\r\n")).rejected(&[400]),
        vector(
            G,
            "syntax: 0x01 in the target",
            "GET /v\x01 HTTP/1.1\r\nHost: tether\r\n\r\n",
        )
        .rejected(&[400]),
        vector(
            G,
            "syntax: NUL in the target",
            "GET /v\x00 HTTP/1.1\r\nHost: tether\r\n\r\n",
        )
        .rejected(&[400]),
        vector(
            G,
            "syntax: space inside the target",
            "GET /a b HTTP/1.1\r\nHost: tether\r\n\r\n",
        )
        .rejected(&[400]),
        vector(G, "syntax: tab in a value (valid)", get("X-Tab: a\tb\r\n"))
            .check(Check::One("x-tab", "a\tb")),
        vector(G, "syntax: UTF-8 in a value (valid)", get("X-Utf8: café\r\n"))
            .check(Check::One("x-utf8", "café")),
        // Host.
        vector(G, "host: none on HTTP/1.1", "GET /v HTTP/1.1\r\n\r\n").refused(&[400]),
        vector(G, "host: two lines", get("Host: other\r\n")).refused(&[400]),
        vector(
            G,
            "host: user@host",
            "GET /v HTTP/1.1\r\nHost: user@tether\r\n\r\n",
        )
        .refused(&[400]),
        vector(
            G,
            "host: absolute-form target",
            "GET http://example.com/abs HTTP/1.1\r\nHost: other\r\n\r\n",
        )
        .check(Check::Target("/abs"))
        .check(Check::One("host", "example.com")),
        // Chunked request bodies.
        vector(
            G,
            "chunked: extensions and trailers (valid)",
            chunked_post("5;ext=1\r\nhello\r\n6;a=\"b c\"\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"),
        )
        .check(Check::Body(b"hello world")),
    ];
    let bad_chunked: &[(&str, &str, &'static [u16])] = &[
        ("empty size line", "\r\nhello\r\n0\r\n\r\n", &[400]),
        (
            "`;ext` alone as size line",
            ";ext\r\nhello\r\n0\r\n\r\n",
            &[400],
        ),
        ("`0x` size", "0x5\r\nhello\r\n0\r\n\r\n", &[400]),
        (
            "17 hex digits",
            "10000000000000005\r\nhello\r\n0\r\n\r\n",
            &[400, 413],
        ),
        ("negative size", "-5\r\nhello\r\n0\r\n\r\n", &[400]),
        ("bare LF after the size", "5\nhello\r\n0\r\n\r\n", &[400]),
        ("bare LF after the data", "5\r\nhello\n0\r\n\r\n", &[400]),
        ("no CRLF after the data", "5\r\nhello0\r\n\r\n", &[400]),
        (
            "data longer than the size",
            "3\r\nhello\r\n0\r\n\r\n",
            &[400],
        ),
        (
            "request line in the trailers",
            "5\r\nhello\r\n0\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            &[400],
        ),
        (
            "invalid trailer field",
            "5\r\nhello\r\n0\r\nX T: 1\r\n\r\n",
            &[400],
        ),
    ];
    for (name, body, statuses) in bad_chunked {
        v.push(
            vector(G, &format!("chunked: {name}"), chunked_post(body))
                .rejected(statuses)
                .reach(Reach::NoSecond),
        );
    }
    v.extend([
        // Hop-by-hop and forwarding headers.
        vector(
            G,
            "hop: `Connection: close, X-Foo`",
            get("Connection: close, X-Foo\r\nX-Foo: 1\r\n"),
        )
        .close(Close::Must)
        .check(Check::No("x-foo"))
        .check(Check::No("connection")),
        vector(
            G,
            "hop: Keep-Alive",
            get("Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"),
        )
        .check(Check::No("keep-alive"))
        .check(Check::No("connection")),
        vector(G, "hop: TE: trailers", get("TE: trailers\r\n")).check(Check::No("te")),
        vector(
            G,
            "hop: TE listed in Connection",
            get("TE: trailers\r\nConnection: TE\r\n"),
        )
        .check(Check::No("te"))
        .check(Check::No("connection")),
        vector(
            G,
            "hop: Proxy-Connection",
            get("Proxy-Connection: keep-alive\r\n"),
        )
        .check(Check::No("proxy-connection")),
        vector(
            G,
            "hop: Proxy-Authorization",
            get("Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"),
        )
        .check(Check::No("proxy-authorization")),
        vector(
            G,
            "hop: `Upgrade: h2c` without an upgrade",
            get("Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"),
        )
        .check(Check::No("upgrade"))
        .check(Check::No("http2-settings"))
        .check(Check::No("connection")),
        vector(
            G,
            "xff: appended to",
            get("X-Forwarded-For: 203.0.113.7\r\n"),
        )
        .check(Check::One("x-forwarded-for", "203.0.113.7, 127.0.0.1")),
        vector(
            G,
            "xff: two lines, folded and appended to",
            get("X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n"),
        )
        .check(Check::One(
            "x-forwarded-for",
            "203.0.113.7, 198.51.100.1, 127.0.0.1",
        )),
        vector(
            G,
            "xfp: replaced by http",
            get("X-Forwarded-Proto: https\r\n"),
        )
        .check(Check::One("x-forwarded-proto", "http")),
    ]);
    v
}

fn response_vectors() -> Vec<Vector> {
    use Group::Response as G;
    // A 502 is tether's own, well-framed answer: the client connection may stay open after it.
    let bad = |name: &str, answer: &[u8]| {
        vector(G, name, get(""))
            .answer(Answer::bytes(answer))
            .status(&[502])
    };
    vec![
        bad(
            "resp: Content-Length + Transfer-Encoding",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        bad(
            "resp: two different Content-Lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        bad(
            "resp: `Content-Length: 5, 5`",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
        ),
        bad(
            "resp: `Content-Length: -1`",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
        ),
        bad(
            "resp: `Transfer-Encoding: chunked,`",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        bad(
            "resp: chunked + an empty Transfer-Encoding line",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        bad(
            "resp: `Transfer-Encoding: gzip, chunked`",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        vector(G, "resp: `Transfer-Encoding: identity`", get(""))
            .answer(
                Answer::bytes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nhello")
                    .then_close(),
            )
            .status(&[502]),
        bad(
            "resp: obs-fold",
            b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n b\r\nContent-Length: 5\r\n\r\nhello",
        ),
        bad(
            "resp: bare LF chunk lines, with the head",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
        ),
        vector(G, "resp: bare LF chunk lines, after the head", get(""))
            .answer(Answer::pieces(&[
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                b"6\n world\n0\n\n",
            ]))
            .want(Want::Cut)
            .close(Close::Must),
        vector(G, "resp: chunked body, then extra bytes", get(""))
            .answer(Answer::bytes(
                [
                    CHUNKED_HELLO,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
                ]
                .concat(),
            ))
            .resp(RespCheck::Body(b"hello")),
        vector(G, "resp: 204 with a body", get(""))
            .answer(Answer::bytes(
                b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\nsmuggled",
            ))
            .status(&[204]),
        vector(G, "resp: close-delimited body", get(""))
            .answer(Answer::bytes(b"HTTP/1.1 200 OK\r\n\r\nhello").then_close())
            .close(Close::Must)
            .resp(RespCheck::NoToken("connection", "keep-alive"))
            .resp(RespCheck::Body(b"hello")),
        vector(G, "resp: 103 Early Hints, then 200", get(""))
            .answer(Answer::pieces(&[
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            ]))
            .resp(RespCheck::Interim(&[103]))
            .resp(RespCheck::Body(b"hello")),
        vector(G, "resp: unasked 100 Continue, then 200", get(""))
            .answer(Answer::pieces(&[
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            ]))
            .resp(RespCheck::Interim(&[]))
            .resp(RespCheck::Body(b"hello")),
        vector(G, "resp: cut short mid-body (Content-Length)", get(""))
            .answer(
                Answer::bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello").then_close(),
            )
            .want(Want::Cut)
            .close(Close::Must),
        vector(G, "resp: cut short mid-body (chunked)", get(""))
            .answer(
                Answer::bytes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                    .then_close(),
            )
            .want(Want::Cut)
            .close(Close::Must),
    ]
}

fn connection_vectors() -> Vec<Vector> {
    use Group::Connection as G;
    let req = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: tether\r\n\r\n");
    let upgrade_101 = Answer::bytes(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .then_tunnel();
    vec![
        // Pipelining.
        vector(G, "pipeline: two GETs", [req("/v1"), req("/v2")].concat())
            .want(Want::Statuses(&[200, 200]))
            .requests(2)
            .reach(Reach::Requests(2))
            .targets(&["/v1", "/v2"])
            .close(Close::Never),
        vector(
            G,
            "pipeline: three GETs",
            [req("/v1"), req("/v2"), req("/v3")].concat(),
        )
        .want(Want::Statuses(&[200, 200, 200]))
        .requests(3)
        .reach(Reach::Requests(3))
        .targets(&["/v1", "/v2", "/v3"])
        .close(Close::Never),
        vector(
            G,
            "pipeline: two GETs, the first head cut across writes",
            [req("/v1"), req("/v2")].concat(),
        )
        .cut_at(20)
        .want(Want::Statuses(&[200, 200]))
        .requests(2)
        .reach(Reach::Requests(2))
        .targets(&["/v1", "/v2"])
        .close(Close::Never),
        vector(
            G,
            "pipeline: GET, then garbage",
            [req("/v1"), "\x01\x02garbage\r\n\r\n".to_owned()].concat(),
        )
        .want(Want::Statuses(&[200, 400]))
        .requests(2)
        .targets(&["/v1"])
        .close(Close::Must),
        vector(
            G,
            "pipeline: POST with a body, then GET",
            [
                "POST /v1 HTTP/1.1\r\nHost: tether\r\nContent-Length: 5\r\n\r\nhello".to_owned(),
                req("/v2"),
            ]
            .concat(),
        )
        .want(Want::Statuses(&[200, 200]))
        .requests(2)
        .reach(Reach::Requests(2))
        .targets(&["/v1", "/v2"])
        .close(Close::Never),
        // Expect.
        vector(
            G,
            "expect: 100-continue on a GET",
            get("Expect: 100-continue\r\n"),
        )
        .check(Check::No("expect")),
        vector(
            G,
            "expect: 100-continue on a POST",
            post("Expect: 100-continue\r\nContent-Length: 5\r\n", "hello"),
        )
        .check(Check::Body(b"hello")),
        vector(G, "expect: foo", get("Expect: foo\r\n")).refused(&[417]),
        // HTTP/1.0 and other versions.
        vector(
            G,
            "http/1.0: GET",
            "GET /v HTTP/1.0\r\nHost: tether\r\n\r\n",
        )
        .close(Close::Must),
        vector(
            G,
            "http/1.0: keep-alive",
            "GET /v HTTP/1.0\r\nHost: tether\r\nConnection: keep-alive\r\n\r\n",
        ),
        vector(G, "http/1.0: no Host", "GET /v HTTP/1.0\r\n\r\n").close(Close::Must),
        vector(
            G,
            "http/1.0: chunked answer is de-chunked",
            "GET /v HTTP/1.0\r\nHost: tether\r\n\r\n",
        )
        .answer(Answer::bytes(CHUNKED_HELLO))
        .resp(RespCheck::No("transfer-encoding"))
        .resp(RespCheck::Body(b"hello")),
        vector(G, "version: HTTP/0.9 request line", "GET /v\r\n\r\n").refused(&[400, 505]),
        vector(
            G,
            "version: HTTP/1.2",
            "GET /v HTTP/1.2\r\nHost: tether\r\n\r\n",
        )
        .refused(&[400, 505]),
        vector(
            G,
            "version: HTTP/2.0",
            "GET /v HTTP/2.0\r\nHost: tether\r\n\r\n",
        )
        .refused(&[400, 505]),
        // Upgrades.
        vector(G, "upgrade: 101 to a GET without Upgrade", get(""))
            .answer(upgrade_101.clone())
            .status(&[502])
            .close(Close::Must),
        vector(
            G,
            "upgrade: 101 to a POST with a body",
            [
                ws_request("POST", "HTTP/1.1", "Content-Length: 5\r\n"),
                b"hello".to_vec(),
            ]
            .concat(),
        )
        .answer(upgrade_101.clone())
        .status(&[502])
        .close(Close::Must),
        vector(
            G,
            "upgrade: 101 to an HTTP/1.0 client",
            ws_request("GET", "HTTP/1.0", ""),
        )
        .answer(upgrade_101)
        .status(&[502])
        .close(Close::Must),
        vector(
            G,
            "upgrade: refused with 400",
            ws_request("GET", "HTTP/1.1", ""),
        )
        .answer(Answer::bytes(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 10\r\n\r\nno upgrade",
        ))
        .status(&[400])
        .close(Close::Never)
        .resp(RespCheck::Body(b"no upgrade")),
        vector(
            G,
            "upgrade: refused with 200",
            ws_request("GET", "HTTP/1.1", ""),
        )
        .answer(Answer::ok("plain answer"))
        .close(Close::Never)
        .resp(RespCheck::Body(b"plain answer")),
        vector(G, "upgrade: WebSocket", ws_request("GET", "HTTP/1.1", ""))
            .answer(ws_accept().then_tunnel())
            .want(Want::Tunnel(b"\x81\x05bytes both ways"))
            .check(Check::Token("upgrade", "websocket"))
            .check(Check::Token("connection", "upgrade")),
    ]
}

fn all_vectors() -> Vec<Vector> {
    let mut v = request_vectors();
    v.extend(response_vectors());
    v.extend(connection_vectors());
    v
}

// ---------------------------------------------------------------------------------------------
// Proxies under test
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyKind {
    Tether,
    Nginx,
}

enum Proxy {
    Tether(Balancer),
    Nginx(Nginx),
}

impl Proxy {
    async fn start(kind: ProxyKind, backend: &RawBackend) -> Proxy {
        match kind {
            ProxyKind::Tether => Proxy::Tether(
                Balancer::start(&config_with(&[backend.toml("raw")], None, "sources = []")).await,
            ),
            ProxyKind::Nginx => Proxy::Nginx(Nginx::start(backend.addr())),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Proxy::Tether(b) => b.proxy_port(),
            Proxy::Nginx(n) => n.port,
        }
    }

    /// What the proxy logged about the request, in a few words (NGINX's "client sent ..." lines).
    fn reason(&self) -> Option<String> {
        match self {
            Proxy::Tether(_) => None,
            Proxy::Nginx(n) => n.reason(),
        }
    }
}

/// NGINX as a reverse proxy in front of one backend, started as a child on a free port with its
/// config, logs and temp files in a temp dir. The config is the usual keep-alive one
/// (`proxy_http_version 1.1`, `Connection ""`, an upstream keepalive pool), with the client's
/// Host (`$host`: the absolute-form target's, if any), `X-Forwarded-For` and
/// `X-Forwarded-Proto` as tether sends them, and under `/ws` the usual WebSocket pass-through
/// (`Upgrade $http_upgrade`, `Connection` upgrade when asked).
struct Nginx {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

/// How long NGINX may take to listen, and to exit on SIGTERM.
const NGINX_TIMEOUT: Duration = Duration::from_secs(10);

impl Nginx {
    fn start(backend: SocketAddr) -> Nginx {
        let mut dir = tempfile::Builder::new()
            .prefix("tether-nginx-")
            .tempdir()
            .expect("creating a temp dir for nginx");
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = Self::config(dir.path(), port, backend);
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("writing nginx.conf");
            let log = dir.path().join("error.log");
            let _ = std::fs::remove_file(&log);
            let child = Command::new("nginx")
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(&log)
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(dir.path().join("stderr")).expect("nginx stderr"),
                ))
                .spawn()
                .unwrap_or_else(|e| panic!("spawning nginx (is it installed?): {e}"));
            let mut nginx = Nginx {
                child: Some(child),
                port,
                dir,
            };
            let mut exited = None;
            let up = eventually_blocking(NGINX_TIMEOUT, || {
                exited = nginx
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                exited.is_some() || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up && exited.is_none() {
                return nginx;
            }
            last = format!(
                "nginx did not listen on {port} (exit: {exited:?})\n{}\n{}",
                tail(&std::fs::read_to_string(&log).unwrap_or_default(), 20),
                std::fs::read_to_string(nginx.dir.path().join("stderr")).unwrap_or_default()
            );
            nginx.stop();
            let in_use = last.contains("Address already in use");
            dir = std::mem::replace(&mut nginx.dir, tempfile::tempdir().expect("temp dir"));
            if !in_use {
                break;
            }
        }
        panic!("{last}");
    }

    fn config(dir: &Path, port: u16, backend: SocketAddr) -> String {
        let d = dir.display();
        let common = "proxy_pass http://raw;\n            proxy_http_version 1.1;\n            \
                      proxy_set_header Host $host;\n            \
                      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n            \
                      proxy_set_header X-Forwarded-Proto $scheme;";
        format!(
            "user root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 128; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {d}/client_body;\n    \
             proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
             uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    \
             upstream raw {{ server {backend}; keepalive 8; }}\n    \
             map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n    \
             server {{\n        listen 127.0.0.1:{port};\n        \
             location / {{\n            {common}\n            proxy_set_header Connection \"\";\n        }}\n        \
             location /ws {{\n            {common}\n            \
             proxy_set_header Upgrade $http_upgrade;\n            \
             proxy_set_header Connection $connection_upgrade;\n        }}\n    }}\n}}\n"
        )
    }

    /// The last "client sent ..." / "upstream sent ..." line of the error log, shortened.
    fn reason(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.dir.path().join("error.log")).ok()?;
        let line = log.lines().rev().find(|l| {
            [
                "client sent",
                "upstream sent",
                "upstream prematurely",
                "client prematurely",
            ]
            .iter()
            .any(|k| l.contains(k))
        })?;
        let start = line
            .find("*")
            .and_then(|i| line[i..].find(' ').map(|j| i + j + 1))?;
        let end = line[start..]
            .find(", client:")
            .map_or(line.len(), |i| start + i);
        Some(line[start..end].to_owned())
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits in pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        // SIGTERM: the master stops its worker and exits (SIGKILL would orphan the worker).
        if !eventually_blocking(NGINX_TIMEOUT, || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Running and judging a vector
// ---------------------------------------------------------------------------------------------

/// One vector's result.
struct Verdict {
    name: String,
    target: String,
    failures: Vec<String>,
    client: String,
    backend: String,
    reason: Option<String>,
}

/// The backend's script for a vector: the probe gets its own answer, the other requests the
/// vector's answers in order, then 200 with the target as body.
fn script(answers: Vec<Answer>) -> impl Fn(&RawRequest) -> Answer + Send + Sync + 'static {
    let next = Arc::new(AtomicUsize::new(0));
    move |r: &RawRequest| {
        if r.target == PROBE_TARGET {
            return Answer::ok(PROBE_BODY);
        }
        let i = next.fetch_add(1, Ordering::SeqCst);
        answers
            .get(i)
            .cloned()
            .unwrap_or_else(|| Answer::ok(r.target.as_bytes()))
    }
}

/// How the client connection ended up after the vector's responses.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Closed (EOF or reset).
    Closed,
    /// Still open, and it answered the probe.
    KeptAlive,
    /// Neither closed nor answered in time.
    Hung,
    /// Upgraded; the tunnel was tried.
    Upgraded,
}

fn describe_responses(s: &Split) -> String {
    let mut parts: Vec<String> = Vec::new();
    for r in &s.responses {
        let mut p = r.status.to_string();
        if !r.is_interim() && !r.body.is_empty() {
            // Short bodies (the backend's) in full; error pages by their size.
            if r.body.len() <= 32 {
                p.push_str(&format!(" {:?}", show(&r.body)));
            } else {
                p.push_str(&format!(" [{} B]", r.body.len()));
            }
        }
        parts.push(p);
    }
    let mut out = if parts.is_empty() {
        "no response".to_owned()
    } else {
        parts.join(" + ")
    };
    match &s.stop {
        Stop::Clean | Stop::Upgraded => {}
        Stop::Partial => out.push_str(&format!(", then incomplete {:?}", show(&s.rest))),
        Stop::CutShort => out.push_str(&format!(", then cut short {:?}", show(&s.rest))),
        Stop::Invalid(why) if s.rest.starts_with(b"HTTP/1.") => {
            let first = s.rest.split(|b| *b == b'\n').next().unwrap_or_default();
            let first = String::from_utf8_lossy(first.strip_suffix(b"\r").unwrap_or(first));
            if s.responses.is_empty() {
                out = format!("{first:?} not strict ({why})");
            } else {
                out.push_str(&format!(" + {first:?} not strict ({why})"));
            }
        }
        Stop::Invalid(why) => out.push_str(&format!(", then not a response ({why})")),
    }
    out
}

async fn run(v: &Vector, kind: ProxyKind) -> Verdict {
    let backend = RawBackend::start(script(v.answers.clone())).await;
    let proxy = Proxy::start(kind, &backend).await;
    let mut c = RawClient::connect(proxy.port()).await;
    let mut fails: Vec<String> = Vec::new();
    // A write error means the proxy answered and closed early: its answer is still readable.
    let pieces: Vec<&[u8]> = v.client.iter().map(Vec::as_slice).collect();
    let _ = c.send_pieces(&pieces).await;

    let wanted = match v.want {
        Want::Statuses(s) => s.len(),
        _ => 1,
    };
    let first = c
        .read_responses(wanted, &[], Instant::now() + DEADLINE)
        .await;
    let first_finals = first.finals().len();
    let timed_out = c.timed_out && first_finals < wanted && !c.eof;

    // Then: the tunnel, the close, or the probe.
    let deadline = Instant::now() + DEADLINE;
    let mut probed = false;
    let end = if first.stop == Stop::Upgraded {
        if let Want::Tunnel(bytes) = v.want {
            let start = c.got.len();
            let _ = c.send(bytes).await;
            let echoed = c
                .read_until(deadline, |got| got.len() >= start + bytes.len())
                .await;
            let back = &c.got[start.min(c.got.len())..];
            if !echoed || back != bytes {
                fails.push(format!(
                    "tunnel: sent {:?}, got back {:?}",
                    show(bytes),
                    show(back)
                ));
            }
        }
        End::Upgraded
    } else if timed_out {
        End::Hung
    } else if c.eof {
        End::Closed
    } else if matches!(v.want, Want::Cut)
        || matches!(first.stop, Stop::Invalid(_) | Stop::Partial)
        || first.finals().last().is_some_and(|r| r.announces_close())
    {
        if c.read_to_eof(deadline).await {
            End::Closed
        } else {
            End::Hung
        }
    } else {
        probed = true;
        if c.send(PROBE).await.is_err() {
            c.read_to_eof(deadline).await;
            End::Closed
        } else {
            let s = c.read_responses(first_finals + 1, &[], deadline).await;
            let finals = s.finals();
            match finals.get(first_finals) {
                Some(p)
                    if p.status == 200
                        && p.body == PROBE_BODY
                        && finals.len() == first_finals + 1 =>
                {
                    End::KeptAlive
                }
                Some(other) => {
                    fails.push(format!(
                        "desync: after the vector's responses the client read {} {:?} instead \
                         of the probe's answer",
                        other.status,
                        show(&other.body)
                    ));
                    End::KeptAlive
                }
                None if c.eof => End::Closed,
                None => End::Hung,
            }
        }
    };

    // Everything the client read, judged as a whole.
    let all = c.split(&[]);
    let mut finals: Vec<&RawResponse> = all.finals();
    if end == End::KeptAlive {
        finals.pop();
    }
    let statuses: Vec<u16> = finals.iter().map(|r| r.status).collect();
    match &v.want {
        Want::Status(ok) => {
            if !(statuses.len() == 1 && ok.contains(&statuses[0])) {
                fails.push(format!(
                    "client: wanted one {ok:?} response, got {}",
                    describe_responses(&all)
                ));
            }
        }
        Want::Statuses(s) => {
            if statuses != *s {
                fails.push(format!(
                    "client: wanted {s:?}, got {}",
                    describe_responses(&all)
                ));
            }
        }
        Want::Cut => {
            let cut = statuses.is_empty() && matches!(all.stop, Stop::CutShort | Stop::Invalid(_));
            if !(end == End::Closed && (cut || statuses == [502])) {
                fails.push(format!(
                    "client: wanted a cut response or 502 and a close, got {} ({end:?})",
                    describe_responses(&all)
                ));
            }
        }
        Want::Tunnel(_) => {
            if statuses != [101] {
                fails.push(format!(
                    "client: wanted 101, got {}",
                    describe_responses(&all)
                ));
            }
        }
    }
    // No desync on the client side.
    if end != End::Upgraded && !matches!(v.want, Want::Cut) {
        match &all.stop {
            Stop::Clean => {}
            Stop::Invalid(why) if all.rest.starts_with(b"HTTP/1.") => fails.push(format!(
                "client: a response that is not strict HTTP/1.1 ({why}): {:?}",
                show(&all.rest)
            )),
            Stop::Invalid(why) => fails.push(format!(
                "desync: the client read bytes that are not a response ({why}): {:?}",
                show(&all.rest)
            )),
            Stop::Partial | Stop::CutShort => fails.push(format!(
                "client: an incomplete response {:?}",
                show(&all.rest)
            )),
            Stop::Upgraded => {}
        }
    }
    if statuses.len() > v.requests {
        fails.push(format!(
            "desync: {} final responses to {} requests",
            statuses.len(),
            v.requests
        ));
    }
    if finals
        .iter()
        .any(|r| r.body.windows(8).any(|w| w == b"smuggled"))
    {
        fails.push("desync: the client got the answer to the smuggled request".to_owned());
    }
    match (v.close, &end) {
        (_, End::Hung) if !timed_out && probed => fails.push(format!(
            "connection neither closed nor answered the probe within {DEADLINE:?}"
        )),
        (_, End::Hung) if !timed_out => fails.push(format!(
            "connection still open {DEADLINE:?} after an invalid, cut or closing response"
        )),
        (_, End::Hung) => fails.push(format!(
            "client: no complete answer within {DEADLINE:?}: {}",
            describe_responses(&all)
        )),
        (Close::Must, End::KeptAlive) => {
            fails.push("connection kept alive (the probe was answered)".to_owned())
        }
        (Close::Never, End::Closed) => fails.push("connection closed".to_owned()),
        _ => {}
    }
    for check in &v.resp {
        let bad: Option<String> = match check {
            RespCheck::No(h) => finals
                .iter()
                .find(|r| r.has(h))
                .map(|r| format!("has {h}: {:?}", r.values(h))),
            RespCheck::NoToken(h, t) => finals
                .iter()
                .find(|r| r.has_token(h, t))
                .map(|_| format!("{h} has {t}")),
            RespCheck::Body(b) => finals
                .iter()
                .find(|r| r.body != *b)
                .map(|r| format!("body {:?}, not {:?}", show(&r.body), show(b))),
            RespCheck::Interim(s) => {
                let got = all.interim_before(0);
                (got != *s).then(|| format!("interim {got:?}, not {s:?}"))
            }
        };
        if let Some(bad) = bad {
            fails.push(format!("client response: {bad}"));
        }
    }
    let mut client = describe_responses(&all);
    if end == End::KeptAlive {
        client = client
            .rsplit_once(" + ")
            .map_or(client.clone(), |(a, _)| a.to_owned());
    }
    client.push_str(match end {
        End::Closed => ", closed",
        End::KeptAlive => ", kept alive",
        End::Hung if probed || timed_out => ", hung",
        End::Hung => ", left open",
        End::Upgraded => ", upgraded",
    });
    // A close after a response that did not say so (a client may have requests in flight).
    if end == End::Closed && finals.last().is_some_and(|r| !r.announces_close()) {
        client.push_str(" (unannounced)");
    }
    if c.reset {
        client.push_str(" (reset)");
    }

    let backend_summary = judge_backend(v, &backend, &mut fails);
    Verdict {
        name: v.name.clone(),
        target: v.target(),
        failures: fails,
        client,
        backend: backend_summary,
        reason: proxy.reason(),
    }
}

/// Judge what the backend received; returns a short summary.
fn judge_backend(v: &Vector, backend: &RawBackend, fails: &mut Vec<String>) -> String {
    let conns = backend.connections();
    let mut reqs: Vec<&RawRequest> = conns
        .iter()
        .flat_map(|c| &c.requests)
        .filter(|r| r.target != PROBE_TARGET)
        .collect();
    reqs.sort_by_key(|r| r.seq);
    let partial: Vec<&ConnLog> = conns
        .iter()
        .filter(|c| c.error.is_none() && !c.pending().is_empty())
        .collect();
    let mut parts: Vec<String> = reqs
        .iter()
        .map(|r| {
            let framing = match &r.framing {
                Framing::Length(n) => format!(" cl={n}"),
                Framing::Chunked => " chunked".to_owned(),
                _ => String::new(),
            };
            let body = if r.body.is_empty() {
                String::new()
            } else {
                format!(" {:?}", show(&r.body))
            };
            let malformed = if r.malformed.is_some() {
                " (malformed)"
            } else {
                ""
            };
            format!("{} {}{framing}{body}{malformed}", r.method, r.target)
        })
        .collect();
    for c in &conns {
        if let Some(e) = &c.error {
            fails.push(format!(
                "backend: received bytes that are not a well-formed request ({e}): {:?}",
                show(c.pending())
            ));
            parts.push(format!("malformed ({e})"));
        }
    }
    for c in &partial {
        parts.push(format!("partial {:?}", show(c.pending())));
    }
    let summary = if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join(" + ")
    };
    if reqs.iter().any(|r| r.target.contains("smuggled")) {
        fails.push("desync: the backend got the smuggled request /smuggled".to_owned());
    }
    if reqs.len() > v.requests {
        fails.push(format!(
            "desync: the backend got {} requests, the client sent {}",
            reqs.len(),
            v.requests
        ));
    }
    match v.reach {
        Reach::Nothing if !reqs.is_empty() || !partial.is_empty() => {
            fails.push(format!("backend: wanted nothing, got {summary}"));
        }
        Reach::Requests(n) if reqs.len() != n || !partial.is_empty() => {
            fails.push(format!("backend: wanted {n} request(s), got {summary}"));
        }
        Reach::NoSecond if reqs.len() + partial.len() > 1 => {
            fails.push(format!(
                "backend: wanted at most one request, got {summary}"
            ));
        }
        _ => {}
    }
    if !v.targets.is_empty() {
        let targets: Vec<&str> = reqs.iter().map(|r| r.target.as_str()).collect();
        if targets != v.targets {
            fails.push(format!(
                "backend: targets {targets:?}, wanted {:?}",
                v.targets
            ));
        }
    }
    for r in &reqs {
        let mut bad = Vec::new();
        if let Some(why) = &r.malformed {
            bad.push(format!("not a well-formed request ({why})"));
        }
        if r.values("host").len() != 1 {
            bad.push(format!("Host lines {:?}", r.values("host")));
        }
        if r.version != "HTTP/1.1" {
            bad.push(format!("version {}", r.version));
        }
        bad.extend(v.checks.iter().filter_map(|c| c.holds(r).err()));
        if !bad.is_empty() {
            fails.push(format!(
                "backend request {} {}: {}\n      {:?}",
                r.method,
                r.target,
                bad.join("; "),
                show(r.head_text().as_bytes())
            ));
        }
    }
    summary
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A markdown table of verdicts.
fn table(proxy: &str, verdicts: &[Verdict]) -> String {
    let mut out = format!(
        "| vector | target verdict | {proxy} | client got | backend got |\n|---|---|---|---|---|\n"
    );
    for v in verdicts {
        // The first failure, shortened; the group tests' panic message has them all.
        let result = match v.failures.as_slice() {
            [] => "pass".to_owned(),
            [first, rest @ ..] => {
                let first = first.lines().next().unwrap_or_default();
                let mut short: String = first.chars().take(110).collect();
                if short.len() < first.len() {
                    short.push('…');
                }
                if !rest.is_empty() {
                    short.push_str(&format!(" (+{} more)", rest.len()));
                }
                format!("FAIL: {short}")
            }
        };
        let client = match &v.reason {
            Some(r) => format!("{} [{r}]", v.client),
            None => v.client.clone(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            cell(&v.name),
            cell(&v.target),
            cell(&result),
            cell(&client),
            cell(&v.backend)
        ));
    }
    out
}

/// Run every vector of `group` through tether, print the table, and panic listing every
/// failing vector.
async fn judge(group: Group) {
    let vectors: Vec<Vector> = all_vectors()
        .into_iter()
        .filter(|v| v.group == group)
        .collect();
    let mut verdicts = Vec::new();
    for v in &vectors {
        verdicts.push(run(v, ProxyKind::Tether).await);
    }
    println!("{}", table("tether", &verdicts));
    let failed: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.failures.is_empty())
        .map(|v| {
            format!(
                "- {}\n    target: {}\n    client: {}\n    backend: {}\n    {}",
                v.name,
                v.target,
                v.client,
                v.backend,
                v.failures.join("\n    ")
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {group:?} vectors failed:\n{}",
        failed.len(),
        verdicts.len(),
        failed.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_side_vectors() {
    judge(Group::Request).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_side_vectors() {
    judge(Group::Response).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_level_vectors() {
    judge(Group::Connection).await;
}

/// The NGINX verdicts recorded in docs/conformance.md (its first table), by vector: whether
/// NGINX met the target.
fn recorded_nginx_verdicts() -> std::collections::BTreeMap<String, bool> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/conformance.md"))
            .expect("docs/conformance.md");
    doc.lines()
        .skip_while(|l| !l.starts_with("| vector | target verdict | tether | NGINX"))
        .skip(2)
        .take_while(|l| l.starts_with("| "))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            Some((cells.first()?.to_string(), *cells.get(3)? == "pass"))
        })
        .collect()
}

/// The same table through a local NGINX 1.22 (installed by scripts/test), compared with what
/// docs/conformance.md says NGINX does, and with tether: on no vector is tether more lenient
/// than NGINX (a vector NGINX meets, tether meets too). A changed NGINX verdict fails with the
/// new table to paste into the doc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_is_never_more_lenient_than_nginx() {
    let version = Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_else(|e| panic!("nginx -v: {e} (scripts/test installs nginx)"));
    let recorded = recorded_nginx_verdicts();
    let mut nginx = Vec::new();
    let mut problems = Vec::new();
    for v in &all_vectors() {
        let theirs = run(v, ProxyKind::Nginx).await;
        let met = theirs.failures.is_empty();
        match recorded.get(&v.name) {
            Some(&was) if was == met => {}
            was => problems.push(format!(
                "- {}: docs/conformance.md says NGINX {}, {version} now {}",
                v.name,
                match was {
                    Some(true) => "meets the target",
                    Some(false) => "misses the target",
                    None => "(not listed)",
                },
                if met { "meets it" } else { "misses it" },
            )),
        }
        if met {
            let ours = run(v, ProxyKind::Tether).await;
            if !ours.failures.is_empty() {
                problems.push(format!(
                    "- {}: NGINX meets the target, tether does not: {}",
                    v.name,
                    ours.failures.join("; ")
                ));
            }
        }
        nginx.push(theirs);
    }
    assert!(
        problems.is_empty(),
        "{}\n\n{version}'s table:\n{}",
        problems.join("\n"),
        table("NGINX", &nginx)
    );
}

// ---------------------------------------------------------------------------------------------
// The raw tools' own parsers (tests/support/raw.rs), checked once here
// ---------------------------------------------------------------------------------------------

#[test]
fn raw_backend_parses_requests_strictly() {
    let ok = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
               5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET";
    let Parsed::Done(r, n) = parse_request(ok) else {
        panic!("not parsed");
    };
    assert_eq!((r.body.as_slice(), n), (&b"hello"[..], ok.len() - 3));
    assert_eq!(r.trailers, vec![("X-T".to_owned(), b"1".to_vec())]);
    for bad in [
        &b"GET / HTTP/1.1\nHost: x\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nX : y\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x01\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX",
    ] {
        assert!(
            matches!(parse_request(bad), Parsed::Invalid(_)),
            "{}",
            show(bad)
        );
    }
    assert!(matches!(
        parse_request(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel"),
        Parsed::Partial
    ));
}

#[test]
fn raw_backend_reads_malformed_requests_leniently() {
    let bytes =
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\nX: a\r\n b\r\n\r\nhelloGET";
    assert!(matches!(parse_request(bytes), Parsed::Invalid(_)));
    let Parsed::Done(r, n) = parse_request_lenient(bytes) else {
        panic!("not read leniently");
    };
    assert_eq!((r.body.as_slice(), n), (&b"hello"[..], bytes.len() - 3));
    assert_eq!(r.header("x").as_deref(), Some("a b"));
    let lf = b"GET /b HTTP/1.1\nHost: x\n\n";
    let Parsed::Done(r, n) = parse_request_lenient(lf) else {
        panic!("bare LF head not read");
    };
    assert_eq!((r.target.as_str(), n), ("/b", lf.len()));
}

#[test]
fn raw_client_splits_responses_by_their_framing() {
    let bytes = b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
                  HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n";
    let s = split_responses(bytes, false, &[false, false, true]);
    assert_eq!(s.statuses(), vec![200, 200, 200]);
    assert_eq!(s.interim_before(0), vec![103]);
    assert_eq!(s.stop, Stop::Clean);
    let s = split_responses(b"HTTP/1.1 200 OK\r\n\r\nuntil close", true, &[]);
    assert_eq!(s.finals()[0].body, b"until close");
    assert!(s.finals()[0].announces_close());
    let s = split_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", true, &[]);
    assert_eq!(s.stop, Stop::CutShort);
    let s = split_responses(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nxyz",
        false,
        &[],
    );
    assert!(matches!(s.stop, Stop::Invalid(_)), "{s:?}");
    let s = split_responses(b"HTTP/1.1 101 Switching\r\n\r\nraw", false, &[]);
    assert_eq!((s.stop, s.rest.as_slice()), (Stop::Upgraded, &b"raw"[..]));
}
