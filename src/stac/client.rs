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
use super::http::{self, Attempts, BuildRequest, HttpError, Sent, Stats};
use crate::clock::Clock;
use crate::config::Config;
use crate::config::RetryPolicy;
use crate::error::{Error, Exit};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::{RequestBuilder, StatusCode};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use url::Url;

use super::search::PageSize;
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
    page_deadline: std::time::Duration,
}

impl ApiClient {
    /// How long a search page may take, all its attempts included.
    pub fn page_deadline(&self) -> std::time::Duration {
        self.page_deadline
    }

    /// The same client with another root (same origin: see [`settle_root`]).
    fn with_root(mut self, root: Url) -> ApiClient {
        self.root = root;
        self
    }

    /// The API's root URL (ends with `/`).
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// The token source.
    pub fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    /// The attempts of one request to the API, retried per the client's policy.
    pub(crate) fn attempts<'a>(&'a self, what: &'static str, shown: &'a str) -> Attempts<'a> {
        Attempts::new(what, shown, &self.policy, &self.stats, api_unavailable)
    }

    /// Sends `request` until the API answers 2xx, and returns that answer with its request's
    /// permit held: the caller reads the body (and, should the body fail, calls
    /// [`Attempts::retry`] and opens again). A refused token is renewed once and the request
    /// replayed; any other refusal is an error in the server's words.
    pub(crate) async fn open<'a>(
        &'a self,
        request: &Request,
        attempts: &mut Attempts<'_>,
        mut size: Option<&mut PageSize>,
    ) -> Result<Sent<'a>, Error> {
        let same_origin = !request.anonymous && request.url.origin() == self.root.origin();
        if !same_origin && !request.anonymous {
            tracing::warn!(url = %http::display_url(&request.url),
                "request goes to another origin than the API's: sent without the token");
        }
        let shown = http::display_url(&request.url);
        let mut replayed = false;
        loop {
            let mut build = Build {
                api: self,
                request,
                same_origin,
                token: None,
                size: size.as_deref_mut(),
                redirect: None,
            };
            let sent = http::send(attempts, Some(&self.permits), &mut build).await?;
            let status = sent.response.status();
            if status.is_success() {
                return Ok(sent);
            }
            // Where the refusal came from: a redirect may have taken the request elsewhere.
            let shown = match build.redirect {
                Some(_) => format!(
                    "{} (redirected from {shown})",
                    http::display_url(sent.response.url())
                ),
                None => shown.clone(),
            };
            // A refused token: 401, or the EDS gateway's 403. Anything else is final.
            if status != StatusCode::UNAUTHORIZED {
                let body = match sent.body().await {
                    Ok(body) => body,
                    Err(why) => {
                        attempts.retry(why, Some(status), None).await?;
                        continue;
                    }
                };
                if !is_gateway_forbidden(status, &body) {
                    return Err(rejected(attempts.what(), &shown, status, &body));
                }
            }
            match (build.token, !replayed && self.tokens.can_renew()) {
                (Some(token), true) => {
                    tracing::info!(url = %shown, %status, "token refused; renewing it and replaying the request");
                    self.tokens.refused(&token).await;
                    replayed = true;
                }
                _ => return Err(token_refused(&shown, status, replayed)),
            }
        }
    }

    /// Fetches `request`'s whole answer and hands it to `parse`; a body cut short, or one that
    /// does not parse (a page cut short by a proxy parses badly), is fetched again.
    pub async fn fetch<T>(
        &self,
        what: &'static str,
        request: &Request,
        mut parse: impl FnMut(Bytes) -> Result<T, String>,
    ) -> Result<T, Error> {
        let shown = http::display_url(&request.url);
        let mut attempts = self.attempts(what, &shown);
        loop {
            let answer = self.open(request, &mut attempts, None).await?;
            let status = answer.response.status();
            let why = match answer.body().await {
                Ok(body) => match parse(body) {
                    Ok(value) => return Ok(value),
                    Err(why) => http::Failed::Body(why),
                },
                Err(why) => why,
            };
            attempts.retry(why, Some(status), None).await?;
        }
    }
}

/// The API still failing after the retries, or a request that cannot be sent.
fn api_unavailable(source: HttpError) -> Error {
    let advice = match source {
        HttpError::Exhausted { .. } => "The STAC API is unavailable; try again later",
        HttpError::Fatal { .. } => "",
    };
    Error::Unavailable { source, advice }
}

fn token_refused(shown: &str, status: StatusCode, replayed: bool) -> Error {
    Error::Auth(format!(
        "the STAC API refused access to {shown} (HTTP {status}){}; check the credentials and \
         that this client may read the collection",
        if replayed {
            " even with a fresh token"
        } else {
            ""
        }
    ))
}

/// What the server offers: the landing page's (or `/conformance`'s) classes, and whether
/// `/queryables` lists `updated` (asked only when Sort and Filter are offered).
pub async fn capabilities_of(api: &ApiClient) -> Result<Capabilities, Error> {
    let landing = landing_page(api).await?;
    capabilities_from(api, &landing).await
}

/// The STAC root when `EDS_API_URL` is a bare host (`host`): the host itself if its landing
/// page is a STAC API's (it lists `conformsTo`), else the EDS path below it, which `api` has.
/// Only an API that cannot be reached is an error: a refusal or anything else at the host's
/// root means it is not a STAC root there.
pub async fn settle_root(api: ApiClient, host: Option<&Url>) -> Result<ApiClient, Error> {
    let Some(host) = host else {
        return Ok(api);
    };
    let landing = api
        .fetch("landing page", &Request::get(host.clone()), |body| {
            Ok(serde_json::from_slice::<Value>(&body).ok())
        })
        .await;
    let stac_at_host = match landing {
        Ok(doc) => doc.is_some_and(|doc| doc.get("conformsTo").is_some()),
        Err(e) if matches!(e.exit(), Exit::Upstream) => return Err(e),
        Err(_) => false,
    };
    if stac_at_host {
        tracing::info!(root = %host, "EDS_API_URL is a host whose own landing page is a STAC API's: using it as the STAC root");
        Ok(api.with_root(host.clone()))
    } else {
        tracing::info!(root = %api.root(), "EDS_API_URL is a host without a STAC landing page: using the EDS path below it");
        Ok(api)
    }
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

/// `/collections/{id}` under `root`, the id one path segment whatever it holds (`/`, `?`, `#`
/// and `%` percent-encoded). `None` for `.` and `..`: URL parsers, and servers, remove such
/// segments (their `%2E` spellings too), so no URL names them, and a request would fetch
/// `/collections` or the root instead.
pub fn collection_url(root: &url::Url, id: &str) -> Option<url::Url> {
    if matches!(id, "." | "..") {
        return None;
    }
    let mut url = root.join("collections").ok()?;
    url.path_segments_mut().ok()?.push(id);
    Some(url)
}

/// A collection's document (`GET /collections/{id}`) as received; `None` if the API has no such
/// collection (404) or refuses it (a search then says more).
pub async fn collection(api: &ApiClient, id: &str) -> Result<Option<Bytes>, Error> {
    let Some(url) = collection_url(api.root(), id) else {
        return Ok(None);
    };
    let document = |body: Bytes| match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(doc) if doc.is_object() => Ok(body),
        Ok(_) => Err("the collection is not a JSON object".to_string()),
        Err(e) => Err(format!("the collection is not JSON ({e})")),
    };
    match api.fetch("collection", &Request::get(url), document).await {
        Ok(doc) => Ok(Some(doc)),
        Err(e) if e.is_rejected_request() => Ok(None),
        Err(e) => Err(e),
    }
}

/// A collection's temporal extent as a STAC datetime interval (`start/end`, `start/..` when
/// open-ended): its first interval, the one that spans all the others. `None` without a start.
pub fn temporal_extent(collection: &serde_json::Value) -> Option<String> {
    let interval = collection
        .pointer("/extent/temporal/interval/0")?
        .as_array()?;
    let start = interval.first()?.as_str()?;
    crate::domain::parse_instant(start)?;
    let end = interval
        .get(1)
        .and_then(|end| end.as_str())
        .filter(|end| crate::domain::parse_instant(end).is_some())
        .unwrap_or("..");
    Some(format!("{start}/{end}"))
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
    Ok(ApiClient {
        root: config.api_root.clone(),
        client,
        tokens,
        policy,
        stats,
        permits: http::Cap::new(config.concurrency, config.max_requests_per_second),
        headers: config.headers.clone(),
        page_deadline: config.http.page_deadline,
    })
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
    /// Query extension (`query`).
    pub query: bool,
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
            query: has("item-search#query"),
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

/// The request of one attempt: built with a token taken once the attempt's permit is held.
struct Build<'a> {
    api: &'a ApiClient,
    request: &'a Request,
    same_origin: bool,
    /// The token of the last attempt.
    token: Option<Token>,
    /// The partition's page size, for a search page.
    size: Option<&'a mut PageSize>,
    /// Where the server redirected the request, in another origin, and whether the redirect
    /// turns it into a GET (301, 302 and 303, as browsers and reqwest do).
    redirect: Option<(Url, bool)>,
}

impl BuildRequest for Build<'_> {
    fn build(&mut self) -> BoxFuture<'_, Result<RequestBuilder, Error>> {
        Box::pin(async move {
            let api = self.api;
            let request = match &self.size {
                Some(size) => size.apply(self.request),
                None => std::borrow::Cow::Borrowed(self.request),
            };
            self.token = if self.same_origin {
                api.tokens.token().await?
            } else {
                None
            };
            let (url, post) = match &self.redirect {
                Some((to, as_get)) => (to, request.method == "POST" && !as_get),
                None => (&request.url, request.method == "POST"),
            };
            let mut builder = match post {
                true => api.client.post(url.clone()),
                false => api.client.get(url.clone()),
            };
            // Configured headers may carry credentials (`Authorization: ApiKey ...`): like the
            // token, they go to the API's origin only. A next link's own headers go with it,
            // but not where another origin redirected it.
            let configured = if self.same_origin {
                &api.headers[..]
            } else {
                &[]
            };
            let link = match self.redirect {
                Some(_) => &[][..],
                None => &request.headers[..],
            };
            for (name, value) in configured.iter().chain(link) {
                builder = builder.header(name, value);
            }
            if let Some(token) = &self.token {
                builder = builder.bearer_auth(token.value.expose_secret());
            }
            if let Some(body) = request.body.as_ref().filter(|_| post) {
                builder = builder.json(body);
            }
            Ok(builder)
        })
    }

    fn redirected(&mut self, to: &Url, status: StatusCode) -> bool {
        let from = self
            .redirect
            .as_ref()
            .map_or(&self.request.url, |(url, _)| url);
        tracing::warn!(from = %http::display_url(from), to = %http::display_url(to), %status,
            "redirected to another origin: following without the token or [headers]");
        self.same_origin = to.origin() == self.api.root.origin();
        let as_get = matches!(status.as_u16(), 301..=303)
            || self.redirect.as_ref().is_some_and(|(_, get)| *get);
        self.redirect = Some((to.clone(), as_get));
        true
    }

    fn failed(&mut self, status: Option<StatusCode>, timeout: bool) -> bool {
        let large_page = timeout || matches!(status.map(|s| s.as_u16()), Some(413 | 502 | 504));
        match &mut self.size {
            Some(size) if large_page => size.halve(self.request),
            _ => false,
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
fn rejected(what: &'static str, url: &str, status: StatusCode, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    Error::Refused {
        what,
        url: url.to_string(),
        status: status.as_u16(),
        detail: text.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::collection_url;

    #[test]
    fn a_collection_url_names_the_collection_or_nothing() {
        let root = url::Url::parse("http://api.test/stac/").expect("URL");
        let url = |id: &str| collection_url(&root, id).map(|u| u.to_string());
        assert_eq!(
            url("s2").as_deref(),
            Some("http://api.test/stac/collections/s2")
        );
        assert_eq!(
            url("EO:ESA:DAT:S2").as_deref(),
            Some("http://api.test/stac/collections/EO:ESA:DAT:S2")
        );
        assert_eq!(
            url("a/b?c#d%").as_deref(),
            Some("http://api.test/stac/collections/a%2Fb%3Fc%23d%25")
        );
        assert_eq!(url("."), None);
        assert_eq!(url(".."), None);
        assert_eq!(
            url("...").as_deref(),
            Some("http://api.test/stac/collections/...")
        );
    }
}
