//! The write path alone: pages of 1,000 realistic items (Sentinel-2 L2A-like, about 15 KB of
//! JSON each, made from the real EDS fixture items) parsed, classified and committed, into
//! SQLite and into Postgres; then the same pages again (all unchanged). It prints the time per
//! item spent reading pages and spent classifying and committing them. On Postgres it also
//! commits two pages (of two partitions) at once, on new items, as a run does (rows `x2`). The
//! baseline, measured in the same run on the same database, is the simplest correct writer: one
//! INSERT per item, one transaction per page. On Postgres it also measures the floor: what the
//! server takes in at all, the items' bytes alone `COPY`ed into a table of one `jsonb` column (no
//! key, no index, no upsert), one page per `COPY`, one or two at once.
//!
//! ```text
//! cargo bench --bench write_path            # 20 pages of 1,000 items
//! STAC_SYNC_BENCH_PAGES=50 cargo bench --bench write_path
//! ```
//! Postgres comes from `STAC_SYNC_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`).

#[path = "../tests/common/mod.rs"]
#[allow(unused)]
mod common;

use bytes::Bytes;
use serde_json::{Value, json};
use stac_sync::mirror::db::Database;
use stac_sync::stac::reader;
use stac_sync::stac::search::Request;
use std::time::Instant;

const PER_PAGE: usize = 1000;

/// A page of realistic items (about 15 KB each, see `common::realistic_item`).
fn realistic_page(number: usize) -> Bytes {
    let base = common::eds_items();
    let items: Vec<Value> = (0..PER_PAGE)
        .map(|i| {
            let item = &base[i % base.len()];
            let datetime = item["properties"]["datetime"]
                .as_str()
                .unwrap_or("2024-01-01T00:00:00Z");
            common::realistic_item(
                item,
                &format!("S2-bench-{number:04}-{i:04}"),
                "sentinel-2-l2a",
                datetime,
            )
        })
        .collect();
    Bytes::from(
        serde_json::to_vec(&json!({"type": "FeatureCollection", "features": items, "links": []}))
            .unwrap_or_default(),
    )
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What a pass measured.
struct Pass {
    items_per_s: f64,
    /// Reading the pages (JSON → items), µs per item.
    parse_us: f64,
    /// Classifying and committing them, µs per item.
    write_us: f64,
}

/// stac-sync's write path over `pages`, `at_once` pages (of as many partitions) committed at
/// once, as a run on Postgres does.
async fn stac_sync_pass(db: &Database, pages: &[Bytes], request: &Request, at_once: usize) -> Pass {
    let started = Instant::now();
    let mut items = 0;
    let mut parsing = 0.0;
    for bodies in pages.chunks(at_once) {
        let parse_started = Instant::now();
        let parsed: Vec<reader::Page> = bodies
            .iter()
            .map(|body| {
                reader::parse_page(body, request, None).unwrap_or_else(|e| panic!("page: {e}"))
            })
            .collect();
        parsing += parse_started.elapsed().as_secs_f64();
        items += parsed.iter().map(|page| page.items.len()).sum::<usize>();
        common::commit_pages(db, &parsed, request).await;
    }
    let total = started.elapsed().as_secs_f64();
    Pass {
        items_per_s: items as f64 / total,
        parse_us: parsing * 1e6 / items as f64,
        write_us: (total - parsing) * 1e6 / items as f64,
    }
}

/// One INSERT per item, one transaction per page: the simplest correct writer.
async fn baseline_pass(db: &Database, pages: &[Bytes], request: &Request) -> f64 {
    let started = Instant::now();
    let mut items = 0;
    for body in pages {
        let page = reader::parse_page(body, request, None).unwrap_or_else(|e| panic!("page: {e}"));
        match db {
            Database::Postgres(pg) => {
                let mut tx = pg.pool().begin().await.unwrap_or_else(|e| panic!("{e}"));
                for item in &page.items {
                    sqlx::query("INSERT INTO baseline (collection, id, content) VALUES ($1, $2, $3::jsonb) ON CONFLICT (collection, id) DO UPDATE SET content = excluded.content")
                        .bind(&item.collection)
                        .bind(&item.id)
                        .bind(std::str::from_utf8(&item.content).unwrap_or_default())
                        .execute(&mut *tx)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
                tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
            }
            Database::Sqlite(lite) => {
                let mut tx = lite.pool().begin().await.unwrap_or_else(|e| panic!("{e}"));
                for item in &page.items {
                    sqlx::query("INSERT INTO baseline (collection, id, content) VALUES (?, ?, ?) ON CONFLICT (collection, id) DO UPDATE SET content = excluded.content")
                        .bind(&item.collection)
                        .bind(&item.id)
                        .bind(std::str::from_utf8(&item.content).unwrap_or_default())
                        .execute(&mut *tx)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
                tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
            }
        }
        items += page.items.len();
    }
    items as f64 / started.elapsed().as_secs_f64()
}

/// The floor on Postgres: the pages' items, `at_once` pages at a time, each page one `COPY` of
/// the items' bytes alone into a table of one `jsonb` column. Items/s; `None` on SQLite.
async fn copy_floor(
    db: &Database,
    pages: &[Bytes],
    request: &Request,
    at_once: usize,
) -> Option<f64> {
    let Database::Postgres(pg) = db else {
        return None;
    };
    sqlx::query("CREATE TABLE IF NOT EXISTS floor (content JSONB COMPRESSION lz4)")
        .execute(pg.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let mut items = 0;
    for bodies in pages.chunks(at_once) {
        let copies = bodies.iter().map(|body| async move {
            let page =
                reader::parse_page(body, request, None).unwrap_or_else(|e| panic!("page: {e}"));
            // COPY's text format: one row per line, with backslash, newline, carriage return
            // and tab escaped.
            let mut rows = Vec::with_capacity(body.len() + page.items.len());
            for item in &page.items {
                for &b in item.content.iter() {
                    match b {
                        b'\\' => rows.extend_from_slice(b"\\\\"),
                        b'\n' => rows.extend_from_slice(b"\\n"),
                        b'\r' => rows.extend_from_slice(b"\\r"),
                        b'\t' => rows.extend_from_slice(b"\\t"),
                        _ => rows.push(b),
                    }
                }
                rows.push(b'\n');
            }
            let mut conn = pg.pool().acquire().await.unwrap_or_else(|e| panic!("{e}"));
            let mut copy = conn
                .copy_in_raw("COPY floor (content) FROM STDIN")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            copy.send(rows).await.unwrap_or_else(|e| panic!("{e}"));
            copy.finish().await.unwrap_or_else(|e| panic!("{e}"));
            page.items.len()
        });
        items += futures_util::future::join_all(copies)
            .await
            .into_iter()
            .sum::<usize>();
    }
    Some(items as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::var("STAC_SYNC_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let pages: Vec<Bytes> = (0..count).map(realistic_page).collect();
    let item_kb = pages[0].len() as f64 / PER_PAGE as f64 / 1024.0;
    let request =
        Request::get(url::Url::parse("http://bench/search").unwrap_or_else(|e| panic!("{e}")));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    let postgres = common::fresh_postgres().await;
    println!("write path: {count} pages of {PER_PAGE} items, {item_kb:.1} KB of JSON per item");
    println!(
        "{:<12} {:>17} {:>22} {:>7} {:>18} {:>18} {:>18} {:>15} {:>9}",
        "database",
        "baseline items/s",
        "stac-sync new items/s",
        "ratio",
        "new: parse µs/item",
        "new: write µs/item",
        "unchanged items/s",
        "floor items/s",
        "of floor",
    );
    for (name, url, table) in [
        (
            "sqlite",
            sqlite.as_str(),
            "CREATE TABLE baseline (collection TEXT, id TEXT, content TEXT, PRIMARY KEY (collection, id))",
        ),
        (
            "postgres",
            postgres.as_str(),
            "CREATE TABLE baseline (collection TEXT, id TEXT, content JSONB COMPRESSION lz4, PRIMARY KEY (collection, id))",
        ),
    ] {
        let db = Database::connect(url)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        db.migrate().await.unwrap_or_else(|e| panic!("{e}"));
        common::execute(url, table).await;
        let baseline = baseline_pass(&db, &pages, &request).await;
        // A run commits two pages at once on Postgres, one at a time on SQLite; on Postgres
        // both are measured, the second on new items.
        let ways: &[(usize, usize)] = match db {
            Database::Sqlite(_) => &[(1, 0)],
            Database::Postgres(_) => &[(1, 0), (2, count)],
        };
        for &(at_once, first) in ways {
            let fresh: Vec<Bytes>;
            let pages = if first == 0 {
                &pages
            } else {
                fresh = (first..first + count).map(realistic_page).collect();
                &fresh
            };
            let new = stac_sync_pass(&db, pages, &request, at_once).await;
            let unchanged = stac_sync_pass(&db, pages, &request, at_once).await;
            let (floor, of_floor) = match copy_floor(&db, pages, &request, at_once).await {
                Some(floor) => (
                    format!("{floor:.0}"),
                    format!("{:.0}%", new.items_per_s / floor * 100.0),
                ),
                None => ("-".to_string(), "-".to_string()),
            };
            println!(
                "{:<12} {baseline:>17.0} {:>22.0} {:>6.2}x {:>18.1} {:>18.1} {:>18.0} {floor:>15} {of_floor:>9}",
                format!("{name} x{at_once}"),
                new.items_per_s,
                new.items_per_s / baseline,
                new.parse_us,
                new.write_us,
                unchanged.items_per_s,
            );
        }
    }
    println!("peak RSS of the benchmark process: {:.0} MB", peak_rss_mb());
}
