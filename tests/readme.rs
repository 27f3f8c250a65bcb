//! The README's quick start, "try it without an account", DuckDB and pgstac commands, run as
//! written, so that a flag that moves breaks the build and not a new user. Only the `cargo run
//! --release [--example NAME] --` prefix is replaced by the binary cargo built for this test
//! (the same program, in its test build); every argument, redirection and `&` is the README's.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const README: &str = include_str!("../README.md");

/// The commands of the README's `sh` blocks from its start to `## Credentials`, and of the block
/// after "To try it without an account", in that order. `scripts/test` (the suite itself) is
/// left out: it is what runs this test.
fn readme_commands() -> (Vec<String>, Vec<String>) {
    let quick_start = README.split("\n## ").next().unwrap_or_default();
    let try_it = README
        .split_once("To try it without an account")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let first_block = |text: &str| sh_blocks(text).into_iter().next().unwrap_or_default();
    let quick: Vec<String> = sh_blocks(quick_start)
        .into_iter()
        .flatten()
        .filter(|c| c != "scripts/test")
        .collect();
    (quick, first_block(try_it))
}

/// The command lines of each ```sh block of `text`, without comments.
fn sh_blocks(text: &str) -> Vec<Vec<String>> {
    text.split("```sh\n")
        .skip(1)
        .map(|block| {
            block
                .split("```")
                .next()
                .unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// The command with `cargo run --release [--example NAME] --` replaced by the built binary.
fn built(command: &str) -> String {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_stac-sync"));
    if let Some(rest) = command.strip_prefix("cargo run --release --example ") {
        let (name, args) = rest.split_once(" -- ").unwrap_or((rest, ""));
        return format!("{} {args}", example(&bin, name).display());
    }
    match command.strip_prefix("cargo run --release -- ") {
        Some(args) => format!("{} {args}", bin.display()),
        None => command.to_string(),
    }
}

/// The example's binary beside the test's (`cargo test` builds examples; built here if not).
fn example(bin: &Path, name: &str) -> PathBuf {
    let path = bin
        .parent()
        .map(|dir| dir.join("examples").join(name))
        .unwrap_or_default();
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build --example {name}");
    }
    path
}

/// A command of the README in `dir`, with a clean environment as a new user's shell would
/// have (no STAC_SYNC_* or EDS_* variables: they come from the `.env` the fixture writes).
fn shell(dir: &Path, command: &str) -> Command {
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("CI", "1");
    shell
}

/// The background server of a `... > FILE &` line, stopped when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A background process group (a shell and what it started), killed whole when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

/// Starts a `... > FILE &` line and waits until FILE says the server is serving.
fn start_in_background(dir: &Path, command: &str) -> Background {
    let line = command.trim_end_matches('&').trim();
    let file = line
        .rsplit_once('>')
        .map(|(_, file)| dir.join(file.trim()))
        .expect("a background line of the README redirects its output");
    let child = shell(dir, &format!("exec {line}"))
        .stdin(Stdio::null())
        .spawn()
        .expect("starts");
    let server = Background(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&file) {
            let _ = f.read_to_string(&mut text);
        }
        if text.contains("# serving") {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "{command}: not serving after 300 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs a command of the README and asserts that it exits 0.
fn succeeds(dir: &Path, command: &str) {
    let output = shell(dir, command).output().expect("runs");
    assert!(
        output.status.success(),
        "{command}: {:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

#[test]
fn the_readme_quick_start_and_try_it_commands_run_as_written() {
    let (quick_start, try_it) = readme_commands();
    assert!(
        quick_start.len() == 1 && try_it.len() == 2,
        "the README's commands moved: {quick_start:?} {try_it:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = Vec::new();

    // "Try it without an account": the fixture in the background, then a run against it.
    for command in &try_it {
        let command = built(command);
        if command.ends_with('&') {
            servers.push(start_in_background(dir.path(), &command));
            continue;
        }
        succeeds(dir.path(), &command);
    }
    let items = dir.path().join("stac-sync-items");
    // Each collection's items, and its collection.json.
    assert_eq!(files_in(&items.join("sentinel-2-l2a")), 22_500 + 1);
    assert_eq!(files_in(&items.join("sentinel-1-grd")), 7_500 + 1);
    assert!(items.join("sentinel-1-grd/collection.json").is_file());

    // The quick start's first command, with the EDS variables of the fixture's `.env`.
    for command in &quick_start {
        succeeds(dir.path(), &built(command));
    }

    // "Reading the mirror with DuckDB": a collection exported from that mirror, then counted
    // by DuckDB (installed with pypgstac by scripts/test, tests/python/requirements.txt).
    let reading = README
        .split_once("## Reading the mirror with DuckDB")
        .map(|(_, rest)| sh_blocks(rest).into_iter().next().unwrap_or_default())
        .unwrap_or_default();
    assert_eq!(reading.len(), 2, "the README's commands moved: {reading:?}");
    succeeds(dir.path(), &built(&reading[0]));
    assert!(
        dir.path()
            .join("geoparquet/sentinel-1-grd/items")
            .read_dir()
            .is_ok_and(|mut files| files.next().is_some()),
        "export wrote the collection's files"
    );
    let counted = shell(dir.path(), &reading[1]).output().expect("runs");
    assert_eq!(
        String::from_utf8_lossy(&counted.stdout).trim(),
        "7500",
        "DuckDB counts the collection's items: {}",
        String::from_utf8_lossy(&counted.stderr)
    );

    // "Serving the mirror": into a new pgstac database (the README's name, made unique), from
    // the same fixture, then served by stac-fastapi-pgstac.
    if common::skip_without(common::Service::Pgstac) {
        return;
    }
    let serving = README
        .split_once("## Serving the mirror")
        .map(|(_, rest)| sh_blocks(rest).into_iter().next().unwrap_or_default())
        .unwrap_or_default();
    assert_eq!(serving.len(), 3, "the README's commands moved: {serving:?}");
    let database = format!("stac_sync_test_readme_{:08x}", rand::random::<u32>());
    let named = |command: &String| built(command).replace("stac_mirror", &database);
    succeeds(dir.path(), &named(&serving[0]));
    succeeds(dir.path(), &named(&serving[1]));
    // The line starts with variable assignments, so not `exec LINE`: the shell and the server
    // are one process group, stopped whole.
    let _server = Group(
        std::os::unix::process::CommandExt::process_group(
            &mut shell(dir.path(), &named(&serving[2])),
            0,
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let page = loop {
        let answer = Command::new("curl")
            .args([
                "-sf",
                "http://127.0.0.1:8082/collections/sentinel-1-grd/items?limit=2",
            ])
            .output()
            .expect("curl runs");
        if answer.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&answer.stdout).expect("JSON");
        }
        assert!(
            Instant::now() < deadline,
            "stac-fastapi-pgstac did not serve the mirror"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(page["features"].as_array().map(Vec::len), Some(2), "{page}");
    assert_eq!(page["features"][0]["collection"], "sentinel-1-grd");
}
