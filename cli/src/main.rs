//! `keel`: one binary, one subcommand per service or tool. `main` only parses, reads settings,
//! starts telemetry and hands a shutdown token to the service.

use clap::{Parser, Subcommand};
use keel_core::Settings;

mod audit;
mod commands;
mod dlq;
mod ops;
mod rebuild;
mod topics;

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
    /// Per group and partition: committed offset, end offset, lag, and the age of the oldest
    /// record not yet consumed.
    Lag {
        /// One group; all of them when absent.
        group: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
    /// Move a stopped group's offsets so that it reads again from a point (its effects are
    /// idempotent: a replay changes no effect). Exit 3 if the group has live members.
    Replay {
        group: String,
        /// earliest, latest, an offset, or an RFC 3339 time (2026-11-25T08:00:00Z).
        #[arg(long)]
        from: ops::From,
        /// Only this topic of the group's.
        #[arg(long)]
        topic: Option<String>,
        /// Show the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Wait up to this many seconds for the group's members to leave.
        #[arg(long)]
        wait: Option<u64>,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
    /// Check, from the orders and their outbox events, that every group applied every event's
    /// effect exactly once (or dead-lettered it). Exit 4 if a check fails.
    Audit {
        /// Audit orders created since this RFC 3339 time [default: now minus
        /// KEEL_OUTBOX_RETENTION_SECS: the outbox still holds all their events].
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Every SKU's stock before the first order: checks on-hand stock too.
        #[arg(long)]
        opening_stock: Option<i32>,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
    /// A group's dead letters: list them, show them decoded, send them back.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// The analytics warehouse.
    #[command(subcommand)]
    Analytics(AnalyticsCommand),
    /// The outbox.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Check, publish and register the Avro contracts.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Print every setting keel reads, its default and its current value.
    Settings,
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create the topics declared in KEEL_TOPICS_FILE that are missing (existing ones are left
    /// alone: partitions only grow, and growing them moves keys).
    Create {
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
    /// Every topic of the cluster, with partitions and replicas.
    List {
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
    /// The declared topics as the cluster has them; exit 1 if one is missing or differs.
    Describe {
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Every dead letter of a group: where it came from, why, whether it was redriven.
    List {
        group: String,
        /// Only the dead letters of this topic of the group's.
        #[arg(long)]
        topic: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
    /// Dead letters in full: headers, key, the value decoded as JSON (or its bytes).
    Show {
        group: String,
        /// A record's id as `keel dlq list` prints it (<topic>:<offset>); repeatable.
        #[arg(long = "id", required = true)]
        ids: Vec<String>,
        #[arg(long, value_enum, default_value = "json")]
        output: ops::Output,
    },
    /// Republish dead letters to their original topic, marked with keel-redriven-from.
    Redrive {
        group: String,
        /// A record's id (<topic>:<offset>); repeatable.
        #[arg(long = "id", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every dead letter not redriven before.
        #[arg(long)]
        all: bool,
        /// Show what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
}

#[derive(Subcommand)]
enum AnalyticsCommand {
    /// Rebuild the warehouse from the topics into fresh tables while the live group runs, then
    /// swap them in atomically. Exit 3 if another rebuild is running.
    Rebuild {
        /// earliest, or an RFC 3339 time (2026-11-25T08:00:00Z): where the history starts.
        #[arg(long, default_value = "earliest")]
        from: ops::From,
        /// Give up (leaving the live warehouse untouched) after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Pending rows, the oldest pending row's age, the publish rate.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
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
    let service = match &cli.command {
        Command::OrderService => "keel-order-service".to_owned(),
        Command::Relay => "keel-relay".to_owned(),
        Command::Registry => "keel-registry".to_owned(),
        Command::Consume { group } => format!("keel-{group}"),
        _ => "keel".to_owned(),
    };
    keel_core::telemetry::init(&service);
    let result = match cli.command {
        Command::Migrate => commands::migrate(&settings).await,
        Command::Registry => commands::registry(&settings).await,
        Command::OrderService => commands::order_service(&settings).await,
        Command::Relay => commands::relay(&settings).await,
        Command::Consume { group } => commands::consume(&settings, &group).await,
        Command::Topics(TopicsCommand::Create { output }) => {
            topics::create(&settings, output).await
        }
        Command::Topics(TopicsCommand::List { output }) => topics::list(&settings, output),
        Command::Topics(TopicsCommand::Describe { output }) => {
            topics::describe(&settings, output).await
        }
        Command::Settings => commands::print_settings(),
        Command::Lag { group, output } => ops::lag(&settings, group.as_deref(), output),
        Command::Replay {
            group,
            from,
            topic,
            dry_run,
            wait,
            output,
        } => {
            ops::replay(
                &settings,
                &group,
                &from,
                topic.as_deref(),
                dry_run,
                wait.map(std::time::Duration::from_secs),
                output,
            )
            .await
        }
        Command::Audit {
            since,
            opening_stock,
            output,
        } => audit::audit(&settings, since, opening_stock, output).await,
        Command::Dlq(DlqCommand::List {
            group,
            topic,
            output,
        }) => dlq::list(&settings, &group, topic.as_deref(), output).await,
        Command::Dlq(DlqCommand::Show { group, ids, output }) => {
            dlq::show(&settings, &group, &ids, output).await
        }
        Command::Dlq(DlqCommand::Redrive {
            group,
            ids,
            all,
            dry_run,
            output,
        }) => dlq::redrive(&settings, &group, &ids, all, dry_run, output).await,
        Command::Analytics(AnalyticsCommand::Rebuild {
            from,
            timeout,
            output,
        }) => {
            rebuild::rebuild(
                &settings,
                &from,
                std::time::Duration::from_secs(timeout),
                output,
            )
            .await
        }
        Command::Outbox(OutboxCommand::Status { output }) => {
            ops::outbox_status(&settings, output).await
        }
        Command::Schema(SchemaCommand::Check { dir }) => commands::schema_check(&dir),
        Command::Schema(SchemaCommand::Publish { dir }) => commands::schema_publish(&dir),
        Command::Schema(SchemaCommand::Register { dir }) => {
            commands::schema_register(&settings, &dir).await
        }
    };
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
