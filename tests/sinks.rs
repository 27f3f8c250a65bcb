//! The sink conformance suite: the same test functions run against SQLite and Postgres (each
//! with a local folder as object store), through the whole `run` pipeline.

mod common;

use common::fixture::{self, Fault, Paging};
use common::tokens::Issuer;
use common::{Setup, make_items, stored_items, stored_objects};
use serde_json::{Value, json};
use stac_sync::clock::ManualClock;
use stac_sync::error::Exit;
use stac_sync::mirror::db::Database;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
    /// Postgres with pgstac: items and collections go to pgstac, stac-sync's tables to schema
    /// stac_sync (which the tests read).
    Pgstac,
}

struct Case {
    backend: Backend,
    clock: Arc<ManualClock>,
    server: fixture::Fixture,
    dir: tempfile::TempDir,
    database: String,
}

impl Case {
    async fn new(backend: Backend, pages: Vec<Vec<Value>>) -> Case {
        let clock = Arc::new(ManualClock::default());
        let server = fixture::start(
            pages,
            Paging::PostFull,
            Issuer::new(clock.clone(), "id", "secret"),
        )
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let database = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("mirror.db").display()),
            Backend::Postgres => common::fresh_postgres().await,
            Backend::Pgstac => common::fresh_pgstac().await,
        };
        server.state.collections.store(
            backend == Backend::Pgstac,
            std::sync::atomic::Ordering::SeqCst,
        );
        Case {
            backend,
            clock,
            server,
            dir,
            database,
        }
    }

    fn setup(&self) -> Setup<'_> {
        Setup {
            database: Some(self.database.clone()),
            top: match self.backend {
                Backend::Pgstac => "database_format = \"pgstac\"",
                _ => "",
            },
            // Every run a full pass: these tests are about what a rerun writes.
            job_extra: "incremental = \"off\"",
            ..Setup::new(
                &self.server.url,
                self.dir.path(),
                &["c"],
                common::credentials(&self.server.token_url, "id", "secret"),
            )
        }
    }

    /// The case's database, opened as its runs open it.
    async fn db(&self) -> Database {
        let format = match self.backend {
            Backend::Pgstac => stac_sync::config::DatabaseFormat::Pgstac,
            _ => stac_sync::config::DatabaseFormat::StacSync,
        };
        Database::connect_as(&self.database, format)
            .await
            .expect("db")
    }

    async fn run(&self) -> stac_sync::run::Summary {
        self.setup().run(self.clock.clone()).await
    }

    fn objects(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut objects = stored_objects(&self.setup().objects_dir());
        objects.retain(|key, _| !key.starts_with('_') && !key.ends_with("/collection.json"));
        objects
    }
}

/// On pgstac: what pgstac serves equals what stac-sync stored (every live item, hydrated back
/// from pgstac, equals the item received), and the `xmin` of each pgstac row, so that a test
/// can tell whether a rerun rewrote it. Empty on the other backends.
async fn pgstac_rows(case: &Case) -> std::collections::BTreeMap<(String, String), String> {
    use sqlx::Connection;
    if case.backend != Backend::Pgstac {
        return Default::default();
    }
    let live: Vec<(String, String, String)> = {
        let mut conn = sqlx::PgConnection::connect(&case.database)
            .await
            .expect("db");
        sqlx::query_as(
            "SELECT collection, id, CAST(content AS TEXT) FROM stac_sync.items \
             WHERE deleted_at IS NULL ORDER BY collection, id",
        )
        .fetch_all(&mut conn)
        .await
        .expect("stac-sync rows")
    };
    let mut conn = sqlx::PgConnection::connect(&case.database)
        .await
        .expect("db");
    let served: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT collection, id, CAST(pgstac.get_item(id, collection) AS TEXT), CAST(xmin AS TEXT) \
         FROM pgstac.items ORDER BY collection, id",
    )
    .fetch_all(&mut conn)
    .await
    .expect("pgstac rows");
    assert_eq!(
        served.iter().map(|r| (&r.0, &r.1)).collect::<Vec<_>>(),
        live.iter().map(|r| (&r.0, &r.1)).collect::<Vec<_>>(),
        "pgstac holds exactly the live items"
    );
    for ((_, id, hydrated, _), (_, _, stored)) in served.iter().zip(&live) {
        let hydrated: Value = serde_json::from_str(hydrated).expect("JSON");
        let stored: Value = serde_json::from_str(stored).expect("JSON");
        assert_eq!(hydrated, stored, "pgstac serves item {id} as received");
    }
    served
        .into_iter()
        .map(|(c, i, _, xmin)| ((c, i), xmin))
        .collect()
}

fn pages(count: usize, per_page: usize) -> Vec<Vec<Value>> {
    make_items("c", count * per_page)
        .chunks(per_page)
        .map(<[Value]>::to_vec)
        .collect()
}

async fn a_rerun_converges_and_rewrites_nothing(backend: Backend) {
    let case = Case::new(backend, pages(4, 3)).await;

    let first = case.run().await;
    let rows = stored_items(&case.database).await;
    let objects = case.objects();
    let pgstac = pgstac_rows(&case).await;
    let mtimes: Vec<_> = objects
        .keys()
        .map(|k| {
            std::fs::metadata(case.setup().objects_dir().join(k))
                .and_then(|m| m.modified())
                .expect("mtime")
        })
        .collect();
    let second = case.run().await;

    assert_eq!(first.exit(), Exit::Success, "{:?}", first.jobs[0].error);
    assert_eq!(second.exit(), Exit::Success, "{:?}", second.jobs[0].error);
    assert_eq!(
        (first.jobs[0].counts.new, second.jobs[0].counts.new),
        (12, 0)
    );
    assert_eq!(second.jobs[0].counts.unchanged, 12);
    assert_eq!(rows.len(), 12);
    assert_eq!(stored_items(&case.database).await, rows);
    assert_eq!(case.objects(), objects);
    let after: Vec<_> = objects
        .keys()
        .map(|k| {
            std::fs::metadata(case.setup().objects_dir().join(k))
                .and_then(|m| m.modified())
                .expect("mtime")
        })
        .collect();
    assert_eq!(after, mtimes, "unchanged items' objects were rewritten");
    assert_eq!(
        pgstac_rows(&case).await,
        pgstac,
        "pgstac rows were rewritten"
    );
    for ((collection, id), content) in &rows {
        let object = &objects[&format!("{collection}/{id}.json")];
        let stored: Value = serde_json::from_str(content).expect("json");
        assert_eq!(
            serde_json::from_slice::<Value>(object).expect("json"),
            stored
        );
    }
}

async fn changed_items_are_updated_in_rows_and_objects(backend: Backend) {
    let case = Case::new(backend, pages(3, 3)).await;
    case.run().await;
    {
        let mut pages = case.server.state.pages.lock().expect("lock");
        pages[1][0]["properties"]["eo:cloud_cover"] = json!(42.5);
        pages[2][2]["properties"]["updated"] = json!("2030-01-01T00:00:00Z");
    }

    let second = case.run().await;

    let counts = &second.jobs[0].counts;
    assert_eq!((counts.new, counts.changed, counts.unchanged), (0, 2, 7));
    let id = case.server.state.pages.lock().expect("lock")[1][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let rows = stored_items(&case.database).await;
    let row: Value = serde_json::from_str(&rows[&("c".to_string(), id.clone())]).expect("json");
    assert_eq!(row["properties"]["eo:cloud_cover"], json!(42.5));
    let object: Value =
        serde_json::from_slice(&case.objects()[&format!("c/{id}.json")]).expect("json");
    assert_eq!(object["properties"]["eo:cloud_cover"], json!(42.5));
    let pgstac = pgstac_rows(&case).await;
    let third = case.run().await;
    assert_eq!(third.jobs[0].counts.unchanged, 9);
    assert_eq!(pgstac_rows(&case).await, pgstac);
}

/// Each stored row's `(id, content_hash)`.
async fn hashes(db: &Database) -> std::collections::BTreeMap<String, String> {
    let sql = "SELECT id, content_hash FROM items";
    let rows: Vec<(String, String)> = match db {
        Database::Sqlite(db) => sqlx::query_as(sql).fetch_all(db.pool()).await,
        Database::Postgres(db) => sqlx::query_as(sql).fetch_all(db.pool()).await,
    }
    .expect("hashes");
    rows.into_iter().collect()
}

/// The bytes the fixture serves for each item, by id.
fn served_bytes(case: &Case) -> std::collections::BTreeMap<String, Vec<u8>> {
    let pages = case.server.state.pages.lock().expect("lock");
    pages
        .iter()
        .flatten()
        .map(|item| {
            let id = item["id"].as_str().expect("id").to_string();
            (id, serde_json::to_vec(item).expect("JSON"))
        })
        .collect()
}

/// Rows stored while `content_hash` was BLAKE3 read unchanged, and are not rewritten, until
/// their item changes; then the row gets the XXH3-128 hash.
async fn rows_hashed_with_blake3_read_unchanged_until_their_item_changes(backend: Backend) {
    use stac_sync::stac::reader::content_hash;
    let case = Case::new(backend, pages(3, 3)).await;
    case.run().await;
    let db = case.db().await;
    let served = served_bytes(&case);
    let mut before = std::collections::BTreeMap::new();
    for (id, hash) in hashes(&db).await {
        let bytes = &served[&id];
        assert_eq!(
            hash,
            content_hash(bytes),
            "{id}: XXH3-128 of the bytes received"
        );
        let blake3 = blake3::hash(bytes).to_hex().to_string();
        let sql = "UPDATE items SET content_hash = $1 WHERE id = $2";
        match &db {
            Database::Sqlite(db) => sqlx::query(sql)
                .bind(&blake3)
                .bind(&id)
                .execute(db.pool())
                .await
                .map(|_| ()),
            Database::Postgres(db) => sqlx::query(sql)
                .bind(&blake3)
                .bind(&id)
                .execute(db.pool())
                .await
                .map(|_| ()),
        }
        .expect("set a BLAKE3 hash");
        before.insert(id, blake3);
    }
    let objects = case.objects();
    let pgstac = pgstac_rows(&case).await;

    let second = case.run().await;

    let counts = &second.jobs[0].counts;
    assert_eq!((counts.new, counts.changed, counts.unchanged), (0, 0, 9));
    assert_eq!(hashes(&db).await, before, "unchanged rows were rewritten");
    assert_eq!(case.objects(), objects);
    assert_eq!(
        pgstac_rows(&case).await,
        pgstac,
        "pgstac rows were rewritten"
    );

    let id = {
        let mut pages = case.server.state.pages.lock().expect("lock");
        pages[1][0]["properties"]["eo:cloud_cover"] = json!(42.5);
        pages[1][0]["id"].as_str().expect("id").to_string()
    };
    let third = case.run().await;

    let counts = &third.jobs[0].counts;
    assert_eq!((counts.new, counts.changed, counts.unchanged), (0, 1, 8));
    before.insert(id.clone(), content_hash(&served_bytes(&case)[&id]));
    assert_eq!(hashes(&db).await, before);
}

async fn a_bad_item_is_quarantined_alone(backend: Backend) {
    let mut items = make_items("c", 5);
    let mut nul = items[3].clone();
    nul["properties"]["title"] = json!("nul \u{0000} inside");
    items[3] = nul;
    items[1].as_object_mut().expect("object").remove("id");
    let case = Case::new(backend, vec![items]).await;

    let summary = case.run().await;

    assert_eq!(summary.exit(), Exit::Partial, "{:?}", summary.jobs[0].error);
    let reasons: Vec<String> = common::quarantined(&case.database)
        .await
        .into_iter()
        .map(|q| q.0)
        .collect();
    let rows = stored_items(&case.database).await;
    match case.backend {
        // SQLite stores the NUL character; Postgres cannot, so that item is quarantined too.
        Backend::Sqlite => {
            assert_eq!(reasons, ["the item has no id"]);
            assert_eq!(rows.len(), 4);
        }
        Backend::Postgres | Backend::Pgstac => {
            assert_eq!(reasons[0], "the item has no id");
            assert!(reasons[1].contains("NUL"), "{reasons:?}");
            assert_eq!(rows.len(), 3);
            assert_eq!(
                case.objects().len(),
                3,
                "a refused item left an object behind"
            );
        }
    }
}

async fn an_item_the_database_refuses_at_commit_is_quarantined_alone(backend: Backend) {
    let items = make_items("c", 4);
    let case = Case::new(backend, vec![items.clone()]).await;
    let db = case.db().await;
    db.migrate().await.expect("migrate");
    // A rule of the user's: a trigger that refuses one id.
    let refused_id = items[2]["id"].as_str().expect("id").to_string();
    match backend {
        Backend::Sqlite => {
            common::execute(
                &case.database,
                "CREATE TRIGGER refuse BEFORE INSERT ON items \
                WHEN NEW.id LIKE '%-00002' BEGIN SELECT RAISE(ABORT, 'not this one'); END",
            )
            .await;
        }
        Backend::Postgres | Backend::Pgstac => {
            common::execute(
                &case.database,
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql \
                AS $$ BEGIN IF NEW.id LIKE '%-00002' THEN RAISE EXCEPTION 'not this one'; END IF; \
                RETURN NEW; END $$",
            )
            .await;
            common::execute(
                &case.database,
                "CREATE TRIGGER refuse BEFORE INSERT ON items \
                FOR EACH ROW EXECUTE FUNCTION refuse()",
            )
            .await;
        }
    }

    let summary = case.run().await;

    assert_eq!(summary.exit(), Exit::Partial, "{:?}", summary.jobs[0].error);
    assert_eq!(
        (
            summary.jobs[0].counts.new,
            summary.jobs[0].counts.quarantined
        ),
        (3, 1)
    );
    let rows = stored_items(&case.database).await;
    assert_eq!(rows.len(), 3);
    assert!(!rows.contains_key(&("c".to_string(), refused_id.clone())));
    let reasons = common::quarantined(&case.database).await;
    assert!(reasons[0].0.contains("not this one"), "{reasons:?}");
    assert!(
        !case.objects().contains_key(&format!("c/{refused_id}.json")),
        "its object was left behind"
    );
    assert_eq!(case.objects().len(), 3);
}

async fn the_resume_point_commits_with_the_rows(backend: Backend) {
    let case = Case::new(backend, pages(5, 3)).await;
    case.server.fault(Fault::Pass);
    case.server.fault(Fault::Pass);
    for _ in 0..6 {
        case.server.fault(Fault::Status(503, vec![], "down".into()));
    }

    let first = case.run().await;
    let resume_points = common::scalar(
        &case.database,
        "SELECT COUNT(*) FROM sync_state WHERE resume IS NOT NULL",
    )
    .await;
    let second = case.run().await;

    assert_eq!(first.exit(), Exit::Upstream);
    assert_eq!(resume_points, 1);
    assert_eq!(second.exit(), Exit::Success, "{:?}", second.jobs[0].error);
    assert_eq!(
        case.server.served(),
        vec![0, 1, 2, 3, 4],
        "the second run did not resume at page 2"
    );
    assert_eq!(stored_items(&case.database).await.len(), 15);
    assert_eq!(
        common::scalar(
            &case.database,
            "SELECT COUNT(*) FROM sync_state WHERE resume IS NOT NULL"
        )
        .await,
        0
    );
}

async fn a_run_killed_between_objects_and_commit_converges(backend: Backend) {
    let case = Case::new(backend, pages(3, 3)).await;
    let reference = Case::new(backend, pages(3, 3)).await;
    reference.run().await;
    let db = case.db().await;
    db.migrate().await.expect("migrate");
    // The fail point: the database refuses the first page's commit (its resume point moves), after its objects are
    // written, as if the process died between the two.
    let (function, trigger, drop) = match backend {
        Backend::Sqlite => (
            None,
            "CREATE TRIGGER fail_point BEFORE UPDATE OF resume ON sync_state \
             BEGIN SELECT RAISE(ABORT, 'fail point'); END",
            "DROP TRIGGER fail_point",
        ),
        Backend::Postgres | Backend::Pgstac => (
            Some(
                "CREATE FUNCTION fail_point() RETURNS trigger LANGUAGE plpgsql \
                  AS $$ BEGIN RAISE EXCEPTION 'fail point'; END $$",
            ),
            "CREATE TRIGGER fail_point BEFORE UPDATE OF resume ON sync_state \
             FOR EACH ROW EXECUTE FUNCTION fail_point()",
            "DROP TRIGGER fail_point ON sync_state",
        ),
    };
    if let Some(function) = function {
        common::execute(&case.database, function).await;
    }
    common::execute(&case.database, trigger).await;

    let failed = case.run().await;
    let rows_after_failure = stored_items(&case.database).await;
    let objects_after_failure = case.objects().len();
    common::execute(&case.database, drop).await;
    let recovered = case.run().await;

    assert_eq!(failed.exit(), Exit::Sink, "{:?}", failed.jobs[0].error);
    assert!(rows_after_failure.is_empty(), "the failed commit left rows");
    // The first page's objects precede its commit; the next page's may be written too, while
    // the first commits, but no further. On Postgres, where two pages commit at once, the
    // committer may also hold the next page until its partition's page before has committed,
    // and the page after that is prepared meanwhile.
    let ahead = match backend {
        Backend::Sqlite => 1,
        Backend::Postgres | Backend::Pgstac => 2,
    };
    assert!(
        (3..=3 * (1 + ahead)).contains(&objects_after_failure),
        "{objects_after_failure} objects"
    );
    assert_eq!(
        recovered.exit(),
        Exit::Success,
        "{:?}",
        recovered.jobs[0].error
    );
    assert_eq!(
        stored_items(&case.database).await,
        stored_items(&reference.database).await
    );
    assert_eq!(case.objects(), reference.objects());
    assert_eq!(
        pgstac_rows(&case).await.keys().collect::<Vec<_>>(),
        pgstac_rows(&reference).await.keys().collect::<Vec<_>>()
    );
}

async fn a_second_run_of_a_locked_job_exits_7_without_writing(backend: Backend) {
    let case = Case::new(backend, pages(2, 3)).await;
    let db = case.db().await;
    db.migrate().await.expect("migrate");
    let lock = db
        .lock("test", false)
        .await
        .expect("the first runner takes the lock");

    let blocked = case.run().await;
    let runs = common::scalar(&case.database, "SELECT COUNT(*) FROM sync_runs").await;
    lock.release().await.expect("released");
    let after = case.run().await;

    assert_eq!(blocked.exit(), Exit::Locked);
    assert_eq!(runs, 0, "the blocked run wrote a run record");
    assert!(
        case.server.served().len() == 2,
        "only the second run fetched pages"
    );
    assert_eq!(after.exit(), Exit::Success, "{:?}", after.jobs[0].error);
}

/// Ids as long as a server can send: one too long for a file name (251 bytes encoded, and 100 ×
/// `é`, 600 bytes encoded) gets a short unique object name; one too long for Postgres's index
/// (5,000 bytes) is quarantined there, with the NUL-free, cut id, and stored on SQLite. The rest
/// of the page is stored, and a rerun rewrites nothing.
async fn ids_of_any_length_never_cost_their_page(backend: Backend) {
    let mut items = make_items("c", 5);
    items[1]["id"] = json!("x".repeat(251));
    items[2]["id"] = json!("é".repeat(100));
    items[3]["id"] = json!("y".repeat(5_000));
    let case = Case::new(backend, vec![items.clone()]).await;

    let first = case.run().await;
    let second = case.run().await;

    let rows = stored_items(&case.database).await;
    let objects = case.objects();
    let stored = |i: usize| {
        rows.contains_key(&(
            "c".to_string(),
            items[i]["id"].as_str().expect("id").to_string(),
        ))
    };
    assert!(
        stored(0) && stored(1) && stored(2) && stored(4),
        "{:?}",
        first.jobs[0].error
    );
    assert_eq!(objects.len(), rows.len(), "{:?}", objects.keys());
    assert!(
        objects.keys().all(|key| key.len() < 255),
        "{:?}",
        objects.keys()
    );
    let quarantined = common::quarantined(&case.database).await;
    match case.backend {
        Backend::Sqlite => {
            assert_eq!(first.exit(), Exit::Success, "{:?}", first.jobs[0].error);
            assert!(stored(3));
            assert!(quarantined.is_empty(), "{quarantined:?}");
        }
        Backend::Postgres | Backend::Pgstac => {
            assert_eq!(first.exit(), Exit::Partial, "{:?}", first.jobs[0].error);
            assert!(!stored(3));
            assert!(
                quarantined[0].0.contains("more than Postgres can index"),
                "{quarantined:?}"
            );
        }
    }
    let counts = &second.jobs[0].counts;
    assert_eq!((counts.new, counts.changed), (0, 0));
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if crate::common::skip_without(crate::common::Service::Postgres) {
                        return;
                    }
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
        mod pgstac {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if crate::common::skip_without(crate::common::Service::Pgstac) {
                        return;
                    }
                    super::$name(super::Backend::Pgstac).await
                }
            )*
        }
    };
}

conformance!(
    a_rerun_converges_and_rewrites_nothing,
    changed_items_are_updated_in_rows_and_objects,
    rows_hashed_with_blake3_read_unchanged_until_their_item_changes,
    a_bad_item_is_quarantined_alone,
    an_item_the_database_refuses_at_commit_is_quarantined_alone,
    the_resume_point_commits_with_the_rows,
    a_run_killed_between_objects_and_commit_converges,
    a_second_run_of_a_locked_job_exits_7_without_writing,
    ids_of_any_length_never_cost_their_page,
);

/// Postgres writes a page in statements of at most 8 MiB of content: a page of 700 items of
/// about 15 KB (10 MB) takes two, in one transaction with its resume point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_larger_than_one_upsert_statement_is_stored_whole_on_postgres() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    let database = common::fresh_postgres().await;
    let db = Database::connect(&database).await.expect("db");
    db.migrate().await.expect("migrate");
    let base = common::eds_items();
    let features: Vec<Value> = (0..700)
        .map(|i| {
            common::realistic_item(
                &base[i % base.len()],
                &format!("big-{i:03}"),
                "sentinel-2-l2a",
                "2024-05-01T10:00:00Z",
            )
        })
        .collect();
    let body = bytes::Bytes::from(
        serde_json::to_vec(&json!({"type": "FeatureCollection", "features": features}))
            .expect("json"),
    );
    assert!(body.len() > 9 << 20, "{} bytes", body.len());
    let request = stac_sync::stac::search::Request::get(
        url::Url::parse("http://127.0.0.1:9/search").expect("url"),
    );
    let page = stac_sync::stac::reader::parse_page(&body, &request, None).expect("page");
    let refused = db
        .commit_page(stac_sync::mirror::db::PageCommit {
            run_id: "r",
            job: "test",
            partition: "p",
            items: page.items.iter().collect(),
            rejected: &[],
            page_url: "http://127.0.0.1:9/search",
            resume: Some(&request),
            ends_page: true,
            features: page.features,
            matched: None,
            seen: Vec::new(),
            lease: None,
            snapshots: None,
        })
        .await
        .expect("committed")
        .refused;

    assert!(refused.is_empty());
    let stored = stored_items(&database).await;
    assert_eq!(stored.len(), 700);
    let resume = common::scalar(
        &database,
        "SELECT COUNT(*) FROM sync_state WHERE partition = 'p' AND resume IS NOT NULL",
    )
    .await;
    assert_eq!(resume, 1);
}
