//! Message framing, strictly (RFC 9112 section 6): how long a request or response body is, and
//! one chunked-coding decoder for both directions. Anything ambiguous is refused, never guessed:
//! a message two parsers could frame differently is how requests and responses get smuggled.
//!
//! The rules: a `Transfer-Encoding` must be exactly `chunked`, on one field line; a
//! `Content-Length` one run of digits on one field line; never both. On requests these are NGINX
//! 1.22's answers (400, or 501 for another coding); on responses tether is stricter than NGINX,
//! which relays some of these (docs/conformance.md): a proxy that guesses at a backend's framing
//! is one a desync goes through. This module owns no I/O.

use super::Refusal;

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No body (no `Content-Length`, no `Transfer-Encoding`, or `Content-Length: 0`).
    None,
    Length(u64),
    Chunked,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    None,
    Length(u64),
    Chunked,
    /// Neither length nor chunked: the body runs until the backend closes; the client
    /// connection closes after it too.
    UntilClose,
}

/// The value of the `Content-Length` field lines in `values`: one line, one run of ASCII
/// digits (RFC 9110 section 8.6). Two lines, even equal, or a list (`5, 5`) are refused: a proxy
/// may forward one value only, and NGINX refuses them too.
pub fn content_length<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<u64>, &'static str> {
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one Content-Length field");
    }
    let v = first.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err("Content-Length is not a number");
    }
    Ok(Some(
        v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    ))
}

/// Whether the `Transfer-Encoding` field lines in `values` say exactly `chunked`: `Ok(None)`
/// without any, `Err` for anything but one line whose value is `chunked`.
fn chunked_only<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<()>, &'static str> {
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one Transfer-Encoding field");
    }
    if !first.trim_ascii().eq_ignore_ascii_case(b"chunked") {
        return Err("Transfer-Encoding other than chunked");
    }
    Ok(Some(()))
}

/// The body of a request with these `Content-Length` and `Transfer-Encoding` field values.
/// 400 for a malformed or conflicting length, 501 for a transfer coding tether does not
/// implement (anything but `chunked`), as NGINX answers.
pub fn request_body<'a>(
    content_length_values: impl Iterator<Item = &'a [u8]>,
    transfer_encoding_values: impl Iterator<Item = &'a [u8]> + Clone,
) -> Result<RequestBody, Refusal> {
    let length = content_length(content_length_values).map_err(Refusal::bad_request)?;
    let mut te = transfer_encoding_values.clone();
    let has_te = te.next().is_some();
    if has_te && length.is_some() {
        return Err(Refusal::bad_request(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if has_te {
        if te.next().is_some() {
            return Err(Refusal::bad_request(
                "more than one Transfer-Encoding field",
            ));
        }
        return match chunked_only(transfer_encoding_values) {
            Ok(_) => Ok(RequestBody::Chunked),
            Err(why) => Err(Refusal::new(501, why)),
        };
    }
    Ok(match length {
        None | Some(0) => RequestBody::None,
        Some(n) => RequestBody::Length(n),
    })
}

/// The body of a response with these field values, to a request of method HEAD (`head`) or
/// not. `Err`: the backend's framing is ambiguous or malformed: 502, the connection is not
/// reused.
pub fn response_body<'a>(
    status: u16,
    head: bool,
    content_length_values: impl Iterator<Item = &'a [u8]>,
    transfer_encoding_values: impl Iterator<Item = &'a [u8]>,
) -> Result<ResponseBody, &'static str> {
    // Checked even where the body is empty by definition: a backend that frames a 204 or a HEAD
    // answer nonsensically is broken, and its connection must not be reused.
    let length = content_length(content_length_values)?;
    let chunked = chunked_only(transfer_encoding_values)?.is_some();
    if chunked && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if head || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(ResponseBody::None);
    }
    Ok(match (chunked, length) {
        (true, _) => ResponseBody::Chunked,
        (false, Some(0)) => ResponseBody::None,
        (false, Some(n)) => ResponseBody::Length(n),
        (false, None) => ResponseBody::UntilClose,
    })
}

/// Why chunked framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChunk(pub &'static str);

/// The most a chunk extension or a trailer section may take (NGINX bounds them by its buffers).
const MAX_EXTENSION: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// Hex digits of a chunk size: 15 keep it far below `u64::MAX`.
const MAX_SIZE_DIGITS: u8 = 15;

/// The chunked transfer coding (RFC 9112 section 7.1), decoded strictly and byte by byte, so a
/// body is relayed as it comes and its end is known: sizes are hex digits, lines end in CRLF
/// (a bare LF or CR is refused), extensions are `;name[=value]` with tokens or quoted strings,
/// trailer lines are field lines. Input may be split anywhere.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// The chunk extension or trailer line being read (rare; empty and unallocated otherwise).
    line: Vec<u8>,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// After the size: whitespace or `;`, the extension, to its CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (an empty one ends the message).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkDecoder {
    /// The last chunk and the trailer section are in.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consume the bytes of `input` that belong to the message; returns how many (fewer than
    /// `input.len()` only when the message ended). `data` gets the decoded body bytes.
    pub fn advance(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == MAX_SIZE_DIGITS {
                            return Err(BadChunk("chunk size too large"));
                        }
                        let d = (b as char).to_digit(16).expect("a hex digit");
                        self.size = self.size * 16 + u64::from(d);
                        self.digits += 1;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => {
                        self.line.push(b);
                        self.state = ChunkState::Extension;
                    }
                    b'\r' if self.digits > 0 => self.state = ChunkState::SizeLf,
                    _ => return Err(BadChunk("invalid chunk size line")),
                },
                ChunkState::Extension => match b {
                    b'\r' => {
                        if !valid_extension(&self.line) {
                            return Err(BadChunk("invalid chunk extension"));
                        }
                        self.line = Vec::new();
                        self.state = ChunkState::SizeLf;
                    }
                    _ if self.line.len() >= MAX_EXTENSION => {
                        return Err(BadChunk("chunk extension too long"));
                    }
                    _ => self.line.push(b),
                },
                ChunkState::SizeLf => match b {
                    b'\n' => {
                        self.state = if self.size == 0 {
                            ChunkState::TrailerStart
                        } else {
                            ChunkState::Data
                        }
                    }
                    _ => return Err(BadChunk("chunk size line not ended by CRLF")),
                },
                ChunkState::Data => {
                    let n = self.size.min((input.len() - i) as u64) as usize;
                    data(&input[i..i + n]);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    _ => return Err(BadChunk("chunk data not followed by CRLF")),
                },
                ChunkState::DataLf => match b {
                    b'\n' => {
                        self.state = ChunkState::Size;
                        self.digits = 0;
                    }
                    _ => return Err(BadChunk("chunk data not followed by CRLF")),
                },
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::EndLf,
                    b'\n' => return Err(BadChunk("trailer section not ended by CRLF")),
                    _ => {
                        self.line.push(b);
                        self.state = ChunkState::TrailerLine;
                    }
                },
                ChunkState::TrailerLine => match b {
                    b'\r' => {
                        if !valid_field_line(&self.line) {
                            return Err(BadChunk("invalid trailer field line"));
                        }
                        self.trailer_bytes += self.line.len() + 2;
                        self.line.clear();
                        self.state = ChunkState::TrailerLf;
                    }
                    b'\n' => return Err(BadChunk("trailer line not ended by CRLF")),
                    _ if self.trailer_bytes + self.line.len() >= MAX_TRAILERS => {
                        return Err(BadChunk("trailer section too large"));
                    }
                    _ => self.line.push(b),
                },
                ChunkState::TrailerLf => match b {
                    b'\n' => self.state = ChunkState::TrailerStart,
                    _ => return Err(BadChunk("trailer line not ended by CRLF")),
                },
                ChunkState::EndLf => match b {
                    b'\n' => {
                        self.line = Vec::new();
                        self.state = ChunkState::Done;
                    }
                    _ => return Err(BadChunk("trailer section not ended by CRLF")),
                },
                ChunkState::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

/// The bytes of a class, as a table: one load per byte where `contains` on a short list is a
/// `memchr` call (these run on every field of every request).
pub(crate) const fn byte_class(alnum: bool, others: &[u8]) -> [bool; 256] {
    let mut set = [false; 256];
    let mut b = 0;
    while b < 256 {
        set[b] = alnum && (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < others.len() {
        set[others[i] as usize] = true;
        i += 1;
    }
    set
}

const TCHAR: [bool; 256] = byte_class(true, b"!#$%&'*+-.^_`|~");

pub(crate) fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// A byte a field value (or a quoted string) may hold: HTAB, visible ASCII, space, obs-text.
fn is_field_char(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`, as RFC 9112 section
/// 7.1.1 writes it; `ext` starts right after the size.
fn valid_extension(ext: &[u8]) -> bool {
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < ext.len() && is_ows(ext[*i]) {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < ext.len() && is_tchar(ext[*i]) {
            *i += 1;
        }
        *i > start
    };
    loop {
        skip_ws(&mut i);
        if i == ext.len() {
            // Whitespace alone after the size, or nothing after the last extension.
            return i > 0 && ext.contains(&b';');
        }
        if ext[i] != b';' {
            return false;
        }
        i += 1;
        skip_ws(&mut i);
        if !token(&mut i) {
            return false;
        }
        skip_ws(&mut i);
        if i < ext.len() && ext[i] == b'=' {
            i += 1;
            skip_ws(&mut i);
            if i < ext.len() && ext[i] == b'"' {
                i += 1;
                loop {
                    match ext.get(i) {
                        None => return false,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => match ext.get(i + 1) {
                            Some(&c) if is_field_char(c) => i += 2,
                            _ => return false,
                        },
                        Some(&c) if is_field_char(c) => i += 1,
                        Some(_) => return false,
                    }
                }
            } else if !token(&mut i) {
                return false;
            }
        }
    }
}

/// `name ":" OWS value OWS` with a token name and a value without control bytes (RFC 9112
/// section 5): a trailer line. A request line hidden in a trailer section fails here.
pub fn valid_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty() && name.iter().all(|b| is_tchar(*b)) && value.iter().all(|&b| is_field_char(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> Result<(usize, bool, Vec<u8>), BadChunk> {
        let mut c = ChunkDecoder::default();
        let mut body = Vec::new();
        let n = c.advance(input, |d| body.extend_from_slice(d))?;
        Ok((n, c.done(), body))
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n6;ext=1;q=\"a b\"\r\n world\r\n0\r\n\r\nGET /next";
        let (n, done, data) = decode(body).unwrap();
        assert_eq!((n, done), (body.len() - 9, true));
        assert_eq!(data, b"hello world");
        let trailers = b"3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n";
        assert_eq!(decode(trailers).unwrap().0, trailers.len());
        assert!(decode(b"3 ;a\r\nabc\r\n0\r\n\r\n").unwrap().1);
    }

    #[test]
    fn a_chunked_body_split_anywhere_decodes_the_same() {
        let body =
            b"a\r\n0123456789\r\n1F;x\r\n0123456789012345678901234567890\r\n0\r\nt: 1\r\n\r\n";
        for cut in 0..body.len() {
            let mut c = ChunkDecoder::default();
            let mut data = Vec::new();
            let a = c
                .advance(&body[..cut], |d| data.extend_from_slice(d))
                .unwrap();
            assert_eq!(a, cut);
            assert!(!c.done(), "done early at {cut}");
            let b = c
                .advance(&body[cut..], |d| data.extend_from_slice(d))
                .unwrap();
            assert_eq!(a + b, body.len());
            assert!(c.done());
            assert_eq!(data.len(), 41);
        }
    }

    #[test]
    fn malformed_chunk_framing_is_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b";ext\r\n",
            b"0x5\r\n",
            b"-1\r\n",
            b"3\r\nabcX",
            b"ffffffffffffffff\r\n",
            b"5 \r\n",
            b"5;\r\n",
            b"5;a=\r\n",
            b"5;a=\"x\r\n",
            b"2\nab\r\n",
            b"2\r\nab\n",
            b"2\r\nab\r\r",
            b"0\r\n\n",
            b"0\r\nGET /x HTTP/1.1\r\n\r\n",
            b"0\r\nbad name: 1\r\n\r\n",
            b"0\r\nx: a\nb\r\n\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn lengths_are_one_run_of_digits_on_one_line() {
        let one = |v: &'static [u8]| content_length([v].into_iter());
        assert_eq!(one(b"12"), Ok(Some(12)));
        assert_eq!(one(b" 0 "), Ok(Some(0)));
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"0x5",
            b"5 5",
            b"5, 5",
            b"1234567890123456789",
        ] {
            assert!(one(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(content_length([&b"5"[..], b"5"].into_iter()).is_err());
    }

    #[test]
    fn request_framing_refuses_what_two_parsers_could_read_differently() {
        let f = |cl: &[&'static [u8]], te: &[&'static [u8]]| {
            request_body(cl.iter().copied(), te.iter().copied()).map_err(|r| r.status)
        };
        assert_eq!(f(&[], &[]), Ok(RequestBody::None));
        assert_eq!(f(&[b"0"], &[]), Ok(RequestBody::None));
        assert_eq!(f(&[b"7"], &[]), Ok(RequestBody::Length(7)));
        assert_eq!(f(&[], &[b"chunked"]), Ok(RequestBody::Chunked));
        assert_eq!(f(&[], &[b"Chunked"]), Ok(RequestBody::Chunked));
        assert_eq!(f(&[b"5"], &[b"chunked"]), Err(400));
        assert_eq!(f(&[], &[b"chunked", b"chunked"]), Err(400));
        assert_eq!(f(&[], &[b"gzip, chunked"]), Err(501));
        assert_eq!(f(&[], &[b"chunked, identity"]), Err(501));
        assert_eq!(f(&[], &[b"xchunked"]), Err(501));
        assert_eq!(f(&[b"5", b"5"], &[]), Err(400));
    }

    #[test]
    fn response_framing_refuses_anything_but_one_clear_length() {
        let f = |status, head, cl: &[&'static [u8]], te: &[&'static [u8]]| {
            response_body(status, head, cl.iter().copied(), te.iter().copied())
        };
        assert_eq!(f(200, false, &[b"12"], &[]), Ok(ResponseBody::Length(12)));
        assert_eq!(f(200, false, &[b"0"], &[]), Ok(ResponseBody::None));
        assert_eq!(f(200, false, &[], &[b"chunked"]), Ok(ResponseBody::Chunked));
        assert_eq!(f(200, false, &[], &[]), Ok(ResponseBody::UntilClose));
        assert_eq!(f(204, false, &[], &[]), Ok(ResponseBody::None));
        assert_eq!(f(304, false, &[b"5"], &[]), Ok(ResponseBody::None));
        assert_eq!(f(200, true, &[b"9"], &[]), Ok(ResponseBody::None));
        for te in [
            &b"chunked,"[..],
            b"gzip, chunked",
            b"identity",
            b", chunked",
        ] {
            assert!(f(200, false, &[], &[te]).is_err());
        }
        assert!(f(200, false, &[], &[b"chunked", b""]).is_err());
        assert!(f(200, false, &[b"3"], &[b"chunked"]).is_err());
        assert!(f(200, false, &[b"1"], &[]).is_ok());
        assert!(f(200, false, &[b"1", b"2"], &[]).is_err());
        assert!(f(200, false, &[b"5, 5"], &[]).is_err());
    }
}
