//! The analytics group: a small warehouse in PostgreSQL schema `analytics`.
//!
//! Facts are upserted per order; every figure (`analytics.daily`, `analytics.units_per_sku`,
//! `analytics.conversion`) is a view over them. Applying an event writes the same values however
//! often it runs, so the warehouse is rebuilt from history by emptying the facts, forgetting the
//! group's processed events and replaying the topics from the beginning.

use chrono::DateTime;
use keel_schemas::Event;
use sqlx::PgConnection;

use crate::runtime::{Handler, HandlerError, Meta};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/analytics");
pub const DB_SCHEMA: &str = "analytics";
pub const GROUP: &str = "analytics";

pub struct Analytics {
    pub group: String,
    pub orders_topic: String,
}

impl Analytics {
    pub fn new(topics: &keel_core::settings::Topics) -> Self {
        Self {
            group: GROUP.to_owned(),
            orders_topic: topics.orders.clone(),
        }
    }
}

fn at(millis: i64) -> Result<DateTime<chrono::Utc>, HandlerError> {
    DateTime::from_timestamp_millis(millis)
        .ok_or_else(|| HandlerError::Permanent(format!("occurred_at {millis} is out of range")))
}

/// Empties the warehouse's facts and the group's processed events, so that a replay from the
/// beginning of the topics rebuilds it.
pub async fn reset(conn: &mut PgConnection, group: &str) -> Result<(), sqlx::Error> {
    sqlx::query("TRUNCATE analytics.order_lines, analytics.orders")
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM consumers.processed_events WHERE group_id = $1")
        .bind(group)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Handler for Analytics {
    fn group(&self) -> &str {
        &self.group
    }

    fn topics(&self) -> Vec<String> {
        vec![self.orders_topic.clone()]
    }

    fn migrations(&self) -> Option<(&'static str, &'static sqlx::migrate::Migrator)> {
        Some((DB_SCHEMA, &MIGRATOR))
    }

    fn wants(&self, event: &Event) -> bool {
        event.is_order_event()
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        match event {
            Event::OrderCreated(e) => {
                sqlx::query(
                    "INSERT INTO analytics.orders (order_id, customer_id, currency, total_minor, created_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id,
                         currency = EXCLUDED.currency, total_minor = EXCLUDED.total_minor,
                         created_at = EXCLUDED.created_at",
                )
                .bind(e.order_id)
                .bind(&e.customer.id)
                .bind(&e.currency)
                .bind(e.total_minor)
                .bind(at(e.occurred_at)?)
                .execute(&mut *tx)
                .await?;
                for (i, line) in e.lines.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO analytics.order_lines (order_id, line_no, sku, quantity, unit_price_minor)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (order_id, line_no) DO UPDATE SET sku = EXCLUDED.sku,
                             quantity = EXCLUDED.quantity, unit_price_minor = EXCLUDED.unit_price_minor",
                    )
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
                sqlx::query(
                    "INSERT INTO analytics.orders (order_id, customer_id, currency, paid_at, paid_amount_minor)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (order_id) DO UPDATE SET paid_at = EXCLUDED.paid_at,
                         paid_amount_minor = EXCLUDED.paid_amount_minor,
                         currency = coalesce(analytics.orders.currency, EXCLUDED.currency)",
                )
                .bind(e.order_id)
                .bind(&e.customer_id)
                .bind(&e.currency)
                .bind(at(e.occurred_at)?)
                .bind(e.amount_minor)
                .execute(&mut *tx)
                .await?;
            }
            Event::OrderCancelled(e) => {
                sqlx::query(
                    "INSERT INTO analytics.orders (order_id, customer_id, cancelled_at)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (order_id) DO UPDATE SET cancelled_at = EXCLUDED.cancelled_at",
                )
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
