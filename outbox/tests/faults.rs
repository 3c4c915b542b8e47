//! The relay when the cluster refuses a record or fails one: librdkafka's mock cluster (three
//! brokers, made in each test so that its injected errors reach only that test's relay), the
//! real registry and PostgreSQL.
//!
//! What it proves: a row refused for good is set aside with its reason and holds back only its
//! own aggregate's later events; every other row is published once; the acknowledged rows of a
//! failed step are not published again; an aggregate's events are first delivered in id order
//! whatever fails.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keel_core::telemetry::TraceHeaders;
use keel_core::testkit::{TestDb, unique};
use keel_outbox::relay::Step;
use keel_outbox::{Relay, enqueue};
use keel_schemas::Event;
use keel_schemas::events::{Customer, OrderCreated, OrderLine, OrderPaid};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Harness {
    _db: TestDb,
    pool: PgPool,
    registry_url: String,
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    stop: CancellationToken,
}

impl Harness {
    /// A mock cluster with `topics` (one partition each, three replicas), a registry and an
    /// outbox.
    async fn start(topics: &[&str]) -> Self {
        Self::with_partitions(topics, 1).await
    }

    async fn with_partitions(topics: &[&str], partitions: i32) -> Self {
        let cluster = MockCluster::new(3).expect("mock cluster");
        for topic in topics {
            cluster.create_topic(topic, partitions, 3).expect("topic");
        }
        let db = TestDb::new().await;
        keel_core::db::migrate(&db.url, keel_outbox::DB_SCHEMA, &keel_outbox::MIGRATOR)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let (addr, _) =
            keel_schemas::registry::spawn(&db.url, "127.0.0.1:0".parse().unwrap(), stop.clone())
                .await
                .unwrap();
        let pool = db.pool().await;
        Self {
            _db: db,
            pool,
            registry_url: format!("http://{addr}"),
            cluster,
            stop,
        }
    }

    /// A relay whose producer sends one record per request, so that an injected error hits
    /// exactly one record.
    fn relay(&self) -> Relay {
        let mut s = keel_core::Settings::local();
        s.kafka = keel_core::kafka::Kafka::new(self.cluster.bootstrap_servers());
        s.kafka
            .properties
            .insert("batch.num.messages".into(), "1".into());
        // A topic the cluster does not have is declared missing after 1 s, not librdkafka's 30.
        s.kafka
            .properties
            .insert("topic.metadata.propagation.max.ms".into(), "1000".into());
        s.broker_quirks = keel_core::settings::BrokerQuirks::None;
        s.schema_registry_url = self.registry_url.clone();
        s.relay.batch_size = 100;
        Relay::new(self.pool.clone(), &s).unwrap()
    }

    async fn enqueue(&self, topic: &str, event: &Event) -> i64 {
        let mut tx = self.pool.begin().await.unwrap();
        let id = enqueue(&mut tx, topic, event, &TraceHeaders::new())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        id
    }

    /// Steps until a step publishes nothing and fails nothing, or panics after a minute; the
    /// errors of the failed steps.
    async fn drain(&self, relay: &Relay) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut errors = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "the relay did not drain; {} failed steps, the first: {:?}",
                errors.len(),
                errors.iter().take(3).collect::<Vec<_>>()
            );
            match relay.step().await {
                Ok(Step::Published(0)) => return errors,
                Ok(_) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
    }

    /// `(error, published)` of outbox row `id`; `error` is set only for a row set aside.
    async fn row(&self, id: i64) -> (Option<String>, bool) {
        sqlx::query_as(
            "SELECT CASE WHEN failed_at IS NOT NULL THEN error END, published_at IS NOT NULL
               FROM outbox.events WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// The records of `topic`'s one partition, read from the beginning until `count` distinct
    /// events are read (or panics after 30 s).
    fn read(&self, topic: &str, count: usize) -> Vec<OwnedMessage> {
        self.read_partitions(topic, 1, count)
    }

    /// The records of `topic`'s first `partitions` partitions, from the beginning, until `count`
    /// distinct events are read (or panics after 30 s); each partition's in its order.
    fn read_partitions(&self, topic: &str, partitions: i32, count: usize) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.cluster.bootstrap_servers())
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assigned = TopicPartitionList::new();
        for partition in 0..partitions {
            assigned
                .add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assigned).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut read = Vec::new();
        while copies(&read).len() < count {
            assert!(
                Instant::now() < deadline,
                "read {} of {count} records of {topic}",
                read.len()
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                read.push(m.detach());
            }
        }
        read
    }

    /// Injects `error` as the answer to the next Produce request.
    fn refuse_next_produce(&self, error: RDKafkaRespErr) {
        self.cluster
            .request_errors(RDKafkaApiKey::Produce, &[error]);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn created(order_id: Uuid) -> Event {
    Event::OrderCreated(OrderCreated {
        event_id: Uuid::new_v4(),
        occurred_at: 1_764_000_000_000,
        order_id,
        order_version: 1,
        customer: Customer {
            id: "c-1".into(),
            email: "c1@example.com".into(),
            name: "Test".into(),
        },
        currency: "EUR".into(),
        lines: vec![OrderLine {
            sku: "SKU-1".into(),
            quantity: 1,
            unit_price_minor: 100,
        }],
        total_minor: 100,
        channel: "web".into(),
    })
}

fn paid(order_id: Uuid) -> Event {
    Event::OrderPaid(OrderPaid {
        event_id: Uuid::new_v4(),
        occurred_at: 1_764_000_000_500,
        order_id,
        order_version: 2,
        customer_id: "c-1".into(),
        currency: "EUR".into(),
        amount_minor: 100,
        payment_reference: "pay-1".into(),
    })
}

/// The value of header `key` of `m` ("" if it has none).
fn header(m: &OwnedMessage, key: &str) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|h| h.key == key))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn event_id(m: &OwnedMessage) -> String {
    header(m, "keel-event-id")
}

fn event_type(m: &OwnedMessage) -> String {
    header(m, "keel-event-type")
}

/// How many times each event id is on the log.
fn copies(messages: &[OwnedMessage]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in messages {
        *seen.entry(event_id(m)).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_for_a_topic_the_cluster_does_not_have_is_set_aside_and_the_rest_are_published_once()
{
    let h = Harness::start(&["orders"]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(h.enqueue("orders", &created(Uuid::new_v4())).await);
    }
    let missing = h.enqueue("orders-nowhere", &created(Uuid::new_v4())).await;
    for _ in 0..3 {
        ids.push(h.enqueue("orders", &created(Uuid::new_v4())).await);
    }
    let relay = h.relay();

    let errors = h.drain(&relay).await;
    assert!(
        errors.is_empty(),
        "a row refused for good is not a failed step: {errors:?}"
    );
    let (error, published) = h.row(missing).await;
    let error = error.expect("the row for the missing topic is set aside");
    assert!(!published);
    assert!(
        error.contains("Unknown topic") || error.contains("Unknown partition"),
        "the reason names the cause: {error}"
    );
    for id in &ids {
        assert_eq!(h.row(*id).await, (None, true), "row {id} published");
    }
    let log = h.read("orders", ids.len());
    assert!(
        copies(&log).values().all(|n| *n == 1),
        "each published once: {:?}",
        copies(&log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_cluster_refuses_as_too_large_holds_back_only_its_orders_later_events_until_retried()
 {
    let h = Harness::start(&["orders"]).await;
    let refused_order = Uuid::new_v4();
    let first = h.enqueue("orders", &created(refused_order)).await;
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(h.enqueue("orders", &created(Uuid::new_v4())).await);
    }
    let second = h.enqueue("orders", &paid(refused_order)).await;
    let relay = h.relay();
    // The broker refuses the first record as larger than the topic takes (the first request
    // carries only it).
    h.refuse_next_produce(RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE);

    let errors = h.drain(&relay).await;
    assert!(errors.is_empty(), "{errors:?}");
    let (error, _) = h.row(first).await;
    let error = error.expect("the refused row is set aside");
    assert!(error.contains("too large"), "{error}");
    assert_eq!(
        h.row(second).await,
        (None, false),
        "its order's later event waits for it"
    );
    for id in &others {
        assert_eq!(h.row(*id).await, (None, true), "row {id} published");
    }
    let before = h.read("orders", others.len());
    assert!(
        copies(&before).values().all(|n| *n == 1),
        "the acknowledged rows were not published again: {:?}",
        copies(&before)
    );

    // The topic's limit is raised; the operator retries (what `keel outbox retry --all` runs).
    let retried =
        sqlx::query("UPDATE outbox.events SET failed_at = NULL WHERE failed_at IS NOT NULL")
            .execute(&h.pool)
            .await
            .unwrap()
            .rows_affected();
    assert_eq!(retried, 1);
    let errors = h.drain(&relay).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(h.row(first).await, (None, true));
    assert_eq!(h.row(second).await, (None, true));
    let log = h.read("orders", others.len() + 2);
    let order_key = refused_order.to_string();
    let of_the_order: Vec<&OwnedMessage> = log
        .iter()
        .filter(|m| m.key() == Some(order_key.as_bytes()))
        .collect();
    assert_eq!(of_the_order.len(), 2, "created and paid, once each");
    let headers: Vec<String> = of_the_order.iter().map(|m| event_type(m)).collect();
    assert_eq!(
        headers,
        ["keel.orders.OrderCreated", "keel.orders.OrderPaid"],
        "the order's events first delivered in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_later_event_is_sent_only_after_its_earlier_one_is_acknowledged() {
    let h = Harness::start(&["orders"]).await;
    let order = Uuid::new_v4();
    let first = h.enqueue("orders", &created(order)).await;
    let other = h.enqueue("orders", &created(Uuid::new_v4())).await;
    let second = h.enqueue("orders", &paid(order)).await;
    let relay = h.relay();
    // The first record fails for a reason that is not its own (retried, not set aside); the
    // records behind it in the partition would be acknowledged, as after a message timeout while
    // the partition had no leader.
    h.refuse_next_produce(RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS);

    let errors = h.drain(&relay).await;
    assert!(
        errors.iter().any(|e| e.contains("not acknowledged")),
        "the failed step says so: {errors:?}"
    );
    for id in [first, other, second] {
        assert_eq!(h.row(id).await, (None, true), "row {id} published");
    }
    let log = h.read("orders", 3);
    let key = order.to_string();
    let types: Vec<String> = log
        .iter()
        .filter(|m| m.key() == Some(key.as_bytes()))
        .map(event_type)
        .collect();
    assert_eq!(
        types.first().map(String::as_str),
        Some("keel.orders.OrderCreated"),
        "the order's first record on the log is its first event: {types:?}"
    );
    assert_eq!(
        types,
        ["keel.orders.OrderCreated", "keel.orders.OrderPaid"],
        "and neither went twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_move_and_a_broker_goes_down_mid_drain_and_nothing_is_lost_or_reordered() {
    let h = Harness::with_partitions(&["orders"], 6).await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(h.relay().run(stop.clone()));
    let mut orders = Vec::new();
    let mut enqueued = 0;
    // Orders keep arriving while the faults happen: every leader moves each half second and
    // broker 2 is down for a second and a half, twice.
    for round in 0..8 {
        for _ in 0..10 {
            let order = Uuid::new_v4();
            h.enqueue("orders", &created(order)).await;
            h.enqueue("orders", &paid(order)).await;
            orders.push(order.to_string());
            enqueued += 2;
        }
        for partition in 0..6 {
            h.cluster
                .partition_leader("orders", partition, Some((partition + round) % 3 + 1))
                .expect("leader moved");
        }
        match round {
            2 | 5 => h.cluster.broker_down(2).expect("broker down"),
            3 | 6 => h.cluster.broker_up(2).expect("broker up"),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    h.cluster.broker_up(2).expect("broker up");
    keel_core::testkit::eventually("the outbox to drain", Duration::from_secs(120), || async {
        (keel_outbox::pending(&h.pool).await.ok()? == 0).then_some(())
    })
    .await;
    stop.cancel();
    relay.await.unwrap().unwrap();

    let log = h.read_partitions("orders", 6, enqueued);
    assert!(
        copies(&log).len() == enqueued,
        "every event is on the log: {} of {enqueued}",
        copies(&log).len()
    );
    let mut first_types: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for m in &log {
        if !seen.insert(event_id(m)) {
            continue; // a redelivery; its first delivery counts
        }
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        first_types.entry(key).or_default().push(event_type(m));
    }
    for order in &orders {
        assert_eq!(
            first_types.get(order).map(Vec::as_slice),
            Some(
                &[
                    "keel.orders.OrderCreated".to_owned(),
                    "keel.orders.OrderPaid".to_owned()
                ][..]
            ),
            "order {order}: first deliveries in order"
        );
    }
}
