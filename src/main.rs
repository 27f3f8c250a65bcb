//! The `stac-sync` binary: parses the command line, sets up logging, loads the config, calls
//! the library and maps the outcome to an exit code.

use clap::{Parser, Subcommand};
use stac_sync::config::{Config, DatabaseConfig, EnvVars, Overrides};
use stac_sync::error::{Error, Exit};
use stac_sync::mirror::objects::ObjectSink;
use stac_sync::mirror::snapshot;
use stac_sync::ops::telemetry::LogFormat;
use stac_sync::run::{self, RunOptions};
use std::process::ExitCode;

/// Keeps a faithful, current mirror of a STAC API's items in SQLite or Postgres and object
/// storage. Credentials come from the environment (EDS_CLIENT_ID, EDS_SECRET, EDS_AUTH_URL,
/// EDS_API_URL, or STAC_SYNC_*) or a .env file, never from flags.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    overrides: Overrides,
    /// Log format: JSON lines when stderr is not a terminal, readable text when it is (auto).
    #[arg(
        long,
        global = true,
        env = "STAC_SYNC_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One pass over every configured job (or --job NAME, or a one-off --collection), then exit.
    Run {
        /// Do not apply database migrations first.
        #[arg(long)]
        no_migrate: bool,
        /// After the sync pass, sweep the ids of each job's range and tombstone (`deleted_at`)
        /// the items that vanished upstream.
        #[arg(long)]
        reconcile: bool,
        /// Share each job with other `run --worker` processes (on any machines) through the
        /// Postgres database: claim its partitions under leases, take over those of workers
        /// that died. Needs Postgres.
        #[arg(long)]
        worker: bool,
    },
    /// Run each job on its own `schedule` until SIGTERM.
    Daemon,
    /// Probe the token, the STAC API, each collection and each sink; say which incremental
    /// strategy each job will use. Exit 0 only if everything passes.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recent runs, each job's watermark, items per collection and quarantined features.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// How many recent runs to show.
        #[arg(long, default_value_t = 10)]
        runs: i64,
    },
    /// The change feed: what the runs stored and deleted after sequence number SEQ, oldest
    /// first. Keep the last `seq` you read and pass it next time.
    Changes {
        /// Print changes after this sequence number (0: from the oldest kept).
        #[arg(long, default_value_t = 0)]
        since: i64,
        /// Print at most this many (`--limit` is the page size of runs).
        #[arg(long, default_value_t = 10_000)]
        max: i64,
        /// Print NDJSON: one change a line, with every field.
        #[arg(long)]
        json: bool,
    },
    /// Apply the database schema migrations.
    Migrate,
    /// Write snapshot files of the mirror once, from the database: for each collection (all, or
    /// each --collection) and datetime window (`snapshot_window`),
    /// DEST/{collection}/items/{window}.parquet (or .ndjson).
    Export {
        /// stac-geoparquet (`geoparquet`) or one item JSON a line (`ndjson`).
        #[arg(long, value_enum, default_value = "geoparquet")]
        format: ExportFormat,
        /// A folder, or an object store URL (`file://`, `s3://`, `gs://`, `az://`; options from
        /// the config file's `[object_store]`).
        dest: String,
    },
}

/// The file format of `export`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Geoparquet,
    Ndjson,
}

fn main() -> ExitCode {
    // A .env file (EDS lets users download one) fills variables that are not already set.
    let _ = dotenvy::dotenv();
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage(&error),
    };
    let progress =
        matches!(cli.command, Command::Run { .. }) && LogFormat::shows_progress(cli.log_format);
    stac_sync::ops::telemetry::init(cli.log_format, progress);
    cli.overrides.env = EnvVars::from_env();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return Exit::Internal.into();
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(exit) => exit.into(),
        Err(error) => {
            eprintln!("error: {error}");
            error.exit().into()
        }
    }
}

/// `--help` and `--version` exit 0; a usage error is a configuration error like any other
/// (exit 3: exit 2 means a partial run).
fn usage(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    match error.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            Exit::Success.into()
        }
        _ => Exit::Config.into(),
    }
}

/// SIGTERM (Kubernetes eviction, systemd stop) or Ctrl-C cancels `stop`: the run stops
/// starting pages, commits what it fetched, records itself and exits 143.
fn stop_on_signals(stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = terminate => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::warn!("termination requested: committing fetched pages, then stopping");
        stop.cancel();
    });
}

/// The commands that read or set up the database alone: `status`, `changes`, `migrate`.
/// `collections`: the `--collection` flags given (for `export`).
async fn database_command(
    command: Command,
    config: &DatabaseConfig,
    collections: &[String],
) -> Result<Exit, Error> {
    let db =
        stac_sync::mirror::db::Database::connect_as(&config.database_url, config.database_format)
            .await?;
    match command {
        Command::Status { json, runs } => {
            let status = stac_sync::ops::status::read(&db, runs).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                print!("{}", status.render());
            }
        }
        Command::Changes { since, max, json } => {
            for change in db.changes(since, max).await? {
                if json {
                    println!("{}", serde_json::to_string(&change).unwrap_or_default());
                } else {
                    println!(
                        "{}\t{}\t{}\t{}/{}",
                        change.seq, change.at, change.change, change.collection, change.id
                    );
                }
            }
        }
        Command::Migrate => db.migrate().await?,
        Command::Export { format, dest } => {
            let format = match format {
                ExportFormat::Geoparquet => snapshot::Format::Geoparquet,
                ExportFormat::Ndjson => snapshot::Format::Ndjson,
            };
            let url = if dest.contains("://") {
                dest
            } else {
                format!("file://{dest}")
            };
            let sink = ObjectSink::from_url(&url, &config.object_store_options)?;
            let (windows, items) =
                snapshot::export(&db, &sink, collections, config.snapshot_window, format).await?;
            eprintln!("exported {items} items in {windows} files to {url}");
        }
        other => {
            return Err(Error::Internal(format!(
                "{other:?} is not a database command"
            )));
        }
    }
    Ok(Exit::Success)
}

async fn execute(cli: Cli) -> Result<Exit, Error> {
    // The database's commands need no STAC API: a consumer of the change feed may know only the
    // database's URL.
    let database_only = matches!(
        cli.command,
        Command::Status { .. }
            | Command::Changes { .. }
            | Command::Migrate
            | Command::Export { .. }
    );
    if database_only {
        let config = DatabaseConfig::load(&cli.overrides)?;
        return database_command(cli.command, &config, &cli.overrides.collections).await;
    }
    let config = Config::load(&cli.overrides)?;
    match cli.command {
        Command::Run {
            no_migrate,
            reconcile,
            worker,
        } => {
            let options = RunOptions {
                migrate: !no_migrate,
                reconcile,
                worker,
                progress: LogFormat::shows_progress(cli.log_format),
                ..RunOptions::default()
            };
            stop_on_signals(options.stop.clone());
            let summary = run::run(&config, options).await?;
            let reports: Vec<_> = summary.jobs.iter().collect();
            stac_sync::ops::metrics::write_configured(&config, &reports);
            stac_sync::ops::metrics::push_configured(&config, &reports).await;
            for job in &summary.jobs {
                if let Some(error) = &job.error {
                    eprintln!("error: job {}: {error}", job.job);
                }
            }
            Ok(summary.exit())
        }
        Command::Daemon => {
            let options = RunOptions::default();
            stop_on_signals(options.stop.clone());
            let wall = std::sync::Arc::new(stac_sync::clock::SystemWallClock);
            let fired = stac_sync::ops::daemon::daemon(&config, options, wall).await?;
            let interrupted = fired
                .iter()
                .any(|f| matches!(f.report.error, Some(Error::Stopped)));
            Ok(if interrupted {
                Exit::Terminated
            } else {
                Exit::Success
            })
        }
        Command::Check { json } => {
            let report =
                stac_sync::ops::check::check(&config, stac_sync::clock::MonotonicClock::shared())
                    .await;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.render());
            }
            Ok(report.exit())
        }
        other => Err(Error::Internal(format!(
            "{other:?} is a database command, run above"
        ))),
    }
}
