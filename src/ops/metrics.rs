//! A run's figures in the Prometheus text format, for node_exporter's textfile collector
//! (systemd hosts) and for a Pushgateway (CronJobs). Both are optional and best effort: a
//! metrics failure is logged and never fails the run.

use crate::run::JobReport;
use std::fmt::Write as _;
use std::path::Path;
use std::time::UNIX_EPOCH;

const LAST_SUCCESS: &str = "stac_sync_last_success_timestamp_seconds";

/// The metrics of the latest run of each job, in the text exposition format.
/// `previous` is the text written before, whose last-success times are kept for jobs that did
/// not succeed this time (the textfile is rewritten whole).
pub fn render(reports: &[&JobReport], previous: &str) -> String {
    let mut out = Exposition::default();
    run_figures(&mut out, reports);
    out.family(
        "stac_sync_run_items",
        "Items of the job's last run, by outcome.",
        item_outcomes(reports),
    );
    out.family(
        LAST_SUCCESS,
        "When the job last succeeded (Unix time); alert when it is too old.",
        last_success(reports, previous),
    );
    out.0
}

/// Text in the exposition format, one gauge family at a time.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, help: &str, samples: Vec<(String, f64)>) {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }
}

fn job(r: &JobReport) -> String {
    format!("job_name=\"{}\"", escape(&r.job))
}

fn seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One gauge per job and figure of its last run.
fn run_figures(out: &mut Exposition, reports: &[&JobReport]) {
    let each = |f: &dyn Fn(&JobReport) -> Option<f64>| -> Vec<(String, f64)> {
        reports
            .iter()
            .filter_map(|r| f(r).map(|v| (job(r), v)))
            .collect()
    };
    out.family(
        "stac_sync_run_timestamp_seconds",
        "When the job's last run ended (Unix time).",
        each(&|r| Some(seconds(r.finished_at))),
    );
    out.family(
        "stac_sync_run_duration_seconds",
        "How long the job's last run took.",
        each(&|r| Some(r.duration.as_secs_f64())),
    );
    out.family(
        "stac_sync_run_success",
        "1 if the job's last run succeeded, else 0 (partial, failed, interrupted, locked).",
        each(&|r| Some(if r.status == "succeeded" { 1.0 } else { 0.0 })),
    );
    out.family(
        "stac_sync_run_status",
        "The job's last run's status, as a label.",
        reports
            .iter()
            .map(|r| (format!("{},status=\"{}\"", job(r), r.status), 1.0))
            .collect(),
    );
    out.family(
        "stac_sync_run_pages",
        "Pages committed by the job's last run.",
        each(&|r| Some(r.counts.pages as f64)),
    );
    out.family(
        "stac_sync_run_retries",
        "HTTP retries in the job's last run.",
        each(&|r| Some(r.counts.retries as f64)),
    );
    out.family(
        "stac_sync_run_token_renewals",
        "Access tokens renewed in the job's last run.",
        each(&|r| Some(r.counts.token_renewals as f64)),
    );
    out.family(
        "stac_sync_run_items_missing",
        "Items the job's last run found missing by its completeness checks (a partition's pages \
         held fewer than its API reported), before paging those partitions again.",
        each(&|r| Some(r.counts.missing as f64)),
    );
    out.family(
        "stac_sync_run_partitions_incomplete",
        "Partitions still short of their match count after being paged again (the run is partial).",
        each(&|r| Some(r.counts.incomplete as f64)),
    );
    out.family(
        "stac_sync_run_partitions_split",
        "Partitions the job's last run split in two (their search matched too many items).",
        each(&|r| Some(r.counts.splits as f64)),
    );
    out.family(
        "stac_sync_watermark_timestamp_seconds",
        "The job's watermark (Unix time): everything published before it is mirrored.",
        each(&|r| {
            r.watermark
                .as_deref()
                .and_then(crate::plan::parse_instant)
                .map(seconds)
        }),
    );
}

fn item_outcomes(reports: &[&JobReport]) -> Vec<(String, f64)> {
    let mut items = Vec::new();
    for r in reports {
        let c = &r.counts;
        for (outcome, n) in [
            ("new", c.new),
            ("changed", c.changed),
            ("unchanged", c.unchanged),
            ("deleted", c.deleted),
            ("quarantined", c.quarantined),
            ("duplicate", c.duplicate),
        ] {
            items.push((format!("{},outcome=\"{outcome}\"", job(r)), n as f64));
        }
    }
    items
}

/// The last-success times of `previous`, updated for the jobs that succeeded now.
fn last_success(reports: &[&JobReport], previous: &str) -> Vec<(String, f64)> {
    let mut last: Vec<(String, f64)> = previous
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(LAST_SUCCESS)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect();
    for r in reports.iter().filter(|r| r.status == "succeeded") {
        last.retain(|(labels, _)| *labels != job(r));
        last.push((job(r), seconds(r.finished_at)));
    }
    last
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes `reports` to `path` for node_exporter: a temporary file renamed over the old one, so
/// the collector never reads half a file.
pub fn write_textfile(path: &Path, reports: &[&JobReport]) -> std::io::Result<()> {
    let previous = std::fs::read_to_string(path).unwrap_or_default();
    let text = render(reports, &previous);
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// Pushes one job's run to a Pushgateway, grouped by `job="stac_sync"` and the job's name, and
/// for a worker also by `worker`: its Indexed Job index (`JOB_COMPLETION_INDEX`), else its host
/// name, so the workers of a job do not overwrite each other. POST replaces only the metrics
/// pushed, so the last success of an earlier run stays when this one failed.
pub async fn push(
    client: &reqwest::Client,
    base: &url::Url,
    report: &JobReport,
) -> Result<(), String> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| format!("pushgateway_url {base} cannot take a path"))?
        .pop_if_empty()
        .extend(["metrics", "job", "stac_sync", "job_name", &report.job]);
    if report.worker {
        let worker = ["JOB_COMPLETION_INDEX", "HOSTNAME"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| "unnamed".into());
        url.path_segments_mut()
            .map_err(|()| format!("pushgateway_url {base} cannot take a path"))?
            .extend(["worker", &worker]);
    }
    let body = render(&[report], "");
    let response = client
        .post(url.clone())
        .header("content-type", "text/plain; version=0.0.4")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("cannot push metrics to {url}: {e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "the Pushgateway at {url} answered HTTP {}",
            response.status()
        ))
    }
}

/// Writes the textfile, if configured, with `reports` (the latest run of each job); problems
/// are logged.
pub fn write_configured(config: &crate::config::Config, reports: &[&JobReport]) {
    if let Some(path) = &config.metrics_file
        && let Err(e) = write_textfile(path, reports)
    {
        tracing::warn!(path = %path.display(), error = %e, "could not write the metrics file");
    }
}

/// Pushes `reports` to the Pushgateway, if configured; problems are logged.
pub async fn push_configured(config: &crate::config::Config, reports: &[&JobReport]) {
    let Some(base) = &config.pushgateway_url else {
        return;
    };
    let client = match crate::stac::http::client(&config.http) {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "could not build an HTTP client for the Pushgateway");
            return;
        }
    };
    for report in reports {
        if let Err(e) = push(&client, base, report).await {
            tracing::warn!(error = %e, "could not push metrics");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::db::Counts;
    use std::time::Duration;

    fn report(job: &str, status: &'static str, at: u64) -> JobReport {
        JobReport {
            job: job.into(),
            run_id: "r".into(),
            counts: Counts {
                pages: 3,
                new: 7,
                ..Counts::default()
            },
            error: None,
            status,
            finished_at: UNIX_EPOCH + Duration::from_secs(at),
            duration: Duration::from_millis(1500),
            watermark: Some("2026-11-28T09:00:00Z".into()),
            worker: false,
        }
    }

    #[test]
    fn the_text_format_carries_each_figure_and_keeps_the_last_success() {
        let first = render(&[&report("s2", "succeeded", 1_000)], "");
        assert!(
            first.contains(
                "# TYPE stac_sync_run_pages gauge\nstac_sync_run_pages{job_name=\"s2\"} 3\n"
            ),
            "{first}"
        );
        assert!(first.contains("stac_sync_run_items{job_name=\"s2\",outcome=\"new\"} 7\n"));
        assert!(first.contains("stac_sync_run_duration_seconds{job_name=\"s2\"} 1.5\n"));
        assert!(first.contains("stac_sync_run_success{job_name=\"s2\"} 1\n"));
        assert!(
            first.contains("stac_sync_watermark_timestamp_seconds{job_name=\"s2\"} 1795856400\n")
        );
        assert!(first.contains("stac_sync_last_success_timestamp_seconds{job_name=\"s2\"} 1000\n"));

        let failed = render(&[&report("s2", "failed", 2_000)], &first);

        assert!(failed.contains("stac_sync_run_success{job_name=\"s2\"} 0\n"));
        assert!(failed.contains("stac_sync_run_status{job_name=\"s2\",status=\"failed\"} 1\n"));
        assert!(
            failed.contains("stac_sync_last_success_timestamp_seconds{job_name=\"s2\"} 1000\n"),
            "{failed}"
        );
    }

    #[test]
    fn the_textfile_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stac_sync.prom");
        write_textfile(&path, &[&report("a", "succeeded", 5)]).expect("written");
        write_textfile(&path, &[&report("a", "partial", 9)]).expect("written");
        let text = std::fs::read_to_string(&path).expect("readable");
        assert!(text.contains("stac_sync_run_timestamp_seconds{job_name=\"a\"} 9\n"));
        assert!(text.contains("stac_sync_last_success_timestamp_seconds{job_name=\"a\"} 5\n"));
        assert!(!dir.path().join("stac_sync.prom.tmp").exists());
    }
}
