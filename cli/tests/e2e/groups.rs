//! All four consumer groups on real parts: their effects, redelivery, dead letters, a Redis
//! outage, a consumer killed mid-batch, and a group added in test code only.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use keel_consumers::analytics::{self, Analytics};
use keel_consumers::cache_invalidation::{self, CacheInvalidation};
use keel_consumers::inventory::{self, Inventory};
use keel_consumers::notification::{self, Mailer, Notification, Transport};
use keel_consumers::runtime::dlq_headers;
use keel_consumers::{Handler, HandlerError, Meta, Subscription, dlq_topic};
use keel_core::testkit::{Outage, eventually, read_topic, unique};
use keel_schemas::Event;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::PgConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{Stack, keel, order};

/// Group ids of one test: unique, because tests share the broker.
struct Groups {
    inventory: String,
    notification: String,
    analytics: String,
    cache: String,
}

impl Groups {
    fn new() -> Self {
        Self {
            inventory: unique("inventory"),
            notification: unique("notification"),
            analytics: unique("analytics"),
            cache: unique("cache"),
        }
    }
}

/// Runs the relay, the four groups and the mailer in-process until `stop`.
async fn run_all(
    stack: &Stack,
    groups: &Groups,
    stop: &CancellationToken,
) -> Vec<JoinHandle<anyhow::Result<()>>> {
    let topics = &stack.settings.topics;
    let inventory = Inventory::new(topics);
    let cache = CacheInvalidation::new(&stack.settings).unwrap();
    let consumer = |group: &keel_consumers::Group, id: &str| stack.as_group(group, id);
    let mailer = Mailer::new(
        stack.pool.clone(),
        Transport::from_settings(&stack.settings.mail).unwrap(),
        &stack.settings.mail.from,
    )
    .unwrap();
    vec![
        tokio::spawn(stack.relay().run(stop.clone())),
        tokio::spawn(
            stack
                .consumer(consumer(&inventory::GROUP, &groups.inventory), inventory)
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(
            stack
                .consumer(
                    consumer(&notification::GROUP, &groups.notification),
                    Notification,
                )
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(
            stack
                .consumer(
                    consumer(&analytics::GROUP, &groups.analytics),
                    Analytics::new(),
                )
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(
            stack
                .consumer(consumer(&cache_invalidation::GROUP, &groups.cache), cache)
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(mailer.run(stop.clone())),
    ]
}

async fn stop_all(stop: &CancellationToken, tasks: Vec<JoinHandle<anyhow::Result<()>>>) {
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Everything the groups did, to compare before and after a redelivery.
#[derive(Debug, PartialEq)]
struct Effects {
    stock: Vec<(String, i32, i32)>,
    reservations: Vec<(String, String)>,
    messages: Vec<(String, String, Option<String>)>,
    mail_files: usize,
    daily: Vec<(String, i64, i64, i64)>,
    units: Vec<(String, i64, i64)>,
    processed: i64,
    outbox: i64,
}

async fn effects(stack: &Stack) -> Effects {
    let p = &stack.pool;
    Effects {
        stock: sqlx::query_as("SELECT sku, on_hand, reserved FROM inventory.stock ORDER BY sku")
            .fetch_all(p)
            .await
            .unwrap(),
        reservations: sqlx::query_as(
            "SELECT order_id::text, status FROM inventory.reservations ORDER BY order_id",
        )
        .fetch_all(p)
        .await
        .unwrap(),
        messages: sqlx::query_as(
            "SELECT event_id::text, kind, recipient FROM notification.messages ORDER BY event_id",
        )
        .fetch_all(p)
        .await
        .unwrap(),
        mail_files: std::fs::read_dir(&stack.mail_dir)
            .map(|d| d.count())
            .unwrap_or(0),
        daily: sqlx::query_as(
            "SELECT currency, sum(orders)::bigint, sum(revenue_minor)::bigint, sum(cancellations)::bigint
               FROM analytics.daily GROUP BY currency ORDER BY currency",
        )
        .fetch_all(p)
        .await
        .unwrap(),
        units: sqlx::query_as(
            "SELECT sku, units_ordered, units_sold FROM analytics.units_per_sku ORDER BY sku",
        )
        .fetch_all(p)
        .await
        .unwrap(),
        processed: stack
            .scalar("SELECT count(*) FROM consumers.processed_events")
            .await,
        outbox: stack.scalar("SELECT count(*) FROM outbox.events").await,
    }
}

#[tokio::test]
async fn two_hundred_orders_reach_every_group_exactly_once_even_when_delivered_twice() {
    let stack = Stack::start().await;
    let groups = Groups::new();
    let stop = CancellationToken::new();
    let tasks = run_all(&stack, &groups, &stop).await;

    // 200 orders in two currencies: a third paid, a third cancelled, a third left open; every
    // tenth asks for more than the stock holds and is rejected by inventory.
    let mut ids = Vec::new();
    let (mut paid, mut cancelled, mut rejected) = (0i64, 0i64, 0i64);
    for i in 0..200usize {
        let sku = format!("SKU-{}", i % 50 + 1);
        let quantity = if i % 10 == 9 {
            50_000
        } else {
            (i % 3 + 1) as i64
        };
        let currency = if i % 2 == 0 { "EUR" } else { "USD" };
        let mut body =
            order(json!([{"sku": sku, "quantity": quantity, "unit_price_minor": 100 + i}]));
        body["currency"] = json!(currency);
        body["customer"]["id"] = json!(format!("c-{}", i % 17));
        body["customer"]["email"] = json!(format!("customer{}@example.com", i % 17));
        let created = stack.post("/orders", body).await;
        let id = created["id"].as_str().unwrap().to_owned();
        // Read once so the cache holds version 1 before the order changes.
        assert_eq!(stack.get(&format!("/orders/{id}")).await["version"], 1);
        match i % 3 {
            0 => {
                stack.post(&format!("/orders/{id}/pay"), json!({})).await;
                paid += 1;
            }
            1 => {
                stack
                    .post(&format!("/orders/{id}/cancel"), json!({"reason": "test"}))
                    .await;
                cancelled += 1;
            }
            _ => {}
        }
        if i % 10 == 9 {
            rejected += 1;
        }
        ids.push(id);
    }
    let order_events = 200 + paid + cancelled;
    let mails = order_events + rejected;

    eventually(
        "every group to catch up",
        Duration::from_secs(180),
        || async {
            let done = stack.processed(&groups.inventory).await == order_events
                && stack.processed(&groups.analytics).await == order_events
                && stack.processed(&groups.cache).await == order_events
                && stack.processed(&groups.notification).await == mails
                && stack
                    .scalar(
                        "SELECT count(*) FROM notification.messages WHERE delivered_at IS NOT NULL",
                    )
                    .await
                    == mails;
            done.then_some(())
        },
    )
    .await;

    // Inventory: what the test did, SKU by SKU.
    let mut expected: BTreeMap<String, (i32, i32)> = (1..=50)
        .map(|n| (format!("SKU-{n}"), (10_000, 0)))
        .collect();
    for i in 0..200usize {
        if i % 10 == 9 {
            continue; // rejected: holds nothing
        }
        let q = (i % 3 + 1) as i32;
        let entry = expected.get_mut(&format!("SKU-{}", i % 50 + 1)).unwrap();
        match i % 3 {
            0 => entry.0 -= q,
            1 => {}
            _ => entry.1 += q,
        }
    }
    let before = effects(&stack).await;
    let stock: BTreeMap<String, (i32, i32)> = before
        .stock
        .iter()
        .filter(|(sku, _, _)| expected.contains_key(sku))
        .map(|(sku, on_hand, reserved)| (sku.clone(), (*on_hand, *reserved)))
        .collect();
    assert_eq!(stock, expected);

    // Notification: one message per customer-facing event, one file each, each its own Message-ID.
    assert_eq!(before.messages.len() as i64, mails);
    assert_eq!(before.mail_files as i64, mails);
    let kinds = |k: &str| before.messages.iter().filter(|m| m.1 == k).count() as i64;
    assert_eq!(
        (
            kinds("order-confirmation"),
            kinds("payment-receipt"),
            kinds("cancellation"),
            kinds("out-of-stock")
        ),
        (200, paid, cancelled, rejected)
    );
    let some = &before.messages[0].0;
    let eml = std::fs::read_to_string(stack.mail_dir.join(format!("{some}.eml"))).unwrap();
    assert!(eml.contains(&format!("Message-ID: <{some}@keel>")), "{eml}");
    assert!(
        before
            .messages
            .iter()
            .all(|m| m.2.as_deref().is_some_and(|r| r.ends_with("@example.com")))
    );

    // Analytics equals a direct computation over the order service's own tables.
    let truth: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT currency, count(*), coalesce(sum(total_minor) FILTER (WHERE status = 'paid'), 0)::bigint,
                count(*) FILTER (WHERE status = 'cancelled')
           FROM orders.orders GROUP BY currency ORDER BY currency",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(before.daily, truth);
    let units_truth: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT l.sku, sum(l.quantity)::bigint, coalesce(sum(l.quantity) FILTER (WHERE o.status = 'paid'), 0)::bigint
           FROM orders.order_lines l JOIN orders.orders o ON o.id = l.order_id GROUP BY l.sku ORDER BY l.sku",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(before.units, units_truth);
    let (created, converted): (i64, i64) =
        sqlx::query_as("SELECT created, paid FROM analytics.conversion")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!((created, converted), (200, paid));

    // Cache: every read now is fresh although every order was cached at version 1.
    for id in &ids {
        let (version, status): (i32, String) =
            sqlx::query_as("SELECT version, status FROM orders.orders WHERE id = $1::uuid")
                .bind(id)
                .fetch_one(&stack.pool)
                .await
                .unwrap();
        let read = stack.get(&format!("/orders/{id}")).await;
        assert_eq!(
            (read["version"].clone(), read["status"].clone()),
            (json!(version), json!(status)),
            "{id}"
        );
    }

    // Deliver everything again: stop, move every group back to the beginning, restart.
    stop_all(&stop, tasks).await;
    if keel_core::testkit::cluster::cannot(
        "offset commits from outside a group that has existed (Kafka takes them once it is empty)",
    ) {
        return;
    }
    let orders = stack.orders.name.as_str();
    let inventory = stack.inventory.name.as_str();
    let subscriptions = [
        (&groups.inventory, vec![orders]),
        (&groups.analytics, vec![orders]),
        (&groups.cache, vec![orders]),
        (&groups.notification, vec![orders, inventory]),
    ];
    // Committed offsets say how far a group has read. (Not lag against the end offset: tansu
    // 0.6 under-reports end offsets when the last batch holds several records.)
    let committed = || -> Vec<Vec<i64>> {
        subscriptions
            .iter()
            .map(|(group, topics)| {
                keel_core::kafka::group_offsets(&keel_core::testkit::kafka(), group, topics)
                    .map(|ps| {
                        ps.into_iter()
                            .map(|p| p.committed.unwrap_or(p.low))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    };
    let read_everything = committed();
    // A cluster takes a commit from outside a group only once the group is empty (Kafka answers
    // UNKNOWN_MEMBER_ID while a stopped member's session lasts): retried until then.
    eventually(
        "every group reset to the beginning",
        Duration::from_secs(60),
        || async {
            subscriptions
                .iter()
                .all(|(group, topics)| {
                    keel_core::kafka::reset_offsets_to_beginning(
                        &keel_core::testkit::kafka(),
                        group,
                        topics,
                    )
                    .is_ok()
                })
                .then_some(())
        },
    )
    .await;
    assert!(
        committed().iter().flatten().all(|c| *c == 0),
        "every group was reset"
    );
    let stop = CancellationToken::new();
    let tasks = run_all(&stack, &groups, &stop).await;
    eventually(
        "every group to read everything again",
        Duration::from_secs(180),
        || async { (committed() == read_everything).then_some(()) },
    )
    .await;
    stop_all(&stop, tasks).await;
    assert_eq!(
        effects(&stack).await,
        before,
        "a second delivery changes nothing"
    );
}

/// A producer for records the relay would never write.
fn raw_producer() -> FutureProducer {
    keel_core::kafka::producer_config(&keel_core::testkit::kafka())
        .create()
        .unwrap()
}

#[tokio::test]
async fn poison_records_land_in_the_dead_letter_topic_with_their_headers_and_the_rest_flows() {
    let stack = Stack::start().await;
    let group = unique("inventory");
    let dlq = dlq_topic(&stack.orders.name, &group);
    let producer = raw_producer();
    let random: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let unknown_id = [&[0u8, 0x7f, 0xff, 0xff, 0xfe][..], b"\x02\x04body"].concat();
    for (key, value) in [("random", &random[..]), ("unknown-id", &unknown_id[..])] {
        producer
            .send(
                FutureRecord::to(&stack.orders.name)
                    .key(key)
                    .payload(value)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "traceparent",
                        value: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                    })),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let created = stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-5", "quantity": 3, "unit_price_minor": 100}])),
        )
        .await;

    let stop = CancellationToken::new();
    let handler = Inventory::new(&stack.settings.topics);
    let consumer = tokio::spawn(
        stack
            .consumer(stack.as_group(&inventory::GROUP, &group), handler)
            .await
            .run(stop.clone()),
    );
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    eventually(
        "the order after the poison to be applied",
        Duration::from_secs(60),
        || async { (stack.processed(&group).await == 1).then_some(()) },
    )
    .await;
    assert_eq!(stack.stock("SKU-5").await, (10_000, 3));
    let reservation: String =
        sqlx::query_scalar("SELECT status FROM inventory.reservations WHERE order_id = $1::uuid")
            .bind(created["id"].as_str().unwrap())
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(reservation, "reserved");

    let dead = read_topic(&dlq, Duration::from_secs(60), |m| m.len() >= 2).await;
    assert_eq!(dead.len(), 2);
    for m in &dead {
        let header = |k: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == k).and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let expected_value = if key.as_deref() == Some("random") {
            &random[..]
        } else {
            &unknown_id[..]
        };
        assert_eq!(
            m.payload(),
            Some(expected_value),
            "the original value, untouched"
        );
        assert_eq!(
            header(dlq_headers::TOPIC).as_deref(),
            Some(stack.orders.name.as_str())
        );
        assert_eq!(header(dlq_headers::GROUP).as_deref(), Some(group.as_str()));
        // Bytes that are not the wire format are poison at once; an id the registry does not
        // know is retried up to the budget first (a lagging replica answers 404 too).
        let (class, attempts) = if key.as_deref() == Some("random") {
            ("permanent", "1")
        } else {
            ("transient", "3")
        };
        assert_eq!(header(dlq_headers::ERROR_CLASS).as_deref(), Some(class));
        assert_eq!(header(dlq_headers::ATTEMPTS).as_deref(), Some(attempts));
        assert!(header(dlq_headers::PARTITION).is_some_and(|p| p.parse::<i32>().is_ok()));
        assert!(header(dlq_headers::OFFSET).is_some_and(|o| o.parse::<i64>().is_ok()));
        assert!(
            header(dlq_headers::TIMESTAMP).is_some_and(|t| t.parse::<i64>().is_ok_and(|t| t > 0))
        );
        assert!(header("traceparent").is_some(), "original headers kept");
        let error = header(dlq_headers::ERROR).unwrap_or_default();
        assert!(error.contains("cannot decode"), "{error}");
    }
    stop.cancel();
    consumer.await.unwrap().unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test]
async fn while_redis_is_down_cache_invalidation_waits_and_catches_up_and_other_groups_go_on() {
    let stack = Stack::start().await;
    let redis = keel_core::testkit::redis_url();
    let target = redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let outage = Outage::forward(&target).await;
    let mut settings = stack.settings();
    settings.cache.redis_url = Some(format!("redis://{}", outage.addr));
    let cache = CacheInvalidation::new(&settings).unwrap();
    let cache_group = unique("cache");
    let inventory = Inventory::new(&stack.settings.topics);
    let inventory_group = unique("inventory");

    let stop = CancellationToken::new();
    let tasks = [
        tokio::spawn(stack.relay().run(stop.clone())),
        tokio::spawn(
            stack
                .consumer(
                    stack.as_group(&cache_invalidation::GROUP, &cache_group),
                    cache,
                )
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(
            stack
                .consumer(
                    stack.as_group(&inventory::GROUP, &inventory_group),
                    inventory,
                )
                .await
                .run(stop.clone()),
        ),
    ];

    outage.set_down(true);
    let created = stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-6", "quantity": 1, "unit_price_minor": 100}])),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        stack.get(&format!("/orders/{id}")).await["version"],
        1,
        "cached at version 1"
    );
    stack.post(&format!("/orders/{id}/pay"), json!({})).await;

    eventually(
        "inventory to go on while Redis is down",
        Duration::from_secs(60),
        || async { (stack.processed(&inventory_group).await == 2).then_some(()) },
    )
    .await;
    assert_eq!(
        stack.processed(&cache_group).await,
        0,
        "nothing invalidated while Redis is down"
    );
    assert_eq!(
        stack.get(&format!("/orders/{id}")).await["version"],
        1,
        "stale until invalidated"
    );

    outage.set_down(false);
    eventually(
        "cache invalidation to catch up",
        Duration::from_secs(60),
        || async { (stack.processed(&cache_group).await == 2).then_some(()) },
    )
    .await;
    let read = stack.get(&format!("/orders/{id}")).await;
    assert_eq!(
        (read["version"].clone(), read["status"].clone()),
        (json!(2), json!("paid"))
    );

    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_consumer_process_killed_mid_stream_restarts_without_double_effects_or_gaps() {
    let stack = Stack::start().await;
    let total = 2000i64;
    for chunk in 0..20 {
        let mut tx = stack.pool.begin().await.unwrap();
        for i in 0..100 {
            let event = Event::OrderCreated(keel_schemas::OrderCreated {
                event_id: uuid::Uuid::new_v4(),
                occurred_at: 1_764_000_000_000,
                order_id: uuid::Uuid::new_v4(),
                order_version: 1,
                customer: keel_schemas::Customer {
                    id: format!("c-{chunk}-{i}"),
                    email: "bulk@example.com".into(),
                    name: "Bulk".into(),
                },
                currency: "EUR".into(),
                lines: vec![keel_schemas::OrderLine {
                    sku: format!("SKU-{}", i % 10 + 11),
                    quantity: 1,
                    unit_price_minor: 100,
                }],
                total_minor: 100,
                channel: "store".into(),
            });
            keel_outbox::enqueue(&mut tx, &stack.orders.name, &event, &Default::default())
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let stop = CancellationToken::new();
    let relay = tokio::spawn(stack.relay().run(stop.clone()));

    // Record by record, so that the kill finds it mid-stream: in its batches of 1000 inventory
    // applies a backlog like this one in well under a second.
    let first = keel(
        &stack,
        &["consume", "inventory"],
        &[("KEEL_CONSUMER_BATCH_SIZE", "1")],
    );
    eventually(
        "the consumer to apply something",
        Duration::from_secs(120),
        || async { (stack.processed("inventory").await > 0).then_some(()) },
    )
    .await;
    first.kill9();
    let at_kill = stack.processed("inventory").await;
    assert!(
        at_kill < total,
        "killed mid-stream ({at_kill} of {total} applied)"
    );

    let second = keel(&stack, &["consume", "inventory"], &[]);
    eventually(
        "the restarted consumer to apply the rest",
        Duration::from_secs(180),
        || async { (stack.processed("inventory").await == total).then_some(()) },
    )
    .await;
    second.terminate().expect("SIGTERM: exits 0");
    let reserved = stack
        .scalar("SELECT sum(reserved)::bigint FROM inventory.stock")
        .await;
    assert_eq!(reserved, total, "every order held exactly one unit");
    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM inventory.reservations WHERE status = 'reserved'")
            .await,
        total
    );
    stop.cancel();
    relay.await.unwrap().unwrap();
}

/// A group that exists only here: it records every event it sees. Adding it took this impl, its
/// subscription and its table; nothing in producers/ or outbox/ knows about it.
struct Audit;

impl Handler for Audit {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        meta: &Meta,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO audit_log (event_id, event_type, topic) VALUES ($1, $2, $3)")
            .bind(event.event_id())
            .bind(event.name())
            .bind(&meta.topic)
            .execute(tx)
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_group_defined_only_in_test_code_receives_every_event() {
    let stack = Stack::start().await;
    sqlx::query("CREATE TABLE audit_log (event_id uuid PRIMARY KEY, event_type text NOT NULL, topic text NOT NULL)")
        .execute(&stack.pool)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let inventory = Inventory::new(&stack.settings.topics);
    let audit = Subscription::new(
        unique("audit"),
        vec![stack.orders.name.clone(), stack.inventory.name.clone()],
    );
    let tasks = [
        tokio::spawn(stack.relay().run(stop.clone())),
        tokio::spawn(
            stack
                .consumer(
                    stack.as_group(&inventory::GROUP, &unique("inventory")),
                    inventory,
                )
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(stack.consumer(audit, Audit).await.run(stop.clone())),
    ];
    for i in 0..10 {
        let created = stack
            .post(
                "/orders",
                order(json!([{"sku": format!("SKU-{}", 20 + i), "quantity": if i < 5 { 1 } else { 20_000 }, "unit_price_minor": 100}])),
            )
            .await;
        if i % 2 == 0 {
            stack
                .post(
                    &format!("/orders/{}/pay", created["id"].as_str().unwrap()),
                    json!({}),
                )
                .await;
        }
    }
    // 15 order events, and one inventory outcome per order.
    eventually(
        "the audit group to see every event",
        Duration::from_secs(90),
        || async { (stack.scalar("SELECT count(*) FROM audit_log").await == 25).then_some(()) },
    )
    .await;
    let published: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM outbox.events")
            .fetch_all(&stack.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    let audited: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM audit_log")
            .fetch_all(&stack.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    assert_eq!(audited, published);
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_type, count(*) FROM audit_log WHERE topic = $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(&stack.inventory.name)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        vec![
            ("keel.inventory.InventoryRejected".to_owned(), 5),
            ("keel.inventory.InventoryReserved".to_owned(), 5)
        ]
    );
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Consumers depend on producers' contracts, never the other way round: adding a group can not
/// require a change (or even a rebuild) of the order service or the relay.
#[test]
fn producers_and_outbox_do_not_depend_on_consumers() {
    // What ships (normal and build dependencies), on this platform, as `cargo tree` resolves it.
    let deps_of = |package: &str| -> HashSet<String> {
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "tree",
                "-p",
                package,
                "-e",
                "normal,build",
                "--prefix",
                "none",
                "--offline",
                "--locked",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    };
    for producer in ["keel-producers", "keel-outbox"] {
        let deps = deps_of(producer);
        assert!(
            deps.contains("keel-schemas"),
            "{producer} uses the contracts: {deps:?}"
        );
        assert!(
            !deps.contains("keel-consumers"),
            "{producer} must not depend on keel-consumers"
        );
    }
    assert!(deps_of("keel-consumers").contains("keel-schemas"));
}

/// Counts the events a handler applied, to see which instance did the work.
struct Counting<H> {
    inner: H,
    applied: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<H: Handler> Handler for Counting<H> {
    fn wants(&self, event: &Event) -> bool {
        self.inner.wants(event)
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        meta: &Meta,
    ) -> Result<(), HandlerError> {
        self.inner.handle(tx, event, meta).await?;
        self.applied
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn two_instances_of_a_group_share_the_partitions_and_apply_each_event_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let stack = Stack::start().await;
    let group = unique("inventory");
    let stop = CancellationToken::new();
    let counters = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut tasks = vec![tokio::spawn(stack.relay().run(stop.clone()))];
    for applied in &counters {
        let handler = Counting {
            inner: Inventory::new(&stack.settings.topics),
            applied: applied.clone(),
        };
        tasks.push(tokio::spawn(
            stack
                .consumer(stack.as_group(&inventory::GROUP, &group), handler)
                .await
                .run(stop.clone()),
        ));
    }

    // Orders keep coming (keyed over all six partitions) until both instances have done some.
    let mut sent = 0i64;
    eventually(
        "both instances to apply events",
        Duration::from_secs(90),
        || {
            sent += 12;
            let pool = stack.pool.clone();
            let topic = stack.orders.name.clone();
            let counters = counters.clone();
            async move {
                let mut tx = pool.begin().await.unwrap();
                for _ in 0..12 {
                    let event = Event::OrderCancelled(keel_schemas::OrderCancelled {
                        event_id: uuid::Uuid::new_v4(),
                        occurred_at: 1_764_000_000_000,
                        order_id: uuid::Uuid::new_v4(),
                        order_version: 2,
                        customer_id: "c-1".into(),
                        reason: None,
                        lines: vec![],
                    });
                    keel_outbox::enqueue(&mut tx, &topic, &event, &Default::default())
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await; // pacing the producer, not waiting on a condition
                counters
                    .iter()
                    .all(|c| c.load(Ordering::SeqCst) > 0)
                    .then_some(())
            }
        },
    )
    .await;
    eventually(
        "every event to be applied",
        Duration::from_secs(90),
        || async { (stack.processed(&group).await == sent).then_some(()) },
    )
    .await;
    let applied: usize = counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    assert_eq!(
        applied as i64, sent,
        "each event applied by exactly one instance"
    );
    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_newer_producers_event_type_is_skipped_and_counted_never_dead_lettered() {
    let stack = Stack::start().await;
    let group = unique("inventory");
    let dlq = dlq_topic(&stack.orders.name, &group);
    // A newer order service added an event: its schema is registered, this build has no
    // contract for it.
    let refunded = json!({
        "type": "record", "name": "OrderRefunded", "namespace": "keel.orders",
        "fields": [
            {"name": "event_id", "type": "string"},
            {"name": "order_id", "type": "string"},
            {"name": "amount_minor", "type": "long"},
        ],
    });
    const TYPE: &str = "keel.orders.OrderRefunded";
    let registered: serde_json::Value = stack
        .http
        .post(format!(
            "{}/subjects/{}-{TYPE}/versions",
            stack.registry_url, stack.orders.name
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .json(&json!({"schema": refunded.to_string()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = u32::try_from(registered["id"].as_u64().expect("an id")).unwrap();
    let schema = apache_avro::Schema::parse(&refunded).unwrap();
    let mut record = apache_avro::types::Record::new(&schema).unwrap();
    record.put("event_id", uuid::Uuid::new_v4().to_string());
    record.put("order_id", uuid::Uuid::new_v4().to_string());
    record.put("amount_minor", 4498i64);
    let body = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap()
        .write_value_to_vec(record)
        .unwrap();
    let value = [&[0u8][..], &id.to_be_bytes(), &body].concat();
    raw_producer()
        .send(
            FutureRecord::to(&stack.orders.name)
                .key("refund")
                .payload(&value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "keel-event-type",
                    value: Some(TYPE),
                })),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-6", "quantity": 2, "unit_price_minor": 100}])),
        )
        .await;

    let stop = CancellationToken::new();
    let consumer = tokio::spawn(
        stack
            .consumer(
                stack.as_group(&inventory::GROUP, &group),
                Inventory::new(&stack.settings.topics),
            )
            .await
            .run(stop.clone()),
    );
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    let ignored = keel_core::metrics::metrics()
        .consumer_ignored
        .get_or_create(&keel_core::metrics::IgnoredLabels {
            group: group.clone(),
            event_type: TYPE.to_owned(),
        })
        .clone();
    eventually(
        "the known event applied and the unknown one skipped",
        Duration::from_secs(60),
        || async { (stack.processed(&group).await == 1 && ignored.get() == 1).then_some(()) },
    )
    .await;
    assert_eq!(stack.stock("SKU-6").await, (10_000, 2));
    assert_eq!(stack.records_in(&dlq), 0, "nothing dead-lettered");
    stop.cancel();
    consumer.await.unwrap().unwrap();
    relay.await.unwrap().unwrap();
}

/// Fails its first calls as a dependency that is down would (`outage` calls), then once as a
/// deadlock would, then applies.
struct Flaky {
    calls: std::sync::atomic::AtomicU32,
    outage: u32,
}

impl Handler for Flaky {
    async fn handle(
        &self,
        _tx: &mut PgConnection,
        _event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if call <= self.outage {
            Err(HandlerError::Unavailable(anyhow::anyhow!(
                "connection refused"
            )))
        } else if call == self.outage + 1 {
            Err(HandlerError::Transient(anyhow::anyhow!(
                "deadlock detected"
            )))
        } else {
            Ok(())
        }
    }
}

#[tokio::test]
async fn an_outage_longer_than_the_retry_budget_does_not_spend_it() {
    let stack = Stack::start().await;
    let group = unique("flaky");
    let dlq = dlq_topic(&stack.orders.name, &group);
    let budget = stack.settings.consumer.max_attempts;
    stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-7", "quantity": 1, "unit_price_minor": 100}])),
        )
        .await;
    let stop = CancellationToken::new();
    let flaky = Flaky {
        calls: Default::default(),
        outage: budget + 2,
    };
    let consumer = tokio::spawn(
        stack
            .consumer(
                Subscription::new(&group, vec![stack.orders.name.clone()]),
                flaky,
            )
            .await
            .run(stop.clone()),
    );
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    eventually(
        "the record applied after the outage and one deadlock",
        Duration::from_secs(60),
        || async { (stack.processed(&group).await == 1).then_some(()) },
    )
    .await;
    assert_eq!(stack.records_in(&dlq), 0, "nothing dead-lettered");
    stop.cancel();
    consumer.await.unwrap().unwrap();
    relay.await.unwrap().unwrap();
}
