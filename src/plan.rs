//! Planning a pass: which partitions (collection × datetime window) it pages, and how a pass
//! after the backfill finds only what may have changed. Pure functions of the job, the stored
//! watermark, what the server offers and the time; the run stores the plan before paging it, so
//! a killed run resumes the partitions it planned even after the calendar or watermark moved.

use crate::config::{Incremental, Job, Window};
pub use crate::domain::{parse_instant, rfc3339};

use crate::domain::Datetime;
use crate::stac::client::Capabilities;
use crate::stac::search::{self, Request, Shape};
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

/// The partitions of a sync pass with `strategy`, for a watermark (RFC 3339) and `now`.
pub fn sync_parts(
    root: &Url,
    job: &Job,
    strategy: Strategy,
    watermark: Option<&str>,
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
            windowed(root, job, Some(lower), now, "", &Shape::of(job))
        }
        _ => windowed(root, job, None, now, "", &Shape::of(job)),
    }
}

/// The partitions of a reconcile pass: the job's whole range, ids only where the server offers
/// the Fields extension.
pub fn reconcile_parts(root: &Url, job: &Job, ids_only: bool, now: SystemTime) -> Vec<Part> {
    let shape = Shape {
        ids_only,
        ..Shape::of(job)
    };
    windowed(root, job, None, now, "reconcile ", &shape)
}

fn part(root: &Url, job: &Job, collection: &str, shape: &Shape, name: String) -> Part {
    Part {
        name,
        collection: collection.to_string(),
        first: search::first_request(root, job, &[collection.to_string()], shape),
    }
}

/// One part per collection and window of the job's range (from `lower` on), each shaped like
/// `base` with its window as the datetime.
fn windowed(
    root: &Url,
    job: &Job,
    lower: Option<SystemTime>,
    now: SystemTime,
    prefix: &str,
    base: &Shape,
) -> Vec<Part> {
    let windows = windows(job.datetime.as_deref(), lower, job.window, now);
    let single = windows.len() == 1 && lower.is_none();
    let mut parts = Vec::new();
    for collection in &job.collections {
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
