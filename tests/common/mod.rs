//! Test harness: a real STAC API (rustac's `stac-server`, memory backend) behind our own OAuth2
//! token layer, a fixture server of our own for faults a real server cannot produce on cue,
//! and helpers to configure and run a sync against either.
#![allow(dead_code)]

pub mod azurite;
pub mod bulk;
pub mod fixture;
pub mod moto;
pub mod services;
pub mod stac;
pub mod tokens;

#[allow(unused_imports)]
pub use services::{Service, skip_without};

use serde_json::Value;
use stac_sync::clock::ManualClock;
use stac_sync::config::{Config, EnvVars, FileConfig, Overrides};
use stac_sync::mirror::db::Database;
use stac_sync::run::{self, RunOptions, Summary};
use std::path::Path;
use std::sync::Arc;

/// The real EDS items of the shared fixtures.
pub fn eds_items() -> Vec<Value> {
    let text = include_str!("../fixtures/eds-test_data.json");
    let doc: Value = serde_json::from_str(text).expect("fixture is JSON");
    doc["features"].as_array().expect("features").clone()
}

/// `n` distinct items in `collection`, made from the real EDS items with new ids.
pub fn make_items(collection: &str, n: usize) -> Vec<Value> {
    let base = eds_items();
    (0..n)
        .map(|i| {
            let mut item = base[i % base.len()].clone();
            item["id"] = Value::String(format!("{}-{i:05}", item["id"].as_str().expect("id")));
            item["collection"] = Value::String(collection.to_string());
            item["links"] = Value::Array(Vec::new());
            item
        })
        .collect()
}

/// A Sentinel-2 L2A-like item of about 15 KB for benchmarks: a real EDS item (about 6 KB, with
/// its assets, roles, types, bands and projection fields) whose assets are repeated under new
/// keys (about 20 in all), with id `id` in `collection`, acquired at `datetime`.
pub fn realistic_item(base: &Value, id: &str, collection: &str, datetime: &str) -> Value {
    let mut item = base.clone();
    item["id"] = Value::String(id.to_string());
    item["collection"] = Value::String(collection.to_string());
    item["links"] = Value::Array(Vec::new());
    if let Some(properties) = item["properties"].as_object_mut() {
        properties.remove("start_datetime");
        properties.remove("end_datetime");
        properties.insert("datetime".into(), Value::String(datetime.to_string()));
    }
    let assets = item["assets"].as_object().cloned().unwrap_or_default();
    let mut grown = assets.clone();
    for round in 0..4 {
        for (key, asset) in &assets {
            grown.insert(format!("{key}-r{round}"), asset.clone());
        }
    }
    item["assets"] = Value::Object(grown);
    item
}

/// Client credentials for the test token endpoints (`tokens::Issuer`), at `token_url`.
pub fn credentials(token_url: &str, id: &str, secret: &str) -> EnvVars {
    EnvVars {
        token_url: Some(token_url.to_string()),
        client_id: Some(id.to_string()),
        client_secret: Some(secrecy::SecretString::from(secret.to_string())),
        ..EnvVars::default()
    }
}

/// Settings of a test run.
pub struct Setup<'a> {
    pub api_url: &'a str,
    pub dir: &'a Path,
    pub collections: Vec<String>,
    pub limit: u32,
    pub method: &'a str,
    /// Extra TOML appended to the generated file (an `[auth]` or `[http]` table).
    pub extra: String,
    /// Extra keys of the job (`incremental = "off"`).
    pub job_extra: &'a str,
    pub env: EnvVars,
    /// Database URL; SQLite in `dir` when `None`.
    pub database: Option<String>,
    /// Object store URL; a folder in `dir` when `None`.
    pub objects: Option<String>,
    /// Top-level keys (`database_format = "pgstac"`).
    pub top: &'a str,
}

impl<'a> Setup<'a> {
    /// A POST job named "test" over `collections`, pages of 3, SQLite and a folder in `dir`.
    pub fn new(api_url: &'a str, dir: &'a Path, collections: &[&str], env: EnvVars) -> Setup<'a> {
        Setup {
            api_url,
            dir,
            collections: collections.iter().map(|c| c.to_string()).collect(),
            limit: 3,
            method: "POST",
            extra: String::new(),
            job_extra: "",
            env,
            database: None,
            objects: None,
            top: "",
        }
    }

    pub fn database_url(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.dir.join("mirror.db").display()))
    }

    pub fn object_store_url(&self) -> String {
        self.objects
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.objects_dir().display()))
    }

    pub fn objects_dir(&self) -> std::path::PathBuf {
        self.dir.join("objects")
    }

    pub fn config(&self) -> Config {
        let toml = format!(
            r#"
api_url = "{api}"
database_url = "{db}"
object_store_url = "{objects}"
concurrency = 4
{top}

[http]
backoff_base = "10ms"
backoff_max = "200ms"
max_retries = 5

[[jobs]]
name = "test"
collections = {collections:?}
limit = {limit}
method = "{method}"
{job_extra}
{extra}
"#,
            api = self.api_url,
            db = self.database_url(),
            objects = self.object_store_url(),
            collections = self.collections,
            limit = self.limit,
            method = self.method,
            extra = self.extra,
            job_extra = self.job_extra,
            top = self.top,
        );
        let file: FileConfig = toml::from_str(&toml).expect("test config parses");
        let overrides = Overrides {
            env: self.env.clone(),
            ..Overrides::default()
        };
        Config::resolve(file, &overrides).expect("test config is valid")
    }

    pub async fn run(&self, clock: Arc<ManualClock>) -> Summary {
        self.run_with(clock, false).await
    }

    /// A run that also reconciles (`run --reconcile`).
    pub async fn reconcile(&self, clock: Arc<ManualClock>) -> Summary {
        self.run_with(clock, true).await
    }

    async fn run_with(&self, clock: Arc<ManualClock>, reconcile: bool) -> Summary {
        run::run(
            &self.config(),
            RunOptions {
                clock,
                migrate: true,
                reconcile,
                ..RunOptions::default()
            },
        )
        .await
        .expect("the run is recorded")
    }
}

/// Runs `stac-sync ARGS` in `dir` with a clean environment, and checks that it succeeded;
/// its output. `binary` is the test's `cargo_bin!("stac-sync")`.
pub fn binary_ok(binary: &Path, dir: &Path, args: &[&str]) -> std::process::Output {
    let output = std::process::Command::new(binary)
        .current_dir(dir)
        .env_clear()
        .args(args)
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "stac-sync {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `stac-sync run` of `binary` (the test's `cargo_bin!("stac-sync")`) in `dir` (from its
/// `stac-sync.toml`), with a clean environment but the token endpoint and the credentials `id`
/// / `secret`, quiet.
pub fn binary_run(binary: &Path, dir: &Path, token_url: &str) -> std::process::Command {
    let mut command = std::process::Command::new(binary);
    command
        .current_dir(dir)
        .env_clear()
        .env("RUST_LOG", "error")
        .env("EDS_AUTH_URL", token_url)
        .env("EDS_CLIENT_ID", "id")
        .env("EDS_SECRET", "secret")
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    command
}

/// Starts `kills` runs of `run()`, and SIGKILLs each once the API has answered between
/// `between` more `searches` than when it started (a random number). Panics if a run ends
/// before it is killed, or makes no progress for a minute.
pub async fn kill_runs(
    run: impl Fn() -> std::process::Command,
    searches: &Arc<std::sync::atomic::AtomicUsize>,
    kills: usize,
    between: std::ops::RangeInclusive<usize>,
) {
    use rand::Rng;
    use std::sync::atomic::Ordering;
    for _ in 0..kills {
        let mut child = run().spawn().expect("spawns");
        let target = searches.load(Ordering::SeqCst) + rand::rng().random_range(between.clone());
        let watched = searches.clone();
        let killed = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
                if watched.load(Ordering::SeqCst) >= target {
                    let _ = child.kill(); // SIGKILL
                    let _ = child.wait();
                    return true;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the run made no progress"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
        .await
        .expect("join");
        assert!(killed, "the run finished before it could be killed");
    }
}

/// Runs `run` to its end; its exit code.
pub async fn run_to_end(mut run: std::process::Command) -> Option<i32> {
    tokio::task::spawn_blocking(move || run.status().expect("runs").code())
        .await
        .expect("join")
}

/// Every stored row: (collection, id) → content.
pub async fn stored_items(
    database_url: &str,
) -> std::collections::BTreeMap<(String, String), String> {
    let db = Database::connect(database_url).await.expect("db");
    db.all_items()
        .await
        .expect("rows")
        .into_iter()
        .map(|(c, i, content)| ((c, i), content))
        .collect()
}

/// Runs one query without parameters, valid on both backends, returning pairs of text.
pub async fn pairs(database_url: &str, sql: &'static str) -> Vec<(String, String)> {
    match Database::connect(database_url).await.expect("db") {
        Database::Sqlite(db) => sqlx::query_as(sql).fetch_all(db.pool()).await,
        Database::Postgres(db) => sqlx::query_as(sql).fetch_all(db.pool()).await,
    }
    .expect(sql)
}

/// Runs one SQL statement without parameters, valid on both backends, returning one integer.
pub async fn scalar(database_url: &str, sql: &'static str) -> i64 {
    match Database::connect(database_url).await.expect("db") {
        Database::Sqlite(db) => sqlx::query_scalar(sql).fetch_one(db.pool()).await,
        Database::Postgres(db) => sqlx::query_scalar(sql).fetch_one(db.pool()).await,
    }
    .expect(sql)
}

/// Runs one SQL statement without parameters, valid on both backends.
pub async fn execute(database_url: &str, sql: &'static str) {
    match Database::connect(database_url).await.expect("db") {
        Database::Sqlite(db) => sqlx::query(sql).execute(db.pool()).await.map(|_| ()),
        Database::Postgres(db) => sqlx::query(sql).execute(db.pool()).await.map(|_| ()),
    }
    .expect(sql)
}

/// Quarantined features as (reason, page URL), in order.
pub async fn quarantined(database_url: &str) -> Vec<(String, String)> {
    let sql = "SELECT reason, page_url FROM quarantine ORDER BY seq";
    match Database::connect(database_url).await.expect("db") {
        Database::Sqlite(db) => sqlx::query_as(sql).fetch_all(db.pool()).await,
        Database::Postgres(db) => sqlx::query_as(sql).fetch_all(db.pool()).await,
    }
    .expect("quarantine")
}

/// The server the Postgres tests use; `STAC_SYNC_TEST_POSTGRES` overrides it.
pub fn postgres_server() -> String {
    std::env::var("STAC_SYNC_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A new, empty Postgres database for one test.
pub async fn fresh_postgres() -> String {
    use sqlx::Connection;
    let server = postgres_server();
    let mut conn = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .expect("Postgres is reachable (start it with pg_ctlcluster, see .ci/run)");
    let name = format!("stac_sync_test_{:016x}", rand::random::<u64>());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    format!("{server}/{name}")
}

/// A new Postgres database with pgstac installed (`pypgstac migrate`), for one test; its URL
/// names stac-sync's schema first, so that the tests' queries read stac-sync's tables.
pub async fn fresh_pgstac() -> String {
    fresh_pgstac_at(None).await
}

/// Like [`fresh_pgstac`], with pgstac at `version` (`pypgstac migrate --toversion`), else the
/// version pypgstac installs.
pub async fn fresh_pgstac_at(version: Option<&str>) -> String {
    use sqlx::Connection;
    let url = fresh_postgres().await;
    // pgstac's roles are the server's, not the database's: one migration at a time, across
    // the test binaries too.
    let mut lock = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_server()))
        .await
        .expect("Postgres");
    sqlx::query("SELECT pg_advisory_lock(4747)")
        .execute(&mut lock)
        .await
        .expect("lock");
    let output = std::process::Command::new("pypgstac")
        .args(["migrate", "--dsn", &url])
        .args(version.map(|v| ["--toversion", v]).into_iter().flatten())
        .output()
        .expect("pypgstac runs (scripts/test installs it)");
    let _ = lock.close().await;
    assert!(
        output.status.success(),
        "pypgstac migrate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    format!("{url}?options=-c%20search_path%3Dstac_sync%2Cpublic")
}

/// Every object under a folder, by relative path.
pub fn stored_objects(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .expect("below dir")
                    .display()
                    .to_string();
                out.insert(rel, std::fs::read(&path).expect("readable"));
            }
        }
    }
    out
}

/// Classifies each of `pages` and commits its new and changed items as a run does, each page
/// its own partition (`p0`, `p1`, ...), all at once; the commits' results, in order. For the
/// benchmarks of the write path.
pub async fn commit_pages(
    db: &Database,
    pages: &[stac_sync::stac::reader::Page],
    request: &stac_sync::stac::search::Request,
) -> Vec<stac_sync::mirror::db::Committed> {
    use stac_sync::mirror::db::{Known, PageCommit};
    let partitions: Vec<String> = (0..pages.len()).map(|p| format!("p{p}")).collect();
    let mut commits = Vec::new();
    for (page, partition) in pages.iter().zip(&partitions) {
        let known = db
            .classify(&page.items)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let changed: Vec<_> = page
            .items
            .iter()
            .zip(&known)
            .filter(|(_, k)| **k != Known::Unchanged)
            .map(|(i, _)| i)
            .collect();
        commits.push(db.commit_page(PageCommit {
            run_id: "bench",
            job: "bench",
            partition,
            items: changed,
            rejected: &[],
            page_url: "http://bench/search",
            resume: Some(request),
            ends_page: true,
            features: page.features,
            matched: None,
            seen: Vec::new(),
            lease: None,
            snapshots: None,
        }));
    }
    futures_util::future::join_all(commits)
        .await
        .into_iter()
        .map(|committed| committed.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}
