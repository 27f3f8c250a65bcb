//! Object storage against real cloud APIs (S3 on moto, Azure Blob on Azurite): the same bytes
//! as a local folder, nothing rewritten on a second run, and a missing bucket stopping the run
//! before any page.

mod common;

use common::fixture::{self, Paging};
use common::moto::Moto;
use common::tokens::Issuer;
use common::{Setup, make_items, stored_items, stored_objects};
use futures_util::TryStreamExt;
use object_store::ObjectStore;
use object_store::ObjectStoreExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use serde_json::Value;
use stac_sync::clock::ManualClock;
use stac_sync::config::EnvVars;
use stac_sync::error::Exit;
use std::collections::BTreeMap;
use std::sync::Arc;

fn env(token_url: &str) -> EnvVars {
    common::credentials(token_url, "id", "secret")
}

fn pages() -> Vec<Vec<Value>> {
    let mut items = make_items("sentinel-2-l2a", 10);
    // Ids that need encoding, to prove both stores use the same keys.
    items[0]["id"] = Value::String("a/b..c %d".into());
    items[1]["id"] = Value::String("..".into());
    // Too long for a file name: a short name of its own, the same in the bucket.
    items[2]["id"] = Value::String("é".repeat(100));
    items.chunks(4).map(<[Value]>::to_vec).collect()
}

/// Every object in the bucket below `prefix`: relative key → (bytes, last modified as text).
async fn bucket_objects(
    moto: &Moto,
    bucket: &str,
    prefix: &str,
) -> BTreeMap<String, (Vec<u8>, String)> {
    let mut builder = AmazonS3Builder::new().with_bucket_name(bucket);
    for (k, v) in moto.options() {
        builder = builder.with_config(k.parse().expect("key"), v);
    }
    list(&builder.build().expect("store"), prefix).await
}

async fn list(store: &dyn ObjectStore, prefix: &str) -> BTreeMap<String, (Vec<u8>, String)> {
    let listed: Vec<_> = store
        .list(Some(&object_store::path::Path::from(prefix)))
        .try_collect()
        .await
        .expect("list");
    let mut out = BTreeMap::new();
    for meta in listed {
        let bytes = store
            .get(&meta.location)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes");
        let key = meta
            .location
            .as_ref()
            .trim_start_matches(&format!("{prefix}/"))
            .to_string();
        out.insert(key, (bytes.to_vec(), meta.last_modified.to_string()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_s3_store_the_same_bytes_as_sqlite_and_a_folder() {
    if common::skip_without(common::Service::Moto) {
        return;
    }
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("mirror").await;
    let clock = Arc::new(ManualClock::default());
    let server = fixture::start(
        pages(),
        Paging::PostFull,
        Issuer::new(clock.clone(), "id", "secret"),
    )
    .await;
    let local_dir = tempfile::tempdir().expect("tempdir");
    // Every run a full pass, so the rerun shows nothing is rewritten.
    let local = Setup {
        limit: 4,
        job_extra: "incremental = \"off\"",
        ..Setup::new(
            &server.url,
            local_dir.path(),
            &["sentinel-2-l2a"],
            env(&server.token_url),
        )
    };
    let cloud_dir = tempfile::tempdir().expect("tempdir");
    let cloud = Setup {
        dir: cloud_dir.path(),
        extra: moto.toml(),
        database: Some(common::fresh_postgres().await),
        objects: Some("s3://mirror/stac/v1".into()),
        env: env(&server.token_url),
        collections: local.collections.clone(),
        ..local
    };

    let local_run = local.run(clock.clone()).await;
    let cloud_run = cloud.run(clock.clone()).await;
    let first = bucket_objects(&moto, "mirror", "stac/v1").await;
    let rerun = cloud.run(clock.clone()).await;
    let second = bucket_objects(&moto, "mirror", "stac/v1").await;

    assert_eq!(
        local_run.exit(),
        Exit::Success,
        "{:?}",
        local_run.jobs[0].error
    );
    assert_eq!(
        cloud_run.exit(),
        Exit::Success,
        "{:?}",
        cloud_run.jobs[0].error
    );
    let mut folder = stored_objects(&local.objects_dir());
    folder.retain(|k, _| !k.starts_with('_'));
    let bucket: BTreeMap<String, Vec<u8>> = first
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, (bytes, _))| (k.clone(), bytes.clone()))
        .collect();
    assert_eq!(bucket.len(), 10);
    assert_eq!(bucket, folder, "the bucket and the folder differ");
    assert!(
        bucket.contains_key("sentinel-2-l2a/a%2Fb..c%20%25d.json"),
        "{:?}",
        bucket.keys()
    );
    assert!(
        bucket.contains_key("sentinel-2-l2a/%2E..json"),
        "{:?}",
        bucket.keys()
    );
    assert!(
        bucket
            .keys()
            .any(|k| k.starts_with("sentinel-2-l2a/%C3%A9") && k.contains('~') && k.len() < 255),
        "{:?}",
        bucket.keys()
    );
    let local_rows = stored_items(&local.database_url()).await;
    let cloud_rows = stored_items(&cloud.database_url()).await;
    assert_eq!(
        local_rows.keys().collect::<Vec<_>>(),
        cloud_rows.keys().collect::<Vec<_>>()
    );
    for (key, content) in &local_rows {
        let a: Value = serde_json::from_str(content).expect("json");
        let b: Value = serde_json::from_str(&cloud_rows[key]).expect("json");
        assert_eq!(a, b, "{key:?}");
    }
    assert_eq!(rerun.exit(), Exit::Success);
    assert_eq!(
        (rerun.jobs[0].counts.new, rerun.jobs[0].counts.unchanged),
        (0, 10)
    );
    let unchanged =
        |m: &BTreeMap<String, (Vec<u8>, String)>| -> BTreeMap<String, (Vec<u8>, String)> {
            m.iter()
                .filter(|(k, _)| !k.starts_with('_'))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
    assert_eq!(
        unchanged(&second),
        unchanged(&first),
        "the second run rewrote objects"
    );
    assert_eq!(second.keys().filter(|k| k.starts_with("_runs/")).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_stops_the_run_with_exit_6_before_any_page() {
    if common::skip_without(common::Service::Moto) {
        return;
    }
    let moto = Moto::start();
    let clock = Arc::new(ManualClock::default());
    let server = fixture::start(
        pages(),
        Paging::PostFull,
        Issuer::new(clock.clone(), "id", "secret"),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        limit: 4,
        extra: moto.toml(),
        objects: Some("s3://no-such-bucket/items".into()),
        ..Setup::new(
            &server.url,
            dir.path(),
            &["sentinel-2-l2a"],
            env(&server.token_url),
        )
    };

    let result = stac_sync::run::run(
        &setup.config(),
        stac_sync::run::RunOptions {
            clock,
            migrate: true,
            ..stac_sync::run::RunOptions::default()
        },
    )
    .await;

    let error = result.expect_err("the run must not start");
    assert_eq!(error.exit(), Exit::Sink);
    let message = error.to_string();
    assert!(
        message.contains("s3://no-such-bucket/items") && message.contains("cannot write"),
        "{message}"
    );
    assert!(server.served().is_empty(), "pages were fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blob_storage_holds_the_same_bytes_as_a_folder() {
    if common::skip_without(common::Service::Azurite) {
        return;
    }
    let azurite = common::azurite::Azurite::start();
    azurite.create_container("mirror").await;
    let clock = Arc::new(ManualClock::default());
    let server = fixture::start(
        pages(),
        Paging::PostFull,
        Issuer::new(clock.clone(), "id", "secret"),
    )
    .await;
    let local_dir = tempfile::tempdir().expect("tempdir");
    // Every run a full pass, so the rerun shows nothing is rewritten.
    let local = Setup {
        limit: 4,
        job_extra: "incremental = \"off\"",
        ..Setup::new(
            &server.url,
            local_dir.path(),
            &["sentinel-2-l2a"],
            env(&server.token_url),
        )
    };
    let azure_dir = tempfile::tempdir().expect("tempdir");
    let azure = Setup {
        dir: azure_dir.path(),
        extra: azurite.toml(),
        objects: Some("az://mirror/items".into()),
        database: None,
        env: env(&server.token_url),
        collections: local.collections.clone(),
        ..local
    };

    let local_run = local.run(clock.clone()).await;
    let azure_run = azure.run(clock.clone()).await;
    let rerun = azure.run(clock.clone()).await;

    assert_eq!(
        local_run.exit(),
        Exit::Success,
        "{:?}",
        local_run.jobs[0].error
    );
    assert_eq!(
        azure_run.exit(),
        Exit::Success,
        "{:?}",
        azure_run.jobs[0].error
    );
    assert_eq!(
        (rerun.jobs[0].counts.new, rerun.jobs[0].counts.unchanged),
        (0, 10)
    );
    let mut builder = MicrosoftAzureBuilder::new().with_container_name("mirror");
    for (k, v) in &azure.config().object_store_options {
        builder = builder.with_config(k.parse().expect("key"), v);
    }
    let blobs: BTreeMap<String, Vec<u8>> = list(&builder.build().expect("store"), "items")
        .await
        .into_iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, (bytes, _))| (k, bytes))
        .collect();
    let mut folder = stored_objects(&local.objects_dir());
    folder.retain(|k, _| !k.starts_with('_'));
    assert_eq!(blobs.len(), 10);
    assert_eq!(blobs, folder, "Azure and the folder differ");
}
