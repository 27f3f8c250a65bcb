//! The object sink: one object per item at `{prefix}/{collection}/{id}.json`, the item's bytes
//! exactly as stored in the database, plus a manifest per run at `{prefix}/_runs/{run_id}.json`.
//!
//! Keys are built with [`encode_segment`], which is injective and cannot produce `/`, `.` or
//! `..`: no id can escape the prefix and two ids never share a key. Item objects in a local folder
//! are written a page's worth in one blocking task ([`write_whole`]): a new one unnamed and
//! linked in once complete, otherwise like `object_store`'s `LocalFileSystem` writes them (a
//! temporary `KEY#N` renamed over `KEY`); either way a killed run never leaves half an object.

use super::db::Known;
use crate::error::Error;
use crate::stac::reader::Item;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Object writes in flight per page, to a cloud store: each is a network round trip. (A local
/// folder is written by one blocking task per page, see [`ObjectSink::put_local`].)
const PUTS_IN_FLIGHT_REMOTE: usize = 16;
/// Bytes read at a time from a file being uploaded (a snapshot file, a run's changes).
const COPY_BUFFER: usize = 1 << 20;
/// Parts of a multipart upload in flight (10 MB each).
const UPLOAD_PARTS_IN_FLIGHT: usize = 2;

/// Where items are written.
#[derive(Debug, Clone)]
pub struct ObjectSink {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    shown: String,
    /// The same store, for `file://` stores: it maps keys to file paths.
    local: Option<Arc<LocalFileSystem>>,
}

impl ObjectSink {
    /// Opens the store named by `url`: `file://PATH` (relative paths from the working
    /// directory), `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`, or `az://CONTAINER/PREFIX`.
    /// Cloud credentials and settings come from the usual environment variables (`AWS_*`,
    /// `GOOGLE_*`, `AZURE_*`), then from `options` (object_store's configuration keys, such as
    /// `aws_endpoint`, `aws_region`, `aws_allow_http`, `aws_virtual_hosted_style_request`).
    pub fn from_url(url: &str, options: &BTreeMap<String, String>) -> Result<ObjectSink, Error> {
        let bad = |why: String| Error::Config(format!("object_store_url {url:?}: {why}"));
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(bad(
                    "no folder; write file://./items or file:///srv/items".into()
                ));
            }
            std::fs::create_dir_all(path)
                .map_err(|e| Error::Sink(format!("cannot create folder {path} for {url}: {e}")))?;
            let store = Arc::new(
                LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| Error::Sink(format!("object store {url}: {e}")))?,
            );
            return Ok(ObjectSink {
                local: Some(store.clone()),
                store,
                prefix: String::new(),
                shown: url.to_string(),
            });
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let prefix = parsed.path().trim_matches('/').to_string();
        let key = |k: &String| {
            bad(format!(
                "unknown option {k:?} for {} stores",
                parsed.scheme()
            ))
        };
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" | "s3a" => {
                let mut builder = AmazonS3Builder::from_env().with_url(url);
                for (k, v) in options {
                    builder = builder.with_config(k.parse().map_err(|_| key(k))?, v);
                }
                Arc::new(builder.build().map_err(|e| bad(e.to_string()))?)
            }
            "gs" => {
                let mut builder = GoogleCloudStorageBuilder::from_env().with_url(url);
                for (k, v) in options {
                    builder = builder.with_config(k.parse().map_err(|_| key(k))?, v);
                }
                Arc::new(builder.build().map_err(|e| bad(e.to_string()))?)
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let mut builder = MicrosoftAzureBuilder::from_env().with_url(url);
                for (k, v) in options {
                    builder = builder.with_config(k.parse().map_err(|_| key(k))?, v);
                }
                Arc::new(builder.build().map_err(|e| bad(e.to_string()))?)
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme {other}: use file://, s3://, gs://, az:// or none"
                )));
            }
        };
        Ok(ObjectSink {
            store,
            prefix: prefix
                .split('/')
                .filter(|s| !s.is_empty())
                .map(encode_segment)
                .collect::<Vec<_>>()
                .join("/"),
            shown: url.to_string(),
            local: None,
        })
    }

    /// Removes what a killed run left in a local folder: objects that are not written unnamed
    /// go to `KEY#N`, renamed to `KEY` (by [`write_whole`], as by `LocalFileSystem`), so a
    /// process killed between the two leaves `KEY#N` behind. Our keys never contain `#` (it is
    /// percent-encoded), so every such file in the job's collection folders (and their snapshot
    /// folders) is a leftover.
    /// Called with the job's lock held, so no run of this job is writing them; returns how many
    /// were removed.
    pub fn sweep_staging(&self, collections: &[String]) -> Result<usize, Error> {
        let Some(local) = &self.local else {
            return Ok(0);
        };
        let mut removed = 0;
        // Items sit in the collection's folder, its snapshots in `items/` below it.
        let folders = collections.iter().flat_map(|c| {
            let c = encode_collection(c);
            [self.key(&c), self.key(&format!("{c}/items"))]
        });
        for folder in folders {
            let Ok(folder) = local.path_to_filesystem(&folder) else {
                continue;
            };
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let is_staging = name.to_str().is_some_and(|n| {
                    n.rsplit_once('#').is_some_and(|(_, n)| {
                        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                    })
                });
                if is_staging {
                    std::fs::remove_file(entry.path()).map_err(|e| {
                        Error::Sink(format!(
                            "cannot remove the leftover {}: {e}",
                            entry.path().display()
                        ))
                    })?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Proves the store is reachable and writable (a missing bucket, refused credentials)
    /// before any page is committed: writes a small object under `_runs/` and deletes it.
    pub async fn probe(&self) -> Result<(), Error> {
        let key = self.key(&format!("_runs/.probe-{:016x}", rand::random::<u64>()));
        self.store
            .put(&key, PutPayload::from_static(b"stac-sync write probe"))
            .await
            .map_err(self.fail(format!("cannot write {key}")))?;
        self.store
            .delete(&key)
            .await
            .map_err(self.fail(format!("cannot delete {key}")))
    }

    /// Turns a store error into a sink error that names the store and the operation.
    pub(super) fn fail(&self, what: String) -> impl Fn(object_store::Error) -> Error + '_ {
        move |source| Error::ObjectStore {
            store: self.shown.clone(),
            what: what.clone(),
            source,
        }
    }

    /// The key of an item.
    pub fn item_key(&self, collection: &str, id: &str) -> Path {
        self.key(&format!(
            "{}/{}.json",
            encode_collection(collection),
            id_segment(id)
        ))
    }

    fn key(&self, relative: &str) -> Path {
        let full = if self.prefix.is_empty() {
            relative.to_string()
        } else {
            format!("{}/{relative}", self.prefix)
        };
        // Every segment comes from `encode_segment` or is ours: never empty, `.`, or `..`.
        Path::parse(&full).unwrap_or_else(|_| Path::from(full.as_str()))
    }

    /// Writes the objects of these items, several at a time. A new item is written with a
    /// conditional put (create only) where the store supports it; if an object is already
    /// there (a run killed after writing it), identical bytes count as success and other bytes
    /// are replaced. A changed item overwrites its object.
    pub async fn put_items(&self, items: &[(&Item, Known)]) -> Result<(), Error> {
        if let Some(local) = &self.local {
            return self.put_local(local, items).await;
        }
        // The futures are made first, so the stream's type holds no closure (a boxed future of
        // a stream with a closure over borrowed items is not `Send` for every lifetime).
        let puts: Vec<_> = items
            .iter()
            .map(|&(item, known)| self.put_item(item, known))
            .collect();
        stream::iter(puts)
            .buffer_unordered(PUTS_IN_FLIGHT_REMOTE)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// Writes items to the local folder in one blocking task. Each object is replaced whole,
    /// whatever was there: new and changed items alike end with the item's bytes, which is what
    /// the conditional put of [`Self::put_item`] ensures elsewhere.
    ///
    /// One task, not one `LocalFileSystem` put (and thread hand-off) per object: writers in one
    /// directory contend on its lock in the kernel, and each put costs a `statx`, a `link` and
    /// an `unlink` more (docs/benchmarks.md has the measurements).
    async fn put_local(
        &self,
        local: &LocalFileSystem,
        items: &[(&Item, Known)],
    ) -> Result<(), Error> {
        let mut files = Vec::with_capacity(items.len());
        for (item, known) in items {
            let key = self.item_key(&item.collection, &item.id);
            let path = local.path_to_filesystem(&key).map_err(|e| {
                Error::Sink(format!(
                    "object store {}: no file path for {key} (item {}/{}): {e}",
                    self.shown, item.collection, item.id
                ))
            })?;
            files.push((path, item.content.clone(), *known == Known::New));
        }
        let shown = self.shown.clone();
        tokio::task::spawn_blocking(move || {
            for (path, content, new) in &files {
                write_whole(path, content, *new).map_err(|source| Error::Folder {
                    store: shown.clone(),
                    what: format!("cannot write {}", path.display()),
                    source,
                })?;
            }
            Ok::<(), Error>(())
        })
        .await
        .map_err(|e| Error::Internal(format!("the object writer task failed: {e}")))?
    }

    async fn put_item(&self, item: &Item, known: Known) -> Result<(), Error> {
        let key = self.item_key(&item.collection, &item.id);
        let fail = self.fail(format!(
            "writing {key} (item {}/{})",
            item.collection, item.id
        ));
        let payload = || PutPayload::from(item.content.clone());
        if known == Known::New {
            match self
                .store
                .put_opts(&key, payload(), PutMode::Create.into())
                .await
            {
                Ok(_) => return Ok(()),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let existing = self.store.get(&key).await.map_err(&fail)?;
                    if existing.bytes().await.map_err(&fail)? == item.content {
                        return Ok(());
                    }
                }
                // The store cannot put conditionally: overwrite, which is idempotent anyway.
                Err(object_store::Error::NotImplemented { .. }) => {}
                Err(e) => return Err(fail(e)),
            }
        }
        self.store.put(&key, payload()).await.map_err(&fail)?;
        Ok(())
    }

    /// Deletes the object of an item (absent is fine).
    pub async fn delete_item(&self, collection: &str, id: &str) -> Result<(), Error> {
        let key = self.item_key(collection, id);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(format!("deleting {key}"))(e)),
        }
    }

    /// Writes a collection's document, `{prefix}/{collection}/collection.json`.
    pub async fn put_collection(&self, collection: &str, content: Bytes) -> Result<(), Error> {
        let key = self.key(&format!(
            "{}/{COLLECTION_DOCUMENT}.json",
            encode_collection(collection)
        ));
        self.store
            .put(&key, PutPayload::from(content))
            .await
            .map_err(self.fail(format!("writing {key}")))?;
        Ok(())
    }

    /// The key of a snapshot file: `{prefix}/{collection}/items/{window}.{extension}`.
    pub fn snapshot_key(&self, collection: &str, window: &str, extension: &str) -> Path {
        self.key(&format!(
            "{}/items/{}.{extension}",
            encode_collection(collection),
            encode_segment(window)
        ))
    }

    /// Puts a local file whole at `key`, streamed (a multipart upload on cloud stores, a file
    /// renamed into place in a folder): readers see the old object or the new one, never half.
    pub async fn put_file(&self, key: &Path, file: &std::path::Path) -> Result<u64, Error> {
        use tokio::io::AsyncWriteExt;
        let fail = |e: std::io::Error| Error::Sink(format!("{}: writing {key}: {e}", self.shown));
        let mut upload = self.writer(key);
        // Read a megabyte at a time: each read of a tokio file is a hand-off to the blocking
        // pool, and `copy`'s own 8 KB reads made those hand-offs most of an upload's time.
        let source = tokio::fs::File::open(file).await.map_err(fail)?;
        let mut source = tokio::io::BufReader::with_capacity(COPY_BUFFER, source);
        let copied = match tokio::io::copy_buf(&mut source, &mut upload).await {
            Ok(copied) => copied,
            Err(e) => {
                // Nothing of a failed upload stays behind (a multipart upload is aborted).
                let _ = upload.abort().await;
                return Err(fail(e));
            }
        };
        upload.shutdown().await.map_err(fail)?;
        Ok(copied)
    }

    /// A writer of the object at `key`, whole or in parts of 10 MB: the object is there only
    /// once the writer is shut down, and an aborted writer leaves nothing behind (a local
    /// folder's part file, if a kill leaves it, is swept by [`ObjectSink::recover`]).
    pub fn writer(&self, key: &Path) -> object_store::buffered::BufWriter {
        // Two parts in flight: the default eight held 80 MB once reading kept up.
        object_store::buffered::BufWriter::new(self.store.clone(), key.clone())
            .with_max_concurrency(UPLOAD_PARTS_IN_FLIGHT)
    }

    /// Removes the object at `key`; removing what is not there succeeds.
    pub async fn delete_key(&self, key: &Path) -> Result<(), Error> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(format!("deleting {key}"))(e)),
        }
    }

    /// Writes a run's changes, `{prefix}/_changes/{run_id}.ndjson`.
    pub async fn put_changes(&self, run_id: &str, changes: &std::path::Path) -> Result<(), Error> {
        let key = self.key(&format!("_changes/{}.ndjson", encode_segment(run_id)));
        self.put_file(&key, changes).await.map(drop)
    }

    /// Removes what a killed run left half-written in `collections`; returns how many. Called
    /// by a single run holding the job's lock, never while workers may be writing.
    pub async fn recover(&self, collections: &[String]) -> Result<usize, Error> {
        let sink = self.clone();
        let collections = collections.to_vec();
        // A directory walk: kept off the async workers.
        tokio::task::spawn_blocking(move || sink.sweep_staging(&collections))
            .await
            .map_err(|e| Error::Internal(format!("the folder clean-up failed: {e}")))?
    }

    /// Writes a run's manifest.
    pub async fn put_manifest(&self, run_id: &str, manifest: Bytes) -> Result<(), Error> {
        let key = self.key(&format!("_runs/{}.json", encode_segment(run_id)));
        self.store
            .put(&key, PutPayload::from(manifest))
            .await
            .map_err(self.fail(format!("writing {key}")))?;
        Ok(())
    }
}

/// The name of a collection's document beside its items (`collection.json`).
const COLLECTION_DOCUMENT: &str = "collection";

/// The longest encoded id kept whole in a key: file systems limit a name to 255 bytes (ext4,
/// xfs), and `.json` and a writer's `#N` suffix need some of them.
const MAX_ID_SEGMENT: usize = 200;

/// An id's file name: its encoding, or, when that is too long for a file name, the first part
/// of it, `~`, and a BLAKE3 hash of the whole id. `~` never appears in an encoding, so the two
/// forms cannot meet, and two long ids share a name only if their hashes do; the row keeps the
/// id itself.
fn id_segment(id: &str) -> String {
    let encoded = encode_segment(id);
    // `{collection}/collection.json` is the collection's document.
    if encoded == COLLECTION_DOCUMENT {
        return "%63ollection".into();
    }
    if encoded.len() <= MAX_ID_SEGMENT {
        return encoded;
    }
    let hash = blake3::hash(id.as_bytes()).to_hex();
    // The encoding is ASCII: any cut is at a character boundary.
    format!("{}~{}", &encoded[..MAX_ID_SEGMENT - 65], &hash[..64])
}

/// Percent-encodes every byte outside `A-Z a-z 0-9 - _ .`, and a leading `.`, so the result is
/// one safe path segment (never `.`, `..`, or containing `/`) and distinct inputs stay distinct
/// (`%` itself is encoded).
pub fn encode_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for (i, byte) in raw.bytes().enumerate() {
        let plain =
            byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' || (byte == b'.' && i > 0);
        if plain {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    if out.is_empty() {
        // Ids are never empty (the page reader refuses them); keep the segment valid anyway.
        out.push_str("%00");
    }
    out
}

/// Like [`encode_segment`], with a leading `_` encoded too: `_runs` (and any `_name`) is ours.
pub fn encode_collection(raw: &str) -> String {
    match raw.strip_prefix('_') {
        Some(rest) => format!("%5F{}", encode_segment(rest).trim_start_matches("%00")),
        None => encode_segment(raw),
    }
}

/// Writes `content` to `path` whole. A `new` file is written on Linux unnamed (`O_TMPFILE`) and
/// linked in under its name once complete: one directory entry is made, where a staging name
/// renamed over the key costs two more operations on the folder, and a crash leaves nothing
/// behind. Otherwise (the file exists,
/// the folder does not yet, the filesystem cannot) it goes to a new `PATH#N` (the first free
/// N), renamed over `PATH`. Creates the folder if needed.
fn write_whole(path: &std::path::Path, content: &[u8], new: bool) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if new && link_whole(path, content)? {
        return Ok(());
    }
    #[cfg(not(target_os = "linux"))]
    let _ = new;
    write_renamed(path, content)
}

/// Writes `content` to a file without a name in `path`'s folder, then links it in as `path`;
/// `false` if that cannot be done here (no such folder, no `O_TMPFILE`, no `/proc`, or `path`
/// exists), and nothing was made.
#[cfg(target_os = "linux")]
fn link_whole(path: &std::path::Path, content: &[u8]) -> std::io::Result<bool> {
    use rustix::fs::{AtFlags, CWD, Mode, OFlags};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let Some(folder) = path.parent() else {
        return Ok(false);
    };
    let Ok(fd) = rustix::fs::open(
        folder,
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    ) else {
        return Ok(false);
    };
    let mut file = std::fs::File::from(fd);
    file.write_all(content)?;
    // The file's own descriptor, named through /proc: linking by descriptor alone
    // (`AT_EMPTY_PATH`) needs a capability that a process in a container rarely has.
    let named = format!("/proc/self/fd/{}", file.as_raw_fd());
    Ok(rustix::fs::linkat(CWD, named.as_str(), CWD, path, AtFlags::SYMLINK_FOLLOW).is_ok())
}

/// Writes `content` to a new `PATH#N` (the first free N), renamed over `PATH`. Creates the
/// folder if needed.
fn write_renamed(path: &std::path::Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::{ErrorKind, Write};
    let mut n = 1u32;
    let mut created_folder = false;
    let (mut file, staging) = loop {
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!("#{n}"));
        let staging = std::path::PathBuf::from(staging);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(file) => break (file, staging),
            // Another writer's temporary file (a worker writing the same item).
            Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) if e.kind() == ErrorKind::NotFound && !created_folder => {
                let Some(folder) = path.parent() else {
                    return Err(e);
                };
                std::fs::create_dir_all(folder)?;
                created_folder = true;
            }
            Err(e) => return Err(e),
        }
    };
    let written = file.write_all(content).and_then(|()| {
        drop(file);
        std::fs::rename(&staging, path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_too_long_for_a_file_name_gets_a_short_unique_one() {
        let long = "x".repeat(251);
        let longer = "é".repeat(100);
        let other = format!("{}y", "x".repeat(250));
        let names: Vec<String> = [&long, &longer, &other]
            .iter()
            .map(|id| id_segment(id))
            .collect();
        for name in &names {
            assert!(name.len() + ".json".len() < 255, "{name}");
            assert!(name.contains('~'), "{name}");
        }
        assert_ne!(names[0], names[2], "two long ids with the same start");
        assert_eq!(id_segment("short"), "short");
    }

    #[test]
    fn ids_cannot_escape_or_collide() {
        assert_eq!(encode_segment(".."), "%2E.");
        assert_eq!(encode_segment("a/b"), "a%2Fb");
        assert_eq!(encode_segment("a%2Fb"), "a%252Fb");
        assert_eq!(encode_segment("é\n"), "%C3%A9%0A");
        assert_eq!(encode_collection("_runs"), "%5Fruns");
        assert_ne!(encode_segment("a b"), encode_segment("a+b"));
        // `{collection}/collection.json` is the collection's document, never an item's.
        assert_eq!(id_segment("collection"), "%63ollection");
        assert_ne!(id_segment("collection"), id_segment("%63ollection"));
    }

    #[test]
    fn a_file_is_written_whole_in_a_new_folder_and_over_an_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c").join("a.json");
        // The folder does not exist yet.
        write_whole(&path, b"{\"v\":1}", true).expect("written");
        // Said to be new, but there: another writer made it first.
        write_whole(&path, b"{\"v\":2}", true).expect("written");
        let other = dir.path().join("c").join("b.json");
        write_whole(&other, b"{}", true).expect("written");
        write_whole(&other, b"{\"v\":3}", false).expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"v\":2}");
        assert_eq!(std::fs::read(&other).expect("read"), b"{\"v\":3}");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("c"))
            .expect("folder")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_half_written_object_is_swept_and_a_whole_one_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let sink = ObjectSink::from_url(&url, &BTreeMap::new()).expect("sink");
        let whole = sink
            .local
            .as_ref()
            .expect("a folder")
            .path_to_filesystem(&sink.item_key("s2", "a"))
            .expect("path");
        write_whole(&whole, b"{}", true).expect("written");
        let mut staged = whole.clone().into_os_string();
        staged.push("#1");
        std::fs::write(&staged, b"{").expect("staged");
        // A snapshot upload killed half-way leaves its staging file in `items/`.
        let snapshot = whole.with_file_name("items").join("2024.parquet#2");
        std::fs::create_dir_all(snapshot.parent().expect("items/")).expect("items/");
        std::fs::write(&snapshot, b"PAR1").expect("staged snapshot");

        assert_eq!(sink.sweep_staging(&["s2".into()]).expect("swept"), 2);
        assert!(!std::path::Path::new(&staged).exists());
        assert!(!snapshot.exists());
        assert_eq!(std::fs::read(&whole).expect("kept"), b"{}");
    }
}
