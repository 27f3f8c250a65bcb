//! The floor of a GeoParquet snapshot: what the libraries it uses cost on their own, per item,
//! on one core, with nothing of stac-sync's between them.
//!
//! - `read`: the live items' texts read from a SQLite mirror through sqlx in the snapshot's
//!   order, by one query taken 150 rows at a time (the snapshot writer asks for pages of 150,
//!   one query each, so this is a little less than it reads for);
//! - `lex`: each text parsed by serde_json and thrown away (`IgnoredAny`: every byte checked,
//!   no number converted, nothing kept), less than decoding it into columns costs;
//! - `write`: the Parquet file stac-sync wrote for that window, read back into batches of 150
//!   rows, then written again with the snapshot's writer properties into a temporary file (the
//!   writer's own work: levels, dictionaries, statistics, zstd).
//!
//! ```text
//! cargo run --release --example snapshot_floor -- DATABASE.db FILE.parquet
//! ```
//! Prints one line per stage: `stage items seconds µs/item`.

use futures_util::TryStreamExt;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::de::{Deserialize, IgnoredAny};
use std::time::{Duration, Instant};

const PAGE: usize = 150;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(database), Some(file)) = (args.next(), args.next()) else {
        return Err("usage: snapshot_floor DATABASE.db FILE.parquet".into());
    };

    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{database}?mode=ro"))
        .await?;
    let (mut read, mut lex, mut items) = (Duration::ZERO, Duration::ZERO, 0usize);
    let mut rows = sqlx::query_scalar::<_, String>(
        "SELECT CAST(content AS TEXT) FROM items WHERE deleted_at IS NULL \
         ORDER BY collection, datetime, id",
    )
    .fetch(&pool);
    let mut page = Vec::with_capacity(PAGE);
    loop {
        let started = Instant::now();
        page.clear();
        while page.len() < PAGE {
            match rows.try_next().await? {
                Some(text) => page.push(text),
                None => break,
            }
        }
        read += started.elapsed();
        if page.is_empty() {
            break;
        }
        let started = Instant::now();
        for text in &page {
            let mut de = serde_json::Deserializer::from_str(text);
            IgnoredAny::deserialize(&mut de)?;
            de.end()?;
        }
        lex += started.elapsed();
        items += page.len();
    }
    report("read", items, read);
    report("lex", items, lex);

    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file)?)?
        .with_batch_size(PAGE)
        .build()?;
    let schema = arrow_array::RecordBatchReader::schema(&reader);
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let properties = stac_sync::mirror::snapshot::writer_properties()?;
    let out = tempfile::tempfile()?;
    let started = Instant::now();
    let mut writer = ArrowWriter::try_new(out, schema, Some(properties))?;
    for batch in &batches {
        writer.write(batch)?;
    }
    writer.close()?;
    report("write", rows, started.elapsed());
    Ok(())
}

fn report(stage: &str, items: usize, took: Duration) {
    let seconds = took.as_secs_f64();
    println!(
        "{stage} {items} {seconds:.2} {:.1}",
        seconds * 1e6 / items.max(1) as f64
    );
}
