//! STAC API item search: the requests a job sends and the requests its pages' `next` links ask
//! for (<https://github.com/radiantearth/stac-api-spec/tree/release/v1.0.0/item-search>).
//!
//! Paging follows `rel="next"` honouring the link's `method`, `body`, `headers` and `merge`
//! (item-search#pagination). This module builds requests; it sends none.

use crate::config::{Job, SearchMethod};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;
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
    /// Sent without the token and the configured headers wherever it goes (a presigned URL).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anonymous: bool,
}

impl Request {
    /// A GET of `url`.
    pub fn get(url: Url) -> Request {
        Request {
            method: "GET".into(),
            url,
            headers: Vec::new(),
            body: None,
            anonymous: false,
        }
    }
}

#[derive(Deserialize)]
struct Link {
    #[serde(default)]
    rel: String,
    #[serde(default)]
    href: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    headers: Option<Map<String, Value>>,
    #[serde(default)]
    merge: bool,
}

/// How one partition narrows or trims the job's search.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// The datetime sent: the job's, or a window of it.
    pub datetime: Option<String>,
    /// Only items with `updated` at or after this instant, sorted by `updated` ascending
    /// (Filter and Sort extensions), or unsorted through the Query extension.
    pub updated_since: Option<String>,
    /// `updated_since` through the Query extension (`query: {"updated": {"gte": ...}}`).
    pub updated_by_query: bool,
    /// Ask only for `id`, `collection` and `properties.updated` (Fields extension).
    pub ids_only: bool,
    /// Only these items (item-search `ids`).
    pub ids: Vec<String>,
}

impl Shape {
    /// The job's search as configured.
    pub fn of(job: &Job) -> Shape {
        Shape {
            datetime: job.datetime.as_ref().map(|d| d.as_str().to_string()),
            ..Shape::default()
        }
    }
}

/// The CQL2-JSON filter sent: the job's, and `updated >= since` if given.
fn filter(job: &Job, since: Option<&str>) -> Option<Value> {
    let since = since.map(|since| {
        serde_json::json!({"op": ">=", "args": [{"property": "updated"}, {"timestamp": since}]})
    });
    match (job.filter.clone(), since) {
        (Some(own), Some(since)) => Some(serde_json::json!({"op": "and", "args": [own, since]})),
        (own, since) => own.or(since),
    }
}

/// The Query extension object sent: the job's, with `updated >= since` if given (the job's own
/// conditions on `updated`, if any, are kept beside it).
fn query(job: &Job, since: Option<&str>) -> Option<Value> {
    let Some(since) = since else {
        return job.query.clone();
    };
    let mut query = match job.query.clone() {
        Some(Value::Object(own)) => own,
        _ => Map::new(),
    };
    let updated = query
        .entry("updated")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(conditions) = updated {
        conditions.insert("gte".into(), since.into());
    }
    Some(Value::Object(query))
}

/// Fields an ids-only sweep asks for: `updated` tells which stored items changed.
const IDS_ONLY_INCLUDE: [&str; 3] = ["id", "collection", "properties.updated"];
/// Fields left out of an ids-only sweep (Fields extension: `include` alone keeps the defaults).
const IDS_ONLY_EXCLUDE: [&str; 4] = ["geometry", "bbox", "assets", "links"];

/// The first search request of a job over `collections` (STAC API item-search, GET or POST),
/// shaped for one partition. Both methods carry the same parameters: a POST as its body, a GET
/// in its query.
pub fn first_request(root: &Url, job: &Job, collections: &[String], shape: &Shape) -> Request {
    let mut url = root.join("search").unwrap_or_else(|_| root.clone());
    let search = parameters(job, collections, shape);
    match job.method {
        SearchMethod::Post => Request {
            method: "POST".into(),
            url,
            headers: Vec::new(),
            body: Some(Value::Object(search)),
            anonymous: false,
        },
        SearchMethod::Get => {
            url.query_pairs_mut().extend_pairs(
                search
                    .iter()
                    .map(|(key, value)| (key, get_parameter(key, value))),
            );
            Request::get(url)
        }
    }
}

/// A partition's search parameters, as a POST body has them.
fn parameters(job: &Job, collections: &[String], shape: &Shape) -> Map<String, Value> {
    let since = shape.updated_since.as_deref();
    let (filter, query) = match shape.updated_by_query {
        false => (filter(job, since), job.query.clone()),
        true => (job.filter.clone(), query(job, since)),
    };
    let sorted = since.is_some() && !shape.updated_by_query;
    let optional = [
        ("bbox", job.bbox.as_ref().map(|b| Value::from(b.as_given()))),
        ("intersects", job.intersects.clone()),
        ("datetime", shape.datetime.clone().map(Value::from)),
        (
            "ids",
            (!shape.ids.is_empty()).then(|| Value::from(shape.ids.clone())),
        ),
        ("query", query),
        ("filter-lang", filter.as_ref().map(|_| "cql2-json".into())),
        ("filter", filter),
        (
            "sortby",
            sorted
                .then(|| serde_json::json!([{"field": "properties.updated", "direction": "asc"}])),
        ),
        (
            "fields",
            shape.ids_only.then(
                || serde_json::json!({"include": IDS_ONLY_INCLUDE, "exclude": IDS_ONLY_EXCLUDE}),
            ),
        ),
    ];
    let mut search = Map::new();
    search.insert("collections".into(), collections.to_vec().into());
    search.insert("limit".into(), job.limit.into());
    search.extend(
        optional
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_string(), value?))),
    );
    search
}

/// A search parameter as a GET query writes it: lists comma-separated, `sortby` as `+field`,
/// `fields` as `include,-exclude`, other objects (geometry, query, filter) as JSON text.
fn get_parameter(key: &str, value: &Value) -> String {
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let list = |values: &[Value], prefix: &str| -> Vec<String> {
        values
            .iter()
            .map(|value| format!("{prefix}{}", text(value)))
            .collect()
    };
    match (key, value) {
        ("sortby", Value::Array(sorts)) => sorts
            .iter()
            .map(|sort| match sort["direction"].as_str() {
                Some("desc") => format!("-{}", text(&sort["field"])),
                _ => format!("+{}", text(&sort["field"])),
            })
            .collect::<Vec<_>>()
            .join(","),
        ("fields", Value::Object(fields)) => {
            let mut names = Vec::new();
            if let Some(Value::Array(include)) = fields.get("include") {
                names.extend(list(include, ""));
            }
            if let Some(Value::Array(exclude)) = fields.get("exclude") {
                names.extend(list(exclude, "-"));
            }
            names.join(",")
        }
        (_, Value::Array(values)) => list(values, "").join(","),
        (_, other) => text(other),
    }
}

/// The request a `rel="next"` link asks for, resolved against the current request.
fn next_request(links: &[Link], current: &Request) -> Result<Option<Request>, String> {
    let Some(link) = links.iter().find(|l| l.rel == "next") else {
        return Ok(None);
    };
    let url = current
        .url
        .join(&link.href)
        .map_err(|e| format!("the next link's href {:?} is not a URL ({e})", link.href))?;
    let method = link.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    let mut headers = if link.merge {
        current.headers.clone()
    } else {
        Vec::new()
    };
    for (name, value) in link.headers.iter().flatten() {
        let value = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        headers.push((name.clone(), value));
    }
    let body = match method.as_str() {
        "GET" => None,
        "POST" => match (&link.body, link.merge, &current.body) {
            (Some(Value::Object(part)), true, Some(Value::Object(base))) => {
                let mut merged = base.clone();
                merged.extend(part.clone());
                Some(Value::Object(merged))
            }
            (Some(body), _, _) => Some(body.clone()),
            (None, _, body) => body.clone(),
        },
        other => {
            return Err(format!(
                "the next link asks for method {other}, not GET or POST"
            ));
        }
    };
    Ok(Some(Request {
        method,
        url,
        headers,
        body,
        anonymous: false,
    }))
}

/// The request the `rel="next"` link among a page's raw `links` asks for, resolved against the
/// request that fetched the page (`None`: no next link, the partition's last page).
pub(crate) fn next_of(links: Option<&[u8]>, current: &Request) -> Result<Option<Request>, String> {
    let links: Vec<Link> = match links {
        Some(raw) => serde_json::from_slice(raw)
            .map_err(|e| format!("the page's links cannot be read ({e})"))?,
        None => Vec::new(),
    };
    next_request(&links, current)
}

/// Identifies a request for repeat detection: method, URL and body.
pub(crate) fn fingerprint(request: &Request) -> String {
    format!(
        "{} {} {}",
        request.method,
        request.url,
        request
            .body
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    )
}

/// Whether a request asks only for ids (Fields extension).
pub(crate) fn asks_ids_only(request: &Request) -> bool {
    match &request.body {
        Some(body) => body.get("fields").is_some(),
        None => request.url.query_pairs().any(|(k, _)| k == "fields"),
    }
}

/// The smallest page size a partition is cut down to.
pub(crate) const MIN_PAGE_SIZE: u32 = 10;

/// A partition's page size, halved (down to [`MIN_PAGE_SIZE`]) when the server fails on a
/// large page: 413, a gateway's 502 or 504, or a timeout. It then holds for the partition's
/// later pages of this run.
#[derive(Debug, Default)]
pub(crate) struct PageSize {
    limit: Option<u32>,
}

impl PageSize {
    /// `request` as it is to be sent: with the smaller page size, where it asks for one.
    pub(crate) fn apply<'r>(&self, request: &'r Request) -> Cow<'r, Request> {
        match self.limit {
            Some(limit) if limit_of(request).is_some_and(|asked| asked > limit) => {
                Cow::Owned(with_limit(request, limit))
            }
            _ => Cow::Borrowed(request),
        }
    }

    /// Halves the page size after a failure that a large page may cause; whether it did (the
    /// request asks for a page size, and it is above the minimum).
    pub(crate) fn halve(&mut self, request: &Request) -> bool {
        let Some(asked) = limit_of(request) else {
            return false;
        };
        let current = self.limit.map_or(asked, |limit| limit.min(asked));
        if current <= MIN_PAGE_SIZE {
            return false;
        }
        let smaller = (current / 2).max(MIN_PAGE_SIZE);
        self.limit = Some(smaller);
        tracing::warn!(url = %super::http::display_url(&request.url), from = current, to = smaller,
            "the API failed on a large page: asking for smaller pages in this partition");
        true
    }
}

/// A search parameter of a request: in a POST body as JSON, in a GET query as text.
fn parameter(request: &Request, key: &str) -> Option<Value> {
    match &request.body {
        Some(body) => body.get(key).cloned(),
        None => request
            .url
            .query_pairs()
            .find(|(name, _)| name == key)
            .map(|(_, value)| Value::String(value.into_owned())),
    }
}

/// `request` with the search parameter `key` set to `value` (added if absent).
fn with_parameter(request: &Request, key: &str, value: Value) -> Request {
    let mut changed = request.clone();
    match &mut changed.body {
        Some(Value::Object(body)) => {
            body.insert(key.to_string(), value);
        }
        Some(_) => {}
        None => {
            let text = get_parameter(key, &value);
            let mut pairs: Vec<(String, String)> = request
                .url
                .query_pairs()
                .map(|(name, old)| {
                    let value = if name == key {
                        text.clone()
                    } else {
                        old.into_owned()
                    };
                    (name.into_owned(), value)
                })
                .collect();
            if !pairs.iter().any(|(name, _)| name == key) {
                pairs.push((key.to_string(), text));
            }
            changed.url.query_pairs_mut().clear().extend_pairs(pairs);
        }
    }
    changed
}

/// The page size a request asks for: `limit` in a POST body or in the query.
fn limit_of(request: &Request) -> Option<u32> {
    match parameter(request, "limit")? {
        Value::String(text) => text.parse().ok(),
        number => number.as_u64()?.try_into().ok(),
    }
}

/// `request` asking for `limit` items a page instead.
fn with_limit(request: &Request, limit: u32) -> Request {
    with_parameter(request, "limit", limit.into())
}

/// The `datetime` a partition's first request (one of ours) sends.
pub(crate) fn datetime_of(request: &Request) -> Option<String> {
    match parameter(request, "datetime")? {
        Value::String(text) => Some(text),
        _ => None,
    }
}

/// A partition's first request with another `datetime`.
pub(crate) fn with_datetime(request: &Request, datetime: &str) -> Request {
    with_parameter(request, "datetime", datetime.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_search_carries_the_parameters_of_a_post_one() {
        let mut job = crate::config::tests::one_job();
        job.bbox = crate::domain::Bbox::new(vec![2.25, 48.81, 2.42, 48.9]);
        job.filter = Some(serde_json::json!({"op": "=", "args": [{"property": "a"}, 1]}));
        let shape = Shape {
            datetime: Some("2024-01-01T00:00:00Z/..".into()),
            updated_since: Some("2024-06-01T00:00:00Z".into()),
            ids_only: true,
            ..Shape::default()
        };
        let root = Url::parse("https://api.test/stac/").expect("url");
        let post = first_request(&root, &job, &["c".into()], &shape);
        job.method = SearchMethod::Get;

        let get = first_request(&root, &job, &["c".into()], &shape);

        let body = post.body.expect("a POST body");
        let pairs: std::collections::BTreeMap<String, String> =
            get.url.query_pairs().into_owned().collect();
        let keys: std::collections::BTreeSet<&String> =
            body.as_object().expect("object").keys().collect();
        assert_eq!(
            pairs.keys().collect::<std::collections::BTreeSet<_>>(),
            keys
        );
        assert_eq!(pairs["collections"], "c");
        assert_eq!(pairs["bbox"], "2.25,48.81,2.42,48.9");
        assert_eq!(pairs["sortby"], "+properties.updated");
        assert_eq!(
            pairs["fields"],
            "id,collection,properties.updated,-geometry,-bbox,-assets,-links"
        );
        assert_eq!(pairs["filter-lang"], "cql2-json");
        let filter: Value = serde_json::from_str(&pairs["filter"]).expect("JSON");
        assert_eq!(filter, body["filter"]);
        assert_eq!(get.url.path(), "/stac/search");
    }

    #[test]
    fn a_page_size_is_halved_down_to_ten_in_post_bodies_and_get_queries() {
        let post = Request {
            method: "POST".into(),
            url: Url::parse("https://api.test/search").expect("url"),
            headers: Vec::new(),
            body: Some(serde_json::json!({"collections": ["c"], "limit": 100})),
            anonymous: false,
        };
        let get = Request::get(
            Url::parse("https://api.test/search?collections=c&limit=100&token=t").expect("url"),
        );
        let mut size = PageSize::default();
        assert_eq!(limit_of(&size.apply(&post)), Some(100));

        assert!(size.halve(&post));
        assert!(size.halve(&post));
        assert!(size.halve(&post));
        assert!(size.halve(&post));

        assert_eq!(limit_of(&size.apply(&post)), Some(MIN_PAGE_SIZE));
        assert!(!size.halve(&post), "below the minimum");
        let smaller = size.apply(&get);
        assert_eq!(
            smaller.url.as_str(),
            "https://api.test/search?collections=c&limit=10&token=t"
        );
        assert!(!PageSize::default().halve(&Request::get(
            Url::parse("https://api.test/search?token=t").expect("url")
        )));
    }
}
