//! Configuration: the TOML file shape, its validation, and the runtime [`Config`] the rest of the
//! crate sees.
//!
//! Two layers, as in Sōzu and River: `file::*` structs are serde-only (`deny_unknown_fields`, every
//! validated field wrapped in [`toml::Spanned`]); [`Config`] holds only validated types. Validation
//! collects every problem before failing, each as `FILE:LINE:COL: message`.
//!
//! Precedence, highest first: command line > `TETHER_*` environment variables > file > defaults.
//! This module owns the file and the environment; `main` owns the command line.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use toml::Spanned;

/// Default number of proxy worker threads.
pub const DEFAULT_THREADS: u64 = 1;
/// Default seconds to keep serving after SIGTERM before closing listeners.
pub const DEFAULT_GRACE_PERIOD_SECS: u64 = 5;
/// Default seconds in-flight requests may still take after the grace period.
pub const DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_SECS: u64 = 5;
/// Default idle connections kept per upstream pool: enough for an HTTP/2 client's 1,000 streams
/// in flight to find a pooled connection on their next request (with 128, h2load's 100 x 10 made
/// seven in eight requests open a backend connection: 1.7x the CPU per request). HAProxy keeps
/// idle server connections without a limit by default.
pub const DEFAULT_UPSTREAM_KEEPALIVE_POOL: u64 = 1024;
/// Default path of the socket a new tether (`run -u`) takes the listeners over from.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/tether_upgrade.sock";
/// Default idle time a client keep-alive connection is kept open (NGINX: 75 s).
pub const DEFAULT_KEEPALIVE_TIMEOUT_SECS: u64 = 60;
/// Default time a client has to send a whole request head (NGINX `client_header_timeout` 60 s,
/// HAProxy `timeout http-request` commonly 10 s).
pub const DEFAULT_CLIENT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Default time one write to a client may take before the client is let go (NGINX
/// `send_timeout` 60 s; HAProxy `timeout client`).
pub const DEFAULT_CLIENT_SEND_TIMEOUT_MS: u64 = 60_000;
/// Default limit on a request's target plus headers; larger ones get 414 or 431.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: u64 = 65_536;
/// Default limit on the number of request header lines (HAProxy `tune.http.maxhdr`: 101).
pub const DEFAULT_MAX_REQUEST_HEADERS: u64 = 100;
/// Default admin listener: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Default TCP connect timeout to a backend.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Default longest wait for response bytes from a backend.
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 60_000;
/// Default longest wait to write to a backend.
pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 60_000;
/// Default idle time before a pooled upstream connection is closed.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default number of other backends tried after a connect failure.
pub const DEFAULT_CONNECT_RETRIES: u64 = 2;
/// Default idle time after which an upgraded (WebSocket) connection is closed, like HAProxy's
/// `timeout tunnel`.
pub const DEFAULT_TUNNEL_TIMEOUT_SECS: u64 = 3600;
/// Default time a backend that failed a connect is kept out of rotation.
pub const DEFAULT_PASSIVE_EJECT_SECS: u64 = 10;
/// Default lifetime of an idle pin.
pub const DEFAULT_TTL_SECS: u64 = 86_400;
/// Default longest accepted affinity key, in bytes.
pub const DEFAULT_MAX_KEY_BYTES: u64 = 256;
/// Default capacity of the per-instance key cache.
pub const DEFAULT_CACHE_ENTRIES: u64 = 1_000_000;
/// Default name of tether's own cookie in insert mode.
pub const DEFAULT_INSERT_COOKIE: &str = "tether";
/// Default prefix of every Redis key and channel.
pub const DEFAULT_KEY_PREFIX: &str = "tether:";
/// Default longest wait for one Redis command.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 200;
/// Default backend weight.
pub const DEFAULT_WEIGHT: u64 = 1;
/// Default active health check path.
pub const DEFAULT_HEALTH_PATH: &str = "/";
/// Default status an active health check expects.
pub const DEFAULT_HEALTH_STATUS: u64 = 200;
/// Default time between two checks of one backend.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 2_000;
/// Default limit on one check (connect, request, response head).
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 1_000;
/// Default consecutive successes that bring a down backend up.
pub const DEFAULT_HEALTH_RISE: u64 = 2;
/// Default consecutive failures that take an up backend down.
pub const DEFAULT_HEALTH_FALL: u64 = 3;
/// Shortest secret accepted for the key hash and cookie signatures.
pub const MIN_SECRET_BYTES: usize = 16;

/// Environment variable overriding `affinity.hash_key`.
pub const ENV_HASH_KEY: &str = "TETHER_HASH_KEY";
/// Environment variable overriding `affinity.insert.secrets` (comma-separated).
pub const ENV_INSERT_SECRETS: &str = "TETHER_INSERT_SECRETS";
/// Environment variable overriding `admin.token`.
pub const ENV_ADMIN_TOKEN: &str = "TETHER_ADMIN_TOKEN";
/// Environment variable overriding `redis.url`.
pub const ENV_REDIS_URL: &str = "TETHER_REDIS_URL";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub upstream: UpstreamSettings,
    pub affinity: AffinitySettings,
    /// `None`: the map is kept in process (one instance only).
    pub redis: Option<RedisSettings>,
    /// `None`: no active health checks (passive ejection only).
    pub health: Option<HealthSettings>,
    pub backends: Vec<BackendSettings>,
    /// `None`: no TLS listener.
    pub tls: Option<TlsSettings>,
    /// Not errors, but worth saying (`tether check` prints them, start-up and reload log them):
    /// a certificate expiring soon.
    pub warnings: Vec<Diagnostic>,
}

/// `[tls]`: the certificates of every TLS listener (`[server] listen_tls`), chosen by SNI.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// The first is the default, for a client without SNI or naming a host no other serves.
    pub certs: Vec<crate::tls::Certificate>,
}

/// Active HTTP health checks, the same for every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Request path (and query), e.g. `/healthz`.
    pub path: String,
    /// `Host` header of the check; the backend's address when `None`.
    pub host: Option<String>,
    pub expected_status: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Plain HTTP listeners.
    pub listen: Vec<SocketAddr>,
    /// TLS listeners (the certificates of [`TlsSettings`]; HTTP/2 and HTTP/1.1 by ALPN).
    pub listen_tls: Vec<SocketAddr>,
    /// Plain HTTP listeners that answer every request with a redirect to HTTPS (but ACME
    /// challenges, which are proxied: [`crate::http::redirects`]).
    pub listen_redirect: Vec<SocketAddr>,
    pub threads: usize,
    pub grace_period: Duration,
    pub graceful_shutdown_timeout: Duration,
    pub upstream_keepalive_pool: usize,
    /// Unix socket a new tether started with `run -u` takes the listeners over from.
    pub upgrade_sock: PathBuf,
    /// One structured log line per request (target `tether::access`).
    pub access_log: bool,
    /// Idle client keep-alive connections are closed after this.
    pub keepalive_timeout: Duration,
    /// A client must send a whole request head within this (after the keep-alive idle time on
    /// a reused connection).
    pub client_header_timeout: Duration,
    /// A write to a client (and its flush) must be done within this; a client that stops
    /// reading is let go.
    pub client_send_timeout: Duration,
    /// Request target plus headers, in bytes; beyond it 414 (target) or 431 (headers).
    pub max_request_header_bytes: usize,
    /// Request header lines; beyond it 431.
    pub max_request_headers: usize,
    /// HTTP/2 (TLS listeners): streams a client may have open at once on one connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: the most a request's decoded header list may take (HPACK's count: names, values
    /// and 32 bytes per field).
    pub h2_max_header_list_bytes: u32,
    /// HTTP/2 flow control: what a client may send on one stream before tether reads it
    /// (SETTINGS_INITIAL_WINDOW_SIZE), and on the whole connection.
    pub h2_stream_window_bytes: u32,
    pub h2_connection_window_bytes: u32,
    /// Which engine serves requests without a body (see [`Engine`]).
    pub engine: Engine,
}

/// `[server] engine`: which engine serves plain requests without a body. Requests with a body
/// and HTTP/1.0 always go through Pingora's proxy; WebSocket upgrades and Engine.IO handshakes
/// always through tether's lean engine (released Pingora cannot hold them as tether needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// tether's lean HTTP/1 engine (the default): about a fifth of Pingora's instructions per
    /// keep-alive request.
    Lean,
    /// Pingora's proxy: a fallback for operators, and the other side of the differential
    /// tests (tests/differential.rs).
    Pingora,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Lean => "lean",
            Engine::Pingora => "pingora",
        }
    }
}

#[derive(Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Bearer token every admin request must carry (`/healthz` and `/readyz` excepted).
    pub token: Option<Secret>,
}

impl fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    /// Idle limit of upgraded connections (WebSockets), both directions; replaces the read
    /// timeouts once a request asks to upgrade.
    pub tunnel_timeout: Duration,
    pub connect_retries: usize,
    pub passive_eject: Duration,
}

#[derive(Debug, Clone)]
pub struct AffinitySettings {
    pub sources: Vec<KeySource>,
    pub policy: Policy,
    pub ttl: Duration,
    /// `None` only without Redis: a random key is drawn at start-up.
    pub hash_key: Option<Secret>,
    pub max_key_bytes: usize,
    pub cache_entries: usize,
    /// Present exactly when `sources` contains [`KeySource::Insert`].
    pub insert: Option<InsertSettings>,
}

/// Where an affinity key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The app's own session cookie, learned from the backend's `Set-Cookie`.
    Cookie(String),
    /// tether's own signed cookie.
    Insert,
    /// A request header.
    Header(HeaderName),
    /// A query parameter (percent-decoded).
    Query(String),
    /// The TCP peer's address.
    Ip,
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Cookie(n) => write!(f, "cookie:{n}"),
            KeySource::Insert => f.write_str("insert"),
            KeySource::Header(n) => write!(f, "header:{n}"),
            KeySource::Query(n) => write!(f, "query:{n}"),
            KeySource::Ip => f.write_str("ip"),
        }
    }
}

/// How a key without a pin chooses its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    LeastConnections,
    RoundRobin,
    Weighted,
    Rendezvous,
}

impl Policy {
    /// Every policy, in declaration order (`ALL[p as usize] == p`).
    pub const ALL: [Policy; 4] = [
        Policy::LeastConnections,
        Policy::RoundRobin,
        Policy::Weighted,
        Policy::Rendezvous,
    ];
    pub const NAMES: [&'static str; 4] =
        ["least_connections", "round_robin", "weighted", "rendezvous"];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::LeastConnections => "least_connections",
            Policy::RoundRobin => "round_robin",
            Policy::Weighted => "weighted",
            Policy::Rendezvous => "rendezvous",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "least_connections" => Policy::LeastConnections,
            "round_robin" => Policy::RoundRobin,
            "weighted" => Policy::Weighted,
            "rendezvous" => Policy::Rendezvous,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct InsertSettings {
    pub cookie: String,
    /// The first signs; all verify.
    pub secrets: Vec<Secret>,
    /// `Some(true)`: always `Secure`; `Some(false)`: never; `None` (the default): `Secure` on
    /// responses to requests that came over TLS (`listen_tls`), not on plain HTTP.
    pub secure: Option<bool>,
    pub same_site: SameSite,
    pub http_only: bool,
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

#[derive(Clone)]
pub struct RedisSettings {
    /// May carry a password: never log it (the `Debug` impl hides it; use [`redact_url`]).
    /// `redis://`, `rediss://` (TLS) or `redis+unix://`.
    pub url: String,
    pub key_prefix: String,
    pub timeout: Duration,
    /// `rediss://` only: the CA certificates (PEM) that verify the server instead of the
    /// system's roots, as read and checked at validation.
    pub ca: Option<CaCertificates>,
}

/// A CA bundle read from `[redis] ca_file`.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificates {
    /// As resolved (relative paths are relative to the config file's directory).
    pub path: PathBuf,
    /// The file's contents: one or more PEM certificates, each checked to be a usable trust
    /// anchor.
    pub pem: Vec<u8>,
}

impl CaCertificates {
    /// The certificates as Pingora's connectors take them (a backend's `ca_file`).
    pub fn for_pingora(&self) -> Vec<pingora::utils::tls::WrappedX509> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(&self.pem)
            // Validation parsed every one of them (`validate_ca_file`).
            .filter_map(Result::ok)
            .filter(|der| x509_parser::parse_x509_certificate(der).is_ok())
            .map(|der| {
                pingora::utils::tls::WrappedX509::new(der.to_vec(), pingora::utils::tls::parse_x509)
            })
            .collect()
    }
}

impl fmt::Debug for CaCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The contents are public, but long: the path and a digest of the bytes say enough (and
        // make a changed file show in the reload diff).
        write!(
            f,
            "CaCertificates({}, {})",
            self.path.display(),
            &blake3::hash(&self.pem).to_hex()[..16]
        )
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("ca", &self.ca)
            .finish()
    }
}

/// Query parameters of a Redis URL that carry credentials (`redis+unix:///s.sock?pass=...`).
const SECRET_QUERY_KEYS: [&str; 2] = ["pass", "password"];

/// A Redis URL with any credentials replaced by `***`, for logs and error messages: the user
/// info (`redis://user:password@host` -> `redis://***@host`) and the `pass` query parameter of
/// unix-socket URLs. Works on any text, parsable or not, and errs on the side of hiding.
pub fn redact_url(url: &str) -> String {
    // The query first: an '@' inside a password there must not move the user-info cut below.
    let mut out = match url.split_once('?') {
        Some((base, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if SECRET_QUERY_KEYS.iter().any(|s| k.eq_ignore_ascii_case(s)) => {
                        format!("{k}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            let mut out = format!("{base}?{}", pairs.join("&"));
            if let Some(f) = fragment {
                out.push('#');
                out.push_str(f);
            }
            out
        }
        None => url.to_string(),
    };
    let start = out.find("://").map_or(0, |i| i + 3);
    if let Some(at) = out[start..].rfind('@') {
        out = format!("{}***@{}", &out[..start], &out[start + at + 1..]);
    }
    out
}

#[derive(Debug, Clone)]
pub struct BackendSettings {
    pub id: String,
    /// As written in the file, for logs and the admin API.
    pub address_text: String,
    pub address: SocketAddr,
    pub weight: u32,
    /// `tls = true`: tether speaks TLS to this backend.
    pub tls: Option<BackendTls>,
}

/// TLS to a backend (`tls = true` in its `[[backend]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendTls {
    /// The name sent as SNI and checked against the backend's certificate: `sni`, else the host
    /// of `address` (an IP address is checked against the certificate's IP names, and sent as
    /// no SNI).
    pub sni: String,
    /// `ca_file`: the CAs that verify the backend instead of the system's roots.
    pub ca: Option<CaCertificates>,
    /// `tls_verify = false` accepts any certificate (a warning at every check).
    pub verify: bool,
}

/// Secret bytes: compared and used, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Values taken from the environment, which override the file.
#[derive(Debug, Default, Clone)]
pub struct EnvOverrides {
    pub hash_key: Option<String>,
    pub insert_secrets: Option<String>,
    pub redis_url: Option<String>,
    pub admin_token: Option<String>,
}

impl EnvOverrides {
    /// Read `TETHER_HASH_KEY`, `TETHER_INSERT_SECRETS` and `TETHER_REDIS_URL`.
    pub fn from_process_env() -> Self {
        let get = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        EnvOverrides {
            hash_key: get(ENV_HASH_KEY),
            insert_secrets: get(ENV_INSERT_SECRETS),
            redis_url: get(ENV_REDIS_URL),
            admin_token: get(ENV_ADMIN_TOKEN),
        }
    }
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based; `None` when the problem comes from the environment.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

/// Every problem found in one file, printed one per line as `FILE:LINE:COL: message`.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub diagnostics: Vec<Diagnostic>,
}

impl Diagnostic {
    /// `FILE:LINE:COL: <label>message` (`FILE: ...` without a position), as `tether check`
    /// prints it; `label` is e.g. `"warning: "`, or empty for an error.
    pub fn located<'a>(&'a self, path: &'a Path, label: &'a str) -> impl fmt::Display + 'a {
        struct Located<'a>(&'a Diagnostic, &'a Path, &'a str);
        impl fmt::Display for Located<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let Located(d, path, label) = self;
                match d.position {
                    Some((line, col)) => {
                        write!(f, "{}:{line}:{col}: {label}{}", path.display(), d.message)
                    }
                    None => write!(f, "{}: {label}{}", path.display(), d.message),
                }
            }
        }
        Located(self, path, label)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}", d.located(&self.path, ""))?;
        }
        Ok(())
    }
}

impl Config {
    /// Read, parse and validate `path`, applying the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_file_capped(path, MAX_CONFIG_FILE)
            .and_then(|b| String::from_utf8(b).map_err(|_| io::Error::other("it is not UTF-8")))
            .map_err(|e| ConfigError {
                path: path.to_path_buf(),
                diagnostics: vec![Diagnostic {
                    position: None,
                    message: format!("cannot read the file: {e}"),
                }],
            })?;
        Config::parse(path, &text, &EnvOverrides::from_process_env())
    }

    /// Parse and validate `text` (the contents of `path`) with the given environment overrides.
    pub fn parse(path: &Path, text: &str, env: &EnvOverrides) -> Result<Config, ConfigError> {
        let mut diags = Diags {
            text,
            list: Vec::new(),
            warnings: Vec::new(),
        };
        let parsed: Option<file::FileConfig> = match toml::from_str(text) {
            Ok(f) => Some(f),
            Err(e) => {
                let message = e.message().trim_end().to_string();
                match e.span() {
                    Some(span) => diags.at(span, message),
                    None => diags.global(message),
                }
                None
            }
        };
        // Relative paths in the file (`ca_file`) are relative to the file's directory.
        let dir = path.parent().unwrap_or(Path::new(""));
        let config = parsed.and_then(|f| validate(f, env, dir, &mut diags));
        match config {
            Some(c) if diags.list.is_empty() => Ok(c),
            _ => Err(ConfigError {
                path: path.to_path_buf(),
                diagnostics: diags.list,
            }),
        }
    }
}

/// Collects diagnostics, mapping byte spans to line and column.
struct Diags<'a> {
    text: &'a str,
    list: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Diags<'_> {
    fn warn_at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let position = Some(line_col(self.text, span.start));
        self.warnings.push(Diagnostic {
            position,
            message: message.into(),
        });
    }

    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let position = Some(line_col(self.text, span.start));
        self.list.push(Diagnostic {
            position,
            message: message.into(),
        });
    }

    /// A problem with no place in the file (a missing section): reported at 1:1.
    fn top(&mut self, message: impl Into<String>) {
        self.list.push(Diagnostic {
            position: Some((1, 1)),
            message: message.into(),
        });
    }

    fn global(&mut self, message: impl Into<String>) {
        self.list.push(Diagnostic {
            position: None,
            message: message.into(),
        });
    }

    /// Check an optional integer against `min..=max`, returning it or the default.
    fn range(
        &mut self,
        v: &Option<Spanned<u64>>,
        name: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        match v {
            None => default,
            Some(s) => {
                let n = *s.get_ref();
                if n < min || n > max {
                    self.at(s.span(), format!("`{name}` is {n}: expected {min}..={max}"));
                    default
                } else {
                    n
                }
            }
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

mod file {
    //! The file as written: serde only. Every field validated beyond its type is `Spanned`.
    use serde::Deserialize;
    use toml::Spanned;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct FileConfig {
        pub server: Option<Spanned<Server>>,
        pub admin: Option<Admin>,
        pub upstream: Option<Upstream>,
        pub affinity: Option<Spanned<Affinity>>,
        pub redis: Option<Spanned<Redis>>,
        pub health: Option<Spanned<Health>>,
        pub backend: Option<Vec<Spanned<Backend>>>,
        pub tls: Option<Spanned<Tls>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub certs: Option<Spanned<Vec<Spanned<CertPair>>>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CertPair {
        pub cert: Spanned<String>,
        pub key: Spanned<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Health {
        pub path: Option<Spanned<String>>,
        pub host: Option<Spanned<String>>,
        pub expected_status: Option<Spanned<u64>>,
        pub interval_ms: Option<Spanned<u64>>,
        pub timeout_ms: Option<Spanned<u64>>,
        pub rise: Option<Spanned<u64>>,
        pub fall: Option<Spanned<u64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Server {
        pub listen: Option<Vec<Spanned<String>>>,
        pub listen_tls: Option<Vec<Spanned<String>>>,
        pub listen_redirect: Option<Vec<Spanned<String>>>,
        pub threads: Option<Spanned<u64>>,
        pub grace_period_secs: Option<Spanned<u64>>,
        pub graceful_shutdown_timeout_secs: Option<Spanned<u64>>,
        pub upstream_keepalive_pool: Option<Spanned<u64>>,
        pub upgrade_sock: Option<Spanned<String>>,
        pub access_log: Option<bool>,
        pub keepalive_timeout_secs: Option<Spanned<u64>>,
        pub client_header_timeout_ms: Option<Spanned<u64>>,
        pub client_send_timeout_ms: Option<Spanned<u64>>,
        pub max_request_header_bytes: Option<Spanned<u64>>,
        pub max_request_headers: Option<Spanned<u64>>,
        pub h2_max_concurrent_streams: Option<Spanned<u64>>,
        pub h2_max_header_list_bytes: Option<Spanned<u64>>,
        pub h2_stream_window_bytes: Option<Spanned<u64>>,
        pub h2_connection_window_bytes: Option<Spanned<u64>>,
        pub engine: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Admin {
        pub listen: Option<Spanned<String>>,
        pub token: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Upstream {
        pub connect_timeout_ms: Option<Spanned<u64>>,
        pub read_timeout_ms: Option<Spanned<u64>>,
        pub write_timeout_ms: Option<Spanned<u64>>,
        pub idle_timeout_secs: Option<Spanned<u64>>,
        pub tunnel_timeout_secs: Option<Spanned<u64>>,
        pub connect_retries: Option<Spanned<u64>>,
        pub passive_eject_secs: Option<Spanned<u64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Affinity {
        pub sources: Option<Spanned<Vec<Spanned<String>>>>,
        pub policy: Option<Spanned<String>>,
        pub ttl_secs: Option<Spanned<u64>>,
        pub hash_key: Option<Spanned<String>>,
        pub max_key_bytes: Option<Spanned<u64>>,
        pub cache_entries: Option<Spanned<u64>>,
        pub insert: Option<Spanned<Insert>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Insert {
        pub cookie: Option<Spanned<String>>,
        pub secrets: Option<Spanned<Vec<Spanned<String>>>>,
        pub secure: Option<bool>,
        pub same_site: Option<Spanned<String>>,
        pub http_only: Option<bool>,
        pub max_age_secs: Option<Spanned<u64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Redis {
        pub url: Option<Spanned<String>>,
        pub key_prefix: Option<Spanned<String>>,
        pub timeout_ms: Option<Spanned<u64>>,
        pub ca_file: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Backend {
        pub id: Option<Spanned<String>>,
        pub address: Option<Spanned<String>>,
        pub weight: Option<Spanned<u64>>,
        pub tls: Option<Spanned<bool>>,
        pub sni: Option<Spanned<String>>,
        pub ca_file: Option<Spanned<String>>,
        pub tls_verify: Option<Spanned<bool>>,
    }
}

fn validate(f: file::FileConfig, env: &EnvOverrides, dir: &Path, d: &mut Diags) -> Option<Config> {
    let server = validate_server(f.server, d);
    let admin = validate_admin(f.admin, env, &server, d);
    let upstream = validate_upstream(f.upstream, d);
    let redis = validate_redis(f.redis, env, dir, d);
    let affinity = validate_affinity(f.affinity, env, redis.is_some(), d);
    let health = f.health.and_then(|h| validate_health(h, d));
    let backends = validate_backends(f.backend, dir, d);
    let tls = validate_tls(f.tls, server.as_ref(), dir, d);
    Some(Config {
        server: server?,
        admin: admin?,
        upstream,
        affinity: affinity?,
        redis,
        health,
        backends: backends?,
        tls,
        warnings: std::mem::take(&mut d.warnings),
    })
}

fn validate_tls(
    t: Option<Spanned<file::Tls>>,
    server: Option<&ServerSettings>,
    dir: &Path,
    d: &mut Diags,
) -> Option<TlsSettings> {
    let listeners = server.is_some_and(|s| !s.listen_tls.is_empty());
    let Some(t) = t else {
        if listeners {
            d.top("`[server] listen_tls` needs a [tls] section with `certs`");
        }
        return None;
    };
    let span = t.span();
    let t = t.into_inner();
    let Some(list) = t.certs.filter(|l| !l.get_ref().is_empty()) else {
        d.at(
            span,
            "[tls] needs `certs = [{ cert = \"cert.pem\", key = \"key.pem\" }]`",
        );
        return None;
    };
    if server.is_some() && !listeners {
        d.at(
            list.span(),
            "[tls] has certificates but no listener uses them: add `listen_tls` to [server]",
        );
    }
    let now = crate::affinity::cookie::unix_secs() as i64;
    let mut certs = Vec::new();
    for pair in list.into_inner() {
        let pair = pair.into_inner();
        let cert_path = dir.join(pair.cert.get_ref());
        let key_path = dir.join(pair.key.get_ref());
        match crate::tls::load(&cert_path, &key_path, now) {
            Ok((cert, warning)) => {
                if let Some(w) = warning {
                    d.warn_at(pair.cert.span(), w);
                }
                certs.push(cert);
            }
            Err(e) => {
                let span = if e.in_key {
                    pair.key.span()
                } else {
                    pair.cert.span()
                };
                d.at(
                    span,
                    format!("{} (relative paths are relative to this file)", e.message),
                );
            }
        }
    }
    (!certs.is_empty()).then_some(TlsSettings { certs })
}

fn validate_server(s: Option<Spanned<file::Server>>, d: &mut Diags) -> Option<ServerSettings> {
    let Some(s) = s else {
        d.top("missing [server] section: it needs at least `listen = [\"0.0.0.0:8080\"]`");
        return None;
    };
    let span = s.span();
    let s = s.into_inner();
    let mut listen = Vec::new();
    let mut listen_tls = Vec::new();
    let mut listen_redirect = Vec::new();
    let mut every: Vec<SocketAddr> = Vec::new();
    for (name, list, out) in [
        ("listen", &s.listen, &mut listen),
        ("listen_tls", &s.listen_tls, &mut listen_tls),
        ("listen_redirect", &s.listen_redirect, &mut listen_redirect),
    ] {
        if list.as_ref().is_some_and(|l| l.is_empty()) {
            d.at(
                span.clone(),
                format!("`{name}` is empty: give at least one address, or leave it out"),
            );
        }
        for a in list.iter().flatten() {
            match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) if out.contains(&addr) => {
                    d.at(a.span(), format!("`{addr}` is listed twice in `{name}`"))
                }
                Ok(addr) if every.contains(&addr) => d.at(
                    a.span(),
                    format!("`{addr}` is in two of `listen`, `listen_tls` and `listen_redirect`"),
                ),
                Ok(addr) => {
                    every.push(addr);
                    out.push(addr)
                }
                Err(_) => d.at(
                    a.span(),
                    format!(
                        "`{}` is not an IP:port address (e.g. 0.0.0.0:8080 or [::]:8080)",
                        a.get_ref()
                    ),
                ),
            }
        }
    }
    if s.listen.is_none() && s.listen_tls.is_none() && s.listen_redirect.is_none() {
        d.at(
            span.clone(),
            "[server] needs `listen` (plain HTTP) or `listen_tls` (TLS), e.g. listen = [\"0.0.0.0:8080\"]",
        );
    }
    let threads = d.range(&s.threads, "threads", DEFAULT_THREADS, 1, 256) as usize;
    let grace = d.range(
        &s.grace_period_secs,
        "grace_period_secs",
        DEFAULT_GRACE_PERIOD_SECS,
        0,
        3600,
    );
    let shutdown = d.range(
        &s.graceful_shutdown_timeout_secs,
        "graceful_shutdown_timeout_secs",
        DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_SECS,
        0,
        3600,
    );
    let pool = d.range(
        &s.upstream_keepalive_pool,
        "upstream_keepalive_pool",
        DEFAULT_UPSTREAM_KEEPALIVE_POOL,
        0,
        65_536,
    ) as usize;
    let upgrade_sock = match &s.upgrade_sock {
        None => PathBuf::from(DEFAULT_UPGRADE_SOCK),
        Some(p) if p.get_ref().starts_with('/') && p.get_ref().len() < 100 => {
            PathBuf::from(p.get_ref())
        }
        Some(p) => {
            d.at(
                p.span(),
                "`upgrade_sock` must be an absolute path shorter than 100 bytes (a unix socket)",
            );
            PathBuf::from(DEFAULT_UPGRADE_SOCK)
        }
    };
    let keepalive_timeout = Duration::from_secs(d.range(
        &s.keepalive_timeout_secs,
        "keepalive_timeout_secs",
        DEFAULT_KEEPALIVE_TIMEOUT_SECS,
        1,
        3600,
    ));
    let client_header_timeout = Duration::from_millis(d.range(
        &s.client_header_timeout_ms,
        "client_header_timeout_ms",
        DEFAULT_CLIENT_HEADER_TIMEOUT_MS,
        100,
        600_000,
    ));
    let client_send_timeout = Duration::from_millis(d.range(
        &s.client_send_timeout_ms,
        "client_send_timeout_ms",
        DEFAULT_CLIENT_SEND_TIMEOUT_MS,
        100,
        3_600_000,
    ));
    let max_request_header_bytes = d.range(
        &s.max_request_header_bytes,
        "max_request_header_bytes",
        DEFAULT_MAX_REQUEST_HEADER_BYTES,
        1024,
        1_048_575,
    ) as usize;
    let max_request_headers = d.range(
        &s.max_request_headers,
        "max_request_headers",
        DEFAULT_MAX_REQUEST_HEADERS,
        8,
        255,
    ) as usize;
    // HTTP/2 from clients (TLS listeners): NGINX's defaults (`http2_max_concurrent_streams 128`;
    // a header list as large as `large_client_header_buffers 4 8k`).
    let h2_max_concurrent_streams = d.range(
        &s.h2_max_concurrent_streams,
        "h2_max_concurrent_streams",
        128,
        1,
        1000,
    ) as u32;
    let h2_max_header_list_bytes = d.range(
        &s.h2_max_header_list_bytes,
        "h2_max_header_list_bytes",
        32 * 1024,
        1024,
        1_048_576,
    ) as u32;
    // Flow control: NGINX's `http2_body_preread_size 64k` per stream; on the connection, room
    // for every stream's window at the default stream limit (128 x 64 KiB), the most NGINX's
    // per-stream buffers hold too. Both at least the protocol's default of 65,535 bytes.
    let h2_stream_window_bytes = d.range(
        &s.h2_stream_window_bytes,
        "h2_stream_window_bytes",
        65_536,
        65_535,
        16 << 20,
    ) as u32;
    let h2_connection_window_bytes = d.range(
        &s.h2_connection_window_bytes,
        "h2_connection_window_bytes",
        8 << 20,
        65_535,
        (1 << 31) - 1,
    ) as u32;
    let engine = match &s.engine {
        None => Engine::Lean,
        Some(e) => match e.get_ref().as_str() {
            "lean" => Engine::Lean,
            "pingora" => Engine::Pingora,
            other => {
                d.at(
                    e.span(),
                    format!("unknown engine `{other}`: expected `lean` or `pingora`"),
                );
                Engine::Lean
            }
        },
    };
    (!every.is_empty()).then(|| ServerSettings {
        listen,
        listen_tls,
        listen_redirect,
        threads,
        grace_period: Duration::from_secs(grace),
        graceful_shutdown_timeout: Duration::from_secs(shutdown),
        upstream_keepalive_pool: pool,
        upgrade_sock,
        access_log: s.access_log.unwrap_or(true),
        keepalive_timeout,
        client_header_timeout,
        client_send_timeout,
        max_request_header_bytes,
        max_request_headers,
        h2_max_concurrent_streams,
        h2_max_header_list_bytes,
        h2_stream_window_bytes,
        h2_connection_window_bytes,
        engine,
    })
}

/// `[server]` with every default and one listener, for unit tests of code that reads it.
#[cfg(test)]
pub fn test_server_settings() -> ServerSettings {
    let file = "[server]\nlisten = [\"127.0.0.1:1\"]\n[affinity]\nsources = [\"ip\"]\n[[backend]]\nid = \"a\"\naddress = \"127.0.0.1:2\"\n";
    Config::parse(Path::new("t.toml"), file, &EnvOverrides::default())
        .unwrap_or_else(|e| panic!("a valid config: {e}"))
        .server
}

fn validate_admin(
    a: Option<file::Admin>,
    env: &EnvOverrides,
    server: &Option<ServerSettings>,
    d: &mut Diags,
) -> Option<AdminSettings> {
    let (listen, token) = match a {
        Some(a) => (a.listen, a.token),
        None => (None, None),
    };
    let token = match (&env.admin_token, token) {
        (Some(t), _) if t.len() < MIN_SECRET_BYTES => {
            d.global(format!(
                "{ENV_ADMIN_TOKEN} is {} bytes: at least {MIN_SECRET_BYTES} are needed",
                t.len()
            ));
            None
        }
        (Some(t), _) => Some(Secret::new(t.clone().into_bytes())),
        (None, Some(t)) if t.get_ref().len() < MIN_SECRET_BYTES => {
            d.at(
                t.span(),
                format!(
                    "`token` is {} bytes: at least {MIN_SECRET_BYTES} are needed",
                    t.get_ref().len()
                ),
            );
            None
        }
        (None, Some(t)) => Some(Secret::new(t.into_inner().into_bytes())),
        (None, None) => None,
    };
    let listen = match listen {
        None => DEFAULT_ADMIN_LISTEN
            .parse()
            .expect("default admin address parses"),
        Some(s) => match s.get_ref().parse::<SocketAddr>() {
            Ok(addr) => {
                if server.as_ref().is_some_and(|srv| {
                    srv.listen.contains(&addr)
                        || srv.listen_tls.contains(&addr)
                        || srv.listen_redirect.contains(&addr)
                }) {
                    d.at(
                        s.span(),
                        format!("admin `listen` {addr} is also a proxy listen address"),
                    );
                }
                addr
            }
            Err(_) => {
                d.at(
                    s.span(),
                    format!(
                        "`{}` is not an IP:port address (e.g. 127.0.0.1:9090)",
                        s.get_ref()
                    ),
                );
                return None;
            }
        },
    };
    Some(AdminSettings { listen, token })
}

fn validate_health(h: Spanned<file::Health>, d: &mut Diags) -> Option<HealthSettings> {
    let h = h.into_inner();
    let path = match h.path {
        None => DEFAULT_HEALTH_PATH.to_string(),
        Some(p)
            if p.get_ref().starts_with('/')
                && http::uri::PathAndQuery::try_from(p.get_ref().as_str()).is_ok() =>
        {
            p.into_inner()
        }
        Some(p) => {
            d.at(
                p.span(),
                format!(
                    "health `path` `{}` must be a path starting with /",
                    p.get_ref()
                ),
            );
            return None;
        }
    };
    let host = match h.host {
        None => None,
        Some(v) if http::HeaderValue::from_str(v.get_ref()).is_ok() && !v.get_ref().is_empty() => {
            Some(v.into_inner())
        }
        Some(v) => {
            d.at(v.span(), "health `host` must be a valid Host header value");
            return None;
        }
    };
    let status = d.range(
        &h.expected_status,
        "expected_status",
        DEFAULT_HEALTH_STATUS,
        100,
        599,
    );
    let interval = d.range(
        &h.interval_ms,
        "interval_ms",
        DEFAULT_HEALTH_INTERVAL_MS,
        100,
        3_600_000,
    );
    let timeout = d.range(
        &h.timeout_ms,
        "timeout_ms",
        DEFAULT_HEALTH_TIMEOUT_MS,
        1,
        60_000,
    );
    if let Some(t) = &h.timeout_ms
        && timeout > interval
    {
        d.at(
            t.span(),
            format!("health `timeout_ms` ({timeout}) must not exceed `interval_ms` ({interval})"),
        );
    }
    let rise = d.range(&h.rise, "rise", DEFAULT_HEALTH_RISE, 1, 100);
    let fall = d.range(&h.fall, "fall", DEFAULT_HEALTH_FALL, 1, 100);
    Some(HealthSettings {
        path,
        host,
        expected_status: status as u16,
        interval: Duration::from_millis(interval),
        timeout: Duration::from_millis(timeout),
        rise: rise as u32,
        fall: fall as u32,
    })
}

fn validate_upstream(u: Option<file::Upstream>, d: &mut Diags) -> UpstreamSettings {
    let u = u.unwrap_or(file::Upstream {
        connect_timeout_ms: None,
        read_timeout_ms: None,
        write_timeout_ms: None,
        idle_timeout_secs: None,
        tunnel_timeout_secs: None,
        connect_retries: None,
        passive_eject_secs: None,
    });
    let ms = Duration::from_millis;
    let secs = Duration::from_secs;
    UpstreamSettings {
        connect_timeout: ms(d.range(
            &u.connect_timeout_ms,
            "connect_timeout_ms",
            DEFAULT_CONNECT_TIMEOUT_MS,
            1,
            60_000,
        )),
        read_timeout: ms(d.range(
            &u.read_timeout_ms,
            "read_timeout_ms",
            DEFAULT_READ_TIMEOUT_MS,
            1,
            3_600_000,
        )),
        write_timeout: ms(d.range(
            &u.write_timeout_ms,
            "write_timeout_ms",
            DEFAULT_WRITE_TIMEOUT_MS,
            1,
            3_600_000,
        )),
        idle_timeout: secs(d.range(
            &u.idle_timeout_secs,
            "idle_timeout_secs",
            DEFAULT_IDLE_TIMEOUT_SECS,
            1,
            3600,
        )),
        tunnel_timeout: secs(d.range(
            &u.tunnel_timeout_secs,
            "tunnel_timeout_secs",
            DEFAULT_TUNNEL_TIMEOUT_SECS,
            1,
            7 * 86_400,
        )),
        connect_retries: d.range(
            &u.connect_retries,
            "connect_retries",
            DEFAULT_CONNECT_RETRIES,
            0,
            16,
        ) as usize,
        passive_eject: secs(d.range(
            &u.passive_eject_secs,
            "passive_eject_secs",
            DEFAULT_PASSIVE_EJECT_SECS,
            1,
            3600,
        )),
    }
}

/// Characters allowed in a cookie name (RFC 6265 token).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_source(s: &str) -> Result<KeySource, String> {
    let (kind, name) = match s.split_once(':') {
        Some((k, n)) => (k, Some(n)),
        None => (s, None),
    };
    match (kind, name) {
        ("ip", None) => Ok(KeySource::Ip),
        ("insert", None) => Ok(KeySource::Insert),
        ("cookie", Some(n)) if is_token(n) => Ok(KeySource::Cookie(n.to_string())),
        ("cookie", Some(n)) => Err(format!("`{n}` is not a valid cookie name")),
        ("header", Some(n)) => HeaderName::from_bytes(n.as_bytes())
            .map(KeySource::Header)
            .map_err(|_| format!("`{n}` is not a valid header name")),
        ("query", Some(n)) if !n.is_empty() && !n.contains(['&', '=', '#']) => {
            Ok(KeySource::Query(n.to_string()))
        }
        ("query", Some(n)) => Err(format!("`{n}` is not a valid query parameter name")),
        ("ip" | "insert", Some(_)) => Err(format!("`{kind}` takes no name: write \"{kind}\"")),
        ("cookie" | "header" | "query", None) => {
            Err(format!("`{kind}` needs a name, e.g. \"{kind}:sid\""))
        }
        _ => Err(format!(
            "unknown key source `{s}`: expected \"cookie:<name>\", \"insert\", \"header:<name>\", \"query:<name>\" or \"ip\""
        )),
    }
}

fn validate_affinity(
    a: Option<Spanned<file::Affinity>>,
    env: &EnvOverrides,
    with_redis: bool,
    d: &mut Diags,
) -> Option<AffinitySettings> {
    let Some(a) = a else {
        d.top("missing [affinity] section: it needs `sources`, e.g. sources = [\"cookie:connect.sid\", \"insert\"]");
        return None;
    };
    let span = a.span();
    let a = a.into_inner();
    let mut ok = true;

    let mut sources: Vec<KeySource> = Vec::new();
    match &a.sources {
        None => {
            d.at(
                span.clone(),
                "[affinity] needs `sources`, e.g. sources = [\"cookie:connect.sid\", \"insert\"]",
            );
            ok = false;
        }
        // `sources = []`: affinity off. Every request is balanced by `policy`, nothing is
        // pinned (a plain load balancer, and the benchmark's bare-proxy baseline).
        Some(list) => {
            for s in list.get_ref() {
                if sources.last() == Some(&KeySource::Ip) {
                    d.at(
                        s.span(),
                        "this source comes after \"ip\", which is always present: move \"ip\" last",
                    );
                    ok = false;
                }
                match parse_source(s.get_ref()) {
                    Ok(src) if sources.contains(&src) => {
                        d.at(s.span(), format!("source `{src}` is listed twice"));
                        ok = false;
                    }
                    Ok(src) => sources.push(src),
                    Err(m) => {
                        d.at(s.span(), m);
                        ok = false;
                    }
                }
            }
        }
    }

    let policy = match &a.policy {
        None => Policy::LeastConnections,
        Some(p) => match Policy::parse(p.get_ref()) {
            Some(p) => p,
            None => {
                d.at(
                    p.span(),
                    format!(
                        "unknown policy `{}`: expected one of {}",
                        p.get_ref(),
                        Policy::NAMES.join(", ")
                    ),
                );
                ok = false;
                Policy::LeastConnections
            }
        },
    };
    let ttl = d.range(&a.ttl_secs, "ttl_secs", DEFAULT_TTL_SECS, 1, 30 * 86_400);
    let max_key = d.range(
        &a.max_key_bytes,
        "max_key_bytes",
        DEFAULT_MAX_KEY_BYTES,
        16,
        4096,
    );
    let cache = d.range(
        &a.cache_entries,
        "cache_entries",
        DEFAULT_CACHE_ENTRIES,
        1,
        100_000_000,
    );

    let hash_key = match (&env.hash_key, &a.hash_key) {
        (Some(k), _) if k.len() < MIN_SECRET_BYTES => {
            d.global(format!(
                "{ENV_HASH_KEY} is {} bytes: at least {MIN_SECRET_BYTES} are needed",
                k.len()
            ));
            ok = false;
            None
        }
        (Some(k), _) => Some(Secret::new(k.clone().into_bytes())),
        (None, Some(k)) if k.get_ref().len() < MIN_SECRET_BYTES => {
            d.at(
                k.span(),
                format!(
                    "`hash_key` is {} bytes: at least {MIN_SECRET_BYTES} are needed",
                    k.get_ref().len()
                ),
            );
            ok = false;
            None
        }
        (None, Some(k)) => Some(Secret::new(k.get_ref().clone().into_bytes())),
        (None, None) if with_redis => {
            d.at(
                span.clone(),
                format!("[affinity] needs `hash_key` (or {ENV_HASH_KEY}) with [redis]: every instance must derive the same Redis keys"),
            );
            ok = false;
            None
        }
        (None, None) => None,
    };

    let wants_insert = sources.contains(&KeySource::Insert);
    let insert = if wants_insert {
        match validate_insert(a.insert, env, &span, d) {
            Some(i) => Some(i),
            None => {
                ok = false;
                None
            }
        }
    } else {
        None
    };

    ok.then_some(AffinitySettings {
        sources,
        policy,
        ttl: Duration::from_secs(ttl),
        hash_key,
        max_key_bytes: max_key as usize,
        cache_entries: cache as usize,
        insert,
    })
}

fn validate_insert(
    i: Option<Spanned<file::Insert>>,
    env: &EnvOverrides,
    affinity_span: &Range<usize>,
    d: &mut Diags,
) -> Option<InsertSettings> {
    let (span, i) = match i {
        Some(i) => (i.span(), Some(i.into_inner())),
        None => (affinity_span.clone(), None),
    };
    let mut ok = true;
    let cookie = match i.as_ref().and_then(|i| i.cookie.as_ref()) {
        None => DEFAULT_INSERT_COOKIE.to_string(),
        Some(c) if is_token(c.get_ref()) => c.get_ref().clone(),
        Some(c) => {
            d.at(
                c.span(),
                format!("`{}` is not a valid cookie name", c.get_ref()),
            );
            ok = false;
            String::new()
        }
    };
    let mut secrets = Vec::new();
    if let Some(list) = &env.insert_secrets {
        for (n, s) in list.split(',').map(str::trim).enumerate() {
            if s.len() < MIN_SECRET_BYTES {
                d.global(format!(
                    "{ENV_INSERT_SECRETS}: secret #{} is {} bytes: at least {MIN_SECRET_BYTES} are needed",
                    n + 1,
                    s.len()
                ));
                ok = false;
            } else {
                secrets.push(Secret::new(s.as_bytes().to_vec()));
            }
        }
    } else if let Some(list) = i.as_ref().and_then(|i| i.secrets.as_ref()) {
        for s in list.get_ref() {
            if s.get_ref().len() < MIN_SECRET_BYTES {
                d.at(
                    s.span(),
                    format!(
                        "secret is {} bytes: at least {MIN_SECRET_BYTES} are needed",
                        s.get_ref().len()
                    ),
                );
                ok = false;
            } else {
                secrets.push(Secret::new(s.get_ref().clone().into_bytes()));
            }
        }
    }
    if secrets.is_empty() && ok {
        d.at(
            span.clone(),
            format!("source \"insert\" needs [affinity.insert] `secrets` (or {ENV_INSERT_SECRETS}) to sign its cookie"),
        );
        ok = false;
    }
    let secure = i.as_ref().and_then(|i| i.secure);
    let same_site = match i.as_ref().and_then(|i| i.same_site.as_ref()) {
        None => SameSite::Lax,
        Some(s) => match s.get_ref().to_ascii_lowercase().as_str() {
            "lax" => SameSite::Lax,
            "strict" => SameSite::Strict,
            "none" if secure == Some(true) => SameSite::None,
            "none" => {
                d.at(
                    s.span(),
                    "same_site = \"none\" needs secure = true (browsers reject it otherwise)",
                );
                ok = false;
                SameSite::None
            }
            other => {
                d.at(
                    s.span(),
                    format!(
                        "unknown same_site `{other}`: expected \"lax\", \"strict\" or \"none\""
                    ),
                );
                ok = false;
                SameSite::Lax
            }
        },
    };
    let http_only = i.as_ref().and_then(|i| i.http_only).unwrap_or(true);
    let max_age = i.as_ref().and_then(|i| i.max_age_secs.as_ref()).map(|m| {
        let v = d.range(&Some(m.clone()), "max_age_secs", 1, 1, 365 * 86_400);
        Duration::from_secs(v)
    });
    ok.then_some(InsertSettings {
        cookie,
        secrets,
        secure,
        same_site,
        http_only,
        max_age,
    })
}

fn validate_redis(
    r: Option<Spanned<file::Redis>>,
    env: &EnvOverrides,
    dir: &Path,
    d: &mut Diags,
) -> Option<RedisSettings> {
    let r = r?;
    let span = r.span();
    let r = r.into_inner();
    let (url, url_span) = match (&env.redis_url, &r.url) {
        (Some(u), _) => (u.clone(), None),
        (None, Some(u)) => (u.get_ref().clone(), Some(u.span())),
        (None, None) => {
            d.at(
                span,
                "[redis] needs `url`, e.g. url = \"redis://127.0.0.1:6379/\"",
            );
            return None;
        }
    };
    let report = |d: &mut Diags, m: String| match &url_span {
        Some(s) => d.at(s.clone(), m),
        None => d.global(format!("{ENV_REDIS_URL}: {m}")),
    };
    let tls = url.starts_with("rediss://");
    if tls && url.contains('#') {
        // redis-rs's `#insecure` turns certificate verification off; this build does not offer
        // it (see `ca_file`).
        report(
            d,
            format!(
                "`{}`: a URL fragment such as `#insecure` (no certificate verification) is not supported: \
                 for a private CA give its certificate in `ca_file`",
                redact_url(&url)
            ),
        );
    } else if let Err(e) = redis::Client::open(url.as_str()) {
        report(
            d,
            format!(
                "`{}` is not a Redis URL: {}",
                redact_url(&url),
                redact_url(&e.to_string())
            ),
        );
    }
    let ca = r.ca_file.as_ref().and_then(|f| {
        if tls {
            validate_ca_file(f, dir, d)
        } else {
            d.at(
                f.span(),
                "`ca_file` applies to TLS only: use a rediss:// URL, or remove `ca_file`",
            );
            None
        }
    });
    let key_prefix = match &r.key_prefix {
        None => DEFAULT_KEY_PREFIX.to_string(),
        Some(p) => {
            let v = p.get_ref();
            if v.is_empty()
                || v.len() > 64
                || v.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                d.at(
                    p.span(),
                    "`key_prefix` must be 1 to 64 characters without spaces",
                );
            }
            v.clone()
        }
    };
    let timeout = d.range(
        &r.timeout_ms,
        "timeout_ms",
        DEFAULT_REDIS_TIMEOUT_MS,
        1,
        10_000,
    );
    Some(RedisSettings {
        url,
        key_prefix,
        timeout: Duration::from_millis(timeout),
        ca,
    })
}

/// The most a config file, or a PEM file it names, may hold: far more than any real one.
const MAX_CONFIG_FILE: u64 = 4 << 20;
pub(crate) const MAX_PEM_FILE: u64 = 4 << 20;

/// Read a regular file of at most `limit` bytes. A device, a FIFO or a directory is refused
/// before it is read (`/dev/zero` would never end, a FIFO would wait for a writer).
pub(crate) fn read_file_capped(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    let mut out = Vec::new();
    file.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::other(format!(
            "it is larger than {} MiB",
            limit >> 20
        )));
    }
    Ok(out)
}

/// Read and check a `ca_file` (`[redis]`, `[[backend]]`): it must exist, hold at least one PEM
/// certificate, and each must be usable as a trust anchor.
fn validate_ca_file(f: &Spanned<String>, dir: &Path, d: &mut Diags) -> Option<CaCertificates> {
    let path = dir.join(f.get_ref());
    let pem = match read_file_capped(&path, MAX_PEM_FILE) {
        Ok(b) => b,
        Err(e) => {
            d.at(
                f.span(),
                format!(
                    "cannot read `ca_file` {}: {e} (relative paths are relative to this file)",
                    path.display()
                ),
            );
            return None;
        }
    };
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let problem = match cert {
            Ok(cert) => roots
                .add(cert)
                .err()
                .map(|e| format!("a certificate is not usable as a CA: {e}")),
            Err(e) => Some(format!("not valid PEM: {e}")),
        };
        if let Some(problem) = problem {
            d.at(f.span(), format!("`ca_file` {}: {problem}", path.display()));
            return None;
        }
    }
    if roots.is_empty() {
        d.at(
            f.span(),
            format!(
                "`ca_file` {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        );
        return None;
    }
    Some(CaCertificates { path, pem })
}

/// Backend ids go into Redis values and cookies: keep them to a safe alphabet.
fn is_backend_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn validate_backends(
    list: Option<Vec<Spanned<file::Backend>>>,
    dir: &Path,
    d: &mut Diags,
) -> Option<Vec<BackendSettings>> {
    let list = match list {
        Some(l) if !l.is_empty() => l,
        _ => {
            d.top("no backends: add at least one [[backend]] with `id` and `address`");
            return None;
        }
    };
    if list.len() > crate::backend::MAX_BACKEND_IDS {
        d.top(format!(
            "{} backends: tether holds at most {}",
            list.len(),
            crate::backend::MAX_BACKEND_IDS
        ));
        return None;
    }
    let mut out: Vec<BackendSettings> = Vec::new();
    let mut ok = true;
    for b in list {
        let span = b.span();
        let b = b.into_inner();
        let id = match &b.id {
            None => {
                d.at(span.clone(), "[[backend]] needs `id`");
                ok = false;
                continue;
            }
            Some(id) if !is_backend_id(id.get_ref()) => {
                d.at(
                    id.span(),
                    format!(
                        "backend id `{}` must be 1 to 64 of A-Z a-z 0-9 _ -",
                        id.get_ref()
                    ),
                );
                ok = false;
                continue;
            }
            Some(id) if out.iter().any(|o| &o.id == id.get_ref()) => {
                d.at(
                    id.span(),
                    format!("duplicate backend id `{}`", id.get_ref()),
                );
                ok = false;
                continue;
            }
            Some(id) => id.get_ref().clone(),
        };
        let address = match &b.address {
            None => {
                d.at(
                    span.clone(),
                    format!("backend `{id}` needs `address`, e.g. address = \"127.0.0.1:3000\""),
                );
                ok = false;
                continue;
            }
            Some(a) => match resolve(a.get_ref()) {
                Ok(addr) => (a.get_ref().clone(), addr),
                Err(m) => {
                    d.at(a.span(), m);
                    ok = false;
                    continue;
                }
            },
        };
        let weight = d.range(&b.weight, "weight", DEFAULT_WEIGHT, 1, 1000) as u32;
        let Ok(tls) = validate_backend_tls(&b, &id, &address.0, span, dir, d) else {
            ok = false;
            continue;
        };
        out.push(BackendSettings {
            id,
            address_text: address.0,
            address: address.1,
            weight,
            tls,
        });
    }
    ok.then_some(out)
}

/// `tls`, `sni`, `ca_file` and `tls_verify` of backend `id`. `Err`: reported in `d`.
fn validate_backend_tls(
    b: &file::Backend,
    id: &str,
    address: &str,
    span: Range<usize>,
    dir: &Path,
    d: &mut Diags,
) -> Result<Option<BackendTls>, ()> {
    let on = b.tls.as_ref().is_some_and(|t| *t.get_ref());
    let tls_only = [
        (b.sni.as_ref().map(Spanned::span), "sni"),
        (b.ca_file.as_ref().map(Spanned::span), "ca_file"),
        (b.tls_verify.as_ref().map(Spanned::span), "tls_verify"),
    ];
    if !on {
        let mut ok = true;
        for (span, name) in tls_only {
            if let Some(span) = span {
                d.at(
                    span,
                    format!("`{name}` applies to TLS only: add `tls = true`, or remove `{name}`"),
                );
                ok = false;
            }
        }
        return if ok { Ok(None) } else { Err(()) };
    }
    let sni = match &b.sni {
        Some(s) => {
            let v = s.get_ref();
            if rustls::pki_types::ServerName::try_from(v.as_str()).is_err() {
                d.at(
                    s.span(),
                    format!("`sni` `{v}` is neither a DNS name nor an IP address"),
                );
                return Err(());
            }
            v.clone()
        }
        None => address_host(address).to_owned(),
    };
    let verify = b.tls_verify.as_ref().is_none_or(|v| *v.get_ref());
    let ca = match &b.ca_file {
        Some(f) if !verify => {
            d.at(
                f.span(),
                "`ca_file` verifies the backend's certificate, and `tls_verify = false` turns \
                 that off: remove one of them",
            );
            return Err(());
        }
        Some(f) => Some(validate_ca_file(f, dir, d).ok_or(())?),
        None => None,
    };
    if !verify {
        d.warn_at(
            span,
            format!(
                "backend `{id}`: `tls_verify = false`: its certificate is not checked, so anyone \
                 on the path to it can pose as it (give its CA in `ca_file` instead)"
            ),
        );
    }
    Ok(Some(BackendTls { sni, ca, verify }))
}

/// The host of a `host:port` address (`[::1]:443` gives `::1`).
fn address_host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !text.contains(':') {
        return Err(format!(
            "`{text}` has no port: write host:port, e.g. 127.0.0.1:3000"
        ));
    }
    // The fuzzer (fuzz/) parses millions of configs: no name lookups there.
    if cfg!(fuzzing) {
        return Err(format!("`{text}`: names are not resolved while fuzzing"));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{text}` resolved to no address")),
        Err(e) => Err(format!(
            "`{text}` is not a host:port address that resolves: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[affinity]
sources = ["cookie:connect.sid", "ip"]

[[backend]]
id = "a"
address = "127.0.0.1:3001"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text, &EnvOverrides::default())
    }

    /// The rendered diagnostics of `text`, which must fail.
    fn errors(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse(BASE).expect("valid");
        assert_eq!(c.server.threads, 1);
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.affinity.policy, Policy::LeastConnections);
        assert_eq!(c.affinity.ttl, Duration::from_secs(DEFAULT_TTL_SECS));
        assert_eq!(c.upstream.connect_retries, 2);
        assert!(c.redis.is_none());
        assert!(c.affinity.hash_key.is_none());
        assert_eq!(c.backends[0].weight, 1);
    }

    #[test]
    fn unknown_key_is_reported_with_line_and_column() {
        let text = BASE.replace("[server]\n", "[server]\nlistne = 1\n");
        let e = errors(&text);
        assert!(e.starts_with("t.toml:3:1: unknown field `listne`"), "{e}");
    }

    #[test]
    fn syntax_error_is_reported_with_line_and_column() {
        let text = BASE.replace("id = \"a\"", "id = \"a");
        let e = errors(&text);
        assert!(e.starts_with("t.toml:9:"), "{e}");
    }

    #[test]
    fn duplicate_backend_ids_are_rejected() {
        let text = format!("{BASE}\n[[backend]]\nid = \"a\"\naddress = \"127.0.0.1:3002\"\n");
        let e = errors(&text);
        assert!(e.contains("t.toml:13:6: duplicate backend id `a`"), "{e}");
    }

    #[test]
    fn bad_addresses_are_rejected() {
        let text = BASE
            .replace("127.0.0.1:8080", "localhost")
            .replace("127.0.0.1:3001", "nowhere");
        let e = errors(&text);
        assert!(
            e.contains("t.toml:3:11: `localhost` is not an IP:port address"),
            "{e}"
        );
        assert!(e.contains("t.toml:10:11: `nowhere` has no port"), "{e}");
    }

    #[test]
    fn zero_and_absurd_durations_are_rejected() {
        let text = BASE.replace(
            "[affinity]\n",
            "[upstream]\nconnect_timeout_ms = 0\nread_timeout_ms = 99999999999\n\n[affinity]\nttl_secs = 0\n",
        );
        let e = errors(&text);
        assert!(
            e.contains("t.toml:6:22: `connect_timeout_ms` is 0: expected 1..=60000"),
            "{e}"
        );
        assert!(
            e.contains("t.toml:7:19: `read_timeout_ms` is 99999999999"),
            "{e}"
        );
        assert!(e.contains("t.toml:10:12: `ttl_secs` is 0"), "{e}");
    }

    #[test]
    fn unknown_source_and_policy_are_rejected() {
        let text = BASE.replace(
            "sources = [\"cookie:connect.sid\", \"ip\"]",
            "sources = [\"jwt:sub\", \"ip\", \"header:x\"]\npolicy = \"random\"",
        );
        let e = errors(&text);
        assert!(
            e.contains("t.toml:6:12: unknown key source `jwt:sub`"),
            "{e}"
        );
        assert!(
            e.contains("t.toml:6:29: this source comes after \"ip\""),
            "{e}"
        );
        assert!(e.contains("t.toml:7:10: unknown policy `random`"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let text = BASE
            .replace("127.0.0.1:3001", "x")
            .replace("[affinity]\n", "[affinity]\nttl_secs = 0\n");
        let e = errors(&text);
        assert_eq!(e.lines().count(), 2, "{e}");
    }

    #[test]
    fn redis_needs_a_hash_key() {
        let text = format!("{BASE}\n[redis]\nurl = \"redis://h:6379/\"\n");
        let e = errors(&text);
        assert!(e.contains("needs `hash_key`"), "{e}");
    }

    const WITH_KEY: &str = "hash_key = \"0123456789abcdef-key\"\n";

    /// BASE with a hash key and a `[redis]` section of `redis` (its lines from line 14 on).
    fn with_redis(redis: &str) -> String {
        format!(
            "{}\n[redis]\n{redis}",
            BASE.replace("[affinity]\n", &format!("[affinity]\n{WITH_KEY}"))
        )
    }

    /// A fresh self-signed CA certificate in PEM.
    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn tls_urls_are_accepted_with_an_optional_ca_file() {
        let c = parse(&with_redis("url = \"rediss://:pw@h:6380/\"\n")).expect("valid");
        let r = c.redis.unwrap();
        assert!(r.ca.is_none());
        assert!(!format!("{r:?}").contains("pw"), "{r:?}");

        let dir = tempfile::tempdir().unwrap();
        let pem = ca_pem();
        std::fs::write(dir.path().join("ca.pem"), &pem).unwrap();
        let text = with_redis("url = \"rediss://h:6380/\"\nca_file = \"ca.pem\"\n");
        // Relative to the file's directory.
        let c = Config::parse(&dir.path().join("t.toml"), &text, &EnvOverrides::default())
            .expect("valid");
        let ca = c.redis.unwrap().ca.unwrap();
        assert_eq!(ca.pem, pem.as_bytes());
        assert_eq!(ca.path, dir.path().join("ca.pem"));
    }

    #[test]
    fn backends_over_tls_take_sni_ca_file_and_tls_verify() {
        let dir = tempfile::tempdir().unwrap();
        let pem = ca_pem();
        std::fs::write(dir.path().join("ca.pem"), &pem).unwrap();
        let path = dir.path().join("t.toml");
        let parse_in_dir = |backend: &str| {
            let text = BASE.replace(
                "address = \"127.0.0.1:3001\"\n",
                &format!("address = \"127.0.0.1:3001\"\n{backend}"),
            );
            Config::parse(&path, &text, &EnvOverrides::default())
        };
        let b = |backend: &str| {
            parse_in_dir(backend).expect("valid").backends[0]
                .tls
                .clone()
        };
        assert_eq!(b(""), None);
        assert_eq!(b("tls = false\n"), None);
        // The SNI is the address's host unless given; an IP address is verified as one.
        let t = b("tls = true\n").unwrap();
        assert_eq!(
            (t.sni.as_str(), t.verify, t.ca.is_none()),
            ("127.0.0.1", true, true)
        );
        let t = b("tls = true\nsni = \"app.internal\"\nca_file = \"ca.pem\"\n").unwrap();
        assert_eq!(t.sni, "app.internal");
        assert_eq!(t.ca.unwrap().pem, pem.as_bytes());
        // Turning verification off is allowed, and warned about.
        let c = parse_in_dir("tls = true\ntls_verify = false\n").expect("valid");
        assert!(!c.backends[0].tls.as_ref().unwrap().verify);
        let warnings = c
            .warnings
            .iter()
            .map(|w| w.located(&path, "warning: ").to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            warnings.contains("t.toml:8:1: warning: backend `a`: `tls_verify = false`"),
            "{warnings}"
        );

        let err = |backend: &str| match parse_in_dir(backend) {
            Ok(_) => panic!("expected an error for {backend}"),
            Err(e) => e.to_string(),
        };
        // [[backend]] is line 8, its first added setting line 11.
        for (setting, col) in [
            ("sni = \"x\"", 7),
            ("ca_file = \"ca.pem\"", 11),
            ("tls_verify = true", 14),
        ] {
            let name = setting.split(' ').next().unwrap();
            let e = err(&format!("{setting}\n"));
            assert!(
                e.contains(&format!("t.toml:11:{col}: `{name}` applies to TLS only")),
                "{e}"
            );
        }
        let e = err("tls = true\nsni = \"not a name\"\n");
        assert!(
            e.contains("t.toml:12:7: `sni` `not a name` is neither"),
            "{e}"
        );
        let e = err("tls = true\ntls_verify = false\nca_file = \"ca.pem\"\n");
        assert!(e.contains("t.toml:13:11: `ca_file` verifies"), "{e}");
        let e = err("tls = true\nca_file = \"missing.pem\"\n");
        assert!(e.contains("t.toml:12:11: cannot read `ca_file`"), "{e}");
    }

    #[test]
    fn bad_ca_files_are_reported_with_line_and_column() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
        std::fs::write(
            dir.join("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let path = dir.join("t.toml");
        let check = |redis: &str| match Config::parse(
            &path,
            &with_redis(redis),
            &EnvOverrides::default(),
        ) {
            Ok(_) => panic!("expected an error for {redis}"),
            Err(e) => e.to_string(),
        };
        // [redis] is line 13, url line 14, ca_file line 15.
        let e = check("url = \"rediss://h/\"\nca_file = \"missing.pem\"\n");
        assert!(e.contains("t.toml:15:11: cannot read `ca_file`"), "{e}");
        let e = check("url = \"rediss://h/\"\nca_file = \"junk.pem\"\n");
        assert!(e.contains("t.toml:15:11: `ca_file`"), "{e}");
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = check("url = \"rediss://h/\"\nca_file = \"broken.pem\"\n");
        assert!(e.contains("t.toml:15:11: `ca_file`"), "{e}");
        let e = check("url = \"redis://h/\"\nca_file = \"junk.pem\"\n");
        assert!(
            e.contains("t.toml:15:11: `ca_file` applies to TLS only"),
            "{e}"
        );
        // A device never ends, a directory is no file: refused before a byte is read.
        for special in ["/dev/zero", "/"] {
            let e = check(&format!("url = \"rediss://h/\"\nca_file = \"{special}\"\n"));
            assert!(e.contains("it is not a regular file"), "{e}");
        }
        std::fs::write(
            dir.join("huge.pem"),
            vec![b'a'; (MAX_PEM_FILE + 1) as usize],
        )
        .unwrap();
        let e = check("url = \"rediss://h/\"\nca_file = \"huge.pem\"\n");
        assert!(e.contains("it is larger than 4 MiB"), "{e}");
    }

    #[test]
    fn tls_listeners_need_certificates_and_certificates_need_a_listener() {
        let listen = |lines: &str| BASE.replace("listen = [\"127.0.0.1:8080\"]", lines);
        for (text, wanted) in [
            (
                listen("listen = [\"127.0.0.1:8080\"]\nlisten_tls = [\"127.0.0.1:8080\"]"),
                &["t.toml:4:15: `127.0.0.1:8080` is in two of"][..],
            ),
            (
                listen("listen_tls = [\"127.0.0.1:8443\"]\nlisten_redirect = [\"127.0.0.1:8443\"]"),
                &[
                    "t.toml:4:20: `127.0.0.1:8443` is in two of",
                    "`[server] listen_tls` needs a [tls] section",
                ],
            ),
            (
                format!("{BASE}\n[tls]\ncerts = [{{ cert = \"c.pem\", key = \"k.pem\" }}]\n"),
                &["no listener uses them", "cannot read"],
            ),
            (
                format!("{BASE}\n[tls]\ncerts = []\n"),
                &["[tls] needs `certs"],
            ),
        ] {
            let e = errors(&text);
            for w in wanted {
                assert!(e.contains(w), "want `{w}` in:\n{e}");
            }
        }
        let only_tls = BASE.replace("listen = ", "listen_tls = ");
        let e = errors(&only_tls);
        assert!(!e.contains("needs `listen`"), "{e}");
    }

    #[test]
    fn insecure_tls_is_not_offered_and_urls_are_redacted_in_errors() {
        let e = errors(&with_redis(
            "url = \"rediss://:hunter2-secret@h/#insecure\"\n",
        ));
        assert!(e.contains("t.toml:14:7:"), "{e}");
        assert!(e.contains("`#insecure`"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = errors(&with_redis("url = \"redis://u:hunter2-secret@h/notadb\"\n"));
        assert!(e.contains("is not a Redis URL"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = errors(&with_redis(
            "url = \"redis+unix:///s.sock?pass=hunter2-secret&db=x\"\n",
        ));
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn env_overrides_the_file() {
        let text = format!("{BASE}\n[redis]\nurl = \"redis://127.0.0.1:1/\"\n");
        let env = EnvOverrides {
            hash_key: Some("0123456789abcdef-env".into()),
            redis_url: Some("redis://127.0.0.1:2/".into()),
            insert_secrets: None,
            admin_token: None,
        };
        let c = Config::parse(Path::new("t.toml"), &text, &env).expect("valid");
        assert_eq!(c.redis.unwrap().url, "redis://127.0.0.1:2/");
        assert_eq!(
            c.affinity.hash_key.unwrap().expose(),
            b"0123456789abcdef-env"
        );
    }

    #[test]
    fn insert_needs_secrets_and_sane_attributes() {
        let text = BASE.replace("\"ip\"]", "\"insert\"]");
        assert!(errors(&text).contains("needs [affinity.insert] `secrets`"));
        let text = BASE.replace("\"ip\"]", "\"insert\"]")
            + "\n[affinity.insert]\nsecrets = [\"short\"]\nsame_site = \"none\"\n";
        let e = errors(&text);
        assert!(e.contains("secret is 5 bytes"), "{e}");
        assert!(
            e.contains("same_site = \"none\" needs secure = true"),
            "{e}"
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret::new(b"super-secret-value".to_vec());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(
            redact_url("redis://user:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("rediss://:p@ss@host/"), "rediss://***@host/");
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?db=1&pass=a@b&protocol=resp3"),
            "redis+unix:///tmp/r.sock?db=1&pass=***&protocol=resp3"
        );
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?PASSWORD=x#frag"),
            "redis+unix:///tmp/r.sock?PASSWORD=***#frag"
        );
        assert_eq!(redact_url(":pw@host:6379"), "***@host:6379");
        assert_eq!(redact_url("redis://host:6379/"), "redis://host:6379/");
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncé\nx", 7), (3, 1));
        assert_eq!(line_col("ab\ncé\nx", 3), (2, 1));
    }
}
