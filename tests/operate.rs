//! Operating stac-sync: the daemon's schedules (on a virtual wall clock), `check` against the
//! in-process STAC API, `status`, and metrics pushed to a real Pushgateway.

mod common;

use chrono::{DateTime, Utc};
use common::tokens::Issuer;
use common::{Setup, make_items};
use stac_sync::clock::{ManualClock, WallClock};
use stac_sync::config::{Config, EnvVars, FileConfig, Overrides};
use stac_sync::error::Exit;
use stac_sync::mirror::db::Database;
use stac_sync::ops::check;
use stac_sync::run::RunOptions;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

fn env(token_url: &str, secret: &str) -> EnvVars {
    common::credentials(token_url, "id", secret)
}

type Sleeper = (DateTime<Utc>, oneshot::Sender<()>);

/// Virtual wall time: it moves only when every job loop is waiting, straight to the earliest
/// wake-up, so runs take no virtual time and nothing waits for real time to pass. Past `end`
/// it stops the daemon.
#[derive(Debug)]
struct VirtualWall {
    /// Now, and the loops waiting with their wake-up times.
    state: Mutex<(DateTime<Utc>, Vec<Sleeper>)>,
    loops: usize,
    end: DateTime<Utc>,
    stop: CancellationToken,
}

impl WallClock for VirtualWall {
    fn now(&self) -> DateTime<Utc> {
        self.state.lock().expect("lock").0
    }

    fn sleep_until(
        &self,
        at: DateTime<Utc>,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().expect("lock");
        state.1.push((at, tx));
        if state.1.len() == self.loops {
            let earliest = (0..state.1.len())
                .min_by_key(|&i| state.1[i].0)
                .expect("a sleeper");
            let (wake, sender) = state.1.swap_remove(earliest);
            if wake > self.end {
                self.stop.cancel();
            } else {
                state.0 = state.0.max(wake);
                let _ = sender.send(());
            }
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("instant")
        .to_utc()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_each_job_on_its_own_schedule_and_writes_metrics() {
    let clock = Arc::new(ManualClock::default());
    let mut items = make_items("sentinel-2-l2a", 12);
    items.extend(make_items("sentinel-1-grd", 5));
    let server = common::stac::start(&items, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
api_url = "{api}"
database_url = "sqlite://{db}"
object_store_url = "none"

[[jobs]]
name = "half-hourly"
collections = ["sentinel-2-l2a"]
schedule = "0 */30 * * * *"

[[jobs]]
name = "crontab"
collections = ["sentinel-1-grd"]
schedule = "*/45 * * * *"
"#,
        api = server.url,
        db = dir.path().join("mirror.db").display(),
    );
    let file: FileConfig = toml::from_str(&toml).expect("parses");
    let overrides = Overrides {
        env: env(&server.token_url, "secret"),
        ..Overrides::default()
    };
    let mut config = Config::resolve(file, &overrides).expect("valid");
    let metrics = dir.path().join("stac_sync.prom");
    config.metrics_file = Some(metrics.clone());
    let options = RunOptions::default();
    let wall = Arc::new(VirtualWall {
        state: Mutex::new((at("2026-01-01T00:00:00Z"), Vec::new())),
        loops: 2,
        end: at("2026-01-01T02:00:00Z"),
        stop: options.stop.clone(),
    });

    let fired = stac_sync::ops::daemon::daemon(&config, options, wall)
        .await
        .expect("the daemon ran");

    let mut runs: Vec<(String, String)> = fired
        .iter()
        .map(|f| (f.at.format("%H:%M:%S").to_string(), f.job.clone()))
        .collect();
    runs.sort();
    let expected: Vec<(String, String)> = [
        ("00:30:00", "half-hourly"),
        ("00:45:00", "crontab"),
        ("01:00:00", "crontab"),
        ("01:00:00", "half-hourly"),
        ("01:30:00", "half-hourly"),
        ("01:45:00", "crontab"),
        ("02:00:00", "crontab"),
        ("02:00:00", "half-hourly"),
    ]
    .iter()
    .map(|(t, j)| (t.to_string(), j.to_string()))
    .collect();
    assert_eq!(runs, expected);
    for run in &fired {
        assert_eq!(run.report.status, "succeeded", "{:?}", run.report.error);
    }
    let first = |job: &str| {
        fired
            .iter()
            .find(|f| f.job == job)
            .map(|f| f.report.counts.new)
    };
    assert_eq!(
        (first("half-hourly"), first("crontab")),
        (Some(12), Some(5))
    );
    let text = std::fs::read_to_string(&metrics).expect("the metrics file");
    assert!(
        text.contains("stac_sync_run_success{job_name=\"half-hourly\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("stac_sync_run_success{job_name=\"crontab\"} 1\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_against_a_working_setup_and_names_what_fails() {
    let clock = Arc::new(ManualClock::default());
    let items = make_items("sentinel-2-l2a", 3);
    let server = common::stac::start(&items, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(
        &server.url,
        dir.path(),
        &["sentinel-2-l2a"],
        env(&server.token_url, "secret"),
    );
    // Migrations applied, as `run` or `migrate` leaves them.
    Database::connect(&setup.database_url())
        .await
        .expect("db")
        .migrate()
        .await
        .expect("migrated");

    let good = check::check(&setup.config(), clock.clone()).await;

    assert!(good.ok, "{}", good.render());
    assert_eq!(good.exit(), Exit::Success);
    let detail = |report: &check::Report, name: &str| -> (String, String) {
        let probe = report
            .probes
            .iter()
            .find(|p| p.check == name)
            .unwrap_or_else(|| panic!("no {name} probe in {}", report.render()));
        (probe.result.to_string(), probe.detail.clone())
    };
    assert_eq!(detail(&good, "token").1, "obtained; lifetime 1h");
    assert_eq!(detail(&good, "collection sentinel-2-l2a").0, "pass");
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .expect("migrations/sqlite is shipped with the crate")
        .count();
    assert_eq!(
        detail(&good, "migrations").1,
        format!("{shipped} of {shipped} applied")
    );
    assert!(
        detail(&good, "job test")
            .1
            .contains("full pass (no watermark yet); then datetime windows"),
        "{}",
        good.render()
    );

    let mut unwritable = setup.config();
    unwritable.object_store_url = Some("file:///proc/stac-sync-cannot-write-here".into());
    let bad_sink = check::check(&unwritable, clock.clone()).await;
    assert!(!bad_sink.ok);
    assert_eq!(bad_sink.exit(), Exit::Sink);
    assert_eq!(detail(&bad_sink, "object store").0, "fail");
    assert_eq!(detail(&bad_sink, "database").0, "pass");

    let wrong_secret = Setup {
        env: env(&server.token_url, "not-the-secret"),
        ..Setup::new(
            &server.url,
            dir.path(),
            &["sentinel-2-l2a"],
            EnvVars::default(),
        )
    };
    let refused = check::check(&wrong_secret.config(), clock.clone()).await;
    assert_eq!(refused.exit(), Exit::Auth);
    let (result, why) = detail(&refused, "token");
    assert_eq!(result, "fail");
    assert!(why.contains("client id and secret"), "{why}");

    let wrong_root = format!("{}nowhere/", server.url);
    let lost = Setup::new(
        &wrong_root,
        dir.path(),
        &["sentinel-2-l2a"],
        env(&server.token_url, "secret"),
    );
    let lost = check::check(&lost.config(), clock.clone()).await;
    assert_eq!(lost.exit(), Exit::Config);
    let (result, why) = detail(&lost, "STAC root");
    assert_eq!(result, "fail");
    assert!(why.contains("landing page"), "{why}");
    assert!(why.contains("EDS_API_URL"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_runs_watermarks_items_and_quarantine() {
    let clock = Arc::new(ManualClock::default());
    let mut items = make_items("sentinel-2-l2a", 7);
    items.extend(make_items("sentinel-1-grd", 2));
    let server = common::stac::start(&items, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(
        &server.url,
        dir.path(),
        &["sentinel-2-l2a", "sentinel-1-grd"],
        env(&server.token_url, "secret"),
    );
    setup.run(clock.clone()).await;
    let db = Database::connect(&setup.database_url()).await.expect("db");

    let status = stac_sync::ops::status::read(&db, 10).await.expect("status");

    assert_eq!(status.runs.len(), 1);
    assert_eq!(status.runs[0].status, "succeeded");
    assert_eq!(status.runs[0].new, 9);
    assert_eq!(status.jobs[0].job, "test");
    assert!(status.jobs[0].watermark.is_some());
    assert_eq!(status.jobs[0].partitions_left, 0);
    let counts: Vec<(String, i64)> = status
        .collections
        .iter()
        .map(|c| (c.collection.clone(), c.live))
        .collect();
    assert_eq!(
        counts,
        vec![("sentinel-1-grd".into(), 2), ("sentinel-2-l2a".into(), 7)]
    );
    assert_eq!(status.quarantined, 0);
    let text = status.render();
    assert!(text.contains("Recent runs"), "{text}");
    assert!(text.contains("sentinel-2-l2a  7"), "{text}");
    let json = serde_json::to_value(&status).expect("json");
    assert_eq!(json["jobs"][0]["partitions_left"], 0);
}

/// A real Pushgateway (Debian's prometheus-pushgateway, installed by `.ci/run`).
struct Pushgateway {
    child: std::process::Child,
    url: String,
}

impl Drop for Pushgateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn pushgateway() -> Pushgateway {
    let binary = std::env::var("STAC_SYNC_TEST_PUSHGATEWAY")
        .unwrap_or_else(|_| "/usr/bin/prometheus-pushgateway".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = std::process::Command::new(&binary)
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {binary} ({e}); .ci/run installs it (apt-get install prometheus-pushgateway)")
        });
    let url = format!("http://127.0.0.1:{port}/");
    let gateway = Pushgateway { child, url };
    for _ in 0..200 {
        if reqwest::get(format!("{}-/ready", gateway.url))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return gateway;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the Pushgateway did not become ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_pushes_its_metrics_to_a_real_pushgateway() {
    if common::skip_without(common::Service::Pushgateway) {
        return;
    }
    let gateway = pushgateway().await;
    let clock = Arc::new(ManualClock::default());
    let items = make_items("sentinel-2-l2a", 4);
    let server = common::stac::start(&items, Issuer::new(clock.clone(), "id", "secret")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(
        &server.url,
        dir.path(),
        &["sentinel-2-l2a"],
        env(&server.token_url, "secret"),
    );
    let mut config = setup.config();
    config.pushgateway_url = Some(url::Url::parse(&gateway.url).expect("url"));
    let summary = stac_sync::run::run(&config, RunOptions::default())
        .await
        .expect("ran");
    let reports: Vec<_> = summary.jobs.iter().collect();

    stac_sync::ops::metrics::push_configured(&config, &reports).await;

    let scraped = reqwest::get(format!("{}metrics", gateway.url))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let line = scraped
        .lines()
        .find(|l| l.starts_with("stac_sync_run_items{") && l.contains("outcome=\"new\""))
        .unwrap_or_else(|| panic!("no pushed items metric in {scraped}"));
    assert!(line.contains("job=\"stac_sync\""), "{line}");
    assert!(line.contains("job_name=\"test\""), "{line}");
    assert!(line.ends_with(" 4"), "{line}");
}

#[test]
fn the_config_shipped_in_the_kubernetes_configmap_is_valid() {
    let manifest = std::fs::read_to_string("deploy/k8s/configmap.yaml").expect("the ConfigMap");
    // The block scalar after `stac-sync.toml: |`, without its indentation.
    let toml: String = manifest
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("stac-sync.toml: |"))
        .skip(1)
        .map(|line| line.strip_prefix("    ").unwrap_or(line.trim()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(toml.contains("[[jobs]]"), "{toml}");
    let file: FileConfig = toml::from_str(&toml).expect("the shipped TOML parses");
    let overrides = Overrides {
        env: EnvVars {
            eds_api_url: Some("https://api.earthdaily.com".into()),
            ..env("https://auth.example.test/token", "secret")
        },
        ..Overrides::default()
    };
    let config = Config::resolve(file, &overrides).expect("the shipped config is valid");
    assert_eq!(config.jobs[0].name, "s2-europe");
    assert_eq!(
        config.api_root.as_str(),
        "https://api.earthdaily.com/platform/v1/stac/"
    );
}
