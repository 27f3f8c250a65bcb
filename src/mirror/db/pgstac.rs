//! The pgstac output: items dehydrated here, as pgstac's own loader (pypgstac `load`) does, and
//! `COPY`ed into pgstac's `items` table in the page's transaction.
//!
//! pgstac stores an item as its row (`id`, `collection`, `datetime`, `end_datetime`, `geometry`)
//! and a `content` that holds only what differs from its collection's `base_item` (the item
//! assets and the constant fields), with a do-not-merge marker for each key the base item has
//! and the item lacks. pgstac's staging tables do the same in PL/pgSQL, one item at a time on the
//! server; this module does it in Rust and hands the server rows it only has to store. The
//! content is what `pypgstac load` stores for the same item (`format_item` and
//! `hydration.dehydrate`), so that pgstac hydrates it back (`get_item`, stac-fastapi-pgstac) to
//! the item received.
//!
//! The rows go through the parent table, so that Postgres routes them to their partitions and
//! pgstac's statement trigger keeps the partitions' stats, exactly as its own ingest does; the
//! partitions are made, and their datetime constraints widened, by `pgstac.check_partition`
//! first, grouped as pgstac's staging trigger groups them.

use crate::error::Error;
use crate::stac::reader::{Item, Rejected};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sqlx::postgres::{PgConnection, PgPool};
use std::collections::HashMap;
use std::fmt::Write as _;

/// The value pgstac's dehydration gives a key the base item has and the item lacks, so that
/// hydration does not bring it back.
pub const DO_NOT_MERGE: &str = "𒍟※";

/// What pgstac knows of a collection that its items need: the base item they are dehydrated
/// against, and the id of its row in `pgstac.base_items` (pgstac 0.10; `None` before).
#[derive(Debug, Clone)]
pub struct Base {
    pub item: Value,
    pub id: Option<i32>,
}

impl Base {
    pub fn new(item: Value, id: Option<i32>) -> Base {
        Base { item, id }
    }

    /// The base item's members that dehydration compares an item's with: all but those the
    /// item's row holds, or that the loader takes out of the content.
    fn compared(&self) -> Option<Map<String, Value>> {
        let mut top = self.item.as_object()?.clone();
        for key in SET_APART {
            top.remove(key);
        }
        Some(top)
    }
}

/// Top-level members the loader takes out of the dehydrated content: the row's own columns,
/// the base item tag it sets itself, and `private` (its own column).
const SET_APART: [&str; 5] = [
    "id",
    "collection",
    "geometry",
    "pgstac:base_item",
    "private",
];

/// An item as pgstac stores it: the columns of `pgstac.items`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub collection: String,
    /// `start_datetime` if the item has both ends of a range, else `datetime`, as written.
    pub datetime: String,
    /// `end_datetime` if the item has both ends of a range, else `datetime`, as written.
    pub end_datetime: String,
    /// The geometry as hex EWKB (SRID 4326), as the loader writes it.
    pub geometry: Option<String>,
    /// The dehydrated item, as JSON text.
    pub content: String,
    /// The item's top-level `private` member, which pgstac keeps out of what it serves.
    pub private: Option<String>,
}

/// Python's `==` on JSON values, which the loader's dehydration compares with: numbers compare
/// by value (`1 == 1.0`, and `true == 1`), objects whatever their key order.
fn py_eq(a: &Value, b: &Value) -> bool {
    fn number(v: &Value) -> Option<f64> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => number(a) == number(b),
            },
        },
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Bool(_), Value::Number(_)) | (Value::Number(_), Value::Bool(_)) => {
            number(a) == number(b)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| py_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Marks each key of `base` that `item` lacks as not to be merged back (`apply_marked_keys`).
fn mark_absent(base: &Value, item: &Map<String, Value>, out: &mut Map<String, Value>) {
    if let Value::Object(base) = base {
        for key in base.keys() {
            if !item.contains_key(key) {
                out.insert(key.clone(), Value::String(DO_NOT_MERGE.into()));
            }
        }
    }
}

/// A list that differs from the base's: of the same length, each object in it dehydrated
/// against the base's object at its place and other elements kept; else the item's whole.
fn dehydrate_list(base: &[Value], item: &[Value]) -> Value {
    if base.len() != item.len() {
        return Value::Array(item.to_vec());
    }
    let kept = base.iter().zip(item).map(|(b, v)| match (b, v) {
        (Value::Object(_), Value::Object(v)) => {
            let mut d = dehydrate(b, v);
            mark_absent(b, v, &mut d);
            Value::Object(d)
        }
        _ => v.clone(),
    });
    Value::Array(kept.collect())
}

/// What of `item` differs from `base`, key by key: pypgstac's `hydration.dehydrate`. A base
/// value that is not an object, where the item has an object, is kept whole (the loader fails
/// on such an item).
pub fn dehydrate(base: &Value, item: &Map<String, Value>) -> Map<String, Value> {
    let Value::Object(base_map) = base else {
        return item.clone();
    };
    let mut out = Map::new();
    for (key, value) in item {
        let Some(base_value) = base_map.get(key) else {
            out.insert(key.clone(), value.clone());
            continue;
        };
        if py_eq(base_value, value) {
            continue;
        }
        match (base_value, value) {
            (Value::Array(bs), Value::Array(vs)) => {
                out.insert(key.clone(), dehydrate_list(bs, vs));
            }
            // The loader drops empty values (pgstac's hydration would give the base's back).
            (_, Value::Null) => {}
            (_, Value::Array(vs)) if vs.is_empty() => {}
            (_, Value::Object(v)) => {
                let mut d = dehydrate(base_value, v);
                mark_absent(base_value, v, &mut d);
                out.insert(key.clone(), Value::Object(d));
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    mark_absent(base, item, &mut out);
    out
}

/// An item as pgstac's loader stores it (`Loader.format_item`); why not, if it cannot be.
///
/// The item is not parsed whole: only what its collection's base item also has is compared
/// (the assets, mostly), and everything else is copied as received, so numbers keep the text
/// they came with. An item this cannot read so (a member name with an escape, a name twice in
/// one object) is dehydrated from its parsed value instead, with the same result.
pub fn row(item: &Item, base: &Base, compared: Option<&Map<String, Value>>) -> Result<Row, String> {
    use serde::de::DeserializeSeed;
    let text = simdutf8::basic::from_utf8(&item.content)
        .map_err(|_| "the item is not UTF-8".to_string())?;
    let (datetime, end_datetime) = range(item)?;
    let empty = Map::new();
    let mut content = String::with_capacity(text.len() / 2);
    let mut apart = SetApart::default();
    let mut reader = serde_json::Deserializer::from_str(text);
    let stripped = Strip {
        base: compared.unwrap_or(&empty),
        out: &mut content,
        apart: Some(&mut apart),
    }
    .deserialize(&mut reader);
    if stripped.is_err() || reader.end().is_err() {
        return row_parsed(item, base, datetime, end_datetime);
    }
    let geometry = match apart.geometry.map(RawValue::get) {
        None | Some("null") => None,
        Some(raw) => {
            let parsed: Value =
                serde_json::from_str(raw).map_err(|e| format!("its geometry is not JSON: {e}"))?;
            Some(ewkb_hex(&parsed).map_err(|e| format!("pgstac cannot store its geometry: {e}"))?)
        }
    };
    let private = apart
        .private
        .map(RawValue::get)
        .filter(|raw| *raw != "null")
        .map(str::to_string);
    if let Some(id) = base.id {
        content.pop();
        if content.len() > 1 {
            content.push(',');
        }
        let _ = write!(content, "\"pgstac:base_item\":{id}}}");
    }
    Ok(Row {
        id: item.id.clone(),
        collection: item.collection.clone(),
        datetime,
        end_datetime,
        geometry,
        content,
        private,
    })
}

/// [`row`] from the item's parsed value.
fn row_parsed(
    item: &Item,
    base: &Base,
    datetime: String,
    end_datetime: String,
) -> Result<Row, String> {
    let parsed: Value = serde_json::from_slice(&item.content)
        .map_err(|e| format!("the item is not JSON pgstac can store: {e}"))?;
    let Value::Object(object) = parsed else {
        return Err("the item is not a JSON object".into());
    };
    let geometry = match object.get("geometry") {
        None | Some(Value::Null) => None,
        Some(g) => Some(ewkb_hex(g).map_err(|e| format!("pgstac cannot store its geometry: {e}"))?),
    };
    let mut content = dehydrate(&base.item, &object);
    for key in ["id", "collection", "geometry", "pgstac:base_item"] {
        content.remove(key);
    }
    if let Some(id) = base.id {
        content.insert("pgstac:base_item".into(), Value::from(id));
    }
    let private = match content.remove("private") {
        None | Some(Value::Null) => None,
        Some(p) => Some(p.to_string()),
    };
    Ok(Row {
        id: item.id.clone(),
        collection: item.collection.clone(),
        datetime,
        end_datetime,
        geometry,
        content: Value::Object(content).to_string(),
        private,
    })
}

/// A member of a JSON object being written: its name (already JSON, without escapes) and text.
fn member(out: &mut String, name: &str, value: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    out.push('"');
    out.push_str(name);
    out.push_str("\":");
    out.push_str(value);
}

/// The top-level members the content does not hold but the row needs, as received.
#[derive(Default)]
struct SetApart<'de> {
    geometry: Option<&'de RawValue>,
    private: Option<&'de RawValue>,
}

/// [`dehydrate`] in one reading of an object's text: writes the dehydrated object to `out` and
/// answers whether the object equals `base` (Python's `==`; its parent then leaves it out).
/// Members the base lacks are copied as received; only those it has are read into values, to
/// compare. At the top (`apart`), the members the row holds are set apart. It fails on what it
/// cannot read so (a member name with an escape, or twice in one object, a member that is an
/// object in the base and neither an object nor null in the item): the caller then dehydrates
/// the parsed item, with the same result.
struct Strip<'b, 'o, 'a, 'de> {
    base: &'b Map<String, Value>,
    out: &'o mut String,
    apart: Option<&'a mut SetApart<'de>>,
}

/// What reading a member that is an object in the base found.
enum Stripped {
    /// An object equal to the base's.
    Equal,
    /// An object that differs, written.
    Differs,
    /// `null`: left out.
    Null,
}

impl<'de> serde::de::DeserializeSeed<'de> for Strip<'_, '_, '_, 'de> {
    type Value = Stripped;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Stripped, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Strip<'_, '_, '_, 'de> {
    type Value = Stripped;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object, or null")
    }

    fn visit_unit<E>(self) -> Result<Stripped, E> {
        Ok(Stripped::Null)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<Stripped, A::Error> {
        use serde::de::Error as _;
        let out = &mut *self.out;
        out.push('{');
        let mut names: Vec<&'de str> = Vec::with_capacity(self.base.len().max(8));
        let mut equal = true;
        while let Some(name) = map.next_key::<&'de str>()? {
            names.push(name);
            if let Some(apart) = self.apart.as_deref_mut()
                && SET_APART.contains(&name)
            {
                match name {
                    "geometry" => apart.geometry = Some(map.next_value()?),
                    "private" => apart.private = Some(map.next_value()?),
                    _ => {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                continue;
            }
            match self.base.get(name) {
                None => {
                    equal = false;
                    member(out, name, map.next_value::<&'de RawValue>()?.get());
                }
                Some(Value::Object(base)) => {
                    let mark = out.len();
                    member(out, name, "");
                    let nested = Strip {
                        base,
                        out: &mut *out,
                        apart: None,
                    };
                    match map.next_value_seed(nested)? {
                        Stripped::Differs => equal = false,
                        Stripped::Equal => out.truncate(mark),
                        Stripped::Null => {
                            equal = false;
                            out.truncate(mark);
                        }
                    }
                }
                Some(base) => {
                    let text = map.next_value::<&'de RawValue>()?.get();
                    if !other_member(base, name, text, out)
                        .map_err(|_| A::Error::custom("value"))?
                    {
                        equal = false;
                    }
                }
            }
        }
        let count = names.len();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(A::Error::custom("a member name twice"));
        }
        for name in self.base.keys() {
            if names.binary_search(&name.as_str()).is_err() {
                equal = false;
                let name = serde_json::to_string(name).map_err(A::Error::custom)?;
                member(out, &name[1..name.len() - 1], "\"𒍟※\"");
            }
        }
        out.push('}');
        // At the top the answer is not used.
        Ok(match equal && count == self.base.len() {
            true => Stripped::Equal,
            false => Stripped::Differs,
        })
    }
}

/// A member the base has as something other than an object, received as `text`: written to
/// `out` as the loader keeps it, unless equal; whether it equals the base's.
fn other_member(
    base: &Value,
    name: &str,
    text: &str,
    out: &mut String,
) -> Result<bool, Unreadable> {
    // Most members equal the base's (an asset's type, roles, bands): compared as read,
    // without building the value.
    if text.starts_with('n') {
        // Null is left out whether it equals the base or not (the loader's rule).
        return Ok(base.is_null());
    }
    if equals_raw(base, text) {
        return Ok(true);
    }
    let value: Value = serde_json::from_str(text).map_err(|_| Unreadable)?;
    if py_eq(base, &value) {
        return Ok(true);
    }
    match (base, &value) {
        (Value::Array(bs), Value::Array(vs)) if bs.len() == vs.len() => {
            member(out, name, &dehydrate_list(bs, vs).to_string());
        }
        // Lists of other lengths keep the item's, even empty (before the rule below, as in
        // the loader).
        (Value::Array(_), Value::Array(_)) => member(out, name, text),
        (_, Value::Array(vs)) if vs.is_empty() => {}
        _ => member(out, name, text),
    }
    Ok(false)
}

/// Whether the JSON `text` equals `base` by Python's `==` ([`py_eq`]), read without building
/// its value; `false` if it is not JSON (the caller's parse then says so).
fn equals_raw(base: &Value, text: &str) -> bool {
    use serde::de::DeserializeSeed;
    let mut reader = serde_json::Deserializer::from_str(text);
    Equals(base).deserialize(&mut reader).unwrap_or(false) && reader.end().is_ok()
}

/// Reads a JSON value, answering whether it equals the value it holds.
struct Equals<'b>(&'b Value);

impl<'de> serde::de::DeserializeSeed<'de> for Equals<'_> {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Equals<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<bool, E> {
        Ok(py_eq(self.0, &Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<bool, E> {
        Ok(py_eq(self.0, &Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<bool, E> {
        Ok(py_eq(self.0, &Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<bool, E> {
        Ok(py_eq(self.0, &Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(self.0.as_str() == Some(v))
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(self.0.is_null())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let base = self.0.as_array();
        let (mut equal, mut n) = (base.is_some(), 0);
        loop {
            let next = match base.and_then(|b| b.get(n)).filter(|_| equal) {
                Some(element) => seq.next_element_seed(Equals(element))?,
                None => seq.next_element::<serde::de::IgnoredAny>()?.map(|_| false),
            };
            match next {
                Some(same) => equal &= same,
                None => break,
            }
            n += 1;
        }
        Ok(equal && base.is_some_and(|b| b.len() == n))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let base = self.0.as_object();
        let (mut equal, mut n) = (base.is_some(), 0);
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match base.and_then(|b| b.get(name.as_ref())).filter(|_| equal) {
                Some(value) => equal &= map.next_value_seed(Equals(value))?,
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    equal = false;
                }
            }
            n += 1;
        }
        Ok(equal && base.is_some_and(|b| b.len() == n))
    }
}

/// A member name or value the raw path cannot handle: dehydrate from the parsed item instead.
struct Unreadable;

/// The `datetime` and `end_datetime` columns, as the loader takes them from the properties:
/// `start_datetime`/`end_datetime` when both are there (and in order), else `datetime`.
fn range(item: &Item) -> Result<(String, String), String> {
    let Some((start, end)) = span(item) else {
        return Err(
            "it has neither properties.datetime nor both start_datetime and end_datetime, \
             which pgstac needs"
                .into(),
        );
    };
    if start != end {
        let instant = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
        if let (Some(s), Some(e)) = (instant(start), instant(end))
            && s > e
        {
            return Err(format!(
                "its start_datetime {start} is after its end_datetime {end}: pgstac could \
                 store it but no temporal search would find it"
            ));
        }
    }
    Ok((start.to_string(), end.to_string()))
}

/// A GeoJSON geometry as hex EWKB, little-endian, with SRID 4326 (and Z when its first
/// position has three numbers), as the loader writes it (`plpygis` `Geometry.ewkb`).
pub fn ewkb_hex(geometry: &Value) -> Result<String, String> {
    let mut out = Vec::with_capacity(256);
    let z = first_position(geometry).is_some_and(|p| p.len() >= 3);
    encode(geometry, z, true, &mut out)?;
    let mut hex = String::with_capacity(out.len() * 2);
    for byte in out {
        let _ = write!(hex, "{byte:02x}");
    }
    Ok(hex)
}

/// The first position of a geometry, to tell 2D from 3D.
fn first_position(geometry: &Value) -> Option<&Vec<Value>> {
    if let Some(parts) = geometry.get("geometries").and_then(Value::as_array) {
        return parts.iter().find_map(first_position);
    }
    let mut at = geometry.get("coordinates")?;
    loop {
        let array = at.as_array()?;
        match array.first() {
            Some(Value::Array(_)) => at = &array[0],
            _ => return Some(array),
        }
    }
}

fn encode(geometry: &Value, z: bool, top: bool, out: &mut Vec<u8>) -> Result<(), String> {
    let kind = geometry
        .get("type")
        .and_then(Value::as_str)
        .ok_or("a geometry without a \"type\"")?;
    let code: u32 = match kind {
        "Point" => 1,
        "LineString" => 2,
        "Polygon" => 3,
        "MultiPoint" => 4,
        "MultiLineString" => 5,
        "MultiPolygon" => 6,
        "GeometryCollection" => 7,
        other => return Err(format!("unknown geometry type {other:?}")),
    };
    out.push(1);
    let flags = if z { 0x8000_0000 } else { 0 } | if top { 0x2000_0000 } else { 0 };
    out.extend_from_slice(&(code | flags).to_le_bytes());
    if top {
        out.extend_from_slice(&4326u32.to_le_bytes());
    }
    if code == 7 {
        let parts = geometry
            .get("geometries")
            .and_then(Value::as_array)
            .ok_or("a GeometryCollection without \"geometries\"")?;
        count(parts.len(), out)?;
        for part in parts {
            encode(part, z, false, out)?;
        }
        return Ok(());
    }
    let coordinates = geometry
        .get("coordinates")
        .ok_or_else(|| format!("a {kind} without \"coordinates\""))?;
    match code {
        1 => position(coordinates, z, out),
        2 => positions(coordinates, z, out),
        3 => rings(coordinates, z, out),
        _ => {
            let parts = array(coordinates)?;
            count(parts.len(), out)?;
            for part in parts {
                out.push(1);
                out.extend_from_slice(
                    &((code - 3) | if z { 0x8000_0000 } else { 0 }).to_le_bytes(),
                );
                match code {
                    4 => position(part, z, out)?,
                    5 => positions(part, z, out)?,
                    _ => rings(part, z, out)?,
                }
            }
            Ok(())
        }
    }
}

fn array(value: &Value) -> Result<&Vec<Value>, String> {
    value
        .as_array()
        .ok_or_else(|| format!("coordinates that are not an array: {value}"))
}

fn count(n: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let n = u32::try_from(n).map_err(|_| "too many parts".to_string())?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn rings(value: &Value, z: bool, out: &mut Vec<u8>) -> Result<(), String> {
    let rings = array(value)?;
    count(rings.len(), out)?;
    rings.iter().try_for_each(|ring| positions(ring, z, out))
}

fn positions(value: &Value, z: bool, out: &mut Vec<u8>) -> Result<(), String> {
    let positions = array(value)?;
    count(positions.len(), out)?;
    positions.iter().try_for_each(|p| position(p, z, out))
}

fn position(value: &Value, z: bool, out: &mut Vec<u8>) -> Result<(), String> {
    let numbers = array(value)?;
    let wanted = if z { 3 } else { 2 };
    if numbers.len() < wanted {
        return Err(format!(
            "a position with fewer than {wanted} numbers: {value}"
        ));
    }
    for n in &numbers[..wanted] {
        let n = n
            .as_f64()
            .ok_or_else(|| format!("a position that holds a non-number: {value}"))?;
        out.extend_from_slice(&n.to_le_bytes());
    }
    Ok(())
}

/// The base items of `collections`, read in the page's transaction (a collection upserted since
/// has another). pgstac 0.10 names the base item's row, which hydration then uses.
pub async fn bases(
    conn: &mut PgConnection,
    collections: &[&str],
    versioned: bool,
) -> Result<HashMap<String, Base>, sqlx::Error> {
    let sql = if versioned {
        "SELECT c.id, CAST(b.base_item AS TEXT), b.base_item_id FROM pgstac.collections c, \
         pgstac.current_base_item(c.id) b WHERE c.id = ANY($1)"
    } else {
        "SELECT id, CAST(base_item AS TEXT), CAST(NULL AS INTEGER) FROM pgstac.collections \
         WHERE id = ANY($1)"
    };
    let rows: Vec<(String, Option<String>, Option<i32>)> = sqlx::query_as(sql)
        .bind(collections)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(collection, item, id)| {
            let item = item
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or(Value::Null);
            (collection, Base::new(item, id))
        })
        .collect())
}

/// Rows for `items`; the ones pgstac cannot store (no collection there, no datetime, a
/// geometry it cannot read), refused with the reason.
pub fn rows<'a>(
    items: &[&'a Item],
    bases: &HashMap<String, Base>,
) -> (Vec<(&'a Item, Row)>, Vec<Rejected>) {
    let (mut accepted, mut refused) = (Vec::with_capacity(items.len()), Vec::new());
    let compared: HashMap<&str, Option<Map<String, Value>>> = bases
        .iter()
        .map(|(collection, base)| (collection.as_str(), base.compared()))
        .collect();
    for &item in items {
        let made = match bases.get(&item.collection) {
            Some(base) => row(
                item,
                base,
                compared
                    .get(item.collection.as_str())
                    .and_then(Option::as_ref),
            ),
            None => Err(format!(
                "pgstac has no collection {:?}: it stores an item only after its collection",
                item.collection
            )),
        };
        match made {
            Ok(row) => accepted.push((item, row)),
            Err(reason) => refused.push(Rejected {
                content: item.content.clone(),
                reason: format!("pgstac cannot store the item: {reason}"),
                collection: Some(item.collection.clone()),
                id: Some(item.id.clone()),
            }),
        }
    }
    (accepted, refused)
}

/// Makes the partitions of `(collection, datetime, end_datetime)` rows, widening their datetime
/// constraints to hold them: one `check_partition` per collection and partition period, as
/// pgstac's staging trigger calls it.
const CHECK_PARTITIONS: &str = "WITH t AS ( \
        SELECT n.c AS collection, CAST(n.d AS timestamptz) AS d, CAST(n.e AS timestamptz) AS e, \
            c.partition_trunc \
        FROM UNNEST($1::text[], $2::text[], $3::text[]) AS n(c, d, e) \
        JOIN pgstac.collections c ON c.id = n.c), \
    p AS ( \
        SELECT collection, COALESCE(date_trunc(partition_trunc::text, d), '-infinity') AS period, \
            tstzrange(min(d), max(d), '[]') AS dtrange, tstzrange(min(e), max(e), '[]') AS edtrange \
        FROM t GROUP BY 1, 2) \
    SELECT pgstac.check_partition(collection, dtrange, edtrange) FROM p ORDER BY collection, period";

/// Rows of text per `COPY` message: the server parses as they arrive.
const COPY_CHUNK: usize = 1 << 20;

/// The `datetime` and `end_datetime` an item goes to pgstac with (see [`range`]), from the
/// fields the reader took out of it; `None` if it has none (it is refused, see [`rows`]).
pub fn span(item: &Item) -> Option<(&str, &str)> {
    match (&item.start_datetime, &item.end_datetime, &item.datetime) {
        (Some(start), Some(end), _) => Some((start, end)),
        (_, _, Some(datetime)) => Some((datetime, datetime)),
        _ => None,
    }
}

/// Makes the partitions `items` go to and widens their datetime constraints to hold them, in a
/// transaction of its own before the page's, as pgstac's loader does: widening takes the
/// partition's exclusive lock, which held to a page's commit would order pages of one partition
/// against each other's statistics updates and deadlock them. A constraint wider than the rows
/// it holds is valid (pgstac narrows it when it updates the partition's statistics).
pub async fn check_partitions(conn: &mut PgConnection, items: &[&Item]) -> Result<(), sqlx::Error> {
    let spans: Vec<(&str, &str, &str)> = items
        .iter()
        .filter_map(|item| span(item).map(|(d, e)| (item.collection.as_str(), d, e)))
        .collect();
    if spans.is_empty() {
        return Ok(());
    }
    let checked = check(conn, &spans).await;
    match checked {
        // A datetime Postgres cannot read fails the whole check: check the others one by one;
        // that item's insert then fails alone and it is quarantined with Postgres's reason.
        Err(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c.starts_with("22")) => {
            for span in &spans {
                let _ = check(conn, std::slice::from_ref(span)).await;
            }
            Ok(())
        }
        checked => checked,
    }
}

/// One transaction of `check_partition` calls (see [`CHECK_PARTITIONS`]).
async fn check(conn: &mut PgConnection, spans: &[(&str, &str, &str)]) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    // pgstac 0.9's functions name its tables without their schema.
    sqlx::query("SET LOCAL search_path TO pgstac, public")
        .execute(&mut *tx)
        .await?;
    sqlx::query(CHECK_PARTITIONS)
        .bind(spans.iter().map(|s| s.0).collect::<Vec<_>>())
        .bind(spans.iter().map(|s| s.1).collect::<Vec<_>>())
        .bind(spans.iter().map(|s| s.2).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Stores `rows` in pgstac, in the transaction `conn`, their partitions made first (see
/// [`check_partitions`]). `replace` lists the items pgstac may hold already (changed, or
/// stored again): their rows are deleted first, from whichever partition holds them (a changed
/// datetime moves an item).
pub async fn write(
    conn: &mut PgConnection,
    rows: &[&Row],
    replace: &[&Row],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    // pgstac's functions of 0.9 name its tables without their schema; `stac_sync` holds
    // tables of the same names. Its `content` column compresses with the server's default,
    // pglz: lz4, as stac-sync's own rows use, compresses the dehydrated items in two thirds
    // of the server's time (readers decompress either). Both end with the transaction (or
    // the savepoint, if this fails).
    sqlx::query(
        "SELECT set_config('search_path', 'pgstac, public', true), \
         set_config('default_toast_compression', 'lz4', true)",
    )
    .execute(&mut *conn)
    .await?;
    let mut by_collection: HashMap<&str, Vec<&str>> = HashMap::new();
    for row in replace {
        by_collection
            .entry(&row.collection)
            .or_default()
            .push(&row.id);
    }
    for (collection, ids) in by_collection {
        sqlx::query("DELETE FROM pgstac.items WHERE collection = $1 AND id = ANY($2)")
            .bind(collection)
            .bind(ids)
            .execute(&mut *conn)
            .await?;
    }
    let mut copy = conn
        .copy_in_raw(
            "COPY pgstac.items (id, collection, datetime, end_datetime, geometry, content, \
             private) FROM STDIN",
        )
        .await?;
    let mut buffer = Vec::with_capacity(COPY_CHUNK + (64 << 10));
    for row in rows {
        copy_line(row, &mut buffer);
        if buffer.len() >= COPY_CHUNK {
            copy.send(std::mem::take(&mut buffer)).await?;
            buffer.reserve(COPY_CHUNK + (64 << 10));
        }
    }
    if !buffer.is_empty() {
        copy.send(buffer).await?;
    }
    copy.finish().await?;
    sqlx::query("SET LOCAL search_path TO stac_sync, public")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether pgstac versions its collections' base items (0.10 and later).
pub async fn versioned(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regprocedure('pgstac.current_base_item(text)') IS NOT NULL")
        .fetch_one(conn)
        .await
}

/// A row in `COPY`'s text format.
fn copy_line(row: &Row, out: &mut Vec<u8>) {
    let fields = [
        Some(row.id.as_str()),
        Some(row.collection.as_str()),
        Some(row.datetime.as_str()),
        Some(row.end_datetime.as_str()),
        row.geometry.as_deref(),
        Some(row.content.as_str()),
        row.private.as_deref(),
    ];
    for (n, field) in fields.into_iter().enumerate() {
        if n > 0 {
            out.push(b'\t');
        }
        match field {
            None => out.extend_from_slice(br"\N"),
            Some(text) => escape(text, out),
        }
    }
    out.push(b'\n');
}

/// Text escaped for `COPY`: backslash, and the separators a value may hold.
fn escape(text: &str, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    // Most values hold no such byte: copy them whole.
    if !bytes
        .iter()
        .any(|b| matches!(b, b'\\' | b'\n' | b'\t' | b'\r'))
    {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (at, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => br"\\",
            b'\n' => br"\n",
            b'\t' => br"\t",
            b'\r' => br"\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..at]);
        out.extend_from_slice(escaped);
        start = at + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// The version of pgstac in the database; an error that says how to install it.
pub async fn version(pool: &PgPool, shown: &str) -> Result<String, Error> {
    sqlx::query_scalar("SELECT pgstac.get_version()")
        .fetch_one(pool)
        .await
        .map_err(|e| {
            Error::Sink(format!(
                "database {}: database_format = \"pgstac\", but pgstac cannot be read there \
                 ({e}); install it with `pypgstac migrate --dsn ...`, or grant this role \
                 pgstac_ingest",
                shown
            ))
        })
}

/// What `check` says of pgstac: its version (0.9 or later), and whether this role may
/// write items (into `pgstac.items`, its partitions made by `check_partition`) and
/// collections.
pub async fn probe(pool: &PgPool, shown: &str) -> Result<String, Error> {
    let version = version(pool, shown).await?;
    let numbers: Vec<u32> = version
        .split('.')
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    if numbers.as_slice() < [0, 9].as_slice() {
        return Err(Error::Sink(format!(
            "pgstac {version} is older than 0.9, which stac-sync needs (tested with 0.10); \
             upgrade it with `pypgstac migrate`"
        )));
    }
    let may_write: bool = sqlx::query_scalar(
        "SELECT has_table_privilege('pgstac.items', 'INSERT, DELETE') \
         AND has_function_privilege('pgstac.check_partition(text, tstzrange, tstzrange)', \
             'EXECUTE') \
         AND has_function_privilege('pgstac.upsert_collection(jsonb)', 'EXECUTE') \
         AND has_schema_privilege('pgstac', 'USAGE')",
    )
    .fetch_one(pool)
    .await
    .map_err(super::sink_error(
        shown,
        "read this role's pgstac privileges",
    ))?;
    if !may_write {
        return Err(Error::Sink(format!(
            "pgstac {version} is installed, but this role may not write items or \
             collections: grant it pgstac_ingest"
        )));
    }
    Ok(format!(
        "pgstac {version}; this role may write items and collections"
    ))
}

/// Creates or updates a collection in pgstac (before its items).
pub async fn upsert_collection(pool: &PgPool, shown: &str, content: &str) -> Result<(), Error> {
    sqlx::query("SELECT pgstac.upsert_collection(CAST($1 AS JSONB))")
        .bind(content)
        .execute(pool)
        .await
        .map_err(super::sink_error(shown, "store a collection in pgstac"))?;
    Ok(())
}

/// Removes from pgstac the items of collection `$1` that stac-sync holds as deleted (a
/// reconcile's tombstones): the served catalog matches the source.
pub const DELETE_TOMBSTONED: &str = "DELETE FROM pgstac.items p USING stac_sync.items s \
    WHERE s.collection = $1 AND s.deleted_at IS NOT NULL \
    AND p.collection = s.collection AND p.id = s.id";

#[cfg(test)]
mod tests {
    use super::{DO_NOT_MERGE as M, dehydrate, ewkb_hex, py_eq};
    use serde_json::{Value, json};

    fn dehydrated(base: Value, item: Value) -> Value {
        let Value::Object(item) = item else {
            panic!("test items are objects")
        };
        Value::Object(dehydrate(&base, &item))
    }

    /// pypgstac's own cases (`tests/hydration/test_dehydrate.py`), with what it gives.
    #[test]
    fn dehydrates_as_the_loader_does() {
        let cases = [
            (
                json!({"a": "1", "c": {"d": "3"}}),
                json!({"a": "1", "c": {"d": "3"}}),
                json!({}),
            ),
            (
                json!({"a": "1", "c": {"d": "3"}}),
                json!({"a": "1", "c": {"d": "3", "e": "4", "f": "5"}}),
                json!({"c": {"e": "4", "f": "5"}}),
            ),
            (
                json!({"a": [{"b1": 1, "b2": 2}, {"c1": 1, "c2": 2}]}),
                json!({"a": [{"b1": 1, "b2": 2, "b3": 3}, {"c1": 1, "c2": 2, "c3": 3}]}),
                json!({"a": [{"b3": 3}, {"c3": 3}]}),
            ),
            (
                json!({"a": [{"b1": 1, "b2": 2}, "foo", {"c1": 1, "c2": 2}, "bar"]}),
                json!({"a": [{"b1": 1, "b2": 2, "b3": 3}, "far", {"c1": 1, "c2": 2, "c3": 3}, "boo"]}),
                json!({"a": [{"b3": 3}, "far", {"c3": 3}, "boo"]}),
            ),
            (
                json!({"a": [{"b1": 1}, {"c1": 1}, {"d1": 1}]}),
                json!({"a": [{"b1": 1, "b2": 2}, {"c1": 1, "c2": 2}]}),
                json!({"a": [{"b1": 1, "b2": 2}, {"c1": 1, "c2": 2}]}),
            ),
            // The marker: a key the base has and the item lacks, at any depth and in lists.
            (
                json!({"a": "1", "c": {"d": "3", "e": "4"}}),
                json!({"a": "1", "c": {"d": "3", "f": "5"}}),
                json!({"c": {"e": M, "f": "5"}}),
            ),
            (
                json!({"a": [{"b": "1", "d": "3"}, {"c": "2", "e": "4"}]}),
                json!({"a": [{"b": "1"}, {"c": "2", "f": "5"}]}),
                json!({"a": [{"d": M}, {"e": M, "f": "5"}]}),
            ),
            (
                json!({"type": "Feature", "assets": {"a1": {"name": "one"}, "a2": {"name": "two"}}}),
                json!({"assets": {"a1": {"name": "one", "href": "http://foo.com"}}}),
                json!({"type": M, "assets": {"a1": {"href": "http://foo.com"}, "a2": M}}),
            ),
            (
                json!({"single": "F", "double": {"n": "v"}, "included": "v"}),
                json!({"included": "v", "unique": "v"}),
                json!({"single": M, "double": M, "unique": "v"}),
            ),
            (
                json!({"assets": {"thumbnail": {"roles": ["thumbnail"]}}}),
                json!({"assets": {"thumbnail": {"roles": ["thumbnail"], "href": "h"}}}),
                json!({"assets": {"thumbnail": {"href": "h"}}}),
            ),
            // Nulls and empty lists: kept where the base lacks the key, dropped where it has
            // another value (the loader's rule), equal numbers compared as Python does.
            (
                json!({"p": {"a": 1, "b": [1], "c": {"x": 1}}}),
                json!({"p": {"a": null, "b": [], "c": null, "d": null, "e": []}}),
                json!({"p": {"b": [], "d": null, "e": []}}),
            ),
            (
                json!({"p": {"a": 1, "b": true, "c": 2.5}}),
                json!({"p": {"a": 1.0, "b": 1, "c": 2.5}}),
                json!({}),
            ),
            // A key the base lacks keeps the item's value whole, nested objects too.
            (
                json!({"assets": {}}),
                json!({"assets": {"new": {"href": "h", "roles": ["data"]}}}),
                json!({"assets": {"new": {"href": "h", "roles": ["data"]}}}),
            ),
        ];
        for (base, item, expected) in cases {
            assert_eq!(
                dehydrated(base.clone(), item.clone()),
                expected,
                "{base} {item}"
            );
        }
    }

    /// The raw path (members copied as received) gives what the parsed path gives, on the
    /// loader's cases and on items whose members cannot be borrowed.
    #[test]
    fn the_raw_path_dehydrates_as_the_parsed_one() {
        let base = json!({"type": "Feature", "stac_version": "1.0.0", "collection": "c",
            "assets": {"a": {"type": "image/tiff", "roles": ["data"], "x:bands": [{"n": 1, "s": 2}],
                             "x:list": [1, 2], "x:obj": {"k": 1}},
                       "b": {"title": "B"}, "c": {"title": "C"}}});
        let items = [
            json!({"type": "Feature", "stac_version": "1.0.0", "id": "i", "collection": "c",
                   "geometry": {"type": "Point", "coordinates": [1.5, 2.25]},
                   "properties": {"datetime": "2024-01-01T00:00:00Z", "x": 1.0, "y": null,
                                  "x:text": 1.5e0},
                   "assets": {"a": {"href": "h", "type": "image/tiff", "roles": ["data"],
                                    "x:bands": [{"n": 1, "s": 3}], "x:list": [], "x:obj": null},
                              "b": {"href": "h", "title": "B"}, "d": {"href": "h"}},
                   "private": {"p": 1}, "links": []}),
            json!({"type": "Feature", "id": "i", "collection": "c", "geometry": null,
                   "properties": {"datetime": "2024-01-01T00:00:00Z"},
                   "assets": {"a": {"href": "h", "roles": [], "x:obj": {"k": 1.0}, "x:list": [1, 2, 3]},
                              "b": {"title": "B"}, "c": {"title": "C"}}}),
            json!({"type": "Feature", "id": "i", "collection": "c", "geometry": null,
                   "properties": {"datetime": "2024-01-01T00:00:00Z", "esc\\aped": 1},
                   "assets": {"b": {"title": "other"}}}),
        ];
        for id in [None, Some(7)] {
            for item in &items {
                let item = crate::stac::reader::Item {
                    collection: "c".into(),
                    id: "i".into(),
                    content: bytes::Bytes::from(
                        item.to_string()
                            .replace("\"x:text\":1.5", "\"x:text\":1.5e0"),
                    ),
                    hash: String::new(),
                    datetime: Some("2024-01-01T00:00:00Z".into()),
                    start_datetime: None,
                    end_datetime: None,
                    updated: None,
                    bbox: None,
                };
                let base = super::Base::new(base.clone(), id);
                let compared = base.compared();
                let raw = super::row(&item, &base, compared.as_ref()).expect("a row");
                let (d, e) = (raw.datetime.clone(), raw.end_datetime.clone());
                let parsed = super::row_parsed(&item, &base, d, e).expect("a row");
                let json = |t: &str| serde_json::from_str::<Value>(t).expect("JSON");
                // Read as received, not parsed: numbers keep their text.
                if item.content.windows(5).any(|w| w == b"1.5e0") {
                    assert!(raw.content.contains("1.5e0"), "{}", raw.content);
                }
                assert_eq!(json(&raw.content), json(&parsed.content), "{item:?}");
                assert_eq!(
                    raw.private.as_deref().map(json),
                    parsed.private.as_deref().map(json)
                );
                assert_eq!(raw.geometry, parsed.geometry);
            }
        }
    }

    #[test]
    fn raw_text_is_compared_as_python_compares_values() {
        let cases = [
            (
                json!({"a": [1, {"b": "x"}], "c": null}),
                r#"{"c": null, "a": [1.0, {"b": "x"}]}"#,
                true,
            ),
            (
                json!({"a": [1, {"b": "x"}]}),
                r#"{"a": [1, {"b": "y"}]}"#,
                false,
            ),
            (json!({"a": [1, 2]}), r#"{"a": [1, 2, 3]}"#, false),
            (json!({"a": [1, 2]}), r#"{"a": [1]}"#, false),
            (json!({"a": 1}), r#"{"a": 1, "b": 2}"#, false),
            (json!({"a": 1, "b": 2}), r#"{"a": 1}"#, false),
            (json!(["data", "é\n"]), r#"["data", "é\n"]"#, true),
            (json!(true), "1", true),
            (json!("1"), "1", false),
            (json!(null), "null", true),
            (json!(0.1), "0.1000000000000000055511151231257827", true),
            (json!({"a": 1}), r#"{"a": 1} x"#, false),
        ];
        for (base, text, expected) in cases {
            assert_eq!(super::equals_raw(&base, text), expected, "{base} {text}");
            if let Ok(value) = serde_json::from_str::<Value>(text) {
                assert_eq!(py_eq(&base, &value), expected, "{base} {text}");
            }
        }
    }

    #[test]
    fn python_equality() {
        assert!(py_eq(&json!(1), &json!(1.0)));
        assert!(py_eq(&json!(true), &json!(1)));
        assert!(!py_eq(&json!("1"), &json!(1)));
        assert!(py_eq(&json!({"a": [1, 2]}), &json!({"a": [1.0, 2]})));
        assert!(!py_eq(&json!([1, 2]), &json!([2, 1])));
    }

    /// The bytes plpygis gives (`Geometry.from_geojson(g).ewkb`, printed by pypgstac 0.10).
    #[test]
    fn geometry_as_the_loader_writes_it() -> Result<(), String> {
        assert_eq!(
            ewkb_hex(
                &json!({"type": "Polygon", "coordinates": [[[1, 2], [3, 4.5], [5, 6], [1, 2]]]})
            )?,
            "0103000020e61000000100000004000000000000000000f03f000000000000004000000000000008400000\
             00000000124000000000000014400000000000001840000000000000f03f0000000000000040"
        );
        assert_eq!(
            ewkb_hex(&json!({"type": "Point", "coordinates": [1, 2, 3]}))?,
            "01010000a0e6100000000000000000f03f00000000000000400000000000000840"
        );
        let multi = [
            (
                json!({"type": "MultiPolygon", "coordinates": [[[[1, 2], [3, 4], [5, 6], [1, 2]]], [[[7, 8], [9, 10], [11, 12], [7, 8]]]]}),
                "0106000020e61000000200000001030000000100000004000000000000000000f03f000000000000004000000000000008400000000000001040000000000000144000000000000018400000\
                 00000000f03f0000000000000040010300000001000000040000000000000000001c40000000000000204000000000000022400000000000002440000000000000264000000000000028400000000000001c400000000000002040",
            ),
            (
                json!({"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [1, 2]}, {"type": "LineString", "coordinates": [[1, 2], [3, 4]]}]}),
                "0107000020e6100000020000000101000000000000000000f03f0000000000000040010200000002000000000000000000f03f000000000000004000000000000008400000000000001040",
            ),
            (
                json!({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}),
                "0104000020e6100000020000000101000000000000000000f03f0000000000000040010100000000000000000008400000000000001040",
            ),
        ];
        for (geometry, plpygis) in multi {
            assert_eq!(ewkb_hex(&geometry)?, plpygis, "{geometry}");
        }
        assert!(ewkb_hex(&json!({"type": "Circle", "coordinates": [1, 2]})).is_err());
        assert!(ewkb_hex(&json!({"type": "Point", "coordinates": [1]})).is_err());
        assert!(ewkb_hex(&json!({"type": "Polygon", "coordinates": "x"})).is_err());
        Ok(())
    }

    #[test]
    fn copy_text_escapes_what_would_end_a_field() {
        let mut out = Vec::new();
        super::escape("a\\b\tc\nd\re", &mut out);
        assert_eq!(out, br"a\\b\tc\nd\re");
    }
}
