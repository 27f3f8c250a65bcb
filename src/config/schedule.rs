//! A job's cron `schedule`, parsed once, when the config is read.

use cron::Schedule;
use std::str::FromStr;

/// Parses a job's schedule: the `cron` crate's 6 fields (seconds first) or 7 (with years), or
/// crontab's 5 (minute first, weekdays 0-7 from Sunday), which is read as at second 0.
pub fn parse_schedule(expression: &str) -> Result<Schedule, String> {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    let expression = match fields.len() {
        5 => {
            let weekdays = crontab_weekdays(fields[4])?;
            format!(
                "0 {} {} {} {} {weekdays}",
                fields[0], fields[1], fields[2], fields[3]
            )
        }
        6 | 7 => fields.join(" "),
        n => {
            return Err(format!(
                "{expression:?} has {n} fields; write 6 (sec min hour day month weekday, \
                 e.g. \"0 */30 * * * *\") or crontab's 5 (\"*/30 * * * *\")"
            ));
        }
    };
    Schedule::from_str(&expression).map_err(|e| format!("{expression:?}: {e}"))
}

/// Crontab numbers weekdays 0-7 from Sunday (0 and 7 both Sunday); the `cron` crate numbers
/// them 1-7 from Sunday. Numbers become names, which both read the same way.
fn crontab_weekdays(field: &str) -> Result<String, String> {
    const NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];
    let mut out = String::new();
    let mut number = String::new();
    let mut after_slash = false;
    let flush = |number: &mut String, out: &mut String, step: bool| -> Result<(), String> {
        if number.is_empty() {
            return Ok(());
        }
        if step {
            out.push_str(number);
        } else {
            let day: usize = number.parse().map_err(|_| format!("weekday {number:?}"))?;
            let name = NAMES.get(day).ok_or_else(|| {
                format!("weekday {day} is not 0-7 (crontab numbers Sunday 0 or 7)")
            })?;
            out.push_str(name);
        }
        number.clear();
        Ok(())
    };
    for c in field.chars() {
        if c.is_ascii_digit() {
            number.push(c);
        } else {
            flush(&mut number, &mut out, after_slash)?;
            after_slash = c == '/';
            out.push(c);
        }
    }
    flush(&mut number, &mut out, after_slash)?;
    Ok(out)
}
