//! The binary as a user meets it: exit codes and the first error line of each mistake.

mod common;

use assert_cmd::Command;
use common::fixture::{self, Paging};
use common::tokens::Issuer;
use stac_sync::clock::ManualClock;
use std::path::Path;
use std::sync::Arc;

/// The binary in an empty folder with a clean environment.
fn stac_sync(dir: &Path) -> Command {
    let mut command = Command::cargo_bin("stac-sync").expect("binary");
    command.current_dir(dir).env_clear().env("RUST_LOG", "warn");
    command
}

fn first_error_line(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .find(|line| line.starts_with("error:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_client_id_without_a_secret_is_a_configuration_error() {
    let dir = tempfile::tempdir().expect("tempdir");

    let output = stac_sync(dir.path())
        .env("EDS_API_URL", "https://api.example.test")
        .env("EDS_AUTH_URL", "https://auth.example.test/oauth2/token")
        .env("EDS_CLIENT_ID", "abc")
        .args(["run", "--collection", "sentinel-2-l2a"])
        .output()
        .expect("runs");

    assert_eq!(output.status.code(), Some(3));
    assert_eq!(
        first_error_line(&output),
        "error: configuration error: EDS_CLIENT_ID is set but no client secret: set EDS_SECRET \
         (or STAC_SYNC_CLIENT_SECRET)"
    );
}

#[test]
fn workers_need_postgres_and_leave_reconcile_to_a_single_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        stac_sync(dir.path())
            .env("STAC_SYNC_API_URL", "https://stac.example.test/")
            .args(["run", "--collection", "sentinel-2-l2a"])
            .args(args)
            .output()
            .expect("runs")
    };

    let output = run(&["--worker"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        first_error_line(&output)
            .starts_with("error: configuration error: run --worker needs a Postgres database_url"),
        "{}",
        first_error_line(&output)
    );
    assert!(
        !dir.path().join("stac-sync.db").exists(),
        "nothing is created"
    );

    let output = run(&[
        "--worker",
        "--reconcile",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/none",
    ]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        first_error_line(&output).contains("reconcile with one `stac-sync run --reconcile`"),
        "{}",
        first_error_line(&output)
    );
}

#[test]
fn an_unknown_config_key_is_named_with_its_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("stac-sync.toml"),
        "api_url = \"https://stac.example.test/\"\n\n[[jobs]]\nname = \"s2\"\ncolections = [\"a\"]\n",
    )
    .expect("write");

    let output = stac_sync(dir.path()).arg("run").output().expect("runs");

    assert_eq!(output.status.code(), Some(3));
    let line = first_error_line(&output);
    assert!(
        line.starts_with(
            "error: configuration error: stac-sync.toml: line 5: unknown field `colections`"
        ),
        "{line}"
    );
}

#[test]
fn an_unreachable_postgres_says_the_connection_was_refused_and_where() {
    let dir = tempfile::tempdir().expect("tempdir");

    let output = stac_sync(dir.path())
        .args([
            "status",
            "--database-url",
            "postgres://postgres@127.0.0.1:9/mirror",
        ])
        .output()
        .expect("runs");

    assert_eq!(output.status.code(), Some(6));
    let line = first_error_line(&output);
    assert!(
        line.starts_with(
            "error: sink error: cannot connect to database postgres://postgres@127.0.0.1:9/mirror"
        ),
        "{line}"
    );
    assert!(line.contains("Connection refused"), "{line}");
    assert!(!line.contains("timed out"), "{line}");
}

#[test]
fn an_unreachable_api_is_an_upstream_error_after_the_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("stac-sync.toml"),
        "api_url = \"http://127.0.0.1:9/stac/\"\n[http]\nmax_retries = 2\nbackoff_base = \"10ms\"\n",
    )
    .expect("write");

    let output = stac_sync(dir.path())
        .args(["run", "--collection", "c"])
        .output()
        .expect("runs");

    assert_eq!(output.status.code(), Some(5));
    let line = first_error_line(&output);
    assert!(
        line.starts_with(
            "error: job c: upstream unavailable: collection http://127.0.0.1:9/stac/collections/c: error sending request"
        ),
        "{line}"
    );
    assert!(
        line.ends_with("(gave up after 3 attempts). The STAC API is unavailable; try again later"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_exit_4_and_say_which_variables_to_check() {
    let clock = Arc::new(ManualClock::default());
    let server = fixture::start(
        vec![vec![]],
        Paging::PostFull,
        Issuer::new(clock, "id", "right"),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = stac_sync(dir.path());
    command
        .env("EDS_API_URL", &server.url)
        .env("EDS_AUTH_URL", &server.token_url)
        .env("EDS_CLIENT_ID", "id")
        .env("EDS_SECRET", "wrong-secret")
        .args(["run", "--collection", "c"]);

    let output = tokio::task::spawn_blocking(move || command.output().expect("runs"))
        .await
        .expect("join");

    assert_eq!(output.status.code(), Some(4));
    assert_eq!(
        first_error_line(&output),
        format!(
            "error: job c: authentication refused: the token endpoint {}token rejected the client id \
             and secret (invalid_client: Client authentication failed); check EDS_CLIENT_ID and EDS_SECRET",
            server.url
        )
    );
    assert!(!String::from_utf8_lossy(&output.stderr).contains("wrong-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_page_commits_what_was_fetched_and_exits_143() {
    let clock = Arc::new(ManualClock::default());
    let pages: Vec<Vec<serde_json::Value>> = common::make_items("c", 6)
        .chunks(2)
        .map(<[serde_json::Value]>::to_vec)
        .collect();
    let server = fixture::start(pages, Paging::PostFull, Issuer::new(clock, "id", "right")).await;
    *server.state.delay.lock().expect("lock") = (1, std::time::Duration::from_secs(60));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin!("stac-sync"))
        .current_dir(dir.path())
        .env_clear()
        .env("STAC_SYNC_API_URL", &server.url)
        .env("EDS_AUTH_URL", &server.token_url)
        .env("EDS_CLIENT_ID", "id")
        .env("EDS_SECRET", "right")
        .args(["run", "--collection", "c"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawns");
    // The first page is served at once; the second takes a minute.
    let state = server.state.clone();
    let watched = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while state.searches.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the second page was never asked for"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    });
    watched.await.expect("watcher");

    let signalled = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let output = tokio::task::spawn_blocking(move || {
        let status = child.wait().expect("exits");
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        (status, stderr)
    })
    .await
    .expect("join");

    assert_eq!(output.0.code(), Some(143), "{}", output.1);
    assert!(
        signalled.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        signalled.elapsed()
    );
    let database = format!("sqlite://{}", dir.path().join("stac-sync.db").display());
    assert_eq!(common::stored_items(&database).await.len(), 2);
    assert_eq!(
        common::scalar(
            &database,
            "SELECT COUNT(*) FROM sync_runs WHERE status = 'interrupted'"
        )
        .await,
        1
    );
    assert_eq!(
        common::scalar(
            &database,
            "SELECT COUNT(*) FROM sync_state WHERE resume IS NOT NULL"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_stops_on_sigterm_while_idle_and_while_a_run_is_slow() {
    let clock = Arc::new(ManualClock::default());
    let pages: Vec<Vec<serde_json::Value>> = common::make_items("c", 4)
        .chunks(2)
        .map(<[serde_json::Value]>::to_vec)
        .collect();
    let server = fixture::start(pages, Paging::PostFull, Issuer::new(clock, "id", "right")).await;
    let daemon = |schedule: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("stac-sync.toml"),
            format!("[[jobs]]\nname = \"c\"\ncollections = [\"c\"]\nschedule = \"{schedule}\"\n"),
        )
        .expect("config");
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin!("stac-sync"))
            .current_dir(dir.path())
            .env_clear()
            .env("RUST_LOG", "warn")
            .env("STAC_SYNC_API_URL", &server.url)
            .env("EDS_AUTH_URL", &server.token_url)
            .env("EDS_CLIENT_ID", "id")
            .env("EDS_SECRET", "right")
            .arg("daemon")
            .spawn()
            .expect("spawns");
        (dir, child)
    };
    // Signals once `ready` holds, and times the exit.
    let stop_when = |mut child: std::process::Child, ready: Box<dyn Fn() -> bool + Send>| {
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !ready() {
                assert!(std::time::Instant::now() < deadline, "never ready");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let signalled = std::time::Instant::now();
            std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("kill");
            let status = child.wait().expect("exits");
            (status.code(), signalled.elapsed())
        })
    };

    // Idle, waiting for a yearly schedule once its database is open: a clean stop.
    let (dir, child) = daemon("0 0 0 1 1 *");
    let database = dir.path().join("stac-sync.db");
    let (code, took) = stop_when(child, Box::new(move || database.exists()))
        .await
        .expect("join");
    assert_eq!(code, Some(0));
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");

    // In the middle of a run whose page takes a minute: the run is interrupted, 143.
    *server.state.delay.lock().expect("lock") = (0, std::time::Duration::from_secs(60));
    let (_dir, child) = daemon("* * * * * *");
    let state = server.state.clone();
    let asked = move || state.searches.load(std::sync::atomic::Ordering::SeqCst) >= 1;
    let (code, took) = stop_when(child, Box::new(asked)).await.expect("join");
    assert_eq!(code, Some(143));
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}

#[test]
fn usage_errors_exit_3_and_one_off_flags_work_after_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| stac_sync(dir.path()).args(args).output().expect("runs");

    let negative = run(&["run", "--collection", "c", "--limit", "-1"]);
    let unknown = run(&["run", "--no-such-flag"]);
    let after_run = run(&[
        "run",
        "--collection",
        "c",
        "--bbox",
        "2.25,48.81,2.42,48.90",
    ]);
    // Western and southern boxes, in the documented form, and a collection id with a colon.
    let west = run(&["run", "--collection", "c", "--bbox", "-5.2,41.3,9.6,51.1"]);
    let south = run(&[
        "run",
        "--bbox",
        "-74.1,-34.2,-73.9,-33.9",
        "--collection",
        "c",
    ]);
    let colon = run(&["run", "--collection", "landsat:c2l2-sr"]);
    let help = run(&["run", "--help"]);

    assert_eq!(negative.status.code(), Some(3));
    for (name, output) in [("west", &west), ("south", &south), ("colon", &colon)] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("unexpected argument"), "{name}: {stderr}");
        assert!(!stderr.contains("job name"), "{name}: {stderr}");
        assert!(first_error_line(output).contains("API"), "{name}: {stderr}");
    }
    assert_eq!(unknown.status.code(), Some(3));
    assert_eq!(help.status.code(), Some(0));
    // Parsed: it gets as far as asking for the API it was not given.
    let stderr = String::from_utf8_lossy(&after_run.stderr);
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
    assert!(first_error_line(&after_run).contains("API"), "{stderr}");
}

/// EDS_API_URL given as a bare host whose own root serves a STAC landing page is used as the
/// STAC root; only a host without one gets /platform/v1/stac (the fixture serves both `/` and
/// `/search`, and nothing under /platform).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eds_api_url_host_that_serves_a_stac_root_is_used_as_the_root() {
    let clock = Arc::new(ManualClock::default());
    let server = fixture::start(
        vec![common::make_items("c", 3)],
        Paging::PostFull,
        Issuer::new(clock, "id", "secret"),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = stac_sync(dir.path());
    command
        .env("EDS_API_URL", server.url.trim_end_matches('/'))
        .env("EDS_AUTH_URL", &server.token_url)
        .env("EDS_CLIENT_ID", "id")
        .env("EDS_SECRET", "secret")
        .args(["run", "--collection", "c"]);

    let output = tokio::task::spawn_blocking(move || command.output().expect("runs"))
        .await
        .expect("join");

    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stored = std::fs::read_dir(dir.path().join("stac-sync-items").join("c"))
        .map_or(0, |entries| entries.count());
    assert_eq!(stored, 3);
}
