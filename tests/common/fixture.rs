//! A fixture STAC API of our own, for what a real server cannot be made to do on cue: expiring
//! and revoked tokens, 429 with `Retry-After`, 503, a connection reset mid-body, a truncated
//! page, a next link that repeats, and hand-made pages (items without id, repeated ids).

use super::tokens::{self, Issuer};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the fixture's next links are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// `GET` with the paging token in the href.
    GetHref,
    /// `POST` echoing the whole body plus the token (Planetary Computer).
    PostFull,
    /// `POST` with only the token and `merge: true`.
    PostMerge,
}

/// What the next search request gets instead of its page.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Nothing: the request is served normally.
    Pass,
    /// This status, headers and body.
    Status(u16, Vec<(String, String)>, String),
    /// All tokens revoked, and the request refused as an expired token would be.
    Revoke,
    /// Half the page, then the connection dies.
    Reset,
    /// Half the page as a complete 200 response.
    Truncated,
    /// The page one byte at a time, a byte every 50 ms: never idle long enough for a read
    /// timeout, and too slow to finish.
    Trickle,
}

#[derive(Debug)]
pub struct FixtureState {
    pub issuer: Arc<Issuer>,
    pub url: String,
    pub pages: Mutex<Vec<Vec<Value>>>,
    pub paging: Mutex<Paging>,
    pub faults: Mutex<VecDeque<Fault>>,
    /// Page whose next link points back at itself.
    pub repeat_at: Mutex<Option<usize>>,
    /// Clock advance after each page served (stands for the time paging takes).
    pub advance_per_page: Mutex<Duration>,
    /// Search requests received.
    pub searches: AtomicUsize,
    /// Real time the answers for pages from this index on take (a slow API): (index, delay).
    pub delay: Mutex<(usize, Duration)>,
    /// Search requests that carried an `Authorization` header.
    pub with_authorization: AtomicUsize,
    /// Search requests that carried an `X-Api-Key` header.
    pub with_api_key: AtomicUsize,
    /// Serve each item as one of the collection searched for, as a real API would, rather than
    /// the pages' items as given (POST searches of one collection).
    pub in_searched_collection: Mutex<bool>,
    /// Base URL the next links point at, when not this server's own.
    pub next_origin: Mutex<Option<String>>,
    /// Pages served in full, by index.
    pub served: Mutex<Vec<usize>>,
    /// The landing page's `conformsTo`.
    pub conformance: Mutex<Vec<String>>,
    /// The `/queryables` document (404 when null).
    pub queryables: Mutex<Value>,
    /// Bodies (POST) or query strings (GET, as a JSON string) of the search requests received.
    pub requests: Mutex<Vec<Value>>,
    /// Search requests being answered now.
    pub in_flight: AtomicUsize,
    /// Per search request, in arrival order: the requests in flight when it arrived (itself
    /// included), and whether it was answered with a fault.
    pub arrivals: Mutex<Vec<(usize, bool)>>,
    /// When each of `arrivals` arrived.
    pub arrived_at: Mutex<Vec<std::time::Instant>>,
    /// Searches accepted in any window of a second, at most; more are answered 429 with
    /// `Retry-After: 1` (a provider's limit on the rate). The window is 50 ms short of a second:
    /// the time from the client's paced slot to a request's arrival here varies with the
    /// machine's load, and 10 ms was once too little with every test binary running at once. A
    /// client pacing 5 % too fast would pass; one not pacing at all does not.
    pub per_second: Mutex<Option<usize>>,
    /// When the searches of the last second were accepted, under `per_second`.
    pub accepted_at: Mutex<VecDeque<std::time::Instant>>,
    /// Searches answered 429 for going over `per_second`.
    pub over_rate: AtomicUsize,
    /// Serve `/collections/{id}` (a minimal document for any id); 404 otherwise.
    pub collections: std::sync::atomic::AtomicBool,
    /// The `numberMatched` each page reports, if any.
    pub matched: Mutex<Option<u64>>,
}

/// Counts a request out of `in_flight` however its handler returns.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Fixture {
    pub url: String,
    pub token_url: String,
    pub state: Arc<FixtureState>,
}

impl Fixture {
    pub fn fault(&self, fault: Fault) {
        self.state.faults.lock().expect("lock").push_back(fault);
    }

    pub fn served(&self) -> Vec<usize> {
        self.state.served.lock().expect("lock").clone()
    }
}

/// Starts a fixture serving `pages` in order.
pub async fn start(pages: Vec<Vec<Value>>, paging: Paging, issuer: Arc<Issuer>) -> Fixture {
    start_with(pages, paging, issuer, Router::new()).await
}

/// [`start`], with more routes (a bulk search's).
pub async fn start_with(
    pages: Vec<Vec<Value>>,
    paging: Paging,
    issuer: Arc<Issuer>,
    routes: Router,
) -> Fixture {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("address"));
    let state = Arc::new(FixtureState {
        issuer: issuer.clone(),
        url: url.clone(),
        pages: Mutex::new(pages),
        paging: Mutex::new(paging),
        faults: Mutex::new(VecDeque::new()),
        repeat_at: Mutex::new(None),
        advance_per_page: Mutex::new(Duration::ZERO),
        searches: AtomicUsize::new(0),
        with_authorization: AtomicUsize::new(0),
        with_api_key: AtomicUsize::new(0),
        in_searched_collection: Mutex::new(false),
        delay: Mutex::new((0, Duration::ZERO)),
        next_origin: Mutex::new(None),
        served: Mutex::new(Vec::new()),
        conformance: Mutex::new(vec![
            "https://api.stacspec.org/v1.0.0/core".into(),
            "https://api.stacspec.org/v1.0.0/item-search".into(),
        ]),
        queryables: Mutex::new(Value::Null),
        requests: Mutex::new(Vec::new()),
        in_flight: AtomicUsize::new(0),
        arrivals: Mutex::new(Vec::new()),
        arrived_at: Mutex::new(Vec::new()),
        per_second: Mutex::new(None),
        accepted_at: Mutex::new(VecDeque::new()),
        over_rate: AtomicUsize::new(0),
        collections: std::sync::atomic::AtomicBool::new(false),
        matched: Mutex::new(None),
    });
    let app = Router::new()
        .route("/search", any(search))
        .route("/", get(landing))
        .route("/queryables", get(queryables))
        .route("/collections/{id}", get(collection))
        .with_state(state.clone())
        .merge(routes)
        .merge(
            Router::new()
                .route("/token", post(tokens::token_endpoint))
                .with_state(issuer),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Fixture {
        token_url: format!("{url}token"),
        url,
        state,
    }
}

async fn landing(State(state): State<Arc<FixtureState>>, headers: HeaderMap) -> Response {
    if !state.issuer.accepts(&headers) {
        return state.issuer.refusal();
    }
    let conformance = state.conformance.lock().expect("lock").clone();
    axum::Json(
        json!({"type": "Catalog", "id": "fixture", "description": "fixture",
        "stac_version": "1.0.0", "conformsTo": conformance, "links": []}),
    )
    .into_response()
}

/// A minimal collection document for any id, when `collections` is set (else 404).
async fn collection(
    State(state): State<Arc<FixtureState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if !state.issuer.accepts(&headers) {
        return state.issuer.refusal();
    }
    if !state.collections.load(Ordering::SeqCst) {
        return (StatusCode::NOT_FOUND, "no such collection").into_response();
    }
    axum::Json(
        json!({"type": "Collection", "stac_version": "1.0.0", "id": id,
        "description": "fixture collection", "license": "other",
        "extent": {"spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
                   "temporal": {"interval": [[null, null]]}},
        "links": []}),
    )
    .into_response()
}

async fn queryables(State(state): State<Arc<FixtureState>>, headers: HeaderMap) -> Response {
    if !state.issuer.accepts(&headers) {
        return state.issuer.refusal();
    }
    let doc = state.queryables.lock().expect("lock").clone();
    if doc.is_null() {
        return (StatusCode::NOT_FOUND, "no queryables").into_response();
    }
    axum::Json(doc).into_response()
}

async fn search(
    State(state): State<Arc<FixtureState>>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.searches.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _in_flight = InFlight(&state.in_flight);
    if headers.contains_key(header::AUTHORIZATION) {
        state.with_authorization.fetch_add(1, Ordering::SeqCst);
    }
    if headers.contains_key("x-api-key") {
        state.with_api_key.fetch_add(1, Ordering::SeqCst);
    }
    if !state.issuer.accepts(&headers) {
        return state.issuer.refusal();
    }

    if let Some(limit) = *state.per_second.lock().expect("lock") {
        let at = std::time::Instant::now();
        let mut accepted = state.accepted_at.lock().expect("lock");
        accepted.retain(|t| at.duration_since(*t) < Duration::from_millis(950));
        if accepted.len() >= limit {
            state.over_rate.fetch_add(1, Ordering::SeqCst);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "1")],
                "over the rate limit",
            )
                .into_response();
        }
        accepted.push_back(at);
    }
    let fault = state.faults.lock().expect("lock").pop_front();
    {
        let mut arrivals = state.arrivals.lock().expect("lock");
        arrivals.push((now, !matches!(fault, None | Some(Fault::Pass))));
        state
            .arrived_at
            .lock()
            .expect("lock")
            .push(std::time::Instant::now());
    }
    let request_body: Value = if method == Method::POST {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return (StatusCode::BAD_REQUEST, "body is not JSON").into_response(),
        }
    } else {
        Value::Null
    };
    state
        .requests
        .lock()
        .expect("lock")
        .push(if method == Method::POST {
            request_body.clone()
        } else {
            Value::String(query.clone().unwrap_or_default())
        });
    if method == Method::POST && request_body.get("collections").is_none() {
        return (StatusCode::BAD_REQUEST, "POST body lost its collections").into_response();
    }
    let token = if method == Method::POST {
        request_body
            .get("token")
            .and_then(Value::as_str)
            .map(str::to_string)
    } else {
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    };
    let index: usize = token
        .as_deref()
        .and_then(|t| t.strip_prefix('p'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let (slow_from, delay) = *state.delay.lock().expect("lock");
    if index >= slow_from && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let pages = state.pages.lock().expect("lock").clone();
    let Some(features) = pages.get(index) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("no page {index}: stale token"),
        )
            .into_response();
    };
    let target = if *state.repeat_at.lock().expect("lock") == Some(index) {
        Some(index)
    } else if index + 1 < pages.len() {
        Some(index + 1)
    } else {
        None
    };
    let paging = *state.paging.lock().expect("lock");
    let base = state
        .next_origin
        .lock()
        .expect("lock")
        .clone()
        .unwrap_or_else(|| state.url.clone());
    let mut links = vec![json!({"rel": "root", "href": state.url})];
    if let Some(target) = target {
        let token = format!("p{target}");
        links.push(match paging {
            Paging::GetHref => json!({"rel": "next", "type": "application/geo+json",
                "href": format!("{base}search?collections=x&token={token}")}),
            Paging::PostFull => {
                let mut body = request_body.clone();
                body["token"] = Value::String(token);
                json!({"rel": "next", "href": format!("{base}search"), "method": "POST", "body": body})
            }
            Paging::PostMerge => json!({"rel": "next", "href": format!("{base}search"),
                "method": "POST", "merge": true, "body": {"token": token}}),
        });
    }
    let mut features = features.clone();
    if *state.in_searched_collection.lock().expect("lock")
        && let Some(searched) = request_body["collections"].get(0)
    {
        for feature in &mut features {
            feature["collection"] = searched.clone();
        }
    }
    let mut page = json!({"type": "FeatureCollection", "features": features, "links": links});
    if let Some(matched) = *state.matched.lock().expect("lock") {
        page["numberMatched"] = matched.into();
    }
    let page = serde_json::to_vec(&page).expect("serialisable");
    match fault {
        Some(Fault::Status(status, headers, body)) => {
            let mut response =
                (StatusCode::from_u16(status).expect("status"), body).into_response();
            for (name, value) in headers {
                response.headers_mut().insert(
                    header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                    value.parse().expect("value"),
                );
            }
            return response;
        }
        Some(Fault::Revoke) => {
            state.issuer.revoke_all();
            return state.issuer.refusal();
        }
        Some(Fault::Reset) => {
            let half = Bytes::copy_from_slice(&page[..page.len() / 2]);
            let chunks: Vec<Result<Bytes, std::io::Error>> =
                vec![Ok(half), Err(std::io::Error::other("connection reset"))];
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/geo+json")
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .expect("response");
        }
        Some(Fault::Trickle) => {
            let bytes = Bytes::copy_from_slice(&page);
            let drip = futures_util::stream::unfold(0, move |at| {
                let bytes = bytes.clone();
                async move {
                    if at >= bytes.len() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((Ok::<_, std::io::Error>(bytes.slice(at..at + 1)), at + 1))
                }
            });
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/geo+json")
                .body(Body::from_stream(drip))
                .expect("response");
        }
        Some(Fault::Truncated) => {
            return (
                [(header::CONTENT_TYPE, "application/geo+json")],
                page[..page.len() / 2].to_vec(),
            )
                .into_response();
        }
        Some(Fault::Pass) | None => {}
    }
    state.served.lock().expect("lock").push(index);
    let advance = *state.advance_per_page.lock().expect("lock");
    state.issuer.clock.advance(advance);
    ([(header::CONTENT_TYPE, "application/geo+json")], page).into_response()
}
