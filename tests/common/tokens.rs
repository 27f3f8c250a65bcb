//! An OAuth2 client-credentials token endpoint (RFC 6749 §4.4) and the bearer check in front
//! of an API, on a clock the test controls.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::json;
use stac_sync::clock::{Clock, ManualClock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Issues and checks tokens.
#[derive(Debug)]
pub struct Issuer {
    pub clock: Arc<ManualClock>,
    pub client_id: String,
    pub client_secret: String,
    /// `expires_in` of new tokens, seconds.
    pub ttl: AtomicU64,
    /// Token requests received.
    pub requests: AtomicUsize,
    /// API requests refused for a missing, unknown or expired token.
    pub refused: AtomicUsize,
    /// Answer refusals as EDS's gateway does (403 `{"message":"Forbidden"}`) instead of 401.
    pub eds_style: std::sync::atomic::AtomicBool,
    tokens: Mutex<HashMap<String, Duration>>,
    issued: AtomicUsize,
    /// Set for an issuer on real time: its time is the time elapsed since then, not `clock`.
    origin: Option<std::time::Instant>,
}

impl Issuer {
    /// An issuer on real time (for the example servers run by hand), issuing tokens that live
    /// `ttl_seconds`. Its time is read from the monotonic clock when a token is issued or
    /// checked: a clock advanced by a task on the server's runtime fell up to 0.72 s behind when
    /// that runtime was busy serving big pages, so tokens issued then expired that much early
    /// in real time, past the client's renewal margin for 3-second tokens.
    pub fn real_time(client_id: &str, client_secret: &str, ttl_seconds: u64) -> Arc<Issuer> {
        let issuer = Issuer {
            origin: Some(std::time::Instant::now()),
            ..Issuer::on(Arc::new(ManualClock::default()), client_id, client_secret)
        };
        issuer.ttl.store(ttl_seconds, Ordering::SeqCst);
        Arc::new(issuer)
    }

    pub fn new(clock: Arc<ManualClock>, client_id: &str, client_secret: &str) -> Arc<Issuer> {
        Arc::new(Issuer::on(clock, client_id, client_secret))
    }

    fn on(clock: Arc<ManualClock>, client_id: &str, client_secret: &str) -> Issuer {
        Issuer {
            clock,
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            ttl: AtomicU64::new(3600),
            requests: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            eds_style: Default::default(),
            tokens: Mutex::new(HashMap::new()),
            issued: AtomicUsize::new(0),
            origin: None,
        }
    }

    /// The issuer's time: real time since its start, or the test's clock.
    fn now(&self) -> Duration {
        self.origin
            .map_or_else(|| self.clock.now(), |origin| origin.elapsed())
    }

    /// Makes every token issued so far invalid (as a server-side revocation).
    pub fn revoke_all(&self) {
        self.tokens.lock().expect("lock").clear();
    }

    /// Whether the request carries a live token.
    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let now = self.now();
        self.tokens
            .lock()
            .expect("lock")
            .get(token)
            .is_some_and(|expires| now < *expires)
    }

    /// The refusal an API answers with.
    pub fn refusal(&self) -> Response {
        self.refused.fetch_add(1, Ordering::SeqCst);
        if self.eds_style.load(Ordering::SeqCst) {
            (StatusCode::FORBIDDEN, Json(json!({"message": "Forbidden"}))).into_response()
        } else {
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"code": "Unauthorized"})),
            )
                .into_response()
        }
    }

    /// Checks client authentication by HTTP Basic (form-urlencoded parts, RFC 6749 §2.3.1) or
    /// form fields, and issues a token.
    pub fn token_response(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(body).into_owned().collect();
        if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "unsupported_grant_type"})),
            )
                .into_response();
        }
        let basic = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|raw| {
                let text = String::from_utf8(raw).ok()?;
                let (id, secret) = text.split_once(':')?;
                let decode = |s: &str| -> String {
                    url::form_urlencoded::parse(format!("x={s}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                Some((decode(id), decode(secret)))
            });
        let credentials = basic.or_else(|| {
            Some((
                form.get("client_id")?.clone(),
                form.get("client_secret")?.clone(),
            ))
        });
        if credentials != Some((self.client_id.clone(), self.client_secret.clone())) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_client", "error_description": "Client authentication failed"})),
            )
                .into_response();
        }
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        let token = format!("token-{n}");
        let ttl = self.ttl.load(Ordering::SeqCst);
        let expires = self.now() + Duration::from_secs(ttl);
        self.tokens
            .lock()
            .expect("lock")
            .insert(token.clone(), expires);
        Json(json!({"access_token": token, "token_type": "Bearer", "expires_in": ttl}))
            .into_response()
    }
}

/// axum handler for `POST /token`.
pub async fn token_endpoint(
    State(issuer): State<Arc<Issuer>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    issuer.token_response(&headers, &body)
}

/// axum middleware: refuse requests without a live token.
pub async fn require_token(
    State(issuer): State<Arc<Issuer>>,
    request: Request<Body>,
    next: Next,
) -> Response {
    if issuer.accepts(request.headers()) {
        next.run(request).await
    } else {
        issuer.refusal()
    }
}

/// A token for the test client `id` / `secret` from `token_url`, as a test's own HTTP client
/// asks for one.
pub async fn fetch(token_url: &str) -> String {
    let token: serde_json::Value = reqwest::Client::new()
        .post(token_url)
        .basic_auth("id", Some("secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("token JSON");
    token["access_token"]
        .as_str()
        .expect("an access token")
        .to_string()
}
