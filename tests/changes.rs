//! The change feed: every commit records what it stored or deleted, in its own transaction;
//! `stac-sync changes --since SEQ` prints it; each run writes its changes beside its manifest.
//! Against a real STAC API (stac-server), on SQLite and on Postgres.

mod common;

use common::tokens::Issuer;
use common::{Setup, make_items};
use serde_json::Value;
use stac_sync::clock::ManualClock;
use stac_sync::error::Exit;
use stac_sync::mirror::db::{Change, Database};
use std::collections::BTreeSet;
use std::sync::Arc;

/// `(change, id)` of the feed after `since`.
async fn feed(database: &str, since: i64) -> Vec<(String, String)> {
    let db = Database::connect(database).await.expect("database");
    let changes = db.changes(since, 100_000).await.expect("changes");
    changes.into_iter().map(|c| (c.change, c.id)).collect()
}

async fn last_seq(database: &str) -> i64 {
    let db = Database::connect(database).await.expect("database");
    let changes = db.changes(0, 100_000).await.expect("changes");
    changes.last().map_or(0, |c| c.seq)
}

async fn the_feed_lists_what_each_run_added_changed_and_withdrew(database: Option<String>) {
    let clock = Arc::new(ManualClock::default());
    let before = make_items("s2", 12);
    let server = common::stac::start(&before, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, token_url) = (server.url.clone(), server.token_url.clone());
    let setup = Setup {
        database,
        limit: 5,
        ..Setup::new(
            &url,
            dir.path(),
            &["s2"],
            common::credentials(&token_url, "id", "secret"),
        )
    };
    assert_eq!(setup.run(clock.clone()).await.exit(), Exit::Success);
    let backfill = feed(&setup.database_url(), 0).await;
    assert_eq!(backfill.len(), 12);
    assert!(backfill.iter().all(|(change, _)| change == "new"));
    let cursor = last_seq(&setup.database_url()).await;

    // Upstream: two new items, one changed, one withdrawn.
    let mut after = before.clone();
    after[4]["properties"]["eo:cloud_cover"] = 3.25.into();
    let withdrawn = after.remove(7)["id"].as_str().expect("id").to_string();
    let mut added = make_items("s2", 14);
    added.drain(..12);
    for (n, item) in added.iter_mut().enumerate() {
        item["id"] = format!("s2-added-{n}").into();
    }
    after.extend(added);
    let server = server.restart_with(&after).await;
    if setup.database.is_some() {
        // On Postgres, no change may need numbering after its commit (a writer that dies, or
        // loses its connection, right after committing would leave it out of the feed): any
        // UPDATE of the feed fails from here on.
        common::execute(
            &setup.database_url(),
            "CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'the feed is not updated after a commit'; END $$",
        )
        .await;
        common::execute(
            &setup.database_url(),
            "CREATE TRIGGER refuse_update BEFORE UPDATE ON changes \
             FOR EACH ROW EXECUTE FUNCTION refuse_update()",
        )
        .await;
    }
    let reconciled = setup.reconcile(clock.clone()).await;
    assert_eq!(
        reconciled.exit(),
        Exit::Success,
        "{:?}",
        reconciled.jobs[0].error
    );

    let later: BTreeSet<(String, String)> = feed(&setup.database_url(), cursor)
        .await
        .into_iter()
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("new", "s2-added-0"),
        ("new", "s2-added-1"),
        ("changed", before[4]["id"].as_str().expect("id")),
        ("deleted", withdrawn.as_str()),
    ]
    .into_iter()
    .map(|(c, i)| (c.to_string(), i.to_string()))
    .collect();
    assert_eq!(later, expected);

    // The run's changes beside its manifest, and the command's NDJSON: the same rows.
    let run_id = &reconciled.jobs[0].run_id;
    let file = setup
        .objects_dir()
        .join(format!("_changes/{}.ndjson", run_id.replace(':', "%3A")));
    let text = std::fs::read_to_string(&file).expect("the run's changes file");
    let db = Database::connect(&setup.database_url()).await.expect("db");
    // Read by key two rows at a time, as the file is written a page at a time.
    let mut rows: Vec<Change> = Vec::new();
    loop {
        let after = rows.last().map_or(0, |c| c.seq);
        let page = db.run_changes(run_id, after, 2).await.expect("run changes");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2, "a page holds at most its limit");
        rows.extend(page);
    }
    let from_file: Vec<Change> = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("JSON"))
        .map(|v| Change {
            seq: v["seq"].as_i64().expect("seq"),
            run_id: v["run_id"].as_str().expect("run").into(),
            job: v["job"].as_str().expect("job").into(),
            collection: v["collection"].as_str().expect("collection").into(),
            id: v["id"].as_str().expect("id").into(),
            change: v["change"].as_str().expect("change").into(),
            content_hash: v["content_hash"].as_str().map(str::to_string),
            at: v["at"].as_str().expect("at").into(),
        })
        .collect();
    assert_eq!(from_file, rows);
    let (since, database) = (cursor.to_string(), setup.database_url());
    let output = common::binary_ok(
        assert_cmd::cargo::cargo_bin!("stac-sync"),
        dir.path(),
        &[
            "changes",
            "--json",
            "--since",
            &since,
            "--database-url",
            &database,
        ],
    );
    let printed: BTreeSet<(String, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("NDJSON"))
        .map(|v| {
            (
                v["change"].as_str().unwrap_or("").into(),
                v["id"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(printed, expected);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_lists_what_each_run_added_changed_and_withdrew_on_sqlite() {
    the_feed_lists_what_each_run_added_changed_and_withdrew(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_lists_what_each_run_added_changed_and_withdrew_on_postgres() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    the_feed_lists_what_each_run_added_changed_and_withdrew(Some(common::fresh_postgres().await))
        .await;
}

/// A consumer reading the feed from its cursor while a run commits two pages at once (on
/// Postgres) sees every change once, in sequence order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_following_its_cursor_during_a_run_misses_nothing() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    let clock = Arc::new(ManualClock::default());
    let mut items = make_items("a", 300);
    items.extend(make_items("b", 300));
    let server = common::stac::start(&items, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let database = common::fresh_postgres().await;
    let setup = Setup {
        database: Some(database.clone()),
        limit: 7,
        ..Setup::new(
            &server.url,
            dir.path(),
            &["a", "b"],
            common::credentials(&server.token_url, "id", "secret"),
        )
    };
    Database::connect(&database)
        .await
        .expect("db")
        .migrate()
        .await
        .expect("migrate");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer = {
        let (database, done) = (database.clone(), done.clone());
        tokio::spawn(async move {
            let db = Database::connect(&database).await.expect("db");
            let (mut cursor, mut seen) = (0, Vec::new());
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let batch = db.changes(cursor, 50).await.expect("changes");
                if let Some(last) = batch.last() {
                    cursor = last.seq;
                }
                let empty = batch.is_empty();
                seen.extend(batch.into_iter().map(|c| (c.seq, c.collection, c.id)));
                if finished && empty {
                    return seen;
                }
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
        })
    };

    let summary = setup.run(clock.clone()).await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = consumer.await.expect("consumer");

    assert_eq!(summary.exit(), Exit::Success);
    assert_eq!(seen.len(), 600, "every change once");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "in sequence order"
    );
    let ids: BTreeSet<_> = seen
        .iter()
        .map(|(_, c, i)| (c.clone(), i.clone()))
        .collect();
    assert_eq!(ids.len(), 600);
}

/// A webhook receiver that answers 503 while `failing` is above zero (counting it down), and
/// keeps the `seq` of every change it took.
#[derive(Clone, Default)]
struct Receiver {
    failing: Arc<std::sync::atomic::AtomicUsize>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    seqs: Arc<std::sync::Mutex<Vec<i64>>>,
}

async fn receive(
    axum::extract::State(receiver): axum::extract::State<Receiver>,
    axum::Json(body): axum::Json<Value>,
) -> axum::http::StatusCode {
    use std::sync::atomic::Ordering;
    receiver.calls.fetch_add(1, Ordering::SeqCst);
    let failing = receiver
        .failing
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    let mut seqs = receiver.seqs.lock().expect("lock");
    for change in body["changes"].as_array().into_iter().flatten() {
        seqs.push(change["seq"].as_i64().expect("seq"));
    }
    axum::http::StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_every_change_at_least_once_and_a_failing_one_never_blocks_the_mirror() {
    use std::sync::atomic::Ordering;
    let clock = Arc::new(ManualClock::default());
    let receiver = Receiver::default();
    receiver.failing.store(1_000, Ordering::SeqCst);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook = format!("http://{}/hook", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let server = common::stac::start(
        &make_items("s2", 23),
        Issuer::new(clock.clone(), "id", "secret"),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let top = format!("webhook_url = \"{hook}\"");
    let setup = Setup {
        limit: 5,
        top: &top,
        ..Setup::new(
            &server.url,
            dir.path(),
            &["s2"],
            common::credentials(&server.token_url, "id", "secret"),
        )
    };

    // The receiver is down: the mirror goes on; nothing was delivered.
    let first = setup.run(clock.clone()).await;
    assert_eq!(first.exit(), Exit::Success, "{:?}", first.jobs[0].error);
    assert_eq!(first.jobs[0].counts.new, 23);
    assert!(receiver.calls.load(Ordering::SeqCst) >= 6, "it was retried");
    assert!(receiver.seqs.lock().expect("lock").is_empty());

    // It fails its next two calls, then takes them: the next run delivers from the cursor.
    receiver.failing.store(2, Ordering::SeqCst);
    let second = setup.run(clock.clone()).await;
    assert_eq!(second.exit(), Exit::Success);
    let mut seqs = receiver.seqs.lock().expect("lock").clone();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs,
        (1..=23).collect::<Vec<i64>>(),
        "every change, deduped on seq"
    );
    server.stop().await;
}

/// Two commits of the same new items, both classified before either committed (two workers,
/// or a partition's first page and the half of it that a split pages): the second writes
/// nothing, and the feed and the counts say `new` once.
async fn items_another_commit_stored_meanwhile_are_not_new_twice(database: String) {
    let db = Database::connect(&database).await.expect("db");
    db.migrate().await.expect("migrate");
    let items = make_items("s2", 5);
    let body = serde_json::to_vec(&serde_json::json!({"features": items})).expect("JSON");
    let request = stac_sync::stac::search::Request::get(
        url::Url::parse("http://127.0.0.1:9/search").expect("url"),
    );
    let page = stac_sync::stac::reader::parse_page(&body, &request, None).expect("page");
    let classified = db.classify(&page.items).await.expect("classify");
    let commit = |partition: &'static str| stac_sync::mirror::db::PageCommit {
        run_id: "r",
        job: "test",
        partition,
        items: page.items.iter().collect(),
        rejected: &[],
        page_url: "http://127.0.0.1:9/search",
        resume: None,
        ends_page: true,
        features: page.features,
        matched: None,
        seen: Vec::new(),
        lease: None,
        snapshots: None,
    };

    let first = db.commit_page(commit("a")).await.expect("first");
    let second = db.commit_page(commit("b")).await.expect("second");

    assert!(
        classified
            .iter()
            .all(|k| *k == stac_sync::mirror::db::Known::New)
    );
    assert_eq!(first.written.len(), 5);
    assert!(second.written.is_empty());
    let feed = feed(&database, 0).await;
    assert_eq!(feed.len(), 5, "{feed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_another_commit_stored_meanwhile_are_not_new_twice_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = format!("sqlite://{}", dir.path().join("mirror.db").display());
    items_another_commit_stored_meanwhile_are_not_new_twice(database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_another_commit_stored_meanwhile_are_not_new_twice_on_postgres() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    items_another_commit_stored_meanwhile_are_not_new_twice(common::fresh_postgres().await).await;
}
