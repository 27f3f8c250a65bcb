//! Scale-out: several `stac-sync run --worker` processes share one job through Postgres leases,
//! against a real STAC API (stac-server) that answers each search in 150 ms. Each test's result
//! is compared with an uninterrupted single run of the same job into another database.

mod common;

use common::tokens::Issuer;
use common::{Setup, fresh_postgres, stored_items, stored_objects};
use serde_json::Value;
use stac_sync::clock::ManualClock;
use stac_sync::config::EnvVars;
use stac_sync::error::Exit;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const COLLECTIONS: [&str; 2] = ["sentinel-2-l2a", "landsat-c2-l2"];
/// Eight yearly windows per collection: 16 partitions.
const DATETIME: &str = "2017-01-01T00:00:00Z/2024-12-31T23:59:59Z";
/// Items per collection and year: four pages of 25 per partition.
const PER_YEAR: usize = 100;
const LIMIT: u32 = 25;

/// A search request as the server saw it: when it arrived, and its body (POST).
#[derive(Debug, Clone)]
struct Seen {
    at: SystemTime,
    body: Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Answers each search 150 ms late (a remote API), and logs the ones answered.
async fn slow_and_logged(
    axum::extract::State(log): axum::extract::State<Log>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let at = SystemTime::now();
    let search = request.uri().path().ends_with("/search");
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let body_json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if search {
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let response = next
        .run(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(bytes),
        ))
        .await;
    if search && response.status().is_success() {
        log.lock().expect("lock").push(Seen {
            at,
            body: body_json,
        });
    }
    response
}

fn items() -> Vec<Value> {
    let base = common::eds_items();
    let mut items = Vec::new();
    for collection in COLLECTIONS {
        for year in 2017..2025 {
            for n in 0..PER_YEAR {
                let datetime = format!("{year}-{:02}-{:02}T10:00:00Z", 1 + n % 12, 1 + n % 28);
                items.push(common::realistic_item(
                    &base[n % base.len()],
                    &format!("{collection}-{year}-{n:03}"),
                    collection,
                    &datetime,
                ));
            }
        }
    }
    items
}

struct World {
    server: common::stac::StacServer,
    log: Log,
    env: EnvVars,
    clock: Arc<ManualClock>,
}

async fn world() -> World {
    let clock = Arc::new(ManualClock::default());
    let log: Log = Arc::default();
    let layer_log = log.clone();
    let server = common::stac::start_with(
        &items(),
        Issuer::new(clock.clone(), "id", "secret"),
        0,
        move |router| {
            router.layer(axum::middleware::from_fn_with_state(
                layer_log,
                slow_and_logged,
            ))
        },
    )
    .await;
    let env = common::credentials(&server.token_url, "id", "secret");
    World {
        server,
        log,
        env,
        clock,
    }
}

/// An uninterrupted single run of the job: its rows and objects, and the pages it fetched.
async fn reference(world: &World, dir: &Path) -> (BTreeMap<(String, String), String>, usize) {
    let setup = Setup {
        limit: LIMIT,
        job_extra: "datetime = \"2017-01-01T00:00:00Z/2024-12-31T23:59:59Z\"",
        database: Some(fresh_postgres().await),
        ..Setup::new(&world.server.url, dir, &COLLECTIONS, world.env.clone())
    };
    let summary = setup.run(world.clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    let pages = summary.jobs[0].counts.pages as usize;
    (stored_items(&setup.database_url()).await, pages)
}

/// Writes the workers' config into `dir` (objects in `dir/objects`).
fn worker_config(world: &World, dir: &Path, database: &str, extra: &str) {
    std::fs::write(
        dir.join("stac-sync.toml"),
        format!(
            "api_url = \"{}\"\ndatabase_url = \"{database}\"\nobject_store_url = \"file://{}\"\n{extra}\n\
             [[jobs]]\nname = \"test\"\ncollections = {COLLECTIONS:?}\nlimit = {LIMIT}\n\
             datetime = \"{DATETIME}\"\n",
            world.server.url,
            dir.join("objects").display(),
        ),
    )
    .expect("config");
}

fn spawn_worker(world: &World, dir: &Path) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin!("stac-sync"))
        .current_dir(dir)
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("EDS_AUTH_URL", &world.server.token_url)
        .env("EDS_CLIENT_ID", "id")
        .env("EDS_SECRET", "secret")
        .args(["run", "--worker"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns")
}

/// Waits for the workers; each must exit 0.
async fn finish_all(workers: Vec<Child>) {
    for child in workers {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("exits");
        assert_eq!(
            output.status.code(),
            Some(0),
            "a worker failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The mirror in `database` and `dir/objects` equals the reference run's.
async fn assert_mirrors_reference(
    database: &str,
    dir: &Path,
    expected: &BTreeMap<(String, String), String>,
    reference_dir: &Path,
) {
    assert_eq!(&stored_items(database).await, expected);
    assert_eq!(
        objects(&dir.join("objects")),
        objects(&reference_dir.join("objects"))
    );
}

/// The Postgres pool of a test database.
async fn postgres_pool(database: &str) -> sqlx::PgPool {
    match stac_sync::mirror::db::Database::connect(database)
        .await
        .expect("db")
    {
        stac_sync::mirror::db::Database::Postgres(db) => db.pool().clone(),
        stac_sync::mirror::db::Database::Sqlite(_) => panic!("a Postgres database"),
    }
}

/// Objects below `dir`, without the run manifests.
fn objects(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut objects = stored_objects(dir);
    objects.retain(|key, _| !key.starts_with('_'));
    objects
}

/// How many times each search body was answered.
fn repeats(log: &[Seen]) -> Vec<(String, usize)> {
    let mut counts = BTreeMap::<String, usize>::new();
    for seen in log {
        *counts.entry(seen.body.to_string()).or_default() += 1;
    }
    counts.into_iter().filter(|(_, n)| *n > 1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_share_a_job_and_store_every_item_once() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    let world = world().await;
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let (expected, pages) = reference(&world, reference_dir.path()).await;
    assert_eq!(expected.len(), COLLECTIONS.len() * 8 * PER_YEAR);
    assert_eq!(pages, 16 * 4, "16 partitions of 4 pages");
    world.log.lock().expect("lock").clear();

    let database = fresh_postgres().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Two partitions at a time per worker: 8 requests in flight in all.
    worker_config(&world, dir.path(), &database, "concurrency = 2");
    finish_all((0..4).map(|_| spawn_worker(&world, dir.path())).collect()).await;

    assert_mirrors_reference(&database, dir.path(), &expected, reference_dir.path()).await;
    let log = world.log.lock().expect("lock").clone();
    assert_eq!(repeats(&log), Vec::new(), "a page was fetched twice");
    assert_eq!(log.len(), pages, "every page fetched once");

    let pool = &postgres_pool(&database).await;
    let runs: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT status, pages, items_new, items_changed FROM sync_runs ORDER BY run_id",
    )
    .fetch_all(pool)
    .await
    .expect("runs");
    assert_eq!(runs.len(), 4);
    assert!(
        runs.iter()
            .all(|(status, pages, ..)| status == "succeeded" && *pages > 0),
        "every worker did part of the work: {runs:?}"
    );
    assert_eq!(
        runs.iter().map(|r| r.1).sum::<i64>(),
        pages as i64,
        "each page committed once: {runs:?}"
    );
    assert_eq!(
        runs.iter().map(|r| r.2).sum::<i64>(),
        expected.len() as i64,
        "each item stored new once: {runs:?}"
    );
    assert_eq!(runs.iter().map(|r| r.3).sum::<i64>(), 0);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sync_state WHERE partition <> ''")
        .fetch_one(pool)
        .await
        .expect("state");
    assert_eq!(left, 0, "the pass ended and its plan was removed");
    let watermark: Option<String> = sqlx::query_scalar(
        "SELECT watermark FROM sync_state WHERE job = 'test' AND partition = ''",
    )
    .fetch_one(pool)
    .await
    .expect("state");
    assert!(
        watermark.is_some(),
        "the watermark advanced once the pass was done"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_partitions_are_taken_over_after_its_lease_expires() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    let world = world().await;
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let (expected, _) = reference(&world, reference_dir.path()).await;
    world.log.lock().expect("lock").clear();

    let database = fresh_postgres().await;
    let pool = &postgres_pool(&database).await;
    let dir = tempfile::tempdir().expect("tempdir");
    worker_config(
        &world,
        dir.path(),
        &database,
        "concurrency = 2\nworker_lease = \"2s\"",
    );

    // The first worker pages until one of its partitions has a page committed, and dies.
    let mut first = spawn_worker(&world, dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sync_state WHERE kind = 'sync' AND NOT done AND pages_done >= 1 \
             AND lease_owner IS NOT NULL",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(0);
        if started > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first worker committed nothing"
        );
        assert!(
            first.try_wait().expect("wait").is_none(),
            "the first worker ended before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().expect("SIGKILL");
    let _ = first.wait();
    let killed_at = SystemTime::now();
    // What the dead worker held: partitions, their resume points and when the leases expire.
    let held: Vec<(String, String, String, f64)> = sqlx::query_as(
        "SELECT partition, request, resume, EXTRACT(EPOCH FROM lease_until)::float8 FROM sync_state \
         WHERE kind = 'sync' AND NOT done AND pages_done >= 1 AND lease_owner IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .expect("leases");
    assert!(!held.is_empty());

    // Two more workers finish the job.
    finish_all((0..2).map(|_| spawn_worker(&world, dir.path())).collect()).await;

    assert_mirrors_reference(&database, dir.path(), &expected, reference_dir.path()).await;
    let log = world.log.lock().expect("lock").clone();
    for (partition, first, resume, expires) in &held {
        let first: Value = serde_json::from_str(first).expect("a stored request");
        let resume: Value = serde_json::from_str(resume).expect("a stored request");
        let firsts = log.iter().filter(|seen| seen.body == first["body"]).count();
        assert_eq!(
            firsts, 1,
            "partition {partition} was paged again from its start"
        );
        let expires = UNIX_EPOCH + Duration::from_secs_f64(*expires);
        let after_kill: Vec<SystemTime> = log
            .iter()
            .filter(|seen| seen.body == resume["body"] && seen.at > killed_at)
            .map(|seen| seen.at)
            .collect();
        assert!(
            !after_kill.is_empty(),
            "partition {partition} was not resumed from its committed resume point"
        );
        // Database and test read the same system clock; 50 ms for rounding between them.
        assert!(
            after_kill
                .iter()
                .all(|at| *at + Duration::from_millis(50) >= expires),
            "partition {partition} was taken over before its lease expired"
        );
    }
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sync_state WHERE partition <> ''")
        .fetch_one(pool)
        .await
        .expect("state");
    assert_eq!(left, 0, "the pass ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_job_lock_with_each_other_and_never_with_a_single_run() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    let database = fresh_postgres().await;
    let db = stac_sync::mirror::db::Database::connect(&database)
        .await
        .expect("db");
    let exit = |taken: &Result<stac_sync::mirror::db::JobLock, stac_sync::error::Error>| {
        taken.as_ref().err().map(|e| e.exit())
    };

    let first = db.lock("test", true).await;
    let second = db.lock("test", true).await;
    assert!(first.is_ok() && second.is_ok(), "workers share the lock");
    assert_eq!(
        exit(&db.lock("test", false).await),
        Some(Exit::Locked),
        "a single run waits for the workers"
    );
    assert!(db.lock("other", false).await.is_ok(), "other jobs are free");
    for lock in [first, second] {
        lock.expect("held").release().await.expect("released");
    }

    let single = db.lock("test", false).await;
    assert!(single.is_ok());
    let worker = db.lock("test", true).await;
    assert_eq!(
        exit(&worker),
        Some(Exit::Locked),
        "workers wait for a single run"
    );
    let message = worker.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("single (non-worker)"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_was_taken_over_cannot_commit_the_partition() {
    if common::skip_without(common::Service::Postgres) {
        return;
    }
    use stac_sync::mirror::db::{Lease, PageCommit, PassKind, PlanCommit};
    let database = fresh_postgres().await;
    let db = stac_sync::mirror::db::Database::connect(&database)
        .await
        .expect("db");
    db.migrate().await.expect("migrate");
    let first = stac_sync::stac::search::Request::get(
        url::Url::parse("http://127.0.0.1:9/search?collections=a").expect("url"),
    );
    db.plan(PlanCommit {
        job: "test",
        kind: PassKind::Sync,
        search_hash: "h",
        search_changed: false,
        started_at: "2026-11-28T00:00:00Z",
        partitions: &[stac_sync::plan::Part {
            name: "a".into(),
            collection: "a".into(),
            first: first.clone(),
        }],
    })
    .await
    .expect("planned");
    let minute = Duration::from_secs(60);
    let a = Lease {
        owner: "worker-a",
        ttl: minute,
    };
    let b = Lease {
        owner: "worker-b",
        ttl: minute,
    };
    let commit = |lease: Lease<'static>| {
        let db = db.clone();
        let first = first.clone();
        async move {
            db.commit_page(PageCommit {
                run_id: lease.owner,
                job: "test",
                partition: "a",
                items: Vec::new(),
                rejected: &[],
                page_url: "http://127.0.0.1:9/search",
                resume: Some(&first),
                ends_page: true,
                features: 0,
                matched: None,
                seen: Vec::new(),
                lease: Some(lease),
                snapshots: None,
            })
            .await
        }
    };

    let claimed = db.claim("test", PassKind::Sync, &a).await.expect("claim");
    assert_eq!(claimed.map(|p| p.part.name), Some("a".to_string()));
    assert!(
        db.claim("test", PassKind::Sync, &b)
            .await
            .expect("claim")
            .is_none(),
        "a live lease is not claimable"
    );
    commit(a).await.expect("the holder commits");
    // Worker a stalls past its lease (its expiry is moved, not waited for); b takes over.
    common::execute(
        &database,
        "UPDATE sync_state SET lease_until = now() - interval '1 second' WHERE partition = 'a'",
    )
    .await;
    let taken = db.claim("test", PassKind::Sync, &b).await.expect("claim");
    assert_eq!(
        taken.and_then(|p| p.resume).map(|r| r.url),
        Some(first.url.clone()),
        "the taker resumes from the committed point"
    );
    let refused = commit(a).await;
    assert!(
        matches!(refused, Err(stac_sync::error::Error::LeaseLost { .. })),
        "{refused:?}"
    );
    let pages: i64 = common::scalar(
        &database,
        "SELECT pages_done FROM sync_state WHERE partition = 'a'",
    )
    .await;
    assert_eq!(pages, 1, "the stale worker's page was not committed");
    commit(b).await.expect("the new holder commits");
}
