//! `keel` against a replicated cluster: librdkafka's mock cluster (three brokers, three replicas
//! per partition) made in this process and used by `keel` processes as their bootstrap servers,
//! with no broker quirks. Its CreateTopics request times out, so topics are made with the mock
//! cluster's own call, as `keel topics create` would have made them.

use std::process::{Command, Stdio};
use std::time::Duration;

use keel_core::Settings;
use keel_core::kafka::Kafka;
use keel_core::settings::BrokerQuirks;
use keel_core::testkit::{Process, TestDb, eventually, free_port};
use rdkafka::mocking::MockCluster;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// `/ready`'s status and JSON body.
async fn ready(http: &reqwest::Client, url: &str) -> Option<(u16, Value)> {
    let (status, body) = crate::common::fetch(http, url).await?;
    Some((status, serde_json::from_str(&body).ok()?))
}

// Multi-threaded: the registry runs in this process and must answer while `keel` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_dead_letter_topic_is_missing_is_not_ready_and_names_it() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    for topic in ["orders", "inventory"] {
        cluster.create_topic(topic, 6, 3).expect("topic");
    }
    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let (registry, _) =
        keel_schemas::registry::spawn(&db.url, "127.0.0.1:0".parse().unwrap(), stop.clone())
            .await
            .unwrap();
    let admin = format!("127.0.0.1:{}", free_port().unwrap());
    let group = keel_on(
        &cluster,
        &db,
        &format!("http://{registry}"),
        &["consume", "analytics"],
        &[("KEEL_ADMIN_ADDR", admin.as_str())],
        None,
    );
    let http = reqwest::Client::new();
    let url = format!("http://{admin}/ready");

    let (_, body) = eventually(
        "/ready to answer 503 for the missing dead-letter topic",
        Duration::from_secs(60),
        || async {
            ready(&http, &url)
                .await
                .filter(|(status, _)| *status == 503)
        },
    )
    .await;
    let said = body["broker"].as_str().unwrap_or_default();
    assert!(
        said.contains("orders.analytics.dlq") && said.contains("keel topics create"),
        "names the topic and the fix: {body}"
    );
    assert_eq!(body["database"], "ok", "{body}");
    assert_eq!(body["registry"], "ok", "{body}");
    assert!(
        !group.exited(),
        "the group keeps running, waiting for its topic"
    );

    cluster
        .create_topic("orders.analytics.dlq", 1, 3)
        .expect("dead-letter topic");
    let (_, body) = eventually(
        "/ready to recover once the topic exists",
        Duration::from_secs(60),
        || async {
            ready(&http, &url)
                .await
                .filter(|(status, _)| *status == 200)
        },
    )
    .await;
    assert_eq!(body["broker"], "ok");
    group.terminate().expect("SIGTERM: exits 0");
    stop.cancel();
}

/// `keel topics list` with `KEEL_KAFKA_*` properties for TLS, against `brokers`.
fn topics_list(brokers: &str, properties: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(["topics", "list", "--output", "json"])
        .env("KEEL_KAFKA_BROKERS", brokers)
        .env("RUST_LOG", "warn");
    for (k, v) in properties {
        cmd.env(k, v);
    }
    cmd.output().expect("keel runs")
}

// A TLS listener in front of a mock broker: what the bootstrap connection of a cluster with
// `security.protocol=SSL` (MSK, Confluent Cloud, Aiven) asks of keel's client. The brokers the
// metadata then names listen in plain, so this proves the handshake, the trust store and the
// first requests over TLS, not a whole session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_reaches_a_tls_listener_it_is_told_to_trust_and_refuses_one_it_is_not() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("secured", 3, 1).expect("topic");
    let ca = keel_core::testkit::TestCa::new();
    let proxy = keel_core::testkit::TlsProxy::start(
        &ca,
        &cluster.bootstrap_servers(),
        keel_core::testkit::Preamble::None,
    )
    .await;
    let listener = format!("localhost:{}", proxy.addr.port());
    let ca_file = ca.ca_pem.display().to_string();

    let trusted = tokio::task::spawn_blocking({
        let (listener, ca_file) = (listener.clone(), ca_file.clone());
        move || {
            topics_list(
                &listener,
                &[
                    ("KEEL_KAFKA_SECURITY_PROTOCOL", "ssl"),
                    ("KEEL_KAFKA_SSL_CA_LOCATION", &ca_file),
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let listed: Value = serde_json::from_slice(&trusted.stdout).unwrap();
    let secured = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "secured")
        .unwrap_or_else(|| panic!("the topic, read over TLS: {listed}"));
    assert_eq!(secured["partitions"], 3);
    assert!(proxy.handshakes() >= 1, "the answer came over TLS");

    // Not told to trust the test's CA: the system's roots do not know it, and keel says so.
    let refused_before = proxy.failed_handshakes();
    let untrusted = tokio::task::spawn_blocking({
        let listener = listener.clone();
        move || topics_list(&listener, &[("KEEL_KAFKA_SECURITY_PROTOCOL", "ssl")])
    })
    .await
    .unwrap();
    assert!(!untrusted.status.success());
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(said.contains("KEEL_KAFKA_BROKERS"), "{said}");
    assert!(
        proxy.failed_handshakes() > refused_before,
        "the client refused the certificate"
    );
}

/// A `keel` command against `cluster`, its stderr written to `stderr` (read with [`said`]), or
/// to the test's.
fn keel_on(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    db: &TestDb,
    registry: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stderr: Option<&std::path::Path>,
) -> Process {
    let mut s = Settings::local();
    s.kafka = Kafka::new(cluster.bootstrap_servers());
    s.broker_quirks = BrokerQuirks::None;
    s.database_url = db.url.clone();
    s.schema_registry_url = registry.to_owned();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(args)
        .envs(s.to_env())
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(match stderr {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("stderr file")),
            None => Stdio::inherit(),
        });
    Process::spawn(&format!("keel {}", args.join(" ")), cmd).expect("keel starts")
}

fn said(stderr: &std::path::Path) -> String {
    std::fs::read_to_string(stderr).unwrap_or_default()
}

/// Waits (up to `timeout`) for `process` to exit by itself; its status.
async fn exit_of(
    process: Process,
    timeout: Duration,
    stderr: &std::path::Path,
) -> std::process::ExitStatus {
    keel_core::testkit::wait_until(&format!("{} to exit", process.name), timeout, || async {
        Ok(process.exited())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; it said: {}", said(stderr)));
    tokio::task::spawn_blocking(move || process.wait())
        .await
        .unwrap()
        .unwrap()
}

// The mock cluster does not fence a second static member itself; it answers the member's
// heartbeat with the error a broker sends a fenced one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_static_member_reports_the_fatal_error_and_exits_non_zero() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    let subscription = keel_consumers::group("analytics")
        .unwrap()
        .subscription(&Settings::local().topics);
    for topic in subscription
        .topics
        .iter()
        .chain(&subscription.dead_letter_topics())
    {
        cluster.create_topic(topic, 3, 3).expect("topic");
    }
    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let (registry, _) =
        keel_schemas::registry::spawn(&db.url, "127.0.0.1:0".parse().unwrap(), stop.clone())
            .await
            .unwrap();
    let admin = format!("127.0.0.1:{}", free_port().unwrap());
    let stderr = std::env::temp_dir().join(keel_core::testkit::unique("keel-stderr"));
    let group = keel_on(
        &cluster,
        &db,
        &format!("http://{registry}"),
        &["consume", "analytics"],
        &[
            ("KEEL_ADMIN_ADDR", admin.as_str()),
            ("KEEL_CONSUMER_INSTANCE_ID", "a"),
        ],
        Some(&stderr),
    );
    let http = reqwest::Client::new();
    let metrics = format!("http://{admin}/metrics");
    eventually(
        "the member to own partitions",
        Duration::from_secs(60),
        || async {
            let (_, page) = crate::common::fetch(&http, &metrics).await?;
            (keel_core::testkit::metric_sum(
                &page,
                "keel_consumer_assigned_partitions",
                "group=\"analytics\"",
            ) > 0.0)
                .then_some(())
        },
    )
    .await;
    let health = format!("http://{admin}/health");
    let (status, _) = crate::common::fetch(&http, &health)
        .await
        .expect("/health answers");
    assert_eq!(status, 200, "live before");

    cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::Heartbeat,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID; 5],
    );
    let status = exit_of(group, Duration::from_secs(60), &stderr).await;
    assert!(!status.success(), "exits non-zero: {status}");
    let said = said(&stderr);
    assert!(
        said.contains("failed fatally") && said.contains("group.instance.id"),
        "names the fatal error: {said}"
    );
    let _ = std::fs::remove_file(&stderr);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_stops_the_relay_non_zero_and_a_restarted_relay_loses_nothing() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    for topic in ["orders", "inventory"] {
        cluster.create_topic(topic, 1, 3).expect("topic");
    }
    let db = TestDb::new().await;
    keel_core::db::migrate(&db.url, keel_outbox::DB_SCHEMA, &keel_outbox::MIGRATOR)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let (registry, _) =
        keel_schemas::registry::spawn(&db.url, "127.0.0.1:0".parse().unwrap(), stop.clone())
            .await
            .unwrap();
    let registry = format!("http://{registry}");
    let pool = db.pool().await;
    let mut events = Vec::new();
    for i in 0..5 {
        let event = created_event(i);
        let mut tx = pool.begin().await.unwrap();
        keel_outbox::enqueue(&mut tx, "orders", &event, &Default::default())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        events.push(event.event_id().to_string());
    }
    // A retried record answered "unknown producer id": librdkafka cannot go on without risking a
    // duplicate or a reordering, and fails the producer for good.
    cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::Produce,
        &[
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID,
        ],
    );
    let stderr = std::env::temp_dir().join(keel_core::testkit::unique("keel-stderr"));
    let relay = keel_on(&cluster, &db, &registry, &["relay"], &[], Some(&stderr));
    let status = exit_of(relay, Duration::from_secs(60), &stderr).await;
    assert!(!status.success(), "exits non-zero: {status}");
    let first = said(&stderr);
    assert!(
        first.contains("failed fatally"),
        "names the fatal error: {first}"
    );
    // Rows acknowledged before the fatal error are marked; the ones it hit stay pending.
    assert!(
        keel_outbox::pending(&pool).await.unwrap() >= 1,
        "the rows the fatal error hit stay pending"
    );

    // Restarted (as an orchestrator would), with a new producer.
    cluster.clear_request_errors(rdkafka::types::RDKafkaApiKey::Produce);
    let _ = std::fs::remove_file(&stderr);
    let stderr = std::env::temp_dir().join(keel_core::testkit::unique("keel-stderr"));
    let relay = keel_on(&cluster, &db, &registry, &["relay"], &[], Some(&stderr));
    eventually(
        "the restarted relay to publish every row",
        Duration::from_secs(60),
        || async { (keel_outbox::pending(&pool).await.ok()? == 0).then_some(()) },
    )
    .await;
    relay.terminate().expect("SIGTERM: exits 0");
    let on_the_log: std::collections::HashSet<String> = read_all(&cluster, "orders", events.len())
        .iter()
        .filter_map(|m| {
            use rdkafka::message::{Headers, Message};
            let h = m.headers()?.iter().find(|h| h.key == "keel-event-id")?;
            Some(String::from_utf8_lossy(h.value?).into_owned())
        })
        .collect();
    for id in &events {
        assert!(on_the_log.contains(id), "event {id} is on the log");
    }
    let _ = std::fs::remove_file(&stderr);
    stop.cancel();
}

/// At least `count` records of `topic`'s partition 0, read from the beginning (panics after 30 s).
fn read_all(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    count: usize,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", keel_core::testkit::unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&partitions).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut read = Vec::new();
    while read.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {count} records",
            read.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            read.push(m.detach());
        }
    }
    read
}

/// Order `i`'s creation.
fn created_event(i: usize) -> keel_schemas::Event {
    use keel_schemas::events::{Customer, OrderCreated, OrderLine};
    keel_schemas::Event::OrderCreated(OrderCreated {
        event_id: uuid::Uuid::new_v4(),
        occurred_at: 1_764_000_000_000,
        order_id: uuid::Uuid::new_v4(),
        order_version: 1,
        customer: Customer {
            id: format!("c-{i}"),
            email: format!("c{i}@example.com"),
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
