//! Logging setup for the binary (the library never installs a subscriber).
//!
//! Readable text on a terminal, JSON lines otherwise (for Kubernetes and journald), or as
//! `--log-format` says; `RUST_LOG` is respected, `info` by default (`warn` while a progress
//! display is shown, so log lines do not break it). Logs go to stderr.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON lines otherwise.
    Auto,
    /// Readable text.
    Text,
    /// JSON lines.
    Json,
}

impl LogFormat {
    fn json(self) -> bool {
        match self {
            LogFormat::Auto => !std::io::stderr().is_terminal(),
            LogFormat::Text => false,
            LogFormat::Json => true,
        }
    }

    /// A progress display is shown only to a person: stderr is a terminal, logs are text, and
    /// no CI system is driving the process.
    pub fn shows_progress(self) -> bool {
        std::io::stderr().is_terminal() && !self.json() && std::env::var_os("CI").is_none()
    }
}

/// Installs the global subscriber.
pub fn init(format: LogFormat, progress: bool) {
    let default = if progress { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format.json() {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
