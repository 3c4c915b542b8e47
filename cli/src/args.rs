//! The command line: every subcommand, its flags and their help texts. `main` parses these;
//! [`crate::commands::run`] does what they say.

use clap::{Parser, Subcommand};

use crate::ops;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "keel: an event-streaming backbone on Apache Kafka"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
pub enum TopicsCommand {
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
pub enum DlqCommand {
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
pub enum AnalyticsCommand {
    /// Rebuild the warehouse from the topics into fresh tables while the live group runs, then
    /// swap them in atomically. Exit 3 if another rebuild is running.
    Rebuild {
        /// earliest, or an RFC 3339 time (2026-11-25T08:00:00Z): where the history starts.
        #[arg(long, default_value = "earliest")]
        from: ops::From,
        /// Give up (leaving the live warehouse untouched) after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Swap even if the live warehouse holds facts the rebuild does not (orders placed
        /// before --from, or before retention deleted the log's start, or facts written by
        /// hand): they are dropped. Without it, such a rebuild is refused, naming them.
        #[arg(long)]
        drop_missing: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
}

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Pending rows, the oldest pending row's age, the publish rate, and the rows set aside
    /// (with why) and the rows they hold back.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
    /// Put rows set aside back in line once their cause is fixed (the topic created, the write
    /// allowed, the schema accepted): the relay publishes them in id order, before the rows of
    /// their topic and key they held back.
    Retry {
        /// A set-aside row's id (`keel outbox status` lists them); repeatable.
        #[arg(long = "id", conflicts_with = "all", required_unless_present = "all")]
        ids: Vec<i64>,
        /// Every row set aside.
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
    /// Give up on rows set aside: they are never published (the audit reports them), and the
    /// rows of their topic and key they held back go on without them.
    Discard {
        /// A set-aside row's id; repeatable.
        #[arg(long = "id", required = true)]
        ids: Vec<i64>,
        #[arg(long, value_enum, default_value = "table")]
        output: ops::Output,
    },
}

#[derive(Subcommand)]
pub enum SchemaCommand {
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
        /// Give each version the id and version number it has in this other registry (which
        /// must hold them), putting each subject in IMPORT mode meanwhile: moves contracts
        /// between registries keeping their ids. May hold credentials (https://key:secret@host).
        #[arg(
            long,
            value_name = "URL",
            env = "KEEL_SCHEMA_IDS_FROM",
            hide_env_values = true
        )]
        ids_from: Option<String>,
    },
}
