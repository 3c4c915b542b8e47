//! keel's Kafka helpers against librdkafka's mock cluster: three brokers that answer as Apache
//! Kafka does (no broker quirks), in this process.

use std::time::Duration;

use keel_core::kafka::read_partition;
use keel_core::settings::BrokerQuirks;
use rdkafka::ClientConfig;
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

#[test]
fn read_partition_stops_at_the_end_offset_without_waiting_for_silence() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    cluster.create_topic("t", 1, 3).expect("topic");
    let brokers = cluster.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    for i in 0..10 {
        let payload = format!("record {i}");
        producer
            .send(BaseRecord::<(), _>::to("t").partition(0).payload(&payload))
            .expect("enqueued");
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");

    // Silence would take ten minutes to judge: the read must end because it reached the end.
    let (done, finished) = std::sync::mpsc::channel();
    let from = brokers.clone();
    std::thread::spawn(move || {
        let read = |start| {
            read_partition(
                &keel_core::kafka::Kafka::new(from.clone()),
                BrokerQuirks::None,
                "t",
                0,
                start,
                100,
                Duration::from_secs(600),
            )
        };
        let _ = done.send((read(None), read(Some(7)), read(Some(10))));
    });
    let (all, tail, past_the_end) = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("read_partition returns at the end offset, not after 600 s without records");
    let offsets = |r: anyhow::Result<Vec<rdkafka::message::OwnedMessage>>| -> Vec<i64> {
        r.expect("read").iter().map(Message::offset).collect()
    };
    assert_eq!(offsets(all), (0..10).collect::<Vec<_>>());
    assert_eq!(offsets(tail), vec![7, 8, 9]);
    assert_eq!(offsets(past_the_end), Vec::<i64>::new());
}

/// Kafka's `Utils.murmur2`, as the Java client's default partitioner hashes a record's key.
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[test]
fn murmur2_matches_kafkas_own_test_vectors() {
    // From Apache Kafka's UtilsTest.testMurmur2.
    assert_eq!(murmur2(b"21"), -973932308);
    assert_eq!(murmur2(b"foobar"), -790332482);
    assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
    assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
    assert_eq!(
        murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
        -58897971
    );
    assert_eq!(murmur2(b"abc"), 479470107);
}

#[tokio::test]
async fn a_record_keyed_by_order_id_lands_where_a_java_producer_would_put_it() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let cluster = MockCluster::new(3).expect("mock cluster");
    cluster.create_topic("orders", 6, 3).expect("topic");
    let producer: FutureProducer = keel_core::kafka::producer_config(
        &keel_core::kafka::Kafka::new(cluster.bootstrap_servers()),
    )
    .create()
    .expect("producer");
    for _ in 0..50 {
        let key = uuid::Uuid::now_v7().to_string();
        let delivery = producer
            .send(
                FutureRecord::to("orders").key(&key).payload("event"),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
        // The Java client's DefaultPartitioner (and Connect's, and ksqlDB's): positive murmur2
        // of the key bytes, modulo the partition count.
        let java = (murmur2(key.as_bytes()) & 0x7fff_ffff) % 6;
        assert_eq!(delivery.partition, java, "key {key}");
    }
}

#[test]
fn the_operators_properties_reach_every_client_last() {
    let mut kafka = keel_core::kafka::Kafka::new("b-1.example:9096");
    for (k, v) in [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "keel"),
        ("sasl.password", "s3cret"),
        ("linger.ms", "5"),
    ] {
        kafka.properties.insert(k.into(), v.into());
    }
    let producer = keel_core::kafka::producer_config(&kafka);
    let consumer = keel_core::kafka::consumer_config(&kafka, "g");
    let admin = keel_core::kafka::client_config(&kafka);
    for config in [&producer, &consumer, &admin] {
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("bootstrap.servers"), Some("b-1.example:9096"));
    }
    // Applied after keel's own: the operator's value wins.
    assert_eq!(producer.get("linger.ms"), Some("5"));
    assert_eq!(producer.get("enable.idempotence"), Some("true"));
    assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
}

#[test]
fn tls_and_every_sasl_mechanism_are_built_in() {
    use rdkafka::producer::BaseProducer;
    for (protocol, mechanism) in [
        ("SSL", None),
        ("SASL_SSL", Some("PLAIN")),
        ("SASL_SSL", Some("SCRAM-SHA-256")),
        ("SASL_SSL", Some("SCRAM-SHA-512")),
        ("SASL_SSL", Some("OAUTHBEARER")),
    ] {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("security.protocol", protocol);
        if let Some(m) = mechanism {
            config.set("sasl.mechanism", m);
            if m != "OAUTHBEARER" {
                config
                    .set("sasl.username", "keel")
                    .set("sasl.password", "pw");
            } else {
                config.set("sasl.oauthbearer.config", "principal=keel");
                config.set("enable.sasl.oauthbearer.unsecure.jwt", "true");
            }
        }
        // librdkafka refuses at creation what it was built without (no TLS: "ssl" unsupported).
        let created: Result<BaseProducer, _> = config.create();
        assert!(
            created.is_ok(),
            "{protocol} {mechanism:?}: {:?}",
            created.err()
        );
    }
}

#[test]
fn a_write_to_a_missing_topic_fails_and_does_not_create_it() {
    use rdkafka::producer::FutureProducer;
    let cluster = MockCluster::new(3).expect("mock cluster");
    // The mock cluster creates a topic a producer asks for, as a broker with
    // auto.create.topics.enable does.
    let mut kafka = keel_core::kafka::Kafka::new(cluster.bootstrap_servers());
    kafka
        .properties
        .insert("message.timeout.ms".into(), "5000".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let delivered = runtime.block_on(async {
        let producer: FutureProducer = keel_core::kafka::producer_config(&kafka)
            .create()
            .expect("producer");
        producer
            .send(
                rdkafka::producer::FutureRecord::<str, str>::to("never-declared")
                    .key("k")
                    .payload("v"),
                Duration::from_secs(0),
            )
            .await
    });
    assert!(delivered.is_err(), "nothing to write to: {delivered:?}");
    assert!(
        !keel_core::kafka::topic_exists(&kafka, "never-declared").expect("metadata"),
        "keel's producer does not create topics"
    );
}
