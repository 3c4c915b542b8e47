//! The inventory group: holds stock for created orders, releases it for cancelled ones, and
//! takes it out of stock when an order is paid.
//!
//! Events of one order can arrive out of order after a failure (a cancellation before the
//! creation); the reservation row makes every transition safe in any order: a cancellation with
//! no reservation records `released`, and a later creation then holds nothing.

use std::collections::BTreeMap;

use keel_schemas::{Event, OrderLine};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::runtime::{Handler, HandlerError, Meta};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/inventory");
pub const DB_SCHEMA: &str = "inventory";
pub const GROUP: &str = "inventory";

pub struct Inventory {
    /// The consumer group id: [`GROUP`] in production; tests use their own.
    pub group: String,
    pub orders_topic: String,
}

impl Inventory {
    pub fn new(orders_topic: &str) -> Self {
        Self {
            group: GROUP.to_owned(),
            orders_topic: orders_topic.to_owned(),
        }
    }
}

/// Quantities per SKU, in SKU order (the lock order, so concurrent consumers cannot deadlock).
fn quantities(lines: &[OrderLine]) -> BTreeMap<&str, i64> {
    let mut q = BTreeMap::new();
    for l in lines {
        *q.entry(l.sku.as_str()).or_insert(0) += i64::from(l.quantity);
    }
    q
}

async fn status(tx: &mut PgConnection, order_id: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM inventory.reservations WHERE order_id = $1 FOR UPDATE")
        .bind(order_id)
        .fetch_optional(tx)
        .await
}

async fn set_status(
    tx: &mut PgConnection,
    order_id: Uuid,
    status: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inventory.reservations (order_id, status) VALUES ($1, $2)
         ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, updated_at = now()",
    )
    .bind(order_id)
    .bind(status)
    .execute(tx)
    .await?;
    Ok(())
}

async fn held(tx: &mut PgConnection, order_id: Uuid) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT sku, quantity FROM inventory.reservation_lines WHERE order_id = $1 ORDER BY sku",
    )
    .bind(order_id)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("sku"), i64::from(r.get::<i32, _>("quantity"))))
        .collect())
}

impl Inventory {
    async fn reserve(
        &self,
        tx: &mut PgConnection,
        order_id: Uuid,
        lines: &[OrderLine],
    ) -> Result<(), HandlerError> {
        if status(tx, order_id).await?.is_some() {
            return Ok(()); // cancelled before we saw it, or already handled
        }
        let wanted = quantities(lines);
        let skus: Vec<&str> = wanted.keys().copied().collect();
        let available: BTreeMap<String, i64> = sqlx::query("SELECT sku, on_hand - reserved AS free FROM inventory.stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE")
            .bind(&skus)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| (r.get("sku"), i64::from(r.get::<i32, _>("free"))))
            .collect();
        let enough = wanted
            .iter()
            .all(|(sku, q)| available.get(*sku).is_some_and(|free| free >= q));
        if !enough {
            tracing::info!(%order_id, "Not enough stock; order rejected by inventory");
            return Ok(set_status(tx, order_id, "rejected").await?);
        }
        set_status(tx, order_id, "reserved").await?;
        for (sku, q) in &wanted {
            sqlx::query("UPDATE inventory.stock SET reserved = reserved + $2 WHERE sku = $1")
                .bind(sku)
                .bind(
                    i32::try_from(*q).map_err(|_| {
                        HandlerError::Permanent(format!("quantity of {sku} overflows"))
                    })?,
                )
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO inventory.reservation_lines (order_id, sku, quantity) VALUES ($1, $2, $3)")
                .bind(order_id)
                .bind(sku)
                .bind(*q as i32)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    /// `paid`: the held stock leaves (on_hand and reserved both drop); otherwise it is released.
    async fn settle(
        &self,
        tx: &mut PgConnection,
        order_id: Uuid,
        paid: bool,
    ) -> Result<(), HandlerError> {
        match status(tx, order_id).await?.as_deref() {
            Some("reserved") => {
                for (sku, q) in held(tx, order_id).await? {
                    let sql = if paid {
                        "UPDATE inventory.stock SET on_hand = on_hand - $2, reserved = reserved - $2 WHERE sku = $1"
                    } else {
                        "UPDATE inventory.stock SET reserved = reserved - $2 WHERE sku = $1"
                    };
                    sqlx::query(sql)
                        .bind(&sku)
                        .bind(q as i32)
                        .execute(&mut *tx)
                        .await?;
                }
                set_status(tx, order_id, if paid { "fulfilled" } else { "released" }).await?;
            }
            // Cancelled before its creation arrived: remember, so the creation holds nothing.
            None if !paid => set_status(tx, order_id, "released").await?,
            _ => {}
        }
        Ok(())
    }
}

impl Handler for Inventory {
    fn group(&self) -> &str {
        &self.group
    }

    fn topics(&self) -> Vec<String> {
        vec![self.orders_topic.clone()]
    }

    fn migrations(&self) -> Option<(&'static str, &'static sqlx::migrate::Migrator)> {
        Some((DB_SCHEMA, &MIGRATOR))
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        match event {
            Event::OrderCreated(e) => self.reserve(tx, e.order_id, &e.lines).await,
            Event::OrderPaid(e) => self.settle(tx, e.order_id, true).await,
            Event::OrderCancelled(e) => self.settle(tx, e.order_id, false).await,
        }
    }
}
