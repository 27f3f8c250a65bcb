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
    /// A request to the API or the token endpoint still failing after its retries, or one that
    /// could not be sent at all; the HTTP error is kept as the source.
    #[error("upstream unavailable: {source}{}", sentence(advice))]
    Unavailable {
        /// What failed, and how often.
        #[source]
        source: HttpError,
        /// What to do ("try again later"), or nothing.
        advice: &'static str,
    },
    /// The database or object store failed.
    #[error("sink error: {0}")]
    Sink(String),
    /// A database statement failed: the database and the operation are named, the driver's
    /// error is kept as the source.
    #[error("sink error: database {database}: {what}: {source}")]
    Database {
        /// The database URL, without its password.
        database: String,
        /// What was being done ("commit a page").
        what: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The database could not be reached or opened; the driver's error is kept as the source.
    #[error("sink error: cannot connect to database {database}: {source}")]
    Connect {
        /// The database URL, without its password.
        database: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The schema migrations failed; sqlx's error is kept as the source.
    #[error("sink error: database {database}: migrations failed: {source}")]
    Migrate {
        /// The database URL, without its password.
        database: String,
        /// The migrator's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// An object store operation failed: the store and what was done are named, the store's
    /// error is kept as the source.
    #[error("sink error: object store {store}: {what}: {source}")]
    ObjectStore {
        /// The store's URL.
        store: String,
        /// What was being done ("cannot write sentinel-2-l2a/x.json").
        what: String,
        /// object_store's error.
        #[source]
        source: object_store::Error,
    },
    /// A file of a local object store could not be written or removed.
    #[error("sink error: object store {store}: {what}: {source}")]
    Folder {
        /// The store's URL.
        store: String,
        /// What was being done.
        what: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The STAC API answered a request with a status that is not retried and not a refused
    /// token, in its own words. Which exit code it gives depends on the status: 400, 404 and
    /// 422 are the job's or the URL's fault (3), 403 the credentials' (4), others the API's (5).
    #[error("{}", refused(*status, what, url, detail))]
    Refused {
        /// What was requested ("search page", "conformance").
        what: &'static str,
        /// The URL, without its query.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        detail: String,
    },
    /// Another error, with what to check where it happened.
    #[error("{error}. {hint}")]
    Hinted {
        /// The error.
        #[source]
        error: Box<Error>,
        /// What to check.
        hint: String,
    },
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
    /// This error, with what to check.
    pub fn hint(self, hint: impl Into<String>) -> Error {
        Error::Hinted {
            error: Box::new(self),
            hint: hint.into(),
        }
    }

    /// Whether the API refused the request itself (HTTP 400, 404 or 422): the endpoint is not
    /// offered, or the request is not one it takes.
    pub fn is_rejected_request(&self) -> bool {
        matches!(
            self,
            Error::Refused {
                status: 400 | 404 | 422,
                ..
            }
        )
    }

    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Config,
            Error::Auth(_) => Exit::Auth,
            Error::Upstream(_) | Error::Unavailable { .. } => Exit::Upstream,
            Error::Sink(_)
            | Error::Database { .. }
            | Error::Connect { .. }
            | Error::Migrate { .. }
            | Error::ObjectStore { .. }
            | Error::Folder { .. } => Exit::Sink,
            Error::Refused { status, .. } => match status {
                400 | 404 | 422 => Exit::Config,
                403 => Exit::Auth,
                _ => Exit::Upstream,
            },
            Error::Locked { .. } | Error::LeaseLost { .. } => Exit::Locked,
            Error::Stopped => Exit::Terminated,
            Error::Hinted { error, .. } => error.exit(),
            Error::Internal(_) => Exit::Internal,
        }
    }
}

/// Advice after a message, as a sentence of its own.
fn sentence(advice: &str) -> String {
    match advice {
        "" => String::new(),
        advice => format!(". {advice}"),
    }
}

/// The words of [`Error::Refused`], with the exit code's prefix and what to check.
fn refused(status: u16, what: &str, url: &str, detail: &str) -> String {
    match status {
        400 | 422 => format!(
            "configuration error: the STAC API rejected the {what} {url} (HTTP {status}): \
             {detail}; check the job's collections, bbox, datetime, query and filter"
        ),
        403 => format!(
            "authentication refused: the STAC API forbids {url} (HTTP 403): {detail}; check \
             that these credentials may read it"
        ),
        404 => format!(
            "configuration error: {what} {url} not found (HTTP 404): check the API URL \
             (EDS_API_URL) and the collection ids"
        ),
        _ => format!("upstream unavailable: {what} {url} answered HTTP {status}: {detail}"),
    }
}

/// A request that failed for good.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Still failing after the retries.
    #[error("{what} {url}: {last} (gave up after {attempts} attempts)")]
    Exhausted {
        /// What was being requested ("search page", "token").
        what: &'static str,
        /// The URL, without query secrets.
        url: String,
        /// The last failure: a status or a transport error.
        last: String,
        /// Attempts made.
        attempts: u32,
        /// The last HTTP status, if any.
        status: Option<reqwest::StatusCode>,
    },
    /// The request could not even be built or sent (a bad URL, a redirect loop): not retried.
    #[error("{what} {url}: {source}")]
    Fatal {
        /// What was being requested.
        what: &'static str,
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}
