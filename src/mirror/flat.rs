//! A stored item as `stac::Item::into_flat_item` gives it, serialized to a JSON value, read
//! straight from the item's JSON value instead of through rustac's typed `Item`.
//!
//! rustac's typed reading is the exact definition, and costs as much as the rest of an export
//! together: its assets go through serde's `flatten`, which buffers every member, and the
//! typed item is then serialized to a value again. This does what the typed round trip does
//! to an item's members (the typed ones in the order their structs declare, the others in the
//! order given; `null` for an absent optional member dropped; datetimes read permissively and
//! written as chrono writes them; the bbox as floats; the version rustac writes; members the
//! flat item has no place for dropped), and gives up (`None`) on anything it does not do
//! exactly: the caller then reads the item the typed way, which also gives the errors.
//! A unit test compares both ways on real items and on items made to differ.

use serde_json::{Map, Value};

/// An item's members that the flat item keeps, in the order it writes them (`properties`
/// written as its members); a property named like another of them is dropped by rustac, or
/// written twice.
pub(super) const MEMBERS: [&str; 10] = [
    "type",
    "stac_version",
    "stac_extensions",
    "id",
    "geometry",
    "bbox",
    "properties",
    "links",
    "assets",
    "collection",
];

/// Whether an asset member is one rustac reads as its own type (bands, numbers, an
/// enumeration): an item whose assets have any of them is read the typed way.
pub(super) fn is_typed_asset_member(key: &str) -> bool {
    matches!(key, "bands" | "nodata" | "data_type" | "statistics")
}

/// The flat item's JSON value (with `"geometry": null` where rustac's has the geometry) and its
/// geometry; `None` when it must be read the typed way.
pub fn flat(text: &str) -> Option<(Value, Option<stac::Geometry>)> {
    let Ok(Value::Object(item)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    let (known, _dropped) = split(item, &MEMBERS);
    let [
        r#type,
        version,
        extensions,
        id,
        geometry,
        bbox,
        properties,
        links,
        assets,
        collection,
    ] = known;
    let mut out = Map::with_capacity(16);
    match r#type {
        None => {}
        Some(Value::String(t)) if t == "Feature" => {}
        Some(_) => return None,
    }
    out.insert("type".into(), Value::String("Feature".into()));
    if !matches!(version, None | Some(Value::String(_))) {
        return None;
    }
    out.insert(
        "stac_version".into(),
        serde_json::to_value(stac::STAC_VERSION).ok()?,
    );
    string_list(&mut out, "stac_extensions", extensions)?;
    // rustac reads an absent id as empty.
    let id = id.unwrap_or_else(|| Value::String(String::new()));
    required_string(&mut out, "id", Some(id))?;
    let geometry = match geometry {
        None | Some(Value::Null) => None,
        Some(g) => Some(serde_json::from_value::<stac::Geometry>(g).ok()?),
    };
    out.insert("geometry".into(), Value::Null);
    match bbox {
        None | Some(Value::Null) => {}
        Some(Value::Array(numbers)) if matches!(numbers.len(), 4 | 6) => {
            let floats = numbers
                .iter()
                .map(|n| n.as_f64().map(Value::from))
                .collect::<Option<Vec<_>>>()?;
            out.insert("bbox".into(), Value::Array(floats));
        }
        Some(_) => return None,
    }
    links_and_assets(&mut out, links, assets)?;
    match collection {
        None | Some(Value::Null) => out.insert("collection".into(), Value::Null),
        Some(c @ Value::String(_)) => out.insert("collection".into(), c),
        Some(_) => return None,
    };
    match properties {
        None => {
            out.insert("datetime".into(), Value::Null);
        }
        Some(Value::Object(p)) => flat_properties(p, &mut out)?,
        Some(_) => return None,
    }
    Some((Value::Object(out), geometry))
}

/// The item's links (always, as `stac::Link`s serialize) and assets (when it has any, as
/// `stac::Asset`s serialize), added to `out`.
fn links_and_assets(
    out: &mut Map<String, Value>,
    links: Option<Value>,
    assets: Option<Value>,
) -> Option<()> {
    let links = match links {
        None => Vec::new(),
        Some(Value::Array(links)) => links.into_iter().map(link).collect::<Option<_>>()?,
        Some(_) => return None,
    };
    out.insert("links".into(), Value::Array(links));
    match assets {
        None => {}
        Some(Value::Object(assets)) if assets.is_empty() => {}
        Some(Value::Object(assets)) => {
            let assets = assets
                .into_iter()
                .map(|(key, a)| Some((key, asset(a)?)))
                .collect::<Option<Map<_, _>>>()?;
            out.insert("assets".into(), Value::Object(assets));
        }
        Some(_) => return None,
    }
    Some(())
}

/// `stac::Properties` as the flat item holds them, added to `out`.
fn flat_properties(properties: Map<String, Value>, out: &mut Map<String, Value>) -> Option<()> {
    let (known, rest) = split(
        properties,
        &[
            "datetime",
            "start_datetime",
            "end_datetime",
            "title",
            "description",
            "created",
            "updated",
        ],
    );
    let [datetime, start, end, title, description, created, updated] = known;
    out.insert("datetime".into(), datetime_value(datetime)?);
    for (name, value) in [("start_datetime", start), ("end_datetime", end)] {
        match datetime_value(value)? {
            Value::Null => {}
            value => {
                out.insert(name.into(), value);
            }
        }
    }
    for (name, value) in [
        ("title", title),
        ("description", description),
        ("created", created),
        ("updated", updated),
    ] {
        optional_string(out, name, value)?;
    }
    for (key, value) in rest {
        if key != "properties" && MEMBERS.contains(&key.as_str()) {
            return None;
        }
        out.insert(key, value);
    }
    Some(())
}

/// A datetime as `stac::Properties` reads (permissively) and writes it; null when absent.
fn datetime_value(value: Option<Value>) -> Option<Value> {
    match value {
        None | Some(Value::Null) => Some(Value::Null),
        Some(Value::String(s)) => {
            let datetime = stac::datetime::parse_datetime_permissively(&s).ok()?;
            serde_json::to_value(datetime).ok()
        }
        Some(_) => None,
    }
}

/// A `stac::Link` as it serializes.
fn link(link: Value) -> Option<Value> {
    let Value::Object(link) = link else {
        return None;
    };
    let (known, rest) = split(
        link,
        &[
            "href", "rel", "type", "title", "method", "headers", "body", "merge",
        ],
    );
    let [href, rel, r#type, title, method, headers, body, merge] = known;
    let mut out = Map::with_capacity(4 + rest.len());
    required_string(&mut out, "href", href)?;
    required_string(&mut out, "rel", rel)?;
    optional_string(&mut out, "type", r#type)?;
    optional_string(&mut out, "title", title)?;
    optional_string(&mut out, "method", method)?;
    for (name, value) in [("headers", headers), ("body", body)] {
        match value {
            None | Some(Value::Null) => {}
            Some(v @ Value::Object(_)) => {
                out.insert(name.into(), v);
            }
            Some(_) => return None,
        }
    }
    match merge {
        None | Some(Value::Null) => {}
        Some(m @ Value::Bool(_)) => {
            out.insert("merge".into(), m);
        }
        Some(_) => return None,
    }
    out.extend(rest);
    Some(Value::Object(out))
}

/// A `stac::Asset` as it serializes (an asset with a member rustac types is left to it).
fn asset(asset: Value) -> Option<Value> {
    let Value::Object(asset) = asset else {
        return None;
    };
    if asset.keys().any(|key| is_typed_asset_member(key)) {
        return None;
    }
    let (known, rest) = split(
        asset,
        &[
            "href",
            "title",
            "description",
            "type",
            "roles",
            "created",
            "updated",
            "unit",
        ],
    );
    let [
        href,
        title,
        description,
        r#type,
        roles,
        created,
        updated,
        unit,
    ] = known;
    let mut out = Map::with_capacity(6 + rest.len());
    required_string(&mut out, "href", href)?;
    optional_string(&mut out, "title", title)?;
    optional_string(&mut out, "description", description)?;
    optional_string(&mut out, "type", r#type)?;
    string_list(&mut out, "roles", roles)?;
    optional_string(&mut out, "created", created)?;
    optional_string(&mut out, "updated", updated)?;
    optional_string(&mut out, "unit", unit)?;
    out.extend(rest);
    Some(Value::Object(out))
}

/// A list of strings, left out when empty (or absent).
fn string_list(out: &mut Map<String, Value>, name: &str, value: Option<Value>) -> Option<()> {
    match value {
        None => {}
        Some(Value::Array(list)) if list.is_empty() => {}
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => {
            out.insert(name.into(), Value::Array(list));
        }
        Some(_) => return None,
    }
    Some(())
}

fn required_string(out: &mut Map<String, Value>, name: &str, value: Option<Value>) -> Option<()> {
    match value {
        Some(s @ Value::String(_)) => {
            out.insert(name.into(), s);
            Some(())
        }
        _ => None,
    }
}

fn optional_string(out: &mut Map<String, Value>, name: &str, value: Option<Value>) -> Option<()> {
    match value {
        None | Some(Value::Null) => Some(()),
        Some(s @ Value::String(_)) => {
            out.insert(name.into(), s);
            Some(())
        }
        Some(_) => None,
    }
}

/// An object's members named in `known` (in that order) and the others (in theirs).
fn split<const N: usize>(
    object: Map<String, Value>,
    known: &[&str; N],
) -> ([Option<Value>; N], Vec<(String, Value)>) {
    let mut found: [Option<Value>; N] = std::array::from_fn(|_| None);
    let mut rest = Vec::new();
    for (key, value) in object {
        match known.iter().position(|k| *k == key) {
            Some(i) => found[i] = Some(value),
            None => rest.push((key, value)),
        }
    }
    (found, rest)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    /// Real items (EDS, Planetary Computer), as stored.
    pub(in crate::mirror) fn fixtures() -> Vec<Value> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        [
            "eds-test_data.json",
            "eds-test_data_s1.json",
            "eds-test_data_s2_mask.json",
            "pc-items-page-1.json",
            "pc-items-page-2.json",
        ]
        .iter()
        .flat_map(|name| {
            let text = std::fs::read_to_string(dir.join(name)).expect("a fixture");
            let page: Value = serde_json::from_str(&text).expect("JSON");
            page["features"].as_array().expect("features").clone()
        })
        .collect()
    }

    /// Both readings, as text (a value's equality ignores the order of its members).
    fn both(item: &Value) -> (Option<String>, Result<String, String>) {
        let text = item.to_string();
        let direct = flat(&text).map(|(value, geometry)| {
            format!(
                "{value} {}",
                serde_json::to_string(&geometry).expect("JSON")
            )
        });
        let typed = super::super::encode::typed(&text).map(|(value, geometry)| {
            format!(
                "{value} {}",
                serde_json::to_string(&geometry).expect("JSON")
            )
        });
        (direct, typed)
    }

    #[test]
    fn real_items_read_directly_as_rustac_reads_them() {
        let items = fixtures();
        assert!(items.len() >= 16, "{}", items.len());
        for item in &items {
            let (direct, typed) = both(item);
            let direct = direct.unwrap_or_else(|| panic!("read directly: {}", item["id"]));
            assert_eq!(Ok(direct), typed, "{}", item["id"]);
        }
    }

    /// Items changed where rustac's typed reading changes them: each is read directly as the
    /// typed reading reads it, or left to it (and must be for what the direct reading does
    /// not do).
    #[test]
    fn changed_items_read_directly_as_rustac_reads_them_or_are_left_to_it() {
        let base = fixtures().remove(0);
        type Change = fn(&mut Value);
        let direct: [(&str, Change); 17] = [
            ("datetime with an offset", |i| {
                i["properties"]["datetime"] = json!("2024-01-01T10:00:00.5+02:00")
            }),
            ("naive datetime", |i| {
                i["properties"]["datetime"] = json!("2024-01-01T10:00:00")
            }),
            ("interval", |i| {
                i["properties"]["datetime"] = Value::Null;
                i["properties"]["start_datetime"] = json!("2024-01-01T00:00:00Z");
                i["properties"]["end_datetime"] = json!("2024-01-02T00:00:00.000Z");
            }),
            ("null optional members", |i| {
                i["properties"]["title"] = Value::Null;
                i["links"] = json!([{"href": "h", "rel": "r", "title": null, "x": null}]);
                i["assets"]["a"] = json!({"href": "h", "type": null, "roles": []});
            }),
            ("typed link members", |i| {
                i["links"] = json!([{"x": 1, "merge": true, "body": {"a": 1}, "rel": "r",
                    "headers": {"h": "v"}, "method": "POST", "href": "h", "type": "t"}]);
            }),
            ("asset members in another order", |i| {
                i["assets"] = json!({"a": {"x:y": [1, 2.5], "unit": "m", "updated": "u",
                    "created": "c", "roles": ["data"], "type": "t", "description": "d",
                    "title": "t", "href": "h"}});
            }),
            ("no extensions", |i| i["stac_extensions"] = json!([])),
            ("no collection", |i| {
                i.as_object_mut().map(|o| o.remove("collection"));
            }),
            ("an integer bbox", |i| i["bbox"] = json!([1, 2, 3, 4])),
            ("a 3D bbox", |i| i["bbox"] = json!([1, 2, 0, 3, 4, 10.5])),
            ("no bbox", |i| i["bbox"] = Value::Null),
            ("a member outside the spec", |i| {
                i["foo"] = json!({"bar": 1})
            }),
            ("no links, no assets", |i| {
                i.as_object_mut().map(|o| o.remove("links"));
                i["assets"] = json!({});
            }),
            ("another version", |i| {
                i["stac_version"] = json!("1.0.0-rc.1")
            }),
            ("no geometry", |i| i["geometry"] = Value::Null),
            ("no type, no id", |i| {
                i.as_object_mut().map(|o| {
                    o.remove("type");
                    o.remove("id")
                });
            }),
            ("a property before datetime", |i| {
                let p = i["properties"].as_object_mut().expect("object");
                let datetime = p.remove("datetime").expect("datetime");
                p.insert("datetime".into(), datetime);
            }),
        ];
        for (what, change) in direct {
            let mut item = base.clone();
            change(&mut item);
            let (direct, typed) = both(&item);
            let direct = direct.unwrap_or_else(|| panic!("{what}: read directly"));
            assert_eq!(Ok(direct), typed, "{what}");
        }
        let left: [(&str, Change); 8] = [
            ("a property named as a top-level member", |i| {
                i["properties"]["id"] = json!("x")
            }),
            ("an asset's nodata", |i| {
                i["assets"]["a"] = json!({"href": "h", "nodata": 0})
            }),
            ("an asset's bands", |i| {
                i["assets"]["a"] = json!({"href": "h", "bands": [{"name": "b"}]})
            }),
            ("a datetime that does not read", |i| {
                i["properties"]["datetime"] = json!("yesterday")
            }),
            ("a number as a title", |i| {
                i["properties"]["title"] = json!(1)
            }),
            ("null links", |i| i["links"] = Value::Null),
            ("another type", |i| i["type"] = json!("FeatureCollection")),
            ("a bbox of 5", |i| i["bbox"] = json!([1, 2, 3, 4, 5])),
        ];
        for (what, change) in left {
            let mut item = base.clone();
            change(&mut item);
            assert_eq!(both(&item).0, None, "{what}");
        }
    }
}
