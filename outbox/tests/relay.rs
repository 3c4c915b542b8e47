//! The relay against the real broker, registry and PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keel_core::telemetry::TraceHeaders;
use keel_core::testkit::{Outage, TestDb, TestTopic, eventually, read_topic};
use keel_outbox::relay::{RelayError, Step};
use keel_outbox::{Relay, enqueue, pending};
use keel_schemas::events::{Customer, OrderCancelled, OrderCreated, OrderLine, OrderPaid};
use keel_schemas::{Decoder, Event};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Harness {
    db: TestDb,
    pool: PgPool,
    registry_url: String,
    shutdown: CancellationToken,
}

impl Harness {
    async fn start() -> Self {
        let db = TestDb::new().await;
        keel_core::db::migrate(&db.url, keel_outbox::DB_SCHEMA, &keel_outbox::MIGRATOR)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let (addr, _) = keel_schemas::registry::spawn(
            &db.url,
            "127.0.0.1:0".parse().unwrap(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let pool = db.pool().await;
        Self {
            db,
            pool,
            registry_url: format!("http://{addr}"),
            shutdown,
        }
    }

    fn relay(&self, batch_size: usize) -> Relay {
        let mut s = keel_core::Settings::local();
        s.kafka.brokers = keel_core::testkit::brokers();
        s.schema_registry_url = self.registry_url.clone();
        s.relay.batch_size = batch_size;
        s.relay.poll_interval = Duration::from_millis(200);
        s.relay.retention = Duration::from_secs(3600);
        Relay::new(self.pool.clone(), &s).unwrap()
    }

    /// Enqueues each order's events in one transaction per event, as the order service does.
    async fn enqueue_orders(&self, topic: &str, orders: usize, trace: &TraceHeaders) -> Vec<Event> {
        let mut all = Vec::new();
        for i in 0..orders {
            for event in lifecycle(i) {
                let mut tx = self.pool.begin().await.unwrap();
                enqueue(&mut tx, topic, &event, trace).await.unwrap();
                tx.commit().await.unwrap();
                all.push(event);
            }
        }
        all
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = &self.db;
    }
}

/// Created, then paid (even orders) or cancelled (odd ones): versions 1, 2.
fn lifecycle(i: usize) -> Vec<Event> {
    let order_id = Uuid::new_v4();
    let lines = vec![OrderLine {
        sku: format!("SKU-{}", i % 7),
        quantity: 1 + (i % 3) as i32,
        unit_price_minor: 100,
    }];
    let created = Event::OrderCreated(OrderCreated {
        event_id: Uuid::new_v4(),
        occurred_at: 1_764_000_000_000,
        order_id,
        order_version: 1,
        customer: Customer {
            id: format!("c-{i}"),
            email: format!("c{i}@example.com"),
            name: "Test".into(),
        },
        currency: "EUR".into(),
        lines: lines.clone(),
        total_minor: 100,
        channel: "web".into(),
    });
    let second = if i.is_multiple_of(2) {
        Event::OrderPaid(OrderPaid {
            event_id: Uuid::new_v4(),
            occurred_at: 1_764_000_000_500,
            order_id,
            order_version: 2,
            customer_id: format!("c-{i}"),
            currency: "EUR".into(),
            amount_minor: 100,
            payment_reference: format!("pay-{i}"),
        })
    } else {
        Event::OrderCancelled(OrderCancelled {
            event_id: Uuid::new_v4(),
            occurred_at: 1_764_000_000_500,
            order_id,
            order_version: 2,
            customer_id: format!("c-{i}"),
            reason: None,
            lines,
        })
    };
    vec![created, second]
}

fn header<'a>(m: &'a OwnedMessage, key: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn distinct_ids(messages: &[OwnedMessage]) -> usize {
    messages
        .iter()
        .filter_map(|m| header(m, "keel-event-id"))
        .collect::<HashSet<_>>()
        .len()
}

/// Decodes every record; checks each expected event arrived (at least once), keyed by its order,
/// and that per order the first arrivals come in version order.
async fn assert_delivered_in_order(
    registry_url: &str,
    messages: &[OwnedMessage],
    expected: &[Event],
) {
    let decoder = Decoder::new(registry_url).unwrap();
    let mut seen = HashSet::new();
    let mut last_version: HashMap<Uuid, i32> = HashMap::new();
    for m in messages {
        let event = decoder
            .decode(m.payload())
            .await
            .expect("every record decodes");
        assert_eq!(
            m.key(),
            Some(event.aggregate_id().to_string().as_bytes()),
            "keyed by order id"
        );
        assert_eq!(header(m, "keel-event-type"), Some(event.name()));
        if !seen.insert(event.event_id()) {
            continue; // a duplicate, allowed
        }
        let version = event.order_version().expect("an order event");
        let previous = last_version
            .insert(event.aggregate_id(), version)
            .unwrap_or(0);
        assert!(
            version > previous,
            "order {} went from version {previous} to {version}",
            event.aggregate_id()
        );
    }
    for e in expected {
        assert!(
            seen.contains(&e.event_id()),
            "event {} was lost",
            e.event_id()
        );
    }
}

#[tokio::test]
async fn publishes_every_row_once_keyed_and_in_order_with_trace_headers() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 6).await;
    let relay = h.relay(7);
    relay
        .prepare(&[(&topic.name, "keel.orders")])
        .await
        .expect("registry accepts the contracts");
    let trace: TraceHeaders = [(
        "traceparent".to_owned(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
    )]
    .into();
    let expected = h.enqueue_orders(&topic.name, 20, &trace).await;
    assert_eq!(pending(&h.pool).await.unwrap(), 40);

    let mut published = 0;
    while let Step::Published(n) = relay.step().await.unwrap() {
        if n == 0 {
            break;
        }
        published += n;
    }
    assert_eq!(published, 40);
    assert_eq!(pending(&h.pool).await.unwrap(), 0);

    let messages = read_topic(&topic.name, Duration::from_secs(30), |m| m.len() >= 40).await;
    assert_eq!(
        messages.len(),
        40,
        "each row published exactly once when nothing fails"
    );
    assert_delivered_in_order(&h.registry_url, &messages, &expected).await;
    assert!(
        messages
            .iter()
            .all(|m| header(m, "traceparent") == trace.get("traceparent").map(String::as_str))
    );
}

#[tokio::test]
async fn a_crash_between_produce_and_mark_loses_nothing() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 3).await;
    let expected = h.enqueue_orders(&topic.name, 5, &TraceHeaders::new()).await;

    // Produce the batch and wait for every acknowledgement, then "crash" before marking: the
    // step's transaction rolls back, which is what a killed process's does when its connection
    // goes.
    let relay = keel_outbox::relay::testing::crash_before_mark(h.relay(100));
    assert!(matches!(relay.step().await, Err(RelayError::Crashed)));
    drop(relay);
    assert_eq!(pending(&h.pool).await.unwrap(), 10, "nothing was marked");

    // A new relay publishes the same rows again.
    let restarted = h.relay(100);
    assert_eq!(restarted.step().await.unwrap(), Step::Published(10));
    assert_eq!(pending(&h.pool).await.unwrap(), 0);
    // The first wave (each order's first event) went out before the crash, then all ten.
    let messages = read_topic(&topic.name, Duration::from_secs(30), |m| m.len() >= 15).await;
    assert_eq!(distinct_ids(&messages), 10);
    assert_delivered_in_order(&h.registry_url, &messages, &expected).await;
}

/// Whether a session holds the relay's lock in this test's database, asked on a connection of its own from another
/// thread while this one waits: no task of the test's runtime (the pool's among them) runs
/// before the answer.
fn relay_lock_held(url: &str) -> bool {
    let url = url.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap();
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                       AND ((classid::bigint << 32) | objid::bigint) = $1)",
                )
                .bind(keel_outbox::relay::RELAY_LOCK)
                .fetch_one(&mut conn)
                .await
                .unwrap()
            })
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn a_failed_step_frees_the_lock_for_the_next_at_once() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 1).await;
    h.enqueue_orders(&topic.name, 2, &TraceHeaders::new()).await;
    // A failed step's transaction, and the lock it holds, ends before the step returns: it is
    // not left for the pool to roll back some time later, while the next step, on another
    // pooled connection, finds the lock taken.
    let relay = keel_outbox::relay::testing::crash_before_mark(h.relay(100));
    assert!(!relay_lock_held(&h.db.url));
    for attempt in 0..5 {
        let step = relay.step().await;
        assert!(
            matches!(step, Err(RelayError::Crashed)),
            "attempt {attempt}: {step:?}"
        );
        assert!(!relay_lock_held(&h.db.url), "attempt {attempt}: lock held");
    }
    assert_eq!(h.relay(100).step().await.unwrap(), Step::Published(4));
}

#[tokio::test]
async fn two_relays_together_deliver_every_event_in_order() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 6).await;
    let stop = CancellationToken::new();
    let a = tokio::spawn(h.relay(3).run(stop.clone()));
    let b = tokio::spawn(h.relay(3).run(stop.clone()));

    // Orders arrive while both relays run.
    let expected = h
        .enqueue_orders(&topic.name, 60, &TraceHeaders::new())
        .await;
    eventually("the outbox to drain", Duration::from_secs(60), || async {
        (pending(&h.pool).await.ok()? == 0).then_some(())
    })
    .await;
    stop.cancel();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();

    let messages = read_topic(&topic.name, Duration::from_secs(30), |m| {
        distinct_ids(m) >= 120
    })
    .await;
    assert_delivered_in_order(&h.registry_url, &messages, &expected).await;
}

#[tokio::test]
async fn a_row_that_can_never_be_published_is_set_aside_and_holds_back_only_its_own_order() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 1).await;
    let expected = h.enqueue_orders(&topic.name, 2, &TraceHeaders::new()).await;
    // A row of the older format (JSON only) that no build knows.
    sqlx::query("UPDATE outbox.events SET payload = '{\"NoSuchEvent\": {}}', body = NULL, schema_fingerprint = NULL WHERE id = (SELECT min(id) FROM outbox.events)")
        .execute(&h.pool)
        .await
        .unwrap();
    let relay = h.relay(10);
    assert_eq!(
        relay.step().await.unwrap(),
        Step::Published(2),
        "the other order's two events"
    );
    let failed: (i64, Option<String>) = sqlx::query_as(
        "SELECT count(*), max(error) FROM outbox.events WHERE failed_at IS NOT NULL",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(failed.0, 1);
    assert!(failed.1.unwrap_or_default().contains("not a known event"));
    assert_eq!(
        pending(&h.pool).await.unwrap(),
        1,
        "the order's second event waits behind it"
    );
    assert_eq!(
        relay.step().await.unwrap(),
        Step::Published(0),
        "and keeps waiting"
    );
    let messages = read_topic(&topic.name, Duration::from_secs(30), |m| m.len() >= 2).await;
    let ids: Vec<&str> = messages
        .iter()
        .filter_map(|m| header(m, "keel-event-id"))
        .collect();
    assert_eq!(
        ids,
        [
            expected[2].event_id().to_string().as_str(),
            expected[3].event_id().to_string().as_str()
        ]
    );
}

#[tokio::test]
async fn published_rows_past_retention_are_deleted_beyond_one_statements_slice() {
    let h = Harness::start().await;
    // 25,000 rows published two hours ago (retention: one hour), more than one slice of
    // 10,000, and 5 published a minute ago that must stay.
    sqlx::query(
        "INSERT INTO outbox.events (topic, message_key, event_type, event_id, payload, published_at)
         SELECT 'old', g::text, 'keel.orders.OrderCreated', gen_random_uuid(), '{}',
                now() - CASE WHEN g <= 25000 THEN interval '2 hours' ELSE interval '1 minute' END
           FROM generate_series(1, 25005) g",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(h.relay(10).run(shutdown.clone()));
    // One cleanup runs when the relay starts, the next a minute later: all 25,000 must go in the
    // first.
    eventually(
        "the expired rows to be deleted",
        Duration::from_secs(30),
        || async {
            let expired: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox.events WHERE published_at < now() - interval '1 hour'",
            )
            .fetch_one(&h.pool)
            .await
            .unwrap();
            (expired == 0).then_some(())
        },
    )
    .await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(left, 5, "rows within the retention were deleted");
    shutdown.cancel();
    relay.await.unwrap().unwrap();
}

/// The relay lock's holders in this test's database (advisory locks are per database; other
/// tests' relays hold theirs), as PostgreSQL sees them: backend pids.
async fn lock_holders(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks
          WHERE locktype = 'advisory' AND granted
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(keel_outbox::relay::RELAY_LOCK)
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

// A relay whose host freezes mid-step (its connections open and silent, no RST) holds the relay
// lock in an open transaction. The server ends that transaction after
// idle_in_transaction_session_timeout (60 s, docs/operations.md), and another relay publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_frozen_mid_step_lets_go_and_another_publishes_within_the_documented_time() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 6).await;
    let expected = h.enqueue_orders(&topic.name, 5, &TraceHeaders::new()).await;

    // Relay A reaches PostgreSQL and Kafka through forwarders the test freezes. Kafka is frozen
    // from the start, so A's first step claims its batch and waits for deliveries, lock held.
    let (base, _) = h.db.url.rsplit_once('/').unwrap();
    let host = base.rsplit_once('@').map_or(base, |(_, h)| h);
    let postgres = Outage::forward(host).await;
    let kafka = Outage::forward(&keel_core::testkit::brokers()).await;
    kafka.freeze();
    let frozen_url = h.db.url.replacen(host, &postgres.addr.to_string(), 1);
    let mut s = keel_core::Settings::local();
    s.kafka.brokers = kafka.addr.to_string();
    s.schema_registry_url = h.registry_url.clone();
    s.relay.poll_interval = Duration::from_millis(200);
    let pool = keel_core::db::pool(&frozen_url, 2).await.unwrap();
    let stop = CancellationToken::new();
    let a = tokio::spawn(Relay::new(pool, &s).unwrap().run(stop.clone()));
    let holder = eventually(
        "relay A to hold the lock",
        Duration::from_secs(30),
        || async { lock_holders(&h.pool).await.first().copied() },
    )
    .await;
    postgres.freeze();

    // The deadline is the documented 60 s, B's poll and slack; without the server's timeout the
    // frozen transaction would hold the lock for good.
    let b = tokio::spawn(h.relay(100).run(stop.clone()));
    eventually(
        "relay B to publish everything once A's session is ended",
        Duration::from_secs(120),
        || async { (pending(&h.pool).await.ok()? == 0).then_some(()) },
    )
    .await;
    assert!(
        !lock_holders(&h.pool).await.contains(&holder),
        "the frozen session's lock was released"
    );
    stop.cancel();
    b.await.unwrap().unwrap();
    a.abort(); // frozen for good: it never hears back

    let messages = read_topic(&topic.name, Duration::from_secs(30), |m| {
        distinct_ids(m) >= expected.len()
    })
    .await;
    assert_delivered_in_order(&h.registry_url, &messages, &expected).await;
}

/// Enqueues `event` as a writer of another build would, under `written`.
async fn enqueue_as_other_build(
    h: &Harness,
    topic: &str,
    event: &Event,
    written: keel_schemas::Written,
) {
    let mut tx = h.pool.begin().await.unwrap();
    keel_outbox::enqueue_written(
        &mut tx,
        topic,
        &keel_outbox::Outgoing {
            key: event.aggregate_id().to_string(),
            event_id: event.event_id(),
            written,
            payload: serde_json::json!({"written by": "another build"}),
        },
        &TraceHeaders::new(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// The writer's schema of a published record, as the registry has it.
async fn writers_schema(h: &Harness, record: &OwnedMessage) -> serde_json::Value {
    let bytes = record.payload().unwrap();
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let answer: serde_json::Value = reqwest::get(format!("{}/schemas/ids/{id}", h.registry_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    serde_json::from_str(answer["schema"].as_str().unwrap()).unwrap()
}

fn field_names(schema: &serde_json::Value) -> Vec<&str> {
    schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect()
}

#[tokio::test]
async fn a_row_an_older_build_wrote_is_published_under_its_contract_and_read_with_defaults() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 1).await;
    // An order service of version 1 of OrderCreated, which has no `channel`, during a rolling
    // deploy to this build.
    let v1 = include_str!("../../schemas/published/keel.orders.OrderCreated/v1.avsc");
    let mut event = lifecycle(0).remove(0);
    if let Event::OrderCreated(created) = &mut event {
        created.channel = "not written".into();
    }
    enqueue_as_other_build(
        &h,
        &topic.name,
        &event,
        keel_schemas::write_under(&event, v1, vec![]).unwrap(),
    )
    .await;
    assert_eq!(h.relay(10).step().await.unwrap(), Step::Published(1));

    let records = read_topic(&topic.name, Duration::from_secs(30), |m| !m.is_empty()).await;
    let schema = writers_schema(&h, &records[0]).await;
    assert!(!field_names(&schema).contains(&"channel"), "{schema}");
    // This build reads it with its own contract: the field v1 lacks takes its default.
    let read = Decoder::new(&h.registry_url)
        .unwrap()
        .decode(records[0].payload())
        .await
        .unwrap();
    if let Event::OrderCreated(created) = &mut event {
        created.channel = "web".into();
    }
    assert_eq!(read, event);
}

#[tokio::test]
async fn a_row_a_newer_build_wrote_is_published_with_every_field_its_writer_set() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 1).await;
    // A newer order service's OrderCreated: this build's contract and a field more.
    let mut v3: serde_json::Value =
        serde_json::from_str(<OrderCreated as keel_schemas::events::Contract>::SCHEMA).unwrap();
    v3["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "gift_note", "type": "string", "default": ""}));
    let v3 = v3.to_string();
    let event = lifecycle(0).remove(0);
    let note = (
        "gift_note".to_owned(),
        apache_avro::types::Value::String("for you".into()),
    );
    enqueue_as_other_build(
        &h,
        &topic.name,
        &event,
        keel_schemas::write_under(&event, &v3, vec![note]).unwrap(),
    )
    .await;
    assert_eq!(h.relay(10).step().await.unwrap(), Step::Published(1));

    let records = read_topic(&topic.name, Duration::from_secs(30), |m| !m.is_empty()).await;
    let schema = writers_schema(&h, &records[0]).await;
    assert!(field_names(&schema).contains(&"gift_note"), "{schema}");
    // What the writer set is on the topic, for the builds that know the field.
    let parsed = apache_avro::Schema::parse_str(&v3).unwrap();
    let value = apache_avro::reader::datum::GenericDatumReader::builder(&parsed)
        .build()
        .unwrap()
        .read_value(&mut &records[0].payload().unwrap()[5..])
        .unwrap();
    let apache_avro::types::Value::Record(fields) = value else {
        panic!("a record");
    };
    assert!(
        fields.contains(&(
            "gift_note".to_owned(),
            apache_avro::types::Value::String("for you".into())
        )),
        "{fields:?}"
    );
    // And this build reads it as the event it knows.
    let read = Decoder::new(&h.registry_url)
        .unwrap()
        .decode(records[0].payload())
        .await
        .unwrap();
    assert_eq!(read, event);
}

#[tokio::test]
async fn a_row_whose_writers_schema_the_registry_refuses_is_set_aside_and_the_rest_are_published() {
    let h = Harness::start().await;
    let topic = TestTopic::new("orders", 1).await;
    let relay = h.relay(10);
    relay
        .prepare(&[(&topic.name, "keel.orders")])
        .await
        .unwrap();
    // A writer whose OrderCreated adds a field without a default: this build's contract cannot
    // read its data, and the registry (BACKWARD) refuses it with 409.
    let mut breaking: serde_json::Value =
        serde_json::from_str(<OrderCreated as keel_schemas::events::Contract>::SCHEMA).unwrap();
    breaking["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "required_note", "type": "string"}));
    let refused = lifecycle(0).remove(0);
    let note = (
        "required_note".to_owned(),
        apache_avro::types::Value::String("x".into()),
    );
    let written = keel_schemas::write_under(&refused, &breaking.to_string(), vec![note]).unwrap();
    enqueue_as_other_build(&h, &topic.name, &refused, written).await;
    h.enqueue_orders(&topic.name, 1, &TraceHeaders::new()).await;

    assert_eq!(
        relay.step().await.unwrap(),
        Step::Published(2),
        "the other order's two events"
    );
    let failed: (i64, Option<String>) = sqlx::query_as(
        "SELECT count(*), max(error) FROM outbox.events WHERE failed_at IS NOT NULL",
    )
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(failed.0, 1);
    assert!(
        failed.1.as_deref().is_some_and(|e| e.contains("409")),
        "{failed:?}"
    );
}
