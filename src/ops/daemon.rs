//! `stac-sync daemon`: each job on its own cron `schedule`, until SIGTERM.
//!
//! Each job has one loop: wait for the next fire time, run the job, repeat. A run that outlasts
//! its interval makes the loop skip the fire times it missed, so a job is never started while
//! its previous run is going in this process; the job's lock keeps other processes out too.
//! Times come from a [`WallClock`], which tests replace with a virtual one.

use crate::clock::WallClock;
use crate::config::{Config, Job};
use crate::error::Error;
use crate::run::{self, Context, JobReport, RunOptions};
use chrono::{DateTime, Utc};
use cron::Schedule;
use std::sync::Arc;
use tokio::sync::Mutex;

/// The first fire time strictly after `after`.
pub fn next_fire(schedule: &Schedule, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule.after(&after).next()
}

/// One run the daemon started: the job, the fire time it was for, and its report.
#[derive(Debug)]
pub struct Fired {
    /// The job.
    pub job: String,
    /// The fire time.
    pub at: DateTime<Utc>,
    /// What the run did.
    pub report: JobReport,
}

/// Runs every job on its schedule until `options.stop` is cancelled, publishing each run's
/// metrics as configured. Returns the runs it started, in order.
pub async fn daemon(
    config: &Config,
    options: RunOptions,
    wall: Arc<dyn WallClock>,
) -> Result<Vec<Fired>, Error> {
    let mut schedules = Vec::new();
    for job in &config.jobs {
        let Some(schedule) = &job.schedule else {
            return Err(Error::Config(format!(
                "job {}: no schedule; the daemon runs each job on its own schedule \
                 (schedule = \"0 */30 * * * *\"), or use `stac-sync run` for one pass",
                job.name
            )));
        };
        schedules.push((job, schedule.clone()));
    }
    if schedules.is_empty() {
        return Err(Error::Config(
            "no jobs: add [[jobs]] with a schedule to the config file".into(),
        ));
    }
    let context = Context::open(config, &options).await?;
    let fired = Mutex::new(Vec::new());
    let loops = schedules.iter().map(|(job, schedule)| {
        job_loop(
            config,
            &context,
            job,
            schedule,
            wall.as_ref(),
            &options,
            &fired,
        )
    });
    futures_util::future::join_all(loops).await;
    Ok(fired.into_inner())
}

async fn job_loop(
    config: &Config,
    context: &Context,
    job: &Job,
    schedule: &Schedule,
    wall: &dyn WallClock,
    options: &RunOptions,
    fired: &Mutex<Vec<Fired>>,
) {
    loop {
        let now = wall.now();
        let Some(at) = next_fire(schedule, now) else {
            tracing::warn!(job = %job.name, "the schedule has no future fire time; the job stops");
            return;
        };
        tracing::info!(job = %job.name, next = %at.to_rfc3339(), "waiting for the next run");
        tokio::select! {
            biased;
            () = options.stop.cancelled() => return,
            () = wall.sleep_until(at) => {}
        }
        if options.stop.is_cancelled() {
            return;
        }
        match run::run_job(context, job).await {
            Ok(report) => {
                let stopped = matches!(report.error, Some(Error::Stopped));
                crate::ops::metrics::push_configured(config, &[&report]).await;
                let mut fired = fired.lock().await;
                fired.push(Fired {
                    job: job.name.clone(),
                    at,
                    report,
                });
                // The textfile holds the latest run of every job.
                let mut latest: Vec<&JobReport> = Vec::new();
                for run in fired.iter().rev() {
                    if !latest.iter().any(|r| r.job == run.job) {
                        latest.push(&run.report);
                    }
                }
                crate::ops::metrics::write_configured(config, &latest);
                drop(fired);
                if stopped {
                    return;
                }
            }
            // The run could not even be recorded (the database is down): try again at the
            // next fire time rather than end the daemon.
            Err(error) => tracing::error!(job = %job.name, error = %error, "run failed to start"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_schedule;

    #[test]
    fn crontab_five_fields_are_read_at_second_zero_with_its_weekday_numbers() {
        let weekdays = parse_schedule("30 6 * * 1-5").expect("valid");
        // 2026-11-28 is a Saturday: the next weekday 06:30 is Monday the 30th.
        assert_eq!(
            next_fire(&weekdays, at("2026-11-28T09:00:00Z")),
            Some(at("2026-11-30T06:30:00Z"))
        );
        let sundays = parse_schedule("0 0 * * 0").expect("valid");
        assert_eq!(
            next_fire(&sundays, at("2026-11-28T09:00:00Z")),
            Some(at("2026-11-29T00:00:00Z"))
        );
        let every = parse_schedule("*/30 * * * *").expect("valid");
        assert_eq!(
            next_fire(&every, at("2026-11-28T09:00:00Z")),
            Some(at("2026-11-28T09:30:00Z"))
        );
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("instant")
            .to_utc()
    }

    #[test]
    fn six_fields_are_the_cron_crates_and_bad_ones_say_what_to_write() {
        let six = parse_schedule("15 */30 * * * *").expect("valid");
        assert_eq!(
            next_fire(&six, at("2026-11-28T09:00:00Z")),
            Some(at("2026-11-28T09:00:15Z"))
        );
        let error = parse_schedule("*/30 * * *").expect_err("4 fields");
        assert!(error.contains("0 */30 * * * *"), "{error}");
        assert!(parse_schedule("0 0 * * 8").is_err());
    }
}
