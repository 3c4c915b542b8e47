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
//! - **The writer's contract travels with the event**: a row holds the event's Avro body under
//!   the writer build's contract and that contract's fingerprint (the schema itself in
//!   `outbox.schemas`). The relay frames the body with the registry id of that schema and sends
//!   it as written, so during a rolling deploy a relay of another build (older or newer
//!   contracts) publishes every event with every field its writer set, and consumers resolve it
//!   by Avro's rules as they resolve any record. The row's `payload` JSON is for people and SQL
//!   only; the relay reads it just for rows written before this format (no body).
//!
//! # Layout
//! - [`enqueue`]: the write side, used by producers (and by consumers that publish outcomes);
//!   [`enqueue_written`] for an event already written under a contract.
//! - [`relay`]: claim, frame (or encode a row of the older format), produce, await
//!   acknowledgement, mark.

pub mod relay;

use keel_core::telemetry::TraceHeaders;
use keel_schemas::{Event, Written};
use sqlx::PgConnection;
use uuid::Uuid;

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
    let written = keel_schemas::write(event).map_err(|e| sqlx::Error::Encode(e.into()))?;
    let payload = serde_json::to_value(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let outgoing = Outgoing {
        key: event.aggregate_id().to_string(),
        event_id: event.event_id(),
        written,
        payload,
    };
    enqueue_written(conn, topic, &outgoing, trace).await
}

/// [`enqueue`] for many events, in order, in one statement: one round trip however many there
/// are (a consumer group's batch publishes its outcomes this way), rows in the events' order.
pub async fn enqueue_batch(
    conn: &mut PgConnection,
    topic: &str,
    events: &[(&Event, &TraceHeaders)],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let n = events.len();
    let (mut keys, mut types, mut ids) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut payloads, mut headers, mut fingerprints, mut bodies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut contracts: std::collections::BTreeMap<i64, (String, String)> = Default::default();
    for (event, trace) in events {
        let written = keel_schemas::write(event).map_err(|e| sqlx::Error::Encode(e.into()))?;
        keys.push(event.aggregate_id().to_string());
        types.push(written.record.to_string());
        ids.push(event.event_id());
        payloads.push(serde_json::to_value(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?);
        headers.push(serde_json::to_value(trace).map_err(|e| sqlx::Error::Encode(Box::new(e)))?);
        fingerprints.push(written.fingerprint);
        contracts
            .entry(written.fingerprint)
            .or_insert_with(|| (written.record.to_string(), written.schema.to_string()));
        bodies.push(written.body);
    }
    let (contract_fps, (records, schemas)): (Vec<i64>, (Vec<String>, Vec<String>)) =
        contracts.into_iter().unzip();
    sqlx::query(
        "WITH contract AS (
             INSERT INTO outbox.schemas (fingerprint, record, schema)
             SELECT * FROM UNNEST($7::bigint[], $8::text[], $9::text[])
             ON CONFLICT (fingerprint) DO NOTHING
         )
         INSERT INTO outbox.events
             (topic, message_key, event_type, event_id, payload, headers, schema_fingerprint, body)
         SELECT $1, k, t, i, p, h, f, b
           FROM UNNEST($2::text[], $3::text[], $4::uuid[], $5::jsonb[], $6::jsonb[], $10::bigint[], $11::bytea[])
                WITH ORDINALITY AS e (k, t, i, p, h, f, b, n)
          ORDER BY n",
    )
    .bind(topic)
    .bind(&keys)
    .bind(&types)
    .bind(&ids)
    .bind(&payloads)
    .bind(&headers)
    .bind(&contract_fps)
    .bind(&records)
    .bind(&schemas)
    .bind(&fingerprints)
    .bind(&bodies)
    .execute(conn)
    .await?;
    Ok(())
}

/// An event as its writer wrote it: what [`enqueue_written`] stores.
pub struct Outgoing {
    /// The Kafka key: the aggregate's id.
    pub key: String,
    pub event_id: Uuid,
    /// The Avro body under the writer's contract, and that contract.
    pub written: Written,
    /// The event as JSON, for people and SQL (the relay does not read it).
    pub payload: serde_json::Value,
}

/// [`enqueue`] for an event already written under a contract (the writer's, whichever build
/// it is): what a rolling deploy's older or newer writers store.
pub async fn enqueue_written(
    conn: &mut PgConnection,
    topic: &str,
    event: &Outgoing,
    trace: &TraceHeaders,
) -> Result<i64, sqlx::Error> {
    let headers = serde_json::to_value(trace).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    // The contract is stored once (by fingerprint), in the same statement as the row.
    sqlx::query_scalar(
        "WITH contract AS (
             INSERT INTO outbox.schemas (fingerprint, record, schema) VALUES ($7, $3, $8)
             ON CONFLICT (fingerprint) DO NOTHING
         )
         INSERT INTO outbox.events
             (topic, message_key, event_type, event_id, payload, headers, schema_fingerprint, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $9) RETURNING id",
    )
    .bind(topic)
    .bind(&event.key)
    .bind(event.written.record.as_ref())
    .bind(event.event_id)
    .bind(&event.payload)
    .bind(headers)
    .bind(event.written.fingerprint)
    .bind(event.written.schema.as_ref())
    .bind(&event.written.body)
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
