//! Passes after the backfill: what they fetch, what reconcile removes, and the cap on requests
//! in flight. Against a real STAC API (stac-server) where it can do it, the fixture otherwise.

mod common;

use common::fixture::{self, Fault, Paging};
use common::tokens::Issuer;
use common::{Setup, make_items, stored_items, stored_objects};
use serde_json::{Value, json};
use stac_sync::clock::ManualClock;
use stac_sync::config::EnvVars;
use stac_sync::error::Exit;
use stac_sync::mirror::db::Database;
use stac_sync::plan::{parse_instant, rfc3339};
use stac_sync::run::{self, RunOptions, Summary};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn env(token_url: &str) -> EnvVars {
    common::credentials(token_url, "id", "secret")
}

/// An EDS item with this id number, acquisition time and a version mark in its properties.
fn item(number: usize, datetime: SystemTime, version: u32) -> Value {
    let mut item = make_items("s2", number + 1).pop().expect("an item");
    let properties = item["properties"].as_object_mut().expect("properties");
    properties.remove("start_datetime");
    properties.remove("end_datetime");
    properties.insert("datetime".into(), rfc3339(datetime).into());
    properties.insert("updated".into(), rfc3339(SystemTime::now()).into());
    properties.insert("version".into(), version.into());
    item
}

/// The fixture API serving `pages` pages of `per_page` items of collection s2.
async fn fixture_with(pages: usize, per_page: usize, clock: &Arc<ManualClock>) -> fixture::Fixture {
    let pages: Vec<Vec<Value>> = (0..pages)
        .map(|p| {
            (0..per_page)
                .map(|i| item(p * per_page + i, SystemTime::now(), 1))
                .collect()
        })
        .collect();
    fixture::start(
        pages,
        Paging::PostFull,
        Issuer::new(clock.clone(), "id", "secret"),
    )
    .await
}

/// A backfill then a later pass of one job (`job` its extra keys) over collection s2: every
/// search request the server received, how many the backfill made, and its watermark.
async fn two_passes(
    server: &fixture::Fixture,
    clock: &Arc<ManualClock>,
    job: &str,
) -> (Vec<Value>, usize, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        job_extra: job,
        ..Setup::new(&server.url, dir.path(), &["s2"], env(&server.token_url))
    };
    run(&setup, clock, false).await;
    let watermark = watermark(&setup.database_url()).await;
    let first_pass = server.state.requests.lock().expect("lock").len();
    run(&setup, clock, false).await;
    let requests = server.state.requests.lock().expect("lock").clone();
    (requests, first_pass, watermark)
}

/// Live rows (not tombstoned) by (collection, id).
async fn live_items(database_url: &str) -> BTreeMap<(String, String), String> {
    let sql = "SELECT collection, id, CAST(content AS TEXT) FROM items WHERE deleted_at IS NULL";
    let rows: Vec<(String, String, String)> =
        match Database::connect(database_url).await.expect("db") {
            Database::Sqlite(db) => sqlx::query_as(sql).fetch_all(db.pool()).await,
            Database::Postgres(db) => sqlx::query_as(sql).fetch_all(db.pool()).await,
        }
        .expect("rows");
    rows.into_iter().map(|(c, i, x)| ((c, i), x)).collect()
}

fn without_runs(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    let mut objects = stored_objects(dir);
    objects.retain(|k, _| !k.starts_with('_'));
    objects
}

async fn run(setup: &Setup<'_>, clock: &Arc<ManualClock>, reconcile: bool) -> Summary {
    let summary = run::run(
        &setup.config(),
        RunOptions {
            clock: clock.clone(),
            reconcile,
            ..RunOptions::default()
        },
    )
    .await
    .expect("the run is recorded");
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_runs_fetch_only_what_changed_and_reconcile_tombstones_what_vanished() {
    let clock = Arc::new(ManualClock::default());
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    // 50 items acquired over five past years, 10 in the last three days.
    let mut source: Vec<Value> = (0..50)
        .map(|n| {
            let at = format!("{}-03-{:02}T10:00:00Z", 2021 + n / 10, 1 + n % 10);
            item(n, parse_instant(&at).expect("instant"), 1)
        })
        .collect();
    source.extend((50..60).map(|n| item(n, now - day * 3 + day / 4 * (n as u32 - 50), 1)));
    let issuer = Issuer::new(clock.clone(), "id", "secret");
    let server = common::stac::start(&source, issuer.clone()).await;
    let (url, token_url) = (server.url.clone(), server.token_url.clone());
    let port: u16 = url::Url::parse(&url).expect("url").port().expect("port");
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        limit: 5,
        job_extra: "datetime = \"2021-01-01T00:00:00Z/..\"\ndeleted_objects = \"delete\"",
        ..Setup::new(&url, dir.path(), &["s2"], env(&token_url))
    };

    let backfill = run(&setup, &clock, false).await;

    // Upstream, between runs: 5 items published, 3 recent ones reprocessed, 2 old and 2
    // recent ones withdrawn.
    let withdrawn = [12, 17, 51, 58];
    let mut changed: Vec<Value> = source
        .iter()
        .enumerate()
        .filter(|(n, _)| !withdrawn.contains(n))
        .map(|(n, item)| {
            if [52, 53, 55].contains(&n) {
                let mut item = item.clone();
                item["properties"]["version"] = 2.into();
                item["properties"]["updated"] = rfc3339(SystemTime::now()).into();
                item
            } else {
                item.clone()
            }
        })
        .collect();
    changed.extend((60..65).map(|n| item(n, now - Duration::from_secs(3600), 1)));
    server.stop().await;
    let server = common::stac::start_with(&changed, issuer, port, |r| r).await;
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let reference = Setup {
        dir: reference_dir.path(),
        job_extra: setup.job_extra,
        ..Setup::new(
            &server.url,
            reference_dir.path(),
            &["s2"],
            env(&server.token_url),
        )
    };
    run(&reference, &clock, false).await;

    let incremental = run(&setup, &clock, false).await;
    let after_incremental = live_items(&setup.database_url()).await;
    let reconciled = run(&setup, &clock, true).await;

    // The backfill pages six yearly windows, two pages each; the incremental pass one
    // window of the last week: 13 items in pages of 5.
    let (backfill, incremental) = (&backfill.jobs[0].counts, &incremental.jobs[0].counts);
    assert_eq!(backfill.pages, 12, "{backfill:?}");
    assert!(incremental.pages <= 4, "{incremental:?}");
    assert_eq!((incremental.new, incremental.changed), (5, 3));
    let expected = stored_items(&reference.database_url()).await;
    let mut still_there = after_incremental.clone();
    for n in withdrawn {
        let id = source[n]["id"].as_str().expect("id").to_string();
        assert!(still_there.remove(&("s2".into(), id)).is_some());
    }
    assert_eq!(
        still_there, expected,
        "the incremental pass missed a change"
    );
    assert_eq!(reconciled.jobs[0].counts.deleted, 4);
    assert_eq!(live_items(&setup.database_url()).await, expected);
    assert_eq!(
        stored_items(&setup.database_url()).await.len(),
        expected.len() + 4,
        "tombstones, not deletes"
    );
    let (objects, expected) = (
        without_runs(&setup.objects_dir()),
        without_runs(&reference.objects_dir()),
    );
    assert_eq!(
        objects.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    assert!(
        objects == expected,
        "an object differs from the source's item"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_query_extension_and_no_filter_later_passes_ask_for_updates_through_query() {
    let clock = Arc::new(ManualClock::default());
    let server = fixture_with(2, 3, &clock).await;
    *server.state.conformance.lock().expect("lock") = vec![
        "https://api.stacspec.org/v1.0.0/item-search".into(),
        "https://api.stacspec.org/v1.0.0-rc.1/item-search#query".into(),
    ];
    let (requests, first_pass, watermark) = two_passes(&server, &clock, "datetime = \"2020-01-01T00:00:00Z/..\"\noverlap = \"2h\"\nquery = { \"eo:cloud_cover\" = { lt = 40 } }").await;
    assert_eq!(requests[0]["query"], json!({"eo:cloud_cover": {"lt": 40}}));
    let later = &requests[first_pass];
    let since = rfc3339(parse_instant(&watermark).expect("instant") - Duration::from_secs(7200));
    assert_eq!(
        later["query"],
        json!({"eo:cloud_cover": {"lt": 40}, "updated": {"gte": since}})
    );
    assert!(later.get("filter").is_none(), "{later}");
    assert!(later.get("sortby").is_none(), "{later}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sort_filter_and_an_updated_queryable_later_passes_ask_only_for_updates() {
    let clock = Arc::new(ManualClock::default());
    let server = fixture_with(2, 3, &clock).await;
    *server.state.conformance.lock().expect("lock") = vec![
        "https://api.stacspec.org/v1.0.0/item-search".into(),
        "https://api.stacspec.org/v1.0.0/item-search#sort".into(),
        "https://api.stacspec.org/v1.0.0/item-search#filter".into(),
    ];
    *server.state.queryables.lock().expect("lock") =
        json!({"properties": {"updated": {"type": "string", "format": "date-time"}}});
    let (requests, first_pass, watermark) = two_passes(
        &server,
        &clock,
        "datetime = \"2020-01-01T00:00:00Z/..\"\noverlap = \"2h\"",
    )
    .await;
    let backfill = &requests[0];
    assert!(backfill.get("filter").is_none(), "{backfill}");
    let later = &requests[first_pass];
    let since = rfc3339(parse_instant(&watermark).expect("instant") - Duration::from_secs(7200));
    assert_eq!(
        later["filter"],
        json!({"op": ">=", "args": [{"property": "updated"}, {"timestamp": since}]})
    );
    assert_eq!(later["filter-lang"], "cql2-json");
    assert_eq!(
        later["sortby"],
        json!([{"field": "properties.updated", "direction": "asc"}])
    );
    assert_eq!(
        later["datetime"], "2020-01-01T00:00:00Z/..",
        "one partition, the job's range"
    );
    let lag = SystemTime::now()
        .duration_since(parse_instant(&watermark).expect("instant"))
        .expect("the watermark is in the past");
    assert!(
        lag >= Duration::from_secs(300),
        "the safety lag is kept: {lag:?}"
    );
}

async fn watermark(database_url: &str) -> String {
    let sql = "SELECT watermark FROM sync_state WHERE partition = ''";
    match Database::connect(database_url).await.expect("db") {
        Database::Sqlite(db) => sqlx::query_scalar(sql).fetch_one(db.pool()).await,
        Database::Postgres(db) => sqlx::query_scalar(sql).fetch_one(db.pool()).await,
    }
    .expect("a watermark")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_on_requests_in_flight_holds_and_a_429_shrinks_it() {
    let clock = Arc::new(ManualClock::default());
    let collections = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let arrivals = |throttle: bool| {
        let clock = clock.clone();
        async move {
            let server = fixture_with(3, 2, &clock).await;
            // A slow API, so that the partitions' requests overlap.
            *server.state.delay.lock().expect("lock") = (0, Duration::from_millis(40));
            *server.state.in_searched_collection.lock().expect("lock") = true;
            if throttle {
                for _ in 0..4 {
                    let retry = vec![("retry-after".to_string(), "0".to_string())];
                    server.fault(Fault::Status(429, retry, "slow down".into()));
                }
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let setup = Setup::new(
                &server.url,
                dir.path(),
                &collections,
                env(&server.token_url),
            );
            let summary = run(&setup, &clock, false).await;
            assert_eq!(summary.jobs[0].counts.pages, 24);
            server.state.arrivals.lock().expect("lock").clone()
        }
    };

    let steady = arrivals(false).await;
    let throttled = arrivals(true).await;

    // Setup's config caps requests in flight at 4.
    let most = |a: &[(usize, bool)]| a.iter().map(|(n, _)| *n).max().unwrap_or(0);
    assert_eq!(most(&steady), 4, "{steady:?}");
    assert!(
        throttled[..4].iter().all(|(_, fault)| *fault),
        "{throttled:?}"
    );
    assert!(most(&throttled) <= 4, "{throttled:?}");
    // Four 429s took the cap down to 1; it grows by one per `cap` successes.
    assert_eq!(throttled[4].0, 1, "{throttled:?}");
    assert!(most(&throttled[4..7]) <= 2, "{throttled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_asks_only_for_ids_where_offered_and_tombstones_what_vanished() {
    let clock = Arc::new(ManualClock::default());
    let server = fixture_with(4, 3, &clock).await;
    server
        .state
        .conformance
        .lock()
        .expect("lock")
        .push("https://api.stacspec.org/v1.0.0/item-search#fields".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(&server.url, dir.path(), &["s2"], env(&server.token_url));
    run(&setup, &clock, false).await;
    // The last page's three items are withdrawn upstream.
    server.state.pages.lock().expect("lock").truncate(3);
    let before = server.state.requests.lock().expect("lock").len();

    let reconciled = run(&setup, &clock, true).await;

    let requests = server.state.requests.lock().expect("lock")[before..].to_vec();
    let sweep: Vec<&Value> = requests
        .iter()
        .filter(|r| r.get("fields").is_some())
        .collect();
    assert_eq!(sweep.len(), 3, "{requests:?}");
    assert_eq!(
        sweep[0]["fields"]["include"],
        json!(["id", "collection", "properties.updated"])
    );
    assert_eq!(reconciled.jobs[0].counts.deleted, 3);
    let live = live_items(&setup.database_url()).await;
    assert_eq!(live.len(), 9);
    assert_eq!(stored_items(&setup.database_url()).await.len(), 12);
    // Objects are kept by default.
    assert_eq!(without_runs(&setup.objects_dir()).len(), 12);
    let left = common::scalar(&setup.database_url(), "SELECT COUNT(*) FROM sync_seen").await;
    assert_eq!(left, 0, "the sweep's ids are forgotten once it ends");
}
