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
use stac_sync::error::Exit;
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
    let mut each = |batch: Vec<Bytes>| {
        assert!(batch.len() <= 3);
        texts.extend(
            batch
                .iter()
                .map(|t| serde_json::from_slice(t).expect("JSON")),
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
    // Why a backfill asks for stacjson: read back, stac-geoparquet keeps datetimes to the
    // millisecond, so no EDS item comes back as the API serves it.
    let differ = texts.iter().zip(&items).filter(|(read, item)| read != item);
    assert_eq!(differ.count(), items.len());
    assert_eq!(
        items[0]["properties"]["created"],
        "2022-11-06T13:23:05.444941Z"
    );
    assert_eq!(
        texts[0]["properties"]["created"],
        "2022-11-06T13:23:05.444+00:00"
    );
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
    let mut each = |_: Vec<Bytes>| Ok(());
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

// A job's backfill through bulk search, end to end: a fixture API that both pages the items and
// exports them as NDJSON files.

/// A fixture API paging `items` (pages of 50, each reporting all of them as matched) and
/// exporting, when asked, `files` (listed last first: a run reads them in the order of their
/// paths), after the statuses of `script`.
async fn api_with_bulk(
    items: &[serde_json::Value],
    files: Vec<(String, Bytes)>,
    script: &[&str],
) -> (common::fixture::Fixture, Arc<bulk::BulkState>) {
    let issuer = issuer();
    let mut files = files;
    files.reverse();
    let state = bulk::with_storage(issuer.clone(), script, files).await;
    let pages = items.chunks(50).map(<[_]>::to_vec).collect();
    let api = common::fixture::start_with(
        pages,
        common::fixture::Paging::PostFull,
        issuer,
        bulk::api_routes(state.clone()),
    )
    .await;
    *state.api_url.lock().expect("lock") = api.url.clone();
    *api.state.matched.lock().expect("lock") = Some(items.len() as u64);
    (api, state)
}

/// A run of job "test" over collection "c" against `api`, pages of 50, with `backfill`, polling
/// every millisecond.
fn backfill_setup<'a>(
    api: &'a common::fixture::Fixture,
    dir: &'a std::path::Path,
    backfill: &'a str,
) -> Setup<'a> {
    let mut setup = Setup::new(
        &api.url,
        dir,
        &["c"],
        credentials(&api.token_url, "id", "secret"),
    );
    setup.limit = 50;
    setup.job_extra = backfill;
    setup.extra = "[bulk]\npoll_interval = \"1ms\"\n".into();
    setup
}

/// The objects of a mirror's folder, without the run manifests.
fn item_objects(folder: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut objects = common::stored_objects(folder);
    objects.retain(|key, _| !key.starts_with('_'));
    objects
}

/// Mirrors `items` by paging them, in `dir`: what a bulk backfill must equal.
async fn paged_mirror(items: &[serde_json::Value], dir: &std::path::Path) -> PagedMirror {
    paged_mirror_in(items, dir, None).await
}

/// [`paged_mirror`], into `database` if given.
async fn paged_mirror_in(
    items: &[serde_json::Value],
    dir: &std::path::Path,
    database: Option<String>,
) -> PagedMirror {
    let (api, _) = api_with_bulk(items, Vec::new(), &["COMPLETED"]).await;
    let mut setup = backfill_setup(&api, dir, "");
    setup.database = database;
    let summary = setup.run(api.state.issuer.clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    let rows = common::stored_items(&setup.database_url()).await;
    assert_eq!(rows.len(), items.len());
    PagedMirror {
        rows,
        objects: item_objects(&setup.objects_dir()),
    }
}

struct PagedMirror {
    rows: std::collections::BTreeMap<(String, String), String>,
    objects: std::collections::BTreeMap<String, Vec<u8>>,
}

impl PagedMirror {
    async fn assert_equals(&self, setup: &Setup<'_>) {
        self.assert_equals_at(&setup.database_url(), &setup.objects_dir())
            .await;
    }

    async fn assert_equals_at(&self, database: &str, folder: &std::path::Path) {
        let rows = common::stored_items(database).await;
        assert_eq!(rows.len(), self.rows.len());
        assert!(rows == self.rows, "the rows differ from the paged mirror's");
        let objects = item_objects(folder);
        let differ: Vec<_> = objects
            .keys()
            .chain(self.objects.keys())
            .filter(|key| objects.get(*key) != self.objects.get(*key))
            .take(5)
            .collect();
        assert!(
            differ.is_empty(),
            "objects differ from the paged mirror's: {differ:?}"
        );
    }
}

#[tokio::test]
async fn a_bulk_backfill_stores_what_paging_stores_byte_for_byte_without_paging() {
    let items = common::make_items("c", 230);
    let reference = tempfile::tempdir().expect("dir");
    let paged = paged_mirror(&items, reference.path()).await;

    let files = bulk::ndjson_files(&items, 60);
    let (api, state) = api_with_bulk(&items, files, &["PENDING", "IN_PROGRESS", "COMPLETED"]).await;
    let dir = tempfile::tempdir().expect("dir");
    let setup = backfill_setup(&api, dir.path(), "backfill = \"bulk\"");
    let summary = setup.run(api.state.issuer.clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    assert_eq!(summary.jobs[0].counts.new, 230);
    paged.assert_equals(&setup).await;
    // The change feed has each item once, as new.
    let feed = common::pairs(
        &setup.database_url(),
        "SELECT change, CAST(COUNT(DISTINCT id) AS TEXT) || '/' || CAST(COUNT(*) AS TEXT) \
         FROM changes GROUP BY change",
    )
    .await;
    assert_eq!(feed, vec![("new".to_string(), "230/230".to_string())]);
    assert_eq!(
        api.state.searches.load(Ordering::SeqCst),
        1,
        "one search, for the match count: no page"
    );
    let submitted = state.submitted.lock().expect("lock").clone();
    assert_eq!(submitted.len(), 1);
    assert_eq!(submitted[0]["collections"], json!(["c"]));
    assert_eq!(submitted[0]["export_format"], "stacjson");
    assert_eq!(state.polls.lock().expect("lock")["job-1"], 3);
    assert_eq!(state.file_requests.load(Ordering::SeqCst), 4);
    assert_eq!(state.refused_files.load(Ordering::SeqCst), 0);

    // The next pass is incremental, from the watermark the backfill left: no bulk search.
    let again = setup.run(api.state.issuer.clock.clone()).await;
    assert_eq!(again.exit(), Exit::Success, "{:?}", again.jobs[0].error);
    assert_eq!(again.jobs[0].counts.new, 0);
    assert_eq!(state.submitted.lock().expect("lock").len(), 1);
    assert!(api.state.searches.load(Ordering::SeqCst) > 1, "paged");
}

#[tokio::test]
async fn a_bulk_backfill_into_postgres_stores_what_paging_stores() {
    let items = common::make_items("c", 300);
    let reference = tempfile::tempdir().expect("dir");
    let database = common::fresh_postgres().await;
    let paged = paged_mirror_in(&items, reference.path(), Some(database)).await;
    let files = bulk::ndjson_files(&items, 100);
    let (api, state) = api_with_bulk(&items, files, &["COMPLETED"]).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut setup = backfill_setup(&api, dir.path(), "backfill = \"bulk\"");
    setup.database = Some(common::fresh_postgres().await);
    let summary = setup.run(api.state.issuer.clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    paged.assert_equals(&setup).await;
    assert_eq!(state.file_requests.load(Ordering::SeqCst), 3);
    assert_eq!(api.state.searches.load(Ordering::SeqCst), 1);
}

/// A bulk backfill that cannot be read as it should pages its collection instead, and stores
/// exactly what paging stores.
async fn paged_instead(items: &[serde_json::Value], api: common::fixture::Fixture) {
    let reference = tempfile::tempdir().expect("dir");
    let paged = paged_mirror(items, reference.path()).await;
    let dir = tempfile::tempdir().expect("dir");
    let setup = backfill_setup(&api, dir.path(), "backfill = \"bulk\"");
    let summary = setup.run(api.state.issuer.clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    paged.assert_equals(&setup).await;
    assert!(
        api.state.searches.load(Ordering::SeqCst) > 1,
        "the collection was paged"
    );
    let state = stac_sync::mirror::db::Database::connect(&setup.database_url())
        .await
        .expect("db")
        .job_state("test")
        .await
        .expect("state")
        .expect("a job row");
    assert!(state.watermark.is_some(), "the pass ended");
}

#[tokio::test]
async fn a_failed_bulk_search_is_paged_instead() {
    let items = common::make_items("c", 120);
    let files = bulk::ndjson_files(&items, 60);
    let (api, state) = api_with_bulk(&items, files, &["PENDING", "FAILED"]).await;
    paged_instead(&items, api).await;
    assert_eq!(state.file_requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_bulk_search_still_running_at_the_timeout_is_paged_instead() {
    let items = common::make_items("c", 120);
    let files = bulk::ndjson_files(&items, 60);
    let (api, state) = api_with_bulk(&items, files, &["PENDING", "IN_PROGRESS"]).await;
    // Each poll takes an hour of the run's clock: the default timeout (2 h) ends the wait.
    *state.advance_per_poll.lock().expect("lock") = Duration::from_secs(3600);
    paged_instead(&items, api).await;
    assert_eq!(state.polls.lock().expect("lock")["job-1"], 2);
}

#[tokio::test]
async fn an_export_short_of_the_items_matched_is_paged_instead() {
    let items = common::make_items("c", 120);
    // The export lost the last 20 items (a cap on its size, say).
    let files = bulk::ndjson_files(&items[..100], 60);
    let (api, state) = api_with_bulk(&items, files, &["COMPLETED"]).await;
    paged_instead(&items, api).await;
    assert_eq!(state.file_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_export_file_that_is_not_stac_json_is_paged_instead() {
    let items = common::make_items("c", 120);
    let mut files = bulk::ndjson_files(&items, 60);
    files[1].1 = Bytes::from_static(b"PAR1 a parquet file, say");
    let (api, _) = api_with_bulk(&items, files, &["COMPLETED"]).await;
    paged_instead(&items, api).await;
}

#[tokio::test]
async fn backfill_auto_pages_an_api_without_bulk_search() {
    let items = common::make_items("c", 120);
    let reference = tempfile::tempdir().expect("dir");
    let paged = paged_mirror(&items, reference.path()).await;
    let issuer = issuer();
    let pages = items.chunks(50).map(<[_]>::to_vec).collect();
    let api =
        common::fixture::start(pages, common::fixture::Paging::PostFull, issuer.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    let setup = backfill_setup(&api, dir.path(), "backfill = \"auto\"");
    let summary = setup.run(issuer.clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    paged.assert_equals(&setup).await;
}

/// The position a bulk partition's commits left, from its stored resume point: (file, skip).
async fn bulk_position(database: &std::path::Path) -> Option<(u64, u64)> {
    if !database.exists() {
        return None;
    }
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(database)
        .read_only(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.ok()?;
    let resume: Option<String> =
        sqlx::query_scalar("SELECT resume FROM sync_state WHERE partition = 'c bulk'")
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()?;
    pool.close().await;
    let resume: serde_json::Value = serde_json::from_str(&resume?).ok()?;
    let url = url::Url::parse(resume["url"].as_str()?).ok()?;
    let mut position = (0, 0);
    for (key, value) in url::form_urlencoded::parse(url.fragment()?.as_bytes()) {
        match &*key {
            "file" => position.0 = value.parse().ok()?,
            "skip" => position.1 = value.parse().ok()?,
            _ => {}
        }
    }
    Some(position)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_backfill_killed_mid_file_resumes_from_its_last_commit() {
    let items = common::make_items("c", 1200);
    let reference = tempfile::tempdir().expect("dir");
    let paged = paged_mirror(&items, reference.path()).await;
    let files = bulk::ndjson_files(&items, 400);
    let (api, state) = api_with_bulk(&items, files, &["PENDING", "COMPLETED"]).await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("stac-sync.toml"),
        format!(
            "api_url = \"{}\"\n[bulk]\npoll_interval = \"1ms\"\n[[jobs]]\nname = \"test\"\n\
             collections = [\"c\"]\nlimit = 50\nbackfill = \"bulk\"\n",
            api.url
        ),
    )
    .expect("config");
    let database = format!("sqlite://{}", dir.path().join("stac-sync.db").display());
    let binary = assert_cmd::cargo::cargo_bin!("stac-sync");
    let mut kills = Vec::new();
    // Killed as soon as it has committed part of a file, three times, each in a later file.
    for _ in 0..3 {
        let mut child = common::binary_run(binary, dir.path(), &api.token_url)
            .spawn()
            .expect("spawns");
        let before = kills.last().copied();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let killed_at = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the run ended ({status}) before it could be killed");
            }
            let at = bulk_position(&dir.path().join("stac-sync.db")).await;
            // The kth kill in file k or later: the runs resume in different files.
            let file = kills.len() as u64;
            if let Some(at) = at.filter(|at| at.1 > 0 && at.0 >= file && Some(*at) > before) {
                child.kill().expect("SIGKILL");
                child.wait().expect("waited");
                break at;
            }
            assert!(std::time::Instant::now() < deadline, "no progress");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        kills.push(killed_at);
    }
    let fetched_before = state.file_requests.load(Ordering::SeqCst);
    let last = common::run_to_end(common::binary_run(binary, dir.path(), &api.token_url)).await;
    assert_eq!(last, Some(0));
    paged
        .assert_equals_at(&database, &dir.path().join("stac-sync-items"))
        .await;
    let unchanged = common::scalar(
        &database,
        "SELECT COALESCE(SUM(items_unchanged), 0) FROM sync_runs WHERE status = 'succeeded'",
    )
    .await;
    assert_eq!(
        unchanged, 0,
        "the last run read again no item committed before it"
    );
    assert_eq!(
        state.submitted.lock().expect("lock").len(),
        1,
        "the killed runs' job was polled again, not submitted again"
    );
    assert_eq!(
        api.state.searches.load(Ordering::SeqCst),
        1,
        "the match count only: nothing was paged"
    );
    // The last run fetched the file of the last kill's position and those after, not those
    // before.
    let fetched = state.file_requests.load(Ordering::SeqCst) - fetched_before;
    let last_file = kills.last().map_or(0, |at| at.0);
    assert_eq!(fetched as u64, 3 - last_file, "kills at {kills:?}");
}

#[tokio::test]
async fn file_urls_that_expired_while_earlier_files_were_read_are_asked_for_again() {
    let items = common::make_items("c", 180);
    let reference = tempfile::tempdir().expect("dir");
    let paged = paged_mirror(&items, reference.path()).await;
    let files = bulk::ndjson_files(&items, 60);
    let (api, state) = api_with_bulk(&items, files, &["COMPLETED"]).await;
    // The URLs the job listed first expire once the first file has been fetched.
    *state.expire_after.lock().expect("lock") = Some(1);
    let dir = tempfile::tempdir().expect("dir");
    let setup = backfill_setup(&api, dir.path(), "backfill = \"bulk\"");
    let summary = setup.run(api.state.issuer.clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    paged.assert_equals(&setup).await;
    assert_eq!(
        state.refused_files.load(Ordering::SeqCst),
        1,
        "one expired URL"
    );
    assert_eq!(
        state.polls.lock().expect("lock")["job-1"],
        2,
        "asked once more"
    );
    assert_eq!(
        api.state.searches.load(Ordering::SeqCst),
        1,
        "nothing paged"
    );
}

#[tokio::test]
async fn check_says_whether_a_backfill_goes_through_bulk_search() {
    let items = common::make_items("c", 10);
    let (with_bulk, _) = api_with_bulk(&items, Vec::new(), &["COMPLETED"]).await;
    let without =
        common::fixture::start(Vec::new(), common::fixture::Paging::PostFull, issuer()).await;
    for (api, expected) in [
        (
            &with_bulk,
            "backfill through bulk search (GET search/bulk answers 405",
        ),
        (&without, "backfill paged: the API has no bulk search"),
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let setup = backfill_setup(api, dir.path(), "backfill = \"auto\"");
        let report =
            stac_sync::ops::check::check(&setup.config(), api.state.issuer.clock.clone()).await;
        let job = report
            .probes
            .iter()
            .find(|p| p.check == "job test")
            .unwrap_or_else(|| panic!("no job probe in {}", report.render()));
        assert!(job.detail.contains(expected), "{}", job.detail);
        let paged = backfill_setup(api, dir.path(), "");
        let report =
            stac_sync::ops::check::check(&paged.config(), api.state.issuer.clock.clone()).await;
        let job = report.probes.iter().find(|p| p.check == "job test");
        assert!(
            job.is_some_and(|job| !job.detail.contains("backfill")),
            "a paged backfill asks nothing: {}",
            report.render()
        );
    }
}

#[tokio::test]
async fn workers_page_a_backfill_that_asks_for_bulk_search() {
    let items = common::make_items("c", 120);
    let reference = tempfile::tempdir().expect("dir");
    let paged = paged_mirror_in(
        &items,
        reference.path(),
        Some(common::fresh_postgres().await),
    )
    .await;
    let files = bulk::ndjson_files(&items, 60);
    let (api, state) = api_with_bulk(&items, files, &["COMPLETED"]).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut setup = backfill_setup(&api, dir.path(), "backfill = \"bulk\"");
    setup.database = Some(common::fresh_postgres().await);
    let summary = stac_sync::run::run(
        &setup.config(),
        stac_sync::run::RunOptions {
            clock: api.state.issuer.clock.clone(),
            migrate: true,
            worker: true,
            ..stac_sync::run::RunOptions::default()
        },
    )
    .await
    .expect("the run is recorded");
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    paged.assert_equals(&setup).await;
    assert!(
        state.submitted.lock().expect("lock").is_empty(),
        "no bulk search"
    );
}
