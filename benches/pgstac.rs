//! The pgstac output against pgstac's own bulk loader, in one run, on fresh pgstac databases:
//! the same pages of realistic items (about 15 KB of JSON each, made from the real EDS fixture
//! items, in a collection whose `item_assets` lists their assets, as EDS collections do) written
//! by stac-sync's write path (parse, classify, commit: its own rows and pgstac's, one page per
//! transaction) and by `pypgstac load items --method upsert` from NDJSON; first as new items,
//! then the same items changed (an upsert of every one).
//!
//! For each it prints items/s, the client's CPU per item (stac-sync: this process; pypgstac:
//! the child process), the server's CPU per item (every Postgres process, the ones that exited
//! included, through the postmaster's reaped-children time) and its share of all CPU, and the
//! client's peak RSS (stac-sync: this process, its peak reset before each pass; pages are read
//! from files one at a time, so it holds what a run holds; pypgstac: `/usr/bin/time`).
//! `STAC_SYNC_BENCH_ROUNDS=N` does it N times, each round on fresh databases with the other
//! writer going first, and prints each round's ratios and their median: on a 2-core machine the
//! ratio of one round moves by a third from run to run.
//!
//! ```text
//! cargo bench --bench pgstac                          # 20 pages of 1,000 items
//! STAC_SYNC_BENCH_AT_ONCE=2 STAC_SYNC_BENCH_ROUNDS=4 cargo bench --bench pgstac
//! STAC_SYNC_BENCH_PAGES=50 STAC_SYNC_BENCH_AT_ONCE=2 cargo bench --bench pgstac
//! STAC_SYNC_BENCH_ONLY=stac-sync cargo bench --bench pgstac   # without pypgstac, to profile
//! ```
//! Postgres comes from `STAC_SYNC_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`),
//! with PostGIS; pgstac is installed by `pypgstac migrate` (scripts/test installs both).

#[path = "../tests/common/mod.rs"]
#[allow(unused)]
mod common;

use bytes::Bytes;
use serde_json::{Value, json};
use stac_sync::mirror::db::Database;
use stac_sync::stac::reader;
use stac_sync::stac::search::Request;
use std::path::{Path, PathBuf};
use std::time::Instant;

const PER_PAGE: usize = 1000;
const COLLECTION: &str = "sentinel-2-l2a";

/// A page of realistic items; `revision` > 0 changes every item (a property).
fn page(number: usize, revision: u32) -> Bytes {
    let base = common::eds_items();
    let items: Vec<Value> = (0..PER_PAGE)
        .map(|i| {
            let item = &base[i % base.len()];
            let datetime = item["properties"]["datetime"]
                .as_str()
                .unwrap_or("2024-01-01T00:00:00Z");
            let mut item = common::realistic_item(
                item,
                &format!("S2-bench-{number:04}-{i:04}"),
                COLLECTION,
                datetime,
            );
            if revision > 0 {
                item["properties"]["bench:revision"] = json!(revision);
            }
            item
        })
        .collect();
    Bytes::from(
        serde_json::to_vec(&json!({"type": "FeatureCollection", "features": items, "links": []}))
            .unwrap_or_default(),
    )
}

/// The collection, its `item_assets` the realistic items' assets without their hrefs.
fn collection() -> Value {
    let item = common::realistic_item(
        &common::eds_items()[0],
        "x",
        COLLECTION,
        "2024-01-01T00:00:00Z",
    );
    let mut item_assets = serde_json::Map::new();
    for (key, asset) in item["assets"].as_object().into_iter().flatten() {
        let mut asset = asset.clone();
        if let Some(asset) = asset.as_object_mut() {
            asset.remove("href");
        }
        item_assets.insert(key.clone(), asset);
    }
    json!({"type": "Collection", "stac_version": "1.0.0", "id": COLLECTION,
        "description": "bench", "license": "other", "links": [], "item_assets": item_assets,
        "extent": {"spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
                   "temporal": {"interval": [[null, null]]}}})
}

/// `/proc/PID/stat`'s fields after the command name, and the command.
fn stat(pid: &str) -> Option<(String, Vec<f64>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = text.rsplit_once(')')?;
    let command = head.split_once('(')?.1.to_string();
    let fields = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    Some((command, fields))
}

/// Seconds of CPU in `fields` (utime and stime, and with `children` cutime and cstime; clock
/// ticks of 100 a second).
fn seconds(fields: &[f64], children: bool) -> f64 {
    let at = |n: usize| fields.get(n).copied().unwrap_or(0.0);
    (at(11) + at(12) + if children { at(13) + at(14) } else { 0.0 }) / 100.0
}

/// CPU seconds of this process, and of its waited-for children.
fn own_cpu() -> (f64, f64) {
    let fields = stat("self").map(|(_, f)| f).unwrap_or_default();
    let all = seconds(&fields, true);
    let own = seconds(&fields, false);
    (own, all - own)
}

/// CPU seconds of the Postgres server: every live `postgres` process, and what the postmaster
/// reaped of those that exited.
fn server_cpu() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some((command, fields)) = stat(&name)
            && (command == "postgres" || command.starts_with("postgres:"))
        {
            // The postmaster's parent is not a postgres process: count its children too.
            let parent = fields.get(1).map(|p| format!("{p}")).unwrap_or_default();
            let postmaster = stat(&parent).is_none_or(|(c, _)| !c.starts_with("postgres"));
            total += seconds(&fields, postmaster);
        }
    }
    total
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What a pass cost.
struct Usage {
    items: usize,
    wall: f64,
    client_cpu: f64,
    server_cpu: f64,
    peak_rss_mb: f64,
}

impl Usage {
    fn row(&self, who: &str, pass: &str) -> String {
        let per = |s: f64| s * 1e6 / self.items as f64;
        format!(
            "{who:<14} {pass:<8} {:>9.0} {:>16.1} {:>16.1} {:>12.0}% {:>12.0}",
            self.items as f64 / self.wall,
            per(self.client_cpu),
            per(self.server_cpu),
            self.server_cpu / (self.server_cpu + self.client_cpu) * 100.0,
            self.peak_rss_mb,
        )
    }
}

/// stac-sync's write path over the page files, `at_once` pages (of as many partitions)
/// committed at once.
async fn stac_sync(db: &Database, files: &[PathBuf], request: &Request, at_once: usize) -> Usage {
    // Resets this process's peak RSS (VmHWM) to what it holds now.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (cpu, server) = (own_cpu().0, server_cpu());
    let started = Instant::now();
    let mut items = 0;
    for chunk in files.chunks(at_once) {
        let pages: Vec<reader::Page> = chunk
            .iter()
            .map(|file| {
                let body = Bytes::from(std::fs::read(file).unwrap_or_else(|e| panic!("{e}")));
                reader::parse_page(&body, request, None).unwrap_or_else(|e| panic!("page: {e}"))
            })
            .collect();
        items += pages.iter().map(|page| page.items.len()).sum::<usize>();
        for committed in common::commit_pages(db, &pages, request).await {
            assert!(committed.refused.is_empty(), "{:?}", committed.refused);
        }
    }
    Usage {
        items,
        wall: started.elapsed().as_secs_f64(),
        client_cpu: own_cpu().0 - cpu,
        server_cpu: server_cpu() - server,
        peak_rss_mb: peak_rss_mb(),
    }
}

/// `pypgstac load <table> <file> --method upsert`, timed around the command.
fn pypgstac(dsn: &str, table: &str, file: &Path, items: usize, dir: &Path) -> Usage {
    let rss_file = dir.join("rss");
    let (cpu, server) = (own_cpu().1, server_cpu());
    let started = Instant::now();
    let status = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(&rss_file)
        .args(["pypgstac", "load", table])
        .arg(file)
        .args(["--dsn", dsn, "--method", "upsert"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("pypgstac: {e}"));
    let wall = started.elapsed().as_secs_f64();
    assert!(status.success(), "pypgstac load {table}");
    let rss_kb: f64 = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|t| t.lines().last()?.trim().parse().ok())
        .unwrap_or(0.0);
    Usage {
        items,
        wall,
        client_cpu: own_cpu().1 - cpu,
        server_cpu: server_cpu() - server,
        peak_rss_mb: rss_kb / 1024.0,
    }
}

/// The pages of `revision`, one file each, and all their items in one NDJSON file.
fn write_pages(
    dir: &Path,
    count: usize,
    revision: u32,
    request: &Request,
) -> (Vec<PathBuf>, PathBuf) {
    use std::io::Write as _;
    let ndjson_path = dir.join(format!("items-{revision}.ndjson"));
    let mut ndjson = std::io::BufWriter::new(
        std::fs::File::create(&ndjson_path).unwrap_or_else(|e| panic!("{e}")),
    );
    let files = (0..count)
        .map(|number| {
            let body = page(number, revision);
            let parsed =
                reader::parse_page(&body, request, None).unwrap_or_else(|e| panic!("page: {e}"));
            for item in &parsed.items {
                ndjson
                    .write_all(&item.content)
                    .and_then(|()| ndjson.write_all(b"\n"))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            let file = dir.join(format!("page-{revision}-{number:04}.json"));
            std::fs::write(&file, &body).unwrap_or_else(|e| panic!("{e}"));
            file
        })
        .collect();
    ndjson.flush().unwrap_or_else(|e| panic!("{e}"));
    (files, ndjson_path)
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::var("STAC_SYNC_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let at_once: usize = std::env::var("STAC_SYNC_BENCH_AT_ONCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let request =
        Request::get(url::Url::parse("http://bench/search").unwrap_or_else(|e| panic!("{e}")));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (new_files, new_ndjson) = write_pages(dir.path(), count, 0, &request);
    let (changed_files, changed_ndjson) = write_pages(dir.path(), count, 1, &request);
    let item_kb = std::fs::metadata(&new_ndjson).map_or(0, |m| m.len()) as f64
        / (count * PER_PAGE) as f64
        / 1024.0;
    let collection = collection();
    let collection_file = dir.path().join("collection.json");
    std::fs::write(&collection_file, collection.to_string()).unwrap_or_else(|e| panic!("{e}"));

    let rounds: usize = std::env::var("STAC_SYNC_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let only_ours = std::env::var("STAC_SYNC_BENCH_ONLY").is_ok_and(|only| only == "stac-sync");
    println!(
        "pgstac: {count} pages of {PER_PAGE} items, {item_kb:.1} KB of JSON per item, \
         {} item_assets; stac-sync commits {at_once} page(s) at once; {rounds} round(s)",
        collection["item_assets"].as_object().map_or(0, |a| a.len())
    );
    println!(
        "{:<5} {:<14} {:<8} {:>9} {:>16} {:>16} {:>13} {:>12}",
        "round",
        "writer",
        "items",
        "items/s",
        "client µs/item",
        "server µs/item",
        "server share",
        "peak RSS MB"
    );
    let ours_pass = || async {
        // stac-sync into a fresh pgstac database: new items, then the same items changed.
        let ours = common::fresh_pgstac().await;
        let db = Database::connect_as(&ours, stac_sync::config::DatabaseFormat::Pgstac)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        db.migrate().await.unwrap_or_else(|e| panic!("{e}"));
        db.store_collection("sentinel-2-l2a", &collection.to_string(), "", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let new = stac_sync(&db, &new_files, &request, at_once).await;
        let changed = stac_sync(&db, &changed_files, &request, at_once).await;
        (new, changed)
    };
    let theirs_pass = || async {
        // pypgstac into another.
        let theirs = common::fresh_pgstac().await;
        let dsn = theirs.split('?').next().unwrap_or(&theirs).to_string();
        pypgstac(&dsn, "collections", &collection_file, 1, dir.path());
        let items = count * PER_PAGE;
        let new = pypgstac(&dsn, "items", &new_ndjson, items, dir.path());
        let changed = pypgstac(&dsn, "items", &changed_ndjson, items, dir.path());
        (new, changed)
    };
    let ratio = |a: &Usage, b: &Usage| (a.items as f64 / a.wall) / (b.items as f64 / b.wall);
    let (mut new_ratios, mut changed_ratios) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        if only_ours {
            let (new, changed) = ours_pass().await;
            println!("{round:<5} {}", new.row("stac-sync", "new"));
            println!("{round:<5} {}", changed.row("stac-sync", "changed"));
            continue;
        }
        // The writers take turns going first, so that neither always runs on what the other
        // left behind (a server still writing back, a warm or cold cache).
        let ((ours_new, ours_changed), (theirs_new, theirs_changed)) = if round % 2 == 1 {
            let ours = ours_pass().await;
            (ours, theirs_pass().await)
        } else {
            let theirs = theirs_pass().await;
            (ours_pass().await, theirs)
        };
        println!("{round:<5} {}", ours_new.row("stac-sync", "new"));
        println!("{round:<5} {}", theirs_new.row("pypgstac load", "new"));
        println!("{round:<5} {}", ours_changed.row("stac-sync", "changed"));
        println!(
            "{round:<5} {}",
            theirs_changed.row("pypgstac load", "changed")
        );
        new_ratios.push(ratio(&ours_new, &theirs_new));
        changed_ratios.push(ratio(&ours_changed, &theirs_changed));
    }
    if only_ours {
        return;
    }
    let shown = |ratios: &[f64]| {
        ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "stac-sync / pypgstac: new {} (median {:.2}x), changed {} (median {:.2}x) \
         (target: at least 1.5x)",
        shown(&new_ratios),
        median(&mut new_ratios),
        shown(&changed_ratios),
        median(&mut changed_ratios)
    );
}

/// The median of `values` (not empty).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() % 2 {
        0 if mid > 0 => (values[mid - 1] + values[mid]) / 2.0,
        _ => values.get(mid).copied().unwrap_or(f64::NAN),
    }
}
