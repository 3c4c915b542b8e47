//! Interop with a client that is not keel: confluent-kafka-python (librdkafka + fastavro, from
//! PyPI), knowing only the broker and the registry URL. It reads what keel's relay wrote, and
//! keel's consumers read what it wrote. `make test` installs it and sets TEST_INTEROP_PYTHON.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use keel_consumers::inventory::{self, Inventory};
use keel_core::testkit::{brokers, eventually, unique};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::common::{Stack, order};

fn python_client(args: &[&str]) -> Vec<Value> {
    let python = std::env::var("TEST_INTEROP_PYTHON").unwrap_or_else(|_| {
        panic!("TEST_INTEROP_PYTHON is not set: run the tests with `make test`, which installs the Python client")
    });
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/confluent_client.py"
    );
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

async fn registered_id(stack: &Stack, record: &str) -> i64 {
    let url = format!(
        "{}/subjects/{}-{record}/versions/latest",
        stack.registry_url, stack.orders.name
    );
    let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    body["id"].as_i64().expect("subject registered")
}

#[tokio::test]
async fn a_confluent_python_client_reads_what_keel_writes() {
    let stack = Stack::start().await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    let mut mobile = order(json!([{"sku": "SKU-8", "quantity": 2, "unit_price_minor": 1250}]));
    mobile["channel"] = json!("mobile");
    let a = stack.post("/orders", mobile).await;
    let b = stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-8", "quantity": 1, "unit_price_minor": 99}])),
        )
        .await;
    eventually(
        "the relay to publish both",
        Duration::from_secs(60),
        || async { (keel_outbox::pending(&stack.pool).await.ok()? == 0).then_some(()) },
    )
    .await;

    let orders = stack.orders.name.clone();
    let registry = stack.registry_url.clone();
    let read = tokio::task::spawn_blocking(move || {
        python_client(&["consume", &brokers(), &registry, &orders, "2"])
    })
    .await
    .unwrap();
    let id = registered_id(&stack, "keel.orders.OrderCreated").await;
    let by_order = |o: &Value| {
        read.iter()
            .find(|r| r["order_id"] == o["id"])
            .unwrap_or_else(|| panic!("{} not read: {read:?}", o["id"]))
            .clone()
    };
    let (ra, rb) = (by_order(&a), by_order(&b));
    assert_eq!(ra["channel"], "mobile");
    assert_eq!(rb["channel"], "web");
    assert_eq!(ra["total_minor"], 2500);
    assert_eq!(ra["customer"]["email"], "ada@example.com");
    assert_eq!(ra["lines"][0]["sku"], "SKU-8");
    assert_eq!(ra["_schema_id"], id, "the id keel registered");
    stop.cancel();
    relay.await.unwrap().unwrap();
}

#[tokio::test]
async fn keel_consumes_what_a_confluent_python_client_writes() {
    let stack = Stack::start().await;
    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/avro/keel.orders/OrderCreated.avsc"
    );
    let orders = stack.orders.name.clone();
    let registry = stack.registry_url.clone();
    let written = tokio::task::spawn_blocking(move || {
        python_client(&["produce", &brokers(), &registry, &orders, schema, "3"])
    })
    .await
    .unwrap();
    assert_eq!(written.len(), 3);

    let handler = Inventory::new(&stack.settings.topics);
    let group = unique("inventory");
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(
        stack
            .consumer(stack.as_group(&inventory::GROUP, &group), handler)
            .await
            .run(stop.clone()),
    );
    eventually(
        "inventory to apply the Python client's orders",
        Duration::from_secs(60),
        || async { (stack.processed(&group).await == 3).then_some(()) },
    )
    .await;
    let expected: BTreeSet<String> = written
        .iter()
        .map(|w| w["order_id"].as_str().unwrap().to_owned())
        .collect();
    let reserved: BTreeSet<String> = sqlx::query_scalar::<_, String>(
        "SELECT order_id::text FROM inventory.reservations WHERE status = 'reserved'",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(reserved, expected);
    assert_eq!(stack.stock("SKU-9").await, (10_000, 1 + 2 + 3));
    let id = registered_id(&stack, "keel.orders.OrderCreated").await;
    assert!(written.iter().all(|w| w["schema_id"] == id), "{written:?}");
    stop.cancel();
    consumer.await.unwrap().unwrap();
}
