//! The orchestrator: the one module that knows config, auth, paging and the sinks.
//!
//! A job's pass pages the search on one task and writes on another, joined by a bounded channel
//! so a slow sink slows the pager instead of filling memory. For each page, in this order: the
//! objects of new and changed items are written, then the rows, the quarantined features and
//! the resume point commit in one transaction. A run killed anywhere restarts from the last
//! committed page, and rewriting an object with the same bytes is harmless.

use crate::api::{ApiClient, Request};
use crate::auth::TokenSource;
use crate::clock::{Clock, MonotonicClock};
use crate::config::{Config, DeletedObjects, Incremental, Job};
use crate::db::{
    Counts, Database, JobLock, Known, Lease, PageCommit, PassKind, PlanCommit, Planned, Scope,
};
use crate::error::{Error, Exit};
use crate::http::{self, Stats};
use crate::objects::ObjectSink;
use crate::page::{Item, Page, PageReader, Rejected};
use crate::plan::{self, Capabilities, Strategy};
use futures_util::StreamExt;
use rand::Rng;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

/// Parts of pages buffered between the pagers and the writer (within the byte budget below).
const PARTS_BUFFERED: usize = 4;
/// A pager hands the features it has read to the writer once they hold this many bytes,
/// before its page has ended, so that no page is held whole (a page of 10,000 items is about
/// 150 MB). Each part commits with the resume point left at its page.
const PART_BYTES: usize = 2 << 20;
/// Bytes of features (KiB) a pass holds at once between the pagers and the commit: parts
/// buffered, being prepared and being committed. A pager takes its part's share before it
/// hands the part over, and the share is released when the part has committed. Each request
/// in flight also holds the part it is reading (up to [`PART_BYTES`]), so a pass holds about
/// this plus `concurrency` × 2 MiB of pages, whatever the page size and the number of
/// partitions. 16 MiB is eight parts: enough to keep the writer busy. A part larger than the
/// whole budget waits for all of it.
const PAGE_BUDGET_KIB: usize = 16 * 1024;

/// The byte budget of a pass's pages.
#[derive(Debug)]
struct Budget {
    /// One permit per KiB.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            permits: Arc::new(tokio::sync::Semaphore::new(PAGE_BUDGET_KIB)),
        }
    }

    /// Waits for `kib` of the budget (all of it if more).
    async fn take(&self, kib: usize) -> Result<OwnedSemaphorePermit, Error> {
        let kib = kib.clamp(1, PAGE_BUDGET_KIB);
        self.permits
            .clone()
            .acquire_many_owned(u32::try_from(kib).unwrap_or(u32::MAX))
            .await
            .map_err(|_| Error::Internal("the page budget was closed".into()))
    }
}

/// A partition being paged in this run: a slice of a job's search with its own resume point,
/// paged concurrently with the others (see [`crate::plan`]).
#[derive(Debug)]
struct Partition {
    name: String,
    collection: String,
    first: Request,
    start: Request,
    query_hash: String,
    /// Cancelled when another worker took the partition over: this one stops paging it.
    lost: CancellationToken,
}

impl Partition {
    /// A planned partition, to be paged from its resume point (or its first request).
    fn of(job: &Job, planned: &Planned) -> Partition {
        if let Some(resume) = &planned.resume {
            tracing::info!(job = %job.name, partition = %planned.name,
                url = %http::display_url(&resume.url), "resuming a partition");
        }
        Partition {
            name: planned.name.clone(),
            collection: planned.collection.clone(),
            query_hash: query_hash(&planned.first),
            start: planned
                .resume
                .clone()
                .unwrap_or_else(|| planned.first.clone()),
            first: planned.first.clone(),
            lost: CancellationToken::new(),
        }
    }
}

/// What a pass does with its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Store the items.
    Sync,
    /// Record the ids seen (and store the items, unless only ids were asked for).
    Reconcile { ids_only: bool },
}

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
    /// 2 when some failed or quarantined items, 0 otherwise.
    pub fn exit(&self) -> Exit {
        let failures: Vec<&Error> = self.jobs.iter().filter_map(|j| j.error.as_ref()).collect();
        if failures.iter().any(|e| matches!(e, Error::Stopped)) {
            return Exit::Terminated;
        }
        if !failures.is_empty() && failures.len() == self.jobs.len() {
            return failures[0].exit();
        }
        if !failures.is_empty() || self.jobs.iter().any(|j| j.counts.quarantined > 0) {
            return Exit::Partial;
        }
        Exit::Success
    }
}

/// Everything a job needs, built once per `run`.
#[derive(Debug)]
pub struct Context {
    api: ApiClient,
    db: Database,
    objects: Option<ObjectSink>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    reconcile: bool,
    progress: bool,
    /// The lease period, when this process is one of a job's workers.
    worker: Option<std::time::Duration>,
    /// Partitions a worker pages at once: the cap on requests in flight.
    slots: usize,
}

impl Context {
    /// Opens the sinks and builds the API client. Fails before any page is fetched.
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
        if options.worker && !crate::db::is_postgres(&config.database_url) {
            // Refused before the database is opened (which creates a SQLite file).
            return Err(Error::Config(crate::db::WORKERS_NEED_POSTGRES.into()));
        }
        let db = Database::connect(&config.database_url).await?;
        if options.migrate {
            db.migrate().await?;
        }
        let objects = match config.object_store_url.as_deref() {
            Some(url) => {
                let sink = ObjectSink::from_url(url, &config.object_store_options)?;
                sink.probe().await?;
                Some(sink)
            }
            None => None,
        };
        tracing::info!(api = %config.api_root, database = %crate::config::redact_url(&config.database_url),
            objects = config.object_store_url.as_deref().unwrap_or("none"), "stac-sync starting");
        Ok(Context {
            api,
            db,
            objects,
            stats,
            stop: options.stop.clone(),
            reconcile: options.reconcile,
            progress: options.progress,
            worker: options.worker.then_some(config.worker_lease),
            slots: config.concurrency,
        })
    }

    /// The database.
    pub fn db(&self) -> &Database {
        &self.db
    }
}

/// What the server offers: the landing page's (or `/conformance`'s) classes, and whether
/// `/queryables` lists `updated` (asked only when Sort and Filter are offered).
pub async fn capabilities_of(api: &ApiClient) -> Result<Capabilities, Error> {
    let landing = landing_page(api).await?;
    capabilities_from(api, &landing).await
}

/// Reads a JSON document for [`ApiClient::fetch`].
fn json(what: &'static str) -> impl FnMut(bytes::Bytes) -> Result<serde_json::Value, String> {
    move |body| {
        serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| format!("the {what} is not JSON ({e})"))
    }
}

/// The API's landing page.
pub async fn landing_page(api: &ApiClient) -> Result<serde_json::Value, Error> {
    api.fetch(
        "landing page",
        &Request::get(api.root().clone()),
        json("landing page"),
    )
    .await
}

/// What the server offers, given its landing page.
pub async fn capabilities_from(
    api: &ApiClient,
    landing: &serde_json::Value,
) -> Result<Capabilities, Error> {
    let root = api.root();
    let mut caps = Capabilities::from_conformance(landing);
    if landing.get("conformsTo").is_none()
        && let Ok(url) = root.join("conformance")
    {
        match api
            .fetch("conformance", &Request::get(url), json("conformance"))
            .await
        {
            Ok(doc) => caps = Capabilities::from_conformance(&doc),
            Err(Error::Config(_)) => {}
            Err(e) => return Err(e),
        }
    }
    if caps.sort
        && caps.filter
        && let Ok(url) = root.join("queryables")
    {
        match api
            .fetch("queryables", &Request::get(url), json("queryables"))
            .await
        {
            Ok(doc) => caps.updated_queryable = Capabilities::queryable_updated(&doc),
            Err(Error::Config(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(caps)
}

/// The API client of a config, retrying per `policy`.
pub fn api_client(
    config: &Config,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    policy: http::RetryPolicy,
) -> Result<ApiClient, Error> {
    let client = http::client(&config.http)
        .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
    let tokens = TokenSource::new(
        config.auth.clone(),
        client.clone(),
        policy.clone(),
        clock,
        stats.clone(),
    );
    Ok(ApiClient::new(
        config.api_root.clone(),
        client,
        tokens,
        policy,
        stats,
        config.concurrency,
        config.headers.clone(),
    ))
}

/// `stac-sync run`: one pass over every configured job.
pub async fn run(config: &Config, options: RunOptions) -> Result<Summary, Error> {
    if config.jobs.is_empty() {
        return Err(Error::Config(
            "no jobs: add [[jobs]] to the config file, or pass --collection ID".into(),
        ));
    }
    let context = Context::open(config, &options).await?;
    let mut jobs = Vec::new();
    for job in &config.jobs {
        if context.stop.is_cancelled() {
            break;
        }
        jobs.push(run_job(&context, job).await?);
    }
    Ok(Summary { jobs })
}

/// Runs one job and records it. Errors of the job itself land in the report; only a failure
/// to record the run at all is returned as `Err`.
pub async fn run_job(context: &Context, job: &Job) -> Result<JobReport, Error> {
    let run_id = new_run_id(&job.name);
    let started = Instant::now();
    let started_at = SystemTime::now();
    // Taken before anything is written: a second run of the job exits 7 and writes nothing.
    let worker = context.worker.is_some();
    let mut lock = match context.db.lock(&job.name, worker).await {
        Ok(lock) => lock,
        Err(error) => {
            tracing::warn!(job = %job.name, error = %error, "job not run");
            return Ok(JobReport {
                job: job.name.clone(),
                run_id,
                counts: Counts::default(),
                error: Some(error),
                status: "locked",
                finished_at: SystemTime::now(),
                duration: started.elapsed(),
                watermark: None,
                worker,
            });
        }
    };
    context.db.start_run(&run_id, &job.name, !worker).await?;
    // Other workers may be writing objects right now: only a single run may sweep.
    if let Some(objects) = context.objects.clone().filter(|_| !worker) {
        // A directory walk: kept off the async workers.
        let collections = job.collections.clone();
        let swept = tokio::task::spawn_blocking(move || objects.sweep_staging(&collections)).await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => {
                tracing::info!(job = %job.name, removed, "removed half-written objects of a killed run");
            }
            Ok(Err(e)) => {
                tracing::warn!(job = %job.name, error = %e, "could not clean the object folder")
            }
            Err(e) => tracing::warn!(job = %job.name, error = %e, "the folder clean-up failed"),
        }
    }
    let before = snapshot(&context.stats);
    let mut counts = Counts::default();
    let mut report = PassReport::default();
    let result = passes(context, job, &mut lock, &run_id, &mut counts, &mut report).await;
    if worker {
        // Partitions this worker leaves unfinished (it failed or was stopped) go to the other
        // workers now rather than when the lease expires.
        match context.db.release(&job.name, &run_id).await {
            Ok(0) => {}
            Ok(released) => {
                tracing::info!(job = %job.name, released, "gave up unfinished partitions to other workers")
            }
            Err(e) => {
                tracing::warn!(job = %job.name, error = %e, "could not give up the partition leases; they expire")
            }
        }
    }
    let after = snapshot(&context.stats);
    counts.retries = after.0 - before.0;
    counts.token_renewals = after.1 - before.1;

    let status = match &result {
        Err(Error::Stopped) => "interrupted",
        Err(_) => "failed",
        Ok(()) if counts.quarantined > 0 => "partial",
        Ok(()) => "succeeded",
    };
    let error = result.err();
    let message = error.as_ref().map(ToString::to_string);
    context
        .db
        .finish_run(&run_id, status, &counts, message.as_deref())
        .await?;
    // Now rather than when the server notices the connection close: a daemon's next run of
    // the job may start at once.
    if let Err(e) = lock.release().await {
        tracing::warn!(job = %job.name, error = %e, "could not release the job's lock; it goes with the connection");
    }
    let elapsed = started.elapsed();
    let items = counts.new + counts.changed + counts.unchanged;
    let rate = items as f64 / elapsed.as_secs_f64().max(1e-9);
    if let Some(objects) = &context.objects {
        let manifest = serde_json::json!({
            "run_id": run_id,
            "job": job.name,
            "strategy": report.strategy,
            "watermark_before": report.watermark_before,
            "watermark_after": report.watermark_after,
            "reconciled": report.reconciled,
            "partitions": report.partitions,
            "status": status,
            "counts": counts,
            "started_at": humantime::format_rfc3339_millis(started_at).to_string(),
            "duration_seconds": elapsed.as_secs_f64(),
            "error": message,
        });
        if let Err(e) = objects
            .put_manifest(&run_id, bytes::Bytes::from(manifest.to_string()))
            .await
        {
            tracing::warn!(error = %e, "could not write the run manifest");
        }
    }
    tracing::info!(
        job = %job.name, run_id = %run_id, status,
        pages = counts.pages, new = counts.new, changed = counts.changed,
        unchanged = counts.unchanged, quarantined = counts.quarantined,
        duplicate = counts.duplicate, retries = counts.retries,
        token_renewals = counts.token_renewals,
        duration_s = format!("{:.3}", elapsed.as_secs_f64()),
        items_per_s = format!("{rate:.0}"),
        error = message.as_deref().unwrap_or(""),
        "run finished"
    );
    let watermark = match &report.watermark_after {
        Some(mark) => Some(mark.clone()),
        None => report.watermark_before.clone(),
    };
    if context.progress {
        eprintln!(
            "{}: {status}: {} new, {} changed, {} unchanged, {} deleted, {} quarantined in {:.1} s ({rate:.0} items/s){}",
            job.name,
            counts.new,
            counts.changed,
            counts.unchanged,
            counts.deleted,
            counts.quarantined,
            elapsed.as_secs_f64(),
            message
                .as_deref()
                .map(|m| format!("; {m}"))
                .unwrap_or_default()
        );
    }
    Ok(JobReport {
        job: job.name.clone(),
        run_id,
        counts,
        error,
        status,
        finished_at: SystemTime::now(),
        duration: elapsed,
        watermark,
        worker,
    })
}

fn snapshot(stats: &Stats) -> (u64, u64) {
    (
        Stats::get(&stats.retries),
        Stats::get(&stats.token_renewals),
    )
}

/// What a job's passes did, for the run manifest.
#[derive(Debug, Default)]
struct PassReport {
    strategy: Option<Strategy>,
    watermark_before: Option<String>,
    watermark_after: Option<String>,
    reconciled: bool,
    partitions: Vec<serde_json::Value>,
}

/// The job's sync pass (resumed if a killed run left one, else planned from the watermark),
/// then its reconcile pass if one is asked for, due, or left unfinished.
async fn passes(
    context: &Context,
    job: &Job,
    lock: &mut JobLock,
    run_id: &str,
    counts: &mut Counts,
    report: &mut PassReport,
) -> Result<(), Error> {
    let root = context.api.root();
    let search_hash = search_hash(job);
    let worker = context.worker.is_some();
    if worker {
        // Workers plan one at a time: the first plans the pass, the others find it planned.
        // (Should this fail, the lock goes with the job lock's connection when the run ends.)
        lock.lock_planner().await?;
    }
    let state = context.db.job_state(&job.name).await?;
    let changed = state.as_ref().is_some_and(|s| s.query_hash != search_hash);
    if changed {
        tracing::info!(job = %job.name, "the job's search changed since its last run: starting over with a full pass");
    }
    let state = state.filter(|_| !changed).unwrap_or_default();
    report.watermark_before = state.watermark.clone();
    let mut caps = None;

    let mut planned = if changed {
        Vec::new()
    } else {
        context.db.planned(&job.name, PassKind::Sync).await?
    };
    if planned.is_empty() {
        let watermark = state.watermark.as_deref();
        let offered = if watermark.is_some() && job.incremental == Incremental::Auto {
            capabilities(context, &mut caps).await?
        } else {
            Capabilities::default()
        };
        let strategy = plan::strategy(job, watermark, &offered);
        let now = SystemTime::now();
        let parts = plan::sync_parts(root, job, strategy, watermark, now);
        store_plan(
            context,
            job,
            PassKind::Sync,
            &search_hash,
            changed,
            now,
            &parts,
        )
        .await?;
        report.strategy = Some(strategy);
        tracing::info!(job = %job.name, strategy = ?strategy, watermark = watermark.unwrap_or("none"),
            partitions = parts.len(), "planned a sync pass");
        planned = context.db.planned(&job.name, PassKind::Sync).await?;
    } else {
        tracing::info!(job = %job.name, partitions = planned.len(),
            left = planned.iter().filter(|p| !p.done).count(), "resuming an unfinished sync pass");
    }
    if worker {
        lock.unlock_planner().await?;
    }
    pass(
        context,
        job,
        lock,
        run_id,
        &planned,
        (PassKind::Sync, Mode::Sync),
        counts,
        report,
    )
    .await?;
    if worker {
        lock.lock_planner().await?;
    }
    let started = context
        .db
        .job_state(&job.name)
        .await?
        .and_then(|s| s.pass_started_at)
        .and_then(|at| plan::parse_instant(&at))
        .unwrap_or_else(SystemTime::now);
    let watermark = plan::next_watermark(started, job.safety_lag);
    let ended = context.db.finish_sync_pass(&job.name, &watermark).await?;
    if worker {
        lock.unlock_planner().await?;
    }
    if ended {
        report.watermark_after = Some(watermark);
    } else {
        tracing::info!(job = %job.name,
            "the pass's last partitions were another worker's: that worker ends the pass");
    }
    if worker {
        if context.reconcile || job.reconcile_every.is_some() {
            tracing::info!(job = %job.name, "workers do not reconcile: reconcile with one \
                `stac-sync run --reconcile` without --worker");
        }
        return Ok(());
    }

    let mut planned = context.db.planned(&job.name, PassKind::Reconcile).await?;
    let due = context.reconcile
        || job.reconcile_every.is_some_and(|every| {
            state
                .reconciled_at
                .as_deref()
                .and_then(plan::parse_instant)
                .and_then(|at| at.elapsed().ok())
                .is_none_or(|age| age >= every)
        });
    if planned.is_empty() && !due {
        return Ok(());
    }
    if job.query.is_some() || job.filter.is_some() || job.intersects.is_some() {
        return Err(Error::Config(format!(
            "job {}: reconcile cannot tell which stored items a query, filter or intersects \
             geometry selects, so it cannot tell what vanished; reconcile a job that selects \
             by collection, datetime and bbox only",
            job.name
        )));
    }
    if planned.is_empty() {
        let offered = capabilities(context, &mut caps).await?;
        let now = SystemTime::now();
        let parts = plan::reconcile_parts(root, job, offered.fields, now);
        store_plan(
            context,
            job,
            PassKind::Reconcile,
            &search_hash,
            false,
            now,
            &parts,
        )
        .await?;
        tracing::info!(job = %job.name, ids_only = offered.fields, partitions = parts.len(),
            "planned a reconcile pass");
        planned = context.db.planned(&job.name, PassKind::Reconcile).await?;
    }
    let ids_only = planned.iter().any(|p| asks_ids_only(&p.first));
    let mode = Mode::Reconcile { ids_only };
    let kind = (PassKind::Reconcile, mode);
    pass(context, job, lock, run_id, &planned, kind, counts, report).await?;

    let scopes = scopes(job);
    let mut vanished = Vec::new();
    for scope in &scopes {
        vanished.extend(context.db.vanished(&job.name, scope).await?);
    }
    for (collection, id) in &vanished {
        tracing::info!(job = %job.name, collection, id, "item deleted upstream: tombstoned");
        if let (DeletedObjects::Delete, Some(objects)) = (job.deleted_objects, &context.objects) {
            // Before the tombstones commit: a kill in between leaves live rows whose objects
            // are gone, which the next reconcile finds again and finishes.
            objects.delete_item(collection, id).await?;
        }
    }
    lock.check().await?;
    let now = plan::rfc3339(SystemTime::now());
    context
        .db
        .finish_reconcile(&job.name, &scopes, &now)
        .await?;
    counts.deleted += vanished.len() as u64;
    report.reconciled = true;
    Ok(())
}

/// Stores a pass's plan.
async fn store_plan(
    context: &Context,
    job: &Job,
    kind: PassKind,
    search_hash: &str,
    search_changed: bool,
    now: SystemTime,
    parts: &[plan::Part],
) -> Result<(), Error> {
    let partitions: Vec<(String, String, Request)> = parts
        .iter()
        .map(|p| (p.name.clone(), p.collection.clone(), p.first.clone()))
        .collect();
    context
        .db
        .plan(PlanCommit {
            job: &job.name,
            kind,
            search_hash,
            search_changed,
            started_at: &plan::rfc3339(now),
            partitions: &partitions,
        })
        .await
}

/// What the server offers; asked once per run, and only when a plan needs it.
async fn capabilities(
    context: &Context,
    cache: &mut Option<Capabilities>,
) -> Result<Capabilities, Error> {
    if let Some(caps) = cache {
        return Ok(*caps);
    }
    let caps = capabilities_of(&context.api).await?;
    tracing::info!(
        sort = caps.sort,
        filter = caps.filter,
        fields = caps.fields,
        updated_queryable = caps.updated_queryable,
        "what the STAC API offers"
    );
    *cache = Some(caps);
    Ok(caps)
}

/// Whether a request asks only for ids (Fields extension).
fn asks_ids_only(request: &Request) -> bool {
    match &request.body {
        Some(body) => body.get("fields").is_some(),
        None => request.url.query_pairs().any(|(k, _)| k == "fields"),
    }
}

/// The stored items a reconcile of `job` answers for: per collection, within its datetime range
/// and bbox.
fn scopes(job: &Job) -> Vec<Scope<'_>> {
    let (start, end) = match job.datetime.as_deref() {
        None => (None, None),
        Some(range) => match range.split_once('/') {
            Some((s, e)) => (
                (!matches!(s, "" | "..")).then_some(s),
                (!matches!(e, "" | "..")).then_some(e),
            ),
            None => (Some(range), Some(range)),
        },
    };
    let bbox = job.bbox.as_deref().and_then(|b| match b {
        [x0, y0, x1, y1] | [x0, y0, _, x1, y1, _] => Some([*x0, *y0, *x1, *y1]),
        _ => None,
    });
    job.collections
        .iter()
        .map(|collection| Scope {
            collection,
            start,
            end,
            bbox,
        })
        .collect()
}

/// Pages the unfinished partitions of a planned pass concurrently (under the API client's cap
/// on requests in flight), each from its resume point, into one writer. A worker pages only the
/// partitions it claims (see [`page_leased`]).
#[allow(clippy::too_many_arguments)]
async fn pass(
    context: &Context,
    job: &Job,
    lock: &mut JobLock,
    run_id: &str,
    planned: &[Planned],
    (kind, mode): (PassKind, Mode),
    counts: &mut Counts,
    report: &mut PassReport,
) -> Result<(), Error> {
    report.partitions.extend(
        planned
            .iter()
            .map(|p| serde_json::json!({"name": p.name, "query": p.first})),
    );
    let lease = context.worker.map(|ttl| Lease { owner: run_id, ttl });
    let budget = &Budget::new();
    let (tx, mut rx) = mpsc::channel::<Fetched>(PARTS_BUFFERED);
    let finished = AtomicUsize::new(planned.iter().filter(|p| p.done).count());
    let bar = context.progress.then(|| progress_bar(job, mode));
    let finished = &finished;
    // The pagers' driver owns the sender, so the writer sees the channel close when it ends.
    let pagers = async move {
        match lease {
            None => page_all(context, job, planned, budget, tx, finished).await,
            Some(lease) => page_leased(context, job, kind, lease, budget, tx, finished).await,
        }
    };
    let at_once = commits_at_once(&context.db, mode);
    // Two stages, so that the objects of one page are written while the page before commits.
    let (ready_tx, mut ready_rx) = mpsc::channel::<(Prepared, OwnedSemaphorePermit)>(1);
    // What the pages prepared and not yet committed write.
    let ahead = &Ahead::default();
    let preparer = async move {
        let mut seq = 0;
        while let Some((partition, request, page, held)) = rx.recv().await {
            // A page is prepared only once the committer has room for it: one page ahead at
            // most, so objects run ahead of the rows they belong to by one page (by two on
            // Postgres, where the committer may hold a page until its partition's page before
            // has committed).
            let Ok(slot) = ready_tx.reserve().await else {
                // The committer stopped (and reports why).
                break;
            };
            let prepared =
                prepare_page(context, mode, partition, request, page, ahead, seq).await?;
            seq += 1;
            // The page's share of the budget goes with it, and back when it has committed.
            slot.send((prepared, held));
        }
        Ok::<(), Error>(())
    };
    // Each stage owns its receiver, so that a stage that fails drops it and the stage before
    // stops instead of waiting forever to hand over a page.
    let shown = bar.as_ref();
    let commit = |prepared: Prepared, held: OwnedSemaphorePermit| async move {
        let mut added = Counts::default();
        let committed =
            commit_prepared(context, job, run_id, lease, mode, &prepared, &mut added).await;
        (committed, added, prepared, held)
    };
    let committer = async move {
        let mut running = futures_util::stream::FuturesUnordered::new();
        let mut claims: Vec<Claim> = Vec::new();
        // A page taken from the preparer that waits for a commit in progress to end.
        let mut waiting: Option<(Prepared, OwnedSemaphorePermit, Claim)> = None;
        let mut open = true;
        loop {
            if let Some((prepared, held, claim)) = waiting.take() {
                if prepared.partition.lost.is_cancelled() {
                    // Dropped: the partition goes on elsewhere from its last commit.
                    ahead.forget(prepared.seq);
                } else if claims.len() < at_once && !claims.iter().any(|c| c.meets(&claim)) {
                    lock.check().await?;
                    running.push(commit(prepared, held));
                    claims.push(claim);
                } else {
                    waiting = Some((prepared, held, claim));
                }
            }
            let done = if waiting.is_none() && open && claims.len() < at_once {
                tokio::select! {
                    ready = ready_rx.recv() => {
                        match ready {
                            Some((prepared, held)) => {
                                let claim = Claim::of(&prepared);
                                waiting = Some((prepared, held, claim));
                            }
                            None => open = false,
                        }
                        continue;
                    }
                    Some(done) = running.next() => done,
                }
            } else {
                match running.next().await {
                    Some(done) => done,
                    None if waiting.is_none() => break,
                    None => continue,
                }
            };
            let (committed, added, prepared, _held) = done;
            claims.retain(|c| c.id != prepared.seq);
            ahead.forget(prepared.seq);
            match committed {
                Err(Error::LeaseLost { partition }) => {
                    tracing::warn!(job = %job.name, partition = %partition,
                        "another worker took this partition over (this worker's lease on it \
                         expired); it goes on from the last committed page");
                    prepared.partition.lost.cancel();
                    continue;
                }
                committed => committed?,
            }
            *counts += &added;
            if let Some(bar) = shown {
                bar.inc(prepared.page.items.len() as u64);
                bar.set_message(format!(
                    "{}/{} partitions done",
                    finished.load(Ordering::Relaxed),
                    planned.len()
                ));
            }
        }
        Ok::<(), Error>(())
    };
    let (mut errors, prepared, written) = tokio::join!(pagers, preparer, committer);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    written?;
    prepared?;
    match errors.iter().position(|e| matches!(e, Error::Stopped)) {
        Some(stopped) => Err(errors.swap_remove(stopped)),
        None if errors.is_empty() => Ok(()),
        None => Err(errors.swap_remove(0)),
    }
}

/// Pages committed at once. Postgres parses each item into `jsonb` on the backend that commits
/// it, so two commits keep two backends (and cores) busy. SQLite has one writer, and the pages
/// of a reconcile all insert into `sync_seen`, so they commit one at a time.
fn commits_at_once(db: &Database, mode: Mode) -> usize {
    match (db, mode) {
        (Database::Postgres(_), Mode::Sync) => 2,
        _ => 1,
    }
}

/// What a commit in progress writes. Pages of one partition commit in order, so that its resume
/// point only moves on; only the parts of one page before its last may commit at once (each
/// leaves the resume point at that page). Pages that write the same item commit in order, so
/// that its row ends as its object does and the two transactions never wait on each other.
struct Claim {
    /// The page's [`Prepared::seq`].
    id: u64,
    partition: Arc<Partition>,
    /// The last part of its page (or the whole page): it moves the resume point on.
    ends_page: bool,
    /// The written items' `(collection, id)`, hashed: a collision only makes a page wait.
    items: HashSet<u64>,
}

impl Claim {
    fn of(prepared: &Prepared) -> Claim {
        let items = prepared
            .changed
            .iter()
            .map(|(at, _)| {
                let item = &prepared.page.items[*at];
                let mut hasher = std::hash::DefaultHasher::new();
                std::hash::Hash::hash(&(&item.collection, &item.id), &mut hasher);
                std::hash::Hasher::finish(&hasher)
            })
            .collect();
        Claim {
            id: prepared.seq,
            partition: prepared.partition.clone(),
            ends_page: prepared.page.whole,
            items,
        }
    }

    /// Whether the two must commit one after the other.
    fn meets(&self, other: &Claim) -> bool {
        (Arc::ptr_eq(&self.partition, &other.partition) && (self.ends_page || other.ends_page))
            || !self.items.is_disjoint(&other.items)
    }
}

/// A page, or a part of one, on its way to the writer with the request that fetched it and its
/// share of the budget.
type Fetched = (Arc<Partition>, Request, Page, OwnedSemaphorePermit);

/// Pages every unfinished partition of the plan at once (a single run holds the job alone);
/// returns the pagers' errors.
async fn page_all(
    context: &Context,
    job: &Job,
    planned: &[Planned],
    budget: &Budget,
    tx: mpsc::Sender<Fetched>,
    finished: &AtomicUsize,
) -> Vec<Error> {
    let pagers = planned.iter().filter(|p| !p.done).map(|planned| {
        let tx = tx.clone();
        async move {
            let partition = Arc::new(Partition::of(job, planned));
            let paged = page_partition(context, partition, budget, tx).await;
            finished.fetch_add(1, Ordering::Relaxed);
            paged
        }
    });
    let paged = futures_util::future::join_all(pagers).await;
    paged.into_iter().filter_map(Result::err).collect()
}

/// A worker's pagers: claims partitions of the pass under `lease`, as many at a time as the cap
/// on requests in flight, renews the lease (every third of its period, or second), and takes over partitions
/// whose worker let the lease expire. Ends when every partition is done or is this worker's
/// (its last pages then wait only for the writer); after an error, claims nothing more.
async fn page_leased(
    context: &Context,
    job: &Job,
    kind: PassKind,
    lease: Lease<'_>,
    budget: &Budget,
    tx: mpsc::Sender<Fetched>,
    finished: &AtomicUsize,
) -> Vec<Error> {
    let mut running = futures_util::stream::FuturesUnordered::new();
    let mut errors = Vec::new();
    // Renews well inside the lease, and looks for expired leases (or the pass's end) at least
    // every second.
    let mut tick = tokio::time::interval((lease.ttl / 3).min(std::time::Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while errors.is_empty() && running.len() < context.slots && !context.stop.is_cancelled() {
            match context.db.claim(&job.name, kind, &lease).await {
                Ok(Some(planned)) => {
                    tracing::info!(job = %job.name, partition = %planned.name,
                        resumed = planned.resume.is_some(), "claimed a partition");
                    let partition = Arc::new(Partition::of(job, &planned));
                    let tx = tx.clone();
                    running.push(async move {
                        let paged = page_partition(context, partition, budget, tx).await;
                        finished.fetch_add(1, Ordering::Relaxed);
                        paged
                    });
                }
                Ok(None) => break,
                Err(e) => errors.push(e),
            }
        }
        if running.is_empty() {
            if !errors.is_empty() {
                break;
            }
            match context
                .db
                .unfinished_elsewhere(&job.name, kind, lease.owner)
                .await
            {
                Ok(0) => break,
                Ok(left) => tracing::debug!(job = %job.name, left,
                    "waiting on other workers' partitions (taken over if their lease expires)"),
                Err(e) => {
                    errors.push(e);
                    break;
                }
            }
        }
        tokio::select! {
            Some(paged) = running.next(), if !running.is_empty() => {
                if let Err(e) = paged {
                    errors.push(e);
                }
            }
            _ = tick.tick() => {
                if let Err(e) = context.db.renew(&job.name, &lease).await {
                    // Commits check the lease themselves; a worker that cannot renew for a
                    // whole period loses its partitions to others, and nothing is written twice.
                    tracing::warn!(job = %job.name, error = %e, "could not renew the partition leases");
                }
            }
            () = context.stop.cancelled(), if running.is_empty() => {
                errors.push(Error::Stopped);
                break;
            }
        }
    }
    errors
}

/// A spinner with items, items/s and partitions done, for a person at a terminal.
fn progress_bar(job: &Job, mode: Mode) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} {prefix}: {human_pos} items, {per_sec}, {msg} [{elapsed}]",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_prefix(match mode {
        Mode::Sync => job.name.clone(),
        Mode::Reconcile { .. } => format!("{} (reconcile)", job.name),
    });
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Pages one partition from its start to its last page, handing each page to the writer in
/// parts as it arrives.
async fn page_partition(
    context: &Context,
    partition: Arc<Partition>,
    budget: &Budget,
    tx: mpsc::Sender<Fetched>,
) -> Result<(), Error> {
    let mut request = partition.start.clone();
    let mut seen = HashSet::new();
    let mut number = 0u64;
    loop {
        number += 1;
        if !seen.insert(fingerprint(&request)) {
            return Err(Error::Upstream(format!(
                "the API's next link for page {number} of {} repeats an earlier request ({}); \
                 its paging is broken, so the pass stops here instead of looping",
                partition.name,
                http::display_url(&request.url)
            )));
        }
        let mut reading = PageRead {
            budget,
            tx: &tx,
            partition: &partition,
            request: &request,
        };
        let fetch = context
            .api
            .fetch_streamed("search page", &request, &mut reading);
        // On SIGTERM the page in flight is abandoned (its retries too); parts already handed
        // over are still committed by the writer.
        let handed = tokio::select! {
            biased;
            () = context.stop.cancelled() => return Err(Error::Stopped),
            // Another worker has it now.
            () = partition.lost.cancelled() => return Ok(()),
            handed = fetch => handed,
        };
        let handed = match handed {
            // Paging tokens go stale (the boundary item was deleted, the server restarted): a
            // refused resume point restarts the partition from its beginning, which idempotent
            // writes make safe.
            Err(Error::Config(why)) if number == 1 && request != partition.first => {
                tracing::warn!(partition = %partition.name, reason = %why,
                    "the API refused the stored resume point; restarting the partition");
                request = partition.first.clone();
                seen.clear();
                number = 0;
                continue;
            }
            other => other?,
        };
        match handed {
            // The writer stopped (and reports why), or that was the partition's last page.
            None | Some(None) => return Ok(()),
            Some(Some(next)) => request = next,
        }
    }
}

/// Reads a page as it arrives and hands it to the writer in parts.
struct PageRead<'a> {
    budget: &'a Budget,
    tx: &'a mpsc::Sender<Fetched>,
    partition: &'a Arc<Partition>,
    request: &'a Request,
}

impl PageRead<'_> {
    /// Hands a page, or a part of it, to the writer with its share of the budget; `false` if
    /// the writer stopped.
    async fn hand_over(&self, page: Page) -> bool {
        let Ok(held) = self.budget.take(page.bytes.div_ceil(1024)).await else {
            return false;
        };
        self.tx
            .send((self.partition.clone(), self.request.clone(), page, held))
            .await
            .is_ok()
    }
}

impl http::ReadBody for PageRead<'_> {
    /// Once the whole page is handed over: the request its `next` link asks for (`None` at the
    /// partition's end). `None` if the writer stopped.
    type Output = Result<Option<Option<Request>>, String>;

    fn read(
        &mut self,
        mut response: reqwest::Response,
    ) -> futures_util::future::BoxFuture<'_, Self::Output> {
        Box::pin(async move {
            // A retry reads the page again from its start, and hands over its first parts
            // again: their items are then unchanged.
            let mut reader = PageReader::new(Some(&self.partition.collection));
            loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => reader.push(&bytes)?,
                    Ok(None) => break,
                    Err(e) => return Err(format!("body: {}", http::describe(&e))),
                }
                if reader.part_bytes() >= PART_BYTES && !self.hand_over(reader.take_part()).await {
                    return Ok(None);
                }
            }
            // The last part is handed over with the request's permit still held, like the
            // others: a pager without a permit then holds no page, however many wait.
            let last = reader.finish(self.request)?;
            let next = last.next.clone();
            Ok(self.hand_over(last).await.then_some(next))
        })
    }
}

/// A page whose objects are written, ready to commit.
struct Prepared {
    /// Its place in the order pages were prepared.
    seq: u64,
    partition: Arc<Partition>,
    request: Request,
    page: Page,
    /// New and changed items: their index in `page.items`, and what the database held.
    changed: Vec<(usize, Known)>,
    /// Features to quarantine.
    rejected: Vec<Rejected>,
    /// Items stored already with this exact content.
    unchanged: u64,
}

/// The first half of writing a page: classifies its items and writes the objects of the new
/// and changed ones. It runs while the page before commits, so the object store and the
/// database work at the same time; a page's objects still precede its commit.
async fn prepare_page(
    context: &Context,
    mode: Mode,
    partition: Arc<Partition>,
    request: Request,
    page: Page,
    ahead: &Ahead,
    seq: u64,
) -> Result<Prepared, Error> {
    let mut prepared = Prepared {
        seq,
        partition,
        request,
        changed: Vec::new(),
        rejected: Vec::new(),
        unchanged: 0,
        page,
    };
    if mode == (Mode::Reconcile { ids_only: true }) {
        // Only ids were asked for: nothing to store.
        return Ok(prepared);
    }
    let page = &prepared.page;
    // The pages before may not have committed yet: what they write counts as stored. Read
    // before the database, as the committer forgets a page once it has committed: a page that
    // commits in between is then in one or the other.
    let pending = ahead.hashes(
        page.items
            .iter()
            .map(|item| (item.collection.clone(), item.id.clone())),
    );
    let mut known = context.db.classify(&page.items).await?;
    for ((item, known), pending) in page.items.iter().zip(known.iter_mut()).zip(pending) {
        if let Some(hash) = pending {
            *known = if hash == item.hash {
                Known::Unchanged
            } else {
                Known::Changed
            };
        }
    }
    prepared.rejected = page.rejected.clone();
    for (at, (item, known)) in page.items.iter().zip(known).enumerate() {
        if known == Known::Unchanged {
            prepared.unchanged += 1;
            continue;
        }
        // Refused before its object is written, so a refused item leaves nothing behind.
        if let Some(reason) = context.db.refuses(item) {
            prepared.rejected.push(Rejected {
                content: item.content.clone(),
                reason,
                collection: Some(item.collection.clone()),
                id: Some(item.id.clone()),
            });
            continue;
        }
        prepared.changed.push((at, known));
    }
    if let Some(objects) = &context.objects {
        let changed: Vec<(&Item, Known)> = prepared
            .changed
            .iter()
            .map(|(at, known)| (&page.items[*at], *known))
            .collect();
        objects.put_items(&changed).await?;
    }
    ahead.insert(
        seq,
        prepared
            .changed
            .iter()
            .map(|(at, _)| {
                let item = &page.items[*at];
                (
                    (item.collection.clone(), item.id.clone()),
                    item.hash.clone(),
                )
            })
            .collect(),
    );
    Ok(prepared)
}

/// What each page prepared and not yet committed writes, `(collection, id)` → content hash, by
/// [`Prepared::seq`]: the preparer adds a page, the committer forgets it once committed (pages may
/// commit out of order on Postgres).
#[derive(Default)]
struct Ahead(std::sync::Mutex<std::collections::BTreeMap<u64, Written>>);

type Written = std::collections::HashMap<(String, String), String>;

impl Ahead {
    fn pages(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Written>> {
        // Never held across an await, nor by code that can panic: a poisoned lock holds data
        // as good as any.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// For each key, the hash the latest of those pages writes for it.
    fn hashes(&self, keys: impl Iterator<Item = (String, String)>) -> Vec<Option<String>> {
        let pages = self.pages();
        keys.map(|key| {
            pages
                .values()
                .rev()
                .find_map(|page| page.get(&key).cloned())
        })
        .collect()
    }

    fn insert(&self, seq: u64, page: Written) {
        self.pages().insert(seq, page);
    }

    fn forget(&self, seq: u64) {
        self.pages().remove(&seq);
    }
}

/// The second half: rows + quarantine + resume point (+ the ids a reconcile saw) in one
/// transaction, then the counts.
async fn commit_prepared(
    context: &Context,
    job: &Job,
    run_id: &str,
    lease: Option<Lease<'_>>,
    mode: Mode,
    prepared: &Prepared,
    counts: &mut Counts,
) -> Result<(), Error> {
    let page = &prepared.page;
    let partition = &prepared.partition;
    let seen: Vec<(&str, &str)> = match mode {
        Mode::Sync => Vec::new(),
        Mode::Reconcile { .. } => page
            .items
            .iter()
            .map(|i| (i.collection.as_str(), i.id.as_str()))
            .chain(
                page.rejected
                    .iter()
                    .filter_map(|r| Some((r.collection.as_deref()?, r.id.as_deref()?))),
            )
            .collect(),
    };
    let changed: Vec<(&Item, Known)> = prepared
        .changed
        .iter()
        .map(|(at, known)| (&page.items[*at], *known))
        .collect();
    let page_url = http::display_url(&prepared.request.url);
    let refused = context
        .db
        .commit_page(PageCommit {
            run_id,
            job: &job.name,
            partition: &partition.name,
            query_hash: &partition.query_hash,
            items: changed.iter().map(|(item, _)| *item).collect(),
            rejected: &prepared.rejected,
            page_url: &page_url,
            // A part of a page: a restart fetches the page again.
            resume: if page.whole {
                page.next.as_ref()
            } else {
                Some(&prepared.request)
            },
            ends_page: page.whole,
            seen,
            lease,
        })
        .await?;
    for feature in prepared.rejected.iter().chain(&refused) {
        tracing::warn!(job = %job.name, page = %page_url,
            collection = feature.collection.as_deref().unwrap_or(""),
            id = feature.id.as_deref().unwrap_or(""), reason = %feature.reason, "feature quarantined");
    }
    for (item, known) in changed {
        let stored = !refused.iter().any(|r| {
            r.id.as_ref() == Some(&item.id) && r.collection.as_ref() == Some(&item.collection)
        });
        match (stored, known) {
            // The database refused a new item at commit time, after its object was written:
            // remove the object, so the folder holds exactly the items the database does.
            (false, Known::New) => {
                if let Some(objects) = &context.objects {
                    objects.delete_item(&item.collection, &item.id).await?;
                }
            }
            (false, _) => tracing::warn!(collection = %item.collection, id = %item.id,
                "the database kept the previous version of this item but its object holds the refused one"),
            (true, Known::New) => counts.new += 1,
            (true, _) => counts.changed += 1,
        }
    }
    counts.pages += u64::from(page.whole);
    counts.unchanged += prepared.unchanged;
    counts.quarantined += (prepared.rejected.len() + refused.len()) as u64;
    if mode != (Mode::Reconcile { ids_only: true }) {
        counts.duplicate += page.duplicates;
    }
    Ok(())
}

/// Identifies a job's search (not its paging or page size): a change starts over with a full
/// pass, since the watermark says nothing about items the old search did not select.
fn search_hash(job: &Job) -> String {
    let search = serde_json::json!([
        job.collections,
        job.bbox,
        job.intersects,
        job.datetime,
        job.query,
        job.filter
    ]);
    blake3::hash(search.to_string().as_bytes()).to_hex()[..16].to_string()
}

/// Identifies a request for repeat detection: method, URL and body.
fn fingerprint(request: &Request) -> String {
    format!(
        "{} {} {}",
        request.method,
        request.url,
        request
            .body
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    )
}

/// Identifies a job's search, so a resume point is used only for the search that stored it.
fn query_hash(first: &Request) -> String {
    blake3::hash(fingerprint(first).as_bytes()).to_hex()[..16].to_string()
}

fn new_run_id(job: &str) -> String {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let suffix: u32 = rand::rng().random();
    format!("{stamp}-{job}-{suffix:08x}")
}

#[cfg(test)]
mod tests {
    use super::{Ahead, Budget, PAGE_BUDGET_KIB};
    use futures_util::FutureExt;

    /// Pages commit out of order on Postgres: what a page still committing writes is known
    /// however many pages were prepared after it, and forgotten once it has committed.
    #[test]
    fn what_an_uncommitted_page_writes_is_known_until_it_commits() {
        let key = |id: &str| ("c".to_string(), id.to_string());
        let ahead = Ahead::default();
        ahead.insert(0, [(key("x"), "old".to_string())].into());
        for seq in 1..10 {
            ahead.insert(seq, [(key(&format!("y{seq}")), "h".to_string())].into());
            ahead.forget(seq);
        }
        let get = |k| ahead.hashes([k].into_iter()).pop().flatten();
        assert_eq!(get(key("x")).as_deref(), Some("old"));
        ahead.insert(10, [(key("x"), "new".to_string())].into());
        assert_eq!(get(key("x")).as_deref(), Some("new"));
        ahead.forget(10);
        ahead.forget(0);
        assert_eq!(get(key("x")), None);
    }

    #[tokio::test]
    async fn a_part_waits_for_its_share_and_a_huge_part_takes_the_whole_budget() {
        let budget = Budget::new();
        let big = budget.take(PAGE_BUDGET_KIB * 4).await.expect("budget");
        assert_eq!(big.num_permits(), PAGE_BUDGET_KIB);
        let mut next = std::pin::pin!(budget.take(1));
        assert!(
            (&mut next).now_or_never().is_none(),
            "waits while all is held"
        );
        drop(big);
        assert_eq!(next.await.expect("budget").num_permits(), 1);
    }
}
