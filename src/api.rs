//! The STAC API client: authentication, the cap on requests in flight, retries, and the one
//! replay after a refused token.
//!
//! A 401, or the EDS gateway's 403 `{"message":"Forbidden"}`, drops the token that was refused,
//! obtains a new one and replays that one request; a second refusal is an authentication
//! error. The token is sent only to the API's own origin (RFC 6750 §5.3: bearer tokens must not
//! leak), never to a host a `next` link points elsewhere.

use crate::auth::TokenSource;
use crate::error::Error;
use crate::http::{self, HttpError, RetryPolicy, Stats, Verdict};
use bytes::Bytes;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use url::Url;

/// One API request, as stored in a resume point: method, absolute URL, extra headers, body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// `GET` or `POST`.
    pub method: String,
    /// Absolute URL, query included.
    pub url: Url,
    /// Headers a `next` link asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// JSON body of a POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

impl Request {
    /// A GET of `url`.
    pub fn get(url: Url) -> Request {
        Request {
            method: "GET".into(),
            url,
            headers: Vec::new(),
            body: None,
        }
    }
}

/// Talks to one STAC API.
#[derive(Debug)]
pub struct ApiClient {
    root: Url,
    client: reqwest::Client,
    tokens: TokenSource,
    policy: RetryPolicy,
    stats: Arc<Stats>,
    permits: http::Cap,
    headers: Vec<(String, String)>,
}

enum Answer<T> {
    Ok(T),
    Refused(StatusCode),
    Failed(Error),
}

impl ApiClient {
    /// A client for the API at `root`.
    pub fn new(
        root: Url,
        client: reqwest::Client,
        tokens: TokenSource,
        policy: RetryPolicy,
        stats: Arc<Stats>,
        concurrency: usize,
        headers: Vec<(String, String)>,
    ) -> ApiClient {
        ApiClient {
            root,
            client,
            tokens,
            policy,
            stats,
            permits: http::Cap::new(concurrency),
            headers,
        }
    }

    /// The API's root URL (ends with `/`).
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// The token source.
    pub fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    /// Fetches `request` and hands the body of a 2xx answer to `parse`; a parse failure is
    /// retried like a transport failure (a page cut short by a proxy parses badly).
    pub async fn fetch<T>(
        &self,
        what: &'static str,
        request: &Request,
        mut parse: impl FnMut(Bytes) -> Result<T, String>,
    ) -> Result<T, Error> {
        let same_origin = request.url.origin() == self.root.origin();
        if !same_origin {
            tracing::warn!(url = %http::display_url(&request.url),
                "request goes to another origin than the API's: sent without the token");
        }
        let shown = http::display_url(&request.url);
        let mut replayed = false;
        loop {
            let token = if same_origin {
                self.tokens.token().await?
            } else {
                None
            };
            let build = || {
                let mut builder = match request.method.as_str() {
                    "POST" => self.client.post(request.url.clone()),
                    _ => self.client.get(request.url.clone()),
                };
                for (name, value) in self.headers.iter().chain(&request.headers) {
                    builder = builder.header(name, value);
                }
                if let Some(token) = &token {
                    builder = builder.bearer_auth(token.value.expose_secret());
                }
                if let Some(body) = &request.body {
                    builder = builder.json(body);
                }
                builder
            };
            let answer = http::send(
                what,
                &shown,
                &self.policy,
                &self.stats,
                Some(&self.permits),
                build,
                |r| {
                    if r.status == StatusCode::UNAUTHORIZED
                        || is_gateway_forbidden(r.status, &r.body)
                    {
                        Verdict::Done(Answer::Refused(r.status))
                    } else if r.status.is_success() {
                        match parse(r.body) {
                            Ok(value) => Verdict::Done(Answer::Ok(value)),
                            Err(why) => Verdict::Retry(why),
                        }
                    } else {
                        Verdict::Done(Answer::Failed(rejected(what, &shown, r.status, &r.body)))
                    }
                },
            )
            .await
            .map_err(|e| match e {
                HttpError::Exhausted { .. } => {
                    Error::Upstream(format!("{e}. The STAC API is unavailable; try again later"))
                }
                HttpError::Fatal { .. } => Error::Upstream(e.to_string()),
            })?;
            match answer {
                Answer::Ok(value) => return Ok(value),
                Answer::Failed(error) => return Err(error),
                Answer::Refused(status) => {
                    let can_replay = !replayed && self.tokens.can_renew();
                    match (&token, can_replay) {
                        (Some(token), true) => {
                            tracing::info!(url = %shown, %status, "token refused; renewing it and replaying the request");
                            self.tokens.refused(token).await;
                            replayed = true;
                        }
                        _ => {
                            return Err(Error::Auth(format!(
                                "the STAC API refused access to {shown} (HTTP {status}){}; check \
                                 the credentials and that this client may read the collection",
                                if replayed {
                                    " even with a fresh token"
                                } else {
                                    ""
                                }
                            )));
                        }
                    }
                }
            }
        }
    }
}

/// EDS's API gateway answers an expired token with 403 `{"message":"Forbidden"}`, not 401.
fn is_gateway_forbidden(status: StatusCode, body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Message<'a> {
        message: &'a str,
    }
    status == StatusCode::FORBIDDEN
        && serde_json::from_slice::<Message<'_>>(body).is_ok_and(|m| m.message == "Forbidden")
}

/// A non-retryable refusal of a request, with the server's own words.
fn rejected(what: &str, url: &str, status: StatusCode, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    let text = text.trim();
    match status.as_u16() {
        400 | 422 => Error::Config(format!(
            "the STAC API rejected the {what} {url} (HTTP {status}): {text}; check the job's \
             collections, bbox, datetime, query and filter"
        )),
        403 => Error::Auth(format!(
            "the STAC API forbids {url} (HTTP 403): {text}; check that these credentials may \
             read it"
        )),
        404 => Error::Config(format!(
            "{what} {url} not found (HTTP 404): check the API URL (EDS_API_URL) and the \
             collection ids"
        )),
        _ => Error::Upstream(format!("{what} {url} answered HTTP {status}: {text}")),
    }
}
