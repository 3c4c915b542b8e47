//! The inventory group: holds stock for created orders, releases it for cancelled ones, and
//! takes it out of stock when an order is paid.
//!
//! Every reservation attempt publishes its outcome, `InventoryReserved` or `InventoryRejected`, to
//! the inventory topic through the same outbox library the order service uses, in the same
//! transaction as the stock change: a consumer is a producer too, with the same guarantees.
//!
//! Events of one order can arrive out of order (a dead letter redriven after the customer paid
//! or cancelled, a relay batch republished); the reservation row makes every transition safe in
//! any order and end where in-order delivery ends:
//! - a cancellation with no reservation records `released`, and a later creation then holds
//!   nothing (and publishes no outcome: the order never held stock);
//! - a payment with no reservation records `paid`, and the later creation takes the stock
//!   straight out of the warehouse (`fulfilled`, `InventoryReserved` published as in order) or,
//!   short of stock, is `rejected` as it would have been in order.

use std::collections::BTreeMap;

use keel_schemas::{Event, InventoryRejected, InventoryReserved, OrderLine, Shortage, StockLine};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::runtime::{Handler, HandlerError, Meta};
use crate::{Group, ORDER_EVENTS};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/inventory");
pub const DB_SCHEMA: &str = "inventory";

/// The inventory group's entry in [`crate::GROUPS`].
pub static GROUP: Group = Group {
    name: "inventory",
    topics: |t| vec![t.orders.clone()],
    applies: |t| vec![(t.orders.clone(), ORDER_EVENTS.to_vec())],
    migrations: Some((DB_SCHEMA, &MIGRATOR)),
    run: |s, shutdown| {
        Box::pin(async move { crate::serve(&GROUP, Inventory::new(&s.topics), &s, shutdown).await })
    },
};

pub struct Inventory {
    /// Where outcomes are published.
    pub inventory_topic: String,
}

impl Inventory {
    pub fn new(topics: &keel_core::settings::Topics) -> Self {
        Self {
            inventory_topic: topics.inventory.clone(),
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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

/// Records `status` for an order that has no reservation row yet. A row that appeared since it
/// was read (a creation applied concurrently, by a redrive racing the group) is not
/// overwritten: the attempt fails as transient and is retried on what is there now.
async fn remember_first(
    tx: &mut PgConnection,
    order_id: Uuid,
    status: &str,
) -> Result<(), HandlerError> {
    let inserted = sqlx::query(
        "INSERT INTO inventory.reservations (order_id, status) VALUES ($1, $2)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(status)
    .execute(tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(HandlerError::Transient(anyhow::anyhow!(
            "order {order_id}: its reservation changed concurrently; trying again"
        )));
    }
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
        order: &keel_schemas::OrderCreated,
        meta: &Meta,
    ) -> Result<(), HandlerError> {
        let order_id = order.order_id;
        // Claims the order as reserved (a shortage below turns it to rejected). A row already
        // there means paid before we saw the creation (the stock is taken out below), cancelled
        // before it (nothing to hold), or already handled.
        let paid_first = match status(tx, order_id).await?.as_deref() {
            None => {
                // A concurrent claim (a redrive racing the group) fails on the key: retried.
                sqlx::query(
                    "INSERT INTO inventory.reservations (order_id, status) VALUES ($1, 'reserved')",
                )
                .bind(order_id)
                .execute(&mut *tx)
                .await?;
                false
            }
            Some("paid") => {
                set_status(tx, order_id, "reserved").await?;
                true
            }
            Some(_) => return Ok(()),
        };
        let wanted = quantities(&order.lines);
        let skus: Vec<&str> = wanted.keys().copied().collect();
        let available: BTreeMap<String, i64> = sqlx::query("SELECT sku, on_hand - reserved AS free FROM inventory.stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE")
            .bind(&skus)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| (r.get("sku"), i64::from(r.get::<i32, _>("free"))))
            .collect();
        let clamp = |q: i64| i32::try_from(q).unwrap_or(i32::MAX);
        let shortages: Vec<Shortage> = wanted
            .iter()
            .filter_map(|(sku, q)| {
                let free = available.get(*sku).copied().unwrap_or(0);
                (free < *q).then(|| Shortage {
                    sku: (*sku).to_owned(),
                    requested: clamp(*q),
                    available: clamp(free.max(0)),
                })
            })
            .collect();
        let outcome = if shortages.is_empty() {
            let mut quantities = Vec::with_capacity(wanted.len());
            for (sku, q) in &wanted {
                quantities.push(i32::try_from(*q).map_err(|_| {
                    HandlerError::Permanent(format!("quantity of {sku} overflows"))
                })?);
            }
            // One statement each for every line of the order (the rows are locked above).
            sqlx::query(
                "UPDATE inventory.stock s SET reserved = s.reserved + w.quantity
                   FROM UNNEST($1::text[], $2::int4[]) AS w (sku, quantity) WHERE s.sku = w.sku",
            )
            .bind(&skus)
            .bind(&quantities)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO inventory.reservation_lines (order_id, sku, quantity)
                 SELECT $1, sku, quantity FROM UNNEST($2::text[], $3::int4[]) AS w (sku, quantity)",
            )
            .bind(order_id)
            .bind(&skus)
            .bind(&quantities)
            .execute(&mut *tx)
            .await?;
            if paid_first {
                self.settle(tx, order_id, true).await?;
            }
            Event::InventoryReserved(InventoryReserved {
                event_id: uuid::Uuid::now_v7(),
                occurred_at: now_millis(),
                order_id,
                customer_id: order.customer.id.clone(),
                lines: wanted
                    .iter()
                    .map(|(sku, q)| StockLine {
                        sku: (*sku).to_owned(),
                        quantity: clamp(*q),
                    })
                    .collect(),
            })
        } else {
            tracing::info!(%order_id, "Not enough stock; order rejected by inventory");
            set_status(tx, order_id, "rejected").await?;
            Event::InventoryRejected(InventoryRejected {
                event_id: uuid::Uuid::now_v7(),
                occurred_at: now_millis(),
                order_id,
                customer_id: order.customer.id.clone(),
                shortages,
            })
        };
        keel_outbox::enqueue(tx, &self.inventory_topic, &outcome, &meta.trace).await?;
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
            None if !paid => remember_first(tx, order_id, "released").await?,
            // Paid before its creation arrived: remember, so the creation takes the stock out.
            None => remember_first(tx, order_id, "paid").await?,
            _ => {}
        }
        Ok(())
    }
}

impl Handler for Inventory {
    fn wants(&self, event: &Event) -> bool {
        event.is_order_event()
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        meta: &Meta,
    ) -> Result<(), HandlerError> {
        match event {
            Event::OrderCreated(e) => self.reserve(tx, e, meta).await,
            Event::OrderPaid(e) => self.settle(tx, e.order_id, true).await,
            Event::OrderCancelled(e) => self.settle(tx, e.order_id, false).await,
            _ => Ok(()),
        }
    }
}
