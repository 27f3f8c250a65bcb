//! What the snapshot writer reads: the windows due (see the `snapshot_due` table), and the
//! live items of a window, streamed in order.

use super::{Database, shared};
use crate::config::SnapshotWindow;
use crate::error::Error;
use futures_util::stream::{BoxStream, StreamExt};

/// A snapshot window due to be rewritten, as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Due {
    /// The collection.
    pub collection: String,
    /// The window: `2024`, `2024-05` or `undated`.
    #[sqlx(rename = "win")]
    pub window: String,
    /// How many commits marked it; it is cleared only if that is still the count.
    pub marks: i64,
}

/// The window `2024` (or `2024-05`) as the datetimes it holds: `[start, end)`, compared as
/// text; `None` for `undated` or anything else that is not a window's name.
pub fn window_range(window: &str) -> Option<(String, String)> {
    let number = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse::<u32>().ok())?
    };
    match window.split_once('-') {
        None if window.len() == 4 => {
            let year = number(window)?;
            let end = if year == 9999 {
                "A".into()
            } else {
                format!("{:04}", year + 1)
            };
            Some((window.to_string(), end))
        }
        Some((year, month)) if year.len() == 4 && month.len() == 2 => {
            let (year, month) = (number(year)?, number(month)?);
            let end = if month >= 12 {
                if year == 9999 {
                    "A".into()
                } else {
                    format!("{:04}-01", year + 1)
                }
            } else {
                format!("{year:04}-{:02}", month + 1)
            };
            Some((window.to_string(), end))
        }
        _ => None,
    }
}

impl Database {
    fn collate(&self) -> &'static str {
        match self {
            Database::Postgres(_) => " COLLATE \"C\"",
            Database::Sqlite(_) => "",
        }
    }

    /// The windows due in `collections`.
    pub async fn due_windows(&self, collections: &[String]) -> Result<Vec<Due>, Error> {
        let mut due = Vec::new();
        for collection in collections {
            let rows: Vec<Due> = on_pool!(self, pool => sqlx::query_as(
                "SELECT collection, win, marks FROM snapshot_due WHERE collection = $1 ORDER BY win",
            )
            .bind(collection)
            .fetch_all(pool)
            .await)
            .map_err(self.fail("read the snapshot windows due"))?;
            due.extend(rows);
        }
        Ok(due)
    }

    /// Clears a window written, unless a commit marked it again meanwhile; whether it did.
    pub async fn clear_due(&self, due: &Due) -> Result<bool, Error> {
        on_pool!(self, pool => sqlx::query(
            "DELETE FROM snapshot_due WHERE collection = $1 AND win = $2 AND marks = $3",
        )
        .bind(&due.collection)
        .bind(&due.window)
        .bind(due.marks)
        .execute(pool)
        .await
        .map(|done| done.rows_affected() > 0))
        .map_err(self.fail("clear a snapshot window written"))
    }

    /// The windows that hold live items of `collection` (for `export`).
    pub async fn windows(
        &self,
        collection: &str,
        window: SnapshotWindow,
    ) -> Result<Vec<String>, Error> {
        let sql = format!(
            "SELECT DISTINCT {} AS win FROM items i WHERE i.collection = $1 \
             AND i.deleted_at IS NULL ORDER BY win",
            shared::window_expr(window, self.collate())
        );
        // Built from constants only.
        on_pool!(self, pool => sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(collection)
            .fetch_all(pool)
            .await)
        .map_err(self.fail("list a collection's snapshot windows"))
    }

    /// The live items of a window, as JSON text, in pages of at most `page` (read one at a
    /// time, by key: never more than a page in memory), in the order of the file: by
    /// `datetime` then id, then the items without one by `start_datetime` then id.
    pub fn window_pages<'a>(
        &'a self,
        collection: &'a str,
        window: &'a str,
        size: SnapshotWindow,
        page: usize,
    ) -> BoxStream<'a, Result<Vec<String>, Error>> {
        // Each part of the window: its sort key, its filter, the bounds of its range.
        type Part = (String, String, Option<(String, String)>);
        let parts: Vec<Part> = match window_range(window) {
            Some((start, end)) => vec![
                (
                    "i.datetime".into(),
                    "i.datetime >= $4 AND i.datetime < $5".into(),
                    Some((start.clone(), end.clone())),
                ),
                (
                    "i.start_datetime".into(),
                    "i.datetime IS NULL AND i.start_datetime >= $4 AND i.start_datetime < $5"
                        .into(),
                    Some((start, end)),
                ),
            ],
            None => vec![(
                "''".into(),
                format!("{} = 'undated'", shared::window_expr(size, self.collate())),
                None,
            )],
        };
        let pages = futures_util::stream::iter(parts).flat_map(move |(key, filter, range)| {
            let sql = format!(
                "SELECT {key} AS k, i.id, CAST(i.content AS TEXT) FROM items i \
                 WHERE i.collection = $1 AND i.deleted_at IS NULL AND {filter} \
                 AND ({key} > $2 OR ({key} = $2 AND i.id > $3)) ORDER BY {key}, i.id LIMIT {page}"
            );
            let first = range
                .as_ref()
                .map_or_else(String::new, |(start, _)| start.clone());
            futures_util::stream::try_unfold(Some((first, String::new())), move |cursor| {
                let (sql, range) = (sql.clone(), range.clone());
                async move {
                    let Some((key, id)) = cursor else {
                        return Ok(None);
                    };
                    let rows: Vec<(String, String, String)> = on_pool!(self, pool => {
                        // Built from constants only.
                        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                            .bind(collection)
                            .bind(key)
                            .bind(id);
                        if let Some((start, end)) = range {
                            query = query.bind(start).bind(end);
                        }
                        query.fetch_all(pool).await
                    })
                    .map_err(self.fail("read a snapshot window's items"))?;
                    if rows.is_empty() {
                        return Ok(None);
                    }
                    let next = (rows.len() == page).then(|| {
                        let (key, id, _) = &rows[rows.len() - 1];
                        (key.clone(), id.clone())
                    });
                    Ok(Some((rows.into_iter().map(|(_, _, c)| c).collect(), next)))
                }
            })
        });
        pages.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::window_range;

    #[test]
    fn a_window_is_the_datetimes_that_start_with_its_name() {
        let range = |w| window_range(w).map(|(a, b)| format!("{a}..{b}"));
        assert_eq!(range("2024").as_deref(), Some("2024..2025"));
        assert_eq!(range("2024-05").as_deref(), Some("2024-05..2024-06"));
        assert_eq!(range("2024-12").as_deref(), Some("2024-12..2025-01"));
        assert_eq!(range("9999").as_deref(), Some("9999..A"));
        for junk in ["undated", "20x4", "2024-5", "2024/05", "../x", ""] {
            assert_eq!(range(junk), None, "{junk}");
        }
    }
}
