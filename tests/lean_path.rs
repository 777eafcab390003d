//! tether's lean HTTP/1 engine (src/engine/lean.rs), seen from raw sockets on both sides: every way a
//! backend may frame a response is relayed byte for byte, backend connections are reused only
//! when the message ended where its framing said, and requests the path does not take (a body,
//! for one) go through Pingora's proxy and the connection comes back.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use support::scenario::*;
use support::*;

/// What a [`Scripted`] backend received: per request, the connection it came on and its head.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(usize, String)>>>);

impl Seen {
    fn all(&self) -> Vec<(usize, String)> {
        self.0.lock().unwrap().clone()
    }
    fn connections(&self) -> usize {
        self.all().iter().map(|(c, _)| *c + 1).max().unwrap_or(0)
    }
}

/// One answer of a [`Scripted`] backend: pieces written one by one (each flushed, so that tether
/// reads them apart), then whether the backend closes the connection.
struct Answer {
    pieces: Vec<Vec<u8>>,
    close: bool,
    /// Waited for before the last piece goes out.
    gate: Option<Arc<Notify>>,
}

fn answer(pieces: &[&[u8]], close: bool) -> Answer {
    Answer {
        pieces: pieces.iter().map(|p| p.to_vec()).collect(),
        close,
        gate: None,
    }
}

/// A hand-written backend: reads request heads (and `Content-Length` bodies), answers each with
/// `script(request number, head)`.
async fn scripted(
    script: impl Fn(usize, &str) -> Answer + Send + Sync + 'static,
) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let table = format!(
        "[[backend]]\nid = \"raw\"\naddress = \"{}\"\n",
        listener.local_addr().unwrap()
    );
    let seen = Seen::default();
    let script = Arc::new(script);
    let log = seen.clone();
    tokio::spawn(async move {
        for conn in 0.. {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (script, log) = (script.clone(), log.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some((head, rest)) = read_message(&mut s, &mut buf).await else {
                        return;
                    };
                    buf = rest;
                    let n = {
                        let mut all = log.0.lock().unwrap();
                        all.push((conn, head.clone()));
                        all.len() - 1
                    };
                    let a = script(n, &head);
                    for (i, p) in a.pieces.iter().enumerate() {
                        if let Some(gate) = a.gate.as_ref().filter(|_| i + 1 == a.pieces.len()) {
                            gate.notified().await;
                        }
                        if s.write_all(p).await.is_err() {
                            return;
                        }
                        s.flush().await.unwrap();
                        // Separate segments, so that tether's reads see the pieces apart.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if a.close {
                        return;
                    }
                }
            });
        }
    });
    (table, seen)
}

/// One request off a backend connection: its head (with the body, if `Content-Length` says so)
/// and the bytes after it. `None` at EOF.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let rest = buf.split_off(end + 4 + len);
                let message = String::from_utf8_lossy(buf).into_owned();
                return Some((message, rest));
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn balancer(redis: &RedisServer, table: String) -> Balancer {
    Balancer::start(&config_with(
        &[table],
        Some(redis),
        "sources = [\"header:x-session-id\"]",
    ))
    .await
}

async fn connect(lb: &Balancer) -> TcpStream {
    TcpStream::connect(("127.0.0.1", lb.proxy_port()))
        .await
        .unwrap()
}

/// Read from `c` until `done(bytes so far)` holds; fails after 5 s or at EOF before.
async fn read_until(c: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !done(&got) {
            let n = c.read(&mut chunk).await.expect("read from tether");
            assert!(n > 0, "EOF: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {:?}", String::from_utf8_lossy(&got)));
    got
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: tether\r\nx-session-id: s1\r\n\r\n")
}

const CHUNKED_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Backend-Id: raw\r\n\r\n";
const CHUNKED_BODY: &[&[u8]] = &[
    b"5\r\nhel",
    b"lo\r\n6;x=1\r\n wor",
    b"ld\r\n0\r\nx-sum: 7\r\n",
    b"\r\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_split_anywhere_is_relayed_and_the_backend_connection_reused() {
    let redis = RedisServer::start();
    let (table, seen) = scripted(|_, _| {
        let mut pieces = vec![CHUNKED_HEAD];
        pieces.extend_from_slice(CHUNKED_BODY);
        answer(&pieces, false)
    })
    .await;
    let lb = balancer(&redis, table).await;
    let mut c = connect(&lb).await;
    for i in 0..3 {
        c.write_all(get(&format!("/chunked/{i}")).as_bytes())
            .await
            .unwrap();
        let got = read_until(&mut c, |b| b.ends_with(b"x-sum: 7\r\n\r\n")).await;
        let got = text(&got);
        let (head, body) = got.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{got}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("transfer-encoding: chunked"), "{got}");
        assert!(head.contains("connection: keep-alive"), "{got}");
        assert_eq!(body, text(&CHUNKED_BODY.concat()), "byte for byte");
    }
    // Three requests, one client connection, one backend connection.
    assert_eq!(seen.all().len(), 3);
    assert_eq!(seen.connections(), 1, "the backend connection is pooled");
    let h = &seen.all()[0].1.to_ascii_lowercase();
    assert!(h.contains("x-forwarded-for: 127.0.0.1\r\n"), "{h}");
    assert!(h.contains("x-forwarded-proto: http\r\n"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_without_length_runs_to_the_backend_close_and_closes_the_client() {
    let redis = RedisServer::start();
    let (table, seen) = scripted(|_, _| {
        answer(
            &[
                b"HTTP/1.1 200 OK\r\nX-Backend-Id: raw\r\n\r\nfirst part, ",
                b"second part",
            ],
            true,
        )
    })
    .await;
    let lb = balancer(&redis, table).await;
    let mut c = connect(&lb).await;
    c.write_all(get("/unframed").as_bytes()).await.unwrap();
    let got = read_until(&mut c, |b| b.ends_with(b"second part")).await;
    let got = text(&got);
    assert!(
        got.to_ascii_lowercase().contains("connection: close\r\n"),
        "{got}"
    );
    assert!(got.ends_with("\r\n\r\nfirst part, second part"), "{got}");
    assert!(
        eof_within(&mut c, Duration::from_secs(5)).await,
        "client closed"
    );
    // The next client gets a new backend connection.
    let mut c = connect(&lb).await;
    c.write_all(get("/unframed").as_bytes()).await.unwrap();
    read_until(&mut c, |b| b.ends_with(b"second part")).await;
    assert_eq!(seen.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_pipelined_requests_and_head_keep_their_order_and_framing() {
    let redis = RedisServer::start();
    let (table, seen) = scripted(|_, head| {
        if head.starts_with("HEAD") {
            // A HEAD answer announces a length and sends no body.
            return answer(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"], false);
        }
        let body = head.split_whitespace().nth(1).unwrap().to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n{body}",
            body.len()
        );
        answer(
            &[
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                resp.as_bytes(),
            ],
            false,
        )
    })
    .await;
    let lb = balancer(&redis, table).await;
    let mut c = connect(&lb).await;
    // Two GETs and a HEAD in one write.
    let pipelined = [
        get("/one"),
        get("/two"),
        "HEAD /three HTTP/1.1\r\nHost: tether\r\nx-session-id: s1\r\n\r\n".to_string(),
    ]
    .concat();
    c.write_all(pipelined.as_bytes()).await.unwrap();
    let got = read_until(&mut c, |b| {
        text(b).matches("HTTP/1.1 200").count() == 3 && b.ends_with(b"\r\n\r\n")
    })
    .await;
    let got = text(&got);
    let hints = got.matches("HTTP/1.1 103 Early Hints\r\n").count();
    assert_eq!(hints, 2, "each 103 relayed: {got}");
    let one = got.find("\r\n\r\n/one").expect("first body");
    let two = got.find("\r\n\r\n/two").expect("second body");
    assert!(one < two, "{got}");
    let lower = got.to_ascii_lowercase();
    assert!(
        !lower.contains("keep-alive: timeout"),
        "the backend's Keep-Alive is its own: {got}"
    );
    assert_eq!(lower.matches("connection: keep-alive").count(), 3, "{got}");
    assert!(
        lower.contains("content-length: 1000\r\n")
            && lower.ends_with("connection: keep-alive\r\n\r\n"),
        "a HEAD answer has no body: {got}"
    );
    // And the connection still serves.
    c.write_all(get("/four").as_bytes()).await.unwrap();
    read_until(&mut c, |b| b.ends_with(b"/four")).await;
    assert_eq!(seen.all().len(), 4);
    assert_eq!(seen.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_goes_through_pingora_and_the_connection_comes_back() {
    let redis = RedisServer::start();
    let (table, seen) = scripted(|_, message| {
        let body = message.split_once("\r\n\r\n").unwrap().1.to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        answer(&[resp.as_bytes()], false)
    })
    .await;
    let lb = balancer(&redis, table).await;
    let mut c = connect(&lb).await;
    let post = "POST /p HTTP/1.1\r\nHost: tether\r\nx-session-id: s1\r\nContent-Length: 11\r\n\r\nhello world";
    for _ in 0..2 {
        c.write_all(post.as_bytes()).await.unwrap();
        read_until(&mut c, |b| b.ends_with(b"hello world")).await;
        c.write_all(get("/after").as_bytes()).await.unwrap();
        let got = read_until(&mut c, |b| b.ends_with(b"\r\n\r\n")).await;
        assert!(text(&got).starts_with("HTTP/1.1 200"), "{}", text(&got));
    }
    let all = seen.all();
    assert_eq!(all.len(), 4);
    assert!(all[0].1.starts_with("POST /p") && all[0].1.ends_with("hello world"));
    assert!(all[1].1.starts_with("GET /after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_is_not_an_error() {
    let redis = RedisServer::start();
    // Every answer says keep-alive, then the backend closes the connection anyway (as one whose
    // idle timeout fired would).
    let (table, seen) =
        scripted(|_, _| answer(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], true)).await;
    let lb = balancer(&redis, table).await;
    let mut c = connect(&lb).await;
    for _ in 0..5 {
        c.write_all(get("/x").as_bytes()).await.unwrap();
        let got = read_until(&mut c, |b| b.ends_with(b"ok")).await;
        assert!(text(&got).starts_with("HTTP/1.1 200"), "{}", text(&got));
    }
    // Each request reached the backend exactly once, each on a connection of its own.
    assert_eq!(seen.all().len(), 5);
    assert_eq!(seen.connections(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ill_framed_responses_are_502_and_the_connection_is_not_reused() {
    let redis = RedisServer::start();
    let gate = Arc::new(Notify::new());
    let backend_gate = gate.clone();
    let (table, seen) = scripted(move |n, _| match n {
        0 => answer(
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"],
            false,
        ),
        1 => answer(
            &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
            false,
        ),
        // The bad chunk comes once the client has the head.
        2 => Answer {
            gate: Some(backend_gate.clone()),
            ..answer(
                &[
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                    b"zz\r\n",
                ],
                false,
            )
        },
        _ => answer(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], false),
    })
    .await;
    let lb = balancer(&redis, table).await;
    // Conflicting lengths, and a bad first chunk: nothing went out yet, so tether answers.
    for path in ["/conflicting-length", "/bad-first-chunk"] {
        let mut c = connect(&lb).await;
        c.write_all(get(path).as_bytes()).await.unwrap();
        let got = text(&read_until(&mut c, |b| b.ends_with(b"502 Bad Gateway\n")).await);
        assert!(got.starts_with("HTTP/1.1 502"), "{path}: {got}");
        assert!(
            got.to_ascii_lowercase().contains("connection: close"),
            "{got}"
        );
        assert!(eof_within(&mut c, Duration::from_secs(5)).await);
    }

    // A bad chunk after the head went out: the client connection is cut.
    let mut c = connect(&lb).await;
    c.write_all(get("/bad-later-chunk").as_bytes())
        .await
        .unwrap();
    let got = text(&read_until(&mut c, |b| b.ends_with(b"abc\r\n")).await);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    gate.notify_one();
    assert!(
        eof_within(&mut c, Duration::from_secs(5)).await,
        "cut short"
    );

    let mut c = connect(&lb).await;
    c.write_all(get("/fine").as_bytes()).await.unwrap();
    read_until(&mut c, |b| b.ends_with(b"ok")).await;
    assert_eq!(seen.connections(), 4, "no bad connection was pooled");
    let metrics = lb.metrics().await;
    assert!(
        metrics.contains("tether_upstream_errors_total{backend=\"raw\",kind=\"protocol\"} 3"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("upstream_errors"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
