//! The bookkeeping statements, written once for both backends: SQLite accepts Postgres's `$N`
//! placeholders, and `CURRENT_TIMESTAMP` is standard SQL on both. (Page writes differ for real:
//! SQLite upserts row by row in one local transaction, Postgres from arrays in one round trip.)

use super::{Counts, PageCommit, Written, count, resume_json};
use crate::config::SnapshotWindow;
use crate::stac::reader::Rejected;
use sqlx::{Database, Encode, Executor, IntoArguments, Type};

/// Starts a run's record.
pub async fn start_run<'c, DB, E>(
    executor: E,
    run_id: &str,
    job: &str,
    alone: bool,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB> + Copy,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    if alone {
        // Runs of this job still marked running died without recording their end: this run
        // holds the job's lock alone, so none of them is alive.
        sqlx::query(
            "UPDATE sync_runs SET status = 'abandoned', error = 'the run''s end was never \
             recorded: the process was killed, the machine stopped, or the database refused \
             the record (the run''s log and its manifest _runs/' || run_id || '.json say \
             which)' \
             WHERE job = $1 AND status = 'running'",
        )
        .bind(job)
        .execute(executor)
        .await?;
    }
    sqlx::query(
        "INSERT INTO sync_runs (run_id, job, started_at, status) \
         VALUES ($1, $2, CURRENT_TIMESTAMP, 'running')",
    )
    .bind(run_id)
    .bind(job)
    .execute(executor)
    .await
    .map(|_| ())
}

/// Ends a run's record with its counts.
pub async fn finish_run<'c, DB, E>(
    executor: E,
    run_id: &str,
    status: &str,
    counts: &Counts,
    error: Option<&str>,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a str>: Encode<'a, DB> + Type<DB>,
    i64: for<'a> Encode<'a, DB> + Type<DB>,
{
    sqlx::query(
        "UPDATE sync_runs SET finished_at = CURRENT_TIMESTAMP, status = $1, pages = $2, \
         items_new = $3, items_changed = $4, items_unchanged = $5, items_deleted = $6, \
         items_quarantined = $7, items_duplicate = $8, retries = $9, token_renewals = $10, \
         error = $11, items_missing = $13, partitions_incomplete = $14, partitions_split = $15 \
         WHERE run_id = $12",
    )
    .bind(status)
    .bind(count(counts.pages))
    .bind(count(counts.new))
    .bind(count(counts.changed))
    .bind(count(counts.unchanged))
    .bind(count(counts.deleted))
    .bind(count(counts.quarantined))
    .bind(count(counts.duplicate))
    .bind(count(counts.retries))
    .bind(count(counts.token_renewals))
    .bind(error)
    .bind(run_id)
    .bind(count(counts.missing))
    .bind(count(counts.incomplete))
    .bind(count(counts.splits))
    .execute(executor)
    .await
    .map(|_| ())
}

/// Every stored item as `(collection, id, content)`, ordered.
pub async fn all_items<'c, DB, E>(executor: E) -> Result<Vec<(String, String, String)>, sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'r> (String, String, String): sqlx::FromRow<'r, DB::Row>,
{
    sqlx::query_as(
        "SELECT collection, id, CAST(content AS TEXT) FROM items ORDER BY collection, id",
    )
    .fetch_all(executor)
    .await
}

/// How a backend records a page's changes: the insert from a JSON array of `[collection, id,
/// change, hash]` (`$3`), with `$1` run and `$2` job, in the array's order.
pub struct ChangesSql {
    pub insert: &'static str,
    /// `collection, id` of each element of a JSON array (`$1`) whose elements start with them.
    pub keys: &'static str,
    /// What makes a comparison of characters bytewise (Postgres's default collation may not).
    pub collate: &'static str,
}

/// The snapshot window of a stored row `i` as SQL text: the first characters of its
/// `datetime` (or `start_datetime`) when they are a date (`2024`, `2024-05`), else `undated`.
/// Only digits and `-` pass, so a window is always a safe file name.
pub fn window_expr(window: SnapshotWindow, collate: &str) -> String {
    let date = "COALESCE(i.datetime, i.start_datetime)";
    let checks: Vec<String> = "0000-00"
        .chars()
        .take(window.prefix_len())
        .enumerate()
        .map(|(at, c)| {
            let char = format!("substr({date}, {}, 1){collate}", at + 1);
            match c {
                '-' => format!("{char} = '-'"),
                _ => format!("{char} BETWEEN '0' AND '9'"),
            }
        })
        .collect();
    format!(
        "CASE WHEN {} THEN substr({date}, 1, {}) ELSE 'undated' END",
        checks.join(" AND "),
        window.prefix_len()
    )
}

/// The statement that marks due the snapshot windows of the rows `keys_sql` selects (`collection,
/// id`), see [`mark_due`].
pub fn due_sql(window: SnapshotWindow, collate: &str, keys_sql: &str) -> String {
    format!(
        "INSERT INTO snapshot_due (collection, win) \
         SELECT DISTINCT i.collection, {} FROM ({keys_sql}) k \
         JOIN items i ON i.collection = k.collection AND i.id = k.id WHERE true ORDER BY 1, 2 \
         ON CONFLICT (collection, win) DO UPDATE SET marks = snapshot_due.marks + 1",
        window_expr(window, collate)
    )
}

/// Marks due the snapshot windows of the stored rows named by `keys` (`$1` of `keys_sql`, a
/// query of `collection, id`), in the caller's transaction: a window already due counts one
/// more mark (see the `snapshot_due` table).
pub async fn mark_due<DB>(
    conn: &mut DB::Connection,
    window: SnapshotWindow,
    sql: &ChangesSql,
    keys_sql: &str,
    keys: &str,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    // Built from constants only.
    sqlx::query(sqlx::AssertSqlSafe(due_sql(window, sql.collate, keys_sql)))
        .bind(keys)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The change feed's rows of a page: the items it wrote but those the database refused, as the
/// JSON array [`ChangesSql::insert`] reads; `None` if there are none.
fn change_rows(page: &PageCommit<'_>, refused: &[Rejected], written: &Written) -> Option<String> {
    let rows: Vec<serde_json::Value> = page
        .items
        .iter()
        .filter_map(|item| {
            let new = *written.get(&(item.collection.clone(), item.id.clone()))?;
            let refused = refused.iter().any(|r| {
                r.id.as_deref() == Some(&item.id)
                    && r.collection.as_deref() == Some(&item.collection)
            });
            let change = if new { "new" } else { "changed" };
            (!refused).then(|| serde_json::json!([item.collection, item.id, change, item.hash]))
        })
        .collect();
    (!rows.is_empty()).then(|| serde_json::Value::Array(rows).to_string())
}

/// Records a page's changes in the feed (see [`ChangesSql`]), and marks their snapshot windows
/// due when the job writes snapshots.
async fn record_changes<DB>(
    conn: &mut DB::Connection,
    page: &PageCommit<'_>,
    refused: &[Rejected],
    written: &Written,
    changes: &ChangesSql,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    String: for<'a> Encode<'a, DB> + Type<DB>,
{
    let Some(rows) = change_rows(page, refused, written) else {
        return Ok(());
    };
    if let Some(window) = page.snapshots {
        mark_due::<DB>(conn, window, changes, changes.keys, &rows).await?;
    }
    sqlx::query(changes.insert)
        .bind(page.run_id)
        .bind(page.job)
        .bind(rows)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The end of a page's transaction: its quarantined features (`page.rejected` and the items the
/// database refused), its changes (see [`ChangesSql`]) and the resume point after it.
pub async fn finish_page<DB>(
    conn: &mut DB::Connection,
    page: &PageCommit<'_>,
    refused: &[Rejected],
    written: &Written,
    changes: &ChangesSql,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a str>: Encode<'a, DB> + Type<DB>,
    String: for<'a> Encode<'a, DB> + Type<DB>,
    bool: for<'a> Encode<'a, DB> + Type<DB>,
    i64: for<'a> Encode<'a, DB> + Type<DB>,
    Option<i64>: for<'a> Encode<'a, DB> + Type<DB>,
{
    for rejected in page.rejected.iter().chain(refused) {
        let collection = rejected.collection.as_deref().map(quarantine_key);
        let id = rejected.id.as_deref().map(quarantine_key);
        sqlx::query(
            "INSERT INTO quarantine (run_id, job, collection, item_id, reason, page_url, \
             content, quarantined_at) VALUES ($1, $2, $3, $4, $5, $6, $7, CURRENT_TIMESTAMP)",
        )
        .bind(page.run_id)
        .bind(page.job)
        .bind(collection.as_deref())
        .bind(id.as_deref())
        .bind(rejected.reason.as_str())
        .bind(page.page_url)
        // Text columns cannot hold NUL on Postgres; the reason already says it was there.
        .bind(String::from_utf8_lossy(&rejected.content).replace('\0', "\u{FFFD}"))
        .execute(&mut *conn)
        .await?;
    }
    for seen in &page.seen {
        sqlx::query(
            "INSERT INTO sync_seen (job, collection, id, updated) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(page.job)
        .bind(seen.collection)
        .bind(seen.id)
        .bind(seen.updated)
        .execute(&mut *conn)
        .await?;
    }
    record_changes::<DB>(conn, page, refused, written, changes).await?;
    let resume = resume_json(page.resume).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    // A partition split while its first page was committing stays split: its halves page it.
    sqlx::query(
        "INSERT INTO sync_state (job, partition, query_hash, resume, done, pages_done, received, \
         matched, updated_at) \
         VALUES ($1, $2, '', $3, $4, CASE WHEN $5 THEN 1 ELSE 0 END, $6, $7, CURRENT_TIMESTAMP) \
         ON CONFLICT (job, partition) DO UPDATE SET \
         resume = excluded.resume, done = excluded.done, \
         pages_done = sync_state.pages_done + excluded.pages_done, \
         received = sync_state.received + excluded.received, \
         matched = COALESCE(sync_state.matched, excluded.matched), \
         updated_at = excluded.updated_at WHERE NOT sync_state.split",
    )
    .bind(page.job)
    .bind(page.partition)
    .bind(resume.as_deref())
    .bind(page.resume.is_none())
    .bind(page.ends_page)
    .bind(count(page.features))
    .bind(page.matched.map(count))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The most bytes of an id or collection the quarantine keeps (its index on them is a B-tree on
/// Postgres, whose entries are limited); the feature's content keeps the whole of it.
const QUARANTINE_KEY_BYTES: usize = 512;

/// An id or collection as the quarantine keeps it, so that the quarantine takes any feature:
/// without NUL (which Postgres text cannot hold) and cut to [`QUARANTINE_KEY_BYTES`], marked
/// with `…` where cut.
fn quarantine_key(value: &str) -> String {
    let mut value = value.replace('\0', "\u{FFFD}");
    if value.len() > QUARANTINE_KEY_BYTES {
        value.truncate(value.floor_char_boundary(QUARANTINE_KEY_BYTES));
        value.push('…');
    }
    value
}
