//! `stac-sync check`: the config was already validated without I/O (loading it does that);
//! this probes everything a run needs, in the order a run needs it, and says which incremental
//! strategy each job will use. Nothing is left behind but an empty SQLite file where none was
//! (the database probe rolls back; the object store probe deletes what it wrote), and no
//! migration is applied.

use crate::clock::Clock;
use crate::config::RetryPolicy;
use crate::config::{Auth, Backfill, Config};
use crate::error::{Error, Exit};
use crate::mirror::db::Database;
use crate::mirror::objects::ObjectSink;
use crate::ops::status::table;
use crate::plan;
use crate::stac::client::{
    ApiClient, Capabilities, api_client, capabilities_from, landing_page, settle_root,
};
use crate::stac::http::{self, Stats};
use crate::stac::search::Request;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// One probe's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// What was checked.
    pub check: String,
    /// `pass`, `fail`, or `info` (a fact that is not a failure, such as a missing extension).
    pub result: &'static str,
    /// What was found, or what is wrong and what to do.
    pub detail: String,
    /// The exit code this failure stands for.
    #[serde(skip)]
    exit: Option<Exit>,
}

/// Everything `check` found.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Every probe, in order.
    pub probes: Vec<Probe>,
    /// Whether every probe passed.
    pub ok: bool,
}

impl Report {
    fn push(&mut self, check: impl Into<String>, outcome: Result<String, Error>) {
        let probe = match outcome {
            Ok(detail) => Probe {
                check: check.into(),
                result: "pass",
                detail,
                exit: None,
            },
            Err(error) => Probe {
                check: check.into(),
                result: "fail",
                exit: Some(error.exit()),
                detail: error.to_string(),
            },
        };
        self.probes.push(probe);
    }

    fn info(&mut self, check: impl Into<String>, detail: impl Into<String>) {
        self.probes.push(Probe {
            check: check.into(),
            result: "info",
            detail: detail.into(),
            exit: None,
        });
    }

    /// 0 if every probe passed, else the code of the first failure.
    pub fn exit(&self) -> Exit {
        self.probes
            .iter()
            .find_map(|p| p.exit)
            .unwrap_or(Exit::Success)
    }

    /// The report as a table.
    pub fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .probes
            .iter()
            .map(|p| vec![p.result.to_uppercase(), p.check.clone(), p.detail.clone()])
            .collect();
        let mut out = table(&["result", "check", "detail"], &rows);
        out += if self.ok {
            "\nEverything a run needs is in place.\n"
        } else {
            "\nSome checks failed: see FAIL above.\n"
        };
        out
    }
}

/// Probes the API, the sinks and the jobs. A probe retries at most once and briefly: `check`
/// answers in seconds, not after a run's retry budget.
pub async fn check(config: &Config, clock: Arc<dyn Clock>) -> Report {
    let mut report = Report {
        probes: Vec::new(),
        ok: false,
    };
    let policy = RetryPolicy {
        max_retries: config.http.retry.max_retries.min(1),
        budget: Duration::from_secs(5),
        ..config.http.retry.clone()
    };
    report.info("config", format!("{} job(s), valid", config.jobs.len()));
    let api = match api_client(config, clock, Arc::new(Stats::default()), policy) {
        Ok(api) => api,
        Err(error) => {
            report.push("HTTP client", Err(error));
            return finish(report);
        }
    };
    let api = match probe_token(&mut report, config, &api).await {
        true => match settle_root(api, config.api_host.as_ref()).await {
            Ok(api) => Some(api),
            Err(error) => {
                report.push("STAC root", Err(error));
                None
            }
        },
        false => None,
    };
    let caps = match &api {
        Some(api) => probe_api(&mut report, api).await,
        None => None,
    };
    if let (Some(caps), Some(api)) = (&caps, &api) {
        conformance(&mut report, caps);
        probe_collections(&mut report, config, api).await;
    }
    let db = probe_database(&mut report, config).await;
    probe_object_store(&mut report, config).await;
    // Whether the API takes bulk searches, asked once, for the jobs whose backfill may use it.
    let mut bulk: Option<String> = None;
    for job in &config.jobs {
        let watermark = match &db {
            Some(db) => db
                .job_state(&job.name)
                .await
                .ok()
                .flatten()
                .and_then(|s| s.watermark),
            None => None,
        };
        let mut detail = strategy(job, watermark.as_deref(), caps.as_ref());
        if watermark.is_none() && job.backfill != Backfill::Paging {
            if bulk.is_none() {
                bulk = Some(probe_bulk(api.as_ref()).await);
            }
            detail = format!("{detail}; backfill {}", bulk.as_deref().unwrap_or_default());
        }
        report.info(format!("job {}", job.name), detail);
    }
    finish(report)
}

/// Whether a backfill can go through bulk search, in words.
async fn probe_bulk(api: Option<&ApiClient>) -> String {
    let Some(api) = api else {
        return "through bulk search unknown: the API could not be probed".into();
    };
    match crate::stac::bulk::offered(api).await {
        Ok(Some(true)) => {
            "through bulk search (GET search/bulk answers 405: the API takes bulk searches)".into()
        }
        Ok(Some(false)) => {
            "paged: the API has no bulk search (GET search/bulk answers 404 or 501)".into()
        }
        Ok(None) => "through bulk search if the API takes one (GET search/bulk does not \
            tell), else paged"
            .into(),
        Err(e) => format!("through bulk search unknown: {e}"),
    }
}

/// Obtains a token (if the API needs one); whether the API can be asked anything.
async fn probe_token(report: &mut Report, config: &Config, api: &ApiClient) -> bool {
    if let Auth::None = &config.auth {
        report.info("token", "none: the API is called without authentication");
        return true;
    }
    let outcome = api.tokens().token().await.map(|token| match token {
        Some(token) => match token.lifetime {
            Some(lifetime) => format!(
                "obtained; lifetime {}",
                humantime::format_duration(lifetime)
            ),
            None => "static bearer token (not checked until the API answers)".into(),
        },
        None => "none".into(),
    });
    let ok = outcome.is_ok();
    report.push("token", outcome);
    ok
}

/// The landing page, then what the API offers.
async fn probe_api(report: &mut Report, api: &ApiClient) -> Option<Capabilities> {
    let root = api.root().clone();
    let doc = match landing_page(api).await {
        Ok(doc) => doc,
        Err(error) => {
            report.push("STAC root", Err(explain_root(error, &root)));
            return None;
        }
    };
    let title = doc
        .get("title")
        .or_else(|| doc.get("id"))
        .and_then(|t| t.as_str())
        .unwrap_or("untitled");
    report.push(
        "STAC root",
        Ok(format!("{} ({title})", http::display_url(&root))),
    );
    match capabilities_from(api, &doc).await {
        Ok(caps) => Some(caps),
        Err(error) => {
            report.push("conformance", Err(error));
            None
        }
    }
}

/// Each job's collections exist at `/collections/{id}`.
async fn probe_collections(report: &mut Report, config: &Config, api: &ApiClient) {
    let listed = api
        .root()
        .join("collections")
        .map_or_else(|_| String::new(), |u| u.to_string());
    for collection in config.jobs.iter().flat_map(|j| &j.collections) {
        let outcome = match crate::stac::client::collection_url(api.root(), collection) {
            Some(url) => api
                .fetch("collection", &Request::get(url), |_| Ok(()))
                .await
                .map(|()| "exists".to_string())
                .map_err(|e| match e {
                    e if e.is_rejected_request() => e.hint(format!(
                        "Is the id spelled as the API lists it at {listed}?"
                    )),
                    other => other,
                }),
            None => Err(Error::Config(format!(
                "collection id {collection:?}: no URL can name it (URL parsers and servers remove \
                 `.` and `..` path segments), so its /collections document cannot be fetched"
            ))),
        };
        report.push(format!("collection {collection}"), outcome);
    }
}

/// The database takes a write, and how many migrations it has.
async fn probe_database(report: &mut Report, config: &Config) -> Option<Database> {
    let db = match Database::connect_as(&config.database_url, config.database_format).await {
        Ok(db) => db,
        Err(error) => {
            report.push("database", Err(error));
            return None;
        }
    };
    report.push(
        "database",
        db.probe_write().await.map(|()| {
            format!(
                "{}: reachable, writable",
                crate::config::redact_url(&config.database_url)
            )
        }),
    );
    for (check, found) in db.probes().await {
        report.push(check, found);
    }
    match db.migrations().await {
        (0, _) => report.info(
            "migrations",
            "empty database: `stac-sync run` (or `stac-sync migrate`) creates the tables",
        ),
        (applied, known) if applied >= known => {
            report.push("migrations", Ok(format!("{applied} of {known} applied")));
        }
        (applied, known) => report.push(
            "migrations",
            Err(Error::Sink(format!(
                "{applied} of {known} applied: run `stac-sync migrate` (or a `stac-sync run` \
                 without --no-migrate) before running with --no-migrate"
            ))),
        ),
    }
    Some(db)
}

/// The object store takes a write (and the probe object is deleted).
async fn probe_object_store(report: &mut Report, config: &Config) {
    let Some(url) = config.object_store_url.as_deref() else {
        report.info("object store", "none: items go to the database only");
        return;
    };
    let outcome = match ObjectSink::from_url(url, &config.object_store_options) {
        Ok(sink) => sink
            .probe()
            .await
            .map(|()| format!("{url}: reachable, writable")),
        Err(e) => Err(e),
    };
    report.push("object store", outcome);
}

fn finish(mut report: Report) -> Report {
    report.ok = report.probes.iter().all(|p| p.result != "fail");
    report
}

fn conformance(report: &mut Report, caps: &Capabilities) {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    report.info(
        "conformance",
        format!(
            "sort {}, filter {}, fields {}, query {}; `updated` queryable {}",
            yes_no(caps.sort),
            yes_no(caps.filter),
            yes_no(caps.fields),
            yes_no(caps.query),
            yes_no(caps.updated_queryable)
        ),
    );
}

/// Which strategy a job's next pass uses, in words.
fn strategy(
    job: &crate::config::Job,
    watermark: Option<&str>,
    caps: Option<&Capabilities>,
) -> String {
    let Some(caps) = caps else {
        return "strategy unknown: the API could not be probed".into();
    };
    let later = match plan::strategy(job, Some("1970-01-01T00:00:00Z"), caps) {
        plan::Strategy::Updated => "`updated >= watermark - overlap`, sorted by updated",
        plan::Strategy::UpdatedQuery => {
            "`updated >= watermark - overlap` through the Query extension (the API offers no Filter)"
        }
        plan::Strategy::Datetime => "datetime windows from `watermark - lookback`",
        plan::Strategy::Full => "a full pass every time (incremental = \"off\")",
    };
    match watermark {
        None => format!("next run: full pass (no watermark yet); then {later}"),
        Some(mark) => format!("watermark {mark}; next run: {later}"),
    }
}

/// A wrong API URL, in words a person acts on.
fn explain_root(error: Error, root: &url::Url) -> Error {
    match error.exit() {
        Exit::Config => error.hint(format!(
            "{root} must be a STAC API's landing page (for EDS: \
             https://api.earthdaily.com or https://api.earthdaily.com/platform/v1/stac)"
        )),
        Exit::Upstream => {
            error.hint("If this persists, check api_url / EDS_API_URL and the network")
        }
        _ => error,
    }
}
