//! The SQL sink: items, runs, resume points and quarantine, in SQLite or Postgres.
//!
//! Both backends keep the same tables (`migrations/sqlite/`, `migrations/postgres/`) and the
//! same guarantees: idempotent upserts keyed by `(collection, id)`, unchanged rows never
//! rewritten, and a page's rows, quarantined features and resume point committed in one
//! transaction. [`Database`] dispatches to the backend named by the URL.

mod postgres;
mod shared;
mod sqlite;

pub use postgres::PostgresDb;
pub use sqlite::SqliteDb;

use crate::api::Request;
use crate::error::Error;
use crate::page::{Item, Rejected};

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
    /// The job's query fingerprint.
    pub query_hash: &'a str,
    /// New and changed items (unchanged ones are not rewritten).
    pub items: Vec<&'a Item>,
    /// Features to quarantine.
    pub rejected: &'a [Rejected],
    /// The URL of the page they came from.
    pub page_url: &'a str,
    /// The next request, or `None` when this page ends the pass.
    pub resume: Option<&'a Request>,
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
    /// Opens the database named by `url`.
    pub async fn connect(url: &str) -> Result<Database, Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Database::Postgres(PostgresDb::connect(url).await?))
        } else {
            Ok(Database::Sqlite(SqliteDb::connect(url).await?))
        }
    }

    /// Applies the schema migrations.
    pub async fn migrate(&self) -> Result<(), Error> {
        match self {
            Database::Sqlite(db) => db.migrate().await,
            Database::Postgres(db) => db.migrate().await,
        }
    }

    /// Takes the job's single-runner lock, or fails with [`Error::Locked`].
    pub async fn lock(&self, job: &str) -> Result<JobLock, Error> {
        match self {
            Database::Sqlite(db) => db.lock(job),
            Database::Postgres(db) => db.lock(job).await,
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

    /// Classifies each item against what is stored.
    pub async fn classify(&self, items: &[Item]) -> Result<Vec<Known>, Error> {
        match self {
            Database::Sqlite(db) => db.classify(items).await,
            Database::Postgres(db) => db.classify(items).await,
        }
    }

    /// Commits one page: rows, quarantine and resume point, atomically. Returns the features
    /// quarantined because the database refused them (beyond `page.rejected`).
    pub async fn commit_page(&self, page: PageCommit<'_>) -> Result<Vec<Rejected>, Error> {
        match self {
            Database::Sqlite(db) => db.commit_page(page).await,
            Database::Postgres(db) => db.commit_page(page).await,
        }
    }

    /// The stored resume point of an unfinished pass of this exact query, if any.
    pub async fn resume_point(
        &self,
        job: &str,
        partition: &str,
        query_hash: &str,
    ) -> Result<Option<Request>, Error> {
        let text = match self {
            Database::Sqlite(db) => {
                shared::resume_text(db.pool(), job, partition, query_hash).await
            }
            Database::Postgres(db) => {
                shared::resume_text(db.pool(), job, partition, query_hash).await
            }
        }
        .map_err(self.fail("read the resume point"))?;
        let Some(text) = text else { return Ok(None) };
        match serde_json::from_str(&text) {
            Ok(request) => Ok(Some(request)),
            Err(e) => {
                tracing::warn!(job, partition, error = %e, "unreadable resume point; starting the pass over");
                Ok(None)
            }
        }
    }

    /// Records the start of a run.
    pub async fn start_run(&self, run_id: &str, job: &str) -> Result<(), Error> {
        match self {
            Database::Sqlite(db) => shared::start_run(db.pool(), run_id, job).await,
            Database::Postgres(db) => shared::start_run(db.pool(), run_id, job).await,
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

/// Turns a database error into a sink error naming the database and the operation.
fn sink_error<'a>(shown: &'a str, what: &str) -> impl Fn(sqlx::Error) -> Error + 'a {
    let what = what.to_string();
    move |e| Error::Sink(format!("database {shown}: {what}: {e}"))
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
