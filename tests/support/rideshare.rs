//! Harness for the rideshare tests (and for tether tests that put rideshare behind tether):
//! - [`Rideshare`]: an in-process instance (`rideshare::serve` on `127.0.0.1:0`);
//! - [`Agent`]: an HTTP client that keeps the `rs.sid` cookie, like a browser;
//! - [`SioClient`]: the real Socket.IO client `tests/clients/sio_client.py` (python-socketio) as
//!   a child process, read line by line.
//!
//! Every wait polls until a deadline and panics with the evidence (the client's transcript).
//! Paths to the `rideshare` crate are written `::rideshare` because this module shares its name.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ::rideshare::serde_json::{self, Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{POLL_INTERVAL, RedisServer, client, eventually};

/// The session cookie's name.
pub const COOKIE: &str = "rs.sid";
/// The secret the test instances share (so they read each other's cookies).
pub const TEST_SECRET: &str = "rideshare-integration-test-secret";
/// Deadline for an instance to answer `/healthz` after start, and to stop.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The Socket.IO client script.
pub const SIO_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/sio_client.py");
/// How to install what the script needs.
pub const PY_INSTALL: &str = "python3 -m pip install -r tests/clients/requirements.txt";

// ---------------------------------------------------------------------------------------------
// Rideshare
// ---------------------------------------------------------------------------------------------

/// One rideshare instance served on the test's runtime. Stopped (gracefully, see
/// [`Rideshare::stop`]) or aborted on drop.
pub struct Rideshare {
    id: String,
    addr: std::net::SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// With [`Rideshare::start_killable`]: the instance's own runtime, whose shutdown drops every
    /// task of the instance (listener, connections, Redis) at once, as a killed process would.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Rideshare {
    /// A config for instance `id` on `redis` (RESP3 is chosen by rideshare itself) with the
    /// shared [`TEST_SECRET`]; embedded mode if `redis` is `None`.
    pub fn config(id: &str, redis: Option<&RedisServer>) -> ::rideshare::Config {
        let mut config = ::rideshare::Config::new(id).with_secret(TEST_SECRET);
        config.redis_url = redis.map(RedisServer::url);
        config.shutdown_grace = Duration::from_secs(2);
        config
    }

    /// Starts instance `id` on `redis` (or embedded) with the defaults of [`Rideshare::config`].
    pub async fn start(id: &str, redis: Option<&RedisServer>) -> Self {
        Self::start_with(Self::config(id, redis)).await
    }

    /// Binds `127.0.0.1:0`, serves `config`, and waits until `/healthz` answers 200. Panics with
    /// serve's error if it fails to start.
    pub async fn start_with(config: ::rideshare::Config) -> Self {
        Self::start_on(config, None).await
    }

    /// [`Rideshare::start`] on a runtime of its own, so that [`Rideshare::kill`] can end it the
    /// way SIGKILL ends a process: no graceful shutdown, every connection dropped.
    pub async fn start_killable(id: &str, redis: Option<&RedisServer>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building a runtime for a killable rideshare");
        Self::start_on(Self::config(id, redis), Some(runtime)).await
    }

    /// Kills an instance started with [`Rideshare::start_killable`]: its runtime is shut down,
    /// which drops the listener and every open connection without a response.
    pub fn kill(&mut self) {
        let runtime = self
            .runtime
            .take()
            .unwrap_or_else(|| panic!("rideshare {} was not started killable", self.id));
        self.task.take();
        runtime.shutdown_background();
    }

    async fn start_on(
        config: ::rideshare::Config,
        runtime: Option<tokio::runtime::Runtime>,
    ) -> Self {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding rideshare on 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = std_listener.local_addr().expect("rideshare local_addr");
        let id = config.id.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let serve = async move {
            // Registered with the runtime that runs it.
            let listener = TcpListener::from_std(std_listener)?;
            ::rideshare::serve(listener, config, async move {
                let _ = rx.await;
            })
            .await
        };
        let task = match &runtime {
            Some(rt) => rt.spawn(serve),
            None => tokio::spawn(serve),
        };
        let mut instance = Rideshare {
            id,
            addr,
            shutdown: Some(tx),
            task: Some(task),
            runtime,
        };
        let http = client();
        let health = instance.url("/healthz");
        let mut failed = None;
        let up = eventually(START_TIMEOUT, || {
            let task = instance.task.as_mut().expect("task is set above");
            let finished = task.is_finished();
            let http = &http;
            let health = &health;
            async move {
                if finished {
                    return true;
                }
                matches!(http.get(health).send().await, Ok(r) if r.status() == 200)
            }
        })
        .await;
        if instance.task.as_ref().is_some_and(JoinHandle::is_finished) {
            let task = instance.task.take().expect("checked above");
            failed = Some(match task.await {
                Ok(Ok(())) => "serve returned Ok before being asked to stop".to_owned(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("serve panicked: {e}"),
            });
        }
        if let Some(why) = failed {
            panic!("rideshare {} did not start: {why}", instance.id);
        }
        assert!(
            up,
            "rideshare {} on {addr}: /healthz not 200 within {START_TIMEOUT:?}",
            instance.id
        );
        instance
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A `[[backend]]` table for tether configs.
    pub fn toml(&self) -> String {
        format!(
            "[[backend]]\nid = \"{}\"\naddress = \"{}\"\n",
            self.id, self.addr
        )
    }

    /// Graceful stop: fires the shutdown future and waits for `serve` to return (panics if it
    /// returns an error or takes longer than [`START_TIMEOUT`]).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(START_TIMEOUT, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("rideshare {} stopped with an error: {e:#}", self.id),
                Ok(Err(e)) => panic!("rideshare {} panicked: {e}", self.id),
                Err(_) => panic!(
                    "rideshare {} did not stop within {START_TIMEOUT:?}",
                    self.id
                ),
            }
        }
    }

    /// Whether `serve` is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Rideshare {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------------

/// One HTTP answer from rideshare.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// `x-backend-id`.
    pub instance: Option<String>,
    /// Every `Set-Cookie` header.
    pub set_cookies: Vec<String>,
    pub content_type: Option<String>,
    pub text: String,
    /// The body as JSON (`Null` if it is not JSON).
    pub json: Value,
}

impl Reply {
    /// The `error` message of a JSON error body; panics (with the reply) if there is none.
    pub fn error(&self) -> &str {
        self.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("expected a JSON error body, got {self:?}"))
    }

    /// The `rs.sid` Set-Cookie header, if any.
    pub fn session_cookie(&self) -> Option<&str> {
        self.set_cookies
            .iter()
            .map(String::as_str)
            .find(|c| c.starts_with(&format!("{COOKIE}=")))
    }
}

/// An HTTP client that keeps the `rs.sid` cookie from `Set-Cookie` (and drops it on
/// `Max-Age=0`), like a browser with one cookie. No other cookies, no redirects to follow.
pub struct Agent {
    http: reqwest::Client,
    /// The cookie value (`s:<id>.<sig>`), if any.
    pub cookie: Option<String>,
}

impl Default for Agent {
    fn default() -> Self {
        Self::new()
    }
}

impl Agent {
    pub fn new() -> Self {
        Agent {
            http: client(),
            cookie: None,
        }
    }

    /// The session id in the current cookie (`s:<id>.<sig>` -> `<id>`).
    pub fn session_id(&self) -> Option<String> {
        let value = self.cookie.as_deref()?;
        let rest = value.strip_prefix("s:")?;
        Some(rest.rsplit_once('.')?.0.to_owned())
    }

    pub async fn get(&mut self, url: &str) -> Reply {
        self.send(self.http.get(url), url).await
    }

    /// POST with a JSON body (or none).
    pub async fn post(&mut self, url: &str, body: Option<Value>) -> Reply {
        let mut req = self.http.post(url);
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_string(&body).expect("JSON serializes"));
        }
        self.send(req, url).await
    }

    /// POST with a raw body and content type (for malformed input).
    pub async fn post_raw(&mut self, url: &str, content_type: &str, body: &str) -> Reply {
        let req = self
            .http
            .post(url)
            .header("content-type", content_type)
            .body(body.to_owned());
        self.send(req, url).await
    }

    /// `POST /login` as `name`/`role`; panics unless 200.
    pub async fn login(&mut self, base: &str, name: &str, role: &str) -> Reply {
        let reply = self
            .post(
                &format!("{base}/login"),
                Some(json!({ "name": name, "role": role })),
            )
            .await;
        assert_eq!(reply.status, 200, "login {name} on {base}: {reply:?}");
        reply
    }

    /// `POST /rides` from `from` to `to`; panics unless 201. Returns the ride id.
    pub async fn request_ride(&mut self, base: &str, from: &str, to: &str) -> String {
        let reply = self
            .post(
                &format!("{base}/rides"),
                Some(json!({ "from": from, "to": to })),
            )
            .await;
        assert_eq!(reply.status, 201, "POST /rides on {base}: {reply:?}");
        reply.json["id"]
            .as_str()
            .unwrap_or_else(|| panic!("ride without id: {reply:?}"))
            .to_owned()
    }

    /// `POST /rides/{id}/accept`; panics unless 200.
    pub async fn accept(&mut self, base: &str, ride: &str) -> Reply {
        let reply = self
            .post(&format!("{base}/rides/{ride}/accept"), None)
            .await;
        assert_eq!(reply.status, 200, "accept {ride} on {base}: {reply:?}");
        reply
    }

    async fn send(&mut self, mut req: reqwest::RequestBuilder, url: &str) -> Reply {
        if let Some(cookie) = &self.cookie {
            req = req.header("cookie", format!("{COOKIE}={cookie}"));
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request to {url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("reading the body of {url}: {e}"));
        let set_cookies: Vec<String> = headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        for c in &set_cookies {
            let Some(rest) = c.strip_prefix(&format!("{COOKIE}=")) else {
                continue;
            };
            let value = rest.split(';').next().unwrap_or("");
            if c.contains("Max-Age=0") || value.is_empty() {
                self.cookie = None;
            } else {
                self.cookie = Some(value.to_owned());
            }
        }
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Reply {
            status,
            instance: header("x-backend-id"),
            content_type: header("content-type"),
            set_cookies,
            json: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SioClient
// ---------------------------------------------------------------------------------------------

/// Panics with the install command unless `python3` can import what the client needs. Checked
/// once per test process.
pub fn require_python_client() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import socketio, engineio, requests, websocket"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "python3 cannot import the Socket.IO client modules: install them with \
                 `{PY_INSTALL}`\n{}",
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!(
                "python3 not found ({e}): install Python 3, then `{PY_INSTALL}`"
            )),
        }
    });
    if let Err(msg) = result {
        panic!("{msg}");
    }
}

/// `tests/clients/sio_client.py` running as a child process. Its JSON lines are collected as
/// they arrive; stdin stays open for `--stdin` commands until [`SioClient::finish`].
pub struct SioClient {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl SioClient {
    /// Spawns the client with `args` (see the script's `--help`). `label` names it in panics.
    pub fn spawn(label: &str, args: &[&str]) -> Self {
        require_python_client();
        let mut child = Command::new("python3")
            .arg(SIO_CLIENT)
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning python3 {SIO_CLIENT}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value =
                    serde_json::from_str(&line).unwrap_or_else(|_| Value::String(line.clone()));
                sink.lock().expect("lines lock").push(value);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr is piped");
        let err_sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                err_sink
                    .lock()
                    .expect("stderr lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        SioClient {
            label: label.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lines lock").clone()
    }

    /// The data of every received event named `event`, in order.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["type"] == "event" && l["event"] == event)
            .map(|l| l["data"].clone())
            .collect()
    }

    /// Every line of the given `type`.
    pub fn of_type(&self, kind: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["type"] == kind)
            .collect()
    }

    /// Everything the client printed, for panic messages.
    pub fn transcript(&self) -> String {
        let lines: Vec<String> = self.lines().iter().map(Value::to_string).collect();
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.label,
            lines.join("\n"),
            self.label,
            super::tail(&self.stderr.lock().expect("stderr lock"), 30)
        )
    }

    /// Waits until `condition(lines)` holds; panics with `what` and the transcript otherwise.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&[Value]) -> bool,
    ) {
        // On a copy: the condition may call this client's accessors, which take the lock.
        let ok = eventually(timeout, || std::future::ready(condition(&self.lines()))).await;
        assert!(
            ok,
            "{}: {what} not seen within {timeout:?}\n{}",
            self.label,
            self.transcript()
        );
    }

    /// Waits for the `n`-th ack line of `event` (1-based) and returns it.
    pub async fn wait_ack(&self, timeout: Duration, event: &str, n: usize) -> Value {
        self.wait_for(timeout, &format!("ack #{n} of {event}"), |lines| {
            lines
                .iter()
                .filter(|l| l["type"] == "ack" && l["event"] == event)
                .count()
                >= n
        })
        .await;
        self.of_type("ack")
            .into_iter()
            .filter(|l| l["event"] == event)
            .nth(n - 1)
            .expect("waited for it")
    }

    /// Writes one command line to the client's stdin (`--stdin` mode).
    pub fn send(&mut self, command: &str) {
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{}: stdin already closed", self.label));
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| {
                panic!(
                    "{}: writing {command:?}: {e}\n{}",
                    self.label,
                    self.transcript()
                )
            });
    }

    /// Closes stdin (ends `--stdin` mode) and waits for the exit; kills the client if it takes
    /// longer than `timeout`. Returns the exit code and the summary line.
    pub async fn finish(&mut self, timeout: Duration) -> (Option<i32>, Value) {
        self.stdin.take();
        let mut status = None;
        let exited = eventually(timeout, || {
            status = self.child.try_wait().expect("try_wait on the client");
            std::future::ready(status.is_some())
        })
        .await;
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "{}: did not exit within {timeout:?}\n{}",
                self.label,
                self.transcript()
            );
        }
        // The reader thread may still be draining the pipe after the exit.
        let summary_seen = eventually(Duration::from_secs(2), || {
            std::future::ready(self.of_type("summary").len() == 1)
        })
        .await;
        let summary = if summary_seen {
            self.of_type("summary").remove(0)
        } else {
            Value::Null
        };
        (status.and_then(|s| s.code()), summary)
    }

    /// [`SioClient::finish`], then asserts exit code 0 and an ok summary.
    pub async fn finish_ok(&mut self, timeout: Duration) -> Value {
        let (code, summary) = self.finish(timeout).await;
        assert!(
            code == Some(0) && summary["ok"] == true,
            "{}: exit {code:?}, summary {summary}\n{}",
            self.label,
            self.transcript()
        );
        summary
    }
}

impl Drop for SioClient {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Sleeps one poll interval (for loops that re-send something until it is seen).
pub async fn pause() {
    tokio::time::sleep(POLL_INTERVAL).await;
}
