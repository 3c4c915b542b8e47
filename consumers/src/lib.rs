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
//! - [`runtime`]: the consume → decode → transact → store-offset loop, shared by every group.
//! - [`inventory`]: stock reservations per order; publishes its outcomes through the outbox.
//! - [`notification`]: one customer message per event, delivered after commit by a mailer.
//! - [`analytics`]: a rebuildable warehouse of orders, revenue, cancellations and units.
//! - [`cache_invalidation`]: keeps the order service's Redis cache fresh.
//! - [`run_group`]: the registry of groups `keel consume <group>` knows. Adding a group is one
//!   [`Handler`] impl and one line there (see `consumers/README.md`).

pub mod analytics;
pub mod cache_invalidation;
pub mod inventory;
pub mod notification;
pub mod runtime;

use keel_core::Settings;
use tokio_util::sync::CancellationToken;

pub use runtime::{
    Consumer, ConsumerConfig, Handler, HandlerError, Meta, Outcome, dlq_topic, transact,
};

/// The groups `keel consume` can run.
pub const GROUPS: &[&str] = &[
    inventory::GROUP,
    notification::GROUP,
    analytics::GROUP,
    cache_invalidation::GROUP,
];

/// The topics `group` reads, for operations tools (lag, replay); `None` for an unknown group.
pub fn group_topics(group: &str, s: &Settings) -> Option<Vec<String>> {
    Some(match group {
        inventory::GROUP => inventory::Inventory::new(&s.topics).topics(),
        notification::GROUP => notification::Notification::new(&s.topics).topics(),
        analytics::GROUP => analytics::Analytics::new(&s.topics).topics(),
        cache_invalidation::GROUP => cache_invalidation::CacheInvalidation::new(s).ok()?.topics(),
        _ => return None,
    })
}

/// Runs consumer group `group` until `shutdown`: its migrations, then its consumer (and, for
/// notification, its mailer). The registry of groups: a new group is one line here.
pub async fn run_group(
    group: &str,
    s: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match group {
        inventory::GROUP => serve(inventory::Inventory::new(&s.topics), s, shutdown).await,
        analytics::GROUP => serve(analytics::Analytics::new(&s.topics), s, shutdown).await,
        cache_invalidation::GROUP => {
            serve(cache_invalidation::CacheInvalidation::new(s)?, s, shutdown).await
        }
        notification::GROUP => {
            let transport = notification::Transport::from_settings(&s.mail)?;
            let pool = keel_core::db::pool(&s.database_url, 2).await?;
            let mailer = notification::Mailer::new(pool, transport, &s.mail.from)?;
            let handler = notification::Notification::new(&s.topics);
            let (consumed, mailed) = tokio::join!(
                serve(handler, s, shutdown.clone()),
                mailer.run(shutdown.clone())
            );
            consumed.and(mailed)
        }
        other => anyhow::bail!(
            "unknown consumer group {other:?}; known groups: {}",
            GROUPS.join(", ")
        ),
    }
}

/// Migrates and runs one handler's consumer until `shutdown`.
pub async fn serve<H: Handler>(
    handler: H,
    s: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    migrate(&s.database_url, &handler).await?;
    let pool = keel_core::db::pool(&s.database_url, 4).await?;
    let consumer = Consumer::new(handler, pool, ConsumerConfig::from_settings(s))?;
    let result = consumer.run(shutdown.clone()).await;
    // If the consumer failed, stop whatever runs beside it (the mailer) too.
    shutdown.cancel();
    result
}

/// Applies the runtime's migrations and those of every group.
pub async fn migrate_all(s: &Settings) -> anyhow::Result<()> {
    migrate(&s.database_url, &inventory::Inventory::new(&s.topics)).await?;
    migrate(&s.database_url, &notification::Notification::new(&s.topics)).await?;
    migrate(&s.database_url, &analytics::Analytics::new(&s.topics)).await?;
    Ok(())
}

/// The runtime's migrations (schema [`DB_SCHEMA`]): the processed-events table.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/runtime");

/// The PostgreSQL schema the runtime owns.
pub const DB_SCHEMA: &str = "consumers";

/// Applies the runtime's migrations and those of `handler`'s group.
pub async fn migrate<H: Handler>(database_url: &str, handler: &H) -> anyhow::Result<()> {
    keel_core::db::migrate(database_url, DB_SCHEMA, &MIGRATOR).await?;
    if let Some((schema, migrator)) = handler.migrations() {
        keel_core::db::migrate(database_url, schema, migrator).await?;
    }
    Ok(())
}
