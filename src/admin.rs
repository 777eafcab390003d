//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//!
//! A separate Pingora service on its own address (loopback by default). It reads the shared
//! [`State`]; it never touches the request path's locks.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};

use crate::backend::now_ms;
use crate::routing::State;

pub struct AdminApp {
    pub state: Arc<State>,
}

impl AdminApp {
    fn readiness(&self) -> (StatusCode, String) {
        let set = self.state.backends.load();
        let now = now_ms();
        let up = set.all().iter().filter(|b| b.is_up(now)).count();
        let redis = match &self.state.redis {
            None => "in-process",
            Some(r) if r.is_up() => "up",
            Some(_) => "down (failing open)",
        };
        // Ready means: configured and serving. Redis being down is degraded, not unready:
        // tether fails open, so taking it out of rotation would only make things worse.
        let body = format!(
            "{{\"ready\":true,\"redis\":\"{redis}\",\"backends\":{},\"backends_up\":{up}}}\n",
            set.all().len()
        );
        (StatusCode::OK, body)
    }
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static status and headers are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                let mut buf = Vec::new();
                let encoder = TextEncoder::new();
                match encoder.encode(&prometheus::gather(), &mut buf) {
                    Ok(()) => respond(StatusCode::OK, encoder.format_type(), buf),
                    Err(e) => respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("encoding metrics failed: {e}\n").into_bytes(),
                    ),
                }
            }
            "/healthz" => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let (status, body) = self.readiness();
                respond(status, "application/json", body.into_bytes())
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: try /metrics, /healthz or /readyz\n".to_vec(),
            ),
        }
    }
}
