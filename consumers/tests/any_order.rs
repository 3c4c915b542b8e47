//! The same effects whatever order events arrive in: for random orders, any permutation of an
//! order's events, with duplicates mixed in and cut into random batches, ends where in-order
//! delivery ends, for every group. Each delivery goes through the runtime's own transaction
//! ([`transact`]: dedupe rows and effects) on real PostgreSQL and Redis.
//!
//! Each run of a case gets its own order id and SKUs, so runs never share state; states are
//! compared with those ids written out.
//!
//! The one documented exception: inventory, when an order's cancellation arrives before its
//! creation, holds nothing and publishes no outcome (`released`, no lines), where in-order
//! delivery holds the stock, publishes `InventoryReserved` (or `InventoryRejected`), then
//! releases it. The stock ends the same; `keel audit` accepts a released order without an
//! outcome (`inventory.outcomes`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};

use keel_consumers::analytics::Analytics;
use keel_consumers::cache_invalidation::CacheInvalidation;
use keel_consumers::inventory::Inventory;
use keel_consumers::notification::Notification;
use keel_consumers::{Handler, Meta, transact};
use keel_core::cache::OrderCache;
use keel_core::testkit::{TestDb, redis_url};
use keel_schemas::{
    Customer, Event, InventoryRejected, OrderCancelled, OrderCreated, OrderLine, OrderPaid,
    Shortage,
};
use proptest::prelude::*;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// What the generator draws: an order (lines over three SKUs, the stock there is of each), how it
/// ends, and how its events are delivered.
#[derive(Debug, Clone)]
struct Case {
    /// (SKU index, quantity) per line; an index twice is two lines of one SKU.
    lines: Vec<(usize, i32)>,
    stock: [i32; 3],
    end: End,
    /// Inventory's rejection reaches notification (it reads the inventory topic too).
    rejected: bool,
    /// The delivery: each event's index in [`Order::events`], any order, some twice.
    delivery: Vec<usize>,
    /// Where the delivery is cut into transactions (after the i-th record when `cuts[i]`).
    cuts: Vec<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Open,
    Paid,
    Cancelled,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((0usize..3, 1i32..=4), 1..=3),
        [0i32..=8, 0i32..=8, 0i32..=8],
        prop_oneof![Just(End::Open), Just(End::Paid), Just(End::Cancelled)],
        any::<bool>(),
    )
        .prop_flat_map(|(lines, stock, end, rejected)| {
            let n = 1 + usize::from(end != End::Open) + usize::from(rejected);
            let order: Vec<usize> = (0..n).collect();
            (
                Just((lines, stock, end, rejected)),
                Just(order).prop_shuffle(),
                prop::collection::vec(0..n, 0..=3),
                prop::collection::vec(0usize..=n, 0..=3),
                prop::collection::vec(any::<bool>(), n + 3),
            )
        })
        .prop_map(
            |((lines, stock, end, rejected), mut delivery, twice, at, cuts)| {
                // Redeliveries: an event again, somewhere.
                for (event, at) in twice
                    .into_iter()
                    .zip(at.into_iter().chain(std::iter::repeat(0)))
                {
                    delivery.insert(at.min(delivery.len()), event);
                }
                Case {
                    lines,
                    stock,
                    end,
                    rejected,
                    delivery,
                    cuts,
                }
            },
        )
}

/// One run's order: its ids and events, in the order they were written.
struct Order {
    id: Uuid,
    skus: [String; 3],
    events: Vec<Event>,
}

static RUN: AtomicI64 = AtomicI64::new(0);

impl Order {
    fn new(case: &Case) -> Self {
        let run = RUN.fetch_add(1, Ordering::SeqCst);
        let id = Uuid::now_v7();
        let skus = [0, 1, 2].map(|i| format!("ANY-{run}-{i}"));
        let lines: Vec<OrderLine> = case
            .lines
            .iter()
            .map(|(sku, quantity)| OrderLine {
                sku: skus[*sku].clone(),
                quantity: *quantity,
                unit_price_minor: 250,
            })
            .collect();
        let total_minor = lines
            .iter()
            .map(|l| i64::from(l.quantity) * l.unit_price_minor)
            .sum();
        let mut events = vec![Event::OrderCreated(OrderCreated {
            event_id: Uuid::now_v7(),
            occurred_at: 1_764_000_000_000,
            order_id: id,
            order_version: 1,
            customer: Customer {
                id: "guest".into(),
                email: format!("{}@example.com", id.simple()),
                name: "Ada".into(),
            },
            currency: "EUR".into(),
            lines: lines.clone(),
            total_minor,
            channel: "web".into(),
        })];
        match case.end {
            End::Open => {}
            End::Paid => events.push(Event::OrderPaid(OrderPaid {
                event_id: Uuid::now_v7(),
                occurred_at: 1_764_000_001_000,
                order_id: id,
                order_version: 2,
                customer_id: "guest".into(),
                currency: "EUR".into(),
                amount_minor: total_minor,
                payment_reference: "pay-1".into(),
            })),
            End::Cancelled => events.push(Event::OrderCancelled(OrderCancelled {
                event_id: Uuid::now_v7(),
                occurred_at: 1_764_000_001_000,
                order_id: id,
                order_version: 2,
                customer_id: "guest".into(),
                reason: Some("changed my mind".into()),
                lines,
            })),
        }
        if case.rejected {
            events.push(Event::InventoryRejected(InventoryRejected {
                event_id: Uuid::now_v7(),
                occurred_at: 1_764_000_000_500,
                order_id: id,
                customer_id: "guest".into(),
                shortages: vec![Shortage {
                    sku: skus[0].clone(),
                    requested: 9,
                    available: 0,
                }],
            }));
        }
        Self { id, skus, events }
    }

    /// `text` with this run's ids written out, so that two runs compare.
    fn general(&self, text: &str) -> String {
        let simple = self.id.simple().to_string();
        let mut text = text.replace(&self.id.to_string(), "<order>");
        text = text.replace(&simple, "<order>");
        text = text.replace(&simple[simple.len() - 8..], "<short>");
        for (i, sku) in self.skus.iter().enumerate() {
            text = text.replace(sku.as_str(), &format!("<sku{i}>"));
        }
        text
    }
}

/// An outbox payload (`{"Type": {fields}}`) without what differs between any two runs: the
/// outcome's own id and time.
fn without_own_id_and_time(payload: &mut serde_json::Value) {
    for event in payload
        .as_object_mut()
        .into_iter()
        .flat_map(|p| p.values_mut())
    {
        if let Some(fields) = event.as_object_mut() {
            fields.remove("event_id");
            fields.remove("occurred_at");
        }
    }
}

fn meta(offset: i64) -> Meta {
    Meta {
        topic: "orders".into(),
        partition: 0,
        offset,
        trace: Default::default(),
        span: tracing::Span::none(),
    }
}

struct World {
    _db: TestDb,
    pool: PgPool,
    cache: std::sync::Arc<OrderCache>,
}

impl World {
    async fn new() -> Self {
        let db = TestDb::new().await;
        for group in keel_consumers::GROUPS {
            keel_consumers::migrate(&db.url, group.migrations)
                .await
                .unwrap();
        }
        keel_core::db::migrate(&db.url, keel_outbox::DB_SCHEMA, &keel_outbox::MIGRATOR)
            .await
            .unwrap();
        let pool = db.pool().await;
        let cache = std::sync::Arc::new(
            OrderCache::new(&redis_url(), std::time::Duration::from_secs(600)).unwrap(),
        );
        Self {
            _db: db,
            pool,
            cache,
        }
    }

    /// A run of `case`: a fresh order, its SKUs stocked, its events delivered to `handler` in
    /// `delivery`'s order, cut into transactions after each record `cuts` marks.
    async fn run<H: Handler>(
        &self,
        group: &str,
        handler: &H,
        case: &Case,
        delivery: &[usize],
        cuts: &[bool],
    ) -> Order {
        let order = Order::new(case);
        for (sku, on_hand) in order.skus.iter().zip(case.stock) {
            sqlx::query("INSERT INTO inventory.stock (sku, on_hand) VALUES ($1, $2)")
                .bind(sku)
                .bind(on_hand)
                .execute(&self.pool)
                .await
                .unwrap();
        }
        let mut batch = Vec::new();
        for (i, &event) in delivery.iter().enumerate() {
            batch.push((order.events[event].clone(), meta(i as i64)));
            if cuts.get(i).copied().unwrap_or(true) || i + 1 == delivery.len() {
                transact(&self.pool, group, handler, &batch)
                    .await
                    .unwrap_or_else(|e| panic!("{group}: {e} delivering {delivery:?}"));
                batch.clear();
            }
        }
        order
    }

    /// Inventory's state of `order`: its reservation, the lines it holds, the stock of its SKUs
    /// and the outcomes it published.
    async fn inventory(&self, order: &Order) -> String {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM inventory.reservations WHERE order_id = $1")
                .bind(order.id)
                .fetch_optional(&self.pool)
                .await
                .unwrap();
        let lines: Vec<(String, i32)> = sqlx::query_as(
            "SELECT sku, quantity FROM inventory.reservation_lines WHERE order_id = $1 ORDER BY sku",
        )
        .bind(order.id)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let stock: Vec<(String, i32, i32)> = sqlx::query_as(
            "SELECT sku, on_hand, reserved FROM inventory.stock WHERE sku = ANY($1) ORDER BY sku",
        )
        .bind(order.skus.to_vec())
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let mut outcomes: Vec<(String, serde_json::Value)> = sqlx::query_as(
            "SELECT event_type, payload FROM outbox.events WHERE message_key = $1 ORDER BY event_type",
        )
        .bind(order.id.to_string())
        .fetch_all(&self.pool)
        .await
        .unwrap();
        // What differs between any two runs: the outcome's own id and time.
        for (_, payload) in &mut outcomes {
            without_own_id_and_time(payload);
        }
        order.general(&format!(
            "status {status:?}; holds {lines:?}; stock {stock:?}; published {outcomes:?}"
        ))
    }

    /// Notification's messages about `order`: kind, recipient, subject and body of each.
    async fn notification(&self, order: &Order) -> BTreeSet<String> {
        sqlx::query(
            "SELECT kind, recipient, subject, body FROM notification.messages WHERE order_id = $1",
        )
        .bind(order.id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            order.general(&format!(
                "{} to {:?}: {} / {}",
                r.get::<String, _>("kind"),
                r.get::<Option<String>, _>("recipient"),
                r.get::<String, _>("subject"),
                r.get::<String, _>("body"),
            ))
        })
        .collect()
    }

    /// Analytics' facts about `order`.
    async fn analytics(&self, order: &Order) -> String {
        let facts: Option<serde_json::Value> = sqlx::query_scalar(
            "SELECT to_jsonb(o) - 'order_id' FROM analytics.orders o WHERE order_id = $1",
        )
        .bind(order.id)
        .fetch_optional(&self.pool)
        .await
        .unwrap();
        let lines: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT to_jsonb(l) - 'order_id' FROM analytics.order_lines l WHERE order_id = $1
              ORDER BY line_no",
        )
        .bind(order.id)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        order.general(&format!("{facts:?} {lines:?}"))
    }

    /// The version the cache holds for `order` (a tombstone's, after invalidation).
    async fn cached(&self, order: &Order) -> Option<i32> {
        self.cache.versions(&[order.id]).await.unwrap()[0]
    }
}

/// Runs `case` through every group twice, in order and as drawn, and compares what each ends in.
async fn same_effects(world: &World, case: &Case) -> Result<(), TestCaseError> {
    let written: Vec<usize> = (0..case.delivery.iter().max().map_or(0, |m| m + 1)).collect();
    let all_cut = vec![true; written.len()];
    let topics = keel_core::settings::Topics {
        orders: "orders".into(),
        inventory: "inventory".into(),
    };
    let inventory = Inventory::new(&topics);
    let in_order = world
        .run("inventory", &inventory, case, &written, &all_cut)
        .await;
    let drawn = world
        .run("inventory", &inventory, case, &case.delivery, &case.cuts)
        .await;
    let cancelled_first = case.end == End::Cancelled
        && case.delivery.iter().position(|&e| e == 1) < case.delivery.iter().position(|&e| e == 0);
    if cancelled_first {
        // The documented exception (module doc): nothing held, nothing published, stock whole.
        let stock: Vec<(String, i32, i32)> = (0..3)
            .map(|i| (format!("<sku{i}>"), case.stock[i], 0))
            .collect();
        prop_assert_eq!(
            world.inventory(&drawn).await,
            format!("status Some(\"released\"); holds []; stock {stock:?}; published []"),
            "{:?}",
            case
        );
    } else {
        prop_assert_eq!(
            world.inventory(&in_order).await,
            world.inventory(&drawn).await,
            "inventory, {:?}",
            case
        );
    }

    let in_order = world
        .run("notification", &Notification, case, &written, &all_cut)
        .await;
    let drawn = world
        .run(
            "notification",
            &Notification,
            case,
            &case.delivery,
            &case.cuts,
        )
        .await;
    prop_assert_eq!(
        world.notification(&in_order).await,
        world.notification(&drawn).await,
        "notification, {:?}",
        case
    );

    let analytics = Analytics::new();
    let in_order = world
        .run("analytics", &analytics, case, &written, &all_cut)
        .await;
    let drawn = world
        .run("analytics", &analytics, case, &case.delivery, &case.cuts)
        .await;
    prop_assert_eq!(
        world.analytics(&in_order).await,
        world.analytics(&drawn).await,
        "analytics, {:?}",
        case
    );

    let cache = CacheInvalidation {
        cache: world.cache.clone(),
    };
    let in_order = world
        .run("cache-invalidation", &cache, case, &written, &all_cut)
        .await;
    let drawn = world
        .run(
            "cache-invalidation",
            &cache,
            case,
            &case.delivery,
            &case.cuts,
        )
        .await;
    prop_assert_eq!(
        world.cached(&in_order).await,
        world.cached(&drawn).await,
        "cache-invalidation, {:?}",
        case
    );
    Ok(())
}

#[test]
fn every_group_ends_in_the_same_state_whatever_order_its_events_arrive_in() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let world = runtime.block_on(World::new());
    let config = ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(case in case())| {
        runtime.block_on(same_effects(&world, &case))?;
    });
}

#[tokio::test]
async fn a_payment_before_its_creation_takes_the_stock_out_once_the_creation_arrives() {
    let world = World::new().await;
    let topics = keel_core::settings::Topics {
        orders: "orders".into(),
        inventory: "inventory".into(),
    };
    let case = Case {
        lines: vec![(0, 3), (1, 1)],
        stock: [5, 5, 5],
        end: End::Paid,
        rejected: false,
        delivery: vec![1, 0],
        cuts: vec![true, true],
    };
    let order = world
        .run(
            "inventory",
            &Inventory::new(&topics),
            &case,
            &case.delivery,
            &case.cuts,
        )
        .await;
    let state = world.inventory(&order).await;
    let stock = r#"stock [("<sku0>", 2, 0), ("<sku1>", 4, 0), ("<sku2>", 5, 0)]"#;
    assert!(
        state.starts_with("status Some(\"fulfilled\")"),
        "the paid order's stock left: {state}"
    );
    assert!(state.contains(stock), "{state}");
    assert!(
        state.contains("keel.inventory.InventoryReserved"),
        "{state}"
    );
}

#[tokio::test]
async fn each_order_is_mailed_at_the_address_it_was_placed_with() {
    let world = World::new().await;
    let case = Case {
        lines: vec![(0, 1)],
        stock: [5, 5, 5],
        end: End::Paid,
        rejected: false,
        delivery: vec![0, 1],
        cuts: vec![true, true],
    };
    // Order A is created; order B, with the same customer id and another address, is created
    // before A's payment arrives.
    let a = Order::new(&case);
    let b = Order::new(&case);
    let group = "notification";
    for (event, offset) in [(&a.events[0], 0), (&b.events[0], 1), (&a.events[1], 2)] {
        transact(
            &world.pool,
            group,
            &Notification,
            &[(event.clone(), meta(offset))],
        )
        .await
        .unwrap();
    }
    let receipt: (String, Option<String>) =
        sqlx::query_as("SELECT kind, recipient FROM notification.messages WHERE event_id = $1")
            .bind(a.events[1].event_id())
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(
        receipt,
        (
            "payment-receipt".to_owned(),
            Some(format!("{}@example.com", a.id.simple()))
        )
    );
}

/// Inventory's whole state: every reservation, line and SKU, and the outcomes published per
/// order, with the outcomes' own ids and times left out.
async fn inventory_state(pool: &PgPool) -> String {
    let reservations: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT order_id, status FROM inventory.reservations ORDER BY order_id")
            .fetch_all(pool)
            .await
            .unwrap();
    let lines: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT order_id, sku, quantity FROM inventory.reservation_lines ORDER BY order_id, sku",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let stock: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT sku, on_hand, reserved FROM inventory.stock ORDER BY sku")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut published: Vec<(String, serde_json::Value, serde_json::Value)> =
        sqlx::query_as("SELECT message_key, payload, headers FROM outbox.events ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    for (_, payload, _) in &mut published {
        without_own_id_and_time(payload);
    }
    format!("{reservations:?}\n{lines:?}\n{stock:?}\n{published:?}")
}

/// Applies `records` as `group`, one by one or in two batches cut at `first` (the second over
/// the rows the first left).
async fn apply(
    pool: &PgPool,
    group: &str,
    handler: &impl Handler,
    records: &[(Event, Meta)],
    first: usize,
    one_by_one: bool,
) {
    if one_by_one {
        for record in records {
            transact(pool, group, handler, std::slice::from_ref(record))
                .await
                .unwrap();
        }
    } else {
        for batch in [&records[..first], &records[first..]] {
            transact(pool, group, handler, batch).await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_batch_of_many_orders_over_shared_stock_ends_as_their_records_one_by_one_do() {
    // Orders competing for three SKUs (some fall short), in every shape: paid, cancelled,
    // paid or cancelled before their creation, open; two lines of one SKU in some.
    let skus = ["SHARED-0", "SHARED-1", "SHARED-2"];
    let mut events = Vec::new();
    let mut tail = Vec::new();
    for i in 0..40usize {
        let case = Case {
            lines: vec![(i % 3, 1 + (i % 4) as i32), ((i + 1) % 3, 1)]
                .into_iter()
                .chain((i % 5 == 0).then_some((i % 3, 2)))
                .collect(),
            stock: [0; 3],
            end: match i % 4 {
                0 => End::Paid,
                1 => End::Cancelled,
                _ => End::Open,
            },
            rejected: false,
            delivery: vec![],
            cuts: vec![],
        };
        let mut order = Order::new(&case);
        // One set of SKUs for every order.
        for event in &mut order.events {
            if let Event::OrderCreated(e) = event {
                for line in &mut e.lines {
                    let index = order.skus.iter().position(|s| *s == line.sku).unwrap();
                    line.sku = skus[index].to_owned();
                }
            }
            if let Event::OrderCancelled(e) = event {
                for line in &mut e.lines {
                    let index = order.skus.iter().position(|s| *s == line.sku).unwrap();
                    line.sku = skus[index].to_owned();
                }
            }
        }
        let mut order_events = order.events;
        // Every third order's ending arrives before its creation.
        if i % 3 == 0 && order_events.len() == 2 {
            order_events.reverse();
        }
        // Every other order's second event comes in the second batch: an ending of an order
        // the first batch created (or, reversed, a creation of one it paid or cancelled).
        if i % 2 == 0 && order_events.len() == 2 {
            tail.push(order_events.pop().unwrap());
        }
        // A creation delivered again under another event id, and a line of a SKU not stocked.
        if i == 5
            && let Event::OrderCreated(mut again) = order_events[0].clone()
        {
            again.event_id = Uuid::now_v7();
            tail.push(Event::OrderCreated(again));
        }
        if i == 7
            && let Event::OrderCreated(e) = &mut order_events[0]
        {
            e.lines.push(OrderLine {
                sku: "NOT-STOCKED".into(),
                quantity: 1,
                unit_price_minor: 100,
            });
        }
        events.extend(order_events);
    }
    let first = events.len();
    events.extend(tail);
    // Each record its own trace, which the outcomes it causes must carry.
    let records: Vec<(Event, Meta)> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let mut meta = meta(i as i64);
            meta.trace.insert(
                "traceparent".into(),
                format!("00-{:032x}-{:016x}-01", i + 1, i + 1),
            );
            (e, meta)
        })
        .collect();
    let topics = keel_core::settings::Topics {
        orders: "orders".into(),
        inventory: "inventory".into(),
    };
    let inventory = Inventory::new(&topics);

    let mut states = Vec::new();
    for one_by_one in [true, false] {
        let world = World::new().await;
        for (sku, on_hand) in skus.iter().zip([30, 12, 20]) {
            sqlx::query("INSERT INTO inventory.stock (sku, on_hand) VALUES ($1, $2)")
                .bind(sku)
                .bind(on_hand)
                .execute(&world.pool)
                .await
                .unwrap();
        }
        apply(
            &world.pool,
            "inventory",
            &inventory,
            &records,
            first,
            one_by_one,
        )
        .await;
        states.push(inventory_state(&world.pool).await);
    }
    assert!(
        states[0].contains("InventoryRejected"),
        "some orders fall short: {}",
        states[0]
    );
    assert!(states[0].contains("InventoryReserved"), "{}", states[0]);
    for settled in ["fulfilled", "released", "traceparent"] {
        assert!(states[0].contains(settled), "{settled}: {}", states[0]);
    }
    assert_eq!(states[0], states[1]);
}

/// Analytics' facts and lines about `ids`, each order named by its place in `ids`.
async fn analytics_state(pool: &PgPool, ids: &[Uuid]) -> String {
    let facts: Vec<(i64, serde_json::Value)> = sqlx::query_as(
        "SELECT t.n, to_jsonb(o) - 'order_id' FROM analytics.orders o
           JOIN unnest($1::uuid[]) WITH ORDINALITY AS t (id, n) ON o.order_id = t.id ORDER BY t.n",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .unwrap();
    let lines: Vec<(i64, serde_json::Value)> = sqlx::query_as(
        "SELECT t.n, to_jsonb(l) - 'order_id' FROM analytics.order_lines l
           JOIN unnest($1::uuid[]) WITH ORDINALITY AS t (id, n) ON l.order_id = t.id
          ORDER BY t.n, l.line_no",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .unwrap();
    format!("{facts:?}\n{lines:?}")
}

#[tokio::test]
async fn analytics_batches_of_many_orders_end_as_their_records_one_by_one_do() {
    // Orders in every shape, over two batches (the second over rows the first left): paid,
    // cancelled, both, open, their ending first, only an ending, created again with other lines
    // and currency, paid twice.
    let mut events = Vec::new();
    let mut tail = Vec::new();
    let mut ids = Vec::new();
    for i in 0..32usize {
        let case = Case {
            lines: vec![(i % 3, 1 + (i % 4) as i32)]
                .into_iter()
                .chain((i % 2 == 0).then_some(((i + 1) % 3, 2)))
                .collect(),
            stock: [0; 3],
            end: match i % 4 {
                0 | 3 => End::Paid,
                1 => End::Cancelled,
                _ => End::Open,
            },
            rejected: false,
            delivery: vec![],
            cuts: vec![],
        };
        let order = Order::new(&case);
        ids.push(order.id);
        let mut order_events = order.events;
        if i % 4 == 3 {
            let Event::OrderCreated(created) = &order_events[0] else {
                unreachable!()
            };
            order_events.push(Event::OrderCancelled(OrderCancelled {
                event_id: Uuid::now_v7(),
                occurred_at: 1_764_000_002_000,
                order_id: order.id,
                order_version: 3,
                customer_id: "someone-else".into(),
                reason: None,
                lines: created.lines.clone(),
            }));
        }
        if i == 7
            && let Event::OrderPaid(paid) = &order_events[1]
        {
            let mut again = paid.clone();
            again.event_id = Uuid::now_v7();
            again.currency = "USD".into();
            again.amount_minor += 1;
            again.occurred_at += 5_000;
            order_events.push(Event::OrderPaid(again));
        }
        // A payment in the second batch, in another currency and by another customer id, of an
        // order the first created: neither replaces the creation's.
        if i == 4
            && let Event::OrderPaid(paid) = &mut order_events[1]
        {
            paid.currency = "GBP".into();
            paid.customer_id = "payer".into();
        }
        if i == 9 {
            order_events.remove(0); // only the cancellation
        }
        // No creation: a cancellation, then a payment by another customer id, in one batch (the
        // row takes the first event's customer and the payment's currency); and a cancellation
        // whose row, without a currency, a payment in the second batch gives one.
        if i == 17 || i == 21 {
            order_events.remove(0);
            let paid = Event::OrderPaid(OrderPaid {
                event_id: Uuid::now_v7(),
                occurred_at: 1_764_000_003_000,
                order_id: order.id,
                order_version: 3,
                customer_id: "second-payer".into(),
                currency: if i == 17 { "CHF" } else { "JPY" }.into(),
                amount_minor: 999,
                payment_reference: "pay-2".into(),
            });
            if i == 17 {
                order_events.push(paid);
            } else {
                tail.push(paid);
            }
        }
        if i % 3 == 0 {
            order_events.reverse();
        }
        if i % 2 == 0 && order_events.len() >= 2 {
            tail.push(order_events.pop().unwrap());
        }
        if i == 5
            && let Event::OrderCreated(created) = &order_events[0]
        {
            let mut again = created.clone();
            again.event_id = Uuid::now_v7();
            again.currency = "USD".into();
            again.customer.id = "returning".into();
            again.lines.truncate(1);
            again.lines[0].quantity += 3;
            again.total_minor += 750;
            tail.push(Event::OrderCreated(again));
        }
        events.extend(order_events);
    }
    let first = events.len();
    events.extend(tail);
    let records: Vec<(Event, Meta)> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| (e, meta(i as i64)))
        .collect();
    let analytics = Analytics::new();

    let mut states = Vec::new();
    for one_by_one in [true, false] {
        let world = World::new().await;
        apply(
            &world.pool,
            "analytics",
            &analytics,
            &records,
            first,
            one_by_one,
        )
        .await;
        let (paid, cancelled): (i64, i64) =
            sqlx::query_as("SELECT count(paid_at), count(cancelled_at) FROM analytics.orders")
                .fetch_one(&world.pool)
                .await
                .unwrap();
        assert!(
            paid > 0 && cancelled > 0,
            "{paid} paid, {cancelled} cancelled"
        );
        states.push(analytics_state(&world.pool, &ids).await);
    }
    for fact in ["USD", "returning", "CHF", "JPY"] {
        assert!(states[0].contains(fact), "{fact}: {}", states[0]);
    }
    // Only a creation sets the customer and (over one there is) the currency.
    for replaced in ["GBP", "String(\"payer\")", "String(\"second-payer\")"] {
        assert!(!states[0].contains(replaced), "{replaced}: {}", states[0]);
    }
    assert_eq!(states[0], states[1]);
}
