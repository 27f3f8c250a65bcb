//! The mirror: the SQL database, the object store beside it (if configured), and the order
//! in which a page is written to them. This module is the one place that owns that order:
//!
//! 1. [`PageWriter::stage`] classifies a page's items against the database and against the
//!    pages staged before it and not committed yet (two pages in flight that carry one item then
//!    agree on it), sets aside what the database would refuse (Postgres cannot store `\u0000`),
//!    and has the object store write the new and changed items.
//! 2. [`PageWriter::commit`] commits the rows, the quarantined features and the partition's
//!    resume point in one transaction. A new item whose row the database refuses at commit is
//!    removed from the object store again, so it holds exactly the items the database does.
//!
//! Objects are written before the commit, so a run killed in between leaves them ahead of the
//! database, never behind: the page is fetched again, and writing the same bytes again is
//! harmless. What is not here: fetching pages and deciding which to commit when (`run`).

pub mod db;
mod encode;
mod flat;
pub mod objects;
mod raw;
pub mod snapshot;

use crate::config::{Config, DeletedObjects, Job, SnapshotWindow};
use crate::error::Error;
use crate::stac::http::display_url;
use crate::stac::reader::{Item, Page, Rejected};
use crate::stac::search::Request;
use bytes::Bytes;
use db::{Committed, Counts, Database, JobLock, Known, Lease, PageCommit, Scope, Seen};
use objects::ObjectSink;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The database and the object store, opened for a run.
#[derive(Debug, Clone)]
pub struct Mirror {
    db: Database,
    /// The object store, if the config names one: items, collection documents, manifests,
    /// change files and snapshot files. Each of its writes may be done again for the same
    /// items after a run was killed: each is idempotent.
    objects: Option<ObjectSink>,
}

impl Mirror {
    /// Opens the database (migrating it if `migrate`) and the object store, and checks
    /// that the store takes a write: a missing bucket fails here, before any page.
    pub async fn open(config: &Config, migrate: bool) -> Result<Mirror, Error> {
        let db = Database::connect_as(&config.database_url, config.database_format).await?;
        if migrate {
            db.migrate().await?;
        }
        let mut objects = None;
        if let Some(url) = config.object_store_url.as_deref() {
            let sink = ObjectSink::from_url(url, &config.object_store_options)?;
            sink.probe().await?;
            objects = Some(sink);
        }
        Ok(Mirror { db, objects })
    }

    /// The database: runs, plans, resume points, locks and leases.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// A writer for the pages of one pass.
    pub(crate) fn writer(
        &self,
        writes: Writes,
        snapshots: Option<SnapshotWindow>,
    ) -> PageWriter<'_> {
        PageWriter {
            mirror: self,
            writes,
            snapshots,
            ahead: Ahead::default(),
        }
    }

    /// Removes what a killed run of `job` left half-written. Failures are logged: a leftover
    /// never changes what the mirror holds.
    pub async fn recover(&self, job: &str, collections: &[String]) {
        if let Some(objects) = &self.objects {
            match objects.recover(collections).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(job, removed, "removed half-written objects of a killed run")
                }
                Err(e) => tracing::warn!(job, error = %e, "could not clean the object folder"),
            }
        }
    }

    /// Stores a collection's document as fetched (`None`: the API has none now): written to
    /// the object store, then its row, when it is new or changed; a collection gone upstream
    /// is marked, never dropped.
    /// With `snapshots`, the written document gains a `geoparquet-items` asset pointing at the
    /// snapshot files.
    pub async fn collection(
        &self,
        id: &str,
        content: Option<Bytes>,
        snapshots: Option<SnapshotWindow>,
    ) -> Result<(), Error> {
        let Some(content) = content else {
            if self.db.needs_collection_document() && !self.db.collection_stored(id).await? {
                return Err(Error::Upstream(format!(
                    "collection {id}: the API has no /collections/{id} document, and the \
                     database (pgstac) needs one to hold the collection's items; check the \
                     collection id"
                )));
            }
            if self.db.collection_gone(id).await? {
                tracing::warn!(
                    collection = id,
                    "the collection is gone upstream (no \
                    /collections/{id}); its document and items are kept, marked in `status`"
                );
            }
            return Ok(());
        };
        let text = std::str::from_utf8(&content).map_err(|e| {
            Error::Upstream(format!("collection {id}: its document is not UTF-8 ({e})"))
        })?;
        let variant = snapshots.map_or("", snapshot::asset_variant);
        let changed = self.db.collection_changed(id, text, variant).await?;
        if changed {
            let written = match snapshots {
                Some(window) => snapshot::with_asset(&content, window),
                None => content.clone(),
            };
            if let Some(objects) = &self.objects {
                objects.put_collection(id, written).await?;
            }
            tracing::info!(
                collection = id,
                "storing the collection's document (new or changed)"
            );
        }
        self.db.store_collection(id, text, variant, changed).await
    }

    /// Rewrites the snapshot files of `collections` due (see the `snapshot_due` table), each
    /// from the database, and clears them. A window a commit marked again while it was written
    /// stays due, and so does one that fails: the others are still written (one window that
    /// cannot be written never holds back the rest), then the first failure is returned.
    /// Returns the windows and items written.
    pub async fn snapshots(
        &self,
        collections: &[String],
        window: SnapshotWindow,
    ) -> Result<(u64, u64), Error> {
        let Some(sink) = &self.objects else {
            return Ok((0, 0));
        };
        let (mut windows, mut items) = (0, 0);
        let mut failed = None;
        for due in self.db.due_windows(collections).await? {
            if !snapshot::is_window(&due.window) {
                tracing::warn!(collection = %due.collection, window = %due.window,
                    "not a snapshot window; cleared");
                self.db.clear_due(&due).await?;
                continue;
            }
            let document = self.db.collection_document(&due.collection).await?;
            let written = match snapshot::write_window(
                &self.db,
                sink,
                (&due.collection, &due.window),
                window,
                snapshot::Format::Geoparquet,
                document.as_deref(),
            )
            .await
            {
                Ok(written) => written,
                Err(e) => {
                    tracing::error!(collection = %due.collection, window = %due.window,
                        error = %e, "snapshot not written; the window stays due");
                    failed.get_or_insert(e);
                    continue;
                }
            };
            tracing::info!(collection = %due.collection, window = %due.window,
                items = written.items, bytes = written.bytes, "snapshot written");
            self.db.clear_due(&due).await?;
            windows += 1;
            items += written.items;
        }
        failed.map_or(Ok((windows, items)), Err)
    }

    /// Stores a run's changes, one JSON line each, in the object store (beside its
    /// manifest), if it made any; a failure is logged (the feed itself is in the database).
    /// The lines go through a temporary file, a page of rows at a time, so a backfill of a
    /// million items does not hold its million changes in memory.
    pub async fn changes(&self, run_id: &str) {
        let Some(objects) = &self.objects else {
            return;
        };
        match self.changes_file(run_id).await {
            Ok(None) => {}
            Ok(Some(file)) => {
                if let Err(e) = objects.put_changes(run_id, file.path()).await {
                    tracing::warn!(error = %e, "could not write the run's changes");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not write the run's changes"),
        }
    }

    /// The run's changes as NDJSON in a temporary file, or `None` if it made none.
    async fn changes_file(&self, run_id: &str) -> Result<Option<tempfile::NamedTempFile>, Error> {
        use std::io::Write;
        const PAGE: i64 = 10_000;
        let fail = |e: std::io::Error| {
            Error::Sink(format!(
                "a temporary file for the run's changes (set TMPDIR to a folder with room): {e}"
            ))
        };
        let mut file: Option<std::io::BufWriter<tempfile::NamedTempFile>> = None;
        let mut after = 0;
        loop {
            let changes = self.db.run_changes(run_id, after, PAGE).await?;
            let Some(last) = changes.last() else { break };
            after = last.seq;
            let out = match &mut file {
                Some(out) => out,
                None => file.insert(std::io::BufWriter::new(
                    tempfile::NamedTempFile::new().map_err(fail)?,
                )),
            };
            for change in &changes {
                serde_json::to_writer(&mut *out, change)
                    .map_err(|e| Error::Internal(format!("a change as JSON: {e}")))?;
                out.write_all(b"\n").map_err(fail)?;
            }
            if changes.len() < PAGE as usize {
                break;
            }
        }
        file.map(|out| out.into_inner().map_err(|e| fail(e.into_error())))
            .transpose()
    }

    /// Stores a run's manifest in the object store; a failure is logged.
    pub async fn manifest(&self, run_id: &str, manifest: &serde_json::Value) {
        let bytes = Bytes::from(manifest.to_string());
        if let Some(objects) = &self.objects
            && let Err(e) = objects.put_manifest(run_id, bytes).await
        {
            tracing::warn!(error = %e, "could not write the run manifest");
        }
    }

    /// Ends a reconcile of `job`: the live items in `scopes` its sweep did not see are
    /// tombstoned (and removed from the object store first when the job deletes objects: a kill
    /// in between leaves live rows without objects, which the next reconcile finds again and
    /// finishes), and their snapshot windows marked due. Returns how many.
    pub async fn tombstone(
        &self,
        job: &Job,
        run_id: &str,
        scopes: &[Scope<'_>],
        lock: &mut JobLock,
        at: &str,
    ) -> Result<u64, Error> {
        let remove = job.deleted_objects == DeletedObjects::Delete;
        let (job, snapshots) = (job.name.as_str(), job.snapshots);
        let mut vanished = Vec::new();
        for scope in scopes {
            vanished.extend(self.db.vanished(job, scope).await?);
        }
        for (collection, id) in &vanished {
            tracing::info!(job, collection, id, "item deleted upstream: tombstoned");
            if remove && let Some(objects) = &self.objects {
                objects.delete_item(collection, id).await?;
            }
        }
        lock.check().await?;
        self.db
            .finish_reconcile(job, run_id, scopes, at, snapshots)
            .await?;
        Ok(vanished.len() as u64)
    }
}

/// What a pass's pages write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writes {
    /// The items (a sync pass).
    Items,
    /// The items, and their ids as seen (a reconcile that fetches whole items).
    ItemsAndSeen,
    /// Only the ids seen (a reconcile that asked for ids only).
    Seen,
}

/// Writes the pages of one pass: [`PageWriter::stage`], then [`PageWriter::commit`].
#[derive(Debug)]
pub(crate) struct PageWriter<'m> {
    mirror: &'m Mirror,
    writes: Writes,
    /// The job's snapshot window, if it writes snapshots.
    snapshots: Option<SnapshotWindow>,
    ahead: Ahead,
}

/// A page whose objects are written, ready to commit.
#[derive(Debug)]
pub(crate) struct Staged {
    /// Its place in the order pages were staged.
    pub seq: u64,
    /// The page.
    pub page: Page,
    /// New and changed items: their index in `page.items`, and what the database held.
    changed: Vec<(usize, Known)>,
    /// Features to quarantine.
    rejected: Vec<Rejected>,
    /// Items stored already with this exact content.
    unchanged: u64,
}

impl Staged {
    /// The items its commit writes.
    pub(crate) fn written(&self) -> impl Iterator<Item = &Item> {
        self.changed.iter().map(|(at, _)| &self.page.items[*at])
    }

    fn changed(&self) -> Vec<(&Item, Known)> {
        self.changed
            .iter()
            .map(|(at, known)| (&self.page.items[*at], *known))
            .collect()
    }
}

/// Where a page's commit leaves its partition.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checkpoint<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The job.
    pub job: &'a str,
    /// The partition.
    pub partition: &'a str,
    /// The request that fetched the page: the resume point of a part of a page.
    pub request: &'a Request,
    /// A worker's lease on the partition; the commit fails with [`Error::LeaseLost`] if it is
    /// no longer this worker's.
    pub lease: Option<Lease<'a>>,
}

impl PageWriter<'_> {
    /// Pages that may commit at once: as many as the database takes, for a sync pass; the pages
    /// of a reconcile all insert into `sync_seen`, so they commit one at a time.
    pub(crate) fn commits_at_once(&self) -> usize {
        match self.writes {
            Writes::Items => self.mirror.db.commits_at_once(),
            Writes::ItemsAndSeen | Writes::Seen => 1,
        }
    }

    /// Classifies a page's items and has the object store write the new and changed ones. It
    /// may run while the page before commits, so the store and the database work at once.
    pub(crate) async fn stage(&self, seq: u64, page: Page) -> Result<Staged, Error> {
        let mut staged = Staged {
            seq,
            changed: Vec::new(),
            rejected: Vec::new(),
            unchanged: 0,
            page,
        };
        if self.writes == Writes::Seen {
            return Ok(staged);
        }
        let page = &staged.page;
        let known = self.classify(&page.items).await?;
        staged.rejected = page.rejected.clone();
        for (at, (item, known)) in page.items.iter().zip(known).enumerate() {
            if known == Known::Unchanged {
                staged.unchanged += 1;
            } else if let Some(reason) = self.mirror.db.refuses(item) {
                // Refused before it is written anywhere, so it leaves nothing behind.
                staged.rejected.push(Rejected {
                    content: item.content.clone(),
                    reason,
                    collection: Some(item.collection.clone()),
                    id: Some(item.id.clone()),
                });
            } else {
                staged.changed.push((at, known));
            }
        }
        let changed = staged.changed();
        if let Some(objects) = &self.mirror.objects {
            objects.put_items(&changed).await?;
        }
        let written = changed
            .iter()
            .map(|(item, _)| (key(item), item.hash.clone()))
            .collect();
        self.ahead.insert(seq, written);
        Ok(staged)
    }

    /// What the database holds for each item, where a page staged and not committed yet counts
    /// as stored. The staged pages are read before the database, as a page is forgotten once
    /// it has committed: a page that commits in between is then in one or the other.
    async fn classify(&self, items: &[Item]) -> Result<Vec<Known>, Error> {
        let pending = self.ahead.hashes(items.iter().map(key));
        let mut known = self.mirror.db.classify(items).await?;
        for ((item, known), pending) in items.iter().zip(known.iter_mut()).zip(pending) {
            if let Some(hash) = pending {
                *known = if item.has_hash(&hash) {
                    Known::Unchanged
                } else {
                    Known::Changed
                };
            }
        }
        Ok(known)
    }

    /// Commits a staged page: its rows, quarantined features and resume point (and the ids a
    /// reconcile saw) in one transaction. Returns what it counted.
    pub(crate) async fn commit(
        &self,
        staged: &Staged,
        at: Checkpoint<'_>,
    ) -> Result<Counts, Error> {
        let committed = self.commit_rows(staged, at).await;
        self.ahead.forget(staged.seq);
        committed
    }

    /// Forgets a staged page that will not commit (its partition went to another worker).
    pub(crate) fn abandon(&self, staged: Staged) {
        self.ahead.forget(staged.seq);
    }

    async fn commit_rows(&self, staged: &Staged, at: Checkpoint<'_>) -> Result<Counts, Error> {
        let page = &staged.page;
        let changed = staged.changed();
        let page_url = display_url(&at.request.url);
        let committed = self
            .mirror
            .db
            .commit_page(PageCommit {
                run_id: at.run_id,
                job: at.job,
                partition: at.partition,
                items: changed.iter().map(|(item, _)| *item).collect(),
                rejected: &staged.rejected,
                page_url: &page_url,
                // A part of a page: a restart fetches the page again.
                resume: if page.whole {
                    page.next.as_ref()
                } else {
                    Some(at.request)
                },
                ends_page: page.whole,
                features: page.features,
                matched: page.matched,
                seen: self.seen(page),
                lease: at.lease,
                snapshots: self.snapshots,
            })
            .await?;
        let refused = &committed.refused;
        for feature in staged.rejected.iter().chain(refused) {
            tracing::warn!(job = at.job, page = %page_url,
                collection = feature.collection.as_deref().unwrap_or(""),
                id = feature.id.as_deref().unwrap_or(""), reason = %feature.reason,
                "feature quarantined");
        }
        let mut counts = self.settle(&changed, &committed).await?;
        counts.pages = u64::from(page.whole);
        counts.unchanged += staged.unchanged;
        counts.quarantined = (staged.rejected.len() + refused.len()) as u64;
        if self.writes != Writes::Seen {
            counts.duplicate = page.duplicates;
        }
        Ok(counts)
    }

    /// `(collection, id)` of every feature on the page, during a reconcile.
    fn seen<'p>(&self, page: &'p Page) -> Vec<Seen<'p>> {
        if self.writes == Writes::Items {
            return Vec::new();
        }
        let items = page.items.iter().map(|i| Seen {
            collection: &i.collection,
            id: &i.id,
            updated: i.updated.as_deref(),
        });
        let rejected = page.rejected.iter().filter_map(|r| {
            Some(Seen {
                collection: r.collection.as_deref()?,
                id: r.id.as_deref()?,
                updated: None,
            })
        });
        // A key the database cannot index was never stored, so there is nothing to keep live.
        items
            .chain(rejected)
            .filter(|seen| self.mirror.db.indexes(seen.collection, seen.id))
            .collect()
    }

    /// Counts what the commit stored, and removes from the object store the new items whose
    /// rows the database refused, so the store holds exactly what the database does.
    async fn settle(
        &self,
        changed: &[(&Item, Known)],
        committed: &Committed,
    ) -> Result<Counts, Error> {
        let mut counts = Counts::default();
        for (item, known) in changed {
            let stored = !committed.refused.iter().any(|r| {
                r.id.as_ref() == Some(&item.id) && r.collection.as_ref() == Some(&item.collection)
            });
            // What the database wrote: another commit may have stored the item, identically
            // or not, since this page was classified.
            let known = match committed.written.get(&key(item)) {
                _ if !stored => *known,
                Some(true) => Known::New,
                Some(false) => Known::Changed,
                None => {
                    counts.unchanged += 1;
                    continue;
                }
            };
            match (stored, known) {
                (false, Known::New) => {
                    if let Some(objects) = &self.mirror.objects {
                        objects.delete_item(&item.collection, &item.id).await?;
                    }
                }
                (false, _) => tracing::warn!(collection = %item.collection, id = %item.id,
                    "the database kept the previous version of this item but its object holds the refused one"),
                (true, Known::New) => counts.new += 1,
                (true, _) => counts.changed += 1,
            }
        }
        Ok(counts)
    }
}

fn key(item: &Item) -> (String, String) {
    (item.collection.clone(), item.id.clone())
}

/// What each page staged and not yet committed writes, `(collection, id)` → content hash, by
/// [`Staged::seq`]: staging adds a page, its commit forgets it (pages may commit out of order
/// on Postgres).
#[derive(Debug, Default)]
struct Ahead(Mutex<BTreeMap<u64, Written>>);

type Written = HashMap<(String, String), String>;

impl Ahead {
    fn pages(&self) -> MutexGuard<'_, BTreeMap<u64, Written>> {
        // Never held across an await, nor by code that can panic: a poisoned lock holds data
        // as good as any.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
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

#[cfg(test)]
mod tests {
    use super::Ahead;

    /// Pages commit out of order on Postgres: what a page still committing writes is known
    /// however many pages were staged after it, and forgotten once it has committed.
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
}
