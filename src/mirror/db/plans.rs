//! Passes and their plans (`sync_state`): a job's watermark and search fingerprint, its
//! partitions with their resume points, splits, and the completeness check of a pass.

use super::*;
use crate::plan::Part;

/// The kinds of pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// Backfill or incremental: fetch and store items.
    Sync,
    /// Sweep the ids of the job's range and tombstone what vanished.
    Reconcile,
}

impl PassKind {
    /// As stored in `sync_state.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            PassKind::Sync => "sync",
            PassKind::Reconcile => "reconcile",
        }
    }
}

/// A job's own row in `sync_state`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobState {
    /// Fingerprint of the job's search; a change restarts from a backfill.
    pub query_hash: String,
    /// Everything published before this instant (RFC 3339) is mirrored.
    pub watermark: Option<String>,
    /// When the current (or last) sync pass was planned.
    pub pass_started_at: Option<String>,
    /// When the last reconcile pass ended.
    pub reconciled_at: Option<String>,
}

type JobRow = (String, Option<String>, Option<String>, Option<String>);

/// `sync_state` columns of a partition: partition, collection, request, resume, done.
pub(super) type PlannedRow = (String, Option<String>, Option<String>, Option<String>, bool);

/// A partition from its row; `None` if its stored request cannot be read (the caller plans the
/// pass again).
pub(super) fn planned_row(job: &str, row: PlannedRow) -> Option<Planned> {
    let (name, collection, request, resume, done) = row;
    let read = |text: Option<String>| -> Option<Request> {
        let text = text?;
        match serde_json::from_str(&text) {
            Ok(request) => Some(request),
            Err(e) => {
                tracing::warn!(job, partition = %name, error = %e, "unreadable stored request");
                None
            }
        }
    };
    let (collection, first, resume) = (collection?, read(request)?, read(resume));
    Some(Planned {
        part: Part {
            name,
            collection,
            first,
        },
        resume,
        done,
    })
}

/// A partition of a stored plan: as planned, and how far it was paged.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its name, collection and first request.
    pub part: Part,
    /// Where to go on, if pages were committed.
    pub resume: Option<Request>,
    /// Every page committed.
    pub done: bool,
}

/// Plans a partition (`$1` job, `$2` name, `$3` kind, `$4` collection, `$5` search hash, `$6`
/// first request); one already planned under that name stays as it is.
const INSERT_PARTITION: &str = "INSERT INTO sync_state (job, partition, kind, collection, \
    query_hash, request, resume, done, pages_done, updated_at) \
    VALUES ($1, $2, $3, $4, $5, $6, NULL, FALSE, 0, CURRENT_TIMESTAMP) \
    ON CONFLICT (job, partition) DO NOTHING";

/// `(name, collection, first request as JSON)` of partitions to plan.
fn partition_rows(partitions: &[Part]) -> Result<Vec<(&str, &str, String)>, Error> {
    partitions
        .iter()
        .map(|part| {
            let first = serde_json::to_string(&part.first)
                .map_err(|e| Error::Internal(format!("cannot serialise a request: {e}")))?;
            Ok((part.name.as_str(), part.collection.as_str(), first))
        })
        .collect()
}

/// A partition that ended short of the match count its first page reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    pub partition: String,
    pub collection: String,
    /// Items its first page said the search matches.
    pub matched: u64,
    /// Features its pages held.
    pub received: u64,
}

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {}: the API reported {} matching items, its pages held {}",
            self.partition, self.matched, self.received
        )
    }
}

/// What a pass's completeness check found.
#[derive(Debug, Default)]
pub struct Completeness {
    /// Short after their first paging: planned again.
    pub repaged: Vec<Short>,
    /// Still short after being paged again.
    pub incomplete: Vec<Short>,
}

type ShortRow = (String, Option<String>, i64, i64, i64);

/// A new pass's plan.
#[derive(Debug)]
pub struct PlanCommit<'a> {
    /// The job.
    pub job: &'a str,
    /// Sync or reconcile.
    pub kind: PassKind,
    /// Fingerprint of the job's search.
    pub search_hash: &'a str,
    /// The stored fingerprint differs: drop the watermark and every unfinished pass.
    pub search_changed: bool,
    /// When the pass starts (RFC 3339).
    pub started_at: &'a str,
    /// The partitions.
    pub partitions: &'a [Part],
}

impl Database {
    /// The job's own row: its search fingerprint, watermark and pass times.
    pub async fn job_state(&self, job: &str) -> Result<Option<JobState>, Error> {
        let row: Option<JobRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT query_hash, watermark, pass_started_at, reconciled_at FROM sync_state \
             WHERE job = $1 AND partition = ''",
        )
        .bind(job)
        .fetch_optional(pool)
        .await)
        .map_err(self.fail("read the job's state"))?;
        Ok(row.map(
            |(query_hash, watermark, pass_started_at, reconciled_at)| JobState {
                query_hash,
                watermark,
                pass_started_at,
                reconciled_at,
            },
        ))
    }

    /// The partitions of the job's unfinished pass of this kind, as planned (empty if none).
    pub async fn planned(&self, job: &str, kind: PassKind) -> Result<Vec<Planned>, Error> {
        let rows: Vec<PlannedRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT partition, collection, request, resume, done FROM sync_state \
             WHERE job = $1 AND kind = $2 ORDER BY partition",
        )
        .bind(job)
        .bind(kind.as_str())
        .fetch_all(pool)
        .await)
        .map_err(self.fail("read the planned partitions"))?;
        let mut planned = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(partition) = planned_row(job, row) else {
                // Unreadable: the caller plans the pass again.
                return Ok(Vec::new());
            };
            planned.push(partition);
        }
        Ok(planned)
    }

    /// Stores a new pass's plan, replacing any earlier unfinished pass of that kind (and, when
    /// the job's search changed, its watermark and every unfinished pass).
    pub async fn plan(&self, plan: PlanCommit<'_>) -> Result<(), Error> {
        let partitions = partition_rows(plan.partitions)?;
        let kind = plan.kind.as_str();
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "DELETE FROM sync_state WHERE job = $1 AND partition <> '' \
                 AND (kind = $2 OR kind IS NULL OR $3)",
            )
            .bind(plan.job)
            .bind(kind)
            .bind(plan.search_changed)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO sync_state (job, partition, kind, query_hash, updated_at) \
                 VALUES ($1, '', 'job', $2, CURRENT_TIMESTAMP) ON CONFLICT (job, partition) DO UPDATE SET \
                 watermark = CASE WHEN sync_state.query_hash = excluded.query_hash THEN sync_state.watermark END, \
                 reconciled_at = CASE WHEN sync_state.query_hash = excluded.query_hash THEN sync_state.reconciled_at END, \
                 query_hash = excluded.query_hash, kind = 'job', updated_at = excluded.updated_at",
            )
            .bind(plan.job)
            .bind(plan.search_hash)
            .execute(&mut *tx)
            .await?;
            if plan.kind == PassKind::Sync {
                sqlx::query("UPDATE sync_state SET pass_started_at = $2 WHERE job = $1 AND partition = ''")
                    .bind(plan.job)
                    .bind(plan.started_at)
                    .execute(&mut *tx)
                    .await?;
            }
            if plan.kind == PassKind::Reconcile || plan.search_changed {
                sqlx::query("DELETE FROM sync_seen WHERE job = $1")
                    .bind(plan.job)
                    .execute(&mut *tx)
                    .await?;
            }
            for (name, collection, first) in &partitions {
                sqlx::query(INSERT_PARTITION)
                .bind(plan.job)
                .bind(*name)
                .bind(kind)
                .bind(*collection)
                .bind(plan.search_hash)
                .bind(first.as_str())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }.await)
        .map_err(self.fail("store the pass's plan"))
    }

    /// Replaces a partition by `halves` of its datetime window, in one transaction: it is done
    /// and marked split (commits of its pages still on their way change nothing), and the halves
    /// are planned in its pass. With a lease, only while the partition is still this worker's.
    pub async fn split(
        &self,
        job: &str,
        partition: &str,
        halves: &[Part],
        lease: Option<&Lease<'_>>,
    ) -> Result<Vec<Planned>, Error> {
        let mut firsts = Vec::with_capacity(halves.len());
        for half in halves {
            firsts.push(
                serde_json::to_string(&half.first)
                    .map_err(|e| Error::Internal(format!("cannot serialise a request: {e}")))?,
            );
        }
        let owner = lease.map(|l| l.owner);
        let collection: Option<Option<String>> = on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let collection: Option<Option<String>> = sqlx::query_scalar(
                "UPDATE sync_state SET done = TRUE, split = TRUE, resume = NULL, \
                 updated_at = CURRENT_TIMESTAMP WHERE job = $1 AND partition = $2 AND NOT split \
                 AND ($3 IS NULL OR lease_owner = $3) RETURNING collection",
            )
            .bind(job)
            .bind(partition)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?;
            for (half, first) in halves.iter().zip(&firsts) {
                sqlx::query(
                    "INSERT INTO sync_state (job, partition, kind, collection, query_hash, request, \
                     resume, done, pages_done, updated_at) \
                     SELECT job, $3, kind, collection, query_hash, $4, NULL, FALSE, 0, CURRENT_TIMESTAMP \
                     FROM sync_state WHERE job = $1 AND partition = $2 \
                     ON CONFLICT (job, partition) DO NOTHING",
                )
                .bind(job)
                .bind(partition)
                .bind(half.name.as_str())
                .bind(first.as_str())
                .execute(&mut *tx)
                .await?;
            }
            if collection.is_some() {
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(collection)
        }.await)
        .map_err(self.fail("split a partition"))?;
        if collection.is_none() {
            return match lease {
                Some(_) => Err(Error::LeaseLost {
                    partition: partition.to_string(),
                }),
                None => Ok(Vec::new()),
            };
        };
        Ok(halves
            .iter()
            .map(|half| Planned {
                part: half.clone(),
                resume: None,
                done: false,
            })
            .collect())
    }

    /// The items the job's reconcile sweep saw that the mirror lacks, holds deleted, or holds
    /// with another `properties.updated` than the sweep saw: changed upstream since stored.
    pub async fn stale_seen(&self, job: &str) -> Result<Vec<(String, String)>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT s.collection, s.id FROM sync_seen s \
             LEFT JOIN items i ON i.collection = s.collection AND i.id = s.id \
             WHERE s.job = $1 AND (i.id IS NULL OR i.deleted_at IS NOT NULL \
             OR (s.updated IS NOT NULL AND (i.updated IS NULL OR i.updated <> s.updated))) \
             ORDER BY s.collection, s.id",
        )
        .bind(job)
        .fetch_all(pool)
        .await)
        .map_err(self.fail("find the items a reconcile sweep saw changed"))
    }

    /// Adds partitions to the job's unfinished pass of this kind (those already planned under
    /// the same name stay as they are).
    pub async fn extend_plan(
        &self,
        job: &str,
        kind: PassKind,
        search_hash: &str,
        partitions: &[Part],
    ) -> Result<(), Error> {
        let rows = partition_rows(partitions)?;
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            for (name, collection, first) in &rows {
                sqlx::query(INSERT_PARTITION)
                .bind(job)
                .bind(*name)
                .bind(kind.as_str())
                .bind(*collection)
                .bind(search_hash)
                .bind(first.as_str())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }.await)
        .map_err(self.fail("add partitions to the pass's plan"))
    }

    /// The completeness check of a pass's partitions that ended short of the match count their
    /// first page reported: those paged once are planned again from their start (in one
    /// statement, so two workers never both do it); those already paged again are incomplete.
    pub async fn check_complete(&self, job: &str, kind: PassKind) -> Result<Completeness, Error> {
        macro_rules! short {
            () => {
                "job = $1 AND kind = $2 AND done AND NOT split AND matched IS NOT NULL \
                 AND received < matched"
            };
        }
        let (short, repaged): (Vec<ShortRow>, Vec<String>) = on_pool!(self, pool => async {
            let short = sqlx::query_as(concat!(
                "SELECT partition, collection, matched, received, attempts FROM sync_state WHERE ",
                short!(),
                " ORDER BY partition"
            ))
            .bind(job)
            .bind(kind.as_str())
            .fetch_all(pool)
            .await?;
            let repaged = sqlx::query_scalar(concat!(
                "UPDATE sync_state SET done = FALSE, resume = NULL, matched = NULL, received = 0, \
                 pages_done = 0, attempts = attempts + 1, lease_owner = NULL, lease_until = NULL, \
                 updated_at = CURRENT_TIMESTAMP WHERE ",
                short!(),
                " AND attempts = 0 RETURNING partition"
            ))
            .bind(job)
            .bind(kind.as_str())
            .fetch_all(pool)
            .await?;
            Ok::<_, sqlx::Error>((short, repaged))
        }.await)
        .map_err(self.fail("check the partitions' completeness"))?;
        let mut check = Completeness::default();
        for (partition, collection, matched, received, attempts) in short {
            let short = Short {
                collection: collection.unwrap_or_default(),
                matched: u64::try_from(matched).unwrap_or_default(),
                received: u64::try_from(received).unwrap_or_default(),
                partition,
            };
            if repaged.contains(&short.partition) {
                check.repaged.push(short);
            } else if attempts > 0 {
                check.incomplete.push(short);
            }
        }
        Ok(check)
    }

    /// Ends the job's sync pass if it is planned and every partition is done: the watermark
    /// moves to `watermark` and the plan is removed, in one transaction. Returns whether it did
    /// (a worker may find the pass unfinished by others, or already ended by another worker).
    /// `None` keeps the watermark where it was (the pass was incomplete).
    pub async fn finish_sync_pass(
        &self,
        job: &str,
        watermark: Option<&str>,
    ) -> Result<bool, Error> {
        on_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let moved = sqlx::query(
                "UPDATE sync_state SET watermark = COALESCE($2, watermark), updated_at = CURRENT_TIMESTAMP \
                 WHERE job = $1 AND partition = '' \
                 AND EXISTS (SELECT 1 FROM sync_state p WHERE p.job = $1 AND p.kind = 'sync') \
                 AND NOT EXISTS (SELECT 1 FROM sync_state p WHERE p.job = $1 AND p.kind = 'sync' AND NOT p.done)",
            )
            .bind(job)
            .bind(watermark)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                > 0;
            if moved {
                sqlx::query("DELETE FROM sync_state WHERE job = $1 AND kind = 'sync'")
                    .bind(job)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(moved)
        }.await)
        .map_err(self.fail("advance the watermark"))
    }
}
