//! The pipeline of one pass: pager → stager → committer, joined by bounded channels so that a
//! slow database slows the pagers instead of filling memory.
//!
//! - the pagers ([`super::pager`]) fetch the partitions' pages and hand them over in parts;
//! - the stager has the mirror stage each part (classify it, write its objects) while the part
//!   before commits, one part ahead of the committer at most;
//! - the committer commits staged parts: one at a time, or two on Postgres, never two of one
//!   partition's pages nor two that write the same item at once ([`Claim`]).
//!
//! Each stage owns its receiver, so a stage that fails drops it and the stage before stops
//! instead of waiting forever to hand over a page.

use super::Context;
use super::bulk::{self, Feed};
use super::pager::{self, Budget, Fetched, Partition, Tally};
use crate::config::Job;
use crate::error::Error;
use crate::mirror::db::{Counts, JobLock, Lease, PassKind, Planned};
use crate::mirror::{Checkpoint, PageWriter, Staged, Writes};
use crate::plan::Part;
use crate::stac::search::Request;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// Parts of pages buffered between the pagers and the stager (within the pass's byte budget).
const PARTS_BUFFERED: usize = 4;

/// One pass of a job over its planned partitions.
pub(super) struct Pass<'a> {
    /// The run's clients and options.
    pub context: &'a Context,
    /// The job.
    pub job: &'a Job,
    /// The run.
    pub run_id: &'a str,
    /// The pass's partitions, as planned.
    pub planned: &'a [Planned],
    /// Sync or reconcile.
    pub kind: PassKind,
    /// What its pages write.
    pub writes: Writes,
    /// The partitions that page a backfill, for a bulk partition paged instead.
    pub fallback: &'a [Part],
}

/// A staged part, with where it came from and its share of the byte budget (released once it
/// has committed).
struct Ready {
    staged: Staged,
    partition: Arc<Partition>,
    request: Request,
    _held: OwnedSemaphorePermit,
}

impl Pass<'_> {
    /// Pages the unfinished partitions concurrently (under the API client's cap on requests in
    /// flight), each from its resume point, and commits their pages. A worker pages only the
    /// partitions it claims.
    pub async fn run(&self, lock: &mut JobLock, counts: &mut Counts) -> Result<(), Error> {
        let lease = self.context.worker.map(|ttl| Lease {
            owner: self.run_id,
            ttl,
        });
        let budget = &Budget::new();
        let progress = &Progress::new(self);
        let writer = &self.context.mirror.writer(self.writes, self.job.snapshots);
        let (fetched_tx, fetched_rx) = mpsc::channel::<Fetched>(PARTS_BUFFERED);
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>(1);
        let tally = &progress.tally;
        // The pagers' driver owns the sender, so the stager sees the channel close when it ends.
        let pagers = async move {
            let (context, job) = (self.context, self.job);
            match lease {
                None => self.page_and_read(budget, fetched_tx, tally).await,
                Some(lease) => {
                    let kind = self.kind;
                    pager::page_leased(context, job, kind, lease, budget, fetched_tx, tally).await
                }
            }
        };
        let (mut errors, staged, committed) = tokio::join!(
            pagers,
            stage_all(writer, fetched_rx, ready_tx),
            self.commit_all(writer, ready_rx, lock, counts, progress),
        );
        progress.finish();
        counts.splits += (tally.added.load(Ordering::Relaxed) / 2) as u64;
        committed?;
        staged?;
        match errors.iter().position(|e| matches!(e, Error::Stopped)) {
            Some(stopped) => Err(errors.swap_remove(stopped)),
            None if errors.is_empty() => Ok(()),
            None => Err(errors.swap_remove(0)),
        }
    }

    /// A single run's pagers: pages the partitions that page, while the bulk partitions' files
    /// are read one after the other; then pages the collections of those that could not be read.
    async fn page_and_read(
        &self,
        budget: &Budget,
        tx: mpsc::Sender<Fetched>,
        tally: &Tally,
    ) -> Vec<Error> {
        let (context, job) = (self.context, self.job);
        let (bulk, paged): (Vec<Planned>, Vec<Planned>) = self
            .planned
            .iter()
            .cloned()
            .partition(|p| bulk::is_bulk(context, p));
        let feed = Feed {
            context,
            job,
            budget,
            tx: &tx,
            fallback: self.fallback,
        };
        let reading = async {
            let mut instead = Vec::new();
            for planned in bulk.iter().filter(|p| !p.done) {
                instead.extend(feed.read(planned).await?);
            }
            Ok::<_, Error>(instead)
        };
        let paging = pager::page_all(context, job, &paged, budget, tx.clone(), tally);
        let (read, mut errors) = tokio::join!(reading, paging);
        match read {
            Ok(instead) if errors.is_empty() && !instead.is_empty() => {
                errors.extend(pager::page_all(context, job, &instead, budget, tx, tally).await);
            }
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
        errors
    }

    /// The committer: takes staged parts in order, and commits each as soon as no commit in
    /// progress claims what it writes ([`Claim::meets`]), up to the writer's commits at once.
    async fn commit_all(
        &self,
        writer: &PageWriter<'_>,
        mut ready: mpsc::Receiver<Ready>,
        lock: &mut JobLock,
        counts: &mut Counts,
        progress: &Progress,
    ) -> Result<(), Error> {
        let at_once = writer.commits_at_once();
        let commit = |page: Ready| async move {
            let committed = writer.commit(&page.staged, self.checkpoint(&page)).await;
            (committed, page)
        };
        let mut running = FuturesUnordered::new();
        let mut claims: Vec<Claim> = Vec::new();
        // A part taken from the stager that waits for a commit in progress to end.
        let mut waiting: Option<(Ready, Claim)> = None;
        let mut open = true;
        loop {
            if let Some((page, claim)) = waiting.take() {
                if page.partition.lost.is_cancelled() {
                    // Dropped: the partition goes on elsewhere from its last commit.
                    writer.abandon(page.staged);
                } else if claims.len() < at_once && !claims.iter().any(|c| c.meets(&claim)) {
                    lock.check().await?;
                    claims.push(claim);
                    running.push(commit(page));
                } else {
                    waiting = Some((page, claim));
                }
            }
            let (committed, page) = if waiting.is_none() && open && claims.len() < at_once {
                tokio::select! {
                    next = ready.recv() => {
                        match next {
                            Some(page) => {
                                let claim = Claim::of(&page);
                                waiting = Some((page, claim));
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
            claims.retain(|c| c.id != page.staged.seq);
            self.committed(committed, &page, counts, progress)?;
        }
        Ok(())
    }

    /// Where a part's commit leaves its partition.
    fn checkpoint<'p>(&'p self, page: &'p Ready) -> Checkpoint<'p> {
        Checkpoint {
            run_id: self.run_id,
            job: &self.job.name,
            partition: &page.partition.part.name,
            request: &page.request,
            lease: self.context.worker.map(|ttl| Lease {
                owner: self.run_id,
                ttl,
            }),
        }
    }

    /// Counts a commit. A lost lease stops this worker paging that partition (another worker
    /// goes on from its last committed page) and is not an error of the pass.
    fn committed(
        &self,
        committed: Result<Counts, Error>,
        page: &Ready,
        counts: &mut Counts,
        progress: &Progress,
    ) -> Result<(), Error> {
        match committed {
            Err(Error::LeaseLost { partition }) => {
                tracing::warn!(job = %self.job.name, partition = %partition,
                    "another worker took this partition over (this worker's lease on it \
                     expired); it goes on from the last committed page");
                page.partition.lost.cancel();
                Ok(())
            }
            committed => {
                *counts += &committed?;
                self.context.committed();
                progress.committed(page.staged.page.items.len());
                Ok(())
            }
        }
    }
}

/// The stager: stages each fetched part once the committer has room for it, so objects run
/// ahead of the rows they belong to by one part (by two on Postgres, where the committer may
/// hold a part until its partition's part before has committed).
async fn stage_all(
    writer: &PageWriter<'_>,
    mut fetched: mpsc::Receiver<Fetched>,
    ready: mpsc::Sender<Ready>,
) -> Result<(), Error> {
    let mut seq = 0;
    while let Some((partition, request, page, held)) = fetched.recv().await {
        let Ok(slot) = ready.reserve().await else {
            // The committer stopped (and reports why).
            break;
        };
        let staged = writer.stage(seq, page).await?;
        seq += 1;
        slot.send(Ready {
            staged,
            partition,
            request,
            _held: held,
        });
    }
    Ok(())
}

/// What a commit in progress writes. Pages of one partition commit in order, so that its resume
/// point only moves on; only the parts of one page before its last may commit at once (each
/// leaves the resume point at that page). Pages that write the same item commit in order, so
/// that its row ends as its object does and the two transactions never wait on each other.
struct Claim {
    /// The part's [`Staged::seq`].
    id: u64,
    partition: Arc<Partition>,
    /// The last part of its page (or the whole page): it moves the resume point on.
    ends_page: bool,
    /// The written items' `(collection, id)`, hashed: a collision only makes a page wait.
    items: HashSet<u64>,
}

impl Claim {
    fn of(page: &Ready) -> Claim {
        let items = page
            .staged
            .written()
            .map(|item| {
                let mut hasher = std::hash::DefaultHasher::new();
                std::hash::Hash::hash(&(&item.collection, &item.id), &mut hasher);
                std::hash::Hasher::finish(&hasher)
            })
            .collect();
        Claim {
            id: page.staged.seq,
            partition: page.partition.clone(),
            ends_page: page.staged.page.whole,
            items,
        }
    }

    /// Whether the two must commit one after the other.
    fn meets(&self, other: &Claim) -> bool {
        (Arc::ptr_eq(&self.partition, &other.partition) && (self.ends_page || other.ends_page))
            || !self.items.is_disjoint(&other.items)
    }
}

/// The progress line a person at a terminal sees: items, items/s and partitions done.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// Partitions ended and added (halves of split ones), counted by the pagers.
    tally: Tally,
    /// Partitions planned, and done before this run.
    planned: usize,
    done_before: usize,
}

impl Progress {
    fn new(pass: &Pass<'_>) -> Progress {
        let reconcile = pass.writes != Writes::Items;
        Progress {
            bar: pass
                .context
                .progress
                .then(|| progress_bar(pass.job, reconcile)),
            tally: Tally::default(),
            planned: pass.planned.len(),
            done_before: pass.planned.iter().filter(|p| p.done).count(),
        }
    }

    fn committed(&self, items: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(items as u64);
            bar.set_message(format!(
                "{}/{} partitions done",
                self.done_before + self.tally.finished.load(Ordering::Relaxed),
                self.planned + self.tally.added.load(Ordering::Relaxed)
            ));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A spinner with items, items/s and partitions done.
fn progress_bar(job: &Job, reconcile: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} {prefix}: {human_pos} items, {per_sec}, {msg} [{elapsed}]",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_prefix(if reconcile {
        format!("{} (reconcile)", job.name)
    } else {
        job.name.clone()
    });
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
