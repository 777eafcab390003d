//! tether: a sticky HTTP load balancer on Pingora that keeps its session -> backend map in Redis.
//!
//! Crate map:
//! - [`config`]: the TOML file shape, validation with FILE:LINE:COL diagnostics, the runtime config.
//! - [`backend`]: the configured backends, their live state (in-flight requests, passive ejection).
//! - [`health`]: active HTTP health checks of every backend (`[health]`), rise/fall, reloads.
//! - [`selection`]: assignment policies for new keys and the deterministic fail-open hash.
//! - [`affinity`]: key extraction and hashing, signed insert cookies, local cache, Redis map.
//! - [`state`]: the shared state: live (reloadable) config, pins, tunnels, operator states.
//! - [`route`]: the routing core, protocol-neutral: extract key, look up, pick, pin, learn, record.
//! - [`http`]: the HTTP/1 policy every engine applies: header edits, strict framing, resends,
//!   failure statuses, tether's own error answers, head limits, what reload may change.
//! - [`engine`]: the front that reads every request head, the lean HTTP/1 engine (requests
//!   without a body, WebSocket tunnels) and the Pingora engine (requests with a body).
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`metrics`]: every Prometheus metric, named in one place.
//! - [`tls`]: certificates for TLS listeners: loaded and checked, chosen by SNI, swapped on
//!   reload.
//! - [`upstream`]: connections to a backend, plain or TLS, for the lean engine and health checks.
//! - [`server`]: wires the above into a Pingora `Server`.

pub mod admin;
pub mod affinity;
pub mod backend;
pub mod config;
pub mod engine;
pub mod health;
pub mod http;
pub mod metrics;
pub mod route;
pub mod selection;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
