//! The runtime's batches: records already fetched are applied in one transaction, all or
//! nothing, each event once; a batch that fails is applied record by record, so a poison record
//! is dead-lettered alone.

use std::time::Duration;

use keel_consumers::{Handler, HandlerError, Meta, Outcome, Subscription, dlq_topic, transact};
use keel_core::testkit::{eventually, read_topic, unique};
use keel_schemas::Event;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::Stack;

/// The batch size `Log` asks for: the tests' settings leave `KEEL_CONSUMER_BATCH_SIZE` empty, so
/// the runtime uses it.
const LOG_BATCH: usize = 40;

/// Logs every event it applies with the id of the transaction that applied it; fails
/// permanently on one chosen event.
struct Log {
    group: String,
    topic: String,
    fail_on: Option<Uuid>,
}

impl Log {
    fn subscription(&self) -> Subscription {
        Subscription::new(&self.group, vec![self.topic.clone()])
    }
}

impl Handler for Log {
    fn batch_size(&self) -> usize {
        LOG_BATCH
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        if self.fail_on == Some(event.event_id()) {
            return Err(HandlerError::Permanent(
                "the event this test refuses".into(),
            ));
        }
        sqlx::query("INSERT INTO batch_log (event_id, xact) VALUES ($1, txid_current())")
            .bind(event.event_id())
            .execute(tx)
            .await?;
        Ok(())
    }
}

fn event(i: usize) -> Event {
    Event::OrderCreated(keel_schemas::OrderCreated {
        event_id: Uuid::new_v4(),
        occurred_at: 1_764_000_000_000,
        order_id: Uuid::new_v4(),
        order_version: 1,
        customer: keel_schemas::Customer {
            id: format!("c-{i}"),
            email: "batch@example.com".into(),
            name: "Batch".into(),
        },
        currency: "EUR".into(),
        lines: vec![keel_schemas::OrderLine {
            sku: "SKU-1".into(),
            quantity: 1,
            unit_price_minor: 100,
        }],
        total_minor: 100,
        channel: "store".into(),
    })
}

fn meta(topic: &str, offset: i64) -> Meta {
    Meta {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        trace: Default::default(),
        span: tracing::Span::none(),
    }
}

async fn log_table(stack: &Stack) {
    sqlx::query(
        "CREATE TABLE batch_log (seq bigserial PRIMARY KEY, event_id uuid NOT NULL, xact bigint NOT NULL)",
    )
    .execute(&stack.pool)
    .await
    .unwrap();
}

async fn logged(stack: &Stack) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM batch_log ORDER BY seq")
        .fetch_all(&stack.pool)
        .await
        .unwrap()
}

/// A `Log` group on the stack's orders topic, running until `stop`.
async fn run_log(
    stack: &Stack,
    group: &str,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let handler = Log {
        group: group.to_owned(),
        topic: stack.orders.name.clone(),
        fail_on: None,
    };
    tokio::spawn(
        stack
            .consumer(handler.subscription(), handler)
            .await
            .run(stop.clone()),
    )
}

/// Sends `values` to partition 0 of the orders topic, enqueued together so that they leave in
/// one batch (with `linger.ms`); their offsets.
async fn send_in_one_batch(producer: &FutureProducer, topic: &str, values: &[Vec<u8>]) -> Vec<i64> {
    let mut deliveries = Vec::new();
    for value in values {
        let record = FutureRecord::to(topic)
            .partition(0)
            .key("one-batch")
            .payload(value);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    let mut offsets = Vec::new();
    for d in deliveries {
        offsets.push(d.await.unwrap().map_err(|(e, _)| e).unwrap().offset);
    }
    offsets
}

#[tokio::test]
async fn a_batch_commits_all_or_nothing_and_applies_each_event_once_in_order() {
    let stack = Stack::start().await;
    log_table(&stack).await;
    let topic = stack.orders.name.clone();
    let mut handler = Log {
        group: unique("batch"),
        topic: topic.clone(),
        fail_on: None,
    };
    let (a, b, c) = (event(1), event(2), event(3));
    // `a` twice in one batch (a redelivery fetched together with the original).
    let batch = vec![
        (a.clone(), meta(&topic, 0)),
        (b.clone(), meta(&topic, 1)),
        (a.clone(), meta(&topic, 2)),
        (c.clone(), meta(&topic, 3)),
    ];
    let outcomes = transact(&stack.pool, &handler.group, &handler, &batch)
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            Outcome::Applied,
            Outcome::Applied,
            Outcome::Duplicate,
            Outcome::Applied
        ]
    );
    assert_eq!(
        logged(&stack).await,
        [a.event_id(), b.event_id(), c.event_id()],
        "each event once, in the batch's order"
    );
    assert_eq!(
        stack
            .scalar("SELECT count(DISTINCT xact) FROM batch_log")
            .await,
        1,
        "one transaction"
    );

    // The same batch again (a redelivery after a crash before the offsets were committed).
    let again = transact(&stack.pool, &handler.group, &handler, &batch)
        .await
        .unwrap();
    assert_eq!(again, vec![Outcome::Duplicate; 4]);
    assert_eq!(logged(&stack).await.len(), 3);

    // One effect fails: nothing of the batch commits, not even the dedupe rows of the others.
    let (d, e, f) = (event(4), event(5), event(6));
    handler.fail_on = Some(e.event_id());
    let failing = vec![
        (d.clone(), meta(&topic, 4)),
        (e.clone(), meta(&topic, 5)),
        (f.clone(), meta(&topic, 6)),
    ];
    let error = transact(&stack.pool, &handler.group, &handler, &failing)
        .await
        .unwrap_err();
    assert!(matches!(error, HandlerError::Permanent(_)), "{error}");
    assert_eq!(logged(&stack).await.len(), 3);
    let dedupe_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM consumers.processed_events WHERE group_id = $1 AND event_id = ANY($2)",
    )
    .bind(&handler.group)
    .bind(vec![d.event_id(), f.event_id()])
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(dedupe_rows, 0, "the batch's other dedupe rows rolled back");
}

#[tokio::test]
async fn a_backlog_goes_in_batches_and_a_poison_record_among_it_is_dead_lettered_alone() {
    let stack = Stack::start().await;
    log_table(&stack).await;
    let group = unique("batch");
    let dlq = dlq_topic(&stack.orders.name, &group);
    // The poison first, so that it is fetched with the events behind it.
    let producer: FutureProducer = keel_core::kafka::producer_config(&keel_core::testkit::kafka())
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&stack.orders.name)
                .partition(0)
                .key("poison")
                .payload(&b"\x00\x00\x00\x00\x01not avro"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let total = 300;
    let mut ids = Vec::with_capacity(total);
    let mut tx = stack.pool.begin().await.unwrap();
    for i in 0..total {
        let e = event(i);
        ids.push(e.event_id());
        keel_outbox::enqueue(&mut tx, &stack.orders.name, &e, &Default::default())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let stop = CancellationToken::new();
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    eventually(
        "the relay to publish the backlog",
        Duration::from_secs(60),
        || async {
            (stack
                .scalar("SELECT count(*) FROM outbox.events WHERE published_at IS NULL")
                .await
                == 0)
                .then_some(())
        },
    )
    .await;

    let consumer = run_log(&stack, &group, &stop).await;
    eventually(
        "every event of the backlog to be applied",
        Duration::from_secs(120),
        || async { (stack.processed(&group).await == total as i64).then_some(()) },
    )
    .await;
    let dead = read_topic(&dlq, Duration::from_secs(60), |m| !m.is_empty()).await;
    assert_eq!(dead.len(), 1, "the poison, alone");

    let mut applied = logged(&stack).await;
    assert_eq!(applied.len(), total, "each event once");
    applied.sort();
    ids.sort();
    assert_eq!(applied, ids);
    let largest: i64 = stack
        .scalar("SELECT max(n) FROM (SELECT count(*) AS n FROM batch_log GROUP BY xact) t")
        .await;
    assert!(
        largest > 1,
        "a backlog is applied several events per transaction"
    );
    assert!(
        largest <= LOG_BATCH as i64,
        "at most the group's own batch size ({LOG_BATCH}) per transaction, not {largest}"
    );
    stop.cancel();
    consumer.await.unwrap().unwrap();
    relay.await.unwrap().unwrap();
}

/// A group resuming from a committed offset in the middle of a batch the producer wrote in one
/// go gets every record from that offset on. (tansu 0.6 answers such a fetch from the next
/// batch on; the runtime notices the gap when that next batch comes and reads the partition
/// again from before it.)
#[tokio::test]
async fn a_group_resuming_in_the_middle_of_a_produced_batch_loses_nothing() {
    let stack = Stack::start().await;
    log_table(&stack).await;
    let encoder = keel_schemas::Encoder::new(&stack.registry_url).unwrap();
    let producer: FutureProducer = keel_core::kafka::producer_config(&keel_core::testkit::kafka())
        .set("linger.ms", "200")
        .create()
        .unwrap();
    let events: Vec<Event> = (0..10).map(event).collect();
    let mut values = Vec::new();
    for e in &events {
        values.push(encoder.encode(&stack.orders.name, e).await.unwrap());
    }
    let offsets = send_in_one_batch(&producer, &stack.orders.name, &values).await;
    assert_eq!(offsets.len(), 10);
    // Traffic goes on: a later batch.
    let later = event(10);
    let value = encoder.encode(&stack.orders.name, &later).await.unwrap();
    producer
        .send(
            FutureRecord::to(&stack.orders.name)
                .partition(0)
                .key("one-batch")
                .payload(&value),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let group = unique("batch");
    let resume_at = offsets[4];
    keel_core::kafka::commit_offsets(
        &keel_core::testkit::kafka(),
        &group,
        &[(stack.orders.name.clone(), 0, resume_at)],
    )
    .unwrap();

    let stop = CancellationToken::new();
    let consumer = run_log(&stack, &group, &stop).await;
    eventually(
        "the records from the committed offset on to be applied",
        Duration::from_secs(60),
        || async { (stack.processed(&group).await >= 7).then_some(()) },
    )
    .await;
    let mut expected: Vec<Uuid> = events[4..].iter().map(Event::event_id).collect();
    expected.push(later.event_id());
    assert_eq!(
        logged(&stack).await,
        expected,
        "every record from the committed offset on, in order, and none before it"
    );
    stop.cancel();
    consumer.await.unwrap().unwrap();
}

/// A poison record at the head of a produced batch is dead-lettered while the rest of that batch
/// waits in the consumer's fetch queue: every one of them is applied. (The dead-letter write used
/// to pause the partitions, which throws away what librdkafka fetched ahead; tansu 0.6 then
/// answered the fetch again from the next batch on, and with none behind it the rest of the
/// batch waited for new traffic.)
#[tokio::test]
async fn the_records_fetched_behind_a_dead_letter_are_all_applied() {
    let stack = Stack::start().await;
    log_table(&stack).await;
    let encoder = keel_schemas::Encoder::new(&stack.registry_url).unwrap();
    let producer: FutureProducer = keel_core::kafka::producer_config(&keel_core::testkit::kafka())
        .set("linger.ms", "200")
        .create()
        .unwrap();
    let events: Vec<Event> = (0..3 * LOG_BATCH).map(event).collect();
    let mut values = vec![b"\x00\x00\x00\x00\x01not avro".to_vec()];
    for e in &events {
        values.push(encoder.encode(&stack.orders.name, e).await.unwrap());
    }
    // In one batch, the poison first.
    send_in_one_batch(&producer, &stack.orders.name, &values).await;

    let group = unique("batch");
    let stop = CancellationToken::new();
    let consumer = run_log(&stack, &group, &stop).await;
    let dlq = dlq_topic(&stack.orders.name, &group);
    let dead = read_topic(&dlq, Duration::from_secs(60), |m| !m.is_empty()).await;
    assert_eq!(dead.len(), 1, "the poison, alone");
    eventually(
        "every record behind the poison to be applied",
        Duration::from_secs(60),
        || async { (stack.processed(&group).await >= events.len() as i64).then_some(()) },
    )
    .await;
    let expected: Vec<Uuid> = events.iter().map(Event::event_id).collect();
    assert_eq!(logged(&stack).await, expected, "each once, in order");
    stop.cancel();
    consumer.await.unwrap().unwrap();
}
