//! What hashing an item's bytes costs: every item received is hashed to know whether it
//! changed, so on an incremental run this is paid for each unchanged item. Times BLAKE3 (what
//! `content_hash` was, and what rows stored by earlier versions hold) against XXH3-128 (what it
//! is now) over the
//! same realistic items (about 15 KB each, see `common::realistic_item`), alternating rounds:
//! 30 items, which stay in the core's cache as an item just parsed does in a run, and 2,000
//! (30 MB), read from memory.
//!
//! ```text
//! cargo bench --bench content_hash
//! ```

#[path = "../tests/common/mod.rs"]
#[allow(unused)]
mod common;

use std::hint::black_box;
use std::time::Instant;

fn main() {
    for (items, rounds) in [(30, 500), (2000, 10)] {
        measure(items, rounds);
    }
}

fn measure(count: usize, rounds: usize) {
    let base = common::eds_items();
    let items: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let item = common::realistic_item(
                &base[i % base.len()],
                &format!("S2-hash-{i:05}"),
                "sentinel-2-l2a",
                "2024-01-01T00:00:00Z",
            );
            serde_json::to_vec(&item).unwrap_or_default()
        })
        .collect();
    let bytes: usize = items.iter().map(Vec::len).sum();
    let mut best = [f64::MAX; 2];
    for _ in 0..rounds {
        let start = Instant::now();
        for item in &items {
            black_box(blake3::hash(black_box(item)));
        }
        best[0] = best[0].min(start.elapsed().as_secs_f64());
        let start = Instant::now();
        for item in &items {
            black_box(stac_sync::stac::reader::content_hash(black_box(item)));
        }
        best[1] = best[1].min(start.elapsed().as_secs_f64());
    }
    println!(
        "{count} items of {} bytes on average, best of {rounds} rounds",
        bytes / count
    );
    for (name, seconds) in ["BLAKE3 (before)", "content_hash (XXH3-128, hex)"]
        .iter()
        .zip(best)
    {
        println!(
            "{name:30} {:6.2} µs/item  {:5.1} GB/s",
            seconds * 1e6 / count as f64,
            bytes as f64 / seconds / 1e9
        );
    }
}
