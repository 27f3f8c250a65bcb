//! SIGKILL at random instants: the `stac-sync` binary is killed several times during a sync
//! from a real STAC API (stac-server), then allowed to finish. The rows and objects must equal
//! those of an uninterrupted run, and pages fetched again must be explained by the kills.

mod common;

use common::tokens::Issuer;
use common::{Setup, make_items, stored_items, stored_objects};
use stac_sync::clock::ManualClock;
use stac_sync::error::Exit;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

async fn count_searches(
    axum::extract::State(searches): axum::extract::State<Arc<AtomicUsize>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // A slow API, so that kills land mid-run rather than after it.
    tokio::time::sleep(Duration::from_millis(15)).await;
    let response = next.run(request).await;
    if response.status().is_success() {
        searches.fetch_add(1, Ordering::SeqCst);
    }
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_at_random_instants_converges_to_an_uninterrupted_one() {
    let clock = Arc::new(ManualClock::default());
    let mut items = make_items("sentinel-2-l2a", 1500);
    items.extend(make_items("sentinel-1-grd", 500));
    let searches = Arc::new(AtomicUsize::new(0));
    let counter = searches.clone();
    let server = common::stac::start_with(
        &items,
        Issuer::new(clock.clone(), "id", "secret"),
        0,
        move |router| {
            router.layer(axum::middleware::from_fn_with_state(
                counter,
                count_searches,
            ))
        },
    )
    .await;
    let env = common::credentials(&server.token_url, "id", "secret");
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let reference = Setup {
        limit: 25,
        ..Setup::new(
            &server.url,
            reference_dir.path(),
            &["sentinel-2-l2a", "sentinel-1-grd"],
            env.clone(),
        )
    };
    let summary = reference.run(clock.clone()).await;
    assert_eq!(summary.exit(), Exit::Success, "{:?}", summary.jobs[0].error);
    let pages = summary.jobs[0].counts.pages as usize;
    assert_eq!(pages, 80);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("stac-sync.toml"),
        format!(
            "api_url = \"{}\"\n[[jobs]]\nname = \"test\"\ncollections = [\"sentinel-2-l2a\", \"sentinel-1-grd\"]\nlimit = 25\n",
            server.url
        ),
    )
    .expect("config");
    let binary = assert_cmd::cargo::cargo_bin!("stac-sync");
    let run = || common::binary_run(binary, dir.path(), &server.token_url);
    searches.store(0, Ordering::SeqCst);
    let kills = 6;
    common::kill_runs(run, &searches, kills, 1..=8).await;
    let last = common::run_to_end(run()).await;

    assert_eq!(last, Some(0));
    let database = format!("sqlite://{}", dir.path().join("stac-sync.db").display());
    let running = common::scalar(
        &database,
        "SELECT COUNT(*) FROM sync_runs WHERE status = 'running'",
    )
    .await;
    assert_eq!(running, 0, "killed runs are recorded as abandoned");
    assert_eq!(
        stored_items(&database).await,
        stored_items(&reference.database_url()).await
    );
    let strip = |mut m: std::collections::BTreeMap<String, Vec<u8>>| {
        m.retain(|k, _| !k.starts_with('_'));
        m
    };
    let objects = strip(stored_objects(&dir.path().join("stac-sync-items")));
    let expected = strip(stored_objects(&reference.objects_dir()));
    let keys =
        |m: &std::collections::BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    let extra: Vec<_> = keys(&objects)
        .into_iter()
        .filter(|k| !expected.contains_key(k))
        .collect();
    let missing: Vec<_> = keys(&expected)
        .into_iter()
        .filter(|k| !objects.contains_key(k))
        .collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "extra {extra:?}, missing {missing:?}"
    );
    let different: Vec<_> = keys(&objects)
        .into_iter()
        .filter(|k| objects[k] != expected[k])
        .collect();
    assert!(different.is_empty(), "objects differ: {different:?}");
    // Each kill can lose the pages fetched but not yet committed: the one being written, the
    // buffered ones (4) and the one in flight per partition (2).
    let fetched = searches.load(Ordering::SeqCst);
    assert!(fetched >= pages, "fetched {fetched} pages of {pages}");
    assert!(
        fetched <= pages + kills * 7,
        "fetched {fetched} pages for {pages} with {kills} kills"
    );
}
