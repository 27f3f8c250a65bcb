//! stac-sync: keeps a faithful, current mirror of a STAC API's items in a SQL database and in
//! object storage. The pipeline is config → auth → STAC paging → sinks → checkpoint; `sync` is
//! the one module that knows all of them.

pub mod api;
pub mod auth;
pub mod check;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod db;
pub mod error;
pub mod http;
pub mod metrics;
pub mod objects;
pub mod page;
pub mod plan;
pub mod status;
pub mod sync;
pub mod telemetry;
