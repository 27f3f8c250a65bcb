//! EDS bulk search: a search the server runs once and exports as files, instead of pages.
//!
//! As earthdaily-python-client 1.13 uses it (`earthdaily/platform/_bulk_search.py`), relative
//! to the STAC API's root (`{EDS_API_URL}/platform/v1/stac/`):
//!
//! - `POST search/bulk`, an ordinary search body plus `export_format` (`geoparquet` or
//!   `stacjson`) and `export_type` (`standard`), answers `{"job_id": ...}`;
//! - `GET search/bulk/jobs/{job_id}` answers `{job_id, status, assets}`: `PENDING` or
//!   `IN_PROGRESS` (the client's documentation also names `RUNNING`) until `COMPLETED`, with
//!   `assets` the URLs of the files, or `FAILED`;
//! - the files are fetched with a plain GET: their URLs are presigned.
//!
//! A presigned URL's query is its credential: a file is fetched without the token and without
//! `[headers]` (a storage service refuses a request that is signed twice), and its URL is shown
//! without its query, in messages and logs.

use super::client::ApiClient;
use super::http::{self, Failed};
use super::search::Request;
use crate::clock::Clock;
use crate::error::Error;
use bytes::Bytes;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use std::io::Read;
use std::time::Duration;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use url::Url;

/// The files a bulk search is exported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// stac-geoparquet.
    Geoparquet,
    /// STAC items as JSON.
    Stacjson,
}

impl ExportFormat {
    fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Geoparquet => "geoparquet",
            ExportFormat::Stacjson => "stacjson",
        }
    }
}

/// A job's state, as its status answer gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not done yet, with the status the server gave.
    Running(String),
    /// Done: its files.
    Completed(Vec<Url>),
    /// Failed.
    Failed,
}

/// How a job is waited for: the first pause between polls (the EDS client's 5 s), doubled up
/// to `max`, until `timeout` has passed since the wait began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Polling {
    pub first: Duration,
    pub max: Duration,
    pub timeout: Duration,
}

impl Default for Polling {
    fn default() -> Polling {
        Polling {
            first: Duration::from_secs(5),
            max: Duration::from_secs(60),
            timeout: Duration::from_secs(2 * 3600),
        }
    }
}

/// How waiting for a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: its files.
    Completed(Vec<Url>),
    /// The server says it failed.
    Failed,
    /// Not done when the wait's time ran out: its last status.
    TimedOut(String),
}

/// Submits `search`, a search body, as a bulk search exported as `format`; the job's id. (A
/// request that fails after the server took it is sent again, and may leave a second job
/// running on the server.)
pub async fn submit(
    api: &ApiClient,
    search: &Value,
    format: ExportFormat,
) -> Result<String, Error> {
    let Some(mut body) = search.as_object().cloned() else {
        return Err(Error::Internal(
            "a bulk search's body is not a JSON object".into(),
        ));
    };
    body.insert("export_format".into(), format.as_str().into());
    body.insert("export_type".into(), "standard".into());
    let request = Request {
        method: "POST".into(),
        url: endpoint(api.root(), &["search", "bulk"])?,
        headers: Vec::new(),
        body: Some(Value::Object(body)),
        anonymous: false,
    };
    // An answer without a job id is final: submitting again would start another job.
    let answer = api
        .fetch("submit a bulk search", &request, |bytes| {
            Ok(serde_json::from_slice::<Value>(&bytes).ok())
        })
        .await?;
    let id = answer
        .as_ref()
        .and_then(|a| a.get("job_id"))
        .and_then(|id| {
            id.as_str()
                .map(str::to_string)
                .or_else(|| id.as_u64().map(|n| n.to_string()))
        });
    id.ok_or_else(|| {
        Error::Upstream(format!(
            "the STAC API took the bulk search at {} but answered no job_id: {}; it may not \
             offer bulk search: set backfill = \"page\"",
            http::display_url(&request.url),
            answer.map_or_else(|| "not JSON".to_string(), |a| excerpt(&a)),
        ))
    })
}

/// Whether the API offers bulk search, as far as a request that starts nothing tells: a `GET
/// search/bulk`, which an API that takes bulk searches refuses with 405 (the endpoint takes
/// POST only) and an API without answers 404 (or 501). `None`: the answer does not tell.
pub async fn offered(api: &ApiClient) -> Result<Option<bool>, Error> {
    let request = Request::get(endpoint(api.root(), &["search", "bulk"])?);
    match api.fetch("ask for bulk search", &request, |_| Ok(())).await {
        Ok(()) => Ok(None),
        Err(Error::Refused { status: 405, .. }) => Ok(Some(true)),
        Err(Error::Refused {
            status: 404 | 501, ..
        }) => Ok(Some(false)),
        Err(Error::Refused { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The state of job `job_id`.
pub async fn status(api: &ApiClient, job_id: &str) -> Result<Status, Error> {
    let url = endpoint(api.root(), &["search", "bulk", "jobs", job_id])?;
    let answer = api
        .fetch("read a bulk search job", &Request::get(url), |bytes| {
            serde_json::from_slice::<Value>(&bytes).map_err(|e| format!("not JSON: {e}"))
        })
        .await?;
    status_of(job_id, &answer)
}

fn status_of(job_id: &str, answer: &Value) -> Result<Status, Error> {
    let bad = |why: &str| {
        Error::Upstream(format!(
            "bulk search job {job_id}: {why} in the server's answer: {}",
            excerpt(answer)
        ))
    };
    match answer.get("status").and_then(Value::as_str) {
        Some("COMPLETED") => {
            let assets = match answer.get("assets") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(assets)) => assets.as_slice().to_vec(),
                Some(_) => return Err(bad("assets that are not a list")),
            };
            // A file's URL is never shown whole: its query is a credential.
            let assets = assets
                .iter()
                .enumerate()
                .map(|(i, asset)| {
                    asset
                        .as_str()
                        .and_then(|a| Url::parse(a).ok())
                        .filter(|u| matches!(u.scheme(), "http" | "https"))
                        .ok_or_else(|| bad(&format!("asset {i} is not an http(s) URL")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Status::Completed(assets))
        }
        Some("FAILED") => Ok(Status::Failed),
        Some(other) => Ok(Status::Running(other.to_string())),
        None => Err(bad("no status")),
    }
}

/// Polls job `job_id` until it is done or fails, or `polling.timeout` has passed on `clock`.
pub async fn wait(
    api: &ApiClient,
    job_id: &str,
    polling: Polling,
    clock: &dyn Clock,
) -> Result<Outcome, Error> {
    let started = clock.now();
    let mut pause = polling.first;
    loop {
        let status = match status(api, job_id).await? {
            Status::Completed(assets) => return Ok(Outcome::Completed(assets)),
            Status::Failed => return Ok(Outcome::Failed),
            Status::Running(status) => status,
        };
        let waited = clock.now().saturating_sub(started);
        if waited >= polling.timeout {
            return Ok(Outcome::TimedOut(status));
        }
        tracing::info!(job_id, %status, waited = %humantime::format_duration(
            Duration::from_secs(waited.as_secs())), "the bulk search is not done yet");
        tokio::time::sleep(pause.min(polling.timeout - waited)).await;
        pause = (pause * 2).min(polling.max);
    }
}

/// Writes one of a job's files into `to`, from its start (a download cut short is made again
/// from the start); its size in bytes.
pub async fn download(
    api: &ApiClient,
    asset: &Url,
    to: &mut tokio::fs::File,
) -> Result<u64, Error> {
    let request = Request {
        anonymous: true,
        ..Request::get(asset.clone())
    };
    let shown = http::display_url(asset);
    let mut attempts = api.attempts("download a bulk search file", &shown);
    let fail = |e: std::io::Error| {
        Error::Sink(format!(
            "cannot write the bulk search file {shown} to a temporary file ({e}); set TMPDIR \
             to a folder with space"
        ))
    };
    loop {
        let mut answer = api.open(&request, &mut attempts, None).await?;
        let status = answer.response.status();
        to.set_len(0).await.map_err(fail)?;
        to.rewind().await.map_err(fail)?;
        // Each write to a tokio file is a hand-off to the blocking pool: a megabyte at a time,
        // not a chunk of the body at a time.
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, &mut *to);
        let mut written = 0;
        let cut = loop {
            match answer.response.chunk().await {
                Ok(Some(chunk)) => {
                    out.write_all(&chunk).await.map_err(fail)?;
                    written += chunk.len() as u64;
                }
                Ok(None) => break None,
                Err(source) => break Some(source),
            }
        };
        match cut {
            None => {
                out.flush().await.map_err(fail)?;
                return Ok(written);
            }
            Some(source) => {
                let why = Failed::Transport {
                    status: Some(status),
                    body: true,
                    source,
                };
                attempts.retry(why, Some(status), None).await?;
            }
        }
    }
}

/// Where a bulk backfill of one collection stands, kept as its partition's request (the job's
/// status URL, whose fragment holds the rest): the job, the items its search matched when it
/// was submitted, and the next item to commit (`skip` items of the `file`th file, in the order
/// of their paths, are committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub job_id: String,
    pub matched: Option<u64>,
    pub file: usize,
    pub skip: u64,
}

impl Position {
    /// The position as a request: a GET of the job's status, with the rest as its fragment
    /// (never sent).
    pub fn request(&self, root: &Url) -> Result<Request, Error> {
        let mut url = endpoint(root, &["search", "bulk", "jobs", &self.job_id])?;
        let mut fragment = format!("file={}&skip={}", self.file, self.skip);
        if let Some(matched) = self.matched {
            fragment.push_str(&format!("&matched={matched}"));
        }
        url.set_fragment(Some(&fragment));
        Ok(Request::get(url))
    }

    /// The position a request stands for, if it is one (a bulk job's status, under `root`).
    pub fn of(root: &Url, request: &Request) -> Option<Position> {
        let rest = request.url.path().strip_prefix(root.path())?;
        let job_id = rest.strip_prefix("search/bulk/jobs/")?;
        if request.method != "GET" || job_id.is_empty() || job_id.contains('/') {
            return None;
        }
        let job_id = percent_encoding::percent_decode_str(job_id)
            .decode_utf8()
            .ok()?
            .into_owned();
        let mut position = Position {
            job_id,
            matched: None,
            file: 0,
            skip: 0,
        };
        let fragment = request.url.fragment().unwrap_or_default();
        for (key, value) in url::form_urlencoded::parse(fragment.as_bytes()) {
            match &*key {
                "file" => position.file = value.parse().ok()?,
                "skip" => position.skip = value.parse().ok()?,
                "matched" => position.matched = Some(value.parse().ok()?),
                _ => {}
            }
        }
        Some(position)
    }
}

/// The URL of `segments` under the API's root.
fn endpoint(root: &Url, segments: &[&str]) -> Result<Url, Error> {
    // A job id is the server's: `..` would name another path (as in `collection_url`).
    if let Some(bad) = segments.iter().find(|s| matches!(**s, "." | "..")) {
        return Err(Error::Upstream(format!(
            "the STAC API named a bulk search job {bad:?}, which is not a path segment"
        )));
    }
    let mut url = root.clone();
    url.path_segments_mut()
        .map_err(|()| Error::Config(format!("the STAC API's URL {root} has no path")))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// The start of a server's answer, for a message.
fn excerpt(answer: &Value) -> String {
    let text = answer.to_string();
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// Bytes a download writes to its file at once.
const WRITE_BUFFER: usize = 1 << 20;

/// The longest line read as a line of NDJSON (twice the default `max_item_bytes`): a longer
/// first line is a FeatureCollection on one line, read as it streams; a longer later line fails
/// the file.
const MAX_LINE: u64 = 64 << 20;

/// Reads a downloaded file of a job (`name`, shown in messages), exported as `format`, and
/// hands its items to `each` in batches of at most `batch`, skipping the first `skip` (those a
/// killed run committed); the items read, skipped ones included. The file is never held whole.
///
/// - `stacjson`: the texts the file holds, as they are: one item per line (NDJSON), or the
///   `features` of a FeatureCollection.
/// - `geoparquet`: the items as rustac reads stac-geoparquet, written as JSON: rustac's
///   normal form, not the API's bytes.
pub fn read(
    path: &std::path::Path,
    name: &str,
    format: ExportFormat,
    skip: u64,
    batch: usize,
    each: &mut dyn FnMut(Vec<Bytes>) -> Result<(), Error>,
) -> Result<u64, Error> {
    let bad = |why: String| {
        Error::Upstream(format!(
            "the bulk search file {name} does not read as {}: {why}",
            format.as_str()
        ))
    };
    let open = || {
        std::fs::File::open(path)
            .map_err(|e| Error::Sink(format!("cannot open the bulk search file {name}: {e}")))
    };
    let mut items = Batches {
        skip,
        seen: 0,
        batch: Vec::with_capacity(batch),
        size: batch.max(1),
        each,
        failed: None,
    };
    match format {
        ExportFormat::Geoparquet => {
            let batches =
                stac::geoparquet::from_reader_iter(open()?).map_err(|e| bad(e.to_string()))?;
            for read in batches {
                for item in read.map_err(|e| bad(e.to_string()))? {
                    let text = serde_json::to_vec(&item)
                        .map_err(|e| bad(format!("an item does not write as JSON: {e}")))?;
                    items.push(Bytes::from(text))?;
                }
            }
        }
        ExportFormat::Stacjson => {
            if !lines(open()?, &mut items, &bad)? {
                items.seen = 0;
                let mut features =
                    serde_json::Deserializer::from_reader(std::io::BufReader::new(open()?));
                let read = Features(&mut items)
                    .deserialize(&mut features)
                    .and_then(|()| features.end());
                if let Some(failed) = items.failed.take() {
                    return Err(failed);
                }
                read.map_err(|e| bad(e.to_string()))?;
            }
        }
    }
    items.finish()
}

/// Reads `file` as NDJSON into `items`; `false` (nothing read) when its first line is not an
/// item: a FeatureCollection. A line after the first is handed on as it is: the writer reads it
/// as it reads a page's feature, and quarantines it if it is not an item.
fn lines(
    file: std::fs::File,
    items: &mut Batches<'_>,
    bad: &dyn Fn(String) -> Error,
) -> Result<bool, Error> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut number = 0;
    // Each line is read into a buffer of its own, handed on without a copy.
    let mut capacity = 0;
    loop {
        let mut line = Vec::with_capacity(capacity);
        let read = (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| bad(format!("line {}: {e}", number + 1)))?;
        if read == 0 {
            return Ok(true);
        }
        number += 1;
        capacity = line.len();
        let whole = line.last() == Some(&b'\n') || (read as u64) < MAX_LINE;
        if number == 1 && !(whole && is_feature(line.trim_ascii())) {
            return Ok(false);
        }
        if !whole {
            return Err(bad(format!(
                "line {number} is longer than {} MB",
                MAX_LINE >> 20
            )));
        }
        let start = line.len() - line.trim_ascii_start().len();
        let end = line.trim_ascii_end().len();
        if start < end {
            items.push(Bytes::from(line).slice(start..end))?;
        }
    }
}

/// Whether a JSON text is a GeoJSON Feature.
fn is_feature(text: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<&'a str>,
    }
    serde_json::from_slice::<Kind>(text).is_ok_and(|k| k.kind == Some("Feature"))
}

/// Items handed on in batches, after the ones to skip.
struct Batches<'e> {
    skip: u64,
    seen: u64,
    batch: Vec<Bytes>,
    size: usize,
    each: &'e mut dyn FnMut(Vec<Bytes>) -> Result<(), Error>,
    /// What `each` answered, when it failed inside the reading of a FeatureCollection.
    failed: Option<Error>,
}

impl Batches<'_> {
    fn push(&mut self, item: Bytes) -> Result<(), Error> {
        self.seen += 1;
        if self.seen <= self.skip {
            return Ok(());
        }
        self.batch.push(item);
        if self.batch.len() == self.size {
            (self.each)(std::mem::replace(
                &mut self.batch,
                Vec::with_capacity(self.size),
            ))?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<u64, Error> {
        if !self.batch.is_empty() {
            (self.each)(std::mem::take(&mut self.batch))?;
        }
        Ok(self.seen)
    }
}

/// A FeatureCollection whose features are handed on one at a time, as their texts.
struct Features<'b, 'e>(&'b mut Batches<'e>);

impl<'de> DeserializeSeed<'de> for Features<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Features<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("items, one per line, or a FeatureCollection")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut features = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "features" {
                map.next_value_seed(FeatureList(&mut *self.0))?;
                features = true;
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        if !features {
            return Err(de::Error::custom("no features"));
        }
        Ok(())
    }
}

struct FeatureList<'b, 'e>(&'b mut Batches<'e>);

impl<'de> DeserializeSeed<'de> for FeatureList<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for FeatureList<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of features")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Box<RawValue>>()? {
            let item = Bytes::from(Box::<str>::from(item).into_boxed_bytes());
            if let Err(failed) = self.0.push(item) {
                self.0.failed = Some(failed);
                return Err(de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_from_its_request_whatever_its_job_id() {
        let root = Url::parse("https://api.test/platform/v1/stac/").expect("url");
        for job_id in ["job-1", "a b/c?d#e%f", "über"] {
            let position = Position {
                job_id: job_id.into(),
                matched: Some(30_000_000),
                file: 12,
                skip: 4_096,
            };
            let request = position.request(&root).expect("a request");
            assert_eq!(request.method, "GET");
            assert!(
                request
                    .url
                    .as_str()
                    .starts_with("https://api.test/platform/v1/stac/search/bulk/jobs/")
            );
            assert_eq!(Position::of(&root, &request), Some(position.clone()));
            let unmatched = Position {
                matched: None,
                ..position
            };
            assert_eq!(
                Position::of(&root, &unmatched.request(&root).expect("a request")),
                Some(unmatched)
            );
        }
        // Search requests, and a job's status under another root, are not positions.
        let search = Request::get(root.join("search?collections=c").expect("url"));
        assert_eq!(Position::of(&root, &search), None);
        let elsewhere = Url::parse("https://api.test/other/").expect("url");
        let job = Position {
            job_id: "j".into(),
            matched: None,
            file: 0,
            skip: 0,
        };
        assert_eq!(
            Position::of(&elsewhere, &job.request(&root).expect("a request")),
            None
        );
    }
}
