//! A search page read into items as its bytes arrive ([`PageReader`]): each feature is kept as
//! the bytes received ([`Item::content`]; nothing is re-serialised) and only its indexed fields
//! are parsed. A feature that cannot be stored becomes a [`Rejected`] with the reason and the
//! rest of the page is kept; only a page that is not an ItemCollection at all is a
//! [`PageError`]. The next link is read by [`super::search`].

use super::search::{self, Request};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// Why a page as a whole cannot be read (a bad feature is a [`Rejected`] instead). A page cut
/// short by a proxy reads badly too, so the page is fetched again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// Not the JSON of an ItemCollection.
    #[error("the page is not a STAC ItemCollection: {what} at byte {at}")]
    Malformed {
        /// What was found.
        what: String,
        /// The 1-based byte offset in the page.
        at: usize,
    },
    /// The bytes ended before the JSON did.
    #[error("the page ended after {bytes} bytes, before its JSON did (cut short?)")]
    CutShort {
        /// Bytes received.
        bytes: usize,
    },
    /// A JSON object without `features`.
    #[error("the page is not a STAC ItemCollection (it has no `features`)")]
    NoFeatures,
    /// Its `next` link cannot be followed.
    #[error("{0}")]
    Next(String),
}

/// An item ready to store.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its collection.
    pub collection: String,
    /// Its id.
    pub id: String,
    /// The item JSON exactly as received.
    pub content: Bytes,
    /// [`content_hash`] of `content`.
    pub hash: String,
    /// `properties.datetime`.
    pub datetime: Option<String>,
    /// `properties.start_datetime`.
    pub start_datetime: Option<String>,
    /// `properties.end_datetime`.
    pub end_datetime: Option<String>,
    /// `properties.updated`.
    pub updated: Option<String>,
    /// `[xmin, ymin, xmax, ymax]`.
    pub bbox: Option<[f64; 4]>,
}

/// An item's `content_hash`: XXH3-128 of its bytes as received, 32 hex digits. Every item
/// received is hashed to know whether it changed, each unchanged item too, so the hash is a
/// fast one; at 128 bits, two different contents with the same hash are a negligible accident
/// (rsync checks files with the same hash).
pub fn content_hash(content: &[u8]) -> String {
    format!("{:032x}", twox_hash::XxHash3_128::oneshot(content))
}

impl Item {
    /// Whether `stored`, the `content_hash` of a stored row, is this item's content's. Rows
    /// stored before `content_hash` was XXH3-128 hold BLAKE3 (64 hex digits): this item is
    /// hashed with BLAKE3 for them, so that such a row reads unchanged, not rewritten, until
    /// its item changes.
    pub fn has_hash(&self, stored: &str) -> bool {
        if stored.len() == LEGACY_HASH_LEN {
            blake3::hash(&self.content).to_hex().as_str() == stored
        } else {
            stored == self.hash
        }
    }
}

/// The length of a BLAKE3 `content_hash` in hex.
const LEGACY_HASH_LEN: usize = 64;

/// A feature that could not be stored, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The feature as received.
    pub content: Bytes,
    /// Why it was not stored.
    pub reason: String,
    /// Its collection, if it had a readable one.
    pub collection: Option<String>,
    /// Its id, if it had a readable one.
    pub id: Option<String>,
}

/// One page of search results.
#[derive(Debug, Default)]
pub struct Page {
    /// Storable items, one per `(collection, id)` (the last wins within a page).
    pub items: Vec<Item>,
    /// Features that could not be stored.
    pub rejected: Vec<Rejected>,
    /// Items dropped because the same `(collection, id)` came again later in the page.
    pub duplicates: u64,
    /// The next page's request; `None` only when the page had no `next` link.
    pub next: Option<Request>,
    /// `false` for a part of a page read before its end: it has no `next`, and its commit
    /// keeps the resume point at this page.
    pub whole: bool,
    /// The bytes of the features read into it (what it holds in memory).
    pub bytes: usize,
    /// Features received (items, rejected and repeated ones): what a match count is checked
    /// against.
    pub features: u64,
    /// How many items the server says the search matches (`numberMatched`, or the Context
    /// extension's `context.matched`), on the last part of a page that reports it.
    pub matched: Option<u64>,
}

/// The Context extension's object (deprecated, still served by some APIs).
#[derive(Deserialize)]
struct Context {
    #[serde(default)]
    matched: Option<u64>,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    collection: Option<Cow<'a, str>>,
    #[serde(default)]
    bbox: Option<Vec<f64>>,
    #[serde(borrow, default)]
    properties: Option<Properties<'a>>,
}

impl Head<'_> {
    /// The same fields, no longer borrowed from the page's bytes.
    fn into_owned(self) -> Head<'static> {
        let own = |s: Option<Cow<'_, str>>| s.map(|s| Cow::Owned(s.into_owned()));
        Head {
            id: own(self.id),
            collection: own(self.collection),
            bbox: self.bbox,
            properties: self.properties.map(|p| Properties {
                datetime: own(p.datetime),
                start_datetime: own(p.start_datetime),
                end_datetime: own(p.end_datetime),
                updated: own(p.updated),
            }),
        }
    }
}

#[derive(Deserialize)]
struct Properties<'a> {
    #[serde(borrow, default)]
    datetime: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    start_datetime: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    end_datetime: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    updated: Option<Cow<'a, str>>,
}

/// Bytes a reader holds before it looks for whole features in them: a feature cut by the end
/// of the bytes is scanned again when more arrive, so it waits for a good many of them.
const READ_AHEAD: usize = 256 * 1024;

/// Where a [`PageReader`] is in the page's JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before the page's `{`.
    Start,
    /// Before a member's key, or the page's `}` if `first`.
    Key { first: bool },
    /// Between a key and its `:`.
    Colon,
    /// Before the value of the key just read.
    Value,
    /// After a member: before `,` or `}`.
    AfterMember,
    /// Inside `features`: before a feature, or `]` if `first`.
    Feature { first: bool },
    /// After a feature: before `,` or `]`.
    AfterFeature,
    /// Inside a feature larger than the reader's cap, being skipped.
    Oversized,
    /// After the page's `}`.
    End,
}

/// Bytes of a feature over the cap that are kept for the quarantine.
const KEPT_OF_OVERSIZED: usize = 64 << 10;

/// Where a skip through a feature over the cap is: it is scanned byte by byte and dropped, so
/// memory does not grow with it.
#[derive(Debug, Default)]
struct Skip {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Bytes skipped so far.
    bytes: usize,
    /// Its first bytes.
    kept: Bytes,
}

impl Skip {
    /// How many of `bytes` belong to the feature: `Some` once its end is among them.
    fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        for (at, &byte) in bytes.iter().enumerate() {
            if self.in_string {
                match byte {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => {
                        self.in_string = false;
                        if self.depth == 0 {
                            return Some(at + 1);
                        }
                    }
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                // The array's own `]`, or the `,` after a feature that is a bare number.
                b'}' | b']' | b',' if self.depth == 0 => return Some(at),
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Some(at + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Reads a page as its bytes arrive: each feature becomes an item (or a [`Rejected`]) as soon
/// as its JSON is complete, so a page is never held whole, and [`PageReader::take_part`] hands
/// the items read so far to the writer while the rest of the page is still arriving.
#[derive(Debug)]
pub struct PageReader {
    default_collection: Option<String>,
    /// Bytes received and not yet read.
    buf: BytesMut,
    /// Bytes split off `buf` so far (for error positions).
    read: usize,
    /// No new attempt to read a value before `buf` holds this many bytes.
    wait: usize,
    /// [`READ_AHEAD`], smaller in tests.
    read_ahead: usize,
    at: At,
    key: String,
    features: bool,
    links: Option<Bytes>,
    matched: Option<u64>,
    part: Page,
    /// Every `(collection, id)` of the page so far: its index in `part`, or `None` if an
    /// earlier part took it.
    seen: HashMap<(String, String), Option<usize>>,
    /// A feature larger than this is quarantined with its size, and not held whole.
    max_item_bytes: usize,
    /// The feature over the cap being skipped.
    skip: Skip,
}

impl PageReader {
    /// A reader of one page. `default_collection` is the one collection the search named: items
    /// without `collection` are filed there, and items claiming another are rejected.
    pub fn new(default_collection: Option<&str>) -> PageReader {
        PageReader {
            default_collection: default_collection.map(str::to_string),
            buf: BytesMut::new(),
            read: 0,
            wait: 0,
            read_ahead: READ_AHEAD,
            at: At::Start,
            key: String::new(),
            features: false,
            links: None,
            matched: None,
            part: Page::default(),
            seen: HashMap::new(),
            max_item_bytes: crate::config::DEFAULT_MAX_ITEM_BYTES,
            skip: Skip::default(),
        }
    }

    /// Caps one feature's bytes (`max_item_bytes`).
    pub fn with_max_item_bytes(mut self, max: usize) -> PageReader {
        self.max_item_bytes = max.max(1);
        self
    }

    /// Takes the next bytes of the page. `Err`: the page cannot be a STAC ItemCollection.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), PageError> {
        self.buf.extend_from_slice(bytes);
        self.advance(false)
    }

    /// Reads one feature given whole, as it reads a page's (an item of a bulk search's file).
    pub fn add_feature(&mut self, content: Bytes) {
        self.add(content, None);
    }

    /// The bytes of the features read and not yet taken.
    pub fn part_bytes(&self) -> usize {
        self.part.bytes
    }

    /// The items and rejected features read since the last part, as a page that is not
    /// `whole`: committing it must keep the resume point at this page.
    pub fn take_part(&mut self) -> Page {
        for at in self.seen.values_mut() {
            *at = None;
        }
        std::mem::take(&mut self.part)
    }

    /// Ends the page (all its bytes were pushed): the last part, `whole`, with the request its
    /// `next` link asks for. `request` is the request that fetched the page.
    pub fn finish(mut self, request: &Request) -> Result<Page, PageError> {
        self.advance(true)?;
        if self.at != At::End {
            return Err(PageError::CutShort {
                bytes: self.read + self.buf.len(),
            });
        }
        if !self.features {
            return Err(PageError::NoFeatures);
        }
        let next = search::next_of(self.links.as_deref(), request).map_err(PageError::Next)?;
        let mut page = self.take_part();
        page.next = next;
        page.whole = true;
        page.matched = self.matched;
        Ok(page)
    }

    fn fail(&self, what: &str) -> PageError {
        PageError::Malformed {
            what: what.to_string(),
            at: self.read + 1,
        }
    }

    /// Reads as far as the bytes go; `end`: no more will come.
    fn advance(&mut self, end: bool) -> Result<(), PageError> {
        loop {
            // Inside a feature being skipped, blanks are its bytes: counted there.
            if self.at != At::Oversized {
                let blank = self
                    .buf
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                self.consume(blank);
            }
            let Some(&next) = self.buf.first() else {
                return Ok(());
            };
            match (self.at, next) {
                (At::Start, b'{') => self.step(At::Key { first: true }),
                (At::Start, _) => return Err(self.fail("it is not a JSON object")),
                (At::Key { first: true }, b'}') | (At::AfterMember, b'}') => self.step(At::End),
                (At::Key { .. }, b'"') => {
                    let Some(key) = self.value(end)? else {
                        return Ok(());
                    };
                    self.key = serde_json::from_slice(&key)
                        .map_err(|e| self.fail(&format!("a key cannot be read ({e})")))?;
                    self.at = At::Colon;
                }
                (At::Colon, b':') => self.step(At::Value),
                (At::Value, b'[') if self.key == "features" && !self.features => {
                    self.features = true;
                    self.step(At::Feature { first: true });
                }
                (At::Value, _) if self.key == "features" => {
                    return Err(self.fail(if self.features {
                        "`features` is given twice"
                    } else {
                        "`features` is not an array"
                    }));
                }
                (At::Value, _) => {
                    let Some(value) = self.value(end)? else {
                        return Ok(());
                    };
                    match self.key.as_str() {
                        "links" => self.links = Some(value),
                        "numberMatched" => self.matched = serde_json::from_slice(&value).ok(),
                        "context" if self.matched.is_none() => {
                            self.matched = serde_json::from_slice::<Context>(&value)
                                .ok()
                                .and_then(|c| c.matched);
                        }
                        _ => {}
                    }
                    self.at = At::AfterMember;
                }
                (At::AfterMember, b',') => self.step(At::Key { first: false }),
                (At::Feature { first: true }, b']') | (At::AfterFeature, b']') => {
                    self.step(At::AfterMember);
                }
                (At::Oversized, _) => {
                    if !self.skip_oversized() {
                        return Ok(());
                    }
                }
                (At::Feature { .. }, _) => {
                    if !self.feature(end)? {
                        return Ok(());
                    }
                }
                (At::AfterFeature, b',') => self.step(At::Feature { first: false }),
                (At::End, _) => return Err(self.fail("there is more after the page's JSON")),
                (_, other) => {
                    return Err(self.fail(&format!(
                        "unexpected {:?}",
                        char::from(other).escape_default().to_string()
                    )));
                }
            }
        }
    }

    /// Reads the feature at the front of the bytes, if it is complete (or starts skipping it,
    /// if it is over the cap); whether the reader can go on.
    fn feature(&mut self, end: bool) -> Result<bool, PageError> {
        if let Some((feature, head)) = self.head(end) {
            self.add(feature, Some(head));
        } else {
            let Some(feature) = self.value(end)? else {
                return Ok(self.buf.len() > self.max_item_bytes && self.oversized());
            };
            self.add(feature, None);
        }
        self.at = At::AfterFeature;
        Ok(true)
    }

    /// Whether the feature at the front of more than `max_item_bytes` buffered bytes is to be
    /// read now (it ends within the cap: no more waiting for bytes) or skipped (it does not).
    /// Either way the reader goes on at once.
    fn oversized(&mut self) -> bool {
        match Skip::default().scan(&self.buf) {
            Some(n) if n <= self.max_item_bytes => self.wait = 0,
            _ => {
                let kept = KEPT_OF_OVERSIZED.min(self.buf.len());
                self.skip = Skip {
                    kept: Bytes::copy_from_slice(&self.buf[..kept]),
                    ..Skip::default()
                };
                self.at = At::Oversized;
            }
        }
        true
    }

    /// Drops the bytes of the feature over the cap; once it ends, quarantines its first bytes
    /// with its size. Whether it ended.
    fn skip_oversized(&mut self) -> bool {
        let end = self.skip.scan(&self.buf);
        let n = end.unwrap_or(self.buf.len());
        self.skip.bytes += n;
        self.consume(n);
        if end.is_none() {
            return false;
        }
        let skip = std::mem::take(&mut self.skip);
        self.part.features += 1;
        self.reject_oversized(skip.kept, skip.bytes);
        self.at = At::AfterFeature;
        true
    }

    fn reject_oversized(&mut self, kept: Bytes, size: usize) {
        let (collection, id) = key_in_prefix(&kept);
        let collection = collection.or_else(|| self.default_collection.clone());
        self.part.rejected.push(Rejected {
            reason: format!(
                "the feature is {size} bytes, more than max_item_bytes ({}); its first {} bytes \
                 are kept here",
                self.max_item_bytes,
                kept.len()
            ),
            content: kept,
            collection,
            id,
        });
    }

    fn consume(&mut self, n: usize) {
        bytes::Buf::advance(&mut self.buf, n);
        self.read += n;
    }

    fn step(&mut self, at: At) {
        self.consume(1);
        self.at = at;
    }

    /// The feature at the front of the bytes, split off, with its indexed fields: one pass of
    /// serde_json finds both. `None` if it may not be complete yet, or is not a readable STAC
    /// item: [`PageReader::value`] then reads it as any JSON value, and says why.
    fn head(&mut self, end: bool) -> Option<(Bytes, Head<'static>)> {
        if (!end && self.buf.len() < self.wait) || self.buf.first() != Some(&b'{') {
            return None;
        }
        let mut heads = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Head>();
        let head = heads.next()?.ok()?.into_owned();
        let n = heads.byte_offset();
        self.wait = 0;
        let feature = self.buf.split_to(n).freeze();
        self.read += n;
        Some((feature, head))
    }

    /// The JSON value at the front of the bytes, split off, or `None` if it may not be
    /// complete yet.
    fn value(&mut self, end: bool) -> Result<Option<Bytes>, PageError> {
        if !end && self.buf.len() < self.wait {
            return Ok(None);
        }
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<&RawValue>();
        match values.next() {
            Some(Ok(_)) => {
                let n = values.byte_offset();
                // A number or `true` may go on in the next bytes.
                let closed = matches!(self.buf.get(n - 1), Some(b'}' | b']' | b'"'));
                if !end && n == self.buf.len() && !closed {
                    self.wait = n + 1;
                    return Ok(None);
                }
                self.wait = 0;
                let value = self.buf.split_to(n).freeze();
                self.read += n;
                Ok(Some(value))
            }
            // A number cut by the end of the bytes is "invalid", not "EOF": an error in the last
            // few bytes may go away with the next ones.
            Some(Err(e)) if !end && (e.is_eof() || self.offset_of(&e) + 16 >= self.buf.len()) => {
                // Try again once there are twice the bytes (a big feature is not rescanned at
                // every chunk), and a good many more in any case.
                self.wait = (self.buf.len() * 2).max(self.read_ahead);
                Ok(None)
            }
            Some(Err(e)) => Err(PageError::Malformed {
                what: format!(
                    "invalid JSON ({})",
                    e.to_string().split(" at line ").next().unwrap_or_default()
                ),
                at: self.read + self.offset_of(&e) + 1,
            }),
            None => Ok(None),
        }
    }

    /// Where in `buf` a JSON error was found.
    fn offset_of(&self, error: &serde_json::Error) -> usize {
        let line_start = match error.line() {
            0 | 1 => 0,
            line => memchr::memchr_iter(b'\n', &self.buf)
                .nth(line - 2)
                .map_or(self.buf.len(), |newline| newline + 1),
        };
        line_start + error.column().saturating_sub(1)
    }

    /// Reads one feature into the part, with its indexed fields if they were read already.
    fn add(&mut self, content: Bytes, head: Option<Head<'_>>) {
        self.part.features += 1;
        if content.len() > self.max_item_bytes {
            let kept = content.slice(..KEPT_OF_OVERSIZED.min(content.len()));
            return self.reject_oversized(kept, content.len());
        }
        self.part.bytes += content.len();
        // serde_json does not check the UTF-8 of strings it skips.
        let item = simdutf8::compat::from_utf8(&content)
            .map_err(|e| (format!("the feature is not UTF-8 ({e})"), None, None))
            .and_then(|text| match head {
                Some(head) => Ok(head),
                None => read_head(text),
            })
            .and_then(|head| read_item(head, content.clone(), self.default_collection.as_deref()));
        let item = match item {
            Ok(item) => item,
            Err((reason, collection, id)) => {
                self.part.rejected.push(Rejected {
                    content,
                    reason,
                    collection,
                    id,
                });
                return;
            }
        };
        let part = &mut self.part;
        match self.seen.entry((item.collection.clone(), item.id.clone())) {
            // The last of a page wins: within a part it replaces the earlier one; the part
            // after an earlier one's commits after it.
            Entry::Occupied(mut at) => {
                part.duplicates += 1;
                match *at.get() {
                    Some(i) => part.items[i] = item,
                    None => {
                        at.insert(Some(part.items.len()));
                        part.items.push(item);
                    }
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(Some(part.items.len()));
                part.items.push(item);
            }
        }
    }
}

/// Parses a page held whole. `Err` means the page as a whole is unreadable (not JSON, no
/// `features`): the caller retries it. `default_collection` is given to items without
/// `collection` (the search named that one collection).
pub fn parse_page(
    body: &[u8],
    request: &Request,
    default_collection: Option<&str>,
) -> Result<Page, PageError> {
    let mut reader = PageReader::new(default_collection);
    reader.push(body)?;
    reader.finish(request)
}

type Refusal = (String, Option<String>, Option<String>);

/// A feature's indexed fields, or why it is not a STAC item.
fn read_head(raw: &str) -> Result<Head<'_>, Refusal> {
    if !raw.starts_with('{') {
        return Err(("the feature is not a JSON object".into(), None, None));
    }
    serde_json::from_str(raw).map_err(|e| {
        (
            format!("the feature is not a readable STAC item ({e})"),
            None,
            None,
        )
    })
}

fn read_item(head: Head<'_>, content: Bytes, searched: Option<&str>) -> Result<Item, Refusal> {
    let claimed = head.collection.map(Cow::into_owned);
    let id = match head.id {
        Some(id) if !id.is_empty() => id.into_owned(),
        Some(_) => return Err(("the item's id is empty".into(), claimed, None)),
        None => return Err(("the item has no id".into(), claimed, None)),
    };
    let collection = match (claimed, searched) {
        // Stored under a collection the search did not ask for, it would overwrite another
        // job's item without a word.
        (Some(claimed), Some(searched)) if claimed != searched => {
            return Err((
                format!(
                    "the item claims collection {claimed:?}, but the search asked for \
                     {searched:?} only: not stored, so that it cannot overwrite an item of \
                     another collection"
                ),
                Some(claimed),
                Some(id),
            ));
        }
        (Some(claimed), _) => claimed,
        (None, Some(searched)) => searched.to_string(),
        (None, None) => String::new(),
    };
    if collection.is_empty() {
        return Err((
            "the item has no collection and the search names several".into(),
            None,
            Some(id),
        ));
    }
    let bbox = head.bbox.as_deref().and_then(crate::domain::bbox_2d);
    let (datetime, start_datetime, end_datetime, updated) = match head.properties {
        Some(p) => (
            p.datetime.map(Cow::into_owned),
            p.start_datetime.map(Cow::into_owned),
            p.end_datetime.map(Cow::into_owned),
            p.updated.map(Cow::into_owned),
        ),
        None => (None, None, None, None),
    };
    Ok(Item {
        hash: content_hash(&content),
        datetime,
        start_datetime,
        end_datetime,
        updated,
        collection,
        id,
        content,
        bbox,
    })
}

/// The `collection` and `id` members among the top-level members a feature's first bytes hold
/// (an oversized feature is quarantined with those alone): as far as they can be read.
fn key_in_prefix(prefix: &[u8]) -> (Option<String>, Option<String>) {
    struct Found<'a>(&'a mut (Option<String>, Option<String>));
    impl<'de> serde::de::Visitor<'de> for Found<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a feature")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                match name.as_ref() {
                    "collection" => self.0.0 = map.next_value::<Option<String>>().ok().flatten(),
                    "id" => self.0.1 = map.next_value::<Option<String>>().ok().flatten(),
                    _ => {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
    }
    let mut found = (None, None);
    let mut reader = serde_json::Deserializer::from_slice(prefix);
    // The prefix ends mid-feature: what was read before the end is kept.
    let _ = serde::Deserializer::deserialize_map(&mut reader, Found(&mut found));
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use url::Url;

    #[test]
    fn an_item_has_its_own_hash_and_the_blake3_of_its_bytes() {
        let item = |content: &'static [u8]| Item {
            collection: "c".into(),
            id: "i".into(),
            content: Bytes::from_static(content),
            hash: content_hash(content),
            datetime: None,
            start_datetime: None,
            end_datetime: None,
            updated: None,
            bbox: None,
        };
        let (one, other) = (item(br#"{"id":"i"}"#), item(br#"{"id":"i","x":1}"#));
        assert_eq!(one.hash.len(), 32);
        assert!(one.has_hash(&one.hash));
        assert!(!one.has_hash(&other.hash));
        let blake3 = |item: &Item| blake3::hash(&item.content).to_hex().to_string();
        assert!(one.has_hash(&blake3(&one)));
        assert!(!one.has_hash(&blake3(&other)));
        assert!(!one.has_hash(""));
    }

    fn post(body: Value) -> Request {
        Request {
            method: "POST".into(),
            url: Url::parse("https://api.test/stac/search").expect("url"),
            headers: Vec::new(),
            body: Some(body),
            anonymous: false,
        }
    }

    #[test]
    fn a_merge_link_adds_its_body_to_the_current_one() {
        let page = Bytes::from_static(
            br#"{"features":[],"links":[{"rel":"next","href":"search","method":"POST","merge":true,"body":{"token":"t2"}}]}"#,
        );
        let current = post(serde_json::json!({"collections":["a"],"limit":5,"token":"t1"}));
        let next = parse_page(&page, &current, None)
            .expect("page")
            .next
            .expect("next");
        assert_eq!(
            next.body,
            Some(serde_json::json!({"collections":["a"],"limit":5,"token":"t2"}))
        );
        assert_eq!(next.url.as_str(), "https://api.test/stac/search");
    }

    #[test]
    fn items_keep_their_bytes_and_problems_are_named() {
        let page = Bytes::from_static(
            br#"{"features":[ {"id":"a","collection":"c","bbox":[1,2,3,4],"properties":{"datetime":"2024-01-01T00:00:00Z"}}, 7, {"collection":"c"}, {"id":"a","collection":"c","properties":{}} ],"links":[]}"#,
        );
        let request = post(serde_json::json!({}));
        let page = parse_page(&page, &request, None).expect("page");
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.duplicates, 1);
        assert_eq!(
            &page.items[0].content[..],
            br#"{"id":"a","collection":"c","properties":{}}"#
        );
        let reasons: Vec<_> = page.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            ["the feature is not a JSON object", "the item has no id"]
        );
        assert!(page.next.is_none());
    }

    /// A page read in chunks of `size` bytes, with a part taken whenever one has `part` bytes.
    fn read_in_chunks(body: &[u8], size: usize, part: usize) -> Result<Vec<Page>, PageError> {
        read_ahead_in_chunks(body, size, part, 1)
    }

    fn read_ahead_in_chunks(
        body: &[u8],
        size: usize,
        part: usize,
        read_ahead: usize,
    ) -> Result<Vec<Page>, PageError> {
        let request = post(serde_json::json!({}));
        let mut reader = PageReader::new(Some("c"));
        reader.read_ahead = read_ahead;
        let mut parts = Vec::new();
        for chunk in body.chunks(size) {
            reader.push(chunk)?;
            if reader.part_bytes() >= part {
                parts.push(reader.take_part());
            }
        }
        parts.push(reader.finish(&request)?);
        Ok(parts)
    }

    fn ids(parts: &[Page]) -> Vec<String> {
        parts
            .iter()
            .flat_map(|p| {
                p.items
                    .iter()
                    .map(|i| format!("{}:{}", i.id, i.content.len()))
            })
            .collect()
    }

    fn page_of_40(padding: usize) -> String {
        let features: Vec<String> = (0..40)
            .map(|i| {
                format!(
                    r#"{{"id":"i{i}","bbox":[1,2,3,{i}],"properties":{{"datetime":"2024-01-01T00:00:00Z","note":"a \" and \\ and ] and }} {}"}}}}"#,
                    "x".repeat(i * padding)
                )
            })
            .collect();
        format!(
            r#" {{ "type" : "FeatureCollection", "numberReturned": 40, "features" : [ {} ] , "links":[{{"rel":"next","href":"search?page=2"}}], "numberMatched": 12345 }} "#,
            features.join(" ,\n ")
        )
    }

    #[test]
    fn the_match_count_comes_from_number_matched_or_the_context_extension() {
        let page = |body: &str| {
            parse_page(body.as_bytes(), &post(serde_json::json!({})), Some("c")).expect("page")
        };
        let context = r#"{"context":{"returned":1,"limit":1,"matched":77},"features":[{"id":"a"},7],"links":[]}"#;
        assert_eq!(page(context).matched, Some(77));
        assert_eq!(
            page(context).features,
            2,
            "a rejected feature is received too"
        );
        let both = r#"{"numberMatched":5,"context":{"matched":6},"features":[]}"#;
        assert_eq!(page(both).matched, Some(5));
        let neither = r#"{"numberMatched":"many","features":[]}"#;
        assert_eq!(page(neither).matched, None);
    }

    #[test]
    fn a_page_read_in_chunks_of_any_size_gives_the_same_items_and_next_link() {
        let body = page_of_40(37);
        let whole = parse_page(body.as_bytes(), &post(serde_json::json!({})), Some("c"))
            .expect("whole page");
        assert_eq!(whole.items.len(), 40);
        assert!(whole.whole);
        let expected = ids(std::slice::from_ref(&whole));
        for size in [1, 2, 3, 7, 64, 1000, 4096, body.len()] {
            for part in [1, 5_000, usize::MAX] {
                let parts = read_in_chunks(body.as_bytes(), size, part)
                    .unwrap_or_else(|e| panic!("chunks of {size}: {e}"));
                assert_eq!(ids(&parts), expected, "chunks of {size}, parts of {part}");
                let last = parts.last().expect("last part");
                assert!(last.whole && parts[..parts.len() - 1].iter().all(|p| !p.whole));
                assert!(parts[..parts.len() - 1].iter().all(|p| p.next.is_none()));
                assert_eq!(
                    last.next.as_ref().map(|n| n.url.as_str()),
                    Some("https://api.test/stac/search?page=2")
                );
                assert_eq!(
                    last.matched,
                    Some(12345),
                    "numberMatched, after the features"
                );
                assert_eq!(parts.iter().map(|p| p.features).sum::<u64>(), 40);
                if part == 1 && size < body.len() {
                    assert!(parts.len() > 1, "parts were taken");
                }
            }
        }
    }

    #[test]
    fn a_big_page_is_read_in_parts_with_the_real_read_ahead() {
        let body = page_of_40(1_000);
        assert!(body.len() > 2 * READ_AHEAD);
        let whole = parse_page(body.as_bytes(), &post(serde_json::json!({})), Some("c"))
            .expect("whole page");
        for size in [1_000, 16_384] {
            let parts = read_ahead_in_chunks(body.as_bytes(), size, 1, READ_AHEAD).expect("page");
            assert_eq!(ids(&parts), ids(std::slice::from_ref(&whole)));
            assert!(parts.len() > 2, "{} parts", parts.len());
        }
    }

    #[test]
    fn a_number_cut_by_a_chunk_is_read_whole() {
        let body = br#"{"features":[12345, {"id":"a"}]}"#;
        let parts = read_in_chunks(body, 16, usize::MAX).expect("page");
        let page = parts.last().expect("page");
        assert_eq!(&page.rejected[0].content[..], b"12345");
        assert_eq!(page.items[0].id, "a");
    }

    #[test]
    fn a_feature_with_bytes_that_are_not_utf8_is_rejected_and_its_page_kept() {
        let mut body = br#"{"features":[{"id":"a","assets":{"x":"#.to_vec();
        body.extend_from_slice(b"\"\xff\xfe\"}},");
        body.extend_from_slice(br#"{"id":"b"}],"links":[]}"#);
        let page = parse_page(&body, &post(serde_json::json!({})), Some("c")).expect("page");
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].id, "b");
        assert_eq!(page.rejected.len(), 1);
        assert!(
            page.rejected[0].reason.contains("not UTF-8"),
            "{}",
            page.rejected[0].reason
        );
    }

    #[test]
    fn a_number_inside_a_feature_cut_by_a_chunk_is_read_whole() {
        let body = b"{\"features\":[{\"id\":\"a\",\n\"bbox\":[1.25e1,2,3,4]}]}";
        for size in 1..body.len() {
            let parts = read_in_chunks(body, size, usize::MAX)
                .unwrap_or_else(|e| panic!("chunks of {size}: {e}"));
            let item = &parts.last().expect("page").items[0];
            assert_eq!(item.bbox, Some([12.5, 2.0, 3.0, 4.0]), "chunks of {size}");
        }
    }

    #[test]
    fn a_duplicate_in_a_later_part_still_wins() {
        let body = br#"{"features":[{"id":"a","v":1},{"id":"b"},{"id":"a","v":2}]}"#;
        let parts = read_in_chunks(body, 1, 1).expect("page");
        let a: Vec<&[u8]> = parts
            .iter()
            .flat_map(|p| p.items.iter())
            .filter(|i| i.id == "a")
            .map(|i| &i.content[..])
            .collect();
        assert_eq!(a, [&br#"{"id":"a","v":1}"#[..], br#"{"id":"a","v":2}"#]);
        assert_eq!(parts.iter().map(|p| p.duplicates).sum::<u64>(), 1);
    }

    #[test]
    fn a_broken_page_is_an_error_whichever_the_chunks() {
        let broken: [&[u8]; 9] = [
            br#"{"features":[{"id":"a"}"#,
            br#"{"features":[{"id":"a"} {"id":"b"}]}"#,
            br#"{"features":[{"id":"a"},]}"#,
            br#"{"features":{"id":"a"}}"#,
            br#"{"features":[{"id":"a"]}"#,
            br#"{"features":[]} x"#,
            br#"{"type":"FeatureCollection"}"#,
            br#"{"features":[],"features":[]}"#,
            br#"[{"id":"a"}]"#,
        ];
        // Where, in the page's bytes (1-based), whatever the chunks.
        let body = b"{\"features\":[\n{\"id\":\"a\",}]}";
        for size in [1, 5, body.len()] {
            let error = read_in_chunks(body, size, usize::MAX).expect_err("broken");
            assert!(
                matches!(&error, PageError::Malformed { what, at: 25 } if what.starts_with("invalid JSON")),
                "{error}"
            );
        }
        for body in broken {
            for size in [1, 5, body.len()] {
                assert!(
                    read_in_chunks(body, size, usize::MAX).is_err(),
                    "{} in chunks of {size}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn a_feature_over_the_cap_is_quarantined_with_its_size_and_its_page_goes_on() {
        let big = format!(
            r#"{{"id":"big","collection":"c","properties":{{"note":"{}"}}}}"#,
            "a\\\"]}".repeat(5_000)
        );
        let body = format!(
            r#"{{"features":[{{"id":"a","collection":"c"}},{big},{{"id":"b","collection":"c"}}],"links":[]}}"#
        );
        let request = post(serde_json::json!({}));
        for size in [7, 1_000, body.len()] {
            let mut reader = PageReader::new(Some("c")).with_max_item_bytes(4_096);
            reader.read_ahead = 64;
            for chunk in body.as_bytes().chunks(size) {
                reader.push(chunk).expect("page");
                assert!(
                    reader.buf.len() <= 4_096 + size,
                    "held {} bytes",
                    reader.buf.len()
                );
            }
            let page = reader.finish(&request).expect("page");

            let ids: Vec<&str> = page.items.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids, ["a", "b"], "chunks of {size}");
            assert_eq!(page.rejected.len(), 1);
            let reason = &page.rejected[0].reason;
            assert!(
                reason.contains(&format!("is {} bytes", big.len())),
                "{reason}"
            );
            assert!(reason.contains("max_item_bytes (4096)"), "{reason}");
            assert_eq!(page.rejected[0].id.as_deref(), Some("big"));
            assert_eq!(page.rejected[0].collection.as_deref(), Some("c"));
        }
    }
}
