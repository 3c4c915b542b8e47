//! The limit each group is measured against (issue 23, target 2): the group's effect on a
//! backlog written by hand as set-based SQL, a handful of statements per batch of
//! [`BATCH`] events through `UNNEST`, run with sqlx on one connection without Kafka.
//!
//! Everything that is not a statement is done before the clock starts: the events are
//! decoded, each batch's arrays are built and the outcome events the inventory group publishes
//! are encoded. What is timed is only what PostgreSQL (and, for cache invalidation, Redis) must
//! do for the batch: the dedupe rows, the effect's rows, the commit. Nothing is read back and
//! nothing is checked; the events are taken to be new and in order (the bench's backlog is
//! `OrderCreated` events of distinct orders, stock enough for all of them), which is what keel's
//! groups cannot assume and the reason they may be slower.

use std::collections::BTreeMap;
use std::time::Instant;

use keel_schemas::{Event, OrderCreated};
use sqlx::PgPool;
use uuid::Uuid;

use crate::bench::{Bench, rate};

/// Events per transaction, as the target has it.
pub(crate) const BATCH: usize = 1000;

/// Events per second the hand-written SQL applies `events` (offsets from 0 in partition 0 of
/// `topic`) at, as group `group` (its dedupe rows are written under `dedupe_as`).
pub(crate) async fn set_based(
    bench: &Bench,
    group: &str,
    dedupe_as: &str,
    topic: &str,
    outcomes_topic: &str,
    events: &[Event],
) -> anyhow::Result<f64> {
    let created: Vec<&OrderCreated> = events
        .iter()
        .map(|e| match e {
            Event::OrderCreated(o) => Ok(o),
            other => Err(anyhow::anyhow!(
                "the set-based baseline takes OrderCreated events, not {}",
                other.name()
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    let batches: Vec<Batch> = created
        .chunks(BATCH)
        .enumerate()
        .map(|(i, orders)| Batch::new(orders, (i * BATCH) as i64))
        .collect::<anyhow::Result<_>>()?;
    let mut conn = bench.pool.acquire().await?;
    let started;
    match group {
        "inventory" => {
            let bodies: Vec<Outcomes> = created
                .chunks(BATCH)
                .map(Outcomes::new)
                .collect::<anyhow::Result<_>>()?;
            // The contract's row, as the first outcome a group ever publishes leaves it.
            for o in &bodies {
                sqlx::query(
                    "INSERT INTO outbox.schemas (fingerprint, record, schema) VALUES ($1, $2, $3)
                     ON CONFLICT (fingerprint) DO NOTHING",
                )
                .bind(o.fingerprint)
                .bind(&o.record)
                .bind(&o.schema)
                .execute(&mut *conn)
                .await?;
            }
            started = Instant::now();
            for (batch, outcomes) in batches.iter().zip(&bodies) {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                batch.dedupe(&mut tx, dedupe_as, topic).await?;
                sqlx::query(
                    "INSERT INTO inventory.reservations (order_id, status)
                     SELECT id, 'reserved' FROM UNNEST($1::uuid[]) AS n (id)",
                )
                .bind(&batch.orders)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO inventory.reservation_lines (order_id, sku, quantity)
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int4[])",
                )
                .bind(&batch.held.0)
                .bind(&batch.held.1)
                .bind(&batch.held.2)
                .execute(&mut *tx)
                .await?;
                let held = sqlx::query(
                    "UPDATE inventory.stock s SET reserved = s.reserved + w.quantity
                       FROM UNNEST($1::text[], $2::int4[]) AS w (sku, quantity)
                      WHERE s.sku = w.sku AND s.on_hand - s.reserved >= w.quantity",
                )
                .bind(&batch.per_sku.0)
                .bind(&batch.per_sku.1)
                .execute(&mut *tx)
                .await?;
                // The handler would reject the orders it cannot hold; this baseline only holds.
                anyhow::ensure!(
                    held.rows_affected() == batch.per_sku.0.len() as u64,
                    "the set-based baseline ran out of stock: reset inventory.stock or a smaller --backlog"
                );
                sqlx::query(
                    "INSERT INTO outbox.events
                         (topic, message_key, event_type, event_id, payload, headers, schema_fingerprint, body)
                     SELECT $1, k, $2, i, p, '{}'::jsonb, $3, b
                       FROM UNNEST($4::text[], $5::uuid[], $6::jsonb[], $7::bytea[]) AS e (k, i, p, b)",
                )
                .bind(outcomes_topic)
                .bind(&outcomes.record)
                .bind(outcomes.fingerprint)
                .bind(&outcomes.keys)
                .bind(&outcomes.ids)
                .bind(&outcomes.payloads)
                .bind(&outcomes.bodies)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
        }
        "analytics" => {
            started = Instant::now();
            for batch in &batches {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                batch.dedupe(&mut tx, dedupe_as, topic).await?;
                sqlx::query(
                    "INSERT INTO analytics.orders (order_id, customer_id, currency, total_minor, created_at)
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::timestamptz[])
                     ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id,
                         currency = EXCLUDED.currency, total_minor = EXCLUDED.total_minor,
                         created_at = EXCLUDED.created_at",
                )
                .bind(&batch.orders)
                .bind(&batch.facts.0)
                .bind(&batch.facts.1)
                .bind(&batch.facts.2)
                .bind(&batch.facts.3)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO analytics.order_lines (order_id, line_no, sku, quantity, unit_price_minor)
                     SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::int4[], $5::int8[])
                     ON CONFLICT (order_id, line_no) DO UPDATE SET sku = EXCLUDED.sku,
                         quantity = EXCLUDED.quantity, unit_price_minor = EXCLUDED.unit_price_minor",
                )
                .bind(&batch.lines.order)
                .bind(&batch.lines.line_no)
                .bind(&batch.lines.sku)
                .bind(&batch.lines.quantity)
                .bind(&batch.lines.unit_price)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
        }
        "cache-invalidation" => {
            let redis = redis::Client::open(bench.keel.cache.require_redis()?)?;
            let mut cache = redis.get_multiplexed_async_connection().await?;
            let ttl_ms = bench.keel.cache.ttl.as_millis() as u64;
            started = Instant::now();
            for batch in &batches {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                batch.dedupe(&mut tx, dedupe_as, topic).await?;
                // A tombstone per order in the cache's own shape (a hash `{v: version}`, see
                // keel_core::cache), written unconditionally: the group's script also compares
                // versions, so this is a lower bound on its Redis work.
                let mut pipe = redis::pipe();
                for (order, version) in batch.orders.iter().zip(&batch.versions) {
                    let key = keel_core::cache::key(*order);
                    pipe.cmd("DEL").arg(&key).ignore();
                    pipe.cmd("HSET").arg(&key).arg("v").arg(*version).ignore();
                    pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
                }
                pipe.query_async::<()>(&mut cache).await?;
                tx.commit().await?;
            }
        }
        other => anyhow::bail!("{other}: no set-based baseline for this group"),
    }
    let took = started.elapsed();
    drop(conn);
    clear_dedupe(&bench.pool, dedupe_as).await?;
    Ok(rate(events.len() as f64, took))
}

/// Removes the dedupe rows the baseline wrote, so the group's own run starts from none.
async fn clear_dedupe(pool: &PgPool, group: &str) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM consumers.processed_events WHERE group_id = $1")
        .bind(group)
        .execute(pool)
        .await?;
    Ok(())
}

/// One batch's arrays, built before the clock starts.
struct Batch {
    event_ids: Vec<Uuid>,
    offsets: Vec<i64>,
    orders: Vec<Uuid>,
    versions: Vec<i32>,
    /// Customer, currency, total, creation time per order.
    facts: (
        Vec<String>,
        Vec<String>,
        Vec<i64>,
        Vec<chrono::DateTime<chrono::Utc>>,
    ),
    lines: Lines,
    /// Order, SKU, quantity per SKU of each order.
    held: (Vec<Uuid>, Vec<String>, Vec<i32>),
    /// The batch's quantity per SKU, in SKU order.
    per_sku: (Vec<String>, Vec<i32>),
}

/// Every line of a batch's orders, column by column.
#[derive(Default)]
struct Lines {
    order: Vec<Uuid>,
    line_no: Vec<i32>,
    sku: Vec<String>,
    quantity: Vec<i32>,
    unit_price: Vec<i64>,
}

impl Batch {
    fn new(orders: &[&OrderCreated], first_offset: i64) -> anyhow::Result<Self> {
        let mut b = Batch {
            event_ids: Vec::with_capacity(orders.len()),
            offsets: Vec::with_capacity(orders.len()),
            orders: Vec::with_capacity(orders.len()),
            versions: Vec::with_capacity(orders.len()),
            facts: Default::default(),
            lines: Default::default(),
            held: Default::default(),
            per_sku: Default::default(),
        };
        let mut per_sku: BTreeMap<&str, i32> = BTreeMap::new();
        for (i, o) in orders.iter().enumerate() {
            b.event_ids.push(o.event_id);
            b.offsets.push(first_offset + i as i64);
            b.orders.push(o.order_id);
            b.versions.push(o.order_version);
            b.facts.0.push(o.customer.id.clone());
            b.facts.1.push(o.currency.clone());
            b.facts.2.push(o.total_minor);
            b.facts.3.push(
                chrono::DateTime::from_timestamp_millis(o.occurred_at)
                    .ok_or_else(|| anyhow::anyhow!("occurred_at {} out of range", o.occurred_at))?,
            );
            let mut held: BTreeMap<&str, i32> = BTreeMap::new();
            for (n, line) in o.lines.iter().enumerate() {
                b.lines.order.push(o.order_id);
                b.lines.line_no.push(n as i32);
                b.lines.sku.push(line.sku.clone());
                b.lines.quantity.push(line.quantity);
                b.lines.unit_price.push(line.unit_price_minor);
                *held.entry(&line.sku).or_default() += line.quantity;
                *per_sku.entry(&line.sku).or_default() += line.quantity;
            }
            for (sku, q) in held {
                b.held.0.push(o.order_id);
                b.held.1.push(sku.to_owned());
                b.held.2.push(q);
            }
        }
        for (sku, q) in per_sku {
            b.per_sku.0.push(sku.to_owned());
            b.per_sku.1.push(q);
        }
        Ok(b)
    }

    /// The batch's dedupe rows, as any exactly-once consumer must write them.
    async fn dedupe(
        &self,
        tx: &mut sqlx::PgConnection,
        group: &str,
        topic: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO consumers.processed_events (group_id, event_id, topic, kafka_partition, kafka_offset)
             SELECT $1, i, $2, 0, o FROM UNNEST($3::uuid[], $4::int8[]) AS e (i, o)
             ON CONFLICT DO NOTHING RETURNING event_id",
        )
        .bind(group)
        .bind(topic)
        .bind(&self.event_ids)
        .bind(&self.offsets)
        .fetch_all(tx)
        .await?;
        Ok(())
    }
}

/// The outcome events one inventory batch publishes, encoded under this build's contract.
struct Outcomes {
    record: String,
    schema: String,
    fingerprint: i64,
    keys: Vec<String>,
    ids: Vec<Uuid>,
    payloads: Vec<serde_json::Value>,
    bodies: Vec<Vec<u8>>,
}

impl Outcomes {
    fn new(orders: &[&OrderCreated]) -> anyhow::Result<Self> {
        let mut out = Outcomes {
            record: String::new(),
            schema: String::new(),
            fingerprint: 0,
            keys: Vec::with_capacity(orders.len()),
            ids: Vec::with_capacity(orders.len()),
            payloads: Vec::with_capacity(orders.len()),
            bodies: Vec::with_capacity(orders.len()),
        };
        for o in orders {
            let event = keel_consumers::inventory::reserved_outcome(o);
            let written = keel_schemas::write(&event).map_err(|e| anyhow::anyhow!(e))?;
            out.record = written.record.to_string();
            out.schema = written.schema.to_string();
            out.fingerprint = written.fingerprint;
            out.keys.push(o.order_id.to_string());
            out.ids.push(event.event_id());
            out.payloads.push(serde_json::to_value(&event)?);
            out.bodies.push(written.body);
        }
        Ok(out)
    }
}
