//! Wiring: the validated [`Config`] becomes a Pingora `Server` with the proxy and admin services.
//!
//! Redis I/O (connection, refresher, prober) runs on a small Tokio runtime of its own, built
//! before Pingora starts its services: Pingora must not be started inside a runtime, and the
//! first connection to Redis should be made before the proxy accepts a request, so that a
//! restarted tether routes known keys from Redis instead of failing open.

use std::sync::Arc;

use anyhow::Context;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{DEFAULT_L4_WRITE_BUFFER_SIZE, L4BufferSettings, ListenerConfig};
use pingora::proxy::HttpProxy;
use pingora::server::Server;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::services::listening::Service;
use tracing::info;

use crate::admin::AdminApp;
use crate::config::Config;
use crate::engine::Front;
use crate::engine::pingora::Router;
use crate::state::State;

/// Start tether with `config` and serve until a signal stops it. `upgrade`: take the listeners
/// over from a running tether (Pingora's graceful upgrade, see README).
pub fn run(config: Config, config_path: &std::path::Path, upgrade: bool) -> anyhow::Result<()> {
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tether-redis")
        .enable_all()
        .build()
        .context("starting the Redis I/O runtime")?;
    let state = Arc::new(io.block_on(State::build(config.clone(), config_path))?);
    io.spawn(state.clone().keep_tunnel_pins_alive());
    io.spawn(state.clone().reload_on_sighup());
    io.spawn(exit_on_sigint());
    io.spawn(state.clone().follow_admin_states());
    io.spawn(crate::health::run(state.clone()));

    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.server.graceful_shutdown_timeout.as_secs()),
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool,
        upgrade_sock: config.server.upgrade_sock.to_string_lossy().into_owned(),
        // tether's policy (crate::http::may_resend, crate::route::connect_failed) decides each
        // retry; this is Pingora's outer cap, the same budget: connect_retries + 2 attempts.
        max_retries: crate::http::pingora_max_retries(config.upstream.connect_retries),
        // One current-thread runtime per worker thread (Pingora's "no steal" flavour) instead of
        // a work-stealing one: tokio's work-stealing scheduler runs the task a wake-up just made
        // ready first (its LIFO slot), which starved some WebSockets under load (p99 74-110 ms
        // against HAProxy's 27-30 for 1,000 echoing sockets, tests/bench s3; 35 ms without it).
        // Nothing in tether blocks a worker: the Engine.IO pin is awaited by the lean engine.
        work_stealing: false,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    // Pingora's proxy, behind tether's front (src/engine.rs), which reads every request head
    // and gives requests with a body (and HTTP/1.0) to it, the rest to the lean engine.
    let mut pingora_proxy = HttpProxy::new(
        Router {
            state: state.clone(),
        },
        server.configuration.clone(),
    );
    pingora_proxy.handle_init_modules();
    // HTTP/2 from clients: Pingora's bounded defaults, with tether's limits (bound at start).
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_concurrent_streams(config.server.h2_max_concurrent_streams)
        .max_header_list_size(config.server.h2_max_header_list_bytes)
        .initial_window_size(config.server.h2_stream_window_bytes)
        .initial_connection_window_size(config.server.h2_connection_window_bytes);
    pingora_proxy.h2_options = Some(h2);
    let mut proxy = Service::new(
        "tether proxy".to_string(),
        Front::new(pingora_proxy, state.clone()),
    );
    for addr in config
        .server
        .listen
        .iter()
        .chain(&config.server.listen_redirect)
    {
        // No read buffer in front of client sockets. Pingora's default is a 64 KiB
        // `BufReader`, zero-filled when the connection is accepted, so every connection held
        // 64 KiB of resident memory (an idle WebSocket through tether cost 64 KiB against
        // HAProxy's 4 KiB, tests/bench s4); Pingora parses heads and bodies into buffers of its
        // own anyway, so the BufReader only added a copy. Upstream sockets are unbuffered too.
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string())
                .l4_buffer(L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE)),
        );
    }
    if let Some(resolver) = &state.tls {
        for addr in &config.server.listen_tls {
            // Certificates come from tether's resolver (checked by config validation, chosen by
            // SNI, swapped on reload), never from files Pingora would read (and panic on).
            let mut tls = TlsSettings::with_callbacks(Box::new(crate::tls::HandshakeCounter))
                .context("TLS settings")?;
            tls.set_cert_resolver(resolver.clone());
            tls.enable_h2();
            proxy.add_listener(
                ListenerConfig::tcp(addr.to_string())
                    .tls(tls)
                    .l4_buffer(L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE)),
            );
        }
    }
    let state_for_phases = state.clone();
    let mut admin = Service::new("tether admin".to_string(), AdminApp::new(state));
    admin.add_tcp(&config.admin.listen.to_string());
    server.add_service(proxy);
    server.add_service(admin);

    info!(
        listen = ?config.server.listen,
        listen_tls = ?config.server.listen_tls,
        listen_redirect = ?config.server.listen_redirect,
        admin = %config.admin.listen,
        backends = config.backends.len(),
        policy = config.affinity.policy.as_str(),
        "tether starting"
    );
    let mut phases = server.watch_execution_phase();
    let watcher = state_for_phases.clone();
    io.spawn(async move {
        use pingora::server::ExecutionPhase as P;
        loop {
            let phase = match phases.recv().await {
                Ok(p) => p,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            };
            if matches!(
                phase,
                P::GracefulUpgradeTransferringFds
                    | P::GracefulUpgradeCloseTimeout
                    | P::GracefulTerminate
                    | P::ShutdownStarted
            ) {
                watcher
                    .stopping
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    // `run_forever` never returns; the Redis runtime must live as long as the process.
    std::mem::forget(io);
    server.run_forever()
}

/// SIGINT stops tether at once, by exiting here rather than through Pingora's fast shutdown.
/// That one stops its per-thread runtimes one by one without first ending the accept loops
/// (only SIGTERM and SIGQUIT send them the shutdown watch): an accept loop whose listener was
/// registered on a runtime already stopped then fails at once, forever, without yielding, so its
/// own runtime never stops and the process spun at 100% CPU logging "Accept() failed" instead
/// of exiting (`tests/websocket.rs`, `sigint_stops_tether_at_once_right_after_a_websocket`: about
/// one SIGINT in seven right after a WebSocket closed, two proxy threads). A fast shutdown has
/// nothing to finish: requests in flight are cut either way.
async fn exit_on_sigint() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::interrupt()) {
        Ok(mut sigint) => {
            sigint.recv().await;
            info!("SIGINT received: stopping at once");
            std::process::exit(0);
        }
        // Pingora's own handler still stops the process (with the race above).
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGINT"),
    }
}
