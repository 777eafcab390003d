//! Load tools for tether's benchmark (`tests/bench/run.sh`, driven by `tests/bench/bench.py`).
//! Not part of tether, and not a test: it measures, and prints what it measured.
//!
//! - `backends`: fast static HTTP backends that also echo WebSockets (the proxies' upstreams);
//! - `ws-echo`: many WebSockets through a proxy, each in a closed send-and-await-echo loop:
//!   messages per second and round-trip percentiles;
//! - `ws-idle`: many idle WebSockets held through a proxy: the proxy's RSS before and after;
//! - `sio-fanout`: Socket.IO clients of rideshare (through tether) in the `drivers` room, a driver
//!   emitting positions: emit-to-receipt percentiles and messages lost.
//!
//! Every load command prints one JSON object on stdout (its figures) and progress on stderr.
//! HTTP load itself is wrk's job (the script drives it).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

#[derive(Parser)]
#[command(name = "tether-bench", about = "Load tools for tests/bench/run.sh")]
struct Cli {
    /// Runtime worker threads (1: a current-thread runtime, so the tool takes one core at most).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Static HTTP backends (`ok`, `x-backend-id: <id>`) that echo WebSocket messages.
    Backends {
        /// `id=host:port`, one per backend.
        #[arg(required = true)]
        backends: Vec<String>,
    },
    /// Closed-loop WebSocket echo through `target`.
    WsEcho {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Message size in bytes.
        #[arg(long, default_value_t = 32)]
        bytes: usize,
        /// Cookie name carrying a distinct session per connection (`<name>=ws<i>`).
        #[arg(long, default_value = "sid")]
        cookie: String,
    },
    /// Idle WebSockets held through `target`; reports the RSS of `pids` (summed).
    WsIdle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Processes whose resident memory is measured, comma-separated (the proxy's).
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        /// Wait this long after every connection echoed once before reading RSS.
        #[arg(long, default_value_t = 2)]
        settle_secs: u64,
        #[arg(long, default_value = "sid")]
        cookie: String,
    },
    /// Socket.IO broadcast fan-out through `target` (rideshare behind tether).
    SioFanout {
        #[arg(long)]
        target: SocketAddr,
        /// Clients in the `drivers` room.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Positions the driver emits.
        #[arg(long, default_value_t = 100)]
        emits: usize,
        /// Emits per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// A name prefix for the users (distinct per run keeps sessions apart).
        #[arg(long, default_value = "bench")]
        prefix: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let figures = match cli.command {
            Cmd::Backends { backends } => return run_backends(&backends).await,
            Cmd::WsEcho {
                target,
                conns,
                secs,
                bytes,
                cookie,
            } => ws_echo(target, conns, Duration::from_secs(secs), bytes, &cookie).await?,
            Cmd::WsIdle {
                target,
                conns,
                pids,
                settle_secs,
                cookie,
            } => {
                ws_idle(
                    target,
                    conns,
                    &pids,
                    Duration::from_secs(settle_secs),
                    &cookie,
                )
                .await?
            }
            Cmd::SioFanout {
                target,
                clients,
                emits,
                rate,
                prefix,
            } => sio_fanout(target, clients, emits, rate, &prefix).await?,
        };
        println!("{figures}");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

async fn run_backends(specs: &[String]) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for spec in specs {
        let (id, addr) = spec
            .split_once('=')
            .with_context(|| format!("{spec}: expected id=host:port"))?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!("backend {id} on {}", listener.local_addr()?);
        tasks.push(tokio::spawn(serve_backend(listener, Arc::from(id))));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

async fn serve_backend(listener: TcpListener, id: Arc<str>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = id.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(req, id.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn respond(
    mut req: Request<Incoming>,
    id: Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let wants_ws = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let mut resp = Response::builder().header("x-backend-id", &*id);
    let resp = match (wants_ws, key) {
        (true, Some(key)) => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(io) = upgrade.await {
                    let io = TokioIo::new(io);
                    let ws =
                        WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
                    echo(ws).await;
                }
            });
            resp.status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "Upgrade")
                .header(
                    header::SEC_WEBSOCKET_ACCEPT,
                    derive_accept_key(key.as_bytes()),
                )
                .body(Full::default())
        }
        _ => {
            resp = resp.header(header::CONTENT_TYPE, "text/plain");
            resp.body(Full::new(Bytes::from_static(b"ok\n")))
        }
    };
    Ok(resp.expect("static response parts are valid"))
}

async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            return;
        }
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients
// ---------------------------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

/// The WebSocket settings of every socket the tool opens or serves. tungstenite's default read
/// buffer is 128 KiB, and it zero-fills what it does not hold yet before every read: 47% of the
/// tool's CPU in s5 was that `memset`, for frames of ~60 bytes, on cores it shares with the
/// proxies it measures. 4 KiB is rideshare's (socketioxide's) own default.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// At most this many connection attempts at once (a listen backlog is finite).
const CONNECTING_AT_ONCE: usize = 128;

async fn ws_connect(target: SocketAddr, path: &str, cookie: Option<&str>) -> anyhow::Result<Ws> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    let mut req = format!("ws://{target}{path}").into_client_request()?;
    if let Some(c) = cookie {
        req.headers_mut().insert(header::COOKIE, c.parse()?);
    }
    let (ws, _) = client_async_with_config(req, stream, Some(ws_config()))
        .await
        .with_context(|| format!("WebSocket handshake with {target}{path}"))?;
    Ok(ws)
}

/// Sends `text` and waits for the next data message.
async fn round_trip(ws: &mut Ws, text: &str) -> anyhow::Result<()> {
    ws.send(Message::text(text)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(_) | Message::Binary(_))) => return Ok(()),
            Some(Ok(Message::Close(_))) | None => bail!("closed while waiting for the echo"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Runs `make(i)` for every `i` in `0..n`, at most [`CONNECTING_AT_ONCE`] at a time, and returns
/// the results in order; the first error names its `what` and index.
async fn gated<T, F, Fut>(n: usize, what: &str, make: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let gate = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let gate = gate.clone();
            let job = make(i);
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("never closed");
                job.await
            })
        })
        .collect();
    let started = Instant::now();
    let mut out = Vec::with_capacity(n);
    for (i, t) in tasks.into_iter().enumerate() {
        out.push(t.await?.with_context(|| format!("{what} {i}"))?);
        if (i + 1) % 1000 == 0 {
            eprintln!("{} {what}s ready after {:?}", i + 1, started.elapsed());
        }
    }
    Ok(out)
}

/// Opens `n` WebSockets (each with its own session cookie) and echoes once on each.
async fn open_many(target: SocketAddr, n: usize, cookie: &str) -> anyhow::Result<Vec<Ws>> {
    gated(n, "connection", |i| {
        let cookie = format!("{cookie}=ws{i}");
        async move {
            let mut ws = ws_connect(target, "/ws", Some(&cookie)).await?;
            round_trip(&mut ws, "hello").await?;
            Ok(ws)
        }
    })
    .await
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i])
}

/// Percentiles (in ms) of latencies in microseconds.
fn latency_figures(mut us: Vec<u32>) -> Value {
    us.sort_unstable();
    let ms = |p| percentile(&us, p) / 1000.0;
    json!({
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "max_ms": us.last().map_or(f64::NAN, |m| f64::from(*m) / 1000.0),
    })
}

async fn ws_echo(
    target: SocketAddr,
    conns: usize,
    secs: Duration,
    bytes: usize,
    cookie: &str,
) -> anyhow::Result<Value> {
    let sockets = open_many(target, conns, cookie).await?;
    eprintln!("ws-echo: {conns} connections open, echoing for {secs:?}");
    let payload: Arc<str> = Arc::from("x".repeat(bytes));
    let start = Instant::now();
    let deadline = start + secs;
    let errors = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(conns);
    for mut ws in sockets {
        let payload = payload.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                if round_trip(&mut ws, &payload).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return lat;
                }
                lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            let _ = ws.close(None).await;
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let messages = all.len();
    let mut figures = latency_figures(all);
    figures["messages"] = json!(messages);
    figures["msgs_per_sec"] = json!(messages as f64 / elapsed);
    figures["errors"] = json!(errors.load(Ordering::Relaxed));
    figures["conns"] = json!(conns);
    Ok(figures)
}

/// Resident memory of `pid` in bytes (`VmRSS` of /proc/PID/status).
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

fn rss_sum(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| rss_bytes(*p)).sum()
}

async fn ws_idle(
    target: SocketAddr,
    conns: usize,
    pids: &[u32],
    settle: Duration,
    cookie: &str,
) -> anyhow::Result<Value> {
    let before = rss_sum(pids)?;
    let started = Instant::now();
    let sockets = open_many(target, conns, cookie).await?;
    let opened_in = started.elapsed();
    eprintln!("ws-idle: {conns} connections open in {opened_in:?}, settling {settle:?}");
    tokio::time::sleep(settle).await;
    let held = rss_sum(pids)?;
    // Every one still works after the wait.
    let mut alive = 0usize;
    for mut ws in sockets {
        if round_trip(&mut ws, "still there?").await.is_ok() {
            alive += 1;
        }
        let _ = ws.close(None).await;
    }
    Ok(json!({
        "conns": conns,
        "alive_after": alive,
        "open_secs": opened_in.as_secs_f64(),
        "rss_before_bytes": before,
        "rss_held_bytes": held,
        "bytes_per_conn": (held.saturating_sub(before)) as f64 / conns as f64,
    }))
}

// ---------------------------------------------------------------------------------------------
// Socket.IO fan-out (rideshare's `drivers` room)
// ---------------------------------------------------------------------------------------------

/// `POST /login` through `target`; returns the `Cookie` header value for the cookies it set.
async fn login(target: SocketAddr, name: &str, role: &str) -> anyhow::Result<String> {
    let body = json!({ "name": name, "role": role }).to_string();
    let req = format!(
        "POST /login HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(target).await?;
    stream.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).await?;
    let text = String::from_utf8_lossy(&resp);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let status = head.split(' ').nth(1).unwrap_or("?");
    if status != "200" {
        bail!("POST /login as {name}: status {status}: {text}");
    }
    let cookies: Vec<&str> = head
        .lines()
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("set-cookie")
                .then(|| v.trim().split(';').next().unwrap_or("").trim())
        })
        .collect();
    if cookies.is_empty() {
        bail!("POST /login as {name}: no cookie set");
    }
    Ok(cookies.join("; "))
}

/// A logged-in Socket.IO connection over WebSocket, connected to namespace `/`.
async fn sio_connect(target: SocketAddr, cookie: &str) -> anyhow::Result<Ws> {
    let mut ws = ws_connect(
        target,
        "/socket.io/?EIO=4&transport=websocket",
        Some(cookie),
    )
    .await?;
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed during the Socket.IO handshake"),
        };
        match text.as_str() {
            t if t.starts_with('0') => ws.send(Message::text("40")).await?,
            t if t.starts_with("40") => return Ok(ws),
            t if t.starts_with("44") => bail!("Socket.IO connect refused: {t}"),
            "2" => ws.send(Message::text("3")).await?,
            _ => {}
        }
    }
}

/// How long one step of a client's set-up may take before the run fails, naming the step.
const STEP: Duration = Duration::from_secs(15);

async fn step<T>(what: &str, fut: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(STEP, fut).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no answer within {STEP:?}"),
    }
}

/// Logs in as rider `name`, connects Socket.IO and joins the `drivers` room (acked).
async fn join_watcher(target: SocketAddr, name: &str) -> anyhow::Result<Ws> {
    let cookie = step("POST /login", login(target, name, "rider")).await?;
    let mut ws = step("Socket.IO connect", sio_connect(target, &cookie)).await?;
    ws.send(Message::text("420[\"watchDrivers\"]")).await?;
    step("the watchDrivers ack", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.starts_with("430") => {
                    if !t.contains("\"ok\":true") {
                        bail!("watchDrivers refused: {t}");
                    }
                    return Ok(());
                }
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    ws.send(Message::text("3")).await?
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed before the watchDrivers ack"),
            }
        }
    })
    .await?;
    Ok(ws)
}

/// The driver's emit `k` carries `lng = k / 1000`: unique, and exact through JSON.
fn lng_of(k: usize) -> f64 {
    k as f64 / 1000.0
}

async fn sio_fanout(
    target: SocketAddr,
    clients: usize,
    emits: usize,
    rate: f64,
    prefix: &str,
) -> anyhow::Result<Value> {
    // 1. Watchers: log in, connect, join the room (acked).
    let watchers = gated(clients, "watcher", |i| {
        let name = format!("{prefix}-w{i}");
        async move { join_watcher(target, &name).await }
    })
    .await?;
    eprintln!("sio-fanout: {clients} watchers in the room");

    // 2. Receivers: latency of every driverPosition against its emit time.
    let base = Instant::now();
    let emitted: Arc<Vec<AtomicU64>> = Arc::new((0..emits).map(|_| AtomicU64::new(0)).collect());
    let received = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers = Vec::with_capacity(clients);
    for mut ws in watchers {
        let emitted = emitted.clone();
        let received = received.clone();
        let mut stop = stop_rx.clone();
        receivers.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(emits);
            loop {
                let msg = tokio::select! {
                    m = ws.next() => m,
                    _ = stop.changed() => break,
                };
                let now = base.elapsed().as_nanos() as u64;
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    _ => break,
                };
                if text.as_str() == "2" {
                    let _ = ws.send(Message::text("3")).await;
                    continue;
                }
                let Some(array) = text.strip_prefix("42") else {
                    continue;
                };
                let Ok(Value::Array(parts)) = serde_json::from_str::<Value>(array) else {
                    continue;
                };
                if parts.first().and_then(Value::as_str) != Some("driverPosition") {
                    continue;
                }
                let Some(lng) = parts.get(1).and_then(|d| d["lng"].as_f64()) else {
                    continue;
                };
                let k = (lng * 1000.0).round() as usize;
                if let Some(sent) = emitted.get(k).map(|e| e.load(Ordering::Acquire))
                    && sent > 0
                {
                    lat.push(u32::try_from((now - sent) / 1000).unwrap_or(u32::MAX));
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = ws.close(None).await;
            lat
        }));
    }

    // 3. The driver.
    let cookie = login(target, &format!("{prefix}-driver"), "driver").await?;
    let mut driver = sio_connect(target, &cookie).await?;
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(every);
    for k in 0..emits {
        tick.tick().await;
        let packet = format!(
            "42[\"driverPosition\",{}]",
            json!({ "lat": 48.85, "lng": lng_of(k) })
        );
        emitted[k].store(base.elapsed().as_nanos().max(1) as u64, Ordering::Release);
        driver.send(Message::text(packet)).await?;
        // Answer pings; drop anything else the driver hears (it asked for no ack).
        while let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::ZERO, driver.next()).await
        {
            if t.as_str() == "2" {
                driver.send(Message::text("3")).await?;
            }
        }
    }
    let expected = clients * emits;
    let drain_until = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let _ = driver.close(None).await;
    let mut all = Vec::with_capacity(expected);
    for r in receivers {
        all.extend(r.await?);
    }
    let got = all.len();
    let mut figures = latency_figures(all);
    figures["clients"] = json!(clients);
    figures["emits"] = json!(emits);
    figures["expected"] = json!(expected);
    figures["received"] = json!(got);
    figures["lost"] = json!(expected.saturating_sub(got));
    Ok(figures)
}
