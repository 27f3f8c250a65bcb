//! The benchmark's STAC API: N realistic items (Sentinel-2 L2A-like, about 15 KB of JSON each,
//! generated deterministically from the real EDS items), in several collections, acquired over
//! 2017-2026 with several items sharing each datetime, behind the tests' OAuth2 token layer.
//! It serves item search (POST and GET; `collections`, `datetime`, `limit`, and a `token` in
//! the next link, as Planetary Computer does) from pre-serialised items, so that the server
//! costs little next to the clients measured; an optional delay per request stands for a
//! remote API, and short token lifetimes force renewals.
//!
//! ```text
//! cargo run --release --example bench_api -- --items 30000 --delay-ms 100 --port 18300
//! ```
//! It prints the environment for stac-sync and the baseline client, then serves until killed.
//!
//! It also offers EDS's bulk search (see `stac_sync::stac::bulk`): a search of one collection
//! is "exported" at once, as NDJSON files of [`FILE_ITEMS`] items written as they are sent
//! (the same bytes as its pages hold), on URLs with a query standing for a signature. The
//! delay applies to its submission and its polls, not to its files (they come from storage).

#[path = "../tests/common/mod.rs"]
#[allow(unused)]
mod common;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use clap::Parser;
use common::tokens::{self, Issuer};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, Parser)]
struct Args {
    /// Items to serve.
    #[arg(long, default_value_t = 30_000)]
    items: usize,
    /// Collections they are spread over.
    #[arg(long, default_value_t = 4)]
    collections: usize,
    /// Delay added to every search request, milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Lifetime of issued tokens, seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl: u64,
    /// Port (0: any free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

/// The items of one collection, sorted by datetime: (datetime, item number).
struct Collection {
    name: String,
    items: Vec<(SystemTime, usize)>,
}

/// What is served: the collections and which items have changed since the first generation.
struct Served {
    collections: Vec<Collection>,
    /// Items whose `updated` is later than the first generation's (their bytes differ).
    changed: std::collections::HashSet<usize>,
}

/// An item's JSON as the bytes around its id, datetime and `updated`: a real item serialised
/// once per (template, collection) with markers that are then cut out. An item's bytes are
/// these parts with its own values between them, so serving N items holds N small keys, not
/// N times 15 KB (a million items would not fit in memory twice over).
struct Template {
    parts: Vec<Vec<u8>>,
    /// Which value goes after each part but the last: 0 id, 1 datetime, 2 updated.
    holes: Vec<usize>,
}

const MARKERS: [&str; 3] = ["@@bench-id@@", "@@bench-datetime@@", "@@bench-updated@@"];

impl Template {
    fn new(item: &Value) -> Template {
        let bytes = serde_json::to_vec(item).unwrap_or_default();
        let (mut parts, mut holes, mut rest) = (Vec::new(), Vec::new(), &bytes[..]);
        loop {
            let next = MARKERS
                .iter()
                .enumerate()
                .filter_map(|(k, m)| find(rest, m.as_bytes()).map(|at| (at, k)))
                .min();
            let Some((at, k)) = next else { break };
            parts.push(rest[..at].to_vec());
            holes.push(k);
            rest = &rest[at + MARKERS[k].len()..];
        }
        parts.push(rest.to_vec());
        Template { parts, holes }
    }

    fn len(&self, values: &[&str; 3]) -> usize {
        let fixed: usize = self.parts.iter().map(Vec::len).sum();
        fixed + self.holes.iter().map(|&k| values[k].len()).sum::<usize>()
    }

    fn write(&self, values: &[&str; 3], out: &mut Vec<u8>) {
        for (i, part) in self.parts.iter().enumerate() {
            out.extend_from_slice(part);
            if let Some(&k) = self.holes.get(i) {
                out.extend_from_slice(values[k].as_bytes());
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Item n's datetime: three items per datetime (tiles of one acquisition), over ten years.
fn datetime(n: usize) -> String {
    let acquisition = n / 3;
    format!(
        "{}-{:02}-{:02}T10:{:02}:{:02}Z",
        2017 + acquisition % 10,
        1 + (acquisition / 10) % 12,
        1 + (acquisition / 120) % 28,
        (acquisition / 3360) % 60,
        (acquisition / 201_600) % 60
    )
}

const UPDATED: [&str; 2] = ["2026-01-01T00:00:00Z", "2026-06-01T00:00:00Z"];

struct Api {
    url: String,
    issuer: Arc<Issuer>,
    names: Vec<String>,
    /// Templates by collection, then by the real item they were made from.
    templates: Vec<Vec<Template>>,
    served: std::sync::RwLock<Arc<Served>>,
    delay: Duration,
}

impl Api {
    fn served(&self) -> Arc<Served> {
        match self.served.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The number of items of the collection named `name`, if served.
    fn count(&self, name: Option<&str>) -> Option<usize> {
        let served = self.served();
        let found = served
            .collections
            .iter()
            .find(|c| Some(c.name.as_str()) == name)?;
        Some(found.items.len())
    }

    fn item(&self, n: usize, served: &Served, out: &mut Vec<u8>) {
        let c = n % self.names.len();
        let templates = &self.templates[c];
        let id = format!("S2-bench-{n:07}");
        let datetime = datetime(n);
        let updated = UPDATED[usize::from(served.changed.contains(&n))];
        templates[n % templates.len()].write(&[&id, &datetime, updated], out);
    }

    /// Items 0..items, with `changed` of them (spread evenly) given a later `updated`.
    fn serve(&self, items: usize, changed: usize) -> usize {
        let mut collections: Vec<Collection> = self
            .names
            .iter()
            .map(|name| Collection {
                name: name.clone(),
                items: Vec::new(),
            })
            .collect();
        let mut bytes = 0;
        let count = collections.len();
        for n in 0..items {
            let datetime = datetime(n);
            let at = stac_sync::plan::parse_instant(&datetime).unwrap_or(SystemTime::UNIX_EPOCH);
            collections[n % count].items.push((at, n));
            let templates = &self.templates[n % count];
            let id = format!("S2-bench-{n:07}");
            bytes += templates[n % templates.len()].len(&[&id, &datetime, UPDATED[0]]);
        }
        for collection in &mut collections {
            collection.items.sort_by_key(|(at, n)| (*at, *n));
        }
        let step = items.checked_div(changed).unwrap_or(0).max(1);
        let changed = (0..changed)
            .map(|k| k * step)
            .filter(|&n| n < items)
            .collect();
        let served = Arc::new(Served {
            collections,
            changed,
        });
        match self.served.write() {
            Ok(mut guard) => *guard = served,
            Err(poisoned) => *poisoned.into_inner() = served,
        }
        bytes
    }
}

fn templates(names: &[String]) -> Vec<Vec<Template>> {
    let base = common::eds_items();
    names
        .iter()
        .map(|name| {
            base.iter()
                .map(|b| {
                    let mut item = common::realistic_item(b, MARKERS[0], name, MARKERS[1]);
                    item["properties"]["updated"] = Value::String(MARKERS[2].to_string());
                    Template::new(&item)
                })
                .collect()
        })
        .collect()
}

fn collection_name(i: usize) -> String {
    format!("sentinel-2-l2a-{}", (b'a' + i as u8) as char)
}

/// Items in one file of a bulk search's export.
const FILE_ITEMS: usize = 50_000;

/// `POST /search/bulk`: the job of one collection's export is named after the collection
/// (and is done at once).
async fn bulk_submit(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    if !api.issuer.accepts(&headers) {
        return api.issuer.refusal();
    }
    tokio::time::sleep(api.delay).await;
    let params: Value = serde_json::from_slice(&body).unwrap_or_default();
    match params["collections"].as_array().map(Vec::as_slice) {
        Some([collection]) if api.count(collection.as_str()).is_some() => {
            axum::Json(json!({"job_id": collection})).into_response()
        }
        _ => (StatusCode::BAD_REQUEST, "one known collection, please").into_response(),
    }
}

/// `GET /search/bulk/jobs/{id}`: the collection's files.
async fn bulk_job(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !api.issuer.accepts(&headers) {
        return api.issuer.refusal();
    }
    tokio::time::sleep(api.delay).await;
    let Some(items) = api.count(Some(&id)) else {
        return (StatusCode::NOT_FOUND, "no such job").into_response();
    };
    let assets: Vec<String> = (0..items.div_ceil(FILE_ITEMS))
        .map(|k| {
            format!(
                "{}bulk-files/{id}/{k:04}.ndjson?X-Amz-Signature=bench",
                api.url
            )
        })
        .collect();
    axum::Json(json!({"job_id": id, "status": "COMPLETED", "assets": assets})).into_response()
}

/// `GET /bulk-files/{collection}/{k}.ndjson`: items `k * FILE_ITEMS..` of the collection, in
/// its order, one per line, written a hundred at a time as they are sent.
async fn bulk_file(
    State(api): State<Arc<Api>>,
    Path((id, file)): Path<(String, String)>,
) -> Response {
    let served = api.served();
    let Some(c) = served.collections.iter().position(|c| c.name == id) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let Some(k) = file
        .strip_suffix(".ndjson")
        .and_then(|k| k.parse::<usize>().ok())
    else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let count = served.collections[c].items.len();
    let (from, to) = (
        (k * FILE_ITEMS).min(count),
        ((k + 1) * FILE_ITEMS).min(count),
    );
    let chunks = futures_util::stream::unfold(from, move |at| {
        let (api, served) = (api.clone(), served.clone());
        async move {
            if at >= to {
                return None;
            }
            let end = (at + 100).min(to);
            let mut out = Vec::with_capacity((end - at) * 16_000);
            for (_, n) in &served.collections[c].items[at..end] {
                api.item(*n, &served, &mut out);
                out.push(b'\n');
            }
            Some((Ok::<_, std::io::Error>(Bytes::from(out)), end))
        }
    });
    axum::body::Body::from_stream(chunks).into_response()
}

/// The search parameters, from a POST body or a GET query.
fn params(method: &Method, query: Option<&str>, body: &[u8]) -> Result<Value, String> {
    if *method == Method::POST {
        return serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"));
    }
    let mut out = serde_json::Map::new();
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let value = match key.as_ref() {
            "collections" => json!(value.split(',').collect::<Vec<_>>()),
            "limit" => json!(value.parse::<u64>().unwrap_or(10)),
            _ => json!(value),
        };
        out.insert(key.into_owned(), value);
    }
    Ok(Value::Object(out))
}

fn bound(text: Option<&str>) -> Option<SystemTime> {
    text.filter(|t| !matches!(*t, "" | ".."))
        .and_then(stac_sync::plan::parse_instant)
}

async fn search(
    State(api): State<Arc<Api>>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !api.issuer.accepts(&headers) {
        return api.issuer.refusal();
    }
    if !api.delay.is_zero() {
        tokio::time::sleep(api.delay).await;
    }
    let params = match params(&method, query.as_deref(), &body) {
        Ok(p) => p,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let limit = params["limit"].as_u64().unwrap_or(10).clamp(1, 10_000) as usize;
    let skip: usize = params["token"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let wanted: Vec<&str> = params["collections"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let (start, end) = match params["datetime"].as_str() {
        Some(range) => match range.split_once('/') {
            Some((s, e)) => (bound(Some(s)), bound(Some(e))),
            None => (bound(Some(range)), bound(Some(range))),
        },
        None => (None, None),
    };
    // The matching items, collection after collection, each a sorted slice.
    let served = api.served();
    let mut matched: Vec<&[(SystemTime, usize)]> = Vec::new();
    for collection in &served.collections {
        if !wanted.is_empty() && !wanted.contains(&collection.name.as_str()) {
            continue;
        }
        let items = &collection.items[..];
        let from = start.map_or(0, |s| items.partition_point(|(at, _)| *at < s));
        let to = end.map_or(items.len(), |e| items.partition_point(|(at, _)| *at <= e));
        if from < to {
            matched.push(&items[from..to]);
        }
    }
    let total: usize = matched.iter().map(|m| m.len()).sum();
    let mut page = Vec::with_capacity(limit * 16_000);
    page.extend_from_slice(br#"{"type":"FeatureCollection","features":["#);
    let mut index = 0;
    let mut written = 0;
    'outer: for slice in &matched {
        if index + slice.len() <= skip {
            index += slice.len();
            continue;
        }
        for (_, n) in slice.iter().skip(skip.saturating_sub(index)) {
            if written == limit {
                break 'outer;
            }
            if written > 0 {
                page.push(b',');
            }
            api.item(*n, &served, &mut page);
            written += 1;
        }
        index += slice.len();
    }
    page.extend_from_slice(br#"],"links":["#);
    let root = json!({"rel": "root", "href": api.url});
    page.extend_from_slice(root.to_string().as_bytes());
    if skip + written < total {
        let mut next = params.clone();
        next["token"] = json!((skip + written).to_string());
        let link = json!({"rel": "next", "href": format!("{}search", api.url),
            "method": "POST", "body": next, "type": "application/geo+json"});
        page.push(b',');
        page.extend_from_slice(link.to_string().as_bytes());
    }
    page.extend_from_slice(format!(r#"],"numberMatched":{total}}}"#).as_bytes());
    ([(header::CONTENT_TYPE, "application/geo+json")], page).into_response()
}

/// `POST /bench/serve?items=N&changed=M`: from now on serve items 0..N, M of them changed
/// (a later `updated`), as a catalog would after new acquisitions and reprocessing. Answers
/// the number of items. For the benchmark of an incremental run over a large mirror.
async fn reserve(State(api): State<Arc<Api>>, RawQuery(query): RawQuery) -> Response {
    let mut items = 0;
    let mut changed = 0;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let value = value.parse().unwrap_or(0);
        match key.as_ref() {
            "items" => items = value,
            "changed" => changed = value,
            _ => {}
        }
    }
    let served = tokio::task::spawn_blocking(move || {
        api.serve(items, changed);
        items
    })
    .await
    .unwrap_or(0);
    served.to_string().into_response()
}

async fn landing(State(api): State<Arc<Api>>) -> Response {
    axum::Json(
        json!({"type": "Catalog", "id": "bench", "description": "stac-sync benchmark API",
        "stac_version": "1.0.0", "links": [],
        "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                       "https://api.stacspec.org/v1.0.0/item-search"],
        "title": api.url}),
    )
    .into_response()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let issuer = Issuer::real_time("bench-client", "bench-secret", args.token_ttl);
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on port {}: {e}", args.port);
            std::process::exit(1);
        }
    };
    let url = match listener.local_addr() {
        Ok(address) => format!("http://{address}/"),
        Err(e) => {
            eprintln!("no local address: {e}");
            std::process::exit(1);
        }
    };
    let names: Vec<String> = (0..args.collections).map(collection_name).collect();
    let api = Arc::new(Api {
        url: url.clone(),
        issuer: issuer.clone(),
        templates: templates(&names),
        names: names.clone(),
        served: std::sync::RwLock::new(Arc::new(Served {
            collections: Vec::new(),
            changed: Default::default(),
        })),
        delay: Duration::from_millis(args.delay_ms),
    });
    let bytes = api.serve(args.items, 0);
    let app = Router::new()
        .route("/", get(landing))
        .route("/search", any(search))
        .route("/bench/serve", post(reserve))
        .route("/search/bulk", post(bulk_submit))
        .route("/search/bulk/jobs/{id}", get(bulk_job))
        .route("/bulk-files/{id}/{file}", get(bulk_file))
        .with_state(api)
        .merge(
            Router::new()
                .route("/token", post(tokens::token_endpoint))
                .with_state(issuer),
        );
    println!("STAC_SYNC_API_URL={url}");
    println!("EDS_AUTH_URL={url}token");
    println!("EDS_CLIENT_ID=bench-client");
    println!("EDS_SECRET=bench-secret");
    println!("BENCH_COLLECTIONS={}", names.join(","));
    println!("BENCH_ITEM_BYTES={}", bytes / args.items.max(1));
    println!(
        "# serving {} items ({:.1} KB each on average) in {} collections; delay {} ms; token lifetime {} s",
        args.items,
        bytes as f64 / args.items.max(1) as f64 / 1000.0,
        names.len(),
        args.delay_ms,
        args.token_ttl
    );
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("server stopped: {e}");
    }
}
