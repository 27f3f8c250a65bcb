//! The run-level error and the process exit codes of DESIGN.md.
//!
//! Each stage has its own error type; they all convert into [`Error`], whose variant decides the
//! exit code. Messages say what went wrong, where, and what to do.

use std::process::ExitCode;

/// Exit codes, as documented in the README and DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success, including "nothing new".
    Success = 0,
    /// An unexpected internal error.
    Internal = 1,
    /// The run finished but some items were quarantined or some jobs failed.
    Partial = 2,
    /// Configuration error: do not retry.
    Config = 3,
    /// Authentication refused: do not retry.
    Auth = 4,
    /// The STAC API or token endpoint was unavailable after retries: retry later.
    Upstream = 5,
    /// A sink (database, object store) is unavailable or refusing writes.
    Sink = 6,
    /// Another run holds the lock for this job.
    Locked = 7,
    /// Stopped by SIGTERM after a clean checkpoint.
    Terminated = 143,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// Why a run (or a command) could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message names the key or file.
    #[error("configuration error: {0}")]
    Config(String),
    /// The API or the token endpoint refused our credentials.
    #[error("authentication refused: {0}")]
    Auth(String),
    /// The API or token endpoint could not be reached or kept failing.
    #[error("upstream unavailable: {0}")]
    Upstream(String),
    /// The database or object store failed.
    #[error("sink error: {0}")]
    Sink(String),
    /// Another run holds this job's lock.
    #[error("job {job} is locked by another run: {detail}")]
    Locked {
        /// The job's name.
        job: String,
        /// Who holds it, as far as we know.
        detail: String,
    },
    /// A worker's lease on a partition expired and another worker claimed it; this worker's
    /// page was not committed, and the other goes on from the last committed page.
    #[error(
        "another worker took over partition {partition}: this worker's lease on it expired \
         (it was paused or cut off from the database for longer than worker_lease)"
    )]
    LeaseLost {
        /// The partition.
        partition: String,
    },
    /// Stopped by SIGTERM (or Ctrl-C) after committing what was fetched.
    #[error(
        "stopped by a termination signal; pages fetched so far are committed and the next run resumes"
    )]
    Stopped,
    /// A bug or an unforeseen condition.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Config,
            Error::Auth(_) => Exit::Auth,
            Error::Upstream(_) => Exit::Upstream,
            Error::Sink(_) => Exit::Sink,
            Error::Locked { .. } | Error::LeaseLost { .. } => Exit::Locked,
            Error::Stopped => Exit::Terminated,
            Error::Internal(_) => Exit::Internal,
        }
    }
}
