//! The SQL sink: items, runs, resume points and quarantine, in SQLite.
//!
//! Writes are idempotent upserts keyed by `(collection, id)`; a row whose content hash is
//! unchanged is not rewritten. A page's rows, its quarantined features and the resume point
//! after it commit in one transaction, which takes SQLite's write lock up front
//! (`BEGIN IMMEDIATE`) so it never fails half-way on a lock upgrade.

use crate::api::Request;
use crate::config::redact_url;
use crate::error::Error;
use crate::page::{Item, Rejected};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

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

/// The database.
#[derive(Debug, Clone)]
pub struct Database {
    pool: SqlitePool,
    shown: String,
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Database {
    /// Opens (creating if needed) the database at `url`.
    pub async fn connect(url: &str) -> Result<Database, Error> {
        let shown = redact_url(url);
        if !url.starts_with("sqlite:") {
            return Err(Error::Config(format!(
                "database_url {shown}: only sqlite:// is supported by this build"
            )));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("database_url {shown}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode is durable across process crashes (only power loss can drop
            // the last transactions), which is the failure this tool must survive.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| Error::Sink(format!("cannot open database {shown}: {e}")))?;
        Ok(Database { pool, shown })
    }

    /// The pool, for tests and `status`.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn fail(&self, what: &str) -> impl Fn(sqlx::Error) -> Error + '_ {
        let what = what.to_string();
        move |e| Error::Sink(format!("database {}: {what}: {e}", self.shown))
    }

    /// Applies the schema migrations.
    pub async fn migrate(&self) -> Result<(), Error> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(|e| Error::Sink(format!("database {}: migrations failed: {e}", self.shown)))
    }

    /// Classifies each item against what is stored.
    pub async fn classify(&self, items: &[Item]) -> Result<Vec<Known>, Error> {
        let mut conn = self.pool.acquire().await.map_err(self.fail("connect"))?;
        let mut known = Vec::with_capacity(items.len());
        for item in items {
            let row = sqlx::query(
                "SELECT content_hash, deleted_at IS NOT NULL AS deleted FROM items \
                 WHERE collection = ? AND id = ?",
            )
            .bind(&item.collection)
            .bind(&item.id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(self.fail("read item hashes"))?;
            known.push(match row {
                None => Known::New,
                Some(row) => {
                    let hash: String = row.get(0);
                    let deleted: bool = row.get(1);
                    if hash == item.hash && !deleted {
                        Known::Unchanged
                    } else {
                        Known::Changed
                    }
                }
            });
        }
        Ok(known)
    }

    /// Commits one page: rows, quarantine and resume point, atomically.
    pub async fn commit_page(&self, page: PageCommit<'_>) -> Result<(), Error> {
        let now = now();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.fail("begin transaction"))?;
        for item in &page.items {
            let content = std::str::from_utf8(&item.content)
                .map_err(|e| Error::Internal(format!("item {} is not UTF-8: {e}", item.id)))?;
            let [xmin, ymin, xmax, ymax] = item.bbox.map(|b| b.map(Some)).unwrap_or([None; 4]);
            sqlx::query(
                "INSERT INTO items (collection, id, content, content_hash, datetime, \
                 start_datetime, end_datetime, updated, xmin, ymin, xmax, ymax, first_seen_at, \
                 last_seen_at, deleted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL) \
                 ON CONFLICT (collection, id) DO UPDATE SET content = excluded.content, \
                 content_hash = excluded.content_hash, datetime = excluded.datetime, \
                 start_datetime = excluded.start_datetime, end_datetime = excluded.end_datetime, \
                 updated = excluded.updated, xmin = excluded.xmin, ymin = excluded.ymin, \
                 xmax = excluded.xmax, ymax = excluded.ymax, last_seen_at = excluded.last_seen_at, \
                 deleted_at = NULL \
                 WHERE items.content_hash <> excluded.content_hash OR items.deleted_at IS NOT NULL",
            )
            .bind(&item.collection)
            .bind(&item.id)
            .bind(content)
            .bind(&item.hash)
            .bind(&item.datetime)
            .bind(&item.start_datetime)
            .bind(&item.end_datetime)
            .bind(&item.updated)
            .bind(xmin)
            .bind(ymin)
            .bind(xmax)
            .bind(ymax)
            .bind(&now)
            .bind(&now)
            .execute(&mut *tx)
            .await
            .map_err(self.fail(&format!("store item {}/{}", item.collection, item.id)))?;
        }
        for rejected in page.rejected {
            sqlx::query(
                "INSERT INTO quarantine (run_id, job, collection, item_id, reason, page_url, \
                 content, quarantined_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(page.run_id)
            .bind(page.job)
            .bind(&rejected.collection)
            .bind(&rejected.id)
            .bind(&rejected.reason)
            .bind(page.page_url)
            .bind(String::from_utf8_lossy(&rejected.content))
            .bind(&now)
            .execute(&mut *tx)
            .await
            .map_err(self.fail("quarantine a feature"))?;
        }
        let resume = match page.resume {
            Some(request) => Some(
                serde_json::to_string(request)
                    .map_err(|e| Error::Internal(format!("resume point: {e}")))?,
            ),
            None => None,
        };
        sqlx::query(
            "INSERT INTO sync_state (job, partition, query_hash, resume, pages_done, updated_at) \
             VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (job, partition) DO UPDATE SET \
             query_hash = excluded.query_hash, resume = excluded.resume, \
             pages_done = CASE WHEN excluded.resume IS NULL THEN 0 ELSE sync_state.pages_done + 1 END, \
             updated_at = excluded.updated_at",
        )
        .bind(page.job)
        .bind(page.partition)
        .bind(page.query_hash)
        .bind(resume)
        .bind(&now)
        .execute(&mut *tx)
        .await
        .map_err(self.fail("store the resume point"))?;
        tx.commit().await.map_err(self.fail("commit a page"))
    }

    /// The stored resume point of an unfinished pass of this exact query, if any.
    pub async fn resume_point(
        &self,
        job: &str,
        partition: &str,
        query_hash: &str,
    ) -> Result<Option<Request>, Error> {
        let row = sqlx::query(
            "SELECT resume FROM sync_state WHERE job = ? AND partition = ? AND query_hash = ? \
             AND resume IS NOT NULL",
        )
        .bind(job)
        .bind(partition)
        .bind(query_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(self.fail("read the resume point"))?;
        let Some(row) = row else { return Ok(None) };
        let text: String = row.get(0);
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
        sqlx::query(
            "INSERT INTO sync_runs (run_id, job, started_at, status) VALUES (?, ?, ?, 'running')",
        )
        .bind(run_id)
        .bind(job)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(self.fail("record the run"))?;
        Ok(())
    }

    /// Records the end of a run with its counts.
    pub async fn finish_run(
        &self,
        run_id: &str,
        status: &str,
        counts: &Counts,
        error: Option<&str>,
    ) -> Result<(), Error> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE sync_runs SET finished_at = ?, status = ?, pages = ?, items_new = ?, \
             items_changed = ?, items_unchanged = ?, items_deleted = ?, items_quarantined = ?, \
             items_duplicate = ?, retries = ?, token_renewals = ?, error = ? WHERE run_id = ?",
        )
        .bind(now())
        .bind(status)
        .bind(n(counts.pages))
        .bind(n(counts.new))
        .bind(n(counts.changed))
        .bind(n(counts.unchanged))
        .bind(n(counts.deleted))
        .bind(n(counts.quarantined))
        .bind(n(counts.duplicate))
        .bind(n(counts.retries))
        .bind(n(counts.token_renewals))
        .bind(error)
        .bind(run_id)
        .execute(&self.pool)
        .await
        .map_err(self.fail("record the run's end"))?;
        Ok(())
    }
}
