//! A job's backfill through the API's bulk search (EDS): the job's search is submitted once per
//! collection as the pass is planned, and the exported files are read through the same
//! pipeline as pages, one batch of items at a time, each committed with the position it leaves
//! (see [`Position`]). A bulk search that fails, runs out of time or exports a file that cannot
//! be read is paged instead, with a warning; so is one that exported fewer items than its search
//! matched when it was submitted (see [`super::passes`]).

use super::Context;
use super::pager::{self, Budget, Fetched, Partition};
use crate::config::{Backfill, Job, SearchMethod};
use crate::error::Error;
use crate::mirror::db::Planned;
use crate::plan::Part;
use crate::stac::bulk::{self, ExportFormat, Outcome, Position, Status};
use crate::stac::http;
use crate::stac::reader::{Page, PageReader, parse_page};
use crate::stac::search::{self, Request, Shape};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Items handed to the writer at once: about 2 MB of 15 KB items, as a part of a page is.
const BATCH_ITEMS: usize = 128;

/// The bulk partitions of a job's backfill: for each collection whose search the API took, a
/// partition that reads its export. A collection whose search it did not take is left out, to be
/// paged (with a warning, or quietly where `backfill = "auto"` and the API has no bulk search).
pub(super) async fn submit_all(context: &Context, job: &Job) -> Result<Vec<Part>, Error> {
    let mut parts = Vec::new();
    if job.backfill == Backfill::Auto && bulk::offered(&context.api).await? == Some(false) {
        tracing::info!(job = %job.name, "the STAC API has no bulk search (GET search/bulk \
            answers 404): paging the backfill");
        return Ok(parts);
    }
    for collection in &job.collections {
        match submit(context, job, collection).await {
            Ok(part) => parts.push(part),
            Err(e @ Error::Auth(_)) => return Err(e),
            Err(Error::Refused { status, .. })
                if job.backfill == Backfill::Auto && matches!(status, 404 | 405 | 501) =>
            {
                tracing::info!(job = %job.name, collection, status,
                    "the STAC API has no bulk search: paging the backfill");
            }
            Err(e) => {
                tracing::warn!(job = %job.name, collection, error = %e,
                    "the bulk search could not be submitted: paging the backfill instead");
            }
        }
    }
    Ok(parts)
}

/// Counts the collection's items (so that an export that holds fewer is noticed), then submits
/// its search as a bulk search: the partition that reads the export.
async fn submit(context: &Context, job: &Job, collection: &str) -> Result<Part, Error> {
    let root = context.api.root();
    let collections = [collection.to_string()];
    let shape = Shape::of(job);
    let count = search::first_request(
        root,
        &Job {
            limit: 1,
            ..job.clone()
        },
        &collections,
        &shape,
    );
    let matched = context
        .api
        .fetch("count the search's items", &count, |bytes| {
            parse_page(&bytes, &count, Some(collection))
                .map(|page| page.matched)
                .map_err(|e| e.to_string())
        })
        .await?;
    let post = Job {
        method: SearchMethod::Post,
        ..job.clone()
    };
    let body = search::first_request(root, &post, &collections, &shape)
        .body
        .unwrap_or_default();
    if matched.is_none() {
        tracing::warn!(job = %job.name, collection, "the STAC API reports no match count \
            (numberMatched): an export short of items (one capped at the search's limit, say) \
            cannot be noticed, and is not paged instead");
    }
    let job_id = bulk::submit(&context.api, &body, ExportFormat::Stacjson).await?;
    tracing::info!(job = %job.name, collection, job_id, matched,
        "submitted the backfill as a bulk search");
    let position = Position {
        job_id,
        matched,
        file: 0,
        skip: 0,
    };
    Ok(Part {
        name: format!("{collection} bulk"),
        collection: collection.to_string(),
        first: position.request(root)?,
    })
}

/// Whether a planned partition reads a bulk search's export.
pub(super) fn is_bulk(context: &Context, planned: &Planned) -> bool {
    Position::of(context.api.root(), &planned.part.first).is_some()
}

/// Where a bulk partition is read: the job, its files and the pipeline's entrance.
pub(super) struct Feed<'a> {
    pub context: &'a Context,
    pub job: &'a Job,
    pub budget: &'a Budget,
    pub tx: &'a mpsc::Sender<Fetched>,
    /// The partitions that page the job's backfill, for a collection paged instead.
    pub fallback: &'a [Part],
}

impl Feed<'_> {
    /// Waits for the partition's bulk search and hands its files' items to the writer, from
    /// its position on; the partitions that page its collection instead, if it cannot be read.
    pub(super) async fn read(&self, planned: &Planned) -> Result<Vec<Planned>, Error> {
        let partition = Arc::new(Partition::of(self.job, planned));
        let Some(start) = Position::of(self.context.api.root(), &partition.start) else {
            return Err(Error::Internal(format!(
                "partition {} reads no bulk search",
                planned.part.name
            )));
        };
        let files = match self.files(&start).await? {
            Ok(files) => files,
            Err(why) => return self.page_instead(&partition, &why).await,
        };
        tracing::info!(job = %self.job.name, partition = %partition.part.name,
            files = files.len(), from_file = start.file, skip = start.skip,
            "reading the bulk search's files");
        match self.read_files(&partition, &start, files).await? {
            Some(why) => self.page_instead(&partition, &why).await,
            None => Ok(Vec::new()),
        }
    }

    /// Waits for the job: its files in the order a position counts them, or why its collection
    /// is paged instead.
    async fn files(&self, start: &Position) -> Result<Result<Vec<url::Url>, String>, Error> {
        let context = self.context;
        let waited = tokio::select! {
            () = context.stop.cancelled() => return Err(Error::Stopped),
            waited = bulk::wait(&context.api, &start.job_id, context.bulk, context.clock.as_ref()) => waited,
        };
        let mut files = match waited {
            Ok(Outcome::Completed(files)) => files,
            Ok(Outcome::Failed) => return Ok(Err("the API reports that it failed".into())),
            Ok(Outcome::TimedOut(status)) => {
                return Ok(Err(format!(
                    "it was still {status} after [bulk] timeout ({})",
                    humantime::format_duration(context.bulk.timeout)
                )));
            }
            // The API no longer knows the job (it expired since a killed run submitted it).
            Err(e @ Error::Refused { .. }) => return Ok(Err(e.to_string())),
            Err(e) => return Err(e),
        };
        sort(&mut files);
        if start.file > files.len() {
            return Ok(Err(format!(
                "it lists {} files where a run before this one committed {}",
                files.len(),
                start.file
            )));
        }
        Ok(Ok(files))
    }

    /// Hands the items of `files` over from `start` on, each file downloaded while the one
    /// before is read; why the collection is paged instead, if it is.
    async fn read_files(
        &self,
        partition: &Arc<Partition>,
        start: &Position,
        files: Vec<url::Url>,
    ) -> Result<Option<String>, Error> {
        let count = files.len();
        let files = std::sync::Mutex::new(files);
        let mut current = match start.file < count {
            true => match self.fetch(&files, start.file, &start.job_id).await? {
                Fetch::File(temp) => Some(temp),
                Fetch::Instead(why) => return Ok(Some(why)),
            },
            false => None,
        };
        for file in start.file..count {
            let Some(temp) = current.take() else { break };
            let at = Position {
                file,
                skip: if file == start.file { start.skip } else { 0 },
                ..start.clone()
            };
            let shown = files
                .lock()
                .ok()
                .and_then(|files| files.get(file).map(http::display_url))
                .unwrap_or_default();
            let failed = tokio_util::sync::CancellationToken::new();
            let read = async {
                let read = self.hand(partition, (&temp, &shown), at, count).await;
                if !matches!(read, Ok(Read::Done)) {
                    failed.cancel();
                }
                read
            };
            let ahead = async {
                if file + 1 == count {
                    return None;
                }
                tokio::select! {
                    () = failed.cancelled() => None,
                    fetched = self.fetch(&files, file + 1, &start.job_id) => Some(fetched),
                }
            };
            let (read, ahead) = tokio::join!(read, ahead);
            drop(temp);
            match read? {
                Read::Done => {}
                Read::WriterStopped => return Ok(None),
                Read::Unreadable(why) => return Ok(Some(why)),
            }
            current = match ahead.transpose()? {
                Some(Fetch::File(temp)) => Some(temp),
                Some(Fetch::Instead(why)) => return Ok(Some(why)),
                None => None,
            };
        }
        if start.file >= count {
            // An export of no files (or a position past the last): the partition ends with an
            // empty page.
            let end = Page {
                whole: true,
                matched: start.matched,
                ..Page::default()
            };
            let root = self.context.api.root();
            self.hand_over(partition, start.request(root)?, end).await;
        }
        Ok(None)
    }

    /// Downloads the `file`th of the job's files to a temporary file. A refused URL (presigned
    /// URLs expire: one listed when the job was read may be refused by the time its file comes)
    /// is asked of the job again, once.
    async fn fetch(
        &self,
        files: &std::sync::Mutex<Vec<url::Url>>,
        file: usize,
        job_id: &str,
    ) -> Result<Fetch, Error> {
        let listed = |files: &std::sync::Mutex<Vec<url::Url>>| {
            files
                .lock()
                .map_err(|_| Error::Internal("a bulk search's file list was poisoned".into()))
                .map(|files| files.get(file).cloned())
        };
        let Some(url) = listed(files)? else {
            return Err(Error::Internal(format!("a bulk search has no file {file}")));
        };
        let refused = match self.download(&url).await {
            Err(refused @ (Error::Refused { .. } | Error::Auth(_))) => refused,
            other => return other.map(Fetch::File),
        };
        tracing::info!(job = %self.job.name, file = %http::display_url(&url), reason = %refused,
            "a file's URL was refused (presigned URLs expire): asking the job for fresh ones");
        let count = files.lock().map(|files| files.len()).unwrap_or_default();
        match bulk::status(&self.context.api, job_id).await? {
            Status::Completed(mut fresh) if fresh.len() == count => {
                sort(&mut fresh);
                if let Ok(mut files) = files.lock() {
                    *files = fresh;
                }
            }
            _ => {
                return Ok(Fetch::Instead(format!(
                    "its file {} was refused ({refused}), and the job no longer lists the same \
                     files",
                    http::display_url(&url)
                )));
            }
        }
        let Some(url) = listed(files)? else {
            return Err(Error::Internal(format!("a bulk search has no file {file}")));
        };
        self.download(&url).await.map(Fetch::File)
    }

    /// Downloads one file to a temporary file.
    async fn download(&self, url: &url::Url) -> Result<tempfile::NamedTempFile, Error> {
        let shown = http::display_url(url);
        let temp = tempfile::Builder::new()
            .prefix("stac-sync-bulk-")
            .tempfile()
            .map_err(|e| {
                Error::Sink(format!(
                    "cannot create a temporary file for the bulk search file {shown} ({e}); set \
                     TMPDIR to a folder with space"
                ))
            })?;
        let mut to = tokio::fs::File::from_std(temp.reopen().map_err(|e| {
            Error::Sink(format!(
                "cannot open the temporary file {:?}: {e}",
                temp.path()
            ))
        })?);
        let size = tokio::select! {
            () = self.context.stop.cancelled() => return Err(Error::Stopped),
            size = bulk::download(&self.context.api, url, &mut to) => size?,
        };
        tracing::debug!(file = %shown, bytes = size, "downloaded a bulk search file");
        Ok(temp)
    }

    /// Hands a downloaded file's items over from `at` on, in batches, then an empty page that
    /// moves the position to the next file (or ends the partition after the last).
    async fn hand(
        &self,
        partition: &Arc<Partition>,
        (temp, shown): (&tempfile::NamedTempFile, &str),
        mut at: Position,
        files: usize,
    ) -> Result<Read, Error> {
        let (context, api) = (self.context, &self.context.api);
        let (batches, mut batch_rx) = mpsc::channel::<Vec<Bytes>>(2);
        let (path, name, skip) = (temp.path().to_path_buf(), shown.to_string(), at.skip);
        let reading = tokio::task::spawn_blocking(move || {
            bulk::read(
                &path,
                &name,
                ExportFormat::Stacjson,
                skip,
                BATCH_ITEMS,
                &mut |batch| batches.blocking_send(batch).map_err(|_| Error::Stopped),
            )
        });
        let mut stopped = false;
        while let Some(batch) = batch_rx.recv().await {
            if context.stop.is_cancelled() {
                stopped = true;
                break;
            }
            let request = at.request(api.root())?;
            at.skip += batch.len() as u64;
            let mut reader = PageReader::new(Some(&partition.part.collection))
                .with_max_item_bytes(context.max_item_bytes);
            for item in batch {
                reader.add_feature(item);
            }
            let page = Page {
                whole: true,
                next: Some(at.request(api.root())?),
                matched: at.matched,
                ..reader.take_part()
            };
            if !self.hand_over(partition, request, page).await {
                return Ok(Read::WriterStopped);
            }
        }
        drop(batch_rx);
        let read = reading
            .await
            .map_err(|e| Error::Internal(format!("reading {shown} failed: {e}")))?;
        if stopped {
            return Err(Error::Stopped);
        }
        match read {
            Ok(_) => {}
            Err(Error::Upstream(why)) => return Ok(Read::Unreadable(why)),
            Err(e) => return Err(e),
        }
        // The file is committed whole: the position moves to the next file.
        let request = at.request(api.root())?;
        let next = Position {
            file: at.file + 1,
            skip: 0,
            ..at.clone()
        };
        let end = Page {
            whole: true,
            next: (next.file < files)
                .then(|| next.request(api.root()))
                .transpose()?,
            matched: at.matched,
            ..Page::default()
        };
        Ok(match self.hand_over(partition, request, end).await {
            true => Read::Done,
            false => Read::WriterStopped,
        })
    }

    /// Hands a batch to the writer with its share of the budget; `false` if the writer stopped.
    async fn hand_over(&self, partition: &Arc<Partition>, request: Request, page: Page) -> bool {
        pager::hand_over(self.budget, self.tx, partition, request, page).await
    }

    /// Replaces the bulk partition by the partitions that page its collection.
    async fn page_instead(&self, partition: &Partition, why: &str) -> Result<Vec<Planned>, Error> {
        tracing::warn!(job = %self.job.name, partition = %partition.part.name, reason = why,
            "the bulk search cannot be read: paging its collection instead");
        page_instead(self.context, self.job, self.fallback, &partition.part).await
    }
}

/// Sorts a job's files by path: the order a position counts them in, whatever order the job
/// lists them in (their URLs' queries change from one listing to the next).
fn sort(files: &mut [url::Url]) {
    files.sort_by(|a, b| a.path().cmp(b.path()));
}

/// Replaces a bulk partition (`bulk`) by the partitions of `fallback` that page its
/// collection, in the plan; those partitions.
pub(super) async fn page_instead(
    context: &Context,
    job: &Job,
    fallback: &[Part],
    bulk: &Part,
) -> Result<Vec<Planned>, Error> {
    let parts: Vec<Part> = fallback
        .iter()
        .filter(|part| part.collection == bulk.collection)
        .cloned()
        .collect();
    context
        .mirror
        .db()
        .split(&job.name, &bulk.name, &parts, None)
        .await
}

/// A file downloaded, or why the collection is paged instead.
enum Fetch {
    File(tempfile::NamedTempFile),
    Instead(String),
}

/// How reading one file ended.
enum Read {
    /// Every item handed over.
    Done,
    /// The writer stopped (and reports why).
    WriterStopped,
    /// The file is not what its format says: why, naming it.
    Unreadable(String),
}
