//! The admin listener: metrics, health, and the operator API.
//!
//! - `GET /metrics` (Prometheus text), `GET /healthz`, `GET /readyz`;
//! - `GET /api/backends`; `POST /api/backends/{id}/drain[?deadline_secs=N]|enable|disable`;
//! - `GET|DELETE /api/affinity/{key}[?source=<source>]` (the key URL-encoded, as the client sends
//!   it; the source defaults to the first configured one);
//! - `POST /api/reload`.
//!
//! With `[admin] token` (or `TETHER_ADMIN_TOKEN`) every endpoint but `/healthz` and `/readyz`
//! needs `Authorization: Bearer <token>`; the token is compared in constant time and never
//! logged. Errors are JSON `{"error": "..."}` with a 4xx (or 503 when Redis is needed and down).
//! A separate Pingora service on its own address; it never blocks the request path.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use http::{Method, Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};
use serde_json::{Value, json};

use crate::affinity::KeyHash;
use crate::affinity::redis::decode_pin;
use crate::backend::{AdminState, now_ms, unix_ms};
use crate::metrics::Metrics;
use crate::state::{AdminError, Live, State};

pub struct AdminApp {
    pub state: Arc<State>,
    /// Backend ids whose gauges were last exported: removed ones get their series dropped.
    exported: Mutex<HashSet<String>>,
}

impl AdminApp {
    pub fn new(state: Arc<State>) -> AdminApp {
        AdminApp {
            state,
            exported: Mutex::default(),
        }
    }
}

type Reply = Response<Vec<u8>>;

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static status and headers are valid")
}

fn json_reply(status: StatusCode, value: Value) -> Reply {
    let mut body = serde_json::to_vec_pretty(&value).expect("JSON values serialize");
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    json_reply(status, json!({ "error": message.into() }))
}

/// Constant-time comparison, so a wrong token reveals nothing through timing.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let value = crate::affinity::query_param(query?, name)?;
    Some(String::from_utf8_lossy(&value).into_owned())
}

fn percent_decoded(segment: &str) -> Vec<u8> {
    // Reuse the query decoder on a one-pair query.
    crate::affinity::query_param(&format!("k={segment}"), "k")
        .map_or_else(Vec::new, |v| v.into_owned())
}

impl AdminApp {
    fn authorized(&self, live: &Live, session: &ServerSession) -> bool {
        let Some(token) = &live.config.admin.token else {
            return true;
        };
        let given = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| {
                let v = v.as_bytes();
                (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
            });
        given.is_some_and(|g| same_secret(g, token.expose()))
    }

    async fn route(&self, method: &Method, path: &str, query: Option<&str>) -> Reply {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (&Method::GET, ["metrics"]) => self.metrics().await,
            (&Method::GET, ["api", "backends"]) => self.backends().await,
            (&Method::POST, ["api", "backends", id, action]) => {
                self.set_state(id, action, query).await
            }
            (&Method::GET, ["api", "affinity", key]) => self.lookup(key, query).await,
            (&Method::DELETE, ["api", "affinity", key]) => self.unpin(key, query).await,
            (&Method::POST, ["api", "reload"]) => self.reload().await,
            (
                _,
                ["metrics"]
                | ["api", "backends"]
                | ["api", "backends", _, _]
                | ["api", "affinity", _]
                | ["api", "reload"],
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                format!(
                    "no {path}: try /metrics, /healthz, /readyz, /api/backends, /api/affinity/{{key}}, /api/reload"
                ),
            ),
        }
    }

    fn readiness(&self) -> Reply {
        let live = self.state.live();
        let now = now_ms();
        let up = live.backends.all().iter().filter(|b| b.is_up(now)).count();
        let redis = match &self.state.redis {
            None => "in-process",
            Some(r) if r.is_up() => "up",
            Some(_) => "down (failing open)",
        };
        // Ready means: configured and serving. Redis being down is degraded, not unready:
        // tether fails open, so taking it out of rotation would only make things worse.
        json_reply(
            StatusCode::OK,
            json!({ "ready": true, "redis": redis, "backends": live.backends.all().len(), "backends_up": up }),
        )
    }

    async fn metrics(&self) -> Reply {
        self.refresh_backend_gauges().await;
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        match encoder.encode(&prometheus::gather(), &mut buf) {
            Ok(()) => respond(StatusCode::OK, encoder.format_type(), buf),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {e}"),
            ),
        }
    }

    /// Backend gauges are computed when scraped: health, ejection and drain deadlines change
    /// with time, and pinned sessions live in Redis.
    async fn refresh_backend_gauges(&self) {
        let live = self.state.live_full();
        let m = Metrics::get();
        let now = now_ms();
        let counts = self.state.pinned_counts(live.backends.all()).await;
        let mut current = HashSet::new();
        for b in live.backends.all() {
            let id = &*b.id;
            current.insert(id.to_string());
            m.backend_up
                .with_label_values(&[id])
                .set(b.is_up(now) as i64);
            let state = b.admin_state().name();
            for s in ["enabled", "draining", "disabled"] {
                m.backend_state
                    .with_label_values(&[id, s])
                    .set((s == state) as i64);
            }
            if let Some(n) = counts.as_ref().and_then(|c| c.get(id)) {
                m.pinned_sessions.with_label_values(&[id]).set(*n as i64);
            }
        }
        let mut exported = self
            .exported
            .lock()
            .expect("exported lock is never poisoned");
        for gone in exported.difference(&current) {
            let _ = m.backend_up.remove_label_values(&[gone]);
            let _ = m.pinned_sessions.remove_label_values(&[gone]);
            for s in ["enabled", "draining", "disabled"] {
                let _ = m.backend_state.remove_label_values(&[gone, s]);
            }
        }
        *exported = current;
    }

    async fn backends(&self) -> Reply {
        let live = self.state.live_full();
        let counts = self.state.pinned_counts(live.backends.all()).await;
        let now = now_ms();
        let list: Vec<Value> = live
            .backends
            .all()
            .iter()
            .map(|b| {
                let (state, deadline) = match b.admin_state() {
                    AdminState::Draining { deadline_ms } => ("draining", deadline_ms),
                    s => (s.name(), None),
                };
                json!({
                    "id": &*b.id,
                    "address": b.address_text,
                    "weight": b.weight(),
                    "state": state,
                    "drain_deadline_unix_ms": deadline,
                    "health": if b.is_healthy() { "up" } else { "down" },
                    "ejected": b.is_ejected(now),
                    "up": b.is_up(now),
                    "active_requests": b.active(),
                    "open_websockets": b.stats.websockets.get(),
                    "pinned_sessions": counts.as_ref().and_then(|c| c.get(&*b.id)),
                })
            })
            .collect();
        json_reply(
            StatusCode::OK,
            json!({
                "backends": list,
                "pinned_sessions_counted": counts.is_some(),
            }),
        )
    }

    async fn set_state(&self, id: &str, action: &str, query: Option<&str>) -> Reply {
        let state = match action {
            "enable" => AdminState::Enabled,
            "disable" => AdminState::Disabled,
            "drain" => match query_param(query, "deadline_secs") {
                None => AdminState::Draining { deadline_ms: None },
                Some(v) => match v.parse::<u64>() {
                    Ok(secs) if (1..=30 * 86_400).contains(&secs) => AdminState::Draining {
                        deadline_ms: Some(unix_ms() + secs * 1000),
                    },
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("deadline_secs `{v}`: expected whole seconds, 1..=2592000"),
                        );
                    }
                },
            },
            other => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("unknown action `{other}`: expected drain, enable or disable"),
                );
            }
        };
        match self.state.set_admin_state(id, state).await {
            Ok(()) => json_reply(
                StatusCode::OK,
                json!({ "id": id, "state": state.name(), "drain_deadline_unix_ms": match state {
                    AdminState::Draining { deadline_ms } => deadline_ms,
                    _ => None,
                }}),
            ),
            Err(e @ AdminError::UnknownBackend(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
            Err(e @ AdminError::Redis(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    /// The key hash for an operator-given key and optional source.
    fn key_hash(&self, key: &str, query: Option<&str>) -> Result<(KeyHash, String), Box<Reply>> {
        let live = self.state.live();
        let sources = &live.config.affinity.sources;
        let index = match query_param(query, "source") {
            None => 0,
            Some(src) => match sources.iter().position(|s| s.to_string() == src) {
                Some(i) => i,
                None => {
                    let known: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
                    return Err(Box::new(error(
                        StatusCode::BAD_REQUEST,
                        format!("source `{src}` is not configured; sources are {known:?}"),
                    )));
                }
            },
        };
        let mut raw = percent_decoded(key);
        if raw.is_empty() {
            return Err(Box::new(error(StatusCode::BAD_REQUEST, "empty key")));
        }
        match &sources[index] {
            // The request path hashes the address's octets, not its text.
            crate::config::KeySource::Ip => {
                match std::str::from_utf8(&raw).ok().and_then(|t| t.parse().ok()) {
                    Some(ip) => raw = crate::affinity::ip_key(ip),
                    None => {
                        return Err(Box::new(error(
                            StatusCode::BAD_REQUEST,
                            "an ip key is an IP address, e.g. 203.0.113.7",
                        )));
                    }
                }
            }
            // The cookie value is `<key>.<backend hint>.<signature>`: the key alone is hashed.
            crate::config::KeySource::Insert => {
                if let Some(dot) = raw.iter().position(|b| *b == b'.') {
                    raw.truncate(dot);
                }
            }
            _ => {}
        }
        Ok((
            live.extractor.hash_for(index, &raw),
            sources[index].to_string(),
        ))
    }

    async fn lookup(&self, key: &str, query: Option<&str>) -> Reply {
        let (hash, source) = match self.key_hash(key, query) {
            Ok(k) => k,
            Err(reply) => return *reply,
        };
        match self.state.lookup_pin(hash).await {
            Ok(info) => json_reply(
                StatusCode::OK,
                json!({
                    "key_hash": hash.to_string(),
                    "source": source,
                    "cached_backend": info.cached,
                    "pinned_backend": info.stored.as_ref().and_then(|p| decode_pin(&p.value)),
                    "stored_value": info.stored.as_ref().map(|p| &p.value),
                    "ttl_ms": info.stored.as_ref().map(|p| p.ttl_ms),
                }),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn unpin(&self, key: &str, query: Option<&str>) -> Reply {
        let (hash, source) = match self.key_hash(key, query) {
            Ok(k) => k,
            Err(reply) => return *reply,
        };
        match self.state.unpin(hash).await {
            Ok(had) => json_reply(
                StatusCode::OK,
                json!({ "key_hash": hash.to_string(), "source": source, "unpinned": had }),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn reload(&self) -> Reply {
        match self.state.reload().await {
            Ok(report) => json_reply(
                StatusCode::OK,
                json!({
                    "ok": true,
                    "added": report.added,
                    "removed": report.removed,
                    "restart_required": report.restart_required,
                }),
            ),
            Err(e) => json_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "ok": false,
                    "error": "the file does not validate; the running configuration is kept",
                    "diagnostics": e.to_string().lines().collect::<Vec<_>>(),
                }),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Reply {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_owned);
        let method = req.method.clone();
        match path.as_str() {
            "/healthz" => return respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => return self.readiness(),
            _ => {}
        }
        if !self.authorized(&self.state.live(), session) {
            let mut reply = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            reply.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return reply;
        }
        self.route(&method, &path, query.as_deref()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_in_full() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!same_secret(b"0123456789abcdef", b"0123456789abcde"));
    }

    #[test]
    fn path_keys_are_percent_decoded() {
        assert_eq!(percent_decoded("s%3Aabc.sig"), b"s:abc.sig");
        assert_eq!(percent_decoded("plain"), b"plain");
    }
}
