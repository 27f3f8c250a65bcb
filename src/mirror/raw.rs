//! A batch of stored items decoded into a file's schema straight from their text, in one serde
//! pass, without a `serde_json::Value` per item.
//!
//! Parsing each item into a value, which [`super::flat`] reads, costs more than all the rest of
//! an export. Most items need nothing of what the flat item changes but what can be done to
//! the columns: `type` and `stac_version` are constants, an empty `stac_extensions` is left
//! out, the bbox is a struct, the geometries are read on their own. So one serde pass over an
//! item's text, borrowing the names and strings it reads, makes sure the item is such an item
//! and that every value fits the file's schema as [`super::encode`]'s check would have it (no
//! `"12"` read as a number, no `1.5` as `1`), reads its geometries, and appends each value to
//! its column as arrow-json decodes it on the value path. An item that needs more (anything
//! the flat item changes otherwise, or leaves to rustac's typed reading) sends its batch to the
//! value path: `None`, never a different batch. A unit test compares both paths on real items
//! and on items made to differ.
//!
//! Reading the text with arrow-json's decoder after a serde pass that checked it parsed every
//! item twice; building the columns in the checking pass costs less than the second parse did
//! (docs/benchmarks.md has the measurements).

use super::encode::Geometries;
use super::flat::{MEMBERS, is_typed_asset_member};
use arrow_array::builder::{
    ArrayBuilder, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
};
use arrow_array::new_null_array;
use arrow_array::timezone::Tz;
use arrow_array::types::ArrowTimestampType;
use arrow_array::types::{
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};
use arrow_array::{ArrayRef, Float64Array, ListArray, PrimitiveArray, StringArray, StructArray};
use arrow_buffer::{NullBuffer, NullBufferBuilder, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, FieldRef, Fields, Schema, TimeUnit};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// The item datetimes the flat item writes again (read permissively, written as chrono
/// writes them).
const DATETIMES: [&str; 3] = ["datetime", "start_datetime", "end_datetime"];

/// What decoding texts into one file schema needs, made once per schema.
#[derive(Debug)]
pub struct Nested {
    /// What texts decode into: the item's top-level members that are columns as they are, and
    /// `properties`, a struct of the other columns.
    fields: Fields,
    /// The bbox struct's fields.
    bbox: Fields,
    /// The `stac_version` rustac writes.
    version: String,
}

/// The item members that are columns as the text holds them.
const AS_THEY_ARE: [&str; 5] = ["stac_extensions", "id", "links", "assets", "collection"];

impl Nested {
    /// For `decode`, a file's decoding schema (no geometry columns, no dictionaries); `None`
    /// when this path cannot make its columns (a bbox that is not a struct of floats, a
    /// timestamp's time zone that does not read).
    pub fn new(decode: &Schema) -> Option<Nested> {
        let mut fields = Vec::new();
        let mut properties = Vec::new();
        let mut bbox = Fields::empty();
        for field in decode.fields() {
            match field.name().as_str() {
                "type" | "stac_version" => {}
                "bbox" => match field.data_type() {
                    DataType::Struct(fields)
                        if fields.iter().all(|f| f.data_type() == &DataType::Float64) =>
                    {
                        bbox = fields.clone()
                    }
                    _ => return None,
                },
                name if AS_THEY_ARE.contains(&name) => fields.push(field.clone()),
                _ => properties.push(field.clone()),
            }
        }
        fields.push(Arc::new(Field::new(
            "properties",
            DataType::Struct(properties.into()),
            true,
        )));
        let fields = Fields::from(fields);
        Columns::new(&fields, 0)?;
        Some(Nested {
            fields,
            bbox,
            version: serde_json::to_value(stac::STAC_VERSION)
                .ok()?
                .as_str()?
                .to_string(),
        })
    }
}

/// The batch's columns by the file's column names (the geometries in `geometries`), or `None`
/// when an item needs the value path.
pub fn decode(
    texts: &[String],
    nested: &Nested,
    geometries: &mut Geometries,
) -> Option<HashMap<String, ArrayRef>> {
    let mut bboxes = Bboxes::new(&nested.bbox, texts.len());
    let mut row = Columns::new(&nested.fields, texts.len())?;
    for text in texts {
        let mut item = serde_json::Deserializer::from_str(text);
        let read = ItemRow { columns: &mut row }.deserialize(&mut item).ok()?;
        item.end().ok()?;
        bboxes.push(read.bbox.as_deref())?;
        geometries.push(read.geometry?).ok()?;
        if let Some(proj) = read.proj_geometry {
            geometries.push_proj(proj).ok()?;
        }
    }
    let rows = texts.len();
    let mut columns = HashMap::new();
    for (field, column) in row.fields.iter().zip(&mut row.children) {
        match column {
            // The properties are the file's columns, not a struct of them.
            Column::Struct(properties) if field.name() == "properties" => {
                for (field, column) in properties.fields.iter().zip(&mut properties.children) {
                    columns.insert(field.name().clone(), column.finish()?);
                }
            }
            column => {
                columns.insert(field.name().clone(), column.finish()?);
            }
        }
    }
    let constant = |value: &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            value, rows,
        )))
    };
    columns.insert("type".into(), constant("Feature"));
    columns.insert("stac_version".into(), constant(&nested.version));
    if let Some(bbox) = bboxes.finish(&nested.bbox)? {
        columns.insert("bbox".into(), bbox);
    }
    Some(columns)
}

/// A column being built, of a type whose values this path reads (a column of another type
/// takes nulls only).
enum Column {
    Utf8(StringBuilder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Timestamp(Timestamps),
    List(Box<List>),
    Struct(Box<Columns>),
    Nulls(DataType, usize),
}

/// A timestamp column: each value as arrow-json reads the string, in the column's unit.
struct Timestamps {
    unit: TimeUnit,
    tz: Option<Tz>,
    zone: Option<Arc<str>>,
    values: Vec<Option<i64>>,
}

/// A list column: its values in one column, each row's end, which rows are null.
struct List {
    field: FieldRef,
    ends: Vec<i32>,
    valid: NullBufferBuilder,
    values: Column,
}

/// A struct column: its fields, looked up by name, each a column; which rows are null.
struct Columns {
    fields: Fields,
    index: HashMap<String, usize, foldhash::fast::RandomState>,
    /// The fields of the members of the last row that had them, in the order they came: the
    /// items of a catalog give their members in one order, so the `n`th member of a row is
    /// most often the field the `n`th was in the row before, found without hashing its name.
    order: Vec<usize>,
    /// Members read in the row being read.
    seen: usize,
    children: Vec<Column>,
    /// Rows ended, as `valid` holds them: counted here because it is asked for each member,
    /// and `NullBufferBuilder::len` is a call each time.
    rows: usize,
    valid: NullBufferBuilder,
}

impl Column {
    /// An empty column of `data_type` with room for `rows` values (the builders' defaults are
    /// a thousand, and a batch's arrays wait in memory for the writer); `None` for a time zone
    /// that does not read.
    fn new(data_type: &DataType, rows: usize) -> Option<Column> {
        Some(match data_type {
            DataType::Utf8 => Column::Utf8(StringBuilder::with_capacity(rows, rows * 16)),
            DataType::Int64 => Column::Int64(Int64Builder::with_capacity(rows)),
            DataType::Float64 => Column::Float64(Float64Builder::with_capacity(rows)),
            DataType::Boolean => Column::Boolean(BooleanBuilder::with_capacity(rows)),
            DataType::Timestamp(unit, tz) => Column::Timestamp(Timestamps {
                unit: *unit,
                tz: match tz {
                    Some(tz) => Some(tz.parse().ok()?),
                    None => None,
                },
                zone: tz.clone(),
                values: Vec::with_capacity(rows),
            }),
            DataType::List(field) => Column::List(Box::new(List {
                field: field.clone(),
                ends: List::ends(rows),
                valid: NullBufferBuilder::new(rows),
                values: Column::new(field.data_type(), rows)?,
            })),
            DataType::Struct(fields) => Column::Struct(Box::new(Columns::new(fields, rows)?)),
            other => Column::Nulls(other.clone(), 0),
        })
    }

    fn len(&self) -> usize {
        match self {
            Column::Utf8(b) => b.len(),
            Column::Int64(b) => b.len(),
            Column::Float64(b) => b.len(),
            Column::Boolean(b) => b.len(),
            Column::Timestamp(t) => t.values.len(),
            Column::List(l) => l.ends.len() - 1,
            Column::Struct(s) => s.rows,
            Column::Nulls(_, rows) => *rows,
        }
    }

    fn push_null(&mut self) {
        match self {
            Column::Utf8(b) => b.append_null(),
            Column::Int64(b) => b.append_null(),
            Column::Float64(b) => b.append_null(),
            Column::Boolean(b) => b.append_null(),
            Column::Timestamp(t) => t.values.push(None),
            Column::List(l) => l.end_row(false),
            Column::Struct(s) => {
                s.children.iter_mut().for_each(Column::push_null);
                s.valid.append_null();
                s.rows += 1;
            }
            Column::Nulls(_, rows) => *rows += 1,
        }
    }

    /// The column's array; the column is left empty.
    fn finish(&mut self) -> Option<ArrayRef> {
        Some(match self {
            // Copied to its exact size: a builder's buffers grow by doubling, and the batch
            // waits in memory for the writer.
            Column::Utf8(b) => Arc::new(b.finish_cloned()),
            Column::Int64(b) => Arc::new(b.finish()),
            Column::Float64(b) => Arc::new(b.finish()),
            Column::Boolean(b) => Arc::new(b.finish()),
            Column::Timestamp(t) => t.finish(),
            Column::List(l) => {
                let values = l.values.finish()?;
                let ends = std::mem::replace(&mut l.ends, List::ends(0));
                let offsets = OffsetBuffer::new(ScalarBuffer::from(ends));
                Arc::new(
                    ListArray::try_new(l.field.clone(), offsets, values, l.valid.finish()).ok()?,
                )
            }
            Column::Struct(s) => Arc::new(s.finish()?),
            Column::Nulls(data_type, rows) => new_null_array(data_type, std::mem::take(rows)),
        })
    }
}

impl Timestamps {
    /// Appends `text` read as arrow-json reads a timestamp; `false` when it does not read.
    fn push(&mut self, text: &str) -> bool {
        self.read(text)
            .is_some_and(|instant| self.push_instant(instant))
    }

    /// The instant arrow-json reads `text` as.
    fn read(&self, text: &str) -> Option<chrono::NaiveDateTime> {
        match &self.tz {
            Some(tz) => arrow_cast::parse::string_to_datetime(tz, text).map(|d| d.naive_utc()),
            None => {
                arrow_cast::parse::string_to_datetime(&chrono::Utc, text).map(|d| d.naive_utc())
            }
        }
        .ok()
    }

    /// Appends an instant in the column's unit; `false` when it does not fit one.
    fn push_instant(&mut self, instant: chrono::NaiveDateTime) -> bool {
        let utc = instant.and_utc();
        let value = match self.unit {
            TimeUnit::Second => Some(utc.timestamp()),
            TimeUnit::Millisecond => Some(utc.timestamp_millis()),
            TimeUnit::Microsecond => Some(utc.timestamp_micros()),
            TimeUnit::Nanosecond => utc.timestamp_nanos_opt(),
        };
        self.values.push(value);
        value.is_some()
    }

    fn finish(&mut self) -> ArrayRef {
        fn array<T: ArrowTimestampType>(
            values: Vec<Option<i64>>,
            zone: &Option<Arc<str>>,
        ) -> ArrayRef {
            Arc::new(PrimitiveArray::<T>::from_iter(values).with_timezone_opt(zone.clone()))
        }
        let values = std::mem::take(&mut self.values);
        match self.unit {
            TimeUnit::Second => array::<TimestampSecondType>(values, &self.zone),
            TimeUnit::Millisecond => array::<TimestampMillisecondType>(values, &self.zone),
            TimeUnit::Microsecond => array::<TimestampMicrosecondType>(values, &self.zone),
            TimeUnit::Nanosecond => array::<TimestampNanosecondType>(values, &self.zone),
        }
    }
}

impl List {
    /// The offsets of a list column of `rows` rows before any: room for each row's end, so
    /// that they are not copied as they grow.
    fn ends(rows: usize) -> Vec<i32> {
        let mut ends = Vec::with_capacity(rows + 1);
        ends.push(0);
        ends
    }

    /// Ends a row whose values were appended to `values`.
    fn end_row(&mut self, valid: bool) {
        // A batch's values are a few megabytes at most: an offset past i32 cannot happen.
        self.ends
            .push(i32::try_from(self.values.len()).unwrap_or(i32::MAX));
        self.valid.append(valid);
    }
}

impl Columns {
    fn new(fields: &Fields, rows: usize) -> Option<Columns> {
        Some(Columns {
            index: fields
                .iter()
                .enumerate()
                .map(|(i, f)| (f.name().clone(), i))
                .collect(),
            children: fields
                .iter()
                .map(|f| Column::new(f.data_type(), rows))
                .collect::<Option<_>>()?,
            fields: fields.clone(),
            order: Vec::with_capacity(fields.len()),
            seen: 0,
            rows: 0,
            valid: NullBufferBuilder::new(rows),
        })
    }

    /// The column of member `key` in the row being read; an error when there is none, or
    /// when the row has one already (a member given twice is left to the value path, which
    /// keeps the last).
    fn member<E: de::Error>(&mut self, key: &str) -> Result<&mut Column, E> {
        let nth = self.seen;
        self.seen += 1;
        let field = match self.order.get(nth) {
            Some(&i) if self.fields.get(i).is_some_and(|f| f.name() == key) => i,
            _ => {
                let i = *self.index.get(key).ok_or_else(refuse)?;
                self.order.truncate(nth);
                self.order.push(i);
                i
            }
        };
        let row = self.rows;
        let column = self.children.get_mut(field).ok_or_else(refuse)?;
        if column.len() != row {
            return Err(refuse());
        }
        Ok(column)
    }

    /// Whether the row being read has member `key`.
    fn has(&self, key: &str) -> bool {
        let row = self.rows;
        self.index
            .get(key)
            .and_then(|&i| self.children.get(i))
            .is_some_and(|c| c.len() > row)
    }

    /// Ends the row being read: its members not given are null.
    fn end_row(&mut self) {
        let row = self.rows;
        for column in &mut self.children {
            if column.len() == row {
                column.push_null();
            }
        }
        self.valid.append_non_null();
        self.rows += 1;
        self.seen = 0;
    }

    fn finish(&mut self) -> Option<StructArray> {
        let rows = std::mem::take(&mut self.rows);
        let children = self
            .children
            .iter_mut()
            .map(Column::finish)
            .collect::<Option<Vec<_>>>()?;
        StructArray::try_new_with_length(self.fields.clone(), children, self.valid.finish(), rows)
            .ok()
    }
}

/// The bbox column being read: each of its struct's fields, and which rows have one.
struct Bboxes {
    names: Vec<String>,
    numbers: Vec<Vec<Option<f64>>>,
    valid: Vec<bool>,
}

impl Bboxes {
    fn new(fields: &Fields, rows: usize) -> Bboxes {
        Bboxes {
            names: fields.iter().map(|f| f.name().clone()).collect(),
            numbers: fields.iter().map(|_| Vec::with_capacity(rows)).collect(),
            valid: Vec::with_capacity(rows),
        }
    }

    /// One item's bbox (4 or 6 numbers, or none); `None` when the file's bbox has no field
    /// for one of its numbers.
    fn push(&mut self, bbox: Option<&[f64]>) -> Option<()> {
        let names: &[&str] = match bbox.map(<[f64]>::len) {
            None => &[],
            Some(4) => &["xmin", "ymin", "xmax", "ymax"],
            _ => &["xmin", "ymin", "zmin", "xmax", "ymax", "zmax"],
        };
        if names.iter().any(|n| !self.names.iter().any(|m| m == n)) {
            return None;
        }
        for (numbers, name) in self.numbers.iter_mut().zip(&self.names) {
            let at = names.iter().position(|n| n == name);
            numbers.push(at.and_then(|i| bbox.and_then(|b| b.get(i).copied())));
        }
        self.valid.push(bbox.is_some());
        Some(())
    }

    /// The column, if the file has one (an error when a row has a bbox and it has not is
    /// [`Bboxes::push`]'s).
    fn finish(self, fields: &Fields) -> Option<Option<ArrayRef>> {
        if fields.is_empty() {
            return Some(None);
        }
        let arrays = self
            .numbers
            .into_iter()
            .map(|numbers| Arc::new(Float64Array::from(numbers)) as ArrayRef)
            .collect();
        let bbox = StructArray::try_new(fields.clone(), arrays, Some(NullBuffer::from(self.valid)));
        Some(Some(Arc::new(bbox.ok()?)))
    }
}

/// What reading an item gives besides its columns' values.
struct Read {
    /// Its bbox's numbers.
    bbox: Option<Vec<f64>>,
    /// Its geometry (`None` when null or absent: the value path gives the error).
    geometry: Option<stac::Geometry>,
    /// Its `proj:geometry` property.
    proj_geometry: Option<Value>,
}

/// Not an item this path decodes as the value path would: the batch goes to the value path.
fn refuse<E: de::Error>() -> E {
    E::custom("left to the value path")
}

/// Reads an item's members into its row (`MEMBERS`: the flat item's checks; the others are
/// dropped).
struct ItemRow<'c> {
    columns: &'c mut Columns,
}

impl<'de> DeserializeSeed<'de> for ItemRow<'_> {
    type Value = Read;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Read, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ItemRow<'_> {
    type Value = Read;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a STAC item")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read, A::Error> {
        let columns = self.columns;
        let mut read = Read {
            bbox: None,
            geometry: None,
            proj_geometry: None,
        };
        while let Some(key) = map.next_key_seed(Key)? {
            let key = key.as_ref();
            match key {
                "type" => {
                    if map.next_value_seed(Key)? != "Feature" {
                        return Err(refuse());
                    }
                }
                "stac_version" => map.next_value_seed(Str)?,
                "stac_extensions" => {
                    let column = match columns.index.contains_key(key) {
                        true => Some(columns.member(key)?),
                        false => None,
                    };
                    // Extensions the file has no column for: only none fit.
                    if map.next_value_seed(Strings(column))? != 0 && !columns.has(key) {
                        return Err(refuse());
                    }
                }
                "id" => match columns.member(key)? {
                    Column::Utf8(column) => map.next_value_seed(Text(column))?,
                    _ => return Err(refuse()),
                },
                "geometry" => read.geometry = map.next_value()?,
                "bbox" => {
                    let bbox = map.next_value::<Option<Vec<f64>>>()?;
                    if bbox.as_ref().is_some_and(|b| !matches!(b.len(), 4 | 6)) {
                        return Err(refuse());
                    }
                    read.bbox = bbox;
                }
                "properties" => match columns.member(key)? {
                    Column::Struct(properties) => {
                        read.proj_geometry = map.next_value_seed(Properties(properties))?;
                    }
                    _ => return Err(refuse()),
                },
                "links" => map.next_value_seed(Members {
                    column: columns.member(key)?,
                    of: Of::Links,
                })?,
                "assets" => map.next_value_seed(Members {
                    column: columns.member(key)?,
                    of: Of::Assets,
                })?,
                "collection" => map.next_value_seed(Cell(columns.member(key)?))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // rustac reads an absent id as empty, absent links as none: the value path does that.
        if !["id", "links", "properties"].iter().all(|k| columns.has(k)) {
            return Err(refuse());
        }
        columns.end_row();
        Ok(read)
    }
}

/// Reads an item's properties into the columns of theirs: each a column of the file's, of its
/// type; the datetimes the flat item writes again, the same instant when arrow-json reads
/// them. Gives the `proj:geometry`, which is not a column.
struct Properties<'c>(&'c mut Columns);

impl<'de> DeserializeSeed<'de> for Properties<'_> {
    type Value = Option<Value>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Properties<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an item's properties")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Value>, A::Error> {
        let mut proj_geometry = None;
        while let Some(key) = map.next_key_seed(Key)? {
            let key = key.as_ref();
            // A property named like a member is dropped or written twice by rustac.
            if MEMBERS.contains(&key) {
                return Err(refuse());
            }
            if key == "proj:geometry" {
                if proj_geometry.is_some() {
                    return Err(refuse());
                }
                proj_geometry = Some(map.next_value()?);
                continue;
            }
            let column = self.0.member(key)?;
            if DATETIMES.contains(&key) {
                let Column::Timestamp(column) = column else {
                    return Err(refuse());
                };
                map.next_value_seed(Datetime(column))?;
            } else {
                map.next_value_seed(Cell(column))?;
            }
        }
        self.0.end_row();
        Ok(proj_geometry)
    }
}

/// A datetime the flat item writes again (rustac reads it permissively and writes it as
/// chrono does): null, or a string arrow-json reads as the instant rustac reads.
struct Datetime<'c>(&'c mut Timestamps);

impl<'de> DeserializeSeed<'de> for Datetime<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Datetime<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a datetime or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.values.push(None);
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        let arrow = self.0.read(v).ok_or_else(refuse)?;
        let rustac = stac::datetime::parse_datetime_permissively(v).map_err(|_| refuse())?;
        if arrow == rustac.naive_utc() && self.0.push_instant(arrow) {
            Ok(())
        } else {
            Err(refuse())
        }
    }
}

/// What a member holds: links or assets.
#[derive(Clone, Copy)]
enum Of {
    Links,
    Assets,
}

/// Reads an item's links (a list of link objects) or assets (a non-empty object of asset
/// objects) as the flat item reads them: the members it requires present, an asset with a
/// member rustac types left to rustac, the others fitting the file's columns.
struct Members<'c> {
    column: &'c mut Column,
    of: Of,
}

impl<'de> DeserializeSeed<'de> for Members<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.of {
            Of::Links => d.deserialize_seq(self),
            Of::Assets => d.deserialize_map(self),
        }
    }
}

impl<'de> Visitor<'de> for Members<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("links or assets")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Column::List(list) = self.column else {
            return Err(refuse());
        };
        match &mut list.values {
            Column::Struct(link) => {
                while seq
                    .next_element_seed(Object {
                        columns: link,
                        of: Of::Links,
                    })?
                    .is_some()
                {}
            }
            // No links fit a file whose links were all empty, as any links fit one that has
            // them.
            _ => {
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(refuse());
                }
            }
        }
        list.end_row(true);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Column::Struct(assets) = self.column else {
            return Err(refuse());
        };
        let mut count = 0;
        while let Some(key) = map.next_key_seed(Key)? {
            let Column::Struct(asset) = assets.member(key.as_ref())? else {
                return Err(refuse());
            };
            map.next_value_seed(Object {
                columns: asset,
                of: Of::Assets,
            })?;
            count += 1;
        }
        // The flat item leaves empty assets out.
        if count == 0 {
            return Err(refuse());
        }
        assets.end_row();
        Ok(())
    }
}

/// A link or an asset: the members the flat item requires strings; an asset with none of the
/// members rustac types, its `roles` a list of strings that is not empty (the flat item
/// leaves an empty one out); the others fitting their columns.
struct Object<'c> {
    columns: &'c mut Columns,
    of: Of,
}

impl<'de> DeserializeSeed<'de> for Object<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Object<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a link or an asset")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let columns = self.columns;
        while let Some(key) = map.next_key_seed(Key)? {
            let key = key.as_ref();
            let required = match (self.of, key) {
                (_, "href") | (Of::Links, "rel") => true,
                (Of::Assets, key) if is_typed_asset_member(key) => return Err(refuse()),
                (Of::Assets, "roles") => {
                    if map.next_value_seed(Strings(Some(columns.member(key)?)))? == 0 {
                        return Err(refuse());
                    }
                    continue;
                }
                _ => false,
            };
            let column = columns.member(key)?;
            if required {
                let Column::Utf8(column) = column else {
                    return Err(refuse());
                };
                map.next_value_seed(Text(column))?;
            } else {
                map.next_value_seed(Cell(column))?;
            }
        }
        let required: &[&str] = match self.of {
            Of::Links => &["href", "rel"],
            Of::Assets => &["href"],
        };
        if !required.iter().all(|k| columns.has(k)) {
            return Err(refuse());
        }
        columns.end_row();
        Ok(())
    }
}

/// Reads a value into its column, if it fits it as `Shape::fits` (the value path's check in
/// `encode.rs`) has it.
struct Cell<'c>(&'c mut Column);

impl<'de> DeserializeSeed<'de> for Cell<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Cell<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value of the column's type")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.push_null();
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.0 {
            Column::Boolean(b) => b.append_value(v),
            _ => return Err(refuse()),
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<(), E> {
        match self.0 {
            Column::Int64(b) => b.append_value(n),
            // As arrow-json reads an integer's text into a float: the nearest float.
            Column::Float64(b) => b.append_value(n as f64),
            _ => return Err(refuse()),
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<(), E> {
        match (i64::try_from(n), self.0) {
            (Ok(n), Column::Int64(b)) => b.append_value(n),
            (_, Column::Float64(b)) => b.append_value(n as f64),
            _ => return Err(refuse()),
        }
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        match self.0 {
            Column::Float64(b) => b.append_value(v),
            _ => return Err(refuse()),
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.0 {
            Column::Utf8(b) => b.append_value(v),
            Column::Timestamp(t) => {
                if !t.push(v) {
                    return Err(refuse());
                }
            }
            _ => return Err(refuse()),
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Column::List(list) = self.0 else {
            return Err(refuse());
        };
        while seq.next_element_seed(Cell(&mut list.values))?.is_some() {}
        list.end_row(true);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Column::Struct(columns) = self.0 else {
            return Err(refuse());
        };
        while let Some(key) = map.next_key_seed(Key)? {
            map.next_value_seed(Cell(columns.member(key.as_ref())?))?;
        }
        columns.end_row();
        Ok(())
    }
}

/// A member's name, borrowed from the text unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(s.into())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(s.to_string().into())
    }
}

/// A string, not kept.
struct Str;

impl<'de> DeserializeSeed<'de> for Str {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Str {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
}

/// A string (not null) into a string column.
struct Text<'c>(&'c mut StringBuilder);

impl<'de> DeserializeSeed<'de> for Text<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Text<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.append_value(v);
        Ok(())
    }
}

/// A list of strings (`stac_extensions`, an asset's `roles`): how many; into a column if one
/// is given, which must be a list of strings, as a null row when empty (the flat item leaves
/// an empty list out).
struct Strings<'c>(Option<&'c mut Column>);

impl<'de> DeserializeSeed<'de> for Strings<'_> {
    type Value = usize;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        let Some(column) = self.0 else {
            return d.deserialize_seq(Count);
        };
        let Column::List(list) = column else {
            return Err(refuse());
        };
        let Column::Utf8(strings) = &mut list.values else {
            return Err(refuse());
        };
        let count = d.deserialize_seq(Into(strings))?;
        list.end_row(count != 0);
        Ok(count)
    }
}

/// Strings, not kept: how many.
struct Count;

impl<'de> Visitor<'de> for Count {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut count = 0;
        while seq.next_element_seed(Str)?.is_some() {
            count += 1;
        }
        Ok(count)
    }
}

/// Strings into a string column: how many.
struct Into<'c>(&'c mut StringBuilder);

impl<'de> Visitor<'de> for Into<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut count = 0;
        while seq.next_element_seed(Text(&mut *self.0))?.is_some() {
            count += 1;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::super::encode::{Encoded, Target, decode_into, encode, encode_into};
    use super::super::flat::tests::fixtures;
    use super::super::snapshot::merge_schemas;
    use serde_json::{Value, json};
    use std::sync::Arc;

    /// The file schema of these batches together, as a snapshot merges them.
    fn target(batches: &[&[String]]) -> Option<Target> {
        let mut schema: Option<arrow_schema::Schema> = None;
        for texts in batches {
            let Ok(Encoded::Own(_, own)) = encode(texts, None) else {
                return None;
            };
            schema = Some(merge_schemas(schema.as_ref().unwrap_or(&own), &own).ok()?);
        }
        schema.map(|s| Target::new(Arc::new(s)))
    }

    /// The batch decoded from text, when it is, equals the batch decoded from values.
    fn same(texts: &[String], target: &Target, what: &str) -> bool {
        let raw = decode_into(texts, target);
        if let Some(raw) = &raw {
            match encode_into(texts, target) {
                Ok(Some(values)) => {
                    assert_eq!(raw.schema(), values.schema(), "{what}");
                    for (field, (a, b)) in raw
                        .schema()
                        .fields()
                        .iter()
                        .zip(raw.columns().iter().zip(values.columns()))
                    {
                        assert!(a == b, "{what}: column {} differs", field.name());
                    }
                }
                other => panic!(
                    "{what}: the value path gives {:?}",
                    other.map(|b| b.is_some())
                ),
            }
        }
        raw.is_some()
    }

    #[test]
    fn real_items_decode_from_text_as_from_values() {
        let texts: Vec<String> = fixtures().iter().map(Value::to_string).collect();
        assert!(texts.len() >= 16, "{}", texts.len());
        let (eds, pc) = texts.split_at(8);
        let target = target(&[eds, pc]).expect("a schema");
        for batch in [eds, pc, &texts[..]] {
            assert!(same(batch, &target, "fixtures"), "decoded from text");
        }
    }

    /// JSON text can give a member twice, which no `Value` can: a link's `href` twice and no
    /// `rel`, or an asset's `href` twice, is left to the value path, which keeps the last.
    #[test]
    fn a_required_member_given_twice_is_left_to_the_values() {
        let items = fixtures();
        let base: Vec<String> = items[..8].iter().map(Value::to_string).collect();
        let target = target(&[&base]).expect("a schema");
        let mut item = items[3].clone();
        item["links"] = json!([{"href": "h", "rel": "r"}]);
        item["assets"]["blue"]["href"] = json!("one");
        let text = item.to_string();
        for (what, twice) in [
            (
                "a link's href",
                text.replace(r#""rel":"r""#, r#""href":"h""#),
            ),
            (
                "an asset's href",
                text.replace(r#""href":"one""#, r#""href":"one","href":"two""#),
            ),
        ] {
            assert_ne!(twice, text, "{what}");
            let mut batch = base.clone();
            batch[3] = twice;
            assert!(decode_into(&batch, &target).is_none(), "{what}");
        }
        let mut batch = base.clone();
        batch[3] = text;
        assert!(decode_into(&batch, &target).is_some(), "each member once");
    }

    /// A decoder is kept for the next batch only when it finished its own: a batch left to the
    /// values halfway leaves nothing of its items in the next.
    #[test]
    fn a_batch_left_halfway_leaves_nothing_in_the_next() {
        let items = fixtures();
        let base: Vec<String> = items[..8].iter().map(Value::to_string).collect();
        let mut late = items[..8].to_vec();
        late[6]["properties"]["eo:cloud_cover"] = json!("12");
        let late: Vec<String> = late.iter().map(Value::to_string).collect();
        let target = target(&[&base]).expect("a schema");
        for round in 0..3 {
            assert!(
                !same(&late, &target, "late"),
                "round {round}: left to the values"
            );
            assert!(
                same(&base, &target, "base"),
                "round {round}: decoded from text"
            );
            assert!(
                same(&base[..5], &target, "fewer"),
                "round {round}: decoded from text"
            );
        }
    }

    /// Items changed where the flat item changes them, or where a value would not fit: each
    /// batch is decoded from text as from values, or left to the value path (and must be, for
    /// what the text path does not do).
    #[test]
    fn changed_items_decode_from_text_as_from_values_or_are_left_to_them() {
        let items = fixtures();
        let base: Vec<String> = items[..8].iter().map(Value::to_string).collect();
        type Change = fn(&mut Value);
        let from_text: [(&str, Change); 19] = [
            ("datetime with an offset", |i| {
                i["properties"]["datetime"] = json!("2024-01-01T10:00:00.5+02:00")
            }),
            ("naive datetime", |i| {
                i["properties"]["datetime"] = json!("2024-01-01T10:00:00")
            }),
            ("nanoseconds", |i| {
                i["properties"]["datetime"] = json!("2024-01-01T10:00:00.123456789Z")
            }),
            ("interval", |i| {
                i["properties"]["datetime"] = Value::Null;
                i["properties"]["start_datetime"] = json!("2024-01-01T00:00:00Z");
                i["properties"]["end_datetime"] = json!("2024-01-02T00:00:00.000Z");
            }),
            ("null optional members", |i| {
                i["links"] = json!([{"href": "h", "rel": "r", "title": null}]);
                i["assets"]["blue"]["title"] = Value::Null;
            }),
            ("no extensions", |i| i["stac_extensions"] = json!([])),
            ("no bbox", |i| i["bbox"] = Value::Null),
            ("an integer bbox", |i| i["bbox"] = json!([1, 2, 3, 4])),
            ("a member outside the spec", |i| {
                i["foo"] = json!({"bar": 1})
            }),
            ("another version", |i| {
                i["stac_version"] = json!("1.0.0-rc.1")
            }),
            ("no type", |i| {
                i.as_object_mut().map(|o| o.remove("type"));
            }),
            ("escapes", |i| {
                i["id"] = json!("a \"quoted\" id, \u{e9}");
                i["assets"]["blue"]["href"] = json!("https://x\ty");
            }),
            ("an integer where the file has floats", |i| {
                i["properties"]["eo:cloud_cover"] = json!(12)
            }),
            (
                "a nested object",
                |i| i["properties"]["x:nested"] = json!({"a": 1, "b": [1.5, null, -2], "c": {"d": "e"}, "f": true, "g": null, "h": -3}),
            ),
            ("a list of objects", |i| {
                i["properties"]["x:list"] = json!([{"a": 1}, {"b": "x"}])
            }),
            ("a property null in every item that has it", |i| {
                i["properties"]["x:null"] = Value::Null
            }),
            ("a list of booleans", |i| {
                i["properties"]["x:flags"] = json!([true, false])
            }),
            ("an asset's nested member", |i| {
                i["assets"]["blue"]["x:extra"] = json!({"k": [1, 2], "l": null})
            }),
            ("links with members outside the spec", |i| {
                i["links"] = json!([
                    {"href": "h", "rel": "r", "type": "t", "x:m": {"a": 1}},
                    {"href": "i", "rel": "s", "x:m": null}
                ])
            }),
        ];
        let to_values: [(&str, Change); 16] = [
            ("a string where the file has numbers", |i| {
                i["properties"]["eo:cloud_cover"] = json!("12")
            }),
            ("a float where the file has integers", |i| {
                i["properties"]["mgrs:utm_zone"] = json!(1.5)
            }),
            ("a property named as a member", |i| {
                i["properties"]["id"] = json!("x")
            }),
            ("an asset's nodata", |i| {
                i["assets"]["blue"]["nodata"] = json!(0)
            }),
            ("empty roles", |i| i["assets"]["blue"]["roles"] = json!([])),
            ("null roles", |i| i["assets"]["blue"]["roles"] = Value::Null),
            ("no assets", |i| i["assets"] = json!({})),
            ("no links", |i| {
                i.as_object_mut().map(|o| o.remove("links"));
            }),
            ("null links", |i| i["links"] = Value::Null),
            ("a link without rel", |i| {
                i["links"] = json!([{"href": "h"}])
            }),
            ("an asset's null href", |i| {
                i["assets"]["blue"]["href"] = Value::Null
            }),
            ("a datetime that does not read", |i| {
                i["properties"]["datetime"] = json!("yesterday")
            }),
            // arrow-json reads the offset (05:00 UTC), rustac the time as given (10:00).
            ("a datetime read as another instant", |i| {
                i["properties"]["datetime"] = json!("2024-01-01T10:00:00+05")
            }),
            ("another type", |i| i["type"] = json!("FeatureCollection")),
            ("a bbox of 5", |i| i["bbox"] = json!([1, 2, 3, 4, 5])),
            ("no geometry", |i| i["geometry"] = Value::Null),
        ];
        let changed = |change: Change| -> Vec<String> {
            let mut batch: Vec<Value> = items[..8].to_vec();
            change(&mut batch[3]);
            batch.iter().map(Value::to_string).collect()
        };
        for (what, change) in from_text {
            let batch = changed(change);
            let target = target(&[&base, &batch]).unwrap_or_else(|| panic!("{what}: a schema"));
            assert!(same(&batch, &target, what), "{what}: decoded from text");
        }
        // Each against the file schema of the unchanged items and, where one can be made,
        // against one that has the changed item's columns too; a float where the file has
        // integers fits the second.
        for (what, change) in to_values {
            let batch = changed(change);
            let targets = [target(&[&base]), target(&[&base, &batch])];
            let mut targets = targets.into_iter().flatten();
            assert!(
                targets.next().is_some_and(|t| !same(&batch, &t, what)),
                "{what}: left to the values"
            );
            if what != "a float where the file has integers" {
                for target in targets {
                    assert!(!same(&batch, &target, what), "{what}: left to the values");
                }
            }
        }
    }
}
