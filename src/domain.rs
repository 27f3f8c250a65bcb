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
