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

/// A geoparquet export submitted and waited for: its files.
async fn completed(fixture: &bulk::BulkFixture, api: &ApiClient) -> Vec<url::Url> {
    let search = json!({"collections": ["c"]});
    let job = submit(api, &search, ExportFormat::Geoparquet)
        .await
        .expect("submitted");
    let clock = bulk::clock(fixture);
    match wait(api, &job, quick(), clock.as_ref()).await {
        Ok(Outcome::Completed(assets)) => assets,
        other => panic!("completed: {other:?}"),
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
        let assets = completed(&fixture, &api).await;
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
    let assets = completed(&fixture, &api).await;
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
    let assets = completed(&fixture, &api).await;
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

/// Reads a file of the export as the run would, in batches of 3, after `skip` items.
fn read_back(
    path: &std::path::Path,
    format: ExportFormat,
    skip: u64,
) -> (u64, Vec<serde_json::Value>) {
    let mut texts = Vec::new();
    let mut each = |batch: Vec<Box<serde_json::value::RawValue>>| {
        assert!(batch.len() <= 3);
        texts.extend(
            batch
                .iter()
                .map(|t| serde_json::from_str(t.get()).expect("JSON")),
        );
        Ok(())
    };
    let read =
        stac_sync::stac::bulk::read(path, "part-0", format, skip, 3, &mut each).expect("reads");
    (read, texts)
}

#[test]
fn bulk_search_files_read_back_as_the_items_they_hold_in_both_formats() {
    let items = common::eds_items();
    assert!(items.len() > 6);
    let dir = tempfile::tempdir().expect("dir");
    let ndjson = dir.path().join("items.ndjson");
    let lines: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    std::fs::write(&ndjson, lines.join("\n") + "\n").expect("write");
    let pretty = dir.path().join("items.json");
    let collection = json!({"type": "FeatureCollection", "features": items});
    std::fs::write(
        &pretty,
        serde_json::to_string_pretty(&collection).expect("JSON"),
    )
    .expect("write");
    let one_line = dir.path().join("one-line.json");
    std::fs::write(&one_line, collection.to_string()).expect("write");
    for path in [&ndjson, &pretty, &one_line] {
        let (read, texts) = read_back(path, ExportFormat::Stacjson, 0);
        assert_eq!(read, items.len() as u64);
        assert_eq!(texts, items, "{}", path.display());
    }
    // stac-geoparquet as rustac writes it: read back as rustac reads it.
    let parquet = dir.path().join("items.parquet");
    let typed: Vec<stac::Item> = items
        .iter()
        .map(|i| serde_json::from_value(i.clone()).expect("an item"))
        .collect();
    stac::geoparquet::into_writer(std::fs::File::create(&parquet).expect("file"), typed)
        .expect("written");
    let rustac: Vec<serde_json::Value> =
        stac::geoparquet::from_reader(std::fs::File::open(&parquet).expect("file"))
            .expect("rustac reads it")
            .items
            .iter()
            .map(|i| serde_json::to_value(i).expect("JSON"))
            .collect();
    let (read, texts) = read_back(&parquet, ExportFormat::Geoparquet, 0);
    assert_eq!(read, items.len() as u64);
    assert_eq!(texts, rustac);
    let ids = |values: &[serde_json::Value]| -> Vec<String> {
        values.iter().map(|v| v["id"].to_string()).collect()
    };
    assert_eq!(ids(&texts), ids(&items));
}

#[test]
fn a_bulk_search_file_read_again_skips_the_items_already_committed() {
    let items = common::eds_items();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("items.json");
    std::fs::write(
        &path,
        json!({"type": "FeatureCollection", "features": items}).to_string(),
    )
    .expect("write");
    let (read, texts) = read_back(&path, ExportFormat::Stacjson, 5);
    assert_eq!(read, items.len() as u64);
    assert_eq!(texts, items[5..].to_vec());
}

#[test]
fn a_bulk_search_file_in_another_format_fails_naming_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("items.ndjson");
    std::fs::write(&path, common::eds_items()[0].to_string()).expect("write");
    let mut each = |_: Vec<Box<serde_json::value::RawValue>>| Ok(());
    let error =
        stac_sync::stac::bulk::read(&path, "part-0", ExportFormat::Geoparquet, 0, 3, &mut each)
            .expect_err("not parquet")
            .to_string();
    assert!(
        error.contains("part-0") && error.contains("geoparquet"),
        "{error}"
    );
    std::fs::write(&path, "{\"type\": \"FeatureCollection\", \"features\": [1").expect("write");
    let error =
        stac_sync::stac::bulk::read(&path, "part-0", ExportFormat::Stacjson, 0, 3, &mut each)
            .expect_err("cut short")
            .to_string();
    assert!(
        error.contains("part-0") && error.contains("stacjson"),
        "{error}"
    );
}

#[tokio::test]
async fn a_job_id_that_would_name_another_path_is_refused() {
    let fixture = bulk::start(issuer(), &["COMPLETED"], files()).await;
    *fixture.state.next_id.lock().expect("lock") = Some("..".into());
    let dir = tempfile::tempdir().expect("dir");
    let api = client(&fixture, dir.path());
    let job = submit(
        &api,
        &json!({"collections": ["c"]}),
        ExportFormat::Geoparquet,
    )
    .await
    .expect("submitted");
    assert_eq!(job, "..");
    let clock = bulk::clock(&fixture);
    let error = wait(&api, &job, quick(), clock.as_ref())
        .await
        .expect_err("refused")
        .to_string();
    assert!(error.contains("\"..\""), "{error}");
}
