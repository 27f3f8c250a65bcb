//! The Postgres sink.
//!
//! A page is written in a few round trips, not a statement per item: one query classifies the
//! page's items (`UNNEST` of their keys), one multi-row upsert from arrays writes the new and
//! changed ones (the page reader already made `(collection, id)` unique, which Postgres
//! requires of a multi-row upsert). If Postgres refuses the batch, each item is retried alone
//! under a savepoint and the ones it still refuses are quarantined; the rest of the page is
//! stored. The single-runner lock is a session advisory lock on a dedicated connection.
//!
//! Workers (`run --worker`) share a job instead: each holds the job's advisory lock in shared
//! mode (so a single run and a worker never both write), one at a time plans under a second,
//! exclusive lock, and they claim partitions with leases (see [`PostgresDb::claim`]).

use super::{
    Committed, JobLock, Known, Lease, PageCommit, PassKind, Planned, PlannedRow, Written, pgstac,
    shared,
};
use crate::config::redact_url;
use crate::error::Error;
use crate::stac::reader::{Item, Rejected};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Acquire, ConnectOptions, Connection};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Attempts at a page's transaction that deadlocks or fails to serialize (pgstac's partition
/// management takes locks that another writer of the database may hold in another order).
const COMMIT_ATTEMPTS: u32 = 5;

/// Whether a transaction failed only because of other transactions: a deadlock, a
/// serialization failure, or pgstac's datetime constraint of a partition (`_items_N_dt`),
/// which pgstac rewrites as writers add items: another writer's commit can narrow it between
/// this transaction's widening of it and its insert (seen with three workers into one fresh
/// pgstac database; the items were quarantined). Its work is undone; done again, it may
/// succeed.
fn must_retry(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    match db.code().as_deref() {
        Some("40P01" | "40001") => true,
        Some("23514") => db
            .constraint()
            .is_some_and(|c| c.starts_with("_items_") && c.ends_with("_dt")),
        _ => false,
    }
}

/// How an attempt at a page's transaction failed.
enum Failure {
    /// Because of other transactions: try it again.
    Retry(sqlx::Error),
    /// For good.
    Fail(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Fail(e)
    }
}

/// A page's changes, from the JSON array `$3`, numbered as they are inserted. The advisory lock
/// is taken first and held to the end of the page's transaction (this is its last statement
/// but the resume point's), so pages commit in the order of their numbers: a seq is never
/// given below one a consumer may already have read. Numbering each commit's changes after it
/// instead (an `UPDATE` of the rows without a seq) leaves a dead entry per change in the index
/// of the unnumbered rows until a vacuum, so each numbering scans every change since
/// (docs/benchmarks.md).
const CHANGES: shared::ChangesSql = shared::ChangesSql {
    insert: "WITH turn AS (SELECT pg_advisory_xact_lock(7263686167657300)) \
        INSERT INTO changes (seq, run_id, job, collection, id, change, content_hash, at) \
        SELECT nextval('changes_seq'), $1, $2, e->>0, e->>1, e->>2, e->>3, now() \
        FROM turn, (SELECT e, n FROM jsonb_array_elements(CAST($3 AS JSONB)) \
            WITH ORDINALITY AS t(e, n) ORDER BY n) o",
    keys: "SELECT e->>0 AS collection, e->>1 AS id FROM jsonb_array_elements(CAST($1 AS JSONB)) AS e",
    collate: " COLLATE \"C\"",
};

/// The schema of stac-sync's own tables in a pgstac database.
pub const SCHEMA: &str = "stac_sync";

/// The schema migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The Postgres database.
#[derive(Debug, Clone)]
pub struct PostgresDb {
    pool: PgPool,
    options: Box<PgConnectOptions>,
    shown: String,
    /// Items and collections also go to pgstac; stac-sync's tables are in schema `stac_sync`.
    pgstac: bool,
    /// Whether pgstac versions its collections' base items (0.10), read once.
    versioned: Arc<tokio::sync::OnceCell<bool>>,
}

/// A page's items as pgstac stores them, by key (empty unless the database is pgstac).
type PgstacRows<'a> = HashMap<(&'a str, &'a str), pgstac::Row>;

/// A held `pg_advisory_lock`, released when its connection closes (or the process dies).
#[derive(Debug)]
pub struct AdvisoryLock {
    conn: PgConnection,
    key: i64,
    job: String,
}

/// The advisory lock key of `what` (a job's run lock, or its planner lock).
fn lock_key(what: &str) -> i64 {
    let digest = blake3::hash(what.as_bytes());
    let mut key_bytes = [0u8; 8];
    key_bytes.copy_from_slice(&digest.as_bytes()[..8]);
    i64::from_be_bytes(key_bytes)
}

impl AdvisoryLock {
    /// Checks that this session still holds the lock.
    pub async fn check(&mut self) -> Result<(), Error> {
        let key = self.key as u64;
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND pid = pg_backend_pid() AND classid::bigint = $1 AND objid::bigint = $2)",
        )
        .bind((key >> 32) as i64)
        .bind((key & 0xffff_ffff) as i64)
        .fetch_one(&mut self.conn)
        .await
        .map_err(|e| {
            Error::Sink(format!(
                "lost the database session holding job {}'s lock: {e}",
                self.job
            ))
        })?;
        if held {
            Ok(())
        } else {
            Err(Error::Locked {
                job: self.job.clone(),
                detail: "this run no longer holds its advisory lock; stopping before writing"
                    .into(),
            })
        }
    }

    /// Releases every lock this session holds, and closes it.
    pub async fn release(mut self) -> Result<(), Error> {
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut self.conn)
            .await
            .map_err(|e| Error::Sink(format!("cannot release job {}'s lock: {e}", self.job)))?;
        let _ = self.conn.close().await;
        Ok(())
    }

    /// Waits for the job's planner lock: workers plan a pass, and end one, one at a time.
    pub async fn lock_planner(&mut self) -> Result<(), Error> {
        self.planner("SELECT pg_advisory_lock($1)", "take").await
    }

    /// Releases the job's planner lock.
    pub async fn unlock_planner(&mut self) -> Result<(), Error> {
        self.planner("SELECT pg_advisory_unlock($1)", "release")
            .await
    }

    /// Calls `sql` on the job's planner lock key.
    async fn planner(&mut self, sql: &'static str, what: &str) -> Result<(), Error> {
        sqlx::query(sql)
            .bind(lock_key(&format!("stac-sync plan {}", self.job)))
            .execute(&mut self.conn)
            .await
            .map_err(|e| {
                Error::Sink(format!(
                    "cannot {what} job {}'s planner lock: {e}",
                    self.job
                ))
            })
            .map(|_| ())
    }
}

/// Takes `lease`'s partition back for another lease period, if it is still this worker's: the
/// first statement of a page's transaction, whose row lock keeps other workers from claiming
/// the partition until the page commits.
const FENCE: &str = "UPDATE sync_state SET lease_until = clock_timestamp() + make_interval(secs => $4) \
    WHERE job = $1 AND partition = $2 AND lease_owner = $3";

/// Claims the first unfinished partition of a pass that no live lease holds.
const CLAIM: &str = "UPDATE sync_state s SET lease_owner = $3, \
    lease_until = clock_timestamp() + make_interval(secs => $4) \
    FROM (SELECT job, partition FROM sync_state WHERE job = $1 AND kind = $2 AND NOT done \
          AND (lease_until IS NULL OR lease_until < clock_timestamp()) \
          ORDER BY partition LIMIT 1 FOR UPDATE SKIP LOCKED) c \
    WHERE s.job = c.job AND s.partition = c.partition \
    RETURNING s.partition, s.collection, s.request, s.resume, s.done";

/// The multi-row upsert of items, `$content` the content's expression (from text `ct`).
macro_rules! upsert_sql {
    ($content:literal) => {
        concat!("INSERT INTO items (collection, id, content, content_hash, datetime, \
    start_datetime, end_datetime, updated, bbox_xmin, bbox_ymin, bbox_xmax, bbox_ymax, first_seen_at, last_seen_at) \
    SELECT c, i, ", $content, ", h, d, sd, ed, u, x0, y0, x1, y1, now(), now() \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::text[], $9::float8[], $10::float8[], $11::float8[], $12::float8[]) \
    AS t(c, i, ct, h, d, sd, ed, u, x0, y0, x1, y1) \
    ON CONFLICT (collection, id) DO UPDATE SET content = excluded.content, \
    content_hash = excluded.content_hash, datetime = excluded.datetime, \
    start_datetime = excluded.start_datetime, end_datetime = excluded.end_datetime, \
    updated = excluded.updated, bbox_xmin = excluded.bbox_xmin, bbox_ymin = excluded.bbox_ymin, \
    bbox_xmax = excluded.bbox_xmax, bbox_ymax = excluded.bbox_ymax, last_seen_at = excluded.last_seen_at, \
    deleted_at = NULL \
    WHERE items.content_hash <> excluded.content_hash OR items.deleted_at IS NOT NULL \
    RETURNING collection, id, xmax = 0")
    };
}

/// The upsert into a content column of `jsonb` (stac-sync's own format: users query it).
const UPSERT_JSONB: &str = upsert_sql!("CAST(ct AS JSONB)");

/// The upsert into a content column of `text`: stac-sync's rows in a pgstac database, where
/// pgstac's own rows are the ones queried (migration 0009), stored without parsing them again.
const UPSERT_TEXT: &str = upsert_sql!("ct");

/// Why Postgres would refuse an item: `jsonb` and `text` cannot hold the NUL character, which
/// JSON can carry as the escape `\u0000`.
pub fn refuses(item: &Item) -> Option<String> {
    if !indexes(&item.collection, &item.id) {
        return Some(format!(
            "the item's id is {} bytes long: more than Postgres can index ({MAX_KEY_BYTES} bytes \
             for collection and id together)",
            item.id.len()
        ));
    }
    let content = &item.content[..];
    let escaped_nul = escapes_nul(content);
    let nul_in_field = [
        Some(&item.id),
        Some(&item.collection),
        item.datetime.as_ref(),
        item.updated.as_ref(),
    ]
    .into_iter()
    .flatten()
    .any(|s| s.contains('\0'));
    (escaped_nul || nul_in_field).then(|| {
        "the item contains the NUL character (\\u0000), which Postgres cannot store".to_string()
    })
}

/// The most bytes of collection and id a key takes. A B-tree entry of Postgres holds at most
/// 2,704 bytes (a third of a page); the rest of a key's columns and the tuple header need room.
pub const MAX_KEY_BYTES: usize = 2_000;

/// Whether a `(collection, id)` fits in the items' (and `sync_seen`'s) primary key.
pub fn indexes(collection: &str, id: &str) -> bool {
    collection.len() + id.len() <= MAX_KEY_BYTES
}

/// Whether JSON text holds the escape `\u0000` (a backslash-u-0000 preceded by an even number
/// of other backslashes; `\\u0000` is a backslash followed by the text `u0000`).
fn escapes_nul(content: &[u8]) -> bool {
    // memmem finds the rare candidates with SIMD: this runs over every byte of every item.
    memchr::memmem::find_iter(content, br"\u0000").any(|at| {
        content[..=at]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count()
            % 2
            == 1
    })
}

impl PostgresDb {
    /// Connects to the database at `url`; with `pgstac`, stac-sync's own tables are those of
    /// schema `stac_sync` (pgstac's are always named with their schema).
    pub async fn connect(url: &str, pgstac: bool) -> Result<PostgresDb, Error> {
        let shown = redact_url(url);
        let mut options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("database_url {shown}: {e}")))?
            .application_name("stac-sync")
            .log_statements(tracing::log::LevelFilter::Debug);
        if pgstac {
            options = options.options([("search_path", format!("{SCHEMA}, public"))]);
        }
        // One connection first, for its own error: the pool retries a refused connection until
        // its timeout and then says only that it timed out.
        PgConnection::connect_with(&options)
            .await
            .map_err(|source| Error::Connect {
                database: shown.clone(),
                source,
            })?
            .close()
            .await
            .map_err(|source| Error::Connect {
                database: shown.clone(),
                source,
            })?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(|source| Error::Connect {
                database: shown.clone(),
                source,
            })?;
        Ok(PostgresDb {
            pool,
            options: Box::new(options),
            shown,
            pgstac,
            versioned: Arc::default(),
        })
    }

    /// The pool, for tests and `status`.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn fail(&self, what: &str) -> impl Fn(sqlx::Error) -> Error + '_ {
        super::sink_error(&self.shown, what)
    }

    /// Applies the schema migrations (into schema `stac_sync` beside pgstac's).
    pub async fn migrate(&self) -> Result<(), Error> {
        if self.pgstac {
            pgstac::version(&self.pool, &self.shown).await?;
            // IF NOT EXISTS is not safe against a concurrent CREATE (workers starting at once):
            // the loser's unique violation means the schema is there.
            match sqlx::query(concat!("CREATE SCHEMA IF NOT EXISTS ", "stac_sync"))
                .execute(&self.pool)
                .await
            {
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("23505" | "42P06")) => {}
                created => {
                    created.map_err(self.fail("create schema stac_sync"))?;
                }
            }
        }
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| Error::Migrate {
                database: self.shown.clone(),
                source,
            })
    }

    /// Takes the job's advisory lock on a connection of its own, held for the whole run:
    /// exclusively for a single run, shared by the workers of a job (`shared`).
    pub async fn lock(&self, job: &str, shared: bool) -> Result<JobLock, Error> {
        let mut conn = PgConnection::connect_with(&self.options)
            .await
            .map_err(self.fail("connect for the job lock"))?;
        let key = lock_key(&format!("stac-sync job {job}"));
        let take = if shared {
            "SELECT pg_try_advisory_lock_shared($1)"
        } else {
            "SELECT pg_try_advisory_lock($1)"
        };
        let got: bool = sqlx::query_scalar(take)
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(self.fail("take the job lock"))?;
        if !got {
            let detail = if shared {
                format!(
                    "a single (non-worker) stac-sync run holds its advisory lock in {}; \
                     workers start when it has finished",
                    self.shown
                )
            } else {
                format!(
                    "another stac-sync run (or its workers) holds its advisory lock in {}; \
                     wait for it to finish",
                    self.shown
                )
            };
            return Err(Error::Locked {
                job: job.to_string(),
                detail,
            });
        }
        Ok(JobLock::Postgres(Box::new(AdvisoryLock {
            conn,
            key,
            job: job.to_string(),
        })))
    }

    /// Classifies each item against what is stored, in one query.
    pub async fn classify(&self, items: &[Item]) -> Result<Vec<Known>, Error> {
        let collections: Vec<&str> = items.iter().map(|i| i.collection.as_str()).collect();
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        let rows: Vec<(i64, String, bool)> = sqlx::query_as(
            "SELECT t.n - 1, i.content_hash, i.deleted_at IS NOT NULL \
             FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS t(collection, id, n) \
             JOIN items i ON i.collection = t.collection AND i.id = t.id",
        )
        .bind(&collections)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        .map_err(self.fail("read item hashes"))?;
        Ok(super::known(items, rows))
    }

    /// Commits one page. Returns the items Postgres refused, which were quarantined.
    pub async fn commit_page(&self, page: PageCommit<'_>) -> Result<Committed, Error> {
        let mut attempt = 0u32;
        loop {
            match self.commit_once(&page).await {
                Ok(committed) => return Ok(committed),
                Err(Failure::Fail(e)) => return Err(e),
                Err(Failure::Retry(e)) if attempt < COMMIT_ATTEMPTS => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, partition = page.partition,
                        "the page's transaction conflicted with another writer (a deadlock, a \
                         serialization failure or pgstac's partition constraint); committing it \
                         again");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
                Err(Failure::Retry(e)) => {
                    return Err(self.fail("commit a page (deadlocked every time)")(e));
                }
            }
        }
    }

    /// One attempt at [`PostgresDb::commit_page`]; [`Failure::Retry`] when the transaction
    /// deadlocked or failed to serialize (nothing of it was kept).
    async fn commit_once(&self, page: &PageCommit<'_>) -> Result<Committed, Failure> {
        if self.pgstac && !page.items.is_empty() {
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(self.failure("connect to check pgstac's partitions"))?;
            pgstac::check_partitions(&mut conn, &page.items)
                .await
                .map_err(self.failure("make or widen pgstac's partitions"))?;
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.failure("begin transaction"))?;
        if let Some(lease) = &page.lease {
            let held = sqlx::query(FENCE)
                .bind(page.job)
                .bind(page.partition)
                .bind(lease.owner)
                .bind(lease.ttl.as_secs_f64())
                .execute(&mut *tx)
                .await
                .map_err(self.failure("check the partition's lease"))?
                .rows_affected();
            if held == 0 {
                return Err(Failure::Fail(Error::LeaseLost {
                    partition: page.partition.to_string(),
                }));
            }
        }
        if let Some(window) = page.snapshots {
            // The windows changed items leave: their datetime may move them.
            let keys: Vec<[&str; 2]> = page
                .items
                .iter()
                .map(|i| [i.collection.as_str(), i.id.as_str()])
                .collect();
            let keys = serde_json::to_string(&keys).map_err(|e| Error::Internal(e.to_string()))?;
            shared::mark_due::<sqlx::Postgres>(&mut tx, window, &CHANGES, CHANGES.keys, &keys)
                .await
                .map_err(self.failure("mark snapshot windows due"))?;
        }
        let (items, rows, mut refused) = self.pgstac_rows(&mut tx, &page.items).await?;
        let mut written = Written::new();
        let batch = {
            let mut savepoint = tx
                .begin()
                .await
                .map_err(self.failure("begin a savepoint"))?;
            match self.store(&mut savepoint, &items, &rows).await {
                Ok(rows) => {
                    written = rows;
                    savepoint
                        .commit()
                        .await
                        .map_err(self.fail("release a savepoint"))
                }
                Err(e) if must_retry(&e) => return Err(Failure::Retry(e)),
                Err(e) => Err(self.fail("store a page of items")(e)),
            }
        };
        if let Err(batch_error) = batch {
            tracing::warn!(error = %batch_error, "Postgres refused the page as a batch; storing its items one by one");
            let one_by_one;
            (written, one_by_one) = self.store_one_by_one(&mut tx, &items, &rows).await?;
            refused.extend(one_by_one);
        }
        shared::finish_page::<sqlx::Postgres>(&mut tx, page, &refused, &written, &CHANGES)
            .await
            .map_err(self.failure("quarantine features and store the resume point"))?;
        tx.commit().await.map_err(self.failure("commit a page"))?;
        Ok(Committed { refused, written })
    }

    /// Maps a failed statement of a page's transaction: to try again if other transactions
    /// caused it, else for good (saying `what` failed).
    fn failure<'a>(&'a self, what: &'a str) -> impl Fn(sqlx::Error) -> Failure + 'a {
        move |e| match must_retry(&e) {
            true => Failure::Retry(e),
            false => Failure::Fail(self.fail(what)(e)),
        }
    }

    /// With pgstac, the page's items as pgstac stores them, dehydrated against their
    /// collections' base items as this transaction reads them; the items to store, and those
    /// pgstac cannot (quarantined, and not stored here either).
    async fn pgstac_rows<'a>(
        &self,
        tx: &mut PgConnection,
        items: &[&'a Item],
    ) -> Result<(Vec<&'a Item>, PgstacRows<'a>, Vec<Rejected>), Failure> {
        if !self.pgstac || items.is_empty() {
            return Ok((items.to_vec(), HashMap::new(), Vec::new()));
        }
        let versioned = *self
            .versioned
            .get_or_try_init(|| pgstac::versioned(&mut *tx))
            .await
            .map_err(self.failure("read pgstac's functions"))?;
        let mut collections: Vec<&str> = items.iter().map(|i| i.collection.as_str()).collect();
        collections.sort_unstable();
        collections.dedup();
        let bases = pgstac::bases(tx, &collections, versioned)
            .await
            .map_err(self.failure("read the collections' base items from pgstac"))?;
        let (accepted, refused) = pgstac::rows(items, &bases);
        let items = accepted.iter().map(|(item, _)| *item).collect();
        let rows = accepted
            .into_iter()
            .map(|(item, row)| ((item.collection.as_str(), item.id.as_str()), row))
            .collect();
        Ok((items, rows, refused))
    }

    /// Stores items in the transaction `conn`: their rows, and with pgstac, the ones this
    /// commit wrote in pgstac too (`rows`), an item pgstac may hold already (changed, or stored
    /// alone) deleted there first.
    async fn store(
        &self,
        conn: &mut PgConnection,
        items: &[&Item],
        rows: &PgstacRows<'_>,
    ) -> Result<Written, sqlx::Error> {
        let written = upsert(conn, items, self.pgstac).await?;
        if !self.pgstac {
            return Ok(written);
        }
        // Only what this commit wrote: an item another commit stored identically meanwhile is
        // in pgstac already.
        let (mut copy, mut replace) = (Vec::new(), Vec::new());
        for item in items {
            let key = (item.collection.clone(), item.id.clone());
            let (Some(&new), Some(row)) = (
                written.get(&key),
                rows.get(&(item.collection.as_str(), item.id.as_str())),
            ) else {
                continue;
            };
            copy.push(row);
            if !new || items.len() == 1 {
                replace.push(row);
            }
        }
        pgstac::write(conn, &copy, &replace).await?;
        Ok(written)
    }

    /// Stores items one at a time, each under a savepoint: those the database refuses are
    /// quarantined, the others stored. What it wrote, and the refused ones.
    async fn store_one_by_one(
        &self,
        tx: &mut PgConnection,
        items: &[&Item],
        rows: &PgstacRows<'_>,
    ) -> Result<(Written, Vec<Rejected>), Failure> {
        let (mut written, mut refused) = (Written::new(), Vec::new());
        for item in items {
            let mut savepoint = Connection::begin(&mut *tx)
                .await
                .map_err(self.failure("begin a savepoint"))?;
            match self
                .store(&mut savepoint, std::slice::from_ref(item), rows)
                .await
            {
                Ok(rows) => {
                    written.extend(rows);
                    savepoint
                        .commit()
                        .await
                        .map_err(self.failure("release a savepoint"))?;
                }
                Err(e) if must_retry(&e) => return Err(Failure::Retry(e)),
                Err(sqlx::Error::Database(e)) => {
                    drop(savepoint);
                    refused.push(Rejected {
                        content: item.content.clone(),
                        reason: format!(
                            "{} refused the item: {}",
                            if self.pgstac { "pgstac" } else { "Postgres" },
                            e.message()
                        ),
                        collection: Some(item.collection.clone()),
                        id: Some(item.id.clone()),
                    });
                }
                Err(e) => {
                    return Err(Failure::Fail(self
                        .fail(&format!("store item {}/{}", item.collection, item.id))(
                        e
                    )));
                }
            }
        }
        Ok((written, refused))
    }

    /// Whether items and collections also go to pgstac.
    pub(super) fn is_pgstac(&self) -> bool {
        self.pgstac
    }

    /// Claims an unfinished partition of the job's `kind` pass for `lease`: one that no worker
    /// holds, or whose worker let its lease expire (it died, or lost the database). Skips rows
    /// other workers are claiming or committing right now, so claims never wait on each other.
    pub async fn claim(
        &self,
        job: &str,
        kind: PassKind,
        lease: &Lease<'_>,
    ) -> Result<Option<Planned>, Error> {
        let row: Option<PlannedRow> = sqlx::query_as(CLAIM)
            .bind(job)
            .bind(kind.as_str())
            .bind(lease.owner)
            .bind(lease.ttl.as_secs_f64())
            .fetch_optional(&self.pool)
            .await
            .map_err(self.fail("claim a partition"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let name = row.0.clone();
        match super::planned_row(job, row) {
            Some(planned) => Ok(Some(planned)),
            // Claimed but unusable: paging nothing would leave it leased forever.
            None => Err(Error::Sink(format!(
                "database {}: partition {name} of job {job} has no readable first request; \
                 the next run (worker or not) plans the pass again",
                self.shown
            ))),
        }
    }

    /// Extends every lease `lease.owner` holds on the job's unfinished partitions; returns how
    /// many it still holds.
    pub async fn renew(&self, job: &str, lease: &Lease<'_>) -> Result<u64, Error> {
        sqlx::query(
            "UPDATE sync_state SET lease_until = clock_timestamp() + make_interval(secs => $3) \
             WHERE job = $1 AND lease_owner = $2 AND NOT done",
        )
        .bind(job)
        .bind(lease.owner)
        .bind(lease.ttl.as_secs_f64())
        .execute(&self.pool)
        .await
        .map(|done| done.rows_affected())
        .map_err(self.fail("renew the partition leases"))
    }

    /// Gives up `owner`'s leases on unfinished partitions, so other workers take them over at
    /// once instead of after the lease expires.
    pub async fn release(&self, job: &str, owner: &str) -> Result<u64, Error> {
        sqlx::query(
            "UPDATE sync_state SET lease_owner = NULL, lease_until = NULL \
             WHERE job = $1 AND lease_owner = $2 AND NOT done",
        )
        .bind(job)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map(|done| done.rows_affected())
        .map_err(self.fail("release the partition leases"))
    }

    /// Unfinished partitions of the job's `kind` pass that `owner` does not hold.
    pub async fn unfinished_elsewhere(
        &self,
        job: &str,
        kind: PassKind,
        owner: &str,
    ) -> Result<i64, Error> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM sync_state WHERE job = $1 AND kind = $2 AND NOT done \
             AND lease_owner IS DISTINCT FROM $3",
        )
        .bind(job)
        .bind(kind.as_str())
        .bind(owner)
        .fetch_one(&self.pool)
        .await
        .map_err(self.fail("count unfinished partitions"))
    }

    /// The URL, without its password, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// Item bytes per upsert statement: sqlx encodes a statement's arguments into one buffer, so a
/// page of 10,000 items (150 MB) as one statement would be held a second time.
const UPSERT_BYTES: usize = 8 << 20;

/// Upserts `items` in statements of at most [`UPSERT_BYTES`] of content each (at least one item).
async fn upsert(
    conn: &mut PgConnection,
    items: &[&Item],
    text: bool,
) -> Result<Written, sqlx::Error> {
    let mut written = Written::new();
    let mut start = 0;
    while start < items.len() {
        let mut end = start + 1;
        let mut bytes = items[start].content.len();
        while end < items.len() && bytes + items[end].content.len() <= UPSERT_BYTES {
            bytes += items[end].content.len();
            end += 1;
        }
        written.extend(upsert_batch(conn, &items[start..end], text).await?);
        start = end;
    }
    Ok(written)
}

/// The items' JSON as text, to bind as an array.
fn contents<'a>(items: &[&'a Item]) -> Result<Vec<&'a str>, sqlx::Error> {
    items
        .iter()
        .map(|item| {
            simdutf8::compat::from_utf8(&item.content).map_err(|e| sqlx::Error::Decode(Box::new(e)))
        })
        .collect()
}

/// One multi-row upsert of `items` from arrays; the rows it wrote, and whether each was new.
async fn upsert_batch(
    conn: &mut PgConnection,
    items: &[&Item],
    text_content: bool,
) -> Result<Vec<((String, String), bool)>, sqlx::Error> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let text = |f: fn(&Item) -> Option<&String>| -> Vec<Option<&str>> {
        items.iter().map(|i| f(i).map(String::as_str)).collect()
    };
    let bbox =
        |k: usize| -> Vec<Option<f64>> { items.iter().map(|i| i.bbox.map(|b| b[k])).collect() };
    let contents = contents(items)?;
    let sql = if text_content {
        UPSERT_TEXT
    } else {
        UPSERT_JSONB
    };
    let rows: Vec<(String, String, bool)> = sqlx::query_as(sql)
        .bind(
            items
                .iter()
                .map(|i| i.collection.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>())
        .bind(contents)
        .bind(items.iter().map(|i| i.hash.as_str()).collect::<Vec<_>>())
        .bind(text(|i| i.datetime.as_ref()))
        .bind(text(|i| i.start_datetime.as_ref()))
        .bind(text(|i| i.end_datetime.as_ref()))
        .bind(text(|i| i.updated.as_ref()))
        .bind(bbox(0))
        .bind(bbox(1))
        .bind(bbox(2))
        .bind(bbox(3))
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(|(c, i, new)| ((c, i), new)).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_real_nul_escape_is_refused() {
        assert!(super::escapes_nul(br#"{"a":"x\u0000y"}"#));
        assert!(super::escapes_nul(br#"{"a":"\\\u0000"}"#));
        assert!(!super::escapes_nul(br#"{"a":"\\u0000"}"#));
        assert!(!super::escapes_nul(br#"{"a":"u0000"}"#));
    }
}
