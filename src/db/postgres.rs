//! The Postgres sink.
//!
//! A page is written in a few round trips, not a statement per item: one query classifies the
//! page's items (`UNNEST` of their keys), one multi-row upsert from arrays writes the new and
//! changed ones (the page reader already made `(collection, id)` unique, which Postgres
//! requires of a multi-row upsert). If Postgres refuses the batch, each item is retried alone
//! under a savepoint and the ones it still refuses are quarantined; the rest of the page is
//! stored. The single-runner lock is a session advisory lock on a dedicated connection.

use super::{JobLock, Known, PageCommit, shared};
use crate::config::redact_url;
use crate::error::Error;
use crate::page::{Item, Rejected};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Acquire, ConnectOptions, Connection};
use std::str::FromStr;
use std::time::Duration;

/// The schema migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The Postgres database.
#[derive(Debug, Clone)]
pub struct PostgresDb {
    pool: PgPool,
    options: Box<PgConnectOptions>,
    shown: String,
}

/// A held `pg_advisory_lock`, released when its connection closes (or the process dies).
#[derive(Debug)]
pub struct AdvisoryLock {
    conn: PgConnection,
    key: i64,
    job: String,
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
}

const UPSERT: &str = "INSERT INTO items (collection, id, content, content_hash, datetime, \
    start_datetime, end_datetime, updated, bbox_xmin, bbox_ymin, bbox_xmax, bbox_ymax, first_seen_at, last_seen_at) \
    SELECT c, i, ct::jsonb, h, d, sd, ed, u, x0, y0, x1, y1, now(), now() \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::text[], $9::float8[], $10::float8[], $11::float8[], $12::float8[]) \
    AS t(c, i, ct, h, d, sd, ed, u, x0, y0, x1, y1) \
    ON CONFLICT (collection, id) DO UPDATE SET content = excluded.content, \
    content_hash = excluded.content_hash, datetime = excluded.datetime, \
    start_datetime = excluded.start_datetime, end_datetime = excluded.end_datetime, \
    updated = excluded.updated, bbox_xmin = excluded.bbox_xmin, bbox_ymin = excluded.bbox_ymin, \
    bbox_xmax = excluded.bbox_xmax, bbox_ymax = excluded.bbox_ymax, last_seen_at = excluded.last_seen_at, \
    deleted_at = NULL \
    WHERE items.content_hash <> excluded.content_hash OR items.deleted_at IS NOT NULL";

/// Why Postgres would refuse an item: `jsonb` and `text` cannot hold the NUL character, which
/// JSON can carry as the escape `\u0000`.
pub fn refuses(item: &Item) -> Option<String> {
    let content = &item.content[..];
    let escaped_nul = content.windows(6).enumerate().any(|(at, window)| {
        window == br"\u0000"
            && content[..=at]
                .iter()
                .rev()
                .take_while(|&&b| b == b'\\')
                .count()
                % 2
                == 1
    });
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

impl PostgresDb {
    /// Connects to the database at `url`.
    pub async fn connect(url: &str) -> Result<PostgresDb, Error> {
        let shown = redact_url(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("database_url {shown}: {e}")))?
            .application_name("stac-sync")
            .log_statements(tracing::log::LevelFilter::Debug);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(|e| Error::Sink(format!("cannot connect to database {shown}: {e}")))?;
        Ok(PostgresDb {
            pool,
            options: Box::new(options),
            shown,
        })
    }

    /// The pool, for tests and `status`.
    pub fn pool(&self) -> &PgPool {
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
            .map_err(|e| Error::Sink(format!("database {}: migrations failed: {e}", self.shown)))
    }

    /// Takes the job's advisory lock on a connection of its own, held for the whole run.
    pub async fn lock(&self, job: &str) -> Result<JobLock, Error> {
        let mut conn = PgConnection::connect_with(&self.options)
            .await
            .map_err(self.fail("connect for the job lock"))?;
        let digest = blake3::hash(format!("stac-sync job {job}").as_bytes());
        let mut key_bytes = [0u8; 8];
        key_bytes.copy_from_slice(&digest.as_bytes()[..8]);
        let key = i64::from_be_bytes(key_bytes);
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(self.fail("take the job lock"))?;
        if !got {
            return Err(Error::Locked {
                job: job.to_string(),
                detail: format!(
                    "another stac-sync run holds its advisory lock in {}; wait for it to finish",
                    self.shown
                ),
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
    pub async fn commit_page(&self, page: PageCommit<'_>) -> Result<Vec<Rejected>, Error> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.fail("begin transaction"))?;
        let mut refused = Vec::new();
        let batch = {
            let mut savepoint = tx.begin().await.map_err(self.fail("begin a savepoint"))?;
            match upsert(&mut savepoint, &page.items).await {
                Ok(()) => savepoint
                    .commit()
                    .await
                    .map_err(self.fail("release a savepoint")),
                Err(e) => Err(self.fail("store a page of items")(e)),
            }
        };
        if let Err(batch_error) = batch {
            tracing::warn!(error = %batch_error, "Postgres refused the page as a batch; storing its items one by one");
            for item in &page.items {
                let mut savepoint = tx.begin().await.map_err(self.fail("begin a savepoint"))?;
                match upsert(&mut savepoint, std::slice::from_ref(item)).await {
                    Ok(()) => savepoint
                        .commit()
                        .await
                        .map_err(self.fail("release a savepoint"))?,
                    Err(sqlx::Error::Database(e)) => {
                        drop(savepoint);
                        refused.push(Rejected {
                            content: item.content.clone(),
                            reason: format!("Postgres refused the item: {}", e.message()),
                            collection: Some(item.collection.clone()),
                            id: Some(item.id.clone()),
                        });
                    }
                    Err(e) => {
                        return Err(self
                            .fail(&format!("store item {}/{}", item.collection, item.id))(
                            e
                        ));
                    }
                }
            }
        }
        shared::finish_page::<sqlx::Postgres>(&mut tx, &page, &refused)
            .await
            .map_err(self.fail("quarantine features and store the resume point"))?;
        tx.commit().await.map_err(self.fail("commit a page"))?;
        Ok(refused)
    }

    /// The URL, without its password, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// One multi-row upsert of `items` from arrays.
async fn upsert(conn: &mut PgConnection, items: &[&Item]) -> Result<(), sqlx::Error> {
    if items.is_empty() {
        return Ok(());
    }
    let text = |f: fn(&Item) -> Option<&String>| -> Vec<Option<&str>> {
        items.iter().map(|i| f(i).map(String::as_str)).collect()
    };
    let bbox =
        |k: usize| -> Vec<Option<f64>> { items.iter().map(|i| i.bbox.map(|b| b[k])).collect() };
    let mut contents = Vec::with_capacity(items.len());
    for item in items {
        contents.push(
            std::str::from_utf8(&item.content).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        );
    }
    sqlx::query(UPSERT)
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
        .execute(conn)
        .await?;
    Ok(())
}
