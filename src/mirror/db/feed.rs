//! The change feed (`changes`) and the webhook's cursor (`webhook_state`).

use super::*;

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

impl Database {
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
}
