//! The SQL sink: items, runs, resume points and quarantine, in SQLite or Postgres.
//!
//! Both backends keep the same tables (`migrations/sqlite/`, `migrations/postgres/`) and the
//! same guarantees: idempotent upserts keyed by `(collection, id)`, unchanged rows never
//! rewritten, and a page's rows, quarantined features and resume point committed in one
//! transaction. [`Database`] dispatches to the backend named by the URL. This file holds the
//! connection and the page's commit (`items`); each other table has its own file.

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

// After `on_pool!`, which they use.
mod collections;
mod feed;
mod locks;
mod plans;
mod reconcile;
mod runs;
mod snapshots;

pub use collections::CollectionStatus;
pub use feed::Change;
pub use locks::{JobLock, Lease};
pub use plans::{Completeness, JobState, PassKind, PlanCommit, Planned, Short};
use plans::{PlannedRow, planned_row};
pub use reconcile::{Scope, Seen};
pub use runs::{Counts, JobStatus, Quarantined, Run};
pub use snapshots::{Due, window_range};

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
    fn pgstac(&self) -> Option<&PostgresDb> {
        match self {
            Database::Postgres(db) if db.is_pgstac() => Some(db),
            _ => None,
        }
    }

    /// Pages of items that may commit at once. Postgres parses each item into `jsonb` on the
    /// backend that commits it, so two commits keep two backends (and cores) busy; pgstac too,
    /// since its partitions are made and widened before a page's transaction, in one of their
    /// own, so pages hold no partition's exclusive lock. SQLite has one writer.
    pub fn commits_at_once(&self) -> usize {
        match self {
            Database::Sqlite(_) => 1,
            Database::Postgres(_) => 2,
        }
    }

    /// Whether a collection's items can be stored only once its document is (pgstac keeps
    /// each collection's items in partitions its document makes).
    pub fn needs_collection_document(&self) -> bool {
        self.pgstac().is_some()
    }

    /// What `check` reports of this database beyond reaching and writing it: `(check, what
    /// it found)` (pgstac: its version, and whether this role may write to it).
    pub async fn probes(&self) -> Vec<(&'static str, Result<String, Error>)> {
        match self.pgstac() {
            Some(db) => vec![("pgstac", pgstac::probe(db.pool(), db.shown()).await)],
            None => Vec::new(),
        }
    }

    /// Applies the schema migrations.
    pub async fn migrate(&self) -> Result<(), Error> {
        match self {
            Database::Sqlite(db) => db.migrate().await,
            Database::Postgres(db) => db.migrate().await,
        }
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
        known[at] = if items[at].has_hash(&hash) && !deleted {
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
