//! Collection documents: each run fetches `/collections/{id}` of its jobs' collections once and
//! stores it (the `collections` table and `{collection}/collection.json`) when it changed; a
//! collection gone upstream is marked, never dropped. Against a real STAC API (stac-server).

mod common;

use common::tokens::Issuer;
use common::{Setup, make_items};
use stac::api::TransactionClient;
use stac_sync::clock::ManualClock;
use stac_sync::error::Exit;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_document_is_stored_when_it_changes_and_marked_when_it_goes() {
    let clock = Arc::new(ManualClock::default());
    let mut items = make_items("s2", 6);
    items.extend(make_items("s1", 3));
    let server = common::stac::start(&items, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, token_url) = (server.url.clone(), server.token_url.clone());
    let setup = Setup::new(
        &url,
        dir.path(),
        &["s2", "s1"],
        common::credentials(&token_url, "id", "secret"),
    );
    let document = setup.objects_dir().join("s2/collection.json");
    let served = || async {
        let response = reqwest::Client::new()
            .get(format!("{url}collections/s2"))
            .bearer_auth(common::tokens::fetch(&token_url).await)
            .send()
            .await
            .expect("GET");
        response.bytes().await.expect("body").to_vec()
    };

    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    assert_eq!(
        std::fs::read(&document).expect("collection.json"),
        served().await
    );
    let stored: String = sqlx_text(
        &setup.database_url(),
        "SELECT content FROM collections WHERE id = 's2'",
    )
    .await;
    assert_eq!(
        stored.as_bytes(),
        served().await,
        "the document as received"
    );
    let written = std::fs::metadata(&document)
        .expect("meta")
        .modified()
        .expect("mtime");

    // Unchanged: not written again.
    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    let again = std::fs::metadata(&document)
        .expect("meta")
        .modified()
        .expect("mtime");
    assert_eq!(again, written);

    // Changed upstream: written again.
    let mut changed = stac::Collection::new("s2", "Sentinel-2, reprocessed");
    changed.title = Some("Sentinel-2 L2A".into());
    server
        .backend
        .clone()
        .add_collection(changed)
        .await
        .expect("collection");
    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    assert_eq!(
        std::fs::read(&document).expect("collection.json"),
        served().await
    );
    assert!(String::from_utf8_lossy(&served().await).contains("reprocessed"));

    // Gone upstream: marked, with its document and items kept.
    let server = server.restart_with(&make_items("s1", 3)).await;
    let gone = setup.run(clock.clone()).await;
    assert!(document.is_file());
    let db = stac_sync::mirror::db::Database::connect(&setup.database_url())
        .await
        .expect("database");
    let status = stac_sync::ops::status::read(&db, 5).await.expect("status");
    let s2 = status
        .collections
        .iter()
        .find(|c| c.collection == "s2")
        .expect("s2 is listed");
    assert!(s2.gone_at.is_some(), "{:?}", s2);
    assert_eq!(s2.live, 6, "its items are kept: {gone:?}");
    let s1 = status
        .collections
        .iter()
        .find(|c| c.collection == "s1")
        .expect("s1 is listed");
    assert!(s1.described && s1.gone_at.is_none());
    assert!(status.render().contains("gone upstream since"));
    server.stop().await;
}

async fn sqlx_text(database_url: &str, sql: &'static str) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(database_url)
        .await
        .expect("sqlite");
    sqlx::query_scalar(sql)
        .fetch_one(&mut conn)
        .await
        .expect("a row")
}
