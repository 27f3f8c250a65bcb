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
use serde_json::Value;
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
        url: endpoint(api, &["search", "bulk"])?,
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

/// The state of job `job_id`.
pub async fn status(api: &ApiClient, job_id: &str) -> Result<Status, Error> {
    let url = endpoint(api, &["search", "bulk", "jobs", job_id])?;
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
        let mut written = 0;
        let cut = loop {
            match answer.response.chunk().await {
                Ok(Some(chunk)) => {
                    to.write_all(&chunk).await.map_err(fail)?;
                    written += chunk.len() as u64;
                }
                Ok(None) => break None,
                Err(source) => break Some(source),
            }
        };
        match cut {
            None => {
                to.flush().await.map_err(fail)?;
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

/// The URL of `segments` under the API's root.
fn endpoint(api: &ApiClient, segments: &[&str]) -> Result<Url, Error> {
    let mut url = api.root().clone();
    url.path_segments_mut()
        .map_err(|()| Error::Config(format!("the STAC API's URL {} has no path", api.root())))?
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
