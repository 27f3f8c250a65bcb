//! Snapshot files: the live items of one collection and datetime window, from the database,
//! at `{prefix}/{collection}/items/{window}.parquet` (stac-geoparquet) or `.ndjson`.
//!
//! A window is read from the database a page at a time, never held whole, and written to a
//! local temporary file, which is then put whole. stac-geoparquet has one schema per file,
//! inferred from the items, and `stac`'s streaming writer fixes it from the first batch (a
//! later batch with another property fails, or loses the property). So each batch is encoded
//! as `stac` encodes it (`encode.rs`), into the file's schema when its values fit it, else in
//! its own and then widened to the file's (a property it lacks is null, an integer column of
//! it is a float column of the file); a batch the schema cannot hold (a property the earlier
//! batches lacked) widens the schema, and the file is written again, from the start, with the
//! schema of all the batches (a second read of the window, only then).

use super::db::{Database, window_range};
use super::encode::{Encoded, Target, encode};
use super::objects::ObjectSink;
use crate::config::SnapshotWindow;
use crate::error::Error;
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch, StructArray, new_null_array};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use futures_util::{StreamExt, TryStreamExt};
use geoparquet::metadata::{GeoParquetBboxCovering, GeoParquetCovering};
use geoparquet::writer::{GeoParquetRecordBatchEncoder, GeoParquetWriterOptionsBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use std::sync::Arc;

/// Items encoded at a time, by one task of the blocking pool: the batch's texts and its Arrow
/// are in memory at once. With one batch being read, one per core encoded and one written, 250
/// items took a 200,000-item window past 200 MB (docs/benchmarks.md).
const BATCH_ITEMS: usize = 150;
/// Items read at a time for an NDJSON file.
const NDJSON_PAGE: usize = 250;
/// Rows of a Parquet row group. parquet-rs keeps every finished group's metadata (a few
/// hundred bytes per column, and items have hundreds of leaf columns) until the footer, so
/// small groups make memory and the footer grow with the window; large groups are cheap to
/// hold open only because pages are flushed small (below). docs/benchmarks.md has the
/// measurements.
const ROW_GROUP_ROWS: usize = 50_000;
/// Rows of a data page at most. The open group holds each column's current page uncompressed
/// (a dictionary column's as an index per row), so the page, not the group, bounds that.
const PAGE_ROWS: usize = 1_024;
/// Bytes of a data page, and of a dictionary page, at most: the same bound for wide values.
const PAGE_BYTES: usize = 64 * 1024;
/// zstd level: files about as small as stac's default (15), written several times faster. The
/// writer keeps a compression context per column, and level 1's are the smallest, for files
/// slightly larger than level 3's (docs/benchmarks.md).
const ZSTD_LEVEL: i32 = 1;

/// A snapshot file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// stac-geoparquet.
    Geoparquet,
    /// One item JSON per line, as stored.
    Ndjson,
}

impl Format {
    /// The file name's extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Geoparquet => "parquet",
            Format::Ndjson => "ndjson",
        }
    }
}

/// What writing one window did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    /// Items in the file (0: the window is empty and its file removed).
    pub items: u64,
    /// The file's size in bytes.
    pub bytes: u64,
}

/// Rewrites the file of one window of `collection` from the database: the window's live items
/// in order, put whole; an empty window's file is removed. `document` is the collection's
/// document, kept in the file's stac-geoparquet metadata.
pub async fn write_window(
    db: &Database,
    sink: &ObjectSink,
    (collection, window): (&str, &str),
    size: SnapshotWindow,
    format: Format,
    document: Option<&str>,
) -> Result<Written, Error> {
    let key = sink.snapshot_key(collection, window, format.extension());
    let what = format!("collection {collection}, window {window} ({key})");
    if format == Format::Ndjson {
        return ndjson(db, sink, &key, (collection, window), size, &what).await;
    }
    // A Parquet file is written again from its start when a later batch widens its schema:
    // it is made in a temporary file and put once whole.
    let file = tempfile::NamedTempFile::new().map_err(|e| {
        Error::Sink(format!(
            "{what}: cannot create a temporary file for the snapshot ({e}); set TMPDIR to a \
             folder with space"
        ))
    })?;
    let mut schema = None;
    let items = loop {
        match parquet(
            db,
            (collection, window),
            size,
            &file,
            schema,
            document,
            &what,
        )
        .await?
        {
            Pass::Written(items) => break items,
            Pass::Widened(wider) => schema = Some(wider),
        }
    };
    if items == 0 {
        sink.delete_key(&key).await?;
        return Ok(Written::default());
    }
    let bytes = sink.put_file(&key, file.path()).await?;
    Ok(Written { items, bytes })
}

/// How a pass over a window ended.
enum Pass {
    /// The file is written, with this many items.
    Written(u64),
    /// A batch did not fit the schema: the schema of every batch, for another pass.
    Widened(SchemaRef),
}

/// The file's target schema, as the batches read so far have made it.
type Current = Arc<std::sync::Mutex<Option<Arc<Target>>>>;

/// The window's batches, encoded in order by a task of their own so that they are read and
/// encoded while the caller writes the ones before: on the blocking pool, one per core at
/// once, each against the `target` schema as it stands when the batch is read.
fn encoded_batches(
    db: &Database,
    (collection, window): (&str, &str),
    size: SnapshotWindow,
    target: Current,
    what: &str,
) -> tokio::sync::mpsc::Receiver<Result<Encoded, Error>> {
    let (send, receive) = tokio::sync::mpsc::channel(1);
    let (db, what) = (db.clone(), what.to_string());
    let (collection, window) = (collection.to_string(), window.to_string());
    let in_flight = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::spawn(async move {
        let current = || target.lock().map_or(None, |t| t.clone());
        let what = what.as_str();
        let mut encoded = db
            .window_pages(&collection, &window, size, BATCH_ITEMS)
            .map(|texts| {
                let target = current();
                // Started as soon as its page is read: a future's body runs only when polled,
                // and this task stops polling them while it waits to hand the writer a batch.
                let encoding = texts.map(|texts| {
                    tokio::task::spawn_blocking(move || encode(&texts, target.as_deref()))
                });
                async move {
                    encoding?
                        .await
                        .map_err(|e| Error::Sink(format!("{what}: encoding stopped: {e}")))?
                        .map_err(|e| Error::Sink(format!("{what}: {e}")))
                }
            })
            .buffered(in_flight);
        while let Some(batch) = encoded.next().await {
            let failed = batch.is_err();
            // The receiver gone, the pass has ended.
            if send.send(batch).await.is_err() || failed {
                break;
            }
        }
    });
    receive
}

/// Writes the window's items into `file` with `schema` (or the first batch's); when a batch
/// does not fit it, reads on only to learn the schema of every batch.
async fn parquet(
    db: &Database,
    (collection, window): (&str, &str),
    size: SnapshotWindow,
    file: &tempfile::NamedTempFile,
    mut schema: Option<SchemaRef>,
    document: Option<&str>,
    what: &str,
) -> Result<Pass, Error> {
    let fail = |e: std::io::Error| Error::Sink(format!("{what}: the temporary file: {e}"));
    file.as_file().set_len(0).map_err(fail)?;
    let mut writer: Option<ParquetFile> = None;
    let mut widened = false;
    let target = Arc::new(std::sync::Mutex::new(
        schema.clone().map(|s| Arc::new(Target::new(s))),
    ));
    let mut encoded = encoded_batches(db, (collection, window), size, target.clone(), what);
    while let Some(encoded) = encoded.recv().await {
        let encoded = encoded?;
        let batch = match encoded {
            // Encoded into the file's schema: nothing to merge.
            Encoded::Fits(batch, into)
                if schema.as_ref().is_some_and(|s| Arc::ptr_eq(s, &into)) =>
            {
                batch
            }
            Encoded::Fits(batch, own) | Encoded::Own(batch, own) => {
                let wider = merge_schemas(schema.as_deref().unwrap_or(&own), &own)
                    .map_err(|why| Error::Sink(format!("{what}: {why}")))?;
                // The first batch sets the schema; a later one that does not fit widens it,
                // and this pass only reads on.
                if schema.as_deref() != Some(&wider) {
                    widened |= schema.is_some();
                    let wider = Arc::new(wider);
                    if let Ok(mut target) = target.lock() {
                        *target = Some(Arc::new(Target::new(wider.clone())));
                    }
                    schema = Some(wider);
                }
                batch
            }
        };
        let Some(schema) = schema.as_ref().filter(|_| !widened) else {
            continue;
        };
        let writer = match &mut writer {
            Some(writer) => writer,
            None => writer.insert(ParquetFile::new(
                file.reopen().map_err(fail)?,
                schema,
                document,
                what,
            )?),
        };
        writer.write(&batch, what)?;
    }
    match (widened, schema, writer) {
        (true, Some(schema), _) => Ok(Pass::Widened(schema)),
        (_, _, Some(writer)) => writer.finish(what).map(Pass::Written),
        _ => Ok(Pass::Written(0)),
    }
}

/// Writes the window's items, one per line, as stored, straight to the store (the file is
/// as large as the window's items, so it is not written to a temporary file first); an empty
/// window's file is removed, and a failed write leaves the file before it.
async fn ndjson(
    db: &Database,
    sink: &ObjectSink,
    key: &object_store::path::Path,
    (collection, window): (&str, &str),
    size: SnapshotWindow,
    what: &str,
) -> Result<Written, Error> {
    let mut upload = sink.writer(key);
    let mut written = Written::default();
    let mut pages = db.window_pages(collection, window, size, NDJSON_PAGE);
    let lines = async {
        while let Some(texts) = pages.try_next().await? {
            let mut lines = Vec::with_capacity(texts.iter().map(|t| t.len() + 1).sum());
            for text in &texts {
                lines.extend_from_slice(text.as_bytes());
                lines.push(b'\n');
            }
            written.items += texts.len() as u64;
            written.bytes += lines.len() as u64;
            upload
                .put(lines.into())
                .await
                .map_err(sink.fail(format!("{what}: writing")))?;
        }
        Ok::<(), Error>(())
    };
    if let Err(e) = lines.await {
        let _ = upload.abort().await;
        return Err(e);
    }
    if written.items == 0 {
        let _ = upload.abort().await;
        sink.delete_key(key).await?;
        return Ok(Written::default());
    }
    tokio::io::AsyncWriteExt::shutdown(&mut upload)
        .await
        .map_err(|e| Error::Sink(format!("{what}: writing: {e}")))?;
    Ok(written)
}

/// How a snapshot's Parquet is written: compression, row groups, pages, statistics.
pub fn writer_properties() -> Result<WriterProperties, parquet::errors::ParquetError> {
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_data_page_size_limit(PAGE_BYTES)
        .set_dictionary_page_size_limit(PAGE_BYTES)
        // Statistics per column chunk, which readers prune row groups by; no page index, whose
        // entries per page would stay in memory until the footer.
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_offset_index_disabled(true)
        .build())
}

/// A stac-geoparquet file being written.
struct ParquetFile {
    schema: SchemaRef,
    encoder: GeoParquetRecordBatchEncoder,
    writer: ArrowWriter<std::fs::File>,
    stac: KeyValue,
    rows: u64,
}

impl ParquetFile {
    fn new(
        file: std::fs::File,
        schema: &SchemaRef,
        document: Option<&str>,
        what: &str,
    ) -> Result<ParquetFile, Error> {
        let fail = |e: String| Error::Sink(format!("{what}: {e}"));
        let options = GeoParquetWriterOptionsBuilder::default()
            .set_primary_column("geometry".to_string())
            .build();
        let encoder = GeoParquetRecordBatchEncoder::try_new(schema, &options)
            .map_err(|e| fail(e.to_string()))?;
        let properties = writer_properties().map_err(|e| fail(e.to_string()))?;
        let writer = ArrowWriter::try_new(file, encoder.target_schema(), Some(properties))
            .map_err(|e| fail(e.to_string()))?;
        // The collection, as stac-geoparquet's metadata carries it.
        let mut metadata = stac::geoparquet::Metadata::default();
        if let Some(collection) =
            document.and_then(|d| serde_json::from_str::<stac::Collection>(d).ok())
        {
            metadata
                .collections
                .insert(collection.id.clone(), collection);
        }
        let stac = KeyValue::new(
            stac::geoparquet::METADATA_KEY.to_string(),
            serde_json::to_string(&metadata).map_err(|e| fail(e.to_string()))?,
        );
        Ok(ParquetFile {
            schema: schema.clone(),
            encoder,
            writer,
            stac,
            rows: 0,
        })
    }

    /// Writes a batch, widened to the file's schema.
    fn write(&mut self, batch: &RecordBatch, what: &str) -> Result<(), Error> {
        let fail = |e: String| Error::Sink(format!("{what}: {e}"));
        let batch = widen_batch(batch, &self.schema).map_err(|e| fail(e.to_string()))?;
        let batch = self
            .encoder
            .encode_record_batch(&batch)
            .map_err(|e| fail(e.to_string()))?;
        self.rows += batch.num_rows() as u64;
        self.writer.write(&batch).map_err(|e| fail(e.to_string()))
    }

    /// Writes the footer, with the GeoParquet (`geo`, with the `bbox` covering) and
    /// stac-geoparquet metadata; the rows written.
    fn finish(mut self, what: &str) -> Result<u64, Error> {
        let fail = |e: String| Error::Sink(format!("{what}: {e}"));
        let mut geo = self.encoder.into_geoparquet_metadata();
        if let Some(covering) = bbox_covering(&self.schema) {
            let primary = geo.primary_column.clone();
            if let Some(column) = geo.columns.get_mut(&primary) {
                column.covering = Some(covering);
            }
        }
        let geo = serde_json::to_string(&geo).map_err(|e| fail(e.to_string()))?;
        self.writer
            .append_key_value_metadata(KeyValue::new("geo".to_string(), geo));
        self.writer.append_key_value_metadata(self.stac);
        self.writer.close().map_err(|e| fail(e.to_string()))?;
        Ok(self.rows)
    }
}

/// The `bbox` struct column as the covering of the geometry (as `stac` writes it).
fn bbox_covering(schema: &Schema) -> Option<GeoParquetCovering> {
    let field = schema.field_with_name("bbox").ok()?;
    let DataType::Struct(fields) = field.data_type() else {
        return None;
    };
    let path = |name: &str| {
        fields
            .find(name)
            .map(|_| vec!["bbox".to_string(), name.to_string()])
    };
    Some(GeoParquetCovering {
        bbox: GeoParquetBboxCovering {
            xmin: path("xmin")?,
            ymin: path("ymin")?,
            zmin: path("zmin"),
            xmax: path("xmax")?,
            ymax: path("ymax")?,
            zmax: path("zmax"),
        },
    })
}

/// The schema that holds the rows of both: every column of either, nullable, each of a type
/// that holds the values of both.
pub fn merge_schemas(a: &Schema, b: &Schema) -> Result<Schema, String> {
    let fields = merge_fields(a.fields(), b.fields(), "")?;
    Ok(Schema::new_with_metadata(fields, a.metadata().clone()))
}

fn merge_fields(a: &Fields, b: &Fields, path: &str) -> Result<Fields, String> {
    let mut merged: Vec<Field> = a.iter().map(|f| f.as_ref().clone()).collect();
    for field in b {
        match merged.iter_mut().find(|f| f.name() == field.name()) {
            Some(into) => {
                let path = format!("{path}{}", field.name());
                let data_type = merge_type(into.data_type(), field.data_type(), &path)?;
                *into = into.clone().with_data_type(data_type);
            }
            None => merged.push(field.as_ref().clone()),
        }
    }
    Ok(merged.into_iter().map(|f| f.with_nullable(true)).collect())
}

/// A type that holds the values of both, or why there is none.
fn merge_type(a: &DataType, b: &DataType, path: &str) -> Result<DataType, String> {
    Ok(match (a, b) {
        _ if a == b => a.clone(),
        (DataType::Null, other) | (other, DataType::Null) => other.clone(),
        (DataType::Int64, DataType::Float64) | (DataType::Float64, DataType::Int64) => {
            DataType::Float64
        }
        (DataType::Struct(a), DataType::Struct(b)) => {
            DataType::Struct(merge_fields(a, b, &format!("{path}."))?)
        }
        (DataType::List(a), DataType::List(b)) => {
            let values = merge_type(a.data_type(), b.data_type(), &format!("{path}[]"))?;
            DataType::List(Arc::new(
                a.as_ref()
                    .clone()
                    .with_data_type(values)
                    .with_nullable(true),
            ))
        }
        _ => {
            return Err(format!(
                "`{path}` is {a} in some items and {b} in others; one stac-geoparquet file \
                 cannot hold both (the window is written again on the next run)"
            ));
        }
    })
}

/// `batch` with the columns and types of `schema` (a wider one, from [`merge_schemas`]):
/// columns it lacks are null.
fn widen_batch(
    batch: &RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let rows = batch.num_rows();
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) => widen(column, field.data_type()),
            None => Ok(new_null_array(field.data_type(), rows)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

fn widen(array: &ArrayRef, to: &DataType) -> Result<ArrayRef, arrow_schema::ArrowError> {
    if array.data_type() == to {
        return Ok(array.clone());
    }
    match (array.data_type(), to) {
        (DataType::Null, _) => Ok(new_null_array(to, array.len())),
        (DataType::Struct(_), DataType::Struct(fields)) => {
            let array = array.as_struct();
            let columns = fields
                .iter()
                .map(|field| match array.column_by_name(field.name()) {
                    Some(column) => widen(column, field.data_type()),
                    None => Ok(new_null_array(field.data_type(), array.len())),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Arc::new(StructArray::try_new(
                fields.clone(),
                columns,
                array.nulls().cloned(),
            )?))
        }
        (DataType::List(_), DataType::List(field)) => {
            let array = array.as_list::<i32>();
            let values = widen(array.values(), field.data_type())?;
            Ok(Arc::new(ListArray::try_new(
                field.clone(),
                array.offsets().clone(),
                values,
                array.nulls().cloned(),
            )?))
        }
        _ => arrow_cast::cast(array, to),
    }
}

/// `stac-sync export`: writes every window of `collections` (all the database holds when
/// empty) to `sink`, from the database; returns the files and items written.
pub async fn export(
    db: &Database,
    sink: &ObjectSink,
    collections: &[String],
    size: SnapshotWindow,
    format: Format,
) -> Result<(u64, u64), Error> {
    let collections = if collections.is_empty() {
        db.collection_counts()
            .await?
            .into_iter()
            .filter(|c| c.live > 0)
            .map(|c| c.collection)
            .collect()
    } else {
        collections.to_vec()
    };
    let (mut files, mut items) = (0, 0);
    for collection in &collections {
        let document = db.collection_document(collection).await?;
        for window in db.windows(collection, size).await? {
            let written = write_window(
                db,
                sink,
                (collection, &window),
                size,
                format,
                document.as_deref(),
            )
            .await?;
            tracing::info!(
                collection,
                window,
                items = written.items,
                bytes = written.bytes,
                "exported"
            );
            files += u64::from(written.items > 0);
            items += written.items;
        }
    }
    Ok((files, items))
}

/// The window a snapshot file of `window` names is one (`2024`, `2024-05`, `undated`).
pub fn is_window(window: &str) -> bool {
    window == "undated" || window_range(window).is_some()
}

/// The asset that points a reader of `collection.json` at the snapshot files (Planetary
/// Computer's `geoparquet-items` convention: a folder of stac-geoparquet files).
pub const ASSET: &str = "geoparquet-items";

/// What [`with_asset`] adds, as the collection's row remembers it.
pub fn asset_variant(window: SnapshotWindow) -> &'static str {
    match window {
        SnapshotWindow::Year => "+geoparquet-items/year",
        SnapshotWindow::Month => "+geoparquet-items/month",
    }
}

/// A collection document with the [`ASSET`] asset added (a document that is not a JSON object
/// is returned as it is).
pub fn with_asset(document: &bytes::Bytes, window: SnapshotWindow) -> bytes::Bytes {
    let Ok(serde_json::Value::Object(mut collection)) = serde_json::from_slice(document) else {
        return document.clone();
    };
    let (frequency, files) = match window {
        SnapshotWindow::Year => ("YS", "items/{year}.parquet"),
        SnapshotWindow::Month => ("MS", "items/{year}-{month}.parquet"),
    };
    let asset = serde_json::json!({
        "href": "./items",
        "type": "application/x-parquet",
        "title": "GeoParquet STAC items",
        "description": format!("The collection's items as stac-geoparquet, one file per \
            datetime window ({files}; items without a date in items/undated.parquet), \
            rewritten by stac-sync after each run that changes the window"),
        "roles": ["stac-items"],
        "msft:partition_info": {"is_partitioned": true, "partition_frequency": frequency},
    });
    let assets = collection
        .entry("assets")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if let serde_json::Value::Object(assets) = assets {
        assets.insert(ASSET.to_string(), asset);
    }
    serde_json::to_vec(&collection).map_or_else(|_| document.clone(), bytes::Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn item(id: &str, properties: Value, assets: Value) -> stac::Item {
        let mut properties = properties;
        properties["datetime"] = json!("2024-01-01T00:00:00Z");
        serde_json::from_value(json!({
            "type": "Feature", "stac_version": "1.0.0", "id": id, "collection": "c",
            "geometry": {"type": "Point", "coordinates": [1.0, 2.0]}, "bbox": [1.0, 2.0, 1.0, 2.0],
            "properties": properties, "links": [], "assets": assets,
        }))
        .expect("an item")
    }

    /// Items encoded in their own schema.
    fn own(items: &[stac::Item]) -> (RecordBatch, SchemaRef) {
        let texts: Vec<String> = items
            .iter()
            .map(|i| serde_json::to_string(i).expect("JSON"))
            .collect();
        match encode(&texts, None) {
            Ok(Encoded::Own(batch, schema)) => (batch, schema),
            _ => panic!("encodes in its own schema"),
        }
    }

    fn read(bytes: Vec<u8>) -> Vec<Value> {
        fn strip(value: &mut Value) {
            match value {
                Value::Object(map) => {
                    map.retain(|_, v| !v.is_null());
                    map.values_mut().for_each(strip);
                }
                Value::Array(values) => values.iter_mut().for_each(strip),
                // One column holds integers and floats as floats.
                Value::Number(n) => *value = json!(n.as_f64()),
                _ => {}
            }
        }
        stac::geoparquet::from_reader(bytes::Bytes::from(bytes))
            .expect("stac-geoparquet")
            .items
            .iter()
            .map(|item| {
                let mut value = serde_json::to_value(item).expect("JSON");
                strip(&mut value);
                value
            })
            .collect()
    }

    /// Batches whose items differ (a property only in the second, an integer then a float, an
    /// asset only in one, a property null throughout the first) go into one file, and every
    /// item reads back as it reads back alone (an integer of a column that also holds floats
    /// reads back as a float).
    #[test]
    fn batches_of_different_items_share_one_file() {
        let first = vec![
            item(
                "a",
                json!({"n": 1, "gone": null}),
                json!({"x": {"href": "x.tif"}}),
            ),
            item(
                "b",
                json!({"n": 2, "gone": null}),
                json!({"x": {"href": "x.tif"}}),
            ),
        ];
        let second = vec![item(
            "c",
            json!({"n": 2.5, "gone": "now here", "more": {"deep": [1, 2]}}),
            json!({"y": {"href": "y.tif", "roles": ["data"]}}),
        )];
        // rustac's own streaming writer takes its schema from the first batch.
        let mut alone = Vec::new();
        let mut writer = stac::geoparquet::WriterBuilder::new(&mut alone)
            .build(first.clone())
            .expect("first batch");
        assert!(
            writer.write(second.clone()).is_err(),
            "stac alone cannot append it"
        );

        let what = "test";
        let (_, a) = own(&first);
        let (_, b) = own(&second);
        let schema = Arc::new(merge_schemas(&a, &b).expect("merges"));
        let file = tempfile::tempfile().expect("temp file");
        let mut parquet =
            ParquetFile::new(file.try_clone().expect("dup"), &schema, None, what).expect("writer");
        let (first_batch, _) = own(&first);
        let (second_batch, _) = own(&second);
        parquet.write(&first_batch, what).expect("first");
        parquet.write(&second_batch, what).expect("second");
        assert_eq!(parquet.finish(what).expect("finishes"), 3);
        let mut bytes = Vec::new();
        std::io::Seek::rewind(&mut &file).expect("rewinds");
        std::io::Read::read_to_end(&mut &file, &mut bytes).expect("reads");

        let each_alone: Vec<Value> = first
            .into_iter()
            .chain(second)
            .flat_map(|item| {
                let mut bytes = Vec::new();
                stac::geoparquet::into_writer(&mut bytes, vec![item]).expect("writes");
                read(bytes)
            })
            .collect();
        let in_file = read(bytes);
        assert_eq!(in_file, each_alone, "numbers compared as floats");
        assert_eq!(in_file[2]["properties"]["more"]["deep"], json!([1.0, 2.0]));
        assert_eq!(in_file[2]["properties"]["n"], json!(2.5));
    }

    #[test]
    fn a_string_and_a_number_in_one_field_are_refused_by_name() {
        let (_, a) = own(&[item("a", json!({"v": "1"}), json!({}))]);
        let (_, b) = own(&[item("b", json!({"v": 1}), json!({}))]);
        let why = merge_schemas(&a, &b).expect_err("no type holds both");
        assert!(why.contains("`v`"), "{why}");
    }

    /// Real items (EDS, Planetary Computer), as stored.
    fn fixture_texts() -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        [
            "eds-test_data.json",
            "eds-test_data_s1.json",
            "pc-items-page-1.json",
        ]
        .iter()
        .flat_map(|name| {
            let text = std::fs::read_to_string(dir.join(name)).expect("a fixture");
            let page: Value = serde_json::from_str(&text).expect("JSON");
            page["features"].as_array().expect("features").clone()
        })
        .map(|item| serde_json::to_string(&item).expect("JSON"))
        .collect()
    }

    /// Encoding a batch in its own schema gives what `stac::geoarrow::encode` gives, batch and
    /// schema, column for column.
    #[test]
    fn items_encode_as_rustac_encodes_them() {
        for texts in [fixture_texts()[..8].to_vec(), fixture_texts()] {
            let items: Vec<stac::Item> = texts
                .iter()
                .map(|t| serde_json::from_str(t).expect("an item"))
                .collect();
            let (rustac, rustac_schema) = stac::geoarrow::encode(items).expect("rustac encodes");
            let (batch, schema) = match encode(&texts, None) {
                Ok(Encoded::Own(batch, schema)) => (batch, schema),
                _ => panic!("encodes in its own schema"),
            };
            assert_eq!(schema, rustac_schema);
            assert_eq!(batch, rustac);
        }
    }

    /// A batch whose values fit the file's schema is decoded straight into it, and equals the
    /// batch encoded in its own schema and widened; one that does not fit is encoded in its own.
    #[test]
    fn a_batch_that_fits_the_file_decodes_into_it_as_widening_would() {
        let texts = fixture_texts();
        let (eds, pc) = texts.split_at(8);
        let mut odd: Vec<Value> = eds
            .iter()
            .map(|t| serde_json::from_str(t).expect("JSON"))
            .collect();
        odd[0]["properties"]["only:here"] = json!({"deep": [1, 2], "n": 3});
        odd[1]["properties"]["eo:cloud_cover"] = json!(12);
        let odd: Vec<String> = odd.iter().map(Value::to_string).collect();
        let mut schema: Option<SchemaRef> = None;
        for batch in [eds, pc, &odd] {
            let (_, own) = match encode(batch, None) {
                Ok(Encoded::Own(batch, schema)) => (batch, schema),
                _ => panic!("own"),
            };
            let merged = merge_schemas(schema.as_deref().unwrap_or(&own), &own).expect("merges");
            schema = Some(Arc::new(merged));
        }
        let target = Target::new(schema.clone().expect("a schema"));
        for batch in [eds, pc, &odd] {
            let (own, _) = match encode(batch, None) {
                Ok(Encoded::Own(batch, schema)) => (batch, schema),
                _ => panic!("own"),
            };
            let widened = widen_batch(&own, &target.schema).expect("widens");
            match encode(batch, Some(&target)) {
                Ok(Encoded::Fits(fits, into)) => {
                    assert!(Arc::ptr_eq(&into, &target.schema));
                    assert_eq!(fits, widened);
                }
                _ => panic!("fits the file's schema"),
            }
        }
        // A string where the file has numbers, a member it lacks: encoded in their own schema.
        for change in [json!({"eo:cloud_cover": "12"}), json!({"new:member": true})] {
            let mut item: Value = serde_json::from_str(&eds[0]).expect("JSON");
            for (k, v) in change.as_object().expect("object") {
                item["properties"][k] = v.clone();
            }
            let texts = vec![item.to_string()];
            assert!(
                matches!(encode(&texts, Some(&target)), Ok(Encoded::Own(..))),
                "{change}"
            );
        }
    }
}
