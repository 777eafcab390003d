//! Every Prometheus metric tether exports, named in one place and registered once.
//!
//! They live in the `prometheus` crate's default registry (0.14, the version `pingora-prometheus`
//! uses), which the admin listener serves at `/metrics`. Label values come from small known sets:
//! configured backend ids, status classes, fixed reasons. Never anything per client.

use std::sync::OnceLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec,
};

use crate::config::Policy;

/// Metric names: one constant each, so dashboards and docs have a single source.
pub mod names {
    pub const REQUESTS: &str = "tether_requests_total";
    pub const REQUEST_DURATION: &str = "tether_request_duration_seconds";
    pub const ACTIVE_REQUESTS: &str = "tether_backend_active_requests";
    pub const OPEN_WEBSOCKETS: &str = "tether_backend_open_websockets";
    pub const CONNECT_FAILURES: &str = "tether_upstream_connect_failures_total";
    pub const RETRIES: &str = "tether_retries_total";
    pub const UPSTREAM_ERRORS: &str = "tether_upstream_errors_total";
    pub const LOOKUPS: &str = "tether_affinity_lookups_total";
    pub const ASSIGNMENTS: &str = "tether_assignments_total";
    pub const REASSIGNMENTS: &str = "tether_reassignments_total";
    pub const LEARNED: &str = "tether_affinity_learned_total";
    pub const INVALID_KEYS: &str = "tether_invalid_keys_total";
    pub const INVALIDATIONS: &str = "tether_affinity_invalidations_total";
    pub const REFRESHES: &str = "tether_affinity_refreshes_total";
    pub const REDIS_UP: &str = "tether_redis_up";
    pub const REDIS_ERRORS: &str = "tether_redis_errors_total";
    pub const REDIS_DURATION: &str = "tether_redis_command_duration_seconds";
    pub const RELOADS: &str = "tether_config_reloads_total";
    pub const BACKEND_UP: &str = "tether_backend_up";
    pub const BACKEND_STATE: &str = "tether_backend_state";
    pub const PINNED_SESSIONS: &str = "tether_backend_pinned_sessions";
    pub const HEALTH_CHECKS: &str = "tether_health_checks_total";
    pub const TLS_HANDSHAKES: &str = "tether_tls_handshakes_total";
    pub const TLS_HANDSHAKE_FAILURES: &str = "tether_tls_handshake_failures_total";
    pub const REQUESTS_BY_PROTOCOL: &str = "tether_requests_by_protocol_total";
    pub const TLS_CERT_EXPIRY: &str = "tether_tls_certificate_expiry_timestamp_seconds";
}

/// HTTP status classes used as the `class` label of [`names::REQUESTS`].
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Results of an affinity lookup, the `result` label of [`names::LOOKUPS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Served from this instance's cache: no Redis round trip.
    Cache,
    /// Found in Redis (or adopted from another instance that won the first assignment).
    Redis,
    /// Known nowhere: a new assignment by policy.
    Miss,
    /// Redis unavailable and not cached: the deterministic rendezvous hash chose.
    Fallback,
    /// The request carried no key; balanced by policy, nothing pinned.
    None,
}

impl Lookup {
    pub const ALL: [Lookup; 5] = [
        Lookup::Cache,
        Lookup::Redis,
        Lookup::Miss,
        Lookup::Fallback,
        Lookup::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Cache => "cache",
            Lookup::Redis => "redis",
            Lookup::Miss => "miss",
            Lookup::Fallback => "fallback",
            Lookup::None => "none",
        }
    }
}

/// Why a pinned key moved to another backend, the `reason` label of [`names::REASSIGNMENTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reassign {
    /// The pinned backend is down: failing active health checks, or ejected after a connect
    /// failure.
    Down,
    /// The pin names a backend that is not configured (or a value tether cannot read).
    Removed,
    /// Connecting to the pinned backend failed during this request.
    ConnectFailure,
    /// The pinned backend was disabled by an operator.
    Disabled,
    /// The pinned backend was draining and its drain deadline passed.
    DrainDeadline,
    /// An operator removed the pin (`DELETE /api/affinity/...`).
    Unpinned,
}

impl Reassign {
    pub fn as_str(self) -> &'static str {
        match self {
            Reassign::Down => "down",
            Reassign::Removed => "removed",
            Reassign::ConnectFailure => "connect_failure",
            Reassign::Disabled => "disabled",
            Reassign::DrainDeadline => "drain_deadline",
            Reassign::Unpinned => "unpinned",
        }
    }
}

/// Why a request failed because of its backend, the `kind` label of [`names::UPSTREAM_ERRORS`].
/// Only the final error of a request counts: a connect failure that was retried elsewhere is in
/// [`names::CONNECT_FAILURES`] and [`names::RETRIES`], not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// Connecting failed (refused, timed out, unreachable) and no other backend was left to try.
    Connect,
    /// The TLS handshake with a `tls = true` backend failed (its certificate not verified by
    /// its CAs or not for its `sni`, no common protocol version) and no other backend was left.
    Tls,
    /// The backend took longer than `read_timeout_ms` (or `write_timeout_ms`): answered 504.
    Timeout,
    /// The connection closed or was reset before the response was complete: 502 if no response
    /// header had arrived yet, else the client sees the response cut short.
    Closed,
    /// The backend sent something that is not valid HTTP.
    Protocol,
    /// Anything else on the upstream side.
    Other,
}

impl UpstreamError {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Tls => "tls",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Closed => "closed",
            UpstreamError::Protocol => "protocol",
            UpstreamError::Other => "other",
        }
    }
}

/// Every metric, registered once in the default registry.
pub struct Metrics {
    pub requests: IntCounterVec,
    /// `lookups` resolved per result once: the request path never looks a label up.
    lookup_counters: [IntCounter; 5],
    /// `assignments` resolved per policy once, likewise (one per new session).
    assignment_counters: [IntCounter; 4],
    pub request_duration: HistogramVec,
    pub active_requests: IntGaugeVec,
    pub open_websockets: IntGaugeVec,
    pub connect_failures: IntCounterVec,
    pub retries: IntCounter,
    pub upstream_errors: IntCounterVec,
    pub lookups: IntCounterVec,
    pub assignments: IntCounterVec,
    pub reassignments: IntCounterVec,
    pub learned: IntCounter,
    pub invalid_keys: IntCounterVec,
    pub invalidations: IntCounter,
    pub refreshes: IntCounterVec,
    pub redis_up: IntGauge,
    pub redis_errors: IntCounter,
    pub redis_duration: Histogram,
    pub reloads: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_state: IntGaugeVec,
    pub pinned_sessions: IntGaugeVec,
    pub health_checks: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    /// By [`crate::tls::HandshakeFailure`], in its order.
    pub tls_handshake_failures: [IntCounter; crate::tls::HandshakeFailure::ALL.len()],
    /// By [`crate::route::Protocol`], then plain (0) or TLS (1): resolved once, counted per
    /// request without a label lookup.
    requests_by_protocol: [[IntCounter; 2]; 3],
    pub tls_cert_expiry: IntGaugeVec,
}

impl Metrics {
    /// The counter of requests of `protocol`, over TLS or not.
    pub fn by_protocol(&self, protocol: crate::route::Protocol, tls: bool) -> &IntCounter {
        &self.requests_by_protocol[protocol as usize][usize::from(tls)]
    }

    /// The process-wide metrics, registered on first use.
    pub fn get() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::register)
    }

    fn register() -> Metrics {
        use names::*;
        // Registration only fails on a duplicate name, which `OnceLock` rules out.
        const OK: &str = "metric registered once";
        let lookups = register_int_counter_vec!(
            Opts::new(
                LOOKUPS,
                "Affinity lookups by result: cache, redis, miss, fallback, none"
            ),
            &["result"]
        )
        .expect(OK);
        let assignments = register_int_counter_vec!(
            Opts::new(ASSIGNMENTS, "New keys pinned, by assignment policy"),
            &["policy"]
        )
        .expect(OK);
        Metrics {
            lookup_counters: Lookup::ALL.map(|l| lookups.with_label_values(&[l.as_str()])),
            assignment_counters: Policy::ALL.map(|p| assignments.with_label_values(&[p.as_str()])),
            requests: register_int_counter_vec!(
                Opts::new(REQUESTS, "Requests answered, by backend (\"none\" if none was chosen) and status class"),
                &["backend", "class"]
            )
            .expect(OK),
            request_duration: register_histogram_vec!(
                HistogramOpts::new(REQUEST_DURATION, "Time from request headers to the end of the response, by backend")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["backend"]
            )
            .expect(OK),
            active_requests: register_int_gauge_vec!(
                Opts::new(ACTIVE_REQUESTS, "Requests in flight to each backend"),
                &["backend"]
            )
            .expect(OK),
            open_websockets: register_int_gauge_vec!(
                Opts::new(
                    OPEN_WEBSOCKETS,
                    "Upgraded connections (WebSockets) open to each backend; also counted in active requests"
                ),
                &["backend"]
            )
            .expect(OK),
            connect_failures: register_int_counter_vec!(
                Opts::new(CONNECT_FAILURES, "Connections to a backend that were refused or timed out"),
                &["backend"]
            )
            .expect(OK),
            retries: register_int_counter!(RETRIES, "Requests retried on another backend after a connect failure").expect(OK),
            upstream_errors: register_int_counter_vec!(
                Opts::new(
                    UPSTREAM_ERRORS,
                    "Requests that failed because of their backend, by kind: connect, tls, timeout, closed, protocol, other"
                ),
                &["backend", "kind"]
            )
            .expect(OK),
            lookups,
            assignments,
            reassignments: register_int_counter_vec!(
                Opts::new(REASSIGNMENTS, "Pinned keys moved to another backend, by reason"),
                &["reason"]
            )
            .expect(OK),
            learned: register_int_counter!(LEARNED, "Keys pinned from a backend's Set-Cookie").expect(OK),
            invalid_keys: register_int_counter_vec!(
                Opts::new(INVALID_KEYS, "Keys ignored as absent, by reason: too_long, bad_signature, expired"),
                &["reason"]
            )
            .expect(OK),
            invalidations: register_int_counter!(
                INVALIDATIONS,
                "Reassignments by other instances applied to this instance's cache (Redis pub/sub)"
            )
            .expect(OK),
            refreshes: register_int_counter_vec!(
                Opts::new(REFRESHES, "Sliding-TTL refreshes sent to Redis, by result: ok, restored, changed, failed, dropped"),
                &["result"]
            )
            .expect(OK),
            redis_up: register_int_gauge!(REDIS_UP, "1 while Redis answers, 0 while tether fails open").expect(OK),
            redis_errors: register_int_counter!(REDIS_ERRORS, "Redis commands that failed or timed out").expect(OK),
            redis_duration: register_histogram!(
                HistogramOpts::new(REDIS_DURATION, "Redis round trips of the proxy workers (request commands and batched session counts)")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25])
            )
            .expect(OK),
            requests_by_protocol: {
                let vec = register_int_counter_vec!(
                    Opts::new(REQUESTS_BY_PROTOCOL, "Requests an engine served or answered (not those refused at the head or redirected), by the HTTP version the client used (http/1.0, http/1.1, h2) and scheme (http, https)"),
                    &["protocol", "scheme"]
                )
                .expect(OK);
                crate::route::Protocol::ALL.map(|p| {
                    ["http", "https"].map(|scheme| vec.with_label_values(&[p.as_str(), scheme]))
                })
            },
            tls_handshakes: register_int_counter_vec!(
                Opts::new(TLS_HANDSHAKES, "Completed TLS handshakes on the TLS listeners, by TLS version: 1.2, 1.3"),
                &["version"]
            )
            .expect(OK),
            tls_handshake_failures: {
                let vec = register_int_counter_vec!(
                    Opts::new(TLS_HANDSHAKE_FAILURES, "TLS handshakes on the TLS listeners that failed, by reason: not_tls (the bytes were no TLS ClientHello), incompatible (no common version, cipher suite or ALPN protocol), client_alert (the client refused, e.g. our certificate), closed (the client left mid-handshake), timeout (not done within 60 s), other"),
                    &["reason"]
                )
                .expect(OK);
                crate::tls::HandshakeFailure::ALL.map(|r| vec.with_label_values(&[r.as_str()]))
            },
            tls_cert_expiry: register_int_gauge_vec!(
                Opts::new(TLS_CERT_EXPIRY, "When each configured certificate expires (its notAfter, Unix seconds), by its first name"),
                &["certificate"]
            )
            .expect(OK),
            reloads: register_int_counter_vec!(
                Opts::new(RELOADS, "Configuration reloads (SIGHUP or POST /api/reload), by result: ok, failed"),
                &["result"]
            )
            .expect(OK),
            backend_up: register_int_gauge_vec!(
                Opts::new(BACKEND_UP, "1 while a backend passes health checks and is not ejected"),
                &["backend"]
            )
            .expect(OK),
            backend_state: register_int_gauge_vec!(
                Opts::new(BACKEND_STATE, "1 for a backend's operator state: enabled, draining or disabled"),
                &["backend", "state"]
            )
            .expect(OK),
            pinned_sessions: register_int_gauge_vec!(
                Opts::new(PINNED_SESSIONS, "Sessions pinned to a backend in Redis (approximate, counted at scrape)"),
                &["backend"]
            )
            .expect(OK),
            health_checks: register_int_counter_vec!(
                Opts::new(HEALTH_CHECKS, "Active health checks by backend and result: ok, failed"),
                &["backend", "result"]
            )
            .expect(OK),
        }
    }
}

impl Metrics {
    /// Count one affinity lookup.
    pub fn lookup(&self, result: Lookup) {
        self.lookup_counters[result as usize].inc();
    }

    /// Count one new key pinned by `policy`.
    pub fn assigned(&self, policy: Policy) {
        self.assignment_counters[policy as usize].inc();
    }
}

/// Index into [`STATUS_CLASSES`] for a status code, `None` for codes outside 100..=599.
pub fn status_class(status: u16) -> Option<usize> {
    match status {
        100..=599 => Some((status / 100 - 1) as usize),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_counters_are_indexed_by_discriminant() {
        for (i, l) in Lookup::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i);
        }
        let m = Metrics::get();
        let before = m.lookups.with_label_values(&["fallback"]).get();
        m.lookup(Lookup::Fallback);
        assert_eq!(m.lookups.with_label_values(&["fallback"]).get(), before + 1);
    }

    #[test]
    fn assignment_counters_are_indexed_by_discriminant() {
        for (i, p) in Policy::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
            assert_eq!(p.as_str(), Policy::NAMES[i]);
        }
        let m = Metrics::get();
        let before = m.assignments.with_label_values(&["weighted"]).get();
        m.assigned(Policy::Weighted);
        assert_eq!(
            m.assignments.with_label_values(&["weighted"]).get(),
            before + 1
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(200), Some(1));
        assert_eq!(status_class(503), Some(4));
        assert_eq!(status_class(0), None);
        assert_eq!(STATUS_CLASSES[status_class(101).unwrap()], "1xx");
    }
}
