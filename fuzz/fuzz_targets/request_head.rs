//! A request head from a client: httparse's strict parse, then tether's policy
//! (`tether::http::check_request`). Whatever the bytes, no panic, and what passes is what the
//! engines may forward without another look: an origin-form target (or `*`), a valid authority,
//! one framing, an upgrade only without a body; a refusal is a 4xx or 5xx.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tether::config::ServerSettings;
use tether::http::framing::RequestBody;
use tether::http::headers::valid_host;
use tether::http::{check_request, head_end};

#[path = "common.rs"]
mod common;

static SERVER: LazyLock<ServerSettings> = LazyLock::new(|| common::config().server);

fuzz_target!(|data: &[u8]| {
    let limits = &*SERVER;
    let Some(head_len) = head_end(data) else {
        return;
    };
    assert!(head_len <= data.len());
    let head = &data[..head_len];
    let mut fields = vec![httparse::EMPTY_HEADER; limits.max_request_headers];
    let mut req = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(parsed)) = req.parse(head) else {
        return;
    };
    // head_end and httparse agree on where the head ends.
    assert_eq!(parsed, head_len, "head_end and httparse disagree");
    let verdict = check_request(&req, head_len, limits);
    // The policy is a function of the head alone.
    let mut again_fields = vec![httparse::EMPTY_HEADER; limits.max_request_headers];
    let mut again = httparse::Request::new(&mut again_fields);
    again.parse(head).expect("parsed once");
    let again = check_request(&again, head_len, limits);
    match (&verdict, &again) {
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("check_request is not deterministic"),
    }
    match verdict {
        Err(refusal) => assert!(
            (400..600).contains(&refusal.status),
            "refused with {}",
            refusal.status
        ),
        Ok(checked) => {
            assert!(
                checked.target.starts_with('/') || checked.target == "*",
                "forwarded target {:?}",
                checked.target
            );
            assert!(checked.target.bytes().all(|b| b > b' ' && b != 0x7f));
            if let Some(authority) = checked.authority {
                assert!(valid_host(authority.as_bytes()), "authority {authority:?}");
            }
            if checked.upgrade {
                assert_eq!(checked.body, RequestBody::None, "upgrade with a body");
                assert!(!checked.http10);
            }
            if checked.http10 {
                assert_ne!(checked.body, RequestBody::Chunked);
            }
            assert_ne!(checked.body, RequestBody::Length(0));
            let method = req.method.expect("parsed");
            assert_ne!(method, "CONNECT");
            let hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"))
                .count();
            assert!(hosts <= 1, "{hosts} Host fields passed");
        }
    }
});
