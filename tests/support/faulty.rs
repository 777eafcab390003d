//! Misbehaving servers for the fault tests (`tests/faults.rs`):
//! - [`FaultyBackend`]: a hand-written HTTP/1.1 backend whose behaviour can be switched while it
//!   runs ([`Mode`]: answer after a delay, never answer, reset the connection mid-body), that
//!   counts how many times it received each request token ([`TOKEN_HEADER`]) so a test can prove
//!   that no request was replayed, and that can be killed and restarted on its port like the
//!   harness's [`super::Backend`];
//! - [`KillableApp`]: a rideshare instance on a runtime of its own that can be killed (as SIGKILL
//!   would) and started again on the same port, with the same id.
//!
//! Both follow the harness's rules: loopback ports chosen by the OS, every wait bounded by a
//! deadline, everything stopped on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::{RedisServer, bind_again, client, eventually};

/// The header that carries a request's idempotency token: a [`FaultyBackend`] counts how many
/// times it received each one.
pub const TOKEN_HEADER: &str = "x-request-token";

/// Longest request head a [`FaultyBackend`] reads before it gives up on the connection.
const MAX_HEAD: usize = 16 * 1024;

/// What a [`FaultyBackend`] does with each request it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `200` with `x-backend-id: <id>` and body `<id>`, after `delay` (zero: at once). With a
    /// delay beyond tether's `read_timeout_ms` this is the slow backend.
    Answer { delay: Duration },
    /// Reads the request and never answers; holds the connection until the peer closes it.
    Silent,
    /// Sends the status line, headers announcing a 1000-byte body and the first
    /// [`RESET_AFTER_BYTES`] bytes of it, then resets the connection (`SO_LINGER` 0 and close: an
    /// RST, not a FIN).
    ResetMidBody,
}

/// Body bytes a [`Mode::ResetMidBody`] backend sends before the reset (of 1000 announced).
pub const RESET_AFTER_BYTES: usize = 100;

/// What a [`FaultyBackend`] saw.
#[derive(Default)]
struct FaultState {
    mode: Mutex<Option<Mode>>,
    /// Times each [`TOKEN_HEADER`] value was received.
    tokens: Mutex<HashMap<String, u32>>,
    /// Requests read (whole head), whatever the mode did with them.
    received: AtomicUsize,
    /// Responses written completely.
    answered: AtomicUsize,
    /// Connections reset mid-body.
    resets: AtomicUsize,
    /// Connections accepted and not yet closed (by either side).
    open: AtomicUsize,
    /// Answer with `Connection: close` and close after each response (no keep-alive).
    close_after_response: AtomicBool,
}

impl FaultState {
    fn mode(&self) -> Mode {
        self.mode
            .lock()
            .expect("fault state lock")
            .expect("mode is set at start")
    }
}

/// Decrements the open-connection count when a connection task ends (or is aborted).
struct OpenGuard(Arc<FaultState>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A hand-written HTTP/1.1 backend on `127.0.0.1:0` with a switchable [`Mode`]. Keep-alive: it
/// serves requests on a connection one after another until the peer closes it. It ignores the
/// path; `GET /healthz` is answered like any request, so do not point health checks at a
/// misbehaving one.
pub struct FaultyBackend {
    id: String,
    addr: SocketAddr,
    state: Arc<FaultState>,
    /// The accept loop; it owns the connection tasks, so aborting it drops every connection.
    server: Option<JoinHandle<()>>,
}

impl FaultyBackend {
    /// Binds `127.0.0.1:0` and serves in `mode`.
    pub async fn start(id: &str, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a faulty backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("faulty backend local_addr");
        let state = Arc::new(FaultState::default());
        *state.mode.lock().expect("fault state lock") = Some(mode);
        let server = Some(tokio::spawn(accept_loop(
            listener,
            id.to_owned(),
            state.clone(),
        )));
        FaultyBackend {
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

    /// A `[[backend]]` table for tether configs.
    pub fn toml(&self) -> String {
        format!(
            "[[backend]]\nid = \"{}\"\naddress = \"{}\"\n",
            self.id, self.addr
        )
    }

    /// Switches what the backend does with the requests it reads from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("fault state lock") = Some(mode);
    }

    /// With `false`, [`Mode::Answer`] responses say `Connection: close` and the connection is
    /// closed after each: every request then reaches the backend on a new connection.
    pub fn set_keep_alive(&self, keep_alive: bool) {
        self.state
            .close_after_response
            .store(!keep_alive, Ordering::SeqCst);
    }

    /// Requests read so far (whole heads), whatever was done with them.
    pub fn received(&self) -> usize {
        self.state.received.load(Ordering::SeqCst)
    }

    /// Responses written completely so far.
    pub fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }

    /// Connections reset mid-body so far.
    pub fn resets(&self) -> usize {
        self.state.resets.load(Ordering::SeqCst)
    }

    /// Connections open right now (accepted, not yet closed by either side).
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// How many times each [`TOKEN_HEADER`] value was received.
    pub fn tokens(&self) -> HashMap<String, u32> {
        self.state.tokens.lock().expect("fault state lock").clone()
    }

    /// Whether the server is running (started and not killed).
    pub fn is_running(&self) -> bool {
        self.server.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Stops accepting and drops every open connection, as SIGKILL would (the kernel closes the
    /// sockets; the port then refuses connections). Waits until that has happened.
    pub async fn kill_and_wait(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Binds the same address again (retrying for up to [`BACKEND_REBIND_TIMEOUT`]) and serves,
    /// with the same id, mode and counts. Kills the running server first, if any.
    pub async fn restart(&mut self) {
        self.kill_and_wait().await;
        let listener = TcpListener::from_std(bind_again(self.addr, &self.id).await)
            .expect("registering the listener");
        self.server = Some(tokio::spawn(accept_loop(
            listener,
            self.id.clone(),
            self.state.clone(),
        )));
    }
}

impl Drop for FaultyBackend {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, id: String, state: Arc<FaultState>) {
    // Dropped with this future when the task is aborted: that aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                state.open.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(state.clone());
                let (id, state) = (id.clone(), state.clone());
                connections.spawn(async move {
                    let _guard = guard;
                    // Errors are the peer going away: nothing to report.
                    let _ = serve_connection(stream, &id, &state).await;
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One parsed request head.
struct Head {
    content_length: usize,
    token: Option<String>,
    close: bool,
}

/// Reads one request head (and its body, by Content-Length) off `stream`, keeping what follows
/// in `buf`. `Ok(None)`: the peer closed the connection between requests.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Head>> {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too long"));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut head = Head {
        content_length: 0,
        token: None,
        close: false,
    };
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => head.content_length = value.parse().unwrap_or(0),
            "connection" => head.close = value.eq_ignore_ascii_case("close"),
            n if n == TOKEN_HEADER => head.token = Some(value.to_owned()),
            _ => {}
        }
    }
    buf.drain(..end + 4);
    while buf.len() < head.content_length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..head.content_length);
    Ok(Some(head))
}

async fn serve_connection(
    mut stream: TcpStream,
    id: &str,
    state: &FaultState,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(head) = read_request(&mut stream, &mut buf).await? {
        state.received.fetch_add(1, Ordering::SeqCst);
        if let Some(token) = head.token {
            *state
                .tokens
                .lock()
                .expect("fault state lock")
                .entry(token)
                .or_default() += 1;
        }
        match state.mode() {
            Mode::Answer { delay } => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let close = head.close || state.close_after_response.load(Ordering::SeqCst);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nx-backend-id: {id}\r\ncontent-type: text/plain\r\n\
                     content-length: {}\r\n{}\r\n{id}",
                    id.len(),
                    if close { "connection: close\r\n" } else { "" }
                );
                stream.write_all(response.as_bytes()).await?;
                state.answered.fetch_add(1, Ordering::SeqCst);
                if close {
                    return Ok(());
                }
            }
            Mode::Silent => {
                // Hold the connection until the peer gives up (read timeout) and closes it.
                let mut chunk = [0u8; 1024];
                while stream.read(&mut chunk).await? > 0 {}
                return Ok(());
            }
            Mode::ResetMidBody => {
                let response = format!(
                    "HTTP/1.1 200 OK\r\nx-backend-id: {id}\r\ncontent-type: text/plain\r\n\
                     content-length: 1000\r\n\r\n{}",
                    "x".repeat(RESET_AFTER_BYTES)
                );
                stream.write_all(response.as_bytes()).await?;
                stream.flush().await?;
                // Zero linger: close() sends an RST and discards anything unsent.
                stream.set_zero_linger()?;
                state.resets.fetch_add(1, Ordering::SeqCst);
                drop(stream);
                return Ok(());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// KillableApp
// ---------------------------------------------------------------------------------------------

/// A rideshare instance on a runtime of its own: [`KillableApp::kill`] shuts that runtime down,
/// dropping the listener and every connection without a response (as SIGKILL would), and
/// [`KillableApp::restart`] serves again on the same port with the same id and Redis.
pub struct KillableApp {
    config: ::rideshare::Config,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KillableApp {
    /// Starts instance `id` on `redis` on `127.0.0.1:0` (config:
    /// [`super::rideshare::Rideshare::config`]) and waits until `/healthz` answers.
    pub async fn start(id: &str, redis: &RedisServer) -> Self {
        let config = super::rideshare::Rideshare::config(id, Some(redis));
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding rideshare on 127.0.0.1:0");
        let addr = listener.local_addr().expect("rideshare local_addr");
        let mut app = KillableApp {
            config,
            addr,
            runtime: None,
        };
        app.serve(listener).await;
        app
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `[[backend]]` table for tether configs.
    pub fn toml(&self) -> String {
        format!(
            "[[backend]]\nid = \"{}\"\naddress = \"{}\"\n",
            self.config.id, self.addr
        )
    }

    /// Whether it is serving (started and not killed).
    pub fn is_running(&self) -> bool {
        self.runtime.is_some()
    }

    /// Shuts the instance's runtime down at once: no graceful shutdown, every connection dropped.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Kills the instance if it runs, then serves again on the same port (retrying the bind for
    /// up to [`BACKEND_REBIND_TIMEOUT`] while the old socket goes away) and waits for `/healthz`.
    pub async fn restart(&mut self) {
        self.kill();
        let listener = bind_again(self.addr, &self.config.id).await;
        self.serve(listener).await;
    }

    async fn serve(&mut self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building a runtime for a killable rideshare");
        let config = self.config.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener)?;
            // Never asked to stop: only killed.
            ::rideshare::serve(listener, config, std::future::pending()).await
        });
        self.runtime = Some(runtime);
        let http = client();
        let health = format!("http://{}/healthz", self.addr);
        let up = eventually(super::rideshare::START_TIMEOUT, || async {
            matches!(http.get(&health).send().await, Ok(r) if r.status() == 200)
        })
        .await;
        assert!(
            up,
            "rideshare {} on {}: /healthz not 200 within {:?}",
            self.config.id,
            self.addr,
            super::rideshare::START_TIMEOUT
        );
    }
}

impl Drop for KillableApp {
    fn drop(&mut self) {
        self.kill();
    }
}
