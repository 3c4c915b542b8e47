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
use tracing::Instrument;
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

fn clamp(q: i64) -> i32 {
    i32::try_from(q).unwrap_or(i32::MAX)
}

/// The SKUs of `wanted` with less free stock than wanted (`free` of a SKU; 0 if not stocked).
fn shortages(wanted: &BTreeMap<&str, i64>, free: impl Fn(&str) -> i64) -> Vec<Shortage> {
    wanted
        .iter()
        .filter_map(|(sku, q)| {
            let free = free(sku);
            (free < *q).then(|| Shortage {
                sku: (*sku).to_owned(),
                requested: clamp(*q),
                available: clamp(free.max(0)),
            })
        })
        .collect()
}

/// The outcome published for an order whose stock is held.
fn reserved(order: &keel_schemas::OrderCreated, wanted: &BTreeMap<&str, i64>) -> Event {
    Event::InventoryReserved(InventoryReserved {
        event_id: uuid::Uuid::now_v7(),
        occurred_at: now_millis(),
        order_id: order.order_id,
        customer_id: order.customer.id.clone(),
        lines: wanted
            .iter()
            .map(|(sku, q)| StockLine {
                sku: (*sku).to_owned(),
                quantity: clamp(*q),
            })
            .collect(),
    })
}

/// The outcome the group publishes for `order` when it holds all its stock: what `make bench`'s
/// set-based limit encodes for each order, so that it writes what the group writes.
pub fn reserved_outcome(order: &keel_schemas::OrderCreated) -> Event {
    reserved(order, &quantities(&order.lines))
}

/// The outcome published for an order short of stock.
fn rejected(order: &keel_schemas::OrderCreated, shortages: Vec<Shortage>) -> Event {
    tracing::info!(order_id = %order.order_id, "Not enough stock; order rejected by inventory");
    Event::InventoryRejected(InventoryRejected {
        event_id: uuid::Uuid::now_v7(),
        occurred_at: now_millis(),
        order_id: order.order_id,
        customer_id: order.customer.id.clone(),
        shortages,
    })
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
        let shortages = shortages(&wanted, |sku| available.get(sku).copied().unwrap_or(0));
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
            reserved(order, &wanted)
        } else {
            set_status(tx, order_id, "rejected").await?;
            rejected(order, shortages)
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

/// A batch's orders and stock, locked and read once, changed in memory event by event exactly
/// as [`Inventory::reserve`] and [`Inventory::settle`] change them in SQL, and written back in
/// a few set-based statements.
#[derive(Default)]
struct Batch {
    /// Each order's status in its row (`None`: no row; a row [`Batch::load`] claimed holds the
    /// placeholder `reserved`) and now.
    orders: BTreeMap<Uuid, (Option<String>, Option<String>)>,
    /// The stock each order holds: read for orders reserved before the batch, added for those
    /// reserved in it.
    held: BTreeMap<Uuid, Vec<(String, i64)>>,
    /// Lines reserved in this batch, to insert.
    new_lines: Vec<(Uuid, String, i32)>,
    /// `(on_hand, reserved)` of each SKU the batch touches (absent: not stocked), and whether
    /// it changed.
    stock: BTreeMap<String, (i64, i64, bool)>,
}

impl Batch {
    /// Locks and reads what `events` touch: their orders in order-id order (claiming a row for
    /// each order that has none, as the per-record path claims its order before anything
    /// else), then their stock in SKU order. Both paths lock an order's row before any stock,
    /// so they cannot deadlock each other on stock. An order whose row appeared since it was
    /// read (a redrive racing the group) fails the batch as transient; its records are then
    /// applied one by one.
    async fn load(tx: &mut PgConnection, events: &[(&Event, &Meta)]) -> Result<Self, HandlerError> {
        let mut batch = Batch::default();
        let mut skus = std::collections::BTreeSet::new();
        for (event, _) in events {
            if let Some(order_id) = order_of(event) {
                batch.orders.insert(order_id, (None, None));
            }
            if let Event::OrderCreated(order) = event {
                skus.extend(order.lines.iter().map(|l| l.sku.clone()));
            }
        }
        let ids: Vec<Uuid> = batch.orders.keys().copied().collect();
        for row in sqlx::query(
            "SELECT order_id, status FROM inventory.reservations WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        {
            let status: String = row.get("status");
            batch
                .orders
                .insert(row.get("order_id"), (Some(status.clone()), Some(status)));
        }
        let absent: Vec<Uuid> = batch
            .orders
            .iter()
            .filter(|(_, (was, _))| was.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !absent.is_empty() {
            // A placeholder status; `store` writes the final one of each order that does not
            // end the batch reserved.
            let claimed = sqlx::query(
                "INSERT INTO inventory.reservations (order_id, status)
                 SELECT id, 'reserved' FROM UNNEST($1::uuid[]) AS n (id) ORDER BY id
                 ON CONFLICT (order_id) DO NOTHING",
            )
            .bind(&absent)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() != absent.len() as u64 {
                return Err(HandlerError::Transient(anyhow::anyhow!(
                    "a reservation of this batch changed concurrently; trying again"
                )));
            }
        }
        let reserved: Vec<Uuid> = batch
            .orders
            .iter()
            .filter(|(_, (was, _))| was.as_deref() == Some("reserved"))
            .map(|(id, _)| *id)
            .collect();
        let lines = if reserved.is_empty() {
            Vec::new()
        } else {
            sqlx::query(
                "SELECT order_id, sku, quantity FROM inventory.reservation_lines WHERE order_id = ANY($1) ORDER BY order_id, sku",
            )
            .bind(&reserved)
            .fetch_all(&mut *tx)
            .await?
        };
        for row in lines {
            let sku: String = row.get("sku");
            skus.insert(sku.clone());
            batch
                .held
                .entry(row.get("order_id"))
                .or_default()
                .push((sku, i64::from(row.get::<i32, _>("quantity"))));
        }
        // The claimed rows now hold the placeholder: `store` rewrites only those whose final
        // status differs from it (most of a backlog's orders end the batch reserved).
        for id in &absent {
            if let Some((was, _)) = batch.orders.get_mut(id) {
                *was = Some("reserved".to_owned());
            }
        }
        let skus: Vec<String> = skus.into_iter().collect();
        for row in sqlx::query(
            "SELECT sku, on_hand, reserved FROM inventory.stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
        )
        .bind(&skus)
        .fetch_all(&mut *tx)
        .await?
        {
            batch.stock.insert(
                row.get("sku"),
                (
                    i64::from(row.get::<i32, _>("on_hand")),
                    i64::from(row.get::<i32, _>("reserved")),
                    false,
                ),
            );
        }
        Ok(batch)
    }

    fn status(&self, order_id: Uuid) -> Option<&str> {
        self.orders
            .get(&order_id)
            .and_then(|(_, now)| now.as_deref())
    }

    fn set_status(&mut self, order_id: Uuid, status: &str) {
        self.orders.entry(order_id).or_default().1 = Some(status.to_owned());
    }

    fn change_stock(&mut self, sku: &str, on_hand: i64, reserved: i64) {
        if let Some((h, r, changed)) = self.stock.get_mut(sku) {
            *h += on_hand;
            *r += reserved;
            *changed = true;
        }
    }

    /// [`Inventory::reserve`], in memory: the outcome to publish, if any.
    fn reserve(
        &mut self,
        order: &keel_schemas::OrderCreated,
    ) -> Result<Option<Event>, HandlerError> {
        let order_id = order.order_id;
        let paid_first = match self.status(order_id) {
            None => false,
            Some("paid") => true,
            Some(_) => return Ok(None),
        };
        self.set_status(order_id, "reserved");
        let wanted = quantities(&order.lines);
        let shortages = shortages(&wanted, |sku| {
            self.stock.get(sku).map_or(0, |(h, r, _)| h - r)
        });
        if !shortages.is_empty() {
            self.set_status(order_id, "rejected");
            return Ok(Some(rejected(order, shortages)));
        }
        let mut lines = Vec::with_capacity(wanted.len());
        for (sku, q) in &wanted {
            let quantity = i32::try_from(*q)
                .map_err(|_| HandlerError::Permanent(format!("quantity of {sku} overflows")))?;
            self.change_stock(sku, 0, *q);
            self.new_lines.push((order_id, (*sku).to_owned(), quantity));
            lines.push(((*sku).to_owned(), *q));
        }
        self.held.insert(order_id, lines);
        if paid_first {
            self.settle(order_id, true)?;
        }
        Ok(Some(reserved(order, &wanted)))
    }

    /// [`Inventory::settle`], in memory.
    fn settle(&mut self, order_id: Uuid, paid: bool) -> Result<(), HandlerError> {
        match self.status(order_id) {
            Some("reserved") => {
                for (sku, q) in self.held.get(&order_id).cloned().unwrap_or_default() {
                    if paid {
                        self.change_stock(&sku, -q, -q);
                    } else {
                        self.change_stock(&sku, 0, -q);
                    }
                }
                self.set_status(order_id, if paid { "fulfilled" } else { "released" });
            }
            None => self.set_status(order_id, if paid { "paid" } else { "released" }),
            _ => {}
        }
        Ok(())
    }

    /// Writes what changed: reservations (the ones claimed in [`Batch::load`] whose final
    /// status is not the placeholder), new lines, changed stock.
    async fn store(self, tx: &mut PgConnection) -> Result<(), HandlerError> {
        let (mut ids, mut status) = (vec![], vec![]);
        for (id, (was, now)) in &self.orders {
            if let Some(now) = now
                && was.as_ref() != Some(now)
            {
                ids.push(*id);
                status.push(now.clone());
            }
        }
        if !ids.is_empty() {
            sqlx::query(
                "UPDATE inventory.reservations r SET status = w.status, updated_at = now()
                   FROM UNNEST($1::uuid[], $2::text[]) AS w (order_id, status) WHERE r.order_id = w.order_id",
            )
            .bind(&ids)
            .bind(&status)
            .execute(&mut *tx)
            .await?;
        }
        if !self.new_lines.is_empty() {
            let (orders, (skus, quantities)): (Vec<Uuid>, (Vec<String>, Vec<i32>)) = self
                .new_lines
                .into_iter()
                .map(|(o, s, q)| (o, (s, q)))
                .unzip();
            sqlx::query(
                "INSERT INTO inventory.reservation_lines (order_id, sku, quantity)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int4[])",
            )
            .bind(&orders)
            .bind(&skus)
            .bind(&quantities)
            .execute(&mut *tx)
            .await?;
        }
        let changed: Vec<(String, i64, i64)> = self
            .stock
            .into_iter()
            .filter(|(_, (_, _, changed))| *changed)
            .map(|(sku, (h, r, _))| (sku, h, r))
            .collect();
        if !changed.is_empty() {
            let mut skus = Vec::with_capacity(changed.len());
            let (mut on_hand, mut reserved) = (vec![], vec![]);
            for (sku, h, r) in changed {
                let fits = |q: i64| {
                    i32::try_from(q).map_err(|_| {
                        HandlerError::Permanent(format!("stock of {sku} overflows: {q}"))
                    })
                };
                on_hand.push(fits(h)?);
                reserved.push(fits(r)?);
                skus.push(sku);
            }
            sqlx::query(
                "UPDATE inventory.stock s SET on_hand = w.on_hand, reserved = w.reserved
                   FROM UNNEST($1::text[], $2::int4[], $3::int4[]) AS w (sku, on_hand, reserved)
                  WHERE s.sku = w.sku",
            )
            .bind(&skus)
            .bind(&on_hand)
            .bind(&reserved)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// The order an event of the inventory group is about.
fn order_of(event: &Event) -> Option<Uuid> {
    match event {
        Event::OrderCreated(e) => Some(e.order_id),
        Event::OrderPaid(e) => Some(e.order_id),
        Event::OrderCancelled(e) => Some(e.order_id),
        _ => None,
    }
}

impl Handler for Inventory {
    fn wants(&self, event: &Event) -> bool {
        event.is_order_event()
    }

    /// A batch costs a handful of set-based statements whatever its size, so larger batches
    /// share them among more records (bench/README.md, "Inventory's set-based batches").
    fn batch_size(&self) -> usize {
        1000
    }

    /// The batch's events applied in memory, in order, over its orders and stock read and
    /// locked once, then written back in a statement per table and one outbox insert: the same
    /// end state and outcomes as [`Handler::handle`] for each in turn (`tests/any_order.rs`
    /// compares the two), in a handful of round trips instead of five or six per event.
    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: &[(&Event, &Meta)],
    ) -> Result<(), HandlerError> {
        // One record (a quiet stream, or the record-by-record path after a failed batch) takes
        // the statement-per-step path: the reference the batch path is tested against.
        if let [(event, meta)] = events {
            return self
                .handle(tx, event, meta)
                .instrument(meta.span.clone())
                .await;
        }
        let mut batch = Batch::load(tx, events).await?;
        let mut outcomes = Vec::new();
        for (event, meta) in events {
            // Each event's logs under its record's span, as on the per-record path.
            let outcome = meta.span.in_scope(|| match event {
                Event::OrderCreated(e) => batch.reserve(e),
                Event::OrderPaid(e) => batch.settle(e.order_id, true).map(|()| None),
                Event::OrderCancelled(e) => batch.settle(e.order_id, false).map(|()| None),
                _ => Ok(None),
            })?;
            if let Some(outcome) = outcome {
                outcomes.push((outcome, &meta.trace));
            }
        }
        batch.store(tx).await?;
        let outcomes: Vec<(&Event, &keel_core::telemetry::TraceHeaders)> =
            outcomes.iter().map(|(e, t)| (e, *t)).collect();
        keel_outbox::enqueue_batch(tx, &self.inventory_topic, &outcomes).await?;
        Ok(())
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
