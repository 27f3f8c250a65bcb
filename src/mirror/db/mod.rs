//! The SQL sink: items, runs, resume points and quarantine, in SQLite or Postgres.
//!
//! Both backends keep the same tables (`migrations/sqlite/`, `migrations/postgres/`) and the
//! same guarantees: idempotent upserts keyed by `(collection, id)`, unchanged rows never
//! rewritten, and a page's rows, quarantined features and resume point committed in one
//! transaction. [`Database`] dispatches to the backend named by the URL.

mod pgstac;
mod postgres;
mod shared;
mod sqlite;

pub use postgres::PostgresDb;
pub use sqlite::SqliteDb;

use crate::config::DatabaseFormat;
use crate::error::Error;
use crate::stac::reader::{Item, Rejected};
use crate::stac::search::Request;

/// Runs `$body` with `$pool` bound to the backend's pool: the statement is written once and
/// compiled for each backend (both accept `$N` placeholders and `CURRENT_TIMESTAMP`).
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Database::Sqlite(db) => {
                let $pool = db.pool();
                $body
            }
            Database::Postgres(db) => {
                let $pool = db.pool();
                $body
            }
        }
    };
}

mod snapshots;
pub use snapshots::{Due, window_range};

/// Stored items in a reconcile scope that the pass did not see. Binds: `$1` collection, `$2`
/// job, `$3`/`$4` the job's datetime range, `$5`..`$8` its bbox. Datetimes are compared to the
/// second and strictly, and an item counts as in the bbox only if its own bbox lies inside: an
/// item at a boundary is never tombstoned by mistake (it may stay live after a deletion).
macro_rules! vanished {
    () => {
        "collection = $1 AND deleted_at IS NULL \
    AND NOT EXISTS (SELECT 1 FROM sync_seen s WHERE s.job = $2 AND s.collection = items.collection AND s.id = items.id) \
    AND ($3 IS NULL OR substr(COALESCE(end_datetime, datetime), 1, 19) > substr($3, 1, 19)) \
    AND ($4 IS NULL OR substr(COALESCE(start_datetime, datetime), 1, 19) < substr($4, 1, 19)) \
    AND ($5 IS NULL OR (bbox_xmin >= $5 AND bbox_ymin >= $6 AND bbox_xmax <= $7 AND bbox_ymax <= $8))"
    };
}

/// A reconcile's deletions into the change feed (SQLite numbers them as it inserts them).
const RECORD_DELETIONS_SQLITE: &str = concat!(
    "INSERT INTO changes (run_id, job, collection, id, change, content_hash, at) \
     SELECT $9, $2, collection, id, 'deleted', content_hash, CURRENT_TIMESTAMP \
     FROM items WHERE ",
    vanished!(),
    " ORDER BY id"
);

/// The same on Postgres: numbered as inserted, under the feed's lock held to the commit, as a
/// page's changes are (see `postgres::CHANGES`): committed, they are in the feed.
const RECORD_DELETIONS_POSTGRES: &str = concat!(
    "WITH turn AS (SELECT pg_advisory_xact_lock(7263686167657300)) \
     INSERT INTO changes (seq, run_id, job, collection, id, change, content_hash, at) \
     SELECT nextval('changes_seq'), $9, $2, collection, id, 'deleted', content_hash, \
     CURRENT_TIMESTAMP FROM turn, (SELECT collection, id, content_hash FROM items \
     WHERE ",
    vanished!(),
    " ORDER BY id) o"
);

/// What a reconcile pass compares against: one collection, within the job's datetime range
/// and bbox.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    /// The collection.
    pub collection: &'a str,
    /// Start of the job's datetime range, if bounded.
    pub start: Option<&'a str>,
    /// End of the job's datetime range, if bounded.
    pub end: Option<&'a str>,
    /// The job's bbox `[xmin, ymin, xmax, ymax]`, if any.
    pub bbox: Option<[f64; 4]>,
}

/// Binds a [`Scope`]'s parameters, in [`vanished!`]'s order, to a query of either kind.
macro_rules! bind_scope {
    ($query:expr, $scope:expr, $job:expr) => {{
        let [x0, y0, x1, y1] = $scope.bbox.map(|b| b.map(Some)).unwrap_or([None; 4]);
        $query
            .bind($scope.collection)
            .bind($job)
            .bind($scope.start)
            .bind($scope.end)
            .bind(x0)
            .bind(y0)
            .bind(x1)
            .bind(y1)
    }};
}

/// The kinds of pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// Backfill or incremental: fetch and store items.
    Sync,
    /// Sweep the ids of the job's range and tombstone what vanished.
    Reconcile,
}

impl PassKind {
    /// As stored in `sync_state.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            PassKind::Sync => "sync",
            PassKind::Reconcile => "reconcile",
        }
    }
}

/// A job's own row in `sync_state`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobState {
    /// Fingerprint of the job's search; a change restarts from a backfill.
    pub query_hash: String,
    /// Everything published before this instant (RFC 3339) is mirrored.
    pub watermark: Option<String>,
    /// When the current (or last) sync pass was planned.
    pub pass_started_at: Option<String>,
    /// When the last reconcile pass ended.
    pub reconciled_at: Option<String>,
}

type JobRow = (String, Option<String>, Option<String>, Option<String>);
/// `sync_state` columns of a partition: partition, collection, request, resume, done.
type PlannedRow = (String, Option<String>, Option<String>, Option<String>, bool);

/// A partition from its row; `None` if its stored request cannot be read (the caller plans the
/// pass again).
fn planned_row(job: &str, row: PlannedRow) -> Option<Planned> {
    let (name, collection, request, resume, done) = row;
    let read = |text: Option<String>| -> Option<Request> {
        let text = text?;
        match serde_json::from_str(&text) {
            Ok(request) => Some(request),
            Err(e) => {
                tracing::warn!(job, partition = %name, error = %e, "unreadable stored request");
                None
            }
        }
    };
    Some(Planned {
        collection: collection?,
        first: read(request)?,
        resume: read(resume),
        done,
        name,
    })
}

/// A worker's hold on the partitions it claims (`run --worker`, Postgres only).
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    /// The worker: its run id.
    pub owner: &'a str,
    /// How long a claim or renewal holds without the next one.
    pub ttl: std::time::Duration,
}

/// A run, as `status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Run {
    pub run_id: String,
    pub job: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub status: String,
    pub pages: i64,
    pub new: i64,
    pub changed: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub quarantined: i64,
    pub retries: i64,
    pub token_renewals: i64,
    pub missing: i64,
    pub incomplete: i64,
    pub splits: i64,
    pub error: Option<String>,
}

/// A job's state, as `status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct JobStatus {
    pub job: String,
    /// Everything published before this is mirrored (RFC 3339); none before the first full pass.
    pub watermark: Option<String>,
    pub pass_started_at: Option<String>,
    pub reconciled_at: Option<String>,
    /// Partitions left in an unfinished pass (the next run resumes them).
    pub partitions_left: i64,
}

/// A collection's items, as `status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct CollectionStatus {
    pub collection: String,
    pub live: i64,
    pub deleted: i64,
    /// Its document is stored (`collections`).
    pub described: bool,
    /// When a run found the collection gone upstream, if it did.
    pub gone_at: Option<String>,
}

/// A quarantined feature, as `status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Quarantined {
    pub job: String,
    pub collection: Option<String>,
    pub id: Option<String>,
    pub reason: String,
    pub page: String,
    pub at: Option<String>,
}

/// A partition of a stored plan.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its name, unique in the job.
    pub name: String,
    /// The collection it pages.
    pub collection: String,
    /// Its first request.
    pub first: Request,
    /// Where to go on, if pages were committed.
    pub resume: Option<Request>,
    /// Every page committed.
    pub done: bool,
}

/// The rows a commit wrote: `(collection, id)` → whether the row was new. An item of the page
/// missing here was already stored with that content (another commit wrote it since the page
/// was classified).
pub type Written = std::collections::HashMap<(String, String), bool>;

/// What a page's commit did.
#[derive(Debug, Default)]
pub struct Committed {
    /// Items the database refused, quarantined.
    pub refused: Vec<Rejected>,
    /// The rows it wrote, as the database says: a page is classified before it commits, and
    /// another commit (of another page or worker) may have stored its items meanwhile.
    pub written: Written,
}

/// A row of the change feed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Change {
    /// Only grows, in commit order: a consumer's cursor.
    pub seq: i64,
    pub run_id: String,
    pub job: String,
    pub collection: String,
    pub id: String,
    /// `new`, `changed` or `deleted`.
    pub change: String,
    pub content_hash: Option<String>,
    /// When it was committed (UTC).
    pub at: String,
}

/// An item a reconcile sweep saw.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub collection: &'a str,
    pub id: &'a str,
    /// Its `properties.updated`, if the page gave it.
    pub updated: Option<&'a str>,
}

/// Plans a partition (`$1` job, `$2` name, `$3` kind, `$4` collection, `$5` search hash, `$6`
/// first request); one already planned under that name stays as it is.
const INSERT_PARTITION: &str = "INSERT INTO sync_state (job, partition, kind, collection, \
    query_hash, request, resume, done, pages_done, updated_at) \
    VALUES ($1, $2, $3, $4, $5, $6, NULL, FALSE, 0, CURRENT_TIMESTAMP) \
    ON CONFLICT (job, partition) DO NOTHING";

/// `(name, collection, first request as JSON)` of partitions to plan.
fn partition_rows(
    partitions: &[(String, String, Request)],
) -> Result<Vec<(&str, &str, String)>, Error> {
    partitions
        .iter()
        .map(|(name, collection, first)| {
            let first = serde_json::to_string(first)
                .map_err(|e| Error::Internal(format!("cannot serialise a request: {e}")))?;
            Ok((name.as_str(), collection.as_str(), first))
        })
        .collect()
}

/// Stores a collection's new content (`$1` id, `$2` content, `$3` hash).
const UPSERT_COLLECTION_SQLITE: &str = "INSERT INTO collections (id, content, content_hash, \
    first_seen_at, last_seen_at, changed_at) \
    VALUES ($1, $2, $3, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP) \
    ON CONFLICT (id) DO UPDATE SET content = excluded.content, content_hash = excluded.content_hash, \
    last_seen_at = excluded.last_seen_at, changed_at = excluded.changed_at, deleted_at = NULL";
/// [`UPSERT_COLLECTION_SQLITE`] with the content as JSONB.
const UPSERT_COLLECTION_POSTGRES: &str = "INSERT INTO collections (id, content, content_hash, \
    first_seen_at, last_seen_at, changed_at) \
    VALUES ($1, CAST($2 AS JSONB), $3, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP) \
    ON CONFLICT (id) DO UPDATE SET content = excluded.content, content_hash = excluded.content_hash, \
    last_seen_at = excluded.last_seen_at, changed_at = excluded.changed_at, deleted_at = NULL";

/// A partition that ended short of the match count its first page reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    pub partition: String,
    pub collection: String,
    /// Items its first page said the search matches.
    pub matched: u64,
    /// Features its pages held.
    pub received: u64,
}

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {}: the API reported {} matching items, its pages held {}",
            self.partition, self.matched, self.received
        )
    }
}

/// What a pass's completeness check found.
#[derive(Debug, Default)]
pub struct Completeness {
    /// Short after their first paging: planned again.
    pub repaged: Vec<Short>,
    /// Still short after being paged again.
    pub incomplete: Vec<Short>,
}

type ShortRow = (String, Option<String>, i64, i64, i64);

/// A new pass's plan.
#[derive(Debug)]
pub struct PlanCommit<'a> {
    /// The job.
    pub job: &'a str,
    /// Sync or reconcile.
    pub kind: PassKind,
    /// Fingerprint of the job's search.
    pub search_hash: &'a str,
    /// The stored fingerprint differs: drop the watermark and every unfinished pass.
    pub search_changed: bool,
    /// When the pass starts (RFC 3339).
    pub started_at: &'a str,
    /// `(name, collection, first request)` per partition.
    pub partitions: &'a [(String, String, Request)],
}

/// Counts of one run, as stored in `sync_runs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Pages committed.
    pub pages: u64,
    /// Items stored for the first time.
    pub new: u64,
    /// Items whose content changed.
    pub changed: u64,
    /// Items received again with identical content.
    pub unchanged: u64,
    /// Items marked deleted.
    pub deleted: u64,
    /// Features quarantined.
    pub quarantined: u64,
    /// Repeats of a `(collection, id)` within one page.
    pub duplicate: u64,
    /// HTTP retries.
    pub retries: u64,
    /// Tokens renewed.
    pub token_renewals: u64,
    /// Items a partition fell short of the count its server reported (completeness checks),
    /// before it was paged again.
    pub missing: u64,
    /// Partitions still short of their count after being paged again: the run is partial.
    pub incomplete: u64,
    /// Partitions split in two (too many items for one search).
    pub splits: u64,
}

impl std::ops::AddAssign<&Counts> for Counts {
    fn add_assign(&mut self, other: &Counts) {
        self.pages += other.pages;
        self.new += other.new;
        self.changed += other.changed;
        self.unchanged += other.unchanged;
        self.deleted += other.deleted;
        self.quarantined += other.quarantined;
        self.duplicate += other.duplicate;
        self.retries += other.retries;
        self.token_renewals += other.token_renewals;
        self.missing += other.missing;
        self.incomplete += other.incomplete;
        self.splits += other.splits;
    }
}

/// What the database already holds for an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Not stored yet.
    New,
    /// Stored with other content (or tombstoned).
    Changed,
    /// Stored with this exact content.
    Unchanged,
}

/// Everything one page commits, in one transaction.
#[derive(Debug)]
pub struct PageCommit<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The job.
    pub job: &'a str,
    /// The partition.
    pub partition: &'a str,
    /// New and changed items (unchanged ones are not rewritten).
    pub items: Vec<&'a Item>,
    /// Features to quarantine.
    pub rejected: &'a [Rejected],
    /// The URL of the page they came from.
    pub page_url: &'a str,
    /// The next request, or `None` when this page ends the partition. A part of a page read
    /// before its end keeps the page's own request here, so that a restart fetches it again.
    pub resume: Option<&'a Request>,
    /// Whether this commit ends its page (counted in `pages_done`), rather than being a part of
    /// it read before its end.
    pub ends_page: bool,
    /// Features the part held (items, quarantined and repeated ones), added to the
    /// partition's `received`.
    pub features: u64,
    /// The match count its page reported; the partition keeps its first page's.
    pub matched: Option<u64>,
    /// Every item on the page, during a reconcile pass.
    pub seen: Vec<Seen<'a>>,
    /// A worker's lease on the partition: the page commits only if the lease is still its own
    /// (and renews it), else fails with [`Error::LeaseLost`].
    pub lease: Option<Lease<'a>>,
    /// The job's snapshot window, if it writes snapshots: the commit marks the windows it
    /// changes due (see the `snapshot_due` table).
    pub snapshots: Option<crate::config::SnapshotWindow>,
}

/// A job's single-runner lock, held until dropped.
#[derive(Debug)]
pub enum JobLock {
    /// No lock possible (an in-memory database).
    None,
    /// An OS lock on a file beside the SQLite database.
    File(std::fs::File),
    /// A Postgres session-level advisory lock, held by this connection.
    Postgres(Box<postgres::AdvisoryLock>),
}

impl JobLock {
    /// Checks that the lock is still held (a Postgres session can die under us); call before
    /// each commit.
    pub async fn check(&mut self) -> Result<(), Error> {
        match self {
            JobLock::None | JobLock::File(_) => Ok(()),
            JobLock::Postgres(lock) => lock.check().await,
        }
    }

    /// Releases the lock now (dropping it releases it too, once the server sees the
    /// connection close).
    pub async fn release(self) -> Result<(), Error> {
        match self {
            JobLock::None | JobLock::File(_) => Ok(()),
            JobLock::Postgres(lock) => lock.release().await,
        }
    }

    /// Waits for the job's planner lock (workers only: a single run holds the job alone).
    pub async fn lock_planner(&mut self) -> Result<(), Error> {
        match self {
            JobLock::None | JobLock::File(_) => Ok(()),
            JobLock::Postgres(lock) => lock.lock_planner().await,
        }
    }

    /// Releases the job's planner lock.
    pub async fn unlock_planner(&mut self) -> Result<(), Error> {
        match self {
            JobLock::None | JobLock::File(_) => Ok(()),
            JobLock::Postgres(lock) => lock.unlock_planner().await,
        }
    }
}

/// The database, SQLite or Postgres.
#[derive(Debug, Clone)]
pub enum Database {
    /// `sqlite://...`
    Sqlite(SqliteDb),
    /// `postgres://...`
    Postgres(PostgresDb),
}

impl Database {
    /// Opens the database named by `url`, in stac-sync's own format.
    pub async fn connect(url: &str) -> Result<Database, Error> {
        Database::connect_as(url, DatabaseFormat::StacSync).await
    }

    /// Opens the database named by `url`, holding `format`.
    pub async fn connect_as(url: &str, format: DatabaseFormat) -> Result<Database, Error> {
        let pgstac = format == DatabaseFormat::Pgstac;
        if is_postgres(url) {
            Ok(Database::Postgres(PostgresDb::connect(url, pgstac).await?))
        } else if pgstac {
            Err(Error::Config(
                "database_format = \"pgstac\" needs a postgres:// database_url".into(),
            ))
        } else {
            Ok(Database::Sqlite(SqliteDb::connect(url).await?))
        }
    }

    /// The pgstac database, when items and collections go to pgstac.
    pub fn pgstac(&self) -> Option<&PostgresDb> {
        match self {
            Database::Postgres(db) if db.is_pgstac() => Some(db),
            _ => None,
        }
    }

    /// Applies the schema migrations.
    pub async fn migrate(&self) -> Result<(), Error> {
        match self {
            Database::Sqlite(db) => db.migrate().await,
            Database::Postgres(db) => db.migrate().await,
        }
    }

    /// Takes the job's single-runner lock, or fails with [`Error::Locked`]. Workers
    /// (`worker`) share it with each other, never with a single run; they need Postgres.
    pub async fn lock(&self, job: &str, worker: bool) -> Result<JobLock, Error> {
        match self {
            Database::Sqlite(_) if worker => Err(Error::Config(WORKERS_NEED_POSTGRES.into())),
            Database::Sqlite(db) => db.lock(job),
            Database::Postgres(db) => db.lock(job, worker).await,
        }
    }

    /// The Postgres database, for what only workers do.
    fn workers(&self) -> Result<&PostgresDb, Error> {
        match self {
            Database::Sqlite(_) => Err(Error::Config(WORKERS_NEED_POSTGRES.into())),
            Database::Postgres(db) => Ok(db),
        }
    }

    /// Claims an unfinished partition of the job's pass for a worker; see [`PostgresDb::claim`].
    pub async fn claim(
        &self,
        job: &str,
        kind: PassKind,
        lease: &Lease<'_>,
    ) -> Result<Option<Planned>, Error> {
        self.workers()?.claim(job, kind, lease).await
    }

    /// Extends a worker's leases; returns how many it still holds.
    pub async fn renew(&self, job: &str, lease: &Lease<'_>) -> Result<u64, Error> {
        self.workers()?.renew(job, lease).await
    }

    /// Gives up a worker's leases on unfinished partitions.
    pub async fn release(&self, job: &str, owner: &str) -> Result<u64, Error> {
        self.workers()?.release(job, owner).await
    }

    /// Unfinished partitions of the job's pass that `owner` does not hold.
    pub async fn unfinished_elsewhere(
        &self,
        job: &str,
        kind: PassKind,
        owner: &str,
    ) -> Result<i64, Error> {
        self.workers()?.unfinished_elsewhere(job, kind, owner).await
    }

    /// Why this backend would refuse an item, if it would: checked before the item's object is
    /// written, so a refused item leaves no object behind.
    pub fn refuses(&self, item: &Item) -> Option<String> {
        match self {
            Database::Sqlite(_) => None,
            Database::Postgres(_) => postgres::refuses(item),
        }
    }

    /// Whether a `(collection, id)` fits in this backend's keys (Postgres indexes keys of
    /// limited length; SQLite any).
    pub fn indexes(&self, collection: &str, id: &str) -> bool {
        match self {
            Database::Sqlite(_) => true,
            Database::Postgres(_) => postgres::indexes(collection, id),
        }
    }

    /// Classifies each item against what is stored.
    pub async fn classify(&self, items: &[Item]) -> Result<Vec<Known>, Error> {
        match self {
            Database::Sqlite(db) => db.classify(items).await,
            Database::Postgres(db) => db.classify(items).await,
        }
    }

    /// Commits one page: rows, changes, quarantine and resume point, atomically. Returns the
    /// features quarantined because the database refused them (beyond `page.rejected`), and
    /// where the database tells, the rows it wrote.
    pub async fn commit_page(&self, page: PageCommit<'_>) -> Result<Committed, Error> {
        match self {
            Database::Sqlite(db) => db.commit_page(page).await,
            Database::Postgres(db) => db.commit_page(page).await,
        }
    }

    /// The job's own row: its search fingerprint, watermark and pass times.
    pub async fn job_state(&self, job: &str) -> Result<Option<JobState>, Error> {
        let row: Option<JobRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT query_hash, watermark, pass_started_at, reconciled_at FROM sync_state \
             WHERE job = $1 AND partition = ''",
        )
        .bind(job)
        .fetch_optional(pool)
        .await)
        .map_err(self.fail("read the job's state"))?;
        Ok(row.map(
            |(query_hash, watermark, pass_started_at, reconciled_at)| JobState {
                query_hash,
                watermark,
                pass_started_at,
                reconciled_at,
            },
        ))
    }

    /// The partitions of the job's unfinished pass of this kind, as planned (empty if none).
    pub async fn planned(&self, job: &str, kind: PassKind) -> Result<Vec<Planned>, Error> {
        let rows: Vec<PlannedRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT partition, collection, request, resume, done FROM sync_state \
             WHERE job = $1 AND kind = $2 ORDER BY partition",
        )
        .bind(job)
        .bind(kind.as_str())
        .fetch_all(pool)
        .await)
        .map_err(self.fail("read the planned partitions"))?;
        let mut planned = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(partition) = planned_row(job, row) else {
                // Unreadable: the caller plans the pass again.
                return Ok(Vec::new());
            };
            planned.push(partition);
        }
        Ok(planned)
    }

    /// Stores a new pass's plan, replacing any earlier unfinished pass of that kind (and, when
    /// the job's search changed, its watermark and every unfinished pass).
    pub async fn plan(&self, plan: PlanCommit<'_>) -> Result<(), Error> {
        let partitions = partition_rows(plan.partitions)?;
        let kind = plan.kind.as_str();
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "DELETE FROM sync_state WHERE job = $1 AND partition <> '' \
                 AND (kind = $2 OR kind IS NULL OR $3)",
            )
            .bind(plan.job)
            .bind(kind)
            .bind(plan.search_changed)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO sync_state (job, partition, kind, query_hash, updated_at) \
                 VALUES ($1, '', 'job', $2, CURRENT_TIMESTAMP) ON CONFLICT (job, partition) DO UPDATE SET \
                 watermark = CASE WHEN sync_state.query_hash = excluded.query_hash THEN sync_state.watermark END, \
                 reconciled_at = CASE WHEN sync_state.query_hash = excluded.query_hash THEN sync_state.reconciled_at END, \
                 query_hash = excluded.query_hash, kind = 'job', updated_at = excluded.updated_at",
            )
            .bind(plan.job)
            .bind(plan.search_hash)
            .execute(&mut *tx)
            .await?;
            if plan.kind == PassKind::Sync {
                sqlx::query("UPDATE sync_state SET pass_started_at = $2 WHERE job = $1 AND partition = ''")
                    .bind(plan.job)
                    .bind(plan.started_at)
                    .execute(&mut *tx)
                    .await?;
            }
            if plan.kind == PassKind::Reconcile || plan.search_changed {
                sqlx::query("DELETE FROM sync_seen WHERE job = $1")
                    .bind(plan.job)
                    .execute(&mut *tx)
                    .await?;
            }
            for (name, collection, first) in &partitions {
                sqlx::query(INSERT_PARTITION)
                .bind(plan.job)
                .bind(*name)
                .bind(kind)
                .bind(*collection)
                .bind(plan.search_hash)
                .bind(first.as_str())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }.await)
        .map_err(self.fail("store the pass's plan"))
    }

    /// Replaces a partition by `halves` of its datetime window, in one transaction: it is done
    /// and marked split (commits of its pages still on their way change nothing), and the halves
    /// are planned in its pass. With a lease, only while the partition is still this worker's.
    pub async fn split(
        &self,
        job: &str,
        partition: &str,
        halves: &[(String, Request)],
        lease: Option<&Lease<'_>>,
    ) -> Result<Vec<Planned>, Error> {
        let mut firsts = Vec::with_capacity(halves.len());
        for (_, first) in halves {
            firsts.push(
                serde_json::to_string(first)
                    .map_err(|e| Error::Internal(format!("cannot serialise a request: {e}")))?,
            );
        }
        let owner = lease.map(|l| l.owner);
        let collection: Option<Option<String>> = on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let collection: Option<Option<String>> = sqlx::query_scalar(
                "UPDATE sync_state SET done = TRUE, split = TRUE, resume = NULL, \
                 updated_at = CURRENT_TIMESTAMP WHERE job = $1 AND partition = $2 AND NOT split \
                 AND ($3 IS NULL OR lease_owner = $3) RETURNING collection",
            )
            .bind(job)
            .bind(partition)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?;
            for ((name, _), first) in halves.iter().zip(&firsts) {
                sqlx::query(
                    "INSERT INTO sync_state (job, partition, kind, collection, query_hash, request, \
                     resume, done, pages_done, updated_at) \
                     SELECT job, $3, kind, collection, query_hash, $4, NULL, FALSE, 0, CURRENT_TIMESTAMP \
                     FROM sync_state WHERE job = $1 AND partition = $2 \
                     ON CONFLICT (job, partition) DO NOTHING",
                )
                .bind(job)
                .bind(partition)
                .bind(name.as_str())
                .bind(first.as_str())
                .execute(&mut *tx)
                .await?;
            }
            if collection.is_some() {
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(collection)
        }.await)
        .map_err(self.fail("split a partition"))?;
        let Some(collection) = collection else {
            return match lease {
                Some(_) => Err(Error::LeaseLost {
                    partition: partition.to_string(),
                }),
                None => Ok(Vec::new()),
            };
        };
        Ok(halves
            .iter()
            .map(|(name, first)| Planned {
                name: name.clone(),
                collection: collection.clone().unwrap_or_default(),
                first: first.clone(),
                resume: None,
                done: false,
            })
            .collect())
    }

    /// The items the job's reconcile sweep saw that the mirror lacks, holds deleted, or holds
    /// with another `properties.updated` than the sweep saw: changed upstream since stored.
    pub async fn stale_seen(&self, job: &str) -> Result<Vec<(String, String)>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT s.collection, s.id FROM sync_seen s \
             LEFT JOIN items i ON i.collection = s.collection AND i.id = s.id \
             WHERE s.job = $1 AND (i.id IS NULL OR i.deleted_at IS NOT NULL \
             OR (s.updated IS NOT NULL AND (i.updated IS NULL OR i.updated <> s.updated))) \
             ORDER BY s.collection, s.id",
        )
        .bind(job)
        .fetch_all(pool)
        .await)
        .map_err(self.fail("find the items a reconcile sweep saw changed"))
    }

    /// Adds partitions to the job's unfinished pass of this kind (those already planned under
    /// the same name stay as they are).
    pub async fn extend_plan(
        &self,
        job: &str,
        kind: PassKind,
        search_hash: &str,
        partitions: &[(String, String, Request)],
    ) -> Result<(), Error> {
        let rows = partition_rows(partitions)?;
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            for (name, collection, first) in &rows {
                sqlx::query(INSERT_PARTITION)
                .bind(job)
                .bind(*name)
                .bind(kind.as_str())
                .bind(*collection)
                .bind(search_hash)
                .bind(first.as_str())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }.await)
        .map_err(self.fail("add partitions to the pass's plan"))
    }

    /// The completeness check of a pass's partitions that ended short of the match count their
    /// first page reported: those paged once are planned again from their start (in one
    /// statement, so two workers never both do it); those already paged again are incomplete.
    pub async fn check_complete(&self, job: &str, kind: PassKind) -> Result<Completeness, Error> {
        macro_rules! short {
            () => {
                "job = $1 AND kind = $2 AND done AND NOT split AND matched IS NOT NULL \
                 AND received < matched"
            };
        }
        let (short, repaged): (Vec<ShortRow>, Vec<String>) = on_pool!(self, pool => async {
            let short = sqlx::query_as(concat!(
                "SELECT partition, collection, matched, received, attempts FROM sync_state WHERE ",
                short!(),
                " ORDER BY partition"
            ))
            .bind(job)
            .bind(kind.as_str())
            .fetch_all(pool)
            .await?;
            let repaged = sqlx::query_scalar(concat!(
                "UPDATE sync_state SET done = FALSE, resume = NULL, matched = NULL, received = 0, \
                 pages_done = 0, attempts = attempts + 1, lease_owner = NULL, lease_until = NULL, \
                 updated_at = CURRENT_TIMESTAMP WHERE ",
                short!(),
                " AND attempts = 0 RETURNING partition"
            ))
            .bind(job)
            .bind(kind.as_str())
            .fetch_all(pool)
            .await?;
            Ok::<_, sqlx::Error>((short, repaged))
        }.await)
        .map_err(self.fail("check the partitions' completeness"))?;
        let mut check = Completeness::default();
        for (partition, collection, matched, received, attempts) in short {
            let short = Short {
                collection: collection.unwrap_or_default(),
                matched: u64::try_from(matched).unwrap_or_default(),
                received: u64::try_from(received).unwrap_or_default(),
                partition,
            };
            if repaged.contains(&short.partition) {
                check.repaged.push(short);
            } else if attempts > 0 {
                check.incomplete.push(short);
            }
        }
        Ok(check)
    }

    /// Ends the job's sync pass if it is planned and every partition is done: the watermark
    /// moves to `watermark` and the plan is removed, in one transaction. Returns whether it did
    /// (a worker may find the pass unfinished by others, or already ended by another worker).
    /// `None` keeps the watermark where it was (the pass was incomplete).
    pub async fn finish_sync_pass(
        &self,
        job: &str,
        watermark: Option<&str>,
    ) -> Result<bool, Error> {
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let moved = sqlx::query(
                "UPDATE sync_state SET watermark = COALESCE($2, watermark), updated_at = CURRENT_TIMESTAMP \
                 WHERE job = $1 AND partition = '' \
                 AND EXISTS (SELECT 1 FROM sync_state p WHERE p.job = $1 AND p.kind = 'sync') \
                 AND NOT EXISTS (SELECT 1 FROM sync_state p WHERE p.job = $1 AND p.kind = 'sync' AND NOT p.done)",
            )
            .bind(job)
            .bind(watermark)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                > 0;
            if moved {
                sqlx::query("DELETE FROM sync_state WHERE job = $1 AND kind = 'sync'")
                    .bind(job)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(moved)
        }.await)
        .map_err(self.fail("advance the watermark"))
    }

    /// The stored, live items in `scope` that the job's reconcile pass has not seen: deleted
    /// upstream.
    pub async fn vanished(
        &self,
        job: &str,
        scope: &Scope<'_>,
    ) -> Result<Vec<(String, String)>, Error> {
        let sql = concat!(
            "SELECT collection, id FROM items WHERE ",
            vanished!(),
            " ORDER BY id"
        );
        on_pool!(self, pool => bind_scope!(sqlx::query_as(sql), scope, job).fetch_all(pool).await)
            .map_err(self.fail("find items that vanished upstream"))
    }

    /// Ends a reconcile pass: tombstones what it did not see in `scopes` (one per collection),
    /// records them in the change feed (as `run_id`'s), forgets the ids it saw, records when, and
    /// removes its plan, in one transaction.
    pub async fn finish_reconcile(
        &self,
        job: &str,
        run_id: &str,
        scopes: &[Scope<'_>],
        at: &str,
        snapshots: Option<crate::config::SnapshotWindow>,
    ) -> Result<(), Error> {
        // The windows of what this reconcile tombstones (their rows keep their datetimes).
        let due = snapshots.map(|window| {
            let collate = match self {
                Database::Postgres(_) => " COLLATE \"C\"",
                Database::Sqlite(_) => "",
            };
            shared::due_sql(
                window,
                collate,
                "SELECT collection, id FROM changes WHERE run_id = $1 AND change = 'deleted'",
            )
        });
        let sql = concat!(
            "UPDATE items SET deleted_at = CURRENT_TIMESTAMP WHERE ",
            vanished!()
        );
        let record = match self {
            Database::Sqlite(_) => RECORD_DELETIONS_SQLITE,
            Database::Postgres(_) => RECORD_DELETIONS_POSTGRES,
        };
        let pgstac = self.pgstac().is_some();
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            for scope in scopes {
                bind_scope!(sqlx::query(record), scope, job).bind(run_id).execute(&mut *tx).await?;
                bind_scope!(sqlx::query(sql), scope, job).execute(&mut *tx).await?;
                if pgstac {
                    // The served catalog matches the source: what is tombstoned here is gone
                    // from pgstac (and stays remembered as deleted here).
                    sqlx::query(
                        "DELETE FROM pgstac.items p USING stac_sync.items s \
                         WHERE s.collection = $1 AND s.deleted_at IS NOT NULL \
                         AND p.collection = s.collection AND p.id = s.id",
                    )
                    .bind(scope.collection)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            if let Some(due) = &due {
                // Built from constants only.
                sqlx::query(sqlx::AssertSqlSafe(due.as_str())).bind(run_id).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM sync_seen WHERE job = $1").bind(job).execute(&mut *tx).await?;
            sqlx::query(
                "UPDATE sync_state SET reconciled_at = $2, updated_at = CURRENT_TIMESTAMP \
                 WHERE job = $1 AND partition = ''",
            )
            .bind(job)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM sync_state WHERE job = $1 AND kind = 'reconcile'")
                .bind(job)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }.await)
        .map_err(self.fail("record the deletions"))?;
        Ok(())
    }

    /// The change feed after `since`, oldest first, at most `limit` rows.
    pub async fn changes(&self, since: i64, limit: i64) -> Result<Vec<Change>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT seq, run_id, job, collection, id, change, content_hash, CAST(at AS TEXT) AS at \
             FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(since)
        .bind(limit)
        .fetch_all(pool)
        .await)
        .map_err(self.fail("read the change feed"))
    }

    /// The changes of one run after `after`, in order, at most `limit`: a run's changes are
    /// read a page at a time, as a backfill of millions has as many.
    pub async fn run_changes(
        &self,
        run_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Change>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT seq, run_id, job, collection, id, change, content_hash, CAST(at AS TEXT) AS at \
             FROM changes WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(run_id)
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await)
        .map_err(self.fail("read a run's changes"))
    }

    /// The last seq the webhook at `url` took (0: none yet).
    pub async fn webhook_cursor(&self, url: &str) -> Result<i64, Error> {
        on_pool!(self, pool => sqlx::query_scalar("SELECT delivered_seq FROM webhook_state WHERE url = $1")
            .bind(url)
            .fetch_optional(pool)
            .await)
        .map(Option::unwrap_or_default)
        .map_err(self.fail("read the webhook's cursor"))
    }

    /// Records that the webhook at `url` took the changes up to `seq`.
    pub async fn set_webhook_cursor(&self, url: &str, seq: i64) -> Result<(), Error> {
        on_pool!(self, pool => sqlx::query(
            "INSERT INTO webhook_state (url, delivered_seq) VALUES ($1, $2) \
             ON CONFLICT (url) DO UPDATE SET delivered_seq = excluded.delivered_seq",
        )
        .bind(url)
        .bind(seq)
        .execute(pool)
        .await
        .map(|_| ()))
        .map_err(self.fail("store the webhook's cursor"))
    }

    /// Removes the changes committed before `before`; how many.
    pub async fn prune_changes(&self, before: std::time::SystemTime) -> Result<u64, Error> {
        let done = match self {
            Database::Sqlite(db) => sqlx::query("DELETE FROM changes WHERE at < $1")
                .bind(
                    humantime::format_rfc3339_seconds(before)
                        .to_string()
                        .replace('T', " ")
                        .trim_end_matches('Z')
                        .to_string(),
                )
                .execute(db.pool())
                .await
                .map(|r| r.rows_affected()),
            Database::Postgres(db) => {
                sqlx::query("DELETE FROM changes WHERE at < CAST($1 AS TIMESTAMPTZ)")
                    .bind(humantime::format_rfc3339_seconds(before).to_string())
                    .execute(db.pool())
                    .await
                    .map(|r| r.rows_affected())
            }
        };
        done.map_err(self.fail("prune the change feed"))
    }

    /// The most recent runs, newest first (for `status`).
    pub async fn recent_runs(&self, limit: i64) -> Result<Vec<Run>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT run_id, job, CAST(started_at AS TEXT) AS started_at, \
             CAST(finished_at AS TEXT) AS finished_at, status, pages, items_new AS new, \
             items_changed AS changed, items_unchanged AS unchanged, items_deleted AS deleted, \
             items_quarantined AS quarantined, retries, token_renewals, items_missing AS missing, \
             partitions_incomplete AS incomplete, partitions_split AS splits, error FROM sync_runs \
             ORDER BY started_at DESC, run_id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(pool)
        .await)
        .map_err(self.fail("read the runs"))
    }

    /// Every job's watermark, last reconcile and unfinished partitions (for `status`).
    pub async fn job_states(&self) -> Result<Vec<JobStatus>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT j.job, j.watermark, j.pass_started_at, j.reconciled_at, \
             (SELECT COUNT(*) FROM sync_state p WHERE p.job = j.job AND p.kind IN ('sync', 'reconcile') \
             AND NOT p.done) AS partitions_left FROM sync_state j WHERE j.partition = '' ORDER BY j.job",
        )
        .fetch_all(pool)
        .await)
        .map_err(self.fail("read the jobs' state"))
    }

    /// Per collection: live items and tombstones (for `status`).
    pub async fn collection_counts(&self) -> Result<Vec<CollectionStatus>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT k.collection, COALESCE(i.live, 0) AS live, COALESCE(i.deleted, 0) AS deleted, \
             c.id IS NOT NULL AS described, CAST(c.deleted_at AS TEXT) AS gone_at \
             FROM (SELECT collection FROM items UNION SELECT id FROM collections) k \
             LEFT JOIN (SELECT collection, SUM(CASE WHEN deleted_at IS NULL THEN 1 ELSE 0 END) AS live, \
             SUM(CASE WHEN deleted_at IS NULL THEN 0 ELSE 1 END) AS deleted FROM items \
             GROUP BY collection) i ON i.collection = k.collection \
             LEFT JOIN collections c ON c.id = k.collection ORDER BY k.collection",
        )
        .fetch_all(pool)
        .await)
        .map_err(self.fail("count items"))
    }

    /// Whether a collection's document as fetched now is new, changed, or back after it was
    /// gone: then the outputs get it, and [`Database::store_collection`] stores it.
    /// `variant` names what stac-sync adds to the document it writes (the snapshots' asset):
    /// a document written with other additions counts as changed.
    pub async fn collection_changed(
        &self,
        id: &str,
        content: &str,
        variant: &str,
    ) -> Result<bool, Error> {
        let hash = collection_hash(content, variant);
        let stored: Option<(String, bool)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT content_hash, deleted_at IS NOT NULL FROM collections WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await)
        .map_err(self.fail("read a collection"))?;
        Ok(stored.is_none_or(|(stored, gone)| stored != hash || gone))
    }

    /// A collection's document as stored, if any.
    pub async fn collection_document(&self, id: &str) -> Result<Option<String>, Error> {
        on_pool!(self, pool => sqlx::query_scalar(
            "SELECT CAST(content AS TEXT) FROM collections WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await)
        .map_err(self.fail("read a collection"))
    }

    /// Records a collection fetched in this run: its document if `changed`, else only when.
    pub async fn store_collection(
        &self,
        id: &str,
        content: &str,
        variant: &str,
        changed: bool,
    ) -> Result<(), Error> {
        let hash = collection_hash(content, variant);
        let sql = match (changed, self) {
            (false, _) => "UPDATE collections SET last_seen_at = CURRENT_TIMESTAMP WHERE id = $1",
            (true, Database::Sqlite(_)) => UPSERT_COLLECTION_SQLITE,
            (true, Database::Postgres(_)) => UPSERT_COLLECTION_POSTGRES,
        };
        on_pool!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(content)
            .bind(&hash)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(self.fail("store a collection"))
    }

    /// Whether a collection's document is stored.
    pub async fn collection_stored(&self, id: &str) -> Result<bool, Error> {
        on_pool!(self, pool => sqlx::query_scalar("SELECT COUNT(*) FROM collections WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .map(|n: i64| n > 0))
        .map_err(self.fail("read a collection"))
    }

    /// Marks a collection gone upstream (its document and items are kept); whether it was
    /// stored and not yet marked.
    pub async fn collection_gone(&self, id: &str) -> Result<bool, Error> {
        on_pool!(self, pool => sqlx::query(
            "UPDATE collections SET deleted_at = CURRENT_TIMESTAMP WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .execute(pool)
        .await
        .map(|done| done.rows_affected() > 0))
        .map_err(self.fail("mark a collection gone"))
    }

    /// The most recent quarantined features, newest first, and how many there are in all.
    pub async fn quarantine(&self, limit: i64) -> Result<(i64, Vec<Quarantined>), Error> {
        on_pool!(self, pool => async {
            let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quarantine").fetch_one(pool).await?;
            let rows = sqlx::query_as(
                "SELECT job, collection, item_id AS id, reason, page_url AS page, \
                 CAST(quarantined_at AS TEXT) AS at \
                 FROM quarantine ORDER BY seq DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?;
            Ok::<_, sqlx::Error>((total, rows))
        }.await)
        .map_err(self.fail("read the quarantine"))
    }

    /// Migrations applied and known to this binary: `(applied, known)`.
    pub async fn migrations(&self) -> (usize, usize) {
        let known = match self {
            Database::Sqlite(_) => sqlite::MIGRATOR.iter().count(),
            Database::Postgres(_) => postgres::MIGRATOR.iter().count(),
        };
        let applied: Result<Vec<i64>, sqlx::Error> = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success",
        )
        .fetch_all(pool)
        .await);
        // No table yet: nothing applied.
        (applied.map(|v| v.len()).unwrap_or(0), known)
    }

    /// Checks that the database takes a write, without leaving one: a transaction that writes
    /// and rolls back.
    pub async fn probe_write(&self) -> Result<(), Error> {
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            sqlx::query("CREATE TEMPORARY TABLE stac_sync_probe (x INTEGER)").execute(&mut *tx).await?;
            sqlx::query("INSERT INTO stac_sync_probe VALUES (1)").execute(&mut *tx).await?;
            tx.rollback().await
        }.await)
        .map_err(self.fail("write (a test write, rolled back)"))
    }

    /// Records the start of a run; a single run (`alone`) also marks the job's runs still
    /// recorded as running `abandoned`, since it holds the job's lock and none of them can be
    /// alive. (Workers run side by side, so they leave that to the next single run.)
    pub async fn start_run(&self, run_id: &str, job: &str, alone: bool) -> Result<(), Error> {
        match self {
            Database::Sqlite(db) => shared::start_run(db.pool(), run_id, job, alone).await,
            Database::Postgres(db) => shared::start_run(db.pool(), run_id, job, alone).await,
        }
        .map_err(self.fail("record the run"))
    }

    /// Records the end of a run with its counts.
    pub async fn finish_run(
        &self,
        run_id: &str,
        status: &str,
        counts: &Counts,
        error: Option<&str>,
    ) -> Result<(), Error> {
        match self {
            Database::Sqlite(db) => {
                shared::finish_run(db.pool(), run_id, status, counts, error).await
            }
            Database::Postgres(db) => {
                shared::finish_run(db.pool(), run_id, status, counts, error).await
            }
        }
        .map_err(self.fail("record the run's end"))
    }

    /// Every stored item as `(collection, id, content)`, ordered; for tests and checks.
    pub async fn all_items(&self) -> Result<Vec<(String, String, String)>, Error> {
        match self {
            Database::Sqlite(db) => shared::all_items(db.pool()).await,
            Database::Postgres(db) => shared::all_items(db.pool()).await,
        }
        .map_err(self.fail("read items"))
    }

    /// Turns a database error into a sink error that names the database and the operation.
    fn fail(&self, what: &'static str) -> impl Fn(sqlx::Error) -> Error + '_ {
        let shown = match self {
            Database::Sqlite(db) => db.shown(),
            Database::Postgres(db) => db.shown(),
        };
        sink_error(shown, what)
    }
}

/// Classifies items from the stored `(index in items, content_hash, tombstoned)` rows of those
/// that exist; the others are new.
fn known(items: &[Item], rows: Vec<(i64, String, bool)>) -> Vec<Known> {
    let mut known = vec![Known::New; items.len()];
    for (index, hash, deleted) in rows {
        let Some(at) = usize::try_from(index).ok().filter(|at| *at < items.len()) else {
            continue;
        };
        known[at] = if hash == items[at].hash && !deleted {
            Known::Unchanged
        } else {
            Known::Changed
        };
    }
    known
}

/// Whether a database URL names Postgres.
pub fn is_postgres(url: &str) -> bool {
    crate::config::is_postgres_url(url)
}

/// Why `run --worker` refuses SQLite.
pub const WORKERS_NEED_POSTGRES: &str = "run --worker needs a Postgres database_url: workers on \
    several machines share a job through Postgres leases, and SQLite is one file on one machine. \
    Use postgres://..., or drop --worker (one process pages a job's partitions concurrently)";

/// Turns a database error into a sink error naming the database and the operation.
fn sink_error<'a>(shown: &'a str, what: &str) -> impl Fn(sqlx::Error) -> Error + 'a {
    let what = what.to_string();
    move |source| Error::Database {
        database: shown.to_string(),
        what: what.clone(),
        source,
    }
}

/// A resume point as stored.
fn resume_json(resume: Option<&Request>) -> Result<Option<String>, Error> {
    resume
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| Error::Internal(format!("cannot serialise the resume point: {e}")))
}

/// Converts a count for the database.
fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The hash a collection's row keeps: of its document as received, and of what stac-sync adds
/// to the copy it writes (`variant`, empty when nothing).
fn collection_hash(content: &str, variant: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(content.as_bytes());
    hasher.update(variant.as_bytes());
    hasher.finalize().to_hex().to_string()
}
