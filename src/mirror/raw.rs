//! A batch of stored items decoded into a file's schema straight from their text, by
//! arrow-json's own decoder, without a `serde_json::Value` per item.
//!
//! Parsing each item into a value, which [`super::flat`] reads, costs more than all the rest of
//! an export. Most items need nothing of what the flat item changes but what can be done to
//! the decoded columns: `type` and `stac_version` are constants, an empty `stac_extensions` is
//! left out, the bbox is a struct, the geometries are read on their own. So one serde pass over
//! an item's text, borrowing the names and strings it checks, makes sure the item is such an
//! item and that every value fits the file's schema as [`super::encode`]'s check would have it
//! (arrow-json would turn `"12"` into a number, `1.5` into `1`), and reads its geometries; then
//! the text is decoded as the item nests it, `properties` a struct whose columns are the
//! file's. An item that needs more (anything the flat item changes otherwise,
//! or leaves to rustac's typed reading) sends its batch to the value path: `None`, never a
//! different batch. A unit test compares both paths on real items and on items made to differ.

use super::encode::{Geometries, Named, Shape};
use super::flat::{MEMBERS, is_typed_asset_member};
use arrow_array::{Array, ArrayRef, Float64Array, ListArray, StringArray, StructArray};
use arrow_buffer::NullBuffer;
use arrow_json::reader::Decoder;
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// The item datetimes the flat item writes again (read permissively, written as chrono
/// writes them).
const DATETIMES: [&str; 3] = ["datetime", "start_datetime", "end_datetime"];

/// What decoding texts into one file schema needs, made once per schema.
pub struct Nested {
    /// What texts decode into: the item's top-level members that are columns as they are, and
    /// `properties`, a struct of the other columns.
    schema: SchemaRef,
    /// The shapes of those top-level members.
    top: Named,
    /// The shapes of the property columns.
    properties: Named,
    /// The bbox struct's fields.
    bbox: Fields,
    /// The `stac_version` rustac writes.
    version: String,
    /// Decoders of `schema` that finished a batch, with the rows each takes at a time, kept for
    /// the next batch: building one per batch, with buffers grown again from nothing, was a
    /// measurable share of an export's CPU (docs/benchmarks.md).
    decoders: Mutex<Vec<(usize, Decoder)>>,
}

impl fmt::Debug for Nested {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nested")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl Nested {
    /// A decoder of `schema` for `rows` rows: one kept from an earlier batch, or a new one.
    fn decoder(&self, rows: usize) -> Option<(usize, Decoder)> {
        let kept = self.decoders.lock().ok().and_then(|mut kept| {
            let at = kept.iter().position(|(takes, _)| *takes >= rows)?;
            Some(kept.swap_remove(at))
        });
        kept.or_else(|| {
            let decoder = arrow_json::ReaderBuilder::new(self.schema.clone())
                .with_batch_size(rows)
                .build_decoder()
                .ok()?;
            Some((rows, decoder))
        })
    }

    /// Keeps a decoder that finished its batch, for the next.
    fn keep(&self, decoder: (usize, Decoder)) {
        if let Ok(mut kept) = self.decoders.lock() {
            kept.push(decoder);
        }
    }
}

/// The item members that are columns as the text holds them.
const AS_THEY_ARE: [&str; 5] = ["stac_extensions", "id", "links", "assets", "collection"];

impl Nested {
    /// For `decode`, a file's decoding schema (no geometry columns, no dictionaries); `None`
    /// when this path cannot make its columns (a bbox that is not a struct of floats).
    pub fn new(decode: &Schema) -> Option<Nested> {
        let mut top = Vec::new();
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
                name if AS_THEY_ARE.contains(&name) => top.push(field.clone()),
                _ => properties.push(field.clone()),
            }
        }
        let properties = Fields::from(properties);
        let shapes = |fields: &Fields| match Shape::of(&DataType::Struct(fields.clone())) {
            Shape::Struct(shapes) => shapes,
            _ => Named::default(),
        };
        let nested = Nested {
            top: shapes(&Fields::from(top.clone())),
            properties: shapes(&properties),
            bbox,
            version: serde_json::to_value(stac::STAC_VERSION)
                .ok()?
                .as_str()?
                .to_string(),
            decoders: Mutex::default(),
            schema: Arc::new(Schema::new(
                top.into_iter()
                    .chain([Arc::new(Field::new(
                        "properties",
                        DataType::Struct(properties),
                        true,
                    ))])
                    .collect::<Fields>(),
            )),
        };
        Some(nested)
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
    // A decoder left halfway by an item that returns `None` is dropped, not kept.
    let (takes, mut decoder) = nested.decoder(texts.len().max(1))?;
    for text in texts {
        let mut item = serde_json::Deserializer::from_str(text);
        let read = ItemCheck { nested }.deserialize(&mut item).ok()?;
        item.end().ok()?;
        bboxes.push(read.bbox.as_deref())?;
        geometries.push(read.geometry?).ok()?;
        if let Some(proj) = read.proj_geometry {
            geometries.push_proj(proj).ok()?;
        }
        if decoder.decode(text.as_bytes()).ok()? != text.len() {
            return None;
        }
    }
    let decoded = decoder.flush().ok()??;
    nested.keep((takes, decoder));
    let rows = decoded.num_rows();
    let mut columns = HashMap::new();
    for (field, column) in decoded.schema().fields().iter().zip(decoded.columns()) {
        match field.name().as_str() {
            "properties" => {
                let properties = column.as_any().downcast_ref::<StructArray>()?;
                if properties.null_count() != 0 {
                    return None;
                }
                for (field, column) in properties.fields().iter().zip(properties.columns()) {
                    columns.insert(field.name().clone(), column.clone());
                }
            }
            "stac_extensions" => {
                columns.insert(field.name().clone(), empty_as_null(column)?);
            }
            name => {
                columns.insert(name.to_string(), column.clone());
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

/// A list column with its empty lists null, as the flat item leaves an empty list out.
fn empty_as_null(column: &ArrayRef) -> Option<ArrayRef> {
    let list = column.as_any().downcast_ref::<ListArray>()?;
    let valid: Vec<bool> = (0..list.len())
        .map(|i| list.is_valid(i) && list.value_length(i) > 0)
        .collect();
    let (field, offsets, values, _) = list.clone().into_parts();
    Some(Arc::new(
        ListArray::try_new(field, offsets, values, Some(NullBuffer::from(valid))).ok()?,
    ))
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

/// What the check reads of an item besides checking it.
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

/// Checks an item's members (`MEMBERS`: the flat item's checks; the others are dropped).
struct ItemCheck<'n> {
    nested: &'n Nested,
}

impl<'de> DeserializeSeed<'de> for ItemCheck<'_> {
    type Value = Read;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Read, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ItemCheck<'_> {
    type Value = Read;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a STAC item")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read, A::Error> {
        let top = &self.nested.top;
        let fit = |name: &str| top.get(name).map(Fit).ok_or_else(refuse::<A::Error>);
        let mut read = Read {
            bbox: None,
            geometry: None,
            proj_geometry: None,
        };
        let (mut id, mut links, mut properties) = (false, false, false);
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
                    if map.next_value_seed(Strings)? != 0 && !top.get(key).is_some_and(is_strings) {
                        return Err(refuse());
                    }
                }
                "id" => {
                    map.next_value_seed(Str)?;
                    if !matches!(top.get(key), Some(Shape::Leaf(DataType::Utf8))) {
                        return Err(refuse());
                    }
                    id = true;
                }
                "geometry" => read.geometry = map.next_value()?,
                "bbox" => {
                    let bbox = map.next_value::<Option<Vec<f64>>>()?;
                    if bbox.as_ref().is_some_and(|b| !matches!(b.len(), 4 | 6)) {
                        return Err(refuse());
                    }
                    read.bbox = bbox;
                }
                "properties" => {
                    read.proj_geometry = map.next_value_seed(PropertiesCheck {
                        shapes: &self.nested.properties,
                    })?;
                    properties = true;
                }
                "links" => {
                    map.next_value_seed(Members {
                        shape: top.get(key).ok_or_else(refuse)?,
                        of: Of::Links,
                    })?;
                    links = true;
                }
                "assets" => {
                    map.next_value_seed(Members {
                        shape: top.get(key).ok_or_else(refuse)?,
                        of: Of::Assets,
                    })?;
                }
                "collection" => map.next_value_seed(fit(key)?)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // rustac reads an absent id as empty, absent links as none: the value path does that.
        if !(id && links && properties) {
            return Err(refuse());
        }
        Ok(read)
    }
}

/// Checks an item's properties: each a column of the file's, of its type; the datetimes the
/// flat item writes again, the same instant when arrow-json reads them. Gives the
/// `proj:geometry`, which is not a column.
struct PropertiesCheck<'n> {
    shapes: &'n Named,
}

impl<'de> DeserializeSeed<'de> for PropertiesCheck<'_> {
    type Value = Option<Value>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PropertiesCheck<'_> {
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
                proj_geometry = Some(map.next_value()?);
                continue;
            }
            let shape = self.shapes.get(key).ok_or_else(refuse)?;
            if DATETIMES.contains(&key) {
                let read = map.next_value::<Option<String>>()?;
                if !matches!(shape, Shape::Leaf(DataType::Timestamp(..)))
                    || read.is_some_and(|s| !same_instant(&s))
                {
                    return Err(refuse());
                }
            } else {
                map.next_value_seed(Fit(shape))?;
            }
        }
        Ok(proj_geometry)
    }
}

/// Whether arrow-json reads a datetime as the instant rustac reads (permissively) and
/// writes.
fn same_instant(datetime: &str) -> bool {
    stac::datetime::parse_datetime_permissively(datetime).is_ok_and(|read| {
        arrow_cast::parse::string_to_datetime(&chrono::Utc, datetime)
            .is_ok_and(|arrow| arrow.naive_utc() == read.naive_utc())
    })
}

/// What a member holds: links or assets.
#[derive(Clone, Copy)]
enum Of {
    Links,
    Assets,
}

/// Checks an item's links (a list of link objects) or assets (a non-empty object of asset
/// objects) as the flat item reads them: the members it requires present, an asset with a
/// member rustac types left to rustac, the others fitting the file's columns.
struct Members<'s> {
    shape: &'s Shape,
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
        let Shape::List(link) = self.shape else {
            return Err(refuse());
        };
        // No links fit a file whose links were all empty, as any links fit one that has them.
        let Shape::Struct(fields) = link.as_ref() else {
            return match seq.next_element::<IgnoredAny>()? {
                None => Ok(()),
                Some(_) => Err(refuse()),
            };
        };
        let link = || Object {
            fields,
            of: Of::Links,
        };
        while seq.next_element_seed(link())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Shape::Struct(assets) = self.shape else {
            return Err(refuse());
        };
        let mut count = 0;
        while let Some(key) = map.next_key_seed(Key)? {
            let Some(Shape::Struct(fields)) = assets.get(key.as_ref()) else {
                return Err(refuse());
            };
            map.next_value_seed(Object {
                fields,
                of: Of::Assets,
            })?;
            count += 1;
        }
        // The flat item leaves empty assets out.
        if count == 0 {
            return Err(refuse());
        }
        Ok(())
    }
}

/// A link or an asset: the members the flat item requires strings; an asset with none of the
/// members rustac types, its `roles` a list of strings that is not empty (the flat item
/// leaves an empty one out); the others fitting their columns.
struct Object<'s> {
    fields: &'s Named,
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
        // The required members found, one bit each, so that one given twice is seen.
        let (required, mut found) = match self.of {
            Of::Links => (0b11, 0),
            Of::Assets => (0b01, 0),
        };
        while let Some(key) = map.next_key_seed(Key)? {
            let key = key.as_ref();
            let shape = self.fields.get(key).ok_or_else(refuse)?;
            let bit = match (self.of, key) {
                (_, "href") => 0b01,
                (Of::Links, "rel") => 0b10,
                (Of::Assets, key) if is_typed_asset_member(key) => return Err(refuse()),
                (Of::Assets, "roles") => {
                    if map.next_value_seed(Strings)? == 0 || !is_strings(shape) {
                        return Err(refuse());
                    }
                    continue;
                }
                _ => {
                    map.next_value_seed(Fit(shape))?;
                    continue;
                }
            };
            // A member given twice is left to the value path, which keeps the last.
            if shape != &Shape::Leaf(DataType::Utf8) || found & bit != 0 {
                return Err(refuse());
            }
            map.next_value_seed(Str)?;
            found |= bit;
        }
        if found != required {
            return Err(refuse());
        }
        Ok(())
    }
}

/// A value that fits a column as [`Shape::fits`] has it, read without building it.
struct Fit<'s>(&'s Shape);

impl<'de> DeserializeSeed<'de> for Fit<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Fit<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value of the column's type")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf(&[DataType::Boolean])
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf(&[DataType::Int64, DataType::Float64])
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<(), E> {
        if i64::try_from(n).is_ok() {
            self.leaf(&[DataType::Int64, DataType::Float64])
        } else {
            self.leaf(&[DataType::Float64])
        }
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf(&[DataType::Float64])
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        match self.0 {
            Shape::Leaf(DataType::Utf8 | DataType::Timestamp(..)) => Ok(()),
            _ => Err(refuse()),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Shape::List(of) = self.0 else {
            return Err(refuse());
        };
        while seq.next_element_seed(Fit(of))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Shape::Struct(fields) = self.0 else {
            return Err(refuse());
        };
        while let Some(key) = map.next_key_seed(Key)? {
            let shape = fields.get(key.as_ref()).ok_or_else(refuse)?;
            map.next_value_seed(Fit(shape))?;
        }
        Ok(())
    }
}

impl Fit<'_> {
    fn leaf<E: de::Error>(&self, types: &[DataType]) -> Result<(), E> {
        match self.0 {
            Shape::Leaf(t) if types.contains(t) => Ok(()),
            _ => Err(refuse()),
        }
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

/// Whether a column is a list of strings.
fn is_strings(shape: &Shape) -> bool {
    matches!(shape, Shape::List(of) if matches!(**of, Shape::Leaf(DataType::Utf8)))
}

/// A list of strings, not kept: how many.
struct Strings;

impl<'de> DeserializeSeed<'de> for Strings {
    type Value = usize;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Strings {
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
        let from_text: [(&str, Change); 13] = [
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
        ];
        let to_values: [(&str, Change); 15] = [
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
            let target = target(&[&base, &batch]).expect("a schema");
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
