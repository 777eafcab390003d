//! Active HTTP health checks: the `[health]` section at work.
//!
//! [`run`] is one background task on the I/O runtime. It follows the live configuration (read
//! again every second and by every check, so a reload that adds backends or adds, changes or
//! removes `[health]` applies) and keeps one checking task per configured backend. A check is a
//! fresh connection to the backend (TCP, or TLS for a `tls = true` backend, never through the
//! proxy's connection pool) with
//! `GET {path}` on it; it succeeds if the response head arrives within `timeout` (connect
//! included) with the expected status. The body is never read. Results go to
//! [`Backend::record_check`], which applies rise/fall, and to `tether_health_checks_total`.
//!
//! This module owns when and how backends are probed. It does not decide what a down backend
//! means for routing (see [`crate::selection`] and [`crate::routing`]: no new sessions, pins move
//! with reason `down`), nor passive ejection (see [`crate::backend`]), nor the `tether_backend_up`
//! gauge (computed by [`crate::admin`] at scrape).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use pingora::upstreams::peer::HttpPeer;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::backend::Backend;
use crate::config::HealthSettings;
use crate::metrics::Metrics;
use crate::state::{Live, State};
use crate::upstream::{self, ConnectError};

/// How often [`run`] looks at the live configuration for backends to start or stop checking, and
/// whether `[health]` is there at all.
pub const CONFIG_POLL: Duration = Duration::from_secs(1);

/// The `User-Agent` of every check, so backends can tell checks from traffic in their logs.
pub const CHECK_USER_AGENT: &str = "tether-health-check";

/// Why one check failed. The `Display` form is the `reason` field of the "backend down" log line.
#[derive(Debug, thiserror::Error)]
pub enum CheckFailure {
    /// The connection (and TLS handshake) was not established within the check's timeout.
    #[error("timeout: not connected within {0:?}")]
    ConnectTimeout(Duration),
    /// Connected, but no complete response head arrived within the check's timeout
    /// (connecting included).
    #[error("timeout: no response head within {0:?}")]
    ResponseTimeout(Duration),
    /// The connection was refused or failed (nothing listens there, or unreachable), or its TLS
    /// handshake failed (a certificate the backend's CAs do not verify, say).
    #[error("connect error: {0}")]
    Connect(ConnectError),
    /// The backend closed the connection early or did not answer with valid HTTP/1.x.
    #[error("bad response: {0}")]
    Http(hyper::Error),
    /// A valid response with another status than `[health] expected_status`.
    #[error("status {found} (expected {expected})")]
    Status { found: u16, expected: u16 },
    /// `[health] path` or the Host header cannot form a request. Config validation rules this
    /// out; kept as a failure rather than a panic.
    #[error("cannot build the check request: {0} (check [health] path and host)")]
    Request(http::Error),
}

/// Check every configured backend while `[health]` is configured; forever.
///
/// Checks of different backends run concurrently, one task each, so one in flight per backend at
/// most. The first checks of the backends started together are spread over one interval, so that
/// N backends are not all probed at the same instant. Without `[health]` this only watches the
/// configuration (every [`CONFIG_POLL`]); when a reload removes `[health]`, checks stop and every
/// backend counts as healthy again.
pub async fn run(state: Arc<State>) {
    supervise(state).instrument(info_span!("health")).await
}

async fn supervise(state: Arc<State>) {
    let mut checkers = Checkers::default();
    let mut poll = tokio::time::interval(CONFIG_POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // `None` until the first look at the configuration, so the first state is logged.
    let mut enabled: Option<bool> = None;
    loop {
        poll.tick().await;
        let live = state.live_full();
        match &live.config.health {
            Some(settings) => {
                if enabled != Some(true) {
                    info!(
                        path = %settings.path,
                        interval = ?settings.interval,
                        timeout = ?settings.timeout,
                        rise = settings.rise,
                        fall = settings.fall,
                        backends = live.backends.all().len(),
                        "active health checks on"
                    );
                }
                checkers.sync(&state, &live, settings.interval);
                enabled = Some(true);
            }
            None => {
                let turned_off = enabled == Some(true);
                if turned_off {
                    checkers.stop_all();
                    info!("active health checks off: every backend counts as healthy");
                }
                mark_all_healthy(&live, turned_off);
                enabled = Some(false);
            }
        }
    }
}

/// The checking tasks, one per backend of the live set.
#[derive(Default)]
struct Checkers {
    tasks: JoinSet<()>,
    /// By backend [`identity`]: a reload keeps the same `Arc` for a backend whose id and address
    /// are unchanged (and so keeps its task and its rise/fall streak), and builds a new one
    /// otherwise.
    by_backend: HashMap<usize, (Arc<Backend>, AbortHandle)>,
}

/// The identity of one live backend: the address of its allocation. The `Arc` that
/// [`Checkers`] keeps next to it holds the allocation, so no other backend can get the same
/// address while the entry exists. (A `usize`, not the raw pointer, so that `run` stays `Send`.)
fn identity(backend: &Arc<Backend>) -> usize {
    Arc::as_ptr(backend) as usize
}

impl Checkers {
    /// Stop checking backends that left the live set, start checking the new ones.
    fn sync(&mut self, state: &Arc<State>, live: &Live, interval: Duration) {
        let current: Vec<usize> = live.backends.all().iter().map(identity).collect();
        self.by_backend.retain(|ptr, (_, task)| {
            let keep = current.contains(ptr) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        // Reap what finished or was aborted, so the set does not grow over reloads.
        while self.tasks.try_join_next().is_some() {}

        let new: Vec<&Arc<Backend>> = live
            .backends
            .all()
            .iter()
            .filter(|b| !self.by_backend.contains_key(&identity(b)))
            .collect();
        let n = new.len();
        for (i, backend) in new.into_iter().enumerate() {
            // Spawned tasks do not inherit the span: give them `health`'s.
            let task = self.tasks.spawn(
                check_loop(state.clone(), backend.clone(), stagger(interval, i, n))
                    .instrument(Span::current()),
            );
            self.by_backend
                .insert(identity(backend), (backend.clone(), task));
        }
    }

    fn stop_all(&mut self) {
        self.by_backend.clear();
        self.tasks.abort_all();
    }
}

/// Without `[health]`, nothing can bring a down backend back: mark every backend healthy. With
/// `reset_streaks` (checks were just turned off) also on the healthy ones, which clears their
/// failure streaks, so that turning checks on again starts from a clean count.
fn mark_all_healthy(live: &Live, reset_streaks: bool) {
    for b in live.backends.all() {
        if (reset_streaks || !b.is_healthy()) && b.reset_health() {
            info!(
                backend = %b.id,
                address = %b.address_text,
                "backend up again: health checks are off"
            );
        }
    }
}

/// When the `i`-th of `n` backends started together has its first check: `i/n` of an interval.
fn stagger(interval: Duration, i: usize, n: usize) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    let nanos = interval.as_nanos() * i as u128 / n as u128;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Check `backend` every interval until the task is aborted (backend removed, `[health]` gone).
async fn check_loop(state: Arc<State>, backend: Arc<Backend>, first: Duration) {
    tokio::time::sleep(first).await;
    let m = Metrics::get();
    let ok = m.health_checks.with_label_values(&[&*backend.id, "ok"]);
    let failed = m.health_checks.with_label_values(&[&*backend.id, "failed"]);
    loop {
        let started = Instant::now();
        // Read per round: a reload may have changed the settings (or removed them; `run` then
        // aborts this task at its next look).
        let Some(settings) = state.live().config.health.clone() else {
            return;
        };
        let host = settings.host.as_deref().unwrap_or(&backend.address_text);
        let result = check(&backend.current_peer().peer, host, &settings).await;
        match &result {
            Ok(()) => ok.inc(),
            Err(_) => failed.inc(),
        }
        match (
            backend.record_check(result.is_ok(), settings.rise, settings.fall),
            &result,
        ) {
            (Some(false), Err(reason)) => warn!(
                backend = %backend.id,
                address = %backend.address_text,
                %reason,
                fall = settings.fall,
                "backend down: failing health checks"
            ),
            (Some(true), _) => info!(
                backend = %backend.id,
                address = %backend.address_text,
                rise = settings.rise,
                "backend up again"
            ),
            (_, Err(reason)) => debug!(backend = %backend.id, %reason, "health check failed"),
            (_, Ok(())) => {}
        }
        tokio::time::sleep_until(started + settings.interval).await;
    }
}

/// One check of the backend `peer`: a new connection, `GET {path}` with `Host: {host}`, and
/// the response head within `settings.timeout` (connecting included) with the expected status.
/// The body is not read: the connection is closed as soon as the head is in.
pub async fn check(
    peer: &HttpPeer,
    host: &str,
    settings: &HealthSettings,
) -> Result<(), CheckFailure> {
    let req = Request::get(settings.path.as_str())
        .header(HOST, host)
        .header(USER_AGENT, CHECK_USER_AGENT)
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(CheckFailure::Request)?;
    let mut connected = false;
    let attempt = tokio::time::timeout(settings.timeout, async {
        let stream = upstream::connect(peer)
            .await
            .map_err(CheckFailure::Connect)?;
        connected = true;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(CheckFailure::Http)?;
        let head = sender.send_request(req);
        tokio::pin!(conn, head);
        // The connection future does the I/O; the head arrives through `head`.
        let response = tokio::select! {
            biased;
            r = &mut head => r,
            // The connection ended first: the head may still have been handed over before it
            // did, and if not, the connection's own error says more than "canceled".
            ended = &mut conn => match head.await {
                Ok(r) => Ok(r),
                Err(e) => Err(ended.err().unwrap_or(e)),
            },
        }
        .map_err(CheckFailure::Http)?;
        let found = response.status().as_u16();
        if found == settings.expected_status {
            Ok(())
        } else {
            Err(CheckFailure::Status {
                found,
                expected: settings.expected_status,
            })
        }
    })
    .await;
    match attempt {
        Ok(result) => result,
        Err(_elapsed) if connected => Err(CheckFailure::ResponseTimeout(settings.timeout)),
        Err(_elapsed) => Err(CheckFailure::ConnectTimeout(settings.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Config;

    fn settings(expected_status: u16, timeout_ms: u64) -> HealthSettings {
        HealthSettings {
            path: "/healthz?deep=1".into(),
            host: None,
            expected_status,
            interval: Duration::from_millis(timeout_ms.max(100)),
            timeout: Duration::from_millis(timeout_ms),
            rise: 1,
            fall: 1,
        }
    }

    /// A one-shot server: accepts one connection, reads the request head, answers `response`
    /// (and keeps the socket open for a while), and hands the head it read back.
    async fn answer_once(response: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed before a whole head");
                head.extend_from_slice(&buf[..n]);
            }
            sock.write_all(response.as_bytes()).await.unwrap();
            // Hold the socket: a check must not wait for the body or the close.
            tokio::time::sleep(Duration::from_secs(5)).await;
            String::from_utf8(head).unwrap()
        });
        (addr, task)
    }

    fn plain(addr: SocketAddr) -> HttpPeer {
        HttpPeer::new(addr, false, String::new())
    }

    #[tokio::test]
    async fn a_check_sends_one_get_and_reads_only_the_head() {
        // The body is announced but never sent: the check must still succeed at once.
        let (addr, server) =
            answer_once("HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\npartial").await;
        let started = std::time::Instant::now();
        check(&plain(addr), "app.internal", &settings(200, 2_000))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        server.abort();
        let _ = server.await;

        // Now look at what was sent.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(head).unwrap().to_ascii_lowercase()
        });
        check(&plain(addr), "app.internal", &settings(200, 2_000))
            .await
            .unwrap();
        let head = sent.await.unwrap();
        assert!(
            head.starts_with("get /healthz?deep=1 http/1.1\r\n"),
            "{head}"
        );
        for line in [
            "host: app.internal\r\n",
            "user-agent: tether-health-check\r\n",
            "connection: close\r\n",
        ] {
            assert!(head.contains(line), "{line:?} missing from {head:?}");
        }
    }

    #[tokio::test]
    async fn another_status_fails() {
        let (addr, _server) =
            answer_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        let err = check(&plain(addr), "h", &settings(200, 2_000))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            CheckFailure::Status {
                found: 503,
                expected: 200
            }
        ));
        assert_eq!(err.to_string(), "status 503 (expected 200)");

        // The expected status is the configured one, not "any 2xx".
        let (addr, _server) = answer_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let err = check(&plain(addr), "h", &settings(204, 2_000))
            .await
            .unwrap_err();
        assert!(matches!(err, CheckFailure::Status { found: 200, .. }));
    }

    #[tokio::test]
    async fn a_refused_connection_fails_as_a_connect_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let err = check(&plain(addr), "h", &settings(200, 2_000))
            .await
            .unwrap_err();
        assert!(matches!(err, CheckFailure::Connect(_)), "{err}");
        assert!(err.to_string().starts_with("connect error: "), "{err}");
    }

    #[tokio::test]
    async fn a_silent_backend_fails_by_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let started = std::time::Instant::now();
        let err = check(&plain(addr), "h", &settings(200, 150))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, CheckFailure::ResponseTimeout(_)), "{err}");
        assert!(err.to_string().starts_with("timeout: "), "{err}");
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_bad_response() {
        let (addr, _server) = answer_once("SSH-2.0-OpenSSH\r\n\r\n").await;
        let err = check(&plain(addr), "h", &settings(200, 2_000))
            .await
            .unwrap_err();
        assert!(matches!(err, CheckFailure::Http(_)), "{err}");
    }

    #[test]
    fn first_checks_are_spread_over_one_interval() {
        let i = Duration::from_millis(1_000);
        let firsts: Vec<_> = (0..4).map(|k| stagger(i, k, 4)).collect();
        assert_eq!(
            firsts,
            [0, 250, 500, 750].map(Duration::from_millis).to_vec()
        );
        assert_eq!(stagger(i, 0, 1), Duration::ZERO);
        assert_eq!(stagger(i, 0, 0), Duration::ZERO);
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `run` against a backend that refuses connections: down with checks on, and up again when
    /// a reload removes `[health]`; then up and down again when a reload brings it back.
    #[tokio::test]
    async fn run_follows_reloads_of_the_health_section() {
        let refused = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let base = format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n[affinity]\nsources = [\"ip\"]\n\
             [[backend]]\nid = \"gone\"\naddress = \"{refused}\"\n"
        );
        let with_health =
            format!("{base}[health]\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1\nfall = 2\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, &with_health).unwrap();
        let config = Config::parse(Path::new("t"), &with_health, &Default::default()).unwrap();
        let state = Arc::new(State::build(config, &path).await.unwrap());
        let backend = state.live().backends.all()[0].clone();
        let task = tokio::spawn(run(state.clone()));

        eventually("down after failed checks", || !backend.is_healthy()).await;

        std::fs::write(&path, &base).unwrap();
        state.reload().await.unwrap();
        eventually("up without [health]", || backend.is_healthy()).await;

        std::fs::write(&path, &with_health).unwrap();
        state.reload().await.unwrap();
        // Same id and address: the reload kept the backend (and its task is started anew).
        assert!(Arc::ptr_eq(&backend, &state.live().backends.all()[0]));
        eventually("down again", || !backend.is_healthy()).await;
        task.abort();
    }
}
