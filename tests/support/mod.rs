//! Integration-test harness: a real `redis-server`, in-process HTTP backends and the real `tether`
//! binary, each owning a temp dir and cleaning up on `Drop` (kill, then wait).
//!
//! Use it from a test file with `mod support;`. Rules this module follows, so that tests can too:
//! - no fixed ports: Redis listens on a unix socket only (`--port 0`), backends bind
//!   `127.0.0.1:0`, tether gets ports found by binding port 0 and dropping the listener (and is
//!   restarted once on fresh ports if it loses that race);
//! - no sleep-and-hope: everything that waits polls a condition until a deadline
//!   ([`eventually`], [`eventually_blocking`], [`assert_eventually!`]) and panics with the
//!   evidence (log tails) when the deadline passes;
//! - no global state: no tracing subscriber, no shared servers; each test builds its own.
//!
//! It does not own the tests' config: [`Balancer::start`] takes the TOML body (everything but
//! `[server]` and `[admin]`, which the harness writes) so each test says what it runs.
#![allow(dead_code)]

pub mod faulty;
pub mod raw;
pub mod rideshare;
pub mod scenario;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{ErrorKind, Read as _};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// How often the polling helpers re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Deadline for `redis-server` to answer PING after a (re)start.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline for tether to be ready (`/readyz` 200 and the proxy port accepting).
pub const BALANCER_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Deadline for tether to exit after SIGINT before it gets SIGKILL.
pub const BALANCER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times tether is started on fixed ports when its log says a port is in use.
const SAME_PORT_ATTEMPTS: u32 = 3;
/// Pause between those attempts.
const SAME_PORT_BACKOFF: Duration = Duration::from_millis(500);

/// How long [`Backend::restart`] retries binding its old port.
pub const BACKEND_REBIND_TIMEOUT: Duration = Duration::from_secs(5);

const REDIS_MISSING: &str = "redis-server not found: install it with `sudo apt-get install -y \
                             redis-server` (tests start their own server on a unix socket)";

// ---------------------------------------------------------------------------------------------
// Polling helpers
// ---------------------------------------------------------------------------------------------

/// Polls the async condition every [`POLL_INTERVAL`] until it is true (returns `true`) or
/// `timeout` has passed (returns `false`). The condition is always evaluated at least once, and
/// once more at the deadline.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether the peer closes `s` (EOF or an error) within `timeout`; whatever else it sends
/// meanwhile is read and dropped.
pub async fn eof_within(s: &mut tokio::net::TcpStream, timeout: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(timeout, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// [`eventually`] for synchronous conditions outside (or deliberately blocking) a runtime.
pub fn eventually_blocking(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Asserts that a condition becomes true before a deadline, re-evaluating it every 20 ms (like
/// linkerd's `assert_eventually!`). For async tests: the condition may contain `.await`.
///
/// ```ignore
/// assert_eventually!(Duration::from_secs(5), backend.requests() == 3);
/// assert_eventually!(Duration::from_secs(5), get_backend(&c, &url, &[]).await.0 == 200, "url {url}");
/// ```
#[allow(unused_macros)] // not every test file uses it
macro_rules! assert_eventually {
    (@run $timeout:expr, $cond:expr, $msg:expr) => {{
        let timeout: ::std::time::Duration = $timeout;
        let deadline = ::std::time::Instant::now() + timeout;
        loop {
            if $cond {
                break;
            }
            if ::std::time::Instant::now() >= deadline {
                panic!(
                    "condition `{}` still false after {:?}{}",
                    stringify!($cond),
                    timeout,
                    $msg
                );
            }
            ::tokio::time::sleep($crate::support::POLL_INTERVAL).await;
        }
    }};
    ($timeout:expr, $cond:expr $(,)?) => {
        $crate::support::assert_eventually!(@run $timeout, $cond, "")
    };
    ($timeout:expr, $cond:expr, $($arg:tt)+) => {
        $crate::support::assert_eventually!(
            @run $timeout,
            $cond,
            ::std::format!(": {}", ::std::format_args!($($arg)+))
        )
    };
}
#[allow(unused_imports)]
pub(crate) use assert_eventually;

/// Bind `addr` again after a server on it was killed, retrying for up to
/// [`BACKEND_REBIND_TIMEOUT`] while the old sockets go away; `who` names the server in a panic.
/// Non-blocking, ready for any runtime's `TcpListener::from_std`.
pub async fn bind_again(addr: SocketAddr, who: &str) -> StdTcpListener {
    let deadline = Instant::now() + BACKEND_REBIND_TIMEOUT;
    let listener = loop {
        match StdTcpListener::bind(addr) {
            Ok(l) => break l,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(POLL_INTERVAL).await,
            Err(e) => panic!("{who}: rebinding {addr} for {BACKEND_REBIND_TIMEOUT:?}: {e}"),
        }
    };
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    listener
}

/// A free TCP port on 127.0.0.1, found by binding port 0 and dropping the listener. Another
/// process can take it before the caller binds it: callers that spawn a server on it must be
/// ready to retry (as [`Balancer::start`] is). Never the same port twice in one test process:
/// the kernel hands a just-released port out again now and then, so two tests running side by
/// side could both be given it before either server bound it; the loser's client then reached
/// the winner's tether (seen in tests/conformance.rs, whose four tests start some 400 proxies
/// side by side).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = StdTcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("binding 127.0.0.1:0 to find a free port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Two different free ports (see [`free_port`]).
pub fn two_free_ports() -> (u16, u16) {
    let first = free_port();
    loop {
        let second = free_port();
        if second != first {
            return (first, second);
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A process's resident memory in bytes (`VmRSS` of /proc/PID/status).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// The file's contents, or a note saying why it could not be read (for panic messages).
fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Sends `signal` to `pid` (a child we spawned and have not reaped yet).
fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions. The pid is our own unreaped child, so
    // it cannot have been recycled for another process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // ESRCH: already gone (e.g. exited on its own); waiting will reap it.
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ESRCH),
            "kill({pid}, {signal}): {err}"
        );
    }
}

/// SIGKILL, then reap. Returns the exit status, if there was a process.
fn kill_child(child: &mut Option<Child>) -> Option<ExitStatus> {
    let mut c = child.take()?;
    if let Ok(Some(status)) = c.try_wait() {
        return Some(status);
    }
    send_signal(c.id(), libc::SIGKILL);
    c.wait().ok()
}

// ---------------------------------------------------------------------------------------------
// RedisServer
// ---------------------------------------------------------------------------------------------

/// A private `redis-server` on a unix socket in its own temp dir: no TCP port, no persistence.
/// [`RedisServer::start_with`] adds a password, ACL users, a plain TCP port or a TLS port.
pub struct RedisServer {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    options: RedisOptions,
    /// `--port` when [`RedisOptions::tcp`] (else 0: no TCP listener).
    tcp_port: Option<u16>,
    /// `--tls-port` when [`RedisOptions::tls`].
    tls_port: Option<u16>,
    // Last, so it is removed after the process is gone.
    dir: TempDir,
}

/// What [`RedisServer::start_with`] starts beyond the default unix-socket server.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `--requirepass`: the default user needs this password. The harness's own connections
    /// ([`RedisServer::url`], [`RedisServer::conn`]) send it.
    pub password: Option<String>,
    /// ACL users `(name, password)` with every right (`--user NAME on >PASSWORD ~* &* +@all`).
    pub users: Vec<(String, String)>,
    /// Also listen on plain TCP, on a free loopback port ([`RedisServer::tcp_port`]).
    pub tcp: bool,
    /// Serve TLS on a free loopback port ([`RedisServer::tls_port`]) with a server certificate
    /// for `127.0.0.1` and `localhost`, signed by a CA made in the temp dir
    /// ([`RedisServer::ca_file`]); clients need no certificate (`--tls-auth-clients no`). The
    /// unix socket stays plain.
    pub tls: bool,
}

/// How many times a server with TCP ports is started on fresh ports when a port was taken.
const REDIS_PORT_ATTEMPTS: u32 = 3;

impl RedisServer {
    /// Starts `redis-server` and waits (10 s) until it answers PING. Panics if `redis-server` is
    /// not installed, or with the tail of its log if it does not come up.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// [`RedisServer::start`] with a password, users, TCP or TLS. Ports are found by binding
    /// port 0; if redis-server loses that race it is started again on fresh ports.
    pub fn start_with(options: RedisOptions) -> Self {
        // A short prefix keeps the socket path well under the 108-byte sun_path limit.
        let dir = tempfile::Builder::new()
            .prefix("tether-redis-")
            .tempdir()
            .expect("creating a temp dir for redis-server");
        let socket = dir.path().join("redis.sock");
        let log = dir.path().join("redis.log");
        let mut server = RedisServer {
            child: None,
            socket,
            log,
            options,
            tcp_port: None,
            tls_port: None,
            dir,
        };
        if server.options.tls {
            server.write_certificates();
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.tcp_port = server.options.tcp.then(free_port);
            server.tls_port = server.options.tls.then(free_port);
            match server.try_spawn() {
                Ok(()) => return server,
                Err(e)
                    if attempt < REDIS_PORT_ATTEMPTS
                        && (server.tcp_port.is_some() || server.tls_port.is_some())
                        && server.log().contains("Address already in use") =>
                {
                    eprintln!("redis-server lost a port race, retrying on fresh ports: {e}");
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// A CA and a server certificate (for 127.0.0.1 and localhost) signed by it, as PEM files in
    /// the temp dir: `ca.pem`, `server.pem`, `server.key`.
    fn write_certificates(&self) {
        let (ca_pem, issuer) = test_ca("tether test CA");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("valid subject alt names");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "redis-server");
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let key = rcgen::KeyPair::generate().expect("generating the server key");
        let cert = params
            .signed_by(&key, &issuer)
            .expect("signing the server certificate");
        let write = |name: &str, text: String| {
            let path = self.dir.path().join(name);
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        };
        write("ca.pem", ca_pem);
        write("server.pem", cert.pem());
        write("server.key", key.serialize_pem());
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis-server is already running");
        // Anything redis prints before it opens its log file (bad arguments) lands here.
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.stderr"))
            .expect("creating redis.stderr");
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&self.socket)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        if let Some(port) = self.tcp_port {
            // After the `--port 0` above: the last one wins.
            cmd.arg("--port").arg(port.to_string());
        }
        if self.tcp_port.is_some() || self.tls_port.is_some() {
            cmd.arg("--bind").arg("127.0.0.1");
        }
        if let Some(port) = self.tls_port {
            let file = |name: &str| self.dir.path().join(name);
            cmd.arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(file("server.pem"))
                .arg("--tls-key-file")
                .arg(file("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(file("ca.pem"))
                .arg("--tls-auth-clients")
                .arg("no");
        }
        if let Some(password) = &self.options.password {
            cmd.arg("--requirepass").arg(password);
        }
        for (user, password) in &self.options.users {
            cmd.arg("--user")
                .arg(user)
                .arg("on")
                .arg(format!(">{password}"))
                .args(["~*", "&*", "+@all"]);
        }
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!("{REDIS_MISSING}"),
            Err(e) => panic!("spawning redis-server: {e}"),
        };
        self.child = Some(child);
        self.try_wait_ready()
    }

    fn try_wait_ready(&mut self) -> Result<(), String> {
        let url = self.url();
        let mut last_err = String::from("not tried");
        let ready = eventually_blocking(REDIS_START_TIMEOUT, || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                last_err = format!("redis-server exited: {status}");
                return true; // stop polling; reported below
            }
            match ping(&url) {
                Ok(()) => true,
                Err(e) => {
                    last_err = e.to_string();
                    false
                }
            }
        });
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if !ready || exited.is_some() {
            kill_child(&mut self.child);
            return Err(format!(
                "redis-server on {url} did not answer PING within {REDIS_START_TIMEOUT:?} \
                 (last error: {last_err})\n--- redis.log (tail) ---\n{}\n--- stderr ---\n{}",
                tail(&read_lossy(&self.log), 40),
                tail(&read_lossy(&self.dir.path().join("redis.stderr")), 20),
            ));
        }
        Ok(())
    }

    /// `redis+unix:///…/redis.sock`: the form redis-rs 1.8 parses for unix sockets. Without a
    /// password it has no query (callers add `?protocol=resp3` or `?db=` themselves); with
    /// [`RedisOptions::password`] it ends in `?pass=<password>` (add more with `&`).
    pub fn url(&self) -> String {
        match &self.options.password {
            None => format!("redis+unix://{}", self.socket.display()),
            Some(p) => format!("redis+unix://{}?pass={p}", self.socket.display()),
        }
    }

    /// The plain TCP port ([`RedisOptions::tcp`]).
    pub fn tcp_port(&self) -> Option<u16> {
        self.tcp_port
    }

    /// The TLS port ([`RedisOptions::tls`]).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The CA certificate (PEM) that signed the TLS server certificate ([`RedisOptions::tls`]).
    pub fn ca_file(&self) -> PathBuf {
        assert!(
            self.options.tls,
            "ca_file: the server was started without TLS"
        );
        self.dir.path().join("ca.pem")
    }

    /// The options this server was started with.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// The unix socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// A new synchronous connection. Panics if the server is not reachable.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    /// The process id. Panics if the server is not running (after [`RedisServer::kill`]).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("redis-server is not running")
            .id()
    }

    /// Whether the process is running (started and not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL and reap; removes the socket file (redis cannot on SIGKILL), so a connect fails
    /// at once with "no such file" rather than "connection refused".
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("removing {}: {e}", self.socket.display()),
        }
    }

    /// Kills the server if it runs, then starts a new one on the same socket path (empty data:
    /// nothing is persisted) and waits until it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The whole Redis log (all runs).
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// A new self-signed CA: its certificate (PEM) and the issuer that signs with it.
pub fn test_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("generating the CA key");
    let cert = params.self_signed(&key).expect("self-signing the CA");
    (cert.pem(), rcgen::Issuer::new(params, key))
}

fn ping(url: &str) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let pong: String = redis::cmd("PING").query(&mut conn)?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "unexpected PING reply",
            pong,
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

/// One request as a [`Backend`] saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct BackendState {
    /// Every request except `/healthz` (tether's health checks would make counts racy).
    requests: Mutex<Vec<RecordedRequest>>,
    health_checks: Mutex<u64>,
    unhealthy: AtomicBool,
}

/// A tiny HTTP/1.1 server on `127.0.0.1:0`, run on the test's tokio runtime (use
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`, so it keeps serving while the
/// test blocks on something).
///
/// Every response is 200 with header `x-backend-id: <id>` and body `<id>`, except:
/// - `GET /set-cookie?name=N&value=V` also sets `Set-Cookie: N=V; Path=/; HttpOnly` (the query
///   is split on `&` and `=`, not percent-decoded);
/// - `/healthz` answers 200, or 503 after [`Backend::set_healthy`]`(false)`; health checks are
///   counted apart ([`Backend::health_checks`]) and not recorded with the other requests;
/// - `GET /ws` with `Upgrade: websocket` becomes a WebSocket that echoes text as `<id>:<text>`;
/// - `/socket.io/?EIO=4...` imitates Engine.IO polling: a handshake opens sid `<id>-<n>`, a sid
///   from another backend gets 400 `Session ID unknown`.
pub struct Backend {
    id: String,
    addr: SocketAddr,
    state: Arc<BackendState>,
    /// The accept loop. It owns a `JoinSet` of the connection tasks, so aborting it (and so
    /// dropping that set) aborts every open connection too.
    server: Option<JoinHandle<()>>,
}

impl Backend {
    /// Binds `127.0.0.1:0` and serves.
    pub async fn start(id: &str) -> Self {
        Self::start_serving(id, None).await
    }

    /// Binds `127.0.0.1:0` and serves HTTPS (HTTP/1.1 over TLS) with `tls`'s certificate.
    pub async fn start_tls(id: &str, tls: Arc<rustls::ServerConfig>) -> Self {
        Self::start_serving(id, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_serving(id: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("backend local_addr");
        let state = Arc::new(BackendState::default());
        let server = Some(tokio::spawn(serve(
            listener,
            tls,
            id.to_owned(),
            state.clone(),
        )));
        Backend {
            id: id.to_owned(),
            addr,
            state,
            server,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as a tether `address`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// A `[[backend]]` table for this backend, for tether configs.
    pub fn toml(&self) -> String {
        format!(
            "[[backend]]\nid = \"{}\"\naddress = \"{}\"\n",
            self.id, self.addr
        )
    }

    /// Requests served so far, not counting `/healthz`.
    pub fn requests(&self) -> usize {
        self.state
            .requests
            .lock()
            .expect("backend state lock")
            .len()
    }

    /// Every recorded request (not `/healthz`), oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .expect("backend state lock")
            .clone()
    }

    /// The headers of the last recorded request (not `/healthz`). Panics if there was none.
    pub fn last_headers(&self) -> HeaderMap {
        self.state
            .requests
            .lock()
            .expect("backend state lock")
            .last()
            .unwrap_or_else(|| panic!("backend {} has recorded no request yet", self.id))
            .headers
            .clone()
    }

    /// Forgets the recorded requests and health checks.
    pub fn clear(&self) {
        self.state
            .requests
            .lock()
            .expect("backend state lock")
            .clear();
        *self.state.health_checks.lock().expect("backend state lock") = 0;
    }

    /// `/healthz` requests served so far.
    pub fn health_checks(&self) -> u64 {
        *self.state.health_checks.lock().expect("backend state lock")
    }

    /// Makes `/healthz` answer 200 (`true`, the default) or 503 (`false`); other routes still
    /// answer 200.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.unhealthy.store(!healthy, Ordering::SeqCst);
    }

    /// Whether the server is running (started and not killed).
    pub fn is_running(&self) -> bool {
        self.server.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Stops accepting and aborts every open connection, pooled keep-alive ones included: the
    /// port then refuses connections. Abort takes effect at the tasks' next poll (at once on an
    /// idle runtime); poll for the refusal if it matters, or use [`Backend::kill_and_wait`].
    pub fn kill(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
    }

    /// [`Backend::kill`], then waits until the listener and connections are dropped.
    pub async fn kill_and_wait(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Binds the same address again (retrying for up to 5 s) and serves, with the same id and
    /// recorded requests. Kills the running server first, if any.
    pub async fn restart(&mut self) {
        self.kill_and_wait().await;
        let listener = TcpListener::from_std(bind_again(self.addr, &self.id).await)
            .expect("registering the listener");
        self.server = Some(tokio::spawn(serve(
            listener,
            None,
            self.id.clone(),
            self.state.clone(),
        )));
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    id: String,
    state: Arc<BackendState>,
) {
    // Dropped with this future when the task is aborted: that aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let id = id.clone();
                let state = state.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    match tls {
                        None => serve_connection(stream, id, state).await,
                        // A failed handshake (a client that does not trust the certificate)
                        // ends the connection, like any HTTPS server.
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                serve_connection(stream, id, state).await;
                            }
                        }
                    }
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One backend connection: HTTP/1.1 with upgrades, a WebSocket echo after a 101.
async fn serve_connection<S>(stream: S, id: String, state: Arc<BackendState>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // A WebSocket upgrade is handed back here, so the echo runs inside this connection's task
    // and dies with it when the backend is killed.
    let (upgrades, mut upgraded) = tokio::sync::mpsc::unbounded_channel();
    let ws_id = id.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        let id = id.clone();
        let state = state.clone();
        let upgrades = upgrades.clone();
        async move {
            if let Some(resp) = websocket_upgrade(&id, &mut req, &upgrades) {
                return Ok::<_, Infallible>(resp);
            }
            Ok::<_, Infallible>(respond(&id, &state, req))
        }
    });
    // Errors here are the client going away: nothing to report.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Ok(on_upgrade) = upgraded.try_recv()
        && let Ok(io) = on_upgrade.await
    {
        websocket_echo(&ws_id, TokioIo::new(io)).await;
    }
}

/// `GET /ws` with `Upgrade: websocket`: answer 101 and hand the connection to the echo.
fn websocket_upgrade(
    id: &str,
    req: &mut Request<Incoming>,
    upgrades: &tokio::sync::mpsc::UnboundedSender<hyper::upgrade::OnUpgrade>,
) -> Option<Response<Full<Bytes>>> {
    let wants = req.uri().path() == "/ws"
        && req
            .headers()
            .get(http::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !wants {
        return None;
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
        req.headers().get("sec-websocket-key")?.as_bytes(),
    );
    upgrades.send(hyper::upgrade::on(req)).ok()?;
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    h.insert("sec-websocket-accept", HeaderValue::from_str(&accept).ok()?);
    h.insert("x-backend-id", HeaderValue::from_str(id).ok()?);
    Some(resp)
}

/// Echo every text message back as `<id>:<text>` until the peer closes.
async fn websocket_echo<S>(id: &str, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        io,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        None,
    )
    .await;
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(t) => Message::text(format!("{id}:{}", t.as_str())),
            Message::Close(_) => break,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

/// An Engine.IO-like polling endpoint, enough for tether's sid learning: a handshake
/// (`EIO` without `sid`) opens `<id>-<n>`; a request with a sid this backend did not open gets
/// Engine.IO's 400 `Session ID unknown`.
fn engine_io(id: &str, state: &BackendState, query: &str) -> (StatusCode, String) {
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
    };
    match param("sid") {
        None => {
            let n = state.requests.lock().expect("backend state lock").len();
            let sid = format!("{id}-{n}");
            let body = format!(
                "0{{\"sid\":\"{sid}\",\"upgrades\":[],\"pingInterval\":25000,\"pingTimeout\":20000,\"maxPayload\":1000000}}"
            );
            (StatusCode::OK, body)
        }
        Some(sid) if sid.starts_with(&format!("{id}-")) => (StatusCode::OK, "6".to_owned()),
        Some(_) => (
            StatusCode::BAD_REQUEST,
            "{\"code\":1,\"message\":\"Session ID unknown\"}".to_owned(),
        ),
    }
}

fn respond(id: &str, state: &BackendState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut status = StatusCode::OK;
    let mut set_cookie = None;
    let mut body = id.to_owned();
    if req.uri().path() == "/healthz" {
        *state.health_checks.lock().expect("backend state lock") += 1;
        if state.unhealthy.load(Ordering::SeqCst) {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    } else {
        if req.uri().path() == "/socket.io/" {
            (status, body) = engine_io(id, state, req.uri().query().unwrap_or(""));
        }
        if req.uri().path() == "/set-cookie" {
            let query = req.uri().query().unwrap_or("");
            let param = |key: &str| {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_owned())
            };
            if let (Some(name), Some(value)) = (param("name"), param("value")) {
                set_cookie = Some(format!("{name}={value}; Path=/; HttpOnly"));
            }
        }
        state
            .requests
            .lock()
            .expect("backend state lock")
            .push(RecordedRequest {
                method: req.method().clone(),
                uri: req.uri().clone(),
                headers: req.headers().clone(),
            });
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        "x-backend-id",
        HeaderValue::from_str(id).expect("backend id is a valid header value"),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    if let Some(cookie) = set_cookie {
        headers.insert(
            http::header::SET_COOKIE,
            HeaderValue::from_str(&cookie).expect("cookie is a valid header value"),
        );
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Balancer
// ---------------------------------------------------------------------------------------------

/// The real `tether` binary (`CARGO_BIN_EXE_tether`) as a child process, with its config and log
/// in its own temp dir.
pub struct Balancer {
    child: Option<Child>,
    proxy_port: u16,
    admin_port: u16,
    body: String,
    config: PathBuf,
    log: PathBuf,
    /// Length of the log when the current process was spawned: only what follows is its own.
    log_offset: usize,
    http: reqwest::Client,
    /// What the harness writes into `[server]` and `[admin]`.
    options: BalancerOptions,
    dir: TempDir,
}

/// The parts of `[server]` and `[admin]` a test may choose ([`Balancer::start_with`]); the
/// listen addresses and `threads = 2` are always the harness's. The default is what
/// [`Balancer::start`] writes: no grace periods, no upgrade socket, no admin token.
#[derive(Clone, Debug, Default)]
pub struct BalancerOptions {
    /// `grace_period_secs`: how long Pingora keeps serving after SIGTERM, or after a graceful
    /// upgrade's hand-over, before it stops its runtimes.
    pub grace_period_secs: u64,
    /// `graceful_shutdown_timeout_secs`: how long in-flight requests may still take after that.
    pub graceful_shutdown_timeout_secs: u64,
    /// Write `upgrade_sock = "<temp dir>/upgrade.sock"`, so [`Balancer::graceful_upgrade`] can
    /// hand the listeners to a new process.
    pub upgrade_sock: bool,
    /// `[admin] token`; the harness's own admin requests ([`Balancer::metrics`],
    /// [`Balancer::admin`]) then send it.
    pub admin_token: Option<String>,
    /// Extra environment variables for the tether process (e.g. `TETHER_ADMIN_TOKEN`, or
    /// `RUST_LOG`, which overrides the harness's `TETHER_TEST_LOG`).
    pub env: Vec<(String, String)>,
    /// Extra `[server]` lines, e.g. `keepalive_timeout_secs = 1`.
    pub server_extra: String,
}

/// The answer of an admin request ([`Balancer::admin`]).
#[derive(Debug)]
pub struct AdminReply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl AdminReply {
    /// The body as JSON; panics (with the body) if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "admin reply {} is not JSON ({e}): {}",
                self.status, self.text
            )
        })
    }
}

/// What [`Balancer::graceful_upgrade`] observed.
#[derive(Debug)]
pub struct Upgrade {
    /// The old process's exit status.
    pub old_exit: ExitStatus,
    pub old_pid: u32,
    pub new_pid: u32,
    /// When the old process got SIGQUIT.
    pub quit_at: Instant,
    /// From SIGQUIT to the old process's exit.
    pub old_exit_after: Duration,
}

impl Balancer {
    /// Writes `[server]` and `[admin]` (free loopback ports, 2 threads, no grace periods) followed
    /// by `config_body` (everything else), starts `tether run -c FILE` and waits until it is
    /// ready. If it loses the port race ("Address already in use"), it retries once on fresh
    /// ports.
    pub async fn start(config_body: &str) -> Self {
        Self::start_with(BalancerOptions::default(), config_body).await
    }

    /// [`Balancer::start`] with chosen `[server]`/`[admin]` options.
    pub async fn start_with(options: BalancerOptions, config_body: &str) -> Self {
        let (proxy, admin) = two_free_ports();
        match Self::try_start(&options, config_body, proxy, admin).await {
            Ok(b) => b,
            Err(StartError::AddrInUse(_)) => {
                let (proxy, admin) = two_free_ports();
                match Self::try_start(&options, config_body, proxy, admin).await {
                    Ok(b) => b,
                    Err(e) => panic!("{e}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Balancer::start`] on given ports, e.g. to start tether again where a killed one ran.
    /// A port still held by the previous process is retried a few times.
    pub async fn start_with_ports(config_body: &str, proxy_port: u16, admin_port: u16) -> Self {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::try_start(
                &BalancerOptions::default(),
                config_body,
                proxy_port,
                admin_port,
            )
            .await
            {
                Ok(b) => return b,
                Err(StartError::AddrInUse(_)) if attempts < SAME_PORT_ATTEMPTS => {
                    // Back off: the previous process's sockets are being torn down.
                    tokio::time::sleep(SAME_PORT_BACKOFF).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// [`Balancer::start_with`] with an upgrade socket and one-second grace periods, ready for
    /// [`Balancer::graceful_upgrade`]. (With grace periods of 0 the old process would stop its
    /// runtimes the moment it stops accepting, cutting requests in flight.)
    pub async fn start_with_upgrade_sock(config_body: &str) -> Self {
        let options = BalancerOptions {
            grace_period_secs: 1,
            graceful_shutdown_timeout_secs: 1,
            upgrade_sock: true,
            ..BalancerOptions::default()
        };
        Self::start_with(options, config_body).await
    }

    async fn try_start(
        options: &BalancerOptions,
        body: &str,
        proxy_port: u16,
        admin_port: u16,
    ) -> Result<Self, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("tether-lb-")
            .tempdir()
            .expect("creating a temp dir for tether");
        let mut balancer = Balancer {
            child: None,
            proxy_port,
            admin_port,
            body: body.to_owned(),
            config: dir.path().join("tether.toml"),
            log: dir.path().join("tether.log"),
            log_offset: 0,
            http: client(),
            options: options.clone(),
            dir,
        };
        balancer.write_config(body);
        balancer.spawn_and_wait().await?;
        Ok(balancer)
    }

    /// The full config file text for `body` on this balancer's ports.
    pub fn config_text(&self, body: &str) -> String {
        let o = &self.options;
        let mut server = o.server_extra.clone();
        if !server.is_empty() && !server.ends_with('\n') {
            server.push('\n');
        }
        if let Some(sock) = self.upgrade_sock() {
            server.push_str(&format!("upgrade_sock = \"{}\"\n", sock.display()));
        }
        let mut admin = String::new();
        if let Some(token) = &o.admin_token {
            admin.push_str(&format!("token = \"{token}\"\n"));
        }
        format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\nthreads = 2\ngrace_period_secs = {}\n\
             graceful_shutdown_timeout_secs = {}\n{server}\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
             {admin}\n{body}",
            self.proxy_port, o.grace_period_secs, o.graceful_shutdown_timeout_secs, self.admin_port
        )
    }

    /// The `upgrade_sock` path written into `[server]`, if the options asked for one.
    pub fn upgrade_sock(&self) -> Option<PathBuf> {
        self.options
            .upgrade_sock
            .then(|| self.dir.path().join("upgrade.sock"))
    }

    /// The options this balancer was started with.
    pub fn options(&self) -> &BalancerOptions {
        &self.options
    }

    /// Rewrites the config file with a new body (same `[server]`/`[admin]`); the running process
    /// sees it after [`Balancer::sighup`] or a restart.
    pub fn write_config(&mut self, body: &str) {
        self.body = body.to_owned();
        std::fs::write(&self.config, self.config_text(body))
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config.display()));
    }

    /// Spawns `tether run -c FILE` (plus `extra` arguments), its output appended to the log.
    fn spawn_child(&mut self, extra: &[&str]) -> Child {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("cloning the log file handle");
        self.log_offset = log.metadata().map_or(0, |m| m.len() as usize);
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .args(extra)
            // TETHER_TEST_LOG=debug (or any filter) to see more of tether in failing tests.
            .env(
                "RUST_LOG",
                std::env::var("TETHER_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", env!("CARGO_BIN_EXE_tether")))
    }

    async fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        assert!(self.child.is_none(), "tether is already running");
        let child = self.spawn_child(&[]);
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Polls until `/readyz` answers 200 and the proxy port accepts, or the child exits, or
    /// [`BALANCER_START_TIMEOUT`] passes (then the child is killed).
    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let readyz = self.admin_url("/readyz");
        let proxy = SocketAddr::from(([127, 0, 0, 1], self.proxy_port));
        let deadline = Instant::now() + BALANCER_START_TIMEOUT;
        let mut last;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait on tether"));
            if let Some(status) = exited {
                self.child = None;
                return Err(self.start_failure(&format!("tether exited early: {status}")));
            }
            match self.http.get(&readyz).send().await {
                Ok(resp) if resp.status() == StatusCode::OK => {
                    match tokio::net::TcpStream::connect(proxy).await {
                        Ok(_) => return Ok(()),
                        Err(e) => last = format!("/readyz is 200 but proxy {proxy}: {e}"),
                    }
                }
                Ok(resp) => last = format!("GET {readyz}: {}", resp.status()),
                Err(e) => last = format!("GET {readyz}: {e}"),
            }
            if Instant::now() >= deadline {
                kill_child(&mut self.child);
                return Err(self.start_failure(&format!(
                    "tether not ready within {BALANCER_START_TIMEOUT:?} (last: {last})"
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn start_failure(&self, what: &str) -> StartError {
        let log = self.log();
        let msg = format!(
            "{what}\nconfig {}:\n{}\n--- tether.log (last 60 lines) ---\n{}",
            self.config.display(),
            read_lossy(&self.config),
            tail(&log, 60)
        );
        let own = log.get(self.log_offset..).unwrap_or(&log);
        if own.contains("Address already in use") || own.contains("still in use") {
            StartError::AddrInUse(msg)
        } else {
            StartError::Other(msg)
        }
    }

    /// `http://127.0.0.1:PROXY{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.proxy_port)
    }

    /// `http://127.0.0.1:ADMIN{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn proxy_port(&self) -> u16 {
        self.proxy_port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// The config body this balancer was started (or last rewritten) with.
    pub fn body(&self) -> &str {
        &self.body
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log (stdout and stderr of every run in this temp dir).
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// Panics if tether's log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "tether panicked:\n{}",
            tail(&log, 80)
        );
    }

    /// The process id. Panics if tether is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("tether is not running").id()
    }

    /// Whether the child is still alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Panics for an admin request that got no response, saying why (timeout, connect, a
    /// closed connection), whether tether is still running, and the tail of its log.
    fn admin_failed(&self, method: &str, url: &str, e: &reqwest::Error) -> ! {
        let mut cause = String::new();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            cause.push_str(&format!(": {s}"));
            source = s.source();
        }
        let alive = match self.child.as_ref() {
            // SAFETY: kill(2) with signal 0 only checks; the pid is our own unreaped child.
            Some(c) => unsafe { libc::kill(c.id() as libc::pid_t, 0) == 0 },
            None => false,
        };
        panic!(
            "{method} {url}: {e}{cause} (timeout: {}, connect: {}; tether running: {alive})\n\
             --- tether log ---\n{}",
            e.is_timeout(),
            e.is_connect(),
            tail(&self.log(), 40)
        );
    }

    /// GET `/metrics` on the admin listener; panics unless it answers 200.
    pub async fn metrics(&self) -> String {
        let url = self.admin_url("/metrics");
        let mut req = self.http.get(&url);
        if let Some(token) = &self.options.admin_token {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| self.admin_failed("GET", &url, &e));
        assert_eq!(resp.status(), StatusCode::OK, "GET {url}");
        resp.text()
            .await
            .unwrap_or_else(|e| panic!("reading {url}: {e}"))
    }

    /// The value of one sample in the current `/metrics`, see [`metric_value`].
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        metric_value(&self.metrics().await, sample)
    }

    /// See the free function [`metric_value`].
    pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
        metric_value(text, sample)
    }

    /// An admin request (`method` on `path`, e.g. `/api/backends/b/drain?deadline_secs=1`) with
    /// the configured token, if any. Panics on a transport error.
    pub async fn admin(&self, method: Method, path: &str) -> AdminReply {
        let token = self.options.admin_token.clone();
        self.admin_with_token(method, path, token.as_deref()).await
    }

    /// An admin request with the given bearer token (`None`: no `Authorization` header).
    pub async fn admin_with_token(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> AdminReply {
        self.admin_with_header(
            method,
            path,
            token.map(|t| format!("Bearer {t}")).as_deref(),
        )
        .await
    }

    /// An admin request with this exact `Authorization` header value (`None`: none).
    pub async fn admin_with_header(
        &self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
    ) -> AdminReply {
        let url = self.admin_url(path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(value) = authorization {
            req = req.header(http::header::AUTHORIZATION, value);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| self.admin_failed(method.as_str(), &url, &e));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("reading {method} {url}: {e}"));
        AdminReply {
            status,
            headers,
            text,
        }
    }

    /// `GET /api/backends`, the entry of backend `id` (panics unless the reply is 200 and lists
    /// it).
    pub async fn admin_backend(&self, id: &str) -> serde_json::Value {
        let reply = self.admin(Method::GET, "/api/backends").await;
        assert_eq!(reply.status, 200, "GET /api/backends: {}", reply.text);
        reply.json()["backends"]
            .as_array()
            .and_then(|list| list.iter().find(|b| b["id"] == id).cloned())
            .unwrap_or_else(|| panic!("backend {id} is not in GET /api/backends: {}", reply.text))
    }

    /// Graceful upgrade, Pingora's way: start a second `tether run -c FILE -u` on the same config
    /// (so the same ports and upgrade socket), wait until it listens on the upgrade socket for the
    /// listeners, send SIGQUIT to the running process (which hands them over, keeps accepting
    /// for Pingora's 5 s close timeout, then stops accepting, waits `grace_period_secs` and
    /// `graceful_shutdown_timeout_secs`, and exits), wait for the old process to exit and for
    /// the new one to be ready. Afterwards this `Balancer` is the new process.
    ///
    /// Needs [`BalancerOptions::upgrade_sock`] ([`Balancer::start_with_upgrade_sock`]).
    /// Panics, with the log tail, if a step does not happen in time.
    pub async fn graceful_upgrade(&mut self) -> Upgrade {
        let sock = self
            .upgrade_sock()
            .expect("graceful_upgrade needs a balancer started with an upgrade socket");
        let mut old = self.child.take().expect("tether is not running");
        let old_pid = old.id();
        let mut new = self.spawn_child(&["-u"]);
        let new_pid = new.id();

        // 1. The new process binds the upgrade socket once it has read its config and built its
        //    state, then waits (Pingora: 5 tries, 1 s apart) for the listeners.
        let mut new_exit = None;
        let listening = eventually(BALANCER_START_TIMEOUT, || {
            new_exit = new.try_wait().expect("try_wait on the new tether");
            std::future::ready(new_exit.is_some() || sock.exists())
        })
        .await;
        if !listening || new_exit.is_some() {
            kill_child(&mut Some(new));
            self.child = Some(old);
            panic!(
                "the new tether (-u) did not listen on {} (exit: {new_exit:?})\n--- log ---\n{}",
                sock.display(),
                tail(&self.log(), 60)
            );
        }

        // 2. SIGQUIT: the old process sends its listening sockets and starts draining.
        let quit_at = Instant::now();
        send_signal(old_pid, libc::SIGQUIT);

        // 3. The new process removes the socket once it has the listeners.
        let handed_over = eventually(Duration::from_secs(15), || {
            new_exit = new.try_wait().expect("try_wait on the new tether");
            std::future::ready(new_exit.is_some() || !sock.exists())
        })
        .await;
        if !handed_over || new_exit.is_some() {
            kill_child(&mut Some(new));
            self.child = Some(old);
            panic!(
                "the listeners were not handed over within 15 s (new tether exit: {new_exit:?})\n\
                 --- log ---\n{}",
                tail(&self.log(), 60)
            );
        }

        // 4. The old process exits after Pingora's close timeout (5 s) and its grace periods.
        let limit = Duration::from_secs(
            5 + self.options.grace_period_secs + self.options.graceful_shutdown_timeout_secs + 15,
        );
        let mut old_exit = None;
        eventually(limit, || {
            old_exit = old.try_wait().expect("try_wait on the old tether");
            std::future::ready(old_exit.is_some())
        })
        .await;
        let old_exit_after = quit_at.elapsed();
        self.child = Some(new);
        let Some(old_exit) = old_exit else {
            kill_child(&mut Some(old));
            panic!(
                "the old tether (pid {old_pid}) did not exit within {limit:?} of SIGQUIT\n\
                 --- log ---\n{}",
                tail(&self.log(), 60)
            );
        };

        // 5. Only the new process answers now.
        if let Err(e) = self.wait_ready().await {
            panic!("the new tether is not ready after the upgrade: {e}");
        }
        Upgrade {
            old_exit,
            old_pid,
            new_pid,
            quit_at,
            old_exit_after,
        }
    }

    /// Sends SIGHUP (config reload).
    pub fn sighup(&self) {
        send_signal(self.pid(), libc::SIGHUP);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        kill_child(&mut self.child)
    }

    /// SIGINT (Pingora's fast shutdown), then waits up to 10 s for the exit; SIGKILL after that.
    /// Returns the exit status, or `None` if it had to be killed or was not running.
    pub async fn stop(&mut self) -> Option<ExitStatus> {
        let pid = self.child.as_ref()?.id();
        send_signal(pid, libc::SIGINT);
        let mut status = None;
        let exited = eventually(BALANCER_STOP_TIMEOUT, || {
            let s = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait on tether"));
            status = s;
            std::future::ready(s.is_some())
        })
        .await;
        if exited {
            self.child = None;
            status
        } else {
            kill_child(&mut self.child);
            None
        }
    }

    /// Kills tether and starts it again in the same temp dir, on the same ports, with the current
    /// config file; the log is appended to.
    pub async fn restart(&mut self) {
        self.kill();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(StartError::AddrInUse(_)) if attempts < SAME_PORT_ATTEMPTS => {
                    // Back off: the previous process's sockets are being torn down.
                    tokio::time::sleep(SAME_PORT_BACKOFF).await;
                }
                Err(e) => panic!("restarting tether: {e}"),
            }
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

#[derive(Debug)]
enum StartError {
    /// The log says a port was taken: worth a retry on other ports.
    AddrInUse(String),
    Other(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::AddrInUse(m) | StartError::Other(m) => f.write_str(m),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------------

/// A parsed sample: name and sorted labels.
type SampleKey = (String, BTreeMap<String, String>);

/// Parses `name` or `name{a="x",b="y"}` (label values may contain escaped quotes and commas).
/// Returns the key and the rest of the input after it.
fn parse_sample_key(s: &str) -> Option<(SampleKey, &str)> {
    let s = s.trim_start();
    let name_end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    if name_end == 0 {
        return None;
    }
    let name = s[..name_end].to_owned();
    let mut rest = s[name_end..].trim_start();
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start().trim_start_matches(',').trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let after = after.trim_start().strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            };
            labels.insert(key.trim().to_owned(), value);
            rest = &after[end + 1..];
        }
    }
    Some(((name, labels), rest))
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        s => s.parse().ok(),
    }
}

/// Every sample in a Prometheus text exposition, in order (comments skipped).
pub fn metric_samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let ((name, labels), rest) = parse_sample_key(line)?;
            let value = parse_value(rest.split_whitespace().next()?)?;
            Some((name, labels, value))
        })
        .collect()
}

/// The value of the sample with exactly this name and label set, e.g.
/// `tether_reassignments_total{reason="connect_failure"}`. Label order does not matter; a
/// sample with extra labels does not match (see [`metric_sum`] for that).
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    let ((name, labels), rest) = parse_sample_key(sample)
        .unwrap_or_else(|| panic!("metric_value: cannot parse sample name {sample:?}"));
    assert!(rest.trim().is_empty(), "metric_value: trailing {rest:?}");
    metric_samples(text)
        .into_iter()
        .find(|(n, l, _)| *n == name && *l == labels)
        .map(|(_, _, v)| v)
}

/// The sum over every sample named `name` whose labels include all of `labels`, e.g.
/// `metric_sum(text, "tether_requests_total", &[("backend", "a")])`; 0 if there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// An HTTP client for tests: no proxy from the environment, no cookie store (tests send cookies
/// by hand), keep-alive pool of 16 per host, 10 s timeout per request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(16)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("building the test HTTP client")
}

/// GET `url` with extra headers (e.g. `("cookie", "connect.sid=abc")`). Returns the status, the
/// `x-backend-id` header (which backend answered) and all response headers; the body is read
/// and dropped. Panics on a transport error (see [`try_get_backend`]).
pub async fn get_backend(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, HeaderMap) {
    try_get_backend(client, url, headers)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// [`get_backend`], returning transport errors instead of panicking.
pub async fn try_get_backend(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Option<String>, HeaderMap), reqwest::Error> {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let id = headers
        .get("x-backend-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    resp.bytes().await?;
    Ok((status, id, headers))
}
