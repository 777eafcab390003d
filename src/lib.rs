//! tether: a sticky HTTP load balancer on Pingora that keeps its session -> backend map in Redis.
//!
//! Crate map:
//! - [`config`]: the TOML file shape, validation with FILE:LINE:COL diagnostics, the runtime config.
//! - [`backend`]: the configured backends, their live state (in-flight requests, passive ejection).
//! - [`health`]: active HTTP health checks of every backend (`[health]`), rise/fall, reloads.
//! - [`selection`]: assignment policies for new keys and the deterministic fail-open hash.
//! - [`affinity`]: key extraction and hashing, signed insert cookies, local cache, Redis map.
//! - [`routing`]: the Pingora `ProxyHttp` implementation: extract key, look up, pick, pin, learn.
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`metrics`]: every Prometheus metric, named in one place.
//! - [`state`]: the shared state: live (reloadable) config, pins, tunnels, operator states.
//! - [`server`]: wires the above into a Pingora `Server`.

pub mod admin;
pub mod affinity;
pub mod backend;
pub mod config;
pub mod fast;
pub mod health;
pub mod metrics;
pub mod routing;
pub mod selection;
pub mod server;
pub mod state;
