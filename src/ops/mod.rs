//! Operating a mirror: `check` (probe everything a run needs), `status` (what the database
//! says), metrics after each run, the `daemon`'s schedules, the binary's logging, and the change
//! feed's webhook.

pub mod check;
pub mod daemon;
pub mod metrics;
pub mod status;
pub mod telemetry;
pub mod webhook;
