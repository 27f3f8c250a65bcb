//! Completeness on catalogs bigger and odder than one search can page: adaptive partitions
//! under a server's result window, the completeness check against `numberMatched`, and windows
//! cut from a collection's temporal extent. Against a real STAC API (stac-server) behind a
//! layer that behaves like an Elasticsearch-backed one.

mod common;

use axum::response::IntoResponse;
use common::tokens::Issuer;
use common::{Setup, make_items, stored_items};
use serde_json::Value;
use stac::api::{ItemsClient, TransactionClient};
use stac_server::MemoryBackend;
use stac_sync::clock::ManualClock;
use stac_sync::error::Exit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// `run --worker`'s options.
fn as_worker(clock: &Arc<ManualClock>) -> stac_sync::run::RunOptions {
    stac_sync::run::RunOptions {
        clock: clock.clone(),
        worker: true,
        ..Default::default()
    }
}

/// A job over 2020-2024 whose partitions are split when they match more than 20 items.
const SPLIT_PAST_20: &str = "datetime = \"2020-01-01T00:00:00Z/2025-01-01T00:00:00Z\"\nwindow = \"none\"\nmax_partition_items = 20";

/// `n` items of collection `c`, acquired one every `days` days from 2020-01-01.
fn items_over_time(n: usize, days: u64) -> Vec<Value> {
    let start = stac_sync::plan::parse_instant("2020-01-01T00:00:00Z").expect("instant");
    make_items("c", n)
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            let at = start + std::time::Duration::from_secs(i as u64 * days * 86_400 + 3600);
            let properties = item["properties"].as_object_mut().expect("properties");
            properties.remove("start_datetime");
            properties.remove("end_datetime");
            properties.insert("datetime".into(), stac_sync::plan::rfc3339(at).into());
            item
        })
        .collect()
}

/// What the layer in front of stac-server does.
#[derive(Clone, Default)]
struct Engine {
    backend: Arc<OnceLock<MemoryBackend>>,
    /// Refuse a search page that reaches past this many results (0: never), as a search
    /// engine's result window does.
    depth: usize,
    /// Report `numberMatched` on every page.
    report_matched: bool,
    /// Serve this many second pages (`skip` = `limit`) without their features.
    drops: Arc<AtomicUsize>,
    /// Offer the Fields extension: conformance says so, and a search asking for `fields` gets
    /// features of `id`, `collection` and `properties.updated` only.
    fields: bool,
    /// Answer each search this late (a remote API).
    delay: std::time::Duration,
    /// Answer 503 to every search once this many were served (0: never).
    fail_after: Arc<AtomicUsize>,
    searches: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl Engine {
    /// An engine whose result window is 20 items deep and that reports how many items a
    /// search matches: partitions of more than 20 are split.
    fn splitting() -> Engine {
        Engine {
            depth: 20,
            report_matched: true,
            ..Engine::default()
        }
    }

    /// Starts stac-server holding `items`, behind this layer.
    async fn start(self, items: &[Value], clock: &Arc<ManualClock>) -> common::stac::StacServer {
        let engine = self.clone();
        let server = common::stac::start_with(
            items,
            Issuer::new(clock.clone(), "id", "secret"),
            0,
            move |router| router.layer(axum::middleware::from_fn_with_state(engine, engine_layer)),
        )
        .await;
        let _ = self.backend.set(server.backend.clone());
        server
    }

    /// Items the search `body` matches (every page of it).
    async fn matched(&self, body: &Value) -> usize {
        let mut whole = body.clone();
        whole["limit"] = 1_000_000.into();
        if let Some(search) = whole.as_object_mut() {
            search.remove("skip");
        }
        let search: stac::api::Search = serde_json::from_value(whole).expect("a search");
        let backend = self.backend.get().expect("started");
        backend.search(search).await.expect("search").items.len()
    }
}

async fn engine_layer(
    axum::extract::State(engine): axum::extract::State<Engine>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if engine.fields && matches!(request.uri().path(), "/" | "/conformance") {
        return with_fields_conformance(next.run(request).await).await;
    }
    if request.uri().path() != "/search" || request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    tokio::time::sleep(engine.delay).await;
    let served = engine.searches.fetch_add(1, Ordering::SeqCst) + 1;
    let fail_after = engine.fail_after.load(Ordering::SeqCst);
    if fail_after > 0 && served > fail_after {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let search: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let skip = search["skip"].as_u64().unwrap_or(0) as usize;
    let limit = search["limit"].as_u64().unwrap_or(10) as usize;
    if engine.depth > 0 && skip + limit > engine.depth {
        engine.refused.fetch_add(1, Ordering::SeqCst);
        let refusal = serde_json::json!({"code": "BadRequest", "description":
            format!("Result window is too large, from + size must be less than or equal to: [{}]", engine.depth)});
        return (axum::http::StatusCode::BAD_REQUEST, axum::Json(refusal)).into_response();
    }
    let matched = engine.matched(&search).await;
    let response = next
        .run(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(bytes),
        ))
        .await;
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let mut page: Value = serde_json::from_slice(&body).unwrap_or_default();
    if engine.report_matched {
        page["numberMatched"] = matched.into();
    }
    let drop = skip == limit
        && engine
            .drops
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if drop {
        page["features"] = Value::Array(Vec::new());
    }
    if engine.fields
        && search.get("fields").is_some()
        && let Some(features) = page["features"].as_array_mut()
    {
        for feature in features {
            *feature = serde_json::json!({
                "type": "Feature",
                "id": feature["id"],
                "collection": feature["collection"],
                "properties": {"updated": feature["properties"]["updated"]},
            });
        }
    }
    (parts.status, axum::Json(page)).into_response()
}

/// The landing page or `/conformance`, saying that the Fields extension is offered.
async fn with_fields_conformance(response: axum::response::Response) -> axum::response::Response {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let mut doc: Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Some(classes) = doc["conformsTo"].as_array_mut() {
        classes.push("https://api.stacspec.org/v1.0.0/item-search#fields".into());
    }
    (parts.status, axum::Json(doc)).into_response()
}

fn setup<'a>(server: &'a common::stac::StacServer, dir: &'a std::path::Path) -> Setup<'a> {
    setup_at(&server.url, &server.token_url, dir)
}

/// A job over collection `c` of the API at `url`, pages of 10.
fn setup_at<'a>(url: &'a str, token_url: &str, dir: &'a std::path::Path) -> Setup<'a> {
    Setup {
        limit: 10,
        ..Setup::new(
            url,
            dir,
            &["c"],
            common::credentials(token_url, "id", "secret"),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_deeper_than_the_result_window_is_split_until_each_partition_fits() {
    let clock = Arc::new(ManualClock::default());
    let items = items_over_time(100, 18);
    for report_matched in [true, false] {
        let engine = Engine {
            depth: 20,
            report_matched,
            ..Engine::default()
        };
        let server = engine.clone().start(&items, &clock).await;
        let dir = tempfile::tempdir().expect("tempdir");
        // One partition of five years: 100 items, five times the result window.
        let setup = Setup {
            job_extra: SPLIT_PAST_20,
            ..setup(&server, dir.path())
        };

        let summary = setup.run(clock.clone()).await;

        let counts = &summary.jobs[0].counts;
        assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
        assert_eq!(counts.new, 100, "{counts:?}");
        assert_eq!(stored_items(&setup.database_url()).await.len(), 100);
        assert!(counts.splits >= 3, "{counts:?}");
        let recorded = common::scalar(
            &setup.database_url(),
            "SELECT partitions_split FROM sync_runs",
        )
        .await;
        assert_eq!(recorded as u64, counts.splits);
        let (searches, refused) = (
            engine.searches.load(Ordering::SeqCst),
            engine.refused.load(Ordering::SeqCst),
        );
        // With the count, a partition splits on its first page, before any deep page; without
        // it, on the page the server refuses.
        if report_matched {
            assert_eq!(refused, 0);
        } else {
            assert!(refused >= 1);
        }
        eprintln!(
            "numberMatched reported: {report_matched}; {} splits; {searches} search requests \
             ({refused} refused) for {} pages committed; 10 pages of 10 without a result window",
            counts.splits, counts.pages
        );
        let again = setup.run(clock.clone()).await;
        assert_eq!(again.exit(), Exit::Success);
        assert_eq!(again.jobs[0].counts.new + again.jobs[0].counts.changed, 0);
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_dies_mid_split_leaves_the_halves_planned_and_the_rerun_converges() {
    let clock = Arc::new(ManualClock::default());
    let items = items_over_time(100, 18);
    let dir = tempfile::tempdir().expect("tempdir");
    let job_extra = SPLIT_PAST_20;
    let engine = Engine {
        fail_after: Arc::new(AtomicUsize::new(5)),
        ..Engine::splitting()
    };
    let server = engine.clone().start(&items, &clock).await;
    let rerun = Setup {
        job_extra,
        ..setup(&server, dir.path())
    };
    let first = rerun.run(clock.clone()).await;
    assert_eq!(first.exit(), Exit::Upstream, "{:?}", first.jobs[0].error);
    let url = rerun.database_url();
    let split = common::scalar(&url, "SELECT COUNT(*) FROM sync_state WHERE split").await;
    let planned = common::scalar(
        &url,
        "SELECT COUNT(*) FROM sync_state WHERE kind = 'sync' AND NOT split",
    )
    .await;
    assert!(split >= 1, "the plan shows the splits");
    assert_eq!(planned, split + 1, "each split planned two halves");

    engine.fail_after.store(0, Ordering::SeqCst);
    let second = rerun.run(clock.clone()).await;

    assert_eq!(second.exit(), Exit::Success, "{:?}", second.jobs[0].error);
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let reference = Setup {
        job_extra,
        ..setup(&server, reference_dir.path())
    };
    assert_eq!(reference.run(clock.clone()).await.exit(), Exit::Success);
    assert_eq!(
        stored_items(&rerun.database_url()).await,
        stored_items(&reference.database_url()).await
    );
    assert_eq!(stored_items(&rerun.database_url()).await.len(), 100);
    let left = common::scalar(
        &rerun.database_url(),
        "SELECT COUNT(*) FROM sync_state WHERE kind = 'sync'",
    )
    .await;
    assert_eq!(left, 0, "the pass ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_came_back_empty_is_caught_by_the_count_and_paged_again() {
    let clock = Arc::new(ManualClock::default());
    let items = items_over_time(50, 18);
    let engine = Engine {
        report_matched: true,
        drops: Arc::new(AtomicUsize::new(1)),
        ..Engine::default()
    };
    let server = engine.clone().start(&items, &clock).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        job_extra: "window = \"none\"",
        ..setup(&server, dir.path())
    };

    let summary = setup.run(clock.clone()).await;

    let counts = &summary.jobs[0].counts;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    assert_eq!(stored_items(&setup.database_url()).await.len(), 50);
    assert_eq!((counts.missing, counts.incomplete), (10, 0), "{counts:?}");
    let recorded =
        common::scalar(&setup.database_url(), "SELECT items_missing FROM sync_runs").await;
    assert_eq!(recorded, 10, "the run records the shortfall it fixed");
    assert_eq!(
        engine.searches.load(Ordering::SeqCst),
        10,
        "five pages, twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortfall_that_persists_makes_the_run_partial_and_keeps_the_watermark() {
    let clock = Arc::new(ManualClock::default());
    let items = items_over_time(50, 18);
    let engine = Engine {
        report_matched: true,
        drops: Arc::new(AtomicUsize::new(usize::MAX)),
        ..Engine::default()
    };
    let server = engine.start(&items, &clock).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        job_extra: "window = \"none\"",
        ..setup(&server, dir.path())
    };

    let summary = setup.run(clock.clone()).await;

    assert_eq!(summary.exit(), Exit::Partial);
    assert_eq!(summary.jobs[0].status, "partial");
    assert_eq!(summary.jobs[0].counts.incomplete, 1);
    assert_eq!(stored_items(&setup.database_url()).await.len(), 40);
    let db = stac_sync::mirror::db::Database::connect(&setup.database_url())
        .await
        .expect("database");
    let status = stac_sync::ops::status::read(&db, 5).await.expect("status");
    let shown = status.render();
    assert!(
        shown.contains("partition c: the API reported 50 matching items, its pages held 40"),
        "{shown}"
    );
    let watermark = common::scalar(
        &setup.database_url(),
        "SELECT COUNT(*) FROM sync_state WHERE partition = '' AND watermark IS NOT NULL",
    )
    .await;
    assert_eq!(watermark, 0, "the next run is a full pass again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_a_datetime_is_cut_from_the_collections_extent_and_pages_it_in_parallel() {
    let clock = Arc::new(ManualClock::default());
    // Two years of items; the extent says 2020 to mid-2021, and one item is outside it.
    let mut items = items_over_time(40, 18);
    let mut late = items_over_time(41, 18).pop().expect("an item");
    late["id"] = "after-the-extent".into();
    late["properties"]["datetime"] = "2026-01-01T00:00:00Z".into();
    items.push(late);
    let engine = Engine::default();
    let server = engine.clone().start(&items, &clock).await;
    let mut collection = stac::Collection::new("c", "test collection");
    collection.extent.temporal.interval = vec![[
        Some("2020-01-01T00:00:00Z".parse().expect("instant")),
        Some("2021-06-01T00:00:00Z".parse().expect("instant")),
    ]];
    server
        .backend
        .clone()
        .add_collection(collection)
        .await
        .expect("collection");
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = setup(&server, dir.path());

    let summary = setup.run(clock.clone()).await;

    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    assert_eq!(stored_items(&setup.database_url()).await.len(), 41);
    let manifest = std::fs::read_dir(setup.objects_dir().join("_runs"))
        .expect("manifests")
        .next()
        .expect("a manifest")
        .expect("entry");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(manifest.path()).expect("read")).expect("JSON");
    let windows: Vec<&str> = manifest["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["query"]["body"]["datetime"].as_str().unwrap_or("none"))
        .collect();
    // The extent's two calendar years, cut finer to the 4 requests in flight, then opened at
    // both ends: nothing outside a stale extent is left out.
    assert_eq!(windows.len(), 5, "{windows:?}");
    assert_eq!(windows[0], "../2020-01-01T00:00:00Z");
    assert_eq!(windows[4], "2021-01-01T00:00:00Z/..");
    for pair in windows.windows(2) {
        let end = pair[0].split_once('/').expect("interval").1;
        assert!(pair[1].starts_with(&format!("{end}/")), "{windows:?}");
    }
}

/// `items` with `properties.updated` set to `updated`.
fn updated_at(mut items: Vec<Value>, updated: &str) -> Vec<Value> {
    for item in &mut items {
        item["properties"]["updated"] = updated.into();
    }
    items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_fetches_again_an_old_item_whose_updated_changed_that_a_datetime_pass_missed() {
    let clock = Arc::new(ManualClock::default());
    let before = updated_at(items_over_time(30, 18), "2024-01-01T00:00:00Z");
    let engine = Engine {
        fields: true,
        ..Engine::default()
    };
    let server = engine.start(&before, &clock).await;
    let port = server.port();
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, token_url) = (server.url.clone(), server.token_url.clone());
    let setup = Setup {
        job_extra: "incremental = \"datetime\"",
        ..setup_at(&url, &token_url, dir.path())
    };
    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    server.stop().await;
    // Reprocessed upstream: an item acquired in 2020, far behind the datetime pass's lookback.
    let mut after = before.clone();
    after[3]["properties"]["updated"] = "2026-06-01T00:00:00Z".into();
    after[3]["properties"]["processing:version"] = "05.11".into();
    let requests = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let log = requests.clone();
    let engine = Engine {
        fields: true,
        ..Engine::default()
    };
    let layer = engine.clone();
    let server = common::stac::start_with(
        &after,
        Issuer::new(clock.clone(), "id", "secret"),
        port,
        move |router| {
            router
                .layer(axum::middleware::from_fn_with_state(layer, engine_layer))
                .layer(axum::middleware::from_fn_with_state(log, log_searches))
        },
    )
    .await;
    let _ = engine.backend.set(server.backend.clone());
    let stored = |id: &str| {
        let url = setup.database_url();
        let key = ("c".to_string(), id.to_string());
        async move {
            let stored = stored_items(&url).await.remove(&key).expect("stored");
            let item: Value = serde_json::from_str(&stored).expect("JSON");
            item["properties"]["updated"].clone()
        }
    };
    let id = after[3]["id"].as_str().expect("id").to_string();

    let incremental = setup.run(clock.clone()).await;
    assert_eq!(
        incremental.jobs[0].counts.changed, 0,
        "the datetime pass cannot see it"
    );
    assert_eq!(stored(&id).await, "2024-01-01T00:00:00Z");
    let searches_before = requests.lock().expect("lock").len();

    let reconciled = setup.reconcile(clock.clone()).await;

    assert_eq!(
        reconciled.exit(),
        Exit::Success,
        "{:?}",
        reconciled.jobs[0].error
    );
    let counts = &reconciled.jobs[0].counts;
    assert_eq!((counts.changed, counts.deleted), (1, 0), "{counts:?}");
    assert_eq!(stored(&id).await, "2026-06-01T00:00:00Z");
    let searches = requests.lock().expect("lock")[searches_before..].to_vec();
    // The run's datetime pass, the sweep's three pages of ids, and one search for the changed
    // item, whole.
    let whole: Vec<&Value> = searches
        .iter()
        .filter(|s| s.get("fields").is_none() && s.get("datetime").is_none())
        .collect();
    assert_eq!(whole.len(), 1, "{searches:?}");
    assert_eq!(whole[0]["ids"], serde_json::json!([id]));
}

/// Records every search body.
async fn log_searches(
    axum::extract::State(log): axum::extract::State<Arc<std::sync::Mutex<Vec<Value>>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.uri().path() != "/search" {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    if let Ok(body) = serde_json::from_slice(&bytes)
        && let Ok(mut log) = log.lock()
    {
        log.push(body);
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// A splitting engine serving `items`, a folder, and a new Postgres database.
async fn splitting_on_postgres(
    items: &[Value],
    clock: &Arc<ManualClock>,
) -> (Engine, common::stac::StacServer, tempfile::TempDir, String) {
    let engine = Engine::splitting();
    let server = engine.clone().start(items, clock).await;
    let dir = tempfile::tempdir().expect("tempdir");
    (engine, server, dir, common::fresh_postgres().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_postgres_share_the_halves_of_the_partitions_they_split() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    let clock = Arc::new(ManualClock::default());
    let items = items_over_time(100, 18);
    let (engine, server, dir, database) = splitting_on_postgres(&items, &clock).await;
    let setup = Setup {
        job_extra: SPLIT_PAST_20,
        database: Some(database),
        ..setup(&server, dir.path())
    };
    let config = setup.config();
    let worker = || stac_sync::run::run(&config, as_worker(&clock));

    let (a, b) = tokio::join!(worker(), worker());

    let (a, b) = (a.expect("recorded"), b.expect("recorded"));
    assert_eq!(a.exit(), Exit::Success, "{:?}", a.jobs[0].error);
    assert_eq!(b.exit(), Exit::Success, "{:?}", b.jobs[0].error);
    let (a, b) = (&a.jobs[0].counts, &b.jobs[0].counts);
    assert_eq!(a.new + b.new, 100, "{a:?} {b:?}");
    assert!(a.splits + b.splits >= 3, "{a:?} {b:?}");
    assert_eq!(stored_items(&setup.database_url()).await.len(), 100);
    assert_eq!(engine.refused.load(Ordering::SeqCst), 0);
    let left = common::scalar(
        &setup.database_url(),
        "SELECT COUNT(*) FROM sync_state WHERE kind = 'sync'",
    )
    .await;
    assert_eq!(left, 0, "the pass ended");
    // A single run into another Postgres database splits alike and stores the same.
    let single_dir = tempfile::tempdir().expect("tempdir");
    let single = Setup {
        database: Some(common::fresh_postgres().await),
        ..setup_at(&server.url, &server.token_url, single_dir.path())
    };
    let single = Setup {
        job_extra: setup.job_extra,
        ..single
    };
    let summary = single.run(clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    assert_eq!(summary.jobs[0].counts.splits, 7);
    assert_eq!(
        stored_items(&single.database_url()).await,
        stored_items(&setup.database_url()).await
    );
}

/// A worker renews its leases on a timer while its pagers run. A split holds its partition's
/// row until it commits, and the renewal waits on that row: the worker has to go on driving the
/// split while it renews, or each waits on the other for ever. Here each half's row takes
/// longer to insert than the renewal period, so renewals fall inside splits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_renews_its_leases_during_a_split_does_not_wait_on_itself() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    let clock = Arc::new(ManualClock::default());
    let items = items_over_time(30, 18);
    let (_, server, dir, database) = splitting_on_postgres(&items, &clock).await;
    let setup = Setup {
        job_extra: SPLIT_PAST_20,
        database: Some(database),
        ..setup(&server, dir.path())
    };
    let url = setup.database_url();
    stac_sync::mirror::db::Database::connect(&url)
        .await
        .expect("db")
        .migrate()
        .await
        .expect("migrate");
    // A half's row is inserted after its partition's row is marked split, in the same
    // transaction; the renewal period is at most a second.
    common::execute(
        &url,
        "CREATE FUNCTION slow_halves() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF EXISTS (SELECT 1 FROM sync_state WHERE job = NEW.job AND split) THEN \
         PERFORM pg_sleep(1.5); END IF; RETURN NEW; END $$",
    )
    .await;
    common::execute(
        &url,
        "CREATE TRIGGER slow_halves BEFORE INSERT ON sync_state \
         FOR EACH ROW EXECUTE FUNCTION slow_halves()",
    )
    .await;
    let config = setup.config();
    let run = stac_sync::run::run(&config, as_worker(&clock));

    // A guard against the hang this test is about, not a wait: the run takes seconds.
    let summary = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("the worker ends instead of waiting on its own split")
        .expect("recorded");

    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    let counts = &summary.jobs[0].counts;
    assert_eq!(counts.new, 30, "{counts:?}");
    assert!(counts.splits >= 1, "{counts:?}");
    assert_eq!(stored_items(&url).await.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_while_it_splits_partitions_converges_to_an_uninterrupted_one() {
    let clock = Arc::new(ManualClock::default());
    let items = items_over_time(200, 9);
    let engine = Engine {
        delay: std::time::Duration::from_millis(15),
        ..Engine::splitting()
    };
    let server = engine.clone().start(&items, &clock).await;
    let job = SPLIT_PAST_20;
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let reference = Setup {
        job_extra: job,
        ..setup(&server, reference_dir.path())
    };
    assert_eq!(reference.run(clock.clone()).await.exit(), Exit::Success);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("stac-sync.toml"),
        format!(
            "api_url = \"{}\"\n[[jobs]]\nname = \"test\"\ncollections = [\"c\"]\nlimit = 10\n{job}\n",
            server.url
        ),
    )
    .expect("config");
    let binary = assert_cmd::cargo::cargo_bin!("stac-sync");
    let run = || common::binary_run(binary, dir.path(), &server.token_url);
    common::kill_runs(run, &engine.searches, 4, 2..=6).await;
    let database = format!("sqlite://{}", dir.path().join("stac-sync.db").display());
    let split_when_killed =
        common::scalar(&database, "SELECT COUNT(*) FROM sync_state WHERE split").await;
    let last = common::run_to_end(run()).await;

    assert_eq!(last, Some(0));
    assert!(
        split_when_killed > 0,
        "the runs were killed with splits in the plan"
    );
    assert_eq!(
        stored_items(&database).await,
        stored_items(&reference.database_url()).await
    );
    assert_eq!(stored_items(&database).await.len(), 200);
}
