//! keel's consumers: one runtime, many groups.
//!
//! # The invariant
//! For every record, the runtime opens one PostgreSQL transaction, inserts `(group, event_id)`
//! into `consumers.processed_events` (`ON CONFLICT DO NOTHING`) and, only if that row is new, lets
//! the group's [`Handler`] apply its effect in the same transaction. The record's offset is stored
//! for commit only after that transaction commits. A crash before the commit redoes the work; a
//! crash after it finds the row and skips. So delivery is at-least-once and the effect is
//! exactly-once.
//!
//! # Layout
//! - [`runtime`]: the consume → decode → transact → store-offset loop, shared by every group.
//! - [`inventory`]: stock reservations per order.

pub mod inventory;
pub mod runtime;

pub use runtime::{Consumer, ConsumerConfig, Handler, HandlerError, Meta, Outcome};

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
