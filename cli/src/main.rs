//! `keel`: one binary, one subcommand per service or tool. `main` only parses, reads settings,
//! starts telemetry and hands the command to [`commands::run`].

use clap::Parser;
use keel_core::Settings;

mod args;
mod audit;
mod commands;
mod dlq;
mod ops;
mod rebuild;
mod topics;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keel: configuration error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    keel_core::telemetry::init(&commands::service_name(&cli.command));
    let result = commands::run(cli.command, &settings).await;
    keel_core::telemetry::shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "keel failed");
            eprintln!("keel: {e:#}");
            if e.is::<ops::GroupBusy>() {
                std::process::ExitCode::from(3)
            } else if e.is::<audit::AuditFailed>() {
                std::process::ExitCode::from(4)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
