//! Stored items as stac-geoparquet record batches, as `stac::geoarrow` encodes them: each item
//! flattened as rustac's typed `Item` flattens it (`flat.rs`), its geometries as geoarrow, its
//! bbox a struct, its datetimes timestamps, `type`, `stac_version` and `collection`
//! dictionary-encoded.
//!
//! rustac infers each batch's schema from its JSON values, and inference costs as much as
//! decoding. A window's batches mostly share one schema, so a batch whose values fit the file's
//! schema as it stands (every member a column of it, every value of the column's type) is
//! decoded straight into that schema, from the items' texts where `raw.rs` can, else from their
//! flat values; only a batch that does not fit is inferred, as rustac does, and merged.

use super::raw::Nested;
use arrow_array::builder::BinaryBuilder;
use arrow_array::{Array, ArrayRef, BinaryArray, RecordBatch, new_null_array};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use geoarrow_array::GeoArrowArray;
use geoarrow_array::builder::GeometryBuilder;
use geoarrow_schema::GeometryType;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// The columns `stac::geoarrow` makes timestamps (milliseconds, UTC).
const DATETIME_COLUMNS: [&str; 8] = stac::geoarrow::DATETIME_COLUMNS;
/// The string columns `stac::geoarrow` dictionary-encodes.
const DICTIONARY_COLUMNS: [&str; 3] = ["type", "stac_version", "collection"];

/// A file schema, with what checking values against it needs.
#[derive(Debug)]
pub struct Target {
    /// The file's schema.
    pub schema: SchemaRef,
    /// The schema JSON values decode into: without the geometry columns, dictionary columns
    /// as strings.
    decode: SchemaRef,
    /// The decoding schema's columns by name, nested.
    shape: Shape,
    /// What decoding item texts straight into the schema needs, where it can.
    nested: Option<Nested>,
}

impl Target {
    pub fn new(schema: SchemaRef) -> Target {
        let fields: Fields = schema
            .fields()
            .iter()
            .filter(|f| !is_geometry(f.name()))
            .map(|f| match f.data_type() {
                DataType::Dictionary(_, value)
                    if DICTIONARY_COLUMNS.contains(&f.name().as_str())
                        && value.as_ref() == &DataType::Utf8 =>
                {
                    Arc::new(f.as_ref().clone().with_data_type(DataType::Utf8))
                }
                _ => f.clone(),
            })
            .collect();
        let shape = Shape::of(&DataType::Struct(fields.clone()));
        let decode = Arc::new(Schema::new(fields));
        Target {
            nested: Nested::new(&decode),
            decode,
            schema,
            shape,
        }
    }
}

/// A struct's fields by name: looked up for every member of every item, with a hash made for
/// short keys.
type Named = HashMap<String, Shape, foldhash::fast::RandomState>;

/// A data type, with a struct's fields by name.
#[derive(Debug, PartialEq)]
enum Shape {
    Struct(Named),
    List(Box<Shape>),
    Leaf(DataType),
}

impl Shape {
    fn of(data_type: &DataType) -> Shape {
        match data_type {
            DataType::Struct(fields) => Shape::Struct(
                fields
                    .iter()
                    .map(|f| (f.name().clone(), Shape::of(f.data_type())))
                    .collect(),
            ),
            DataType::List(field) => Shape::List(Box::new(Shape::of(field.data_type()))),
            other => Shape::Leaf(other.clone()),
        }
    }

    /// Whether decoding `value` into this type keeps it as inferring its own type and
    /// widening to this one would (a conservative answer: `false` when unsure).
    fn fits(&self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) => true,
            (Shape::Struct(fields), Value::Object(members)) => Shape::fit_members(fields, members),
            (Shape::List(of), Value::Array(values)) => values.iter().all(|v| of.fits(v)),
            (Shape::Leaf(DataType::Boolean), Value::Bool(_)) => true,
            (Shape::Leaf(DataType::Int64), Value::Number(n)) => n.is_i64(),
            (Shape::Leaf(DataType::Float64), Value::Number(_)) => true,
            (Shape::Leaf(DataType::Utf8), Value::String(_)) => true,
            // Only a flat item's datetime columns are timestamps, read from strings.
            (Shape::Leaf(DataType::Timestamp(..)), Value::String(_)) => true,
            _ => false,
        }
    }

    fn fit_members(fields: &Named, members: &Map<String, Value>) -> bool {
        members
            .iter()
            .all(|(key, value)| fields.get(key).is_some_and(|shape| shape.fits(value)))
    }
}

fn is_geometry(column: &str) -> bool {
    column == "geometry" || column == "proj:geometry"
}

/// An encoded batch.
pub enum Encoded {
    /// In the schema of the [`Target`] it was encoded for.
    Fits(RecordBatch, SchemaRef),
    /// In its own schema (rustac's, inferred from its items).
    Own(RecordBatch, SchemaRef),
}

/// Encodes stored items (their JSON texts) into `target`'s schema when they fit it, else into
/// their own; an error names the item or says what Arrow refused.
pub fn encode(texts: &[String], target: Option<&Target>) -> Result<Encoded, String> {
    if let Some(target) = target
        && let Some(batch) = decode_into(texts, target)
    {
        return Ok(Encoded::Fits(batch, target.schema.clone()));
    }
    if let Some(target) = target
        && let Some(batch) = encode_into(texts, target)?
    {
        return Ok(Encoded::Fits(batch, target.schema.clone()));
    }
    let mut geometries = Geometries::new();
    let values = texts
        .iter()
        .map(|text| flatten(text, &mut geometries))
        .collect::<Result<Vec<_>, _>>()?;
    let (geometry, proj_geometry) = geometries.finish();
    encode_own(&values, geometry, proj_geometry)
        .map(|(batch, schema)| Encoded::Own(batch, schema))
        .map_err(|e| format!("encoding items as stac-geoparquet: {e}"))
}

/// The items decoded straight from their texts into `target`'s schema (`raw.rs`), or `None`.
pub(super) fn decode_into(texts: &[String], target: &Target) -> Option<RecordBatch> {
    let mut geometries = Geometries::new();
    let columns = super::raw::decode(texts, target.nested.as_ref()?, &mut geometries)?;
    let rows = texts.len();
    let (geometry, proj_geometry) = geometries.finish();
    assemble(
        |name| columns.get(name).cloned(),
        rows,
        target,
        geometry,
        &proj_geometry,
    )
    .ok()
}

/// The items decoded one at a time into `target`'s schema, so that no item's JSON value is
/// held longer than its row takes; `None` as soon as one does not fit.
pub(super) fn encode_into(
    texts: &[String],
    target: &Target,
) -> Result<Option<RecordBatch>, String> {
    let Ok(mut decoder) = decoder(&target.decode, texts.len()) else {
        return Ok(None);
    };
    let mut geometries = Geometries::new();
    for text in texts {
        let value = flatten(text, &mut geometries)?;
        if !target.shape.fits(&value) || decoder.serialize(std::slice::from_ref(&value)).is_err() {
            return Ok(None);
        }
    }
    let Ok(Some(decoded)) = decoder.flush() else {
        return Ok(None);
    };
    let (geometry, proj_geometry) = geometries.finish();
    let column = |name: &str| decoded.column_by_name(name).cloned();
    let rows = decoded.num_rows();
    Ok(assemble(column, rows, target, geometry, &proj_geometry).ok())
}

/// The geometry columns of a batch being read.
pub(super) struct Geometries {
    geometry: GeometryBuilder,
    proj_geometry: BinaryBuilder,
}

impl Geometries {
    pub(super) fn new() -> Geometries {
        Geometries {
            geometry: GeometryBuilder::new(GeometryType::new(Default::default())),
            proj_geometry: BinaryBuilder::new(),
        }
    }

    /// Adds an item's geometry.
    pub(super) fn push(&mut self, geometry: stac::Geometry) -> Result<(), String> {
        let geometry = geo_types::Geometry::try_from(geometry).map_err(|e| e.to_string())?;
        self.geometry
            .push_geometry(Some(&geometry))
            .map_err(|e| e.to_string())
    }

    /// Adds an item's `proj:geometry` property, as WKB.
    pub(super) fn push_proj(&mut self, value: Value) -> Result<(), String> {
        let geometry: stac::Geometry = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let geometry = geo_types::Geometry::try_from(geometry).map_err(|e| e.to_string())?;
        let mut wkb = Vec::new();
        wkb::writer::write_geometry(&mut wkb, &geometry, &Default::default())
            .map_err(|e| e.to_string())?;
        self.proj_geometry.append_value(wkb);
        Ok(())
    }

    /// The geometry column (its field, its array) and the proj:geometry one.
    fn finish(self) -> ((Field, ArrayRef), BinaryArray) {
        let Geometries {
            geometry,
            mut proj_geometry,
        } = self;
        let geometry = geometry.finish();
        (
            (
                geometry.data_type().to_field("geometry", true),
                geometry.to_array_ref(),
            ),
            proj_geometry.finish(),
        )
    }
}

/// One stored item as `stac::geoarrow` flattens it (`Writer::add`), its geometries added to
/// `geometries`; an error names the item. The flat value is read directly where
/// [`super::flat::flat`] can, through rustac's typed `Item` where not; the geometry is taken
/// before the value, whose members are then removed in rustac's order, so the columns come
/// out in the same order.
fn flatten(text: &str, geometries: &mut Geometries) -> Result<Value, String> {
    flat_value(text, geometries).map_err(|e| {
        format!(
            "an item cannot be read as a STAC item for the snapshot ({e}); it is in the \
             database and its object; the window is written again on the next run: {}",
            item_id(text)
        )
    })
}

fn flat_value(text: &str, geometries: &mut Geometries) -> Result<Value, String> {
    let (mut value, geometry) = match super::flat::flat(text) {
        Some(flat) => flat,
        None => typed(text)?,
    };
    let Some(object) = value.as_object_mut() else {
        return Err("a flat item is not a JSON object".into());
    };
    if object.remove("geometry").is_some() {
        // rustac's encoder has no null geometry.
        let geometry = geometry.ok_or("its geometry is null, which rustac cannot encode")?;
        geometries.push(geometry)?;
    }
    if let Some(value) = object.remove("proj:geometry") {
        geometries.push_proj(value)?;
    }
    if let Some(bbox) = object.remove("bbox") {
        object.insert("bbox".into(), bbox_struct(&bbox)?);
    }
    Ok(value)
}

/// The flat item through rustac's typed `Item` (the definition [`super::flat::flat`] follows).
pub(super) fn typed(text: &str) -> Result<(Value, Option<stac::Geometry>), String> {
    let item: stac::Item = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut item = item.into_flat_item(true).map_err(|e| e.to_string())?;
    let geometry = item.geometry.take();
    let value = serde_json::to_value(item).map_err(|e| e.to_string())?;
    Ok((value, geometry))
}

/// The batch in `target`'s schema: its decoded columns (by name), the geometry columns added.
fn assemble(
    decoded: impl Fn(&str) -> Option<ArrayRef>,
    rows: usize,
    target: &Target,
    (_, geometry): (Field, ArrayRef),
    proj_geometry: &BinaryArray,
) -> Result<RecordBatch, String> {
    let proj = proj_geometry.len();
    if proj != 0 && proj != rows {
        return Err("some items have a proj:geometry and some not".into());
    }
    if proj != 0 && target.schema.field_with_name("proj:geometry").is_err() {
        return Err("a proj:geometry the schema has no column for".into());
    }
    let columns = target
        .schema
        .fields()
        .iter()
        .map(|field| -> Result<ArrayRef, String> {
            Ok(match field.name().as_str() {
                "geometry" => geometry.clone(),
                "proj:geometry" if proj != 0 => Arc::new(proj_geometry.clone()),
                "proj:geometry" => new_null_array(field.data_type(), rows),
                name => {
                    let column = decoded(name).ok_or_else(|| format!("no column {name}"))?;
                    if column.data_type() == field.data_type() {
                        column.clone()
                    } else {
                        arrow_cast::cast(&column, field.data_type()).map_err(|e| e.to_string())?
                    }
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(target.schema.clone(), columns).map_err(|e| e.to_string())
}

/// `stac::geoarrow`'s `infer_base_schema` and `write`.
fn encode_own(
    values: &[Value],
    (geometry_field, geometry): (Field, ArrayRef),
    proj_geometry: BinaryArray,
) -> Result<(RecordBatch, SchemaRef), String> {
    let inferred = arrow_json::reader::infer_json_schema_from_iterator(values.iter().map(Ok))
        .map_err(|e| e.to_string())?;
    let fields: Fields = inferred
        .fields()
        .iter()
        .map(|field| {
            if DATETIME_COLUMNS.contains(&field.name().as_str()) {
                Arc::new(Field::new(
                    field.name(),
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    field.is_nullable(),
                ))
            } else {
                field.clone()
            }
        })
        .collect();
    let decoded = decode(values, &Arc::new(Schema::new(fields)))?;
    let dictionary = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let mut fields = Vec::with_capacity(decoded.num_columns() + 2);
    let mut columns = Vec::with_capacity(decoded.num_columns() + 2);
    for (field, column) in decoded.schema().fields().iter().zip(decoded.columns()) {
        if DICTIONARY_COLUMNS.contains(&field.name().as_str())
            && field.data_type() == &DataType::Utf8
        {
            columns.push(arrow_cast::cast(column, &dictionary).map_err(|e| e.to_string())?);
            fields.push(Field::new(
                field.name(),
                dictionary.clone(),
                field.is_nullable(),
            ));
        } else {
            columns.push(column.clone());
            fields.push(field.as_ref().clone());
        }
    }
    fields.push(geometry_field);
    columns.push(geometry);
    if !proj_geometry.is_empty() {
        fields.push(Field::new(
            "proj:geometry",
            proj_geometry.data_type().clone(),
            true,
        ));
        columns.push(Arc::new(proj_geometry));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?;
    Ok((batch, schema))
}

fn decoder(schema: &SchemaRef, rows: usize) -> Result<arrow_json::reader::Decoder, String> {
    arrow_json::ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.max(1))
        .build_decoder()
        .map_err(|e| e.to_string())
}

fn decode(values: &[Value], schema: &SchemaRef) -> Result<RecordBatch, String> {
    let mut decoder = decoder(schema, values.len())?;
    decoder.serialize(values).map_err(|e| e.to_string())?;
    decoder
        .flush()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no items".to_string())
}

/// A bbox as `stac::geoarrow` writes it: a struct of its 4 or 6 numbers.
fn bbox_struct(bbox: &Value) -> Result<Value, String> {
    let names: &[&str] = match bbox.as_array().map(Vec::len) {
        Some(4) => &["xmin", "ymin", "xmax", "ymax"],
        Some(6) => &["xmin", "ymin", "zmin", "xmax", "ymax", "zmax"],
        _ => return Err(format!("a bbox must have 4 or 6 numbers: {bbox}")),
    };
    let numbers = bbox.as_array().into_iter().flatten();
    Ok(Value::Object(
        names
            .iter()
            .zip(numbers)
            .map(|(name, n)| (name.to_string(), n.clone()))
            .collect(),
    ))
}

/// The `id` of an item's JSON, for messages.
fn item_id(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_string))
        .map_or_else(|| "(no id)".into(), |id| format!("item {id}"))
}
