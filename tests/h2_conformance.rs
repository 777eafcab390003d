//! HTTP/2 conformance of tether's TLS listener, in the spirit of h2spec (which cannot be installed
//! here): tests/clients/h2_conformance.py writes raw frames, valid and invalid, one connection a
//! case, and checks the answers against RFC 9113. This test starts a real tether with a TLS
//! listener and two in-process backends, runs the script, and asserts:
//! - the cases that fail are exactly [`KNOWN_DEVIATIONS`] (each with its reason; the details are
//!   in docs/h2-conformance.md), so that a regression and a fix are both noticed;
//! - no malformed request reached a backend except those in [`KNOWN_FORWARDED`] (RFC 9113 8.1.1:
//!   an intermediary MUST NOT forward a malformed request);
//! - tether is still running and still serves an ordinary HTTP/2 request afterwards (the script's
//!   last case, "sanity/1"), and its log has no panic.
//!
//! Needs `python3` with tests/clients/requirements.txt installed (hyperframe, hpack).
//! Run: `cargo test --test h2_conformance -- --nocapture` to see the script's report.

mod support;

use std::collections::BTreeSet;
use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::scenario::*;
use support::*;

/// The script; each case waits at most `--timeout` seconds for a frame.
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/clients/h2_conformance.py"
);
const CERT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conf/examples/tls/localhost.pem"
);
const KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conf/examples/tls/localhost.key"
);

/// The whole script may take this long (it runs about 130 cases, 8 at a time, in some 5 s; a
/// case that waits in vain takes 3 s) before it is killed and the test fails.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(90);

/// The cases tether fails, by the script's id, and why (Pingora serves HTTP/2 with the `h2` crate
/// 0.4; none of these lets a bad frame or a malformed request through to a backend).
const KNOWN_DEVIATIONS: &[(&str, &str)] = &[
    (
        "4.3/1",
        "h2 answers a bad HPACK block with GOAWAY PROTOCOL_ERROR, not COMPRESSION_ERROR",
    ),
    (
        "4.3/2",
        "h2 answers a bad HPACK index with GOAWAY PROTOCOL_ERROR, not COMPRESSION_ERROR",
    ),
    (
        "4.3/3",
        "h2 answers a too-large table size update with PROTOCOL_ERROR, not COMPRESSION_ERROR",
    ),
    (
        "5.1/6",
        "h2: DATA on a half-closed (remote) stream is GOAWAY PROTOCOL_ERROR, not STREAM_CLOSED",
    ),
    (
        "5.1/7",
        "h2: HEADERS on a half-closed (remote) stream is GOAWAY PROTOCOL_ERROR, not STREAM_CLOSED",
    ),
    (
        "5.1/10",
        "h2: HEADERS on a stream the client reset is GOAWAY PROTOCOL_ERROR, not STREAM_CLOSED",
    ),
    (
        "5.1/13",
        "h2: HEADERS on a closed stream is GOAWAY PROTOCOL_ERROR (an old stream id), not STREAM_CLOSED",
    ),
    (
        "6.1/2",
        "h2: DATA on a half-closed (remote) stream is GOAWAY PROTOCOL_ERROR, not STREAM_CLOSED",
    ),
    (
        "6.3/2",
        "h2 answers every frame of a bad size with PROTOCOL_ERROR, not FRAME_SIZE_ERROR",
    ),
    (
        "6.4/3",
        "h2 answers every frame of a bad size with PROTOCOL_ERROR, not FRAME_SIZE_ERROR",
    ),
    (
        "6.5/1",
        "h2 answers every frame of a bad size with PROTOCOL_ERROR, not FRAME_SIZE_ERROR",
    ),
    (
        "6.5/3",
        "h2 answers every frame of a bad size with PROTOCOL_ERROR, not FRAME_SIZE_ERROR",
    ),
    (
        "6.5.2/2",
        "h2 answers INITIAL_WINDOW_SIZE > 2^31-1 with PROTOCOL_ERROR, not FLOW_CONTROL_ERROR",
    ),
    (
        "6.7/4",
        "h2 answers every frame of a bad size with PROTOCOL_ERROR, not FRAME_SIZE_ERROR",
    ),
    (
        "6.9/3",
        "h2 answers every frame of a bad size with PROTOCOL_ERROR, not FRAME_SIZE_ERROR",
    ),
    (
        "6.10/2",
        "h2 allows 5 CONTINUATION frames a block here (CVE-2024-27316 guard): ENHANCE_YOUR_CALM",
    ),
    (
        "8.1/3",
        "h2: DATA after trailers (half-closed remote) is GOAWAY PROTOCOL_ERROR, not STREAM_CLOSED",
    ),
    (
        "8.1.2/7",
        "a value with leading whitespace is forwarded; the HTTP/1 backend trims it as OWS",
    ),
    (
        "8.1.2/8",
        "a value with trailing whitespace is forwarded; the HTTP/1 backend trims it as OWS",
    ),
    (
        "8.1.2.1/4",
        "h2 accepts a pseudo-header in trailers; Pingora does not pass trailers to an HTTP/1 backend",
    ),
];

/// Malformed requests (by case id) that reach a backend, and why. tether streams: a request's
/// head goes to the backend before its body, so what is wrong with the body or the trailers is
/// found after the head left; the backend then sees the body cut short and the connection
/// aborted, never a complete request (and the sanity case shows no connection got out of step).
const KNOWN_FORWARDED: &[(&str, &str)] = &[
    (
        "8.1/2",
        "trailers without END_STREAM come after the head was forwarded; the body is cut",
    ),
    (
        "8.1.2.6/1",
        "DATA beyond content-length comes after the head; h2 drops it, the body is cut",
    ),
    (
        "8.1.2.6/2",
        "DATA beyond content-length comes after the head; h2 drops it, the body is cut",
    ),
    (
        "8.1.2.6/3",
        "END_STREAM short of content-length comes after the head; the body is cut",
    ),
    (
        "8.1.2/7",
        "leading whitespace in a value: HTTP/1 strips it as optional whitespace",
    ),
    (
        "8.1.2/8",
        "trailing whitespace in a value: HTTP/1 strips it as optional whitespace",
    ),
    (
        "8.1.2.1/4",
        "the request is sound; only its (dropped) trailers held a pseudo-header",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_conformance_suite() {
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let tls = format!("[tls]\ncerts = [{{ cert = \"{CERT}\", key = \"{KEY}\" }}]\n\n");
    let mut body = format!(
        "{tls}[affinity]\nhash_key = \"{TEST_HASH_KEY}\"\nsources = [\"header:{SESSION_HEADER}\"]\n\
         policy = \"round_robin\"\n\n"
    );
    for b in [&b1, &b2] {
        body.push_str(&b.toml());
        body.push('\n');
    }
    let port = free_port();
    let options = BalancerOptions {
        server_extra: format!("listen_tls = [\"127.0.0.1:{port}\"]\n"),
        ..BalancerOptions::default()
    };
    let mut balancer = Balancer::start_with(options, &body).await;

    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || run_script(port))
        .await
        .expect("the script runner panicked");
    println!("{stdout}");
    let report: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON summary from the script (exit {status:?})\nstdout:\n{}\nstderr:\n{}",
                tail(&stdout, 20),
                tail(&stderr, 20)
            )
        });
    let cases = report["cases"].as_array().expect("cases in the summary");
    let id = |c: &serde_json::Value| c["id"].as_str().expect("case id").to_owned();

    let failed: BTreeSet<String> = cases
        .iter()
        .filter(|c| c["passed"] != true)
        .map(id)
        .collect();
    let known: BTreeSet<String> = KNOWN_DEVIATIONS
        .iter()
        .map(|(k, _)| k.to_string())
        .collect();
    let describe = |ids: &BTreeSet<&String>| -> String {
        cases
            .iter()
            .filter(|c| ids.contains(&id(c)))
            .map(|c| format!("  {} {}: {}", id(c), c["description"], c["seen"]))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let new_failures: BTreeSet<&String> = failed.difference(&known).collect();
    let fixed: BTreeSet<&String> = known.difference(&failed).collect();
    assert!(
        new_failures.is_empty() && fixed.is_empty(),
        "HTTP/2 conformance changed.\nnew failures (a regression, or a case to add to \
         KNOWN_DEVIATIONS and docs/h2-conformance.md):\n{}\nknown deviations that now pass \
         (remove them from KNOWN_DEVIATIONS and update docs/h2-conformance.md):\n{}\n\
         tether log:\n{}",
        describe(&new_failures),
        fixed
            .iter()
            .map(|k| format!("  {k}"))
            .collect::<Vec<_>>()
            .join("\n"),
        tail(&balancer.log(), 30)
    );

    // RFC 9113 8.1.1: an intermediary MUST NOT forward a malformed request.
    let reached: BTreeSet<String> = [&b1, &b2]
        .iter()
        .flat_map(|b| b.recorded())
        .map(|r| r.uri.path().to_owned())
        .collect();
    let forwarded: BTreeSet<String> = cases
        .iter()
        .filter(|c| c["malformed"] == true)
        .filter(|c| reached.contains(c["path"].as_str().expect("case path")))
        .map(id)
        .collect();
    let allowed: BTreeSet<String> = KNOWN_FORWARDED.iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(
        forwarded, allowed,
        "malformed requests that reached a backend (left) differ from KNOWN_FORWARDED (right)"
    );

    let sanity = cases.last().expect("at least the sanity case");
    assert_eq!(
        sanity["id"], "sanity/1",
        "the last case is the sanity request"
    );
    assert_eq!(
        sanity["passed"], true,
        "an ordinary HTTP/2 request after the suite: {sanity}"
    );
    assert_eq!(
        status,
        Some(0),
        "script exit status\nstderr:\n{}",
        tail(&stderr, 20)
    );
    assert!(balancer.is_running(), "tether exited during the suite");
    balancer.assert_no_panic();
    println!(
        "h2 conformance: {} passed, {} failed (all known deviations)",
        report["passed"], report["failed"]
    );
}

/// Runs the script against `port` and returns its exit code, stdout and stderr; kills it if it
/// outlives [`SCRIPT_DEADLINE`] (and then panics).
fn run_script(port: u16) -> (Option<i32>, String, String) {
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .args(["--port", &port.to_string(), "--ca", CERT, "--json"])
        .args(["--backends", "b1,b2", "--timeout", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting python3 tests/clients/h2_conformance.py");
    // Read the pipes as the script writes them, so a full pipe cannot block it.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on the script") {
            break status;
        }
        if started.elapsed() > SCRIPT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the h2 conformance script still ran after {SCRIPT_DEADLINE:?}; output so far:\n{}",
                out_reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    (status.code(), stdout, stderr)
}
