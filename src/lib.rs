//! stac-sync: keeps a faithful, current mirror of a STAC API's items in a SQL database and in
//! object storage.
//!
//! The modules are layers; each uses only the ones before it in this list:
//!
//! 1. [`error`], [`clock`], [`domain`]: the run's error and exit codes, time sources, and the
//!    values parsed once and used everywhere (bbox, datetime interval).
//! 2. [`config`]: the file, the environment and the flags, resolved into a [`config::Config`].
//! 3. [`stac`]: HTTP with retries, tokens, the API client, search requests and the page reader.
//! 4. [`plan`]: a job's partitions, incremental strategy and watermark.
//! 5. [`mirror`]: the write protocol and what it writes (the SQL database, the object
//!    store); the job lock and worker leases.
//! 6. [`run`]: a run of the jobs: passes, and the pipeline (pager → stager → committer).
//! 7. [`ops`]: what operates a mirror: `check`, `status`, metrics, the daemon, logging.
//!
//! `main.rs` parses the command line and calls [`run`] or [`ops`].

pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod mirror;
pub mod ops;
pub mod plan;
pub mod run;
pub mod stac;
