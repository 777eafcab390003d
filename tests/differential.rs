//! tether's two HTTP/1 engines, side by side: every request of a list goes through a tether on
//! `[server] engine = "lean"` (its own HTTP/1 path) and one on `engine = "pingora"` (every
//! bodyless, non-upgrade, non-Engine.IO request through Pingora's proxy), each in front of its
//! own [`RawBackend`] with the same script; the backends must receive the same bytes and the
//! clients must read the same bytes (the `date` header's value masked). One HTTP policy under
//! two engines (DESIGN.md, STYLE.md "One policy under several engines"): any difference is a
//! drift between them.
//!
//! Each case is a few steps on one client connection: write these bytes, read this many
//! responses. What is compared per engine: the client's bytes (all steps), whether the
//! connection closed after an answer that announced it, and each request the backend received
//! (its exact bytes, in order) plus any bytes that did not make a request.

mod support;

use std::time::Duration;

use tokio::time::Instant;

use support::raw::*;
use support::scenario::config_with;
use support::{Balancer, BalancerOptions};

/// Longest wait for one step's responses (or for the close after them).
const DEADLINE: Duration = Duration::from_secs(5);

const ENGINES: [&str; 2] = ["lean", "pingora"];

/// The same script for every backend, by target: each answer framed its own way.
fn script(r: &RawRequest) -> Answer {
    if r.method == "HEAD" {
        return Answer::bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Head: yes\r\n\r\n");
    }
    let path = r.target.split('?').next().unwrap_or_default();
    match path {
        "/cl" => Answer::bytes(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Kind: length\r\n\r\nhello",
        ),
        "/chunked" => Answer::pieces(&[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"6\r\n world\r\n0\r\n\r\n",
        ]),
        "/chunked-ext" => Answer::pieces(&[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        ]),
        "/close" => {
            Answer::bytes(b"HTTP/1.1 200 OK\r\nX-Kind: until-close\r\n\r\nhello until close")
                .then_close()
        }
        "/204" => Answer::bytes(b"HTTP/1.1 204 No Content\r\nX-Kind: empty\r\n\r\n"),
        "/304" => Answer::bytes(
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 5\r\n\r\n",
        ),
        "/103" => Answer::pieces(&[
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints",
        ]),
        "/cookie" => Answer::bytes(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: b=2; HttpOnly\r\nContent-Length: 2\r\n\r\nok",
        ),
        "/503" => Answer::bytes(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nbusy",
        ),
        _ => Answer::ok(r.target.as_bytes()),
    }
}

/// One write and the responses it must bring.
struct Step {
    send: Vec<u8>,
    /// Which of the step's final responses answer a HEAD.
    heads: Vec<bool>,
    finals: usize,
}

struct Case {
    name: &'static str,
    steps: Vec<Step>,
}

/// A case of one request (a HEAD if the bytes start with `HEAD`).
fn one(name: &'static str, request: impl AsRef<[u8]>) -> Case {
    let send = request.as_ref().to_vec();
    Case {
        name,
        steps: vec![Step {
            heads: vec![send.starts_with(b"HEAD ")],
            send,
            finals: 1,
        }],
    }
}

fn get(target: &str, headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: tether\r\n{headers}\r\n").into_bytes()
}

/// What one engine did with one case.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    /// Everything the client read, `date` values masked.
    client: Vec<u8>,
    /// The connection closed after the last answer (waited for only when that answer said so).
    closed: bool,
    /// Each request the backend received, exactly.
    backend: Vec<Vec<u8>>,
    /// Bytes the backend received that made no request.
    stray: Vec<Vec<u8>>,
    /// How many final responses the client read, against how many the steps wanted (checked
    /// apart, so that two engines failing alike do not pass).
    answered: (usize, usize),
}

/// `bytes` with the value of every `date:` header line replaced by `<date>`.
fn mask_date(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(rest.len(), |i| i + 2);
        let line = &rest[..end];
        if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"date:") {
            out.extend_from_slice(&line[..5]);
            out.extend_from_slice(b" <date>\r\n");
        } else {
            out.extend_from_slice(line);
        }
        rest = &rest[end..];
    }
    out
}

/// Run `case` on a new connection to `lb`, whose backend is `backend`.
async fn exchange(lb: &Balancer, backend: &RawBackend, case: &Case) -> Seen {
    let mark = backend.request_count();
    let stray_before: Vec<usize> = backend
        .connections()
        .iter()
        .map(|c| c.pending().len())
        .collect();
    let mut c = RawClient::connect(lb.proxy_port()).await;
    let mut finals = 0;
    let mut heads = Vec::new();
    for step in &case.steps {
        // A write error is tether answering early (an oversized head): its answer is read all
        // the same.
        let _ = c.send(&step.send).await;
        finals += step.finals;
        heads.extend_from_slice(&step.heads);
        c.read_responses(finals, &heads, Instant::now() + DEADLINE)
            .await;
    }
    let split = c.split(&heads);
    if !c.eof && split.finals().last().is_some_and(|r| r.announces_close()) {
        c.read_to_eof(Instant::now() + DEADLINE).await;
    }
    let backend_requests = backend
        .requests()
        .into_iter()
        .filter(|r| r.seq >= mark)
        .map(|r| r.raw)
        .collect();
    let stray = backend
        .connections()
        .iter()
        .enumerate()
        .map(|(i, conn)| {
            let from = stray_before.get(i).copied().unwrap_or(0);
            conn.pending()[from.min(conn.pending().len())..].to_vec()
        })
        .filter(|s| !s.is_empty())
        .collect();
    Seen {
        client: mask_date(&c.got),
        closed: c.eof,
        backend: backend_requests,
        stray,
        answered: (c.split(&heads).finals().len(), finals),
    }
}

/// A tether on each engine, each in front of its own backend (the same script), or of
/// `down` when given (an address where nothing listens).
struct Pair {
    engines: Vec<(Balancer, RawBackend)>,
}

impl Pair {
    async fn start() -> Pair {
        Self::start_with(false).await
    }

    /// `backend_down`: each tether's backend address refuses connections (a port bound and
    /// released; the raw backend beside it is never reached).
    async fn start_with(backend_down: bool) -> Pair {
        let mut engines = Vec::new();
        for engine in ENGINES {
            let backend = RawBackend::start(script).await;
            let table = if backend_down {
                let port = support::free_port();
                format!("[[backend]]\nid = \"raw\"\naddress = \"127.0.0.1:{port}\"\n")
            } else {
                backend.toml("raw")
            };
            let options = BalancerOptions {
                server_extra: format!("engine = \"{engine}\""),
                ..BalancerOptions::default()
            };
            let lb =
                Balancer::start_with(options, &config_with(&[table], None, "sources = []")).await;
            engines.push((lb, backend));
        }
        Pair { engines }
    }

    /// Every case through both engines; panics listing every case where they differ.
    async fn compare(&self, cases: &[Case]) {
        let mut diffs = Vec::new();
        for case in cases {
            let mut seen = Vec::new();
            for (lb, backend) in &self.engines {
                seen.push(exchange(lb, backend, case).await);
            }
            let (lean, pingora) = (&seen[0], &seen[1]);
            let mut what = Vec::new();
            for (engine, seen) in ENGINES.iter().zip(&seen) {
                let (got, wanted) = seen.answered;
                if got != wanted {
                    what.push(format!(
                        "  {engine}: {got} of {wanted} responses within {DEADLINE:?}: {}",
                        escape(&seen.client)
                    ));
                }
            }
            let mut differ = |what_differs: &str, lean_shown: String, pingora_shown: String| {
                what.push(format!(
                    "  {what_differs}\n    lean:    {lean_shown}\n    pingora: {pingora_shown}"
                ));
            };
            if lean.client != pingora.client {
                differ("client read", escape(&lean.client), escape(&pingora.client));
            }
            if lean.closed != pingora.closed {
                differ(
                    "connection closed",
                    lean.closed.to_string(),
                    pingora.closed.to_string(),
                );
            }
            if lean.backend != pingora.backend {
                differ(
                    "backend received",
                    list(&lean.backend),
                    list(&pingora.backend),
                );
            }
            if lean.stray != pingora.stray {
                differ(
                    "backend stray bytes",
                    list(&lean.stray),
                    list(&pingora.stray),
                );
            }
            if !what.is_empty() {
                diffs.push(format!("- {}\n{}", case.name, what.join("\n")));
            }
        }
        assert!(
            diffs.is_empty(),
            "the engines differ on {} of {} cases:\n{}",
            diffs.len(),
            cases.len(),
            diffs.join("\n")
        );
    }
}

/// Every byte escaped, untruncated.
fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

fn list(messages: &[Vec<u8>]) -> String {
    let all: Vec<String> = messages.iter().map(|m| escape(m)).collect();
    format!("[{}]", all.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_backend_alike() {
    let many: String = (0..40)
        .map(|i| format!("X-Header-{i}: value {i}\r\n"))
        .collect();
    let cases = vec![
        one("plain GET", get("/", "")),
        one("HEAD", b"HEAD /head HTTP/1.1\r\nHost: tether\r\n\r\n"),
        one("GET with a query", get("/search?q=a%20b&x=1&x=2", "")),
        one(
            "header names in mixed case, odd spacing",
            get("/", "x-lower: a\r\nX-UPPER: b\r\nX-Tabs:\t c \t\r\n"),
        ),
        one("40 headers", get("/", &many)),
        one(
            "hop-by-hop headers",
            get(
                "/",
                "Connection: keep-alive, X-Foo\r\nX-Foo: 1\r\nKeep-Alive: timeout=5\r\n\
                 TE: trailers\r\nProxy-Connection: keep-alive\r\n",
            ),
        ),
        one(
            "X-Forwarded-For and -Proto from the client",
            get(
                "/",
                "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n\
                 X-Forwarded-Proto: https\r\n",
            ),
        ),
        one(
            "cookies",
            get("/", "Cookie: a=1; b=2\r\nCookie: connect.sid=s%3Aabc\r\n"),
        ),
        one("Connection: close", get("/", "Connection: close\r\n")),
    ];
    Pair::start().await.compare(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_reach_the_client_alike() {
    let cases = vec![
        one(
            "Content-Length (with the backend's keep-alive headers)",
            get("/cl", ""),
        ),
        one("chunked", get("/chunked", "")),
        one("204", get("/204", "")),
        one("304", get("/304", "")),
        one("103 Early Hints, then 200", get("/103", "")),
        one("Set-Cookie twice", get("/cookie", "")),
        one("503 from the backend", get("/503", "")),
        one(
            "HEAD with a Content-Length",
            b"HEAD /cl HTTP/1.1\r\nHost: tether\r\n\r\n",
        ),
    ];
    Pair::start().await.compare(&cases).await;
}

/// Where the engines differ on purpose, each correct: Pingora decodes a chunked body and encodes
/// it again (chunk extensions and trailers are dropped), and sends a close-delimited body chunked
/// on a kept-alive connection; the lean engine relays both as they came (a close-delimited body
/// then closes the client connection, as HAProxy does). The client reads the same body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_encoded_bodies_carry_the_same_content() {
    let pair = Pair::start().await;
    for (target, body) in [
        ("/chunked-ext", &b"hello world"[..]),
        ("/close", b"hello until close"),
    ] {
        let case = one("re-encoded", get(target, ""));
        let mut bodies = Vec::new();
        for (lb, backend) in &pair.engines {
            let seen = exchange(lb, backend, &case).await;
            let split = support::raw::split_responses(&seen.client, seen.closed, &[false]);
            let last = split.finals().last().map(|r| (r.status, r.body.clone()));
            bodies.push(last);
        }
        let want = Some((200, body.to_vec()));
        assert_eq!(bodies, vec![want.clone(), want], "{target}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_handled_alike() {
    let cases = vec![
        Case {
            name: "three pipelined GETs in one write",
            steps: vec![Step {
                send: [get("/p1", ""), get("/chunked", ""), get("/p3", "")].concat(),
                heads: vec![false; 3],
                finals: 3,
            }],
        },
        Case {
            name: "keep-alive reuse: three requests one after another",
            steps: vec![
                Step {
                    send: get("/a", ""),
                    heads: vec![false],
                    finals: 1,
                },
                Step {
                    send: get("/cl", ""),
                    heads: vec![false],
                    finals: 1,
                },
                Step {
                    send: get("/b", ""),
                    heads: vec![false],
                    finals: 1,
                },
            ],
        },
        Case {
            name: "HEAD, then GET on the same connection",
            steps: vec![Step {
                send: [
                    b"HEAD /h HTTP/1.1\r\nHost: tether\r\n\r\n".to_vec(),
                    get("/after-head", ""),
                ]
                .concat(),
                heads: vec![true, false],
                finals: 2,
            }],
        },
    ];
    Pair::start().await.compare(&cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tethers_own_answers_are_alike() {
    // Heads over max_request_header_bytes (64 KiB): mostly target (414), mostly headers (431).
    let long_target = format!("/{}", "t".repeat(70_000));
    let big_header = format!("X-Big: {}\r\n", "h".repeat(70_000));
    let cases = vec![
        one("oversized target (414)", get(&long_target, "")),
        one("oversized headers (431)", get("/", &big_header)),
    ];
    Pair::start().await.compare(&cases).await;

    // The backend refuses connections: tether's own 502/503.
    let cases = vec![
        one("backend down", get("/", "")),
        one(
            "backend down, HEAD",
            b"HEAD / HTTP/1.1\r\nHost: tether\r\n\r\n",
        ),
    ];
    Pair::start_with(true).await.compare(&cases).await;
}
