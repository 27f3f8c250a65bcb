//! `stac-sync status`: what the database says about recent runs, each job's watermark and
//! unfinished pass, items per collection and quarantined features. Reads only.

use crate::db::Database;
use crate::error::Error;
use serde::Serialize;
use std::fmt::Write as _;

/// Everything `status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Recent runs, newest first.
    pub runs: Vec<Run>,
    /// Per job.
    pub jobs: Vec<JobStatus>,
    /// Per collection.
    pub collections: Vec<CollectionStatus>,
    /// Quarantined features in all.
    pub quarantined: i64,
    /// The most recent of them.
    pub recent_quarantine: Vec<Quarantined>,
}

/// One run.
#[derive(Debug, Serialize)]
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
    pub error: Option<String>,
}

/// One job's state.
#[derive(Debug, Serialize)]
pub struct JobStatus {
    pub job: String,
    /// Everything published before this is mirrored (RFC 3339); none before the first full pass.
    pub watermark: Option<String>,
    pub pass_started_at: Option<String>,
    pub reconciled_at: Option<String>,
    /// Partitions left in an unfinished pass (the next run resumes them).
    pub partitions_left: i64,
}

/// One collection's items.
#[derive(Debug, Serialize)]
pub struct CollectionStatus {
    pub collection: String,
    pub live: i64,
    pub deleted: i64,
}

/// One quarantined feature.
#[derive(Debug, Serialize)]
pub struct Quarantined {
    pub job: String,
    pub collection: Option<String>,
    pub id: Option<String>,
    pub reason: String,
    pub page: String,
    pub at: Option<String>,
}

/// Reads the status from the database.
pub async fn read(db: &Database, runs: i64) -> Result<Status, Error> {
    let runs = db
        .recent_runs(runs)
        .await?
        .into_iter()
        .map(|r| Run {
            run_id: r.0,
            job: r.1,
            started_at: r.2,
            finished_at: r.3,
            status: r.4,
            pages: r.5,
            new: r.6,
            changed: r.7,
            unchanged: r.8,
            deleted: r.9,
            quarantined: r.10,
            retries: r.11,
            token_renewals: r.12,
            error: r.13,
        })
        .collect();
    let jobs = db
        .job_states()
        .await?
        .into_iter()
        .map(|j| JobStatus {
            job: j.0,
            watermark: j.1,
            pass_started_at: j.2,
            reconciled_at: j.3,
            partitions_left: j.4,
        })
        .collect();
    let collections = db
        .collection_counts()
        .await?
        .into_iter()
        .map(|(collection, live, deleted)| CollectionStatus {
            collection,
            live,
            deleted,
        })
        .collect();
    let (quarantined, recent) = db.quarantine(10).await?;
    let recent_quarantine = recent
        .into_iter()
        .map(|q| Quarantined {
            job: q.0,
            collection: q.1,
            id: q.2,
            reason: q.3,
            page: q.4,
            at: q.5,
        })
        .collect();
    Ok(Status {
        runs,
        jobs,
        collections,
        quarantined,
        recent_quarantine,
    })
}

/// Lays out rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn or_dash(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "-".into())
}

impl Status {
    /// The status as text tables.
    pub fn render(&self) -> String {
        let mut out = String::from("Recent runs\n");
        let runs: Vec<Vec<String>> = self
            .runs
            .iter()
            .map(|r| {
                vec![
                    r.job.clone(),
                    or_dash(&r.started_at),
                    r.status.clone(),
                    r.pages.to_string(),
                    r.new.to_string(),
                    r.changed.to_string(),
                    r.unchanged.to_string(),
                    r.deleted.to_string(),
                    r.quarantined.to_string(),
                    r.retries.to_string(),
                    r.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out += &table(
            &[
                "job",
                "started",
                "status",
                "pages",
                "new",
                "changed",
                "unchanged",
                "deleted",
                "quarantined",
                "retries",
                "error",
            ],
            &runs,
        );
        out += "\nJobs\n";
        let jobs: Vec<Vec<String>> = self
            .jobs
            .iter()
            .map(|j| {
                vec![
                    j.job.clone(),
                    j.watermark
                        .clone()
                        .unwrap_or_else(|| "none (no full pass yet)".into()),
                    or_dash(&j.reconciled_at),
                    j.partitions_left.to_string(),
                ]
            })
            .collect();
        out += &table(
            &["job", "watermark", "reconciled", "partitions left"],
            &jobs,
        );
        out += "\nItems\n";
        let collections: Vec<Vec<String>> = self
            .collections
            .iter()
            .map(|c| {
                vec![
                    c.collection.clone(),
                    c.live.to_string(),
                    c.deleted.to_string(),
                ]
            })
            .collect();
        out += &table(&["collection", "live", "deleted upstream"], &collections);
        let _ = writeln!(out, "\nQuarantined features: {}", self.quarantined);
        if !self.recent_quarantine.is_empty() {
            let rows: Vec<Vec<String>> = self
                .recent_quarantine
                .iter()
                .map(|q| {
                    vec![
                        or_dash(&q.at),
                        q.job.clone(),
                        format!("{}/{}", or_dash(&q.collection), or_dash(&q.id)),
                        q.reason.clone(),
                    ]
                })
                .collect();
            out += &table(&["at", "job", "item", "reason"], &rows);
        }
        out
    }
}
