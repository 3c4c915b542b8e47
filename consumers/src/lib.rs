//! keel's consumers: one runtime, many groups.
//!
//! # The invariant
//! For every record, the runtime inserts `(group, event_id)` into `consumers.processed_events`
//! (`ON CONFLICT DO NOTHING`) and, only if that row is new, lets the group's [`Handler`] apply its
//! effect in the same PostgreSQL transaction (one transaction per batch of records already
//! fetched, see [`runtime`]). The record's offset is stored for commit only after that
//! transaction commits. A crash before the commit redoes the work; a
//! crash after it finds the row and skips. So delivery is at-least-once and the effect is
//! exactly-once.
//!
//! # Layout
//! - [`runtime`]: the consume → decode → transact → store-offset loop, shared by every group
//!   (its rooms are listed in its own doc).
//! - [`inventory`]: stock reservations per order; publishes its outcomes through the outbox.
//! - [`notification`]: one customer message per event, delivered after commit by a mailer.
//! - [`analytics`]: a rebuildable warehouse of orders, revenue, cancellations and units.
//! - [`cache_invalidation`]: keeps the order service's Redis cache fresh.
//! - [`GROUPS`]: the one list of groups, which `keel consume`, `keel lag`, `keel audit`, chaos
//!   and the bench all read. Adding a group is one [`Handler`] impl, its [`Group`] entry and one
//!   line there (see `consumers/README.md`).

pub mod analytics;
pub mod cache_invalidation;
pub mod inventory;
pub mod notification;
pub mod runtime;

use std::future::Future;
use std::pin::Pin;

use keel_core::Settings;
use keel_core::settings::Topics;
use keel_core::topics::DeadLetter;
use keel_schemas::events::Contract;
use keel_schemas::{OrderCancelled, OrderCreated, OrderPaid};
use tokio_util::sync::CancellationToken;

pub use runtime::{
    Consumer, Handler, HandlerError, Meta, Outcome, Subscription, dlq_topic, transact,
};

/// A group's run until shutdown, as [`Group::run`] returns it: awaited by `keel consume`'s main
/// task, so it need not be `Send` (and the compiler cannot prove it is, through sqlx's
/// migrations, for a future stored behind a function pointer).
pub type Running = Pin<Box<dyn Future<Output = anyhow::Result<()>>>>;

/// A topic a group reads and the event types (contract names) it applies from it.
pub type Applied = (String, Vec<&'static str>);

/// A consumer group keel runs: everything the tools need to know of it besides its effect.
#[derive(Debug)]
pub struct Group {
    /// The Kafka group id; also the process's name (`keel consume <name>`) and the group's label
    /// in dedupe rows, metrics and logs.
    pub name: &'static str,
    /// The topics it reads, as the settings name them.
    pub topics: fn(&Topics) -> Vec<String>,
    /// The event types it applies, per topic it reads: what `keel audit` expects it to have
    /// applied (or dead-lettered).
    pub applies: fn(&Topics) -> Vec<Applied>,
    /// Its own tables: their PostgreSQL schema and migrations (`None`: it has none).
    pub migrations: Option<(&'static str, &'static sqlx::migrate::Migrator)>,
    /// Runs it until `shutdown`: its migrations, its consumer, and whatever runs beside it.
    pub run: fn(Settings, CancellationToken) -> Running,
}

impl Group {
    /// The group's own subscription under `topics`' names.
    pub fn subscription(&self, topics: &Topics) -> Subscription {
        Subscription::new(self.name, (self.topics)(topics))
    }

    /// Its dead-letter topics, one per topic it reads.
    pub fn dead_letters(&self, topics: &Topics) -> Vec<DeadLetter> {
        self.subscription(topics).dead_letters()
    }
}

/// Every group's dead-letter topics, and those of the analytics rebuild (which reads as a group
/// of its own), as `keel topics create` declares them.
pub fn dead_letters(topics: &Topics) -> Vec<DeadLetter> {
    GROUPS
        .iter()
        .flat_map(|g| g.dead_letters(topics))
        .chain(analytics::Analytics::rebuild_subscription(topics).dead_letters())
        .collect()
}

/// The order service's events, which every group that follows orders applies.
pub const ORDER_EVENTS: &[&str] = &[OrderCreated::NAME, OrderPaid::NAME, OrderCancelled::NAME];

/// Every group `keel consume` can run, in the order the tools list them.
pub static GROUPS: &[&Group] = &[
    &inventory::GROUP,
    &notification::GROUP,
    &analytics::GROUP,
    &cache_invalidation::GROUP,
];

/// The group named `name`, or an error listing the known ones.
pub fn group(name: &str) -> anyhow::Result<&'static Group> {
    GROUPS
        .iter()
        .copied()
        .find(|g| g.name == name)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown consumer group {name:?}; known groups: {}",
                names().join(", ")
            )
        })
}

/// The names of [`GROUPS`].
pub fn names() -> Vec<&'static str> {
    GROUPS.iter().map(|g| g.name).collect()
}

/// Migrates and runs `group`'s consumer with `handler` until `shutdown`: what a [`Group::run`]
/// calls.
pub async fn serve<H: Handler>(
    group: &Group,
    handler: H,
    s: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    migrate(&s.database_url, group.migrations).await?;
    let pool = keel_core::db::pool(&s.database_url, 4).await?;
    let consumer = Consumer::new(group.subscription(&s.topics), handler, pool, s)?;
    let result = consumer.run(shutdown.clone()).await;
    // If the consumer failed, stop whatever runs beside it (the mailer) too.
    shutdown.cancel();
    result
}

/// Applies the runtime's migrations and those of every group.
pub async fn migrate_all(s: &Settings) -> anyhow::Result<()> {
    for group in GROUPS {
        migrate(&s.database_url, group.migrations).await?;
    }
    Ok(())
}

/// The runtime's migrations (schema [`DB_SCHEMA`]): the processed-events table.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/runtime");

/// The PostgreSQL schema the runtime owns.
pub const DB_SCHEMA: &str = "consumers";

/// Applies the runtime's migrations and a group's own (`migrations`: its schema and migrator).
pub async fn migrate(
    database_url: &str,
    migrations: Option<(&str, &'static sqlx::migrate::Migrator)>,
) -> anyhow::Result<()> {
    keel_core::db::migrate(database_url, DB_SCHEMA, &MIGRATOR).await?;
    if let Some((schema, migrator)) = migrations {
        keel_core::db::migrate(database_url, schema, migrator).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_has_its_own_name_and_reads_what_it_applies() {
        let topics = Settings::local().topics;
        let mut seen = std::collections::BTreeSet::new();
        for g in GROUPS {
            assert!(seen.insert(g.name), "{} is listed twice", g.name);
            assert_eq!(group(g.name).map(|found| found.name).ok(), Some(g.name));
            let reads = (g.topics)(&topics);
            for (topic, types) in (g.applies)(&topics) {
                assert!(
                    reads.contains(&topic),
                    "{} applies events of {topic} it does not read",
                    g.name
                );
                assert!(!types.is_empty());
            }
        }
        let repository = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.toml");
        let declared = keel_core::topics::load(&repository, &topics, &dead_letters(&topics))
            .expect("topics.toml declares what every group reads");
        for g in GROUPS {
            for topic in (g.topics)(&topics) {
                let dlq = dlq_topic(&topic, g.name);
                let spec = declared.iter().find(|s| s.name == dlq);
                assert!(spec.is_some(), "{dlq} is not declared");
            }
        }
        assert!(
            group("no-such-group")
                .unwrap_err()
                .to_string()
                .contains("inventory")
        );
    }
}
