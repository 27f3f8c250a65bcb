//! EDS bulk search against a fixture of its three endpoints: a search submitted once, polled
//! until done, failed or out of time, and its files fetched as presigned URLs are: without the
//! token or the configured headers, whatever their origin, again when cut short, and never
//! named with their signature.

mod common;

use axum::body::Bytes;
use common::bulk::{self, SIGNATURE};
use common::tokens::Issuer;
use common::{Setup, credentials};
use serde_json::json;
use stac_sync::clock::ManualClock;
use stac_sync::stac::bulk::{ExportFormat, Outcome, Polling, download, submit, wait};
use stac_sync::stac::client::{ApiClient, api_client};
use stac_sync::stac::http::Stats;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A client of the fixture, with a configured `x-api-key` header.
fn client(fixture: &bulk::BulkFixture, dir: &std::path::Path) -> ApiClient {
    let mut setup = Setup::new(
        &fixture.url,
        dir,
        &["c"],
        credentials(&fixture.token_url, "id", "secret"),
    );
    setup.extra = "[headers]\n\"x-api-key\" = \"k\"\n".into();
    let config = setup.config();
    api_client(
        &config,
        bulk::clock(fixture),
        Arc::new(Stats::default()),
        config.http.retry.clone(),
    )
    .expect("a client")
}

/// Polls a few milliseconds apart, for two hours of the test's clock.
fn quick() -> Polling {
    Polling {
        first: Duration::from_millis(1),
        max: Duration::from_millis(4),
        timeout: Duration::from_secs(2 * 3600),
    }
}

fn issuer() -> Arc<Issuer> {
    Issuer::new(Arc::new(ManualClock::default()), "id", "secret")
}

fn files() -> Vec<(String, Bytes)> {
    vec![
        ("part-0.parquet".into(), Bytes::from(vec![7u8; 300_000])),
        (
            "part-1.parquet".into(),
            Bytes::from_static(b"PAR1 second file"),
        ),
    ]
}

#[tokio::test]
async fn a_bulk_search_is_submitted_once_and_polled_until_its_files_are_ready() {
    let fixture = bulk::start(issuer(), &["PENDING", "IN_PROGRESS", "COMPLETED"], files()).await;
    let dir = tempfile::tempdir().expect("dir");
    let api = client(&fixture, dir.path());
    let search =
        json!({"collections": ["c"], "datetime": "2024-01-01T00:00:00Z/..", "limit": 1000});
    let job = submit(&api, &search, ExportFormat::Geoparquet)
        .await
        .expect("submitted");
    assert_eq!(job, "job-1");
    let clock = bulk::clock(&fixture);
    let outcome = wait(&api, &job, quick(), clock.as_ref())
        .await
        .expect("waited");
    let Outcome::Completed(assets) = outcome else {
        panic!("completed: {outcome:?}");
    };
    assert_eq!(assets.len(), 2);
    assert_eq!(
        fixture.polls("job-1"),
        3,
        "polled until completed, then no more"
    );
    let submitted = fixture.state.submitted.lock().expect("lock").clone();
    assert_eq!(
        submitted,
        vec![
            json!({"collections": ["c"], "datetime": "2024-01-01T00:00:00Z/..", "limit": 1000,
            "export_format": "geoparquet", "export_type": "standard"})
        ],
        "the search once, with the export's format and type"
    );
    // The API's endpoints refuse a request without a live token: none was refused.
    assert_eq!(fixture.state.issuer.refused.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_failed_bulk_search_is_reported_as_failed() {
    let fixture = bulk::start(issuer(), &["PENDING", "RUNNING", "FAILED"], files()).await;
    let dir = tempfile::tempdir().expect("dir");
    let api = client(&fixture, dir.path());
    let job = submit(&api, &json!({"collections": ["c"]}), ExportFormat::Stacjson)
        .await
        .expect("submitted");
    let clock = bulk::clock(&fixture);
    let outcome = wait(&api, &job, quick(), clock.as_ref())
        .await
        .expect("waited");
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(fixture.polls(&job), 3);
    let submitted = fixture.state.submitted.lock().expect("lock").clone();
    assert_eq!(submitted[0]["export_format"], "stacjson");
}

#[tokio::test]
async fn a_bulk_search_not_done_by_the_timeout_is_given_up_with_its_last_status() {
    let fixture = bulk::start(issuer(), &["PENDING", "IN_PROGRESS"], files()).await;
    // Each poll stands for ten minutes of export.
    *fixture.state.advance_per_poll.lock().expect("lock") = Duration::from_secs(600);
    let dir = tempfile::tempdir().expect("dir");
    let api = client(&fixture, dir.path());
    let job = submit(
        &api,
        &json!({"collections": ["c"]}),
        ExportFormat::Geoparquet,
    )
    .await
    .expect("submitted");
    let polling = Polling {
        timeout: Duration::from_secs(1800),
        ..quick()
    };
    let clock = bulk::clock(&fixture);
    let outcome = wait(&api, &job, polling, clock.as_ref())
        .await
        .expect("waited");
    assert_eq!(outcome, Outcome::TimedOut("IN_PROGRESS".into()));
    // Polled at 10, 20 and 30 minutes: the third is past the half hour.
    assert_eq!(fixture.polls(&job), 3);
}

#[tokio::test]
async fn bulk_search_files_are_fetched_without_the_token_or_the_configured_headers() {
    for on_api in [false, true] {
        let fixture = bulk::start(issuer(), &["COMPLETED"], files()).await;
        *fixture.state.files_on_api.lock().expect("lock") = on_api;
        let dir = tempfile::tempdir().expect("dir");
        let api = client(&fixture, dir.path());
        let job = submit(
            &api,
            &json!({"collections": ["c"]}),
            ExportFormat::Geoparquet,
        )
        .await
        .expect("submitted");
        let clock = bulk::clock(&fixture);
        let Ok(Outcome::Completed(assets)) = wait(&api, &job, quick(), clock.as_ref()).await else {
            panic!("completed");
        };
        assert_eq!(
            assets[0].origin() == url::Url::parse(&fixture.url).expect("url").origin(),
            on_api
        );
        for (asset, (_, expected)) in assets.iter().zip(files()) {
            let path = dir.path().join("file");
            let mut file = tokio::fs::File::create(&path).await.expect("file");
            let size = download(&api, asset, &mut file).await.expect("downloaded");
            assert_eq!(size, expected.len() as u64);
            assert_eq!(std::fs::read(&path).expect("read"), expected.to_vec());
        }
        assert_eq!(
            fixture.state.file_requests.load(Ordering::SeqCst),
            2,
            "on the API: {on_api}"
        );
        assert_eq!(
            fixture.state.refused_files.load(Ordering::SeqCst),
            0,
            "on the API: {on_api}"
        );
    }
}

#[tokio::test]
async fn a_bulk_search_file_cut_short_is_fetched_again_from_its_start() {
    let fixture = bulk::start(issuer(), &["COMPLETED"], files()).await;
    fixture.state.cut_short.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("dir");
    let api = client(&fixture, dir.path());
    let job = submit(
        &api,
        &json!({"collections": ["c"]}),
        ExportFormat::Geoparquet,
    )
    .await
    .expect("submitted");
    let clock = bulk::clock(&fixture);
    let Ok(Outcome::Completed(assets)) = wait(&api, &job, quick(), clock.as_ref()).await else {
        panic!("completed");
    };
    let path = dir.path().join("file");
    let mut file = tokio::fs::File::create(&path).await.expect("file");
    download(&api, &assets[0], &mut file)
        .await
        .expect("downloaded");
    assert_eq!(std::fs::read(&path).expect("read"), files()[0].1.to_vec());
    assert_eq!(fixture.state.file_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_bulk_search_file_is_named_without_its_signature() {
    let fixture = bulk::start(issuer(), &["COMPLETED"], files()).await;
    let dir = tempfile::tempdir().expect("dir");
    let api = client(&fixture, dir.path());
    let job = submit(
        &api,
        &json!({"collections": ["c"]}),
        ExportFormat::Geoparquet,
    )
    .await
    .expect("submitted");
    let clock = bulk::clock(&fixture);
    let Ok(Outcome::Completed(assets)) = wait(&api, &job, quick(), clock.as_ref()).await else {
        panic!("completed");
    };
    // The file is gone (an expired signature answers the same way).
    fixture.state.files.lock().expect("lock").clear();
    let path = dir.path().join("file");
    let mut file = tokio::fs::File::create(&path).await.expect("file");
    let error = download(&api, &assets[0], &mut file)
        .await
        .expect_err("refused")
        .to_string();
    assert!(error.contains("/files/part-0.parquet"), "{error}");
    let signature = SIGNATURE.split('=').nth(1).expect("a value");
    assert!(!error.contains(signature), "{error}");
}
