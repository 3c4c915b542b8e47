//! The transactional outbox.
//!
//! A service never writes to Kafka directly. It calls [`enqueue`] inside the same PostgreSQL
//! transaction as its business change, so the change and its event commit or roll back together
//! (no dual writes). The [`relay`] publishes committed rows to Kafka and marks them.
//!
//! # Guarantees
//! - **Nothing is lost**: a row is marked published only after Kafka acknowledged it (`acks=all`),
//!   in the transaction that claimed it. A crash anywhere rolls the claim back and the rows are
//!   published again: duplicates are possible, loss is not. Consumers deduplicate on `event_id`.
//! - **Per-aggregate order**: rows are published in id order, keyed by aggregate id. Callers
//!   enqueue an aggregate's events while holding that aggregate's row lock, so for one aggregate
//!   id order is commit order. Relays publish one batch at a time under an advisory lock, so
//!   several relay instances never interleave.
//!
//! # Layout
//! - [`enqueue`]: the write side, used by producers (and by consumers that publish outcomes).
//! - [`relay`]: claim, encode, produce, await acknowledgement, mark.

pub mod relay;

use keel_core::telemetry::TraceHeaders;
use keel_schemas::Event;
use sqlx::PgConnection;

pub use relay::Relay;

/// The outbox's migrations, applied to PostgreSQL schema [`DB_SCHEMA`].
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL schema the outbox owns.
pub const DB_SCHEMA: &str = "outbox";

/// Records `event` for publication to `topic`, inside the caller's transaction.
///
/// `trace` is the W3C trace context of the work that produced the event; the relay sends it on
/// as Kafka headers so consumers join the same trace.
pub async fn enqueue(
    conn: &mut PgConnection,
    topic: &str,
    event: &Event,
    trace: &TraceHeaders,
) -> Result<i64, sqlx::Error> {
    let payload = serde_json::to_value(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let headers = serde_json::to_value(trace).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query_scalar(
        "INSERT INTO outbox.events (topic, message_key, event_type, event_id, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(topic)
    .bind(event.aggregate_id().to_string())
    .bind(event.name())
    .bind(event.event_id())
    .bind(payload)
    .bind(headers)
    .fetch_one(conn)
    .await
}

/// Rows not yet published (and not set aside as failed).
pub async fn pending(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox.events WHERE published_at IS NULL AND failed_at IS NULL",
    )
    .fetch_one(pool)
    .await
}
