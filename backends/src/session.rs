//! HTTP sessions with the behaviour of express-session + connect-redis: a signed cookie
//! (`rs.sid=s:<id>.<sig>`) names a JSON document at `sess:<id>` with a TTL.
//!
//! - No cookie and no key for visitors who store nothing (saveUninitialized: false).
//! - Rolling expiry by touch: every read is `GETEX … PX ttl`, not a rewrite (connect-redis'
//!   `touch`). The cookie itself has no Max-Age: it lives as long as the browser session, and the
//!   server-side TTL decides when the session is over.
//! - The id is regenerated at login (the old key is deleted) and the session is destroyed at
//!   logout (key deleted, cookie cleared with Max-Age=0).
//!
//! A bad, forged or unknown cookie is simply no session. Owns the cookie format and the
//! middleware; what is stored is `SessionData`, defined here because it is small.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::api::{ApiError, Location, User};
use crate::store::{Store, StoreError};

/// Name of the session cookie.
pub const COOKIE_NAME: &str = "rs.sid";
/// Prefix of the session keys in the store.
pub const KEY_PREFIX: &str = "sess:";
/// Random bytes in a session id (encoded as 32 base64url characters).
const ID_BYTES: usize = 24;
/// Cookies longer than this are not even looked at.
const MAX_COOKIE_LEN: usize = 256;

/// What a session holds. Empty means "no session": nothing is stored for it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionData {
    /// The logged-in user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// The user's last reported location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
}

impl SessionData {
    fn is_empty(&self) -> bool {
        *self == SessionData::default()
    }
}

/// The session machinery: store, signing key, TTL, cookie attributes.
#[derive(Clone)]
pub struct Sessions {
    store: Store,
    key: Arc<[u8]>,
    ttl: Duration,
    secure: bool,
}

impl Sessions {
    pub fn new(store: Store, secret: &[u8], ttl: Duration, secure: bool) -> Self {
        Sessions {
            store,
            key: secret.into(),
            ttl,
            secure,
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }

    /// The cookie value for a session id: `s:<id>.<base64url(HMAC-SHA256(secret, id))>`.
    fn sign(&self, id: &str) -> String {
        let mut mac = self.mac();
        mac.update(id.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("s:{id}.{sig}")
    }

    /// The session id in a cookie value, if its signature is right (checked in constant time).
    fn unsign(&self, value: &str) -> Option<String> {
        let value = value.trim_matches('"');
        // express URL-encodes the colon; accept both spellings.
        let rest = value
            .strip_prefix("s:")
            .or_else(|| value.strip_prefix("s%3A"))?;
        let (id, sig) = rest.rsplit_once('.')?;
        if !is_session_id(id) {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        let mut mac = self.mac();
        mac.update(id.as_bytes());
        mac.verify_slice(&sig).ok()?;
        Some(id.to_owned())
    }

    /// The verified session id from the request's `Cookie` headers, if any.
    pub fn session_id(&self, headers: &HeaderMap) -> Option<String> {
        cookie_values(headers, COOKIE_NAME)
            .filter(|v| v.len() <= MAX_COOKIE_LEN)
            .find_map(|v| self.unsign(v))
    }

    /// Loads (and touches) the session named by the request's cookie. `Ok(None)`: no valid
    /// cookie, or the session expired or never existed.
    pub async fn load(&self, headers: &HeaderMap) -> Result<Option<SessionData>, StoreError> {
        match self.session_id(headers) {
            Some(id) => self.load_id(&id).await,
            None => Ok(None),
        }
    }

    /// Loads (and touches) the session `id`, if it exists.
    async fn load_id(&self, id: &str) -> Result<Option<SessionData>, StoreError> {
        let Some(json) = self.store.get_touch(&key(id), self.ttl).await? else {
            return Ok(None);
        };
        match serde_json::from_str(&json) {
            Ok(data) => Ok(Some(data)),
            Err(e) => {
                // Written by another version of the app, or by hand: treat as no session.
                tracing::warn!(error = %e, "unreadable session document, ignoring it");
                Ok(None)
            }
        }
    }

    fn cookie(&self, value: &str, clear: bool) -> HeaderValue {
        let mut cookie = format!("{COOKIE_NAME}={value}; Path=/; HttpOnly; SameSite=Lax");
        if self.secure {
            cookie.push_str("; Secure");
        }
        if clear {
            cookie.push_str("; Max-Age=0");
        }
        HeaderValue::from_str(&cookie).expect("cookie is base64url and ASCII attributes")
    }

    async fn save(&self, id: &str, data: &SessionData) -> Result<(), StoreError> {
        let json = serde_json::to_string(data).expect("session data always serializes");
        self.store.set(&key(id), &json, self.ttl).await
    }

    /// Writes back what the handler changed; returns the cookie to set, if any.
    async fn commit(
        &self,
        state: SessionState,
        had_cookie: bool,
    ) -> Result<Option<HeaderValue>, StoreError> {
        let SessionState {
            id,
            data,
            dirty,
            action,
        } = state;
        let clear = || had_cookie.then(|| self.cookie("", true));
        match action {
            Action::Destroy => {
                if let Some(old) = id {
                    self.store.del(&key(&old)).await?;
                }
                Ok(clear())
            }
            Action::Regenerate => {
                // Save the new session before deleting the old one: if Redis fails in between,
                // the user is still logged in as before rather than logged out.
                let cookie = if data.is_empty() {
                    clear()
                } else {
                    let new = new_session_id();
                    self.save(&new, &data).await?;
                    Some(self.cookie(&self.sign(&new), false))
                };
                if let Some(old) = id {
                    self.store.del(&key(&old)).await?;
                }
                Ok(cookie)
            }
            Action::Keep if !dirty => Ok(None),
            Action::Keep => match id {
                Some(id) if data.is_empty() => {
                    self.store.del(&key(&id)).await?;
                    Ok(clear())
                }
                Some(id) => self.save(&id, &data).await.map(|()| None),
                None if data.is_empty() => Ok(None),
                None => {
                    let new = new_session_id();
                    self.save(&new, &data).await?;
                    Ok(Some(self.cookie(&self.sign(&new), false)))
                }
            },
        }
    }
}

/// The Redis key of a session id.
pub fn key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

fn new_session_id() -> String {
    let mut bytes = [0u8; ID_BYTES];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    URL_SAFE_NO_PAD.encode(bytes)
}

fn is_session_id(id: &str) -> bool {
    id.len() == ID_BYTES * 4 / 3
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Every value of cookie `name` in the request's `Cookie` headers.
fn cookie_values<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = &'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim())
        })
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Action {
    #[default]
    Keep,
    Regenerate,
    Destroy,
}

#[derive(Debug, Default)]
struct SessionState {
    /// The id the request's cookie named, if the session exists.
    id: Option<String>,
    data: SessionData,
    dirty: bool,
    action: Action,
}

/// The current request's session, as handlers see it (an extractor). Changes are written back
/// after the handler returns.
#[derive(Clone, Default)]
pub struct Session(Arc<Mutex<SessionState>>);

impl Session {
    fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        // Handlers never panic while holding this lock; if one did, its request is gone anyway.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the session's data.
    pub fn data(&self) -> SessionData {
        self.state().data.clone()
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<User> {
        self.state().data.user.clone()
    }

    /// Changes the data; it is saved after the handler (and a cookie set if the session is new).
    pub fn update(&self, f: impl FnOnce(&mut SessionData)) {
        let mut state = self.state();
        f(&mut state.data);
        state.dirty = true;
    }

    /// Replaces the session by a new one with a new id (at login: prevents session fixation).
    pub fn regenerate(&self, data: SessionData) {
        let mut state = self.state();
        state.data = data;
        state.dirty = true;
        state.action = Action::Regenerate;
    }

    /// Ends the session: key deleted, cookie cleared.
    pub fn destroy(&self) {
        let mut state = self.state();
        state.data = SessionData::default();
        state.action = Action::Destroy;
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or_else(|| ApiError::internal("session middleware is not installed on this route"))
    }
}

/// Middleware: loads the session before the handler, saves it after.
pub async fn middleware(
    State(sessions): State<Sessions>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = sessions.session_id(req.headers());
    let had_cookie = id.is_some();
    let loaded = match &id {
        Some(id) => sessions.load_id(id).await,
        None => Ok(None),
    };
    let state = match loaded {
        Ok(Some(data)) => SessionState {
            id,
            data,
            ..SessionState::default()
        },
        Ok(None) => SessionState::default(),
        Err(e) => return ApiError::unavailable(&e).into_response(),
    };
    let session = Session(Arc::new(Mutex::new(state)));
    req.extensions_mut().insert(session.clone());
    let mut response = next.run(req).await;
    let state = std::mem::take(&mut *session.state());
    match sessions.commit(state, had_cookie).await {
        Ok(Some(cookie)) => {
            response.headers_mut().append(SET_COOKIE, cookie);
            response
        }
        Ok(None) => response,
        Err(e) => ApiError::unavailable(&e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(Store::memory(), b"secret", Duration::from_secs(60), false)
    }

    #[test]
    fn signed_ids_round_trip_and_tampering_is_rejected() {
        let s = sessions();
        let id = new_session_id();
        let value = s.sign(&id);
        assert_eq!(s.unsign(&value), Some(id.clone()));
        assert_eq!(s.unsign(&value.replacen("s:", "s%3A", 1)), Some(id.clone()));

        let other = Sessions::new(Store::memory(), b"other", Duration::from_secs(60), false);
        assert_eq!(other.unsign(&value), None, "another secret");
        let mut forged = value.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(s.unsign(std::str::from_utf8(&forged).unwrap()), None);
        let other_id = new_session_id();
        let sig = value.rsplit_once('.').unwrap().1;
        assert_eq!(s.unsign(&format!("s:{other_id}.{sig}")), None, "swapped id");
        for junk in ["", "s:", "s:.", "abc", "s:x.y", "s:é.é", "s:%%%.%%%"] {
            assert_eq!(s.unsign(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn cookie_header_parsing_finds_the_session_cookie() {
        let s = sessions();
        let id = new_session_id();
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; rs.sid=bogus"));
        headers.append(
            COOKIE,
            HeaderValue::from_str(&format!("b=2; {COOKIE_NAME}={}", s.sign(&id))).unwrap(),
        );
        assert_eq!(s.session_id(&headers), Some(id));
    }
}
