//! `tether run -c FILE` serves; `tether check FILE...` validates configuration files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether::config::Config;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: Pingora allocates and frees per request, and glibc's
/// malloc/free were ~10% of tether's CPU under load (tests/bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Sticky HTTP load balancer with the session map in Redis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "conf/tether.toml")]
        config: PathBuf,
        /// Take the listening sockets over from a running tether (graceful upgrade): start the
        /// new process with -u, then send SIGQUIT to the old one.
        #[arg(short, long)]
        upgrade: bool,
    },
    /// Validate configuration files: exit 0, or print every problem as FILE:LINE:COL and exit 1.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => {
            let mut ok = true;
            for f in &files {
                match Config::load(f) {
                    Ok(c) => {
                        for w in &c.warnings {
                            println!("{}", w.located(f, "warning: "));
                        }
                        println!("{}: ok", f.display())
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run { config, upgrade } => {
            use tracing_subscriber::filter::FilterExt;
            use tracing_subscriber::prelude::*;
            tracing_subscriber::registry()
                // Counts failed TLS handshakes from Pingora's ERROR lines, whatever the log
                // filter lets through.
                .with(
                    tether::tls::HandshakeFailures
                        .with_filter(tracing_subscriber::filter::LevelFilter::ERROR),
                )
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                        // One filter, not two stacked: a stacked filter that lets a span
                        // through makes the registry record it even when the other drops it,
                        // and the h2 crate opens trace spans per frame (a sixth of tether's
                        // CPU under h2load). Combined, what `RUST_LOG` disables costs nothing.
                        .with_filter(log_filter().and(NotAFailure)),
                )
                .init();
            // Parse and validate before anything binds a socket.
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match tether::server::run(cfg, &config, upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tether: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// mimalloc asks for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on the memory it reserves,
/// so on kernels with THP in `madvise` mode (Debian's default) every first touch of a 2 MiB
/// region faulted in 2 MiB: an idle WebSocket through tether cost 176 KiB of RSS instead of
/// 52 KiB (tests/bench s4, `AnonHugePages` in /proc/PID/smaps_rollup). `PR_SET_THP_DISABLE`
/// makes every later fault in this process use small pages; it is inherited by children, which
/// tether has none of. A kernel without it answers EINVAL: nothing to do then.
fn disable_transparent_huge_pages() {
    // SAFETY: prctl(PR_SET_THP_DISABLE) only sets a flag on this process's memory map.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        eprintln!(
            "tether: could not disable transparent huge pages ({}): idle connections may use more memory",
            std::io::Error::last_os_error()
        );
    }
}

/// Drops the one ERROR line of pingora-core 0.9.1 that reports no failure: "failed to acquire
/// reusable stream" (`pingora_core::connectors`, its only `error!`) is logged when a pooled
/// upstream connection's idle watcher has not yet dropped its handle as the connection is taken
/// (`Arc::try_unwrap` loses that race); Pingora then opens a new connection and the request
/// goes on. Under Socket.IO polling it came dozens of times a minute with no client error, and
/// an ERROR line must mean something failed. Written up in
/// docs/upstream/pingora-te-last-token.md, with the TE framing report.
struct NotAFailure;

impl<S> tracing_subscriber::layer::Filter<S> for NotAFailure {
    fn enabled(
        &self,
        _meta: &tracing::Metadata<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        use tracing_log::NormalizeEvent;
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        !(*meta.level() == tracing::Level::ERROR && meta.target() == "pingora_core::connectors")
    }
}

/// `RUST_LOG` (default `info`), with Pingora's own targets capped at `info` unless the filter
/// names them: at `debug` Pingora prints whole request and response headers (cookies, session
/// ids, `Authorization`), and tether's logs must never carry a session key or the admin token.
/// The cap comes first, so `pingora=debug` or `pingora_proxy=debug` in `RUST_LOG` replaces or
/// outranks it: an operator who writes that asks for those lines knowingly.
fn log_filter() -> EnvFilter {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "info".to_string());
    EnvFilter::try_new(format!("pingora=info,{spec}")).unwrap_or_else(|e| {
        eprintln!("tether: ignoring RUST_LOG ({e}): logging at info");
        EnvFilter::new("info")
    })
}
