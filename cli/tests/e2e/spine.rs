//! The spine end to end on real parts: HTTP → PostgreSQL (order + outbox) → relay → Kafka (Avro,
//! via the registry) → inventory, including crashes at the two dangerous moments.

use std::process::Command;
use std::time::Duration;

use keel_consumers::inventory::{self, Inventory};
use keel_consumers::runtime::testing;
use keel_consumers::{Consumer, Outcome};
use keel_core::testkit::{eventually, read_topic, unique};
use keel_outbox::relay::Step;
use rdkafka::Message;
use rdkafka::message::Headers;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::common::{Stack, keel, order};

async fn inventory(stack: &Stack, group: &str) -> Consumer<Inventory> {
    stack
        .consumer(
            stack.as_group(&inventory::GROUP, group),
            Inventory::new(&stack.settings.topics),
        )
        .await
}

#[tokio::test]
async fn an_order_reaches_inventory_exactly_once_through_duplicates_and_a_crash_before_the_offset_commit()
 {
    let stack = Stack::start().await;
    let group = unique("inventory");
    let created = stack.post("/orders", order(json!([{"sku": "SKU-1", "quantity": 2, "unit_price_minor": 100}, {"sku": "SKU-2", "quantity": 1, "unit_price_minor": 100}]))).await;
    let order_id = created["id"].as_str().unwrap().to_owned();

    // The relay publishes, then dies before marking; its successor publishes the same event again.
    let relay = keel_outbox::relay::testing::crash_before_mark(stack.relay());
    assert!(
        relay.step().await.is_err(),
        "the hook stops the step before its mark"
    );
    drop(relay);
    // Its lock goes with its session, which closes a moment after the drop.
    let successor = stack.relay();
    let step = eventually(
        "the successor to take the relay lock",
        Duration::from_secs(30),
        || async {
            match successor.step().await.unwrap() {
                Step::NotLeader => None,
                step => Some(step),
            }
        },
    )
    .await;
    assert_eq!(step, Step::Published(1));

    // The consumer applies the event, then dies after its DB commit but before storing the offset.
    let never = CancellationToken::new();
    let first = inventory(&stack, &group).await;
    let message = testing::next(&first, &never).await.unwrap();
    assert_eq!(
        testing::apply(&first, &message, &never).await,
        Some(Outcome::Applied)
    );
    drop(message);
    drop(first);
    assert_eq!(stack.stock("SKU-1").await, (10000, 2));

    // Restarted, it sees the record again, and the relay's duplicate: both are recognised.
    let second = inventory(&stack, &group).await;
    for _ in 0..2 {
        let message = testing::next(&second, &never).await.unwrap();
        assert_eq!(
            testing::apply(&second, &message, &never).await,
            Some(Outcome::Duplicate)
        );
        testing::store(&second, &message).unwrap();
    }
    assert_eq!(stack.stock("SKU-1").await, (10000, 2), "reserved once");
    assert_eq!(stack.stock("SKU-2").await, (10000, 1));
    assert_eq!(stack.processed(&group).await, 1);

    // Payment takes the stock out, once.
    stack
        .post(&format!("/orders/{order_id}/pay"), json!({}))
        .await;
    // The payment, and inventory's own outcome (InventoryReserved) from its outbox row.
    assert_eq!(stack.relay().step().await.unwrap(), Step::Published(2));
    let message = testing::next(&second, &never).await.unwrap();
    assert_eq!(
        testing::apply(&second, &message, &never).await,
        Some(Outcome::Applied)
    );
    assert_eq!(stack.stock("SKU-1").await, (9998, 0));
    let status: String =
        sqlx::query_scalar("SELECT status FROM inventory.reservations WHERE order_id = $1::uuid")
            .bind(&order_id)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(status, "fulfilled");
}

#[tokio::test]
async fn the_running_services_reserve_and_release_and_skip_undecodable_records() {
    let stack = Stack::start().await;
    let group = unique("inventory");
    let stop = CancellationToken::new();
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    let consumer = tokio::spawn(inventory(&stack, &group).await.run(stop.clone()));

    // A poison record among the events: logged, counted as skipped, and does not block.
    let producer: rdkafka::producer::FutureProducer =
        keel_core::kafka::producer_config(&keel_core::testkit::kafka())
            .create()
            .unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&stack.orders.name)
                .key("poison")
                .payload(&b"\x00\x00\x00\x00\x07garbage"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let a = stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-3", "quantity": 5, "unit_price_minor": 100}])),
        )
        .await;
    let b = stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-3", "quantity": 4, "unit_price_minor": 100}])),
        )
        .await;
    stack
        .post(
            &format!("/orders/{}/cancel", b["id"].as_str().unwrap()),
            json!({"reason": "test"}),
        )
        .await;
    let huge = stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-4", "quantity": 20000, "unit_price_minor": 1}])),
        )
        .await;

    eventually(
        "inventory to apply four events",
        Duration::from_secs(60),
        || async { (stack.processed(&group).await == 4).then_some(()) },
    )
    .await;
    assert_eq!(
        stack.stock("SKU-3").await,
        (10000, 5),
        "a holds 5; b's 4 were released"
    );
    assert_eq!(
        stack.stock("SKU-4").await,
        (10000, 0),
        "too large an order holds nothing"
    );
    let statuses: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id::text, status FROM inventory.reservations ORDER BY status")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    let status_of = |o: &Value| {
        statuses
            .iter()
            .find(|(id, _)| id == o["id"].as_str().unwrap())
            .map(|(_, s)| s.as_str())
    };
    assert_eq!(
        (status_of(&a), status_of(&b), status_of(&huge)),
        (Some("reserved"), Some("released"), Some("rejected"))
    );

    stop.cancel();
    relay.await.unwrap().unwrap();
    consumer.await.unwrap().unwrap();
}

async fn published(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// An `OrderCancelled` of a new order, enqueued in `tx` as the order service writes it.
async fn enqueue_cancellation(tx: &mut sqlx::PgConnection, stack: &Stack, customer: &str) {
    let event = keel_schemas::Event::OrderCancelled(keel_schemas::OrderCancelled {
        event_id: uuid::Uuid::new_v4(),
        occurred_at: 1_764_000_000_000,
        order_id: uuid::Uuid::new_v4(),
        order_version: 2,
        customer_id: customer.to_owned(),
        reason: None,
        lines: vec![],
    });
    keel_outbox::enqueue(tx, &stack.orders.name, &event, &Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn killing_the_relay_process_mid_stream_loses_no_event() {
    let stack = Stack::start().await;
    let total = 3000i64;
    // Rows as the order service writes them, enqueued directly to have a backlog quickly.
    for chunk in 0..30 {
        let mut tx = stack.pool.begin().await.unwrap();
        for i in 0..100 {
            enqueue_cancellation(&mut tx, &stack, &format!("c-{chunk}-{i}")).await;
        }
        tx.commit().await.unwrap();
    }

    let relay = keel(&stack, &["relay"], &[]);
    eventually(
        "the relay to publish something",
        Duration::from_secs(60),
        || async { (published(&stack.pool).await > 0).then_some(()) },
    )
    .await;
    relay.kill9(); // mid-stream
    let before = published(&stack.pool).await;
    assert!(before < total, "killed before the end (published {before})");

    let restarted = keel(&stack, &["relay"], &[]);
    eventually(
        "the restarted relay to drain the outbox",
        Duration::from_secs(120),
        || async { (keel_outbox::pending(&stack.pool).await.ok()? == 0).then_some(()) },
    )
    .await;
    restarted
        .terminate()
        .expect("graceful stop: SIGTERM, exit 0");

    let ids = |messages: &[rdkafka::message::OwnedMessage]| -> std::collections::HashSet<String> {
        messages
            .iter()
            .filter_map(|m| {
                m.headers()?
                    .iter()
                    .find(|h| h.key == "keel-event-id")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .collect()
    };
    let messages = read_topic(&stack.orders.name, Duration::from_secs(120), |m| {
        ids(m).len() as i64 >= total
    })
    .await;
    let expected: std::collections::HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM outbox.events")
            .fetch_all(&stack.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    assert_eq!(
        ids(&messages),
        expected,
        "every outbox event is on the topic"
    );
}

#[test]
fn a_configuration_mistake_fails_at_start_up_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("relay")
        .env("KEEL_RELAY_BATCH_SIZE", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KEEL_RELAY_BATCH_SIZE"), "{stderr}");
}

#[test]
fn settings_print_every_key_and_no_password() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("settings")
        .env(
            "KEEL_DATABASE_URL",
            "postgres://keel:s3cret-pw@db:5432/keel",
        )
        .env("KEEL_REDIS_URL", "redis://:other-s3cret@cache:6379")
        .env("KEEL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
        .env("KEEL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        .env("KEEL_KAFKA_SASL_USERNAME", "keel")
        .env("KEEL_KAFKA_SASL_PASSWORD", "kafka-s3cret")
        .env(
            "KEEL_SCHEMA_REGISTRY_URL",
            "https://key:registry-s3cret@registry.example:8443",
        )
        .env("KEEL_REGISTRY_BASIC_AUTH", "keel:own-registry-s3cret")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("KEEL_DATABASE_URL=postgres://keel:***@db:5432/keel"),
        "{stdout}"
    );
    assert!(
        stdout.contains("KEEL_REDIS_URL=redis://:***@cache:6379"),
        "{stdout}"
    );
    assert!(
        stdout.contains("KEEL_SCHEMA_REGISTRY_URL=https://key:***@registry.example:8443"),
        "{stdout}"
    );
    assert!(
        stdout.contains("KEEL_REGISTRY_BASIC_AUTH=keel:***"),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret"), "{stdout}");
    // The cluster's own properties pass through, their secrets masked.
    assert!(
        stdout.contains("KEEL_KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
        "{stdout}"
    );
    assert!(
        stdout.contains("KEEL_KAFKA_SASL_MECHANISM=SCRAM-SHA-512"),
        "{stdout}"
    );
    assert!(stdout.contains("KEEL_KAFKA_SASL_PASSWORD=***"), "{stdout}");
    for (key, _, _) in keel_core::settings::KEYS {
        assert!(stdout.contains(&format!("{key}=")), "{key} missing");
    }
    // A bad value is named with its key, its secret left out.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("relay")
        .env("KEEL_ORDER_SERVICE_ADDR", "http://admin:s3cret-pw@example")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KEEL_ORDER_SERVICE_ADDR"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// A relay that starts while the registry cannot take keel's contracts (a registry whose store
/// failed answers 500; one that is down, nothing) waits for it, and publishes once it can. It
/// used to exit 1 at start-up, so a registry in trouble during a deploy stopped every relay.
#[tokio::test]
async fn a_relay_started_while_the_registry_is_in_trouble_waits_for_it_then_publishes() {
    let stack = Stack::start().await;
    // The registry behind a door that answers 500 until it opens.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let door = open.clone();
    let registry = stack.registry_url.clone();
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (door, registry, http) = (door.clone(), registry.clone(), http.clone());
        async move {
            if !door.load(std::sync::atomic::Ordering::SeqCst) {
                return (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    r#"{"error_code":50001,"message":"Error in the backend data store"}"#
                        .to_owned(),
                );
            }
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let answer = http
                .request(parts.method, format!("{registry}{path}"))
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body)
                .send()
                .await;
            match answer {
                Ok(a) => {
                    let status = axum::http::StatusCode::from_u16(a.status().as_u16())
                        .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
                    (status, a.text().await.unwrap_or_default())
                }
                Err(e) => (axum::http::StatusCode::BAD_GATEWAY, e.to_string()),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let door_url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut tx = stack.pool.begin().await.unwrap();
    enqueue_cancellation(&mut tx, &stack, "c-door").await;
    tx.commit().await.unwrap();

    let relay = keel(
        &stack,
        &["relay"],
        &[("KEEL_SCHEMA_REGISTRY_URL", door_url.as_str())],
    );
    // It keeps asking (and stays up) while the registry answers 500.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert!(
            !relay.exited(),
            "the relay gave up on a registry in trouble"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(published(&stack.pool).await, 0);
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually(
        "the relay to publish once the registry answers",
        Duration::from_secs(60),
        || async { (published(&stack.pool).await == 1).then_some(()) },
    )
    .await;
    assert!(!relay.exited());
    relay.terminate().expect("graceful stop: SIGTERM, exit 0");
    server.abort();
}
