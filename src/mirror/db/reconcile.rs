//! Reconcile: the items a sweep did not see (`sync_seen`) tombstoned, and their deletions
//! numbered into the change feed in the same transaction.

use super::*;

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

/// An item a reconcile sweep saw.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub collection: &'a str,
    pub id: &'a str,
    /// Its `properties.updated`, if the page gave it.
    pub updated: Option<&'a str>,
}

impl Database {
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
                    sqlx::query(pgstac::DELETE_TOMBSTONED)
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
}
