//! Run records (`sync_runs`), their counts, and what `status` reads of runs, jobs and the
//! quarantine.

use super::*;

/// A run, as `status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Run {
    pub run_id: String,
    pub job: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub status: String,
    pub pages: i64,
    pub new: i64,
    pub changed: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub quarantined: i64,
    pub retries: i64,
    pub token_renewals: i64,
    pub missing: i64,
    pub incomplete: i64,
    pub splits: i64,
    pub error: Option<String>,
}

/// A job's state, as `status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct JobStatus {
    pub job: String,
    /// Everything published before this is mirrored (RFC 3339); none before the first full pass.
    pub watermark: Option<String>,
    pub pass_started_at: Option<String>,
    pub reconciled_at: Option<String>,
    /// Partitions left in an unfinished pass (the next run resumes them).
    pub partitions_left: i64,
}

/// A quarantined feature, as `status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Quarantined {
    pub job: String,
    pub collection: Option<String>,
    pub id: Option<String>,
    pub reason: String,
    pub page: String,
    pub at: Option<String>,
}

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
    /// Items a partition fell short of the count its server reported (completeness checks),
    /// before it was paged again.
    pub missing: u64,
    /// Partitions still short of their count after being paged again: the run is partial.
    pub incomplete: u64,
    /// Partitions split in two (too many items for one search).
    pub splits: u64,
}

impl std::ops::AddAssign<&Counts> for Counts {
    fn add_assign(&mut self, other: &Counts) {
        self.pages += other.pages;
        self.new += other.new;
        self.changed += other.changed;
        self.unchanged += other.unchanged;
        self.deleted += other.deleted;
        self.quarantined += other.quarantined;
        self.duplicate += other.duplicate;
        self.retries += other.retries;
        self.token_renewals += other.token_renewals;
        self.missing += other.missing;
        self.incomplete += other.incomplete;
        self.splits += other.splits;
    }
}

impl Database {
    /// The most recent runs, newest first (for `status`).
    pub async fn recent_runs(&self, limit: i64) -> Result<Vec<Run>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT run_id, job, CAST(started_at AS TEXT) AS started_at, \
             CAST(finished_at AS TEXT) AS finished_at, status, pages, items_new AS new, \
             items_changed AS changed, items_unchanged AS unchanged, items_deleted AS deleted, \
             items_quarantined AS quarantined, retries, token_renewals, items_missing AS missing, \
             partitions_incomplete AS incomplete, partitions_split AS splits, error FROM sync_runs \
             ORDER BY started_at DESC, run_id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(pool)
        .await)
        .map_err(self.fail("read the runs"))
    }

    /// Every job's watermark, last reconcile and unfinished partitions (for `status`).
    pub async fn job_states(&self) -> Result<Vec<JobStatus>, Error> {
        on_pool!(self, pool => sqlx::query_as(
            "SELECT j.job, j.watermark, j.pass_started_at, j.reconciled_at, \
             (SELECT COUNT(*) FROM sync_state p WHERE p.job = j.job AND p.kind IN ('sync', 'reconcile') \
             AND NOT p.done) AS partitions_left FROM sync_state j WHERE j.partition = '' ORDER BY j.job",
        )
        .fetch_all(pool)
        .await)
        .map_err(self.fail("read the jobs' state"))
    }

    /// The most recent quarantined features, newest first, and how many there are in all.
    pub async fn quarantine(&self, limit: i64) -> Result<(i64, Vec<Quarantined>), Error> {
        on_pool!(self, pool => async {
            let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quarantine").fetch_one(pool).await?;
            let rows = sqlx::query_as(
                "SELECT job, collection, item_id AS id, reason, page_url AS page, \
                 CAST(quarantined_at AS TEXT) AS at \
                 FROM quarantine ORDER BY seq DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?;
            Ok::<_, sqlx::Error>((total, rows))
        }.await)
        .map_err(self.fail("read the quarantine"))
    }

    /// Records the start of a run; a single run (`alone`) also marks the job's runs still
    /// recorded as running `abandoned`, since it holds the job's lock and none of them can be
    /// alive. (Workers run side by side, so they leave that to the next single run.)
    pub async fn start_run(&self, run_id: &str, job: &str, alone: bool) -> Result<(), Error> {
        match self {
            Database::Sqlite(db) => shared::start_run(db.pool(), run_id, job, alone).await,
            Database::Postgres(db) => shared::start_run(db.pool(), run_id, job, alone).await,
        }
        .map_err(self.fail("record the run"))
    }

    /// Records the end of a run with its counts.
    pub async fn finish_run(
        &self,
        run_id: &str,
        status: &str,
        counts: &Counts,
        error: Option<&str>,
    ) -> Result<(), Error> {
        match self {
            Database::Sqlite(db) => {
                shared::finish_run(db.pool(), run_id, status, counts, error).await
            }
            Database::Postgres(db) => {
                shared::finish_run(db.pool(), run_id, status, counts, error).await
            }
        }
        .map_err(self.fail("record the run's end"))
    }
}
