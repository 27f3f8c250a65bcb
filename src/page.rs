//! STAC API item-search paging: the first request of a job, and a page's items and `next` link.
//!
//! Items are kept as the bytes received ([`Item::content`] shares the page's buffer; nothing is
//! copied or re-serialised); only the indexed fields are parsed. Paging follows `rel="next"`
//! honouring `method`, `body`, `headers` and `merge`
//! (<https://github.com/radiantearth/stac-api-spec/tree/release/v1.0.0/item-search#pagination>).
//! An item that cannot be stored becomes a [`Rejected`] with the reason; the rest of the page
//! is kept.

use crate::api::Request;
use crate::config::{Job, SearchMethod};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use url::Url;

/// An item ready to store.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its collection.
    pub collection: String,
    /// Its id.
    pub id: String,
    /// The item JSON exactly as received.
    pub content: Bytes,
    /// BLAKE3 of `content`, hex.
    pub hash: String,
    /// `properties.datetime`.
    pub datetime: Option<String>,
    /// `properties.start_datetime`.
    pub start_datetime: Option<String>,
    /// `properties.end_datetime`.
    pub end_datetime: Option<String>,
    /// `properties.updated`.
    pub updated: Option<String>,
    /// `[xmin, ymin, xmax, ymax]`.
    pub bbox: Option<[f64; 4]>,
}

/// A feature that could not be stored, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The feature as received.
    pub content: Bytes,
    /// Why it was not stored.
    pub reason: String,
    /// Its collection, if it had a readable one.
    pub collection: Option<String>,
    /// Its id, if it had a readable one.
    pub id: Option<String>,
}

/// One page of search results.
#[derive(Debug)]
pub struct Page {
    /// Storable items, one per `(collection, id)` (the last wins within a page).
    pub items: Vec<Item>,
    /// Features that could not be stored.
    pub rejected: Vec<Rejected>,
    /// Items dropped because the same `(collection, id)` came again later in the page.
    pub duplicates: u64,
    /// The next page's request; `None` only when the page had no `next` link.
    pub next: Option<Request>,
}

#[derive(Deserialize)]
struct PageDoc<'a> {
    #[serde(borrow)]
    features: Vec<&'a RawValue>,
    #[serde(default)]
    links: Vec<Link>,
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

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    collection: Option<Cow<'a, str>>,
    #[serde(default)]
    bbox: Option<Vec<f64>>,
    #[serde(borrow, default)]
    properties: Option<Properties<'a>>,
}

#[derive(Deserialize)]
struct Properties<'a> {
    #[serde(borrow, default)]
    datetime: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    start_datetime: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    end_datetime: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    updated: Option<Cow<'a, str>>,
}

/// How one partition narrows or trims the job's search.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// The datetime sent: the job's, or a window of it.
    pub datetime: Option<String>,
    /// Only items with `updated` at or after this instant, sorted by `updated` ascending
    /// (Filter and Sort extensions).
    pub updated_since: Option<String>,
    /// Ask only for `id` and `collection` (Fields extension).
    pub ids_only: bool,
}

impl Shape {
    /// The job's search as configured.
    pub fn of(job: &Job) -> Shape {
        Shape {
            datetime: job.datetime.clone(),
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

/// Fields left out of an ids-only sweep (Fields extension: `include` alone keeps the defaults).
const IDS_ONLY_EXCLUDE: [&str; 5] = ["geometry", "bbox", "assets", "links", "properties"];

/// The first search request of a job over `collections` (STAC API item-search, GET or POST),
/// shaped for one partition.
pub fn first_request(root: &Url, job: &Job, collections: &[String], shape: &Shape) -> Request {
    let mut url = root.join("search").unwrap_or_else(|_| root.clone());
    let filter = filter(job, shape.updated_since.as_deref());
    match job.method {
        SearchMethod::Post => {
            let mut body = Map::new();
            body.insert("collections".into(), collections.to_vec().into());
            body.insert("limit".into(), job.limit.into());
            if let Some(bbox) = &job.bbox {
                body.insert("bbox".into(), bbox.clone().into());
            }
            if let Some(intersects) = &job.intersects {
                body.insert("intersects".into(), intersects.clone());
            }
            if let Some(datetime) = &shape.datetime {
                body.insert("datetime".into(), datetime.clone().into());
            }
            if let Some(query) = &job.query {
                body.insert("query".into(), query.clone());
            }
            if let Some(filter) = filter {
                body.insert("filter".into(), filter);
                body.insert("filter-lang".into(), "cql2-json".into());
            }
            if shape.updated_since.is_some() {
                body.insert(
                    "sortby".into(),
                    serde_json::json!([{"field": "properties.updated", "direction": "asc"}]),
                );
            }
            if shape.ids_only {
                body.insert(
                    "fields".into(),
                    serde_json::json!({"include": ["id", "collection"], "exclude": IDS_ONLY_EXCLUDE}),
                );
            }
            Request {
                method: "POST".into(),
                url,
                headers: Vec::new(),
                body: Some(Value::Object(body)),
            }
        }
        SearchMethod::Get => {
            {
                let mut query = url.query_pairs_mut();
                query.append_pair("collections", &collections.join(","));
                query.append_pair("limit", &job.limit.to_string());
                if let Some(bbox) = &job.bbox {
                    let bbox: Vec<String> = bbox.iter().map(f64::to_string).collect();
                    query.append_pair("bbox", &bbox.join(","));
                }
                if let Some(intersects) = &job.intersects {
                    query.append_pair("intersects", &intersects.to_string());
                }
                if let Some(datetime) = &shape.datetime {
                    query.append_pair("datetime", datetime);
                }
                if let Some(q) = &job.query {
                    query.append_pair("query", &q.to_string());
                }
                if let Some(filter) = filter {
                    query.append_pair("filter", &filter.to_string());
                    query.append_pair("filter-lang", "cql2-json");
                }
                if shape.updated_since.is_some() {
                    query.append_pair("sortby", "+properties.updated");
                }
                if shape.ids_only {
                    let exclude: Vec<String> =
                        IDS_ONLY_EXCLUDE.iter().map(|f| format!("-{f}")).collect();
                    query.append_pair("fields", &format!("id,collection,{}", exclude.join(",")));
                }
            }
            Request::get(url)
        }
    }
}

/// Parses a page. `Err` means the page as a whole is unreadable (not JSON, no `features`): the
/// caller retries it. `default_collection` is given to items without `collection` (the search
/// named that one collection).
pub fn parse_page(
    body: &Bytes,
    request: &Request,
    default_collection: Option<&str>,
) -> Result<Page, String> {
    let doc: PageDoc<'_> = serde_json::from_slice(body)
        .map_err(|e| format!("the page is not a STAC ItemCollection ({e})"))?;
    let mut items: Vec<Item> = Vec::with_capacity(doc.features.len());
    let mut rejected = Vec::new();
    let mut seen: HashMap<(String, String), usize> = HashMap::with_capacity(doc.features.len());
    let mut duplicates = 0;
    for raw in doc.features {
        let content = body.slice_ref(raw.get().as_bytes());
        match read_item(raw, content.clone(), default_collection) {
            Ok(item) => match seen.entry((item.collection.clone(), item.id.clone())) {
                Entry::Occupied(at) => {
                    duplicates += 1;
                    items[*at.get()] = item;
                }
                Entry::Vacant(slot) => {
                    slot.insert(items.len());
                    items.push(item);
                }
            },
            Err((reason, collection, id)) => rejected.push(Rejected {
                content,
                reason,
                collection,
                id,
            }),
        }
    }
    let next = next_request(&doc.links, request)?;
    Ok(Page {
        items,
        rejected,
        duplicates,
        next,
    })
}

type Refusal = (String, Option<String>, Option<String>);

fn read_item(
    raw: &RawValue,
    content: Bytes,
    default_collection: Option<&str>,
) -> Result<Item, Refusal> {
    if !raw.get().starts_with('{') {
        return Err(("the feature is not a JSON object".into(), None, None));
    }
    let head: Head<'_> = serde_json::from_str(raw.get()).map_err(|e| {
        (
            format!("the feature is not a readable STAC item ({e})"),
            None,
            None,
        )
    })?;
    let collection = head
        .collection
        .map(Cow::into_owned)
        .or_else(|| default_collection.map(str::to_string));
    let id = match head.id {
        Some(id) if !id.is_empty() => id.into_owned(),
        Some(_) => return Err(("the item's id is empty".into(), collection, None)),
        None => return Err(("the item has no id".into(), collection, None)),
    };
    let Some(collection) = collection.filter(|c| !c.is_empty()) else {
        return Err((
            "the item has no collection and the search names several".into(),
            None,
            Some(id),
        ));
    };
    let bbox = match head.bbox.as_deref() {
        Some([x0, y0, x1, y1]) | Some([x0, y0, _, x1, y1, _]) => Some([*x0, *y0, *x1, *y1]),
        _ => None,
    };
    let (datetime, start_datetime, end_datetime, updated) = match head.properties {
        Some(p) => (
            p.datetime.map(Cow::into_owned),
            p.start_datetime.map(Cow::into_owned),
            p.end_datetime.map(Cow::into_owned),
            p.updated.map(Cow::into_owned),
        ),
        None => (None, None, None, None),
    };
    Ok(Item {
        hash: blake3::hash(&content).to_hex().to_string(),
        datetime,
        start_datetime,
        end_datetime,
        updated,
        collection,
        id,
        content,
        bbox,
    })
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
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(body: Value) -> Request {
        Request {
            method: "POST".into(),
            url: Url::parse("https://api.test/stac/search").expect("url"),
            headers: Vec::new(),
            body: Some(body),
        }
    }

    #[test]
    fn a_merge_link_adds_its_body_to_the_current_one() {
        let page = Bytes::from_static(
            br#"{"features":[],"links":[{"rel":"next","href":"search","method":"POST","merge":true,"body":{"token":"t2"}}]}"#,
        );
        let current = post(serde_json::json!({"collections":["a"],"limit":5,"token":"t1"}));
        let next = parse_page(&page, &current, None)
            .expect("page")
            .next
            .expect("next");
        assert_eq!(
            next.body,
            Some(serde_json::json!({"collections":["a"],"limit":5,"token":"t2"}))
        );
        assert_eq!(next.url.as_str(), "https://api.test/stac/search");
    }

    #[test]
    fn items_keep_their_bytes_and_problems_are_named() {
        let page = Bytes::from_static(
            br#"{"features":[ {"id":"a","collection":"c","bbox":[1,2,3,4],"properties":{"datetime":"2024-01-01T00:00:00Z"}}, 7, {"collection":"c"}, {"id":"a","collection":"c","properties":{}} ],"links":[]}"#,
        );
        let request = post(serde_json::json!({}));
        let page = parse_page(&page, &request, None).expect("page");
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.duplicates, 1);
        assert_eq!(
            &page.items[0].content[..],
            br#"{"id":"a","collection":"c","properties":{}}"#
        );
        let reasons: Vec<_> = page.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            ["the feature is not a JSON object", "the item has no id"]
        );
        assert!(page.next.is_none());
    }
}
