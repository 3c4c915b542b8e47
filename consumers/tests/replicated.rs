//! The consumer runtime's dead letters on a replicated cluster: librdkafka's mock cluster, three
//! brokers with three replicas per partition, in this process (no broker quirks). What tansu
//! cannot show: a dead-letter write the cluster refuses for want of in-sync replicas, and a
//! cluster that does not have the dead-letter topic (and would create one with its defaults if
//! a producer asked for it).

use std::time::Duration;

use keel_consumers::runtime::dlq_headers;
use keel_consumers::{Consumer, Handler, HandlerError, Meta, Subscription, dlq_topic};
use keel_core::Settings;
use keel_core::kafka::{Kafka, read_partition};
use keel_core::settings::BrokerQuirks;
use keel_core::testkit::{TestDb, eventually, unique};
use keel_schemas::Event;
use rdkafka::ClientConfig;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

/// A group that applies whatever decodes; these tests send only records that do not.
struct Accept;

impl Handler for Accept {
    async fn handle(
        &self,
        _tx: &mut PgConnection,
        _event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Three brokers; `topics` made with three replicas each, as `keel topics create` would.
fn cluster(topics: &[&str]) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(3).expect("mock cluster");
    for topic in topics {
        cluster.create_topic(topic, 1, 3).expect("topic");
    }
    cluster
}

/// Writes records that can never be decoded (not the Confluent wire format) to `topic`.
fn produce_poison(brokers: &str, topic: &str, keys: &[&str]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    for key in keys {
        producer
            .send(
                BaseRecord::to(topic)
                    .partition(0)
                    .key(*key)
                    .payload("not avro"),
            )
            .expect("enqueued");
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");
}

/// A consumer of [`Accept`] in `subscription`'s group on the mock cluster at `brokers`, on a
/// database of its own, running until [`Running::stop`].
struct Running {
    _db: TestDb,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(brokers: &str, subscription: Subscription) -> Self {
        let db = TestDb::new().await;
        let mut s = Settings::local();
        s.kafka = Kafka::new(brokers);
        s.broker_quirks = BrokerQuirks::None;
        s.database_url = db.url.clone();
        s.consumer.max_retry_backoff = Duration::from_secs(1);
        keel_consumers::migrate(&db.url, None)
            .await
            .expect("migrate");
        let consumer = Consumer::new(subscription, Accept, db.pool().await, &s).expect("consumer");
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone()));
        Self {
            _db: db,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("joined")
            .expect("the consumer stops cleanly");
    }
}

async fn read(brokers: &str, topic: &str) -> Vec<OwnedMessage> {
    let (kafka, topic) = (Kafka::new(brokers), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        read_partition(
            &kafka,
            BrokerQuirks::None,
            &topic,
            0,
            None,
            100,
            Duration::from_secs(5),
        )
        .unwrap_or_default()
    })
    .await
    .expect("read")
}

/// The group's committed offset on `topic`/0 (-1: none).
async fn committed(brokers: &str, group: &str, topic: &str) -> i64 {
    let (kafka, group, topic) = (Kafka::new(brokers), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        keel_core::kafka::group_offsets(&kafka, &group, &[&topic])
            .ok()
            .and_then(|p| p.first().and_then(|p| p.committed))
            .unwrap_or(-1)
    })
    .await
    .expect("offsets")
}

fn waiting(group: &str) -> String {
    format!("keel_consumer_dead_letter_waiting_records{{group=\"{group}\"}}")
}

/// The value of the sample `name` (with its labels) on this process's `/metrics`, if present.
fn gauge(name: &str) -> Option<f64> {
    keel_core::metrics::render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_for_want_of_replicas_holds_its_partition_until_the_cluster_heals() {
    let group = unique("replicas");
    let dlq = dlq_topic("orders", &group);
    let cluster = cluster(&["orders", &dlq]);
    let brokers = cluster.bootstrap_servers();
    produce_poison(&brokers, "orders", &["first", "second"]);
    // Every produce request from now on is answered as by a cluster with fewer in-sync replicas
    // than min.insync.replicas: the dead-letter write cannot succeed, and must not be dropped.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 5_000],
    );
    let running = Running::start(&brokers, Subscription::new(&group, vec!["orders".into()])).await;

    eventually(
        "the wait to show in keel_consumer_dead_letter_waiting_records",
        Duration::from_secs(30),
        || async { (gauge(&waiting(&group)) == Some(1.0)).then_some(()) },
    )
    .await;
    let outage = std::time::Instant::now();
    // For 20 s the partition waits: nothing written, nothing skipped, no offset committed.
    while outage.elapsed() < Duration::from_secs(20) {
        assert!(
            read(&brokers, &dlq).await.is_empty(),
            "refused writes land nowhere"
        );
        assert!(
            committed(&brokers, &group, "orders").await < 1,
            "the poison's offset is not committed before its dead letter is written"
        );
        assert_eq!(gauge(&waiting(&group)), Some(1.0), "still waiting");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    let letters = eventually(
        "both dead letters once the cluster heals",
        Duration::from_secs(60),
        || async {
            let read = read(&brokers, &dlq).await;
            (read.len() >= 2).then_some(read)
        },
    )
    .await;
    let keys: Vec<&[u8]> = letters.iter().filter_map(|m| m.key()).collect();
    assert_eq!(
        keys,
        [b"first".as_slice(), b"second"],
        "each once, in order"
    );
    let original_offsets: Vec<String> = letters
        .iter()
        .map(|m| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == dlq_headers::OFFSET))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(original_offsets, ["0", "1"]);
    eventually(
        "the partition to move on: both offsets committed",
        Duration::from_secs(30),
        || async { (committed(&brokers, &group, "orders").await == 2).then_some(()) },
    )
    .await;
    assert_eq!(gauge(&waiting(&group)), Some(0.0), "nothing waits any more");
    let page = keel_core::metrics::render();
    let took = keel_core::testkit::metric_sum(
        &page,
        "keel_consumer_dead_letter_write_seconds_sum",
        &format!("group=\"{group}\""),
    );
    assert!(
        took >= 20.0,
        "the first write waited out the outage: {took} s\n{page}"
    );

    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_fails_readiness_and_is_never_created_at_run_time() {
    let group = unique("absent");
    let dlq = dlq_topic("orders", &group);
    // The mock cluster creates a topic a producer asks for, as a broker with
    // auto.create.topics.enable does: were the runtime to write blindly, the topic would appear
    // with the broker's defaults.
    let cluster = cluster(&["orders"]);
    let brokers = cluster.bootstrap_servers();
    let kafka = Kafka::new(&brokers);
    let subscription = Subscription::new(&group, vec!["orders".into()]);
    let names = subscription.dead_letter_topics();
    assert_eq!(names, std::slice::from_ref(&dlq));
    let checks = keel_core::health::Checks::new(CancellationToken::new(), Duration::from_secs(30))
        .broker(&kafka)
        .topics(names);
    let (ready, body) = checks.ready().await;
    assert!(!ready, "{body}");
    let said = body["broker"].as_str().unwrap_or_default();
    assert!(
        said.contains(&dlq) && said.contains("keel topics create"),
        "readiness names the missing topic and the fix: {body}"
    );

    produce_poison(&brokers, "orders", &["poison"]);
    let running = Running::start(&brokers, subscription).await;
    eventually(
        "the poison to wait for its dead-letter topic",
        Duration::from_secs(30),
        || async { (gauge(&waiting(&group)) == Some(1.0)).then_some(()) },
    )
    .await;
    for _ in 0..5 {
        let k = kafka.clone();
        let exists = tokio::task::spawn_blocking({
            let dlq = dlq.clone();
            move || keel_core::kafka::topic_exists(&k, &dlq)
        })
        .await
        .expect("joined")
        .expect("metadata");
        assert!(!exists, "the runtime does not create {dlq}");
        assert!(committed(&brokers, &group, "orders").await < 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // `keel topics create` (here, the mock cluster's own call: its CreateTopics request times
    // out) makes it; the record lands and readiness recovers.
    cluster.create_topic(&dlq, 1, 3).expect("dead-letter topic");
    let letters = eventually(
        "the dead letter once its topic exists",
        Duration::from_secs(60),
        || async {
            let read = read(&brokers, &dlq).await;
            (!read.is_empty()).then_some(read)
        },
    )
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].key(), Some(b"poison".as_slice()));
    let (ready, body) = checks.ready().await;
    assert!(ready, "{body}");

    running.stop().await;
}

fn commits(group: &str, result: &str) -> f64 {
    keel_core::testkit::metric_sum(
        &keel_core::metrics::render(),
        "keel_consumer_commits_total",
        &format!("group=\"{group}\",result=\"{result}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_offset_commit_is_counted_and_logged_and_the_offsets_are_sent_again() {
    let group = unique("commits");
    let dlq = dlq_topic("orders", &group);
    let cluster = cluster(&["orders", &dlq]);
    let brokers = cluster.bootstrap_servers();
    produce_poison(&brokers, "orders", &["one"]);
    // The next commits are refused with an error librdkafka does not retry itself.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 3],
    );
    let running = Running::start(&brokers, Subscription::new(&group, vec!["orders".into()])).await;

    eventually(
        "the refused commits to be counted",
        Duration::from_secs(30),
        || async { (commits(&group, "failed") >= 3.0).then_some(()) },
    )
    .await;
    eventually(
        "the same offset to be committed once the cluster takes it",
        Duration::from_secs(30),
        || async { (committed(&brokers, &group, "orders").await == 1).then_some(()) },
    )
    .await;
    assert!(commits(&group, "committed") >= 1.0);
    assert_eq!(
        read(&brokers, &dlq).await.len(),
        1,
        "the record was done once"
    );

    running.stop().await;
}

/// The sample `name` with `label` on this process's `/metrics` (0 when absent).
fn sample(name: &str, label: &str) -> f64 {
    keel_core::testkit::metric_sum(&keel_core::metrics::render(), name, label)
}

// librdkafka throws a member out of its group when the application does not poll for
// max.poll.interval.ms (7 s here, 5 min by default); a record waiting out an outage longer than
// that must not make it. The registry is the dependency that is away: the record cannot be
// decoded until it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_waiting_out_a_long_outage_keeps_its_member_in_the_group_and_lag_is_reported() {
    let topic = unique("waiting");
    let group = unique("patient");
    let subscription = Subscription::new(&group, vec![topic.clone()]);
    let cluster = cluster(&[topic.as_str(), &dlq_topic(&topic, &group)]);
    let brokers = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    keel_consumers::migrate(&db.url, None)
        .await
        .expect("migrate");
    let registry_stop = CancellationToken::new();
    let (registry, task) = keel_schemas::registry::spawn(
        &db.url,
        "127.0.0.1:0".parse().unwrap(),
        registry_stop.clone(),
    )
    .await
    .unwrap();
    let registry_url = format!("http://{registry}");
    let event = Event::OrderPaid(keel_schemas::events::OrderPaid {
        event_id: uuid::Uuid::new_v4(),
        occurred_at: 1_764_000_000_500,
        order_id: uuid::Uuid::new_v4(),
        order_version: 2,
        customer_id: "c-1".into(),
        currency: "EUR".into(),
        amount_minor: 100,
        payment_reference: "pay-1".into(),
    });
    let value = keel_schemas::Encoder::new(&registry_url)
        .unwrap()
        .encode(&topic, &event)
        .await
        .expect("encoded");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    producer
        .send(BaseRecord::to(&topic).partition(0).key("k").payload(&value))
        .expect("enqueued");
    producer.flush(Duration::from_secs(30)).expect("flushed");
    // The registry goes away before the group first asks it for the schema.
    registry_stop.cancel();
    task.await.unwrap().unwrap();

    let mut s = Settings::local();
    s.kafka = Kafka::new(&brokers);
    for (property, value) in [
        ("max.poll.interval.ms", "7000"),
        ("statistics.interval.ms", "1000"),
    ] {
        s.kafka.properties.insert(property.into(), value.into());
    }
    s.broker_quirks = BrokerQuirks::None;
    s.database_url = db.url.clone();
    s.schema_registry_url = registry_url.clone();
    s.consumer.session_timeout = Duration::from_secs(6);
    s.consumer.max_retry_backoff = Duration::from_secs(1);
    let consumer = Consumer::new(subscription, Accept, db.pool().await, &s).expect("consumer");
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    let label = format!("group=\"{group}\"");
    eventually(
        "the group to retry the record",
        Duration::from_secs(60),
        || async { (sample("keel_consumer_retries_total", &label) > 0.0).then_some(()) },
    )
    .await;
    eventually(
        "the lag to be reported from librdkafka's statistics",
        Duration::from_secs(30),
        || async { (sample("keel_consumer_lag_records", &label) == 1.0).then_some(()) },
    )
    .await;
    // The outage lasts two poll intervals: the fault's length, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(14)).await;

    let back_stop = CancellationToken::new();
    let (_, back) = keel_schemas::registry::spawn(&db.url, registry, back_stop.clone())
        .await
        .expect("the registry is back on its address");
    eventually(
        "the record to be applied",
        Duration::from_secs(60),
        || async {
            let applied = format!("{label},outcome=\"applied\"");
            (sample("keel_consumer_records_total", &applied) == 1.0).then_some(())
        },
    )
    .await;
    eventually(
        "the lag to drop to zero once committed",
        Duration::from_secs(30),
        || async { (sample("keel_consumer_lag_records", &label) == 0.0).then_some(()) },
    )
    .await;
    assert_eq!(
        sample("keel_consumer_partitions_revoked_total", &label),
        0.0,
        "the member never left its group"
    );
    stop.cancel();
    running
        .await
        .expect("joined")
        .expect("the consumer stops cleanly");
    back_stop.cancel();
    let _ = back.await;
}
