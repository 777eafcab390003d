//! `rideshare`: runs one instance of the demo app (see the library for what it serves).
//!
//! ```text
//! rideshare --id a --listen 127.0.0.1:3001 --redis redis://127.0.0.1:6379 --session-secret S
//! ```

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Runs one rideshare instance.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Instance name, sent in `x-backend-id` and in Socket.IO messages.
    #[arg(long)]
    id: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Redis shared by the instances (e.g. redis://127.0.0.1:6379). Without it: embedded mode,
    /// one process only.
    #[arg(long, env = "REDIS_URL")]
    redis: Option<String>,
    /// Key that signs the session cookies; instances behind one balancer must share it.
    /// Without it, a random one (other instances then cannot read this one's cookies).
    #[arg(long, env = "RIDESHARE_SESSION_SECRET", hide_env_values = true)]
    session_secret: Option<String>,
    /// Session lifetime without activity, in seconds.
    #[arg(long, default_value_t = rideshare::DEFAULT_SESSION_TTL.as_secs())]
    session_ttl_secs: u64,
    /// Mark the session cookie `Secure` (when clients use HTTPS).
    #[arg(long)]
    cookie_secure: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();

    let mut config = rideshare::Config::new(args.id);
    config.redis_url = args.redis;
    config.cookie_secure = args.cookie_secure;
    config.session_ttl = std::time::Duration::from_secs(args.session_ttl_secs);
    match args.session_secret {
        Some(secret) => config.session_secret = secret.into_bytes(),
        None => tracing::warn!(
            "no --session-secret (or RIDESHARE_SESSION_SECRET): using a random one, so other \
             instances cannot read this instance's session cookies"
        ),
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    rideshare::serve(listener, config, shutdown_signal()).await
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
