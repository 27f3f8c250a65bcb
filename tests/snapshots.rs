//! GeoParquet snapshots: after a run, each (collection, datetime window) it changed is
//! rewritten from the database as `{collection}/items/{window}.parquet`; windows it did not
//! change are not touched. Read back with DuckDB (the pinned Python package) and with rustac's
//! reader, against a real STAC API (stac-server).

mod common;

use common::tokens::Issuer;
use common::{Setup, make_items};
use serde_json::Value;
use stac_sync::clock::ManualClock;
use stac_sync::error::Exit;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `n` items of `collection`, the i-th acquired on `datetimes[i % len]`; odd ones carry a
/// property and an asset the others lack, and one a cloud cover written as an integer, so a
/// file's schema must hold all of them.
fn items(collection: &str, n: usize, datetimes: &[&str]) -> Vec<Value> {
    make_items(collection, n)
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            let properties = item["properties"].as_object_mut().expect("properties");
            properties.remove("start_datetime");
            properties.remove("end_datetime");
            properties.insert("datetime".into(), datetimes[i % datetimes.len()].into());
            if i % 2 == 1 {
                properties.insert("extra:note".into(), format!("note {i}").into());
                item["assets"]["extra"] = serde_json::json!({"href": "s3://b/extra.tif"});
            }
            if i == 2 {
                item["properties"]["eo:cloud_cover"] = 10.into();
            }
            item
        })
        .collect()
}

/// An item with no `datetime` but a `start_datetime` (an interval): its window is its start.
fn interval_item(collection: &str, id: &str, start: &str) -> Value {
    let mut item = make_items(collection, 1).remove(0);
    item["id"] = id.into();
    item["properties"]["datetime"] = Value::Null;
    item["properties"]["start_datetime"] = start.into();
    item["properties"]["end_datetime"] = start.into();
    item
}

/// Every snapshot file under `objects`, relative path → its modification time.
fn snapshot_files(objects: &Path) -> BTreeMap<String, std::time::SystemTime> {
    let mut files = BTreeMap::new();
    for collection in std::fs::read_dir(objects).expect("objects").flatten() {
        let Ok(windows) = std::fs::read_dir(collection.path().join("items")) else {
            continue;
        };
        for file in windows.flatten() {
            let path = file.path();
            let relative = path
                .strip_prefix(objects)
                .expect("below")
                .display()
                .to_string();
            files.insert(
                relative,
                file.metadata().expect("meta").modified().expect("mtime"),
            );
        }
    }
    files
}

/// DuckDB's reading of the snapshot files (tests/python/read_snapshots.py).
fn duckdb(objects: &Path) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/read_snapshots.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .arg(objects)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "DuckDB could not read the snapshots: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// Items through stac-geoparquet and back, as rustac reads them.
fn round_trip(items: Vec<stac::Item>) -> BTreeMap<String, Value> {
    let mut bytes = Vec::new();
    stac::geoparquet::into_writer(&mut bytes, items).expect("writes");
    read_back(bytes)
}

fn read_back(bytes: Vec<u8>) -> BTreeMap<String, Value> {
    stac::geoparquet::from_reader(bytes::Bytes::from(bytes))
        .expect("a stac-geoparquet file")
        .items
        .into_iter()
        .map(|item| {
            let mut value = serde_json::to_value(&item).expect("JSON");
            strip_nulls(&mut value);
            (item.id.clone(), value)
        })
        .collect()
}

/// A property or field a file holds for other items reads back as null here: absent, as in
/// the item.
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(values) => values.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Asserts that the snapshot files equal the database: per collection, the live items (each
/// as stac-geoparquet round-trips it alone), in files named by their window, each file sorted
/// by datetime then id.
async fn assert_snapshots_equal_database(setup: &Setup<'_>) {
    assert_files_equal_database(setup, &setup.objects_dir()).await;
}

/// [`assert_snapshots_equal_database`] for the files under `objects`.
async fn assert_files_equal_database(setup: &Setup<'_>, objects: &Path) {
    let objects = objects.to_path_buf();
    let stored = common::stored_items(&setup.database_url()).await;
    let live = common::pairs(
        &setup.database_url(),
        "SELECT collection, id FROM items WHERE deleted_at IS NULL",
    )
    .await;
    let mut expected: BTreeMap<String, BTreeMap<String, Vec<(String, stac::Item)>>> =
        BTreeMap::new();
    for (collection, id) in &live {
        let content = &stored[&(collection.clone(), id.clone())];
        let item: stac::Item = serde_json::from_str(content).expect("a STAC item");
        let value: Value = serde_json::from_str(content).expect("JSON");
        let properties = &value["properties"];
        let date = properties["datetime"]
            .as_str()
            .or(properties["start_datetime"].as_str())
            .expect("dated");
        expected
            .entry(collection.clone())
            .or_default()
            .entry(date[..4].to_string())
            .or_default()
            .push((date.to_string(), item));
    }
    let read = duckdb(&objects);
    let mut files = 0;
    for (collection, windows) in &expected {
        for (window, items) in windows {
            let path = objects
                .join(collection)
                .join("items")
                .join(format!("{window}.parquet"));
            let in_file = read_back(std::fs::read(&path).expect("the window's file"));
            let mut sorted: Vec<_> = items
                .iter()
                .map(|(d, i)| (d.clone(), i.id.clone()))
                .collect();
            sorted.sort();
            let order: Vec<Value> = sorted.iter().map(|(_, id)| id.clone().into()).collect();
            assert_eq!(
                read["files"][format!("{collection}/items/{window}.parquet")],
                Value::Array(order),
                "DuckDB reads {collection}/{window}: the live items, by datetime then id"
            );
            let alone = round_trip(items.iter().map(|(_, i)| i.clone()).collect());
            assert_eq!(in_file, alone, "{collection}/{window}: each item as stored");
            files += 1;
        }
        let ids: Vec<&str> = read["collections"][collection]
            .as_array()
            .expect("rows")
            .iter()
            .map(|row| row[0].as_str().expect("id"))
            .collect();
        let mut want: Vec<&str> = windows
            .values()
            .flatten()
            .map(|(_, item)| item.id.as_str())
            .collect();
        want.sort();
        assert_eq!(ids, want, "one read_parquet over {collection}'s files");
    }
    assert_eq!(
        snapshot_files(&objects).len(),
        files,
        "no other snapshot files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_equal_the_database_and_only_changed_windows_are_rewritten() {
    only_changed_windows_are_rewritten(None, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_snapshots_equal_the_database_and_only_changed_windows_are_rewritten() {
    only_changed_windows_are_rewritten(Some(common::fresh_postgres().await), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_pgstac_snapshots_equal_the_database_and_only_changed_windows_are_rewritten() {
    only_changed_windows_are_rewritten(Some(common::fresh_pgstac().await), true).await;
}

async fn only_changed_windows_are_rewritten(database: Option<String>, pgstac: bool) {
    let clock = Arc::new(ManualClock::default());
    let mut source = items(
        "s2",
        12,
        &[
            "2021-03-01T10:00:00Z",
            "2022-06-01T10:00:00Z",
            "2023-09-01T10:00:00Z",
            "2024-01-01T00:00:00Z",
        ],
    );
    source.extend(items(
        "s1",
        5,
        &["2020-05-01T00:00:00Z", "2022-02-02T00:00:00Z"],
    ));
    source.push(interval_item("s1", "s1-interval", "2020-07-01T00:00:00Z"));
    let server = common::stac::start(&source, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, token_url) = (server.url.clone(), server.token_url.clone());
    let mut setup = Setup::new(
        &url,
        dir.path(),
        &["s2", "s1"],
        common::credentials(&token_url, "id", "secret"),
    );
    setup.top = if pgstac {
        "snapshots = [\"geoparquet\"]\ndatabase_format = \"pgstac\""
    } else {
        r#"snapshots = ["geoparquet"]"#
    };
    setup.database = database;

    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    assert_snapshots_equal_database(&setup).await;
    let before = snapshot_files(&setup.objects_dir());
    assert_eq!(
        before.keys().cloned().collect::<Vec<_>>(),
        [
            "s1/items/2020.parquet",
            "s1/items/2022.parquet",
            "s2/items/2021.parquet",
            "s2/items/2022.parquet",
            "s2/items/2023.parquet",
            "s2/items/2024.parquet",
        ]
    );
    let document: Value = serde_json::from_slice(
        &std::fs::read(setup.objects_dir().join("s2/collection.json")).expect("collection.json"),
    )
    .expect("JSON");
    assert_eq!(document["assets"]["geoparquet-items"]["href"], "./items");
    assert_eq!(
        document["assets"]["geoparquet-items"]["roles"][0],
        "stac-items"
    );

    // A rerun changes nothing, so rewrites nothing.
    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    assert_eq!(snapshot_files(&setup.objects_dir()), before);

    // Upstream: a new item in 2023, an item of 2021 moved to 2022, one of s1's 2022 items
    // withdrawn. s2's 2024 and s1's 2020 windows hold none of them.
    let mut changed = source.clone();
    let mut new = changed[2].clone();
    new["id"] = "s2-new".into();
    changed.push(new);
    let moved = changed
        .iter_mut()
        .find(|i| i["properties"]["datetime"] == "2021-03-01T10:00:00Z")
        .expect("an item of 2021");
    moved["properties"]["datetime"] = "2022-12-31T23:00:00Z".into();
    let withdrawn = changed
        .iter()
        .position(|i| {
            i["collection"] == "s1" && i["properties"]["datetime"] == "2022-02-02T00:00:00Z"
        })
        .expect("an s1 item of 2022");
    changed.remove(withdrawn);
    let server = server.restart_with(&changed).await;
    assert_eq!(setup.reconcile(clock.clone()).await.exit(), Exit::Success);
    assert_snapshots_equal_database(&setup).await;
    let after = snapshot_files(&setup.objects_dir());
    let rewritten: Vec<&str> = after
        .iter()
        .filter(|(file, time)| before.get(*file) != Some(time))
        .map(|(file, _)| file.as_str())
        .collect();
    assert_eq!(
        rewritten,
        [
            "s1/items/2022.parquet",
            "s2/items/2021.parquet",
            "s2/items/2022.parquet",
            "s2/items/2023.parquet",
        ],
        "exactly the windows that changed"
    );
    assert_eq!(
        common::scalar(&setup.database_url(), "SELECT COUNT(*) FROM snapshot_due").await,
        0
    );
    server.stop().await;
}

/// The source of the durability tests: two collections over several years, items of 15 KB.
fn source() -> Vec<Value> {
    let base = common::eds_items().remove(0);
    let mut all: Vec<Value> = (0..400)
        .map(|i| {
            let datetime = format!("{}-0{}-01T00:00:00Z", 2019 + i % 6, 1 + i % 9);
            common::realistic_item(&base, &format!("s2-{i:04}"), "s2", &datetime)
        })
        .collect();
    all.extend(items(
        "s1",
        30,
        &["2020-05-01T00:00:00Z", "2022-02-02T00:00:00Z"],
    ));
    all
}

/// A run that fails while writing snapshots (here: a window's folder cannot be created)
/// leaves those windows due and still writes the others; the next run writes them, equal to
/// the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_a_failed_run_did_not_write_are_written_by_the_next() {
    let clock = Arc::new(ManualClock::default());
    let server = common::stac::start(&source(), Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new(
        &server.url,
        dir.path(),
        &["s2", "s1"],
        common::credentials(&server.token_url, "id", "secret"),
    );
    setup.top = r#"snapshots = ["geoparquet"]"#;
    setup.limit = 50;
    let blocker = setup.objects_dir().join("s2/items");
    std::fs::create_dir_all(setup.objects_dir().join("s2")).expect("folder");
    std::fs::write(&blocker, "not a folder").expect("blocker");

    let failed = setup.run(clock.clone()).await;
    assert_ne!(failed.exit(), Exit::Success);
    let due = common::scalar(&setup.database_url(), "SELECT COUNT(*) FROM snapshot_due").await;
    assert!(due >= 6, "s2's windows stay due: {due}");
    for window in ["2020", "2022"] {
        assert!(
            setup
                .objects_dir()
                .join(format!("s1/items/{window}.parquet"))
                .is_file(),
            "s1's window {window} is written though s2's cannot be"
        );
    }

    std::fs::remove_file(&blocker).expect("unblock");
    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    assert_snapshots_equal_database(&setup).await;
    assert_eq!(
        common::scalar(&setup.database_url(), "SELECT COUNT(*) FROM snapshot_due").await,
        0
    );
    server.stop().await;
}

/// The binary SIGKILLed while it writes snapshot files (as soon as one appears), then run
/// again: the files equal the database, and nothing half-written is left in the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_while_writing_snapshots_leaves_them_to_the_next() {
    let clock = Arc::new(ManualClock::default());
    let server = common::stac::start(&source(), Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new(
        &server.url,
        dir.path(),
        &["s2", "s1"],
        common::credentials(&server.token_url, "id", "secret"),
    );
    setup.top = r#"snapshots = ["geoparquet"]"#;
    setup.limit = 50;
    std::fs::write(
        dir.path().join("stac-sync.toml"),
        format!(
            "api_url = \"{}\"\ndatabase_url = \"{}\"\nobject_store_url = \"{}\"\n\
             snapshots = [\"geoparquet\"]\n[[jobs]]\nname = \"test\"\n\
             collections = [\"s2\", \"s1\"]\nlimit = 50\n",
            server.url,
            setup.database_url(),
            setup.object_store_url()
        ),
    )
    .expect("config");
    let binary = assert_cmd::cargo::cargo_bin!("stac-sync");
    let objects = setup.objects_dir();
    let mut child = common::binary_run(binary, dir.path(), &server.token_url)
        .spawn()
        .expect("spawns");
    let writing = objects.clone();
    let killed = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            let started = ["s1", "s2"].iter().any(|c| {
                std::fs::read_dir(writing.join(c).join("items"))
                    .is_ok_and(|mut files| files.next().is_some())
            });
            if started {
                let _ = child.kill(); // SIGKILL
                let _ = child.wait();
                return true;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no snapshot was written"
            );
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    })
    .await
    .expect("join");
    assert!(killed, "the run finished before it could be killed");
    let due = common::scalar(&setup.database_url(), "SELECT COUNT(*) FROM snapshot_due").await;
    assert!(due > 0, "the windows not yet written stay due");

    let run = common::binary_run(binary, dir.path(), &server.token_url);
    assert_eq!(common::run_to_end(run).await, Some(0));
    assert_snapshots_equal_database(&setup).await;
    assert_eq!(
        common::scalar(&setup.database_url(), "SELECT COUNT(*) FROM snapshot_due").await,
        0
    );
    server.stop().await;
}

/// Runs `stac-sync export --format FORMAT DEST` on the setup's database.
fn export(setup: &Setup<'_>, format: &str, dest: &Path) {
    let (database, dest) = (setup.database_url(), dest.display().to_string());
    let args = [
        "--database-url",
        &database,
        "export",
        "--format",
        format,
        &dest,
    ];
    common::binary_ok(assert_cmd::cargo::cargo_bin!("stac-sync"), setup.dir, &args);
}

/// `stac-sync export` writes the same files from a mirror that keeps no snapshots, as
/// stac-geoparquet and as NDJSON (each line an item as stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_the_files_of_an_existing_mirror() {
    let clock = Arc::new(ManualClock::default());
    let source = items("s2", 9, &["2021-03-01T10:00:00Z", "2023-09-01T10:00:00Z"]);
    let server = common::stac::start(&source, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(
        &server.url,
        dir.path(),
        &["s2"],
        common::credentials(&server.token_url, "id", "secret"),
    );
    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    assert!(
        snapshot_files(&setup.objects_dir()).is_empty(),
        "none without snapshots"
    );

    let export = |format: &str, dest: &Path| export(&setup, format, dest);
    let parquet = dir.path().join("parquet");
    export("geoparquet", &parquet);
    assert_files_equal_database(&setup, &parquet).await;

    let ndjson = dir.path().join("ndjson");
    export("ndjson", &ndjson);
    let stored = common::stored_items(&setup.database_url()).await;
    for window in ["2021", "2023"] {
        let text = std::fs::read_to_string(ndjson.join(format!("s2/items/{window}.ndjson")))
            .expect("ndjson");
        let lines: Vec<&str> = text.lines().collect();
        let mut want: Vec<(&str, &str)> = stored
            .iter()
            .filter(|((_, _), content)| content.contains(&format!("\"datetime\":\"{window}")))
            .map(|((_, id), content)| (id.as_str(), content.as_str()))
            .collect();
        want.sort();
        assert_eq!(lines.len(), want.len(), "{window}");
        let mut got: Vec<&str> = lines.clone();
        got.sort();
        let mut contents: Vec<&str> = want.iter().map(|(_, c)| *c).collect();
        contents.sort();
        assert_eq!(got, contents, "{window}: the items as stored");
    }
    server.stop().await;
}

/// A window larger than several encoded batches (150 items each) whose later items carry what the
/// earlier ones lack (a property, an asset, a float in an integer column) is one file holding
/// all of it: the writer widens its schema and writes the file again, and every item reads
/// back as it does when the window is written in one go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_property_first_seen_late_in_a_large_window_is_kept() {
    let clock = Arc::new(ManualClock::default());
    let source: Vec<Value> = make_items("s2", 1_500)
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            item["id"] = format!("s2-{i:04}").into();
            let properties = item["properties"].as_object_mut().expect("properties");
            properties.remove("start_datetime");
            properties.remove("end_datetime");
            // In order: the items after the 1,200th sort into the window's later batches.
            let datetime = format!("2024-01-01T00:{:02}:{:02}Z", i / 60, i % 60);
            properties.insert("datetime".into(), datetime.into());
            properties.insert("eo:cloud_cover".into(), (i as i64 % 50).into());
            // The window's NDJSON file goes over one part of an upload (10 MB).
            properties.insert("test:padding".into(), "x".repeat(1_000).into());
            if i >= 1_200 {
                properties.insert("late:note".into(), format!("note {i}").into());
                properties.insert("eo:cloud_cover".into(), 12.5.into());
                item["assets"]["late"] = serde_json::json!({"href": "s3://b/late.tif"});
            }
            item
        })
        .collect();
    let server = common::stac::start(&source, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setup = Setup::new(
        &server.url,
        dir.path(),
        &["s2"],
        common::credentials(&server.token_url, "id", "secret"),
    );
    setup.top = r#"snapshots = ["geoparquet"]"#;
    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    assert_snapshots_equal_database(&setup).await;
    let file = setup.objects_dir().join("s2/items/2024.parquet");
    let read = read_back(std::fs::read(&file).expect("the window's file"));
    assert_eq!(read.len(), 1_500);
    assert_eq!(
        read["s2-1499"]["properties"]["late:note"],
        Value::from("note 1499")
    );
    assert_eq!(read["s2-1499"]["assets"]["late"]["href"], "s3://b/late.tif");
    assert_eq!(read["s2-0001"]["properties"]["eo:cloud_cover"], 1.0);

    // The same window as NDJSON: written to the folder in parts, each line an item as stored,
    // in the window's order.
    let ndjson = dir.path().join("ndjson");
    export(&setup, "ndjson", &ndjson);
    let text = std::fs::read_to_string(ndjson.join("s2/items/2024.ndjson")).expect("ndjson");
    assert!(
        text.len() > 10 << 20,
        "larger than one part: {} bytes",
        text.len()
    );
    let stored = common::stored_items(&setup.database_url()).await;
    let lines: Vec<&str> = text.lines().collect();
    let want: Vec<&str> = stored.values().map(String::as_str).collect();
    assert_eq!(lines.len(), 1_500);
    assert!(lines == want, "the items as stored, in order");
    server.stop().await;
}
