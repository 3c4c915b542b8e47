//! `keel`: one binary, one subcommand per service or tool. `main` only parses, reads settings,
//! starts telemetry and hands a shutdown token to the service.

use clap::{Parser, Subcommand};
use keel_core::Settings;

mod commands;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "keel: an event-streaming backbone on Apache Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if needed and apply every component's migrations.
    Migrate,
    /// Run keel's Confluent-compatible schema registry (KEEL_REGISTRY_ADDR).
    Registry,
    /// Run the order service's HTTP API (KEEL_ORDER_SERVICE_ADDR).
    OrderService,
    /// Run the outbox relay: publish committed outbox rows to Kafka.
    Relay,
    /// Run a consumer group.
    Consume {
        /// The group: inventory, notification, analytics or cache-invalidation.
        group: String,
    },
    /// Manage topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Check, publish and register the Avro contracts.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Print every setting keel reads, its default and its current value.
    Settings,
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create keel's topics with their partition counts (existing ones are left alone).
    Create,
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Check every contract against its published versions, offline (exit 1 if one fails).
    Check {
        /// The contracts directory: avro/, published/, compatibility.json.
        #[arg(long, default_value = "schemas")]
        dir: std::path::PathBuf,
    },
    /// Record every changed, compatible contract as its next published version.
    Publish {
        #[arg(long, default_value = "schemas")]
        dir: std::path::PathBuf,
    },
    /// Register the published contracts with the registry (KEEL_SCHEMA_REGISTRY_URL), setting
    /// each subject's compatibility level. Idempotent.
    Register {
        #[arg(long, default_value = "schemas")]
        dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keel: configuration error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    keel_core::telemetry::init("keel");
    let result = match cli.command {
        Command::Migrate => commands::migrate(&settings).await,
        Command::Registry => commands::registry(&settings).await,
        Command::OrderService => commands::order_service(&settings).await,
        Command::Relay => commands::relay(&settings).await,
        Command::Consume { group } => commands::consume(&settings, &group).await,
        Command::Topics(TopicsCommand::Create) => commands::create_topics(&settings).await,
        Command::Settings => commands::print_settings(),
        Command::Schema(SchemaCommand::Check { dir }) => commands::schema_check(&dir),
        Command::Schema(SchemaCommand::Publish { dir }) => commands::schema_publish(&dir),
        Command::Schema(SchemaCommand::Register { dir }) => {
            commands::schema_register(&settings, &dir).await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "keel failed");
            eprintln!("keel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
