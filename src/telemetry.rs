//! Logging setup for the binary (the library never installs a subscriber).
//!
//! Readable text on a terminal, JSON lines otherwise (for Kubernetes and journald); `RUST_LOG`
//! is respected, `info` by default. Logs go to stderr.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}
