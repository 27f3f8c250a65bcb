//! A job's passes: its sync pass (resumed if a killed run left one, else planned from the
//! watermark), which moves the watermark when every partition is done, then its reconcile pass
//! if one is asked for, due, or left unfinished, which tombstones what vanished upstream.
//!
//! Every plan is stored before it is paged, so a killed run resumes exactly the plan it made.

use super::Context;
use super::bulk;
use super::pipeline::Pass;
use crate::config::{Backfill, Incremental, Job, Window};
use crate::domain::{Bbox, Interval};
use crate::error::Error;
use crate::mirror::Writes;
use crate::mirror::db::{Counts, JobLock, JobState, PassKind, PlanCommit, Planned, Scope, Short};
use crate::plan::{self, Cut, Strategy};
use crate::stac::client::{self, Capabilities, capabilities_of};
use crate::stac::search::asks_ids_only;
use std::collections::HashMap;
use std::time::SystemTime;

/// What a job's passes did, for the run manifest.
#[derive(Debug, Default)]
pub(super) struct PassReport {
    pub strategy: Option<Strategy>,
    pub watermark_before: Option<String>,
    pub watermark_after: Option<String>,
    pub reconciled: bool,
    pub partitions: Vec<serde_json::Value>,
    /// Partitions still short of their match count after being paged again.
    pub incomplete: Vec<Short>,
}

/// The passes of one job in one run.
pub(super) struct JobPasses<'a> {
    context: &'a Context,
    job: &'a Job,
    run_id: &'a str,
    search_hash: String,
    /// What the server offers; asked once per run, and only when a plan needs it.
    caps: Option<Capabilities>,
    /// The collections' temporal extents, from their documents (fetched as the run starts).
    extents: HashMap<String, String>,
    /// What they did.
    pub report: PassReport,
}

impl<'a> JobPasses<'a> {
    pub fn new(context: &'a Context, job: &'a Job, run_id: &'a str) -> JobPasses<'a> {
        JobPasses {
            context,
            job,
            run_id,
            search_hash: search_hash(job),
            caps: None,
            extents: HashMap::new(),
            report: PassReport::default(),
        }
    }

    /// The job's collections, then its sync pass, then the reconcile pass where one is due
    /// (never on a worker).
    pub async fn run(&mut self, lock: &mut JobLock, counts: &mut Counts) -> Result<(), Error> {
        self.collections().await?;
        let state = self.sync(lock, counts).await?;
        if self.context.worker.is_some() {
            if self.context.reconcile || self.job.reconcile_every.is_some() {
                tracing::info!(job = %self.job.name, "workers do not reconcile: reconcile with \
                    one `stac-sync run --reconcile` without --worker");
            }
            return Ok(());
        }
        self.reconcile(lock, counts, &state).await
    }

    /// Plans (or resumes) the sync pass, pages it, and ends it. Workers plan and end passes one
    /// at a time, under the job's planner lock: the first plans, the others find it planned.
    /// (Should unlocking fail, the lock goes with the job lock's connection when the run ends.)
    async fn sync(&mut self, lock: &mut JobLock, counts: &mut Counts) -> Result<JobState, Error> {
        let worker = self.context.worker.is_some();
        if worker {
            lock.lock_planner().await?;
        }
        let (state, planned) = self.plan_sync().await?;
        if worker {
            lock.unlock_planner().await?;
            if planned
                .iter()
                .any(|p| !p.done && bulk::is_bulk(self.context, p))
            {
                return Err(Error::Config(format!(
                    "job {}: its backfill reads a bulk search, which workers do not share: \
                     finish it with one `stac-sync run` without --worker",
                    self.job.name
                )));
            }
        }
        self.pass(PassKind::Sync, Writes::Items, &planned, lock, counts)
            .await?;
        if worker {
            lock.lock_planner().await?;
        }
        self.end_sync().await?;
        if worker {
            lock.unlock_planner().await?;
        }
        Ok(state)
    }

    /// The job's state, and the sync pass's partitions: those a killed run left, or a new plan.
    /// A job whose search changed starts over with a full pass.
    async fn plan_sync(&mut self) -> Result<(JobState, Vec<Planned>), Error> {
        let (db, job) = (self.context.mirror.db(), self.job);
        let state = db.job_state(&job.name).await?;
        let changed = state
            .as_ref()
            .is_some_and(|s| s.query_hash != self.search_hash);
        if changed {
            tracing::info!(job = %job.name, "the job's search changed since its last run: starting over with a full pass");
        }
        let state = state.filter(|_| !changed).unwrap_or_default();
        self.report.watermark_before = state.watermark.clone();
        if !changed {
            let planned = db.planned(&job.name, PassKind::Sync).await?;
            if !planned.is_empty() {
                tracing::info!(job = %job.name, partitions = planned.len(),
                    left = planned.iter().filter(|p| !p.done).count(), "resuming an unfinished sync pass");
                return Ok((state, planned));
            }
        }
        let watermark = state.watermark.as_deref();
        let offered = if watermark.is_some() && job.incremental == Incremental::Auto {
            self.capabilities().await?
        } else {
            Capabilities::default()
        };
        let strategy = plan::strategy(job, watermark, &offered);
        let cut = self.cut(strategy == Strategy::Full);
        let now = SystemTime::now();
        let root = self.context.api.root();
        let mut parts = plan::sync_parts(root, job, strategy, watermark, &cut, now);
        if strategy == Strategy::Full && watermark.is_none() && job.backfill != Backfill::Paging {
            if self.context.worker.is_some() {
                tracing::info!(job = %job.name, "workers page the backfill: a bulk search is \
                    read by a run without --worker");
            } else {
                let bulk = bulk::submit_all(self.context, job).await?;
                parts.retain(|p| !bulk.iter().any(|b| b.collection == p.collection));
                parts.extend(bulk);
            }
        }
        self.store_plan(PassKind::Sync, changed, now, &parts)
            .await?;
        self.report.strategy = Some(strategy);
        tracing::info!(job = %job.name, strategy = ?strategy, watermark = watermark.unwrap_or("none"),
            partitions = parts.len(), "planned a sync pass");
        let planned = db.planned(&job.name, PassKind::Sync).await?;
        Ok((state, planned))
    }

    /// Moves the watermark to the pass's start minus the safety lag, if every partition is done.
    async fn end_sync(&mut self) -> Result<(), Error> {
        let (db, job) = (self.context.mirror.db(), self.job);
        let started = db
            .job_state(&job.name)
            .await?
            .and_then(|s| s.pass_started_at)
            .and_then(|at| plan::parse_instant(&at))
            .unwrap_or_else(SystemTime::now);
        let mut watermark = Some(plan::next_watermark(started, job.safety_lag));
        if !self.report.incomplete.is_empty() {
            tracing::warn!(job = %job.name, "the pass is incomplete: its watermark stays, so \
                the next run looks for the missing items again");
            watermark = None;
        }
        if db.finish_sync_pass(&job.name, watermark.as_deref()).await? {
            self.report.watermark_after = watermark;
        } else {
            tracing::info!(job = %job.name,
                "the pass's last partitions were another worker's: that worker ends the pass");
        }
        Ok(())
    }

    /// The reconcile pass, if asked for (`run --reconcile`), due (`reconcile_every`), or left
    /// unfinished: sweeps the job's range, then tombstones what the sweep did not see.
    async fn reconcile(
        &mut self,
        lock: &mut JobLock,
        counts: &mut Counts,
        state: &JobState,
    ) -> Result<(), Error> {
        let job = self.job;
        let mut planned = self
            .context
            .mirror
            .db()
            .planned(&job.name, PassKind::Reconcile)
            .await?;
        if planned.is_empty() && !self.reconcile_due(state) {
            return Ok(());
        }
        if !job.can_reconcile() {
            return Err(Error::Config(format!(
                "job {}: reconcile cannot tell which stored items a query, filter or intersects \
                 geometry selects, so it cannot tell what vanished; reconcile a job that selects \
                 by collection, datetime and bbox only",
                job.name
            )));
        }
        if planned.is_empty() {
            planned = self.plan_reconcile().await?;
        }
        // A sweep of ids (and `updated`) only, then whole items: the sweep's partitions where
        // the API offers Fields, those it found changed, and every partition where it does not.
        if planned.iter().any(|p| asks_ids_only(&p.part.first)) {
            self.pass(PassKind::Reconcile, Writes::Seen, &planned, lock, counts)
                .await?;
            self.plan_refresh().await?;
            planned = self
                .context
                .mirror
                .db()
                .planned(&job.name, PassKind::Reconcile)
                .await?;
        }
        self.pass(
            PassKind::Reconcile,
            Writes::ItemsAndSeen,
            &planned,
            lock,
            counts,
        )
        .await?;
        let now = plan::rfc3339(SystemTime::now());
        // What a collection's incomplete sweep did not see may still be there upstream.
        let scopes: Vec<Scope<'_>> = scopes(job)
            .into_iter()
            .filter(|scope| {
                let short = self
                    .report
                    .incomplete
                    .iter()
                    .any(|s| s.collection == scope.collection);
                if short {
                    tracing::warn!(job = %job.name, collection = scope.collection,
                        "the reconcile sweep of this collection is incomplete: nothing in it is \
                         marked deleted this time");
                }
                !short
            })
            .collect();
        counts.deleted += self
            .context
            .mirror
            .tombstone(job, self.run_id, &scopes, lock, &now)
            .await?;
        self.report.reconciled = true;
        Ok(())
    }

    fn reconcile_due(&self, state: &JobState) -> bool {
        self.context.reconcile
            || self.job.reconcile_every.is_some_and(|every| {
                state
                    .reconciled_at
                    .as_deref()
                    .and_then(plan::parse_instant)
                    .and_then(|at| at.elapsed().ok())
                    .is_none_or(|age| age >= every)
            })
    }

    /// Adds to the reconcile pass partitions that fetch whole the items its sweep found changed
    /// (or missing) here, so that a job whose passes re-scan only recent acquisitions still
    /// gets old items that were reprocessed.
    async fn plan_refresh(&mut self) -> Result<(), Error> {
        let (db, job) = (self.context.mirror.db(), self.job);
        let stale = db.stale_seen(&job.name).await?;
        if stale.is_empty() {
            return Ok(());
        }
        let parts = plan::refresh_parts(self.context.api.root(), job, &stale);
        tracing::info!(job = %job.name, items = stale.len(), partitions = parts.len(),
            "the reconcile sweep saw items changed upstream (another `updated`) or missing here: \
             fetching them whole");
        db.extend_plan(&job.name, PassKind::Reconcile, &self.search_hash, &parts)
            .await
    }

    /// Plans a reconcile pass: ids only where the API offers the Fields extension.
    async fn plan_reconcile(&mut self) -> Result<Vec<Planned>, Error> {
        let offered = self.capabilities().await?;
        let cut = self.cut(true);
        let now = SystemTime::now();
        let root = self.context.api.root();
        let parts = plan::reconcile_parts(root, self.job, offered.fields, &cut, now);
        self.store_plan(PassKind::Reconcile, false, now, &parts)
            .await?;
        tracing::info!(job = %self.job.name, ids_only = offered.fields, partitions = parts.len(),
            "planned a reconcile pass");
        self.context
            .mirror
            .db()
            .planned(&self.job.name, PassKind::Reconcile)
            .await
    }

    /// Pages a pass's partitions, then checks each against the match count its first page
    /// reported: those that fell short are paged once more; those still short are incomplete.
    async fn pass(
        &mut self,
        kind: PassKind,
        writes: Writes,
        planned: &[Planned],
        lock: &mut JobLock,
        counts: &mut Counts,
    ) -> Result<(), Error> {
        let (db, job) = (self.context.mirror.db(), &self.job.name);
        // A reconcile sweep pages the partitions that ask for ids only; the rest of its pass
        // those that fetch whole items.
        let ours = |p: &Planned| match writes {
            Writes::Items => true,
            Writes::Seen => asks_ids_only(&p.part.first),
            Writes::ItemsAndSeen => !asks_ids_only(&p.part.first),
        };
        let mut planned: Vec<Planned> = planned.iter().filter(|p| ours(p)).cloned().collect();
        // A backfill's bulk partitions are paged instead by these when they cannot be read.
        let fallback = if planned.iter().any(|p| bulk::is_bulk(self.context, p)) {
            let root = self.context.api.root();
            let now = SystemTime::now();
            plan::sync_parts(root, self.job, Strategy::Full, None, &self.cut(true), now)
        } else {
            Vec::new()
        };
        self.report.partitions.extend(
            planned
                .iter()
                .map(|p| serde_json::json!({"name": p.part.name, "query": p.part.first})),
        );
        loop {
            let pass = Pass {
                context: self.context,
                job: self.job,
                run_id: self.run_id,
                planned: &planned,
                kind,
                writes,
                fallback: &fallback,
            };
            pass.run(lock, counts).await?;
            let check = db.check_complete(job, kind).await?;
            for short in &check.incomplete {
                tracing::warn!(job = %job, partition = %short.partition, matched = short.matched,
                    received = short.received, "a partition is still short of the items its API \
                    reported after paging it again: the run is partial");
            }
            counts.incomplete += check.incomplete.len() as u64;
            self.report.incomplete.extend(check.incomplete);
            if check.repaged.is_empty() {
                return Ok(());
            }
            for short in &check.repaged {
                counts.missing += short.matched.saturating_sub(short.received);
                let bulk = planned
                    .iter()
                    .find(|p| p.part.name == short.partition && bulk::is_bulk(self.context, p));
                if let Some(bulk) = bulk {
                    tracing::warn!(job = %job, partition = %short.partition,
                        matched = short.matched, received = short.received, "the bulk search \
                        exported fewer items than its search matched when it was submitted: \
                        paging its collection instead");
                    bulk::page_instead(self.context, self.job, &fallback, &bulk.part).await?;
                    continue;
                }
                tracing::warn!(job = %job, partition = %short.partition, matched = short.matched,
                    received = short.received, "a partition's pages held fewer items than its API \
                    reported: paging it once more");
            }
            planned = db.planned(job, kind).await?;
            planned.retain(|p| ours(p));
        }
    }

    /// Fetches the job's collections' documents, once per run, and stores them (see
    /// [`crate::mirror::Mirror::collection`]); keeps their temporal extents for the plans.
    async fn collections(&mut self) -> Result<(), Error> {
        let job = self.job;
        let mut extents = HashMap::new();
        for collection in &job.collections {
            let doc = client::collection(&self.context.api, collection).await?;
            let extent = doc
                .as_deref()
                .and_then(|doc| serde_json::from_slice(doc).ok())
                .and_then(|doc: serde_json::Value| client::temporal_extent(&doc));
            tracing::debug!(job = %job.name, collection, extent = extent.as_deref().unwrap_or("none"),
                "the collection's temporal extent");
            extents.extend(extent.map(|extent| (collection.clone(), extent)));
            self.context
                .mirror
                .collection(collection, doc, self.job.snapshots)
                .await?;
        }
        self.extents = extents;
        Ok(())
    }

    /// How a full or reconcile pass (`windowed`) cuts its windows: from each collection's
    /// temporal extent when the job has no datetime, and at least as many as the cap on requests
    /// in flight; unless the job asks for one window per collection. (An incremental pass is
    /// short: it is not cut finer.)
    fn cut(&self, windowed: bool) -> Cut {
        if self.job.window == Window::None || !windowed {
            return Cut::default();
        }
        Cut {
            at_least: self.context.slots,
            extents: self.extents.clone(),
        }
    }

    async fn store_plan(
        &self,
        kind: PassKind,
        search_changed: bool,
        now: SystemTime,
        parts: &[plan::Part],
    ) -> Result<(), Error> {
        self.context
            .mirror
            .db()
            .plan(PlanCommit {
                job: &self.job.name,
                kind,
                search_hash: &self.search_hash,
                search_changed,
                started_at: &plan::rfc3339(now),
                partitions: parts,
            })
            .await
    }

    async fn capabilities(&mut self) -> Result<Capabilities, Error> {
        if let Some(caps) = self.caps {
            return Ok(caps);
        }
        let caps = capabilities_of(&self.context.api).await?;
        tracing::info!(
            sort = caps.sort,
            filter = caps.filter,
            fields = caps.fields,
            updated_queryable = caps.updated_queryable,
            "what the STAC API offers"
        );
        self.caps = Some(caps);
        Ok(caps)
    }
}

/// The stored items a reconcile of `job` answers for: per collection, within its datetime range
/// and bbox.
fn scopes(job: &Job) -> Vec<Scope<'_>> {
    let (start, end) = job.datetime.as_ref().map_or((None, None), Interval::bounds);
    let bbox = job.bbox.as_ref().map(Bbox::extent);
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
