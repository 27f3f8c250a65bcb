//! The pager: pages a pass's partitions, each from its resume point along its `next` links, and
//! hands each page to the pipeline in parts as it arrives, within a byte budget.
//!
//! A single run pages every unfinished partition at once ([`page_all`]); a worker claims them
//! under leases and takes over those of workers that died ([`page_leased`]). All of them share
//! the API client's cap on requests in flight. A part is handed over with the request's permit
//! held, so a partition that waits for its turn holds no page.

use super::Context;
use crate::config::Job;
use crate::error::Error;
use crate::mirror::db::{Lease, PassKind, Planned};
use crate::stac::http::{self, Sent};
use crate::stac::reader::{Page, PageReader};
use crate::stac::search::{PageSize, Request, fingerprint};
use futures_util::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

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
pub(super) struct Budget {
    /// One permit per KiB.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Budget {
    pub(super) fn new() -> Budget {
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
pub(super) struct Partition {
    pub(super) name: String,
    collection: String,
    first: Request,
    start: Request,
    /// Cancelled when another worker took the partition over: this one stops paging it.
    pub(super) lost: CancellationToken,
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
            start: planned
                .resume
                .clone()
                .unwrap_or_else(|| planned.first.clone()),
            first: planned.first.clone(),
            lost: CancellationToken::new(),
        }
    }
}

/// A page, or a part of one, on its way to the writer with the request that fetched it and its
/// share of the budget.
pub(super) type Fetched = (Arc<Partition>, Request, Page, OwnedSemaphorePermit);

/// Pages every unfinished partition of the plan at once (a single run holds the job alone);
/// returns the pagers' errors.
pub(super) async fn page_all(
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
pub(super) async fn page_leased(
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
            match context.mirror.db().claim(&job.name, kind, &lease).await {
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
                .mirror
                .db()
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
                if let Err(e) = context.mirror.db().renew(&job.name, &lease).await {
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

/// Pages one partition from its start to its last page, handing each page to the writer in
/// parts as it arrives.
async fn page_partition(
    context: &Context,
    partition: Arc<Partition>,
    budget: &Budget,
    tx: mpsc::Sender<Fetched>,
) -> Result<(), Error> {
    let mut request = partition.start.clone();
    let mut size = PageSize::default();
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
        let page = PageRead {
            budget,
            tx: &tx,
            partition: &partition,
            request: &request,
        };
        // On SIGTERM the page in flight is abandoned (its retries too); parts already handed
        // over are still committed by the writer.
        let handed = tokio::select! {
            biased;
            () = context.stop.cancelled() => return Err(Error::Stopped),
            // Another worker has it now.
            () = partition.lost.cancelled() => return Ok(()),
            handed = page.fetch_within_deadline(context, &mut size) => handed,
        };
        let handed = match handed {
            // Paging tokens go stale (the boundary item was deleted, the server restarted): a
            // refused resume point restarts the partition from its beginning, which idempotent
            // writes make safe.
            Err(why) if why.is_rejected_request() && number == 1 && request != partition.first => {
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
            Read::WriterStopped | Read::Handed(None) => return Ok(()),
            Read::Handed(Some(next)) => request = next,
        }
    }
}

/// What became of a page. (One per page, moved once: the size of a request is no matter.)
#[allow(clippy::large_enum_variant)]
enum Read {
    /// Handed over whole, with the request its `next` link asks for (`None`: the partition's
    /// last page).
    Handed(Option<Request>),
    /// The writer stopped (and reports why).
    WriterStopped,
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

    /// [`PageRead::fetch`], within the API client's page deadline: a server that trickles its
    /// bytes never lets a read time out, and each attempt may take the whole request timeout.
    /// Parts handed over before the deadline are committed; the next run resumes at this page.
    async fn fetch_within_deadline(
        &self,
        context: &Context,
        size: &mut PageSize,
    ) -> Result<Read, Error> {
        let deadline = context.api.page_deadline();
        match tokio::time::timeout(deadline, self.fetch(context, size)).await {
            Ok(read) => read,
            Err(_) => Err(Error::Upstream(format!(
                "search page {} of partition {} was not read whole within [http] page_deadline \
                 ({}), all its attempts included: the API answers too slowly; the next run \
                 resumes from this page",
                http::display_url(&self.request.url),
                self.partition.name,
                humantime::format_duration(deadline)
            ))),
        }
    }

    /// Fetches the page and hands it over as it arrives. A body that fails (cut short, not an
    /// ItemCollection) is fetched again within the request's retries: its first parts are then
    /// handed over again, and their items found unchanged. A page too large for the server (it fails with 413, 502 or 504, or times out) is asked
    /// for again in smaller pages (`size`, kept for the partition's later pages).
    async fn fetch(&self, context: &Context, size: &mut PageSize) -> Result<Read, Error> {
        let shown = http::display_url(&self.request.url);
        let mut attempts = context.api.attempts("search page", &shown);
        loop {
            let answer = context
                .api
                .open(self.request, &mut attempts, Some(&mut *size))
                .await?;
            let status = answer.response.status();
            match self.read(answer, context).await {
                Ok(read) => return Ok(read),
                Err((why, timeout)) => {
                    if timeout {
                        size.halve(self.request);
                    }
                    attempts.retry(why, Some(status), None).await?;
                }
            }
        }
    }

    /// Reads the answer's page into parts and hands each over, the last one with the request's
    /// permit still held, like the others: a pager without a permit holds no page, however
    /// many wait.
    /// A failure is described for the retry, with whether it timed out.
    async fn read(&self, mut answer: Sent<'_>, context: &Context) -> Result<Read, (String, bool)> {
        let mut reader = PageReader::new(Some(&self.partition.collection))
            .with_max_item_bytes(context.max_item_bytes);
        loop {
            match answer.response.chunk().await {
                Ok(Some(bytes)) => reader.push(&bytes).map_err(|e| (e.to_string(), false))?,
                Ok(None) => break,
                Err(e) => return Err((format!("body: {}", http::describe(&e)), e.is_timeout())),
            }
            if reader.part_bytes() >= PART_BYTES && !self.hand_over(reader.take_part()).await {
                return Ok(Read::WriterStopped);
            }
        }
        let last = reader
            .finish(self.request)
            .map_err(|e| (e.to_string(), false))?;
        let next = last.next.clone();
        Ok(match self.hand_over(last).await {
            true => Read::Handed(next),
            false => Read::WriterStopped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Budget, PAGE_BUDGET_KIB};
    use futures_util::FutureExt;

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
