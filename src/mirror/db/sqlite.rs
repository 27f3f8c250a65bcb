//! The SQLite sink.
//!
//! Writes are idempotent upserts keyed by `(collection, id)`; a row whose content hash is
//! unchanged is not rewritten. A page's rows, its quarantined features and the resume point
//! after it commit in one transaction, which takes SQLite's write lock up front
//! (`BEGIN IMMEDIATE`) so it never fails half-way on a lock upgrade.

use super::{Committed, JobLock, Known, PageCommit, Written, shared};
use crate::config::redact_url;
use crate::error::Error;
use crate::stac::reader::{Item, Rejected};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::Duration;

/// The stored hash of each item of a page, from a JSON array of `[collection, id]` (`$1`), as
/// one JSON array of `[index in $1, hash, deleted (0 or 1)]`. One row, not one per item: each
/// row is a message from sqlx's SQLite thread to the task, and those messages cost more than the
/// lookups themselves. The hashes are read from the index that holds them (migration 0008), not
/// from the rows, where they come after the content (docs/benchmarks.md).
const CLASSIFY: &str = "SELECT json_group_array(json_array(j.key, i.content_hash, \
    i.deleted_at IS NOT NULL)) FROM json_each($1) AS j \
    JOIN items i INDEXED BY items_hash ON i.collection = json_extract(j.value, '$[0]') \
    AND i.id = json_extract(j.value, '$[1]')";

/// What [`CLASSIFY`] finds for `items`: each stored one's index, hash and whether it is deleted.
async fn stored<'e>(
    executor: impl sqlx::SqliteExecutor<'e>,
    items: impl Iterator<Item = &Item>,
) -> Result<Vec<(i64, String, bool)>, sqlx::Error> {
    let keys: Vec<[&str; 2]> = items
        .map(|i| [i.collection.as_str(), i.id.as_str()])
        .collect();
    let keys = serde_json::to_string(&keys).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    let found: String = sqlx::query_scalar(CLASSIFY)
        .bind(keys)
        .fetch_one(executor)
        .await?;
    let found: Vec<(i64, String, u8)> = serde_json::from_str(&found)
        .map_err(|e| sqlx::Error::Protocol(format!("the stored hashes of a page: {e}")))?;
    Ok(found
        .into_iter()
        .map(|(at, hash, deleted)| (at, hash, deleted != 0))
        .collect())
}

/// A page's changes, from the JSON array `$3` (SQLite has one writer: the feed's order is the
/// commits').
const CHANGES: shared::ChangesSql = shared::ChangesSql {
    insert: "INSERT INTO changes (run_id, job, collection, id, change, content_hash, at) \
        SELECT $1, $2, json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
        json_extract(value, '$[2]'), json_extract(value, '$[3]'), CURRENT_TIMESTAMP \
        FROM json_each($3) ORDER BY key",
    keys: "SELECT json_extract(value, '$[0]') AS collection, json_extract(value, '$[1]') AS id \
        FROM json_each($1)",
    collate: "",
};

/// The schema migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Most rows per call to sqlx's SQLite thread: 32 × 12 parameters, well inside SQLite's limit
/// of 32,766.
const ROWS_PER_CALL: usize = 32;
/// Rows a connection's thread reads ahead of the task that takes them: a whole page of a
/// snapshot window (150 items for GeoParquet, 250 for NDJSON; sqlx's default of 50 makes the
/// thread wait for the task, and wake it, at nearly every row of a page; docs/benchmarks.md
/// has the measurements).
const ROW_BUFFER: usize = 256;

/// The upserts of 1, 2, 4, ... [`ROWS_PER_CALL`] rows, by the power of two: a page's rows go in
/// calls of those sizes, so sqlx keeps 63 statements prepared, not 528.
static UPSERTS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    (0..=ROWS_PER_CALL.trailing_zeros())
        .map(|power| upsert_sql(1 << power))
        .collect()
});

/// The upsert of `rows` items (12 parameters each), as `rows` statements of one row run in one
/// call. A statement of many rows would have SQLite keep a statement journal (the original of
/// every page it touches, so it can undo the rows before one that fails): temporary files as
/// large as the write-ahead log (docs/benchmarks.md). A statement of
/// one row needs none; a failure still undoes the whole page, as the transaction is dropped.
/// A row whose content hash is unchanged (and that is not a tombstone) is left as it is.
fn upsert_sql(rows: usize) -> String {
    let upsert = "INSERT INTO items (collection, id, content, content_hash, datetime, \
         start_datetime, end_datetime, updated, bbox_xmin, bbox_ymin, bbox_xmax, bbox_ymax, \
         first_seen_at, last_seen_at, deleted_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, NULL) \
         ON CONFLICT (collection, id) DO UPDATE SET content = excluded.content, \
         content_hash = excluded.content_hash, datetime = excluded.datetime, \
         start_datetime = excluded.start_datetime, end_datetime = excluded.end_datetime, \
         updated = excluded.updated, bbox_xmin = excluded.bbox_xmin, bbox_ymin = excluded.bbox_ymin, \
         bbox_xmax = excluded.bbox_xmax, bbox_ymax = excluded.bbox_ymax, \
         last_seen_at = excluded.last_seen_at, deleted_at = NULL \
         WHERE items.content_hash <> excluded.content_hash OR items.deleted_at IS NOT NULL";
    vec![upsert; rows].join(";\n")
}

/// Splits `items` into runs of `most` (a power of two), then of the powers of two that make up
/// the rest.
fn in_calls<T>(mut items: &[T], most: usize) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let len = items.len().min(most);
        let size = if len == 0 { 0 } else { 1 << len.ilog2() };
        let (call, rest) = items.split_at(size);
        items = rest;
        (size > 0).then_some(call)
    })
}

/// The SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteDb {
    pool: SqlitePool,
    /// The one connection that commits pages, which also classifies a page when it is free.
    /// A commit makes SQLite drop every other connection's page cache, so a page classified on
    /// another connection reads its index pages into a cache built again from fresh memory;
    /// on this one the cache stays (docs/benchmarks.md). While it commits, a page is classified
    /// on the pool instead, so a backfill still classifies and writes objects during a commit.
    writer: SqlitePool,
    shown: String,
    path: Option<std::path::PathBuf>,
}

impl SqliteDb {
    /// Opens (creating if needed) the database at `url`.
    pub async fn connect(url: &str) -> Result<SqliteDb, Error> {
        let shown = redact_url(url);
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("database_url {shown}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode is durable across process crashes (only power loss can drop
            // the last transactions), which is the failure this tool must survive.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            // 8 KB pages (set when the file is created). The primary key's index takes items in
            // no order of theirs, so once it outgrows the cache each item reads and rewrites a
            // leaf of it: the smaller the page, the fewer bytes each item costs in reads and
            // in the log (docs/benchmarks.md has the measurements at 8 and 32 KB).
            .page_size(8_192)
            .row_buffer_size(ROW_BUFFER);
        // No mmap_size: reading a snapshot window through a mapping counts every page read in
        // the process's RSS, and the write path is no faster with it (docs/benchmarks.md).
        let filename = options.get_filename();
        let path = (!filename.as_os_str().is_empty() && filename.as_os_str() != ":memory:")
            .then(|| filename.to_path_buf());
        let connect = |connections, options| {
            let database = shown.clone();
            async move {
                SqlitePoolOptions::new()
                    .max_connections(connections)
                    .connect_with(options)
                    .await
                    .map_err(|source| Error::Connect { database, source })
            }
        };
        // The pool first: its connection creates the file and sets its log mode.
        let pool = connect(3, options.clone()).await?;
        let writer = connect(1, options).await?;
        Ok(SqliteDb {
            pool,
            writer,
            shown,
            path,
        })
    }

    /// Takes the job's single-runner lock: an OS file lock on `{database}.{job}.lock`, which the
    /// kernel releases when the process dies, however it dies.
    pub fn lock(&self, job: &str) -> Result<JobLock, Error> {
        let Some(path) = &self.path else {
            return Ok(JobLock::None);
        };
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{job}.lock"));
        let lock_path = path.with_file_name(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                Error::Sink(format!(
                    "cannot open lock file {}: {e}",
                    lock_path.display()
                ))
            })?;
        match file.try_lock() {
            Ok(()) => Ok(JobLock::File(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
                job: job.to_string(),
                detail: format!(
                    "{} is held by another stac-sync process on this machine; wait for it to \
                     finish",
                    lock_path.display()
                ),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::Sink(format!(
                "cannot lock {}: {e}",
                lock_path.display()
            ))),
        }
    }

    /// The pool, for tests and `status`.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn fail(&self, what: &str) -> impl Fn(sqlx::Error) -> Error + '_ {
        super::sink_error(&self.shown, what)
    }

    /// Applies the schema migrations.
    pub async fn migrate(&self) -> Result<(), Error> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| Error::Migrate {
                database: self.shown.clone(),
                source,
            })
    }

    /// Classifies each item against what is stored.
    pub async fn classify(&self, items: &[Item]) -> Result<Vec<Known>, Error> {
        // One query per page: the keys go in as a JSON array of [collection, id] pairs.
        let rows = match self.writer.try_acquire() {
            Some(mut writer) => stored(&mut *writer, items.iter()).await,
            None => stored(&self.pool, items.iter()).await,
        }
        .map_err(self.fail("read item hashes"))?;
        Ok(super::known(items, rows))
    }

    /// Commits one page: rows, quarantine and resume point, atomically. If SQLite refuses an
    /// item (a trigger or constraint of the user's), the page is written again with each item
    /// under a savepoint, and the refused ones are quarantined; returns them.
    pub async fn commit_page(&self, page: PageCommit<'_>) -> Result<Committed, Error> {
        let (refused, written) = match self.write_page(&page, false).await {
            Err(sqlx::Error::Database(e)) => {
                tracing::warn!(error = %e, "SQLite refused the page; storing its items one by one");
                self.write_page(&page, true)
                    .await
                    .map_err(self.fail("commit a page"))
            }
            other => other.map_err(self.fail("commit a page")),
        }?;
        Ok(Committed { refused, written })
    }

    /// What the page's upserts will write, read in their transaction (which holds the only
    /// write lock): `(collection, id)` → new, for each item not stored with that content. A page
    /// classified before an earlier page with the same items committed (a partition's first
    /// page, and the half of it that a split pages next) writes nothing for them.
    async fn to_write(
        conn: &mut sqlx::SqliteConnection,
        items: &[&Item],
    ) -> Result<Written, sqlx::Error> {
        let stored = stored(&mut *conn, items.iter().copied()).await?;
        let mut written: Written = items
            .iter()
            .map(|i| ((i.collection.clone(), i.id.clone()), true))
            .collect();
        for (at, hash, deleted) in stored {
            let Some(item) = usize::try_from(at).ok().and_then(|at| items.get(at)) else {
                continue;
            };
            let key = (item.collection.clone(), item.id.clone());
            if item.has_hash(&hash) && !deleted {
                written.remove(&key);
            } else {
                written.insert(key, false);
            }
        }
        Ok(written)
    }

    async fn write_page(
        &self,
        page: &PageCommit<'_>,
        careful: bool,
    ) -> Result<(Vec<Rejected>, Written), sqlx::Error> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let written = Self::to_write(&mut tx, &page.items).await?;
        if let Some(window) = page.snapshots {
            // The windows changed items leave: their datetime may move them.
            let changed: Vec<[&str; 2]> = written
                .iter()
                .filter(|(_, new)| !**new)
                .map(|((collection, id), _)| [collection.as_str(), id.as_str()])
                .collect();
            if !changed.is_empty() {
                let keys = serde_json::to_string(&changed)
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                shared::mark_due::<sqlx::Sqlite>(&mut tx, window, &CHANGES, CHANGES.keys, &keys)
                    .await?;
            }
        }
        let mut refused = Vec::new();
        // Rows go many to a call: each call is a round trip to sqlx's SQLite thread. Careful,
        // each item goes alone under a savepoint.
        let most = if careful { 1 } else { ROWS_PER_CALL };
        for items in in_calls(&page.items, most) {
            if careful {
                sqlx::query("SAVEPOINT item").execute(&mut *tx).await?;
            }
            // Built from constants only.
            let sql = UPSERTS
                .get(items.len().trailing_zeros() as usize)
                .map_or("", String::as_str);
            let mut statement = sqlx::query(sqlx::AssertSqlSafe(sql));
            for item in items {
                let content = simdutf8::compat::from_utf8(&item.content)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                let [bbox_xmin, bbox_ymin, bbox_xmax, bbox_ymax] =
                    item.bbox.map(|b| b.map(Some)).unwrap_or([None; 4]);
                statement = statement
                    .bind(&item.collection)
                    .bind(&item.id)
                    .bind(content)
                    .bind(&item.hash)
                    .bind(&item.datetime)
                    .bind(&item.start_datetime)
                    .bind(&item.end_datetime)
                    .bind(&item.updated)
                    .bind(bbox_xmin)
                    .bind(bbox_ymin)
                    .bind(bbox_xmax)
                    .bind(bbox_ymax);
            }
            match statement.execute(&mut *tx).await {
                Ok(_) if careful => {
                    sqlx::query("RELEASE item").execute(&mut *tx).await?;
                }
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if careful => {
                    sqlx::query("ROLLBACK TO item").execute(&mut *tx).await?;
                    sqlx::query("RELEASE item").execute(&mut *tx).await?;
                    for item in items {
                        refused.push(Rejected {
                            content: item.content.clone(),
                            reason: format!("SQLite refused the item: {}", e.message()),
                            collection: Some(item.collection.clone()),
                            id: Some(item.id.clone()),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        shared::finish_page::<sqlx::Sqlite>(&mut tx, page, &refused, &written, &CHANGES).await?;
        tx.commit().await?;
        Ok((refused, written))
    }

    /// The URL, without its password, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_go_in_calls_of_32_then_of_the_powers_of_two_that_make_up_the_rest() {
        for n in [0, 1, 2, 3, 31, 32, 33, 100, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let calls: Vec<&[usize]> = in_calls(&items, ROWS_PER_CALL).collect();
            let sizes: Vec<usize> = calls.iter().map(|c| c.len()).collect();
            assert_eq!(calls.concat(), items, "{n} items");
            assert!(
                sizes
                    .windows(2)
                    .all(|w| w[0] > w[1] || w[0] == ROWS_PER_CALL),
                "{n} items: {sizes:?}"
            );
            for size in sizes {
                assert!(
                    size.is_power_of_two() && size <= ROWS_PER_CALL,
                    "{n}: {size}"
                );
                // The call's upsert has as many one-row statements as it has rows.
                let sql = &UPSERTS[size.trailing_zeros() as usize];
                assert_eq!(sql.matches("INSERT INTO items").count(), size);
                assert_eq!(sql.matches("VALUES (").count(), size);
                assert_eq!(sql.matches('?').count(), 12 * size);
            }
            // Careful, one row per call.
            assert!(in_calls(&items, 1).all(|call| call.len() == 1));
            assert_eq!(in_calls(&items, 1).count(), n);
        }
    }

    /// A migrated database in a folder of its own, removed when the folder is dropped.
    async fn migrated() -> Result<(tempfile::TempDir, SqliteDb), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("mirror.db").display());
        let db = SqliteDb::connect(&url).await?;
        db.migrate().await?;
        Ok((dir, db))
    }

    /// Classifying a page reads the hashes from the index alone: reading them from the rows
    /// would read each item's content too.
    #[tokio::test]
    async fn a_page_is_classified_from_the_hash_index_without_reading_the_rows()
    -> Result<(), Box<dyn std::error::Error>> {
        let (_dir, db) = migrated().await?;
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {CLASSIFY}"
        )))
        .bind("[]")
        .fetch_all(db.pool())
        .await?;
        let plan: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
        assert!(
            plan.iter()
                .any(|step| step.contains("USING COVERING INDEX items_hash")),
            "{plan:?}"
        );
        Ok(())
    }

    /// A page is classified on the connection that commits when that one is free, and on the
    /// pool while it is taken (by a commit). A temporary table lives on its connection alone:
    /// one named `items` on the writer, with another hash, shows which connection classified.
    #[tokio::test]
    async fn a_page_is_classified_on_the_writer_when_it_is_free_and_on_the_pool_when_not()
    -> Result<(), Box<dyn std::error::Error>> {
        let (_dir, db) = migrated().await?;
        let mut reader = crate::stac::reader::PageReader::new(Some("c"));
        reader.add_feature(bytes::Bytes::from_static(
            br#"{"type":"Feature","stac_version":"1.0.0","id":"a","collection":"c","geometry":null,"properties":{"datetime":"2024-01-01T00:00:00Z"},"links":[],"assets":{}}"#,
        ));
        let items = reader.take_part().items;
        let [item] = items.as_slice() else {
            return Err(format!("one item expected, read {}", items.len()).into());
        };
        sqlx::query(
            "INSERT INTO items (collection, id, content, content_hash, first_seen_at, \
             last_seen_at) VALUES ('c', 'a', '{}', $1, 'now', 'now')",
        )
        .bind(&item.hash)
        .execute(db.pool())
        .await?;
        let mut writer = db.writer.acquire().await?;
        for statement in [
            "CREATE TEMP TABLE items AS SELECT * FROM main.items",
            "UPDATE temp.items SET content_hash = 'another'",
            "CREATE INDEX temp.items_hash ON items (collection, id, content_hash, deleted_at)",
        ] {
            sqlx::query(statement).execute(&mut *writer).await?;
        }
        // Taken: the pool's connections see the stored hash.
        assert_eq!(db.classify(&items).await?, [Known::Unchanged]);
        // Back in its pool now, not when a task spawned by its drop runs.
        writer.return_to_pool().await;
        drop(writer);
        // Free: the writer sees its own table's.
        assert_eq!(db.classify(&items).await?, [Known::Changed]);
        Ok(())
    }
}
