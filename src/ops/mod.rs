//! Operating a mirror: `check` (probe everything a run needs), `status` (what the database
//! says), metrics after each run, the `daemon`'s schedules, and the binary's logging.

pub mod check;
pub mod daemon;
pub mod metrics;
pub mod status;
pub mod telemetry;
