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
use crate::plan;
use crate::plan::Part;
use crate::stac::http::{self, Failed, Sent};
use crate::stac::reader::{Page, PageReader};
use crate::stac::search::{PageSize, Request, fingerprint};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
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
    /// Its name, collection and first request.
    pub(super) part: Part,
    pub(super) start: Request,
    /// Split it when its search matches more items than this (0: never).
    max_items: u64,
    /// Cancelled when another worker took the partition over: this one stops paging it.
    pub(super) lost: CancellationToken,
}

impl Partition {
    /// A planned partition, to be paged from its resume point (or its first request).
    pub(super) fn of(job: &Job, planned: &Planned) -> Partition {
        if let Some(resume) = &planned.resume {
            tracing::info!(job = %job.name, partition = %planned.part.name,
                url = %http::display_url(&resume.url), "resuming a partition");
        }
        Partition {
            part: planned.part.clone(),
            start: planned
                .resume
                .clone()
                .unwrap_or_else(|| planned.part.first.clone()),
            max_items: job.max_partition_items,
            lost: CancellationToken::new(),
        }
    }

    /// The halves to page instead, if its first page says it matches more items than its
    /// job's `max_partition_items` and its window can be halved.
    async fn too_large(
        &self,
        context: &Context,
        job: &Job,
        lease: Option<&Lease<'_>>,
        matched: Option<u64>,
    ) -> Result<Option<Vec<Planned>>, Error> {
        let Some(matched) = matched.filter(|m| self.max_items > 0 && *m > self.max_items) else {
            return Ok(None);
        };
        let reason = format!(
            "it matches {matched} items, more than max_partition_items ({})",
            self.max_items
        );
        let halves = self.split(context, job, lease, &reason).await?;
        if halves.is_none() {
            tracing::info!(partition = %self.part.name, matched,
                "a partition over max_partition_items cannot be split further (its window is \
                 a second or has no start): paging it whole");
        }
        Ok(halves)
    }

    /// Replaces it by the halves of its datetime window (see [`plan::split`]), if it has a
    /// window that can be halved; the halves to page (`None`: it cannot be split).
    async fn split(
        &self,
        context: &Context,
        job: &Job,
        lease: Option<&Lease<'_>>,
        why: &str,
    ) -> Result<Option<Vec<Planned>>, Error> {
        let Some(halves) = plan::split(&self.part, std::time::SystemTime::now()) else {
            return Ok(None);
        };
        tracing::info!(job = %job.name, partition = %self.part.name, reason = why,
            halves = ?halves.iter().map(|half| half.name.as_str()).collect::<Vec<_>>(),
            "splitting a partition in two halves of its datetime window");
        let planned = context
            .mirror
            .db()
            .split(&job.name, &self.part.name, &halves, lease)
            .await?;
        Ok(Some(planned))
    }
}

/// A page, or a part of one, on its way to the writer with the request that fetched it and its
/// share of the budget.
pub(super) type Fetched = (Arc<Partition>, Request, Page, OwnedSemaphorePermit);

/// Pages every unfinished partition of the plan at once (a single run holds the job alone), and
/// the halves of those it splits; returns the pagers' errors.
pub(super) async fn page_all(
    context: &Context,
    job: &Job,
    planned: &[Planned],
    budget: &Budget,
    tx: mpsc::Sender<Fetched>,
    tally: &Tally,
) -> Vec<Error> {
    let page = |planned: Planned| {
        let tx = tx.clone();
        async move {
            let partition = Arc::new(Partition::of(job, &planned));
            let paged = page_partition(context, job, None, partition, budget, tx).await;
            tally.ended(&paged);
            paged
        }
    };
    let mut running: FuturesUnordered<_> = planned
        .iter()
        .filter(|p| !p.done)
        .cloned()
        .map(page)
        .collect();
    let mut errors = Vec::new();
    while let Some(paged) = running.next().await {
        match paged {
            Ok(halves) => running.extend(halves.into_iter().map(page)),
            Err(e) => errors.push(e),
        }
    }
    errors
}

/// Hands a page (or a part of one, or a batch of a bulk search's file) to the writer, with the
/// request that fetched it, once the budget has its share; `false` if the writer stopped.
pub(super) async fn hand_over(
    budget: &Budget,
    tx: &mpsc::Sender<Fetched>,
    partition: &Arc<Partition>,
    request: Request,
    page: Page,
) -> bool {
    let Ok(held) = budget.take(page.bytes.div_ceil(1024)).await else {
        return false;
    };
    tx.send((partition.clone(), request, page, held))
        .await
        .is_ok()
}

/// Partitions planned and ended in a pass, for its progress line and its counts of splits.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) finished: AtomicUsize,
    pub(super) added: AtomicUsize,
}

impl Tally {
    fn ended(&self, paged: &Result<Vec<Planned>, Error>) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        if let Ok(halves) = paged {
            self.added.fetch_add(halves.len(), Ordering::Relaxed);
        }
    }
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
    tally: &Tally,
) -> Vec<Error> {
    let mut running = FuturesUnordered::new();
    let mut errors = Vec::new();
    // Renews well inside the lease, and looks for expired leases (or the pass's end) at least
    // every second.
    let mut tick = tokio::time::interval((lease.ttl / 3).min(std::time::Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while errors.is_empty() && running.len() < context.slots && !context.stop.is_cancelled() {
            let claim = context.mirror.db().claim(&job.name, kind, &lease);
            let claimed =
                beside(&mut running, |paged| settle(job, paged, &mut errors), claim).await;
            match claimed {
                Ok(Some(planned)) => {
                    tracing::info!(job = %job.name, partition = %planned.part.name,
                        resumed = planned.resume.is_some(), "claimed a partition");
                    let partition = Arc::new(Partition::of(job, &planned));
                    let tx = tx.clone();
                    let lease = &lease;
                    running.push(async move {
                        // Its halves, if it splits, are claimed like any other partition.
                        let paged =
                            page_partition(context, job, Some(lease), partition, budget, tx).await;
                        tally.ended(&paged);
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
            Some(paged) = running.next(), if !running.is_empty() => settle(job, paged, &mut errors),
            _ = tick.tick() => {
                let renew = context.mirror.db().renew(&job.name, &lease);
                if let Err(e) = beside(&mut running, |paged| settle(job, paged, &mut errors), renew).await {
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

/// A worker's pager that ended: its error is the pass's, unless another worker took its
/// partition over.
fn settle(job: &Job, paged: Result<Vec<Planned>, Error>, errors: &mut Vec<Error>) {
    match paged {
        Err(Error::LeaseLost { partition }) => tracing::warn!(job = %job.name,
            partition = %partition, "another worker took this partition over \
            before it could be split; that worker pages it"),
        Err(e) => errors.push(e),
        Ok(_) => {}
    }
}

/// Awaits `work` (a claim, a renewal) while it drives the pagers in `running`, handing each one
/// that ends to `ended`. A pager that splits its partition holds the partition's row until it
/// commits, and renewing the worker's leases waits on that row: were the pagers left unpolled
/// meanwhile, the split would never commit and each would wait on the other for ever.
async fn beside<P: Future, T>(
    running: &mut FuturesUnordered<P>,
    mut ended: impl FnMut(P::Output),
    work: impl Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            biased;
            done = &mut work => return done,
            Some(paged) = running.next(), if !running.is_empty() => ended(paged),
        }
    }
}

/// Pages one partition from its start to its last page, handing each page to the writer in
/// parts as it arrives. A partition that matches more items than its job's
/// `max_partition_items`, or whose server fails on it past its first page, is split instead:
/// the halves of its window are returned, to be paged in its place.
async fn page_partition(
    context: &Context,
    job: &Job,
    lease: Option<&Lease<'_>>,
    partition: Arc<Partition>,
    budget: &Budget,
    tx: mpsc::Sender<Fetched>,
) -> Result<Vec<Planned>, Error> {
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
                partition.part.name,
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
            () = partition.lost.cancelled() => return Ok(Vec::new()),
            handed = page.fetch_within_deadline(context, &mut size) => handed,
        };
        let first = request == partition.part.first;
        let handed = match handed {
            // Paging tokens go stale (the boundary item was deleted, the server restarted): a
            // refused resume point restarts the partition from its beginning, which idempotent
            // writes make safe.
            Err(why) if why.is_rejected_request() && number == 1 && !first => {
                tracing::warn!(partition = %partition.part.name, reason = %why,
                    "the API refused the stored resume point; restarting the partition");
                request = partition.part.first.clone();
                seen.clear();
                number = 0;
                continue;
            }
            // Deep pages refused (a search engine's result window) or failing: the halves of
            // the window are shallower.
            Err(why @ (Error::Refused { .. } | Error::Unavailable { .. })) if !first => {
                let reason = format!("its server failed on a page past its first: {why}");
                match partition.split(context, job, lease, &reason).await? {
                    Some(halves) => return Ok(halves),
                    None => return Err(why),
                }
            }
            other => other?,
        };
        match handed {
            Read::WriterStopped | Read::Handed { next: None, .. } => return Ok(Vec::new()),
            Read::Handed {
                next: Some(next),
                matched,
            } => {
                if first
                    && let Some(halves) = partition.too_large(context, job, lease, matched).await?
                {
                    return Ok(halves);
                }
                request = next;
            }
        }
    }
}

/// What became of a page. (One per page, moved once: the size of a request is no matter.)
#[allow(clippy::large_enum_variant)]
enum Read {
    /// Handed over whole, with the request its `next` link asks for (`None`: the partition's
    /// last page) and the match count it reported.
    Handed {
        next: Option<Request>,
        matched: Option<u64>,
    },
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
        let request = self.request.clone();
        hand_over(self.budget, self.tx, self.partition, request, page).await
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
                self.partition.part.name,
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
                Err(why) => {
                    if why.timed_out() {
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
    /// A failure is the retry's to report (and, if it timed out, to ask for a smaller page).
    async fn read(&self, mut answer: Sent<'_>, context: &Context) -> Result<Read, Failed> {
        let mut reader = PageReader::new(Some(&self.partition.part.collection))
            .with_max_item_bytes(context.max_item_bytes);
        loop {
            match answer.response.chunk().await {
                Ok(Some(bytes)) => reader.push(&bytes).map_err(Failed::Page)?,
                Ok(None) => break,
                Err(source) => {
                    return Err(Failed::Transport {
                        status: None,
                        body: true,
                        source,
                    });
                }
            }
            if reader.part_bytes() >= PART_BYTES && !self.hand_over(reader.take_part()).await {
                return Ok(Read::WriterStopped);
            }
        }
        let last = reader.finish(self.request).map_err(Failed::Page)?;
        let (next, matched) = (last.next.clone(), last.matched);
        Ok(match self.hand_over(last).await {
            true => Read::Handed { next, matched },
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
