//! Values of a STAC search read in one place and used everywhere: a bbox's 2D extent, a
//! datetime's ends, and instants in RFC 3339.

use std::time::SystemTime;

/// The 2D extent `[xmin, ymin, xmax, ymax]` of a bbox of 4 numbers, or of 6 with heights
/// (RFC 7946 §5); `None` for any other length.
pub fn bbox_2d(bbox: &[f64]) -> Option<[f64; 4]> {
    match bbox {
        [x0, y0, x1, y1] | [x0, y0, _, x1, y1, _] => Some([*x0, *y0, *x1, *y1]),
        _ => None,
    }
}

/// A job's bbox: 4 numbers, or 6 with heights, as configured (and sent in its searches), with
/// its 2D extent. Serialized as given.
#[derive(Debug, Clone, PartialEq)]
pub struct Bbox {
    given: Vec<f64>,
    extent: [f64; 4],
}

impl Bbox {
    /// A bbox of 4 or 6 numbers; `None` for any other length.
    pub fn new(given: Vec<f64>) -> Option<Bbox> {
        let extent = bbox_2d(&given)?;
        Some(Bbox { given, extent })
    }

    /// The numbers as given.
    pub fn as_given(&self) -> &[f64] {
        &self.given
    }

    /// `[xmin, ymin, xmax, ymax]`.
    pub fn extent(&self) -> [f64; 4] {
        self.extent
    }
}

impl serde::Serialize for Bbox {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.given.serialize(serializer)
    }
}

/// A job's datetime as configured (and sent in its searches): an instant or an interval, with
/// its ends read once. Serialized as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    given: String,
    start: Option<String>,
    end: Option<String>,
}

impl Interval {
    /// Reads `given` (validated where the config is read): its ends, an instant being both.
    pub fn new(given: String) -> Interval {
        let (start, end) = Datetime::parse(&given).bounds();
        let (start, end) = (start.map(str::to_string), end.map(str::to_string));
        Interval { given, start, end }
    }

    /// As given.
    pub fn as_str(&self) -> &str {
        &self.given
    }

    /// Its start and end, if bounded.
    pub fn bounds(&self) -> (Option<&str>, Option<&str>) {
        (self.start.as_deref(), self.end.as_deref())
    }
}

impl serde::Serialize for Interval {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.given.serialize(serializer)
    }
}

/// A STAC datetime as given: an instant, or an interval whose ends may be open (`..` or empty)
/// (STAC API item-search `datetime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datetime<'a> {
    /// One instant.
    Instant(&'a str),
    /// `start/end`, either open.
    Interval {
        /// The start, if bounded.
        start: Option<&'a str>,
        /// The end, if bounded.
        end: Option<&'a str>,
    },
}

impl<'a> Datetime<'a> {
    /// Splits `value` at its `/` (it is validated where the config is read).
    pub fn parse(value: &'a str) -> Datetime<'a> {
        let open = |end: &'a str| (!matches!(end, "" | "..")).then_some(end);
        match value.split_once('/') {
            Some((start, end)) => Datetime::Interval {
                start: open(start),
                end: open(end),
            },
            None => Datetime::Instant(value),
        }
    }

    /// Its start and end; an instant is both.
    pub fn bounds(self) -> (Option<&'a str>, Option<&'a str>) {
        match self {
            Datetime::Instant(at) => (Some(at), Some(at)),
            Datetime::Interval { start, end } => (start, end),
        }
    }
}

/// Reads an RFC 3339 instant in UTC (or a plain date, as midnight UTC).
pub fn parse_instant(text: &str) -> Option<SystemTime> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    // An offset other than Z: left to the server.
    if full.get(10..).is_some_and(|t| t.contains(['+', '-'])) {
        return None;
    }
    humantime::parse_rfc3339_weak(&full).ok()
}

/// Formats an instant as RFC 3339 UTC to the second.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bbox_and_an_interval_serialize_as_given_so_a_jobs_search_hash_stays() {
        let bbox = Bbox::new(vec![-5.2, 41.3, 0.0, 9.6, 51.1, 100.0]).expect("6 numbers");
        assert_eq!(bbox.extent(), [-5.2, 41.3, 9.6, 51.1]);
        assert_eq!(
            serde_json::to_string(&bbox).expect("JSON"),
            "[-5.2,41.3,0.0,9.6,51.1,100.0]"
        );
        assert!(Bbox::new(vec![1.0, 2.0, 3.0]).is_none());
        let interval = Interval::new("2024-01-01T00:00:00Z/..".into());
        assert_eq!(interval.bounds(), (Some("2024-01-01T00:00:00Z"), None));
        assert_eq!(
            serde_json::to_string(&interval).expect("JSON"),
            "\"2024-01-01T00:00:00Z/..\""
        );
    }

    #[test]
    fn open_ends_are_none_and_an_instant_bounds_itself() {
        assert_eq!(
            Datetime::parse("2024-01-01T00:00:00Z/..").bounds(),
            (Some("2024-01-01T00:00:00Z"), None)
        );
        assert_eq!(
            Datetime::parse("/2024-02-01").bounds(),
            (None, Some("2024-02-01"))
        );
        assert_eq!(
            Datetime::parse("2024-01-01").bounds(),
            (Some("2024-01-01"), Some("2024-01-01"))
        );
        assert_eq!(
            bbox_2d(&[1.0, 2.0, 0.0, 3.0, 4.0, 9.0]),
            Some([1.0, 2.0, 3.0, 4.0])
        );
        assert_eq!(bbox_2d(&[1.0, 2.0, 3.0]), None);
    }
}
