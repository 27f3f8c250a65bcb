//! The STAC API client: authentication, the cap on requests in flight, retries, and the one
//! replay after a refused token.
//!
//! A 401, or the EDS gateway's 403 `{"message":"Forbidden"}`, drops the token that was refused,
//! obtains a new one and replays that one request; a second refusal is an authentication
//! error. The token is sent only to the API's own origin (RFC 6750 §5.3: bearer tokens must not
//! leak), never to a host a `next` link points elsewhere.
//!
//! Also what the server offers ([`capabilities_of`]): the conformance classes of its landing
//! page (or `/conformance`) and whether `/queryables` lists `updated`.

use super::auth::{Token, TokenSource};
use super::http::{self, Exchange, HttpError, ReadBody, Stats, Verdict};
use crate::clock::Clock;
use crate::config::Config;
use crate::config::RetryPolicy;
use crate::error::Error;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::{RequestBuilder, StatusCode};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use url::Url;

pub use super::search::Request;

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
    pub async fn fetch<T: Send>(
        &self,
        what: &'static str,
        request: &Request,
        mut parse: impl FnMut(Bytes) -> Result<T, String> + Send,
    ) -> Result<T, Error> {
        self.fetch_streamed(what, request, &mut Parse(&mut parse))
            .await
    }

    /// [`ApiClient::fetch`], with `read` reading the body of a 2xx answer as it arrives. An
    /// `Err` from it is retried (a transport failure mid-body, a page cut short), so it must
    /// be safe to read the same answer again.
    pub async fn fetch_streamed<T: Send>(
        &self,
        what: &'static str,
        request: &Request,
        read: &mut impl ReadBody<Output = Result<T, String>>,
    ) -> Result<T, Error> {
        let same_origin = request.url.origin() == self.root.origin();
        if !same_origin {
            tracing::warn!(url = %http::display_url(&request.url),
                "request goes to another origin than the API's: sent without the token");
        }
        let shown = http::display_url(&request.url);
        let mut replayed = false;
        loop {
            let mut exchange = Answering {
                api: self,
                request,
                same_origin,
                token: None,
                read: &mut *read,
                what,
                shown: &shown,
            };
            let answer = http::send_streamed(
                what,
                &shown,
                &self.policy,
                &self.stats,
                Some(&self.permits),
                &mut exchange,
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
                    match (&exchange.token, can_replay) {
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

/// What the server offers: the landing page's (or `/conformance`'s) classes, and whether
/// `/queryables` lists `updated` (asked only when Sort and Filter are offered).
pub async fn capabilities_of(api: &ApiClient) -> Result<Capabilities, Error> {
    let landing = landing_page(api).await?;
    capabilities_from(api, &landing).await
}

/// Reads a JSON document for [`ApiClient::fetch`].
fn json(what: &'static str) -> impl FnMut(bytes::Bytes) -> Result<serde_json::Value, String> {
    move |body| {
        serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| format!("the {what} is not JSON ({e})"))
    }
}

/// The API's landing page.
pub async fn landing_page(api: &ApiClient) -> Result<serde_json::Value, Error> {
    api.fetch(
        "landing page",
        &Request::get(api.root().clone()),
        json("landing page"),
    )
    .await
}

/// What the server offers, given its landing page.
pub async fn capabilities_from(
    api: &ApiClient,
    landing: &serde_json::Value,
) -> Result<Capabilities, Error> {
    let root = api.root();
    let mut caps = Capabilities::from_conformance(landing);
    if landing.get("conformsTo").is_none()
        && let Ok(url) = root.join("conformance")
    {
        match api
            .fetch("conformance", &Request::get(url), json("conformance"))
            .await
        {
            Ok(doc) => caps = Capabilities::from_conformance(&doc),
            Err(e) if e.is_rejected_request() => {}
            Err(e) => return Err(e),
        }
    }
    if caps.sort
        && caps.filter
        && let Ok(url) = root.join("queryables")
    {
        match api
            .fetch("queryables", &Request::get(url), json("queryables"))
            .await
        {
            Ok(doc) => caps.updated_queryable = Capabilities::queryable_updated(&doc),
            Err(e) if e.is_rejected_request() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(caps)
}

/// The API client of a config, retrying per `policy`.
pub fn api_client(
    config: &Config,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    policy: crate::config::RetryPolicy,
) -> Result<ApiClient, Error> {
    let client = http::client(&config.http)
        .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
    let tokens = TokenSource::new(
        config.auth.clone(),
        client.clone(),
        policy.clone(),
        clock,
        stats.clone(),
    );
    Ok(ApiClient::new(
        config.api_root.clone(),
        client,
        tokens,
        policy,
        stats,
        config.concurrency,
        config.headers.clone(),
    ))
}

/// What the server offers, from its landing page's `conformsTo` and its `/queryables`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// Sort extension (`sortby`).
    pub sort: bool,
    /// Filter extension (CQL2).
    pub filter: bool,
    /// Fields extension (`fields`).
    pub fields: bool,
    /// `updated` is a queryable.
    pub updated_queryable: bool,
}

impl Capabilities {
    /// Reads the conformance classes (the landing page's or `/conformance`'s `conformsTo`).
    pub fn from_conformance(doc: &Value) -> Capabilities {
        let classes: Vec<&str> = doc
            .get("conformsTo")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let has = |needle: &str| classes.iter().any(|c| c.contains(needle));
        Capabilities {
            sort: has("item-search#sort"),
            filter: has("item-search#filter")
                || has("ogcapi-features-3/1.0/conf/filter")
                || has("ogcapi-features-3/1.0/conf/features-filter"),
            fields: has("item-search#fields"),
            updated_queryable: false,
        }
    }

    /// Whether a queryables document (JSON Schema) lists `updated`.
    pub fn queryable_updated(doc: &Value) -> bool {
        doc.get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| p.contains_key("updated") || p.contains_key("properties.updated"))
    }
}

/// Reads a whole body, then hands it to a function.
struct Parse<'f, F>(&'f mut F);

impl<T: Send, F: FnMut(Bytes) -> Result<T, String> + Send> ReadBody for Parse<'_, F> {
    type Output = Result<T, String>;
    fn read(&mut self, response: reqwest::Response) -> BoxFuture<'_, Result<T, String>> {
        Box::pin(async move { (self.0)(http::read_body(response).await?) })
    }
}

/// One request to the API: built with a token taken once the request's permit is held, and its
/// answer sorted into a refused token, a body for `read`, or a refusal in the server's words.
struct Answering<'a, R> {
    api: &'a ApiClient,
    request: &'a Request,
    same_origin: bool,
    /// The token of the last attempt.
    token: Option<Token>,
    read: &'a mut R,
    what: &'static str,
    shown: &'a str,
}

impl<T: Send, R: ReadBody<Output = Result<T, String>>> Exchange for Answering<'_, R> {
    fn request(&mut self) -> BoxFuture<'_, Result<RequestBuilder, Verdict<Answer<T>>>> {
        Box::pin(async move {
            let api = self.api;
            let request = self.request;
            self.token = if self.same_origin {
                api.tokens
                    .token()
                    .await
                    .map_err(|e| Verdict::Done(Answer::Failed(e)))?
            } else {
                None
            };
            let mut builder = match request.method.as_str() {
                "POST" => api.client.post(request.url.clone()),
                _ => api.client.get(request.url.clone()),
            };
            for (name, value) in api.headers.iter().chain(&request.headers) {
                builder = builder.header(name, value);
            }
            if let Some(token) = &self.token {
                builder = builder.bearer_auth(token.value.expose_secret());
            }
            if let Some(body) = &request.body {
                builder = builder.json(body);
            }
            Ok(builder)
        })
    }
}

impl<T: Send, R: ReadBody<Output = Result<T, String>>> ReadBody for Answering<'_, R> {
    type Output = Verdict<Answer<T>>;
    fn read(&mut self, response: reqwest::Response) -> BoxFuture<'_, Verdict<Answer<T>>> {
        Box::pin(async move {
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED {
                return Verdict::Done(Answer::Refused(status));
            }
            if status.is_success() {
                return match self.read.read(response).await {
                    Ok(value) => Verdict::Done(Answer::Ok(value)),
                    Err(why) => Verdict::Retry(why),
                };
            }
            let body = match http::read_body(response).await {
                Ok(body) => body,
                Err(why) => return Verdict::Retry(why),
            };
            if is_gateway_forbidden(status, &body) {
                Verdict::Done(Answer::Refused(status))
            } else {
                Verdict::Done(Answer::Failed(rejected(
                    self.what, self.shown, status, &body,
                )))
            }
        })
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
fn rejected(what: &'static str, url: &str, status: StatusCode, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    Error::Refused {
        what,
        url: url.to_string(),
        status: status.as_u16(),
        detail: text.trim().to_string(),
    }
}
