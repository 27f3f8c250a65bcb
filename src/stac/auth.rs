//! Where the API's `Authorization` header comes from: nothing, a static bearer token, or an
//! OAuth2 client-credentials grant (RFC 6749 §4.4).
//!
//! Tokens are cached and renewed ahead of expiry, measured on a monotonic [`Clock`] from
//! `expires_in`. Renewal is double-checked under a lock (as object_store's `TokenCache`), so
//! however many requests find the token stale, one token request is made. When the API refuses
//! a token, [`TokenSource::refused`] drops that token (and only that one) so the next call
//! fetches a fresh one.

use super::http::{self, Attempts, BuildWith, HttpError, Stats};
use crate::clock::Clock;
use crate::config::RetryPolicy;
use crate::config::{Auth, AuthStyle, ClientCredentials};
use crate::error::Error;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{Mutex, RwLock};
use url::form_urlencoded;

/// Lifetime assumed when the token response has no usable `expires_in` (RFC 6749 §5.1 makes
/// it optional). Short, so a wrong guess costs one refused request, never a run.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(300);
/// Renew this long before expiry at most (a fifth of the lifetime for short-lived tokens).
const MAX_RENEW_MARGIN: Duration = Duration::from_secs(300);

/// A token handed to a request, with the generation that identifies it for [`TokenSource::refused`].
#[derive(Debug, Clone)]
pub struct Token {
    /// The bearer value.
    pub value: SecretString,
    /// Its lifetime as the token endpoint gave it (`None` for a static token).
    pub lifetime: Option<Duration>,
    generation: u64,
}

#[derive(Debug)]
struct Cached {
    token: Token,
    renew_at: Duration,
}

/// Supplies bearer tokens for API requests.
#[derive(Debug)]
pub struct TokenSource {
    auth: Auth,
    client: reqwest::Client,
    policy: RetryPolicy,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    cache: RwLock<Option<Cached>>,
    renewal: Mutex<u64>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl TokenSource {
    /// A token source for the configured authentication.
    pub fn new(
        auth: Auth,
        client: reqwest::Client,
        policy: RetryPolicy,
        clock: Arc<dyn Clock>,
        stats: Arc<Stats>,
    ) -> TokenSource {
        TokenSource {
            auth,
            client,
            policy,
            clock,
            stats,
            cache: RwLock::new(None),
            renewal: Mutex::new(0),
        }
    }

    /// Whether a refused token can be replaced by another (not so for a static token).
    pub fn can_renew(&self) -> bool {
        matches!(self.auth, Auth::ClientCredentials(_))
    }

    /// The token to send now, or `None` when the API needs no authentication.
    pub async fn token(&self) -> Result<Option<Token>, Error> {
        let credentials = match &self.auth {
            Auth::None => return Ok(None),
            Auth::Bearer(value) => {
                return Ok(Some(Token {
                    value: value.clone(),
                    lifetime: None,
                    generation: 0,
                }));
            }
            Auth::ClientCredentials(credentials) => credentials,
        };
        if let Some(token) = self.fresh().await {
            return Ok(Some(token));
        }
        let mut generation = self.renewal.lock().await;
        // Another task may have renewed while we waited for the lock.
        if let Some(token) = self.fresh().await {
            return Ok(Some(token));
        }
        let (value, lifetime) = self.request(credentials).await?;
        *generation += 1;
        if *generation > 1 {
            self.stats.token_renewals.fetch_add(1, Ordering::Relaxed);
        }
        let margin = (lifetime / 5).min(MAX_RENEW_MARGIN);
        let token = Token {
            value,
            lifetime: Some(lifetime),
            generation: *generation,
        };
        tracing::debug!(lifetime = ?lifetime, generation = *generation, "obtained an access token");
        *self.cache.write().await = Some(Cached {
            token: token.clone(),
            renew_at: self.clock.now() + lifetime - margin,
        });
        Ok(Some(token))
    }

    /// The API refused `token`: forget it, unless it was already replaced.
    pub async fn refused(&self, token: &Token) {
        let _guard = self.renewal.lock().await;
        let mut cache = self.cache.write().await;
        if cache
            .as_ref()
            .is_some_and(|c| c.token.generation == token.generation)
        {
            *cache = None;
        }
    }

    async fn fresh(&self) -> Option<Token> {
        let cache = self.cache.read().await;
        cache
            .as_ref()
            .filter(|c| self.clock.now() < c.renew_at)
            .map(|c| c.token.clone())
    }

    /// One client-credentials grant (RFC 6749 §4.4.2), retried like any request.
    async fn request(&self, c: &ClientCredentials) -> Result<(SecretString, Duration), Error> {
        let build = || {
            let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
            if let Some(scope) = &c.scope {
                form.push(("scope", scope));
            }
            let request = self.client.post(c.token_url.clone());
            match c.style {
                // RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding.
                AuthStyle::Basic => {
                    let id: String =
                        form_urlencoded::byte_serialize(c.client_id.as_bytes()).collect();
                    let secret: String =
                        form_urlencoded::byte_serialize(c.client_secret.expose_secret().as_bytes())
                            .collect();
                    request.basic_auth(id, Some(secret)).form(&form)
                }
                AuthStyle::Post => {
                    form.push(("client_id", &c.client_id));
                    form.push(("client_secret", c.client_secret.expose_secret()));
                    request.form(&form)
                }
            }
        };
        let url = http::display_url(&c.token_url);
        let mut attempts = Attempts::new(
            "token request to",
            &url,
            &self.policy,
            &self.stats,
            token_endpoint_unavailable,
        );
        let response = loop {
            let sent = http::send(&mut attempts, None, &mut BuildWith(&build)).await?;
            let status = sent.response.status();
            let body = match sent.body().await {
                Ok(body) => body,
                Err(why) => {
                    attempts.retry(why, Some(status), None).await?;
                    continue;
                }
            };
            if !status.is_success() {
                return Err(refusal(&url, status, &body, c));
            }
            break serde_json::from_slice::<TokenResponse>(&body)
                .map_err(|e| not_a_token(&url, &body, &e))?;
        };
        if let Some(kind) = &response.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            tracing::warn!(token_type = %kind, "token endpoint returned a non-bearer token type; sending it as Bearer");
        }
        Ok((
            response.access_token,
            lifetime(response.expires_in.as_ref()),
        ))
    }
}

/// The token endpoint still failing after the retries, or a URL that cannot be requested.
fn token_endpoint_unavailable(error: HttpError) -> Error {
    match error {
        HttpError::Exhausted { .. } => Error::Unavailable {
            source: error,
            advice: "The token endpoint is unavailable; try again later",
        },
        HttpError::Fatal { .. } => Error::Config(format!("{error}: check EDS_AUTH_URL")),
    }
}

/// A 2xx answer that is not a token: a login page or another service at the token URL. Not
/// retried: the same URL answers the same way.
fn not_a_token(url: &str, body: &[u8], error: &serde_json::Error) -> Error {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    Error::Config(format!(
        "the token endpoint {url} answered with something that is not an OAuth2 token \
         ({error}; it begins {:?}): check EDS_AUTH_URL (or STAC_SYNC_TOKEN_URL), which must be \
         the OAuth2 token endpoint itself",
        text.trim()
    ))
}

/// `expires_in` as a lifetime: seconds as a positive number or numeric string, believed however
/// short: a token used past it is refused, and a replay sent with a token believed fresh but
/// expired is refused twice, which ends the run. Anything else, zero and negative included, is
/// [`ASSUMED_LIFETIME`].
fn lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let seconds = match expires_in {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match seconds {
        Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s.min(365.0 * 86_400.0)),
        _ => ASSUMED_LIFETIME,
    }
}

/// A refusal from the token endpoint, in words a person can act on (RFC 6749 §5.2).
fn refusal(url: &str, status: reqwest::StatusCode, body: &[u8], c: &ClientCredentials) -> Error {
    let parsed = serde_json::from_slice::<OAuthError>(body).ok();
    let detail = parsed
        .as_ref()
        .and_then(|e| e.error_description.clone())
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    let advice = match parsed.as_ref().map(|e| e.error.as_str()) {
        Some("invalid_client") => format!(
            "the token endpoint {url} rejected the client id and secret (invalid_client{detail}); \
             check EDS_CLIENT_ID and EDS_SECRET"
        ),
        Some("unauthorized_client") => format!(
            "the token endpoint {url} does not allow this client the client-credentials grant \
             (unauthorized_client{detail}); ask the API's administrator to enable it"
        ),
        Some("invalid_scope") => format!(
            "the token endpoint {url} refused the scope {:?} (invalid_scope{detail}); fix auth.scope",
            c.scope.as_deref().unwrap_or("")
        ),
        Some("unsupported_grant_type") => format!(
            "the token endpoint {url} does not support the client-credentials grant \
             (unsupported_grant_type{detail}); check EDS_AUTH_URL"
        ),
        Some(other) => format!("the token endpoint {url} answered {other}{detail} (HTTP {status})"),
        None if matches!(status.as_u16(), 404 | 405) => {
            return Error::Config(format!(
                "the token endpoint {url} answered HTTP {status}: it is not a token endpoint; \
                 check EDS_AUTH_URL"
            ));
        }
        None => format!(
            "the token endpoint {url} answered HTTP {status}; check EDS_CLIENT_ID, EDS_SECRET \
             and EDS_AUTH_URL"
        ),
    };
    Error::Auth(advice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_or_odd_expires_in_gives_a_safe_lifetime() {
        assert_eq!(lifetime(Some(&json!(3600))), Duration::from_secs(3600));
        assert_eq!(lifetime(Some(&json!("120"))), Duration::from_secs(120));
        assert_eq!(lifetime(None), ASSUMED_LIFETIME);
        assert_eq!(lifetime(Some(&json!("soon"))), ASSUMED_LIFETIME);
        assert_eq!(lifetime(Some(&json!(3))), Duration::from_secs(3));
        assert_eq!(lifetime(Some(&json!(0.5))), Duration::from_millis(500));
        assert_eq!(lifetime(Some(&json!(0))), ASSUMED_LIFETIME);
        assert_eq!(lifetime(Some(&json!(-5))), ASSUMED_LIFETIME);
        assert_eq!(
            lifetime(Some(&json!(1e300))),
            Duration::from_secs(365 * 86_400)
        );
    }
}
