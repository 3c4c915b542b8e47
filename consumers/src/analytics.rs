//! The analytics group: a small warehouse in PostgreSQL schema `analytics`.
//!
//! Facts are upserted per order; every figure (`analytics.daily`, `analytics.units_per_sku`,
//! `analytics.conversion`) is a view over them. Applying an event writes the same values however
//! often it runs.
//!
//! # Rebuilding from history
//! `keel analytics rebuild` fills a fresh schema ([`REBUILD_SCHEMA`]) under its own group
//! ([`REBUILD_GROUP`]) while the live group goes on, then swaps it in with [`swap_in_rebuild`]:
//! in one transaction that holds the live facts against writes, it checks that every event the
//! live group applied (from the rebuild's starting offsets on) is in the rebuild too
//! ([`missing_from_rebuild`]), drops the live schema and renames the rebuild to `analytics`.
//! Readers see the old figures or the new ones, never a half-built state. The live group carries
//! on writing into the new tables; events it applies again were already in the rebuild, and
//! every write is an idempotent upsert.

use chrono::DateTime;
use keel_schemas::Event;
use sqlx::PgConnection;
use tracing::Instrument;

use crate::runtime::{Handler, HandlerError, Meta};
use crate::{Group, ORDER_EVENTS, Subscription};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/analytics");
pub const DB_SCHEMA: &str = "analytics";

/// The analytics group's entry in [`crate::GROUPS`].
pub static GROUP: Group = Group {
    name: "analytics",
    topics: |t| vec![t.orders.clone()],
    applies: |t| vec![(t.orders.clone(), ORDER_EVENTS.to_vec())],
    migrations: Some((DB_SCHEMA, &MIGRATOR)),
    run: |s, shutdown| {
        Box::pin(async move { crate::serve(&GROUP, Analytics::new(), &s, shutdown).await })
    },
};
/// The group and schema `keel analytics rebuild` fills before swapping it in (see the module doc).
pub const REBUILD_GROUP: &str = "analytics-rebuild";
pub const REBUILD_SCHEMA: &str = "analytics_rebuild";

pub struct Analytics {
    /// The upserts into the schema written to: [`DB_SCHEMA`], or [`REBUILD_SCHEMA`] while
    /// rebuilding.
    sql: Statements,
}

/// The upserts, written for one schema.
struct Statements {
    created: String,
    line: String,
    paid: String,
    cancelled: String,
    /// A batch's facts, one row per order ([`Facts`]), in one statement.
    orders: String,
    /// A batch's lines, one row per order and line number, in one statement.
    lines: String,
}

impl Statements {
    fn new(schema: &str) -> Self {
        Self {
            created: format!(
                "INSERT INTO {schema}.orders (order_id, customer_id, currency, total_minor, created_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id,
                     currency = EXCLUDED.currency, total_minor = EXCLUDED.total_minor,
                     created_at = EXCLUDED.created_at"
            ),
            line: format!(
                "INSERT INTO {schema}.order_lines (order_id, line_no, sku, quantity, unit_price_minor)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (order_id, line_no) DO UPDATE SET sku = EXCLUDED.sku,
                     quantity = EXCLUDED.quantity, unit_price_minor = EXCLUDED.unit_price_minor"
            ),
            paid: format!(
                "INSERT INTO {schema}.orders (order_id, customer_id, currency, paid_at, paid_amount_minor)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (order_id) DO UPDATE SET paid_at = EXCLUDED.paid_at,
                     paid_amount_minor = EXCLUDED.paid_amount_minor,
                     currency = coalesce({schema}.orders.currency, EXCLUDED.currency)"
            ),
            cancelled: format!(
                "INSERT INTO {schema}.orders (order_id, customer_id, cancelled_at)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (order_id) DO UPDATE SET cancelled_at = EXCLUDED.cancelled_at"
            ),
            // What the three upserts above leave, one after another, for the order's events of
            // the batch: a creation sets the customer and currency; otherwise the row keeps
            // its customer, and its currency unless it has none. Each fact the batch holds
            // replaces the row's; a merged row holds a creation exactly when created_at is set.
            orders: format!(
                "INSERT INTO {schema}.orders (order_id, customer_id, currency, total_minor, created_at,
                                              paid_at, paid_amount_minor, cancelled_at)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[],
                                      $5::timestamptz[], $6::timestamptz[], $7::bigint[],
                                      $8::timestamptz[])
                 ON CONFLICT (order_id) DO UPDATE SET
                     customer_id = CASE WHEN EXCLUDED.created_at IS NOT NULL THEN EXCLUDED.customer_id
                                        ELSE {schema}.orders.customer_id END,
                     currency = CASE WHEN EXCLUDED.created_at IS NOT NULL THEN EXCLUDED.currency
                                     ELSE coalesce({schema}.orders.currency, EXCLUDED.currency) END,
                     total_minor = coalesce(EXCLUDED.total_minor, {schema}.orders.total_minor),
                     created_at = coalesce(EXCLUDED.created_at, {schema}.orders.created_at),
                     paid_at = coalesce(EXCLUDED.paid_at, {schema}.orders.paid_at),
                     paid_amount_minor = coalesce(EXCLUDED.paid_amount_minor, {schema}.orders.paid_amount_minor),
                     cancelled_at = coalesce(EXCLUDED.cancelled_at, {schema}.orders.cancelled_at)"
            ),
            lines: format!(
                "INSERT INTO {schema}.order_lines (order_id, line_no, sku, quantity, unit_price_minor)
                 SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::int[], $5::bigint[])
                 ON CONFLICT (order_id, line_no) DO UPDATE SET sku = EXCLUDED.sku,
                     quantity = EXCLUDED.quantity, unit_price_minor = EXCLUDED.unit_price_minor"
            ),
        }
    }
}

impl Default for Analytics {
    fn default() -> Self {
        Self::new()
    }
}

impl Analytics {
    /// The live group, writing the warehouse dashboards read.
    pub fn new() -> Self {
        Self::writing(DB_SCHEMA)
    }

    /// The rebuild's group, writing the schema that replaces the warehouse when it is complete.
    pub fn rebuilder() -> Self {
        Self::writing(REBUILD_SCHEMA)
    }

    /// The rebuild's subscription: [`REBUILD_GROUP`], reading what the live group reads.
    pub fn rebuild_subscription(topics: &keel_core::settings::Topics) -> Subscription {
        Subscription::new(REBUILD_GROUP, (GROUP.topics)(topics))
    }

    fn writing(schema: &'static str) -> Self {
        Self {
            sql: Statements::new(schema),
        }
    }
}

/// Starts a rebuild afresh: an empty [`REBUILD_SCHEMA`] with the warehouse's migrations, and no
/// processed events for [`REBUILD_GROUP`]. The live schema is migrated too, so it can be swapped.
pub async fn prepare_rebuild(database_url: &str) -> anyhow::Result<()> {
    keel_core::db::migrate(database_url, DB_SCHEMA, &MIGRATOR).await?;
    let pool = keel_core::db::pool(database_url, 1).await?;
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {REBUILD_SCHEMA} CASCADE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM consumers.processed_events WHERE group_id = $1")
        .bind(REBUILD_GROUP)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    pool.close().await;
    keel_core::db::migrate(database_url, REBUILD_SCHEMA, &MIGRATOR).await
}

/// Events the live group applied, at or after the rebuild's starting offset of their partition
/// (`starts`: topic, partition, offset), that the rebuild has not applied (yet).
pub async fn missing_from_rebuild(
    conn: &mut PgConnection,
    starts: &[(String, i32, i64)],
) -> Result<i64, sqlx::Error> {
    let topics: Vec<&str> = starts.iter().map(|s| s.0.as_str()).collect();
    let partitions: Vec<i32> = starts.iter().map(|s| s.1).collect();
    let offsets: Vec<i64> = starts.iter().map(|s| s.2).collect();
    sqlx::query_scalar(
        "SELECT count(*) FROM consumers.processed_events live
           JOIN unnest($2::text[], $3::int[], $4::bigint[]) AS start (topic, kafka_partition, kafka_offset)
             ON start.topic = live.topic AND start.kafka_partition = live.kafka_partition
          WHERE live.group_id = $1 AND live.kafka_offset >= start.kafka_offset
            AND NOT EXISTS (SELECT 1 FROM consumers.processed_events r
                             WHERE r.group_id = $5 AND r.event_id = live.event_id)",
    )
    .bind(GROUP.name)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(REBUILD_GROUP)
    .fetch_one(conn)
    .await
}

/// Orders the live warehouse holds a fact of (the order, a line, its creation, payment or
/// cancellation) that the rebuild does not: what swapping it in would drop. A rebuild from a
/// time, or from a log whose start retention deleted, lacks the orders before it.
pub async fn lost_by_rebuild(conn: &mut PgConnection) -> Result<Vec<uuid::Uuid>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT l.order_id FROM {DB_SCHEMA}.orders l
           LEFT JOIN {REBUILD_SCHEMA}.orders r USING (order_id)
          WHERE r.order_id IS NULL
             OR (l.created_at IS NOT NULL AND r.created_at IS NULL)
             OR (l.paid_at IS NOT NULL AND r.paid_at IS NULL)
             OR (l.cancelled_at IS NOT NULL AND r.cancelled_at IS NULL)
             OR EXISTS (SELECT 1 FROM {DB_SCHEMA}.order_lines ll
                         WHERE ll.order_id = l.order_id
                           AND NOT EXISTS (SELECT 1 FROM {REBUILD_SCHEMA}.order_lines rl
                                            WHERE rl.order_id = ll.order_id AND rl.line_no = ll.line_no))
          ORDER BY l.order_id"
    ))
    .fetch_all(conn)
    .await
}

/// In the swap's transaction: holds the live facts against writes (readers go on) until the
/// transaction ends. The live group's next write waits here.
pub async fn hold_live_writes(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "LOCK TABLE {DB_SCHEMA}.orders, {DB_SCHEMA}.order_lines IN EXCLUSIVE MODE"
    ))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// In the swap's transaction, after [`hold_live_writes`] and with the rebuild's consumer
/// stopped: replaces the live schema with the rebuild and forgets the rebuild's processed events.
/// Fails (changing nothing) if the rebuild lacks an event the live group applied.
pub async fn swap_in_rebuild(
    tx: &mut PgConnection,
    starts: &[(String, i32, i64)],
) -> anyhow::Result<()> {
    let missing = missing_from_rebuild(&mut *tx, starts).await?;
    anyhow::ensure!(
        missing == 0,
        "the rebuild lacks {missing} event(s) the live group applied; not swapping"
    );
    for statement in [
        format!("DROP SCHEMA {DB_SCHEMA} CASCADE"),
        format!("ALTER SCHEMA {REBUILD_SCHEMA} RENAME TO {DB_SCHEMA}"),
    ] {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    sqlx::query("DELETE FROM consumers.processed_events WHERE group_id = $1")
        .bind(REBUILD_GROUP)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// One order's facts from a batch's events, merged in their order as the per-event upserts
/// would leave them (see [`Statements`]'s `orders`).
#[derive(Default)]
struct Fact {
    customer_id: Option<String>,
    currency: Option<String>,
    total_minor: Option<i64>,
    created_at: Option<DateTime<chrono::Utc>>,
    paid_at: Option<DateTime<chrono::Utc>>,
    paid_amount_minor: Option<i64>,
    cancelled_at: Option<DateTime<chrono::Utc>>,
}

/// A batch's facts and lines, each order's (and line's) once, in order id order.
#[derive(Default)]
struct Facts {
    orders: std::collections::BTreeMap<uuid::Uuid, Fact>,
    lines: std::collections::BTreeMap<(uuid::Uuid, i32), (String, i32, i64)>,
}

impl Facts {
    fn merge(&mut self, event: &Event) -> Result<(), HandlerError> {
        match event {
            Event::OrderCreated(e) => {
                let fact = self.orders.entry(e.order_id).or_default();
                fact.customer_id = Some(e.customer.id.clone());
                fact.currency = Some(e.currency.clone());
                fact.total_minor = Some(e.total_minor);
                fact.created_at = Some(at(e.occurred_at)?);
                for (i, line) in e.lines.iter().enumerate() {
                    self.lines.insert(
                        (e.order_id, i as i32),
                        (line.sku.clone(), line.quantity, line.unit_price_minor),
                    );
                }
            }
            Event::OrderPaid(e) => {
                let fact = self.orders.entry(e.order_id).or_default();
                // The first event of the order inserts the row with its customer; only a
                // creation changes it. A payment's currency fills in only a missing one.
                fact.customer_id
                    .get_or_insert_with(|| e.customer_id.clone());
                fact.currency.get_or_insert_with(|| e.currency.clone());
                fact.paid_at = Some(at(e.occurred_at)?);
                fact.paid_amount_minor = Some(e.amount_minor);
            }
            Event::OrderCancelled(e) => {
                let fact = self.orders.entry(e.order_id).or_default();
                fact.customer_id
                    .get_or_insert_with(|| e.customer_id.clone());
                fact.cancelled_at = Some(at(e.occurred_at)?);
            }
            _ => {}
        }
        Ok(())
    }

    async fn store(self, tx: &mut PgConnection, sql: &Statements) -> Result<(), HandlerError> {
        if self.orders.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(self.orders.len());
        let mut customers = Vec::with_capacity(self.orders.len());
        let mut currencies = Vec::with_capacity(self.orders.len());
        let mut totals = Vec::with_capacity(self.orders.len());
        let mut created = Vec::with_capacity(self.orders.len());
        let mut paid = Vec::with_capacity(self.orders.len());
        let mut amounts = Vec::with_capacity(self.orders.len());
        let mut cancelled = Vec::with_capacity(self.orders.len());
        for (id, f) in self.orders {
            ids.push(id);
            customers.push(f.customer_id);
            currencies.push(f.currency);
            totals.push(f.total_minor);
            created.push(f.created_at);
            paid.push(f.paid_at);
            amounts.push(f.paid_amount_minor);
            cancelled.push(f.cancelled_at);
        }
        sqlx::query(&sql.orders)
            .bind(&ids)
            .bind(&customers)
            .bind(&currencies)
            .bind(&totals)
            .bind(&created)
            .bind(&paid)
            .bind(&amounts)
            .bind(&cancelled)
            .execute(&mut *tx)
            .await?;
        if self.lines.is_empty() {
            return Ok(());
        }
        let mut orders = Vec::with_capacity(self.lines.len());
        let mut numbers = Vec::with_capacity(self.lines.len());
        let mut skus = Vec::with_capacity(self.lines.len());
        let mut quantities = Vec::with_capacity(self.lines.len());
        let mut prices = Vec::with_capacity(self.lines.len());
        for ((order, number), (sku, quantity, price)) in self.lines {
            orders.push(order);
            numbers.push(number);
            skus.push(sku);
            quantities.push(quantity);
            prices.push(price);
        }
        sqlx::query(&sql.lines)
            .bind(&orders)
            .bind(&numbers)
            .bind(&skus)
            .bind(&quantities)
            .bind(&prices)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

fn at(millis: i64) -> Result<DateTime<chrono::Utc>, HandlerError> {
    DateTime::from_timestamp_millis(millis)
        .ok_or_else(|| HandlerError::Permanent(format!("occurred_at {millis} is out of range")))
}

impl Handler for Analytics {
    fn wants(&self, event: &Event) -> bool {
        event.is_order_event()
    }

    /// Two statements a batch whatever its size (bench/README.md).
    fn batch_size(&self) -> usize {
        1000
    }

    /// Two statements for the whole batch: each order's events merged into one row of facts
    /// (and its lines), upserted as [`Handler::handle`] would leave them one by one.
    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: &[(&Event, &Meta)],
    ) -> Result<(), HandlerError> {
        // One record takes the statement-per-event path: the reference the batch path is
        // tested against.
        if let [(event, meta)] = events {
            return self
                .handle(tx, event, meta)
                .instrument(meta.span.clone())
                .await;
        }
        let mut facts = Facts::default();
        for (event, _) in events {
            facts.merge(event)?;
        }
        facts.store(tx, &self.sql).await
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        match event {
            Event::OrderCreated(e) => {
                sqlx::query(&self.sql.created)
                    .bind(e.order_id)
                    .bind(&e.customer.id)
                    .bind(&e.currency)
                    .bind(e.total_minor)
                    .bind(at(e.occurred_at)?)
                    .execute(&mut *tx)
                    .await?;
                for (i, line) in e.lines.iter().enumerate() {
                    sqlx::query(&self.sql.line)
                        .bind(e.order_id)
                        .bind(i as i32)
                        .bind(&line.sku)
                        .bind(line.quantity)
                        .bind(line.unit_price_minor)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            Event::OrderPaid(e) => {
                sqlx::query(&self.sql.paid)
                    .bind(e.order_id)
                    .bind(&e.customer_id)
                    .bind(&e.currency)
                    .bind(at(e.occurred_at)?)
                    .bind(e.amount_minor)
                    .execute(&mut *tx)
                    .await?;
            }
            Event::OrderCancelled(e) => {
                sqlx::query(&self.sql.cancelled)
                    .bind(e.order_id)
                    .bind(&e.customer_id)
                    .bind(at(e.occurred_at)?)
                    .execute(&mut *tx)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
