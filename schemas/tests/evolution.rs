//! Contract evolution on a real broker and registry: `OrderCreated` v2 added `channel` (default
//! "web"). A reader built for v1 and a reader built for v2 consume the same topic at the same
//! time, and each reads both versions' records.

use std::time::Duration;

use apache_avro::Schema;
use apache_avro::types::Value;
use keel_core::testkit::{TestDb, TestTopic, unique};
use keel_schemas::history::Repository;
use keel_schemas::{Decoder, Encoder, Event};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const NAME: &str = "keel.orders.OrderCreated";

fn published(version: i32) -> String {
    std::fs::read_to_string(format!(
        "{}/published/{NAME}/v{version}.avsc",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// `OrderCreated` as a service built against contract v1 knows it: no `channel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCreatedV1 {
    event_id: String,
    occurred_at: i64,
    order_id: String,
    order_version: i32,
    customer: keel_schemas::Customer,
    currency: String,
    lines: Vec<keel_schemas::OrderLine>,
    total_minor: i64,
}

fn v1_order(order_id: uuid::Uuid) -> OrderCreatedV1 {
    OrderCreatedV1 {
        event_id: uuid::Uuid::new_v4().to_string(),
        occurred_at: 1_764_000_000_000,
        order_id: order_id.to_string(),
        order_version: 1,
        customer: keel_schemas::Customer {
            id: "c-1".into(),
            email: "ada@example.com".into(),
            name: "Ada".into(),
        },
        currency: "EUR".into(),
        lines: vec![keel_schemas::OrderLine {
            sku: "SKU-1".into(),
            quantity: 1,
            unit_price_minor: 100,
        }],
        total_minor: 100,
    }
}

/// A reader built for v1: decodes with the writer's schema from the registry, then resolves to
/// the v1 contract, as any Avro reader does.
async fn read_as_v1(decoder: &AvroDecoder, bytes: &[u8]) -> OrderCreatedV1 {
    let reader = Schema::parse_str(&published(1)).unwrap();
    let written = decoder.decode(Some(bytes)).await.unwrap();
    let resolved = written.value.resolve(&reader).unwrap();
    if let Value::Record(fields) = &resolved {
        assert!(
            fields.iter().all(|(k, _)| k != "channel"),
            "v1 never sees channel"
        );
    }
    apache_avro::from_value(&resolved).unwrap()
}

async fn consume_two(topic: &str) -> Vec<Vec<u8>> {
    let consumer: StreamConsumer =
        keel_core::kafka::consumer_config(&keel_core::testkit::kafka(), &unique("reader"))
            .create()
            .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut values = Vec::new();
    while values.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .expect("two records within 60 s")
            .unwrap();
        values.push(m.payload().unwrap_or_default().to_vec());
    }
    values
}

#[tokio::test]
async fn readers_of_v1_and_v2_read_records_of_both_versions_from_one_topic_at_once() {
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let (addr, _) =
        keel_schemas::registry::spawn(&db.url, "127.0.0.1:0".parse().unwrap(), shutdown.clone())
            .await
            .unwrap();
    let registry = format!("http://{addr}");
    let topic = TestTopic::new("orders", 1).await;

    // The registry gets the repository's history, under FULL_TRANSITIVE, as `keel schema register` does.
    let repo = Repository::load(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
    let first = keel_schemas::history::register(&repo, &registry, &topic.name, "keel.orders", None)
        .await
        .unwrap();
    let again = keel_schemas::history::register(&repo, &registry, &topic.name, "keel.orders", None)
        .await
        .unwrap();
    let ids = |r: &[keel_schemas::history::Registration]| -> Vec<(String, Vec<(i32, i64)>)> {
        r.iter()
            .map(|r| (r.subject.clone(), r.ids.clone()))
            .collect()
    };
    assert_eq!(
        ids(&first),
        ids(&again),
        "registering again changes nothing"
    );
    let created = first.iter().find(|r| r.subject.ends_with(NAME)).unwrap();
    assert_eq!(created.ids.len(), 2, "v1 and v2 registered");
    assert_eq!(created.level.as_str(), "FULL_TRANSITIVE");

    // An old producer writes v1; keel (v2) writes v2.
    let old_order = uuid::Uuid::new_v4();
    let v1 = v1_order(old_order);
    let old_encoder = AvroEncoder::new(SrSettings::new(registry.clone()));
    let v1_bytes = old_encoder
        .encode_struct(
            &v1,
            &SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
                topic.name.clone(),
                SuppliedSchema::new(Some(NAME.into()), SchemaType::Avro, published(1)),
            ),
        )
        .await
        .unwrap();
    let new_order = uuid::Uuid::new_v4();
    let v2 = keel_schemas::OrderCreated {
        event_id: uuid::Uuid::new_v4(),
        occurred_at: 1_764_000_000_500,
        order_id: new_order,
        order_version: 1,
        customer: v1.customer.clone(),
        currency: "EUR".into(),
        lines: v1.lines.clone(),
        total_minor: 100,
        channel: "mobile".into(),
    };
    let v2_bytes = Encoder::new(&registry)
        .unwrap()
        .encode(&topic.name, &Event::OrderCreated(v2.clone()))
        .await
        .unwrap();
    assert_ne!(v1_bytes[1..5], v2_bytes[1..5], "two schema ids");
    let producer: FutureProducer = keel_core::kafka::producer_config(&keel_core::testkit::kafka())
        .create()
        .unwrap();
    for (key, value) in [(old_order, &v1_bytes), (new_order, &v2_bytes)] {
        producer
            .send(
                FutureRecord::to(&topic.name)
                    .key(&key.to_string())
                    .payload(value.as_slice()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    // Both readers consume the topic concurrently, each in its own group.
    let (as_v1, as_v2) = tokio::join!(
        async {
            let decoder = AvroDecoder::new(SrSettings::new(registry.clone()));
            let mut read = Vec::new();
            for bytes in consume_two(&topic.name).await {
                read.push(read_as_v1(&decoder, &bytes).await);
            }
            read
        },
        async {
            let decoder = Decoder::new(&registry).unwrap();
            let mut read = Vec::new();
            for bytes in consume_two(&topic.name).await {
                match decoder.decode(Some(&bytes)).await.unwrap() {
                    Event::OrderCreated(e) => read.push(e),
                    other => panic!("unexpected {other:?}"),
                }
            }
            read
        }
    );

    // The v1 reader reads the v2 record without `channel`.
    assert_eq!(as_v1[0], v1);
    assert_eq!(as_v1[1].order_id, new_order.to_string());
    assert_eq!(as_v1[1].total_minor, 100);
    // The v2 reader reads the v1 record with the default.
    assert_eq!(as_v2[0].order_id, old_order);
    assert_eq!(as_v2[0].channel, "web", "the default appears");
    assert_eq!(as_v2[1], v2);
    shutdown.cancel();
}
