//! Raw-socket HTTP/1 tools for tests that judge bytes, not a client library's reading of them:
//! - [`RawBackend`]: a scripted backend on `127.0.0.1:0` that records every byte each connection
//!   received, splits it into requests with a strict parser ([`RawRequest`]: a proxy must forward
//!   well-formed messages, so anything else is recorded as an error, not guessed at), answers each
//!   request with the bytes its script says ([`Answer`]), and can close or turn the connection
//!   into an echo tunnel (after a `101`);
//! - [`RawClient`]: connects to a proxy, writes bytes (in one write or in pieces), and reads until
//!   enough responses are complete, the connection closes, or a deadline passes;
//! - [`split_responses`]: a strict response splitter (status line, header fields, body by
//!   Content-Length, chunked or connection close), so a test can say "the client got exactly these
//!   responses and then EOF" and see a desync as bytes that are not a response.
//!
//! It owns no proxy and no config: tests point tether (or NGINX) at [`RawBackend::addr`].
//! Every wait is bounded by a deadline the caller gives; nothing here sleeps to wait for a
//! condition (the short pause between [`Answer`] pieces only makes them separate TCP segments).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Pause between two pieces of an [`Answer`] or of [`RawClient::send_pieces`]: long enough for
/// the peer to read them apart (separate segments), never needed for a test's verdict.
pub const PIECE_PAUSE: Duration = Duration::from_millis(5);

/// A header field as received: the name as spelled, the value without surrounding whitespace.
pub type Field = (String, Vec<u8>);

// ---------------------------------------------------------------------------------------------
// Strict HTTP/1 syntax
// ---------------------------------------------------------------------------------------------

/// How a parse of the bytes at hand ended.
#[derive(Debug)]
pub enum Parsed<T> {
    /// A whole message, and how many bytes it took.
    Done(T, usize),
    /// The bytes so far are a valid beginning; more are needed.
    Partial,
    /// Not HTTP/1 as RFC 9112 writes it.
    Invalid(String),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `bytes` as an escaped, bounded string for messages (`\r`, `\n`, `\x00`...).
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 160;
    let mut out: String = bytes
        .iter()
        .take(MAX)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > MAX {
        out.push_str(&format!("...(+{} bytes)", bytes.len() - MAX));
    }
    out
}

/// The next line of `buf` from `at`, which must end in CRLF and hold no other CR or LF:
/// `(line without CRLF, index after it)`. `Ok(None)`: no whole line yet.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at..];
    let Some(lf) = rest.iter().position(|b| *b == b'\n') else {
        // A CR followed by anything but LF is a bare CR, whatever comes later.
        if let Some(cr) = rest.iter().position(|b| *b == b'\r')
            && cr + 1 < rest.len()
        {
            return Err(format!("bare CR in line {:?}", show(rest)));
        }
        return Ok(None);
    };
    if lf == 0 || rest[lf - 1] != b'\r' {
        return Err(format!("bare LF after {:?}", show(&rest[..lf])));
    }
    let content = &rest[..lf - 1];
    if content.contains(&b'\r') {
        return Err(format!("bare CR in line {:?}", show(content)));
    }
    Ok(Some((content, at + lf + 1)))
}

/// `b` without leading and trailing spaces and tabs (OWS; not other whitespace).
fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// One `name: value` line (RFC 9110 5.1, 5.5): a token name right before the colon, a value of
/// visible characters, spaces, tabs and obs-text.
fn field(l: &[u8]) -> Result<Field, String> {
    if matches!(l.first(), Some(b' ' | b'\t')) {
        return Err(format!(
            "obs-fold (line starts with whitespace): {:?}",
            show(l)
        ));
    }
    let Some(colon) = l.iter().position(|b| *b == b':') else {
        return Err(format!("field line without a colon: {:?}", show(l)));
    };
    let name = &l[..colon];
    if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
        return Err(format!("invalid field name {:?}", show(name)));
    }
    let value = trim_ows(&l[colon + 1..]);
    if let Some(bad) = value
        .iter()
        .find(|b| !(**b == b'\t' || (0x20..0x7f).contains(*b) || **b >= 0x80))
    {
        return Err(format!(
            "control byte {bad:#04x} in the value of {}",
            String::from_utf8_lossy(name)
        ));
    }
    Ok((String::from_utf8_lossy(name).into_owned(), value.to_vec()))
}

/// A message head: start line, fields, and the index after its blank line.
struct Head<'a> {
    start: &'a [u8],
    fields: Vec<Field>,
    len: usize,
}

fn head(buf: &[u8]) -> Result<Option<Head<'_>>, String> {
    let Some((start, mut at)) = line(buf, 0)? else {
        return Ok(None);
    };
    let mut fields = Vec::new();
    loop {
        let Some((l, next)) = line(buf, at)? else {
            return Ok(None);
        };
        at = next;
        if l.is_empty() {
            return Ok(Some(Head {
                start,
                fields,
                len: at,
            }));
        }
        fields.push(field(l)?);
    }
}

/// The values of every field named `name` (case-insensitive), in order.
fn values<'f>(fields: &'f [Field], name: &str) -> Vec<&'f [u8]> {
    fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
        .collect()
}

/// How a message body is delimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (a request without length, a 1xx/204/304 or HEAD answer).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (a response without length).
    Close,
}

/// Framing from the fields, strictly: at most one Transfer-Encoding line, whose value is exactly
/// `chunked`; at most one Content-Length line, of digits; never both.
fn framing(fields: &[Field]) -> Result<Option<Framing>, String> {
    let te = values(fields, "transfer-encoding");
    let cl = values(fields, "content-length");
    if !te.is_empty() && !cl.is_empty() {
        return Err("both Transfer-Encoding and Content-Length".to_owned());
    }
    match te.as_slice() {
        [] => {}
        [v] if v.eq_ignore_ascii_case(b"chunked") => return Ok(Some(Framing::Chunked)),
        _ => {
            let all: Vec<String> = te.iter().map(|v| show(v)).collect();
            return Err(format!(
                "Transfer-Encoding {all:?} is not exactly one `chunked`"
            ));
        }
    }
    match cl.as_slice() {
        [] => Ok(None),
        [v] if !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit) => {
            let n = std::str::from_utf8(v)
                .expect("digits are UTF-8")
                .parse()
                .expect("at most 19 digits fit in u64");
            Ok(Some(Framing::Length(n)))
        }
        _ => {
            let all: Vec<String> = cl.iter().map(|v| show(v)).collect();
            Err(format!("Content-Length {all:?} is not exactly one number"))
        }
    }
}

/// A decoded chunked body: data, trailer fields, and the index after the message.
type ChunkedBody = (Vec<u8>, Vec<Field>, usize);

/// A chunked body from `at`, strictly (RFC 9112 7.1): hex sizes of at most 16 digits, optional
/// extensions, CRLF after every line and after every chunk's data, valid trailer fields.
fn chunked(buf: &[u8], mut at: usize) -> Result<Option<ChunkedBody>, String> {
    let mut body = Vec::new();
    loop {
        let Some((l, next)) = line(buf, at)? else {
            return Ok(None);
        };
        let digits = l.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let after = &l[digits..];
        let ext_ok = after.is_empty() || trim_ows(after).starts_with(b";");
        if digits == 0 || digits > 16 || !ext_ok {
            return Err(format!("invalid chunk-size line {:?}", show(l)));
        }
        let size = u64::from_str_radix(std::str::from_utf8(&l[..digits]).expect("hex"), 16)
            .expect("at most 16 hex digits fit in u64");
        at = next;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some((l, next)) = line(buf, at)? else {
                    return Ok(None);
                };
                at = next;
                if l.is_empty() {
                    return Ok(Some((body, trailers, at)));
                }
                trailers.push(field(l).map_err(|e| format!("trailer section: {e}"))?);
            }
        }
        let size = usize::try_from(size).map_err(|_| "chunk size beyond usize".to_owned())?;
        let end = at
            .checked_add(size)
            .ok_or_else(|| "chunk size overflows".to_owned())?;
        if buf.len() < end {
            return Ok(None);
        }
        match buf.get(end..end + 2) {
            Some(b"\r\n") => {}
            Some(other) => {
                return Err(format!(
                    "chunk data not followed by CRLF but {:?}",
                    show(other)
                ));
            }
            None if buf.get(end).is_some_and(|b| *b != b'\r') => {
                return Err("chunk data not followed by CR".to_owned());
            }
            None => return Ok(None),
        }
        body.extend_from_slice(&buf[at..end]);
        at = end + 2;
    }
}

/// A body with this framing from `at`: `(data, trailers, index after)`. `eof`: the connection
/// has closed (the end of a [`Framing::Close`] body).
fn body(
    buf: &[u8],
    at: usize,
    framing: &Framing,
    eof: bool,
) -> Result<Option<ChunkedBody>, String> {
    match framing {
        Framing::None => Ok(Some((Vec::new(), Vec::new(), at))),
        Framing::Length(n) => {
            let n = usize::try_from(*n).map_err(|_| "Content-Length beyond usize".to_owned())?;
            match at.checked_add(n) {
                Some(end) if buf.len() >= end => Ok(Some((buf[at..end].to_vec(), Vec::new(), end))),
                _ => Ok(None),
            }
        }
        Framing::Chunked => chunked(buf, at),
        Framing::Close if eof => Ok(Some((buf[at..].to_vec(), Vec::new(), buf.len()))),
        Framing::Close => Ok(None),
    }
}

/// Whether a field list holds `token` in any line of `name` (a comma-separated list,
/// case-insensitive).
fn has_token(fields: &[Field], name: &str, token: &str) -> bool {
    values(fields, name).iter().any(|v| {
        v.split(|b| *b == b',')
            .any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The one value of `name`, if there is exactly one line of it.
fn one(fields: &[Field], name: &str) -> Option<String> {
    match values(fields, name).as_slice() {
        [v] => Some(String::from_utf8_lossy(v).into_owned()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Requests (what a backend receives)
// ---------------------------------------------------------------------------------------------

/// One request as a [`RawBackend`] received it.
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// Index of the connection it came on (accept order).
    pub conn: usize,
    /// Its place among all requests this backend received (0, 1, ...).
    pub seq: usize,
    /// The exact bytes of the message, head and body.
    pub raw: Vec<u8>,
    pub method: String,
    pub target: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    pub fields: Vec<Field>,
    pub framing: Framing,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    pub trailers: Vec<Field>,
    /// Why the strict parser refused it, if it did: then it was read leniently (see
    /// [`parse_request_lenient`]) so that it could still be answered.
    pub malformed: Option<String>,
}

/// Header lookups of a parsed message ([`RawRequest`], [`RawResponse`]).
pub trait HasFields {
    fn field_lines(&self) -> &[Field];

    /// Every value of `name`, in order.
    fn values(&self, name: &str) -> Vec<String> {
        values(self.field_lines(), name)
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The value of `name` if it came in exactly one line.
    fn header(&self, name: &str) -> Option<String> {
        one(self.field_lines(), name)
    }

    fn has(&self, name: &str) -> bool {
        !values(self.field_lines(), name).is_empty()
    }

    /// `token` appears in the comma-separated list of some `name` line.
    fn has_token(&self, name: &str, token: &str) -> bool {
        has_token(self.field_lines(), name, token)
    }
}

impl HasFields for RawRequest {
    fn field_lines(&self) -> &[Field] {
        &self.fields
    }
}

impl HasFields for RawResponse {
    fn field_lines(&self) -> &[Field] {
        &self.fields
    }
}

impl RawRequest {
    /// The head as text (for messages).
    pub fn head_text(&self) -> String {
        let end = self
            .raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(self.raw.len(), |i| i + 4);
        String::from_utf8_lossy(&self.raw[..end]).into_owned()
    }
}

/// A request at the start of `buf`, parsed strictly (see [`framing`], [`chunked`]).
pub fn parse_request(buf: &[u8]) -> Parsed<RawRequest> {
    let h = match head(buf) {
        Ok(Some(h)) => h,
        Ok(None) => return Parsed::Partial,
        Err(e) => return Parsed::Invalid(e),
    };
    let parts: Vec<&[u8]> = h.start.split(|b| *b == b' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Parsed::Invalid(format!("request line {:?}", show(h.start)));
    };
    if method.is_empty() || !method.iter().all(|b| is_tchar(*b)) {
        return Parsed::Invalid(format!("method {:?}", show(method)));
    }
    if target.is_empty() || !target.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Parsed::Invalid(format!("request target {:?}", show(target)));
    }
    if !matches!(*version, b"HTTP/1.1" | b"HTTP/1.0") {
        return Parsed::Invalid(format!("version {:?}", show(version)));
    }
    let framing = match framing(&h.fields) {
        Ok(f) => f.unwrap_or(Framing::None),
        Err(e) => return Parsed::Invalid(e),
    };
    let (data, trailers, end) = match body(buf, h.len, &framing, false) {
        Ok(Some(b)) => b,
        Ok(None) => return Parsed::Partial,
        Err(e) => return Parsed::Invalid(e),
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Parsed::Done(
        RawRequest {
            conn: 0,
            seq: 0,
            raw: buf[..end].to_vec(),
            method: text(method),
            target: text(target),
            version: text(version),
            fields: h.fields,
            framing,
            body: data,
            trailers,
            malformed: None,
        },
        end,
    )
}

/// A request the strict parser refused, read the way a lenient server would, so that the
/// backend can still answer it (and the test see what the client gets): the head ends at the
/// first blank line (CRLF or bare LF), folded lines join the previous field, the body is chunked
/// if any Transfer-Encoding mentions `chunked` (decoded strictly: a bad chunk stays a stop),
/// else as long as the first number of the first Content-Length. `Invalid`: not even that.
pub fn parse_request_lenient(buf: &[u8]) -> Parsed<RawRequest> {
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let Some((head_end, body_start)) = [crlf, lf].into_iter().flatten().min() else {
        return Parsed::Partial;
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut lines = buf[..head_end]
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let start = lines.next().unwrap_or_default();
    let mut words = start.split(|b| *b == b' ').filter(|w| !w.is_empty());
    let (method, target, version) = (
        text(words.next().unwrap_or_default()),
        text(words.next().unwrap_or_default()),
        text(words.next().unwrap_or_default()),
    );
    let mut fields: Vec<Field> = Vec::new();
    for l in lines {
        if matches!(l.first(), Some(b' ' | b'\t')) {
            if let Some((_, v)) = fields.last_mut() {
                v.push(b' ');
                v.extend_from_slice(trim_ows(l));
            }
            continue;
        }
        if let Some(colon) = l.iter().position(|b| *b == b':') {
            fields.push((
                text(trim_ows(&l[..colon])),
                trim_ows(&l[colon + 1..]).to_vec(),
            ));
        }
    }
    let chunked_te = values(&fields, "transfer-encoding").iter().any(|v| {
        String::from_utf8_lossy(v)
            .to_ascii_lowercase()
            .contains("chunked")
    });
    let length = values(&fields, "content-length").first().and_then(|v| {
        let first = v.split(|b| *b == b',').next().unwrap_or_default();
        std::str::from_utf8(trim_ows(first))
            .ok()?
            .parse::<u64>()
            .ok()
    });
    let framing = match (chunked_te, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::None,
    };
    let (data, trailers, end) = match body(buf, body_start, &framing, false) {
        Ok(Some(b)) => b,
        Ok(None) => return Parsed::Partial,
        Err(e) => return Parsed::Invalid(e),
    };
    Parsed::Done(
        RawRequest {
            conn: 0,
            seq: 0,
            raw: buf[..end].to_vec(),
            method,
            target,
            version,
            fields,
            framing,
            body: data,
            trailers,
            malformed: None,
        },
        end,
    )
}

// ---------------------------------------------------------------------------------------------
// Responses (what a client receives)
// ---------------------------------------------------------------------------------------------

/// One response as a [`RawClient`] received it.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// The exact bytes of the message.
    pub raw: Vec<u8>,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub fields: Vec<Field>,
    pub framing: Framing,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    pub trailers: Vec<Field>,
}

impl RawResponse {
    /// 1xx: an interim response; the final one follows.
    pub fn is_interim(&self) -> bool {
        self.status < 200
    }

    /// The sender said the connection ends after this response: `Connection: close`, HTTP/1.0
    /// without `Connection: keep-alive`, or a body delimited by the close.
    pub fn announces_close(&self) -> bool {
        self.has_token("connection", "close")
            || (self.version == "HTTP/1.0" && !self.has_token("connection", "keep-alive"))
            || self.framing == Framing::Close
    }
}

/// A response at the start of `buf`; `head_request`: it answers a HEAD (no body whatever the
/// fields say); `eof`: the connection has closed (ends a close-delimited body).
pub fn parse_response(buf: &[u8], eof: bool, head_request: bool) -> Parsed<RawResponse> {
    // Bytes that cannot begin a status line are not a response, however many follow.
    let n = buf.len().min(9);
    if buf[..n] != b"HTTP/1.1 "[..n] && buf[..n] != b"HTTP/1.0 "[..n] {
        return Parsed::Invalid(format!("not a status line: {:?}", show(buf)));
    }
    let h = match head(buf) {
        Ok(Some(h)) => h,
        Ok(None) => return Parsed::Partial,
        Err(e) => return Parsed::Invalid(e),
    };
    let start = h.start;
    let ok_start = start.len() >= 13
        && matches!(&start[..9], b"HTTP/1.1 " | b"HTTP/1.0 ")
        && start[9..12].iter().all(u8::is_ascii_digit)
        && start[12] == b' ';
    if !ok_start {
        return Parsed::Invalid(format!("status line {:?}", show(start)));
    }
    let status: u16 = std::str::from_utf8(&start[9..12])
        .expect("digits")
        .parse()
        .expect("three digits");
    if !(100..=599).contains(&status) {
        return Parsed::Invalid(format!("status {status}"));
    }
    let declared = match framing(&h.fields) {
        Ok(f) => f,
        Err(e) => return Parsed::Invalid(e),
    };
    let framing = if status < 200 || status == 204 || status == 304 || head_request {
        Framing::None
    } else {
        declared.unwrap_or(Framing::Close)
    };
    let (data, trailers, end) = match body(buf, h.len, &framing, eof) {
        Ok(Some(b)) => b,
        Ok(None) => return Parsed::Partial,
        Err(e) => return Parsed::Invalid(e),
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Parsed::Done(
        RawResponse {
            raw: buf[..end].to_vec(),
            version: text(&start[..8]),
            status,
            reason: text(&start[13..]),
            fields: h.fields,
            framing,
            body: data,
            trailers,
        },
        end,
    )
}

/// Why [`split_responses`] stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Every byte belongs to a complete response.
    Clean,
    /// The bytes after the last complete response begin a response; more are needed.
    Partial,
    /// As `Partial`, but the connection closed: a response cut short.
    CutShort,
    /// The bytes after the last complete response are not a response.
    Invalid(String),
    /// The last response is a `101`: what follows is the upgraded protocol.
    Upgraded,
}

/// A byte stream from a server, cut into responses.
#[derive(Clone, Debug)]
pub struct Split {
    /// Every complete response, interim ones included, in order.
    pub responses: Vec<RawResponse>,
    /// The bytes after them (see [`Split::stop`]).
    pub rest: Vec<u8>,
    pub stop: Stop,
}

impl Split {
    /// The final (non-1xx, or 101) responses.
    pub fn finals(&self) -> Vec<&RawResponse> {
        self.responses
            .iter()
            .filter(|r| !r.is_interim() || r.status == 101)
            .collect()
    }

    /// The statuses of the final responses.
    pub fn statuses(&self) -> Vec<u16> {
        self.finals().iter().map(|r| r.status).collect()
    }

    /// The interim statuses (1xx but 101) that came before the `n`-th final response.
    pub fn interim_before(&self, n: usize) -> Vec<u16> {
        let mut finals = 0;
        let mut out = Vec::new();
        for r in &self.responses {
            if r.is_interim() && r.status != 101 {
                if finals == n {
                    out.push(r.status);
                }
            } else {
                finals += 1;
                if finals > n {
                    break;
                }
            }
        }
        out
    }
}

/// Cuts `bytes` into responses, strictly. `heads[i]`: the `i`-th final response answers a HEAD
/// (missing entries: not a HEAD); `eof`: the connection has closed. Stops at the first `101`.
pub fn split_responses(bytes: &[u8], eof: bool, heads: &[bool]) -> Split {
    let mut at = 0;
    let mut finals = 0;
    let mut responses = Vec::new();
    let stop = loop {
        if at == bytes.len() {
            break Stop::Clean;
        }
        let head_request = heads.get(finals).copied().unwrap_or(false);
        match parse_response(&bytes[at..], eof, head_request) {
            Parsed::Done(r, n) => {
                at += n;
                let status = r.status;
                responses.push(r);
                if status == 101 {
                    break Stop::Upgraded;
                }
                if status >= 200 {
                    finals += 1;
                }
            }
            Parsed::Partial if eof => break Stop::CutShort,
            Parsed::Partial => break Stop::Partial,
            Parsed::Invalid(why) => break Stop::Invalid(why),
        }
    };
    Split {
        responses,
        rest: bytes[at..].to_vec(),
        stop,
    }
}

// ---------------------------------------------------------------------------------------------
// RawBackend
// ---------------------------------------------------------------------------------------------

/// What a [`RawBackend`] sends back for one request.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    /// Written one by one, [`PIECE_PAUSE`] apart. None: no answer (the backend keeps reading).
    pub pieces: Vec<Vec<u8>>,
    /// Close the connection after the pieces.
    pub close: bool,
    /// After the pieces, echo every byte received (the connection was upgraded).
    pub tunnel: bool,
}

impl Answer {
    /// These bytes in one write; the connection stays open.
    pub fn bytes(bytes: impl AsRef<[u8]>) -> Answer {
        Answer {
            pieces: vec![bytes.as_ref().to_vec()],
            ..Answer::default()
        }
    }

    /// These pieces, written apart; the connection stays open.
    pub fn pieces(pieces: &[&[u8]]) -> Answer {
        Answer {
            pieces: pieces.iter().map(|p| p.to_vec()).collect(),
            ..Answer::default()
        }
    }

    /// `200 OK` with this body and its Content-Length.
    pub fn ok(body: impl AsRef<[u8]>) -> Answer {
        let body = body.as_ref();
        let mut out =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        out.extend_from_slice(body);
        Answer::bytes(out)
    }

    /// Close the connection after the pieces.
    pub fn then_close(mut self) -> Answer {
        self.close = true;
        self
    }

    /// Echo everything after the pieces (a 101 answer).
    pub fn then_tunnel(mut self) -> Answer {
        self.tunnel = true;
        self
    }
}

/// Everything one connection to a [`RawBackend`] received.
#[derive(Clone, Debug, Default)]
pub struct ConnLog {
    /// Every byte, in order (requests, anything unparsable, tunnelled bytes).
    pub bytes: Vec<u8>,
    /// The complete requests among them.
    pub requests: Vec<RawRequest>,
    /// How many of `bytes` the complete requests (and the tunnel) account for.
    pub consumed: usize,
    /// Why parsing stopped, if the bytes were not a request even read leniently (malformed
    /// requests that could be read leniently are in `requests`, with
    /// [`RawRequest::malformed`]).
    pub error: Option<String>,
    /// Bytes received after a `101` answer (also in `bytes`).
    pub tunnel: Vec<u8>,
    /// The proxy closed (or reset) the connection.
    pub eof: bool,
}

impl ConnLog {
    /// Bytes after the last complete request that do not (yet) form one: a request cut short, or
    /// whatever could not be parsed. Empty in tunnel mode.
    pub fn pending(&self) -> &[u8] {
        if !self.tunnel.is_empty() {
            return &[];
        }
        &self.bytes[self.consumed.min(self.bytes.len())..]
    }
}

type Script = dyn Fn(&RawRequest) -> Answer + Send + Sync;

struct Shared {
    conns: Mutex<Vec<ConnLog>>,
    seq: AtomicUsize,
    script: Box<Script>,
}

/// A scripted HTTP/1 backend on `127.0.0.1:0` that records every byte (see the module doc).
/// Dropping it stops it and every connection.
pub struct RawBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl RawBackend {
    /// Binds and serves; each complete request is answered with `script(request)`.
    pub async fn start(script: impl Fn(&RawRequest) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a raw backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("raw backend local_addr");
        let shared = Arc::new(Shared {
            conns: Mutex::new(Vec::new()),
            seq: AtomicUsize::new(0),
            script: Box::new(script),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        RawBackend {
            addr,
            shared,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A tether `[[backend]]` table for this backend.
    pub fn toml(&self, id: &str) -> String {
        format!("[[backend]]\nid = \"{id}\"\naddress = \"{}\"\n", self.addr)
    }

    /// What every connection received so far, in accept order.
    pub fn connections(&self) -> Vec<ConnLog> {
        self.shared.conns.lock().expect("raw backend lock").clone()
    }

    /// Every complete request so far, in the order they were received.
    pub fn requests(&self) -> Vec<RawRequest> {
        let mut all: Vec<RawRequest> = self
            .connections()
            .into_iter()
            .flat_map(|c| c.requests)
            .collect();
        all.sort_by_key(|r| r.seq);
        all
    }

    /// How many complete requests so far.
    pub fn request_count(&self) -> usize {
        self.shared.seq.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        // The accept task owns the connections' JoinSet: aborting it ends them all.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let conn = {
                    let mut conns = shared.conns.lock().expect("raw backend lock");
                    conns.push(ConnLog::default());
                    conns.len() - 1
                };
                connections.spawn(serve_conn(stream, conn, shared.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Read, record, parse and answer on one connection until it closes.
async fn serve_conn(mut s: TcpStream, conn: usize, shared: Arc<Shared>) {
    let with_log = |f: &mut dyn FnMut(&mut ConnLog)| {
        let mut conns = shared.conns.lock().expect("raw backend lock");
        f(&mut conns[conn]);
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut broken = false;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Answer every complete request in the buffer.
        while !broken {
            let parsed = match parse_request(&buf[at..]) {
                Parsed::Invalid(why) => match parse_request_lenient(&buf[at..]) {
                    Parsed::Done(mut req, n) => {
                        req.malformed = Some(why);
                        Parsed::Done(req, n)
                    }
                    Parsed::Partial => Parsed::Partial,
                    Parsed::Invalid(e) => Parsed::Invalid(format!("{why}; {e}")),
                },
                other => other,
            };
            match parsed {
                Parsed::Done(mut req, n) => {
                    at += n;
                    req.conn = conn;
                    req.seq = shared.seq.fetch_add(1, Ordering::SeqCst);
                    let answer = (shared.script)(&req);
                    with_log(&mut |log| {
                        log.requests.push(req.clone());
                        log.consumed = at;
                    });
                    for (i, piece) in answer.pieces.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(PIECE_PAUSE).await;
                        }
                        if s.write_all(piece).await.is_err() || s.flush().await.is_err() {
                            return;
                        }
                    }
                    if answer.close {
                        return;
                    }
                    if answer.tunnel {
                        let early = buf[at..].to_vec();
                        tunnel(s, conn, &shared, early).await;
                        return;
                    }
                }
                Parsed::Partial => break,
                Parsed::Invalid(why) => {
                    with_log(&mut |log| log.error = Some(why.clone()));
                    // Keep recording whatever else comes, answer nothing.
                    broken = true;
                }
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                with_log(&mut |log| log.eof = true);
                return;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                with_log(&mut |log| log.bytes.extend_from_slice(&chunk[..n]));
            }
        }
    }
}

/// Echo mode after a `101`: every byte received (`early` first) is recorded and sent back.
async fn tunnel(mut s: TcpStream, conn: usize, shared: &Shared, early: Vec<u8>) {
    let record = |bytes: &[u8]| {
        let mut conns = shared.conns.lock().expect("raw backend lock");
        let log = &mut conns[conn];
        log.tunnel.extend_from_slice(bytes);
        log.consumed = log.bytes.len();
    };
    if !early.is_empty() {
        record(&early);
        if s.write_all(&early).await.is_err() {
            return;
        }
    }
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                let mut conns = shared.conns.lock().expect("raw backend lock");
                conns[conn].eof = true;
                return;
            }
            Ok(n) => {
                {
                    let mut conns = shared.conns.lock().expect("raw backend lock");
                    conns[conn].bytes.extend_from_slice(&chunk[..n]);
                }
                record(&chunk[..n]);
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RawClient
// ---------------------------------------------------------------------------------------------

/// A raw client connection to a proxy: everything it read is kept in [`RawClient::got`].
pub struct RawClient {
    stream: TcpStream,
    /// Every byte read so far.
    pub got: Vec<u8>,
    /// The server closed the connection (EOF), or reset it ([`RawClient::reset`]).
    pub eof: bool,
    /// The connection ended with an error (a reset) rather than EOF.
    pub reset: bool,
    /// A read hit its deadline.
    pub timed_out: bool,
}

impl RawClient {
    /// Connects to `127.0.0.1:port`.
    pub async fn connect(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
        let _ = stream.set_nodelay(true);
        RawClient {
            stream,
            got: Vec::new(),
            eof: false,
            reset: false,
            timed_out: false,
        }
    }

    /// Writes `bytes` in one write. An error (the server answered and closed early) is returned,
    /// not a panic: what the server sent is still there to read.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Writes the pieces one by one, [`PIECE_PAUSE`] apart.
    pub async fn send_pieces(&mut self, pieces: &[&[u8]]) -> std::io::Result<()> {
        for (i, p) in pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(PIECE_PAUSE).await;
            }
            self.send(p).await?;
        }
        Ok(())
    }

    /// One read, bounded by `deadline`: `false` at EOF, reset or the deadline.
    async fn read_some(&mut self, deadline: Instant) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                self.eof = true;
                false
            }
            Ok(Ok(n)) => {
                self.got.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(Err(_)) => {
                self.eof = true;
                self.reset = true;
                false
            }
            Err(_) => {
                self.timed_out = true;
                false
            }
        }
    }

    /// Reads until `done(bytes so far)` holds, the connection ends, or `deadline`. Returns
    /// whether `done` held.
    pub async fn read_until(&mut self, deadline: Instant, done: impl Fn(&[u8]) -> bool) -> bool {
        loop {
            if done(&self.got) {
                return true;
            }
            if !self.read_some(deadline).await {
                return done(&self.got);
            }
        }
    }

    /// Reads until `finals` final responses are complete (or a 101), the bytes stop being
    /// responses, the connection ends, or `deadline`; returns the split of everything read.
    pub async fn read_responses(
        &mut self,
        finals: usize,
        heads: &[bool],
        deadline: Instant,
    ) -> Split {
        loop {
            let split = self.split(heads);
            let enough = split.finals().len() >= finals
                || matches!(
                    split.stop,
                    Stop::Invalid(_) | Stop::Upgraded | Stop::CutShort
                );
            if enough || !self.read_some(deadline).await {
                return self.split(heads);
            }
        }
    }

    /// Reads until the connection ends or `deadline`; returns whether it ended.
    pub async fn read_to_eof(&mut self, deadline: Instant) -> bool {
        while self.read_some(deadline).await {}
        self.eof
    }

    /// Everything read so far, cut into responses.
    pub fn split(&self, heads: &[bool]) -> Split {
        split_responses(&self.got, self.eof, heads)
    }
}
