//! Planning a pass: which partitions (collection × datetime window) it pages, and how a pass
//! after the backfill finds only what may have changed. Pure functions of the job, the stored
//! watermark, what the server offers and the time; the run stores the plan before paging it, so
//! a killed run resumes the partitions it planned even after the calendar or watermark moved.

use crate::config::{Incremental, Job, Window};
pub use crate::domain::{parse_instant, rfc3339};

use crate::domain::{Datetime, Interval};
use crate::stac::client::Capabilities;
use crate::stac::search::{self, Request, Shape};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use url::Url;

/// How a pass selects items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Everything the job's search matches: the first pass, or every pass with `incremental = "off"`.
    Full,
    /// `updated >= watermark - overlap`, sorted by `updated` (Filter and Sort extensions).
    Updated,
    /// `updated >= watermark - overlap` through the Query extension, where the API offers it
    /// but not Filter (EDS): unsorted, but old items that changed are still found.
    #[serde(rename = "updated-query")]
    UpdatedQuery,
    /// Acquisition datetimes from `watermark - lookback` on, in windows.
    Datetime,
}

/// The strategy a job's pass uses, given its watermark and what the server offers.
pub fn strategy(job: &Job, watermark: Option<&str>, caps: &Capabilities) -> Strategy {
    if watermark.is_none() {
        return Strategy::Full;
    }
    let updated = caps.sort && caps.filter && caps.updated_queryable;
    match job.incremental {
        Incremental::Off => Strategy::Full,
        Incremental::Updated => Strategy::Updated,
        Incremental::Datetime => Strategy::Datetime,
        Incremental::Auto if updated => Strategy::Updated,
        Incremental::Auto if caps.query && !caps.filter => Strategy::UpdatedQuery,
        Incremental::Auto => Strategy::Datetime,
    }
}

/// One partition of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Unique within the job and pass kind.
    pub name: String,
    /// The collection it pages.
    pub collection: String,
    /// Its first request.
    pub first: Request,
}

/// What a plan cuts windows from besides the job itself.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    /// Each collection's temporal extent (a datetime interval), for a job without a datetime:
    /// its calendar windows are cut from it, the first and last left open-ended so that an
    /// item outside a stale extent is still found.
    pub extents: HashMap<String, String>,
    /// Partitions the cap on requests in flight pages at once: a range of fewer calendar
    /// windows is cut finer (see [`finer`]).
    pub at_least: usize,
}

/// The partitions of a sync pass with `strategy`, for a watermark (RFC 3339) and `now`.
pub fn sync_parts(
    root: &Url,
    job: &Job,
    strategy: Strategy,
    watermark: Option<&str>,
    cut: &Cut,
    now: SystemTime,
) -> Vec<Part> {
    let watermark = watermark.and_then(parse_instant);
    match (strategy, watermark) {
        (Strategy::Updated | Strategy::UpdatedQuery, Some(mark)) => {
            let since = rfc3339(mark.checked_sub(job.overlap).unwrap_or(mark));
            let shape = Shape {
                updated_since: Some(since),
                updated_by_query: strategy == Strategy::UpdatedQuery,
                ..Shape::of(job)
            };
            job.collections
                .iter()
                .map(|c| part(root, job, c, &shape, c.clone()))
                .collect()
        }
        (Strategy::Datetime, Some(mark)) => {
            let lower = mark.checked_sub(job.lookback).unwrap_or(mark);
            windowed(root, job, Some(lower), cut, now, "", &Shape::of(job))
        }
        _ => windowed(root, job, None, cut, now, "", &Shape::of(job)),
    }
}

/// The partitions of a reconcile pass: the job's whole range, ids only where the server offers
/// the Fields extension.
pub fn reconcile_parts(
    root: &Url,
    job: &Job,
    ids_only: bool,
    cut: &Cut,
    now: SystemTime,
) -> Vec<Part> {
    let shape = Shape {
        ids_only,
        ..Shape::of(job)
    };
    windowed(root, job, None, cut, now, "reconcile ", &shape)
}

/// Partitions of a reconcile pass that fetch whole again the items its sweep found changed
/// (item-search `ids`, a page's worth at a time); `stale` is `(collection, id)`, sorted.
pub fn refresh_parts(root: &Url, job: &Job, stale: &[(String, String)]) -> Vec<Part> {
    let mut parts = Vec::new();
    for same in stale.chunk_by(|a, b| a.0 == b.0) {
        for batch in same.chunks(usize::try_from(job.limit).unwrap_or(1).max(1)) {
            let collection = &batch[0].0;
            let shape = Shape {
                ids: batch.iter().map(|(_, id)| id.clone()).collect(),
                ..Shape::default()
            };
            let name = format!("refresh {collection} {}", batch[0].1);
            parts.push(part(root, job, collection, &shape, name));
        }
    }
    parts
}

fn part(root: &Url, job: &Job, collection: &str, shape: &Shape, name: String) -> Part {
    Part {
        name,
        collection: collection.to_string(),
        first: search::first_request(root, job, &[collection.to_string()], shape),
    }
}

/// One part per collection and window of the job's range (from `lower` on), or of the
/// collection's extent when the job has no range, each shaped like `base` with its window as
/// the datetime.
fn windowed(
    root: &Url,
    job: &Job,
    lower: Option<SystemTime>,
    cut: &Cut,
    now: SystemTime,
    prefix: &str,
    base: &Shape,
) -> Vec<Part> {
    let at_least = cut.at_least.div_ceil(job.collections.len().max(1));
    let mut parts = Vec::new();
    for collection in &job.collections {
        let extent = cut
            .extents
            .get(collection)
            .filter(|_| job.datetime.is_none());
        let range = job
            .datetime
            .as_ref()
            .map(Interval::as_str)
            .or(extent.map(String::as_str));
        let mut windows = finer(windows(range, lower, job.window, now), at_least, now);
        if extent.is_some() {
            open_ends(&mut windows, lower.is_none());
        }
        let single = windows.len() == 1 && lower.is_none();
        for window in &windows {
            let name = match (single, window) {
                (false, Some(window)) => format!("{prefix}{collection} {window}"),
                _ => format!("{prefix}{collection}"),
            };
            let shape = Shape {
                datetime: window.clone(),
                ..base.clone()
            };
            parts.push(part(root, job, collection, &shape, name));
        }
    }
    parts
}

/// Opens the last window's end, and adds a window before the first if `before`: windows cut
/// from an extent, which may be stale, still cover every datetime (the one before is normally
/// empty, and the others can still be halved).
fn open_ends(windows: &mut Vec<Option<String>>, before: bool) {
    if let Some(last) = windows.last_mut()
        && let Some((from, _)) = last.as_deref().and_then(|w| w.split_once('/'))
    {
        *last = Some(format!("{from}/.."));
    }
    let start = windows
        .first()
        .and_then(|w| Some(w.as_deref()?.split_once('/')?.0.to_string()));
    if before && let Some(start) = start {
        windows.insert(0, Some(format!("../{start}")));
    }
}

/// Splits the job's datetime range, from `lower` on if later, at calendar boundaries (UTC)
/// up to `now`; the last window keeps the range's end (`..` when open). Windows share their
/// boundary instants (STAC intervals are closed), so an item on a boundary is fetched twice
/// and stored once, never missed. A range without a start, or one that cannot be read, is one
/// window: the job's own datetime. Empty when the range ends before `lower`.
pub fn windows(
    datetime: Option<&str>,
    lower: Option<SystemTime>,
    unit: Window,
    now: SystemTime,
) -> Vec<Option<String>> {
    let (start, end) = match datetime.map(Datetime::parse) {
        None => (None, None),
        Some(Datetime::Interval { start, end }) => (start, end),
        // An instant: nothing to split.
        Some(Datetime::Instant(at)) => return vec![Some(at.to_string())],
    };
    let end_at = match end {
        Some(e) => match parse_instant(e) {
            Some(at) => Some(at),
            None => return vec![datetime.map(str::to_string)],
        },
        None => None,
    };
    let start_at = match start {
        Some(s) => match parse_instant(s) {
            Some(at) => Some(at),
            None => return vec![datetime.map(str::to_string)],
        },
        None => None,
    };
    // The effective start, as a string the server receives.
    let (from, from_text) = match (start_at, lower) {
        (Some(s), Some(l)) if l > s => (l, rfc3339(l)),
        (Some(s), _) => (s, start.unwrap_or_default().to_string()),
        (None, Some(l)) => (l, rfc3339(l)),
        (None, None) => return vec![datetime.map(str::to_string)],
    };
    if end_at.is_some_and(|e| e < from) {
        return Vec::new();
    }
    let end_text = end.unwrap_or("..").to_string();
    let stop = end_at.map_or(now, |e| e.min(now));
    let mut bounds = vec![from_text];
    let mut at = from;
    if unit != Window::None {
        while let Some((next, text)) = next_boundary(at, unit) {
            if next >= stop {
                break;
            }
            bounds.push(text);
            at = next;
        }
    }
    let mut windows: Vec<Option<String>> = bounds
        .windows(2)
        .map(|pair| Some(format!("{}/{}", pair[0], pair[1])))
        .collect();
    let last = bounds.last().cloned().unwrap_or_default();
    windows.push(Some(format!("{last}/{end_text}")));
    windows
}

/// The first calendar boundary after `at`.
fn next_boundary(at: SystemTime, unit: Window) -> Option<(SystemTime, String)> {
    let text = rfc3339(at);
    let year: i32 = text.get(..4)?.parse().ok()?;
    let month: u32 = text.get(5..7)?.parse().ok()?;
    let next = match unit {
        Window::Year => format!("{:04}-01-01T00:00:00Z", year + 1),
        Window::Month if month == 12 => format!("{:04}-01-01T00:00:00Z", year + 1),
        Window::Month => format!("{year:04}-{:02}-01T00:00:00Z", month + 1),
        Window::None => return None,
    };
    Some((humantime::parse_rfc3339(&next).ok()?, next))
}

/// The two halves of a datetime window, meeting at its middle (to the second); `None` when it
/// cannot be halved: an instant, an open or unreadable start, or two seconds or less. An open
/// end is halved at the middle up to `now` and stays open.
pub fn halves(datetime: &str, now: SystemTime) -> Option<[String; 2]> {
    let Datetime::Interval {
        start: Some(start),
        end,
    } = Datetime::parse(datetime)
    else {
        return None;
    };
    let from = parse_instant(start)?;
    let to = match end {
        Some(end) => parse_instant(end)?,
        None => now,
    };
    let half = to.duration_since(from).ok()? / 2;
    if half < Duration::from_secs(1) {
        return None;
    }
    let middle = rfc3339(from + half);
    let at = parse_instant(&middle)?;
    if at <= from || at >= to {
        return None;
    }
    let end = end.unwrap_or("..");
    Some([format!("{start}/{middle}"), format!("{middle}/{end}")])
}

/// The partitions that page `part`'s window in two halves instead (see [`halves`]).
pub fn split(part: &Part, now: SystemTime) -> Option<[Part; 2]> {
    let window = search::datetime_of(&part.first)?;
    let [early, late] = halves(&window, now)?;
    let prefix = part
        .name
        .strip_suffix(&window)
        .unwrap_or(&part.name)
        .trim_end();
    let half = |window: &str| Part {
        name: format!("{prefix} {window}"),
        collection: part.collection.clone(),
        first: search::with_datetime(&part.first, window),
    };
    Some([half(&early), half(&late)])
}

/// Halves the longest windows until there are `at_least` of them (or none can be halved), so
/// that a short range still gives the cap on requests in flight partitions to page at once.
fn finer(
    mut windows: Vec<Option<String>>,
    at_least: usize,
    now: SystemTime,
) -> Vec<Option<String>> {
    let length = |window: &Option<String>| {
        let (start, end) = Datetime::parse(window.as_deref()?).bounds();
        let end = end.map_or(Some(now), parse_instant)?;
        end.duration_since(parse_instant(start?)?).ok()
    };
    while windows.len() < at_least {
        let Some((at, _)) = windows
            .iter()
            .enumerate()
            .filter_map(|(at, w)| Some((at, length(w)?)))
            .max_by_key(|(_, length)| *length)
        else {
            break;
        };
        let Some([early, late]) = windows[at].as_deref().and_then(|w| halves(w, now)) else {
            break;
        };
        windows.splice(at..=at, [Some(early), Some(late)]);
    }
    windows
}

/// The watermark a finished sync pass leaves: its start minus the safety lag.
pub fn next_watermark(pass_started_at: SystemTime, lag: Duration) -> String {
    rfc3339(pass_started_at.checked_sub(lag).unwrap_or(pass_started_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        parse_instant(text).expect("an instant")
    }

    #[test]
    fn an_open_range_is_split_into_years_up_to_now_and_stays_open() {
        let now = at("2026-11-28T09:00:00Z");
        assert_eq!(
            windows(Some("2024-05-01T00:00:00Z/.."), None, Window::Year, now),
            vec![
                Some("2024-05-01T00:00:00Z/2025-01-01T00:00:00Z".into()),
                Some("2025-01-01T00:00:00Z/2026-01-01T00:00:00Z".into()),
                Some("2026-01-01T00:00:00Z/..".into()),
            ]
        );
    }

    #[test]
    fn a_bounded_range_keeps_its_end_and_months_roll_over_the_year() {
        let now = at("2026-11-28T09:00:00Z");
        assert_eq!(
            windows(Some("2023-11-15/2024-02-10"), None, Window::Month, now),
            vec![
                Some("2023-11-15/2023-12-01T00:00:00Z".into()),
                Some("2023-12-01T00:00:00Z/2024-01-01T00:00:00Z".into()),
                Some("2024-01-01T00:00:00Z/2024-02-01T00:00:00Z".into()),
                Some("2024-02-01T00:00:00Z/2024-02-10".into()),
            ]
        );
    }

    #[test]
    fn the_lookback_bound_narrows_the_range_and_a_past_range_is_empty() {
        let now = at("2026-11-28T09:00:00Z");
        let lower = Some(at("2026-11-21T09:00:00Z"));
        assert_eq!(
            windows(Some("2020-01-01T00:00:00Z/.."), lower, Window::Year, now),
            vec![Some("2026-11-21T09:00:00Z/..".into())]
        );
        assert_eq!(
            windows(None, lower, Window::Year, now),
            vec![Some("2026-11-21T09:00:00Z/..".into())]
        );
        assert!(windows(Some("2020-01-01/2021-01-01"), lower, Window::Year, now).is_empty());
    }

    #[test]
    fn what_cannot_be_split_is_one_window_as_configured() {
        let now = at("2026-11-28T09:00:00Z");
        assert_eq!(windows(None, None, Window::Year, now), vec![None]);
        assert_eq!(
            windows(Some("../2020-01-01T00:00:00Z"), None, Window::Year, now),
            vec![Some("../2020-01-01T00:00:00Z".into())]
        );
        assert_eq!(
            windows(
                Some("2024-01-01T00:00:00+02:00/.."),
                None,
                Window::Year,
                now
            ),
            vec![Some("2024-01-01T00:00:00+02:00/..".into())]
        );
        assert_eq!(
            windows(Some("2024-03-01T00:00:00Z"), None, Window::Year, now),
            vec![Some("2024-03-01T00:00:00Z".into())]
        );
    }

    #[test]
    fn a_window_is_halved_to_the_second_and_an_open_end_stays_open() {
        let now = at("2026-01-01T00:00:00Z");
        assert_eq!(
            halves("2024-01-01T00:00:00Z/2024-01-03T00:00:00Z", now),
            Some([
                "2024-01-01T00:00:00Z/2024-01-02T00:00:00Z".into(),
                "2024-01-02T00:00:00Z/2024-01-03T00:00:00Z".into()
            ])
        );
        assert_eq!(
            halves("2025-12-31T00:00:00Z/..", now),
            Some([
                "2025-12-31T00:00:00Z/2025-12-31T12:00:00Z".into(),
                "2025-12-31T12:00:00Z/..".into()
            ])
        );
        // Two seconds halve into two windows of one; one second does not.
        assert!(halves("2024-01-01T00:00:00Z/2024-01-01T00:00:02Z", now).is_some());
        assert_eq!(
            halves("2024-01-01T00:00:00Z/2024-01-01T00:00:01Z", now),
            None
        );
        assert_eq!(halves("../2024-01-01T00:00:00Z", now), None);
        assert_eq!(halves("2024-01-01T00:00:00Z", now), None);
    }

    #[test]
    fn a_split_partition_keeps_its_name_and_search_with_each_half_as_its_datetime() {
        let now = at("2026-01-01T00:00:00Z");
        let job = crate::config::tests::one_job();
        let root = Url::parse("https://api.test/stac/").expect("url");
        for method in [
            crate::config::SearchMethod::Get,
            crate::config::SearchMethod::Post,
        ] {
            let job = Job {
                method,
                datetime: Some(Interval::new(
                    "2024-01-01T00:00:00Z/2024-01-03T00:00:00Z".into(),
                )),
                window: Window::None,
                ..job.clone()
            };
            let parts = sync_parts(&root, &job, Strategy::Full, None, &Cut::default(), now);
            assert_eq!(parts.len(), 1);
            let [early, late] = split(&parts[0], now).expect("halves");
            let c = &job.collections[0];
            assert_eq!(
                early.name,
                format!("{c} 2024-01-01T00:00:00Z/2024-01-02T00:00:00Z")
            );
            assert_eq!(
                search::datetime_of(&late.first).as_deref(),
                Some("2024-01-02T00:00:00Z/2024-01-03T00:00:00Z")
            );
            let [again, _] = split(&early, now).expect("quarters");
            assert_eq!(
                again.name,
                format!("{c} 2024-01-01T00:00:00Z/2024-01-01T12:00:00Z")
            );
            assert_eq!(
                search::with_datetime(&late.first, "2024-01-01T00:00:00Z/2024-01-03T00:00:00Z"),
                parts[0].first,
                "{method:?}: only the datetime differs"
            );
        }
    }

    #[test]
    fn a_job_without_a_datetime_is_cut_from_the_extent_with_nothing_left_outside() {
        let now = at("2026-06-01T00:00:00Z");
        let job = crate::config::tests::one_job();
        let root = Url::parse("https://api.test/stac/").expect("url");
        let c = job.collections[0].clone();
        let cut = Cut {
            extents: HashMap::from([(
                c.clone(),
                "2024-03-01T00:00:00Z/2025-02-01T00:00:00Z".into(),
            )]),
            at_least: 1,
        };
        let windows: Vec<Option<String>> = sync_parts(&root, &job, Strategy::Full, None, &cut, now)
            .iter()
            .map(|p| search::datetime_of(&p.first))
            .collect();
        assert_eq!(
            windows,
            vec![
                Some("../2024-03-01T00:00:00Z".into()),
                Some("2024-03-01T00:00:00Z/2025-01-01T00:00:00Z".into()),
                Some("2025-01-01T00:00:00Z/..".into()),
            ]
        );
        // Fewer windows than requests in flight: the longest are halved.
        let cut = Cut { at_least: 4, ..cut };
        let windows: Vec<Option<String>> = sync_parts(&root, &job, Strategy::Full, None, &cut, now)
            .iter()
            .map(|p| search::datetime_of(&p.first))
            .collect();
        assert_eq!(windows.len(), 5, "{windows:?}");
        assert_eq!(windows[0].as_deref(), Some("../2024-03-01T00:00:00Z"));
        assert_eq!(windows[4].as_deref(), Some("2025-01-01T00:00:00Z/.."));
        // A job with its own datetime ignores the extent.
        let own = Job {
            datetime: Some(Interval::new(
                "2025-03-01T00:00:00Z/2025-04-01T00:00:00Z".into(),
            )),
            ..job.clone()
        };
        let parts = sync_parts(
            &root,
            &own,
            Strategy::Full,
            None,
            &Cut { at_least: 1, ..cut },
            now,
        );
        assert_eq!(parts.len(), 1);
        assert_eq!(
            search::datetime_of(&parts[0].first).as_deref(),
            own.datetime.as_ref().map(Interval::as_str)
        );
    }

    #[test]
    fn the_updated_strategy_needs_sort_filter_and_an_updated_queryable() {
        let conformance = serde_json::json!({"conformsTo": [
            "https://api.stacspec.org/v1.0.0/item-search",
            "https://api.stacspec.org/v1.0.0/item-search#sort",
            "https://api.stacspec.org/v1.0.0-rc.3/item-search#filter",
            "https://api.stacspec.org/v1.0.0/item-search#fields",
        ]});
        let mut caps = Capabilities::from_conformance(&conformance);
        assert_eq!(
            caps,
            Capabilities {
                sort: true,
                filter: true,
                fields: true,
                query: false,
                updated_queryable: false
            }
        );
        let queryables = serde_json::json!({"properties": {"updated": {"type": "string"}}});
        let job = crate::config::tests::one_job();
        assert_eq!(
            strategy(&job, Some("2026-01-01T00:00:00Z"), &caps),
            Strategy::Datetime
        );
        caps.updated_queryable = Capabilities::queryable_updated(&queryables);
        assert_eq!(
            strategy(&job, Some("2026-01-01T00:00:00Z"), &caps),
            Strategy::Updated
        );
        assert_eq!(strategy(&job, None, &caps), Strategy::Full);
    }

    #[test]
    fn without_filter_the_query_extension_finds_updates_and_without_either_datetime_does() {
        let job = crate::config::tests::one_job();
        let mark = Some("2026-01-01T00:00:00Z");
        let query = Capabilities {
            query: true,
            ..Capabilities::default()
        };
        let both = Capabilities {
            filter: true,
            ..query
        };
        assert_eq!(strategy(&job, mark, &query), Strategy::UpdatedQuery);
        assert_eq!(strategy(&job, mark, &both), Strategy::Datetime);
        assert_eq!(
            strategy(&job, mark, &Capabilities::default()),
            Strategy::Datetime
        );
    }
}
