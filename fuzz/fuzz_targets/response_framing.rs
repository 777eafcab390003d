//! A response from a backend: httparse's strict parse, tether's response policy
//! (`tether::http::check_response`), and the chunked decoder on the body. No panic; a body
//! decodes the same however its bytes are split; a decoder that says "done" consumed exactly the
//! message, and what it refused stays refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::http::check_response;
use tether::http::framing::{ChunkDecoder, ResponseBody};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let (head_request, upgrade) = (flags & 1 == 1, flags & 2 == 2);
    // The body alone, whole and split at a point the input chooses.
    decode_both_ways(data, usize::from(flags >> 2));

    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut fields);
    let Ok(httparse::Status::Complete(head_len)) = tether::http::parse_response(&mut resp, data)
    else {
        return;
    };
    let status = resp.code.expect("parsed");
    if (100..200).contains(&status) && status != 101 {
        return;
    }
    let Ok(checked) = check_response(&resp, head_request, upgrade) else {
        return;
    };
    let count = |name: &str| {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    // What passes has one framing, and never two.
    assert!(count("content-length") <= 1 && count("transfer-encoding") <= 1);
    assert!(count("content-length") + count("transfer-encoding") <= 1);
    if status == 101 {
        assert!(upgrade, "a 101 nobody asked for passed");
    }
    if head_request || status == 204 || status == 304 || status == 101 {
        assert_eq!(checked.body, ResponseBody::None);
    }
    if checked.body == ResponseBody::Chunked {
        decode_both_ways(&data[head_len..], usize::from(flags >> 2));
    }
});

/// Decode `body` in one call and in two (split at `at`); both must agree on everything.
fn decode_both_ways(body: &[u8], at: usize) {
    let whole = decode(&[body]);
    let at = at.min(body.len());
    let split = decode(&[&body[..at], &body[at..]]);
    assert_eq!(whole, split, "split at {at} decodes differently");
    if let Ok((true, used, _)) = &whole {
        // A second decode of just the message gives the same.
        assert_eq!(decode(&[&body[..*used]]), whole);
    }
}

/// (done, bytes consumed, decoded data), or the refusal.
fn decode(parts: &[&[u8]]) -> Result<(bool, usize, Vec<u8>), &'static str> {
    let mut decoder = ChunkDecoder::default();
    let mut out = Vec::new();
    let mut used = 0;
    for part in parts {
        let n = decoder
            .advance(part, |d| out.extend_from_slice(d))
            .map_err(|e| e.0)?;
        assert!(n <= part.len());
        used += n;
        if decoder.done() {
            break;
        }
        assert_eq!(n, part.len(), "stopped early without being done");
    }
    Ok((decoder.done(), used, out))
}
