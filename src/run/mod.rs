//! A run of the jobs: for each job, its lock, its passes ([`passes`]) through the pipeline
//! ([`pipeline`]: pager → stager → committer), and its record: the `sync_runs` row, the run
//! manifest, the summary line. This is the one module that knows the API, the plan and the
//! mirror together.

mod bulk;
mod pager;
mod passes;
mod pipeline;
mod webhook;

use crate::clock::{Clock, MonotonicClock};
use crate::config::{Config, Job};
use crate::error::{Error, Exit};
use crate::mirror::Mirror;
use crate::mirror::db::{Counts, JobLock};
use crate::plan::Strategy;
use crate::stac::client::{ApiClient, api_client, settle_root};
use crate::stac::http::Stats;
use passes::{JobPasses, PassReport};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// How a run is set up; tests inject a clock.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The monotonic clock for token lifetimes.
    pub clock: Arc<dyn Clock>,
    /// Apply migrations before running.
    pub migrate: bool,
    /// Cancelled on SIGTERM: no new page is started, pages already fetched are committed, the
    /// run is recorded as interrupted and the process exits 143.
    pub stop: CancellationToken,
    /// Reconcile every job after its sync pass (`run --reconcile`).
    pub reconcile: bool,
    /// Show a progress display on stderr (a person is watching a terminal).
    pub progress: bool,
    /// Share each job with other `run --worker` processes through Postgres leases.
    pub worker: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            clock: MonotonicClock::shared(),
            migrate: true,
            stop: CancellationToken::new(),
            reconcile: false,
            progress: false,
            worker: false,
        }
    }
}

/// The outcome of one job.
#[derive(Debug)]
pub struct JobReport {
    /// The job's name.
    pub job: String,
    /// The run's id.
    pub run_id: String,
    /// Its counts.
    pub counts: Counts,
    /// Why it failed, if it did.
    pub error: Option<Error>,
    /// `succeeded`, `partial`, `failed`, `interrupted`, or `locked` (not run).
    pub status: &'static str,
    /// When it ended.
    pub finished_at: SystemTime,
    /// How long it took.
    pub duration: std::time::Duration,
    /// The job's watermark after the run, if it has one.
    pub watermark: Option<String>,
    /// Run as one of the job's workers (`run --worker`).
    pub worker: bool,
}

/// The outcome of `stac-sync run`.
#[derive(Debug)]
pub struct Summary {
    /// One report per job, in order.
    pub jobs: Vec<JobReport>,
}

impl Summary {
    /// The process exit code: the failure's own code when every job failed the same way,
    /// 2 when some failed, quarantined items or left a partition incomplete, 0 otherwise.
    pub fn exit(&self) -> Exit {
        let failures: Vec<&Error> = self.jobs.iter().filter_map(|j| j.error.as_ref()).collect();
        if failures.iter().any(|e| matches!(e, Error::Stopped)) {
            return Exit::Terminated;
        }
        if !failures.is_empty() && failures.len() == self.jobs.len() {
            return failures[0].exit();
        }
        if !failures.is_empty()
            || self
                .jobs
                .iter()
                .any(|j| j.counts.quarantined > 0 || j.counts.incomplete > 0)
        {
            return Exit::Partial;
        }
        Exit::Success
    }
}

/// Everything a job needs, built once per `run`.
#[derive(Debug)]
pub struct Context {
    api: ApiClient,
    mirror: Mirror,
    stats: Arc<Stats>,
    stop: CancellationToken,
    reconcile: bool,
    progress: bool,
    /// The lease period, when this process is one of a job's workers.
    worker: Option<Duration>,
    /// Partitions a worker pages at once: the cap on requests in flight.
    slots: usize,
    /// A feature larger than this is quarantined.
    max_item_bytes: usize,
    /// How long the change feed keeps a change.
    changes_retention: Option<Duration>,
    /// Where the change feed is delivered as pages commit.
    webhook: Option<webhook::Webhook>,
    /// How a bulk search is waited for.
    bulk: crate::stac::bulk::Polling,
    /// The clock a bulk search's deadline runs on.
    clock: Arc<dyn Clock>,
}

impl Context {
    /// Opens the mirror and builds the API client. Fails before any page is fetched.
    pub async fn open(config: &Config, options: &RunOptions) -> Result<Context, Error> {
        if options.worker && options.reconcile {
            return Err(Error::Config(
                "run --worker --reconcile: workers share sync passes only; reconcile with one \
                 `stac-sync run --reconcile` (without --worker), which runs once no worker does"
                    .into(),
            ));
        }
        let stats = Arc::new(Stats::default());
        let api = api_client(
            config,
            options.clock.clone(),
            stats.clone(),
            config.http.retry.clone(),
        )?;
        if options.worker && !crate::mirror::db::is_postgres(&config.database_url) {
            // Refused before the database is opened (which creates a SQLite file).
            return Err(Error::Config(
                crate::mirror::db::WORKERS_NEED_POSTGRES.into(),
            ));
        }
        let mirror = Mirror::open(config, options.migrate).await?;
        let api = settle_root(api, config.api_host.as_ref()).await?;
        tracing::info!(api = %config.api_root, database = %crate::config::redact_url(&config.database_url),
            objects = config.object_store_url.as_deref().unwrap_or("none"), "stac-sync starting");
        Ok(Context {
            api,
            mirror,
            stats,
            stop: options.stop.clone(),
            reconcile: options.reconcile,
            progress: options.progress,
            worker: options.worker.then_some(config.worker_lease),
            slots: config.concurrency,
            changes_retention: config.changes_retention,
            webhook: webhook::Webhook::of(config)?,
            max_item_bytes: config.max_item_bytes,
            bulk: crate::stac::bulk::Polling {
                first: config.bulk_poll_interval,
                max: config.bulk_poll_interval.max(Duration::from_secs(60)),
                timeout: config.bulk_timeout,
            },
            clock: options.clock.clone(),
        })
    }

    /// The mirror's database.
    pub fn db(&self) -> &crate::mirror::db::Database {
        self.mirror.db()
    }
}

/// `stac-sync run`: one pass over every configured job.
pub async fn run(config: &Config, options: RunOptions) -> Result<Summary, Error> {
    if config.jobs.is_empty() {
        return Err(Error::Config(
            "no jobs: add [[jobs]] to the config file, or pass --collection ID".into(),
        ));
    }
    let context = Context::open(config, &options).await?;
    let done = CancellationToken::new();
    let jobs = async {
        let mut jobs = Vec::new();
        for job in &config.jobs {
            if context.stop.is_cancelled() {
                break;
            }
            match run_job(&context, job).await {
                Ok(report) => jobs.push(report),
                Err(e) => {
                    done.cancel();
                    return Err(e);
                }
            }
        }
        done.cancel();
        Ok(jobs)
    };
    // The change feed goes to the webhook while the jobs commit.
    let delivery = async {
        if let Some(webhook) = &context.webhook {
            webhook.follow(context.db(), &done).await;
        }
    };
    let (jobs, ()) = tokio::join!(jobs, delivery);
    Ok(Summary { jobs: jobs? })
}

/// Runs one job and records it. Errors of the job itself land in the report; only a failure
/// to record the run at all is returned as `Err`.
pub async fn run_job(context: &Context, job: &Job) -> Result<JobReport, Error> {
    let record = Record::start(job, context.worker.is_some());
    // Taken before anything is written: a second run of the job exits 7 and writes nothing.
    let mut lock = match context.db().lock(&job.name, record.worker).await {
        Ok(lock) => lock,
        Err(error) => {
            tracing::warn!(job = %job.name, error = %error, "job not run");
            return Ok(record.report(job, Counts::default(), Some(error), "locked", None));
        }
    };
    context
        .db()
        .start_run(&record.run_id, &job.name, !record.worker)
        .await?;
    if !record.worker {
        // Other workers may be writing objects right now: only a single run may clean up.
        context.mirror.recover(&job.name, &job.collections).await;
    }
    let before = retries_and_renewals(&context.stats);
    let mut counts = Counts::default();
    let run_id = record.run_id.clone();
    let mut passes = JobPasses::new(context, job, &run_id);
    let mut result = passes.run(&mut lock, &mut counts).await;
    if let (Ok(()), Some(window)) = (&result, job.snapshots) {
        // After the passes committed, under the job's lock: the windows they changed.
        match context.mirror.snapshots(&job.collections, window).await {
            Ok((0, _)) => {}
            Ok((windows, items)) => {
                tracing::info!(job = %job.name, windows, items, "snapshot files rewritten")
            }
            Err(e) => result = Err(e),
        }
    }
    if record.worker {
        give_up_leases(context, job, &run_id).await;
    }
    let after = retries_and_renewals(&context.stats);
    counts.retries = after.0 - before.0;
    counts.token_renewals = after.1 - before.1;
    let report = record
        .finish(context, job, lock, result, counts, passes.report)
        .await;
    if let Some(webhook) = &context.webhook
        && let Err(e) = webhook.deliver(context.db()).await
    {
        tracing::warn!(job = %job.name, error = %e, "could not deliver the change feed to the \
            webhook; the next run tries again from where it stopped");
    }
    report
}

impl Context {
    /// A page committed: the webhook, if any, delivers its changes.
    pub(crate) fn committed(&self) {
        if let Some(webhook) = &self.webhook {
            webhook.poke();
        }
    }
}

/// Partitions a worker leaves unfinished (it failed or was stopped) go to the other workers
/// now rather than when the lease expires.
async fn give_up_leases(context: &Context, job: &Job, run_id: &str) {
    match context.db().release(&job.name, run_id).await {
        Ok(0) => {}
        Ok(released) => {
            tracing::info!(job = %job.name, released, "gave up unfinished partitions to other workers")
        }
        Err(e) => {
            tracing::warn!(job = %job.name, error = %e, "could not give up the partition leases; they expire")
        }
    }
}

fn retries_and_renewals(stats: &Stats) -> (u64, u64) {
    (
        Stats::get(&stats.retries),
        Stats::get(&stats.token_renewals),
    )
}

/// A job's run as it is recorded: in `sync_runs`, the run manifest, the log and the report.
struct Record {
    run_id: String,
    started: Instant,
    started_at: SystemTime,
    worker: bool,
}

impl Record {
    fn start(job: &Job, worker: bool) -> Record {
        Record {
            run_id: new_run_id(&job.name),
            started: Instant::now(),
            started_at: SystemTime::now(),
            worker,
        }
    }

    fn report(
        self,
        job: &Job,
        counts: Counts,
        error: Option<Error>,
        status: &'static str,
        watermark: Option<String>,
    ) -> JobReport {
        JobReport {
            job: job.name.clone(),
            run_id: self.run_id,
            counts,
            error,
            status,
            finished_at: SystemTime::now(),
            duration: self.started.elapsed(),
            watermark,
            worker: self.worker,
        }
    }

    /// Records the run's end, releases the job's lock, writes the manifest and the summary.
    async fn finish(
        self,
        context: &Context,
        job: &Job,
        lock: JobLock,
        result: Result<(), Error>,
        counts: Counts,
        passes: PassReport,
    ) -> Result<JobReport, Error> {
        let mut status = match &result {
            Err(Error::Stopped) => "interrupted",
            Err(_) => "failed",
            Ok(()) if counts.quarantined > 0 || counts.incomplete > 0 => "partial",
            Ok(()) => "succeeded",
        };
        let mut error = result.err();
        let incomplete = (!passes.incomplete.is_empty()).then(|| {
            let shorts: Vec<String> = passes.incomplete.iter().map(ToString::to_string).collect();
            format!(
                "incomplete, even after paging again: {}; the next run looks for the missing \
                 items again",
                shorts.join("; ")
            )
        });
        let mut message = error.as_ref().map(ToString::to_string).or(incomplete);
        let recorded = context
            .db()
            .finish_run(&self.run_id, status, &counts, message.as_deref())
            .await;
        if let Err(record) = recorded {
            // A database that refuses the run's failure (a full disk refuses both) must not
            // hide it: the job reports what failed first, then that its end is not recorded.
            let unrecorded = format!(
                "The run's end could not be recorded either ({record}): `status` shows it \
                 running until the next run of the job marks it abandoned"
            );
            let failure = match error {
                Some(first) => Error::Hinted {
                    error: Box::new(first),
                    hint: unrecorded,
                },
                None => record,
            };
            status = "failed";
            message = Some(failure.to_string());
            error = Some(failure);
        }
        // Now rather than when the server notices the connection close: a daemon's next run of
        // the job may start at once.
        if let Err(e) = lock.release().await {
            tracing::warn!(job = %job.name, error = %e, "could not release the job's lock; it goes with the connection");
        }
        let manifest = self.manifest(job, status, &counts, &passes, message.as_deref());
        context.mirror.manifest(&self.run_id, &manifest).await;
        context.mirror.changes(&self.run_id).await;
        if let Some(keep) = context.changes_retention
            && let Some(before) = SystemTime::now().checked_sub(keep)
        {
            match context.db().prune_changes(before).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned the change feed (changes_retention)"),
                Err(e) => tracing::warn!(error = %e, "could not prune the change feed"),
            }
        }
        self.log(job, status, &counts, message.as_deref(), context.progress);
        let watermark = passes.watermark_after.or(passes.watermark_before);
        Ok(self.report(job, counts, error, status, watermark))
    }

    /// `_runs/{run_id}.json`: the job, its strategy, watermarks, partitions, counts, duration.
    fn manifest(
        &self,
        job: &Job,
        status: &str,
        counts: &Counts,
        passes: &PassReport,
        error: Option<&str>,
    ) -> serde_json::Value {
        serde_json::json!({
            "run_id": self.run_id,
            "job": job.name,
            "strategy": passes.strategy.map(|s: Strategy| s),
            "watermark_before": passes.watermark_before,
            "watermark_after": passes.watermark_after,
            "reconciled": passes.reconciled,
            "partitions": passes.partitions,
            "status": status,
            "counts": counts,
            "started_at": humantime::format_rfc3339_millis(self.started_at).to_string(),
            "duration_seconds": self.started.elapsed().as_secs_f64(),
            "error": error,
        })
    }

    /// The one summary line per run, and a person's summary on a terminal.
    fn log(&self, job: &Job, status: &str, counts: &Counts, error: Option<&str>, person: bool) {
        let elapsed = self.started.elapsed();
        let items = counts.new + counts.changed + counts.unchanged;
        let rate = items as f64 / elapsed.as_secs_f64().max(1e-9);
        tracing::info!(
            job = %job.name, run_id = %self.run_id, status,
            pages = counts.pages, new = counts.new, changed = counts.changed,
            unchanged = counts.unchanged, quarantined = counts.quarantined,
            duplicate = counts.duplicate, retries = counts.retries,
            token_renewals = counts.token_renewals,
            duration_s = format!("{:.3}", elapsed.as_secs_f64()),
            items_per_s = format!("{rate:.0}"),
            error = error.unwrap_or(""),
            "run finished"
        );
        if person {
            eprintln!(
                "{}: {status}: {} new, {} changed, {} unchanged, {} deleted, {} quarantined in {:.1} s ({rate:.0} items/s){}",
                job.name,
                counts.new,
                counts.changed,
                counts.unchanged,
                counts.deleted,
                counts.quarantined,
                elapsed.as_secs_f64(),
                error.map(|m| format!("; {m}")).unwrap_or_default()
            );
        }
    }
}

fn new_run_id(job: &str) -> String {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let suffix: u32 = rand::rng().random();
    format!("{stamp}-{job}-{suffix:08x}")
}
