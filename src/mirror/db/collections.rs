//! Collection documents (`collections`) and the items per collection `status` shows.

use super::*;

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

/// The hash a collection's row keeps: of its document as received, and of what stac-sync adds
/// to the copy it writes (`variant`, empty when nothing).
fn collection_hash(content: &str, variant: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(content.as_bytes());
    hasher.update(variant.as_bytes());
    hasher.finalize().to_hex().to_string()
}

impl Database {
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

    /// Records a collection fetched in this run: its document if `changed` (in pgstac too),
    /// else only when.
    pub async fn store_collection(
        &self,
        id: &str,
        content: &str,
        variant: &str,
        changed: bool,
    ) -> Result<(), Error> {
        if changed && let Some(db) = self.pgstac() {
            // Before its items, which go into the partitions it makes.
            pgstac::upsert_collection(db.pool(), db.shown(), content).await?;
        }
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
}
