//! `keel`: one binary, one subcommand per service or tool. `main` only parses, reads settings,
//! starts telemetry, hands the command to [`commands::run`] and exits with its [`Failure`]'s
//! code.

use std::process::ExitCode;

use clap::Parser;
use keel_core::Settings;

use crate::failure::Failure;

mod args;
mod audit;
mod commands;
mod dlq;
mod failure;
mod ops;
mod rebuild;
mod topics;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return exit(Err(Failure::Config(e))),
    };
    keel_core::telemetry::init(&commands::service_name(&cli.command));
    let result = commands::run(cli.command, &settings).await;
    keel_core::telemetry::shutdown();
    exit(result)
}

/// Reports a failure on stderr (and in the log, once telemetry runs) and gives its exit code.
fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "keel failed");
            eprintln!("keel: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}
