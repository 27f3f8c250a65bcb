//! A fixture of EDS's bulk search, as earthdaily-python-client 1.13 uses it: `POST
//! /search/bulk` answers a job id, `GET /search/bulk/jobs/{id}` walks the job through the
//! statuses a test gives it (one per poll), and the finished job's files are served on another
//! port, as presigned storage serves them: only to a request with the URL's signature and
//! without an `Authorization` header. The API's own port serves them the same way, for a file
//! URL on the API's origin.

use super::tokens::{self, Issuer};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use stac_sync::clock::ManualClock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The query that signs a file's URL.
pub const SIGNATURE: &str = "X-Amz-Signature=s3cr3t-signature";

#[derive(Debug)]
pub struct BulkState {
    pub issuer: Arc<Issuer>,
    /// The statuses each new job goes through, one per poll (the last one stays).
    pub script: Mutex<Vec<String>>,
    /// The files a completed job lists, by name.
    pub files: Mutex<Vec<(String, Bytes)>>,
    /// Whether a completed job's files are on the API's origin, not the storage's.
    pub files_on_api: Mutex<bool>,
    /// The id the next job gets instead of `job-N`.
    pub next_id: Mutex<Option<String>>,
    /// Bodies of the bulk searches submitted.
    pub submitted: Mutex<Vec<Value>>,
    /// Polls of each job.
    pub polls: Mutex<HashMap<String, usize>>,
    /// Clock advance on each poll (the time the export takes).
    pub advance_per_poll: Mutex<Duration>,
    /// File requests, and those refused (an `Authorization` header, another configured header,
    /// no signature).
    pub file_requests: AtomicUsize,
    pub refused_files: AtomicUsize,
    /// File requests to cut short, half the file sent, before serving whole ones.
    pub cut_short: AtomicUsize,
    pub api_url: Mutex<String>,
    pub storage_url: Mutex<String>,
    /// The signature file URLs are listed with and accepted with.
    pub signature: Mutex<String>,
    /// After this many file requests, the signature changes (the URLs listed before expire).
    pub expire_after: Mutex<Option<usize>>,
}

pub struct BulkFixture {
    pub url: String,
    pub token_url: String,
    pub state: Arc<BulkState>,
}

impl BulkFixture {
    pub fn polls(&self, job: &str) -> usize {
        self.state
            .polls
            .lock()
            .expect("lock")
            .get(job)
            .copied()
            .unwrap_or(0)
    }
}

pub async fn start(
    issuer: Arc<Issuer>,
    script: &[&str],
    files: Vec<(String, Bytes)>,
) -> BulkFixture {
    let api = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", api.local_addr().expect("address"));
    let state = with_storage(issuer.clone(), script, files).await;
    *state.api_url.lock().expect("lock") = url.clone();
    let app = api_routes(state.clone()).merge(
        Router::new()
            .route("/token", post(tokens::token_endpoint))
            .with_state(issuer),
    );
    tokio::spawn(async move {
        let _ = axum::serve(api, app).await;
    });
    BulkFixture {
        token_url: format!("{url}token"),
        url,
        state,
    }
}

/// The state of a bulk search whose files are served by a storage server of their own
/// (started here); its API's routes are [`api_routes`], and its `api_url` is for the caller to
/// set.
pub async fn with_storage(
    issuer: Arc<Issuer>,
    script: &[&str],
    files: Vec<(String, Bytes)>,
) -> Arc<BulkState> {
    let storage = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let state = Arc::new(BulkState {
        issuer,
        script: Mutex::new(script.iter().map(|s| s.to_string()).collect()),
        files: Mutex::new(files),
        files_on_api: Mutex::new(false),
        next_id: Mutex::new(None),
        submitted: Mutex::new(Vec::new()),
        polls: Mutex::new(HashMap::new()),
        advance_per_poll: Mutex::new(Duration::ZERO),
        file_requests: AtomicUsize::new(0),
        refused_files: AtomicUsize::new(0),
        cut_short: AtomicUsize::new(0),
        api_url: Mutex::new(String::new()),
        storage_url: Mutex::new(format!(
            "http://{}/",
            storage.local_addr().expect("address")
        )),
        signature: Mutex::new(SIGNATURE.to_string()),
        expire_after: Mutex::new(None),
    });
    let files = Router::new()
        .route("/files/{name}", get(file))
        .with_state(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(storage, files).await;
    });
    state
}

/// The bulk search's routes on the API: submit, job status, and files on the API's origin.
pub fn api_routes(state: Arc<BulkState>) -> Router {
    Router::new()
        .route("/search/bulk", post(submit))
        .route("/search/bulk/jobs/{id}", get(job))
        .route("/files/{name}", get(file))
        .with_state(state)
}

/// `items` as NDJSON files of `per_file` items, named `part-N.ndjson`, each item written as
/// the fixture API writes it in a page.
pub fn ndjson_files(items: &[Value], per_file: usize) -> Vec<(String, Bytes)> {
    items
        .chunks(per_file)
        .enumerate()
        .map(|(n, chunk)| {
            let mut text = String::new();
            for item in chunk {
                text.push_str(&serde_json::to_string(item).expect("JSON"));
                text.push('\n');
            }
            (format!("part-{n}.ndjson"), Bytes::from(text))
        })
        .collect()
}

async fn submit(State(state): State<Arc<BulkState>>, headers: HeaderMap, body: Bytes) -> Response {
    if !state.issuer.accepts(&headers) {
        return state.issuer.refusal();
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let mut submitted = state.submitted.lock().expect("lock");
    submitted.push(body);
    let id = state
        .next_id
        .lock()
        .expect("lock")
        .take()
        .unwrap_or_else(|| format!("job-{}", submitted.len()));
    state.polls.lock().expect("lock").insert(id.clone(), 0);
    axum::Json(json!({"job_id": id})).into_response()
}

async fn job(
    State(state): State<Arc<BulkState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !state.issuer.accepts(&headers) {
        return state.issuer.refusal();
    }
    let polled = {
        let mut polls = state.polls.lock().expect("lock");
        let Some(polled) = polls.get_mut(&id) else {
            return (StatusCode::NOT_FOUND, "no such job").into_response();
        };
        *polled += 1;
        *polled
    };
    let advance = *state.advance_per_poll.lock().expect("lock");
    state.issuer.clock.advance(advance);
    let status = {
        let script = state.script.lock().expect("lock");
        script
            .get(polled - 1)
            .or(script.last())
            .cloned()
            .unwrap_or_else(|| "PENDING".into())
    };
    let assets: Vec<String> = if status == "COMPLETED" {
        let base = if *state.files_on_api.lock().expect("lock") {
            state.api_url.lock().expect("lock").clone()
        } else {
            state.storage_url.lock().expect("lock").clone()
        };
        let files = state.files.lock().expect("lock");
        let signature = state.signature.lock().expect("lock").clone();
        files
            .iter()
            .map(|(name, _)| format!("{base}files/{name}?{signature}"))
            .collect()
    } else {
        Vec::new()
    };
    axum::Json(json!({"job_id": id, "status": status, "assets": assets})).into_response()
}

/// A file, as presigned storage serves it: refused with an `Authorization` header (signed
/// twice), with `x-api-key` (a configured header), or without the signature.
async fn file(
    State(state): State<Arc<BulkState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let requests = state.file_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let signature = {
        let mut signature = state.signature.lock().expect("lock");
        if state
            .expire_after
            .lock()
            .expect("lock")
            .is_some_and(|after| requests > after)
        {
            *signature = "X-Amz-Signature=s3cr3t-renewed".into();
        }
        signature.clone()
    };
    if query
        .as_deref()
        .is_some_and(|q| q.starts_with("X-Amz-Signature="))
        && query.as_deref() != Some(signature.as_str())
    {
        state.refused_files.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::FORBIDDEN,
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
        )
            .into_response();
    }
    if headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key("x-api-key")
        || query.as_deref() != Some(signature.as_str())
    {
        state.refused_files.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::BAD_REQUEST,
            "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed\
             </Message></Error>",
        )
            .into_response();
    }
    let Some(bytes) = state
        .files
        .lock()
        .expect("lock")
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| b.clone())
    else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let cut = state
        .cut_short
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if cut {
        // Half the file, then the connection fails.
        let half = bytes.slice(..bytes.len() / 2);
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            vec![Ok(half), Err(std::io::Error::other("reset"))];
        return Response::builder()
            .header(header::CONTENT_LENGTH, bytes.len())
            .body(Body::from_stream(futures_util::stream::iter(chunks)))
            .expect("response");
    }
    bytes.into_response()
}

/// The fixture's clock, for the issuer's tokens and the polls' time.
pub fn clock(fixture: &BulkFixture) -> Arc<ManualClock> {
    fixture.state.issuer.clock.clone()
}
