//! The `stac-sync` binary: parses the command line, sets up logging, loads the config, calls
//! the library and maps the outcome to an exit code.

use clap::{Parser, Subcommand};
use stac_sync::config::{Config, EnvVars, Overrides};
use stac_sync::error::{Error, Exit};
use stac_sync::sync::{self, RunOptions};
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
    },
    /// Apply the database schema migrations.
    Migrate,
}

fn main() -> ExitCode {
    // A .env file (EDS lets users download one) fills variables that are not already set.
    let _ = dotenvy::dotenv();
    let mut cli = Cli::parse();
    stac_sync::telemetry::init();
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

async fn execute(cli: Cli) -> Result<Exit, Error> {
    let config = Config::load(&cli.overrides)?;
    match cli.command {
        Command::Run {
            no_migrate,
            reconcile,
        } => {
            let options = RunOptions {
                migrate: !no_migrate,
                reconcile,
                ..RunOptions::default()
            };
            stop_on_signals(options.stop.clone());
            let summary = sync::run(&config, options).await?;
            let exit = summary.exit();
            for job in &summary.jobs {
                if let Some(error) = &job.error {
                    eprintln!("error: job {}: {error}", job.job);
                }
            }
            Ok(exit)
        }
        Command::Migrate => {
            let db = stac_sync::db::Database::connect(&config.database_url).await?;
            db.migrate().await?;
            Ok(Exit::Success)
        }
    }
}
