//! `stac-sync status`: what the database says about recent runs, each job's watermark and
//! unfinished pass, items per collection and quarantined features. Reads only.

use crate::error::Error;
use crate::mirror::db::{CollectionStatus, Database, JobStatus, Quarantined, Run};
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

/// Reads the status from the database.
pub async fn read(db: &Database, runs: i64) -> Result<Status, Error> {
    let (quarantined, recent_quarantine) = db.quarantine(10).await?;
    Ok(Status {
        runs: db.recent_runs(runs).await?,
        jobs: db.job_states().await?,
        collections: db.collection_counts().await?,
        quarantined,
        recent_quarantine,
    })
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): ids and reasons come from the
/// API, and one holding a newline or a terminal escape would break the table or the terminal.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    out
}

/// Lays out rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| printable(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
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
    for row in &rows {
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
        out += &self.runs_table();
        out += "\nJobs\n";
        out += &self.jobs_table();
        out += "\nCollections\n";
        let collections: Vec<Vec<String>> = self
            .collections
            .iter()
            .map(|c| {
                let document = match (&c.gone_at, c.described) {
                    (Some(at), _) => format!("gone upstream since {at}"),
                    (None, true) => "stored".into(),
                    (None, false) => "-".into(),
                };
                vec![
                    c.collection.clone(),
                    c.live.to_string(),
                    c.deleted.to_string(),
                    document,
                ]
            })
            .collect();
        out += &table(
            &["collection", "live", "deleted upstream", "collection.json"],
            &collections,
        );
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

    fn runs_table(&self) -> String {
        const HEADER: [&str; 11] = [
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
        ];
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
        table(&HEADER, &runs)
    }

    fn jobs_table(&self) -> String {
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
        table(
            &["job", "watermark", "reconciled", "partitions left"],
            &jobs,
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_in_cells_are_escaped() {
        let out = super::table(
            &["item"],
            &[
                vec!["c/evil\n\u{1b}[2Jid\t".to_string()],
                vec!["é ok".to_string()],
            ],
        );
        assert_eq!(out, "item\nc/evil\\n\\u{1b}[2Jid\\t\né ok\n");
    }
}
