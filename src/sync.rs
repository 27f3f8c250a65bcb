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
use crate::config::{Config, Job};
use crate::db::{Counts, Database, JobLock, Known, PageCommit};
use crate::error::{Error, Exit};
use crate::http::{self, Stats};
use crate::objects::ObjectSink;
use crate::page::{self, Item, Page, Rejected};
use rand::Rng;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Pages buffered between the pager and the writer.
const PAGES_BUFFERED: usize = 4;
/// A slice of a job's search paged on its own, concurrently with the others, with its own
/// resume point: today one per collection (EDS partitions its database by collection and
/// recommends one query per collection); datetime windows come with incremental sync.
#[derive(Debug)]
struct Partition {
    name: String,
    collection: String,
    first: Request,
    query_hash: String,
}

fn partitions(root: &url::Url, job: &Job) -> Vec<Partition> {
    job.collections
        .iter()
        .map(|collection| {
            let first = page::first_request(root, job, std::slice::from_ref(collection));
            Partition {
                name: collection.clone(),
                collection: collection.clone(),
                query_hash: query_hash(&first),
                first,
            }
        })
        .collect()
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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            clock: MonotonicClock::shared(),
            migrate: true,
            stop: CancellationToken::new(),
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
}

impl Context {
    /// Opens the sinks and builds the API client. Fails before any page is fetched.
    pub async fn open(config: &Config, options: &RunOptions) -> Result<Context, Error> {
        let stats = Arc::new(Stats::default());
        let client = http::client(&config.http)
            .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
        let tokens = TokenSource::new(
            config.auth.clone(),
            client.clone(),
            config.http.retry.clone(),
            options.clock.clone(),
            stats.clone(),
        );
        let api = ApiClient::new(
            config.api_root.clone(),
            client,
            tokens,
            config.http.retry.clone(),
            stats.clone(),
            config.concurrency,
            config.headers.clone(),
        );
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
        })
    }

    /// The database.
    pub fn db(&self) -> &Database {
        &self.db
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
    let mut lock = match context.db.lock(&job.name).await {
        Ok(lock) => lock,
        Err(error) => {
            tracing::warn!(job = %job.name, error = %error, "job not run");
            return Ok(JobReport {
                job: job.name.clone(),
                run_id,
                counts: Counts::default(),
                error: Some(error),
            });
        }
    };
    context.db.start_run(&run_id, &job.name).await?;
    if let Some(objects) = context.objects.clone() {
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
    let partitions = partitions(context.api.root(), job);

    let mut counts = Counts::default();
    let result = pass(context, job, &mut lock, &run_id, &partitions, &mut counts).await;
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
    let elapsed = started.elapsed();
    let items = counts.new + counts.changed + counts.unchanged;
    let rate = items as f64 / elapsed.as_secs_f64().max(1e-9);
    if let Some(objects) = &context.objects {
        let manifest = serde_json::json!({
            "run_id": run_id,
            "job": job.name,
            "partitions": partitions
                .iter()
                .map(|p| serde_json::json!({"name": p.name, "query": p.first}))
                .collect::<Vec<_>>(),
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
    Ok(JobReport {
        job: job.name.clone(),
        run_id,
        counts,
        error,
    })
}

fn snapshot(stats: &Stats) -> (u64, u64) {
    (
        Stats::get(&stats.retries),
        Stats::get(&stats.token_renewals),
    )
}

/// One pass over the job's search: every partition paged concurrently (under the API client's
/// cap on requests in flight), each from its resume point if an earlier run left one, into one
/// writer.
async fn pass(
    context: &Context,
    job: &Job,
    lock: &mut JobLock,
    run_id: &str,
    partitions: &[Partition],
    counts: &mut Counts,
) -> Result<(), Error> {
    let (tx, mut rx) = mpsc::channel::<(usize, Request, Page)>(PAGES_BUFFERED);
    let mut pagers = Vec::with_capacity(partitions.len());
    for (index, partition) in partitions.iter().enumerate() {
        let start = match context
            .db
            .resume_point(&job.name, &partition.name, &partition.query_hash)
            .await?
        {
            Some(resume) => {
                tracing::info!(job = %job.name, partition = %partition.name,
                    url = %http::display_url(&resume.url), "resuming an unfinished pass");
                resume
            }
            None => partition.first.clone(),
        };
        pagers.push(page_partition(context, index, partition, start, tx.clone()));
    }
    // Only the pagers hold senders now, so the writer sees the channel close when they end.
    drop(tx);
    let writer = async {
        while let Some((index, request, page)) = rx.recv().await {
            lock.check().await?;
            let partition = &partitions[index];
            write_page(context, job, run_id, partition, &request, &page, counts).await?;
        }
        Ok::<(), Error>(())
    };
    let (paged, written) = tokio::join!(futures_util::future::join_all(pagers), writer);
    written?;
    let mut errors: Vec<Error> = paged.into_iter().filter_map(Result::err).collect();
    match errors.iter().position(|e| matches!(e, Error::Stopped)) {
        Some(stopped) => Err(errors.swap_remove(stopped)),
        None if errors.is_empty() => Ok(()),
        None => Err(errors.swap_remove(0)),
    }
}

/// Pages one partition from `start` to its last page, handing each page to the writer.
async fn page_partition(
    context: &Context,
    index: usize,
    partition: &Partition,
    start: Request,
    tx: mpsc::Sender<(usize, Request, Page)>,
) -> Result<(), Error> {
    let mut request = start;
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
        let fetch = context.api.fetch("search page", &request, |body| {
            page::parse_page(&body, &request, Some(&partition.collection))
        });
        // On SIGTERM the page in flight is abandoned (its retries too); pages already
        // fetched are still committed by the writer.
        let page = tokio::select! {
            biased;
            () = context.stop.cancelled() => return Err(Error::Stopped),
            page = fetch => page,
        };
        let page = match page {
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
        let next = page.next.clone();
        if tx.send((index, request, page)).await.is_err() {
            // The writer stopped (and reports why).
            return Ok(());
        }
        match next {
            Some(next) => request = next,
            None => return Ok(()),
        }
    }
}

/// Writes one page: objects first, then rows + quarantine + resume point in one transaction.
async fn write_page(
    context: &Context,
    job: &Job,
    run_id: &str,
    partition: &Partition,
    request: &Request,
    page: &Page,
    counts: &mut Counts,
) -> Result<(), Error> {
    let known = context.db.classify(&page.items).await?;
    let mut rejected = page.rejected.clone();
    let mut changed = Vec::new();
    for (item, known) in page.items.iter().zip(&known) {
        if *known == Known::Unchanged {
            counts.unchanged += 1;
            continue;
        }
        // Refused before its object is written, so a refused item leaves nothing behind.
        if let Some(reason) = context.db.refuses(item) {
            rejected.push(Rejected {
                content: item.content.clone(),
                reason,
                collection: Some(item.collection.clone()),
                id: Some(item.id.clone()),
            });
            continue;
        }
        changed.push((item, *known));
    }
    if let Some(objects) = &context.objects {
        objects.put_items(&changed).await?;
    }
    let to_write: Vec<&Item> = changed.iter().map(|(item, _)| *item).collect();
    let page_url = http::display_url(&request.url);
    let refused = context
        .db
        .commit_page(PageCommit {
            run_id,
            job: &job.name,
            partition: &partition.name,
            query_hash: &partition.query_hash,
            items: to_write,
            rejected: &rejected,
            page_url: &page_url,
            resume: page.next.as_ref(),
        })
        .await?;
    for feature in rejected.iter().chain(&refused) {
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
    counts.pages += 1;
    counts.quarantined += (rejected.len() + refused.len()) as u64;
    counts.duplicate += page.duplicates;
    Ok(())
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
