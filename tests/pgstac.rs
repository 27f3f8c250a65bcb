//! The pgstac output end to end: a real STAC API (stac-server) mirrored into pgstac, served by
//! stac-fastapi-pgstac (pinned, from PyPI), and compared page by page with the source; then
//! the source changes (new, changed, moved in time and withdrawn items) and an incremental run
//! and a reconcile bring the served catalog back to equal.

mod common;

use common::tokens::Issuer;
use common::{Setup, make_items};
use serde_json::{Value, json};
use stac_sync::clock::ManualClock;
use stac_sync::error::Exit;
use stac_sync::plan::{parse_instant, rfc3339};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// `n` items of `collection` acquired every `days` days from 2021-01-01, with an `updated`.
fn items(collection: &str, n: usize, days: u64) -> Vec<Value> {
    let start = parse_instant("2021-01-01T00:00:00Z").expect("instant");
    make_items(collection, n)
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            let at = start + Duration::from_secs(i as u64 * days * 86_400 + 3600);
            let properties = item["properties"].as_object_mut().expect("properties");
            properties.remove("start_datetime");
            properties.remove("end_datetime");
            properties.insert("datetime".into(), rfc3339(at).into());
            properties.insert("updated".into(), "2024-06-01T00:00:00Z".into());
            item
        })
        .collect()
}

/// stac-fastapi-pgstac serving the pgstac database `database` (a URL), stopped when dropped.
struct Served {
    child: std::process::Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(database: &str) -> Served {
    let parsed = url::Url::parse(database).expect("database URL");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = std::process::Command::new("python3")
        .args([
            "-m",
            "uvicorn",
            "stac_fastapi.pgstac.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .env("PGUSER", parsed.username())
        .env("PGPASSWORD", parsed.password().unwrap_or("unused"))
        .env("PGHOST", parsed.host_str().expect("host"))
        .env("PGPORT", parsed.port().unwrap_or(5432).to_string())
        .env("PGDATABASE", parsed.path().trim_start_matches('/'))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("stac-fastapi-pgstac starts (scripts/test installs it)");
    let served = Served {
        child,
        url: format!("http://127.0.0.1:{port}/"),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if reqwest::get(&served.url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return served;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stac-fastapi-pgstac did not answer"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client of an API: with a bearer token from `token_url` if given.
struct Client {
    http: reqwest::Client,
    root: String,
    token: Option<String>,
}

impl Client {
    async fn new(root: &str, token_url: Option<&str>) -> Client {
        let token = match token_url {
            Some(url) => Some(common::tokens::fetch(url).await),
            None => None,
        };
        Client {
            http: reqwest::Client::new(),
            root: root.to_string(),
            token,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Value {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.expect("request");
        assert!(response.status().is_success(), "{response:?}");
        response.json().await.expect("JSON")
    }

    /// Every item of `POST /search` over one collection, following the next links, by id,
    /// without their links (each server makes its own); and the pages it took.
    async fn search(&self, collection: &str) -> (BTreeMap<String, Value>, usize) {
        let mut items = BTreeMap::new();
        let mut body = json!({"collections": [collection], "limit": 7});
        let mut url = format!("{}search", self.root);
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages < 100, "paging does not end");
            let page = self.send(self.http.post(&url).json(&body)).await;
            for mut item in page["features"].as_array().expect("features").clone() {
                item.as_object_mut().expect("object").remove("links");
                let id = item["id"].as_str().expect("id").to_string();
                assert!(items.insert(id.clone(), item).is_none(), "{id} twice");
            }
            let next = page["links"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["rel"] == "next");
            let Some(next) = next else {
                return (items, pages);
            };
            url = next["href"].as_str().expect("href").to_string();
            if let Some(next_body) = next.get("body") {
                body = match next["merge"].as_bool() {
                    Some(true) => {
                        let mut merged = body.clone();
                        for (k, v) in next_body.as_object().expect("object") {
                            merged[k] = v.clone();
                        }
                        merged
                    }
                    _ => next_body.clone(),
                };
            }
        }
    }

    /// `/collections/{id}` without its links.
    async fn collection(&self, id: &str) -> Value {
        let mut doc = self
            .send(self.http.get(format!("{}collections/{id}", self.root)))
            .await;
        doc.as_object_mut().expect("object").remove("links");
        doc
    }
}

/// Compares what stac-fastapi-pgstac serves with the source, collection by collection.
async fn assert_served_equals_source(source: &Client, served: &Client, collections: &[&str]) {
    for collection in collections {
        let (expected, _) = source.search(collection).await;
        let (got, pages) = served.search(collection).await;
        assert!(pages > 1, "served in several pages");
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{collection}: the same items"
        );
        for (id, item) in &expected {
            assert_eq!(&got[id], item, "{collection}/{id}");
        }
        assert_eq!(
            served.collection(collection).await,
            source.collection(collection).await,
            "{collection}: the collection document"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stac_fastapi_pgstac_serves_the_mirror_as_the_source_serves_it() {
    if common::skip_without(common::Service::Pgstac) {
        return;
    }
    let clock = Arc::new(ManualClock::default());
    let mut source_items = items("s2", 30, 40);
    source_items.extend(items("s1", 20, 61));
    let server =
        common::stac::start(&source_items, Issuer::new(clock.clone(), "id", "secret")).await;
    let database = common::fresh_pgstac().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, token_url) = (server.url.clone(), server.token_url.clone());
    let setup = Setup {
        limit: 10,
        top: "database_format = \"pgstac\"",
        database: Some(database.clone()),
        ..Setup::new(
            &url,
            dir.path(),
            &["s2", "s1"],
            common::credentials(&token_url, "id", "secret"),
        )
    };
    let checked = stac_sync::ops::check::check(&setup.config(), clock.clone()).await;
    let pgstac = checked
        .probes
        .iter()
        .find(|p| p.check == "pgstac")
        .unwrap_or_else(|| panic!("no pgstac probe in {}", checked.render()));
    assert_eq!(
        (pgstac.result.to_string().as_str(), pgstac.detail.as_str()),
        (
            "pass",
            "pgstac 0.10.0; this role may write items and collections"
        )
    );
    let backfill = setup.run(clock.clone()).await;
    assert_eq!(
        backfill.exit(),
        Exit::Success,
        "{:?} {:?} {:?}",
        backfill.jobs[0].error,
        backfill.jobs[0].counts,
        common::quarantined(&database).await
    );
    assert_eq!(backfill.jobs[0].counts.new, 50);
    let served = serve(&database).await;
    let served_client = Client::new(&served.url, None).await;

    assert_served_equals_source(
        &Client::new(&url, Some(&token_url)).await,
        &served_client,
        &["s2", "s1"],
    )
    .await;

    // The source changes: one new item, one changed (its datetime moves it two years on, to
    // another pgstac partition), two withdrawn.
    let mut changed = source_items.clone();
    let moved = changed[3]["id"].as_str().expect("id").to_string();
    changed[3]["properties"]["datetime"] = "2023-07-01T00:00:00Z".into();
    changed[3]["properties"]["eo:cloud_cover"] = json!(1.5);
    changed[3]["properties"]["updated"] = "2026-01-01T00:00:00Z".into();
    let key = |item: &Value| (item["collection"].clone(), item["id"].clone());
    let withdrawn = [key(&changed[10]), key(&changed[35])];
    changed.retain(|i| !withdrawn.contains(&key(i)));
    let mut new = items("s2", 31, 40).pop().expect("an item");
    new["id"] = "s2-new".into();
    new["properties"]["datetime"] = rfc3339(SystemTime::now() - Duration::from_secs(3600)).into();
    changed.push(new);
    let server = server.restart_with(&changed).await;

    let incremental = setup.run(clock.clone()).await;
    assert_eq!(incremental.exit(), Exit::Success);
    assert_eq!(incremental.jobs[0].counts.new, 1, "the new item");
    let reconciled = setup.reconcile(clock.clone()).await;
    assert_eq!(
        reconciled.exit(),
        Exit::Success,
        "{:?}",
        reconciled.jobs[0].error
    );
    let tombstoned: Vec<(String, String)> = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&database).await.expect("db");
        sqlx::query_as("SELECT collection, id FROM stac_sync.items WHERE deleted_at IS NOT NULL")
            .fetch_all(&mut conn)
            .await
            .expect("rows")
    };
    let counts = &reconciled.jobs[0].counts;
    assert_eq!(
        (counts.changed, counts.deleted),
        (1, 2),
        "{tombstoned:?} vs withdrawn {withdrawn:?}"
    );

    assert_served_equals_source(
        &Client::new(&url, Some(&token_url)).await,
        &served_client,
        &["s2", "s1"],
    )
    .await;
    let moved_item = served_client
        .send(
            served_client
                .http
                .get(format!("{}collections/s2/items/{moved}", served.url)),
        )
        .await;
    assert_eq!(moved_item["properties"]["datetime"], "2023-07-01T00:00:00Z");
    let deleted_here = common::scalar(
        &database,
        "SELECT COUNT(*) FROM stac_sync.items WHERE deleted_at IS NOT NULL",
    )
    .await;
    assert_eq!(
        deleted_here, 2,
        "remembered as deleted in stac-sync's schema"
    );
    server.stop().await;
}

/// Answers each search 15 ms late and counts them, so that kills land mid-run.
async fn slow_and_counted(
    axum::extract::State(searches): axum::extract::State<Arc<std::sync::atomic::AtomicUsize>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.uri().path() == "/search" {
        tokio::time::sleep(Duration::from_millis(15)).await;
        searches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    next.run(request).await
}

/// `(collection, id, content)` of pgstac's items, hydrated.
async fn pgstac_items(database: &str) -> Vec<(String, String, Value)> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(database).await.expect("db");
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT collection, id, CAST(pgstac.get_item(id, collection) AS TEXT) FROM pgstac.items \
         ORDER BY collection, id",
    )
    .fetch_all(&mut conn)
    .await
    .expect("pgstac items");
    rows.into_iter()
        .map(|(c, i, content)| (c, i, serde_json::from_str(&content).expect("JSON")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_into_pgstac_killed_at_random_instants_converges_to_an_uninterrupted_one() {
    use std::sync::atomic::AtomicUsize;
    if common::skip_without(common::Service::Pgstac) {
        return;
    }
    let clock = Arc::new(ManualClock::default());
    let mut source_items = items("s2", 300, 5);
    source_items.extend(items("s1", 200, 7));
    let searches = Arc::new(AtomicUsize::new(0));
    let counter = searches.clone();
    let server = common::stac::start_with(
        &source_items,
        Issuer::new(clock.clone(), "id", "secret"),
        0,
        move |router| {
            router.layer(axum::middleware::from_fn_with_state(
                counter,
                slow_and_counted,
            ))
        },
    )
    .await;
    let reference_db = common::fresh_pgstac().await;
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let reference = Setup {
        limit: 20,
        top: "database_format = \"pgstac\"",
        database: Some(reference_db.clone()),
        ..Setup::new(
            &server.url,
            reference_dir.path(),
            &["s2", "s1"],
            common::credentials(&server.token_url, "id", "secret"),
        )
    };
    assert_eq!(reference.run(clock.clone()).await.exit(), Exit::Success);

    let database = common::fresh_pgstac().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("stac-sync.toml"),
        format!(
            "api_url = \"{}\"\ndatabase_url = \"{database}\"\ndatabase_format = \"pgstac\"\n\
             [[jobs]]\nname = \"test\"\ncollections = [\"s2\", \"s1\"]\nlimit = 20\n",
            server.url
        ),
    )
    .expect("config");
    let binary = assert_cmd::cargo::cargo_bin!("stac-sync");
    let run = || common::binary_run(binary, dir.path(), &server.token_url);
    common::kill_runs(run, &searches, 5, 2..=5).await;
    let last = common::run_to_end(run()).await;

    assert_eq!(last, Some(0));
    let (got, expected) = (
        pgstac_items(&database).await,
        pgstac_items(&reference_db).await,
    );
    assert_eq!(got.len(), 500);
    assert_eq!(
        got, expected,
        "pgstac holds what an uninterrupted run put there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_a_job_into_pgstac_and_leave_what_a_single_run_leaves() {
    if common::skip_without(common::Service::Pgstac) {
        return;
    }
    let clock = Arc::new(ManualClock::default());
    let mut source_items = items("s2", 120, 9);
    source_items.extend(items("s1", 80, 13));
    let server =
        common::stac::start(&source_items, Issuer::new(clock.clone(), "id", "secret")).await;
    let setup = |database: String, dir: &std::path::Path| -> stac_sync::config::Config {
        Setup {
            limit: 10,
            top: "database_format = \"pgstac\"",
            job_extra: "datetime = \"2021-01-01T00:00:00Z/2025-01-01T00:00:00Z\"\nwindow = \"year\"",
            database: Some(database),
            ..Setup::new(
                &server.url,
                dir,
                &["s2", "s1"],
                common::credentials(&server.token_url, "id", "secret"),
            )
        }
        .config()
    };
    let (dir, single_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (shared_db, single_db) = (common::fresh_pgstac().await, common::fresh_pgstac().await);
    let config = setup(shared_db.clone(), dir.path());
    let worker = || {
        stac_sync::run::run(
            &config,
            stac_sync::run::RunOptions {
                clock: clock.clone(),
                worker: true,
                ..Default::default()
            },
        )
    };

    let (a, b, c) = tokio::join!(worker(), worker(), worker());

    for summary in [a, b, c] {
        let summary = summary.expect("recorded");
        assert_eq!(
            summary.exit(),
            Exit::Success,
            "{:?} {:?}",
            summary.jobs[0].error,
            summary.jobs[0].counts
        );
    }
    let single = stac_sync::run::run(
        &setup(single_db.clone(), single_dir.path()),
        stac_sync::run::RunOptions {
            clock: clock.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("recorded");
    assert_eq!(single.exit(), Exit::Success);
    let shared = pgstac_items(&shared_db).await;
    assert_eq!(shared.len(), 200);
    assert_eq!(shared, pgstac_items(&single_db).await);
}

/// The items of a comparison with pypgstac: real EDS items, in two months, with what makes
/// dehydration hard: assets the collection's `item_assets` lists and the item lacks (the
/// do-not-merge marker), asset fields that differ from the base, nulls and empty lists (where
/// the base has a value and where it has none), nested arrays, a `private` member, a datetime
/// range, a 3D geometry, and numbers of 17 significant digits.
fn hard_items() -> (Value, Vec<Value>) {
    let base = common::eds_items();
    let first = &base[0];
    let mut item_assets = serde_json::Map::new();
    for (key, asset) in first["assets"].as_object().expect("assets") {
        let mut asset = asset.clone();
        if let Some(asset) = asset.as_object_mut() {
            asset.remove("href");
            asset.insert("x:scale".into(), json!(2.5));
        }
        item_assets.insert(key.clone(), asset);
    }
    item_assets.insert(
        "never-on-items".into(),
        json!({"type": "image/tiff", "roles": ["data"], "title": "Listed, never present"}),
    );
    let collection = json!({
        "type": "Collection", "stac_version": "1.0.0", "id": "s2-hard",
        "description": "items that are hard to dehydrate", "license": "proprietary",
        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                   "temporal": {"interval": [["2024-01-01T00:00:00Z", null]]}},
        "links": [], "item_assets": item_assets,
    });
    let items = (0..40)
        .map(|i| {
            let datetime = format!("2024-{:02}-{:02}T10:{i:02}:00Z", 1 + i % 2, 1 + i % 28);
            let mut item = base[i % base.len()].clone();
            item["id"] = json!(format!("hard-{i:03}"));
            item["collection"] = json!("s2-hard");
            let properties = item["properties"].as_object_mut().expect("properties");
            properties.insert("datetime".into(), json!(datetime));
            properties.insert("x:null".into(), Value::Null);
            properties.insert("x:empty".into(), json!([]));
            properties.insert("x:nested".into(), json!([[1, 2.5], [], [{"a": null}]]));
            properties.insert(
                "x:precise".into(),
                json!(0.123_456_789_012_345_67 + i as f64),
            );
            let assets = item["assets"].as_object_mut().expect("assets");
            if i % 3 == 0 {
                let key = assets.keys().next().cloned().expect("an asset");
                assets.remove(&key);
            }
            if let Some(asset) = assets.values_mut().next().and_then(Value::as_object_mut) {
                asset.insert(
                    "x:scale".into(),
                    if i % 2 == 0 { Value::Null } else { json!([]) },
                );
                asset.insert("title".into(), json!(format!("retitled {i}")));
            }
            if i % 5 == 0 {
                item["private"] = json!({"note": format!("kept out of search {i}")});
            }
            if i % 7 == 0 {
                let properties = item["properties"].as_object_mut().expect("properties");
                properties.insert("start_datetime".into(), json!("2023-12-31T00:00:00Z"));
                properties.insert("end_datetime".into(), json!(datetime));
            }
            if i % 11 == 0 {
                item["geometry"] = json!({"type": "Point", "coordinates": [2.35, 48.85, 35.5]});
            }
            item
        })
        .collect();
    (collection, items)
}

/// `source` (items of `hard_items`' collection) served by a real STAC API and mirrored by one
/// run into the pgstac database `database`, pages of 7.
async fn mirror_hard_items(source: &[Value], database: &str, dir: &std::path::Path) {
    let clock = Arc::new(ManualClock::default());
    let (collection, _) = hard_items();
    let server = common::stac::start_with_collections(
        std::slice::from_ref(&collection),
        source,
        Issuer::new(clock.clone(), "id", "secret"),
        0,
        |router| router,
    )
    .await;
    let setup = Setup {
        limit: 7,
        top: "database_format = \"pgstac\"",
        database: Some(database.to_string()),
        ..Setup::new(
            &server.url,
            dir,
            &["s2-hard"],
            common::credentials(&server.token_url, "id", "secret"),
        )
    };
    assert_eq!(setup.run(clock).await.exit(), Exit::Success);
}

/// pgstac's rows, column by column as text (content and private as pgstac's `jsonb` prints
/// them, the geometry as EWKB), by key.
async fn pgstac_columns(database: &str) -> BTreeMap<(String, String), Vec<Option<String>>> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(database).await.expect("db");
    let rows: Vec<(String, String, [Option<String>; 5])> = sqlx::query(
        "SELECT collection, id, CAST(datetime AS TEXT), CAST(end_datetime AS TEXT), \
         encode(ST_AsEWKB(geometry), 'hex'), CAST(content AS TEXT), CAST(private AS TEXT) \
         FROM pgstac.items ORDER BY collection, id",
    )
    .fetch_all(&mut conn)
    .await
    .expect("pgstac rows")
    .iter()
    .map(|row| {
        use sqlx::Row;
        let text = |n: usize| row.get::<Option<String>, _>(n);
        (
            row.get(0),
            row.get(1),
            [text(2), text(3), text(4), text(5), text(6)],
        )
    })
    .collect();
    rows.into_iter()
        .map(|(c, i, columns)| ((c, i), columns.to_vec()))
        .collect()
}

/// What stac-sync stores in pgstac is, column by column, what `pypgstac load` stores for the
/// same items (those stac-sync received) into a second pgstac database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgstac_rows_are_those_pypgstac_load_writes_for_the_same_items() {
    use sqlx::Connection;
    if common::skip_without(common::Service::Pgstac) {
        return;
    }
    let (_, source) = hard_items();
    let database = common::fresh_pgstac().await;
    let dir = tempfile::tempdir().expect("tempdir");
    mirror_hard_items(&source, &database, dir.path()).await;

    // What stac-sync received, and the collection as it stored it, loaded by pypgstac.
    let mut conn = sqlx::PgConnection::connect(&database).await.expect("db");
    let items: Vec<String> =
        sqlx::query_scalar("SELECT CAST(content AS TEXT) FROM stac_sync.items ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .expect("stored items");
    let collections: Vec<String> =
        sqlx::query_scalar("SELECT CAST(content AS TEXT) FROM pgstac.collections")
            .fetch_all(&mut conn)
            .await
            .expect("pgstac collections");
    assert_eq!(items.len(), source.len());
    // stac-sync's own rows hold each item as the bytes received (text, not jsonb, in a pgstac
    // database: pgstac's rows are the ones queried there).
    let hashes: Vec<String> =
        sqlx::query_scalar("SELECT content_hash FROM stac_sync.items ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .expect("hashes");
    for (content, hash) in items.iter().zip(&hashes) {
        assert_eq!(
            &stac_sync::stac::reader::content_hash(content.as_bytes()),
            hash
        );
    }
    std::fs::write(dir.path().join("items.ndjson"), items.join("\n")).expect("write");
    std::fs::write(
        dir.path().join("collections.ndjson"),
        collections.join("\n"),
    )
    .expect("write");
    let loaded = common::fresh_pgstac().await;
    let dsn = loaded.split('?').next().expect("a URL");
    for (table, file) in [
        ("collections", "collections.ndjson"),
        ("items", "items.ndjson"),
    ] {
        let output = std::process::Command::new("pypgstac")
            .args(["load", table, "--dsn", dsn, "--method", "upsert"])
            .arg(dir.path().join(file))
            .output()
            .expect("pypgstac runs");
        assert!(
            output.status.success(),
            "pypgstac load {table}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let (ours, theirs) = (
        pgstac_columns(&database).await,
        pgstac_columns(&loaded).await,
    );
    assert_eq!(ours.len(), source.len());
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let marked = ours
        .values()
        .filter(|row| row[3].as_deref().is_some_and(|c| c.contains("𒍟※")))
        .count();
    assert_eq!(
        marked,
        source.len(),
        "every item lacks an asset the collection lists"
    );
    for (key, row) in &ours {
        assert_eq!(
            Some(row),
            theirs.get(key),
            "item {key:?}: ours, then pypgstac's"
        );
    }
}

/// pgstac 0.9 (the last release before 0.10, which pypgstac still installs on request): no
/// versioned base items, but the same rows. Every item stac-sync stored there, hydrated back by
/// pgstac, is the item received, in a collection whose `item_assets` the items only partly
/// have (the do-not-merge marker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgstac_0_9_hydrates_every_item_back_to_the_item_received() {
    use sqlx::Connection;
    if common::skip_without(common::Service::Pgstac) {
        return;
    }
    let source: Vec<Value> = items("s2-hard", 30, 3)
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            if i % 2 == 0 {
                let assets = item["assets"].as_object_mut().expect("assets");
                let key = assets.keys().next().cloned().expect("an asset");
                assets.remove(&key);
            }
            item
        })
        .collect();
    let database = common::fresh_pgstac_at(Some("0.9.12")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    mirror_hard_items(&source, &database, dir.path()).await;
    let mut conn = sqlx::PgConnection::connect(&database).await.expect("db");
    let version: String = sqlx::query_scalar("SELECT pgstac.get_version()")
        .fetch_one(&mut conn)
        .await
        .expect("version");
    assert_eq!(version, "0.9.12");
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT id, content FROM stac_sync.items ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .expect("stored");
    let hydrated = pgstac_items(&database).await;
    assert_eq!(hydrated.len(), source.len());
    let marked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgstac.items WHERE CAST(content AS TEXT) LIKE '%𒍟※%'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("count");
    assert_eq!(
        marked,
        source.len() as i64,
        "every item lacks an asset the collection lists"
    );
    for ((id, content), (_, served_id, served)) in stored.iter().zip(&hydrated) {
        assert_eq!(id, served_id);
        let received: Value = serde_json::from_str(content).expect("JSON");
        assert_eq!(served, &received, "pgstac 0.9 serves item {id} as received");
    }
}
