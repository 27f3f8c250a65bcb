//! Configuration: built-in defaults → TOML file → environment → command-line flags (later wins).
//!
//! [`FileConfig`] is the TOML file, strict (`deny_unknown_fields`); [`Overrides`] is what the
//! environment and the command line say (clap reads `STAC_SYNC_*` variables into the same fields
//! as the flags, so a flag beats its variable and both beat the file). [`Config::resolve`] merges
//! them and validates the result without any I/O. Secrets are [`SecretString`]s: they never
//! appear in `Debug`, logs or errors.

mod schedule;

pub use schedule::parse_schedule;

use crate::domain::{Bbox, Datetime, Interval, parse_instant};
use crate::error::Error;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// Where the STAC root lives below a bare EDS host (`EDS_API_URL=https://api.earthdaily.com`).
pub const EDS_STAC_PATH: &str = "/platform/v1/stac";
/// The default database: SQLite in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://stac-sync.db";
/// The default object store: a local folder in the working directory.
pub const DEFAULT_OBJECT_STORE_URL: &str = "file://./stac-sync-items";
/// Default worker lease: a worker renews it every third of it, so a minute rides out database
/// hiccups, and a dead worker's partitions wait at most a minute for another.
pub const DEFAULT_WORKER_LEASE: Duration = Duration::from_secs(60);
/// How long the change feed keeps a change by default.
pub const DEFAULT_CHANGES_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// The default configuration file, read if present.
pub const DEFAULT_CONFIG_FILE: &str = "stac-sync.toml";
/// Default page size: large pages mean fewer round trips; most APIs cap it anyway.
pub const DEFAULT_LIMIT: u32 = 250;
/// Default cap on API requests in flight (EDS allows 30 per account; stay well under).
pub const DEFAULT_CONCURRENCY: usize = 8;
/// The default `max_item_bytes`: a feature larger than this is quarantined with its size.
pub const DEFAULT_MAX_ITEM_BYTES: usize = 32 << 20;
/// The default `[http] page_deadline`: twice the default `timeout` of one attempt.
pub const DEFAULT_PAGE_DEADLINE: Duration = Duration::from_secs(600);

/// The TOML configuration file. Every key is optional; unknown keys are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The STAC API root (its landing page).
    pub api_url: Option<String>,
    /// `sqlite://...` or `postgres://...`.
    pub database_url: Option<String>,
    /// `stac-sync` (its own schema) or `pgstac` (into an existing pgstac database).
    pub database_format: Option<DatabaseFormat>,
    /// `file://...`, `s3://...`, ... or `none`.
    pub object_store_url: Option<String>,
    /// Default page size for jobs that set none.
    pub limit: Option<u32>,
    /// Cap on API requests in flight.
    pub concurrency: Option<usize>,
    /// Largest feature stored, in bytes.
    pub max_item_bytes: Option<usize>,
    /// Requests a second to the API, at most.
    pub max_requests_per_second: Option<f64>,
    /// Prometheus text file written after each run (node_exporter's textfile collector).
    pub metrics_file: Option<PathBuf>,
    /// Pushgateway to push each run's metrics to.
    pub pushgateway_url: Option<String>,
    /// How long a worker's claim on a partition holds without renewal (`run --worker`).
    #[serde(default, with = "humantime_serde")]
    pub worker_lease: Option<Duration>,
    /// How long the change feed keeps a change (`0s`: for ever).
    #[serde(default, with = "humantime_serde")]
    pub changes_retention: Option<Duration>,
    /// Where each run POSTs the change feed as it commits.
    pub webhook_url: Option<String>,
    /// Files rewritten after each pass from the database for the windows it changed:
    /// `["geoparquet"]`, or `[]` (the default). A job's own `snapshots` replaces it.
    pub snapshots: Option<Vec<SnapshotFormat>>,
    /// The datetime window of one snapshot file: `year` (the default) or `month`.
    pub snapshot_window: Option<SnapshotWindow>,
    /// Options of the object store (object_store configuration keys, e.g. `aws_endpoint`).
    #[serde(default)]
    pub object_store: BTreeMap<String, String>,
    /// Authentication.
    #[serde(default)]
    pub auth: AuthFile,
    /// Extra headers sent with every API request (not to the token endpoint).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeouts and retries.
    #[serde(default)]
    pub http: HttpFile,
    /// Bulk search (a job's `backfill = "bulk"`).
    #[serde(default)]
    pub bulk: BulkFile,
    /// The jobs.
    #[serde(default)]
    pub jobs: Vec<JobConfig>,
}

/// The `[auth]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// `oauth2-client-credentials`, `bearer` or `none`; inferred when absent.
    pub kind: Option<AuthKind>,
    /// The OAuth2 token endpoint.
    pub token_url: Option<String>,
    /// The OAuth2 client id.
    pub client_id: Option<String>,
    /// The OAuth2 client secret (prefer the environment).
    pub client_secret: Option<SecretString>,
    /// How the client authenticates to the token endpoint.
    pub auth_style: Option<AuthStyle>,
    /// Optional OAuth2 scope.
    pub scope: Option<String>,
    /// A static bearer token (kind `bearer`).
    pub token: Option<SecretString>,
}

/// The `[bulk]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkFile {
    /// How long a bulk search job may take before its job is paged instead.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// The first pause between two polls of a bulk search job (then doubled, up to a minute).
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
}

/// The `[http]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    /// TCP + TLS connect timeout.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Longest wait for the next bytes of a response.
    #[serde(default, with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    /// Longest time for a whole request, body included.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Longest time for a search page, all its attempts and waits included.
    #[serde(default, with = "humantime_serde")]
    pub page_deadline: Option<Duration>,
    /// Retries of one request before giving up.
    pub max_retries: Option<u32>,
    /// Total time one request may spend waiting between retries.
    #[serde(default, with = "humantime_serde")]
    pub retry_budget: Option<Duration>,
    /// First backoff step (full jitter: a random wait up to this, doubling each retry).
    #[serde(default, with = "humantime_serde")]
    pub backoff_base: Option<Duration>,
    /// Largest backoff step.
    #[serde(default, with = "humantime_serde")]
    pub backoff_max: Option<Duration>,
}

/// The authentication kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthKind {
    /// OAuth2 client credentials (RFC 6749 §4.4).
    #[value(name = "oauth2-client-credentials")]
    #[serde(rename = "oauth2-client-credentials")]
    ClientCredentials,
    /// A static bearer token.
    Bearer,
    /// No authentication.
    None,
}

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthStyle {
    /// HTTP Basic with the form-urlencoded id and secret (the default).
    #[default]
    Basic,
    /// `client_id` and `client_secret` as form fields.
    Post,
}

/// Whether a database URL names Postgres (else SQLite).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// What the database holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseFormat {
    /// stac-sync's own tables (`items`, `collections`, ...), SQLite or Postgres.
    #[default]
    #[serde(rename = "stac-sync")]
    #[value(name = "stac-sync")]
    StacSync,
    /// Items and collections in pgstac (items dehydrated and copied in as pgstac's loader
    /// does, collections through its functions), so that stac-fastapi-pgstac serves the
    /// mirror; stac-sync's own tables in schema `stac_sync`.
    Pgstac,
}

/// A kind of snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotFormat {
    /// stac-geoparquet, one file per collection and datetime window.
    Geoparquet,
}

/// The datetime window of one snapshot file, by the calendar date its items' `datetime` (or
/// `start_datetime`) is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotWindow {
    /// `{year}.parquet`.
    #[default]
    Year,
    /// `{year}-{month}.parquet`: for collections of hundreds of thousands of items a year.
    Month,
}

impl SnapshotWindow {
    /// How many leading characters of a datetime name its window: 4 (`2024`) or 7 (`2024-05`).
    pub fn prefix_len(self) -> usize {
        match self {
            SnapshotWindow::Year => 4,
            SnapshotWindow::Month => 7,
        }
    }
}

/// The HTTP method of the first search request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "UPPERCASE")]
pub enum SearchMethod {
    /// `GET /search?...`
    #[value(name = "GET")]
    Get,
    /// `POST /search` with a JSON body (the default).
    #[default]
    #[value(name = "POST")]
    Post,
}

/// One job: a search to mirror.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Unique name; keys the job's state and lock.
    pub name: String,
    /// The collections to mirror.
    pub collections: Vec<String>,
    /// `[xmin, ymin, xmax, ymax]` (or 6 numbers with heights).
    pub bbox: Option<Vec<f64>>,
    /// A GeoJSON geometry.
    pub intersects: Option<Value>,
    /// An RFC 3339 instant or interval (`2024-01-01T00:00:00Z/..`).
    pub datetime: Option<String>,
    /// Query extension object.
    pub query: Option<Value>,
    /// CQL2-JSON filter.
    pub filter: Option<Value>,
    /// Page size.
    pub limit: Option<u32>,
    /// `GET` or `POST` (default).
    pub method: Option<SearchMethod>,
    /// Cron expression for `stac-sync daemon`.
    pub schedule: Option<String>,
    /// Datetime window of a partition: `year` (the default), `month` or `none`.
    pub window: Option<Window>,
    /// How later passes find what changed: `auto` (the default), `updated`, `datetime`, `off`.
    pub incremental: Option<Incremental>,
    /// `datetime` strategy: how far before the watermark acquisition times are re-scanned.
    #[serde(default, with = "humantime_serde")]
    pub lookback: Option<Duration>,
    /// `updated` strategy: how far before the watermark `updated` is re-read.
    #[serde(default, with = "humantime_serde")]
    pub overlap: Option<Duration>,
    /// How far behind the pass's start the watermark stays.
    #[serde(default, with = "humantime_serde")]
    pub safety_lag: Option<Duration>,
    /// Reconcile (sweep ids, tombstone what vanished) when the last one is older than this.
    #[serde(default, with = "humantime_serde")]
    pub reconcile_every: Option<Duration>,
    /// What happens to the object of an item deleted upstream: `keep` (the default) or `delete`.
    pub deleted_objects: Option<DeletedObjects>,
    /// A partition whose search matches more items than this is split in two halves of its
    /// datetime window, recursively (0: never split).
    pub max_partition_items: Option<u64>,
    /// Snapshot files of this job's collections (replaces the file's top-level `snapshots`).
    pub snapshots: Option<Vec<SnapshotFormat>>,
    /// How the first pass gets the job's items: `paging` (the default), `bulk` or `auto`.
    pub backfill: Option<Backfill>,
}

/// The datetime window of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    /// Calendar years, UTC (EDS partitions large collections by year).
    #[default]
    Year,
    /// Calendar months, UTC.
    Month,
    /// One partition per collection.
    None,
}

/// How a job's first pass (no watermark yet) gets its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backfill {
    /// Pages the search, as every later pass does.
    #[default]
    Paging,
    /// Has the API export the search as files (EDS bulk search) and reads them; pages instead,
    /// with a warning, when the export fails or takes longer than `[bulk] timeout`.
    Bulk,
    /// As `bulk`, where the API offers bulk search; pages quietly where it does not.
    Auto,
}

/// How a pass after the backfill finds what may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Incremental {
    /// `updated` if the server offers Sort, Filter and an `updated` queryable, else `datetime`.
    #[default]
    Auto,
    /// `updated >= watermark - overlap`, sorted by `updated`.
    Updated,
    /// Acquisition datetimes from `watermark - lookback` on.
    Datetime,
    /// Every pass is a full pass.
    Off,
}

/// What happens to the object of an item deleted upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeletedObjects {
    /// Keep it: the row's `deleted_at` says it is gone (never a hard delete by default).
    #[default]
    Keep,
    /// Delete it, so the store holds exactly the live items.
    Delete,
}

/// Items are published days after acquisition: a `datetime` pass re-scans this far back.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(7 * 86_400);
/// Upstream `updated` stamps can become visible late (ingest transactions): re-read this much.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(3600);
/// Search engines behind STAC APIs stop paging one search at 10,000 results (Elasticsearch's
/// `max_result_window`, which stac-server keeps).
pub const DEFAULT_MAX_PARTITION_ITEMS: u64 = 10_000;
/// Clock skew between us and the API, and transactions in flight there.
/// How long a bulk search may take to export: a whole EDS collection takes a while.
pub const DEFAULT_BULK_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
pub const DEFAULT_SAFETY_LAG: Duration = Duration::from_secs(300);

/// Settings from the environment and the command line (clap fills them).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Configuration file [default: stac-sync.toml if present].
    #[arg(long, global = true, value_name = "FILE", env = "STAC_SYNC_CONFIG")]
    pub config: Option<PathBuf>,
    /// STAC API root (or EDS base host) [env: STAC_SYNC_API_URL, EDS_API_URL].
    #[arg(long, global = true, env = "STAC_SYNC_API_URL", hide_env = true)]
    pub api_url: Option<String>,
    /// Database URL [default: sqlite://stac-sync.db].
    #[arg(long, global = true, env = "STAC_SYNC_DATABASE_URL")]
    pub database_url: Option<String>,
    /// What the database holds: `stac-sync` (its own tables) or `pgstac` (items and
    /// collections in an existing pgstac database, stac-sync's own tables in schema stac_sync)
    /// [default: stac-sync].
    #[arg(long, global = true, env = "STAC_SYNC_DATABASE_FORMAT", value_enum)]
    pub database_format: Option<DatabaseFormat>,
    /// Object store URL, or `none` [default: file://./stac-sync-items].
    #[arg(long, global = true, env = "STAC_SYNC_OBJECT_STORE_URL")]
    pub object_store_url: Option<String>,
    /// Page size.
    #[arg(long, global = true, env = "STAC_SYNC_LIMIT")]
    pub limit: Option<u32>,
    /// Cap on API requests in flight.
    #[arg(long, global = true, env = "STAC_SYNC_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Largest feature stored, in bytes; a larger one is quarantined [default: 33554432].
    #[arg(long, global = true, env = "STAC_SYNC_MAX_ITEM_BYTES")]
    pub max_item_bytes: Option<usize>,
    /// Requests a second to the API, at most (per process) [default: no limit].
    #[arg(long, global = true, env = "STAC_SYNC_MAX_REQUESTS_PER_SECOND")]
    pub max_requests_per_second: Option<f64>,
    /// Prometheus text file written after each run (for node_exporter's textfile collector).
    #[arg(long, global = true, env = "STAC_SYNC_METRICS_FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Pushgateway base URL to push each run's metrics to.
    #[arg(long, global = true, env = "STAC_SYNC_PUSHGATEWAY_URL")]
    pub pushgateway_url: Option<String>,
    /// A URL each run POSTs the change feed to, as it commits (JSON, retried; at least once).
    #[arg(long, global = true, env = "STAC_SYNC_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Snapshot files rewritten after each pass for the windows it changed: `geoparquet`
    /// (several: comma-separated; `none`: none) [default: none].
    #[arg(long, global = true, env = "STAC_SYNC_SNAPSHOTS", value_delimiter = ',', value_parser = parse_snapshots)]
    pub snapshots: Option<Vec<Option<SnapshotFormat>>>,
    /// The datetime window of one snapshot file: `year` or `month` [default: year].
    #[arg(long, global = true, env = "STAC_SYNC_SNAPSHOT_WINDOW", value_enum)]
    pub snapshot_window: Option<SnapshotWindow>,
    /// How long the change feed keeps a change; 0s keeps them for ever [default: 30d].
    #[arg(long, global = true, env = "STAC_SYNC_CHANGES_RETENTION", value_parser = humantime::parse_duration)]
    pub changes_retention: Option<Duration>,
    /// How long a worker's claim on a partition holds without renewal [default: 1m].
    #[arg(long, global = true, env = "STAC_SYNC_WORKER_LEASE", value_parser = humantime::parse_duration)]
    pub worker_lease: Option<Duration>,
    /// Authentication kind [default: inferred from the credentials given].
    #[arg(long, global = true, env = "STAC_SYNC_AUTH", value_enum)]
    pub auth: Option<AuthKind>,
    /// Run only this job from the file.
    #[arg(long, global = true)]
    pub job: Option<String>,
    /// One-off job: collection to mirror (repeat for several); replaces the file's jobs.
    #[arg(long = "collection", value_name = "ID", global = true)]
    pub collections: Vec<String>,
    /// One-off job: bounding box `xmin,ymin,xmax,ymax`.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        allow_hyphen_values = true,
        num_args = 1
    )]
    pub bbox: Option<Vec<f64>>,
    /// One-off job: datetime instant or interval (`2024-01-01T00:00:00Z/2024-12-31T23:59:59Z`).
    #[arg(long, global = true)]
    pub datetime: Option<String>,
    /// One-off job: HTTP method of the search.
    #[arg(long, value_enum, global = true)]
    pub method: Option<SearchMethod>,
    /// Environment variables that are not flags (secrets never are), read by `main`.
    #[arg(skip)]
    pub env: EnvVars,
}

/// Variables read only from the environment (secrets must not be flags: `ps` shows flags).
#[derive(Debug, Default, Clone)]
pub struct EnvVars {
    /// `STAC_SYNC_API_URL` is read by clap; this is `EDS_API_URL`.
    pub eds_api_url: Option<String>,
    /// `STAC_SYNC_TOKEN_URL` or `EDS_AUTH_URL`.
    pub token_url: Option<String>,
    /// `STAC_SYNC_CLIENT_ID` or `EDS_CLIENT_ID`.
    pub client_id: Option<String>,
    /// `STAC_SYNC_CLIENT_SECRET` or `EDS_SECRET`.
    pub client_secret: Option<SecretString>,
    /// `STAC_SYNC_TOKEN`: a static bearer token.
    pub token: Option<SecretString>,
}

impl EnvVars {
    /// Reads the variables from the process environment (after `.env` was loaded).
    pub fn from_env() -> EnvVars {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
        };
        EnvVars {
            eds_api_url: var(&["EDS_API_URL"]),
            token_url: var(&["STAC_SYNC_TOKEN_URL", "EDS_AUTH_URL"]),
            client_id: var(&["STAC_SYNC_CLIENT_ID", "EDS_CLIENT_ID"]),
            client_secret: var(&["STAC_SYNC_CLIENT_SECRET", "EDS_SECRET"]).map(SecretString::from),
            token: var(&["STAC_SYNC_TOKEN"]).map(SecretString::from),
        }
    }
}

/// What the database's own commands need (`status`, `changes`, `migrate`, `export`): the
/// database, and for `export` the object store's options and the snapshot window. No STAC API:
/// a consumer of the change feed may know only the database's URL.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `sqlite://...` or `postgres://...`.
    pub database_url: String,
    /// What the database holds.
    pub database_format: DatabaseFormat,
    /// `[object_store]` options (credentials, region) for `export` to an object store URL.
    pub object_store_options: BTreeMap<String, String>,
    /// The window of a snapshot file.
    pub snapshot_window: SnapshotWindow,
}

impl DatabaseConfig {
    /// Loads the file as [`Config::load`] does, and resolves only the database's settings.
    pub fn load(overrides: &Overrides) -> Result<DatabaseConfig, Error> {
        let file = read_config(overrides)?;
        let (database_url, database_format) =
            resolve_database(overrides, file.database_url, file.database_format)?;
        Ok(DatabaseConfig {
            database_url,
            database_format,
            object_store_options: file.object_store,
            snapshot_window: overrides
                .snapshot_window
                .or(file.snapshot_window)
                .unwrap_or_default(),
        })
    }
}

/// The config file: the given one, or `stac-sync.toml` if present, or none.
fn read_config(overrides: &Overrides) -> Result<FileConfig, Error> {
    match &overrides.config {
        Some(path) => read_file(path),
        None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
            read_file(Path::new(DEFAULT_CONFIG_FILE))
        }
        None => Ok(FileConfig::default()),
    }
}

/// The resolved, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The STAC API root, with a trailing slash so relative paths resolve below it.
    pub api_root: Url,
    /// When `EDS_API_URL` is a bare host: that host. Its own root is the STAC root if it serves
    /// a STAC landing page there (with `conformsTo`); else `api_root` ([`EDS_STAC_PATH`]) is.
    /// Decided when a run starts (it takes a request), not here.
    pub api_host: Option<Url>,
    /// Authentication.
    pub auth: Auth,
    /// Extra headers on every API request.
    pub headers: Vec<(String, String)>,
    /// Timeouts and retries.
    pub http: HttpSettings,
    /// Cap on API requests in flight.
    pub concurrency: usize,
    /// The database URL.
    pub database_url: String,
    /// What the database holds.
    pub database_format: DatabaseFormat,
    /// The object store URL; `None` when turned off.
    pub object_store_url: Option<String>,
    /// Options for the object store.
    pub object_store_options: BTreeMap<String, String>,
    /// Prometheus text file to write after each run.
    pub metrics_file: Option<PathBuf>,
    /// Pushgateway to push to after each run.
    pub pushgateway_url: Option<Url>,
    /// How long a worker's claim on a partition holds without renewal.
    pub worker_lease: Duration,
    /// How long the change feed keeps a change; `None`: for ever.
    pub changes_retention: Option<Duration>,
    /// Where runs POST the change feed.
    pub webhook_url: Option<Url>,
    /// The datetime window of one snapshot file (for `export` too).
    pub snapshot_window: SnapshotWindow,
    /// A feature larger than this (bytes) is quarantined with its size, not held whole.
    pub max_item_bytes: usize,
    /// Requests a second to the API, at most (per process); `None`: no limit but the server's.
    pub max_requests_per_second: Option<f64>,
    /// How long a bulk search may take to export before its job is paged instead.
    pub bulk_timeout: Duration,
    /// The first pause between two polls of a bulk search job.
    pub bulk_poll_interval: Duration,
    /// The jobs to run, in order.
    pub jobs: Vec<Job>,
}

/// Resolved authentication.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No `Authorization` header.
    None,
    /// A static bearer token.
    Bearer(SecretString),
    /// OAuth2 client credentials.
    ClientCredentials(ClientCredentials),
}

/// OAuth2 client-credentials settings.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    /// The token endpoint.
    pub token_url: Url,
    /// The client id (not a secret, but not logged either).
    pub client_id: String,
    /// The client secret.
    pub client_secret: SecretString,
    /// Basic or form-field client authentication.
    pub style: AuthStyle,
    /// Optional scope.
    pub scope: Option<String>,
}

/// How hard to retry one request (the backoff itself is the HTTP layer's).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Total time one request may spend waiting between attempts.
    pub budget: Duration,
    /// First backoff step.
    pub base: Duration,
    /// Largest backoff step.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 8,
            budget: Duration::from_secs(600),
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// Timeouts and the retry policy.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    /// Longest time for a whole request.
    pub timeout: Duration,
    /// Longest time for a search page, all its attempts and waits included: a server that
    /// trickles bytes defeats the read timeout (never idle long enough), and each attempt may
    /// last `timeout`.
    pub page_deadline: Duration,
    /// Retries.
    pub retry: RetryPolicy,
}

/// A resolved job.
#[derive(Debug, Clone)]
pub struct Job {
    /// Unique name.
    pub name: String,
    /// The collections to mirror.
    pub collections: Vec<String>,
    /// Bounding box.
    pub bbox: Option<Bbox>,
    /// GeoJSON geometry.
    pub intersects: Option<Value>,
    /// Datetime instant or interval.
    pub datetime: Option<Interval>,
    /// Query extension object.
    pub query: Option<Value>,
    /// CQL2-JSON filter.
    pub filter: Option<Value>,
    /// Page size.
    pub limit: u32,
    /// HTTP method of the first request.
    pub method: SearchMethod,
    /// Cron schedule for the daemon.
    pub schedule: Option<cron::Schedule>,
    /// Datetime window of a partition.
    pub window: Window,
    /// Incremental strategy.
    pub incremental: Incremental,
    /// `datetime` strategy re-scan.
    pub lookback: Duration,
    /// `updated` strategy re-read.
    pub overlap: Duration,
    /// Watermark lag behind the pass's start.
    pub safety_lag: Duration,
    /// Reconcile when the last one is older than this.
    pub reconcile_every: Option<Duration>,
    /// Objects of deleted items.
    pub deleted_objects: DeletedObjects,
    /// Split a partition that matches more items than this (0: never).
    pub max_partition_items: u64,
    /// The window of this job's GeoParquet snapshot files; `None`: it writes none.
    pub snapshots: Option<SnapshotWindow>,
    /// How its first pass gets its items.
    pub backfill: Backfill,
}

impl Job {
    /// Whether a reconcile can tell which stored items the job selects: only by collection,
    /// datetime and bbox, not by a query, filter or intersects geometry that stac-sync cannot
    /// evaluate on stored items.
    pub fn can_reconcile(&self) -> bool {
        selects_by_range(&self.query, &self.filter, &self.intersects)
    }
}

fn selects_by_range(
    query: &Option<Value>,
    filter: &Option<Value>,
    geometry: &Option<Value>,
) -> bool {
    query.is_none() && filter.is_none() && geometry.is_none()
}

impl Config {
    /// Loads the file (the given one, or `stac-sync.toml` if present) and resolves it with the
    /// overrides. Reads only the config file; everything else is pure.
    pub fn load(overrides: &Overrides) -> Result<Config, Error> {
        Config::resolve(read_config(overrides)?, overrides)
    }

    /// Merges the layers and validates the result. No I/O.
    pub fn resolve(file: FileConfig, o: &Overrides) -> Result<Config, Error> {
        let (api_root, api_host) = resolve_api(&file, o)?;
        let auth = resolve_auth(file.auth, o)?;
        let limit = o.limit.or(file.limit).unwrap_or(DEFAULT_LIMIT);
        let concurrency = resolve_concurrency(o.concurrency.or(file.concurrency))?;
        let (database_url, database_format) =
            resolve_database(o, file.database_url.clone(), file.database_format)?;
        let object_store_url =
            resolve_object_store_url(o.object_store_url.clone().or(file.object_store_url))?;
        let max_requests_per_second =
            resolve_rate(o.max_requests_per_second.or(file.max_requests_per_second))?;
        let http = resolve_http(&file.http);
        let headers = resolve_headers(file.headers)?;
        let snapshot_window = o
            .snapshot_window
            .or(file.snapshot_window)
            .unwrap_or_default();
        let snapshots = Snapshots {
            flag: o
                .snapshots
                .as_ref()
                .map(|formats| formats.iter().flatten().copied().collect()),
            file: file.snapshots.clone().unwrap_or_default(),
            window: snapshot_window,
        };
        let jobs = resolve_jobs(file.jobs, o, limit, &snapshots)?;
        if object_store_url.is_none()
            && let Some(job) = jobs.iter().find(|j| j.snapshots.is_some())
        {
            return Err(Error::Config(format!(
                "job {}: snapshots are files in the object store, and object_store_url is \
                 none; set an object store or remove snapshots",
                job.name
            )));
        }
        let worker_lease = resolve_worker_lease(o.worker_lease.or(file.worker_lease))?;
        let webhook_url = parse_url(
            "webhook_url",
            o.webhook_url.clone().or(file.webhook_url),
            "http(s)://HOST/PATH",
        )?;
        let pushgateway_url = parse_url(
            "pushgateway_url",
            o.pushgateway_url.clone().or(file.pushgateway_url),
            "http://HOST:9091",
        )?;
        Ok(Config {
            api_root,
            api_host,
            auth,
            headers,
            http,
            concurrency,
            database_url,
            database_format,
            object_store_url,
            object_store_options: file.object_store,
            metrics_file: o.metrics_file.clone().or(file.metrics_file),
            pushgateway_url,
            worker_lease,
            webhook_url,
            snapshot_window,
            changes_retention: Some(
                o.changes_retention
                    .or(file.changes_retention)
                    .unwrap_or(DEFAULT_CHANGES_RETENTION),
            )
            .filter(|keep| !keep.is_zero()),
            max_requests_per_second,
            max_item_bytes: o
                .max_item_bytes
                .or(file.max_item_bytes)
                .unwrap_or(DEFAULT_MAX_ITEM_BYTES)
                .max(1),
            bulk_timeout: file.bulk.timeout.unwrap_or(DEFAULT_BULK_TIMEOUT),
            bulk_poll_interval: file.bulk.poll_interval.unwrap_or(Duration::from_secs(5)),
            jobs,
        })
    }
}

/// Requests in flight, at most: 1 to 256 (default [`DEFAULT_CONCURRENCY`]).
fn resolve_concurrency(given: Option<usize>) -> Result<usize, Error> {
    let concurrency = given.unwrap_or(DEFAULT_CONCURRENCY);
    if !(1..=256).contains(&concurrency) {
        return Err(Error::Config(format!(
            "concurrency = {concurrency}: must be between 1 and 256"
        )));
    }
    Ok(concurrency)
}

/// Requests per second, at most, if limited: a number above 0.
fn resolve_rate(given: Option<f64>) -> Result<Option<f64>, Error> {
    match given {
        Some(rate) if !(rate.is_finite() && rate > 0.0) => Err(Error::Config(format!(
            "max_requests_per_second = {rate}: must be a number above 0 (0.5 is one request \
             every two seconds)"
        ))),
        rate => Ok(rate),
    }
}

/// How long a worker's claim on a partition holds: at least a second.
fn resolve_worker_lease(given: Option<Duration>) -> Result<Duration, Error> {
    let lease = given.unwrap_or(DEFAULT_WORKER_LEASE);
    if lease < Duration::from_secs(1) {
        return Err(Error::Config(format!(
            "worker_lease = {}: must be at least 1s (a worker renews it three times per period)",
            humantime::format_duration(lease)
        )));
    }
    Ok(lease)
}

/// The database URL and what it holds.
fn resolve_database(
    o: &Overrides,
    url: Option<String>,
    format: Option<DatabaseFormat>,
) -> Result<(String, DatabaseFormat), Error> {
    let database_url = resolve_database_url(o.database_url.clone().or(url))?;
    let database_format = o.database_format.or(format).unwrap_or_default();
    if database_format == DatabaseFormat::Pgstac && !is_postgres_url(&database_url) {
        return Err(Error::Config(format!(
            "database_format = \"pgstac\" needs a postgres:// database_url with pgstac \
                 installed (`pypgstac migrate`), not {}",
            redact_url(&database_url)
        )));
    }
    Ok((database_url, database_format))
}

/// An optional URL setting, read; an error that says how to write it.
fn parse_url(key: &str, raw: Option<String>, shape: &str) -> Result<Option<Url>, Error> {
    raw.map(|raw| {
        Url::parse(&raw).map_err(|e| {
            Error::Config(format!(
                "{key} {:?}: {e}; write it as {shape}",
                redact_url(&raw)
            ))
        })
    })
    .transpose()
}

/// The STAC root. Only EDS_API_URL may be a bare host (newer EDS material); api_url, --api-url
/// and STAC_SYNC_API_URL are always the STAC root itself.
fn resolve_api(file: &FileConfig, o: &Overrides) -> Result<(Url, Option<Url>), Error> {
    let root = |raw: &str, eds: bool| -> Result<(Url, Option<Url>), Error> {
        let url = resolve_api_root(raw, eds)?;
        let host = resolve_api_root(raw, false)?;
        Ok(match host == url {
            true => (url, None),
            false => (url, Some(host)),
        })
    };
    match (
        o.api_url.as_deref(),
        o.env.eds_api_url.as_deref(),
        file.api_url.as_deref(),
    ) {
        (Some(raw), _, _) => root(raw, false),
        (None, Some(raw), _) => root(raw, true),
        (None, None, Some(raw)) => root(raw, false),
        (None, None, None) => Err(Error::Config(
            "no STAC API URL: set EDS_API_URL or STAC_SYNC_API_URL, pass --api-url, \
             or set api_url in the config file"
                .into(),
        )),
    }
}

fn resolve_database_url(given: Option<String>) -> Result<String, Error> {
    let url = given.unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
    if url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://")
    {
        return Ok(url);
    }
    Err(Error::Config(format!(
        "database_url {:?}: expected sqlite://FILE or postgres://...",
        redact_url(&url)
    )))
}

/// The object store's URL, or `None` for `none`.
fn resolve_object_store_url(given: Option<String>) -> Result<Option<String>, Error> {
    let url = given.unwrap_or_else(|| DEFAULT_OBJECT_STORE_URL.into());
    if url.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(
        scheme,
        Some("file" | "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss")
    ) {
        return Err(Error::Config(format!(
            "object_store_url {url:?}: expected file://PATH, s3://BUCKET/PREFIX, \
             gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or none"
        )));
    }
    Ok(Some(url))
}

fn resolve_http(file: &HttpFile) -> HttpSettings {
    let d = RetryPolicy::default();
    HttpSettings {
        connect_timeout: file.connect_timeout.unwrap_or(Duration::from_secs(10)),
        read_timeout: file.read_timeout.unwrap_or(Duration::from_secs(60)),
        timeout: file.timeout.unwrap_or(Duration::from_secs(300)),
        page_deadline: file.page_deadline.unwrap_or(DEFAULT_PAGE_DEADLINE),
        retry: RetryPolicy {
            max_retries: file.max_retries.unwrap_or(d.max_retries),
            budget: file.retry_budget.unwrap_or(d.budget),
            base: file.backoff_base.unwrap_or(d.base),
            max: file.backoff_max.unwrap_or(d.max),
        },
    }
}

fn resolve_headers(headers: BTreeMap<String, String>) -> Result<Vec<(String, String)>, Error> {
    headers
        .into_iter()
        .map(|(name, value)| {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(&value).is_err()
            {
                return Err(Error::Config(format!(
                    "headers.{name}: not a valid HTTP header name and value"
                )));
            }
            Ok((name, value))
        })
        .collect()
}

fn read_file(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let mut message = e.message().to_string();
        if let Some(span) = e.span() {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            message = format!("line {line}: {message}");
        }
        Error::Config(format!("{}: {message}", path.display()))
    })
}

/// The STAC root from a configured URL. With `eds_host`, accepts both forms of `EDS_API_URL`: a
/// STAC root, or a bare host whose STAC root is at [`EDS_STAC_PATH`]. The result ends with `/`
/// so that `search` resolves below it.
pub fn resolve_api_root(raw: &str, eds_host: bool) -> Result<Url, Error> {
    let mut url = Url::parse(raw.trim()).map_err(|e| {
        Error::Config(format!(
            "API URL {raw:?} is not a URL ({e}); expected e.g. https://api.earthdaily.com"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::Config(format!(
            "API URL {raw:?}: only http and https are supported"
        )));
    }
    if eds_host && (url.path() == "/" || url.path().is_empty()) {
        url.set_path(EDS_STAC_PATH);
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

fn resolve_auth(file: AuthFile, o: &Overrides) -> Result<Auth, Error> {
    let env = &o.env;
    let client_id = env.client_id.clone().or(file.client_id);
    let client_secret = env.client_secret.clone().or(file.client_secret);
    let token = env.token.clone().or(file.token);
    let kind = o.auth.or(file.kind).unwrap_or(if client_id.is_some() {
        AuthKind::ClientCredentials
    } else if token.is_some() {
        AuthKind::Bearer
    } else {
        AuthKind::None
    });
    match kind {
        AuthKind::None => Ok(Auth::None),
        AuthKind::Bearer => token.map(Auth::Bearer).ok_or_else(|| {
            Error::Config("auth kind is bearer but no token: set STAC_SYNC_TOKEN".into())
        }),
        AuthKind::ClientCredentials => {
            let client_id = client_id.ok_or_else(|| {
                Error::Config(
                    "OAuth2 client credentials need a client id: set EDS_CLIENT_ID \
                     (or STAC_SYNC_CLIENT_ID)"
                        .into(),
                )
            })?;
            let client_secret = client_secret.ok_or_else(|| {
                Error::Config(
                    "EDS_CLIENT_ID is set but no client secret: set EDS_SECRET \
                     (or STAC_SYNC_CLIENT_SECRET)"
                        .into(),
                )
            })?;
            let raw = env.token_url.clone().or(file.token_url).ok_or_else(|| {
                Error::Config(
                    "OAuth2 client credentials need a token endpoint: set EDS_AUTH_URL \
                     (or STAC_SYNC_TOKEN_URL, or auth.token_url)"
                        .into(),
                )
            })?;
            let token_url = Url::parse(raw.trim())
                .map_err(|e| Error::Config(format!("token URL {raw:?} is not a URL ({e})")))?;
            Ok(Auth::ClientCredentials(ClientCredentials {
                token_url,
                client_id,
                client_secret,
                style: file.auth_style.unwrap_or_default(),
                scope: file.scope,
            }))
        }
    }
}

/// Where the snapshot settings come from: `--snapshots` beats a job's own, which beats the
/// file's top-level list.
struct Snapshots {
    flag: Option<Vec<SnapshotFormat>>,
    file: Vec<SnapshotFormat>,
    window: SnapshotWindow,
}

impl Snapshots {
    fn of(&self, job: Option<&[SnapshotFormat]>) -> Option<SnapshotWindow> {
        let formats = self.flag.as_deref().or(job).unwrap_or(&self.file);
        formats
            .contains(&SnapshotFormat::Geoparquet)
            .then_some(self.window)
    }
}

/// One value of `--snapshots`: a format, or `none`.
fn parse_snapshots(value: &str) -> Result<Option<SnapshotFormat>, String> {
    match value.trim() {
        "none" | "" => Ok(None),
        other => <SnapshotFormat as clap::ValueEnum>::from_str(other, true)
            .map(Some)
            .map_err(|_| format!("{other:?}: the snapshot formats are geoparquet (or none)")),
    }
}

fn resolve_jobs(
    file_jobs: Vec<JobConfig>,
    o: &Overrides,
    limit: u32,
    snapshots: &Snapshots,
) -> Result<Vec<Job>, Error> {
    let jobs = if !o.collections.is_empty() {
        // A one-off job from the command line replaces the file's jobs.
        vec![JobConfig {
            name: o
                .job
                .clone()
                .unwrap_or_else(|| one_off_name(&o.collections)),
            collections: o.collections.clone(),
            bbox: o.bbox.clone(),
            intersects: None,
            datetime: o.datetime.clone(),
            query: None,
            filter: None,
            limit: None,
            method: o.method,
            schedule: None,
            window: None,
            incremental: None,
            lookback: None,
            overlap: None,
            safety_lag: None,
            reconcile_every: None,
            deleted_objects: None,
            max_partition_items: None,
            snapshots: None,
            backfill: None,
        }]
    } else {
        if o.bbox.is_some() || o.datetime.is_some() {
            return Err(Error::Config(
                "--bbox and --datetime describe a one-off job: add --collection".into(),
            ));
        }
        match &o.job {
            Some(name) => {
                let job: Vec<_> = file_jobs.into_iter().filter(|j| &j.name == name).collect();
                if job.is_empty() {
                    return Err(Error::Config(format!(
                        "--job {name}: no job with that name in the config file"
                    )));
                }
                job
            }
            None => file_jobs,
        }
    };
    let mut names = HashSet::new();
    jobs.into_iter()
        .map(|j| {
            let job = validate_job(j, o, limit, snapshots)?;
            if !names.insert(job.name.clone()) {
                return Err(Error::Config(format!("job {}: name used twice", job.name)));
            }
            Ok(job)
        })
        .collect()
}

/// Whether `c` may be part of a job name (which names the job's state in the database).
fn job_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')
}

/// The name of the one-off job over `collections` (`run --collection a --collection b`):
/// `a+b`. Collection ids often hold characters a job name cannot (`landsat:c2l2-sr`,
/// `EO:ESA:DAT:SENTINEL-2`): each becomes `-`, and a short hash of the ids keeps two such jobs
/// apart (`landsat-c2l2-sr` the collection and `landsat:c2l2-sr` are not one job).
fn one_off_name(collections: &[String]) -> String {
    let joined = collections.join("+");
    if !joined.is_empty() && joined.chars().all(job_name_char) {
        return joined;
    }
    let kept: String = joined
        .chars()
        .map(|c| if job_name_char(c) { c } else { '-' })
        .collect();
    let hash = blake3::hash(joined.as_bytes()).to_hex();
    format!("{kept}-{}", &hash[..8])
}

fn validate_job(
    j: JobConfig,
    o: &Overrides,
    default_limit: u32,
    snapshots: &Snapshots,
) -> Result<Job, Error> {
    let name = &j.name;
    if name.is_empty() || !name.chars().all(job_name_char) {
        return Err(Error::Config(format!(
            "job name {name:?}: use letters, digits and - _ . + only (in the config file's \
             [[jobs]] name, or with --job)"
        )));
    }
    if j.collections.is_empty() || j.collections.iter().any(|c| c.trim().is_empty()) {
        return Err(Error::Config(format!(
            "job {name}: collections must list at least one collection id"
        )));
    }
    let bbox = j
        .bbox
        .map(|given| {
            Bbox::new(given.clone()).filter(valid_bbox).ok_or_else(|| {
                Error::Config(format!(
                    "job {name}: bbox {given:?} must be 4 numbers xmin,ymin,xmax,ymax \
                     (or 6 with heights) in degrees: longitudes within [-180, 180], \
                     latitudes within [-90, 90], ymin <= ymax"
                ))
            })
        })
        .transpose()?;
    if let Some(datetime) = &j.datetime {
        validate_datetime(datetime)
            .map_err(|why| Error::Config(format!("job {name}: datetime {datetime:?}: {why}")))?;
    }
    if j.reconcile_every.is_some() && !selects_by_range(&j.query, &j.filter, &j.intersects) {
        return Err(Error::Config(format!(
            "job {name}: reconcile_every: a job with query, filter or intersects cannot be \
             reconciled (stac-sync cannot tell which stored items they select); remove \
             reconcile_every or select by collection, datetime and bbox only"
        )));
    }
    let schedule = j
        .schedule
        .as_deref()
        .map(|schedule| {
            parse_schedule(schedule)
                .map_err(|why| Error::Config(format!("job {name}: schedule {why}")))
        })
        .transpose()?;
    // The CLI's --limit overrides every job's limit; a job's own limit beats the file default.
    let limit = o.limit.or(j.limit).unwrap_or(default_limit);
    if !(1..=10_000).contains(&limit) {
        return Err(Error::Config(format!(
            "job {name}: limit = {limit}: must be between 1 and 10000"
        )));
    }
    Ok(Job {
        name: j.name,
        collections: j.collections,
        bbox,
        intersects: j.intersects,
        datetime: j.datetime.map(Interval::new),
        query: j.query,
        filter: j.filter,
        limit,
        method: j.method.unwrap_or_default(),
        schedule,
        window: j.window.unwrap_or_default(),
        incremental: j.incremental.unwrap_or_default(),
        lookback: j.lookback.unwrap_or(DEFAULT_LOOKBACK),
        overlap: j.overlap.unwrap_or(DEFAULT_OVERLAP),
        safety_lag: j.safety_lag.unwrap_or(DEFAULT_SAFETY_LAG),
        reconcile_every: j.reconcile_every,
        deleted_objects: j.deleted_objects.unwrap_or_default(),
        max_partition_items: j.max_partition_items.unwrap_or(DEFAULT_MAX_PARTITION_ITEMS),
        snapshots: snapshots.of(j.snapshots.as_deref()),
        backfill: j.backfill.unwrap_or_default(),
    })
}

/// Whether a bbox (4 or 6 numbers) is one a STAC API takes: finite numbers, longitudes within
/// [-180, 180], latitudes within [-90, 90], ymin <= ymax. xmin > xmax is allowed: the box
/// crosses the antimeridian (RFC 7946 §5.2).
fn valid_bbox(bbox: &Bbox) -> bool {
    let lon = |x: f64| (-180.0..=180.0).contains(&x);
    let lat = |y: f64| (-90.0..=90.0).contains(&y);
    let [x0, y0, x1, y1] = bbox.extent();
    bbox.as_given().iter().all(|v| v.is_finite())
        && y0 <= y1
        && lon(x0)
        && lon(x1)
        && lat(y0)
        && lat(y1)
}

/// Checks an RFC 3339 instant or an interval with `..` or empty open ends (STAC API item-search).
fn validate_datetime(value: &str) -> Result<(), String> {
    let parts: Vec<&str> = value.split('/').collect();
    // Shape only (YYYY-MM-DD, then an optional time): the server validates the rest, and
    // many servers accept plain dates too.
    let check = |p: &str| -> Result<(), String> {
        let b = p.as_bytes();
        let shaped = p == ".."
            || p.is_empty()
            || (b.len() >= 10
                && b[..4].iter().all(u8::is_ascii_digit)
                && b[4] == b'-'
                && b[5..7].iter().all(u8::is_ascii_digit)
                && b[7] == b'-'
                && b[8..10].iter().all(u8::is_ascii_digit)
                && (b.len() == 10 || matches!(b[10], b'T' | b't' | b' ')));
        if shaped {
            Ok(())
        } else {
            Err(format!(
                "{p:?} is not an RFC 3339 date-time (2024-01-31T00:00:00Z)"
            ))
        }
    };
    let shaped = match parts.as_slice() {
        [one] if !one.is_empty() && *one != ".." => check(one),
        [start, end] if !(matches!(*start, "" | "..") && matches!(*end, "" | "..")) => {
            check(start)?;
            check(end)
        }
        _ => Err("expected an instant or an interval start/end (one end may be ..)".into()),
    };
    shaped?;
    let (start, end) = Datetime::parse(value).bounds();
    match (start.and_then(parse_instant), end.and_then(parse_instant)) {
        (Some(start), Some(end)) if start > end => {
            Err("it ends before it starts: write START/END with the earlier instant first".into())
        }
        _ => Ok(()),
    }
}

/// A URL with its password replaced, for messages.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A one-off job over collection `c`, as `--collection c` makes.
    pub(crate) fn one_job() -> Job {
        let o = overrides(EnvVars {
            eds_api_url: Some("http://127.0.0.1:1/".into()),
            ..EnvVars::default()
        });
        let mut config = Config::resolve(FileConfig::default(), &o).expect("a valid config");
        config.jobs.remove(0)
    }

    fn overrides(env: EnvVars) -> Overrides {
        Overrides {
            collections: vec!["c".into()],
            env,
            ..Overrides::default()
        }
    }

    #[test]
    fn a_one_off_job_is_named_after_its_collections_whatever_their_ids_hold() {
        let name =
            |ids: &[&str]| one_off_name(&ids.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(name(&["s2", "s1"]), "s2+s1");
        let colon = name(&["landsat:c2l2-sr"]);
        assert!(colon.starts_with("landsat-c2l2-sr-"), "{colon}");
        assert!(colon.chars().all(job_name_char), "{colon}");
        assert_ne!(colon, name(&["landsat-c2l2-sr"]));
        assert_ne!(colon, name(&["landsat/c2l2-sr"]));
        let o = Overrides {
            collections: vec!["EO:ESA:DAT:SENTINEL-2".into()],
            ..overrides(EnvVars {
                eds_api_url: Some("http://127.0.0.1:1/".into()),
                ..EnvVars::default()
            })
        };
        let config = Config::resolve(FileConfig::default(), &o).expect("a valid config");
        assert!(config.jobs[0].name.starts_with("EO-ESA-DAT-SENTINEL-2-"));
    }

    #[test]
    fn eds_api_url_may_be_a_bare_host_or_a_stac_root() {
        let host = EnvVars {
            eds_api_url: Some("https://api.earthdaily.com".into()),
            ..EnvVars::default()
        };
        let config = Config::resolve(FileConfig::default(), &overrides(host)).expect("valid");
        assert_eq!(
            config.api_root.as_str(),
            "https://api.earthdaily.com/platform/v1/stac/"
        );

        let root = EnvVars {
            eds_api_url: Some("https://api.eds.earthdaily.com/archive/v1/stac/v1".into()),
            ..EnvVars::default()
        };
        let config = Config::resolve(FileConfig::default(), &overrides(root)).expect("valid");
        assert_eq!(
            config.api_root.as_str(),
            "https://api.eds.earthdaily.com/archive/v1/stac/v1/"
        );
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let file: FileConfig = toml::from_str(
            "api_url = \"https://file.test/stac\"\ndatabase_url = \"sqlite://file.db\"\nlimit = 7",
        )
        .expect("toml");
        let mut o = overrides(EnvVars {
            eds_api_url: Some("https://env.test/stac".into()),
            ..EnvVars::default()
        });
        o.database_url = Some("sqlite://flag.db".into());
        let config = Config::resolve(file, &o).expect("valid");
        assert_eq!(config.api_root.as_str(), "https://env.test/stac/");
        assert_eq!(config.database_url, "sqlite://flag.db");
        assert_eq!(config.jobs[0].limit, 7);
        assert_eq!(
            config.object_store_url.as_deref(),
            Some(DEFAULT_OBJECT_STORE_URL)
        );
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let env = EnvVars {
            eds_api_url: Some("https://api.test/stac".into()),
            token_url: Some("https://auth.test/token".into()),
            client_id: Some("id".into()),
            client_secret: Some(SecretString::from("hunter2-secret")),
            token: None,
        };
        let config = Config::resolve(FileConfig::default(), &overrides(env)).expect("valid");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(matches!(config.auth, Auth::ClientCredentials(_)));
    }

    #[test]
    fn open_ended_datetimes_are_accepted_and_garbage_is_not() {
        assert!(validate_datetime("2020-01-01T00:00:00Z/..").is_ok());
        assert!(validate_datetime("../2020-01-01").is_ok());
        assert!(validate_datetime("2020-01-01T00:00:00Z").is_ok());
        assert!(validate_datetime("../..").is_err());
        assert!(validate_datetime("last tuesday").is_err());
    }

    #[test]
    fn a_job_that_cannot_be_reconciled_is_refused_a_reconcile_schedule() {
        let toml = r#"
            api_url = "http://127.0.0.1:1/"
            [[jobs]]
            name = "cloudless"
            collections = ["c"]
            query = { "eo:cloud_cover" = { lt = 10 } }
            reconcile_every = "7d"
        "#;
        let file: FileConfig = toml::from_str(toml).expect("parses");
        let error = Config::resolve(file, &Overrides::default()).expect_err("refused");
        assert!(matches!(&error, Error::Config(m) if m.contains("job cloudless: reconcile_every")));
    }

    fn job_error(job: &str) -> String {
        let toml = format!(
            "api_url = \"http://127.0.0.1:1/\"\n[[jobs]]\nname = \"j\"\ncollections = [\"c\"]\n{job}"
        );
        let file: FileConfig = toml::from_str(&toml).expect("parses");
        match Config::resolve(file, &Overrides::default()) {
            Err(Error::Config(message)) => message,
            other => panic!("{job}: not a configuration error: {other:?}"),
        }
    }

    #[test]
    fn a_reversed_datetime_range_is_refused_with_the_job_and_the_range() {
        let message = job_error("datetime = \"2024-12-31/2024-01-01\"");
        assert!(
            message.contains("job j: datetime \"2024-12-31/2024-01-01\": it ends before it starts"),
            "{message}"
        );
    }

    #[test]
    fn latitudes_beyond_90_are_refused_and_a_box_across_the_antimeridian_is_not() {
        let message = job_error("bbox = [2.25, 48.8, 2.42, 100.0]");
        assert!(message.contains("latitudes within [-90, 90]"), "{message}");
        let file: FileConfig = toml::from_str(
            "api_url = \"http://127.0.0.1:1/\"\n[[jobs]]\nname = \"j\"\ncollections = [\"c\"]\nbbox = [170.0, -10.0, -170.0, 10.0]",
        )
        .expect("parses");
        assert!(Config::resolve(file, &Overrides::default()).is_ok());
    }
}
